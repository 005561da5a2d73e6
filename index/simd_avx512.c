/* simd_avx512: the kernels of index_int.h's table on 16-wide AVX-512 F/BW/VL/DQ +
 * FMA + F16C vectors (built with those target flags; only called after the CPU was
 * checked). The kernels are simd_x86_kernels.h, shared with simd_avx2.c; the
 * 16-wide vector layer they are written in is simd_x86.h.
 */
#define KVDEX__SIMD_W 16
#define KVDEX__SIMD_TABLE kvdex__kernels_avx512
#include "index/simd_x86_kernels.h"
