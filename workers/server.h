/* server: the kvdex gRPC server on the gRPC C core. Serves kvdex.v1.KVStore,
 * kvdex.v1.Retrieval and grpc.health.v1.Health over a kvdex_store, with one
 * completion queue per worker thread. It owns neither the store nor the pool; it
 * owns the node engine over them (engine/node.h), whose indexer runs BuildIndex in
 * the background.
 * Signals and process lifetime belong to the caller (`kvdex serve` uses libuv).
 * From the first kvdex_server_start on, gRPC's own log lines go to KVDEX_LOG (its
 * errors at WARN, the rest at DEBUG).
 */
#ifndef KVDEX_SERVER_H
#define KVDEX_SERVER_H

#include <stdint.h>

#include "index/index.h"
#include "kvstore/kvstore.h"
#include "workers/auth.h"
#include "workers/metrics.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvdex_server kvdex_server;

typedef struct kvdex_server_opts {
  const char *listen;        /* "host:port"; port 0 picks a free port */
  unsigned threads;          /* completion-queue worker threads (0 = CPUs) */
  uint64_t max_message_bytes;/* per gRPC message, both directions (0 = 64 MiB,
                                KVDEX_RPC_DEFAULT_MAX_MESSAGE) */
  unsigned build_threads;    /* BuildIndex threads (0 = 1); each build also uses the pool */
  kvdex_metrics *metrics;    /* may be NULL; made with kvdex_server_method_names(), it must
                                outlive the server; the server records every completed call,
                                Search/Attend work and ended index builds into it */
  /* TLS: PEM files of the server's certificate chain and private key (both or neither;
   * neither = plaintext). With tls_client_ca_file too, every client must present a
   * certificate signed by that CA (mTLS); it needs the other two. Read at start. */
  const char *tls_cert_file, *tls_key_file, *tls_client_ca_file;
  /* Bearer tokens (may be NULL = no auth); must outlive the server. When set, every
   * call but grpc.health.v1.Health/Check needs `authorization: Bearer TOKEN`:
   * none or an unknown one -> UNAUTHENTICATED; a sequence or ListSequences namespace
   * the token is not allowed -> PERMISSION_DENIED, decided before any lookup (the
   * message does not tell whether the sequence exists). ListSequences of every
   * namespace lists only the token's namespaces. */
  const kvdex_auth *auth;
} kvdex_server_opts;

/* The method names the server records metrics under, in the order its metrics
 * indices use (proto/rpc.h's kvdex_rpc_methods names, then "(unregistered)"): pass
 * them to kvdex_metrics_create. Static strings; *n gets the count. Thread-safe. */
const char *const *kvdex_server_method_names(unsigned *n /* OUT */);

/* Binds and starts serving. KVDEX_EIO if the address cannot be bound (a second
 * server on a used port fails: SO_REUSEPORT is off) or a TLS file cannot be read;
 * KVDEX_EINVAL for half a TLS setting or a file that is not PEM. */
int kvdex_server_start(kvdex_store *store, kvdex_pool *pool, const kvdex_server_opts *opts,
                       kvdex_server **out /* OUT */);

/* The port actually bound (useful with port 0). */
int kvdex_server_port(const kvdex_server *srv);

/* Brings opts->metrics' scrape-time values up to date: the store gauges
 * (kvdex_metrics_set_store) and the index builds that ended since the last look
 * (kvdex_index_builds_total). Call it before kvdex_metrics_render. Thread-safe against
 * calls and itself, not against kvdex_server_stop; a no-op without a metrics handle or
 * with NULL. */
void kvdex_server_collect(kvdex_server *srv);

/* Stops accepting calls, lets in-flight calls finish for up to drain_ms, cancels the
 * rest, joins the workers, stops the index builds (queued ones are cancelled, a
 * running one is waited for up to the end of its current kv head) and frees
 * everything. NULL is a no-op. Thread-safe against running calls, not against itself.
 * Call it before destroying the store or the pool. */
void kvdex_server_stop(kvdex_server *srv, uint32_t drain_ms);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_SERVER_H */
