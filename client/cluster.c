/* cluster.c — the cluster transport: one kvdex_db over many kvdex nodes; this file
 * routes (the nodes and their health are cluster_health.c, hints, repair, rebalance
 * and status cluster_admin.c).
 *
 * Placement is rendezvous hashing: every node scores hash(node, namespace, sequence)
 * and the `replicas` best are the sequence's owners. Nothing about placement is
 * stored anywhere, so every client computes the same owners from the same node list,
 * and adding or removing a node moves only the sequences whose top-R set changed.
 *
 * Each node is a grpc handle (grpc.c) opened once and reused, so a node is one
 * channel; a node whose circuit breaker is open is tried last or skipped.
 *
 * Writes go to every owner and tolerate owners that cannot take them (unreachable,
 * or lacking or lagging the sequence after a restart): those are remembered as
 * hints and logged, and kvdex_cluster_repair brings them back. Reads go down the
 * rank order: owners first, then the other nodes, because during a rebalance the
 * sequence still sits on its previous owners (new owners hold it hidden until the
 * copy is complete, and answer NOT_FOUND until then).
 */

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/cluster_int.h"

#define DEFAULT_REPLICAS 2
#define DEFAULT_RESOLVE_MS 30000
#define DEFAULT_TIMEOUT_MS 30000
#define DEFAULT_AUTO_REPAIR_MS 2000

/* ---- rendezvous hashing ---------------------------------------------------------- */

static uint64_t fnv_str(uint64_t h, const char *s) {
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) h = (h ^ *p) * 1099511628211ull;
  return (h ^ 0xffu) * 1099511628211ull; /* a separator no name contains */
}

static uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

static uint64_t rdv_score(const char *addr, const char *ns, const char *id) {
  uint64_t h = fnv_str(fnv_str(fnv_str(1469598103934665603ull, addr), ns), id);
  return mix64(h);
}

typedef struct ranked {
  kvdex__cl_node *nd;
  uint64_t score;
} ranked;

static int cmp_ranked(const void *a, const void *b) {
  const ranked *x = a, *y = b;
  if (x->score != y->score) return x->score > y->score ? -1 : 1;
  return strcmp(x->nd->addr, y->nd->addr);
}

size_t kvdex__cl_rank(kvdex__cluster *c, const char *ns, const char *id, kvdex__cl_node **out) {
  ranked r[KVDEX__MAX_NODES];
  pthread_rwlock_rdlock(&c->mu);
  size_t n = c->n_nodes;
  for (size_t i = 0; i < n; i++) r[i] = (ranked){c->nodes[i], rdv_score(c->nodes[i]->addr, ns, id)};
  pthread_rwlock_unlock(&c->mu);
  qsort(r, n, sizeof *r, cmp_ranked);
  for (size_t i = 0; i < n; i++) out[i] = r[i].nd;
  return n;
}

size_t kvdex__cl_n_owners(const kvdex__cluster *c, size_t n_nodes) {
  return n_nodes < c->replicas ? n_nodes : c->replicas;
}

/* ---- reads: first healthy owner, then fail over --------------------------------------- */

/* The order in which reads try nodes: owners before the others; within each, nodes
 * with an open breaker and copies known to have missed writes come last. */
static size_t read_order(kvdex__cluster *c, const char *ns, const char *id, kvdex__cl_node **out) {
  kvdex__cl_node *r[KVDEX__MAX_NODES];
  size_t n = kvdex__cl_rank(c, ns, id, r), owners = kvdex__cl_n_owners(c, n), k = 0;
  int64_t now = kvdex__now_ms();
  for (int part = 0; part < 4; part++) {
    size_t lo = part < 2 ? 0 : owners, hi = part < 2 ? owners : n;
    for (size_t i = lo; i < hi; i++) {
      int bad = kvdex__cl_node_skipped(r[i], now) || kvdex__cl_hint_has(c, r[i], ns, id);
      if (bad == (part % 2)) out[k++] = r[i];
    }
  }
  return k;
}

typedef int (*read_fn)(kvdex_db *sub, void *arg);

/* Runs fn on the nodes of seq_id in read order until one answers. NOT_FOUND and
 * transport failures move on; any other answer is final. Every attempt's timeout is
 * cut to what is left of the handle's timeout (kvdex__grpc_set_deadline). */
static int read_try_in(kvdex__cluster *c, const char *what, const char *id, read_fn fn, void *arg,
                       int64_t deadline) {
  kvdex__cl_node *order[KVDEX__MAX_NODES];
  size_t n = read_order(c, c->base.ns, id, order);
  int transport_rc = 0;
  char transport_why[400] = "", nf_why[400] = "";
  size_t tried = 0;
  for (size_t i = 0; i < n; i++) {
    kvdex__cl_node *nd = order[i];
    if (!nd->db) continue;
    if (tried > 0 && kvdex__now_ms() >= deadline) {
      return kvdex__seterr(KVDEX_ETIMEDOUT,
                           "%s %s: the deadline of %u ms passed after %zu nodes; last: %s", what,
                           id, c->timeout_ms, tried, transport_why[0] ? transport_why : nf_why);
    }
    tried++;
    int rc = fn(nd->db, arg);
    kvdex__cl_node_result(nd, rc);
    if (rc == KVDEX_OK) return KVDEX_OK;
    if (kvdex__cl_is_transport(rc)) {
      transport_rc = rc;
      snprintf(transport_why, sizeof transport_why, "%s", kvdex_errmsg());
    } else if (rc == KVDEX_ENOTFOUND) {
      if (!nf_why[0]) snprintf(nf_why, sizeof nf_why, "%s", kvdex_errmsg());
    } else {
      return rc;
    }
  }
  if (transport_rc)
    return kvdex__seterr(transport_rc, "%s %s: no node that may hold it answered (%zu tried): %s",
                         what, id, tried, transport_why);
  if (tried == 0)
    return kvdex__seterr(KVDEX_EUNAVAIL, "%s %s: no node could be opened", what, id);
  return kvdex__seterr(KVDEX_ENOTFOUND, "%s", nf_why);
}

