/* bench: measurements behind `kvdex bench` and the demo — a memory read-bandwidth
 * probe (the physical limit every scan figure is compared with) and the exact-scan
 * benchmark. Prints only where asked (the `out` stream).
 */
#ifndef KVDEX_BENCH_H
#define KVDEX_BENCH_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "index/index.h"

/* Measures read bandwidth (bytes/s) over a freshly allocated buffer of `bytes`,
 * read by `threads` threads through `pool` (NULL pool = 1 thread); best of `repeat`.
 * Returns a negative value (and sets kvdex_errmsg) if memory cannot be had. */
double kvdex_membw_read(size_t bytes, kvdex_pool *pool, int repeat);

typedef struct kvdex_scan_bench_opts {
  uint64_t tokens;
  uint32_t n_kv_heads, n_q_heads, head_dim, block_tokens;
  int dtype;
  uint32_t k;
  unsigned threads; /* 0 = all CPUs */
  int repeat;
  int json;
} kvdex_scan_bench_opts;

/* `kvdex bench scan`: exact-scan GB/s on one thread and on all threads, the read
 * bandwidth over a buffer of the same size, and their ratios, printed to out. */
int kvdex_bench_scan(const kvdex_scan_bench_opts *opts, FILE *out);

/* Percentile (0..100) of n doubles; sorts v in place. */
double kvdex_percentile(double *v, size_t n, double pct);

#endif /* KVDEX_BENCH_H */
