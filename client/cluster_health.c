/* cluster_health.c — the nodes of a cluster handle and how healthy they are: one grpc
 * handle (one channel) per node, opened once and kept for the handle's life; the
 * node list from a static uri or from DNS, re-resolved every resolve_ms; and per
 * node a circuit breaker fed by call results: a transport failure (UNAVAILABLE,
 * DEADLINE_EXCEEDED) counts, any answer from the server (even an error) resets the
 * count; after BREAKER_FAILS in a row the node is skipped until a back-off passes,
 * and then the next call tries it once. Routing decisions are cluster.c's.
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "client/cluster_int.h"

#define BREAKER_FAILS 3
#define BREAKER_BASE_MS 200
#define BREAKER_MAX_MS 10000

/* ---- circuit breaker ---------------------------------------------------------------- */

int kvdex__cl_is_transport(int rc) { return rc == KVDEX_EUNAVAIL || rc == KVDEX_ETIMEDOUT; }

int kvdex__cl_node_skipped(kvdex__cl_node *nd, int64_t now) {
  return !nd->db || atomic_load(&nd->open_until) > now;
}

void kvdex__cl_node_result(kvdex__cl_node *nd, int rc) {
  if (!kvdex__cl_is_transport(rc)) {
    atomic_store(&nd->fails, 0);
    atomic_store(&nd->open_until, 0);
    return;
  }
  int f = atomic_fetch_add(&nd->fails, 1) + 1;
  if (f >= BREAKER_FAILS) {
    int shift = f - BREAKER_FAILS;
    int64_t ms = shift >= 6 ? BREAKER_MAX_MS : (int64_t)BREAKER_BASE_MS << shift;
    if (ms > BREAKER_MAX_MS) ms = BREAKER_MAX_MS;
    atomic_store(&nd->open_until, kvdex__now_ms() + ms);
  }
}

kvdex__cl_node *kvdex__cl_node_by_addr(kvdex__cluster *c, const char *addr) {
  kvdex__cl_node *found = NULL;
  pthread_rwlock_rdlock(&c->mu);
  for (size_t i = 0; i < c->n_nodes && !found; i++)
    if (!strcmp(c->nodes[i]->addr, addr)) found = c->nodes[i];
  pthread_rwlock_unlock(&c->mu);
  return found;
}

/* ---- node list: static and DNS ------------------------------------------------------ */

static int cmp_node_addr(const void *a, const void *b) {
  return strcmp((*(kvdex__cl_node *const *)a)->addr, (*(kvdex__cl_node *const *)b)->addr);
}

static kvdex__cl_node *node_new(kvdex__cluster *c, const char *addr) {
  kvdex__cl_node *nd = calloc(1, sizeof *nd);
  if (!nd) return NULL;
  snprintf(nd->addr, sizeof nd->addr, "%s", addr);
  char uri[KVDEX__CL_ADDR_MAX + 16];
  snprintf(uri, sizeof uri, "%s://%s", c->tls ? "grpcs" : "grpc", addr);
  if (kvdex_open(uri, &c->opts, &nd->db) != KVDEX_OK) {
    snprintf(nd->open_err, sizeof nd->open_err, "%s", kvdex_errmsg());
    nd->db = NULL;
  }
  nd->next_all = c->all;
  c->all = nd;
  return nd;
}

int kvdex__cl_set_nodes(kvdex__cluster *c, char (*addrs)[KVDEX__CL_ADDR_MAX], size_t n) {
  kvdex__cl_node **ring = calloc(n ? n : 1, sizeof *ring);
  if (!ring) return kvdex__seterr(KVDEX_ENOMEM, "cluster: out of memory");
  pthread_rwlock_wrlock(&c->mu);
  for (size_t i = 0; i < n; i++) {
    kvdex__cl_node *nd = c->all;
    while (nd && strcmp(nd->addr, addrs[i])) nd = nd->next_all;
    if (!nd) nd = node_new(c, addrs[i]);
    if (!nd) {
      pthread_rwlock_unlock(&c->mu);
      free(ring);
      return kvdex__seterr(KVDEX_ENOMEM, "cluster: out of memory");
    }
    ring[i] = nd;
  }
  qsort(ring, n, sizeof *ring, cmp_node_addr);
  kvdex__cl_node **old = c->nodes;
  c->nodes = ring;
  c->n_nodes = n;
  pthread_rwlock_unlock(&c->mu);
  free(old);
  return KVDEX_OK;
}

