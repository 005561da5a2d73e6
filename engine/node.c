/* node: one kvdex node's operations over its store, pool and indexer (see node.h).
 * Mostly thin: the work is in kvstore/, index/, indexer.c and attend_op.c. What lives
 * here is what the server and the embedded client used to repeat: the hidden-sequence
 * rule of open, stat's gathering, the search's choice of retained set vs indexer, and
 * the free list of per-call contexts (its only lock).
 */
#include "engine/node.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define KEEP_CTX_DEFAULT 16

struct kvdex_node_ctx {
  kvdex_node_ctx *next; /* in the node's free list */
  kvdex_attend_ctx *actx;
  kvdex_search_result res;
  float *f;
  size_t f_cap;
};

struct kvdex_node {
  kvdex_store *store;
  kvdex_pool *pool;
  bool owns; /* the store and the pool */
  kvdex_indexer *indexer;
  pthread_mutex_t mu; /* guards idle and n_idle */
  kvdex_node_ctx *idle;
  unsigned n_idle, keep_ctx;
};

struct kvdex_node_txn {
  kvdex_txn *txn;
};

/* ---- the node ----------------------------------------------------------------------- */

static void ctx_free(kvdex_node_ctx *c) {
  if (!c) return;
  kvdex_attend_ctx_destroy(c->actx);
  kvdex_search_result_free(&c->res);
  free(c->f);
  free(c);
}

int kvdex_node_create(const kvdex_node_opts *opts, kvdex_node **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "node: out is NULL");
  *out = NULL;
  const kvdex_node_opts none = {0};
  if (!opts) opts = &none;
  kvdex_node *n = calloc(1, sizeof *n);
  if (!n) return kvdex__seterr(KVDEX_ENOMEM, "node: out of memory");
  pthread_mutex_init(&n->mu, NULL);
  n->keep_ctx = opts->keep_ctx ? opts->keep_ctx : KEEP_CTX_DEFAULT;
  int rc = KVDEX_OK;
  if (opts->store) {
    n->store = opts->store;
    n->pool = opts->pool;
  } else {
    n->owns = true;
    rc = kvdex_store_create(opts->memory_cap, &n->store);
    if (!rc) rc = kvdex_pool_create(opts->threads, &n->pool);
  }
  if (!rc) rc = kvdex_indexer_create(n->pool, opts->build_threads, &n->indexer);
  if (rc) {
    kvdex_node_destroy(n);
    return rc;
  }
  *out = n;
  return KVDEX_OK;
}

void kvdex_node_destroy(kvdex_node *node) {
  if (!node) return;
  kvdex_indexer_destroy(node->indexer); /* before the pool and store it uses */
  while (node->idle) {
    kvdex_node_ctx *c = node->idle;
    node->idle = c->next;
    ctx_free(c);
  }
  pthread_mutex_destroy(&node->mu);
  if (node->owns) {
    kvdex_pool_destroy(node->pool);
    kvdex_store_destroy(node->store);
  }
  free(node);
}

void kvdex_node_store_stats(kvdex_node *node, kvdex_store_stats *out) {
  kvdex_store_stats_get(node->store, out);
}

/* ---- per-call contexts ---------------------------------------------------------- */

int kvdex_node_ctx_take(kvdex_node *node, kvdex_node_ctx **out) {
  pthread_mutex_lock(&node->mu);
  kvdex_node_ctx *c = node->idle;
  if (c) {
    node->idle = c->next;
    node->n_idle--;
  }
  pthread_mutex_unlock(&node->mu);
  if (!c) {
    c = calloc(1, sizeof *c);
    if (!c) return kvdex__seterr(KVDEX_ENOMEM, "node: out of memory for a call context");
    int rc = kvdex_attend_ctx_create(&c->actx);
    if (rc) {
      free(c);
      return rc;
    }
  }
  c->next = NULL;
  *out = c;
  return KVDEX_OK;
}

void kvdex_node_ctx_give(kvdex_node *node, kvdex_node_ctx *ctx) {
  if (!ctx) return;
  pthread_mutex_lock(&node->mu);
  if (node->n_idle < node->keep_ctx) {
    ctx->next = node->idle;
    node->idle = ctx;
    node->n_idle++;
    ctx = NULL;
  }
  pthread_mutex_unlock(&node->mu);
  ctx_free(ctx); /* no room to keep it */
}

