/* grpc.c — the remote transport ("grpc://host:port"): kvdex.v1 over the gRPC C core.
 * One channel per handle (thread-safe), registered methods, and for every call its
 * own completion queue that runs the batches synchronously until the call's
 * deadline (opts.timeout_ms; the call machinery is grpc_call.c). AppendKV is a real
 * client stream (begin = initial metadata, one message per kvdex_append_kv, commit =
 * half-close + response, abort = cancel; prefill queries and landmarks ride in the
 * same messages); ReadKV is a server stream reassembled into the caller's buffers;
 * Search packs every sequence of a batch into one SearchRequest; BuildIndex is a unary
 * call that only queues the build; Attend (a batch in one AttendRequest) and Retain
 * are unary calls.
 * Caller buffers carry no sizes, so the client needs each sequence's shape: it
 * keeps a small per-handle cache filled by create/stat and asks StatSequence on a
 * miss. It does no retries and no routing over several hosts (cluster.c does), and
 * the calls only the cluster makes are grpc_admin.c.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/grpc_security.h>

#include "client/grpc_int.h"

#define DEFAULT_TIMEOUT_MS 30000
/* Token ids per ReadKV request (8 bytes each on the wire): larger reads are split. */
#define READ_MAX_IDS_PER_CALL ((size_t)1 << 20)

/* ---- shape cache ---------------------------------------------------------------- */

static size_t slot_of(const char *id) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (const unsigned char *p = (const unsigned char *)id; *p; p++) h = (h ^ *p) * 1099511628211ull;
  return (size_t)(h % KVDEX__GRPC_SHAPE_SLOTS);
}

static int cache_get(kvdex__grpc_db *g, const char *id, kvdex_shape *out) {
  kvdex__grpc_shape_slot *s = &g->cache[slot_of(id)];
  int hit = 0;
  pthread_mutex_lock(&g->cache_mu);
  if (s->id && strcmp(s->id, id) == 0) {
    *out = s->shape;
    hit = 1;
  }
  pthread_mutex_unlock(&g->cache_mu);
  return hit;
}

static void cache_put(kvdex__grpc_db *g, const char *id, const kvdex_shape *shape) {
  kvdex__grpc_shape_slot *s = &g->cache[slot_of(id)];
  char *copy = strdup(id); /* outside the lock; no entry on failure */
  if (!copy) return;
  pthread_mutex_lock(&g->cache_mu);
  char *old = s->id;
  s->id = copy;
  s->shape = *shape;
  pthread_mutex_unlock(&g->cache_mu);
  free(old);
}

void kvdex__grpc_cache_drop(kvdex__grpc_db *g, const char *id) {
  kvdex__grpc_shape_slot *s = &g->cache[slot_of(id)];
  char *old = NULL;
  pthread_mutex_lock(&g->cache_mu);
  if (s->id && strcmp(s->id, id) == 0) {
    old = s->id;
    s->id = NULL;
  }
  pthread_mutex_unlock(&g->cache_mu);
  free(old);
}

static void seq_ref(Kvdex__V1__SequenceRef *ref, const kvdex_db *db, const char *seq_id) {
  kvdex__grpc_seq_ref_ns(ref, db->ns, seq_id);
}

/* ---- sequences ------------------------------------------------------------------- */

int kvdex__grpc_create_ns(kvdex__grpc_db *g, const char *ns, const char *seq_id,
                          const kvdex_shape *shape, int importing) {
  Kvdex__V1__SequenceRef ref;
  Kvdex__V1__Shape pb_shape = KVDEX__V1__SHAPE__INIT;
  Kvdex__V1__CreateSequenceRequest req = KVDEX__V1__CREATE_SEQUENCE_REQUEST__INIT;
  kvdex__grpc_seq_ref_ns(&ref, ns, seq_id);
  kvdex_wire_shape_to_pb(shape, &pb_shape);
  req.seq = &ref;
  req.shape = &pb_shape;
  req.importing = importing != 0;
  ProtobufCMessage *resp;
  int rc = kvdex__grpc_unary(g, KVDEX_RPC_CREATE, &req.base,
                             &kvdex__v1__create_sequence_response__descriptor, &resp);
  if (rc == KVDEX_OK) protobuf_c_message_free_unpacked(resp, NULL);
  return rc;
}

static int grpc_create(kvdex_db *db, const char *seq_id, const kvdex_shape *shape) {
  kvdex__grpc_db *g = kvdex__grpc_as(db);
  int rc = kvdex__grpc_create_ns(g, db->ns, seq_id, shape, 0);
  if (rc == KVDEX_OK) cache_put(g, seq_id, shape);
  return rc;
}

static int grpc_del(kvdex_db *db, const char *seq_id, uint64_t *bytes_freed) {
  return kvdex__grpc_delete_ns(db, db->ns, seq_id, bytes_freed);
}

int kvdex__grpc_stat_ns(kvdex__grpc_db *g, const char *ns, const char *seq_id,
                        int include_importing, kvdex_shape *shape, kvdex_seq_info *info,
                        int *importing) {
  Kvdex__V1__SequenceRef ref;
  Kvdex__V1__StatSequenceRequest req = KVDEX__V1__STAT_SEQUENCE_REQUEST__INIT;
  kvdex__grpc_seq_ref_ns(&ref, ns, seq_id);
  req.seq = &ref;
  req.include_importing = include_importing != 0;
  ProtobufCMessage *msg;
  int rc = kvdex__grpc_unary(g, KVDEX_RPC_STAT, &req.base,
                             &kvdex__v1__stat_sequence_response__descriptor, &msg);
  if (rc) return rc;
  Kvdex__V1__StatSequenceResponse *resp = (Kvdex__V1__StatSequenceResponse *)msg;
  if (!resp->info || !resp->info->shape) {
    rc = kvdex__seterr(KVDEX_EINTERNAL, "StatSequence: the server sent no sequence info");
  } else {
    kvdex_wire_shape_from_pb(resp->info->shape, shape);
    if (kvdex__shape_check(shape) != KVDEX_OK)
      rc = kvdex__preerr(KVDEX_EINTERNAL, "StatSequence: the server sent a bad shape");
  }
  if (rc == KVDEX_OK && info) {
    const Kvdex__V1__SequenceInfo *si = resp->info;
    uint32_t n = shape->n_layers;
    uint64_t *tokens = calloc(n, sizeof *tokens), *qtokens = calloc(n, sizeof *qtokens);
    uint64_t *lmblocks = calloc(n, sizeof *lmblocks);
    kvdex_layer_index *ix = si->n_indexes ? calloc(si->n_indexes, sizeof *ix) : NULL;
    if (!tokens || !qtokens || !lmblocks || (si->n_indexes && !ix)) {
      free(tokens);
      free(qtokens);
      free(lmblocks);
      free(ix);
      rc = kvdex__seterr(KVDEX_ENOMEM, "out of memory");
    } else {
      for (size_t l = 0; l < n && l < si->n_layer_tokens; l++) tokens[l] = si->layer_tokens[l];
      for (size_t l = 0; l < n && l < si->n_layer_query_tokens; l++)
        qtokens[l] = si->layer_query_tokens[l];
      for (size_t l = 0; l < n && l < si->n_layer_landmark_blocks; l++)
        lmblocks[l] = si->layer_landmark_blocks[l];
      for (size_t i = 0; i < si->n_indexes; i++) {
        const Kvdex__V1__LayerIndex *li = si->indexes[i];
        kvdex_layer_index *o = &ix[i];
        o->layer = li->layer;
        o->state = (int)li->state;
        snprintf(o->spec, sizeof o->spec, "%s", li->spec ? li->spec : "");
        snprintf(o->error, sizeof o->error, "%s", li->error ? li->error : "");
        snprintf(o->kind, sizeof o->kind, "%s", li->kind ? li->kind : "");
        snprintf(o->describe, sizeof o->describe, "%s", li->describe ? li->describe : "");
        o->build_seconds = li->build_seconds;
        o->memory_bytes = li->memory_bytes;
        o->tokens = li->tokens;
      }
      info->shape = *shape;
      info->bytes = si->bytes;
      info->n_layers = n;
      info->layer_tokens = tokens;
      info->layer_query_tokens = qtokens;
      info->layer_landmark_blocks = lmblocks;
      info->n_indexes = (uint32_t)si->n_indexes;
      info->indexes = ix;
    }
  }
  if (rc == KVDEX_OK && importing) *importing = resp->info->importing;
  protobuf_c_message_free_unpacked(msg, NULL);
  return rc;
}

