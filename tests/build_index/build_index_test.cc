// BuildIndex end to end through the public C API, over both transports ("local:" and
// "grpc://" against an in-process server): prefill queries stored with the K/V, the
// background build (BUILDING -> READY, kind, memory, tokens), "auto" and named-kind
// searches against exact search on out-of-distribution data (bench/gen.h), tokens
// appended after the build, sinks and window, concurrent searches during a build and
// a rebuild, bad specs, a kind that is not built, deletes (during a build too), the
// memory cap, every layer at once, and the accounting of index memory.
// No timing assertions: waits poll the state with generous limits.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include <kvdex/kvdex.h>

extern "C" {
#include "bench/gen.h"  // a C header without extern "C" of its own
}
#include "index/ann.h"
#include "index/index.h"
#include "kvstore/kvstore.h"
#include "workers/server.h"

namespace {

constexpr uint64_t kCap = 96ull << 20;
constexpr uint32_t kDim = 64, kKv = 2, kQ = 4, kGroup = kQ / kKv;
constexpr uint64_t kN = 16384;     // tokens of the OOD sequence
constexpr uint32_t kTests = 24;    // decode queries per kv head

kvdex_shape Shape(uint32_t layers, uint32_t kv = kKv, uint32_t q = kQ, uint32_t dim = kDim,
                  int dtype = KVDEX_DTYPE_F16, uint32_t block = 64) {
  kvdex_shape s{};
  s.n_layers = layers;
  s.n_kv_heads = kv;
  s.n_q_heads = q;
  s.head_dim = dim;
  s.block_tokens = block;
  s.dtype = dtype;
  return s;
}

std::vector<uint16_t> ToF16(const float *f, size_t n) {
  std::vector<uint16_t> out(n);
  kvdex__from_f32(KVDEX_DTYPE_F16, f, out.data(), n);
  return out;
}

// OOD data for one layer of kKv kv heads: keys, values, one prefill query per token
// and query head (query head h uses kv head h / kGroup), and decode queries.
struct Ood {
  std::vector<kvdex_gen_data> g;  // per kv head
  explicit Ood(uint64_t seed) : g(kKv) {
    for (uint32_t h = 0; h < kKv; h++) {
      kvdex_gen_opts o{};
      o.n_keys = kN;
      o.dim = kDim;
      o.n_train = (uint32_t)(kGroup * kN);
      o.n_test = kTests;
      o.seed = seed * 10 + h;
      EXPECT_EQ(kvdex_gen(&o, &g[h]), 0) << kvdex_errmsg();
    }
  }
  ~Ood() {
    for (auto &x : g) kvdex_gen_free(&x);
  }
  // K, V ([kv][n][d]) and Q ([q][n][d]) of tokens [t0, t0 + n), f16.
  void Block(uint64_t t0, uint32_t n, std::vector<uint16_t> *k, std::vector<uint16_t> *v,
             std::vector<uint16_t> *q) const {
    std::vector<float> kf((size_t)kKv * n * kDim), vf(kf.size()), qf((size_t)kQ * n * kDim);
    for (uint32_t h = 0; h < kKv; h++) {
      memcpy(&kf[(size_t)h * n * kDim], g[h].keys + t0 * kDim, (size_t)n * kDim * 4);
      memcpy(&vf[(size_t)h * n * kDim], g[h].values + t0 * kDim, (size_t)n * kDim * 4);
    }
    for (uint32_t qh = 0; qh < kQ; qh++) {
      const kvdex_gen_data &d = g[qh / kGroup];
      size_t base = ((size_t)(qh % kGroup) * kN + t0) * kDim;  // this head's train rows
      memcpy(&qf[(size_t)qh * n * kDim], d.train + base, (size_t)n * kDim * 4);
    }
    *k = ToF16(kf.data(), kf.size());
    *v = ToF16(vf.data(), vf.size());
    *q = ToF16(qf.data(), qf.size());
  }
  // Decode query j for every query head: [kQ][kDim] f32.
  std::vector<float> Query(uint32_t j) const {
    std::vector<float> q((size_t)kQ * kDim);
    for (uint32_t qh = 0; qh < kQ; qh++)
      memcpy(&q[(size_t)qh * kDim], g[qh / kGroup].test + (size_t)((j + qh) % kTests) * kDim,
             kDim * 4);
    return q;
  }
};

const Ood &Data() {
  static Ood *d = new Ood(5);
  return *d;
}

void ResetErr() { kvdex__seterr(0, "%s", ""); }

// Appends tokens [t0, t0 + n) of `layer` with their prefill queries (with_q) in
// chunks of `chunk` tokens, one stream.
int AppendOod(kvdex_db *db, const char *id, uint32_t layer, uint64_t t0, uint64_t n,
              bool with_q = true, uint32_t chunk = 4096) {
  kvdex_appender *ap = nullptr;
  int rc = kvdex_append_begin(db, id, &ap);
  for (uint64_t t = t0; rc == 0 && t < t0 + n; t += chunk) {
    uint32_t m = (uint32_t)std::min<uint64_t>(chunk, t0 + n - t);
    std::vector<uint16_t> k, v, q;
    Data().Block(t, m, &k, &v, &q);
    rc = kvdex_append_kvq(ap, layer, t, m, k.data(), v.data(), with_q ? q.data() : nullptr);
    if (rc) {
      kvdex_append_commit(ap, nullptr);
      return rc;
    }
  }
  return kvdex_append_commit(ap, nullptr);
}

struct Info {
  int rc = -1;
  kvdex_seq_info i{};
  Info(kvdex_db *db, const char *id) { rc = kvdex_stat(db, id, &i); }
  ~Info() { kvdex_seq_info_free(&i); }
  const kvdex_layer_index *Layer(uint32_t l) const {
    for (uint32_t j = 0; j < i.n_indexes; j++)
      if (i.indexes[j].layer == l) return &i.indexes[j];
    return nullptr;
  }
};

// Polls until the layer's latest build is no longer BUILDING; returns a copy.
kvdex_layer_index WaitBuilt(kvdex_db *db, const char *id, uint32_t layer) {
  auto end = std::chrono::steady_clock::now() + std::chrono::seconds(600);
  for (;;) {
    Info s(db, id);
    EXPECT_EQ(s.rc, 0) << kvdex_errmsg();
    const kvdex_layer_index *li = s.Layer(layer);
    EXPECT_NE(li, nullptr) << "layer " << layer << " has no index state";
    if (!li) return kvdex_layer_index{};
    if (li->state != KVDEX_INDEX_BUILDING || std::chrono::steady_clock::now() > end) return *li;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

struct Result {
  int rc;
  std::vector<std::vector<uint64_t>> ids;  // per q head
  std::vector<std::vector<float>> scores;
  uint64_t keys_scanned = 0, tokens = 0;
  std::string index;
};

Result Search(kvdex_db *db, const char *id, uint32_t layer, const std::vector<float> &q,
              uint32_t k, const char *index, uint32_t sinks = 0, uint32_t window = 0,
              uint32_t nprobe = 0, uint32_t ef = 0) {
  kvdex_search_req req{};
  req.k = k;
  req.sinks = sinks;
  req.window = window;
  req.index = index;
  req.nprobe = nprobe;
  req.ef = ef;
  const char *ids[1] = {id};
  const float *qs[1] = {q.data()};
  kvdex_search_out out{};
  Result r;
  r.rc = kvdex_search(db, layer, &req, 1, ids, qs, &out);
  if (r.rc) return r;
  for (uint32_t h = 0; h < out.n_q_heads; h++) {
    r.ids.emplace_back(out.heads[h].ids, out.heads[h].ids + out.heads[h].n);
    r.scores.emplace_back(out.heads[h].scores, out.heads[h].scores + out.heads[h].n);
  }
  r.keys_scanned = out.keys_scanned;
  r.tokens = out.tokens;
  r.index = out.index;
  kvdex_search_out_free(&out);
  return r;
}

double Recall(const std::vector<uint64_t> &got, const std::vector<uint64_t> &want) {
  if (want.empty()) return 1.0;
  std::set<uint64_t> w(want.begin(), want.end());
  size_t hit = 0;
  for (uint64_t x : got) hit += w.count(x);
  return (double)hit / want.size();
}

class BuildIndex : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    kvdex_open_opts o{};
    o.memory_cap = kCap;
    o.threads = 2;
    o.timeout_ms = 60000;
    if (GetParam() == "grpc") {
      ASSERT_EQ(kvdex_store_create(kCap, &store_), 0) << kvdex_errmsg();
      ASSERT_EQ(kvdex_pool_create(2, &pool_), 0) << kvdex_errmsg();
      kvdex_server_opts so{};
      so.listen = "127.0.0.1:0";
      so.threads = 3;
      ASSERT_EQ(kvdex_server_start(store_, pool_, &so, &srv_), 0) << kvdex_errmsg();
      uri_ = "grpc://127.0.0.1:" + std::to_string(kvdex_server_port(srv_));
    } else {
      uri_ = "local:";
    }
    ASSERT_EQ(kvdex_open(uri_.c_str(), &o, &db_), 0) << kvdex_errmsg();
  }
  void TearDown() override {
    kvdex_close(db_);
    kvdex_server_stop(srv_, 1000);
    kvdex_pool_destroy(pool_);
    kvdex_store_destroy(store_);
  }
  bool grpc() const { return GetParam() == "grpc"; }

  // Bytes the node holds: the sum over its sequences (what the store accounts).
  uint64_t NodeBytes() {
    char **ids = nullptr;
    size_t n = 0;
    EXPECT_EQ(kvdex_list(db_, &ids, &n), 0) << kvdex_errmsg();
    uint64_t sum = 0;
    for (size_t i = 0; i < n; i++) {
      Info s(db_, ids[i]);
      if (s.rc == 0) sum += s.i.bytes;
    }
    kvdex_list_free(ids, n);
    if (store_) {  // grpc: the server's store must agree
      kvdex_store_stats st;
      kvdex_store_stats_get(store_, &st);
      EXPECT_EQ(st.bytes_used, sum);
    }
    return sum;
  }

  // A sequence with the OOD data in layer 0 (and, optionally, layer 1).
  void MakeOod(const char *id, uint32_t layers = 1, bool with_q = true) {
    kvdex_shape s = Shape(layers);
    ASSERT_EQ(kvdex_create(db_, id, &s), 0) << kvdex_errmsg();
    ASSERT_EQ(AppendOod(db_, id, 0, 0, kN, with_q), 0) << kvdex_errmsg();
  }

  kvdex_store *store_ = nullptr;
  kvdex_pool *pool_ = nullptr;
  kvdex_server *srv_ = nullptr;
  kvdex_db *db_ = nullptr;
  std::string uri_;
};

// ---- the main flow ------------------------------------------------------------------

TEST_P(BuildIndex, BuildingThenReadyAndAutoSearchHasHighRecall) {
  MakeOod("ood");
  {
    Info s(db_, "ood");
    ASSERT_EQ(s.rc, 0);
    ASSERT_NE(s.i.layer_query_tokens, nullptr);
    EXPECT_EQ(s.i.layer_query_tokens[0], (uint64_t)KVDEX_MAX_QUERY_TOKENS);  // stride 4
    EXPECT_EQ(s.i.n_indexes, 0u);
  }
  uint64_t bytes0 = Info(db_, "ood").i.bytes;
  const char *spec = "ivf:nlist=128,nprobe=16";
  ASSERT_EQ(kvdex_build_index(db_, "ood", 0, spec), 0) << kvdex_errmsg();
  {
    Info s(db_, "ood");
    const kvdex_layer_index *li = s.Layer(0);
    ASSERT_NE(li, nullptr);
    EXPECT_TRUE(li->state == KVDEX_INDEX_BUILDING || li->state == KVDEX_INDEX_READY) << li->state;
    EXPECT_STREQ(li->spec, spec);
  }
  kvdex_layer_index li = WaitBuilt(db_, "ood", 0);
  ASSERT_EQ(li.state, KVDEX_INDEX_READY) << li.error;
  EXPECT_STREQ(li.kind, "ivf");
  EXPECT_EQ(std::string(li.describe).rfind("ivf:nlist=128,nprobe=16", 0), 0u) << li.describe;
  EXPECT_EQ(li.tokens, kN);
  EXPECT_GT(li.build_seconds, 0.0);
  EXPECT_GE(li.memory_bytes, kKv * kN * kDim * 4);  // FAISS's f32 copy of the keys
  EXPECT_STREQ(li.error, "");
  EXPECT_EQ(Info(db_, "ood").i.bytes, bytes0 + li.memory_bytes);  // counted in the sequence

  double rec_auto = 0, rec_named = 0;
  uint64_t scanned = 0;
  for (uint32_t j = 0; j < kTests; j++) {
    std::vector<float> q = Data().Query(j);
    Result ex = Search(db_, "ood", 0, q, 10, "exact");
    Result au = Search(db_, "ood", 0, q, 10, "auto");
    Result nm = Search(db_, "ood", 0, q, 10, "ivf");
    ASSERT_EQ(ex.rc, 0) << kvdex_errmsg();
    ASSERT_EQ(au.rc, 0) << kvdex_errmsg();
    ASSERT_EQ(nm.rc, 0) << kvdex_errmsg();
    EXPECT_EQ(ex.index, "exact");
    EXPECT_EQ(au.index, "ivf");
    EXPECT_EQ(nm.index, "ivf");
    EXPECT_EQ(ex.keys_scanned, kKv * kN);
    EXPECT_EQ(au.tokens, kN);
    EXPECT_LT(au.keys_scanned, kN);  // all 4 query heads together touch fewer than n keys
    scanned += au.keys_scanned;
    for (uint32_t h = 0; h < kQ; h++) {
      ASSERT_EQ(au.ids[h].size(), 10u);
      rec_auto += Recall(au.ids[h], ex.ids[h]);
      rec_named += Recall(nm.ids[h], ex.ids[h]);
      for (size_t i = 1; i < au.scores[h].size(); i++) EXPECT_GE(au.scores[h][i - 1], au.scores[h][i]);
    }
  }
  rec_auto /= kTests * kQ;
  rec_named /= kTests * kQ;
  printf("  [%s] ivf recall@10 %.3f, keys scanned per search %.0f of %llu tokens\n",
         GetParam().c_str(), rec_auto, (double)scanned / kTests, (unsigned long long)kN);
  EXPECT_GE(rec_auto, 0.85);
  EXPECT_DOUBLE_EQ(rec_auto, rec_named);

  // Search-time override: probing every list is an exact scan.
  std::vector<float> q = Data().Query(3);
  Result ex = Search(db_, "ood", 0, q, 10, "exact");
  Result all = Search(db_, "ood", 0, q, 10, "auto", 0, 0, /*nprobe=*/128);
  ASSERT_EQ(all.rc, 0) << kvdex_errmsg();
  for (uint32_t h = 0; h < kQ; h++) EXPECT_DOUBLE_EQ(Recall(all.ids[h], ex.ids[h]), 1.0) << h;
  EXPECT_GE(all.keys_scanned, kQ * kN);

  // Another kind was not built: FAILED_PRECONDITION-style, with a message.
  ResetErr();
  EXPECT_EQ(Search(db_, "ood", 0, q, 10, "hnsw").rc, KVDEX_ECONFLICT);
  EXPECT_NE(std::string(kvdex_errmsg()).find("hnsw"), std::string::npos) << kvdex_errmsg();
}

// An attention-aware graph, when this build has the kind: it gets the prefill queries.
TEST_P(BuildIndex, GraphUsesThePrefillQueries) {
  kvdex_index *probe = nullptr;
  if (kvdex_index_create("graph", &probe) != 0) GTEST_SKIP() << "no graph kind in this build";
  kvdex_index_destroy(probe);
  MakeOod("g");
  ASSERT_EQ(kvdex_build_index(db_, "g", 0, "graph"), 0) << kvdex_errmsg();
  kvdex_layer_index li = WaitBuilt(db_, "g", 0);
  ASSERT_EQ(li.state, KVDEX_INDEX_READY) << li.error;
  EXPECT_STREQ(li.kind, "graph");
  EXPECT_EQ(std::string(li.describe).find("no prefill queries"), std::string::npos) << li.describe;
  double rec = 0;
  for (uint32_t j = 0; j < kTests; j++) {
    std::vector<float> q = Data().Query(j);
    Result ex = Search(db_, "g", 0, q, 10, "exact");
    Result au = Search(db_, "g", 0, q, 10, "auto");
    ASSERT_EQ(au.rc, 0) << kvdex_errmsg();
    EXPECT_EQ(au.index, "graph");
    EXPECT_LT(au.keys_scanned, kN);
    for (uint32_t h = 0; h < kQ; h++) rec += Recall(au.ids[h], ex.ids[h]);
  }
  rec /= kTests * kQ;
  printf("  [%s] graph recall@10 %.3f\n", GetParam().c_str(), rec);
  EXPECT_GE(rec, 0.8);
}

// ---- tokens after the build; sinks and window -------------------------------------------

TEST_P(BuildIndex, TokensAppendedAfterTheBuildAreFoundAndExclusionsApply) {
  MakeOod("tail");
  ASSERT_EQ(kvdex_build_index(db_, "tail", 0, "hnsw:M=16,ef=64"), 0) << kvdex_errmsg();
  ASSERT_EQ(WaitBuilt(db_, "tail", 0).state, KVDEX_INDEX_READY);

  // 40 new tokens; token kN + 17 is planted as the clear top-1 of query head 1's query.
  std::vector<float> q = Data().Query(1);
  const uint32_t extra = 40, planted = 17;
  std::vector<float> kf((size_t)kKv * extra * kDim), vf(kf.size());
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 0.3f);
  for (auto &x : kf) x = nd(rng);
  for (auto &x : vf) x = nd(rng);
  double qq = 0;
  for (uint32_t d = 0; d < kDim; d++) qq += (double)q[kDim + d] * q[kDim + d];
  for (uint32_t d = 0; d < kDim; d++)  // kv head 0 serves query heads 0 and 1
    kf[(size_t)planted * kDim + d] = (float)(q[kDim + d] * 600.0 / qq);
  std::vector<uint16_t> k = ToF16(kf.data(), kf.size()), v = ToF16(vf.data(), vf.size());
  kvdex_appender *ap = nullptr;
  ASSERT_EQ(kvdex_append_begin(db_, "tail", &ap), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_append_kv(ap, 0, kN, extra, k.data(), v.data()), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_append_commit(ap, nullptr), 0) << kvdex_errmsg();
  const uint64_t n = kN + extra, needle = kN + planted;

