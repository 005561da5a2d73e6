/* simd: run-time choice of the scoring kernel (AVX-512, AVX2+FMA+F16C, scalar) by
 * asking the CPU, and the public kvdex_score_keys entry point that checks its
 * arguments and dispatches. The kernels themselves live in simd_<level>.c.
 */
#include <stdatomic.h>

#include "index/index.h"
#include "index/index_int.h"

static kvdex_simd detect(void) {
  __builtin_cpu_init();
  int f16 = __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (f16 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return KVDEX_SIMD_AVX512;
  if (f16 && __builtin_cpu_supports("avx2")) return KVDEX_SIMD_AVX2;
  return KVDEX_SIMD_SCALAR;
}

kvdex_simd kvdex_simd_detect(void) {
  static _Atomic int cached; /* 0 = not asked yet; racing first callers agree */
  int level = atomic_load_explicit(&cached, memory_order_relaxed);
  if (!level) {
    level = (int)detect();
    atomic_store_explicit(&cached, level, memory_order_relaxed);
  }
  return (kvdex_simd)level;
}

const char *kvdex_simd_name(kvdex_simd level) {
  switch (level) {
    case KVDEX_SIMD_AUTO: return "auto";
    case KVDEX_SIMD_SCALAR: return "scalar";
    case KVDEX_SIMD_AVX2: return "avx2";
    case KVDEX_SIMD_AVX512: return "avx512";
    default: return "?";
  }
}

const kvdex__kernels *kvdex__kernels_get(int level) {
  kvdex_simd best = kvdex_simd_detect();
  if (level == KVDEX_SIMD_AUTO) level = (int)best;
  if (level < KVDEX_SIMD_SCALAR || level > KVDEX_SIMD_AVX512 || level > (int)best) return NULL;
  switch (level) {
    case KVDEX_SIMD_AVX512: return &kvdex__kernels_avx512;
    case KVDEX_SIMD_AVX2: return &kvdex__kernels_avx2;
    default: return &kvdex__kernels_scalar;
  }
}

int kvdex_score_keys(kvdex_simd level, int dtype, const void *keys, size_t n, size_t d,
                     const float *q, size_t g, float *out) {
  if (!kvdex_dtype_size(dtype))
    return kvdex__seterr(KVDEX_EINVAL, "score_keys: unknown dtype %d", dtype);
  if ((int)level < KVDEX_SIMD_AUTO || (int)level > KVDEX_SIMD_AVX512)
    return kvdex__seterr(KVDEX_EINVAL, "score_keys: unknown simd level %d", (int)level);
  const kvdex__kernels *kern = kvdex__kernels_get((int)level);
  if (!kern)
    return kvdex__seterr(KVDEX_EUNIMPL, "score_keys: this CPU does not support %s (best: %s)",
                         kvdex_simd_name(level), kvdex_simd_name(kvdex_simd_detect()));
  if (n == 0 || g == 0) return KVDEX_OK;
  if (!keys || !q || !out) return kvdex__seterr(KVDEX_EINVAL, "score_keys: NULL buffer");
  if (d == 0) {
    memset(out, 0, n * g * sizeof(float));
    return KVDEX_OK;
  }
  kern->score(dtype, keys, n, d, q, g, out, n, NULL);
  return KVDEX_OK;
}
