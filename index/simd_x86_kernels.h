/* simd_x86_kernels: the x86 kernels of index_int.h's table, written once over the
 * vector layer of simd_x86.h and compiled once per width: simd_avx2.c (W = 8) and
 * simd_avx512.c (W = 16) each define KVDEX__SIMD_W and KVDEX__SIMD_TABLE (the name
 * of the table) and include this file, under their own target flags. Not a header
 * to include anywhere else: it defines the table.
 *
 * Scan: a tile of KB keys is scored against G <= 8 queries at once (G*KB <= W
 * register accumulators): each W-wide slice of a key is loaded and converted once,
 * and a transpose-and-add tree turns the accumulators into one vector of W scores,
 * which the scan compares with the thresholds in one instruction. This is bound by
 * the FMA/convert ports (~59 uops per key at d=128, g=4 on AVX-512), so memory
 * traffic for the next range is prefetched from inside the loop to overlap with it.
 * Tails of d use masked (or zero-padded) loads; tails of n repeat the last key
 * (scores dropped). Attention: max, exp (Cephes, ~1 ulp) with its sum, and the
 * V-accumulate of up to 4 heads per pass with their slices in registers.
 */
#ifndef KVDEX__SIMD_TABLE
#error "define KVDEX__SIMD_W and KVDEX__SIMD_TABLE before including simd_x86_kernels.h"
#endif

#include <assert.h>
#include <math.h>

#include "index/index_int.h"
#include "index/simd_x86.h"

/* ---- scan: score and threshold ------------------------------------------------------ */

/* Scores keys i0 .. i0+KB-1 (those at or past i0 + nvalid repeat the last valid key)
 * against G queries; lane p = j*KB + kk of the result is (query j, key kk).
 * Accumulator p sits in v_reduce's slot (W/4)*(p%4) + p/4 to come out in lane p.
 * pf (may be NULL): the caller's next range, taken to have the same row layout; each
 * cache line read here has its twin there prefetched into L2, so the prefetches are
 * spread evenly over the arithmetic and run one whole range ahead. */
static ALWAYS_INLINE vf tile(const int dt, const int G, const int KB, const void *keys,
                             size_t i0, size_t nvalid, size_t d, const float *q,
                             const char *pf) {
  const size_t es = dt == KVDEX_DTYPE_F32 ? 4 : 2;
  size_t row[W];
#pragma GCC unroll 16
  for (int kk = 0; kk < KB; kk++)
    row[kk] = (i0 + ((size_t)kk < nvalid ? (size_t)kk : nvalid - 1)) * d;
  vf acc[W];
#pragma GCC unroll 16
  for (int p = 0; p < W; p++) acc[p] = V(setzero_ps)();
  size_t t = 0;
  for (; t + W <= d; t += W) {
#pragma GCC unroll 16
    for (int kk = 0; kk < KB; kk++) {
      /* One prefetch per line: issued by the slice that starts in its first W*es bytes. */
      size_t at = (row[kk] + t) * es;
      if (pf && at % 64 < W * es) _mm_prefetch(pf + at, _MM_HINT_T1);
      vf kv = v_load_row(dt, keys, row[kk] + t);
#pragma GCC unroll 8
      for (int j = 0; j < G; j++)
        acc[j * KB + kk] = V(fmadd_ps)(V(loadu_ps)(q + j * d + t), kv, acc[j * KB + kk]);
    }
  }
  if (t < d) {
    size_t r = d - t;
    const vtail m = v_tail(r);
#pragma GCC unroll 16
    for (int kk = 0; kk < KB; kk++) {
      vf kv = v_load_row_tail(dt, keys, row[kk] + t, r, m);
#pragma GCC unroll 8
      for (int j = 0; j < G; j++)
        acc[j * KB + kk] = V(fmadd_ps)(v_loadu_tail(q + j * d + t, m), kv, acc[j * KB + kk]);
    }
  }
  vf v[W];
#pragma GCC unroll 16
  for (int s = 0; s < W; s++) {
    int p = 4 * (s % (W / 4)) + s / (W / 4);
    v[s] = p < G * KB ? acc[p] : V(setzero_ps)();
  }
  return v_reduce(v);
}

