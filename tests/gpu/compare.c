/* GPU kernel vs CPU twin comparisons (see compare.h). */
#include "tests/gpu/compare.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BUFS 16

/* Device buffers of one comparison, freed together. */
typedef struct dev_set {
  void *p[MAX_BUFS];
  int n;
} dev_set;

static void *dev_dup(dev_set *s, const void *host, size_t bytes, int *rc) {
  void *d = NULL;
  if (*rc) return NULL;
  if (s->n == MAX_BUFS || (*rc = kvdex_gpu_alloc(bytes, &d))) {
    if (!*rc) *rc = KVDEX_EINTERNAL;
    return NULL;
  }
  s->p[s->n++] = d;
  if (host && (*rc = kvdex_gpu_copy(d, host, bytes))) return NULL;
  return d;
}

static void dev_free(dev_set *s) {
  for (int i = 0; i < s->n; i++) kvdex_gpu_free(s->p[i]);
  s->n = 0;
}

static int fail(tc_result *r, int rc, const char *what) {
  snprintf(r->msg, sizeof r->msg, "%s: %s (%s)", what, kvdex_errmsg(), kvdex_errname(rc));
  return rc;
}

/* Device copy of a decode problem's pool and tables; *dkv / *dts get device pointers. */
static int decode_to_device(dev_set *s, const tp_decode *p, kvdex_gpu_kv_pages *dkv,
                            kvdex_gpu_token_sel *dts, float **dq) {
  const tp_decode_cfg *c = &p->cfg;
  int rc = 0;
  *dkv = p->kv;
  *dts = p->ts;
  dkv->k = dev_dup(s, p->k, p->pool_elems * 2, &rc);
  dkv->v = dev_dup(s, p->v, p->pool_elems * 2, &rc);
  dkv->block_table = dev_dup(s, p->bt, p->bt_len * sizeof(int32_t), &rc);
  dts->seq_lens = dev_dup(s, p->seq_lens, c->batch * sizeof(int32_t), &rc);
  if (c->sel_cap && p->sel) {
    dts->sel = dev_dup(s, p->sel, (size_t)c->batch * c->n_kv_heads * c->sel_cap * 4, &rc);
    dts->n_sel = dev_dup(s, p->n_sel, (size_t)c->batch * c->n_kv_heads * 4, &rc);
  }
  *dq = dev_dup(s, p->q, (size_t)c->batch * c->n_q_heads * c->head_dim * 4, &rc);
  return rc;
}

static int decode_compare(const tp_decode_cfg *c, uint64_t seed, tc_result *r, int s2) {
  memset(r, 0, sizeof *r);
  tp_decode p;
  if (tp_decode_make(&p, c, seed)) {
    snprintf(r->msg, sizeof r->msg, "out of host memory");
    return KVDEX_ENOMEM;
  }
  size_t rows = (size_t)c->batch * c->n_q_heads, od = rows * c->head_dim;
  float *o_gpu = malloc(od * 4), *o_twin = malloc(od * 4);
  float *l_gpu = malloc(rows * 4), *l_twin = malloc(rows * 4);
  dev_set s = {{0}, 0};
  int rc = 0;
  kvdex_gpu_kv_pages dkv;
  kvdex_gpu_token_sel dts;
  float *dq = NULL;
  if (!o_gpu || !o_twin || !l_gpu || !l_twin) {
    rc = KVDEX_ENOMEM;
    snprintf(r->msg, sizeof r->msg, "out of host memory");
    goto out;
  }
  if ((rc = decode_to_device(&s, &p, &dkv, &dts, &dq))) {
    fail(r, rc, "device copy");
    goto out;
  }
  float *d_o = dev_dup(&s, NULL, od * 4, &rc), *d_l = dev_dup(&s, NULL, rows * 4, &rc);
  size_t ws = s2 ? kvdex_gpu_s2_decode_workspace(c->s2, c->batch, c->head_dim, c->max_seq)
                 : kvdex_gpu_sparse_decode_workspace(c->batch, c->n_q_heads, c->head_dim, &p.ts);
  void *d_ws = dev_dup(&s, NULL, ws, &rc);
  if (rc) {
    fail(r, rc, "device alloc");
    goto out;
  }
  rc = s2 ? kvdex_gpu_s2_decode(c->s2, c->batch, dq, &dkv, dts.seq_lens, c->max_seq, 0, d_o, d_l,
                                d_ws, ws, NULL)
          : kvdex_gpu_sparse_decode(c->batch, c->n_q_heads, dq, &dkv, &dts, 0, d_o, d_l, d_ws, ws,
                                    NULL);
  if (rc || (rc = kvdex_gpu_sync(NULL))) {
    fail(r, rc, s2 ? "kvdex_gpu_s2_decode" : "kvdex_gpu_sparse_decode");
    goto out;
  }
  if ((rc = kvdex_gpu_copy(o_gpu, d_o, od * 4)) || (rc = kvdex_gpu_copy(l_gpu, d_l, rows * 4))) {
    fail(r, rc, "copy back");
    goto out;
  }
  rc = s2 ? kvdex_twin_s2_decode(c->s2, c->batch, p.q, &p.kv, p.seq_lens, c->max_seq, 0, o_twin,
                                 l_twin)
          : kvdex_twin_sparse_decode(c->batch, c->n_q_heads, p.q, &p.kv, &p.ts, 0, o_twin, l_twin);
  if (rc) {
    fail(r, rc, "twin");
    goto out;
  }
  r->err = tp_rel_err(o_gpu, o_twin, od);
  r->err_lse = tp_abs_err_inf(l_gpu, l_twin, rows);
out:
  dev_free(&s);
  free(o_gpu), free(o_twin), free(l_gpu), free(l_twin);
  tp_decode_free(&p);
  return rc;
}

