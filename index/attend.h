/* attend: attention on the CPU over the keys and values kvstore holds, for one layer
 * of one sequence and one decode step: sparse attention over chosen token ids per
 * query head, dense attention over a token range (the exact reference), the
 * attention mass each key receives from a set of queries (what SnapKV-style
 * selection ranks, see index/retain.h), and the merge of partial results by their
 * log-sum-exp. Everything is computed in f32 from f32/f16/bf16 storage, with an
 * online (running-max) softmax, SIMD kernels chosen at run time and tasks on a
 * kvdex_pool. It does not select tokens, touch the GPU or allocate on its hot path.
 */
#ifndef KVDEX_ATTEND_H
#define KVDEX_ATTEND_H

#include <stddef.h>
#include <stdint.h>

#include "index/index.h"
#include "kvstore/kvstore.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Scratch ----------------------------------------------------------------- */

/* Working memory for the calls below (per-worker buffers, partial results, the
 * views, deduplicated id lists). It grows on demand to the largest call seen and is
 * reused, so once warm a call of the same shape does not allocate. One scratch
 * serves one call at a time: give each calling thread its own. */
typedef struct kvdex_attend_scratch kvdex_attend_scratch;

/* An empty scratch. KVDEX_EINVAL for NULL out, KVDEX_ENOMEM. */
int kvdex_attend_scratch_create(kvdex_attend_scratch **out /* OUT */);
/* Frees it. NULL is a no-op. No call may be using it. */
void kvdex_attend_scratch_destroy(kvdex_attend_scratch *scratch);
/* Bytes it holds now (0 for NULL): for memory accounting and to check reuse. */
size_t kvdex_attend_scratch_bytes(const kvdex_attend_scratch *scratch);

/* ---- Options ------------------------------------------------------------------- */

typedef struct kvdex_attend_opts {
  float scale;     /* logits are scale * q.k; 0 = 1/sqrt(head_dim); must be finite, >= 0 */
  kvdex_simd simd; /* KVDEX_SIMD_AUTO normally; tests force a level */
} kvdex_attend_opts;

/* ---- Attention ------------------------------------------------------------------- */

/* Common contract of kvdex_attend_ids and kvdex_attend_dense.
 *
 * q: f32 [n_q_heads][head_dim], one decode query per query head. Query head h reads
 * kv head h / (n_q_heads / n_kv_heads), as in kvdex_exact_search. For each query head
 * and its token set T the result is, in f32,
 *   o[h]   = sum_{t in T} softmax_t(scale * q_h . k_t) * v_t      (head_dim floats)
 *   lse[h] = log sum_{t in T} exp(scale * q_h . k_t)                 (natural log)
 * An empty T gives o[h] = 0 and lse[h] = -INFINITY, which kvdex_merge_partials treats
 * as "no tokens". Partial results over disjoint token sets combine exactly with
 * kvdex_merge_partials, so the caller can add tokens held elsewhere (e.g. on the GPU).
 * The committed length n is taken once, when the call starts (appends committed
 * later are not seen). Non-finite keys or values make the affected heads' outputs
 * non-finite (unspecified which); they are not detected.
 *
 * Determinism: the result depends only on the sequence, the arguments and the SIMD
 * level, never on the pool or its size. Tokens are processed in ascending id order,
 * so kvdex_attend_ids over every id of [sinks, n - window) in any order gives the
 * same bits as kvdex_attend_dense over that range.
 *
 * Thread-safety: many calls may share a pool and a sequence, also during appends;
 * each needs its own scratch. pool may be NULL (everything on the calling thread).
 * opts may be NULL (scale 0, KVDEX_SIMD_AUTO).
 * Errors (nothing written to o or lse): KVDEX_EINVAL (NULL argument, layer out of
 * range, non-finite query, bad scale, unknown opts->simd, an id >= n),
 * KVDEX_EUNIMPL (opts->simd not supported by this CPU), KVDEX_ENOMEM (scratch). */

/* Sparse attention: query head h attends to the tokens ids[h][0 .. n_ids[h]) of
 * `layer` (any committed token, sinks and window included). ids[h] may be NULL when
 * n_ids[h] is 0. A token listed more than once for a head counts once. Lists in
 * strictly ascending order (what a search returns once sorted by id) are used in
 * place; any other list is sorted and deduplicated in the scratch (costs a pass over
 * a bitmap of n bits per worker).
 * o: OUT [n_q_heads][head_dim]; lse: OUT [n_q_heads]. */
int kvdex_attend_ids(kvdex_seq *seq, uint32_t layer, const float *q,
                     const uint64_t *const *ids, const uint32_t *n_ids,
                     const kvdex_attend_opts *opts, kvdex_pool *pool,
                     kvdex_attend_scratch *scratch, float *o /* OUT */, float *lse /* OUT */);

/* Dense attention of every query head over the eligible tokens [sinks, n - window)
 * of the n committed tokens of `layer` (empty when sinks >= n - window). The exact
 * reference the sparse path is measured against; each kv head's keys and values are
 * read once for all the query heads of its group.
 * o: OUT [n_q_heads][head_dim]; lse: OUT [n_q_heads]. */
int kvdex_attend_dense(kvdex_seq *seq, uint32_t layer, const float *q, uint64_t sinks,
                       uint64_t window, const kvdex_attend_opts *opts, kvdex_pool *pool,
                       kvdex_attend_scratch *scratch, float *o /* OUT */, float *lse /* OUT */);

/* ---- Attention mass ------------------------------------------------------------------ */

/* The most observation queries kvdex_attend_mass takes in one call is KVDEX_MAX_OBS
 * (kvdex_base.h). */

/* The attention each key of [first, first + count) receives from n_obs observation
 * queries, summed over the observations and the query heads of its kv head:
 *   mass[g][t - first] = sum_{o < n_obs} sum_{h in group g} softmax_t(scale * q[o][h] . k_t)
 * where each softmax runs over the tokens of [first, first + count) only (so every
 * (o, h) contributes a total of 1 to its kv head). q: f32 [n_obs][n_q_heads][head_dim].
 * mass: OUT [n_kv_heads][count]. The keys are read twice (the normalisers, then the
 * probabilities); nothing of size count is kept besides mass. count == 0 is a no-op.
 * Same determinism, threading and opts rules as attention above.
 * Errors (nothing written): KVDEX_EINVAL (NULL argument, layer out of range, n_obs 0
 * or > KVDEX_MAX_OBS, non-finite query, bad scale, unknown simd, the range
 * reaching past the committed tokens), KVDEX_EUNIMPL, KVDEX_ENOMEM. */
int kvdex_attend_mass(kvdex_seq *seq, uint32_t layer, const float *q, uint32_t n_obs,
                      uint64_t first, uint64_t count, const kvdex_attend_opts *opts,
                      kvdex_pool *pool, kvdex_attend_scratch *scratch,
                      float *mass /* OUT */);

/* ---- Merging partial results ------------------------------------------------------------ */

/* The pairwise merge is kvdex_merge_partials (<kvdex/kvdex_base.h>, kvstore/base.c):
 * one definition for the engine, the benches and the public API. */

/* The n-way merge: o is [n][d] (row i the result over token set i, sets disjoint),
 * lse is [n]; the same formula with M the largest lse. n == 0 gives o_out = 0 and
 * lse_out = -INFINITY. o_out may be o itself (row 0); it must not overlap the other
 * rows. The merge of the parts equals the merge done pairwise up to f32 rounding. */
void kvdex_attend_merge_n(const float *o, const float *lse, uint32_t n, uint32_t d,
                          float *o_out /* OUT */, float *lse_out /* OUT */);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_ATTEND_H */
