/* metrics_http: one listener and a list of connections, each with a deadline timer.
 * A connection reads until the end of the request headers (or the buffer is full),
 * writes one response, shuts down its write side and closes; the timer closes it
 * whatever state it is in. Connection memory is freed once both its handles closed;
 * the server's once the listener and every connection did (after close). */
#include "workers/metrics_http.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvstore/base.h"

#define KVDEX__HTTP_BUF 8192

typedef struct kvdex__conn kvdex__conn;

struct kvdex_metrics_http {
  uv_tcp_t listener;
  kvdex_metrics *metrics;
  kvdex_metrics_collect_fn collect;
  void *ctx;
  int port;
  bool closing, listener_closed;
  unsigned n_conns;
  kvdex__conn *conns; /* open connections, for close */
};

struct kvdex__conn {
  uv_tcp_t tcp;
  uv_timer_t timer;
  uv_write_t wr;
  uv_shutdown_t sd;
  kvdex_metrics_http *h;
  kvdex__conn *prev, *next;
  int open_handles; /* tcp + timer, until their close callbacks ran */
  bool closing, responded;
  char *resp;
  size_t len;
  char buf[KVDEX__HTTP_BUF];
};

static void kvdex__http_maybe_free(kvdex_metrics_http *h) {
  if (h->closing && h->listener_closed && h->n_conns == 0) free(h);
}

static void kvdex__conn_on_closed(uv_handle_t *handle) {
  kvdex__conn *c = handle->data;
  if (--c->open_handles > 0) return;
  kvdex_metrics_http *h = c->h;
  if (c->prev) c->prev->next = c->next;
  else h->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  h->n_conns--;
  free(c->resp);
  free(c);
  kvdex__http_maybe_free(h);
}

/* Idempotent. Pending write/shutdown callbacks run (cancelled) before the close ones. */
static void kvdex__conn_close(kvdex__conn *c) {
  if (c->closing) return;
  c->closing = true;
  uv_timer_stop(&c->timer);
  uv_close((uv_handle_t *)&c->timer, kvdex__conn_on_closed);
  uv_close((uv_handle_t *)&c->tcp, kvdex__conn_on_closed);
}

static void kvdex__conn_on_timeout(uv_timer_t *t) {
  kvdex__conn *c = t->data;
  KVDEX_LOG(KVDEX_LOG_DEBUG, "metrics: connection timed out after %d ms",
            KVDEX_METRICS_HTTP_TIMEOUT_MS);
  kvdex__conn_close(c);
}

static void kvdex__conn_on_shutdown(uv_shutdown_t *req, int status) {
  (void)status;
  kvdex__conn_close(req->data);
}

static void kvdex__conn_on_write(uv_write_t *req, int status) {
  kvdex__conn *c = req->data;
  free(c->resp);
  c->resp = NULL;
  if (status < 0 || c->closing) {
    kvdex__conn_close(c);
    return;
  }
  c->sd.data = c;
  if (uv_shutdown(&c->sd, (uv_stream_t *)&c->tcp, kvdex__conn_on_shutdown)) kvdex__conn_close(c);
}

/* Sends one response (body may be NULL) and closes afterwards. */
static void kvdex__conn_respond(kvdex__conn *c, int status, const char *reason,
                                const char *ctype, const char *body, size_t body_len,
                                bool head_only, const char *extra_header) {
  c->responded = true;
  uv_read_stop((uv_stream_t *)&c->tcp);
  char hdr[512];
  int n = snprintf(hdr, sizeof hdr,
                   "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s"
                   "Connection: close\r\n\r\n",
                   status, reason, ctype, body_len, extra_header ? extra_header : "");
  if (n < 0 || (size_t)n >= sizeof hdr) {
    kvdex__conn_close(c);
    return;
  }
  size_t total = (size_t)n + (head_only ? 0 : body_len);
  c->resp = malloc(total ? total : 1);
  if (!c->resp) {
    kvdex__conn_close(c);
    return;
  }
  memcpy(c->resp, hdr, (size_t)n);
  if (!head_only && body_len) memcpy(c->resp + n, body, body_len);
  uv_buf_t b = uv_buf_init(c->resp, (unsigned)total);
  c->wr.data = c;
  if (uv_write(&c->wr, (uv_stream_t *)&c->tcp, &b, 1, kvdex__conn_on_write)) {
    free(c->resp);
    c->resp = NULL;
    kvdex__conn_close(c);
  }
}

static void kvdex__conn_error(kvdex__conn *c, int status, const char *reason) {
  char body[96];
  int n = snprintf(body, sizeof body, "%d %s\n", status, reason);
  kvdex__conn_respond(c, status, reason, "text/plain; charset=utf-8", body, (size_t)n, false,
                      NULL);
}

