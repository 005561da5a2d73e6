/* simd_avx2: the kernels of index_int.h's table on 8-wide AVX2 + FMA + F16C vectors
 * (built with -mavx2 -mfma -mf16c; only called after the CPU was checked). The
 * kernels are simd_x86_kernels.h, shared with simd_avx512.c; the 8-wide vector
 * layer they are written in is simd_x86.h.
 */
#define KVDEX__SIMD_W 8
#define KVDEX__SIMD_TABLE kvdex__kernels_avx2
#include "index/simd_x86_kernels.h"
