/* attend: sparse and dense decode attention, attention mass and LSE merging over
 * the blocks kvstore holds (contract in attend.h).
 *
 * One engine serves all three: a "unit" is a run of token positions (an id list or
 * an id range) read by G query rows of one kv head; each unit is cut into parts of
 * `span` positions (a function of its length only, so the result never depends on
 * the pool), each part is a task that scores SUB tokens at a time with the index
 * kernels (kvdex__kernels.score, one key read for all G rows), folds them into a
 * running max / sum / output (online softmax) and leaves a partial (o, lse); the
 * caller merges the partials of a unit by their lse. The max, exp and V-accumulate
 * kernels are in the SIMD kernel table beside the scan's (index_int.h), chosen with
 * it at run time, so this file needs no target flags.
 */
#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "index/attend.h"
#include "index/index_int.h"

#define ALWAYS_INLINE inline __attribute__((always_inline))

#define SUB 64         /* tokens per softmax step (scores of G rows stay in L1) */
#define MIN_SPAN 2048  /* fewest positions per task: partials stay few */
#define MAX_PARTS 32   /* most tasks per unit once units are longer than that */

/* ---- merging ------------------------------------------------------------------------- */

/* The n-way merge over rows o[i * os] / lse[i * ls]; o may be NULL when d == 0.
 * o_out may be row 0 (an empty row is never read, and the first row read is written
 * before any later one is). */
static void merge_rows(const float *o, size_t os, const float *lse, size_t ls, size_t n,
                       size_t d, float *o_out, float *lse_out) {
  float m = -INFINITY;
  int bad = 0;
  for (size_t i = 0; i < n; i++) {
    float x = lse[i * ls];
    if (x > m) m = x;
    else if (isnan(x)) bad = 1;
  }
  if (bad || m == INFINITY) {
    for (size_t c = 0; c < d; c++) o_out[c] = NAN;
    *lse_out = NAN;
    return;
  }
  if (m == -INFINITY) {
    for (size_t c = 0; c < d; c++) o_out[c] = 0.0f;
    *lse_out = -INFINITY;
    return;
  }
  double sum = 0.0;
  for (size_t i = 0; i < n; i++) sum += exp((double)lse[i * ls] - m);
  int first = 1;
  for (size_t i = 0; i < n && d; i++) {
    double x = lse[i * ls];
    if (x == -INFINITY) continue;
    float w = (float)(exp(x - m) / sum);
    const float *oi = o + i * os;
    if (first) {
      for (size_t c = 0; c < d; c++) o_out[c] = w * oi[c];
      first = 0;
    } else {
      for (size_t c = 0; c < d; c++) o_out[c] += w * oi[c];
    }
  }
  *lse_out = (float)(m + log(sum));
}

void kvdex_attend_merge_n(const float *o, const float *lse, uint32_t n, uint32_t d, float *o_out,
                          float *lse_out) {
  merge_rows(o, d, lse, 1, n, d, o_out, lse_out);
}


/* ---- scratch ------------------------------------------------------------------------- */

struct kvdex_attend_scratch {
  char *main;       /* one call's layout (see the `lay` helpers), 64-byte aligned */
  size_t main_cap;
  uint64_t *ids;    /* deduplicated id lists */
  size_t ids_cap;   /* entries */
  uint64_t *bits;   /* per-worker bitmaps for deduplication, all zero between calls */
  size_t bits_cap;  /* words */
};

int kvdex_attend_scratch_create(kvdex_attend_scratch **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "attend scratch: NULL argument");
  kvdex_attend_scratch *s = calloc(1, sizeof *s);
  if (!s) return kvdex__seterr(KVDEX_ENOMEM, "attend scratch: out of memory");
  *out = s;
  return KVDEX_OK;
}

void kvdex_attend_scratch_destroy(kvdex_attend_scratch *s) {
  if (!s) return;
  free(s->main);
  free(s->ids);
  free(s->bits);
  free(s);
}

size_t kvdex_attend_scratch_bytes(const kvdex_attend_scratch *s) {
  if (!s) return 0;
  return s->main_cap + s->ids_cap * sizeof(uint64_t) + s->bits_cap * sizeof(uint64_t);
}

