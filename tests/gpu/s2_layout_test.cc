// Tests for the S2-Attention layout (gpu/s2_layout.c): each head's shard is what the
// DKernel formula says, the union over heads covers every causal block pair when
// n_heads >= vert_stride (and, with fewer heads, the uncovered fraction is reported),
// and the "which KV a head never needs" rule is exact and monotone.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

extern "C" {
#include "gpu/gpu.h"
}

namespace {

// The formula, written out independently of gpu/.
bool Formula(const kvdex_s2_params& p, uint32_t h, uint32_t i, uint32_t j) {
  if (j > i) return false;
  if (i - j < p.local_blocks) return true;
  uint32_t step = p.vert_stride / p.n_heads;
  if (step < 1) step = 1;
  return (uint64_t(j) + uint64_t(h) * step + p.offset) % p.vert_stride == 0;
}

std::vector<kvdex_s2_params> Params() {
  std::vector<kvdex_s2_params> v;
  for (uint32_t heads : {1u, 2u, 3u, 4u, 8u, 16u, 32u})
    for (uint32_t vs : {1u, 2u, 4u, 8u, 16u})
      for (uint32_t local : {1u, 2u, 4u, 16u})
        for (uint32_t off : {0u, 1u, 5u}) v.push_back({heads, 64, local, vs, off});
  return v;
}

TEST(S2Layout, EachHeadsShardIsTheFormula) {
  const uint32_t nb = 40;
  for (const auto& p : Params()) {
    uint64_t nnz = 0;
    ASSERT_EQ(0, kvdex_s2_layout_nnz(&p, nb, &nnz));
    std::vector<int32_t> row_ptr((size_t)p.n_heads * nb + 1), col(nnz);
    ASSERT_EQ(0, kvdex_s2_layout_build(&p, nb, row_ptr.data(), col.data(), nnz));
    EXPECT_EQ(0, row_ptr[0]);
    EXPECT_EQ((int32_t)nnz, row_ptr.back());
    for (uint32_t h = 0; h < p.n_heads; h++)
      for (uint32_t i = 0; i < nb; i++) {
        std::vector<int32_t> want;
        for (uint32_t j = 0; j < nb; j++) {
          bool f = Formula(p, h, i, j);
          ASSERT_EQ(f, kvdex_s2_active(&p, h, i, j) != 0) << h << " " << i << " " << j;
          if (f) want.push_back((int32_t)j);
        }
        size_t r = (size_t)h * nb + i;
        std::vector<int32_t> got(col.begin() + row_ptr[r], col.begin() + row_ptr[r + 1]);
        std::sort(got.begin(), got.end());
        ASSERT_EQ(want, got) << "heads " << p.n_heads << " vs " << p.vert_stride << " local "
                             << p.local_blocks << " offset " << p.offset << " h " << h << " i " << i;
      }
    // Too small a buffer is refused.
    if (nnz > 0) {
      EXPECT_EQ(KVDEX_EINVAL, kvdex_s2_layout_build(&p, nb, row_ptr.data(), col.data(), nnz - 1));
    }
  }
}

TEST(S2Layout, DKernelExample) {
  // n_heads 2, vert_stride 4 -> step 2; offset 1 (DKernel): head 0 keeps j = 3, 7, ...
  // ((j + 1) % 4 == 0), head 1 keeps j = 1, 5, ... ((j + 3) % 4 == 0).
  kvdex_s2_params p{2, 64, 2, 4, 1};
  const uint32_t nb = 8;
  uint64_t nnz;
  ASSERT_EQ(0, kvdex_s2_layout_nnz(&p, nb, &nnz));
  std::vector<int32_t> row_ptr(2 * nb + 1), col(nnz);
  ASSERT_EQ(0, kvdex_s2_layout_build(&p, nb, row_ptr.data(), col.data(), nnz));
  auto row = [&](uint32_t h, uint32_t i) {
    size_t r = (size_t)h * nb + i;
    return std::vector<int32_t>(col.begin() + row_ptr[r], col.begin() + row_ptr[r + 1]);
  };
  EXPECT_EQ((std::vector<int32_t>{3, 6, 7}), row(0, 7));
  EXPECT_EQ((std::vector<int32_t>{1, 5, 6, 7}), row(1, 7));
  EXPECT_EQ((std::vector<int32_t>{0, 1}), row(0, 1));
  EXPECT_EQ((std::vector<int32_t>{3, 4}), row(0, 4));
  EXPECT_EQ((std::vector<int32_t>{1, 3, 4}), row(1, 4));
}

TEST(S2Layout, UnionCoversEveryCausalPairWhenHeadsAtLeastVertStride) {
  const uint32_t nb = 64;
  for (const auto& p : Params()) {
    uint64_t covered = 0, total = 0, brute = 0;
    ASSERT_EQ(0, kvdex_s2_coverage(&p, nb, &covered, &total));
    for (uint32_t i = 0; i < nb; i++)
      for (uint32_t j = 0; j <= i; j++) {
        bool any = false;
        for (uint32_t h = 0; h < p.n_heads && !any; h++) any = Formula(p, h, i, j);
        brute += any;
      }
    EXPECT_EQ((uint64_t)nb * (nb + 1) / 2, total);
    EXPECT_EQ(brute, covered) << p.n_heads << " " << p.vert_stride << " " << p.local_blocks;
    if (p.n_heads >= p.vert_stride) {
      EXPECT_EQ(total, covered);
    }
  }
}

TEST(S2Layout, ReportsUncoveredFractionWithFewerHeads) {
  const uint32_t nb = 2048;  // 128K tokens in blocks of 64
  for (uint32_t heads : {1u, 2u, 4u, 8u})
    for (uint32_t local : {4u, 16u}) {
      kvdex_s2_params p{heads, 64, local, 16, 1};
      uint64_t covered, total;
      ASSERT_EQ(0, kvdex_s2_coverage(&p, nb, &covered, &total));
      double uncovered = 1.0 - (double)covered / (double)total;
      std::printf("  s2 coverage: n_heads %2u vert_stride 16 local %2u, %u blocks: "
                  "uncovered fraction %.4f\n", heads, local, nb, uncovered);
      RecordProperty("uncovered_h" + std::to_string(heads) + "_l" + std::to_string(local),
                     std::to_string(uncovered));
      // Heads cover min(heads, 16) of the 16 residues: roughly 1 - heads/16 of the
      // distant pairs stay uncovered.
      double expect = 1.0 - (double)heads / 16.0;
      EXPECT_GT(uncovered, 0.0);
      EXPECT_NEAR(expect, uncovered, 0.02);
    }
}

TEST(S2Layout, HeadKeepsOneOverVertStrideOfDistantBlocks) {
  const uint32_t nb = 1024;
  for (uint32_t vs : {4u, 8u, 16u}) {
    kvdex_s2_params p{32, 64, 4, vs, 1};
    uint32_t i = nb - 1, distant = i + 1 - p.local_blocks;
    for (uint32_t h = 0; h < p.n_heads; h++) {
      uint32_t kept = 0;
      for (uint32_t j = 0; j < distant; j++) kept += kvdex_s2_active(&p, h, i, j);
      EXPECT_LE(kept, distant / vs + 1);
      EXPECT_GE(kept, distant / vs);
    }
  }
}

TEST(S2Layout, KvNeededIsExactAndMonotone) {
  for (uint32_t group : {1u, 2u, 4u}) {
    kvdex_s2_params p{8, 16, 3, 8, 1};
    uint32_t n_kv = p.n_heads / group, horizon = 60;
    for (uint32_t kvh = 0; kvh < n_kv; kvh++)
      for (uint32_t j = 0; j < 40; j++) {
        int prev = 1;
        for (uint32_t cur = 0; cur < 45; cur++) {
          // Brute force: some query head of the group, some query block i >= cur.
          bool any = j > cur;
          for (uint32_t g = 0; g < group && !any; g++)
            for (uint32_t i = cur; i < horizon && !any; i++) any = Formula(p, kvh * group + g, i, j);
          int got = kvdex_s2_kv_needed(&p, group, kvh, j, cur);
          ASSERT_EQ(any, got != 0) << group << " " << kvh << " " << j << " " << cur;
          EXPECT_TRUE(prev || !got) << "needed again after not needed";
          prev = got;
        }
      }
  }
}

TEST(S2Layout, RejectsMalformedParams) {
  uint64_t nnz;
  kvdex_s2_params bad[] = {{0, 64, 1, 1, 0}, {1, 0, 1, 1, 0}, {1, 64, 0, 1, 0}, {1, 64, 1, 0, 0}};
  for (const auto& p : bad) EXPECT_EQ(KVDEX_EINVAL, kvdex_s2_layout_nnz(&p, 4, &nnz));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_s2_check(nullptr));
  kvdex_s2_params ok{1, 1, 1, 1, 0};
  EXPECT_EQ(0, kvdex_s2_layout_nnz(&ok, 0, &nnz));
  EXPECT_EQ(0u, nnz);
}

}  // namespace
