// Tests for index/attend (sparse and dense decode attention, attention mass, the LSE
// merge) and index/retain (pooled-mass token selection), each against a brute-force
// reference worked out here in double precision from the values the store holds, on
// sequences built through the real store API (f32, f16, bf16; GQA groups 1 and 4;
// odd head_dim; blocks that do not divide the length).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

extern "C" {
#include "index/attend.h"
#include "index/index.h"
#include "index/retain.h"
#include "kvstore/kvstore.h"
}

namespace {

const float kInf = std::numeric_limits<float>::infinity();
const kvdex_simd kLevels[] = {KVDEX_SIMD_SCALAR, KVDEX_SIMD_AVX2, KVDEX_SIMD_AVX512};

bool Supported(kvdex_simd level) { return (int)level <= (int)kvdex_simd_detect(); }

std::vector<float> Uniform(size_t n, float scale, std::mt19937 *rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto &x : v) x = u(*rng) * scale;
  return v;
}

// One sequence of `layers` layers filled with random K and V (uniform in
// [-kscale, kscale) and [-1, 1)), appended in uneven pieces; keeps the f32 values the
// store actually holds (after rounding to the dtype) for the references.
class Seq {
 public:
  Seq(const kvdex_shape &shape, uint64_t tokens, uint32_t seed, float kscale = 1.0f)
      : shape_(shape) {
    EXPECT_EQ(kvdex_store_create(0, &store_), 0) << kvdex_errmsg();
    EXPECT_EQ(kvdex_seq_create(store_, nullptr, "s", &shape_), 0) << kvdex_errmsg();
    EXPECT_EQ(kvdex_seq_open(store_, nullptr, "s", &seq_), 0) << kvdex_errmsg();
    shape_ = *kvdex_seq_shape(seq_);
    std::mt19937 rng(seed);
    size_t d = shape_.head_dim, nkv = shape_.n_kv_heads;
    k_.assign(shape_.n_layers, std::vector<float>(nkv * tokens * d));
    v_ = k_;
    kvdex_txn *txn = nullptr;
    EXPECT_EQ(kvdex_txn_begin(seq_, &txn), 0) << kvdex_errmsg();
    for (uint32_t layer = 0; layer < shape_.n_layers; layer++) {
      uint64_t done = 0;
      while (done < tokens) {
        uint32_t n = (uint32_t)std::min<uint64_t>(tokens - done, 97 + rng() % 400);
        size_t elems = nkv * n * d, es = kvdex_dtype_size(shape_.dtype);
        auto kf = Uniform(elems, kscale, &rng), vf = Uniform(elems, 1.0f, &rng);
        std::vector<uint8_t> kb(elems * es), vb(elems * es);
        kvdex__from_f32(shape_.dtype, kf.data(), kb.data(), elems);
        kvdex__from_f32(shape_.dtype, vf.data(), vb.data(), elems);
        kvdex__to_f32(shape_.dtype, kb.data(), kf.data(), elems);
        kvdex__to_f32(shape_.dtype, vb.data(), vf.data(), elems);
        for (size_t h = 0; h < nkv; h++)
          for (size_t t = 0; t < n; t++)
            for (size_t c = 0; c < d; c++) {
              k_[layer][(h * tokens + done + t) * d + c] = kf[(h * n + t) * d + c];
              v_[layer][(h * tokens + done + t) * d + c] = vf[(h * n + t) * d + c];
            }
        EXPECT_EQ(kvdex_txn_append(txn, layer, done, n, kb.data(), vb.data()), 0) << kvdex_errmsg();
        done += n;
      }
    }
    EXPECT_EQ(kvdex_txn_commit(txn, nullptr), 0) << kvdex_errmsg();
    tokens_ = tokens;
  }
  ~Seq() {
    kvdex_seq_release(seq_);
    kvdex_store_destroy(store_);
  }

  kvdex_seq *seq() { return seq_; }
  const kvdex_shape &shape() const { return shape_; }
  uint64_t tokens() const { return tokens_; }
  size_t group() const { return shape_.n_q_heads / shape_.n_kv_heads; }
  const float *K(uint32_t layer, size_t kv, uint64_t t) const {
    return &k_[layer][(kv * tokens_ + t) * shape_.head_dim];
  }
  const float *V(uint32_t layer, size_t kv, uint64_t t) const {
    return &v_[layer][(kv * tokens_ + t) * shape_.head_dim];
  }

 private:
  kvdex_shape shape_;
  kvdex_store *store_ = nullptr;
  kvdex_seq *seq_ = nullptr;
  uint64_t tokens_ = 0;
  std::vector<std::vector<float>> k_, v_;
};

double Scale(const kvdex_shape &sh, float scale) {
  return scale == 0.0f ? 1.0 / std::sqrt((double)sh.head_dim) : (double)scale;
}

// Brute-force attention of one query head over a set of distinct tokens, in double.
struct RefOut {
  std::vector<double> o;
  double lse;
};

RefOut RefAttend(const Seq &s, uint32_t layer, const float *q, size_t qh,
                 const std::vector<uint64_t> &tokens, double scale) {
  size_t d = s.shape().head_dim, kv = qh / s.group();
  RefOut r{std::vector<double>(d, 0.0), -std::numeric_limits<double>::infinity()};
  if (tokens.empty()) return r;
  std::vector<double> logit(tokens.size());
  double m = -std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < tokens.size(); i++) {
    const float *k = s.K(layer, kv, tokens[i]);
    double acc = 0;
    for (size_t c = 0; c < d; c++) acc += (double)q[qh * d + c] * k[c];
    logit[i] = acc * scale;
    m = std::max(m, logit[i]);
  }
  double sum = 0;
  for (size_t i = 0; i < tokens.size(); i++) {
    double w = std::exp(logit[i] - m);
    sum += w;
    const float *v = s.V(layer, kv, tokens[i]);
    for (size_t c = 0; c < d; c++) r.o[c] += w * v[c];
  }
  for (auto &x : r.o) x /= sum;
  r.lse = m + std::log(sum);
  return r;
}