/* Makes s->main hold `bytes`. Its old contents are not kept. */
static int grow_main(kvdex_attend_scratch *s, size_t bytes, const char *who) {
  if (bytes <= s->main_cap) return KVDEX_OK;
  size_t cap = (bytes + 4095) & ~(size_t)4095;
  char *p = aligned_alloc(64, cap);
  if (!p) return kvdex__seterr(KVDEX_ENOMEM, "%s: out of memory for %zu bytes of scratch", who, cap);
  free(s->main);
  s->main = p;
  s->main_cap = cap;
  return KVDEX_OK;
}

static int grow_ids(kvdex_attend_scratch *s, size_t n, const char *who) {
  if (n <= s->ids_cap) return KVDEX_OK;
  uint64_t *p = malloc(n * sizeof *p);
  if (!p) return kvdex__seterr(KVDEX_ENOMEM, "%s: out of memory for %zu ids", who, n);
  free(s->ids);
  s->ids = p;
  s->ids_cap = n;
  return KVDEX_OK;
}

static int grow_bits(kvdex_attend_scratch *s, size_t words, const char *who) {
  if (words <= s->bits_cap) return KVDEX_OK;
  uint64_t *p = calloc(words, sizeof *p);
  if (!p) return kvdex__seterr(KVDEX_ENOMEM, "%s: out of memory for a %zu-word bitmap", who, words);
  free(s->bits);
  s->bits = p;
  s->bits_cap = words;
  return KVDEX_OK;
}

/* Sub-allocations of one call, 64-byte aligned offsets into s->main. */
static size_t lay(size_t *total, size_t bytes) {
  size_t at = *total;
  *total += (bytes + 63) & ~(size_t)63;
  return at;
}

/* ---- the engine ------------------------------------------------------------------------ */

/* A run of positions read by G consecutive query rows of kv head `kv`. */
typedef struct unit {
  const uint64_t *ids; /* ascending and distinct; NULL: the range [base, base + len) */
  uint64_t base, len;
  uint64_t span;       /* positions per part (a multiple of SUB) */
  uint32_t parts;
  uint32_t kv, G;
  size_t q0;           /* first scaled query row */
  size_t poff;         /* first partial row: part p, row j at poff + p * G + j */
} unit;

typedef struct task {
  uint32_t unit, part;
} task;

/* Per query head of kvdex_attend_ids: its list after checking (and deduplication). */
enum { LIST_OK = 0, LIST_DEDUP = 1, LIST_BAD = 2 };
typedef struct hinfo {
  const uint64_t *ids;
  uint64_t len;
  uint64_t lo, hi; /* least and greatest id (LIST_DEDUP) */
  uint64_t bad;    /* index of the first id out of range (LIST_BAD) */
  int status;
} hinfo;

typedef enum { MODE_ATTEND, MODE_MASS_LSE, MODE_MASS_SUM } mode;

typedef struct run {
  mode mode;
  const kvdex_kv_view *views;
  const kvdex__kernels *kern;
  int dtype;
  size_t d, rowb;
  uint32_t bt;
  int shift;           /* log2(bt) when bt is a power of two, else -1 */
  uint64_t n;          /* committed tokens */
  const float *q;      /* scaled query rows [.][d] */
  const unit *units;
  const task *tasks;
  float *po, *plse;    /* partial rows: o [.][d] (MODE_ATTEND), lse [.] */
  char *work;          /* per-worker areas, wstride apart */
  size_t wstride, w_s, w_acc, w_m, w_l, w_al, w_k, w_v; /* offsets inside one */
  /* kvdex_attend_ids checking */
  const uint64_t *const *in_ids;
  const uint32_t *in_n;
  hinfo *hinfo;
  const uint32_t *dd_heads; /* heads to deduplicate */
  const size_t *dd_off;     /* their offsets into dd_out */
  uint64_t *dd_out;
  uint64_t *bits;
  size_t bits_words;        /* per worker */
  /* MODE_MASS_SUM */
  const float *row_lse;     /* per query row */
  float *mass;
  uint64_t mass_count;
} run;

static uint64_t span_of(uint64_t len) {
  uint64_t s = (len + MAX_PARTS - 1) / MAX_PARTS;
  s = (s + SUB - 1) / SUB * SUB;
  return s < MIN_SPAN ? MIN_SPAN : s;
}

static void unit_set_len(unit *u, uint64_t len) {
  u->len = len;
  u->span = span_of(len);
  u->parts = (uint32_t)((len + u->span - 1) / u->span);
  /* the callers lay out MAX_PARTS tasks and partials per unit (range units) */
  assert(u->span % SUB == 0 && u->parts <= MAX_PARTS);
}

