/* gpu_worker: the decode loop (gpu_worker.h) and the twin backend. Each layer's held
 * tokens live in a paged pool on the backend, kvstore-style (one block table per KV
 * head, one head per physical block); blocks that slide out of the window (or out of
 * an S2 head group's shard) go back to a free list. It does not print, and it keeps a
 * full copy of K/V only when asked to check.
 */
#include "workers/gpu_worker.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvstore/base.h"

#define FAIL(rc, ...) kvdex__seterr((rc), __VA_ARGS__)

/* ------------------------------------------------------------ twin backend */

static int twin_alloc(void *ctx, size_t bytes, void **out) {
  (void)ctx;
  void *p = NULL;
  if (posix_memalign(&p, 64, bytes ? bytes : 64)) return FAIL(KVDEX_ENOMEM, "out of memory");
  *out = p;
  return 0;
}
static void twin_free(void *ctx, void *p) {
  (void)ctx;
  free(p);
}
static int twin_copy(void *ctx, void *dst, const void *src, size_t bytes) {
  (void)ctx;
  if (bytes) memcpy(dst, src, bytes);
  return 0;
}
static int twin_sparse(void *ctx, uint32_t n_q_heads, const float *q, const kvdex_gpu_kv_pages *kv,
                       const kvdex_gpu_token_sel *sel, float *o, float *lse, void *ws,
                       size_t ws_bytes) {
  (void)ctx, (void)ws, (void)ws_bytes;
  return kvdex_twin_sparse_decode(1, n_q_heads, q, kv, sel, 0.0f, o, lse);
}
static int twin_s2(void *ctx, const kvdex_s2_params *p, const float *q, const kvdex_gpu_kv_pages *kv,
                   const int32_t *seq_lens, uint32_t max_seq_len, float *o, float *lse, void *ws,
                   size_t ws_bytes) {
  (void)ctx, (void)ws, (void)ws_bytes;
  return kvdex_twin_s2_decode(p, 1, q, kv, seq_lens, max_seq_len, 0.0f, o, lse);
}
static int twin_merge(void *ctx, uint32_t n_parts, uint32_t n_rows, uint32_t head_dim,
                      const float *o_parts, const float *lse_parts, float *o, float *lse) {
  (void)ctx;
  return kvdex_twin_lse_merge(n_parts, n_rows, head_dim, o_parts, lse_parts, o, lse);
}
static int twin_sync(void *ctx) {
  (void)ctx;
  return 0;
}

static const kvdex_gw_backend TWIN = {
    .name = "twin (CPU)",
    .alloc = twin_alloc,
    .free = twin_free,
    .upload = twin_copy,
    .download = twin_copy,
    .sparse_decode = twin_sparse,
    .s2_decode = twin_s2,
    .lse_merge = twin_merge,
    .sync = twin_sync,
};

const kvdex_gw_backend *kvdex_gw_twin_backend(void) { return &TWIN; }

/* ------------------------------------------------------------ synthetic data */



static uint64_t stream_seed(uint64_t seed, uint64_t what, uint64_t a, uint64_t b) {
  uint64_t s = seed ^ (what * 0xd1b54a32d192ed03ull);
  kvdex__splitmix64(&s);
  s ^= a * 0x8cb92ba72f3d8dd7ull;
  kvdex__splitmix64(&s);
  s ^= b * 0xabc98388fb8fac03ull;
  return kvdex__splitmix64(&s);
}

void kvdex_gw_gen_kv(const kvdex_shape *sh, uint64_t seed, uint32_t layer, uint64_t t, float *k,
                     float *v) {
  uint64_t s = stream_seed(seed, 1, layer, t);
  size_t n = (size_t)sh->n_kv_heads * sh->head_dim;
  /* Keys share an offset direction per head (as real keys do) plus noise. */
  for (size_t i = 0; i < n; i++) k[i] = kvdex__gauss4(&s) + ((i % sh->head_dim) < 4 ? 1.5f : 0.0f);
  for (size_t i = 0; i < n; i++) v[i] = kvdex__gauss4(&s);
}

/* q of (layer, step): each query head aims near a random earlier token (the new one
 * included) of its KV head, so attention has a few clear winners, as in decode. */