static ALWAYS_INLINE void score_g(const int dt, const int G, const void *keys, size_t n, size_t d,
                                  const float *q, float *out, size_t ldo, const char *next) {
  const int KB = W / G;
  float r[W];
  for (size_t i = 0; i < n; i += KB) {
    size_t nvalid = n - i < (size_t)KB ? n - i : (size_t)KB;
    V(storeu_ps)(r, tile(dt, G, KB, keys, i, nvalid, d, q, next));
#pragma GCC unroll 8
    for (int j = 0; j < G; j++)
      for (size_t kk = 0; kk < nvalid; kk++) out[j * ldo + i + kk] = r[j * KB + (int)kk];
  }
}

static ALWAYS_INLINE size_t scan_g(const int dt, const int G, const void *keys, size_t n,
                                   size_t d, const float *q, const float *thr, uint32_t j0,
                                   kvdex__cand *cand, const char *next) {
  const int KB = W / G;
  float r[W];
  /* Lane p compares with thr[p / KB]; lanes past G*KB are masked off. */
#pragma GCC unroll 16
  for (int p = 0; p < W; p++) r[p] = p < G * KB ? thr[p / KB] : 0.0f;
  const vf tv = V(loadu_ps)(r);
  const unsigned used = (1u << (G * KB)) - 1;
  size_t c = 0;
  for (size_t i = 0; i < n; i += KB) {
    size_t nvalid = n - i < (size_t)KB ? n - i : (size_t)KB;
    unsigned lanes = used;
    if (nvalid < (size_t)KB) { /* drop the repeated keys of a tail tile */
      unsigned per = (1u << nvalid) - 1;
      lanes = 0;
      for (int j = 0; j < G; j++) lanes |= per << (j * KB);
    }
    vf s = tile(dt, G, KB, keys, i, nvalid, d, q, next);
    unsigned hit = v_ge_bits(s, tv, lanes);
    if (__builtin_expect(hit != 0, 0)) {
      V(storeu_ps)(r, s);
      do {
        int p = __builtin_ctz(hit);
        cand[c++] = (kvdex__cand){.i = (uint32_t)(i + (size_t)(p % KB)),
                                  .j = j0 + (uint32_t)(p / KB), .score = r[p]};
        hit &= hit - 1;
      } while (hit);
    }
  }
  return c;
}

/* The dispatch: call(DT, G) with the dtype DT and the group size G (1 .. gq, the
 * largest taking the rest) as constants, so that each pair gets its own inlined
 * kernel with its loops unrolled. */
#define BY_G8(call, DT)          \
  switch (gq) {                  \
    case 1: call(DT, 1); break;  \
    case 2: call(DT, 2); break;  \
    case 3: call(DT, 3); break;  \
    case 4: call(DT, 4); break;  \
    case 5: call(DT, 5); break;  \
    case 6: call(DT, 6); break;  \
    case 7: call(DT, 7); break;  \
    default: call(DT, 8); break; \
  }
#define BY_G4(call, DT)          \
  switch (gq) {                  \
    case 1: call(DT, 1); break;  \
    case 2: call(DT, 2); break;  \
    case 3: call(DT, 3); break;  \
    default: call(DT, 4); break; \
  }
#define BY_DTYPE(by_g, call)                                 \
  switch (dtype) {                                           \
    case KVDEX_DTYPE_F32: by_g(call, KVDEX_DTYPE_F32); break; \
    case KVDEX_DTYPE_F16: by_g(call, KVDEX_DTYPE_F16); break; \
    default: by_g(call, KVDEX_DTYPE_BF16); break;            \
  }

/* More than 8 queries go in groups of 8, the keys re-read (from cache) per group. */
static void score(int dtype, const void *keys, size_t n, size_t d, const float *q, size_t g,
                  float *out, size_t ldo, const void *next) {
  assert(n >= 1 && d >= 1 && g >= 1 && ldo >= n);
  for (size_t j0 = 0; j0 < g; j0 += 8) {
    size_t gq = g - j0 < 8 ? g - j0 : 8;
    const float *qg = q + j0 * d;
    float *og = out + j0 * ldo;
    const char *pf = j0 + 8 >= g ? (const char *)next : NULL;
#define SCORE(DT, G) score_g(DT, G, keys, n, d, qg, og, ldo, pf)
    BY_DTYPE(BY_G8, SCORE);
  }
}

