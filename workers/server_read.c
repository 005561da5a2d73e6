/* server_read: the ReadKV handler of the gRPC server, a server stream driven by the
 * call's state (READ_SEND: server_int.h). Setup checks the request against the
 * sequence's committed tokens and sizes the chunks to the max message size; then one
 * message of K/V per send (read through the node, engine/node.h), and after the K/V
 * the layer's prefill queries and landmarks when asked for, from snapshots taken at
 * setup.
 */
#include <stdlib.h>
#include <string.h>

#include "workers/server_int.h"

/* ---- ReadKV -------------------------------------------------------------------- */

int kvdex__srv_read_setup(kvdex__call *c) {
  kvdex_server *srv = c->w->srv;
  Kvdex__V1__ReadKVRequest *req =
      kvdex_rpc_unpack(&kvdex__v1__read_kvrequest__descriptor, c->payload);
  if (!req) return KVDEX_EINVAL;
  c->rd_req = req;
  int rc = kvdex__srv_open(c->w, req->seq, "seq", 0, &c->seq);
  if (rc) return rc;
  const kvdex_shape *sh = kvdex_seq_shape(c->seq);
  if (req->layer >= sh->n_layers)
    return kvdex__seterr(KVDEX_EINVAL, "layer %u out of range (the sequence has %u layers)",
                         req->layer, sh->n_layers);
  uint64_t n = kvdex_seq_tokens(c->seq, req->layer);
  for (size_t i = 0; i < req->n_ranges; i++) {
    const Kvdex__V1__TokenRange *r = req->ranges[i];
    if (r->start > r->end)
      return kvdex__seterr(KVDEX_EINVAL, "ranges[%zu]: start %llu > end %llu", i,
                           (unsigned long long)r->start, (unsigned long long)r->end);
    if (r->end > n)
      return kvdex__seterr(KVDEX_EINVAL,
                           "ranges[%zu]: end %llu beyond the %llu committed tokens of layer %u", i,
                           (unsigned long long)r->end, (unsigned long long)n, req->layer);
  }
  for (size_t i = 0; i < req->n_token_ids; i++)
    if (req->token_ids[i] >= n)
      return kvdex__seterr(KVDEX_EINVAL,
                           "token_ids[%zu] = %llu, not below the %llu committed tokens of layer %u",
                           i, (unsigned long long)req->token_ids[i], (unsigned long long)n,
                           req->layer);
  /* Tokens per message: as asked (default 4096), within the max message size. */
  c->rd_row = (size_t)sh->head_dim * kvdex_dtype_size(sh->dtype);
  uint64_t per_token = 2 * (uint64_t)sh->n_kv_heads * c->rd_row + 10;
  uint64_t fit = srv->max_message > KVDEX__MSG_OVERHEAD
                     ? (srv->max_message - KVDEX__MSG_OVERHEAD) / per_token
                     : 0;
  if (fit == 0)
    return kvdex__seterr(KVDEX_ENOMEM,
                         "one token (%llu bytes) does not fit the max message size (%llu bytes)",
                         (unsigned long long)per_token, (unsigned long long)srv->max_message);
  uint64_t chunk = req->max_tokens_per_message ? req->max_tokens_per_message
                                               : KVDEX_RPC_READ_CHUNK_TOKENS;
  if (chunk > fit) chunk = fit;
  c->rd_chunk = (size_t)chunk;
  size_t kv_bytes = c->rd_chunk * sh->n_kv_heads * c->rd_row;
  c->rd_ids = malloc(c->rd_chunk * sizeof(uint64_t));
  c->rd_k = malloc(kv_bytes ? kv_bytes : 1);
  c->rd_v = malloc(kv_bytes ? kv_bytes : 1);
  if (!c->rd_ids || !c->rd_k || !c->rd_v)
    return kvdex__seterr(KVDEX_ENOMEM, "out of memory for %zu-token chunks", c->rd_chunk);
  c->rd_rng = 0;
  c->rd_id = 0;
  c->rd_pos = req->n_ranges ? req->ranges[0]->start : 0;
  if (req->with_queries || req->with_landmarks) {
    /* Whole-layer snapshots; rows per message so that one fits the max message. */
    uint32_t heads = sh->n_q_heads > sh->n_kv_heads ? sh->n_q_heads : sh->n_kv_heads;
    uint64_t per_row = (uint64_t)heads * sh->head_dim * sizeof(float) + 10;
    uint64_t xfit = (srv->max_message - KVDEX__MSG_OVERHEAD) / per_row;
    if (xfit == 0)
      return kvdex__seterr(KVDEX_ENOMEM, "one query row (%llu bytes) does not fit the max "
                           "message size", (unsigned long long)per_row);
    c->rd_xchunk =
        xfit < KVDEX_RPC_READ_CHUNK_TOKENS ? (size_t)xfit : (size_t)KVDEX_RPC_READ_CHUNK_TOKENS;
    c->rd_tmp = malloc(c->rd_xchunk * heads * sh->head_dim * sizeof(float));
    if (!c->rd_tmp) return kvdex__seterr(KVDEX_ENOMEM, "out of memory for query chunks");
  }
  if (req->with_queries) {
    rc = kvdex_node_read_queries(srv->node, c->seq, req->layer, &c->rd_q, &c->rd_qids,
                                 &c->rd_qn);
    if (rc) return rc;
  }
  if (req->with_landmarks) {
    rc = kvdex_node_read_landmarks(srv->node, c->seq, req->layer, &c->rd_lm, &c->rd_lmn);
    if (rc) return rc;
  }
  return KVDEX_OK;
}