// o within tol of the reference relative to the reference's largest element, lse
// within tol relative to max(1, |lse|).
void ExpectNear(const float *o, float lse, const RefOut &ref, double tol, const std::string &what) {
  size_t d = ref.o.size();
  double norm = 0;
  for (double x : ref.o) norm = std::max(norm, std::fabs(x));
  for (size_t c = 0; c < d; c++) {
    ASSERT_TRUE(std::isfinite(o[c])) << what << " dim " << c;
    ASSERT_NEAR(o[c], ref.o[c], tol * std::max(norm, 1e-3)) << what << " dim " << c;
  }
  ASSERT_TRUE(std::isfinite(lse)) << what;
  ASSERT_NEAR(lse, ref.lse, tol * std::max(1.0, std::fabs(ref.lse))) << what;
}

bool SameBits(const std::vector<float> &a, const std::vector<float> &b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

std::vector<uint64_t> Range(uint64_t lo, uint64_t hi) {
  std::vector<uint64_t> v(hi > lo ? hi - lo : 0);
  std::iota(v.begin(), v.end(), lo);
  return v;
}

// k distinct random tokens of [0, n), ascending.
std::vector<uint64_t> Sample(uint64_t n, size_t k, std::mt19937 *rng) {
  std::vector<uint64_t> all = Range(0, n);
  std::shuffle(all.begin(), all.end(), *rng);
  all.resize(k);
  std::sort(all.begin(), all.end());
  return all;
}

// Owns a scratch and a pool for a test.
struct Env {
  kvdex_attend_scratch *scratch = nullptr;
  kvdex_pool *pool = nullptr;
  explicit Env(unsigned threads = 3) {
    EXPECT_EQ(kvdex_attend_scratch_create(&scratch), 0) << kvdex_errmsg();
    if (threads) {
      EXPECT_EQ(kvdex_pool_create(threads, &pool), 0) << kvdex_errmsg();
    }
  }
  ~Env() {
    kvdex_attend_scratch_destroy(scratch);
    kvdex_pool_destroy(pool);
  }
};

// Runs kvdex_attend_ids with per-head lists.
int AttendIds(Seq &s, uint32_t layer, const std::vector<float> &q,
              const std::vector<std::vector<uint64_t>> &lists, const kvdex_attend_opts *opts,
              kvdex_pool *pool, kvdex_attend_scratch *scratch, std::vector<float> *o,
              std::vector<float> *lse) {
  size_t nq = s.shape().n_q_heads;
  std::vector<const uint64_t *> ptr(nq);
  std::vector<uint32_t> n(nq);
  for (size_t h = 0; h < nq; h++) {
    ptr[h] = lists[h].empty() ? nullptr : lists[h].data();
    n[h] = (uint32_t)lists[h].size();
  }
  o->resize(nq * s.shape().head_dim);
  lse->resize(nq);
  return kvdex_attend_ids(s.seq(), layer, q.data(), ptr.data(), n.data(), opts, pool, scratch,
                          o->data(), lse->data());
}

int AttendDense(Seq &s, uint32_t layer, const std::vector<float> &q, uint64_t sinks,
                uint64_t window, const kvdex_attend_opts *opts, kvdex_pool *pool,
                kvdex_attend_scratch *scratch, std::vector<float> *o, std::vector<float> *lse) {
  o->resize((size_t)s.shape().n_q_heads * s.shape().head_dim);
  lse->resize(s.shape().n_q_heads);
  return kvdex_attend_dense(s.seq(), layer, q.data(), sinks, window, opts, pool, scratch,
                            o->data(), lse->data());
}

// ---------------------------------------------------------------------------------
// Attention against the reference, over shapes and dtypes

struct Shape {
  int dtype;
  uint32_t n_q, n_kv, d, bt;
  uint64_t n;
};

void PrintTo(const Shape &p, std::ostream *os) {
  *os << kvdex_dtype_name(p.dtype) << " q" << p.n_q << " kv" << p.n_kv << " d" << p.d << " bt"
      << p.bt << " n" << p.n;
}

std::string ShapeName(const ::testing::TestParamInfo<Shape> &info) {
  const Shape &p = info.param;
  return std::string(kvdex_dtype_name(p.dtype)) + "_q" + std::to_string(p.n_q) + "_kv" +
         std::to_string(p.n_kv) + "_d" + std::to_string(p.d) + "_bt" + std::to_string(p.bt) +
         "_n" + std::to_string(p.n);
}

kvdex_shape MakeShape(const Shape &p, uint32_t layers = 2) {
  kvdex_shape sh{};
  sh.n_layers = layers;
  sh.n_kv_heads = p.n_kv;
  sh.n_q_heads = p.n_q;
  sh.head_dim = p.d;
  sh.block_tokens = p.bt;
  sh.dtype = p.dtype;
  return sh;
}

// k = every eligible token of [sinks, n - window) through the id path equals dense
// attention bit for bit (in order, shuffled, with duplicates; with and without a
// pool), and both equal the f64 reference.
void ExpectAllTokensEqualsDense(Seq &s, Env &env, uint32_t layer, uint64_t sinks,
                                uint64_t window, const std::vector<float> &q, kvdex_simd level,
                                std::mt19937 *rng) {
  const size_t nq = s.shape().n_q_heads, d = s.shape().head_dim;
  kvdex_attend_opts opts{0.0f, level};

  std::vector<float> od, ld;
  ASSERT_EQ(AttendDense(s, layer, q, sinks, window, &opts, env.pool, env.scratch, &od, &ld), 0)
      << kvdex_errmsg();
  std::vector<uint64_t> all = Range(sinks, s.tokens() - window);
  for (size_t h = 0; h < nq; h++) {
    RefOut ref = RefAttend(s, layer, q.data(), h, all, Scale(s.shape(), 0));
    ExpectNear(&od[h * d], ld[h], ref, 1e-4, "dense head " + std::to_string(h));
  }

  std::vector<std::vector<uint64_t>> lists(nq, all);
  std::vector<float> oi, li;
  ASSERT_EQ(AttendIds(s, layer, q, lists, &opts, env.pool, env.scratch, &oi, &li), 0)
      << kvdex_errmsg();
  EXPECT_TRUE(SameBits(oi, od));
  EXPECT_TRUE(SameBits(li, ld));

  // Any order, duplicates, no pool: still the same bits.
  for (size_t h = 0; h < nq; h++) {
    std::shuffle(lists[h].begin(), lists[h].end(), *rng);
    for (int r = 0; r < 50; r++) lists[h].push_back(all[(*rng)() % all.size()]);
  }
  ASSERT_EQ(AttendIds(s, layer, q, lists, &opts, nullptr, env.scratch, &oi, &li), 0)
      << kvdex_errmsg();
  EXPECT_TRUE(SameBits(oi, od));
  EXPECT_TRUE(SameBits(li, ld));
  std::vector<float> od2, ld2;
  ASSERT_EQ(AttendDense(s, layer, q, sinks, window, &opts, nullptr, env.scratch, &od2, &ld2), 0);
  EXPECT_TRUE(SameBits(od2, od));
  EXPECT_TRUE(SameBits(ld2, ld));
}

class AttendTest : public ::testing::TestWithParam<Shape> {};

TEST_P(AttendTest, AllTokensEqualsDenseEqualsReference) {
  const Shape &p = GetParam();
  Seq s(MakeShape(p), p.n, 11 + p.d);
  Env env;
  std::mt19937 rng(5);
  const uint32_t layer = 1;
  const uint64_t sinks = 3, window = 5;
  auto q = Uniform((size_t)p.n_q * p.d, 1.0f, &rng);
  for (kvdex_simd level : kLevels) {
    if (!Supported(level)) continue;
    SCOPED_TRACE(kvdex_simd_name(level));
    ExpectAllTokensEqualsDense(s, env, layer, sinks, window, q, level, &rng);
  }
}

// Sparse attention over a different random ~2% subset per head (plus sinks and a
// window), and an explicit scale.
TEST_P(AttendTest, SparseSubsetsEqualReference) {
  const Shape &p = GetParam();
  Seq s(MakeShape(p), p.n, 21 + p.d);
  Env env;
  std::mt19937 rng(6);
  const uint32_t layer = 0;
  auto q = Uniform((size_t)p.n_q * p.d, 2.0f, &rng);
  std::vector<std::vector<uint64_t>> lists(p.n_q);
  for (size_t h = 0; h < p.n_q; h++) {
    lists[h] = Sample(p.n, 1 + (size_t)(p.n / 50) + h, &rng);
    for (uint64_t t : {0ull, 1ull, (unsigned long long)p.n - 1}) lists[h].push_back(t);
    std::sort(lists[h].begin(), lists[h].end());
    lists[h].erase(std::unique(lists[h].begin(), lists[h].end()), lists[h].end());
  }
  for (float scale : {0.0f, 0.3f}) {
    kvdex_attend_opts opts{scale, KVDEX_SIMD_AUTO};
    std::vector<float> o, l;
    ASSERT_EQ(AttendIds(s, layer, q, lists, &opts, env.pool, env.scratch, &o, &l), 0)
        << kvdex_errmsg();
    for (size_t h = 0; h < p.n_q; h++) {
      RefOut ref = RefAttend(s, layer, q.data(), h, lists[h], Scale(s.shape(), scale));
      ExpectNear(&o[h * p.d], l[h], ref, 1e-4, "head " + std::to_string(h));
    }
  }
}

// Partials over a split of the tokens merge to attention over the union: two ways
// (also in place) and n ways.
TEST_P(AttendTest, MergedPartialsEqualUnion) {
  const Shape &p = GetParam();
  Seq s(MakeShape(p), p.n, 31 + p.d);
  Env env;
  std::mt19937 rng(7);
  auto q = Uniform((size_t)p.n_q * p.d, 1.0f, &rng);
  const size_t nq = p.n_q, d = p.d, parts = 4;
  std::vector<uint64_t> all = Range(0, p.n);
  std::vector<float> ou, lu;
  ASSERT_EQ(AttendIds(s, 0, q, std::vector<std::vector<uint64_t>>(nq, all), nullptr, env.pool,
                      env.scratch, &ou, &lu), 0);

  // Random assignment of every token to one of `parts` parts (per head).
  std::vector<std::vector<std::vector<uint64_t>>> split(parts, std::vector<std::vector<uint64_t>>(nq));
  for (size_t h = 0; h < nq; h++)
    for (uint64_t t : all) split[rng() % parts][h].push_back(t);
  std::vector<std::vector<float>> po(parts), pl(parts);
  for (size_t i = 0; i < parts; i++)
    ASSERT_EQ(AttendIds(s, 0, q, split[i], nullptr, env.pool, env.scratch, &po[i], &pl[i]), 0);

  for (size_t h = 0; h < nq; h++) {
    RefOut ref = RefAttend(s, 0, q.data(), h, all, Scale(s.shape(), 0));
    // Pairwise, in place into part 0.
    std::vector<float> acc(po[0].begin() + h * d, po[0].begin() + (h + 1) * d);
    float lacc = pl[0][h];
    for (size_t i = 1; i < parts; i++)
      kvdex_merge_partials(acc.data(), lacc, &po[i][h * d], pl[i][h], (uint32_t)d, acc.data(), &lacc);
    ExpectNear(acc.data(), lacc, ref, 1e-4, "pairwise head " + std::to_string(h));
    ExpectNear(acc.data(), lacc,
               RefOut{std::vector<double>(ou.begin() + h * d, ou.begin() + (h + 1) * d), lu[h]},
               1e-5, "pairwise vs union head " + std::to_string(h));
    // In place into the second operand.
    std::vector<float> b(po[1].begin() + h * d, po[1].begin() + (h + 1) * d);
    float lb;
    std::vector<float> a01(d);
    float l01;
    kvdex_merge_partials(&po[0][h * d], pl[0][h], &po[1][h * d], pl[1][h], (uint32_t)d, a01.data(), &l01);
    kvdex_merge_partials(&po[0][h * d], pl[0][h], b.data(), pl[1][h], (uint32_t)d, b.data(), &lb);
    EXPECT_TRUE(SameBits(b, a01));
    EXPECT_EQ(lb, l01);
    // n ways, in place over row 0.
    std::vector<float> rows(parts * d), lses(parts);
    for (size_t i = 0; i < parts; i++) {
      std::copy(po[i].begin() + h * d, po[i].begin() + (h + 1) * d, rows.begin() + i * d);
      lses[i] = pl[i][h];
    }
    float ln;
    kvdex_attend_merge_n(rows.data(), lses.data(), (uint32_t)parts, (uint32_t)d, rows.data(), &ln);
    ExpectNear(rows.data(), ln, ref, 1e-4, "n-way head " + std::to_string(h));
  }
}

// Every SIMD level this CPU has gives what the scalar level gives, within f32
// rounding, for sparse, dense and mass.
TEST_P(AttendTest, SimdLevelsEqualScalar) {
  const Shape &p = GetParam();
  Seq s(MakeShape(p), p.n, 41 + p.d);
  Env env;
  std::mt19937 rng(8);
  auto q = Uniform((size_t)p.n_q * p.d, 1.5f, &rng);
  std::vector<std::vector<uint64_t>> lists(p.n_q);
  for (auto &l : lists) l = Sample(p.n, 200, &rng);
  const uint32_t n_obs = 3;
  auto qo = Uniform((size_t)n_obs * p.n_q * p.d, 1.5f, &rng);
  std::vector<float> o0, l0, d0, dl0, m0((size_t)p.n_kv * (p.n - 10));
  for (kvdex_simd level : kLevels) {
    kvdex_attend_opts opts{0.0f, level};
    std::vector<float> o, l, od, ld, m(m0.size());
    if (!Supported(level)) {
      EXPECT_EQ(AttendIds(s, 0, q, lists, &opts, env.pool, env.scratch, &o, &l), KVDEX_EUNIMPL);
      continue;
    }
    ASSERT_EQ(AttendIds(s, 0, q, lists, &opts, env.pool, env.scratch, &o, &l), 0) << kvdex_errmsg();
    ASSERT_EQ(AttendDense(s, 0, q, 4, 6, &opts, env.pool, env.scratch, &od, &ld), 0);
    ASSERT_EQ(kvdex_attend_mass(s.seq(), 0, qo.data(), n_obs, 4, p.n - 10, &opts, env.pool,
                                env.scratch, m.data()), 0) << kvdex_errmsg();
    if (level == KVDEX_SIMD_SCALAR) {
      o0 = o, l0 = l, d0 = od, dl0 = ld, m0 = m;
      continue;
    }
    for (size_t i = 0; i < o.size(); i++) {
      ASSERT_NEAR(o[i], o0[i], 1e-5) << kvdex_simd_name(level) << " i=" << i;
      ASSERT_NEAR(od[i], d0[i], 1e-5) << kvdex_simd_name(level) << " i=" << i;
    }
    for (size_t h = 0; h < p.n_q; h++) {
      ASSERT_NEAR(l[h], l0[h], 1e-5 * std::max(1.0f, std::fabs(l0[h])));
      ASSERT_NEAR(ld[h], dl0[h], 1e-5 * std::max(1.0f, std::fabs(dl0[h])));
    }
    for (size_t i = 0; i < m.size(); i++)
      ASSERT_NEAR(m[i], m0[i], 1e-5 * m0[i] + 1e-12) << kvdex_simd_name(level) << " i=" << i;
  }
}

// The attention mass against the f64 reference.
TEST_P(AttendTest, MassEqualsReference) {
  const Shape &p = GetParam();
  Seq s(MakeShape(p), p.n, 51 + p.d);
  Env env;
  std::mt19937 rng(9);
  const uint32_t n_obs = 4;
  const uint64_t first = 7, count = p.n - 20;
  auto q = Uniform((size_t)n_obs * p.n_q * p.d, 2.0f, &rng);
  std::vector<float> m((size_t)p.n_kv * count);
  ASSERT_EQ(kvdex_attend_mass(s.seq(), 1, q.data(), n_obs, first, count, nullptr, env.pool,
                              env.scratch, m.data()), 0) << kvdex_errmsg();
  double scale = Scale(s.shape(), 0);
  size_t g = s.group(), d = p.d;
  for (size_t kv = 0; kv < p.n_kv; kv++) {
    std::vector<double> ref(count, 0.0), logit(count);
    for (size_t ob = 0; ob < n_obs; ob++)
      for (size_t j = 0; j < g; j++) {
        const float *qh = &q[(ob * p.n_q + kv * g + j) * d];
        double mx = -1e300, sum = 0;
        for (uint64_t t = 0; t < count; t++) {
          const float *k = s.K(1, kv, first + t);
          double acc = 0;
          for (size_t c = 0; c < d; c++) acc += (double)qh[c] * k[c];
          logit[t] = acc * scale;
          mx = std::max(mx, logit[t]);
        }
        for (uint64_t t = 0; t < count; t++) sum += std::exp(logit[t] - mx);
        for (uint64_t t = 0; t < count; t++) ref[t] += std::exp(logit[t] - mx) / sum;
      }
    double total = 0;
    for (uint64_t t = 0; t < count; t++) {
      ASSERT_NEAR(m[kv * count + t], ref[t], 1e-4 * ref[t] + 1e-12) << "kv " << kv << " t " << t;
      total += m[kv * count + t];
    }
    EXPECT_NEAR(total, (double)n_obs * g, 1e-3 * n_obs * g);
  }
}

const Shape kShapes[] = {
    {KVDEX_DTYPE_F32, 8, 8, 64, 64, 3001},   // GQA group 1, several parts per head
    {KVDEX_DTYPE_F16, 8, 2, 128, 48, 2500},  // group 4, blocks not dividing n
    {KVDEX_DTYPE_BF16, 4, 1, 65, 100, 1777}, // odd head_dim, group 4
    {KVDEX_DTYPE_F16, 4, 4, 65, 64, 1500},
    {KVDEX_DTYPE_BF16, 8, 2, 128, 64, 4500},
    {KVDEX_DTYPE_F32, 8, 2, 128, 30, 2100},
};
INSTANTIATE_TEST_SUITE_P(Shapes, AttendTest, ::testing::ValuesIn(kShapes), ShapeName);

// ---------------------------------------------------------------------------------
// Numerics and edge cases

kvdex_shape SmallShape(int dtype) {
  return MakeShape(Shape{dtype, 4, 2, 64, 32, 0});
}

// Logits far beyond exp's range (keys x1e3) and far below any difference (queries
// x1e-6): finite results that match the reference.
TEST(AttendNumerics, LseStableForHugeAndTinyScores) {
  for (int dtype : {KVDEX_DTYPE_F32, KVDEX_DTYPE_F16, KVDEX_DTYPE_BF16}) {
    SCOPED_TRACE(kvdex_dtype_name(dtype));
    Seq big(SmallShape(dtype), 3000, 61, 1e3f);
    Seq small(SmallShape(dtype), 3000, 62);
    Env env;
    std::mt19937 rng(10);
    auto q = Uniform(4 * 64, 1.0f, &rng);
    std::vector<float> qt(q);
    for (auto &x : qt) x *= 1e-6f;
    for (kvdex_simd level : kLevels) {
      if (!Supported(level)) continue;
      SCOPED_TRACE(kvdex_simd_name(level));
      kvdex_attend_opts opts{0.0f, level};
      std::vector<float> o, l;
      ASSERT_EQ(AttendDense(big, 0, q, 0, 0, &opts, env.pool, env.scratch, &o, &l), 0);
      std::vector<uint64_t> all = Range(0, 3000);
      for (size_t h = 0; h < 4; h++) {
        RefOut ref = RefAttend(big, 0, q.data(), h, all, Scale(big.shape(), 0));
        ASSERT_GT(ref.lse, 100.0);  // e^lse overflows f32: the max must be taken out
        ExpectNear(&o[h * 64], l[h], ref, 1e-3, "huge head " + std::to_string(h));
      }
      ASSERT_EQ(AttendDense(small, 0, qt, 0, 0, &opts, env.pool, env.scratch, &o, &l), 0);
      for (size_t h = 0; h < 4; h++) {
        RefOut ref = RefAttend(small, 0, qt.data(), h, all, Scale(small.shape(), 0));
        ExpectNear(&o[h * 64], l[h], ref, 1e-4, "tiny head " + std::to_string(h));
        EXPECT_NEAR(l[h], std::log(3000.0), 1e-4);
      }
    }
  }
}

TEST(AttendNumerics, MergeOfHugeLsesIsStable) {
  const float a[2] = {1.0f, 2.0f}, b[2] = {3.0f, -4.0f};
  float o[2], l;
  kvdex_merge_partials(a, 1e30f, b, 1e30f, 2, o, &l);
  EXPECT_FLOAT_EQ(o[0], 2.0f);
  EXPECT_FLOAT_EQ(o[1], -1.0f);
  EXPECT_FLOAT_EQ(l, 1e30f);
  kvdex_merge_partials(a, -1e30f, b, -1e30f + 1e24f, 2, o, &l);
  EXPECT_FLOAT_EQ(o[0], 3.0f);
  EXPECT_FLOAT_EQ(l, -1e30f + 1e24f);
  kvdex_merge_partials(a, 0.0f, b, std::log(3.0f), 2, o, &l);
  EXPECT_NEAR(o[0], 0.25f * 1 + 0.75f * 3, 1e-6);
  EXPECT_NEAR(l, std::log(4.0f), 1e-6);
}

TEST(AttendEdge, EmptyListGivesZeroAndMinusInfAndMergesAsIdentity) {
  Seq s(SmallShape(KVDEX_DTYPE_F16), 500, 63);
  Env env;
  std::mt19937 rng(11);
  auto q = Uniform(4 * 64, 1.0f, &rng);
  std::vector<std::vector<uint64_t>> lists(4);
  lists[1] = Sample(500, 40, &rng);
  std::vector<float> o(4 * 64, 7.0f), l(4, 7.0f);
  ASSERT_EQ(AttendIds(s, 0, q, lists, nullptr, env.pool, env.scratch, &o, &l), 0);
  for (size_t h : {0, 2, 3}) {
    EXPECT_EQ(l[h], -kInf);
    for (size_t c = 0; c < 64; c++) EXPECT_EQ(o[h * 64 + c], 0.0f);
  }
  // Merging with the empty result leaves the other side's bits; two empties stay empty.
  float out[64], lo;
  kvdex_merge_partials(&o[64], l[1], &o[0], l[0], 64, out, &lo);
  EXPECT_EQ(std::memcmp(out, &o[64], sizeof out), 0);
  EXPECT_EQ(lo, l[1]);
  kvdex_merge_partials(&o[0], l[0], &o[64], l[1], 64, out, &lo);
  EXPECT_EQ(std::memcmp(out, &o[64], sizeof out), 0);
  EXPECT_EQ(lo, l[1]);
  kvdex_merge_partials(&o[0], l[0], &o[128], l[2], 64, out, &lo);
  EXPECT_EQ(lo, -kInf);
  for (float x : out) EXPECT_EQ(x, 0.0f);
  // n-way: empties anywhere are ignored; n = 0 is empty.
  std::vector<float> rows(3 * 64), lses = {l[0], l[1], l[2]};
  std::copy(o.begin(), o.begin() + 3 * 64, rows.begin());
  kvdex_attend_merge_n(rows.data(), lses.data(), 3, 64, out, &lo);
  EXPECT_EQ(std::memcmp(out, &o[64], sizeof out), 0);
  EXPECT_EQ(lo, l[1]);
  kvdex_attend_merge_n(nullptr, nullptr, 0, 64, out, &lo);
  EXPECT_EQ(lo, -kInf);
  for (float x : out) EXPECT_EQ(x, 0.0f);
  // Dense over an empty range (window covers everything) is empty too.
  std::vector<float> od, ld;
  ASSERT_EQ(AttendDense(s, 0, q, 10, 495, nullptr, env.pool, env.scratch, &od, &ld), 0);
  for (float x : ld) EXPECT_EQ(x, -kInf);
  for (float x : od) EXPECT_EQ(x, 0.0f);
}

TEST(AttendEdge, DuplicatesCountOnce) {
  Seq s(SmallShape(KVDEX_DTYPE_BF16), 800, 64);
  Env env;
  std::mt19937 rng(12);
  auto q = Uniform(4 * 64, 1.0f, &rng);
  std::vector<std::vector<uint64_t>> lists(4), dup(4);
  for (size_t h = 0; h < 4; h++) {
    lists[h] = Sample(800, 60, &rng);
    dup[h] = lists[h];
    for (int i = 0; i < 100; i++) dup[h].push_back(lists[h][rng() % lists[h].size()]);
    if (h % 2) std::sort(dup[h].begin(), dup[h].end());  // sorted, with repeats
    else std::shuffle(dup[h].begin(), dup[h].end(), rng);
  }
  std::vector<float> o, l, od, ld;
  ASSERT_EQ(AttendIds(s, 0, q, lists, nullptr, env.pool, env.scratch, &o, &l), 0);
  ASSERT_EQ(AttendIds(s, 0, q, dup, nullptr, env.pool, env.scratch, &od, &ld), 0);
  EXPECT_TRUE(SameBits(o, od));
  EXPECT_TRUE(SameBits(l, ld));
  for (size_t h = 0; h < 4; h++)
    ExpectNear(&od[h * 64], ld[h], RefAttend(s, 0, q.data(), h, lists[h], Scale(s.shape(), 0)),
               1e-4, "head " + std::to_string(h));
}

TEST(AttendEdge, BadArgumentsAreRefusedAndWriteNothing) {
  Seq s(SmallShape(KVDEX_DTYPE_F32), 300, 65);
  Env env;
  std::mt19937 rng(13);
  auto q = Uniform(4 * 64, 1.0f, &rng);
  std::vector<std::vector<uint64_t>> lists(4, Range(0, 300));
  const float kSentinel = 12345.0f;
  std::vector<float> o(4 * 64, kSentinel), l(4, kSentinel);
  auto untouched = [&] {
    for (float x : o) ASSERT_EQ(x, kSentinel);
    for (float x : l) ASSERT_EQ(x, kSentinel);
  };
  auto ids = [&](const std::vector<std::vector<uint64_t>> &ls, const std::vector<float> &qq,
                 const kvdex_attend_opts *opts, uint32_t layer = 0) {
    std::vector<const uint64_t *> ptr;
    std::vector<uint32_t> n;
    for (auto &x : ls) {
      ptr.push_back(x.data());
      n.push_back((uint32_t)x.size());
    }
    return kvdex_attend_ids(s.seq(), layer, qq.data(), ptr.data(), n.data(), opts, env.pool,
                            env.scratch, o.data(), l.data());
  };
  // An id at or past the committed length, in any head, sorted or not.
  auto bad = lists;
  bad[2].back() = 300;
  EXPECT_EQ(ids(bad, q, nullptr), KVDEX_EINVAL);
  EXPECT_NE(std::string(kvdex_errmsg()).find("300"), std::string::npos) << kvdex_errmsg();
  untouched();
  bad = lists;
  std::reverse(bad[3].begin(), bad[3].end());
  bad[3][10] = 1ull << 40;
  EXPECT_EQ(ids(bad, q, nullptr), KVDEX_EINVAL);
  untouched();
  // Non-finite queries.
  for (float x : {std::nanf(""), kInf, -kInf}) {
    auto qb = q;
    qb[3 * 64 + 5] = x;
    EXPECT_EQ(ids(lists, qb, nullptr), KVDEX_EINVAL);
    untouched();
    EXPECT_EQ(kvdex_attend_dense(s.seq(), 0, qb.data(), 0, 0, nullptr, env.pool, env.scratch,
                                 o.data(), l.data()), KVDEX_EINVAL);
    untouched();
  }
  // Bad layer, scale, simd level; NULL arguments; a count with no list.
  EXPECT_EQ(ids(lists, q, nullptr, 2), KVDEX_EINVAL);
  for (float sc : {-1.0f, std::nanf(""), kInf}) {
    kvdex_attend_opts opts{sc, KVDEX_SIMD_AUTO};
    EXPECT_EQ(ids(lists, q, &opts), KVDEX_EINVAL);
  }
  kvdex_attend_opts bad_simd{0.0f, (kvdex_simd)9};
  EXPECT_EQ(ids(lists, q, &bad_simd), KVDEX_EINVAL);
  untouched();
  std::vector<const uint64_t *> ptr(4, nullptr);
  std::vector<uint32_t> n(4, 0);
  n[1] = 3;
  EXPECT_EQ(kvdex_attend_ids(s.seq(), 0, q.data(), ptr.data(), n.data(), nullptr, env.pool,
                             env.scratch, o.data(), l.data()), KVDEX_EINVAL);
  EXPECT_EQ(kvdex_attend_ids(s.seq(), 0, q.data(), ptr.data(), n.data(), nullptr, env.pool,
                             nullptr, o.data(), l.data()), KVDEX_EINVAL);
  EXPECT_EQ(kvdex_attend_dense(nullptr, 0, q.data(), 0, 0, nullptr, env.pool, env.scratch,
                               o.data(), l.data()), KVDEX_EINVAL);
  EXPECT_EQ(kvdex_attend_dense(s.seq(), 5, q.data(), 0, 0, nullptr, env.pool, env.scratch,
                               o.data(), l.data()), KVDEX_EINVAL);
  untouched();
  // Mass: a range past the end, no observations.
  std::vector<float> m(2 * 300, kSentinel);
  EXPECT_EQ(kvdex_attend_mass(s.seq(), 0, q.data(), 1, 1, 300, nullptr, env.pool, env.scratch,
                              m.data()), KVDEX_EINVAL);
  EXPECT_EQ(kvdex_attend_mass(s.seq(), 0, q.data(), 0, 0, 300, nullptr, env.pool, env.scratch,
                              m.data()), KVDEX_EINVAL);
  for (float x : m) ASSERT_EQ(x, kSentinel);
  kvdex_attend_scratch_destroy(nullptr);
  EXPECT_EQ(kvdex_attend_scratch_bytes(nullptr), 0u);
  EXPECT_EQ(kvdex_attend_scratch_create(nullptr), KVDEX_EINVAL);
}

// Once warm, calls of the same shape reuse the scratch; results do not depend on it.
TEST(AttendEdge, ScratchIsReused) {
  Seq s(SmallShape(KVDEX_DTYPE_F16), 5000, 66);
  Env env;
  std::mt19937 rng(14);
  auto q = Uniform(4 * 64, 1.0f, &rng);
  std::vector<std::vector<uint64_t>> lists(4);
  for (auto &l : lists) {
    l = Sample(5000, 100, &rng);
    std::shuffle(l.begin(), l.end(), rng);  // goes through deduplication
  }
  std::vector<float> o, l, o2, l2;
  ASSERT_EQ(AttendIds(s, 0, q, lists, nullptr, env.pool, env.scratch, &o, &l), 0);
  ASSERT_EQ(AttendDense(s, 0, q, 0, 0, nullptr, env.pool, env.scratch, &o2, &l2), 0);
  size_t bytes = kvdex_attend_scratch_bytes(env.scratch);
  EXPECT_GT(bytes, 0u);
  for (int rep = 0; rep < 3; rep++) {
    std::vector<float> o3, l3;
    ASSERT_EQ(AttendIds(s, 0, q, lists, nullptr, env.pool, env.scratch, &o3, &l3), 0);
    EXPECT_TRUE(SameBits(o3, o));
    ASSERT_EQ(AttendDense(s, 0, q, 0, 0, nullptr, env.pool, env.scratch, &o3, &l3), 0);
    EXPECT_TRUE(SameBits(o3, o2));
  }
  EXPECT_EQ(kvdex_attend_scratch_bytes(env.scratch), bytes);
}

// Past MAX_PARTS * MIN_SPAN positions the parts widen; ids and dense still agree.
TEST(AttendEdge, LongRangeWiderParts) {
  Seq s(MakeShape(Shape{KVDEX_DTYPE_F16, 4, 1, 32, 64, 70001}, 1), 70001, 67);
  Env env;
  std::mt19937 rng(17);
  auto q = Uniform(4 * 32, 1.0f, &rng);
  ExpectAllTokensEqualsDense(s, env, 0, 1, 2, q, KVDEX_SIMD_AUTO, &rng);
}

// Concurrent callers share the pool and the sequence, each with its own scratch.
TEST(AttendEdge, ConcurrentCallersAgree) {
  Seq s(SmallShape(KVDEX_DTYPE_F16), 6000, 68);
  Env env;
  std::mt19937 rng(18);
  auto q = Uniform(4 * 64, 1.0f, &rng);
  std::vector<std::vector<uint64_t>> lists(4);
  for (auto &l : lists) l = Sample(6000, 300, &rng);
  std::vector<float> o0, l0, d0, dl0;
  ASSERT_EQ(AttendIds(s, 0, q, lists, nullptr, nullptr, env.scratch, &o0, &l0), 0);
  ASSERT_EQ(AttendDense(s, 0, q, 0, 0, nullptr, nullptr, env.scratch, &d0, &dl0), 0);
  std::vector<int> bad(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; t++)
    threads.emplace_back([&, t] {
      kvdex_attend_scratch *sc = nullptr;
      if (kvdex_attend_scratch_create(&sc)) {
        bad[t]++;
        return;
      }
      for (int rep = 0; rep < 4; rep++) {
        std::vector<float> o, l;
        if (AttendIds(s, 0, q, lists, nullptr, env.pool, sc, &o, &l) || !SameBits(o, o0)) bad[t]++;
        if (AttendDense(s, 0, q, 0, 0, nullptr, env.pool, sc, &o, &l) || !SameBits(o, d0)) bad[t]++;
      }
      kvdex_attend_scratch_destroy(sc);
    });
  for (auto &th : threads) th.join();
  for (int b : bad) EXPECT_EQ(b, 0);
}

// ---------------------------------------------------------------------------------
// Retain

struct RetainRef {
  std::vector<std::vector<uint64_t>> ids;       // per kv head, ascending
  std::vector<std::vector<double>> pooled;      // per kv head, per eligible position
  std::vector<std::vector<double>> ranked;      // per kv head, pooled scores, descending
};

RetainRef RefRetain(const Seq &s, uint32_t layer, const std::vector<float> &q, uint32_t n_obs,
                    const kvdex_retain_opts &opts) {
  const kvdex_shape &sh = s.shape();
  size_t g = s.group(), d = sh.head_dim;
  uint64_t n = s.tokens(), hi = n > opts.window ? n - opts.window : 0;
  uint64_t lo = std::min<uint64_t>(opts.sinks, hi), e = hi - lo;
  double scale = Scale(sh, opts.scale);
  RetainRef r;
  for (size_t kv = 0; kv < sh.n_kv_heads; kv++) {
    std::vector<double> mass(e, 0.0), logit(e);
    for (size_t ob = 0; ob < n_obs; ob++)
      for (size_t j = 0; j < g; j++) {
        const float *qh = &q[(ob * sh.n_q_heads + kv * g + j) * d];
        double mx = -1e300, sum = 0;
        for (uint64_t t = 0; t < e; t++) {
          const float *k = s.K(layer, kv, lo + t);
          double acc = 0;
          for (size_t c = 0; c < d; c++) acc += (double)qh[c] * k[c];
          logit[t] = acc * scale;
          mx = std::max(mx, logit[t]);
        }
        for (uint64_t t = 0; t < e; t++) sum += std::exp(logit[t] - mx);
        for (uint64_t t = 0; t < e; t++) mass[t] += std::exp(logit[t] - mx) / sum;
      }
    std::vector<double> pooled(e);
    int64_t half = opts.pool_window / 2;
    for (int64_t t = 0; t < (int64_t)e; t++) {
      int64_t a = std::max<int64_t>(0, t - half), b = std::min<int64_t>(e - 1, t + half);
      double v = opts.pooling == KVDEX_POOLING_MAX ? -1e300 : 0.0;
      for (int64_t u = a; u <= b; u++)
        v = opts.pooling == KVDEX_POOLING_MAX ? std::max(v, mass[u]) : v + mass[u];
      if (opts.pooling == KVDEX_POOLING_AVG) v /= (double)(b - a + 1);
      pooled[t] = v;
    }
    std::vector<uint64_t> order(e);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](uint64_t x, uint64_t y) { return pooled[x] > pooled[y]; });
    std::vector<uint64_t> top;
    std::vector<double> ranked;
    for (uint64_t i = 0; i < e; i++) ranked.push_back(pooled[order[i]]);
    for (uint32_t i = 0; i < opts.budget; i++) top.push_back(lo + order[i]);
    std::sort(top.begin(), top.end());
    r.ids.push_back(top);
    r.pooled.push_back(pooled);
    r.ranked.push_back(ranked);
  }
  return r;
}

