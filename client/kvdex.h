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
 * Tensor layouts (little-endian, row-major), matching proto/kvdex/v1/kvdex.proto:
 *   K, V of an append:      sequence dtype, [n_kv_heads][n_tokens][head_dim]
 *   queries of a search:    f32, [n_q_heads][head_dim]
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
  uint32_t timeout_ms;      /* grpc: per-call deadline (0 = 30000) */
  const char *name_space;   /* namespace for every call (NULL = "default") */
} kvdex_open_opts;

/* Opens a store. uri: "local:" or "grpc://host:port". opts may be NULL.
 * A grpc handle connects lazily; the first call reports KVDEX_EUNAVAIL if the
 * server cannot be reached. */
int kvdex_open(const char *uri, const kvdex_open_opts *opts, kvdex_db **out /* OUT */);
void kvdex_close(kvdex_db *db);

typedef struct kvdex_seq_shape {
  uint32_t n_layers, n_kv_heads, n_q_heads, head_dim;
  uint32_t block_tokens; /* 0 = default (64) */
  int dtype;             /* KVDEX_DTYPE_* */
} kvdex_seq_shape;

typedef struct kvdex_seq_info {
  kvdex_seq_shape shape;
  uint64_t bytes;
  uint32_t n_layers;
  uint64_t *layer_tokens; /* n_layers entries, owned by the info; kvdex_seq_info_free */
} kvdex_seq_info;
void kvdex_seq_info_free(kvdex_seq_info *info); /* frees the arrays, not the struct */

int kvdex_create(kvdex_db *db, const char *seq_id, const kvdex_seq_shape *shape);
int kvdex_delete(kvdex_db *db, const char *seq_id, uint64_t *bytes_freed /* OUT, or NULL */);
int kvdex_stat(kvdex_db *db, const char *seq_id, kvdex_seq_info *info /* OUT */);

/* Lists sequence ids of the handle's namespace. *ids is an array of n strings,
 * freed with kvdex_list_free. */
int kvdex_list(kvdex_db *db, char ***ids /* OUT */, size_t *n /* OUT */);
void kvdex_list_free(char **ids, size_t n);

/* Streaming append: begin, feed blocks, then commit (all or nothing) or abort.
 * kvdex_append_kv copies nothing it does not need to: over gRPC each call is one
 * stream message. */
int kvdex_append_begin(kvdex_db *db, const char *seq_id, kvdex_appender **out /* OUT */);
int kvdex_append_kv(kvdex_appender *ap, uint32_t layer, uint64_t token_start, uint32_t n_tokens,
                    const void *k, const void *v);
/* Commits the stream. tokens_appended (may be NULL) gets the new tokens stored.
 * Frees the appender whatever the result. */
int kvdex_append_commit(kvdex_appender *ap, uint64_t *tokens_appended /* OUT */);
/* Discards the stream (nothing is stored) and frees the appender. NULL: no-op. */
void kvdex_append_abort(kvdex_appender *ap);

/* Reads K and V of `n` tokens of one layer, all KV heads, into caller buffers of
 * n_kv_heads * n * head_dim elements each, layout [n_kv_heads][n][head_dim]. */
int kvdex_read(kvdex_db *db, const char *seq_id, uint32_t layer, const uint64_t *token_ids,
               size_t n, void *k_out, void *v_out);

typedef struct kvdex_search_req {
  uint32_t k;       /* top-k per query head */
  uint32_t sinks;   /* exclude the first `sinks` tokens */
  uint32_t window;  /* exclude the last `window` tokens */
} kvdex_search_req;

/* Results of one query head: n hits in descending score, ties by ascending id. */
typedef struct kvdex_hits {
  uint32_t n;
  uint64_t *ids;
  float *scores;
} kvdex_hits;

typedef struct kvdex_search_out {
  uint32_t n_q_heads;
  kvdex_hits *heads;      /* n_q_heads entries */
  uint64_t keys_scanned;
  uint64_t tokens;
} kvdex_search_out;
void kvdex_search_out_free(kvdex_search_out *out); /* frees the arrays, not the struct */

/* Batched decode search: for each of n_seqs sequences, queries q[i] (f32,
 * [n_q_heads][head_dim]) on `layer`; out[i] receives the result for seq_ids[i]. If
 * any sequence fails the whole call fails and no out[] needs freeing. */
int kvdex_search(kvdex_db *db, uint32_t layer, const kvdex_search_req *req, size_t n_seqs,
                 const char *const *seq_ids, const float *const *q, kvdex_search_out *out /* OUT */);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_KVDEX_H */