static void gen_q(const kvdex_shape *sh, uint64_t seed, uint32_t layer, uint32_t step,
                  uint64_t n_tokens, float *q, float *tk, float *tv) {
  uint64_t s = stream_seed(seed, 2, layer, step);
  uint32_t G = sh->n_q_heads / sh->n_kv_heads, D = sh->head_dim;
  for (uint32_t h = 0; h < sh->n_q_heads; h++) {
    uint64_t target = kvdex__splitmix64(&s) % n_tokens;
    kvdex_gw_gen_kv(sh, seed, layer, target, tk, tv);
    const float *kr = tk + (size_t)(h / G) * D;
    for (uint32_t i = 0; i < D; i++) q[(size_t)h * D + i] = kr[i] + 0.5f * kvdex__gauss4(&s);
  }
}

/* ------------------------------------------------------------ config */

static int is_dense(const char *index) { return index && !strcmp(index, "dense"); }

int kvdex_gw_config_check(const kvdex_gw_config *c) {
  const kvdex_shape *sh = &c->shape;
  if (!c->seq_id || !c->seq_id[0]) return FAIL(KVDEX_EINVAL, "a sequence id is needed");
  if (sh->n_layers < 1) return FAIL(KVDEX_EINVAL, "--layers must be >= 1");
  if (sh->n_kv_heads < 1 || sh->n_q_heads < 1 || sh->n_q_heads % sh->n_kv_heads)
    return FAIL(KVDEX_EINVAL, "--q-heads %u is not a multiple of --kv-heads %u", sh->n_q_heads,
                sh->n_kv_heads);
  if (sh->dtype != KVDEX_DTYPE_F16 && sh->dtype != KVDEX_DTYPE_BF16)
    return FAIL(KVDEX_EINVAL, "--dtype %s: the attention kernels take f16 or bf16",
                kvdex_dtype_name(sh->dtype));
  if (sh->head_dim < 16 || sh->head_dim % 16 || sh->head_dim > 256)
    return FAIL(KVDEX_EINVAL, "--head-dim %u must be a multiple of 16 in [16, 256]",
                sh->head_dim);
  if (sh->block_tokens < 1) return FAIL(KVDEX_EINVAL, "--block-tokens must be >= 1");
  if (c->steps < 1) return FAIL(KVDEX_EINVAL, "--steps must be >= 1");
  if (c->context <= (uint64_t)c->sinks + c->window)
    return FAIL(KVDEX_EINVAL,
                "--context %llu must exceed --sinks %u + --window %u (the store attends the rest)",
                (unsigned long long)c->context, c->sinks, c->window);
  if (c->context + c->steps > (uint64_t)INT32_MAX)
    return FAIL(KVDEX_EINVAL, "--context + --steps must stay below 2^31 tokens");
  if (!is_dense(c->index) && (c->k < 1 || c->k > 65536))
    return FAIL(KVDEX_EINVAL, "--k %u must be in [1, 65536]", c->k);
  if (c->s2_vert_stride && c->s2_local_blocks < 1)
    return FAIL(KVDEX_EINVAL, "--s2-local-blocks must be >= 1");
  return 0;
}

/* ------------------------------------------------------------ the local pool */

typedef struct pool {
  int s2;                /* an S2 layer: local blocks + shard; no store Attend */
  uint32_t cap, n_free;  /* physical blocks */
  uint32_t *free_list;
  void *k, *v;           /* backend */
  int32_t *table;        /* host mirror, [n_kv_heads][max_blocks] */
  int32_t *dtable;       /* backend copy */
  kvdex_gpu_kv_pages kv;
} pool;

typedef struct loop {
  const kvdex_gw_config *c;
  const kvdex_gw_backend *be;
  kvdex_shape sh;
  size_t es, row_bytes;  /* element size; one token of one head */
  uint32_t max_blocks, sink_blocks, G;
  kvdex_s2_params s2;
  pool *pools;           /* per layer */
  void **full_k, **full_v; /* --check: per layer [n_kv_heads][cap_tokens][head_dim] */
  uint64_t cap_tokens;
} loop;

static int pool_map(loop *L, pool *p, uint32_t kvh, uint32_t blk) {
  int32_t *e = &p->table[(size_t)kvh * L->max_blocks + blk];
  if (*e >= 0) return 0;
  if (!p->n_free)
    return FAIL(KVDEX_ENOMEM, "gpu worker: local pool of %u blocks is full (internal sizing)",
                p->cap);
  *e = (int32_t)p->free_list[--p->n_free];
  return L->be->upload(L->be->ctx, p->dtable + ((size_t)kvh * L->max_blocks + blk), e,
                       sizeof *e);
}

