/* alloc: kvstore's allocator, two backends chosen at build time (kvstore/BUILD):
 *  - default: a private jemalloc arena, mallocx/sdallocx with MALLOCX_TCACHE_NONE so
 *    that freed memory goes straight back to that arena and its stats stay exact;
 *  - KVDEX_ALLOC_MALLOC (--config=asan): posix_memalign/free and our own counter.
 * It never sets error messages on the allocation path and never prints.
 */
#include "kvstore/alloc.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvstore/base.h"

#ifndef KVDEX_ALLOC_MALLOC
#include <jemalloc/jemalloc.h>
#endif

struct kvdex__alloc {
#ifndef KVDEX_ALLOC_MALLOC
  unsigned arena;
  int flags; /* MALLOCX_ARENA | MALLOCX_TCACHE_NONE | MALLOCX_ALIGN */
#endif
  _Atomic uint64_t live;      /* requested bytes live (malloc backend only) */
  _Atomic int64_t fail_after; /* < 0: never fail (fault injection for tests) */
};

/* true if this allocation must fail because of fault injection */
static bool alloc_should_fail(kvdex__alloc *a) {
  if (atomic_load_explicit(&a->fail_after, memory_order_relaxed) < 0) return false;
  return atomic_fetch_sub_explicit(&a->fail_after, 1, memory_order_relaxed) <= 0;
}

void kvdex__alloc_fail_after(kvdex__alloc *a, int64_t n) {
  atomic_store_explicit(&a->fail_after, n < 0 ? -1 : n, memory_order_relaxed);
}

#ifndef KVDEX_ALLOC_MALLOC /* ---------------------------- jemalloc backend ------- */

const char *kvdex__alloc_backend(void) { return "jemalloc"; }

int kvdex__alloc_create(kvdex__alloc **out) {
  *out = NULL;
  kvdex__alloc *a = calloc(1, sizeof *a);
  if (!a) return kvdex__seterr(KVDEX_ENOMEM, "allocator: out of memory");
  size_t sz = sizeof a->arena;
  int rc = mallctl("arenas.create", &a->arena, &sz, NULL, 0);
  if (rc != 0) {
    free(a);
    return kvdex__seterr(KVDEX_EINTERNAL, "allocator: jemalloc arenas.create failed (%s)",
                         strerror(rc));
  }
  a->flags = (int)(MALLOCX_ARENA(a->arena) | MALLOCX_TCACHE_NONE |
                   MALLOCX_ALIGN(KVDEX__ALLOC_ALIGN));
  atomic_init(&a->live, 0);
  atomic_init(&a->fail_after, -1);
  *out = a;
  return KVDEX_OK;
}

void kvdex__alloc_destroy(kvdex__alloc *a) {
  if (!a) return;
  char name[64];
  snprintf(name, sizeof name, "arena.%u.destroy", a->arena);
  int rc = mallctl(name, NULL, NULL, NULL, 0);
  if (rc != 0) KVDEX_LOG(KVDEX_LOG_WARN, "allocator: %s failed (%s)", name, strerror(rc));
  free(a);
}

void *kvdex__alloc_malloc(kvdex__alloc *a, size_t size) {
  if (size == 0 || alloc_should_fail(a)) return NULL;
  return mallocx(size, a->flags);
}

void *kvdex__alloc_zalloc(kvdex__alloc *a, size_t size) {
  if (size == 0 || alloc_should_fail(a)) return NULL;
  return mallocx(size, a->flags | MALLOCX_ZERO);
}

void kvdex__alloc_free(kvdex__alloc *a, void *p, size_t size) {
  if (p) sdallocx(p, size, a->flags);
}

uint64_t kvdex__alloc_live_bytes(kvdex__alloc *a) {
  uint64_t epoch = 1;
  size_t sz = sizeof epoch;
  if (mallctl("epoch", &epoch, &sz, &epoch, sz) != 0) return 0;
  char name[96];
  size_t small = 0, large = 0;
  sz = sizeof small;
  snprintf(name, sizeof name, "stats.arenas.%u.small.allocated", a->arena);
  if (mallctl(name, &small, &sz, NULL, 0) != 0) small = 0;
  sz = sizeof large;
  snprintf(name, sizeof name, "stats.arenas.%u.large.allocated", a->arena);
  if (mallctl(name, &large, &sz, NULL, 0) != 0) large = 0;
  return (uint64_t)small + (uint64_t)large;
}

#else /* ----------------------------------------------- malloc backend (ASan) ----- */

const char *kvdex__alloc_backend(void) { return "malloc"; }

int kvdex__alloc_create(kvdex__alloc **out) {
  *out = NULL;
  kvdex__alloc *a = calloc(1, sizeof *a);
  if (!a) return kvdex__seterr(KVDEX_ENOMEM, "allocator: out of memory");
  atomic_init(&a->live, 0);
  atomic_init(&a->fail_after, -1);
  *out = a;
  return KVDEX_OK;
}

void kvdex__alloc_destroy(kvdex__alloc *a) {
  if (!a) return;
  uint64_t live = atomic_load(&a->live);
  if (live != 0) KVDEX_LOG(KVDEX_LOG_WARN, "allocator: destroyed with %llu bytes live",
                           (unsigned long long)live);
  free(a);
}

void *kvdex__alloc_malloc(kvdex__alloc *a, size_t size) {
  void *p = NULL;
  if (size == 0 || alloc_should_fail(a)) return NULL;
  if (posix_memalign(&p, KVDEX__ALLOC_ALIGN, size) != 0) return NULL;
  atomic_fetch_add_explicit(&a->live, size, memory_order_relaxed);
  return p;
}

void *kvdex__alloc_zalloc(kvdex__alloc *a, size_t size) {
  void *p = kvdex__alloc_malloc(a, size);
  if (p) memset(p, 0, size);
  return p;
}

void kvdex__alloc_free(kvdex__alloc *a, void *p, size_t size) {
  if (!p) return;
  free(p);
  atomic_fetch_sub_explicit(&a->live, size, memory_order_relaxed);
}

uint64_t kvdex__alloc_live_bytes(kvdex__alloc *a) {
  return atomic_load_explicit(&a->live, memory_order_relaxed);
}

#endif
