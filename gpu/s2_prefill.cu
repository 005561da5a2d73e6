/* S2-Attention prefill: block-sparse causal attention over the CSR layout of
 * kvdex_s2_layout_build, on tensor cores (mma.sync m16n8k16, f16 or bf16 in, f32
 * accumulate), FlashAttention-2 style: a thread block owns 64 query rows of one head
 * (4 warps x 16 rows), walks only the active key tiles of its query block, keeps
 * S/P/O in registers with an online softmax, and double-buffers the K/V tiles in
 * shared memory with cp.async. CUDA C with an extern "C" entry point (gpu/gpu.h).
 */
#include <math.h>

#include "gpu/gpu_cuda.h"

#define PT KVDEX__PRE_TILE  /* 64 query rows per block, 64 keys per tile */
#define PTHREADS 128
#define DMAXP KVDEX__PRE_DMAX
#define NEG_INF (-INFINITY)

typedef struct pre_args {
  const uint16_t *q, *k, *v;
  uint16_t *o;
  float *lse;
  const int32_t *row_ptr, *col;
  int seq, d, n_heads, group, tiles_per_block, n_qtiles, n_blocks;
  float scale_log2;
} pre_args;

static __device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(kvdex__smem_addr(smem)),
               "l"(gmem), "r"(bytes));
}
static __device__ __forceinline__ void cp_async_commit(void) {
  asm volatile("cp.async.commit_group;\n" ::);
}
static __device__ __forceinline__ void cp_async_wait0(void) {
  asm volatile("cp.async.wait_group 0;\n" ::);
}
static __device__ __forceinline__ void cp_async_wait1(void) {
  asm volatile("cp.async.wait_group 1;\n" ::);
}

static __device__ __forceinline__ void ldsm_x4(const void *p, uint32_t *r) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(kvdex__smem_addr(p)));
}
static __device__ __forceinline__ void ldsm_x4_trans(const void *p, uint32_t *r) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(kvdex__smem_addr(p)));
}

