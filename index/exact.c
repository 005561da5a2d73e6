/* exact: the exact inner-product top-k over one layer of a sequence, and its naive
 * reference twin. The scan runs as tasks over (kv head, block range) chunks on the
 * pool; each task scores the g query heads of its kv head in one pass over the keys
 * and keeps a per-query candidate buffer (kvdex__topk_buf, topk.h: threshold test per
 * score, partial selection when it fills); the last chunk of a kv head to finish merges.
 * It does not build or use any index structure, and never blocks on writers.
 */
#include <assert.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "index/index.h"
#include "index/index_int.h"

/* ---- argument checks shared with the reference -------------------------------------- */

typedef struct plan {
  const kvdex_shape *shape;
  uint32_t g;      /* query heads per kv head */
  uint64_t n;      /* committed tokens taken at call time */
  uint64_t lo, hi; /* eligible ids [lo, hi) */
  size_t kk;       /* hits per query head: min(k, hi - lo) */
} plan;

static int check_args(const char *who, kvdex_seq *seq, uint32_t layer, const float *q,
                      const kvdex_search_opts *opts, kvdex_search_result *res, plan *pl) {
  if (!seq || !q || !opts || !res) return kvdex__seterr(KVDEX_EINVAL, "%s: NULL argument", who);
  if (opts->k == 0 || opts->k > KVDEX_MAX_K)
    return kvdex__seterr(KVDEX_EINVAL, "%s: k = %u (must be 1..%d)", who, opts->k, KVDEX_MAX_K);
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  if (layer >= sh->n_layers)
    return kvdex__seterr(KVDEX_EINVAL, "%s: layer %u out of range (sequence has %u)", who, layer,
                         sh->n_layers);
  size_t nq = (size_t)sh->n_q_heads * sh->head_dim;
  for (size_t i = 0; i < nq; i++)
    if (!isfinite(q[i]))
      return kvdex__seterr(KVDEX_EINVAL, "%s: query head %zu, dim %zu is not finite", who,
                           i / sh->head_dim, i % sh->head_dim);
  pl->shape = sh;
  pl->g = sh->n_q_heads / sh->n_kv_heads;
  return KVDEX_OK;
}

/* Takes the views of every kv head once; the committed length is the least of
 * theirs (rows below it never change while the sequence reference is held). */
static int take_views(const char *who, kvdex_seq *seq, uint32_t layer,
                      const kvdex_search_opts *opts, kvdex_kv_view *views, plan *pl) {
  uint64_t n = UINT64_MAX;
  for (uint32_t h = 0; h < pl->shape->n_kv_heads; h++) {
    int rc = kvdex_seq_view(seq, layer, h, &views[h]);
    if (rc) return kvdex__preerr(rc, who);
    if (views[h].n_tokens < n) n = views[h].n_tokens;
  }
  pl->n = n;
  pl->lo = opts->sinks;
  pl->hi = n > opts->window ? n - opts->window : 0;
  if (pl->lo > pl->hi) pl->lo = pl->hi;
  uint64_t e = pl->hi - pl->lo;
  pl->kk = e < opts->k ? (size_t)e : opts->k;
  return KVDEX_OK;
}

/* ---- the parallel scan -------------------------------------------------------------- */

typedef struct scan {
  const kvdex_kv_view *views;
  const float *q;
  const kvdex__kernels *kern;
  int dtype;
  size_t d, g, es;
  uint64_t lo, hi;         /* eligible ids */
  uint32_t bt;             /* block_tokens */
  uint64_t blk_lo, blk_hi; /* blocks holding eligible ids */
  uint64_t bpc;            /* blocks per chunk */
  size_t chunks;           /* chunks per kv head */
  size_t sub;              /* keys per kernel call */
  size_t kk, cap, slot;    /* hits per head, candidate buffer, per-chunk output */
  kvdex__cand *cand;       /* per worker: g * sub */
  float *thr;              /* per worker: g */
  kvdex_hit *work;         /* per worker: g * cap */
  kvdex__topk_buf *tk;     /* per worker: g */
  kvdex_hit *slots;        /* chunks > 1: [kv head][j][chunk][slot] */
  uint32_t *slot_n;        /* chunks > 1: [kv head][j][chunk] */
  _Atomic uint32_t *left;  /* chunks > 1: chunks of each kv head not yet finished */
  kvdex_search_result *res;
} scan;

