/* gpu_check: the device half of gpu/check.sh. On a machine with a CUDA device it
 *   1. compares every kernel with its CPU twin on random problems (PASS/FAIL, 1e-2);
 *   2. measures the sparse decode kernel's achieved HBM bandwidth (64K selected tokens
 *      per (batch entry, kv head)) against the device's peak from
 *      cudaDevAttrMemoryClockRate / cudaDevAttrGlobalMemoryBusWidth, checking a
 *      sample of outputs against a double-precision reference;
 *   3. times S2 prefill at 32K and 128K tokens (printing S2_PREFILL lines that
 *      check.sh sets against PyTorch's SDPA), checking sampled rows likewise.
 * Exit: 0 all PASS, 1 some FAIL, 2 setup error, 3 no usable CUDA device.
 * Usage: gpu_check [--skip-suite] [--skip-bench]
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpu/gpu.h"
#include "tests/gpu/compare.h"

static int g_failed;

static void verdict(int ok, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  printf("%s  ", ok ? "PASS" : "FAIL");
  vprintf(fmt, ap);
  printf("\n");
  fflush(stdout);
  va_end(ap);
  if (!ok) g_failed = 1;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what, int rc) {
  printf("FAIL  setup: %s: %s (%s)\n", what, kvdex_errmsg(), kvdex_errname(rc));
  exit(2);
}

#define CHECK(call, what)        \
  do {                           \
    int rc_ = (call);            \
    if (rc_) die((what), rc_);   \
  } while (0)

/* ---------------------------------------------------------------- suite */

static void suite_case(const char *name, int rc, const tc_result *r, double lse_tol) {
  if (rc) {
    verdict(0, "twin  %-36s %s", name, r->msg);
    return;
  }
  verdict(r->err <= TC_TOL && r->err_lse <= lse_tol, "twin  %-36s rel err %.2e (limit %.0e), lse err %.2e",
          name, r->err, TC_TOL, r->err_lse);
}

static tp_decode_cfg dcfg(uint32_t batch, uint32_t nq, uint32_t nkv, uint32_t d, uint32_t bt,
                          uint32_t seq, int dtype, int vllm, uint32_t sel_cap) {
  tp_decode_cfg c;
  memset(&c, 0, sizeof c);
  c.batch = batch, c.n_q_heads = nq, c.n_kv_heads = nkv, c.head_dim = d, c.block_tokens = bt;
  c.max_seq = seq, c.dtype = dtype, c.vllm_layout = vllm;
  c.n_sink = 4, c.n_recent = 64, c.sel_cap = sel_cap, c.q_mag = 4.0f;
  return c;
}

