/* kvstore: sequences of K/V token blocks in CPU memory, with byte accounting against a
 * cap, reference-counted lifetimes and append transactions (see kvstore.h for the
 * contract). It does not evict, snapshot or index; it only stores, checks and exposes.
 *
 * Layout: store -> hash map (ns, id) -> seq -> layer -> kv head -> a block pointer
 * array (K pointers, then V pointers). Each block pair (K and V of one kv head, one
 * block of tokens) is a single allocation: K at offset 0, V at offset `block_stride`.
 *
 * Prefill queries: per layer a kvdex__qset (kept token ids ascending, their rows of all
 * query heads), replaced as a whole: a transaction works on a private copy
 * (layer.qpend) and commit swaps it in under seq->mu, where readers copy it out.
 * Landmarks: per layer a kvdex__lmset (rows [n_kv_heads][cap][row], n committed
 * blocks). The transaction writes new rows past the committed n in place when there is
 * room (readers copy only rows below n, under seq->mu), else into a grown private copy
 * (layer.lmpend) that commit swaps in under seq->mu; commit then publishes the count.
 * Attachments: per (layer, slot) a refcounted record (the slot holds one reference,
 * every kvdex_attachment_get another, which also holds a reference on the sequence,
 * so the sequence outlives every record it has to uncharge); the last release frees
 * the object and returns its bytes.
 *
 * Locking:
 *  - store->lock (rwlock) guards the hash map, the all-sequences list and n_seqs.
 *    Functions named *_locked run with it held.
 *  - seq->mu (mutex) guards the attachment slots, every layer's qpub, lmpub and
 *    lmpub->n. It is never
 *    held while an attachment is freed or the store lock is taken.
 *  - A sequence's writer state (layer.staged, lm_staged, qpend, lmpend, head.pending,
 *    retired, txn) belongs to
 *    the thread owning the transaction (seq->txn_active, acquire/release).
 *  - Readers take no lock: they load layer.committed (acquire) and then head.pub
 *    (acquire). Commit publishes grown pointer arrays and then the lengths (release),
 *    so whatever length a reader sees, the rows and pointers below it are written.
 *    Rows below a committed length never change; pointer arrays are replaced, never
 *    modified below the committed block count, and old ones live until the seq is freed.
 */
#include "kvstore/kvstore.h"

#include <assert.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvstore/alloc.h"
#include "kvstore/kvstore_int.h"

/* A block pointer array: K block pointers in ptrs[0, cap), V in ptrs[cap, 2*cap).
 * Entries at or beyond the staged block count are NULL. */
typedef struct kvdex__blocks {
  struct kvdex__blocks *retired_next; /* list of replaced arrays, freed with the seq */
  uint64_t cap;
  void *ptrs[];
} kvdex__blocks;

typedef struct kvdex__head {
  _Atomic(kvdex__blocks *) pub; /* what readers see; NULL until the first block */
  kvdex__blocks *pending;       /* grown copy not yet published (txn owner only) */
} kvdex__head;

/* The prefill queries a layer keeps: one allocation, header + ids + rows. */
typedef struct kvdex__qset {
  uint64_t stride; /* a token t is kept iff t % stride == 0 */
  uint64_t n, cap; /* kept tokens, room */
  size_t bytes;    /* size of this allocation (accounted) */
  uint64_t *ids;   /* [cap], ascending */
  char *rows;      /* [cap][n_q_heads * row_bytes], sequence dtype */
} kvdex__qset;

/* The landmark keys a layer keeps: one allocation, header + rows. */
typedef struct kvdex__lmset {
  uint64_t n;    /* committed blocks (seq->mu; the txn owner may read it) */
  uint64_t cap;  /* blocks of room per kv head */
  size_t bytes;  /* size of this allocation (accounted) */
  char *rows;    /* [n_kv_heads][cap][row_bytes], sequence dtype */
} kvdex__lmset;

typedef struct kvdex__layer {
  _Atomic uint64_t committed; /* tokens readers may see */
  uint64_t staged;            /* committed + staged by the open txn (txn owner only) */
  kvdex__qset *qpub;          /* committed queries (seq->mu; the txn owner may read it) */
  kvdex__qset *qpend;         /* the open txn's copy (txn owner only) */
  kvdex__lmset *lmpub;        /* committed landmarks (seq->mu; the txn owner may read it) */
  kvdex__lmset *lmpend;       /* the open txn's grown copy (txn owner only) */
  uint64_t lm_staged;         /* landmark blocks, committed + staged (txn owner only) */
} kvdex__layer;

struct kvdex_attachment {
  _Atomic uint64_t refs;
  kvdex_seq *seq;
  void *obj;
  uint64_t bytes;
  kvdex_attach_free_fn free_fn;
};

struct kvdex_txn {
  kvdex_seq *seq;
  int err;                 /* first failure, 0 if none */
  char errmsg[256];        /* its message, replayed by commit */
  uint64_t appended;
  uint64_t replayed;
};

struct kvdex_seq {
  kvdex_store *store;
  struct kvdex_seq *hash_next;          /* store->lock */
  struct kvdex_seq *all_prev, *all_next; /* store->lock; unlinked only when freed */
  uint64_t hash;
  _Atomic uint64_t refs; /* the map holds one while the seq is in it */
  _Atomic bool deleted;
  _Atomic bool importing; /* hidden from reads until kvdex_seq_publish */
  _Atomic bool txn_active;
  _Atomic uint64_t bytes; /* accounted bytes: metadata + arrays + blocks */
  size_t meta_bytes;      /* size of this allocation */
  kvdex_shape shape;      /* block_tokens resolved (never 0) */
  size_t row_bytes;       /* head_dim * dtype size */
  size_t block_stride;    /* block_tokens * row_bytes, rounded up to KVDEX__ALLOC_ALIGN */
  kvdex__layer *layers;   /* [n_layers] */
  kvdex__head *heads;     /* [n_layers * n_kv_heads] */
  kvdex__blocks **scratch; /* [n_kv_heads], txn owner only */
  kvdex_attachment **atts; /* [n_layers * KVDEX_ATTACH_SLOTS], seq->mu */
  pthread_mutex_t mu;      /* attachments and qpub, see the top of the file */
  kvdex__blocks *retired;  /* txn owner only */
  struct kvdex_txn txn;    /* the one transaction a sequence can have */
  char ns[KVDEX_MAX_NAMESPACE + 1];
  char id[]; /* NUL-terminated */
};

struct kvdex_store {
  kvdex__alloc *alloc;
  uint64_t cap;
  _Atomic uint64_t used;
  pthread_rwlock_t lock;
  kvdex_seq **buckets; /* store->lock; a power of two of them */
  size_t n_buckets;
  size_t n_seqs;
  kvdex_seq *all_head; /* every seq not yet freed, deleted ones included */
};

#define INITIAL_BUCKETS 64
#define MIN_ARRAY_CAP 4

/* ---- small helpers ------------------------------------------------------------- */

static inline uint64_t blocks_for(uint64_t tokens, uint32_t bt) {
  return tokens / bt + (tokens % bt != 0);
}

static inline size_t array_bytes(uint64_t cap) {
  return sizeof(kvdex__blocks) + 2 * (size_t)cap * sizeof(void *);
}

static inline kvdex__head *seq_head(kvdex_seq *seq, uint32_t layer, uint32_t h) {
  return &seq->heads[(size_t)layer * seq->shape.n_kv_heads + h];
}

/* The array the writer works on: the pending copy if there is one. Txn owner only. */
static inline kvdex__blocks *head_cur(kvdex__head *hd) {
  return hd->pending ? hd->pending : atomic_load_explicit(&hd->pub, memory_order_relaxed);
}

static inline size_t block_pair_bytes(const kvdex_seq *seq) { return 2 * seq->block_stride; }

static uint64_t name_hash(const char *ns, const char *id) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (const unsigned char *p = (const unsigned char *)ns; *p; p++) h = (h ^ *p) * 1099511628211ull;
  h = (h ^ 0xff) * 1099511628211ull; /* separator no name byte can equal */
  for (const unsigned char *p = (const unsigned char *)id; *p; p++) h = (h ^ *p) * 1099511628211ull;
  return h;
}

static const char *ns_or_default(const char *ns) {
  return (ns && *ns) ? ns : KVDEX_DEFAULT_NAMESPACE;
}

/* ---- accounting -------------------------------------------------------------- */

/* Reserves n bytes against the cap, or fails with KVDEX_ENOMEM changing nothing. */
static int store_reserve(kvdex_store *st, uint64_t n) {
  uint64_t used = atomic_load_explicit(&st->used, memory_order_relaxed);
  for (;;) {
    if (st->cap && (n > st->cap || used > st->cap - n))
      return kvdex__seterr(KVDEX_ENOMEM,
                           "memory cap of %" PRIu64 " bytes reached: need %" PRIu64
                           " more, %" PRIu64 " used",
                           st->cap, n, used);
    if (atomic_compare_exchange_weak_explicit(&st->used, &used, used + n,
                                              memory_order_relaxed, memory_order_relaxed))
      return KVDEX_OK;
  }
}