int tc_sparse_decode(const tp_decode_cfg *c, uint64_t seed, tc_result *r) {
  return decode_compare(c, seed, r, 0);
}

int tc_s2_decode(const tp_decode_cfg *c, uint64_t seed, tc_result *r) {
  return decode_compare(c, seed, r, 1);
}

int tc_lse_merge(uint32_t n_parts, uint32_t n_rows, uint32_t head_dim, uint64_t seed,
                 tc_result *r) {
  memset(r, 0, sizeof *r);
  tp_rng rng = {seed};
  size_t no = (size_t)n_parts * n_rows * head_dim, nl = (size_t)n_parts * n_rows;
  size_t od = (size_t)n_rows * head_dim;
  float *op = malloc(no * 4 + 4), *lp = malloc(nl * 4 + 4);
  float *o_gpu = malloc(od * 4), *o_twin = malloc(od * 4), *l_gpu = malloc(n_rows * 4),
        *l_twin = malloc(n_rows * 4);
  dev_set s = {{0}, 0};
  int rc = 0;
  if (!op || !lp || !o_gpu || !o_twin || !l_gpu || !l_twin) {
    rc = KVDEX_ENOMEM;
    snprintf(r->msg, sizeof r->msg, "out of host memory");
    goto out;
  }
  for (size_t i = 0; i < no; i++) op[i] = tp_unif(&rng);
  for (size_t i = 0; i < nl; i++) {
    uint32_t kind = tp_below(&rng, 8);
    lp[i] = kind == 0 ? -INFINITY : 30.0f * tp_unif(&rng) + (kind == 1 ? 80.0f : 0.0f);
    if (kind == 0) /* an empty part's o is garbage and must be ignored */
      for (uint32_t c = 0; c < head_dim; c++) op[i * head_dim + c] = NAN;
  }
  for (uint32_t row = 0; row < n_rows && n_parts; row += 7) /* some rows fully empty */
    for (uint32_t i = 0; i < n_parts; i++) lp[(size_t)i * n_rows + row] = -INFINITY;
  float *d_op = dev_dup(&s, op, no * 4 + 4, &rc), *d_lp = dev_dup(&s, lp, nl * 4 + 4, &rc);
  float *d_o = dev_dup(&s, NULL, od * 4, &rc), *d_l = dev_dup(&s, NULL, n_rows * 4, &rc);
  if (rc) {
    fail(r, rc, "device alloc");
    goto out;
  }
  if ((rc = kvdex_gpu_lse_merge(n_parts, n_rows, head_dim, d_op, d_lp, d_o, d_l, NULL)) ||
      (rc = kvdex_gpu_sync(NULL))) {
    fail(r, rc, "kvdex_gpu_lse_merge");
    goto out;
  }
  if ((rc = kvdex_gpu_copy(o_gpu, d_o, od * 4)) || (rc = kvdex_gpu_copy(l_gpu, d_l, n_rows * 4))) {
    fail(r, rc, "copy back");
    goto out;
  }
  if ((rc = kvdex_twin_lse_merge(n_parts, n_rows, head_dim, op, lp, o_twin, l_twin))) {
    fail(r, rc, "twin");
    goto out;
  }
  r->err = tp_rel_err(o_gpu, o_twin, od);
  r->err_lse = tp_abs_err_inf(l_gpu, l_twin, n_rows);
out:
  dev_free(&s);
  free(op), free(lp), free(o_gpu), free(o_twin), free(l_gpu), free(l_twin);
  return rc;
}

