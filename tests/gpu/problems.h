/* Random host-side problems for the gpu tests, the GPU-vs-twin comparisons and the
 * check driver: paged KV pools with shuffled physical blocks, token selections, S2
 * prefill inputs with their CSR, block-scoring inputs. Plain C (test code).
 */
#ifndef KVDEX_TESTS_GPU_PROBLEMS_H
#define KVDEX_TESTS_GPU_PROBLEMS_H

#include <stddef.h>
#include <stdint.h>

#include "gpu/gpu.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tp_rng {
  uint64_t s;
} tp_rng;

uint64_t tp_next(tp_rng *r);
float tp_unif(tp_rng *r);                 /* [-1, 1) */
uint32_t tp_below(tp_rng *r, uint32_t n); /* [0, n), n >= 1 */

typedef struct tp_decode_cfg {
  uint32_t batch, n_q_heads, n_kv_heads, head_dim, block_tokens, max_seq;
  int dtype;
  int vllm_layout;     /* 1: one table per batch entry, all heads in a block */
  uint32_t n_sink, n_recent, sel_cap;
  float q_mag;         /* q = q_mag * U[-1, 1) */
  const kvdex_s2_params *s2; /* non-NULL: S2 decode; tables name -1 for blocks never needed */
} tp_decode_cfg;

typedef struct tp_decode {
  tp_decode_cfg cfg;
  float *q;                 /* [batch][n_q_heads][head_dim] */
  uint16_t *k, *v;          /* pools */
  size_t pool_elems;
  int32_t *bt;
  size_t bt_len;
  int32_t *seq_lens;        /* [batch] */
  int32_t *sel, *n_sel;     /* sparse: [batch][n_kv][sel_cap], [batch][n_kv] */
  kvdex_gpu_kv_pages kv;    /* host pointers into the above */
  kvdex_gpu_token_sel ts;
} tp_decode;

/* Random problem; seq_lens in [0, max_seq] (the first entry is max_seq). 0 or -1. */
int tp_decode_make(tp_decode *p, const tp_decode_cfg *c, uint64_t seed);
void tp_decode_free(tp_decode *p);
/* The f32 K (which 0) or V (which 1) row of token t of (b, kv head h), via the table. */
void tp_decode_row(const tp_decode *p, int which, uint32_t b, uint32_t h, int64_t t, float *out);

typedef struct tp_prefill {
  kvdex_s2_params s2;
  uint32_t n_kv_heads, seq, head_dim;
  int dtype;
  uint16_t *q, *k, *v;      /* [heads][seq][head_dim] */
  int32_t *row_ptr, *col;
  uint64_t nnz, n_rows;
} tp_prefill;

int tp_prefill_make(tp_prefill *p, const kvdex_s2_params *s2, uint32_t n_kv_heads, uint32_t seq,
                    uint32_t head_dim, int dtype, float q_mag, uint64_t seed);
void tp_prefill_free(tp_prefill *p);

typedef struct tp_topk {
  uint32_t batch, n_q_heads, n_kv_heads, head_dim, rep_cap, k;
  float *q, *reps;
  int32_t *n_reps;
} tp_topk;

int tp_topk_make(tp_topk *p, uint32_t batch, uint32_t n_q_heads, uint32_t n_kv_heads,
                 uint32_t head_dim, uint32_t rep_cap, uint32_t k, uint64_t seed);
void tp_topk_free(tp_topk *p);

/* max |a - b| / max |b| (0 when both are all zero). */
double tp_rel_err(const float *a, const float *b, size_t n);
/* max |a - b| over entries where both are finite; equal infinities count 0, a finite
 * vs infinite pair counts +inf. */
double tp_abs_err_inf(const float *a, const float *b, size_t n);

/* f16/bf16 element i as f32. */
float tp_elem(int dtype, const uint16_t *base, size_t i);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_TESTS_GPU_PROBLEMS_H */
