/* cluster_admin.c — administration of a cluster handle: the hints of writes an owner
 * missed and the thread that re-sends them (auto_repair_ms), and what `kvdex cluster`
 * asks: status (a snapshot of every node's sequences, placed by the ring), repair and
 * rebalance (copies to owners, deletes on non-owners), owners, checksums. The data
 * path is cluster.c; it only records hints here.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "client/cluster_int.h"

/* ---- hints ------------------------------------------------------------------------ */

static void *repair_main(void *arg);

static void hint_add(kvdex__cluster *c, const kvdex__cl_node *nd, const char *ns, const char *id) {
  pthread_mutex_lock(&c->hint_mu);
  for (size_t i = 0; i < c->n_hints; i++) {
    kvdex__cl_hint *h = &c->hints[i];
    if (!strcmp(h->addr, nd->addr) && !strcmp(h->ns, ns) && !strcmp(h->id, id)) goto out;
  }
  if (c->n_hints == c->cap_hints) {
    size_t cap = c->cap_hints ? c->cap_hints * 2 : 16;
    kvdex__cl_hint *grown = realloc(c->hints, cap * sizeof *grown);
    if (!grown) goto out; /* a lost hint only delays a repair that status finds anyway */
    c->hints = grown;
    c->cap_hints = cap;
  }
  kvdex__cl_hint *h = &c->hints[c->n_hints++];
  snprintf(h->addr, sizeof h->addr, "%s", nd->addr);
  snprintf(h->ns, sizeof h->ns, "%s", ns);
  snprintf(h->id, sizeof h->id, "%s", id);
  if (c->auto_repair_ms && !c->repair_started && !c->closing)
    c->repair_started = pthread_create(&c->repair_th, NULL, repair_main, c) == 0;
out:
  pthread_mutex_unlock(&c->hint_mu);
}

int kvdex__cl_hint_has(kvdex__cluster *c, const kvdex__cl_node *nd, const char *ns,
                       const char *id) {
  int found = 0;
  pthread_mutex_lock(&c->hint_mu);
  for (size_t i = 0; i < c->n_hints && !found; i++) {
    const kvdex__cl_hint *h = &c->hints[i];
    found = !strcmp(h->addr, nd->addr) && !strcmp(h->ns, ns) && !strcmp(h->id, id);
  }
  pthread_mutex_unlock(&c->hint_mu);
  return found;
}

void kvdex__cl_hint_drop(kvdex__cluster *c, const char *addr, const char *ns, const char *id) {
  pthread_mutex_lock(&c->hint_mu);
  size_t w = 0;
  for (size_t i = 0; i < c->n_hints; i++) {
    const kvdex__cl_hint *h = &c->hints[i];
    int match = (!addr || !strcmp(h->addr, addr)) && !strcmp(h->ns, ns) && !strcmp(h->id, id);
    if (!match) c->hints[w++] = c->hints[i];
  }
  c->n_hints = w;
  pthread_mutex_unlock(&c->hint_mu);
}

void kvdex__cl_replica_missed(kvdex__cluster *c, kvdex__cl_node *nd, const char *what,
                              const char *id, const char *why) {
  hint_add(c, nd, c->base.ns, id);
  KVDEX_LOG(KVDEX_LOG_WARN,
            "kvdex cluster: replica %s missed %s of %s/%s (%s); the sequence is "
            "under-replicated until `kvdex cluster repair`",
            nd->addr, what, c->base.ns, id, why ? why : kvdex_errmsg());
}

/* Re-sends one hinted sequence to the owner that missed writes, from another owner
 * that has it (the copy brings a lagging copy up to date, or makes a new one hidden
 * until complete). 1 = done (or nothing left to do), 0 = try again later. */
