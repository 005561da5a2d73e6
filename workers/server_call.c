/* server_call: the call machinery of the gRPC server (see server_int.h): the method
 * table, the per-worker arena, request slots, a call's batches and its state machine
 * (kvdex__call_state), authentication, and the dispatch of a new call to its
 * handler. No handler logic lives here: the handlers of each area are in
 * server_seqs.c, server_append.c, server_read.c and server_retrieval.c; the method
 * table and protobuf pack/unpack are proto/rpc.h's, shared with the client.
 */
#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "kvstore/base.h"
#include "proto/wire.h"
#include "workers/server_int.h"

/* ---- Methods ------------------------------------------------------------------ */

const char *kvdex__srv_method_name(kvdex_rpc_method m) {
  return (unsigned)m < KVDEX_RPC_COUNT ? kvdex_rpc_methods[m].name : "(unregistered)";
}

/* kvdex__srv_method_name of every c->method: the `method` label of the metrics
 * (workers/metrics.h). Filled once, from kvdex_rpc_methods. */
static const char *kvdex__method_names[KVDEX__M_COUNT];
static pthread_once_t kvdex__method_names_once = PTHREAD_ONCE_INIT;

static void kvdex__method_names_fill(void) {
  for (int m = 0; m < KVDEX__M_COUNT; m++)
    kvdex__method_names[m] = kvdex__srv_method_name((kvdex_rpc_method)m);
}

const char *const *kvdex_server_method_names(unsigned *n /* OUT */) {
  pthread_once(&kvdex__method_names_once, kvdex__method_names_fill);
  if (n) *n = KVDEX__M_COUNT;
  return kvdex__method_names;
}

/* ---- Per-worker arena: request-scoped memory of one event's handling ----------- */

struct kvdex__chunk {
  kvdex__chunk *next;
  size_t cap, used;
};

#define KVDEX__CHUNK_HDR ((sizeof(kvdex__chunk) + 15) & ~(size_t)15)
#define KVDEX__CHUNK_SIZE ((size_t)64 << 10)

void *kvdex__srv_arena_alloc(kvdex__arena *a, size_t n) {
  if (n > SIZE_MAX / 4) {
    kvdex__seterr(KVDEX_ENOMEM, "out of memory (%zu bytes)", n);
    return NULL;
  }
  n = (n + 15) & ~(size_t)15;
  kvdex__chunk *c = a->head;
  if (!c || c->cap - c->used < n) {
    size_t cap = n > KVDEX__CHUNK_SIZE ? n : KVDEX__CHUNK_SIZE;
    c = malloc(KVDEX__CHUNK_HDR + cap);
    if (!c) {
      kvdex__seterr(KVDEX_ENOMEM, "out of memory (%zu bytes)", n);
      return NULL;
    }
    c->cap = cap;
    c->used = 0;
    c->next = a->head;
    a->head = c;
  }
  void *p = (char *)c + KVDEX__CHUNK_HDR + c->used;
  c->used += n;
  memset(p, 0, n);
  return p;
}

char *kvdex__srv_arena_strdup(kvdex__arena *a, const char *s) {
  size_t n = strlen(s) + 1;
  char *p = kvdex__srv_arena_alloc(a, n);
  if (p) memcpy(p, s, n);
  return p;
}

void kvdex__srv_arena_reset(kvdex__arena *a) {
  kvdex__chunk *keep = NULL;
  for (kvdex__chunk *c = a->head, *next; c; c = next) {
    next = c->next;
    if (!keep && c->cap == KVDEX__CHUNK_SIZE) {
      keep = c;
    } else {
      free(c);
    }
  }
  if (keep) {
    keep->next = NULL;
    keep->used = 0;
  }
  a->head = keep;
}

void kvdex__srv_arena_free(kvdex__arena *a) {
  for (kvdex__chunk *c = a->head, *next; c; c = next) {
    next = c->next;
    free(c);
  }
  a->head = NULL;
}

/* ---- Small helpers ------------------------------------------------------------- */

void kvdex__srv_live_add(kvdex_server *srv, long d) {
  pthread_mutex_lock(&srv->mu);
  srv->live += d;
  if (srv->live == 0) pthread_cond_broadcast(&srv->cv);
  pthread_mutex_unlock(&srv->mu);
}

bool kvdex__srv_deadline_passed(const kvdex__call *c) {
  gpr_timespec dl = c->method == KVDEX__M_UNKNOWN ? c->details.deadline : c->deadline;
  if (dl.clock_type == GPR_TIMESPAN) return false;
  return gpr_time_cmp(dl, gpr_now(dl.clock_type)) < 0;
}

