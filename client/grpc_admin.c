/* grpc_admin.c — what the cluster transport (cluster*.c) asks of a node beyond the
 * vtable, with the namespace given explicitly: ListSequences of every namespace,
 * delete, the copy of a sequence from one node to another (K/V, prefill queries,
 * landmarks, index specs; resumable), and a checksum to compare copies. Declared in
 * client_int.h; built on the call machinery and streams of grpc_int.h.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/grpc_int.h"

void kvdex__node_list_free(kvdex__node_list *l) {
  if (!l) return;
  for (size_t i = 0; i < l->n; i++) free(l->seqs[i].layer_tokens);
  free(l->seqs);
  memset(l, 0, sizeof *l);
}

int kvdex__grpc_list_node(kvdex_db *db, const char *ns, kvdex__node_list *out) {
  memset(out, 0, sizeof *out);
  kvdex__grpc_db *g = kvdex__grpc_as(db);
  Kvdex__V1__ListSequencesRequest req = KVDEX__V1__LIST_SEQUENCES_REQUEST__INIT;
  req.namespace_ = (char *)(ns ? ns : "");
  ProtobufCMessage *msg;
  int rc = kvdex__grpc_unary(g, KVDEX_RPC_LIST, &req.base,
                             &kvdex__v1__list_sequences_response__descriptor, &msg);
  if (rc) return rc;
  Kvdex__V1__ListSequencesResponse *resp = (Kvdex__V1__ListSequencesResponse *)msg;
  out->seqs = calloc(resp->n_sequences ? resp->n_sequences : 1, sizeof *out->seqs);
  if (!out->seqs) rc = kvdex__seterr(KVDEX_ENOMEM, "ListSequences: out of memory");
  for (size_t i = 0; rc == KVDEX_OK && i < resp->n_sequences; i++) {
    const Kvdex__V1__SequenceInfo *si = resp->sequences[i];
    if (!si || !si->seq || !si->seq->sequence_id || !si->shape) continue;
    const char *sns = kvdex_wire_namespace(si->seq->namespace_);
    kvdex__node_seq *q = &out->seqs[out->n];
    kvdex_wire_shape_from_pb(si->shape, &q->shape);
    if (strlen(sns) > KVDEX_MAX_NAMESPACE || strlen(si->seq->sequence_id) > KVDEX_MAX_SEQ_ID ||
        kvdex__shape_check(&q->shape) || si->n_layer_tokens != q->shape.n_layers) {
      rc = kvdex__seterr(KVDEX_EINTERNAL, "ListSequences: the server sent a malformed entry");
      break;
    }
    snprintf(q->ns, sizeof q->ns, "%s", sns);
    snprintf(q->id, sizeof q->id, "%s", si->seq->sequence_id);
    q->n_layers = q->shape.n_layers;
    q->layer_tokens = malloc(q->n_layers * sizeof *q->layer_tokens);
    if (!q->layer_tokens) {
      rc = kvdex__seterr(KVDEX_ENOMEM, "ListSequences: out of memory");
      break;
    }
    for (uint32_t l = 0; l < q->n_layers; l++) {
      q->layer_tokens[l] = si->layer_tokens[l];
      q->total_tokens += si->layer_tokens[l];
    }
    q->bytes = si->bytes;
    q->importing = si->importing;
    out->n++;
  }
  out->bytes_used = resp->node_bytes_used;
  out->bytes_cap = resp->node_bytes_cap;
  protobuf_c_message_free_unpacked(msg, NULL);
  if (rc) kvdex__node_list_free(out);
  return rc;
}

int kvdex__grpc_delete_ns(kvdex_db *db, const char *ns, const char *seq_id, uint64_t *bytes_freed) {
  kvdex__grpc_db *g = kvdex__grpc_as(db);
  Kvdex__V1__SequenceRef ref;
  Kvdex__V1__DeleteSequenceRequest req = KVDEX__V1__DELETE_SEQUENCE_REQUEST__INIT;
  kvdex__grpc_seq_ref_ns(&ref, ns, seq_id);
  req.seq = &ref;
  if (!strcmp(ns, db->ns)) kvdex__grpc_cache_drop(g, seq_id);
  ProtobufCMessage *resp;
  int rc = kvdex__grpc_unary(g, KVDEX_RPC_DELETE, &req.base,
                             &kvdex__v1__delete_sequence_response__descriptor, &resp);
  if (rc) return rc;
  if (bytes_freed) *bytes_freed = ((Kvdex__V1__DeleteSequenceResponse *)resp)->bytes_freed;
  protobuf_c_message_free_unpacked(resp, NULL);
  return KVDEX_OK;
}

static int publish_ns(kvdex__grpc_db *g, const char *ns, const char *seq_id) {
  Kvdex__V1__SequenceRef ref;
  Kvdex__V1__PublishSequenceRequest req = KVDEX__V1__PUBLISH_SEQUENCE_REQUEST__INIT;
  kvdex__grpc_seq_ref_ns(&ref, ns, seq_id);
  req.seq = &ref;
  ProtobufCMessage *resp;
  int rc = kvdex__grpc_unary(g, KVDEX_RPC_PUBLISH, &req.base,
                             &kvdex__v1__publish_sequence_response__descriptor, &resp);
  if (rc == KVDEX_OK) protobuf_c_message_free_unpacked(resp, NULL);
  return rc;
}

static int build_ns(kvdex__grpc_db *g, const char *ns, const char *seq_id, uint32_t layer,
                    const char *spec) {
  Kvdex__V1__SequenceRef ref;
  Kvdex__V1__BuildIndexRequest req = KVDEX__V1__BUILD_INDEX_REQUEST__INIT;
  kvdex__grpc_seq_ref_ns(&ref, ns, seq_id);
  req.seq = &ref;
  req.layer = layer;
  req.spec = (char *)spec;
  ProtobufCMessage *resp;
  int rc = kvdex__grpc_unary(g, KVDEX_RPC_BUILD, &req.base,
                             &kvdex__v1__build_index_response__descriptor, &resp);
  if (rc == KVDEX_OK) protobuf_c_message_free_unpacked(resp, NULL);
  return rc;
}

typedef struct copy_ctx {
  kvdex_appender *ap;
  const kvdex_shape *sh;
  size_t row;             /* bytes of one token of one head */
  uint32_t layer;
  uint64_t next, end;     /* K/V tokens expected next, end of the range */
  /* prefill queries and landmarks of the source layer, token-major f32 */
  uint64_t *qids;
  float *q;               /* [qn][n_q_heads][head_dim] */
  size_t qn, qcap;
  float *lm;              /* [lmn][n_kv_heads][head_dim], blocks [0, lmn) */
  size_t lmn, lmcap;
  /* replay reads */
  char *kbuf, *vbuf;      /* [n_kv_heads][n][row] */
  size_t got, want;
  /* progress */
  kvdex__copy_progress_fn progress;
  void *pctx;
  uint64_t done, total, bytes;
} copy_ctx;

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
  if (need <= *cap) return KVDEX_OK;
  size_t c = *cap ? *cap : 64;
  while (c < need) c *= 2;
  void *g = realloc(*p, c * elem);
  if (!g) return kvdex__seterr(KVDEX_ENOMEM, "copy: out of memory");
  *p = g;
  *cap = c;
  return KVDEX_OK;
}

