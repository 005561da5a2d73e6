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
 *   prefill queries (kvq):  sequence dtype, [n_q_heads][n_tokens][head_dim]
 *   landmarks (kvl):        sequence dtype, [n_kv_heads][n_blocks][head_dim]
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

/* The state of a layer's latest kvdex_build_index (values equal kvdex.v1.IndexState). */
typedef enum kvdex_index_state {
  KVDEX_INDEX_NONE = 0,     /* never built */
  KVDEX_INDEX_BUILDING = 1, /* queued or running: searches use the previous index or exact */
  KVDEX_INDEX_READY = 2,
  KVDEX_INDEX_FAILED = 3,   /* see error; an older ready index (if any) stays in use */
} kvdex_index_state;

/* The retrieval index of one layer (kvdex_build_index): one index per KV head. */
typedef struct kvdex_layer_index {
  uint32_t layer;
  int state;             /* kvdex_index_state of the latest build */
  char spec[512];        /* the latest build's spec, as requested */
  char error[512];       /* KVDEX_INDEX_FAILED: why, starting with a status name, e.g.
                            "RESOURCE_EXHAUSTED: publishing the index of layer 0 ..." */
  /* The ready index that searches use ("" / 0 when none; during a rebuild and after
   * a failed one, the previous index): */
  char kind[32];         /* "graph", "ivf", "hnsw", "landmark", "exact" */
  char describe[512];    /* normalised spec and build notes, e.g.
                            "graph:K=32,degree=32,ef=128 (key-only kNN: no prefill queries)" */
  double build_seconds;  /* wall time of its build */
  uint64_t memory_bytes; /* bytes it holds (all KV heads); counted in `bytes` of the
                            sequence and against the node's memory cap */
  uint64_t tokens;       /* tokens it covers (landmark:mode=given: the blocks that had
                            landmarks); the others are scanned exactly */
} kvdex_layer_index;

