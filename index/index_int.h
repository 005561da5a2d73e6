/* index internals: the kernel table behind kvdex_score_keys, the exact scan and
 * attention (attend.c), one table per SIMD level, each level compiled in its own
 * translation unit with its own target flags (see index/BUILD). Private to index/:
 * nothing here is public API, and nothing here checks arguments (simd.c, exact.c and
 * attend.c do, before calling).
 */
#ifndef KVDEX_INDEX_INT_H
#define KVDEX_INDEX_INT_H

#include <stddef.h>
#include <stdint.h>

#include "kvstore/base.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A (key, query) pair that passed a scan kernel's threshold. */
typedef struct kvdex__cand {
  uint32_t i;  /* key index within the call */
  uint32_t j;  /* query index */
  float score;
} kvdex__cand;

/* One table per SIMD level: the scan's kernels and the attention kernels of
 * attend.c, chosen together by kvdex__kernels_get. None checks arguments.
 *
 * score and scan score n keys (row-major [n][d] of `dtype`) against g f32 queries
 * ([g][d], rows d apart), s(i, j) = sum_t q[j][t] * key[i][t] accumulated in f32.
 * The value of s(i, j) depends only on key i, query j and d: never on the key's
 * position in the call, on n or on g, so scanning a range in pieces gives the same
 * bits, and `score` and `scan` of one level agree bit for bit.
 * `next` (may be NULL) is where the caller reads next; kernels may prefetch it.
 * Both require n >= 1, d >= 1, g >= 1 and a known dtype. */
typedef struct kvdex__kernels {
  /* out[j*ldo + i] = s(i, j); ldo >= n. */
  void (*score)(int dtype, const void *keys, size_t n, size_t d, const float *q, size_t g,
                float *out, size_t ldo, const void *next);
  /* Writes to cand every pair with s(i, j) >= thr[j] (NaN never passes), for each
   * j in increasing i, and returns how many; cand has room for n * g. */
  size_t (*scan)(int dtype, const void *keys, size_t n, size_t d, const float *q, size_t g,
                 const float *thr, kvdex__cand *cand, const void *next);

  /* Attention (attend.c's online softmax); n >= 1, and d >= 1, g >= 1 for vacc. */
  /* max of s[0, n); -inf when all are -inf. */
  float (*max)(const float *s, size_t n);
  /* s[i] = e^(s[i] - m) in place; returns their sum. */
  float (*expsum)(float *s, size_t n, float m);
  /* out[i] += e^(s[i] - m). */
  void (*expadd)(const float *s, size_t n, float m, float *out);
  /* For j < g: acc[j][:] = alpha[j] * acc[j][:] + sum_{t<n} p[j*ldp + t] * row_t[:],
   * rows of d elements of dtype; acc is [g][d]. Per element the order is fixed (scale,
   * then tokens in order), whatever g, so a head's result does not depend on g. */
  void (*vacc)(int dtype, const void *const *rows, size_t n, size_t d, const float *p,
               size_t ldp, size_t g, const float *alpha, float *acc);
} kvdex__kernels;

extern const kvdex__kernels kvdex__kernels_scalar;
/* Only usable where the CPU has AVX2, FMA and F16C. */
extern const kvdex__kernels kvdex__kernels_avx2;
/* Only usable where the CPU has AVX-512 F/BW/VL/DQ, FMA and F16C. */
extern const kvdex__kernels kvdex__kernels_avx512;

/* The kernels of a level (KVDEX_SIMD_AUTO = the best this CPU has); NULL when the
 * CPU does not support `level` or `level` is not a kvdex_simd value. */
const kvdex__kernels *kvdex__kernels_get(int level);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_INDEX_INT_H */