/* StatSequence in the handle's namespace. Refreshes the cache. */
static int stat_call(kvdex__grpc_db *g, const char *seq_id, kvdex_shape *shape,
                     kvdex_seq_info *info) {
  int rc = kvdex__grpc_stat_ns(g, g->base.ns, seq_id, 0, shape, info, NULL);
  if (rc == KVDEX_ENOTFOUND) kvdex__grpc_cache_drop(g, seq_id);
  if (rc == KVDEX_OK) cache_put(g, seq_id, shape);
  return rc;
}

static int grpc_stat(kvdex_db *db, const char *seq_id, kvdex_seq_info *info) {
  kvdex_shape shape;
  return stat_call(kvdex__grpc_as(db), seq_id, &shape, info);
}

/* The shape of a sequence: from the cache, or asked with StatSequence. */
static int shape_get(kvdex__grpc_db *g, const char *seq_id, kvdex_shape *shape) {
  if (cache_get(g, seq_id, shape)) return KVDEX_OK;
  return stat_call(g, seq_id, shape, NULL);
}

static int grpc_list(kvdex_db *db, char ***ids, size_t *n) {
  kvdex__grpc_db *g = kvdex__grpc_as(db);
  Kvdex__V1__ListSequencesRequest req = KVDEX__V1__LIST_SEQUENCES_REQUEST__INIT;
  req.namespace_ = (char *)db->ns;
  ProtobufCMessage *msg;
  int rc = kvdex__grpc_unary(g, KVDEX_RPC_LIST, &req.base,
                             &kvdex__v1__list_sequences_response__descriptor, &msg);
  if (rc) return rc;
  Kvdex__V1__ListSequencesResponse *resp = (Kvdex__V1__ListSequencesResponse *)msg;
  char **out = calloc(resp->n_sequences ? resp->n_sequences : 1, sizeof *out);
  size_t k = 0;
  if (!out) rc = kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  for (size_t i = 0; rc == KVDEX_OK && i < resp->n_sequences; i++) {
    const Kvdex__V1__SequenceInfo *si = resp->sequences[i];
    if (!si || !si->seq || !si->seq->sequence_id) continue;
    if (!(out[k] = strdup(si->seq->sequence_id)))
      rc = kvdex__seterr(KVDEX_ENOMEM, "out of memory");
    else
      k++;
  }
  protobuf_c_message_free_unpacked(msg, NULL);
  if (rc) {
    kvdex_list_free(out, k);
    return rc;
  }
  kvdex__sort_ids(out, k);
  *ids = out;
  *n = k;
  return KVDEX_OK;
}

/* ---- append: a client stream ------------------------------------------------------ */

typedef struct grpc_appender {
  kvdex_appender base;
  kvdex__grpc_call r;
  char ns[KVDEX_MAX_NAMESPACE + 1];
  char seq_id[KVDEX_MAX_SEQ_ID + 1];
  int sent; /* messages sent so far */
} grpc_appender;

/* The status of a stream the server already ended (or that failed locally). */
static int stream_failed(kvdex__grpc_call *r) {
  kvdex__grpc_call_wait(r, KVDEX__GRPC_TAG_STATUS);
  int rc = kvdex__grpc_call_status_rc(r);
  if (rc == KVDEX_OK)
    rc = kvdex__seterr(KVDEX_EINTERNAL, "%s: the server ended the stream early",
                       kvdex_rpc_methods[r->m].name);
  return rc;
}

static void grpc_appender_free(grpc_appender *ap) {
  kvdex__grpc_call_end(&ap->r);
  free(ap);
}

/* Opens an AppendKV stream for ns/seq_id whose shape the caller knows. */
int kvdex__grpc_append_begin_ns(kvdex__grpc_db *g, const char *ns, const char *seq_id,
                                const kvdex_shape *shape, kvdex_appender **out) {
  grpc_appender *ap = calloc(1, sizeof *ap);
  if (!ap) return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  ap->base.db = &g->base;
  ap->base.shape = *shape;
  snprintf(ap->ns, sizeof ap->ns, "%s", ns);
  snprintf(ap->seq_id, sizeof ap->seq_id, "%s", seq_id);
  int rc = kvdex__grpc_call_begin(g, KVDEX_RPC_APPEND, &ap->r);
  if (rc == KVDEX_OK) rc = kvdex__grpc_call_start_status(&ap->r);
  if (rc == KVDEX_OK) {
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_INITIAL_METADATA;
    kvdex__grpc_auth_op(g, &op);
    rc = kvdex__grpc_call_start(&ap->r, &op, 1, KVDEX__GRPC_TAG_OPS);
    if (rc == KVDEX_OK && !kvdex__grpc_call_wait_send(&ap->r)) rc = stream_failed(&ap->r);
  }
  if (rc) {
    grpc_appender_free(ap);
    return rc;
  }
  *out = &ap->base;
  return KVDEX_OK;
}

