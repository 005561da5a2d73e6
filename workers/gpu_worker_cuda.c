/* gpu_worker_cuda: the CUDA backend of the decode loop (gpu_worker.h) over the
 * kvdex_gpu_* kernels, and main() of the kvdex_gpu_worker binary (//workers:kvdex_gpu_worker),
 * which runs the `kvdex gpu-worker` command with it. Plain C: it calls gpu/gpu.h and
 * needs no CUDA header; it is only built where //gpu builds (nvcc present). All work
 * goes to the legacy default stream, so kvdex_gpu_copy (cudaMemcpy) orders after it.
 */
#include <stdio.h>
#include <string.h>

#include "gpu/gpu.h"
#include "workers/gpu_worker_cmd.h"

static int cu_alloc(void *ctx, size_t bytes, void **out) {
  (void)ctx;
  return kvdex_gpu_alloc(bytes ? bytes : 16, out);
}
static void cu_free(void *ctx, void *p) {
  (void)ctx;
  kvdex_gpu_free(p);
}
static int cu_copy(void *ctx, void *dst, const void *src, size_t bytes) {
  (void)ctx;
  return bytes ? kvdex_gpu_copy(dst, src, bytes) : 0;
}
static int cu_sparse(void *ctx, uint32_t n_q_heads, const float *q, const kvdex_gpu_kv_pages *kv,
                     const kvdex_gpu_token_sel *sel, float *o, float *lse, void *ws,
                     size_t ws_bytes) {
  return kvdex_gpu_sparse_decode(1, n_q_heads, q, kv, sel, 0.0f, o, lse, ws, ws_bytes, ctx);
}
static int cu_s2(void *ctx, const kvdex_s2_params *p, const float *q, const kvdex_gpu_kv_pages *kv,
                 const int32_t *seq_lens, uint32_t max_seq_len, float *o, float *lse, void *ws,
                 size_t ws_bytes) {
  return kvdex_gpu_s2_decode(p, 1, q, kv, seq_lens, max_seq_len, 0.0f, o, lse, ws, ws_bytes, ctx);
}
static int cu_merge(void *ctx, uint32_t n_parts, uint32_t n_rows, uint32_t head_dim,
                    const float *o_parts, const float *lse_parts, float *o, float *lse) {
  return kvdex_gpu_lse_merge(n_parts, n_rows, head_dim, o_parts, lse_parts, o, lse, ctx);
}
static int cu_sync(void *ctx) { return kvdex_gpu_sync(ctx); }

static const kvdex_gw_backend CUDA = {
    .name = "cuda",
    .ctx = NULL, /* the legacy default stream */
    .alloc = cu_alloc,
    .free = cu_free,
    .upload = cu_copy,
    .download = cu_copy,
    .sparse_decode = cu_sparse,
    .s2_decode = cu_s2,
    .lse_merge = cu_merge,
    .sync = cu_sync,
};

int main(int argc, char **argv) {
  /* `kvdex_gpu_worker [gpu-worker] [options]`: the subcommand name is optional. */
  if (argc >= 2 && !strcmp(argv[1], "gpu-worker")) argc--, argv++;
  return kvdex_gpu_worker_main(argc, argv, &CUDA, kvdex_gpu_available, "kvdex_gpu_worker");
}