typedef struct setup {
  const kvdex_shape *sh;
  size_t n_kv, n_q, g, d, es, rowb;
  float scale;
  const kvdex__kernels *kern;
  unsigned workers;
} setup;

/* Worker-area layout for up to gmax query rows per unit; acc only for attention. */
static size_t worker_layout(run *r, const setup *st, size_t gmax, int with_v) {
  size_t t = 0;
  r->d = st->d;
  r->rowb = st->rowb;
  r->w_s = lay(&t, gmax * SUB * sizeof(float));
  r->w_acc = lay(&t, with_v ? gmax * r->d * sizeof(float) : 0);
  r->w_m = lay(&t, gmax * sizeof(float));
  r->w_l = lay(&t, gmax * sizeof(float));
  r->w_al = lay(&t, gmax * sizeof(float));
  r->w_k = lay(&t, SUB * r->rowb);
  r->w_v = lay(&t, SUB * sizeof(void *));
  r->wstride = t;
  return t;
}

static ALWAYS_INLINE size_t tok_off(const run *r, uint64_t id, uint64_t *blk) {
  if (r->shift >= 0) {
    *blk = id >> r->shift;
    return (size_t)(id & (r->bt - 1)) * r->rowb;
  }
  *blk = id / r->bt;
  return (size_t)(id - *blk * r->bt) * r->rowb;
}

static ALWAYS_INLINE void prefetch_row(const char *p, size_t bytes) {
  for (size_t c = 0; c < bytes; c += 64) __builtin_prefetch(p + c, 0, 3);
  __builtin_prefetch(p + bytes - 1, 0, 3);
}

/* Prefetches the K (and V) rows of list positions [pos, pos + m). */
static void prefetch_ids(const run *r, const unit *u, uint64_t pos, size_t m, int with_v) {
  const kvdex_kv_view *v = &r->views[u->kv];
  for (size_t i = 0; i < m; i++) {
    uint64_t blk;
    size_t off = tok_off(r, u->ids[pos + i], &blk);
    prefetch_row((const char *)v->k_blocks[blk] + off, r->rowb);
    if (with_v) prefetch_row((const char *)v->v_blocks[blk] + off, r->rowb);
  }
}

/* Scores positions [pos, pos + m) of u against its G rows q into S (row stride SUB),
 * and points vrow (may be NULL) at their V rows. List positions are gathered into
 * kbuf first (random rows; the next step's rows are prefetched meanwhile); ranges are
 * scored in place, a block at a time. */
static void load_step(const run *r, const unit *u, uint64_t pos, size_t m, uint64_t end,
                      const float *q, float *S, char *kbuf, const void **vrow) {
  const kvdex_kv_view *v = &r->views[u->kv];
  size_t rowb = r->rowb;
  assert(m >= 1 && m <= SUB && pos + m <= end);
  if (u->ids) {
    /* Row i of the next step is prefetched beside row i of this one: spread out, the
     * prefetches keep the line fill buffers busy without stalling on them in a burst. */
    const uint64_t *ids = u->ids + pos;
    size_t ahead = end - pos - m < SUB ? (size_t)(end - pos - m) : SUB;
    for (size_t i = 0; i < m; i++) {
      uint64_t blk;
      size_t off;
      if (i < ahead) {
        off = tok_off(r, ids[m + i], &blk);
        prefetch_row((const char *)v->k_blocks[blk] + off, rowb);
        if (vrow) prefetch_row((const char *)v->v_blocks[blk] + off, rowb);
      }
      assert(i == 0 || ids[i - 1] < ids[i]); /* lists are ascending and distinct */
      off = tok_off(r, ids[i], &blk);
      memcpy(kbuf + i * rowb, (const char *)v->k_blocks[blk] + off, rowb);
      if (vrow) vrow[i] = (const char *)v->v_blocks[blk] + off;
    }
    r->kern->score(r->dtype, kbuf, m, r->d, q, u->G, S, SUB, NULL);
    return;
  }
  uint64_t t = u->base + pos, t_end = t + m;
  size_t i = 0;
  while (t < t_end) {
    uint64_t blk;
    size_t off = tok_off(r, t, &blk);
    uint64_t room = r->bt - off / rowb, c = t_end - t < room ? t_end - t : room;
    const char *kp = (const char *)v->k_blocks[blk] + off;
    const void *nx = c < room ? (const void *)(kp + c * rowb)
                     : (blk + 1) * r->bt < v->n_tokens ? v->k_blocks[blk + 1] : NULL;
    r->kern->score(r->dtype, kp, (size_t)c, r->d, q, u->G, S + i, SUB, nx);
    if (vrow) {
      const char *vp = (const char *)v->v_blocks[blk] + off;
      for (size_t k = 0; k < c; k++) vrow[i + k] = vp + k * rowb;
    }
    i += c;
    t += c;
  }
  /* The kernel prefetches the next keys; the next values are ours to prefetch (rows
   * are read a slice at a time, a pattern the hardware streamers follow poorly). */
  if (vrow && pos + m < end) {
    uint64_t nt = u->base + pos + m, nt_end = nt + (end - pos - m < SUB ? end - pos - m : SUB);
    while (nt < nt_end) {
      uint64_t blk;
      size_t off = tok_off(r, nt, &blk);
      uint64_t room = r->bt - off / rowb, c = nt_end - nt < room ? nt_end - nt : room;
      prefetch_row((const char *)v->v_blocks[blk] + off, (size_t)c * rowb);
      nt += c;
    }
  }
}

