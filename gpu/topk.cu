/* Block scoring on the GPU: one strided-batched SGEMM (cuBLAS) of the queries against
 * the block representatives of every (batch entry, kv head), then a top-k kernel per
 * (batch entry, kv head): the group's max score per block, a 4-pass 8-bit radix
 * select of the k-th largest key, an index-ordered pick of the ties, and a bitonic
 * sort of the k winners (best first, ties by lower index). CUDA C with extern "C"
 * entry points (gpu/gpu.h).
 */
#include <cublas_v2.h>
#include <math.h>

#include "gpu/gpu_cuda.h"

#define TK_THREADS 256
#define TK_MAX KVDEX__TOPK_MAX

static __device__ __forceinline__ float group_score(const float *S, int G, long long cap, int r) {
  float best = S[r];
  for (int g = 1; g < G; g++) {
    const float x = S[g * cap + r];
    if (kvdex__score_key(x) > kvdex__score_key(best)) best = x;
  }
  return best;
}

static __device__ __forceinline__ bool before(unsigned ka, int ia, unsigned kb, int ib) {
  return ka > kb || (ka == kb && ia < ib);
}

__global__ void __launch_bounds__(TK_THREADS)
    topk_kernel(const float *scores, int G, int cap, const int32_t *n_reps, int n_kv, int k,
                int32_t *top_idx, float *top_score) {
  __shared__ unsigned hist[256];
  __shared__ unsigned s_key[TK_MAX];
  __shared__ int s_idx[TK_MAX];
  __shared__ float s_val[TK_MAX];
  __shared__ unsigned sh_prefix, sh_remaining, sh_cnt, sh_ties;
  __shared__ unsigned warp_cnt[TK_THREADS / 32];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const long long bh = blockIdx.x;
  const int b = (int)(bh / n_kv);
  int n = n_reps[b];
  n = n < 0 ? 0 : n > cap ? cap : n;
  const float *S = scores + bh * G * (long long)cap;
  const int kk = k < n ? k : n;

  if (kk == n) { /* everything is selected */
    for (int r = tid; r < n; r += TK_THREADS) {
      const float x = group_score(S, G, cap, r);
      s_key[r] = kvdex__score_key(x);
      s_idx[r] = r;
      s_val[r] = x;
    }
  } else {
    /* radix select: the key of the kk-th largest, and how many equal to it to take */
    unsigned prefix = 0, mask = 0, remaining = (unsigned)kk;
    for (int shift = 24; shift >= 0; shift -= 8) {
      hist[tid] = 0;
      __syncthreads();
      for (int r = tid; r < n; r += TK_THREADS) {
        const unsigned key = kvdex__score_key(group_score(S, G, cap, r));
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        unsigned cum = 0;
        for (int dg = 255; dg >= 0; dg--) {
          if (cum + hist[dg] >= remaining) {
            sh_prefix = prefix | ((unsigned)dg << shift);
            sh_remaining = remaining - cum;
            break;
          }
          cum += hist[dg];
        }
      }
      __syncthreads();
      prefix = sh_prefix;
      remaining = sh_remaining;
      mask |= 255u << shift;
    }
    const unsigned tau = prefix, n_gt = (unsigned)kk - remaining;
    if (tid == 0) {
      sh_cnt = 0;
      sh_ties = 0;
    }
    __syncthreads();
    for (int r = tid; r < n; r += TK_THREADS) {
      const float x = group_score(S, G, cap, r);
      const unsigned key = kvdex__score_key(x);
      if (key > tau) {
        const unsigned at = atomicAdd(&sh_cnt, 1u);
        s_key[at] = key;
        s_idx[at] = r;
        s_val[at] = x;
      }
    }
    /* ties in index order: block-wide exclusive scan, chunk by chunk */
    for (int base = 0; base < n; base += TK_THREADS) {
      __syncthreads();
      const unsigned taken = sh_ties;
      if (taken >= remaining) break; /* uniform: everyone read the same value */
      const int r = base + tid;
      float x = 0.0f;
      bool tie = false;
      if (r < n) {
        x = group_score(S, G, cap, r);
        tie = kvdex__score_key(x) == tau;
      }
      const unsigned ballot = __ballot_sync(0xffffffffu, tie);
      if (lane == 0) warp_cnt[warp] = __popc(ballot);
      __syncthreads();
      unsigned before_me = taken + __popc(ballot & ((1u << lane) - 1u));
      unsigned total = 0;
      for (int w = 0; w < TK_THREADS / 32; w++) {
        if (w < warp) before_me += warp_cnt[w];
        total += warp_cnt[w];
      }
      if (tie && before_me < remaining) {
        const unsigned at = n_gt + before_me;
        s_key[at] = tau;
        s_idx[at] = r;
        s_val[at] = x;
      }
      __syncthreads();
      if (tid == 0) sh_ties = taken + total;
    }
  }
  __syncthreads();

  /* bitonic sort of the kk winners, padded to a power of two */
  int P = 1;
  while (P < kk) P <<= 1;
  for (int i = kk + tid; i < P; i += TK_THREADS) {
    s_key[i] = 0;
    s_idx[i] = 0x7fffffff;
    s_val[i] = NAN;
  }
  __syncthreads();
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < P; i += TK_THREADS) {
        const int j = i ^ stride;
        if (j > i) {
          const bool up = (i & size) == 0; /* this pair sorts best-first */
          const bool swap = up ? before(s_key[j], s_idx[j], s_key[i], s_idx[i])
                               : before(s_key[i], s_idx[i], s_key[j], s_idx[j]);
          if (swap) {
            const unsigned tk = s_key[i];
            const int ti = s_idx[i];
            const float tv = s_val[i];
            s_key[i] = s_key[j], s_idx[i] = s_idx[j], s_val[i] = s_val[j];
            s_key[j] = tk, s_idx[j] = ti, s_val[j] = tv;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int x = tid; x < k; x += TK_THREADS) {
    top_idx[bh * k + x] = x < kk ? s_idx[x] : -1;
    if (top_score) top_score[bh * k + x] = x < kk ? s_val[x] : -INFINITY;
  }
}

extern "C" int kvdex_gpu_block_topk(kvdex_gpu_blas *blas, uint32_t batch, uint32_t n_q_heads,
                                    uint32_t n_kv_heads, uint32_t head_dim, const float *q,
                                    const float *reps, uint32_t rep_cap, const int32_t *n_reps,
                                    uint32_t k, int32_t *top_idx, float *top_score,
                                    void *workspace, size_t workspace_bytes, void *stream) {
  static const char fn[] = "gpu_block_topk";
  if (!blas) return kvdex__seterr(KVDEX_EINVAL, "%s: blas is NULL", fn);
  int rc = kvdex__check_topk(fn, batch, n_q_heads, n_kv_heads, head_dim, q, reps, rep_cap, n_reps,
                             k, top_idx);
  if (rc) return rc;
  size_t need = kvdex_gpu_block_topk_workspace(batch, n_q_heads, rep_cap);
  if ((rc = kvdex__check_workspace(fn, workspace, workspace_bytes, need))) return rc;
  const uint64_t nbh = (uint64_t)batch * n_kv_heads;
  if (nbh > 0x7fffffffu || head_dim > 0x7fffffffu)
    return kvdex__seterr(KVDEX_EINVAL, "%s: too many (batch, kv head) pairs", fn);
  cublasHandle_t h = (cublasHandle_t)kvdex__blas_handle(blas);
  cudaStream_t st = (cudaStream_t)stream;
  if (cublasSetStream(h, st) != CUBLAS_STATUS_SUCCESS)
    return kvdex__seterr(KVDEX_EINTERNAL, "%s: cublasSetStream failed", fn);
  const int G = (int)(n_q_heads / n_kv_heads), d = (int)head_dim, cap = (int)rep_cap;
  const float alpha = 1.0f, beta = 0.0f;
  float *S = (float *)workspace;
  /* Column-major: S_bh (cap x G, ld cap) = reps_bh^T (cap x d) * q_bh (d x G). */
  cublasStatus_t cs = cublasSgemmStridedBatched(
      h, CUBLAS_OP_T, CUBLAS_OP_N, cap, G, d, &alpha, reps, d, (long long)cap * d, q, d,
      (long long)G * d, &beta, S, cap, (long long)cap * G, (int)nbh);
  if (cs != CUBLAS_STATUS_SUCCESS)
    return kvdex__seterr(KVDEX_EINTERNAL, "%s: cublasSgemmStridedBatched failed (status %d)", fn,
                         (int)cs);
  topk_kernel<<<(unsigned)nbh, TK_THREADS, 0, st>>>(S, G, cap, n_reps, (int)n_kv_heads, (int)k,
                                                   top_idx, top_score);
  return kvdex__launch_err(fn);
}