static int grpc_append_begin(kvdex_db *db, const char *seq_id, kvdex_appender **out) {
  kvdex__grpc_db *g = kvdex__grpc_as(db);
  kvdex_shape shape;
  int rc = shape_get(g, seq_id, &shape);
  if (rc) return rc;
  return kvdex__grpc_append_begin_ns(g, db->ns, seq_id, &shape, out);
}

/* Sends one AppendKVRequest and waits until gRPC has taken it. q (may be NULL) has
 * bytes * n_q_heads / n_kv_heads bytes; landmarks (may be NULL) lm_bytes. */
static int send_append(grpc_appender *ap, uint32_t layer, uint64_t token_start, uint32_t n_tokens,
                       const void *k, const void *v, const void *q, size_t bytes,
                       const void *landmarks, size_t lm_bytes) {
  if (ap->r.status_done) return stream_failed(&ap->r); /* the server already refused */
  Kvdex__V1__SequenceRef ref;
  Kvdex__V1__AppendKVRequest req = KVDEX__V1__APPEND_KVREQUEST__INIT;
  if (ap->sent == 0) { /* the first message names the sequence */
    kvdex__grpc_seq_ref_ns(&ref, ap->ns, ap->seq_id);
    req.seq = &ref;
  }
  req.layer = layer;
  req.token_start = token_start;
  req.n_tokens = n_tokens;
  req.k.data = (uint8_t *)k;
  req.k.len = bytes;
  req.v.data = (uint8_t *)v;
  req.v.len = bytes;
  if (q) {
    req.q.data = (uint8_t *)q;
    req.q.len = bytes / ap->base.shape.n_kv_heads * ap->base.shape.n_q_heads;
  }
  if (landmarks && lm_bytes) {
    req.landmarks.data = (uint8_t *)landmarks;
    req.landmarks.len = lm_bytes;
  }
  grpc_byte_buffer *bb;
  int rc = kvdex_rpc_pack(&req.base, 0, &bb);
  if (rc) return rc;
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_SEND_MESSAGE;
  op.data.send_message.send_message = bb;
  rc = kvdex__grpc_call_start(&ap->r, &op, 1, KVDEX__GRPC_TAG_OPS);
  if (rc == KVDEX_OK && !kvdex__grpc_call_wait_send(&ap->r)) rc = stream_failed(&ap->r);
  grpc_byte_buffer_destroy(bb);
  if (rc == KVDEX_OK) ap->sent++;
  return rc;
}

static int grpc_append_kv(kvdex_appender *base, uint32_t layer, uint64_t token_start,
                          uint32_t n_tokens, const void *k, const void *v, const void *q,
                          const void *lm) {
  grpc_appender *ap = (grpc_appender *)base;
  const kvdex_shape *s = &base->shape;
  size_t row = (size_t)s->head_dim * kvdex_dtype_size(s->dtype); /* bytes of one token, one head */
  size_t heads = s->n_kv_heads, qheads = q ? s->n_q_heads : 0;
  size_t bytes = (size_t)n_tokens * heads * row; /* < 2^54: bounded by the shape limits */
  size_t per_token = (2 * heads + qheads) * row; /* K + V (+ queries) of one token */
  /* Landmarks: one row per head for each block of bt tokens that ends in the range. */
  const uint64_t bt = s->block_tokens ? s->block_tokens : KVDEX_DEFAULT_BLOCK_TOKENS;
  const uint64_t b_first = token_start / bt;
  const size_t nb = (size_t)((token_start + n_tokens) / bt - b_first);
  if (!nb) lm = NULL;
  if (n_tokens * per_token <= KVDEX__GRPC_MSG_BYTES)
    return send_append(ap, layer, token_start, n_tokens, k, v, q, bytes, lm, nb * heads * row);
  /* Too large for one message: split by token range (landmarks go with the piece that
   * holds their block's last token; a piece's landmarks add at most 1/bt of its K). */
  size_t per_msg = KVDEX__GRPC_MSG_BYTES / per_token;
  if (per_msg == 0) per_msg = 1;
  if (heads == 1 && qheads <= 1) { /* pieces are contiguous in the caller's buffers */
    int rc = KVDEX_OK;
    for (size_t t0 = 0; rc == KVDEX_OK && t0 < n_tokens; t0 += per_msg) {
      size_t t = n_tokens - t0 < per_msg ? n_tokens - t0 : per_msg;
      uint64_t pb0 = (token_start + t0) / bt, pb1 = (token_start + t0 + t) / bt;
      rc = send_append(ap, layer, token_start + t0, (uint32_t)t, (const char *)k + t0 * row,
                       (const char *)v + t0 * row, q ? (const char *)q + t0 * row : NULL, t * row,
                       lm ? (const char *)lm + (size_t)(pb0 - b_first) * row : NULL,
                       (size_t)(pb1 - pb0) * row);
    }
    return rc;
  }
  /* Each piece gathers its rows of every head into [heads][piece][head_dim], which
   * costs one extra copy. */
  size_t piece_bytes = per_msg * heads * row, qpiece_bytes = per_msg * qheads * row;
  size_t lmpiece_bytes = lm ? (per_msg / bt + 1) * heads * row : 0;
  char *kbuf = malloc(piece_bytes), *vbuf = malloc(piece_bytes);
  char *qbuf = q ? malloc(qpiece_bytes) : NULL, *lmbuf = lm ? malloc(lmpiece_bytes) : NULL;
  int rc = KVDEX_OK;
  if (!kbuf || !vbuf || (q && !qbuf) || (lm && !lmbuf))
    rc = kvdex__seterr(KVDEX_ENOMEM, "out of memory for %zu bytes",
                       2 * piece_bytes + qpiece_bytes + lmpiece_bytes);
  for (size_t t0 = 0; rc == KVDEX_OK && t0 < n_tokens; t0 += per_msg) {
    size_t t = n_tokens - t0 < per_msg ? n_tokens - t0 : per_msg;
    for (size_t h = 0; h < heads; h++) {
      memcpy(kbuf + h * t * row, (const char *)k + (h * n_tokens + t0) * row, t * row);
      memcpy(vbuf + h * t * row, (const char *)v + (h * n_tokens + t0) * row, t * row);
    }
    for (size_t h = 0; h < qheads; h++)
      memcpy(qbuf + h * t * row, (const char *)q + (h * n_tokens + t0) * row, t * row);
    size_t pb0 = (size_t)((token_start + t0) / bt - b_first);
    size_t pnb = (size_t)((token_start + t0 + t) / bt - (token_start + t0) / bt);
    for (size_t h = 0; lm && h < heads; h++)
      memcpy(lmbuf + h * pnb * row, (const char *)lm + (h * nb + pb0) * row, pnb * row);
    rc = send_append(ap, layer, token_start + t0, (uint32_t)t, kbuf, vbuf, qbuf, t * heads * row,
                     lmbuf, pnb * heads * row);
  }
  free(kbuf);
  free(vbuf);
  free(qbuf);
  free(lmbuf);
  return rc;
}