static size_t scan(int dtype, const void *keys, size_t n, size_t d, const float *q, size_t g,
                   const float *thr, kvdex__cand *cand, const void *next) {
  assert(n >= 1 && d >= 1 && g >= 1);
  size_t c = 0;
  for (size_t j0 = 0; j0 < g; j0 += 8) {
    size_t gq = g - j0 < 8 ? g - j0 : 8;
    const float *qg = q + j0 * d, *tg = thr + j0;
    const char *pf = j0 + 8 >= g ? (const char *)next : NULL;
    kvdex__cand *cg = cand + c;
#define SCAN(DT, G) c += scan_g(DT, G, keys, n, d, qg, tg, (uint32_t)j0, cg, pf)
    BY_DTYPE(BY_G8, SCAN);
  }
  return c;
}

/* ---- attention: max, exp and sum, V-accumulate ----------------------------------------- */

/* Cephes expf: range reduction by ln 2 in two parts, degree-5 polynomial, ~1 ulp.
 * Inputs below ln(FLT_MIN) give exactly 0 (so e^-inf = 0); NaN stays NaN. */
#define EXP_LO -87.3365478515625f
#define EXP_HI 88.3762626647949f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_C1 0.693359375f
#define EXP_C2 -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

static ALWAYS_INLINE vf v_exp(vf x) {
  const vf lo = V(set1_ps)(EXP_LO), x0 = x;
  /* min/max return their second operand for NaN: x stays NaN. */
  x = V(max_ps)(lo, V(min_ps)(V(set1_ps)(EXP_HI), x));
  vf fx = v_round(V(mul_ps)(x, V(set1_ps)(EXP_LOG2E)));
  x = V(fnmadd_ps)(fx, V(set1_ps)(EXP_C1), x);
  x = V(fnmadd_ps)(fx, V(set1_ps)(EXP_C2), x);
  vf y = V(set1_ps)(EXP_P0);
  y = V(fmadd_ps)(y, x, V(set1_ps)(EXP_P1));
  y = V(fmadd_ps)(y, x, V(set1_ps)(EXP_P2));
  y = V(fmadd_ps)(y, x, V(set1_ps)(EXP_P3));
  y = V(fmadd_ps)(y, x, V(set1_ps)(EXP_P4));
  y = V(fmadd_ps)(y, x, V(set1_ps)(EXP_P5));
  y = V(fmadd_ps)(y, V(mul_ps)(x, x), V(add_ps)(x, V(set1_ps)(1.0f)));
  return v_zero_below(x0, lo, v_scale2(y, fx));
}

static float attn_max(const float *s, size_t n) {
  assert(n >= 1);
  vf m = V(set1_ps)(-INFINITY);
  size_t i = 0;
  for (; i + W <= n; i += W) m = V(max_ps)(m, V(loadu_ps)(s + i));
  if (i < n) m = V(max_ps)(m, v_loadu_tail_or(s + i, v_tail(n - i), -INFINITY));
  return v_hmax(m);
}

static float attn_expsum(float *s, size_t n, float m) {
  assert(n >= 1);
  const vf vm = V(set1_ps)(m);
  vf acc = V(setzero_ps)();
  size_t i = 0;
  for (; i + W <= n; i += W) {
    vf e = v_exp(V(sub_ps)(V(loadu_ps)(s + i), vm));
    V(storeu_ps)(s + i, e);
    acc = V(add_ps)(acc, e);
  }
  if (i < n) {
    const vtail mk = v_tail(n - i);
    vf e = v_zero_outside(mk, v_exp(V(sub_ps)(v_loadu_tail(s + i, mk), vm)));
    v_storeu_tail(s + i, mk, e);
    acc = V(add_ps)(acc, e);
  }
  return v_hsum(acc);
}