static void run_suite(void) {
  tc_result r;
  struct {
    tp_decode_cfg c;
    const char *name;
  } dec[] = {
      {dcfg(4, 32, 8, 128, 16, 16384, KVDEX_DTYPE_F16, 0, 4096), "sparse decode gqa4 d128 f16"},
      {dcfg(2, 32, 8, 128, 16, 8192, KVDEX_DTYPE_BF16, 1, 2048), "sparse decode gqa4 d128 bf16 vllm"},
      {dcfg(2, 64, 8, 128, 16, 4096, KVDEX_DTYPE_F16, 0, 1024), "sparse decode gqa8 d128"},
      {dcfg(1, 16, 1, 256, 32, 3000, KVDEX_DTYPE_BF16, 0, 1500), "sparse decode gqa16 d256"},
      {dcfg(2, 6, 2, 96, 7, 900, KVDEX_DTYPE_F16, 0, 600), "sparse decode gqa3 d96"},
  };
  for (size_t i = 0; i < sizeof dec / sizeof dec[0]; i++) {
    int rc = tc_sparse_decode(&dec[i].c, 100 + i, &r);
    suite_case(dec[i].name, rc, &r, 1e-3);
  }
  kvdex_s2_params s2a = {32, 64, 4, 16, 1}, s2b = {8, 16, 2, 4, 0};
  tp_decode_cfg a = dcfg(2, 32, 8, 128, 16, 20000, KVDEX_DTYPE_BF16, 0, 0);
  a.s2 = &s2a;
  tp_decode_cfg b = dcfg(3, 8, 8, 64, 8, 3000, KVDEX_DTYPE_F16, 1, 0);
  b.s2 = &s2b;
  suite_case("s2 decode gqa4 bf16", tc_s2_decode(&a, 200, &r), &r, 1e-3);
  suite_case("s2 decode mha f16 vllm", tc_s2_decode(&b, 201, &r), &r, 1e-3);
  suite_case("lse merge 4 parts", tc_lse_merge(4, 256, 128, 300, &r), &r, 1e-3);
  suite_case("lse merge 300 parts", tc_lse_merge(300, 17, 128, 301, &r), &r, 1e-3);
  kvdex_s2_params p1 = {8, 64, 4, 16, 1}, p2 = {4, 128, 2, 4, 0};
  suite_case("s2 prefill f16 d128 2048", tc_s2_prefill(&p1, 8, 2048, 128, KVDEX_DTYPE_F16, 400, &r),
             &r, 1e-3);
  suite_case("s2 prefill bf16 d128 2048 gqa", tc_s2_prefill(&p1, 2, 2048, 128, KVDEX_DTYPE_BF16, 401, &r),
             &r, 1e-3);
  suite_case("s2 prefill f16 d64 block128 1500",
             tc_s2_prefill(&p2, 4, 1500, 64, KVDEX_DTYPE_F16, 402, &r), &r, 1e-3);
  int rc = tc_block_topk(4, 32, 8, 128, 8192, 64, 500, &r);
  if (rc)
    verdict(0, "twin  %-36s %s", "block top-k", r.msg);
  else
    verdict(r.err <= 1e-4, "twin  %-36s score err %.2e (limit 1e-4), index swaps %.4f", "block top-k 8192 reps k 64",
            r.err, r.err_lse);
}

/* ------------------------------------------------------------- benches */

#define CHUNK_ELEMS ((size_t)32 << 20) /* 64 MiB of 16-bit values */

static uint16_t *g_chunk;  /* random f16/bf16 values, reused to fill big buffers */
static int g_chunk_dtype;

static void make_chunk(int dtype, uint64_t seed) {
  if (!g_chunk) g_chunk = malloc(CHUNK_ELEMS * 2);
  if (!g_chunk) die("host chunk", KVDEX_ENOMEM);
  tp_rng r = {seed};
  for (size_t i = 0; i < CHUNK_ELEMS; i++) {
    float f = tp_unif(&r);
    g_chunk[i] = dtype == KVDEX_DTYPE_BF16 ? kvdex__f32_to_bf16(f) : kvdex__f32_to_f16(f);
  }
  g_chunk_dtype = dtype;
}

/* Device element i of a filled buffer = chunk[(i + off) % CHUNK_ELEMS]. */
static void fill_dev(void *dst, size_t n, size_t off) {
  size_t i = 0;
  while (i < n) {
    size_t start = (i + off) % CHUNK_ELEMS, len = CHUNK_ELEMS - start;
    if (len > n - i) len = n - i;
    CHECK(kvdex_gpu_copy((uint16_t *)dst + i, g_chunk + start, len * 2), "fill");
    i += len;
  }
}

static float host_elem(size_t i, size_t off) {
  return tp_elem(g_chunk_dtype, g_chunk, (i + off) % CHUNK_ELEMS);
}

static void *dalloc(size_t bytes) {
  void *p = NULL;
  CHECK(kvdex_gpu_alloc(bytes, &p), "device alloc");
  return p;
}

static void shuffle32(tp_rng *r, int32_t *a, size_t n) {
  for (size_t i = n; i > 1; i--) {
    size_t j = tp_next(r) % i;
    int32_t t = a[i - 1];
    a[i - 1] = a[j];
    a[j] = t;
  }
}

static int cmp_i32(const void *a, const void *b) {
  int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
  return (x > y) - (x < y);
}