TEST(Retain, EqualsReference) {
  int exact_checks = 0;
  for (const Shape &p : {Shape{KVDEX_DTYPE_F16, 8, 2, 64, 48, 1800},
                         Shape{KVDEX_DTYPE_F32, 4, 4, 65, 64, 1300}}) {
    Seq s(MakeShape(p), p.n, 71 + p.d);
    Env env;
    std::mt19937 rng(15);
    const uint32_t n_obs = 5;
    auto q = Uniform((size_t)n_obs * p.n_q * p.d, 3.0f, &rng);
    for (int pooling : {KVDEX_POOLING_MAX, KVDEX_POOLING_AVG})
      for (uint32_t w : {1u, 3u, 5u})
        for (uint32_t budget : {1u, 37u, 400u}) {
          SCOPED_TRACE("pooling " + std::to_string(pooling) + " w " + std::to_string(w) +
                       " budget " + std::to_string(budget) + " d " + std::to_string(p.d));
          kvdex_retain_opts opts{};
          opts.sinks = 4;
          opts.window = 16;
          opts.budget = budget;
          opts.pool_window = w;
          opts.pooling = pooling;
          std::vector<uint64_t> ids((size_t)p.n_kv * budget);
          std::vector<float> sc(ids.size());
          ASSERT_EQ(kvdex_retain_select(s.seq(), 1, q.data(), n_obs, &opts, env.pool, env.scratch,
                                        ids.data(), sc.data()), 0) << kvdex_errmsg();
          RetainRef ref = RefRetain(s, 1, q, n_obs, opts);
          for (size_t kv = 0; kv < p.n_kv; kv++) {
            std::vector<uint64_t> got(ids.begin() + kv * budget, ids.begin() + (kv + 1) * budget);
            ASSERT_TRUE(std::is_sorted(got.begin(), got.end()));
            for (size_t i = 0; i < budget; i++) {
              double want = ref.pooled[kv][got[i] - opts.sinks];
              ASSERT_NEAR(sc[kv * budget + i], want, 1e-4 * want + 1e-12);
            }
            // Exact ids unless the budget boundary falls on a near tie (different
            // ranks within f32 rounding): then every kept token must be at least as
            // good as the boundary, up to that rounding.
            const auto &rk = ref.ranked[kv];
            double kth = rk[budget - 1];
            bool clear = budget == rk.size() || rk[budget] < kth * (1 - 1e-5) || rk[budget] == kth;
            if (clear) {
              EXPECT_EQ(got, ref.ids[kv]) << "kv " << kv;
              exact_checks++;
            } else {
              for (uint64_t id : got) EXPECT_GE(ref.pooled[kv][id - opts.sinks], kth * (1 - 1e-5));
            }
          }
        }
  }
  EXPECT_GE(exact_checks, 100);  // of 108: near ties at the boundary are rare
}

