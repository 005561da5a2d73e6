/* server_append: the AppendKV handler of the gRPC server, a client stream driven by
 * the call's state (APPEND_RECV, APPEND_PROBE: server_int.h). Each message is checked
 * against the sequence's shape and staged in one node append transaction
 * (engine/node.h); the stream's end commits it, a refused message or a cancel aborts
 * it, so a stream is stored all or nothing.
 */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "workers/server_int.h"

/* ---- AppendKV ------------------------------------------------------------------ */

void kvdex__srv_append_recv(kvdex__call *c) {
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_MESSAGE;
  op.data.recv_message.recv_message = &c->recv_buf;
  c->state = KVDEX__ST_APPEND_RECV;
  kvdex__srv_start_ops(c, &op, 1);
}

/* Ends the stream with a failure: nothing of it is stored. */
static void kvdex__append_fail(kvdex__call *c, int rc) {
  kvdex_node_append_abort(c->txn);
  c->txn = NULL;
  kvdex__srv_finish_rc(c, rc);
}

/* Validates and stages one message. */
static int kvdex__append_msg(kvdex__call *c, const Kvdex__V1__AppendKVRequest *m) {
  int rc;
  const Kvdex__V1__SequenceRef *ref = m->seq;
  bool named = ref && ((ref->sequence_id && ref->sequence_id[0]) ||
                       (ref->namespace_ && ref->namespace_[0]));
  if (!c->seq) {
    if (!named) return kvdex__seterr(KVDEX_EINVAL, "the first AppendKV message must set seq");
    rc = kvdex__srv_open(c->w, ref, "seq", 1, &c->seq);
    if (rc) return rc;
    rc = kvdex_node_append_begin(c->w->srv->node, c->seq, &c->txn);
    if (rc) return rc;
  } else if (named) {
    const char *ns, *id;
    rc = kvdex__srv_ref_check(c->w, ref, "seq", &ns, &id);
    if (rc) return rc;
    if (strcmp(ns, kvdex_seq_namespace(c->seq)) || strcmp(id, kvdex_seq_id(c->seq)))
      return kvdex__seterr(KVDEX_EINVAL, "seq names %s/%s, but the stream is for %s/%s", ns,
                           id, kvdex_seq_namespace(c->seq), kvdex_seq_id(c->seq));
  }
  const kvdex_shape *sh = kvdex_seq_shape(c->seq);
  if (m->layer >= sh->n_layers)
    return kvdex__seterr(KVDEX_EINVAL, "layer %u out of range (the sequence has %u layers)",
                         m->layer, sh->n_layers);
  if (m->token_start > UINT64_MAX - m->n_tokens)
    return kvdex__seterr(KVDEX_EINVAL, "token_start %llu + n_tokens %u overflows",
                         (unsigned long long)m->token_start, m->n_tokens);
  size_t dsz = kvdex_dtype_size(sh->dtype);
  uint64_t want = (uint64_t)sh->n_kv_heads * m->n_tokens * sh->head_dim * dsz;
  if (m->k.len != want || m->v.len != want)
    return kvdex__seterr(KVDEX_EINVAL,
                         "k has %zu and v %zu bytes, expected n_kv_heads (%u) x n_tokens (%u) x "
                         "head_dim (%u) x %zu (%s) = %llu",
                         m->k.len, m->v.len, sh->n_kv_heads, m->n_tokens, sh->head_dim, dsz,
                         kvdex_dtype_name(sh->dtype), (unsigned long long)want);
  uint64_t want_q = want / sh->n_kv_heads * sh->n_q_heads;
  if (m->q.len && m->q.len != want_q)
    return kvdex__seterr(KVDEX_EINVAL,
                         "q has %zu bytes, expected n_q_heads (%u) x n_tokens (%u) x head_dim "
                         "(%u) x %zu (%s) = %llu, or none",
                         m->q.len, sh->n_q_heads, m->n_tokens, sh->head_dim, dsz,
                         kvdex_dtype_name(sh->dtype), (unsigned long long)want_q);
  /* One landmark per block of block_tokens that ends in [token_start, end). */
  const uint64_t end = m->token_start + m->n_tokens, bt = sh->block_tokens;
  const uint64_t n_blocks = end / bt - m->token_start / bt;
  const uint64_t want_lm = (uint64_t)sh->n_kv_heads * n_blocks * sh->head_dim * dsz;
  if (m->landmarks.len && m->landmarks.len != want_lm)
    return kvdex__seterr(KVDEX_EINVAL,
                         "landmarks has %zu bytes, expected n_kv_heads (%u) x n_blocks (%llu: "
                         "the blocks of %llu tokens that end in tokens [%llu,%llu)) x head_dim "
                         "(%u) x %zu (%s) = %llu, or none",
                         m->landmarks.len, sh->n_kv_heads, (unsigned long long)n_blocks,
                         (unsigned long long)bt, (unsigned long long)m->token_start,
                         (unsigned long long)end, sh->head_dim, dsz, kvdex_dtype_name(sh->dtype),
                         (unsigned long long)want_lm);
  if (m->n_tokens == 0) return KVDEX_OK; /* only names the sequence */
  return kvdex_node_append(c->txn, m->layer, m->token_start, m->n_tokens, m->k.data, m->v.data,
                           m->q.len ? m->q.data : NULL,
                           m->landmarks.len ? m->landmarks.data : NULL);
}