static int read_try(kvdex__cluster *c, const char *what, const char *id, read_fn fn, void *arg) {
  int64_t deadline = kvdex__now_ms() + c->timeout_ms;
  kvdex__grpc_set_deadline(deadline);
  int rc = read_try_in(c, what, id, fn, arg, deadline);
  kvdex__grpc_set_deadline(0);
  return rc;
}

/* ---- writes: every owner ------------------------------------------------------------ */

typedef int (*write_fn)(kvdex_db *sub, void *arg, int first);

/* Runs fn on every owner of seq_id. Unreachable owners, and owners that answer
 * NOT_FOUND while another owner succeeds (a restarted node), are skipped and hinted;
 * any other refusal is the call's error. */
static int write_owners(kvdex__cluster *c, const char *what, const char *id, write_fn fn,
                        void *arg) {
  kvdex__cl_node *r[KVDEX__MAX_NODES];
  size_t n = kvdex__cl_rank(c, c->base.ns, id, r), owners = kvdex__cl_n_owners(c, n);
  int64_t now = kvdex__now_ms();
  size_t ok = 0, down = 0;
  int fatal = 0;
  char fatal_why[400] = "", nf_why[400] = "", down_why[400] = "";
  kvdex__cl_node *missed[KVDEX__MAX_REPLICAS];
  char missed_why[KVDEX__MAX_REPLICAS][200];
  size_t n_missed = 0;
  int any_healthy = 0; /* with every owner's breaker open, try them all anyway */
  for (size_t i = 0; i < owners; i++) any_healthy |= !kvdex__cl_node_skipped(r[i], now);
  for (size_t i = 0; i < owners; i++) {
    kvdex__cl_node *nd = r[i];
    int rc;
    if (!nd->db || (any_healthy && kvdex__cl_node_skipped(nd, now))) {
      rc = KVDEX_EUNAVAIL;
      kvdex__seterr(rc, "node %s is skipped after repeated failures (circuit breaker)%s%s",
                    nd->addr, nd->open_err[0] ? ": " : "", nd->open_err);
    } else {
      rc = fn(nd->db, arg, ok == 0);
      kvdex__cl_node_result(nd, rc);
    }
    if (rc == KVDEX_OK) {
      ok++;
      continue;
    }
    if (kvdex__cl_is_transport(rc) || rc == KVDEX_ENOTFOUND) {
      if (rc == KVDEX_ENOTFOUND) {
        snprintf(nf_why, sizeof nf_why, "%s", kvdex_errmsg());
      } else {
        down++;
        snprintf(down_why, sizeof down_why, "%s", kvdex_errmsg());
      }
      missed[n_missed] = nd;
      snprintf(missed_why[n_missed], sizeof missed_why[0], "%s", kvdex_errmsg());
      n_missed++;
      continue;
    }
    if (!fatal) {
      fatal = rc;
      snprintf(fatal_why, sizeof fatal_why, "%s", kvdex_errmsg());
    }
  }
  if (fatal)
    return kvdex__seterr(fatal, "%s (owner refused; %zu of %zu owners applied it)", fatal_why, ok,
                         owners);
  if (ok == 0) {
    if (down) return kvdex__seterr(KVDEX_EUNAVAIL, "%s %s: no owner reachable: %s", what, id,
                                   down_why);
    return kvdex__seterr(KVDEX_ENOTFOUND, "%s", nf_why);
  }
  for (size_t i = 0; i < n_missed; i++)
    kvdex__cl_replica_missed(c, missed[i], what, id, missed_why[i]);
  return KVDEX_OK;
}

/* ---- sequences ---------------------------------------------------------------------- */

static int w_create(kvdex_db *sub, void *arg, int first) {
  (void)first;
  const void **a = arg;
  return sub->vt->create(sub, a[0], a[1]);
}

static int cl_create(kvdex_db *db, const char *seq_id, const kvdex_shape *shape) {
  kvdex__cluster *c = kvdex__cluster_as(db);
  kvdex__cl_maybe_resolve(c);
  const void *a[2] = {seq_id, shape};
  int rc = write_owners(c, "create", seq_id, w_create, a);
  if (rc == KVDEX_OK) kvdex__cl_hint_drop(c, NULL, c->base.ns, seq_id);
  return rc;
}

/* Delete goes to every node: copies left behind by a rebalance go too. */
static int cl_del(kvdex_db *db, const char *seq_id, uint64_t *bytes_freed) {
  kvdex__cluster *c = kvdex__cluster_as(db);
  kvdex__cl_maybe_resolve(c);
  kvdex__cl_node *r[KVDEX__MAX_NODES];
  size_t n = kvdex__cl_rank(c, c->base.ns, seq_id, r);
  size_t ok = 0, down = 0;
  uint64_t freed = 0;
  char why[400] = "";
  for (size_t i = 0; i < n; i++) {
    if (!r[i]->db) continue;
    uint64_t b = 0;
    int rc = r[i]->db->vt->del(r[i]->db, seq_id, &b);
    kvdex__cl_node_result(r[i], rc);
    if (rc == KVDEX_OK) {
      ok++;
      if (b > freed) freed = b;
    } else if (kvdex__cl_is_transport(rc)) {
      down++;
      snprintf(why, sizeof why, "%s", kvdex_errmsg());
      KVDEX_LOG(KVDEX_LOG_WARN,
                "kvdex cluster: node %s unreachable for delete of %s/%s; a copy it holds stays "
                "there until it is deleted again",
                r[i]->addr, c->base.ns, seq_id);
    } else if (rc != KVDEX_ENOTFOUND) {
      return rc;
    }
  }
  if (bytes_freed) *bytes_freed = freed;
  if (ok) {
    kvdex__cl_hint_drop(c, NULL, c->base.ns, seq_id);
    return KVDEX_OK;
  }
  if (down) return kvdex__seterr(KVDEX_EUNAVAIL, "delete %s: not found on the nodes that "
                                 "answered, and %zu did not: %s", seq_id, down, why);
  return kvdex__seterr(KVDEX_ENOTFOUND, "delete: no sequence %s/%s on any node", c->base.ns,
                       seq_id);
}

