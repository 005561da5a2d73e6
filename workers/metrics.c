/* metrics: atomic counters and the Prometheus text renderer (see metrics.h). The
 * duration histogram keeps per-bucket (non-cumulative) counts and the sum in
 * nanoseconds; rendering makes them cumulative. */
#include "workers/metrics.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvstore/base.h"
#include "proto/wire.h"

static const double kvdex__buckets[KVDEX_METRICS_BUCKETS] = {
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};

/* The `code` label is kvdex_wire_status_name of a grpc_status_code, 0..16. */
_Static_assert(KVDEX_METRICS_CODES == GRPC_STATUS_UNAUTHENTICATED + 1,
               "one counter per gRPC status code");

typedef struct kvdex__method_metrics {
  atomic_uint_fast64_t calls[KVDEX_METRICS_CODES];
  atomic_uint_fast64_t buckets[KVDEX_METRICS_BUCKETS + 1]; /* last: above every bound */
  atomic_uint_fast64_t sum_ns;
} kvdex__method_metrics;

struct kvdex_metrics {
  const char *const *names;
  unsigned n_methods;
  kvdex__method_metrics *methods;
  atomic_uint_fast64_t queries[2], keys_touched[2]; /* [0] Search, [1] Attend */
  atomic_uint_fast64_t builds_ready, builds_failed;
  atomic_uint_fast64_t bytes_stored, memory_cap, sequences;
};

int kvdex_metrics_create(const char *const *methods, unsigned n_methods,
                         kvdex_metrics **out /* OUT */) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "metrics: out is NULL");
  *out = NULL;
  if (!methods || n_methods == 0 || n_methods > KVDEX_METRICS_MAX_METHODS)
    return kvdex__seterr(KVDEX_EINVAL, "metrics: %u methods (1..%d)", n_methods,
                         KVDEX_METRICS_MAX_METHODS);
  kvdex_metrics *m = calloc(1, sizeof *m);
  if (m) m->methods = calloc(n_methods, sizeof *m->methods);
  if (!m || !m->methods) {
    free(m);
    return kvdex__seterr(KVDEX_ENOMEM, "metrics: out of memory");
  }
  /* calloc's zero bytes are valid zero atomics on every platform we build for. */
  m->names = methods;
  m->n_methods = n_methods;
  *out = m;
  return KVDEX_OK;
}

void kvdex_metrics_destroy(kvdex_metrics *m) {
  if (!m) return;
  free(m->methods);
  free(m);
}

void kvdex_metrics_rpc(kvdex_metrics *m, unsigned method, int code, double seconds) {
  if (!m || method >= m->n_methods) return;
  if (code < 0 || code >= KVDEX_METRICS_CODES) code = 2; /* UNKNOWN */
  if (!(seconds >= 0)) seconds = 0;                       /* NaN or negative */
  kvdex__method_metrics *mm = &m->methods[method];
  unsigned b = 0;
  while (b < KVDEX_METRICS_BUCKETS && seconds > kvdex__buckets[b]) b++;
  atomic_fetch_add_explicit(&mm->buckets[b], 1, memory_order_relaxed);
  double ns = seconds * 1e9;
  atomic_fetch_add_explicit(&mm->sum_ns, ns < 1.8e19 ? (uint_fast64_t)ns : 0,
                            memory_order_relaxed);
  atomic_fetch_add_explicit(&mm->calls[code], 1, memory_order_relaxed);
}

void kvdex_metrics_search(kvdex_metrics *m, int attend, uint64_t queries, uint64_t keys_touched) {
  if (!m) return;
  int i = attend ? 1 : 0;
  atomic_fetch_add_explicit(&m->queries[i], queries, memory_order_relaxed);
  atomic_fetch_add_explicit(&m->keys_touched[i], keys_touched, memory_order_relaxed);
}

void kvdex_metrics_index_builds(kvdex_metrics *m, uint64_t ready, uint64_t failed) {
  if (!m) return;
  atomic_fetch_add_explicit(&m->builds_ready, ready, memory_order_relaxed);
  atomic_fetch_add_explicit(&m->builds_failed, failed, memory_order_relaxed);
}

void kvdex_metrics_set_store(kvdex_metrics *m, uint64_t bytes_stored, uint64_t memory_cap,
                             uint64_t sequences) {
  if (!m) return;
  atomic_store_explicit(&m->bytes_stored, bytes_stored, memory_order_relaxed);
  atomic_store_explicit(&m->memory_cap, memory_cap, memory_order_relaxed);
  atomic_store_explicit(&m->sequences, sequences, memory_order_relaxed);
}

/* ---- Rendering ------------------------------------------------------------------ */

typedef struct kvdex__buf {
  char *p;
  size_t len, cap;
  int oom;
} kvdex__buf;