static int repair_hint(kvdex__cluster *c, const kvdex__cl_hint *h) {
  kvdex__cl_node *dst = kvdex__cl_node_by_addr(c, h->addr);
  if (!dst) return 1; /* no longer a node (DNS): nothing to repair there */
  if (kvdex__cl_node_skipped(dst, kvdex__now_ms())) return 0;
  kvdex__cl_node *r[KVDEX__MAX_NODES];
  size_t n = kvdex__cl_rank(c, h->ns, h->id, r);
  int tried = 0, missing = 0;
  for (size_t i = 0; i < n; i++) {
    if (r[i] == dst || kvdex__cl_node_skipped(r[i], kvdex__now_ms()) ||
        kvdex__cl_hint_has(c, r[i], h->ns, h->id))
      continue;
    tried++;
    int rc = kvdex__grpc_copy_seq(r[i]->db, dst->db, h->ns, h->id, NULL, NULL, NULL);
    if (rc == KVDEX_OK) {
      KVDEX_LOG(KVDEX_LOG_INFO, "kvdex cluster: repaired %s/%s on %s from %s", h->ns, h->id,
                dst->addr, r[i]->addr);
      return 1;
    }
    if (rc == KVDEX_ENOTFOUND && strstr(kvdex_errmsg(), "source")) {
      missing++;
      continue;
    }
    KVDEX_LOG(KVDEX_LOG_DEBUG, "kvdex cluster: repair of %s/%s on %s: %s", h->ns, h->id,
              dst->addr, kvdex_errmsg());
    return 0;
  }
  return tried > 0 && missing == tried; /* deleted everywhere: drop the kvdex__cl_hint */
}

/* The repair thread: every auto_repair_ms, re-sends the hinted sequences whose owner
 * answers again. Started with the first hint, stopped by close. */
static void *repair_main(void *arg) {
  kvdex__cluster *c = arg;
  pthread_mutex_lock(&c->hint_mu);
  while (!c->closing) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t ns = ts.tv_nsec + (c->auto_repair_ms % 1000) * 1000000;
    ts.tv_sec += c->auto_repair_ms / 1000 + ns / 1000000000;
    ts.tv_nsec = ns % 1000000000;
    pthread_cond_timedwait(&c->repair_cv, &c->hint_mu, &ts);
    if (c->closing || c->n_hints == 0) continue;
    size_t n = c->n_hints;
    kvdex__cl_hint *pending = malloc(n * sizeof *pending);
    if (!pending) continue;
    memcpy(pending, c->hints, n * sizeof *pending);
    pthread_mutex_unlock(&c->hint_mu);
    for (size_t i = 0; i < n; i++) {
      pthread_mutex_lock(&c->hint_mu);
      int closing = c->closing;
      pthread_mutex_unlock(&c->hint_mu);
      if (closing) break;
      const kvdex__cl_hint *h = &pending[i];
      if (repair_hint(c, h)) kvdex__cl_hint_drop(c, h->addr, h->ns, h->id);
    }
    free(pending);
    pthread_mutex_lock(&c->hint_mu);
  }
  pthread_mutex_unlock(&c->hint_mu);
  return NULL;
}

void kvdex__cl_repair_stop(kvdex__cluster *c) {
  pthread_mutex_lock(&c->hint_mu);
  c->closing = 1;
  int started = c->repair_started;
  pthread_cond_signal(&c->repair_cv);
  pthread_mutex_unlock(&c->hint_mu);
  if (started) pthread_join(c->repair_th, NULL);
}

/* ---- cluster status, repair, rebalance ----------------------------------------------- */

typedef struct copy_at {
  const kvdex__node_seq *s;
  size_t node; /* index into the snapshot */
} copy_at;

/* What every node holds, taken once. */
typedef struct snapshot {
  size_t n;
  kvdex__cl_node **nodes;
  kvdex__node_list *lists;
  int *up;
  char (*err)[256];
  copy_at *copies; /* every (sequence, node) copy, sorted by (ns, id, node) */
  size_t n_copies;
} snapshot;

static void snapshot_free(snapshot *s) {
  for (size_t i = 0; i < s->n; i++) kvdex__node_list_free(&s->lists[i]);
  free(s->nodes);
  free(s->lists);
  free(s->up);
  free(s->err);
  free(s->copies);
  memset(s, 0, sizeof *s);
}

static int cmp_copy(const void *a, const void *b) {
  const copy_at *x = a, *y = b;
  int d = strcmp(x->s->ns, y->s->ns);
  if (!d) d = strcmp(x->s->id, y->s->id);
  if (!d) d = x->node < y->node ? -1 : x->node > y->node;
  return d;
}