static void store_unreserve(kvdex_store *st, uint64_t n) {
  /* only bytes reserved earlier come back, so they are still counted in `used` */
  assert(atomic_load_explicit(&st->used, memory_order_relaxed) >= n);
  atomic_fetch_sub_explicit(&st->used, n, memory_order_relaxed);
}

static int seq_charge(kvdex_seq *seq, uint64_t n) {
  int rc = store_reserve(seq->store, n);
  if (rc == KVDEX_OK) atomic_fetch_add_explicit(&seq->bytes, n, memory_order_relaxed);
  return rc;
}

static void seq_uncharge(kvdex_seq *seq, uint64_t n) {
  assert(atomic_load_explicit(&seq->bytes, memory_order_relaxed) >= n);
  atomic_fetch_sub_explicit(&seq->bytes, n, memory_order_relaxed);
  store_unreserve(seq->store, n);
}

/* ---- store ------------------------------------------------------------------- */

int kvdex_store_create(uint64_t memory_cap, kvdex_store **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "store_create: out is NULL");
  *out = NULL;
  kvdex_store *st = calloc(1, sizeof *st);
  if (!st) return kvdex__seterr(KVDEX_ENOMEM, "store_create: out of memory");
  st->buckets = calloc(INITIAL_BUCKETS, sizeof *st->buckets);
  if (!st->buckets) {
    free(st);
    return kvdex__seterr(KVDEX_ENOMEM, "store_create: out of memory");
  }
  st->n_buckets = INITIAL_BUCKETS;
  st->cap = memory_cap;
  atomic_init(&st->used, 0);
  int rc = pthread_rwlock_init(&st->lock, NULL);
  if (rc != 0) {
    free(st->buckets);
    free(st);
    return kvdex__seterr(KVDEX_EINTERNAL, "store_create: pthread_rwlock_init: %s",
                         strerror(rc));
  }
  rc = kvdex__alloc_create(&st->alloc);
  if (rc != 0) {
    pthread_rwlock_destroy(&st->lock);
    free(st->buckets);
    free(st);
    return kvdex__preerr(rc, "store_create");
  }
  *out = st;
  return KVDEX_OK;
}

static void seq_free(kvdex_seq *seq, bool unlink);

void kvdex_store_destroy(kvdex_store *st) {
  if (!st) return;
  /* Nothing is in flight: free every sequence, referenced or not. */
  kvdex_seq *seq = st->all_head;
  st->all_head = NULL;
  while (seq) {
    kvdex_seq *next = seq->all_next;
    seq_free(seq, false);
    seq = next;
  }
  kvdex__alloc_destroy(st->alloc);
  pthread_rwlock_destroy(&st->lock);
  free(st->buckets);
  free(st);
}

kvdex__alloc *kvdex__store_alloc(kvdex_store *st) { return st->alloc; }

void kvdex_store_stats_get(kvdex_store *st, kvdex_store_stats *out) {
  if (!out) return;
  memset(out, 0, sizeof *out);
  if (!st) return;
  out->bytes_used = atomic_load_explicit(&st->used, memory_order_relaxed);
  out->bytes_cap = st->cap;
  pthread_rwlock_rdlock(&st->lock);
  out->n_sequences = st->n_seqs;
  pthread_rwlock_unlock(&st->lock);
  out->allocator_bytes = kvdex__alloc_live_bytes(st->alloc);
}

static kvdex_seq *find_locked(kvdex_store *st, const char *ns, const char *id, uint64_t hash) {
  for (kvdex_seq *s = st->buckets[hash & (st->n_buckets - 1)]; s; s = s->hash_next)
    if (s->hash == hash && !strcmp(s->id, id) && !strcmp(s->ns, ns)) return s;
  return NULL;
}

/* Doubles the bucket array when the load passes 1; keeps the old one if calloc fails. */
static void maybe_grow_locked(kvdex_store *st) {
  if (st->n_seqs <= st->n_buckets) return;
  size_t nb = st->n_buckets * 2;
  kvdex_seq **b = calloc(nb, sizeof *b);
  if (!b) return;
  for (size_t i = 0; i < st->n_buckets; i++) {
    kvdex_seq *s = st->buckets[i];
    while (s) {
      kvdex_seq *next = s->hash_next;
      s->hash_next = b[s->hash & (nb - 1)];
      b[s->hash & (nb - 1)] = s;
      s = next;
    }
  }
  free(st->buckets);
  st->buckets = b;
  st->n_buckets = nb;
}

/* ---- sequences --------------------------------------------------------------- */

static size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

int kvdex_seq_create(kvdex_store *st, const char *ns, const char *seq_id,
                     const kvdex_shape *shape) {
  return kvdex_seq_create_ex(st, ns, seq_id, shape, 0);
}

int kvdex_seq_create_ex(kvdex_store *st, const char *ns, const char *seq_id,
                        const kvdex_shape *shape, int importing) {
  if (!st) return kvdex__seterr(KVDEX_EINVAL, "seq_create: store is NULL");
  int rc = kvdex__name_check(ns, seq_id);
  if (rc) return kvdex__preerr(rc, "seq_create");
  rc = kvdex__shape_check(shape);
  if (rc) return kvdex__preerr(rc, "seq_create");
  ns = ns_or_default(ns);
  uint64_t hash = name_hash(ns, seq_id);

  pthread_rwlock_rdlock(&st->lock);
  bool exists = find_locked(st, ns, seq_id, hash) != NULL;
  pthread_rwlock_unlock(&st->lock);
  if (exists)
    return kvdex__seterr(KVDEX_EEXIST, "seq_create: sequence %s/%s already exists", ns, seq_id);

  /* One allocation: struct + id, then layers, heads, scratch, attachment slots. */
  size_t id_len = strlen(seq_id);
  size_t n_heads = (size_t)shape->n_layers * shape->n_kv_heads;
  size_t off_layers = align_up(sizeof(kvdex_seq) + id_len + 1, 16);
  size_t off_heads = align_up(off_layers + shape->n_layers * sizeof(kvdex__layer), 16);
  size_t off_scratch = align_up(off_heads + n_heads * sizeof(kvdex__head), 16);
  size_t off_atts = align_up(off_scratch + shape->n_kv_heads * sizeof(kvdex__blocks *), 16);
  size_t meta = off_atts + (size_t)shape->n_layers * KVDEX_ATTACH_SLOTS * sizeof(kvdex_attachment *);

  rc = store_reserve(st, meta);
  if (rc) return kvdex__preerr(rc, "seq_create");
  char *mem = kvdex__alloc_zalloc(st->alloc, meta);
  if (!mem) {
    store_unreserve(st, meta);
    return kvdex__seterr(KVDEX_ENOMEM, "seq_create: allocation of %zu bytes failed", meta);
  }
  kvdex_seq *seq = (kvdex_seq *)mem;
  seq->store = st;
  seq->hash = hash;
  atomic_init(&seq->refs, 1);
  atomic_init(&seq->deleted, false);
  atomic_init(&seq->importing, importing != 0); /* before the map publishes it */
  atomic_init(&seq->txn_active, false);
  atomic_init(&seq->bytes, meta);
  seq->meta_bytes = meta;
  seq->shape = *shape;
  if (seq->shape.block_tokens == 0) seq->shape.block_tokens = KVDEX_DEFAULT_BLOCK_TOKENS;
  seq->row_bytes = (size_t)shape->head_dim * kvdex_dtype_size(shape->dtype);
  seq->block_stride = align_up(seq->row_bytes * seq->shape.block_tokens, KVDEX__ALLOC_ALIGN);
  seq->layers = (kvdex__layer *)(mem + off_layers);
  seq->heads = (kvdex__head *)(mem + off_heads);
  seq->scratch = (kvdex__blocks **)(mem + off_scratch);
  seq->atts = (kvdex_attachment **)(mem + off_atts);
  rc = pthread_mutex_init(&seq->mu, NULL);
  if (rc != 0) {
    kvdex__alloc_free(st->alloc, mem, meta);
    store_unreserve(st, meta);
    return kvdex__seterr(KVDEX_EINTERNAL, "seq_create: pthread_mutex_init: %s", strerror(rc));
  }
  for (uint32_t l = 0; l < shape->n_layers; l++) atomic_init(&seq->layers[l].committed, 0);
  for (size_t i = 0; i < n_heads; i++) atomic_init(&seq->heads[i].pub, NULL);
  snprintf(seq->ns, sizeof seq->ns, "%s", ns);
  memcpy(seq->id, seq_id, id_len + 1);

  pthread_rwlock_wrlock(&st->lock);
  if (find_locked(st, ns, seq_id, hash)) { /* lost a race with another create */
    pthread_rwlock_unlock(&st->lock);
    pthread_mutex_destroy(&seq->mu);
    kvdex__alloc_free(st->alloc, mem, meta);
    store_unreserve(st, meta);
    return kvdex__seterr(KVDEX_EEXIST, "seq_create: sequence %s/%s already exists", ns, seq_id);
  }
  size_t b = hash & (st->n_buckets - 1);
  seq->hash_next = st->buckets[b];
  st->buckets[b] = seq;
  seq->all_next = st->all_head;
  if (st->all_head) st->all_head->all_prev = seq;
  st->all_head = seq;
  st->n_seqs++;
  maybe_grow_locked(st);
  pthread_rwlock_unlock(&st->lock);
  return KVDEX_OK;
}

