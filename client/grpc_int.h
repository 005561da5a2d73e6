/* grpc_int.h — private to client/: what the files of the remote transport share.
 * grpc_call.c runs one call on its own completion queue (begin, batches, status,
 * unary); grpc.c is the transport (the vtable ops, the shape cache, open/close);
 * grpc_admin.c is what the cluster needs beyond the vtable (listing a node, copies
 * between nodes, checksums). Nothing here is part of the public API.
 */
#ifndef KVDEX_GRPC_INT_H
#define KVDEX_GRPC_INT_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>

#include "client/client_int.h"
#include "kvdex/v1/kvdex.pb-c.h"
#include "proto/rpc.h"
#include "proto/wire.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Payload bytes (K + V) per AppendKV / ReadKV message: larger appends are split by
 * token range, reads ask for fewer tokens per message. A quarter of the server's
 * default max message, so that a server with a smaller limit still takes them. */
#define KVDEX__GRPC_MSG_BYTES ((size_t)KVDEX_RPC_DEFAULT_MAX_MESSAGE / 4)
#define KVDEX__GRPC_SHAPE_SLOTS 1024 /* direct-mapped: a collision replaces the entry */

typedef struct kvdex__grpc_shape_slot {
  char *id; /* NULL = empty */
  kvdex_shape shape;
} kvdex__grpc_shape_slot;

/* A grpc handle: one channel, thread-safe. */
typedef struct kvdex__grpc_db {
  kvdex_db base;
  grpc_channel *channel;
  void *method[KVDEX_RPC_COUNT]; /* grpc_channel_register_call handles */
  char target[300];
  uint32_t timeout_ms;
  grpc_metadata auth_md;    /* authorization: Bearer TOKEN, when has_auth */
  int has_auth;
  pthread_mutex_t cache_mu; /* guards cache */
  kvdex__grpc_shape_slot cache[KVDEX__GRPC_SHAPE_SLOTS];
} kvdex__grpc_db;

static inline kvdex__grpc_db *kvdex__grpc_as(kvdex_db *db) { return (kvdex__grpc_db *)db; }

/* ---- one call (grpc_call.c) ------------------------------------------------------- */

/* Batch tags: the ops of a call, and its separate status batch (streams). */
enum { KVDEX__GRPC_TAG_OPS = 1, KVDEX__GRPC_TAG_STATUS = 2 };

typedef struct kvdex__grpc_call {
  kvdex__grpc_db *g;
  int m; /* kvdex_rpc_method */
  grpc_completion_queue *cq;
  grpc_call *call;
  grpc_metadata_array init_md, trail_md;
  grpc_status_code status;
  grpc_slice details;
  const char *error_string;
  int status_started; /* a separate RECV_STATUS_ON_CLIENT batch is pending or done */
  int status_done;
} kvdex__grpc_call;

/* Creates call m on g's channel with its own completion queue; its deadline is the
 * handle's timeout, cut to the thread's deadline (kvdex__grpc_set_deadline).
 * kvdex__grpc_call_end must follow, whatever this returns. */
int kvdex__grpc_call_begin(kvdex__grpc_db *g, int m, kvdex__grpc_call *r /* OUT */);
/* Starts a batch of ops tagged `tag`. */
int kvdex__grpc_call_start(kvdex__grpc_call *r, const grpc_op *ops, size_t n, int tag);
/* Waits for batch `tag` and returns its success flag (bounded by the call's deadline). */
int kvdex__grpc_call_wait(kvdex__grpc_call *r, int tag);
/* Waits for the send batch of a stream whose status batch is pending; cancels the call
 * once the status is in (see grpc_call.c). Returns the send's success flag. */
