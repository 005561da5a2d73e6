/* indexer: background index builds over a kvdex_store and searches that use them
 * (see indexer.h for the contract). It keeps no table of its own: what it knows of a
 * (sequence, layer) hangs on the sequence as two kvstore attachments,
 *   KVDEX_INDEXER_SLOT_SET    ix_set: the published indexes (immutable; replaced as
 *                             a whole by a rebuild; refcounted by kvstore, so a
 *                             search keeps its set alive while it runs),
 *   KVDEX_INDEXER_SLOT_STATE  ix_state: the latest build's state (created once,
 *                             mutable under its own mutex, never replaced),
 * so both are counted against the cap and go away with the sequence.
 * Builds are jobs on a FIFO served by a few threads of our own (indexer.h says why
 * not libuv's queue); each job holds references on its sequence and its ix_state.
 *
 * Locking: ixr->mu guards the job queue and `stopping`; ix_state.mu guards one
 * layer's state fields. A request locks the states of its layers in ascending layer
 * order (all of them at once, to be all or nothing), never while holding ixr->mu.
 */
#include "engine/indexer.h"

#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "index/topk.h"
#include "kvstore/base.h"

#define MAX_BUILD_THREADS 64
#define TAIL_CHUNK 1024 /* tail keys scored per kvdex_score_keys call */

/* ---- the two attachments ------------------------------------------------------- */

typedef struct ix_set {
  uint32_t n_kv;
  uint64_t tokens;
  double build_seconds;
  char describe[KVDEX_INDEXER_TEXT];
  kvdex_index *ix[]; /* [n_kv] */
} ix_set;

static void ix_set_free(void *p) {
  ix_set *s = p;
  if (!s) return;
  for (uint32_t h = 0; h < s->n_kv; h++) kvdex_index_destroy(s->ix[h]);
  free(s);
}

typedef struct ix_state {
  pthread_mutex_t mu;
  int state; /* kvdex_index_state */
  bool busy; /* a build is queued or running */
  char spec[KVDEX_INDEXER_TEXT];
  char error[KVDEX_INDEXER_TEXT];
} ix_state;

static void ix_state_free(void *p) {
  ix_state *st = p;
  if (!st) return;
  pthread_mutex_destroy(&st->mu);
  free(st);
}

/* The layer's ix_state with a reference held (created on first use). */
static int state_get(kvdex_seq *seq, uint32_t layer, kvdex_attachment **out /* OUT */) {
  for (;;) {
    int rc = kvdex_attachment_get(seq, layer, KVDEX_INDEXER_SLOT_STATE, out);
    if (rc || *out) return rc;
    ix_state *st = calloc(1, sizeof *st);
    if (!st) return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
    pthread_mutex_init(&st->mu, NULL);
    /* Not counted against the cap (0 bytes): a small fixed record per layer, like the
     * store's own structures, so that a failed build leaves the accounting as it was. */
    rc = kvdex_seq_attach_if(seq, layer, KVDEX_INDEXER_SLOT_STATE, NULL, st, 0, ix_state_free);
    if (rc) {
      ix_state_free(st);
      if (rc != KVDEX_ECONFLICT) return rc; /* ECONFLICT: another thread made one */
    }
  }
}

/* ---- the indexer and its jobs ---------------------------------------------------- */

typedef struct ix_job {
  struct ix_job *next;
  kvdex_seq *seq;          /* a reference */
  kvdex_attachment *satt;  /* a reference on the layer's ix_state */
  uint32_t layer;
  char spec[KVDEX_INDEXER_TEXT];
} ix_job;

struct kvdex_indexer {
  kvdex_pool *pool;
  /* Index scratches for the parallel searches (one per kv head task in flight),
   * kept for reuse: taken and given back under smu. */
  pthread_mutex_t smu;
  kvdex_index_scratch **sfree; /* smu */
  unsigned n_sfree, cap_sfree; /* smu */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  ix_job *head, *tail; /* ixr->mu */
  bool stopping;       /* ixr->mu */
  unsigned n_threads;
  pthread_t threads[];
};

/* The status name a failure is reported under (the gRPC names, as the wire uses). */
static const char *status_name(int rc) {
  switch (rc) {
    case KVDEX_EINVAL: return "INVALID_ARGUMENT";
    case KVDEX_ENOTFOUND: return "NOT_FOUND";
    case KVDEX_ENOMEM: return "RESOURCE_EXHAUSTED";
    case KVDEX_ECONFLICT: return "FAILED_PRECONDITION";
    case KVDEX_EBUSY: return "ABORTED";
    case KVDEX_ECANCELLED: return "CANCELLED";
    case KVDEX_EUNIMPL: return "UNIMPLEMENTED";
    default: return "INTERNAL";
  }
}

