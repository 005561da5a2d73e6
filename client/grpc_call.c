/* grpc_call.c — one kvdex.v1 call of the remote transport on its own completion
 * queue, run synchronously until the call's deadline: begin, batches and waits, the
 * status turned into a kvdex code and message, and the unary call built from them.
 * Streams (AppendKV, ReadKV) drive the same primitives from grpc.c.
 */
#include <stdint.h>
#include <string.h>

#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "client/grpc_int.h"

#define TAG(t) ((void *)(uintptr_t)(t))

void kvdex__grpc_auth_op(const kvdex__grpc_db *g, grpc_op *op) {
  if (!g->has_auth) return;
  op->data.send_initial_metadata.count = 1;
  op->data.send_initial_metadata.metadata = (grpc_metadata *)&g->auth_md;
}

size_t kvdex__grpc_send_request_ops(const kvdex__grpc_db *g, grpc_byte_buffer *send,
                                    grpc_op *ops) {
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  kvdex__grpc_auth_op(g, &ops[0]);
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = send;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  return 3;
}

/* The calling thread's overall deadline (kvdex__now_ms, 0 = none): a cluster
 * handle sets it so that failover across nodes stays within the caller's timeout. */
static _Thread_local int64_t tl_deadline_ms;

void kvdex__grpc_set_deadline(int64_t monotonic_ms) { tl_deadline_ms = monotonic_ms; }

/* The timeout of a call starting now: the handle's, cut to the thread's deadline. */
static uint32_t call_timeout_ms(const kvdex__grpc_db *g) {
  if (!tl_deadline_ms) return g->timeout_ms;
  int64_t left = tl_deadline_ms - kvdex__now_ms();
  if (left < 1) left = 1;
  return left < (int64_t)g->timeout_ms ? (uint32_t)left : g->timeout_ms;
}

int kvdex__grpc_call_begin(kvdex__grpc_db *g, int m, kvdex__grpc_call *r) {
  memset(r, 0, sizeof *r);
  r->g = g;
  r->m = m;
  r->status = GRPC_STATUS_UNKNOWN;
  r->details = grpc_empty_slice();
  grpc_metadata_array_init(&r->init_md);
  grpc_metadata_array_init(&r->trail_md);
  r->cq = grpc_completion_queue_create_for_next(NULL);
  if (!r->cq) return kvdex__seterr(KVDEX_EINTERNAL, "%s: cannot create a completion queue",
                                   kvdex_rpc_methods[m].name);
  gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                       gpr_time_from_millis(call_timeout_ms(g), GPR_TIMESPAN));
  r->call = grpc_channel_create_registered_call(g->channel, NULL, GRPC_PROPAGATE_DEFAULTS, r->cq,
                                                g->method[m], deadline, NULL);
  if (!r->call)
    return kvdex__seterr(KVDEX_EINTERNAL, "%s: cannot create the call", kvdex_rpc_methods[m].name);
  return KVDEX_OK;
}

int kvdex__grpc_call_start(kvdex__grpc_call *r, const grpc_op *ops, size_t n, int tag) {
  grpc_call_error e = grpc_call_start_batch(r->call, ops, n, TAG(tag), NULL);
  if (e != GRPC_CALL_OK)
    return kvdex__seterr(KVDEX_EINTERNAL, "%s: grpc_call_start_batch failed (%d)",
                         kvdex_rpc_methods[r->m].name, (int)e);
  return KVDEX_OK;
}

/* The call's deadline bounds the wait: gRPC fails every pending batch when it passes. */
int kvdex__grpc_call_wait(kvdex__grpc_call *r, int tag) {
  if (tag == KVDEX__GRPC_TAG_STATUS && r->status_done) return 1;
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(r->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    if (ev.type != GRPC_OP_COMPLETE) return 0;
    if (ev.tag == TAG(KVDEX__GRPC_TAG_STATUS)) r->status_done = 1;
    if (ev.tag == TAG(tag)) return ev.success;
  }
}

/* Waits for a send batch of a stream whose status batch is pending. A server that
 * refuses a message ends the call with a status but stops reading, so a send that
 * waits for flow-control window would only end at the deadline: once the status is
 * in, cancel the call so that the send fails now. Returns the send's success flag. */
int kvdex__grpc_call_wait_send(kvdex__grpc_call *r) {
  int cancelled = 0;
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(r->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
    if (ev.type != GRPC_OP_COMPLETE) return 0;
    if (ev.tag == TAG(KVDEX__GRPC_TAG_OPS)) return ev.success;
    if (ev.tag == TAG(KVDEX__GRPC_TAG_STATUS)) r->status_done = 1;
    if (r->status_done && !cancelled) {
      grpc_call_cancel(r->call, NULL); /* the status already received is kept */
      cancelled = 1;
    }
  }
}

void kvdex__grpc_call_fill_status(kvdex__grpc_call *r, grpc_op *op) {
  memset(op, 0, sizeof *op);
  op->op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  op->data.recv_status_on_client.trailing_metadata = &r->trail_md;
  op->data.recv_status_on_client.status = &r->status;
  op->data.recv_status_on_client.status_details = &r->details;
  op->data.recv_status_on_client.error_string = &r->error_string;
}

