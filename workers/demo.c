/* demo: `kvdex demo` — the end-to-end tour. Creates a synthetic long-context
 * sequence, ingests it through the public client API (embedded or over gRPC) with
 * a progress bar, runs decode-step searches, checks them against a naive scalar
 * reference, and prints ingest GB/s, search p50/p99, GB/s of keys scanned and the
 * machine's measured memory read bandwidth beside it. With --attend it also runs
 * Attend (index auto) and dense Attend (the exact reference) on the checked steps and
 * reports the relative L2 error of o and both latencies. Exit 1 on any mismatch. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench/bench.h"
#include "client/kvdex.h"
#include "kvstore/base.h"
#include "workers/client_opts.h"
#include "workers/cmd.h"
#include "workers/commands.h"
#include "workers/settings.h"

/* Tokens per append message: about 2 MiB of K+V, where gRPC streams fastest. */
#define CHUNK_BYTES (2u << 20)
/* Scalar multiply-adds the reference may spend when --check is -1 (a few seconds). */
#define CHECK_BUDGET 3.0e9



typedef struct demo {
  kvdex_shape sh;
  uint64_t tokens;
  size_t es;
  void **keys; /* per layer: [n_kv_heads][tokens][head_dim] of dtype, for the reference */
} demo;

static void progress(const char *what, const char *unit, uint64_t done, uint64_t total,
                     double gbps, int tty) {
  static int last_pct = -1;
  int pct = total ? (int)(done * 100 / total) : 100;
  if (!tty) { /* logs: one line per 25% */
    if (pct / 25 != last_pct / 25 || done == total)
      fprintf(stderr, "%s: %3d%% (%llu/%llu %s)\n", what, pct, (unsigned long long)done,
              (unsigned long long)total, unit);
    last_pct = pct;
    return;
  }
  char bar[41];
  int fill = pct * 40 / 100;
  for (int i = 0; i < 40; i++) bar[i] = i < fill ? '#' : '.';
  bar[40] = 0;
  fprintf(stderr, "\r%s [%s] %3d%%  %.2f GB/s", what, bar, pct, gbps);
  if (done == total) fputc('\n', stderr);
  last_pct = pct;
}

/* Top-k of the naive scalar reference for one query head: f64 accumulation rounded to
 * f32, as kvdex_exact_search_ref does, kept by topk.h's heap; best first in heap. */
static size_t ref_topk(const demo *d, uint32_t layer, uint32_t kvh, const float *q, uint64_t lo,
                       uint64_t hi, uint32_t k, kvdex_hit *heap, float *row) {
  kvdex__topk top;
  kvdex__topk_init(&top, heap, k);
  const char *base = (const char *)d->keys[layer] + (size_t)kvh * d->tokens * d->sh.head_dim * d->es;
  for (uint64_t t = lo; t < hi; t++) {
    kvdex_to_f32(d->sh.dtype, base + t * d->sh.head_dim * d->es, row, d->sh.head_dim);
    double s = 0;
    for (uint32_t i = 0; i < d->sh.head_dim; i++) s += (double)q[i] * (double)row[i];
    kvdex__topk_push(&top, t, (float)s);
  }
  return kvdex__topk_finish(&top);
}

/* Compares one head's result with the reference: same count, scores equal within
 * f32 rounding, and every returned id is one the reference ranks in its top-k
 * unless its score ties the k-th score within that rounding. */
