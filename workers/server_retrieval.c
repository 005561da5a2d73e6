/* server_retrieval: the Retrieval handlers of the gRPC server: Search, BuildIndex,
 * Attend and Retain. Each checks its request against the wire limits and the
 * sequence's shape (sizes, the response's bound under the max message size), converts
 * the queries to f32 and calls the node (engine/node.h), which decides how to search
 * and attend; then it packs the results. Also the index builds awaiting their metrics
 * (accepted here, counted when seen ended).
 */
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/attend_op.h"
#include "index/attend.h"
#include "index/index.h"
#include "proto/rpc.h"
#include "workers/server_int.h"

/* The limits checked here (KVDEX_MAX_K, KVDEX_MAX_EXTRA_TOKENS, KVDEX_MAX_OBS) are the
 * base's, the same the engine, the index and the client check. */

/* ---- Index builds awaiting their metrics ------------------------------------------ */

/* Counts the pending builds that ended into the metrics and forgets them (and those
 * whose sequence is gone: a build of a deleted sequence is discarded). Runs with
 * pend_mu held. A layer rebuilt twice between two sweeps counts once. */
void kvdex__srv_do_pending_sweep(kvdex_server *srv) {
  uint64_t ready = 0, failed = 0;
  for (kvdex__pending **pp = &srv->pending; *pp;) {
    kvdex__pending *p = *pp;
    kvdex_seq *seq = NULL;
    kvdex_layer_index ii;
    int state = KVDEX_INDEX_NONE;
    if (kvdex_node_open(srv->node, p->ns, p->id, 1, &seq) == KVDEX_OK &&
        kvdex_node_index_info(srv->node, seq, p->layer, &ii) == KVDEX_OK)
      state = ii.state;
    kvdex_seq_release(seq);
    if (state == KVDEX_INDEX_BUILDING) {
      pp = &p->next;
      continue;
    }
    if (state == KVDEX_INDEX_READY) ready++;
    if (state == KVDEX_INDEX_FAILED) failed++;
    *pp = p->next;
    free(p->ns);
    free(p->id);
    free(p);
  }
  if (ready || failed) kvdex_metrics_index_builds(srv->metrics, ready, failed);
}

/* Remembers the layers of an accepted build (metrics only; on out of memory the
 * build is just not counted). Runs with pend_mu held. */
static void kvdex__do_pending_add(kvdex_server *srv, kvdex_seq *seq, const uint32_t *layers,
                                  uint32_t n) {
  const char *ns = kvdex_seq_namespace(seq), *id = kvdex_seq_id(seq);
  for (uint32_t i = 0; i < n; i++) {
    bool dup = false;
    for (kvdex__pending *p = srv->pending; p && !dup; p = p->next)
      dup = p->layer == layers[i] && !strcmp(p->ns, ns) && !strcmp(p->id, id);
    if (dup) continue;
    kvdex__pending *p = calloc(1, sizeof *p);
    if (p) {
      p->ns = strdup(ns);
      p->id = strdup(id);
    }
    if (!p || !p->ns || !p->id) {
      if (p) {
        free(p->ns);
        free(p->id);
        free(p);
      }
      return;
    }
    p->layer = layers[i];
    p->next = srv->pending;
    srv->pending = p;
  }
}

void kvdex__srv_pending_free(kvdex_server *srv) {
  while (srv->pending) {
    kvdex__pending *p = srv->pending;
    srv->pending = p->next;
    free(p->ns);
    free(p->id);
    free(p);
  }
}

/* ---- Search -------------------------------------------------------------------- */

/* The node's result as a SearchResult (arrays in the arena), with each hit's K/V rows
 * when return_kv. */
