/* auth: the bearer-token table of `kvdex serve --auth-file`. Each token is allowed a
 * set of namespaces (or all of them). It parses the file and answers "which entry is
 * this token" (in constant time over the table) and "may this entry use namespace
 * ns"; it does not read gRPC metadata or decide status codes (workers/server.c does).
 * A table is immutable once loaded, so lookups are thread-safe.
 */
#ifndef KVDEX_AUTH_H
#define KVDEX_AUTH_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvdex_auth kvdex_auth;
typedef struct kvdex_auth_entry kvdex_auth_entry;

/* Loads `path`: one token per line, `TOKEN NS1,NS2,...` (`*` = every namespace),
 * blank lines and lines starting with `#` ignored. Errors: KVDEX_EIO (cannot read),
 * KVDEX_EINVAL (a bad line, a bad namespace name, a duplicate token, no token at
 * all), KVDEX_ENOMEM; kvdex_errmsg() names the line. */
int kvdex_auth_load(const char *path, kvdex_auth **out /* OUT */);

/* The same, from text in memory (tests). `origin` names it in messages. */
int kvdex_auth_parse(const char *text, size_t len, const char *origin,
                     kvdex_auth **out /* OUT */);

void kvdex_auth_free(kvdex_auth *a); /* NULL is a no-op */

/* The entry of `token` (len bytes, not NUL-terminated), or NULL. Every entry is
 * compared, each in time that depends only on len, so timing does not tell how
 * much of a token matched. Owned by the table. */
const kvdex_auth_entry *kvdex_auth_find(const kvdex_auth *a, const char *token, size_t len);

/* 1 if the entry may use namespace `ns` (NUL-terminated), else 0. */
int kvdex_auth_allows(const kvdex_auth_entry *e, const char *ns);

/* 1 if the entry may use every namespace (`*`). */
int kvdex_auth_allows_all(const kvdex_auth_entry *e);

/* Number of tokens in the table. */
size_t kvdex_auth_count(const kvdex_auth *a);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_AUTH_H */
