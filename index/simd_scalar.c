/* simd_scalar: the portable kernels of index_int.h's table (no target flags), used
 * where the CPU has neither AVX2 nor AVX-512, and the twin the SIMD kernels are
 * tested against. Each key row is converted to f32 once, in slices, and reused for
 * all g queries; each score is a plain left-to-right f32 sum; exp is libm's expf.
 */
#include <math.h>

#include "index/index_int.h"

#define SLICE 64

static void convert(int dtype, const void *keys, size_t off, float *dst, size_t m) {
  switch (dtype) {
    case KVDEX_DTYPE_F32: memcpy(dst, (const float *)keys + off, m * sizeof(float)); break;
    case KVDEX_DTYPE_F16: {
      const uint16_t *h = (const uint16_t *)keys + off;
      for (size_t t = 0; t < m; t++) dst[t] = kvdex__f16_to_f32(h[t]);
      break;
    }
    default: { /* KVDEX_DTYPE_BF16 */
      const uint16_t *h = (const uint16_t *)keys + off;
      for (size_t t = 0; t < m; t++) dst[t] = kvdex__bf16_to_f32(h[t]);
      break;
    }
  }
}

/* Scores key i against all g queries into out[j * ldo]. */
static void score_key(int dtype, const void *keys, size_t i, size_t d, const float *q, size_t g,
                      float *out, size_t ldo) {
  float row[SLICE];
  for (size_t j = 0; j < g; j++) out[j * ldo] = 0.0f;
  for (size_t t0 = 0; t0 < d; t0 += SLICE) {
    size_t m = d - t0 < SLICE ? d - t0 : SLICE;
    convert(dtype, keys, i * d + t0, row, m);
    for (size_t j = 0; j < g; j++) {
      const float *qj = q + j * d + t0;
      float acc = out[j * ldo];
      for (size_t t = 0; t < m; t++) acc += qj[t] * row[t];
      out[j * ldo] = acc;
    }
  }
}

/* ---- scan ------------------------------------------------------------------------------ */

static void score(int dtype, const void *keys, size_t n, size_t d, const float *q, size_t g,
                  float *out, size_t ldo, const void *next) {
  (void)next;
  for (size_t i = 0; i < n; i++) score_key(dtype, keys, i, d, q, g, out + i, ldo);
}

static size_t scan(int dtype, const void *keys, size_t n, size_t d, const float *q, size_t g,
                   const float *thr, kvdex__cand *cand, const void *next) {
  (void)next;
  enum { GROUP = 64 };
  float s[GROUP];
  size_t c = 0;
  for (size_t j0 = 0; j0 < g; j0 += GROUP) { /* queries in groups, so s stays small */
    size_t gq = g - j0 < GROUP ? g - j0 : GROUP;
    for (size_t i = 0; i < n; i++) {
      score_key(dtype, keys, i, d, q + j0 * d, gq, s, 1);
      for (size_t j = 0; j < gq; j++)
        if (s[j] >= thr[j0 + j])
          cand[c++] = (kvdex__cand){.i = (uint32_t)i, .j = (uint32_t)(j0 + j), .score = s[j]};
    }
  }
  return c;
}

/* ---- attention ----------------------------------------------------------------------- */

static float attn_max(const float *s, size_t n) {
  float m = -INFINITY;
  for (size_t i = 0; i < n; i++)
    if (s[i] > m) m = s[i];
  return m;
}

static float attn_expsum(float *s, size_t n, float m) {
  float sum = 0.0f;
  for (size_t i = 0; i < n; i++) {
    float e = expf(s[i] - m);
    s[i] = e;
    sum += e;
  }
  return sum;
}

static void attn_expadd(const float *s, size_t n, float m, float *out) {
  for (size_t i = 0; i < n; i++) out[i] += expf(s[i] - m);
}

static void attn_vacc(int dtype, const void *const *rows, size_t n, size_t d, const float *p,
                      size_t ldp, size_t g, const float *alpha, float *acc) {
  float x[SLICE];
  for (size_t j = 0; j < g; j++)
    for (size_t c = 0; c < d; c++) acc[j * d + c] *= alpha[j];
  for (size_t t = 0; t < n; t++) {
    for (size_t c0 = 0; c0 < d; c0 += SLICE) {
      size_t w = d - c0 < SLICE ? d - c0 : SLICE;
      convert(dtype, rows[t], c0, x, w);
      for (size_t j = 0; j < g; j++) {
        float pj = p[j * ldp + t], *a = acc + j * d + c0;
        for (size_t c = 0; c < w; c++) a[c] += pj * x[c];
      }
    }
  }
}

const kvdex__kernels kvdex__kernels_scalar = {.score = score,
                                              .scan = scan,
                                              .max = attn_max,
                                              .expsum = attn_expsum,
                                              .expadd = attn_expadd,
                                              .vacc = attn_vacc};
