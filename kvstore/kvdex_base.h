/* kvdex public base: return codes, dtypes, the model shape, kvdex_errmsg(), the log
 * configuration, and the few types the API shares with kvdex's own modules (index
 * states, a layer's index record, pooling), defined once here. Installed beside kvdex.h as <kvdex/kvdex_base.h> and included by
 * it; it declares nothing internal (no kvdex__ names, no macros but the constants).
 * Internal code includes kvstore/base.h, which includes this.
 */
#ifndef KVDEX_PUBLIC_BASE_H
#define KVDEX_PUBLIC_BASE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Return codes. 0 is success; every failure is negative and leaves a message for
 * kvdex_errmsg() on the calling thread. A call that fails changes no state. */
enum {
  KVDEX_OK = 0,
  KVDEX_EINVAL = -1,      /* bad argument, shape, size or name -> INVALID_ARGUMENT */
  KVDEX_ENOTFOUND = -2,   /* no such sequence -> NOT_FOUND */
  KVDEX_EEXIST = -3,      /* sequence exists -> ALREADY_EXISTS */
  KVDEX_ENOMEM = -4,      /* memory cap reached -> RESOURCE_EXHAUSTED */
  KVDEX_ECONFLICT = -5,   /* gap or conflicting rewrite -> FAILED_PRECONDITION */
  KVDEX_EBUSY = -6,       /* another append in progress -> ABORTED */
  KVDEX_ECANCELLED = -7,  /* cancelled by the caller -> CANCELLED */
  KVDEX_ETIMEDOUT = -8,   /* deadline passed -> DEADLINE_EXCEEDED */
  KVDEX_EUNAVAIL = -9,    /* server unreachable -> UNAVAILABLE */
  KVDEX_EINTERNAL = -10,  /* bug or unexpected library failure -> INTERNAL */
  KVDEX_EUNIMPL = -11,    /* not supported by this build/transport -> UNIMPLEMENTED */
  KVDEX_EIO = -12,        /* file or socket error */
  KVDEX_EUNAUTH = -13,    /* no or unknown credentials -> UNAUTHENTICATED */
  KVDEX_EPERM = -14,      /* credentials not allowed this namespace -> PERMISSION_DENIED */
};

/* Storage element types. Values equal the wire enum kvdex.v1.DType. */
typedef enum kvdex_dtype {
  KVDEX_DTYPE_F32 = 1,
  KVDEX_DTYPE_F16 = 2,
  KVDEX_DTYPE_BF16 = 3,
} kvdex_dtype;

/* The model shape of a sequence, fixed at creation (public: used by kvdex.h too). */
typedef struct kvdex_shape {
  uint32_t n_layers;
  uint32_t n_kv_heads;
  uint32_t n_q_heads;    /* a multiple of n_kv_heads */
  uint32_t head_dim;
  uint32_t block_tokens; /* 0 = KVDEX_DEFAULT_BLOCK_TOKENS */
  int dtype;             /* kvdex_dtype */
} kvdex_shape;

/* Limits of names and shapes (the wire contract's, kvdex.proto). */
#define KVDEX_MAX_NAMESPACE 64
#define KVDEX_MAX_SEQ_ID 256
#define KVDEX_MAX_LAYERS 1024
#define KVDEX_MAX_HEADS 1024
#define KVDEX_MAX_HEAD_DIM 1024
#define KVDEX_MAX_BLOCK_TOKENS 65536
#define KVDEX_DEFAULT_BLOCK_TOKENS 64
#define KVDEX_DEFAULT_NAMESPACE "default"


/* Limits of retrieval calls (the wire's too: kvdex.proto). */
#define KVDEX_MAX_K 65536             /* top-k per query head: 1..this */
#define KVDEX_MAX_EXTRA_TOKENS 65536  /* extra tokens one Attend item may name */
#define KVDEX_MAX_OBS 4096            /* observation queries of one Retain */

/* Bytes per element; 0 for an unknown dtype. */
size_t kvdex_dtype_size(int dtype);
/* "f32", "f16", "bf16", or "?" */
const char *kvdex_dtype_name(int dtype);
/* Parses "f32"/"f16"/"bf16" (also "float32"/"float16"/"bfloat16"); -1 if unknown. */
int kvdex_dtype_parse(const char *name);

