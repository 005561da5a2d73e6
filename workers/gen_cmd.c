/* gen_cmd: `kvdex gen` — runs the out-of-distribution generator (bench/gen.h) and
 * writes its arrays as .npy files for `kvdex bench recall` and for NumPy/PyTorch:
 *   keys.npy [N,D], values.npy [N,D], train_queries.npy [M,D], queries.npy [T,D]
 *   (all --dtype), needles.npy [K,2] float32 rows (position, query row), gen.json.
 * Files are written under temporary names and renamed once all are complete.
 */
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "bench/gen.h"
#include "bench/npy.h"
#include "index/index.h"
#include "kvstore/base.h"
#include "workers/cmd.h"
#include "workers/commands.h"
#include "workers/settings.h"

#define MAX_EXACT_F32 (1ull << 24) /* positions above this are not exact in float32 */

static const char *const FILES[] = {"keys.npy", "values.npy", "train_queries.npy", "queries.npy",
                                    "needles.npy", "gen.json"};
enum { N_FILES = sizeof FILES / sizeof FILES[0] };

/* mkdir -p. */
static int make_dir(const char *path) {
  char buf[4096];
  if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf)
    return kvdex__seterr(KVDEX_EINVAL, "--out: path too long");
  for (char *p = buf + 1;; p++) {
    if (*p == '/' || !*p) {
      char c = *p;
      *p = 0;
      if (mkdir(buf, 0777) && errno != EEXIST)
        return kvdex__seterr(KVDEX_EIO, "--out %s: cannot create %s: %s", path, buf,
                             strerror(errno));
      *p = c;
      if (!c) break;
    }
  }
  struct stat st;
  if (stat(path, &st) || !S_ISDIR(st.st_mode))
    return kvdex__seterr(KVDEX_EIO, "--out %s: not a directory", path);
  return 0;
}

static void file_path(char *buf, size_t len, const char *dir, const char *name, int tmp) {
  snprintf(buf, len, "%s/%s%s", dir, name, tmp ? ".tmp" : "");
}

/* Writes rows x dim f32 values as dtype into dir/name.tmp. */
static int write_matrix(const char *dir, const char *name, int dtype, const float *src,
                        uint64_t rows, uint32_t dim) {
  char path[4200];
  file_path(path, sizeof path, dir, name, 1);
  uint64_t shape[2] = {rows, dim};
  size_t n = (size_t)rows * dim;
  double t0 = kvdex__now_s();
  int rc;
  if (dtype == KVDEX_DTYPE_F32) {
    rc = kvdex_npy_write(path, dtype, 2, shape, src);
  } else {
    void *buf = malloc(n ? n * kvdex_dtype_size(dtype) : 1);
    if (!buf) return kvdex__seterr(KVDEX_ENOMEM, "%s: out of memory", name);
    kvdex__from_f32(dtype, src, buf, n);
    rc = kvdex_npy_write(path, dtype, 2, shape, buf);
    free(buf);
  }
  if (!rc)
    fprintf(stderr, "gen: wrote %s/%s [%llu, %u] %s, %.1f MiB in %.2f s\n", dir, name,
            (unsigned long long)rows, dim, kvdex_dtype_name(dtype),
            (double)n * kvdex_dtype_size(dtype) / 1048576.0, kvdex__now_s() - t0);
  return rc;
}

/* Counts the needles that are the exact top-1 of their query (gen.c places each one
 * against the keys as they are when it is planted, so a needle planted later for a
 * correlated query can outscore an earlier one). Warns about each that is not. */
static int check_needles(const kvdex_gen_opts *o, const kvdex_gen_data *g, uint32_t *n_top1) {
  uint32_t K = o->n_needles, d = o->dim;
  *n_top1 = 0;
  if (!K) return 0;
  enum { CHUNK = 1024 };
  float *q = malloc((size_t)K * d * sizeof(float)), *sc = malloc((size_t)K * CHUNK * sizeof(float));
  kvdex_hit *best = malloc(K * sizeof *best);
  if (!q || !sc || !best) {
    free(q), free(sc), free(best);
    return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  }
  for (uint32_t i = 0; i < K; i++) {
    memcpy(q + (size_t)i * d, g->test + (size_t)g->needle_query[i] * d, d * sizeof(float));
    best[i] = (kvdex_hit){UINT64_MAX, -INFINITY};
  }
  int rc = 0;
  for (uint64_t s = 0; s < o->n_keys && !rc; s += CHUNK) {
    size_t cnt = (size_t)(o->n_keys - s < CHUNK ? o->n_keys - s : CHUNK);
    rc = kvdex_score_keys(KVDEX_SIMD_AUTO, KVDEX_DTYPE_F32, g->keys + (size_t)s * d, cnt, d, q, K,
                          sc);
    for (uint32_t i = 0; i < K && !rc; i++)
      for (size_t j = 0; j < cnt; j++) {
        kvdex_hit h = {s + j, sc[(size_t)i * cnt + j]};
        if (kvdex_hit_better(h, best[i])) best[i] = h;
      }
  }
  for (uint32_t i = 0; i < K && !rc; i++) {
    if (best[i].id == g->needle_pos[i]) {
      (*n_top1)++;
      continue;
    }
    fprintf(stderr,
            "gen: warning: needle %u (position %llu) is not the top-1 of its query %u: key %llu "
            "scores higher (gen.c plants needles one by one)\n",
            i, (unsigned long long)g->needle_pos[i], g->needle_query[i],
            (unsigned long long)best[i].id);
  }
  free(q);
  free(sc);
  free(best);
  return rc;
}

