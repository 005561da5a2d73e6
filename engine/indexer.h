/* indexer: retrieval indexes for the sequences of a kvdex_store — built in the
 * background, searched with an exact scan of the tokens appended since.
 *
 * One index per (layer, kv head), made by index/ann.h (kvdex_index_create/build) from
 * the committed tokens of the layer when its build starts, with the layer's prefill
 * queries (kvdex_seq_queries) of the kv head's GQA group as training queries and,
 * for "landmark:mode=given", the kv head's landmark keys (kvdex_seq_landmarks). A
 * layer's indexes are published together, atomically, as one kvstore attachment
 * (slot KVDEX_INDEXER_SLOT_SET), so their bytes count against the store's memory cap
 * and they are freed with their sequence; a second attachment (slot
 * KVDEX_INDEXER_SLOT_STATE, a small fixed record not counted against the cap, so that
 * a failed build leaves the accounting exactly as it was) records the state of the
 * layer's latest build.
 * Part of the node engine (engine/node.h), which the gRPC server and the embedded
 * client call. It owns its build threads, not the store or the pool. It never prints.
 *
 * Threading: every function is thread-safe. A search holds a reference on the index
 * set it uses, so a rebuild or a delete never pulls it from under a search.
 */
#ifndef KVDEX_INDEXER_H
#define KVDEX_INDEXER_H

#include <stddef.h>
#include <stdint.h>

#include "index/ann.h"
#include "index/index.h"
#include "kvstore/kvstore.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The kvstore attachment slots (per layer) this module takes. */
#define KVDEX_INDEXER_SLOT_SET 0   /* the ready index set: what searches use */
#define KVDEX_INDEXER_SLOT_STATE 1 /* the state of the latest build */


/* Longest spec accepted (index/ann.c's limit) plus its NUL: the size of
 * kvdex_layer_index's text fields. */
#define KVDEX_INDEXER_TEXT 512

typedef struct kvdex_indexer kvdex_indexer;

/* Starts n_threads build threads (0 = 1). Builds run one per thread; each build is
 * itself parallel on `pool` (may be NULL: one thread). Why threads of our own rather
 * than libuv's uv_queue_work: the latter may only be called on its loop's thread (so a
 * gRPC worker would need a uv_async hand-off plus a locked queue anyway), runs on
 * libuv's process-wide pool shared with file I/O and sized by UV_THREADPOOL_SIZE, and
 * would force a libuv loop into the embedded client. KVDEX_ENOMEM / KVDEX_EINTERNAL. */
int kvdex_indexer_create(kvdex_pool *pool, unsigned n_threads, kvdex_indexer **out /* OUT */);

/* Stops the build threads: queued builds are cancelled (their layers show FAILED,
 * "CANCELLED: ..."), a running one stops at its next kv head (an index build in progress
 * is not interrupted, so this may wait for one). Releases every sequence reference
 * it held. NULL is a no-op. Call it before destroying the store or the pool. */
void kvdex_indexer_destroy(kvdex_indexer *ixr);

/* Queues a build of `layer` (or of every layer with tokens, for
 * KVDEX_ALL_LAYERS) of seq with `spec` (ann.h: "graph:degree=32",
 * "ivf:nlist=256", "hnsw:M=32", "landmark:mode=minmax", ...) and returns at once; the
 * layers show BUILDING from here on. The build covers the tokens committed when it
 * starts, except "landmark:mode=given": it covers the complete blocks that have
 * landmarks, tokens [0, n_lm * block_tokens) with n_lm = min(kvdex_seq_landmark_blocks,
 * committed / block_tokens) at its start (searches scan the rest exactly), and is
 * built from those landmarks (blocks of the shape's block_tokens; a spec "block=" that
 * differs fails the build with INVALID_ARGUMENT).
 * layers[0..*n_queued) (both may be NULL) get the layers queued, ascending.
 * All or nothing: KVDEX_EINVAL (bad spec, with the parser's message; layer out of
 * range), KVDEX_ECONFLICT (the layer has no committed tokens; for all layers: none
 * has; "landmark:mode=given" and a layer to build, with tokens, has no landmark:
 * "... has no landmarks ..."), KVDEX_EBUSY (a build of one of the layers is queued or
 * running), KVDEX_ENOTFOUND (seq deleted), KVDEX_EUNAVAIL (the indexer is stopping),
 * KVDEX_ENOMEM. When the build ends, the layer is READY (its new index set replaced
 * the old one atomically) or FAILED with a message: a failed build changes nothing
 * else (an older ready index stays in use), e.g. when publishing the index would pass
 * the memory cap ("RESOURCE_EXHAUSTED: ..."). A build whose sequence is deleted
 * meanwhile is discarded. The index's working memory during the build is not
 * counted against the cap; its final size is, from publication on. */
int kvdex_indexer_build(kvdex_indexer *ixr, kvdex_seq *seq, uint32_t layer, const char *spec,
                        uint32_t *layers /* OUT, room for n_layers, may be NULL */,
                        uint32_t *n_queued /* OUT, may be NULL */);


/* Fills *out for one layer (kvdex_layer_index of <kvdex/kvdex_base.h>, the record
 * kvdex_stat reports: zeroed but for `layer`, state KVDEX_INDEX_NONE, when nothing was
 * ever built). KVDEX_EINVAL for a bad layer. */
int kvdex_indexer_info_get(kvdex_indexer *ixr, kvdex_seq *seq, uint32_t layer,
                           kvdex_layer_index *out /* OUT */);

/* Top-k for all query heads of one layer, like kvdex_exact_search (same q layout,
 * options, result and errors), choosing how by `index`:
 *   NULL, "" or "exact"  the exact scan;
 *   "auto"               the layer's ready index set if there is one, else exact;
 *   a kind ("graph", "ivf", "hnsw", "landmark", "exact"): the ready set, which must be
 *                        of that kind: KVDEX_ECONFLICT otherwise (none ready, another
 *                        kind), KVDEX_EINVAL for an unknown kind.
 * With an index: query head h searches the index of its kv head for k + sinks +
 * window candidates (params overrides ef/nprobe/blocks, may be NULL), keeps those in
 * [sinks, n - window), and merges them with an exact scan of the eligible tokens
 * appended after the build ([max(sinks, built), n - window)), so new tokens are
 * never missed. Hits are the best k of those candidates; fewer than k only when the
 * index returns fewer. res->keys_scanned counts the keys the index scored (summed
 * over query heads) plus the tail keys scanned (once per kv head). *used (may be
 * NULL) gets "exact" or the kind used (a static string). The kv heads are searched
 * in parallel on the indexer's pool, each task with an index scratch the indexer keeps
 * for reuse. */
int kvdex_indexer_search(kvdex_indexer *ixr, kvdex_seq *seq, uint32_t layer, const float *q,
                         const kvdex_search_opts *opts, const char *index,
                         const kvdex_index_params *params, kvdex_search_result *res /* OUT */,
                         const char **used /* OUT */);

/* Checks a search's `index` argument without a sequence: 0 for NULL, "", "exact",
 * "auto" and known kinds, else KVDEX_EINVAL with a message. */
int kvdex_indexer_check_index(const char *index);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_INDEXER_H */
