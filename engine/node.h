/* node: one kvdex node without a transport. A kvdex_node owns (or borrows) a
 * kvdex_store and a kvdex_pool, owns the indexer that builds retrieval indexes in the
 * background (engine/indexer.h) and a pool of per-call contexts, and offers every
 * operation of a node: sequences (create, delete, stat, list, publish), append
 * transactions, reads, index builds, search, attend and retain. The gRPC server
 * (workers/server*.c) translates protobuf into these calls; the embedded client
 * ("local:", client/local.c) calls them directly. It knows nothing of gRPC, of
 * namespaces' permissions or of wire sizes: the caller checks what it was sent.
 *
 * Errors: every int function returns 0 or a negative KVDEX_E* code with
 * kvdex_errmsg() set, and a failed call changes no stored state.
 * Ownership: a kvdex_seq from kvdex_node_open is a reference the caller releases
 * (kvdex_seq_release); arrays handed out say who frees them.
 * Threading: every function is thread-safe, except that a kvdex_node_txn and a
 * kvdex_node_ctx belong to one thread at a time. It never prints.
 */
#ifndef KVDEX_NODE_H
#define KVDEX_NODE_H

#include <stddef.h>
#include <stdint.h>

#include "engine/attend_op.h"
#include "engine/indexer.h"
#include "index/index.h"
#include "index/retain.h"
#include "kvstore/kvstore.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvdex_node kvdex_node;

typedef struct kvdex_node_opts {
  /* The store and pool. store NULL: the node makes and owns both, a store of
   * memory_cap bytes (0 = no cap) and a pool of `threads` threads (0 = CPUs). store
   * set: the node serves that store with `pool` (NULL = work on the calling thread);
   * it owns neither, and both must outlive it. */
  kvdex_store *store;
  kvdex_pool *pool;
  uint64_t memory_cap;
  unsigned threads;
  unsigned build_threads; /* index build threads (0 = 1); each build also uses the pool */
  unsigned keep_ctx;      /* idle per-call contexts kept for reuse (0 = 16): at least the
                             calls expected at once, so the steady state never allocates */
} kvdex_node_opts;

/* Makes a node (opts may be NULL: all defaults). KVDEX_ENOMEM, KVDEX_EINTERNAL. */
int kvdex_node_create(const kvdex_node_opts *opts, kvdex_node **out /* OUT */);

/* Stops the index builds (queued ones are cancelled, a running one is waited for up to
 * the end of its current kv head), frees the contexts and then what the node owns.
 * NULL is a no-op. No other call on the node may be in flight. */
void kvdex_node_destroy(kvdex_node *node);

/* The store's accounting (kvdex_store_stats_get). */
void kvdex_node_store_stats(kvdex_node *node, kvdex_store_stats *out /* OUT */);

/* ---- per-call contexts ------------------------------------------------------------ */

/* Working memory of search, attend and retain (an attend context, a search result, a
 * query buffer), grown to the largest call and reused. Take one per call (or per
 * batch), give it back after; a context is used by one thread at a time. */
typedef struct kvdex_node_ctx kvdex_node_ctx;

/* An idle context (warm: no allocation), or a new one. KVDEX_ENOMEM. */
int kvdex_node_ctx_take(kvdex_node *node, kvdex_node_ctx **out /* OUT */);
/* Keeps ctx for reuse (or frees it beyond keep_ctx idle ones). NULL is a no-op. */
void kvdex_node_ctx_give(kvdex_node *node, kvdex_node_ctx *ctx);
/* A buffer of n floats owned by ctx (e.g. to convert or align a query), valid until
 * the next call with ctx; NULL with KVDEX_ENOMEM set when it cannot grow. */
float *kvdex_node_ctx_floats(kvdex_node_ctx *ctx, size_t n);

/* ---- sequences -------------------------------------------------------------------- */

/* Creates ns/seq_id (ns NULL or "" = "default"); importing = 1 makes it hidden (a copy
 * being imported) until kvdex_node_publish. KVDEX_EINVAL (bad name or shape),
 * KVDEX_EEXIST, KVDEX_ENOMEM. */
int kvdex_node_create_seq(kvdex_node *node, const char *ns, const char *seq_id,
                          const kvdex_shape *shape, int importing);

/* Deletes ns/seq_id, hidden or not (its indexes and retained sets go with it).
 * bytes_freed (may be NULL) gets the bytes returned to the cap. KVDEX_ENOTFOUND. */
