/* Decode attention kernels (flash-decoding style): top-k sparse decode and S2 decode
 * over the paged KV pool, and the LSE merge that both the split-K reduction and
 * kvdex_gpu_lse_merge use. CUDA C with extern "C" entry points (gpu/gpu.h).
 *
 * One thread block = one split of 256 tokens of one (batch entry, kv head) for up to
 * 8 query heads of its GQA group (S2: one query head). It resolves the tokens' rows
 * through the block table, computes the scores with 16 dims per lane and a shuffle
 * reduction (K read once for all heads of the group), takes the softmax statistics of
 * the split, accumulates V with 8 dims per lane, and writes a normalized partial
 * (o, lse). The merge kernel combines the partials with o = sum e^lse o / sum e^lse.
 * Memory-bound by design: every K/V byte of a selected token is read once per group.
 */
#include <math.h>

#include "gpu/gpu_cuda.h"

#define DEC_THREADS 128
#define CHUNK KVDEX__DEC_CHUNK
#define GMAX KVDEX__DEC_GMAX
#define DMAX KVDEX__DEC_DMAX
#define NEG_INF (-INFINITY)

typedef struct dec_args {
  const float *q;
  const uint16_t *k, *v;
  const int32_t *bt;
  long long bt_bs, bt_hs, block_stride, head_stride;
  int block_tokens, d, n_kv_heads, n_q_heads, group, n_gpass, n_splits;
  const int32_t *seq_lens;
  /* sparse */
  const int32_t *sel, *n_sel;
  unsigned n_sink, n_recent, sel_cap;
  /* S2 */
  unsigned s2_block, s2_local, s2_vs, s2_step, s2_offset;
  float scale_log2;
  float *o_part, *lse_part; /* [rows][n_splits][d], [rows][n_splits] */
} dec_args;

static __device__ __forceinline__ int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

/* GM: query heads per block, a compile-time constant at each instantiation (1 for S2,
 * 4 or 8 for sparse decode) so the accumulators take only the registers they need. */
