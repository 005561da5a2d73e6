// Tests for gpu's CPU twins against dense attention computed here in double
// precision: each reference attends every token of the sequence under a mask written
// from the definitions (static + selected set, the S2 formula), reading K/V through
// the block table, so paging, selection and layout are checked independently of the
// twins' own token enumeration. Runs on any machine (no CUDA).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <vector>

extern "C" {
#include "gpu/gpu.h"
#include "tests/gpu/problems.h"
}

namespace {

// Softmax attention of q over the rows with mask[t] = true, in double.
struct DenseOut {
  std::vector<double> o;
  double lse;
};

DenseOut DenseAttend(const float* q, uint32_t d, double scale,
                     const std::vector<std::vector<float>>& keys,
                     const std::vector<std::vector<float>>& vals) {
  DenseOut r{std::vector<double>(d, 0.0), -INFINITY};
  if (keys.empty()) return r;
  std::vector<double> s(keys.size());
  double m = -INFINITY;
  for (size_t t = 0; t < keys.size(); t++) {
    double dot = 0;
    for (uint32_t c = 0; c < d; c++) dot += (double)q[c] * keys[t][c];
    s[t] = dot * scale;
    m = std::max(m, s[t]);
  }
  double l = 0;
  for (size_t t = 0; t < keys.size(); t++) {
    double w = std::exp(s[t] - m);
    l += w;
    for (uint32_t c = 0; c < d; c++) r.o[c] += w * vals[t][c];
  }
  for (uint32_t c = 0; c < d; c++) r.o[c] /= l;
  r.lse = m + std::log(l);
  return r;
}

// The S2 formula, written out again here (independent of gpu/s2_layout.c).
bool S2Formula(const kvdex_s2_params& p, uint32_t h, uint32_t i, uint32_t j) {
  if (j > i) return false;
  if (i - j < p.local_blocks) return true;
  uint32_t step = std::max(1u, p.vert_stride / p.n_heads);
  return (uint64_t(j) + uint64_t(h) * step + p.offset) % p.vert_stride == 0;
}

// Dense decode reference: for (b, query head qh) attend token t of [0, L) iff in(t).
template <class In>
void DenseDecode(const tp_decode& p, uint32_t b, uint32_t qh, double scale, In in,
                 std::vector<double>* o, double* lse) {
  const auto& c = p.cfg;
  uint32_t d = c.head_dim, h = qh / (c.n_q_heads / c.n_kv_heads);
  std::vector<std::vector<float>> ks, vs;
  std::vector<float> row(d);
  for (int64_t t = 0; t < p.seq_lens[b]; t++) {
    if (!in(t)) continue;
    tp_decode_row(&p, 0, b, h, t, row.data());
    ks.push_back(row);
    tp_decode_row(&p, 1, b, h, t, row.data());
    vs.push_back(row);
  }
  DenseOut r = DenseAttend(p.q + ((size_t)b * c.n_q_heads + qh) * d, d, scale, ks, vs);
  *o = r.o;
  *lse = r.lse;
}

void ExpectClose(const std::vector<double>& ref, const float* got, double ref_lse, float got_lse,
                 const char* what) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); i++) {
    num = std::max(num, std::fabs(ref[i] - got[i]));
    den = std::max(den, std::fabs(ref[i]));
  }
  EXPECT_LE(num, 1e-5 * std::max(den, 1e-3)) << what;
  if (std::isinf(ref_lse)) {
    EXPECT_TRUE(std::isinf(got_lse) && got_lse < 0) << what << " lse " << got_lse;
  } else {
    EXPECT_NEAR(ref_lse, got_lse, 1e-4 * std::max(1.0, std::fabs(ref_lse))) << what;
  }
}

