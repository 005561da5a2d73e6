/* local.c — the embedded transport ("local:"): the client owns a kvdex_node
 * (engine/node.h: a store, a pool and an indexer with one build thread) in this
 * process and calls it directly, with no serialisation. This file only translates
 * between the public types of kvdex.h and the node's, and names the failing entry
 * of a batch; every decision (hidden sequences, how a search runs, attend, retain)
 * is the node's, as it is the server's.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/client_int.h"
#include "engine/node.h"

typedef struct local_db {
  kvdex_db base;
  kvdex_node *node;
} local_db;

typedef struct local_appender {
  kvdex_appender base;
  kvdex_node_txn *txn;
} local_appender;

static kvdex_node *node_of(kvdex_db *db) { return ((local_db *)db)->node; }

static void local_close(kvdex_db *db) {
  kvdex_node_destroy(node_of(db));
  free(db);
}

static int local_create(kvdex_db *db, const char *seq_id, const kvdex_shape *shape) {
  return kvdex_node_create_seq(node_of(db), db->ns, seq_id, shape, 0);
}

static int local_del(kvdex_db *db, const char *seq_id, uint64_t *bytes_freed) {
  return kvdex_node_delete_seq(node_of(db), db->ns, seq_id, bytes_freed);
}

/* The node's info as kvdex_seq_info: the arrays are handed over as they are (the
 * index records are the public kvdex_layer_index already). */
static void info_to_public(kvdex_node_info *ni, kvdex_seq_info *info) {
  info->shape = ni->shape;
  info->bytes = ni->bytes;
  info->n_layers = ni->shape.n_layers;
  info->layer_tokens = ni->layer_tokens;
  info->layer_query_tokens = ni->layer_query_tokens;
  info->layer_landmark_blocks = ni->layer_landmark_blocks;
  info->n_indexes = ni->n_indexes;
  info->indexes = ni->indexes;
  ni->layer_tokens = ni->layer_query_tokens = ni->layer_landmark_blocks = NULL;
  ni->indexes = NULL;
  ni->n_indexes = 0;
}

static int local_stat(kvdex_db *db, const char *seq_id, kvdex_seq_info *info) {
  kvdex_seq *seq;
  int rc = kvdex_node_open(node_of(db), db->ns, seq_id, 0, &seq);
  if (rc) return rc;
  kvdex_node_info ni;
  rc = kvdex_node_stat(node_of(db), seq, &ni);
  kvdex_seq_release(seq);
  if (!rc) info_to_public(&ni, info);
  kvdex_node_info_free(&ni);
  return rc;
}

static int local_list(kvdex_db *db, char ***ids, size_t *n) {
  return kvdex_node_list_ids(node_of(db), db->ns, ids, n);
}

static int local_append_begin(kvdex_db *db, const char *seq_id, kvdex_appender **out) {
  kvdex_seq *seq;
  int rc = kvdex_node_open(node_of(db), db->ns, seq_id, 0, &seq);
  if (rc) return rc;
  local_appender *ap = calloc(1, sizeof *ap);
  if (!ap) {
    kvdex_seq_release(seq);
    return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  }
  rc = kvdex_node_append_begin(node_of(db), seq, &ap->txn); /* holds its own reference */
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
  return kvdex_node_append(((local_appender *)ap)->txn, layer, token_start, n_tokens, k, v, q,
                           landmarks);
}

static int local_append_commit(kvdex_appender *ap, uint64_t *tokens_appended) {
  local_appender *la = (local_appender *)ap;
  kvdex_txn_result res = {0};
  int rc = kvdex_node_append_commit(la->txn, &res);
  free(la);
  if (rc) return rc;
  if (tokens_appended) *tokens_appended = res.tokens_appended;
  return KVDEX_OK;
}

static void local_append_abort(kvdex_appender *ap) {
  local_appender *la = (local_appender *)ap;
  kvdex_node_append_abort(la->txn);
  free(la);
}

