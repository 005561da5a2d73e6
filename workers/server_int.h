/* server_int.h — private to the gRPC server (workers/server*.c): the server, its
 * workers and call contexts, the call machinery (server_call.c) and the handlers of
 * each area (server_seqs.c, server_append.c, server_read.c, server_retrieval.c).
 * Nothing here is part of server.h's interface.
 *
 * Threading: a call is only ever touched by its worker's thread (events of the
 * worker's completion queue), so call contexts need no locks; what the workers share
 * is the kvdex_node (thread-safe), srv->mu (live call count) and srv->pend_mu (index
 * builds awaiting their metrics).
 */
#ifndef KVDEX_SERVER_INT_H
#define KVDEX_SERVER_INT_H

#include <grpc/grpc.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/node.h"
#include "grpc/health/v1/health.pb-c.h"
#include "kvdex/v1/kvdex.pb-c.h"
#include "proto/rpc.h"
#include "workers/server.h"

/* Room for the fields around the tensor bytes of one message (ids are counted apart). */
#define KVDEX__MSG_OVERHEAD 1024u

/* ---- Methods ------------------------------------------------------------------
 * The registered methods are proto/rpc.h's kvdex_rpc_method (path, name, which side
 * streams); the server adds one slot for every call that is not registered. */

/* Everything not registered (grpc_server_request_call): c->method of such a call. */
#define KVDEX__M_UNKNOWN KVDEX_RPC_COUNT
/* Request slots per worker: the registered methods and KVDEX__M_UNKNOWN. */
#define KVDEX__M_COUNT (KVDEX_RPC_COUNT + 1)

/* The method's name for logs and the metrics' `method` label ("(unregistered)" for
 * KVDEX__M_UNKNOWN). A static string. */
const char *kvdex__srv_method_name(kvdex_rpc_method m);

/* ---- Per-worker arena: request-scoped memory of one event's handling ----------- */

typedef struct kvdex__chunk kvdex__chunk;
typedef struct kvdex__arena {
  kvdex__chunk *head;
} kvdex__arena;

/* 16-byte aligned, zeroed memory that lives until kvdex__srv_arena_reset. NULL (with
 * KVDEX_ENOMEM recorded) when malloc fails. */
void *kvdex__srv_arena_alloc(kvdex__arena *a, size_t n);
char *kvdex__srv_arena_strdup(kvdex__arena *a, const char *s);
/* Frees everything; keeps one standard chunk for the next event. */
void kvdex__srv_arena_reset(kvdex__arena *a);
void kvdex__srv_arena_free(kvdex__arena *a);

/* ---- Server, workers, calls ---------------------------------------------------- */

typedef struct kvdex__worker kvdex__worker;
typedef struct kvdex__call kvdex__call;

typedef enum kvdex__tag_kind { KVDEX__TAG_NEW, KVDEX__TAG_OPS, KVDEX__TAG_CLOSE } kvdex__tag_kind;

/* What a completion-queue event points at: a call and which of its operations. */
typedef struct kvdex__tag {
  kvdex__call *call;
  kvdex__tag_kind kind;
} kvdex__tag;

/* The life of a call context:
 *   REQUESTED --new call--> (RECV_CLOSE_ON_SERVER is started at once, then)
 *     unary methods:  handled synchronously --------------------------> FINISH
 *     AppendKV:       APPEND_RECV (one RECV_MESSAGE at a time)
 *                       message   -> stage it (refused -> abort -> FINISH)
 *                       no message-> APPEND_PROBE: send initial metadata; it fails
 *                                    when the stream was cancelled (a cancel looks
 *                                    like end-of-stream) -> abort -> FINISH,
 *                                    else commit -> FINISH
 *     ReadKV:         READ_SEND (one chunk at a time) -> FINISH
 *   FINISH: status (and response) being sent -> DONE
 *   DONE: freed once no batch and no RECV_CLOSE_ON_SERVER is outstanding.
 * A slot whose request fails (server shutting down) goes REQUESTED -> DONE. */
