/* graph: the attention-aware graph index ("graph:" in ann.h), our C11 take on
 * RetrievalAttention's index. Decode queries are out-of-distribution for the keys, so
 * the graph is shaped by prefill queries: each one's exact top-K keys become
 * neighbours of each other (RoarGraph-style projection of the query->key bipartite
 * kNN graph), pruned for diversity; keys no query answered are linked in by a
 * key-only search on the graph (connectivity repair). Search is a beam search by inner
 * product from a few entry keys. It never copies keys: rows are read from the view.
 * It does not scan the tail past the built tokens (callers do), nor update the graph
 * incrementally (a rebuild replaces it).
 *
 * Settings ("graph:K=128,degree=32,..."; kSettings below is the authority):
 *   K        1..1024    128  exact top-K keys taken per prefill query (projection)
 *   degree   1..1024    32   most out-neighbours per key (adjacency: 4 bytes each)
 *   ef       1..65536   128  search beam width (raised to k, capped at the key count)
 *   efc      1..65536   64   beam width of the key-only searches of the repair
 *   entries  1..1024    16   entry keys: the most answered keys, plus spread ones
 *   cand     1..65536   256  co-answer candidates per key that go to pruning
 *   alpha    1.0..4.0   1.1  pruning slack (1 = strictest; larger keeps more)
 *   train    0..2^32-1  0    most prefill queries used (evenly subsampled); 0 = all
 *   repair   0..1       1    connectivity repair; 0 is for tests only: it leaves the
 *                            keys no query answered unreachable (and says how many)
 *   expand   0..1024    24   prefill queries whose answer lists join the beam (0 = off)
 *   seeds    1..1024    32   best beam keys whose answering queries are candidates
 *   fanout   1..1024    8    most answering queries taken per seed key
 *   ef0      1..65536   16   beam expanded before the answer lists join (<= ef)
 *
 * Build, in phases, each parallel on the kvdex_pool; the result does not depend on
 * the pool size or the view's block layout:
 *  1. exact top-K of every prefill query: tasks of 32 queries scan all keys once in
 *     tiles of 256 rows with kvdex_score_keys, a bounded heap per query;
 *  2. projection: per key x, candidates = keys in the same answer list as x, weighted
 *     by how many lists they share with it; the `cand` heaviest, heaviest first, are
 *     pruned by inner product: c is dropped when a kept neighbour y covers it,
 *     y.c > x.c + (alpha-1)|x.c| (seen from c as a query, y beats x, so a search
 *     going c's way does as well through y); at most `degree` are kept;
 *  3. reverse edges: x->y proposes y->x; where a key then has more than `degree`,
 *     all its candidates are pruned again, best x.c first;
 *  4. entry keys, then repair: the keys not reachable from them (those no query
 *     answered: typically a third to a half) are inserted in rounds, in a scattered
 *     order; a key-only search (inner product with the key itself, beam efc) gives
 *     each its pruned out-edges, and edges back from the keys found (into free slots,
 *     or for the first two replacing a neighbour that keeps another in-edge) make it
 *     reachable; a last BFS pass links anything still unreached from a reached key
 *     with room (or, when all are full, from a BFS-tree leaf, cutting nobody off).
 * Without prefill queries the keys themselves (centred, at most 16384 evenly spaced)
 * stand in as queries: a key-only kNN graph, which the note reports.
 *
 * Search: best-first beam of width ef from the entry keys, inner product with the
 * query; neighbour rows are gathered and scored in one kvdex_score_keys call, so the
 * scores have the exact scan's bits. With prefill queries the graph also keeps them
 * (f16 unit vectors, ~d*2 bytes each) with their top-K answer lists: the beam's first
 * ef0 entries are expanded, then the prefill queries that answered its best `seeds`
 * keys are scored by cosine and the answer lists of the best `expand` of them join
 * the beam, which is expanded to ef (answer_expand: the jump to the second topic a
 * query mixes in, which co-answer edges reach only by chance). touched = keys scored
 * plus prefill query vectors scored.
 */
#include <assert.h>
#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "index/ann_int.h"
#include "index/topk.h"

/* ---- settings ------------------------------------------------------------------- */

typedef struct graph_params {
  uint32_t K, degree, ef, efc, entries, cand, train, repair, expand, seeds, fanout, ef0;
  float alpha;
} graph_params;

/* The settings: name in the spec, type, bounds, default, meaning. */
typedef struct graph_setting {
  const char *name;
  size_t off;
  int is_float; /* else uint32 */
  double lo, hi, def;
  const char *help;
} graph_setting;

static const graph_setting kSettings[] = {
    {"K", offsetof(graph_params, K), 0, 1, 1024, 128,
     "keys, exact top-K taken per prefill query for the projection"},
    {"degree", offsetof(graph_params, degree), 0, 1, 1024, 32,
     "keys, most out-neighbours per key (4 bytes each)"},
    {"ef", offsetof(graph_params, ef), 0, 1, KVDEX_MAX_K, 128,
     "keys, search beam width (raised to k, capped at the key count)"},
    {"efc", offsetof(graph_params, efc), 0, 1, KVDEX_MAX_K, 64,
     "keys, beam width of the repair's key-only searches"},
    {"entries", offsetof(graph_params, entries), 0, 1, 1024, 16,
     "keys, entry points: the most answered keys plus spread ones"},
    {"cand", offsetof(graph_params, cand), 0, 1, 65536, 256,
     "keys, co-answer candidates per key that go to pruning"},
    {"alpha", offsetof(graph_params, alpha), 1, 1.0, 4.0, 1.1,
     "ratio, pruning slack (1 = strictest, larger keeps more)"},
    {"train", offsetof(graph_params, train), 0, 0, 4294967295.0, 0,
     "queries, most prefill queries used, evenly spaced (0 = all)"},
    {"repair", offsetof(graph_params, repair), 0, 0, 1, 1,
     "bool, connectivity repair (0 for tests: leaves unanswered keys unreachable)"},
    {"expand", offsetof(graph_params, expand), 0, 0, 1024, 24,
     "queries, prefill queries whose answer lists join the beam (0 = off)"},
    {"seeds", offsetof(graph_params, seeds), 0, 1, 1024, 32,
     "keys, best beam keys whose answering prefill queries are candidates for expand"},
    {"ef0", offsetof(graph_params, ef0), 0, 1, KVDEX_MAX_K, 16,
     "keys, beam width of the first pass, before expansion (capped at ef)"},
    {"fanout", offsetof(graph_params, fanout), 0, 1, 1024, 8,
     "queries, most answering queries taken per seed key (hubs answer thousands)"},
};
#define N_SETTINGS (sizeof kSettings / sizeof kSettings[0])

/* ---- state ------------------------------------------------------------------------ */

typedef struct graph {
  uint64_t n;        /* keys in the graph */
  uint32_t R;        /* adjacency stride (= degree) */
  uint32_t *adj;     /* [n][R] */
  uint32_t *deg;     /* [n] */
  uint32_t n_entry;
  uint32_t *entry;   /* [n_entry] */
  /* The prefill queries, kept for the search's expansion step (m == 0: key-only) */
  uint32_t m, K;     /* queries, answer list stride */
  uint16_t *qv;      /* [m][d] unit vectors, f16 */
  uint32_t *ans;     /* [m][K] exact top-K keys of each, best first */
  uint32_t *ans_n;   /* [m] */
  uint64_t *inv_off; /* [n+1] CSR: key -> the queries whose top-K holds it */
  uint32_t *inv;     /* [inv_off[n]] */
} graph;

typedef struct graph_impl {
  graph_params p;
  graph g; /* built state; g.n == 0 before build */
} graph_impl;

static void graph_clear(graph *g) {
  free(g->adj);
  free(g->deg);
  free(g->entry);
  free(g->qv);
  free(g->ans);
  free(g->ans_n);
  free(g->inv_off);
  free(g->inv);
  memset(g, 0, sizeof *g);
}

static int g_init(kvdex_index *ix) {
  graph_impl *im = calloc(1, sizeof *im);
  if (!im) return kvdex__seterr(KVDEX_ENOMEM, "graph: out of memory");
  for (size_t i = 0; i < N_SETTINGS; i++) {
    char *f = (char *)&im->p + kSettings[i].off;
    if (kSettings[i].is_float) *(float *)f = (float)kSettings[i].def;
    else *(uint32_t *)f = (uint32_t)kSettings[i].def;
  }
  ix->impl = im;
  return 0;
}

static void g_free(kvdex_index *ix) {
  graph_impl *im = ix->impl;
  if (!im) return;
  graph_clear(&im->g);
  free(im);
  ix->impl = NULL;
}