tp_decode_cfg RandomDecodeCfg(tp_rng* r, bool s2) {
  tp_decode_cfg c{};
  c.batch = 1 + tp_below(r, 3);
  c.n_kv_heads = 1 + tp_below(r, 3);
  static const uint32_t groups[] = {1, 2, 3, 4, 8, 12};
  c.n_q_heads = c.n_kv_heads * groups[tp_below(r, 6)];
  c.head_dim = 16 * (1 + tp_below(r, 16));  // 16 .. 256
  c.block_tokens = 1 + tp_below(r, 20);
  c.max_seq = tp_below(r, 400);
  c.dtype = tp_below(r, 2) ? KVDEX_DTYPE_BF16 : KVDEX_DTYPE_F16;
  c.vllm_layout = (int)tp_below(r, 2);
  c.n_sink = tp_below(r, 6);
  c.n_recent = tp_below(r, 40);
  c.sel_cap = s2 ? 0 : tp_below(r, 200);
  c.q_mag = 0.5f + 6.0f * (tp_unif(r) + 1.0f) / 2;
  return c;
}

TEST(TwinSparseDecode, MatchesDenseForRandomShapes) {
  tp_rng r{42};
  for (int iter = 0; iter < 40; iter++) {
    tp_decode_cfg c = RandomDecodeCfg(&r, false);
    tp_decode p;
    ASSERT_EQ(0, tp_decode_make(&p, &c, 1000 + iter));
    size_t rows = (size_t)c.batch * c.n_q_heads;
    std::vector<float> o(rows * c.head_dim, 7.0f), lse(rows, 7.0f);
    float scale = iter % 3 == 0 ? 0.0f : 0.05f;
    ASSERT_EQ(0, kvdex_twin_sparse_decode(c.batch, c.n_q_heads, p.q, &p.kv, &p.ts, scale,
                                          o.data(), lse.data()))
        << kvdex_errmsg();
    double sc = scale == 0.0f ? 1.0 / std::sqrt((double)c.head_dim) : scale;
    uint32_t group = c.n_q_heads / c.n_kv_heads;
    for (uint32_t b = 0; b < c.batch; b++)
      for (uint32_t qh = 0; qh < c.n_q_heads; qh++) {
        int64_t L = p.seq_lens[b];
        uint32_t h = qh / group;
        std::set<int64_t> chosen;
        int64_t n = c.sel_cap ? std::min<int64_t>(p.n_sel[b * c.n_kv_heads + h], c.sel_cap) : 0;
        for (int64_t i = 0; i < n; i++) chosen.insert(p.sel[(b * c.n_kv_heads + h) * c.sel_cap + i]);
        auto in = [&](int64_t t) {
          return t < (int64_t)c.n_sink || t >= L - (int64_t)c.n_recent || chosen.count(t) > 0;
        };
        std::vector<double> ref;
        double ref_lse;
        DenseDecode(p, b, qh, sc, in, &ref, &ref_lse);
        size_t row = (size_t)b * c.n_q_heads + qh;
        ExpectClose(ref, &o[row * c.head_dim], ref_lse, lse[row], "sparse decode");
      }
    tp_decode_free(&p);
    if (HasFailure()) {
      ADD_FAILURE() << "iteration " << iter;
      return;
    }
  }
}

TEST(TwinSparseDecode, EmptySetsGiveZeroAndMinusInfinity) {
  tp_decode_cfg c{};
  c.batch = 2, c.n_q_heads = 4, c.n_kv_heads = 2, c.head_dim = 32, c.block_tokens = 4;
  c.max_seq = 10, c.dtype = KVDEX_DTYPE_F16, c.q_mag = 1;
  c.sel_cap = 4;
  tp_decode p;
  ASSERT_EQ(0, tp_decode_make(&p, &c, 7));
  p.seq_lens[0] = 0;           // nothing at all
  for (int i = 0; i < 4; i++) p.n_sel[i] = 0;
  p.seq_lens[1] = 10;          // only out-of-range / static ids, no static window
  p.ts.n_sink = 0, p.ts.n_recent = 0;
  for (int i = 0; i < 2 * 2 * 4; i++) p.sel[i] = 99;
  for (int i = 0; i < 4; i++) p.n_sel[i] = 4;
  std::vector<float> o(8 * 32, 5.0f), lse(8, 5.0f);
  ASSERT_EQ(0, kvdex_twin_sparse_decode(2, 4, p.q, &p.kv, &p.ts, 0, o.data(), lse.data()));
  for (float x : o) EXPECT_EQ(0.0f, x);
  for (float x : lse) EXPECT_TRUE(std::isinf(x) && x < 0);
  // A NULL lse is allowed.
  ASSERT_EQ(0, kvdex_twin_sparse_decode(2, 4, p.q, &p.kv, &p.ts, 0, o.data(), nullptr));
  tp_decode_free(&p);
}

