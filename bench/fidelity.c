/* fidelity: sparse-attention fidelity and Attend latency (see fidelity.h). */
#include "bench/fidelity.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/gen.h"
#include "bench/npy.h"
#include "engine/node.h"
#include "index/ann.h"
#include "index/attend.h"
#include "index/index.h"
#include "kvstore/base.h"
#include "kvstore/kvstore.h"

#define MAX_SPECS 16
#define MAX_BUDGETS 16
#define APPEND_CHUNK 8192

/* The layer's data before it goes into the store: per kv head, test queries and
 * needles; K and V are converted straight into the staging buffers. */
typedef struct fdata {
  uint64_t n;
  uint32_t H, G, D;
  void *k, *v;         /* [H][n][D] in the storage dtype */
  float **train;       /* [H] -> [P][D], or NULL */
  uint64_t n_train;    /* rows per head */
  float **test;        /* [H] -> [T][D] */
  uint64_t n_test;     /* rows per head */
  uint64_t *needle_pos;/* [H][nn] */
  uint32_t *needle_row;/* [H][nn] */
  uint32_t nn;
} fdata;

static void fdata_free(fdata *f) {
  for (uint32_t g = 0; f->train && g < f->H; g++) free(f->train[g]);
  for (uint32_t g = 0; f->test && g < f->H; g++) free(f->test[g]);
  free(f->train);
  free(f->test);
  free(f->k);
  free(f->v);
  free(f->needle_pos);
  free(f->needle_row);
  memset(f, 0, sizeof *f);
}

static void to_dtype(int dtype, const float *src, size_t count, void *dst) {
  if (dtype == KVDEX_DTYPE_F32) {
    memcpy(dst, src, count * sizeof(float));
  } else {
    uint16_t *o = dst;
    for (size_t i = 0; i < count; i++)
      o[i] = dtype == KVDEX_DTYPE_F16 ? kvdex__f32_to_f16(src[i]) : kvdex__f32_to_bf16(src[i]);
  }
}

static float *npy_f32(const kvdex_npy *a) { /* a fresh f32 copy of an f32/f16 array */
  float *o = malloc(a->count * sizeof(float) + 1);
  if (!o) return NULL;
  for (uint64_t i = 0; i < a->count; i++)
    o[i] = a->dtype == KVDEX_DTYPE_F32 ? ((const float *)a->data)[i]
                                       : kvdex__f16_to_f32(((const uint16_t *)a->data)[i]);
  return o;
}

static int alloc_heads(fdata *f, const kvdex_fidelity_opts *o) {
  size_t es = kvdex_dtype_size(o->dtype);
  f->k = malloc((size_t)f->H * f->n * f->D * es);
  f->v = malloc((size_t)f->H * f->n * f->D * es);
  f->train = calloc(f->H, sizeof *f->train);
  f->test = calloc(f->H, sizeof *f->test);
  f->needle_pos = calloc((size_t)f->H * (f->nn + 1), sizeof(uint64_t));
  f->needle_row = calloc((size_t)f->H * (f->nn + 1), sizeof(uint32_t));
  if (!f->k || !f->v || !f->train || !f->test || !f->needle_pos || !f->needle_row)
    return kvdex__seterr(KVDEX_ENOMEM, "fidelity: out of memory for %llu tokens x %u kv heads",
                         (unsigned long long)f->n, f->H);
  return 0;
}

