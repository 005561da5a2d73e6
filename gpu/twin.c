/* CPU twins of the gpu kernels: plain C, double-precision softmax, the same arguments
 * as kvdex_gpu_X minus workspace and stream, host pointers. They are the reference
 * the kernels are tested against, so they favour the obvious loop over speed, and
 * they check the contents of every array they read (block tables, lengths, CSR)
 * before writing any output: a failed call writes nothing.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/gpu_int.h"

static float load_elem(int dtype, const void *base, int64_t i) {
  uint16_t h = ((const uint16_t *)base)[i];
  return dtype == KVDEX_DTYPE_BF16 ? kvdex__bf16_to_f32(h) : kvdex__f16_to_f32(h);
}

static void store_elem(int dtype, void *base, int64_t i, float f) {
  ((uint16_t *)base)[i] = dtype == KVDEX_DTYPE_BF16 ? kvdex__f32_to_bf16(f) : kvdex__f32_to_f16(f);
}

/* Attention of one f32 query over n rows (element offsets into kv->k / kv->v).
 * Writes o[head_dim] and *lse (if lse). */
static void attend_rows(const kvdex_gpu_kv_pages *kv, const float *q, const int64_t *rows,
                        int64_t n, float scale, double *s, double *acc, float *o, float *lse) {
  uint32_t d = kv->head_dim;
  double m = -INFINITY;
  for (int64_t t = 0; t < n; t++) {
    double dot = 0;
    for (uint32_t c = 0; c < d; c++) dot += (double)q[c] * load_elem(kv->dtype, kv->k, rows[t] + c);
    s[t] = dot * scale;
    if (s[t] > m) m = s[t];
  }
  for (uint32_t c = 0; c < d; c++) acc[c] = 0;
  if (n == 0) {
    for (uint32_t c = 0; c < d; c++) o[c] = 0;
    if (lse) *lse = -INFINITY;
    return;
  }
  double l = 0;
  for (int64_t t = 0; t < n; t++) {
    double w = exp(s[t] - m);
    l += w;
    for (uint32_t c = 0; c < d; c++) acc[c] += w * load_elem(kv->dtype, kv->v, rows[t] + c);
  }
  for (uint32_t c = 0; c < d; c++) o[c] = (float)(acc[c] / l);
  if (lse) *lse = (float)(m + log(l));
}

/* Row offset of token t for (b, h), or -1 with an error if the table is bad. */
static int64_t row_of(const char *fn, const kvdex_gpu_kv_pages *kv, uint32_t b, uint32_t h,
                      int64_t t, int *rc) {
  int64_t lb = t / kv->block_tokens;
  int32_t phys = kv->block_table[(uint64_t)b * kv->bt_batch_stride +
                                 (uint64_t)h * kv->bt_head_stride + (uint64_t)lb];
  if (phys < 0 || (uint32_t)phys >= kv->n_pool_blocks) {
    *rc = kvdex__seterr(KVDEX_EINVAL, "%s: block_table entry %d (batch %u, head %u, block %lld) "
                        "outside the pool of %u blocks", fn, phys, b, h, (long long)lb,
                        kv->n_pool_blocks);
    return -1;
  }
  return kvdex__row_offset(kv, phys, h, t);
}

static int check_lens(const char *fn, const kvdex_gpu_kv_pages *kv, uint32_t batch,
                      const int32_t *seq_lens, uint64_t max_len) {
  uint64_t cap = (uint64_t)kv->max_blocks * kv->block_tokens;
  for (uint32_t b = 0; b < batch; b++)
    if (seq_lens[b] < 0 || (uint64_t)seq_lens[b] > cap || (uint64_t)seq_lens[b] > max_len)
      return kvdex__seterr(KVDEX_EINVAL, "%s: seq_lens[%u] = %d outside [0, %llu]", fn, b,
                           seq_lens[b], (unsigned long long)(cap < max_len ? cap : max_len));
  return 0;
}

/* Decode over per-(b, head) token lists: `list_rows` fills rows[] for one (b, list
 * index) and returns the count, or -1 on a bad table. Lists are per kv head (group
 * heads share them) or per query head (S2). */
typedef int64_t (*list_fn)(const void *ctx, const char *fn, const kvdex_gpu_kv_pages *kv,
                           uint32_t b, uint32_t qh, int64_t *rows, int *rc);