static void attn_expadd(const float *s, size_t n, float m, float *out) {
  assert(n >= 1);
  const vf vm = V(set1_ps)(m);
  size_t i = 0;
  for (; i + W <= n; i += W) {
    vf e = v_exp(V(sub_ps)(V(loadu_ps)(s + i), vm));
    V(storeu_ps)(out + i, V(add_ps)(V(loadu_ps)(out + i), e));
  }
  if (i < n) {
    const vtail mk = v_tail(n - i);
    vf e = v_exp(V(sub_ps)(v_loadu_tail(s + i, mk), vm));
    v_storeu_tail(out + i, mk, V(add_ps)(v_loadu_tail(out + i, mk), e));
  }
}

/* Vectors per slice for G heads: G*SW accumulators stay in registers (16 ymm: at
 * most 8 of them; 32 zmm: at most 16, a whole 128-float row for one or two heads). */
#if W == 8
#define VACC_SW(G) ((G) == 1 ? 8 : (G) == 2 ? 4 : 2)
#else
#define VACC_SW(G) ((G) <= 2 ? 8 : 16 / (G))
#endif

/* G <= 4 heads, slices of SW W-wide vectors: `full` whole vectors, then `rem` lanes. */
static ALWAYS_INLINE void vacc_g(const int dt, const int G, const void *const *rows, size_t n,
                                 size_t d, const float *p, size_t ldp, const float *alpha,
                                 float *acc) {
  const int SW = VACC_SW(G);
  for (size_t c0 = 0; c0 < d; c0 += (size_t)SW * W) {
    size_t cw = d - c0 < (size_t)SW * W ? d - c0 : (size_t)SW * W;
    const int full = (int)(cw / W);
    const size_t rem = cw % W;
    const vtail mk = v_tail(rem);
    vf a[4][8];
#pragma GCC unroll 4
    for (int j = 0; j < G; j++) {
      const vf al = V(set1_ps)(alpha[j]);
      const float *src = acc + (size_t)j * d + c0;
#pragma GCC unroll 8
      for (int v = 0; v < SW; v++) {
        if (v < full) a[j][v] = V(mul_ps)(V(loadu_ps)(src + v * W), al);
        else if (v == full && rem) a[j][v] = V(mul_ps)(v_loadu_tail(src + v * W, mk), al);
        else a[j][v] = V(setzero_ps)();
      }
    }
    for (size_t t = 0; t < n; t++) {
      const void *row = rows[t];
      vf pj[4];
#pragma GCC unroll 4
      for (int j = 0; j < G; j++) pj[j] = V(set1_ps)(p[(size_t)j * ldp + t]);
#pragma GCC unroll 8
      for (int v = 0; v < SW; v++) {
        vf x;
        if (v < full) x = v_load_row(dt, row, c0 + (size_t)v * W);
        else if (v == full && rem) x = v_load_row_tail(dt, row, c0 + (size_t)v * W, rem, mk);
        else continue;
#pragma GCC unroll 4
        for (int j = 0; j < G; j++) a[j][v] = V(fmadd_ps)(pj[j], x, a[j][v]);
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < G; j++) {
      float *dst = acc + (size_t)j * d + c0;
#pragma GCC unroll 8
      for (int v = 0; v < SW; v++) {
        if (v < full) V(storeu_ps)(dst + v * W, a[j][v]);
        else if (v == full && rem) v_storeu_tail(dst + v * W, mk, a[j][v]);
      }
    }
  }
}

static void attn_vacc(int dtype, const void *const *rows, size_t n, size_t d, const float *p,
                      size_t ldp, size_t g, const float *alpha, float *acc) {
  assert(n >= 1 && d >= 1 && g >= 1);
  for (size_t j0 = 0; j0 < g; j0 += 4) {
    size_t gq = g - j0 < 4 ? g - j0 : 4;
    const float *pg = p + j0 * ldp, *ag = alpha + j0;
    float *og = acc + j0 * d;
#define VACC(DT, G) vacc_g(DT, G, rows, n, d, pg, ldp, ag, og)
    BY_DTYPE(BY_G4, VACC);
  }
}

const kvdex__kernels KVDEX__SIMD_TABLE = {.score = score,
                                          .scan = scan,
                                          .max = attn_max,
                                          .expsum = attn_expsum,
                                          .expadd = attn_expadd,
                                          .vacc = attn_vacc};
