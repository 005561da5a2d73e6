/* kvdex.c — the public entry points of the C client: URI parsing, kvdex_open/close,
 * argument checks that need no knowledge of the sequence, and dispatch through the
 * transport vtable (client_int.h) to local.c, grpc.c or cluster.c. The free functions
 * of the public result structs live here too. No I/O and no transport logic here.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/client_int.h"
#include "client/cluster_int.h"
#include "proto/rpc.h"

/* Most sequences in one kvdex_search call. The other limits checked here are the
 * wire contract's (proto/rpc.h), which "local:" keeps too. */
#define KVDEX__MAX_BATCH 65536

#define URI_FORMS                                                                        \
  "expected \"local:\", \"grpc://host:port\" or \"grpcs://host:port\" (IPv6: "             \
  "\"grpc://[addr]:port\"), or a cluster: \"grpc://h1:port,h2:port?replicas=2\" or "       \
  "\"dns:///name:port\""

/* ---- URI parsing -------------------------------------------------------------- */

static int is_host_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '-' || c == '_';
}

static int is_ip6_char(char c) {
  return (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') || (c >= '0' && c <= '9') || c == ':' ||
         c == '.' || c == '%' || is_host_char(c); /* zone ids ("%eth0") may hold letters */
}

/* Checks "host:port" or "[addr]:port"; returns 0 or a static reason. */
const char *kvdex__check_authority(const char *a) {
  const char *port;
  if (a[0] == '\0') return "missing host:port";
  if (a[0] == '[') {
    const char *close = strchr(a, ']');
    if (!close) return "missing ']' after an IPv6 address";
    if (close == a + 1) return "empty IPv6 address";
    for (const char *p = a + 1; p < close; p++)
      if (!is_ip6_char(*p)) return "bad character in the IPv6 address";
    if (close[1] != ':') return "missing ':port' after the IPv6 address";
    port = close + 2;
  } else {
    const char *colon = strrchr(a, ':');
    if (!colon) return "missing ':port'";
    if (colon == a) return "missing host";
    for (const char *p = a; p < colon; p++) {
      if (*p == ':') return "an IPv6 address must be written in brackets";
      if (!is_host_char(*p)) return "bad character in the host name";
    }
    port = colon + 1;
  }
  if (*port == '\0') return "missing port number";
  unsigned long v = 0;
  for (const char *p = port; *p; p++) {
    if (*p < '0' || *p > '9') return "the port is not a number";
    v = v * 10 + (unsigned long)(*p - '0');
    if (v > 65535) return "the port is out of range (1..65535)";
  }
  if (v == 0) return "the port is out of range (1..65535)";
  return NULL;
}

/* ---- open / close ------------------------------------------------------------- */

int kvdex_open(const char *uri, const kvdex_open_opts *opts, kvdex_db **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "kvdex_open: out is NULL");
  *out = NULL;
  if (!uri) return kvdex__seterr(KVDEX_EINVAL, "kvdex_open: uri is NULL; " URI_FORMS);
  const char *ns = (opts && opts->name_space && opts->name_space[0]) ? opts->name_space
                                                                     : KVDEX_DEFAULT_NAMESPACE;
  if (strlen(ns) > KVDEX_MAX_NAMESPACE || kvdex__name_check(ns, "x") != 0)
    return kvdex__seterr(KVDEX_EINVAL,
                         "kvdex_open: bad namespace \"%.80s\": 1..%d bytes of [A-Za-z0-9._-]", ns,
                         KVDEX_MAX_NAMESPACE);

  kvdex_db *db = NULL;
  int rc;
  if (strcmp(uri, "local:") == 0) {
    rc = kvdex__local_open(opts, &db);
  } else if (kvdex__is_cluster_uri(uri)) {
    rc = kvdex__cluster_open(uri, opts, &db);
    if (rc == KVDEX_EINVAL) {
      char why[600];
      snprintf(why, sizeof why, "%s", kvdex_errmsg());
      return kvdex__seterr(rc, "kvdex_open: %s; " URI_FORMS, why);
    }
  } else if (strncmp(uri, "grpc://", 7) == 0 || strncmp(uri, "grpcs://", 8) == 0) {
    int tls = uri[4] == 's';
    const char *why = kvdex__check_authority(uri + 7 + tls);
    if (why) return kvdex__seterr(KVDEX_EINVAL, "kvdex_open: bad uri \"%.200s\": %s; " URI_FORMS,
                                  uri, why);
    rc = kvdex__grpc_open(uri + 7 + tls, tls, opts, &db);
  } else {
    return kvdex__seterr(KVDEX_EINVAL, "kvdex_open: bad uri \"%.200s\": " URI_FORMS, uri);
  }
  if (rc) return kvdex__preerr(rc, "kvdex_open");
  snprintf(db->ns, sizeof db->ns, "%s", ns);
  *out = db;
  return KVDEX_OK;
}

