/* wire: status-code and shape conversions between kvdex and the wire contract. */
#include "proto/wire.h"

#include "kvstore/base.h"

grpc_status_code kvdex_wire_status(int rc) {
  switch (rc) {
    case KVDEX_OK: return GRPC_STATUS_OK;
    case KVDEX_EINVAL: return GRPC_STATUS_INVALID_ARGUMENT;
    case KVDEX_ENOTFOUND: return GRPC_STATUS_NOT_FOUND;
    case KVDEX_EEXIST: return GRPC_STATUS_ALREADY_EXISTS;
    case KVDEX_ENOMEM: return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case KVDEX_ECONFLICT: return GRPC_STATUS_FAILED_PRECONDITION;
    case KVDEX_EBUSY: return GRPC_STATUS_ABORTED;
    case KVDEX_ECANCELLED: return GRPC_STATUS_CANCELLED;
    case KVDEX_ETIMEDOUT: return GRPC_STATUS_DEADLINE_EXCEEDED;
    case KVDEX_EUNAVAIL: return GRPC_STATUS_UNAVAILABLE;
    case KVDEX_EUNIMPL: return GRPC_STATUS_UNIMPLEMENTED;
    case KVDEX_EUNAUTH: return GRPC_STATUS_UNAUTHENTICATED;
    case KVDEX_EPERM: return GRPC_STATUS_PERMISSION_DENIED;
    default: return GRPC_STATUS_INTERNAL;
  }
}

int kvdex_wire_rc(grpc_status_code status) {
  switch (status) {
    case GRPC_STATUS_OK: return KVDEX_OK;
    case GRPC_STATUS_INVALID_ARGUMENT: return KVDEX_EINVAL;
    case GRPC_STATUS_OUT_OF_RANGE: return KVDEX_EINVAL;
    case GRPC_STATUS_NOT_FOUND: return KVDEX_ENOTFOUND;
    case GRPC_STATUS_ALREADY_EXISTS: return KVDEX_EEXIST;
    case GRPC_STATUS_RESOURCE_EXHAUSTED: return KVDEX_ENOMEM;
    case GRPC_STATUS_FAILED_PRECONDITION: return KVDEX_ECONFLICT;
    case GRPC_STATUS_ABORTED: return KVDEX_EBUSY;
    case GRPC_STATUS_CANCELLED: return KVDEX_ECANCELLED;
    case GRPC_STATUS_DEADLINE_EXCEEDED: return KVDEX_ETIMEDOUT;
    case GRPC_STATUS_UNAVAILABLE: return KVDEX_EUNAVAIL;
    case GRPC_STATUS_UNIMPLEMENTED: return KVDEX_EUNIMPL;
    case GRPC_STATUS_UNAUTHENTICATED: return KVDEX_EUNAUTH;
    case GRPC_STATUS_PERMISSION_DENIED: return KVDEX_EPERM;
    default: return KVDEX_EINTERNAL;
  }
}

const char *kvdex_wire_status_name(grpc_status_code status) {
  static const char *const names[] = {
      "OK",        "CANCELLED",          "UNKNOWN",           "INVALID_ARGUMENT",
      "DEADLINE_EXCEEDED", "NOT_FOUND",  "ALREADY_EXISTS",    "PERMISSION_DENIED",
      "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL",       "UNAVAILABLE",       "DATA_LOSS",
      "UNAUTHENTICATED"};
  return (unsigned)status < sizeof names / sizeof *names ? names[status] : "?";
}

void kvdex_wire_shape_to_pb(const kvdex_shape *in, Kvdex__V1__Shape *out) {
  out->n_layers = in->n_layers;
  out->n_kv_heads = in->n_kv_heads;
  out->n_q_heads = in->n_q_heads;
  out->head_dim = in->head_dim;
  out->block_tokens = in->block_tokens;
  out->dtype = (Kvdex__V1__DType)in->dtype;
}

void kvdex_wire_shape_from_pb(const Kvdex__V1__Shape *in, kvdex_shape *out) {
  out->n_layers = in->n_layers;
  out->n_kv_heads = in->n_kv_heads;
  out->n_q_heads = in->n_q_heads;
  out->head_dim = in->head_dim;
  out->block_tokens = in->block_tokens;
  out->dtype = (int)in->dtype;
}

const char *kvdex_wire_namespace(const char *ns) {
  return (ns && ns[0]) ? ns : KVDEX_DEFAULT_NAMESPACE;
}
