/* retain: which stored tokens of a layer to keep for a kv head, judged by the
 * attention a window of observation queries pays them (SnapKV / InfiniRetri):
 * attention mass per key (kvdex_attend_mass), pooled over neighbouring tokens so
 * that whole phrases survive, then the top `budget` per kv head. It selects only: it
 * neither evicts anything from kvstore nor attends.
 */
#ifndef KVDEX_RETAIN_H
#define KVDEX_RETAIN_H

#include <stddef.h>
#include <stdint.h>

#include "index/attend.h"
#include "index/index.h"
#include "kvstore/kvstore.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Pooling is kvdex_pooling of <kvdex/kvdex_base.h>: KVDEX_POOLING_MAX (the max of the
 * mass in the window) or KVDEX_POOLING_AVG (the mean, clipped at the ends: divided by
 * the number of tokens in the window, not by its nominal width). */

/* Widest pooling window kvdex_retain_select takes (pooling costs tokens x width). */
#define KVDEX_RETAIN_MAX_POOL_WINDOW 255

typedef struct kvdex_retain_opts {
  uint64_t sinks;       /* tokens [0, sinks) are not candidates */
  uint64_t window;      /* nor are the last `window` committed tokens */
  uint32_t budget;      /* tokens kept per kv head: 1 .. eligible tokens */
  uint32_t pool_window; /* odd width w of the centred pooling window, 1 .. 255; 1 = none */
  int pooling;          /* kvdex_pooling */
  float scale;          /* logits are scale * q.k; 0 = 1/sqrt(head_dim) */
  kvdex_simd simd;      /* KVDEX_SIMD_AUTO normally */
} kvdex_retain_opts;

/* Selects, for every kv head g, the `budget` eligible tokens with the highest pooled
 * attention mass.
 *
 * q_obs: f32 [n_obs][n_q_heads][head_dim], the observation queries (e.g. the last
 * prompt tokens' queries) of `layer`. Eligible tokens: E = [sinks, n - window) of
 * the n committed tokens when the call starts. For t in E:
 *   mass(t, g)   = sum_{o < n_obs} sum_{h in group g} softmax_{t in E}(scale * q[o][h] . k_t)
 *   pooled(t, g) = max or mean of mass(u, g) over u in [t - w/2, t + w/2] clipped to E.
 * Ranking: higher pooled score first, equal scores by lower id (kvdex_hit_better);
 * a NaN score (non-finite keys) ranks as -inf and is reported as -inf.
 * Output per kv head g: ids[g * budget + i], i < budget, the chosen ids in ascending
 * id order (not rank order), and scores[g * budget + i] (may be NULL) their pooled
 * scores, f32.
 *
 * Cost: the keys of E are read twice (see kvdex_attend_mass); allocates n_kv x |E|
 * floats for the mass and a selection buffer per kv head for the call (this runs once
 * per prefill, not per decode step). The result does not depend on the pool.
 * Thread-safety as kvdex_attend_mass: pool and sequence may be shared, the scratch
 * may not. pool may be NULL.
 * Errors (nothing written): KVDEX_EINVAL (NULL argument, layer out of range, n_obs 0
 * or > KVDEX_MAX_OBS, non-finite query, budget 0 or more than |E|, pool_window
 * even or out of range, unknown pooling, bad scale or simd), KVDEX_EUNIMPL (simd not
 * supported by this CPU), KVDEX_ENOMEM. */
int kvdex_retain_select(kvdex_seq *seq, uint32_t layer, const float *q_obs, uint32_t n_obs,
                        const kvdex_retain_opts *opts, kvdex_pool *pool,
                        kvdex_attend_scratch *scratch, uint64_t *ids /* OUT */,
                        float *scores /* OUT, may be NULL */);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_RETAIN_H */