/* Collects the prefill queries / landmarks of a message into the context. */
static int copy_extras(copy_ctx *cc, const Kvdex__V1__ReadKVResponse *m) {
  const kvdex_shape *s = cc->sh;
  size_t d = s->head_dim;
  if (m->n_query_token_ids) {
    size_t t = m->n_query_token_ids;
    if (m->q.len != (size_t)s->n_q_heads * t * d * sizeof(float))
      return kvdex__seterr(KVDEX_EINTERNAL, "ReadKV: %zu query bytes for %zu tokens", m->q.len, t);
    int rc = grow((void **)&cc->qids, &cc->qcap, cc->qn + t, sizeof *cc->qids);
    size_t cap2 = cc->qcap;
    if (!rc) {
      float *g2 = realloc(cc->q, cap2 * s->n_q_heads * d * sizeof(float));
      if (!g2) return kvdex__seterr(KVDEX_ENOMEM, "copy: out of memory");
      cc->q = g2;
    }
    if (rc) return rc;
    const float *src = (const float *)m->q.data;
    for (size_t j = 0; j < t; j++) {
      cc->qids[cc->qn + j] = m->query_token_ids[j];
      for (uint32_t h = 0; h < s->n_q_heads; h++)
        memcpy(cc->q + ((cc->qn + j) * s->n_q_heads + h) * d, src + ((size_t)h * t + j) * d,
               d * sizeof(float));
    }
    cc->qn += t;
  }
  if (m->landmark_blocks) {
    size_t b = m->landmark_blocks;
    if (m->landmark_block_start != cc->lmn ||
        m->landmarks.len != (size_t)s->n_kv_heads * b * d * sizeof(float))
      return kvdex__seterr(KVDEX_EINTERNAL, "ReadKV: landmark blocks out of order or mis-sized");
    int rc = grow((void **)&cc->lm, &cc->lmcap, (cc->lmn + b) * s->n_kv_heads * d, sizeof(float));
    if (rc) return rc;
    const float *src = (const float *)m->landmarks.data;
    for (size_t j = 0; j < b; j++)
      for (uint32_t h = 0; h < s->n_kv_heads; h++)
        memcpy(cc->lm + ((cc->lmn + j) * s->n_kv_heads + h) * d, src + ((size_t)h * b + j) * d,
               d * sizeof(float));
    cc->lmn += b;
  }
  return KVDEX_OK;
}