static int decode_common(const char *fn, uint32_t batch, uint32_t n_q_heads, const float *q,
                         const kvdex_gpu_kv_pages *kv, int64_t max_list, float scale,
                         float *o, float *lse, list_fn list, const void *ctx,
                         int per_query_head) {
  uint32_t d = kv->head_dim, group = n_q_heads / kv->n_kv_heads;
  int64_t *rows = malloc(((size_t)max_list + 1) * sizeof *rows);
  double *s = malloc(((size_t)max_list + 1) * sizeof *s);
  double *acc = malloc(d * sizeof *acc);
  if (!rows || !s || !acc) {
    free(rows), free(s), free(acc);
    return kvdex__seterr(KVDEX_ENOMEM, "%s: out of host memory", fn);
  }
  int rc = 0;
  /* Pass 1 checks every table entry; pass 2 computes. */
  for (int pass = 0; pass < 2 && !rc; pass++)
    for (uint32_t b = 0; b < batch && !rc; b++)
      for (uint32_t qh = 0; qh < n_q_heads && !rc; qh += per_query_head ? 1 : group) {
        int64_t n = list(ctx, fn, kv, b, qh, rows, &rc);
        if (n < 0 || pass == 0) continue;
        uint32_t n_heads = per_query_head ? 1 : group;
        for (uint32_t g = 0; g < n_heads; g++) {
          uint64_t r = (uint64_t)b * n_q_heads + qh + g;
          attend_rows(kv, q + r * d, rows, n, scale, s, acc, o + r * d, lse ? lse + r : NULL);
        }
      }
  free(rows), free(s), free(acc);
  return rc;
}

typedef struct sparse_ctx {
  const kvdex_gpu_token_sel *sel;
  uint32_t group;
} sparse_ctx;

static int64_t sparse_list(const void *vctx, const char *fn, const kvdex_gpu_kv_pages *kv,
                           uint32_t b, uint32_t qh, int64_t *rows, int *rc) {
  const sparse_ctx *c = vctx;
  const kvdex_gpu_token_sel *sel = c->sel;
  uint32_t h = qh / c->group;
  uint64_t bh = (uint64_t)b * kv->n_kv_heads + h;
  int64_t n_sel = sel->sel_cap ? sel->n_sel[bh] : 0;
  kvdex__sparse_list sl = kvdex__sparse_list_make(sel->seq_lens[b], sel->n_sink, sel->n_recent,
                                                  n_sel, sel->sel_cap);
  const int32_t *row = sel->sel_cap ? sel->sel + bh * sel->sel_cap : NULL;
  int64_t n = 0;
  for (int64_t v = 0; v < sl.len; v++) {
    int64_t t = kvdex__sparse_token(&sl, row, v);
    if (t < 0) continue;
    int64_t off = row_of(fn, kv, b, h, t, rc);
    if (off < 0) return -1;
    rows[n++] = off;
  }
  return n;
}

int kvdex_twin_sparse_decode(uint32_t batch, uint32_t n_q_heads, const float *q,
                             const kvdex_gpu_kv_pages *kv, const kvdex_gpu_token_sel *sel,
                             float scale, float *o, float *lse) {
  static const char fn[] = "twin_sparse_decode";
  int rc = kvdex__check_sparse_decode(fn, batch, n_q_heads, q, kv, sel, &scale, o);
  if (rc) return rc;
  if ((rc = check_lens(fn, kv, batch, sel->seq_lens, UINT64_MAX))) return rc;
  sparse_ctx ctx = {sel, n_q_heads / kv->n_kv_heads};
  int64_t max_list = (int64_t)sel->n_sink + sel->n_recent + sel->sel_cap;
  return decode_common(fn, batch, n_q_heads, q, kv, max_list, scale, o, lse, sparse_list, &ctx, 0);
}

typedef struct s2_ctx {
  const kvdex_s2_params *p;
  const int32_t *seq_lens;
  uint32_t group, step;
} s2_ctx;

static int64_t s2_list(const void *vctx, const char *fn, const kvdex_gpu_kv_pages *kv,
                       uint32_t b, uint32_t qh, int64_t *rows, int *rc) {
  const s2_ctx *c = vctx;
  const kvdex_s2_params *p = c->p;
  uint32_t h = qh / c->group;
  int64_t r = kvdex__s2_residue(qh, c->step, p->offset, p->vert_stride);
  kvdex__s2_list sl = kvdex__s2_list_make(c->seq_lens[b], p->block, p->local_blocks,
                                          p->vert_stride, r);
  for (int64_t v = 0; v < sl.len; v++) {
    int64_t off = row_of(fn, kv, b, h, kvdex__s2_token(&sl, v), rc);
    if (off < 0) return -1;
    rows[v] = off;
  }
  return sl.len;
}

