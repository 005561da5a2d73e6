/* ann_kinds.h — private to index/: small helpers shared by the index kinds in
 * ann_exact.c, landmark.c and faiss.c: a bounded top-k heap in kvdex_hit_better
 * order, sorting hits, and parsing unsigned spec values (static inline), plus one
 * test hook of landmark.c. Not part of any public API.
 */
#ifndef KVDEX_ANN_KINDS_H
#define KVDEX_ANN_KINDS_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#include "index/ann.h"
#include "index/index.h"

/* Keeps the best `k` hits seen so far in h[0..n) as a heap with the worst on top.
 * h must have room for k hits. Scores that are NaN are never kept. */
typedef struct kvdex__topk {
  kvdex_hit *h;
  uint32_t n, k;
} kvdex__topk;

static inline void kvdex__topk_init(kvdex__topk *t, kvdex_hit *storage, uint32_t k) {
  t->h = storage;
  t->n = 0;
  t->k = k;
}

static inline void kvdex__topk_sift_down(kvdex_hit *h, uint32_t root, uint32_t n) {
  for (;;) {
    uint32_t c = 2 * root + 1;
    if (c >= n) return;
    if (c + 1 < n && kvdex_hit_better(h[c], h[c + 1])) c++; /* the worse child */
    if (!kvdex_hit_better(h[root], h[c])) return;
    kvdex_hit x = h[root];
    h[root] = h[c];
    h[c] = x;
    root = c;
  }
}

/* The score a new hit must beat to enter (-inf while not full). */
static inline float kvdex__topk_floor(const kvdex__topk *t) {
  return t->n < t->k ? -__builtin_inff() : t->h[0].score;
}

static inline void kvdex__topk_push(kvdex__topk *t, uint64_t id, float score) {
  if (score != score) return; /* NaN */
  kvdex_hit x = {id, score};
  if (t->n < t->k) {
    uint32_t i = t->n++;
    while (i > 0) { /* sift up: the worse goes to the top */
      uint32_t p = (i - 1) / 2;
      if (!kvdex_hit_better(t->h[p], x)) break;
      t->h[i] = t->h[p];
      i = p;
    }
    t->h[i] = x;
  } else if (t->k && kvdex_hit_better(x, t->h[0])) {
    t->h[0] = x;
    kvdex__topk_sift_down(t->h, 0, t->n);
  }
}

/* Pushes n scores for ids first_id.. (scores[i] belongs to first_id + i). */
static inline void kvdex__topk_push_run(kvdex__topk *t, uint64_t first_id, const float *scores,
                                        size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (t->n == t->k && !(scores[i] >= t->h[0].score)) continue; /* fast reject */
    kvdex__topk_push(t, first_id + i, scores[i]);
  }
}

/* Turns the heap into a best-first array h[0..n) (kvdex_hit_better order). */
static inline uint32_t kvdex__topk_finish(kvdex__topk *t) {
  for (uint32_t end = t->n; end > 1; end--) { /* pop the worst to the back */
    kvdex_hit x = t->h[0];
    t->h[0] = t->h[end - 1];
    t->h[end - 1] = x;
    kvdex__topk_sift_down(t->h, 0, end - 1);
  }
  return t->n;
}

/* Sorts hits into kvdex_hit_better order (insertion sort: for short or nearly
 * sorted arrays, such as FAISS results whose ties are in arbitrary order). */
static inline void kvdex__hits_sort(kvdex_hit *h, uint32_t n) {
  for (uint32_t i = 1; i < n; i++) {
    kvdex_hit x = h[i];
    uint32_t j = i;
    for (; j > 0 && kvdex_hit_better(x, h[j - 1]); j--) h[j] = h[j - 1];
    h[j] = x;
  }
}

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
