/* server_seqs: the sequence handlers of the gRPC server: CreateSequence,
 * DeleteSequence, StatSequence, ListSequences, PublishSequence and
 * grpc.health.v1.Health/Check. Each unpacks its request, checks names and the
 * caller's namespaces (server_call.c), calls the node (engine/node.h) and packs the
 * response; nothing here keeps state.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "proto/wire.h"
#include "workers/server_int.h"

/* Copies n uint64s into the arena (NULL when out of memory). */
static uint64_t *kvdex__arena_u64(kvdex__arena *a, const uint64_t *src, size_t n) {
  uint64_t *p = kvdex__srv_arena_alloc(a, sizeof(uint64_t) * n + 1);
  if (p && n) memcpy(p, src, sizeof(uint64_t) * n);
  return p;
}

/* The node's info of seq as a SequenceInfo (arrays and strings in the arena). */
static int kvdex__info_to_pb(kvdex__arena *a, kvdex_seq *seq, const kvdex_node_info *ni,
                             Kvdex__V1__SequenceInfo *info /* OUT */) {
  kvdex__v1__sequence_info__init(info);
  Kvdex__V1__SequenceRef *ref = kvdex__srv_arena_alloc(a, sizeof *ref);
  Kvdex__V1__Shape *shape = kvdex__srv_arena_alloc(a, sizeof *shape);
  if (!ref || !shape) return KVDEX_ENOMEM;
  kvdex__v1__sequence_ref__init(ref);
  kvdex__v1__shape__init(shape);
  ref->namespace_ = kvdex__srv_arena_strdup(a, kvdex_seq_namespace(seq));
  ref->sequence_id = kvdex__srv_arena_strdup(a, kvdex_seq_id(seq));
  if (!ref->namespace_ || !ref->sequence_id) return KVDEX_ENOMEM;
  const uint32_t nl = ni->shape.n_layers;
  kvdex_wire_shape_to_pb(&ni->shape, shape);
  info->seq = ref;
  info->shape = shape;
  info->n_layer_tokens = info->n_layer_query_tokens = info->n_layer_landmark_blocks = nl;
  info->layer_tokens = kvdex__arena_u64(a, ni->layer_tokens, nl);
  info->layer_query_tokens = kvdex__arena_u64(a, ni->layer_query_tokens, nl);
  info->layer_landmark_blocks = kvdex__arena_u64(a, ni->layer_landmark_blocks, nl);
  if (!info->layer_tokens || !info->layer_query_tokens || !info->layer_landmark_blocks)
    return KVDEX_ENOMEM;
  /* Layers that have had a BuildIndex. */
  if (ni->n_indexes &&
      !(info->indexes = kvdex__srv_arena_alloc(a, sizeof(*info->indexes) * ni->n_indexes)))
    return KVDEX_ENOMEM;
  for (uint32_t i = 0; i < ni->n_indexes; i++) {
    const kvdex_layer_index *ii = &ni->indexes[i];
    Kvdex__V1__LayerIndex *li = kvdex__srv_arena_alloc(a, sizeof *li);
    if (!li) return KVDEX_ENOMEM;
    kvdex__v1__layer_index__init(li);
    li->layer = ii->layer;
    li->state = (Kvdex__V1__IndexState)ii->state;
    li->spec = kvdex__srv_arena_strdup(a, ii->spec);
    li->error = kvdex__srv_arena_strdup(a, ii->error);
    li->kind = kvdex__srv_arena_strdup(a, ii->kind);
    li->describe = kvdex__srv_arena_strdup(a, ii->describe);
    if (!li->spec || !li->error || !li->kind || !li->describe) return KVDEX_ENOMEM;
    li->build_seconds = ii->build_seconds;
    li->memory_bytes = ii->memory_bytes;
    li->tokens = ii->tokens;
    info->indexes[info->n_indexes++] = li;
  }
  info->bytes = ni->bytes;
  info->importing = ni->importing != 0;
  return KVDEX_OK;
}