static int write_meta(const char *dir, const kvdex_gen_opts *o, int dtype, uint32_t n_top1) {
  char path[4200];
  file_path(path, sizeof path, dir, "gen.json", 1);
  FILE *f = fopen(path, "w");
  if (!f) return kvdex__seterr(KVDEX_EIO, "%s: %s", path, strerror(errno));
  fprintf(f,
          "{\"generator\":\"kvdex gen\",\"keys\":%llu,\"dim\":%u,\"train_queries\":%u,"
          "\"test_queries\":%u,\"needles\":%u,\"seed\":%llu,\"dtype\":\"%s\",\"topics\":%u,"
          "\"span\":%u,\"key_offset\":%g,\"query_offset\":%g,\"query_scale\":%g,\"query_noise\":%g,\"noise\":%g,"
          "\"drift\":%g,\"heavy_frac\":%g,\"needles_top1\":%u,"
          "\"files\":{\"keys\":\"keys.npy\",\"values\":\"values.npy\","
          "\"train_queries\":\"train_queries.npy\",\"queries\":\"queries.npy\","
          "\"needles\":\"needles.npy\"},"
          "\"needles_layout\":\"float32 [K,2]: column 0 = key position, column 1 = row of "
          "queries.npy whose exact top-1 it is\"}\n",
          (unsigned long long)o->n_keys, o->dim, o->n_train, o->n_test, o->n_needles,
          (unsigned long long)o->seed, kvdex_dtype_name(dtype), o->topics, o->span,
          (double)o->key_offset, (double)o->query_offset, (double)o->query_scale,
          (double)o->query_noise, (double)o->noise, (double)o->drift, (double)o->heavy_frac, n_top1);
  int bad = ferror(f);
  if (fclose(f) || bad) return kvdex__seterr(KVDEX_EIO, "%s: write failed", path);
  return 0;
}

/* gen.h treats 0 as "use the default"; a requested 0 becomes the smallest float. */
static float real_or_tiny(const kvdex_settings *s, kvdex_setting_id id) {
  double v = kvdex_setting_real(s, id);
  return v == 0 ? FLT_MIN : (float)v;
}

