/* faiss: the FAISS peers as index kinds, written against FAISS's official C API:
 *   "ivf"   IVF-Flat, inner product: nlist lists (k-means), nprobe probed per search;
 *   "hnsw"  HNSW over a flat f32 store, inner product: M links, efc at build, ef at search.
 * Keys are converted to f32 and FAISS keeps its own copy (counted in memory).
 * Keys touched are FAISS's distance counters (faiss_shim.h) plus, for ivf, the
 * nlist centroids the coarse quantizer scores. FAISS keeps nprobe/efSearch in
 * the index object and the counters in process globals, so searches of every
 * FAISS index in the process are serialised by one mutex (faiss_mu); a search
 * runs FAISS with one OpenMP thread. Builds run FAISS's OpenMP code with as many
 * threads as the kvdex_pool has plus the caller (pool NULL: one, reproducible).
 */
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <faiss/c_api/AutoTune_c.h>
#include <faiss/c_api/IndexIVF_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/error_c.h>
#include <faiss/c_api/index_factory_c.h>
#include <faiss/c_api/index_io_c.h>

#include "index/ann_int.h"
#include "index/ann_kinds.h"
#include "index/faiss_shim.h"

#define MIN_PER_LIST 39 /* FAISS's k-means warns (on stderr) below 39 points per list */
#define MAX_NLIST (1u << 20)
#define MAX_EF (1u << 20)

/* Serialises FAISS searches (index parameters and global counters) and
 * serialisation (which reads those parameters). */
static pthread_mutex_t faiss_mu = PTHREAD_MUTEX_INITIALIZER;

typedef struct fz {
  int ivf;             /* 1: ivf, 0: hnsw */
  uint32_t nlist_spec; /* ivf: 0 = auto */
  uint32_t nprobe;     /* ivf: default lists probed */
  uint32_t M, efc, ef; /* hnsw */
  uint32_t nlist;      /* ivf: resolved at build */
  FaissIndex *index;
  FaissParameterSpace *ps; /* hnsw: sets efSearch / efConstruction */
  size_t faiss_bytes;      /* FAISS's serialised size: its f32 copy plus structure */
} fz;

static int faiss_err(const char *kind, const char *what, int code) {
  const char *msg = faiss_get_last_error();
  if (!msg) msg = "no message";
  if (code == STD_EXCEPT && strstr(msg, "bad_alloc"))
    return kvdex__seterr(KVDEX_ENOMEM, "%s: FAISS %s: out of memory", kind, what);
  return kvdex__seterr(KVDEX_EINTERNAL, "%s: FAISS %s failed: %s", kind, what, msg);
}

static int fz_init(kvdex_index *ix, int ivf) {
  fz *z = calloc(1, sizeof *z);
  if (!z) return kvdex__seterr(KVDEX_ENOMEM, "%s: out of memory", ivf ? "ivf" : "hnsw");
  z->ivf = ivf;
  z->nprobe = 32;
  z->M = 32;
  z->efc = 80;
  z->ef = 128;
  ix->impl = z;
  return 0;
}
static int ivf_init(kvdex_index *ix) { return fz_init(ix, 1); }
static int hnsw_init(kvdex_index *ix) { return fz_init(ix, 0); }

#define IVF_PARAMS "nlist=<lists, or auto = min(4*sqrt(n), n/39)>, nprobe=<lists probed>"
#define HNSW_PARAMS "M=<links per node>, efc=<build beam>, ef=<search beam>"

static int ivf_param(kvdex_index *ix, const char *name, const char *value) {
  fz *z = ix->impl;
  if (!strcmp(name, "nlist")) {
    if (!strcmp(value, "auto")) {
      z->nlist_spec = 0;
      return 0;
    }
    if (kvdex__parse_u32(value, 1, MAX_NLIST, &z->nlist_spec))
      return kvdex__seterr(KVDEX_EINVAL, "ivf: bad nlist '%.40s' (an integer in 1..%u, or auto)",
                           value, MAX_NLIST);
    return 0;
  }
  if (!strcmp(name, "nprobe")) {
    if (kvdex__parse_u32(value, 1, MAX_NLIST, &z->nprobe))
      return kvdex__seterr(KVDEX_EINVAL, "ivf: bad nprobe '%.40s' (an integer in 1..%u)", value,
                           MAX_NLIST);
    return 0;
  }
  return kvdex__seterr(KVDEX_EINVAL, "ivf: unknown parameter '%.40s' (accepted: " IVF_PARAMS ")",
                       name);
}

