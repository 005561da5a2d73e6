/* recall: `kvdex bench recall` — loads keys/queries (.npy), computes the exact top-k
 * once on all threads, then builds each index spec on the same key view and measures
 * recall@k, keys touched, single-thread queries/s, bytes per key, needle hits, and
 * optionally sweeps its search knob (ef / nprobe / blocks) without rebuilding.
 * The keys are not copied: the view's blocks point into the loaded array.
 */
#include "bench/recall.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench/bench.h"
#include "bench/npy.h"
#include "index/ann.h"
#include "index/index.h"
#include "index/topk.h"
#include "kvstore/base.h"

#define MAX_SPECS 64
#define SPEC_LEN 512
#define GT_GROUP 8     /* queries scored together in one pass over the keys */
#define GT_CHUNK 1024  /* keys per kvdex_score_keys call */
#define MAX_SWEEP 40

/* Every kind at its defaults, for "all". */
static const char *const ALL_KINDS[] = {"exact", "ivf", "hnsw", "graph", "landmark"};

typedef struct point {
  uint32_t value;      /* knob value (0: the kind has no knob) */
  double recall;       /* mean over queries of |hits ∩ exact| / |exact| */
  double touched_frac; /* mean keys touched / n */
  double qps;          /* queries per second, one thread */
  uint32_t needle_hits;
} point;

typedef struct spec_run {
  char spec[SPEC_LEN]; /* as given */
  kvdex_index *ix;
  const char *knob;    /* "ef", "nprobe", "blocks" or NULL */
  double build_s;
  size_t memory;
  point def;           /* at the spec's own parameters */
  point sweep[MAX_SWEEP];
  size_t n_sweep;
} spec_run;

typedef struct data {
  kvdex_npy keys;
  uint64_t n;
  uint32_t d;
  float *q;
  uint64_t nq;
  float *train;
  uint64_t n_train;
  uint64_t *needle_pos;
  uint32_t *needle_q;
  uint64_t n_needles;
  const void **blocks;
  kvdex_kv_view view;
  uint32_t k;
  uint64_t *truth;    /* [nq][k] exact top-k ids */
  uint32_t *n_truth;  /* [nq] */
} data;

/* ---- small helpers ------------------------------------------------------------ */

static void say(FILE *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(FILE *f, const char *fmt, ...) {
  if (!f) return;
  va_list ap;
  va_start(ap, fmt);
  fputs("bench recall: ", f);
  vfprintf(f, fmt, ap);
  fputc('\n', f);
  fflush(f);
  va_end(ap);
}

static char *trim(char *s) {
  while (isspace((unsigned char)*s)) s++;
  size_t n = strlen(s);
  while (n && isspace((unsigned char)s[n - 1])) s[--n] = 0;
  return s;
}

/* The u32 value of parameter `name` in a normalised spec ("ivf:nlist=64,nprobe=8"). */
static int spec_u32(const char *spec, const char *name, uint32_t *out) {
  char pat[32];
  for (int sep = 0; sep < 2; sep++) {
    snprintf(pat, sizeof pat, "%c%s=", sep ? ',' : ':', name);
    const char *p = strstr(spec, pat);
    if (p && isdigit((unsigned char)p[strlen(pat)])) {
      *out = (uint32_t)strtoul(p + strlen(pat), NULL, 10);
      return 0;
    }
  }
  return -1;
}

/* The search knob of a kind (ann.h's kvdex_index_params), or NULL. */
static const char *knob_of(const char *kind) {
  if (!strcmp(kind, "graph") || !strcmp(kind, "hnsw")) return "ef";
  if (!strcmp(kind, "ivf")) return "nprobe";
  if (!strcmp(kind, "landmark")) return "blocks";
  return NULL;
}

static void set_knob(kvdex_index_params *p, const char *knob, uint32_t v) {
  memset(p, 0, sizeof *p);
  if (!knob) return;
  if (!strcmp(knob, "ef")) p->ef = v;
  else if (!strcmp(knob, "nprobe")) p->nprobe = v;
  else p->blocks = v;
}

static void json_str(FILE *out, const char *s) {
  fputc('"', out);
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') fprintf(out, "\\%c", c);
    else if (c < 0x20) fprintf(out, "\\u%04x", c);
    else fputc(c, out);
  }
  fputc('"', out);
}