static int r_stat(kvdex_db *sub, void *arg) {
  void **a = arg;
  return sub->vt->stat(sub, a[0], a[1]);
}

static int cl_stat(kvdex_db *db, const char *seq_id, kvdex_seq_info *info) {
  kvdex__cluster *c = kvdex__cluster_as(db);
  kvdex__cl_maybe_resolve(c);
  void *a[2] = {(void *)seq_id, info};
  return read_try(c, "stat", seq_id, r_stat, a);
}

static int cmp_cstr(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The union of every node's visible sequences of the namespace. */
static int cl_list(kvdex_db *db, char ***ids, size_t *n) {
  kvdex__cluster *c = kvdex__cluster_as(db);
  kvdex__cl_maybe_resolve(c);
  kvdex__cl_node *r[KVDEX__MAX_NODES];
  size_t nn = kvdex__cl_rank(c, c->base.ns, "", r), up = 0, count = 0, cap = 0;
  char **all = NULL, why[400] = "";
  int rc = KVDEX_OK;
  for (size_t i = 0; i < nn && rc == KVDEX_OK; i++) {
    if (!r[i]->db) continue;
    kvdex__node_list l = {0};
    int e = kvdex__grpc_list_node(r[i]->db, c->base.ns, &l);
    kvdex__cl_node_result(r[i], e);
    if (e) {
      if (!kvdex__cl_is_transport(e)) rc = e;
      snprintf(why, sizeof why, "%s", kvdex_errmsg());
      continue;
    }
    up++;
    for (size_t j = 0; j < l.n && rc == KVDEX_OK; j++) {
      if (l.seqs[j].importing) continue;
      if (count == cap) {
        size_t nc = cap ? cap * 2 : 64;
        char **g = realloc(all, nc * sizeof *g);
        if (!g) {
          rc = kvdex__seterr(KVDEX_ENOMEM, "list: out of memory");
          break;
        }
        all = g;
        cap = nc;
      }
      if (!(all[count] = strdup(l.seqs[j].id))) {
        rc = kvdex__seterr(KVDEX_ENOMEM, "list: out of memory");
        break;
      }
      count++;
    }
    kvdex__node_list_free(&l);
  }
  if (rc == KVDEX_OK && up == 0)
    rc = kvdex__seterr(KVDEX_EUNAVAIL, "list: no node answered: %s", why);
  if (rc) {
    for (size_t i = 0; i < count; i++) free(all[i]);
    free(all);
    return rc;
  }
  if (up < nn)
    KVDEX_LOG(KVDEX_LOG_WARN, "kvdex cluster: list: %zu of %zu nodes answered (%s)", up, nn, why);
  if (count > 1) qsort(all, count, sizeof *all, cmp_cstr);
  size_t w = 0;
  for (size_t i = 0; i < count; i++) {
    if (w > 0 && !strcmp(all[w - 1], all[i])) {
      free(all[i]);
      continue;
    }
    all[w++] = all[i];
  }
  *ids = all;
  *n = w;
  return KVDEX_OK;
}

/* ---- append: one stream per owner ------------------------------------------------------ */

typedef struct sub_ap {
  kvdex__cl_node *nd;
  kvdex_appender *ap;
} sub_ap;

typedef struct cluster_appender {
  kvdex_appender base;
  char id[KVDEX_MAX_SEQ_ID + 1];
  size_t n;                    /* live streams */
  sub_ap sub[KVDEX__MAX_REPLICAS];
} cluster_appender;

/* Drops stream i: the owner misses this append and is hinted. */
static void ap_drop(cluster_appender *cap, size_t i, int abort_it) {
  kvdex__cluster *c = kvdex__cluster_as(cap->base.db);
  if (abort_it) cap->sub[i].nd->db->vt->append_abort(cap->sub[i].ap);
  kvdex__cl_replica_missed(c, cap->sub[i].nd, "append", cap->id, NULL);
  cap->sub[i] = cap->sub[--cap->n];
}

/* An owner that cannot take the stream but leaves it to the others: unreachable,
 * lacking the sequence (restarted) or lagging it (a gap: it missed earlier appends). */
static int lagging(int rc) {
  /* EBUSY: another stream holds the owner's copy (e.g. a repair copying into it); the
   * others take this one and the owner is repaired again later. Two writers of one
   * sequence get EBUSY from every owner, which fails the stream as it should. */
  return kvdex__cl_is_transport(rc) || rc == KVDEX_ENOTFOUND || rc == KVDEX_ECONFLICT ||
         rc == KVDEX_EBUSY;
}

static int cl_append_begin(kvdex_db *db, const char *seq_id, kvdex_appender **out) {
  kvdex__cluster *c = kvdex__cluster_as(db);
  kvdex__cl_maybe_resolve(c);
  cluster_appender *cap = calloc(1, sizeof *cap);
  if (!cap) return kvdex__seterr(KVDEX_ENOMEM, "append: out of memory");
  cap->base.db = db;
  snprintf(cap->id, sizeof cap->id, "%s", seq_id);
  kvdex__cl_node *r[KVDEX__MAX_NODES];
  size_t n = kvdex__cl_rank(c, c->base.ns, seq_id, r), owners = kvdex__cl_n_owners(c, n);
  int64_t now = kvdex__now_ms();
  int fatal = 0, saw_down = 0;
  char why[400] = "";
  kvdex__cl_node *missed[KVDEX__MAX_REPLICAS];
  char missed_why[KVDEX__MAX_REPLICAS][200];
  size_t n_missed = 0;
  int any_healthy = 0; /* as write_owners */
  for (size_t i = 0; i < owners; i++) any_healthy |= !kvdex__cl_node_skipped(r[i], now);
  for (size_t i = 0; i < owners && !fatal; i++) {
    kvdex__cl_node *nd = r[i];
    kvdex_appender *ap = NULL;
    int rc;
    if (!nd->db || (any_healthy && kvdex__cl_node_skipped(nd, now))) {
      rc = kvdex__seterr(KVDEX_EUNAVAIL, "node %s is skipped after repeated failures", nd->addr);
    } else {
      rc = nd->db->vt->append_begin(nd->db, seq_id, &ap);
      kvdex__cl_node_result(nd, rc);
    }
    if (rc == KVDEX_OK) {
      if (cap->n == 0) cap->base.shape = ap->shape;
      cap->sub[cap->n++] = (sub_ap){nd, ap};
    } else if (kvdex__cl_is_transport(rc) || rc == KVDEX_ENOTFOUND) {
      saw_down |= kvdex__cl_is_transport(rc);
      snprintf(why, sizeof why, "%s", kvdex_errmsg());
      missed[n_missed] = nd;
      snprintf(missed_why[n_missed++], sizeof missed_why[0], "%s", kvdex_errmsg());
    } else {
      fatal = rc;
      snprintf(why, sizeof why, "%s", kvdex_errmsg());
    }
  }
  if (fatal || cap->n == 0) {
    for (size_t i = 0; i < cap->n; i++) cap->sub[i].nd->db->vt->append_abort(cap->sub[i].ap);
    free(cap);
    if (fatal) return kvdex__seterr(fatal, "%s", why);
    if (saw_down) return kvdex__seterr(KVDEX_EUNAVAIL, "append %s: no owner reachable: %s",
                                       seq_id, why);
    return kvdex__seterr(KVDEX_ENOTFOUND, "%s", why);
  }
  for (size_t i = 0; i < n_missed; i++)
    kvdex__cl_replica_missed(c, missed[i], "append", seq_id, missed_why[i]);
  *out = &cap->base;
  return KVDEX_OK;
}

static int cl_append_kv(kvdex_appender *base, uint32_t layer, uint64_t token_start,
                        uint32_t n_tokens, const void *k, const void *v, const void *q,
                        const void *landmarks) {
  cluster_appender *cap = (cluster_appender *)base;
  int last = 0;
  char why[400] = "";
  for (size_t i = 0; i < cap->n;) {
    kvdex_db *sub = cap->sub[i].nd->db;
    int rc = sub->vt->append_kv(cap->sub[i].ap, layer, token_start, n_tokens, k, v, q, landmarks);
    kvdex__cl_node_result(cap->sub[i].nd, rc);
    if (rc == KVDEX_OK) {
      i++;
      continue;
    }
    last = rc;
    snprintf(why, sizeof why, "%s", kvdex_errmsg());
    if (!lagging(rc)) return rc; /* the data itself is refused: the stream fails */
    ap_drop(cap, i, 1);
  }
  if (cap->n == 0) return kvdex__seterr(last, "every owner refused the append: %s", why);
  return KVDEX_OK;
}

static int cl_append_commit(kvdex_appender *base, uint64_t *tokens_appended) {
  cluster_appender *cap = (cluster_appender *)base;
  kvdex__cluster *c = kvdex__cluster_as(base->db);
  size_t ok = 0;
  int fatal = 0, last = 0;
  char why[400] = "";
  uint64_t best = 0;
  for (size_t i = 0; i < cap->n; i++) {
    uint64_t t = 0;
    kvdex__cl_node *nd = cap->sub[i].nd;
    int rc = nd->db->vt->append_commit(cap->sub[i].ap, &t); /* frees the sub stream */
    kvdex__cl_node_result(nd, rc);
    if (rc == KVDEX_OK) {
      ok++;
      if (t > best) best = t;
      continue;
    }
    last = rc;
    snprintf(why, sizeof why, "%s", kvdex_errmsg());
    if (lagging(rc))
      kvdex__cl_replica_missed(c, nd, "append", cap->id, why);
    else if (!fatal)
      fatal = rc;
  }
  free(cap);
  if (tokens_appended) *tokens_appended = best;
  if (fatal) return kvdex__seterr(fatal, "%s (%zu owners committed)", why, ok);
  if (ok == 0) return kvdex__seterr(last ? last : KVDEX_EUNAVAIL, "no owner committed: %s", why);
  return KVDEX_OK;
}

static void cl_append_abort(kvdex_appender *base) {
  cluster_appender *cap = (cluster_appender *)base;
  for (size_t i = 0; i < cap->n; i++) cap->sub[i].nd->db->vt->append_abort(cap->sub[i].ap);
  free(cap);
}

/* ---- read, build, retain ------------------------------------------------------------ */

typedef struct read_args {
  const char *id;
  uint32_t layer;
  const uint64_t *ids;
  size_t n;
  void *k, *v;
} read_args;

static int r_read(kvdex_db *sub, void *arg) {
  read_args *a = arg;
  return sub->vt->read(sub, a->id, a->layer, a->ids, a->n, a->k, a->v);
}

static int cl_read(kvdex_db *db, const char *seq_id, uint32_t layer, const uint64_t *token_ids,
                   size_t n, void *k_out, void *v_out) {
  kvdex__cluster *c = kvdex__cluster_as(db);
  kvdex__cl_maybe_resolve(c);
  read_args a = {seq_id, layer, token_ids, n, k_out, v_out};
  return read_try(c, "read", seq_id, r_read, &a);
}

static int w_build(kvdex_db *sub, void *arg, int first) {
  (void)first;
  void **a = arg;
  return sub->vt->build_index(sub, a[0], *(uint32_t *)a[1], a[2]);
}

static int cl_build_index(kvdex_db *db, const char *seq_id, uint32_t layer, const char *spec) {
  kvdex__cluster *c = kvdex__cluster_as(db);
  kvdex__cl_maybe_resolve(c);
  void *a[3] = {(void *)seq_id, &layer, (void *)spec};
  return write_owners(c, "build_index", seq_id, w_build, a);
}

typedef struct retain_args {
  const char *id;
  uint32_t layer;
  const float *q_obs;
  uint32_t n_obs;
  const kvdex_retain_options *opts;
  uint64_t *ids;
  float *scores;
  uint64_t *scratch_ids; /* later owners of a materialize write here */
  float *scratch_scores;
} retain_args;

static int r_retain(kvdex_db *sub, void *arg) {
  retain_args *a = arg;
  return sub->vt->retain(sub, a->id, a->layer, a->q_obs, a->n_obs, a->opts, a->ids, a->scores);
}

static int w_retain(kvdex_db *sub, void *arg, int first) {
  retain_args *a = arg;
  return sub->vt->retain(sub, a->id, a->layer, a->q_obs, a->n_obs, a->opts,
                         first ? a->ids : a->scratch_ids,
                         first ? a->scores : (a->scores ? a->scratch_scores : NULL));
}

static int cl_retain(kvdex_db *db, const char *seq_id, uint32_t layer, const float *q_obs,
                     uint32_t n_obs, const kvdex_retain_options *opts, uint64_t *ids,
                     float *scores) {
  kvdex__cluster *c = kvdex__cluster_as(db);
  kvdex__cl_maybe_resolve(c);
  retain_args a = {seq_id, layer, q_obs, n_obs, opts, ids, scores, NULL, NULL};
  if (!opts->materialize) return read_try(c, "retain", seq_id, r_retain, &a);
  /* Materialize changes each owner's retained set: every owner runs it. The ids
   * buffer holds n_kv_heads * budget entries; its size needs the shape. */
  kvdex_seq_info info = {0};
  int rc = cl_stat(db, seq_id, &info);
  if (rc) return rc;
  size_t cnt = (size_t)info.shape.n_kv_heads * opts->budget;
  kvdex_seq_info_free(&info);
  a.scratch_ids = malloc(cnt * sizeof *a.scratch_ids + 1);
  a.scratch_scores = malloc(cnt * sizeof *a.scratch_scores + 1);
  if (!a.scratch_ids || !a.scratch_scores) {
    free(a.scratch_ids);
    free(a.scratch_scores);
    return kvdex__seterr(KVDEX_ENOMEM, "retain: out of memory");
  }
  rc = write_owners(c, "retain", seq_id, w_retain, &a);
  free(a.scratch_ids);
  free(a.scratch_scores);
  return rc;
}

/* ---- batched search and attend: fan out by owner, reassemble in order ------------------ */

typedef int (*group_fn)(kvdex_db *sub, void *op, size_t n, const size_t *idx);

/* One batch call to one node for some items of the caller's batch. */
typedef struct group {
  kvdex__cl_node *nd;
  size_t n;
  size_t *idx; /* caller item indices, a slice of the round's buffer */
  int solo;    /* one item retried alone after its batch was NOT_FOUND */
  group_fn run;
  void *op;
  int64_t deadline;
  int rc;
  char why[400];
  pthread_t th;
} group;

static void group_run(group *g) {
  kvdex__grpc_set_deadline(g->deadline);
  g->rc = g->run(g->nd->db, g->op, g->n, g->idx);
  if (g->rc) snprintf(g->why, sizeof g->why, "%s", kvdex_errmsg());
  kvdex__grpc_set_deadline(0);
}

static void *group_thread(void *arg) {
  group_run(arg);
  return NULL;
}

/* Most calls of one round in flight at once. */
#define FANOUT_THREADS 16

/* Runs a batch over the items' nodes: each round groups the pending items by the next
 * node of their read order and calls the groups in parallel. A node that fails with a
 * transport error is out for the rest of the call and its items move on; a group
 * answered NOT_FOUND is retried item by item (the server's batch fails as a whole),
 * and a single item answered NOT_FOUND moves on. Any other error fails the call. */
static int fan_out(kvdex__cluster *c, const char *what, size_t n, const char *const *ids,
                   group_fn run, void *op) {
  int rc = KVDEX_OK;
  kvdex__cl_node **order = malloc(n * KVDEX__MAX_NODES * sizeof *order);
  size_t *n_order = calloc(n, sizeof *n_order), *pos = calloc(n, sizeof *pos);
  size_t *slots = malloc(n * sizeof *slots);
  unsigned char *done = calloc(n, 1), *solo = calloc(n, 1), *saw_down = calloc(n, 1);
  group *groups = malloc((n + KVDEX__MAX_NODES) * sizeof *groups);
  ptrdiff_t *gof = malloc(n * sizeof *gof);
  if (!order || !n_order || !pos || !slots || !done || !solo || !saw_down || !groups || !gof) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "%s: out of memory for a batch of %zu", what, n);
    goto out;
  }
  for (size_t i = 0; i < n; i++)
    n_order[i] = read_order(c, c->base.ns, ids[i], order + i * KVDEX__MAX_NODES);
  kvdex__cl_node *dead[KVDEX__MAX_NODES];
  size_t n_dead = 0;
  char down_why[400] = "", nf_why[400] = "";
  int64_t deadline = kvdex__now_ms() + c->timeout_ms;
  for (int round = 0;; round++) {
    /* Next node per pending item; group them. */
    size_t n_groups = 0;
    for (size_t i = 0; i < n; i++) {
      if (done[i]) continue;
      kvdex__cl_node **o = order + i * KVDEX__MAX_NODES;
      for (;;) {
        if (pos[i] >= n_order[i]) break;
        kvdex__cl_node *nd = o[pos[i]];
        int is_dead = !nd->db;
        for (size_t d = 0; d < n_dead && !is_dead; d++) is_dead = dead[d] == nd;
        if (!is_dead) break;
        saw_down[i] |= nd->db != NULL;
        pos[i]++;
      }
      if (pos[i] >= n_order[i]) {
        if (saw_down[i] || !nf_why[0])
          rc = kvdex__seterr(KVDEX_EUNAVAIL, "%s: item %zu (%s): no node that may hold it "
                             "answered: %s", what, i, ids[i], down_why[0] ? down_why : "no node");
        else
          rc = kvdex__seterr(KVDEX_ENOTFOUND, "%s: item %zu: %s", what, i, nf_why);
        goto out;
      }
      kvdex__cl_node *nd = o[pos[i]];
      ptrdiff_t g = -1;
      if (!solo[i])
        for (size_t k = 0; k < n_groups && g < 0; k++)
          if (groups[k].nd == nd && !groups[k].solo) g = (ptrdiff_t)k;
      if (g < 0) {
        g = (ptrdiff_t)n_groups++;
        groups[g] = (group){.nd = nd, .solo = solo[i]};
      }
      groups[g].n++;
      gof[i] = g;
    }
    if (n_groups == 0) break; /* every item done */
    if (round > 0 && kvdex__now_ms() >= deadline) {
      rc = kvdex__seterr(KVDEX_ETIMEDOUT, "%s: the deadline of %u ms passed with items left: %s",
                         what, c->timeout_ms, down_why[0] ? down_why : nf_why);
      goto out;
    }
    size_t off = 0;
    for (size_t k = 0; k < n_groups; k++) {
      groups[k].idx = slots + off;
      off += groups[k].n;
      groups[k].n = 0;
      groups[k].run = run;
      groups[k].op = op;
      groups[k].deadline = deadline;
    }
    for (size_t i = 0; i < n; i++)
      if (!done[i]) {
        group *g = &groups[gof[i]];
        g->idx[g->n++] = i;
      }
    /* Call them, FANOUT_THREADS at a time (one group runs on this thread). */
    for (size_t k0 = 0; k0 < n_groups; k0 += FANOUT_THREADS) {
      size_t k1 = k0 + FANOUT_THREADS < n_groups ? k0 + FANOUT_THREADS : n_groups;
      unsigned char started[FANOUT_THREADS] = {0};
      for (size_t k = k0 + 1; k < k1; k++)
        started[k - k0] = pthread_create(&groups[k].th, NULL, group_thread, &groups[k]) == 0;
      group_run(&groups[k0]);
      for (size_t k = k0 + 1; k < k1; k++) {
        if (started[k - k0])
          pthread_join(groups[k].th, NULL);
        else
          group_run(&groups[k]);
      }
    }
    /* Results. */
    int fatal = 0;
    char fatal_why[400] = "";
    for (size_t k = 0; k < n_groups; k++) {
      group *g = &groups[k];
      kvdex__cl_node_result(g->nd, g->rc);
      if (g->rc == KVDEX_OK) {
        for (size_t j = 0; j < g->n; j++) done[g->idx[j]] = 1;
      } else if (kvdex__cl_is_transport(g->rc)) {
        int known = 0;
        for (size_t d = 0; d < n_dead && !known; d++) known = dead[d] == g->nd;
        if (!known) dead[n_dead++] = g->nd;
        snprintf(down_why, sizeof down_why, "%s", g->why);
      } else if (g->rc == KVDEX_ENOTFOUND) {
        snprintf(nf_why, sizeof nf_why, "%s", g->why);
        if (g->solo)
          pos[g->idx[0]]++;
        else
          for (size_t j = 0; j < g->n; j++) solo[g->idx[j]] = 1;
      } else if (!fatal) {
        fatal = g->rc;
        snprintf(fatal_why, sizeof fatal_why, "%s (node %s)", g->why, g->nd->addr);
      }
    }
    if (fatal) {
      rc = kvdex__seterr(fatal, "%s", fatal_why);
      goto out;
    }
  }
