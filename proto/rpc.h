/* rpc: kvdex.v1 calls on the gRPC C core, the part the server (workers/) and the
 * client (client/) must agree on: the method table (full paths, short names, which
 * side streams), the limits of the wire contract that both check (kvdex.proto
 * documents each), and protobuf-c messages <-> grpc_byte_buffer. No state, no I/O;
 * status codes and Shape messages are proto/wire.h.
 */
#ifndef KVDEX_RPC_H
#define KVDEX_RPC_H

#include <stddef.h>
#include <stdint.h>

#include <grpc/byte_buffer.h>
#include <grpc/slice.h>
#include <protobuf-c/protobuf-c.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- limits of the wire contract --------------------------------------------------- */

/* The server's default max message size (either direction); the client keeps its own
 * messages well below it. */
#define KVDEX_RPC_DEFAULT_MAX_MESSAGE (64u << 20)
/* ReadKV: tokens per response message when the request leaves max_tokens_per_message
 * at 0, and the most the client asks for. */
#define KVDEX_RPC_READ_CHUNK_TOKENS 4096
/* AttendRequest.items: 1..this many sequences in one call. */
#define KVDEX_RPC_MAX_ATTEND_ITEMS 4096
/* SearchOptions.k and AttendRequest.k (KVDEX_MAX_K), AttendItem.extra_tokens
 * (KVDEX_MAX_EXTRA_TOKENS) and RetainRequest.n_obs (KVDEX_MAX_OBS) are the API's own
 * limits: <kvdex/kvdex_base.h>, the same for the engine, the server and the client. */

/* ---- methods ---------------------------------------------------------------------- */

/* Every method kvdex serves, in the order of kvdex_rpc_methods. */
typedef enum kvdex_rpc_method {
  KVDEX_RPC_CREATE,
  KVDEX_RPC_DELETE,
  KVDEX_RPC_STAT,
  KVDEX_RPC_LIST,
  KVDEX_RPC_APPEND,
  KVDEX_RPC_READ,
  KVDEX_RPC_SEARCH,
  KVDEX_RPC_BUILD,
  KVDEX_RPC_ATTEND,
  KVDEX_RPC_RETAIN,
  KVDEX_RPC_PUBLISH,
  KVDEX_RPC_HEALTH_CHECK, /* grpc.health.v1.Health/Check */
  KVDEX_RPC_COUNT
} kvdex_rpc_method;

typedef struct kvdex_rpc_method_info {
  const char *path;     /* "/kvdex.v1.KVStore/AppendKV": what gRPC registers and sends */
  const char *name;     /* "AppendKV": messages and the metrics' method label */
  int client_streaming; /* requests are a stream (the server reads them one by one) */
  int server_streaming; /* responses are a stream */
} kvdex_rpc_method_info;

/* Indexed by kvdex_rpc_method. */
extern const kvdex_rpc_method_info kvdex_rpc_methods[KVDEX_RPC_COUNT];

/* ---- messages <-> byte buffers ----------------------------------------------------- */

/* Packs m into a new byte buffer (*out, the caller destroys it). KVDEX_ENOMEM, with
 * *out untouched, when the packed message is larger than max_bytes (0 = no limit) or
 * memory runs out. */
int kvdex_rpc_pack(const ProtobufCMessage *m, uint64_t max_bytes, grpc_byte_buffer **out /* OUT */);

/* The bytes of a received message as one slice (*out, the caller unrefs it): a
 * reference when the buffer is one uncompressed slice, a copy otherwise.
 * KVDEX_EINVAL when the buffer cannot be decompressed. */
int kvdex_rpc_bb_slice(grpc_byte_buffer *bb, grpc_slice *out /* OUT */);

/* Unpacks a received message of type d (free it with protobuf_c_message_free_unpacked).
 * NULL with KVDEX_EINVAL recorded ("cannot parse <d->short_name>") when bb cannot be
 * read or is not such a message. */
void *kvdex_rpc_unpack(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_RPC_H */
