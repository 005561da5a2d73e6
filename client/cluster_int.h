/* cluster_int.h — private to client/: the cluster transport, a kvdex_db that routes
 * each call to the nodes that own its sequence, each reached through a grpc handle
 * of its own (grpc.c). Its files, by concept:
 *   cluster.c         routing: placement by rendezvous hashing, the vtable ops, reads
 *                     with failover, writes to every owner, batched fan-out, open/close;
 *   cluster_health.c  the nodes: their channels, DNS resolution and re-resolution,
 *                     the circuit breaker and the clock it runs on;
 *   cluster_admin.c   administration: hints of missed writes and the repair thread,
 *                     status, repair, rebalance, owners, checksums.
 * kvdex.c uses the first block only. Nothing here is part of the public API.
 */
#ifndef KVDEX_CLUSTER_INT_H
#define KVDEX_CLUSTER_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "client/client_int.h"
#include "client/kvdex.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Most nodes of a cluster handle, most replicas of a sequence. */
#define KVDEX__MAX_NODES 64
#define KVDEX__MAX_REPLICAS 8

/* 1 when uri names a cluster: "dns:///..." or a grpc(s):// uri with several hosts or
 * a "?" query. */
int kvdex__is_cluster_uri(const char *uri);

/* Opens a cluster handle (see kvdex_open in kvdex.h for the uri forms). */
int kvdex__cluster_open(const char *uri, const kvdex_open_opts *opts, kvdex_db **out /* OUT */);

/* Checks "host:port" or "[addr]:port" (kvdex.c); returns NULL or a static reason. */
const char *kvdex__check_authority(const char *a);

/* ---- the handle, shared by cluster*.c ------------------------------------------------ */

#define KVDEX__CL_ADDR_MAX 300

typedef struct kvdex__cl_node {
  char addr[KVDEX__CL_ADDR_MAX];   /* identity for hashing, and the grpc target */
  kvdex_db *db;                    /* its grpc handle; NULL when it could not be opened */
  char open_err[256];
  atomic_int fails;                /* transport failures in a row */
  atomic_llong open_until;         /* breaker: skipped until this monotonic ms */
  struct kvdex__cl_node *next_all; /* every node this handle ever had, freed at close */
} kvdex__cl_node;

typedef struct kvdex__cl_hint { /* a replica that missed a write */
  char addr[KVDEX__CL_ADDR_MAX];
  char ns[KVDEX_MAX_NAMESPACE + 1];
  char id[KVDEX_MAX_SEQ_ID + 1];
} kvdex__cl_hint;

typedef struct kvdex__cluster {
  kvdex_db base;
  pthread_rwlock_t mu;      /* guards nodes / n_nodes (DNS re-resolution swaps them) */
  kvdex__cl_node **nodes;   /* the current ring, sorted by addr */
  size_t n_nodes;
  kvdex__cl_node *all;
  uint32_t replicas;
  int tls;
  uint32_t timeout_ms;
  kvdex_open_opts opts;     /* for opening nodes found later; strings below */
  char *ns, *ca, *cert, *key, *token;
  /* dns:/// */
  int dns;
  char dns_host[256], dns_port[8];
  int64_t resolve_ms;
  atomic_llong next_resolve;
  pthread_mutex_t resolve_mu;
  /* under-replication hints, and the thread that repairs them (auto_repair_ms) */
  pthread_mutex_t hint_mu;
  kvdex__cl_hint *hints;
  size_t n_hints, cap_hints;
  int64_t auto_repair_ms;   /* 0 = off */
  pthread_cond_t repair_cv; /* with hint_mu */
  pthread_t repair_th;
  int repair_started, closing;
} kvdex__cluster;

static inline kvdex__cluster *kvdex__cluster_as(kvdex_db *db) { return (kvdex__cluster *)db; }

/* ---- routing (cluster.c) ------------------------------------------------------------ */

/* KVDEX_EINVAL (with fn in the message) unless db is a cluster handle. */
int kvdex__cl_check(kvdex_db *db, const char *fn);
/* The current nodes in rank order for (ns, id); returns how many (<= KVDEX__MAX_NODES).
 * The first kvdex__cl_n_owners of them are the owners. Takes c->mu to read. */
size_t kvdex__cl_rank(kvdex__cluster *c, const char *ns, const char *id,
                      kvdex__cl_node **out /* OUT */);
/* How many of n_nodes ranked nodes own a sequence. */
size_t kvdex__cl_n_owners(const kvdex__cluster *c, size_t n_nodes);

/* ---- node health (cluster_health.c) ------------------------------------------------- */

/* 1 for the codes that say the node did not answer (UNAVAILABLE, DEADLINE_EXCEEDED). */
int kvdex__cl_is_transport(int rc);
/* 1 when calls skip the node: it could not be opened, or its breaker is open. */
int kvdex__cl_node_skipped(kvdex__cl_node *nd, int64_t now);
/* Feeds the node's breaker with a call's result. Thread-safe. */
void kvdex__cl_node_result(kvdex__cl_node *nd, int rc);
/* The current node with that address, or NULL. Takes c->mu to read. */
kvdex__cl_node *kvdex__cl_node_by_addr(kvdex__cluster *c, const char *addr);
/* Replaces the ring with addrs (n of them), reusing the nodes already known and
 * opening the new ones. Takes c->mu to write. */
int kvdex__cl_set_nodes(kvdex__cluster *c, char (*addrs)[KVDEX__CL_ADDR_MAX], size_t n);
/* Resolves c->dns_host:dns_port into at most KVDEX__MAX_NODES addresses. */
int kvdex__cl_resolve(kvdex__cluster *c, char (*addrs)[KVDEX__CL_ADDR_MAX] /* OUT */,
                      size_t *n /* OUT */);
/* Re-resolves a dns:/// cluster when its period has passed (one caller at a time). */
void kvdex__cl_maybe_resolve(kvdex__cluster *c);

/* ---- administration (cluster_admin.c) ----------------------------------------------- */

/* 1 when nd is known to have missed writes of ns/id. Takes c->hint_mu. */
int kvdex__cl_hint_has(kvdex__cluster *c, const kvdex__cl_node *nd, const char *ns,
                       const char *id);
/* Drops the hints of ns/id; addr NULL = of every node. Takes c->hint_mu. */
void kvdex__cl_hint_drop(kvdex__cluster *c, const char *addr, const char *ns, const char *id);
/* A write (what) of id in the handle's namespace that owner nd missed: hinted (reads
 * avoid that copy, the repair thread re-sends it) and logged with why (NULL = the
 * current kvdex_errmsg()). Starts the repair thread with the first hint. */
void kvdex__cl_replica_missed(kvdex__cluster *c, kvdex__cl_node *nd, const char *what,
                              const char *id, const char *why);
/* Stops the repair thread, if started, and waits for it (close). */
void kvdex__cl_repair_stop(kvdex__cluster *c);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_CLUSTER_INT_H */