/* 1 if an index made from spec (already parsed once) needs the layer's landmarks. */
static bool spec_needs_landmarks(const char *spec) {
  kvdex_index *probe = NULL;
  bool needs = kvdex_index_create(spec, &probe) == KVDEX_OK && kvdex_index_needs_landmarks(probe);
  kvdex_index_destroy(probe);
  return needs;
}

/* Landmark blocks a build of `layer` can use: complete committed blocks that have one. */
static uint64_t usable_landmarks(kvdex_seq *seq, uint32_t layer) {
  uint64_t n = kvdex_seq_tokens(seq, layer), n_lm = kvdex_seq_landmark_blocks(seq, layer);
  uint64_t full = n / kvdex_seq_shape(seq)->block_tokens;
  return n_lm < full ? n_lm : full;
}

/* Ends a job: records the outcome in the layer's state, drops the references. */
static void job_finish(ix_job *job, int state, const char *error) {
  ix_state *st = kvdex_attachment_obj(job->satt);
  pthread_mutex_lock(&st->mu);
  st->busy = false;
  st->state = state;
  snprintf(st->error, sizeof st->error, "%s", error ? error : "");
  pthread_mutex_unlock(&st->mu);
  kvdex_attachment_release(job->satt);
  kvdex_seq_release(job->seq);
  free(job);
}

static bool stopping(kvdex_indexer *ixr) {
  pthread_mutex_lock(&ixr->mu);
  bool s = ixr->stopping;
  pthread_mutex_unlock(&ixr->mu);
  return s;
}