static __device__ __forceinline__ void dec_body(const dec_args a, const int bf16, const int s2,
                                                const int GM) {
  __shared__ __align__(16) float q_s[GMAX][DMAX];
  __shared__ float p_s[GMAX][CHUNK];
  __shared__ float o_s[GMAX][DMAX];
  __shared__ long long row_s[CHUNK];
  __shared__ float m_s[GMAX], l_s[GMAX];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x, b = blockIdx.z, d = a.d;
  int kvh, qh0, ng;
  if (s2) {
    qh0 = blockIdx.y;
    kvh = qh0 / a.group;
    ng = 1;
  } else {
    kvh = blockIdx.y / a.n_gpass;
    const int gp = blockIdx.y - kvh * a.n_gpass;
    qh0 = kvh * a.group + gp * GM;
    ng = min(GM, a.group - gp * GM);
  }
  const long long row0 = (long long)b * a.n_q_heads + qh0; /* first output row */
  const long long L = a.seq_lens[b];

  kvdex__sparse_list sl;
  kvdex__s2_list s2l;
  const int32_t *sel_row = 0;
  long long len;
  if (s2) {
    s2l = kvdex__s2_list_make(L, a.s2_block, a.s2_local, a.s2_vs,
                              kvdex__s2_residue(qh0, a.s2_step, a.s2_offset, a.s2_vs));
    len = s2l.len;
  } else {
    const long long bh = (long long)b * a.n_kv_heads + kvh;
    const long long n_sel = a.sel_cap ? a.n_sel[bh] : 0;
    sl = kvdex__sparse_list_make(L, a.n_sink, a.n_recent, n_sel, a.sel_cap);
    sel_row = a.sel_cap ? a.sel + bh * a.sel_cap : 0;
    len = sl.len;
  }
  const long long start = (long long)split * CHUNK;
  if (start >= len) { /* nothing here: an empty partial (the merge skips it) */
    if (tid < ng) a.lse_part[(row0 + tid) * a.n_splits + split] = NEG_INF;
    return;
  }

  /* 1. token rows, q, zeroed output */
  const int32_t *bt_row = a.bt + b * a.bt_bs + kvh * a.bt_hs;
  for (int i = tid; i < CHUNK; i += DEC_THREADS) {
    const long long v = start + i;
    long long row = -1;
    if (v < len) {
      const long long t = s2 ? kvdex__s2_token(&s2l, v) : kvdex__sparse_token(&sl, sel_row, v);
      if (t >= 0) {
        const long long phys = bt_row[t / a.block_tokens];
        row = phys * a.block_stride + kvh * a.head_stride + (t % a.block_tokens) * d;
      }
    }
    row_s[i] = row;
  }
  for (int i = tid; i < ng * d; i += DEC_THREADS) {
    const int g = i / d, c = i - g * d;
    q_s[g][c] = a.q[(row0 + g) * d + c];
    o_s[g][c] = 0.0f;
  }
  __syncthreads();

  /* 2. scores: lanes of width 16 dims, L1 lanes per token, two tokens per lane-group */
  {
    const int dpl = d >> 4, L1 = next_pow2(dpl), tpw = 32 / L1;
    const int grp = lane / L1, li = lane - grp * L1;
    const bool act = li < dpl;
    const int iters = CHUNK / (8 * tpw);
    for (int it = 0; it < iters; it++) {
      const int t0 = it * 8 * tpw + warp * tpw + grp, t1 = t0 + 4 * tpw;
      const long long r0 = row_s[t0], r1 = row_s[t1];
      uint4 ka = make_uint4(0, 0, 0, 0), kb = ka, kc = ka, kd = ka;
      if (act && r0 >= 0) {
        const uint4 *p = (const uint4 *)(a.k + r0 + li * 16);
        ka = __ldg(p);
        kb = __ldg(p + 1);
      }
      if (act && r1 >= 0) {
        const uint4 *p = (const uint4 *)(a.k + r1 + li * 16);
        kc = __ldg(p);
        kd = __ldg(p + 1);
      }
      float k0[16], k1[16];
      kvdex__cvt8(ka, k0, bf16);
      kvdex__cvt8(kb, k0 + 8, bf16);
      kvdex__cvt8(kc, k1, bf16);
      kvdex__cvt8(kd, k1 + 8, bf16);
#pragma unroll
      for (int g = 0; g < GM; g++) {
        if (g < ng) {
          float s0 = 0.0f, s1 = 0.0f;
          if (act) {
            const float4 *qp = (const float4 *)&q_s[g][li * 16];
#pragma unroll
            for (int e = 0; e < 4; e++) {
              const float4 qq = qp[e];
              s0 += qq.x * k0[4 * e] + qq.y * k0[4 * e + 1] + qq.z * k0[4 * e + 2] + qq.w * k0[4 * e + 3];
              s1 += qq.x * k1[4 * e] + qq.y * k1[4 * e + 1] + qq.z * k1[4 * e + 2] + qq.w * k1[4 * e + 3];
            }
          }
          for (int off = L1 >> 1; off > 0; off >>= 1) {
            s0 += __shfl_xor_sync(0xffffffffu, s0, off);
            s1 += __shfl_xor_sync(0xffffffffu, s1, off);
          }
          if (li == 0) {
            p_s[g][t0] = r0 >= 0 ? s0 * a.scale_log2 : NEG_INF;
            p_s[g][t1] = r1 >= 0 ? s1 * a.scale_log2 : NEG_INF;
          }
        }
      }
    }
  }
  __syncthreads();

  /* 3. softmax statistics of the split (log2 domain), p = 2^(s - m) in place */
  for (int g = warp; g < ng; g += DEC_THREADS / 32) {
    float m = NEG_INF;
    for (int t = lane; t < CHUNK; t += 32) m = fmaxf(m, p_s[g][t]);
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float l = 0.0f;
    for (int t = lane; t < CHUNK; t += 32) {
      const float w = m == NEG_INF ? 0.0f : exp2f(p_s[g][t] - m);
      p_s[g][t] = w;
      l += w;
    }
    for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
    if (lane == 0) {
      m_s[g] = m;
      l_s[g] = l;
    }
  }
  __syncthreads();

  /* 4. o += p V: lanes of width 8 dims, L2 lanes per token, four tokens in flight */
  {
    const int dpl = d >> 3, L2 = next_pow2(dpl), tpw = 32 / L2;
    const int grp = lane / L2, li = lane - grp * L2;
    const bool act = li < dpl;
    float acc[GMAX][8];
#pragma unroll
    for (int g = 0; g < GM; g++)
#pragma unroll
      for (int e = 0; e < 8; e++) acc[g][e] = 0.0f;
    const int step = 4 * tpw, iters = CHUNK / (4 * step);
    for (int it = 0; it < iters; it++) {
      int t[4];
      uint4 vv[4];
#pragma unroll
      for (int u = 0; u < 4; u++) {
        t[u] = it * 4 * step + u * step + warp * tpw + grp;
        const long long r = row_s[t[u]];
        vv[u] = make_uint4(0, 0, 0, 0);
        if (act && r >= 0) vv[u] = __ldg((const uint4 *)(a.v + r + li * 8));
      }
#pragma unroll
      for (int u = 0; u < 4; u++) {
        float vf[8];
        kvdex__cvt8(vv[u], vf, bf16);
#pragma unroll
        for (int g = 0; g < GM; g++) {
          if (g < ng) {
            const float w = p_s[g][t[u]];
#pragma unroll
            for (int e = 0; e < 8; e++) acc[g][e] += w * vf[e];
          }
        }
      }
    }
    if (act) {
#pragma unroll
      for (int g = 0; g < GM; g++)
        if (g < ng)
#pragma unroll
          for (int e = 0; e < 8; e++) atomicAdd(&o_s[g][li * 8 + e], acc[g][e]);
    }
  }
  __syncthreads();

  /* 5. the normalized partial */
  for (int i = tid; i < ng * d; i += DEC_THREADS) {
    const int g = i / d, c = i - g * d;
    const float l = l_s[g];
    a.o_part[((row0 + g) * a.n_splits + split) * d + c] = l > 0.0f ? o_s[g][c] / l : 0.0f;
  }
  if (tid < ng) {
    const float l = l_s[tid];
    a.lse_part[(row0 + tid) * a.n_splits + split] =
        l > 0.0f ? (m_s[tid] + log2f(l)) * KVDEX__LN2 : NEG_INF;
  }
}