/* c += a (16x16, row) * b (16x8, col) */
static __device__ __forceinline__ void mma16816(float *c, const uint32_t *a, uint32_t b0,
                                                uint32_t b1, const int bf16) {
  if (bf16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Key tile of linear index u in the row's tile list, or -1 when beyond the diagonal. */
static __device__ __forceinline__ int tile_of(const pre_args *a, long long u, int qt) {
  const long long e = u / a->tiles_per_block;
  const int kt = a->col[e] * a->tiles_per_block + (int)(u - e * a->tiles_per_block);
  return kt <= qt ? kt : -1;
}

static __device__ __forceinline__ long long next_tile(const pre_args *a, long long u,
                                                      long long u_end, int qt) {
  while (u < u_end && tile_of(a, u, qt) < 0) u++;
  return u;
}

static __device__ __forceinline__ void load_tile(const pre_args *a, const uint16_t *kbase,
                                                 const uint16_t *vbase, uint16_t *ks,
                                                 uint16_t *vs, int kt, int sstride) {
  const int cpr = a->d >> 3; /* 16-byte chunks per row */
  for (int i = threadIdx.x; i < PT * cpr; i += PTHREADS) {
    const int r = i / cpr, c = (i - r * cpr) * 8;
    const int key = kt * PT + r;
    const bool ok = key < a->seq;
    const long long off = ok ? (long long)key * a->d + c : 0;
    cp_async16(ks + r * sstride + c, kbase + off, ok ? 16 : 0);
    cp_async16(vs + r * sstride + c, vbase + off, ok ? 16 : 0);
  }
  cp_async_commit();
}

static __device__ __forceinline__ void pre_body(const pre_args a, const int bf16) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint16_t *smem = (uint16_t *)smem_raw;
  const int d = a.d, sstride = d + 8, nks = d >> 4, ndn = d >> 3;
  /* buffer x: K at smem + 2x * PT * sstride, V right after it */
  const int bufsz = 2 * PT * sstride;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
  const int h = blockIdx.y, qt = a.n_qtiles - 1 - blockIdx.x; /* longest rows first */
  const int kvh = h / a.group;
  const int qb = qt * PT / (a.tiles_per_block * PT);
  const long long hs = (long long)a.seq * d;
  const uint16_t *qh = a.q + h * hs, *kb = a.k + kvh * hs, *vb = a.v + kvh * hs;
  const int r0 = qt * PT + warp * 16 + g, r1 = r0 + 8;

  /* Q fragments for the warp's 16 rows, all of head_dim */
  uint32_t qa[DMAXP / 16][4];
#pragma unroll
  for (int ks = 0; ks < DMAXP / 16; ks++) {
    if (ks < nks) {
      const int c = ks * 16 + tig * 2;
      qa[ks][0] = r0 < a.seq ? *(const uint32_t *)(qh + (long long)r0 * d + c) : 0u;
      qa[ks][1] = r1 < a.seq ? *(const uint32_t *)(qh + (long long)r1 * d + c) : 0u;
      qa[ks][2] = r0 < a.seq ? *(const uint32_t *)(qh + (long long)r0 * d + c + 8) : 0u;
      qa[ks][3] = r1 < a.seq ? *(const uint32_t *)(qh + (long long)r1 * d + c + 8) : 0u;
    }
  }
  float oacc[DMAXP / 8][4];
#pragma unroll
  for (int i = 0; i < DMAXP / 8; i++) oacc[i][0] = oacc[i][1] = oacc[i][2] = oacc[i][3] = 0.0f;
  float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;

  const long long rrow = (long long)h * a.n_blocks + qb;
  const long long u_end = (long long)a.row_ptr[rrow + 1] * a.tiles_per_block;
  long long u = next_tile(&a, (long long)a.row_ptr[rrow] * a.tiles_per_block, u_end, qt);
  int buf = 0;
  if (u < u_end) load_tile(&a, kb, vb, smem, smem + PT * sstride, tile_of(&a, u, qt), sstride);
  while (u < u_end) {
    const int kt = tile_of(&a, u, qt);
    const long long un = next_tile(&a, u + 1, u_end, qt);
    if (un < u_end) {
      uint16_t *nb = smem + (buf ^ 1) * bufsz;
      load_tile(&a, kb, vb, nb, nb + PT * sstride, tile_of(&a, un, qt), sstride);
      cp_async_wait1();
    } else {
      cp_async_wait0();
    }
    __syncthreads();
    const uint16_t *ks_ = smem + buf * bufsz, *vs_ = ks_ + PT * sstride;

    /* S = Q K^T for 16 rows x 64 keys (8 n-tiles) */
    float s[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < DMAXP / 16; ks += 2) {
      if (ks < nks) {
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
          uint32_t bfr[4];
          ldsm_x4(ks_ + (nt * 8 + (lane & 7)) * sstride + ks * 16 + (lane >> 3) * 8, bfr);
          mma16816(s[nt], qa[ks], bfr[0], bfr[1], bf16);
          mma16816(s[nt], qa[ks + 1], bfr[2], bfr[3], bf16);
        }
      }
    }
    /* scale to log2 domain, causal/length mask, online softmax */
    const bool diag = kt == qt;
    float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int key = kt * PT + nt * 8 + tig * 2 + (e & 1);
        const int row = e < 2 ? r0 : r1;
        float x = s[nt][e] * a.scale_log2;
        if (key >= a.seq || (diag && key > row)) x = NEG_INF;
        s[nt][e] = x;
      }
      mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
      mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float mu0 = mn0 == NEG_INF ? 0.0f : mn0, mu1 = mn1 == NEG_INF ? 0.0f : mn1;
    const float al0 = exp2f(m0 - mu0), al1 = exp2f(m1 - mu1);
    m0 = mn0;
    m1 = mn1;
    float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
      s[nt][0] = exp2f(s[nt][0] - mu0);
      s[nt][1] = exp2f(s[nt][1] - mu0);
      s[nt][2] = exp2f(s[nt][2] - mu1);
      s[nt][3] = exp2f(s[nt][3] - mu1);
      rs0 += s[nt][0] + s[nt][1];
      rs1 += s[nt][2] + s[nt][3];
    }
    l0 = l0 * al0 + rs0;
    l1 = l1 * al1 + rs1;
#pragma unroll
    for (int dn = 0; dn < DMAXP / 8; dn++) {
      oacc[dn][0] *= al0;
      oacc[dn][1] *= al0;
      oacc[dn][2] *= al1;
      oacc[dn][3] *= al1;
    }
    /* O += P V: P's accumulator layout is the A-operand layout of the next mma */
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
      uint32_t pa[4];
      pa[0] = kvdex__pack2(s[2 * kk][0], s[2 * kk][1], bf16);
      pa[1] = kvdex__pack2(s[2 * kk][2], s[2 * kk][3], bf16);
      pa[2] = kvdex__pack2(s[2 * kk + 1][0], s[2 * kk + 1][1], bf16);
      pa[3] = kvdex__pack2(s[2 * kk + 1][2], s[2 * kk + 1][3], bf16);
