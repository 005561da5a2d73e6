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

/* The run: its settings, the client handle and sequence, and the keys the reference
 * reads. */
typedef struct demo {
  kvdex_shape sh;
  uint64_t tokens;
  size_t es;
  void **keys; /* per layer: [n_kv_heads][tokens][head_dim] of dtype, for the reference */
  const char *uri;
  kvdex_search_req req;
  uint32_t steps;
  int64_t check;    /* --check: steps checked against the reference (-1: CHECK_BUDGET's) */
  uint64_t seed;
  uint64_t rng;     /* one stream from seed: the keys, then the checked steps and queries */
  unsigned threads; /* --threads (0 = all CPUs) */
  int json, tty, attend;
  double kv_bytes; /* K and V of every layer */
  kvdex_db *db;
  char seq_id[96];
  int created;
} demo;

/* What ingest and the search loop measured. */
typedef struct demo_stats {
  double ingest_s;       /* in the append and commit calls */
  double *lat, search_s; /* lat: [steps] seconds per search */
  double scanned_bytes;  /* key bytes the searches scanned */
  uint32_t n_check;      /* steps checked against the reference */
  uint64_t heads_checked, mismatches;
  double *att_lat, *den_lat; /* --attend: [n_att] seconds, index auto and dense */
  uint32_t n_att;
  uint64_t att_heads;              /* q heads compared, over n_att steps */
  double att_err_sum, att_err_max; /* relative L2 error of o */
} demo_stats;

/* How a part of the demo ended. DEMO_OOM and DEMO_FAIL leave the message to the
 * caller (the out-of-memory hint; kvdex_errmsg()); DEMO_REPORTED printed its own. */
enum { DEMO_OK, DEMO_OOM, DEMO_FAIL, DEMO_REPORTED };

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
    kvdex__to_f32(d->sh.dtype, base + t * d->sh.head_dim * d->es, row, d->sh.head_dim);
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

/* Reads the run's settings into d; returns 0, or 2 (usage) after saying why. */
static int demo_configure(demo *d, const kvdex_settings *s) {
  d->sh.n_layers = (uint32_t)kvdex_setting_num(s, KVDEX_SET_LAYERS);
  d->sh.n_kv_heads = (uint32_t)kvdex_setting_num(s, KVDEX_SET_KV_HEADS);
  d->sh.n_q_heads = (uint32_t)kvdex_setting_num(s, KVDEX_SET_Q_HEADS);
  d->sh.head_dim = (uint32_t)kvdex_setting_num(s, KVDEX_SET_HEAD_DIM);
  d->sh.block_tokens = (uint32_t)kvdex_setting_num(s, KVDEX_SET_BLOCK_TOKENS);
  d->sh.dtype = (int)kvdex_setting_num(s, KVDEX_SET_DTYPE);
  d->tokens = (uint64_t)kvdex_setting_num(s, KVDEX_SET_TOKENS);
  d->es = kvdex_dtype_size(d->sh.dtype);
  d->steps = (uint32_t)kvdex_setting_num(s, KVDEX_SET_STEPS);
  d->req = (kvdex_search_req){.k = (uint32_t)kvdex_setting_num(s, KVDEX_SET_K),
                              .sinks = (uint32_t)kvdex_setting_num(s, KVDEX_SET_SINKS),
                              .window = (uint32_t)kvdex_setting_num(s, KVDEX_SET_WINDOW)};
  d->check = kvdex_setting_num(s, KVDEX_SET_CHECK);
  d->seed = d->rng = (uint64_t)kvdex_setting_num(s, KVDEX_SET_SEED);
  d->uri = kvdex_setting_str(s, KVDEX_SET_URI);
  d->threads = (unsigned)kvdex_setting_num(s, KVDEX_SET_THREADS);
  d->json = (int)kvdex_setting_num(s, KVDEX_SET_JSON);
  d->tty = isatty(2);
  d->attend = (int)kvdex_setting_num(s, KVDEX_SET_ATTEND);
  d->kv_bytes =
      2.0 * d->sh.n_layers * d->sh.n_kv_heads * (double)d->tokens * d->sh.head_dim * d->es;
  if (d->sh.n_q_heads % d->sh.n_kv_heads) {
    fprintf(stderr, "kvdex demo: --q-heads %u is not a multiple of --kv-heads %u\n",
            d->sh.n_q_heads, d->sh.n_kv_heads);
    return 2;
  }
  if ((uint64_t)d->req.sinks + d->req.window >= d->tokens) {
    fprintf(stderr, "kvdex demo: --sinks + --window must leave tokens to search\n");
    return 2;
  }
  return 0;
}