static int g_param(kvdex_index *ix, const char *name, const char *value) {
  graph_impl *im = ix->impl;
  for (size_t i = 0; i < N_SETTINGS; i++) {
    const graph_setting *s = &kSettings[i];
    if (strcmp(s->name, name) != 0) continue;
    char *end = NULL;
    double v;
    if (!value || !*value || *value == '-' || *value == '+' || *value == ' ')
      goto bad;
    if (s->is_float) {
      v = strtod(value, &end);
      if (*end || !isfinite(v)) goto bad;
    } else {
      if (*value < '0' || *value > '9') goto bad;
      unsigned long long u = strtoull(value, &end, 10);
      if (*end || u > 4294967295ull) goto bad;
      v = (double)u;
    }
    if (v < s->lo || v > s->hi) goto bad;
    char *f = (char *)&im->p + s->off;
    if (s->is_float) *(float *)f = (float)v;
    else *(uint32_t *)f = (uint32_t)v;
    return 0;
  bad:
    return kvdex__seterr(KVDEX_EINVAL, "graph: %s=%s: expected %s in [%g, %g] (%s)", name,
                         value ? value : "", s->is_float ? "a number" : "an integer", s->lo,
                         s->hi, s->help);
  }
  char names[128] = "";
  for (size_t i = 0, l = 0; i < N_SETTINGS && l < sizeof names; i++)
    l += (size_t)snprintf(names + l, sizeof names - l, "%s%s", i ? ", " : "", kSettings[i].name);
  return kvdex__seterr(KVDEX_EINVAL, "graph: unknown parameter '%s' (accepted: %s)", name, names);
}

static void g_spec(const kvdex_index *ix, char *buf, size_t len) {
  const graph_params *p = &((const graph_impl *)ix->impl)->p;
  snprintf(buf, len,
           "graph:K=%u,degree=%u,ef=%u,efc=%u,entries=%u,cand=%u,alpha=%g,train=%u,repair=%u,"
           "expand=%u,seeds=%u,fanout=%u,ef0=%u",
           p->K, p->degree, p->ef, p->efc, p->entries, p->cand, (double)p->alpha, p->train,
           p->repair, p->expand, p->seeds, p->fanout, p->ef0);
}

static size_t g_memory(const kvdex_index *ix) {
  const graph_impl *im = ix->impl;
  if (!im) return 0;
  const graph *g = &im->g;
  size_t q = 0;
  if (g->m)
    q = (size_t)g->m * ix->dim * sizeof(uint16_t) + (size_t)g->m * (g->K + 1) * sizeof(uint32_t) +
        ((size_t)g->n + 1) * sizeof(uint64_t) + (size_t)g->inv_off[g->n] * sizeof(uint32_t);
  return sizeof *im + (size_t)g->n * g->R * sizeof(uint32_t) + (size_t)g->n * sizeof(uint32_t) +
         (size_t)g->n_entry * sizeof(uint32_t) + q;
}

/* ---- scoring rows read from the view ------------------------------------------------ */

static inline size_t row_bytes(const kvdex_kv_view *v) {
  return (size_t)v->head_dim * kvdex_dtype_size(v->dtype);
}

/* out[i] = q . key[ids[i]] (with the kernel's bits) for i < m; rows are gathered into
 * rowbuf (room for m rows) so that one kernel call scores them all. */
static void score_ids(const kvdex_kv_view *keys, const uint32_t *ids, size_t m, const float *q,
                      void *rowbuf, float *out) {
  if (!m) return;
  size_t rb = row_bytes(keys);
  for (size_t i = 0; i < m; i++) __builtin_prefetch(kvdex__view_row(keys, ids[i]));
  for (size_t i = 0; i < m; i++) memcpy((char *)rowbuf + i * rb, kvdex__view_row(keys, ids[i]), rb);
  kvdex_score_keys(KVDEX_SIMD_AUTO, keys->dtype, rowbuf, m, keys->head_dim, q, 1, out);
}

/* ---- beam search -------------------------------------------------------------------- */

/* A beam entry. The beam is kept sorted best first (score desc, id asc). */
typedef struct beam_ent {
  float score;
  uint32_t id;
  uint32_t done; /* expanded */
} beam_ent;

static inline int ent_better(beam_ent a, beam_ent b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

/* Inserts e into the sorted beam of *size <= L entries; returns its position, or L if
 * it was not good enough. NaN scores are never inserted. */
static size_t beam_insert(beam_ent *beam, size_t *size, size_t L, beam_ent e) {
  size_t n = *size;
  assert(L >= 1 && n <= L);
  if (e.score != e.score) return L;
  if (n == L && !ent_better(e, beam[n - 1])) return L;
  size_t lo = 0, hi = n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (ent_better(beam[mid], e)) lo = mid + 1;
    else hi = mid;
  }
  if (n == L) n--;
  memmove(beam + lo + 1, beam + lo, (n - lo) * sizeof *beam);
  beam[lo] = e;
  *size = n + 1;
  return lo;
}

static int u32_order(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return (x > y) - (x < y);
}

/* Most candidate prefill queries one expansion step scores. */
#define EXPAND_CAP 4096

/* Floats that hold R gathered key rows. */
static size_t row_floats(const graph *g, const kvdex_kv_view *keys) {
  return ((size_t)g->R * row_bytes(keys) + sizeof(float) - 1) / sizeof(float);
}

/* Scratch sizes the beam search needs for a graph of stride R, dim d. */
static int beam_prepare(kvdex_index_scratch *s, const graph *g, const kvdex_kv_view *keys,
                        size_t L) {
  int rc = kvdex__scratch_visit_begin(s, g->n);
  if (rc) return rc;
  /* hits are 16 bytes, beam entries 12: L hits hold L beam entries */
  if ((rc = kvdex__scratch_hits(s, L))) return rc;
  return kvdex__scratch_floats(s, row_floats(g, keys) + g->R + 16 + 2 * EXPAND_CAP);
}

/* The search's view of the scratch beam_prepare sized: the beam (in s->h), the visit
 * marks of this search's epoch, R gathered rows, then their R (+16) scores; the
 * expansion step's candidates follow those. */
typedef struct beam_mem {
  beam_ent *beam;
  uint32_t *visit, epoch;
  void *rowbuf;
  float *sc;
} beam_mem;

static beam_mem beam_mem_of(const graph *g, const kvdex_kv_view *keys, kvdex_index_scratch *s) {
  assert(g->R <= 1024); /* the searches batch at most R ids in a uint32_t[1024] */
  return (beam_mem){(beam_ent *)(void *)s->h, s->visit, s->epoch, s->f,
                    s->f + row_floats(g, keys)};
}

/* Expands the beam (*size entries, sorted, some not yet expanded) best first until
 * every entry among its first `limit` has been expanded. *touched += keys scored. */
static void beam_expand(const graph *g, const kvdex_kv_view *keys, const float *q, size_t L,
                        size_t limit,
                        kvdex_index_scratch *s, size_t *size, uint64_t *touched) {
  const beam_mem bm = beam_mem_of(g, keys, s);
  uint32_t ids[1024]; /* R <= 1024 */
  size_t n = *size;
  uint64_t t = 0;
  size_t k = 0;
  while (k < n && k < limit) {
    if (bm.beam[k].done) {
      k++;
      continue;
    }
    bm.beam[k].done = 1;
    uint32_t c = bm.beam[k].id;
    const uint32_t *nb = g->adj + (size_t)c * g->R;
    uint32_t dc = g->deg[c];
    assert(dc <= g->R); /* built so, and checked on load */
    size_t m = 0;
    for (uint32_t j = 0; j < dc; j++) {
      uint32_t id = nb[j];
      if (bm.visit[id] == bm.epoch) continue;
      bm.visit[id] = bm.epoch;
      ids[m++] = id;
    }
    score_ids(keys, ids, m, q, bm.rowbuf, bm.sc);
    t += m;
    size_t low = n + 1;
    for (size_t i = 0; i < m; i++) {
      size_t pos = beam_insert(bm.beam, &n, L, (beam_ent){bm.sc[i], ids[i], 0});
      if (pos < low) low = pos;
    }
    k = low <= k ? low : k + 1;
  }
  *size = n;
  *touched += t;
}

/* Best-first beam search of width L for q (f32 [d]) from the entry keys; on return
 * the beam (in s->h, as beam_ent) holds *size entries best first. *touched += keys
 * scored. beam_prepare must have been called for this search. */