static void pool_unmap(loop *L, pool *p, uint32_t kvh, uint32_t blk) {
  int32_t *e = &p->table[(size_t)kvh * L->max_blocks + blk];
  if (*e < 0) return;
  p->free_list[p->n_free++] = (uint32_t)*e;
  *e = -1; /* the backend copy keeps the stale entry: nothing reads it any more */
}

/* Writes rows [t0, t0 + n) of KV head kvh (all inside one block) from host rows. */
static int pool_put(loop *L, pool *p, uint32_t kvh, uint64_t t0, uint32_t n, const void *k,
                    const void *v) {
  uint32_t blk = (uint32_t)(t0 / L->sh.block_tokens);
  int rc = pool_map(L, p, kvh, blk);
  if (rc) return rc;
  size_t phys = (size_t)p->table[(size_t)kvh * L->max_blocks + blk];
  size_t off = (phys * L->sh.block_tokens + t0 % L->sh.block_tokens) * L->row_bytes;
  if ((rc = L->be->upload(L->be->ctx, (char *)p->k + off, k, n * L->row_bytes))) return rc;
  return L->be->upload(L->be->ctx, (char *)p->v + off, v, n * L->row_bytes);
}

/* Does this loop hold block j of KV head kvh when the newest token is n_tok - 1? */
static int held(const loop *L, const pool *p, uint32_t kvh, uint64_t j, uint64_t n_tok) {
  uint32_t B = L->sh.block_tokens;
  uint64_t cur = (n_tok - 1) / B;
  if (p->s2) return kvdex_s2_kv_needed(&L->s2, L->G, kvh, (uint32_t)j, (uint32_t)cur);
  if (j < L->sink_blocks) return 1;
  uint64_t ws = n_tok > (uint64_t)L->c->window + 1 ? n_tok - L->c->window - 1 : 0;
  return j >= ws / B && j <= cur;
}

static int pool_init(loop *L, pool *p, int s2) {
  const kvdex_gw_backend *be = L->be;
  uint32_t B = L->sh.block_tokens, Hkv = L->sh.n_kv_heads;
  p->s2 = s2;
  uint64_t per_head_max = 0;
  if (!s2) {
    per_head_max = L->sink_blocks + (L->c->window + 1 + B - 1) / B + 1;
  } else {
    /* The largest shard any KV head holds at the final length: its vertical blocks
     * (a bound independent of the query block) plus the local ones. */
    for (uint32_t h = 0; h < Hkv; h++) {
      uint64_t n = L->s2.local_blocks + 1;
      for (uint32_t j = 0; j < L->max_blocks; j++)
        n += kvdex_s2_kv_needed(&L->s2, L->G, h, j, L->max_blocks + L->s2.local_blocks + 1);
      if (n > per_head_max) per_head_max = n;
    }
  }
  if (per_head_max > L->max_blocks) per_head_max = L->max_blocks;
  uint64_t cap = per_head_max * Hkv;
  if (cap > (uint64_t)INT32_MAX) return FAIL(KVDEX_EINVAL, "gpu worker: local pool too large");
  p->cap = (uint32_t)cap;
  size_t pool_bytes = (size_t)cap * B * L->row_bytes;
  size_t table_n = (size_t)Hkv * L->max_blocks;
  p->free_list = malloc(cap * sizeof *p->free_list);
  p->table = malloc(table_n * sizeof *p->table);
  if (!p->free_list || !p->table) return FAIL(KVDEX_ENOMEM, "out of memory");
  for (uint32_t i = 0; i < p->cap; i++) p->free_list[i] = p->cap - 1 - i;
  p->n_free = p->cap;
  for (size_t i = 0; i < table_n; i++) p->table[i] = -1;
  int rc;
  if ((rc = be->alloc(be->ctx, pool_bytes, &p->k)) || (rc = be->alloc(be->ctx, pool_bytes, &p->v)) ||
      (rc = be->alloc(be->ctx, table_n * sizeof(int32_t), (void **)&p->dtable)) ||
      (rc = be->upload(be->ctx, p->dtable, p->table, table_n * sizeof(int32_t))))
    return rc;
  p->kv = (kvdex_gpu_kv_pages){
      .dtype = L->sh.dtype,
      .head_dim = L->sh.head_dim,
      .n_kv_heads = Hkv,
      .block_tokens = B,
      .k = p->k,
      .v = p->v,
      .block_stride = (uint64_t)B * L->sh.head_dim,
      .head_stride = 0,
      .n_pool_blocks = p->cap,
      .block_table = p->dtable,
      .max_blocks = L->max_blocks,
      .bt_batch_stride = 0,
      .bt_head_stride = L->max_blocks,
  };
  return 0;
}