static void csv_str(FILE *out, const char *s) {
  fputc('"', out);
  for (; *s; s++) {
    if (*s == '"') fputc('"', out);
    fputc(*s, out);
  }
  fputc('"', out);
}

/* ---- loading ------------------------------------------------------------------ */

/* Reads a 2-D array (no rows allowed only if allow_empty). `what` names the flag. */
static int load_2d(const char *path, const char *what, int allow_empty, kvdex_npy *a) {
  int rc = kvdex_npy_read(path, a);
  if (rc) return kvdex__preerr(rc, what);
  if (a->ndim != 2 || (a->shape[0] == 0 && !allow_empty) || a->shape[1] == 0) {
    char shape[128] = "";
    size_t off = 0;
    for (int i = 0; i < a->ndim && off < sizeof shape; i++)
      off += (size_t)snprintf(shape + off, sizeof shape - off, "%s%llu", i ? ", " : "",
                              (unsigned long long)a->shape[i]);
    kvdex_npy_free(a);
    return kvdex__seterr(KVDEX_EINVAL,
                         "%s %s: expected a non-empty 2-D array [rows, dim], got shape (%s)",
                         what, path, shape);
  }
  return 0;
}

static int load_queries(const char *path, const char *what, int allow_empty, uint32_t d,
                        float **out, uint64_t *rows) {
  kvdex_npy a;
  int rc = load_2d(path, what, allow_empty, &a);
  if (rc) return rc;
  if (a.shape[1] != d) {
    kvdex_npy_free(&a);
    return kvdex__seterr(KVDEX_EINVAL, "%s %s: dim %llu does not match the keys' dim %u", what,
                         path, (unsigned long long)a.shape[1], d);
  }
  *rows = a.shape[0];
  *out = kvdex_npy_to_f32(&a);
  kvdex_npy_free(&a);
  if (!*out) return kvdex__seterr(KVDEX_ENOMEM, "%s %s: out of memory", what, path);
  for (uint64_t i = 0; i < *rows * d; i++)
    if (!isfinite((*out)[i]))
      return kvdex__seterr(KVDEX_EINVAL, "%s %s: row %llu has a non-finite value", what, path,
                           (unsigned long long)(i / d));
  return 0;
}

static int load_needles(const char *path, data *D) {
  kvdex_npy a;
  int rc = load_2d(path, "--needles", 1, &a);
  if (rc) return rc;
  if (a.shape[1] != 2) {
    kvdex_npy_free(&a);
    return kvdex__seterr(KVDEX_EINVAL,
                         "--needles %s: expected shape [K, 2] (position, query row), got [%llu, %llu]",
                         path, (unsigned long long)a.shape[0], (unsigned long long)a.shape[1]);
  }
  float *f = kvdex_npy_to_f32(&a);
  D->n_needles = a.shape[0];
  kvdex_npy_free(&a);
  D->needle_pos = malloc((D->n_needles + 1) * sizeof *D->needle_pos);
  D->needle_q = malloc((D->n_needles + 1) * sizeof *D->needle_q);
  if (!f || !D->needle_pos || !D->needle_q) {
    free(f);
    return kvdex__seterr(KVDEX_ENOMEM, "--needles: out of memory");
  }
  for (uint64_t i = 0; i < D->n_needles; i++) {
    float p = f[2 * i], q = f[2 * i + 1];
    if (!(p >= 0 && p == floorf(p) && p < (float)D->n && q >= 0 && q == floorf(q) &&
          q < (float)D->nq)) {
      free(f);
      return kvdex__seterr(KVDEX_EINVAL,
                           "--needles %s: row %llu (%g, %g) is not an integer (position < %llu, "
                           "query row < %llu)",
                           path, (unsigned long long)i, (double)p, (double)q,
                           (unsigned long long)D->n, (unsigned long long)D->nq);
    }
    D->needle_pos[i] = (uint64_t)p;
    D->needle_q[i] = (uint32_t)q;
  }
  free(f);
  return 0;
}

static void data_free(data *D) {
  kvdex_npy_free(&D->keys);
  free(D->q);
  free(D->train);
  free(D->needle_pos);
  free(D->needle_q);
  free(D->blocks);
  free(D->truth);
  free(D->n_truth);
  memset(D, 0, sizeof *D);
}

/* ---- exact ground truth ---------------------------------------------------------- */