#define DEC_KERNEL(name, bf16, s2, gm) \
  __global__ void __launch_bounds__(DEC_THREADS) name(const dec_args a) { dec_body(a, bf16, s2, gm); }
DEC_KERNEL(dec_sparse4_f16, 0, 0, 4)
DEC_KERNEL(dec_sparse4_bf16, 1, 0, 4)
DEC_KERNEL(dec_sparse8_f16, 0, 0, 8)
DEC_KERNEL(dec_sparse8_bf16, 1, 0, 8)
DEC_KERNEL(dec_s2_f16, 0, 1, 1)
DEC_KERNEL(dec_s2_bf16, 1, 1, 1)

/* One row per thread block: o = sum_i w_i o_i / sum_i w_i, w_i = e^(lse_i - max). */
__global__ void __launch_bounds__(128)
    merge_kernel(int n_parts, int d, const float *o_parts, long long o_part_stride,
                 long long o_row_stride, const float *lse_parts, long long l_part_stride,
                 long long l_row_stride, float *o, float *lse) {
  const long long row = blockIdx.x;
  const float *lp = lse_parts + row * l_row_stride;
  float m = NEG_INF;
  for (int i = 0; i < n_parts; i++) m = fmaxf(m, lp[i * l_part_stride]);
  float *out = o + row * d;
  if (m == NEG_INF) {
    for (int c = threadIdx.x; c < d; c += blockDim.x) out[c] = 0.0f;
    if (threadIdx.x == 0 && lse) lse[row] = NEG_INF;
    return;
  }
  float den = 0.0f;
  for (int i = 0; i < n_parts; i++) {
    const float x = lp[i * l_part_stride];
    if (x != NEG_INF) den += expf(x - m);
  }
  const float *op = o_parts + row * o_row_stride;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float num = 0.0f;
    for (int i = 0; i < n_parts; i++) {
      const float x = lp[i * l_part_stride];
      if (x != NEG_INF) num += expf(x - m) * op[i * o_part_stride + c];
    }
    out[c] = num / den;
  }
  if (threadIdx.x == 0 && lse) lse[row] = m + logf(den);
}

