/* scan: `kvdex bench scan` — exact-scan throughput in GB/s of keys read, on one
 * thread and on all threads, reported beside a memory read-bandwidth probe over a
 * buffer of the same size measured in the same run (the physical limit). */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench/bench.h"
#include "kvstore/base.h"


static float uniform(uint64_t *s) { return (float)((kvdex__splitmix64(s) >> 40) * (1.0 / 16777216.0)) * 2 - 1; }

/* Fills a sequence with random keys and values, in appends of `chunk` tokens. */
static int fill(kvdex_seq *seq, const kvdex_shape *sh, uint64_t tokens, uint64_t seed) {
  const uint32_t chunk = 4096;
  size_t es = kvdex_dtype_size(sh->dtype);
  size_t elems = (size_t)sh->n_kv_heads * chunk * sh->head_dim;
  float *tmp = malloc(elems * sizeof(float));
  void *k = malloc(elems * es), *v = malloc(elems * es);
  int rc = 0;
  if (!tmp || !k || !v) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "bench: out of memory for staging buffers");
    goto out;
  }
  kvdex_txn *txn = NULL;
  if ((rc = kvdex_txn_begin(seq, &txn))) goto out;
  for (uint64_t t = 0; t < tokens; t += chunk) {
    uint32_t n = (uint32_t)(tokens - t < chunk ? tokens - t : chunk);
    size_t cnt = (size_t)sh->n_kv_heads * n * sh->head_dim;
    for (size_t i = 0; i < cnt; i++) tmp[i] = uniform(&seed);
    kvdex__from_f32(sh->dtype, tmp, k, cnt);
    for (size_t i = 0; i < cnt; i++) tmp[i] = uniform(&seed);
    kvdex__from_f32(sh->dtype, tmp, v, cnt);
    if ((rc = kvdex_txn_append(txn, 0, t, n, k, v))) break;
  }
  if (rc) kvdex_txn_abort(txn);
  else rc = kvdex_txn_commit(txn, NULL);
out:
  free(tmp);
  free(k);
  free(v);
  return rc;
}

typedef struct timing {
  double best, median;
} timing;

static int time_search(kvdex_seq *seq, const float *q, const kvdex_search_opts *o,
                       kvdex_pool *pool, int repeat, timing *t) {
  kvdex_search_result res = {0};
  double *dts = calloc((size_t)repeat, sizeof(double));
  if (!dts) return kvdex__seterr(KVDEX_ENOMEM, "bench: out of memory");
  int rc = kvdex_exact_search(seq, 0, q, o, pool, &res); /* warm-up */
  for (int r = 0; r < repeat && !rc; r++) {
    double t0 = kvdex__now_s();
    rc = kvdex_exact_search(seq, 0, q, o, pool, &res);
    dts[r] = kvdex__now_s() - t0;
  }
  if (!rc) {
    t->median = kvdex_percentile(dts, (size_t)repeat, 50);
    t->best = dts[0]; /* sorted by kvdex_percentile */
  }
  free(dts);
  kvdex_search_result_free(&res);
  return rc;
}