TEST(TwinSparseDecode, RejectsBadArgumentsAndWritesNothing) {
  tp_decode_cfg c{};
  c.batch = 1, c.n_q_heads = 2, c.n_kv_heads = 1, c.head_dim = 32, c.block_tokens = 8;
  c.max_seq = 40, c.dtype = KVDEX_DTYPE_BF16, c.q_mag = 1, c.n_recent = 8;
  tp_decode p;
  ASSERT_EQ(0, tp_decode_make(&p, &c, 9));
  std::vector<float> o(2 * 32, 3.0f), lse(2, 3.0f);
  kvdex_gpu_kv_pages kv = p.kv;
  kv.head_dim = 24;
  EXPECT_EQ(KVDEX_EINVAL, kvdex_twin_sparse_decode(1, 2, p.q, &kv, &p.ts, 0, o.data(), lse.data()));
  kv = p.kv;
  kv.dtype = KVDEX_DTYPE_F32;
  EXPECT_EQ(KVDEX_EUNIMPL, kvdex_twin_sparse_decode(1, 2, p.q, &kv, &p.ts, 0, o.data(), lse.data()));
  kv = p.kv;
  kv.n_kv_heads = 2;  // 2 query heads over 2 kv heads is fine, 3 is not
  EXPECT_EQ(KVDEX_EINVAL, kvdex_twin_sparse_decode(1, 3, p.q, &kv, &p.ts, 0, o.data(), lse.data()));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_twin_sparse_decode(1, 2, p.q, &p.kv, &p.ts, NAN, o.data(), lse.data()));
  kv = p.kv;
  kv.block_stride = 12;
  EXPECT_EQ(KVDEX_EINVAL, kvdex_twin_sparse_decode(1, 2, p.q, &kv, &p.ts, 0, o.data(), lse.data()));
  // A table entry outside the pool, in a block the call reads.
  p.bt[4] = (int32_t)p.kv.n_pool_blocks;
  EXPECT_EQ(KVDEX_EINVAL, kvdex_twin_sparse_decode(1, 2, p.q, &p.kv, &p.ts, 0, o.data(), lse.data()));
  EXPECT_NE(nullptr, std::strstr(kvdex_errmsg(), "block_table"));
  // seq_len beyond the table.
  p.bt[4] = 0;
  p.seq_lens[0] = 41 + 8;
  EXPECT_EQ(KVDEX_EINVAL, kvdex_twin_sparse_decode(1, 2, p.q, &p.kv, &p.ts, 0, o.data(), lse.data()));
  for (float x : o) EXPECT_EQ(3.0f, x);
  for (float x : lse) EXPECT_EQ(3.0f, x);
  tp_decode_free(&p);
}