static int kvdex__search_to_pb(kvdex__worker *w, kvdex_seq *seq, uint32_t layer,
                               const kvdex_search_result *res, const char *used, bool return_kv,
                               Kvdex__V1__SearchResult *out /* OUT */) {
  kvdex__arena *a = &w->arena;
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  const size_t row = (size_t)sh->head_dim * kvdex_dtype_size(sh->dtype);
  const uint32_t group = sh->n_q_heads / sh->n_kv_heads;
  kvdex__v1__search_result__init(out);
  out->index = (char *)used; /* a static string */
  out->keys_scanned = res->keys_scanned;
  out->tokens = res->tokens;
  out->n_heads = res->n_q_heads;
  out->heads = kvdex__srv_arena_alloc(a, sizeof(*out->heads) * out->n_heads);
  if (!out->heads) goto oom;
  for (uint32_t h = 0; h < res->n_q_heads; h++) {
    const kvdex_head_result *hr = &res->heads[h];
    Kvdex__V1__HeadHits *hh = kvdex__srv_arena_alloc(a, sizeof *hh);
    if (!hh) goto oom;
    kvdex__v1__head_hits__init(hh);
    out->heads[h] = hh;
    hh->n_token_ids = hh->n_scores = hr->n_hits;
    hh->token_ids = kvdex__srv_arena_alloc(a, sizeof(uint64_t) * hr->n_hits + 1);
    hh->scores = kvdex__srv_arena_alloc(a, sizeof(float) * hr->n_hits + 1);
    if (!hh->token_ids || !hh->scores) goto oom;
    for (uint32_t i = 0; i < hr->n_hits; i++) {
      hh->token_ids[i] = hr->hits[i].id;
      hh->scores[i] = hr->hits[i].score;
    }
    if (return_kv && hr->n_hits) {
      size_t bytes = (size_t)hr->n_hits * row;
      hh->k.data = kvdex__srv_arena_alloc(a, bytes);
      hh->v.data = kvdex__srv_arena_alloc(a, bytes);
      if (!hh->k.data || !hh->v.data) goto oom;
      hh->k.len = hh->v.len = bytes;
      int rc = kvdex_node_read_hits(w->srv->node, seq, layer, h / group, hr->hits, hr->n_hits,
                                    hh->k.data, hh->v.data);
      if (rc) return rc;
    }
  }
  return KVDEX_OK;
oom:
  return kvdex__seterr(KVDEX_ENOMEM, "out of memory building the search response");
}

/* One SearchQuery -> one SearchResult (arrays in the arena). *budget is what is left
 * of the max message size; the estimate of this result is taken from it. */
static int kvdex__search_one(kvdex__worker *w, kvdex_node_ctx *ctx,
                             const Kvdex__V1__SearchRequest *req, size_t qi,
                             const kvdex_search_opts *opts, const char *index,
                             const kvdex_index_params *params, bool return_kv, uint64_t *budget,
                             Kvdex__V1__SearchResult *out /* OUT */) {
  kvdex_server *srv = w->srv;
  const Kvdex__V1__SearchQuery *q = req->queries[qi];
  char field[48];
  snprintf(field, sizeof field, "queries[%zu]", qi);
  kvdex_seq *seq = NULL;
  int rc = kvdex__srv_open(w, q->seq, field, 0, &seq);
  if (rc) return rc;
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  int qd = q->query_dtype == KVDEX__V1__DTYPE__DTYPE_UNSPECIFIED ? KVDEX_DTYPE_F32
                                                                 : (int)q->query_dtype;
  size_t qsz = kvdex_dtype_size(qd);
  size_t n_q = (size_t)sh->n_q_heads * sh->head_dim;
  if (req->layer >= sh->n_layers) {
    rc = kvdex__seterr(KVDEX_EINVAL, "layer %u out of range (the sequence has %u layers)",
                       req->layer, sh->n_layers);
  } else if (qsz == 0) {
    rc = kvdex__seterr(KVDEX_EINVAL, "%s.query_dtype %d is not a known dtype", field, qd);
  } else if (q->q.len != n_q * qsz) {
    rc = kvdex__seterr(KVDEX_EINVAL,
                       "%s.q has %zu bytes, expected n_q_heads (%u) x head_dim (%u) x %zu (%s) "
                       "= %zu",
                       field, q->q.len, sh->n_q_heads, sh->head_dim, qsz, kvdex_dtype_name(qd),
                       n_q * qsz);
  }
  if (rc) goto out;

  /* Bound the response before doing the work: n_q_heads x min(k, tokens) hits. */
  uint64_t tokens = kvdex_seq_tokens(seq, req->layer);
  uint64_t max_hits = opts->k < tokens ? opts->k : tokens;
  size_t row = (size_t)sh->head_dim * kvdex_dtype_size(sh->dtype);
  uint64_t per_hit = 8 + 11 + (return_kv ? 2 * (uint64_t)row : 0);
  uint64_t est = (uint64_t)sh->n_q_heads * (max_hits * per_hit + 32) + 64;
  if (est > *budget) {
    rc = kvdex__seterr(KVDEX_ENOMEM,
                       "the response would exceed the max message size (%llu bytes): lower k, "
                       "drop return_kv or split the batch",
                       (unsigned long long)srv->max_message);
    goto out;
  }
  *budget -= est;

  float *qf = kvdex_node_ctx_floats(ctx, n_q);
  if (!qf) {
    rc = KVDEX_ENOMEM;
    goto out;
  }
  kvdex__to_f32(qd, q->q.data, qf, n_q);
  const kvdex_search_result *res = NULL;
  const char *used = "exact";
  rc = kvdex_node_search(srv->node, ctx, seq, req->layer, qf, opts, index, params, &res, &used);
  if (rc) {
    rc = kvdex__preerr(rc, field);
    goto out;
  }
  rc = kvdex__search_to_pb(w, seq, req->layer, res, used, return_kv, out);
out:
  kvdex_seq_release(seq);
  return rc;
}

