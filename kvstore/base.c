/* kvdex base: thread-local error messages, the monotonic clock, dtype helpers, the
 * logger, and the checks of names and shapes (shared by the store and the remote
 * client, which has no store).
 * The logger and its level are the only process-wide state in kvdex. */
#include "kvstore/base.h"

#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <strings.h>
#include <time.h>

static _Thread_local char tl_errmsg[512];

const char *kvdex_errmsg(void) { return tl_errmsg; }

int kvdex__seterr(int rc, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(tl_errmsg, sizeof tl_errmsg, fmt, ap);
  va_end(ap);
  return rc;
}

int kvdex__preerr(int rc, const char *prefix) {
  char old[sizeof tl_errmsg];
  memcpy(old, tl_errmsg, sizeof old);
  snprintf(tl_errmsg, sizeof tl_errmsg, "%s: %s", prefix, old);
  return rc;
}

double kvdex__now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int64_t kvdex__now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

const char *kvdex_errname(int rc) {
  switch (rc) {
    case KVDEX_OK: return "KVDEX_OK";
    case KVDEX_EINVAL: return "KVDEX_EINVAL";
    case KVDEX_ENOTFOUND: return "KVDEX_ENOTFOUND";
    case KVDEX_EEXIST: return "KVDEX_EEXIST";
    case KVDEX_ENOMEM: return "KVDEX_ENOMEM";
    case KVDEX_ECONFLICT: return "KVDEX_ECONFLICT";
    case KVDEX_EBUSY: return "KVDEX_EBUSY";
    case KVDEX_ECANCELLED: return "KVDEX_ECANCELLED";
    case KVDEX_ETIMEDOUT: return "KVDEX_ETIMEDOUT";
    case KVDEX_EUNAVAIL: return "KVDEX_EUNAVAIL";
    case KVDEX_EINTERNAL: return "KVDEX_EINTERNAL";
    case KVDEX_EUNIMPL: return "KVDEX_EUNIMPL";
    case KVDEX_EIO: return "KVDEX_EIO";
    case KVDEX_EUNAUTH: return "KVDEX_EUNAUTH";
    case KVDEX_EPERM: return "KVDEX_EPERM";
    default: return "KVDEX_E?";
  }
}

size_t kvdex_dtype_size(int dtype) {
  switch (dtype) {
    case KVDEX_DTYPE_F32: return 4;
    case KVDEX_DTYPE_F16: return 2;
    case KVDEX_DTYPE_BF16: return 2;
    default: return 0;
  }
}

const char *kvdex_dtype_name(int dtype) {
  switch (dtype) {
    case KVDEX_DTYPE_F32: return "f32";
    case KVDEX_DTYPE_F16: return "f16";
    case KVDEX_DTYPE_BF16: return "bf16";
    default: return "?";
  }
}

int kvdex_dtype_parse(const char *name) {
  if (!name) return -1;
  if (!strcasecmp(name, "f32") || !strcasecmp(name, "float32")) return KVDEX_DTYPE_F32;
  if (!strcasecmp(name, "f16") || !strcasecmp(name, "float16")) return KVDEX_DTYPE_F16;
  if (!strcasecmp(name, "bf16") || !strcasecmp(name, "bfloat16")) return KVDEX_DTYPE_BF16;
  return -1;
}

void kvdex__to_f32(int src_dtype, const void *src, float *dst, size_t n) {
  const uint16_t *h = src;
  switch (src_dtype) {
    case KVDEX_DTYPE_F32: memcpy(dst, src, n * 4); break;
    case KVDEX_DTYPE_F16: for (size_t i = 0; i < n; i++) dst[i] = kvdex__f16_to_f32(h[i]); break;
    case KVDEX_DTYPE_BF16: for (size_t i = 0; i < n; i++) dst[i] = kvdex__bf16_to_f32(h[i]); break;
    default: break;
  }
}

void kvdex__from_f32(int dst_dtype, const float *src, void *dst, size_t n) {
  uint16_t *h = dst;
  switch (dst_dtype) {
    case KVDEX_DTYPE_F32: memcpy(dst, src, n * 4); break;
    case KVDEX_DTYPE_F16: for (size_t i = 0; i < n; i++) h[i] = kvdex__f32_to_f16(src[i]); break;
    case KVDEX_DTYPE_BF16: for (size_t i = 0; i < n; i++) h[i] = kvdex__f32_to_bf16(src[i]); break;
    default: break;
  }
}

/* ---- logger ---- */

static _Atomic int g_log_level = KVDEX_LOG_INFO;
static kvdex_log_fn g_log_fn;
static void *g_log_ctx;

void kvdex_log_configure(int level, kvdex_log_fn fn, void *ctx) {
  g_log_fn = fn;
  g_log_ctx = ctx;
  atomic_store(&g_log_level, level);
}

int kvdex_log_level(void) { return atomic_load_explicit(&g_log_level, memory_order_relaxed); }

int kvdex_log_level_parse(const char *name) {
  if (!name) return -1;
  if (!strcasecmp(name, "error")) return KVDEX_LOG_ERROR;
  if (!strcasecmp(name, "warn") || !strcasecmp(name, "warning")) return KVDEX_LOG_WARN;
  if (!strcasecmp(name, "info")) return KVDEX_LOG_INFO;
  if (!strcasecmp(name, "debug")) return KVDEX_LOG_DEBUG;
  return -1;
}

void kvdex__log(int level, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (g_log_fn) {
    g_log_fn(g_log_ctx, level, msg);
    return;
  }
  static const char *names[] = {"ERROR", "WARN", "INFO", "DEBUG"};
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  fprintf(stderr, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %-5s kvdex: %s\n", tm.tm_year + 1900,
          tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
          names[level < 0 ? 0 : level > 3 ? 3 : level], msg);
}

/* ---- names and shapes ---------------------------------------------------------- */

int kvdex__shape_check(const kvdex_shape *s) {
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

int kvdex__name_check(const char *ns, const char *seq_id) {
  if (ns && *ns) {
    int rc = name_check_one("namespace", ns, KVDEX_MAX_NAMESPACE, "._-");
    if (rc) return rc;
  }
  if (!seq_id) return kvdex__seterr(KVDEX_EINVAL, "sequence id is missing");
  return name_check_one("sequence id", seq_id, KVDEX_MAX_SEQ_ID, "._:/-");
}

/* ---- the LSE merge of partial attention results ------------------------------------ */

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
