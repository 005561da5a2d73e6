/* Random host-side problems for the gpu tests (see problems.h). */
#include "tests/gpu/problems.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

uint64_t tp_next(tp_rng *r) {
  uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

float tp_unif(tp_rng *r) { return (float)((tp_next(r) >> 40) * (2.0 / 16777216.0) - 1.0); }

uint32_t tp_below(tp_rng *r, uint32_t n) { return (uint32_t)(tp_next(r) % n); }

static uint16_t to_elem(int dtype, float f) {
  return dtype == KVDEX_DTYPE_BF16 ? kvdex__f32_to_bf16(f) : kvdex__f32_to_f16(f);
}

float tp_elem(int dtype, const uint16_t *base, size_t i) {
  return dtype == KVDEX_DTYPE_BF16 ? kvdex__bf16_to_f32(base[i]) : kvdex__f16_to_f32(base[i]);
}

static void shuffle(tp_rng *r, int32_t *a, size_t n) {
  for (size_t i = n; i > 1; i--) {
    size_t j = tp_next(r) % i;
    int32_t t = a[i - 1];
    a[i - 1] = a[j];
    a[j] = t;
  }
}

int tp_decode_make(tp_decode *p, const tp_decode_cfg *c, uint64_t seed) {
  memset(p, 0, sizeof *p);
  p->cfg = *c;
  tp_rng rng = {seed};
  uint32_t B = c->batch, H = c->n_kv_heads, d = c->head_dim, bt = c->block_tokens;
  uint32_t max_blocks = (c->max_seq + bt - 1) / bt;
  if (max_blocks == 0) max_blocks = 1;
  uint32_t spare = 3; /* pool blocks no table names */
  uint32_t n_pool = (c->vllm_layout ? B : B * H) * max_blocks + spare;
  size_t block_elems = (size_t)bt * d * (c->vllm_layout ? H : 1);
  p->pool_elems = (size_t)n_pool * block_elems;
  p->k = malloc(p->pool_elems * 2);
  p->v = malloc(p->pool_elems * 2);
  p->q = malloc((size_t)B * c->n_q_heads * d * sizeof(float));
  p->seq_lens = malloc(B * sizeof(int32_t));
  p->bt_len = (size_t)(c->vllm_layout ? B : B * H) * max_blocks;
  p->bt = malloc(p->bt_len * sizeof(int32_t));
  if (c->sel_cap) {
    p->sel = malloc((size_t)B * H * c->sel_cap * sizeof(int32_t));
    p->n_sel = malloc((size_t)B * H * sizeof(int32_t));
  }
  if (!p->k || !p->v || !p->q || !p->seq_lens || !p->bt || (c->sel_cap && (!p->sel || !p->n_sel))) {
    tp_decode_free(p);
    return -1;
  }
  for (size_t i = 0; i < p->pool_elems; i++) {
    p->k[i] = to_elem(c->dtype, tp_unif(&rng));
    p->v[i] = to_elem(c->dtype, tp_unif(&rng));
  }
  for (size_t i = 0; i < (size_t)B * c->n_q_heads * d; i++) p->q[i] = c->q_mag * tp_unif(&rng);
  for (uint32_t b = 0; b < B; b++)
    p->seq_lens[b] = b == 0 ? (int32_t)c->max_seq : (int32_t)tp_below(&rng, c->max_seq + 1);
  /* physical blocks: a random permutation of the pool (minus the spares) */
  int32_t *perm = malloc((size_t)n_pool * sizeof *perm);
  if (!perm) {
    tp_decode_free(p);
    return -1;
  }
  for (uint32_t i = 0; i < n_pool; i++) perm[i] = (int32_t)i;
  shuffle(&rng, perm, n_pool);
  for (size_t i = 0; i < p->bt_len; i++) p->bt[i] = perm[i];
  free(perm);

  kvdex_gpu_kv_pages *kv = &p->kv;
  kv->dtype = c->dtype;
  kv->head_dim = d;
  kv->n_kv_heads = H;
  kv->block_tokens = bt;
  kv->k = p->k;
  kv->v = p->v;
  kv->n_pool_blocks = n_pool;
  kv->block_table = p->bt;
  kv->max_blocks = max_blocks;
  if (c->vllm_layout) {
    kv->block_stride = (uint64_t)H * bt * d;
    kv->head_stride = (uint64_t)bt * d;
    kv->bt_batch_stride = max_blocks;
    kv->bt_head_stride = 0;
  } else {
    kv->block_stride = (uint64_t)bt * d;
    kv->head_stride = 0;
    kv->bt_batch_stride = (uint64_t)H * max_blocks;
    kv->bt_head_stride = max_blocks;
  }
  /* blocks past the sequence are never read: name them -1 (per-head tables only,
   * a shared table row must serve every head) */
  if (!c->vllm_layout) {
    for (uint32_t b = 0; b < B; b++)
      for (uint32_t h = 0; h < H; h++)
        for (uint32_t lb = 0; lb < max_blocks; lb++) {
          int64_t first = (int64_t)lb * bt, last = first + bt - 1;
          int needed = first < p->seq_lens[b];
          if (needed && c->s2) { /* S2: only blocks some query head of h still needs */
            const kvdex_s2_params *s2 = c->s2;
            uint32_t group = s2->n_heads / H, cur = (uint32_t)((p->seq_lens[b] - 1) / s2->block);
            needed = 0;
            for (int64_t t = first; t <= last && t < p->seq_lens[b] && !needed; t++)
              needed = kvdex_s2_kv_needed(s2, group, h, (uint32_t)(t / s2->block), cur);
          }
          if (!needed) p->bt[((size_t)b * H + h) * max_blocks + lb] = -1;
        }
  }
  kvdex_gpu_token_sel *ts = &p->ts;
  ts->seq_lens = p->seq_lens;
  ts->n_sink = c->n_sink;
  ts->n_recent = c->n_recent;
  ts->sel = p->sel;
  ts->n_sel = p->n_sel;
  ts->sel_cap = c->sel_cap;
  if (c->sel_cap && !c->s2) {
    int32_t *pick = malloc(((size_t)c->max_seq + 1) * sizeof *pick);
    if (!pick) {
      tp_decode_free(p);
      return -1;
    }
    for (uint32_t b = 0; b < B; b++)
      for (uint32_t h = 0; h < H; h++) {
        int32_t L = p->seq_lens[b];
        int32_t *row = p->sel + ((size_t)b * H + h) * c->sel_cap;
        for (int32_t t = 0; t < L; t++) pick[t] = t;
        shuffle(&rng, pick, (size_t)L);
        uint32_t n = tp_below(&rng, c->sel_cap + 1);
        for (uint32_t i = 0; i < c->sel_cap; i++) {
          /* distinct ids of the sequence, now and then one that must be skipped */
          uint32_t kind = tp_below(&rng, 16);
          if (kind == 0) row[i] = -1 - (int32_t)tp_below(&rng, 5);
          else if (kind == 1) row[i] = L + (int32_t)tp_below(&rng, 7);
          else row[i] = i < (uint32_t)L ? pick[i] : L + 100 + (int32_t)i;
        }
        /* occasionally claim more than sel_cap: it must be clamped */
        p->n_sel[(size_t)b * H + h] = tp_below(&rng, 8) == 0 ? (int32_t)c->sel_cap + 3 : (int32_t)n;
      }
    free(pick);
  }
  return 0;
}

void tp_decode_free(tp_decode *p) {
  free(p->q), free(p->k), free(p->v), free(p->bt), free(p->seq_lens), free(p->sel), free(p->n_sel);
  memset(p, 0, sizeof *p);
}

void tp_decode_row(const tp_decode *p, int which, uint32_t b, uint32_t h, int64_t t, float *out) {
  const kvdex_gpu_kv_pages *kv = &p->kv;
  int32_t phys = kv->block_table[b * kv->bt_batch_stride + h * kv->bt_head_stride +
                                 (uint64_t)(t / kv->block_tokens)];
  size_t off = (size_t)phys * kv->block_stride + (size_t)h * kv->head_stride +
               (size_t)(t % kv->block_tokens) * kv->head_dim;
  const uint16_t *base = which ? p->v : p->k;
  for (uint32_t c = 0; c < kv->head_dim; c++) out[c] = tp_elem(kv->dtype, base, off + c);
}

int tp_prefill_make(tp_prefill *p, const kvdex_s2_params *s2, uint32_t n_kv_heads, uint32_t seq,
                    uint32_t head_dim, int dtype, float q_mag, uint64_t seed) {
  memset(p, 0, sizeof *p);
  p->s2 = *s2;
  p->n_kv_heads = n_kv_heads;
  p->seq = seq;
  p->head_dim = head_dim;
  p->dtype = dtype;
  tp_rng rng = {seed};
  size_t nq = (size_t)s2->n_heads * seq * head_dim, nk = (size_t)n_kv_heads * seq * head_dim;
  uint32_t nb = (seq + s2->block - 1) / s2->block;
  p->n_rows = (uint64_t)s2->n_heads * nb;
  if (kvdex_s2_layout_nnz(s2, nb, &p->nnz)) return -1;
  p->q = malloc(nq * 2 + 16);
  p->k = malloc(nk * 2 + 16);
  p->v = malloc(nk * 2 + 16);
  p->row_ptr = malloc((p->n_rows + 1) * sizeof(int32_t));
  p->col = malloc((p->nnz + 1) * sizeof(int32_t));
  if (!p->q || !p->k || !p->v || !p->row_ptr || !p->col) {
    tp_prefill_free(p);
    return -1;
  }
  for (size_t i = 0; i < nq; i++) p->q[i] = to_elem(dtype, q_mag * tp_unif(&rng));
  for (size_t i = 0; i < nk; i++) {
    p->k[i] = to_elem(dtype, tp_unif(&rng));
    p->v[i] = to_elem(dtype, tp_unif(&rng));
  }
  if (kvdex_s2_layout_build(s2, nb, p->row_ptr, p->col, p->nnz)) {
    tp_prefill_free(p);
    return -1;
  }
  return 0;
}

void tp_prefill_free(tp_prefill *p) {
  free(p->q), free(p->k), free(p->v), free(p->row_ptr), free(p->col);
  memset(p, 0, sizeof *p);
}

int tp_topk_make(tp_topk *p, uint32_t batch, uint32_t n_q_heads, uint32_t n_kv_heads,
                 uint32_t head_dim, uint32_t rep_cap, uint32_t k, uint64_t seed) {
  memset(p, 0, sizeof *p);
  p->batch = batch, p->n_q_heads = n_q_heads, p->n_kv_heads = n_kv_heads;
  p->head_dim = head_dim, p->rep_cap = rep_cap, p->k = k;
  tp_rng rng = {seed};
  size_t nq = (size_t)batch * n_q_heads * head_dim;
  size_t nr = (size_t)batch * n_kv_heads * rep_cap * head_dim;
  p->q = malloc(nq * sizeof(float));
  p->reps = malloc(nr * sizeof(float));
  p->n_reps = malloc(batch * sizeof(int32_t));
  if (!p->q || !p->reps || !p->n_reps) {
    tp_topk_free(p);
    return -1;
  }
  for (size_t i = 0; i < nq; i++) p->q[i] = tp_unif(&rng);
  for (size_t i = 0; i < nr; i++) p->reps[i] = tp_unif(&rng);
  for (uint32_t b = 0; b < batch; b++)
    p->n_reps[b] = b == 0 ? (int32_t)rep_cap : (int32_t)tp_below(&rng, rep_cap + 1);
  /* exact ties: copy a few representatives over others */
  for (uint32_t b = 0; b < batch; b++)
    for (uint32_t h = 0; h < n_kv_heads; h++)
      for (int i = 0; i < 3 && rep_cap > 1; i++) {
        float *base = p->reps + ((size_t)b * n_kv_heads + h) * rep_cap * head_dim;
        uint32_t from = tp_below(&rng, rep_cap), to = tp_below(&rng, rep_cap);
        memcpy(base + (size_t)to * head_dim, base + (size_t)from * head_dim, head_dim * sizeof(float));
      }
  return 0;
}

void tp_topk_free(tp_topk *p) {
  free(p->q), free(p->reps), free(p->n_reps);
  memset(p, 0, sizeof *p);
}

double tp_rel_err(const float *a, const float *b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    double e = fabs((double)a[i] - b[i]);
    if (e != e) return INFINITY;
    if (e > num) num = e;
    if (fabs(b[i]) > den) den = fabs(b[i]);
  }
  return den > 0 ? num / den : num;
}

double tp_abs_err_inf(const float *a, const float *b, size_t n) {
  double worst = 0;
  for (size_t i = 0; i < n; i++) {
    if (isinf(a[i]) || isinf(b[i])) {
      if (a[i] != b[i]) return INFINITY;
      continue;
    }
    double e = fabs((double)a[i] - b[i]);
    if (e != e) return INFINITY;
    if (e > worst) worst = e;
  }
  return worst;
}
