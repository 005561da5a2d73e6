/* simd_x86: the vector layer the x86 kernels (simd_x86_kernels.h) are written in,
 * for one width W chosen by the including file (#define KVDEX__SIMD_W 8 or 16):
 * W = 8 is AVX2 + FMA + F16C, W = 16 is AVX-512 F/BW/VL/DQ; that file is compiled
 * with the matching target flags (index/BUILD). One set of names over both: vf (W
 * floats), V(op) for the intrinsics both widths share by suffix (V(add_ps) is
 * _mm256_add_ps or _mm512_add_ps), and helpers where they differ: f16/bf16 -> f32
 * loads of key and value rows, tail masks, the transpose-add tree, reductions and
 * the pieces of exp. Private to index/; nothing here checks arguments.
 */
#ifndef KVDEX_SIMD_X86_H
#define KVDEX_SIMD_X86_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kvstore/base.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

#define KVDEX__PASTE2(a, b) a##b
#define KVDEX__PASTE(a, b) KVDEX__PASTE2(a, b)
#define V(op) KVDEX__PASTE(V_PREFIX, op)

#if KVDEX__SIMD_W == 8
/* ---- AVX2 + FMA + F16C: 8 lanes ------------------------------------------------ */
#define W 8
#define V_PREFIX _mm256_
typedef __m256 vf;
typedef __m256i vtail; /* lanes [0, r) of a partial vector: all ones, the rest zero */

static ALWAYS_INLINE vtail v_tail(size_t r) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* 8 f16 (F16C) or bf16 (a 16-bit shift) values as f32. */
static ALWAYS_INLINE vf v_cvt_half(const int dt, __m128i h) {
  if (dt == KVDEX_DTYPE_F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Elements off .. off+7 of a row of dtype dt, as f32. */
static ALWAYS_INLINE vf v_load_row(const int dt, const void *base, size_t off) {
  if (dt == KVDEX_DTYPE_F32) return _mm256_loadu_ps((const float *)base + off);
  return v_cvt_half(dt, _mm_loadu_si128((const __m128i *)((const uint16_t *)base + off)));
}

/* The first r (< 8) elements at off, the rest zero; m = v_tail(r). The 16-bit types
 * go through a zero-padded copy (AVX2 has no 16-bit masked load). */
static ALWAYS_INLINE vf v_load_row_tail(const int dt, const void *base, size_t off, size_t r,
                                        vtail m) {
  if (dt == KVDEX_DTYPE_F32) return _mm256_maskload_ps((const float *)base + off, m);
  uint16_t tmp[8] = {0};
  memcpy(tmp, (const uint16_t *)base + off, r * sizeof(uint16_t));
  return v_cvt_half(dt, _mm_loadu_si128((const __m128i *)tmp));
}

static ALWAYS_INLINE vf v_loadu_tail(const float *p, vtail m) { return _mm256_maskload_ps(p, m); }
/* Lanes outside m are `fill`. */
static ALWAYS_INLINE vf v_loadu_tail_or(const float *p, vtail m, float fill) {
  return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}
static ALWAYS_INLINE void v_storeu_tail(float *p, vtail m, vf v) { _mm256_maskstore_ps(p, m, v); }
static ALWAYS_INLINE vf v_zero_outside(vtail m, vf v) {
  return _mm256_and_ps(v, _mm256_castsi256_ps(m));
}

/* The 128-bit stage of v_reduce: 8 vectors folded to 4 by adding 128-bit halves in
 * pairs (permute2f128 moves whole 128-bit lanes). */
static ALWAYS_INLINE void v_reduce_128(const vf v[8], vf u[4]) {
#pragma GCC unroll 4
  for (int i = 0; i < 4; i++)
    u[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                         _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
}

/* Bit p set where lane p of a >= b (NaN: clear), for the lanes in `lanes`. */
static ALWAYS_INLINE unsigned v_ge_bits(vf a, vf b, unsigned lanes) {
  return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GE_OQ)) & lanes;
}

static ALWAYS_INLINE float v_hsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static ALWAYS_INLINE float v_hmax(vf v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}

static ALWAYS_INLINE vf v_round(vf x) {
  return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/* y * 2^n for integral n (exponent bits built directly; n within the normal range). */
static ALWAYS_INLINE vf v_scale2(vf y, vf n) {
  __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  e = _mm256_slli_epi32(e, 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* v where x >= lo or x is NaN; 0 where x < lo. */
static ALWAYS_INLINE vf v_zero_below(vf x, vf lo, vf v) {
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), v);
}

#elif KVDEX__SIMD_W == 16
/* ---- AVX-512 F/BW/VL/DQ + FMA + F16C: 16 lanes ------------------------------- */
#define W 16
#define V_PREFIX _mm512_
typedef __m512 vf;
typedef __mmask16 vtail; /* lanes [0, r) of a partial vector */

static ALWAYS_INLINE vtail v_tail(size_t r) { return (__mmask16)((1u << r) - 1); }

/* Elements off .. off+15 of a row of dtype dt, as f32: f16 by F16C, bf16 by a
 * 16-bit shift. */
static ALWAYS_INLINE vf v_load_row(const int dt, const void *base, size_t off) {
  if (dt == KVDEX_DTYPE_F32) return _mm512_loadu_ps((const float *)base + off);
  __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + off));
  if (dt == KVDEX_DTYPE_F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The lanes of m (the first r) at off, the rest zero: masked loads, nothing past
 * the row is read. */
static ALWAYS_INLINE vf v_load_row_tail(const int dt, const void *base, size_t off, size_t r,
                                        vtail m) {
  (void)r;
  if (dt == KVDEX_DTYPE_F32) return _mm512_maskz_loadu_ps(m, (const float *)base + off);
  __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)base + off);
  if (dt == KVDEX_DTYPE_F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static ALWAYS_INLINE vf v_loadu_tail(const float *p, vtail m) {
  return _mm512_maskz_loadu_ps(m, p);
}
/* Lanes outside m are `fill`. */
static ALWAYS_INLINE vf v_loadu_tail_or(const float *p, vtail m, float fill) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), m, p);
}
static ALWAYS_INLINE void v_storeu_tail(float *p, vtail m, vf v) { _mm512_mask_storeu_ps(p, m, v); }
static ALWAYS_INLINE vf v_zero_outside(vtail m, vf v) { return _mm512_maskz_mov_ps(m, v); }