typedef struct gt_ctx {
  data *D;
  float *scores;   /* per worker [GT_GROUP][GT_CHUNK] */
  kvdex_hit *heap; /* per worker [GT_GROUP][k] */
  size_t n_tasks;
  atomic_size_t done;
  atomic_int shown; /* tenths of progress already printed */
  atomic_int err;
  FILE *progress;
} gt_ctx;

static void gt_task(void *arg, size_t t, unsigned worker) {
  gt_ctx *c = arg;
  data *D = c->D;
  uint64_t q0 = (uint64_t)t * GT_GROUP;
  uint32_t g = (uint32_t)(D->nq - q0 < GT_GROUP ? D->nq - q0 : GT_GROUP);
  float *sc = c->scores + (size_t)worker * GT_GROUP * GT_CHUNK;
  kvdex_hit *heaps = c->heap + (size_t)worker * GT_GROUP * D->k;
  kvdex__topk top[GT_GROUP];
  for (uint32_t j = 0; j < g; j++) kvdex__topk_init(&top[j], heaps + (size_t)j * D->k, D->k);
  size_t row_bytes = (size_t)D->d * kvdex_dtype_size(D->keys.dtype);
  for (uint64_t s = 0; s < D->n; s += GT_CHUNK) {
    size_t cnt = (size_t)(D->n - s < GT_CHUNK ? D->n - s : GT_CHUNK);
    const char *rows = (const char *)D->keys.data + (size_t)s * row_bytes;
    int rc = kvdex_score_keys(KVDEX_SIMD_AUTO, D->keys.dtype, rows, cnt, D->d,
                              D->q + (size_t)q0 * D->d, g, sc);
    if (rc) {
      atomic_store(&c->err, rc);
      return;
    }
    for (uint32_t j = 0; j < g; j++) /* a NaN score is never a hit */
      kvdex__topk_push_run(&top[j], s, sc + (size_t)j * cnt, cnt);
  }
  for (uint32_t j = 0; j < g; j++) {
    uint32_t n = kvdex__topk_finish(&top[j]);
    for (uint32_t i = 0; i < n; i++) D->truth[(q0 + j) * D->k + i] = top[j].h[i].id;
    D->n_truth[q0 + j] = n;
  }
  size_t done = atomic_fetch_add(&c->done, 1) + 1;
  int tenth = (int)(done * 10 / c->n_tasks), shown = atomic_load(&c->shown);
  if (c->progress && tenth > shown && tenth < 10 &&
      atomic_compare_exchange_strong(&c->shown, &shown, tenth))
    say(c->progress, "exact top-k: %d%%", tenth * 10);
}

static int ground_truth(data *D, kvdex_pool *pool, FILE *progress) {
  gt_ctx c = {.D = D, .progress = progress};
  unsigned workers = kvdex_pool_size(pool) + 1;
  c.n_tasks = (size_t)((D->nq + GT_GROUP - 1) / GT_GROUP);
  c.scores = malloc((size_t)workers * GT_GROUP * GT_CHUNK * sizeof(float));
  c.heap = malloc((size_t)workers * GT_GROUP * D->k * sizeof(kvdex_hit));
  D->truth = malloc((size_t)D->nq * D->k * sizeof *D->truth);
  D->n_truth = calloc((size_t)D->nq, sizeof *D->n_truth);
  int rc = 0;
  if (!c.scores || !c.heap || !D->truth || !D->n_truth) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "exact top-k: out of memory");
  } else {
    /* Only worth a progress report when it takes more than a moment. */
    if ((double)D->n * D->nq * D->d < 2e9) c.progress = NULL;
    kvdex_pool_run(pool, c.n_tasks, gt_task, &c);
    rc = atomic_load(&c.err);
  }
  free(c.scores);
  free(c.heap);
  return rc;
}

/* ---- measuring one index ---------------------------------------------------------- */

typedef struct meas_buf {
  kvdex_hit *hits;   /* [nq][k] */
  uint32_t *n_hits;  /* [nq] */
  unsigned char *mark; /* [n], all zero between uses */
  kvdex_index_scratch *scratch;
} meas_buf;

