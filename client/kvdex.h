/* kvdex.h — the public C API of kvdex: a KV-cache and retrieval store for
 * long-context LLM inference. One API, two transports:
 *   kvdex_open("local:", ...)                 an embedded store in this process
 *   kvdex_open("grpc://host:port", ...)       a kvdex server over gRPC
 *
 * Conventions: every function returns 0 or a negative KVDEX_E* code and then
 * kvdex_errmsg() (thread-local) says why. Objects come back through OUT parameters
 * and are freed by their matching free/close function, which accepts NULL.
 * A kvdex_db handle may be used from many threads at once; a kvdex_appender only
 * from one thread at a time.
 *
 * A failed call changes no stored state.
 *
 * Tensor layouts (little-endian, row-major), matching proto/kvdex/v1/kvdex.proto:
 *   K, V of an append:      sequence dtype, [n_kv_heads][n_tokens][head_dim]
 *   K, V of a read:         sequence dtype, [n_kv_heads][n][head_dim]
 *   queries of a search:    f32, [n_q_heads][head_dim]
 * Buffers carry no sizes: they must match the sequence's shape. Over gRPC the
 * client learns shapes from create/stat (or asks StatSequence on first use) and
 * keeps them per handle; it forgets one on delete and when the server refuses a
 * call for that sequence. (If another client re-creates an id with another shape,
 * one call of this handle may still be sized by the old shape: the server then
 * refuses it, and the next call asks again.)
 */
#ifndef KVDEX_KVDEX_H
#define KVDEX_KVDEX_H

#include <stddef.h>
#include <stdint.h>

#include "kvstore/base.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvdex_db kvdex_db;
typedef struct kvdex_appender kvdex_appender;

typedef struct kvdex_open_opts {
  uint64_t memory_cap;      /* local: node memory cap in bytes (0 = unlimited) */
  unsigned threads;         /* local: search threads (0 = all CPUs) */
  uint32_t timeout_ms;      /* grpc: per-call deadline in ms (0 = 30000); an append
                               stream is one call, from begin to commit */
  const char *name_space;   /* namespace for every call (NULL = "default") */
} kvdex_open_opts;

/* Opens a store. uri: "local:" or "grpc://host:port" (IPv6: "grpc://[addr]:port");
 * anything else is KVDEX_EINVAL. opts may be NULL. A grpc handle connects lazily;
 * the first call reports KVDEX_EUNAVAIL if the server cannot be reached.
 * kvdex_close(NULL) is a no-op; no call on the handle may be in flight. */
int kvdex_open(const char *uri, const kvdex_open_opts *opts, kvdex_db **out /* OUT */);
void kvdex_close(kvdex_db *db);

/* kvdex_shape (n_layers, n_kv_heads, n_q_heads, head_dim, block_tokens, dtype)
 * is defined in <kvdex/base.h>. block_tokens 0 = default (64). */

typedef struct kvdex_seq_info {
  kvdex_shape shape;
  uint64_t bytes;
  uint32_t n_layers;
  uint64_t *layer_tokens; /* n_layers entries, owned by the info; kvdex_seq_info_free */
} kvdex_seq_info;
/* Frees the arrays, not the struct, and clears them (a second call is a no-op).
 * kvdex_stat zeroes *info first, so freeing after a failed stat is safe. */
void kvdex_seq_info_free(kvdex_seq_info *info);

/* seq_id: 1..256 bytes of [A-Za-z0-9._:/-]. create: KVDEX_EEXIST if the id is taken
 * (the existing sequence is unchanged), KVDEX_EINVAL for a bad shape or id.
 * delete/stat: KVDEX_ENOTFOUND if absent; bytes_freed gets the bytes returned to
 * the node's memory budget. */
int kvdex_create(kvdex_db *db, const char *seq_id, const kvdex_shape *shape);
int kvdex_delete(kvdex_db *db, const char *seq_id, uint64_t *bytes_freed /* OUT, or NULL */);
int kvdex_stat(kvdex_db *db, const char *seq_id, kvdex_seq_info *info /* OUT */);