int tc_s2_prefill(const kvdex_s2_params *s2, uint32_t n_kv_heads, uint32_t seq,
                  uint32_t head_dim, int dtype, uint64_t seed, tc_result *r) {
  memset(r, 0, sizeof *r);
  tp_prefill p;
  if (tp_prefill_make(&p, s2, n_kv_heads, seq, head_dim, dtype, 4.0f, seed)) {
    snprintf(r->msg, sizeof r->msg, "problem: %s", kvdex_errmsg());
    return KVDEX_ENOMEM;
  }
  size_t nq = (size_t)s2->n_heads * seq * head_dim, nk = (size_t)n_kv_heads * seq * head_dim;
  size_t nl = (size_t)s2->n_heads * seq;
  uint16_t *o_gpu = malloc(nq * 2 + 2), *o_twin = malloc(nq * 2 + 2);
  float *of_gpu = malloc(nq * 4 + 4), *of_twin = malloc(nq * 4 + 4);
  float *l_gpu = malloc(nl * 4 + 4), *l_twin = malloc(nl * 4 + 4);
  dev_set s = {{0}, 0};
  int rc = 0;
  if (!o_gpu || !o_twin || !of_gpu || !of_twin || !l_gpu || !l_twin) {
    rc = KVDEX_ENOMEM;
    snprintf(r->msg, sizeof r->msg, "out of host memory");
    goto out;
  }
  void *dq = dev_dup(&s, p.q, nq * 2, &rc), *dk = dev_dup(&s, p.k, nk * 2, &rc);
  void *dv = dev_dup(&s, p.v, nk * 2, &rc), *d_o = dev_dup(&s, NULL, nq * 2, &rc);
  float *d_l = dev_dup(&s, NULL, nl * 4, &rc);
  int32_t *drp = dev_dup(&s, p.row_ptr, (p.n_rows + 1) * 4, &rc);
  int32_t *dcol = dev_dup(&s, p.col, (p.nnz + 1) * 4, &rc);
  if (rc) {
    fail(r, rc, "device alloc");
    goto out;
  }
  if ((rc = kvdex_gpu_s2_prefill(s2, n_kv_heads, seq, head_dim, dtype, dq, dk, dv, drp, dcol, 0, d_o,
                                 d_l, NULL)) ||
      (rc = kvdex_gpu_sync(NULL))) {
    fail(r, rc, "kvdex_gpu_s2_prefill");
    goto out;
  }
  if ((rc = kvdex_gpu_copy(o_gpu, d_o, nq * 2)) || (rc = kvdex_gpu_copy(l_gpu, d_l, nl * 4))) {
    fail(r, rc, "copy back");
    goto out;
  }
  if ((rc = kvdex_twin_s2_prefill(s2, n_kv_heads, seq, head_dim, dtype, p.q, p.k, p.v, p.row_ptr,
                                  p.col, 0, o_twin, l_twin))) {
    fail(r, rc, "twin");
    goto out;
  }
  for (size_t i = 0; i < nq; i++) {
    of_gpu[i] = tp_elem(dtype, o_gpu, i);
    of_twin[i] = tp_elem(dtype, o_twin, i);
  }
  r->err = tp_rel_err(of_gpu, of_twin, nq);
  r->err_lse = tp_abs_err_inf(l_gpu, l_twin, nl);
out:
  dev_free(&s);
  free(o_gpu), free(o_twin), free(of_gpu), free(of_twin), free(l_gpu), free(l_twin);
  tp_prefill_free(&p);
  return rc;
}