/* The 128-bit stages of v_reduce: 16 vectors folded to 4 by adding 128-bit lanes
 * in pairs, twice (shuffle_f32x4 moves whole 128-bit lanes). */
static ALWAYS_INLINE void v_reduce_128(const vf v[16], vf u[4]) {
  __m512 w[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; i++)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
#pragma GCC unroll 4
  for (int i = 0; i < 4; i++)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
}

/* Bit p set where lane p of a >= b (NaN: clear), for the lanes in `lanes`. */
static ALWAYS_INLINE unsigned v_ge_bits(vf a, vf b, unsigned lanes) {
  return _mm512_mask_cmp_ps_mask((__mmask16)lanes, a, b, _CMP_GE_OQ);
}

static ALWAYS_INLINE float v_hsum(vf v) { return _mm512_reduce_add_ps(v); }
static ALWAYS_INLINE float v_hmax(vf v) { return _mm512_reduce_max_ps(v); }

static ALWAYS_INLINE vf v_round(vf x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

/* y * 2^n for integral n. */
static ALWAYS_INLINE vf v_scale2(vf y, vf n) { return _mm512_scalef_ps(y, n); }

/* v where x >= lo or x is NaN; 0 where x < lo. */
static ALWAYS_INLINE vf v_zero_below(vf x, vf lo, vf v) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), v);
}

#else
#error "define KVDEX__SIMD_W as 8 (AVX2) or 16 (AVX-512) before including simd_x86.h"
#endif

/* ---- both widths ---------------------------------------------------------------- */

/* Sums each of v[0..W) across its lanes: result lane 4L+e = sum(v[(W/4)e + L]).
 * Every input goes through the same pattern of adds, whatever its slot: the
 * 128-bit stages above, then two in-lane stages. */
static ALWAYS_INLINE vf v_reduce(const vf v[W]) {
  vf u[4], s[2];
  v_reduce_128(v, u);
#pragma GCC unroll 2
  for (int i = 0; i < 2; i++)
    s[i] = V(add_ps)(V(shuffle_ps)(u[2 * i], u[2 * i + 1], 0x44),
                     V(shuffle_ps)(u[2 * i], u[2 * i + 1], 0xEE));
  return V(add_ps)(V(shuffle_ps)(s[0], s[1], 0x88), V(shuffle_ps)(s[0], s[1], 0xDD));
}

#endif /* KVDEX_SIMD_X86_H */
