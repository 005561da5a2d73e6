/* kvstore: the CPU-memory KV store. namespace -> sequence -> layer -> KV head ->
 * token blocks (paged, `block_tokens` per block), f32/f16/bf16, every byte
 * accounted against a node memory cap, KV memory from a jemalloc arena.
 * It knows nothing of gRPC or of retrieval; index/ reads the blocks it exposes.
 *
 * Threading: every function here is thread-safe. Readers (views) see only committed
 * tokens; an append transaction writes beyond the committed length and publishes
 * atomically on commit, so searches run during appends.
 *
 * Besides K and V a sequence keeps, per layer, a bounded sample of the prefill
 * queries (for attention-aware indexes), caller-given landmark keys (one per block,
 * for landmark indexes) and a few opaque attachments: objects other
 * modules hang on a (sequence, layer), such as retrieval indexes. The store counts
 * their bytes against its cap and frees them with the sequence, without knowing
 * what they are.
 */
#ifndef KVDEX_KVSTORE_H
#define KVDEX_KVSTORE_H

#include <stddef.h>
#include <stdint.h>

#include "kvstore/base.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The limits of names and shapes (KVDEX_MAX_*), kvdex__shape_check and
 * kvdex__name_check are in kvstore/kvdex_base.h and kvstore/base.h. */

typedef struct kvdex_store kvdex_store;
typedef struct kvdex_seq kvdex_seq;
typedef struct kvdex_txn kvdex_txn;

/* Creates a store that may hold at most `memory_cap` accounted bytes (0 = no cap). */
int kvdex_store_create(uint64_t memory_cap, kvdex_store **out /* OUT */);
/* Frees every sequence, referenced or not: every kvdex_seq, view and kvdex_txn of this
 * store becomes invalid. NULL is a no-op. No other call may be in flight. */
void kvdex_store_destroy(kvdex_store *store);

typedef struct kvdex_store_stats {
  uint64_t bytes_used;      /* accounted bytes: K/V blocks, block pointer arrays,
                               per-sequence metadata, prefill queries, landmarks and
                               attachments, staged tokens included (the store's own
                               small fixed structures are not counted) */
  uint64_t bytes_cap;       /* 0 = unlimited */
  uint64_t n_sequences;
  uint64_t allocator_bytes; /* bytes the KV allocator reports live (jemalloc arena stats,
                               size-class rounded; under ASan builds the sum of requested
                               sizes). Everything but attachments comes from it, so with
                               no attachment it is >= bytes_used (== under ASan);
                               attachments live in their owners' memory and count in
                               bytes_used only */
} kvdex_store_stats;
void kvdex_store_stats_get(kvdex_store *store, kvdex_store_stats *out /* OUT */);

/* Creates an empty sequence. KVDEX_EEXIST if (ns, id) exists, KVDEX_EINVAL for a bad
 * shape or name, KVDEX_ENOMEM if its metadata would exceed the cap. */
int kvdex_seq_create(kvdex_store *store, const char *ns, const char *seq_id,
                     const kvdex_shape *shape);
/* kvdex_seq_create, and with importing != 0 the sequence starts hidden: a copy being
 * imported from another node (repair, rebalance). The store itself treats it like any
 * other sequence; the server answers reads of it as if it did not exist, so that a
 * client fails over to a complete copy, until kvdex_seq_publish. */
int kvdex_seq_create_ex(kvdex_store *store, const char *ns, const char *seq_id,
                        const kvdex_shape *shape, int importing);
/* 1 while a sequence created importing has not been published, else 0. */
int kvdex_seq_importing(const kvdex_seq *seq);
/* Makes an importing sequence visible (a no-op for a visible one); never fails. */
void kvdex_seq_publish(kvdex_seq *seq);

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
/* Takes one more reference on a sequence the caller already holds a reference to
 * (to hand it to another thread); release it with kvdex_seq_release. */
void kvdex_seq_retain(kvdex_seq *seq);
/* 1 once kvdex_seq_delete has removed the sequence (it may still be referenced), else 0. */
int kvdex_seq_deleted(const kvdex_seq *seq);

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

