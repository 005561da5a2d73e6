// The node engine (engine/node.h) on its own: what the server and "local:" both rely
// on. Answers are compared with brute force computed here (top-k by inner product in
// double, softmax attention in double), not with another kvdex code path.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "engine/node.h"
#include "kvstore/base.h"

namespace {

constexpr uint32_t kKv = 2, kQ = 4, kD = 16, kTokens = 300;

kvdex_shape Shape(uint32_t layers = 2) {
  kvdex_shape s{};
  s.n_layers = layers;
  s.n_kv_heads = kKv;
  s.n_q_heads = kQ;
  s.head_dim = kD;
  s.block_tokens = 32;
  s.dtype = KVDEX_DTYPE_F32;
  return s;
}

std::vector<float> Rand(size_t n, uint64_t seed) {
  std::vector<float> v(n);
  for (auto &x : v) x = kvdex__gauss4(&seed);
  return v;
}

class Node : public ::testing::Test {
 protected:
  kvdex_node *node_ = nullptr;
  std::vector<float> k_, v_;  // [kv][tokens][d] of layer 0

  void SetUp() override {
    kvdex_node_opts o{};
    o.memory_cap = 64u << 20;
    o.threads = 2;
    ASSERT_EQ(0, kvdex_node_create(&o, &node_)) << kvdex_errmsg();
    kvdex_shape s = Shape();
    ASSERT_EQ(0, kvdex_node_create_seq(node_, "t", "s", &s, 0)) << kvdex_errmsg();
    k_ = Rand((size_t)kKv * kTokens * kD, 1);
    v_ = Rand((size_t)kKv * kTokens * kD, 2);
    kvdex_seq *seq = Open();
    kvdex_node_txn *txn = nullptr;
    ASSERT_EQ(0, kvdex_node_append_begin(node_, seq, &txn)) << kvdex_errmsg();
    ASSERT_EQ(0, kvdex_node_append(txn, 0, 0, kTokens, k_.data(), v_.data(), nullptr, nullptr))
        << kvdex_errmsg();
    kvdex_txn_result res{};
    ASSERT_EQ(0, kvdex_node_append_commit(txn, &res)) << kvdex_errmsg();
    EXPECT_EQ((uint64_t)kTokens, res.tokens_appended);
    kvdex_seq_release(seq);
  }
  void TearDown() override { kvdex_node_destroy(node_); }

  kvdex_seq *Open() {
    kvdex_seq *seq = nullptr;
    EXPECT_EQ(0, kvdex_node_open(node_, "t", "s", 0, &seq)) << kvdex_errmsg();
    return seq;
  }
  const float *Key(uint32_t kv, uint64_t t) const { return &k_[((size_t)kv * kTokens + t) * kD]; }
  const float *Val(uint32_t kv, uint64_t t) const { return &v_[((size_t)kv * kTokens + t) * kD]; }
  static double Dot(const float *a, const float *b) {
    double s = 0;
    for (uint32_t c = 0; c < kD; c++) s += (double)a[c] * b[c];
    return s;
  }
  // Brute-force top-k ids of query head h over tokens [lo, hi).
  std::vector<uint64_t> TopK(const float *q, uint32_t h, uint32_t k, uint64_t lo, uint64_t hi) {
    std::vector<uint64_t> ids(hi - lo);
    std::iota(ids.begin(), ids.end(), lo);
    uint32_t kv = h / (kQ / kKv);
    std::stable_sort(ids.begin(), ids.end(), [&](uint64_t a, uint64_t b) {
      return Dot(q, Key(kv, a)) > Dot(q, Key(kv, b));
    });
    ids.resize(std::min<size_t>(k, ids.size()));
    return ids;
  }
};

TEST_F(Node, AppendThenReadReturnsTheBytes) {
  kvdex_seq *seq = Open();
  std::vector<uint64_t> ids = {299, 0, 150, 31, 32};
  std::vector<float> k(kKv * ids.size() * kD), v(k.size());
  ASSERT_EQ(0, kvdex_node_read(node_, seq, 0, ids.data(), ids.size(), k.data(), v.data()))
      << kvdex_errmsg();
  for (uint32_t g = 0; g < kKv; g++)
    for (size_t i = 0; i < ids.size(); i++) {
      EXPECT_EQ(0, memcmp(&k[(g * ids.size() + i) * kD], Key(g, ids[i]), kD * sizeof(float)));
      EXPECT_EQ(0, memcmp(&v[(g * ids.size() + i) * kD], Val(g, ids[i]), kD * sizeof(float)));
    }
  uint64_t beyond = kTokens;
  EXPECT_EQ(KVDEX_EINVAL, kvdex_node_read(node_, seq, 0, &beyond, 1, k.data(), v.data()));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_node_read(node_, seq, 2, ids.data(), 1, k.data(), v.data()));
  kvdex_seq_release(seq);
}

