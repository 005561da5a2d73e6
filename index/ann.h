/* ann: one interface over every retrieval index of one (sequence, layer, kv head),
 * chosen by name with parameters, FAISS-factory style:
 *   "exact"                                  full scan (the ground truth)
 *   "ivf:nlist=1024,nprobe=32"               FAISS IVF-Flat, inner product (peer)
 *   "hnsw:M=32,ef=128,efc=200"               FAISS HNSW, inner product (peer)
 *   "graph:K=32,degree=32,ef=128"            attention-aware graph (RetrievalAttention)
 *   "landmark:mode=mean|minmax|given,blocks=64"  one representative per token block
 * An index never owns the keys: it is built from, and searches against, a
 * kvdex_kv_view of the store (FAISS peers keep their own f32 copy, as FAISS does;
 * that copy counts in kvdex_index_memory). Build is multi-threaded on a kvdex_pool;
 * search is reentrant (per-thread state lives in a kvdex_index_scratch).
 */
#ifndef KVDEX_ANN_H
#define KVDEX_ANN_H

#include <stddef.h>
#include <stdint.h>

#include "index/index.h"
#include "kvstore/kvstore.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvdex_index kvdex_index;
typedef struct kvdex_index_scratch kvdex_index_scratch;

/* Parses `spec` and makes an unbuilt index. KVDEX_EINVAL for an unknown kind or a
 * bad/unknown parameter, with a message listing what is accepted. */
int kvdex_index_create(const char *spec, kvdex_index **out /* OUT */);
void kvdex_index_destroy(kvdex_index *ix); /* NULL is a no-op */

/* Inputs of a build. keys: the committed tokens [0, keys->n_tokens) of one
 * (layer, kv head). train_q: optional prefill queries f32 [n_train][head_dim] (the
 * attention-aware graph uses them; without them it falls back to a key-only kNN
 * graph and says so in kvdex_index_describe). landmarks: optional caller-given
 * landmark keys f32 [ceil(n_tokens / landmark_block)][head_dim] for
 * landmark:mode=given. */
typedef struct kvdex_index_input {
  const kvdex_kv_view *keys;
  const float *train_q;
  uint64_t n_train;
  const float *landmarks;
  uint64_t n_landmarks;
  uint32_t landmark_block; /* tokens per landmark (0 = keys->block_tokens) */
} kvdex_index_input;

/* Builds (or rebuilds) the index. On failure the index is left unbuilt. */
int kvdex_index_build(kvdex_index *ix, const kvdex_index_input *in, kvdex_pool *pool);

/* Search-time overrides; 0 keeps the value given in the spec. */
typedef struct kvdex_index_params {
  uint32_t ef;     /* graph, hnsw: beam width */
  uint32_t nprobe; /* ivf: lists probed */
  uint32_t blocks; /* landmark: blocks selected */
} kvdex_index_params;

int kvdex_index_scratch_create(kvdex_index_scratch **out /* OUT */);
void kvdex_index_scratch_destroy(kvdex_index_scratch *s); /* NULL is a no-op */

/* Top-k of the built index for one f32 query [head_dim]. `keys` must be a view of
 * the same (layer, kv head) with at least the tokens the index was built on; only
 * tokens [0, built tokens) are searched (callers scan the tail exactly).
 * hits: room for k; *n_hits <= k, in kvdex_hit_better order; *touched: keys whose
 * score was computed (distance computations, FAISS's own counters for the peers).
 * params may be NULL. Thread-safe given distinct scratch objects. */
int kvdex_index_search(const kvdex_index *ix, const kvdex_kv_view *keys, const float *q, uint32_t k,
                       const kvdex_index_params *params, kvdex_index_scratch *scratch,
                       kvdex_hit *hits /* OUT */, uint32_t *n_hits /* OUT */,
                       uint64_t *touched /* OUT */);

/* Tokens the index was built on (0 before build). */
uint64_t kvdex_index_tokens(const kvdex_index *ix);
/* Bytes the index holds (graph, centroids, FAISS's copies...). */
size_t kvdex_index_memory(const kvdex_index *ix);
/* The kind ("graph", "ivf", ...). */
const char *kvdex_index_kind(const kvdex_index *ix);
/* 1 when building ix needs caller-given landmarks (kvdex_index_input.landmarks:
 * "landmark:mode=given"), else 0 (also for NULL). Known from the spec, before build. */
int kvdex_index_needs_landmarks(const kvdex_index *ix);
/* One line: normalised spec with every parameter, plus build notes, e.g.
 * "graph:K=32,degree=32,ef=128 (key-only kNN: no prefill queries)". */
const char *kvdex_index_describe(const kvdex_index *ix);

/* Serialises a built index (not the keys) into a malloc'ed buffer (caller frees).
 * Who calls these two: today only tests/ann (round trips of every kind). They are
 * kept for the disk tier (a node's evicted blocks and their indexes spill to local
 * files and are reloaded after a restart, without a rebuild) and for moving a built
 * index with a sequence between nodes. The frame (ann.c: magic, format version, kind,
 * spec, checksum) makes a buffer from another build or a torn file fail with
 * KVDEX_EINVAL instead of being read. */
int kvdex_index_serialize(const kvdex_index *ix, void **buf /* OUT */, size_t *len /* OUT */);
/* Rebuilds an index from kvdex_index_serialize output. KVDEX_EINVAL if corrupt. */
int kvdex_index_deserialize(const void *buf, size_t len, kvdex_index **out /* OUT */);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_ANN_H */
