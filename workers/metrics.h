/* metrics: the counters, histograms and gauges of a kvdex node, rendered in the
 * Prometheus text exposition format (version 0.0.4). Lock-free: every update is a C11
 * atomic, so any thread may record while another renders. It holds no global state:
 * the owner creates a kvdex_metrics handle and passes it to whoever records. It does
 * not serve HTTP (workers/metrics_http.h does) and does not read the store (the
 * owner sets the gauges, e.g. through kvdex_server_collect, before rendering).
 */
#ifndef KVDEX_METRICS_H
#define KVDEX_METRICS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvdex_metrics kvdex_metrics;

/* gRPC status codes 0..16 (OK .. UNAUTHENTICATED); others are counted as UNKNOWN. */
#define KVDEX_METRICS_CODES 17
/* Most methods one handle tracks. */
#define KVDEX_METRICS_MAX_METHODS 32
/* Upper bounds (seconds) of kvdex_rpc_duration_seconds' buckets, +Inf aside. */
#define KVDEX_METRICS_BUCKETS 15

/* Creates a handle for n_methods methods named methods[0..n) (the `method` label;
 * the strings must outlive the handle: static names). KVDEX_EINVAL when n_methods
 * is 0 or above KVDEX_METRICS_MAX_METHODS, KVDEX_ENOMEM. */
int kvdex_metrics_create(const char *const *methods, unsigned n_methods,
                         kvdex_metrics **out /* OUT */);
/* NULL is a no-op. Nobody may record into the handle any more. */
void kvdex_metrics_destroy(kvdex_metrics *m);

/* One completed RPC: kvdex_rpc_total{method,code} += 1 and the method's duration
 * histogram observes `seconds`. A NULL handle or an out-of-range method is ignored.
 * Thread-safe. */
void kvdex_metrics_rpc(kvdex_metrics *m, unsigned method, int code, double seconds);

/* Retrieval work of one successful Search (attend = 0) or Attend (attend = 1)
 * response: `queries` queries (Search queries / Attend items) that touched
 * `keys_touched` keys in all. Thread-safe; NULL is ignored. */
void kvdex_metrics_search(kvdex_metrics *m, int attend, uint64_t queries, uint64_t keys_touched);

/* Index builds that ended: `ready` succeeded, `failed` failed. Thread-safe. */
void kvdex_metrics_index_builds(kvdex_metrics *m, uint64_t ready, uint64_t failed);

/* Scrape-time values of the store. Thread-safe. */
void kvdex_metrics_set_store(kvdex_metrics *m, uint64_t bytes_stored, uint64_t memory_cap,
                             uint64_t sequences);

/* Renders every metric, with HELP and TYPE lines, as Prometheus text. *out is a
 * NUL-terminated malloc'd string the caller frees, *len its length. KVDEX_ENOMEM
 * (nothing is returned). Thread-safe; the values are read one by one, so a render
 * racing with updates may show a counter and its histogram one call apart. */
int kvdex_metrics_render(const kvdex_metrics *m, char **out /* OUT */, size_t *len /* OUT */);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_METRICS_H */
