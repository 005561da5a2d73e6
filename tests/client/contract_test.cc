// The contract of the public C API (client/kvdex.h), run once per transport:
// "local:" (embedded store) and "grpc://127.0.0.1:<port>" against an in-process
// kvdex server (workers/server.h) started by the fixture. Every case checks real
// answers: bytes read back, search results against a brute-force top-k computed
// here, return codes and messages. No timing assertions.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include <kvdex/kvdex.h>

#include "index/index.h"
#include "kvstore/kvstore.h"
#include "workers/server.h"

namespace {

// The node memory cap of both transports: opts.memory_cap for "local:", the
// server's store cap for "grpc://".
constexpr uint64_t kCap = 48ull << 20;

kvdex_shape Shape(uint32_t layers, uint32_t kv, uint32_t q, uint32_t dim, int dtype,
                  uint32_t block = 4) {
  kvdex_shape s{};
  s.n_layers = layers;
  s.n_kv_heads = kv;
  s.n_q_heads = q;
  s.head_dim = dim;
  s.block_tokens = block;
  s.dtype = dtype;
  return s;
}

void ResetErr() { kvdex__seterr(0, "%s", ""); }

// A sequence's contents as the test knows them: K and V of every layer as
// [n_kv_heads][capacity][head_dim] elements of the sequence dtype.
struct Model {
  kvdex_shape shape;
  size_t cap;
  size_t esize;
  std::vector<std::vector<uint8_t>> k, v;  // per layer