void kvdex_close(kvdex_db *db) {
  if (db) db->vt->close(db);
}

/* ---- argument checks ---------------------------------------------------------- */

static int check_db(const kvdex_db *db, const char *fn) {
  if (!db) return kvdex__seterr(KVDEX_EINVAL, "%s: db is NULL", fn);
  return KVDEX_OK;
}

static int check_seq(const kvdex_db *db, const char *seq_id, const char *fn) {
  if (!seq_id) return kvdex__seterr(KVDEX_EINVAL, "%s: seq_id is NULL", fn);
  if (seq_id[0] == '\0' || strlen(seq_id) > KVDEX_MAX_SEQ_ID || kvdex__name_check(db->ns, seq_id))
    return kvdex__seterr(KVDEX_EINVAL,
                         "%s: bad sequence id \"%.80s\": 1..%d bytes of [A-Za-z0-9._:/-]", fn,
                         seq_id, KVDEX_MAX_SEQ_ID);
  return KVDEX_OK;
}

/* Prefixes a transport's message with the public function's name. */
static int pre(int rc, const char *fn) { return rc ? kvdex__preerr(rc, fn) : KVDEX_OK; }

#define CHECK(expr)         \
  do {                      \
    int rc_ = (expr);       \
    if (rc_) return rc_;    \
  } while (0)

/* ---- sequences ---------------------------------------------------------------- */

int kvdex_create(kvdex_db *db, const char *seq_id, const kvdex_shape *shape) {
  CHECK(check_db(db, "kvdex_create"));
  CHECK(check_seq(db, seq_id, "kvdex_create"));
  if (!shape) return kvdex__seterr(KVDEX_EINVAL, "kvdex_create: shape is NULL");
  if (kvdex__shape_check(shape)) return kvdex__preerr(KVDEX_EINVAL, "kvdex_create");
  return pre(db->vt->create(db, seq_id, shape), "kvdex_create");
}

int kvdex_delete(kvdex_db *db, const char *seq_id, uint64_t *bytes_freed) {
  CHECK(check_db(db, "kvdex_delete"));
  CHECK(check_seq(db, seq_id, "kvdex_delete"));
  return pre(db->vt->del(db, seq_id, bytes_freed), "kvdex_delete");
}

int kvdex_stat(kvdex_db *db, const char *seq_id, kvdex_seq_info *info) {
  if (info) memset(info, 0, sizeof *info);
  CHECK(check_db(db, "kvdex_stat"));
  CHECK(check_seq(db, seq_id, "kvdex_stat"));
  if (!info) return kvdex__seterr(KVDEX_EINVAL, "kvdex_stat: info is NULL");
  return pre(db->vt->stat(db, seq_id, info), "kvdex_stat");
}

void kvdex_seq_info_free(kvdex_seq_info *info) {
  if (!info) return;
  free(info->layer_tokens);
  free(info->layer_query_tokens);
  free(info->layer_landmark_blocks);
  free(info->indexes);
  info->layer_tokens = NULL;
  info->layer_query_tokens = NULL;
  info->layer_landmark_blocks = NULL;
  info->indexes = NULL;
  info->n_layers = 0;
  info->n_indexes = 0;
}

