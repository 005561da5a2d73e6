// GPU kernels vs their CPU twins (tests/gpu/compare.c). Every case that needs a device
// calls GTEST_SKIP() when kvdex_gpu_available() is 0, so CI without a GPU counts them
// as skipped. The argument checks of the kernel entry points run before any CUDA call
// and are tested everywhere, as is the no-device behaviour of the runtime helpers.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

extern "C" {
#include "gpu/gpu.h"
#include "tests/gpu/compare.h"
}

namespace {

#define NEED_GPU()                                                       \
  do {                                                                   \
    if (!kvdex_gpu_available()) GTEST_SKIP() << "no usable CUDA device"; \
  } while (0)

void ExpectWithin(int rc, const tc_result& r, const char* what) {
  ASSERT_EQ(0, rc) << what << ": " << r.msg;
  EXPECT_LE(r.err, TC_TOL) << what;
  EXPECT_LE(r.err_lse, 1e-3) << what;
}

TEST(GpuRuntime, AvailableIsABoolean) {
  int a = kvdex_gpu_available();
  EXPECT_TRUE(a == 0 || a == 1);
  if (!a) {  // the helpers fail cleanly, with a message, and never crash
    kvdex_gpu_info info;
    EXPECT_EQ(KVDEX_EUNAVAIL, kvdex_gpu_device_info(&info));
    void* p = nullptr;
    EXPECT_NE(0, kvdex_gpu_alloc(64, &p));
    EXPECT_EQ(nullptr, p);
    kvdex_gpu_free(nullptr);
    kvdex_gpu_blas_destroy(nullptr);
  }
}

TEST(GpuRuntime, DeviceInfo) {
  NEED_GPU();
  kvdex_gpu_info info;
  ASSERT_EQ(0, kvdex_gpu_device_info(&info)) << kvdex_errmsg();
  EXPECT_GT(info.sm_count, 0);
  EXPECT_GT(info.peak_bw_gbs, 100.0) << info.name;
  std::printf("  device %s, sm_%d%d, %d SMs, peak HBM %.0f GB/s\n", info.name, info.cc_major,
              info.cc_minor, info.sm_count, info.peak_bw_gbs);
}

// The kernels' argument checks need no device: they refuse before touching CUDA.
TEST(GpuArgs, RefusedBeforeAnyLaunch) {
  kvdex_gpu_kv_pages kv{};
  kv.dtype = KVDEX_DTYPE_F16, kv.head_dim = 24, kv.n_kv_heads = 1, kv.block_tokens = 16;
  alignas(16) static uint16_t pool[64];
  static int32_t table[4];
  kv.k = pool, kv.v = pool, kv.block_table = table, kv.max_blocks = 4, kv.n_pool_blocks = 1;
  int32_t seq = 4;
  kvdex_gpu_token_sel sel{};
  sel.seq_lens = &seq;
  float q[64] = {0}, o[64] = {0}, lse[2] = {0};
  EXPECT_EQ(KVDEX_EINVAL, kvdex_gpu_sparse_decode(1, 1, q, &kv, &sel, 0, o, lse, nullptr, 0, nullptr));
  kv.head_dim = 32;
  EXPECT_EQ(KVDEX_EINVAL, kvdex_gpu_sparse_decode(1, 1, q, &kv, &sel, 0, o, lse, nullptr, 0, nullptr))
      << "no workspace";
  EXPECT_NE(nullptr, std::strstr(kvdex_errmsg(), "workspace"));
  kv.dtype = KVDEX_DTYPE_F32;
  EXPECT_EQ(KVDEX_EUNIMPL, kvdex_gpu_sparse_decode(1, 1, q, &kv, &sel, 0, o, lse, nullptr, 0, nullptr));
  kvdex_s2_params s2{4, 32, 1, 4, 1};
  EXPECT_EQ(KVDEX_EUNIMPL, kvdex_gpu_s2_prefill(&s2, 1, 8, 64, KVDEX_DTYPE_F16, pool, pool, pool,
                                                table, table, 0, pool, nullptr, nullptr));
  s2.vert_stride = 0;
  EXPECT_EQ(KVDEX_EINVAL, kvdex_gpu_s2_decode(&s2, 1, q, &kv, &seq, 4, 0, o, lse, nullptr, 0, nullptr));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_gpu_block_topk(nullptr, 1, 1, 1, 4, q, q, 1, &seq, 1, table,
                                               nullptr, nullptr, 0, nullptr));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_gpu_lse_merge(1, 1, 0, q, q, o, lse, nullptr));
  // Workspace sizes are pure arithmetic.
  sel.sel_cap = 1000, sel.n_sink = 4, sel.n_recent = 60;
  EXPECT_EQ((size_t)2 * 8 * 5 * (128 + 1) * 4, kvdex_gpu_sparse_decode_workspace(2, 8, 128, &sel));
  EXPECT_EQ((size_t)3 * 5 * 7 * 4, kvdex_gpu_block_topk_workspace(3, 5, 7));
}