static int grpc_append_commit(kvdex_appender *base, uint64_t *tokens_appended) {
  grpc_appender *ap = (grpc_appender *)base;
  kvdex__grpc_call *r = &ap->r;
  int rc = KVDEX_OK;
  if (ap->sent == 0) { /* nothing to commit: end the empty stream */
    grpc_appender_free(ap);
    return KVDEX_OK;
  }
  grpc_byte_buffer *recv = NULL;
  grpc_op ops[2];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[1].op = GRPC_OP_RECV_MESSAGE;
  ops[1].data.recv_message.recv_message = &recv;
  rc = kvdex__grpc_call_start(r, ops, 2, KVDEX__GRPC_TAG_OPS);
  if (rc == KVDEX_OK) {
    kvdex__grpc_call_wait(r, KVDEX__GRPC_TAG_OPS);
    kvdex__grpc_call_wait(r, KVDEX__GRPC_TAG_STATUS);
    rc = kvdex__grpc_call_status_rc(r);
  }
  if (rc == KVDEX_OK && !recv)
    rc = kvdex__seterr(KVDEX_EINTERNAL, "AppendKV: the server sent no response");
  if (rc == KVDEX_OK) {
    ProtobufCMessage *msg;
    rc = kvdex__grpc_unpack(r, recv, &kvdex__v1__append_kvresponse__descriptor, &msg);
    if (rc == KVDEX_OK) {
      if (tokens_appended) *tokens_appended = ((Kvdex__V1__AppendKVResponse *)msg)->tokens_appended;
      protobuf_c_message_free_unpacked(msg, NULL);
    }
  }
  if (rc == KVDEX_ENOTFOUND || rc == KVDEX_EINVAL)
    kvdex__grpc_cache_drop(kvdex__grpc_as(base->db), ap->seq_id);
  if (recv) grpc_byte_buffer_destroy(recv);
  grpc_appender_free(ap);
  return rc;
}

static void grpc_append_abort(kvdex_appender *base) {
  grpc_appender *ap = (grpc_appender *)base;
  grpc_call_cancel(ap->r.call, NULL); /* the server discards the stream */
  grpc_appender_free(ap);             /* waits for the cancelled status */
}

/* ---- read: a server stream ---------------------------------------------------------- */

typedef struct read_ctx {
  const uint64_t *ids;
  size_t n, col, n_total, got, heads, row;
  char *k_out, *v_out;
  int bad; /* the server sent something that does not fit */
} read_ctx;

/* One ReadKV message of read_call: checked against what was asked, then copied. */
static int read_msg(void *arg, const Kvdex__V1__ReadKVResponse *chunk) {
  read_ctx *rc = arg;
  size_t t = chunk->n_token_ids, heads = rc->heads, row = rc->row;
  if (t == 0 || t > rc->n - rc->got || chunk->k.len != t * heads * row ||
      chunk->v.len != t * heads * row) {
    rc->bad = 1;
    return kvdex__seterr(KVDEX_EINTERNAL,
                         "ReadKV: the server sent a chunk of %zu tokens with %zu/%zu bytes of K/V "
                         "(expected at most %zu tokens of %zu bytes each); has the sequence been "
                         "recreated with another shape?",
                         t, chunk->k.len, chunk->v.len, rc->n - rc->got, heads * row);
  }
  for (size_t j = 0; j < t; j++)
    if (chunk->token_ids[j] != rc->ids[rc->got + j]) {
      rc->bad = 1;
      return kvdex__seterr(KVDEX_EINTERNAL, "ReadKV: the server sent token %llu where %llu was due",
                           (unsigned long long)chunk->token_ids[j],
                           (unsigned long long)rc->ids[rc->got + j]);
    }
  for (size_t h = 0; h < heads; h++) {
    memcpy(rc->k_out + (h * rc->n_total + rc->col + rc->got) * row, chunk->k.data + h * t * row,
           t * row);
    memcpy(rc->v_out + (h * rc->n_total + rc->col + rc->got) * row, chunk->v.data + h * t * row,
           t * row);
  }
  rc->got += t;
  return KVDEX_OK;
}

int kvdex__grpc_read_stream(kvdex__grpc_db *g, const char *ns, const char *seq_id, uint32_t layer,
                            uint64_t start, uint64_t end, const uint64_t *ids, size_t n_ids,
                            int with_q, int with_lm, uint32_t per_msg,
                            kvdex__grpc_read_msg_fn fn, void *ctx) {
  Kvdex__V1__SequenceRef ref;
  Kvdex__V1__ReadKVRequest req = KVDEX__V1__READ_KVREQUEST__INIT;
  Kvdex__V1__TokenRange range = KVDEX__V1__TOKEN_RANGE__INIT, *ranges[1] = {&range};
  kvdex__grpc_seq_ref_ns(&ref, ns, seq_id);
  req.seq = &ref;
  req.layer = layer;
  req.max_tokens_per_message = per_msg;
  req.with_queries = with_q != 0;
  req.with_landmarks = with_lm != 0;
  if (end > start) {
    range.start = start;
    range.end = end;
    req.n_ranges = 1;
    req.ranges = ranges;
  }
  req.n_token_ids = n_ids;
  req.token_ids = (uint64_t *)ids;
  grpc_byte_buffer *send;
  int rc = kvdex_rpc_pack(&req.base, 0, &send);
  if (rc) return rc;
  kvdex__grpc_call r;
  rc = kvdex__grpc_call_begin(g, KVDEX_RPC_READ, &r);
  if (rc == KVDEX_OK) rc = kvdex__grpc_call_start_status(&r);
  if (rc) {
    grpc_byte_buffer_destroy(send);
    kvdex__grpc_call_end(&r);
    return rc;
  }
  grpc_op ops[3];
  memset(ops, 0, sizeof ops);
  size_t n_ops = kvdex__grpc_send_request_ops(g, send, ops);
  rc = kvdex__grpc_call_start(&r, ops, n_ops, KVDEX__GRPC_TAG_OPS);
  if (rc == KVDEX_OK) kvdex__grpc_call_wait(&r, KVDEX__GRPC_TAG_OPS);
  grpc_byte_buffer_destroy(send);
  int stopped = 0;
  while (rc == KVDEX_OK) {
    grpc_byte_buffer *recv = NULL;
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &recv;
    rc = kvdex__grpc_call_start(&r, &op, 1, KVDEX__GRPC_TAG_OPS);
    if (rc) break;
    if (!kvdex__grpc_call_wait(&r, KVDEX__GRPC_TAG_OPS) || !recv) break;
    ProtobufCMessage *msg;
    rc = kvdex__grpc_unpack(&r, recv, &kvdex__v1__read_kvresponse__descriptor, &msg);
    grpc_byte_buffer_destroy(recv);
    if (rc) break;
    rc = fn(ctx, (const Kvdex__V1__ReadKVResponse *)msg);
    protobuf_c_message_free_unpacked(msg, NULL);
    stopped = rc != KVDEX_OK;
  }
  if (rc == KVDEX_OK || !stopped) {
    int st = KVDEX_OK;
    kvdex__grpc_call_wait(&r, KVDEX__GRPC_TAG_STATUS);
    st = kvdex__grpc_call_status_rc(&r);
    if (rc == KVDEX_OK) rc = st;
  }
  kvdex__grpc_call_end(&r);
  return rc;
}

