/* ann: the one index interface of ann.h. Parses "kind:name=value,..." specs,
 * checks every argument once, dispatches to the kind's kvdex__index_ops table
 * (ann_int.h), keeps describe() current, and frames serialisation (magic,
 * version, kind, spec, note, n_built, dim, dtype, the kind's bytes, a checksum).
 * It holds no locks: a kind that needs one (FAISS) takes its own. It does not
 * score keys itself; the kinds do.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "index/ann_int.h"

/* Every kind, in the order messages list them. */
static const kvdex__index_ops *const kinds[] = {
    &kvdex__exact_ops, &kvdex__ivf_ops, &kvdex__hnsw_ops,
#ifndef KVDEX_ANN_NO_GRAPH /* a build may leave the graph kind out */
    &kvdex__graph_ops,
#endif
    &kvdex__landmark_ops,
};
#define N_KINDS (sizeof kinds / sizeof kinds[0])

#define SPEC_MAX 512   /* longest spec accepted */
#define MAX_PARAMS 16  /* most name=value pairs in one spec */
#define MAX_DIM 65536  /* largest head_dim an index accepts */

static const kvdex__index_ops *find_kind(const char *name, size_t len) {
  for (size_t i = 0; i < N_KINDS; i++)
    if (strlen(kinds[i]->kind) == len && !memcmp(kinds[i]->kind, name, len)) return kinds[i];
  return NULL;
}

static void kind_list(char *buf, size_t len) {
  size_t off = 0;
  buf[0] = 0;
  for (size_t i = 0; i < N_KINDS && off < len; i++)
    off += (size_t)snprintf(buf + off, len - off, "%s%s", i ? ", " : "", kinds[i]->kind);
}

/* Recomputes ix->describe from the kind's normalised spec and the build note. */
static void refresh_describe(kvdex_index *ix) {
  char spec[sizeof ix->describe];
  ix->ops->spec(ix, spec, sizeof spec);
  if (ix->note[0])
    snprintf(ix->describe, sizeof ix->describe, "%s (%s)", spec, ix->note);
  else
    snprintf(ix->describe, sizeof ix->describe, "%s", spec);
}

static char *trim(char *s) {
  while (*s == ' ' || *s == '\t') s++;
  size_t n = strlen(s);
  while (n && (s[n - 1] == ' ' || s[n - 1] == '\t')) s[--n] = 0;
  return s;
}

int kvdex_index_create(const char *spec, kvdex_index **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "index: NULL out");
  *out = NULL;
  char kinds_msg[128];
  kind_list(kinds_msg, sizeof kinds_msg);
  if (!spec || !*spec)
    return kvdex__seterr(KVDEX_EINVAL, "index: empty spec (kinds: %s)", kinds_msg);
  size_t slen = strlen(spec);
  if (slen >= SPEC_MAX)
    return kvdex__seterr(KVDEX_EINVAL, "index: spec longer than %d characters", SPEC_MAX - 1);
  char tmp[SPEC_MAX];
  memcpy(tmp, spec, slen + 1);

  char *colon = strchr(tmp, ':');
  if (colon) *colon = 0;
  char *kname = trim(tmp);
  const kvdex__index_ops *ops = find_kind(kname, strlen(kname));
  if (!ops)
    return kvdex__seterr(KVDEX_EINVAL, "index: unknown kind '%.40s' (kinds: %s)", kname,
                         kinds_msg);

  kvdex_index *ix = calloc(1, sizeof *ix);
  if (!ix) return kvdex__seterr(KVDEX_ENOMEM, "index: out of memory");
  ix->ops = ops;
  int rc = ops->init(ix);
  if (rc) {
    free(ix);
    return rc;
  }
  if (colon) {
    const char *seen[MAX_PARAMS];
    size_t n_seen = 0;
    char *save = NULL;
    char *rest = colon + 1;
    if (!*trim(rest)) {
      rc = kvdex__seterr(KVDEX_EINVAL, "index: '%s:' has no parameters after the colon", ops->kind);
      goto fail;
    }
    for (char *tok = strtok_r(rest, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
      char *eq = strchr(tok, '=');
      if (!eq) {
        rc = kvdex__seterr(KVDEX_EINVAL, "index: parameter '%.40s' of %s is not name=value",
                           trim(tok), ops->kind);
        goto fail;
      }
      *eq = 0;
      char *name = trim(tok), *value = trim(eq + 1);
      if (!*name || !*value) {
        rc = kvdex__seterr(KVDEX_EINVAL, "index: empty parameter name or value in %s spec",
                           ops->kind);
        goto fail;
      }
      for (size_t i = 0; i < n_seen; i++)
        if (!strcmp(seen[i], name)) {
          rc = kvdex__seterr(KVDEX_EINVAL, "index: parameter '%s' given twice", name);
          goto fail;
        }
      if (n_seen == MAX_PARAMS) {
        rc = kvdex__seterr(KVDEX_EINVAL, "index: more than %d parameters", MAX_PARAMS);
        goto fail;
      }
      seen[n_seen++] = name;
      rc = ops->param(ix, name, value);
      if (rc) goto fail;
    }
    /* ",," or a trailing comma: strtok_r skips empty tokens, so check here. */
    if (strstr(spec, ",,") || spec[slen - 1] == ',') {
      rc = kvdex__seterr(KVDEX_EINVAL, "index: empty parameter in '%s'", spec);
      goto fail;
    }
  }
  refresh_describe(ix);
  *out = ix;
  return KVDEX_OK;
fail:
  ops->free(ix);
  free(ix);
  return rc;
}

