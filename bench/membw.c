/* membw: a plain sequential read-bandwidth probe. It sums 64-bit words with the
 * widest vectors the CPU has and independent accumulators, so the loop is bound
 * by memory, not by the add chain. This is the "physical limit" beside
 * which scan throughput is reported. */
#include <stdlib.h>
#include <string.h>

#include "bench/bench.h"
#include "kvstore/base.h"

typedef struct probe {
  const uint64_t *buf;
  size_t words, chunk;
  uint64_t sink[64]; /* per worker, so the sums are not optimised away */
} probe;

/* The probe must be the strongest plain read this CPU can do, or every ratio
 * against it flatters the scan: on AVX-512 machines wide loads keep more bytes in
 * flight per core (measured here: ~11.5 GB/s vs ~7.5 GB/s for 16-byte loads). So
 * the loop is compiled three times and chosen at run time. */
#include <immintrin.h>

__attribute__((target("avx512f"))) static uint64_t sum_avx512(const uint64_t *w, size_t lo,
                                                              size_t hi) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  size_t j = lo;
  for (; j + 32 <= hi; j += 32) {
    a0 = _mm512_add_epi64(a0, _mm512_load_si512((const void *)(w + j)));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512((const void *)(w + j + 8)));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512((const void *)(w + j + 16)));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512((const void *)(w + j + 24)));
  }
  uint64_t lanes[8], t = 0; /* summed as unsigned: wrap-around is intended */
  _mm512_storeu_si512((void *)lanes,
                      _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
  for (int i = 0; i < 8; i++) t += lanes[i];
  for (; j < hi; j++) t += w[j];
  return t;
}

__attribute__((target("avx2"))) static uint64_t sum_avx2(const uint64_t *w, size_t lo, size_t hi) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  size_t j = lo;
  for (; j + 16 <= hi; j += 16) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i *)(w + j)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i *)(w + j + 4)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i *)(w + j + 8)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i *)(w + j + 12)));
  }
  uint64_t lanes[4];
  _mm256_storeu_si256((__m256i *)lanes,
                      _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
  uint64_t t = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; j < hi; j++) t += w[j];
  return t;
}

static uint64_t sum_plain(const uint64_t *w, size_t lo, size_t hi) {
  uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  size_t j = lo;
  for (; j + 4 <= hi; j += 4) {
    a0 += w[j];
    a1 += w[j + 1];
    a2 += w[j + 2];
    a3 += w[j + 3];
  }
  for (; j < hi; j++) a0 += w[j];
  return a0 + a1 + a2 + a3;
}

static void read_chunk(void *ctx, size_t i, unsigned worker) {
  probe *p = ctx;
  size_t lo = i * p->chunk, hi = lo + p->chunk;
  if (hi > p->words) hi = p->words;
  if (lo >= hi) return;
  uint64_t t = __builtin_cpu_supports("avx512f") ? sum_avx512(p->buf, lo, hi)
               : __builtin_cpu_supports("avx2")  ? sum_avx2(p->buf, lo, hi)
                                                 : sum_plain(p->buf, lo, hi);
  p->sink[worker % 64] += t;
}

double kvdex_membw_read(size_t bytes, kvdex_pool *pool, int repeat) {
  size_t words = bytes / 8;
  if (words < 1024) words = 1024;
  words &= ~(size_t)7;
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
  p.chunk = ((words + tasks - 1) / tasks + 7) & ~(size_t)7; /* 64-byte aligned chunks */
  double best = 0;
  for (int r = 0; r < (repeat > 0 ? repeat : 1); r++) {
    double t0 = kvdex__now_s();
    kvdex_pool_run(pool, tasks, read_chunk, &p);
    double dt = kvdex__now_s() - t0;
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