  Result r = Search(db_, "tail", 0, q, 10, "auto");
  ASSERT_EQ(r.rc, 0) << kvdex_errmsg();
  EXPECT_EQ(r.index, "hnsw");
  EXPECT_EQ(r.tokens, n);
  ASSERT_FALSE(r.ids[1].empty());
  EXPECT_EQ(r.ids[1][0], needle) << "the planted tail token must be the top-1";
  Result ex = Search(db_, "tail", 0, q, 10, "exact");
  EXPECT_EQ(ex.ids[1][0], needle);
  EXPECT_NEAR(r.scores[1][0], ex.scores[1][0], 1e-3 * std::fabs(ex.scores[1][0]));
  EXPECT_LT(r.keys_scanned, kN);
  EXPECT_GE(r.keys_scanned, kKv * extra);  // the tail is scanned for both kv heads
  // Info still says what the index covers.
  EXPECT_EQ(WaitBuilt(db_, "tail", 0).tokens, kN);

  // Window over the planted token: it is excluded, like every index hit in the window.
  const uint32_t sinks = 3000, window = 30;
  r = Search(db_, "tail", 0, q, 50, "auto", sinks, window);
  ASSERT_EQ(r.rc, 0) << kvdex_errmsg();
  for (uint32_t h = 0; h < kQ; h++) {
    EXPECT_EQ(r.ids[h].size(), 50u);
    for (uint64_t id : r.ids[h]) {
      EXPECT_GE(id, sinks) << "head " << h;
      EXPECT_LT(id, n - window) << "head " << h;
    }
  }
  // With sinks covering almost everything, the result is exact over what is left.
  r = Search(db_, "tail", 0, q, 5, "auto", (uint32_t)(n - 8), 0);
  ex = Search(db_, "tail", 0, q, 5, "exact", (uint32_t)(n - 8), 0);
  ASSERT_EQ(r.rc, 0);
  for (uint32_t h = 0; h < kQ; h++) EXPECT_EQ(r.ids[h], ex.ids[h]) << h;
  // No eligible token at all.
  r = Search(db_, "tail", 0, q, 5, "auto", (uint32_t)n, 0);
  ASSERT_EQ(r.rc, 0);
  for (uint32_t h = 0; h < kQ; h++) EXPECT_TRUE(r.ids[h].empty());
}