static void beam_run(const graph *g, const kvdex_kv_view *keys, const float *q, size_t L,
                     size_t limit,
                     kvdex_index_scratch *s, size_t *size, uint64_t *touched) {
  const beam_mem bm = beam_mem_of(g, keys, s);
  uint32_t ids[1024]; /* R <= 1024 */
  size_t n = 0;
  uint64_t t = 0;
  for (uint32_t e0 = 0; e0 < g->n_entry; e0 += g->R) {
    size_t m = 0;
    for (uint32_t e = e0; e < g->n_entry && e < e0 + g->R; e++) {
      uint32_t id = g->entry[e];
      if (bm.visit[id] == bm.epoch) continue;
      bm.visit[id] = bm.epoch;
      ids[m++] = id;
    }
    score_ids(keys, ids, m, q, bm.rowbuf, bm.sc);
    t += m;
    for (size_t i = 0; i < m; i++) beam_insert(bm.beam, &n, L, (beam_ent){bm.sc[i], ids[i], 0});
  }
  *size = n;
  *touched += t;
  beam_expand(g, keys, q, L, limit, s, size, touched);
}

/* RetrievalAttention's observation, used at search time as well as at build: a
 * decode query's best keys are what the prefill queries nearest to it answered. The
 * prefill queries that answered the beam's best `seeds` keys are scored (cosine: their
 * unit vectors . q), the answer lists of the best `expand` of them join the beam, and
 * the beam is expanded again. This jumps to the other regions a query mixes in (a
 * second topic), which co-answer edges alone reach only by chance. *touched counts
 * the query vectors scored as well as the keys. */
static void answer_expand(const graph *g, uint32_t dim, const kvdex_kv_view *keys, const float *q,
                          size_t L, size_t limit, uint32_t seeds, uint32_t fanout,
                          uint32_t expand, kvdex_index_scratch *s,
                          size_t *size, uint64_t *touched) {
  const beam_mem bm = beam_mem_of(g, keys, s);
  uint32_t *cq = (uint32_t *)(void *)(bm.sc + g->R + 16);
  float *cs = (float *)(void *)(cq + EXPAND_CAP);
  size_t n = *size, nc = 0;
  for (size_t i = 0; i < n && i < seeds && nc < EXPAND_CAP; i++) {
    uint32_t x = bm.beam[i].id;
    /* hubs (heavy hitters answer most queries) would flood the candidates: at most
     * `fanout` of a key's queries, spread over its list */
    uint64_t e0 = g->inv_off[x], ne = g->inv_off[x + 1] - e0;
    uint64_t take = ne < fanout ? ne : fanout;
    for (uint64_t j = 0; j < take && nc < EXPAND_CAP; j++) cq[nc++] = g->inv[e0 + j * ne / take];
  }
  if (!nc) return;
  qsort(cq, nc, sizeof *cq, u32_order);
  size_t u = 1;
  for (size_t i = 1; i < nc; i++)
    if (cq[i] != cq[u - 1]) cq[u++] = cq[i];
  nc = u;
  /* score the candidate queries, as many per kernel call as the row buffer holds */
  size_t qrb = (size_t)dim * sizeof(uint16_t), per = g->R * row_bytes(keys) / qrb;
  for (size_t c0 = 0; c0 < nc; c0 += per) {
    size_t m = nc - c0 < per ? nc - c0 : per;
    for (size_t i = 0; i < m; i++)
      memcpy((char *)bm.rowbuf + i * qrb, g->qv + (size_t)cq[c0 + i] * dim, qrb);
    kvdex_score_keys(KVDEX_SIMD_AUTO, KVDEX_DTYPE_F16, bm.rowbuf, m, dim, q, 1, cs + c0);
  }
  uint64_t t = nc;
  uint32_t ids[1024]; /* flushed at R <= 1024 */
  for (uint32_t e = 0; e < expand && e < nc; e++) {
    size_t best = e; /* selection: expand is small */
    for (size_t i = e + 1; i < nc; i++)
      if (cs[i] > cs[best] || (cs[i] == cs[best] && cq[i] < cq[best])) best = i;
    uint32_t tq = cq[best];
    float ts = cs[best];
    cq[best] = cq[e];
    cs[best] = cs[e];
    cq[e] = tq;
    cs[e] = ts;
    const uint32_t *a = g->ans + (size_t)tq * g->K;
    size_t m = 0;
    for (uint32_t r = 0; r < g->ans_n[tq]; r++) {
      uint32_t id = a[r];
      if (bm.visit[id] == bm.epoch) continue;
      bm.visit[id] = bm.epoch;
      ids[m++] = id;
      if (m == g->R || r + 1 == g->ans_n[tq]) {
        score_ids(keys, ids, m, q, bm.rowbuf, bm.sc);
        t += m;
        for (size_t i = 0; i < m; i++) beam_insert(bm.beam, &n, L, (beam_ent){bm.sc[i], ids[i], 0});
        m = 0;
      }
    }
    if (m) {
      score_ids(keys, ids, m, q, bm.rowbuf, bm.sc);
      t += m;
      for (size_t i = 0; i < m; i++) beam_insert(bm.beam, &n, L, (beam_ent){bm.sc[i], ids[i], 0});
    }
  }
  *size = n;
  *touched += t;
  beam_expand(g, keys, q, L, limit, s, size, touched);
}

static int query_finite(const float *q, uint32_t d) {
  for (uint32_t i = 0; i < d; i++)
    if (!isfinite(q[i])) return 0;
  return 1;
}

static int g_search(const kvdex_index *ix, const kvdex_kv_view *keys, const float *q, uint32_t k,
                    const kvdex_index_params *params, kvdex_index_scratch *scratch, kvdex_hit *hits,
                    uint32_t *n_hits, uint64_t *touched) {
  const graph_impl *im = ix->impl;
  const graph *g = &im->g;
  if (!ix->n_built || !g->n) return kvdex__seterr(KVDEX_EINVAL, "graph: search before build");
  if (!keys || !q || !scratch || !hits || !n_hits || !touched)
    return kvdex__seterr(KVDEX_EINVAL, "graph: search: NULL argument");
  if (k == 0 || k > KVDEX_MAX_K)
    return kvdex__seterr(KVDEX_EINVAL, "graph: k=%u out of [1, %u]", k, KVDEX_MAX_K);
  if (keys->head_dim != ix->dim || !kvdex_dtype_size(keys->dtype) || !keys->block_tokens ||
      keys->n_tokens < g->n || !keys->k_blocks)
    return kvdex__seterr(KVDEX_EINVAL,
                         "graph: search: the view (%llu tokens, dim %u) does not cover the %llu "
                         "tokens x dim %u the graph was built on",
                         (unsigned long long)keys->n_tokens, keys->head_dim,
                         (unsigned long long)g->n, ix->dim);
  if (!query_finite(q, ix->dim)) return kvdex__seterr(KVDEX_EINVAL, "graph: non-finite query");
  size_t ef = params && params->ef ? params->ef : im->p.ef;
  size_t L = ef < k ? k : ef;
  if (L > g->n) L = (size_t)g->n; /* the beam never holds more than every key */
  int rc = beam_prepare(scratch, g, keys, L);
  if (rc) return rc;
  size_t n = 0;
  uint64_t t = 0;
  if (g->m && im->p.expand) {
    /* a narrow first pass finds where the query lives; the answer lists of the prefill
     * queries that live there, then the beam, do the rest. The beam holds k entries
     * but only its best ef are expanded: a large k (a budget of thousands of tokens
     * for Attend) is filled from the answer lists, more of them as k grows, instead
     * of widening the walk in proportion to k. */
    size_t L0 = im->p.ef0 < L ? im->p.ef0 : L;
    uint32_t expand = im->p.expand;
    if (k > ef && g->K && 2 * (k / g->K + 1) > expand) expand = 2 * (k / g->K + 1);
    if (expand > 1024) expand = 1024;
    beam_run(g, keys, q, L, L0, scratch, &n, &t);
    answer_expand(g, ix->dim, keys, q, L, ef < L ? ef : L, im->p.seeds, im->p.fanout, expand,
                  scratch, &n, &t);
    /* too few keys met to fill k: walk on (wider) until the beam holds k */
    if (n < k && n < L) beam_expand(g, keys, q, L, L, scratch, &n, &t);
  } else {
    beam_run(g, keys, q, L, L, scratch, &n, &t);
  }
  const beam_ent *beam = (const beam_ent *)(const void *)scratch->h;
  uint32_t m = n < k ? (uint32_t)n : k;
  for (uint32_t i = 0; i < m; i++) hits[i] = (kvdex_hit){beam[i].id, beam[i].score};
  *n_hits = m;
  *touched = t;
  return 0;
}

/* ---- build: shared context ------------------------------------------------------- */

typedef struct cand {
  float w; /* co-answer weight, or x . c while pruning */
  uint32_t id;
} cand;

/* Per-worker buffers of the build. */
typedef struct worker {
  float *xf, *cf;   /* [d] f32 rows */
  void *rows;       /* cap_rows rows in the keys' dtype */
  void *kept;       /* [R] rows */
  float *ip;        /* [cap_rows] */
  size_t cap_rows;
  float *w;         /* [n] weights, kept zero between keys */
  uint32_t *touch;  /* [n] */
  cand *cands;      /* [n] */
  kvdex_index_scratch *s;
} worker;