/* Sorts the kk best of a[0, n) into query head qh of the result. */
static void emit(scan *s, size_t qh, kvdex_hit *a, size_t n) {
  if (n > s->kk) {
    kvdex__hits_select(a, n, s->kk);
    n = s->kk;
  }
  kvdex__hits_sort(a, n);
  kvdex_head_result *hr = &s->res->heads[qh];
  if (n) memcpy(hr->hits, a, n * sizeof *a);
  hr->n_hits = (uint32_t)n;
}

/* Merges the chunk outputs of kv head h, once all its chunks are done. */
static void merge_head(scan *s, size_t h) {
  for (size_t j = 0; j < s->g; j++) {
    size_t base = (h * s->g + j) * s->chunks;
    kvdex_hit *dst = s->slots + base * s->slot;
    size_t n = 0;
    for (size_t c = 0; c < s->chunks; c++) {
      size_t m = s->slot_n[base + c];
      if (n != c * s->slot) memmove(dst + n, dst + c * s->slot, m * sizeof *dst);
      n += m;
    }
    emit(s, h * s->g + j, dst, n);
  }
}

static void scan_task(void *ctx, size_t task, unsigned worker) {
  scan *s = ctx;
  size_t h = task / s->chunks, c = task % s->chunks, g = s->g, d = s->d;
  const kvdex_kv_view *v = &s->views[h];
  const float *q = s->q + h * g * d;
  kvdex__cand *cand = s->cand + (size_t)worker * g * s->sub;
  float *thr = s->thr + (size_t)worker * g;
  kvdex__topk_buf *tk = s->tk + (size_t)worker * g;
  for (size_t j = 0; j < g; j++)
    kvdex__topk_buf_init(&tk[j], s->work + ((size_t)worker * g + j) * s->cap, s->cap, s->kk);

  uint64_t b0 = s->blk_lo + c * s->bpc, b1 = b0 + s->bpc;
  if (b1 > s->blk_hi) b1 = s->blk_hi;
  size_t row_bytes = d * s->es;
  for (uint64_t b = b0; b < b1; b++) {
    uint64_t first = b * s->bt;
    uint64_t t0 = first > s->lo ? first : s->lo, t1 = first + s->bt < s->hi ? first + s->bt : s->hi;
    const char *blk = v->k_blocks[b];
    for (uint64_t t = t0; t < t1; t += s->sub) {
      size_t m = t1 - t < s->sub ? (size_t)(t1 - t) : s->sub;
      const char *keys = blk + (size_t)(t - first) * row_bytes;
      const void *next = t + m < t1 ? (const void *)(keys + m * row_bytes)
                         : b + 1 < s->blk_hi ? v->k_blocks[b + 1] : NULL;
      for (size_t j = 0; j < g; j++) thr[j] = tk[j].thr;
      size_t nc = s->kern->scan(s->dtype, keys, m, d, q, g, thr, cand, next);
      assert(nc <= m * g); /* cand holds g * sub */
      for (size_t i = 0; i < nc; i++)
        kvdex__topk_buf_push(&tk[cand[i].j], t + cand[i].i, cand[i].score);
    }
  }

  if (s->chunks == 1) {
    for (size_t j = 0; j < g; j++) emit(s, h * g + j, tk[j].buf, tk[j].count);
    return;
  }
  for (size_t j = 0; j < g; j++) {
    if (tk[j].count > s->kk) kvdex__topk_buf_shrink(&tk[j]);
    assert(tk[j].count <= s->slot);
    size_t at = (h * g + j) * s->chunks + c;
    memcpy(s->slots + at * s->slot, tk[j].buf, tk[j].count * sizeof(kvdex_hit));
    s->slot_n[at] = (uint32_t)tk[j].count;
  }
  if (atomic_fetch_sub_explicit(&s->left[h], 1, memory_order_acq_rel) == 1) merge_head(s, h);
}

static size_t add_bytes(size_t *total, size_t bytes) { /* 64-byte aligned sub-allocations */
  size_t at = *total;
  *total += (bytes + 63) & ~(size_t)63;
  return at;
}