static int snapshot_take(kvdex__cluster *c, snapshot *s) {
  memset(s, 0, sizeof *s);
  kvdex__cl_maybe_resolve(c);
  pthread_rwlock_rdlock(&c->mu);
  s->n = c->n_nodes;
  s->nodes = malloc((s->n ? s->n : 1) * sizeof *s->nodes);
  if (s->nodes) memcpy(s->nodes, c->nodes, s->n * sizeof *s->nodes);
  pthread_rwlock_unlock(&c->mu);
  s->lists = calloc(s->n + 1, sizeof *s->lists);
  s->up = calloc(s->n + 1, sizeof *s->up);
  s->err = calloc(s->n + 1, sizeof *s->err);
  if (!s->nodes || !s->lists || !s->up || !s->err) goto oom;
  size_t total = 0;
  for (size_t i = 0; i < s->n; i++) {
    kvdex__cl_node *nd = s->nodes[i];
    if (!nd->db) {
      snprintf(s->err[i], sizeof s->err[i], "%s", nd->open_err);
      continue;
    }
    int rc = kvdex__grpc_list_node(nd->db, "", &s->lists[i]);
    kvdex__cl_node_result(nd, rc);
    if (rc) {
      snprintf(s->err[i], sizeof s->err[i], "%s", kvdex_errmsg());
      memset(&s->lists[i], 0, sizeof s->lists[i]);
      continue;
    }
    s->up[i] = 1;
    total += s->lists[i].n;
  }
  s->copies = malloc((total ? total : 1) * sizeof *s->copies);
  if (!s->copies) goto oom;
  for (size_t i = 0; i < s->n; i++)
    for (size_t j = 0; j < s->lists[i].n; j++)
      s->copies[s->n_copies++] = (copy_at){&s->lists[i].seqs[j], i};
  qsort(s->copies, s->n_copies, sizeof *s->copies, cmp_copy);
  return KVDEX_OK;
oom:
  snapshot_free(s);
  return kvdex__seterr(KVDEX_ENOMEM, "cluster: out of memory");
}

static int same_seq(const copy_at *a, const copy_at *b) {
  return !strcmp(a->s->ns, b->s->ns) && !strcmp(a->s->id, b->s->id);
}

/* Distinct sequences in the snapshot. */
static size_t count_runs(const snapshot *s) {
  size_t runs = 0;
  for (size_t k = 0; k < s->n_copies; k++)
    runs += k == 0 || !same_seq(&s->copies[k - 1], &s->copies[k]);
  return runs;
}

static size_t snap_index(const snapshot *s, const kvdex__cl_node *nd) {
  for (size_t i = 0; i < s->n; i++)
    if (s->nodes[i] == nd) return i;
  return SIZE_MAX;
}

/* One sequence's placement, computed from a run of copies. */
typedef struct placement {
  const char *ns, *id;
  kvdex__cl_node *owners[KVDEX__MAX_REPLICAS];
  size_t n_owners;
  const kvdex__node_seq *at[KVDEX__MAX_NODES]; /* per snapshot node: its copy or NULL */
  uint64_t max_tokens;
  size_t src;      /* a node with a complete visible copy (an owner if one has it) */
  size_t owners_ok, misplaced;
} placement;

static int complete(const placement *p, size_t i) {
  return p->at[i] && !p->at[i]->importing && p->at[i]->total_tokens == p->max_tokens;
}

static void place(kvdex__cluster *c, const snapshot *s, const copy_at *run, size_t n_run,
                  placement *p) {
  memset(p, 0, sizeof *p);
  p->ns = run[0].s->ns;
  p->id = run[0].s->id;
  for (size_t k = 0; k < n_run; k++) {
    p->at[run[k].node] = run[k].s;
    if (!run[k].s->importing && run[k].s->total_tokens > p->max_tokens)
      p->max_tokens = run[k].s->total_tokens;
  }
  kvdex__cl_node *r[KVDEX__MAX_NODES];
  size_t n = kvdex__cl_rank(c, p->ns, p->id, r);
  p->n_owners = kvdex__cl_n_owners(c, n);
  memcpy(p->owners, r, p->n_owners * sizeof *r);
  p->src = SIZE_MAX;
  int owner_of[KVDEX__MAX_NODES] = {0};
  for (size_t o = 0; o < p->n_owners; o++) {
    size_t i = snap_index(s, p->owners[o]);
    if (i == SIZE_MAX) continue;
    owner_of[i] = 1;
    if (s->up[i] && complete(p, i)) {
      p->owners_ok++;
      if (p->src == SIZE_MAX) p->src = i;
    }
  }
  for (size_t i = 0; i < s->n; i++) {
    if (!owner_of[i] && p->at[i] && !p->at[i]->importing) p->misplaced++;
    if (p->src == SIZE_MAX && s->up[i] && complete(p, i)) p->src = i;
  }
}