/* Builds one layer and publishes it. Returns the final state; *err gets a message. */
static int job_run(kvdex_indexer *ixr, ix_job *job, char *err, size_t err_len) {
  kvdex_seq *seq = job->seq;
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  const uint32_t n_kv = sh->n_kv_heads, group = sh->n_q_heads / sh->n_kv_heads;
  double t0 = kvdex__now_s();
  uint64_t n = kvdex_seq_tokens(seq, job->layer);
  /* landmark:mode=given covers the blocks that have landmarks, [0, n_lm * B): one
   * count for every kv head, read after n (landmarks are published after their tokens
   * and never go away, so each head can copy n_lm of them); the tail merge of
   * kvdex_indexer_search scans the rest exactly. */
  const uint32_t B = sh->block_tokens;
  uint64_t n_lm = 0;
  if (spec_needs_landmarks(job->spec)) {
    n_lm = kvdex_seq_landmark_blocks(seq, job->layer);
    if (n_lm > n / B) n_lm = n / B;
    if (n_lm == 0) { /* kvdex_indexer_build checked it: cannot happen */
      snprintf(err, err_len,
               "%s: layer %u has no landmarks (landmark:mode=given indexes the blocks whose "
               "landmark keys were appended with their tokens, AppendKVRequest.landmarks)",
               status_name(KVDEX_ECONFLICT), job->layer);
      return KVDEX_INDEX_FAILED;
    }
    n = n_lm * B;
  }
  float *lms = NULL;
  if (n_lm && !(lms = malloc((size_t)n_lm * sh->head_dim * sizeof *lms))) {
    snprintf(err, err_len, "%s: out of memory for %llu landmarks", status_name(KVDEX_ENOMEM),
             (unsigned long long)n_lm);
    return KVDEX_INDEX_FAILED;
  }
  ix_set *set = calloc(1, sizeof *set + n_kv * sizeof(kvdex_index *));
  if (!set) {
    free(lms);
    snprintf(err, err_len, "%s: out of memory", status_name(KVDEX_ENOMEM));
    return KVDEX_INDEX_FAILED;
  }
  set->n_kv = n_kv;
  set->tokens = n;
  uint64_t memory = sizeof *set + n_kv * sizeof(kvdex_index *);
  for (uint32_t h = 0; h < n_kv; h++) {
    if (kvdex_seq_deleted(seq)) goto discard;
    if (stopping(ixr)) {
      snprintf(err, err_len, "CANCELLED: the indexer was stopped");
      free(lms);
      ix_set_free(set);
      return KVDEX_INDEX_FAILED;
    }
    kvdex_kv_view view;
    float *train = NULL;
    uint64_t n_train = 0, got_lm = 0;
    int rc = kvdex_seq_view(seq, job->layer, h, &view);
    if (!rc) {
      view.n_tokens = n; /* the length at the start: later rows are not ours */
      rc = kvdex_seq_queries(seq, job->layer, h * group, group, &train, &n_train, NULL);
    }
    if (!rc && n_lm) {
      rc = kvdex_seq_landmarks(seq, job->layer, h, n_lm, lms, &got_lm);
      if (!rc && got_lm != n_lm) /* cannot happen: landmarks never go away */
        rc = kvdex__seterr(KVDEX_EINTERNAL, "%llu landmarks, expected %llu",
                           (unsigned long long)got_lm, (unsigned long long)n_lm);
    }
    if (!rc) rc = kvdex_index_create(job->spec, &set->ix[h]);
    if (!rc) {
      kvdex_index_input in = {.keys = &view, .train_q = train, .n_train = n_train * group};
      if (n_lm) {
        in.landmarks = lms;
        in.n_landmarks = n_lm;
        in.landmark_block = B;
      }
      rc = kvdex_index_build(set->ix[h], &in, ixr->pool);
    }
    free(train);
    if (rc) {
      snprintf(err, err_len, "%s: kv head %u: %s", status_name(rc), h, kvdex_errmsg());
      free(lms);
      ix_set_free(set);
      return KVDEX_INDEX_FAILED;
    }
    memory += kvdex_index_memory(set->ix[h]);
  }
  free(lms);
  lms = NULL;
  set->build_seconds = kvdex__now_s() - t0;
  snprintf(set->describe, sizeof set->describe, "%s", kvdex_index_describe(set->ix[0]));
  int rc = kvdex_seq_attach(seq, job->layer, KVDEX_INDEXER_SLOT_SET, set, memory, ix_set_free);
  if (rc == KVDEX_ENOTFOUND) goto discard;
  if (rc) {
    snprintf(err, err_len, "%s: publishing the index of layer %u (%llu bytes): %s",
             status_name(rc), job->layer,
             (unsigned long long)memory, kvdex_errmsg());
    ix_set_free(set);
    return KVDEX_INDEX_FAILED;
  }
  KVDEX_LOG(KVDEX_LOG_DEBUG, "indexer: %s/%s layer %u: %s over %llu tokens in %.3f s, %llu bytes",
            kvdex_seq_namespace(seq), kvdex_seq_id(seq), job->layer, set->describe,
            (unsigned long long)n, set->build_seconds, (unsigned long long)memory);
  return KVDEX_INDEX_READY;
discard: /* the sequence was deleted: nobody will look at the state again */
  free(lms);
  ix_set_free(set);
  snprintf(err, err_len, "NOT_FOUND: discarded, the sequence was deleted");
  return KVDEX_INDEX_FAILED;
}

static void *builder_main(void *arg) {
  kvdex_indexer *ixr = arg;
  char err[KVDEX_INDEXER_TEXT];
  for (;;) {
    pthread_mutex_lock(&ixr->mu);
    while (!ixr->stopping && !ixr->head) pthread_cond_wait(&ixr->cv, &ixr->mu);
    ix_job *job = ixr->stopping ? NULL : ixr->head;
    if (job) {
      ixr->head = job->next;
      if (!ixr->head) ixr->tail = NULL;
    }
    pthread_mutex_unlock(&ixr->mu);
    if (!job) return NULL;
    err[0] = 0;
    int state = job_run(ixr, job, err, sizeof err);
    job_finish(job, state, err);
  }
}

int kvdex_indexer_create(kvdex_pool *pool, unsigned n_threads, kvdex_indexer **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "indexer_create: out is NULL");
  *out = NULL;
  if (n_threads == 0) n_threads = 1;
  if (n_threads > MAX_BUILD_THREADS) n_threads = MAX_BUILD_THREADS;
  kvdex_indexer *ixr = calloc(1, sizeof *ixr + n_threads * sizeof(pthread_t));
  if (!ixr) return kvdex__seterr(KVDEX_ENOMEM, "indexer_create: out of memory");
  ixr->pool = pool;
  pthread_mutex_init(&ixr->mu, NULL);
  pthread_mutex_init(&ixr->smu, NULL);
  pthread_cond_init(&ixr->cv, NULL);
  for (unsigned i = 0; i < n_threads; i++) {
    if (pthread_create(&ixr->threads[i], NULL, builder_main, ixr)) {
      ixr->n_threads = i;
      kvdex_indexer_destroy(ixr);
      return kvdex__seterr(KVDEX_EINTERNAL, "indexer_create: cannot start build thread %u", i);
    }
  }
  ixr->n_threads = n_threads;
  *out = ixr;
  return KVDEX_OK;
}