/* ---- batches (Search, Attend) -------------------------------------------------- */

/* Runs a batched call's n items in order, each into a zeroed arena record of `size`
 * bytes made by item(env, i, record); stops at the first failure, or when the call's
 * deadline passes ("deadline passed after i of n <what>"). *results (an arena array)
 * and *n_results get the records made so far, the failed one included. */
static int run_batch(kvdex__call *c, size_t n, const char *what, size_t size,
                     int (*item)(void *env, size_t i, void *record), void *env,
                     void ***results /* OUT */, size_t *n_results /* OUT */) {
  kvdex__arena *a = &c->w->arena;
  if (n && !(*results = kvdex__srv_arena_alloc(a, sizeof(void *) * n))) return KVDEX_ENOMEM;
  for (size_t i = 0; i < n; i++) {
    if (kvdex__srv_deadline_passed(c))
      return kvdex__seterr(KVDEX_ETIMEDOUT, "deadline passed after %zu of %zu %s", i, n, what);
    void *r = kvdex__srv_arena_alloc(a, size);
    if (!r) return KVDEX_ENOMEM;
    int rc = item(env, i, r);
    (*results)[i] = r;
    *n_results = i + 1;
    if (rc) return rc;
  }
  return KVDEX_OK;
}

/* Packs a batched call's response (when rc is 0) and counts its queries and keys
 * touched in the metrics (attend: 1 for Attend, 0 for Search). Returns the call's rc. */
static int finish_batch(kvdex__call *c, const ProtobufCMessage *resp, int rc, int attend,
                        size_t n_results, uint64_t touched) {
  kvdex_server *srv = c->w->srv;
  if (!rc) rc = kvdex_rpc_pack(resp, srv->max_message, &c->send_buf);
  if (!rc && srv->metrics) kvdex_metrics_search(srv->metrics, attend, n_results, touched);
  return rc;
}

typedef struct search_env {
  kvdex__worker *w;
  kvdex_node_ctx *ctx;
  const Kvdex__V1__SearchRequest *req;
  kvdex_search_opts opts;
  const char *index;
  const kvdex_index_params *params;
  bool return_kv;
  uint64_t budget;  /* response bytes left for returned K/V */
  uint64_t touched; /* keys scanned, summed over the results */
} search_env;

static int search_item(void *env, size_t i, void *record) {
  search_env *e = env;
  Kvdex__V1__SearchResult *r = record;
  int rc = kvdex__search_one(e->w, e->ctx, e->req, i, &e->opts, e->index, e->params,
                             e->return_kv, &e->budget, r);
  if (!rc) e->touched += r->keys_scanned;
  return rc;
}