static void join_addrs(char *buf, size_t size, kvdex__cl_node *const *nodes, size_t n) {
  size_t off = 0;
  buf[0] = '\0';
  for (size_t i = 0; i < n && off < size; i++) {
    int w = snprintf(buf + off, size - off, "%s%s", i ? "," : "", nodes[i]->addr);
    if (w < 0) break;
    off += (size_t)w;
  }
}

void kvdex_cluster_report_free(kvdex_cluster_report *r) {
  if (!r) return;
  free(r->nodes);
  free(r->seqs);
  r->nodes = NULL;
  r->seqs = NULL;
  r->n_nodes = r->n_seqs = 0;
}

/* Fills out from a snapshot (verify: checksum complete copies). */
static int report_fill(kvdex__cluster *c, const snapshot *s, int verify,
                       kvdex_cluster_report *out) {
  memset(out, 0, sizeof *out);
  out->nodes = calloc(s->n + 1, sizeof *out->nodes);
  size_t runs = count_runs(s);
  out->seqs = calloc(runs + 1, sizeof *out->seqs);
  if (!out->nodes || !out->seqs) {
    kvdex_cluster_report_free(out);
    return kvdex__seterr(KVDEX_ENOMEM, "cluster status: out of memory");
  }
  int64_t now = kvdex__now_ms();
  out->n_nodes = s->n;
  for (size_t i = 0; i < s->n; i++) {
    kvdex_cluster_node *rn = &out->nodes[i];
    snprintf(rn->addr, sizeof rn->addr, "%s", s->nodes[i]->addr);
    rn->up = s->up[i];
    rn->breaker_open = atomic_load(&s->nodes[i]->open_until) > now;
    snprintf(rn->error, sizeof rn->error, "%s", s->err[i]);
    rn->bytes_used = s->lists[i].bytes_used;
    rn->bytes_cap = s->lists[i].bytes_cap;
    for (size_t j = 0; j < s->lists[i].n; j++) {
      if (s->lists[i].seqs[j].importing)
        rn->importing++;
      else
        rn->sequences++;
    }
  }
  for (size_t k = 0; k < s->n_copies;) {
    size_t e = k + 1;
    while (e < s->n_copies && same_seq(&s->copies[e], &s->copies[k])) e++;
    placement p;
    place(c, s, s->copies + k, e - k, &p);
    kvdex_cluster_seq *q = &out->seqs[out->n_seqs++];
    snprintf(q->ns, sizeof q->ns, "%s", p.ns);
    snprintf(q->id, sizeof q->id, "%s", p.id);
    q->tokens = p.max_tokens;
    q->n_owners = (uint32_t)p.n_owners;
    q->owners_ok = (uint32_t)p.owners_ok;
    q->misplaced = (uint32_t)p.misplaced;
    join_addrs(q->owners, sizeof q->owners, p.owners, p.n_owners);
    size_t off = 0;
    uint64_t first_sum = 0;
    int have_sum = 0;
    for (size_t i = 0; i < s->n; i++) {
      if (!p.at[i] || p.at[i]->importing) continue;
      if (off < sizeof q->holders) {
        int w = snprintf(q->holders + off, sizeof q->holders - off, "%s%s (%llu)", off ? "," : "",
                         s->nodes[i]->addr, (unsigned long long)p.at[i]->total_tokens);
        if (w > 0) off += (size_t)w;
      }
      if (verify && s->up[i] && complete(&p, i)) {
        uint64_t sum = 0;
        if (kvdex__grpc_checksum(s->nodes[i]->db, p.ns, p.id, &sum) == KVDEX_OK) {
          if (have_sum && sum != first_sum) q->diverged = 1;
          first_sum = sum;
          have_sum = 1;
        }
      }
    }
    if (p.owners_ok < p.n_owners) out->under_replicated++;
    if (p.misplaced) out->misplaced++;
    k = e;
  }
  /* Sequences only the hints know of: every copy is gone. */
  pthread_mutex_lock(&c->hint_mu);
  for (size_t h = 0; h < c->n_hints; h++) {
    int seen = 0;
    for (size_t k = 0; k < out->n_seqs && !seen; k++)
      seen = !strcmp(out->seqs[k].ns, c->hints[h].ns) && !strcmp(out->seqs[k].id, c->hints[h].id);
    if (!seen) out->lost++;
  }
  pthread_mutex_unlock(&c->hint_mu);
  return KVDEX_OK;
}

