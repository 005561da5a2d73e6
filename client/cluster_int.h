/* cluster_int.h — private to client/: the cluster transport (cluster.c), a kvdex_db
 * that routes each call to the nodes that own its sequence, each reached through a
 * grpc handle of its own (grpc.c). Nothing here is part of the public API.
 */
#ifndef KVDEX_CLUSTER_INT_H
#define KVDEX_CLUSTER_INT_H

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

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_CLUSTER_INT_H */