out:
  free(order);
  free(n_order);
  free(pos);
  free(slots);
  free(done);
  free(solo);
  free(saw_down);
  free(groups);
  free(gof);
  return rc;
}

typedef struct search_op {
  uint32_t layer;
  const kvdex_search_req *req;
  const char *const *ids;
  const float *const *q;
  kvdex_search_out *out;
} search_op;

static int g_search(kvdex_db *sub, void *opp, size_t n, const size_t *idx) {
  search_op *op = opp;
  const char **ids = calloc(n + 1, sizeof *ids);
  const float **q = calloc(n + 1, sizeof *q);
  kvdex_search_out *out = calloc(n + 1, sizeof *out);
  int rc;
  if (!ids || !q || !out) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "search: out of memory");
  } else {
    for (size_t j = 0; j < n; j++) {
      ids[j] = op->ids[idx[j]];
      q[j] = op->q[idx[j]];
    }
    rc = sub->vt->search(sub, op->layer, op->req, n, ids, q, out);
    if (rc == KVDEX_OK)
      for (size_t j = 0; j < n; j++) op->out[idx[j]] = out[j]; /* moves the arrays */
  }
  free(ids);
  free(q);
  free(out);
  return rc;
}

static int cl_search(kvdex_db *db, uint32_t layer, const kvdex_search_req *req, size_t n_seqs,
                     const char *const *seq_ids, const float *const *q, kvdex_search_out *out) {
  kvdex__cluster *c = kvdex__cluster_as(db);
  kvdex__cl_maybe_resolve(c);
  search_op op = {layer, req, seq_ids, q, out};
  int rc = fan_out(c, "search", n_seqs, seq_ids, g_search, &op);
  if (rc) {
    char why[512];
    snprintf(why, sizeof why, "%s", kvdex_errmsg());
    for (size_t i = 0; i < n_seqs; i++) kvdex_search_out_free(&out[i]); /* zeroed again */
    return kvdex__seterr(rc, "%s", why);
  }
  return KVDEX_OK;
}