static void pool_free(loop *L, pool *p) {
  if (p->k) L->be->free(L->be->ctx, p->k);
  if (p->v) L->be->free(L->be->ctx, p->v);
  if (p->dtable) L->be->free(L->be->ctx, p->dtable);
  free(p->free_list);
  free(p->table);
}

/* Loads the held tokens of every layer from the store (ReadKV) into the pools. */
static int load_held(kvdex_db *db, loop *L) {
  uint32_t B = L->sh.block_tokens, Hkv = L->sh.n_kv_heads;
  uint64_t n_tok = L->c->context + 1; /* what the first step attends (new token included) */
  uint64_t n_blocks = (L->c->context + B - 1) / B;
  uint64_t *ids = malloc(B * sizeof *ids);
  void *kb = malloc((size_t)Hkv * B * L->row_bytes), *vb = malloc((size_t)Hkv * B * L->row_bytes);
  int rc = 0;
  if (!ids || !kb || !vb) {
    rc = FAIL(KVDEX_ENOMEM, "out of memory");
    goto out;
  }
  for (uint32_t l = 0; l < L->sh.n_layers && !rc; l++) {
    pool *p = &L->pools[l];
    for (uint64_t j = 0; j < n_blocks && !rc; j++) {
      int any = 0;
      for (uint32_t h = 0; h < Hkv; h++) any |= held(L, p, h, j, n_tok);
      if (!any) continue;
      uint64_t t0 = j * B, t1 = t0 + B < L->c->context ? t0 + B : L->c->context;
      uint32_t n = (uint32_t)(t1 - t0);
      for (uint32_t i = 0; i < n; i++) ids[i] = t0 + i;
      if ((rc = kvdex_read(db, L->c->seq_id, l, ids, n, kb, vb))) break;
      for (uint32_t h = 0; h < Hkv && !rc; h++)
        if (held(L, p, h, j, n_tok))
          rc = pool_put(L, p, h, t0, n, (char *)kb + (size_t)h * n * L->row_bytes,
                        (char *)vb + (size_t)h * n * L->row_bytes);
    }
  }
out:
  free(ids);
  free(kb);
  free(vb);
  return rc;
}

/* Generates the prompt and appends it to the store (the prefill engine's part). */
static int prefill(kvdex_db *db, loop *L) {
  const kvdex_shape *sh = &L->sh;
  uint32_t Hkv = sh->n_kv_heads, D = sh->head_dim;
  uint32_t chunk = (uint32_t)((2u << 20) / (2 * Hkv * L->row_bytes));
  if (chunk < 16) chunk = 16;
  size_t row_f = (size_t)Hkv * D;
  float *gk = malloc(row_f * sizeof(float)), *gv = malloc(row_f * sizeof(float));
  void *kb = malloc((size_t)chunk * Hkv * L->row_bytes), *vb = malloc((size_t)chunk * Hkv * L->row_bytes);
  void *tk = malloc(Hkv * L->row_bytes), *tv = malloc(Hkv * L->row_bytes);
  kvdex_appender *ap = NULL;
  int rc = 0;
  if (!gk || !gv || !kb || !vb || !tk || !tv) {
    rc = FAIL(KVDEX_ENOMEM, "out of memory");
    goto out;
  }
  if ((rc = kvdex_append_begin(db, L->c->seq_id, &ap))) goto out;
  for (uint32_t l = 0; l < sh->n_layers && !rc; l++) {
    for (uint64_t t0 = 0; t0 < L->c->context && !rc; t0 += chunk) {
      uint32_t n = (uint32_t)(L->c->context - t0 < chunk ? L->c->context - t0 : chunk);
      for (uint32_t i = 0; i < n; i++) {
        kvdex_gw_gen_kv(sh, L->c->seed, l, t0 + i, gk, gv);
        kvdex__from_f32(sh->dtype, gk, tk, row_f);
        kvdex__from_f32(sh->dtype, gv, tv, row_f);
        for (uint32_t h = 0; h < Hkv; h++) {
          size_t dst = ((size_t)h * n + i) * L->row_bytes;
          memcpy((char *)kb + dst, (char *)tk + h * L->row_bytes, L->row_bytes);
          memcpy((char *)vb + dst, (char *)tv + h * L->row_bytes, L->row_bytes);
          if (L->full_k) {
            size_t fo = ((size_t)h * L->cap_tokens + t0 + i) * L->row_bytes;
            memcpy((char *)L->full_k[l] + fo, (char *)tk + h * L->row_bytes, L->row_bytes);
            memcpy((char *)L->full_v[l] + fo, (char *)tv + h * L->row_bytes, L->row_bytes);
          }
        }
      }
      rc = kvdex_append_kv(ap, l, t0, n, kb, vb);
    }
  }
  if (rc) {
    kvdex_append_abort(ap);
    goto out;
  }
  uint64_t appended = 0;
  if ((rc = kvdex_append_commit(ap, &appended))) goto out;
  if (appended != (uint64_t)sh->n_layers * L->c->context)
    rc = FAIL(KVDEX_ECONFLICT, "gpu worker: the store took %llu prompt tokens, expected %llu",
              (unsigned long long)appended, (unsigned long long)sh->n_layers * L->c->context);
out:
  free(gk);
  free(gv);
  free(kb);
  free(vb);
  free(tk);
  free(tv);
  return rc;
}