/* Generated data: one generator run per kv head (its own seed). */
static int load_gen(const kvdex_fidelity_opts *o, fdata *f) {
  f->n = o->tokens;
  f->H = o->n_kv_heads;
  f->G = o->n_q_heads / o->n_kv_heads;
  f->D = o->head_dim;
  f->nn = o->n_needles;
  f->n_train = (uint64_t)KVDEX_MAX_QUERY_TOKENS * f->G;
  f->n_test = (uint64_t)o->steps * f->G;
  int rc = alloc_heads(f, o);
  if (rc) return rc;
  size_t es = kvdex_dtype_size(o->dtype), hd = (size_t)f->n * f->D;
  for (uint32_t g = 0; g < f->H; g++) {
    if (o->progress)
      fprintf(o->progress, "bench fidelity: generating kv head %u/%u (%llu tokens)\n", g + 1,
              f->H, (unsigned long long)f->n);
    kvdex_gen_opts go = {.n_keys = f->n, .dim = f->D, .n_train = (uint32_t)f->n_train,
                         .n_test = (uint32_t)f->n_test, .n_needles = f->nn,
                         .seed = o->seed * 1000003ull + g};
    kvdex_gen_data gd;
    if ((rc = kvdex_gen(&go, &gd))) return rc;
    to_dtype(o->dtype, gd.keys, hd, (char *)f->k + g * hd * es);
    to_dtype(o->dtype, gd.values, hd, (char *)f->v + g * hd * es);
    f->train[g] = gd.train;
    f->test[g] = gd.test;
    gd.train = gd.test = NULL;
    for (uint32_t i = 0; i < f->nn; i++) {
      f->needle_pos[(size_t)g * f->nn + i] = gd.needle_pos[i];
      f->needle_row[(size_t)g * f->nn + i] = gd.needle_query[i];
    }
    kvdex_gen_free(&gd);
  }
  return 0;
}

static int read_2d(const char *dir, const char *name, int required, uint32_t D, kvdex_npy *a) {
  char path[4200];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  memset(a, 0, sizeof *a);
  FILE *probe = fopen(path, "rb");
  if (!probe) {
    if (!required) return 1;
    return kvdex__seterr(KVDEX_EIO, "fidelity: %s is missing", path);
  }
  fclose(probe);
  int rc = kvdex_npy_read(path, a);
  if (rc) return rc;
  if (a->ndim != 2 || (D && a->shape[1] != D)) {
    kvdex_npy_free(a);
    return kvdex__seterr(KVDEX_EINVAL, "fidelity: %s must be 2-D [rows, %u]", path, D);
  }
  return 0;
}

/* .npy data in `kvdex gen`'s layout: one kv head, its group of query heads. */
static int load_npy(const kvdex_fidelity_opts *o, fdata *f, uint32_t *steps) {
  kvdex_npy K, V, Q, P, N;
  int rc = read_2d(o->data_dir, "keys.npy", 1, 0, &K);
  if (rc) return rc;
  f->D = (uint32_t)K.shape[1];
  f->n = K.shape[0];
  f->H = 1;
  f->G = o->n_q_heads / o->n_kv_heads;
  if ((rc = read_2d(o->data_dir, "values.npy", 1, f->D, &V))) goto out_k;
  if (V.shape[0] != f->n) {
    rc = kvdex__seterr(KVDEX_EINVAL, "fidelity: values.npy has %llu rows, keys.npy %llu",
                       (unsigned long long)V.shape[0], (unsigned long long)f->n);
    goto out_v;
  }
  if ((rc = read_2d(o->data_dir, "queries.npy", 1, f->D, &Q))) goto out_v;
  if (Q.shape[0] < f->G) {
    rc = kvdex__seterr(KVDEX_EINVAL, "fidelity: queries.npy needs at least %u rows (one step)",
                       f->G);
    goto out_q;
  }
  f->n_test = Q.shape[0];
  if (*steps > Q.shape[0] / f->G) *steps = (uint32_t)(Q.shape[0] / f->G);
  int have_p = read_2d(o->data_dir, "train_queries.npy", 0, f->D, &P);
  if (have_p < 0) {
    rc = have_p;
    goto out_q;
  }
  int have_n = read_2d(o->data_dir, "needles.npy", 0, 2, &N);
  if (have_n < 0) {
    rc = have_n;
    goto out_p;
  }
  f->nn = have_n == 0 ? (uint32_t)N.shape[0] : 0;
  f->n_train = have_p == 0 ? P.shape[0] : 0;
  kvdex_fidelity_opts o2 = *o;
  if ((rc = alloc_heads(f, &o2))) goto out_n;
  float *kf = npy_f32(&K), *vf = npy_f32(&V);
  f->test[0] = npy_f32(&Q);
  if (f->n_train) f->train[0] = npy_f32(&P);
  if (!kf || !vf || !f->test[0] || (f->n_train && !f->train[0])) {
    free(kf);
    free(vf);
    rc = kvdex__seterr(KVDEX_ENOMEM, "fidelity: out of memory converting the .npy data");
    goto out_n;
  }
  to_dtype(o->dtype, kf, (size_t)f->n * f->D, f->k);
  to_dtype(o->dtype, vf, (size_t)f->n * f->D, f->v);
  free(kf);
  free(vf);
  for (uint32_t i = 0; i < f->nn; i++) {
    float pos, row;
    if (N.dtype == KVDEX_DTYPE_F32) {
      pos = ((float *)N.data)[2 * i];
      row = ((float *)N.data)[2 * i + 1];
    } else {
      pos = kvdex__f16_to_f32(((uint16_t *)N.data)[2 * i]);
      row = kvdex__f16_to_f32(((uint16_t *)N.data)[2 * i + 1]);
    }
    if (!(pos >= 0 && pos < (float)f->n && row >= 0 && row < (float)f->n_test)) {
      rc = kvdex__seterr(KVDEX_EINVAL, "fidelity: needles.npy row %u is out of range", i);
      goto out_n;
    }
    f->needle_pos[i] = (uint64_t)pos;
    f->needle_row[i] = (uint32_t)row;
  }
out_n:
  if (have_n == 0) kvdex_npy_free(&N);
out_p:
  if (have_p == 0) kvdex_npy_free(&P);
out_q:
  kvdex_npy_free(&Q);
out_v:
  kvdex_npy_free(&V);
out_k:
  kvdex_npy_free(&K);
  return rc;
}