// ---- concurrency ------------------------------------------------------------------------

TEST_P(BuildIndex, SearchesDuringBuildAndRebuildAreCorrect) {
  MakeOod("conc");
  std::vector<std::vector<float>> qs;
  std::vector<Result> exact;
  for (uint32_t j = 0; j < 6; j++) {
    qs.push_back(Data().Query(j));
    exact.push_back(Search(db_, "conc", 0, qs.back(), 10, "exact"));
    ASSERT_EQ(exact.back().rc, 0);
  }
  std::atomic<bool> stop{false};
  std::atomic<int> served_exact{0}, served_index{0}, failures{0};
  std::vector<std::thread> th;
  for (int t = 0; t < 2; t++)
    th.emplace_back([&, t] {
      for (uint32_t i = t; !stop.load(); i++) {
        uint32_t j = i % qs.size();
        Result r = Search(db_, "conc", 0, qs[j], 10, "auto");
        if (r.rc) {
          failures++;
          continue;
        }
        if (r.index == "exact") {  // before the index is ready: exactly the exact result
          served_exact++;
          if (r.ids != exact[j].ids) failures++;
        } else {
          served_index++;
          if (r.index != "ivf" && r.index != "hnsw") failures++;
          for (auto &h : r.ids)
            if (h.size() != 10) failures++;
        }
      }
    });
  ASSERT_EQ(kvdex_build_index(db_, "conc", 0, "ivf:nlist=64,nprobe=8"), 0) << kvdex_errmsg();
  EXPECT_EQ(WaitBuilt(db_, "conc", 0).state, KVDEX_INDEX_READY);
  uint64_t mem_ivf = WaitBuilt(db_, "conc", 0).memory_bytes;
  uint64_t bytes_ivf = Info(db_, "conc").i.bytes;
  // A rebuild with another kind replaces the index atomically while searches run.
  ASSERT_EQ(kvdex_build_index(db_, "conc", 0, "hnsw:M=8,efc=40"), 0) << kvdex_errmsg();
  kvdex_layer_index li = WaitBuilt(db_, "conc", 0);
  EXPECT_EQ(li.state, KVDEX_INDEX_READY) << li.error;
  EXPECT_STREQ(li.kind, "hnsw");
  // The old index's bytes went back once no search held it (poll: a search may still).
  uint64_t want = bytes_ivf - mem_ivf + li.memory_bytes;
  for (int i = 0; i < 500 && Info(db_, "conc").i.bytes != want; i++)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(Info(db_, "conc").i.bytes, want);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  stop = true;
  for (auto &t : th) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(served_index.load(), 0);
  printf("  [%s] searches served exact %d, by an index %d\n", GetParam().c_str(),
         served_exact.load(), served_index.load());
  Result r = Search(db_, "conc", 0, qs[0], 10, "auto");
  EXPECT_EQ(r.index, "hnsw");
}