static int hnsw_param(kvdex_index *ix, const char *name, const char *value) {
  fz *z = ix->impl;
  uint32_t *dst = !strcmp(name, "M") ? &z->M : !strcmp(name, "efc") ? &z->efc
                  : !strcmp(name, "ef") ? &z->ef : NULL;
  if (!dst)
    return kvdex__seterr(KVDEX_EINVAL,
                         "hnsw: unknown parameter '%.40s' (accepted: " HNSW_PARAMS ")", name);
  uint32_t lo = dst == &z->M ? 2 : 1, hi = dst == &z->M ? 256 : MAX_EF;
  if (kvdex__parse_u32(value, lo, hi, dst))
    return kvdex__seterr(KVDEX_EINVAL, "hnsw: bad %s '%.40s' (an integer in %u..%u)", name, value,
                         lo, hi);
  return 0;
}

static void ivf_spec(const kvdex_index *ix, char *buf, size_t len) {
  const fz *z = ix->impl;
  uint32_t nlist = ix->n_built && z->nlist ? z->nlist : z->nlist_spec;
  if (nlist)
    snprintf(buf, len, "ivf:nlist=%u,nprobe=%u", nlist, z->nprobe);
  else
    snprintf(buf, len, "ivf:nlist=auto,nprobe=%u", z->nprobe);
}

static void hnsw_spec(const kvdex_index *ix, char *buf, size_t len) {
  const fz *z = ix->impl;
  snprintf(buf, len, "hnsw:M=%u,efc=%u,ef=%u", z->M, z->efc, z->ef);
}

/* ---- FILE* over a kvdex__buf (FAISS's C API serialises to a FILE*) -------------- */

typedef struct sink {
  kvdex__buf *buf; /* NULL: only count */
  size_t n;
} sink;

static ssize_t sink_write(void *cookie, const char *p, size_t n) {
  sink *s = cookie;
  if (s->buf && kvdex__buf_put(s->buf, p, n)) return 0; /* 0 = error for stdio */
  s->n += n;
  return (ssize_t)n;
}

/* Writes the FAISS index to out (or only counts its bytes when out is NULL). */
static int write_faiss(const fz *z, const char *kind, kvdex__buf *out, size_t *n) {
  sink s = {out, 0};
  cookie_io_functions_t io = {NULL, sink_write, NULL, NULL};
  FILE *f = fopencookie(&s, "wb", io);
  if (!f) return kvdex__seterr(KVDEX_ENOMEM, "%s: cannot open a memory stream", kind);
  int code = faiss_write_index(z->index, f);
  int closed = fclose(f); /* flushes into the sink */
  if (code) return faiss_err(kind, "write_index", code);
  if (closed) return kvdex__seterr(KVDEX_ENOMEM, "%s: out of memory serialising", kind);
  *n = s.n;
  return 0;
}

/* ---- build ---------------------------------------------------------------------- */

static uint32_t auto_nlist(uint64_t n) {
  double a = 4.0 * sqrt((double)n), b = (double)(n / MIN_PER_LIST);
  double v = a < b ? a : b;
  if (v < 1) v = 1;
  if (v > MAX_NLIST) v = MAX_NLIST;
  return (uint32_t)v;
}

static void fz_release(fz *z) {
  if (z->index) faiss_Index_free(z->index);
  if (z->ps) faiss_ParameterSpace_free(z->ps);
  z->index = NULL;
  z->ps = NULL;
}