typedef enum kvdex__call_state {
  KVDEX__ST_REQUESTED,
  KVDEX__ST_APPEND_RECV,
  KVDEX__ST_APPEND_PROBE,
  KVDEX__ST_READ_SEND,
  KVDEX__ST_FINISH,
  KVDEX__ST_DONE,
} kvdex__call_state;

struct kvdex__call {
  kvdex__worker *w;
  kvdex_rpc_method method; /* or KVDEX__M_UNKNOWN */
  kvdex__call_state state;
  grpc_call *call;
  gpr_timespec deadline;      /* registered methods */
  grpc_call_details details;  /* unregistered methods (deadline, method name) */
  grpc_metadata_array md;
  double t0;                  /* when the call arrived (kvdex__now_s), for metrics */
  grpc_byte_buffer *payload;  /* request of unary and server-streaming methods */
  grpc_byte_buffer *recv_buf; /* AppendKV: the message being received */
  grpc_byte_buffer *send_buf; /* the message being sent */
  int cancelled;              /* RECV_CLOSE_ON_SERVER's result */
  bool close_pending;         /* RECV_CLOSE_ON_SERVER started, not completed */
  bool close_done;
  bool md_sent;               /* initial metadata sent (or being sent) */
  int ops_pending;            /* batches on t_ops not yet completed (0 or 1) */
  kvdex__tag t_new, t_ops, t_close;
  kvdex_seq *seq; /* AppendKV, ReadKV: a reference held for the call */
  const kvdex_auth_entry *who; /* the caller's token entry (NULL without auth) */
  /* AppendKV */
  kvdex_node_txn *txn;
  uint64_t n_msgs;
  /* ReadKV */
  Kvdex__V1__ReadKVRequest *rd_req;
  size_t rd_rng, rd_id, rd_chunk;
  uint64_t rd_pos;
  uint64_t *rd_ids;
  void *rd_k, *rd_v;
  size_t rd_row; /* bytes of one token of one kv head */
  /* ReadKV with_queries / with_landmarks: the whole layer's, sent after the K/V */
  float *rd_q;         /* [n_q_heads][rd_qn][head_dim] */
  uint64_t *rd_qids;   /* rd_qn token ids */
  uint64_t rd_qn, rd_qpos;
  float *rd_lm;        /* [n_kv_heads][rd_lmn][head_dim] */
  uint64_t rd_lmn, rd_lmpos;
  float *rd_tmp;       /* one message's rows, re-laid out */
  size_t rd_xchunk;    /* query tokens / landmark blocks per message */
};

struct kvdex__worker {
  kvdex_server *srv;
  unsigned idx;
  grpc_completion_queue *cq;
  pthread_t thread;
  bool started;
  kvdex__arena arena; /* reset after every event */
  /* The token entry of the call being handled on this thread (set before each
   * handler runs; NULL without auth): what kvdex__srv_ref_check checks namespaces
   * against. */
  const kvdex_auth_entry *who;
};

/* One layer's accepted build, until kvdex__srv_do_pending_sweep sees it end. */
typedef struct kvdex__pending {
  struct kvdex__pending *next;
  uint32_t layer;
  char *ns, *id;
} kvdex__pending;

struct kvdex_server {
  grpc_server *server;
  grpc_completion_queue *shutdown_cq;
  kvdex_node *node; /* owned; serves the caller's store and pool */
  void *methods[KVDEX_RPC_COUNT]; /* grpc_server_register_method handles */
  unsigned n_workers;
  kvdex__worker *workers;
  int port;
  uint64_t max_message;
  atomic_int stopping;
  /* live call contexts (request slots included); stop waits for zero */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  long live;
  kvdex_metrics *metrics; /* not owned; may be NULL */
  const kvdex_auth *auth; /* not owned; NULL = no token auth */
  /* Index builds accepted and not yet seen ended (metrics only), under pend_mu. */
  pthread_mutex_t pend_mu;
  kvdex__pending *pending;
};

/* ---- Call machinery (server_call.c) --------------------------------------------- */