static int measure(const data *D, const kvdex_index *ix, const kvdex_index_params *p, meas_buf *b,
                   point *out) {
  uint64_t touched_sum = 0;
  double t0 = kvdex__now_s();
  for (uint64_t j = 0; j < D->nq; j++) {
    uint64_t touched = 0;
    int rc = kvdex_index_search(ix, &D->view, D->q + (size_t)j * D->d, D->k, p, b->scratch,
                                b->hits + (size_t)j * D->k, &b->n_hits[j], &touched);
    if (rc) return rc;
    touched_sum += touched;
  }
  double dt = kvdex__now_s() - t0;
  double rsum = 0;
  for (uint64_t j = 0; j < D->nq; j++) {
    const uint64_t *t = D->truth + (size_t)j * D->k;
    uint32_t nt = D->n_truth[j];
    if (!nt) {
      rsum += 1;
      continue;
    }
    for (uint32_t i = 0; i < nt; i++) b->mark[t[i]] = 1;
    uint32_t found = 0;
    const kvdex_hit *h = b->hits + (size_t)j * D->k;
    for (uint32_t i = 0; i < b->n_hits[j]; i++)
      if (h[i].id < D->n && b->mark[h[i].id]) {
        found++;
        b->mark[h[i].id] = 0; /* a duplicate hit counts once */
      }
    for (uint32_t i = 0; i < nt; i++) b->mark[t[i]] = 0;
    rsum += (double)found / nt;
  }
  out->recall = rsum / (double)D->nq;
  out->touched_frac = (double)touched_sum / (double)D->nq / (double)D->n;
  out->qps = dt > 0 ? (double)D->nq / dt : 0;
  out->needle_hits = 0;
  for (uint64_t i = 0; i < D->n_needles; i++) {
    uint32_t q = D->needle_q[i];
    if (b->n_hits[q] && b->hits[(size_t)q * D->k].id == D->needle_pos[i]) out->needle_hits++;
  }
  return 0;
}

/* Knob values to sweep for a built index: ef 16..1024, nprobe 1..nlist, blocks
 * 1..all blocks, each doubling, the last one the maximum. */
static size_t sweep_values(const data *D, const kvdex_index *ix, const char *knob,
                           uint32_t *v) {
  size_t n = 0;
  const char *desc = kvdex_index_describe(ix);
  if (!knob) return 0;
  if (!strcmp(knob, "ef")) {
    for (uint32_t x = 16; x <= 1024 && n < MAX_SWEEP; x *= 2) v[n++] = x;
    return n;
  }
  uint32_t max = 0;
  if (!strcmp(knob, "nprobe")) {
    if (spec_u32(desc, "nlist", &max)) return 0;
  } else {
    uint32_t block = 0;
    if (spec_u32(desc, "block", &block) || !block) return 0;
    max = (uint32_t)((D->n + block - 1) / block);
  }
  for (uint64_t x = 1; x < max && n < MAX_SWEEP - 1; x *= 2) v[n++] = (uint32_t)x;
  if (max) v[n++] = max;
  return n;
}

/* ---- output --------------------------------------------------------------------------- */