int kvdex_cluster_status(kvdex_db *db, int verify, kvdex_cluster_report *out) {
  if (out) memset(out, 0, sizeof *out);
  int rc = kvdex__cl_check(db, "kvdex_cluster_status");
  if (rc) return rc;
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "kvdex_cluster_status: out is NULL");
  kvdex__cluster *c = kvdex__cluster_as(db);
  snapshot s;
  if ((rc = snapshot_take(c, &s))) return kvdex__preerr(rc, "kvdex_cluster_status");
  rc = report_fill(c, &s, verify, out);
  snapshot_free(&s);
  return rc ? kvdex__preerr(rc, "kvdex_cluster_status") : KVDEX_OK;
}

typedef struct progress_ctx {
  kvdex_cluster_progress_fn fn;
  void *ctx;
  kvdex_cluster_progress p;
} progress_ctx;

static void copy_progress(void *arg, uint64_t done_tokens, uint64_t total_tokens) {
  progress_ctx *pc = arg;
  pc->p.done_tokens = done_tokens;
  pc->p.total_tokens = total_tokens;
  if (pc->fn) pc->fn(pc->ctx, &pc->p);
}

typedef struct sync_totals {
  uint64_t copied, deleted, failed, bytes;
  int first_rc;
  char first_why[400];
} sync_totals;

static void sync_fail(sync_totals *t, int rc) {
  t->failed++;
  if (!t->first_rc) {
    t->first_rc = rc;
    snprintf(t->first_why, sizeof t->first_why, "%s", kvdex_errmsg());
  }
}

/* Brings every owner that is up to a complete copy; with move, then deletes the copies
 * on non-owners of every sequence whose owners are all complete. */
static int cluster_sync(kvdex_db *db, int move, kvdex_cluster_progress_fn fn, void *ctx,
                        kvdex_cluster_report *out, const char *name) {
  if (out) memset(out, 0, sizeof *out);
  int rc = kvdex__cl_check(db, name);
  if (rc) return rc;
  kvdex__cluster *c = kvdex__cluster_as(db);
  sync_totals t = {0};
  snapshot s;
  if ((rc = snapshot_take(c, &s))) return kvdex__preerr(rc, name);
  size_t n_seqs = count_runs(&s), seq_index = 0;
  for (size_t k = 0; k < s.n_copies; seq_index++) {
    size_t e = k + 1;
    while (e < s.n_copies && same_seq(&s.copies[e], &s.copies[k])) e++;
    placement p;
    place(c, &s, s.copies + k, e - k, &p);
    k = e;
    progress_ctx pc = {fn, ctx, {.ns = p.ns, .id = p.id, .seq_index = seq_index, .n_seqs = n_seqs}};
    if (p.src == SIZE_MAX) {
      /* Only hidden copies are left (an import whose source is gone): nothing to copy. */
      pc.p.action = "skip";
      if (fn) fn(ctx, &pc.p);
      continue;
    }
    size_t ok = 0, owners_up = 0;
    for (size_t o = 0; o < p.n_owners; o++) {
      size_t i = snap_index(&s, p.owners[o]);
      if (i == SIZE_MAX || !s.up[i]) continue;
      owners_up++;
      if (complete(&p, i)) {
        ok++;
        continue;
      }
      pc.p.action = "copy";
      pc.p.from = s.nodes[p.src]->addr;
      pc.p.to = s.nodes[i]->addr;
      uint64_t bytes = 0;
      int e2 = kvdex__grpc_copy_seq(s.nodes[p.src]->db, s.nodes[i]->db, p.ns, p.id, copy_progress,
                                    &pc, &bytes);
      t.bytes += bytes;
      if (e2) {
        sync_fail(&t, e2);
        KVDEX_LOG(KVDEX_LOG_WARN, "kvdex cluster: copy of %s/%s from %s to %s failed: %s", p.ns,
                  p.id, s.nodes[p.src]->addr, s.nodes[i]->addr, kvdex_errmsg());
        continue;
      }
      t.copied++;
      ok++;
      kvdex__cl_hint_drop(c, s.nodes[i]->addr, p.ns, p.id);
    }
    if (ok == p.n_owners) kvdex__cl_hint_drop(c, NULL, p.ns, p.id);
    if (!move || ok < p.n_owners || owners_up < p.n_owners) continue;
    for (size_t i = 0; i < s.n; i++) {
      int is_owner = 0;
      for (size_t o = 0; o < p.n_owners && !is_owner; o++) is_owner = p.owners[o] == s.nodes[i];
      if (is_owner || !p.at[i] || !s.up[i]) continue;
      pc.p.action = "delete";
      pc.p.from = NULL;
      pc.p.to = s.nodes[i]->addr;
      pc.p.done_tokens = pc.p.total_tokens = p.at[i]->total_tokens;
      if (fn) fn(ctx, &pc.p);
      int e2 = kvdex__grpc_delete_ns(s.nodes[i]->db, p.ns, p.id, NULL);
      if (e2 && e2 != KVDEX_ENOTFOUND) {
        sync_fail(&t, e2);
        continue;
      }
      t.deleted++;
    }
  }
  snapshot_free(&s);
  /* The state afterwards. */
  kvdex_cluster_report after = {0};
  if ((rc = snapshot_take(c, &s))) return kvdex__preerr(rc, name);
  rc = report_fill(c, &s, 0, &after);
  snapshot_free(&s);
  if (rc) return kvdex__preerr(rc, name);
  after.copied = t.copied;
  after.deleted = t.deleted;
  after.failed = t.failed;
  after.bytes_copied = t.bytes;
  uint64_t under = after.under_replicated, misplaced = after.misplaced;
  size_t down = 0;
  for (size_t i = 0; i < after.n_nodes; i++) down += !after.nodes[i].up;
  if (out)
    *out = after;
  else
    kvdex_cluster_report_free(&after);
  if (t.first_rc)
    return kvdex__seterr(t.first_rc, "%s: %llu of the copies/deletes failed; first: %s", name,
                         (unsigned long long)t.failed, t.first_why);
  if (under)
    return kvdex__seterr(KVDEX_EUNAVAIL, "%s: %llu sequences are still under-replicated (%zu "
                         "nodes down)", name, (unsigned long long)under, down);
  if (move && misplaced)
    return kvdex__seterr(KVDEX_EUNAVAIL, "%s: %llu sequences still have copies on non-owners",
                         name, (unsigned long long)misplaced);
  return KVDEX_OK;
}