void kvdex__srv_bb_destroy(grpc_byte_buffer *bb) {
  if (bb) grpc_byte_buffer_destroy(bb);
}

int kvdex__srv_ns_allowed(const kvdex__worker *w, const char *ns) {
  if (!w->srv->auth || kvdex_auth_allows(w->who, ns)) return KVDEX_OK;
  return kvdex__seterr(KVDEX_EPERM, "the token is not allowed namespace \"%.80s\"", ns);
}

int kvdex__srv_ref_check(const kvdex__worker *w, const Kvdex__V1__SequenceRef *ref,
                                const char *field, const char **ns /* OUT */,
                                const char **id /* OUT */) {
  if (!ref) return kvdex__seterr(KVDEX_EINVAL, "%s is required", field);
  const char *n = ref->namespace_ ? ref->namespace_ : "";
  const char *i = ref->sequence_id ? ref->sequence_id : "";
  if (kvdex__name_check(n, i)) return kvdex__preerr(KVDEX_EINVAL, field);
  *ns = kvdex_wire_namespace(n);
  *id = i;
  return kvdex__srv_ns_allowed(w, *ns);
}

int kvdex__srv_open(const kvdex__worker *w, const Kvdex__V1__SequenceRef *ref,
                    const char *field, int hidden_ok, kvdex_seq **out /* OUT */) {
  const char *ns, *id;
  int rc = kvdex__srv_ref_check(w, ref, field, &ns, &id);
  if (rc) return rc;
  return kvdex_node_open(w->srv->node, ns, id, hidden_ok, out);
}

/* ---- Batches ------------------------------------------------------------------- */

bool kvdex__srv_start_ops(kvdex__call *c, const grpc_op *ops, size_t n) {
  grpc_call_error err = grpc_call_start_batch(c->call, ops, n, &c->t_ops, NULL);
  if (err != GRPC_CALL_OK) {
    KVDEX_LOG(KVDEX_LOG_ERROR, "%s: grpc_call_start_batch: %s", kvdex__srv_method_name(c->method),
              grpc_call_error_to_string(err));
    grpc_call_cancel(c->call, NULL);
    c->state = KVDEX__ST_DONE;
    return false;
  }
  c->ops_pending++;
  return true;
}

void kvdex__srv_finish(kvdex__call *c, grpc_status_code code, const char *details) {
  grpc_op ops[3];
  size_t n = 0;
  memset(ops, 0, sizeof ops);
  if (!c->md_sent) {
    ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
    n++;
    c->md_sent = true;
  }
  if (c->send_buf && code == GRPC_STATUS_OK) {
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n].data.send_message.send_message = c->send_buf;
    n++;
  }
  grpc_slice det = grpc_slice_from_copied_string(details ? details : "");
  ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
  ops[n].data.send_status_from_server.status = code;
  ops[n].data.send_status_from_server.status_details = details && details[0] ? &det : NULL;
  n++;
  if (code != GRPC_STATUS_OK)
    KVDEX_LOG(code == GRPC_STATUS_INTERNAL ? KVDEX_LOG_WARN : KVDEX_LOG_DEBUG,
              "%s: status %d: %s", kvdex__srv_method_name(c->method), (int)code,
              details ? details : "");
  c->state = KVDEX__ST_FINISH;
  if (c->w->srv->metrics) {
    kvdex_metrics_rpc(c->w->srv->metrics, (unsigned)c->method, (int)code, kvdex__now_s() - c->t0);
  }
  kvdex__srv_start_ops(c, ops, n);
  grpc_slice_unref(det); /* not retained past grpc_call_start_batch */
}

void kvdex__srv_finish_rc(kvdex__call *c, int rc) {
  if (rc == KVDEX_OK) {
    kvdex__srv_finish(c, GRPC_STATUS_OK, NULL);
  } else {
    kvdex__srv_finish(c, kvdex_wire_status(rc), kvdex_errmsg());
  }
}

/* ---- Call lifecycle ------------------------------------------------------------ */

static void kvdex__call_free(kvdex__call *c) {
  kvdex_server *srv = c->w->srv;
  kvdex_node_append_abort(c->txn);
  kvdex_seq_release(c->seq);
  if (c->rd_req) protobuf_c_message_free_unpacked(&c->rd_req->base, NULL);
  free(c->rd_ids);
  free(c->rd_k);
  free(c->rd_v);
  free(c->rd_q);
  free(c->rd_qids);
  free(c->rd_lm);
  free(c->rd_tmp);
  kvdex__srv_bb_destroy(c->payload);
  kvdex__srv_bb_destroy(c->recv_buf);
  kvdex__srv_bb_destroy(c->send_buf);
  grpc_metadata_array_destroy(&c->md);
  if (c->method == KVDEX__M_UNKNOWN) grpc_call_details_destroy(&c->details);
  if (c->call) grpc_call_unref(c->call);
  free(c);
  kvdex__srv_live_add(srv, -1);
}