void kvdex_index_destroy(kvdex_index *ix) {
  if (!ix) return;
  ix->ops->free(ix);
  free(ix);
}

/* A view an index can read: a known dtype, rows present for n_tokens. */
static int check_view(const kvdex_kv_view *v, const char *what) {
  if (!v) return kvdex__seterr(KVDEX_EINVAL, "%s: NULL key view", what);
  if (!kvdex_dtype_size(v->dtype))
    return kvdex__seterr(KVDEX_EINVAL, "%s: key view has unknown dtype %d", what, v->dtype);
  if (!v->head_dim || v->head_dim > MAX_DIM)
    return kvdex__seterr(KVDEX_EINVAL, "%s: key view head_dim %u out of range 1..%d", what,
                         v->head_dim, MAX_DIM);
  if (!v->block_tokens) return kvdex__seterr(KVDEX_EINVAL, "%s: key view has block_tokens 0", what);
  if (v->n_tokens && !v->k_blocks)
    return kvdex__seterr(KVDEX_EINVAL, "%s: key view has no key blocks", what);
  return 0;
}

int kvdex_index_build(kvdex_index *ix, const kvdex_index_input *in, kvdex_pool *pool) {
  if (!ix || !in) return kvdex__seterr(KVDEX_EINVAL, "index build: NULL argument");
  int rc = check_view(in->keys, "index build");
  if (rc) return rc;
  if (!in->keys->n_tokens) return kvdex__seterr(KVDEX_EINVAL, "index build: no tokens to index");
  if (in->n_train && !in->train_q)
    return kvdex__seterr(KVDEX_EINVAL, "index build: n_train %llu with NULL train_q",
                         (unsigned long long)in->n_train);
  if (in->n_landmarks && !in->landmarks)
    return kvdex__seterr(KVDEX_EINVAL, "index build: n_landmarks %llu with NULL landmarks",
                         (unsigned long long)in->n_landmarks);
  /* The contract: a failed build leaves the index unbuilt. */
  ix->n_built = 0;
  ix->note[0] = 0;
  rc = ix->ops->build(ix, in, pool);
  if (rc) {
    ix->n_built = 0;
    ix->note[0] = 0;
  } else {
    ix->n_built = in->keys->n_tokens;
    ix->dim = in->keys->head_dim;
    ix->dtype = in->keys->dtype;
  }
  refresh_describe(ix);
  return rc;
}

int kvdex_index_search(const kvdex_index *ix, const kvdex_kv_view *keys, const float *q, uint32_t k,
                       const kvdex_index_params *params, kvdex_index_scratch *scratch,
                       kvdex_hit *hits, uint32_t *n_hits, uint64_t *touched) {
  if (!ix || !q || !scratch || !hits || !n_hits || !touched)
    return kvdex__seterr(KVDEX_EINVAL, "index search: NULL argument");
  *n_hits = 0;
  *touched = 0;
  if (!ix->n_built)
    return kvdex__seterr(KVDEX_EINVAL, "index search: %s index is not built", ix->ops->kind);
  if (k == 0 || k > KVDEX_MAX_K)
    return kvdex__seterr(KVDEX_EINVAL, "index search: k=%u out of range 1..%d", k, KVDEX_MAX_K);
  int rc = check_view(keys, "index search");
  if (rc) return rc;
  if (keys->head_dim != ix->dim || keys->dtype != ix->dtype)
    return kvdex__seterr(KVDEX_EINVAL,
                         "index search: key view is %s x %u but the index was built on %s x %u",
                         kvdex_dtype_name(keys->dtype), keys->head_dim, kvdex_dtype_name(ix->dtype),
                         ix->dim);
  if (keys->n_tokens < ix->n_built)
    return kvdex__seterr(KVDEX_EINVAL,
                         "index search: key view has %llu tokens, the index covers %llu",
                         (unsigned long long)keys->n_tokens, (unsigned long long)ix->n_built);
  for (uint32_t i = 0; i < ix->dim; i++)
    if (!isfinite(q[i]))
      return kvdex__seterr(KVDEX_EINVAL, "index search: query element %u is not finite", i);
  return ix->ops->search(ix, keys, q, k, params, scratch, hits, n_hits, touched);
}