int kvdex_twin_s2_decode(const kvdex_s2_params *p, uint32_t batch, const float *q,
                         const kvdex_gpu_kv_pages *kv, const int32_t *seq_lens,
                         uint32_t max_seq_len, float scale, float *o, float *lse) {
  static const char fn[] = "twin_s2_decode";
  int rc = kvdex__check_s2_decode(fn, p, batch, q, kv, seq_lens, max_seq_len, &scale, o);
  if (rc) return rc;
  if ((rc = check_lens(fn, kv, batch, seq_lens, max_seq_len))) return rc;
  s2_ctx ctx = {p, seq_lens, p->n_heads / kv->n_kv_heads,
                kvdex__s2_step(p->n_heads, p->vert_stride)};
  return decode_common(fn, batch, p->n_heads, q, kv, (int64_t)max_seq_len, scale, o, lse,
                       s2_list, &ctx, 1);
}

int kvdex_twin_lse_merge(uint32_t n_parts, uint32_t n_rows, uint32_t head_dim,
                         const float *o_parts, const float *lse_parts, float *o, float *lse) {
  int rc = kvdex__check_merge("twin_lse_merge", n_parts, n_rows, head_dim, o_parts, lse_parts,
                              o, lse);
  if (rc) return rc;
  for (uint32_t r = 0; r < n_rows; r++) {
    double m = -INFINITY;
    for (uint32_t i = 0; i < n_parts; i++) {
      double x = lse_parts[(uint64_t)i * n_rows + r];
      if (x > m) m = x;
    }
    float *out = o + (uint64_t)r * head_dim;
    if (m == -INFINITY) {
      for (uint32_t c = 0; c < head_dim; c++) out[c] = 0;
      lse[r] = -INFINITY;
      continue;
    }
    double den = 0;
    for (uint32_t i = 0; i < n_parts; i++) {
      double x = lse_parts[(uint64_t)i * n_rows + r];
      if (x != -INFINITY) den += exp(x - m);
    }
    for (uint32_t c = 0; c < head_dim; c++) {
      double num = 0;
      for (uint32_t i = 0; i < n_parts; i++) {
        double x = lse_parts[(uint64_t)i * n_rows + r];
        if (x != -INFINITY) num += exp(x - m) * o_parts[((uint64_t)i * n_rows + r) * head_dim + c];
      }
      out[c] = (float)(num / den);
    }
    lse[r] = (float)(m + log(den));
  }
  return 0;
}