typedef struct attend_op {
  uint32_t layer;
  const kvdex_attend_options *opts;
  const kvdex_attend_item *items;
  float *const *o, *const *lse;
  kvdex_attend_info *info;
} attend_op;

static int g_attend(kvdex_db *sub, void *opp, size_t n, const size_t *idx) {
  attend_op *op = opp;
  kvdex_attend_item *items = calloc(n + 1, sizeof *items);
  float **o = calloc(n + 1, sizeof *o), **lse = calloc(n + 1, sizeof *lse);
  kvdex_attend_info *info = op->info ? calloc(n, sizeof *info) : NULL;
  int rc;
  if (!items || !o || !lse || (op->info && !info)) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "attend: out of memory");
  } else {
    for (size_t j = 0; j < n; j++) {
      items[j] = op->items[idx[j]];
      o[j] = op->o[idx[j]];
      lse[j] = op->lse[idx[j]];
    }
    rc = sub->vt->attend(sub, op->layer, op->opts, n, items, o, lse, info);
    if (rc == KVDEX_OK && info)
      for (size_t j = 0; j < n; j++) op->info[idx[j]] = info[j];
  }
  free(items);
  free(o);
  free(lse);
  free(info);
  return rc;
}

static int cl_attend(kvdex_db *db, uint32_t layer, const kvdex_attend_options *opts,
                     size_t n_items, const kvdex_attend_item *items, float *const *o,
                     float *const *lse, kvdex_attend_info *info) {
  kvdex__cluster *c = kvdex__cluster_as(db);
  kvdex__cl_maybe_resolve(c);
  const char **ids = malloc(n_items * sizeof *ids);
  if (!ids) return kvdex__seterr(KVDEX_ENOMEM, "attend: out of memory");
  for (size_t i = 0; i < n_items; i++) ids[i] = items[i].seq_id;
  attend_op op = {layer, opts, items, o, lse, info};
  int rc = fan_out(c, "attend", n_items, ids, g_attend, &op);
  free(ids);
  return rc;
}

