/* gpu: attention kernels for decode and prefill on an NVIDIA GPU, and their CPU twins.
 *   - sparse decode over a paged KV pool (selected tokens + sinks + recent window, GQA,
 *     split-K with an LSE reduction), and the LSE merge of partial results;
 *   - S2-Attention (DKernel pattern): the layout generator, block-sparse prefill on
 *     tensor cores, and decode where each head reads only its shard of the KV blocks;
 *   - block scoring (cuBLAS batched GEMM against block representatives) + top-k.
 * Every kernel kvdex_gpu_X has a twin kvdex_twin_X in plain C with the same arguments
 * minus the workspace and the stream; the twin is the reference the kernel is tested
 * against. This header needs no CUDA header: streams are `void *` (a cudaStream_t,
 * NULL = the legacy default stream). It does not manage sequences or move KV to the
 * GPU; the caller owns every buffer.
 *
 * Conventions for every kvdex_gpu_X call: all array arguments are device pointers
 * (the structs holding them live on the host); scalars are host values. Launches are
 * asynchronous on `stream`; 0 means the work was queued without a launch error, not
 * that it finished. Arguments are validated on the host (shapes, alignment, dtype);
 * contents of device arrays (block tables, counts, lengths) cannot be, so the twin
 * checks them and the kernel trusts them: run the twin in tests. Failures return a
 * negative KVDEX_E* code, leave a message for kvdex_errmsg() and launch nothing.
 * Functions are thread-safe except where a handle says otherwise.
 */
#ifndef KVDEX_GPU_H
#define KVDEX_GPU_H

#include <stddef.h>
#include <stdint.h>

#include "kvstore/base.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- runtime */

/* 1 when a CUDA device is usable by this process, 0 otherwise (no device, no or too
 * old a driver, or any other failure of cudaGetDeviceCount). Never fails. */
int kvdex_gpu_available(void);

typedef struct kvdex_gpu_info {
  char name[256];
  int cc_major, cc_minor;     /* compute capability */
  int sm_count;
  uint64_t total_mem;         /* bytes */
  int mem_clock_khz;          /* cudaDevAttrMemoryClockRate */
  int bus_width_bits;         /* cudaDevAttrGlobalMemoryBusWidth */
  double peak_bw_gbs;         /* 2 * clock * bus width / 8, in 1e9 bytes/s (0 if unknown) */
} kvdex_gpu_info;

/* Describes the current device. KVDEX_EUNAVAIL without a usable device. */
int kvdex_gpu_device_info(kvdex_gpu_info *out /* OUT */);

/* Device memory, for callers that do not include CUDA headers. kvdex_gpu_free(NULL)
 * is a no-op. kvdex_gpu_copy is synchronous (cudaMemcpy, kind inferred by UVA). */
int kvdex_gpu_alloc(size_t bytes, void **out /* OUT */);
void kvdex_gpu_free(void *p);
int kvdex_gpu_copy(void *dst, const void *src, size_t bytes);
int kvdex_gpu_memset(void *dst, int byte, size_t bytes);
/* Waits for all work queued on `stream` and reports any asynchronous kernel error. */
int kvdex_gpu_sync(void *stream);

/* ------------------------------------------------------ the paged KV pool */

/* K and V of one layer in fixed-size physical blocks, shared by the batch. The row of
 * token t for (batch entry b, kv head h) is
 *   p   = block_table[b * bt_batch_stride + h * bt_head_stride + t / block_tokens]
 *   row = k + (p * block_stride + h * head_stride + (t % block_tokens) * head_dim)
 * (elements of dtype), and likewise in v. Two common layouts:
 *   vLLM-style, one table per batch entry, all heads in a block:
 *     bt_head_stride = 0, head_stride = block_tokens * head_dim,
 *     block_stride = n_kv_heads * block_tokens * head_dim;
 *   kvstore-style, one table per (batch entry, kv head), one head per block:
 *     bt_head_stride = max_blocks, head_stride = 0, block_stride = block_tokens * head_dim.
 * Table entries of blocks a call never reads (S2 heads, unselected tokens) are not read
 * and may be anything (e.g. -1 for blocks the store never shipped).
 * Requirements: dtype F16 or BF16; head_dim a multiple of 16; block_stride and
 * head_stride multiples of 8; k and v 16-byte aligned. */