/* Opens the store and creates the demo's sequence. */
static int demo_open(demo *d, const kvdex_settings *s) {
  kvdex_open_opts oo;
  kvdex_client_opts(s, &oo);
  oo.memory_cap = (uint64_t)kvdex_setting_num(s, KVDEX_SET_MEMORY);
  oo.threads = d->threads;
  if (kvdex_open(d->uri, &oo, &d->db)) {
    fprintf(stderr, "kvdex demo: cannot open %s: %s\n", d->uri, kvdex_errmsg());
    return DEMO_REPORTED;
  }
  snprintf(d->seq_id, sizeof d->seq_id, "demo-%ld-%llu", (long)getpid(),
           (unsigned long long)d->seed);
  if (kvdex_create(d->db, d->seq_id, &d->sh)) {
    fprintf(stderr, "kvdex demo: create: %s\n", kvdex_errmsg());
    return DEMO_REPORTED;
  }
  d->created = 1;
  if (!d->json)
    printf("kvdex demo on %s: %u layer(s) x %u kv heads x %u q heads x head_dim %u, %s, %llu "
           "tokens (%.1f MiB of K+V)\n",
           d->uri, d->sh.n_layers, d->sh.n_kv_heads, d->sh.n_q_heads, d->sh.head_dim,
           kvdex_dtype_name(d->sh.dtype), (unsigned long long)d->tokens, d->kv_bytes / 1048576);
  fflush(stdout);
  return DEMO_OK;
}

/* Generates n tokens of layer l from t0 on into kbuf and vbuf ([n_kv_heads][n][head_dim]
 * of dtype) and keeps the keys for the reference. Keys share an offset direction per
 * head (as real keys do) plus noise; values are noise. */
static void gen_chunk(demo *d, uint32_t l, uint64_t t0, uint32_t n, float *gen, void *kbuf,
                      void *vbuf) {
  const uint32_t hd = d->sh.head_dim;
  const size_t cnt = (size_t)d->sh.n_kv_heads * n * hd, head_elems = (size_t)d->tokens * hd;
  for (size_t i = 0; i < cnt; i++) gen[i] = kvdex__gauss4(&d->rng) + ((i % hd) < 4 ? 1.5f : 0);
  kvdex__from_f32(d->sh.dtype, gen, kbuf, cnt);
  for (size_t i = 0; i < cnt; i++) gen[i] = kvdex__gauss4(&d->rng);
  kvdex__from_f32(d->sh.dtype, gen, vbuf, cnt);
  for (uint32_t h = 0; h < d->sh.n_kv_heads; h++)
    memcpy((char *)d->keys[l] + ((size_t)h * head_elems + t0 * hd) * d->es,
           (char *)kbuf + (size_t)h * n * hd * d->es, (size_t)n * hd * d->es);
}

/* Appends every layer in messages of about CHUNK_BYTES with a progress bar; r->ingest_s
 * counts only the time in the client calls. */
static int append_all(demo *d, demo_stats *r, float *gen, void *kbuf, void *vbuf,
                      uint32_t chunk_tokens) {
  const uint64_t total_tok = (uint64_t)d->sh.n_layers * d->tokens;
  uint64_t done_tok = 0;
  kvdex_appender *ap = NULL;
  if (kvdex_append_begin(d->db, d->seq_id, &ap)) return DEMO_FAIL;
  for (uint32_t l = 0; l < d->sh.n_layers; l++) {
    for (uint64_t t0 = 0; t0 < d->tokens; t0 += chunk_tokens) {
      uint32_t n = (uint32_t)(d->tokens - t0 < chunk_tokens ? d->tokens - t0 : chunk_tokens);
      gen_chunk(d, l, t0, n, gen, kbuf, vbuf);
      double t = kvdex__now_s();
      int rc = kvdex_append_kv(ap, l, t0, n, kbuf, vbuf);
      r->ingest_s += kvdex__now_s() - t;
      if (rc) {
        kvdex_append_abort(ap);
        return DEMO_FAIL;
      }
      done_tok += n;
      if (!d->json)
        progress("ingest", "tokens", done_tok, total_tok,
                 done_tok * d->kv_bytes / total_tok / r->ingest_s / 1e9, d->tty);
    }
  }
  double t = kvdex__now_s();
  uint64_t appended = 0;
  int rc = kvdex_append_commit(ap, &appended);
  r->ingest_s += kvdex__now_s() - t;
  if (rc) return DEMO_FAIL;
  if (appended != total_tok) {
    fprintf(stderr, "kvdex demo: server stored %llu tokens, expected %llu\n",
            (unsigned long long)appended, (unsigned long long)total_tok);
    return DEMO_REPORTED;
  }
  return DEMO_OK;
}