/* ---- Prefill queries ----------------------------------------------------------- */

/* Most tokens whose queries one layer keeps. */
#define KVDEX_MAX_QUERY_TOKENS 4096

/* Stages the prefill queries of tokens [token_start, token_start + n_tokens) of
 * `layer`: q is in the sequence dtype, layout [n_q_heads][n_tokens][head_dim] (all
 * query heads; query head h belongs to kv head h / (n_q_heads / n_kv_heads)). The
 * tokens must already be in the layer (committed, or staged by this transaction):
 * KVDEX_EINVAL otherwise.
 * Subsampling: a layer keeps the queries of token t only when t is a multiple of its
 * stride, a power of two that starts at 1 and doubles (dropping the tokens that are no
 * longer multiples) whenever more than KVDEX_MAX_QUERY_TOKENS tokens would be kept; so
 * the sample is evenly spread over the layer and does not depend on how the tokens
 * were split into appends. Queries of a token that already has them are compared:
 * identical -> replay, different -> KVDEX_ECONFLICT. Their bytes (rows of all query
 * heads of each kept token) count against the memory cap from here on; a layer that
 * gains queries is copied when the transaction first touches it, so until commit
 * the old and the new sample are both counted. Failures poison the transaction like
 * kvdex_txn_append; a failed call stages nothing. Committed with the transaction. */
int kvdex_txn_append_q(kvdex_txn *txn, uint32_t layer, uint64_t token_start,
                       uint32_t n_tokens, const void *q);

/* Committed query tokens kept by `layer` (0 if none or layer out of range). */
uint64_t kvdex_seq_query_tokens(kvdex_seq *seq, uint32_t layer);

/* Copies the committed queries kept for `layer`, query heads [q_head0, q_head0 +
 * n_heads), converted to f32, into a malloc'ed array [n_heads][*n_tokens][head_dim]
 * (rows in ascending token order), which the caller frees with free(). With no kept
 * query, *out is NULL and *n_tokens 0. ids (may be NULL) receives a malloc'ed array of
 * the *n_tokens token ids, also freed with free(). KVDEX_EINVAL for bad indices,
 * KVDEX_ENOMEM (nothing returned). The copy is a consistent snapshot. */
int kvdex_seq_queries(kvdex_seq *seq, uint32_t layer, uint32_t q_head0, uint32_t n_heads,
                      float **out /* OUT */, uint64_t *n_tokens /* OUT */,
                      uint64_t **ids /* OUT, may be NULL */);

/* ---- Caller-given landmark keys ------------------------------------------------- */

/* Landmark Attention models emit one landmark key per block of tokens; a layer keeps
 * them per kv head, in the sequence dtype, for the retrieval index
 * "landmark:mode=given". Block b of a layer holds tokens [b*B, (b+1)*B) with
 * B = shape.block_tokens, and its landmark is sent with the append whose token range
 * contains the block's last token.
 *
 * Stages the landmarks of the blocks that end inside tokens [token_start, token_start +
 * n_tokens) of `layer`, i.e. blocks b with token_start < (b+1)*B <= token_start +
 * n_tokens: n_blocks = floor((token_start + n_tokens) / B) - floor(token_start / B),
 * possibly 0 (then this is a no-op and landmarks may be NULL). landmarks: sequence
 * dtype, layout [n_kv_heads][n_blocks][head_dim]. The tokens must already be in the
 * layer (committed, or staged by this transaction): KVDEX_EINVAL otherwise, and for a
 * non-finite element (inf or NaN). A layer's landmarks are contiguous from block 0:
 *   - a block that has one is compared: identical -> replay, different ->
 *     KVDEX_ECONFLICT;
 *   - landmarks for blocks after one that has none (its tokens were appended without
 *     landmarks) -> KVDEX_ECONFLICT, naming the missing blocks. Re-sending those tokens
 *     (an identical K/V replay) with their landmarks fills the hole.
 * So kvdex_seq_landmark_blocks(layer) <= floor(committed tokens / B): blocks appended
 * without landmarks, and the incomplete last block, have none.
 * Their bytes count against the memory cap from here on (KVDEX_ENOMEM): a layer's
 * landmarks are one array, grown by doubling into a copy that replaces it at commit
 * (until then both are counted). Failures poison the transaction like
 * kvdex_txn_append; a failed call stages nothing. Committed with the transaction. */