static int check_head(const kvdex_hits *got, const kvdex_hit *want, size_t n_want, char *why,
                      size_t why_len) {
  if (got->n != n_want) {
    snprintf(why, why_len, "%u hits, reference has %zu", got->n, n_want);
    return 0;
  }
  for (size_t i = 0; i < n_want; i++) {
    double tol = 1e-4 * (fabs(want[i].score) + 1.0);
    if (fabs((double)got->scores[i] - want[i].score) > tol) {
      snprintf(why, why_len, "rank %zu: score %.6f, reference %.6f", i, got->scores[i],
               want[i].score);
      return 0;
    }
    if (i && (got->scores[i] > got->scores[i - 1] ||
              (got->scores[i] == got->scores[i - 1] && got->ids[i] < got->ids[i - 1]))) {
      snprintf(why, why_len, "rank %zu out of order", i);
      return 0;
    }
  }
  double kth = n_want ? want[n_want - 1].score : 0;
  for (size_t i = 0; i < n_want; i++) {
    int found = 0;
    for (size_t j = 0; j < n_want && !found; j++) found = want[j].id == got->ids[i];
    if (!found && fabs((double)got->scores[i] - kth) > 1e-4 * (fabs(kth) + 1.0)) {
      snprintf(why, why_len, "token %llu (score %.6f) is not in the reference top-%zu",
               (unsigned long long)got->ids[i], got->scores[i], n_want);
      return 0;
    }
  }
  return 1;
}