int kvdex__grpc_call_wait_send(kvdex__grpc_call *r);
/* Fills a RECV_STATUS_ON_CLIENT op into r's status fields. */
void kvdex__grpc_call_fill_status(kvdex__grpc_call *r, grpc_op *op /* OUT */);
/* Starts the status batch of a streaming call (initial metadata + status). */
int kvdex__grpc_call_start_status(kvdex__grpc_call *r);
/* The received status as a kvdex code with its message (KVDEX_OK for OK). */
int kvdex__grpc_call_status_rc(kvdex__grpc_call *r);
/* Cancels what is pending and frees the call and its queue. */
void kvdex__grpc_call_end(kvdex__grpc_call *r);
/* Adds g's bearer token (if any) to a SEND_INITIAL_METADATA op. */
void kvdex__grpc_auth_op(const kvdex__grpc_db *g, grpc_op *op);
/* Fills ops[0..3) (zeroed by the caller) with what a unary request sends: initial
 * metadata with g's token, the message `send`, the half-close. Returns 3. */
size_t kvdex__grpc_send_request_ops(const kvdex__grpc_db *g, grpc_byte_buffer *send,
                                    grpc_op *ops);
/* Unpacks a response of call r: KVDEX_EINTERNAL "malformed ..." on garbage. */
int kvdex__grpc_unpack(kvdex__grpc_call *r, grpc_byte_buffer *bb,
                       const ProtobufCMessageDescriptor *desc, ProtobufCMessage **out /* OUT */);
/* One unary call: sends req, waits for status and response. *resp is set (free it
 * with protobuf_c_message_free_unpacked) only on success. */
int kvdex__grpc_unary(kvdex__grpc_db *g, int m, const ProtobufCMessage *req,
                      const ProtobufCMessageDescriptor *resp_desc,
                      ProtobufCMessage **resp /* OUT */);
/* Fills a SequenceRef that points at ns and seq_id (not copied). */
void kvdex__grpc_seq_ref_ns(Kvdex__V1__SequenceRef *ref /* OUT */, const char *ns,
                            const char *seq_id);

/* ---- the transport's pieces the admin calls use (grpc.c) ---------------------------- */

/* Forgets the cached shape of seq_id (in the handle's namespace). */
void kvdex__grpc_cache_drop(kvdex__grpc_db *g, const char *seq_id);
/* StatSequence of ns/seq_id (hidden copies too with include_importing); fills *shape,
 * and *info, *importing when not NULL. The shape is checked. */
int kvdex__grpc_stat_ns(kvdex__grpc_db *g, const char *ns, const char *seq_id,
                        int include_importing, kvdex_shape *shape /* OUT */,
                        kvdex_seq_info *info /* OUT, or NULL */, int *importing /* OUT, or NULL */);
/* CreateSequence of ns/seq_id; importing creates it hidden. */
int kvdex__grpc_create_ns(kvdex__grpc_db *g, const char *ns, const char *seq_id,
                          const kvdex_shape *shape, int importing);
/* Opens an AppendKV stream for ns/seq_id whose shape the caller knows; the appender is
 * driven through g's vtable (append_kv, append_commit, append_abort). */
int kvdex__grpc_append_begin_ns(kvdex__grpc_db *g, const char *ns, const char *seq_id,
                                const kvdex_shape *shape, kvdex_appender **out /* OUT */);
/* One ReadKV stream of ns/seq_id: the range [start, end) (if end > start) then ids;
 * with_q / with_lm add the layer's prefill queries and landmarks after the K/V.
 * fn is called for every message; a non-zero return stops the stream with it. */
typedef int (*kvdex__grpc_read_msg_fn)(void *ctx, const Kvdex__V1__ReadKVResponse *m);
int kvdex__grpc_read_stream(kvdex__grpc_db *g, const char *ns, const char *seq_id, uint32_t layer,
                            uint64_t start, uint64_t end, const uint64_t *ids, size_t n_ids,
                            int with_q, int with_lm, uint32_t per_msg,
                            kvdex__grpc_read_msg_fn fn, void *ctx);
/* Tokens per ReadKV message for a shape: KVDEX__GRPC_MSG_BYTES of K + V, at least 1,
 * at most KVDEX_RPC_READ_CHUNK_TOKENS. */
uint32_t kvdex__grpc_kv_per_msg(const kvdex_shape *s);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_GRPC_INT_H */
