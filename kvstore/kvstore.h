/* kvstore: the CPU-memory KV store. namespace -> sequence -> layer -> KV head ->
 * token blocks (paged, `block_tokens` per block), f32/f16/bf16, every byte
 * accounted against a node memory cap, KV memory from a jemalloc arena.
 * It knows nothing of gRPC or of retrieval; index/ reads the blocks it exposes.
 *
 * Threading: every function here is thread-safe. Readers (views) see only committed
 * tokens; an append transaction writes beyond the committed length and publishes
 * atomically on commit, so searches run during appends.
 */
#ifndef KVDEX_KVSTORE_H
#define KVDEX_KVSTORE_H

#include <stddef.h>
#include <stdint.h>

#include "kvstore/base.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVDEX_MAX_NAMESPACE 64
#define KVDEX_MAX_SEQ_ID 256
#define KVDEX_MAX_LAYERS 1024
#define KVDEX_MAX_HEADS 1024
#define KVDEX_MAX_HEAD_DIM 1024
#define KVDEX_MAX_BLOCK_TOKENS 65536
#define KVDEX_DEFAULT_BLOCK_TOKENS 64
#define KVDEX_DEFAULT_NAMESPACE "default"

/* kvdex_shape (the model shape of a sequence) is defined in kvstore/base.h. */

/* Validates a shape (bounds above, GQA divisibility, known dtype). 0 or KVDEX_EINVAL. */
int kvdex_shape_check(const kvdex_shape *shape);

/* Validates a namespace / sequence id (lengths and characters, see kvdex.proto).
 * An empty or NULL namespace is valid and means KVDEX_DEFAULT_NAMESPACE. */
int kvdex_name_check(const char *ns, const char *seq_id);

typedef struct kvdex_store kvdex_store;
typedef struct kvdex_seq kvdex_seq;
typedef struct kvdex_txn kvdex_txn;

/* Creates a store that may hold at most `memory_cap` accounted bytes (0 = no cap). */
int kvdex_store_create(uint64_t memory_cap, kvdex_store **out /* OUT */);
/* Frees every sequence, referenced or not: every kvdex_seq, view and kvdex_txn of this
 * store becomes invalid. NULL is a no-op. No other call may be in flight. */
void kvdex_store_destroy(kvdex_store *store);

typedef struct kvdex_store_stats {
  uint64_t bytes_used;      /* accounted bytes: K/V blocks, block pointer arrays and
                               per-sequence metadata, staged tokens included (the
                               store's own small fixed structures are not counted) */
  uint64_t bytes_cap;       /* 0 = unlimited */
  uint64_t n_sequences;
  uint64_t allocator_bytes; /* bytes the KV allocator reports live (jemalloc arena stats,
                               size-class rounded, so >= bytes_used; under ASan builds
                               the sum of requested sizes, == bytes_used) */
} kvdex_store_stats;
void kvdex_store_stats_get(kvdex_store *store, kvdex_store_stats *out /* OUT */);

/* Creates an empty sequence. KVDEX_EEXIST if (ns, id) exists, KVDEX_EINVAL for a bad
 * shape or name, KVDEX_ENOMEM if its metadata would exceed the cap. */
int kvdex_seq_create(kvdex_store *store, const char *ns, const char *seq_id,
                     const kvdex_shape *shape);

/* Removes a sequence from the store at once (the name can be created again right
 * away) and returns its memory once the last reference is released. *bytes_freed (may
 * be NULL) gets its accounted bytes at the time of the call. KVDEX_ENOTFOUND if absent.
 * An open transaction on it fails from then on (KVDEX_ENOTFOUND). */
int kvdex_seq_delete(kvdex_store *store, const char *ns, const char *seq_id,
                     uint64_t *bytes_freed /* OUT */);

/* Looks a sequence up and takes a reference: it stays readable (even if deleted
 * meanwhile) until kvdex_seq_release. KVDEX_ENOTFOUND if absent. */
int kvdex_seq_open(kvdex_store *store, const char *ns, const char *seq_id,
                   kvdex_seq **out /* OUT */);
void kvdex_seq_release(kvdex_seq *seq); /* NULL is a no-op */

/* The shape as created, with block_tokens 0 resolved to KVDEX_DEFAULT_BLOCK_TOKENS. */
const kvdex_shape *kvdex_seq_shape(const kvdex_seq *seq);
const char *kvdex_seq_namespace(const kvdex_seq *seq);
const char *kvdex_seq_id(const kvdex_seq *seq);
/* Committed tokens of a layer (0 if layer >= n_layers). */
uint64_t kvdex_seq_tokens(kvdex_seq *seq, uint32_t layer);
/* Accounted bytes of this sequence (staged tokens of an open transaction included). */
uint64_t kvdex_seq_bytes(kvdex_seq *seq);

