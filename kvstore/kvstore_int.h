/* kvstore internals that kvstore's own tests (and nothing public) may use: access to a
 * store's allocator for fault injection and allocator statistics. The data structures
 * themselves are private to kvstore.c. Not installed; C and C++ safe.
 */
#ifndef KVDEX_KVSTORE_INT_H
#define KVDEX_KVSTORE_INT_H

#include "kvstore/alloc.h"
#include "kvstore/kvstore.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The allocator every accounted byte of `store` comes from (blocks, block pointer
 * arrays, sequence metadata). Valid until kvdex_store_destroy. */
kvdex__alloc *kvdex__store_alloc(kvdex_store *store);

/* Bytes of one K+V block pair of a sequence (both blocks, each padded to
 * KVDEX__ALLOC_ALIGN): what one new block of one kv head costs. */
uint64_t kvdex__seq_block_pair_bytes(const kvdex_seq *seq);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_KVSTORE_INT_H */
