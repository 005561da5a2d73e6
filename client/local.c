/* local.c — the embedded transport ("local:"): the client owns a kvdex_store, a
 * kvdex_pool and an indexer (one build thread) in this process and calls kvstore/,
 * index/ and workers/indexer.h directly, with no serialisation. Appends are kvstore
 * transactions, reads kvdex_seq_read, searches and index builds go through the
 * indexer, as in the server; attend and retain run workers/attend_op.h on the
 * handle's pool. Its only lock guards free lists of index search scratch objects and
 * attend contexts; the modules it calls are thread-safe.
 */
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "client/client_int.h"
#include "index/ann.h"
#include "index/index.h"
#include "kvstore/kvstore.h"
#include "workers/attend_op.h"
#include "workers/indexer.h"

#define SCRATCH_KEEP 16 /* idle index search scratch objects kept for reuse */

typedef struct local_db {
  kvdex_db base;
  kvdex_store *store;
  kvdex_pool *pool;
  kvdex_indexer *indexer;
  pthread_mutex_t scratch_mu; /* guards scratch[] and actx[] */
  kvdex_index_scratch *scratch[SCRATCH_KEEP];
  unsigned n_scratch;
  kvdex_attend_ctx *actx[SCRATCH_KEEP];
  unsigned n_actx;
} local_db;

typedef struct local_appender {
  kvdex_appender base;
  kvdex_txn *txn;
} local_appender;

static local_db *as_local(kvdex_db *db) { return (local_db *)db; }

static void local_close(kvdex_db *db) {
  local_db *l = as_local(db);
  kvdex_indexer_destroy(l->indexer); /* before the pool and store it uses */
  for (unsigned i = 0; i < l->n_scratch; i++) kvdex_index_scratch_destroy(l->scratch[i]);
  for (unsigned i = 0; i < l->n_actx; i++) kvdex_attend_ctx_destroy(l->actx[i]);
  pthread_mutex_destroy(&l->scratch_mu);
  kvdex_pool_destroy(l->pool);
  kvdex_store_destroy(l->store);
  free(l);
}

/* A scratch for one indexed search: a kept one, or a new one (NULL when out of memory:
 * the search then makes its own). */
static kvdex_index_scratch *scratch_take(local_db *l) {
  kvdex_index_scratch *s = NULL;
  pthread_mutex_lock(&l->scratch_mu);
  if (l->n_scratch) s = l->scratch[--l->n_scratch];
  pthread_mutex_unlock(&l->scratch_mu);
  if (!s && kvdex_index_scratch_create(&s)) s = NULL;
  return s;
}

static void scratch_give(local_db *l, kvdex_index_scratch *s) {
  if (!s) return;
  pthread_mutex_lock(&l->scratch_mu);
  if (l->n_scratch < SCRATCH_KEEP) {
    l->scratch[l->n_scratch++] = s;
    s = NULL;
  }
  pthread_mutex_unlock(&l->scratch_mu);
  kvdex_index_scratch_destroy(s);
}

/* An attend context: a kept one (warm: no allocation), or a new one. */
static int actx_take(local_db *l, kvdex_attend_ctx **out) {
  kvdex_attend_ctx *c = NULL;
  pthread_mutex_lock(&l->scratch_mu);
  if (l->n_actx) c = l->actx[--l->n_actx];
  pthread_mutex_unlock(&l->scratch_mu);
  if (!c) return kvdex_attend_ctx_create(out);
  *out = c;
  return KVDEX_OK;
}

static void actx_give(local_db *l, kvdex_attend_ctx *c) {
  if (!c) return;
  pthread_mutex_lock(&l->scratch_mu);
  if (l->n_actx < SCRATCH_KEEP) {
    l->actx[l->n_actx++] = c;
    c = NULL;
  }
  pthread_mutex_unlock(&l->scratch_mu);
  kvdex_attend_ctx_destroy(c);
}

static int local_create(kvdex_db *db, const char *seq_id, const kvdex_shape *shape) {
  return kvdex_seq_create(as_local(db)->store, db->ns, seq_id, shape);
}

static int local_del(kvdex_db *db, const char *seq_id, uint64_t *bytes_freed) {
  return kvdex_seq_delete(as_local(db)->store, db->ns, seq_id, bytes_freed);
}