void kvdex_indexer_destroy(kvdex_indexer *ixr) {
  if (!ixr) return;
  pthread_mutex_lock(&ixr->mu);
  ixr->stopping = true;
  ix_job *queued = ixr->head;
  ixr->head = ixr->tail = NULL;
  pthread_cond_broadcast(&ixr->cv);
  pthread_mutex_unlock(&ixr->mu);
  while (queued) {
    ix_job *next = queued->next;
    job_finish(queued, KVDEX_INDEX_FAILED, "CANCELLED: the indexer was stopped");
    queued = next;
  }
  for (unsigned i = 0; i < ixr->n_threads; i++) pthread_join(ixr->threads[i], NULL);
  pthread_cond_destroy(&ixr->cv);
  pthread_mutex_destroy(&ixr->mu);
  for (unsigned i = 0; i < ixr->n_sfree; i++) kvdex_index_scratch_destroy(ixr->sfree[i]);
  free(ixr->sfree);
  pthread_mutex_destroy(&ixr->smu);
  free(ixr);
}

/* A scratch for one search task: a kept one, else a new one (NULL: out of memory). */
static kvdex_index_scratch *scratch_take(kvdex_indexer *ixr) {
  kvdex_index_scratch *s = NULL;
  pthread_mutex_lock(&ixr->smu);
  if (ixr->n_sfree) s = ixr->sfree[--ixr->n_sfree];
  pthread_mutex_unlock(&ixr->smu);
  if (!s && kvdex_index_scratch_create(&s)) return NULL;
  return s;
}

static void scratch_give(kvdex_indexer *ixr, kvdex_index_scratch *s) {
  pthread_mutex_lock(&ixr->smu);
  if (ixr->n_sfree == ixr->cap_sfree) {
    unsigned cap = ixr->cap_sfree ? 2 * ixr->cap_sfree : 8;
    kvdex_index_scratch **a = realloc(ixr->sfree, cap * sizeof *a);
    if (a) {
      ixr->sfree = a;
      ixr->cap_sfree = cap;
    }
  }
  if (ixr->n_sfree < ixr->cap_sfree) {
    ixr->sfree[ixr->n_sfree++] = s;
    s = NULL;
  }
  pthread_mutex_unlock(&ixr->smu);
  kvdex_index_scratch_destroy(s); /* no room to keep it */
}

/* ---- build requests --------------------------------------------------------------- */