/* Appends K/V in chunks (one transaction each), then the prefill queries of the
 * tokens the store keeps (every stride-th token), the way an engine's prefill would. */
static int fill_store(const kvdex_fidelity_opts *o, const fdata *f, kvdex_seq *seq) {
  size_t es = kvdex_dtype_size(o->dtype), row = (size_t)f->D * es;
  size_t cb = (size_t)f->H * APPEND_CHUNK * row;
  char *kc = malloc(cb), *vc = malloc(cb), *qc = malloc((size_t)f->H * f->G * row);
  int rc = 0;
  if (!kc || !vc || !qc) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "fidelity: out of memory for append buffers");
    goto out;
  }
  double t0 = kvdex__now_s();
  for (uint64_t s = 0; s < f->n; s += APPEND_CHUNK) {
    uint32_t c = (uint32_t)(f->n - s < APPEND_CHUNK ? f->n - s : APPEND_CHUNK);
    for (uint32_t g = 0; g < f->H; g++) {
      memcpy(kc + (size_t)g * c * row, (char *)f->k + ((size_t)g * f->n + s) * row, c * row);
      memcpy(vc + (size_t)g * c * row, (char *)f->v + ((size_t)g * f->n + s) * row, c * row);
    }
    kvdex_txn *txn;
    if ((rc = kvdex_txn_begin(seq, &txn))) goto out;
    if ((rc = kvdex_txn_append(txn, 0, s, c, kc, vc)) || (rc = kvdex_txn_commit(txn, NULL))) {
      if (rc) kvdex_txn_abort(txn);
      goto out;
    }
    if (o->progress && ((s / APPEND_CHUNK) % 32 == 31 || s + c == f->n))
      fprintf(o->progress, "bench fidelity: appended %llu/%llu tokens (%.0f MB/s)\n",
              (unsigned long long)(s + c), (unsigned long long)f->n,
              (double)(s + c) * f->H * row * 2 / 1e6 / (kvdex__now_s() - t0));
  }
  if (!f->n_train) goto out;
  uint64_t stride = 1;
  while ((f->n + stride - 1) / stride > KVDEX_MAX_QUERY_TOKENS) stride *= 2;
  kvdex_txn *txn;
  if ((rc = kvdex_txn_begin(seq, &txn))) goto out;
  float *tmp = malloc((size_t)f->D * sizeof(float));
  if (!tmp) {
    kvdex_txn_abort(txn);
    rc = kvdex__seterr(KVDEX_ENOMEM, "fidelity: out of memory");
    goto out;
  }
  for (uint64_t t = 0, i = 0; t < f->n && !rc; t += stride, i++) {
    for (uint32_t g = 0; g < f->H; g++)
      for (uint32_t j = 0; j < f->G; j++) {
        const float *src = f->train[g] + ((i * f->G + j) % f->n_train) * f->D;
        memcpy(tmp, src, f->D * sizeof(float));
        to_dtype(o->dtype, tmp, f->D, qc + ((size_t)g * f->G + j) * row);
      }
    rc = kvdex_txn_append_q(txn, 0, t, 1, qc);
  }
  free(tmp);
  if (rc || (rc = kvdex_txn_commit(txn, NULL))) {
    if (rc) kvdex_txn_abort(txn);
  }
