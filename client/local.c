/* local.c — the embedded transport ("local:"): the client owns a kvdex_store and a
 * kvdex_pool in this process and calls kvstore/ and index/ directly, with no
 * serialisation. Appends are kvstore transactions, reads kvdex_seq_read, searches
 * kvdex_exact_search. It adds no locking of its own: both modules are thread-safe.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/client_int.h"
#include "index/index.h"
#include "kvstore/kvstore.h"

typedef struct local_db {
  kvdex_db base;
  kvdex_store *store;
  kvdex_pool *pool;
} local_db;

typedef struct local_appender {
  kvdex_appender base;
  kvdex_txn *txn;
} local_appender;

static local_db *as_local(kvdex_db *db) { return (local_db *)db; }

static void local_close(kvdex_db *db) {
  local_db *l = as_local(db);
  kvdex_pool_destroy(l->pool);
  kvdex_store_destroy(l->store);
  free(l);
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
  for (uint32_t l = 0; l < shape->n_layers; l++) tokens[l] = kvdex_seq_tokens(seq, l);
  info->shape = *shape;
  info->bytes = kvdex_seq_bytes(seq);
  info->n_layers = shape->n_layers;
  info->layer_tokens = tokens;
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
                           uint32_t n_tokens, const void *k, const void *v) {
  return kvdex_txn_append(((local_appender *)ap)->txn, layer, token_start, n_tokens, k, v);
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
static int convert_result(const kvdex_search_result *res, kvdex_search_out *out) {
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
  return KVDEX_OK;
}

static int local_search(kvdex_db *db, uint32_t layer, const kvdex_search_req *req, size_t n_seqs,
                        const char *const *seq_ids, const float *const *q,
                        kvdex_search_out *out) {
  local_db *l = as_local(db);
  kvdex_search_opts so = {.k = req->k, .sinks = req->sinks, .window = req->window,
                          .simd = KVDEX_SIMD_AUTO};
  kvdex_search_result res = {0};
  int rc = KVDEX_OK;
  size_t i;
  for (i = 0; i < n_seqs; i++) {
    kvdex_seq *seq;
    rc = kvdex_seq_open(l->store, db->ns, seq_ids[i], &seq);
    if (rc == KVDEX_OK) {
      rc = kvdex_exact_search(seq, layer, q[i], &so, l->pool, &res);
      kvdex_seq_release(seq);
    }
    if (rc == KVDEX_OK) rc = convert_result(&res, &out[i]);
    if (rc) break;
  }
  kvdex_search_result_free(&res);
  if (rc) {
    char where[KVDEX_MAX_SEQ_ID + 48];
    snprintf(where, sizeof where, "sequence \"%s\" (entry %zu)", seq_ids[i], i);
    kvdex__preerr(rc, where);
    for (size_t j = 0; j < i; j++) kvdex_search_out_free(&out[j]);
  }
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
};

int kvdex__local_open(const kvdex_open_opts *opts, kvdex_db **out) {
  local_db *l = calloc(1, sizeof *l);
  if (!l) return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  l->base.vt = &local_vt;
  int rc = kvdex_store_create(opts ? opts->memory_cap : 0, &l->store);
  if (rc == KVDEX_OK) rc = kvdex_pool_create(opts ? opts->threads : 0, &l->pool);
  if (rc) {
    kvdex_store_destroy(l->store);
    free(l);
    return rc;
  }
  *out = &l->base;
  return KVDEX_OK;
}