int kvdex__srv_do_search(kvdex__call *c) {
  kvdex__worker *w = c->w;
  kvdex_server *srv = w->srv;
  Kvdex__V1__SearchRequest *req =
      kvdex_rpc_unpack(&kvdex__v1__search_request__descriptor, c->payload);
  if (!req) return KVDEX_EINVAL;
  int rc = KVDEX_OK;
  const Kvdex__V1__SearchOptions *o = req->options;
  const char *index = o && o->index ? o->index : "";
  if (!o || o->k < 1 || o->k > KVDEX_MAX_K) {
    rc = kvdex__seterr(KVDEX_EINVAL, "options.k must be in 1..%d (got %u)", KVDEX_MAX_K,
                       o ? o->k : 0);
  } else if (kvdex_node_check_index(index)) {
    rc = kvdex__preerr(KVDEX_EINVAL, "options");
  }
  kvdex_node_ctx *ctx = NULL;
  if (!rc) rc = kvdex_node_ctx_take(srv->node, &ctx);
  kvdex_index_params params = {.ef = o ? o->ef : 0,
                               .nprobe = o ? o->nprobe : 0,
                               .blocks = o ? o->blocks : 0};
  Kvdex__V1__SearchResponse resp = KVDEX__V1__SEARCH_RESPONSE__INIT;
  search_env env = {.w = w,
                    .ctx = ctx,
                    .req = req,
                    .opts = {.k = o ? o->k : 0,
                             .sinks = o ? o->sinks : 0,
                             .window = o ? o->window : 0,
                             .simd = KVDEX_SIMD_AUTO},
                    .index = index,
                    .params = &params,
                    .return_kv = o && o->return_kv,
                    .budget = srv->max_message};
  if (!rc)
    rc = run_batch(c, req->n_queries, "queries", sizeof(Kvdex__V1__SearchResult), search_item,
                   &env, (void ***)&resp.results, &resp.n_results);
  kvdex_node_ctx_give(srv->node, ctx);
  rc = finish_batch(c, &resp.base, rc, 0, resp.n_results, env.touched);
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}

/* ---- BuildIndex ---------------------------------------------------------------- */

int kvdex__srv_do_build(kvdex__call *c) {
  kvdex__worker *w = c->w;
  kvdex_server *srv = w->srv;
  Kvdex__V1__BuildIndexRequest *req = kvdex_rpc_unpack(
      &kvdex__v1__build_index_request__descriptor, c->payload);
  if (!req) return KVDEX_EINVAL;
  kvdex_seq *seq = NULL;
  int rc = kvdex__srv_open(c->w, req->seq, "seq", 1, &seq);
  uint32_t layer = req->all_layers ? KVDEX_ALL_LAYERS : req->layer;
  if (!rc && !req->all_layers && req->layer == KVDEX_ALL_LAYERS)
    rc = kvdex__seterr(KVDEX_EINVAL, "layer %u out of range (set all_layers for every layer)",
                       req->layer);
  uint32_t n = 0, *layers = NULL;
  if (!rc) {
    layers =
        kvdex__srv_arena_alloc(&w->arena, sizeof(uint32_t) * kvdex_seq_shape(seq)->n_layers);
    if (!layers) rc = KVDEX_ENOMEM;
  }
  const char *spec = req->spec ? req->spec : "";
  if (!rc && srv->metrics) {
    /* Count the builds that ended before this one can overwrite their state. */
    pthread_mutex_lock(&srv->pend_mu);
    kvdex__srv_do_pending_sweep(srv);
    rc = kvdex_node_build_index(srv->node, seq, layer, spec, layers, &n);
    if (!rc) kvdex__do_pending_add(srv, seq, layers, n);
    pthread_mutex_unlock(&srv->pend_mu);
  } else if (!rc) {
    rc = kvdex_node_build_index(srv->node, seq, layer, spec, layers, &n);
  }
  if (!rc) {
    Kvdex__V1__BuildIndexResponse resp = KVDEX__V1__BUILD_INDEX_RESPONSE__INIT;
    resp.accepted = true;
    resp.n_layers = n;
    resp.layers = layers;
    rc = kvdex_rpc_pack(&resp.base, srv->max_message, &c->send_buf);
  }
  kvdex_seq_release(seq);
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}