static void kvdex__printf(kvdex__buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void kvdex__printf(kvdex__buf *b, const char *fmt, ...) {
  if (b->oom) return;
  for (;;) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (n < 0) {
      b->oom = 1;
      return;
    }
    if ((size_t)n < b->cap - b->len) {
      b->len += (size_t)n;
      return;
    }
    size_t cap = b->cap * 2 + (size_t)n + 1;
    char *p = realloc(b->p, cap);
    if (!p) {
      b->oom = 1;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
}

static void kvdex__head(kvdex__buf *b, const char *name, const char *type, const char *help) {
  kvdex__printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A label value with \ " and newline escaped, as the text format requires. */
static void kvdex__label(kvdex__buf *b, const char *v) {
  for (; *v; v++) {
    if (*v == '\\') kvdex__printf(b, "\\\\");
    else if (*v == '"') kvdex__printf(b, "\\\"");
    else if (*v == '\n') kvdex__printf(b, "\\n");
    else kvdex__printf(b, "%c", *v);
  }
}

#define KVDEX__LOAD(x) ((unsigned long long)atomic_load_explicit(&(x), memory_order_relaxed))

int kvdex_metrics_render(const kvdex_metrics *cm, char **out /* OUT */, size_t *len /* OUT */) {
  if (!cm || !out || !len) return kvdex__seterr(KVDEX_EINVAL, "metrics: NULL argument");
  *out = NULL;
  *len = 0;
  kvdex_metrics *m = (kvdex_metrics *)cm; /* atomic loads take non-const pointers */
  kvdex__buf b = {.p = malloc(16384), .cap = 16384};
  if (!b.p) return kvdex__seterr(KVDEX_ENOMEM, "metrics: out of memory");
  b.p[0] = '\0';

  kvdex__head(&b, "kvdex_rpc_total", "counter",
              "gRPC calls completed, by method and status code.");
  for (unsigned i = 0; i < m->n_methods; i++)
    for (int c = 0; c < KVDEX_METRICS_CODES; c++) {
      unsigned long long v = KVDEX__LOAD(m->methods[i].calls[c]);
      if (!v && c) continue; /* every method shows OK; other codes once seen */
      kvdex__printf(&b, "kvdex_rpc_total{method=\"");
      kvdex__label(&b, m->names[i]);
      kvdex__printf(&b, "\",code=\"%s\"} %llu\n",
                    kvdex_wire_status_name((grpc_status_code)c), v);
    }

  kvdex__head(&b, "kvdex_rpc_duration_seconds", "histogram",
              "Time from the call's arrival to its status being sent, by method.");
  for (unsigned i = 0; i < m->n_methods; i++) {
    kvdex__method_metrics *mm = &m->methods[i];
    unsigned long long cum = 0;
    for (int k = 0; k <= KVDEX_METRICS_BUCKETS; k++) {
      cum += KVDEX__LOAD(mm->buckets[k]);
      kvdex__printf(&b, "kvdex_rpc_duration_seconds_bucket{method=\"");
      kvdex__label(&b, m->names[i]);
      if (k < KVDEX_METRICS_BUCKETS)
        kvdex__printf(&b, "\",le=\"%g\"} %llu\n", kvdex__buckets[k], cum);
      else
        kvdex__printf(&b, "\",le=\"+Inf\"} %llu\n", cum);
    }
    kvdex__printf(&b, "kvdex_rpc_duration_seconds_sum{method=\"");
    kvdex__label(&b, m->names[i]);
    kvdex__printf(&b, "\"} %.9f\n", (double)KVDEX__LOAD(mm->sum_ns) / 1e9);
    kvdex__printf(&b, "kvdex_rpc_duration_seconds_count{method=\"");
    kvdex__label(&b, m->names[i]);
    kvdex__printf(&b, "\"} %llu\n", cum);
  }

  kvdex__head(&b, "kvdex_bytes_stored", "gauge",
              "Bytes the store accounts against its memory cap (K/V, metadata, indexes).");
  kvdex__printf(&b, "kvdex_bytes_stored %llu\n", KVDEX__LOAD(m->bytes_stored));
  kvdex__head(&b, "kvdex_memory_cap_bytes", "gauge", "The store's memory cap (0 = unlimited).");
  kvdex__printf(&b, "kvdex_memory_cap_bytes %llu\n", KVDEX__LOAD(m->memory_cap));
  kvdex__head(&b, "kvdex_sequences", "gauge", "Sequences in the store, all namespaces.");
  kvdex__printf(&b, "kvdex_sequences %llu\n", KVDEX__LOAD(m->sequences));

  kvdex__head(&b, "kvdex_index_builds_total", "counter",
              "Per-layer index builds that ended, by result (counted when seen ended: at the "
              "next scrape or BuildIndex).");
  kvdex__printf(&b, "kvdex_index_builds_total{result=\"ready\"} %llu\n",
                KVDEX__LOAD(m->builds_ready));
  kvdex__printf(&b, "kvdex_index_builds_total{result=\"failed\"} %llu\n",
                KVDEX__LOAD(m->builds_failed));

  kvdex__head(&b, "kvdex_evictions_total", "counter",
              "Sequences evicted. Always 0: at its memory cap the store refuses writes "
              "(RESOURCE_EXHAUSTED) instead of evicting.");
  kvdex__printf(&b, "kvdex_evictions_total 0\n");

  static const char *const ops[2] = {"Search", "Attend"};
  kvdex__head(&b, "kvdex_search_queries_total", "counter",
              "Retrieval queries answered (Search queries, Attend items), by method.");
  for (int i = 0; i < 2; i++)
    kvdex__printf(&b, "kvdex_search_queries_total{method=\"%s\"} %llu\n", ops[i],
                  KVDEX__LOAD(m->queries[i]));
  kvdex__head(&b, "kvdex_search_keys_touched_total", "counter",
              "Keys scored by those queries (index + exact tail); divided by "
              "kvdex_search_queries_total: keys touched per query.");
  for (int i = 0; i < 2; i++)
    kvdex__printf(&b, "kvdex_search_keys_touched_total{method=\"%s\"} %llu\n", ops[i],
                  KVDEX__LOAD(m->keys_touched[i]));

  if (b.oom) {
    free(b.p);
    return kvdex__seterr(KVDEX_ENOMEM, "metrics: out of memory rendering");
  }
  *out = b.p;
  *len = b.len;
  return KVDEX_OK;
}