TEST(TwinS2Decode, MatchesDenseAndNeverReadsUnneededBlocks) {
  tp_rng r{77};
  for (int iter = 0; iter < 30; iter++) {
    tp_decode_cfg c = RandomDecodeCfg(&r, true);
    c.vllm_layout = iter % 4 == 0;
    kvdex_s2_params s2{};
    s2.n_heads = c.n_q_heads;
    s2.block = 1 + tp_below(&r, 24);
    s2.local_blocks = 1 + tp_below(&r, 4);
    s2.vert_stride = 1 + tp_below(&r, 8);
    s2.offset = tp_below(&r, 3);
    c.s2 = &s2;
    tp_decode p;
    ASSERT_EQ(0, tp_decode_make(&p, &c, 5000 + iter));
    size_t rows = (size_t)c.batch * c.n_q_heads;
    std::vector<float> o(rows * c.head_dim), lse(rows);
    // Tables name -1 for every block S2 says no head of the group needs: the twin
    // would fail with KVDEX_EINVAL if it read one.
    ASSERT_EQ(0, kvdex_twin_s2_decode(&s2, c.batch, p.q, &p.kv, p.seq_lens, c.max_seq, 0,
                                      o.data(), lse.data()))
        << kvdex_errmsg() << " iteration " << iter;
    double sc = 1.0 / std::sqrt((double)c.head_dim);
    for (uint32_t b = 0; b < c.batch; b++)
      for (uint32_t qh = 0; qh < c.n_q_heads; qh++) {
        int64_t L = p.seq_lens[b];
        uint32_t i = L > 0 ? (uint32_t)((L - 1) / s2.block) : 0;
        auto in = [&](int64_t t) { return S2Formula(s2, qh, i, (uint32_t)(t / s2.block)); };
        std::vector<double> ref;
        double ref_lse;
        DenseDecode(p, b, qh, sc, in, &ref, &ref_lse);
        size_t row = (size_t)b * c.n_q_heads + qh;
        ExpectClose(ref, &o[row * c.head_dim], ref_lse, lse[row], "s2 decode");
      }
    tp_decode_free(&p);
    if (HasFailure()) {
      ADD_FAILURE() << "iteration " << iter;
      return;
    }
  }
}

TEST(TwinLseMerge, EqualsAttentionOverTheUnion) {
  // Split one token set into parts, attend each part, merge: equals the whole.
  tp_rng r{5};
  const uint32_t d = 48, n_tok = 300, n_rows = 3;
  for (uint32_t n_parts : {1u, 2u, 5u}) {
    std::vector<float> o_parts((size_t)n_parts * n_rows * d), lse_parts((size_t)n_parts * n_rows);
    std::vector<std::vector<double>> whole(n_rows);
    std::vector<double> whole_lse(n_rows);
    for (uint32_t row = 0; row < n_rows; row++) {
      std::vector<float> q(d);
      for (auto& x : q) x = 3 * tp_unif(&r);
      std::vector<std::vector<float>> ks(n_tok, std::vector<float>(d)), vs = ks;
      for (auto& k : ks) for (auto& x : k) x = tp_unif(&r);
      for (auto& v : vs) for (auto& x : v) x = tp_unif(&r);
      DenseOut all = DenseAttend(q.data(), d, 0.2, ks, vs);
      whole[row] = all.o;
      whole_lse[row] = all.lse;
      for (uint32_t i = 0; i < n_parts; i++) {
        std::vector<std::vector<float>> pk, pv;
        for (uint32_t t = 0; t < n_tok; t++)
          // row 1: part 0 is empty (lse -inf, o NaN) and must be ignored
          if (t % n_parts == i && !(row == 1 && i == 0 && n_parts > 1)) {
            pk.push_back(ks[t]);
            pv.push_back(vs[t]);
          }
        DenseOut part = DenseAttend(q.data(), d, 0.2, pk, pv);
        for (uint32_t c = 0; c < d; c++)
          o_parts[((size_t)i * n_rows + row) * d + c] = pk.empty() ? NAN : (float)part.o[c];
        lse_parts[(size_t)i * n_rows + row] = (float)part.lse;
      }
      if (row == 1 && n_parts > 1) {  // the whole of row 1 lacks part 0's tokens
        std::vector<std::vector<float>> pk, pv;
        for (uint32_t t = 0; t < n_tok; t++)
          if (t % n_parts != 0) pk.push_back(ks[t]), pv.push_back(vs[t]);
        DenseOut rest = DenseAttend(q.data(), d, 0.2, pk, pv);
        whole[row] = rest.o;
        whole_lse[row] = rest.lse;
      }
    }
    std::vector<float> o((size_t)n_rows * d), lse(n_rows);
    ASSERT_EQ(0, kvdex_twin_lse_merge(n_parts, n_rows, d, o_parts.data(), lse_parts.data(),
                                      o.data(), lse.data()));
    for (uint32_t row = 0; row < n_rows; row++)
      ExpectClose(whole[row], &o[(size_t)row * d], whole_lse[row], lse[row], "merge");
  }
  // All parts empty, and no parts at all.
  std::vector<float> op(2 * 4, NAN), lp(2, -INFINITY), o(4, 1), lse(1, 1);
  ASSERT_EQ(0, kvdex_twin_lse_merge(2, 1, 4, op.data(), lp.data(), o.data(), lse.data()));
  for (float x : o) EXPECT_EQ(0.0f, x);
  EXPECT_TRUE(std::isinf(lse[0]) && lse[0] < 0);
  o.assign(4, 1);
  ASSERT_EQ(0, kvdex_twin_lse_merge(0, 1, 4, nullptr, nullptr, o.data(), lse.data()));
  for (float x : o) EXPECT_EQ(0.0f, x);
  // Large lse values do not overflow.
  std::vector<float> op2 = {1, 2, 3, 4}, lp2 = {1000.0f, 1000.0f}, o2(2), l2(1);
  ASSERT_EQ(0, kvdex_twin_lse_merge(2, 1, 2, op2.data(), lp2.data(), o2.data(), l2.data()));
  EXPECT_FLOAT_EQ(2.0f, o2[0]);
  EXPECT_FLOAT_EQ(3.0f, o2[1]);
  EXPECT_NEAR(1000.0 + std::log(2.0), l2[0], 1e-3);
}