typedef struct build {
  const kvdex_kv_view *keys;
  uint64_t n;
  uint32_t d, R, K;
  float alpha;
  size_t cand_cap;
  const graph_params *p;
  graph *g;
  worker *wk;
  unsigned n_workers;
  /* projection input */
  uint64_t m;              /* queries used */
  const float *tq;         /* [m][d] */
  uint32_t *gt;            /* [m][K] */
  uint32_t *gt_n;          /* [m] */
  uint64_t *inv_off;       /* [n+1] */
  uint32_t *inv;           /* [m*K]: queries answered by each key */
  /* reverse edges */
  uint64_t *rev_off;
  uint32_t *rev;
  /* repair rounds */
  const uint32_t *batch;   /* keys to insert this round */
  uint32_t *outl, *outn;   /* [batch][R], [batch] pruned out-edges */
  uint32_t *alt, *altn;    /* [batch][R], [batch] search results (for in-edges) */
  _Atomic int err;         /* first failure of a task (ENOMEM), 0 if none */
} build;

static int worker_rows(worker *w, size_t rows, size_t rb) {
  if (rows <= w->cap_rows) return 0;
  size_t cap = w->cap_rows ? w->cap_rows : 256;
  while (cap < rows) cap *= 2;
  void *r = realloc(w->rows, cap * rb);
  if (!r) return KVDEX_ENOMEM;
  w->rows = r;
  float *ip = realloc(w->ip, cap * sizeof *ip);
  if (!ip) return KVDEX_ENOMEM;
  w->ip = ip;
  w->cap_rows = cap;
  return 0;
}

static inline int cand_heavier(cand a, cand b) {
  return a.w > b.w || (a.w == b.w && a.id < b.id);
}

static int cand_order(const void *a, const void *b) { /* heaviest first */
  cand x = *(const cand *)a, y = *(const cand *)b;
  return cand_heavier(x, y) ? -1 : cand_heavier(y, x);
}

/* Moves the k heaviest of c[0, n) to c[0, k) (any order). */
static void select_heaviest(cand *c, size_t n, size_t k) {
  size_t lo = 0, hi = n;
  if (k >= n) return;
  while (hi - lo > 1) {
    size_t mid = lo + (hi - lo) / 2;
    cand piv = c[mid];
    c[mid] = c[hi - 1];
    c[hi - 1] = piv;
    size_t st = lo;
    for (size_t i = lo; i + 1 < hi; i++)
      if (cand_heavier(c[i], piv)) {
        cand t = c[i];
        c[i] = c[st];
        c[st] = t;
        st++;
      }
    c[hi - 1] = c[st];
    c[st] = piv;
    if (st == k || st + 1 == k) return;
    if (k < st) hi = st;
    else lo = st + 1;
  }
}

/* c[i].w := x . c[i] for i < nc (NaN as -inf). */
static void ip_to(build *B, worker *w, uint32_t x, cand *c, size_t nc) {
  const kvdex_kv_view *v = B->keys;
  size_t rb = row_bytes(v);
  assert(w->cap_rows >= 256); /* worker_rows at setup: max(R, 256) */
  kvdex__view_row_f32(v, x, w->xf);
  for (size_t i0 = 0; i0 < nc; i0 += 256) {
    size_t m = nc - i0 < 256 ? nc - i0 : 256;
    for (size_t i = 0; i < m; i++)
      memcpy((char *)w->rows + i * rb, kvdex__view_row(v, c[i0 + i].id), rb);
    kvdex_score_keys(KVDEX_SIMD_AUTO, v->dtype, w->rows, m, B->d, w->xf, 1, w->ip);
    for (size_t i = 0; i < m; i++) c[i0 + i].w = w->ip[i] == w->ip[i] ? w->ip[i] : -INFINITY;
  }
}

/* Inner-product diversity pruning. Candidates c[0, nc) (distinct) are taken in the
 * order given for c[0, nfixed) and by x . c (best first) after that; c is kept
 * unless an already kept neighbour y covers it: y . c > x . c + (alpha - 1)|x . c|,
 * i.e. seen from c as a query, y scores higher than x (with slack alpha), so a
 * search heading for c's direction does as well through y. At most R are kept, in
 * order, into out. x itself is skipped. c[i].w is overwritten. */
static void prune(build *B, worker *w, uint32_t x, cand *c, size_t nc, size_t nfixed,
                  uint32_t *out, uint32_t *n_out) {
  const kvdex_kv_view *v = B->keys;
  size_t rb = row_bytes(v);
  uint32_t R = B->R, nk = 0;
  float slack = B->alpha - 1.0f;
  assert(w->cap_rows >= R); /* w->ip holds a score per kept row */
  ip_to(B, w, x, c, nc);
  if (nfixed < nc) qsort(c + nfixed, nc - nfixed, sizeof *c, cand_order);
  for (size_t i = 0; i < nc && nk < R; i++) {
    uint32_t y = c[i].id;
    if (y == x) continue;
    float bar = c[i].w + slack * fabsf(c[i].w);
    int covered = 0;
    if (nk) {
      kvdex__view_row_f32(v, y, w->cf);
      kvdex_score_keys(KVDEX_SIMD_AUTO, v->dtype, w->kept, nk, B->d, w->cf, 1, w->ip);
      for (uint32_t j = 0; j < nk && !covered; j++) covered = w->ip[j] > bar;
    }
    if (covered) continue;
    memcpy((char *)w->kept + (size_t)nk * rb, kvdex__view_row(v, y), rb);
    out[nk++] = y;
  }
  *n_out = nk;
}

#define PAR_CHUNK 256 /* keys per task in the per-key phases */

static void run_chunks(kvdex_pool *pool, uint64_t n, kvdex_task_fn fn, build *B) {
  kvdex_pool_run(pool, (size_t)((n + PAR_CHUNK - 1) / PAR_CHUNK), fn, B);
}

static inline void set_err(build *B, int rc) {
  int none = 0;
  atomic_compare_exchange_strong(&B->err, &none, rc); /* the first failure wins */
}

/* ---- phase 1: exact top-K of the prefill queries ------------------------------------- */

#define GT_QC 32  /* queries per task */
#define GT_KT 256 /* key rows per kernel call */

typedef struct gt_job {
  build *B;
  float *sbuf;     /* [workers][GT_QC * GT_KT] */
  kvdex_hit *heap; /* [workers][GT_QC * K] */
} gt_job;

static void gt_task(void *ctx, size_t t, unsigned wi) {
  gt_job *J = ctx;
  build *B = J->B;
  const kvdex_kv_view *v = B->keys;
  uint32_t K = B->K, d = B->d;
  uint64_t q0 = (uint64_t)t * GT_QC;
  size_t g = B->m - q0 < GT_QC ? (size_t)(B->m - q0) : GT_QC;
  float *s = J->sbuf + (size_t)wi * GT_QC * GT_KT;
  kvdex_hit *H = J->heap + (size_t)wi * GT_QC * K;
  kvdex__topk top[GT_QC];
  for (size_t j = 0; j < g; j++) kvdex__topk_init(&top[j], H + j * K, K);
  size_t rb = row_bytes(v);
  for (uint64_t i0 = 0; i0 < B->n;) {
    uint64_t b = i0 / v->block_tokens, off = i0 % v->block_tokens;
    size_t nt = GT_KT;
    if (nt > v->block_tokens - off) nt = (size_t)(v->block_tokens - off);
    if (nt > B->n - i0) nt = (size_t)(B->n - i0);
    const char *base = (const char *)v->k_blocks[b] + off * rb;
    kvdex_score_keys(KVDEX_SIMD_AUTO, v->dtype, base, nt, d, B->tq + q0 * d, g, s);
    for (size_t j = 0; j < g; j++) kvdex__topk_push_run(&top[j], i0, s + j * nt, nt);
    i0 += nt;
  }
  for (size_t j = 0; j < g; j++) {
    uint32_t n = kvdex__topk_finish(&top[j]);
    uint32_t *row = B->gt + (q0 + j) * K;
    for (uint32_t r = 0; r < n; r++) row[r] = (uint32_t)top[j].h[r].id;
    B->gt_n[q0 + j] = n;
  }
}

/* ---- phase 2: projection --------------------------------------------------------------- */