static void qset_free(kvdex_seq *seq, kvdex__qset *qs);
static void lmset_free(kvdex_seq *seq, kvdex__lmset *ls);
static void att_unref(kvdex_attachment *att);

/* Frees a sequence whose last reference is gone, unlinking it from the all-list
 * (takes store->lock), or, with unlink false, because the store is being destroyed.
 * Returns its bytes to the store. */
static void seq_free(kvdex_seq *seq, bool unlink) {
  kvdex_store *st = seq->store;
  if (unlink) {
    pthread_rwlock_wrlock(&st->lock);
    if (seq->all_prev) seq->all_prev->all_next = seq->all_next;
    else st->all_head = seq->all_next;
    if (seq->all_next) seq->all_next->all_prev = seq->all_prev;
    pthread_rwlock_unlock(&st->lock);
  }
  /* Attachments first: freeing one returns its bytes through seq->bytes. Outside
   * kvdex_store_destroy no get-reference can remain (each holds the sequence); one
   * left at destroy time (calls in flight: a contract breach) is leaked, not freed. */
  size_t n_slots = (size_t)seq->shape.n_layers * KVDEX_ATTACH_SLOTS;
  for (size_t i = 0; i < n_slots; i++) {
    kvdex_attachment *att = seq->atts[i];
    seq->atts[i] = NULL;
    if (att) att_unref(att);
  }
  kvdex__alloc *a = st->alloc;
  const uint32_t bt = seq->shape.block_tokens;
  const size_t pair = block_pair_bytes(seq);
  for (uint32_t l = 0; l < seq->shape.n_layers; l++) {
    qset_free(seq, seq->layers[l].qpub);
    qset_free(seq, seq->layers[l].qpend);
    seq->layers[l].qpub = seq->layers[l].qpend = NULL;
    lmset_free(seq, seq->layers[l].lmpub);
    lmset_free(seq, seq->layers[l].lmpend);
    seq->layers[l].lmpub = seq->layers[l].lmpend = NULL;
    uint64_t nb = blocks_for(seq->layers[l].staged, bt);
    for (uint32_t h = 0; h < seq->shape.n_kv_heads; h++) {
      kvdex__head *hd = seq_head(seq, l, h);
      kvdex__blocks *cur = head_cur(hd);
      for (uint64_t b = 0; b < nb; b++) kvdex__alloc_free(a, cur->ptrs[b], pair);
      kvdex__blocks *pub = atomic_load_explicit(&hd->pub, memory_order_relaxed);
      if (hd->pending) kvdex__alloc_free(a, hd->pending, array_bytes(hd->pending->cap));
      if (pub) kvdex__alloc_free(a, pub, array_bytes(pub->cap));
    }
  }
  for (kvdex__blocks *r = seq->retired; r;) {
    kvdex__blocks *next = r->retired_next;
    kvdex__alloc_free(a, r, array_bytes(r->cap));
    r = next;
  }
  uint64_t bytes = atomic_load_explicit(&seq->bytes, memory_order_relaxed);
  pthread_mutex_destroy(&seq->mu);
  kvdex__alloc_free(a, seq, seq->meta_bytes);
  store_unreserve(st, bytes);
}

void kvdex_seq_release(kvdex_seq *seq) {
  if (!seq) return;
  uint64_t refs = atomic_fetch_sub_explicit(&seq->refs, 1, memory_order_acq_rel);
  assert(refs >= 1); /* a release without its reference */
  if (refs == 1) seq_free(seq, true);
}

void kvdex_seq_retain(kvdex_seq *seq) {
  if (seq) atomic_fetch_add_explicit(&seq->refs, 1, memory_order_relaxed);
}

int kvdex_seq_deleted(const kvdex_seq *seq) {
  return seq && atomic_load_explicit(&seq->deleted, memory_order_acquire);
}

int kvdex_seq_importing(const kvdex_seq *seq) {
  return seq && atomic_load_explicit(&seq->importing, memory_order_acquire);
}

void kvdex_seq_publish(kvdex_seq *seq) {
  if (seq) atomic_store_explicit(&seq->importing, false, memory_order_release);
}

int kvdex_seq_delete(kvdex_store *st, const char *ns, const char *seq_id, uint64_t *bytes_freed) {
  if (bytes_freed) *bytes_freed = 0;
  if (!st) return kvdex__seterr(KVDEX_EINVAL, "seq_delete: store is NULL");
  int rc = kvdex__name_check(ns, seq_id);
  if (rc) return kvdex__preerr(rc, "seq_delete");
  ns = ns_or_default(ns);
  uint64_t hash = name_hash(ns, seq_id);
  pthread_rwlock_wrlock(&st->lock);
  kvdex_seq **pp = &st->buckets[hash & (st->n_buckets - 1)];
  while (*pp && !((*pp)->hash == hash && !strcmp((*pp)->id, seq_id) && !strcmp((*pp)->ns, ns)))
    pp = &(*pp)->hash_next;
  kvdex_seq *seq = *pp;
  if (!seq) {
    pthread_rwlock_unlock(&st->lock);
    return kvdex__seterr(KVDEX_ENOTFOUND, "seq_delete: sequence %s/%s not found", ns, seq_id);
  }
  *pp = seq->hash_next;
  seq->hash_next = NULL;
  st->n_seqs--;
  atomic_store_explicit(&seq->deleted, true, memory_order_release);
  if (bytes_freed) *bytes_freed = atomic_load_explicit(&seq->bytes, memory_order_relaxed);
  pthread_rwlock_unlock(&st->lock);
  kvdex_seq_release(seq); /* the map's reference */
  return KVDEX_OK;
}

int kvdex_seq_open(kvdex_store *st, const char *ns, const char *seq_id, kvdex_seq **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "seq_open: out is NULL");
  *out = NULL;
  if (!st) return kvdex__seterr(KVDEX_EINVAL, "seq_open: store is NULL");
  int rc = kvdex__name_check(ns, seq_id);
  if (rc) return kvdex__preerr(rc, "seq_open");
  ns = ns_or_default(ns);
  uint64_t hash = name_hash(ns, seq_id);
  pthread_rwlock_rdlock(&st->lock);
  kvdex_seq *seq = find_locked(st, ns, seq_id, hash);
  if (seq) atomic_fetch_add_explicit(&seq->refs, 1, memory_order_relaxed);
  pthread_rwlock_unlock(&st->lock);
  if (!seq)
    return kvdex__seterr(KVDEX_ENOTFOUND, "seq_open: sequence %s/%s not found", ns, seq_id);
  *out = seq;
  return KVDEX_OK;
}

const kvdex_shape *kvdex_seq_shape(const kvdex_seq *seq) { return &seq->shape; }
const char *kvdex_seq_namespace(const kvdex_seq *seq) { return seq->ns; }
const char *kvdex_seq_id(const kvdex_seq *seq) { return seq->id; }

uint64_t kvdex_seq_tokens(kvdex_seq *seq, uint32_t layer) {
  if (!seq || layer >= seq->shape.n_layers) return 0;
  return atomic_load_explicit(&seq->layers[layer].committed, memory_order_acquire);
}

uint64_t kvdex_seq_bytes(kvdex_seq *seq) {
  return seq ? atomic_load_explicit(&seq->bytes, memory_order_relaxed) : 0;
}

uint64_t kvdex__seq_block_pair_bytes(const kvdex_seq *seq) { return block_pair_bytes(seq); }

/* The first live sequence at or after s in the all-list (ns filter applied), with a
 * reference taken, or NULL. store->lock held. */
static kvdex_seq *list_next_locked(kvdex_seq *s, const char *ns) {
  for (; s; s = s->all_next) {
    if (atomic_load_explicit(&s->deleted, memory_order_acquire)) continue;
    if (ns && strcmp(s->ns, ns)) continue;
    atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
    return s;
  }
  return NULL;
}

void kvdex_store_list(kvdex_store *st, const char *ns, kvdex_seq_visit_fn fn, void *ctx) {
  if (!st || !fn) return;
  if (ns && !*ns) ns = NULL;
  /* Hand over hand: a referenced seq stays on the all-list, so its all_next is valid
   * under the lock; fn runs with no store lock held and may create or delete. */
  pthread_rwlock_rdlock(&st->lock);
  kvdex_seq *cur = list_next_locked(st->all_head, ns);
  pthread_rwlock_unlock(&st->lock);
  while (cur) {
    fn(ctx, cur);
    pthread_rwlock_rdlock(&st->lock);
    kvdex_seq *next = list_next_locked(cur->all_next, ns);
    pthread_rwlock_unlock(&st->lock);
    kvdex_seq_release(cur);
    cur = next;
  }
}

/* ---- reading ----------------------------------------------------------------- */