/* The next message of prefill queries or landmarks after the K/V, in *resp (rows in
 * c->rd_tmp); 0 = nothing left. */
static size_t kvdex__read_extra(kvdex__call *c, Kvdex__V1__ReadKVResponse *resp) {
  const kvdex_shape *sh = kvdex_seq_shape(c->seq);
  size_t d = sh->head_dim;
  if (c->rd_qpos < c->rd_qn) {
    size_t m = c->rd_qn - c->rd_qpos < c->rd_xchunk ? (size_t)(c->rd_qn - c->rd_qpos) : c->rd_xchunk;
    for (uint32_t h = 0; h < sh->n_q_heads; h++)
      memcpy(c->rd_tmp + (size_t)h * m * d, c->rd_q + ((size_t)h * c->rd_qn + c->rd_qpos) * d,
             m * d * sizeof(float));
    resp->n_query_token_ids = m;
    resp->query_token_ids = c->rd_qids + c->rd_qpos;
    resp->q.len = (size_t)sh->n_q_heads * m * d * sizeof(float);
    resp->q.data = (uint8_t *)c->rd_tmp;
    c->rd_qpos += m;
    return m;
  }
  if (c->rd_lmpos < c->rd_lmn) {
    size_t m = c->rd_lmn - c->rd_lmpos < c->rd_xchunk ? (size_t)(c->rd_lmn - c->rd_lmpos) : c->rd_xchunk;
    for (uint32_t h = 0; h < sh->n_kv_heads; h++)
      memcpy(c->rd_tmp + (size_t)h * m * d, c->rd_lm + ((size_t)h * c->rd_lmn + c->rd_lmpos) * d,
             m * d * sizeof(float));
    resp->landmark_block_start = c->rd_lmpos;
    resp->landmark_blocks = (uint32_t)m;
    resp->landmarks.len = (size_t)sh->n_kv_heads * m * d * sizeof(float);
    resp->landmarks.data = (uint8_t *)c->rd_tmp;
    c->rd_lmpos += m;
    return m;
  }
  return 0;
}

/* Sends the next chunk, or finishes with OK after the last. */
void kvdex__srv_read_next(kvdex__call *c) {
  const Kvdex__V1__ReadKVRequest *r = c->rd_req;
  size_t n = 0;
  while (n < c->rd_chunk) {
    if (c->rd_rng < r->n_ranges) {
      const Kvdex__V1__TokenRange *tr = r->ranges[c->rd_rng];
      if (c->rd_pos >= tr->end) {
        if (++c->rd_rng < r->n_ranges) c->rd_pos = r->ranges[c->rd_rng]->start;
        continue;
      }
      c->rd_ids[n++] = c->rd_pos++;
    } else if (c->rd_id < r->n_token_ids) {
      c->rd_ids[n++] = r->token_ids[c->rd_id++];
    } else {
      break;
    }
  }
  kvdex__srv_bb_destroy(c->send_buf);
  c->send_buf = NULL;
  int rc = KVDEX_OK;
  if (n == 0) {
    Kvdex__V1__ReadKVResponse resp = KVDEX__V1__READ_KVRESPONSE__INIT;
    if (kvdex__read_extra(c, &resp) == 0) {
      kvdex__srv_finish(c, GRPC_STATUS_OK, NULL);
      return;
    }
    rc = kvdex_rpc_pack(&resp.base, c->w->srv->max_message, &c->send_buf);
  } else {
    rc = kvdex_node_read(c->w->srv->node, c->seq, r->layer, c->rd_ids, n, c->rd_k, c->rd_v);
  }
  if (!rc && n > 0) {
    Kvdex__V1__ReadKVResponse resp = KVDEX__V1__READ_KVRESPONSE__INIT;
    resp.n_token_ids = n;
    resp.token_ids = c->rd_ids;
    resp.k.len = resp.v.len = n * kvdex_seq_shape(c->seq)->n_kv_heads * c->rd_row;
    resp.k.data = c->rd_k;
    resp.v.data = c->rd_v;
    rc = kvdex_rpc_pack(&resp.base, c->w->srv->max_message, &c->send_buf);
  }
  if (rc) {
    kvdex__srv_finish_rc(c, rc);
    return;
  }
  grpc_op ops[2];
  size_t nops = 0;
  memset(ops, 0, sizeof ops);
  if (!c->md_sent) {
    ops[nops++].op = GRPC_OP_SEND_INITIAL_METADATA;
    c->md_sent = true;
  }
  ops[nops].op = GRPC_OP_SEND_MESSAGE;
  ops[nops].data.send_message.send_message = c->send_buf;
  nops++;
  c->state = KVDEX__ST_READ_SEND;
  kvdex__srv_start_ops(c, ops, nops);
}