static void engine_task(void *ctx, size_t ti, unsigned worker) {
  const run *r = ctx;
  const task *tk = &r->tasks[ti];
  const unit *u = &r->units[tk->unit];
  const size_t G = u->G, d = r->d;
  char *w = r->work + (size_t)worker * r->wstride;
  float *S = (float *)(w + r->w_s), *acc = (float *)(w + r->w_acc);
  float *wm = (float *)(w + r->w_m), *wl = (float *)(w + r->w_l), *al = (float *)(w + r->w_al);
  char *kbuf = w + r->w_k;
  const void **vrow = r->mode == MODE_ATTEND ? (const void **)(w + r->w_v) : NULL;
  uint64_t p0 = (uint64_t)tk->part * u->span;
  uint64_t p1 = p0 + u->span < u->len ? p0 + u->span : u->len;
  const float *q = r->q + u->q0 * d;

  for (size_t j = 0; j < G; j++) {
    wm[j] = -INFINITY;
    wl[j] = 0.0f;
  }
  if (vrow) memset(acc, 0, G * d * sizeof(float));
  if (u->ids) prefetch_ids(r, u, p0, p1 - p0 < SUB ? (size_t)(p1 - p0) : SUB, vrow != NULL);

  for (uint64_t pos = p0; pos < p1; pos += SUB) {
    size_t m = p1 - pos < SUB ? (size_t)(p1 - pos) : SUB;
    load_step(r, u, pos, m, p1, q, S, kbuf, vrow);
    if (r->mode == MODE_MASS_SUM) {
      float *out = r->mass + (size_t)u->kv * r->mass_count + pos;
      memset(out, 0, m * sizeof(float));
      for (size_t j = 0; j < G; j++) r->kern->expadd(S + j * SUB, m, r->row_lse[u->q0 + j], out);
      continue;
    }
    for (size_t j = 0; j < G; j++) {
      float *s = S + j * SUB;
      float mo = wm[j], cm = r->kern->max(s, m), mn = cm > mo ? cm : mo;
      if (mn == -INFINITY) { /* nothing but -inf scores so far: weights 0 */
        memset(s, 0, m * sizeof(float));
        al[j] = 1.0f;
        continue;
      }
      al[j] = mo == mn ? 1.0f : expf(mo - mn);
      wl[j] = wl[j] * al[j] + r->kern->expsum(s, m, mn);
      wm[j] = mn;
    }
    if (vrow) r->kern->vacc(r->dtype, vrow, m, d, S, SUB, G, al, acc);
  }
  if (r->mode == MODE_MASS_SUM) return;

  size_t prow = u->poff + (size_t)tk->part * G;
  for (size_t j = 0; j < G; j++) {
    int empty = wl[j] == 0.0f;
    r->plse[prow + j] = empty ? -INFINITY : wm[j] + logf(wl[j]);
    if (!vrow) continue;
    float *po = r->po + (prow + j) * d;
    const float *a = acc + j * d;
    for (size_t c = 0; c < d; c++) po[c] = empty ? 0.0f : a[c] / wl[j];
  }
}

/* ---- shared argument handling ---------------------------------------------------------- */