/* Ingest: the keys kept for the reference (d->keys, freed by demo_cleanup) and the
 * append, through chunk buffers freed here. */
static int demo_ingest(demo *d, demo_stats *r) {
  const size_t head_elems = (size_t)d->tokens * d->sh.head_dim;
  uint32_t chunk_tokens =
      (uint32_t)(CHUNK_BYTES / (2 * d->sh.n_kv_heads * d->sh.head_dim * d->es));
  if (chunk_tokens < 16) chunk_tokens = 16;
  const size_t chunk_elems = (size_t)d->sh.n_kv_heads * chunk_tokens * d->sh.head_dim;
  int st = DEMO_OOM;
  d->keys = calloc(d->sh.n_layers, sizeof(void *));
  void *kbuf = malloc(chunk_elems * d->es), *vbuf = malloc(chunk_elems * d->es);
  float *gen = malloc(chunk_elems * sizeof(float));
  if (!d->keys || !kbuf || !vbuf || !gen) goto out;
  for (uint32_t l = 0; l < d->sh.n_layers; l++)
    if (!(d->keys[l] = malloc((size_t)d->sh.n_kv_heads * head_elems * d->es))) goto out;
  st = append_all(d, r, gen, kbuf, vbuf, chunk_tokens);
out:
  free(kbuf);
  free(vbuf);
  free(gen);
  return st;
}

/* The search loop's buffers. */
typedef struct step_bufs {
  float *q;               /* the step's queries: [n_q_heads][head_dim] */
  float *row;             /* one key in f32, for the reference */
  kvdex_hit *heap;        /* the reference's top-k of one head */
  unsigned char *checked; /* [steps]: 1 where the step is checked */
  float *att_o, *att_lse, *den_o, *den_lse; /* --attend: o and lse, index auto and dense */
} step_bufs;

static void step_bufs_free(step_bufs *b) {
  free(b->q);
  free(b->row);
  free(b->heap);
  free(b->checked);
  free(b->att_o);
  free(b->att_lse);
  free(b->den_o);
  free(b->den_lse);
}

/* Allocates b and the latency arrays of r (freed by demo_cleanup) for kk hits a head. */
static int step_bufs_alloc(const demo *d, demo_stats *r, step_bufs *b, uint32_t kk) {
  const size_t qn = (size_t)d->sh.n_q_heads * d->sh.head_dim;
  b->checked = calloc(d->steps, 1);
  r->lat = calloc(d->steps, sizeof(double));
  b->q = malloc(qn * sizeof(float));
  b->row = malloc(d->sh.head_dim * sizeof(float));
  b->heap = malloc((size_t)kk * sizeof(kvdex_hit));
  if (!b->checked || !r->lat || !b->q || !b->row || !b->heap) return DEMO_OOM;
  if (!d->attend) return DEMO_OK;
  b->att_o = malloc(qn * sizeof(float));
  b->den_o = malloc(qn * sizeof(float));
  b->att_lse = malloc(d->sh.n_q_heads * sizeof(float));
  b->den_lse = malloc(d->sh.n_q_heads * sizeof(float));
  r->att_lat = calloc(d->steps, sizeof(double));
  r->den_lat = calloc(d->steps, sizeof(double));
  if (!b->att_o || !b->den_o || !b->att_lse || !b->den_lse || !r->att_lat || !r->den_lat)
    return DEMO_OOM;
  return DEMO_OK;
}

/* Marks r->n_check steps to check: --check of them, or as many as CHECK_BUDGET allows
 * (at least 4); a random sample without repeats unless that is every step. */
