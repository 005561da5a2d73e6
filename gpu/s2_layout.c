/* S2-Attention layout (the DKernel pattern, see gpu.h): the formula, the per-head CSR
 * of active key blocks for the prefill kernel, the union coverage over heads, and the
 * "which KV blocks may a (kv) head still need" rule the store can use to skip
 * shipping the rest. Host code only, no GPU.
 */
#include <stdint.h>

#include "gpu/gpu_int.h"

int kvdex_s2_check(const kvdex_s2_params *p) {
  if (!p) return kvdex__seterr(KVDEX_EINVAL, "s2: params are NULL");
  if (p->n_heads == 0) return kvdex__seterr(KVDEX_EINVAL, "s2: n_heads is 0");
  if (p->block == 0) return kvdex__seterr(KVDEX_EINVAL, "s2: block is 0");
  if (p->local_blocks == 0) return kvdex__seterr(KVDEX_EINVAL, "s2: local_blocks is 0");
  if (p->vert_stride == 0) return kvdex__seterr(KVDEX_EINVAL, "s2: vert_stride is 0");
  return 0;
}

static int vertical(const kvdex_s2_params *p, uint32_t step, uint32_t h, uint32_t j) {
  return ((uint64_t)j + (uint64_t)h * step + p->offset) % p->vert_stride == 0;
}

int kvdex_s2_active(const kvdex_s2_params *p, uint32_t h, uint32_t i, uint32_t j) {
  if (j > i) return 0;
  if (i - j < p->local_blocks) return 1;
  return vertical(p, kvdex__s2_step(p->n_heads, p->vert_stride), h, j);
}

/* Active key blocks of query block i for residue r: local min(local, i + 1), plus the
 * j < lo = i - local + 1 with j % vs == r. */
static uint64_t row_count(const kvdex_s2_params *p, int64_t r, uint32_t i) {
  int64_t lo = (int64_t)i - p->local_blocks + 1;
  uint64_t n = lo > 0 ? p->local_blocks : (uint64_t)i + 1;
  if (lo > r) n += (uint64_t)((lo - 1 - r) / p->vert_stride) + 1;
  return n;
}

int kvdex_s2_layout_nnz(const kvdex_s2_params *p, uint32_t n_blocks, uint64_t *nnz) {
  int rc = kvdex_s2_check(p);
  if (rc) return rc;
  if (!nnz) return kvdex__seterr(KVDEX_EINVAL, "s2: nnz is NULL");
  uint32_t step = kvdex__s2_step(p->n_heads, p->vert_stride);
  uint64_t total = 0;
  for (uint32_t h = 0; h < p->n_heads; h++) {
    int64_t r = kvdex__s2_residue(h, step, p->offset, p->vert_stride);
    for (uint32_t i = 0; i < n_blocks; i++) total += row_count(p, r, i);
  }
  *nnz = total;
  return 0;
}

int kvdex_s2_layout_build(const kvdex_s2_params *p, uint32_t n_blocks, int32_t *row_ptr,
                          int32_t *col, uint64_t nnz_cap) {
  uint64_t nnz;
  int rc = kvdex_s2_layout_nnz(p, n_blocks, &nnz);
  if (rc) return rc;
  if (nnz > nnz_cap)
    return kvdex__seterr(KVDEX_EINVAL, "s2: layout has %llu non-zeros, room for %llu",
                         (unsigned long long)nnz, (unsigned long long)nnz_cap);
  if (nnz > INT32_MAX || (uint64_t)p->n_heads * n_blocks >= INT32_MAX)
    return kvdex__seterr(KVDEX_EINVAL, "s2: layout too large for int32 indices");
  if (!row_ptr || (nnz && !col)) return kvdex__seterr(KVDEX_EINVAL, "s2: row_ptr or col is NULL");
  uint32_t step = kvdex__s2_step(p->n_heads, p->vert_stride);
  int64_t at = 0;
  for (uint32_t h = 0; h < p->n_heads; h++) {
    int64_t r = kvdex__s2_residue(h, step, p->offset, p->vert_stride);
    for (uint32_t i = 0; i < n_blocks; i++) {
      row_ptr[(uint64_t)h * n_blocks + i] = (int32_t)at;
      int64_t lo = (int64_t)i - p->local_blocks + 1;
      if (lo < 0) lo = 0;
      for (int64_t j = r; j < lo; j += p->vert_stride) col[at++] = (int32_t)j;
      for (int64_t j = lo; j <= i; j++) col[at++] = (int32_t)j;
    }
  }
  row_ptr[(uint64_t)p->n_heads * n_blocks] = (int32_t)at;
  return 0;
}

int kvdex_s2_coverage(const kvdex_s2_params *p, uint32_t n_blocks, uint64_t *covered,
                      uint64_t *total) {
  int rc = kvdex_s2_check(p);
  if (rc) return rc;
  if (!covered || !total) return kvdex__seterr(KVDEX_EINVAL, "s2: covered or total is NULL");
  uint32_t step = kvdex__s2_step(p->n_heads, p->vert_stride);
  /* Residues some head covers; a head's residue depends on h only modulo vs. */
  uint32_t vs = p->vert_stride;
  uint32_t n_res = p->n_heads < vs ? p->n_heads : vs;
  uint64_t cov = 0;
  for (uint32_t j = 0; j < n_blocks; j++) {
    uint64_t below = (uint64_t)n_blocks - j; /* pairs (i, j) with j <= i < n_blocks */
    int any = 0;
    for (uint32_t h = 0; h < p->n_heads && !any; h++) {
      if (h >= n_res && step == 1) break; /* heads repeat residues every vs heads */
      any = vertical(p, step, h, j);
    }
    cov += any ? below : (below < p->local_blocks ? below : p->local_blocks);
  }
  *covered = cov;
  *total = (uint64_t)n_blocks * ((uint64_t)n_blocks + 1) / 2;
  return 0;
}

int kvdex_s2_kv_needed(const kvdex_s2_params *p, uint32_t group, uint32_t kv_head, uint32_t j,
                       uint32_t cur_qblock) {
  if (j > cur_qblock || cur_qblock - j < p->local_blocks) return 1;
  uint32_t step = kvdex__s2_step(p->n_heads, p->vert_stride);
  for (uint32_t g = 0; g < group; g++)
    if (vertical(p, step, kv_head * group + g, j)) return 1;
  return 0;
}