#pragma unroll
      for (int dn = 0; dn < DMAXP / 8; dn += 2) {
        if (dn < ndn) {
          uint32_t bfr[4];
          ldsm_x4_trans(vs_ + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * sstride + dn * 8 +
                            (lane >> 4) * 8,
                        bfr);
          mma16816(oacc[dn], pa, bfr[0], bfr[1], bf16);
          mma16816(oacc[dn + 1], pa, bfr[2], bfr[3], bf16);
        }
      }
    }
    __syncthreads(); /* the next iteration refills this buffer */
    buf ^= 1;
    u = un;
  }

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
  uint16_t *oh = a.o + h * hs;
#pragma unroll
  for (int dn = 0; dn < DMAXP / 8; dn++) {
    if (dn < ndn) {
      const int c = dn * 8 + tig * 2;
      if (r0 < a.seq)
        *(uint32_t *)(oh + (long long)r0 * d + c) =
            kvdex__pack2(oacc[dn][0] * inv0, oacc[dn][1] * inv0, bf16);
      if (r1 < a.seq)
        *(uint32_t *)(oh + (long long)r1 * d + c) =
            kvdex__pack2(oacc[dn][2] * inv1, oacc[dn][3] * inv1, bf16);
    }
  }
  if (a.lse && tig == 0) {
    if (r0 < a.seq)
      a.lse[(long long)h * a.seq + r0] = l0 > 0.0f ? (m0 + log2f(l0)) * KVDEX__LN2 : NEG_INF;
    if (r1 < a.seq)
      a.lse[(long long)h * a.seq + r1] = l1 > 0.0f ? (m1 + log2f(l1)) * KVDEX__LN2 : NEG_INF;
  }
}

__global__ void __launch_bounds__(PTHREADS) s2_prefill_f16(const pre_args a) { pre_body(a, 0); }
__global__ void __launch_bounds__(PTHREADS) s2_prefill_bf16(const pre_args a) { pre_body(a, 1); }

extern "C" int kvdex_gpu_s2_prefill(const kvdex_s2_params *p, uint32_t n_kv_heads,
                                    uint32_t seq_len, uint32_t head_dim, int dtype,
                                    const void *q, const void *k, const void *v,
                                    const int32_t *row_ptr, const int32_t *col, float scale,
                                    void *o, float *lse, void *stream) {
  static const char fn[] = "gpu_s2_prefill";
  int rc = kvdex__check_s2_prefill(fn, p, n_kv_heads, seq_len, head_dim, dtype, q, k, v, row_ptr,
                                   col, &scale, o);
  if (rc || seq_len == 0) return rc;
  if (p->n_heads > 65535) return kvdex__seterr(KVDEX_EINVAL, "%s: n_heads > 65535", fn);
  pre_args a;
  a.q = (const uint16_t *)q;
  a.k = (const uint16_t *)k;
  a.v = (const uint16_t *)v;
  a.o = (uint16_t *)o;
  a.lse = lse;
  a.row_ptr = row_ptr;
  a.col = col;
  a.seq = (int)seq_len;
  a.d = (int)head_dim;
  a.n_heads = (int)p->n_heads;
  a.group = (int)(p->n_heads / n_kv_heads);
  a.tiles_per_block = (int)(p->block / PT);
  a.n_qtiles = (int)((seq_len + PT - 1) / PT);
  a.n_blocks = (int)((seq_len + p->block - 1) / p->block);
  a.scale_log2 = scale * KVDEX__LOG2E;
  const size_t smem = (size_t)4 * PT * (head_dim + 8) * sizeof(uint16_t);
  const void *kern = dtype == KVDEX_DTYPE_BF16 ? (const void *)s2_prefill_bf16
                                               : (const void *)s2_prefill_f16;
  if ((rc = kvdex__cuda_err(fn, (int)cudaFuncSetAttribute(
                                    kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem))))
    return rc;
  dim3 grid((unsigned)a.n_qtiles, p->n_heads);
  cudaStream_t st = (cudaStream_t)stream;
  if (dtype == KVDEX_DTYPE_BF16)
    s2_prefill_bf16<<<grid, PTHREADS, smem, st>>>(a);
  else
    s2_prefill_f16<<<grid, PTHREADS, smem, st>>>(a);
  return kvdex__launch_err(fn);
}
