/* ann_util: helpers shared by every index kind — serialisation buffers, the
 * per-thread search scratch and key-row access. */
#include <stdlib.h>
#include <string.h>

#include "index/ann_int.h"

int kvdex__buf_put(kvdex__buf *b, const void *p, size_t n) {
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + n) cap *= 2;
    uint8_t *d = realloc(b->data, cap);
    if (!d) return kvdex__seterr(KVDEX_ENOMEM, "index: out of memory serialising %zu bytes", cap);
    b->data = d;
    b->cap = cap;
  }
  if (n) memcpy(b->data + b->len, p, n);
  b->len += n;
  return 0;
}

int kvdex__rd_get(kvdex__rd *r, void *out, size_t n) {
  if (n > r->left) return kvdex__seterr(KVDEX_EINVAL, "index: serialised data is truncated");
  memcpy(out, r->p, n);
  r->p += n;
  r->left -= n;
  return 0;
}

int kvdex_index_scratch_create(kvdex_index_scratch **out) {
  *out = calloc(1, sizeof **out);
  return *out ? 0 : kvdex__seterr(KVDEX_ENOMEM, "index: out of memory for scratch");
}

void kvdex_index_scratch_destroy(kvdex_index_scratch *s) {
  if (!s) return;
  if (s->kind_free) s->kind_free(s->kind_state);
  free(s->visit);
  free(s->f);
  free(s->h);
  free(s);
}

int kvdex__scratch_visit_begin(kvdex_index_scratch *s, uint64_t n) {
  if (n > s->visit_cap) {
    uint32_t *v = calloc((size_t)n, sizeof *v);
    if (!v) return kvdex__seterr(KVDEX_ENOMEM, "index: out of memory for a visited set of %llu",
                                 (unsigned long long)n);
    free(s->visit);
    s->visit = v;
    s->visit_cap = (size_t)n;
    s->epoch = 0;
  }
  if (++s->epoch == 0) { /* wrapped: clear once every 4 billion searches */
    memset(s->visit, 0, s->visit_cap * sizeof *s->visit);
    s->epoch = 1;
  }
  return 0;
}

int kvdex__scratch_floats(kvdex_index_scratch *s, size_t n) {
  if (n <= s->f_cap) return 0;
  float *f = realloc(s->f, n * sizeof *f);
  if (!f) return kvdex__seterr(KVDEX_ENOMEM, "index: out of memory for scratch");
  s->f = f;
  s->f_cap = n;
  return 0;
}

int kvdex__scratch_hits(kvdex_index_scratch *s, size_t n) {
  if (n <= s->h_cap) return 0;
  kvdex_hit *h = realloc(s->h, n * sizeof *h);
  if (!h) return kvdex__seterr(KVDEX_ENOMEM, "index: out of memory for scratch");
  s->h = h;
  s->h_cap = n;
  return 0;
}

void kvdex__view_row_f32(const kvdex_kv_view *v, uint64_t id, float *out) {
  kvdex__to_f32(v->dtype, kvdex__view_row(v, id), out, v->head_dim);
}