/* ---- open / close -------------------------------------------------------------------- */

static void cl_close(kvdex_db *db) {
  kvdex__cluster *c = kvdex__cluster_as(db);
  kvdex__cl_repair_stop(c);
  for (kvdex__cl_node *nd = c->all, *next; nd; nd = next) {
    next = nd->next_all;
    kvdex_close(nd->db);
    free(nd);
  }
  free(c->nodes);
  free(c->hints);
  free(c->ns);
  free(c->ca);
  free(c->cert);
  free(c->key);
  free(c->token);
  pthread_rwlock_destroy(&c->mu);
  pthread_mutex_destroy(&c->resolve_mu);
  pthread_mutex_destroy(&c->hint_mu);
  pthread_cond_destroy(&c->repair_cv);
  free(c);
}

static const kvdex__vt cluster_vt = {
    .name = "cluster",
    .close = cl_close,
    .create = cl_create,
    .del = cl_del,
    .stat = cl_stat,
    .list = cl_list,
    .append_begin = cl_append_begin,
    .append_kv = cl_append_kv,
    .append_commit = cl_append_commit,
    .append_abort = cl_append_abort,
    .read = cl_read,
    .search = cl_search,
    .build_index = cl_build_index,
    .attend = cl_attend,
    .retain = cl_retain,
};

