/* npy: read and write NumPy .npy files (format 1.0-3.0) holding float32 or
 * float16 arrays in C order, so keys and queries can be dumped from
 * PyTorch/NumPy (`np.save("K.npy", k.cpu().numpy())`) and fed to kvdex tools.
 * Loads whole files into memory; no memory mapping, no other dtypes.
 */
#ifndef KVDEX_NPY_H
#define KVDEX_NPY_H

#include <stddef.h>
#include <stdint.h>

#include "kvstore/base.h"

#define KVDEX_NPY_MAX_DIMS 8

typedef struct kvdex_npy {
  int dtype;                        /* KVDEX_DTYPE_F32 or KVDEX_DTYPE_F16 */
  int ndim;
  uint64_t shape[KVDEX_NPY_MAX_DIMS];
  uint64_t count;                   /* product of shape */
  void *data;                       /* count elements, owned */
} kvdex_npy;

/* Reads `path`. Errors: KVDEX_EIO (open/read), KVDEX_EINVAL (not .npy, Fortran
 * order, big-endian or another dtype, truncated data), KVDEX_ENOMEM. */
int kvdex_npy_read(const char *path, kvdex_npy *out /* OUT */);
/* Writes `count` elements of `data` with the given shape; dtype f32 or f16. */
int kvdex_npy_write(const char *path, int dtype, int ndim, const uint64_t *shape,
                    const void *data);
void kvdex_npy_free(kvdex_npy *a); /* frees data; NULL ok */

/* Converts a loaded array to a newly malloc'ed f32 buffer (caller frees). */
float *kvdex_npy_to_f32(const kvdex_npy *a);

#endif /* KVDEX_NPY_H */
