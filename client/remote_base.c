/* remote_base.c — in //client:kvdex_remote only: the three functions of the client
 * core whose one definition still sits in a library this build must not link:
 * kvdex_shape_check and kvdex_name_check (kvstore/kvstore.c, which brings the store
 * and jemalloc) and the LSE merge behind kvdex_merge_partials (index/attend.c, which
 * brings the index). Same code, same messages. When the checks move to
 * //kvstore:base and the merge to a store-free index target, this file goes and
 * merge.c serves both libraries. //client:kvdex links the originals instead.
 */
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "client/client_int.h"

int kvdex_shape_check(const kvdex_shape *s) {
  if (!s) return kvdex__seterr(KVDEX_EINVAL, "shape is missing");
  if (s->n_layers < 1 || s->n_layers > KVDEX_MAX_LAYERS)
    return kvdex__seterr(KVDEX_EINVAL, "shape: n_layers = %u is outside 1..%d", s->n_layers,
                         KVDEX_MAX_LAYERS);
  if (s->n_kv_heads < 1 || s->n_kv_heads > KVDEX_MAX_HEADS)
    return kvdex__seterr(KVDEX_EINVAL, "shape: n_kv_heads = %u is outside 1..%d",
                         s->n_kv_heads, KVDEX_MAX_HEADS);
  if (s->n_q_heads < 1 || s->n_q_heads > KVDEX_MAX_HEADS)
    return kvdex__seterr(KVDEX_EINVAL, "shape: n_q_heads = %u is outside 1..%d", s->n_q_heads,
                         KVDEX_MAX_HEADS);
  if (s->n_q_heads % s->n_kv_heads != 0)
    return kvdex__seterr(KVDEX_EINVAL,
                         "shape: n_q_heads = %u is not a multiple of n_kv_heads = %u",
                         s->n_q_heads, s->n_kv_heads);
  if (s->head_dim < 1 || s->head_dim > KVDEX_MAX_HEAD_DIM)
    return kvdex__seterr(KVDEX_EINVAL, "shape: head_dim = %u is outside 1..%d", s->head_dim,
                         KVDEX_MAX_HEAD_DIM);
  if (s->block_tokens > KVDEX_MAX_BLOCK_TOKENS)
    return kvdex__seterr(KVDEX_EINVAL,
                         "shape: block_tokens = %u is outside 1..%d (0 = default %d)",
                         s->block_tokens, KVDEX_MAX_BLOCK_TOKENS, KVDEX_DEFAULT_BLOCK_TOKENS);
  if (kvdex_dtype_size(s->dtype) == 0)
    return kvdex__seterr(KVDEX_EINVAL, "shape: unknown dtype %d (f32 = 1, f16 = 2, bf16 = 3)",
                         s->dtype);
  return KVDEX_OK;
}

/* Checks one name: 1..max bytes, each in the allowed set (`extra` besides A-Za-z0-9). */
static int name_check_one(const char *what, const char *name, size_t max, const char *extra) {
  size_t len = strnlen(name, max + 1);
  if (len == 0) return kvdex__seterr(KVDEX_EINVAL, "%s is empty", what);
  if (len > max)
    return kvdex__seterr(KVDEX_EINVAL, "%s is longer than %zu bytes", what, max);
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)name[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              strchr(extra, c) != NULL;
    if (!ok)
      return kvdex__seterr(KVDEX_EINVAL,
                           "%s: byte 0x%02x at offset %zu is not allowed "
                           "(allowed: A-Z a-z 0-9 %s)",
                           what, c, i, extra);
  }
  return KVDEX_OK;
}

int kvdex_name_check(const char *ns, const char *seq_id) {
  if (ns && *ns) {
    int rc = name_check_one("namespace", ns, KVDEX_MAX_NAMESPACE, "._-");
    if (rc) return rc;
  }
  if (!seq_id) return kvdex__seterr(KVDEX_EINVAL, "sequence id is missing");
  return name_check_one("sequence id", seq_id, KVDEX_MAX_SEQ_ID, "._:/-");
}

void kvdex_merge_partials(const float *o_a, float lse_a, const float *o_b, float lse_b,
                          uint32_t d, float *o_out, float *lse_out) {
  if (isnan(lse_a) || isnan(lse_b) || lse_a == INFINITY || lse_b == INFINITY) {
    for (uint32_t c = 0; c < d; c++) o_out[c] = NAN;
    *lse_out = NAN;
    return;
  }
  double m = lse_a > lse_b ? lse_a : lse_b;
  if (m == -INFINITY) {
    for (uint32_t c = 0; c < d; c++) o_out[c] = 0.0f;
    *lse_out = -INFINITY;
    return;
  }
  double ea = exp(lse_a - m), eb = exp(lse_b - m), sum = ea + eb;
  float wa = (float)(ea / sum), wb = (float)(eb / sum);
  /* Element-wise, so o_out may be either input; an empty side is not read. */
  if (lse_b == -INFINITY) {
    for (uint32_t c = 0; c < d; c++) o_out[c] = wa * o_a[c];
  } else if (lse_a == -INFINITY) {
    for (uint32_t c = 0; c < d; c++) o_out[c] = wb * o_b[c];
  } else {
    for (uint32_t c = 0; c < d; c++) o_out[c] = wa * o_a[c] + wb * o_b[c];
  }
  *lse_out = (float)(m + log(sum));
}