typedef struct kvdex_gpu_kv_pages {
  int dtype;                  /* KVDEX_DTYPE_F16 or KVDEX_DTYPE_BF16 */
  uint32_t head_dim;
  uint32_t n_kv_heads;
  uint32_t block_tokens;      /* tokens per physical block, >= 1 */
  const void *k, *v;          /* the pools */
  uint64_t block_stride;      /* elements between physical blocks */
  uint64_t head_stride;       /* elements between kv heads inside a block (may be 0) */
  uint32_t n_pool_blocks;     /* physical blocks in the pool (the twin checks entries) */
  const int32_t *block_table;
  uint32_t max_blocks;        /* logical blocks a table row can name */
  uint64_t bt_batch_stride;   /* table entries between batch entries */
  uint64_t bt_head_stride;    /* table entries between kv heads (0 = shared by heads) */
} kvdex_gpu_kv_pages;

/* ------------------------------------------------- top-k sparse decode */

/* The tokens one decode step attends to, per (batch entry b, kv head h):
 *   static:   [0, min(n_sink, L)) and [max(L - n_recent, n_sink), L), L = seq_lens[b];
 *   selected: sel[(b * n_kv_heads + h) * sel_cap + i] for i < n_sel[b * n_kv_heads + h]
 *             (clamped to [0, sel_cap]); ids outside [0, L) or inside the static
 *             ranges are skipped, so Search results may include them. Ids must not
 *             repeat (a repeated id is attended twice).
 * The query heads of a GQA group (h * G .. h * G + G - 1, G = n_q_heads / n_kv_heads)
 * share the gathered tokens. sel may be NULL when sel_cap is 0. */
typedef struct kvdex_gpu_token_sel {
  const int32_t *seq_lens;    /* [batch], 0 <= L <= max_blocks * block_tokens */
  uint32_t n_sink;
  uint32_t n_recent;
  const int32_t *sel;         /* [batch][n_kv_heads][sel_cap] */
  const int32_t *n_sel;       /* [batch][n_kv_heads] (may be NULL when sel_cap is 0) */
  uint32_t sel_cap;
} kvdex_gpu_token_sel;

/* Bytes of device workspace kvdex_gpu_sparse_decode needs (split-K partials). */
size_t kvdex_gpu_sparse_decode_workspace(uint32_t batch, uint32_t n_q_heads,
                                         uint32_t head_dim, const kvdex_gpu_token_sel *sel);

/* One decode step of attention for every (batch entry, query head):
 *   q    [batch][n_q_heads][head_dim] f32 (unscaled);
 *   o    [batch][n_q_heads][head_dim] f32 = softmax(scale * q.K^T) V over the tokens;
 *   lse  [batch][n_q_heads] f32 = ln sum_t exp(scale * q.k_t) (natural log), or NULL;
 *        an empty token set gives o = 0, lse = -inf.
 * scale 0 means 1/sqrt(head_dim). head_dim <= 256. f32 accumulation. Split-K: blocks of
 * 256 tokens per thread block, merged by an LSE reduction. */
int kvdex_gpu_sparse_decode(uint32_t batch, uint32_t n_q_heads, const float *q,
                            const kvdex_gpu_kv_pages *kv, const kvdex_gpu_token_sel *sel,
                            float scale, float *o, float *lse, void *workspace,
                            size_t workspace_bytes, void *stream);
int kvdex_twin_sparse_decode(uint32_t batch, uint32_t n_q_heads, const float *q,
                             const kvdex_gpu_kv_pages *kv, const kvdex_gpu_token_sel *sel,
                             float scale, float *o, float *lse);

/* ---------------------------------------------------------- LSE merge */

/* Combines partial attention results over disjoint token sets (this GPU's partial and
 * partials from the network): for each row r < n_rows,
 *   o[r] = sum_i e^{lse_i} o_i[r] / sum_i e^{lse_i},  lse[r] = ln sum_i e^{lse_i},
 * computed stably (max-shifted). o_parts [n_parts][n_rows][head_dim] f32, lse_parts
 * [n_parts][n_rows] f32 (finite or -inf; a part with lse -inf is ignored, its o may be
 * garbage). All parts -inf (or n_parts 0): o = 0, lse = -inf. o/lse may not alias the
 * parts. */