static int local_read(kvdex_db *db, const char *seq_id, uint32_t layer, const uint64_t *token_ids,
                      size_t n, void *k_out, void *v_out) {
  kvdex_seq *seq;
  int rc = kvdex_node_open(node_of(db), db->ns, seq_id, 0, &seq);
  if (rc) return rc;
  rc = kvdex_node_read(node_of(db), seq, layer, token_ids, n, k_out, v_out);
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
  kvdex_node *node = node_of(db);
  kvdex_search_opts so = {.k = req->k, .sinks = req->sinks, .window = req->window,
                          .simd = KVDEX_SIMD_AUTO};
  kvdex_index_params params = {.ef = req->ef, .nprobe = req->nprobe, .blocks = req->blocks};
  int rc = kvdex_node_check_index(req->index);
  if (rc) return kvdex__preerr(rc, "index");
  kvdex_node_ctx *ctx;
  if ((rc = kvdex_node_ctx_take(node, &ctx))) return rc;
  size_t i;
  for (i = 0; i < n_seqs; i++) {
    kvdex_seq *seq;
    const kvdex_search_result *res = NULL;
    const char *used = "exact";
    rc = kvdex_node_open(node, db->ns, seq_ids[i], 0, &seq);
    if (rc == KVDEX_OK) {
      rc = kvdex_node_search(node, ctx, seq, layer, q[i], &so, req->index, &params, &res, &used);
      kvdex_seq_release(seq);
    }
    if (rc == KVDEX_OK) rc = convert_result(res, used, &out[i]);
    if (rc) break;
  }
  kvdex_node_ctx_give(node, ctx);
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
  int rc = kvdex_node_open(node_of(db), db->ns, seq_id, 0, &seq);
  if (rc) return rc;
  rc = kvdex_node_build_index(node_of(db), seq,
                              layer == KVDEX_ALL_LAYERS ? KVDEX_ALL_LAYERS : layer, spec,
                              NULL, NULL);
  kvdex_seq_release(seq);
  return rc;
}

static int local_attend(kvdex_db *db, uint32_t layer, const kvdex_attend_options *opts,
                        size_t n_items, const kvdex_attend_item *items, float *const *o,
                        float *const *lse, kvdex_attend_info *info) {
  kvdex_node *node = node_of(db);
  const char *index = opts->index ? opts->index : "";
  int rc = kvdex_node_check_index(index);
  if (rc) return kvdex__preerr(rc, "index");
  kvdex_node_ctx *ctx;
  if ((rc = kvdex_node_ctx_take(node, &ctx))) return rc;
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
    rc = kvdex_node_open(node, db->ns, items[i].seq_id, 0, &seq);
    if (rc) break;
    ar.extra = items[i].extra;
    ar.n_extra = items[i].n_extra;
    kvdex_attend_stats st;
    rc = kvdex_node_attend(node, ctx, seq, layer, items[i].q, &ar, o[i], lse[i], &st);
    kvdex_seq_release(seq);
    if (rc) break;
    if (info) {
      info[i].keys_touched = st.keys_touched;
      info[i].tokens = st.tokens;
      info[i].attended = st.attended;
      info[i].seconds = st.seconds;
      snprintf(info[i].index, sizeof info[i].index, "%s", st.used);
    }
  }
  kvdex_node_ctx_give(node, ctx);
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
  kvdex_node *node = node_of(db);
  kvdex_seq *seq;
  int rc = kvdex_node_open(node, db->ns, seq_id, 0, &seq);
  if (rc) return rc;
  kvdex_node_ctx *ctx;
  if ((rc = kvdex_node_ctx_take(node, &ctx))) {
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
  rc = kvdex_node_retain(node, ctx, seq, layer, q_obs, n_obs, &ro, opts->materialize ? 1 : 0,
                         ids, scores);
  kvdex_node_ctx_give(node, ctx);
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
  kvdex_node_opts no = {.memory_cap = opts ? opts->memory_cap : 0,
                        .threads = opts ? opts->threads : 0,
                        .build_threads = 1};
  int rc = kvdex_node_create(&no, &l->node);
  if (rc) {
    free(l);
    return rc;
  }
  *out = &l->base;
  return KVDEX_OK;
}