int kvdex_cluster_repair(kvdex_db *db, kvdex_cluster_progress_fn progress, void *ctx,
                         kvdex_cluster_report *out) {
  return cluster_sync(db, 0, progress, ctx, out, "kvdex_cluster_repair");
}

int kvdex_cluster_rebalance(kvdex_db *db, kvdex_cluster_progress_fn progress, void *ctx,
                            kvdex_cluster_report *out) {
  return cluster_sync(db, 1, progress, ctx, out, "kvdex_cluster_rebalance");
}

int kvdex_cluster_owners(kvdex_db *db, const char *seq_id, char *buf, size_t size) {
  int rc = kvdex__cl_check(db, "kvdex_cluster_owners");
  if (rc) return rc;
  if (!seq_id || !buf || size == 0)
    return kvdex__seterr(KVDEX_EINVAL, "kvdex_cluster_owners: seq_id and buf must be given");
  kvdex__cluster *c = kvdex__cluster_as(db);
  kvdex__cl_maybe_resolve(c);
  kvdex__cl_node *r[KVDEX__MAX_NODES];
  size_t n = kvdex__cl_rank(c, c->base.ns, seq_id, r);
  join_addrs(buf, size, r, kvdex__cl_n_owners(c, n));
  return KVDEX_OK;
}

int kvdex_cluster_checksum(kvdex_db *db, const char *addr, const char *seq_id, uint64_t *sum) {
  if (!db || !seq_id || !sum)
    return kvdex__seterr(KVDEX_EINVAL, "kvdex_cluster_checksum: db, seq_id and sum must be given");
  if (!strcmp(db->vt->name, "grpc") && !addr)
    return kvdex__preerr(kvdex__grpc_checksum(db, db->ns, seq_id, sum), "kvdex_cluster_checksum");
  int rc = kvdex__cl_check(db, "kvdex_cluster_checksum");
  if (rc) return rc;
  kvdex__cluster *c = kvdex__cluster_as(db);
  kvdex__cl_node *nd = NULL;
  pthread_rwlock_rdlock(&c->mu);
  for (size_t i = 0; i < c->n_nodes && !nd; i++)
    if (addr && !strcmp(c->nodes[i]->addr, addr)) nd = c->nodes[i];
  pthread_rwlock_unlock(&c->mu);
  if (!nd || !nd->db)
    return kvdex__seterr(KVDEX_EINVAL, "kvdex_cluster_checksum: \"%s\" is not a node of the "
                         "handle", addr ? addr : "(null)");
  return kvdex__preerr(kvdex__grpc_checksum(nd->db, c->base.ns, seq_id, sum),
                       "kvdex_cluster_checksum");
}