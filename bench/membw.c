/* membw: a plain sequential read-bandwidth probe. It sums 64-bit words in
 * 16-byte vectors with independent accumulators, so the loop is bound by
 * memory, not by the add chain. This is the "physical limit" beside
 * which scan throughput is reported. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/bench.h"

double kvdex_bench_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct probe {
  const uint64_t *buf;
  size_t words, chunk;
  uint64_t sink[64]; /* per worker, so the sums are not optimised away */
} probe;

/* 16-byte vectors (SSE2 on any x86-64): two loads a cycle are far above what
 * DRAM delivers, so the loop measures memory, not the core. */
typedef uint64_t v2u64 __attribute__((vector_size(16)));

static void read_chunk(void *ctx, size_t i, unsigned worker) {
  probe *p = ctx;
  size_t lo = i * p->chunk, hi = lo + p->chunk;
  if (hi > p->words) hi = p->words;
  v2u64 a0 = {0, 0}, a1 = a0, a2 = a0, a3 = a0;
  const v2u64 *w = (const v2u64 *)p->buf;
  size_t j = lo / 2, end = hi / 2;
  for (; j + 4 <= end; j += 4) {
    a0 += w[j];
    a1 += w[j + 1];
    a2 += w[j + 2];
    a3 += w[j + 3];
  }
  for (; j < end; j++) a0 += w[j];
  v2u64 a = a0 + a1 + a2 + a3;
  p->sink[worker % 64] += a[0] + a[1];
}

double kvdex_membw_read(size_t bytes, kvdex_pool *pool, int repeat) {
  size_t words = bytes / 8;
  if (words < 1024) words = 1024;
  words &= ~(size_t)1;
  uint64_t *buf = NULL;
  if (posix_memalign((void **)&buf, 64, words * 8)) {
    kvdex__seterr(KVDEX_ENOMEM, "membw: cannot allocate %zu bytes", words * 8);
    return -1;
  }
  for (size_t i = 0; i < words; i++) buf[i] = i * 0x9e3779b97f4a7c15ull; /* fault pages in */
  unsigned n = pool ? kvdex_pool_size(pool) + 1 : 1;
  probe p = {.buf = buf, .words = words};
  /* A few chunks per thread so a slow thread does not stall the measurement. */
  size_t tasks = (size_t)n * 4;
  p.chunk = ((words + tasks - 1) / tasks + 1) & ~(size_t)1; /* whole vectors */
  double best = 0;
  for (int r = 0; r < (repeat > 0 ? repeat : 1); r++) {
    double t0 = kvdex_bench_now();
    kvdex_pool_run(pool, tasks, read_chunk, &p);
    double dt = kvdex_bench_now() - t0;
    double bw = (double)(words * 8) / dt;
    if (bw > best) best = bw;
  }
  volatile uint64_t keep = 0;
  for (int i = 0; i < 64; i++) keep += p.sink[i];
  (void)keep;
  free(buf);
  return best;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

double kvdex_percentile(double *v, size_t n, double pct) {
  if (n == 0) return 0;
  qsort(v, n, sizeof *v, cmp_double);
  double pos = pct / 100.0 * (double)(n - 1);
  size_t lo = (size_t)pos;
  if (lo + 1 >= n) return v[n - 1];
  double f = pos - (double)lo;
  return v[lo] * (1 - f) + v[lo + 1] * f;
}