static void fill_common(dec_args *a, uint32_t n_q_heads, const float *q,
                        const kvdex_gpu_kv_pages *kv, const int32_t *seq_lens, float scale,
                        uint32_t n_splits, uint64_t rows, void *ws) {
  memset(a, 0, sizeof *a);
  a->q = q;
  a->k = (const uint16_t *)kv->k;
  a->v = (const uint16_t *)kv->v;
  a->bt = kv->block_table;
  a->bt_bs = (long long)kv->bt_batch_stride;
  a->bt_hs = (long long)kv->bt_head_stride;
  a->block_stride = (long long)kv->block_stride;
  a->head_stride = (long long)kv->head_stride;
  a->block_tokens = (int)kv->block_tokens;
  a->d = (int)kv->head_dim;
  a->n_kv_heads = (int)kv->n_kv_heads;
  a->n_q_heads = (int)n_q_heads;
  a->group = (int)(n_q_heads / kv->n_kv_heads);
  a->n_gpass = 1;
  a->n_splits = (int)n_splits;
  a->seq_lens = seq_lens;
  a->scale_log2 = scale * KVDEX__LOG2E;
  a->o_part = (float *)ws;
  a->lse_part = (float *)ws + rows * n_splits * kv->head_dim;
}

static int launch_split_merge(const char *fn, const dec_args *a, uint64_t rows, float *o,
                              float *lse, cudaStream_t st) {
  merge_kernel<<<(unsigned)rows, 128, 0, st>>>(a->n_splits, a->d, a->o_part, a->d,
                                               (long long)a->n_splits * a->d, a->lse_part, 1,
                                               a->n_splits, o, lse);
  return kvdex__launch_err(fn);
}

static int check_grid(const char *fn, uint32_t splits, uint64_t y, uint32_t batch) {
  if (splits > 0x7fffffffu || y > 65535 || batch > 65535)
    return kvdex__seterr(KVDEX_EINVAL, "%s: grid too large (%u splits, %llu heads, batch %u)",
                         fn, splits, (unsigned long long)y, batch);
  return 0;
}

extern "C" int kvdex_gpu_sparse_decode(uint32_t batch, uint32_t n_q_heads, const float *q,
                                       const kvdex_gpu_kv_pages *kv,
                                       const kvdex_gpu_token_sel *sel, float scale, float *o,
                                       float *lse, void *workspace, size_t workspace_bytes,
                                       void *stream) {
  static const char fn[] = "gpu_sparse_decode";
  int rc = kvdex__check_sparse_decode(fn, batch, n_q_heads, q, kv, sel, &scale, o);
  if (rc) return rc;
  size_t need = kvdex_gpu_sparse_decode_workspace(batch, n_q_heads, kv->head_dim, sel);
  if ((rc = kvdex__check_workspace(fn, workspace, workspace_bytes, need))) return rc;
  const uint32_t splits = kvdex__sparse_splits(sel);
  const uint64_t rows = (uint64_t)batch * n_q_heads;
  dec_args a;
  fill_common(&a, n_q_heads, q, kv, sel->seq_lens, scale, splits, rows, workspace);
  a.sel = sel->sel;
  a.n_sel = sel->n_sel;
  a.n_sink = sel->n_sink;
  a.n_recent = sel->n_recent;
  a.sel_cap = sel->sel_cap;
  const int gm = a.group <= 4 ? 4 : 8;
  a.n_gpass = (a.group + gm - 1) / gm;
  const uint64_t gy = (uint64_t)kv->n_kv_heads * a.n_gpass;
  if ((rc = check_grid(fn, splits, gy, batch))) return rc;
  cudaStream_t st = (cudaStream_t)stream;
  dim3 grid(splits, (unsigned)gy, batch);
  const int bf = kv->dtype == KVDEX_DTYPE_BF16;
  if (gm == 4 && bf)
    dec_sparse4_bf16<<<grid, DEC_THREADS, 0, st>>>(a);
  else if (gm == 4)
    dec_sparse4_f16<<<grid, DEC_THREADS, 0, st>>>(a);
  else if (bf)
    dec_sparse8_bf16<<<grid, DEC_THREADS, 0, st>>>(a);
  else
    dec_sparse8_f16<<<grid, DEC_THREADS, 0, st>>>(a);
  if ((rc = kvdex__launch_err(fn))) return rc;
  return launch_split_merge(fn, &a, rows, o, lse, st);
}

