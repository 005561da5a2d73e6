/* server: the kvdex gRPC server on the gRPC C core (C API only). Serves
 * kvdex.v1.KVStore, kvdex.v1.Retrieval and grpc.health.v1.Health/Check over a
 * kvdex_store; every other method answers UNIMPLEMENTED. BuildIndex hands builds to
 * an indexer (workers/indexer.h) with build threads of its own; Search goes through
 * the same indexer (exact scan, or a ready index plus an exact scan of the tail);
 * Attend and Retain run workers/attend_op.h on the server's pool.
 *
 * N worker threads, each with its own completion queue and one outstanding request
 * slot per method. A call is a small state machine (kvdex__call_state) driven only by
 * events of its worker's queue, so no call is ever touched by two threads and calls
 * need no locks. Requests are unpacked with protobuf-c and every size is checked
 * against the sequence's shape before the store or the index sees it.
 * It does not own the store or the pool, and it never prints (KVDEX_LOG only).
 * With a metrics handle (opts->metrics, not owned) it records each call where its
 * status is sent, Search/Attend keys touched, and index builds seen ended.
 */
#include "workers/server.h"

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/log.h>
#include <grpc/support/time.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "grpc/health/v1/health.pb-c.h"
#include "kvdex/v1/kvdex.pb-c.h"
#include "proto/wire.h"
#include "workers/attend_op.h"
#include "workers/indexer.h"

#define KVDEX__DEFAULT_MAX_MESSAGE (64u << 20)
#define KVDEX__DEFAULT_READ_CHUNK 4096u
#define KVDEX__MAX_THREADS 256u
/* Room for the fields around the tensor bytes of one message (ids are counted apart). */
#define KVDEX__MSG_OVERHEAD 1024u

/* ---- Methods ------------------------------------------------------------------ */

typedef enum kvdex__method {
  KVDEX__M_CREATE,
  KVDEX__M_DELETE,
  KVDEX__M_STAT,
  KVDEX__M_LIST,
  KVDEX__M_APPEND,
  KVDEX__M_READ,
  KVDEX__M_SEARCH,
  KVDEX__M_BUILD,
  KVDEX__M_ATTEND,
  KVDEX__M_RETAIN,
  KVDEX__M_PUBLISH,
  KVDEX__M_HEALTH,
  KVDEX__M_UNKNOWN, /* everything not registered: grpc_server_request_call */
  KVDEX__M_COUNT
} kvdex__method;

static const struct {
  const char *path;
  const char *name;
  grpc_server_register_method_payload_handling payload;
} kvdex__methods[KVDEX__M_COUNT] = {
    {"/kvdex.v1.KVStore/CreateSequence", "CreateSequence", GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER},
    {"/kvdex.v1.KVStore/DeleteSequence", "DeleteSequence", GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER},
    {"/kvdex.v1.KVStore/StatSequence", "StatSequence", GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER},
    {"/kvdex.v1.KVStore/ListSequences", "ListSequences", GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER},
    {"/kvdex.v1.KVStore/AppendKV", "AppendKV", GRPC_SRM_PAYLOAD_NONE},
    {"/kvdex.v1.KVStore/ReadKV", "ReadKV", GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER},
    {"/kvdex.v1.Retrieval/Search", "Search", GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER},
    {"/kvdex.v1.Retrieval/BuildIndex", "BuildIndex", GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER},
    {"/kvdex.v1.Retrieval/Attend", "Attend", GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER},
    {"/kvdex.v1.Retrieval/Retain", "Retain", GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER},
    {"/kvdex.v1.KVStore/PublishSequence", "PublishSequence",
     GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER},
    {"/grpc.health.v1.Health/Check", "Health/Check", GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER},
    {NULL, "(unregistered)", GRPC_SRM_PAYLOAD_NONE},
};

/* The names above as the `method` label of the metrics (workers/metrics.h). */
static const char *const kvdex__method_names[KVDEX__M_COUNT] = {
    "CreateSequence", "DeleteSequence", "StatSequence", "ListSequences",
    "AppendKV",       "ReadKV",         "Search",       "BuildIndex",
    "Attend",         "Retain",         "PublishSequence", "Health/Check", "(unregistered)"};

const char *const *kvdex_server_method_names(unsigned *n /* OUT */) {
  if (n) *n = KVDEX__M_COUNT;
  return kvdex__method_names;
}

/* ---- Per-worker arena: request-scoped memory of one event's handling ----------- */

typedef struct kvdex__chunk {
  struct kvdex__chunk *next;
  size_t cap, used;
} kvdex__chunk;

#define KVDEX__CHUNK_HDR ((sizeof(kvdex__chunk) + 15) & ~(size_t)15)
#define KVDEX__CHUNK_SIZE ((size_t)64 << 10)

typedef struct kvdex__arena {
  kvdex__chunk *head;
} kvdex__arena;

/* 16-byte aligned, zeroed memory that lives until kvdex__arena_reset. NULL (with
 * KVDEX_ENOMEM recorded) when malloc fails. */
