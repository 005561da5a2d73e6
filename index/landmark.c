/* landmark: the "landmark" index kind — one representative per block of T tokens
 * (Landmark Attention; Quest). A search scores the representatives, keeps the
 * `blocks` best blocks, then scores every key inside them exactly. Representatives:
 *   mode=mean    the mean key of the block (q·mean = the block's mean score);
 *   mode=minmax  per-channel max and min of the block (Quest): the block score
 *                sum_i max(q_i*min_i, q_i*max_i) = q+·max + q-·min is an upper
 *                bound of q·k for every key k of the block;
 *   mode=given   caller-supplied landmark keys (kvdex_index_input.landmarks).
 * It keeps no keys of its own, only the representatives (f32), and never reads
 * tokens past the ones it was built on.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "index/ann_int.h"
#include "index/ann_kinds.h"

enum { MODE_MEAN = 0, MODE_MINMAX = 1, MODE_GIVEN = 2 };
static const char *const kModes[] = {"mean", "minmax", "given"};

#define DEFAULT_BLOCKS 16
#define SINGLE_VIEW_BLOCK 64 /* tokens per block when the view is one store block */
#define MAX_BLOCK (1u << 20)
#define MAX_BLOCKS (1u << 24)
#define CHUNK 1024 /* keys scored per kvdex_score_keys call */

typedef struct landmark {
  int mode;
  uint32_t block_spec; /* the spec's block (0 = auto) */
  uint32_t blocks;     /* blocks selected per search */
  uint32_t block;      /* tokens per representative, resolved at build (0 = unbuilt) */
  uint64_t n_reps;
  uint32_t rep_dim;    /* dim, or 2*dim for minmax: the max row, then the min row */
  float *reps;         /* [n_reps][rep_dim] */
} landmark;

static int lm_init(kvdex_index *ix) {
  landmark *lm = calloc(1, sizeof *lm);
  if (!lm) return kvdex__seterr(KVDEX_ENOMEM, "landmark: out of memory");
  lm->mode = MODE_MINMAX; /* finds needles; mean dilutes them (see the tests) */
  lm->blocks = DEFAULT_BLOCKS;
  ix->impl = lm;
  return 0;
}

#define LM_PARAMS \
  "mode=mean|minmax|given, block=<tokens per representative>, blocks=<blocks searched>"

static int lm_param(kvdex_index *ix, const char *name, const char *value) {
  landmark *lm = ix->impl;
  if (!strcmp(name, "mode")) {
    for (int m = 0; m < 3; m++)
      if (!strcmp(value, kModes[m])) {
        lm->mode = m;
        return 0;
      }
    return kvdex__seterr(KVDEX_EINVAL, "landmark: bad mode '%.40s' (accepted: mean, minmax, given)",
                         value);
  }
  if (!strcmp(name, "block")) {
    if (!strcmp(value, "auto")) {
      lm->block_spec = 0;
      return 0;
    }
    if (kvdex__parse_u32(value, 1, MAX_BLOCK, &lm->block_spec))
      return kvdex__seterr(KVDEX_EINVAL,
                           "landmark: bad block '%.40s' (an integer in 1..%u, or auto)", value,
                           MAX_BLOCK);
    return 0;
  }
  if (!strcmp(name, "blocks")) {
    if (kvdex__parse_u32(value, 1, MAX_BLOCKS, &lm->blocks))
      return kvdex__seterr(KVDEX_EINVAL, "landmark: bad blocks '%.40s' (an integer in 1..%u)",
                           value, MAX_BLOCKS);
    return 0;
  }
  return kvdex__seterr(KVDEX_EINVAL,
                       "landmark: unknown parameter '%.40s' (accepted: " LM_PARAMS ")", name);
}

static void lm_spec(const kvdex_index *ix, char *buf, size_t len) {
  const landmark *lm = ix->impl;
  uint32_t block = ix->n_built && lm->block ? lm->block : lm->block_spec;
  if (block)
    snprintf(buf, len, "landmark:mode=%s,block=%u,blocks=%u", kModes[lm->mode], block, lm->blocks);
  else
    snprintf(buf, len, "landmark:mode=%s,block=auto,blocks=%u", kModes[lm->mode], lm->blocks);
}