out:
  free(kc);
  free(vc);
  free(qc);
  return rc;
}

static int parse_budgets(const char *s, uint32_t *out, int *n) {
  *n = 0;
  const char *p = s ? s : "";
  while (*p) {
    char *end;
    if (*p < '0' || *p > '9') break;
    unsigned long v = strtoul(p, &end, 10);
    if (!v || v > KVDEX_MAX_K || *n == MAX_BUDGETS) break;
    out[(*n)++] = (uint32_t)v;
    p = end;
    if (*p == ',') p++;
    else if (*p) break;
  }
  if (*p || !*n)
    return kvdex__seterr(KVDEX_EINVAL,
                         "fidelity: --budgets '%s': expected up to %d comma-separated top-k "
                         "values in [1, %d], e.g. 256,1024,2048",
                         s ? s : "", MAX_BUDGETS, KVDEX_MAX_K);
  return 0;
}

static int split_specs(char *buf, char **specs, int *n) {
  *n = 0;
  for (char *save = NULL, *t = strtok_r(buf, ";", &save); t; t = strtok_r(NULL, ";", &save)) {
    while (*t == ' ') t++;
    size_t l = strlen(t);
    while (l && t[l - 1] == ' ') t[--l] = 0;
    if (!l) continue;
    if (*n == MAX_SPECS) return kvdex__seterr(KVDEX_EINVAL, "fidelity: at most %d specs", MAX_SPECS);
    specs[(*n)++] = t;
  }
  if (!*n) return kvdex__seterr(KVDEX_EINVAL, "fidelity: --index names no spec");
  return 0;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return (x > y) - (x < y);
}

static double pct(double *v, uint32_t n, double p) { /* sorts v */
  if (!n) return 0;
  qsort(v, n, sizeof *v, cmp_double);
  size_t i = (size_t)ceil(p * n) - 1;
  return v[i < n ? i : n - 1];
}

/* One result row. */
typedef struct frow {
  char spec[160];
  char used[16];
  uint32_t k;
  double err_mean, err_max, mass_mean, touched, p50_ms, p99_ms, build_s;
  uint64_t bytes;
  uint32_t needle_hits, needles;
} frow;

static void print_rows(const kvdex_fidelity_opts *o, const fdata *f, uint32_t steps,
                       const frow *rows, int nr, double dense_p50, double dense_p99, FILE *out) {
  if (o->json) {
    fprintf(out,
            "{\"bench\":\"fidelity\",\"tokens\":%llu,\"kv_heads\":%u,\"q_heads\":%u,"
            "\"head_dim\":%u,\"dtype\":\"%s\",\"logit_scale\":%g,\"steps\":%u,\"sinks\":%llu,\"window\":%llu,"
            "\"dense_p50_ms\":%.3f,\"dense_p99_ms\":%.3f,\"rows\":[",
            (unsigned long long)f->n, f->H, f->H * f->G, f->D, kvdex_dtype_name(o->dtype),
            (double)o->logit_scale, steps, (unsigned long long)o->sinks,
            (unsigned long long)o->window, dense_p50, dense_p99);
    for (int i = 0; i < nr; i++) {
      const frow *r = &rows[i];
      fprintf(out,
              "%s{\"index\":\"%s\",\"used\":\"%s\",\"k\":%u,\"rel_err_mean\":%.6g,"
              "\"rel_err_max\":%.6g,\"mass\":%.6g,\"touched_frac\":%.6g,\"attend_p50_ms\":%.3f,"
              "\"attend_p99_ms\":%.3f,\"build_s\":%.3f,\"index_bytes\":%llu,\"needle_hits\":%u,"
              "\"needles\":%u}",
              i ? "," : "", r->spec, r->used, r->k, r->err_mean, r->err_max, r->mass_mean,
              r->touched, r->p50_ms, r->p99_ms, r->build_s, (unsigned long long)r->bytes,
              r->needle_hits, r->needles);
    }
    fprintf(out, "]}\n");
    return;
  }
  fprintf(out,
          "fidelity: %llu tokens, %u kv heads / %u q heads, head_dim %u, %s; logits %g x q.k; "
          "%u steps; "
          "static part: %llu sinks + %llu window\n"
          "dense attention (exact reference, all tokens): p50 %.2f ms, p99 %.2f ms per layer\n\n",
          (unsigned long long)f->n, f->H, f->H * f->G, f->D, kvdex_dtype_name(o->dtype),
          (double)o->logit_scale, steps, (unsigned long long)o->sinks,
          (unsigned long long)o->window, dense_p50, dense_p99);
  fprintf(out, "  %-8s %6s %11s %11s %8s %9s %9s %9s %8s  %s\n", "used", "k", "rel_err", "max_err",
          "mass", "touched", "p50_ms", "p99_ms", "needles", "index");
  for (int i = 0; i < nr; i++) {
    const frow *r = &rows[i];
    char nd[24] = "-";
    if (r->needles) snprintf(nd, sizeof nd, "%u/%u", r->needle_hits, r->needles);
    fprintf(out, "  %-8s %6u %11.3e %11.3e %8.5f %8.3f%% %9.2f %9.2f %8s  %s\n", r->used, r->k,
            r->err_mean, r->err_max, r->mass_mean, 100 * r->touched, r->p50_ms, r->p99_ms, nd,
            r->spec);
  }
}