static void print_text(FILE *out, const kvdex_recall_opts *o, const data *D, spec_run *runs,
                       size_t n_runs, double truth_s, unsigned threads, uint32_t needles_exact,
                       const char *skipped) {
  fprintf(out, "recall@%u: %llu keys x %u (%s, blocks of %u), %llu queries, %llu train queries",
          D->k, (unsigned long long)D->n, D->d, kvdex_dtype_name(D->keys.dtype),
          D->view.block_tokens, (unsigned long long)D->nq, (unsigned long long)D->n_train);
  if (D->n_needles) fprintf(out, ", %llu needles", (unsigned long long)D->n_needles);
  fprintf(out, "\nexact top-%u in %.2f s on %u threads; searches on 1 thread\n", D->k, truth_s,
          threads);
  if (D->n_needles)
    fprintf(out, "needles that are the exact top-1 of their query: %u/%llu\n", needles_exact,
            (unsigned long long)D->n_needles);
  if (*skipped) fprintf(out, "kinds not in this build, skipped: %s\n", skipped);
  char rk[16];
  snprintf(rk, sizeof rk, "recall@%u", D->k);
  fprintf(out, "\n%9s %8s %10s %9s %10s %9s %8s  %s\n", "build_s", "s/Mkeys", rk, "touched",
          "qps", "B/key", "needles", "index");
  for (size_t i = 0; i < n_runs; i++) {
    spec_run *r = &runs[i];
    char nd[32] = "-";
    if (D->n_needles)
      snprintf(nd, sizeof nd, "%u/%llu", r->def.needle_hits, (unsigned long long)D->n_needles);
    fprintf(out, "%9.3f %8.3f %10.4f %8.3f%% %10.1f %9.1f %8s  %s\n", r->build_s,
            r->build_s / ((double)D->n / 1e6), r->def.recall, 100 * r->def.touched_frac,
            r->def.qps, (double)r->memory / (double)D->n, nd, kvdex_index_describe(r->ix));
  }
  if (!o->sweep) return;
  fprintf(out, "\nsweep (no rebuild; 1 thread):\n%-9s %-7s %7s %10s %9s %10s %8s\n", "kind",
          "knob", "value", rk, "touched", "qps", "needles");
  for (size_t i = 0; i < n_runs; i++) {
    spec_run *r = &runs[i];
    for (size_t s = 0; s < r->n_sweep; s++) {
      point *p = &r->sweep[s];
      char nd[32] = "-";
      if (D->n_needles)
        snprintf(nd, sizeof nd, "%u/%llu", p->needle_hits, (unsigned long long)D->n_needles);
      fprintf(out, "%-9s %-7s %7u %10.4f %8.3f%% %10.1f %8s\n", kvdex_index_kind(r->ix),
              r->knob ? r->knob : "-",
              p->value, p->recall, 100 * p->touched_frac, p->qps, nd);
    }
  }
}

static void json_point(FILE *out, const data *D, const point *p) {
  fprintf(out, "\"recall\":%.6f,\"touched_frac\":%.6f,\"qps\":%.2f", p->recall, p->touched_frac,
          p->qps);
  if (D->n_needles) fprintf(out, ",\"needle_hits\":%u", p->needle_hits);
  else fprintf(out, ",\"needle_hits\":null");
}

static void print_json(FILE *out, const kvdex_recall_opts *o, const data *D, spec_run *runs,
                       size_t n_runs, double truth_s, unsigned threads, uint32_t needles_exact,
                       const char *skipped) {
  fprintf(out,
          "{\"bench\":\"recall\",\"keys\":%llu,\"dim\":%u,\"dtype\":\"%s\",\"block_tokens\":%u,"
          "\"queries\":%llu,\"train_queries\":%llu,\"needles\":%llu,\"k\":%u,\"threads\":%u,"
          "\"truth_s\":%.4f,",
          (unsigned long long)D->n, D->d, kvdex_dtype_name(D->keys.dtype), D->view.block_tokens,
          (unsigned long long)D->nq, (unsigned long long)D->n_train,
          (unsigned long long)D->n_needles, D->k, threads, truth_s);
  if (D->n_needles) fprintf(out, "\"needles_exact\":%u,", needles_exact);
  else fprintf(out, "\"needles_exact\":null,");
  fprintf(out, "\"skipped\":[");
  for (const char *p = skipped; *p;) {
    size_t n = strcspn(p, ",");
    fprintf(out, "%s\"%.*s\"", p == skipped ? "" : ",", (int)n, p);
    p += n + (p[n] == ',');
  }
  fprintf(out, "],\"results\":[");
  for (size_t i = 0; i < n_runs; i++) {
    spec_run *r = &runs[i];
    fprintf(out, "%s{\"spec\":", i ? "," : "");
    json_str(out, r->spec);
    fprintf(out, ",\"index\":");
    json_str(out, kvdex_index_describe(r->ix));
    fprintf(out, ",\"kind\":\"%s\",\"knob\":", kvdex_index_kind(r->ix));
    if (r->knob) fprintf(out, "\"%s\",\"value\":%u", r->knob, r->def.value);
    else fprintf(out, "null,\"value\":null");
    fprintf(out, ",\"build_s\":%.4f,\"build_s_per_mkeys\":%.4f,\"memory_bytes\":%zu,"
                 "\"bytes_per_key\":%.2f,",
            r->build_s, r->build_s / ((double)D->n / 1e6), r->memory,
            (double)r->memory / (double)D->n);
    json_point(out, D, &r->def);
    if (o->sweep) {
      fprintf(out, ",\"sweep\":[");
      for (size_t s = 0; s < r->n_sweep; s++) {
        fprintf(out, "%s{\"value\":%u,", s ? "," : "", r->sweep[s].value);
        json_point(out, D, &r->sweep[s]);
        fputc('}', out);
      }
      fputc(']', out);
    }
    fputc('}', out);
  }
  fprintf(out, "]}\n");
}

