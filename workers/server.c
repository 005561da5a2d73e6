/* server: the kvdex gRPC server on the gRPC C core (C API only). Serves
 * kvdex.v1.KVStore, kvdex.v1.Retrieval and grpc.health.v1.Health/Check over a
 * kvdex_node (engine/node.h) on the caller's store and pool; every other method
 * answers UNIMPLEMENTED. This file starts and stops it: options, credentials, the
 * worker threads and their completion queues, and the drain at stop. The call
 * machinery is server_call.c, the handlers of each area server_seqs.c,
 * server_append.c, server_read.c and server_retrieval.c (server_int.h).
 *
 * N worker threads, each with its own completion queue and one outstanding request
 * slot per method. A call is a small state machine (kvdex__call_state) driven only by
 * events of its worker's queue, so no call is ever touched by two threads and calls
 * need no locks. Requests are unpacked with protobuf-c and every size is checked
 * against the sequence's shape before the node sees it.
 * It does not own the store or the pool, and it never prints (KVDEX_LOG only).
 * With a metrics handle (opts->metrics, not owned) it records each call where its
 * status is sent, Search/Attend keys touched, and index builds seen ended.
 */
#include "workers/server.h"

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/log.h>
#include <grpc/support/time.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "workers/server_int.h"

#define KVDEX__MAX_THREADS 256u

/* ---- Metrics ------------------------------------------------------------------- */

void kvdex_server_collect(kvdex_server *srv) {
  if (!srv || !srv->metrics) return;
  kvdex_store_stats st;
  kvdex_node_store_stats(srv->node, &st);
  kvdex_metrics_set_store(srv->metrics, st.bytes_used, st.bytes_cap, st.n_sequences);
  pthread_mutex_lock(&srv->pend_mu);
  kvdex__srv_do_pending_sweep(srv);
  pthread_mutex_unlock(&srv->pend_mu);
}

/* ---- Workers ------------------------------------------------------------------- */

/* A worker thread: the events of its own completion queue, until it shuts down. */
static void *kvdex__worker_main(void *arg) {
  kvdex__worker *w = arg;
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(w->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
    if (ev.type == GRPC_OP_COMPLETE) kvdex__srv_on_event(w, ev.tag, ev.success != 0);
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
    kvdex__srv_arena_free(&srv->workers[i].arena);
  }
  kvdex_node_destroy(srv->node); /* no call is left that could queue a build */
  free(srv->workers);
  kvdex__srv_pending_free(srv);
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
  unsigned threads = opts->threads;
  if (threads == 0) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    threads = cpus > 0 ? (unsigned)cpus : 1;
  }
  if (threads > KVDEX__MAX_THREADS) threads = KVDEX__MAX_THREADS;
  /* One call at a time per worker: as many contexts as workers are ever in use. */
  kvdex_node_opts no = {.store = store,
                        .pool = pool,
                        .build_threads = opts->build_threads,
                        .keep_ctx = threads};
  int irc = kvdex_node_create(&no, &srv->node);
  if (irc) {
    kvdex__server_free(srv);
    return kvdex__preerr(irc, "server");
  }
  srv->max_message =
      opts->max_message_bytes ? opts->max_message_bytes : KVDEX_RPC_DEFAULT_MAX_MESSAGE;
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
  for (int m = 0; m < KVDEX_RPC_COUNT; m++) {
    /* A unary or server-streaming request arrives with the call; a client stream is
     * received message by message (server_append.c). */
    const kvdex_rpc_method_info *mi = &kvdex_rpc_methods[m];
    srv->methods[m] = grpc_server_register_method(
        srv->server, mi->path, NULL,
        mi->client_streaming ? GRPC_SRM_PAYLOAD_NONE : GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER,
        0);
    if (!srv->methods[m]) {
      kvdex__server_free(srv);
      return kvdex__seterr(KVDEX_EINTERNAL, "server: cannot register %s", mi->path);
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
      rc = kvdex__srv_request_slot(&srv->workers[i], (kvdex_rpc_method)m);
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