static void proj_task(void *ctx, size_t t, unsigned wi) {
  build *B = ctx;
  worker *w = &B->wk[wi];
  graph *g = B->g;
  uint64_t a = t * PAR_CHUNK, b = a + PAR_CHUNK < B->n ? a + PAR_CHUNK : B->n;
  for (uint64_t x = a; x < b; x++) {
    g->deg[x] = 0;
    size_t nt = 0;
    /* weight of y = number of queries that have both x and y among their top-K */
    for (uint64_t e = B->inv_off[x]; e < B->inv_off[x + 1]; e++) {
      uint32_t q = B->inv[e];
      const uint32_t *ans = B->gt + (size_t)q * B->K;
      for (uint32_t r = 0; r < B->gt_n[q]; r++) {
        uint32_t y = ans[r];
        if (y == x) continue;
        if (w->w[y] == 0) w->touch[nt++] = y;
        w->w[y] += 1.0f;
      }
    }
    if (!nt) continue;
    for (size_t i = 0; i < nt; i++) {
      w->cands[i] = (cand){w->w[w->touch[i]], w->touch[i]};
      w->w[w->touch[i]] = 0;
    }
    size_t nc = nt < B->cand_cap ? nt : B->cand_cap;
    select_heaviest(w->cands, nt, nc);
    qsort(w->cands, nc, sizeof *w->cands, cand_order);
    prune(B, w, (uint32_t)x, w->cands, nc, nc, g->adj + x * g->R, &g->deg[x]);
  }
}

/* ---- phase 3: reverse edges ------------------------------------------------------------- */

static void rev_task(void *ctx, size_t t, unsigned wi) {
  build *B = ctx;
  worker *w = &B->wk[wi];
  graph *g = B->g;
  uint64_t a = t * PAR_CHUNK, b = a + PAR_CHUNK < B->n ? a + PAR_CHUNK : B->n;
  for (uint64_t y = a; y < b; y++) {
    uint32_t *nb = g->adj + y * g->R;
    uint32_t own = g->deg[y];
    size_t nc = 0;
    /* y's own edges and the keys linking to y; w->w flags members (reset below) */
    for (uint32_t j = 0; j < own; j++) {
      w->cands[nc++] = (cand){0, nb[j]};
      w->w[nb[j]] = 1;
    }
    for (uint64_t e = B->rev_off[y]; e < B->rev_off[y + 1]; e++) {
      uint32_t x = B->rev[e];
      if (w->w[x] != 0 || x == y) continue;
      w->w[x] = 1;
      w->cands[nc++] = (cand){0, x};
    }
    for (size_t i = 0; i < nc; i++) w->w[w->cands[i].id] = 0;
    if (nc <= g->R) {
      for (size_t i = own; i < nc; i++) nb[i] = w->cands[i].id;
      g->deg[y] = (uint32_t)nc;
      continue;
    }
    /* all re-pruned together, best inner product with y first; hubs (many keys link
     * to them) only keep their best 4 * cand candidates */
    size_t cap = 4 * B->cand_cap;
    if (nc > cap) {
      ip_to(B, w, (uint32_t)y, w->cands, nc);
      select_heaviest(w->cands, nc, cap);
      nc = cap;
    }
    prune(B, w, (uint32_t)y, w->cands, nc, 0, nb, &g->deg[y]);
  }
}

/* ---- phase 4: repair ---------------------------------------------------------------------- */

static uint64_t bfs(const graph *g, uint8_t *reached, uint32_t *queue, uint8_t *has_child) {
  memset(reached, 0, (size_t)g->n);
  if (has_child) memset(has_child, 0, (size_t)g->n);
  uint64_t head = 0, tail = 0;
  for (uint32_t e = 0; e < g->n_entry; e++)
    if (!reached[g->entry[e]]) {
      reached[g->entry[e]] = 1;
      queue[tail++] = g->entry[e];
    }
  while (head < tail) {
    uint32_t u = queue[head++];
    const uint32_t *nb = g->adj + (size_t)u * g->R;
    for (uint32_t j = 0; j < g->deg[u]; j++)
      if (!reached[nb[j]]) {
        reached[nb[j]] = 1;
        queue[tail++] = nb[j];
        if (has_child) has_child[u] = 1;
      }
  }
  return tail;
}

/* Marks everything reachable from u (already reached itself) that is not yet. */
static void bfs_from(const graph *g, uint32_t u, uint8_t *reached, uint32_t *queue) {
  uint64_t head = 0, tail = 0;
  queue[tail++] = u;
  while (head < tail) {
    uint32_t x = queue[head++];
    const uint32_t *nb = g->adj + (size_t)x * g->R;
    for (uint32_t j = 0; j < g->deg[x]; j++)
      if (!reached[nb[j]]) {
        reached[nb[j]] = 1;
        queue[tail++] = nb[j];
      }
  }
}

static void repair_task(void *ctx, size_t t, unsigned wi) {
  build *B = ctx;
  worker *w = &B->wk[wi];
  const graph *g = B->g;
  uint32_t u = B->batch[t], R = g->R;
  if (atomic_load(&B->err)) return;
  size_t L = B->p->efc > R ? B->p->efc : R;
  int rc = beam_prepare(w->s, g, B->keys, L);
  if (rc) {
    set_err(B, rc);
    return;
  }
  kvdex__view_row_f32(B->keys, u, w->xf);
  size_t n = 0;
  uint64_t touched = 0;
  beam_run(g, B->keys, w->xf, L, L, w->s, &n, &touched);
  const beam_ent *beam = (const beam_ent *)(const void *)w->s->h;
  size_t nc = 0;
  for (size_t i = 0; i < n; i++)
    if (beam[i].id != u) w->cands[nc++] = (cand){0, beam[i].id};
  uint32_t na = 0;
  for (size_t i = 0; i < nc && na < R; i++) B->alt[t * R + na++] = w->cands[i].id;
  B->altn[t] = na;
  prune(B, w, u, w->cands, nc, nc, B->outl + t * R, &B->outn[t]);
}

static int has_edge(const graph *g, uint32_t x, uint32_t y) {
  const uint32_t *nb = g->adj + (size_t)x * g->R;
  for (uint32_t j = 0; j < g->deg[x]; j++)
    if (nb[j] == y) return 1;
  return 0;
}

static void add_edge(graph *g, uint32_t x, uint32_t y) {
  g->adj[(size_t)x * g->R + g->deg[x]++] = y;
}

/* Edges into u from the found keys l1 then l2: up to `want` from keys
 * with room; when fewer than `least` got in that way, more by replacing, in a full
 * list, the neighbour with the most in-edges (at least 2, so it keeps one).
 * indeg is kept up to date. Returns how many edges now lead to u. */
static uint32_t link_in(graph *g, uint32_t *indeg, uint32_t u,
                        const uint32_t *l1, uint32_t n1, const uint32_t *l2, uint32_t n2,
                        uint32_t want, uint32_t least) {
  uint32_t added = 0;
  for (int replace = 0; replace < 2; replace++) {
    for (int pass = 0; pass < 2; pass++) {
      const uint32_t *l = pass ? l2 : l1;
      uint32_t nl = pass ? n2 : n1;
      for (uint32_t i = 0; i < nl && added < (replace ? least : want); i++) {
        uint32_t y = l[i];
        if (y == u || has_edge(g, y, u)) continue;
        uint32_t *nb = g->adj + (size_t)y * g->R;
        if (g->deg[y] < g->R) {
          if (replace) continue;
          nb[g->deg[y]++] = u;
        } else {
          if (!replace) continue;
          uint32_t best = g->R;
          for (uint32_t j = 0; j < g->R; j++)
            if (indeg[nb[j]] >= 2 && (best == g->R || indeg[nb[j]] > indeg[nb[best]])) best = j;
          if (best == g->R) continue;
          indeg[nb[best]]--;
          nb[best] = u;
        }
        indeg[u]++;
        added++;
      }
    }
    if (added >= least) break;
  }
  return added;
}

