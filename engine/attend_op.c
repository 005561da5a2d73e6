/* attend_op: Attend and Retain for one layer (see attend_op.h). */
#include "engine/attend_op.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "index/ann.h"
#include "index/topk.h"
#include "kvstore/base.h"

struct kvdex_attend_ctx {
  kvdex_attend_scratch *as;
  kvdex_search_result res;
  uint64_t *ids;   /* [heads][cap_per] */
  size_t ids_cap;
  const uint64_t **idp;
  uint32_t *n_ids;
  uint32_t heads_cap;
  void *rows;      /* retained search: gathered key rows */
  float *sc;       /* and their scores */
  size_t rows_cap; /* rows */
};

int kvdex_attend_ctx_create(kvdex_attend_ctx **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "attend: NULL out");
  kvdex_attend_ctx *c = calloc(1, sizeof *c);
  if (!c || kvdex_attend_scratch_create(&c->as)) {
    kvdex_attend_ctx_destroy(c);
    return kvdex__seterr(KVDEX_ENOMEM, "attend: out of memory");
  }
  *out = c;
  return 0;
}

void kvdex_attend_ctx_destroy(kvdex_attend_ctx *c) {
  if (!c) return;
  kvdex_attend_scratch_destroy(c->as);
  kvdex_search_result_free(&c->res);
  free(c->ids);
  free(c->idp);
  free(c->n_ids);
  free(c->rows);
  free(c->sc);
  free(c);
}

static int ctx_ids(kvdex_attend_ctx *c, uint32_t heads, size_t per) {
  if (heads > c->heads_cap) {
    const uint64_t **p = realloc(c->idp, heads * sizeof *p);
    if (!p) return KVDEX_ENOMEM;
    c->idp = p;
    uint32_t *n = realloc(c->n_ids, heads * sizeof *n);
    if (!n) return KVDEX_ENOMEM;
    c->n_ids = n;
    c->heads_cap = heads;
  }
  size_t need = (size_t)heads * per;
  if (need > c->ids_cap) {
    uint64_t *ids = realloc(c->ids, need * sizeof *ids);
    if (!ids) return KVDEX_ENOMEM;
    c->ids = ids;
    c->ids_cap = need;
  }
  return 0;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return (x > y) - (x < y);
}

/* ---- the retained set ------------------------------------------------------------- */

typedef struct retained {
  uint32_t n_kv, budget;
  uint64_t ids[]; /* [n_kv][budget], ascending per kv head */
} retained;

uint32_t kvdex_retained_budget(kvdex_seq *seq, uint32_t layer) {
  kvdex_attachment *att = NULL;
  if (kvdex_attachment_get(seq, layer, KVDEX_RETAINED_SLOT, &att) || !att) return 0;
  uint32_t b = ((const retained *)kvdex_attachment_obj(att))->budget;
  kvdex_attachment_release(att);
  return b;
}

