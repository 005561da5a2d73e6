/* wire: the small glue shared by the server (workers/) and the gRPC client
 * (client/) — kvdex return codes <-> gRPC status codes, and Shape messages <->
 * kvdex_shape. It holds no state and does no I/O.
 */
#ifndef KVDEX_WIRE_H
#define KVDEX_WIRE_H

#include <grpc/status.h>

#include "kvdex/v1/kvdex.pb-c.h"
#include "kvstore/base.h"

#ifdef __cplusplus
extern "C" {
#endif

/* KVDEX_E* -> grpc_status_code (KVDEX_OK -> GRPC_STATUS_OK). */
grpc_status_code kvdex_wire_status(int rc);
/* grpc_status_code -> KVDEX_E* (GRPC_STATUS_OK -> KVDEX_OK). */
int kvdex_wire_rc(grpc_status_code status);
/* "OK", "CANCELLED", ..., "UNAUTHENTICATED" (the names of grpc_status_code); "?" for
 * a value outside it. Static strings. */
const char *kvdex_wire_status_name(grpc_status_code status);

void kvdex_wire_shape_to_pb(const kvdex_shape *in, Kvdex__V1__Shape *out /* OUT, initialised */);
/* Copies without validating (kvdex__shape_check does that). */
void kvdex_wire_shape_from_pb(const Kvdex__V1__Shape *in, kvdex_shape *out /* OUT */);

/* The namespace to use for a SequenceRef's namespace field ("" -> "default"). */
const char *kvdex_wire_namespace(const char *ns);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_WIRE_H */