static int fz_build(kvdex_index *ix, const kvdex_index_input *in, kvdex_pool *pool) {
  fz *z = ix->impl;
  const char *kind = ix->ops->kind;
  const kvdex_kv_view *keys = in->keys;
  uint64_t n = keys->n_tokens;
  uint32_t d = keys->head_dim, nlist = 0;
  if (n > (uint64_t)INT32_MAX) /* FAISS HNSW stores node ids as int */
    return kvdex__seterr(KVDEX_EINVAL, "%s: %llu tokens, FAISS indexes at most %d", kind,
                         (unsigned long long)n, INT32_MAX);
  char desc[48];
  if (z->ivf) {
    nlist = z->nlist_spec ? z->nlist_spec : auto_nlist(n);
    if ((uint64_t)nlist * MIN_PER_LIST > n)
      return kvdex__seterr(KVDEX_EINVAL,
                           "ivf: nlist=%u needs at least %llu keys (%d per list), have %llu", nlist,
                           (unsigned long long)nlist * MIN_PER_LIST, MIN_PER_LIST,
                           (unsigned long long)n);
    snprintf(desc, sizeof desc, "IVF%u,Flat", nlist);
  } else {
    snprintf(desc, sizeof desc, "HNSW%u", z->M);
  }
  float *x = malloc((size_t)n * d * sizeof *x);
  if (!x) return kvdex__seterr(KVDEX_ENOMEM, "%s: out of memory for an f32 copy of %llu keys", kind,
                               (unsigned long long)n);
  for (uint64_t t = 0; t < n; t++) kvdex__view_row_f32(keys, t, x + t * d);

  fz nz = *z;
  nz.index = NULL;
  nz.ps = NULL;
  int code, rc = 0;
  /* FAISS builds with OpenMP: as many threads as the pool has, plus the caller
   * (so pool == NULL builds on one thread, reproducibly). */
  int saved_threads = omp_get_max_threads();
  omp_set_num_threads((int)kvdex_pool_size(pool) + 1);
  if ((code = faiss_index_factory(&nz.index, (int)d, desc, METRIC_INNER_PRODUCT))) {
    rc = faiss_err(kind, "index_factory", code);
    goto out;
  }
  if ((code = faiss_ParameterSpace_new(&nz.ps))) {
    rc = faiss_err(kind, "ParameterSpace", code);
    goto out;
  }
  if (z->ivf) {
    if ((code = faiss_Index_train(nz.index, (idx_t)n, x))) {
      rc = faiss_err(kind, "train", code);
      goto out;
    }
    faiss_IndexIVF_set_nprobe(faiss_IndexIVF_cast(nz.index), z->nprobe < nlist ? z->nprobe : nlist);
  } else {
    if ((code = faiss_ParameterSpace_set_index_parameter(nz.ps, nz.index, "efConstruction",
                                                         z->efc)) ||
        (code = faiss_ParameterSpace_set_index_parameter(nz.ps, nz.index, "efSearch", z->ef))) {
      rc = faiss_err(kind, "set_index_parameter", code);
      goto out;
    }
  }
  if ((code = faiss_Index_add(nz.index, (idx_t)n, x))) {
    rc = faiss_err(kind, "add", code);
    goto out;
  }
  nz.nlist = nlist;
  if ((rc = write_faiss(&nz, kind, NULL, &nz.faiss_bytes))) goto out;
  fz_release(z);
  *z = nz;
  nz.index = NULL;
  nz.ps = NULL;
out:
  omp_set_num_threads(saved_threads);
  fz_release(&nz);
  free(x);
  return rc;
}

/* ---- search --------------------------------------------------------------------- */

static int fz_search(const kvdex_index *ix, const kvdex_kv_view *keys, const float *q, uint32_t k,
                     const kvdex_index_params *params, kvdex_index_scratch *s, kvdex_hit *hits,
                     uint32_t *n_hits, uint64_t *touched) {
  const fz *z = ix->impl;
  uint64_t n = ix->n_built;
  uint32_t kk = n < k ? (uint32_t)n : k;
  int rc;
  /* distances in s->f, labels (idx_t, 8 bytes) in the hit scratch (16 bytes each) */
  if ((rc = kvdex__scratch_floats(s, kk)) || (rc = kvdex__scratch_hits(s, kk))) return rc;
  float *D = s->f;
  idx_t *L = (idx_t *)(void *)s->h;
  uint32_t nprobe = params && params->nprobe ? params->nprobe : z->nprobe;
  if (nprobe > z->nlist) nprobe = z->nlist;
  uint32_t ef = params && params->ef ? params->ef : z->ef;
  if (ef > MAX_EF) ef = MAX_EF; /* FAISS keeps efSearch in an int */

  int saved_threads = omp_get_max_threads(); /* a per-thread setting in OpenMP */
  omp_set_num_threads(1);
  uint64_t before[2], after[2];
  int code = 0;
  const char *what = "search";
  pthread_mutex_lock(&faiss_mu);
  if (z->ivf) {
    faiss_IndexIVF_set_nprobe(faiss_IndexIVF_cast(z->index), nprobe);
  } else if ((code = faiss_ParameterSpace_set_index_parameter(z->ps, z->index, "efSearch", ef))) {
    what = "set efSearch";
  }
  kvdex_faiss_stats(&before[0], &before[1]);
  if (!code) code = faiss_Index_search(z->index, 1, q, kk, D, L);
  kvdex_faiss_stats(&after[0], &after[1]);
  pthread_mutex_unlock(&faiss_mu);
  omp_set_num_threads(saved_threads);
  if (code) return faiss_err(ix->ops->kind, what, code);

  uint32_t m = 0;
  for (uint32_t j = 0; j < kk; j++) /* FAISS pads missing results with label -1 */
    if (L[j] >= 0 && (uint64_t)L[j] < n) hits[m++] = (kvdex_hit){(uint64_t)L[j], D[j]};
  kvdex__hits_sort(hits, m);
  *n_hits = m;
  *touched = z->ivf ? after[0] - before[0] + z->nlist : after[1] - before[1];
  return 0;
}