static void pick_checked_steps(demo *d, demo_stats *r, unsigned char *checked) {
  const uint64_t eligible = d->tokens - d->req.sinks - d->req.window;
  const double per_step = (double)d->sh.n_q_heads * (double)eligible * d->sh.head_dim;
  const uint32_t steps = d->steps;
  uint32_t n_check = d->check >= 0 ? (uint32_t)d->check
                     : per_step * steps <= CHECK_BUDGET ? steps
                     : (uint32_t)fmax(4.0, CHECK_BUDGET / per_step);
  if (n_check > steps) n_check = steps;
  for (uint32_t c = 0; c < n_check;) {
    uint32_t st = n_check == steps ? c : (uint32_t)(kvdex__splitmix64(&d->rng) % steps);
    if (!checked[st]) { checked[st] = 1; c++; }
  }
  r->n_check = n_check;
}

/* One decode step's queries: each query head aims near a random past token of its KV
 * head, so every step has a few clear winners, as decode queries do. */
static void make_queries(demo *d, uint32_t layer, float *q) {
  const uint32_t hd = d->sh.head_dim, group = d->sh.n_q_heads / d->sh.n_kv_heads;
  const uint64_t eligible = d->tokens - d->req.sinks - d->req.window;
  const size_t head_elems = (size_t)d->tokens * hd;
  for (uint32_t h = 0; h < d->sh.n_q_heads; h++) {
    uint32_t kvh = h / group;
    uint64_t target = d->req.sinks + kvdex__splitmix64(&d->rng) % eligible;
    const char *key =
        (const char *)d->keys[layer] + ((size_t)kvh * head_elems + target * hd) * d->es;
    kvdex__to_f32(d->sh.dtype, key, q + (size_t)h * hd, hd);
    for (uint32_t i = 0; i < hd; i++) q[(size_t)h * hd + i] += 0.5f * kvdex__gauss4(&d->rng);
  }
}

/* Checks every head of step st's result against the reference top-kk; prints the
 * first five mismatches of the run. */
static void check_step(const demo *d, demo_stats *r, step_bufs *b, uint32_t st, uint32_t layer,
                       const kvdex_search_out *res, uint32_t kk) {
  const uint32_t group = d->sh.n_q_heads / d->sh.n_kv_heads;
  for (uint32_t h = 0; h < d->sh.n_q_heads; h++) {
    size_t n = ref_topk(d, layer, h / group, b->q + (size_t)h * d->sh.head_dim, d->req.sinks,
                        d->tokens - d->req.window, kk, b->heap, b->row);
    char why[160];
    r->heads_checked++;
    if (!check_head(&res->heads[h], b->heap, n, why, sizeof why)) {
      if (r->mismatches++ < 5)
        fprintf(stderr, "kvdex demo: MISMATCH at step %u, q head %u: %s\n", st, h, why);
    }
  }
}

/* Attend through the index (auto) vs the dense exact reference over the same tokens
 * [sinks, n - window), on step st's queries: the error is what top-k attention loses. */
static int attend_step(demo *d, demo_stats *r, step_bufs *b, uint32_t layer) {
  const uint32_t hd = d->sh.head_dim;
  kvdex_attend_item item = {.seq_id = d->seq_id, .q = b->q};
  kvdex_attend_options ao = {.k = d->req.k, .sinks = d->req.sinks, .window = d->req.window,
                             .index = "auto"};
  float *o1[1] = {b->att_o}, *l1[1] = {b->att_lse}, *o2[1] = {b->den_o}, *l2[1] = {b->den_lse};
  double t = kvdex__now_s();
  if (kvdex_attend(d->db, layer, &ao, 1, &item, o1, l1, NULL)) return DEMO_FAIL;
  r->att_lat[r->n_att] = kvdex__now_s() - t;
  ao.dense = 1;
  t = kvdex__now_s();
  if (kvdex_attend(d->db, layer, &ao, 1, &item, o2, l2, NULL)) return DEMO_FAIL;
  r->den_lat[r->n_att] = kvdex__now_s() - t;
  r->n_att++;
  for (uint32_t h = 0; h < d->sh.n_q_heads; h++) {
    double num = 0, den = 0;
    for (uint32_t i = 0; i < hd; i++) {
      double x = b->att_o[(size_t)h * hd + i], y = b->den_o[(size_t)h * hd + i];
      num += (x - y) * (x - y);
      den += y * y;
    }
    double e = den > 0 ? sqrt(num / den) : sqrt(num);
    r->att_err_sum += e;
    if (e > r->att_err_max) r->att_err_max = e;
    r->att_heads++;
  }
  return DEMO_OK;
}