static void *kvdex__arena_alloc(kvdex__arena *a, size_t n) {
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

static char *kvdex__arena_strdup(kvdex__arena *a, const char *s) {
  size_t n = strlen(s) + 1;
  char *p = kvdex__arena_alloc(a, n);
  if (p) memcpy(p, s, n);
  return p;
}

/* Frees everything; keeps one standard chunk for the next event. */
static void kvdex__arena_reset(kvdex__arena *a) {
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

static void kvdex__arena_free(kvdex__arena *a) {
  for (kvdex__chunk *c = a->head, *next; c; c = next) {
    next = c->next;
    free(c);
  }
  a->head = NULL;
}

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
  kvdex__method method;
  kvdex__call_state state;
  grpc_call *call;
  gpr_timespec deadline;      /* registered methods */
  grpc_call_details details;  /* unregistered methods (deadline, method name) */
  grpc_metadata_array md;
  struct timespec t0;         /* when the call arrived (CLOCK_MONOTONIC), for metrics */
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
  kvdex_txn *txn;
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
  /* per-thread scratch, reused across calls */
  kvdex__arena arena;
  float *qf;
  size_t qf_cap;
  kvdex_search_result res;
  kvdex_index_scratch *ixs; /* made on the first indexed search */
  kvdex_attend_ctx *actx;   /* made on the first Attend / Retain, grows and is reused */
  /* The token entry of the call being handled on this thread (set before each
   * handler runs; NULL without auth): what kvdex__ref_check checks namespaces against. */
  const kvdex_auth_entry *who;
};

struct kvdex_server {
  grpc_server *server;
  grpc_completion_queue *shutdown_cq;
  kvdex_store *store;
  kvdex_pool *pool;
  kvdex_indexer *indexer; /* owned: BuildIndex and Search */
  void *methods[KVDEX__M_COUNT];
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
  struct kvdex__pending *pending;
};

/* One layer's accepted build, until kvdex__pending_sweep sees it READY or FAILED. */
typedef struct kvdex__pending {
  struct kvdex__pending *next;
  uint32_t layer;
  char *ns, *id;
} kvdex__pending;

/* Counts the pending builds that ended into the metrics and forgets them (and those
 * whose sequence is gone: a build of a deleted sequence is discarded). Runs with
 * pend_mu held. A layer rebuilt twice between two sweeps counts once. */
static void kvdex__do_pending_sweep(kvdex_server *srv) {
  uint64_t ready = 0, failed = 0;
  for (kvdex__pending **pp = &srv->pending; *pp;) {
    kvdex__pending *p = *pp;
    kvdex_seq *seq = NULL;
    kvdex_indexer_info ii;
    int state = KVDEX_INDEXER_NONE;
    if (kvdex_seq_open(srv->store, p->ns, p->id, &seq) == KVDEX_OK &&
        kvdex_indexer_info_get(srv->indexer, seq, p->layer, &ii) == KVDEX_OK)
      state = ii.state;
    kvdex_seq_release(seq);
    if (state == KVDEX_INDEXER_BUILDING) {
      pp = &p->next;
      continue;
    }
    if (state == KVDEX_INDEXER_READY) ready++;
    if (state == KVDEX_INDEXER_FAILED) failed++;
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

void kvdex_server_collect(kvdex_server *srv) {
  if (!srv || !srv->metrics) return;
  kvdex_store_stats st;
  kvdex_store_stats_get(srv->store, &st);
  kvdex_metrics_set_store(srv->metrics, st.bytes_used, st.bytes_cap, st.n_sequences);
  pthread_mutex_lock(&srv->pend_mu);
  kvdex__do_pending_sweep(srv);
  pthread_mutex_unlock(&srv->pend_mu);
}

static void kvdex__live_add(kvdex_server *srv, long d) {
  pthread_mutex_lock(&srv->mu);
  srv->live += d;
  if (srv->live == 0) pthread_cond_broadcast(&srv->cv);
  pthread_mutex_unlock(&srv->mu);
}

/* ---- Small helpers ------------------------------------------------------------- */

static bool kvdex__deadline_passed(gpr_timespec dl) {
  if (dl.clock_type == GPR_TIMESPAN) return false;
  return gpr_time_cmp(dl, gpr_now(dl.clock_type)) < 0;
}

static gpr_timespec kvdex__call_deadline(const kvdex__call *c) {
  return c->method == KVDEX__M_UNKNOWN ? c->details.deadline : c->deadline;
}

static void kvdex__bb_destroy(grpc_byte_buffer *bb) {
  if (bb) grpc_byte_buffer_destroy(bb);
}

/* The bytes of a received message as one slice (a reference when the buffer is a
 * single uncompressed slice, a copy otherwise). */
static int kvdex__bb_slice(grpc_byte_buffer *bb, grpc_slice *out /* OUT */) {
  if (bb->type == GRPC_BB_RAW && bb->data.raw.compression == GRPC_COMPRESS_NONE &&
      bb->data.raw.slice_buffer.count == 1) {
    *out = grpc_slice_ref(bb->data.raw.slice_buffer.slices[0]);
    return KVDEX_OK;
  }
  grpc_byte_buffer_reader r;
  if (!grpc_byte_buffer_reader_init(&r, bb))
    return kvdex__seterr(KVDEX_EINVAL, "cannot decompress the request message");
  *out = grpc_byte_buffer_reader_readall(&r);
  grpc_byte_buffer_reader_destroy(&r);
  return KVDEX_OK;
}

/* Unpacks a request; NULL with KVDEX_EINVAL "cannot parse <what>" on garbage. */
static void *kvdex__unpack(const ProtobufCMessageDescriptor *d, const char *what,
                           grpc_byte_buffer *bb) {
  grpc_slice s;
  if (kvdex__bb_slice(bb, &s)) return NULL;
  ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(s),
                                                  GRPC_SLICE_START_PTR(s));
  grpc_slice_unref(s);
  if (!m) kvdex__seterr(KVDEX_EINVAL, "cannot parse %s", what);
  return m;
}

/* Packs a response into a byte buffer (owned by the caller). KVDEX_ENOMEM when it
 * is larger than the max message size or memory runs out. */
static int kvdex__pack(const kvdex_server *srv, const ProtobufCMessage *m,
                       grpc_byte_buffer **out /* OUT */) {
  size_t n = protobuf_c_message_get_packed_size(m);
  if (n > srv->max_message)
    return kvdex__seterr(KVDEX_ENOMEM,
                         "response of %zu bytes exceeds the max message size (%llu bytes)", n,
                         (unsigned long long)srv->max_message);
  grpc_slice s;
  if (n == 0) {
    s = grpc_empty_slice();
  } else {
    uint8_t *buf = malloc(n);
    if (!buf) return kvdex__seterr(KVDEX_ENOMEM, "out of memory packing %zu bytes", n);
    protobuf_c_message_pack(m, buf);
    s = grpc_slice_new(buf, n, free);
  }
  *out = grpc_raw_byte_buffer_create(&s, 1);
  grpc_slice_unref(s);
  return KVDEX_OK;
}

/* KVDEX_EPERM unless the caller's token (w->who) may use namespace ns. Called
 * before any lookup, and its message names only the namespace, so a refusal says
 * nothing about whether a sequence exists. */
static int kvdex__ns_allowed(const kvdex__worker *w, const char *ns) {
  if (!w->srv->auth || kvdex_auth_allows(w->who, ns)) return KVDEX_OK;
  return kvdex__seterr(KVDEX_EPERM, "the token is not allowed namespace \"%.80s\"", ns);
}

/* Checks a SequenceRef and that the caller may use its namespace; *ns gets the
 * namespace to use ("" -> "default"). */
static int kvdex__ref_check(const kvdex__worker *w, const Kvdex__V1__SequenceRef *ref,
                            const char *field, const char **ns /* OUT */,
                            const char **id /* OUT */) {
  if (!ref) return kvdex__seterr(KVDEX_EINVAL, "%s is required", field);
  const char *n = ref->namespace_ ? ref->namespace_ : "";
  const char *i = ref->sequence_id ? ref->sequence_id : "";
  if (kvdex_name_check(n, i)) return kvdex__preerr(KVDEX_EINVAL, field);
  *ns = kvdex_wire_namespace(n);
  *id = i;
  return kvdex__ns_allowed(w, *ns);
}

/* Opens the sequence of a request. A hidden (importing) sequence is NOT_FOUND unless
 * hidden_ok: reads must fail over to a complete copy on another node. */
static int kvdex__open(const kvdex__worker *w, const Kvdex__V1__SequenceRef *ref,
                       const char *field, int hidden_ok, kvdex_seq **out /* OUT */) {
  const char *ns, *id;
  int rc = kvdex__ref_check(w, ref, field, &ns, &id);
  if (rc) return rc;
  rc = kvdex_seq_open(w->srv->store, ns, id, out);
  if (rc || hidden_ok || !kvdex_seq_importing(*out)) return rc;
  kvdex_seq_release(*out);
  *out = NULL;
  return kvdex__seterr(KVDEX_ENOTFOUND,
                       "sequence %s/%s is not here yet (a copy is being imported; hidden "
                       "until PublishSequence)", ns, id);
}

static int kvdex__fill_info(kvdex_server *srv, kvdex__arena *a, kvdex_seq *seq,
                            Kvdex__V1__SequenceInfo *info /* OUT */) {
  kvdex__v1__sequence_info__init(info);
  Kvdex__V1__SequenceRef *ref = kvdex__arena_alloc(a, sizeof *ref);
  Kvdex__V1__Shape *shape = kvdex__arena_alloc(a, sizeof *shape);
  if (!ref || !shape) return KVDEX_ENOMEM;
  kvdex__v1__sequence_ref__init(ref);
  kvdex__v1__shape__init(shape);
  ref->namespace_ = kvdex__arena_strdup(a, kvdex_seq_namespace(seq));
  ref->sequence_id = kvdex__arena_strdup(a, kvdex_seq_id(seq));
  if (!ref->namespace_ || !ref->sequence_id) return KVDEX_ENOMEM;
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  kvdex_wire_shape_to_pb(sh, shape);
  info->seq = ref;
  info->shape = shape;
  info->n_layer_tokens = sh->n_layers;
  info->layer_tokens = kvdex__arena_alloc(a, sizeof(uint64_t) * sh->n_layers);
  if (!info->layer_tokens) return KVDEX_ENOMEM;
  for (uint32_t l = 0; l < sh->n_layers; l++) info->layer_tokens[l] = kvdex_seq_tokens(seq, l);
  info->n_layer_query_tokens = sh->n_layers;
  info->layer_query_tokens = kvdex__arena_alloc(a, sizeof(uint64_t) * sh->n_layers);
  if (!info->layer_query_tokens) return KVDEX_ENOMEM;
  for (uint32_t l = 0; l < sh->n_layers; l++)
    info->layer_query_tokens[l] = kvdex_seq_query_tokens(seq, l);
  info->n_layer_landmark_blocks = sh->n_layers;
  info->layer_landmark_blocks = kvdex__arena_alloc(a, sizeof(uint64_t) * sh->n_layers);
  if (!info->layer_landmark_blocks) return KVDEX_ENOMEM;
  for (uint32_t l = 0; l < sh->n_layers; l++)
    info->layer_landmark_blocks[l] = kvdex_seq_landmark_blocks(seq, l);
  /* Layers that have had a BuildIndex. */
  for (uint32_t l = 0; l < sh->n_layers; l++) {
    kvdex_indexer_info ii;
    if (kvdex_indexer_info_get(srv->indexer, seq, l, &ii) || ii.state == KVDEX_INDEXER_NONE)
      continue;
    if (!info->indexes) {
      info->indexes = kvdex__arena_alloc(a, sizeof(*info->indexes) * (sh->n_layers - l));
      if (!info->indexes) return KVDEX_ENOMEM;
    }
    Kvdex__V1__LayerIndex *li = kvdex__arena_alloc(a, sizeof *li);
    if (!li) return KVDEX_ENOMEM;
    kvdex__v1__layer_index__init(li);
    li->layer = l;
    li->state = (Kvdex__V1__IndexState)ii.state;
    li->spec = kvdex__arena_strdup(a, ii.spec);
    li->error = kvdex__arena_strdup(a, ii.error);
    li->kind = kvdex__arena_strdup(a, ii.kind);
    li->describe = kvdex__arena_strdup(a, ii.describe);
    if (!li->spec || !li->error || !li->kind || !li->describe) return KVDEX_ENOMEM;
    li->build_seconds = ii.build_seconds;
    li->memory_bytes = ii.memory_bytes;
    li->tokens = ii.tokens;
    info->indexes[info->n_indexes++] = li;
  }
  info->bytes = kvdex_seq_bytes(seq);
  info->importing = kvdex_seq_importing(seq) != 0;
  return KVDEX_OK;
}

/* ---- Batches ------------------------------------------------------------------- */

static void kvdex__call_finish(kvdex__call *c, grpc_status_code code, const char *details);

/* Starts a batch on t_ops. On a refused batch (a bug) the call is cancelled so its
 * RECV_CLOSE_ON_SERVER completes, and the call goes to DONE. */
static bool kvdex__start_ops(kvdex__call *c, const grpc_op *ops, size_t n) {
  grpc_call_error err = grpc_call_start_batch(c->call, ops, n, &c->t_ops, NULL);
  if (err != GRPC_CALL_OK) {
    KVDEX_LOG(KVDEX_LOG_ERROR, "%s: grpc_call_start_batch: %s", kvdex__methods[c->method].name,
              grpc_call_error_to_string(err));
    grpc_call_cancel(c->call, NULL);
    c->state = KVDEX__ST_DONE;
    return false;
  }
  c->ops_pending++;
  return true;
}

/* Sends [initial metadata,] [c->send_buf,] status; the call goes to FINISH. */
static void kvdex__call_finish(kvdex__call *c, grpc_status_code code, const char *details) {
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
              "%s: status %d: %s", kvdex__methods[c->method].name, (int)code,
              details ? details : "");
  c->state = KVDEX__ST_FINISH;
  if (c->w->srv->metrics) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    double secs = (double)(now.tv_sec - c->t0.tv_sec) + (double)(now.tv_nsec - c->t0.tv_nsec) / 1e9;
    kvdex_metrics_rpc(c->w->srv->metrics, (unsigned)c->method, (int)code, secs);
  }
  kvdex__start_ops(c, ops, n);
  grpc_slice_unref(det); /* not retained past grpc_call_start_batch */
}