int kvdex_seq_view(kvdex_seq *seq, uint32_t layer, uint32_t kv_head, kvdex_kv_view *out) {
  if (!seq || !out) return kvdex__seterr(KVDEX_EINVAL, "seq_view: NULL argument");
  if (layer >= seq->shape.n_layers)
    return kvdex__seterr(KVDEX_EINVAL, "seq_view: layer %u is out of range (n_layers = %u)",
                         layer, seq->shape.n_layers);
  if (kv_head >= seq->shape.n_kv_heads)
    return kvdex__seterr(KVDEX_EINVAL,
                         "seq_view: kv head %u is out of range (n_kv_heads = %u)", kv_head,
                         seq->shape.n_kv_heads);
  uint64_t n = atomic_load_explicit(&seq->layers[layer].committed, memory_order_acquire);
  kvdex__blocks *arr = atomic_load_explicit(&seq_head(seq, layer, kv_head)->pub,
                                            memory_order_acquire);
  out->n_tokens = n;
  out->block_tokens = seq->shape.block_tokens;
  out->head_dim = seq->shape.head_dim;
  out->dtype = seq->shape.dtype;
  out->k_blocks = arr ? (const void *const *)arr->ptrs : NULL;
  out->v_blocks = arr ? (const void *const *)(arr->ptrs + arr->cap) : NULL;
  return KVDEX_OK;
}

int kvdex_seq_read(kvdex_seq *seq, uint32_t layer, const uint64_t *token_ids, size_t n,
                   void *k_out, void *v_out) {
  if (!seq) return kvdex__seterr(KVDEX_EINVAL, "seq_read: sequence is NULL");
  if (layer >= seq->shape.n_layers)
    return kvdex__seterr(KVDEX_EINVAL, "seq_read: layer %u is out of range (n_layers = %u)",
                         layer, seq->shape.n_layers);
  if (n == 0) return KVDEX_OK;
  if (!token_ids) return kvdex__seterr(KVDEX_EINVAL, "seq_read: token_ids is NULL");
  if (!k_out && !v_out)
    return kvdex__seterr(KVDEX_EINVAL, "seq_read: both k_out and v_out are NULL");
  uint64_t committed = atomic_load_explicit(&seq->layers[layer].committed, memory_order_acquire);
  for (size_t i = 0; i < n; i++)
    if (token_ids[i] >= committed)
      return kvdex__seterr(KVDEX_EINVAL,
                           "seq_read: token %" PRIu64 " (index %zu) is beyond the %" PRIu64
                           " committed tokens of layer %u",
                           token_ids[i], i, committed, layer);
  const uint32_t bt = seq->shape.block_tokens;
  const size_t row = seq->row_bytes;
  for (uint32_t h = 0; h < seq->shape.n_kv_heads; h++) {
    kvdex__blocks *arr = atomic_load_explicit(&seq_head(seq, layer, h)->pub,
                                              memory_order_acquire);
    char *kd = k_out ? (char *)k_out + (size_t)h * n * row : NULL;
    char *vd = v_out ? (char *)v_out + (size_t)h * n * row : NULL;
    for (size_t i = 0; i < n; i++) {
      uint64_t b = token_ids[i] / bt;
      size_t off = (size_t)(token_ids[i] % bt) * row;
      if (kd) memcpy(kd + i * row, (const char *)arr->ptrs[b] + off, row);
      if (vd) memcpy(vd + i * row, (const char *)arr->ptrs[arr->cap + b] + off, row);
    }
  }
  return KVDEX_OK;
}

/* ---- append transactions ------------------------------------------------------- */

int kvdex_txn_begin(kvdex_seq *seq, kvdex_txn **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "txn_begin: out is NULL");
  *out = NULL;
  if (!seq) return kvdex__seterr(KVDEX_EINVAL, "txn_begin: sequence is NULL");
  if (atomic_load_explicit(&seq->deleted, memory_order_acquire))
    return kvdex__seterr(KVDEX_ENOTFOUND, "txn_begin: sequence %s/%s was deleted", seq->ns,
                         seq->id);
  bool expected = false;
  if (!atomic_compare_exchange_strong_explicit(&seq->txn_active, &expected, true,
                                               memory_order_acquire, memory_order_relaxed))
    return kvdex__seterr(KVDEX_EBUSY,
                         "txn_begin: sequence %s/%s has another append in progress", seq->ns,
                         seq->id);
  atomic_fetch_add_explicit(&seq->refs, 1, memory_order_relaxed);
  kvdex_txn *txn = &seq->txn;
  txn->seq = seq;
  txn->err = 0;
  txn->errmsg[0] = '\0';
  txn->appended = 0;
  txn->replayed = 0;
  *out = txn;
  return KVDEX_OK;
}

/* Records the first failure (rc with the message already set) and returns rc. */
static int txn_fail(kvdex_txn *txn, int rc) {
  if (txn->err == 0) {
    txn->err = rc;
    snprintf(txn->errmsg, sizeof txn->errmsg, "%s", kvdex_errmsg());
  }
  return rc;
}

/* Compares tokens [s, e) of `layer` (all below the staged length) with the caller's
 * rows; 0 if identical, else KVDEX_ECONFLICT with a message. n: rows per head in k/v. */
static int txn_compare(kvdex_seq *seq, uint32_t layer, uint64_t s, uint64_t e, uint32_t n,
                       const char *k, const char *v) {
  const uint32_t bt = seq->shape.block_tokens;
  const size_t row = seq->row_bytes;
  for (uint32_t h = 0; h < seq->shape.n_kv_heads; h++) {
    kvdex__blocks *arr = head_cur(seq_head(seq, layer, h));
    for (unsigned kv = 0; kv < 2; kv++) {
      const char *src = (kv ? v : k) + (size_t)h * n * row;
      for (uint64_t t = s; t < e;) {
        uint64_t b = t / bt, off = t % bt;
        uint64_t run = bt - off < e - t ? bt - off : e - t;
        const char *blk = (const char *)arr->ptrs[kv * arr->cap + b] + off * row;
        const char *mine = src + (t - s) * row;
        if (memcmp(blk, mine, run * row) != 0) {
          uint64_t i = 0;
          while (memcmp(blk + i * row, mine + i * row, row) == 0) i++;
          return kvdex__seterr(KVDEX_ECONFLICT,
                               "tokens [%" PRIu64 ",%" PRIu64 ") of layer %u differ from "
                               "stored data (first difference: token %" PRIu64
                               ", kv head %u, %s)",
                               s, e, layer, t + i, h, kv ? "V" : "K");
        }
        t += run;
      }
    }
  }
  return KVDEX_OK;
}

/* Allocates what tokens [len, end) of `layer` need, installs it, and copies the rows
 * [len, end) from k/v (rows from token s on). Nothing changes on failure. */
