/* gpu argument checks and workspace sizes: the host-side half of every kvdex_gpu_X and
 * kvdex_twin_X call, so that kernel and twin accept and refuse exactly the same
 * arguments. Checks values visible on the host only; the twin additionally checks the
 * contents of the arrays it reads (twin.c).
 */
#include <math.h>
#include <stdint.h>

#include "gpu/gpu_int.h"

#define FAIL(rc, ...) kvdex__seterr((rc), __VA_ARGS__)

static int check_dtype(const char *fn, int dtype) {
  if (dtype == KVDEX_DTYPE_F16 || dtype == KVDEX_DTYPE_BF16) return 0;
  if (dtype == KVDEX_DTYPE_F32)
    return FAIL(KVDEX_EUNIMPL, "%s: dtype f32 is not supported (f16 or bf16)", fn);
  return FAIL(KVDEX_EINVAL, "%s: unknown dtype %d", fn, dtype);
}

static int resolve_scale(const char *fn, float *scale, uint32_t head_dim) {
  if (*scale == 0.0f) {
    *scale = (float)(1.0 / sqrt((double)head_dim));
    return 0;
  }
  if (!isfinite(*scale)) return FAIL(KVDEX_EINVAL, "%s: scale is not finite", fn);
  return 0;
}

int kvdex__check_pages(const char *fn, const kvdex_gpu_kv_pages *kv, uint32_t max_dim) {
  if (!kv) return FAIL(KVDEX_EINVAL, "%s: kv is NULL", fn);
  int rc = check_dtype(fn, kv->dtype);
  if (rc) return rc;
  if (kv->head_dim < 16 || kv->head_dim % 16 || kv->head_dim > max_dim)
    return FAIL(KVDEX_EINVAL, "%s: head_dim %u must be a multiple of 16 in [16, %u]", fn,
                kv->head_dim, max_dim);
  if (kv->n_kv_heads == 0) return FAIL(KVDEX_EINVAL, "%s: n_kv_heads is 0", fn);
  if (kv->block_tokens == 0) return FAIL(KVDEX_EINVAL, "%s: block_tokens is 0", fn);
  if (!kv->k || !kv->v || !kv->block_table)
    return FAIL(KVDEX_EINVAL, "%s: kv pool or block table is NULL", fn);
  if (((uintptr_t)kv->k | (uintptr_t)kv->v) & 15)
    return FAIL(KVDEX_EINVAL, "%s: kv pools must be 16-byte aligned", fn);
  if (kv->block_stride % 8 || kv->head_stride % 8)
    return FAIL(KVDEX_EINVAL, "%s: block_stride and head_stride must be multiples of 8", fn);
  if (kv->max_blocks == 0) return FAIL(KVDEX_EINVAL, "%s: max_blocks is 0", fn);
  if (kv->block_stride > (uint64_t)INT64_MAX / 4 / (kv->n_pool_blocks + 1ull))
    return FAIL(KVDEX_EINVAL, "%s: pool too large", fn);
  return 0;
}

int kvdex__check_workspace(const char *fn, const void *ws, size_t have, size_t need) {
  if (have < need)
    return FAIL(KVDEX_EINVAL, "%s: workspace of %zu bytes, %zu needed", fn, have, need);
  if (need && !ws) return FAIL(KVDEX_EINVAL, "%s: workspace is NULL", fn);
  return 0;
}

int kvdex__check_sparse_decode(const char *fn, uint32_t batch, uint32_t n_q_heads,
                               const float *q, const kvdex_gpu_kv_pages *kv,
                               const kvdex_gpu_token_sel *sel, float *scale, const float *o) {
  int rc = kvdex__check_pages(fn, kv, KVDEX__DEC_DMAX);
  if (rc) return rc;
  if (batch == 0 || n_q_heads == 0)
    return FAIL(KVDEX_EINVAL, "%s: batch and n_q_heads must be >= 1", fn);
  if (n_q_heads % kv->n_kv_heads)
    return FAIL(KVDEX_EINVAL, "%s: n_q_heads %u is not a multiple of n_kv_heads %u", fn,
                n_q_heads, kv->n_kv_heads);
  if (!q || !o) return FAIL(KVDEX_EINVAL, "%s: q or o is NULL", fn);
  if (!sel || !sel->seq_lens) return FAIL(KVDEX_EINVAL, "%s: sel or seq_lens is NULL", fn);
  if (sel->sel_cap && (!sel->sel || !sel->n_sel))
    return FAIL(KVDEX_EINVAL, "%s: sel_cap %u but sel or n_sel is NULL", fn, sel->sel_cap);
  if ((uint64_t)sel->n_sink + sel->n_recent + sel->sel_cap > (uint64_t)INT32_MAX)
    return FAIL(KVDEX_EINVAL, "%s: n_sink + n_recent + sel_cap too large", fn);
  return resolve_scale(fn, scale, kv->head_dim);
}