float *kvdex_node_ctx_floats(kvdex_node_ctx *ctx, size_t n) {
  if (ctx->f_cap < n || !ctx->f) {
    size_t cap = n ? n : 1;
    float *f = cap <= SIZE_MAX / sizeof(float) ? realloc(ctx->f, cap * sizeof(float)) : NULL;
    if (!f) {
      kvdex__seterr(KVDEX_ENOMEM, "out of memory for %zu query floats", n);
      return NULL;
    }
    ctx->f = f;
    ctx->f_cap = cap;
  }
  return ctx->f;
}

/* ---- sequences -------------------------------------------------------------------- */

int kvdex_node_create_seq(kvdex_node *node, const char *ns, const char *seq_id,
                          const kvdex_shape *shape, int importing) {
  int rc = kvdex__shape_check(shape);
  if (rc) return rc;
  return kvdex_seq_create_ex(node->store, ns, seq_id, shape, importing);
}

int kvdex_node_delete_seq(kvdex_node *node, const char *ns, const char *seq_id,
                          uint64_t *bytes_freed) {
  return kvdex_seq_delete(node->store, ns, seq_id, bytes_freed);
}

int kvdex_node_open(kvdex_node *node, const char *ns, const char *seq_id, int hidden_ok,
                    kvdex_seq **out) {
  int rc = kvdex_seq_open(node->store, ns, seq_id, out);
  if (rc || hidden_ok || !kvdex_seq_importing(*out)) return rc;
  kvdex_seq_release(*out);
  *out = NULL;
  return kvdex__seterr(KVDEX_ENOTFOUND,
                       "sequence %s/%s is not here yet (a copy is being imported; hidden "
                       "until PublishSequence)",
                       ns && ns[0] ? ns : KVDEX_DEFAULT_NAMESPACE, seq_id);
}

void kvdex_node_publish(kvdex_node *node, kvdex_seq *seq) {
  (void)node;
  kvdex_seq_publish(seq);
}

int kvdex_node_stat(kvdex_node *node, kvdex_seq *seq, kvdex_node_info *out) {
  memset(out, 0, sizeof *out);
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  const uint32_t nl = sh->n_layers;
  out->shape = *sh;
  out->layer_tokens = malloc(nl * sizeof(uint64_t));
  out->layer_query_tokens = malloc(nl * sizeof(uint64_t));
  out->layer_landmark_blocks = malloc(nl * sizeof(uint64_t));
  if (!out->layer_tokens || !out->layer_query_tokens || !out->layer_landmark_blocks) goto oom;
  for (uint32_t l = 0; l < nl; l++) {
    out->layer_tokens[l] = kvdex_seq_tokens(seq, l);
    out->layer_query_tokens[l] = kvdex_seq_query_tokens(seq, l);
    out->layer_landmark_blocks[l] = kvdex_seq_landmark_blocks(seq, l);
  }
  /* Layers that have had a build; the array is sized at the first of them. */
  for (uint32_t l = 0; l < nl; l++) {
    kvdex_layer_index ii;
    if (kvdex_indexer_info_get(node->indexer, seq, l, &ii) || ii.state == KVDEX_INDEX_NONE)
      continue;
    if (!out->indexes && !(out->indexes = malloc((nl - l) * sizeof *out->indexes))) goto oom;
    out->indexes[out->n_indexes++] = ii;
  }
  out->bytes = kvdex_seq_bytes(seq);
  out->importing = kvdex_seq_importing(seq) != 0;
  return KVDEX_OK;
oom:
  kvdex_node_info_free(out);
  return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
}

void kvdex_node_info_free(kvdex_node_info *info) {
  if (!info) return;
  free(info->layer_tokens);
  free(info->layer_query_tokens);
  free(info->layer_landmark_blocks);
  free(info->indexes);
  memset(info, 0, sizeof *info);
}

void kvdex_node_list(kvdex_node *node, const char *ns, kvdex_seq_visit_fn fn, void *ctx) {
  kvdex_store_list(node->store, ns, fn, ctx);
}