TEST(TwinS2Prefill, MatchesDenseMaskedAttention) {
  tp_rng r{99};
  for (int iter = 0; iter < 16; iter++) {
    kvdex_s2_params s2{};
    uint32_t n_kv = 1 + tp_below(&r, 2);
    s2.n_heads = n_kv * (1 + tp_below(&r, 3));
    s2.block = 64 * (1 + tp_below(&r, 2));
    s2.local_blocks = 1 + tp_below(&r, 3);
    s2.vert_stride = 1 + tp_below(&r, 6);
    s2.offset = tp_below(&r, 2);
    uint32_t seq = 1 + tp_below(&r, 700), d = 32 * (1 + tp_below(&r, 4));
    int dtype = iter % 2 ? KVDEX_DTYPE_BF16 : KVDEX_DTYPE_F16;
    tp_prefill p;
    ASSERT_EQ(0, tp_prefill_make(&p, &s2, n_kv, seq, d, dtype, 4.0f, 300 + iter));
    std::vector<uint16_t> o((size_t)s2.n_heads * seq * d);
    std::vector<float> lse((size_t)s2.n_heads * seq);
    ASSERT_EQ(0, kvdex_twin_s2_prefill(&s2, n_kv, seq, d, dtype, p.q, p.k, p.v, p.row_ptr, p.col,
                                       0, o.data(), lse.data()))
        << kvdex_errmsg();
    double sc = 1.0 / std::sqrt((double)d), tol = dtype == KVDEX_DTYPE_BF16 ? 8e-3 : 1e-3;
    uint32_t group = s2.n_heads / n_kv;
    // A sample of query rows per head (all of them for short sequences).
    for (uint32_t h = 0; h < s2.n_heads; h++)
      for (uint32_t t = 0; t < seq; t += seq > 200 ? 7 : 1) {
        std::vector<float> q(d);
        for (uint32_t c = 0; c < d; c++) q[c] = tp_elem(dtype, p.q, ((size_t)h * seq + t) * d + c);
        std::vector<std::vector<float>> ks, vs;
        for (uint32_t s = 0; s <= t; s++) {
          if (!S2Formula(s2, h, t / s2.block, s / s2.block)) continue;
          std::vector<float> k(d), v(d);
          for (uint32_t c = 0; c < d; c++) {
            k[c] = tp_elem(dtype, p.k, ((size_t)(h / group) * seq + s) * d + c);
            v[c] = tp_elem(dtype, p.v, ((size_t)(h / group) * seq + s) * d + c);
          }
          ks.push_back(k);
          vs.push_back(v);
        }
        DenseOut ref = DenseAttend(q.data(), d, sc, ks, vs);
        double num = 0, den = 0;
        for (uint32_t c = 0; c < d; c++) {
          num = std::max(num, std::fabs(ref.o[c] - tp_elem(dtype, o.data(), ((size_t)h * seq + t) * d + c)));
          den = std::max(den, std::fabs(ref.o[c]));
        }
        ASSERT_LE(num, tol * std::max(den, 1e-3)) << "iter " << iter << " head " << h << " row " << t;
        ASSERT_NEAR(ref.lse, lse[(size_t)h * seq + t], 1e-4 * std::max(1.0, std::fabs(ref.lse)));
      }
    tp_prefill_free(&p);
  }
}