int kvdex__cl_check(kvdex_db *db, const char *fn) {
  if (!db) return kvdex__seterr(KVDEX_EINVAL, "%s: db is NULL", fn);
  if (db->vt != &cluster_vt)
    return kvdex__seterr(KVDEX_EINVAL, "%s: the handle is not a cluster (open "
                         "\"grpc://h1:p,h2:p?replicas=2\" or \"dns:///name:port\")", fn);
  return KVDEX_OK;
}

int kvdex__is_cluster_uri(const char *uri) {
  if (!strncmp(uri, "dns:///", 7)) return 1;
  if (strncmp(uri, "grpc://", 7) && strncmp(uri, "grpcs://", 8)) return 0;
  return strchr(uri, ',') != NULL || strchr(uri, '?') != NULL;
}

static char *dup_opt(const char *s, int *oom) {
  if (!s) return NULL;
  char *d = strdup(s);
  if (!d) *oom = 1;
  return d;
}

/* Parses "name=value&..." into the handle. */
static int parse_params(kvdex__cluster *c, const char *q, const char *uri) {
  while (q && *q) {
    const char *amp = strchr(q, '&');
    size_t len = amp ? (size_t)(amp - q) : strlen(q);
    char kv[64];
    if (len == 0 || len >= sizeof kv)
      return kvdex__seterr(KVDEX_EINVAL, "bad parameter in \"%.200s\"", uri);
    memcpy(kv, q, len);
    kv[len] = '\0';
    char *eq = strchr(kv, '=');
    char *end = NULL;
    unsigned long long v = eq && eq[1] ? strtoull(eq + 1, &end, 10) : 0;
    if (!eq || !eq[1] || *end)
      return kvdex__seterr(KVDEX_EINVAL, "parameter \"%s\" needs a number "
                           "(name=value) in \"%.200s\"", kv, uri);
    *eq = '\0';
    if (!strcmp(kv, "replicas")) {
      if (v < 1 || v > KVDEX__MAX_REPLICAS)
        return kvdex__seterr(KVDEX_EINVAL, "replicas=%llu out of range (1..%d)", v,
                             KVDEX__MAX_REPLICAS);
      c->replicas = (uint32_t)v;
    } else if (!strcmp(kv, "auto_repair_ms")) {
      if (v != 0 && (v < 100 || v > 3600000))
        return kvdex__seterr(KVDEX_EINVAL, "auto_repair_ms=%llu out of range (0 = off, "
                             "100..3600000)", v);
      c->auto_repair_ms = (int64_t)v;
    } else if (!strcmp(kv, "resolve_ms") && c->dns) {
      if (v < 100 || v > 86400000ull)
        return kvdex__seterr(KVDEX_EINVAL, "resolve_ms=%llu out of range "
                             "(100..86400000)", v);
      c->resolve_ms = (int64_t)v;
    } else if (!strcmp(kv, "tls") && c->dns) {
      if (v > 1) return kvdex__seterr(KVDEX_EINVAL, "tls=%llu must be 0 or 1", v);
      c->tls = (int)v;
    } else {
      return kvdex__seterr(KVDEX_EINVAL,
                           "unknown parameter \"%s\" in \"%.200s\" "
                           "(known: replicas, auto_repair_ms%s)",
                           kv, uri, c->dns ? ", resolve_ms, tls" : "");
    }
    q = amp ? amp + 1 : NULL;
  }
  return KVDEX_OK;
}