typedef struct kvdex_seq_info {
  kvdex_shape shape;
  uint64_t bytes;               /* K, V, metadata, prefill queries, indexes */
  uint32_t n_layers;
  uint64_t *layer_tokens;       /* n_layers entries, owned by the info; kvdex_seq_info_free */
  uint64_t *layer_query_tokens; /* n_layers entries: tokens whose prefill queries are kept */
  uint64_t *layer_landmark_blocks; /* n_layers entries: blocks [0, n) have landmark keys
                                      (kvdex_append_kvl) */
  uint32_t n_indexes;
  kvdex_layer_index *indexes;   /* layers that have had a kvdex_build_index, ascending */
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
/* kvdex_append_kv plus the prefill queries of the same tokens, for attention-aware
 * indexes (kvdex_build_index "graph"): q is in the sequence dtype, layout
 * [n_q_heads][n_tokens][head_dim] (all query heads); NULL = none (then it is
 * kvdex_append_kv). Stored with the stream's commit. A layer keeps the queries of at
 * most 4096 tokens, evenly spread: token t is kept iff t is a multiple of the layer's
 * stride, a power of two that doubles whenever more would be kept (so the sample does
 * not depend on how tokens were split into appends). Kept queries count against the
 * memory cap; re-sent queries of a token must be identical (else KVDEX_ECONFLICT).
 * kvdex_build_index gives each KV head's index the queries of its GQA group. */
int kvdex_append_kvq(kvdex_appender *ap, uint32_t layer, uint64_t token_start, uint32_t n_tokens,
                     const void *k, const void *v, const void *q);
/* kvdex_append_kvq plus caller-given landmark keys (Landmark Attention: one key per
 * block of tokens), for kvdex_build_index "landmark:mode=given". A block is the
 * sequence's block_tokens tokens (B; block b = tokens [b*B, (b+1)*B)), and its
 * landmark is passed with the call whose range holds the block's last token: this call
 * takes the blocks b with token_start < (b+1)*B <= token_start + n_tokens, so
 * n_blocks = floor((token_start + n_tokens) / B) - floor(token_start / B), possibly 0
 * (then landmarks is not read). landmarks: sequence dtype, layout
 * [n_kv_heads][n_blocks][head_dim], finite values (else KVDEX_EINVAL); NULL = none.
 * q may be NULL (no prefill queries). Stored with the stream's commit and counted
 * against the memory cap (KVDEX_ENOMEM). A layer's landmarks are contiguous from
 * block 0 (kvdex_seq_info.layer_landmark_blocks says how many it has): re-sent
 * landmarks of a block that has one must be identical, and landmarks for blocks after
 * one that has none (appended without landmarks) are refused; both KVDEX_ECONFLICT.
 * To add the missing ones, re-send those tokens (an identical K/V replay, a no-op for
 * K/V) with their landmarks. */
int kvdex_append_kvl(kvdex_appender *ap, uint32_t layer, uint64_t token_start, uint32_t n_tokens,
                     const void *k, const void *v, const void *q, const void *landmarks);
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
  /* How to search (NULL = exact):
   *   NULL, "" or "exact"  exact scan of every eligible token;
   *   "auto"               the layer's ready index (kvdex_build_index) if any, else exact;
   *   a kind               "graph", "ivf", "hnsw", "landmark": the layer's ready index,
   *                        which must be of that kind: KVDEX_ECONFLICT when none is
   *                        ready (or it is of another kind), KVDEX_EINVAL for an
   *                        unknown kind.
   * With an index, each query head searches its KV head's index for k + sinks +
   * window candidates, drops the ineligible ones and merges them with an exact scan
   * of the eligible tokens appended after the build, so new tokens are never missed;
   * the hits are the best k of those (fewer only when the index returns fewer). */
  const char *index;
  uint32_t ef;      /* graph, hnsw: beam width override (0 = the spec's) */
  uint32_t nprobe;  /* ivf: lists probed override (0 = the spec's) */
  uint32_t blocks;  /* landmark: blocks selected override (0 = the spec's) */
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
  uint64_t keys_scanned;  /* keys scored: exact, summed over KV heads; with an index,
                             the index's distance computations summed over query
                             heads, plus the tail keys scanned (once per KV head) */
  uint64_t tokens;        /* committed tokens of the layer when the search ran */
  char index[32];         /* what served it: "exact" or the index kind */
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

/* ---- retrieval indexes ------------------------------------------------------------ */

/* `layer` of kvdex_build_index meaning every layer that has tokens. */
#define KVDEX_ALL_LAYERS UINT32_MAX

/* Starts building a retrieval index for `layer` of a sequence (or, with
 * KVDEX_ALL_LAYERS, for every layer that has tokens) and returns at once; the build
 * runs in the background (over gRPC on the server's build threads, "local:" on a
 * build thread of the handle), one index per KV head, from the tokens committed when
 * it starts and the layer's prefill queries (kvdex_append_kvq).
 * spec: "kind:name=value,...", e.g. "graph:degree=32", "ivf:nlist=256", "hnsw:M=32",
 * "landmark:mode=minmax", "landmark:mode=given". mode=given is built from the layer's
 * caller-given landmarks (kvdex_append_kvl) and covers the complete blocks that have
 * one when it starts, tokens [0, layer_landmark_blocks * block_tokens); searches scan
 * the later tokens exactly (kvdex_layer_index.tokens says what it covers). Its spec's
 * block, if set, must equal the sequence's block_tokens (else the build FAILS with
 * "INVALID_ARGUMENT: ..."); a layer to build without landmarks is KVDEX_ECONFLICT.
 * kvdex_stat shows the layer KVDEX_INDEX_BUILDING, then READY (searches with index
 * "auto" or its kind use it from then on; a rebuild replaces the old index
 * atomically) or FAILED with a message (nothing else changes then, e.g. when the
 * finished index would pass the node's memory cap). The index counts against the
 * memory cap and is freed with its sequence. Errors (nothing queued): KVDEX_EINVAL
 * (bad spec, with the parser's message; layer out of range), KVDEX_ENOTFOUND,
 * KVDEX_ECONFLICT (the layer has no tokens; with KVDEX_ALL_LAYERS none has),
 * KVDEX_EBUSY (a build of one of these layers is queued or running). */
int kvdex_build_index(kvdex_db *db, const char *seq_id, uint32_t layer, const char *spec);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_KVDEX_H */