int kvdex_txn_append_landmarks(kvdex_txn *txn, uint32_t layer, uint64_t token_start,
                               uint32_t n_tokens, const void *landmarks);

/* Committed landmark blocks of `layer`: blocks [0, result) have a landmark (0 if none
 * or layer out of range). Never more than floor(kvdex_seq_tokens(layer) / B) as seen
 * by a later call: landmarks are published after their tokens. */
uint64_t kvdex_seq_landmark_blocks(kvdex_seq *seq, uint32_t layer);

/* Copies the committed landmarks of (layer, kv_head), blocks [0, min(max_blocks,
 * committed landmark blocks)), converted to f32, into out[*n_blocks][head_dim] (the
 * caller's buffer, room for max_blocks rows; may be NULL when max_blocks is 0).
 * Landmarks never change or go away once committed, so a count read earlier with
 * kvdex_seq_landmark_blocks can be copied in full later. KVDEX_EINVAL for bad
 * indices or a NULL argument. */
int kvdex_seq_landmarks(kvdex_seq *seq, uint32_t layer, uint32_t kv_head, uint64_t max_blocks,
                        float *out /* OUT */, uint64_t *n_blocks /* OUT */);

/* ---- Attachments: opaque per-(sequence, layer) objects of other modules ---------- */

/* Slots per layer. Their use is up to the modules that attach (workers/indexer.h
 * documents the ones it takes). */
#define KVDEX_ATTACH_SLOTS 4

typedef struct kvdex_attachment kvdex_attachment;
typedef void (*kvdex_attach_free_fn)(void *obj);

/* Attaches obj to (layer, slot) of seq, reserving `bytes` against the store's memory
 * cap; they count in kvdex_seq_bytes and the store's bytes_used. The slot's previous
 * attachment (if any) is detached: it is freed (free_fn(obj), may be NULL) and its
 * bytes returned once no kvdex_attachment_get reference to it remains. obj NULL just
 * detaches (bytes must then be 0). The sequence frees its attachments when it is freed.
 * On failure nothing changes and obj still belongs to the caller:
 * KVDEX_EINVAL (bad layer or slot), KVDEX_ENOMEM (the cap; the previous attachment's
 * bytes are not counted as free for this check: it may still be in use),
 * KVDEX_ENOTFOUND (the sequence was deleted). */
int kvdex_seq_attach(kvdex_seq *seq, uint32_t layer, uint32_t slot, void *obj, uint64_t bytes,
                     kvdex_attach_free_fn free_fn);
/* Like kvdex_seq_attach, but only when the slot currently holds `expect` (an object
 * pointer, or NULL for an empty slot): KVDEX_ECONFLICT otherwise, nothing changed. */
int kvdex_seq_attach_if(kvdex_seq *seq, uint32_t layer, uint32_t slot, const void *expect,
                        void *obj, uint64_t bytes, kvdex_attach_free_fn free_fn);

/* Takes a reference to the attachment of (layer, slot): *out is NULL (and 0 returned)
 * when the slot is empty. The object stays valid until kvdex_attachment_release, even
 * if it is replaced or detached meanwhile or the sequence is deleted: the reference
 * also holds the sequence. KVDEX_EINVAL for bad indices. */
int kvdex_attachment_get(kvdex_seq *seq, uint32_t layer, uint32_t slot,
                         kvdex_attachment **out /* OUT */);
void *kvdex_attachment_obj(const kvdex_attachment *att);
uint64_t kvdex_attachment_bytes(const kvdex_attachment *att);
void kvdex_attachment_release(kvdex_attachment *att); /* NULL is a no-op */

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_KVSTORE_H */
