// Tests for index/: the thread pool (every task once, per-batch worker indices,
// concurrent and nested callers), the scoring kernels (each SIMD level this CPU has
// against the scalar kernel and an f64 reference) and the exact search (against
// kvdex_exact_search_ref and against answers worked out independently here).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

extern "C" {
#include "index/index.h"
#include "index/index_int.h"
#include "kvstore/kvstore.h"
}

namespace {

const int kDtypes[] = {KVDEX_DTYPE_F32, KVDEX_DTYPE_F16, KVDEX_DTYPE_BF16};
const kvdex_simd kLevels[] = {KVDEX_SIMD_SCALAR, KVDEX_SIMD_AVX2, KVDEX_SIMD_AVX512};

bool Supported(kvdex_simd level) { return (int)level <= (int)kvdex_simd_detect(); }

void ClearErr() { kvdex__seterr(0, "%s", ""); }

// f32 values in [-1, 1), converted to dtype bytes; `back` gets the values the
// dtype actually holds (what every kernel must see).
std::vector<uint8_t> MakeKeys(int dtype, size_t count, std::mt19937 *rng,
                              std::vector<float> *back) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> f(count);
  for (auto &x : f) x = u(*rng);
  std::vector<uint8_t> bytes(count * kvdex_dtype_size(dtype));
  kvdex__from_f32(dtype, f.data(), bytes.data(), count);
  back->resize(count);
  kvdex__to_f32(dtype, bytes.data(), back->data(), count);
  return bytes;
}

std::vector<float> RandomFloats(size_t n, std::mt19937 *rng) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto &x : v) x = u(*rng);
  return v;
}

// ---------------------------------------------------------------------------------
// Pool

struct PoolProbe {
  std::vector<std::atomic<int>> runs;
  std::vector<std::atomic<int>> busy;  // per worker index: tasks running right now
  std::atomic<int> violations{0};
  unsigned slots;
  PoolProbe(size_t n, unsigned slots_) : runs(n), busy(slots_), slots(slots_) {
    for (auto &r : runs) r = 0;
    for (auto &b : busy) b = 0;
  }
};

void ProbeTask(void *ctx, size_t i, unsigned worker) {
  auto *p = static_cast<PoolProbe *>(ctx);
  if (worker >= p->slots) {
    p->violations++;
    return;
  }
  if (p->busy[worker].fetch_add(1) != 0) p->violations++;  // shared within a batch
  p->runs[i]++;
  if (i % 7 == 0) std::this_thread::yield();
  p->busy[worker].fetch_sub(1);
}

TEST(Pool, NullPoolRunsInlineOnWorkerZero) {
  PoolProbe p(50, 1);
  kvdex_pool_run(nullptr, 50, ProbeTask, &p);
  for (auto &r : p.runs) EXPECT_EQ(r.load(), 1);
  EXPECT_EQ(p.violations.load(), 0);
  EXPECT_EQ(kvdex_pool_size(nullptr), 0u);
  kvdex_pool_destroy(nullptr);
}

TEST(Pool, EveryTaskExactlyOnce) {
  kvdex_pool *pool = nullptr;
  ASSERT_EQ(kvdex_pool_create(3, &pool), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_pool_size(pool), 3u);
  for (size_t n : {0, 1, 2, 3, 4, 5, 17, 1000}) {
    PoolProbe p(n, kvdex_pool_size(pool) + 1);
    kvdex_pool_run(pool, n, ProbeTask, &p);
    for (size_t i = 0; i < n; i++) EXPECT_EQ(p.runs[i].load(), 1) << "n=" << n << " i=" << i;
    EXPECT_EQ(p.violations.load(), 0);
  }
  kvdex_pool_destroy(pool);
}

TEST(Pool, DefaultSizeIsOnlineCpus) {
  kvdex_pool *pool = nullptr;
  ASSERT_EQ(kvdex_pool_create(0, &pool), 0) << kvdex_errmsg();
  EXPECT_EQ(kvdex_pool_size(pool), (unsigned)std::max(1u, std::thread::hardware_concurrency()));
  kvdex_pool_destroy(pool);
}

TEST(Pool, ConcurrentCallersEachGetEveryTaskOnce) {
  kvdex_pool *pool = nullptr;
  ASSERT_EQ(kvdex_pool_create(3, &pool), 0) << kvdex_errmsg();
  std::atomic<int> failures{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 6; c++) {
    callers.emplace_back([&, c] {
      std::mt19937 rng(100 + c);
      for (int rep = 0; rep < 150; rep++) {
        size_t n = rng() % 64;
        PoolProbe p(n, kvdex_pool_size(pool) + 1);
        kvdex_pool_run(pool, n, ProbeTask, &p);
        for (size_t i = 0; i < n; i++)
          if (p.runs[i].load() != 1) failures++;
        if (p.violations.load()) failures++;
      }
    });
  }
  for (auto &t : callers) t.join();
  EXPECT_EQ(failures.load(), 0);
  kvdex_pool_destroy(pool);
}

struct Nested {
  kvdex_pool *pool;
  std::atomic<int> inner_runs{0};
};

void InnerTask(void *ctx, size_t, unsigned) { static_cast<Nested *>(ctx)->inner_runs++; }
void OuterTask(void *ctx, size_t, unsigned) {
  auto *n = static_cast<Nested *>(ctx);
  kvdex_pool_run(n->pool, 10, InnerTask, n);  // from workers and from the caller
}

TEST(Pool, NestedRunsDoNotDeadlock) {
  Nested n;
  ASSERT_EQ(kvdex_pool_create(2, &n.pool), 0) << kvdex_errmsg();
  kvdex_pool_run(n.pool, 20, OuterTask, &n);
  EXPECT_EQ(n.inner_runs.load(), 200);
  kvdex_pool_destroy(n.pool);
}

// ---------------------------------------------------------------------------------
// Kernels