/* The retained search, with the context's row buffer (NULL ctx: one made here). */
static int retained_search(kvdex_seq *seq, uint32_t layer, const float *q,
                           const kvdex_search_opts *opts, kvdex_attend_ctx *c,
                           kvdex_search_result *res) {
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  if (!opts || !q || !res) return kvdex__seterr(KVDEX_EINVAL, "search: NULL argument");
  if (layer >= sh->n_layers)
    return kvdex__seterr(KVDEX_EINVAL, "search: layer %u out of [0, %u)", layer, sh->n_layers);
  if (!opts->k || opts->k > KVDEX_MAX_K)
    return kvdex__seterr(KVDEX_EINVAL, "search: k=%u out of [1, %d]", opts->k, KVDEX_MAX_K);
  const uint32_t n_q = sh->n_q_heads, group = n_q / sh->n_kv_heads, d = sh->head_dim;
  for (size_t i = 0; i < (size_t)n_q * d; i++)
    if (!isfinite(q[i]))
      return kvdex__seterr(KVDEX_EINVAL, "search: query element %zu (head %zu) is not finite", i,
                           i / d);
  kvdex_attachment *att = NULL;
  int rc = kvdex_attachment_get(seq, layer, KVDEX_RETAINED_SLOT, &att);
  if (rc) return rc;
  if (!att)
    return kvdex__seterr(KVDEX_ECONFLICT,
                         "search: index \"retained\": layer %u has no retained set (Retain with "
                         "materialize first)",
                         layer);
  const retained *r = kvdex_attachment_obj(att);
  const uint64_t n = kvdex_seq_tokens(seq, layer);
  const uint64_t lo = opts->sinks, hi = n > opts->window ? n - opts->window : 0;
  const size_t kk = opts->k < r->budget ? opts->k : r->budget;
  size_t es = kvdex_dtype_size(sh->dtype), rb = (size_t)d * es;
  if (c->rows_cap < r->budget) {
    void *rows = malloc((size_t)r->budget * rb);
    float *sc = malloc((size_t)r->budget * group * sizeof(float) + 1);
    if (!rows || !sc) {
      free(rows);
      free(sc);
      goto oom;
    }
    free(c->rows);
    free(c->sc);
    c->rows = rows;
    c->sc = sc;
    c->rows_cap = r->budget;
  }
  /* Last, so that a failed search leaves res as it was. */
  if ((rc = kvdex__search_result_reserve(res, n_q, kk))) goto oom;
  uint64_t scanned = 0;
  for (uint32_t g = 0; g < sh->n_kv_heads; g++) {
    kvdex_kv_view v;
    if ((rc = kvdex_seq_view(seq, layer, g, &v))) break;
    const uint64_t *ids = r->ids + (size_t)g * r->budget;
    size_t m = 0;
    uint64_t *keep = c->ids; /* ids of the gathered rows, in order (ctx_ids reserved) */
    for (uint32_t i = 0; i < r->budget; i++) {
      uint64_t t = ids[i];
      if (t < lo || t >= hi || t >= v.n_tokens) continue;
      const char *blk = (const char *)v.k_blocks[t / v.block_tokens];
      memcpy((char *)c->rows + m * rb, blk + (t % v.block_tokens) * rb, rb);
      keep[m++] = t;
    }
    scanned += m;
    kvdex_score_keys(KVDEX_SIMD_AUTO, sh->dtype, c->rows, m, d, q + (size_t)g * group * d, group,
                     c->sc);
    for (uint32_t j = 0; j < group; j++) {
      kvdex__topk t;
      kvdex__topk_init(&t, res->heads[g * group + j].hits, (uint32_t)kk);
      for (size_t i = 0; i < m; i++) kvdex__topk_push(&t, keep[i], c->sc[(size_t)j * m + i]);
      res->heads[g * group + j].n_hits = kvdex__topk_finish(&t);
    }
  }
  kvdex_attachment_release(att);
  if (rc) return rc;
  res->keys_scanned = scanned;
  res->tokens = n;
  return 0;
oom:
  kvdex_attachment_release(att);
  return kvdex__seterr(KVDEX_ENOMEM, "search: out of memory (retained set)");
}

int kvdex_retained_search(kvdex_seq *seq, uint32_t layer, const float *q,
                          const kvdex_search_opts *opts, kvdex_attend_ctx *ctx,
                          kvdex_search_result *res) {
  if (!seq) return kvdex__seterr(KVDEX_EINVAL, "search: NULL sequence");
  kvdex_attend_ctx *c = ctx;
  int rc = c ? KVDEX_OK : kvdex_attend_ctx_create(&c);
  if (rc) return rc;
  uint32_t b = kvdex_retained_budget(seq, layer);
  if ((rc = ctx_ids(c, 1, b ? b : 1)))
    rc = kvdex__seterr(KVDEX_ENOMEM, "search: out of memory");
  else
    rc = retained_search(seq, layer, q, opts, c, res);
  if (c != ctx) kvdex_attend_ctx_destroy(c);
  return rc;
}

/* ---- Attend --------------------------------------------------------------------- */