/* The decode-step searches, timed, with the sampled steps checked (and attended with
 * --attend). */
static int demo_search(demo *d, demo_stats *r) {
  const uint64_t eligible = d->tokens - d->req.sinks - d->req.window;
  const uint32_t kk = d->req.k < eligible ? d->req.k : (uint32_t)eligible;
  step_bufs b = {0};
  int rc = step_bufs_alloc(d, r, &b, kk);
  if (rc) goto out;
  pick_checked_steps(d, r, b.checked);
  const char *ids[1] = {d->seq_id};
  for (uint32_t st = 0; st < d->steps; st++) {
    uint32_t layer = st % d->sh.n_layers;
    make_queries(d, layer, b.q);
    kvdex_search_out res = {0};
    const float *qs[1] = {b.q};
    double t = kvdex__now_s();
    int src = kvdex_search(d->db, layer, &d->req, 1, ids, qs, &res);
    r->lat[st] = kvdex__now_s() - t;
    if (src) {
      rc = DEMO_FAIL;
      goto out;
    }
    r->search_s += r->lat[st];
    r->scanned_bytes += (double)res.keys_scanned * d->sh.head_dim * d->es;
    if (b.checked[st]) check_step(d, r, &b, st, layer, &res, kk);
    kvdex_search_out_free(&res);
    if (d->attend && b.checked[st] && (rc = attend_step(d, r, &b, layer))) goto out;
    if (!d->json && (st + 1) % 20 == 0)
      progress("search", "steps", st + 1, d->steps, r->scanned_bytes / r->search_s / 1e9, d->tty);
  }
out:
  step_bufs_free(&b);
  return rc;
}

/* The physical limit, measured now on this machine: read bandwidth over one layer's
 * keys with the demo's thread count; *threads gets that count. */
static int measure_membw(const demo *d, double *bw, unsigned *threads) {
  kvdex_pool *pool = NULL;
  *threads = d->threads ? d->threads : (unsigned)sysconf(_SC_NPROCESSORS_ONLN);
  if (*threads > 1 && kvdex_pool_create(*threads - 1, &pool)) return DEMO_FAIL;
  double key_bytes_layer = (double)d->sh.n_kv_heads * d->tokens * d->sh.head_dim * d->es;
  *bw = kvdex_membw_read((size_t)key_bytes_layer, pool, 3);
  kvdex_pool_destroy(pool);
  return *bw < 0 ? DEMO_FAIL : DEMO_OK;
}