/* Finishes with rc (KVDEX_OK: send c->send_buf) and kvdex_errmsg() as details. */
static void kvdex__call_finish_rc(kvdex__call *c, int rc) {
  if (rc == KVDEX_OK) {
    kvdex__call_finish(c, GRPC_STATUS_OK, NULL);
  } else {
    kvdex__call_finish(c, kvdex_wire_status(rc), kvdex_errmsg());
  }
}

/* ---- Unary handlers: request payload -> c->send_buf, or an error --------------- */

static int kvdex__do_create(kvdex__call *c) {
  kvdex_server *srv = c->w->srv;
  Kvdex__V1__CreateSequenceRequest *req =
      kvdex__unpack(&kvdex__v1__create_sequence_request__descriptor, "CreateSequenceRequest",
                    c->payload);
  if (!req) return KVDEX_EINVAL;
  const char *ns, *id;
  int rc = kvdex__ref_check(c->w, req->seq, "seq", &ns, &id);
  if (!rc && !req->shape) rc = kvdex__seterr(KVDEX_EINVAL, "shape is required");
  if (!rc) {
    kvdex_shape shape;
    kvdex_wire_shape_from_pb(req->shape, &shape);
    rc = kvdex_shape_check(&shape);
    if (!rc) rc = kvdex_seq_create_ex(srv->store, ns, id, &shape, req->importing);
  }
  if (!rc) {
    Kvdex__V1__CreateSequenceResponse resp = KVDEX__V1__CREATE_SEQUENCE_RESPONSE__INIT;
    rc = kvdex__pack(srv, &resp.base, &c->send_buf);
  }
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}

static int kvdex__do_delete(kvdex__call *c) {
  kvdex_server *srv = c->w->srv;
  Kvdex__V1__DeleteSequenceRequest *req = kvdex__unpack(
      &kvdex__v1__delete_sequence_request__descriptor, "DeleteSequenceRequest", c->payload);
  if (!req) return KVDEX_EINVAL;
  const char *ns, *id;
  uint64_t freed = 0;
  int rc = kvdex__ref_check(c->w, req->seq, "seq", &ns, &id);
  if (!rc) rc = kvdex_seq_delete(srv->store, ns, id, &freed);
  if (!rc) {
    Kvdex__V1__DeleteSequenceResponse resp = KVDEX__V1__DELETE_SEQUENCE_RESPONSE__INIT;
    resp.bytes_freed = freed;
    rc = kvdex__pack(srv, &resp.base, &c->send_buf);
  }
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}

static int kvdex__do_stat(kvdex__call *c) {
  kvdex_server *srv = c->w->srv;
  Kvdex__V1__StatSequenceRequest *req = kvdex__unpack(
      &kvdex__v1__stat_sequence_request__descriptor, "StatSequenceRequest", c->payload);
  if (!req) return KVDEX_EINVAL;
  kvdex_seq *seq = NULL;
  int rc = kvdex__open(c->w, req->seq, "seq", req->include_importing, &seq);
  if (!rc) {
    Kvdex__V1__SequenceInfo info;
    Kvdex__V1__StatSequenceResponse resp = KVDEX__V1__STAT_SEQUENCE_RESPONSE__INIT;
    rc = kvdex__fill_info(srv, &c->w->arena, seq, &info);
    resp.info = &info;
    if (!rc) rc = kvdex__pack(srv, &resp.base, &c->send_buf);
  }
  kvdex_seq_release(seq);
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}

static int kvdex__do_publish(kvdex__call *c) {
  kvdex_server *srv = c->w->srv;
  Kvdex__V1__PublishSequenceRequest *req = kvdex__unpack(
      &kvdex__v1__publish_sequence_request__descriptor, "PublishSequenceRequest", c->payload);
  if (!req) return KVDEX_EINVAL;
  kvdex_seq *seq = NULL;
  int rc = kvdex__open(c->w, req->seq, "seq", 1, &seq);
  if (!rc) {
    kvdex_seq_publish(seq);
    Kvdex__V1__PublishSequenceResponse resp = KVDEX__V1__PUBLISH_SEQUENCE_RESPONSE__INIT;
    rc = kvdex__pack(srv, &resp.base, &c->send_buf);
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
    Kvdex__V1__SequenceInfo **infos = kvdex__arena_alloc(l->arena, cap * sizeof *infos);
    if (!infos) {
      l->rc = KVDEX_ENOMEM;
      return;
    }
    if (l->n) memcpy(infos, l->infos, l->n * sizeof *infos);
    l->infos = infos;
    l->cap = cap;
  }
  Kvdex__V1__SequenceInfo *info = kvdex__arena_alloc(l->arena, sizeof *info);
  if (!info || kvdex__fill_info(l->srv, l->arena, seq, info)) {
    l->rc = KVDEX_ENOMEM;
    return;
  }
  l->infos[l->n++] = info;
}

static int kvdex__do_list(kvdex__call *c) {
  kvdex_server *srv = c->w->srv;
  Kvdex__V1__ListSequencesRequest *req = kvdex__unpack(
      &kvdex__v1__list_sequences_request__descriptor, "ListSequencesRequest", c->payload);
  if (!req) return KVDEX_EINVAL;
  int rc = KVDEX_OK;
  const char *ns = req->namespace_ && req->namespace_[0] ? req->namespace_ : NULL;
  if (ns && kvdex_name_check(ns, "x")) rc = KVDEX_EINVAL; /* names the namespace */
  if (!rc && ns) rc = kvdex__ns_allowed(c->w, ns);
  if (!rc) {
    kvdex__list_ctx l = {.srv = srv, .arena = &c->w->arena,
                         .who = srv->auth && !ns && !kvdex_auth_allows_all(c->w->who)
                                    ? c->w->who : NULL};
    kvdex_store_list(srv->store, ns, kvdex__list_visit, &l);
    rc = l.rc;
    if (rc) rc = kvdex__seterr(rc, "out of memory listing sequences");
    if (!rc) {
      kvdex_store_stats st;
      kvdex_store_stats_get(srv->store, &st);
      Kvdex__V1__ListSequencesResponse resp = KVDEX__V1__LIST_SEQUENCES_RESPONSE__INIT;
      resp.n_sequences = l.n;
      resp.sequences = l.infos;
      resp.node_bytes_used = st.bytes_used;
      resp.node_bytes_cap = st.bytes_cap;
      rc = kvdex__pack(srv, &resp.base, &c->send_buf);
    }
  }
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}

static int kvdex__do_health(kvdex__call *c) {
  kvdex_server *srv = c->w->srv;
  Grpc__Health__V1__HealthCheckRequest *req = kvdex__unpack(
      &grpc__health__v1__health_check_request__descriptor, "HealthCheckRequest", c->payload);
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
    rc = kvdex__pack(srv, &resp.base, &c->send_buf);
  }
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}

/* ---- Search -------------------------------------------------------------------- */

/* Copies the hit rows of one (layer, kv head) into k/v ([hits][head_dim], seq dtype). */
static int kvdex__copy_rows(kvdex_seq *seq, uint32_t layer, uint32_t kv_head,
                            const kvdex_hit *hits, uint32_t n, uint8_t *k, uint8_t *v) {
  kvdex_kv_view view;
  int rc = kvdex_seq_view(seq, layer, kv_head, &view);
  if (rc) return rc;
  size_t row = (size_t)view.head_dim * kvdex_dtype_size(view.dtype);
  for (uint32_t i = 0; i < n; i++) {
    uint64_t t = hits[i].id;
    if (t >= view.n_tokens)
      return kvdex__seterr(KVDEX_EINTERNAL, "hit %llu beyond the %llu committed tokens",
                           (unsigned long long)t, (unsigned long long)view.n_tokens);
    uint64_t b = t / view.block_tokens, off = t % view.block_tokens;
    memcpy(k + i * row, (const uint8_t *)view.k_blocks[b] + off * row, row);
    memcpy(v + i * row, (const uint8_t *)view.v_blocks[b] + off * row, row);
  }
  return KVDEX_OK;
}

