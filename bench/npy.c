/* npy: the .npy container — magic, version, a Python-dict header, raw data. */
#include "bench/npy.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char MAGIC[] = "\x93NUMPY";

/* Finds the value text after 'key': in the header dict. */
static const char *dict_value(const char *hdr, const char *key) {
  char pat[32];
  snprintf(pat, sizeof pat, "'%s'", key);
  const char *p = strstr(hdr, pat);
  if (!p) return NULL;
  p += strlen(pat);
  while (*p == ' ') p++;
  if (*p != ':') return NULL;
  p++;
  while (*p == ' ') p++;
  return p;
}

static int parse_header(const char *path, const char *hdr, kvdex_npy *out) {
  const char *d = dict_value(hdr, "descr"), *f = dict_value(hdr, "fortran_order"),
             *s = dict_value(hdr, "shape");
  if (!d || !f || !s) return kvdex__seterr(KVDEX_EINVAL, "%s: malformed .npy header", path);
  if (!strncmp(d, "'<f4'", 5)) out->dtype = KVDEX_DTYPE_F32;
  else if (!strncmp(d, "'<f2'", 5)) out->dtype = KVDEX_DTYPE_F16;
  else
    return kvdex__seterr(KVDEX_EINVAL,
                         "%s: dtype %.8s is not supported (need little-endian float32 '<f4' "
                         "or float16 '<f2')",
                         path, d);
  if (strncmp(f, "False", 5))
    return kvdex__seterr(KVDEX_EINVAL, "%s: Fortran-ordered arrays are not supported "
                                       "(save with np.ascontiguousarray)", path);
  if (*s != '(') return kvdex__seterr(KVDEX_EINVAL, "%s: malformed shape in header", path);
  s++;
  out->ndim = 0;
  out->count = 1;
  for (;;) {
    while (*s == ' ' || *s == ',') s++;
    if (*s == ')') break;
    if (!isdigit((unsigned char)*s)) return kvdex__seterr(KVDEX_EINVAL, "%s: malformed shape", path);
    if (out->ndim == KVDEX_NPY_MAX_DIMS)
      return kvdex__seterr(KVDEX_EINVAL, "%s: more than %d dimensions", path, KVDEX_NPY_MAX_DIMS);
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno) return kvdex__seterr(KVDEX_EINVAL, "%s: shape out of range", path);
    out->shape[out->ndim++] = v;
    if (v && out->count > UINT64_MAX / v)
      return kvdex__seterr(KVDEX_EINVAL, "%s: shape too large", path);
    out->count *= v;
    s = end;
  }
  return 0;
}

int kvdex_npy_read(const char *path, kvdex_npy *out) {
  memset(out, 0, sizeof *out);
  FILE *fp = fopen(path, "rb");
  if (!fp) return kvdex__seterr(KVDEX_EIO, "%s: %s", path, strerror(errno));
  unsigned char pre[10];
  char *hdr = NULL;
  int rc = 0;
  if (fread(pre, 1, 8, fp) != 8 || memcmp(pre, MAGIC, 6)) {
    rc = kvdex__seterr(KVDEX_EINVAL, "%s: not a .npy file (bad magic)", path);
    goto out;
  }
  uint32_t hlen;
  if (pre[6] == 1) {
    unsigned char b[2];
    if (fread(b, 1, 2, fp) != 2) goto trunc;
    hlen = b[0] | (uint32_t)b[1] << 8;
  } else if (pre[6] == 2 || pre[6] == 3) {
    unsigned char b[4];
    if (fread(b, 1, 4, fp) != 4) goto trunc;
    hlen = b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
    if (hlen > (1u << 24)) {
      rc = kvdex__seterr(KVDEX_EINVAL, "%s: header of %u bytes is implausible", path, hlen);
      goto out;
    }
  } else {
    rc = kvdex__seterr(KVDEX_EINVAL, "%s: .npy version %d is not supported", path, pre[6]);
    goto out;
  }
  hdr = malloc(hlen + 1);
  if (!hdr) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "%s: out of memory", path);
    goto out;
  }
  if (fread(hdr, 1, hlen, fp) != hlen) goto trunc;
  hdr[hlen] = 0;
  if ((rc = parse_header(path, hdr, out))) goto out;
  size_t es = kvdex_dtype_size(out->dtype);
  if (out->count > SIZE_MAX / es) {
    rc = kvdex__seterr(KVDEX_EINVAL, "%s: array too large", path);
    goto out;
  }
  size_t bytes = (size_t)out->count * es;
  out->data = malloc(bytes ? bytes : 1);
  if (!out->data) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "%s: cannot allocate %zu bytes", path, bytes);
    goto out;
  }
  if (fread(out->data, 1, bytes, fp) != bytes) goto trunc;
  goto out;
trunc:
  rc = kvdex__seterr(KVDEX_EINVAL, "%s: file is truncated", path);
out:
  free(hdr);
  fclose(fp);
  if (rc) kvdex_npy_free(out);
  return rc;
}

int kvdex_npy_write(const char *path, int dtype, int ndim, const uint64_t *shape, const void *data) {
  if (dtype != KVDEX_DTYPE_F32 && dtype != KVDEX_DTYPE_F16)
    return kvdex__seterr(KVDEX_EINVAL, "npy: only f32 and f16 can be written");
  if (ndim < 1 || ndim > KVDEX_NPY_MAX_DIMS)
    return kvdex__seterr(KVDEX_EINVAL, "npy: %d dimensions", ndim);
  char dict[512];
  int n = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': (",
                   dtype == KVDEX_DTYPE_F32 ? "<f4" : "<f2");
  uint64_t count = 1;
  for (int i = 0; i < ndim; i++) {
    n += snprintf(dict + n, sizeof dict - n, "%llu,%s", (unsigned long long)shape[i],
                  i + 1 < ndim ? " " : "");
    count *= shape[i];
  }
  if (ndim > 1) n--; /* (a, b) not (a, b,) — a 1-d shape keeps its comma */
  n += snprintf(dict + n, sizeof dict - n, "), }");
  /* Pad so that magic + 2 + 2 + header is a multiple of 64, ending in '\n'. */
  size_t total = 10 + (size_t)n + 1;
  size_t pad = (64 - total % 64) % 64;
  FILE *fp = fopen(path, "wb");
  if (!fp) return kvdex__seterr(KVDEX_EIO, "%s: %s", path, strerror(errno));
  uint16_t hlen = (uint16_t)(n + pad + 1);
  unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(hlen & 0xff),
                           (unsigned char)(hlen >> 8)};
  size_t bytes = (size_t)count * kvdex_dtype_size(dtype);
  int ok = fwrite(pre, 1, 10, fp) == 10 && fwrite(dict, 1, (size_t)n, fp) == (size_t)n;
  for (size_t i = 0; ok && i < pad; i++) ok = fputc(' ', fp) != EOF;
  ok = ok && fputc('\n', fp) != EOF && fwrite(data, 1, bytes, fp) == bytes;
  if (fclose(fp) || !ok) {
    remove(path);
    return kvdex__seterr(KVDEX_EIO, "%s: write failed", path);
  }
  return 0;
}

void kvdex_npy_free(kvdex_npy *a) {
  if (!a) return;
  free(a->data);
  a->data = NULL;
}

float *kvdex_npy_to_f32(const kvdex_npy *a) {
  float *f = malloc((size_t)(a->count ? a->count : 1) * sizeof(float));
  if (!f) {
    kvdex__seterr(KVDEX_ENOMEM, "npy: out of memory");
    return NULL;
  }
  kvdex__to_f32(a->dtype, a->data, f, (size_t)a->count);
  return f;
}