int kvdex_bench_scan(const kvdex_scan_bench_opts *o, FILE *out) {
  kvdex_shape sh = {.n_layers = 1,
                    .n_kv_heads = o->n_kv_heads,
                    .n_q_heads = o->n_q_heads,
                    .head_dim = o->head_dim,
                    .block_tokens = o->block_tokens,
                    .dtype = o->dtype};
  kvdex_store *store = NULL;
  kvdex_seq *seq = NULL;
  kvdex_pool *pool = NULL;
  float *q = NULL;
  int rc;
  if ((rc = kvdex__shape_check(&sh))) return rc;
  unsigned ncpu = o->threads ? o->threads : (unsigned)sysconf(_SC_NPROCESSORS_ONLN);
  if (ncpu < 1) ncpu = 1;
  if ((rc = kvdex_store_create(0, &store))) goto done;
  if ((rc = kvdex_seq_create(store, NULL, "bench-scan", &sh))) goto done;
  if ((rc = kvdex_seq_open(store, NULL, "bench-scan", &seq))) goto done;
  fprintf(stderr, "bench scan: filling %llu tokens x %u kv heads x %u dims (%s)...\n",
          (unsigned long long)o->tokens, sh.n_kv_heads, sh.head_dim, kvdex_dtype_name(sh.dtype));
  if ((rc = fill(seq, &sh, o->tokens, 42))) goto done;
  /* The caller runs tasks too, so the pool gets ncpu - 1 workers. */
  if (ncpu > 1 && (rc = kvdex_pool_create(ncpu - 1, &pool))) goto done;
  size_t qn = (size_t)sh.n_q_heads * sh.head_dim;
  q = malloc(qn * sizeof(float));
  if (!q) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "bench: out of memory");
    goto done;
  }
  uint64_t s = 7;
  for (size_t i = 0; i < qn; i++) q[i] = uniform(&s);

  double key_bytes = (double)o->tokens * sh.n_kv_heads * sh.head_dim * kvdex_dtype_size(sh.dtype);
  kvdex_search_opts so = {.k = o->k, .simd = KVDEX_SIMD_AUTO};
  timing t1, tn;
  fprintf(stderr, "bench scan: timing 1 thread and %u threads, %d runs each...\n", ncpu, o->repeat);
  if ((rc = time_search(seq, q, &so, NULL, o->repeat, &t1))) goto done;
  if ((rc = time_search(seq, q, &so, pool, o->repeat, &tn))) goto done;
  double bw1 = kvdex_membw_read((size_t)key_bytes, NULL, o->repeat);
  double bwn = kvdex_membw_read((size_t)key_bytes, pool, o->repeat);
  if (bw1 < 0 || bwn < 0) {
    rc = KVDEX_ENOMEM;
    goto done;
  }
  double g1 = key_bytes / t1.best / 1e9, gn = key_bytes / tn.best / 1e9;
  double g1m = key_bytes / t1.median / 1e9, gnm = key_bytes / tn.median / 1e9;
  const char *simd = kvdex_simd_name(kvdex_simd_detect());
  if (o->json) {
    fprintf(out,
            "{\"bench\":\"scan\",\"tokens\":%llu,\"kv_heads\":%u,\"q_heads\":%u,\"head_dim\":%u,"
            "\"dtype\":\"%s\",\"k\":%u,\"simd\":\"%s\",\"key_bytes\":%.0f,"
            "\"threads_1\":{\"scan_gbps\":%.3f,\"scan_gbps_median\":%.3f,\"membw_gbps\":%.3f,"
            "\"ratio\":%.3f,\"latency_ms\":%.3f},"
            "\"threads_all\":{\"threads\":%u,\"scan_gbps\":%.3f,\"scan_gbps_median\":%.3f,"
            "\"membw_gbps\":%.3f,\"ratio\":%.3f,\"latency_ms\":%.3f}}\n",
            (unsigned long long)o->tokens, sh.n_kv_heads, sh.n_q_heads, sh.head_dim,
            kvdex_dtype_name(sh.dtype), o->k, simd, key_bytes, g1, g1m, bw1 / 1e9,
            g1 / (bw1 / 1e9), t1.best * 1e3, ncpu, gn, gnm, bwn / 1e9, gn / (bwn / 1e9),
            tn.best * 1e3);
  } else {
    fprintf(out, "exact scan, %llu tokens, %u kv heads, %u q heads, head_dim %u, %s, k=%u, simd %s\n",
            (unsigned long long)o->tokens, sh.n_kv_heads, sh.n_q_heads, sh.head_dim,
            kvdex_dtype_name(sh.dtype), o->k, simd);
    fprintf(out, "  key bytes per search:   %.1f MiB\n", key_bytes / 1048576);
    fprintf(out, "  %-10s scan %6.2f GB/s (median %6.2f)  read bw %6.2f GB/s  ratio %.2f  latency %.2f ms\n",
            "1 thread", g1, g1m, bw1 / 1e9, g1 / (bw1 / 1e9), t1.best * 1e3);
    fprintf(out, "  %2u threads scan %6.2f GB/s (median %6.2f)  read bw %6.2f GB/s  ratio %.2f  latency %.2f ms\n",
            ncpu, gn, gnm, bwn / 1e9, gn / (bwn / 1e9), tn.best * 1e3);
  }
done:
  free(q);
  kvdex_pool_destroy(pool);
  kvdex_seq_release(seq);
  kvdex_store_destroy(store);
  return rc;
}
