/* ann_int.h — private to index/: how an index kind plugs into ann.h. Each kind
 * (exact, ivf, hnsw, graph, landmark) provides one kvdex__index_ops table; ann.c
 * parses specs, dispatches, and frames serialisation. Not installed.
 */
#ifndef KVDEX_ANN_INT_H
#define KVDEX_ANN_INT_H

#include <stddef.h>
#include <stdint.h>

#include "index/ann.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A growable byte buffer for serialisation. */
typedef struct kvdex__buf {
  uint8_t *data;
  size_t len, cap;
} kvdex__buf;
int kvdex__buf_put(kvdex__buf *b, const void *p, size_t n); /* KVDEX_ENOMEM on failure */

/* A cursor over serialised bytes; reads fail (KVDEX_EINVAL) past the end. */
typedef struct kvdex__rd {
  const uint8_t *p;
  size_t left;
} kvdex__rd;
int kvdex__rd_get(kvdex__rd *r, void *out, size_t n);

typedef struct kvdex__index_ops {
  const char *kind;
  /* Sets defaults into ix->impl (allocating it). */
  int (*init)(kvdex_index *ix);
  /* One "name=value" parameter of the spec; KVDEX_EINVAL for unknown/bad. */
  int (*param)(kvdex_index *ix, const char *name, const char *value);
  /* Writes the normalised spec ("graph:K=32,degree=32,ef=128") into buf. */
  void (*spec)(const kvdex_index *ix, char *buf, size_t len);
  int (*build)(kvdex_index *ix, const kvdex_index_input *in, kvdex_pool *pool);
  int (*search)(const kvdex_index *ix, const kvdex_kv_view *keys, const float *q, uint32_t k,
                const kvdex_index_params *params, kvdex_index_scratch *scratch, kvdex_hit *hits,
                uint32_t *n_hits, uint64_t *touched);
  size_t (*memory)(const kvdex_index *ix);
  /* Built state (after the framing ann.c writes: kind, spec, n_built, dim). */
  int (*save)(const kvdex_index *ix, kvdex__buf *out);
  int (*load)(kvdex_index *ix, kvdex__rd *in);
  void (*free)(kvdex_index *ix); /* frees ix->impl */
  /* Optional: 1 when a build needs kvdex_index_input.landmarks (NULL = never). */
  int (*needs_landmarks)(const kvdex_index *ix);
} kvdex__index_ops;

struct kvdex_index {
  const kvdex__index_ops *ops;
  void *impl;
  uint64_t n_built;   /* tokens the index covers; 0 = not built */
  uint32_t dim;
  int dtype;          /* dtype of the keys it was built on */
  char note[160];     /* build notes for describe ("key-only kNN: no prefill queries") */
  char describe[400]; /* cache for kvdex_index_describe */
};

/* Per-thread search state shared by all kinds: an epoch-tagged visited set, a
 * float scratch and a hit scratch, grown on demand. */
struct kvdex_index_scratch {
  uint32_t *visit;  /* visit[i] == epoch <=> visited in this search */
  size_t visit_cap;
  uint32_t epoch;
  float *f;
  size_t f_cap;
  kvdex_hit *h;
  size_t h_cap;
  void *kind_state; /* a kind may hang its own state here, freed by kind_free */
  void (*kind_free)(void *);
};
/* Prepares the visited set for n ids (returns KVDEX_ENOMEM on failure). */
int kvdex__scratch_visit_begin(kvdex_index_scratch *s, uint64_t n);
int kvdex__scratch_floats(kvdex_index_scratch *s, size_t n);
int kvdex__scratch_hits(kvdex_index_scratch *s, size_t n);

/* Reads one key row of a view as f32 into out[dim]. */
void kvdex__view_row_f32(const kvdex_kv_view *v, uint64_t id, float *out);
/* Pointer to a key row of a view in its dtype. */
static inline const void *kvdex__view_row(const kvdex_kv_view *v, uint64_t id) {
  const char *blk = (const char *)v->k_blocks[id / v->block_tokens];
  return blk + (size_t)(id % v->block_tokens) * v->head_dim * kvdex_dtype_size(v->dtype);
}

extern const kvdex__index_ops kvdex__exact_ops;
extern const kvdex__index_ops kvdex__ivf_ops;
extern const kvdex__index_ops kvdex__hnsw_ops;
extern const kvdex__index_ops kvdex__graph_ops;
extern const kvdex__index_ops kvdex__landmark_ops;

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_ANN_INT_H */