/* Prints the results, as one JSON object with --json. */
static void demo_report(const demo *d, const demo_stats *r, double bw, unsigned threads) {
  const kvdex_shape *sh = &d->sh;
  double p50 = kvdex_percentile(r->lat, d->steps, 50) * 1e3;
  double p99 = kvdex_percentile(r->lat, d->steps, 99) * 1e3;
  double scan_gbps = r->scanned_bytes / r->search_s / 1e9;
  double ingest_gbps = d->kv_bytes / r->ingest_s / 1e9;
  double att_p50 = 0, att_p99 = 0, den_p50 = 0, den_p99 = 0;
  double att_err_mean = r->att_heads ? r->att_err_sum / (double)r->att_heads : 0;
  if (r->n_att) {
    att_p50 = kvdex_percentile(r->att_lat, r->n_att, 50) * 1e3;
    att_p99 = kvdex_percentile(r->att_lat, r->n_att, 99) * 1e3;
    den_p50 = kvdex_percentile(r->den_lat, r->n_att, 50) * 1e3;
    den_p99 = kvdex_percentile(r->den_lat, r->n_att, 99) * 1e3;
  }
  if (d->json) {
    printf("{\"uri\":\"%s\",\"layers\":%u,\"kv_heads\":%u,\"q_heads\":%u,\"head_dim\":%u,"
           "\"dtype\":\"%s\",\"tokens\":%llu,\"kv_bytes\":%.0f,\"ingest_gbps\":%.3f,"
           "\"steps\":%u,\"k\":%u,\"search_p50_ms\":%.3f,\"search_p99_ms\":%.3f,"
           "\"scan_gbps\":%.3f,\"membw_gbps\":%.3f,\"membw_threads\":%u,\"scan_to_membw\":%.3f,"
           "\"steps_checked\":%u,\"heads_checked\":%llu,\"mismatches\":%llu",
           d->uri, sh->n_layers, sh->n_kv_heads, sh->n_q_heads, sh->head_dim,
           kvdex_dtype_name(sh->dtype), (unsigned long long)d->tokens, d->kv_bytes, ingest_gbps,
           d->steps, d->req.k, p50, p99, scan_gbps, bw / 1e9, threads, scan_gbps / (bw / 1e9),
           r->n_check, (unsigned long long)r->heads_checked, (unsigned long long)r->mismatches);
    if (d->attend)
      printf(",\"attend_steps\":%u,\"attend_rel_l2_mean\":%.6g,\"attend_rel_l2_max\":%.6g,"
             "\"attend_p50_ms\":%.3f,\"attend_p99_ms\":%.3f,\"dense_p50_ms\":%.3f,"
             "\"dense_p99_ms\":%.3f",
             r->n_att, att_err_mean, r->att_err_max, att_p50, att_p99, den_p50, den_p99);
    printf("}\n");
    return;
  }
  printf("ingest:  %.1f MiB of K+V in %.3f s = %.2f GB/s\n", d->kv_bytes / 1048576, r->ingest_s,
         ingest_gbps);
  printf("search:  %u decode steps, top-%u for each of %u q heads: p50 %.2f ms, p99 %.2f ms\n",
         d->steps, d->req.k, sh->n_q_heads, p50, p99);
  printf("scanned: %.2f GB/s of keys; memory read bandwidth of this machine: %.2f GB/s "
         "(%u threads), ratio %.2f\n",
         scan_gbps, bw / 1e9, threads, scan_gbps / (bw / 1e9));
  printf("check:   %u of %u steps (%llu q heads) against the naive scalar reference: %s\n",
         r->n_check, d->steps, (unsigned long long)r->heads_checked,
         r->mismatches ? "MISMATCHES (see above)" : "all top-k lists match");
  if (d->attend) {
    printf("attend:  %u steps, top-%u attention (index auto) vs dense over [sinks, n - window): "
           "relative L2 error of o over %llu q heads: mean %.3g, max %.3g\n",
           r->n_att, d->req.k, (unsigned long long)r->att_heads, att_err_mean, r->att_err_max);
    printf("         latency: attend p50 %.2f ms, p99 %.2f ms; dense p50 %.2f ms, p99 %.2f ms\n",
           att_p50, att_p99, den_p50, den_p99);
  }
}

/* Deletes the sequence (reporting what it returned), closes the store, frees the rest. */
static void demo_cleanup(demo *d, demo_stats *r) {
  if (d->created) {
    uint64_t freed = 0;
    if (kvdex_delete(d->db, d->seq_id, &freed))
      fprintf(stderr, "kvdex demo: delete: %s\n", kvdex_errmsg());
    else if (!d->json)
      printf("cleanup: deleted %s, %.1f MiB returned\n", d->seq_id, (double)freed / 1048576);
  }
  kvdex_close(d->db);
  if (d->keys)
    for (uint32_t l = 0; l < d->sh.n_layers; l++) free(d->keys[l]);
  free(d->keys);
  free(r->lat);
  free(r->att_lat);
  free(r->den_lat);
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
  demo d = {0};
  demo_stats r = {0};
  int exit_code = demo_configure(&d, &s);
  if (!exit_code) {
    double bw = 0;
    unsigned threads = 0;
    int st = demo_open(&d, &s);
    if (!st) st = demo_ingest(&d, &r);
    if (!st) st = demo_search(&d, &r);
    if (!st) st = measure_membw(&d, &bw, &threads);
    if (!st) demo_report(&d, &r, bw, threads);
    if (st == DEMO_OOM)
      fprintf(stderr, "kvdex demo: out of memory (try fewer --tokens or --layers)\n");
    else if (st == DEMO_FAIL)
      fprintf(stderr, "kvdex demo: %s\n", kvdex_errmsg());
    exit_code = st ? 1 : r.mismatches ? 1 : 0;
  }
  demo_cleanup(&d, &r);
  kvdex_settings_free(&s);
  return exit_code;
}