typedef struct ids_ctx {
  char **ids;
  size_t n, cap;
  bool oom;
} ids_ctx;

static void ids_visit(void *ctx, kvdex_seq *seq) {
  ids_ctx *c = ctx;
  if (c->oom) return;
  if (c->n == c->cap) {
    size_t cap = c->cap ? c->cap * 2 : 16;
    char **ids = realloc(c->ids, cap * sizeof *ids);
    if (!ids) {
      c->oom = true;
      return;
    }
    c->ids = ids;
    c->cap = cap;
  }
  char *id = strdup(kvdex_seq_id(seq));
  if (!id) {
    c->oom = true;
    return;
  }
  c->ids[c->n++] = id;
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

int kvdex_node_list_ids(kvdex_node *node, const char *ns, char ***ids, size_t *n) {
  ids_ctx c = {0};
  kvdex_store_list(node->store, ns, ids_visit, &c);
  if (c.oom) {
    for (size_t i = 0; i < c.n; i++) free(c.ids[i]);
    free(c.ids);
    return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  }
  if (c.n > 1) qsort(c.ids, c.n, sizeof *c.ids, cmp_str);
  *ids = c.ids;
  *n = c.n;
  return KVDEX_OK;
}

/* ---- append and read -------------------------------------------------------------- */

int kvdex_node_append_begin(kvdex_node *node, kvdex_seq *seq, kvdex_node_txn **out) {
  (void)node;
  kvdex_node_txn *t = calloc(1, sizeof *t);
  if (!t) return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  int rc = kvdex_txn_begin(seq, &t->txn);
  if (rc) {
    free(t);
    return rc;
  }
  *out = t;
  return KVDEX_OK;
}

int kvdex_node_append(kvdex_node_txn *t, uint32_t layer, uint64_t token_start,
                      uint32_t n_tokens, const void *k, const void *v, const void *q,
                      const void *landmarks) {
  int rc = kvdex_txn_append(t->txn, layer, token_start, n_tokens, k, v);
  if (!rc && q) rc = kvdex_txn_append_q(t->txn, layer, token_start, n_tokens, q);
  if (!rc && landmarks)
    rc = kvdex_txn_append_landmarks(t->txn, layer, token_start, n_tokens, landmarks);
  return rc;
}

int kvdex_node_append_commit(kvdex_node_txn *t, kvdex_txn_result *res) {
  int rc = kvdex_txn_commit(t->txn, res);
  free(t);
  return rc;
}

void kvdex_node_append_abort(kvdex_node_txn *t) {
  if (!t) return;
  kvdex_txn_abort(t->txn);
  free(t);
}

int kvdex_node_read(kvdex_node *node, kvdex_seq *seq, uint32_t layer, const uint64_t *token_ids,
                    size_t n, void *k_out, void *v_out) {
  (void)node;
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  if (layer >= sh->n_layers)
    return kvdex__seterr(KVDEX_EINVAL, "layer %u out of range (n_layers %u)", layer,
                         sh->n_layers);
  return n ? kvdex_seq_read(seq, layer, token_ids, n, k_out, v_out) : KVDEX_OK;
}

int kvdex_node_read_hits(kvdex_node *node, kvdex_seq *seq, uint32_t layer, uint32_t kv_head,
                         const kvdex_hit *hits, uint32_t n, void *k_out, void *v_out) {
  (void)node;
  kvdex_kv_view view;
  int rc = kvdex_seq_view(seq, layer, kv_head, &view);
  if (rc) return rc;
  size_t row = (size_t)view.head_dim * kvdex_dtype_size(view.dtype);
  for (uint32_t i = 0; i < n; i++) {
    uint64_t t = hits[i].id;
    if (t >= view.n_tokens)
      return kvdex__seterr(KVDEX_EINTERNAL, "hit %llu beyond the %llu committed tokens",
                           (unsigned long long)t, (unsigned long long)view.n_tokens);
    uint64_t b = t / view.block_tokens, off = t % view.block_tokens;
    memcpy((uint8_t *)k_out + i * row, (const uint8_t *)view.k_blocks[b] + off * row, row);
    memcpy((uint8_t *)v_out + i * row, (const uint8_t *)view.v_blocks[b] + off * row, row);
  }
  return KVDEX_OK;
}

int kvdex_node_read_queries(kvdex_node *node, kvdex_seq *seq, uint32_t layer, float **q,
                            uint64_t **ids, uint64_t *n) {
  (void)node;
  return kvdex_seq_queries(seq, layer, 0, kvdex_seq_shape(seq)->n_q_heads, q, n, ids);
}

int kvdex_node_read_landmarks(kvdex_node *node, kvdex_seq *seq, uint32_t layer, float **lm,
                              uint64_t *n_blocks) {
  (void)node;
  *lm = NULL;
  *n_blocks = 0;
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  uint64_t nb = kvdex_seq_landmark_blocks(seq, layer);
  if (!nb) return KVDEX_OK;
  size_t per_head = (size_t)nb * sh->head_dim;
  float *buf = malloc(per_head * sh->n_kv_heads * sizeof(float));
  if (!buf)
    return kvdex__seterr(KVDEX_ENOMEM, "out of memory for %llu landmark blocks",
                         (unsigned long long)nb);
  for (uint32_t h = 0; h < sh->n_kv_heads; h++) {
    uint64_t got = 0;
    int rc = kvdex_seq_landmarks(seq, layer, h, nb, buf + h * per_head, &got);
    /* Landmarks never go away once committed, so the count read above is all there. */
    if (!rc && got != nb)
      rc = kvdex__seterr(KVDEX_EINTERNAL, "landmarks: %llu of %llu blocks",
                         (unsigned long long)got, (unsigned long long)nb);
    if (rc) {
      free(buf);
      return rc;
    }
  }
  *lm = buf;
  *n_blocks = nb;
  return KVDEX_OK;
}

/* ---- retrieval -------------------------------------------------------------------- */

int kvdex_node_build_index(kvdex_node *node, kvdex_seq *seq, uint32_t layer, const char *spec,
                           uint32_t *layers, uint32_t *n_queued) {
  return kvdex_indexer_build(node->indexer, seq, layer, spec, layers, n_queued);
}

int kvdex_node_index_info(kvdex_node *node, kvdex_seq *seq, uint32_t layer,
                          kvdex_layer_index *out) {
  return kvdex_indexer_info_get(node->indexer, seq, layer, out);
}

static bool is_retained(const char *index) { return index && !strcmp(index, "retained"); }

int kvdex_node_check_index(const char *index) {
  return is_retained(index) ? KVDEX_OK : kvdex_indexer_check_index(index);
}

int kvdex_node_search(kvdex_node *node, kvdex_node_ctx *ctx, kvdex_seq *seq, uint32_t layer,
                      const float *q, const kvdex_search_opts *opts, const char *index,
                      const kvdex_index_params *params, const kvdex_search_result **res,
                      const char **used) {
  const char *u = "exact";
  int rc;
  if (is_retained(index)) {
    u = "retained";
    rc = kvdex_retained_search(seq, layer, q, opts, ctx->actx, &ctx->res);
  } else {
    rc = kvdex_indexer_search(node->indexer, seq, layer, q, opts, index, params, &ctx->res, &u);
  }
  if (rc) return rc;
  *res = &ctx->res;
  if (used) *used = u;
  return KVDEX_OK;
}

int kvdex_node_attend(kvdex_node *node, kvdex_node_ctx *ctx, kvdex_seq *seq, uint32_t layer,
                      const float *q, const kvdex_attend_req *req, float *o, float *lse,
                      kvdex_attend_stats *stats) {
  return kvdex_attend_layer(node->indexer, seq, layer, q, req, node->pool, ctx->actx, o, lse,
                            stats);
}

int kvdex_node_retain(kvdex_node *node, kvdex_node_ctx *ctx, kvdex_seq *seq, uint32_t layer,
                      const float *q_obs, uint32_t n_obs, const kvdex_retain_opts *opts,
                      int materialize, uint64_t *ids, float *scores) {
  return kvdex_retain_layer(seq, layer, q_obs, n_obs, opts, materialize, node->pool, ctx->actx,
                            ids, scores);
}