tp_decode_cfg DecodeCfg(uint32_t batch, uint32_t nq, uint32_t nkv, uint32_t d, uint32_t bt,
                        uint32_t seq, int dtype, int vllm, uint32_t sel_cap) {
  tp_decode_cfg c{};
  c.batch = batch, c.n_q_heads = nq, c.n_kv_heads = nkv, c.head_dim = d, c.block_tokens = bt;
  c.max_seq = seq, c.dtype = dtype, c.vllm_layout = vllm;
  c.n_sink = 4, c.n_recent = 64, c.sel_cap = sel_cap, c.q_mag = 4.0f;
  return c;
}

TEST(GpuSparseDecode, MatchesTwin) {
  NEED_GPU();
  struct Case {
    tp_decode_cfg c;
    const char* name;
  } cases[] = {
      {DecodeCfg(2, 32, 8, 128, 16, 3000, KVDEX_DTYPE_F16, 0, 1500), "gqa4 d128 f16"},
      {DecodeCfg(3, 16, 2, 64, 16, 2000, KVDEX_DTYPE_BF16, 1, 700), "gqa8 d64 bf16 vllm"},
      {DecodeCfg(1, 16, 1, 256, 32, 1500, KVDEX_DTYPE_F16, 0, 1000), "gqa16 (2 passes) d256"},
      {DecodeCfg(2, 6, 2, 96, 7, 900, KVDEX_DTYPE_BF16, 0, 600), "gqa3 d96 odd blocks"},
      {DecodeCfg(2, 4, 4, 16, 5, 300, KVDEX_DTYPE_F16, 1, 0), "mha d16 static only"},
  };
  uint64_t seed = 1;
  for (const auto& k : cases) {
    tc_result r;
    ExpectWithin(tc_sparse_decode(&k.c, seed++, &r), r, k.name);
  }
}

TEST(GpuS2Decode, MatchesTwin) {
  NEED_GPU();
  kvdex_s2_params s2a{32, 64, 4, 16, 1}, s2b{8, 16, 2, 4, 0};
  tp_decode_cfg a = DecodeCfg(2, 32, 8, 128, 16, 5000, KVDEX_DTYPE_BF16, 0, 0);
  a.s2 = &s2a;
  tp_decode_cfg b = DecodeCfg(3, 8, 8, 64, 8, 2000, KVDEX_DTYPE_F16, 1, 0);
  b.s2 = &s2b;
  tc_result r;
  ExpectWithin(tc_s2_decode(&a, 11, &r), r, "s2 decode gqa bf16");
  ExpectWithin(tc_s2_decode(&b, 12, &r), r, "s2 decode mha f16 vllm");
}

TEST(GpuLseMerge, MatchesTwin) {
  NEED_GPU();
  tc_result r;
  ExpectWithin(tc_lse_merge(3, 70, 128, 21, &r), r, "3 parts");
  ExpectWithin(tc_lse_merge(1, 5, 64, 22, &r), r, "1 part");
  ExpectWithin(tc_lse_merge(300, 9, 80, 23, &r), r, "300 parts");
}

TEST(GpuS2Prefill, MatchesTwin) {
  NEED_GPU();
  kvdex_s2_params a{8, 64, 2, 4, 1}, b{4, 128, 1, 2, 0};
  tc_result r;
  ExpectWithin(tc_s2_prefill(&a, 8, 1000, 128, KVDEX_DTYPE_F16, 31, &r), r, "f16 d128");
  ExpectWithin(tc_s2_prefill(&a, 2, 777, 64, KVDEX_DTYPE_BF16, 32, &r), r, "bf16 d64 gqa");
  ExpectWithin(tc_s2_prefill(&b, 4, 1300, 96, KVDEX_DTYPE_F16, 33, &r), r, "block 128 d96");
  ExpectWithin(tc_s2_prefill(&b, 1, 70, 32, KVDEX_DTYPE_BF16, 34, &r), r, "d32 short");
}

TEST(GpuBlockTopk, MatchesTwin) {
  NEED_GPU();
  tc_result r;
  ASSERT_EQ(0, tc_block_topk(2, 32, 8, 128, 2048, 64, 41, &r)) << r.msg;
  EXPECT_LE(r.err, 1e-4);
  ASSERT_EQ(0, tc_block_topk(3, 4, 4, 64, 500, 1024, 42, &r)) << r.msg;
  EXPECT_LE(r.err, 1e-4);
  ASSERT_EQ(0, tc_block_topk(1, 8, 1, 32, 9000, 100, 43, &r)) << r.msg;
  EXPECT_LE(r.err, 1e-4);
}

}  // namespace
