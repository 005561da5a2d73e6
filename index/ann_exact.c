/* ann_exact: the "exact" index kind — no structure at all: a search scores every
 * key of [0, n_built) with kvdex_score_keys and keeps the top k. It is the ground
 * truth the other kinds are measured against through the same interface; for the
 * multi-head, multi-threaded scan of a whole layer use kvdex_exact_search.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "index/ann_int.h"
#include "index/ann_kinds.h"

#define CHUNK 2048 /* keys scored per kvdex_score_keys call */

static int exact_init(kvdex_index *ix) {
  ix->impl = NULL;
  return 0;
}

static int exact_param(kvdex_index *ix, const char *name, const char *value) {
  return kvdex__seterr(KVDEX_EINVAL, "exact: unknown parameter '%.40s' (exact takes no parameters)",
                       name);
}

static void exact_spec(const kvdex_index *ix, char *buf, size_t len) {
  snprintf(buf, len, "exact");
}

static int exact_build(kvdex_index *ix, const kvdex_index_input *in, kvdex_pool *pool) { return 0; }

static int exact_search(const kvdex_index *ix, const kvdex_kv_view *keys, const float *q,
                        uint32_t k, const kvdex_index_params *params, kvdex_index_scratch *s,
                        kvdex_hit *hits, uint32_t *n_hits, uint64_t *touched) {
  uint64_t n = ix->n_built;
  uint32_t kk = n < k ? (uint32_t)n : k;
  int rc;
  if ((rc = kvdex__scratch_floats(s, CHUNK)) || (rc = kvdex__scratch_hits(s, kk))) return rc;
  kvdex__topk top;
  kvdex__topk_init(&top, s->h, kk);
  size_t row_bytes = (size_t)ix->dim * kvdex_dtype_size(ix->dtype);
  for (uint64_t start = 0; start < n;) {
    /* A run of rows inside one store block, at most CHUNK long. */
    uint64_t in_block = keys->block_tokens - start % keys->block_tokens;
    uint64_t cnt = n - start;
    if (cnt > in_block) cnt = in_block;
    if (cnt > CHUNK) cnt = CHUNK;
    const char *rows = (const char *)keys->k_blocks[start / keys->block_tokens] +
                       (size_t)(start % keys->block_tokens) * row_bytes;
    if ((rc = kvdex_score_keys(KVDEX_SIMD_AUTO, ix->dtype, rows, (size_t)cnt, ix->dim, q, 1, s->f)))
      return rc;
    kvdex__topk_push_run(&top, start, s->f, (size_t)cnt);
    start += cnt;
  }
  uint32_t m = kvdex__topk_finish(&top);
  memcpy(hits, top.h, m * sizeof *hits);
  *n_hits = m;
  *touched = n;
  return 0;
}

static size_t exact_memory(const kvdex_index *ix) { return 0; }

static int exact_save(const kvdex_index *ix, kvdex__buf *out) { return 0; }

static int exact_load(kvdex_index *ix, kvdex__rd *in) { return 0; }

static void exact_free(kvdex_index *ix) { ix->impl = NULL; }

const kvdex__index_ops kvdex__exact_ops = {
    .kind = "exact",
    .init = exact_init,
    .param = exact_param,
    .spec = exact_spec,
    .build = exact_build,
    .search = exact_search,
    .memory = exact_memory,
    .save = exact_save,
    .load = exact_load,
    .free = exact_free,
};