static int local_stat(kvdex_db *db, const char *seq_id, kvdex_seq_info *info) {
  kvdex_seq *seq;
  int rc = kvdex_seq_open(as_local(db)->store, db->ns, seq_id, &seq);
  if (rc) return rc;
  const kvdex_shape *shape = kvdex_seq_shape(seq);
  uint64_t *tokens = malloc((size_t)shape->n_layers * sizeof *tokens);
  if (!tokens) {
    kvdex_seq_release(seq);
    return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  }
  uint64_t *qtokens = malloc((size_t)shape->n_layers * sizeof *qtokens);
  uint64_t *lmblocks = malloc((size_t)shape->n_layers * sizeof *lmblocks);
  kvdex_layer_index *ix = NULL;
  uint32_t n_ix = 0;
  int rc2 = qtokens && lmblocks ? KVDEX_OK : kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  for (uint32_t l = 0; l < shape->n_layers && !rc2; l++) {
    tokens[l] = kvdex_seq_tokens(seq, l);
    qtokens[l] = kvdex_seq_query_tokens(seq, l);
    lmblocks[l] = kvdex_seq_landmark_blocks(seq, l);
    kvdex_indexer_info ii;
    rc2 = kvdex_indexer_info_get(as_local(db)->indexer, seq, l, &ii);
    if (rc2 || ii.state == KVDEX_INDEXER_NONE) continue;
    if (!ix && !(ix = calloc(shape->n_layers - l, sizeof *ix))) {
      rc2 = kvdex__seterr(KVDEX_ENOMEM, "out of memory");
      break;
    }
    kvdex_layer_index *li = &ix[n_ix++];
    li->layer = l;
    li->state = ii.state;
    snprintf(li->spec, sizeof li->spec, "%s", ii.spec);
    snprintf(li->error, sizeof li->error, "%s", ii.error);
    snprintf(li->kind, sizeof li->kind, "%s", ii.kind);
    snprintf(li->describe, sizeof li->describe, "%s", ii.describe);
    li->build_seconds = ii.build_seconds;
    li->memory_bytes = ii.memory_bytes;
    li->tokens = ii.tokens;
  }
  if (rc2) {
    free(tokens);
    free(qtokens);
    free(lmblocks);
    free(ix);
    kvdex_seq_release(seq);
    return rc2;
  }
  info->shape = *shape;
  info->bytes = kvdex_seq_bytes(seq);
  info->n_layers = shape->n_layers;
  info->layer_tokens = tokens;
  info->layer_query_tokens = qtokens;
  info->layer_landmark_blocks = lmblocks;
  info->n_indexes = n_ix;
  info->indexes = ix;
  kvdex_seq_release(seq);
  return KVDEX_OK;
}

typedef struct list_ctx {
  char **ids;
  size_t n, cap;
  int oom;
} list_ctx;

static void list_visit(void *ctx, kvdex_seq *seq) {
  list_ctx *c = ctx;
  if (c->oom) return;
  if (c->n == c->cap) {
    size_t cap = c->cap ? c->cap * 2 : 16;
    char **ids = realloc(c->ids, cap * sizeof *ids);
    if (!ids) {
      c->oom = 1;
      return;
    }
    c->ids = ids;
    c->cap = cap;
  }
  char *id = strdup(kvdex_seq_id(seq));
  if (!id) {
    c->oom = 1;
    return;
  }
  c->ids[c->n++] = id;
}

static int local_list(kvdex_db *db, char ***ids, size_t *n) {
  list_ctx c = {0};
  kvdex_store_list(as_local(db)->store, db->ns, list_visit, &c);
  if (c.oom) {
    kvdex_list_free(c.ids, c.n);
    return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  }
  kvdex__sort_ids(c.ids, c.n);
  *ids = c.ids;
  *n = c.n;
  return KVDEX_OK;
}

static int local_append_begin(kvdex_db *db, const char *seq_id, kvdex_appender **out) {
  kvdex_seq *seq;
  int rc = kvdex_seq_open(as_local(db)->store, db->ns, seq_id, &seq);
  if (rc) return rc;
  local_appender *ap = calloc(1, sizeof *ap);
  if (!ap) {
    kvdex_seq_release(seq);
    return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  }
  rc = kvdex_txn_begin(seq, &ap->txn); /* the transaction holds its own reference */
  if (rc) {
    kvdex_seq_release(seq);
    free(ap);
    return rc;
  }
  ap->base.db = db;
  ap->base.shape = *kvdex_seq_shape(seq);
  kvdex_seq_release(seq);
  *out = &ap->base;
  return KVDEX_OK;
}

static int local_append_kv(kvdex_appender *ap, uint32_t layer, uint64_t token_start,
                           uint32_t n_tokens, const void *k, const void *v, const void *q,
                           const void *landmarks) {
  kvdex_txn *txn = ((local_appender *)ap)->txn;
  int rc = kvdex_txn_append(txn, layer, token_start, n_tokens, k, v);
  if (!rc && q) rc = kvdex_txn_append_q(txn, layer, token_start, n_tokens, q);
  if (!rc && landmarks)
    rc = kvdex_txn_append_landmarks(txn, layer, token_start, n_tokens, landmarks);
  return rc;
}