  Model(const kvdex_shape &s, size_t capacity, uint32_t seed) : shape(s), cap(capacity) {
    esize = kvdex_dtype_size(s.dtype);
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    std::vector<float> f((size_t)s.n_kv_heads * cap * s.head_dim);
    for (uint32_t l = 0; l < s.n_layers; l++) {
      for (int which = 0; which < 2; which++) {
        for (auto &x : f) x = u(rng);
        std::vector<uint8_t> bytes(f.size() * esize);
        kvdex__from_f32(s.dtype, f.data(), bytes.data(), f.size());
        (which ? v : k).push_back(std::move(bytes));
      }
    }
  }
  size_t row() const { return (size_t)shape.head_dim * esize; }
  // K or V rows [t0, t0 + n) of `layer`, all heads: [n_kv_heads][n][head_dim].
  std::vector<uint8_t> Block(uint32_t layer, size_t t0, size_t n, bool is_v) const {
    const std::vector<uint8_t> &src = is_v ? v[layer] : k[layer];
    std::vector<uint8_t> out((size_t)shape.n_kv_heads * n * row());
    for (size_t h = 0; h < shape.n_kv_heads; h++)
      memcpy(&out[h * n * row()], &src[(h * cap + t0) * row()], n * row());
    return out;
  }
  // Rows of the given token ids, [n_kv_heads][ids.size()][head_dim].
  std::vector<uint8_t> Gather(uint32_t layer, const std::vector<uint64_t> &ids, bool is_v) const {
    const std::vector<uint8_t> &src = is_v ? v[layer] : k[layer];
    std::vector<uint8_t> out((size_t)shape.n_kv_heads * ids.size() * row());
    for (size_t h = 0; h < shape.n_kv_heads; h++)
      for (size_t i = 0; i < ids.size(); i++)
        memcpy(&out[(h * ids.size() + i) * row()], &src[(h * cap + ids[i]) * row()], row());
    return out;
  }
  float KeyElem(uint32_t layer, size_t head, size_t t, size_t d) const {
    float f;
    kvdex__to_f32(shape.dtype, &k[layer][((head * cap + t) * shape.head_dim + d) * esize], &f, 1);
    return f;
  }
  // Overwrites one key row (all dims) of the model with f32 values.
  void SetKey(uint32_t layer, size_t head, size_t t, const std::vector<float> &vals) {
    kvdex__from_f32(shape.dtype, vals.data(), &k[layer][(head * cap + t) * row()], vals.size());
  }
};

struct Hit {
  uint64_t id;
  double score;
};

// Brute-force top-k of one query head over tokens [sinks, n - window).
std::vector<Hit> BruteTopK(const Model &m, uint32_t layer, uint64_t n_tokens, const float *q,
                           uint32_t qhead, uint32_t k, uint32_t sinks, uint32_t window) {
  uint32_t group = m.shape.n_q_heads / m.shape.n_kv_heads;
  uint32_t kv = qhead / group;
  std::vector<Hit> all;
  uint64_t end = window >= n_tokens ? 0 : n_tokens - window;
  for (uint64_t t = sinks; t < end; t++) {
    double s = 0;
    for (uint32_t d = 0; d < m.shape.head_dim; d++)
      s += (double)q[(size_t)qhead * m.shape.head_dim + d] * m.KeyElem(layer, kv, t, d);
    all.push_back({t, s});
  }
  std::sort(all.begin(), all.end(), [](const Hit &a, const Hit &b) {
    return a.score > b.score || (a.score == b.score && a.id < b.id);
  });
  if (all.size() > k) all.resize(k);
  return all;
}

// Checks one kvdex_search_out against the brute force, with a float tolerance:
// same count, scores equal within tol position by position, every returned id's
// true score equal to the reported one, ids equal wherever the reference has no
// near-tie, equal reported scores ordered by ascending id.
void ExpectMatchesBrute(const Model &m, uint32_t layer, uint64_t n_tokens, const float *q,
                        const kvdex_search_req &req, const kvdex_search_out &out,
                        const std::string &what) {
  SCOPED_TRACE(what);
  ASSERT_EQ(out.n_q_heads, m.shape.n_q_heads);
  ASSERT_NE(out.heads, nullptr);
  EXPECT_EQ(out.tokens, n_tokens);
  for (uint32_t h = 0; h < m.shape.n_q_heads; h++) {
    SCOPED_TRACE("q head " + std::to_string(h));
    std::vector<Hit> ref = BruteTopK(m, layer, n_tokens, q, h, req.k, req.sinks, req.window);
    const kvdex_hits &got = out.heads[h];
    ASSERT_EQ(got.n, ref.size());
    std::vector<Hit> full = BruteTopK(m, layer, n_tokens, q, h, UINT32_MAX, req.sinks, req.window);
    for (uint32_t i = 0; i < got.n; i++) {
      double tol = 1e-4 * (1.0 + std::fabs(ref[i].score));
      EXPECT_NEAR(got.scores[i], ref[i].score, tol) << "rank " << i;
      auto it = std::find_if(full.begin(), full.end(),
                             [&](const Hit &x) { return x.id == got.ids[i]; });
      ASSERT_NE(it, full.end()) << "id " << got.ids[i] << " is not an eligible token";
      EXPECT_NEAR(got.scores[i], it->score, tol) << "id " << got.ids[i];
      bool near_tie = (i > 0 && std::fabs(ref[i].score - ref[i - 1].score) < 2 * tol) ||
                      (i + 1 < full.size() && std::fabs(ref[i].score - full[i + 1].score) < 2 * tol);
      if (!near_tie) {
        EXPECT_EQ(got.ids[i], ref[i].id) << "rank " << i;
      }
      if (i > 0) {
        EXPECT_GE(got.scores[i - 1], got.scores[i]) << "rank " << i;
        if (got.scores[i - 1] == got.scores[i]) {
          EXPECT_LT(got.ids[i - 1], got.ids[i]) << "rank " << i;
        }
      }
    }
  }
}

std::vector<float> RandomQuery(const kvdex_shape &s, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> q((size_t)s.n_q_heads * s.head_dim);
  for (auto &x : q) x = u(rng);
  return q;
}

struct Piece {
  uint32_t layer;
  uint64_t t0;
  uint32_t n;
};

// One append stream of the given pieces of the model. Returns the first failure;
// when an append_kv fails, commit must report the same code. Over gRPC a previous
// stream that was aborted or refused may still be winding down on the server (it
// learns of the cancel asynchronously), so KVDEX_EBUSY is retried for a while.
int AppendPieces(kvdex_db *db, const char *id, const Model &m, const std::vector<Piece> &pieces,
                 uint64_t *appended = nullptr) {
  for (int attempt = 0;; attempt++) {
    kvdex_appender *ap = nullptr;
    int rc = kvdex_append_begin(db, id, &ap);
    for (size_t i = 0; rc == 0 && i < pieces.size(); i++) {
      const Piece &p = pieces[i];
      std::vector<uint8_t> k = m.Block(p.layer, p.t0, p.n, false);
      std::vector<uint8_t> v = m.Block(p.layer, p.t0, p.n, true);
      rc = kvdex_append_kv(ap, p.layer, p.t0, p.n, k.data(), v.data());
      if (rc) {
        EXPECT_STRNE(kvdex_errmsg(), "");
        int rc2 = kvdex_append_commit(ap, appended);
        EXPECT_EQ(rc2, rc) << "commit after a failed append_kv must report it";
        ap = nullptr;
      }
    }
    if (rc == 0) rc = kvdex_append_commit(ap, appended);
    if (rc == KVDEX_EBUSY && attempt < 500) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    return rc;
  }
}

std::vector<uint64_t> LayerTokens(kvdex_db *db, const char *id) {
  kvdex_seq_info info;
  int rc = kvdex_stat(db, id, &info);
  EXPECT_EQ(rc, 0) << kvdex_errmsg();
  std::vector<uint64_t> out;
  if (rc == 0) out.assign(info.layer_tokens, info.layer_tokens + info.n_layers);
  kvdex_seq_info_free(&info);
  return out;
}

// Reads tokens [0, n) of every layer and compares them byte for byte with the model.
void ExpectStored(kvdex_db *db, const char *id, const Model &m, const std::vector<uint64_t> &n) {
  for (uint32_t l = 0; l < m.shape.n_layers; l++) {
    SCOPED_TRACE("layer " + std::to_string(l));
    if (n[l] == 0) continue;
    std::vector<uint64_t> ids(n[l]);
    for (size_t i = 0; i < ids.size(); i++) ids[i] = i;
    std::vector<uint8_t> k(m.shape.n_kv_heads * ids.size() * m.row()), v(k.size());
    ASSERT_EQ(kvdex_read(db, id, l, ids.data(), ids.size(), k.data(), v.data()), 0)
        << kvdex_errmsg();
    EXPECT_TRUE(k == m.Gather(l, ids, false)) << "K differs";
    EXPECT_TRUE(v == m.Gather(l, ids, true)) << "V differs";
  }
}

class Contract : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    kvdex_open_opts o{};
    o.memory_cap = kCap;
    o.threads = 2;
    o.timeout_ms = 30000;
    if (GetParam() == "grpc") {
      ASSERT_EQ(kvdex_store_create(kCap, &store_), 0) << kvdex_errmsg();
      ASSERT_EQ(kvdex_pool_create(2, &pool_), 0) << kvdex_errmsg();
      kvdex_server_opts so{};
      so.listen = "127.0.0.1:0";
      so.threads = 2;
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

  void Create(const char *id, const kvdex_shape &s) {
    ASSERT_EQ(kvdex_create(db_, id, &s), 0) << kvdex_errmsg();
  }

  kvdex_store *store_ = nullptr;
  kvdex_pool *pool_ = nullptr;
  kvdex_server *srv_ = nullptr;
  kvdex_db *db_ = nullptr;
  std::string uri_;
};

// ---- sequences -------------------------------------------------------------------

TEST_P(Contract, CreateStatListDelete) {
  kvdex_shape s = Shape(3, 2, 8, 16, KVDEX_DTYPE_F16, 32);
  Create("seq-b", s);
  Create("seq-a", Shape(1, 1, 1, 4, KVDEX_DTYPE_F32));

  kvdex_seq_info info;
  ASSERT_EQ(kvdex_stat(db_, "seq-b", &info), 0) << kvdex_errmsg();
  EXPECT_EQ(info.shape.n_layers, 3u);
  EXPECT_EQ(info.shape.n_kv_heads, 2u);
  EXPECT_EQ(info.shape.n_q_heads, 8u);
  EXPECT_EQ(info.shape.head_dim, 16u);
  EXPECT_EQ(info.shape.block_tokens, 32u);
  EXPECT_EQ(info.shape.dtype, KVDEX_DTYPE_F16);
  ASSERT_EQ(info.n_layers, 3u);
  for (uint32_t l = 0; l < 3; l++) EXPECT_EQ(info.layer_tokens[l], 0u);
  kvdex_seq_info_free(&info);
  kvdex_seq_info_free(&info);  // idempotent
  kvdex_seq_info_free(nullptr);

  char **ids = nullptr;
  size_t n = 0;
  ASSERT_EQ(kvdex_list(db_, &ids, &n), 0) << kvdex_errmsg();
  ASSERT_EQ(n, 2u);
  EXPECT_STREQ(ids[0], "seq-a");
  EXPECT_STREQ(ids[1], "seq-b");
  kvdex_list_free(ids, n);

  // Some data, so that delete has bytes to return.
  Model m(s, 40, 1);
  ASSERT_EQ(AppendPieces(db_, "seq-b", m, {{0, 0, 40}, {1, 0, 40}, {2, 0, 40}}), 0)
      << kvdex_errmsg();
  ASSERT_EQ(kvdex_stat(db_, "seq-b", &info), 0);
  EXPECT_GE(info.bytes, 2u * 3 * 2 * 40 * 16 * 2);  // K and V, 3 layers, 2 heads, f16
  uint64_t bytes = info.bytes;
  kvdex_seq_info_free(&info);

  uint64_t freed = 0;
  ASSERT_EQ(kvdex_delete(db_, "seq-b", &freed), 0) << kvdex_errmsg();
  EXPECT_EQ(freed, bytes);
  ResetErr();
  EXPECT_EQ(kvdex_stat(db_, "seq-b", &info), KVDEX_ENOTFOUND);
  EXPECT_STRNE(kvdex_errmsg(), "");
  EXPECT_EQ(kvdex_delete(db_, "seq-b", nullptr), KVDEX_ENOTFOUND);

  ASSERT_EQ(kvdex_list(db_, &ids, &n), 0);
  ASSERT_EQ(n, 1u);
  EXPECT_STREQ(ids[0], "seq-a");
  kvdex_list_free(ids, n);
  ASSERT_EQ(kvdex_delete(db_, "seq-a", nullptr), 0);
  ASSERT_EQ(kvdex_list(db_, &ids, &n), 0);
  EXPECT_EQ(n, 0u);
  kvdex_list_free(ids, n);

  // A deleted id can be created again, with another shape, and is seen as such.
  Create("seq-b", Shape(1, 1, 2, 8, KVDEX_DTYPE_BF16));
  ASSERT_EQ(kvdex_stat(db_, "seq-b", &info), 0);
  EXPECT_EQ(info.n_layers, 1u);
  EXPECT_EQ(info.shape.dtype, KVDEX_DTYPE_BF16);
  kvdex_seq_info_free(&info);
}

TEST_P(Contract, DuplicateCreateIsEexistAndKeepsTheShape) {
  Create("dup", Shape(2, 2, 4, 8, KVDEX_DTYPE_F32));
  kvdex_shape other = Shape(1, 1, 1, 16, KVDEX_DTYPE_F16);
  ResetErr();
  EXPECT_EQ(kvdex_create(db_, "dup", &other), KVDEX_EEXIST);
  EXPECT_STRNE(kvdex_errmsg(), "");
  kvdex_seq_info info;
  ASSERT_EQ(kvdex_stat(db_, "dup", &info), 0);
  EXPECT_EQ(info.shape.n_layers, 2u);
  EXPECT_EQ(info.shape.head_dim, 8u);
  kvdex_seq_info_free(&info);
}

TEST_P(Contract, UnknownSequenceIsEnotfound) {
  Create("known", Shape(1, 1, 1, 4, KVDEX_DTYPE_F32));
  kvdex_seq_info info;
  uint64_t id0 = 0;
  float buf[64];
  float q[4] = {1, 0, 0, 0};
  const char *ids[] = {"missing"};
  const float *qs[] = {q};
  kvdex_search_req req{1, 0, 0};
  kvdex_search_out out;
  kvdex_appender *ap = nullptr;

  ResetErr();
  EXPECT_EQ(kvdex_stat(db_, "missing", &info), KVDEX_ENOTFOUND);
  EXPECT_NE(std::string(kvdex_errmsg()).find("missing"), std::string::npos) << kvdex_errmsg();
  EXPECT_EQ(kvdex_delete(db_, "missing", nullptr), KVDEX_ENOTFOUND);
  EXPECT_EQ(kvdex_read(db_, "missing", 0, &id0, 1, buf, buf + 32), KVDEX_ENOTFOUND);
  EXPECT_EQ(kvdex_search(db_, 0, &req, 1, ids, qs, &out), KVDEX_ENOTFOUND);
  EXPECT_EQ(out.heads, nullptr);
  EXPECT_EQ(kvdex_append_begin(db_, "missing", &ap), KVDEX_ENOTFOUND);
  EXPECT_EQ(ap, nullptr);
  EXPECT_EQ(kvdex_stat(db_, "Known", &info), KVDEX_ENOTFOUND);  // ids are case-sensitive
}

TEST_P(Contract, NamespacesAreSeparate) {
  if (!grpc()) GTEST_SKIP() << "each local: handle owns its own store";
  kvdex_open_opts o{};
  o.name_space = "tenant-2";
  kvdex_db *db2 = nullptr;
  ASSERT_EQ(kvdex_open(uri_.c_str(), &o, &db2), 0) << kvdex_errmsg();
  Create("shared-id", Shape(1, 1, 1, 4, KVDEX_DTYPE_F32));
  kvdex_seq_info info;
  EXPECT_EQ(kvdex_stat(db2, "shared-id", &info), KVDEX_ENOTFOUND);
  char **ids;
  size_t n;
  ASSERT_EQ(kvdex_list(db2, &ids, &n), 0);
  EXPECT_EQ(n, 0u);
  kvdex_list_free(ids, n);
  kvdex_shape s2 = Shape(2, 1, 1, 8, KVDEX_DTYPE_F16);
  EXPECT_EQ(kvdex_create(db2, "shared-id", &s2), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_stat(db2, "shared-id", &info), 0);
  EXPECT_EQ(info.n_layers, 2u);
  kvdex_seq_info_free(&info);
  ASSERT_EQ(kvdex_stat(db_, "shared-id", &info), 0);
  EXPECT_EQ(info.n_layers, 1u);
  kvdex_seq_info_free(&info);
  kvdex_close(db2);
}

// ---- append and read ---------------------------------------------------------------

TEST_P(Contract, AppendInBlocksThenReadBackEqualBytes) {
  for (int dtype : {KVDEX_DTYPE_F32, KVDEX_DTYPE_F16, KVDEX_DTYPE_BF16}) {
    SCOPED_TRACE(kvdex_dtype_name(dtype));
    std::string id = std::string("rt-") + kvdex_dtype_name(dtype);
    kvdex_shape s = Shape(2, 2, 4, 12, dtype, 4);
    Create(id.c_str(), s);
    Model m(s, 64, 7 + dtype);
    // One stream of several blocks of both layers, interleaved, crossing block edges.
    uint64_t appended = 0;
    ASSERT_EQ(AppendPieces(db_, id.c_str(), m,
                           {{0, 0, 3}, {1, 0, 5}, {0, 3, 5}, {0, 8, 1}, {1, 5, 7}, {0, 9, 7}},
                           &appended),
              0)
        << kvdex_errmsg();
    EXPECT_EQ(appended, 16u + 12u);
    EXPECT_EQ(LayerTokens(db_, id.c_str()), (std::vector<uint64_t>{16, 12}));
    // A second stream continues both layers.
    ASSERT_EQ(AppendPieces(db_, id.c_str(), m, {{1, 12, 30}, {0, 16, 1}, {0, 17, 40}}, &appended),
              0)
        << kvdex_errmsg();
    EXPECT_EQ(appended, 71u);
    std::vector<uint64_t> n = LayerTokens(db_, id.c_str());
    EXPECT_EQ(n, (std::vector<uint64_t>{57, 42}));
    ExpectStored(db_, id.c_str(), m, n);

    // Scattered ids, out of order and repeated.
    std::vector<uint64_t> ids = {41, 0, 7, 7, 56, 3, 20, 1};
    std::vector<uint8_t> k(s.n_kv_heads * ids.size() * m.row(), 0xAB), v(k.size(), 0xCD);
    ASSERT_EQ(kvdex_read(db_, id.c_str(), 0, ids.data(), ids.size(), k.data(), v.data()), 0)
        << kvdex_errmsg();
    EXPECT_TRUE(k == m.Gather(0, ids, false));
    EXPECT_TRUE(v == m.Gather(0, ids, true));
    // Reading nothing is allowed and touches nothing.
    EXPECT_EQ(kvdex_read(db_, id.c_str(), 0, nullptr, 0, nullptr, nullptr), 0) << kvdex_errmsg();
  }
}

TEST_P(Contract, LargeAppendAndReadAreSplitAndReassembled) {
  // 5000 tokens x 4 heads x 128 dims f32 = 10 MiB of K (and of V): more than one
  // gRPC message each way (the client sends at most 16 MiB of K+V per AppendKV
  // message and asks for at most 4096 tokens per ReadKV message).
  kvdex_shape s = Shape(1, 4, 4, 128, KVDEX_DTYPE_F32, 64);
  Create("big", s);
  Model m(s, 5000, 99);
  uint64_t appended = 0;
  ASSERT_EQ(AppendPieces(db_, "big", m, {{0, 0, 5000}}, &appended), 0) << kvdex_errmsg();
  EXPECT_EQ(appended, 5000u);
  ExpectStored(db_, "big", m, LayerTokens(db_, "big"));
  std::vector<uint64_t> ids;
  for (int64_t t = 4999; t >= 0; t -= 3) ids.push_back((uint64_t)t);
  std::vector<uint8_t> k(s.n_kv_heads * ids.size() * m.row()), v(k.size());
  ASSERT_EQ(kvdex_read(db_, "big", 0, ids.data(), ids.size(), k.data(), v.data()), 0)
      << kvdex_errmsg();
  EXPECT_TRUE(k == m.Gather(0, ids, false));
  EXPECT_TRUE(v == m.Gather(0, ids, true));
  ASSERT_EQ(kvdex_delete(db_, "big", nullptr), 0) << kvdex_errmsg();

  // One KV head: the pieces of a split block are contiguous (no gather copy).
  kvdex_shape s1 = Shape(1, 1, 2, 1024, KVDEX_DTYPE_F32, 64);
  Create("big1", s1);
  Model m1(s1, 2500, 98);
  ASSERT_EQ(AppendPieces(db_, "big1", m1, {{0, 0, 2500}}, &appended), 0) << kvdex_errmsg();
  EXPECT_EQ(appended, 2500u);
  ExpectStored(db_, "big1", m1, {2500});
}

TEST_P(Contract, AbortLeavesNothingStored) {
  kvdex_shape s = Shape(2, 1, 2, 8, KVDEX_DTYPE_F16);
  Create("ab", s);
  Model m(s, 32, 3);
  ASSERT_EQ(AppendPieces(db_, "ab", m, {{0, 0, 4}}), 0) << kvdex_errmsg();

  kvdex_appender *ap = nullptr;
  ASSERT_EQ(kvdex_append_begin(db_, "ab", &ap), 0) << kvdex_errmsg();
  std::vector<uint8_t> k = m.Block(0, 4, 10, false), v = m.Block(0, 4, 10, true);
  ASSERT_EQ(kvdex_append_kv(ap, 0, 4, 10, k.data(), v.data()), 0) << kvdex_errmsg();
  k = m.Block(1, 0, 6, false);
  v = m.Block(1, 0, 6, true);
  ASSERT_EQ(kvdex_append_kv(ap, 1, 0, 6, k.data(), v.data()), 0) << kvdex_errmsg();
  kvdex_append_abort(ap);
  kvdex_append_abort(nullptr);

  EXPECT_EQ(LayerTokens(db_, "ab"), (std::vector<uint64_t>{4, 0}));
  // A fresh stream with the same data works: nothing of the aborted one is in the way.
  uint64_t appended = 0;
  ASSERT_EQ(AppendPieces(db_, "ab", m, {{0, 4, 10}, {1, 0, 6}}, &appended), 0) << kvdex_errmsg();
  EXPECT_EQ(appended, 16u);
  ExpectStored(db_, "ab", m, LayerTokens(db_, "ab"));

  // A stream that is committed empty stores nothing and succeeds.
  ASSERT_EQ(kvdex_append_begin(db_, "ab", &ap), 0);
  ASSERT_EQ(kvdex_append_commit(ap, &appended), 0) << kvdex_errmsg();
  EXPECT_EQ(appended, 0u);
}

TEST_P(Contract, MemoryCapIsEnomemAndSequenceUnchanged) {
  // 4 KiB of K+V per token; the cap (kCap) holds about 12k tokens.
  kvdex_shape s = Shape(1, 4, 4, 128, KVDEX_DTYPE_F32, 64);
  Create("cap", s);
  Model m(s, 1024, 5);
  ASSERT_EQ(AppendPieces(db_, "cap", m, {{0, 0, 256}}), 0) << kvdex_errmsg();
  kvdex_seq_info before;
  ASSERT_EQ(kvdex_stat(db_, "cap", &before), 0);

  // A stream of 16 x 1024 tokens (64 MiB) goes over the cap.
  std::vector<uint8_t> k = m.Block(0, 0, 1024, false), v = m.Block(0, 0, 1024, true);
  kvdex_appender *ap = nullptr;
  int rc = 0;
  for (int attempt = 0; attempt < 500; attempt++) {
    ASSERT_EQ(kvdex_append_begin(db_, "cap", &ap), 0) << kvdex_errmsg();
    rc = 0;
    for (uint64_t t = 256; rc == 0 && t < 256 + 16 * 1024; t += 1024)
      rc = kvdex_append_kv(ap, 0, t, 1024, k.data(), v.data());
    ResetErr();
    int rc2 = kvdex_append_commit(ap, nullptr);
    if (rc) {
      EXPECT_EQ(rc2, rc);
    }
    rc = rc2;
    if (rc != KVDEX_EBUSY) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(rc, KVDEX_ENOMEM) << kvdex_errname(rc);
  EXPECT_STRNE(kvdex_errmsg(), "");

  kvdex_seq_info after;
  ASSERT_EQ(kvdex_stat(db_, "cap", &after), 0);
  EXPECT_EQ(after.layer_tokens[0], 256u);
  EXPECT_EQ(after.bytes, before.bytes);
  kvdex_seq_info_free(&before);
  kvdex_seq_info_free(&after);
  ExpectStored(db_, "cap", m, {256});
  // The budget was returned: a small append still fits.
  ASSERT_EQ(AppendPieces(db_, "cap", m, {{0, 256, 100}}), 0) << kvdex_errmsg();
  ExpectStored(db_, "cap", m, {356});
}

TEST_P(Contract, GapAndConflictAreEconflict) {
  kvdex_shape s = Shape(1, 2, 2, 8, KVDEX_DTYPE_F32);
  Create("gc", s);
  Model m(s, 32, 11);
  ASSERT_EQ(AppendPieces(db_, "gc", m, {{0, 0, 8}}), 0) << kvdex_errmsg();

  ResetErr();
  EXPECT_EQ(AppendPieces(db_, "gc", m, {{0, 10, 4}}), KVDEX_ECONFLICT) << "gap";
  EXPECT_STRNE(kvdex_errmsg(), "");
  // A gap after valid pieces discards those too (all or nothing).
  EXPECT_EQ(AppendPieces(db_, "gc", m, {{0, 8, 4}, {0, 20, 4}}), KVDEX_ECONFLICT);

  Model other(s, 32, 12);  // same shape, other bytes
  ResetErr();
  EXPECT_EQ(AppendPieces(db_, "gc", other, {{0, 4, 4}}), KVDEX_ECONFLICT) << "rewrite";
  EXPECT_STRNE(kvdex_errmsg(), "");
  EXPECT_EQ(AppendPieces(db_, "gc", other, {{0, 6, 6}}), KVDEX_ECONFLICT) << "partial rewrite";

  EXPECT_EQ(LayerTokens(db_, "gc"), (std::vector<uint64_t>{8}));
  ExpectStored(db_, "gc", m, {8});
}

TEST_P(Contract, IdenticalReplayIsOkAndChangesNothing) {
  kvdex_shape s = Shape(2, 2, 4, 8, KVDEX_DTYPE_BF16);
  Create("rp", s);
  Model m(s, 32, 13);
  ASSERT_EQ(AppendPieces(db_, "rp", m, {{0, 0, 8}, {1, 0, 8}}), 0) << kvdex_errmsg();
  uint64_t appended = 99;
  ASSERT_EQ(AppendPieces(db_, "rp", m, {{0, 0, 8}, {1, 0, 8}}, &appended), 0) << kvdex_errmsg();
  EXPECT_EQ(appended, 0u);
  EXPECT_EQ(LayerTokens(db_, "rp"), (std::vector<uint64_t>{8, 8}));
  // An overlapping replay stores only the new part.
  ASSERT_EQ(AppendPieces(db_, "rp", m, {{0, 4, 8}, {1, 2, 3}}, &appended), 0) << kvdex_errmsg();
  EXPECT_EQ(appended, 4u);
  std::vector<uint64_t> n = LayerTokens(db_, "rp");
  EXPECT_EQ(n, (std::vector<uint64_t>{12, 8}));
  ExpectStored(db_, "rp", m, n);
}

// ---- search --------------------------------------------------------------------------

TEST_P(Contract, SearchEqualsBruteForceTopK) {
  for (int dtype : {KVDEX_DTYPE_F32, KVDEX_DTYPE_F16, KVDEX_DTYPE_BF16}) {
    SCOPED_TRACE(kvdex_dtype_name(dtype));
    std::string id = std::string("s-") + kvdex_dtype_name(dtype);
    kvdex_shape s = Shape(2, 2, 8, 32, dtype, 16);  // GQA group of 4
    Create(id.c_str(), s);
    Model m(s, 300, 21 + dtype);
    ASSERT_EQ(AppendPieces(db_, id.c_str(), m, {{0, 0, 300}, {1, 0, 200}}), 0) << kvdex_errmsg();
    for (uint32_t layer = 0; layer < 2; layer++) {
      for (uint32_t k : {1u, 10u, 64u}) {
        std::vector<float> q = RandomQuery(s, 100 + k + layer);
        const char *ids[] = {id.c_str()};
        const float *qs[] = {q.data()};
        kvdex_search_req req{k, 0, 0};
        kvdex_search_out out;
        ASSERT_EQ(kvdex_search(db_, layer, &req, 1, ids, qs, &out), 0) << kvdex_errmsg();
        ExpectMatchesBrute(m, layer, layer ? 200 : 300, q.data(), req, out,
                           "layer " + std::to_string(layer) + " k " + std::to_string(k));
        EXPECT_GE(out.keys_scanned, 1u);
        kvdex_search_out_free(&out);
        EXPECT_EQ(out.heads, nullptr);
      }
    }
  }
}

TEST_P(Contract, SearchMapsQueryHeadsToTheirKvHead) {
  // 2 KV heads, 4 query heads: q heads 0,1 read KV head 0, q heads 2,3 KV head 1.
  kvdex_shape s = Shape(1, 2, 4, 4, KVDEX_DTYPE_F32);
  Create("gqa", s);
  Model m(s, 20, 31);
  for (size_t t = 0; t < 20; t++) {  // small keys everywhere...
    m.SetKey(0, 0, t, {0.01f * t, 0, 0, 0});
    m.SetKey(0, 1, t, {0.01f * t, 0, 0, 0});
  }
  m.SetKey(0, 0, 5, {10, 0, 0, 0});  // ...except one per KV head
  m.SetKey(0, 1, 9, {10, 0, 0, 0});
  ASSERT_EQ(AppendPieces(db_, "gqa", m, {{0, 0, 20}}), 0) << kvdex_errmsg();
  std::vector<float> q(16, 0.f);
  for (int h = 0; h < 4; h++) q[h * 4] = 1.f;
  const char *ids[] = {"gqa"};
  const float *qs[] = {q.data()};
  kvdex_search_req req{1, 0, 0};
  kvdex_search_out out;
  ASSERT_EQ(kvdex_search(db_, 0, &req, 1, ids, qs, &out), 0) << kvdex_errmsg();
  ASSERT_EQ(out.n_q_heads, 4u);
  for (int h = 0; h < 4; h++) {
    ASSERT_EQ(out.heads[h].n, 1u);
    EXPECT_EQ(out.heads[h].ids[0], h < 2 ? 5u : 9u) << "q head " << h;
    EXPECT_FLOAT_EQ(out.heads[h].scores[0], 10.f);
  }
  ExpectMatchesBrute(m, 0, 20, q.data(), req, out, "gqa");
  kvdex_search_out_free(&out);
}

TEST_P(Contract, SearchExcludesSinksAndWindowAndHandlesKAboveTokens) {
  kvdex_shape s = Shape(1, 1, 2, 8, KVDEX_DTYPE_F16, 4);
  Create("sw", s);
  Model m(s, 30, 41);
  ASSERT_EQ(AppendPieces(db_, "sw", m, {{0, 0, 30}}), 0) << kvdex_errmsg();
  std::vector<float> q = RandomQuery(s, 42);
  const char *ids[] = {"sw"};
  const float *qs[] = {q.data()};
  struct Case {
    uint32_t k, sinks, window;
    uint32_t expect_n;
  } cases[] = {
      {5, 3, 4, 5},      // ordinary
      {100, 0, 0, 30},   // k > tokens: every token
      {100, 3, 4, 23},   // k > eligible tokens
      {1, 29, 0, 1},     // one eligible token
      {10, 20, 10, 0},   // sinks + window cover everything
      {10, 40, 0, 0},    // sinks beyond the end
      {10, 0, 30, 0},    // window is everything
  };
  for (const Case &c : cases) {
    std::string what = "k " + std::to_string(c.k) + " sinks " + std::to_string(c.sinks) +
                       " window " + std::to_string(c.window);
    kvdex_search_req req{c.k, c.sinks, c.window};
    kvdex_search_out out;
    ASSERT_EQ(kvdex_search(db_, 0, &req, 1, ids, qs, &out), 0) << what << ": " << kvdex_errmsg();
    ASSERT_EQ(out.n_q_heads, 2u);
    for (uint32_t h = 0; h < 2; h++) {
      EXPECT_EQ(out.heads[h].n, c.expect_n) << what;
      for (uint32_t i = 0; i < out.heads[h].n; i++) {
        EXPECT_GE(out.heads[h].ids[i], c.sinks) << what;
        EXPECT_LT(out.heads[h].ids[i], 30u - c.window) << what;
      }
    }
    ExpectMatchesBrute(m, 0, 30, q.data(), req, out, what);
    kvdex_search_out_free(&out);
  }
  // An empty sequence has no hits.
  Create("empty", s);
  const char *eids[] = {"empty"};
  kvdex_search_req req{4, 0, 0};
  kvdex_search_out out;
  ASSERT_EQ(kvdex_search(db_, 0, &req, 1, eids, qs, &out), 0) << kvdex_errmsg();
  ASSERT_EQ(out.n_q_heads, 2u);
  EXPECT_EQ(out.heads[0].n, 0u);
  EXPECT_EQ(out.heads[1].n, 0u);
  EXPECT_EQ(out.tokens, 0u);
  kvdex_search_out_free(&out);
}

TEST_P(Contract, SearchTiesAreOrderedByAscendingId) {
  kvdex_shape s = Shape(1, 1, 1, 8, KVDEX_DTYPE_F16, 4);
  Create("ties", s);
  Model m(s, 40, 51);
  for (size_t t = 0; t < 40; t++) m.SetKey(0, 0, t, {0.5f, -0.25f, 1, 0, 0, 0, 0.125f, 2});
  ASSERT_EQ(AppendPieces(db_, "ties", m, {{0, 0, 40}}), 0) << kvdex_errmsg();
  // Dyadic values: every product and partial sum is exact, so all 40 scores are
  // bit-identical whatever order a kernel adds them in.
  std::vector<float> q = {0.75f, -1.5f, 0.25f, 3, -2, 0.5f, 1, -0.125f};
  const char *ids[] = {"ties"};
  const float *qs[] = {q.data()};
  kvdex_search_req req{12, 5, 3};
  kvdex_search_out out;
  ASSERT_EQ(kvdex_search(db_, 0, &req, 1, ids, qs, &out), 0) << kvdex_errmsg();
  ASSERT_EQ(out.heads[0].n, 12u);
  for (uint32_t i = 0; i < 12; i++) {
    EXPECT_EQ(out.heads[0].ids[i], 5u + i);
    EXPECT_EQ(out.heads[0].scores[i], out.heads[0].scores[0]);
  }
  kvdex_search_out_free(&out);
}

TEST_P(Contract, BatchedSearchReturnsEachSequencesOwnResultInOrder) {
  // Three sequences with different shapes, dtypes and lengths in one call.
  kvdex_shape shapes[3] = {Shape(2, 2, 4, 16, KVDEX_DTYPE_F32), Shape(2, 1, 3, 16, KVDEX_DTYPE_F16),
                           Shape(3, 4, 8, 8, KVDEX_DTYPE_BF16)};
  const char *names[3] = {"batch-0", "batch-1", "batch-2"};
  uint64_t lens[3] = {50, 17, 90};
  std::vector<Model> models;
  for (int i = 0; i < 3; i++) {
    Create(names[i], shapes[i]);
    models.emplace_back(shapes[i], lens[i], 60 + i);
    ASSERT_EQ(AppendPieces(db_, names[i], models[i], {{1, 0, (uint32_t)lens[i]}}), 0)
        << kvdex_errmsg();
  }
  std::vector<std::vector<float>> q;
  for (int i = 0; i < 3; i++) q.push_back(RandomQuery(shapes[i], 70 + i));
  // Order deliberately not the creation order; one sequence twice.
  int order[4] = {2, 0, 1, 2};
  const char *ids[4];
  const float *qs[4];
  for (int j = 0; j < 4; j++) {
    ids[j] = names[order[j]];
    qs[j] = q[order[j]].data();
  }
  kvdex_search_req req{7, 1, 2};
  kvdex_search_out out[4];
  ASSERT_EQ(kvdex_search(db_, 1, &req, 4, ids, qs, out), 0) << kvdex_errmsg();
  for (int j = 0; j < 4; j++) {
    int i = order[j];
    ExpectMatchesBrute(models[i], 1, lens[i], q[i].data(), req, out[j],
                       "entry " + std::to_string(j) + " = " + names[i]);
    kvdex_search_out_free(&out[j]);
  }

  // One unknown sequence fails the whole call, and nothing needs freeing.
  const char *bad_ids[3] = {names[0], "nope", names[2]};
  const float *bad_qs[3] = {q[0].data(), q[0].data(), q[2].data()};
  ResetErr();
  EXPECT_EQ(kvdex_search(db_, 1, &req, 3, bad_ids, bad_qs, out), KVDEX_ENOTFOUND);
  EXPECT_STRNE(kvdex_errmsg(), "");
  for (int j = 0; j < 3; j++) EXPECT_EQ(out[j].heads, nullptr);
  // A layer one sequence lacks fails it all too.
  const char *l2_ids[2] = {names[2], names[0]};
  const float *l2_qs[2] = {q[2].data(), q[0].data()};
  EXPECT_EQ(kvdex_search(db_, 2, &req, 2, l2_ids, l2_qs, out), KVDEX_EINVAL);
  EXPECT_EQ(out[0].heads, nullptr);
  // An empty batch is a no-op.
  EXPECT_EQ(kvdex_search(db_, 0, &req, 0, nullptr, nullptr, nullptr), 0);
}

// ---- bad arguments ---------------------------------------------------------------------

// Each call must fail with KVDEX_EINVAL and leave a message.
#define EXPECT_EINVAL(call)                                                  \
  do {                                                                       \
    ResetErr();                                                              \
    EXPECT_EQ((call), KVDEX_EINVAL) << #call;                                \
    EXPECT_STRNE(kvdex_errmsg(), "") << #call;                               \
  } while (0)

// ---- caller-given landmarks ("landmark:mode=given") --------------------------------

// Landmark keys of blocks [b0, b0 + nb) from all[kv][n_blocks][dim] (f32), converted to
// the sequence dtype, layout [n_kv_heads][nb][head_dim].
std::vector<uint8_t> LandmarkSlice(const kvdex_shape &s, const std::vector<float> &all,
                                   uint64_t n_blocks, uint64_t b0, uint64_t nb) {
  size_t es = kvdex_dtype_size(s.dtype), d = s.head_dim;
  std::vector<uint8_t> out((size_t)s.n_kv_heads * nb * d * es);
  for (size_t h = 0; nb && h < s.n_kv_heads; h++)
    kvdex__from_f32(s.dtype, all.data() + (h * n_blocks + b0) * d, out.data() + h * nb * d * es,
                   nb * d);
  return out;
}

// One stream of kvdex_append_kvl calls: pieces of the model with the landmarks of
// the blocks that end in each (lm: all[kv][n_blocks][dim] f32; nullptr = none).
// KVDEX_EBUSY (a previous stream winding down on the server) is retried.
int AppendWithLandmarks(kvdex_db *db, const char *id, const Model &m, const std::vector<Piece> &pieces,
                        const std::vector<float> *lm, uint64_t n_blocks,
                        uint64_t *appended = nullptr) {
  const uint64_t B = m.shape.block_tokens;
  for (int attempt = 0;; attempt++) {
    kvdex_appender *ap = nullptr;
    int rc = kvdex_append_begin(db, id, &ap);
    for (size_t i = 0; rc == 0 && i < pieces.size(); i++) {
      const Piece &p = pieces[i];
      std::vector<uint8_t> k = m.Block(p.layer, p.t0, p.n, false);
      std::vector<uint8_t> v = m.Block(p.layer, p.t0, p.n, true);
      uint64_t b0 = p.t0 / B, nb = (p.t0 + p.n) / B - b0;
      std::vector<uint8_t> l;
      if (lm) l = LandmarkSlice(m.shape, *lm, n_blocks, b0, nb);
      rc = kvdex_append_kvl(ap, p.layer, p.t0, p.n, k.data(), v.data(), nullptr,
                            lm ? l.data() : nullptr);
      if (rc) {
        EXPECT_STRNE(kvdex_errmsg(), "");
        EXPECT_EQ(kvdex_append_commit(ap, appended), rc);
        ap = nullptr;
      }
    }
    if (rc == 0) rc = kvdex_append_commit(ap, appended);
    if (rc == KVDEX_EBUSY && attempt < 500) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    return rc;
  }
}

std::vector<uint64_t> LandmarkBlocks(kvdex_db *db, const char *id) {
  kvdex_seq_info info;
  int rc = kvdex_stat(db, id, &info);
  EXPECT_EQ(rc, 0) << kvdex_errmsg();
  std::vector<uint64_t> out;
  if (rc == 0 && info.layer_landmark_blocks)
    out.assign(info.layer_landmark_blocks, info.layer_landmark_blocks + info.n_layers);
  kvdex_seq_info_free(&info);
  return out;
}

// Polls until the latest build of `layer` is no longer BUILDING; returns its record.
kvdex_layer_index WaitBuilt(kvdex_db *db, const char *id, uint32_t layer) {
  kvdex_layer_index li{};
  for (int i = 0; i < 3000; i++) {
    kvdex_seq_info info;
    if (kvdex_stat(db, id, &info) == 0) {
      for (uint32_t j = 0; j < info.n_indexes; j++)
        if (info.indexes[j].layer == layer) li = info.indexes[j];
      kvdex_seq_info_free(&info);
      if (li.state != KVDEX_INDEX_BUILDING && li.state != KVDEX_INDEX_NONE) return li;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ADD_FAILURE() << "the build of layer " << layer << " did not finish";
  return li;
}

TEST_P(Contract, GivenLandmarksSelectTheirBlocksAndTheTailIsExact) {
  // Blocks of 8 tokens; 150 tokens = 18 complete blocks (covered by the index) and a
  // tail of 6 tokens. Query heads of a KV head all ask u[kv]; the landmarks of two
  // blocks per KV head point along u, every other one against it, so blocks=2 selects
  // exactly those two.
  const uint32_t B = 8, N = 150, NB = N / B;
  kvdex_shape s = Shape(2, 2, 4, 16, KVDEX_DTYPE_F16, B);
  Create("lm", s);
  Model m(s, N, 81);
  std::vector<float> u = RandomQuery(Shape(1, 2, 2, 16, KVDEX_DTYPE_F32), 82);  // [kv][dim]
  const std::vector<uint64_t> chosen[2] = {{3, 11}, {5, 17}};
  std::vector<float> lm((size_t)2 * NB * 16);
  for (uint32_t kv = 0; kv < 2; kv++)
    for (uint64_t b = 0; b < NB; b++) {
      bool in = std::find(chosen[kv].begin(), chosen[kv].end(), b) != chosen[kv].end();
      for (uint32_t d = 0; d < 16; d++) lm[(kv * NB + b) * 16 + d] = (in ? 4.f : -4.f) * u[kv * 16 + d];
    }
  // Planted keys: one outside the chosen blocks (exact search finds it, the index must
  // not) and one in the tail (the exact tail scan must).
  std::vector<float> big0(16), big1(16);
  for (uint32_t d = 0; d < 16; d++) {
    big0[d] = 3.f * u[d];
    big1[d] = 3.f * u[16 + d];
  }
  m.SetKey(0, 0, 2, big0);     // kv 0, block 0
  m.SetKey(0, 1, 147, big1);   // kv 1, the tail
  std::vector<float> q(4 * 16);
  for (uint32_t h = 0; h < 4; h++)
    for (uint32_t d = 0; d < 16; d++) q[h * 16 + d] = u[(h / 2) * 16 + d];

  // Before any landmark, mode=given is refused at once.
  ASSERT_EQ(AppendPieces(db_, "lm", m, {{0, 0, 4}}), 0) << kvdex_errmsg();
  ResetErr();
  EXPECT_EQ(kvdex_build_index(db_, "lm", 0, "landmark:mode=given"), KVDEX_ECONFLICT);
  EXPECT_NE(std::string(kvdex_errmsg()).find("no landmarks"), std::string::npos)
      << kvdex_errmsg();
  // Pieces that cross block edges; the first one is a replay of the 4 tokens above.
  uint64_t appended = 0;
  ASSERT_EQ(AppendWithLandmarks(db_, "lm", m, {{0, 0, 13}, {0, 13, 3}, {0, 16, 1}, {0, 17, 100},
                                               {0, 117, 33}},
                                &lm, NB, &appended),
            0)
      << kvdex_errmsg();
  EXPECT_EQ(appended, N - 4u);
  EXPECT_EQ(LandmarkBlocks(db_, "lm"), (std::vector<uint64_t>{NB, 0}));
  ExpectStored(db_, "lm", m, {N, 0});

  ASSERT_EQ(kvdex_build_index(db_, "lm", 0, "landmark:mode=given,blocks=2"), 0) << kvdex_errmsg();
  kvdex_layer_index li = WaitBuilt(db_, "lm", 0);
  ASSERT_EQ(li.state, KVDEX_INDEX_READY) << li.error;
  EXPECT_STREQ(li.kind, "landmark");
  EXPECT_EQ(li.tokens, (uint64_t)NB * B);
  EXPECT_EQ(std::string(li.describe).rfind("landmark:mode=given,block=8,blocks=2", 0), 0u)
      << li.describe;

  const char *ids[] = {"lm"};
  const float *qs[] = {q.data()};
  for (const char *index : {"landmark", "auto"}) {
    SCOPED_TRACE(index);
    kvdex_search_req req{};
    req.k = 5;
    req.index = index;
    kvdex_search_out out;
    ASSERT_EQ(kvdex_search(db_, 0, &req, 1, ids, qs, &out), 0) << kvdex_errmsg();
    EXPECT_STREQ(out.index, "landmark");
    EXPECT_EQ(out.tokens, N);
    ASSERT_EQ(out.n_q_heads, 4u);
    for (uint32_t h = 0; h < 4; h++) {
      SCOPED_TRACE("q head " + std::to_string(h));
      const uint32_t kv = h / 2;
      // The reference: exact top-k over the chosen blocks plus the tail.
      std::vector<Hit> full = BruteTopK(m, 0, N, q.data(), h, UINT32_MAX, 0, 0), ref;
      for (const Hit &x : full)
        if (x.id >= (uint64_t)NB * B ||
            std::find(chosen[kv].begin(), chosen[kv].end(), x.id / B) != chosen[kv].end())
          ref.push_back(x);
      ref.resize(5);
      const kvdex_hits &got = out.heads[h];
      ASSERT_EQ(got.n, 5u);
      for (uint32_t i = 0; i < 5; i++) {
        double tol = 1e-3 * (1.0 + std::fabs(ref[i].score));
        EXPECT_NEAR(got.scores[i], ref[i].score, tol) << "rank " << i;
        bool ok = got.ids[i] >= (uint64_t)NB * B ||
                  std::find(chosen[kv].begin(), chosen[kv].end(), got.ids[i] / B) !=
                      chosen[kv].end();
        EXPECT_TRUE(ok) << "id " << got.ids[i] << " is in a block the landmarks did not select";
      }
      if (kv == 0) {
        EXPECT_NE(got.ids[0], 2u);  // the planted key of block 0 is not selected
      } else {
        EXPECT_EQ(got.ids[0], 147u);  // the tail is scanned exactly
      }
    }
    kvdex_search_out_free(&out);
  }
  // The exact search does find the planted key of block 0.
  kvdex_search_req ex{};
  ex.k = 1;
  kvdex_search_out out;
  ASSERT_EQ(kvdex_search(db_, 0, &ex, 1, ids, qs, &out), 0) << kvdex_errmsg();
  EXPECT_EQ(out.heads[0].ids[0], 2u);
  kvdex_search_out_free(&out);

  // Replays: identical landmarks are a no-op; different ones conflict (all or nothing).
  ASSERT_EQ(AppendWithLandmarks(db_, "lm", m, {{0, 40, 30}}, &lm, NB, &appended), 0)
      << kvdex_errmsg();
  EXPECT_EQ(appended, 0u);
  std::vector<float> other = lm;
  other[(1 * NB + 6) * 16 + 3] += 1.f;  // kv head 1, block 6
  ResetErr();
  EXPECT_EQ(AppendWithLandmarks(db_, "lm", m, {{1, 0, 8}, {0, 40, 30}}, &other, NB),
            KVDEX_ECONFLICT);
  EXPECT_STRNE(kvdex_errmsg(), "");
  EXPECT_EQ(LayerTokens(db_, "lm"), (std::vector<uint64_t>{N, 0}));
  // Layer 1 without landmarks, then landmarks past that hole: refused; re-sending the
  // tokens with theirs fills it.
  ASSERT_EQ(AppendPieces(db_, "lm", m, {{1, 0, 20}}), 0) << kvdex_errmsg();
  ResetErr();
  EXPECT_EQ(AppendWithLandmarks(db_, "lm", m, {{1, 20, 4}}, &lm, NB), KVDEX_ECONFLICT);
  EXPECT_NE(std::string(kvdex_errmsg()).find("without landmarks"), std::string::npos)
      << kvdex_errmsg();
  ASSERT_EQ(AppendWithLandmarks(db_, "lm", m, {{1, 0, 24}}, &lm, NB, &appended), 0)
      << kvdex_errmsg();
  EXPECT_EQ(appended, 4u);
  EXPECT_EQ(LandmarkBlocks(db_, "lm"), (std::vector<uint64_t>{NB, 3}));
  // Non-finite landmarks are refused.
  std::vector<float> nan = lm;
  nan[(0 * NB + 3) * 16] = std::numeric_limits<float>::quiet_NaN();
  ResetErr();
  EXPECT_EQ(AppendWithLandmarks(db_, "lm", m, {{1, 24, 8}}, &nan, NB), KVDEX_EINVAL);
  EXPECT_NE(std::string(kvdex_errmsg()).find("non-finite"), std::string::npos) << kvdex_errmsg();
  EXPECT_EQ(LayerTokens(db_, "lm"), (std::vector<uint64_t>{N, 24}));
}

TEST_P(Contract, LargeAppendsSendLandmarksWithTheirBlocks) {
  // Over gRPC these appends are split into several messages (16 MiB of K+V each) at
  // token offsets that fall inside a block: each landmark must travel with the piece
  // that ends its block. Two KV heads (pieces gathered) and one (pieces contiguous).
  struct Case {
    kvdex_shape s;
    uint32_t n;
  } cases[] = {{Shape(1, 2, 2, 128, KVDEX_DTYPE_F32, 48), 9000},
               {Shape(1, 1, 1, 1024, KVDEX_DTYPE_F32, 100), 2500}};
  int i = 0;
  for (const Case &c : cases) {
    std::string id = "lmbig" + std::to_string(i++);
    SCOPED_TRACE(id);
    Create(id.c_str(), c.s);
    Model m(c.s, c.n, 97 + i);
    const uint64_t nb = c.n / c.s.block_tokens, d = c.s.head_dim;
    std::vector<float> lm(c.s.n_kv_heads * nb * d);
    for (size_t j = 0; j < lm.size(); j++) lm[j] = (float)(j % 1000) * 0.001f;
    ASSERT_EQ(AppendWithLandmarks(db_, id.c_str(), m, {{0, 0, c.n}}, &lm, nb), 0)
        << kvdex_errmsg();
    EXPECT_EQ(LandmarkBlocks(db_, id.c_str()), (std::vector<uint64_t>{nb}));
    ExpectStored(db_, id.c_str(), m, {c.n});
    if (grpc()) {  // the server's store is at hand: compare the stored landmarks
      kvdex_seq *seq = nullptr;
      ASSERT_EQ(kvdex_seq_open(store_, nullptr, id.c_str(), &seq), 0) << kvdex_errmsg();
      std::vector<float> got(nb * d);
      for (uint32_t h = 0; h < c.s.n_kv_heads; h++) {
        uint64_t n = 0;
        ASSERT_EQ(kvdex_seq_landmarks(seq, 0, h, nb, got.data(), &n), 0) << kvdex_errmsg();
        ASSERT_EQ(n, nb);
        EXPECT_TRUE(std::equal(got.begin(), got.end(), lm.begin() + h * nb * d))
            << "kv head " << h;
      }
      kvdex_seq_release(seq);
    }
  }
}

TEST_P(Contract, LandmarksOfTheWrongSizeAreEinval) {
  if (!grpc()) GTEST_SKIP() << "sizes come from the shape: only a stale shape over gRPC can be wrong";
  // This handle caches block_tokens 8; another handle re-creates the sequence with
  // block_tokens 4 (same K/V sizes). The landmarks this handle sends are then sized
  // for the wrong block count, and the server says so.
  kvdex_shape s8 = Shape(1, 2, 2, 8, KVDEX_DTYPE_F32, 8), s4 = Shape(1, 2, 2, 8, KVDEX_DTYPE_F32, 4);
  Create("lmsz", s8);
  kvdex_db *other = nullptr;
  ASSERT_EQ(kvdex_open(uri_.c_str(), nullptr, &other), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_delete(other, "lmsz", nullptr), 0) << kvdex_errmsg();
  ASSERT_EQ(kvdex_create(other, "lmsz", &s4), 0) << kvdex_errmsg();
  kvdex_close(other);
  Model m(s8, 16, 91);
  std::vector<float> lm(2 * 4 * 8, 0.5f);
  ResetErr();
  EXPECT_EQ(AppendWithLandmarks(db_, "lmsz", m, {{0, 0, 16}}, &lm, 4), KVDEX_EINVAL);
  std::string msg = kvdex_errmsg();
  EXPECT_NE(msg.find("landmarks has 128 bytes, expected"), std::string::npos) << msg;
  EXPECT_NE(msg.find("= 256"), std::string::npos) << msg;
  EXPECT_EQ(LayerTokens(db_, "lmsz"), (std::vector<uint64_t>{0}));
  // The refusal made the handle forget the shape: the next stream is sized right.
  Model m4(s4, 16, 91);  // the same K/V, blocks of 4
  ASSERT_EQ(AppendWithLandmarks(db_, "lmsz", m4, {{0, 0, 16}}, &lm, 4), 0) << kvdex_errmsg();
  EXPECT_EQ(LandmarkBlocks(db_, "lmsz"), (std::vector<uint64_t>{4}));
}

TEST_P(Contract, LandmarksOverTheCapAreEnomemAndChangeNothing) {
  // One token per block: a landmark row per token and KV head (2 KiB a token over 4
  // heads) next to 4 KiB of K+V. 1000 tokens with landmarks, then 7500 more: their K/V
  // (30 MiB) fit under the cap (48 MiB), their landmarks (a grown copy of 17 MiB, or
  // over gRPC, which splits the stream, 20 MiB, while the old one is still counted)
  // do not.
  const uint32_t N0 = 1000, N1 = 7500, N = N0 + N1;
  kvdex_shape s = Shape(1, 4, 4, 128, KVDEX_DTYPE_F32, 1);
  Create("lmcap", s);
  Model m(s, N, 95);
  std::vector<float> lm((size_t)4 * N * 128, 0.25f);
  ASSERT_EQ(AppendWithLandmarks(db_, "lmcap", m, {{0, 0, N0}}, &lm, N), 0) << kvdex_errmsg();
  kvdex_seq_info before;
  ASSERT_EQ(kvdex_stat(db_, "lmcap", &before), 0) << kvdex_errmsg();
  ResetErr();
  int rc = AppendWithLandmarks(db_, "lmcap", m, {{0, N0, N1}}, &lm, N);
  EXPECT_EQ(rc, KVDEX_ENOMEM) << kvdex_errname(rc);
  EXPECT_NE(std::string(kvdex_errmsg()).find("memory cap"), std::string::npos) << kvdex_errmsg();
  kvdex_seq_info after;
  ASSERT_EQ(kvdex_stat(db_, "lmcap", &after), 0) << kvdex_errmsg();
  EXPECT_EQ(after.bytes, before.bytes);
  EXPECT_EQ(after.layer_tokens[0], N0);
  EXPECT_EQ(after.layer_landmark_blocks[0], N0);
  kvdex_seq_info_free(&before);
  kvdex_seq_info_free(&after);
  // The same tokens without landmarks fit: it was the landmarks that did not.
  ASSERT_EQ(AppendPieces(db_, "lmcap", m, {{0, N0, N1}}), 0) << kvdex_errmsg();
  EXPECT_EQ(LandmarkBlocks(db_, "lmcap"), (std::vector<uint64_t>{N0}));
  ExpectStored(db_, "lmcap", m, {N});
}

TEST_P(Contract, BadArgumentsAreEinvalWithAMessage) {
  kvdex_shape good = Shape(2, 2, 4, 8, KVDEX_DTYPE_F32);
  Create("ok", good);
  Model m(good, 16, 81);
  ASSERT_EQ(AppendPieces(db_, "ok", m, {{0, 0, 8}}), 0);

  // Sequences.
  EXPECT_EINVAL(kvdex_create(nullptr, "x", &good));
  EXPECT_EINVAL(kvdex_create(db_, nullptr, &good));
  EXPECT_EINVAL(kvdex_create(db_, "", &good));
  EXPECT_EINVAL(kvdex_create(db_, "has space", &good));
  EXPECT_EINVAL(kvdex_create(db_, std::string(300, 'a').c_str(), &good));
  EXPECT_EINVAL(kvdex_create(db_, "x", nullptr));
  kvdex_shape bad = good;
  bad.n_q_heads = 3;  // not a multiple of n_kv_heads
  EXPECT_EINVAL(kvdex_create(db_, "x", &bad));
  bad = good;
  bad.dtype = 9;
  EXPECT_EINVAL(kvdex_create(db_, "x", &bad));
  bad = good;
  bad.head_dim = 0;
  EXPECT_EINVAL(kvdex_create(db_, "x", &bad));
  bad = good;
  bad.n_layers = 0;
  EXPECT_EINVAL(kvdex_create(db_, "x", &bad));
  bad = good;
  bad.head_dim = 5000;
  EXPECT_EINVAL(kvdex_create(db_, "x", &bad));
  EXPECT_EINVAL(kvdex_delete(db_, nullptr, nullptr));
  EXPECT_EINVAL(kvdex_stat(db_, "ok", nullptr));
  kvdex_seq_info info;
  EXPECT_EINVAL(kvdex_stat(nullptr, "ok", &info));
  char **ids;
  size_t n;
  EXPECT_EINVAL(kvdex_list(db_, nullptr, &n));
  EXPECT_EINVAL(kvdex_list(db_, &ids, nullptr));

  // Append: every bad call poisons the stream; commit reports it and stores nothing.
  kvdex_appender *ap = nullptr;
  EXPECT_EINVAL(kvdex_append_begin(db_, "ok", nullptr));
  EXPECT_EINVAL(kvdex_append_begin(db_, "bad id!", &ap));
  std::vector<uint8_t> k = m.Block(0, 8, 4, false), v = m.Block(0, 8, 4, true);
  EXPECT_EINVAL(kvdex_append_kv(nullptr, 0, 8, 4, k.data(), v.data()));
  EXPECT_EINVAL(kvdex_append_commit(nullptr, nullptr));
  struct BadAppend {
    const char *what;
    uint32_t layer, n;
    bool null_k;
  } bad_appends[] = {{"NULL k", 0, 4, true}, {"layer", 2, 4, false}, {"n_tokens 0", 0, 0, false}};
  for (const BadAppend &b : bad_appends) {
    SCOPED_TRACE(b.what);
    ASSERT_EQ(kvdex_append_begin(db_, "ok", &ap), 0) << kvdex_errmsg();
    ASSERT_EQ(kvdex_append_kv(ap, 0, 8, 4, k.data(), v.data()), 0) << kvdex_errmsg();
    EXPECT_EINVAL(kvdex_append_kv(ap, b.layer, 12, b.n, b.null_k ? nullptr : k.data(), v.data()));
    EXPECT_EINVAL(kvdex_append_kv(ap, 0, 12, 4, k.data(), v.data()));  // poisoned
    EXPECT_EINVAL(kvdex_append_commit(ap, nullptr));
    EXPECT_EQ(LayerTokens(db_, "ok"), (std::vector<uint64_t>{8, 0}));
    // Barrier: an identical replay commits only once the server has dropped the
    // cancelled stream (gRPC learns of the cancel asynchronously).
    ASSERT_EQ(AppendPieces(db_, "ok", m, {{0, 0, 1}}), 0) << kvdex_errmsg();
  }
  // Bad sizes the store detects: a token id beyond the committed length.
  std::vector<uint64_t> rid = {3, 8};
  std::vector<uint8_t> rk(2 * 2 * m.row()), rv(rk.size());
  EXPECT_EINVAL(kvdex_read(db_, "ok", 0, rid.data(), 2, rk.data(), rv.data()));
  EXPECT_EINVAL(kvdex_read(db_, "ok", 2, rid.data(), 1, rk.data(), rv.data()));
  EXPECT_EINVAL(kvdex_read(db_, "ok", 0, rid.data(), 1, nullptr, rv.data()));
  EXPECT_EINVAL(kvdex_read(db_, "ok", 0, nullptr, 1, rk.data(), rv.data()));

  // Search.
  std::vector<float> q = RandomQuery(good, 82);
  const char *sids[] = {"ok"};
  const float *qs[] = {q.data()};
  const float *nullq[] = {nullptr};
  const char *nullid[] = {nullptr};
  kvdex_search_req req{4, 0, 0}, k0{0, 0, 0}, kbig{KVDEX_MAX_K + 1, 0, 0};
  kvdex_search_out out;
  EXPECT_EINVAL(kvdex_search(db_, 0, nullptr, 1, sids, qs, &out));
  EXPECT_EINVAL(kvdex_search(db_, 0, &k0, 1, sids, qs, &out));
  EXPECT_EINVAL(kvdex_search(db_, 0, &kbig, 1, sids, qs, &out));
  EXPECT_EINVAL(kvdex_search(db_, 0, &req, 1, nullptr, qs, &out));
  EXPECT_EINVAL(kvdex_search(db_, 0, &req, 1, sids, nullptr, &out));
  EXPECT_EINVAL(kvdex_search(db_, 0, &req, 1, sids, qs, nullptr));
  EXPECT_EINVAL(kvdex_search(db_, 0, &req, 1, sids, nullq, &out));
  EXPECT_EINVAL(kvdex_search(db_, 0, &req, 1, nullid, qs, &out));
  EXPECT_EINVAL(kvdex_search(db_, 2, &req, 1, sids, qs, &out));
  std::vector<float> nanq = q;
  nanq[5] = std::numeric_limits<float>::quiet_NaN();
  const float *nanqs[] = {nanq.data()};
  EXPECT_EINVAL(kvdex_search(db_, 0, &req, 1, sids, nanqs, &out));
  EXPECT_EQ(out.heads, nullptr);

  // The handle still works after all that.
  ASSERT_EQ(kvdex_search(db_, 0, &req, 1, sids, qs, &out), 0) << kvdex_errmsg();
  ExpectMatchesBrute(m, 0, 8, q.data(), req, out, "after bad args");
  kvdex_search_out_free(&out);
  kvdex_search_out_free(nullptr);
  kvdex_list_free(nullptr, 0);
  kvdex_close(nullptr);
}

// ---- many threads on one handle ---------------------------------------------------------

TEST_P(Contract, OneHandleServesManyThreads) {
  kvdex_shape s = Shape(1, 2, 4, 16, KVDEX_DTYPE_F16, 8);
  Create("mt-shared", s);
  Model m(s, 200, 91);
  ASSERT_EQ(AppendPieces(db_, "mt-shared", m, {{0, 0, 200}}), 0) << kvdex_errmsg();
  std::vector<float> q = RandomQuery(s, 92);
  const char *ids[] = {"mt-shared"};
  const float *qs[] = {q.data()};
  kvdex_search_req req{8, 2, 2};
  kvdex_search_out want;
  ASSERT_EQ(kvdex_search(db_, 0, &req, 1, ids, qs, &want), 0) << kvdex_errmsg();

  constexpr int kThreads = 4, kIters = 25;
  std::atomic<int> failures{0};
  std::vector<std::thread> th;
  for (int t = 0; t < kThreads; t++) {
    th.emplace_back([&, t] {
      std::string own = "mt-" + std::to_string(t);
      if (kvdex_create(db_, own.c_str(), &s) != 0) failures++;
      for (int it = 0; it < kIters; it++) {
        kvdex_search_out out;
        if (kvdex_search(db_, 0, &req, 1, ids, qs, &out) != 0) {
          failures++;
          continue;
        }
        for (uint32_t h = 0; h < 4; h++)
          if (out.heads[h].n != want.heads[h].n ||
              memcmp(out.heads[h].ids, want.heads[h].ids, want.heads[h].n * 8) != 0)
            failures++;
        kvdex_search_out_free(&out);
        // Each thread grows its own sequence, one token per stream, like decode.
        if (AppendPieces(db_, own.c_str(), m, {{0, (uint64_t)it, 1}}) != 0) failures++;
      }
    });
  }
  for (auto &x : th) x.join();
  EXPECT_EQ(failures.load(), 0);
  for (int t = 0; t < kThreads; t++) {
    std::string own = "mt-" + std::to_string(t);
    std::vector<uint64_t> n = LayerTokens(db_, own.c_str());
    EXPECT_EQ(n, (std::vector<uint64_t>{kIters}));
    ExpectStored(db_, own.c_str(), m, n);
  }
  kvdex_search_out_free(&want);
}

// ---- attend and retain ---------------------------------------------------------------------

// V element of the model, as f32.
float ValElem(const Model &m, uint32_t layer, size_t head, size_t t, size_t d) {
  float f;
  kvdex__to_f32(m.shape.dtype, &m.v[layer][((head * m.cap + t) * m.shape.head_dim + d) * m.esize],
               &f, 1);
  return f;
}

// Attention of query head qh over the token ids (deduplicated here), in double.
void RefAttend(const Model &m, uint32_t layer, const float *q, uint32_t qh,
               std::vector<uint64_t> ids, double scale, std::vector<double> *o, double *lse) {
  const uint32_t d = m.shape.head_dim, kv = qh / (m.shape.n_q_heads / m.shape.n_kv_heads);
  if (scale == 0) scale = 1.0 / std::sqrt((double)d);
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  o->assign(d, 0.0);
  if (ids.empty()) {
    *lse = -std::numeric_limits<double>::infinity();
    return;
  }
  std::vector<double> logit(ids.size());
  double mx = -1e300;
  for (size_t i = 0; i < ids.size(); i++) {
    double s = 0;
    for (uint32_t j = 0; j < d; j++) s += (double)q[(size_t)qh * d + j] * m.KeyElem(layer, kv, ids[i], j);
    logit[i] = scale * s;
    mx = std::max(mx, logit[i]);
  }
  double z = 0;
  for (size_t i = 0; i < ids.size(); i++) {
    double p = std::exp(logit[i] - mx);
    z += p;
    for (uint32_t j = 0; j < d; j++) (*o)[j] += p * ValElem(m, layer, kv, ids[i], j);
  }
  for (auto &x : *o) x /= z;
  *lse = mx + std::log(z);
}

std::vector<uint64_t> Range(uint64_t lo, uint64_t hi) {
  std::vector<uint64_t> r;
  for (uint64_t t = lo; t < hi; t++) r.push_back(t);
  return r;
}

// Checks o/lse of one query head against the reference over `ids`.
void ExpectHead(const Model &m, uint32_t layer, const float *q, uint32_t qh,
                const std::vector<uint64_t> &ids, double scale, const float *o, float lse,
                const std::string &what) {
  SCOPED_TRACE(what + " q head " + std::to_string(qh));
  std::vector<double> ro;
  double rlse;
  RefAttend(m, layer, q, qh, ids, scale, &ro, &rlse);
  if (std::isinf(rlse)) {
    EXPECT_TRUE(std::isinf(lse) && lse < 0) << lse;
    for (uint32_t j = 0; j < m.shape.head_dim; j++) EXPECT_EQ(o[j], 0.f);
    return;
  }
  EXPECT_NEAR(lse, rlse, 1e-4 * (1 + std::fabs(rlse)));
  for (uint32_t j = 0; j < m.shape.head_dim; j++)
    EXPECT_NEAR(o[j], ro[j], 1e-4 * (1 + std::fabs(ro[j]))) << "dim " << j;
}

struct AttendOut {
  std::vector<float> o, lse;
  kvdex_attend_info info{};
};

int Attend1(kvdex_db *db, const char *id, const kvdex_shape &s, uint32_t layer,
            const kvdex_attend_options &opts, const std::vector<float> &q, AttendOut *out,
            const std::vector<uint64_t> &extra = {}) {
  out->o.assign((size_t)s.n_q_heads * s.head_dim, 7.f);
  out->lse.assign(s.n_q_heads, 7.f);
  kvdex_attend_item it{id, q.data(), extra.empty() ? nullptr : extra.data(),
                       (uint32_t)extra.size()};
  float *o = out->o.data(), *lse = out->lse.data();
  return kvdex_attend(db, layer, &opts, 1, &it, &o, &lse, &out->info);
}

TEST_P(Contract, AttendDenseEqualsDoublePrecisionAttention) {
  for (int dtype : {KVDEX_DTYPE_F32, KVDEX_DTYPE_F16, KVDEX_DTYPE_BF16}) {
    SCOPED_TRACE(kvdex_dtype_name(dtype));
    std::string id = std::string("ad-") + kvdex_dtype_name(dtype);
    kvdex_shape s = Shape(2, 2, 4, 32, dtype, 16);
    Create(id.c_str(), s);
    Model m(s, 300, 31 + dtype);
    ASSERT_EQ(AppendPieces(db_, id.c_str(), m, {{0, 0, 300}, {1, 0, 100}}), 0) << kvdex_errmsg();
    for (float scale : {0.f, 0.3f}) {
      std::vector<float> q = RandomQuery(s, 7 + dtype);
      kvdex_attend_options opts{};
      opts.dense = 1;
      opts.sinks = 4;
      opts.window = 16;
      opts.scale = scale;
      AttendOut out;
      ASSERT_EQ(Attend1(db_, id.c_str(), s, 0, opts, q, &out), 0) << kvdex_errmsg();
      EXPECT_STREQ(out.info.index, "dense");
      EXPECT_EQ(out.info.tokens, 300u);
      EXPECT_EQ(out.info.attended, (uint64_t)s.n_q_heads * (300 - 4 - 16));
      // The store's time on the item: some, and well under the call's deadline.
      EXPECT_GT(out.info.seconds, 0.0);
      EXPECT_LT(out.info.seconds, 30.0);
      for (uint32_t h = 0; h < s.n_q_heads; h++)
        ExpectHead(m, 0, q.data(), h, Range(4, 284), scale, &out.o[h * 32], out.lse[h],
                   "dense");
      // Layer 1 over everything.
      opts.sinks = opts.window = 0;
      ASSERT_EQ(Attend1(db_, id.c_str(), s, 1, opts, q, &out), 0) << kvdex_errmsg();
      EXPECT_EQ(out.info.tokens, 100u);
      for (uint32_t h = 0; h < s.n_q_heads; h++)
        ExpectHead(m, 1, q.data(), h, Range(0, 100), scale, &out.o[h * 32], out.lse[h],
                   "dense layer 1");
    }
  }
}

TEST_P(Contract, AttendTopKEqualsAttentionOverTheExactTopKAndExtras) {
  kvdex_shape s = Shape(1, 2, 8, 32, KVDEX_DTYPE_F16, 16);  // GQA group of 4
  Create("atk", s);
  Model m(s, 400, 41);
  ASSERT_EQ(AppendPieces(db_, "atk", m, {{0, 0, 400}}), 0) << kvdex_errmsg();
  std::vector<float> q = RandomQuery(s, 42);
  for (uint32_t k : {1u, 10u, 64u}) {
    for (bool with_extra : {false, true}) {
      SCOPED_TRACE("k " + std::to_string(k) + (with_extra ? " extra" : ""));
      kvdex_attend_options opts{};
      opts.k = k;
      opts.sinks = 4;
      opts.window = 8;
      opts.index = "exact";
      std::vector<uint64_t> extra;
      if (with_extra) extra = {5, 200, 391, 200};
      AttendOut out;
      ASSERT_EQ(Attend1(db_, "atk", s, 0, opts, q, &out, extra), 0) << kvdex_errmsg();
      EXPECT_STREQ(out.info.index, "exact");
      EXPECT_EQ(out.info.tokens, 400u);
      EXPECT_GE(out.info.keys_touched, 1u);
      for (uint32_t h = 0; h < s.n_q_heads; h++) {
        std::vector<uint64_t> ids = extra;
        for (const Hit &x : BruteTopK(m, 0, 400, q.data(), h, k, 4, 8)) ids.push_back(x.id);
        ExpectHead(m, 0, q.data(), h, ids, 0, &out.o[h * 32], out.lse[h], "top-k");
      }
    }
  }
}

TEST_P(Contract, AttendMergedWithSinksAndWindowEqualsFullDenseAttention) {
  kvdex_shape s = Shape(1, 2, 4, 16, KVDEX_DTYPE_BF16, 8);
  Create("am", s);
  Model m(s, 200, 51);
  ASSERT_EQ(AppendPieces(db_, "am", m, {{0, 0, 200}}), 0) << kvdex_errmsg();
  std::vector<float> q = RandomQuery(s, 52);
  const uint32_t sinks = 4, window = 32, d = 16;
  kvdex_attend_options opts{};
  opts.dense = 1;
  opts.sinks = sinks;
  opts.window = window;
  AttendOut part;
  ASSERT_EQ(Attend1(db_, "am", s, 0, opts, q, &part), 0) << kvdex_errmsg();
  std::vector<uint64_t> own = Range(0, sinks);  // what the engine attends on its GPU
  for (uint64_t t = 200 - window; t < 200; t++) own.push_back(t);
  for (uint32_t h = 0; h < s.n_q_heads; h++) {
    std::vector<double> ro;
    double rlse;
    RefAttend(m, 0, q.data(), h, own, 0, &ro, &rlse);
    std::vector<float> eo(ro.begin(), ro.end()), mo(d);
    float mlse;
    kvdex_merge_partials(&part.o[h * d], part.lse[h], eo.data(), (float)rlse, d, mo.data(),
                         &mlse);
    ExpectHead(m, 0, q.data(), h, Range(0, 200), 0, mo.data(), mlse, "merged");
    // Merging with an empty side gives the other side unchanged.
    std::vector<float> zo(d, 0.f), out(d);
    float olse;
    kvdex_merge_partials(&part.o[h * d], part.lse[h], zo.data(), -INFINITY, d, out.data(), &olse);
    EXPECT_EQ(olse, part.lse[h]);
    EXPECT_EQ(0, memcmp(out.data(), &part.o[h * d], d * sizeof(float)));
  }
}

TEST_P(Contract, AttendStreamingHeadsGiveZeroAndMinusInfinity) {
  kvdex_shape s = Shape(1, 2, 4, 16, KVDEX_DTYPE_F32, 8);
  Create("as", s);
  Model m(s, 120, 61);
  ASSERT_EQ(AppendPieces(db_, "as", m, {{0, 0, 120}}), 0) << kvdex_errmsg();
  std::vector<float> q = RandomQuery(s, 62);
  const uint8_t streaming[4] = {1, 0, 0, 1};
  for (int dense : {0, 1}) {
    SCOPED_TRACE(dense ? "dense" : "top-k");
    kvdex_attend_options opts{};
    opts.k = 8;
    opts.dense = dense;
    opts.sinks = 2;
    opts.window = 4;
    AttendOut full, st;
    ASSERT_EQ(Attend1(db_, "as", s, 0, opts, q, &full), 0) << kvdex_errmsg();
    opts.streaming = streaming;
    ASSERT_EQ(Attend1(db_, "as", s, 0, opts, q, &st), 0) << kvdex_errmsg();
    for (uint32_t h = 0; h < 4; h++) {
      if (streaming[h]) {
        EXPECT_TRUE(std::isinf(st.lse[h]) && st.lse[h] < 0) << h;
        for (uint32_t j = 0; j < 16; j++) EXPECT_EQ(st.o[h * 16 + j], 0.f);
      } else {
        EXPECT_EQ(st.lse[h], full.lse[h]) << h;
        EXPECT_EQ(0, memcmp(&st.o[h * 16], &full.o[h * 16], 16 * sizeof(float))) << h;
      }
    }
    EXPECT_EQ(st.info.attended * 2, full.info.attended);
  }
}

TEST_P(Contract, BatchedAttendReturnsEachItemsOwnResultInOrder) {
  kvdex_shape sa = Shape(1, 1, 2, 16, KVDEX_DTYPE_F32, 8), sb = Shape(1, 2, 4, 8, KVDEX_DTYPE_F16, 8);
  Create("ba", sa);
  Create("bb", sb);
  Model ma(sa, 90, 71), mb(sb, 60, 72);
  ASSERT_EQ(AppendPieces(db_, "ba", ma, {{0, 0, 90}}), 0) << kvdex_errmsg();
  ASSERT_EQ(AppendPieces(db_, "bb", mb, {{0, 0, 60}}), 0) << kvdex_errmsg();
  std::vector<float> qa = RandomQuery(sa, 73), qb = RandomQuery(sb, 74);
  std::vector<uint64_t> extra_b = {30};
  kvdex_attend_item items[3] = {{"bb", qb.data(), extra_b.data(), 1},
                                {"ba", qa.data(), nullptr, 0},
                                {"bb", qb.data(), nullptr, 0}};
  std::vector<float> o0(4 * 8), o1(2 * 16), o2(4 * 8), l0(4), l1(2), l2(4);
  float *o[] = {o0.data(), o1.data(), o2.data()}, *lse[] = {l0.data(), l1.data(), l2.data()};
  kvdex_attend_info info[3];
  kvdex_attend_options opts{};
  opts.k = 5;
  opts.window = 2;
  ASSERT_EQ(kvdex_attend(db_, 0, &opts, 3, items, o, lse, info), 0) << kvdex_errmsg();
  EXPECT_EQ(info[0].tokens, 60u);
  EXPECT_EQ(info[1].tokens, 90u);
  EXPECT_EQ(info[2].tokens, 60u);
  for (uint32_t h = 0; h < 4; h++) {
    std::vector<uint64_t> ids = extra_b;
    for (const Hit &x : BruteTopK(mb, 0, 60, qb.data(), h, 5, 0, 2)) ids.push_back(x.id);
    ExpectHead(mb, 0, qb.data(), h, ids, 0, &o0[h * 8], l0[h], "item 0");
    ids.clear();
    for (const Hit &x : BruteTopK(mb, 0, 60, qb.data(), h, 5, 0, 2)) ids.push_back(x.id);
    ExpectHead(mb, 0, qb.data(), h, ids, 0, &o2[h * 8], l2[h], "item 2");
  }
  for (uint32_t h = 0; h < 2; h++) {
    std::vector<uint64_t> ids;
    for (const Hit &x : BruteTopK(ma, 0, 90, qa.data(), h, 5, 0, 2)) ids.push_back(x.id);
    ExpectHead(ma, 0, qa.data(), h, ids, 0, &o1[h * 16], l1[h], "item 1");
  }
  // One bad item fails the whole call and names it.
  items[2].seq_id = "nope";
  EXPECT_EQ(kvdex_attend(db_, 0, &opts, 3, items, o, lse, info), KVDEX_ENOTFOUND);
  EXPECT_NE(std::string(kvdex_errmsg()).find("nope"), std::string::npos) << kvdex_errmsg();
  EXPECT_EQ(info[0].tokens, 0u);
}

// Brute-force Retain: per kv head the `budget` best of the pooled attention mass.
std::vector<std::vector<std::pair<double, uint64_t>>> RefRetain(const Model &m, uint32_t layer,
                                                                 uint64_t n,
                                                                 const std::vector<float> &qobs,
                                                                 uint32_t n_obs, uint32_t pw,
                                                                 uint64_t sinks, uint64_t window) {
  const uint32_t nq = m.shape.n_q_heads, d = m.shape.head_dim, group = nq / m.shape.n_kv_heads;
  const uint64_t lo = sinks, hi = n - window;
  const double scale = 1.0 / std::sqrt((double)d);
  std::vector<std::vector<std::pair<double, uint64_t>>> out(m.shape.n_kv_heads);
  for (uint32_t g = 0; g < m.shape.n_kv_heads; g++) {
    std::vector<double> mass(hi - lo, 0.0);
    for (uint32_t ob = 0; ob < n_obs; ob++) {
      for (uint32_t h = g * group; h < (g + 1) * group; h++) {
        const float *q = &qobs[((size_t)ob * nq + h) * d];
        std::vector<double> lg(hi - lo);
        double mx = -1e300, z = 0;
        for (uint64_t t = lo; t < hi; t++) {
          double s = 0;
          for (uint32_t j = 0; j < d; j++) s += (double)q[j] * m.KeyElem(layer, g, t, j);
          lg[t - lo] = scale * s;
          mx = std::max(mx, lg[t - lo]);
        }
        for (auto &x : lg) z += std::exp(x - mx);
        for (size_t i = 0; i < lg.size(); i++) mass[i] += std::exp(lg[i] - mx) / z;
      }
    }
    for (uint64_t t = lo; t < hi; t++) {
      double best = -1;
      for (int64_t u = (int64_t)t - pw / 2; u <= (int64_t)t + pw / 2; u++)
        if (u >= (int64_t)lo && u < (int64_t)hi) best = std::max(best, mass[u - lo]);
      out[g].push_back({best, t});
    }
    std::sort(out[g].begin(), out[g].end(), [](const std::pair<double, uint64_t> &a,
                                               const std::pair<double, uint64_t> &b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
  }
  return out;
}

TEST_P(Contract, RetainEqualsBruteForceAndRetainedSearchAndAttendStayInside) {
  kvdex_shape s = Shape(1, 2, 4, 16, KVDEX_DTYPE_F32, 8);
  Create("rt", s);
  Model m(s, 200, 81);
  ASSERT_EQ(AppendPieces(db_, "rt", m, {{0, 0, 200}}), 0) << kvdex_errmsg();
  const uint32_t n_obs = 3, budget = 20, nq = 4, d = 16;
  std::vector<float> qobs((size_t)n_obs * nq * d);
  std::mt19937 rng(82);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  for (auto &x : qobs) x = u(rng);
  std::vector<float> q = RandomQuery(s, 83);
  // No retained set yet.
  kvdex_search_req sreq{};
  sreq.k = 5;
  sreq.index = "retained";
  const char *ids1[] = {"rt"};
  const float *qs[] = {q.data()};
  kvdex_search_out sout;
  EXPECT_EQ(kvdex_search(db_, 0, &sreq, 1, ids1, qs, &sout), KVDEX_ECONFLICT) << kvdex_errmsg();

  kvdex_retain_options ro{};
  ro.budget = budget;
  ro.pool_window = 3;
  ro.pooling = KVDEX_POOLING_MAX;
  ro.sinks = 2;
  ro.window = 10;
  std::vector<uint64_t> got(2 * budget);
  std::vector<float> scores(2 * budget);
  ASSERT_EQ(kvdex_retain(db_, "rt", 0, qobs.data(), n_obs, &ro, got.data(), scores.data()), 0)
      << kvdex_errmsg();
  auto ref = RefRetain(m, 0, 200, qobs, n_obs, 3, 2, 10);
  for (uint32_t g = 0; g < 2; g++) {
    SCOPED_TRACE("kv head " + std::to_string(g));
    std::vector<uint64_t> want;
    for (uint32_t i = 0; i < budget; i++) want.push_back(ref[g][i].second);
    std::sort(want.begin(), want.end());
    double edge = ref[g][budget - 1].first - ref[g][budget].first;
    std::vector<uint64_t> mine(got.begin() + g * budget, got.begin() + (g + 1) * budget);
    EXPECT_TRUE(std::is_sorted(mine.begin(), mine.end()));
    if (edge == 0 || edge > 1e-5) {  // no near-tie at the budget's edge
      EXPECT_EQ(mine, want);
    }
    for (uint32_t i = 0; i < budget; i++) {
      auto it = std::find_if(ref[g].begin(), ref[g].end(),
                             [&](const std::pair<double, uint64_t> &x) { return x.second == mine[i]; });
      ASSERT_NE(it, ref[g].end());
      EXPECT_NEAR(scores[g * budget + i], it->first, 1e-4 * (1 + it->first));
    }
  }
  // Not materialized: still no retained set.
  EXPECT_EQ(kvdex_search(db_, 0, &sreq, 1, ids1, qs, &sout), KVDEX_ECONFLICT);
  ro.materialize = 1;
  ASSERT_EQ(kvdex_retain(db_, "rt", 0, qobs.data(), n_obs, &ro, got.data(), nullptr), 0)
      << kvdex_errmsg();
  // Search "retained": only retained ids of the head's kv head, the best of them.
  ASSERT_EQ(kvdex_search(db_, 0, &sreq, 1, ids1, qs, &sout), 0) << kvdex_errmsg();
  EXPECT_STREQ(sout.index, "retained");
  for (uint32_t h = 0; h < nq; h++) {
    uint32_t g = h / 2;
    std::vector<uint64_t> kept(got.begin() + g * budget, got.begin() + (g + 1) * budget);
    ASSERT_EQ(sout.heads[h].n, 5u);
    for (uint32_t i = 0; i < sout.heads[h].n; i++)
      EXPECT_TRUE(std::binary_search(kept.begin(), kept.end(), sout.heads[h].ids[i]))
          << sout.heads[h].ids[i];
    // Brute force over the kept ids.
    std::vector<std::pair<double, uint64_t>> sc;
    for (uint64_t t : kept) {
      double v = 0;
      for (uint32_t j = 0; j < d; j++) v += (double)q[h * d + j] * m.KeyElem(0, g, t, j);
      sc.push_back({v, t});
    }
    std::sort(sc.begin(), sc.end(), [](auto &a, auto &b) { return a.first > b.first; });
    for (uint32_t i = 0; i < 5; i++) EXPECT_EQ(sout.heads[h].ids[i], sc[i].second) << i;
  }
  // Attend "retained" = attention over exactly those hits.
  kvdex_attend_options ao{};
  ao.k = 5;
  ao.index = "retained";
  AttendOut out;
  ASSERT_EQ(Attend1(db_, "rt", s, 0, ao, q, &out), 0) << kvdex_errmsg();
  EXPECT_STREQ(out.info.index, "retained");
  for (uint32_t h = 0; h < nq; h++) {
    std::vector<uint64_t> ids(sout.heads[h].ids, sout.heads[h].ids + sout.heads[h].n);
    ExpectHead(m, 0, q.data(), h, ids, 0, &out.o[h * d], out.lse[h], "retained");
  }
  kvdex_search_out_free(&sout);
}

TEST_P(Contract, BadAttendAndRetainAreRefusedAndChangeNothing) {
  kvdex_shape s = Shape(1, 2, 4, 8, KVDEX_DTYPE_F32, 8);
  Create("bad", s);
  Model m(s, 40, 91);
  ASSERT_EQ(AppendPieces(db_, "bad", m, {{0, 0, 40}}), 0) << kvdex_errmsg();
  kvdex_seq_info before;
  ASSERT_EQ(kvdex_stat(db_, "bad", &before), 0);
  std::vector<float> q = RandomQuery(s, 92);
  AttendOut out;
  kvdex_attend_options ao{};
  ao.k = 0;  // k = 0 without dense
  EXPECT_EQ(Attend1(db_, "bad", s, 0, ao, q, &out), KVDEX_EINVAL);
  EXPECT_STRNE(kvdex_errmsg(), "");
  ao.k = 4;
  EXPECT_EQ(Attend1(db_, "nope", s, 0, ao, q, &out), KVDEX_ENOTFOUND);
  EXPECT_EQ(Attend1(db_, "bad", s, 3, ao, q, &out), KVDEX_EINVAL);  // layer
  ao.index = "nonsense";
  EXPECT_EQ(Attend1(db_, "bad", s, 0, ao, q, &out), KVDEX_EINVAL);
  ao.index = "graph";  // no index built
  EXPECT_EQ(Attend1(db_, "bad", s, 0, ao, q, &out), KVDEX_ECONFLICT);
  ao.index = "retained";
  EXPECT_EQ(Attend1(db_, "bad", s, 0, ao, q, &out), KVDEX_ECONFLICT);
  ao.index = nullptr;
  ao.window = 5;
  EXPECT_EQ(Attend1(db_, "bad", s, 0, ao, q, &out, {38}), KVDEX_EINVAL);  // extra in window
  EXPECT_EQ(Attend1(db_, "bad", s, 0, ao, q, &out, {40}), KVDEX_EINVAL);  // not stored
  ao.scale = -1;
  EXPECT_EQ(Attend1(db_, "bad", s, 0, ao, q, &out), KVDEX_EINVAL);
  ao.scale = 0;
  std::vector<float> nanq = q;
  nanq[5] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(Attend1(db_, "bad", s, 0, ao, nanq, &out), KVDEX_EINVAL);
  EXPECT_NE(std::string(kvdex_errmsg()).find("finite"), std::string::npos) << kvdex_errmsg();
  ao.dense = 1;
  EXPECT_EQ(Attend1(db_, "bad", s, 0, ao, nanq, &out), KVDEX_EINVAL);

  std::vector<float> qobs(2 * 4 * 8, 0.5f);
  std::vector<uint64_t> ids(2 * 64);
  kvdex_retain_options ro{};
  ro.budget = 41;  // more than the tokens
  ro.materialize = 1;
  EXPECT_EQ(kvdex_retain(db_, "bad", 0, qobs.data(), 2, &ro, ids.data(), nullptr), KVDEX_EINVAL);
  ro.budget = 30;
  ro.window = 20;  // 20 eligible tokens
  EXPECT_EQ(kvdex_retain(db_, "bad", 0, qobs.data(), 2, &ro, ids.data(), nullptr), KVDEX_EINVAL);
  ro.window = 0;
  ro.budget = 0;
  EXPECT_EQ(kvdex_retain(db_, "bad", 0, qobs.data(), 2, &ro, ids.data(), nullptr), KVDEX_EINVAL);
  ro.budget = 4;
  ro.pool_window = 2;  // even
  EXPECT_EQ(kvdex_retain(db_, "bad", 0, qobs.data(), 2, &ro, ids.data(), nullptr), KVDEX_EINVAL);
  ro.pool_window = 3;
  EXPECT_EQ(kvdex_retain(db_, "bad", 0, qobs.data(), 0, &ro, ids.data(), nullptr), KVDEX_EINVAL);
  EXPECT_EQ(kvdex_retain(db_, "nope", 0, qobs.data(), 2, &ro, ids.data(), nullptr),
            KVDEX_ENOTFOUND);
  qobs[3] = std::numeric_limits<float>::infinity();
  EXPECT_EQ(kvdex_retain(db_, "bad", 0, qobs.data(), 2, &ro, ids.data(), nullptr), KVDEX_EINVAL);

  kvdex_seq_info after;
  ASSERT_EQ(kvdex_stat(db_, "bad", &after), 0);
  EXPECT_EQ(after.bytes, before.bytes);
  kvdex_seq_info_free(&before);
  kvdex_seq_info_free(&after);
  // Still no retained set after the refused materialize calls.
  ao = kvdex_attend_options{};
  ao.k = 2;
  ao.index = "retained";
  EXPECT_EQ(Attend1(db_, "bad", s, 0, ao, q, &out), KVDEX_ECONFLICT);
}

INSTANTIATE_TEST_SUITE_P(Transports, Contract, ::testing::Values("local", "grpc"),
                         [](const ::testing::TestParamInfo<std::string> &i) { return i.param; });

// ---- open ----------------------------------------------------------------------------------

TEST(Open, BadUrisAreEinvalAndNameTheAcceptedForms) {
  const char *bad[] = {"",
                       "local",
                       "local:x",
                       "LOCAL:",
                       "http://127.0.0.1:1",
                       "grpc://",
                       "grpc:/127.0.0.1:1",
                       "grpc://127.0.0.1",
                       "grpc://127.0.0.1:",
                       "grpc://:5000",
                       "grpc://host:port",
                       "grpc://host:0",
                       "grpc://host:65536",
                       "grpc://host:12x",
                       "grpc://::1:5000",
                       "grpc://[::1]",
                       "grpc://[::1:5000",
                       "grpc://[]:5000",
                       "grpc://ho st:5000",
                       // several hosts make a cluster (tests/cluster); a bad one still fails
                       "grpc://a:1,b"};
  for (const char *uri : bad) {
    kvdex_db *db = reinterpret_cast<kvdex_db *>(0x1);
    ResetErr();
    EXPECT_EQ(kvdex_open(uri, nullptr, &db), KVDEX_EINVAL) << uri;
    EXPECT_EQ(db, nullptr) << uri;
    std::string msg = kvdex_errmsg();
    EXPECT_NE(msg.find("local:"), std::string::npos) << uri << ": " << msg;
    EXPECT_NE(msg.find("grpc://host:port"), std::string::npos) << uri << ": " << msg;
  }
  kvdex_db *db = nullptr;
  EXPECT_EQ(kvdex_open(nullptr, nullptr, &db), KVDEX_EINVAL);
  EXPECT_EQ(kvdex_open("local:", nullptr, nullptr), KVDEX_EINVAL);
  kvdex_open_opts o{};
  o.name_space = "no spaces allowed";
  EXPECT_EQ(kvdex_open("local:", &o, &db), KVDEX_EINVAL);
  EXPECT_STRNE(kvdex_errmsg(), "");
  // Well-formed URIs open (gRPC connects lazily).
  for (const char *uri : {"local:", "grpc://localhost:5000", "grpc://[::1]:5000",
                          "grpc://127.0.0.1:65535", "grpc://kvdex-0.kvdex:7070"}) {
    ASSERT_EQ(kvdex_open(uri, nullptr, &db), 0) << uri << ": " << kvdex_errmsg();
    kvdex_close(db);
  }
}

// A port nothing listens on: bind one, then close it.
int ClosedPort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (fd < 0 || bind(fd, (sockaddr *)&a, sizeof a) || getsockname(fd, (sockaddr *)&a, &len))
    return -1;
  int port = ntohs(a.sin_port);
  close(fd);
  return port;
}

TEST(Open, GrpcToAClosedPortIsEunavail) {
  int port = ClosedPort();
  ASSERT_GT(port, 0);
  kvdex_open_opts o{};
  o.timeout_ms = 5000;
  kvdex_db *db = nullptr;
  std::string uri = "grpc://127.0.0.1:" + std::to_string(port);
  ASSERT_EQ(kvdex_open(uri.c_str(), &o, &db), 0) << kvdex_errmsg();
  kvdex_shape s = Shape(1, 1, 1, 4, KVDEX_DTYPE_F32);
  ResetErr();
  EXPECT_EQ(kvdex_create(db, "x", &s), KVDEX_EUNAVAIL) << kvdex_errmsg();
  EXPECT_STRNE(kvdex_errmsg(), "");
  kvdex_seq_info info;
  EXPECT_EQ(kvdex_stat(db, "x", &info), KVDEX_EUNAVAIL);
  kvdex_appender *ap = nullptr;
  EXPECT_EQ(kvdex_append_begin(db, "x", &ap), KVDEX_EUNAVAIL);
  float q[1] = {1};
  const char *ids[] = {"x"};
  const float *qs[] = {q};
  kvdex_search_req req{1, 0, 0};
  kvdex_search_out out;
  EXPECT_EQ(kvdex_search(db, 0, &req, 1, ids, qs, &out), KVDEX_EUNAVAIL);
  kvdex_close(db);
}

}  // namespace