static int check_common(const char *who, kvdex_seq *seq, uint32_t layer, const float *q,
                        size_t q_rows, const kvdex_attend_opts *opts, kvdex_pool *pool,
                        kvdex_attend_scratch *scratch, setup *st) {
  if (!seq || !q || !scratch) return kvdex__seterr(KVDEX_EINVAL, "%s: NULL argument", who);
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  if (layer >= sh->n_layers)
    return kvdex__seterr(KVDEX_EINVAL, "%s: layer %u out of range (sequence has %u)", who, layer,
                         sh->n_layers);
  kvdex_attend_opts o = opts ? *opts : (kvdex_attend_opts){0};
  if (!isfinite(o.scale) || o.scale < 0)
    return kvdex__seterr(KVDEX_EINVAL, "%s: scale %g (must be finite and >= 0)", who,
                         (double)o.scale);
  if ((int)o.simd < KVDEX_SIMD_AUTO || (int)o.simd > KVDEX_SIMD_AVX512)
    return kvdex__seterr(KVDEX_EINVAL, "%s: unknown simd level %d", who, (int)o.simd);
  st->kern = kvdex__kernels_get((int)o.simd);
  if (!st->kern)
    return kvdex__seterr(KVDEX_EUNIMPL, "%s: this CPU does not support %s (best: %s)", who,
                         kvdex_simd_name(o.simd), kvdex_simd_name(kvdex_simd_detect()));
  st->sh = sh;
  st->n_kv = sh->n_kv_heads;
  st->n_q = sh->n_q_heads;
  st->g = st->n_q / st->n_kv;
  st->d = sh->head_dim;
  st->es = kvdex_dtype_size(sh->dtype);
  st->rowb = st->d * st->es;
  st->scale = o.scale == 0.0f ? 1.0f / sqrtf((float)st->d) : o.scale;
  size_t per_row = st->n_q * st->d, nq = q_rows * per_row;
  for (size_t i = 0; i < nq; i++)
    if (!isfinite(q[i])) {
      size_t rem = i % per_row;
      return kvdex__seterr(KVDEX_EINVAL, "%s: query %zu, head %zu, dim %zu is not finite", who,
                           i / per_row, rem / st->d, rem % st->d);
    }
  st->workers = pool ? kvdex_pool_size(pool) + 1 : 1;
  return KVDEX_OK;
}

/* Takes the view of every kv head; the committed length is the least of theirs. */
static int take_views(const char *who, kvdex_seq *seq, uint32_t layer, const setup *st,
                      kvdex_kv_view *views, run *r) {
  uint64_t n = UINT64_MAX;
  for (size_t h = 0; h < st->n_kv; h++) {
    int rc = kvdex_seq_view(seq, layer, (uint32_t)h, &views[h]);
    if (rc) return kvdex__preerr(rc, who);
    if (views[h].n_tokens < n) n = views[h].n_tokens;
  }
  if (views[0].block_tokens == 0 || views[0].dtype != st->sh->dtype)
    return kvdex__seterr(KVDEX_EINTERNAL, "%s: store returned an unexpected view", who);
  r->views = views;
  r->kern = st->kern;
  r->dtype = st->sh->dtype;
  r->d = st->d;
  r->rowb = st->rowb;
  r->bt = views[0].block_tokens;
  r->shift = -1;
  if ((r->bt & (r->bt - 1)) == 0) r->shift = __builtin_ctz(r->bt);
  r->n = n;
  return KVDEX_OK;
}

/* dst[0, d) = scale * src[0, d): the queries the kernels see, scale folded in once. */
static void scale_rows(float *dst, const float *src, size_t d, float scale) {
  for (size_t c = 0; c < d; c++) dst[c] = src[c] * scale;
}

/* Lists the tasks of units[0, n_units) (unit by unit, parts in order), sets each
 * unit's first partial row, and returns the number of tasks. */
static size_t make_tasks(unit *units, size_t n_units, task *tasks) {
  size_t nt = 0, prow = 0;
  for (size_t u = 0; u < n_units; u++) {
    units[u].poff = prow;
    prow += (size_t)units[u].parts * units[u].G;
    for (uint32_t p = 0; p < units[u].parts; p++) tasks[nt++] = (task){(uint32_t)u, p};
  }
  return nt;
}

/* ---- kvdex_attend_ids ---------------------------------------------------------------------- */