TEST(Retain, BadInputsAreRefused) {
  Seq s(SmallShape(KVDEX_DTYPE_F16), 400, 72);
  Env env;
  std::mt19937 rng(16);
  auto q = Uniform(2 * 4 * 64, 1.0f, &rng);
  kvdex_retain_opts good{};
  good.sinks = 4;
  good.window = 6;
  good.budget = 10;
  good.pool_window = 3;
  good.pooling = KVDEX_POOLING_AVG;
  const uint64_t kSentinel = 777;
  std::vector<uint64_t> ids(2 * 400, kSentinel);
  auto run = [&](const kvdex_retain_opts &o, uint32_t n_obs, const std::vector<float> &qq,
                 uint32_t layer = 0) {
    return kvdex_retain_select(s.seq(), layer, qq.data(), n_obs, &o, env.pool, env.scratch,
                               ids.data(), nullptr);
  };
  kvdex_retain_opts o = good;
  o.budget = 0;
  EXPECT_EQ(run(o, 2, q), KVDEX_EINVAL);
  o.budget = 391;  // 390 eligible
  EXPECT_EQ(run(o, 2, q), KVDEX_EINVAL);
  o = good;
  for (uint32_t w : {0u, 2u, 4u, 257u}) {
    o.pool_window = w;
    EXPECT_EQ(run(o, 2, q), KVDEX_EINVAL) << w;
  }
  o = good;
  o.pooling = 7;
  EXPECT_EQ(run(o, 2, q), KVDEX_EINVAL);
  EXPECT_EQ(run(good, 0, q), KVDEX_EINVAL);
  EXPECT_EQ(run(good, 2, q, 2), KVDEX_EINVAL);
  auto qn = q;
  qn[4 * 64 + 1] = std::nanf("");
  EXPECT_EQ(run(good, 2, qn), KVDEX_EINVAL);
  o = good;
  o.scale = -2.0f;
  EXPECT_EQ(run(o, 2, q), KVDEX_EINVAL);
  EXPECT_EQ(kvdex_retain_select(s.seq(), 0, q.data(), 2, nullptr, env.pool, env.scratch,
                                ids.data(), nullptr), KVDEX_EINVAL);
  for (uint64_t x : ids) ASSERT_EQ(x, kSentinel);
  // The whole eligible range as the budget is fine, and returns it in order.
  o = good;
  o.budget = 390;
  ASSERT_EQ(run(o, 2, q), 0) << kvdex_errmsg();
  for (size_t kv = 0; kv < 2; kv++)
    for (size_t i = 0; i < 390; i++) ASSERT_EQ(ids[kv * 390 + i], 4 + i);
}

}  // namespace
