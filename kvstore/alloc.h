/* alloc: the KV memory allocator behind kvstore. One allocator = one jemalloc arena
 * (mallocx/sdallocx with MALLOCX_ARENA, no thread cache), so the arena's statistics
 * tell exactly what the store holds. Under --config=asan it is built on
 * posix_memalign/free with a byte counter instead, because jemalloc and ASan both
 * replace malloc and do not mix. It does no accounting against a cap: that is
 * kvstore's job. Internal to kvstore (the `kvdex__` prefix); not installed.
 */
#ifndef KVDEX_KVSTORE_ALLOC_H
#define KVDEX_KVSTORE_ALLOC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Every pointer kvdex__alloc_malloc returns is aligned to this many bytes. */
#define KVDEX__ALLOC_ALIGN 64

typedef struct kvdex__alloc kvdex__alloc;

/* Creates an allocator (a fresh jemalloc arena). 0, or KVDEX_ENOMEM / KVDEX_EINTERNAL
 * with a message. */
int kvdex__alloc_create(kvdex__alloc **out /* OUT */);
/* Releases the allocator. Every block must have been freed before. NULL is a no-op. */
void kvdex__alloc_destroy(kvdex__alloc *a);

/* size bytes (size > 0), KVDEX__ALLOC_ALIGN-aligned, uninitialised; NULL on failure.
 * Thread-safe. Sets no error message (the caller knows the context). */
void *kvdex__alloc_malloc(kvdex__alloc *a, size_t size);
/* Like kvdex__alloc_malloc, zero-filled. */
void *kvdex__alloc_zalloc(kvdex__alloc *a, size_t size);
/* Frees p (NULL is a no-op); size must be the size it was allocated with. */
void kvdex__alloc_free(kvdex__alloc *a, void *p, size_t size);

/* Bytes the allocator reports live: jemalloc's small + large "allocated" statistics of
 * this arena (size-class rounded, so a little above the requested sizes), or the sum of
 * requested sizes in the malloc build. Refreshes jemalloc's stats epoch: not for hot
 * paths. */
uint64_t kvdex__alloc_live_bytes(kvdex__alloc *a);

/* "jemalloc" or "malloc": which backend this build uses. */
const char *kvdex__alloc_backend(void);

/* Fault injection for tests: after `n` more successful allocations, every allocation
 * fails until this is called again with n < 0 (the default: never fail). */
void kvdex__alloc_fail_after(kvdex__alloc *a, int64_t n);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_KVSTORE_ALLOC_H */