static void check_task(void *ctx, size_t h, unsigned worker) {
  (void)worker;
  run *r = ctx;
  const uint64_t *l = r->in_ids[h];
  uint64_t n = r->in_n[h];
  hinfo *hi = &r->hinfo[h];
  *hi = (hinfo){.ids = l, .len = n, .status = LIST_OK};
  if (n == 0) return;
  uint64_t lo = l[0], top = l[0];
  int asc = 1;
  for (uint64_t i = 1; i < n; i++) {
    uint64_t x = l[i];
    asc &= x > l[i - 1];
    lo = x < lo ? x : lo;
    top = x > top ? x : top;
  }
  if (top >= r->n) {
    uint64_t i = 0;
    while (l[i] < r->n) i++;
    hi->bad = i;
    hi->status = LIST_BAD;
    return;
  }
  hi->lo = lo;
  hi->hi = top;
  if (!asc) hi->status = LIST_DEDUP;
}

/* Sorts and deduplicates a list through the worker's bitmap, which it leaves zero. */
static void dedup_task(void *ctx, size_t i, unsigned worker) {
  run *r = ctx;
  uint32_t h = r->dd_heads[i];
  hinfo *hi = &r->hinfo[h];
  uint64_t *bits = r->bits + (size_t)worker * r->bits_words;
  const uint64_t *l = r->in_ids[h];
  for (uint64_t k = 0; k < hi->len; k++) bits[l[k] >> 6] |= 1ull << (l[k] & 63);
  uint64_t *out = r->dd_out + r->dd_off[i], c = 0;
  for (uint64_t w = hi->lo >> 6; w <= hi->hi >> 6; w++) {
    uint64_t x = bits[w];
    if (!x) continue;
    bits[w] = 0;
    do {
      out[c++] = (w << 6) | (uint64_t)__builtin_ctzll(x);
      x &= x - 1;
    } while (x);
  }
  hi->ids = out;
  hi->len = c;
}

int kvdex_attend_ids(kvdex_seq *seq, uint32_t layer, const float *q,
                     const uint64_t *const *ids, const uint32_t *n_ids,
                     const kvdex_attend_opts *opts, kvdex_pool *pool,
                     kvdex_attend_scratch *scratch, float *o, float *lse) {
  static const char who[] = "attend";
  if (!ids || !n_ids || !o || !lse) return kvdex__seterr(KVDEX_EINVAL, "%s: NULL argument", who);
  setup st;
  int rc = check_common(who, seq, layer, q, 1, opts, pool, scratch, &st);
  if (rc) return rc;
  size_t n_q = st.n_q, d = st.d, max_parts = 0;
  for (size_t h = 0; h < n_q; h++) {
    if (n_ids[h] && !ids[h])
      return kvdex__seterr(KVDEX_EINVAL, "%s: query head %zu has %u ids but no list", who, h,
                           n_ids[h]);
    max_parts += (n_ids[h] + span_of(n_ids[h]) - 1) / span_of(n_ids[h]);
  }

  run r = {.mode = MODE_ATTEND, .in_ids = ids, .in_n = n_ids};
  size_t wbytes = worker_layout(&r, &st, 1, 1 /* with V */), total = 0;
  size_t at_views = lay(&total, st.n_kv * sizeof(kvdex_kv_view));
  size_t at_hinfo = lay(&total, n_q * sizeof(hinfo));
  size_t at_dd = lay(&total, n_q * (sizeof(uint32_t) + sizeof(size_t)));
  size_t at_units = lay(&total, n_q * sizeof(unit));
  size_t at_tasks = lay(&total, max_parts * sizeof(task));
  size_t at_q = lay(&total, n_q * d * sizeof(float));
  size_t at_po = lay(&total, max_parts * d * sizeof(float));
  size_t at_plse = lay(&total, max_parts * sizeof(float));
  size_t at_work = lay(&total, st.workers * wbytes);
  if ((rc = grow_main(scratch, total, who))) return rc;
  char *base = scratch->main;
  kvdex_kv_view *views = (kvdex_kv_view *)(base + at_views);
  if ((rc = take_views(who, seq, layer, &st, views, &r))) return rc;
  r.hinfo = (hinfo *)(base + at_hinfo);

  kvdex_pool_run(pool, n_q, check_task, &r);
  size_t n_dd = 0, dd_total = 0;
  uint32_t *dd_heads = (uint32_t *)(base + at_dd);
  size_t *dd_off = (size_t *)(dd_heads + n_q);
  for (size_t h = 0; h < n_q; h++) {
    const hinfo *hi = &r.hinfo[h];
    if (hi->status == LIST_BAD)
      return kvdex__seterr(KVDEX_EINVAL,
                           "%s: query head %zu, id %llu (at %llu) is not below the %llu committed "
                           "tokens of layer %u", who, h,
                           (unsigned long long)ids[h][hi->bad], (unsigned long long)hi->bad,
                           (unsigned long long)r.n, layer);
    if (hi->status == LIST_DEDUP) {
      dd_heads[n_dd] = (uint32_t)h;
      dd_off[n_dd++] = dd_total;
      dd_total += hi->len;
    }
  }
  if (n_dd) {
    r.bits_words = (size_t)((r.n + 63) / 64);
    if ((rc = grow_ids(scratch, dd_total, who))) return rc;
    if ((rc = grow_bits(scratch, st.workers * r.bits_words, who))) return rc;
    r.dd_heads = dd_heads;
    r.dd_off = dd_off;
    r.dd_out = scratch->ids;
    r.bits = scratch->bits;
    kvdex_pool_run(pool, n_dd, dedup_task, &r);
  }

  unit *units = (unit *)(base + at_units);
  for (size_t h = 0; h < n_q; h++) {
    units[h] = (unit){.ids = r.hinfo[h].ids, .kv = (uint32_t)(h / st.g), .G = 1, .q0 = h};
    unit_set_len(&units[h], r.hinfo[h].len);
  }
  task *tasks = (task *)(base + at_tasks);
  size_t nt = make_tasks(units, n_q, tasks);
  float *qs = (float *)(base + at_q);
  for (size_t h = 0; h < n_q; h++) scale_rows(qs + h * d, q + h * d, d, st.scale);
  r.q = qs;
  r.units = units;
  r.tasks = tasks;
  r.po = (float *)(base + at_po);
  r.plse = (float *)(base + at_plse);
  r.work = base + at_work;
  kvdex_pool_run(pool, nt, engine_task, &r);
  for (size_t h = 0; h < n_q; h++) {
    const unit *u = &units[h];
    merge_rows(r.po + u->poff * d, d, r.plse + u->poff, 1, u->parts, d, o + h * d, lse + h);
  }
  return KVDEX_OK;
}