/* One SearchQuery -> one SearchResult (arrays in the arena). *budget is what is left
 * of the max message size; the estimate of this result is taken from it. */
static int kvdex__search_one(kvdex__worker *w, const Kvdex__V1__SearchRequest *req, size_t qi,
                             const kvdex_search_opts *opts, const char *index,
                             const kvdex_index_params *params, bool return_kv, uint64_t *budget,
                             Kvdex__V1__SearchResult *out /* OUT */) {
  kvdex_server *srv = w->srv;
  kvdex__arena *a = &w->arena;
  const Kvdex__V1__SearchQuery *q = req->queries[qi];
  char field[48];
  snprintf(field, sizeof field, "queries[%zu]", qi);
  kvdex_seq *seq = NULL;
  int rc = kvdex__open(w, q->seq, field, 0, &seq);
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

  if (w->qf_cap < n_q) {
    float *qf = realloc(w->qf, n_q * sizeof(float));
    if (!qf) {
      rc = kvdex__seterr(KVDEX_ENOMEM, "out of memory");
      goto out;
    }
    w->qf = qf;
    w->qf_cap = n_q;
  }
  kvdex_to_f32(qd, q->q.data, w->qf, n_q);
  bool indexed = index[0] && strcmp(index, "exact") && strcmp(index, "retained");
  if (indexed && !w->ixs && (rc = kvdex_index_scratch_create(&w->ixs)) != KVDEX_OK) goto out;
  const char *used = "exact";
  if (strcmp(index, "retained") == 0) {
    used = "retained";
    rc = kvdex_retained_search(seq, req->layer, w->qf, opts, &w->res);
  } else {
    rc = kvdex_indexer_search(srv->indexer, seq, req->layer, w->qf, opts, index, params, w->ixs,
                              &w->res, &used);
  }
  if (rc) {
    rc = kvdex__preerr(rc, field);
    goto out;
  }

  kvdex__v1__search_result__init(out);
  out->index = (char *)used; /* a static string */
  out->keys_scanned = w->res.keys_scanned;
  out->tokens = w->res.tokens;
  out->n_heads = w->res.n_q_heads;
  out->heads = kvdex__arena_alloc(a, sizeof(*out->heads) * out->n_heads);
  if (!out->heads) goto oom;
  uint32_t group = sh->n_q_heads / sh->n_kv_heads;
  for (uint32_t h = 0; h < w->res.n_q_heads; h++) {
    const kvdex_head_result *hr = &w->res.heads[h];
    Kvdex__V1__HeadHits *hh = kvdex__arena_alloc(a, sizeof *hh);
    if (!hh) goto oom;
    kvdex__v1__head_hits__init(hh);
    out->heads[h] = hh;
    hh->n_token_ids = hh->n_scores = hr->n_hits;
    hh->token_ids = kvdex__arena_alloc(a, sizeof(uint64_t) * hr->n_hits + 1);
    hh->scores = kvdex__arena_alloc(a, sizeof(float) * hr->n_hits + 1);
    if (!hh->token_ids || !hh->scores) goto oom;
    for (uint32_t i = 0; i < hr->n_hits; i++) {
      hh->token_ids[i] = hr->hits[i].id;
      hh->scores[i] = hr->hits[i].score;
    }
    if (return_kv && hr->n_hits) {
      size_t bytes = (size_t)hr->n_hits * row;
      hh->k.data = kvdex__arena_alloc(a, bytes);
      hh->v.data = kvdex__arena_alloc(a, bytes);
      if (!hh->k.data || !hh->v.data) goto oom;
      hh->k.len = hh->v.len = bytes;
      rc = kvdex__copy_rows(seq, req->layer, h / group, hr->hits, hr->n_hits, hh->k.data,
                            hh->v.data);
      if (rc) goto out;
    }
  }
  goto out;
oom:
  rc = kvdex__seterr(KVDEX_ENOMEM, "out of memory building the search response");
out:
  kvdex_seq_release(seq);
  return rc;
}

static int kvdex__do_search(kvdex__call *c) {
  kvdex__worker *w = c->w;
  kvdex_server *srv = w->srv;
  Kvdex__V1__SearchRequest *req =
      kvdex__unpack(&kvdex__v1__search_request__descriptor, "SearchRequest", c->payload);
  if (!req) return KVDEX_EINVAL;
  int rc = KVDEX_OK;
  const Kvdex__V1__SearchOptions *o = req->options;
  const char *index = o && o->index ? o->index : "";
  if (!o || o->k < 1 || o->k > KVDEX_MAX_K) {
    rc = kvdex__seterr(KVDEX_EINVAL, "options.k must be in 1..%d (got %u)", KVDEX_MAX_K,
                       o ? o->k : 0);
  } else if (strcmp(index, "retained") && kvdex_indexer_check_index(index)) {
    rc = kvdex__preerr(KVDEX_EINVAL, "options");
  }
  kvdex_index_params params = {.ef = o ? o->ef : 0,
                               .nprobe = o ? o->nprobe : 0,
                               .blocks = o ? o->blocks : 0};
  Kvdex__V1__SearchResponse resp = KVDEX__V1__SEARCH_RESPONSE__INIT;
  if (!rc && req->n_queries) {
    resp.results = kvdex__arena_alloc(&w->arena, sizeof(*resp.results) * req->n_queries);
    if (!resp.results) rc = KVDEX_ENOMEM;
  }
  kvdex_search_opts opts = {.k = o ? o->k : 0,
                            .sinks = o ? o->sinks : 0,
                            .window = o ? o->window : 0,
                            .simd = KVDEX_SIMD_AUTO};
  uint64_t budget = srv->max_message;
  for (size_t i = 0; !rc && i < req->n_queries; i++) {
    if (kvdex__deadline_passed(kvdex__call_deadline(c))) {
      rc = kvdex__seterr(KVDEX_ETIMEDOUT, "deadline passed after %zu of %zu queries", i,
                         req->n_queries);
      break;
    }
    Kvdex__V1__SearchResult *r = kvdex__arena_alloc(&w->arena, sizeof *r);
    if (!r) {
      rc = KVDEX_ENOMEM;
      break;
    }
    rc = kvdex__search_one(w, req, i, &opts, index, &params, o->return_kv, &budget, r);
    resp.results[i] = r;
    resp.n_results = i + 1;
  }
  if (!rc) rc = kvdex__pack(srv, &resp.base, &c->send_buf);
  if (!rc && srv->metrics) {
    uint64_t touched = 0;
    for (size_t i = 0; i < resp.n_results; i++) touched += resp.results[i]->keys_scanned;
    kvdex_metrics_search(srv->metrics, 0, resp.n_results, touched);
  }
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}

/* ---- BuildIndex ---------------------------------------------------------------- */

static int kvdex__do_build(kvdex__call *c) {
  kvdex__worker *w = c->w;
  kvdex_server *srv = w->srv;
  Kvdex__V1__BuildIndexRequest *req =
      kvdex__unpack(&kvdex__v1__build_index_request__descriptor, "BuildIndexRequest", c->payload);
  if (!req) return KVDEX_EINVAL;
  kvdex_seq *seq = NULL;
  int rc = kvdex__open(c->w, req->seq, "seq", 1, &seq);
  uint32_t layer = req->all_layers ? KVDEX_INDEXER_ALL_LAYERS : req->layer;
  if (!rc && !req->all_layers && req->layer == KVDEX_INDEXER_ALL_LAYERS)
    rc = kvdex__seterr(KVDEX_EINVAL, "layer %u out of range (set all_layers for every layer)",
                       req->layer);
  uint32_t n = 0, *layers = NULL;
  if (!rc) {
    layers = kvdex__arena_alloc(&w->arena, sizeof(uint32_t) * kvdex_seq_shape(seq)->n_layers);
    if (!layers) rc = KVDEX_ENOMEM;
  }
  if (!rc && srv->metrics) {
    /* Count the builds that ended before this one can overwrite their state. */
    pthread_mutex_lock(&srv->pend_mu);
    kvdex__do_pending_sweep(srv);
    rc = kvdex_indexer_build(srv->indexer, seq, layer, req->spec ? req->spec : "", layers, &n);
    if (!rc) kvdex__do_pending_add(srv, seq, layers, n);
    pthread_mutex_unlock(&srv->pend_mu);
  } else if (!rc) {
    rc = kvdex_indexer_build(srv->indexer, seq, layer, req->spec ? req->spec : "", layers, &n);
  }
  if (!rc) {
    Kvdex__V1__BuildIndexResponse resp = KVDEX__V1__BUILD_INDEX_RESPONSE__INIT;
    resp.accepted = true;
    resp.n_layers = n;
    resp.layers = layers;
    rc = kvdex__pack(srv, &resp.base, &c->send_buf);
  }
  kvdex_seq_release(seq);
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}


/* ---- Attend and Retain ----------------------------------------------------------- */

/* Most items in one AttendRequest. */
#define KVDEX__MAX_ATTEND_ITEMS 4096u