/* K/V of the copied range: straight into the target's stream. */
static int copy_msg(void *ctx, const Kvdex__V1__ReadKVResponse *m) {
  copy_ctx *cc = ctx;
  size_t t = m->n_token_ids, heads = cc->sh->n_kv_heads;
  if (t == 0) return copy_extras(cc, m);
  if (t > cc->end - cc->next || m->k.len != t * heads * cc->row || m->v.len != m->k.len)
    return kvdex__seterr(KVDEX_EINTERNAL, "ReadKV: a chunk of %zu tokens with %zu bytes of K", t,
                         m->k.len);
  for (size_t j = 0; j < t; j++)
    if (m->token_ids[j] != cc->next + j)
      return kvdex__seterr(KVDEX_EINTERNAL, "ReadKV: token %llu out of order",
                           (unsigned long long)m->token_ids[j]);
  int rc = cc->ap->db->vt->append_kv(cc->ap, cc->layer, cc->next, (uint32_t)t, m->k.data, m->v.data,
                                     NULL, NULL);
  if (rc) return rc;
  cc->next += t;
  cc->done += t;
  cc->bytes += 2 * m->k.len;
  if (cc->progress) cc->progress(cc->pctx, cc->done, cc->total);
  return KVDEX_OK;
}

/* K/V of replayed tokens: into kbuf/vbuf in request order. */
static int replay_msg(void *ctx, const Kvdex__V1__ReadKVResponse *m) {
  copy_ctx *cc = ctx;
  size_t t = m->n_token_ids, heads = cc->sh->n_kv_heads, row = cc->row;
  if (t == 0) return KVDEX_OK;
  if (t > cc->want - cc->got || m->k.len != t * heads * row || m->v.len != m->k.len)
    return kvdex__seterr(KVDEX_EINTERNAL, "ReadKV: a replay chunk of %zu tokens", t);
  for (size_t h = 0; h < heads; h++) {
    memcpy(cc->kbuf + (h * cc->want + cc->got) * row, m->k.data + h * t * row, t * row);
    memcpy(cc->vbuf + (h * cc->want + cc->got) * row, m->v.data + h * t * row, t * row);
  }
  cc->got += t;
  return KVDEX_OK;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* Re-sends the queries (with identical K/V replays of their tokens) and the landmarks
 * of blocks [lm_from, cc->lmn) (with replays of each block's last token). */
static int copy_replays(kvdex__grpc_db *src, const char *ns, const char *seq_id, copy_ctx *cc,
                        uint64_t lm_from) {
  const kvdex_shape *s = cc->sh;
  size_t n_lm = cc->lmn > lm_from ? (size_t)(cc->lmn - lm_from) : 0;
  size_t n = cc->qn + n_lm;
  if (n == 0) return KVDEX_OK;
  uint64_t *ids = malloc(n * sizeof *ids);
  if (!ids) return kvdex__seterr(KVDEX_ENOMEM, "copy: out of memory");
  memcpy(ids, cc->qids, cc->qn * sizeof *ids);
  for (size_t b = 0; b < n_lm; b++) ids[cc->qn + b] = (lm_from + b + 1) * s->block_tokens - 1;
  qsort(ids, n, sizeof *ids, cmp_u64);
  size_t u = 0;
  for (size_t i = 0; i < n; i++)
    if (u == 0 || ids[u - 1] != ids[i]) ids[u++] = ids[i];
  size_t heads = s->n_kv_heads, d = s->head_dim, row = cc->row;
  size_t dsz = kvdex_dtype_size(s->dtype);
  cc->kbuf = malloc(u * heads * row);
  cc->vbuf = malloc(u * heads * row);
  char *k1 = malloc(heads * row), *v1 = malloc(heads * row);
  char *q1 = malloc((size_t)s->n_q_heads * d * dsz), *lm1 = malloc(heads * d * dsz);
  int rc = KVDEX_OK;
  if (!cc->kbuf || !cc->vbuf || !k1 || !v1 || !q1 || !lm1)
    rc = kvdex__seterr(KVDEX_ENOMEM, "copy: out of memory for %zu replayed tokens", u);
  cc->got = 0;
  cc->want = u;
  if (!rc)
    rc = kvdex__grpc_read_stream(src, ns, seq_id, cc->layer, 0, 0, ids, u, 0, 0,
                                 kvdex__grpc_kv_per_msg(s), replay_msg, cc);
  if (!rc && cc->got != u)
    rc = kvdex__seterr(KVDEX_EINTERNAL, "ReadKV: %zu of %zu replayed tokens", cc->got, u);
  /* Token t's rows: its column of kbuf/vbuf. */
#define ROWS_OF(j)                                                                  \
  do {                                                                              \
    for (size_t h_ = 0; h_ < heads; h_++) {                                         \
      memcpy(k1 + h_ * row, cc->kbuf + (h_ * u + (j)) * row, row);                  \
      memcpy(v1 + h_ * row, cc->vbuf + (h_ * u + (j)) * row, row);                  \
    }                                                                               \
  } while (0)
  for (size_t i = 0; !rc && i < cc->qn; i++) {
    uint64_t *at = bsearch(&cc->qids[i], ids, u, sizeof *ids, cmp_u64);
    ROWS_OF((size_t)(at - ids));
    kvdex__from_f32(s->dtype, cc->q + i * s->n_q_heads * d, q1, (size_t)s->n_q_heads * d);
    rc = cc->ap->db->vt->append_kv(cc->ap, cc->layer, cc->qids[i], 1, k1, v1, q1, NULL);
  }
  for (size_t b = 0; !rc && b < n_lm; b++) {
    uint64_t t = (lm_from + b + 1) * s->block_tokens - 1;
    uint64_t *at = bsearch(&t, ids, u, sizeof *ids, cmp_u64);
    ROWS_OF((size_t)(at - ids));
    kvdex__from_f32(s->dtype, cc->lm + (lm_from + b) * heads * d, lm1, heads * d);
    rc = cc->ap->db->vt->append_kv(cc->ap, cc->layer, t, 1, k1, v1, NULL, lm1);
  }
#undef ROWS_OF
  free(ids);
  free(cc->kbuf);
  free(cc->vbuf);
  cc->kbuf = cc->vbuf = NULL;
  free(k1);
  free(v1);
  free(q1);
  free(lm1);
  return rc;
}

int kvdex__grpc_copy_seq(kvdex_db *src_db, kvdex_db *dst_db, const char *ns, const char *seq_id,
                         kvdex__copy_progress_fn progress, void *ctx, uint64_t *bytes_copied) {
  kvdex__grpc_db *src = kvdex__grpc_as(src_db), *dst = kvdex__grpc_as(dst_db);
  if (bytes_copied) *bytes_copied = 0;
  kvdex_shape shape, dshape;
  kvdex_seq_info si = {0}, di = {0};
  int importing = 0, rc = kvdex__grpc_stat_ns(src, ns, seq_id, 0, &shape, &si, NULL);
  if (rc) return kvdex__preerr(rc, "copy: source");
  rc = kvdex__grpc_stat_ns(dst, ns, seq_id, 1, &dshape, &di, &importing);
  if (rc == KVDEX_ENOTFOUND) {
    rc = kvdex__grpc_create_ns(dst, ns, seq_id, &shape, 1);
    importing = 1;
    memset(&di, 0, sizeof di);
  } else if (rc == KVDEX_OK && memcmp(&dshape, &shape, sizeof shape) != 0) {
    rc = kvdex__seterr(KVDEX_ECONFLICT, "copy: %s/%s exists on %s with another shape", ns, seq_id,
                       dst->target);
  }
  copy_ctx cc = {.sh = &shape, .progress = progress, .pctx = ctx};
  cc.row = (size_t)shape.head_dim * kvdex_dtype_size(shape.dtype);
  for (uint32_t l = 0; !rc && l < shape.n_layers; l++) {
    uint64_t have = di.layer_tokens ? di.layer_tokens[l] : 0;
    if (si.layer_tokens[l] > have) cc.total += si.layer_tokens[l] - have;
  }
  for (uint32_t l = 0; !rc && l < shape.n_layers; l++) {
    uint64_t have = di.layer_tokens ? di.layer_tokens[l] : 0;
    uint64_t dq = di.layer_query_tokens ? di.layer_query_tokens[l] : 0;
    uint64_t dlm = di.layer_landmark_blocks ? di.layer_landmark_blocks[l] : 0;
    int need_q =
        si.layer_query_tokens[l] > dq || (si.layer_query_tokens[l] && have < si.layer_tokens[l]);
    int need_lm = si.layer_landmark_blocks[l] > dlm;
    if (si.layer_tokens[l] <= have && !need_q && !need_lm) continue;
    cc.layer = l;
    cc.next = have;
    cc.end = si.layer_tokens[l] > have ? si.layer_tokens[l] : have;
    cc.qn = cc.lmn = 0;
    rc = kvdex__grpc_append_begin_ns(dst, ns, seq_id, &shape, &cc.ap);
    if (rc) break;
    rc = kvdex__grpc_read_stream(src, ns, seq_id, l, have, cc.end, NULL, 0, need_q, need_lm,
                                 kvdex__grpc_kv_per_msg(&shape), copy_msg, &cc);
    if (!rc && cc.next != cc.end)
      rc = kvdex__seterr(KVDEX_EINTERNAL, "copy: layer %u: %llu of %llu tokens arrived", l,
                         (unsigned long long)(cc.next - have),
                         (unsigned long long)(cc.end - have));
    if (!rc) rc = copy_replays(src, ns, seq_id, &cc, dlm);
    if (rc) {
      char why[512];
      snprintf(why, sizeof why, "%s", kvdex_errmsg());
      cc.ap->db->vt->append_abort(cc.ap);
      rc = kvdex__seterr(rc, "%s", why);
      break;
    }
    rc = cc.ap->db->vt->append_commit(cc.ap, NULL);
  }
  /* The source's indexes, queued on the copy (a build that is refused does not undo it). */
  for (uint32_t i = 0; !rc && i < si.n_indexes; i++) {
    const kvdex_layer_index *li = &si.indexes[i];
    if (!li->spec[0] || li->state == KVDEX_INDEX_FAILED) continue;
    int b = build_ns(dst, ns, seq_id, li->layer, li->spec);
    if (b && b != KVDEX_EBUSY)
      KVDEX_LOG(KVDEX_LOG_WARN, "copy of %s/%s to %s: BuildIndex of layer %u (%s): %s", ns, seq_id,
                dst->target, li->layer, li->spec, kvdex_errmsg());
  }
  if (!rc && importing) rc = publish_ns(dst, ns, seq_id);
  if (bytes_copied) *bytes_copied = cc.bytes;
  free(cc.qids);
  free(cc.q);
  free(cc.lm);
  kvdex_seq_info_free(&si);
  kvdex_seq_info_free(&di);
  return rc;
}

typedef struct sum_ctx {
  uint64_t h;
  uint64_t next;
} sum_ctx;

static uint64_t sum_bytes(uint64_t h, const uint8_t *p, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, p + i, 8);
    h = (h ^ w) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  for (; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

static int sum_msg(void *ctx, const Kvdex__V1__ReadKVResponse *m) {
  sum_ctx *sc = ctx;
  for (size_t j = 0; j < m->n_token_ids; j++)
    if (m->token_ids[j] != sc->next++)
      return kvdex__seterr(KVDEX_EINTERNAL, "ReadKV: token out of order");
  sc->h = sum_bytes(sc->h, m->k.data, m->k.len);
  sc->h = sum_bytes(sc->h, m->v.data, m->v.len);
  return KVDEX_OK;
}

int kvdex__grpc_checksum(kvdex_db *db, const char *ns, const char *seq_id, uint64_t *sum) {
  kvdex__grpc_db *g = kvdex__grpc_as(db);
  kvdex_shape shape;
  kvdex_seq_info info = {0};
  int rc = kvdex__grpc_stat_ns(g, ns, seq_id, 0, &shape, &info, NULL);
  if (rc) return rc;
  sum_ctx sc = {.h = 1469598103934665603ull};
  sc.h = sum_bytes(sc.h, (const uint8_t *)&shape, sizeof shape);
  for (uint32_t l = 0; !rc && l < shape.n_layers; l++) {
    sc.h = sum_bytes(sc.h, (const uint8_t *)&info.layer_tokens[l], sizeof(uint64_t));
    sc.next = 0;
    if (info.layer_tokens[l])
      rc = kvdex__grpc_read_stream(g, ns, seq_id, l, 0, info.layer_tokens[l], NULL, 0, 0, 0,
                                   kvdex__grpc_kv_per_msg(&shape), sum_msg, &sc);
    if (!rc && sc.next != info.layer_tokens[l])
      rc = kvdex__seterr(KVDEX_EINTERNAL, "checksum: layer %u: %llu of %llu tokens", l,
                         (unsigned long long)sc.next, (unsigned long long)info.layer_tokens[l]);
  }
  kvdex_seq_info_free(&info);
  if (!rc) *sum = sc.h ^ (sc.h >> 31);
  return rc;
}