/* Fails early (before any work) when the CSV cannot be created. */
static int csv_writable(const char *path) {
  char tmp[4096];
  if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
    return kvdex__seterr(KVDEX_EINVAL, "--csv: path too long");
  FILE *f = fopen(tmp, "w");
  if (!f) return kvdex__seterr(KVDEX_EIO, "--csv %s: %s", path, strerror(errno));
  fclose(f);
  remove(tmp);
  return 0;
}

static int write_csv(const char *path, const kvdex_recall_opts *o, spec_run *runs, size_t n_runs) {
  char tmp[4096];
  if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
    return kvdex__seterr(KVDEX_EINVAL, "--csv: path too long");
  FILE *f = fopen(tmp, "w");
  if (!f) return kvdex__seterr(KVDEX_EIO, "--csv %s: %s", path, strerror(errno));
  fprintf(f, "kind,spec,knob,value,recall,touched_frac,qps\n");
  for (size_t i = 0; i < n_runs; i++) {
    spec_run *r = &runs[i];
    const point *pts = o->sweep && r->n_sweep ? r->sweep : &r->def;
    size_t n = o->sweep && r->n_sweep ? r->n_sweep : 1;
    for (size_t s = 0; s < n; s++) {
      fprintf(f, "%s,", kvdex_index_kind(r->ix));
      csv_str(f, kvdex_index_describe(r->ix));
      fprintf(f, ",%s,%u,%.6f,%.6f,%.2f\n", r->knob ? r->knob : "none", pts[s].value,
              pts[s].recall, pts[s].touched_frac, pts[s].qps);
    }
  }
  int bad = ferror(f);
  if (fclose(f) || bad || rename(tmp, path)) {
    remove(tmp);
    return kvdex__seterr(KVDEX_EIO, "--csv %s: write failed", path);
  }
  return 0;
}

/* ---- the benchmark ------------------------------------------------------------------ */

/* Splits o->index_specs into runs (creating each index), expanding "all". Kinds
 * "all" names that this build lacks go to `skipped` (comma-separated). */
static int parse_specs(const char *list, spec_run *runs, size_t *n_runs, char *skipped,
                       size_t skipped_len, FILE *progress) {
  *n_runs = 0;
  skipped[0] = 0;
  if (!list || !*list) return kvdex__seterr(KVDEX_EINVAL, "--index: no index spec given");
  char *copy = strdup(list);
  if (!copy) return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  int rc = 0;
  char *save = NULL;
  for (char *tok = strtok_r(copy, ";", &save); tok && !rc; tok = strtok_r(NULL, ";", &save)) {
    char *spec = trim(tok);
    if (!*spec) continue;
    int all = !strcmp(spec, "all");
    size_t n_each = all ? sizeof ALL_KINDS / sizeof ALL_KINDS[0] : 1;
    for (size_t e = 0; e < n_each && !rc; e++) {
      const char *s = all ? ALL_KINDS[e] : spec;
      if (*n_runs == MAX_SPECS) {
        rc = kvdex__seterr(KVDEX_EINVAL, "--index: more than %d specs", MAX_SPECS);
        break;
      }
      if (strlen(s) >= SPEC_LEN) {
        rc = kvdex__seterr(KVDEX_EINVAL, "--index: spec longer than %d characters", SPEC_LEN - 1);
        break;
      }
      spec_run *r = &runs[*n_runs];
      memset(r, 0, sizeof *r);
      int crc = kvdex_index_create(s, &r->ix);
      if (crc && all) { /* a bare kind fails only when this build lacks it */
        say(progress, "skipping '%s': %s", s, kvdex_errmsg());
        size_t off = strlen(skipped);
        snprintf(skipped + off, skipped_len - off, "%s%s", off ? "," : "", s);
        continue;
      }
      if (crc) {
        char pre[SPEC_LEN + 16];
        snprintf(pre, sizeof pre, "--index '%s'", s);
        rc = kvdex__preerr(crc, pre);
        break;
      }
      snprintf(r->spec, sizeof r->spec, "%s", s);
      r->knob = knob_of(kvdex_index_kind(r->ix));
      (*n_runs)++;
    }
  }
  free(copy);
  if (!rc && !*n_runs) rc = kvdex__seterr(KVDEX_EINVAL, "--index: no index spec given");
  return rc;
}