TEST_P(BuildIndex, SecondBuildOfABusyLayerIsEbusy) {
  MakeOod("busy", 2);
  ASSERT_EQ(AppendOod(db_, "busy", 1, 0, 2048), 0) << kvdex_errmsg();
  // One build thread: layer 0's slow build runs, layer 1's waits behind it.
  ASSERT_EQ(kvdex_build_index(db_, "busy", 0, "hnsw:M=32,efc=200"), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_build_index(db_, "busy", 1, "landmark"), 0) << kvdex_errmsg();
  ResetErr();
  int rc = kvdex_build_index(db_, "busy", 1, "landmark:mode=mean");
  if (rc == 0) {  // only if both builds finished in between (a very fast machine)
    EXPECT_EQ(WaitBuilt(db_, "busy", 0).state, KVDEX_INDEX_READY);
  } else {
    EXPECT_EQ(rc, KVDEX_EBUSY);
    EXPECT_NE(std::string(kvdex_errmsg()).find("in progress"), std::string::npos) << kvdex_errmsg();
    // Nothing of the refused request was queued: layer 1 keeps its first spec.
    EXPECT_STREQ(WaitBuilt(db_, "busy", 1).spec, "landmark");
  }
  EXPECT_EQ(WaitBuilt(db_, "busy", 0).state, KVDEX_INDEX_READY);
  kvdex_layer_index l1 = WaitBuilt(db_, "busy", 1);
  EXPECT_EQ(l1.state, KVDEX_INDEX_READY) << l1.error;
  EXPECT_STREQ(l1.kind, "landmark");
  EXPECT_EQ(l1.tokens, 2048u);
}