/* Dense attention in f64 over the held full copy (S2 layers: S2-masked), against o. */
static void check_one(loop *L, uint32_t layer, uint64_t n_tok, const float *q, const float *o,
                      double *kf, double *w, kvdex_gw_stats *st) {
  const kvdex_shape *sh = &L->sh;
  uint32_t D = sh->head_dim, B = sh->block_tokens;
  double scale = 1.0 / sqrt((double)D);
  float *row = malloc(D * sizeof(float));
  if (!row) return;
  uint64_t qblk = (n_tok - 1) / B;
  for (uint32_t h = 0; h < sh->n_q_heads; h++) {
    uint32_t kvh = h / L->G;
    const char *kb = (const char *)L->full_k[layer] + (size_t)kvh * L->cap_tokens * L->row_bytes;
    const char *vb = (const char *)L->full_v[layer] + (size_t)kvh * L->cap_tokens * L->row_bytes;
    const float *qh = q + (size_t)h * D;
    double mx = -INFINITY;
    for (uint64_t t = 0; t < n_tok; t++) {
      if (L->pools[layer].s2 && !kvdex_s2_active(&L->s2, h, (uint32_t)qblk, (uint32_t)(t / B))) {
        w[t] = -INFINITY;
        continue;
      }
      kvdex__to_f32(sh->dtype, kb + t * L->row_bytes, row, D);
      double s = 0;
      for (uint32_t i = 0; i < D; i++) s += (double)qh[i] * row[i];
      w[t] = s * scale;
      if (w[t] > mx) mx = w[t];
    }
    double den = 0;
    for (uint32_t i = 0; i < D; i++) kf[i] = 0;
    for (uint64_t t = 0; t < n_tok; t++) {
      if (w[t] == -INFINITY) continue;
      double e = exp(w[t] - mx);
      den += e;
      kvdex__to_f32(sh->dtype, vb + t * L->row_bytes, row, D);
      for (uint32_t i = 0; i < D; i++) kf[i] += e * row[i];
    }
    double ref_max = 0, err_max = 0;
    for (uint32_t i = 0; i < D; i++) {
      double r = kf[i] / den;
      if (fabs(r) > ref_max) ref_max = fabs(r);
      double e = fabs((double)o[(size_t)h * D + i] - r);
      if (!(e <= err_max)) err_max = e; /* NaN wins */
    }
    double rel = err_max / (ref_max > 1e-30 ? ref_max : 1e-30);
    if (!(rel <= st->max_rel_err)) st->max_rel_err = rel;
    st->mean_rel_err += (rel - st->mean_rel_err) / (double)(++st->checked);
  }
  free(row);
}