int kvdex_indexer_build(kvdex_indexer *ixr, kvdex_seq *seq, uint32_t layer, const char *spec,
                        uint32_t *layers, uint32_t *n_queued) {
  if (n_queued) *n_queued = 0;
  if (!ixr || !seq) return kvdex__seterr(KVDEX_EINVAL, "build_index: NULL argument");
  if (!spec || !*spec)
    return kvdex__seterr(KVDEX_EINVAL,
                         "build_index: spec is empty (e.g. \"graph:degree=32\", \"ivf:nlist=256\", "
                         "\"hnsw:M=32\", \"landmark:mode=minmax\")");
  if (strlen(spec) >= KVDEX_INDEXER_TEXT)
    return kvdex__seterr(KVDEX_EINVAL, "build_index: spec is longer than %d bytes",
                         KVDEX_INDEXER_TEXT - 1);
  kvdex_index *probe = NULL;
  int rc = kvdex_index_create(spec, &probe); /* the parser's message names the problem */
  const bool needs_landmarks = kvdex_index_needs_landmarks(probe);
  kvdex_index_destroy(probe);
  if (rc) return kvdex__preerr(rc, "build_index");
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  uint32_t lo = layer, hi = layer + 1;
  if (layer == KVDEX_ALL_LAYERS) {
    lo = 0;
    hi = sh->n_layers;
  } else if (layer >= sh->n_layers) {
    return kvdex__seterr(KVDEX_EINVAL, "build_index: layer %u out of range (the sequence has %u layers)",
                         layer, sh->n_layers);
  } else if (kvdex_seq_tokens(seq, layer) == 0) {
    return kvdex__seterr(KVDEX_ECONFLICT, "build_index: layer %u has no committed tokens", layer);
  }
  if (kvdex_seq_deleted(seq))
    return kvdex__seterr(KVDEX_ENOTFOUND, "build_index: sequence %s/%s was deleted",
                         kvdex_seq_namespace(seq), kvdex_seq_id(seq));
  if (stopping(ixr)) return kvdex__seterr(KVDEX_EUNAVAIL, "build_index: the indexer is stopping");

  /* 1. One job per layer with tokens, each with its references. */
  ix_job *jobs = NULL, *last = NULL;
  uint32_t n = 0;
  rc = KVDEX_OK;
  for (uint32_t l = lo; l < hi && !rc; l++) {
    if (kvdex_seq_tokens(seq, l) == 0) continue;
    if (needs_landmarks && usable_landmarks(seq, l) == 0) {
      rc = kvdex__seterr(KVDEX_ECONFLICT,
                         "build_index: \"%.64s\": layer %u has no landmarks (mode=given indexes "
                         "the complete blocks whose landmark keys were appended with their "
                         "tokens; %llu tokens, blocks of %u)",
                         spec, l, (unsigned long long)kvdex_seq_tokens(seq, l),
                         kvdex_seq_shape(seq)->block_tokens);
      break;
    }
    ix_job *job = calloc(1, sizeof *job);
    if (!job) {
      rc = kvdex__seterr(KVDEX_ENOMEM, "build_index: out of memory");
      break;
    }
    rc = state_get(seq, l, &job->satt);
    if (rc) {
      free(job);
      rc = kvdex__preerr(rc, "build_index");
      break;
    }
    kvdex_seq_retain(seq);
    job->seq = seq;
    job->layer = l;
    snprintf(job->spec, sizeof job->spec, "%s", spec);
    if (last) last->next = job;
    else jobs = job;
    last = job;
    if (layers) layers[n] = l; /* OUT: only meaningful on success */
    n++;
  }
  if (!rc && n == 0)
    rc = kvdex__seterr(KVDEX_ECONFLICT, "build_index: no layer of %s/%s has committed tokens",
                       kvdex_seq_namespace(seq), kvdex_seq_id(seq));

  /* 2. All or nothing: lock every state, refuse if one is busy, else mark them. */
  if (!rc) {
    ix_job *j;
    for (j = jobs; j; j = j->next) {
      ix_state *st = kvdex_attachment_obj(j->satt);
      pthread_mutex_lock(&st->mu);
      if (st->busy) {
        rc = kvdex__seterr(KVDEX_EBUSY, "build_index: a build of layer %u is already in progress",
                           j->layer);
        pthread_mutex_unlock(&st->mu);
        break;
      }
    }
    for (ix_job *u = jobs; u != j; u = u->next) {
      ix_state *st = kvdex_attachment_obj(u->satt);
      if (!rc) {
        st->busy = true;
        st->state = KVDEX_INDEX_BUILDING;
        snprintf(st->spec, sizeof st->spec, "%s", spec);
        st->error[0] = 0;
      }
      pthread_mutex_unlock(&st->mu);
    }
  }
  if (rc) {
    while (jobs) {
      ix_job *next = jobs->next;
      kvdex_attachment_release(jobs->satt);
      kvdex_seq_release(jobs->seq);
      free(jobs);
      jobs = next;
    }
    return rc;
  }

  /* 3. Queue them (a stop that raced with us cancels them like any queued job). */
  pthread_mutex_lock(&ixr->mu);
  bool stop = ixr->stopping;
  if (!stop) {
    if (ixr->tail) ixr->tail->next = jobs;
    else ixr->head = jobs;
    ixr->tail = last;
    pthread_cond_broadcast(&ixr->cv);
  }
  pthread_mutex_unlock(&ixr->mu);
  if (stop) {
    while (jobs) {
      ix_job *next = jobs->next;
      job_finish(jobs, KVDEX_INDEX_FAILED, "CANCELLED: the indexer was stopped");
      jobs = next;
    }
    return kvdex__seterr(KVDEX_EUNAVAIL, "build_index: the indexer is stopping");
  }
  if (n_queued) *n_queued = n;
  return KVDEX_OK;
}

/* ---- state --------------------------------------------------------------------------- */

