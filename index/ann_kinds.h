/* ann_kinds.h — private to index/: what the index kinds in ann_exact.c, landmark.c
 * and faiss.c share beyond ann_int.h: the top-k heap and hit sorting (index/topk.h),
 * parsing unsigned spec values (static inline), and one test hook of landmark.c.
 * Not part of any public API.
 */
#ifndef KVDEX_ANN_KINDS_H
#define KVDEX_ANN_KINDS_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#include "index/ann.h"
#include "index/index.h"
#include "index/topk.h"

/* Parses a decimal unsigned integer in [lo, hi] spanning the whole string. */
static inline int kvdex__parse_u32(const char *s, uint32_t lo, uint32_t hi, uint32_t *out) {
  if (!s || *s < '0' || *s > '9') return -1;
  errno = 0;
  char *end;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || *end || v < lo || v > hi) return -1;
  *out = (uint32_t)v;
  return 0;
}

/* Test hook (landmark.c): the representative scores of a built landmark index for
 * the f32 query q: out[b] for block b of [0, *n_reps) (room for ceil(n_built /
 * block)); *block = tokens per representative. For mode=minmax each score is the
 * bound sum_i max(q_i*min_i, q_i*max_i). KVDEX_EINVAL if ix is not a built
 * landmark index. */
int kvdex__landmark_scores(const kvdex_index *ix, const float *q, float *out, uint64_t *n_reps,
                           uint32_t *block);

#endif /* KVDEX_ANN_KINDS_H */