uint32_t kvdex__grpc_kv_per_msg(const kvdex_shape *s) {
  size_t row = (size_t)s->head_dim * kvdex_dtype_size(s->dtype);
  size_t per = KVDEX__GRPC_MSG_BYTES / (2 * (size_t)s->n_kv_heads * row);
  if (per == 0) per = 1;
  return per > KVDEX_RPC_READ_CHUNK_TOKENS ? KVDEX_RPC_READ_CHUNK_TOKENS : (uint32_t)per;
}

/* Reads ids[0..n) into columns [col, col + n) of k_out/v_out ([heads][n_total][row]). */
static int read_call(kvdex__grpc_db *g, const char *seq_id, const kvdex_shape *s, uint32_t layer,
                     const uint64_t *ids, size_t n, size_t col, size_t n_total, char *k_out,
                     char *v_out) {
  read_ctx ctx = {.ids = ids, .n = n, .col = col, .n_total = n_total, .k_out = k_out,
                  .v_out = v_out, .heads = s->n_kv_heads,
                  .row = (size_t)s->head_dim * kvdex_dtype_size(s->dtype)};
  uint32_t per_msg = kvdex__grpc_kv_per_msg(s);
  int contiguous = 1;
  for (size_t i = 1; i < n && contiguous; i++) contiguous = ids[i] == ids[0] + i;
  int rc;
  if (n > 1 && contiguous && ids[0] <= UINT64_MAX - n) /* one range instead of n ids */
    rc = kvdex__grpc_read_stream(g, g->base.ns, seq_id, layer, ids[0], ids[0] + n, NULL, 0, 0,
                                 0, per_msg, read_msg, &ctx);
  else
    rc = kvdex__grpc_read_stream(g, g->base.ns, seq_id, layer, 0, 0, ids, n, 0, 0, per_msg,
                                 read_msg, &ctx);
  if (rc == KVDEX_OK && ctx.got != n)
    rc = kvdex__seterr(KVDEX_EINTERNAL, "ReadKV: the server sent %zu of %zu tokens", ctx.got, n);
  if (rc == KVDEX_ENOTFOUND || ctx.bad) kvdex__grpc_cache_drop(g, seq_id);
  return rc;
}

static int grpc_read(kvdex_db *db, const char *seq_id, uint32_t layer, const uint64_t *token_ids,
                     size_t n, void *k_out, void *v_out) {
  kvdex__grpc_db *g = kvdex__grpc_as(db);
  kvdex_shape shape;
  int rc = shape_get(g, seq_id, &shape);
  if (rc) return rc;
  if (layer >= shape.n_layers)
    return kvdex__seterr(KVDEX_EINVAL, "layer %u out of range (n_layers %u)", layer,
                         shape.n_layers);
  for (size_t done = 0; done < n && rc == KVDEX_OK; done += READ_MAX_IDS_PER_CALL) {
    size_t m = n - done < READ_MAX_IDS_PER_CALL ? n - done : READ_MAX_IDS_PER_CALL;
    rc = read_call(g, seq_id, &shape, layer, token_ids + done, m, done, n, k_out, v_out);
  }
  return rc;
}

/* ---- search: one unary call for the whole batch ------------------------------------- */