/* The state of one fidelity run: the store and node holding the layer, the data, and
 * buffers sized once for every spec and budget. */
typedef struct frun {
  const kvdex_fidelity_opts *o;
  fdata f;
  uint32_t steps, Hq, D, kmax;
  uint64_t n_st, eligible; /* static tokens (sinks + window), tokens left to retrieve */
  kvdex_store *store;
  kvdex_seq *seq;
  kvdex_pool *pool;
  kvdex_node *node; /* borrows store and pool */
  kvdex_node_ctx *nctx;
  kvdex_attend_scratch *as;
  kvdex_attend_opts ao;
  float *q, *o_ref, *lse_ref, *o_st, *lse_st, *o_a, *lse_a;
  uint64_t *ids, **idp, *st_ids;
  uint32_t *n_ids, *st_n;
  const uint64_t **st_p;
  double *lat, *errs;
} frun;

static void frun_free(frun *R) {
  if (R->node) kvdex_node_ctx_give(R->node, R->nctx);
  kvdex_node_destroy(R->node); /* before the store and the pool it borrows */
  kvdex_attend_scratch_destroy(R->as);
  kvdex_seq_release(R->seq);
  kvdex_store_destroy(R->store);
  kvdex_pool_destroy(R->pool);
  fdata_free(&R->f);
  free(R->q);
  free(R->o_ref);
  free(R->lse_ref);
  free(R->o_st);
  free(R->lse_st);
  free(R->o_a);
  free(R->lse_a);
  free(R->ids);
  free(R->idp);
  free(R->n_ids);
  free(R->st_ids);
  free(R->st_p);
  free(R->st_n);
  free(R->lat);
  free(R->errs);
}

/* Loads or generates the layer, puts it in a store behind a node, and sizes the
 * buffers for budgets up to kmax. */