int kvdex_exact_search(kvdex_seq *seq, uint32_t layer, const float *q,
                       const kvdex_search_opts *opts, kvdex_pool *pool,
                       kvdex_search_result *res) {
  static const char who[] = "exact search";
  plan pl;
  int rc = check_args(who, seq, layer, q, opts, res, &pl);
  if (rc) return rc;
  if ((int)opts->simd < KVDEX_SIMD_AUTO || (int)opts->simd > KVDEX_SIMD_AVX512)
    return kvdex__seterr(KVDEX_EINVAL, "%s: unknown simd level %d", who, (int)opts->simd);
  const kvdex__kernels *kern = kvdex__kernels_get((int)opts->simd);
  if (!kern)
    return kvdex__seterr(KVDEX_EUNIMPL, "%s: this CPU does not support %s (best: %s)", who,
                         kvdex_simd_name(opts->simd), kvdex_simd_name(kvdex_simd_detect()));
  const kvdex_shape *sh = pl.shape;
  size_t n_kv = sh->n_kv_heads, g = pl.g, d = sh->head_dim;

  /* Views on the stack for the usual head counts; the heap beyond. */
  kvdex_kv_view stack_views[64];
  kvdex_kv_view *views = n_kv <= 64 ? stack_views : malloc(n_kv * sizeof *views);
  if (!views) return kvdex__seterr(KVDEX_ENOMEM, "%s: out of memory", who);
  if ((rc = take_views(who, seq, layer, opts, views, &pl))) goto out;

  scan s = {.views = views, .q = q, .kern = kern, .dtype = views[0].dtype, .d = d, .g = g,
            .es = kvdex_dtype_size(views[0].dtype), .lo = pl.lo, .hi = pl.hi,
            .bt = views[0].block_tokens, .kk = pl.kk, .res = res};
  if (s.bt == 0 || s.es == 0) {
    rc = kvdex__seterr(KVDEX_EINTERNAL, "%s: store returned a view without blocks or dtype", who);
    goto out;
  }
  uint64_t eligible = pl.hi - pl.lo;
  if (eligible == 0) {
    if ((rc = kvdex__search_result_reserve(res, sh->n_q_heads, 0))) goto out;
    res->keys_scanned = 0;
    res->tokens = pl.n;
    goto out;
  }

  /* Chunks: one per kv head on one thread; with a pool, enough tasks to keep every
   * thread busy, but each chunk long enough (>= 4096 keys and >= 2k) that its
   * output stays small beside what it scanned. */
  unsigned threads = pool ? kvdex_pool_size(pool) + 1 : 1;
  s.blk_lo = pl.lo / s.bt;
  s.blk_hi = (pl.hi + s.bt - 1) / s.bt;
  uint64_t nblk = s.blk_hi - s.blk_lo, chunks = 1;
  if (threads > 1) {
    uint64_t want = (4 * (uint64_t)threads + n_kv - 1) / n_kv;
    uint64_t min_keys = 2 * (uint64_t)s.kk > 4096 ? 2 * (uint64_t)s.kk : 4096;
    uint64_t by_keys = eligible / min_keys;
    chunks = want < by_keys ? want : by_keys;
    if (chunks > nblk) chunks = nblk;
    if (chunks < 1) chunks = 1;
  }
  s.bpc = (nblk + chunks - 1) / chunks;
  s.chunks = (size_t)((nblk + s.bpc - 1) / s.bpc);
  /* Keys per kernel call: a block, or less so that the candidate buffer (g per key)
   * stays small and the range prefetched ahead of each call stays within 64 KiB. */
  size_t row_bytes = d * s.es;
  s.sub = s.bt;
  if ((uint64_t)g * s.sub > 16384) s.sub = 16384 / g;
  if ((uint64_t)s.sub * row_bytes > 65536) s.sub = 65536 / row_bytes;
  if (s.sub < 16) s.sub = 16 < s.bt ? 16 : s.bt;
  uint64_t task_keys = s.bpc * s.bt; /* upper bound of the keys one task pushes */
  s.cap = 2 * s.kk < task_keys ? 2 * s.kk : (size_t)task_keys;
  s.slot = s.kk < task_keys ? s.kk : (size_t)task_keys;
  assert(s.cap > s.kk || s.cap >= task_keys); /* what kvdex__topk_buf needs */

  unsigned workers = s.chunks * n_kv > 1 ? threads : 1;
  size_t total = 0;
  size_t at_cand = add_bytes(&total, (size_t)workers * g * s.sub * sizeof(kvdex__cand));
  size_t at_thr = add_bytes(&total, (size_t)workers * g * sizeof(float));
  size_t at_work = add_bytes(&total, (size_t)workers * g * s.cap * sizeof(kvdex_hit));
  size_t at_tk = add_bytes(&total, (size_t)workers * g * sizeof(kvdex__topk_buf));
  size_t at_slots = 0, at_slot_n = 0, at_left = 0;
  if (s.chunks > 1) {
    at_slots = add_bytes(&total, n_kv * g * s.chunks * s.slot * sizeof(kvdex_hit));
    at_slot_n = add_bytes(&total, n_kv * g * s.chunks * sizeof(uint32_t));
    at_left = add_bytes(&total, n_kv * sizeof(_Atomic uint32_t));
  }
  char *scratch = aligned_alloc(64, total);
  if (!scratch) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "%s: out of memory for %zu bytes of scratch", who, total);
    goto out;
  }
  if ((rc = kvdex__search_result_reserve(res, sh->n_q_heads, s.kk))) {
    free(scratch);
    goto out;
  }
  s.cand = (kvdex__cand *)(scratch + at_cand);
  s.thr = (float *)(scratch + at_thr);
  s.work = (kvdex_hit *)(scratch + at_work);
  s.tk = (kvdex__topk_buf *)(scratch + at_tk);
  if (s.chunks > 1) {
    s.slots = (kvdex_hit *)(scratch + at_slots);
    s.slot_n = (uint32_t *)(scratch + at_slot_n);
    s.left = (_Atomic uint32_t *)(scratch + at_left);
    for (size_t h = 0; h < n_kv; h++) atomic_init(&s.left[h], (uint32_t)s.chunks);
  }
  kvdex_pool_run(workers > 1 ? pool : NULL, s.chunks * n_kv, scan_task, &s);
  res->keys_scanned = (uint64_t)n_kv * eligible;
  res->tokens = pl.n;
  free(scratch);