static int load_all(const kvdex_recall_opts *o, data *D) {
  if (!o->keys_path || !*o->keys_path)
    return kvdex__seterr(KVDEX_EINVAL, "--keys FILE.npy is required");
  if (!o->queries_path || !*o->queries_path)
    return kvdex__seterr(KVDEX_EINVAL, "--queries FILE.npy is required");
  int rc = load_2d(o->keys_path, "--keys", 0, &D->keys);
  if (rc) return rc;
  D->n = D->keys.shape[0];
  if (D->keys.shape[1] > 65536)
    return kvdex__seterr(KVDEX_EINVAL, "--keys %s: dim %llu is above 65536", o->keys_path,
                         (unsigned long long)D->keys.shape[1]);
  D->d = (uint32_t)D->keys.shape[1];
  if ((rc = load_queries(o->queries_path, "--queries", 0, D->d, &D->q, &D->nq))) return rc;
  if (D->nq > UINT32_MAX)
    return kvdex__seterr(KVDEX_EINVAL, "--queries: more than %u rows", UINT32_MAX);
  if (o->train_path && *o->train_path &&
      (rc = load_queries(o->train_path, "--train-queries", 1, D->d, &D->train, &D->n_train)))
    return rc;
  if (o->needles_path && *o->needles_path && (rc = load_needles(o->needles_path, D))) return rc;
  /* The key view: blocks of block_tokens rows pointing into the loaded array. */
  uint32_t bt = o->block_tokens ? o->block_tokens : 64;
  uint64_t nb = (D->n + bt - 1) / bt;
  D->blocks = malloc(nb * sizeof *D->blocks);
  if (!D->blocks) return kvdex__seterr(KVDEX_ENOMEM, "out of memory for %llu blocks",
                                       (unsigned long long)nb);
  size_t row_bytes = (size_t)D->d * kvdex_dtype_size(D->keys.dtype);
  for (uint64_t b = 0; b < nb; b++)
    D->blocks[b] = (const char *)D->keys.data + (size_t)(b * bt) * row_bytes;
  D->view = (kvdex_kv_view){.n_tokens = D->n, .block_tokens = bt, .head_dim = D->d,
                            .dtype = D->keys.dtype, .k_blocks = D->blocks, .v_blocks = NULL};
  D->k = o->k > D->n ? (uint32_t)D->n : o->k;
  if (!D->k) return kvdex__seterr(KVDEX_EINVAL, "--k must be at least 1");
  return 0;
}