/* ---- Attend and Retain ----------------------------------------------------------- */

/* Copies n f32 of wire bytes into ctx's aligned query buffer (*out). */
static int kvdex__ctx_floats(kvdex_node_ctx *ctx, const uint8_t *bytes, size_t n,
                             float **out /* OUT */) {
  float *f = kvdex_node_ctx_floats(ctx, n);
  if (!f) return KVDEX_ENOMEM;
  if (n) memcpy(f, bytes, n * sizeof(float));
  *out = f;
  return KVDEX_OK;
}

/* One AttendItem -> one AttendResult (o and lse in the arena). *budget as in search. */
static int kvdex__attend_one(kvdex__worker *w, kvdex_node_ctx *ctx,
                             const Kvdex__V1__AttendRequest *req, size_t i,
                             const kvdex_attend_req *base, uint64_t *budget,
                             Kvdex__V1__AttendResult *out /* OUT */) {
  kvdex_server *srv = w->srv;
  kvdex__arena *a = &w->arena;
  const Kvdex__V1__AttendItem *it = req->items[i];
  kvdex_seq *seq = NULL;
  char field[32];
  snprintf(field, sizeof field, "items[%zu]", i);
  int rc = kvdex__srv_open(w, it ? it->seq : NULL, field, 0, &seq);
  if (rc) return rc;
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  const size_t n_q = sh->n_q_heads, nf = n_q * sh->head_dim;
  kvdex_attend_req ar = *base;
  uint8_t *streaming = NULL;
  if (req->layer >= sh->n_layers) {
    rc = kvdex__seterr(KVDEX_EINVAL, "layer %u out of range (the sequence has %u layers)",
                       req->layer, sh->n_layers);
  } else if (it->q.len != nf * sizeof(float)) {
    rc = kvdex__seterr(KVDEX_EINVAL,
                       "%s.q has %zu bytes, expected n_q_heads (%u) x head_dim (%u) x 4 (f32) = "
                       "%zu",
                       field, it->q.len, sh->n_q_heads, sh->head_dim, nf * sizeof(float));
  } else if (req->n_streaming_heads != 0 && req->n_streaming_heads != n_q) {
    rc = kvdex__seterr(KVDEX_EINVAL,
                       "streaming_heads has %zu entries, expected 0 or n_q_heads (%u) of %s's "
                       "sequence",
                       req->n_streaming_heads, sh->n_q_heads, field);
  } else if (it->n_extra_tokens > KVDEX_MAX_EXTRA_TOKENS) {
    rc = kvdex__seterr(KVDEX_EINVAL, "%s.extra_tokens has %zu entries (at most %d)", field,
                       it->n_extra_tokens, KVDEX_MAX_EXTRA_TOKENS);
  }
  if (rc) goto out;
  /* Bound the response before doing the work. */
  uint64_t est = (uint64_t)nf * 4 + n_q * 4 + 96;
  if (est > *budget) {
    rc = kvdex__seterr(KVDEX_ENOMEM,
                       "the response would exceed the max message size (%llu bytes): split the "
                       "batch",
                       (unsigned long long)srv->max_message);
    goto out;
  }
  *budget -= est;
  if (req->n_streaming_heads) {
    if (!(streaming = kvdex__srv_arena_alloc(a, n_q))) goto oom;
    for (size_t h = 0; h < n_q; h++) streaming[h] = req->streaming_heads[h] ? 1 : 0;
  }
  ar.streaming = streaming;
  ar.extra = it->extra_tokens;
  ar.n_extra = (uint32_t)it->n_extra_tokens;
  float *qf;
  if ((rc = kvdex__ctx_floats(ctx, it->q.data, nf, &qf))) goto out;
  float *o = kvdex__srv_arena_alloc(a, nf * sizeof(float) + 1);
  float *lse = kvdex__srv_arena_alloc(a, n_q * sizeof(float));
  if (!o || !lse) goto oom;
  kvdex_attend_stats st;
  rc = kvdex_node_attend(srv->node, ctx, seq, req->layer, qf, &ar, o, lse, &st);
  if (rc) {
    rc = kvdex__preerr(rc, field);
    goto out;
  }
  kvdex__v1__attend_result__init(out);
  out->o.data = (uint8_t *)o;
  out->o.len = nf * sizeof(float);
  out->lse.data = (uint8_t *)lse;
  out->lse.len = n_q * sizeof(float);
  out->keys_touched = st.keys_touched;
  out->tokens = st.tokens;
  out->attended = st.attended;
  out->index_used = (char *)st.used; /* a static string */
  out->seconds = st.seconds;
  goto out;
oom:
  rc = kvdex__seterr(KVDEX_ENOMEM, "out of memory building the attend response");
out:
  kvdex_seq_release(seq);
  return rc;
}

