/* gpu runtime glue: device detection, device facts (peak HBM bandwidth from
 * cudaDeviceGetAttribute: CUDA 13 dropped memoryClockRate/memoryBusWidth from
 * cudaDeviceProp), device memory helpers and the cuBLAS handle. CUDA C; the entry
 * points are extern "C" and declared in gpu/gpu.h.
 */
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/gpu_int.h"
#include "gpu/gpu_cuda.h"

extern "C" int kvdex__cuda_err(const char *fn, int err) {
  cudaError_t e = (cudaError_t)err;
  if (e == cudaSuccess) return 0;
  int rc = (e == cudaErrorMemoryAllocation) ? KVDEX_ENOMEM
           : (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver)
               ? KVDEX_EUNAVAIL
               : KVDEX_EINTERNAL;
  return kvdex__seterr(rc, "%s: CUDA error %s: %s", fn, cudaGetErrorName(e),
                       cudaGetErrorString(e));
}

extern "C" int kvdex__launch_err(const char *fn) {
  return kvdex__cuda_err(fn, (int)cudaGetLastError());
}

extern "C" int kvdex_gpu_available(void) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError(); /* clear the sticky-free error state */
    return 0;
  }
  return n > 0;
}

extern "C" int kvdex_gpu_device_info(kvdex_gpu_info *out) {
  static const char fn[] = "gpu_device_info";
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "%s: out is NULL", fn);
  if (!kvdex_gpu_available()) return kvdex__seterr(KVDEX_EUNAVAIL, "%s: no usable CUDA device", fn);
  int dev = 0, rc;
  if ((rc = kvdex__cuda_err(fn, cudaGetDevice(&dev)))) return rc;
  kvdex_gpu_info info;
  memset(&info, 0, sizeof info);
  cudaDeviceProp prop;
  if ((rc = kvdex__cuda_err(fn, cudaGetDeviceProperties(&prop, dev)))) return rc;
  strncpy(info.name, prop.name, sizeof info.name - 1);
  info.total_mem = prop.totalGlobalMem;
  cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&info.cc_minor, cudaDevAttrComputeCapabilityMinor, dev);
  cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, dev);
  if (cudaDeviceGetAttribute(&info.mem_clock_khz, cudaDevAttrMemoryClockRate, dev) != cudaSuccess)
    info.mem_clock_khz = 0;
  if (cudaDeviceGetAttribute(&info.bus_width_bits, cudaDevAttrGlobalMemoryBusWidth, dev) !=
      cudaSuccess)
    info.bus_width_bits = 0;
  (void)cudaGetLastError();
  /* Double data rate: two transfers per memory clock (as deviceQuery/bandwidthTest). */
  info.peak_bw_gbs = 2.0 * info.mem_clock_khz * 1e3 * (info.bus_width_bits / 8.0) / 1e9;
  *out = info;
  return 0;
}

extern "C" int kvdex_gpu_alloc(size_t bytes, void **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "gpu_alloc: out is NULL");
  void *p = NULL;
  int rc = kvdex__cuda_err("gpu_alloc", (int)cudaMalloc(&p, bytes ? bytes : 1));
  if (rc) {
    (void)cudaGetLastError();
    return rc;
  }
  *out = p;
  return 0;
}

extern "C" void kvdex_gpu_free(void *p) {
  if (p) cudaFree(p);
}

extern "C" int kvdex_gpu_copy(void *dst, const void *src, size_t bytes) {
  if (!bytes) return 0;
  if (!dst || !src) return kvdex__seterr(KVDEX_EINVAL, "gpu_copy: NULL pointer");
  return kvdex__cuda_err("gpu_copy", (int)cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
}

extern "C" int kvdex_gpu_memset(void *dst, int byte, size_t bytes) {
  if (!bytes) return 0;
  if (!dst) return kvdex__seterr(KVDEX_EINVAL, "gpu_memset: NULL pointer");
  return kvdex__cuda_err("gpu_memset", (int)cudaMemset(dst, byte, bytes));
}

extern "C" int kvdex_gpu_sync(void *stream) {
  return kvdex__cuda_err("gpu_sync", (int)cudaStreamSynchronize((cudaStream_t)stream));
}

/* ---- cuBLAS handle ---- */

struct kvdex_gpu_blas {
  cublasHandle_t h;
};

extern "C" int kvdex_gpu_blas_create(kvdex_gpu_blas **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "gpu_blas_create: out is NULL");
  kvdex_gpu_blas *b = (kvdex_gpu_blas *)calloc(1, sizeof *b);
  if (!b) return kvdex__seterr(KVDEX_ENOMEM, "gpu_blas_create: out of host memory");
  cublasStatus_t st = cublasCreate(&b->h);
  if (st != CUBLAS_STATUS_SUCCESS) {
    free(b);
    return kvdex__seterr(st == CUBLAS_STATUS_ALLOC_FAILED ? KVDEX_ENOMEM : KVDEX_EUNAVAIL,
                         "gpu_blas_create: cublasCreate failed (status %d)", (int)st);
  }
  *out = b;
  return 0;
}

extern "C" void kvdex_gpu_blas_destroy(kvdex_gpu_blas *b) {
  if (!b) return;
  cublasDestroy(b->h);
  free(b);
}

extern "C" void *kvdex__blas_handle(kvdex_gpu_blas *b) { return b ? (void *)b->h : NULL; }
