/* simd_avx512: the AVX-512 kernels (built with -mavx512f/bw/vl/dq -mfma -mf16c; only
 * called after the CPU was checked). A tile of KB keys is scored against G <= 8
 * queries at once: each 16-wide slice of a key is loaded and converted once (f16 by
 * F16C, bf16 by a 16-bit shift) and feeds G*KB <= 16 register accumulators; a
 * transpose-and-add tree turns the 16 accumulators into one vector of 16 scores,
 * which the scan compares with the thresholds in one instruction. This is bound
 * by the FMA/convert ports (~59 uops per key at d=128, g=4), so memory traffic for
 * the next range is prefetched from inside the loop to overlap with it.
 * Tails of d use masked loads; tails of n repeat the last key (scores dropped).
 */
#include <immintrin.h>

#include "index/index_int.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

static ALWAYS_INLINE __m512 load16(const int dt, const void *base, size_t off) {
  if (dt == KVDEX_DTYPE_F32) return _mm512_loadu_ps((const float *)base + off);
  __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + off));
  if (dt == KVDEX_DTYPE_F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static ALWAYS_INLINE __m512 load16_mask(const int dt, const void *base, size_t off,
                                        __mmask16 m) {
  if (dt == KVDEX_DTYPE_F32) return _mm512_maskz_loadu_ps(m, (const float *)base + off);
  __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)base + off);
  if (dt == KVDEX_DTYPE_F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Sums each of v[0..15] across its lanes: result lane 4L+e = sum(v[4e+L]). Every
 * input goes through the same pattern of adds, whatever its slot. */
static ALWAYS_INLINE __m512 reduce16(const __m512 v[16]) {
  __m512 w[8], u[4], s[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; i++)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
#pragma GCC unroll 4
  for (int i = 0; i < 4; i++)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
#pragma GCC unroll 2
  for (int i = 0; i < 2; i++)
    s[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(s[0], s[1], 0x88), _mm512_shuffle_ps(s[0], s[1], 0xDD));
}

/* Scores keys i0 .. i0+KB-1 (those at or past i0 + nvalid repeat the last valid key)
 * against G queries; lane p = j*KB + kk of the result is (query j, key kk).
 * Accumulator p sits in reduce16's slot 4*(p%4) + p/4 to come out in lane p.
 * pf (may be NULL): the caller's next range, taken to have the same row layout; each
 * cache line read here has its twin there prefetched into L2, so the prefetches are
 * spread evenly over the arithmetic and run one whole range ahead. */
static ALWAYS_INLINE __m512 tile(const int dt, const int G, const int KB, const void *keys,
                                size_t i0, size_t nvalid, size_t d, const float *q,
                                const char *pf) {
  const size_t es = dt == KVDEX_DTYPE_F32 ? 4 : 2;
  size_t row[16];
#pragma GCC unroll 16
  for (int kk = 0; kk < KB; kk++)
    row[kk] = (i0 + ((size_t)kk < nvalid ? (size_t)kk : nvalid - 1)) * d;
  __m512 acc[16];
#pragma GCC unroll 16
  for (int p = 0; p < 16; p++) acc[p] = _mm512_setzero_ps();
  size_t t = 0;
  for (; t + 16 <= d; t += 16) {
#pragma GCC unroll 16
    for (int kk = 0; kk < KB; kk++) {
      /* One prefetch per line: issued by the slice that starts in its first 16*es bytes. */
      size_t at = (row[kk] + t) * es;
      if (pf && at % 64 < 16 * es) _mm_prefetch(pf + at, _MM_HINT_T1);
      __m512 kv = load16(dt, keys, row[kk] + t);
#pragma GCC unroll 8
      for (int j = 0; j < G; j++)
        acc[j * KB + kk] = _mm512_fmadd_ps(_mm512_loadu_ps(q + j * d + t), kv, acc[j * KB + kk]);
    }
  }
  if (t < d) {
    __mmask16 m = (__mmask16)((1u << (d - t)) - 1);
#pragma GCC unroll 16
    for (int kk = 0; kk < KB; kk++) {
      __m512 kv = load16_mask(dt, keys, row[kk] + t, m);
#pragma GCC unroll 8
      for (int j = 0; j < G; j++)
        acc[j * KB + kk] =
            _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + j * d + t), kv, acc[j * KB + kk]);
    }
  }
  __m512 v[16];
#pragma GCC unroll 16
  for (int s = 0; s < 16; s++) {
    int p = 4 * (s & 3) + (s >> 2);
    v[s] = p < G * KB ? acc[p] : _mm512_setzero_ps();
  }
  return reduce16(v);
}