int kvdex_indexer_info_get(kvdex_indexer *ixr, kvdex_seq *seq, uint32_t layer,
                           kvdex_layer_index *out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "index_info: out is NULL");
  memset(out, 0, sizeof *out);
  out->layer = layer;
  if (!seq) return kvdex__seterr(KVDEX_EINVAL, "index_info: sequence is NULL");
  kvdex_attachment *satt = NULL, *xatt = NULL;
  int rc = kvdex_attachment_get(seq, layer, KVDEX_INDEXER_SLOT_STATE, &satt);
  if (!rc) rc = kvdex_attachment_get(seq, layer, KVDEX_INDEXER_SLOT_SET, &xatt);
  if (rc) {
    kvdex_attachment_release(satt);
    return kvdex__preerr(rc, "index_info");
  }
  if (satt) {
    ix_state *st = kvdex_attachment_obj(satt);
    pthread_mutex_lock(&st->mu);
    out->state = st->state;
    memcpy(out->spec, st->spec, sizeof out->spec);
    memcpy(out->error, st->error, sizeof out->error);
    pthread_mutex_unlock(&st->mu);
  }
  if (xatt) {
    const ix_set *set = kvdex_attachment_obj(xatt);
    if (out->state == KVDEX_INDEX_NONE) out->state = KVDEX_INDEX_READY;
    snprintf(out->kind, sizeof out->kind, "%s", kvdex_index_kind(set->ix[0]));
    memcpy(out->describe, set->describe, sizeof out->describe);
    out->build_seconds = set->build_seconds;
    out->memory_bytes = kvdex_attachment_bytes(xatt);
    out->tokens = set->tokens;
  }
  kvdex_attachment_release(xatt);
  kvdex_attachment_release(satt);
  (void)ixr;
  return KVDEX_OK;
}

/* ---- search ----------------------------------------------------------------------------- */

/* One indexed search of a layer, shared by its per-kv-head tasks. */
typedef struct search_job {
  kvdex_indexer *ixr;
  kvdex_seq *seq;
  uint32_t layer;
  const ix_set *set;
  const float *q;
  const kvdex_search_opts *opts;
  const kvdex_index_params *params;
  kvdex_search_result *res;
  uint64_t n, lo, hi, kf, kf1, tail_lo, tail_hi;
  size_t kk;
  bool use_index, use_tail;
  uint32_t group, d;
  kvdex_hit *cand;   /* [n_kv][kf] */
  float *sc;         /* [n_kv][group * TAIL_CHUNK] */
  kvdex__topk *heaps; /* [n_kv][group] */
  uint64_t *scanned; /* [n_kv] */
  int *rcs;          /* [n_kv] */
} search_job;

/* The query heads of kv head `kv`: the index's candidates, then the tail. */
static void search_task(void *ctx, size_t kvi, unsigned worker) {
  (void)worker;
  search_job *J = ctx;
  const uint32_t kv = (uint32_t)kvi, group = J->group, d = J->d;
  const kvdex_search_opts *opts = J->opts;
  kvdex_hit *cand = J->cand ? J->cand + (size_t)kv * J->kf : NULL;
  float *sc = J->sc ? J->sc + (size_t)kv * group * TAIL_CHUNK : NULL;
  kvdex__topk *heaps = J->heaps + (size_t)kv * group;
  const uint64_t lo = J->lo, hi = J->hi;
  uint64_t scanned = 0;
  kvdex_kv_view view;
  int rc = kvdex_seq_view(J->seq, J->layer, kv, &view);
  kvdex_index_scratch *scratch = NULL;
  if (!rc && J->use_index && !(scratch = scratch_take(J->ixr)))
    rc = kvdex__seterr(KVDEX_ENOMEM, "search: out of memory for a scratch");
  if (rc) goto out;
  view.n_tokens = J->n; /* one length for every kv head */
  for (uint32_t j = 0; j < group; j++)
    kvdex__topk_init(&heaps[j], J->res->heads[kv * group + j].hits, (uint32_t)J->kk);
  for (uint32_t j = 0; J->use_index && j < group && !rc; j++) {
    uint32_t nh = 0;
    uint64_t touched = 0;
    const float *qh = J->q + (size_t)(kv * group + j) * d;
    rc = kvdex_index_search(J->set->ix[kv], &view, qh, (uint32_t)J->kf1, J->params, scratch, cand,
                            &nh, &touched);
    if (rc) break;
    scanned += touched;
    uint32_t kept = 0;
    for (uint32_t i = 0; i < nh; i++) kept += cand[i].id >= lo && cand[i].id < hi;
    if (kept < J->kk && nh == J->kf1 && J->kf1 < J->kf) { /* too many excluded: the full count */
      rc = kvdex_index_search(J->set->ix[kv], &view, qh, (uint32_t)J->kf, J->params, scratch,
                              cand, &nh, &touched);
      if (rc) break;
      scanned += touched;
    }
    for (uint32_t i = 0; i < nh; i++)
      if (cand[i].id >= lo && cand[i].id < hi)
        kvdex__topk_push(&heaps[j], cand[i].id, cand[i].score);
  }
  if (rc) goto out;
  /* The tail: eligible tokens the index does not cover, scored exactly for the
   * whole group in one pass, in runs that stay inside one block. */
  const size_t row = (size_t)d * kvdex_dtype_size(view.dtype);
  for (uint64_t t = J->tail_lo; J->use_tail && t < J->tail_hi && !rc;) {
    uint64_t off = t % view.block_tokens;
    uint64_t run = view.block_tokens - off;
    if (run > J->tail_hi - t) run = J->tail_hi - t;
    if (run > TAIL_CHUNK) run = TAIL_CHUNK;
    const char *keys = (const char *)view.k_blocks[t / view.block_tokens] + off * row;
    rc = kvdex_score_keys(opts->simd, view.dtype, keys, run, d, J->q + (size_t)kv * group * d,
                          group, sc);
    for (uint32_t j = 0; !rc && j < group; j++)
      kvdex__topk_push_run(&heaps[j], t, sc + j * run, run);
    t += run;
  }
  if (J->use_tail) scanned += J->tail_hi - J->tail_lo;
  for (uint32_t j = 0; j < group; j++)
    J->res->heads[kv * group + j].n_hits = kvdex__topk_finish(&heaps[j]);
out:
  if (scratch) scratch_give(J->ixr, scratch);
  J->scanned[kv] = scanned;
  J->rcs[kv] = rc;
}