static int kvdex__worker_actx(kvdex__worker *w) {
  if (w->actx) return KVDEX_OK;
  return kvdex_attend_ctx_create(&w->actx);
}

/* Copies n f32 of wire bytes into the worker's aligned query buffer. */
static int kvdex__worker_qf(kvdex__worker *w, const uint8_t *bytes, size_t n) {
  if (w->qf_cap < n) {
    float *qf = realloc(w->qf, n * sizeof(float));
    if (!qf) return kvdex__seterr(KVDEX_ENOMEM, "out of memory for %zu query floats", n);
    w->qf = qf;
    w->qf_cap = n;
  }
  if (n) memcpy(w->qf, bytes, n * sizeof(float));
  return KVDEX_OK;
}

/* One AttendItem -> one AttendResult (o and lse in the arena). *budget as in search. */
static int kvdex__attend_one(kvdex__worker *w, const Kvdex__V1__AttendRequest *req, size_t i,
                             const kvdex_attend_req *base, uint64_t *budget,
                             Kvdex__V1__AttendResult *out /* OUT */) {
  kvdex_server *srv = w->srv;
  kvdex__arena *a = &w->arena;
  const Kvdex__V1__AttendItem *it = req->items[i];
  kvdex_seq *seq = NULL;
  char field[32];
  snprintf(field, sizeof field, "items[%zu]", i);
  int rc = kvdex__open(w, it ? it->seq : NULL, field, 0, &seq);
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
  } else if (it->n_extra_tokens > KVDEX_ATTEND_MAX_EXTRA) {
    rc = kvdex__seterr(KVDEX_EINVAL, "%s.extra_tokens has %zu entries (at most %d)", field,
                       it->n_extra_tokens, KVDEX_ATTEND_MAX_EXTRA);
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
    if (!(streaming = kvdex__arena_alloc(a, n_q))) goto oom;
    for (size_t h = 0; h < n_q; h++) streaming[h] = req->streaming_heads[h] ? 1 : 0;
  }
  ar.streaming = streaming;
  ar.extra = it->extra_tokens;
  ar.n_extra = (uint32_t)it->n_extra_tokens;
  if ((rc = kvdex__worker_qf(w, it->q.data, nf))) goto out;
  float *o = kvdex__arena_alloc(a, nf * sizeof(float) + 1);
  float *lse = kvdex__arena_alloc(a, n_q * sizeof(float));
  if (!o || !lse) goto oom;
  kvdex_attend_stats st;
  rc = kvdex_attend_layer(srv->indexer, seq, req->layer, w->qf, &ar, srv->pool, w->actx, o, lse,
                          &st);
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
  goto out;
oom:
  rc = kvdex__seterr(KVDEX_ENOMEM, "out of memory building the attend response");
out:
  kvdex_seq_release(seq);
  return rc;
}