/* Resolves dns_host:dns_port into node addresses. A name found by reverse lookup
 * (a StatefulSet pod behind a headless Service has one: kvdex-0.kvdex-headless...)
 * is preferred over the IP, because it survives a pod restart and so keeps the
 * pod's sequences placed on it. */
int kvdex__cl_resolve(kvdex__cluster *c, char (*addrs)[KVDEX__CL_ADDR_MAX], size_t *n) {
  struct addrinfo hints = {0}, *res = NULL;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  int e = getaddrinfo(c->dns_host, c->dns_port, &hints, &res);
  if (e)
    return kvdex__seterr(KVDEX_EUNAVAIL, "cluster: cannot resolve \"%s\": %s", c->dns_host,
                         gai_strerror(e));
  size_t k = 0;
  for (struct addrinfo *a = res; a && k < KVDEX__MAX_NODES; a = a->ai_next) {
    char host[NI_MAXHOST], addr[KVDEX__CL_ADDR_MAX];
    if (getnameinfo(a->ai_addr, a->ai_addrlen, host, sizeof host, NULL, 0, NI_NAMEREQD) == 0) {
      snprintf(addr, sizeof addr, "%s:%s", host, c->dns_port);
    } else if (getnameinfo(a->ai_addr, a->ai_addrlen, host, sizeof host, NULL, 0,
                           NI_NUMERICHOST) == 0) {
      if (a->ai_family == AF_INET6)
        snprintf(addr, sizeof addr, "[%s]:%s", host, c->dns_port);
      else
        snprintf(addr, sizeof addr, "%s:%s", host, c->dns_port);
    } else {
      continue;
    }
    int dup = 0;
    for (size_t i = 0; i < k && !dup; i++) dup = !strcmp(addrs[i], addr);
    if (!dup) snprintf(addrs[k++], KVDEX__CL_ADDR_MAX, "%s", addr);
  }
  freeaddrinfo(res);
  if (k == 0)
    return kvdex__seterr(KVDEX_EUNAVAIL, "cluster: \"%s\" resolved to no address", c->dns_host);
  *n = k;
  return KVDEX_OK;
}

/* One caller re-resolves; the others go on with the current ring. A failed lookup
 * keeps the ring. */
void kvdex__cl_maybe_resolve(kvdex__cluster *c) {
  if (!c->dns || kvdex__now_ms() < atomic_load(&c->next_resolve)) return;
  if (pthread_mutex_trylock(&c->resolve_mu) != 0) return;
  if (kvdex__now_ms() >= atomic_load(&c->next_resolve)) {
    char (*addrs)[KVDEX__CL_ADDR_MAX] = malloc(KVDEX__MAX_NODES * sizeof *addrs);
    size_t n = 0;
    if (!addrs) {
      KVDEX_LOG(KVDEX_LOG_WARN, "kvdex cluster: out of memory re-resolving %s", c->dns_host);
    } else if (kvdex__cl_resolve(c, addrs, &n) != KVDEX_OK ||
               kvdex__cl_set_nodes(c, addrs, n) != KVDEX_OK) {
      KVDEX_LOG(KVDEX_LOG_WARN, "kvdex cluster: keeping the node list: %s", kvdex_errmsg());
    }
    free(addrs);
    atomic_store(&c->next_resolve, kvdex__now_ms() + c->resolve_ms);
  }
  pthread_mutex_unlock(&c->resolve_mu);
}