static int frun_setup(frun *R, uint32_t kmax) {
  const kvdex_fidelity_opts *o = R->o;
  fdata *f = &R->f;
  int rc = o->data_dir && *o->data_dir ? load_npy(o, f, &R->steps) : load_gen(o, f);
  if (rc) return rc;
  const uint32_t Hq = R->Hq = f->H * f->G, D = R->D = f->D;
  if (!D || D > KVDEX_MAX_HEAD_DIM)
    return kvdex__seterr(KVDEX_EINVAL, "fidelity: head_dim %u out of [1, %d]", D,
                         KVDEX_MAX_HEAD_DIM);
  if (o->sinks + o->window >= f->n)
    return kvdex__seterr(KVDEX_EINVAL, "fidelity: sinks + window (%llu) leave no tokens of %llu",
                         (unsigned long long)(o->sinks + o->window), (unsigned long long)f->n);
  kvdex_shape shape = {1, f->H, Hq, D, o->block_tokens, o->dtype};
  unsigned threads = o->threads;
  if ((rc = kvdex_store_create(UINT64_MAX / 2, &R->store)) ||
      (rc = kvdex_seq_create(R->store, "bench", "fidelity", &shape)) ||
      (rc = kvdex_seq_open(R->store, "bench", "fidelity", &R->seq)) ||
      (threads != 1 && (rc = kvdex_pool_create(threads ? threads - 1 : 0, &R->pool))) ||
      (rc = kvdex_node_create(
           &(kvdex_node_opts){.store = R->store, .pool = R->pool, .build_threads = 1},
           &R->node)) ||
      (rc = kvdex_node_ctx_take(R->node, &R->nctx)) || (rc = kvdex_attend_scratch_create(&R->as)))
    return rc;
  if ((rc = fill_store(o, f, R->seq))) return rc;
  free(f->k);
  free(f->v);
  f->k = f->v = NULL;

  const uint32_t steps = R->steps;
  R->kmax = kmax;
  R->n_st = o->sinks + o->window;
  R->eligible = f->n - R->n_st;
  R->q = malloc((size_t)Hq * D * sizeof(float));
  R->o_ref = malloc((size_t)steps * Hq * D * sizeof(float));
  R->lse_ref = malloc((size_t)steps * Hq * sizeof(float));
  R->o_st = malloc((size_t)steps * Hq * D * sizeof(float));
  R->lse_st = malloc((size_t)steps * Hq * sizeof(float));
  R->o_a = malloc((size_t)Hq * D * sizeof(float));
  R->lse_a = malloc((size_t)Hq * sizeof(float));
  R->ids = malloc((size_t)Hq * kmax * sizeof(uint64_t));
  R->idp = malloc((size_t)Hq * sizeof(*R->idp));
  R->n_ids = malloc((size_t)Hq * sizeof(uint32_t));
  R->st_ids = malloc((R->n_st + 1) * sizeof(uint64_t));
  R->st_p = malloc((size_t)Hq * sizeof(*R->st_p));
  R->st_n = malloc((size_t)Hq * sizeof(uint32_t));
  R->lat = malloc((size_t)steps * sizeof(double));
  R->errs = malloc((size_t)steps * Hq * sizeof(double));
  if (!R->q || !R->o_ref || !R->lse_ref || !R->o_st || !R->lse_st || !R->o_a || !R->lse_a ||
      !R->ids || !R->idp || !R->n_ids || !R->st_ids || !R->st_p || !R->st_n || !R->lat ||
      !R->errs)
    return kvdex__seterr(KVDEX_ENOMEM, "fidelity: out of memory");
  R->ao = (kvdex_attend_opts){.scale = o->logit_scale};
  for (uint64_t i = 0; i < o->sinks; i++) R->st_ids[i] = i;
  for (uint64_t i = 0; i < o->window; i++) R->st_ids[o->sinks + i] = f->n - o->window + i;
  for (uint32_t h = 0; h < Hq; h++) {
    R->st_p[h] = R->st_ids;
    R->st_n[h] = (uint32_t)R->n_st;
    R->idp[h] = R->ids + (size_t)h * kmax;
  }
  return 0;
}

/* Step s's queries (every query head) into R->q. */
static void frun_query(frun *R, uint32_t s) {
  const fdata *f = &R->f;
  for (uint32_t h = 0; h < R->Hq; h++)
    memcpy(R->q + (size_t)h * R->D, f->test[h / f->G] + ((size_t)s * f->G + h % f->G) * R->D,
           R->D * sizeof(float));
}

/* The dense reference and the static part of every step; the dense latencies go to
 * R->lat. */
static int frun_reference(frun *R) {
  const size_t HqD = (size_t)R->Hq * R->D;
  for (uint32_t s = 0; s < R->steps; s++) {
    frun_query(R, s);
    double t0 = kvdex__now_s();
    int rc = kvdex_attend_dense(R->seq, 0, R->q, 0, 0, &R->ao, R->pool, R->as,
                                R->o_ref + s * HqD, R->lse_ref + (size_t)s * R->Hq);
    R->lat[s] = (kvdex__now_s() - t0) * 1e3;
    if (rc || (rc = kvdex_attend_ids(R->seq, 0, R->q, R->st_p, R->st_n, &R->ao, R->pool, R->as,
                                     R->o_st + s * HqD, R->lse_st + (size_t)s * R->Hq)))
      return rc;
  }
  return 0;
}

/* Builds spec (unless exact) and waits for it: *kind, the build's time and bytes
 * into r's template fields. */