/* The indexed search of one layer with the ready set `set`. */
static int search_set(kvdex_indexer *ixr, kvdex_seq *seq, uint32_t layer, const ix_set *set,
                      const float *q, const kvdex_search_opts *opts,
                      const kvdex_index_params *params, kvdex_search_result *res) {
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  const uint32_t n_q = sh->n_q_heads, group = n_q / sh->n_kv_heads, d = sh->head_dim;
  for (size_t i = 0; i < (size_t)n_q * d; i++)
    if (!isfinite(q[i]))
      return kvdex__seterr(KVDEX_EINVAL, "search: query element %zu (head %zu) is not finite", i,
                           i / d);
  const uint64_t n = kvdex_seq_tokens(seq, layer), built = set->tokens;
  uint64_t lo = opts->sinks, hi = n > opts->window ? n - opts->window : 0;
  if (lo > hi) lo = hi;
  const uint64_t eligible = hi - lo;
  const size_t kk = eligible < opts->k ? (size_t)eligible : opts->k;
  /* Candidates from the index: enough that k survive dropping the excluded tokens it
   * covers (sinks, and window tokens that were there at build). Asking for all of
   * them widens every beam by the window, so the first try asks for a share of them,
   * and a head that then keeps fewer than k searches again with the full count. */
  uint64_t excl = (opts->sinks < built ? opts->sinks : built) + (built > hi ? built - hi : 0);
  uint64_t kf = (uint64_t)opts->k + excl;
  if (kf > built) kf = built;
  if (kf > KVDEX_MAX_K) kf = KVDEX_MAX_K;
  uint64_t kf1 = (uint64_t)opts->k + (excl < opts->k / 4 + 64 ? excl : opts->k / 4 + 64);
  if (kf1 > kf) kf1 = kf;
  const bool use_index = kk > 0 && lo < (built < hi ? built : hi);
  const uint64_t tail_lo = lo > built ? lo : built, tail_hi = hi;
  const bool use_tail = kk > 0 && tail_lo < tail_hi;

  int rc = kvdex__search_result_reserve(res, n_q, kk);
  if (rc) return rc;
  const uint32_t n_kv = sh->n_kv_heads;
  search_job J = {ixr, seq, layer, set, q, opts, params, res, n, lo, hi, kf, kf1,
                  tail_lo, tail_hi, kk, use_index, use_tail, group, d, NULL, NULL, NULL,
                  NULL, NULL};
  J.cand = use_index ? malloc((size_t)n_kv * kf * sizeof *J.cand) : NULL;
  J.sc = use_tail ? malloc((size_t)n_kv * group * TAIL_CHUNK * sizeof *J.sc) : NULL;
  J.heaps = malloc((size_t)n_kv * group * sizeof *J.heaps);
  J.scanned = calloc(n_kv, sizeof *J.scanned);
  J.rcs = calloc(n_kv, sizeof *J.rcs);
  if ((use_index && !J.cand) || (use_tail && !J.sc) || !J.heaps || !J.scanned || !J.rcs) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "search: out of memory");
  } else {
    /* The kv heads are independent: in parallel on the pool. */
    kvdex_pool_run(ixr->pool, n_kv, search_task, &J);
    for (uint32_t kv = 0; kv < n_kv && !rc; kv++) rc = J.rcs[kv];
  }
  uint64_t scanned = 0;
  for (uint32_t kv = 0; J.scanned && kv < n_kv; kv++) scanned += J.scanned[kv];
  free(J.cand);
  free(J.sc);
  free(J.heaps);
  free(J.scanned);
  free(J.rcs);
  if (rc) {
    for (uint32_t h = 0; h < n_q; h++) res->heads[h].n_hits = 0;
    return kvdex__preerr(rc, "search");
  }
  res->keys_scanned = scanned;
  res->tokens = n;
  return KVDEX_OK;
}