typedef struct attend_env {
  kvdex__worker *w;
  kvdex_node_ctx *ctx;
  const Kvdex__V1__AttendRequest *req;
  const kvdex_attend_req *base;
  uint64_t budget;
  uint64_t touched; /* keys touched, summed over the results */
} attend_env;

static int attend_item(void *env, size_t i, void *record) {
  attend_env *e = env;
  Kvdex__V1__AttendResult *r = record;
  int rc = kvdex__attend_one(e->w, e->ctx, e->req, i, e->base, &e->budget, r);
  if (!rc) e->touched += r->keys_touched;
  return rc;
}

int kvdex__srv_do_attend(kvdex__call *c) {
  kvdex__worker *w = c->w;
  kvdex_server *srv = w->srv;
  Kvdex__V1__AttendRequest *req =
      kvdex_rpc_unpack(&kvdex__v1__attend_request__descriptor, c->payload);
  if (!req) return KVDEX_EINVAL;
  int rc = KVDEX_OK;
  const char *index = req->index ? req->index : "";
  if (req->n_items < 1 || req->n_items > KVDEX_RPC_MAX_ATTEND_ITEMS) {
    rc = kvdex__seterr(KVDEX_EINVAL, "items has %zu entries, expected 1..%d", req->n_items,
                       KVDEX_RPC_MAX_ATTEND_ITEMS);
  } else if (!req->dense && (req->k < 1 || req->k > KVDEX_MAX_K)) {
    rc = kvdex__seterr(KVDEX_EINVAL, "k must be in 1..%d unless dense is set (got %u)",
                       KVDEX_MAX_K, req->k);
  } else if (!(req->scale >= 0) || !isfinite(req->scale)) {
    rc = kvdex__seterr(KVDEX_EINVAL, "scale must be finite and >= 0 (0 = 1/sqrt(head_dim))");
  } else if (kvdex_node_check_index(index)) {
    rc = kvdex__preerr(KVDEX_EINVAL, "index");
  }
  kvdex_node_ctx *ctx = NULL;
  if (!rc) rc = kvdex_node_ctx_take(srv->node, &ctx);
  kvdex_index_params params = {.ef = req->ef, .nprobe = req->nprobe, .blocks = req->blocks};
  kvdex_attend_req base = {.k = req->k,
                           .sinks = req->sinks,
                           .window = req->window,
                           .index = index,
                           .params = &params,
                           .scale = req->scale,
                           .dense = req->dense ? 1 : 0};
  Kvdex__V1__AttendResponse resp = KVDEX__V1__ATTEND_RESPONSE__INIT;
  attend_env env = {.w = w, .ctx = ctx, .req = req, .base = &base, .budget = srv->max_message};
  if (!rc)
    rc = run_batch(c, req->n_items, "items", sizeof(Kvdex__V1__AttendResult), attend_item, &env,
                   (void ***)&resp.results, &resp.n_results);
  kvdex_node_ctx_give(srv->node, ctx);
  rc = finish_batch(c, &resp.base, rc, 1, resp.n_results, env.touched);
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}

