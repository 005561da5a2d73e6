/* retain: SnapKV / InfiniRetri token selection (contract in retain.h). The mass
 * comes from kvdex_attend_mass; here it is pooled over a centred window and the top
 * `budget` per kv head are kept with a bounded candidate buffer (kvdex__topk_buf,
 * topk.h: threshold test, partial selection when it fills), one kv head per task.
 */
#include <assert.h>
#include <math.h>
#include <stdlib.h>

#include "index/retain.h"

static int cmp_id(const void *pa, const void *pb) {
  uint64_t a = ((const kvdex_hit *)pa)->id, b = ((const kvdex_hit *)pb)->id;
  return a < b ? -1 : a > b;
}

/* ---- pooling and selection, one kv head per task --------------------------------- */

typedef struct sel {
  const float *mass; /* [n_kv][e] */
  uint64_t lo, e;    /* eligible ids [lo, lo + e) */
  uint32_t budget, half;
  int pooling;
  kvdex_hit *buf;    /* [n_kv][cap] */
  size_t cap;        /* min(e, 2 * budget) */
  uint64_t *ids;
  float *scores;
} sel;

/* The pooled score of position i; NaN if the window holds a NaN. */
static float pooled(const sel *s, const float *m, uint64_t i) {
  uint64_t a = i >= s->half ? i - s->half : 0;
  uint64_t b = i + s->half < s->e ? i + s->half : s->e - 1;
  if (s->pooling == KVDEX_POOLING_AVG) {
    double sum = 0.0;
    for (uint64_t u = a; u <= b; u++) sum += m[u];
    return (float)(sum / (double)(b - a + 1));
  }
  float v = m[a];
  for (uint64_t u = a + 1; u <= b; u++) {
    if (isnan(m[u])) return NAN;
    if (m[u] > v) v = m[u];
  }
  return v;
}

static void sel_task(void *ctx, size_t g, unsigned worker) {
  (void)worker;
  const sel *s = ctx;
  const float *m = s->mass + g * s->e;
  size_t k = s->budget;
  kvdex__topk_buf b;
  kvdex__topk_buf_init(&b, s->buf + g * s->cap, s->cap, k);
  for (uint64_t i = 0; i < s->e; i++) { /* a NaN window ranks lowest, but still ranks */
    float v = pooled(s, m, i);
    kvdex__topk_buf_push(&b, s->lo + i, isnan(v) ? -INFINITY : v);
  }
  assert(b.count >= k); /* budget <= e, and every position is taken until it fills */
  if (b.count > k) kvdex__topk_buf_shrink(&b);
  qsort(b.buf, k, sizeof *b.buf, cmp_id);
  for (size_t i = 0; i < k; i++) {
    s->ids[g * k + i] = b.buf[i].id;
    if (s->scores) s->scores[g * k + i] = b.buf[i].score;
  }
}

int kvdex_retain_select(kvdex_seq *seq, uint32_t layer, const float *q_obs, uint32_t n_obs,
                        const kvdex_retain_opts *opts, kvdex_pool *pool,
                        kvdex_attend_scratch *scratch, uint64_t *ids, float *scores) {
  static const char who[] = "retain";
  if (!seq || !q_obs || !opts || !scratch || !ids)
    return kvdex__seterr(KVDEX_EINVAL, "%s: NULL argument", who);
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  if (layer >= sh->n_layers)
    return kvdex__seterr(KVDEX_EINVAL, "%s: layer %u out of range (sequence has %u)", who, layer,
                         sh->n_layers);
  if (opts->pool_window % 2 == 0 || opts->pool_window > KVDEX_RETAIN_MAX_POOL_WINDOW)
    return kvdex__seterr(KVDEX_EINVAL, "%s: pool_window %u (must be odd, 1..%d)", who,
                         opts->pool_window, KVDEX_RETAIN_MAX_POOL_WINDOW);
  if (opts->pooling != KVDEX_POOLING_MAX && opts->pooling != KVDEX_POOLING_AVG)
    return kvdex__seterr(KVDEX_EINVAL, "%s: unknown pooling %d", who, opts->pooling);
  if (n_obs == 0 || n_obs > KVDEX_MAX_OBS)
    return kvdex__seterr(KVDEX_EINVAL, "%s: %u observation queries (must be 1..%d)", who, n_obs,
                         KVDEX_MAX_OBS);
  uint64_t n = kvdex_seq_tokens(seq, layer);
  uint64_t hi = n > opts->window ? n - opts->window : 0, lo = opts->sinks < hi ? opts->sinks : hi;
  uint64_t e = hi - lo;
  if (opts->budget == 0 || opts->budget > e)
    return kvdex__seterr(KVDEX_EINVAL, "%s: budget %u (must be 1..%llu, the eligible tokens)", who,
                         opts->budget, (unsigned long long)e);

  size_t n_kv = sh->n_kv_heads;
  size_t cap = 2 * (uint64_t)opts->budget < e ? 2 * (size_t)opts->budget : (size_t)e;
  float *mass = malloc(n_kv * (size_t)e * sizeof *mass);
  kvdex_hit *buf = malloc(n_kv * cap * sizeof *buf);
  int rc = KVDEX_OK;
  if (!mass || !buf) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "%s: out of memory for %zu x %llu scores", who, n_kv,
                       (unsigned long long)e);
    goto out;
  }
  kvdex_attend_opts aopts = {.scale = opts->scale, .simd = opts->simd};
  if ((rc = kvdex_attend_mass(seq, layer, q_obs, n_obs, lo, e, &aopts, pool, scratch, mass)))
    goto out;
  sel s = {.mass = mass, .lo = lo, .e = e, .budget = opts->budget,
           .half = opts->pool_window / 2, .pooling = opts->pooling, .buf = buf, .cap = cap,
           .ids = ids, .scores = scores};
  kvdex_pool_run(pool, n_kv, sel_task, &s);
out:
  free(mass);
  free(buf);
  return rc;
}