static int frun_build(frun *R, const char *spec, int si, int ns, const char **kind,
                      kvdex_layer_index *info, frow *tmpl) {
  FILE *progress = R->o->progress;
  *kind = "exact";
  if (strncmp(spec, "exact", 5) == 0) return 0;
  if (progress) fprintf(progress, "bench fidelity: [%d/%d] building %s\n", si + 1, ns, spec);
  int rc = kvdex_node_build_index(R->node, R->seq, 0, spec, NULL, NULL);
  if (rc) return rc;
  for (;;) {
    struct timespec ts = {0, 50 * 1000 * 1000};
    nanosleep(&ts, NULL);
    if ((rc = kvdex_node_index_info(R->node, R->seq, 0, info))) return rc;
    if (info->state != KVDEX_INDEX_BUILDING) break;
  }
  if (info->state != KVDEX_INDEX_READY)
    return kvdex__seterr(KVDEX_EINVAL, "fidelity: building %s failed: %s", spec, info->error);
  *kind = info->kind;
  tmpl->build_s = info->build_seconds;
  tmpl->bytes = info->memory_bytes;
  if (progress)
    fprintf(progress, "bench fidelity: [%d/%d] built %s in %.1f s (%s)\n", si + 1, ns, spec,
            tmpl->build_s, info->describe);
  return 0;
}

/* Step s with budget k through `kind`: the Attend part (search + sparse attention,
 * timed into R->lat[s]), merged with the static part and compared with the reference
 * (errors into R->errs, mass and keys touched added to *mass and *touched), and the
 * needles of this step's queries counted into r. */
static int frun_step(frun *R, uint32_t s, const char *kind, uint32_t k, frow *r, double *mass,
                     double *touched) {
  const kvdex_fidelity_opts *o = R->o;
  const fdata *f = &R->f;
  const uint32_t Hq = R->Hq, D = R->D;
  frun_query(R, s);
  kvdex_search_opts so = {.k = k, .sinks = (uint32_t)o->sinks, .window = (uint32_t)o->window};
  const char *used = NULL;
  const kvdex_search_result *res = NULL;
  double t0 = kvdex__now_s();
  int rc = kvdex_node_search(R->node, R->nctx, R->seq, 0, R->q, &so, kind, NULL, &res, &used);
  if (rc) return rc;
  for (uint32_t h = 0; h < Hq; h++) {
    R->n_ids[h] = res->heads[h].n_hits;
    for (uint32_t i = 0; i < R->n_ids[h]; i++) R->idp[h][i] = res->heads[h].hits[i].id;
    qsort(R->idp[h], R->n_ids[h], sizeof(uint64_t), cmp_u64);
  }
  rc = kvdex_attend_ids(R->seq, 0, R->q, (const uint64_t *const *)R->idp, R->n_ids, &R->ao,
                        R->pool, R->as, R->o_a, R->lse_a);
  R->lat[s] = (kvdex__now_s() - t0) * 1e3;
  if (rc) return rc;
  snprintf(r->used, sizeof r->used, "%s", used);
  *touched += strcmp(used, "exact") == 0
                  ? (double)res->keys_scanned / ((double)f->H * R->eligible)
                  : (double)res->keys_scanned / ((double)Hq * R->eligible);
  for (uint32_t h = 0; h < Hq; h++) {
    float om[KVDEX_MAX_HEAD_DIM], lm;
    const size_t sh = (size_t)s * Hq + h;
    const float *ref = R->o_ref + sh * D;
    kvdex_merge_partials(R->o_a + (size_t)h * D, R->lse_a[h], R->o_st + sh * D, R->lse_st[sh], D,
                       om, &lm);
    double num = 0, den = 0;
    for (uint32_t t = 0; t < D; t++) {
      double dlt = (double)om[t] - ref[t];
      num += dlt * dlt;
      den += (double)ref[t] * ref[t];
    }
    R->errs[sh] = den > 0 ? sqrt(num / den) : sqrt(num);
    *mass += exp((double)lm - R->lse_ref[sh]);
  }
  /* needles whose query is this step's */
  for (uint32_t g = 0; g < f->H; g++)
    for (uint32_t i = 0; i < f->nn; i++) {
      uint32_t row = f->needle_row[(size_t)g * f->nn + i];
      if (row / f->G != s) continue;
      uint32_t h = g * f->G + row % f->G;
      uint64_t pos = f->needle_pos[(size_t)g * f->nn + i];
      int hit = pos < o->sinks || pos >= f->n - o->window;
      for (uint32_t j = 0; !hit && j < R->n_ids[h]; j++) hit = R->idp[h][j] == pos;
      r->needles++;
      r->needle_hits += (uint32_t)hit;
    }
  return 0;
}

