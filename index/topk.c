/* topk: selection and sorting of hits by kvdex_hit_better, the heap's and the
 * candidate buffer's out-of-line steps, and the search-result storage (contract in
 * topk.h). Nothing here allocates but the result reserve.
 */
#include "index/topk.h"

#include <assert.h>
#include <stdlib.h>

static inline void swap_hits(kvdex_hit *a, size_t i, size_t j) {
  kvdex_hit t = a[i];
  a[i] = a[j];
  a[j] = t;
}

static void insertion_sort(kvdex_hit *a, size_t lo, size_t hi) {
  for (size_t i = lo + 1; i < hi; i++) {
    kvdex_hit x = a[i];
    size_t j = i;
    for (; j > lo && kvdex_hit_better(x, a[j - 1]); j--) a[j] = a[j - 1];
    a[j] = x;
  }
}

static void sift_down(kvdex_hit *a, size_t root, size_t n) { /* heap on a[0..n), worst on top */
  for (;;) {
    size_t c = 2 * root + 1;
    if (c >= n) return;
    if (c + 1 < n && kvdex_hit_better(a[c], a[c + 1])) c++;
    if (!kvdex_hit_better(a[root], a[c])) return;
    swap_hits(a, root, c);
    root = c;
  }
}

static void heap_sort(kvdex_hit *a, size_t n) {
  for (size_t i = n / 2; i-- > 0;) sift_down(a, i, n);
  for (size_t end = n; end > 1; end--) {
    swap_hits(a, 0, end - 1);
    sift_down(a, 0, end - 1);
  }
}

/* Median-of-three partition of a[lo, hi) (hi - lo >= 3): returns p with a[lo, p)
 * better than a[p] and a[p+1, hi) worse. Hits are distinct under the order
 * (ids are unique), so this cannot degenerate on equal scores. */
static size_t partition(kvdex_hit *a, size_t lo, size_t hi) {
  assert(hi - lo >= 3);
  size_t mid = lo + (hi - lo) / 2, last = hi - 1;
  if (kvdex_hit_better(a[mid], a[lo])) swap_hits(a, mid, lo);
  if (kvdex_hit_better(a[last], a[lo])) swap_hits(a, last, lo);
  if (kvdex_hit_better(a[last], a[mid])) swap_hits(a, last, mid);
  swap_hits(a, mid, last - 1);
  kvdex_hit pivot = a[last - 1];
  size_t i = lo + 1;
  for (size_t j = lo + 1; j < last - 1; j++)
    if (kvdex_hit_better(a[j], pivot)) swap_hits(a, i++, j);
  swap_hits(a, i, last - 1);
  return i;
}

static int depth_budget(size_t n) {
  int b = 8;
  while (n >>= 1) b += 2;
  return b;
}

/* Introsort of a[lo, hi): quicksort, insertion sort for short ranges, heap sort when
 * the recursion gets too deep. */
static void sort_range(kvdex_hit *a, size_t lo, size_t hi, int budget) {
  while (hi - lo > 16) {
    if (budget-- <= 0) {
      heap_sort(a + lo, hi - lo);
      return;
    }
    size_t p = partition(a, lo, hi);
    if (p - lo < hi - p - 1) { /* recurse on the smaller side */
      sort_range(a, lo, p, budget);
      lo = p + 1;
    } else {
      sort_range(a, p + 1, hi, budget);
      hi = p;
    }
  }
  insertion_sort(a, lo, hi);
}

void kvdex__hits_sort(kvdex_hit *a, size_t n) {
  if (n > 1) sort_range(a, 0, n, depth_budget(n));
}

void kvdex__hits_select(kvdex_hit *a, size_t n, size_t k) {
  assert(k >= 1 && k <= n);
  size_t lo = 0, hi = n, kth = k - 1;
  int budget = depth_budget(n);
  while (hi - lo > 16) {
    if (budget-- <= 0) {
      heap_sort(a + lo, hi - lo);
      return;
    }
    size_t p = partition(a, lo, hi);
    if (kth < p) hi = p;
    else if (kth > p) lo = p + 1;
    else return;
  }
  insertion_sort(a, lo, hi);
}

uint32_t kvdex__topk_finish(kvdex__topk *t) {
  for (uint32_t end = t->n; end > 1; end--) { /* pop the worst to the back */
    kvdex_hit x = t->h[0];
    t->h[0] = t->h[end - 1];
    t->h[end - 1] = x;
    kvdex__topk_sift_down(t->h, 0, end - 1);
  }
  return t->n;
}

void kvdex__topk_buf_shrink(kvdex__topk_buf *b) {
  assert(b->k >= 1 && b->count >= b->k);
  kvdex__hits_select(b->buf, b->count, b->k);
  b->count = b->k;
  b->thr = b->buf[b->k - 1].score;
  b->full = 1;
}

int kvdex__search_result_reserve(kvdex_search_result *res, uint32_t n_q, size_t kk) {
  size_t need = (size_t)n_q * kk;
  kvdex_head_result *heads = res->heads;
  kvdex_hit *storage = res->storage_;
  int new_heads = res->heads_cap_ < n_q, new_storage = res->storage_cap_ < need;
  if (new_heads && !(heads = malloc((size_t)n_q * sizeof *heads))) goto oom;
  if (new_storage && !(storage = malloc(need * sizeof *storage))) {
    if (new_heads) free(heads);
    goto oom;
  }
  if (new_heads) {
    free(res->heads);
    res->heads = heads;
    res->heads_cap_ = n_q;
  }
  if (new_storage) {
    free(res->storage_);
    res->storage_ = storage;
    res->storage_cap_ = need;
  }
  res->n_q_heads = n_q;
  for (uint32_t h = 0; h < n_q; h++) {
    res->heads[h].n_hits = 0;
    res->heads[h].hits = kk ? res->storage_ + (size_t)h * kk : NULL;
  }
  return KVDEX_OK;
oom:
  return kvdex__seterr(KVDEX_ENOMEM, "search: out of memory for %u x %zu hits", n_q, kk);
}

void kvdex_search_result_free(kvdex_search_result *res) {
  if (!res) return;
  free(res->heads);
  free(res->storage_);
  memset(res, 0, sizeof *res);
}