TEST(Simd, DetectAndNames) {
  kvdex_simd best = kvdex_simd_detect();
  EXPECT_GE((int)best, (int)KVDEX_SIMD_SCALAR);
  EXPECT_LE((int)best, (int)KVDEX_SIMD_AVX512);
  EXPECT_STREQ(kvdex_simd_name(KVDEX_SIMD_SCALAR), "scalar");
  EXPECT_STREQ(kvdex_simd_name(KVDEX_SIMD_AVX2), "avx2");
  EXPECT_STREQ(kvdex_simd_name(KVDEX_SIMD_AVX512), "avx512");
}

TEST(Simd, BadArguments) {
  float q[4] = {1, 2, 3, 4}, k[4] = {1, 1, 1, 1}, out[1];
  ClearErr();
  EXPECT_EQ(kvdex_score_keys(KVDEX_SIMD_SCALAR, 99, k, 1, 4, q, 1, out), KVDEX_EINVAL);
  EXPECT_STRNE(kvdex_errmsg(), "");
  ClearErr();
  EXPECT_EQ(kvdex_score_keys((kvdex_simd)7, KVDEX_DTYPE_F32, k, 1, 4, q, 1, out), KVDEX_EINVAL);
  EXPECT_STRNE(kvdex_errmsg(), "");
  for (kvdex_simd level : kLevels) {
    if (Supported(level)) continue;
    ClearErr();
    EXPECT_EQ(kvdex_score_keys(level, KVDEX_DTYPE_F32, k, 1, 4, q, 1, out), KVDEX_EUNIMPL);
    EXPECT_STRNE(kvdex_errmsg(), "");
  }
  EXPECT_EQ(kvdex_score_keys(KVDEX_SIMD_AUTO, KVDEX_DTYPE_F32, k, 1, 4, q, 1, out), 0);
  EXPECT_FLOAT_EQ(out[0], 10.0f);
}

class KernelTest : public ::testing::TestWithParam<kvdex_simd> {};

// Every level against the scalar kernel and an f64 sum of the same (converted)
// values, for each dtype, awkward and common d, g below, at and above 8, and n not a
// multiple of any tile width.
TEST_P(KernelTest, MatchesScalarAndF64) {
  kvdex_simd level = GetParam();
  if (!Supported(level)) GTEST_SKIP() << kvdex_simd_name(level) << " not supported by this CPU";
  std::mt19937 rng(7);
  const size_t n = 37;
  for (int dtype : kDtypes) {
    for (size_t d : {1, 3, 17, 64, 96, 128, 256}) {
      for (size_t g : {1, 2, 3, 4, 5, 8, 11}) {
        std::vector<float> kf;
        auto keys = MakeKeys(dtype, n * d, &rng, &kf);
        auto q = RandomFloats(g * d, &rng);
        std::vector<float> out(g * n, NAN), ref(g * n, NAN);
        ASSERT_EQ(kvdex_score_keys(level, dtype, keys.data(), n, d, q.data(), g, out.data()), 0)
            << kvdex_errmsg();
        ASSERT_EQ(kvdex_score_keys(KVDEX_SIMD_SCALAR, dtype, keys.data(), n, d, q.data(), g,
                                   ref.data()),
                  0);
        for (size_t j = 0; j < g; j++) {
          for (size_t i = 0; i < n; i++) {
            double exact = 0, mag = 0;
            for (size_t t = 0; t < d; t++) {
              exact += (double)q[j * d + t] * kf[i * d + t];
              mag += std::fabs((double)q[j * d + t] * kf[i * d + t]);
            }
            double tol = 4e-7 * mag * std::sqrt((double)d) + 1e-30;
            SCOPED_TRACE(std::string(kvdex_dtype_name(dtype)) + " d=" + std::to_string(d) +
                         " g=" + std::to_string(g) + " j=" + std::to_string(j) +
                         " i=" + std::to_string(i));
            EXPECT_NEAR(out[j * n + i], exact, tol);
            EXPECT_NEAR(out[j * n + i], ref[j * n + i], 2 * tol);
          }
        }
      }
    }
  }
}

// A key's score must not depend on where it sits in the call or on how many queries
// share the call: the scan relies on this for identical results however it chunks.
TEST_P(KernelTest, ScoreIndependentOfPositionAndGrouping) {
  kvdex_simd level = GetParam();
  if (!Supported(level)) GTEST_SKIP() << kvdex_simd_name(level) << " not supported by this CPU";
  std::mt19937 rng(11);
  const size_t n = 29, g = 6;
  for (int dtype : kDtypes) {
    for (size_t d : {5, 64, 100}) {
      std::vector<float> kf;
      auto keys = MakeKeys(dtype, n * d, &rng, &kf);
      auto q = RandomFloats(g * d, &rng);
      std::vector<float> all(g * n);
      ASSERT_EQ(kvdex_score_keys(level, dtype, keys.data(), n, d, q.data(), g, all.data()), 0);
      size_t es = kvdex_dtype_size(dtype);
      for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < g; j++) {
          float one;
          ASSERT_EQ(kvdex_score_keys(level, dtype, keys.data() + i * d * es, 1, d, q.data() + j * d,
                                     1, &one),
                    0);
          EXPECT_EQ(one, all[j * n + i]) << kvdex_dtype_name(dtype) << " d=" << d << " i=" << i;
        }
      }
    }
  }
}

TEST_P(KernelTest, EdgeSizes) {
  kvdex_simd level = GetParam();
  if (!Supported(level)) GTEST_SKIP() << kvdex_simd_name(level) << " not supported by this CPU";
  float q[2] = {1, 2}, k[2] = {3, 4}, out[2] = {5, 5};
  EXPECT_EQ(kvdex_score_keys(level, KVDEX_DTYPE_F32, k, 0, 2, q, 1, out), 0);  // n = 0
  EXPECT_EQ(out[0], 5.0f);
  EXPECT_EQ(kvdex_score_keys(level, KVDEX_DTYPE_F32, k, 1, 0, q, 2, out), 0);  // d = 0
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_EQ(out[1], 0.0f);
  EXPECT_EQ(kvdex_score_keys(level, KVDEX_DTYPE_F32, k, 1, 2, q, 1, out), 0);
  EXPECT_EQ(out[0], 11.0f);
}