static void bench_decode(const kvdex_gpu_info *info) {
  const uint32_t B = 8, H = 8, G = 4, NQ = H * G, D = 128, BT = 16, L = 131072;
  const uint32_t N_SEL = 65536, SINK = 4, RECENT = 252;
  const int dtype = KVDEX_DTYPE_F16;
  const uint32_t max_blocks = L / BT;
  const size_t n_blocks = (size_t)B * H * max_blocks, pool_elems = n_blocks * BT * D;
  const size_t K_OFF = 0, V_OFF = 12345;
  printf("\n== sparse decode bandwidth: batch %u, %u kv heads x %u (q heads %u), head_dim %u, f16, "
         "%u-token pages,\n   seq %u, %u selected + %u static tokens per (batch entry, kv head)\n",
         B, H, G, NQ, D, BT, L, N_SEL, SINK + RECENT);
  make_chunk(dtype, 77);
  tp_rng r = {1234};
  int32_t *bt = malloc(n_blocks * 4), *sel = malloc((size_t)B * H * N_SEL * 4);
  int32_t *nsel = malloc((size_t)B * H * 4), *lens = malloc(B * 4);
  int32_t *range = malloc((size_t)L * 4);
  float *q = malloc((size_t)B * NQ * D * 4);
  if (!bt || !sel || !nsel || !lens || !range || !q) die("host alloc", KVDEX_ENOMEM);
  for (size_t i = 0; i < n_blocks; i++) bt[i] = (int32_t)i;
  shuffle32(&r, bt, n_blocks);
  const uint32_t lo = SINK, hi = L - RECENT; /* selectable ids: [lo, hi) */
  for (size_t bh = 0; bh < (size_t)B * H; bh++) {
    for (uint32_t i = 0; i < hi - lo; i++) range[i] = (int32_t)(lo + i);
    for (uint32_t i = 0; i < N_SEL; i++) { /* partial Fisher-Yates: distinct ids */
      uint32_t j = i + tp_below(&r, hi - lo - i);
      int32_t t = range[i];
      range[i] = range[j];
      range[j] = t;
    }
    memcpy(sel + bh * N_SEL, range, (size_t)N_SEL * 4);
    nsel[bh] = (int32_t)N_SEL;
  }
  for (uint32_t b = 0; b < B; b++) lens[b] = (int32_t)L;
  for (size_t i = 0; i < (size_t)B * NQ * D; i++) q[i] = 2.0f * tp_unif(&r);

  uint16_t *dk = dalloc(pool_elems * 2), *dv = dalloc(pool_elems * 2);
  fill_dev(dk, pool_elems, K_OFF);
  fill_dev(dv, pool_elems, V_OFF);
  int32_t *dbt = dalloc(n_blocks * 4), *dsel = dalloc((size_t)B * H * N_SEL * 4);
  int32_t *dnsel = dalloc((size_t)B * H * 4), *dlens = dalloc(B * 4);
  float *dq = dalloc((size_t)B * NQ * D * 4), *dout = dalloc((size_t)B * NQ * D * 4);
  float *dlse = dalloc((size_t)B * NQ * 4);
  CHECK(kvdex_gpu_copy(dbt, bt, n_blocks * 4), "copy");
  CHECK(kvdex_gpu_copy(dnsel, nsel, (size_t)B * H * 4), "copy");
  CHECK(kvdex_gpu_copy(dlens, lens, B * 4), "copy");
  CHECK(kvdex_gpu_copy(dq, q, (size_t)B * NQ * D * 4), "copy");

  kvdex_gpu_kv_pages kv;
  memset(&kv, 0, sizeof kv);
  kv.dtype = dtype, kv.head_dim = D, kv.n_kv_heads = H, kv.block_tokens = BT;
  kv.k = dk, kv.v = dv, kv.block_stride = (uint64_t)BT * D, kv.head_stride = 0;
  kv.n_pool_blocks = (uint32_t)n_blocks, kv.block_table = dbt, kv.max_blocks = max_blocks;
  kv.bt_batch_stride = (uint64_t)H * max_blocks, kv.bt_head_stride = max_blocks;
  kvdex_gpu_token_sel ts = {dlens, SINK, RECENT, dsel, dnsel, N_SEL};
  size_t ws = kvdex_gpu_sparse_decode_workspace(B, NQ, D, &ts);
  void *dws = dalloc(ws);
  const double tokens = (double)B * H * (N_SEL + SINK + RECENT);
  const double bytes = tokens * D * 2 * 2 /* K + V rows */ + tokens * 4 /* table entries */ +
                       (double)B * H * N_SEL * 4 /* ids */;
  float *o = malloc((size_t)B * NQ * D * 4);
  if (!o) die("host alloc", KVDEX_ENOMEM);
  for (int order = 0; order < 2; order++) {
    if (order == 1) /* position order: the same sets, sorted */
      for (size_t bh = 0; bh < (size_t)B * H; bh++) qsort(sel + bh * N_SEL, N_SEL, 4, cmp_i32);
    CHECK(kvdex_gpu_copy(dsel, sel, (size_t)B * H * N_SEL * 4), "copy");
    for (int i = 0; i < 3; i++)
      CHECK(kvdex_gpu_sparse_decode(B, NQ, dq, &kv, &ts, 0, dout, dlse, dws, ws, NULL), "decode");
    CHECK(kvdex_gpu_sync(NULL), "decode");
    const int reps = 20;
    double t0 = now_s();
    for (int i = 0; i < reps; i++)
      CHECK(kvdex_gpu_sparse_decode(B, NQ, dq, &kv, &ts, 0, dout, dlse, dws, ws, NULL), "decode");
    CHECK(kvdex_gpu_sync(NULL), "decode");
    double dt = (now_s() - t0) / reps, gbs = bytes / dt / 1e9;
    double pct = info->peak_bw_gbs > 0 ? 100.0 * gbs / info->peak_bw_gbs : 0;
    const char *name = order ? "position order (sorted ids)" : "score order (random ids)";
    printf("DECODE_BW order=%s ms=%.4f gbs=%.1f peak_gbs=%.1f pct=%.1f\n", order ? "sorted" : "random",
           dt * 1e3, gbs, info->peak_bw_gbs, pct);
    if (order == 0)
      verdict(pct >= 80.0, "perf  sparse decode, %s: %.3f ms, %.0f GB/s = %.1f%% of peak %.0f GB/s "
              "(target >= 80%%)", name, dt * 1e3, gbs, pct, info->peak_bw_gbs);
    else
      printf("INFO  sparse decode, %s: %.3f ms, %.0f GB/s = %.1f%% of peak\n", name, dt * 1e3, gbs, pct);
  }
  /* Check (b, kv head) = (0, 0) and (B-1, H-1), all their query heads, in double. */
  CHECK(kvdex_gpu_copy(o, dout, (size_t)B * NQ * D * 4), "copy back");
  double worst = 0;
  uint32_t pairs[2][2] = {{0, 0}, {B - 1, H - 1}};
  size_t n_tok = N_SEL + SINK + RECENT;
  double *s = malloc(n_tok * sizeof *s), *acc = malloc(D * sizeof *acc);
  int64_t *rows = malloc(n_tok * sizeof *rows);
  if (!s || !acc || !rows) die("host alloc", KVDEX_ENOMEM);
  for (int pi = 0; pi < 2; pi++) {
    uint32_t b = pairs[pi][0], h = pairs[pi][1];
    size_t bh = (size_t)b * H + h, n = 0;
    for (uint32_t t = 0; t < SINK; t++) rows[n++] = t;
    for (uint32_t t = L - RECENT; t < L; t++) rows[n++] = t;
    for (uint32_t i = 0; i < N_SEL; i++) rows[n++] = sel[bh * N_SEL + i];
    for (size_t i = 0; i < n; i++) { /* token -> element offset */
      int64_t t = rows[i];
      rows[i] = (int64_t)bt[bh * max_blocks + t / BT] * BT * D + (t % BT) * D;
    }
    for (uint32_t g = 0; g < G; g++) {
      const float *qq = q + ((size_t)b * NQ + h * G + g) * D;
      double m = -INFINITY, l = 0, sc = 1.0 / sqrt((double)D), num = 0, den = 0;
      for (size_t i = 0; i < n; i++) {
        double dot = 0;
        for (uint32_t c = 0; c < D; c++) dot += qq[c] * (double)host_elem(rows[i] + c, K_OFF);
        s[i] = dot * sc;
        if (s[i] > m) m = s[i];
      }
      for (uint32_t c = 0; c < D; c++) acc[c] = 0;
      for (size_t i = 0; i < n; i++) {
        double w = exp(s[i] - m);
        l += w;
        for (uint32_t c = 0; c < D; c++) acc[c] += w * host_elem(rows[i] + c, V_OFF);
      }
      const float *got = o + ((size_t)b * NQ + h * G + g) * D;
      for (uint32_t c = 0; c < D; c++) {
        double e = fabs(acc[c] / l - got[c]);
        if (e > num || e != e) num = e != e ? INFINITY : e;
        if (fabs(acc[c] / l) > den) den = fabs(acc[c] / l);
      }
      if (num / den > worst) worst = num / den;
    }
  }
  verdict(worst <= TC_TOL, "ref   sparse decode at 64K tokens, 8 rows vs double reference: rel err %.2e",
          worst);
  free(s), free(acc), free(rows), free(o);
  free(bt), free(sel), free(nsel), free(lens), free(range), free(q);
  kvdex_gpu_free(dk), kvdex_gpu_free(dv), kvdex_gpu_free(dbt), kvdex_gpu_free(dsel);
  kvdex_gpu_free(dnsel), kvdex_gpu_free(dlens), kvdex_gpu_free(dq), kvdex_gpu_free(dout);
  kvdex_gpu_free(dlse), kvdex_gpu_free(dws);
}