/* kvdex_node_stat of seq as a SequenceInfo in the arena. */
static int kvdex__fill_info(kvdex_server *srv, kvdex__arena *a, kvdex_seq *seq,
                            Kvdex__V1__SequenceInfo *info /* OUT */) {
  kvdex_node_info ni;
  int rc = kvdex_node_stat(srv->node, seq, &ni);
  if (!rc) rc = kvdex__info_to_pb(a, seq, &ni, info);
  kvdex_node_info_free(&ni);
  return rc;
}

/* ---- Unary handlers: request payload -> c->send_buf, or an error --------------- */

int kvdex__srv_do_create(kvdex__call *c) {
  kvdex_server *srv = c->w->srv;
  Kvdex__V1__CreateSequenceRequest *req =
      kvdex_rpc_unpack(&kvdex__v1__create_sequence_request__descriptor, c->payload);
  if (!req) return KVDEX_EINVAL;
  const char *ns, *id;
  int rc = kvdex__srv_ref_check(c->w, req->seq, "seq", &ns, &id);
  if (!rc && !req->shape) rc = kvdex__seterr(KVDEX_EINVAL, "shape is required");
  if (!rc) {
    kvdex_shape shape;
    kvdex_wire_shape_from_pb(req->shape, &shape);
    rc = kvdex_node_create_seq(srv->node, ns, id, &shape, req->importing);
  }
  if (!rc) {
    Kvdex__V1__CreateSequenceResponse resp = KVDEX__V1__CREATE_SEQUENCE_RESPONSE__INIT;
    rc = kvdex_rpc_pack(&resp.base, srv->max_message, &c->send_buf);
  }
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}

int kvdex__srv_do_delete(kvdex__call *c) {
  kvdex_server *srv = c->w->srv;
  Kvdex__V1__DeleteSequenceRequest *req = kvdex_rpc_unpack(
      &kvdex__v1__delete_sequence_request__descriptor, c->payload);
  if (!req) return KVDEX_EINVAL;
  const char *ns, *id;
  uint64_t freed = 0;
  int rc = kvdex__srv_ref_check(c->w, req->seq, "seq", &ns, &id);
  if (!rc) rc = kvdex_node_delete_seq(srv->node, ns, id, &freed);
  if (!rc) {
    Kvdex__V1__DeleteSequenceResponse resp = KVDEX__V1__DELETE_SEQUENCE_RESPONSE__INIT;
    resp.bytes_freed = freed;
    rc = kvdex_rpc_pack(&resp.base, srv->max_message, &c->send_buf);
  }
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}

int kvdex__srv_do_stat(kvdex__call *c) {
  kvdex_server *srv = c->w->srv;
  Kvdex__V1__StatSequenceRequest *req = kvdex_rpc_unpack(
      &kvdex__v1__stat_sequence_request__descriptor, c->payload);
  if (!req) return KVDEX_EINVAL;
  kvdex_seq *seq = NULL;
  int rc = kvdex__srv_open(c->w, req->seq, "seq", req->include_importing, &seq);
  if (!rc) {
    Kvdex__V1__SequenceInfo info;
    Kvdex__V1__StatSequenceResponse resp = KVDEX__V1__STAT_SEQUENCE_RESPONSE__INIT;
    rc = kvdex__fill_info(srv, &c->w->arena, seq, &info);
    resp.info = &info;
    if (!rc) rc = kvdex_rpc_pack(&resp.base, srv->max_message, &c->send_buf);
  }
  kvdex_seq_release(seq);
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}

int kvdex__srv_do_publish(kvdex__call *c) {
  kvdex_server *srv = c->w->srv;
  Kvdex__V1__PublishSequenceRequest *req = kvdex_rpc_unpack(
      &kvdex__v1__publish_sequence_request__descriptor, c->payload);
  if (!req) return KVDEX_EINVAL;
  kvdex_seq *seq = NULL;
  int rc = kvdex__srv_open(c->w, req->seq, "seq", 1, &seq);
  if (!rc) {
    kvdex_node_publish(srv->node, seq);
    Kvdex__V1__PublishSequenceResponse resp = KVDEX__V1__PUBLISH_SEQUENCE_RESPONSE__INIT;
    rc = kvdex_rpc_pack(&resp.base, srv->max_message, &c->send_buf);
  }
  kvdex_seq_release(seq);
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}