/* ---- Types the API shares with kvdex's own modules (one definition each) ---------- */

/* The state of a layer's latest kvdex_build_index (values equal kvdex.v1.IndexState). */
typedef enum kvdex_index_state {
  KVDEX_INDEX_NONE = 0,     /* never built */
  KVDEX_INDEX_BUILDING = 1, /* queued or running: searches use the previous index or exact */
  KVDEX_INDEX_READY = 2,
  KVDEX_INDEX_FAILED = 3,   /* see error; an older ready index (if any) stays in use */
} kvdex_index_state;

/* The retrieval index of one layer (kvdex_build_index): one index per KV head. */
typedef struct kvdex_layer_index {
  uint32_t layer;
  int state;             /* kvdex_index_state of the latest build */
  char spec[512];        /* the latest build's spec, as requested */
  char error[512];       /* KVDEX_INDEX_FAILED: why, starting with a status name, e.g.
                            "RESOURCE_EXHAUSTED: publishing the index of layer 0 ..." */
  /* The ready index that searches use ("" / 0 when none; during a rebuild and after
   * a failed one, the previous index): */
  char kind[32];         /* "graph", "ivf", "hnsw", "landmark", "exact" */
  char describe[512];    /* normalised spec and build notes, e.g.
                            "graph:K=32,degree=32,ef=128 (key-only kNN: no prefill queries)" */
  double build_seconds;  /* wall time of its build */
  uint64_t memory_bytes; /* bytes it holds (all KV heads); counted in `bytes` of the
                            sequence and against the node's memory cap */
  uint64_t tokens;       /* tokens it covers (landmark:mode=given: the blocks that had
                            landmarks); the others are scanned exactly */
} kvdex_layer_index;

/* `layer` of kvdex_build_index meaning every layer that has tokens. */
#define KVDEX_ALL_LAYERS UINT32_MAX

/* Pooling of kvdex_retain_options (values equal kvdex.v1.Pooling). */
typedef enum kvdex_pooling {
  KVDEX_POOLING_MAX = 0, /* pooled(t) = max of the mass in the window */
  KVDEX_POOLING_AVG = 1, /* pooled(t) = mean over the tokens of the window */
} kvdex_pooling;

/* Merges two partial attention results over disjoint token sets of one query head
 * into the result over their union, the way an engine combines its own part (sinks
 * and window, attended on the GPU) with kvdex_attend's:
 *   o_out = (e^lse_a o_a + e^lse_b o_b) / (e^lse_a + e^lse_b),
 *   lse_out = log(e^lse_a + e^lse_b),
 * computed stably (relative to the larger lse, weights in double). A side with lse
 * -INFINITY (no tokens) has weight 0 and its o is not read; both empty give o_out = 0,
 * lse_out = -INFINITY. o_out may be o_a or o_b; otherwise no overlap. d floats each.
 * NaN in an lse gives NaN outputs. For many heads, call it per head (o + h * head_dim,
 * lse[h]). Never fails, never allocates, thread-safe, needs no handle. */
void kvdex_merge_partials(const float *o_a, float lse_a, const float *o_b, float lse_b,
                          uint32_t d, float *o_out /* OUT */, float *lse_out /* OUT */);

/* The message of the last failed kvdex call on this thread ("" if none). The
 * pointer stays valid until the next kvdex call on this thread. */
const char *kvdex_errmsg(void);
/* Name of a return code, e.g. "KVDEX_ENOMEM". */
const char *kvdex_errname(int rc);

/* Logger: the host chooses the level and the sink; default is stderr at INFO.
 * The level is checked before anything is formatted. */
enum { KVDEX_LOG_ERROR = 0, KVDEX_LOG_WARN = 1, KVDEX_LOG_INFO = 2, KVDEX_LOG_DEBUG = 3 };
typedef void (*kvdex_log_fn)(void *ctx, int level, const char *msg);
void kvdex_log_configure(int level, kvdex_log_fn fn, void *ctx);
int kvdex_log_level(void);
/* Parses "error"/"warn"/"info"/"debug"; -1 if unknown. */
int kvdex_log_level_parse(const char *name);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_PUBLIC_BASE_H */
