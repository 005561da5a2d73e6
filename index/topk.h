/* topk: the hits every kvdex search returns and the small algorithms that pick them,
 * owned here once: kvdex_hit and its order, the per-head result of a search and its
 * reserve, a bounded heap of the k best, a candidate buffer for streams of rising
 * ids, and selection and sorting in that order. It reads no keys and scores nothing
 * (index/ does); it depends only on kvstore/base.h. kvdex_hit and the result types
 * are public (index.h includes this header); the kvdex__ parts are internal.
 */
#ifndef KVDEX_TOPK_H
#define KVDEX_TOPK_H

#include <stddef.h>
#include <stdint.h>

#include "kvstore/base.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvdex_hit {
  uint64_t id;
  float score;
} kvdex_hit;

/* Order used everywhere: higher score first, equal scores by lower id first. Hits of
 * one query have distinct ids, so no two of them compare equal and every top-k below
 * is unique: any of these algorithms gives the same hits in the same order. */
static inline int kvdex_hit_better(kvdex_hit a, kvdex_hit b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

/* Per query head: n_hits hits (<= k) in kvdex_hit_better order. Fewer than k only
 * when fewer tokens are eligible (or some keys score NaN: those are never hits). */
typedef struct kvdex_head_result {
  uint32_t n_hits;
  kvdex_hit *hits; /* points into the kvdex_search_result's storage */
} kvdex_head_result;

typedef struct kvdex_search_result {
  uint32_t n_q_heads;
  kvdex_head_result *heads; /* n_q_heads entries */
  uint64_t keys_scanned;  /* keys scored, summed over kv heads */
  uint64_t tokens;        /* committed tokens of the layer at search time */
  /* internal storage, owned */
  kvdex_hit *storage_;
  size_t storage_cap_;
  size_t heads_cap_;
} kvdex_search_result;

/* Zero-initialise with {0}; reused across searches (grows, never shrinks); a failed
 * search leaves it as it was. Free frees the storage and zeroes it (NULL: no-op). */
void kvdex_search_result_free(kvdex_search_result *res);

/* Internal: makes res hold n_q heads with room for kk hits each, every n_hits 0
 * (hits NULL when kk is 0). Allocates before it frees, so on KVDEX_ENOMEM res is as
 * it was: what a failed search must leave. */
int kvdex__search_result_reserve(kvdex_search_result *res, uint32_t n_q, size_t kk);

/* ---- selection and sorting (kvdex_hit_better order) ------------------------------ */

/* Sorts a[0, n) best first (introsort: O(n log n) whatever the input). */
void kvdex__hits_sort(kvdex_hit *a, size_t n);

/* Rearranges a[0, n) so that a[0, k) are the k best (in no order) and a[k-1] is the
 * worst of them (quickselect, expected O(n)). 1 <= k <= n. */
void kvdex__hits_select(kvdex_hit *a, size_t n, size_t k);

/* ---- bounded heap: the k best of hits pushed in any order ------------------------- */

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

/* The score a new hit must reach to enter (-inf while not full). */
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

/* Pushes n scores for ids first_id.. (scores[i] belongs to first_id + i). Most
 * scores of a long run fail the floor test, which stays in a register. */
static inline void kvdex__topk_push_run(kvdex__topk *t, uint64_t first_id, const float *scores,
                                        size_t n) {
  float floor = kvdex__topk_floor(t);
  for (size_t i = 0; i < n; i++) {
    if (!(scores[i] >= floor)) continue; /* also NaN; an equal score may win on id */
    kvdex__topk_push(t, first_id + i, scores[i]);
    floor = kvdex__topk_floor(t);
  }
}

/* Turns the heap into a best-first array h[0..n) and returns n. */
uint32_t kvdex__topk_finish(kvdex__topk *t);

/* ---- candidate buffer: the k best of hits pushed in rising id order ---------------- */

/* Takes hits while they beat a threshold and selects the k best (kvdex__hits_select)
 * only when the buffer fills: O(1) per rejected hit, no heap upkeep per kept one.
 * Ids must rise from push to push, so a score equal to the threshold never beats
 * the hit that set it. NaN scores are never taken; -inf is taken until the buffer
 * first fills. cap > k, or cap >= every hit that will be pushed. */
typedef struct kvdex__topk_buf {
  kvdex_hit *buf;
  size_t count, cap, k;
  float thr; /* score of the k-th best so far once `full`; -inf before */
  int full;
} kvdex__topk_buf;

static inline void kvdex__topk_buf_init(kvdex__topk_buf *b, kvdex_hit *storage, size_t cap,
                                        size_t k) {
  b->buf = storage;
  b->count = 0;
  b->cap = cap;
  b->k = k;
  b->thr = -__builtin_inff();
  b->full = 0;
}

/* Keeps the k best in buf[0, k) (count = k) and raises the threshold to the worst of
 * them. count >= k >= 1. */
void kvdex__topk_buf_shrink(kvdex__topk_buf *b);

/* Offers hit (id, x): the threshold test, then rarely a shrink. */
static inline void kvdex__topk_buf_push(kvdex__topk_buf *b, uint64_t id, float x) {
  if (!(x > b->thr || (!b->full && x == b->thr))) return;
  if (b->count == b->cap) {
    kvdex__topk_buf_shrink(b);
    if (!(x > b->thr)) return;
  }
  b->buf[b->count].id = id;
  b->buf[b->count].score = x;
  b->count++;
}

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_TOPK_H */