/* Offset just past the end of the headers ("\r\n\r\n" or "\n\n"), 0 if not there yet. */
static size_t kvdex__headers_end(const char *p, size_t n) {
  for (size_t i = 0; i + 1 < n; i++) {
    if (p[i] != '\n') continue;
    if (p[i + 1] == '\n') return i + 2;
    if (i + 2 < n && p[i + 1] == '\r' && p[i + 2] == '\n') return i + 3;
  }
  return 0;
}

/* The request is complete in c->buf[0..c->len): answer it. */
static void kvdex__conn_handle(kvdex__conn *c) {
  /* Request line: METHOD SP TARGET SP HTTP/1.x */
  size_t eol = 0;
  while (eol < c->len && c->buf[eol] != '\n') eol++;
  if (eol && c->buf[eol - 1] == '\r') eol--;
  char line[1024];
  if (eol >= sizeof line) {
    kvdex__conn_error(c, 414, "URI Too Long");
    return;
  }
  memcpy(line, c->buf, eol);
  line[eol] = '\0';
  char *sp1 = strchr(line, ' ');
  char *sp2 = sp1 ? strchr(sp1 + 1, ' ') : NULL;
  if (!sp1 || !sp2 || strchr(sp2 + 1, ' ') || strncmp(sp2 + 1, "HTTP/1.", 7)) {
    kvdex__conn_error(c, 400, "Bad Request");
    return;
  }
  *sp1 = *sp2 = '\0';
  const char *method = line, *target = sp1 + 1;
  bool head = !strcmp(method, "HEAD");
  if (!head && strcmp(method, "GET")) {
    kvdex__conn_respond(c, 405, "Method Not Allowed", "text/plain; charset=utf-8",
                        "405 Method Not Allowed\n", 23, false, "Allow: GET, HEAD\r\n");
    return;
  }
  size_t path_len = strcspn(target, "?#");
  /* Probes for kubelet (httpGet), which cannot speak gRPC over TLS: the endpoint runs
   * exactly while the node serves (serve stops it before draining), so "answers" is
   * both alive and ready. */
  if ((path_len == 8 && !strncmp(target, "/healthz", 8)) ||
      (path_len == 7 && !strncmp(target, "/readyz", 7))) {
    kvdex__conn_respond(c, 200, "OK", "text/plain; charset=utf-8", "ok\n", 3, head, NULL);
    return;
  }
  if (path_len != strlen("/metrics") || strncmp(target, "/metrics", path_len)) {
    kvdex__conn_error(c, 404, "Not Found");
    return;
  }
  kvdex_metrics_http *h = c->h;
  if (h->collect) h->collect(h->ctx);
  char *text = NULL;
  size_t len = 0;
  if (kvdex_metrics_render(h->metrics, &text, &len)) {
    KVDEX_LOG(KVDEX_LOG_WARN, "metrics: %s", kvdex_errmsg());
    kvdex__conn_error(c, 500, "Internal Server Error");
    return;
  }
  kvdex__conn_respond(c, 200, "OK", "text/plain; version=0.0.4; charset=utf-8", text, len, head,
                      NULL);
  free(text);
}

static void kvdex__conn_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  kvdex__conn *c = handle->data;
  *buf = uv_buf_init(c->buf + c->len, (unsigned)(sizeof c->buf - c->len));
}

static void kvdex__conn_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  kvdex__conn *c = s->data;
  if (c->closing || c->responded) return;
  if (nread == UV_ENOBUFS) {
    kvdex__conn_error(c, 431, "Request Header Fields Too Large");
    return;
  }
  if (nread < 0) { /* EOF before a complete request, or a socket error */
    kvdex__conn_close(c);
    return;
  }
  c->len += (size_t)nread;
  if (kvdex__headers_end(c->buf, c->len)) {
    kvdex__conn_handle(c);
  } else if (c->len == sizeof c->buf) {
    kvdex__conn_error(c, 431, "Request Header Fields Too Large");
  }
}