typedef struct kvdex__list_ctx {
  kvdex_server *srv;
  kvdex__arena *arena;
  Kvdex__V1__SequenceInfo **infos;
  size_t n, cap;
  int rc;
  const kvdex_auth_entry *who; /* list only the namespaces it allows (NULL = all) */
} kvdex__list_ctx;

static void kvdex__list_visit(void *ctx, kvdex_seq *seq) {
  kvdex__list_ctx *l = ctx;
  if (l->rc) return;
  if (l->who && !kvdex_auth_allows(l->who, kvdex_seq_namespace(seq))) return;
  if (l->n == l->cap) {
    size_t cap = l->cap ? 2 * l->cap : 64;
    Kvdex__V1__SequenceInfo **infos = kvdex__srv_arena_alloc(l->arena, cap * sizeof *infos);
    if (!infos) {
      l->rc = KVDEX_ENOMEM;
      return;
    }
    if (l->n) memcpy(infos, l->infos, l->n * sizeof *infos);
    l->infos = infos;
    l->cap = cap;
  }
  Kvdex__V1__SequenceInfo *info = kvdex__srv_arena_alloc(l->arena, sizeof *info);
  if (!info || kvdex__fill_info(l->srv, l->arena, seq, info)) {
    l->rc = KVDEX_ENOMEM;
    return;
  }
  l->infos[l->n++] = info;
}

int kvdex__srv_do_list(kvdex__call *c) {
  kvdex_server *srv = c->w->srv;
  Kvdex__V1__ListSequencesRequest *req = kvdex_rpc_unpack(
      &kvdex__v1__list_sequences_request__descriptor, c->payload);
  if (!req) return KVDEX_EINVAL;
  int rc = KVDEX_OK;
  const char *ns = req->namespace_ && req->namespace_[0] ? req->namespace_ : NULL;
  if (ns && kvdex__name_check(ns, "x")) rc = KVDEX_EINVAL; /* names the namespace */
  if (!rc && ns) rc = kvdex__srv_ns_allowed(c->w, ns);
  if (!rc) {
    kvdex__list_ctx l = {.srv = srv, .arena = &c->w->arena,
                         .who = srv->auth && !ns && !kvdex_auth_allows_all(c->w->who)
                                    ? c->w->who : NULL};
    kvdex_node_list(srv->node, ns, kvdex__list_visit, &l);
    rc = l.rc;
    if (rc) rc = kvdex__seterr(rc, "out of memory listing sequences");
    if (!rc) {
      kvdex_store_stats st;
      kvdex_node_store_stats(srv->node, &st);
      Kvdex__V1__ListSequencesResponse resp = KVDEX__V1__LIST_SEQUENCES_RESPONSE__INIT;
      resp.n_sequences = l.n;
      resp.sequences = l.infos;
      resp.node_bytes_used = st.bytes_used;
      resp.node_bytes_cap = st.bytes_cap;
      rc = kvdex_rpc_pack(&resp.base, srv->max_message, &c->send_buf);
    }
  }
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}

int kvdex__srv_do_health(kvdex__call *c) {
  kvdex_server *srv = c->w->srv;
  Grpc__Health__V1__HealthCheckRequest *req = kvdex_rpc_unpack(
      &grpc__health__v1__health_check_request__descriptor, c->payload);
  if (!req) return KVDEX_EINVAL;
  int rc = KVDEX_OK;
  const char *svc = req->service ? req->service : "";
  if (svc[0] && strcmp(svc, "kvdex.v1.KVStore") && strcmp(svc, "kvdex.v1.Retrieval") &&
      strcmp(svc, "grpc.health.v1.Health"))
    rc = kvdex__seterr(KVDEX_ENOTFOUND, "unknown service \"%.200s\"", svc);
  if (!rc) {
    Grpc__Health__V1__HealthCheckResponse resp = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    resp.status = atomic_load(&srv->stopping)
                      ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING
                      : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
    rc = kvdex_rpc_pack(&resp.base, srv->max_message, &c->send_buf);
  }
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}