static int txn_grow_and_copy(kvdex_seq *seq, uint32_t layer, uint64_t s, uint64_t len,
                             uint64_t end, uint32_t n, const char *k, const char *v) {
  assert(atomic_load_explicit(&seq->txn_active, memory_order_relaxed));
  assert(s <= len && len < end);
  kvdex__alloc *a = seq->store->alloc;
  const uint32_t bt = seq->shape.block_tokens, nh = seq->shape.n_kv_heads;
  const size_t row = seq->row_bytes, pair = block_pair_bytes(seq);
  const uint64_t nb_old = blocks_for(len, bt), nb_new = blocks_for(end, bt);

  /* 1. What it costs: new block pairs plus grown pointer arrays, reserved up front. */
  uint64_t need = 0, per_head;
  if (__builtin_mul_overflow(nb_new - nb_old, (uint64_t)pair, &per_head) ||
      __builtin_mul_overflow(per_head, (uint64_t)nh, &need))
    return kvdex__seterr(KVDEX_ENOMEM, "append of %u tokens to layer %u: size overflow", n,
                         layer);
  for (uint32_t h = 0; h < nh; h++) {
    kvdex__blocks *cur = head_cur(seq_head(seq, layer, h));
    uint64_t cap = cur ? cur->cap : 0;
    seq->scratch[h] = NULL;
    if (nb_new > cap) {
      uint64_t ncap = cap * 2 > nb_new ? cap * 2 : nb_new;
      if (ncap < MIN_ARRAY_CAP) ncap = MIN_ARRAY_CAP;
      if (ncap > (SIZE_MAX - sizeof(kvdex__blocks)) / (2 * sizeof(void *)) ||
          __builtin_add_overflow(need, (uint64_t)array_bytes(ncap), &need))
        return kvdex__seterr(KVDEX_ENOMEM, "append to layer %u: size overflow", layer);
    }
  }
  int rc = seq_charge(seq, need);
  if (rc) return rc;

  /* 2. Grown arrays (private until commit) into scratch, then the blocks. Invariant:
   * entries at or beyond the staged block count are NULL, which the unwind uses. */
  size_t failed_size = 0;
  for (uint32_t h = 0; h < nh; h++) {
    kvdex__blocks *cur = head_cur(seq_head(seq, layer, h));
    uint64_t cap = cur ? cur->cap : 0;
    if (nb_new <= cap) continue;
    uint64_t ncap = cap * 2 > nb_new ? cap * 2 : nb_new;
    if (ncap < MIN_ARRAY_CAP) ncap = MIN_ARRAY_CAP;
    kvdex__blocks *na = kvdex__alloc_malloc(a, array_bytes(ncap));
    if (!na) {
      failed_size = array_bytes(ncap);
      goto unwind;
    }
    na->retired_next = NULL;
    na->cap = ncap;
    if (nb_old) {
      memcpy(na->ptrs, cur->ptrs, nb_old * sizeof(void *));
      memcpy(na->ptrs + ncap, cur->ptrs + cap, nb_old * sizeof(void *));
    }
    memset(na->ptrs + nb_old, 0, (ncap - nb_old) * sizeof(void *));
    memset(na->ptrs + ncap + nb_old, 0, (ncap - nb_old) * sizeof(void *));
    seq->scratch[h] = na;
  }
  for (uint32_t h = 0; h < nh; h++) {
    kvdex__blocks *tgt = seq->scratch[h] ? seq->scratch[h] : head_cur(seq_head(seq, layer, h));
    for (uint64_t b = nb_old; b < nb_new; b++) {
      assert(tgt->ptrs[b] == NULL && tgt->ptrs[tgt->cap + b] == NULL);
      char *p = kvdex__alloc_malloc(a, pair);
      if (!p) {
        failed_size = pair;
        goto unwind;
      }
      tgt->ptrs[b] = p;
      tgt->ptrs[tgt->cap + b] = p + seq->block_stride;
    }
  }

  /* 3. Install: the grown arrays become the pending ones (a replaced pending array was
   * never published, so it goes at once). */
  for (uint32_t h = 0; h < nh; h++) {
    kvdex__head *hd = seq_head(seq, layer, h);
    if (!seq->scratch[h]) continue;
    if (hd->pending) {
      size_t sz = array_bytes(hd->pending->cap);
      kvdex__alloc_free(a, hd->pending, sz);
      seq_uncharge(seq, sz);
    }
    hd->pending = seq->scratch[h];
    seq->scratch[h] = NULL;
  }

  /* 4. The payload: one memcpy per (head, K/V, block run). */
  for (uint32_t h = 0; h < nh; h++) {
    kvdex__blocks *arr = head_cur(seq_head(seq, layer, h));
    for (unsigned kv = 0; kv < 2; kv++) {
      const char *src = (kv ? v : k) + (size_t)h * n * row;
      for (uint64_t t = len; t < end;) {
        uint64_t b = t / bt, off = t % bt;
        uint64_t run = bt - off < end - t ? bt - off : end - t;
        memcpy((char *)arr->ptrs[kv * arr->cap + b] + off * row, src + (t - s) * row,
               run * row);
        t += run;
      }
    }
  }
  return KVDEX_OK;

unwind:
  for (uint32_t h = 0; h < nh; h++) {
    kvdex__blocks *tgt = seq->scratch[h] ? seq->scratch[h] : head_cur(seq_head(seq, layer, h));
    if (tgt)
      for (uint64_t b = nb_old; b < nb_new && b < tgt->cap; b++) {
        kvdex__alloc_free(a, tgt->ptrs[b], pair);
        tgt->ptrs[b] = tgt->ptrs[tgt->cap + b] = NULL;
      }
    if (seq->scratch[h]) {
      kvdex__alloc_free(a, seq->scratch[h], array_bytes(seq->scratch[h]->cap));
      seq->scratch[h] = NULL;
    }
  }
  seq_uncharge(seq, need);
  return kvdex__seterr(KVDEX_ENOMEM, "out of memory: allocation of %zu bytes failed",
                       failed_size);
}

/* The checks every kind of append starts with, `who` prefixing the message: a
 * transaction that has not failed, on a sequence not deleted, a layer in range and
 * at least one token. All but the first two fail the transaction. */
static int txn_append_check(kvdex_txn *txn, const char *who, uint32_t layer,
                            uint32_t n_tokens) {
  if (!txn) return kvdex__seterr(KVDEX_EINVAL, "%s: transaction is NULL", who);
  kvdex_seq *seq = txn->seq;
  if (txn->err)
    return kvdex__seterr(txn->err, "%s: transaction already failed: %s", who, txn->errmsg);
  if (atomic_load_explicit(&seq->deleted, memory_order_acquire))
    return txn_fail(txn, kvdex__seterr(KVDEX_ENOTFOUND, "%s: sequence %s/%s was deleted", who,
                                       seq->ns, seq->id));
  if (layer >= seq->shape.n_layers)
    return txn_fail(txn, kvdex__seterr(KVDEX_EINVAL,
                                       "%s: layer %u is out of range (n_layers = %u)", who,
                                       layer, seq->shape.n_layers));
  if (n_tokens == 0)
    return txn_fail(txn, kvdex__seterr(KVDEX_EINVAL, "%s: n_tokens is 0", who));
  return KVDEX_OK;
}

int kvdex_txn_append(kvdex_txn *txn, uint32_t layer, uint64_t token_start, uint32_t n_tokens,
                     const void *k, const void *v) {
  int rc = txn_append_check(txn, "append", layer, n_tokens);
  if (rc) return rc;
  kvdex_seq *seq = txn->seq;
  if (!k || !v)
    return txn_fail(txn, kvdex__seterr(KVDEX_EINVAL, "append: %s is NULL", !k ? "k" : "v"));
  uint64_t end;
  if (__builtin_add_overflow(token_start, (uint64_t)n_tokens, &end))
    return txn_fail(txn, kvdex__seterr(KVDEX_EINVAL,
                                       "append: token_start %" PRIu64 " + n_tokens %u overflows",
                                       token_start, n_tokens));
  kvdex__layer *ly = &seq->layers[layer];
  uint64_t len = ly->staged;
  if (token_start > len)
    return txn_fail(txn, kvdex__seterr(KVDEX_ECONFLICT,
                                       "append: gap in layer %u: it has %" PRIu64
                                       " tokens, append starts at %" PRIu64,
                                       layer, len, token_start));
  if (token_start < len) {
    rc = txn_compare(seq, layer, token_start, end < len ? end : len, n_tokens, k, v);
    if (rc) return txn_fail(txn, kvdex__preerr(rc, "append"));
  }
  if (end > len) {
    rc = txn_grow_and_copy(seq, layer, token_start, len, end, n_tokens, k, v);
    if (rc) return txn_fail(txn, kvdex__preerr(rc, "append"));
    ly->staged = end;
    txn->appended += end - len;
    txn->replayed += len - token_start;
  } else {
    txn->replayed += n_tokens;
  }
  return KVDEX_OK;
}

/* Drops everything staged by the transaction. Txn owner only. */
static void txn_rollback(kvdex_txn *txn) {
  kvdex_seq *seq = txn->seq;
  assert(atomic_load_explicit(&seq->txn_active, memory_order_relaxed));
  kvdex__alloc *a = seq->store->alloc;
  const uint32_t bt = seq->shape.block_tokens;
  const size_t pair = block_pair_bytes(seq);
  uint64_t freed = 0;
  for (uint32_t l = 0; l < seq->shape.n_layers; l++) {
    kvdex__layer *ly = &seq->layers[l];
    if (ly->qpend) {
      qset_free(seq, ly->qpend);
      ly->qpend = NULL;
    }
    if (ly->lmpend) {
      lmset_free(seq, ly->lmpend);
      ly->lmpend = NULL;
    }
    ly->lm_staged = ly->lmpub ? ly->lmpub->n : 0; /* rows written past n are ignored */
    uint64_t committed = atomic_load_explicit(&ly->committed, memory_order_relaxed);
    assert(ly->staged >= committed); /* a transaction only adds tokens */
    if (ly->staged == committed) continue;
    uint64_t nb_c = blocks_for(committed, bt), nb_s = blocks_for(ly->staged, bt);
    for (uint32_t h = 0; h < seq->shape.n_kv_heads; h++) {
      kvdex__head *hd = seq_head(seq, l, h);
      kvdex__blocks *cur = head_cur(hd);
      kvdex__blocks *pub = atomic_load_explicit(&hd->pub, memory_order_relaxed);
      for (uint64_t b = nb_c; b < nb_s; b++) {
        kvdex__alloc_free(a, cur->ptrs[b], pair);
        freed += pair;
        cur->ptrs[b] = cur->ptrs[cur->cap + b] = NULL;
        if (pub && pub != cur && b < pub->cap) pub->ptrs[b] = pub->ptrs[pub->cap + b] = NULL;
      }
      if (hd->pending) {
        size_t sz = array_bytes(hd->pending->cap);
        kvdex__alloc_free(a, hd->pending, sz);
        freed += sz;
        hd->pending = NULL;
      }
    }
    ly->staged = committed;
  }
  if (freed) seq_uncharge(seq, freed);
}

/* Ends the transaction: frees the txn slot, then drops its reference (last). */
static void txn_end(kvdex_txn *txn) {
  kvdex_seq *seq = txn->seq;
  txn->seq = NULL;
  atomic_store_explicit(&seq->txn_active, false, memory_order_release);
  kvdex_seq_release(seq);
}