// ---- errors -------------------------------------------------------------------------------

TEST_P(BuildIndex, BadRequestsAreRefusedWithAMessage) {
  kvdex_shape s = Shape(3, 1, 2, 16, KVDEX_DTYPE_F32, 8);
  ASSERT_EQ(kvdex_create(db_, "small", &s), 0) << kvdex_errmsg();
  std::vector<float> k(1 * 100 * 16), v(k.size()), q(2 * 100 * 16);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1, 1);
  for (auto &x : k) x = u(rng);
  for (auto &x : v) x = u(rng);
  for (auto &x : q) x = u(rng);
  kvdex_appender *ap = nullptr;
  ASSERT_EQ(kvdex_append_begin(db_, "small", &ap), 0);
  ASSERT_EQ(kvdex_append_kvq(ap, 0, 0, 100, k.data(), v.data(), q.data()), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_append_commit(ap, nullptr), 0) << kvdex_errmsg();
  EXPECT_EQ(Info(db_, "small").i.layer_query_tokens[0], 100u);

  struct Bad {
    const char *spec;
    uint32_t layer;
    int rc;
    const char *msg;
  } bad[] = {
      {"nope:x=1", 0, KVDEX_EINVAL, "unknown kind"},
      {"ivf:bogus=1", 0, KVDEX_EINVAL, "bogus"},
      {"hnsw:M=1", 0, KVDEX_EINVAL, "M"},
      {"", 0, KVDEX_EINVAL, "spec"},
      {"ivf", 3, KVDEX_EINVAL, "layer 3"},
      {"ivf", 1, KVDEX_ECONFLICT, "no committed tokens"},
      {"landmark:mode=given", 0, KVDEX_ECONFLICT, "no landmarks"},  // none were appended
  };
  for (const Bad &b : bad) {
    SCOPED_TRACE(std::string(b.spec) + " layer " + std::to_string(b.layer));
    ResetErr();
    EXPECT_EQ(kvdex_build_index(db_, "small", b.layer, b.spec), b.rc);
    EXPECT_NE(std::string(kvdex_errmsg()).find(b.msg), std::string::npos) << kvdex_errmsg();
  }
  ResetErr();
  EXPECT_EQ(kvdex_build_index(db_, "small", 0, nullptr), KVDEX_EINVAL);
  EXPECT_EQ(kvdex_build_index(db_, "nobody", 0, "ivf"), KVDEX_ENOTFOUND);
  EXPECT_STRNE(kvdex_errmsg(), "");
  EXPECT_EQ(kvdex_build_index(nullptr, "small", 0, "ivf"), KVDEX_EINVAL);
  EXPECT_EQ(Info(db_, "small").i.n_indexes, 0u);  // nothing was recorded

  // Search: an unknown kind is EINVAL, a known one that is not built ECONFLICT.
  std::vector<float> sq(2 * 16, 0.5f);
  ResetErr();
  EXPECT_EQ(Search(db_, "small", 0, sq, 3, "nope").rc, KVDEX_EINVAL);
  EXPECT_NE(std::string(kvdex_errmsg()).find("nope"), std::string::npos) << kvdex_errmsg();
  EXPECT_EQ(Search(db_, "small", 0, sq, 3, "ivf:nprobe=2").rc, KVDEX_EINVAL);
  ResetErr();
  EXPECT_EQ(Search(db_, "small", 0, sq, 3, "landmark").rc, KVDEX_ECONFLICT);
  EXPECT_NE(std::string(kvdex_errmsg()).find("no ready landmark index"), std::string::npos)
      << kvdex_errmsg();
  Result r = Search(db_, "small", 0, sq, 3, "auto");  // nothing built: exact
  ASSERT_EQ(r.rc, 0) << kvdex_errmsg();
  EXPECT_EQ(r.index, "exact");
  EXPECT_EQ(r.keys_scanned, 100u);

  // Queries of the wrong size are not possible through the C API (no sizes); queries
  // for tokens that are not there are (kvdex_append_kvq checks against the layer).
  // A build that fails in the background: FAILED with the reason, nothing else changes.
  // Landmarks of the 12 complete blocks of 8 tokens (a K/V replay carries them), then a
  // mode=given spec whose block disagrees with the sequence's.
  std::vector<float> lm(12 * 16, 0.5f);
  ASSERT_EQ(kvdex_append_begin(db_, "small", &ap), 0);
  ASSERT_EQ(kvdex_append_kvl(ap, 0, 0, 100, k.data(), v.data(), nullptr, lm.data()), 0)
      << kvdex_errmsg();
  ASSERT_EQ(kvdex_append_commit(ap, nullptr), 0) << kvdex_errmsg();
  EXPECT_EQ(Info(db_, "small").i.layer_landmark_blocks[0], 12u);
  uint64_t bytes = Info(db_, "small").i.bytes;
  ASSERT_EQ(kvdex_build_index(db_, "small", 0, "landmark:mode=given,block=4"), 0)
      << kvdex_errmsg();
  kvdex_layer_index li = WaitBuilt(db_, "small", 0);
  EXPECT_EQ(li.state, KVDEX_INDEX_FAILED);
  EXPECT_NE(std::string(li.error).find("INVALID_ARGUMENT"), std::string::npos) << li.error;
  EXPECT_NE(std::string(li.error).find("block=4"), std::string::npos) << li.error;
  EXPECT_STREQ(li.kind, "");
  EXPECT_EQ(li.memory_bytes, 0u);
  EXPECT_EQ(Info(db_, "small").i.bytes, bytes);
  // A good build after it; then a failing rebuild keeps the ready index in use.
  ASSERT_EQ(kvdex_build_index(db_, "small", 0, "landmark:blocks=4"), 0) << kvdex_errmsg();
  li = WaitBuilt(db_, "small", 0);
  ASSERT_EQ(li.state, KVDEX_INDEX_READY) << li.error;
  ASSERT_EQ(kvdex_build_index(db_, "small", 0, "landmark:mode=given,block=4"), 0);
  li = WaitBuilt(db_, "small", 0);
  EXPECT_EQ(li.state, KVDEX_INDEX_FAILED);
  EXPECT_STREQ(li.kind, "landmark");  // still ready and used
  EXPECT_STREQ(li.spec, "landmark:mode=given,block=4");
  EXPECT_EQ(Search(db_, "small", 0, sq, 3, "landmark").index, "landmark");
}