int kvdex_cmd_demo(int argc, char **argv) {
  kvdex_settings s;
  int rc = kvdex_cmd_preamble(
      &s, KVDEX_CMD_DEMO, "kvdex demo",
      "usage: kvdex demo [options]\n\n"
      "Creates a synthetic long-context sequence, ingests it, runs decode-step top-k\n"
      "searches, checks them against a naive scalar reference and reports throughput.\n"
      "Runs embedded by default; --uri grpc://HOST:PORT runs it against a server.",
      argc, argv);
  if (rc != KVDEX_CMD_RUN) return rc;
  int json = (int)kvdex_setting_num(&s, KVDEX_SET_JSON), tty = isatty(2);
  demo d = {0};
  d.sh.n_layers = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_LAYERS);
  d.sh.n_kv_heads = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_KV_HEADS);
  d.sh.n_q_heads = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_Q_HEADS);
  d.sh.head_dim = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_HEAD_DIM);
  d.sh.block_tokens = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_BLOCK_TOKENS);
  d.sh.dtype = (int)kvdex_setting_num(&s, KVDEX_SET_DTYPE);
  d.tokens = (uint64_t)kvdex_setting_num(&s, KVDEX_SET_TOKENS);
  d.es = kvdex_dtype_size(d.sh.dtype);
  uint32_t steps = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_STEPS);
  kvdex_search_req req = {.k = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_K),
                          .sinks = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_SINKS),
                          .window = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_WINDOW)};
  uint64_t seed = (uint64_t)kvdex_setting_num(&s, KVDEX_SET_SEED);
  const char *uri = kvdex_setting_str(&s, KVDEX_SET_URI);
  int exit_code = 1;
  kvdex_db *db = NULL;
  char seq_id[96];
  int created = 0;
  void *vbuf = NULL, *kbuf = NULL;
  float *q = NULL, *row = NULL, *gen = NULL;
  kvdex_hit *heap = NULL;
  double *lat = NULL;
  unsigned char *check_step = NULL;
  kvdex_pool *pool = NULL;
  int do_attend = (int)kvdex_setting_num(&s, KVDEX_SET_ATTEND);
  float *att_o = NULL, *att_lse = NULL, *den_o = NULL, *den_lse = NULL;
  double *att_lat = NULL, *den_lat = NULL, att_err_sum = 0, att_err_max = 0;
  uint32_t n_att = 0;
  uint64_t att_heads = 0;

  if (d.sh.n_q_heads % d.sh.n_kv_heads) {
    fprintf(stderr, "kvdex demo: --q-heads %u is not a multiple of --kv-heads %u\n",
            d.sh.n_q_heads, d.sh.n_kv_heads);
    exit_code = 2;
    goto out;
  }
  if ((uint64_t)req.sinks + req.window >= d.tokens) {
    fprintf(stderr, "kvdex demo: --sinks + --window must leave tokens to search\n");
    exit_code = 2;
    goto out;
  }
  kvdex_open_opts oo;
  kvdex_client_opts(&s, &oo);
  oo.memory_cap = (uint64_t)kvdex_setting_num(&s, KVDEX_SET_MEMORY);
  oo.threads = (unsigned)kvdex_setting_num(&s, KVDEX_SET_THREADS);
  if (kvdex_open(uri, &oo, &db)) {
    fprintf(stderr, "kvdex demo: cannot open %s: %s\n", uri, kvdex_errmsg());
    goto out;
  }
  snprintf(seq_id, sizeof seq_id, "demo-%ld-%llu", (long)getpid(), (unsigned long long)seed);
  if (kvdex_create(db, seq_id, &d.sh)) {
    fprintf(stderr, "kvdex demo: create: %s\n", kvdex_errmsg());
    goto out;
  }
  created = 1;
  double kv_bytes = 2.0 * d.sh.n_layers * d.sh.n_kv_heads * (double)d.tokens * d.sh.head_dim * d.es;
  if (!json)
    printf("kvdex demo on %s: %u layer(s) x %u kv heads x %u q heads x head_dim %u, %s, %llu tokens "
           "(%.1f MiB of K+V)\n",
           uri, d.sh.n_layers, d.sh.n_kv_heads, d.sh.n_q_heads, d.sh.head_dim,
           kvdex_dtype_name(d.sh.dtype), (unsigned long long)d.tokens, kv_bytes / 1048576);
  fflush(stdout);

  /* ---- ingest ---- */
  size_t head_elems = (size_t)d.tokens * d.sh.head_dim;
  uint32_t chunk_tokens = (uint32_t)(CHUNK_BYTES / (2 * d.sh.n_kv_heads * d.sh.head_dim * d.es));
  if (chunk_tokens < 16) chunk_tokens = 16;
  size_t chunk_elems = (size_t)d.sh.n_kv_heads * chunk_tokens * d.sh.head_dim;
  d.keys = calloc(d.sh.n_layers, sizeof(void *));
  kbuf = malloc(chunk_elems * d.es);
  vbuf = malloc(chunk_elems * d.es);
  gen = malloc(chunk_elems * sizeof(float));
  if (!d.keys || !kbuf || !vbuf || !gen) goto oom;
  for (uint32_t l = 0; l < d.sh.n_layers; l++)
    if (!(d.keys[l] = malloc((size_t)d.sh.n_kv_heads * head_elems * d.es))) goto oom;
  /* Keys share an offset direction per head (as real keys do) plus noise. */
  uint64_t rng = seed;
  double ingest_s = 0;
  uint64_t total_tok = (uint64_t)d.sh.n_layers * d.tokens, done_tok = 0;
  kvdex_appender *ap = NULL;
  if (kvdex_append_begin(db, seq_id, &ap)) goto fail;
  for (uint32_t l = 0; l < d.sh.n_layers; l++) {
    for (uint64_t t0 = 0; t0 < d.tokens; t0 += chunk_tokens) {
      uint32_t n = (uint32_t)(d.tokens - t0 < chunk_tokens ? d.tokens - t0 : chunk_tokens);
      size_t cnt = (size_t)d.sh.n_kv_heads * n * d.sh.head_dim;
      for (size_t i = 0; i < cnt; i++) gen[i] = kvdex_gauss4(&rng) + ((i % d.sh.head_dim) < 4 ? 1.5f : 0);
      kvdex_from_f32(d.sh.dtype, gen, kbuf, cnt);
      for (size_t i = 0; i < cnt; i++) gen[i] = kvdex_gauss4(&rng);
      kvdex_from_f32(d.sh.dtype, gen, vbuf, cnt);
      for (uint32_t h = 0; h < d.sh.n_kv_heads; h++)
        memcpy((char *)d.keys[l] + ((size_t)h * head_elems + t0 * d.sh.head_dim) * d.es,
               (char *)kbuf + (size_t)h * n * d.sh.head_dim * d.es, (size_t)n * d.sh.head_dim * d.es);
      double t = kvdex__now_s();
      rc = kvdex_append_kv(ap, l, t0, n, kbuf, vbuf);
      ingest_s += kvdex__now_s() - t;
      if (rc) {
        kvdex_append_abort(ap);
        goto fail;
      }
      done_tok += n;
      if (!json) progress("ingest", "tokens", done_tok, total_tok, done_tok * kv_bytes / total_tok / ingest_s / 1e9, tty);
    }
  }
  double t = kvdex__now_s();
  uint64_t appended = 0;
  rc = kvdex_append_commit(ap, &appended);
  ingest_s += kvdex__now_s() - t;
  if (rc) goto fail;
  if (appended != total_tok) {
    fprintf(stderr, "kvdex demo: server stored %llu tokens, expected %llu\n",
            (unsigned long long)appended, (unsigned long long)total_tok);
    goto out;
  }
  free(gen);
  gen = NULL;

  /* ---- decode-step searches ---- */
  size_t qn = (size_t)d.sh.n_q_heads * d.sh.head_dim;
  uint64_t eligible = d.tokens - req.sinks - req.window;
  double per_step = (double)d.sh.n_q_heads * (double)eligible * d.sh.head_dim;
  int64_t check_arg = kvdex_setting_num(&s, KVDEX_SET_CHECK);
  uint32_t n_check = check_arg >= 0 ? (uint32_t)check_arg
                     : per_step * steps <= CHECK_BUDGET ? steps
                     : (uint32_t)fmax(4.0, CHECK_BUDGET / per_step);
  if (n_check > steps) n_check = steps;
  check_step = calloc(steps, 1);
  lat = calloc(steps, sizeof(double));
  q = malloc(qn * sizeof(float));
  row = malloc(d.sh.head_dim * sizeof(float));
  uint32_t kk = req.k < eligible ? req.k : (uint32_t)eligible;
  heap = malloc((size_t)kk * sizeof(kvdex_hit));
  if (!check_step || !lat || !q || !row || !heap) goto oom;
  if (do_attend) {
    att_o = malloc(qn * sizeof(float));
    den_o = malloc(qn * sizeof(float));
    att_lse = malloc(d.sh.n_q_heads * sizeof(float));
    den_lse = malloc(d.sh.n_q_heads * sizeof(float));
    att_lat = calloc(steps, sizeof(double));
    den_lat = calloc(steps, sizeof(double));
    if (!att_o || !den_o || !att_lse || !den_lse || !att_lat || !den_lat) goto oom;
  }
  for (uint32_t c = 0; c < n_check;) { /* a random sample of steps, without repeats */
    uint32_t st = n_check == steps ? c : (uint32_t)(kvdex_splitmix64(&rng) % steps);
    if (!check_step[st]) { check_step[st] = 1; c++; }
  }
  double scanned_bytes = 0, search_s = 0;
  uint64_t heads_checked = 0, mismatches = 0;
  const char *ids[1] = {seq_id};
  for (uint32_t st = 0; st < steps; st++) {
    uint32_t layer = st % d.sh.n_layers;
    /* Each query head aims near a random past token of its KV head, so every step
     * has a few clear winners, as decode queries do. */
    for (uint32_t h = 0; h < d.sh.n_q_heads; h++) {
      uint32_t kvh = h / (d.sh.n_q_heads / d.sh.n_kv_heads);
      uint64_t target = req.sinks + kvdex_splitmix64(&rng) % eligible;
      kvdex_to_f32(d.sh.dtype,
                   (char *)d.keys[layer] + ((size_t)kvh * head_elems + target * d.sh.head_dim) * d.es,
                   q + (size_t)h * d.sh.head_dim, d.sh.head_dim);
      for (uint32_t i = 0; i < d.sh.head_dim; i++) q[(size_t)h * d.sh.head_dim + i] += 0.5f * kvdex_gauss4(&rng);
    }
    kvdex_search_out res = {0};
    const float *qs[1] = {q};
    double t1 = kvdex__now_s();
    rc = kvdex_search(db, layer, &req, 1, ids, qs, &res);
    lat[st] = kvdex__now_s() - t1;
    if (rc) goto fail;
    search_s += lat[st];
    scanned_bytes += (double)res.keys_scanned * d.sh.head_dim * d.es;
    if (check_step[st]) {
      for (uint32_t h = 0; h < d.sh.n_q_heads; h++) {
        uint32_t kvh = h / (d.sh.n_q_heads / d.sh.n_kv_heads);
        size_t n = ref_topk(&d, layer, kvh, q + (size_t)h * d.sh.head_dim, req.sinks,
                            d.tokens - req.window, kk, heap, row);
        char why[160];
        heads_checked++;
        if (!check_head(&res.heads[h], heap, n, why, sizeof why)) {
          if (mismatches++ < 5)
            fprintf(stderr, "kvdex demo: MISMATCH at step %u, q head %u: %s\n", st, h, why);
        }
      }
    }
    kvdex_search_out_free(&res);
    if (do_attend && check_step[st]) {
      /* Attend through the index (auto) vs the dense exact reference over the same
       * tokens [sinks, n - window): the error is what top-k attention loses. */
      kvdex_attend_item item = {.seq_id = seq_id, .q = q};
      kvdex_attend_options ao = {.k = req.k, .sinks = req.sinks, .window = req.window,
                                 .index = "auto"};
      float *o1[1] = {att_o}, *l1[1] = {att_lse}, *o2[1] = {den_o}, *l2[1] = {den_lse};
      double t2 = kvdex__now_s();
      if (kvdex_attend(db, layer, &ao, 1, &item, o1, l1, NULL)) goto fail;
      att_lat[n_att] = kvdex__now_s() - t2;
      ao.dense = 1;
      t2 = kvdex__now_s();
      if (kvdex_attend(db, layer, &ao, 1, &item, o2, l2, NULL)) goto fail;
      den_lat[n_att] = kvdex__now_s() - t2;
      n_att++;
      for (uint32_t h = 0; h < d.sh.n_q_heads; h++) {
        double num = 0, den = 0;
        for (uint32_t i = 0; i < d.sh.head_dim; i++) {
          double a = att_o[(size_t)h * d.sh.head_dim + i], b = den_o[(size_t)h * d.sh.head_dim + i];
          num += (a - b) * (a - b);
          den += b * b;
        }
        double e = den > 0 ? sqrt(num / den) : sqrt(num);
        att_err_sum += e;
        if (e > att_err_max) att_err_max = e;
        att_heads++;
      }
    }
    if (!json && (st + 1) % 20 == 0) progress("search", "steps", st + 1, steps, scanned_bytes / search_s / 1e9, tty);
  }
  double p50 = kvdex_percentile(lat, steps, 50) * 1e3, p99 = kvdex_percentile(lat, steps, 99) * 1e3;

  /* ---- the physical limit, measured now on this machine ---- */
  unsigned threads = (unsigned)kvdex_setting_num(&s, KVDEX_SET_THREADS);
  if (!threads) threads = (unsigned)sysconf(_SC_NPROCESSORS_ONLN);
  if (threads > 1 && kvdex_pool_create(threads - 1, &pool)) goto fail;
  double key_bytes_layer = (double)d.sh.n_kv_heads * d.tokens * d.sh.head_dim * d.es;
  double bw = kvdex_membw_read((size_t)key_bytes_layer, pool, 3);
  if (bw < 0) goto fail;
  double scan_gbps = scanned_bytes / search_s / 1e9, ingest_gbps = kv_bytes / ingest_s / 1e9;
  double att_p50 = 0, att_p99 = 0, den_p50 = 0, den_p99 = 0;
  double att_err_mean = att_heads ? att_err_sum / (double)att_heads : 0;
  if (n_att) {
    att_p50 = kvdex_percentile(att_lat, n_att, 50) * 1e3;
    att_p99 = kvdex_percentile(att_lat, n_att, 99) * 1e3;
    den_p50 = kvdex_percentile(den_lat, n_att, 50) * 1e3;
    den_p99 = kvdex_percentile(den_lat, n_att, 99) * 1e3;
  }

  if (json) {
    printf("{\"uri\":\"%s\",\"layers\":%u,\"kv_heads\":%u,\"q_heads\":%u,\"head_dim\":%u,"
           "\"dtype\":\"%s\",\"tokens\":%llu,\"kv_bytes\":%.0f,\"ingest_gbps\":%.3f,"
           "\"steps\":%u,\"k\":%u,\"search_p50_ms\":%.3f,\"search_p99_ms\":%.3f,"
           "\"scan_gbps\":%.3f,\"membw_gbps\":%.3f,\"membw_threads\":%u,\"scan_to_membw\":%.3f,"
           "\"steps_checked\":%u,\"heads_checked\":%llu,\"mismatches\":%llu",
           uri, d.sh.n_layers, d.sh.n_kv_heads, d.sh.n_q_heads, d.sh.head_dim,
           kvdex_dtype_name(d.sh.dtype), (unsigned long long)d.tokens, kv_bytes, ingest_gbps,
           steps, req.k, p50, p99, scan_gbps, bw / 1e9, threads, scan_gbps / (bw / 1e9), n_check,
           (unsigned long long)heads_checked, (unsigned long long)mismatches);
    if (do_attend)
      printf(",\"attend_steps\":%u,\"attend_rel_l2_mean\":%.6g,\"attend_rel_l2_max\":%.6g,"
             "\"attend_p50_ms\":%.3f,\"attend_p99_ms\":%.3f,\"dense_p50_ms\":%.3f,"
             "\"dense_p99_ms\":%.3f",
             n_att, att_err_mean, att_err_max, att_p50, att_p99, den_p50, den_p99);
    printf("}\n");
  } else {
    printf("ingest:  %.1f MiB of K+V in %.3f s = %.2f GB/s\n", kv_bytes / 1048576, ingest_s, ingest_gbps);
    printf("search:  %u decode steps, top-%u for each of %u q heads: p50 %.2f ms, p99 %.2f ms\n",
           steps, req.k, d.sh.n_q_heads, p50, p99);
    printf("scanned: %.2f GB/s of keys; memory read bandwidth of this machine: %.2f GB/s "
           "(%u threads), ratio %.2f\n",
           scan_gbps, bw / 1e9, threads, scan_gbps / (bw / 1e9));
    printf("check:   %u of %u steps (%llu q heads) against the naive scalar reference: %s\n",
           n_check, steps, (unsigned long long)heads_checked,
           mismatches ? "MISMATCHES (see above)" : "all top-k lists match");
    if (do_attend) {
      printf("attend:  %u steps, top-%u attention (index auto) vs dense over [sinks, n - window): "
             "relative L2 error of o over %llu q heads: mean %.3g, max %.3g\n",
             n_att, req.k, (unsigned long long)att_heads, att_err_mean, att_err_max);
      printf("         latency: attend p50 %.2f ms, p99 %.2f ms; dense p50 %.2f ms, p99 %.2f ms\n",
             att_p50, att_p99, den_p50, den_p99);
    }
  }
  exit_code = mismatches ? 1 : 0;
  goto out;
oom:
  fprintf(stderr, "kvdex demo: out of memory (try fewer --tokens or --layers)\n");
  goto out;
fail:
  fprintf(stderr, "kvdex demo: %s\n", kvdex_errmsg());
out:
  if (created) {
    uint64_t freed = 0;
    if (kvdex_delete(db, seq_id, &freed))
      fprintf(stderr, "kvdex demo: delete: %s\n", kvdex_errmsg());
    else if (!json)
      printf("cleanup: deleted %s, %.1f MiB returned\n", seq_id, (double)freed / 1048576);
  }
  kvdex_close(db);
  kvdex_pool_destroy(pool);
  if (d.keys)
    for (uint32_t l = 0; l < d.sh.n_layers; l++) free(d.keys[l]);
  free(d.keys);
  free(kbuf);
  free(vbuf);
  free(gen);
  free(q);
  free(row);
  free(heap);
  free(lat);
  free(check_step);
  free(att_o);
  free(att_lse);
  free(den_o);
  free(den_lse);
  free(att_lat);
  free(den_lat);
  kvdex_settings_free(&s);
  return exit_code;
}