int kvdex__cluster_open(const char *uri, const kvdex_open_opts *opts, kvdex_db **out) {
  kvdex__cluster *c = calloc(1, sizeof *c);
  if (!c) return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  c->base.vt = &cluster_vt;
  pthread_rwlock_init(&c->mu, NULL);
  pthread_mutex_init(&c->resolve_mu, NULL);
  pthread_mutex_init(&c->hint_mu, NULL);
  pthread_cond_init(&c->repair_cv, NULL);
  c->auto_repair_ms = DEFAULT_AUTO_REPAIR_MS;
  c->replicas = DEFAULT_REPLICAS;
  c->resolve_ms = DEFAULT_RESOLVE_MS;
  c->timeout_ms = opts && opts->timeout_ms ? opts->timeout_ms : DEFAULT_TIMEOUT_MS;
  int oom = 0;
  if (opts) c->opts = *opts;
  c->ns = dup_opt(opts ? opts->name_space : NULL, &oom);
  c->ca = dup_opt(opts ? opts->tls_ca_file : NULL, &oom);
  c->cert = dup_opt(opts ? opts->tls_cert_file : NULL, &oom);
  c->key = dup_opt(opts ? opts->tls_key_file : NULL, &oom);
  c->token = dup_opt(opts ? opts->auth_token : NULL, &oom);
  c->opts.name_space = c->ns;
  c->opts.tls_ca_file = c->ca;
  c->opts.tls_cert_file = c->cert;
  c->opts.tls_key_file = c->key;
  c->opts.auth_token = c->token;
  c->opts.timeout_ms = c->timeout_ms;
  int rc = KVDEX_OK;
  char (*addrs)[KVDEX__CL_ADDR_MAX] = malloc(KVDEX__MAX_NODES * sizeof *addrs);
  char *hosts = NULL;
  if (oom || !addrs) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "out of memory");
    goto fail;
  }
  const char *rest;
  if (!strncmp(uri, "dns:///", 7)) {
    c->dns = 1;
    rest = uri + 7;
  } else {
    c->tls = uri[4] == 's';
    rest = uri + 7 + c->tls;
  }
  const char *qm = strchr(rest, '?');
  size_t hl = qm ? (size_t)(qm - rest) : strlen(rest);
  if (!(hosts = strndup(rest, hl))) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "out of memory");
    goto fail;
  }
  if ((rc = parse_params(c, qm ? qm + 1 : NULL, uri))) goto fail;
  size_t n = 0;
  if (c->dns) {
    const char *why = kvdex__check_authority(hosts);
    const char *colon = strrchr(hosts, ':');
    if (!why && (hosts[0] == '[' || colon - hosts >= (ptrdiff_t)sizeof c->dns_host))
      why = "dns:/// takes a host name, not an address";
    if (why) {
      rc = kvdex__seterr(KVDEX_EINVAL, "bad uri \"%.200s\": %s", uri, why);
      goto fail;
    }
    snprintf(c->dns_host, sizeof c->dns_host, "%.*s", (int)(colon - hosts), hosts);
    snprintf(c->dns_port, sizeof c->dns_port, "%s", colon + 1);
    if ((rc = kvdex__cl_resolve(c, addrs, &n))) goto fail;
    atomic_store(&c->next_resolve, kvdex__now_ms() + c->resolve_ms);
  } else {
    for (char *h = hosts, *next; h; h = next) {
      char *comma = strchr(h, ',');
      next = comma ? comma + 1 : NULL;
      if (comma) *comma = '\0';
      const char *why = h[0] ? kvdex__check_authority(h) : "an empty host between commas";
      if (why) {
        rc = kvdex__seterr(KVDEX_EINVAL, "bad uri \"%.200s\": host \"%.100s\": %s",
                           uri, h, why);
        goto fail;
      }
      if (n == KVDEX__MAX_NODES) {
        rc = kvdex__seterr(KVDEX_EINVAL, "more than %d nodes", KVDEX__MAX_NODES);
        goto fail;
      }
      for (size_t i = 0; i < n; i++)
        if (!strcmp(addrs[i], h)) {
          rc = kvdex__seterr(KVDEX_EINVAL, "node %s is listed twice", h);
          goto fail;
        }
      snprintf(addrs[n++], KVDEX__CL_ADDR_MAX, "%s", h);
    }
    if (n == 0) {
      rc = kvdex__seterr(KVDEX_EINVAL, "bad uri \"%.200s\": no host", uri);
      goto fail;
    }
  }
  if ((rc = kvdex__cl_set_nodes(c, addrs, n))) goto fail;
  for (size_t i = 0; i < c->n_nodes; i++)
    if (!c->nodes[i]->db) {
      rc = kvdex__seterr(KVDEX_EINVAL, "node %s: %s", c->nodes[i]->addr,
                         c->nodes[i]->open_err);
      goto fail;
    }
  free(addrs);
  free(hosts);
  *out = &c->base;
  return KVDEX_OK;
fail:
  free(addrs);
  free(hosts);
  cl_close(&c->base);
  return rc;
}