int kvdex_twin_s2_prefill(const kvdex_s2_params *p, uint32_t n_kv_heads, uint32_t seq_len,
                          uint32_t head_dim, int dtype, const void *q, const void *k,
                          const void *v, const int32_t *row_ptr, const int32_t *col,
                          float scale, void *o, float *lse) {
  static const char fn[] = "twin_s2_prefill";
  int rc = kvdex__check_s2_prefill(fn, p, n_kv_heads, seq_len, head_dim, dtype, q, k, v, row_ptr,
                                   col, &scale, o);
  if (rc || seq_len == 0) return rc;
  uint32_t nb = (seq_len + p->block - 1) / p->block, d = head_dim;
  uint64_t n_rows = (uint64_t)p->n_heads * nb;
  for (uint64_t r = 0; r < n_rows; r++) {
    int32_t a = row_ptr[r], e = row_ptr[r + 1];
    if (a < 0 || e < a)
      return kvdex__seterr(KVDEX_EINVAL, "%s: row_ptr not ascending at row %llu", fn,
                           (unsigned long long)r);
    for (int32_t x = a; x < e; x++)
      if (col[x] < 0 || (uint32_t)col[x] > r % nb)
        return kvdex__seterr(KVDEX_EINVAL, "%s: col[%d] = %d outside [0, %u]", fn, x, col[x],
                             (unsigned)(r % nb));
  }
  uint32_t group = p->n_heads / n_kv_heads;
  double *s = malloc((size_t)seq_len * sizeof *s), *acc = malloc(d * sizeof *acc);
  float *qf = malloc(d * sizeof *qf);
  if (!s || !acc || !qf) {
    free(s), free(acc), free(qf);
    return kvdex__seterr(KVDEX_ENOMEM, "%s: out of host memory", fn);
  }
  for (uint32_t h = 0; h < p->n_heads; h++) {
    uint64_t kvh = h / group;
    for (uint32_t t = 0; t < seq_len; t++) {
      uint64_t qrow = ((uint64_t)h * seq_len + t) * d;
      for (uint32_t c = 0; c < d; c++) qf[c] = load_elem(dtype, q, qrow + c);
      uint64_t r = (uint64_t)h * nb + t / p->block;
      double m = -INFINITY;
      int64_t n = 0;
      for (int32_t x = row_ptr[r]; x < row_ptr[r + 1]; x++)
        for (uint64_t key = (uint64_t)col[x] * p->block;
             key < ((uint64_t)col[x] + 1) * p->block && key <= t; key++) {
          uint64_t krow = (kvh * seq_len + key) * d;
          double dot = 0;
          for (uint32_t c = 0; c < d; c++) dot += (double)qf[c] * load_elem(dtype, k, krow + c);
          s[n] = dot * scale;
          if (s[n] > m) m = s[n];
          n++;
        }
      for (uint32_t c = 0; c < d; c++) acc[c] = 0;
      double l = 0;
      n = 0;
      for (int32_t x = row_ptr[r]; x < row_ptr[r + 1]; x++)
        for (uint64_t key = (uint64_t)col[x] * p->block;
             key < ((uint64_t)col[x] + 1) * p->block && key <= t; key++) {
          double w = exp(s[n++] - m);
          l += w;
          uint64_t vrow = (kvh * seq_len + key) * d;
          for (uint32_t c = 0; c < d; c++) acc[c] += w * load_elem(dtype, v, vrow + c);
        }
      for (uint32_t c = 0; c < d; c++) store_elem(dtype, o, qrow + c, l > 0 ? (float)(acc[c] / l) : 0.0f);
      if (lse) lse[(uint64_t)h * seq_len + t] = l > 0 ? (float)(m + log(l)) : -INFINITY;
    }
  }
  free(s), free(acc), free(qf);
  return 0;
}

typedef struct scored {
  uint32_t key;
  int32_t idx;
  float val;
} scored;

static int scored_cmp(const void *a, const void *b) {
  const scored *x = a, *y = b;
  if (x->key != y->key) return x->key > y->key ? -1 : 1;
  return (x->idx > y->idx) - (x->idx < y->idx);
}

int kvdex_twin_block_topk(uint32_t batch, uint32_t n_q_heads, uint32_t n_kv_heads,
                          uint32_t head_dim, const float *q, const float *reps,
                          uint32_t rep_cap, const int32_t *n_reps, uint32_t k,
                          int32_t *top_idx, float *top_score) {
  int rc = kvdex__check_topk("twin_block_topk", batch, n_q_heads, n_kv_heads, head_dim, q, reps,
                             rep_cap, n_reps, k, top_idx);
  if (rc) return rc;
  scored *sc = malloc((size_t)rep_cap * sizeof *sc);
  if (!sc) return kvdex__seterr(KVDEX_ENOMEM, "twin_block_topk: out of host memory");
  uint32_t group = n_q_heads / n_kv_heads, d = head_dim;
  for (uint32_t b = 0; b < batch; b++) {
    int64_t n = n_reps[b] < 0 ? 0 : n_reps[b];
    if (n > (int64_t)rep_cap) n = rep_cap;
    for (uint32_t h = 0; h < n_kv_heads; h++) {
      uint64_t bh = (uint64_t)b * n_kv_heads + h;
      const float *rp = reps + bh * rep_cap * d;
      for (int64_t r = 0; r < n; r++) {
        float best = 0;
        for (uint32_t g = 0; g < group; g++) {
          const float *qq = q + ((uint64_t)b * n_q_heads + (uint64_t)h * group + g) * d;
          float dot = 0;
          for (uint32_t c = 0; c < d; c++) dot += qq[c] * rp[(uint64_t)r * d + c];
          /* NaN-aware max: NaN ranks lowest, so any number beats it. */
          if (g == 0 || kvdex__score_key(dot) > kvdex__score_key(best)) best = dot;
        }
        sc[r].key = kvdex__score_key(best);
        sc[r].idx = (int32_t)r;
        sc[r].val = best;
      }
      qsort(sc, (size_t)n, sizeof *sc, scored_cmp);
      for (uint32_t x = 0; x < k; x++) {
        top_idx[bh * k + x] = x < n ? sc[x].idx : -1;
        if (top_score) top_score[bh * k + x] = x < n ? sc[x].val : -INFINITY;
      }
    }
  }
  free(sc);
  return 0;
}
