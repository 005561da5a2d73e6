/* gpu internals for the .cu files only: CUDA error mapping and the small device
 * helpers (16-byte loads of f16/bf16, packing, PTX wrappers) the kernels share.
 * Private to gpu/; needs the CUDA headers.
 */
#ifndef KVDEX_GPU_CUDA_H
#define KVDEX_GPU_CUDA_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "gpu/gpu_int.h"

#ifdef __cplusplus
extern "C" {
#endif
/* Maps a cudaError_t to a KVDEX_E* code with a message; 0 for cudaSuccess. */
int kvdex__cuda_err(const char *fn, int err);
/* kvdex__cuda_err of cudaGetLastError(): call right after a launch. */
int kvdex__launch_err(const char *fn);
/* The cublasHandle_t inside a kvdex_gpu_blas. */
void *kvdex__blas_handle(kvdex_gpu_blas *b);
#ifdef __cplusplus
}
#endif

#define KVDEX__LN2 0.69314718055994530942f
#define KVDEX__LOG2E 1.44269504088896340736f

/* Eight f16/bf16 values in a uint4 -> f32. bf16 is a compile-time constant at every
 * call site, so the branch folds away. */
static __device__ __forceinline__ void kvdex__cvt8(uint4 u, float *f, const int bf16) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    if (bf16) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      f[2 * i] = __half2float(__ushort_as_half((unsigned short)(w[i] & 0xffffu)));
      f[2 * i + 1] = __half2float(__ushort_as_half((unsigned short)(w[i] >> 16)));
    }
  }
}

/* Two f32 -> packed f16x2 / bf16x2 (lower column in the low half), round to nearest. */
static __device__ __forceinline__ uint32_t kvdex__pack2(float lo, float hi, const int bf16) {
  uint32_t r;
  if (bf16) {
    __nv_bfloat162 t = __floats2bfloat162_rn(lo, hi);
    r = *(uint32_t *)&t;
  } else {
    __half2 t = __floats2half2_rn(lo, hi);
    r = *(uint32_t *)&t;
  }
  return r;
}

static __device__ __forceinline__ uint32_t kvdex__smem_addr(const void *p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

#endif /* KVDEX_GPU_CUDA_H */