static void bench_prefill(uint32_t seq) {
  const uint32_t H = 32, D = 128;
  const int dtype = KVDEX_DTYPE_BF16;
  kvdex_s2_params p = {H, 64, 4, 16, 1};
  const uint32_t nb = (seq + p.block - 1) / p.block;
  const size_t n = (size_t)H * seq * D;
  const size_t Q_OFF = 0, K_OFF = 1000003, V_OFF = 2000029;
  uint64_t nnz;
  CHECK(kvdex_s2_layout_nnz(&p, nb, &nnz), "layout");
  int32_t *row_ptr = malloc(((size_t)H * nb + 1) * 4), *col = malloc(nnz * 4);
  if (!row_ptr || !col) die("host alloc", KVDEX_ENOMEM);
  CHECK(kvdex_s2_layout_build(&p, nb, row_ptr, col, nnz), "layout");
  /* query-key pairs attended (diagonal blocks half), for FLOPs */
  double pairs = 0;
  for (size_t r = 0; r < (size_t)H * nb; r++)
    pairs += (double)(row_ptr[r + 1] - row_ptr[r] - 1) * p.block * p.block +
             (double)p.block * (p.block + 1) / 2;
  const double dense_pairs = (double)H * seq * (seq + 1.0) / 2;
  if (!g_chunk || g_chunk_dtype != dtype) make_chunk(dtype, 99);
  uint16_t *dq = dalloc(n * 2), *dk = dalloc(n * 2), *dv = dalloc(n * 2), *dout = dalloc(n * 2);
  float *dlse = dalloc((size_t)H * seq * 4);
  int32_t *drp = dalloc(((size_t)H * nb + 1) * 4), *dcol = dalloc(nnz * 4);
  fill_dev(dq, n, Q_OFF);
  fill_dev(dk, n, K_OFF);
  fill_dev(dv, n, V_OFF);
  CHECK(kvdex_gpu_copy(drp, row_ptr, ((size_t)H * nb + 1) * 4), "copy");
  CHECK(kvdex_gpu_copy(dcol, col, nnz * 4), "copy");
  CHECK(kvdex_gpu_s2_prefill(&p, H, seq, D, dtype, dq, dk, dv, drp, dcol, 0, dout, dlse, NULL),
        "s2 prefill");
  CHECK(kvdex_gpu_sync(NULL), "s2 prefill");
  const int reps = seq > 65536 ? 3 : 5;
  double t0 = now_s();
  for (int i = 0; i < reps; i++)
    CHECK(kvdex_gpu_s2_prefill(&p, H, seq, D, dtype, dq, dk, dv, drp, dcol, 0, dout, dlse, NULL),
          "s2 prefill");
  CHECK(kvdex_gpu_sync(NULL), "s2 prefill");
  double dt = (now_s() - t0) / reps;
  double tflops = 4.0 * D * pairs / dt / 1e12;
  printf("S2_PREFILL seq=%u ms=%.3f tflops=%.1f attended_fraction=%.4f heads=%u head_dim=%u "
         "block=%u local=%u vert_stride=%u dtype=bf16\n",
         seq, dt * 1e3, tflops, pairs / dense_pairs, H, D, p.block, p.local_blocks, p.vert_stride);
  /* sampled rows vs a double-precision reference of the S2 formula */
  uint32_t hs[4] = {0, 5, 17, H - 1};
  uint32_t ts[4] = {seq - 1, seq / 2 + 3, 63, seq - 65};
  double worst = 0;
  double *s = malloc((size_t)seq * sizeof *s), acc[128];
  uint16_t row[128];
  if (!s) die("host alloc", KVDEX_ENOMEM);
  for (int x = 0; x < 4; x++) {
    uint32_t h = hs[x], t = ts[x], i = t / p.block;
    double sc = 1.0 / sqrt((double)D), m = -INFINITY, l = 0;
    size_t qo = ((size_t)h * seq + t) * D, cnt = 0;
    for (uint32_t key = 0; key <= t; key++) {
      if (!kvdex_s2_active(&p, h, i, key / p.block)) continue;
      size_t ko = ((size_t)h * seq + key) * D;
      double dot = 0;
      for (uint32_t c = 0; c < D; c++) dot += (double)host_elem(qo + c, Q_OFF) * host_elem(ko + c, K_OFF);
      s[cnt] = dot * sc;
      if (s[cnt] > m) m = s[cnt];
      cnt++;
    }
    for (uint32_t c = 0; c < D; c++) acc[c] = 0;
    cnt = 0;
    for (uint32_t key = 0; key <= t; key++) {
      if (!kvdex_s2_active(&p, h, i, key / p.block)) continue;
      size_t vo = ((size_t)h * seq + key) * D;
      double w = exp(s[cnt++] - m);
      l += w;
      for (uint32_t c = 0; c < D; c++) acc[c] += w * host_elem(vo + c, V_OFF);
    }
    CHECK(kvdex_gpu_copy(row, dout + qo, D * 2), "copy back");
    double num = 0, den = 0;
    for (uint32_t c = 0; c < D; c++) {
      double ref = acc[c] / l, e = fabs(ref - tp_elem(dtype, row, c));
      if (e > num || e != e) num = e != e ? INFINITY : e;
      if (fabs(ref) > den) den = fabs(ref);
    }
    if (num / den > worst) worst = num / den;
  }
  verdict(worst <= TC_TOL, "ref   s2 prefill at %u tokens, 4 rows vs double reference: rel err %.2e", seq,
          worst);
  free(s), free(row_ptr), free(col);
  kvdex_gpu_free(dq), kvdex_gpu_free(dk), kvdex_gpu_free(dv), kvdex_gpu_free(dout);
  kvdex_gpu_free(dlse), kvdex_gpu_free(drp), kvdex_gpu_free(dcol);
}

