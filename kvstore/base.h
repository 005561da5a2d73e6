/* kvdex base, internal: the floor every kvdex module may use. The public part (codes,
 * dtypes, shape, kvdex_errmsg, log configuration) is kvstore/kvdex_base.h, included
 * here; this header adds what stays inside kvdex: kvdex__seterr/kvdex__preerr, the
 * monotonic clock, the KVDEX_LOG macro, half-precision conversion and the
 * synthetic-data generators. It
 * depends on nothing but libc and is never installed.
 */
#ifndef KVDEX_BASE_H
#define KVDEX_BASE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kvstore/kvdex_base.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Internal: record a message for kvdex_errmsg() and return rc (printf format). */
int kvdex__seterr(int rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Internal: prefix the current message with context ("append: <old message>"). */
int kvdex__preerr(int rc, const char *prefix);

/* Validates a shape (bounds above, GQA divisibility, known dtype). 0 or KVDEX_EINVAL. */
int kvdex__shape_check(const kvdex_shape *shape);

/* Validates a namespace / sequence id (lengths and characters, see kvdex.proto).
 * An empty or NULL namespace is valid and means KVDEX_DEFAULT_NAMESPACE. */
int kvdex__name_check(const char *ns, const char *seq_id);

/* Internal: the monotonic clock (CLOCK_MONOTONIC) every duration, timeout and deadline
 * in kvdex is read from: seconds, and whole milliseconds, since an arbitrary point
 * fixed at boot. Never wall-clock time (log timestamps use CLOCK_REALTIME). */
double kvdex__now_s(void);
int64_t kvdex__now_ms(void);

/* Half-precision conversions (scalar, exact; round to nearest even). */
static inline float kvdex__f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else { /* subnormal: renormalise */
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      man &= 0x3ff;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t kvdex__f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) /* inf or nan */
    return (uint16_t)(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
  if (absx >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
    return (uint16_t)(sign | 0x7c00);
  if (absx < 0x38800000u) { /* subnormal half or zero */
    if (absx < 0x33000000u) return (uint16_t)sign;
    uint32_t e = absx >> 23, m = (absx & 0x7fffff) | 0x800000;
    /* value = m * 2^(e-150); the half subnormal unit is 2^-24, so q = m * 2^(e-126) */
    uint32_t sh = 126 - e;
    uint32_t q = m >> sh, rem = m & ((1u << sh) - 1), half = 1u << (sh - 1);
    if (rem > half || (rem == half && (q & 1))) q++;
    return (uint16_t)(sign | q);
  }
  uint32_t e = (absx >> 23) - 127 + 15, m = absx & 0x7fffff;
  uint32_t h = (e << 10) | (m >> 13), rem = m & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
  return (uint16_t)(sign | h);
}

static inline float kvdex__bf16_to_f32(uint16_t b) {
  uint32_t bits = (uint32_t)b << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t kvdex__f32_to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);
  x += 0x7fff + ((x >> 16) & 1);
  return (uint16_t)(x >> 16);
}

/* Converts n elements of dtype `src_dtype` at src to f32. */
void kvdex__to_f32(int src_dtype, const void *src, float *dst, size_t n);
/* Converts n f32 values to dtype `dst_dtype`. */
void kvdex__from_f32(int dst_dtype, const float *src, void *dst, size_t n);

/* Synthetic data (benchmarks, demo, the decode-loop worker): SplitMix64, and a cheap
 * roughly normal float (a sum of four uniforms, unit variance). Not for anything that
 * needs real randomness. */
static inline uint64_t kvdex__splitmix64(uint64_t *state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static inline float kvdex__gauss4(uint64_t *state) {
  uint64_t r = kvdex__splitmix64(state);
  float a = (float)(r & 0xffff), b = (float)((r >> 16) & 0xffff), c = (float)((r >> 32) & 0xffff),
        d = (float)(r >> 48);
  return ((a + b + c + d) / 65536.0f - 2.0f) * 1.7320508f;
}

void kvdex__log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define KVDEX_LOG(level, ...) \
  do { if ((level) <= kvdex_log_level()) kvdex__log((level), __VA_ARGS__); } while (0)

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_BASE_H */