/* The token entry named by the call's `authorization: Bearer TOKEN` metadata, or NULL
 * (none, another scheme, or an unknown token). */
static const kvdex_auth_entry *kvdex__authenticate(const kvdex_server *srv,
                                                   const grpc_metadata_array *md) {
  static const char key[] = "authorization", scheme[] = "bearer ";
  const kvdex_auth_entry *who = NULL;
  for (size_t i = 0; i < md->count; i++) {
    const grpc_metadata *m = &md->metadata[i];
    if (GRPC_SLICE_LENGTH(m->key) != sizeof key - 1 ||
        strncasecmp((const char *)GRPC_SLICE_START_PTR(m->key), key, sizeof key - 1))
      continue;
    size_t len = GRPC_SLICE_LENGTH(m->value);
    const char *v = (const char *)GRPC_SLICE_START_PTR(m->value);
    if (len <= sizeof scheme - 1 || strncasecmp(v, scheme, sizeof scheme - 1)) return NULL;
    v += sizeof scheme - 1;
    len -= sizeof scheme - 1;
    while (len && *v == ' ') v++, len--;
    who = kvdex_auth_find(srv->auth, v, len);
    break; /* only the first authorization entry counts */
  }
  return who;
}

/* A request slot got a call (or failed: the server is shutting down). */
static void kvdex__call_on_new(kvdex__call *c, bool success) {
  kvdex__worker *w = c->w;
  kvdex_server *srv = w->srv;
  if (!success) {
    c->state = KVDEX__ST_DONE;
    return;
  }
  c->t0 = kvdex__now_s();
  if (!atomic_load(&srv->stopping)) kvdex__srv_request_slot(w, c->method);

  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
  op.data.recv_close_on_server.cancelled = &c->cancelled;
  grpc_call_error err = grpc_call_start_batch(c->call, &op, 1, &c->t_close, NULL);
  if (err != GRPC_CALL_OK) {
    KVDEX_LOG(KVDEX_LOG_ERROR, "%s: RECV_CLOSE_ON_SERVER: %s", kvdex__srv_method_name(c->method),
              grpc_call_error_to_string(err));
    grpc_call_cancel(c->call, NULL);
    c->state = KVDEX__ST_DONE;
    return;
  }
  c->close_pending = true;

  if (kvdex__srv_deadline_passed(c)) {
    kvdex__srv_finish(c, GRPC_STATUS_DEADLINE_EXCEEDED,
                      "the deadline passed before the call was served");
    return;
  }
  if (srv->auth && c->method != KVDEX_RPC_HEALTH_CHECK) {
    c->who = w->who = kvdex__authenticate(srv, &c->md);
    if (!c->who) {
      kvdex__srv_finish(c, GRPC_STATUS_UNAUTHENTICATED,
                        "missing or unknown bearer token (send metadata "
                        "\"authorization: Bearer TOKEN\")");
      return;
    }
  }
  if (c->method == KVDEX__M_UNKNOWN) {
    char msg[320];
    grpc_slice m = c->details.method;
    int len = (int)(GRPC_SLICE_LENGTH(m) > 256 ? 256 : GRPC_SLICE_LENGTH(m));
    const char *p = (const char *)GRPC_SLICE_START_PTR(m);
    if (len == (int)strlen("/grpc.health.v1.Health/Watch") &&
        !memcmp(p, "/grpc.health.v1.Health/Watch", (size_t)len)) {
      snprintf(msg, sizeof msg, "grpc.health.v1.Health/Watch is not served; use Check");
    } else {
      snprintf(msg, sizeof msg, "unknown method %.*s", len, p);
    }
    kvdex__srv_finish(c, GRPC_STATUS_UNIMPLEMENTED, msg);
    return;
  }
  if (c->method == KVDEX_RPC_APPEND) {
    kvdex__srv_append_recv(c);
    return;
  }
  if (!c->payload) { /* the client sent no message (or is already gone) */
    kvdex__srv_finish(c, GRPC_STATUS_INVALID_ARGUMENT, "the request message is missing");
    return;
  }
  int rc;
  switch (c->method) {
    case KVDEX_RPC_CREATE: rc = kvdex__srv_do_create(c); break;
    case KVDEX_RPC_DELETE: rc = kvdex__srv_do_delete(c); break;
    case KVDEX_RPC_STAT: rc = kvdex__srv_do_stat(c); break;
    case KVDEX_RPC_LIST: rc = kvdex__srv_do_list(c); break;
    case KVDEX_RPC_SEARCH: rc = kvdex__srv_do_search(c); break;
    case KVDEX_RPC_BUILD: rc = kvdex__srv_do_build(c); break;
    case KVDEX_RPC_ATTEND: rc = kvdex__srv_do_attend(c); break;
    case KVDEX_RPC_RETAIN: rc = kvdex__srv_do_retain(c); break;
    case KVDEX_RPC_PUBLISH: rc = kvdex__srv_do_publish(c); break;
    case KVDEX_RPC_HEALTH_CHECK: rc = kvdex__srv_do_health(c); break;
    case KVDEX_RPC_READ:
      rc = kvdex__srv_read_setup(c);
      if (!rc) {
        kvdex__srv_read_next(c);
        return;
      }
      break;
    default: rc = kvdex__seterr(KVDEX_EINTERNAL, "unhandled method %d", (int)c->method); break;
  }
  if (rc && c->send_buf) {
    kvdex__srv_bb_destroy(c->send_buf);
    c->send_buf = NULL;
  }
  kvdex__srv_finish_rc(c, rc);
}