static ALWAYS_INLINE void score_g(const int dt, const int G, const void *keys, size_t n, size_t d,
                                 const float *q, float *out, size_t ldo, const char *next) {
  const int KB = 16 / G;
  float r[16];
  for (size_t i = 0; i < n; i += KB) {
    size_t nvalid = n - i < (size_t)KB ? n - i : (size_t)KB;
    _mm512_storeu_ps(r, tile(dt, G, KB, keys, i, nvalid, d, q, next));
#pragma GCC unroll 8
    for (int j = 0; j < G; j++)
      for (size_t kk = 0; kk < nvalid; kk++) out[j * ldo + i + kk] = r[j * KB + (int)kk];
  }
}

static ALWAYS_INLINE size_t scan_g(const int dt, const int G, const void *keys, size_t n,
                                  size_t d, const float *q, const float *thr, uint32_t j0,
                                  kvdex__cand *cand, const char *next) {
  const int KB = 16 / G;
  float r[16];
  /* Lane p compares with thr[p / KB]; lanes past G*KB are masked off. */
#pragma GCC unroll 16
  for (int p = 0; p < 16; p++) r[p] = p < G * KB ? thr[p / KB] : 0.0f;
  const __m512 tv = _mm512_loadu_ps(r);
  const __mmask16 used = (__mmask16)((1u << (G * KB)) - 1);
  size_t c = 0;
  for (size_t i = 0; i < n; i += KB) {
    size_t nvalid = n - i < (size_t)KB ? n - i : (size_t)KB;
    __mmask16 lanes = used;
    if (nvalid < (size_t)KB) { /* drop the repeated keys of a tail tile */
      unsigned per = (1u << nvalid) - 1, m = 0;
      for (int j = 0; j < G; j++) m |= per << (j * KB);
      lanes = (__mmask16)m;
    }
    __m512 s = tile(dt, G, KB, keys, i, nvalid, d, q, next);
    unsigned hit = _mm512_mask_cmp_ps_mask(lanes, s, tv, _CMP_GE_OQ);
    if (__builtin_expect(hit != 0, 0)) {
      _mm512_storeu_ps(r, s);
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

#define BY_G(call)                 \
  switch (gq) {                    \
    case 1: call(1); break;        \
    case 2: call(2); break;        \
    case 3: call(3); break;        \
    case 4: call(4); break;        \
    case 5: call(5); break;        \
    case 6: call(6); break;        \
    case 7: call(7); break;        \
    default: call(8); break;       \
  }

/* More than 8 queries go in groups of 8, the keys re-read (from cache) per group. */
static void score(int dtype, const void *keys, size_t n, size_t d, const float *q, size_t g,
                  float *out, size_t ldo, const void *next) {
  for (size_t j0 = 0; j0 < g; j0 += 8) {
    size_t gq = g - j0 < 8 ? g - j0 : 8;
    const float *qg = q + j0 * d;
    float *og = out + j0 * ldo;
    const char *pf = j0 + 8 >= g ? (const char *)next : NULL;
#define SCORE_F32(G) score_g(KVDEX_DTYPE_F32, G, keys, n, d, qg, og, ldo, pf)
#define SCORE_F16(G) score_g(KVDEX_DTYPE_F16, G, keys, n, d, qg, og, ldo, pf)
#define SCORE_BF16(G) score_g(KVDEX_DTYPE_BF16, G, keys, n, d, qg, og, ldo, pf)
    switch (dtype) {
      case KVDEX_DTYPE_F32: BY_G(SCORE_F32); break;
      case KVDEX_DTYPE_F16: BY_G(SCORE_F16); break;
      default: BY_G(SCORE_BF16); break;
    }
  }
}

static size_t scan(int dtype, const void *keys, size_t n, size_t d, const float *q, size_t g,
                   const float *thr, kvdex__cand *cand, const void *next) {
  size_t c = 0;
  for (size_t j0 = 0; j0 < g; j0 += 8) {
    size_t gq = g - j0 < 8 ? g - j0 : 8;
    const float *qg = q + j0 * d, *tg = thr + j0;
    const char *pf = j0 + 8 >= g ? (const char *)next : NULL;
    kvdex__cand *cg = cand + c;
#define SCAN_F32(G) c += scan_g(KVDEX_DTYPE_F32, G, keys, n, d, qg, tg, (uint32_t)j0, cg, pf)
#define SCAN_F16(G) c += scan_g(KVDEX_DTYPE_F16, G, keys, n, d, qg, tg, (uint32_t)j0, cg, pf)
#define SCAN_BF16(G) c += scan_g(KVDEX_DTYPE_BF16, G, keys, n, d, qg, tg, (uint32_t)j0, cg, pf)
    switch (dtype) {
      case KVDEX_DTYPE_F32: BY_G(SCAN_F32); break;
      case KVDEX_DTYPE_F16: BY_G(SCAN_F16); break;
      default: BY_G(SCAN_BF16); break;
    }
  }
  return c;
}

const kvdex__kernels kvdex__kernels_avx512 = {.score = score, .scan = scan};