TEST(TwinS2Prefill, AnyLowerLayoutWorksAndBadLayoutsAreRefused) {
  // A full causal CSR (every j <= i) gives dense causal attention.
  kvdex_s2_params s2{2, 64, 1, 1, 0};  // vert_stride 1: every block is vertical = dense
  const uint32_t seq = 200, d = 64, nb = 4;
  tp_prefill p;
  ASSERT_EQ(0, tp_prefill_make(&p, &s2, 1, seq, d, KVDEX_DTYPE_F16, 2.0f, 11));
  std::vector<int32_t> row_ptr(2 * nb + 1), col;
  for (uint32_t r = 0; r < 2 * nb; r++) {
    row_ptr[r] = (int32_t)col.size();
    for (uint32_t j = 0; j <= r % nb; j++) col.push_back((int32_t)j);
  }
  row_ptr[2 * nb] = (int32_t)col.size();
  EXPECT_EQ(std::vector<int32_t>(p.col, p.col + p.nnz), col);
  std::vector<uint16_t> o((size_t)2 * seq * d);
  ASSERT_EQ(0, kvdex_twin_s2_prefill(&s2, 1, seq, d, KVDEX_DTYPE_F16, p.q, p.k, p.v, row_ptr.data(),
                                     col.data(), 0, o.data(), nullptr));
  // Refusals: a column above the diagonal, dims the kernel lacks, block not /64.
  std::vector<int32_t> bad = col;
  bad[0] = 1;
  EXPECT_EQ(KVDEX_EINVAL, kvdex_twin_s2_prefill(&s2, 1, seq, d, KVDEX_DTYPE_F16, p.q, p.k, p.v,
                                                row_ptr.data(), bad.data(), 0, o.data(), nullptr));
  EXPECT_EQ(KVDEX_EUNIMPL, kvdex_twin_s2_prefill(&s2, 1, seq, 48, KVDEX_DTYPE_F16, p.q, p.k, p.v,
                                                 row_ptr.data(), col.data(), 0, o.data(), nullptr));
  kvdex_s2_params s2b = s2;
  s2b.block = 32;
  EXPECT_EQ(KVDEX_EUNIMPL, kvdex_twin_s2_prefill(&s2b, 1, seq, d, KVDEX_DTYPE_F16, p.q, p.k, p.v,
                                                 row_ptr.data(), col.data(), 0, o.data(), nullptr));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_twin_s2_prefill(&s2, 3, seq, d, KVDEX_DTYPE_F16, p.q, p.k, p.v,
                                                row_ptr.data(), col.data(), 0, o.data(), nullptr));
  tp_prefill_free(&p);
}