/* A batch on t_ops completed. */
static void kvdex__call_on_ops(kvdex__call *c, bool success) {
  c->ops_pending--;
  switch (c->state) {
    case KVDEX__ST_APPEND_RECV: kvdex__srv_append_on_recv(c, success); break;
    case KVDEX__ST_APPEND_PROBE: kvdex__srv_append_on_probe(c, success); break;
    case KVDEX__ST_READ_SEND:
      if (!success || (c->close_done && c->cancelled)) {
        kvdex__srv_finish(c, GRPC_STATUS_CANCELLED, "the stream was cancelled");
      } else {
        kvdex__srv_read_next(c);
      }
      break;
    case KVDEX__ST_FINISH: c->state = KVDEX__ST_DONE; break;
    default:
      KVDEX_LOG(KVDEX_LOG_ERROR, "%s: unexpected completion in state %d",
                kvdex__srv_method_name(c->method), (int)c->state);
      break;
  }
}

int kvdex__srv_request_slot(kvdex__worker *w, kvdex_rpc_method method) {
  kvdex_server *srv = w->srv;
  kvdex__call *c = calloc(1, sizeof *c);
  if (!c) {
    KVDEX_LOG(KVDEX_LOG_ERROR, "%s: out of memory for a request slot (worker %u)",
              kvdex__srv_method_name(method), w->idx);
    return KVDEX_ENOMEM;
  }
  c->w = w;
  c->method = method;
  c->state = KVDEX__ST_REQUESTED;
  c->t_new = (kvdex__tag){c, KVDEX__TAG_NEW};
  c->t_ops = (kvdex__tag){c, KVDEX__TAG_OPS};
  c->t_close = (kvdex__tag){c, KVDEX__TAG_CLOSE};
  grpc_metadata_array_init(&c->md);
  kvdex__srv_live_add(srv, 1);
  grpc_call_error err;
  if (method == KVDEX__M_UNKNOWN) {
    grpc_call_details_init(&c->details);
    err = grpc_server_request_call(srv->server, &c->call, &c->details, &c->md, w->cq, w->cq,
                                   &c->t_new);
  } else {
    err = grpc_server_request_registered_call(
        srv->server, srv->methods[method], &c->call, &c->deadline, &c->md,
        kvdex_rpc_methods[method].client_streaming ? NULL : &c->payload, w->cq,
        w->cq, &c->t_new);
  }
  if (err != GRPC_CALL_OK) {
    KVDEX_LOG(KVDEX_LOG_ERROR, "%s: cannot request a call: %s", kvdex__srv_method_name(method),
              grpc_call_error_to_string(err));
    kvdex__call_free(c);
    return KVDEX_EINTERNAL;
  }
  return KVDEX_OK;
}

void kvdex__srv_on_event(kvdex__worker *w, kvdex__tag *t, bool success) {
  kvdex__call *c = t->call;
  w->who = c->who; /* the namespaces this call's handlers may use */
  switch (t->kind) {
    case KVDEX__TAG_NEW: kvdex__call_on_new(c, success); break;
    case KVDEX__TAG_OPS: kvdex__call_on_ops(c, success); break;
    case KVDEX__TAG_CLOSE:
      c->close_pending = false;
      c->close_done = true;
      break;
  }
  kvdex__srv_arena_reset(&w->arena);
  if (c->state == KVDEX__ST_DONE && c->ops_pending == 0 && !c->close_pending)
    kvdex__call_free(c);
}
