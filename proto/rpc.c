/* rpc: the method table of kvdex.v1 and protobuf-c messages on gRPC byte buffers. */
#include "proto/rpc.h"

#include <stdlib.h>

#include <grpc/byte_buffer_reader.h>

#include "kvstore/base.h"

const kvdex_rpc_method_info kvdex_rpc_methods[KVDEX_RPC_COUNT] = {
    [KVDEX_RPC_CREATE] = {"/kvdex.v1.KVStore/CreateSequence", "CreateSequence", 0, 0},
    [KVDEX_RPC_DELETE] = {"/kvdex.v1.KVStore/DeleteSequence", "DeleteSequence", 0, 0},
    [KVDEX_RPC_STAT] = {"/kvdex.v1.KVStore/StatSequence", "StatSequence", 0, 0},
    [KVDEX_RPC_LIST] = {"/kvdex.v1.KVStore/ListSequences", "ListSequences", 0, 0},
    [KVDEX_RPC_APPEND] = {"/kvdex.v1.KVStore/AppendKV", "AppendKV", 1, 0},
    [KVDEX_RPC_READ] = {"/kvdex.v1.KVStore/ReadKV", "ReadKV", 0, 1},
    [KVDEX_RPC_SEARCH] = {"/kvdex.v1.Retrieval/Search", "Search", 0, 0},
    [KVDEX_RPC_BUILD] = {"/kvdex.v1.Retrieval/BuildIndex", "BuildIndex", 0, 0},
    [KVDEX_RPC_ATTEND] = {"/kvdex.v1.Retrieval/Attend", "Attend", 0, 0},
    [KVDEX_RPC_RETAIN] = {"/kvdex.v1.Retrieval/Retain", "Retain", 0, 0},
    [KVDEX_RPC_PUBLISH] = {"/kvdex.v1.KVStore/PublishSequence", "PublishSequence", 0, 0},
    [KVDEX_RPC_HEALTH_CHECK] = {"/grpc.health.v1.Health/Check", "Health/Check", 0, 0},
};

int kvdex_rpc_pack(const ProtobufCMessage *m, uint64_t max_bytes, grpc_byte_buffer **out) {
  size_t n = protobuf_c_message_get_packed_size(m);
  if (max_bytes && n > max_bytes)
    return kvdex__seterr(KVDEX_ENOMEM,
                         "a message of %zu bytes exceeds the max message size (%llu bytes)", n,
                         (unsigned long long)max_bytes);
  grpc_slice s;
  if (n == 0) {
    s = grpc_empty_slice();
  } else {
    /* malloc, not grpc_slice_malloc: that one aborts the process when memory runs out. */
    uint8_t *buf = malloc(n);
    if (!buf) return kvdex__seterr(KVDEX_ENOMEM, "out of memory packing %zu bytes", n);
    protobuf_c_message_pack(m, buf);
    s = grpc_slice_new(buf, n, free);
  }
  *out = grpc_raw_byte_buffer_create(&s, 1);
  grpc_slice_unref(s);
  return KVDEX_OK;
}

int kvdex_rpc_bb_slice(grpc_byte_buffer *bb, grpc_slice *out) {
  if (bb->type == GRPC_BB_RAW && bb->data.raw.compression == GRPC_COMPRESS_NONE &&
      bb->data.raw.slice_buffer.count == 1) {
    *out = grpc_slice_ref(bb->data.raw.slice_buffer.slices[0]);
    return KVDEX_OK;
  }
  grpc_byte_buffer_reader r;
  if (!grpc_byte_buffer_reader_init(&r, bb))
    return kvdex__seterr(KVDEX_EINVAL, "cannot decompress the message");
  *out = grpc_byte_buffer_reader_readall(&r);
  grpc_byte_buffer_reader_destroy(&r);
  return KVDEX_OK;
}

void *kvdex_rpc_unpack(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb) {
  grpc_slice s;
  if (kvdex_rpc_bb_slice(bb, &s)) return NULL;
  ProtobufCMessage *m =
      protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
  grpc_slice_unref(s);
  if (!m) kvdex__seterr(KVDEX_EINVAL, "cannot parse %s", d->short_name);
  return m;
}