static uint64_t gcd(uint64_t a, uint64_t b) {
  while (b) {
    uint64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

static int repair(build *B, kvdex_pool *pool, uint8_t *reached, uint32_t *queue) {
  graph *g = B->g;
  uint32_t R = g->R;
  uint64_t n = g->n;
  uint64_t n_reached = bfs(g, reached, queue, NULL);
  if (n_reached == n) return 0;
  /* the unreached keys, in a fixed scattered order: keys of one region of the
   * context (often alike) fall into different rounds, so later ones find earlier ones */
  size_t n_todo = (size_t)(n - n_reached), k = 0;
  uint32_t *todo = malloc(n_todo * sizeof *todo);
  if (!todo) return KVDEX_ENOMEM;
  for (uint64_t i = 0; i < n; i++)
    if (!reached[i]) todo[k++] = (uint32_t)i;
  uint64_t step = 2654435761u % n_todo;
  while (gcd(step, n_todo) != 1) step++;
  for (size_t i = 0, j = 0; i < n_todo; i++, j = (j + step) % n_todo) queue[i] = todo[j];
  memcpy(todo, queue, n_todo * sizeof *todo);

  size_t max_batch = n_todo / 16;
  if (max_batch < 256) max_batch = 256;
  if (max_batch > 8192) max_batch = 8192;
  B->outl = malloc(max_batch * R * sizeof(uint32_t));
  B->alt = malloc(max_batch * R * sizeof(uint32_t));
  B->outn = malloc(max_batch * sizeof(uint32_t));
  B->altn = malloc(max_batch * sizeof(uint32_t));
  uint32_t *indeg = calloc((size_t)n, sizeof *indeg);
  int rc = 0;
  if (!B->outl || !B->alt || !B->outn || !B->altn || !indeg) rc = KVDEX_ENOMEM;
  for (uint64_t x = 0; !rc && x < n; x++)
    for (uint32_t j = 0; j < g->deg[x]; j++) indeg[g->adj[x * R + j]]++;
  for (unsigned i = 0; !rc && i < B->n_workers; i++)
    rc = beam_prepare(B->wk[i].s, g, B->keys, B->p->efc > R ? B->p->efc : R);
  uint32_t want = R / 4 ? R / 4 : 1, least = want < 2 ? want : 2;
  /* Rounds: searches in parallel on the graph as it is, then the edges, in order.
   * A key found by a search is reachable (the beam only walks from the entries), so
   * edges from it make the new key reachable too. */
  for (size_t pos = 0; !rc && pos < n_todo;) {
    size_t nb = n_todo - pos < max_batch ? n_todo - pos : max_batch;
    B->batch = todo + pos;
    kvdex_pool_run(pool, nb, repair_task, B);
    if ((rc = atomic_load(&B->err))) break;
    for (size_t t = 0; t < nb; t++) {
      uint32_t u = todo[pos + t];
      const uint32_t *out = B->outl + t * R;
      for (uint32_t i = 0; i < B->outn[t] && g->deg[u] < R; i++)
        if (!has_edge(g, u, out[i])) {
          add_edge(g, u, out[i]);
          indeg[out[i]]++;
        }
      link_in(g, indeg, u, out, B->outn[t], B->alt + t * R, B->altn[t], want, least);
    }
    pos += nb;
  }
  free(todo);
  free(indeg);
  free(B->outl);
  free(B->alt);
  free(B->outn);
  free(B->altn);
  B->outl = B->alt = B->outn = B->altn = NULL;
  return rc;
}

/* Last pass: whatever is still unreached gets one edge in from a reached key with
 * room, or else replaces an edge of a BFS-tree leaf (whose edges no reached key
 * depends on). Serial; only stragglers get here. */
static int link_stragglers(build *B, uint8_t *reached, uint32_t *queue) {
  graph *g = B->g;
  uint64_t n = g->n;
  uint8_t *has_child = malloc((size_t)n);
  if (!has_child) return KVDEX_ENOMEM;
  for (;;) {
    uint64_t n_reached = bfs(g, reached, queue, has_child);
    if (n_reached == n) break;
    uint64_t room = 0; /* cursor over keys with room: they only fill up */
    for (uint64_t u = 0; u < n; u++) {
      if (reached[u]) continue;
      while (room < n && (!reached[room] || g->deg[room] >= g->R)) room++;
      if (room == n) {
        /* every reached key is full: a leaf of a fresh BFS tree gives its last edge
         * to u (no reached key depends on that edge); then start over */
        bfs(g, reached, queue, has_child);
        if (reached[u]) break;
        for (uint64_t i = n; i-- > 0;)
          if (reached[i] && !has_child[i] && g->deg[i]) {
            g->adj[i * g->R + g->deg[i] - 1] = (uint32_t)u;
            break;
          }
        break;
      }
      add_edge(g, (uint32_t)room, (uint32_t)u);
      reached[u] = 1;
      bfs_from(g, (uint32_t)u, reached, queue);
    }
  }
  free(has_child);
  return 0;
}

/* ---- phase 4a: entry keys ----------------------------------------------------------------- */

static int pick_entries(build *B) {
  graph *g = B->g;
  uint64_t n = g->n;
  uint32_t E = B->p->entries < n ? B->p->entries : (uint32_t)n;
  g->entry = malloc(E * sizeof *g->entry);
  if (!g->entry) return KVDEX_ENOMEM;
  uint32_t ne = 0;
  /* half: the keys answering the most queries */
  uint32_t half = (E + 1) / 2;
  uint32_t *best = g->entry;
  for (uint64_t x = 0; x < n; x++) {
    uint64_t c = B->inv_off[x + 1] - B->inv_off[x];
    if (!c) continue;
    /* insertion into the short list best[0, ne) by count desc */
    if (ne == half && c <= B->inv_off[best[ne - 1] + 1] - B->inv_off[best[ne - 1]]) continue;
    uint32_t i = ne < half ? ne++ : ne - 1;
    while (i > 0 && B->inv_off[best[i - 1] + 1] - B->inv_off[best[i - 1]] < c) {
      best[i] = best[i - 1];
      i--;
    }
    best[i] = (uint32_t)x;
  }
  /* the rest spread over the context: the most answered key of each span */
  uint32_t spread = E - ne;
  for (uint32_t s = 0; s < spread; s++) {
    uint64_t a = n * s / spread, b = n * (s + 1) / spread, pick = a;
    uint64_t pc = 0;
    for (uint64_t x = a; x < b; x++) {
      uint64_t c = B->inv_off[x + 1] - B->inv_off[x];
      if (c > pc) {
        pc = c;
        pick = x;
      }
    }
    int dup = 0;
    for (uint32_t i = 0; i < ne; i++) dup |= g->entry[i] == pick;
    if (!dup) g->entry[ne++] = (uint32_t)pick;
  }
  g->n_entry = ne;
  return 0;
}

/* ---- build ------------------------------------------------------------------------------ */

static void free_workers(build *B) {
  if (!B->wk) return;
  for (unsigned i = 0; i < B->n_workers; i++) {
    worker *w = &B->wk[i];
    free(w->xf);
    free(w->cf);
    free(w->rows);
    free(w->kept);
    free(w->ip);
    free(w->w);
    free(w->touch);
    free(w->cands);
    kvdex_index_scratch_destroy(w->s);
  }
  free(B->wk);
  B->wk = NULL;
}

static int alloc_workers(build *B) {
  B->wk = calloc(B->n_workers, sizeof *B->wk);
  if (!B->wk) return KVDEX_ENOMEM;
  size_t rb = row_bytes(B->keys);
  for (unsigned i = 0; i < B->n_workers; i++) {
    worker *w = &B->wk[i];
    w->xf = malloc(B->d * sizeof(float));
    w->cf = malloc(B->d * sizeof(float));
    w->kept = malloc((size_t)B->R * rb);
    w->w = calloc((size_t)B->n, sizeof(float));
    w->touch = malloc((size_t)B->n * sizeof(uint32_t));
    w->cands = malloc((size_t)B->n * sizeof(cand));
    if (!w->xf || !w->cf || !w->kept || !w->w || !w->touch || !w->cands ||
        worker_rows(w, B->R > 256 ? B->R : 256, rb) || kvdex_index_scratch_create(&w->s))
      return KVDEX_ENOMEM;
  }
  return 0;
}

/* Pseudo-queries for the key-only fallback: every stride-th key, centred. */
static float *key_queries(const kvdex_kv_view *v, uint64_t n, uint32_t d, uint64_t *m_out) {
  uint64_t m = n < 16384 ? n : 16384;
  float *q = malloc((size_t)m * d * sizeof(float));
  double *mean = calloc(d, sizeof(double));
  float *row = malloc(d * sizeof(float));
  if (!q || !mean || !row) {
    free(q);
    free(mean);
    free(row);
    return NULL;
  }
  for (uint64_t i = 0; i < n; i++) {
    kvdex__view_row_f32(v, i, row);
    for (uint32_t j = 0; j < d; j++) mean[j] += row[j];
  }
  for (uint64_t i = 0; i < m; i++) {
    float *qi = q + i * d;
    kvdex__view_row_f32(v, i * n / m, qi);
    for (uint32_t j = 0; j < d; j++) qi[j] -= (float)(mean[j] / (double)n);
  }
  free(mean);
  free(row);
  *m_out = m;
  return q;
}

static int check_input(const kvdex_index_input *in) {
  if (!in || !in->keys) return kvdex__seterr(KVDEX_EINVAL, "graph: build: no keys");
  const kvdex_kv_view *v = in->keys;
  if (!v->n_tokens) return kvdex__seterr(KVDEX_EINVAL, "graph: build: no keys (0 tokens)");
  if (v->n_tokens > 0xfffffffeull)
    return kvdex__seterr(KVDEX_EINVAL, "graph: build: %llu tokens is over the 2^32-2 limit",
                         (unsigned long long)v->n_tokens);
  if (!v->head_dim || v->head_dim > KVDEX_MAX_HEAD_DIM || !kvdex_dtype_size(v->dtype) ||
      !v->block_tokens || !v->k_blocks)
    return kvdex__seterr(KVDEX_EINVAL, "graph: build: bad key view (dim %u, dtype %d, block %u)",
                         v->head_dim, v->dtype, v->block_tokens);
  if (in->n_train && !in->train_q)
    return kvdex__seterr(KVDEX_EINVAL, "graph: build: n_train=%llu without train_q",
                         (unsigned long long)in->n_train);
  for (uint64_t i = 0; i < in->n_train; i++)
    if (!query_finite(in->train_q + i * v->head_dim, v->head_dim))
      return kvdex__seterr(KVDEX_EINVAL, "graph: build: prefill query %llu is not finite",
                           (unsigned long long)i);
  return 0;
}

/* Moves the prefill queries' answer lists and the key -> query lists into g, with
 * the queries as f16 unit vectors, for the search's expansion step. */
static int keep_queries(build *B, graph *g) {
  if (B->m > 0xffffffffull) return 0; /* not kept: expansion off */
  g->qv = malloc((size_t)B->m * B->d * sizeof(uint16_t) + 1);
  if (!g->qv) return KVDEX_ENOMEM;
  for (uint64_t i = 0; i < B->m; i++) {
    const float *x = B->tq + i * B->d;
    double nn = 0;
    for (uint32_t j = 0; j < B->d; j++) nn += (double)x[j] * x[j];
    float inv = nn > 0 ? (float)(1.0 / sqrt(nn)) : 0.0f;
    for (uint32_t j = 0; j < B->d; j++) g->qv[i * B->d + j] = kvdex__f32_to_f16(x[j] * inv);
  }
  g->m = (uint32_t)B->m;
  g->K = B->K;
  g->ans = B->gt;
  g->ans_n = B->gt_n;
  g->inv_off = B->inv_off;
  g->inv = B->inv;
  B->gt = NULL;
  B->gt_n = NULL;
  B->inv_off = NULL;
  B->inv = NULL;
  return 0;
}

/* Key -> the queries whose answer lists hold it, as CSR (B->inv_off, B->inv), from
 * phase 1's lists. rcount: n + 1 zeroed counters (scratch). KVDEX_ENOMEM or 0. */
static int answered_by(build *B, uint32_t *rcount) {
  for (uint64_t q = 0; q < B->m; q++)
    for (uint32_t r = 0; r < B->gt_n[q]; r++) B->inv_off[B->gt[q * B->K + r] + 1]++;
  for (uint64_t x = 0; x < B->n; x++) B->inv_off[x + 1] += B->inv_off[x];
  B->inv = malloc((size_t)(B->inv_off[B->n] ? B->inv_off[B->n] : 1) * sizeof(uint32_t));
  if (!B->inv) return KVDEX_ENOMEM;
  for (uint64_t q = 0; q < B->m; q++)
    for (uint32_t r = 0; r < B->gt_n[q]; r++) {
      uint32_t x = B->gt[q * B->K + r];
      B->inv[B->inv_off[x] + rcount[x]++] = (uint32_t)q;
    }
  return 0;
}

/* The in-edges of the projected graph as CSR (B->rev_off, B->rev) for phase 3.
 * rcount: n + 1 counters (scratch, cleared here). KVDEX_ENOMEM or 0. */
static int in_edges(build *B, uint32_t *rcount) {
  const graph *g = B->g;
  B->rev_off = calloc((size_t)B->n + 1, sizeof(uint64_t));
  if (!B->rev_off) return KVDEX_ENOMEM;
  for (uint64_t x = 0; x < B->n; x++)
    for (uint32_t j = 0; j < g->deg[x]; j++) B->rev_off[g->adj[x * B->R + j] + 1]++;
  for (uint64_t x = 0; x < B->n; x++) B->rev_off[x + 1] += B->rev_off[x];
  B->rev = malloc((size_t)(B->rev_off[B->n] ? B->rev_off[B->n] : 1) * sizeof(uint32_t));
  if (!B->rev) return KVDEX_ENOMEM;
  memset(rcount, 0, ((size_t)B->n + 1) * sizeof(uint32_t));
  for (uint64_t x = 0; x < B->n; x++)
    for (uint32_t j = 0; j < g->deg[x]; j++) {
      uint32_t y = g->adj[x * B->R + j];
      B->rev[B->rev_off[y] + rcount[y]++] = (uint32_t)x;
    }
  return 0;
}

static int g_build(kvdex_index *ix, const kvdex_index_input *in, kvdex_pool *pool) {
  graph_impl *im = ix->impl;
  int rc = check_input(in);
  if (rc) return rc;
  const kvdex_kv_view *v = in->keys;
  build B;
  memset(&B, 0, sizeof B);
  atomic_init(&B.err, 0);
  graph g;
  memset(&g, 0, sizeof g);
  uint8_t *reached = NULL;
  uint32_t *queue = NULL, *rcount = NULL;
  float *own_q = NULL, *sub_q = NULL;
  gt_job J = {&B, NULL, NULL};
  char note[sizeof ix->note] = "";

  B.keys = v;
  B.n = v->n_tokens;
  B.d = v->head_dim;
  B.R = im->p.degree;
  B.K = im->p.K < B.n ? im->p.K : (uint32_t)B.n;
  B.alpha = im->p.alpha;
  B.cand_cap = im->p.cand;
  B.p = &im->p;
  B.g = &g;
  B.n_workers = pool ? kvdex_pool_size(pool) + 1 : 1;
  g.n = B.n;
  g.R = B.R;

  /* the queries: the caller's (subsampled to `train`), or keys standing in */
  B.m = in->n_train;
  B.tq = in->train_q;
  if (!B.m) {
    own_q = key_queries(v, B.n, B.d, &B.m);
    if (!own_q) goto nomem;
    B.tq = own_q;
    snprintf(note, sizeof note, "key-only kNN: no prefill queries");
  } else if (im->p.train && B.m > im->p.train) {
    uint64_t m = im->p.train;
    sub_q = malloc((size_t)m * B.d * sizeof(float));
    if (!sub_q) goto nomem;
    for (uint64_t i = 0; i < m; i++)
      memcpy(sub_q + i * B.d, in->train_q + (i * B.m / m) * B.d, B.d * sizeof(float));
    B.tq = sub_q;
    B.m = m;
  }

  g.adj = malloc((size_t)B.n * B.R * sizeof(uint32_t));
  g.deg = calloc((size_t)B.n, sizeof(uint32_t));
  B.gt = malloc((size_t)B.m * B.K * sizeof(uint32_t));
  B.gt_n = malloc((size_t)B.m * sizeof(uint32_t));
  B.inv_off = calloc((size_t)B.n + 1, sizeof(uint64_t));
  J.sbuf = malloc((size_t)B.n_workers * GT_QC * GT_KT * sizeof(float));
  J.heap = malloc((size_t)B.n_workers * GT_QC * B.K * sizeof(kvdex_hit));
  if (!g.adj || !g.deg || !B.gt || !B.gt_n || !B.inv_off || !J.sbuf || !J.heap ||
      alloc_workers(&B))
    goto nomem;

  kvdex_pool_run(pool, (size_t)((B.m + GT_QC - 1) / GT_QC), gt_task, &J);
  free(J.sbuf);
  free(J.heap);
  J.sbuf = NULL;
  J.heap = NULL;

  rcount = calloc((size_t)B.n + 1, sizeof(uint32_t));
  if (!rcount || answered_by(&B, rcount)) goto nomem;
  run_chunks(pool, B.n, proj_task, &B);
  if (atomic_load(&B.err)) goto fail;
  if (in_edges(&B, rcount)) goto nomem;
  run_chunks(pool, B.n, rev_task, &B);
  if (atomic_load(&B.err)) goto fail;
  free(B.rev);
  free(B.rev_off);
  B.rev = NULL;
  B.rev_off = NULL;

  if ((rc = pick_entries(&B))) goto fail;
  reached = malloc((size_t)B.n);
  queue = malloc((size_t)B.n * sizeof(uint32_t));
  if (!reached || !queue) goto nomem;
  if (im->p.repair) {
    if ((rc = repair(&B, pool, reached, queue))) goto fail;
    if ((rc = link_stragglers(&B, reached, queue))) goto fail;
  } else {
    uint64_t r = bfs(&g, reached, queue, NULL);
    size_t l = strlen(note);
    snprintf(note + l, sizeof note - l, "%srepair=0: %llu of %llu keys unreachable", l ? "; " : "",
             (unsigned long long)(B.n - r), (unsigned long long)B.n);
  }

  if (!own_q && (rc = keep_queries(&B, &g))) goto fail;
  graph_clear(&im->g); /* success: the new graph replaces the old one */
  im->g = g;
  memset(&g, 0, sizeof g);
  ix->n_built = B.n;
  ix->dim = B.d;
  ix->dtype = v->dtype;
  memcpy(ix->note, note, sizeof note);
  goto done;

nomem:
  rc = KVDEX_ENOMEM;
fail:
  if (atomic_load(&B.err)) rc = atomic_load(&B.err);
done:
  free_workers(&B);
  free(reached);
  free(queue);
  free(rcount);
  free(own_q);
  free(sub_q);
  free(B.gt);
  free(B.gt_n);
  free(B.inv_off);
  free(B.inv);
  free(B.rev);
  free(B.rev_off);
  free(B.outl);
  free(B.alt);
  free(B.outn);
  free(B.altn);
  free(J.sbuf);
  free(J.heap);
  graph_clear(&g);
  if (rc == KVDEX_ENOMEM)
    return kvdex__seterr(KVDEX_ENOMEM, "graph: build: out of memory for %llu keys",
                         (unsigned long long)B.n);
  if (rc) return kvdex__seterr(rc, "graph: build failed (%s)", kvdex_errname(rc));
  return 0;
}

/* ---- serialisation ---------------------------------------------------------------------- */

#define GRAPH_FORMAT 2

static int g_save(const kvdex_index *ix, kvdex__buf *out) {
  const graph *g = &((const graph_impl *)ix->impl)->g;
  if (!ix->n_built || !g->n) return kvdex__seterr(KVDEX_EINVAL, "graph: serialise before build");
  uint32_t hdr[5] = {GRAPH_FORMAT, g->R, g->n_entry, ix->dim, (uint32_t)ix->dtype};
  uint64_t n = g->n;
  int rc;
  if ((rc = kvdex__buf_put(out, hdr, sizeof hdr)) || (rc = kvdex__buf_put(out, &n, sizeof n)) ||
      (rc = kvdex__buf_put(out, g->entry, g->n_entry * sizeof(uint32_t))) ||
      (rc = kvdex__buf_put(out, g->deg, (size_t)n * sizeof(uint32_t))))
    return rc;
  for (uint64_t x = 0; x < n; x++)
    if ((rc = kvdex__buf_put(out, g->adj + x * g->R, g->deg[x] * sizeof(uint32_t)))) return rc;
  /* the prefill queries of the expansion step (m == 0: none) */
  uint32_t qh[2] = {g->m, g->K};
  if ((rc = kvdex__buf_put(out, qh, sizeof qh))) return rc;
  if (!g->m) return 0;
  if ((rc = kvdex__buf_put(out, g->qv, (size_t)g->m * ix->dim * sizeof(uint16_t))) ||
      (rc = kvdex__buf_put(out, g->ans_n, (size_t)g->m * sizeof(uint32_t))))
    return rc;
  for (uint32_t i = 0; i < g->m; i++)
    if ((rc = kvdex__buf_put(out, g->ans + (size_t)i * g->K, g->ans_n[i] * sizeof(uint32_t))))
      return rc;
  return 0; /* the key -> query lists are rebuilt from the answers on load */
}

/* Reads the expansion step's queries into g (g->n, g->adj read already); the key ->
 * query lists are derived from the answer lists. */
static int load_queries(kvdex__rd *in, graph *g, uint32_t dim) {
  uint32_t qh[2];
  int rc = kvdex__rd_get(in, qh, sizeof qh);
  if (rc) return rc;
  if (!qh[0]) return 0;
  uint32_t m = qh[0], K = qh[1];
  if (!K || K > 1024 || in->left / ((size_t)dim * sizeof(uint16_t) + sizeof(uint32_t)) < m)
    return KVDEX_EINVAL;
  g->m = m;
  g->K = K;
  g->qv = malloc((size_t)m * dim * sizeof(uint16_t));
  g->ans_n = malloc((size_t)m * sizeof(uint32_t));
  g->ans = malloc((size_t)m * K * sizeof(uint32_t));
  g->inv_off = calloc((size_t)g->n + 1, sizeof(uint64_t));
  if (!g->qv || !g->ans_n || !g->ans || !g->inv_off) return KVDEX_ENOMEM;
  if ((rc = kvdex__rd_get(in, g->qv, (size_t)m * dim * sizeof(uint16_t))) ||
      (rc = kvdex__rd_get(in, g->ans_n, (size_t)m * sizeof(uint32_t))))
    return rc;
  for (uint32_t i = 0; i < m; i++) {
    if (g->ans_n[i] > K) return KVDEX_EINVAL;
    uint32_t *a = g->ans + (size_t)i * K;
    if ((rc = kvdex__rd_get(in, a, g->ans_n[i] * sizeof(uint32_t)))) return rc;
    for (uint32_t r = 0; r < g->ans_n[i]; r++) {
      if (a[r] >= g->n) return KVDEX_EINVAL;
      g->inv_off[a[r] + 1]++;
    }
  }
  for (uint64_t x = 0; x < g->n; x++) g->inv_off[x + 1] += g->inv_off[x];
  g->inv = malloc((size_t)(g->inv_off[g->n] ? g->inv_off[g->n] : 1) * sizeof(uint32_t));
  uint64_t *fill = calloc((size_t)g->n, sizeof(uint64_t));
  if (!g->inv || !fill) {
    free(fill);
    return KVDEX_ENOMEM;
  }
  for (uint32_t i = 0; i < m; i++)
    for (uint32_t r = 0; r < g->ans_n[i]; r++) {
      uint32_t x = g->ans[(size_t)i * K + r];
      g->inv[g->inv_off[x] + fill[x]++] = i;
    }
  free(fill);
  return 0;
}

static int g_load(kvdex_index *ix, kvdex__rd *in) {
  graph_impl *im = ix->impl;
  uint32_t hdr[5];
  uint64_t n;
  int rc;
  if ((rc = kvdex__rd_get(in, hdr, sizeof hdr)) || (rc = kvdex__rd_get(in, &n, sizeof n)))
    return rc;
  uint32_t R = hdr[1], ne = hdr[2];
  if (hdr[0] != GRAPH_FORMAT || !R || R > 1024 || !n || n > 0xfffffffeull || !ne || ne > n ||
      ne > 1024 || !hdr[3] || hdr[3] > KVDEX_MAX_HEAD_DIM || !kvdex_dtype_size((int)hdr[4]) ||
      (ix->n_built && ix->n_built != n) || (ix->dim && ix->dim != hdr[3]) ||
      in->left / sizeof(uint32_t) < n + ne)
    return kvdex__seterr(KVDEX_EINVAL, "graph: serialised graph is corrupt (header)");
  graph g;
  memset(&g, 0, sizeof g);
  g.n = n;
  g.R = R;
  g.n_entry = ne;
  g.entry = malloc(ne * sizeof(uint32_t));
  g.deg = malloc((size_t)n * sizeof(uint32_t));
  g.adj = malloc((size_t)n * R * sizeof(uint32_t));
  if (!g.entry || !g.deg || !g.adj) {
    graph_clear(&g);
    return kvdex__seterr(KVDEX_ENOMEM, "graph: out of memory loading %llu keys",
                         (unsigned long long)n);
  }
  if ((rc = kvdex__rd_get(in, g.entry, ne * sizeof(uint32_t))) ||
      (rc = kvdex__rd_get(in, g.deg, (size_t)n * sizeof(uint32_t))))
    goto bad;
  for (uint32_t e = 0; e < ne; e++)
    if (g.entry[e] >= n) goto bad;
  for (uint64_t x = 0; x < n; x++) {
    if (g.deg[x] > R || (rc = kvdex__rd_get(in, g.adj + x * R, g.deg[x] * sizeof(uint32_t))))
      goto bad;
    for (uint32_t j = 0; j < g.deg[x]; j++)
      if (g.adj[x * R + j] >= n) goto bad;
  }
  if ((rc = load_queries(in, &g, hdr[3]))) {
    graph_clear(&g);
    if (rc == KVDEX_ENOMEM)
      return kvdex__seterr(KVDEX_ENOMEM, "graph: out of memory loading the prefill queries");
    return kvdex__seterr(KVDEX_EINVAL, "graph: serialised graph is corrupt (queries)");
  }
  graph_clear(&im->g);
  im->g = g;
  ix->n_built = n;
  ix->dim = hdr[3];
  ix->dtype = (int)hdr[4];
  return 0;
bad:
  graph_clear(&g);
  return kvdex__seterr(KVDEX_EINVAL, "graph: serialised graph is corrupt");
}

const kvdex__index_ops kvdex__graph_ops = {
    .kind = "graph",
    .init = g_init,
    .param = g_param,
    .spec = g_spec,
    .build = g_build,
    .search = g_search,
    .memory = g_memory,
    .save = g_save,
    .load = g_load,
    .free = g_free,
};