/* Adds d to the live call count; wakes kvdex_server_stop when it reaches zero. */
void kvdex__srv_live_add(kvdex_server *srv, long d);

/* Posts a request slot for `method` on worker w. KVDEX_ENOMEM, KVDEX_EINTERNAL. */
int kvdex__srv_request_slot(kvdex__worker *w, kvdex_rpc_method method);

/* Handles one completion-queue event of worker w (and frees the call once it is
 * done). Runs on w's thread. */
void kvdex__srv_on_event(kvdex__worker *w, kvdex__tag *t, bool success);

/* Whether the call's deadline has passed. */
bool kvdex__srv_deadline_passed(const kvdex__call *c);

void kvdex__srv_bb_destroy(grpc_byte_buffer *bb); /* NULL is a no-op */

/* KVDEX_EPERM unless the caller's token (w->who) may use namespace ns. Called
 * before any lookup, and its message names only the namespace, so a refusal says
 * nothing about whether a sequence exists. */
int kvdex__srv_ns_allowed(const kvdex__worker *w, const char *ns);
/* Checks a SequenceRef and that the caller may use its namespace; *ns gets the
 * namespace to use ("" -> "default"). */
int kvdex__srv_ref_check(const kvdex__worker *w, const Kvdex__V1__SequenceRef *ref,
                         const char *field, const char **ns /* OUT */,
                         const char **id /* OUT */);
/* Checks ref, then opens it with kvdex_node_open (hidden_ok as there). */
int kvdex__srv_open(const kvdex__worker *w, const Kvdex__V1__SequenceRef *ref,
                    const char *field, int hidden_ok, kvdex_seq **out /* OUT */);

/* Starts a batch on t_ops. On a refused batch (a bug) the call is cancelled so its
 * RECV_CLOSE_ON_SERVER completes, and the call goes to DONE. */
bool kvdex__srv_start_ops(kvdex__call *c, const grpc_op *ops, size_t n);
/* Sends [initial metadata,] [c->send_buf,] status; the call goes to FINISH. */
void kvdex__srv_finish(kvdex__call *c, grpc_status_code code, const char *details);
/* Finishes with rc (KVDEX_OK: send c->send_buf) and kvdex_errmsg() as details. */
void kvdex__srv_finish_rc(kvdex__call *c, int rc);

/* ---- Handlers -------------------------------------------------------------------
 * Unary ones turn c->payload into c->send_buf or return an error (the caller
 * finishes the call); streaming ones drive their state themselves. */

/* server_seqs.c */
int kvdex__srv_do_create(kvdex__call *c);
int kvdex__srv_do_delete(kvdex__call *c);
int kvdex__srv_do_stat(kvdex__call *c);
int kvdex__srv_do_list(kvdex__call *c);
int kvdex__srv_do_publish(kvdex__call *c);
int kvdex__srv_do_health(kvdex__call *c);

/* server_append.c: AppendKV */
void kvdex__srv_append_recv(kvdex__call *c);                   /* posts the next receive */
void kvdex__srv_append_on_recv(kvdex__call *c, bool success);  /* a receive completed */
void kvdex__srv_append_on_probe(kvdex__call *c, bool success); /* the end probe completed */

/* server_read.c: ReadKV */
int kvdex__srv_read_setup(kvdex__call *c);
void kvdex__srv_read_next(kvdex__call *c); /* sends the next chunk, or finishes */

/* server_retrieval.c */
int kvdex__srv_do_search(kvdex__call *c);
int kvdex__srv_do_build(kvdex__call *c);
int kvdex__srv_do_attend(kvdex__call *c);
int kvdex__srv_do_retain(kvdex__call *c);
/* Counts the pending builds that ended into the metrics and forgets them. Runs with
 * pend_mu held. */
void kvdex__srv_do_pending_sweep(kvdex_server *srv);
/* Frees the pending list (the server is stopping). */
void kvdex__srv_pending_free(kvdex_server *srv);

#endif /* KVDEX_SERVER_INT_H */
