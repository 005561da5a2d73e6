/* server_test: the server's start and stop paths with a raw gRPC C-core client in
 * the same process: a second bind fails, a unary round trip, and kvdex_server_stop
 * with calls in flight (an open AppendKV stream that must not commit, a stream that
 * half-closes during the drain and must commit, a blocked ReadKV, unary calls racing
 * the stop). Meant to run under --config=asan as well.
 */
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "grpc/health/v1/health.pb-c.h"
#include "index/index.h"
#include "kvdex/v1/kvdex.pb-c.h"
#include "kvstore/kvstore.h"
#include "workers/server.h"

static int g_failures;

#define CHECK(cond)                                                           \
  do {                                                                        \
    if (!(cond)) {                                                            \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      g_failures++;                                                           \
      return;                                                                 \
    }                                                                         \
  } while (0)

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

static gpr_timespec in_ms(int ms) {
  return gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

/* ---- a node: store + pool + server ----------------------------------------------- */

typedef struct node {
  kvdex_store *store;
  kvdex_pool *pool;
  kvdex_server *srv;
  char target[64];
} node;

static int node_start(node *n, uint64_t cap) {
  memset(n, 0, sizeof *n);
  if (kvdex_store_create(cap, &n->store) || kvdex_pool_create(2, &n->pool)) return -1;
  kvdex_server_opts o = {.listen = "127.0.0.1:0", .threads = 2};
  if (kvdex_server_start(n->store, n->pool, &o, &n->srv)) {
    fprintf(stderr, "server_start: %s\n", kvdex_errmsg());
    return -1;
  }
  snprintf(n->target, sizeof n->target, "127.0.0.1:%d", kvdex_server_port(n->srv));
  return 0;
}

static void node_free(node *n) {
  kvdex_server_stop(n->srv, 0); /* NULL after a test stopped it: a no-op */
  kvdex_pool_destroy(n->pool);
  kvdex_store_destroy(n->store);
}

static const kvdex_shape kShape = {.n_layers = 1, .n_kv_heads = 2, .n_q_heads = 2,
                                   .head_dim = 16, .block_tokens = 8, .dtype = KVDEX_DTYPE_F16};

/* ---- a raw client ------------------------------------------------------------- */

typedef struct client {
  grpc_channel *ch;
  grpc_completion_queue *cq; /* pluck */
} client;

static void client_open(client *c, const char *target) {
  grpc_channel_credentials *creds = grpc_insecure_credentials_create();
  c->ch = grpc_channel_create(target, creds, NULL);
  grpc_channel_credentials_release(creds);
  c->cq = grpc_completion_queue_create_for_pluck(NULL);
}

static void client_close(client *c) {
  grpc_channel_destroy(c->ch);
  grpc_completion_queue_shutdown(c->cq);
  while (grpc_completion_queue_pluck(c->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
         GRPC_QUEUE_SHUTDOWN) {
  }
  grpc_completion_queue_destroy(c->cq);
}

static grpc_call *client_call(client *c, const char *method, int timeout_ms) {
  return grpc_channel_create_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, c->cq,
                                  grpc_slice_from_static_string(method), NULL, in_ms(timeout_ms),
                                  NULL);
}

/* Starts ops with `tag` and waits for it; returns the event's success, -1 on timeout. */
static int client_batch(client *c, grpc_call *call, grpc_op *ops, size_t n, void *tag,
                        int timeout_ms) {
  if (grpc_call_start_batch(call, ops, n, tag, NULL) != GRPC_CALL_OK) return -2;
  grpc_event ev = grpc_completion_queue_pluck(c->cq, tag, in_ms(timeout_ms), NULL);
  if (ev.type != GRPC_OP_COMPLETE) return -1;
  return ev.success;
}

static int client_wait(client *c, void *tag, int timeout_ms) {
  double end = now_s() + timeout_ms / 1000.0;
  while (now_s() < end) {
    grpc_event ev = grpc_completion_queue_pluck(c->cq, tag, in_ms(50), NULL);
    if (ev.type == GRPC_OP_COMPLETE) return ev.success;
  }
  return -1;
}

static grpc_byte_buffer *pack(const ProtobufCMessage *m) {
  size_t n = protobuf_c_message_get_packed_size(m);
  uint8_t *buf = malloc(n ? n : 1);
  protobuf_c_message_pack(m, buf);
  grpc_slice s = grpc_slice_from_copied_buffer((const char *)buf, n);
  free(buf);
  grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
  grpc_slice_unref(s);
  return bb;
}

/* An AppendKV message of n tokens starting at `start` (values from `seed`). */
static grpc_byte_buffer *append_msg(uint64_t start, uint32_t n, int seed) {
  size_t elems = (size_t)kShape.n_kv_heads * n * kShape.head_dim;
  uint16_t *k = malloc(elems * 2), *v = malloc(elems * 2);
  for (size_t i = 0; i < elems; i++) {
    k[i] = kvdex__f32_to_f16((float)((i * 7 + (size_t)seed) % 13) - 6.0f);
    v[i] = kvdex__f32_to_f16((float)((i * 3 + (size_t)seed) % 11) - 5.0f);
  }
  Kvdex__V1__SequenceRef ref = KVDEX__V1__SEQUENCE_REF__INIT;
  ref.sequence_id = "s";
  Kvdex__V1__AppendKVRequest m = KVDEX__V1__APPEND_KVREQUEST__INIT;
  m.seq = &ref;
  m.token_start = start;
  m.n_tokens = n;
  m.k.len = m.v.len = elems * 2;
  m.k.data = (uint8_t *)k;
  m.v.data = (uint8_t *)v;
  grpc_byte_buffer *bb = pack(&m.base);
  free(k);
  free(v);
  return bb;
}

static uint64_t bytes_used(node *n) {
  kvdex_store_stats st;
  kvdex_store_stats_get(n->store, &st);
  return st.bytes_used;
}

static uint64_t seq_tokens(node *n, const char *id) {
  kvdex_seq *seq = NULL;
  if (kvdex_seq_open(n->store, "default", id, &seq)) return UINT64_MAX;
  uint64_t t = kvdex_seq_tokens(seq, 0);
  kvdex_seq_release(seq);
  return t;
}

static int wait_bytes_above(node *n, uint64_t base, int timeout_ms) {
  double end = now_s() + timeout_ms / 1000.0;
  while (now_s() < end) {
    if (bytes_used(n) > base) return 1;
    sleep_ms(5);
  }
  return 0;
}

/* A call with its status receiver. */
typedef struct rpc {
  grpc_call *call;
  grpc_metadata_array md, trailing;
  grpc_status_code status;
  grpc_slice details;
  grpc_byte_buffer *resp;
  int md_done;
} rpc;

static void rpc_begin(client *c, rpc *r, const char *method, int timeout_ms) {
  memset(r, 0, sizeof *r);
  r->call = client_call(c, method, timeout_ms);
  grpc_metadata_array_init(&r->md);
  grpc_metadata_array_init(&r->trailing);
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  op.data.recv_status_on_client.trailing_metadata = &r->trailing;
  op.data.recv_status_on_client.status = &r->status;
  op.data.recv_status_on_client.status_details = &r->details;
  grpc_call_start_batch(r->call, &op, 1, &r->status, NULL);
}

static void rpc_end(rpc *r) {
  grpc_metadata_array_destroy(&r->md);
  grpc_metadata_array_destroy(&r->trailing);
  grpc_slice_unref(r->details);
  if (r->resp) grpc_byte_buffer_destroy(r->resp);
  grpc_call_unref(r->call);
}

/* A unary call; returns the status (-1 on a client-side timeout). */
static int unary(client *c, const char *method, grpc_byte_buffer *req, grpc_byte_buffer **resp) {
  rpc r;
  rpc_begin(c, &r, method, 10000);
  grpc_op ops[5];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = req;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &r.md;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &r.resp;
  int ok = client_batch(c, r.call, ops, 5, &r, 10000);
  int st = client_wait(c, &r.status, 10000) < 0 ? -1 : (int)r.status;
  if (ok < 0) st = -1;
  if (resp) {
    *resp = r.resp;
    r.resp = NULL;
  }
  rpc_end(&r);
  grpc_byte_buffer_destroy(req);
  return st;
}

static int health_check(client *c, int *serving) {
  Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
  grpc_byte_buffer *resp = NULL;
  int st = unary(c, "/grpc.health.v1.Health/Check", pack(&req.base), &resp);
  if (serving) *serving = -1;
  if (st == GRPC_STATUS_OK && resp && serving) {
    grpc_byte_buffer_reader rd;
    grpc_byte_buffer_reader_init(&rd, resp);
    grpc_slice s = grpc_byte_buffer_reader_readall(&rd);
    grpc_byte_buffer_reader_destroy(&rd);
    Grpc__Health__V1__HealthCheckResponse *m = grpc__health__v1__health_check_response__unpack(
        NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
    if (m) {
      *serving = m->status == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
      grpc__health__v1__health_check_response__free_unpacked(m, NULL);
    }
    grpc_slice_unref(s);
  }
  if (resp) grpc_byte_buffer_destroy(resp);
  return st;
}

/* Opens an AppendKV stream and sends one message (no half-close). */
static int append_open(client *c, rpc *r, uint64_t start, uint32_t n) {
  rpc_begin(c, r, "/kvdex.v1.KVStore/AppendKV", 30000);
  grpc_op ops[2];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = append_msg(start, n, 1);
  int ok = client_batch(c, r->call, ops, 2, r, 10000);
  grpc_byte_buffer_destroy(ops[1].data.send_message.send_message);
  return ok;
}

/* Reads (and drops) messages until the end of the stream, then waits for the status
 * (a client's trailing status is only delivered once its messages are read). */
static int rpc_finish(client *c, rpc *r, int timeout_ms) {
  grpc_op ops[2];
  memset(ops, 0, sizeof ops);
  int n = 0;
  if (!r->md_done) {
    ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[n].data.recv_initial_metadata.recv_initial_metadata = &r->md;
    n++;
    r->md_done = 1;
  }
  for (int i = 0; i < 100000; i++) {
    ops[n].op = GRPC_OP_RECV_MESSAGE;
    ops[n].data.recv_message.recv_message = &r->resp;
    n++;
    int ok = client_batch(c, r->call, ops, (size_t)n, &r->resp, timeout_ms);
    n = 0;
    if (ok != 1 || !r->resp) break;
    grpc_byte_buffer_destroy(r->resp);
    r->resp = NULL;
  }
  return client_wait(c, &r->status, timeout_ms);
}

/* ---- tests ------------------------------------------------------------------------ */

static void test_bind_conflict(void) {
  node a;
  CHECK(node_start(&a, 0) == 0);
  CHECK(kvdex_server_port(a.srv) > 0);
  kvdex_server *b = (kvdex_server *)1;
  kvdex_server_opts o = {.listen = a.target, .threads = 1};
  int rc = kvdex_server_start(a.store, a.pool, &o, &b);
  CHECK(rc == KVDEX_EIO);
  CHECK(b == NULL);
  CHECK(strstr(kvdex_errmsg(), "cannot bind") != NULL);
  o.listen = "not an address";
  CHECK(kvdex_server_start(a.store, a.pool, &o, &b) == KVDEX_EIO);
  CHECK(kvdex_server_start(NULL, a.pool, &o, &b) == KVDEX_EINVAL);
  kvdex_server_stop(NULL, 0);
  CHECK(kvdex_server_port(NULL) == 0);
  node_free(&a);
}

static void test_unary_and_idle_stop(void) {
  node a;
  CHECK(node_start(&a, 0) == 0);
  client c;
  client_open(&c, a.target);
  int serving = 0;
  CHECK(health_check(&c, &serving) == GRPC_STATUS_OK);
  CHECK(serving == 1);
  /* an unknown method */
  grpc_slice s = grpc_empty_slice();
  CHECK(unary(&c, "/x.Y/Z", grpc_raw_byte_buffer_create(&s, 1), NULL) ==
        GRPC_STATUS_UNIMPLEMENTED);
  /* stop with the client's connection still open and idle */
  double t0 = now_s();
  kvdex_server_stop(a.srv, 5000);
  a.srv = NULL;
  CHECK(now_s() - t0 < 4.0);
  CHECK(health_check(&c, NULL) != GRPC_STATUS_OK);
  client_close(&c);
  node_free(&a);
}

static void test_append_roundtrip(void) {
  node a;
  CHECK(node_start(&a, 0) == 0);
  CHECK(kvdex_seq_create(a.store, "default", "s", &kShape) == 0);
  client c;
  client_open(&c, a.target);
  rpc r;
  CHECK(append_open(&c, &r, 0, 20) == 1);
  grpc_op ops[3];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[1].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[1].data.recv_initial_metadata.recv_initial_metadata = &r.md;
  ops[2].op = GRPC_OP_RECV_MESSAGE;
  ops[2].data.recv_message.recv_message = &r.resp;
  int ok = client_batch(&c, r.call, ops, 3, &r, 10000);
  CHECK(ok == 1 && r.resp != NULL);
  grpc_byte_buffer_destroy(r.resp);
  r.resp = NULL;
  r.md_done = 1;
  CHECK(rpc_finish(&c, &r, 10000) == 1);
  CHECK(r.status == GRPC_STATUS_OK);
  CHECK(seq_tokens(&a, "s") == 20);
  rpc_end(&r);
  client_close(&c);
  node_free(&a);
}

/* An open AppendKV stream at stop: drained for 200 ms, then cancelled; nothing stored. */
static void test_stop_cancels_open_stream(void) {
  node a;
  CHECK(node_start(&a, 0) == 0);
  CHECK(kvdex_seq_create(a.store, "default", "s", &kShape) == 0);
  uint64_t base = bytes_used(&a);
  client c;
  client_open(&c, a.target);
  rpc r;
  CHECK(append_open(&c, &r, 0, 20) == 1);
  CHECK(wait_bytes_above(&a, base, 10000)); /* the server staged it */
  double t0 = now_s();
  kvdex_server_stop(a.srv, 200);
  a.srv = NULL;
  double took = now_s() - t0;
  CHECK(took < 5.0);
  CHECK(seq_tokens(&a, "s") == 0);
  CHECK(bytes_used(&a) == base);
  CHECK(rpc_finish(&c, &r, 10000) == 1);
  CHECK(r.status != GRPC_STATUS_OK);
  rpc_end(&r);
  client_close(&c);
  node_free(&a);
}

typedef struct stopper {
  kvdex_server *srv;
  uint32_t drain_ms;
  double took;
} stopper;

static void *stop_thread(void *arg) {
  stopper *s = arg;
  double t0 = now_s();
  kvdex_server_stop(s->srv, s->drain_ms);
  s->took = now_s() - t0;
  return NULL;
}

/* A stream that half-closes while the server drains: committed, status OK. */
static void test_drain_lets_stream_finish(void) {
  node a;
  CHECK(node_start(&a, 0) == 0);
  CHECK(kvdex_seq_create(a.store, "default", "s", &kShape) == 0);
  uint64_t base = bytes_used(&a);
  client c;
  client_open(&c, a.target);
  rpc r;
  CHECK(append_open(&c, &r, 0, 20) == 1);
  CHECK(wait_bytes_above(&a, base, 10000));
  stopper st = {.srv = a.srv, .drain_ms = 20000};
  a.srv = NULL;
  pthread_t th;
  pthread_create(&th, NULL, stop_thread, &st);
  sleep_ms(300); /* the shutdown has begun */
  grpc_op ops[2];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_MESSAGE;
  ops[0].data.send_message.send_message = append_msg(20, 4, 2);
  ops[1].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  int ok = client_batch(&c, r.call, ops, 2, &r, 10000);
  grpc_byte_buffer_destroy(ops[0].data.send_message.send_message);
  int done = rpc_finish(&c, &r, 10000);
  pthread_join(th, NULL);
  CHECK(ok == 1);
  CHECK(done == 1);
  CHECK(r.status == GRPC_STATUS_OK);
  CHECK(seq_tokens(&a, "s") == 24);
  CHECK(st.took < 10.0);
  rpc_end(&r);
  client_close(&c);
  node_free(&a);
}

/* A ReadKV whose client stops reading (flow control blocks the server's sends). */
static void test_stop_during_blocked_read(void) {
  node a;
  CHECK(node_start(&a, 0) == 0);
  kvdex_shape sh = {.n_layers = 1, .n_kv_heads = 8, .n_q_heads = 8, .head_dim = 128,
                    .block_tokens = 64, .dtype = KVDEX_DTYPE_F32};
  CHECK(kvdex_seq_create(a.store, "default", "big", &sh) == 0);
  kvdex_seq *seq = NULL;
  kvdex_txn *txn = NULL;
  CHECK(kvdex_seq_open(a.store, "default", "big", &seq) == 0);
  CHECK(kvdex_txn_begin(seq, &txn) == 0);
  uint32_t n = 2048; /* 16 MiB of K+V */
  size_t elems = (size_t)8 * n * 128;
  float *k = calloc(elems, sizeof(float));
  CHECK(k != NULL);
  CHECK(kvdex_txn_append(txn, 0, 0, n, k, k) == 0);
  CHECK(kvdex_txn_commit(txn, NULL) == 0);
  free(k);
  kvdex_seq_release(seq);

  client c;
  client_open(&c, a.target);
  rpc r;
  rpc_begin(&c, &r, "/kvdex.v1.KVStore/ReadKV", 30000);
  Kvdex__V1__SequenceRef ref = KVDEX__V1__SEQUENCE_REF__INIT;
  ref.sequence_id = "big";
  Kvdex__V1__TokenRange range = KVDEX__V1__TOKEN_RANGE__INIT;
  range.end = n;
  /* 16 times the layer: 256 MiB, far more than the transport buffers */
  Kvdex__V1__TokenRange *ranges[16];
  for (int i = 0; i < 16; i++) ranges[i] = &range;
  Kvdex__V1__ReadKVRequest req = KVDEX__V1__READ_KVREQUEST__INIT;
  req.seq = &ref;
  req.n_ranges = 16;
  req.ranges = ranges;
  req.max_tokens_per_message = 64; /* 512 KiB messages */
  grpc_op ops[5];
  memset(ops, 0, sizeof ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = pack(&req.base);
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &r.md;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &r.resp;
  int ok = client_batch(&c, r.call, ops, 5, &r, 10000);
  grpc_byte_buffer_destroy(ops[1].data.send_message.send_message);
  CHECK(ok == 1);
  CHECK(r.resp != NULL); /* one message read; then the client stops reading */
  sleep_ms(200);
  double t0 = now_s();
  kvdex_server_stop(a.srv, 300);
  a.srv = NULL;
  CHECK(now_s() - t0 < 5.0);
  grpc_byte_buffer_destroy(r.resp);
  r.resp = NULL;
  r.md_done = 1;
  CHECK(rpc_finish(&c, &r, 10000) == 1);
  CHECK(r.status != GRPC_STATUS_OK);
  rpc_end(&r);
  client_close(&c);
  node_free(&a);
}

typedef struct hammer {
  const char *target;
  atomic_int stop;
  int ok, failed;
} hammer;

static void *hammer_thread(void *arg) {
  hammer *h = arg;
  client c;
  client_open(&c, h->target);
  while (!atomic_load(&h->stop)) {
    if (health_check(&c, NULL) == GRPC_STATUS_OK) {
      h->ok++;
    } else {
      h->failed++;
      if (h->failed > 50) break;
    }
  }
  client_close(&c);
  return NULL;
}

/* Unary calls racing the stop: no crash, no leak, stop returns. */
static void test_stop_under_load(void) {
  for (int round = 0; round < 3; round++) {
    node a;
    CHECK(node_start(&a, 0) == 0);
    hammer h[3];
    pthread_t th[3];
    for (int i = 0; i < 3; i++) {
      memset(&h[i], 0, sizeof h[i]);
      h[i].target = a.target;
      pthread_create(&th[i], NULL, hammer_thread, &h[i]);
    }
    sleep_ms(150);
    kvdex_server_stop(a.srv, round == 0 ? 0 : 500);
    a.srv = NULL;
    for (int i = 0; i < 3; i++) atomic_store(&h[i].stop, 1);
    int total = 0;
    for (int i = 0; i < 3; i++) {
      pthread_join(th[i], NULL);
      total += h[i].ok;
    }
    CHECK(total > 0);
    node_free(&a);
  }
}

int main(void) {
  grpc_init();
  if (getenv("KVDEX_TEST_DEBUG")) kvdex_log_configure(KVDEX_LOG_DEBUG, NULL, NULL);
  struct {
    const char *name;
    void (*fn)(void);
  } tests[] = {
      {"bind_conflict", test_bind_conflict},
      {"unary_and_idle_stop", test_unary_and_idle_stop},
      {"append_roundtrip", test_append_roundtrip},
      {"stop_cancels_open_stream", test_stop_cancels_open_stream},
      {"drain_lets_stream_finish", test_drain_lets_stream_finish},
      {"stop_during_blocked_read", test_stop_during_blocked_read},
      {"stop_under_load", test_stop_under_load},
  };
  const char *only = getenv("KVDEX_TEST_ONLY");
  for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
    if (only && strcmp(only, tests[i].name)) continue;
    int before = g_failures;
    double t0 = now_s();
    tests[i].fn();
    fprintf(stderr, "[%s] %s (%.2f s)\n", g_failures == before ? "  OK  " : " FAIL ",
            tests[i].name, now_s() - t0);
  }
  grpc_shutdown();
  fprintf(stderr, "%d failure(s)\n", g_failures);
  return g_failures ? 1 : 0;
}