out:
  if (views != stack_views) free(views);
  return rc;
}

/* ---- the reference ------------------------------------------------------------------ */

static double key_elem(int dtype, const void *row, size_t t) {
  switch (dtype) {
    case KVDEX_DTYPE_F32: return ((const float *)row)[t];
    case KVDEX_DTYPE_F16: return kvdex__f16_to_f32(((const uint16_t *)row)[t]);
    default: return kvdex__bf16_to_f32(((const uint16_t *)row)[t]);
  }
}

int kvdex_exact_search_ref(kvdex_seq *seq, uint32_t layer, const float *q,
                           const kvdex_search_opts *opts, kvdex_search_result *res) {
  static const char who[] = "exact search (reference)";
  plan pl;
  int rc = check_args(who, seq, layer, q, opts, res, &pl);
  if (rc) return rc;
  const kvdex_shape *sh = pl.shape;
  size_t n_kv = sh->n_kv_heads, d = sh->head_dim;
  kvdex_kv_view *views = malloc(n_kv * sizeof *views);
  if (!views) return kvdex__seterr(KVDEX_ENOMEM, "%s: out of memory", who);
  kvdex_hit *all = NULL;
  if ((rc = take_views(who, seq, layer, opts, views, &pl))) goto out;
  uint64_t eligible = pl.hi - pl.lo;
  if (eligible && !(all = malloc((size_t)eligible * sizeof *all))) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "%s: out of memory", who);
    goto out;
  }
  if ((rc = kvdex__search_result_reserve(res, sh->n_q_heads, pl.kk))) goto out;
  for (uint32_t qh = 0; qh < sh->n_q_heads; qh++) {
    const kvdex_kv_view *v = &views[qh / pl.g];
    const float *qv = q + (size_t)qh * d;
    size_t es = kvdex_dtype_size(v->dtype), m = 0;
    for (uint64_t id = pl.lo; id < pl.hi; id++) {
      const char *row = (const char *)v->k_blocks[id / v->block_tokens] +
                        (size_t)(id % v->block_tokens) * d * es;
      double acc = 0;
      for (size_t t = 0; t < d; t++) acc += (double)qv[t] * key_elem(v->dtype, row, t);
      float score = (float)acc;
      if (isnan(score)) continue; /* a non-finite key: never a hit (as in the scan) */
      all[m].id = id;
      all[m].score = score;
      m++;
    }
    kvdex__hits_sort(all, m);
    size_t n_hits = m < pl.kk ? m : pl.kk;
    if (n_hits) memcpy(res->heads[qh].hits, all, n_hits * sizeof *all);
    res->heads[qh].n_hits = (uint32_t)n_hits;
  }
  res->keys_scanned = (uint64_t)n_kv * eligible;
  res->tokens = pl.n;
out:
  free(all);
  free(views);
  return rc;
}