int kvdex_list(kvdex_db *db, char ***ids, size_t *n) {
  if (ids) *ids = NULL;
  if (n) *n = 0;
  CHECK(check_db(db, "kvdex_list"));
  if (!ids || !n) return kvdex__seterr(KVDEX_EINVAL, "kvdex_list: ids and n must not be NULL");
  return pre(db->vt->list(db, ids, n), "kvdex_list");
}

void kvdex_list_free(char **ids, size_t n) {
  if (!ids) return;
  for (size_t i = 0; i < n; i++) free(ids[i]);
  free(ids);
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

void kvdex__sort_ids(char **ids, size_t n) {
  if (n > 1) qsort(ids, n, sizeof *ids, cmp_str);
}

/* ---- append ------------------------------------------------------------------- */

int kvdex_append_begin(kvdex_db *db, const char *seq_id, kvdex_appender **out) {
  if (out) *out = NULL;
  CHECK(check_db(db, "kvdex_append_begin"));
  CHECK(check_seq(db, seq_id, "kvdex_append_begin"));
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "kvdex_append_begin: out is NULL");
  return pre(db->vt->append_begin(db, seq_id, out), "kvdex_append_begin");
}

/* Records the first failure of a stream; later calls and commit report it. */
static int poison(kvdex_appender *ap, int rc) {
  if (!ap->failed) {
    ap->failed = rc;
    snprintf(ap->why, sizeof ap->why, "%s", kvdex_errmsg());
  }
  return rc;
}

int kvdex_append_kv(kvdex_appender *ap, uint32_t layer, uint64_t token_start, uint32_t n_tokens,
                    const void *k, const void *v) {
  return kvdex_append_kvq(ap, layer, token_start, n_tokens, k, v, NULL);
}

int kvdex_append_kvq(kvdex_appender *ap, uint32_t layer, uint64_t token_start, uint32_t n_tokens,
                     const void *k, const void *v, const void *q) {
  return kvdex_append_kvl(ap, layer, token_start, n_tokens, k, v, q, NULL);
}

int kvdex_append_kvl(kvdex_appender *ap, uint32_t layer, uint64_t token_start, uint32_t n_tokens,
                     const void *k, const void *v, const void *q, const void *landmarks) {
  if (!ap) return kvdex__seterr(KVDEX_EINVAL, "kvdex_append_kv: appender is NULL");
  if (ap->failed)
    return kvdex__seterr(ap->failed,
                         "kvdex_append_kv: the stream already failed, only commit or abort are "
                         "allowed: %s",
                         ap->why);
  if (!k || !v)
    return poison(ap, kvdex__seterr(KVDEX_EINVAL, "kvdex_append_kv: k and v must not be NULL"));
  if (n_tokens == 0)
    return poison(ap, kvdex__seterr(KVDEX_EINVAL, "kvdex_append_kv: n_tokens must be > 0"));
  if (layer >= ap->shape.n_layers)
    return poison(ap, kvdex__seterr(KVDEX_EINVAL,
                                    "kvdex_append_kv: layer %u out of range (n_layers %u)", layer,
                                    ap->shape.n_layers));
  if (token_start > UINT64_MAX - n_tokens)
    return poison(ap, kvdex__seterr(KVDEX_EINVAL, "kvdex_append_kv: token range overflows"));
  const uint64_t bt = ap->shape.block_tokens ? ap->shape.block_tokens : KVDEX_DEFAULT_BLOCK_TOKENS;
  if ((token_start + n_tokens) / bt == token_start / bt) landmarks = NULL; /* no block ends */
  int rc = ap->db->vt->append_kv(ap, layer, token_start, n_tokens, k, v, q, landmarks);
  return rc ? poison(ap, kvdex__preerr(rc, "kvdex_append_kv")) : KVDEX_OK;
}

int kvdex_append_commit(kvdex_appender *ap, uint64_t *tokens_appended) {
  if (tokens_appended) *tokens_appended = 0;
  if (!ap) return kvdex__seterr(KVDEX_EINVAL, "kvdex_append_commit: appender is NULL");
  if (ap->failed) {
    int rc = ap->failed;
    char why[sizeof ap->why];
    memcpy(why, ap->why, sizeof why);
    ap->db->vt->append_abort(ap);
    return kvdex__seterr(rc, "kvdex_append_commit: nothing was stored, the stream failed: %s", why);
  }
  return pre(ap->db->vt->append_commit(ap, tokens_appended), "kvdex_append_commit");
}