static int grpc_search(kvdex_db *db, uint32_t layer, const kvdex_search_req *sreq, size_t n_seqs,
                       const char *const *seq_ids, const float *const *q, kvdex_search_out *out) {
  kvdex__grpc_db *g = kvdex__grpc_as(db);
  int rc = KVDEX_OK;
  /* One allocation for the per-sequence parts of the request. */
  size_t bytes = n_seqs * (sizeof(kvdex_shape) + sizeof(Kvdex__V1__SequenceRef) +
                           sizeof(Kvdex__V1__SearchQuery) + sizeof(Kvdex__V1__SearchQuery *));
  char *block = malloc(bytes);
  if (!block) return kvdex__seterr(KVDEX_ENOMEM, "out of memory for %zu bytes", bytes);
  kvdex_shape *shapes = (kvdex_shape *)block;
  Kvdex__V1__SequenceRef *refs = (Kvdex__V1__SequenceRef *)(shapes + n_seqs);
  Kvdex__V1__SearchQuery *queries = (Kvdex__V1__SearchQuery *)(refs + n_seqs);
  Kvdex__V1__SearchQuery **qptrs = (Kvdex__V1__SearchQuery **)(queries + n_seqs);

  size_t i;
  for (i = 0; i < n_seqs && rc == KVDEX_OK; i++) {
    rc = shape_get(g, seq_ids[i], &shapes[i]);
    if (rc == KVDEX_OK && layer >= shapes[i].n_layers)
      rc = kvdex__seterr(KVDEX_EINVAL, "layer %u out of range (n_layers %u)", layer,
                         shapes[i].n_layers);
    if (rc) break;
    seq_ref(&refs[i], db, seq_ids[i]);
    kvdex__v1__search_query__init(&queries[i]);
    queries[i].seq = &refs[i];
    queries[i].q.data = (uint8_t *)q[i];
    queries[i].q.len = (size_t)shapes[i].n_q_heads * shapes[i].head_dim * sizeof(float);
    queries[i].query_dtype = KVDEX__V1__DTYPE__DTYPE_F32;
    qptrs[i] = &queries[i];
  }
  if (rc) {
    char where[KVDEX_MAX_SEQ_ID + 48];
    snprintf(where, sizeof where, "sequence \"%s\" (entry %zu)", seq_ids[i], i);
    free(block);
    return kvdex__preerr(rc, where);
  }

  Kvdex__V1__SearchOptions opts = KVDEX__V1__SEARCH_OPTIONS__INIT;
  opts.k = sreq->k;
  opts.sinks = sreq->sinks;
  opts.window = sreq->window;
  opts.index = (char *)(sreq->index ? sreq->index : "");
  opts.ef = sreq->ef;
  opts.nprobe = sreq->nprobe;
  opts.blocks = sreq->blocks;
  Kvdex__V1__SearchRequest req = KVDEX__V1__SEARCH_REQUEST__INIT;
  req.layer = layer;
  req.options = &opts;
  req.n_queries = n_seqs;
  req.queries = qptrs;
  ProtobufCMessage *msg;
  rc = kvdex__grpc_unary(g, KVDEX_RPC_SEARCH, &req.base, &kvdex__v1__search_response__descriptor,
                         &msg);
  if (rc) {
    /* Which entry failed is in the server's message; forget the shapes so that a
     * recreated sequence is asked again next time. */
    if (rc == KVDEX_ENOTFOUND || rc == KVDEX_EINVAL)
      for (i = 0; i < n_seqs; i++) kvdex__grpc_cache_drop(g, seq_ids[i]);
    free(block);
    return rc;
  }
  const Kvdex__V1__SearchResponse *resp = (const Kvdex__V1__SearchResponse *)msg;
  if (resp->n_results != n_seqs)
    rc = kvdex__seterr(KVDEX_EINTERNAL, "Search: the server sent %zu results for %zu queries",
                       resp->n_results, n_seqs);
  for (i = 0; i < n_seqs && rc == KVDEX_OK; i++) {
    const Kvdex__V1__SearchResult *res = resp->results[i];
    uint32_t nq = shapes[i].n_q_heads;
    size_t total = 0;
    if (!res || res->n_heads != nq) {
      rc = kvdex__seterr(KVDEX_EINTERNAL, "Search: result %zu has %zu heads, expected %u", i,
                         res ? res->n_heads : 0, nq);
      break;
    }
    for (uint32_t h = 0; h < nq && rc == KVDEX_OK; h++) {
      const Kvdex__V1__HeadHits *hh = res->heads[h];
      if (!hh || hh->n_token_ids != hh->n_scores || hh->n_token_ids > sreq->k)
        rc = kvdex__seterr(KVDEX_EINTERNAL, "Search: result %zu head %u is malformed", i, h);
      else
        total += hh->n_token_ids;
    }
    uint64_t *ids;
    float *scores;
    if (rc == KVDEX_OK) rc = kvdex__search_out_alloc(&out[i], nq, total, &ids, &scores);
    if (rc) break;
    for (uint32_t h = 0; h < nq; h++) {
      const Kvdex__V1__HeadHits *hh = res->heads[h];
      out[i].heads[h].n = (uint32_t)hh->n_token_ids;
      out[i].heads[h].ids = ids;
      out[i].heads[h].scores = scores;
      if (hh->n_token_ids) {
        memcpy(ids, hh->token_ids, hh->n_token_ids * sizeof *ids);
        memcpy(scores, hh->scores, hh->n_scores * sizeof *scores);
      }
      ids += hh->n_token_ids;
      scores += hh->n_token_ids;
    }
    out[i].keys_scanned = res->keys_scanned;
    out[i].tokens = res->tokens;
    snprintf(out[i].index, sizeof out[i].index, "%s",
             res->index && res->index[0] ? res->index : "exact");
  }
  if (rc)
    for (size_t j = 0; j < n_seqs; j++) kvdex_search_out_free(&out[j]);
  protobuf_c_message_free_unpacked(msg, NULL);
  free(block);
  return rc;
}

/* ---- build index ------------------------------------------------------------------------ */

static int grpc_build_index(kvdex_db *db, const char *seq_id, uint32_t layer, const char *spec) {
  kvdex__grpc_db *g = kvdex__grpc_as(db);
  Kvdex__V1__SequenceRef ref;
  Kvdex__V1__BuildIndexRequest req = KVDEX__V1__BUILD_INDEX_REQUEST__INIT;
  seq_ref(&ref, db, seq_id);
  req.seq = &ref;
  req.all_layers = layer == KVDEX_ALL_LAYERS;
  req.layer = req.all_layers ? 0 : layer;
  req.spec = (char *)spec;
  ProtobufCMessage *resp;
  int rc = kvdex__grpc_unary(g, KVDEX_RPC_BUILD, &req.base,
                             &kvdex__v1__build_index_response__descriptor, &resp);
  if (rc) {
    if (rc == KVDEX_ENOTFOUND) kvdex__grpc_cache_drop(g, seq_id);
    return rc;
  }
  int accepted = ((Kvdex__V1__BuildIndexResponse *)resp)->accepted;
  protobuf_c_message_free_unpacked(resp, NULL);
  if (!accepted)
    return kvdex__seterr(KVDEX_EINTERNAL, "BuildIndex: the server answered OK but not accepted");
  return KVDEX_OK;
}

/* ---- attend / retain --------------------------------------------------------------------- */

