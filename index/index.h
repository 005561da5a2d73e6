/* index: retrieval over the keys kvstore holds. This version has the exact
 * inner-product top-k (the ground truth every later index is measured against):
 * GQA-aware (each key is read once for all query heads of its group), f16/bf16
 * converted on the fly, SIMD kernels chosen at run time (AVX-512, AVX2+F16C,
 * scalar), parallel over (kv head, block range) on a fixed thread pool.
 * It does not allocate on error paths and never prints.
 */
#ifndef KVDEX_INDEX_H
#define KVDEX_INDEX_H

#include <stddef.h>
#include <stdint.h>

#include "kvstore/kvstore.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Thread pool ----------------------------------------------------------- */

typedef struct kvdex_pool kvdex_pool;

/* A fixed pool of n_threads workers (0 = number of online CPUs). */
int kvdex_pool_create(unsigned n_threads, kvdex_pool **out /* OUT */);
void kvdex_pool_destroy(kvdex_pool *pool); /* NULL is a no-op */
unsigned kvdex_pool_size(const kvdex_pool *pool);

/* Runs fn(ctx, i, worker) for i in [0, n_tasks) on the pool and the calling thread,
 * returns when all are done. `worker` is in [0, kvdex_pool_size(pool)] and is
 * unique among concurrently running calls of this batch, so callers can index
 * per-worker scratch with it. Safe to call from many threads at once (batches queue).
 * pool may be NULL: everything runs on the calling thread with worker 0. */
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
 * out[j*n + i] = sum_t q[j][t] * key[i][t], accumulated in f32.
 * Returns KVDEX_EUNIMPL when `level` is not supported by this CPU. */
int kvdex_score_keys(kvdex_simd level, int dtype, const void *keys, size_t n, size_t d,
                     const float *q, size_t g, float *out);

/* ---- Top-k ------------------------------------------------------------------- */

typedef struct kvdex_hit {
  uint64_t id;
  float score;
} kvdex_hit;

/* Order used everywhere: higher score first, equal scores by lower id first. */
static inline int kvdex_hit_better(kvdex_hit a, kvdex_hit b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

/* ---- Exact search -------------------------------------------------------------- */

typedef struct kvdex_search_opts {
  uint32_t k;        /* 1..KVDEX_MAX_K */
  uint32_t sinks;    /* exclude tokens [0, sinks) */
  uint32_t window;   /* exclude the last `window` tokens */
  kvdex_simd simd;   /* KVDEX_SIMD_AUTO normally; tests force a level */
} kvdex_search_opts;

#define KVDEX_MAX_K 65536

/* Per query head: n_hits hits (<= k) in kvdex_hit_better order. */
typedef struct kvdex_head_result {
  uint32_t n_hits;
  kvdex_hit *hits; /* points into the kvdex_search_result's storage */
} kvdex_head_result;

typedef struct kvdex_search_result {
  uint32_t n_q_heads;
  kvdex_head_result *heads;
  uint64_t keys_scanned;  /* keys scored, summed over kv heads */
  uint64_t tokens;        /* committed tokens of the layer at search time */
  /* internal storage, owned */
  kvdex_hit *storage_;
  size_t storage_cap_;
  size_t heads_cap_;
} kvdex_search_result;

/* Zero-initialise with {0}; reused across searches (grows, never shrinks). */
void kvdex_search_result_free(kvdex_search_result *res);

/* Exact top-k for all query heads of one layer of one sequence.
 * q: f32 [n_q_heads][head_dim]. Query head h maps to kv head h / (n_q_heads/n_kv_heads).
 * Eligible tokens: [sinks, n - window) of the committed tokens at call time.
 * Errors: KVDEX_EINVAL (k == 0 or > KVDEX_MAX_K, layer out of range, non-finite query),
 * KVDEX_ENOMEM (result storage). pool may be NULL (single-threaded). */
int kvdex_exact_search(kvdex_seq *seq, uint32_t layer, const float *q,
                       const kvdex_search_opts *opts, kvdex_pool *pool,
                       kvdex_search_result *res /* OUT */);

/* Naive scalar reference: the same contract, one thread, no blocking tricks, f64
 * accumulation. Used by tests and the demo's correctness check. */
int kvdex_exact_search_ref(kvdex_seq *seq, uint32_t layer, const float *q,
                           const kvdex_search_opts *opts, kvdex_search_result *res /* OUT */);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_INDEX_H */