static int local_append_commit(kvdex_appender *ap, uint64_t *tokens_appended) {
  local_appender *la = (local_appender *)ap;
  kvdex_txn_result res = {0};
  int rc = kvdex_txn_commit(la->txn, &res);
  free(la);
  if (rc) return rc;
  if (tokens_appended) *tokens_appended = res.tokens_appended;
  return KVDEX_OK;
}

static void local_append_abort(kvdex_appender *ap) {
  local_appender *la = (local_appender *)ap;
  kvdex_txn_abort(la->txn);
  free(la);
}

static int local_read(kvdex_db *db, const char *seq_id, uint32_t layer, const uint64_t *token_ids,
                      size_t n, void *k_out, void *v_out) {
  kvdex_seq *seq;
  int rc = kvdex_seq_open(as_local(db)->store, db->ns, seq_id, &seq);
  if (rc) return rc;
  const kvdex_shape *shape = kvdex_seq_shape(seq);
  if (layer >= shape->n_layers)
    rc = kvdex__seterr(KVDEX_EINVAL, "layer %u out of range (n_layers %u)", layer,
                       shape->n_layers);
  else if (n > 0)
    rc = kvdex_seq_read(seq, layer, token_ids, n, k_out, v_out);
  kvdex_seq_release(seq);
  return rc;
}

/* Copies one sequence's result into a freshly allocated kvdex_search_out. */
static int convert_result(const kvdex_search_result *res, const char *used,
                          kvdex_search_out *out) {
  size_t total = 0;
  for (uint32_t h = 0; h < res->n_q_heads; h++) total += res->heads[h].n_hits;
  uint64_t *ids;
  float *scores;
  int rc = kvdex__search_out_alloc(out, res->n_q_heads, total, &ids, &scores);
  if (rc) return rc;
  for (uint32_t h = 0; h < res->n_q_heads; h++) {
    const kvdex_head_result *hr = &res->heads[h];
    out->heads[h].n = hr->n_hits;
    out->heads[h].ids = ids;
    out->heads[h].scores = scores;
    for (uint32_t i = 0; i < hr->n_hits; i++) {
      ids[i] = hr->hits[i].id;
      scores[i] = hr->hits[i].score;
    }
    ids += hr->n_hits;
    scores += hr->n_hits;
  }
  out->keys_scanned = res->keys_scanned;
  out->tokens = res->tokens;
  snprintf(out->index, sizeof out->index, "%s", used);
  return KVDEX_OK;
}

static int local_search(kvdex_db *db, uint32_t layer, const kvdex_search_req *req, size_t n_seqs,
                        const char *const *seq_ids, const float *const *q,
                        kvdex_search_out *out) {
  local_db *l = as_local(db);
  kvdex_search_opts so = {.k = req->k, .sinks = req->sinks, .window = req->window,
                          .simd = KVDEX_SIMD_AUTO};
  kvdex_index_params params = {.ef = req->ef, .nprobe = req->nprobe, .blocks = req->blocks};
  kvdex_search_result res = {0};
  bool retained = req->index && strcmp(req->index, "retained") == 0;
  int rc = retained ? KVDEX_OK : kvdex_indexer_check_index(req->index);
  if (rc) return kvdex__preerr(rc, "index");
  bool indexed = req->index && req->index[0] && strcmp(req->index, "exact") && !retained;
  kvdex_index_scratch *scratch = indexed ? scratch_take(l) : NULL;
  size_t i;
  for (i = 0; i < n_seqs; i++) {
    kvdex_seq *seq;
    const char *used = "exact";
    rc = kvdex_seq_open(l->store, db->ns, seq_ids[i], &seq);
    if (rc == KVDEX_OK) {
      if (retained) {
        used = "retained";
        rc = kvdex_retained_search(seq, layer, q[i], &so, &res);
      } else {
        rc = kvdex_indexer_search(l->indexer, seq, layer, q[i], &so, req->index, &params,
                                  scratch, &res, &used);
      }
      kvdex_seq_release(seq);
    }
    if (rc == KVDEX_OK) rc = convert_result(&res, used, &out[i]);
    if (rc) break;
  }
  scratch_give(l, scratch);
  kvdex_search_result_free(&res);
  if (rc) {
    char where[KVDEX_MAX_SEQ_ID + 48];
    snprintf(where, sizeof where, "sequence \"%s\" (entry %zu)", seq_ids[i], i);
    kvdex__preerr(rc, where);
    for (size_t j = 0; j < i; j++) kvdex_search_out_free(&out[j]);
  }
  return rc;
}

static int local_build_index(kvdex_db *db, const char *seq_id, uint32_t layer, const char *spec) {
  kvdex_seq *seq;
  int rc = kvdex_seq_open(as_local(db)->store, db->ns, seq_id, &seq);
  if (rc) return rc;
  rc = kvdex_indexer_build(as_local(db)->indexer, seq,
                           layer == KVDEX_ALL_LAYERS ? KVDEX_INDEXER_ALL_LAYERS : layer, spec,
                           NULL, NULL);
  kvdex_seq_release(seq);
  return rc;
}