/* ---- kvdex_attend_dense ---------------------------------------------------------------------- */

int kvdex_attend_dense(kvdex_seq *seq, uint32_t layer, const float *q, uint64_t sinks,
                       uint64_t window, const kvdex_attend_opts *opts, kvdex_pool *pool,
                       kvdex_attend_scratch *scratch, float *o, float *lse) {
  static const char who[] = "attend dense";
  if (!o || !lse) return kvdex__seterr(KVDEX_EINVAL, "%s: NULL argument", who);
  setup st;
  int rc = check_common(who, seq, layer, q, 1, opts, pool, scratch, &st);
  if (rc) return rc;
  size_t n_q = st.n_q, n_kv = st.n_kv, g = st.g, d = st.d;

  run r = {.mode = MODE_ATTEND};
  size_t wbytes = worker_layout(&r, &st, g, 1), total = 0;
  size_t at_views = lay(&total, n_kv * sizeof(kvdex_kv_view));
  size_t at_units = lay(&total, n_kv * sizeof(unit));
  size_t at_tasks = lay(&total, n_kv * MAX_PARTS * sizeof(task));
  size_t at_q = lay(&total, n_q * d * sizeof(float));
  size_t at_po = lay(&total, n_q * MAX_PARTS * d * sizeof(float));
  size_t at_plse = lay(&total, n_q * MAX_PARTS * sizeof(float));
  size_t at_work = lay(&total, st.workers * wbytes);
  if ((rc = grow_main(scratch, total, who))) return rc;
  char *base = scratch->main;
  kvdex_kv_view *views = (kvdex_kv_view *)(base + at_views);
  if ((rc = take_views(who, seq, layer, &st, views, &r))) return rc;
  uint64_t hi = r.n > window ? r.n - window : 0, lo = sinks < hi ? sinks : hi;

  unit *units = (unit *)(base + at_units);
  for (size_t h = 0; h < n_kv; h++) {
    units[h] = (unit){.base = lo, .kv = (uint32_t)h, .G = (uint32_t)g, .q0 = h * g};
    unit_set_len(&units[h], hi - lo);
  }
  task *tasks = (task *)(base + at_tasks);
  size_t nt = make_tasks(units, n_kv, tasks);
  float *qs = (float *)(base + at_q);
  for (size_t h = 0; h < n_q; h++) scale_rows(qs + h * d, q + h * d, d, st.scale);
  r.q = qs;
  r.units = units;
  r.tasks = tasks;
  r.po = (float *)(base + at_po);
  r.plse = (float *)(base + at_plse);
  r.work = base + at_work;
  kvdex_pool_run(pool, nt, engine_task, &r);
  for (size_t h = 0; h < n_q; h++) {
    const unit *u = &units[h / g];
    size_t j = h % g;
    merge_rows(r.po + (u->poff + j) * d, g * d, r.plse + u->poff + j, g, u->parts, d, o + h * d,
               lse + h);
  }
  return KVDEX_OK;
}