extern "C" int kvdex_gpu_s2_decode(const kvdex_s2_params *p, uint32_t batch, const float *q,
                                   const kvdex_gpu_kv_pages *kv, const int32_t *seq_lens,
                                   uint32_t max_seq_len, float scale, float *o, float *lse,
                                   void *workspace, size_t workspace_bytes, void *stream) {
  static const char fn[] = "gpu_s2_decode";
  int rc = kvdex__check_s2_decode(fn, p, batch, q, kv, seq_lens, max_seq_len, &scale, o);
  if (rc) return rc;
  size_t need = kvdex_gpu_s2_decode_workspace(p, batch, kv->head_dim, max_seq_len);
  if ((rc = kvdex__check_workspace(fn, workspace, workspace_bytes, need))) return rc;
  const uint32_t splits = kvdex__s2_splits(p, max_seq_len);
  const uint64_t rows = (uint64_t)batch * p->n_heads;
  dec_args a;
  fill_common(&a, p->n_heads, q, kv, seq_lens, scale, splits, rows, workspace);
  a.s2_block = p->block;
  a.s2_local = p->local_blocks;
  a.s2_vs = p->vert_stride;
  a.s2_step = kvdex__s2_step(p->n_heads, p->vert_stride);
  a.s2_offset = p->offset;
  if ((rc = check_grid(fn, splits, p->n_heads, batch))) return rc;
  cudaStream_t st = (cudaStream_t)stream;
  dim3 grid(splits, p->n_heads, batch);
  if (kv->dtype == KVDEX_DTYPE_BF16)
    dec_s2_bf16<<<grid, DEC_THREADS, 0, st>>>(a);
  else
    dec_s2_f16<<<grid, DEC_THREADS, 0, st>>>(a);
  if ((rc = kvdex__launch_err(fn))) return rc;
  return launch_split_merge(fn, &a, rows, o, lse, st);
}

extern "C" int kvdex_gpu_lse_merge(uint32_t n_parts, uint32_t n_rows, uint32_t head_dim,
                                   const float *o_parts, const float *lse_parts, float *o,
                                   float *lse, void *stream) {
  static const char fn[] = "gpu_lse_merge";
  int rc = kvdex__check_merge(fn, n_parts, n_rows, head_dim, o_parts, lse_parts, o, lse);
  if (rc || n_rows == 0) return rc;
  if (n_parts > 0x7fffffffu || n_rows > 0x7fffffffu)
    return kvdex__seterr(KVDEX_EINVAL, "%s: too many parts or rows", fn);
  merge_kernel<<<n_rows, 128, 0, (cudaStream_t)stream>>>(
      (int)n_parts, (int)head_dim, o_parts, (long long)n_rows * head_dim, head_dim, lse_parts,
      n_rows, 1, o, lse);
  return kvdex__launch_err(fn);
}