int kvdex_txn_commit(kvdex_txn *txn, kvdex_txn_result *result) {
  if (result) memset(result, 0, sizeof *result);
  if (!txn || !txn->seq) return kvdex__seterr(KVDEX_EINVAL, "commit: transaction is NULL");
  kvdex_seq *seq = txn->seq;
  int rc = txn->err;
  if (rc) {
    kvdex__seterr(rc, "commit: %s", txn->errmsg);
  } else if (atomic_load_explicit(&seq->deleted, memory_order_acquire)) {
    rc = kvdex__seterr(KVDEX_ENOTFOUND, "commit: sequence %s/%s was deleted", seq->ns, seq->id);
  }
  if (rc) {
    txn_rollback(txn);
    txn_end(txn);
    return rc;
  }
  assert(atomic_load_explicit(&seq->txn_active, memory_order_relaxed));
  for (uint32_t l = 0; l < seq->shape.n_layers; l++) {
    kvdex__layer *ly = &seq->layers[l];
    assert(ly->staged >= atomic_load_explicit(&ly->committed, memory_order_relaxed));
    if (ly->qpend) { /* readers copy qpub under seq->mu: the old set goes at once */
      pthread_mutex_lock(&seq->mu);
      kvdex__qset *old = ly->qpub;
      ly->qpub = ly->qpend;
      pthread_mutex_unlock(&seq->mu);
      ly->qpend = NULL;
      qset_free(seq, old);
    }
    if (ly->staged != atomic_load_explicit(&ly->committed, memory_order_relaxed)) {
      for (uint32_t h = 0; h < seq->shape.n_kv_heads; h++) {
        kvdex__head *hd = seq_head(seq, l, h);
        if (!hd->pending) continue;
        kvdex__blocks *old = atomic_load_explicit(&hd->pub, memory_order_relaxed);
        atomic_store_explicit(&hd->pub, hd->pending, memory_order_release);
        hd->pending = NULL;
        if (old) { /* readers may still hold it: kept until the sequence is freed */
          old->retired_next = seq->retired;
          seq->retired = old;
        }
      }
      atomic_store_explicit(&ly->committed, ly->staged, memory_order_release);
    }
    /* Landmarks after their tokens: a reader never sees more landmark blocks than
     * complete committed blocks. Readers copy lmpub under seq->mu: the old set goes. */
    if (ly->lmpend || (ly->lmpub && ly->lmpub->n != ly->lm_staged)) {
      assert(ly->lm_staged <= ly->staged / seq->shape.block_tokens);
      kvdex__lmset *old = NULL;
      pthread_mutex_lock(&seq->mu);
      if (ly->lmpend) {
        old = ly->lmpub;
        ly->lmpub = ly->lmpend;
        ly->lmpend = NULL;
      }
      assert(ly->lm_staged <= ly->lmpub->cap);
      ly->lmpub->n = ly->lm_staged;
      pthread_mutex_unlock(&seq->mu);
      lmset_free(seq, old);
    }
  }
  if (result) {
    result->tokens_appended = txn->appended;
    result->tokens_replayed = txn->replayed;
  }
  txn_end(txn);
  return KVDEX_OK;
}

void kvdex_txn_abort(kvdex_txn *txn) {
  if (!txn || !txn->seq) return;
  txn_rollback(txn);
  txn_end(txn);
}

/* ---- prefill queries ------------------------------------------------------------ */

/* Bytes of the queries of one token: all query heads. */
static inline size_t q_row_bytes(const kvdex_seq *seq) {
  return (size_t)seq->shape.n_q_heads * seq->row_bytes;
}

static void qset_free(kvdex_seq *seq, kvdex__qset *qs) {
  if (!qs) return;
  size_t bytes = qs->bytes;
  kvdex__alloc_free(seq->store->alloc, qs, bytes);
  seq_uncharge(seq, bytes);
}

/* A new empty set with room for cap tokens, charged to seq; NULL with the error set. */
static kvdex__qset *qset_new(kvdex_seq *seq, uint64_t cap, uint64_t stride) {
  size_t qrow = q_row_bytes(seq);
  size_t off_ids = align_up(sizeof(kvdex__qset), 64);
  size_t off_rows = align_up(off_ids + (size_t)cap * sizeof(uint64_t), 64);
  size_t bytes = off_rows + (size_t)cap * qrow;
  if (seq_charge(seq, bytes)) return NULL;
  char *mem = kvdex__alloc_malloc(seq->store->alloc, bytes);
  if (!mem) {
    seq_uncharge(seq, bytes);
    kvdex__seterr(KVDEX_ENOMEM, "out of memory: allocation of %zu bytes failed", bytes);
    return NULL;
  }
  kvdex__qset *qs = (kvdex__qset *)mem;
  qs->stride = stride;
  qs->n = 0;
  qs->cap = cap;
  qs->bytes = bytes;
  qs->ids = (uint64_t *)(mem + off_ids);
  qs->rows = mem + off_rows;
  return qs;
}