TEST_F(Node, ExactSearchEqualsBruteForceAndReportsItsPath) {
  kvdex_seq *seq = Open();
  std::vector<float> q = Rand(kQ * kD, 7);
  kvdex_search_opts so{};
  so.k = 10;
  so.sinks = 4;
  so.window = 16;
  so.simd = KVDEX_SIMD_AUTO;
  kvdex_node_ctx *ctx = nullptr;
  ASSERT_EQ(0, kvdex_node_ctx_take(node_, &ctx));
  for (const char *index : {"", "exact", "auto"}) {
    const kvdex_search_result *res = nullptr;
    const char *used = nullptr;
    ASSERT_EQ(0, kvdex_node_search(node_, ctx, seq, 0, q.data(), &so, index, nullptr, &res, &used))
        << kvdex_errmsg();
    EXPECT_STREQ("exact", used) << index;
    ASSERT_EQ(kQ, res->n_q_heads);
    for (uint32_t h = 0; h < kQ; h++) {
      std::vector<uint64_t> want = TopK(&q[h * kD], h, so.k, so.sinks, kTokens - so.window);
      ASSERT_EQ(want.size(), res->heads[h].n_hits);
      for (size_t i = 0; i < want.size(); i++) EXPECT_EQ(want[i], res->heads[h].hits[i].id);
    }
  }
  // Decided in one place: "retained" without a retained set, an index kind not built.
  const kvdex_search_result *res = nullptr;
  EXPECT_EQ(KVDEX_ECONFLICT,
            kvdex_node_search(node_, ctx, seq, 0, q.data(), &so, "retained", nullptr, &res, nullptr));
  EXPECT_EQ(KVDEX_ECONFLICT,
            kvdex_node_search(node_, ctx, seq, 0, q.data(), &so, "graph", nullptr, &res, nullptr));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_node_check_index("nonsense"));
  EXPECT_EQ(0, kvdex_node_check_index("retained"));
  kvdex_node_ctx_give(node_, ctx);
  kvdex_seq_release(seq);
}

TEST_F(Node, RetainThenRetainedSearchScoresOnlyTheRetainedTokens) {
  kvdex_seq *seq = Open();
  kvdex_node_ctx *ctx = nullptr;
  ASSERT_EQ(0, kvdex_node_ctx_take(node_, &ctx));
  std::vector<float> obs = Rand(2 * kQ * kD, 9);
  kvdex_retain_opts ro{};
  ro.budget = 20;
  ro.pool_window = 1;
  ro.pooling = KVDEX_POOLING_MAX;
  ro.simd = KVDEX_SIMD_AUTO;
  std::vector<uint64_t> kept(kKv * ro.budget);
  ASSERT_EQ(0, kvdex_node_retain(node_, ctx, seq, 0, obs.data(), 2, &ro, 1, kept.data(), nullptr))
      << kvdex_errmsg();
  std::vector<float> q = Rand(kQ * kD, 11);
  kvdex_search_opts so{};
  so.k = 5;
  so.simd = KVDEX_SIMD_AUTO;
  const kvdex_search_result *res = nullptr;
  const char *used = nullptr;
  ASSERT_EQ(0, kvdex_node_search(node_, ctx, seq, 0, q.data(), &so, "retained", nullptr, &res,
                                 &used))
      << kvdex_errmsg();
  EXPECT_STREQ("retained", used);
  for (uint32_t h = 0; h < kQ; h++) {
    uint32_t kv = h / (kQ / kKv);
    std::vector<uint64_t> mine(kept.begin() + kv * ro.budget, kept.begin() + (kv + 1) * ro.budget);
    std::stable_sort(mine.begin(), mine.end(), [&](uint64_t a, uint64_t b) {
      return Dot(&q[h * kD], Key(kv, a)) > Dot(&q[h * kD], Key(kv, b));
    });
    ASSERT_EQ(so.k, res->heads[h].n_hits);
    for (uint32_t i = 0; i < so.k; i++) EXPECT_EQ(mine[i], res->heads[h].hits[i].id) << h;
  }
  kvdex_node_ctx_give(node_, ctx);
  kvdex_seq_release(seq);
}