void kvdex_append_abort(kvdex_appender *ap) {
  if (ap) ap->db->vt->append_abort(ap);
}

/* ---- read --------------------------------------------------------------------- */

int kvdex_read(kvdex_db *db, const char *seq_id, uint32_t layer, const uint64_t *token_ids,
               size_t n, void *k_out, void *v_out) {
  CHECK(check_db(db, "kvdex_read"));
  CHECK(check_seq(db, seq_id, "kvdex_read"));
  if (n > 0 && (!token_ids || !k_out || !v_out))
    return kvdex__seterr(KVDEX_EINVAL, "kvdex_read: token_ids, k_out and v_out must not be NULL");
  if (n > (size_t)1 << 40) return kvdex__seterr(KVDEX_EINVAL, "kvdex_read: n %zu is too large", n);
  return pre(db->vt->read(db, seq_id, layer, token_ids, n, k_out, v_out), "kvdex_read");
}

/* ---- search ------------------------------------------------------------------- */

int kvdex__search_out_alloc(kvdex_search_out *out, uint32_t n_q_heads, size_t total_hits,
                            uint64_t **ids, float **scores) {
  size_t head_bytes = (size_t)n_q_heads * sizeof(kvdex_hits);
  if (total_hits > (SIZE_MAX - head_bytes) / (sizeof(uint64_t) + sizeof(float)))
    return kvdex__seterr(KVDEX_ENOMEM, "search: result too large");
  size_t bytes = head_bytes + total_hits * (sizeof(uint64_t) + sizeof(float));
  char *block = calloc(1, bytes ? bytes : 1);
  if (!block) return kvdex__seterr(KVDEX_ENOMEM, "search: out of memory for %zu bytes", bytes);
  out->n_q_heads = n_q_heads;
  out->heads = (kvdex_hits *)block;
  *ids = (uint64_t *)(block + head_bytes);
  *scores = (float *)(block + head_bytes + total_hits * sizeof(uint64_t));
  return KVDEX_OK;
}

void kvdex_search_out_free(kvdex_search_out *out) {
  if (!out) return;
  free(out->heads); /* one block: see kvdex__search_out_alloc */
  memset(out, 0, sizeof *out);
}

int kvdex_search(kvdex_db *db, uint32_t layer, const kvdex_search_req *req, size_t n_seqs,
                 const char *const *seq_ids, const float *const *q, kvdex_search_out *out) {
  if (n_seqs > KVDEX__MAX_BATCH)
    return kvdex__seterr(KVDEX_EINVAL, "kvdex_search: n_seqs %zu is too large (max %d)", n_seqs,
                         KVDEX__MAX_BATCH);
  if (out) memset(out, 0, n_seqs * sizeof *out);
  CHECK(check_db(db, "kvdex_search"));
  if (!req) return kvdex__seterr(KVDEX_EINVAL, "kvdex_search: req is NULL");
  if (req->k == 0 || req->k > KVDEX_MAX_K)
    return kvdex__seterr(KVDEX_EINVAL, "kvdex_search: k = %u out of range (1..%d)", req->k,
                         KVDEX_MAX_K);
  if (n_seqs == 0) return KVDEX_OK;
  if (!seq_ids || !q || !out)
    return kvdex__seterr(KVDEX_EINVAL, "kvdex_search: seq_ids, q and out must not be NULL");
  for (size_t i = 0; i < n_seqs; i++) {
    CHECK(check_seq(db, seq_ids[i], "kvdex_search"));
    if (!q[i]) return kvdex__seterr(KVDEX_EINVAL, "kvdex_search: q[%zu] is NULL", i);
  }
  return pre(db->vt->search(db, layer, req, n_seqs, seq_ids, q, out), "kvdex_search");
}

/* ---- retrieval indexes ------------------------------------------------------------ */