uint64_t kvdex_index_tokens(const kvdex_index *ix) { return ix ? ix->n_built : 0; }

size_t kvdex_index_memory(const kvdex_index *ix) {
  return ix ? sizeof *ix + ix->ops->memory(ix) : 0;
}

const char *kvdex_index_kind(const kvdex_index *ix) { return ix ? ix->ops->kind : ""; }

int kvdex_index_needs_landmarks(const kvdex_index *ix) {
  return ix && ix->ops->needs_landmarks && ix->ops->needs_landmarks(ix);
}

const char *kvdex_index_describe(const kvdex_index *ix) { return ix ? ix->describe : ""; }

/* ---- serialisation ------------------------------------------------------------
 * Layout (host byte order; the magic and version catch a foreign file):
 *   "KVDXANN\0"  u32 version
 *   u8 kind_len, kind      u16 spec_len, spec      u16 note_len, note
 *   u64 n_built  u32 dim  i32 dtype
 *   u64 body_len, body (the kind's save)
 *   u64 checksum of everything before it
 * Deserialisation checks the checksum first, so a flipped bit or a truncated
 * buffer never reaches a kind's loader (FAISS's reader trusts its input).
 */
static const char kMagic[8] = {'K', 'V', 'D', 'X', 'A', 'N', 'N', 0};
#define FORMAT_VERSION 1u

/* 64-bit hash, 8 bytes per step. Each step is a bijection of the running state
 * for a fixed word and of the word for a fixed state, so changing any one word
 * always changes the result; the length is mixed in at the end. */
static uint64_t checksum(const uint8_t *p, size_t n) {
  const uint64_t m = 0x9e3779b97f4a7c15ull;
  uint64_t h = 0x6a09e667f3bcc909ull;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, p + i, 8);
    h = (h ^ w) * m;
    h ^= h >> 32;
  }
  uint64_t w = 0;
  memcpy(&w, p + i, n - i);
  h = (h ^ w) * m;
  h ^= h >> 29;
  h = (h ^ (uint64_t)n) * 0xbf58476d1ce4e5b9ull;
  return h ^ (h >> 31);
}

static int put_str(kvdex__buf *b, const char *s, size_t width) {
  size_t n = strlen(s);
  uint8_t len1 = (uint8_t)n;
  uint16_t len2 = (uint16_t)n;
  int rc = width == 1 ? kvdex__buf_put(b, &len1, 1) : kvdex__buf_put(b, &len2, 2);
  return rc ? rc : kvdex__buf_put(b, s, n);
}

int kvdex_index_serialize(const kvdex_index *ix, void **buf, size_t *len) {
  if (!ix || !buf || !len) return kvdex__seterr(KVDEX_EINVAL, "index serialize: NULL argument");
  *buf = NULL;
  *len = 0;
  if (!ix->n_built)
    return kvdex__seterr(KVDEX_EINVAL, "index serialize: %s index is not built", ix->ops->kind);
  char spec[sizeof ix->describe];
  ix->ops->spec(ix, spec, sizeof spec);
  kvdex__buf b = {0};
  uint32_t version = FORMAT_VERSION;
  uint64_t n_built = ix->n_built;
  uint32_t dim = ix->dim;
  int32_t dtype = ix->dtype;
  uint64_t body_len = 0;
  size_t body_len_at;
  int rc;
  if ((rc = kvdex__buf_put(&b, kMagic, 8)) || (rc = kvdex__buf_put(&b, &version, 4)) ||
      (rc = put_str(&b, ix->ops->kind, 1)) || (rc = put_str(&b, spec, 2)) ||
      (rc = put_str(&b, ix->note, 2)) || (rc = kvdex__buf_put(&b, &n_built, 8)) ||
      (rc = kvdex__buf_put(&b, &dim, 4)) || (rc = kvdex__buf_put(&b, &dtype, 4)))
    goto fail;
  body_len_at = b.len;
  if ((rc = kvdex__buf_put(&b, &body_len, 8)) || (rc = ix->ops->save(ix, &b))) goto fail;
  body_len = b.len - body_len_at - 8;
  memcpy(b.data + body_len_at, &body_len, 8);
  uint64_t sum = checksum(b.data, b.len);
  if ((rc = kvdex__buf_put(&b, &sum, 8))) goto fail;
  *buf = b.data;
  *len = b.len;
  return KVDEX_OK;
fail:
  free(b.data);
  return rc;
}