TEST(TwinBlockTopk, MatchesFullSortOfDenseScores) {
  tp_rng r{3};
  for (int iter = 0; iter < 12; iter++) {
    uint32_t nkv = 1 + tp_below(&r, 3), nq = nkv * (1 + tp_below(&r, 4));
    uint32_t batch = 1 + tp_below(&r, 3), d = 8 + tp_below(&r, 60), cap = 1 + tp_below(&r, 700);
    uint32_t k = 1 + tp_below(&r, iter % 3 == 0 ? 1024 : 64);
    tp_topk p;
    ASSERT_EQ(0, tp_topk_make(&p, batch, nq, nkv, d, cap, k, 50 + iter));
    std::vector<int32_t> idx((size_t)batch * nkv * k);
    std::vector<float> score(idx.size());
    ASSERT_EQ(0, kvdex_twin_block_topk(batch, nq, nkv, d, p.q, p.reps, cap, p.n_reps, k, idx.data(),
                                       score.data()));
    uint32_t group = nq / nkv;
    for (uint32_t b = 0; b < batch; b++)
      for (uint32_t h = 0; h < nkv; h++) {
        uint32_t n = std::min<uint32_t>(p.n_reps[b], cap);
        std::vector<std::pair<double, int>> all;
        for (uint32_t rr = 0; rr < n; rr++) {
          double best = -INFINITY;
          for (uint32_t g = 0; g < group; g++) {
            double dot = 0;
            for (uint32_t c = 0; c < d; c++)
              dot += (double)p.q[((size_t)b * nq + h * group + g) * d + c] *
                     p.reps[(((size_t)b * nkv + h) * cap + rr) * d + c];
            best = std::max(best, dot);
          }
          all.push_back({best, (int)rr});
        }
        std::sort(all.begin(), all.end(), [](auto& x, auto& y) {
          return x.first > y.first || (x.first == y.first && x.second < y.second);
        });
        const int32_t* got = &idx[((size_t)b * nkv + h) * k];
        const float* gs = &score[((size_t)b * nkv + h) * k];
        for (uint32_t x = 0; x < k; x++) {
          if (x >= n) {
            EXPECT_EQ(-1, got[x]);
            EXPECT_TRUE(std::isinf(gs[x]) && gs[x] < 0);
            continue;
          }
          // Same score at every rank (indices may differ only between near-ties).
          EXPECT_NEAR(all[x].first, gs[x], 1e-4) << "rank " << x;
          if (x > 0) {
            EXPECT_TRUE(gs[x] < gs[x - 1] || (gs[x] == gs[x - 1] && got[x] > got[x - 1]));
          }
        }
      }
    tp_topk_free(&p);
    if (HasFailure()) return;
  }
  // Bad arguments.
  float q[4] = {0}, reps[4] = {0};
  int32_t n = 1, idx[2];
  EXPECT_EQ(KVDEX_EINVAL, kvdex_twin_block_topk(1, 1, 1, 4, q, reps, 1, &n, 0, idx, nullptr));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_twin_block_topk(1, 1, 1, 4, q, reps, 1, &n, 1025, idx, nullptr));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_twin_block_topk(1, 3, 2, 4, q, reps, 1, &n, 1, idx, nullptr));
}

TEST(TwinBlockTopk, NanRanksLowest) {
  float q[2] = {1, 0}, reps[3 * 2] = {NAN, 0, -5, 0, 2, 0};
  int32_t n = 3, idx[3];
  float sc[3];
  ASSERT_EQ(0, kvdex_twin_block_topk(1, 1, 1, 2, q, reps, 3, &n, 3, idx, sc));
  EXPECT_EQ(2, idx[0]);
  EXPECT_EQ(1, idx[1]);
  EXPECT_EQ(0, idx[2]);
  EXPECT_TRUE(std::isnan(sc[2]));
}

}  // namespace