/* ---- build ---------------------------------------------------------------------- */

typedef struct build_ctx {
  const kvdex_kv_view *keys;
  uint64_t n;
  uint32_t d, block, mode;
  uint64_t n_reps, per_task;
  float *reps;
  float *rowbuf;   /* [workers][d] */
  double *accbuf;  /* [workers][d] */
} build_ctx;

static void build_task(void *arg, size_t task, unsigned worker) {
  build_ctx *c = arg;
  uint32_t d = c->d;
  float *row = c->rowbuf + (size_t)worker * d;
  double *acc = c->accbuf + (size_t)worker * d;
  uint64_t b0 = task * c->per_task, b1 = b0 + c->per_task;
  if (b1 > c->n_reps) b1 = c->n_reps;
  for (uint64_t b = b0; b < b1; b++) {
    uint64_t t0 = b * c->block, t1 = t0 + c->block;
    if (t1 > c->n) t1 = c->n;
    if (c->mode == MODE_MEAN) {
      float *out = c->reps + b * d;
      memset(acc, 0, d * sizeof *acc);
      for (uint64_t t = t0; t < t1; t++) {
        kvdex__view_row_f32(c->keys, t, row);
        for (uint32_t i = 0; i < d; i++) acc[i] += row[i];
      }
      for (uint32_t i = 0; i < d; i++) out[i] = (float)(acc[i] / (double)(t1 - t0));
    } else { /* MODE_MINMAX */
      float *mx = c->reps + b * 2 * d, *mn = mx + d;
      for (uint32_t i = 0; i < d; i++) {
        mx[i] = -INFINITY;
        mn[i] = INFINITY;
      }
      for (uint64_t t = t0; t < t1; t++) {
        kvdex__view_row_f32(c->keys, t, row);
        for (uint32_t i = 0; i < d; i++) {
          if (row[i] > mx[i]) mx[i] = row[i];
          if (row[i] < mn[i]) mn[i] = row[i];
        }
      }
    }
  }
}

static int lm_build(kvdex_index *ix, const kvdex_index_input *in, kvdex_pool *pool) {
  landmark *lm = ix->impl;
  const kvdex_kv_view *keys = in->keys;
  uint64_t n = keys->n_tokens;
  uint32_t d = keys->head_dim, T;
  if (lm->mode == MODE_GIVEN) {
    if (in->landmark_block && lm->block_spec && in->landmark_block != lm->block_spec)
      return kvdex__seterr(KVDEX_EINVAL, "landmark: landmark_block %u but the spec says block=%u",
                           in->landmark_block, lm->block_spec);
    T = in->landmark_block ? in->landmark_block
        : lm->block_spec   ? lm->block_spec
                           : keys->block_tokens;
    if (T > MAX_BLOCK)
      return kvdex__seterr(KVDEX_EINVAL, "landmark: landmark_block %u above %u", T, MAX_BLOCK);
  } else {
    /* auto: the store's blocks, unless the view is a single (or a huge) block */
    T = lm->block_spec ? lm->block_spec
        : keys->block_tokens < n && keys->block_tokens <= MAX_BLOCK ? keys->block_tokens
                                                                   : SINGLE_VIEW_BLOCK;
  }
  uint64_t nb = (n + T - 1) / T;
  uint32_t rep_dim = lm->mode == MODE_MINMAX ? 2 * d : d;
  if (lm->mode == MODE_GIVEN) {
    if (!in->landmarks)
      return kvdex__seterr(KVDEX_EINVAL, "landmark: mode=given needs landmarks in the build input");
    if (in->n_landmarks != nb)
      return kvdex__seterr(KVDEX_EINVAL,
                           "landmark: %llu landmarks given, %llu tokens in blocks of %u need %llu",
                           (unsigned long long)in->n_landmarks, (unsigned long long)n, T,
                           (unsigned long long)nb);
    for (size_t i = 0; i < (size_t)nb * d; i++)
      if (!isfinite(in->landmarks[i]))
        return kvdex__seterr(KVDEX_EINVAL, "landmark: landmark %zu has a non-finite element",
                             i / d);
  }
  float *reps = malloc((size_t)nb * rep_dim * sizeof *reps + 1);
  if (!reps)
    return kvdex__seterr(KVDEX_ENOMEM, "landmark: out of memory for %llu representatives",
                         (unsigned long long)nb);
  if (lm->mode == MODE_GIVEN) {
    memcpy(reps, in->landmarks, (size_t)nb * d * sizeof *reps);
  } else {
    unsigned workers = kvdex_pool_size(pool) + 1;
    build_ctx c = {keys, n, d, T, (uint32_t)lm->mode, nb, 0, reps, NULL, NULL};
    c.rowbuf = malloc((size_t)workers * d * sizeof *c.rowbuf);
    c.accbuf = malloc((size_t)workers * d * sizeof *c.accbuf);
    if (!c.rowbuf || !c.accbuf) {
      free(c.rowbuf);
      free(c.accbuf);
      free(reps);
      return kvdex__seterr(KVDEX_ENOMEM, "landmark: out of memory for build scratch");
    }
    uint64_t tasks = (uint64_t)workers * 4;
    c.per_task = (nb + tasks - 1) / tasks;
    if (c.per_task < 16) c.per_task = 16;
    kvdex_pool_run(pool, (size_t)((nb + c.per_task - 1) / c.per_task), build_task, &c);
    free(c.rowbuf);
    free(c.accbuf);
  }
  free(lm->reps);
  lm->reps = reps;
  lm->block = T;
  lm->n_reps = nb;
  lm->rep_dim = rep_dim;
  return 0;
}