static int local_attend(kvdex_db *db, uint32_t layer, const kvdex_attend_options *opts,
                        size_t n_items, const kvdex_attend_item *items, float *const *o,
                        float *const *lse, kvdex_attend_info *info) {
  local_db *l = as_local(db);
  const char *index = opts->index ? opts->index : "";
  int rc = strcmp(index, "retained") ? kvdex_indexer_check_index(index) : KVDEX_OK;
  if (rc) return kvdex__preerr(rc, "index");
  kvdex_attend_ctx *c;
  if ((rc = actx_take(l, &c))) return rc;
  kvdex_index_params params = {.ef = opts->ef, .nprobe = opts->nprobe, .blocks = opts->blocks};
  kvdex_attend_req ar = {.k = opts->k,
                         .sinks = opts->sinks,
                         .window = opts->window,
                         .index = index,
                         .params = &params,
                         .scale = opts->scale,
                         .dense = opts->dense ? 1 : 0,
                         .streaming = opts->streaming};
  size_t i;
  for (i = 0; i < n_items; i++) {
    kvdex_seq *seq;
    rc = kvdex_seq_open(l->store, db->ns, items[i].seq_id, &seq);
    if (rc) break;
    ar.extra = items[i].extra;
    ar.n_extra = items[i].n_extra;
    kvdex_attend_stats st;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    rc = kvdex_attend_layer(l->indexer, seq, layer, items[i].q, &ar, l->pool, c, o[i], lse[i],
                            &st);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    kvdex_seq_release(seq);
    if (rc) break;
    if (info) {
      info[i].keys_touched = st.keys_touched;
      info[i].tokens = st.tokens;
      info[i].attended = st.attended;
      info[i].seconds = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
      snprintf(info[i].index, sizeof info[i].index, "%s", st.used);
    }
  }
  actx_give(l, c);
  if (rc) {
    char where[KVDEX_MAX_SEQ_ID + 48];
    snprintf(where, sizeof where, "item %zu (sequence \"%s\")", i, items[i].seq_id);
    kvdex__preerr(rc, where);
  }
  return rc;
}

static int local_retain(kvdex_db *db, const char *seq_id, uint32_t layer, const float *q_obs,
                        uint32_t n_obs, const kvdex_retain_options *opts, uint64_t *ids,
                        float *scores) {
  local_db *l = as_local(db);
  kvdex_seq *seq;
  int rc = kvdex_seq_open(l->store, db->ns, seq_id, &seq);
  if (rc) return rc;
  kvdex_attend_ctx *c;
  if ((rc = actx_take(l, &c))) {
    kvdex_seq_release(seq);
    return rc;
  }
  kvdex_retain_opts ro = {.sinks = opts->sinks,
                          .window = opts->window,
                          .budget = opts->budget,
                          .pool_window = opts->pool_window ? opts->pool_window : 1,
                          .pooling = opts->pooling,
                          .scale = opts->scale,
                          .simd = KVDEX_SIMD_AUTO};
  rc = kvdex_retain_layer(seq, layer, q_obs, n_obs, &ro, opts->materialize ? 1 : 0, l->pool, c,
                          ids, scores);
  actx_give(l, c);
  kvdex_seq_release(seq);
  return rc;
}

static const kvdex__vt local_vt = {
    .name = "local",
    .close = local_close,
    .create = local_create,
    .del = local_del,
    .stat = local_stat,
    .list = local_list,
    .append_begin = local_append_begin,
    .append_kv = local_append_kv,
    .append_commit = local_append_commit,
    .append_abort = local_append_abort,
    .read = local_read,
    .search = local_search,
    .build_index = local_build_index,
    .attend = local_attend,
    .retain = local_retain,
};

int kvdex__local_open(const kvdex_open_opts *opts, kvdex_db **out) {
  local_db *l = calloc(1, sizeof *l);
  if (!l) return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  l->base.vt = &local_vt;
  pthread_mutex_init(&l->scratch_mu, NULL);
  int rc = kvdex_store_create(opts ? opts->memory_cap : 0, &l->store);
  if (rc == KVDEX_OK) rc = kvdex_pool_create(opts ? opts->threads : 0, &l->pool);
  if (rc == KVDEX_OK) rc = kvdex_indexer_create(l->pool, 1, &l->indexer);
  if (rc) {
    kvdex_pool_destroy(l->pool);
    kvdex_store_destroy(l->store);
    pthread_mutex_destroy(&l->scratch_mu);
    free(l);
    return rc;
  }
  *out = &l->base;
  return KVDEX_OK;
}