/* Starts the status batch of a streaming call: RECV_INITIAL_METADATA and
 * RECV_STATUS_ON_CLIENT. Initial metadata is received here, not with the first
 * message, because a server that refuses a stream sends no message at all and the
 * status is only delivered once the initial metadata has been taken. */
int kvdex__grpc_call_start_status(kvdex__grpc_call *r) {
  grpc_op ops[2];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[0].data.recv_initial_metadata.recv_initial_metadata = &r->init_md;
  kvdex__grpc_call_fill_status(r, &ops[1]);
  int rc = kvdex__grpc_call_start(r, ops, 2, KVDEX__GRPC_TAG_STATUS);
  if (rc == KVDEX_OK) r->status_started = 1;
  return rc;
}

int kvdex__grpc_call_status_rc(kvdex__grpc_call *r) {
  if (r->status == GRPC_STATUS_OK) return KVDEX_OK;
  int rc = kvdex_wire_rc(r->status);
  size_t len = GRPC_SLICE_LENGTH(r->details);
  const char *d = (const char *)GRPC_SLICE_START_PTR(r->details);
  int dl = len > 400 ? 400 : (int)len;
  const char *m = kvdex_rpc_methods[r->m].name;
  if (rc == KVDEX_EUNAVAIL)
    return kvdex__seterr(rc, "%s: server %s unavailable: %.*s", m, r->g->target, dl, d);
  if (rc == KVDEX_ETIMEDOUT)
    return kvdex__seterr(rc, "%s: deadline of %u ms exceeded (%.*s)", m, r->g->timeout_ms, dl, d);
  return kvdex__seterr(rc, "%s: %s: %.*s", m, kvdex_wire_status_name(r->status), dl, d);
}

void kvdex__grpc_call_end(kvdex__grpc_call *r) {
  if (r->call) {
    if (r->status_started && !r->status_done) {
      grpc_call_cancel(r->call, NULL);
      kvdex__grpc_call_wait(r, KVDEX__GRPC_TAG_STATUS);
    }
    grpc_call_unref(r->call);
    r->call = NULL;
  }
  if (r->cq) {
    grpc_completion_queue_shutdown(r->cq);
    while (grpc_completion_queue_next(r->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(r->cq);
    r->cq = NULL;
  }
  grpc_metadata_array_destroy(&r->init_md);
  grpc_metadata_array_destroy(&r->trail_md);
  grpc_slice_unref(r->details);
  r->details = grpc_empty_slice();
  gpr_free((void *)r->error_string);
  r->error_string = NULL;
}

int kvdex__grpc_unpack(kvdex__grpc_call *r, grpc_byte_buffer *bb,
                       const ProtobufCMessageDescriptor *desc, ProtobufCMessage **out) {
  *out = kvdex_rpc_unpack(desc, bb);
  if (!*out)
    return kvdex__seterr(KVDEX_EINTERNAL, "%s: malformed %s from the server",
                         kvdex_rpc_methods[r->m].name, desc->name);
  return KVDEX_OK;
}

int kvdex__grpc_unary(kvdex__grpc_db *g, int m, const ProtobufCMessage *req,
                      const ProtobufCMessageDescriptor *resp_desc, ProtobufCMessage **resp) {
  *resp = NULL;
  kvdex__grpc_call r;
  int rc = kvdex__grpc_call_begin(g, m, &r);
  grpc_byte_buffer *send = NULL, *recv = NULL;
  if (rc == KVDEX_OK) rc = kvdex_rpc_pack(req, 0, &send);
  if (rc == KVDEX_OK) {
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    kvdex__grpc_send_request_ops(g, send, ops);
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &r.init_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &recv;
    kvdex__grpc_call_fill_status(&r, &ops[5]);
    rc = kvdex__grpc_call_start(&r, ops, 6, KVDEX__GRPC_TAG_OPS);
    if (rc == KVDEX_OK) {
      kvdex__grpc_call_wait(&r, KVDEX__GRPC_TAG_OPS); /* includes the status: always completes */
      rc = kvdex__grpc_call_status_rc(&r);
    }
  }
  if (rc == KVDEX_OK) {
    if (!recv)
      rc = kvdex__seterr(KVDEX_EINTERNAL, "%s: the server sent no response",
                         kvdex_rpc_methods[m].name);
    else
      rc = kvdex__grpc_unpack(&r, recv, resp_desc, resp);
  }
  if (send) grpc_byte_buffer_destroy(send);
  if (recv) grpc_byte_buffer_destroy(recv);
  kvdex__grpc_call_end(&r);
  return rc;
}

void kvdex__grpc_seq_ref_ns(Kvdex__V1__SequenceRef *ref, const char *ns, const char *seq_id) {
  kvdex__v1__sequence_ref__init(ref);
  ref->namespace_ = (char *)ns;
  ref->sequence_id = (char *)seq_id;
}