const kvdex__kernels *Kernels(kvdex_simd level) {
  switch (level) {
    case KVDEX_SIMD_AVX512: return &kvdex__kernels_avx512;
    case KVDEX_SIMD_AVX2: return &kvdex__kernels_avx2;
    default: return &kvdex__kernels_scalar;
  }
}

// The filtering scan kernel of each level returns exactly the pairs its scoring
// kernel scores at or above the threshold, with the same bits, in increasing key
// order per query; NaN never passes, not even a threshold of -inf.
TEST_P(KernelTest, ScanMatchesScoreAboveThreshold) {
  kvdex_simd level = GetParam();
  if (!Supported(level)) GTEST_SKIP() << kvdex_simd_name(level) << " not supported by this CPU";
  const kvdex__kernels *kern = Kernels(level);
  ASSERT_EQ(kvdex__kernels_get(level), kern);
  std::mt19937 rng(21);
  const size_t n = 45;
  for (int dtype : kDtypes) {
    for (size_t d : {3, 17, 64, 128}) {
      for (size_t g : {1, 2, 3, 4, 8, 11}) {
        std::vector<float> kf;
        auto keys = MakeKeys(dtype, n * d, &rng, &kf);
        if (dtype == KVDEX_DTYPE_F32) {
          float nan = NAN;
          std::memcpy(keys.data() + (5 * d + 1) * 4, &nan, 4);  // key 5 scores NaN
        } else {
          uint16_t nan = 0x7e00;  // a NaN in both f16 and bf16
          std::memcpy(keys.data() + (5 * d + 1) * 2, &nan, 2);
        }
        auto q = RandomFloats(g * d, &rng);
        std::vector<float> all(g * n);
        kern->score(dtype, keys.data(), n, d, q.data(), g, all.data(), n, nullptr);
        std::vector<float> thr(g);
        for (size_t j = 0; j < g; j++) {
          if (j % 3 == 0) {
            thr[j] = -INFINITY;
          } else if (j % 3 == 1) {
            std::vector<float> row(all.begin() + j * n, all.begin() + (j + 1) * n);
            row.erase(std::remove_if(row.begin(), row.end(), [](float x) { return std::isnan(x); }),
                      row.end());
            std::nth_element(row.begin(), row.begin() + row.size() / 2, row.end());
            thr[j] = row[row.size() / 2];  // about half pass, one exactly at the threshold
          } else {
            thr[j] = INFINITY;
          }
        }
        std::vector<kvdex__cand> cand(n * g);
        size_t nc = kern->scan(dtype, keys.data(), n, d, q.data(), g, thr.data(), cand.data(),
                               keys.data());
        std::vector<std::vector<std::pair<uint32_t, float>>> got(g), want(g);
        for (size_t c = 0; c < nc; c++) {
          ASSERT_LT(cand[c].j, g);
          ASSERT_LT(cand[c].i, n);
          got[cand[c].j].push_back({cand[c].i, cand[c].score});
        }
        for (size_t j = 0; j < g; j++)
          for (size_t i = 0; i < n; i++)
            if (all[j * n + i] >= thr[j]) want[j].push_back({(uint32_t)i, all[j * n + i]});
        for (size_t j = 0; j < g; j++) {
          SCOPED_TRACE(std::string(kvdex_dtype_name(dtype)) + " d=" + std::to_string(d) +
                       " g=" + std::to_string(g) + " j=" + std::to_string(j));
          ASSERT_EQ(got[j].size(), want[j].size());
          for (size_t c = 0; c < got[j].size(); c++) {
            EXPECT_EQ(got[j][c].first, want[j][c].first);
            EXPECT_EQ(std::memcmp(&got[j][c].second, &want[j][c].second, 4), 0);
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Levels, KernelTest, ::testing::ValuesIn(kLevels),
                         [](const ::testing::TestParamInfo<kvdex_simd> &info) {
                           return std::string(kvdex_simd_name(info.param));
                         });

// ---------------------------------------------------------------------------------
// Exact search

// A store with one sequence, filled with random keys (and values) in a few appends.
class Store {
 public:
  Store(const kvdex_shape &shape, uint64_t tokens, uint32_t seed, const char *id = "s")
      : shape_(shape) {
    EXPECT_EQ(kvdex_store_create(0, &store_), 0) << kvdex_errmsg();
    EXPECT_EQ(kvdex_seq_create(store_, nullptr, id, &shape_), 0) << kvdex_errmsg();
    EXPECT_EQ(kvdex_seq_open(store_, nullptr, id, &seq_), 0) << kvdex_errmsg();
    if (shape_.block_tokens == 0) shape_.block_tokens = KVDEX_DEFAULT_BLOCK_TOKENS;
    rng_.seed(seed);
    if (tokens) Append(tokens);
  }
  ~Store() {
    kvdex_seq_release(seq_);
    kvdex_store_destroy(store_);
  }

  // Appends `count` random tokens to every layer, in appends of uneven sizes.
  void Append(uint64_t count) {
    kvdex_txn *txn = nullptr;
    ASSERT_EQ(kvdex_txn_begin(seq_, &txn), 0) << kvdex_errmsg();
    for (uint32_t layer = 0; layer < shape_.n_layers; layer++) {
      uint64_t start = kvdex_seq_tokens(seq_, layer), done = 0;
      while (done < count) {
        uint32_t n = (uint32_t)std::min<uint64_t>(count - done, 113 + rng_() % 300);
        std::vector<float> kf;
        size_t elems = (size_t)shape_.n_kv_heads * n * shape_.head_dim;
        auto k = MakeKeys(shape_.dtype, elems, &rng_, &kf);
        auto v = MakeKeys(shape_.dtype, elems, &rng_, &kf);
        ASSERT_EQ(kvdex_txn_append(txn, layer, start + done, n, k.data(), v.data()), 0)
            << kvdex_errmsg();
        done += n;
      }
    }
    ASSERT_EQ(kvdex_txn_commit(txn, nullptr), 0) << kvdex_errmsg();
  }

  // Appends tokens whose keys are given as f32, layout [n_kv_heads][count][head_dim].
  void AppendKeys(uint32_t layer, const std::vector<float> &keys, uint32_t count) {
    size_t elems = keys.size();
    std::vector<uint8_t> k(elems * kvdex_dtype_size(shape_.dtype)), v(k.size(), 0);
    kvdex__from_f32(shape_.dtype, keys.data(), k.data(), elems);
    kvdex_txn *txn = nullptr;
    ASSERT_EQ(kvdex_txn_begin(seq_, &txn), 0) << kvdex_errmsg();
    uint64_t start = kvdex_seq_tokens(seq_, layer);
    ASSERT_EQ(kvdex_txn_append(txn, layer, start, count, k.data(), v.data()), 0) << kvdex_errmsg();
    ASSERT_EQ(kvdex_txn_commit(txn, nullptr), 0) << kvdex_errmsg();
  }

  std::vector<float> Queries(uint32_t seed) {
    std::mt19937 rng(seed);
    return RandomFloats((size_t)shape_.n_q_heads * shape_.head_dim, &rng);
  }

  kvdex_seq *seq() { return seq_; }
  const kvdex_shape &shape() const { return shape_; }

 private:
  kvdex_shape shape_;
  kvdex_store *store_ = nullptr;
  kvdex_seq *seq_ = nullptr;
  std::mt19937 rng_;
};

kvdex_shape Shape(int dtype, uint32_t head_dim, uint32_t n_kv = 2, uint32_t n_q = 8,
                  uint32_t block_tokens = 64, uint32_t layers = 2) {
  kvdex_shape s{};
  s.n_layers = layers;
  s.n_kv_heads = n_kv;
  s.n_q_heads = n_q;
  s.head_dim = head_dim;
  s.block_tokens = block_tokens;
  s.dtype = dtype;
  return s;
}

struct Result {
  kvdex_search_result r{};
  ~Result() { kvdex_search_result_free(&r); }
};

// Checks `got` against the reference `want` for the same search: same hit counts,
// kvdex_hit_better order, scores within tolerance, and ids equal except where the
// reference scores tie (within 1e-4 relative) at the k boundary. `all` maps each
// eligible id to its reference score (per query head).
void ExpectMatches(const kvdex_search_result &got, const kvdex_search_result &want,
                   const std::vector<std::map<uint64_t, float>> &all) {
  ASSERT_EQ(got.n_q_heads, want.n_q_heads);
  EXPECT_EQ(got.tokens, want.tokens);
  EXPECT_EQ(got.keys_scanned, want.keys_scanned);
  for (uint32_t h = 0; h < got.n_q_heads; h++) {
    SCOPED_TRACE("q head " + std::to_string(h));
    const kvdex_head_result &g = got.heads[h], &w = want.heads[h];
    ASSERT_EQ(g.n_hits, w.n_hits);
    if (!g.n_hits) continue;
    float kth = w.hits[w.n_hits - 1].score;
    auto close = [](float a, float b) {
      return std::fabs(a - b) <= 1e-4f * std::max({std::fabs(a), std::fabs(b), 1.0f});
    };
    std::vector<uint64_t> gids, wids;
    for (uint32_t i = 0; i < g.n_hits; i++) {
      if (i) {
        EXPECT_TRUE(kvdex_hit_better(g.hits[i - 1], g.hits[i])) << "order at " << i;
      }
      auto it = all[h].find(g.hits[i].id);
      ASSERT_NE(it, all[h].end()) << "id " << g.hits[i].id << " is not eligible";
      EXPECT_TRUE(close(g.hits[i].score, it->second))
          << "id " << g.hits[i].id << ": " << g.hits[i].score << " vs " << it->second;
      EXPECT_TRUE(close(g.hits[i].score, w.hits[i].score)) << "rank " << i;
      gids.push_back(g.hits[i].id);
      wids.push_back(w.hits[i].id);
    }
    std::sort(gids.begin(), gids.end());
    std::sort(wids.begin(), wids.end());
    EXPECT_TRUE(std::adjacent_find(gids.begin(), gids.end()) == gids.end()) << "duplicate ids";
    std::vector<uint64_t> only_g, only_w;
    std::set_difference(gids.begin(), gids.end(), wids.begin(), wids.end(),
                        std::back_inserter(only_g));
    std::set_difference(wids.begin(), wids.end(), gids.begin(), gids.end(),
                        std::back_inserter(only_w));
    for (uint64_t id : only_g) EXPECT_TRUE(close(all[h].at(id), kth)) << "extra id " << id;
    for (uint64_t id : only_w) EXPECT_TRUE(close(all[h].at(id), kth)) << "missing id " << id;
  }
}

// Reference scores of every eligible token, per query head.
std::vector<std::map<uint64_t, float>> AllScores(kvdex_seq *seq, uint32_t layer, const float *q,
                                                 const kvdex_search_opts &opts) {
  kvdex_search_opts o = opts;
  o.k = KVDEX_MAX_K;
  Result all;
  EXPECT_EQ(kvdex_exact_search_ref(seq, layer, q, &o, &all.r), 0) << kvdex_errmsg();
  std::vector<std::map<uint64_t, float>> m(all.r.n_q_heads);
  for (uint32_t h = 0; h < all.r.n_q_heads; h++)
    for (uint32_t i = 0; i < all.r.heads[h].n_hits; i++)
      m[h][all.r.heads[h].hits[i].id] = all.r.heads[h].hits[i].score;
  return m;
}

bool Identical(const kvdex_search_result &a, const kvdex_search_result &b) {
  if (a.n_q_heads != b.n_q_heads || a.tokens != b.tokens || a.keys_scanned != b.keys_scanned)
    return false;
  for (uint32_t h = 0; h < a.n_q_heads; h++) {
    if (a.heads[h].n_hits != b.heads[h].n_hits) return false;
    for (uint32_t i = 0; i < a.heads[h].n_hits; i++)
      if (a.heads[h].hits[i].id != b.heads[h].hits[i].id ||
          std::memcmp(&a.heads[h].hits[i].score, &b.heads[h].hits[i].score, sizeof(float)))
        return false;
  }
  return true;
}

struct SearchCase {
  int dtype;
  uint32_t head_dim;
};

class ExactTest : public ::testing::TestWithParam<SearchCase> {};

// Against the reference: k = 1, a middle k, k = eligible, k > eligible; with and
// without sinks/window; every SIMD level; one thread and a pool (identical bits).
TEST_P(ExactTest, MatchesReference) {
  const SearchCase c = GetParam();
  const uint64_t n = 1000;  // not a multiple of the block size
  Store st(Shape(c.dtype, c.head_dim), n, 1234 + c.head_dim);
  kvdex_pool *pool = nullptr;
  ASSERT_EQ(kvdex_pool_create(3, &pool), 0) << kvdex_errmsg();
  auto q = st.Queries(99);
  struct Excl {
    uint32_t sinks, window;
  };
  for (Excl ex : {Excl{0, 0}, Excl{4, 64}, Excl{70, 130}}) {
    uint64_t eligible = n - ex.sinks - ex.window;
    for (uint32_t k : {1u, 10u, 100u, (uint32_t)eligible, (uint32_t)eligible + 50, 5000u}) {
      for (uint32_t layer : {0u, 1u}) {
        SCOPED_TRACE("k=" + std::to_string(k) + " sinks=" + std::to_string(ex.sinks) +
                     " window=" + std::to_string(ex.window) + " layer=" + std::to_string(layer));
        kvdex_search_opts o{};
        o.k = k;
        o.sinks = ex.sinks;
        o.window = ex.window;
        Result want;
        ASSERT_EQ(kvdex_exact_search_ref(st.seq(), layer, q.data(), &o, &want.r), 0)
            << kvdex_errmsg();
        EXPECT_EQ(want.r.tokens, n);
        EXPECT_EQ(want.r.keys_scanned, 2 * eligible);
        for (uint32_t h = 0; h < 8; h++)
          EXPECT_EQ(want.r.heads[h].n_hits, std::min<uint64_t>(k, eligible));
        auto all = AllScores(st.seq(), layer, q.data(), o);
        for (kvdex_simd level : {KVDEX_SIMD_AUTO, KVDEX_SIMD_SCALAR, KVDEX_SIMD_AVX2,
                                 KVDEX_SIMD_AVX512}) {
          if (!Supported(level)) continue;
          SCOPED_TRACE(std::string("simd ") + kvdex_simd_name(level));
          o.simd = level;
          Result one, par;
          ASSERT_EQ(kvdex_exact_search(st.seq(), layer, q.data(), &o, nullptr, &one.r), 0)
              << kvdex_errmsg();
          ExpectMatches(one.r, want.r, all);
          ASSERT_EQ(kvdex_exact_search(st.seq(), layer, q.data(), &o, pool, &par.r), 0)
              << kvdex_errmsg();
          EXPECT_TRUE(Identical(one.r, par.r)) << "pool and single thread differ";
          for (uint32_t h = 0; h < 8; h++)
            for (uint32_t i = 0; i < one.r.heads[h].n_hits; i++) {
              EXPECT_GE(one.r.heads[h].hits[i].id, ex.sinks);
              EXPECT_LT(one.r.heads[h].hits[i].id, n - ex.window);
            }
        }
      }
    }
  }
  kvdex_pool_destroy(pool);
}

INSTANTIATE_TEST_SUITE_P(
    DtypesAndDims, ExactTest,
    ::testing::Values(SearchCase{KVDEX_DTYPE_F32, 64}, SearchCase{KVDEX_DTYPE_F32, 96},
                      SearchCase{KVDEX_DTYPE_F32, 128}, SearchCase{KVDEX_DTYPE_F32, 256},
                      SearchCase{KVDEX_DTYPE_F16, 64}, SearchCase{KVDEX_DTYPE_F16, 96},
                      SearchCase{KVDEX_DTYPE_F16, 128}, SearchCase{KVDEX_DTYPE_F16, 256},
                      SearchCase{KVDEX_DTYPE_BF16, 64}, SearchCase{KVDEX_DTYPE_BF16, 96},
                      SearchCase{KVDEX_DTYPE_BF16, 128}, SearchCase{KVDEX_DTYPE_BF16, 256}),
    [](const ::testing::TestParamInfo<SearchCase> &info) {
      return std::string(kvdex_dtype_name(info.param.dtype)) + "_d" +
             std::to_string(info.param.head_dim);
    });

// Long enough that the pool splits each kv head into several chunks, so the merge
// of chunk outputs is exercised (and must match one thread bit for bit).
TEST(Exact, ChunkedScanMatchesSingleThread) {
  Store st(Shape(KVDEX_DTYPE_F16, 64, 1, 4, 16, 1), 40000, 5);
  kvdex_pool *pool = nullptr;
  ASSERT_EQ(kvdex_pool_create(3, &pool), 0) << kvdex_errmsg();
  auto q = st.Queries(3);
  for (uint32_t k : {1u, 7u, 333u, 2000u}) {
    kvdex_search_opts o{};
    o.k = k;
    o.sinks = 5;
    o.window = 17;
    Result one, par, want;
    ASSERT_EQ(kvdex_exact_search(st.seq(), 0, q.data(), &o, nullptr, &one.r), 0) << kvdex_errmsg();
    ASSERT_EQ(kvdex_exact_search(st.seq(), 0, q.data(), &o, pool, &par.r), 0) << kvdex_errmsg();
    EXPECT_TRUE(Identical(one.r, par.r)) << "k=" << k;
    ASSERT_EQ(kvdex_exact_search_ref(st.seq(), 0, q.data(), &o, &want.r), 0);
    ExpectMatches(par.r, want.r, AllScores(st.seq(), 0, q.data(), o));
  }
  kvdex_pool_destroy(pool);
}

// Chunks that yield fewer hits than k (here: runs of NaN keys, never hits) must be
// merged correctly with full ones.
TEST(Exact, ChunkedScanWithShortChunks) {
  const uint32_t d = 32, n = 30000;
  Store st(Shape(KVDEX_DTYPE_F16, d, 1, 2, 16, 1), 0, 1);
  std::mt19937 rng(9);
  std::vector<float> keys = RandomFloats((size_t)n * d, &rng);
  for (uint32_t i = 0; i < n; i++)
    if (i < 9000 || (i > 15000 && i < 21000) || i % 3 == 0) keys[(size_t)i * d + 5] = NAN;
  st.AppendKeys(0, keys, n);
  kvdex_pool *pool = nullptr;
  ASSERT_EQ(kvdex_pool_create(3, &pool), 0) << kvdex_errmsg();
  auto q = st.Queries(3);
  for (uint32_t k : {1u, 100u, 1500u, 5000u}) {
    kvdex_search_opts o{};
    o.k = k;
    Result one, par, want;
    ASSERT_EQ(kvdex_exact_search(st.seq(), 0, q.data(), &o, nullptr, &one.r), 0) << kvdex_errmsg();
    ASSERT_EQ(kvdex_exact_search(st.seq(), 0, q.data(), &o, pool, &par.r), 0) << kvdex_errmsg();
    EXPECT_TRUE(Identical(one.r, par.r)) << "k=" << k;
    ASSERT_EQ(kvdex_exact_search_ref(st.seq(), 0, q.data(), &o, &want.r), 0);
    ExpectMatches(par.r, want.r, AllScores(st.seq(), 0, q.data(), o));
  }
  kvdex_pool_destroy(pool);
}

// Query head h must search kv head h / (n_q / n_kv): kv head 0 has a planted match
// at token 100, kv head 1 at token 200; every query points the same way.
TEST(Exact, GqaMapping) {
  const uint32_t d = 64, n = 300;
  Store st(Shape(KVDEX_DTYPE_F32, d, 2, 8, 64, 1), 0, 1);
  std::mt19937 rng(5);
  std::vector<float> keys = RandomFloats(2 * (size_t)n * d, &rng);
  for (auto &x : keys) x *= 0.01f;
  keys[(0 * n + 100) * d + 3] = 5.0f;
  keys[(1 * n + 200) * d + 3] = 5.0f;
  st.AppendKeys(0, keys, n);
  std::vector<float> q(8 * d, 0.0f);
  for (uint32_t h = 0; h < 8; h++) q[h * d + 3] = 1.0f;
  kvdex_search_opts o{};
  o.k = 1;
  Result r, ref;
  ASSERT_EQ(kvdex_exact_search(st.seq(), 0, q.data(), &o, nullptr, &r.r), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_exact_search_ref(st.seq(), 0, q.data(), &o, &ref.r), 0) << kvdex_errmsg();
  for (uint32_t h = 0; h < 8; h++) {
    ASSERT_EQ(r.r.heads[h].n_hits, 1u);
    EXPECT_EQ(r.r.heads[h].hits[0].id, h < 4 ? 100u : 200u) << "q head " << h;
    EXPECT_EQ(ref.r.heads[h].hits[0].id, h < 4 ? 100u : 200u) << "q head " << h;
  }
}

// Block sizes that are not multiples of any tile width, down to one token a block,
// and blocks larger than one kernel call.
TEST(Exact, OddBlockSizes) {
  kvdex_pool *pool = nullptr;
  ASSERT_EQ(kvdex_pool_create(3, &pool), 0) << kvdex_errmsg();
  for (uint32_t bt : {1u, 5u, 100u, 5000u}) {
    SCOPED_TRACE("block_tokens=" + std::to_string(bt));
    Store st(Shape(KVDEX_DTYPE_BF16, 128, 1, 4, bt, 1), 9000, bt);
    auto q = st.Queries(bt);
    kvdex_search_opts o{};
    o.k = 25;
    o.sinks = 3;
    o.window = 11;
    Result one, par, want;
    ASSERT_EQ(kvdex_exact_search(st.seq(), 0, q.data(), &o, nullptr, &one.r), 0) << kvdex_errmsg();
    ASSERT_EQ(kvdex_exact_search(st.seq(), 0, q.data(), &o, pool, &par.r), 0) << kvdex_errmsg();
    ASSERT_EQ(kvdex_exact_search_ref(st.seq(), 0, q.data(), &o, &want.r), 0) << kvdex_errmsg();
    EXPECT_TRUE(Identical(one.r, par.r));
    ExpectMatches(one.r, want.r, AllScores(st.seq(), 0, q.data(), o));
  }
  kvdex_pool_destroy(pool);
}

// More kv heads than the search keeps views for on its stack, one q head each.
TEST(Exact, ManyKvHeads) {
  Store st(Shape(KVDEX_DTYPE_F16, 16, 80, 80, 16, 1), 150, 12);
  kvdex_pool *pool = nullptr;
  ASSERT_EQ(kvdex_pool_create(2, &pool), 0) << kvdex_errmsg();
  auto q = st.Queries(13);
  kvdex_search_opts o{};
  o.k = 9;
  o.sinks = 2;
  Result one, par, want;
  ASSERT_EQ(kvdex_exact_search(st.seq(), 0, q.data(), &o, nullptr, &one.r), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_exact_search(st.seq(), 0, q.data(), &o, pool, &par.r), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_exact_search_ref(st.seq(), 0, q.data(), &o, &want.r), 0) << kvdex_errmsg();
  EXPECT_TRUE(Identical(one.r, par.r));
  EXPECT_EQ(one.r.keys_scanned, 80u * 148u);
  ExpectMatches(one.r, want.r, AllScores(st.seq(), 0, q.data(), o));
  kvdex_pool_destroy(pool);
}

// A level this CPU lacks is refused, not emulated.
TEST(Exact, UnsupportedLevelIsRefused) {
  if (kvdex_simd_detect() == KVDEX_SIMD_AVX512) GTEST_SKIP() << "this CPU supports every level";
  Store st(Shape(KVDEX_DTYPE_F16, 64), 100, 2);
  auto q = st.Queries(1);
  kvdex_search_opts o{};
  o.k = 5;
  o.simd = KVDEX_SIMD_AVX512;
  Result r;
  ClearErr();
  EXPECT_EQ(kvdex_exact_search(st.seq(), 0, q.data(), &o, nullptr, &r.r), KVDEX_EUNIMPL);
  EXPECT_STRNE(kvdex_errmsg(), "");
}

// Equal scores are ordered by id: with identical keys the hits are the lowest ids.
TEST(Exact, TiesBreakByLowerId) {
  const uint32_t d = 32, n = 500;
  Store st(Shape(KVDEX_DTYPE_BF16, d, 1, 2, 16, 1), 0, 1);
  std::vector<float> keys((size_t)n * d, 0.25f);
  st.AppendKeys(0, keys, n);
  auto q = st.Queries(8);
  kvdex_pool *pool = nullptr;
  ASSERT_EQ(kvdex_pool_create(2, &pool), 0) << kvdex_errmsg();
  for (kvdex_pool *p : {(kvdex_pool *)nullptr, pool}) {
    kvdex_search_opts o{};
    o.k = 10;
    o.sinks = 3;
    Result r;
    ASSERT_EQ(kvdex_exact_search(st.seq(), 0, q.data(), &o, p, &r.r), 0) << kvdex_errmsg();
    for (uint32_t h = 0; h < 2; h++) {
      ASSERT_EQ(r.r.heads[h].n_hits, 10u);
      for (uint32_t i = 0; i < 10; i++) EXPECT_EQ(r.r.heads[h].hits[i].id, 3u + i);
    }
  }
  kvdex_pool_destroy(pool);
}

TEST(Exact, NothingEligible) {
  Store st(Shape(KVDEX_DTYPE_F16, 64), 100, 2);
  auto q = st.Queries(1);
  kvdex_search_opts o{};
  o.k = 5;
  for (auto ex : {std::pair<uint32_t, uint32_t>{60, 40}, {100, 0}, {0, 100}, {200, 300}}) {
    o.sinks = ex.first;
    o.window = ex.second;
    Result r, ref;
    ASSERT_EQ(kvdex_exact_search(st.seq(), 0, q.data(), &o, nullptr, &r.r), 0) << kvdex_errmsg();
    ASSERT_EQ(kvdex_exact_search_ref(st.seq(), 0, q.data(), &o, &ref.r), 0) << kvdex_errmsg();
    for (auto *res : {&r.r, &ref.r}) {
      EXPECT_EQ(res->n_q_heads, 8u);
      EXPECT_EQ(res->tokens, 100u);
      EXPECT_EQ(res->keys_scanned, 0u);
      for (uint32_t h = 0; h < 8; h++) EXPECT_EQ(res->heads[h].n_hits, 0u);
    }
  }
  // An empty layer too.
  Store empty(Shape(KVDEX_DTYPE_F16, 64), 0, 2, "empty");
  Result r;
  o.sinks = o.window = 0;
  ASSERT_EQ(kvdex_exact_search(empty.seq(), 1, q.data(), &o, nullptr, &r.r), 0) << kvdex_errmsg();
  EXPECT_EQ(r.r.tokens, 0u);
  EXPECT_EQ(r.r.heads[0].n_hits, 0u);
}

// A key holding NaN scores NaN and is never a hit; +-inf scores are kept in order.
TEST(Exact, NonFiniteKeys) {
  const uint32_t d = 16, n = 40;
  Store st(Shape(KVDEX_DTYPE_F32, d, 1, 1, 16, 1), 0, 1);
  std::vector<float> keys((size_t)n * d, 0.0f);
  for (uint32_t i = 0; i < n; i++) keys[i * d] = (float)i;  // score = i for q = e0
  keys[7 * d + 1] = NAN;
  keys[39 * d + 1] = NAN;
  keys[3 * d + 2] = INFINITY;
  keys[5 * d + 2] = -INFINITY;
  st.AppendKeys(0, keys, n);
  std::vector<float> q(d, 0.0f);
  q[0] = 1.0f;
  q[2] = 1.0f;
  kvdex_search_opts o{};
  o.k = 100;
  Result r, ref;
  ASSERT_EQ(kvdex_exact_search(st.seq(), 0, q.data(), &o, nullptr, &r.r), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_exact_search_ref(st.seq(), 0, q.data(), &o, &ref.r), 0) << kvdex_errmsg();
  for (auto *res : {&r.r, &ref.r}) {
    ASSERT_EQ(res->heads[0].n_hits, n - 2);
    EXPECT_EQ(res->heads[0].hits[0].id, 3u);  // +inf first
    EXPECT_EQ(res->heads[0].hits[1].id, 38u);
    EXPECT_EQ(res->heads[0].hits[n - 3].id, 5u);  // -inf last
    for (uint32_t i = 0; i < res->heads[0].n_hits; i++) {
      EXPECT_NE(res->heads[0].hits[i].id, 7u);
      EXPECT_NE(res->heads[0].hits[i].id, 39u);
    }
  }
}

TEST(Exact, BadInputsAreRejectedAndChangeNothing) {
  Store st(Shape(KVDEX_DTYPE_F16, 64), 200, 3);
  auto q = st.Queries(2);
  kvdex_search_opts o{};
  o.k = 5;
  Result r;
  ASSERT_EQ(kvdex_exact_search(st.seq(), 0, q.data(), &o, nullptr, &r.r), 0) << kvdex_errmsg();
  std::vector<kvdex_hit> before(r.r.heads[0].hits, r.r.heads[0].hits + 5);

  auto expect_einval = [&](int rc, const char *what) {
    EXPECT_EQ(rc, KVDEX_EINVAL) << what;
    EXPECT_STRNE(kvdex_errmsg(), "") << what;
  };
  for (int ref = 0; ref < 2; ref++) {
    auto search = [&](uint32_t layer, const float *qq, const kvdex_search_opts *oo,
                      kvdex_search_result *res) {
      ClearErr();
      return ref ? kvdex_exact_search_ref(st.seq(), layer, qq, oo, res)
                 : kvdex_exact_search(st.seq(), layer, qq, oo, nullptr, res);
    };
    kvdex_search_opts bad = o;
    bad.k = 0;
    expect_einval(search(0, q.data(), &bad, &r.r), "k = 0");
    bad.k = KVDEX_MAX_K + 1;
    expect_einval(search(0, q.data(), &bad, &r.r), "k too large");
    expect_einval(search(2, q.data(), &o, &r.r), "layer out of range");
    auto qn = q;
    qn[5 * 64 + 7] = NAN;
    expect_einval(search(0, qn.data(), &o, &r.r), "NaN query");
    qn[5 * 64 + 7] = -INFINITY;
    expect_einval(search(0, qn.data(), &o, &r.r), "infinite query");
    expect_einval(search(0, nullptr, &o, &r.r), "NULL query");
    expect_einval(search(0, q.data(), nullptr, &r.r), "NULL opts");
    expect_einval(search(0, q.data(), &o, nullptr), "NULL result");
  }
  kvdex_search_opts bad = o;
  bad.simd = (kvdex_simd)9;
  ClearErr();
  expect_einval(kvdex_exact_search(st.seq(), 0, q.data(), &bad, nullptr, &r.r), "bad simd");
  ClearErr();
  expect_einval(kvdex_exact_search(nullptr, 0, q.data(), &o, nullptr, &r.r), "NULL seq");
  // The earlier result is still there, untouched.
  ASSERT_EQ(r.r.n_q_heads, 8u);
  ASSERT_EQ(r.r.heads[0].n_hits, 5u);
  for (int i = 0; i < 5; i++) {
    EXPECT_EQ(r.r.heads[0].hits[i].id, before[i].id);
    EXPECT_EQ(r.r.heads[0].hits[i].score, before[i].score);
  }
}

// One result reused across searches that need more and then less room.
TEST(Exact, ResultIsReused) {
  Store st(Shape(KVDEX_DTYPE_F32, 64, 2, 4), 700, 4);
  auto q = st.Queries(5);
  Result r;
  for (uint32_t k : {3u, 600u, 2u, 650u}) {
    kvdex_search_opts o{};
    o.k = k;
    Result fresh;
    ASSERT_EQ(kvdex_exact_search(st.seq(), 1, q.data(), &o, nullptr, &r.r), 0) << kvdex_errmsg();
    ASSERT_EQ(kvdex_exact_search(st.seq(), 1, q.data(), &o, nullptr, &fresh.r), 0);
    EXPECT_TRUE(Identical(r.r, fresh.r)) << "k=" << k;
  }
}

// Searches while another thread appends: each search sees one committed length and
// returns only ids below it (minus the window).
TEST(Exact, SearchDuringAppends) {
  Store st(Shape(KVDEX_DTYPE_F16, 64, 2, 8, 16, 1), 64, 6);
  kvdex_pool *pool = nullptr;
  ASSERT_EQ(kvdex_pool_create(2, &pool), 0) << kvdex_errmsg();
  auto q = st.Queries(4);
  std::atomic<bool> done{false};
  std::thread writer([&] {
    for (int i = 0; i < 40; i++) st.Append(50 + i);
    done = true;
  });
  Result r;
  uint64_t last = 0;
  int searches = 0;
  while (!done || searches < 5) {
    kvdex_search_opts o{};
    o.k = 20;
    o.window = 8;
    ASSERT_EQ(kvdex_exact_search(st.seq(), 0, q.data(), &o, pool, &r.r), 0) << kvdex_errmsg();
    EXPECT_GE(r.r.tokens, last);
    last = r.r.tokens;
    EXPECT_EQ(r.r.keys_scanned, 2 * (r.r.tokens - 8));
    for (uint32_t h = 0; h < 8; h++) {
      EXPECT_EQ(r.r.heads[h].n_hits, 20u);
      for (uint32_t i = 0; i < r.r.heads[h].n_hits; i++)
        EXPECT_LT(r.r.heads[h].hits[i].id, r.r.tokens - 8);
    }
    searches++;
  }
  writer.join();
  kvdex_pool_destroy(pool);
}

// Many threads searching through one pool at once get the single-thread answer.
TEST(Exact, ConcurrentSearchersShareThePool) {
  Store st(Shape(KVDEX_DTYPE_F16, 128, 2, 8, 64, 1), 6000, 8);
  kvdex_pool *pool = nullptr;
  ASSERT_EQ(kvdex_pool_create(3, &pool), 0) << kvdex_errmsg();
  auto q = st.Queries(6);
  kvdex_search_opts o{};
  o.k = 50;
  Result want;
  ASSERT_EQ(kvdex_exact_search(st.seq(), 0, q.data(), &o, nullptr, &want.r), 0);
  std::atomic<int> mismatches{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; t++)
    ts.emplace_back([&] {
      Result r;
      for (int i = 0; i < 20; i++) {
        if (kvdex_exact_search(st.seq(), 0, q.data(), &o, pool, &r.r) || !Identical(r.r, want.r))
          mismatches++;
      }
    });
  for (auto &t : ts) t.join();
  EXPECT_EQ(mismatches.load(), 0);
  kvdex_pool_destroy(pool);
}

}  // namespace