int kvdex_bench_recall(const kvdex_recall_opts *o, FILE *out) {
  FILE *pr = o->progress;
  spec_run *runs = calloc(MAX_SPECS, sizeof *runs);
  if (!runs) return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  data D;
  memset(&D, 0, sizeof D);
  kvdex_pool *pool = NULL;
  meas_buf mb = {0};
  size_t n_runs = 0;
  char skipped[256];
  int rc = parse_specs(o->index_specs, runs, &n_runs, skipped, sizeof skipped, pr);
  if (rc) goto done;
  if (o->csv_path && *o->csv_path && (rc = csv_writable(o->csv_path))) goto done;
  say(pr, "loading %s and %s", o->keys_path ? o->keys_path : "(no --keys)",
      o->queries_path ? o->queries_path : "(no --queries)");
  if ((rc = load_all(o, &D))) goto done;
  if (o->k > D.n) say(pr, "k=%u is more than the %llu keys: using k=%u", o->k,
                      (unsigned long long)D.n, D.k);

  unsigned ncpu = o->threads ? o->threads : (unsigned)sysconf(_SC_NPROCESSORS_ONLN);
  if (ncpu < 1) ncpu = 1;
  if (ncpu > 1 && (rc = kvdex_pool_create(ncpu - 1, &pool))) goto done;

  say(pr, "exact top-%u of %llu queries over %llu keys x %u (%s) on %u threads", D.k,
      (unsigned long long)D.nq, (unsigned long long)D.n, D.d, kvdex_dtype_name(D.keys.dtype),
      ncpu);
  double t0 = kvdex__now_s();
  if ((rc = ground_truth(&D, pool, pr))) goto done;
  double truth_s = kvdex__now_s() - t0;
  say(pr, "exact top-k done in %.2f s", truth_s);
  uint32_t needles_exact = 0;
  for (uint64_t i = 0; i < D.n_needles; i++) {
    uint32_t q = D.needle_q[i];
    if (D.n_truth[q] && D.truth[(size_t)q * D.k] == D.needle_pos[i]) needles_exact++;
  }

  mb.hits = malloc((size_t)D.nq * D.k * sizeof *mb.hits);
  mb.n_hits = malloc((size_t)D.nq * sizeof *mb.n_hits);
  mb.mark = calloc((size_t)D.n, 1);
  if (!mb.hits || !mb.n_hits || !mb.mark) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "out of memory for %llu x %u hits",
                       (unsigned long long)D.nq, D.k);
    goto done;
  }
  if ((rc = kvdex_index_scratch_create(&mb.scratch))) goto done;

  kvdex_index_input in = {.keys = &D.view, .train_q = D.train, .n_train = D.n_train};
  for (size_t i = 0; i < n_runs; i++) {
    spec_run *r = &runs[i];
    say(pr, "[%zu/%zu] building %s", i + 1, n_runs, r->spec);
    t0 = kvdex__now_s();
    char pre[SPEC_LEN + 64];
    snprintf(pre, sizeof pre, "--index '%s': build failed", r->spec);
    if ((rc = kvdex_index_build(r->ix, &in, pool))) {
      kvdex__preerr(rc, pre);
      goto done;
    }
    r->build_s = kvdex__now_s() - t0;
    r->memory = kvdex_index_memory(r->ix);
    const char *desc = kvdex_index_describe(r->ix);
    if (r->knob) spec_u32(desc, r->knob, &r->def.value);
    say(pr, "[%zu/%zu] built %s in %.2f s; searching %llu queries on 1 thread", i + 1, n_runs,
        desc, r->build_s, (unsigned long long)D.nq);
    snprintf(pre, sizeof pre, "--index '%s': search failed", r->spec);
    if ((rc = measure(&D, r->ix, NULL, &mb, &r->def))) {
      kvdex__preerr(rc, pre);
      goto done;
    }
    say(pr, "[%zu/%zu] recall@%u %.4f, touched %.3f%%, %.0f queries/s", i + 1, n_runs, D.k,
        r->def.recall, 100 * r->def.touched_frac, r->def.qps);
    if (!o->sweep) continue;
    uint32_t vals[MAX_SWEEP];
    size_t nv = sweep_values(&D, r->ix, r->knob, vals);
    if (!nv) { /* no knob (exact): the one point it has */
      r->sweep[0] = r->def;
      r->n_sweep = 1;
      continue;
    }
    for (size_t s = 0; s < nv; s++) {
      kvdex_index_params p;
      set_knob(&p, r->knob, vals[s]);
      point *pt = &r->sweep[r->n_sweep];
      if ((rc = measure(&D, r->ix, &p, &mb, pt))) {
        snprintf(pre, sizeof pre, "--index '%s' %s=%u: search failed", r->spec, r->knob, vals[s]);
        kvdex__preerr(rc, pre);
        goto done;
      }
      pt->value = vals[s];
      r->n_sweep++;
      say(pr, "[%zu/%zu] sweep %s=%u: recall %.4f, touched %.3f%%, %.0f queries/s", i + 1,
          n_runs, r->knob, vals[s], pt->recall, 100 * pt->touched_frac, pt->qps);
    }
  }
  if (o->csv_path && *o->csv_path && (rc = write_csv(o->csv_path, o, runs, n_runs))) goto done;
  if (o->json) print_json(out, o, &D, runs, n_runs, truth_s, ncpu, needles_exact, skipped);
  else print_text(out, o, &D, runs, n_runs, truth_s, ncpu, needles_exact, skipped);
  fflush(out);
done:
  kvdex_index_scratch_destroy(mb.scratch);
  free(mb.hits);
  free(mb.n_hits);
  free(mb.mark);
  for (size_t i = 0; i < MAX_SPECS; i++) kvdex_index_destroy(runs[i].ix);
  free(runs);
  kvdex_pool_destroy(pool);
  data_free(&D);
  return rc;
}