int kvdex_cmd_gen(int argc, char **argv) {
  kvdex_settings s;
  int rc = kvdex_cmd_preamble(
      &s, KVDEX_CMD_GEN, "kvdex gen",
      "usage: kvdex gen --out DIR [options]\n\n"
      "Writes synthetic attention data whose decode queries are out-of-distribution\n"
      "with respect to the keys (bench/gen.h): DIR/keys.npy [N,D], DIR/values.npy [N,D],\n"
      "DIR/train_queries.npy [M,D] (prefill queries), DIR/queries.npy [T,D] (decode\n"
      "queries), all of --dtype; DIR/needles.npy, float32 [K,2], row i = (key position,\n"
      "row of queries.npy whose exact top-1 that key is); DIR/gen.json (the parameters).\n"
      "Deterministic for a given --seed. Feed the files to `kvdex bench recall`.",
      argc, argv);
  if (rc != KVDEX_CMD_RUN) return rc;
  const char *dir = kvdex_setting_str(&s, KVDEX_SET_GEN_OUT);
  int dtype = (int)kvdex_setting_num(&s, KVDEX_SET_DTYPE);
  kvdex_gen_opts o = {
      .n_keys = (uint64_t)kvdex_setting_num(&s, KVDEX_SET_GEN_KEYS),
      .dim = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_GEN_DIM),
      .n_train = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_GEN_TRAIN),
      .n_test = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_GEN_TEST),
      .topics = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_GEN_TOPICS),
      .span = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_GEN_SPAN),
      .key_offset = real_or_tiny(&s, KVDEX_SET_GEN_KEY_OFFSET),
      .query_offset = real_or_tiny(&s, KVDEX_SET_GEN_QUERY_OFFSET),
      .query_scale = real_or_tiny(&s, KVDEX_SET_GEN_QUERY_SCALE),
      .query_noise = real_or_tiny(&s, KVDEX_SET_GEN_QUERY_NOISE),
      .noise = real_or_tiny(&s, KVDEX_SET_GEN_NOISE),
      .drift = real_or_tiny(&s, KVDEX_SET_GEN_DRIFT),
      .heavy_frac = real_or_tiny(&s, KVDEX_SET_GEN_HEAVY),
      .n_needles = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_GEN_NEEDLES),
      .seed = (uint64_t)kvdex_setting_num(&s, KVDEX_SET_SEED),
  };
  const char *bad = NULL;
  char msg[256];
  if (!dir || !*dir) bad = "--out DIR is required";
  else if (dtype != KVDEX_DTYPE_F32 && dtype != KVDEX_DTYPE_F16)
    bad = "--dtype must be f32 or f16 (.npy has no bfloat16)";
  else if (o.n_needles > o.n_test) {
    snprintf(msg, sizeof msg, "--needles %u needs at least as many --test-queries (%u)",
             o.n_needles, o.n_test);
    bad = msg;
  } else if (o.n_needles && o.n_keys > MAX_EXACT_F32) {
    snprintf(msg, sizeof msg,
             "--needles with more than %llu --keys: needles.npy holds positions as float32, "
             "exact only up to 2^24 (use --needles 0)",
             MAX_EXACT_F32);
    bad = msg;
  }
  if (bad) {
    fprintf(stderr, "kvdex gen: %s\n", bad);
    kvdex_settings_free(&s);
    return 2;
  }
  kvdex_gen_defaults(&o);
  double mib = ((double)o.n_keys * 2 + o.n_train + o.n_test) * o.dim * 4 / 1048576.0;
  fprintf(stderr,
          "gen: %llu keys x %u, %u train + %u test queries, %u needles, seed %llu "
          "(%.0f MiB of f32 in memory)...\n",
          (unsigned long long)o.n_keys, o.dim, o.n_train, o.n_test, o.n_needles,
          (unsigned long long)o.seed, mib);
  if ((rc = make_dir(dir))) {
    fprintf(stderr, "kvdex gen: %s\n", kvdex_errmsg());
    kvdex_settings_free(&s);
    return 2;
  }
  kvdex_gen_data g;
  double t0 = kvdex__now_s();
  rc = kvdex_gen(&o, &g);
  if (rc) {
    fprintf(stderr, "kvdex gen: %s\n", kvdex_errmsg());
    kvdex_settings_free(&s);
    return rc == KVDEX_EINVAL ? 2 : 1;
  }
  fprintf(stderr, "gen: generated in %.2f s; writing %s\n", kvdex__now_s() - t0, dir);
  float *needles = malloc(((size_t)o.n_needles * 2 + 1) * sizeof(float));
  if (!needles) rc = kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  for (uint32_t i = 0; !rc && i < o.n_needles; i++) {
    needles[2 * i] = (float)g.needle_pos[i];
    needles[2 * i + 1] = (float)g.needle_query[i];
  }
  uint64_t nshape[2] = {o.n_needles, 2};
  uint32_t n_top1 = 0;
  if (!rc) rc = check_needles(&o, &g, &n_top1);
  char path[4200];
  if (!rc) rc = write_matrix(dir, "keys.npy", dtype, g.keys, o.n_keys, o.dim);
  if (!rc) rc = write_matrix(dir, "values.npy", dtype, g.values, o.n_keys, o.dim);
  if (!rc) rc = write_matrix(dir, "train_queries.npy", dtype, g.train, o.n_train, o.dim);
  if (!rc) rc = write_matrix(dir, "queries.npy", dtype, g.test, o.n_test, o.dim);
  if (!rc) {
    file_path(path, sizeof path, dir, "needles.npy", 1);
    rc = kvdex_npy_write(path, KVDEX_DTYPE_F32, 2, nshape, needles);
  }
  if (!rc) rc = write_meta(dir, &o, dtype, n_top1);
  /* All written: move them into place; on failure remove the temporaries. */
  for (int i = 0; i < N_FILES; i++) {
    char final[4200];
    file_path(path, sizeof path, dir, FILES[i], 1);
    file_path(final, sizeof final, dir, FILES[i], 0);
    if (rc) remove(path);
    else if (rename(path, final))
      rc = kvdex__seterr(KVDEX_EIO, "%s: %s", final, strerror(errno));
  }
  free(needles);
  kvdex_gen_free(&g);
  if (rc) {
    fprintf(stderr, "kvdex gen: %s\n", kvdex_errmsg());
    kvdex_settings_free(&s);
    return rc == KVDEX_EINVAL ? 2 : 1;
  }
  printf("wrote %s: keys.npy [%llu, %u], values.npy [%llu, %u], train_queries.npy [%u, %u], "
         "queries.npy [%u, %u] (%s), needles.npy [%u, 2] (float32: position, query row; %u "
         "of them the exact top-1), gen.json\n",
         dir, (unsigned long long)o.n_keys, o.dim, (unsigned long long)o.n_keys, o.dim, o.n_train,
         o.dim, o.n_test, o.dim, kvdex_dtype_name(dtype), o.n_needles, n_top1);
  kvdex_settings_free(&s); /* `dir` points into the settings */
  return 0;
}