/* Index of the first kept id >= t. */
static uint64_t qset_lower(const kvdex__qset *qs, uint64_t t) {
  uint64_t lo = 0, hi = qs ? qs->n : 0;
  while (lo < hi) {
    uint64_t mid = lo + (hi - lo) / 2;
    if (qs->ids[mid] < t) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/* Gathers the rows of token t (all query heads) from the caller's layout
 * [n_q_heads][n][head_dim] (token t = s + i) into dst. */
static void q_gather(const kvdex_seq *seq, const char *q, uint32_t n, uint64_t i, char *dst) {
  size_t row = seq->row_bytes;
  for (uint32_t h = 0; h < seq->shape.n_q_heads; h++)
    memcpy(dst + h * row, q + ((size_t)h * n + i) * row, row);
}

static int q_same(const kvdex_seq *seq, const char *q, uint32_t n, uint64_t i, const char *kept) {
  size_t row = seq->row_bytes;
  for (uint32_t h = 0; h < seq->shape.n_q_heads; h++)
    if (memcmp(kept + h * row, q + ((size_t)h * n + i) * row, row)) return 0;
  return 1;
}

int kvdex_txn_append_q(kvdex_txn *txn, uint32_t layer, uint64_t token_start, uint32_t n_tokens,
                       const void *q) {
  int rc = txn_append_check(txn, "append_q", layer, n_tokens);
  if (rc) return rc;
  kvdex_seq *seq = txn->seq;
  if (!q) return txn_fail(txn, kvdex__seterr(KVDEX_EINVAL, "append_q: q is NULL"));
  kvdex__layer *ly = &seq->layers[layer];
  if (token_start > ly->staged || ly->staged - token_start < n_tokens)
    return txn_fail(txn, kvdex__seterr(KVDEX_EINVAL,
                                       "append_q: queries for tokens [%" PRIu64 ",%" PRIu64
                                       ") of layer %u, which has %" PRIu64
                                       " tokens: append their K and V first",
                                       token_start, token_start + n_tokens, layer, ly->staged));
  const char *src = q;
  const size_t qrow = q_row_bytes(seq);
  kvdex__qset *cur = ly->qpend ? ly->qpend : ly->qpub;
  const uint64_t stride = cur ? cur->stride : 1;
  const uint64_t end = token_start + n_tokens;

  /* 1. Compare the tokens that already have queries; count the new kept ones. */
  uint64_t first = (token_start + stride - 1) / stride * stride, n_new = 0;
  uint64_t pos = qset_lower(cur, first);
  for (uint64_t t = first; t < end; t += stride) {
    while (cur && pos < cur->n && cur->ids[pos] < t) pos++;
    if (cur && pos < cur->n && cur->ids[pos] == t) {
      if (!q_same(seq, src, n_tokens, t - token_start, cur->rows + pos * qrow))
        return txn_fail(txn, kvdex__seterr(KVDEX_ECONFLICT,
                                           "append_q: the queries of token %" PRIu64
                                           " of layer %u differ from the stored ones",
                                           t, layer));
    } else {
      n_new++;
    }
  }
  if (n_new == 0) return KVDEX_OK;

  /* 2. Fast path: the transaction's own copy has room and the new tokens all come
   * after its last one (appends in token order). */
  uint64_t have = cur ? cur->n : 0;
  if (ly->qpend && have + n_new <= ly->qpend->cap &&
      (have == 0 || ly->qpend->ids[have - 1] < first)) {
    kvdex__qset *qs = ly->qpend;
    for (uint64_t t = first; t < end; t += stride) {
      q_gather(seq, src, n_tokens, t - token_start, qs->rows + qs->n * qrow);
      qs->ids[qs->n++] = t;
    }
    return KVDEX_OK;
  }

  /* 3. A new copy: the stride doubles until the sample fits, then merge. */
  uint64_t ns = stride;
  for (;;) {
    uint64_t keep = 0;
    for (uint64_t i = 0; i < have; i++) keep += cur->ids[i] % ns == 0;
    uint64_t f = (token_start + ns - 1) / ns * ns;
    for (uint64_t t = f; t < end; t += ns) {
      uint64_t p = qset_lower(cur, t);
      keep += !(cur && p < cur->n && cur->ids[p] == t);
    }
    if (keep <= KVDEX_MAX_QUERY_TOKENS) {
      uint64_t cap = keep * 2 > 64 ? keep * 2 : 64;
      if (cap > KVDEX_MAX_QUERY_TOKENS) cap = KVDEX_MAX_QUERY_TOKENS;
      if (cap < keep) cap = keep;
      kvdex__qset *qs = qset_new(seq, cap, ns);
      if (!qs) return txn_fail(txn, kvdex__preerr(KVDEX_ENOMEM, "append_q"));
      uint64_t i = 0;
      for (uint64_t t = f;; t += ns) { /* merge the kept old ids and the new tokens */
        bool more_new = t < end;
        while (i < have && (!more_new || cur->ids[i] <= t)) {
          if (cur->ids[i] % ns == 0 && !(more_new && cur->ids[i] == t)) {
            memcpy(qs->rows + qs->n * qrow, cur->rows + i * qrow, qrow);
            qs->ids[qs->n++] = cur->ids[i];
          }
          i++;
        }
        if (!more_new) break;
        q_gather(seq, src, n_tokens, t - token_start, qs->rows + qs->n * qrow);
        qs->ids[qs->n++] = t;
      }
      assert(qs->n == keep && keep <= qs->cap);
      if (ly->qpend) qset_free(seq, ly->qpend);
      ly->qpend = qs;
      return KVDEX_OK;
    }
    ns *= 2;
  }
}

uint64_t kvdex_seq_query_tokens(kvdex_seq *seq, uint32_t layer) {
  if (!seq || layer >= seq->shape.n_layers) return 0;
  pthread_mutex_lock(&seq->mu);
  uint64_t n = seq->layers[layer].qpub ? seq->layers[layer].qpub->n : 0;
  pthread_mutex_unlock(&seq->mu);
  return n;
}

int kvdex_seq_queries(kvdex_seq *seq, uint32_t layer, uint32_t q_head0, uint32_t n_heads,
                      float **out, uint64_t *n_tokens, uint64_t **ids) {
  if (out) *out = NULL;
  if (n_tokens) *n_tokens = 0;
  if (ids) *ids = NULL;
  if (!seq || !out || !n_tokens) return kvdex__seterr(KVDEX_EINVAL, "seq_queries: NULL argument");
  if (layer >= seq->shape.n_layers)
    return kvdex__seterr(KVDEX_EINVAL, "seq_queries: layer %u is out of range (n_layers = %u)",
                         layer, seq->shape.n_layers);
  if (n_heads == 0 || q_head0 >= seq->shape.n_q_heads ||
      n_heads > seq->shape.n_q_heads - q_head0)
    return kvdex__seterr(KVDEX_EINVAL,
                         "seq_queries: query heads [%u,%u+%u) are out of range (n_q_heads = %u)",
                         q_head0, q_head0, n_heads, seq->shape.n_q_heads);
  const size_t d = seq->shape.head_dim, qrow = q_row_bytes(seq);
  int rc = KVDEX_OK;
  pthread_mutex_lock(&seq->mu);
  kvdex__qset *qs = seq->layers[layer].qpub;
  uint64_t n = qs ? qs->n : 0;
  float *f = NULL;
  uint64_t *idc = NULL;
  if (n) {
    f = malloc((size_t)n_heads * n * d * sizeof(float));
    if (ids) idc = malloc(n * sizeof(uint64_t));
    if (!f || (ids && !idc)) {
      rc = kvdex__seterr(KVDEX_ENOMEM, "seq_queries: out of memory for %" PRIu64 " queries", n);
    } else {
      for (uint32_t h = 0; h < n_heads; h++)
        for (uint64_t i = 0; i < n; i++)
          kvdex__to_f32(seq->shape.dtype, qs->rows + i * qrow + (size_t)(q_head0 + h) * seq->row_bytes,
                       f + ((size_t)h * n + i) * d, d);
      if (idc) memcpy(idc, qs->ids, n * sizeof(uint64_t));
    }
  }
  pthread_mutex_unlock(&seq->mu);
  if (rc) {
    free(f);
    free(idc);
    return rc;
  }
  *out = f;
  *n_tokens = n;
  if (ids) *ids = idc;
  return KVDEX_OK;
}

/* ---- landmarks -------------------------------------------------------------------- */

static void lmset_free(kvdex_seq *seq, kvdex__lmset *ls) {
  if (!ls) return;
  size_t bytes = ls->bytes;
  kvdex__alloc_free(seq->store->alloc, ls, bytes);
  seq_uncharge(seq, bytes);
}

/* A new set with room for cap blocks per kv head (n = 0), charged to seq; NULL with
 * the error set. */
static kvdex__lmset *lmset_new(kvdex_seq *seq, uint64_t cap) {
  size_t off_rows = align_up(sizeof(kvdex__lmset), 64);
  size_t per_block = (size_t)seq->shape.n_kv_heads * seq->row_bytes, bytes;
  if (cap > (SIZE_MAX - off_rows) / per_block) {
    kvdex__seterr(KVDEX_ENOMEM, "landmarks of %" PRIu64 " blocks: size overflow", cap);
    return NULL;
  }
  bytes = off_rows + (size_t)cap * per_block;
  if (seq_charge(seq, bytes)) return NULL;
  char *mem = kvdex__alloc_malloc(seq->store->alloc, bytes);
  if (!mem) {
    seq_uncharge(seq, bytes);
    kvdex__seterr(KVDEX_ENOMEM, "out of memory: allocation of %zu bytes failed", bytes);
    return NULL;
  }
  kvdex__lmset *ls = (kvdex__lmset *)mem;
  ls->n = 0;
  ls->cap = cap;
  ls->bytes = bytes;
  ls->rows = mem + off_rows;
  return ls;
}

static inline char *lm_row(const kvdex_seq *seq, const kvdex__lmset *ls, uint32_t h, uint64_t b) {
  return ls->rows + ((size_t)h * ls->cap + b) * seq->row_bytes;
}

/* Index of the first non-finite element of n elements of dtype at p, or n. */
static size_t first_nonfinite(int dtype, const char *p, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (dtype == KVDEX_DTYPE_F32) {
      uint32_t x;
      memcpy(&x, p + 4 * i, 4);
      if ((x & 0x7f800000u) == 0x7f800000u) return i;
    } else {
      uint16_t x;
      memcpy(&x, p + 2 * i, 2);
      uint16_t exp = dtype == KVDEX_DTYPE_F16 ? 0x7c00 : 0x7f80;
      if ((x & exp) == exp) return i;
    }
  }
  return n;
}

int kvdex_txn_append_landmarks(kvdex_txn *txn, uint32_t layer, uint64_t token_start,
                               uint32_t n_tokens, const void *landmarks) {
  int rc = txn_append_check(txn, "append_landmarks", layer, n_tokens);
  if (rc) return rc;
  kvdex_seq *seq = txn->seq;
  kvdex__layer *ly = &seq->layers[layer];
  if (token_start > ly->staged || ly->staged - token_start < n_tokens)
    return txn_fail(txn, kvdex__seterr(KVDEX_EINVAL,
                                       "append_landmarks: landmarks for tokens [%" PRIu64
                                       ",%" PRIu64 ") of layer %u, which has %" PRIu64
                                       " tokens: append their K and V first",
                                       token_start, token_start + n_tokens, layer, ly->staged));
  const uint32_t B = seq->shape.block_tokens, nh = seq->shape.n_kv_heads;
  const uint64_t b0 = token_start / B, b1 = (token_start + n_tokens) / B, nb = b1 - b0;
  if (nb == 0) return KVDEX_OK; /* no block ends in this range */
  if (!landmarks)
    return txn_fail(txn, kvdex__seterr(KVDEX_EINVAL,
                                       "append_landmarks: landmarks is NULL, but blocks "
                                       "[%" PRIu64 ",%" PRIu64 ") end in tokens [%" PRIu64
                                       ",%" PRIu64 ")",
                                       b0, b1, token_start, token_start + n_tokens));
  const char *src = landmarks;
  const size_t row = seq->row_bytes, d = seq->shape.head_dim;
  for (uint32_t h = 0; h < nh; h++)
    for (uint64_t i = 0; i < nb; i++) {
      size_t bad = first_nonfinite(seq->shape.dtype, src + ((size_t)h * nb + i) * row, d);
      if (bad < d)
        return txn_fail(txn, kvdex__seterr(KVDEX_EINVAL,
                                           "append_landmarks: the landmark of block %" PRIu64
                                           " (kv head %u) of layer %u has a non-finite "
                                           "element at dim %zu",
                                           b0 + i, h, layer, bad));
    }
  const uint64_t have = ly->lm_staged;
  kvdex__lmset *cur = ly->lmpend ? ly->lmpend : ly->lmpub;

  /* 1. Blocks that have a landmark: replays must be identical. */
  for (uint64_t b = b0; b < b1 && b < have; b++)
    for (uint32_t h = 0; h < nh; h++)
      if (memcmp(lm_row(seq, cur, h, b), src + ((size_t)h * nb + (b - b0)) * row, row))
        return txn_fail(txn, kvdex__seterr(KVDEX_ECONFLICT,
                                           "append_landmarks: the landmark of block %" PRIu64
                                           " (kv head %u) of layer %u differs from the "
                                           "stored one",
                                           b, h, layer));
  if (b1 <= have) return KVDEX_OK;
  if (b0 > have)
    return txn_fail(txn, kvdex__seterr(KVDEX_ECONFLICT,
                                       "append_landmarks: layer %u has landmarks for blocks "
                                       "[0,%" PRIu64 ") only, these are for blocks [%" PRIu64
                                       ",%" PRIu64 "): blocks [%" PRIu64 ",%" PRIu64
                                       ") (tokens [%" PRIu64 ",%" PRIu64
                                       ")) were appended without landmarks; landmarks must "
                                       "cover every block from block 0: re-send those tokens "
                                       "with their landmarks first",
                                       layer, have, b0, b1, have, b0, have * B, b0 * B));

  /* 2. Room: the rows past the committed count are the transaction's to write, in
   * place; otherwise a grown copy (doubling), which commit swaps in. */
  if (!cur || cur->cap < b1) {
    uint64_t ncap = cur && cur->cap * 2 > b1 ? cur->cap * 2 : b1;
    if (ncap < 16) ncap = 16;
    kvdex__lmset *ls = lmset_new(seq, ncap);
    if (!ls) return txn_fail(txn, kvdex__preerr(KVDEX_ENOMEM, "append_landmarks"));
    if (have)
      for (uint32_t h = 0; h < nh; h++)
        memcpy(lm_row(seq, ls, h, 0), lm_row(seq, cur, h, 0), (size_t)have * row);
    if (ly->lmpend) lmset_free(seq, ly->lmpend);
    ly->lmpend = ls;
    cur = ls;
  }

  /* 3. The new rows. */
  assert(cur->cap >= b1 && b1 <= ly->staged / B);
  for (uint32_t h = 0; h < nh; h++)
    memcpy(lm_row(seq, cur, h, have), src + ((size_t)h * nb + (have - b0)) * row,
           (size_t)(b1 - have) * row);
  ly->lm_staged = b1;
  return KVDEX_OK;
}

uint64_t kvdex_seq_landmark_blocks(kvdex_seq *seq, uint32_t layer) {
  if (!seq || layer >= seq->shape.n_layers) return 0;
  pthread_mutex_lock(&seq->mu);
  uint64_t n = seq->layers[layer].lmpub ? seq->layers[layer].lmpub->n : 0;
  pthread_mutex_unlock(&seq->mu);
  return n;
}

int kvdex_seq_landmarks(kvdex_seq *seq, uint32_t layer, uint32_t kv_head, uint64_t max_blocks,
                        float *out, uint64_t *n_blocks) {
  if (n_blocks) *n_blocks = 0;
  if (!seq || !n_blocks || (!out && max_blocks))
    return kvdex__seterr(KVDEX_EINVAL, "seq_landmarks: NULL argument");
  if (layer >= seq->shape.n_layers)
    return kvdex__seterr(KVDEX_EINVAL,
                         "seq_landmarks: layer %u is out of range (n_layers = %u)", layer,
                         seq->shape.n_layers);
  if (kv_head >= seq->shape.n_kv_heads)
    return kvdex__seterr(KVDEX_EINVAL,
                         "seq_landmarks: kv head %u is out of range (n_kv_heads = %u)", kv_head,
                         seq->shape.n_kv_heads);
  const size_t d = seq->shape.head_dim;
  pthread_mutex_lock(&seq->mu);
  const kvdex__lmset *ls = seq->layers[layer].lmpub;
  uint64_t n = ls ? ls->n : 0;
  if (n > max_blocks) n = max_blocks;
  if (n) kvdex__to_f32(seq->shape.dtype, lm_row(seq, ls, kv_head, 0), out, (size_t)n * d);
  pthread_mutex_unlock(&seq->mu);
  *n_blocks = n;
  return KVDEX_OK;
}

/* ---- attachments ---------------------------------------------------------------- */

/* Drops one reference; the last frees the object and returns its bytes. */
static void att_unref(kvdex_attachment *att) {
  uint64_t refs = atomic_fetch_sub_explicit(&att->refs, 1, memory_order_acq_rel);
  assert(refs >= 1);
  if (refs != 1) return;
  if (att->free_fn) att->free_fn(att->obj);
  if (att->bytes) seq_uncharge(att->seq, att->bytes);
  free(att);
}

static int attach_common(kvdex_seq *seq, uint32_t layer, uint32_t slot, bool check,
                         const void *expect, void *obj, uint64_t bytes,
                         kvdex_attach_free_fn free_fn) {
  if (!seq) return kvdex__seterr(KVDEX_EINVAL, "seq_attach: sequence is NULL");
  if (layer >= seq->shape.n_layers || slot >= KVDEX_ATTACH_SLOTS)
    return kvdex__seterr(KVDEX_EINVAL,
                         "seq_attach: layer %u / slot %u out of range (n_layers = %u, %d slots)",
                         layer, slot, seq->shape.n_layers, KVDEX_ATTACH_SLOTS);
  if (!obj && bytes)
    return kvdex__seterr(KVDEX_EINVAL, "seq_attach: %" PRIu64 " bytes for a NULL object", bytes);
  kvdex_attachment *att = NULL;
  if (obj) {
    att = malloc(sizeof *att);
    if (!att) return kvdex__seterr(KVDEX_ENOMEM, "seq_attach: out of memory");
    atomic_init(&att->refs, 1);
    att->seq = seq;
    att->obj = obj;
    att->bytes = bytes;
    att->free_fn = free_fn;
    if (bytes && seq_charge(seq, bytes)) {
      free(att);
      return kvdex__preerr(KVDEX_ENOMEM, "seq_attach");
    }
  }
  kvdex_attachment **p = &seq->atts[(size_t)layer * KVDEX_ATTACH_SLOTS + slot];
  int rc = KVDEX_OK;
  kvdex_attachment *old = NULL;
  pthread_mutex_lock(&seq->mu);
  if (atomic_load_explicit(&seq->deleted, memory_order_acquire)) {
    rc = kvdex__seterr(KVDEX_ENOTFOUND, "seq_attach: sequence %s/%s was deleted", seq->ns,
                       seq->id);
  } else if (check && (*p ? (*p)->obj : NULL) != expect) {
    rc = kvdex__seterr(KVDEX_ECONFLICT,
                       "seq_attach: slot %u of layer %u does not hold the expected object",
                       slot, layer);
  } else {
    old = *p;
    *p = att;
  }
  pthread_mutex_unlock(&seq->mu);
  if (rc) {
    if (att) {
      if (bytes) seq_uncharge(seq, bytes);
      free(att);
    }
    return rc;
  }
  if (old) att_unref(old);
  return KVDEX_OK;
}

int kvdex_seq_attach(kvdex_seq *seq, uint32_t layer, uint32_t slot, void *obj, uint64_t bytes,
                     kvdex_attach_free_fn free_fn) {
  return attach_common(seq, layer, slot, false, NULL, obj, bytes, free_fn);
}

int kvdex_seq_attach_if(kvdex_seq *seq, uint32_t layer, uint32_t slot, const void *expect,
                        void *obj, uint64_t bytes, kvdex_attach_free_fn free_fn) {
  return attach_common(seq, layer, slot, true, expect, obj, bytes, free_fn);
}

int kvdex_attachment_get(kvdex_seq *seq, uint32_t layer, uint32_t slot, kvdex_attachment **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "attachment_get: out is NULL");
  *out = NULL;
  if (!seq) return kvdex__seterr(KVDEX_EINVAL, "attachment_get: sequence is NULL");
  if (layer >= seq->shape.n_layers || slot >= KVDEX_ATTACH_SLOTS)
    return kvdex__seterr(KVDEX_EINVAL,
                         "attachment_get: layer %u / slot %u out of range (n_layers = %u, %d "
                         "slots)",
                         layer, slot, seq->shape.n_layers, KVDEX_ATTACH_SLOTS);
  pthread_mutex_lock(&seq->mu);
  kvdex_attachment *att = seq->atts[(size_t)layer * KVDEX_ATTACH_SLOTS + slot];
  if (att) { /* the reference also holds the sequence, which att_unref may touch */
    atomic_fetch_add_explicit(&att->refs, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&seq->refs, 1, memory_order_relaxed);
  }
  pthread_mutex_unlock(&seq->mu);
  *out = att;
  return KVDEX_OK;
}

void *kvdex_attachment_obj(const kvdex_attachment *att) { return att ? att->obj : NULL; }

uint64_t kvdex_attachment_bytes(const kvdex_attachment *att) { return att ? att->bytes : 0; }

void kvdex_attachment_release(kvdex_attachment *att) {
  if (!att) return;
  kvdex_seq *seq = att->seq;
  att_unref(att);
  kvdex_seq_release(seq);
}