int kvdex_gpu_lse_merge(uint32_t n_parts, uint32_t n_rows, uint32_t head_dim,
                        const float *o_parts, const float *lse_parts, float *o, float *lse,
                        void *stream);
int kvdex_twin_lse_merge(uint32_t n_parts, uint32_t n_rows, uint32_t head_dim,
                         const float *o_parts, const float *lse_parts, float *o, float *lse);

/* ------------------------------------------------------- S2-Attention */

/* The DKernel pattern (S2-Attention; Phi-3-small's blocksparse attention with
 * homo_head = False). Tokens are cut into blocks of `block`; query block i of head h
 * attends key block j iff
 *   i >= j  and  ( i - j < local_blocks  or  (j + h * step + offset) % vert_stride == 0 ),
 *   step = max(1, vert_stride / n_heads)   (integer division),
 * and inside the diagonal block i == j causally per token. DKernel's offset is 1.
 * Which KV a head never needs: key block j is needed by head h only while the newest
 * query block i has i - j < local_blocks, or forever when
 * (j + h * step + offset) % vert_stride == 0. So once the sequence is local_blocks
 * blocks past j, head h never reads block j again unless j is in its vertical shard:
 * of the distant context a head keeps 1/vert_stride of the blocks, and the store need
 * not ship (or keep) the rest for that head. With GQA a kv head needs the union over
 * its query heads (kvdex_s2_kv_needed). */
typedef struct kvdex_s2_params {
  uint32_t n_heads;           /* query heads the pattern is laid over, >= 1 */
  uint32_t block;             /* tokens per block, >= 1 (prefill kernel: multiple of 64) */
  uint32_t local_blocks;      /* >= 1 (the diagonal block counts) */
  uint32_t vert_stride;       /* >= 1 */
  uint32_t offset;            /* DKernel: 1 */
} kvdex_s2_params;

/* KVDEX_EINVAL with a message when p is malformed. */
int kvdex_s2_check(const kvdex_s2_params *p);
/* 1 if query block i of head h attends key block j, else 0 (p must pass check). */
int kvdex_s2_active(const kvdex_s2_params *p, uint32_t h, uint32_t i, uint32_t j);
/* Non-zeros of the layout for n_blocks query blocks (all heads). */
int kvdex_s2_layout_nnz(const kvdex_s2_params *p, uint32_t n_blocks, uint64_t *nnz /* OUT */);
/* The layout as CSR: row r = h * n_blocks + i lists the active key blocks j of query
 * block i of head h in ascending order: col[row_ptr[r] .. row_ptr[r + 1]).
 * row_ptr has n_heads * n_blocks + 1 entries, col has room for nnz_cap entries
 * (KVDEX_EINVAL if nnz exceeds nnz_cap or INT32_MAX). Host memory. */
int kvdex_s2_layout_build(const kvdex_s2_params *p, uint32_t n_blocks, int32_t *row_ptr,
                          int32_t *col, uint64_t nnz_cap);
/* Union over heads: how many causal (i >= j) block pairs some head attends, of total
 * n_blocks (n_blocks + 1) / 2. covered == total whenever n_heads >= vert_stride. */
int kvdex_s2_coverage(const kvdex_s2_params *p, uint32_t n_blocks, uint64_t *covered /* OUT */,
                      uint64_t *total /* OUT */);
/* 1 if some query head of kv head `kv_head` (query heads kv_head * group ..
 * kv_head * group + group - 1) may still read key block j when the newest query is in
 * block cur_qblock (j > cur_qblock counts as needed); 0 means never again, for any
 * later query. group = n_heads / n_kv_heads (1 without GQA). */
int kvdex_s2_kv_needed(const kvdex_s2_params *p, uint32_t group, uint32_t kv_head, uint32_t j,
                       uint32_t cur_qblock);

/* Block-sparse causal prefill of one sequence:
 *   q [n_heads][seq_len][head_dim], k/v [n_kv_heads][seq_len][head_dim] (dtype),
 *   o [n_heads][seq_len][head_dim] (dtype), lse [n_heads][seq_len] f32 or NULL;
 *   row_ptr/col: the layout of kvdex_s2_layout_build for ceil(seq_len / block) blocks
 *   (device arrays for the kernel). Any layout with col j <= i works.
 * dtype F16 or BF16; head_dim 32, 64, 96 or 128; p->block a multiple of 64; n_heads a
 * multiple of n_kv_heads (query head h reads kv head h / (n_heads / n_kv_heads)).
 * scale 0 = 1/sqrt(head_dim). Tensor cores (mma.sync m16n8k16), f32 accumulation,
 * online softmax; query tiles of 64 rows, key tiles of 64 tokens. */