int tc_block_topk(uint32_t batch, uint32_t n_q_heads, uint32_t n_kv_heads, uint32_t head_dim,
                  uint32_t rep_cap, uint32_t k, uint64_t seed, tc_result *r) {
  memset(r, 0, sizeof *r);
  tp_topk p;
  if (tp_topk_make(&p, batch, n_q_heads, n_kv_heads, head_dim, rep_cap, k, seed)) {
    snprintf(r->msg, sizeof r->msg, "out of host memory");
    return KVDEX_ENOMEM;
  }
  size_t nout = (size_t)batch * n_kv_heads * k;
  int32_t *i_gpu = malloc(nout * 4), *i_twin = malloc(nout * 4);
  float *s_gpu = malloc(nout * 4), *s_twin = malloc(nout * 4);
  kvdex_gpu_blas *blas = NULL;
  dev_set s = {{0}, 0};
  int rc = 0;
  if (!i_gpu || !i_twin || !s_gpu || !s_twin) {
    rc = KVDEX_ENOMEM;
    snprintf(r->msg, sizeof r->msg, "out of host memory");
    goto out;
  }
  if ((rc = kvdex_gpu_blas_create(&blas))) {
    fail(r, rc, "kvdex_gpu_blas_create");
    goto out;
  }
  float *dq = dev_dup(&s, p.q, (size_t)batch * n_q_heads * head_dim * 4, &rc);
  float *dr = dev_dup(&s, p.reps, (size_t)batch * n_kv_heads * rep_cap * head_dim * 4, &rc);
  int32_t *dn = dev_dup(&s, p.n_reps, batch * 4, &rc);
  int32_t *di = dev_dup(&s, NULL, nout * 4, &rc);
  float *ds = dev_dup(&s, NULL, nout * 4, &rc);
  size_t ws = kvdex_gpu_block_topk_workspace(batch, n_q_heads, rep_cap);
  void *dws = dev_dup(&s, NULL, ws, &rc);
  if (rc) {
    fail(r, rc, "device alloc");
    goto out;
  }
  if ((rc = kvdex_gpu_block_topk(blas, batch, n_q_heads, n_kv_heads, head_dim, dq, dr, rep_cap, dn, k,
                                 di, ds, dws, ws, NULL)) ||
      (rc = kvdex_gpu_sync(NULL))) {
    fail(r, rc, "kvdex_gpu_block_topk");
    goto out;
  }
  if ((rc = kvdex_gpu_copy(i_gpu, di, nout * 4)) || (rc = kvdex_gpu_copy(s_gpu, ds, nout * 4))) {
    fail(r, rc, "copy back");
    goto out;
  }
  if ((rc = kvdex_twin_block_topk(batch, n_q_heads, n_kv_heads, head_dim, p.q, p.reps, rep_cap,
                                  p.n_reps, k, i_twin, s_twin))) {
    fail(r, rc, "twin");
    goto out;
  }
  /* Sorted score lists must agree (indices may swap between near-ties). */
  size_t differ = 0;
  double num = 0, den = 0;
  for (size_t i = 0; i < nout; i++) {
    differ += i_gpu[i] != i_twin[i];
    if ((i_gpu[i] < 0) != (i_twin[i] < 0)) num = INFINITY;
    if (i_twin[i] < 0) continue;
    double e = fabs((double)s_gpu[i] - s_twin[i]);
    if (e != e || e > num) num = e != e ? INFINITY : e;
    if (fabs(s_twin[i]) > den) den = fabs(s_twin[i]);
  }
  r->err = den > 0 ? num / den : num;
  r->err_lse = nout ? (double)differ / nout : 0;
out:
  dev_free(&s);
  kvdex_gpu_blas_destroy(blas);
  free(i_gpu), free(i_twin), free(s_gpu), free(s_twin);
  tp_topk_free(&p);
  return rc;
}