int kvdex__check_s2_decode(const char *fn, const kvdex_s2_params *p, uint32_t batch,
                           const float *q, const kvdex_gpu_kv_pages *kv,
                           const int32_t *seq_lens, uint32_t max_seq_len, float *scale,
                           const float *o) {
  int rc = kvdex_s2_check(p);
  if (rc) return kvdex__preerr(rc, fn);
  rc = kvdex__check_pages(fn, kv, KVDEX__DEC_DMAX);
  if (rc) return rc;
  if (batch == 0) return FAIL(KVDEX_EINVAL, "%s: batch is 0", fn);
  if (p->n_heads % kv->n_kv_heads)
    return FAIL(KVDEX_EINVAL, "%s: n_heads %u is not a multiple of n_kv_heads %u", fn,
                p->n_heads, kv->n_kv_heads);
  if (!q || !o || !seq_lens) return FAIL(KVDEX_EINVAL, "%s: q, o or seq_lens is NULL", fn);
  if (max_seq_len > (uint32_t)INT32_MAX)
    return FAIL(KVDEX_EINVAL, "%s: max_seq_len too large", fn);
  return resolve_scale(fn, scale, kv->head_dim);
}

int kvdex__check_s2_prefill(const char *fn, const kvdex_s2_params *p, uint32_t n_kv_heads,
                            uint32_t seq_len, uint32_t head_dim, int dtype, const void *q,
                            const void *k, const void *v, const int32_t *row_ptr,
                            const int32_t *col, float *scale, const void *o) {
  int rc = kvdex_s2_check(p);
  if (rc) return kvdex__preerr(rc, fn);
  if ((rc = check_dtype(fn, dtype))) return rc;
  if (p->block % KVDEX__PRE_TILE)
    return FAIL(KVDEX_EUNIMPL, "%s: block %u is not a multiple of %d", fn, p->block,
                KVDEX__PRE_TILE);
  if (head_dim == 0 || head_dim % 32 || head_dim > KVDEX__PRE_DMAX)
    return FAIL(KVDEX_EUNIMPL, "%s: head_dim %u is not one of 32, 64, 96, 128", fn, head_dim);
  if (n_kv_heads == 0 || p->n_heads % n_kv_heads)
    return FAIL(KVDEX_EINVAL, "%s: n_heads %u is not a multiple of n_kv_heads %u", fn,
                p->n_heads, n_kv_heads);
  if (seq_len > (uint32_t)INT32_MAX - 2 * KVDEX__PRE_TILE)
    return FAIL(KVDEX_EINVAL, "%s: seq_len too large", fn);
  if (seq_len && (!q || !k || !v || !o || !row_ptr || !col))
    return FAIL(KVDEX_EINVAL, "%s: q, k, v, o, row_ptr or col is NULL", fn);
  if (((uintptr_t)q | (uintptr_t)k | (uintptr_t)v | (uintptr_t)o) & 15)
    return FAIL(KVDEX_EINVAL, "%s: q, k, v and o must be 16-byte aligned", fn);
  return resolve_scale(fn, scale, head_dim);
}

int kvdex__check_merge(const char *fn, uint32_t n_parts, uint32_t n_rows, uint32_t head_dim,
                       const float *o_parts, const float *lse_parts, const float *o,
                       const float *lse) {
  if (head_dim == 0) return FAIL(KVDEX_EINVAL, "%s: head_dim is 0", fn);
  if (n_rows == 0) return 0;
  if (!o || !lse) return FAIL(KVDEX_EINVAL, "%s: o or lse is NULL", fn);
  if (n_parts && (!o_parts || !lse_parts))
    return FAIL(KVDEX_EINVAL, "%s: o_parts or lse_parts is NULL", fn);
  return 0;
}