static size_t fz_memory(const kvdex_index *ix) {
  const fz *z = ix->impl;
  return sizeof *z + (z->index ? z->faiss_bytes : 0);
}

/* Body: [u32 nlist (ivf only)] u64 faiss_len, FAISS's write_index bytes. */
static int fz_save(const kvdex_index *ix, kvdex__buf *out) {
  const fz *z = ix->impl;
  int rc;
  if (z->ivf && (rc = kvdex__buf_put(out, &z->nlist, 4))) return rc;
  size_t len_at = out->len, n = 0;
  uint64_t len = 0;
  if ((rc = kvdex__buf_put(out, &len, 8))) return rc;
  pthread_mutex_lock(&faiss_mu); /* searches write nprobe/efSearch into the index */
  rc = write_faiss(z, ix->ops->kind, out, &n);
  pthread_mutex_unlock(&faiss_mu);
  if (rc) return rc;
  len = n;
  memcpy(out->data + len_at, &len, 8);
  return 0;
}

static int fz_load(kvdex_index *ix, kvdex__rd *in) {
  fz *z = ix->impl;
  const char *kind = ix->ops->kind;
  uint32_t nlist = 0;
  uint64_t len;
  if ((z->ivf && kvdex__rd_get(in, &nlist, 4)) || kvdex__rd_get(in, &len, 8)) return KVDEX_EINVAL;
  if (!len || len > in->left || (z->ivf && (!nlist || (z->nlist_spec && nlist != z->nlist_spec))))
    return kvdex__seterr(KVDEX_EINVAL, "%s: stored FAISS index header is inconsistent", kind);
  FILE *f = fmemopen((void *)in->p, (size_t)len, "rb");
  if (!f) return kvdex__seterr(KVDEX_ENOMEM, "%s: cannot open a memory stream", kind);
  fz nz = *z;
  nz.index = NULL;
  nz.ps = NULL;
  int code = faiss_read_index(f, 0, &nz.index);
  long used = ftell(f);
  fclose(f);
  int rc = 0;
  if (code) {
    rc = kvdex__seterr(KVDEX_EINVAL, "%s: FAISS read_index failed: %s", kind,
                       faiss_get_last_error() ? faiss_get_last_error() : "no message");
    goto out;
  }
  if (used != (long)len) {
    rc = kvdex__seterr(KVDEX_EINVAL, "%s: stored FAISS index has trailing bytes", kind);
    goto out;
  }
  if ((code = faiss_ParameterSpace_new(&nz.ps))) {
    rc = faiss_err(kind, "ParameterSpace", code);
    goto out;
  }
  FaissIndexIVF *ivf = faiss_IndexIVF_cast(nz.index);
  int ok = faiss_Index_d(nz.index) == (int)ix->dim &&
           faiss_Index_ntotal(nz.index) == (idx_t)ix->n_built &&
           faiss_Index_metric_type(nz.index) == METRIC_INNER_PRODUCT &&
           faiss_Index_is_trained(nz.index);
  if (z->ivf)
    ok = ok && ivf && faiss_IndexIVF_nlist(ivf) == nlist;
  else /* setting efSearch fails unless it is an HNSW index */
    ok = ok && !ivf &&
         !faiss_ParameterSpace_set_index_parameter(nz.ps, nz.index, "efSearch", z->ef);
  if (!ok) {
    rc = kvdex__seterr(KVDEX_EINVAL, "%s: stored FAISS index does not match the header", kind);
    goto out;
  }
  if (ivf) faiss_IndexIVF_set_nprobe(ivf, z->nprobe < nlist ? z->nprobe : nlist);
  in->p += len;
  in->left -= len;
  nz.nlist = nlist;
  nz.faiss_bytes = (size_t)len;
  fz_release(z);
  *z = nz;
  nz.index = NULL;
  nz.ps = NULL;
out:
  fz_release(&nz);
  return rc;
}

static void fz_free(kvdex_index *ix) {
  fz *z = ix->impl;
  if (z) fz_release(z);
  free(z);
  ix->impl = NULL;
}

const kvdex__index_ops kvdex__ivf_ops = {
    .kind = "ivf",
    .init = ivf_init,
    .param = ivf_param,
    .spec = ivf_spec,
    .build = fz_build,
    .search = fz_search,
    .memory = fz_memory,
    .save = fz_save,
    .load = fz_load,
    .free = fz_free,
};

const kvdex__index_ops kvdex__hnsw_ops = {
    .kind = "hnsw",
    .init = hnsw_init,
    .param = hnsw_param,
    .spec = hnsw_spec,
    .build = fz_build,
    .search = fz_search,
    .memory = fz_memory,
    .save = fz_save,
    .load = fz_load,
    .free = fz_free,
};