/* Lists sequence ids of the handle's namespace, sorted by strcmp. *ids is an
 * array of n strings, freed with kvdex_list_free. */
int kvdex_list(kvdex_db *db, char ***ids /* OUT */, size_t *n /* OUT */);
void kvdex_list_free(char **ids, size_t n);

/* Streaming append: begin, feed blocks, then commit (all or nothing) or abort.
 * kvdex_append_kv copies nothing it does not need to: over gRPC each call is one
 * stream message (a block of more than 16 MiB of K+V is split by token range).
 * A failed kvdex_append_kv ends the stream: later calls return the same code and
 * only commit (which reports it and stores nothing) or abort remain. Over gRPC the
 * server judges messages asynchronously, so a refusal (gap, conflict, memory cap,
 * another stream in progress) may only be reported by a later kvdex_append_kv or
 * by the commit. Begin fails with KVDEX_ENOTFOUND for an unknown sequence. */
int kvdex_append_begin(kvdex_db *db, const char *seq_id, kvdex_appender **out /* OUT */);
int kvdex_append_kv(kvdex_appender *ap, uint32_t layer, uint64_t token_start, uint32_t n_tokens,
                    const void *k, const void *v);
/* Commits the stream. tokens_appended (may be NULL) gets the new tokens stored,
 * replayed identical tokens excluded. A stream with no block commits nothing and
 * succeeds. Frees the appender whatever the result. */
int kvdex_append_commit(kvdex_appender *ap, uint64_t *tokens_appended /* OUT */);
/* Discards the stream (nothing is stored) and frees the appender. NULL: no-op. */
void kvdex_append_abort(kvdex_appender *ap);

/* Reads K and V of `n` tokens of one layer, all KV heads, into caller buffers of
 * n_kv_heads * n * head_dim elements each, layout [n_kv_heads][n][head_dim].
 * Ids may come in any order and repeat; each must be below the layer's committed
 * length (KVDEX_EINVAL otherwise). n = 0 reads nothing. On failure the buffers'
 * contents are unspecified (over gRPC part of them may have been written). */
int kvdex_read(kvdex_db *db, const char *seq_id, uint32_t layer, const uint64_t *token_ids,
               size_t n, void *k_out, void *v_out);

typedef struct kvdex_search_req {
  uint32_t k;       /* top-k per query head */
  uint32_t sinks;   /* exclude the first `sinks` tokens */
  uint32_t window;  /* exclude the last `window` tokens */
} kvdex_search_req;

/* Results of one query head: n hits in descending score, ties by ascending id;
 * n < k when fewer than k tokens are eligible. */
typedef struct kvdex_hits {
  uint32_t n;
  uint64_t *ids;
  float *scores;
} kvdex_hits;

typedef struct kvdex_search_out {
  uint32_t n_q_heads;
  kvdex_hits *heads;      /* n_q_heads entries */
  uint64_t keys_scanned;  /* keys scored, summed over KV heads */
  uint64_t tokens;        /* committed tokens of the layer when the search ran */
} kvdex_search_out;
void kvdex_search_out_free(kvdex_search_out *out); /* frees the arrays, not the struct */

/* Batched decode search: for each of n_seqs sequences, queries q[i] (f32,
 * [n_q_heads][head_dim] of that sequence's shape) on `layer`; out[i] receives the
 * result for seq_ids[i] (free each with kvdex_search_out_free). Over gRPC the whole
 * batch is one call. If any sequence fails the whole call fails, out[] is left
 * zeroed and nothing needs freeing. n_seqs = 0 is a no-op. Errors: KVDEX_EINVAL
 * (k = 0 or > 65536, layer out of range, non-finite query), KVDEX_ENOTFOUND. */
int kvdex_search(kvdex_db *db, uint32_t layer, const kvdex_search_req *req, size_t n_seqs,
                 const char *const *seq_ids, const float *const *q, kvdex_search_out *out /* OUT */);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_KVDEX_H */