/* ---- search --------------------------------------------------------------------- */

/* Scores every representative against q into out[n_reps]; qv: scratch of rep_dim. */
static int score_reps(const landmark *lm, uint32_t d, const float *q, float *qv, float *out) {
  const float *qrep = q;
  if (lm->mode == MODE_MINMAX) { /* q+ against the max row, q- against the min row */
    for (uint32_t i = 0; i < d; i++) {
      qv[i] = q[i] > 0 ? q[i] : 0;
      qv[d + i] = q[i] < 0 ? q[i] : 0;
    }
    qrep = qv;
  }
  return kvdex_score_keys(KVDEX_SIMD_AUTO, KVDEX_DTYPE_F32, lm->reps, (size_t)lm->n_reps,
                          lm->rep_dim, qrep, 1, out);
}

int kvdex__landmark_scores(const kvdex_index *ix, const float *q, float *out, uint64_t *n_reps,
                           uint32_t *block) {
  if (!ix || ix->ops != &kvdex__landmark_ops || !ix->n_built || !q || !out || !n_reps || !block)
    return kvdex__seterr(KVDEX_EINVAL, "landmark scores: not a built landmark index");
  const landmark *lm = ix->impl;
  float *qv = malloc(lm->rep_dim * sizeof *qv);
  if (!qv) return kvdex__seterr(KVDEX_ENOMEM, "landmark scores: out of memory");
  int rc = score_reps(lm, ix->dim, q, qv, out);
  free(qv);
  *n_reps = lm->n_reps;
  *block = lm->block;
  return rc;
}

