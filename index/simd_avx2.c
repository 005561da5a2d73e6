/* simd_avx2: the AVX2 + FMA + F16C kernels (built with -mavx2 -mfma -mf16c; only
 * called after the CPU was checked). Same scheme as simd_avx512 on 8-wide
 * registers: a tile of KB keys against G queries keeps G*KB <= 8 accumulators, each
 * 8-slice of a key is converted once, a transpose-and-add tree yields one vector of
 * 8 scores. Tails of d go through a zero-padded copy; tails of n repeat the last key.
 */
#include <immintrin.h>

#include "index/index_int.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

static ALWAYS_INLINE __m256 cvt8(const int dt, __m128i h) {
  if (dt == KVDEX_DTYPE_F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static ALWAYS_INLINE __m256 load8(const int dt, const void *base, size_t off) {
  if (dt == KVDEX_DTYPE_F32) return _mm256_loadu_ps((const float *)base + off);
  return cvt8(dt, _mm_loadu_si128((const __m128i *)((const uint16_t *)base + off)));
}

/* The first r (< 8) elements at base + off, the rest zero; m selects those r. */
static ALWAYS_INLINE __m256 load8_part(const int dt, const void *base, size_t off, size_t r,
                                      __m256i m) {
  if (dt == KVDEX_DTYPE_F32) return _mm256_maskload_ps((const float *)base + off, m);
  uint16_t tmp[8] = {0};
  memcpy(tmp, (const uint16_t *)base + off, r * sizeof(uint16_t));
  return cvt8(dt, _mm_loadu_si128((const __m128i *)tmp));
}

/* Sums each of v[0..7] across its lanes: result lane 4L+e = sum(v[2e+L]). Every
 * input goes through the same pattern of adds, whatever its slot. */
static ALWAYS_INLINE __m256 reduce8(const __m256 v[8]) {
  __m256 w[4], s[2];
#pragma GCC unroll 4
  for (int i = 0; i < 4; i++)
    w[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                         _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
#pragma GCC unroll 2
  for (int i = 0; i < 2; i++)
    s[i] = _mm256_add_ps(_mm256_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44),
                         _mm256_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
  return _mm256_add_ps(_mm256_shuffle_ps(s[0], s[1], 0x88), _mm256_shuffle_ps(s[0], s[1], 0xDD));
}

/* Keys i0 .. i0+KB-1 (past i0 + nvalid: the last valid key again) against G queries;
 * lane p = j*KB + kk of the result is (query j, key kk). Accumulator p sits in
 * reduce8's slot 2*(p%4) + p/4 to come out in lane p. pf (may be NULL): the caller's
 * next range, same row layout; each line read here has its twin there prefetched. */
static ALWAYS_INLINE __m256 tile(const int dt, const int G, const int KB, const void *keys,
                                size_t i0, size_t nvalid, size_t d, const float *q,
                                const char *pf) {
  const size_t es = dt == KVDEX_DTYPE_F32 ? 4 : 2;
  size_t row[8];
#pragma GCC unroll 8
  for (int kk = 0; kk < KB; kk++)
    row[kk] = (i0 + ((size_t)kk < nvalid ? (size_t)kk : nvalid - 1)) * d;
  __m256 acc[8];
#pragma GCC unroll 8
  for (int p = 0; p < 8; p++) acc[p] = _mm256_setzero_ps();
  size_t t = 0;
  for (; t + 8 <= d; t += 8) {
#pragma GCC unroll 8
    for (int kk = 0; kk < KB; kk++) {
      /* One prefetch per line: issued by the slice that starts in its first 8*es bytes. */
      size_t at = (row[kk] + t) * es;
      if (pf && at % 64 < 8 * es) _mm_prefetch(pf + at, _MM_HINT_T1);
      __m256 kv = load8(dt, keys, row[kk] + t);
#pragma GCC unroll 8
      for (int j = 0; j < G; j++)
        acc[j * KB + kk] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * d + t), kv, acc[j * KB + kk]);
    }
  }
  if (t < d) {
    size_t r = d - t;
    __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)r),
                                   _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
#pragma GCC unroll 8
    for (int kk = 0; kk < KB; kk++) {
      __m256 kv = load8_part(dt, keys, row[kk] + t, r, m);
#pragma GCC unroll 8
      for (int j = 0; j < G; j++)
        acc[j * KB + kk] =
            _mm256_fmadd_ps(_mm256_maskload_ps(q + j * d + t, m), kv, acc[j * KB + kk]);
    }
  }
  __m256 v[8];
#pragma GCC unroll 8
  for (int s = 0; s < 8; s++) {
    int p = 4 * (s & 1) + (s >> 1);
    v[s] = p < G * KB ? acc[p] : _mm256_setzero_ps();
  }
  return reduce8(v);
}

static ALWAYS_INLINE void score_g(const int dt, const int G, const void *keys, size_t n, size_t d,
                                 const float *q, float *out, size_t ldo, const char *next) {
  const int KB = 8 / G;
  float r[8];
  for (size_t i = 0; i < n; i += KB) {
    size_t nvalid = n - i < (size_t)KB ? n - i : (size_t)KB;
    _mm256_storeu_ps(r, tile(dt, G, KB, keys, i, nvalid, d, q, next));
#pragma GCC unroll 8
    for (int j = 0; j < G; j++)
      for (size_t kk = 0; kk < nvalid; kk++) out[j * ldo + i + kk] = r[j * KB + (int)kk];
  }
}

static ALWAYS_INLINE size_t scan_g(const int dt, const int G, const void *keys, size_t n,
                                  size_t d, const float *q, const float *thr, uint32_t j0,
                                  kvdex__cand *cand, const char *next) {
  const int KB = 8 / G;
  float r[8];
  /* Lane p compares with thr[p / KB]; lanes past G*KB are masked off. */
#pragma GCC unroll 8
  for (int p = 0; p < 8; p++) r[p] = p < G * KB ? thr[p / KB] : 0.0f;
  const __m256 tv = _mm256_loadu_ps(r);
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
    __m256 s = tile(dt, G, KB, keys, i, nvalid, d, q, next);
    unsigned hit = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(s, tv, _CMP_GE_OQ)) & lanes;
    if (__builtin_expect(hit != 0, 0)) {
      _mm256_storeu_ps(r, s);
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

const kvdex__kernels kvdex__kernels_avx2 = {.score = score, .scan = scan};
