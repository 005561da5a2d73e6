/* gen: synthetic attention data whose decode queries are out-of-distribution
 * with respect to the keys, the way real attention is (RetrievalAttention, §2):
 *  - keys belong to topics that persist over spans of tokens (local coherence),
 *    share one offset direction (keys of a head have a common bias), and drift
 *    slowly with position;
 *  - queries carry a different offset direction and norm, so q·k is dominated by
 *    the few topics a query asks for, not by nearest-neighbour geometry of keys;
 *  - queries carry a little isotropic noise (query_noise): the part of q.k that no
 *    prefill query predicts. At the first calibration it was 0.5 per element, which
 *    made ~58% of the q.k variance unpredictable and no index (not even an oracle over
 *    the nearest prefill queries' answers) could reach recall@100 0.95 at a few % of
 *    the keys; real decode queries sit close to prefill queries of the same head
 *    (RetrievalAttention, fig. 2), hence 0.15 now;
 *  - a few heavy-hitter tokens receive attention from most queries;
 *  - planted needles: a key placed at a chosen depth to be the clear top-1 of a
 *    chosen decode query (orthogonal to the other needles' queries, so that each
 *    stays the top-1 of its own).
 * Prefill (training) and decode queries come from the same query distribution.
 * Deterministic for a given seed. One (layer, kv head) per call.
 */
#ifndef KVDEX_GEN_H
#define KVDEX_GEN_H

#include <stddef.h>
#include <stdint.h>

typedef struct kvdex_gen_opts {
  uint64_t n_keys;        /* tokens */
  uint32_t dim;           /* head_dim */
  uint32_t n_train;       /* prefill queries (for attention-aware indexes) */
  uint32_t n_test;        /* decode queries */
  uint32_t topics;        /* 0 = n_keys / 256, at least 16 */
  uint32_t span;          /* mean tokens per topic run (default 64) */
  float key_offset;       /* norm of the keys' shared offset (default 4) */
  float query_offset;     /* norm of the queries' offset, another direction (default 4) */
  float query_scale;      /* queries' topic component scale (default 2.5) */
  float query_noise;      /* per-element noise sigma of queries (default 0.15) */
  float noise;            /* per-element noise of keys (default 1) */
  float drift;            /* amplitude of slow positional rotation (default 1) */
  float heavy_frac;       /* fraction of heavy-hitter tokens (default 0.0005) */
  uint32_t n_needles;     /* planted needles, spread over depths 0..100% */
  uint64_t seed;
} kvdex_gen_opts;

/* Fills defaults for zero fields. */
void kvdex_gen_defaults(kvdex_gen_opts *o);

typedef struct kvdex_gen_data {
  float *keys;          /* [n_keys][dim] */
  float *values;        /* [n_keys][dim] */
  float *train;         /* [n_train][dim] */
  float *test;          /* [n_test][dim] */
  uint64_t *needle_pos; /* [n_needles]: token position of needle i */
  uint32_t *needle_query; /* [n_needles]: index into test of the query it answers */
} kvdex_gen_data;

/* Generates everything; KVDEX_ENOMEM / KVDEX_EINVAL on failure. */
int kvdex_gen(const kvdex_gen_opts *o, kvdex_gen_data *out /* OUT */);
void kvdex_gen_free(kvdex_gen_data *d);

#endif /* KVDEX_GEN_H */
