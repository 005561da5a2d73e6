/* gpu internals shared by the twins (C) and the kernels' host and device code (CUDA):
 * the argument checks both sides run, the split-K sizing, and the token enumeration
 * of the two decode kernels (one inline definition compiled for host and device, so
 * the twin and the kernel attend the very same token lists). Private to gpu/.
 */
#ifndef KVDEX_GPU_INT_H
#define KVDEX_GPU_INT_H

#include "gpu/gpu.h"

#ifdef __cplusplus
extern "C" {
#endif

#ifdef __CUDACC__
#define KVDEX__HD static __host__ __device__ __forceinline__
#else
#define KVDEX__HD static inline
#endif

enum {
  KVDEX__DEC_CHUNK = 256,   /* tokens per split-K part (one thread block) */
  KVDEX__DEC_GMAX = 8,      /* query heads per decode thread block */
  KVDEX__DEC_DMAX = 256,    /* largest head_dim of the decode kernels */
  KVDEX__PRE_DMAX = 128,    /* largest head_dim of the prefill kernel */
  KVDEX__PRE_TILE = 64,     /* prefill query/key tile */
  KVDEX__TOPK_MAX = 1024,
};

/* Argument checks shared by kernel and twin (host-visible values only); each returns
 * 0 or KVDEX_EINVAL/EUNIMPL with a message naming fn. *scale is resolved (0 -> 1/sqrt d). */
int kvdex__check_pages(const char *fn, const kvdex_gpu_kv_pages *kv, uint32_t max_dim);
int kvdex__check_sparse_decode(const char *fn, uint32_t batch, uint32_t n_q_heads,
                               const float *q, const kvdex_gpu_kv_pages *kv,
                               const kvdex_gpu_token_sel *sel, float *scale, const float *o);
int kvdex__check_s2_decode(const char *fn, const kvdex_s2_params *p, uint32_t batch,
                           const float *q, const kvdex_gpu_kv_pages *kv,
                           const int32_t *seq_lens, uint32_t max_seq_len, float *scale,
                           const float *o);
int kvdex__check_s2_prefill(const char *fn, const kvdex_s2_params *p, uint32_t n_kv_heads,
                            uint32_t seq_len, uint32_t head_dim, int dtype, const void *q,
                            const void *k, const void *v, const int32_t *row_ptr,
                            const int32_t *col, float *scale, const void *o);
int kvdex__check_merge(const char *fn, uint32_t n_parts, uint32_t n_rows, uint32_t head_dim,
                       const float *o_parts, const float *lse_parts, const float *o,
                       const float *lse);
int kvdex__check_topk(const char *fn, uint32_t batch, uint32_t n_q_heads, uint32_t n_kv_heads,
                      uint32_t head_dim, const float *q, const float *reps, uint32_t rep_cap,
                      const int32_t *n_reps, uint32_t k, const int32_t *top_idx);
int kvdex__check_workspace(const char *fn, const void *ws, size_t have, size_t need);

/* Split-K parts of the two decode kernels (>= 1). */
uint32_t kvdex__sparse_splits(const kvdex_gpu_token_sel *sel);
uint32_t kvdex__s2_splits(const kvdex_s2_params *p, uint32_t max_seq_len);

/* ---- token enumeration, shared by host and device ---- */

/* Sparse decode, per (b, kv head): the static ranges [0, ns) and [rs, L), then the
 * n_sel selected slots. Slot v < ns + (L - rs) + n_sel. */
typedef struct kvdex__sparse_list {
  int64_t ns, rs, len, n_static;
} kvdex__sparse_list;

KVDEX__HD kvdex__sparse_list kvdex__sparse_list_make(int64_t L, uint32_t n_sink,
                                                      uint32_t n_recent, int64_t n_sel,
                                                      uint32_t sel_cap) {
  kvdex__sparse_list s;
  if (L < 0) L = 0;
  s.ns = (int64_t)n_sink < L ? (int64_t)n_sink : L;
  s.rs = L - (int64_t)n_recent;
  if (s.rs < s.ns) s.rs = s.ns;
  if (n_sel < 0) n_sel = 0;
  if (n_sel > (int64_t)sel_cap) n_sel = sel_cap;
  s.n_static = s.ns + (L - s.rs);
  s.len = s.n_static + n_sel;
  return s;
}

/* Token of slot v (< len); -1 for a selected id that is skipped. sel_row points at the
 * (b, h) row of sel. */
KVDEX__HD int64_t kvdex__sparse_token(const kvdex__sparse_list *s, const int32_t *sel_row,
                                      int64_t v) {
  if (v < s->ns) return v;
  if (v < s->n_static) return s->rs + (v - s->ns);
  int64_t t = sel_row[v - s->n_static];
  return (t >= s->ns && t < s->rs) ? t : -1;
}

/* S2 decode, per (b, query head h): the vertical blocks below the local window first
 * (j = r, r + vs, ... < lo), then the local blocks lo .. i; the last block may be
 * partial. Slot v < len. */
typedef struct kvdex__s2_list {
  int64_t block, lo, r, nv, vs, len;
} kvdex__s2_list;

KVDEX__HD uint32_t kvdex__s2_step(uint32_t n_heads, uint32_t vert_stride) {
  uint32_t s = vert_stride / n_heads;
  return s ? s : 1;
}

/* The residue r in [0, vs) with (r + h * step + offset) % vs == 0. */
KVDEX__HD int64_t kvdex__s2_residue(uint32_t h, uint32_t step, uint32_t offset, uint32_t vs) {
  uint64_t x = ((uint64_t)h * step + offset) % vs;
  return (int64_t)((vs - x) % vs);
}

KVDEX__HD kvdex__s2_list kvdex__s2_list_make(int64_t L, uint32_t block, uint32_t local,
                                              uint32_t vs, int64_t r) {
  kvdex__s2_list s;
  s.block = block;
  s.vs = vs;
  s.r = r;
  if (L <= 0) {
    s.lo = s.nv = s.len = 0;
    return s;
  }
  int64_t i = (L - 1) / block;
  s.lo = i - (int64_t)local + 1;
  if (s.lo < 0) s.lo = 0;
  s.nv = s.lo > r ? (s.lo - 1 - r) / vs + 1 : 0;
  s.len = (s.nv + (i - s.lo)) * (int64_t)block + (L - i * (int64_t)block);
  return s;
}

KVDEX__HD int64_t kvdex__s2_token(const kvdex__s2_list *s, int64_t v) {
  int64_t u = v / s->block, off = v - u * s->block;
  int64_t j = u < s->nv ? s->r + u * s->vs : s->lo + (u - s->nv);
  return j * s->block + off;
}

/* Order-preserving key of a score for top-k: larger float -> larger key; -0 equals +0;
 * NaN is the smallest key (0). */
KVDEX__HD uint32_t kvdex__score_key(float f) {
  uint32_t u;
  if (f != f) return 0;
  if (f == 0.0f) f = 0.0f;
  memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* Element offset of token t's row for (b, h), given its physical block. */
KVDEX__HD int64_t kvdex__row_offset(const kvdex_gpu_kv_pages *kv, int64_t phys, uint32_t h,
                                    int64_t t) {
  return phys * (int64_t)kv->block_stride + (int64_t)h * (int64_t)kv->head_stride +
         (t % kv->block_tokens) * (int64_t)kv->head_dim;
}

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_GPU_INT_H */