// ---- memory ---------------------------------------------------------------------------

TEST_P(BuildIndex, DeleteReturnsTheIndexMemoryAlsoDuringABuild) {
  uint64_t base = NodeBytes();
  MakeOod("del");
  uint64_t before = Info(db_, "del").i.bytes;
  ASSERT_EQ(kvdex_build_index(db_, "del", 0, "ivf:nlist=64"), 0) << kvdex_errmsg();
  kvdex_layer_index li = WaitBuilt(db_, "del", 0);
  ASSERT_EQ(li.state, KVDEX_INDEX_READY) << li.error;
  uint64_t after = Info(db_, "del").i.bytes;
  EXPECT_EQ(after, before + li.memory_bytes);
  EXPECT_EQ(NodeBytes(), base + after);
  uint64_t freed = 0;
  ASSERT_EQ(kvdex_delete(db_, "del", &freed), 0) << kvdex_errmsg();
  EXPECT_EQ(freed, after);
  EXPECT_EQ(NodeBytes(), base);

  // Delete while a build runs (and another is queued): no crash, no leak, and the
  // memory comes back once the build notices.
  MakeOod("del2", 2);
  ASSERT_EQ(AppendOod(db_, "del2", 1, 0, kN), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_build_index(db_, "del2", KVDEX_ALL_LAYERS, "hnsw:M=16"), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_delete(db_, "del2", nullptr), 0) << kvdex_errmsg();
  EXPECT_EQ(kvdex_build_index(db_, "del2", 0, "ivf"), KVDEX_ENOTFOUND);
  if (store_) {
    kvdex_store_stats st;
    for (int i = 0; i < 6000; i++) {
      kvdex_store_stats_get(store_, &st);
      if (st.bytes_used == base) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_EQ(st.bytes_used, base);
  }
  // (local: the handle's close waits for the build; LeakSanitizer checks the rest.)
  // The same id is usable at once.
  MakeOod("del2");
  EXPECT_EQ(Info(db_, "del2").i.n_indexes, 0u);
}

TEST_P(BuildIndex, AnIndexOverTheMemoryCapFailsAndChangesNothing) {
  MakeOod("cap");
  // How big is the index? Build it once, note its size, drop it with a delete.
  ASSERT_EQ(kvdex_build_index(db_, "cap", 0, "ivf:nlist=64"), 0);
  kvdex_layer_index li = WaitBuilt(db_, "cap", 0);
  ASSERT_EQ(li.state, KVDEX_INDEX_READY) << li.error;
  const uint64_t mem = li.memory_bytes;
  ASSERT_EQ(kvdex_delete(db_, "cap", nullptr), 0);
  MakeOod("cap");
  // Fill the node so that only half the index fits.
  uint64_t room = kCap - NodeBytes();
  ASSERT_GT(room, mem);
  kvdex_shape fs = Shape(1, 1, 1, 256, KVDEX_DTYPE_F32, 64);
  ASSERT_EQ(kvdex_create(db_, "filler", &fs), 0) << kvdex_errmsg();
  const uint64_t pair = 2ull * 64 * 256 * 4;  // one K+V block pair
  uint64_t blocks = (room - mem / 2) / pair;
  std::vector<float> fk(64 * 256, 0.25f);
  kvdex_appender *ap = nullptr;
  ASSERT_EQ(kvdex_append_begin(db_, "filler", &ap), 0);
  for (uint64_t b = 0; b + 2 < blocks; b++)  // a little below, for the pointer arrays
    ASSERT_EQ(kvdex_append_kv(ap, 0, b * 64, 64, fk.data(), fk.data()), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_append_commit(ap, nullptr), 0) << kvdex_errmsg();
  uint64_t left = kCap - NodeBytes();
  ASSERT_LT(left, mem);
  uint64_t bytes = Info(db_, "cap").i.bytes, node = NodeBytes();

  ASSERT_EQ(kvdex_build_index(db_, "cap", 0, "ivf:nlist=64"), 0) << kvdex_errmsg();
  li = WaitBuilt(db_, "cap", 0);
  EXPECT_EQ(li.state, KVDEX_INDEX_FAILED);
  EXPECT_EQ(std::string(li.error).rfind("RESOURCE_EXHAUSTED", 0), 0u) << li.error;
  EXPECT_NE(std::string(li.error).find("memory cap"), std::string::npos) << li.error;
  EXPECT_STREQ(li.kind, "");
  EXPECT_EQ(Info(db_, "cap").i.bytes, bytes);
  EXPECT_EQ(NodeBytes(), node);
  std::vector<float> q = Data().Query(0);
  Result r = Search(db_, "cap", 0, q, 10, "auto");
  ASSERT_EQ(r.rc, 0);
  EXPECT_EQ(r.index, "exact");

  // With room again, the same build succeeds.
  ASSERT_EQ(kvdex_delete(db_, "filler", nullptr), 0);
  ASSERT_EQ(kvdex_build_index(db_, "cap", 0, "ivf:nlist=64"), 0) << kvdex_errmsg();
  li = WaitBuilt(db_, "cap", 0);
  EXPECT_EQ(li.state, KVDEX_INDEX_READY) << li.error;
  EXPECT_EQ(li.memory_bytes, mem);
}

// ---- every layer ------------------------------------------------------------------------

TEST_P(BuildIndex, AllLayersBuildsEveryLayerThatHasTokens) {
  kvdex_shape s = Shape(3);
  ASSERT_EQ(kvdex_create(db_, "all", &s), 0);
  ASSERT_EQ(AppendOod(db_, "all", 0, 0, 3000, true, 1000), 0) << kvdex_errmsg();
  ASSERT_EQ(AppendOod(db_, "all", 2, 0, 2000, false), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_build_index(db_, "all", KVDEX_ALL_LAYERS, "landmark:mode=minmax,blocks=8"), 0)
      << kvdex_errmsg();
  kvdex_layer_index l0 = WaitBuilt(db_, "all", 0), l2 = WaitBuilt(db_, "all", 2);
  EXPECT_EQ(l0.state, KVDEX_INDEX_READY) << l0.error;
  EXPECT_EQ(l2.state, KVDEX_INDEX_READY) << l2.error;
  EXPECT_EQ(l0.tokens, 3000u);
  EXPECT_EQ(l2.tokens, 2000u);
  Info info(db_, "all");
  EXPECT_EQ(info.i.n_indexes, 2u);
  EXPECT_EQ(info.Layer(1), nullptr);  // no tokens: not built
  EXPECT_EQ(info.i.layer_query_tokens[0], 3000u);
  EXPECT_EQ(info.i.layer_query_tokens[2], 0u);
  for (uint32_t layer : {0u, 2u}) {
    std::vector<float> q = Data().Query(2);
    Result r = Search(db_, "all", layer, q, 10, "auto");
    ASSERT_EQ(r.rc, 0) << kvdex_errmsg();
    EXPECT_EQ(r.index, "landmark");
    EXPECT_LT(r.keys_scanned, kQ * (uint64_t)info.i.layer_tokens[layer]);
  }
  kvdex_shape e = Shape(2);
  ASSERT_EQ(kvdex_create(db_, "empty", &e), 0);
  ResetErr();
  EXPECT_EQ(kvdex_build_index(db_, "empty", KVDEX_ALL_LAYERS, "ivf"), KVDEX_ECONFLICT);
  EXPECT_NE(std::string(kvdex_errmsg()).find("no layer"), std::string::npos) << kvdex_errmsg();
}

// Closing the handle / stopping the server while builds run and wait: the running
// one finishes its current kv head, the queued ones are cancelled; nothing leaks
// (LeakSanitizer) and nothing is touched after the store is gone (ASan).
TEST_P(BuildIndex, StopDuringBuildsIsClean) {
  MakeOod("stop", 3);
  ASSERT_EQ(AppendOod(db_, "stop", 1, 0, kN, false), 0) << kvdex_errmsg();
  ASSERT_EQ(AppendOod(db_, "stop", 2, 0, kN, false), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_build_index(db_, "stop", KVDEX_ALL_LAYERS, "hnsw:M=32,efc=200"), 0)
      << kvdex_errmsg();
  Info s(db_, "stop");
  ASSERT_EQ(s.i.n_indexes, 3u);
  for (uint32_t l = 0; l < 3; l++) EXPECT_NE(s.Layer(l)->state, KVDEX_INDEX_NONE);
  // TearDown closes / stops now, with the builds in flight.
}

INSTANTIATE_TEST_SUITE_P(Transports, BuildIndex, ::testing::Values("local", "grpc"),
                         [](const ::testing::TestParamInfo<std::string> &i) { return i.param; });

}  // namespace