static int lm_search(const kvdex_index *ix, const kvdex_kv_view *keys, const float *q, uint32_t k,
                     const kvdex_index_params *params, kvdex_index_scratch *s, kvdex_hit *hits,
                     uint32_t *n_hits, uint64_t *touched) {
  const landmark *lm = ix->impl;
  uint64_t n = ix->n_built, nb = lm->n_reps;
  uint32_t d = ix->dim;
  uint32_t B = params && params->blocks ? params->blocks : lm->blocks;
  if (B > nb) B = (uint32_t)nb;
  uint32_t kk = n < k ? (uint32_t)n : k;
  int rc;
  if ((rc = kvdex__scratch_floats(s, (size_t)nb + lm->rep_dim + CHUNK)) ||
      (rc = kvdex__scratch_hits(s, (size_t)B + kk)))
    return rc;
  float *block_scores = s->f, *qv = s->f + nb, *key_scores = qv + lm->rep_dim;

  /* 1. score the representatives */
  if ((rc = score_reps(lm, d, q, qv, block_scores))) return rc;

  /* 2. the B best blocks */
  kvdex__topk sel;
  kvdex__topk_init(&sel, s->h, B);
  kvdex__topk_push_run(&sel, 0, block_scores, (size_t)nb);

  /* 3. every key of those blocks, exactly */
  kvdex__topk top;
  kvdex__topk_init(&top, s->h + B, kk);
  size_t row_bytes = (size_t)d * kvdex_dtype_size(ix->dtype);
  uint64_t scored = 0;
  for (uint32_t j = 0; j < sel.n; j++) {
    uint64_t t = sel.h[j].id * lm->block, t1 = t + lm->block;
    if (t1 > n) t1 = n;
    while (t < t1) { /* runs inside one store block, at most CHUNK long */
      uint64_t cnt = t1 - t, in_block = keys->block_tokens - t % keys->block_tokens;
      if (cnt > in_block) cnt = in_block;
      if (cnt > CHUNK) cnt = CHUNK;
      const char *rows = (const char *)keys->k_blocks[t / keys->block_tokens] +
                         (size_t)(t % keys->block_tokens) * row_bytes;
      if ((rc = kvdex_score_keys(KVDEX_SIMD_AUTO, ix->dtype, rows, (size_t)cnt, d, q, 1,
                                 key_scores)))
        return rc;
      kvdex__topk_push_run(&top, t, key_scores, (size_t)cnt);
      scored += cnt;
      t += cnt;
    }
  }
  uint32_t m = kvdex__topk_finish(&top);
  memcpy(hits, top.h, m * sizeof *hits);
  *n_hits = m;
  *touched = nb + scored;
  return 0;
}

static size_t lm_memory(const kvdex_index *ix) {
  const landmark *lm = ix->impl;
  return sizeof *lm + (size_t)lm->n_reps * lm->rep_dim * sizeof(float);
}

static int lm_save(const kvdex_index *ix, kvdex__buf *out) {
  const landmark *lm = ix->impl;
  int rc;
  if ((rc = kvdex__buf_put(out, &lm->block, 4)) || (rc = kvdex__buf_put(out, &lm->n_reps, 8)) ||
      (rc = kvdex__buf_put(out, &lm->rep_dim, 4)))
    return rc;
  return kvdex__buf_put(out, lm->reps, (size_t)lm->n_reps * lm->rep_dim * sizeof(float));
}

static int lm_load(kvdex_index *ix, kvdex__rd *in) {
  landmark *lm = ix->impl;
  uint32_t block, rep_dim;
  uint64_t n_reps;
  if (kvdex__rd_get(in, &block, 4) || kvdex__rd_get(in, &n_reps, 8) ||
      kvdex__rd_get(in, &rep_dim, 4))
    return KVDEX_EINVAL;
  uint32_t want_dim = lm->mode == MODE_MINMAX ? 2 * ix->dim : ix->dim;
  if (!block || block > MAX_BLOCK || (lm->block_spec && block != lm->block_spec) ||
      n_reps != (ix->n_built + block - 1) / block || rep_dim != want_dim ||
      n_reps > in->left / sizeof(float) / rep_dim)
    return kvdex__seterr(KVDEX_EINVAL, "landmark: stored representatives do not match the header");
  size_t bytes = (size_t)n_reps * rep_dim * sizeof(float);
  float *reps = malloc(bytes + 1);
  if (!reps) return kvdex__seterr(KVDEX_ENOMEM, "landmark: out of memory loading");
  if (kvdex__rd_get(in, reps, bytes)) {
    free(reps);
    return KVDEX_EINVAL;
  }
  free(lm->reps);
  lm->reps = reps;
  lm->block = block;
  lm->n_reps = n_reps;
  lm->rep_dim = rep_dim;
  return 0;
}

static void lm_free(kvdex_index *ix) {
  landmark *lm = ix->impl;
  if (lm) free(lm->reps);
  free(lm);
  ix->impl = NULL;
}

static int lm_needs_landmarks(const kvdex_index *ix) {
  return ((const landmark *)ix->impl)->mode == MODE_GIVEN;
}

const kvdex__index_ops kvdex__landmark_ops = {
    .kind = "landmark",
    .init = lm_init,
    .param = lm_param,
    .spec = lm_spec,
    .build = lm_build,
    .search = lm_search,
    .memory = lm_memory,
    .save = lm_save,
    .load = lm_load,
    .free = lm_free,
    .needs_landmarks = lm_needs_landmarks,
};