int kvdex__check_topk(const char *fn, uint32_t batch, uint32_t n_q_heads, uint32_t n_kv_heads,
                      uint32_t head_dim, const float *q, const float *reps, uint32_t rep_cap,
                      const int32_t *n_reps, uint32_t k, const int32_t *top_idx) {
  if (batch == 0 || n_q_heads == 0 || n_kv_heads == 0 || head_dim == 0)
    return FAIL(KVDEX_EINVAL, "%s: batch, heads and head_dim must be >= 1", fn);
  if (n_q_heads % n_kv_heads)
    return FAIL(KVDEX_EINVAL, "%s: n_q_heads %u is not a multiple of n_kv_heads %u", fn,
                n_q_heads, n_kv_heads);
  if (k == 0 || k > KVDEX__TOPK_MAX)
    return FAIL(KVDEX_EINVAL, "%s: k %u not in [1, %d]", fn, k, KVDEX__TOPK_MAX);
  if (rep_cap == 0) return FAIL(KVDEX_EINVAL, "%s: rep_cap is 0", fn);
  if ((uint64_t)rep_cap * head_dim > (uint64_t)INT32_MAX ||
      (uint64_t)rep_cap * (n_q_heads / n_kv_heads) > (uint64_t)INT32_MAX)
    return FAIL(KVDEX_EINVAL, "%s: rep_cap too large", fn);
  if (!q || !reps || !n_reps || !top_idx)
    return FAIL(KVDEX_EINVAL, "%s: q, reps, n_reps or top_idx is NULL", fn);
  return 0;
}

/* ---- workspace sizes ---- */

uint32_t kvdex__sparse_splits(const kvdex_gpu_token_sel *sel) {
  uint64_t max_tok = (uint64_t)sel->n_sink + sel->n_recent + sel->sel_cap;
  uint64_t s = (max_tok + KVDEX__DEC_CHUNK - 1) / KVDEX__DEC_CHUNK;
  return s ? (uint32_t)s : 1;
}

uint32_t kvdex__s2_splits(const kvdex_s2_params *p, uint32_t max_seq_len) {
  /* Longest list over L <= max_seq_len: local blocks plus the vertical ones below. */
  uint64_t nb = ((uint64_t)max_seq_len + p->block - 1) / p->block;
  uint64_t blocks = p->local_blocks + nb / p->vert_stride + 1;
  if (blocks > nb) blocks = nb;
  uint64_t max_tok = blocks * p->block;
  if (max_tok > max_seq_len) max_tok = max_seq_len;
  uint64_t s = (max_tok + KVDEX__DEC_CHUNK - 1) / KVDEX__DEC_CHUNK;
  return s ? (uint32_t)s : 1;
}

static size_t decode_ws(uint64_t rows, uint32_t splits, uint32_t head_dim) {
  return (size_t)(rows * splits * ((uint64_t)head_dim + 1) * sizeof(float));
}

size_t kvdex_gpu_sparse_decode_workspace(uint32_t batch, uint32_t n_q_heads,
                                         uint32_t head_dim, const kvdex_gpu_token_sel *sel) {
  if (!sel) return 0;
  return decode_ws((uint64_t)batch * n_q_heads, kvdex__sparse_splits(sel), head_dim);
}

size_t kvdex_gpu_s2_decode_workspace(const kvdex_s2_params *p, uint32_t batch,
                                     uint32_t head_dim, uint32_t max_seq_len) {
  if (!p || kvdex_s2_check(p)) return 0;
  return decode_ws((uint64_t)batch * p->n_heads, kvdex__s2_splits(p, max_seq_len), head_dim);
}

size_t kvdex_gpu_block_topk_workspace(uint32_t batch, uint32_t n_q_heads, uint32_t rep_cap) {
  return (size_t)((uint64_t)batch * n_q_heads * rep_cap * sizeof(float));
}