/* A RECV_MESSAGE completed. */
void kvdex__srv_append_on_recv(kvdex__call *c, bool success) {
  if (!success) { /* the call is gone: cancelled or the connection broke */
    kvdex__append_fail(c, kvdex__seterr(KVDEX_ECANCELLED, "the stream failed; nothing was stored"));
    return;
  }
  if (!c->recv_buf) {
    /* End of stream: a clean half-close, or a cancel (which looks the same). Send the
     * initial metadata as a probe; on a cancelled call it fails. */
    if (c->close_done) {
      kvdex__append_fail(c, kvdex__seterr(KVDEX_ECANCELLED,
                                          "the client cancelled the stream; nothing was stored"));
      return;
    }
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_INITIAL_METADATA;
    c->md_sent = true;
    c->state = KVDEX__ST_APPEND_PROBE;
    kvdex__srv_start_ops(c, &op, 1);
    return;
  }
  Kvdex__V1__AppendKVRequest *m =
      kvdex_rpc_unpack(&kvdex__v1__append_kvrequest__descriptor, c->recv_buf);
  kvdex__srv_bb_destroy(c->recv_buf);
  c->recv_buf = NULL;
  int rc = m ? kvdex__append_msg(c, m) : KVDEX_EINVAL;
  if (m) protobuf_c_message_free_unpacked(&m->base, NULL);
  if (rc) {
    char prefix[48];
    snprintf(prefix, sizeof prefix, "message %llu", (unsigned long long)c->n_msgs);
    kvdex__append_fail(c, kvdex__preerr(rc, prefix));
    return;
  }
  c->n_msgs++;
  kvdex__srv_append_recv(c);
}

/* The probe after end-of-stream completed: commit unless the stream was cancelled. */
void kvdex__srv_append_on_probe(kvdex__call *c, bool success) {
  if (!success || (c->close_done && c->cancelled)) {
    KVDEX_LOG(KVDEX_LOG_DEBUG, "AppendKV: cancelled after %llu messages (seen by %s)",
              (unsigned long long)c->n_msgs, success ? "close" : "probe");
    kvdex__append_fail(c, kvdex__seterr(KVDEX_ECANCELLED,
                                        "the client cancelled the stream; nothing was stored"));
    return;
  }
  if (!c->txn) {
    kvdex__srv_finish_rc(c, kvdex__seterr(KVDEX_EINVAL, "the AppendKV stream had no message"));
    return;
  }
  kvdex_txn_result res = {0};
  int rc = kvdex_node_append_commit(c->txn, &res);
  c->txn = NULL;
  if (!rc) {
    kvdex__arena *a = &c->w->arena;
    const kvdex_shape *sh = kvdex_seq_shape(c->seq);
    Kvdex__V1__AppendKVResponse resp = KVDEX__V1__APPEND_KVRESPONSE__INIT;
    resp.tokens_appended = res.tokens_appended;
    resp.tokens_replayed = res.tokens_replayed;
    resp.n_layer_tokens = sh->n_layers;
    resp.layer_tokens = kvdex__srv_arena_alloc(a, sizeof(uint64_t) * sh->n_layers);
    if (!resp.layer_tokens) {
      rc = KVDEX_ENOMEM;
    } else {
      for (uint32_t l = 0; l < sh->n_layers; l++)
        resp.layer_tokens[l] = kvdex_seq_tokens(c->seq, l);
      rc = kvdex_rpc_pack(&resp.base, c->w->srv->max_message, &c->send_buf);
    }
  }
  kvdex__srv_finish_rc(c, rc);
}