/* Calls fn for every sequence (only namespace ns; NULL or "" = every namespace) with a
 * reference held for the duration of the call. Order is unspecified. No store lock is
 * held while fn runs: it may create, open and delete sequences (sequences created
 * meanwhile may or may not be visited). */
typedef void (*kvdex_seq_visit_fn)(void *ctx, kvdex_seq *seq);
void kvdex_store_list(kvdex_store *store, const char *ns, kvdex_seq_visit_fn fn, void *ctx);

/* ---- Reading: a view of the committed tokens of one (layer, kv head) ---------- */

/* A snapshot of one (layer, kv head): n_tokens committed tokens stored in blocks of
 * block_tokens rows; block b holds tokens [b*block_tokens, (b+1)*block_tokens).
 * k_blocks[b] / v_blocks[b] point at block_tokens * head_dim elements of dtype,
 * row-major [token][dim]. Valid while the caller holds the kvdex_seq reference:
 * committed rows never change and blocks are never moved or freed before delete.
 * Blocks are 64-byte aligned. In the last block, rows at or beyond n_tokens may be
 * written concurrently by an append: read only rows below n_tokens. With n_tokens 0,
 * k_blocks and v_blocks may be NULL. */
typedef struct kvdex_kv_view {
  uint64_t n_tokens;
  uint32_t block_tokens;
  uint32_t head_dim;
  int dtype;
  const void *const *k_blocks;
  const void *const *v_blocks;
} kvdex_kv_view;

/* Fills *out for (layer, kv_head). The block pointer arrays point into the store
 * and stay valid while the sequence reference is held: they grow by replacement and
 * old arrays are kept until the sequence is freed. KVDEX_EINVAL on bad indices. */
int kvdex_seq_view(kvdex_seq *seq, uint32_t layer, uint32_t kv_head, kvdex_kv_view *out /* OUT */);

/* Copies K and V rows of the given tokens of (layer, all kv heads) into k_out/v_out,
 * layout [n_kv_heads][n][head_dim] of the sequence dtype; one of k_out/v_out may be
 * NULL to skip it. Every id must be below the committed length (KVDEX_EINVAL
 * otherwise, nothing written). n == 0 is a no-op. */
int kvdex_seq_read(kvdex_seq *seq, uint32_t layer, const uint64_t *token_ids, size_t n,
                   void *k_out, void *v_out);

/* ---- Writing: append transactions -------------------------------------------- */

/* Begins an append transaction on a sequence (holds a reference of its own, so the
 * caller may release seq). Only one transaction per sequence at a time: KVDEX_EBUSY
 * otherwise; KVDEX_ENOTFOUND if the sequence was deleted. The transaction belongs to
 * one thread at a time; it is invalid after commit or abort. */
int kvdex_txn_begin(kvdex_seq *seq, kvdex_txn **out /* OUT */);

/* Stages tokens [token_start, token_start + n_tokens) of `layer` for all KV heads.
 * k and v: sequence dtype, layout [n_kv_heads][n_tokens][head_dim].
 * Idempotent: the part below the layer's length (committed + staged) is compared
 * byte for byte: identical -> counted as replayed; different -> KVDEX_ECONFLICT.
 * token_start beyond that length -> KVDEX_ECONFLICT (gap). Memory for new tokens is
 * reserved here: KVDEX_ENOMEM when the cap would be exceeded. On any failure the
 * transaction is poisoned: it stays open, later appends return the first failure's
 * code, and commit returns it and aborts. A failed append itself stages nothing. */
int kvdex_txn_append(kvdex_txn *txn, uint32_t layer, uint64_t token_start, uint32_t n_tokens,
                     const void *k, const void *v);

typedef struct kvdex_txn_result {
  uint64_t tokens_appended; /* new tokens, summed over layers */
  uint64_t tokens_replayed; /* identical re-sent tokens, summed over layers */
} kvdex_txn_result;

/* Publishes everything staged and ends the transaction. Fails (and aborts) if the
 * transaction was poisoned, returning the code of the first failure, or with
 * KVDEX_ENOTFOUND if the sequence was deleted meanwhile. Each layer's new length is
 * published atomically, after its rows (release ordering); layers are published one
 * after another, so a reader may briefly see layer 0's new length before layer 1's. */
int kvdex_txn_commit(kvdex_txn *txn, kvdex_txn_result *result /* OUT, may be NULL */);
/* Discards everything staged, returns its memory, ends the transaction. NULL: no-op. */
void kvdex_txn_abort(kvdex_txn *txn);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_KVSTORE_H */