/* One result row: every step with budget r->k through `kind`. */
static int frun_row(frun *R, const char *kind, frow *r) {
  const uint32_t steps = R->steps, Hq = R->Hq;
  double touched = 0, mass = 0;
  for (uint32_t s = 0; s < steps; s++) {
    int rc = frun_step(R, s, kind, r->k, r, &mass, &touched);
    if (rc) return rc;
  }
  double sum = 0, mx = 0;
  for (size_t i = 0; i < (size_t)steps * Hq; i++) {
    sum += R->errs[i];
    if (R->errs[i] > mx) mx = R->errs[i];
  }
  r->err_mean = sum / ((double)steps * Hq);
  r->err_max = mx;
  r->mass_mean = mass / ((double)steps * Hq);
  r->touched = touched / steps;
  r->p50_ms = pct(R->lat, steps, 0.5);
  r->p99_ms = pct(R->lat, steps, 0.99);
  if (R->o->progress)
    fprintf(R->o->progress,
            "bench fidelity: %s k=%u: rel_err %.3e, mass %.4f, touched %.3f%%, p99 %.2f ms\n",
            r->spec, r->k, r->err_mean, r->mass_mean, 100 * r->touched, r->p99_ms);
  return 0;
}

int kvdex_bench_fidelity(const kvdex_fidelity_opts *in, FILE *out) {
  kvdex_fidelity_opts o = *in;
  uint32_t budgets[MAX_BUDGETS];
  int nb = 0, ns = 0;
  char *spec_buf = strdup(o.index_specs ? o.index_specs : "");
  char *specs[MAX_SPECS];
  if (!spec_buf) return kvdex__seterr(KVDEX_ENOMEM, "fidelity: out of memory");
  int rc = parse_budgets(o.budgets, budgets, &nb);
  if (!rc) rc = split_specs(spec_buf, specs, &ns);
  for (int i = 0; !rc && i < ns; i++) {
    kvdex_index *probe = NULL;
    rc = kvdex_index_create(specs[i], &probe);
    kvdex_index_destroy(probe);
  }
  if (!rc && (!o.n_kv_heads || !o.n_q_heads || o.n_q_heads % o.n_kv_heads || !o.steps))
    rc = kvdex__seterr(KVDEX_EINVAL, "fidelity: --q-heads must be a multiple of --kv-heads");
  if (rc) {
    free(spec_buf);
    return rc;
  }
  frun R;
  memset(&R, 0, sizeof R);
  R.o = &o;
  R.steps = o.steps;
  frow *rows = NULL;
  int nr = 0;
  uint32_t kmax = 0;
  for (int b = 0; b < nb; b++) kmax = budgets[b] > kmax ? budgets[b] : kmax;
  if ((rc = frun_setup(&R, kmax)) || (rc = frun_reference(&R))) goto done;
  if (!(rows = calloc((size_t)ns * nb, sizeof *rows))) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "fidelity: out of memory");
    goto done;
  }
  double dense_p50 = pct(R.lat, R.steps, 0.5), dense_p99 = pct(R.lat, R.steps, 0.99);
  if (o.progress)
    fprintf(o.progress, "bench fidelity: dense reference over %u steps: p50 %.2f ms\n", R.steps,
            dense_p50);
  for (int si = 0; si < ns; si++) {
    kvdex_layer_index info;
    const char *kind;
    frow tmpl = {0};
    if ((rc = frun_build(&R, specs[si], si, ns, &kind, &info, &tmpl))) goto done;
    for (int b = 0; b < nb; b++) {
      frow *r = &rows[nr++];
      *r = tmpl;
      snprintf(r->spec, sizeof r->spec, "%s", specs[si]);
      r->k = budgets[b];
      if ((rc = frun_row(&R, kind, r))) goto done;
    }
  }
  print_rows(&o, &R.f, R.steps, rows, nr, dense_p50, dense_p99, out);

done:
  frun_free(&R);
  free(spec_buf);
  free(rows);
  return rc;
}