int kvdex_node_delete_seq(kvdex_node *node, const char *ns, const char *seq_id,
                          uint64_t *bytes_freed /* OUT */);

/* Opens ns/seq_id: *out is a reference the caller releases. A hidden (importing)
 * sequence is KVDEX_ENOTFOUND ("... is not here yet ...") unless hidden_ok: reads
 * must fail over to a complete copy on another node. KVDEX_EINVAL for a bad name. */
int kvdex_node_open(kvdex_node *node, const char *ns, const char *seq_id, int hidden_ok,
                    kvdex_seq **out /* OUT */);

/* Makes a hidden sequence visible (a no-op for a visible one). */
void kvdex_node_publish(kvdex_node *node, kvdex_seq *seq);

/* What kvdex_node_stat tells of a sequence. The arrays are malloc'd and owned by the
 * info (kvdex_node_info_free), so a caller may take one over and set it to NULL. */
typedef struct kvdex_node_info {
  kvdex_shape shape;
  uint64_t bytes;                  /* accounted: K, V, metadata, queries, indexes */
  int importing;                   /* hidden until published */
  uint64_t *layer_tokens;          /* shape.n_layers entries: committed tokens */
  uint64_t *layer_query_tokens;    /* shape.n_layers: tokens whose prefill queries are kept */
  uint64_t *layer_landmark_blocks; /* shape.n_layers: blocks with landmark keys */
  uint32_t n_indexes;
  kvdex_layer_index *indexes;       /* layers that have had a build, ascending (or NULL) */
} kvdex_node_info;

/* Fills *out (zeroed first). KVDEX_ENOMEM (nothing to free then). */
int kvdex_node_stat(kvdex_node *node, kvdex_seq *seq, kvdex_node_info *out /* OUT */);
/* Frees the arrays, not the struct, and zeroes it. NULL is a no-op. */
void kvdex_node_info_free(kvdex_node_info *info);

/* Calls fn for every sequence of namespace ns (NULL or "" = every namespace), hidden
 * ones included (kvdex_seq_importing tells), with a reference held during the call
 * (kvdex_store_list: no lock is held, fn may call the node). Order is unspecified. */
void kvdex_node_list(kvdex_node *node, const char *ns, kvdex_seq_visit_fn fn, void *ctx);

/* The ids of the sequences of ns (hidden ones included), sorted by strcmp: *ids is an
 * array of *n strings; free each and the array with free(). KVDEX_ENOMEM. */
int kvdex_node_list_ids(kvdex_node *node, const char *ns, char ***ids /* OUT */,
                        size_t *n /* OUT */);

/* ---- append and read -------------------------------------------------------------- */

/* An append transaction (kvstore's): all or nothing at commit. */
typedef struct kvdex_node_txn kvdex_node_txn;

/* Begins one on seq (it holds a reference of its own). KVDEX_EBUSY (another append
 * of the sequence is in progress), KVDEX_ENOTFOUND (deleted), KVDEX_ENOMEM. */
int kvdex_node_append_begin(kvdex_node *node, kvdex_seq *seq, kvdex_node_txn **out /* OUT */);

/* Stages K/V of tokens [token_start, token_start + n_tokens) of `layer` (sequence
 * dtype, [n_kv_heads][n_tokens][head_dim]), then their prefill queries q (NULL = none;
 * [n_q_heads][n_tokens][head_dim]) and the landmarks of the blocks that end in the
 * range (NULL = none; [n_kv_heads][n_blocks][head_dim]); sizes must match the shape
 * (the caller checked them). Errors as kvdex_txn_append / _append_q /
 * _append_landmarks; a failure poisons the transaction (later appends and the commit
 * return it). */
int kvdex_node_append(kvdex_node_txn *txn, uint32_t layer, uint64_t token_start,
                      uint32_t n_tokens, const void *k, const void *v, const void *q,
                      const void *landmarks);

/* Commits and frees txn whatever the result; res (may be NULL) gets the counts. */
int kvdex_node_append_commit(kvdex_node_txn *txn, kvdex_txn_result *res /* OUT */);
/* Discards what txn staged and frees it. NULL is a no-op. */
void kvdex_node_append_abort(kvdex_node_txn *txn);

/* K and V of n tokens of `layer` (ids below the committed length, any order) into
 * [n_kv_heads][n][head_dim] buffers. n = 0 reads nothing. KVDEX_EINVAL. */