int kvdex_indexer_check_index(const char *index) {
  if (!index || !index[0] || !strcmp(index, "exact") || !strcmp(index, "auto")) return KVDEX_OK;
  if (strchr(index, ':'))
    return kvdex__seterr(KVDEX_EINVAL,
                         "index \"%.64s\": name a kind only (\"graph\", \"ivf\", ...); "
                         "parameters belong to BuildIndex",
                         index);
  kvdex_index *probe = NULL;
  int rc = kvdex_index_create(index, &probe);
  kvdex_index_destroy(probe);
  if (rc)
    return kvdex__seterr(KVDEX_EINVAL,
                         "index \"%.64s\" is not known: use \"\", \"exact\", \"auto\" or a "
                         "kind (%s)",
                         index, kvdex_errmsg());
  return KVDEX_OK;
}

int kvdex_indexer_search(kvdex_indexer *ixr, kvdex_seq *seq, uint32_t layer, const float *q,
                         const kvdex_search_opts *opts, const char *index,
                         const kvdex_index_params *params, kvdex_search_result *res,
                         const char **used) {
  if (used) *used = "exact";
  if (!ixr || !seq || !q || !opts || !res)
    return kvdex__seterr(KVDEX_EINVAL, "search: NULL argument");
  if (!index || !index[0] || !strcmp(index, "exact"))
    return kvdex_exact_search(seq, layer, q, opts, ixr->pool, res);
  const kvdex_shape *sh = kvdex_seq_shape(seq);
  if (layer >= sh->n_layers)
    return kvdex__seterr(KVDEX_EINVAL, "search: layer %u is out of range (n_layers = %u)", layer,
                         sh->n_layers);
  if (opts->k == 0 || opts->k > KVDEX_MAX_K)
    return kvdex__seterr(KVDEX_EINVAL, "search: k = %u is outside 1..%d", opts->k, KVDEX_MAX_K);
  bool is_auto = !strcmp(index, "auto");
  kvdex_attachment *xatt = NULL;
  int rc = kvdex_attachment_get(seq, layer, KVDEX_INDEXER_SLOT_SET, &xatt);
  if (rc) return rc;
  const ix_set *set = kvdex_attachment_obj(xatt);
  if (set && !is_auto && strcmp(kvdex_index_kind(set->ix[0]), index)) set = NULL;
  if (set && set->tokens > kvdex_seq_tokens(seq, layer)) set = NULL; /* cannot happen */
  if (!set && !is_auto) {
    /* Tell an unknown kind (INVALID_ARGUMENT) from one that is not ready. */
    if ((rc = kvdex_indexer_check_index(index)) != KVDEX_OK) {
      rc = kvdex__preerr(rc, "search");
    } else {
      kvdex_layer_index info;
      kvdex_indexer_info_get(ixr, seq, layer, &info);
      static const char *const names[] = {"none", "building", "ready", "failed"};
      rc = kvdex__seterr(KVDEX_ECONFLICT,
                         "search: layer %u has no ready %s index (latest build: %s%s%s%s; "
                         "ready: %s)",
                         layer, index, names[info.state & 3], info.spec[0] ? " \"" : "",
                         info.spec, info.spec[0] ? "\"" : "", info.kind[0] ? info.kind : "none");
    }
    kvdex_attachment_release(xatt);
    return rc;
  }
  if (!set) {
    kvdex_attachment_release(xatt);
    return kvdex_exact_search(seq, layer, q, opts, ixr->pool, res);
  }
  rc = search_set(ixr, seq, layer, set, q, opts, params, res);
  if (!rc && used) *used = kvdex_index_kind(set->ix[0]);
  kvdex_attachment_release(xatt);
  return rc;
}