int kvdex_gw_run(kvdex_db *db, const kvdex_gw_config *cfg, const kvdex_gw_backend *be,
                 kvdex_gw_progress_fn progress, kvdex_gw_output_fn output, void *cb_ctx,
                 kvdex_gw_stats *st) {
  memset(st, 0, sizeof *st);
  int rc = kvdex_gw_config_check(cfg);
  if (rc) return rc;
  loop L = {.c = cfg, .be = be, .sh = cfg->shape};
  kvdex_shape *sh = &L.sh;
  uint32_t B = sh->block_tokens, Hkv = sh->n_kv_heads, Hq = sh->n_q_heads, D = sh->head_dim;
  L.es = kvdex_dtype_size(sh->dtype);
  L.row_bytes = (size_t)D * L.es;
  L.G = Hq / Hkv;
  L.cap_tokens = cfg->context + cfg->steps;
  L.max_blocks = (uint32_t)((L.cap_tokens + B - 1) / B);
  L.sink_blocks = (cfg->sinks + B - 1) / B;
  L.s2 = (kvdex_s2_params){.n_heads = Hq, .block = B, .local_blocks = cfg->s2_local_blocks,
                           .vert_stride = cfg->s2_vert_stride ? cfg->s2_vert_stride : 1,
                           .offset = 1};
  if (cfg->s2_vert_stride && (rc = kvdex_s2_check(&L.s2))) return rc;
  int dense = is_dense(cfg->index);
  size_t qn = (size_t)Hq * D, row_f = (size_t)Hkv * D;

  float *q = NULL, *gk = NULL, *gv = NULL, *tk = NULL, *tv = NULL, *o_net = NULL, *lse_net = NULL,
        *o = NULL;
  void *k_new = NULL, *v_new = NULL;
  double *ref_acc = NULL, *ref_w = NULL;
  float *d_q = NULL, *d_parts = NULL, *d_lse_parts = NULL, *d_o = NULL, *d_lse = NULL;
  int32_t *d_len = NULL;
  void *d_ws = NULL;
  size_t ws_bytes = 0;
  kvdex_appender *ap = NULL;

  L.pools = calloc(sh->n_layers, sizeof *L.pools);
  q = malloc(qn * sizeof(float));
  o = malloc(qn * sizeof(float));
  o_net = malloc(qn * sizeof(float));
  lse_net = malloc(Hq * sizeof(float));
  gk = malloc(row_f * sizeof(float));
  gv = malloc(row_f * sizeof(float));
  tk = malloc(row_f * sizeof(float));
  tv = malloc(row_f * sizeof(float));
  k_new = malloc(row_f * L.es);
  v_new = malloc(row_f * L.es);
  if (!L.pools || !q || !o || !o_net || !lse_net || !gk || !gv || !tk || !tv || !k_new || !v_new) {
    rc = FAIL(KVDEX_ENOMEM, "out of memory");
    goto out;
  }
  if (cfg->check) {
    size_t bytes = (size_t)Hkv * L.cap_tokens * L.row_bytes;
    L.full_k = calloc(sh->n_layers, sizeof(void *));
    L.full_v = calloc(sh->n_layers, sizeof(void *));
    ref_acc = malloc(D * sizeof(double));
    ref_w = malloc(L.cap_tokens * sizeof(double));
    if (!L.full_k || !L.full_v || !ref_acc || !ref_w) {
      rc = FAIL(KVDEX_ENOMEM, "out of memory (--check keeps all K/V)");
      goto out;
    }
    for (uint32_t l = 0; l < sh->n_layers; l++)
      if (!(L.full_k[l] = malloc(bytes)) || !(L.full_v[l] = malloc(bytes))) {
        rc = FAIL(KVDEX_ENOMEM, "out of memory (--check keeps all K/V)");
        goto out;
      }
  }

  /* Backend buffers shared by the layers. */
  kvdex_gpu_token_sel sel_h = {.n_sink = cfg->sinks, .n_recent = cfg->window + 1};
  ws_bytes = kvdex_gpu_sparse_decode_workspace(1, Hq, D, &sel_h);
  if (cfg->s2_vert_stride) {
    size_t w2 = kvdex_gpu_s2_decode_workspace(&L.s2, 1, D, (uint32_t)L.cap_tokens);
    if (w2 > ws_bytes) ws_bytes = w2;
  }
  if ((rc = be->alloc(be->ctx, qn * sizeof(float), (void **)&d_q)) ||
      (rc = be->alloc(be->ctx, 2 * qn * sizeof(float), (void **)&d_parts)) ||
      (rc = be->alloc(be->ctx, 2 * Hq * sizeof(float), (void **)&d_lse_parts)) ||
      (rc = be->alloc(be->ctx, qn * sizeof(float), (void **)&d_o)) ||
      (rc = be->alloc(be->ctx, Hq * sizeof(float), (void **)&d_lse)) ||
      (rc = be->alloc(be->ctx, sizeof(int32_t), (void **)&d_len)) ||
      (rc = be->alloc(be->ctx, ws_bytes, &d_ws)))
    goto out;
  for (uint32_t l = 0; l < sh->n_layers; l++)
    if ((rc = pool_init(&L, &L.pools[l], cfg->s2_vert_stride && (l % 2 == 1)))) goto out;

  /* ---- prefill: the prompt into the store, then the held tokens back out of it ---- */
  double t0 = kvdex__now_s();
  if ((rc = kvdex_create(db, cfg->seq_id, sh))) goto out;
  st->created = 1;
  if ((rc = prefill(db, &L))) goto out;
  double t1 = kvdex__now_s();
  st->prefill_s = t1 - t0;
  if ((rc = load_held(db, &L)) || (rc = be->sync(be->ctx))) goto out;
  st->load_s = kvdex__now_s() - t1;

  /* ---- decode ---- */
  for (uint32_t step = 0; step < cfg->steps; step++) {
    uint64_t stored = cfg->context + step, n_tok = stored + 1;
    double check_s = 0, ts = kvdex__now_s(), ta;
    int32_t len32 = (int32_t)n_tok;
    if ((rc = be->upload(be->ctx, d_len, &len32, sizeof len32))) goto out;
    if ((rc = kvdex_append_begin(db, cfg->seq_id, &ap))) goto out;
    for (uint32_t l = 0; l < sh->n_layers; l++) {
      pool *p = &L.pools[l];
      /* the model's part: this layer's q and the new token's k, v */
      ta = kvdex__now_s();
      kvdex_gw_gen_kv(sh, cfg->seed, l, stored, gk, gv);
      kvdex__from_f32(sh->dtype, gk, k_new, row_f);
      kvdex__from_f32(sh->dtype, gv, v_new, row_f);
      gen_q(sh, cfg->seed, l, step, n_tok, q, tk, tv);
      st->gen_s += kvdex__now_s() - ta;

      /* local attention: the new token joins the pool, then sinks + window (or the
       * S2 shard) on the backend */
      ta = kvdex__now_s();
      for (uint32_t h = 0; h < Hkv && !rc; h++)
        rc = pool_put(&L, p, h, stored, 1, (char *)k_new + h * L.row_bytes,
                      (char *)v_new + h * L.row_bytes);
      if (rc || (rc = be->upload(be->ctx, d_q, q, qn * sizeof(float)))) goto out;
      if (p->s2)
        rc = be->s2_decode(be->ctx, &L.s2, d_q, &p->kv, d_len, (uint32_t)L.cap_tokens, d_o, d_lse,
                           d_ws, ws_bytes);
      else {
        kvdex_gpu_token_sel sel = {.seq_lens = d_len, .n_sink = cfg->sinks,
                                   .n_recent = cfg->window + 1};
        rc = be->sparse_decode(be->ctx, Hq, d_q, &p->kv, &sel, d_parts, d_lse_parts, d_ws,
                               ws_bytes);
      }
      if (rc || (rc = be->sync(be->ctx))) goto out;
      st->local_s += kvdex__now_s() - ta;

      if (p->s2) {
        ta = kvdex__now_s();
        if ((rc = be->download(be->ctx, o, d_o, qn * sizeof(float)))) goto out;
        st->merge_s += kvdex__now_s() - ta;
      } else {
        uint64_t lo = cfg->sinks < n_tok ? cfg->sinks : n_tok;
        uint64_t rs = n_tok > (uint64_t)cfg->window + 1 ? n_tok - cfg->window - 1 : 0;
        if (rs < lo) rs = lo;
        st->local_attended += (lo + (n_tok - rs)) * Hq;
        /* the store's part: every token outside sinks + window */
        kvdex_attend_item item = {.seq_id = cfg->seq_id, .q = q};
        kvdex_attend_options ao = {.k = cfg->k, .sinks = cfg->sinks, .window = cfg->window,
                                   .index = dense ? NULL : cfg->index, .dense = dense};
        kvdex_attend_info info;
        float *op[1] = {o_net}, *lp[1] = {lse_net};
        ta = kvdex__now_s();
        rc = kvdex_attend(db, l, &ao, 1, &item, op, lp, &info);
        st->store_s += kvdex__now_s() - ta;
        if (rc) goto out;
        st->store_cpu_s += info.seconds;
        st->store_attended += info.attended;
        /* merge the two partials by LSE on the backend */
        ta = kvdex__now_s();
        if ((rc = be->upload(be->ctx, d_parts + qn, o_net, qn * sizeof(float))) ||
            (rc = be->upload(be->ctx, d_lse_parts + Hq, lse_net, Hq * sizeof(float))) ||
            (rc = be->lse_merge(be->ctx, 2, Hq, D, d_parts, d_lse_parts, d_o, d_lse)) ||
            (rc = be->sync(be->ctx)) || (rc = be->download(be->ctx, o, d_o, qn * sizeof(float))))
          goto out;
        st->merge_s += kvdex__now_s() - ta;
      }

      /* checks and callbacks: not timed */
      ta = kvdex__now_s();
      if (L.full_k) {
        for (uint32_t h = 0; h < Hkv; h++) {
          size_t fo = ((size_t)h * L.cap_tokens + stored) * L.row_bytes;
          memcpy((char *)L.full_k[l] + fo, (char *)k_new + h * L.row_bytes, L.row_bytes);
          memcpy((char *)L.full_v[l] + fo, (char *)v_new + h * L.row_bytes, L.row_bytes);
        }
        check_one(&L, l, n_tok, q, o, ref_acc, ref_w, st);
      }
      if (output) output(cb_ctx, step, l, stored, q, k_new, v_new, o);
      check_s += kvdex__now_s() - ta;

      /* the new token's K/V to the store (committed with the step) */
      ta = kvdex__now_s();
      rc = kvdex_append_kv(ap, l, stored, 1, k_new, v_new);
      st->append_s += kvdex__now_s() - ta;
      if (rc) goto out;
    }
    ta = kvdex__now_s();
    rc = kvdex_append_commit(ap, NULL);
    ap = NULL;
    st->append_s += kvdex__now_s() - ta;
    if (rc) goto out;
    /* blocks nobody reads again go back to the free list: only blocks just below the
     * window (or just below an S2 layer's local blocks) can have left */
    uint64_t cur = n_tok / B, span = (cfg->window + 1) / B + L.s2.local_blocks + 2;
    for (uint32_t l = 0; l < sh->n_layers; l++)
      for (uint32_t h = 0; h < Hkv; h++)
        for (uint64_t j = cur > span ? cur - span : 0; j <= cur && j < L.max_blocks; j++)
          if (!held(&L, &L.pools[l], h, j, n_tok + 1)) pool_unmap(&L, &L.pools[l], h, (uint32_t)j);
    st->total_s += kvdex__now_s() - ts - check_s;
    st->steps_done = step + 1;
    if (progress) progress(cb_ctx, step, st);
  }

  /* ---- what the store holds now ---- */
  kvdex_seq_info info = {0};
  if ((rc = kvdex_stat(db, cfg->seq_id, &info))) goto out;
  st->final_tokens = UINT64_MAX;
  for (uint32_t l = 0; l < info.n_layers; l++)
    if (info.layer_tokens[l] < st->final_tokens) st->final_tokens = info.layer_tokens[l];
  if (!info.n_layers) st->final_tokens = 0;
  kvdex_seq_info_free(&info);
  for (uint32_t l = 0; l < sh->n_layers; l++)
    st->local_bytes += (uint64_t)(L.pools[l].cap - L.pools[l].n_free) * B * L.row_bytes * 2;

out:
  kvdex_append_abort(ap);
  if (L.pools)
    for (uint32_t l = 0; l < sh->n_layers; l++) pool_free(&L, &L.pools[l]);
  free(L.pools);
  if (L.full_k)
    for (uint32_t l = 0; l < sh->n_layers; l++) free(L.full_k[l]);
  if (L.full_v)
    for (uint32_t l = 0; l < sh->n_layers; l++) free(L.full_v[l]);
  free(L.full_k);
  free(L.full_v);
  be->free(be->ctx, d_q);
  be->free(be->ctx, d_parts);
  be->free(be->ctx, d_lse_parts);
  be->free(be->ctx, d_o);
  be->free(be->ctx, d_lse);
  be->free(be->ctx, d_len);
  be->free(be->ctx, d_ws);
  free(q);
  free(o);
  free(o_net);
  free(lse_net);
  free(gk);
  free(gv);
  free(tk);
  free(tv);
  free(k_new);
  free(v_new);
  free(ref_acc);
  free(ref_w);
  return rc;
}