/* Reads a length-prefixed string into out[cap] (NUL-terminated, no NULs inside). */
static int get_str(kvdex__rd *r, size_t width, char *out, size_t cap) {
  uint8_t len1 = 0;
  uint16_t len2 = 0;
  int rc = width == 1 ? kvdex__rd_get(r, &len1, 1) : kvdex__rd_get(r, &len2, 2);
  if (rc) return rc;
  size_t n = width == 1 ? len1 : len2;
  if (n >= cap) return kvdex__seterr(KVDEX_EINVAL, "index deserialize: string too long");
  if ((rc = kvdex__rd_get(r, out, n))) return rc;
  out[n] = 0;
  if (strlen(out) != n) return kvdex__seterr(KVDEX_EINVAL, "index deserialize: NUL in a string");
  return 0;
}

int kvdex_index_deserialize(const void *buf, size_t len, kvdex_index **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "index deserialize: NULL out");
  *out = NULL;
  if (!buf) return kvdex__seterr(KVDEX_EINVAL, "index deserialize: NULL buffer");
  const uint8_t *p = buf;
  if (len < 8 + 4 + 8 || memcmp(p, kMagic, 8))
    return kvdex__seterr(KVDEX_EINVAL,
                         "index deserialize: not a kvdex index (bad magic or too short)");
  uint64_t sum;
  memcpy(&sum, p + len - 8, 8);
  if (sum != checksum(p, len - 8))
    return kvdex__seterr(KVDEX_EINVAL,
                         "index deserialize: checksum mismatch (corrupt or truncated)");
  kvdex__rd r = {p + 8, len - 8 - 8};
  uint32_t version;
  char kind[32], spec[SPEC_MAX], note[sizeof((kvdex_index *)0)->note];
  uint64_t n_built, body_len;
  uint32_t dim;
  int32_t dtype;
  int rc;
  if ((rc = kvdex__rd_get(&r, &version, 4))) return KVDEX_EINVAL;
  if (version != FORMAT_VERSION)
    return kvdex__seterr(KVDEX_EINVAL, "index deserialize: format version %u, this build reads %u",
                         version, FORMAT_VERSION);
  if ((rc = get_str(&r, 1, kind, sizeof kind)) || (rc = get_str(&r, 2, spec, sizeof spec)) ||
      (rc = get_str(&r, 2, note, sizeof note)) || (rc = kvdex__rd_get(&r, &n_built, 8)) ||
      (rc = kvdex__rd_get(&r, &dim, 4)) || (rc = kvdex__rd_get(&r, &dtype, 4)) ||
      (rc = kvdex__rd_get(&r, &body_len, 8)))
    return KVDEX_EINVAL;
  if (!find_kind(kind, strlen(kind)))
    return kvdex__seterr(KVDEX_EINVAL, "index deserialize: unknown kind '%s'", kind);
  if (!n_built || !dim || dim > MAX_DIM || !kvdex_dtype_size(dtype))
    return kvdex__seterr(KVDEX_EINVAL,
                         "index deserialize: bad header (tokens %llu, dim %u, dtype %d)",
                         (unsigned long long)n_built, dim, (int)dtype);
  if (body_len != r.left)
    return kvdex__seterr(KVDEX_EINVAL, "index deserialize: body is %llu bytes, header says %llu",
                         (unsigned long long)r.left, (unsigned long long)body_len);
  kvdex_index *ix;
  if ((rc = kvdex_index_create(spec, &ix)))
    return kvdex__preerr(rc == KVDEX_ENOMEM ? rc : KVDEX_EINVAL, "index deserialize: stored spec");
  if (strcmp(ix->ops->kind, kind)) {
    kvdex_index_destroy(ix);
    return kvdex__seterr(KVDEX_EINVAL, "index deserialize: spec '%s' is not of kind %s", spec,
                         kind);
  }
  ix->n_built = n_built;
  ix->dim = dim;
  ix->dtype = dtype;
  memcpy(ix->note, note, sizeof note);
  rc = ix->ops->load(ix, &r);
  if (!rc && r.left)
    rc = kvdex__seterr(KVDEX_EINVAL, "index deserialize: %zu unread bytes after the %s body",
                       r.left, kind);
  if (rc) {
    kvdex_index_destroy(ix);
    return rc == KVDEX_ENOMEM ? rc : KVDEX_EINVAL;
  }
  refresh_describe(ix);
  *out = ix;
  return KVDEX_OK;
}