static int grpc_attend(kvdex_db *db, uint32_t layer, const kvdex_attend_options *aopts,
                       size_t n_items, const kvdex_attend_item *items, float *const *o,
                       float *const *lse, kvdex_attend_info *info) {
  kvdex__grpc_db *g = kvdex__grpc_as(db);
  int rc = KVDEX_OK;
  size_t bytes = n_items * (sizeof(kvdex_shape) + sizeof(Kvdex__V1__SequenceRef) +
                            sizeof(Kvdex__V1__AttendItem) + sizeof(Kvdex__V1__AttendItem *));
  char *block = malloc(bytes);
  if (!block) return kvdex__seterr(KVDEX_ENOMEM, "out of memory for %zu bytes", bytes);
  kvdex_shape *shapes = (kvdex_shape *)block;
  Kvdex__V1__SequenceRef *refs = (Kvdex__V1__SequenceRef *)(shapes + n_items);
  Kvdex__V1__AttendItem *its = (Kvdex__V1__AttendItem *)(refs + n_items);
  Kvdex__V1__AttendItem **iptrs = (Kvdex__V1__AttendItem **)(its + n_items);
  protobuf_c_boolean *streaming = NULL;
  size_t i;
  for (i = 0; i < n_items && rc == KVDEX_OK; i++) {
    rc = shape_get(g, items[i].seq_id, &shapes[i]);
    if (rc == KVDEX_OK && layer >= shapes[i].n_layers)
      rc = kvdex__seterr(KVDEX_EINVAL, "layer %u out of range (n_layers %u)", layer,
                         shapes[i].n_layers);
    if (rc == KVDEX_OK && i > 0 && aopts->streaming &&
        shapes[i].n_q_heads != shapes[0].n_q_heads)
      rc = kvdex__seterr(KVDEX_EINVAL,
                         "streaming heads need the same n_q_heads in every item (%u vs %u)",
                         shapes[i].n_q_heads, shapes[0].n_q_heads);
    if (rc) break;
    seq_ref(&refs[i], db, items[i].seq_id);
    kvdex__v1__attend_item__init(&its[i]);
    its[i].seq = &refs[i];
    its[i].q.data = (uint8_t *)items[i].q;
    its[i].q.len = (size_t)shapes[i].n_q_heads * shapes[i].head_dim * sizeof(float);
    its[i].n_extra_tokens = items[i].n_extra;
    its[i].extra_tokens = (uint64_t *)items[i].extra;
    iptrs[i] = &its[i];
  }
  if (rc) {
    char where[KVDEX_MAX_SEQ_ID + 48];
    snprintf(where, sizeof where, "item %zu (sequence \"%s\")", i, items[i].seq_id);
    free(block);
    return kvdex__preerr(rc, where);
  }
  Kvdex__V1__AttendRequest req = KVDEX__V1__ATTEND_REQUEST__INIT;
  if (aopts->streaming) {
    uint32_t nq = shapes[0].n_q_heads;
    streaming = malloc(nq * sizeof *streaming);
    if (!streaming) {
      free(block);
      return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
    }
    for (uint32_t h = 0; h < nq; h++) streaming[h] = aopts->streaming[h] ? 1 : 0;
    req.n_streaming_heads = nq;
    req.streaming_heads = streaming;
  }
  req.layer = layer;
  req.n_items = n_items;
  req.items = iptrs;
  req.k = aopts->k;
  req.sinks = aopts->sinks;
  req.window = aopts->window;
  req.index = (char *)(aopts->index ? aopts->index : "");
  req.ef = aopts->ef;
  req.nprobe = aopts->nprobe;
  req.blocks = aopts->blocks;
  req.scale = aopts->scale;
  req.dense = aopts->dense ? 1 : 0;
  ProtobufCMessage *msg;
  rc = kvdex__grpc_unary(g, KVDEX_RPC_ATTEND, &req.base, &kvdex__v1__attend_response__descriptor,
                         &msg);
  free(streaming);
  if (rc) {
    if (rc == KVDEX_ENOTFOUND || rc == KVDEX_EINVAL)
      for (i = 0; i < n_items; i++) kvdex__grpc_cache_drop(g, items[i].seq_id);
    free(block);
    return rc;
  }
  const Kvdex__V1__AttendResponse *resp = (const Kvdex__V1__AttendResponse *)msg;
  if (resp->n_results != n_items)
    rc = kvdex__seterr(KVDEX_EINTERNAL, "Attend: the server sent %zu results for %zu items",
                       resp->n_results, n_items);
  /* Check every result before writing any caller buffer. */
  for (i = 0; i < n_items && rc == KVDEX_OK; i++) {
    const Kvdex__V1__AttendResult *r = resp->results[i];
    size_t nq = shapes[i].n_q_heads, nf = nq * shapes[i].head_dim;
    if (!r || r->o.len != nf * sizeof(float) || r->lse.len != nq * sizeof(float))
      rc = kvdex__seterr(KVDEX_EINTERNAL, "Attend: result %zu has the wrong size", i);
  }
  for (i = 0; i < n_items && rc == KVDEX_OK; i++) {
    const Kvdex__V1__AttendResult *r = resp->results[i];
    memcpy(o[i], r->o.data, r->o.len);
    memcpy(lse[i], r->lse.data, r->lse.len);
    if (info) {
      info[i].keys_touched = r->keys_touched;
      info[i].seconds = r->seconds;
      info[i].tokens = r->tokens;
      info[i].attended = r->attended;
      snprintf(info[i].index, sizeof info[i].index, "%s",
               r->index_used && r->index_used[0] ? r->index_used : "exact");
    }
  }
  protobuf_c_message_free_unpacked(msg, NULL);
  free(block);
  return rc;
}

static int grpc_retain(kvdex_db *db, const char *seq_id, uint32_t layer, const float *q_obs,
                       uint32_t n_obs, const kvdex_retain_options *opts, uint64_t *ids,
                       float *scores) {
  kvdex__grpc_db *g = kvdex__grpc_as(db);
  kvdex_shape sh;
  int rc = shape_get(g, seq_id, &sh);
  if (rc) return rc;
  Kvdex__V1__SequenceRef ref;
  seq_ref(&ref, db, seq_id);
  Kvdex__V1__RetainRequest req = KVDEX__V1__RETAIN_REQUEST__INIT;
  req.seq = &ref;
  req.layer = layer;
  req.q_obs.data = (uint8_t *)q_obs;
  req.q_obs.len = (size_t)n_obs * sh.n_q_heads * sh.head_dim * sizeof(float);
  req.n_obs = n_obs;
  req.budget = opts->budget;
  req.pool_window = opts->pool_window;
  req.pooling = (Kvdex__V1__Pooling)opts->pooling;
  req.sinks = opts->sinks;
  req.window = opts->window;
  req.scale = opts->scale;
  req.materialize = opts->materialize ? 1 : 0;
  ProtobufCMessage *msg;
  rc = kvdex__grpc_unary(g, KVDEX_RPC_RETAIN, &req.base, &kvdex__v1__retain_response__descriptor,
                         &msg);
  if (rc) {
    if (rc == KVDEX_ENOTFOUND || rc == KVDEX_EINVAL) kvdex__grpc_cache_drop(g, seq_id);
    return rc;
  }
  const Kvdex__V1__RetainResponse *resp = (const Kvdex__V1__RetainResponse *)msg;
  if (resp->n_heads != sh.n_kv_heads)
    rc = kvdex__seterr(KVDEX_EINTERNAL, "Retain: %zu heads, expected %u", resp->n_heads,
                       sh.n_kv_heads);
  for (uint32_t h = 0; h < sh.n_kv_heads && rc == KVDEX_OK; h++) {
    const Kvdex__V1__RetainedHead *rh = resp->heads[h];
    if (!rh || rh->n_ids != opts->budget || rh->n_scores != opts->budget)
      rc = kvdex__seterr(KVDEX_EINTERNAL, "Retain: head %u is malformed", h);
  }
  for (uint32_t h = 0; h < sh.n_kv_heads && rc == KVDEX_OK; h++) {
    const Kvdex__V1__RetainedHead *rh = resp->heads[h];
    memcpy(ids + (size_t)h * opts->budget, rh->ids, opts->budget * sizeof *ids);
    if (scores)
      memcpy(scores + (size_t)h * opts->budget, rh->scores, opts->budget * sizeof *scores);
  }
  protobuf_c_message_free_unpacked(msg, NULL);
  return rc;
}

/* ---- open / close ---------------------------------------------------------------------- */