int kvdex_build_index(kvdex_db *db, const char *seq_id, uint32_t layer, const char *spec) {
  CHECK(check_db(db, "kvdex_build_index"));
  CHECK(check_seq(db, seq_id, "kvdex_build_index"));
  if (!spec || !spec[0])
    return kvdex__seterr(KVDEX_EINVAL,
                         "kvdex_build_index: spec is empty (e.g. \"graph:degree=32\", "
                         "\"ivf:nlist=256\", \"hnsw:M=32\", \"landmark:mode=minmax\")");
  if (strlen(spec) >= 512)
    return kvdex__seterr(KVDEX_EINVAL, "kvdex_build_index: spec is longer than 511 bytes");
  return pre(db->vt->build_index(db, seq_id, layer, spec), "kvdex_build_index");
}

/* ---- attention ------------------------------------------------------------------- */

int kvdex_attend(kvdex_db *db, uint32_t layer, const kvdex_attend_options *opts, size_t n_items,
                 const kvdex_attend_item *items, float *const *o, float *const *lse,
                 kvdex_attend_info *info) {
  if (n_items > KVDEX_RPC_MAX_ATTEND_ITEMS)
    return kvdex__seterr(KVDEX_EINVAL, "kvdex_attend: n_items %zu is too large (max %d)",
                         n_items, KVDEX_RPC_MAX_ATTEND_ITEMS);
  if (info) memset(info, 0, n_items * sizeof *info);
  CHECK(check_db(db, "kvdex_attend"));
  if (!opts) return kvdex__seterr(KVDEX_EINVAL, "kvdex_attend: opts is NULL");
  if (!opts->dense && (opts->k == 0 || opts->k > KVDEX_MAX_K))
    return kvdex__seterr(KVDEX_EINVAL, "kvdex_attend: k = %u out of range (1..%d) without dense",
                         opts->k, KVDEX_MAX_K);
  if (!(opts->scale >= 0) || opts->scale > 3.4e38f)
    return kvdex__seterr(KVDEX_EINVAL, "kvdex_attend: scale must be finite and >= 0");
  if (n_items == 0) return KVDEX_OK;
  if (!items || !o || !lse)
    return kvdex__seterr(KVDEX_EINVAL, "kvdex_attend: items, o and lse must not be NULL");
  for (size_t i = 0; i < n_items; i++) {
    CHECK(check_seq(db, items[i].seq_id, "kvdex_attend"));
    if (!items[i].q || !o[i] || !lse[i])
      return kvdex__seterr(KVDEX_EINVAL, "kvdex_attend: item %zu: q, o and lse must not be NULL",
                           i);
    if (items[i].n_extra > KVDEX_MAX_EXTRA_TOKENS || (items[i].n_extra && !items[i].extra))
      return kvdex__seterr(KVDEX_EINVAL,
                           "kvdex_attend: item %zu: %u extra tokens (at most %d, extra non-NULL)",
                           i, items[i].n_extra, KVDEX_MAX_EXTRA_TOKENS);
  }
  int rc = db->vt->attend(db, layer, opts, n_items, items, o, lse, info);
  if (rc && info) memset(info, 0, n_items * sizeof *info);
  return pre(rc, "kvdex_attend");
}

int kvdex_retain(kvdex_db *db, const char *seq_id, uint32_t layer, const float *q_obs,
                 uint32_t n_obs, const kvdex_retain_options *opts, uint64_t *ids,
                 float *scores) {
  CHECK(check_db(db, "kvdex_retain"));
  CHECK(check_seq(db, seq_id, "kvdex_retain"));
  if (!opts || !q_obs || !ids)
    return kvdex__seterr(KVDEX_EINVAL, "kvdex_retain: opts, q_obs and ids must not be NULL");
  if (n_obs == 0 || n_obs > KVDEX_MAX_OBS)
    return kvdex__seterr(KVDEX_EINVAL, "kvdex_retain: n_obs = %u out of range (1..%d)", n_obs,
                         KVDEX_MAX_OBS);
  if (opts->budget == 0)
    return kvdex__seterr(KVDEX_EINVAL, "kvdex_retain: budget must be > 0");
  return pre(db->vt->retain(db, seq_id, layer, q_obs, n_obs, opts, ids, scores), "kvdex_retain");
}