int kvdex__srv_do_retain(kvdex__call *c) {
  kvdex__worker *w = c->w;
  kvdex_server *srv = w->srv;
  kvdex__arena *a = &w->arena;
  Kvdex__V1__RetainRequest *req =
      kvdex_rpc_unpack(&kvdex__v1__retain_request__descriptor, c->payload);
  if (!req) return KVDEX_EINVAL;
  kvdex_seq *seq = NULL;
  kvdex_node_ctx *ctx = NULL;
  int rc = kvdex__srv_open(c->w, req->seq, "seq", 0, &seq);
  if (rc) goto out;
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  const uint64_t per_obs = (uint64_t)sh->n_q_heads * sh->head_dim;
  uint64_t tokens = 0;
  if (req->layer >= sh->n_layers) {
    rc = kvdex__seterr(KVDEX_EINVAL, "layer %u out of range (the sequence has %u layers)",
                       req->layer, sh->n_layers);
  } else if (req->n_obs < 1 || req->n_obs > KVDEX_MAX_OBS) {
    rc = kvdex__seterr(KVDEX_EINVAL, "n_obs must be in 1..%d (got %u)", KVDEX_MAX_OBS,
                       req->n_obs);
  } else if (req->q_obs.len != req->n_obs * per_obs * sizeof(float)) {
    rc = kvdex__seterr(KVDEX_EINVAL,
                       "q_obs has %zu bytes, expected n_obs (%u) x n_q_heads (%u) x head_dim (%u) "
                       "x 4 (f32) = %llu",
                       req->q_obs.len, req->n_obs, sh->n_q_heads, sh->head_dim,
                       (unsigned long long)(req->n_obs * per_obs * sizeof(float)));
  } else if (req->budget < 1 || req->budget > (tokens = kvdex_seq_tokens(seq, req->layer))) {
    rc = kvdex__seterr(KVDEX_EINVAL, "budget %u out of range (1..eligible tokens; the layer has "
                       "%llu)",
                       req->budget, (unsigned long long)tokens);
  } else if ((uint64_t)sh->n_kv_heads * req->budget * 16 + 64 > srv->max_message) {
    rc = kvdex__seterr(KVDEX_ENOMEM,
                       "the response would exceed the max message size (%llu bytes): lower budget",
                       (unsigned long long)srv->max_message);
  }
  if (rc) goto out;
  float *qf;
  if ((rc = kvdex_node_ctx_take(srv->node, &ctx)) ||
      (rc = kvdex__ctx_floats(ctx, req->q_obs.data, req->n_obs * per_obs, &qf)))
    goto out;
  const size_t cnt = (size_t)sh->n_kv_heads * req->budget;
  uint64_t *ids = kvdex__srv_arena_alloc(a, cnt * sizeof *ids);
  float *scores = kvdex__srv_arena_alloc(a, cnt * sizeof *scores);
  Kvdex__V1__RetainedHead **heads = kvdex__srv_arena_alloc(a, sh->n_kv_heads * sizeof *heads);
  Kvdex__V1__RetainedHead *hs = kvdex__srv_arena_alloc(a, sh->n_kv_heads * sizeof *hs);
  if (!ids || !scores || !heads || !hs) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "out of memory for the retain response");
    goto out;
  }
  kvdex_retain_opts ro = {.sinks = req->sinks,
                          .window = req->window,
                          .budget = req->budget,
                          .pool_window = req->pool_window ? req->pool_window : 1,
                          .pooling = (int)req->pooling,
                          .scale = req->scale,
                          .simd = KVDEX_SIMD_AUTO};
  rc = kvdex_node_retain(srv->node, ctx, seq, req->layer, qf, req->n_obs, &ro,
                         req->materialize ? 1 : 0, ids, scores);
  if (rc) goto out;
  Kvdex__V1__RetainResponse resp = KVDEX__V1__RETAIN_RESPONSE__INIT;
  resp.n_heads = sh->n_kv_heads;
  resp.heads = heads;
  for (uint32_t g = 0; g < sh->n_kv_heads; g++) {
    kvdex__v1__retained_head__init(&hs[g]);
    hs[g].n_ids = hs[g].n_scores = req->budget;
    hs[g].ids = ids + (size_t)g * req->budget;
    hs[g].scores = scores + (size_t)g * req->budget;
    heads[g] = &hs[g];
  }
  rc = kvdex_rpc_pack(&resp.base, srv->max_message, &c->send_buf);
out:
  kvdex_node_ctx_give(srv->node, ctx);
  kvdex_seq_release(seq);
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}