static void grpc_close(kvdex_db *db) {
  kvdex__grpc_db *g = kvdex__grpc_as(db);
  for (size_t i = 0; i < KVDEX__GRPC_SHAPE_SLOTS; i++) free(g->cache[i].id);
  pthread_mutex_destroy(&g->cache_mu);
  if (g->has_auth) {
    grpc_slice_unref(g->auth_md.key);
    grpc_slice_unref(g->auth_md.value);
  }
  if (g->channel) grpc_channel_destroy(g->channel);
  free(g);
  grpc_shutdown();
}

static const kvdex__vt grpc_vt = {
    .name = "grpc",
    .close = grpc_close,
    .create = grpc_create,
    .del = grpc_del,
    .stat = grpc_stat,
    .list = grpc_list,
    .append_begin = grpc_append_begin,
    .append_kv = grpc_append_kv,
    .append_commit = grpc_append_commit,
    .append_abort = grpc_append_abort,
    .read = grpc_read,
    .search = grpc_search,
    .build_index = grpc_build_index,
    .attend = grpc_attend,
    .retain = grpc_retain,
};

/* Reads a PEM file into a NUL-terminated malloc'd string. */
static int read_pem(const char *path, const char *what, char **out /* OUT */) {
  *out = NULL;
  FILE *f = fopen(path, "rb");
  if (!f) return kvdex__seterr(KVDEX_EIO, "%s %.200s: cannot open", what, path);
  size_t cap = 16384, n = 0;
  char *buf = malloc(cap);
  while (buf) {
    if (n + 1 >= cap) {
      char *b = cap < (16u << 20) ? realloc(buf, cap * 2) : NULL;
      if (!b) break;
      buf = b;
      cap *= 2;
    }
    size_t got = fread(buf + n, 1, cap - 1 - n, f);
    n += got;
    if (got == 0) break;
  }
  int err = ferror(f);
  fclose(f);
  if (!buf || n + 1 >= cap || err) {
    free(buf);
    return kvdex__seterr(err ? KVDEX_EIO : KVDEX_ENOMEM, "%s %.200s: cannot read", what, path);
  }
  buf[n] = 0;
  *out = buf;
  return KVDEX_OK;
}

/* TLS channel credentials from the opts' PEM files. */
static int tls_creds(const kvdex_open_opts *opts, grpc_channel_credentials **out /* OUT */) {
  const char *ca = opts ? opts->tls_ca_file : NULL, *cert = opts ? opts->tls_cert_file : NULL,
             *key = opts ? opts->tls_key_file : NULL;
  if ((cert && cert[0]) != (key && key[0]))
    return kvdex__seterr(KVDEX_EINVAL, "tls_cert_file and tls_key_file go together");
  char *ca_pem = NULL, *cert_pem = NULL, *key_pem = NULL;
  int rc = KVDEX_OK;
  if (ca && ca[0]) rc = read_pem(ca, "tls_ca_file", &ca_pem);
  if (!rc && cert && cert[0]) rc = read_pem(cert, "tls_cert_file", &cert_pem);
  if (!rc && key && key[0]) rc = read_pem(key, "tls_key_file", &key_pem);
  if (!rc) {
    grpc_ssl_pem_key_cert_pair pair = {.private_key = key_pem, .cert_chain = cert_pem};
    *out = grpc_ssl_credentials_create_ex(ca_pem, cert_pem ? &pair : NULL, NULL, NULL);
    if (!*out) rc = kvdex__seterr(KVDEX_EINVAL, "cannot make TLS credentials");
  }
  if (key_pem) memset(key_pem, 0, strlen(key_pem));
  free(ca_pem);
  free(cert_pem);
  free(key_pem);
  return rc;
}

int kvdex__grpc_open(const char *target, int tls, const kvdex_open_opts *opts, kvdex_db **out) {
  kvdex__grpc_db *g = calloc(1, sizeof *g);
  if (!g) return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  grpc_init();
  g->base.vt = &grpc_vt;
  g->timeout_ms = (opts && opts->timeout_ms) ? opts->timeout_ms : DEFAULT_TIMEOUT_MS;
  snprintf(g->target, sizeof g->target, "%s", target);
  pthread_mutex_init(&g->cache_mu, NULL);

  grpc_arg args[5];
  args[0].type = GRPC_ARG_INTEGER;
  args[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
  args[0].value.integer = -1; /* responses are checked against the shape instead */
  args[1].type = GRPC_ARG_INTEGER;
  args[1].key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
  args[1].value.integer = -1; /* we keep our own messages small (KVDEX__GRPC_MSG_BYTES) */
  args[2].type = GRPC_ARG_INTEGER;
  args[2].key = (char *)GRPC_ARG_MAX_RECONNECT_BACKOFF_MS;
  args[2].value.integer = 1000; /* a restarted server is found again within a second */
  args[3].type = GRPC_ARG_INTEGER;
  args[3].key = (char *)GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS;
  args[3].value.integer = 100;
  /* gRPC core takes its minimum *connect timeout* (TCP + HTTP/2 handshake) from this
   * argument, not only a backoff: at 100 ms a busy server (e.g. one taking a repair
   * stream, or any server under a sanitizer) never finished a handshake in time and
   * the channel stayed unavailable. Attempts still start every 0.1-1 s (above). */
  args[4].type = GRPC_ARG_INTEGER;
  args[4].key = (char *)GRPC_ARG_MIN_RECONNECT_BACKOFF_MS;
  args[4].value.integer = 5000;
  grpc_channel_args cargs = {.num_args = 5, .args = args};
  if (opts && opts->auth_token && opts->auth_token[0]) {
    size_t tl = strlen(opts->auth_token);
    char *v = malloc(tl + 8);
    if (!v) {
      grpc_close(&g->base);
      return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
    }
    memcpy(v, "Bearer ", 7);
    memcpy(v + 7, opts->auth_token, tl + 1);
    g->auth_md.key = grpc_slice_from_static_string("authorization");
    g->auth_md.value = grpc_slice_from_copied_string(v);
    memset(v, 0, tl + 7);
    free(v);
    g->has_auth = 1;
  }
  grpc_channel_credentials *creds = NULL;
  if (tls) {
    int rc = tls_creds(opts, &creds);
    if (rc) {
      grpc_close(&g->base);
      return rc;
    }
  } else {
    creds = grpc_insecure_credentials_create();
  }
  g->channel = grpc_channel_create(target, creds, &cargs);
  grpc_channel_credentials_release(creds);
  if (!g->channel) {
    grpc_close(&g->base);
    return kvdex__seterr(KVDEX_EINTERNAL, "cannot create a gRPC channel to %s", target);
  }
  for (int m = 0; m < KVDEX_RPC_COUNT; m++)
    g->method[m] = grpc_channel_register_call(g->channel, kvdex_rpc_methods[m].path, NULL, NULL);
  *out = &g->base;
  return KVDEX_OK;
}