int main(int argc, char **argv) {
  int skip_suite = 0, skip_bench = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--skip-suite")) skip_suite = 1;
    else if (!strcmp(argv[i], "--skip-bench")) skip_bench = 1;
    else {
      fprintf(stderr, "usage: %s [--skip-suite] [--skip-bench]\n", argv[0]);
      return 2;
    }
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (!kvdex_gpu_available()) {
    printf("FAIL  no usable CUDA device (cudaGetDeviceCount failed or found none): "
           "nothing measured\n");
    return 3;
  }
  kvdex_gpu_info info;
  CHECK(kvdex_gpu_device_info(&info), "device info");
  printf("device: %s, sm_%d%d, %d SMs, %.1f GiB, memory clock %d kHz x %d-bit bus -> peak %.1f GB/s\n",
         info.name, info.cc_major, info.cc_minor, info.sm_count, info.total_mem / 1073741824.0,
         info.mem_clock_khz, info.bus_width_bits, info.peak_bw_gbs);
  if (!skip_suite) {
    printf("\n== kernels vs CPU twins\n");
    double t0 = now_s();
    run_suite();
    printf("(suite %.1f s)\n", now_s() - t0);
  }
  if (!skip_bench) {
    double t0 = now_s();
    bench_decode(&info);
    printf("\n== S2 prefill (32 heads, head_dim 128, bf16, block 64, local 4, vert_stride 16)\n");
    bench_prefill(32768);
    bench_prefill(131072);
    printf("(benchmarks %.1f s)\n", now_s() - t0);
  }
  free(g_chunk);
  printf("\ngpu_check: %s\n", g_failed ? "FAIL" : "PASS");
  return g_failed ? 1 : 0;
}
