/* gpu_worker: the decode loop of `kvdex gpu-worker` for a synthetic stack of layers.
 * Per decode step and layer it attends the tokens it holds itself (sinks + recent
 * window, and on S2 layers its S2 shard of distant blocks) through an attention
 * backend (CUDA kernels or their CPU twins, gpu/gpu.h), asks the store's Attend for
 * the rest, merges the two partials by LSE, appends the new token's K/V to the store,
 * and times every phase. It does not print: progress goes to a callback, results to
 * kvdex_gw_stats. The command around it is gpu_worker_cmd.h.
 */
#ifndef KVDEX_GPU_WORKER_H
#define KVDEX_GPU_WORKER_H

#include <stddef.h>
#include <stdint.h>

#include "client/kvdex.h"
#include "gpu/gpu.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Where local attention runs. Every function returns 0 or a negative KVDEX_E* code
 * with a message for kvdex_errmsg(). "Device" pointers are the backend's memory (host
 * memory for the twin). upload/download are synchronous; decode and merge may be
 * asynchronous until sync. One backend serves one loop at a time (not thread-safe). */
typedef struct kvdex_gw_backend {
  const char *name; /* "twin (CPU)" / "cuda" */
  void *ctx;        /* the backend's own state (e.g. a stream), passed back */
  int (*alloc)(void *ctx, size_t bytes, void **out /* OUT */);
  void (*free)(void *ctx, void *p); /* NULL: no-op */
  int (*upload)(void *ctx, void *dev, const void *host, size_t bytes);
  int (*download)(void *ctx, void *host, const void *dev, size_t bytes);
  /* kvdex_{gpu,twin}_sparse_decode with batch 1 (workspace may be NULL for the twin). */
  int (*sparse_decode)(void *ctx, uint32_t n_q_heads, const float *q,
                       const kvdex_gpu_kv_pages *kv, const kvdex_gpu_token_sel *sel,
                       float *o, float *lse, void *ws, size_t ws_bytes);
  /* kvdex_{gpu,twin}_s2_decode with batch 1. */
  int (*s2_decode)(void *ctx, const kvdex_s2_params *p, const float *q,
                   const kvdex_gpu_kv_pages *kv, const int32_t *seq_lens, uint32_t max_seq_len,
                   float *o, float *lse, void *ws, size_t ws_bytes);
  /* kvdex_{gpu,twin}_lse_merge. */
  int (*lse_merge)(void *ctx, uint32_t n_parts, uint32_t n_rows, uint32_t head_dim,
                   const float *o_parts, const float *lse_parts, float *o, float *lse);
  int (*sync)(void *ctx);
} kvdex_gw_backend;

/* The CPU twins (gpu/twin.c) on host memory. Static storage; never NULL. */
const kvdex_gw_backend *kvdex_gw_twin_backend(void);

typedef struct kvdex_gw_config {
  const char *seq_id;      /* created by kvdex_gw_run; must not exist */
  kvdex_shape shape;       /* n_layers, heads, head_dim (multiple of 16, <= 256),
                              block_tokens (also the local pool's and S2's block),
                              dtype F16 or BF16 */
  uint64_t context;        /* prompt tokens per layer, > sinks + window */
  uint32_t steps;          /* decode steps (one new token per layer each) */
  uint32_t sinks, window;  /* held locally: [0, sinks) and the last `window` stored
                              tokens, plus the new token */
  uint32_t k;              /* Attend top-k per query head (ignored when dense) */
  const char *index;       /* Attend index: "exact", "auto", a kind, or "dense" */
  uint64_t seed;           /* synthetic data */
  uint32_t s2_vert_stride; /* 0: no S2 layers; else odd layers are S2 layers */
  uint32_t s2_local_blocks;/* S2 local blocks (>= 1) */
  int check;               /* keep all K/V and compare every output with dense attention
                              (f64); on S2 layers with S2-masked dense attention */
} kvdex_gw_config;

/* Seconds spent per phase, summed over steps and layers. */
typedef struct kvdex_gw_stats {
  int created;             /* 1 once this run created cfg->seq_id */
  uint32_t steps_done;
  double prefill_s;        /* generating the prompt and appending it to the store */
  double load_s;           /* reading the held tokens back from the store (ReadKV) and
                              uploading them to the backend */
  double total_s;          /* decode steps, wall (--check reference work excluded) */
  double local_s;          /* new token + q to the backend, local attention, sync */
  double store_s;          /* kvdex_attend wall: network + the store's CPU attention */
  double store_cpu_s;      /* of store_s, the store's own time (kvdex_attend_info.seconds):
                              retrieval + CPU attention; the rest is network + queueing */
  double merge_s;          /* store partial to the backend, LSE merge, result back */
  double append_s;         /* new tokens' K/V appended to the store (stream + commit) */
  double gen_s;            /* generating q, k, v (stands in for the model's layers) */
  uint64_t store_attended; /* tokens the store attended, summed over query heads */
  uint64_t local_attended; /* tokens attended locally, summed over query heads */
  uint64_t checked;        /* (step, layer, q head) outputs compared */
  double max_rel_err;      /* max |o - ref| / max |ref| over checked outputs */
  double mean_rel_err;
  uint64_t final_tokens;   /* kvdex_stat after the run: tokens of every layer (the
                              minimum over layers), context + steps when all went well */
  uint64_t local_bytes;    /* K/V bytes held by the backend at the end */
} kvdex_gw_stats;

/* Called after each decode step (progress) with the stats so far. */
typedef void (*kvdex_gw_progress_fn)(void *ctx, uint32_t step, const kvdex_gw_stats *st);

/* Called for every (step, layer) after the merge, before the new token is appended:
 * the store holds `stored` tokens of the layer; q [n_q_heads][head_dim] f32; the new
 * token's k, v [n_kv_heads][head_dim] in the sequence dtype (it is token `stored`);
 * o [n_q_heads][head_dim] the merged output. For tests. */
typedef void (*kvdex_gw_output_fn)(void *ctx, uint32_t step, uint32_t layer, uint64_t stored,
                                   const float *q, const void *k_new, const void *v_new,
                                   const float *o);

/* Validates cfg (KVDEX_EINVAL with a message naming the option). */
int kvdex_gw_config_check(const kvdex_gw_config *cfg);

/* Runs the loop on `db`: creates cfg->seq_id, appends the prompt, loads the held tokens,
 * runs the steps. The sequence is left in the store (the caller deletes it). stats is
 * filled as far as the run got, also on failure. progress / output may be NULL. */
int kvdex_gw_run(kvdex_db *db, const kvdex_gw_config *cfg, const kvdex_gw_backend *be,
                 kvdex_gw_progress_fn progress, kvdex_gw_output_fn output, void *cb_ctx,
                 kvdex_gw_stats *stats /* OUT */);

/* The synthetic data, random access (the same numbers for every run with a seed):
 * K and V of token t of layer l, all KV heads, [n_kv_heads][head_dim] f32. */
void kvdex_gw_gen_kv(const kvdex_shape *sh, uint64_t seed, uint32_t layer, uint64_t t, float *k,
                     float *v);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_GPU_WORKER_H */