int kvdex_gpu_s2_prefill(const kvdex_s2_params *p, uint32_t n_kv_heads, uint32_t seq_len,
                         uint32_t head_dim, int dtype, const void *q, const void *k,
                         const void *v, const int32_t *row_ptr, const int32_t *col,
                         float scale, void *o, float *lse, void *stream);
int kvdex_twin_s2_prefill(const kvdex_s2_params *p, uint32_t n_kv_heads, uint32_t seq_len,
                          uint32_t head_dim, int dtype, const void *q, const void *k,
                          const void *v, const int32_t *row_ptr, const int32_t *col,
                          float scale, void *o, float *lse);

/* S2 decode step: query head h (n_q_heads = p->n_heads) of batch entry b attends the
 * tokens of the key blocks S2 gives the query block of its newest token
 * (i = (L - 1) / p->block, L = seq_lens[b]): the local blocks max(0, i - local + 1) .. i
 * and, below them, only its vertical shard. Blocks outside that set are never read.
 * q/o/lse as in sparse decode; kv->n_kv_heads divides p->n_heads. max_seq_len bounds
 * seq_lens (it sizes the split-K workspace). */
size_t kvdex_gpu_s2_decode_workspace(const kvdex_s2_params *p, uint32_t batch,
                                     uint32_t head_dim, uint32_t max_seq_len);
int kvdex_gpu_s2_decode(const kvdex_s2_params *p, uint32_t batch, const float *q,
                        const kvdex_gpu_kv_pages *kv, const int32_t *seq_lens,
                        uint32_t max_seq_len, float scale, float *o, float *lse,
                        void *workspace, size_t workspace_bytes, void *stream);
int kvdex_twin_s2_decode(const kvdex_s2_params *p, uint32_t batch, const float *q,
                         const kvdex_gpu_kv_pages *kv, const int32_t *seq_lens,
                         uint32_t max_seq_len, float scale, float *o, float *lse);

/* ---------------------------------------------- block scoring + top-k */

/* A cuBLAS handle bound to kvdex. Not thread-safe: one per thread (or per stream). */
typedef struct kvdex_gpu_blas kvdex_gpu_blas;
int kvdex_gpu_blas_create(kvdex_gpu_blas **out /* OUT */);
void kvdex_gpu_blas_destroy(kvdex_gpu_blas *blas); /* NULL: no-op */

/* Chooses key blocks by their representatives (landmark keys or block means):
 *   q    [batch][n_q_heads][head_dim] f32;
 *   reps [batch][n_kv_heads][rep_cap][head_dim] f32, rep r standing for block r;
 *   n_reps [batch]: valid reps per batch entry (clamped to [0, rep_cap]);
 * score(b, h, r) = max over the query heads g of kv head h of q_g . reps[b][h][r]
 * (one strided-batched SGEMM per call, then a top-k kernel). Writes the k best blocks
 * per (b, h), best first (ties: lower index first; NaN ranks lowest):
 *   top_idx [batch][n_kv_heads][k] int32 (-1 past n_reps), top_score same shape f32
 *   (-inf past n_reps) or NULL. 1 <= k <= 1024. */
size_t kvdex_gpu_block_topk_workspace(uint32_t batch, uint32_t n_q_heads, uint32_t rep_cap);
int kvdex_gpu_block_topk(kvdex_gpu_blas *blas, uint32_t batch, uint32_t n_q_heads,
                         uint32_t n_kv_heads, uint32_t head_dim, const float *q,
                         const float *reps, uint32_t rep_cap, const int32_t *n_reps,
                         uint32_t k, int32_t *top_idx, float *top_score, void *workspace,
                         size_t workspace_bytes, void *stream);
int kvdex_twin_block_topk(uint32_t batch, uint32_t n_q_heads, uint32_t n_kv_heads,
                          uint32_t head_dim, const float *q, const float *reps,
                          uint32_t rep_cap, const int32_t *n_reps, uint32_t k,
                          int32_t *top_idx, float *top_score);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_GPU_H */