int kvdex_node_read(kvdex_node *node, kvdex_seq *seq, uint32_t layer, const uint64_t *token_ids,
                    size_t n, void *k_out, void *v_out);

/* K and V rows of n search hits of one kv head (ids from kvdex_node_search) into k_out
 * and v_out, [n][head_dim] each in the sequence dtype. KVDEX_EINVAL (bad layer or kv
 * head), KVDEX_EINTERNAL (a hit beyond the committed tokens). */
int kvdex_node_read_hits(kvdex_node *node, kvdex_seq *seq, uint32_t layer, uint32_t kv_head,
                         const kvdex_hit *hits, uint32_t n, void *k_out, void *v_out);

/* Snapshot of the prefill queries `layer` keeps, all query heads, f32
 * [n_q_heads][*n][head_dim], and their *n token ids: both malloc'd (free()), NULL
 * when none. KVDEX_EINVAL, KVDEX_ENOMEM. */
int kvdex_node_read_queries(kvdex_node *node, kvdex_seq *seq, uint32_t layer,
                            float **q /* OUT */, uint64_t **ids /* OUT */, uint64_t *n /* OUT */);

/* Snapshot of the landmark keys of `layer`, all kv heads, f32
 * [n_kv_heads][*n_blocks][head_dim], malloc'd (free()), NULL when none. */
int kvdex_node_read_landmarks(kvdex_node *node, kvdex_seq *seq, uint32_t layer,
                              float **lm /* OUT */, uint64_t *n_blocks /* OUT */);

/* ---- retrieval -------------------------------------------------------------------- */

/* Queues an index build: kvdex_indexer_build (engine/indexer.h) on the node's indexer,
 * same layers (KVDEX_ALL_LAYERS = every layer with tokens), OUTs and errors. */
int kvdex_node_build_index(kvdex_node *node, kvdex_seq *seq, uint32_t layer, const char *spec,
                           uint32_t *layers /* OUT, room for n_layers, may be NULL */,
                           uint32_t *n_queued /* OUT, may be NULL */);

/* The state of a layer's latest build (kvdex_indexer_info_get). */
int kvdex_node_index_info(kvdex_node *node, kvdex_seq *seq, uint32_t layer,
                          kvdex_layer_index *out /* OUT */);

/* Checks a search/attend `index` argument before any sequence is looked at: NULL, "",
 * "exact", "auto", "retained" and known kinds pass; KVDEX_EINVAL otherwise. */
int kvdex_node_check_index(const char *index);

/* Top-k of one layer for all query heads (q f32 [n_q_heads][head_dim]). This is the
 * one place that decides how a search runs, by `index`:
 *   "retained"                       the layer's retained set (kvdex_retained_search);
 *   NULL, "", "exact", "auto", a kind the indexer (kvdex_indexer_search: exact scan, or
 *                                    a ready index plus an exact scan of the tail).
 * *res points into ctx, valid until ctx's next use; *used (may be NULL) gets "exact",
 * "retained" or the index kind (a static string). Errors as kvdex_indexer_search. */
int kvdex_node_search(kvdex_node *node, kvdex_node_ctx *ctx, kvdex_seq *seq, uint32_t layer,
                      const float *q, const kvdex_search_opts *opts, const char *index,
                      const kvdex_index_params *params,
                      const kvdex_search_result **res /* OUT */, const char **used /* OUT */);

/* Attend for one layer of one sequence: kvdex_attend_layer (engine/attend_op.h) on the
 * node's indexer and pool; stats->seconds is this item's wall time. */
int kvdex_node_attend(kvdex_node *node, kvdex_node_ctx *ctx, kvdex_seq *seq, uint32_t layer,
                      const float *q, const kvdex_attend_req *req,
                      float *o /* OUT [n_q_heads][head_dim] */, float *lse /* OUT [n_q_heads] */,
                      kvdex_attend_stats *stats /* OUT, may be NULL */);

/* Retain for one layer: kvdex_retain_layer (engine/attend_op.h) on the node's pool. */
int kvdex_node_retain(kvdex_node *node, kvdex_node_ctx *ctx, kvdex_seq *seq, uint32_t layer,
                      const float *q_obs, uint32_t n_obs, const kvdex_retain_opts *opts,
                      int materialize, uint64_t *ids /* OUT [n_kv_heads][budget] */,
                      float *scores /* OUT, may be NULL */);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_NODE_H */
