/* auth: parsing and lookup of the bearer-token table (see auth.h). */
#include "workers/auth.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvstore/base.h"
#include "kvstore/kvstore.h"

struct kvdex_auth_entry {
  char *token;
  size_t len;
  int all;      /* `*`: every namespace */
  char **ns;    /* allowed namespaces */
  size_t n_ns;
};

struct kvdex_auth {
  kvdex_auth_entry *e;
  size_t n;
};

static void entry_free(kvdex_auth_entry *e) {
  free(e->token);
  for (size_t i = 0; i < e->n_ns; i++) free(e->ns[i]);
  free(e->ns);
}

void kvdex_auth_free(kvdex_auth *a) {
  if (!a) return;
  for (size_t i = 0; i < a->n; i++) entry_free(&a->e[i]);
  free(a->e);
  free(a);
}

size_t kvdex_auth_count(const kvdex_auth *a) { return a ? a->n : 0; }

/* Equal in time that depends on `len` only (not on where the first difference is). */
static int ct_equal(const char *a, size_t len, const char *b, size_t blen) {
  unsigned char acc = (unsigned char)(len != blen);
  for (size_t i = 0; i < len; i++)
    acc |= (unsigned char)a[i] ^ (unsigned char)(blen ? b[i % blen] : 0);
  return acc == 0 && len == blen;
}

const kvdex_auth_entry *kvdex_auth_find(const kvdex_auth *a, const char *token, size_t len) {
  if (!a || !token || len == 0) return NULL;
  const kvdex_auth_entry *hit = NULL;
  for (size_t i = 0; i < a->n; i++) /* no early exit */
    if (ct_equal(token, len, a->e[i].token, a->e[i].len)) hit = &a->e[i];
  return hit;
}

int kvdex_auth_allows(const kvdex_auth_entry *e, const char *ns) {
  if (!e || !ns) return 0;
  if (e->all) return 1;
  for (size_t i = 0; i < e->n_ns; i++)
    if (!strcmp(e->ns[i], ns)) return 1;
  return 0;
}

int kvdex_auth_allows_all(const kvdex_auth_entry *e) { return e && e->all; }

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\r'; }

/* Parses one non-comment line into *e. */
static int parse_line(const char *p, const char *end, const char *origin, int lineno,
                      kvdex_auth_entry *e) {
  memset(e, 0, sizeof *e);
  const char *t = p;
  while (p < end && !is_space(*p)) p++;
  size_t tlen = (size_t)(p - t);
  while (p < end && is_space(*p)) p++;
  const char *nl = p, *nend = end;
  while (nend > nl && is_space(nend[-1])) nend--;
  if (nl == nend)
    return kvdex__seterr(KVDEX_EINVAL, "%s:%d: expected `TOKEN NS1,NS2,...` (or `TOKEN *`)",
                         origin, lineno);
  for (const char *q = nl; q < nend; q++)
    if (is_space(*q))
      return kvdex__seterr(KVDEX_EINVAL, "%s:%d: namespaces are one comma-separated list "
                           "without spaces", origin, lineno);
  e->token = malloc(tlen + 1);
  if (!e->token) return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  memcpy(e->token, t, tlen);
  e->token[tlen] = 0;
  e->len = tlen;
  size_t cap = 1;
  for (const char *q = nl; q < nend; q++) cap += *q == ',';
  e->ns = calloc(cap, sizeof *e->ns);
  if (!e->ns) return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  const char *s = nl;
  while (s <= nend) {
    const char *c = s;
    while (c < nend && *c != ',') c++;
    size_t n = (size_t)(c - s);
    if (n == 1 && *s == '*') {
      e->all = 1;
    } else {
      char *name = malloc(n + 1);
      if (!name) return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
      memcpy(name, s, n);
      name[n] = 0;
      e->ns[e->n_ns++] = name;
      if (n == 0 || kvdex__name_check(name, "x"))
        return kvdex__seterr(KVDEX_EINVAL, "%s:%d: bad namespace \"%.80s\"", origin, lineno,
                             name);
    }
    s = c + 1;
  }
  return KVDEX_OK;
}

int kvdex_auth_parse(const char *text, size_t len, const char *origin, kvdex_auth **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "auth: out is NULL");
  *out = NULL;
  kvdex_auth *a = calloc(1, sizeof *a);
  if (!a) return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  size_t cap = 0;
  int lineno = 0, rc = KVDEX_OK;
  const char *p = text, *end = text + len;
  while (p < end && !rc) {
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    if (!eol) eol = end;
    lineno++;
    const char *s = p;
    p = eol + 1;
    while (s < eol && is_space(*s)) s++;
    if (s == eol || *s == '#') continue;
    if (a->n == cap) {
      cap = cap ? 2 * cap : 8;
      kvdex_auth_entry *e = realloc(a->e, cap * sizeof *e);
      if (!e) {
        rc = kvdex__seterr(KVDEX_ENOMEM, "out of memory");
        break;
      }
      a->e = e;
    }
    kvdex_auth_entry *e = &a->e[a->n];
    rc = parse_line(s, eol, origin, lineno, e);
    if (rc) {
      entry_free(e);
      break;
    }
    a->n++;
    for (size_t i = 0; i + 1 < a->n; i++)
      if (a->e[i].len == e->len && !memcmp(a->e[i].token, e->token, e->len)) {
        rc = kvdex__seterr(KVDEX_EINVAL, "%s:%d: the token is listed twice", origin, lineno);
        break;
      }
  }
  if (!rc && a->n == 0) rc = kvdex__seterr(KVDEX_EINVAL, "%s: no tokens", origin);
  if (rc) {
    kvdex_auth_free(a);
    return rc;
  }
  *out = a;
  return KVDEX_OK;
}

int kvdex_auth_load(const char *path, kvdex_auth **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "auth: out is NULL");
  *out = NULL;
  FILE *f = fopen(path, "rb");
  if (!f) return kvdex__seterr(KVDEX_EIO, "%s: %s", path, strerror(errno));
  size_t cap = 4096, n = 0;
  char *buf = malloc(cap);
  int rc = buf ? KVDEX_OK : kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  while (!rc) {
    if (n == cap) {
      char *b = cap < (64u << 20) ? realloc(buf, cap * 2) : NULL;
      if (!b) {
        rc = kvdex__seterr(KVDEX_EINVAL, "%s: too large", path);
        break;
      }
      buf = b;
      cap *= 2;
    }
    size_t got = fread(buf + n, 1, cap - n, f);
    n += got;
    if (got == 0) {
      if (ferror(f)) rc = kvdex__seterr(KVDEX_EIO, "%s: read error", path);
      break;
    }
  }
  fclose(f);
  if (!rc) rc = kvdex_auth_parse(buf, n, path, out);
  if (buf) memset(buf, 0, n); /* the tokens are secrets */
  free(buf);
  return rc;
}
