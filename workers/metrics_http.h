/* metrics_http: a tiny HTTP/1.1 server on a libuv loop that answers `GET /metrics`
 * (and HEAD) with a kvdex_metrics handle rendered as Prometheus text, `GET /healthz`
 * and `GET /readyz` with 200 "ok" (probes for kubelet), 404 for any other path, and
 * closes each connection after its one response. Requests are read into a bounded
 * buffer (8 KiB; larger -> 431), a connection lives at most
 * KVDEX_METRICS_HTTP_TIMEOUT_MS, and at most KVDEX_METRICS_HTTP_MAX_CONNS are open at
 * once (more are closed at accept): garbage or slow clients cost a little memory
 * and nothing else. No keep-alive, TLS, chunked bodies or request bodies.
 * Everything runs on the loop's thread; it never prints (KVDEX_LOG only).
 */
#ifndef KVDEX_METRICS_HTTP_H
#define KVDEX_METRICS_HTTP_H

#include <uv.h>

#include "workers/metrics.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVDEX_METRICS_HTTP_TIMEOUT_MS 5000
#define KVDEX_METRICS_HTTP_MAX_CONNS 64

typedef struct kvdex_metrics_http kvdex_metrics_http;

/* Called on the loop's thread before each /metrics render (e.g. kvdex_server_collect
 * to refresh the gauges). May be NULL. */
typedef void (*kvdex_metrics_collect_fn)(void *ctx);

/* Listens on `addr` ("host:port", "[v6]:port"; host names resolve; port 0 picks a
 * free one) on `loop`. `metrics` must outlive the server. KVDEX_EINVAL (bad address),
 * KVDEX_EIO (cannot bind or listen, with the libuv error), KVDEX_ENOMEM; a failed
 * start has closed what it opened, but its handle's close callback still needs the
 * loop run (as after kvdex_metrics_http_close). */
int kvdex_metrics_http_start(uv_loop_t *loop, const char *addr, kvdex_metrics *metrics,
                             kvdex_metrics_collect_fn collect, void *ctx,
                             kvdex_metrics_http **out /* OUT */);

/* The port actually bound. */
int kvdex_metrics_http_port(const kvdex_metrics_http *h);

/* Stops listening and closes every open connection (responses in flight are cut).
 * The memory is freed by close callbacks: run the loop until it has no more handles
 * (uv_run(UV_RUN_DEFAULT)) afterwards. NULL is a no-op. Loop thread only. */
void kvdex_metrics_http_close(kvdex_metrics_http *h);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_METRICS_HTTP_H */
