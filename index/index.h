/* index: the exact inner-product top-k over the keys kvstore holds (the ground truth
 * every index kind of ann.h is measured against) and the thread pool the rest of
 * index/ and the engine run on. The scan is GQA-aware (each key is read once for all
 * query heads of its group), converts f16/bf16 on the fly, takes its SIMD kernels from
 * the run-time dispatch table (AVX-512, AVX2+F16C, scalar) and runs in parallel over
 * (kv head, block range) on the pool.
 * It does not allocate on error paths and never prints.
 */
#ifndef KVDEX_INDEX_H
#define KVDEX_INDEX_H

#include <stddef.h>
#include <stdint.h>

#include "index/topk.h"
#include "kvstore/kvstore.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Thread pool ----------------------------------------------------------- */

typedef struct kvdex_pool kvdex_pool;

/* A fixed pool of n_threads worker threads (0 = number of online CPUs), started
 * here and never resized; they block all signals. At most 4096. KVDEX_ENOMEM if a
 * thread cannot be started (none is left running then). */
int kvdex_pool_create(unsigned n_threads, kvdex_pool **out /* OUT */);
/* Stops and joins the workers. NULL is a no-op. No kvdex_pool_run may be in flight. */
void kvdex_pool_destroy(kvdex_pool *pool);
/* Number of worker threads; 0 for NULL. */
unsigned kvdex_pool_size(const kvdex_pool *pool);

/* Runs fn(ctx, i, worker) for i in [0, n_tasks) on the pool and the calling thread,
 * each i exactly once, and returns when all are done. `worker` is in
 * [0, kvdex_pool_size(pool)] (the caller is kvdex_pool_size(pool), worker thread w is
 * w) and no two tasks of one batch run at the same time with the same `worker`, so
 * callers can index per-worker scratch with it. Thread-safe: batches from concurrent
 * callers share the workers (each caller also works on its own batch, so none waits
 * for another's). Called from inside a task running on one of the pool's own
 * threads, the nested batch runs inline on that thread. pool may be NULL, or the
 * batch a single task: everything runs on the calling thread with worker 0. */
typedef void (*kvdex_task_fn)(void *ctx, size_t i, unsigned worker);
void kvdex_pool_run(kvdex_pool *pool, size_t n_tasks, kvdex_task_fn fn, void *ctx);

/* ---- SIMD kernels ------------------------------------------------------------ */

typedef enum kvdex_simd {
  KVDEX_SIMD_AUTO = 0,   /* best the CPU supports */
  KVDEX_SIMD_SCALAR = 1,
  KVDEX_SIMD_AVX2 = 2,   /* AVX2 + FMA + F16C */
  KVDEX_SIMD_AVX512 = 3, /* AVX-512 F/BW/VL */
} kvdex_simd;

/* The best level this CPU supports. */
kvdex_simd kvdex_simd_detect(void);
const char *kvdex_simd_name(kvdex_simd level);

/* Scores n keys (row-major [n][d], dtype) against g queries (f32, [g][d]):
 * out[j*n + i] = sum_t q[j][t] * key[i][t], accumulated in f32 (the summation order,
 * hence the last bits, differ between levels; within a level a key's score does not
 * depend on n, g or its position). Each key is read once for all g queries.
 * Thread-safe. KVDEX_EINVAL for an unknown dtype or level or a NULL buffer (with
 * n, g > 0); KVDEX_EUNIMPL when `level` is not supported by this CPU. */
int kvdex_score_keys(kvdex_simd level, int dtype, const void *keys, size_t n, size_t d,
                     const float *q, size_t g, float *out);

/* ---- Top-k ------------------------------------------------------------------- */

/* kvdex_hit, kvdex_hit_better (the order of every result) and kvdex_search_result
 * live in index/topk.h, included above. */

/* ---- Exact search -------------------------------------------------------------- */

typedef struct kvdex_search_opts {
  uint32_t k;        /* 1..KVDEX_MAX_K */
  uint32_t sinks;    /* exclude tokens [0, sinks) */
  uint32_t window;   /* exclude the last `window` tokens */
  kvdex_simd simd;   /* KVDEX_SIMD_AUTO normally; tests force a level */
} kvdex_search_opts;

/* KVDEX_MAX_K (the largest k) is in kvdex_base.h: the API, the wire and the index
 * share it. */

/* Exact top-k for all query heads of one layer of one sequence.
 * q: f32 [n_q_heads][head_dim]. Query head h maps to kv head h / (n_q_heads/n_kv_heads);
 * the query heads of one kv head are scored together in one pass over its keys.
 * Eligible tokens: [sinks, n - window) of the n committed tokens when the call takes
 * its view (appends committed later are not seen); res->tokens = n. k larger than
 * the eligible count returns them all. Scores are f32 sums; a key scoring NaN is
 * never a hit. The hits (ids and scores) do not depend on the pool or its size.
 * Thread-safe: many searches may share a pool and a sequence, also during appends.
 * Errors: KVDEX_EINVAL (NULL argument, k == 0 or > KVDEX_MAX_K, layer out of range,
 * non-finite query, unknown opts->simd), KVDEX_EUNIMPL (opts->simd not supported by
 * this CPU), KVDEX_ENOMEM (result storage or scratch). pool may be NULL (one thread). */
int kvdex_exact_search(kvdex_seq *seq, uint32_t layer, const float *q,
                       const kvdex_search_opts *opts, kvdex_pool *pool,
                       kvdex_search_result *res /* OUT */);

/* Naive scalar reference: the same contract (opts->simd ignored), one thread, no
 * blocking tricks, f64 accumulation rounded to f32, a full sort. Allocates the scores
 * of all eligible tokens. Used by tests and the demo's correctness check. */
int kvdex_exact_search_ref(kvdex_seq *seq, uint32_t layer, const float *q,
                           const kvdex_search_opts *opts, kvdex_search_result *res /* OUT */);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_INDEX_H */