/* ---- kvdex_attend_mass ------------------------------------------------------------------------ */

int kvdex_attend_mass(kvdex_seq *seq, uint32_t layer, const float *q, uint32_t n_obs,
                      uint64_t first, uint64_t count, const kvdex_attend_opts *opts,
                      kvdex_pool *pool, kvdex_attend_scratch *scratch, float *mass) {
  static const char who[] = "attend mass";
  if (!mass) return kvdex__seterr(KVDEX_EINVAL, "%s: NULL argument", who);
  if (n_obs == 0 || n_obs > KVDEX_MAX_OBS)
    return kvdex__seterr(KVDEX_EINVAL, "%s: %u observation queries (must be 1..%d)", who, n_obs,
                         KVDEX_MAX_OBS);
  setup st;
  int rc = check_common(who, seq, layer, q, n_obs, opts, pool, scratch, &st);
  if (rc) return rc;
  size_t n_q = st.n_q, n_kv = st.n_kv, g = st.g, d = st.d, rows = (size_t)n_obs * g;

  run r = {.mode = MODE_MASS_LSE};
  size_t wbytes = worker_layout(&r, &st, rows, 0), total = 0;
  size_t at_views = lay(&total, n_kv * sizeof(kvdex_kv_view));
  size_t at_units = lay(&total, n_kv * sizeof(unit));
  size_t at_tasks = lay(&total, n_kv * MAX_PARTS * sizeof(task));
  size_t at_q = lay(&total, n_kv * rows * d * sizeof(float));
  size_t at_plse = lay(&total, n_kv * MAX_PARTS * rows * sizeof(float));
  size_t at_rlse = lay(&total, n_kv * rows * sizeof(float));
  size_t at_work = lay(&total, st.workers * wbytes);
  if ((rc = grow_main(scratch, total, who))) return rc;
  char *base = scratch->main;
  kvdex_kv_view *views = (kvdex_kv_view *)(base + at_views);
  if ((rc = take_views(who, seq, layer, &st, views, &r))) return rc;
  if (count > r.n || first > r.n - count)
    return kvdex__seterr(KVDEX_EINVAL,
                         "%s: tokens [%llu, +%llu) reach past the %llu committed tokens of layer %u",
                         who, (unsigned long long)first, (unsigned long long)count,
                         (unsigned long long)r.n, layer);
  if (count == 0) return KVDEX_OK;

  /* Rows of kv head h: observation o, group member j at row o * g + j. */
  float *qs = (float *)(base + at_q);
  for (size_t h = 0; h < n_kv; h++)
    for (size_t ob = 0; ob < n_obs; ob++)
      for (size_t j = 0; j < g; j++)
        scale_rows(qs + ((h * n_obs + ob) * g + j) * d, q + (ob * n_q + h * g + j) * d, d,
                   st.scale);
  unit *units = (unit *)(base + at_units);
  for (size_t h = 0; h < n_kv; h++) {
    units[h] = (unit){.base = first, .kv = (uint32_t)h, .G = (uint32_t)rows, .q0 = h * rows};
    unit_set_len(&units[h], count);
  }
  task *tasks = (task *)(base + at_tasks);
  size_t nt = make_tasks(units, n_kv, tasks);
  r.q = qs;
  r.units = units;
  r.tasks = tasks;
  r.plse = (float *)(base + at_plse);
  r.work = base + at_work;
  kvdex_pool_run(pool, nt, engine_task, &r);

  float *row_lse = (float *)(base + at_rlse);
  for (size_t h = 0; h < n_kv; h++) {
    const unit *u = &units[h];
    for (size_t j = 0; j < rows; j++)
      merge_rows(NULL, 0, r.plse + u->poff + j, rows, u->parts, 0, NULL, &row_lse[h * rows + j]);
  }
  r.mode = MODE_MASS_SUM;
  r.row_lse = row_lse;
  r.mass = mass;
  r.mass_count = count;
  kvdex_pool_run(pool, nt, engine_task, &r);
  return KVDEX_OK;
}
