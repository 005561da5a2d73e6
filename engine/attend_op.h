/* attend_op: the Attend and Retain operations of one layer of one sequence, as the
 * node engine (engine/node.h) runs them for the server and the embedded client:
 * retrieval (the indexer's search, or the retained set) then sparse attention on the
 * CPU (index/attend.h), and SnapKV/InfiniRetri selection (index/retain.h) with an
 * optional retained set kept with the sequence.
 *
 * The retained set of a layer is a kvstore attachment (slot KVDEX_RETAINED_SLOT):
 * per kv head the ascending ids Retain chose, counted against the memory cap and
 * freed with the sequence. index = "retained" in Search/Attend scores exactly those
 * ids (minus the excluded sinks/window) and keeps the best k.
 *
 * Thread-safety: every function is thread-safe given its own kvdex_attend_ctx.
 * Nothing here prints or allocates on the steady-state path of kvdex_attend_layer
 * (the context grows to the largest call and is reused).
 */
#ifndef KVDEX_ATTEND_OP_H
#define KVDEX_ATTEND_OP_H

#include <stdint.h>

#include "index/attend.h"
#include "index/index.h"
#include "index/retain.h"
#include "kvstore/kvstore.h"
#include "engine/indexer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The attachment slot of the retained set (the indexer takes 0 and 1). */
#define KVDEX_RETAINED_SLOT 2
/* The most extra tokens one Attend may name is KVDEX_MAX_EXTRA_TOKENS (kvdex_base.h). */

/* Per-caller working memory (search result, id lists, rows, the attention scratch). */
typedef struct kvdex_attend_ctx kvdex_attend_ctx;
int kvdex_attend_ctx_create(kvdex_attend_ctx **out /* OUT */);
void kvdex_attend_ctx_destroy(kvdex_attend_ctx *ctx); /* NULL is a no-op */

typedef struct kvdex_attend_req {
  uint32_t k;       /* top-k tokens retrieved per query head, 1..KVDEX_MAX_K (ignored if dense) */
  uint32_t sinks;   /* tokens [0, sinks) are not retrieved (the caller attends them) */
  uint32_t window;  /* nor are the last `window` tokens */
  const char *index; /* NULL/""/"exact", "auto", a kind (indexer.h), or "retained" */
  const kvdex_index_params *params; /* may be NULL */
  float scale;      /* logits = scale * q.k; 0 = 1/sqrt(head_dim) */
  int dense;        /* 1: attend every token of [sinks, n - window) (the exact reference) */
  const uint64_t *extra; /* tokens every query head also attends (e.g. landmark blocks'), */
  uint32_t n_extra;      /* each < n and outside sinks/window; duplicates count once */
  const uint8_t *streaming; /* per query head, may be NULL: 1 = a streaming head
                               (DuoAttention): nothing retrieved, o = 0, lse = -inf */
} kvdex_attend_req;

typedef struct kvdex_attend_stats {
  uint64_t keys_touched; /* keys scored by retrieval, summed over query heads */
  uint64_t tokens;       /* committed tokens of the layer at the call */
  uint64_t attended;     /* tokens attended, summed over query heads */
  const char *used;      /* "exact", "dense", "retained" or the index kind (static) */
  double seconds;        /* wall time of the call: retrieval + attention */
} kvdex_attend_stats;

/* One layer of one sequence: for every query head h (q f32 [n_q_heads][head_dim]) the
 * tokens retrieved for it (top-k of `index`, as kvdex_indexer_search, or of the
 * retained set) plus `extra`, then
 *   o[h] = softmax(scale q_h.K^T) V over them (head_dim f32), lse[h] = log-sum-exp.
 * The caller merges o/lse with its own part (sinks + window) by kvdex_merge_partials.
 * Errors (nothing written): KVDEX_EINVAL (k 0 or > KVDEX_MAX_K without dense, layer
 * out of range, non-finite query, bad scale, unknown index, an extra token >= n or
 * inside sinks/window, too many extras), KVDEX_ECONFLICT (index names a kind that is
 * not ready, or "retained" with no retained set), KVDEX_ENOMEM. */
int kvdex_attend_layer(kvdex_indexer *ixr, kvdex_seq *seq, uint32_t layer, const float *q,
                       const kvdex_attend_req *req, kvdex_pool *pool, kvdex_attend_ctx *ctx,
                       float *o /* OUT [n_q_heads][head_dim] */,
                       float *lse /* OUT [n_q_heads] */, kvdex_attend_stats *stats /* OUT */);

/* Search over the retained set: like kvdex_exact_search restricted to the retained
 * ids of each query head's kv head (minus sinks/window). ctx (may be NULL: one is
 * made for the call) lends its row buffers. KVDEX_ECONFLICT when the layer has no
 * retained set. */
int kvdex_retained_search(kvdex_seq *seq, uint32_t layer, const float *q,
                          const kvdex_search_opts *opts, kvdex_attend_ctx *ctx,
                          kvdex_search_result *res /* OUT */);

/* Retain: kvdex_retain_select (index/retain.h) for one layer with q_obs f32
 * [n_obs][n_q_heads][head_dim]; ids OUT [n_kv_heads][budget] ascending per kv head,
 * scores OUT (may be NULL) alike. With materialize, the selection also becomes the
 * layer's retained set (replacing an older one; its bytes count against the cap:
 * KVDEX_ENOMEM leaves the old set). Errors as kvdex_retain_select. */
int kvdex_retain_layer(kvdex_seq *seq, uint32_t layer, const float *q_obs, uint32_t n_obs,
                       const kvdex_retain_opts *opts, int materialize, kvdex_pool *pool,
                       kvdex_attend_ctx *ctx, uint64_t *ids /* OUT */, float *scores /* OUT */);

/* Retained tokens per kv head of a layer (0 when none). */
uint32_t kvdex_retained_budget(kvdex_seq *seq, uint32_t layer);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_ATTEND_OP_H */