TEST_F(Node, DenseAttendEqualsSoftmaxInDouble) {
  kvdex_seq *seq = Open();
  kvdex_node_ctx *ctx = nullptr;
  ASSERT_EQ(0, kvdex_node_ctx_take(node_, &ctx));
  std::vector<float> q = Rand(kQ * kD, 13), o(kQ * kD), lse(kQ);
  kvdex_attend_req ar{};
  ar.dense = 1;
  ar.sinks = 2;
  ar.window = 8;
  kvdex_attend_stats st{};
  ASSERT_EQ(0, kvdex_node_attend(node_, ctx, seq, 0, q.data(), &ar, o.data(), lse.data(), &st))
      << kvdex_errmsg();
  EXPECT_STREQ("dense", st.used);
  EXPECT_EQ((uint64_t)kTokens, st.tokens);
  EXPECT_GE(st.seconds, 0.0);
  double scale = 1.0 / std::sqrt((double)kD);
  for (uint32_t h = 0; h < kQ; h++) {
    uint32_t kv = h / (kQ / kKv);
    double m = -INFINITY;
    for (uint64_t t = ar.sinks; t < kTokens - ar.window; t++)
      m = std::max(m, scale * Dot(&q[h * kD], Key(kv, t)));
    double sum = 0;
    std::vector<double> acc(kD, 0.0);
    for (uint64_t t = ar.sinks; t < kTokens - ar.window; t++) {
      double w = std::exp(scale * Dot(&q[h * kD], Key(kv, t)) - m);
      sum += w;
      for (uint32_t c = 0; c < kD; c++) acc[c] += w * Val(kv, t)[c];
    }
    EXPECT_NEAR(m + std::log(sum), lse[h], 1e-4);
    for (uint32_t c = 0; c < kD; c++) EXPECT_NEAR(acc[c] / sum, o[h * kD + c], 1e-4);
  }
  kvdex_node_ctx_give(node_, ctx);
  kvdex_seq_release(seq);
}

TEST_F(Node, HiddenSequencesStatAndDelete) {
  kvdex_shape s = Shape(1);
  ASSERT_EQ(0, kvdex_node_create_seq(node_, "t", "hidden", &s, 1));
  kvdex_seq *seq = nullptr;
  EXPECT_EQ(KVDEX_ENOTFOUND, kvdex_node_open(node_, "t", "hidden", 0, &seq));
  ASSERT_EQ(0, kvdex_node_open(node_, "t", "hidden", 1, &seq));
  kvdex_node_publish(node_, seq);
  kvdex_seq_release(seq);
  ASSERT_EQ(0, kvdex_node_open(node_, "t", "hidden", 0, &seq));
  kvdex_seq_release(seq);

  char **ids = nullptr;
  size_t n = 0;
  ASSERT_EQ(0, kvdex_node_list_ids(node_, "t", &ids, &n));
  ASSERT_EQ(2u, n);
  EXPECT_STREQ("hidden", ids[0]);
  EXPECT_STREQ("s", ids[1]);
  for (size_t i = 0; i < n; i++) free(ids[i]);
  free(ids);

  seq = Open();
  kvdex_node_info info{};
  ASSERT_EQ(0, kvdex_node_stat(node_, seq, &info));
  EXPECT_EQ(2u, info.shape.n_layers);
  EXPECT_EQ((uint64_t)kTokens, info.layer_tokens[0]);
  EXPECT_EQ(0u, info.layer_tokens[1]);
  EXPECT_EQ(0u, info.n_indexes);
  uint64_t bytes = info.bytes;
  EXPECT_GE(bytes, 2ull * kKv * kTokens * kD * sizeof(float));
  kvdex_node_info_free(&info);
  kvdex_seq_release(seq);

  kvdex_store_stats before{}, after{};
  kvdex_node_store_stats(node_, &before);
  uint64_t freed = 0;
  ASSERT_EQ(0, kvdex_node_delete_seq(node_, "t", "s", &freed));
  EXPECT_EQ(bytes, freed);
  kvdex_node_store_stats(node_, &after);
  EXPECT_EQ(before.bytes_used - freed, after.bytes_used);
  EXPECT_EQ(KVDEX_ENOTFOUND, kvdex_node_delete_seq(node_, "t", "s", nullptr));
}

}  // namespace