static int kvdex__do_attend(kvdex__call *c) {
  kvdex__worker *w = c->w;
  kvdex_server *srv = w->srv;
  Kvdex__V1__AttendRequest *req =
      kvdex__unpack(&kvdex__v1__attend_request__descriptor, "AttendRequest", c->payload);
  if (!req) return KVDEX_EINVAL;
  int rc = KVDEX_OK;
  const char *index = req->index ? req->index : "";
  if (req->n_items < 1 || req->n_items > KVDEX__MAX_ATTEND_ITEMS) {
    rc = kvdex__seterr(KVDEX_EINVAL, "items has %zu entries, expected 1..%u", req->n_items,
                       KVDEX__MAX_ATTEND_ITEMS);
  } else if (!req->dense && (req->k < 1 || req->k > KVDEX_MAX_K)) {
    rc = kvdex__seterr(KVDEX_EINVAL, "k must be in 1..%d unless dense is set (got %u)",
                       KVDEX_MAX_K, req->k);
  } else if (!(req->scale >= 0) || !isfinite(req->scale)) {
    rc = kvdex__seterr(KVDEX_EINVAL, "scale must be finite and >= 0 (0 = 1/sqrt(head_dim))");
  } else if (strcmp(index, "retained") && kvdex_indexer_check_index(index)) {
    rc = kvdex__preerr(KVDEX_EINVAL, "index");
  } else {
    rc = kvdex__worker_actx(w);
  }
  kvdex_index_params params = {.ef = req->ef, .nprobe = req->nprobe, .blocks = req->blocks};
  kvdex_attend_req base = {.k = req->k,
                           .sinks = req->sinks,
                           .window = req->window,
                           .index = index,
                           .params = &params,
                           .scale = req->scale,
                           .dense = req->dense ? 1 : 0};
  Kvdex__V1__AttendResponse resp = KVDEX__V1__ATTEND_RESPONSE__INIT;
  if (!rc) {
    resp.results = kvdex__arena_alloc(&w->arena, sizeof(*resp.results) * req->n_items);
    if (!resp.results) rc = KVDEX_ENOMEM;
  }
  uint64_t budget = srv->max_message;
  for (size_t i = 0; !rc && i < req->n_items; i++) {
    if (kvdex__deadline_passed(kvdex__call_deadline(c))) {
      rc = kvdex__seterr(KVDEX_ETIMEDOUT, "deadline passed after %zu of %zu items", i,
                         req->n_items);
      break;
    }
    Kvdex__V1__AttendResult *r = kvdex__arena_alloc(&w->arena, sizeof *r);
    if (!r) {
      rc = KVDEX_ENOMEM;
      break;
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    rc = kvdex__attend_one(w, req, i, &base, &budget, r);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    r->seconds = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
    resp.results[i] = r;
    resp.n_results = i + 1;
  }
  if (!rc) rc = kvdex__pack(srv, &resp.base, &c->send_buf);
  if (!rc && srv->metrics) {
    uint64_t touched = 0;
    for (size_t i = 0; i < resp.n_results; i++) touched += resp.results[i]->keys_touched;
    kvdex_metrics_search(srv->metrics, 1, resp.n_results, touched);
  }
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}

static int kvdex__do_retain(kvdex__call *c) {
  kvdex__worker *w = c->w;
  kvdex_server *srv = w->srv;
  kvdex__arena *a = &w->arena;
  Kvdex__V1__RetainRequest *req =
      kvdex__unpack(&kvdex__v1__retain_request__descriptor, "RetainRequest", c->payload);
  if (!req) return KVDEX_EINVAL;
  kvdex_seq *seq = NULL;
  int rc = kvdex__open(c->w, req->seq, "seq", 0, &seq);
  if (rc) goto out;
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  const uint64_t per_obs = (uint64_t)sh->n_q_heads * sh->head_dim;
  uint64_t tokens = 0;
  if (req->layer >= sh->n_layers) {
    rc = kvdex__seterr(KVDEX_EINVAL, "layer %u out of range (the sequence has %u layers)",
                       req->layer, sh->n_layers);
  } else if (req->n_obs < 1 || req->n_obs > KVDEX_ATTEND_MAX_OBS) {
    rc = kvdex__seterr(KVDEX_EINVAL, "n_obs must be in 1..%d (got %u)", KVDEX_ATTEND_MAX_OBS,
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
  } else {
    rc = kvdex__worker_actx(w);
  }
  if (rc) goto out;
  if ((rc = kvdex__worker_qf(w, req->q_obs.data, req->n_obs * per_obs))) goto out;
  const size_t cnt = (size_t)sh->n_kv_heads * req->budget;
  uint64_t *ids = kvdex__arena_alloc(a, cnt * sizeof *ids);
  float *scores = kvdex__arena_alloc(a, cnt * sizeof *scores);
  Kvdex__V1__RetainedHead **heads = kvdex__arena_alloc(a, sh->n_kv_heads * sizeof *heads);
  Kvdex__V1__RetainedHead *hs = kvdex__arena_alloc(a, sh->n_kv_heads * sizeof *hs);
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
  rc = kvdex_retain_layer(seq, req->layer, w->qf, req->n_obs, &ro, req->materialize ? 1 : 0,
                          srv->pool, w->actx, ids, scores);
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
  rc = kvdex__pack(srv, &resp.base, &c->send_buf);
out:
  kvdex_seq_release(seq);
  protobuf_c_message_free_unpacked(&req->base, NULL);
  return rc;
}

/* ---- AppendKV ------------------------------------------------------------------ */

static void kvdex__append_recv(kvdex__call *c) {
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_MESSAGE;
  op.data.recv_message.recv_message = &c->recv_buf;
  c->state = KVDEX__ST_APPEND_RECV;
  kvdex__start_ops(c, &op, 1);
}

/* Ends the stream with a failure: nothing of it is stored. */
static void kvdex__append_fail(kvdex__call *c, int rc) {
  kvdex_txn_abort(c->txn);
  c->txn = NULL;
  kvdex__call_finish_rc(c, rc);
}

/* Validates and stages one message. */
static int kvdex__append_msg(kvdex__call *c, const Kvdex__V1__AppendKVRequest *m) {
  int rc;
  const Kvdex__V1__SequenceRef *ref = m->seq;
  bool named = ref && ((ref->sequence_id && ref->sequence_id[0]) ||
                       (ref->namespace_ && ref->namespace_[0]));
  if (!c->seq) {
    if (!named) return kvdex__seterr(KVDEX_EINVAL, "the first AppendKV message must set seq");
    rc = kvdex__open(c->w, ref, "seq", 1, &c->seq);
    if (rc) return rc;
    rc = kvdex_txn_begin(c->seq, &c->txn);
    if (rc) return rc;
  } else if (named) {
    const char *ns, *id;
    rc = kvdex__ref_check(c->w, ref, "seq", &ns, &id);
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
  rc = kvdex_txn_append(c->txn, m->layer, m->token_start, m->n_tokens, m->k.data, m->v.data);
  if (!rc && m->q.len)
    rc = kvdex_txn_append_q(c->txn, m->layer, m->token_start, m->n_tokens, m->q.data);
  if (!rc && m->landmarks.len)
    rc = kvdex_txn_append_landmarks(c->txn, m->layer, m->token_start, m->n_tokens,
                                    m->landmarks.data);
  return rc;
}

/* A RECV_MESSAGE completed. */
static void kvdex__append_on_recv(kvdex__call *c, bool success) {
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
    kvdex__start_ops(c, &op, 1);
    return;
  }
  Kvdex__V1__AppendKVRequest *m =
      kvdex__unpack(&kvdex__v1__append_kvrequest__descriptor, "AppendKVRequest", c->recv_buf);
  kvdex__bb_destroy(c->recv_buf);
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
  kvdex__append_recv(c);
}

/* The probe after end-of-stream completed: commit unless the stream was cancelled. */
static void kvdex__append_on_probe(kvdex__call *c, bool success) {
  if (!success || (c->close_done && c->cancelled)) {
    KVDEX_LOG(KVDEX_LOG_DEBUG, "AppendKV: cancelled after %llu messages (seen by %s)",
              (unsigned long long)c->n_msgs, success ? "close" : "probe");
    kvdex__append_fail(c, kvdex__seterr(KVDEX_ECANCELLED,
                                        "the client cancelled the stream; nothing was stored"));
    return;
  }
  if (!c->txn) {
    kvdex__call_finish_rc(c, kvdex__seterr(KVDEX_EINVAL, "the AppendKV stream had no message"));
    return;
  }
  kvdex_txn_result res = {0};
  int rc = kvdex_txn_commit(c->txn, &res);
  c->txn = NULL;
  if (!rc) {
    kvdex__arena *a = &c->w->arena;
    const kvdex_shape *sh = kvdex_seq_shape(c->seq);
    Kvdex__V1__AppendKVResponse resp = KVDEX__V1__APPEND_KVRESPONSE__INIT;
    resp.tokens_appended = res.tokens_appended;
    resp.tokens_replayed = res.tokens_replayed;
    resp.n_layer_tokens = sh->n_layers;
    resp.layer_tokens = kvdex__arena_alloc(a, sizeof(uint64_t) * sh->n_layers);
    if (!resp.layer_tokens) {
      rc = KVDEX_ENOMEM;
    } else {
      for (uint32_t l = 0; l < sh->n_layers; l++)
        resp.layer_tokens[l] = kvdex_seq_tokens(c->seq, l);
      rc = kvdex__pack(c->w->srv, &resp.base, &c->send_buf);
    }
  }
  kvdex__call_finish_rc(c, rc);
}

/* ---- ReadKV -------------------------------------------------------------------- */

static int kvdex__read_setup(kvdex__call *c) {
  kvdex_server *srv = c->w->srv;
  Kvdex__V1__ReadKVRequest *req =
      kvdex__unpack(&kvdex__v1__read_kvrequest__descriptor, "ReadKVRequest", c->payload);
  if (!req) return KVDEX_EINVAL;
  c->rd_req = req;
  int rc = kvdex__open(c->w, req->seq, "seq", 0, &c->seq);
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
                                               : KVDEX__DEFAULT_READ_CHUNK;
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
    c->rd_xchunk = xfit < KVDEX__DEFAULT_READ_CHUNK ? (size_t)xfit : KVDEX__DEFAULT_READ_CHUNK;
    c->rd_tmp = malloc(c->rd_xchunk * heads * sh->head_dim * sizeof(float));
    if (!c->rd_tmp) return kvdex__seterr(KVDEX_ENOMEM, "out of memory for query chunks");
  }
  if (req->with_queries) {
    rc = kvdex_seq_queries(c->seq, req->layer, 0, sh->n_q_heads, &c->rd_q, &c->rd_qn,
                           &c->rd_qids);
    if (rc) return rc;
  }
  if (req->with_landmarks) {
    uint64_t nb = kvdex_seq_landmark_blocks(c->seq, req->layer);
    if (nb) {
      size_t per_head = (size_t)nb * sh->head_dim;
      c->rd_lm = malloc(per_head * sh->n_kv_heads * sizeof(float));
      if (!c->rd_lm) return kvdex__seterr(KVDEX_ENOMEM, "out of memory for %llu landmark blocks",
                                          (unsigned long long)nb);
      for (uint32_t h = 0; h < sh->n_kv_heads; h++) {
        uint64_t got = 0;
        rc = kvdex_seq_landmarks(c->seq, req->layer, h, nb, c->rd_lm + h * per_head, &got);
        if (rc) return rc;
        if (got != nb) return kvdex__seterr(KVDEX_EINTERNAL, "landmarks: %llu of %llu blocks",
                                            (unsigned long long)got, (unsigned long long)nb);
      }
      c->rd_lmn = nb;
    }
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
static void kvdex__read_next(kvdex__call *c) {
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
  kvdex__bb_destroy(c->send_buf);
  c->send_buf = NULL;
  int rc = KVDEX_OK;
  if (n == 0) {
    Kvdex__V1__ReadKVResponse resp = KVDEX__V1__READ_KVRESPONSE__INIT;
    if (kvdex__read_extra(c, &resp) == 0) {
      kvdex__call_finish(c, GRPC_STATUS_OK, NULL);
      return;
    }
    rc = kvdex__pack(c->w->srv, &resp.base, &c->send_buf);
  } else {
    rc = kvdex_seq_read(c->seq, r->layer, c->rd_ids, n, c->rd_k, c->rd_v);
  }
  if (!rc && n > 0) {
    Kvdex__V1__ReadKVResponse resp = KVDEX__V1__READ_KVRESPONSE__INIT;
    resp.n_token_ids = n;
    resp.token_ids = c->rd_ids;
    resp.k.len = resp.v.len = n * kvdex_seq_shape(c->seq)->n_kv_heads * c->rd_row;
    resp.k.data = c->rd_k;
    resp.v.data = c->rd_v;
    rc = kvdex__pack(c->w->srv, &resp.base, &c->send_buf);
  }
  if (rc) {
    kvdex__call_finish_rc(c, rc);
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
  kvdex__start_ops(c, ops, nops);
}

/* ---- Call lifecycle ------------------------------------------------------------ */

static int kvdex__request_slot(kvdex__worker *w, kvdex__method method);

static void kvdex__call_free(kvdex__call *c) {
  kvdex_server *srv = c->w->srv;
  kvdex_txn_abort(c->txn);
  kvdex_seq_release(c->seq);
  if (c->rd_req) protobuf_c_message_free_unpacked(&c->rd_req->base, NULL);
  free(c->rd_ids);
  free(c->rd_k);
  free(c->rd_v);
  free(c->rd_q);
  free(c->rd_qids);
  free(c->rd_lm);
  free(c->rd_tmp);
  kvdex__bb_destroy(c->payload);
  kvdex__bb_destroy(c->recv_buf);
  kvdex__bb_destroy(c->send_buf);
  grpc_metadata_array_destroy(&c->md);
  if (c->method == KVDEX__M_UNKNOWN) grpc_call_details_destroy(&c->details);
  if (c->call) grpc_call_unref(c->call);
  free(c);
  kvdex__live_add(srv, -1);
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
  clock_gettime(CLOCK_MONOTONIC, &c->t0);
  if (!atomic_load(&srv->stopping)) kvdex__request_slot(w, c->method);

  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
  op.data.recv_close_on_server.cancelled = &c->cancelled;
  grpc_call_error err = grpc_call_start_batch(c->call, &op, 1, &c->t_close, NULL);
  if (err != GRPC_CALL_OK) {
    KVDEX_LOG(KVDEX_LOG_ERROR, "%s: RECV_CLOSE_ON_SERVER: %s", kvdex__methods[c->method].name,
              grpc_call_error_to_string(err));
    grpc_call_cancel(c->call, NULL);
    c->state = KVDEX__ST_DONE;
    return;
  }
  c->close_pending = true;

  if (kvdex__deadline_passed(kvdex__call_deadline(c))) {
    kvdex__call_finish(c, GRPC_STATUS_DEADLINE_EXCEEDED,
                       "the deadline passed before the call was served");
    return;
  }
  if (srv->auth && c->method != KVDEX__M_HEALTH) {
    c->who = w->who = kvdex__authenticate(srv, &c->md);
    if (!c->who) {
      kvdex__call_finish(c, GRPC_STATUS_UNAUTHENTICATED,
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
    kvdex__call_finish(c, GRPC_STATUS_UNIMPLEMENTED, msg);
    return;
  }
  if (c->method == KVDEX__M_APPEND) {
    kvdex__append_recv(c);
    return;
  }
  if (!c->payload) { /* the client sent no message (or is already gone) */
    kvdex__call_finish(c, GRPC_STATUS_INVALID_ARGUMENT, "the request message is missing");
    return;
  }
  int rc;
  switch (c->method) {
    case KVDEX__M_CREATE: rc = kvdex__do_create(c); break;
    case KVDEX__M_DELETE: rc = kvdex__do_delete(c); break;
    case KVDEX__M_STAT: rc = kvdex__do_stat(c); break;
    case KVDEX__M_LIST: rc = kvdex__do_list(c); break;
    case KVDEX__M_SEARCH: rc = kvdex__do_search(c); break;
    case KVDEX__M_BUILD: rc = kvdex__do_build(c); break;
    case KVDEX__M_ATTEND: rc = kvdex__do_attend(c); break;
    case KVDEX__M_RETAIN: rc = kvdex__do_retain(c); break;
    case KVDEX__M_PUBLISH: rc = kvdex__do_publish(c); break;
    case KVDEX__M_HEALTH: rc = kvdex__do_health(c); break;
    case KVDEX__M_READ:
      rc = kvdex__read_setup(c);
      if (!rc) {
        kvdex__read_next(c);
        return;
      }
      break;
    default: rc = kvdex__seterr(KVDEX_EINTERNAL, "unhandled method %d", (int)c->method); break;
  }
  if (rc && c->send_buf) {
    kvdex__bb_destroy(c->send_buf);
    c->send_buf = NULL;
  }
  kvdex__call_finish_rc(c, rc);
}

/* A batch on t_ops completed. */
static void kvdex__call_on_ops(kvdex__call *c, bool success) {
  c->ops_pending--;
  switch (c->state) {
    case KVDEX__ST_APPEND_RECV: kvdex__append_on_recv(c, success); break;
    case KVDEX__ST_APPEND_PROBE: kvdex__append_on_probe(c, success); break;
    case KVDEX__ST_READ_SEND:
      if (!success || (c->close_done && c->cancelled)) {
        kvdex__call_finish(c, GRPC_STATUS_CANCELLED, "the stream was cancelled");
      } else {
        kvdex__read_next(c);
      }
      break;
    case KVDEX__ST_FINISH: c->state = KVDEX__ST_DONE; break;
    default:
      KVDEX_LOG(KVDEX_LOG_ERROR, "%s: unexpected completion in state %d",
                kvdex__methods[c->method].name, (int)c->state);
      break;
  }
}

/* Posts a request slot for `method` on worker w. */
static int kvdex__request_slot(kvdex__worker *w, kvdex__method method) {
  kvdex_server *srv = w->srv;
  kvdex__call *c = calloc(1, sizeof *c);
  if (!c) {
    KVDEX_LOG(KVDEX_LOG_ERROR, "%s: out of memory for a request slot (worker %u)",
              kvdex__methods[method].name, w->idx);
    return KVDEX_ENOMEM;
  }
  c->w = w;
  c->method = method;
  c->state = KVDEX__ST_REQUESTED;
  c->t_new = (kvdex__tag){c, KVDEX__TAG_NEW};
  c->t_ops = (kvdex__tag){c, KVDEX__TAG_OPS};
  c->t_close = (kvdex__tag){c, KVDEX__TAG_CLOSE};
  grpc_metadata_array_init(&c->md);
  kvdex__live_add(srv, 1);
  grpc_call_error err;
  if (method == KVDEX__M_UNKNOWN) {
    grpc_call_details_init(&c->details);
    err = grpc_server_request_call(srv->server, &c->call, &c->details, &c->md, w->cq, w->cq,
                                   &c->t_new);
  } else {
    err = grpc_server_request_registered_call(
        srv->server, srv->methods[method], &c->call, &c->deadline, &c->md,
        kvdex__methods[method].payload == GRPC_SRM_PAYLOAD_NONE ? NULL : &c->payload, w->cq,
        w->cq, &c->t_new);
  }
  if (err != GRPC_CALL_OK) {
    KVDEX_LOG(KVDEX_LOG_ERROR, "%s: cannot request a call: %s", kvdex__methods[method].name,
              grpc_call_error_to_string(err));
    kvdex__call_free(c);
    return KVDEX_EINTERNAL;
  }
  return KVDEX_OK;
}

static void *kvdex__worker_main(void *arg) {
  kvdex__worker *w = arg;
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(w->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
    if (ev.type != GRPC_OP_COMPLETE) continue;
    kvdex__tag *t = ev.tag;
    kvdex__call *c = t->call;
    w->who = c->who; /* the namespaces this call's handlers may use */
    switch (t->kind) {
      case KVDEX__TAG_NEW: kvdex__call_on_new(c, ev.success != 0); break;
      case KVDEX__TAG_OPS: kvdex__call_on_ops(c, ev.success != 0); break;
      case KVDEX__TAG_CLOSE:
        c->close_pending = false;
        c->close_done = true;
        break;
    }
    kvdex__arena_reset(&w->arena);
    if (c->state == KVDEX__ST_DONE && c->ops_pending == 0 && !c->close_pending)
      kvdex__call_free(c);
  }
  return NULL;
}

/* ---- Start and stop ------------------------------------------------------------ */

/* gRPC's own log lines go to the kvdex logger too: its errors at WARN (the server
 * reports the failures that matter itself), everything else at DEBUG. */
static void kvdex__grpc_log(gpr_log_func_args *a) {
  const char *file = a->file ? strrchr(a->file, '/') : NULL;
  file = file ? file + 1 : (a->file ? a->file : "?");
  KVDEX_LOG(a->severity == GPR_LOG_SEVERITY_ERROR ? KVDEX_LOG_WARN : KVDEX_LOG_DEBUG,
            "grpc: %s:%d: %s", file, a->line, a->message ? a->message : "");
}

/* Frees what start built, for a server that was never started. */
static void kvdex__server_free(kvdex_server *srv) {
  if (srv->server) grpc_server_destroy(srv->server);
  grpc_completion_queue *cqs[KVDEX__MAX_THREADS + 1];
  size_t n = 0;
  for (unsigned i = 0; srv->workers && i < srv->n_workers; i++)
    if (srv->workers[i].cq) cqs[n++] = srv->workers[i].cq;
  if (srv->shutdown_cq) cqs[n++] = srv->shutdown_cq;
  for (size_t i = 0; i < n; i++) {
    grpc_completion_queue_shutdown(cqs[i]);
    while (grpc_completion_queue_next(cqs[i], gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(cqs[i]);
  }
  for (unsigned i = 0; srv->workers && i < srv->n_workers; i++) {
    kvdex__arena_free(&srv->workers[i].arena);
    free(srv->workers[i].qf);
    kvdex_search_result_free(&srv->workers[i].res);
    kvdex_index_scratch_destroy(srv->workers[i].ixs);
    kvdex_attend_ctx_destroy(srv->workers[i].actx);
  }
  kvdex_indexer_destroy(srv->indexer); /* no call is left that could queue a build */
  free(srv->workers);
  while (srv->pending) {
    kvdex__pending *p = srv->pending;
    srv->pending = p->next;
    free(p->ns);
    free(p->id);
    free(p);
  }
  pthread_mutex_destroy(&srv->pend_mu);
  pthread_cond_destroy(&srv->cv);
  pthread_mutex_destroy(&srv->mu);
  free(srv);
  grpc_shutdown();
}

/* Reads a whole PEM file into a NUL-terminated gpr_malloc'd string. */
static int kvdex__read_pem(const char *path, const char *what, char **out /* OUT */) {
  *out = NULL;
  FILE *f = fopen(path, "rb");
  if (!f) return kvdex__seterr(KVDEX_EIO, "%s %.200s: %s", what, path, strerror(errno));
  size_t cap = 16384, n = 0;
  char *buf = gpr_malloc(cap);
  for (;;) {
    if (n + 1 >= cap) {
      if (cap >= (16u << 20)) {
        fclose(f);
        gpr_free(buf);
        return kvdex__seterr(KVDEX_EINVAL, "%s %.200s: larger than 16 MiB", what, path);
      }
      cap *= 2;
      buf = gpr_realloc(buf, cap);
    }
    size_t got = fread(buf + n, 1, cap - 1 - n, f);
    n += got;
    if (got == 0) break;
  }
  int err = ferror(f);
  fclose(f);
  buf[n] = 0;
  if (err || !strstr(buf, "-----BEGIN ")) {
    gpr_free(buf);
    return kvdex__seterr(err ? KVDEX_EIO : KVDEX_EINVAL, "%s %.200s: %s", what, path,
                         err ? "read error" : "not a PEM file");
  }
  *out = buf;
  return KVDEX_OK;
}

/* Insecure credentials, or TLS (and mTLS) ones from the opts' PEM files. */
static int kvdex__server_creds(const kvdex_server_opts *opts,
                               grpc_server_credentials **out /* OUT */) {
  const char *cert = opts->tls_cert_file, *key = opts->tls_key_file,
             *ca = opts->tls_client_ca_file;
  bool has_cert = cert && cert[0], has_key = key && key[0], has_ca = ca && ca[0];
  if (!has_cert && !has_key && !has_ca) {
    *out = grpc_insecure_server_credentials_create();
    return KVDEX_OK;
  }
  if (!has_cert || !has_key)
    return kvdex__seterr(KVDEX_EINVAL, "TLS needs both a certificate and a key%s",
                         has_ca ? " (a client CA alone is not enough)" : "");
  char *cert_pem = NULL, *key_pem = NULL, *ca_pem = NULL;
  int rc = kvdex__read_pem(cert, "TLS certificate", &cert_pem);
  if (!rc) rc = kvdex__read_pem(key, "TLS key", &key_pem);
  if (!rc && has_ca) rc = kvdex__read_pem(ca, "TLS client CA", &ca_pem);
  if (!rc) {
    grpc_ssl_pem_key_cert_pair pair = {.private_key = key_pem, .cert_chain = cert_pem};
    *out = grpc_ssl_server_credentials_create_ex(
        ca_pem, &pair, 1,
        has_ca ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
               : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
        NULL);
    if (!*out) rc = kvdex__seterr(KVDEX_EINVAL, "cannot make TLS credentials from %.200s", cert);
  }
  if (key_pem) memset(key_pem, 0, strlen(key_pem));
  gpr_free(cert_pem);
  gpr_free(key_pem);
  gpr_free(ca_pem);
  return rc;
}

int kvdex_server_start(kvdex_store *store, kvdex_pool *pool, const kvdex_server_opts *opts,
                       kvdex_server **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "server: out is NULL");
  *out = NULL;
  if (!store || !opts || !opts->listen || !opts->listen[0])
    return kvdex__seterr(KVDEX_EINVAL, "server: store and opts->listen are required");
  kvdex_server *srv = calloc(1, sizeof *srv);
  if (!srv) return kvdex__seterr(KVDEX_ENOMEM, "server: out of memory");
  gpr_set_log_function(kvdex__grpc_log);
  grpc_init();
  pthread_mutex_init(&srv->mu, NULL);
  pthread_cond_init(&srv->cv, NULL);
  pthread_mutex_init(&srv->pend_mu, NULL);
  srv->metrics = opts->metrics;
  srv->auth = opts->auth;
  srv->store = store;
  srv->pool = pool;
  int irc = kvdex_indexer_create(pool, opts->build_threads, &srv->indexer);
  if (irc) {
    kvdex__server_free(srv);
    return kvdex__preerr(irc, "server");
  }
  unsigned threads = opts->threads;
  if (threads == 0) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    threads = cpus > 0 ? (unsigned)cpus : 1;
  }
  if (threads > KVDEX__MAX_THREADS) threads = KVDEX__MAX_THREADS;
  srv->max_message = opts->max_message_bytes ? opts->max_message_bytes : KVDEX__DEFAULT_MAX_MESSAGE;
  if (srv->max_message > INT_MAX) srv->max_message = INT_MAX;

  grpc_arg args[3];
  memset(args, 0, sizeof args);
  args[0].type = GRPC_ARG_INTEGER;
  args[0].key = GRPC_ARG_ALLOW_REUSEPORT;
  args[0].value.integer = 0;
  args[1].type = GRPC_ARG_INTEGER;
  args[1].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
  args[1].value.integer = (int)srv->max_message;
  args[2].type = GRPC_ARG_INTEGER;
  args[2].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
  args[2].value.integer = (int)srv->max_message;
  grpc_channel_args cargs = {.num_args = 3, .args = args};
  srv->server = grpc_server_create(&cargs, NULL);
  srv->workers = calloc(threads, sizeof *srv->workers);
  if (!srv->server || !srv->workers) {
    kvdex__server_free(srv);
    return kvdex__seterr(KVDEX_ENOMEM, "server: out of memory");
  }
  srv->n_workers = threads;
  for (unsigned i = 0; i < threads; i++) {
    kvdex__worker *w = &srv->workers[i];
    w->srv = srv;
    w->idx = i;
    w->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(srv->server, w->cq, NULL);
  }
  srv->shutdown_cq = grpc_completion_queue_create_for_next(NULL);
  grpc_server_register_completion_queue(srv->server, srv->shutdown_cq, NULL);
  for (int m = 0; m < KVDEX__M_UNKNOWN; m++) {
    srv->methods[m] = grpc_server_register_method(srv->server, kvdex__methods[m].path, NULL,
                                                  kvdex__methods[m].payload, 0);
    if (!srv->methods[m]) {
      kvdex__server_free(srv);
      return kvdex__seterr(KVDEX_EINTERNAL, "server: cannot register %s", kvdex__methods[m].path);
    }
  }
  grpc_server_credentials *creds = NULL;
  int crc = kvdex__server_creds(opts, &creds);
  if (crc) {
    kvdex__server_free(srv);
    return kvdex__preerr(crc, "server");
  }
  srv->port = grpc_server_add_http2_port(srv->server, opts->listen, creds);
  grpc_server_credentials_release(creds);
  if (srv->port <= 0) {
    kvdex__server_free(srv);
    return kvdex__seterr(KVDEX_EIO, "cannot bind %.200s (address in use, or not host:port%s)",
                         opts->listen, opts->tls_cert_file && opts->tls_cert_file[0]
                                           ? "; or the TLS certificate and key do not match"
                                           : "");
  }
  grpc_server_start(srv->server);

  /* From here on, failures go through kvdex_server_stop. Threads first, so every
   * posted slot is on a queue that some worker polls. */
  int rc = KVDEX_OK;
  for (unsigned i = 0; i < threads && !rc; i++) {
    if (pthread_create(&srv->workers[i].thread, NULL, kvdex__worker_main, &srv->workers[i])) {
      rc = KVDEX_EINTERNAL;
    } else {
      srv->workers[i].started = true;
    }
  }
  for (unsigned i = 0; i < threads && !rc; i++)
    for (int m = 0; m < KVDEX__M_COUNT && !rc; m++)
      rc = kvdex__request_slot(&srv->workers[i], (kvdex__method)m);
  if (rc) {
    kvdex_server_stop(srv, 0);
    return kvdex__seterr(rc, "server: cannot start %u workers", threads);
  }
  KVDEX_LOG(KVDEX_LOG_DEBUG, "server: %u workers on port %d, max message %llu bytes", threads,
            srv->port, (unsigned long long)srv->max_message);
  *out = srv;
  return KVDEX_OK;
}

int kvdex_server_port(const kvdex_server *srv) { return srv ? srv->port : 0; }

/* Waits for the server's shutdown tag until `deadline`; true if it arrived. */
static bool kvdex__wait_shutdown_tag(kvdex_server *srv, gpr_timespec deadline) {
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(srv->shutdown_cq, deadline, NULL);
    if (ev.type == GRPC_OP_COMPLETE) return true;
    if (ev.type == GRPC_QUEUE_TIMEOUT) return false;
    if (ev.type == GRPC_QUEUE_SHUTDOWN) return true; /* not expected */
  }
}

void kvdex_server_stop(kvdex_server *srv, uint32_t drain_ms) {
  if (!srv) return;
  static int shutdown_tag;
  atomic_store(&srv->stopping, 1);
  gpr_timespec drain_end = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                        gpr_time_from_millis(drain_ms, GPR_TIMESPAN));
  grpc_server_shutdown_and_notify(srv->server, srv->shutdown_cq, &shutdown_tag);
  bool cancelled = false;
  if (!kvdex__wait_shutdown_tag(srv, drain_end)) {
    KVDEX_LOG(KVDEX_LOG_INFO, "server: calls still running after %u ms: cancelling them",
              drain_ms);
    grpc_server_cancel_all_calls(srv->server);
    cancelled = true;
    kvdex__wait_shutdown_tag(srv, gpr_inf_future(GPR_CLOCK_MONOTONIC));
  }
  /* The tag does not mean the workers are done with their calls: wait until every
   * call context (request slots included) has been freed by its worker. */
  pthread_mutex_lock(&srv->mu);
  while (srv->live > 0) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += 100 * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
      ts.tv_sec++;
      ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&srv->cv, &srv->mu, &ts);
    if (srv->live > 0 && !cancelled &&
        gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), drain_end) > 0) {
      pthread_mutex_unlock(&srv->mu);
      grpc_server_cancel_all_calls(srv->server);
      cancelled = true;
      pthread_mutex_lock(&srv->mu);
    }
  }
  pthread_mutex_unlock(&srv->mu);

  grpc_server_destroy(srv->server);
  srv->server = NULL;
  for (unsigned i = 0; i < srv->n_workers; i++) {
    grpc_completion_queue_shutdown(srv->workers[i].cq);
    if (srv->workers[i].started) pthread_join(srv->workers[i].thread, NULL);
  }
  /* kvdex__server_free drains (workers never started) and destroys the queues. */
  KVDEX_LOG(KVDEX_LOG_DEBUG, "server: stopped%s", cancelled ? " (calls cancelled)" : "");
  kvdex__server_free(srv);
}