static void kvdex__http_on_conn(uv_stream_t *server, int status) {
  kvdex_metrics_http *h = server->data;
  if (status < 0) {
    KVDEX_LOG(KVDEX_LOG_WARN, "metrics: accept: %s", uv_strerror(status));
    return;
  }
  if (h->closing) return;
  kvdex__conn *c = malloc(sizeof *c);
  if (!c) {
    KVDEX_LOG(KVDEX_LOG_WARN, "metrics: out of memory for a connection");
    return;
  }
  memset(c, 0, offsetof(kvdex__conn, buf));
  c->h = h;
  uv_tcp_init(server->loop, &c->tcp);
  uv_timer_init(server->loop, &c->timer);
  c->tcp.data = c->timer.data = c;
  c->open_handles = 2;
  c->next = h->conns;
  if (h->conns) h->conns->prev = c;
  h->conns = c;
  h->n_conns++;
  int rc = uv_accept(server, (uv_stream_t *)&c->tcp);
  if (rc || h->n_conns > KVDEX_METRICS_HTTP_MAX_CONNS) {
    if (rc) KVDEX_LOG(KVDEX_LOG_WARN, "metrics: accept: %s", uv_strerror(rc));
    else KVDEX_LOG(KVDEX_LOG_DEBUG, "metrics: too many connections, closing a new one");
    kvdex__conn_close(c);
    return;
  }
  uv_timer_start(&c->timer, kvdex__conn_on_timeout, KVDEX_METRICS_HTTP_TIMEOUT_MS, 0);
  if ((rc = uv_read_start((uv_stream_t *)&c->tcp, kvdex__conn_alloc, kvdex__conn_on_read)))
    kvdex__conn_close(c);
}

static void kvdex__http_on_listener_closed(uv_handle_t *handle) {
  kvdex_metrics_http *h = handle->data;
  h->listener_closed = true;
  kvdex__http_maybe_free(h);
}

int kvdex_metrics_http_start(uv_loop_t *loop, const char *addr, kvdex_metrics *metrics,
                             kvdex_metrics_collect_fn collect, void *ctx,
                             kvdex_metrics_http **out /* OUT */) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "metrics: out is NULL");
  *out = NULL;
  if (!loop || !addr || !metrics)
    return kvdex__seterr(KVDEX_EINVAL, "metrics: loop, address and metrics are required");
  /* "host:port" or "[v6]:port"; an empty host is every interface. */
  char host[256], port[16];
  const char *colon = addr[0] == '[' ? strstr(addr, "]:") : strrchr(addr, ':');
  if (colon && addr[0] == '[') colon++;
  size_t host_len = colon ? (size_t)(colon - addr) : 0;
  const char *host0 = addr;
  if (addr[0] == '[' && host_len >= 2) {
    host0++;
    host_len -= 2;
  }
  if (!colon || host_len >= sizeof host || strlen(colon + 1) == 0 ||
      strlen(colon + 1) >= sizeof port || strspn(colon + 1, "0123456789") != strlen(colon + 1))
    return kvdex__seterr(KVDEX_EINVAL, "metrics: '%.200s' is not host:port", addr);
  memcpy(host, host0, host_len);
  host[host_len] = '\0';
  snprintf(port, sizeof port, "%s", colon + 1);
  if (atoi(port) > 65535)
    return kvdex__seterr(KVDEX_EINVAL, "metrics: port %s out of range", port);

  uv_getaddrinfo_t req;
  struct addrinfo hints;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  int rc = uv_getaddrinfo(loop, &req, NULL, host[0] ? host : NULL, port, &hints);
  if (rc)
    return kvdex__seterr(KVDEX_EINVAL, "metrics: cannot resolve '%s': %s", host, uv_strerror(rc));
  kvdex_metrics_http *h = calloc(1, sizeof *h);
  if (!h) {
    uv_freeaddrinfo(req.addrinfo);
    return kvdex__seterr(KVDEX_ENOMEM, "metrics: out of memory");
  }
  h->metrics = metrics;
  h->collect = collect;
  h->ctx = ctx;
  uv_tcp_init(loop, &h->listener);
  h->listener.data = h;
  rc = uv_tcp_bind(&h->listener, req.addrinfo->ai_addr, 0);
  uv_freeaddrinfo(req.addrinfo);
  if (!rc) rc = uv_listen((uv_stream_t *)&h->listener, 64, kvdex__http_on_conn);
  struct sockaddr_storage ss;
  int ss_len = sizeof ss;
  if (!rc) rc = uv_tcp_getsockname(&h->listener, (struct sockaddr *)&ss, &ss_len);
  if (rc) {
    kvdex_metrics_http_close(h);
    return kvdex__seterr(KVDEX_EIO, "metrics: cannot listen on %.200s: %s", addr,
                         uv_strerror(rc));
  }
  h->port = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                     : ntohs(((struct sockaddr_in *)&ss)->sin_port);
  *out = h;
  return KVDEX_OK;
}

int kvdex_metrics_http_port(const kvdex_metrics_http *h) { return h ? h->port : 0; }

void kvdex_metrics_http_close(kvdex_metrics_http *h) {
  if (!h || h->closing) return;
  h->closing = true;
  for (kvdex__conn *c = h->conns; c; c = c->next) kvdex__conn_close(c);
  uv_close((uv_handle_t *)&h->listener, kvdex__http_on_listener_closed);
}