int kvdex_attend_layer(kvdex_indexer *ixr, kvdex_seq *seq, uint32_t layer, const float *q,
                       const kvdex_attend_req *req, kvdex_pool *pool, kvdex_attend_ctx *c,
                       float *o, float *lse, kvdex_attend_stats *stats) {
  if (!seq || !q || !req || !c || !o || !lse)
    return kvdex__seterr(KVDEX_EINVAL, "attend: NULL argument");
  const double t0 = kvdex__now_s();
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  if (layer >= sh->n_layers)
    return kvdex__seterr(KVDEX_EINVAL, "attend: layer %u out of [0, %u)", layer, sh->n_layers);
  if (!req->dense && (req->k == 0 || req->k > KVDEX_MAX_K))
    return kvdex__seterr(KVDEX_EINVAL, "attend: k=%u out of [1, %d]", req->k, KVDEX_MAX_K);
  if (!(req->scale >= 0) || !isfinite(req->scale))
    return kvdex__seterr(KVDEX_EINVAL, "attend: scale must be finite and >= 0");
  if (req->n_extra > KVDEX_MAX_EXTRA_TOKENS || (req->n_extra && !req->extra))
    return kvdex__seterr(KVDEX_EINVAL, "attend: %u extra tokens (at most %d)", req->n_extra,
                         KVDEX_MAX_EXTRA_TOKENS);
  const uint32_t n_q = sh->n_q_heads, d = sh->head_dim;
  const uint64_t n = kvdex_seq_tokens(seq, layer);
  const uint64_t lo = req->sinks, hi = n > req->window ? n - req->window : 0;
  for (uint32_t i = 0; i < req->n_extra; i++) {
    uint64_t t = req->extra[i];
    if (t >= n)
      return kvdex__seterr(KVDEX_EINVAL, "attend: extra token %llu is not stored (%llu tokens)",
                           (unsigned long long)t, (unsigned long long)n);
    if (t < lo || t >= hi)
      return kvdex__seterr(KVDEX_EINVAL,
                           "attend: extra token %llu is in the sinks or the window, which the "
                           "caller attends itself",
                           (unsigned long long)t);
  }
  for (size_t i = 0; i < (size_t)n_q * d; i++)
    if (!isfinite(q[i]))
      return kvdex__seterr(KVDEX_EINVAL, "attend: query element %zu (head %zu) is not finite", i,
                           i / d);
  kvdex_attend_opts ao = {.scale = req->scale};
  kvdex_attend_stats st = {0, n, 0, "dense", 0};
  int rc;
  if (req->dense) {
    if ((rc = kvdex_attend_dense(seq, layer, q, lo, req->window, &ao, pool, c->as, o, lse)))
      return rc;
    uint64_t eligible = hi > lo ? hi - lo : 0;
    st.keys_touched = eligible * sh->n_kv_heads;
    for (uint32_t h = 0; h < n_q; h++) {
      if (req->streaming && req->streaming[h]) {
        memset(o + (size_t)h * d, 0, d * sizeof(float));
        lse[h] = -INFINITY;
      } else {
        st.attended += eligible;
      }
    }
    st.seconds = kvdex__now_s() - t0;
    if (stats) *stats = st;
    return 0;
  }
  const char *index = req->index && *req->index ? req->index : "exact";
  kvdex_search_opts so = {.k = req->k, .sinks = req->sinks, .window = req->window};
  const bool ret = strcmp(index, "retained") == 0;
  size_t per = (size_t)req->k + req->n_extra;
  if (ret) {
    uint32_t b = kvdex_retained_budget(seq, layer);
    if (b > per) per = b;
  }
  if ((rc = ctx_ids(c, n_q, per)))
    return kvdex__seterr(KVDEX_ENOMEM, "attend: out of memory for %u x %zu ids", n_q, per);
  if (ret) {
    rc = retained_search(seq, layer, q, &so, c, &c->res);
    st.used = "retained";
  } else {
    rc = kvdex_indexer_search(ixr, seq, layer, q, &so, index, req->params, &c->res, &st.used);
  }
  if (rc) return rc;
  st.keys_touched = c->res.keys_scanned;
  for (uint32_t h = 0; h < n_q; h++) {
    uint64_t *ids = c->ids + (size_t)h * per;
    uint32_t m = 0;
    if (!(req->streaming && req->streaming[h])) {
      const kvdex_head_result *hr = &c->res.heads[h];
      for (uint32_t i = 0; i < hr->n_hits; i++) ids[m++] = hr->hits[i].id;
      for (uint32_t i = 0; i < req->n_extra; i++) ids[m++] = req->extra[i];
      qsort(ids, m, sizeof *ids, cmp_u64);
      uint32_t u = 0;
      for (uint32_t i = 0; i < m; i++)
        if (!u || ids[i] != ids[u - 1]) ids[u++] = ids[i];
      m = u;
    }
    c->idp[h] = ids;
    c->n_ids[h] = m;
    st.attended += m;
  }
  if ((rc = kvdex_attend_ids(seq, layer, q, c->idp, c->n_ids, &ao, pool, c->as, o, lse)))
    return rc;
  st.seconds = kvdex__now_s() - t0;
  if (stats) *stats = st;
  return 0;
}

/* ---- Retain ---------------------------------------------------------------------- */

int kvdex_retain_layer(kvdex_seq *seq, uint32_t layer, const float *q_obs, uint32_t n_obs,
                       const kvdex_retain_opts *opts, int materialize, kvdex_pool *pool,
                       kvdex_attend_ctx *c, uint64_t *ids, float *scores) {
  if (!seq || !opts || !c || !ids) return kvdex__seterr(KVDEX_EINVAL, "retain: NULL argument");
  int rc = kvdex_retain_select(seq, layer, q_obs, n_obs, opts, pool, c->as, ids, scores);
  if (rc || !materialize) return rc;
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  size_t cnt = (size_t)sh->n_kv_heads * opts->budget;
  retained *r = malloc(sizeof *r + cnt * sizeof(uint64_t));
  if (!r) return kvdex__seterr(KVDEX_ENOMEM, "retain: out of memory");
  r->n_kv = sh->n_kv_heads;
  r->budget = opts->budget;
  memcpy(r->ids, ids, cnt * sizeof(uint64_t));
  rc = kvdex_seq_attach(seq, layer, KVDEX_RETAINED_SLOT, r, sizeof *r + cnt * sizeof(uint64_t),
                        free);
  if (rc) {
    free(r);
    return rc;
  }
  return 0;
}
