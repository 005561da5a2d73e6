/* serve: `kvdex serve` — a kvdex node. The gRPC server runs on its own threads;
 * the main thread runs a libuv loop that serves /metrics (with --metrics-listen) and
 * waits for SIGTERM/SIGINT, then stops the metrics endpoint, drains in-flight calls
 * (up to --drain ms) and exits 0. */
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <uv.h>

#include "workers/auth.h"
#include "workers/cmd.h"
#include "workers/commands.h"
#include "workers/metrics.h"
#include "workers/metrics_http.h"
#include "workers/server.h"
#include "workers/settings.h"

static void on_signal(uv_signal_t *h, int signum) {
  KVDEX_LOG(KVDEX_LOG_INFO, "received %s: draining in-flight calls",
            signum == SIGTERM ? "SIGTERM" : "SIGINT");
  uv_stop(h->loop);
}

static void collect_metrics(void *ctx) { kvdex_server_collect(ctx); }

/* "host:port" of a listen address as given, with the port as bound. */
static void log_listen(const char *what, const char *addr, int port, const char *extra) {
  const char *colon = strrchr(addr, ':');
  int host_len = colon ? (int)(colon - addr) : (int)strlen(addr);
  KVDEX_LOG(KVDEX_LOG_INFO, "%slistening on %.*s:%d%s", what, host_len, addr, port, extra);
}

int kvdex_cmd_serve(int argc, char **argv) {
  kvdex_settings s;
  int rc = kvdex_cmd_preamble(&s, KVDEX_CMD_SERVE, "kvdex serve",
                              "usage: kvdex serve [options]\n\n"
                              "Runs a kvdex node: the KVStore, Retrieval and grpc.health.v1 "
                              "services over gRPC.",
                              argc, argv);
  if (rc != KVDEX_CMD_RUN) return rc;
  signal(SIGPIPE, SIG_IGN);

  kvdex_store *store = NULL;
  kvdex_pool *pool = NULL;
  kvdex_server *srv = NULL;
  kvdex_metrics *metrics = NULL;
  kvdex_auth *auth = NULL;
  int exit_code = 1;
  uint64_t cap = (uint64_t)kvdex_setting_num(&s, KVDEX_SET_MEMORY);
  unsigned threads = (unsigned)kvdex_setting_num(&s, KVDEX_SET_THREADS);
  if (kvdex_store_create(cap, &store) || kvdex_pool_create(threads, &pool)) {
    KVDEX_LOG(KVDEX_LOG_ERROR, "cannot start: %s", kvdex_errmsg());
    goto out;
  }
  const char *metrics_listen = kvdex_setting_str(&s, KVDEX_SET_METRICS_LISTEN);
  if (metrics_listen[0]) {
    unsigned n_methods;
    const char *const *names = kvdex_server_method_names(&n_methods);
    if (kvdex_metrics_create(names, n_methods, &metrics)) {
      KVDEX_LOG(KVDEX_LOG_ERROR, "cannot start: %s", kvdex_errmsg());
      goto out;
    }
  }
  const char *auth_file = kvdex_setting_str(&s, KVDEX_SET_AUTH_FILE);
  if (auth_file[0] && kvdex_auth_load(auth_file, &auth)) {
    KVDEX_LOG(KVDEX_LOG_ERROR, "cannot start: --auth-file: %s", kvdex_errmsg());
    goto out;
  }
  kvdex_server_opts so = {
      .listen = kvdex_setting_str(&s, KVDEX_SET_LISTEN),
      .threads = threads,
      .max_message_bytes = (uint64_t)kvdex_setting_num(&s, KVDEX_SET_MAX_MESSAGE),
      .metrics = metrics,
      .tls_cert_file = kvdex_setting_str(&s, KVDEX_SET_TLS_CERT),
      .tls_key_file = kvdex_setting_str(&s, KVDEX_SET_TLS_KEY),
      .tls_client_ca_file = kvdex_setting_str(&s, KVDEX_SET_TLS_CLIENT_CA),
      .auth = auth,
  };
  if (kvdex_server_start(store, pool, &so, &srv)) {
    KVDEX_LOG(KVDEX_LOG_ERROR, "cannot serve on %s: %s", so.listen, kvdex_errmsg());
    goto out;
  }
  /* The host part as given, the port as bound (listen on :0 picks one). */
  char extra[160];
  snprintf(extra, sizeof extra, " (memory cap %.1f MiB, %u threads, %s%s)",
           (double)cap / 1048576.0, threads ? threads : (unsigned)kvdex_pool_size(pool),
           so.tls_client_ca_file[0] ? "mTLS" : so.tls_cert_file[0] ? "TLS" : "plaintext",
           auth ? ", token auth" : "");
  log_listen("", so.listen, kvdex_server_port(srv), extra);

  uv_loop_t loop;
  uv_signal_t sigterm, sigint;
  kvdex_metrics_http *http = NULL;
  uv_loop_init(&loop);
  uv_signal_init(&loop, &sigterm);
  uv_signal_init(&loop, &sigint);
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_signal_start(&sigint, on_signal, SIGINT);
  bool serving = true;
  if (metrics) {
    if (kvdex_metrics_http_start(&loop, metrics_listen, metrics, collect_metrics, srv, &http)) {
      KVDEX_LOG(KVDEX_LOG_ERROR, "cannot serve metrics on %s: %s", metrics_listen,
                kvdex_errmsg());
      serving = false;
    } else {
      log_listen("metrics ", metrics_listen, kvdex_metrics_http_port(http), " (GET /metrics)");
    }
  }
  if (serving) uv_run(&loop, UV_RUN_DEFAULT);
  kvdex_metrics_http_close(http); /* before the drain: scrapes end with the node */
  uv_close((uv_handle_t *)&sigterm, NULL);
  uv_close((uv_handle_t *)&sigint, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  if (!serving) goto out;

  kvdex_server_stop(srv, (uint32_t)kvdex_setting_num(&s, KVDEX_SET_DRAIN_MS));
  srv = NULL;
  KVDEX_LOG(KVDEX_LOG_INFO, "stopped cleanly");
  exit_code = 0;
out:
  kvdex_server_stop(srv, 0);
  kvdex_metrics_destroy(metrics);
  kvdex_auth_free(auth); /* after the server: calls look tokens up in it */
  kvdex_pool_destroy(pool);
  kvdex_store_destroy(store);
  kvdex_settings_free(&s);
  return exit_code;
}
