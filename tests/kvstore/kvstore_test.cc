// Tests of kvstore: round trips through views and reads for every dtype and several
// shapes, idempotent replay, conflicts and gaps, the memory cap, allocation failure,
// abort, delete with references held, concurrent appends with readers, and argument
// validation. Data is a pure function of (seq, layer, head, token, dim, K/V) so any
// reader can check any row it sees. No timing assertions.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "kvstore/kvstore.h"
#include "kvstore/kvstore_int.h"

namespace {

// ---- deterministic data -------------------------------------------------------

uint64_t Mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}

float Gen(uint32_t tag, uint32_t layer, uint32_t head, uint64_t tok, uint32_t dim, int kv) {
  uint64_t x = Mix(tag * 0x9E3779B97F4A7C15ull + layer);
  x = Mix(x ^ (head * 0xC2B2AE3D27D4EB4Full + (uint64_t)kv));
  x = Mix(x ^ (tok * 0x165667B19E3779F9ull + dim));
  return (float)((int)(x & 0xffff) - 32768) / 256.0f;
}

void PutElem(int dtype, float f, uint8_t *dst) {
  if (dtype == KVDEX_DTYPE_F32) {
    memcpy(dst, &f, 4);
  } else {
    uint16_t h = dtype == KVDEX_DTYPE_F16 ? kvdex__f32_to_f16(f) : kvdex__f32_to_bf16(f);
    memcpy(dst, &h, 2);
  }
}

size_t RowBytes(const kvdex_shape &s) { return s.head_dim * kvdex_dtype_size(s.dtype); }

// One row (head_dim elements) of the generated data.
std::vector<uint8_t> Row(const kvdex_shape &s, uint32_t tag, uint32_t layer, uint32_t head,
                         uint64_t tok, int kv) {
  size_t es = kvdex_dtype_size(s.dtype);
  std::vector<uint8_t> r(RowBytes(s));
  for (uint32_t d = 0; d < s.head_dim; d++) PutElem(s.dtype, Gen(tag, layer, head, tok, d, kv), &r[d * es]);
  return r;
}

// Tokens [start, start+n) of a layer, layout [n_kv_heads][n][head_dim].
std::vector<uint8_t> Rows(const kvdex_shape &s, uint32_t tag, uint32_t layer, uint64_t start,
                          uint32_t n, int kv) {
  size_t rb = RowBytes(s);
  std::vector<uint8_t> out((size_t)s.n_kv_heads * n * rb);
  for (uint32_t h = 0; h < s.n_kv_heads; h++)
    for (uint32_t i = 0; i < n; i++) {
      std::vector<uint8_t> r = Row(s, tag, layer, h, start + i, kv);
      memcpy(&out[((size_t)h * n + i) * rb], r.data(), rb);
    }
  return out;
}

kvdex_shape Shape(uint32_t layers, uint32_t kvh, uint32_t qh, uint32_t dim, uint32_t bt,
                  int dtype) {
  kvdex_shape s;
  s.n_layers = layers;
  s.n_kv_heads = kvh;
  s.n_q_heads = qh;
  s.head_dim = dim;
  s.block_tokens = bt;
  s.dtype = dtype;
  return s;
}

// Checks every committed row of (layer, head) through a view, and block alignment.
// Returns the number of bad rows.
uint64_t CheckView(kvdex_seq *seq, uint32_t tag, uint32_t layer, uint32_t head,
                   uint64_t expect_tokens = UINT64_MAX) {
  const kvdex_shape &s = *kvdex_seq_shape(seq);
  kvdex_kv_view v;
  EXPECT_EQ(0, kvdex_seq_view(seq, layer, head, &v)) << kvdex_errmsg();
  if (expect_tokens != UINT64_MAX) {
    EXPECT_EQ(expect_tokens, v.n_tokens);
  }
  EXPECT_EQ(s.block_tokens, v.block_tokens);
  EXPECT_EQ(s.head_dim, v.head_dim);
  EXPECT_EQ(s.dtype, v.dtype);
  size_t rb = RowBytes(s);
  uint64_t bad = 0;
  for (uint64_t t = 0; t < v.n_tokens; t++) {
    uint64_t b = t / v.block_tokens, off = t % v.block_tokens;
    if (off == 0) {
      EXPECT_EQ(0u, (uintptr_t)v.k_blocks[b] % 64) << "block " << b;
      EXPECT_EQ(0u, (uintptr_t)v.v_blocks[b] % 64) << "block " << b;
    }
    for (int kv = 0; kv < 2; kv++) {
      const uint8_t *p = (const uint8_t *)(kv ? v.v_blocks[b] : v.k_blocks[b]) + off * rb;
      if (memcmp(p, Row(s, tag, layer, head, t, kv).data(), rb) != 0) bad++;
    }
  }
  return bad;
}

// Checks the given token ids of a layer through kvdex_seq_read.
void CheckRead(kvdex_seq *seq, uint32_t tag, uint32_t layer, const std::vector<uint64_t> &ids) {
  const kvdex_shape &s = *kvdex_seq_shape(seq);
  size_t rb = RowBytes(s), n = ids.size();
  std::vector<uint8_t> k(s.n_kv_heads * n * rb), v(s.n_kv_heads * n * rb);
  ASSERT_EQ(0, kvdex_seq_read(seq, layer, ids.data(), n, k.data(), v.data())) << kvdex_errmsg();
  for (uint32_t h = 0; h < s.n_kv_heads; h++)
    for (size_t i = 0; i < n; i++) {
      EXPECT_EQ(0, memcmp(&k[(h * n + i) * rb], Row(s, tag, layer, h, ids[i], 0).data(), rb))
          << "K layer " << layer << " head " << h << " token " << ids[i];
      EXPECT_EQ(0, memcmp(&v[(h * n + i) * rb], Row(s, tag, layer, h, ids[i], 1).data(), rb))
          << "V layer " << layer << " head " << h << " token " << ids[i];
    }
}

class KvstoreTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(0, kvdex_store_create(0, &store_)); }
  void TearDown() override { kvdex_store_destroy(store_); }

  void MakeStore(uint64_t cap) {
    kvdex_store_destroy(store_);
    store_ = nullptr;
    ASSERT_EQ(0, kvdex_store_create(cap, &store_));
  }
  kvdex_seq *Create(const char *id, const kvdex_shape &s, const char *ns = nullptr) {
    EXPECT_EQ(0, kvdex_seq_create(store_, ns, id, &s)) << kvdex_errmsg();
    kvdex_seq *seq = nullptr;
    EXPECT_EQ(0, kvdex_seq_open(store_, ns, id, &seq)) << kvdex_errmsg();
    return seq;
  }
  // Appends generated tokens [start, start+n) of a layer in a transaction of its own.
  int Append(kvdex_seq *seq, uint32_t tag, uint32_t layer, uint64_t start, uint32_t n,
             kvdex_txn_result *res = nullptr) {
    const kvdex_shape &s = *kvdex_seq_shape(seq);
    kvdex_txn *txn = nullptr;
    int rc = kvdex_txn_begin(seq, &txn);
    if (rc) return rc;
    auto k = Rows(s, tag, layer, start, n, 0), v = Rows(s, tag, layer, start, n, 1);
    rc = kvdex_txn_append(txn, layer, start, n, k.data(), v.data());
    if (rc) {
      kvdex_txn_abort(txn);
      return rc;
    }
    return kvdex_txn_commit(txn, res);
  }
  kvdex_store_stats Stats() {
    kvdex_store_stats st;
    kvdex_store_stats_get(store_, &st);
    return st;
  }
  kvdex_store *store_ = nullptr;
};

// ---- validation ---------------------------------------------------------------

TEST_F(KvstoreTest, ShapeCheck) {
  kvdex_shape good = Shape(32, 8, 32, 128, 64, KVDEX_DTYPE_F16);
  EXPECT_EQ(0, kvdex__shape_check(&good));
  kvdex_shape s = good;
  s.block_tokens = 0;  // default
  EXPECT_EQ(0, kvdex__shape_check(&s));
  s = Shape(1024, 1024, 1024, 1024, 65536, KVDEX_DTYPE_BF16);
  EXPECT_EQ(0, kvdex__shape_check(&s));

  std::vector<kvdex_shape> bad;
  s = good; s.n_layers = 0; bad.push_back(s);
  s = good; s.n_layers = 1025; bad.push_back(s);
  s = good; s.n_kv_heads = 0; bad.push_back(s);
  s = good; s.n_kv_heads = 1025; s.n_q_heads = 1025; bad.push_back(s);
  s = good; s.n_q_heads = 0; bad.push_back(s);
  s = good; s.n_q_heads = 12; bad.push_back(s);  // not a multiple of 8
  s = good; s.n_q_heads = 4; bad.push_back(s);   // fewer than kv heads
  s = good; s.n_q_heads = 1032; bad.push_back(s);
  s = good; s.head_dim = 0; bad.push_back(s);
  s = good; s.head_dim = 1025; bad.push_back(s);
  s = good; s.block_tokens = 65537; bad.push_back(s);
  s = good; s.dtype = 0; bad.push_back(s);
  s = good; s.dtype = 4; bad.push_back(s);
  for (size_t i = 0; i < bad.size(); i++) {
    SCOPED_TRACE(i);
    kvdex__seterr(0, "%s", "");
    EXPECT_EQ(KVDEX_EINVAL, kvdex__shape_check(&bad[i]));
    EXPECT_STRNE("", kvdex_errmsg());
    EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_create(store_, "ns", "x", &bad[i]));
    EXPECT_STRNE("", kvdex_errmsg());
  }
  EXPECT_EQ(KVDEX_EINVAL, kvdex__shape_check(nullptr));
  EXPECT_EQ(0u, Stats().n_sequences);
  EXPECT_EQ(0u, Stats().bytes_used);
}

TEST_F(KvstoreTest, NameCheck) {
  EXPECT_EQ(0, kvdex__name_check("tenant-1.a_b", "req:42/part.1_x-y"));
  EXPECT_EQ(0, kvdex__name_check(nullptr, "s"));
  EXPECT_EQ(0, kvdex__name_check("", "s"));
  EXPECT_EQ(0, kvdex__name_check(std::string(64, 'n').c_str(), std::string(256, 's').c_str()));
  struct Bad { const char *ns; std::string id; };
  std::vector<Bad> bad = {
      {"a", ""},
      {"a:b", "s"},  // ':' only in ids
      {"a/b", "s"},
      {"a b", "s"},
      {"a", "s p"},
      {"a", "s\xc3\xa9"},
      {"a", "s*"},
      {"a", std::string(257, 's')},
  };
  std::string long_ns(65, 'n');
  bad.push_back({long_ns.c_str(), "s"});
  kvdex_shape s = Shape(1, 1, 1, 4, 4, KVDEX_DTYPE_F32);
  for (size_t i = 0; i < bad.size(); i++) {
    SCOPED_TRACE(i);
    kvdex__seterr(0, "%s", "");
    EXPECT_EQ(KVDEX_EINVAL, kvdex__name_check(bad[i].ns, bad[i].id.c_str()));
    EXPECT_STRNE("", kvdex_errmsg());
    EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_create(store_, bad[i].ns, bad[i].id.c_str(), &s));
    EXPECT_STRNE("", kvdex_errmsg());
  }
  EXPECT_EQ(KVDEX_EINVAL, kvdex__name_check("a", nullptr));
  EXPECT_STRNE("", kvdex_errmsg());
  EXPECT_EQ(0u, Stats().n_sequences);
}

TEST_F(KvstoreTest, CreateOpenDeleteAndDefaultNamespace) {
  kvdex_shape s = Shape(2, 2, 4, 8, 0, KVDEX_DTYPE_F16);
  EXPECT_EQ(0, kvdex_seq_create(store_, nullptr, "a", &s));
  EXPECT_EQ(KVDEX_EEXIST, kvdex_seq_create(store_, "default", "a", &s));
  EXPECT_STRNE("", kvdex_errmsg());
  EXPECT_EQ(0, kvdex_seq_create(store_, "other", "a", &s));  // other namespace
  kvdex_seq *seq = nullptr;
  ASSERT_EQ(0, kvdex_seq_open(store_, "", "a", &seq));
  EXPECT_STREQ("default", kvdex_seq_namespace(seq));
  EXPECT_STREQ("a", kvdex_seq_id(seq));
  EXPECT_EQ(64u, kvdex_seq_shape(seq)->block_tokens);  // 0 resolved to the default
  EXPECT_EQ(8u, kvdex_seq_shape(seq)->head_dim);
  EXPECT_EQ(0u, kvdex_seq_tokens(seq, 0));
  EXPECT_GT(kvdex_seq_bytes(seq), 0u);
  kvdex_kv_view v;
  ASSERT_EQ(0, kvdex_seq_view(seq, 1, 1, &v));
  EXPECT_EQ(0u, v.n_tokens);
  kvdex_seq_release(seq);
  EXPECT_EQ(2u, Stats().n_sequences);
  EXPECT_EQ(KVDEX_ENOTFOUND, kvdex_seq_open(store_, "nope", "a", &seq));
  EXPECT_EQ(nullptr, seq);
  EXPECT_STRNE("", kvdex_errmsg());
  EXPECT_EQ(KVDEX_ENOTFOUND, kvdex_seq_delete(store_, "default", "b", nullptr));
  uint64_t freed = 0;
  EXPECT_EQ(0, kvdex_seq_delete(store_, "default", "a", &freed));
  EXPECT_GT(freed, 0u);
  EXPECT_EQ(KVDEX_ENOTFOUND, kvdex_seq_delete(store_, nullptr, "a", nullptr));
  EXPECT_EQ(0, kvdex_seq_delete(store_, "other", "a", nullptr));
  EXPECT_EQ(0u, Stats().n_sequences);
  EXPECT_EQ(0u, Stats().bytes_used);
  kvdex_seq_release(nullptr);  // no-op
  kvdex_txn_abort(nullptr);    // no-op
}

TEST_F(KvstoreTest, ManySequencesRehash) {
  kvdex_shape s = Shape(1, 1, 1, 4, 4, KVDEX_DTYPE_F32);
  for (int i = 0; i < 500; i++)
    ASSERT_EQ(0, kvdex_seq_create(store_, i % 2 ? "odd" : "even", std::to_string(i).c_str(), &s));
  EXPECT_EQ(500u, Stats().n_sequences);
  for (int i = 0; i < 500; i++) {
    kvdex_seq *seq = nullptr;
    ASSERT_EQ(0, kvdex_seq_open(store_, i % 2 ? "odd" : "even", std::to_string(i).c_str(), &seq));
    kvdex_seq_release(seq);
    EXPECT_EQ(KVDEX_ENOTFOUND,
              kvdex_seq_open(store_, i % 2 ? "even" : "odd", std::to_string(i).c_str(), &seq));
  }
  for (int i = 0; i < 500; i += 3)
    ASSERT_EQ(0, kvdex_seq_delete(store_, i % 2 ? "odd" : "even", std::to_string(i).c_str(), nullptr));
  EXPECT_EQ(500u - 167u, Stats().n_sequences);
}

// ---- round trips -------------------------------------------------------------

TEST_F(KvstoreTest, RoundTripShapesAndDtypes) {
  std::vector<kvdex_shape> shapes = {
      Shape(1, 1, 1, 1, 1, KVDEX_DTYPE_F32),    Shape(2, 2, 4, 8, 3, KVDEX_DTYPE_F16),
      Shape(3, 4, 8, 64, 64, KVDEX_DTYPE_BF16), Shape(2, 1, 7, 5, 16, KVDEX_DTYPE_F32),
      Shape(1, 3, 3, 3, 5, KVDEX_DTYPE_F16),    Shape(2, 2, 2, 128, 0, KVDEX_DTYPE_F16),
      Shape(2, 2, 6, 33, 7, KVDEX_DTYPE_BF16),
  };
  const uint32_t chunks[] = {1, 2, 3, 5, 64, 1, 100, 7, 63, 65, 129, 1, 1, 31};
  for (size_t si = 0; si < shapes.size(); si++) {
    const kvdex_shape &s = shapes[si];
    SCOPED_TRACE("shape " + std::to_string(si));
    std::string id = "rt" + std::to_string(si);
    uint32_t tag = 100 + (uint32_t)si;
    kvdex_seq *seq = Create(id.c_str(), s);
    ASSERT_NE(nullptr, seq);
    std::vector<uint64_t> len(s.n_layers, 0);
    size_t ci = si;
    uint64_t total_appended = 0;
    // Several transactions, each appending one or more chunks to one or more layers.
    for (int round = 0; round < 8; round++) {
      std::vector<uint64_t> committed = len;
      kvdex_txn *txn = nullptr;
      ASSERT_EQ(0, kvdex_txn_begin(seq, &txn)) << kvdex_errmsg();
      uint64_t appended = 0;
      for (uint32_t l = 0; l < s.n_layers; l++) {
        if ((round + l) % 3 == 2) continue;  // layers advance unevenly
        for (int j = 0; j <= (round % 2); j++) {
          uint32_t n = chunks[ci++ % (sizeof chunks / sizeof chunks[0])];
          auto k = Rows(s, tag, l, len[l], n, 0), v = Rows(s, tag, l, len[l], n, 1);
          ASSERT_EQ(0, kvdex_txn_append(txn, l, len[l], n, k.data(), v.data())) << kvdex_errmsg();
          len[l] += n;
          appended += n;
        }
      }
      // Nothing is visible before commit.
      for (uint32_t l = 0; l < s.n_layers; l++) EXPECT_EQ(committed[l], kvdex_seq_tokens(seq, l));
      kvdex_txn_result res;
      ASSERT_EQ(0, kvdex_txn_commit(txn, &res)) << kvdex_errmsg();
      EXPECT_EQ(appended, res.tokens_appended);
      EXPECT_EQ(0u, res.tokens_replayed);
      total_appended += appended;
      for (uint32_t l = 0; l < s.n_layers; l++) EXPECT_EQ(len[l], kvdex_seq_tokens(seq, l));
    }
    EXPECT_GT(total_appended, 0u);
    for (uint32_t l = 0; l < s.n_layers; l++) {
      for (uint32_t h = 0; h < s.n_kv_heads; h++)
        EXPECT_EQ(0u, CheckView(seq, tag, l, h, len[l])) << "layer " << l << " head " << h;
      if (len[l] == 0) continue;
      std::vector<uint64_t> ids = {len[l] - 1, 0, len[l] / 2, len[l] - 1};
      std::mt19937_64 rng(si * 31 + l);
      for (int i = 0; i < 20; i++) ids.push_back(rng() % len[l]);
      CheckRead(seq, tag, l, ids);
    }
    // Reading only K or only V works too.
    if (len[0] > 0) {
      uint64_t id0 = len[0] - 1;
      std::vector<uint8_t> buf(s.n_kv_heads * RowBytes(s));
      ASSERT_EQ(0, kvdex_seq_read(seq, 0, &id0, 1, nullptr, buf.data()));
      EXPECT_EQ(0, memcmp(buf.data(), Row(s, tag, 0, 0, id0, 1).data(), RowBytes(s)));
    }
    kvdex_seq_release(seq);
  }
}

TEST_F(KvstoreTest, StagedTokensInvisibleUntilCommit) {
  kvdex_shape s = Shape(2, 2, 2, 16, 8, KVDEX_DTYPE_F32);
  kvdex_seq *seq = Create("s", s);
  ASSERT_EQ(0, Append(seq, 1, 0, 0, 10));
  kvdex_txn *txn = nullptr;
  ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
  auto k = Rows(s, 1, 0, 10, 30, 0), v = Rows(s, 1, 0, 10, 30, 1);
  ASSERT_EQ(0, kvdex_txn_append(txn, 0, 10, 30, k.data(), v.data()));
  EXPECT_EQ(10u, kvdex_seq_tokens(seq, 0));
  kvdex_kv_view view;
  ASSERT_EQ(0, kvdex_seq_view(seq, 0, 1, &view));
  EXPECT_EQ(10u, view.n_tokens);
  uint64_t id = 10;
  std::vector<uint8_t> out(2 * RowBytes(s));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_read(seq, 0, &id, 1, out.data(), out.data()));
  ASSERT_EQ(0, kvdex_txn_commit(txn, nullptr));
  EXPECT_EQ(40u, kvdex_seq_tokens(seq, 0));
  EXPECT_EQ(0u, CheckView(seq, 1, 0, 1, 40));
  kvdex_seq_release(seq);
}

// An old view stays valid while the arrays it points at are replaced by growth.
TEST_F(KvstoreTest, OldViewSurvivesArrayGrowth) {
  kvdex_shape s = Shape(1, 2, 2, 4, 2, KVDEX_DTYPE_F16);
  kvdex_seq *seq = Create("g", s);
  ASSERT_EQ(0, Append(seq, 5, 0, 0, 3));
  kvdex_kv_view old;
  ASSERT_EQ(0, kvdex_seq_view(seq, 0, 1, &old));
  ASSERT_EQ(3u, old.n_tokens);
  for (uint64_t t = 3; t < 1000; t += 7) ASSERT_EQ(0, Append(seq, 5, 0, t, 7));
  size_t rb = RowBytes(s);
  for (uint64_t t = 0; t < old.n_tokens; t++) {
    const uint8_t *p = (const uint8_t *)old.k_blocks[t / 2] + (t % 2) * rb;
    EXPECT_EQ(0, memcmp(p, Row(s, 5, 0, 1, t, 0).data(), rb));
  }
  EXPECT_EQ(0u, CheckView(seq, 5, 0, 1, 1004));
  kvdex_seq_release(seq);
}

// ---- idempotency --------------------------------------------------------------

TEST_F(KvstoreTest, IdenticalReplayIsNoop) {
  kvdex_shape s = Shape(2, 2, 4, 16, 8, KVDEX_DTYPE_BF16);
  kvdex_seq *seq = Create("r", s);
  ASSERT_EQ(0, Append(seq, 7, 0, 0, 100));
  ASSERT_EQ(0, Append(seq, 7, 1, 0, 20));
  uint64_t used = Stats().bytes_used, sbytes = kvdex_seq_bytes(seq);
  kvdex_txn_result res;
  ASSERT_EQ(0, Append(seq, 7, 0, 0, 100, &res)) << kvdex_errmsg();
  EXPECT_EQ(0u, res.tokens_appended);
  EXPECT_EQ(100u, res.tokens_replayed);
  ASSERT_EQ(0, Append(seq, 7, 0, 37, 13, &res));  // a replay inside, across blocks
  EXPECT_EQ(13u, res.tokens_replayed);
  EXPECT_EQ(100u, kvdex_seq_tokens(seq, 0));
  EXPECT_EQ(20u, kvdex_seq_tokens(seq, 1));
  EXPECT_EQ(used, Stats().bytes_used);
  EXPECT_EQ(sbytes, kvdex_seq_bytes(seq));
  for (uint32_t h = 0; h < 2; h++) EXPECT_EQ(0u, CheckView(seq, 7, 0, h, 100));
  kvdex_seq_release(seq);
}

TEST_F(KvstoreTest, PartialOverlapReplayPlusNewTail) {
  kvdex_shape s = Shape(1, 3, 3, 10, 16, KVDEX_DTYPE_F16);
  kvdex_seq *seq = Create("p", s);
  ASSERT_EQ(0, Append(seq, 9, 0, 0, 50));
  kvdex_txn_result res;
  ASSERT_EQ(0, Append(seq, 9, 0, 30, 50, &res)) << kvdex_errmsg();
  EXPECT_EQ(20u, res.tokens_replayed);
  EXPECT_EQ(30u, res.tokens_appended);
  EXPECT_EQ(80u, kvdex_seq_tokens(seq, 0));
  for (uint32_t h = 0; h < 3; h++) EXPECT_EQ(0u, CheckView(seq, 9, 0, h, 80));
  // Overlap with tokens staged earlier in the same transaction counts as replay too.
  kvdex_txn *txn = nullptr;
  ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
  auto k1 = Rows(s, 9, 0, 80, 10, 0), v1 = Rows(s, 9, 0, 80, 10, 1);
  auto k2 = Rows(s, 9, 0, 85, 20, 0), v2 = Rows(s, 9, 0, 85, 20, 1);
  ASSERT_EQ(0, kvdex_txn_append(txn, 0, 80, 10, k1.data(), v1.data()));
  ASSERT_EQ(0, kvdex_txn_append(txn, 0, 85, 20, k2.data(), v2.data())) << kvdex_errmsg();
  ASSERT_EQ(0, kvdex_txn_commit(txn, &res));
  EXPECT_EQ(25u, res.tokens_appended);
  EXPECT_EQ(5u, res.tokens_replayed);
  for (uint32_t h = 0; h < 3; h++) EXPECT_EQ(0u, CheckView(seq, 9, 0, h, 105));
  kvdex_seq_release(seq);
}

TEST_F(KvstoreTest, ConflictingRewriteRefusedAndNothingChanges) {
  kvdex_shape s = Shape(2, 2, 2, 8, 16, KVDEX_DTYPE_F32);
  kvdex_seq *seq = Create("c", s);
  ASSERT_EQ(0, Append(seq, 3, 0, 0, 50));
  ASSERT_EQ(0, Append(seq, 3, 1, 0, 50));
  uint64_t used = Stats().bytes_used, alloc_bytes = Stats().allocator_bytes;

  kvdex_txn *txn = nullptr;
  ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
  // A good append to layer 1 first, then a conflicting one to layer 0.
  auto k1 = Rows(s, 3, 1, 50, 30, 0), v1 = Rows(s, 3, 1, 50, 30, 1);
  ASSERT_EQ(0, kvdex_txn_append(txn, 1, 50, 30, k1.data(), v1.data()));
  auto k = Rows(s, 3, 0, 40, 20, 0), v = Rows(s, 3, 0, 40, 20, 1);
  size_t rb = RowBytes(s);
  v[(1 * 20 + 5) * rb + 3] ^= 1;  // V of kv head 1, token 45, one byte
  EXPECT_EQ(KVDEX_ECONFLICT, kvdex_txn_append(txn, 0, 40, 20, k.data(), v.data()));
  std::string msg = kvdex_errmsg();
  EXPECT_NE(std::string::npos, msg.find("tokens [40,50) of layer 0 differ from stored data")) << msg;
  EXPECT_NE(std::string::npos, msg.find("token 45")) << msg;
  // Poisoned: later appends fail with the same code, commit returns it and aborts.
  auto k2 = Rows(s, 3, 1, 80, 5, 0), v2 = Rows(s, 3, 1, 80, 5, 1);
  EXPECT_EQ(KVDEX_ECONFLICT, kvdex_txn_append(txn, 1, 80, 5, k2.data(), v2.data()));
  kvdex_txn_result res;
  EXPECT_EQ(KVDEX_ECONFLICT, kvdex_txn_commit(txn, &res));
  EXPECT_NE(std::string::npos, std::string(kvdex_errmsg()).find("differ")) << kvdex_errmsg();
  EXPECT_EQ(50u, kvdex_seq_tokens(seq, 0));
  EXPECT_EQ(50u, kvdex_seq_tokens(seq, 1));
  EXPECT_EQ(used, Stats().bytes_used);
  EXPECT_EQ(alloc_bytes, Stats().allocator_bytes);
  for (uint32_t l = 0; l < 2; l++)
    for (uint32_t h = 0; h < 2; h++) EXPECT_EQ(0u, CheckView(seq, 3, l, h, 50));
  // A conflict in K of the last stored token, as a single-token replay.
  ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));  // the slot is free again
  auto k3 = Rows(s, 3, 0, 49, 1, 0), v3 = Rows(s, 3, 0, 49, 1, 1);
  k3[0] ^= 0x80;
  EXPECT_EQ(KVDEX_ECONFLICT, kvdex_txn_append(txn, 0, 49, 1, k3.data(), v3.data()));
  kvdex_txn_abort(txn);
  EXPECT_EQ(50u, kvdex_seq_tokens(seq, 0));
  kvdex_seq_release(seq);
}

TEST_F(KvstoreTest, GapRefused) {
  kvdex_shape s = Shape(2, 1, 1, 4, 4, KVDEX_DTYPE_F16);
  kvdex_seq *seq = Create("gap", s);
  ASSERT_EQ(0, Append(seq, 1, 0, 0, 10));
  uint64_t used = Stats().bytes_used;
  EXPECT_EQ(KVDEX_ECONFLICT, Append(seq, 1, 0, 11, 5));
  EXPECT_NE(std::string::npos, std::string(kvdex_errmsg()).find("gap")) << kvdex_errmsg();
  EXPECT_EQ(KVDEX_ECONFLICT, Append(seq, 1, 1, 1, 5));  // empty layer, start 1
  EXPECT_EQ(10u, kvdex_seq_tokens(seq, 0));
  EXPECT_EQ(0u, kvdex_seq_tokens(seq, 1));
  EXPECT_EQ(used, Stats().bytes_used);
  // Gap relative to the staged length: [10,15) staged, then 16 is a gap, 15 is not.
  kvdex_txn *txn = nullptr;
  ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
  auto k = Rows(s, 1, 0, 10, 5, 0), v = Rows(s, 1, 0, 10, 5, 1);
  ASSERT_EQ(0, kvdex_txn_append(txn, 0, 10, 5, k.data(), v.data()));
  auto k2 = Rows(s, 1, 0, 16, 1, 0), v2 = Rows(s, 1, 0, 16, 1, 1);
  EXPECT_EQ(KVDEX_ECONFLICT, kvdex_txn_append(txn, 0, 16, 1, k2.data(), v2.data()));
  EXPECT_EQ(KVDEX_ECONFLICT, kvdex_txn_commit(txn, nullptr));
  EXPECT_EQ(10u, kvdex_seq_tokens(seq, 0));
  EXPECT_EQ(used, Stats().bytes_used);
  kvdex_seq_release(seq);
}

// ---- memory ------------------------------------------------------------------

TEST_F(KvstoreTest, MemoryCapRefusesAndChangesNothing) {
  MakeStore(1 << 20);
  // One block pair = 2 * 64 tokens * 128 dims * 4 bytes = 64 KiB.
  kvdex_shape s = Shape(1, 1, 1, 128, 64, KVDEX_DTYPE_F32);
  kvdex_seq *seq = Create("cap", s);
  EXPECT_EQ(65536u, kvdex__seq_block_pair_bytes(seq));
  ASSERT_EQ(0, Append(seq, 2, 0, 0, 640)) << kvdex_errmsg();  // 10 blocks
  kvdex_store_stats before = Stats();
  EXPECT_EQ(uint64_t{1} << 20, before.bytes_cap);
  uint64_t sbytes = kvdex_seq_bytes(seq);

  kvdex_txn *txn = nullptr;
  ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
  auto k = Rows(s, 2, 0, 640, 64, 0), v = Rows(s, 2, 0, 640, 64, 1);
  ASSERT_EQ(0, kvdex_txn_append(txn, 0, 640, 64, k.data(), v.data()));  // 11th block fits
  auto k2 = Rows(s, 2, 0, 704, 640, 0), v2 = Rows(s, 2, 0, 704, 640, 1);
  EXPECT_EQ(KVDEX_ENOMEM, kvdex_txn_append(txn, 0, 704, 640, k2.data(), v2.data()));
  std::string msg = kvdex_errmsg();
  EXPECT_NE(std::string::npos, msg.find("memory cap of 1048576 bytes reached")) << msg;
  EXPECT_NE(std::string::npos, msg.find("need")) << msg;
  EXPECT_EQ(KVDEX_ENOMEM, kvdex_txn_commit(txn, nullptr));
  EXPECT_EQ(640u, kvdex_seq_tokens(seq, 0));
  EXPECT_EQ(before.bytes_used, Stats().bytes_used);
  EXPECT_EQ(before.allocator_bytes, Stats().allocator_bytes);
  EXPECT_EQ(sbytes, kvdex_seq_bytes(seq));
  EXPECT_EQ(0u, CheckView(seq, 2, 0, 0, 640));
  // What fits still goes in.
  ASSERT_EQ(0, Append(seq, 2, 0, 640, 100)) << kvdex_errmsg();
  EXPECT_EQ(0u, CheckView(seq, 2, 0, 0, 740));
  EXPECT_LE(Stats().bytes_used, uint64_t{1} << 20);
  kvdex_seq_release(seq);

  // A sequence whose metadata alone exceeds the cap is refused.
  MakeStore(4096);
  kvdex_shape big = Shape(1024, 8, 8, 128, 64, KVDEX_DTYPE_F16);
  EXPECT_EQ(KVDEX_ENOMEM, kvdex_seq_create(store_, "n", "big", &big));
  EXPECT_NE(std::string::npos, std::string(kvdex_errmsg()).find("memory cap")) << kvdex_errmsg();
  EXPECT_EQ(0u, Stats().bytes_used);
  EXPECT_EQ(0u, Stats().n_sequences);
}

// Allocation failures at every point of an append leave everything as it was.
TEST_F(KvstoreTest, AllocationFailureChangesNothing) {
  kvdex_shape s = Shape(1, 3, 3, 8, 4, KVDEX_DTYPE_F16);
  kvdex_seq *seq = Create("oom", s);
  ASSERT_EQ(0, Append(seq, 4, 0, 0, 6));
  kvdex__alloc *a = kvdex__store_alloc(store_);
  // 6 -> 60 tokens: 15 blocks per head, pointer arrays grow: 3 arrays + 39 blocks.
  for (int64_t n = 0; n < 45; n++) {
    SCOPED_TRACE(n);
    kvdex_store_stats before = Stats();
    kvdex__alloc_fail_after(a, n);
    int rc = Append(seq, 4, 0, 6, 54);
    kvdex__alloc_fail_after(a, -1);
    if (rc == 0) {
      EXPECT_GE(n, 42);
      EXPECT_EQ(60u, kvdex_seq_tokens(seq, 0));
      break;
    }
    EXPECT_EQ(KVDEX_ENOMEM, rc);
    EXPECT_NE(std::string::npos, std::string(kvdex_errmsg()).find("out of memory")) << kvdex_errmsg();
    EXPECT_EQ(6u, kvdex_seq_tokens(seq, 0));
    EXPECT_EQ(before.bytes_used, Stats().bytes_used);
    EXPECT_EQ(before.allocator_bytes, Stats().allocator_bytes);
  }
  EXPECT_EQ(60u, kvdex_seq_tokens(seq, 0));
  for (uint32_t h = 0; h < 3; h++) EXPECT_EQ(0u, CheckView(seq, 4, 0, h, 60));
  // And in seq_create.
  kvdex__alloc_fail_after(a, 0);
  EXPECT_EQ(KVDEX_ENOMEM, kvdex_seq_create(store_, "n", "x", &s));
  kvdex__alloc_fail_after(a, -1);
  EXPECT_EQ(1u, Stats().n_sequences);
  kvdex_seq_release(seq);
}

TEST_F(KvstoreTest, AbortFreesEverythingStaged) {
  kvdex_shape s = Shape(3, 2, 4, 32, 8, KVDEX_DTYPE_F16);
  kvdex_seq *seq = Create("ab", s);
  ASSERT_EQ(0, Append(seq, 6, 0, 0, 13));
  kvdex_store_stats before = Stats();
  uint64_t sbytes = kvdex_seq_bytes(seq);
  kvdex_txn *txn = nullptr;
  ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
  for (uint32_t l = 0; l < 3; l++) {
    uint64_t start = l == 0 ? 13 : 0;
    for (int j = 0; j < 5; j++) {  // several appends: arrays grow more than once
      auto k = Rows(s, 99, l, start, 37, 0), v = Rows(s, 99, l, start, 37, 1);
      ASSERT_EQ(0, kvdex_txn_append(txn, l, start, 37, k.data(), v.data()));
      start += 37;
    }
  }
  EXPECT_GT(Stats().bytes_used, before.bytes_used + 3 * 2 * 20 * 1024);
  EXPECT_GT(Stats().allocator_bytes, before.allocator_bytes);
  kvdex_txn_abort(txn);
  EXPECT_EQ(before.bytes_used, Stats().bytes_used);
  EXPECT_EQ(before.allocator_bytes, Stats().allocator_bytes);
  EXPECT_EQ(sbytes, kvdex_seq_bytes(seq));
  EXPECT_EQ(13u, kvdex_seq_tokens(seq, 0));
  EXPECT_EQ(0u, kvdex_seq_tokens(seq, 1));
  // The same range again with other data is no conflict: aborted data is gone.
  ASSERT_EQ(0, Append(seq, 6, 0, 13, 50)) << kvdex_errmsg();
  ASSERT_EQ(0, Append(seq, 6, 1, 0, 50)) << kvdex_errmsg();
  for (uint32_t h = 0; h < 2; h++) {
    EXPECT_EQ(0u, CheckView(seq, 6, 0, h, 63));
    EXPECT_EQ(0u, CheckView(seq, 6, 1, h, 50));
  }
  kvdex_seq_release(seq);
}

TEST_F(KvstoreTest, StatsAccounting) {
  kvdex_store_stats st = Stats();
  EXPECT_EQ(0u, st.bytes_used);
  EXPECT_EQ(0u, st.bytes_cap);
  EXPECT_EQ(0u, st.n_sequences);
  kvdex_shape s = Shape(4, 2, 8, 64, 32, KVDEX_DTYPE_BF16);
  kvdex_seq *seq = Create("st", s);
  uint64_t meta = Stats().bytes_used;
  EXPECT_EQ(meta, kvdex_seq_bytes(seq));
  for (uint32_t l = 0; l < 4; l++) ASSERT_EQ(0, Append(seq, 1, l, 0, 100));
  st = Stats();
  EXPECT_EQ(st.bytes_used, kvdex_seq_bytes(seq));
  // 4 blocks per (layer, head) of 2 * 32 * 64 * 2 bytes, plus pointer arrays.
  uint64_t blocks = 4ull * 2 * 4 * 2 * 32 * 64 * 2;
  EXPECT_GE(st.bytes_used, meta + blocks);
  EXPECT_LE(st.bytes_used, meta + blocks + 4 * 2 * 512);
  // Every accounted byte comes from the store's allocator, which rounds up a little.
  EXPECT_GE(st.allocator_bytes, st.bytes_used);
  EXPECT_LE(st.allocator_bytes, 2 * st.bytes_used + 4096);
  kvdex_seq_release(seq);
}

TEST_F(KvstoreTest, DeleteReturnsBytes) {
  kvdex_shape s0 = Shape(1, 1, 1, 8, 8, KVDEX_DTYPE_F32);
  kvdex_seq *keep = Create("keep", s0);
  ASSERT_EQ(0, Append(keep, 1, 0, 0, 20));
  kvdex_store_stats base = Stats();

  kvdex_shape s = Shape(2, 4, 4, 64, 16, KVDEX_DTYPE_F16);
  kvdex_seq *seq = Create("del", s);
  for (uint32_t l = 0; l < 2; l++)
    for (uint64_t t = 0; t < 300; t += 60) ASSERT_EQ(0, Append(seq, 2, l, t, 60));
  kvdex_store_stats full = Stats();
  EXPECT_EQ(base.n_sequences + 1, full.n_sequences);
  uint64_t sbytes = kvdex_seq_bytes(seq);
  EXPECT_EQ(full.bytes_used - base.bytes_used, sbytes);
  kvdex_seq_release(seq);

  uint64_t freed = 0;
  ASSERT_EQ(0, kvdex_seq_delete(store_, nullptr, "del", &freed));
  EXPECT_EQ(sbytes, freed);
  kvdex_store_stats after = Stats();
  EXPECT_EQ(base.bytes_used, after.bytes_used);
  EXPECT_EQ(base.n_sequences, after.n_sequences);
  EXPECT_LT(after.allocator_bytes, full.allocator_bytes);
  EXPECT_LE(after.allocator_bytes + 300 * 2 * 4 * 2 * 64 * 2, full.allocator_bytes);
  EXPECT_EQ(base.allocator_bytes, after.allocator_bytes);
  EXPECT_EQ(0u, CheckView(keep, 1, 0, 0, 20));
  kvdex_seq_release(keep);
}

TEST_F(KvstoreTest, ViewValidAcrossDeleteWhileReferenced) {
  kvdex_shape s = Shape(2, 2, 2, 16, 8, KVDEX_DTYPE_BF16);
  kvdex_seq *seq = Create("v", s);
  ASSERT_EQ(0, Append(seq, 8, 1, 0, 77));
  kvdex_kv_view view;
  ASSERT_EQ(0, kvdex_seq_view(seq, 1, 1, &view));
  uint64_t used = Stats().bytes_used;
  uint64_t freed = 0;
  ASSERT_EQ(0, kvdex_seq_delete(store_, nullptr, "v", &freed));
  EXPECT_EQ(used, freed);
  EXPECT_EQ(0u, Stats().n_sequences);
  EXPECT_EQ(used, Stats().bytes_used);  // still held by our reference
  kvdex_seq *again = nullptr;
  EXPECT_EQ(KVDEX_ENOTFOUND, kvdex_seq_open(store_, nullptr, "v", &again));
  // The name is free at once: a new sequence of the same name is independent.
  kvdex_seq *fresh = Create("v", s);
  ASSERT_NE(fresh, seq);
  EXPECT_EQ(0u, kvdex_seq_tokens(fresh, 1));
  ASSERT_EQ(0, Append(fresh, 9, 1, 0, 5));
  // The old view still reads the old data, and so does the old handle.
  size_t rb = RowBytes(s);
  for (uint64_t t = 0; t < view.n_tokens; t++) {
    const uint8_t *p = (const uint8_t *)view.v_blocks[t / 8] + (t % 8) * rb;
    ASSERT_EQ(0, memcmp(p, Row(s, 8, 1, 1, t, 1).data(), rb)) << t;
  }
  EXPECT_EQ(0u, CheckView(seq, 8, 1, 0, 77));
  EXPECT_EQ(77u, kvdex_seq_tokens(seq, 1));
  // Writes to a deleted sequence are refused.
  kvdex_txn *txn = nullptr;
  EXPECT_EQ(KVDEX_ENOTFOUND, kvdex_txn_begin(seq, &txn));
  EXPECT_STRNE("", kvdex_errmsg());
  uint64_t fresh_bytes = kvdex_seq_bytes(fresh);
  kvdex_seq_release(seq);
  EXPECT_EQ(fresh_bytes, Stats().bytes_used);
  EXPECT_EQ(0u, CheckView(fresh, 9, 1, 1, 5));
  kvdex_seq_release(fresh);
}

TEST_F(KvstoreTest, DeleteDuringTransaction) {
  kvdex_shape s = Shape(1, 1, 1, 8, 4, KVDEX_DTYPE_F32);
  kvdex_seq *seq = Create("d", s);
  kvdex_txn *txn = nullptr;
  ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
  kvdex_seq_release(seq);  // the transaction holds its own reference
  auto k = Rows(s, 1, 0, 0, 10, 0), v = Rows(s, 1, 0, 0, 10, 1);
  ASSERT_EQ(0, kvdex_txn_append(txn, 0, 0, 10, k.data(), v.data()));
  ASSERT_EQ(0, kvdex_seq_delete(store_, nullptr, "d", nullptr));
  EXPECT_GT(Stats().bytes_used, 0u);
  EXPECT_EQ(KVDEX_ENOTFOUND, kvdex_txn_append(txn, 0, 10, 10, k.data(), v.data()));
  EXPECT_EQ(KVDEX_ENOTFOUND, kvdex_txn_commit(txn, nullptr));
  EXPECT_EQ(0u, Stats().bytes_used);
}

TEST_F(KvstoreTest, OneTransactionPerSequence) {
  kvdex_shape s = Shape(1, 1, 1, 4, 4, KVDEX_DTYPE_F16);
  kvdex_seq *a = Create("a", s), *b = Create("b", s);
  kvdex_txn *t1 = nullptr, *t2 = nullptr, *t3 = nullptr;
  ASSERT_EQ(0, kvdex_txn_begin(a, &t1));
  EXPECT_EQ(KVDEX_EBUSY, kvdex_txn_begin(a, &t2));
  EXPECT_EQ(nullptr, t2);
  EXPECT_STRNE("", kvdex_errmsg());
  ASSERT_EQ(0, kvdex_txn_begin(b, &t3));  // other sequences are independent
  kvdex_txn_abort(t3);
  ASSERT_EQ(0, kvdex_txn_commit(t1, nullptr));  // empty commit is fine
  ASSERT_EQ(0, kvdex_txn_begin(a, &t2));
  kvdex_txn_abort(t2);
  kvdex_seq_release(a);
  kvdex_seq_release(b);
}

TEST_F(KvstoreTest, AppendAndReadValidation) {
  kvdex_shape s = Shape(2, 2, 2, 4, 4, KVDEX_DTYPE_F32);
  kvdex_seq *seq = Create("val", s);
  ASSERT_EQ(0, Append(seq, 1, 0, 0, 8));
  auto k = Rows(s, 1, 0, 8, 4, 0), v = Rows(s, 1, 0, 8, 4, 1);
  struct Case { uint32_t layer; uint64_t start; uint32_t n; const void *k, *v; };
  std::vector<Case> cases = {
      {2, 8, 4, k.data(), v.data()},
      {UINT32_MAX, 8, 4, k.data(), v.data()},
      {0, 8, 0, k.data(), v.data()},
      {0, 8, 4, nullptr, v.data()},
      {0, 8, 4, k.data(), nullptr},
      {0, UINT64_MAX - 1, 4, k.data(), v.data()},  // overflow of start + n
  };
  uint64_t used = Stats().bytes_used;
  for (size_t i = 0; i < cases.size(); i++) {
    SCOPED_TRACE(i);
    kvdex_txn *txn = nullptr;
    ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
    kvdex__seterr(0, "%s", "");
    EXPECT_EQ(KVDEX_EINVAL, kvdex_txn_append(txn, cases[i].layer, cases[i].start, cases[i].n,
                                             cases[i].k, cases[i].v));
    EXPECT_STRNE("", kvdex_errmsg());
    // Poisoned: even a good append is refused, commit returns the first error.
    EXPECT_EQ(KVDEX_EINVAL, kvdex_txn_append(txn, 0, 8, 4, k.data(), v.data()));
    EXPECT_EQ(KVDEX_EINVAL, kvdex_txn_commit(txn, nullptr));
    EXPECT_STRNE("", kvdex_errmsg());
    EXPECT_EQ(8u, kvdex_seq_tokens(seq, 0));
    EXPECT_EQ(used, Stats().bytes_used);
  }
  EXPECT_EQ(KVDEX_EINVAL, kvdex_txn_append(nullptr, 0, 0, 1, k.data(), v.data()));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_txn_commit(nullptr, nullptr));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_txn_begin(seq, nullptr));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_txn_begin(nullptr, nullptr));

  // Reads: ids beyond the committed length write nothing.
  std::vector<uint8_t> out(2 * 3 * RowBytes(s), 0xAB);
  std::vector<uint64_t> ids = {0, 7, 8};
  EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_read(seq, 0, ids.data(), 3, out.data(), out.data()));
  EXPECT_NE(std::string::npos, std::string(kvdex_errmsg()).find("token 8")) << kvdex_errmsg();
  for (uint8_t c : out) ASSERT_EQ(0xAB, c);
  EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_read(seq, 2, ids.data(), 2, out.data(), out.data()));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_read(seq, 0, nullptr, 2, out.data(), out.data()));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_read(seq, 0, ids.data(), 2, nullptr, nullptr));
  EXPECT_EQ(0, kvdex_seq_read(seq, 0, nullptr, 0, nullptr, nullptr));
  kvdex_kv_view view;
  EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_view(seq, 2, 0, &view));
  EXPECT_STRNE("", kvdex_errmsg());
  EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_view(seq, 0, 2, &view));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_view(seq, 0, 0, nullptr));
  EXPECT_EQ(0u, kvdex_seq_tokens(seq, 2));
  kvdex_seq_release(seq);
}

// ---- listing -----------------------------------------------------------------

TEST_F(KvstoreTest, ListVisitsWithReferences) {
  kvdex_shape s = Shape(1, 1, 1, 4, 4, KVDEX_DTYPE_F16);
  for (int i = 0; i < 10; i++)
    ASSERT_EQ(0, kvdex_seq_create(store_, i < 6 ? "a" : "b", ("s" + std::to_string(i)).c_str(), &s));
  struct Ctx { std::set<std::string> seen; kvdex_store *store; bool del; };
  auto visit = [](void *p, kvdex_seq *seq) {
    Ctx *c = (Ctx *)p;
    c->seen.insert(std::string(kvdex_seq_namespace(seq)) + "/" + kvdex_seq_id(seq));
    if (c->del) {  // the callback may delete (even the visited) sequence
      EXPECT_EQ(0, kvdex_seq_delete(c->store, kvdex_seq_namespace(seq), kvdex_seq_id(seq), nullptr));
      EXPECT_EQ(0u, kvdex_seq_tokens(seq, 0));  // still readable: a reference is held
    }
  };
  Ctx all{{}, store_, false};
  kvdex_store_list(store_, nullptr, visit, &all);
  EXPECT_EQ(10u, all.seen.size());
  Ctx a{{}, store_, false};
  kvdex_store_list(store_, "a", visit, &a);
  EXPECT_EQ(6u, a.seen.size());
  EXPECT_TRUE(a.seen.count("a/s0"));
  EXPECT_FALSE(a.seen.count("b/s7"));
  Ctx none{{}, store_, false};
  kvdex_store_list(store_, "zz", visit, &none);
  EXPECT_EQ(0u, none.seen.size());
  Ctx del{{}, store_, true};
  kvdex_store_list(store_, "b", visit, &del);
  EXPECT_EQ(4u, del.seen.size());
  EXPECT_EQ(6u, Stats().n_sequences);
  Ctx rest{{}, store_, false};
  kvdex_store_list(store_, "", visit, &rest);
  EXPECT_EQ(6u, rest.seen.size());
}

// ---- concurrency -------------------------------------------------------------

// Writers append to their own sequences (some transactions aborted with poison data
// that must never become visible); readers check every committed row they see; a
// third kind creates, lists and deletes other sequences meanwhile.
TEST_F(KvstoreTest, ConcurrentAppendsAndReaders) {
  const int kWriters = 4, kReaders = 2, kTxns = 120;
  kvdex_shape s = Shape(3, 2, 4, 16, 16, KVDEX_DTYPE_F16);
  std::vector<kvdex_seq *> seqs;
  for (int w = 0; w < kWriters; w++) seqs.push_back(Create(("w" + std::to_string(w)).c_str(), s));
  std::atomic<int> writers_left{kWriters};
  std::atomic<uint64_t> errors{0}, bad_rows{0}, checks{0};

  auto writer = [&](int w) {
    kvdex_seq *seq = seqs[w];
    std::mt19937 rng(w + 1);
    std::vector<uint64_t> len(s.n_layers, 0);
    for (int i = 0; i < kTxns; i++) {
      bool abort = i % 7 == 3;
      uint32_t tag = abort ? 9999 : (uint32_t)w;
      kvdex_txn *txn = nullptr;
      if (kvdex_txn_begin(seq, &txn) != 0) { errors++; continue; }
      for (uint32_t l = 0; l < s.n_layers; l++) {
        uint32_t n = 1 + rng() % 37;
        uint64_t back = abort ? 0 : std::min<uint64_t>(len[l], rng() % 5);  // some replay
        uint64_t start = len[l] - back;
        auto k = Rows(s, tag, l, start, n, 0), v = Rows(s, tag, l, start, n, 1);
        if (kvdex_txn_append(txn, l, start, n, k.data(), v.data()) != 0) errors++;
        if (!abort) len[l] = std::max(len[l], start + n);
      }
      if (abort) {
        kvdex_txn_abort(txn);
      } else if (kvdex_txn_commit(txn, nullptr) != 0) {
        errors++;
      }
    }
    for (uint32_t l = 0; l < s.n_layers; l++)
      if (kvdex_seq_tokens(seq, l) != len[l]) errors++;
    writers_left--;
  };

  auto reader = [&](int r) {
    std::mt19937 rng(100 + r);
    std::vector<uint64_t> last(kWriters * s.n_layers, 0);
    size_t rb = RowBytes(s);
    while (writers_left.load() > 0) {
      int w = rng() % kWriters;
      kvdex_seq *seq = nullptr;
      if (kvdex_seq_open(store_, nullptr, ("w" + std::to_string(w)).c_str(), &seq) != 0) {
        errors++;
        continue;
      }
      uint32_t l = rng() % s.n_layers, h = rng() % s.n_kv_heads;
      kvdex_kv_view v;
      if (kvdex_seq_view(seq, l, h, &v) != 0) {
        ADD_FAILURE() << kvdex_errmsg();
        errors++;
        kvdex_seq_release(seq);
        continue;
      }
      if (v.n_tokens < last[w * s.n_layers + l]) errors++;  // lengths never go back
      last[w * s.n_layers + l] = v.n_tokens;
      for (uint64_t t = 0; t < v.n_tokens; t++) {
        // (The block index is computed apart: GCC 12's UBSan mis-instruments a
        // division inside the subscript of a conditional expression.)
        uint64_t b = t / v.block_tokens, off = t % v.block_tokens;
        for (int kv = 0; kv < 2; kv++) {
          const void *const *blocks = kv ? v.v_blocks : v.k_blocks;
          const uint8_t *p = (const uint8_t *)blocks[b] + off * rb;
          if (memcmp(p, Row(s, w, l, h, t, kv).data(), rb) != 0) bad_rows++;
        }
      }
      if (v.n_tokens > 0) {
        uint64_t id = rng() % v.n_tokens;
        std::vector<uint8_t> k(s.n_kv_heads * rb), vv(s.n_kv_heads * rb);
        if (kvdex_seq_read(seq, l, &id, 1, k.data(), vv.data()) != 0) errors++;
        for (uint32_t hh = 0; hh < s.n_kv_heads; hh++)
          if (memcmp(&k[hh * rb], Row(s, w, l, hh, id, 0).data(), rb) ||
              memcmp(&vv[hh * rb], Row(s, w, l, hh, id, 1).data(), rb))
            bad_rows++;
      }
      checks++;
      kvdex_seq_release(seq);
    }
  };

  auto churn = [&]() {
    kvdex_shape cs = Shape(1, 1, 1, 8, 4, KVDEX_DTYPE_F32);
    int i = 0;
    while (writers_left.load() > 0) {
      std::string id = "tmp" + std::to_string(i++ % 8);
      if (kvdex_seq_create(store_, "churn", id.c_str(), &cs) == 0) {
        kvdex_seq *seq = nullptr;
        if (kvdex_seq_open(store_, "churn", id.c_str(), &seq) == 0) {
          auto k = Rows(cs, 5, 0, 0, 9, 0), v = Rows(cs, 5, 0, 0, 9, 1);
          kvdex_txn *txn = nullptr;
          if (kvdex_txn_begin(seq, &txn) == 0) {
            if (kvdex_txn_append(txn, 0, 0, 9, k.data(), v.data()) != 0) errors++;
            if (kvdex_txn_commit(txn, nullptr) != 0) errors++;
          }
          kvdex_seq_release(seq);
        }
      }
      kvdex_store_list(store_, nullptr, [](void *, kvdex_seq *seq) { (void)kvdex_seq_bytes(seq); },
                       nullptr);
      kvdex_seq_delete(store_, "churn", ("tmp" + std::to_string((i * 3) % 8)).c_str(), nullptr);
    }
  };

  std::vector<std::thread> threads;
  for (int w = 0; w < kWriters; w++) threads.emplace_back(writer, w);
  for (int r = 0; r < kReaders; r++) threads.emplace_back(reader, r);
  threads.emplace_back(churn);
  for (auto &t : threads) t.join();
  EXPECT_EQ(0u, errors.load());
  EXPECT_EQ(0u, bad_rows.load());
  EXPECT_GT(checks.load(), 0u);
  for (int w = 0; w < kWriters; w++) {
    for (uint32_t l = 0; l < s.n_layers; l++)
      for (uint32_t h = 0; h < s.n_kv_heads; h++) EXPECT_EQ(0u, CheckView(seqs[w], w, l, h));
    kvdex_seq_release(seqs[w]);
  }
}

// Destroying a store with sequences, views and an open transaction frees everything
// (ASan's leak check is the assertion).
TEST(KvstoreDestroy, FreesEverything) {
  kvdex_store *st = nullptr;
  ASSERT_EQ(0, kvdex_store_create(0, &st));
  kvdex_shape s = Shape(2, 2, 2, 8, 4, KVDEX_DTYPE_F16);
  for (int i = 0; i < 5; i++) {
    std::string id = "s" + std::to_string(i);
    ASSERT_EQ(0, kvdex_seq_create(st, nullptr, id.c_str(), &s));
    kvdex_seq *seq = nullptr;
    ASSERT_EQ(0, kvdex_seq_open(st, nullptr, id.c_str(), &seq));
    kvdex_txn *txn = nullptr;
    ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
    auto k = Rows(s, 1, 0, 0, 11, 0), v = Rows(s, 1, 0, 0, 11, 1);
    ASSERT_EQ(0, kvdex_txn_append(txn, 0, 0, 11, k.data(), v.data()));
    if (i % 2) {
      ASSERT_EQ(0, kvdex_txn_commit(txn, nullptr));
    }
    kvdex_seq_release(seq);
  }
  kvdex_store_destroy(st);
  kvdex_store_destroy(nullptr);
}

TEST(KvstoreAlloc, BackendAndAlignment) {
  kvdex__alloc *a = nullptr;
  ASSERT_EQ(0, kvdex__alloc_create(&a));
  std::string backend = kvdex__alloc_backend();
  EXPECT_TRUE(backend == "jemalloc" || backend == "malloc") << backend;
  uint64_t base = kvdex__alloc_live_bytes(a);
  std::vector<std::pair<void *, size_t>> ps;
  for (size_t sz : {1, 63, 64, 100, 4096, 20000, 1 << 20}) {
    void *p = kvdex__alloc_malloc(a, sz);
    ASSERT_NE(nullptr, p);
    EXPECT_EQ(0u, (uintptr_t)p % KVDEX__ALLOC_ALIGN);
    memset(p, 1, sz);
    ps.push_back({p, sz});
  }
  unsigned char *z = (unsigned char *)kvdex__alloc_zalloc(a, 5000);
  ASSERT_NE(nullptr, z);
  for (int i = 0; i < 5000; i++) ASSERT_EQ(0, z[i]);
  ps.push_back({z, 5000});
  uint64_t live = kvdex__alloc_live_bytes(a);
  EXPECT_GE(live, base + (1 << 20) + 20000 + 4096 + 5000);
  kvdex__alloc_fail_after(a, 1);
  void *ok = kvdex__alloc_malloc(a, 10);
  EXPECT_NE(nullptr, ok);
  EXPECT_EQ(nullptr, kvdex__alloc_malloc(a, 10));
  kvdex__alloc_fail_after(a, -1);
  kvdex__alloc_free(a, ok, 10);
  for (auto &p : ps) kvdex__alloc_free(a, p.first, p.second);
  kvdex__alloc_free(a, nullptr, 0);
  EXPECT_EQ(base, kvdex__alloc_live_bytes(a));
  kvdex__alloc_destroy(a);
  kvdex__alloc_destroy(nullptr);
}

// ---- attachments ----------------------------------------------------------------

// An attached object that counts its frees.
struct Obj {
  std::atomic<int> *frees;
  int tag;
};
void FreeObj(void *p) {
  Obj *o = static_cast<Obj *>(p);
  o->frees->fetch_add(1);
  delete o;
}

TEST_F(KvstoreTest, AttachAccountsReplacesAndFreesWithTheSequence) {
  std::atomic<int> frees{0};
  kvdex_seq *seq = Create("att", Shape(3, 1, 2, 8, 4, KVDEX_DTYPE_F32));
  ASSERT_EQ(0, Append(seq, 1, 0, 0, 10));
  uint64_t used = Stats().bytes_used, sbytes = kvdex_seq_bytes(seq);

  kvdex_attachment *att = nullptr;
  ASSERT_EQ(0, kvdex_attachment_get(seq, 1, 0, &att));
  EXPECT_EQ(nullptr, att);  // empty slot

  Obj *a = new Obj{&frees, 1};
  ASSERT_EQ(0, kvdex_seq_attach(seq, 1, 0, a, 1000, FreeObj)) << kvdex_errmsg();
  EXPECT_EQ(used + 1000, Stats().bytes_used);
  EXPECT_EQ(sbytes + 1000, kvdex_seq_bytes(seq));
  ASSERT_EQ(0, kvdex_attachment_get(seq, 1, 0, &att));
  ASSERT_NE(nullptr, att);
  EXPECT_EQ(a, kvdex_attachment_obj(att));
  EXPECT_EQ(1000u, kvdex_attachment_bytes(att));

  // Replacing: the old object survives while referenced, then goes with its bytes.
  Obj *b = new Obj{&frees, 2};
  ASSERT_EQ(0, kvdex_seq_attach(seq, 1, 0, b, 300, FreeObj));
  EXPECT_EQ(0, frees.load());
  EXPECT_EQ(used + 1300, Stats().bytes_used);
  EXPECT_EQ(1, static_cast<Obj *>(kvdex_attachment_obj(att))->tag);
  kvdex_attachment_release(att);
  EXPECT_EQ(1, frees.load());
  EXPECT_EQ(used + 300, Stats().bytes_used);
  EXPECT_EQ(sbytes + 300, kvdex_seq_bytes(seq));
  kvdex_attachment_release(nullptr);

  // Other slots and layers are independent; detaching frees at once.
  Obj *c = new Obj{&frees, 3};
  ASSERT_EQ(0, kvdex_seq_attach(seq, 2, KVDEX_ATTACH_SLOTS - 1, c, 0, FreeObj));
  EXPECT_EQ(used + 300, Stats().bytes_used);
  ASSERT_EQ(0, kvdex_seq_attach(seq, 2, KVDEX_ATTACH_SLOTS - 1, nullptr, 0, nullptr));
  EXPECT_EQ(2, frees.load());

  // Conditional attach: only over the expected object.
  Obj *d = new Obj{&frees, 4};
  EXPECT_EQ(KVDEX_ECONFLICT, kvdex_seq_attach_if(seq, 1, 0, nullptr, d, 10, FreeObj));
  EXPECT_STRNE("", kvdex_errmsg());
  EXPECT_EQ(KVDEX_ECONFLICT, kvdex_seq_attach_if(seq, 1, 0, a, d, 10, FreeObj));
  EXPECT_EQ(used + 300, Stats().bytes_used);
  ASSERT_EQ(0, kvdex_seq_attach_if(seq, 1, 0, b, d, 10, FreeObj));
  EXPECT_EQ(3, frees.load());  // b
  ASSERT_EQ(0, kvdex_seq_attach_if(seq, 0, 1, nullptr, new Obj{&frees, 5}, 20, FreeObj));
  EXPECT_EQ(used + 30, Stats().bytes_used);

  // Bad indices.
  Obj tmp{&frees, 0};
  EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_attach(seq, 3, 0, &tmp, 0, nullptr));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_attach(seq, 0, KVDEX_ATTACH_SLOTS, &tmp, 0, nullptr));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_attach(seq, 0, 0, nullptr, 5, nullptr));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_attachment_get(seq, 3, 0, &att));

  // Deleting the sequence frees its attachments once the last reference goes.
  uint64_t freed = 0;
  ASSERT_EQ(0, kvdex_seq_delete(store_, nullptr, "att", &freed));
  EXPECT_EQ(sbytes + 30, freed);
  EXPECT_EQ(KVDEX_ENOTFOUND, kvdex_seq_attach(seq, 1, 2, &tmp, 0, nullptr));
  ASSERT_EQ(0, kvdex_attachment_get(seq, 1, 0, &att));  // still readable while referenced
  EXPECT_EQ(d, kvdex_attachment_obj(att));
  kvdex_seq_release(seq);
  EXPECT_EQ(3, frees.load());
  EXPECT_GT(Stats().bytes_used, 0u);
  kvdex_attachment_release(att);  // the last reference: it held the sequence
  EXPECT_EQ(5, frees.load());
  EXPECT_EQ(0u, Stats().bytes_used);
}

TEST_F(KvstoreTest, AttachOverTheCapIsEnomemAndChangesNothing) {
  std::atomic<int> frees{0};
  MakeStore(64 << 10);
  kvdex_seq *seq = Create("cap", Shape(1, 1, 1, 8, 4, KVDEX_DTYPE_F32));
  ASSERT_EQ(0, Append(seq, 1, 0, 0, 8));
  Obj *a = new Obj{&frees, 1};
  ASSERT_EQ(0, kvdex_seq_attach(seq, 0, 0, a, 1000, FreeObj));
  uint64_t used = Stats().bytes_used, sbytes = kvdex_seq_bytes(seq);
  Obj *big = new Obj{&frees, 2};
  EXPECT_EQ(KVDEX_ENOMEM, kvdex_seq_attach(seq, 0, 0, big, 64 << 10, FreeObj));
  EXPECT_NE(std::string::npos, std::string(kvdex_errmsg()).find("memory cap")) << kvdex_errmsg();
  EXPECT_EQ(used, Stats().bytes_used);
  EXPECT_EQ(sbytes, kvdex_seq_bytes(seq));
  EXPECT_EQ(0, frees.load());  // neither the old nor the refused object was freed
  kvdex_attachment *att = nullptr;
  ASSERT_EQ(0, kvdex_attachment_get(seq, 0, 0, &att));
  EXPECT_EQ(a, kvdex_attachment_obj(att));
  kvdex_attachment_release(att);
  delete big;
  kvdex_seq_release(seq);
  // The store's destruction frees attachments of live sequences too.
  kvdex_store_destroy(store_);
  store_ = nullptr;
  EXPECT_EQ(1, frees.load());
}

TEST_F(KvstoreTest, RetainAndDeletedFlag) {
  kvdex_seq *seq = Create("ret", Shape(1, 1, 1, 8, 4, KVDEX_DTYPE_F32));
  EXPECT_EQ(0, kvdex_seq_deleted(seq));
  kvdex_seq_retain(seq);
  ASSERT_EQ(0, kvdex_seq_delete(store_, nullptr, "ret", nullptr));
  EXPECT_EQ(1, kvdex_seq_deleted(seq));
  kvdex_seq_release(seq);
  EXPECT_GT(Stats().bytes_used, 0u);  // the retained reference keeps it
  EXPECT_EQ(1, kvdex_seq_deleted(seq));
  kvdex_seq_release(seq);
  EXPECT_EQ(0u, Stats().bytes_used);
}

TEST_F(KvstoreTest, ConcurrentAttachGetRelease) {
  std::atomic<int> frees{0};
  kvdex_seq *seq = Create("conc", Shape(1, 1, 1, 8, 4, KVDEX_DTYPE_F32));
  uint64_t used = Stats().bytes_used;
  std::atomic<bool> stop{false};
  std::vector<std::thread> readers;
  std::atomic<uint64_t> seen{0};
  for (int t = 0; t < 3; t++)
    readers.emplace_back([&] {
      while (!stop.load()) {
        kvdex_attachment *att = nullptr;
        ASSERT_EQ(0, kvdex_attachment_get(seq, 0, 0, &att));
        if (att) {
          Obj *o = static_cast<Obj *>(kvdex_attachment_obj(att));
          ASSERT_GT(o->tag, 0);  // never freed under us (ASan would tell)
          seen++;
        }
        kvdex_attachment_release(att);
      }
    });
  int n = 2000;
  for (int i = 1; i <= n; i++)
    ASSERT_EQ(0, kvdex_seq_attach(seq, 0, 0, new Obj{&frees, i}, 64, FreeObj));
  stop = true;
  for (auto &t : readers) t.join();
  EXPECT_EQ(n - 1, frees.load());
  EXPECT_EQ(used + 64, Stats().bytes_used);
  kvdex_seq_release(seq);
  ASSERT_EQ(0, kvdex_seq_delete(store_, nullptr, "conc", nullptr));
  EXPECT_EQ(n, frees.load());
  EXPECT_EQ(0u, Stats().bytes_used);
}

// ---- prefill queries --------------------------------------------------------------

// Query rows of tokens [start, start+n), layout [n_q_heads][n][head_dim] (tag 7, kv 2).
std::vector<uint8_t> QRows(const kvdex_shape &s, uint32_t layer, uint64_t start, uint32_t n,
                           uint32_t tag = 7) {
  size_t rb = RowBytes(s);
  std::vector<uint8_t> out((size_t)s.n_q_heads * n * rb);
  for (uint32_t h = 0; h < s.n_q_heads; h++)
    for (uint32_t i = 0; i < n; i++) {
      std::vector<uint8_t> r = Row(s, tag, layer, h, start + i, 2);
      memcpy(&out[((size_t)h * n + i) * rb], r.data(), rb);
    }
  return out;
}

// Appends K/V and queries of tokens [start, start+n) in one transaction.
int AppendKVQ(kvdex_seq *seq, uint32_t layer, uint64_t start, uint32_t n, uint32_t qtag = 7) {
  const kvdex_shape &s = *kvdex_seq_shape(seq);
  kvdex_txn *txn = nullptr;
  int rc = kvdex_txn_begin(seq, &txn);
  if (rc) return rc;
  auto k = Rows(s, 1, layer, start, n, 0), v = Rows(s, 1, layer, start, n, 1);
  auto q = QRows(s, layer, start, n, qtag);
  rc = kvdex_txn_append(txn, layer, start, n, k.data(), v.data());
  if (!rc) rc = kvdex_txn_append_q(txn, layer, start, n, q.data());
  if (rc) {
    kvdex_txn_abort(txn);
    return rc;
  }
  return kvdex_txn_commit(txn, nullptr);
}

// Checks the kept queries of `layer` (heads [h0, h0+nh)) against the generator.
void CheckQueries(kvdex_seq *seq, uint32_t layer, uint32_t h0, uint32_t nh,
                  const std::vector<uint64_t> &want_ids) {
  const kvdex_shape &s = *kvdex_seq_shape(seq);
  float *q = nullptr;
  uint64_t n = 0, *ids = nullptr;
  ASSERT_EQ(0, kvdex_seq_queries(seq, layer, h0, nh, &q, &n, &ids)) << kvdex_errmsg();
  ASSERT_EQ(want_ids.size(), n);
  EXPECT_EQ(n, kvdex_seq_query_tokens(seq, layer));
  for (uint64_t i = 0; i < n; i++) {
    ASSERT_EQ(want_ids[i], ids[i]) << i;
    for (uint32_t h = 0; h < nh; h++)
      for (uint32_t d = 0; d < s.head_dim; d++) {
        float want;
        std::vector<uint8_t> r = Row(s, 7, layer, h0 + h, ids[i], 2);
        kvdex__to_f32(s.dtype, &r[d * kvdex_dtype_size(s.dtype)], &want, 1);
        ASSERT_EQ(want, q[((size_t)h * n + i) * s.head_dim + d]) << "token " << ids[i];
      }
  }
  free(q);
  free(ids);
}

TEST_F(KvstoreTest, QueriesAreStoredPerLayerAndCommittedWithTheTransaction) {
  kvdex_shape s = Shape(2, 2, 4, 8, 4, KVDEX_DTYPE_F16);
  kvdex_seq *seq = Create("q", s);
  float *q = nullptr;
  uint64_t n = 99;
  ASSERT_EQ(0, kvdex_seq_queries(seq, 0, 0, 4, &q, &n, nullptr));
  EXPECT_EQ(nullptr, q);
  EXPECT_EQ(0u, n);
  uint64_t used = Stats().bytes_used;
  ASSERT_EQ(0, AppendKVQ(seq, 0, 0, 10)) << kvdex_errmsg();
  std::vector<uint64_t> ids;
  for (uint64_t t = 0; t < 10; t++) ids.push_back(t);
  CheckQueries(seq, 0, 0, 4, ids);
  CheckQueries(seq, 0, 2, 2, ids);  // the GQA group of kv head 1
  EXPECT_EQ(0u, kvdex_seq_query_tokens(seq, 1));
  EXPECT_GE(Stats().bytes_used, used + 10 * 4 * 8 * 2);  // accounted
  EXPECT_EQ(Stats().bytes_used, kvdex_seq_bytes(seq));

  // Staged queries are invisible until commit and vanish on abort.
  kvdex_txn *txn = nullptr;
  ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
  auto k = Rows(s, 1, 0, 10, 5, 0), v = Rows(s, 1, 0, 10, 5, 1), qq = QRows(s, 0, 10, 5);
  ASSERT_EQ(0, kvdex_txn_append(txn, 0, 10, 5, k.data(), v.data()));
  uint64_t before = Stats().bytes_used;
  ASSERT_EQ(0, kvdex_txn_append_q(txn, 0, 10, 5, qq.data()));
  EXPECT_GT(Stats().bytes_used, before);  // reserved at once
  EXPECT_EQ(10u, kvdex_seq_query_tokens(seq, 0));
  kvdex_txn_abort(txn);
  EXPECT_EQ(10u, kvdex_seq_query_tokens(seq, 0));
  CheckQueries(seq, 0, 0, 4, ids);

  // Queries must follow their tokens' K/V; replays compare.
  ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_txn_append_q(txn, 0, 8, 5, qq.data()));  // 10..12 not there
  EXPECT_NE(std::string::npos, std::string(kvdex_errmsg()).find("append their K and V first"))
      << kvdex_errmsg();
  kvdex_txn_abort(txn);
  ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
  auto same = QRows(s, 0, 3, 4);
  ASSERT_EQ(0, kvdex_txn_append_q(txn, 0, 3, 4, same.data()));  // identical replay
  auto other = QRows(s, 0, 3, 4, 8);
  EXPECT_EQ(KVDEX_ECONFLICT, kvdex_txn_append_q(txn, 0, 3, 4, other.data()));
  EXPECT_EQ(KVDEX_ECONFLICT, kvdex_txn_commit(txn, nullptr));  // poisoned
  CheckQueries(seq, 0, 0, 4, ids);
  EXPECT_EQ(Stats().bytes_used, kvdex_seq_bytes(seq));

  // Argument checks.
  EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_queries(seq, 2, 0, 1, &q, &n, nullptr));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_queries(seq, 0, 3, 2, &q, &n, nullptr));
  EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_queries(seq, 0, 0, 0, &q, &n, nullptr));
  uint64_t sbytes = kvdex_seq_bytes(seq);
  uint64_t freed = 0;
  kvdex_seq_release(seq);
  ASSERT_EQ(0, kvdex_seq_delete(store_, nullptr, "q", &freed));
  EXPECT_EQ(sbytes, freed);
  EXPECT_EQ(0u, Stats().bytes_used);
}

TEST_F(KvstoreTest, QueriesAreSubsampledEvenlyWhateverTheAppendSizes) {
  kvdex_shape s = Shape(1, 1, 2, 4, 64, KVDEX_DTYPE_F32);
  const uint64_t total = 3 * KVDEX_MAX_QUERY_TOKENS + 100;  // -> stride 4
  std::vector<uint64_t> want;
  for (uint64_t t = 0; t < total; t += 4) want.push_back(t);
  ASSERT_LE(want.size(), (size_t)KVDEX_MAX_QUERY_TOKENS);
  // Same result for one big append, odd-sized appends, and out-of-order query sends.
  for (int variant = 0; variant < 3; variant++) {
    SCOPED_TRACE(variant);
    std::string id = "sub" + std::to_string(variant);
    kvdex_seq *seq = Create(id.c_str(), s);
    if (variant == 0) {
      ASSERT_EQ(0, AppendKVQ(seq, 0, 0, (uint32_t)total)) << kvdex_errmsg();
    } else if (variant == 1) {
      for (uint64_t t = 0; t < total;) {
        uint32_t n = (uint32_t)std::min<uint64_t>(total - t, 37 + t % 1000);
        ASSERT_EQ(0, AppendKVQ(seq, 0, t, n)) << kvdex_errmsg();
        t += n;
      }
    } else {  // K/V first, then the queries in two halves, the later half first
      ASSERT_EQ(0, Append(seq, 1, 0, 0, (uint32_t)total));
      uint64_t half = total / 2;
      kvdex_txn *txn = nullptr;
      ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
      auto q2 = QRows(s, 0, half, (uint32_t)(total - half)), q1 = QRows(s, 0, 0, (uint32_t)half);
      ASSERT_EQ(0, kvdex_txn_append_q(txn, 0, half, (uint32_t)(total - half), q2.data()));
      ASSERT_EQ(0, kvdex_txn_append_q(txn, 0, 0, (uint32_t)half, q1.data()));
      ASSERT_EQ(0, kvdex_txn_commit(txn, nullptr)) << kvdex_errmsg();
    }
    CheckQueries(seq, 0, 0, 2, want);
    CheckQueries(seq, 0, 1, 1, want);
    kvdex_seq_release(seq);
  }
}

TEST_F(KvstoreTest, QueriesOverTheCapAreEnomemAndAllocationFailuresChangeNothing) {
  MakeStore(256 << 10);
  kvdex_shape s = Shape(1, 1, 8, 64, 16, KVDEX_DTYPE_F32);  // 2 KiB of queries per token
  kvdex_seq *seq = Create("qcap", s);
  ASSERT_EQ(0, AppendKVQ(seq, 0, 0, 16)) << kvdex_errmsg();
  kvdex_store_stats before = Stats();
  // K/V of 200 more tokens fit (200 KiB... no: 100 KiB), their queries (400 KiB) do not.
  EXPECT_EQ(KVDEX_ENOMEM, AppendKVQ(seq, 0, 16, 200));
  EXPECT_NE(std::string::npos, std::string(kvdex_errmsg()).find("memory cap")) << kvdex_errmsg();
  EXPECT_EQ(before.bytes_used, Stats().bytes_used);
  EXPECT_EQ(16u, kvdex_seq_tokens(seq, 0));
  std::vector<uint64_t> ids;
  for (uint64_t t = 0; t < 16; t++) ids.push_back(t);
  CheckQueries(seq, 0, 0, 8, ids);
  // An allocation failure of the copy: same.
  kvdex__alloc *a = kvdex__store_alloc(store_);
  kvdex_txn *txn = nullptr;
  ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
  auto k = Rows(s, 1, 0, 16, 4, 0), v = Rows(s, 1, 0, 16, 4, 1), q = QRows(s, 0, 16, 4);
  ASSERT_EQ(0, kvdex_txn_append(txn, 0, 16, 4, k.data(), v.data()));
  uint64_t mid = Stats().bytes_used;
  kvdex__alloc_fail_after(a, 0);
  EXPECT_EQ(KVDEX_ENOMEM, kvdex_txn_append_q(txn, 0, 16, 4, q.data()));
  kvdex__alloc_fail_after(a, -1);
  EXPECT_EQ(mid, Stats().bytes_used);
  kvdex_txn_abort(txn);
  EXPECT_EQ(before.bytes_used, Stats().bytes_used);
  CheckQueries(seq, 0, 0, 8, ids);
  kvdex_seq_release(seq);
}

// ---- landmarks ---------------------------------------------------------------------

// Landmark rows of blocks [b0, b0+nb), layout [n_kv_heads][nb][head_dim] (kv 3).
std::vector<uint8_t> LRows(const kvdex_shape &s, uint32_t layer, uint64_t b0, uint64_t nb,
                           uint32_t tag = 9) {
  size_t rb = RowBytes(s);
  std::vector<uint8_t> out((size_t)s.n_kv_heads * nb * rb);
  for (uint32_t h = 0; h < s.n_kv_heads; h++)
    for (uint64_t i = 0; i < nb; i++) {
      std::vector<uint8_t> r = Row(s, tag, layer, h, b0 + i, 3);
      memcpy(&out[((size_t)h * nb + i) * rb], r.data(), rb);
    }
  return out;
}

// Appends K/V (tag 1) of tokens [start, start+n) and, with_lm, the landmarks of the
// blocks that end in the range (tag lmtag), in one transaction.
int AppendKVL(kvdex_seq *seq, uint32_t layer, uint64_t start, uint32_t n, bool with_lm = true,
              uint32_t lmtag = 9) {
  const kvdex_shape &s = *kvdex_seq_shape(seq);
  kvdex_txn *txn = nullptr;
  int rc = kvdex_txn_begin(seq, &txn);
  if (rc) return rc;
  const uint64_t B = s.block_tokens, b0 = start / B, nb = (start + n) / B - b0;
  auto k = Rows(s, 1, layer, start, n, 0), v = Rows(s, 1, layer, start, n, 1);
  auto lm = LRows(s, layer, b0, nb, lmtag);
  rc = kvdex_txn_append(txn, layer, start, n, k.data(), v.data());
  if (!rc && with_lm)
    rc = kvdex_txn_append_landmarks(txn, layer, start, n, nb ? lm.data() : nullptr);
  if (rc) {
    EXPECT_EQ(rc, kvdex_txn_commit(txn, nullptr));  // poisoned: commit reports it
    return rc;
  }
  return kvdex_txn_commit(txn, nullptr);
}

// Checks the committed landmarks of `layer`: n_blocks of them, equal to the generator.
void CheckLandmarks(kvdex_seq *seq, uint32_t layer, uint64_t n_blocks, uint32_t tag = 9) {
  const kvdex_shape &s = *kvdex_seq_shape(seq);
  EXPECT_EQ(n_blocks, kvdex_seq_landmark_blocks(seq, layer));
  std::vector<float> got((n_blocks + 1) * s.head_dim, -7.f);
  for (uint32_t h = 0; h < s.n_kv_heads; h++) {
    uint64_t n = 99;
    ASSERT_EQ(0, kvdex_seq_landmarks(seq, layer, h, n_blocks + 1, got.data(), &n))
        << kvdex_errmsg();
    ASSERT_EQ(n_blocks, n);
    for (uint64_t b = 0; b < n; b++)
      for (uint32_t d = 0; d < s.head_dim; d++) {
        float want;
        std::vector<uint8_t> r = Row(s, tag, layer, h, b, 3);
        kvdex__to_f32(s.dtype, &r[d * kvdex_dtype_size(s.dtype)], &want, 1);
        ASSERT_EQ(want, got[b * s.head_dim + d]) << "kv head " << h << " block " << b;
      }
    EXPECT_EQ(-7.f, got[n_blocks * s.head_dim]) << "wrote past the blocks";
  }
}

TEST_F(KvstoreTest, LandmarksAreOnePerCompletedBlockAndCommittedWithTheTransaction) {
  for (int dtype : {KVDEX_DTYPE_F32, KVDEX_DTYPE_F16, KVDEX_DTYPE_BF16}) {
    SCOPED_TRACE(kvdex_dtype_name(dtype));
    kvdex_shape s = Shape(2, 2, 4, 8, 4, dtype);
    std::string id = std::string("lm-") + kvdex_dtype_name(dtype);
    kvdex_seq *seq = Create(id.c_str(), s);
    CheckLandmarks(seq, 0, 0);
    uint64_t used = Stats().bytes_used;
    // Tokens [0,10): blocks 0 and 1 end inside; block 2 (tokens 8..11) does not.
    ASSERT_EQ(0, AppendKVL(seq, 0, 0, 10)) << kvdex_errmsg();
    CheckLandmarks(seq, 0, 2);
    CheckLandmarks(seq, 1, 0);
    EXPECT_GE(Stats().bytes_used, used + 10 * 2 * 2 * RowBytes(s) + 2 * 2 * RowBytes(s));
    EXPECT_EQ(Stats().bytes_used, kvdex_seq_bytes(seq));
    // [10,11): no block ends there, landmarks may be NULL; [11,13) ends block 2.
    ASSERT_EQ(0, AppendKVL(seq, 0, 10, 1)) << kvdex_errmsg();
    ASSERT_EQ(0, AppendKVL(seq, 0, 11, 2)) << kvdex_errmsg();
    CheckLandmarks(seq, 0, 3);

    // Staged landmarks are invisible until commit and vanish on abort.
    kvdex_txn *txn = nullptr;
    ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
    auto k = Rows(s, 1, 0, 13, 7, 0), v = Rows(s, 1, 0, 13, 7, 1), lm = LRows(s, 0, 3, 2);
    ASSERT_EQ(0, kvdex_txn_append(txn, 0, 13, 7, k.data(), v.data()));
    ASSERT_EQ(0, kvdex_txn_append_landmarks(txn, 0, 13, 7, lm.data())) << kvdex_errmsg();
    EXPECT_EQ(3u, kvdex_seq_landmark_blocks(seq, 0));
    kvdex_txn_abort(txn);
    CheckLandmarks(seq, 0, 3);
    EXPECT_EQ(Stats().bytes_used, kvdex_seq_bytes(seq));

    // Identical replays are no-ops (also inside one transaction), different ones conflict.
    ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
    auto k0 = Rows(s, 1, 0, 0, 13, 0), v0 = Rows(s, 1, 0, 0, 13, 1), lm0 = LRows(s, 0, 0, 3);
    ASSERT_EQ(0, kvdex_txn_append(txn, 0, 0, 13, k0.data(), v0.data()));
    ASSERT_EQ(0, kvdex_txn_append_landmarks(txn, 0, 0, 13, lm0.data())) << kvdex_errmsg();
    auto lm1 = LRows(s, 0, 1, 1);  // tokens [4,8) end block 1 only
    ASSERT_EQ(0, kvdex_txn_append_landmarks(txn, 0, 4, 4, lm1.data())) << kvdex_errmsg();
    kvdex_txn_abort(txn);
    ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
    ASSERT_EQ(0, kvdex_txn_append_landmarks(txn, 0, 0, 13, lm0.data())) << kvdex_errmsg();
    auto other = LRows(s, 0, 1, 1, 10);
    EXPECT_EQ(KVDEX_ECONFLICT, kvdex_txn_append_landmarks(txn, 0, 4, 4, other.data()));
    EXPECT_NE(std::string::npos, std::string(kvdex_errmsg()).find("block 1")) << kvdex_errmsg();
    EXPECT_EQ(KVDEX_ECONFLICT, kvdex_txn_commit(txn, nullptr));  // poisoned
    CheckLandmarks(seq, 0, 3);

    // Landmarks must follow their tokens' K/V, be given when blocks end, be finite.
    ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
    auto lm5 = LRows(s, 0, 0, 5);
    EXPECT_EQ(KVDEX_EINVAL, kvdex_txn_append_landmarks(txn, 0, 0, 20, lm5.data()));
    EXPECT_NE(std::string::npos, std::string(kvdex_errmsg()).find("append their K and V first"))
        << kvdex_errmsg();
    kvdex_txn_abort(txn);
    ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
    EXPECT_EQ(0, kvdex_txn_append_landmarks(txn, 0, 12, 1, nullptr));  // no block ends
    EXPECT_EQ(KVDEX_EINVAL, kvdex_txn_append_landmarks(txn, 0, 8, 4, nullptr));
    kvdex_txn_abort(txn);
    ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
    ASSERT_EQ(0, kvdex_txn_append(txn, 0, 13, 7, k.data(), v.data()));
    std::vector<uint8_t> bad = lm;
    float inf = INFINITY;
    PutElem(dtype, inf, &bad[(2 + 1) * RowBytes(s) + 5 * kvdex_dtype_size(dtype)]);
    EXPECT_EQ(KVDEX_EINVAL, kvdex_txn_append_landmarks(txn, 0, 13, 7, bad.data()));
    EXPECT_NE(std::string::npos, std::string(kvdex_errmsg()).find("non-finite"))
        << kvdex_errmsg();
    kvdex_txn_abort(txn);
    CheckLandmarks(seq, 0, 3);
    EXPECT_EQ(13u, kvdex_seq_tokens(seq, 0));

    // Blocks appended without landmarks leave a hole that later landmarks may not jump:
    // refused, until the tokens are re-sent with theirs.
    ASSERT_EQ(0, AppendKVL(seq, 1, 0, 9, false)) << kvdex_errmsg();
    CheckLandmarks(seq, 1, 0);
    EXPECT_EQ(KVDEX_ECONFLICT, AppendKVL(seq, 1, 9, 3));  // block 2 after blocks 0, 1 without
    EXPECT_NE(std::string::npos, std::string(kvdex_errmsg()).find("without landmarks"))
        << kvdex_errmsg();
    EXPECT_EQ(9u, kvdex_seq_tokens(seq, 1));  // all or nothing
    ASSERT_EQ(0, AppendKVL(seq, 1, 0, 12)) << kvdex_errmsg();  // K/V replay + landmarks
    CheckLandmarks(seq, 1, 3);
    EXPECT_EQ(12u, kvdex_seq_tokens(seq, 1));

    // Argument checks of the reader.
    float buf[8];
    uint64_t n = 0;
    EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_landmarks(seq, 2, 0, 1, buf, &n));
    EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_landmarks(seq, 0, 2, 1, buf, &n));
    EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_landmarks(seq, 0, 0, 1, nullptr, &n));
    EXPECT_EQ(KVDEX_EINVAL, kvdex_seq_landmarks(seq, 0, 0, 1, buf, nullptr));
    EXPECT_EQ(0, kvdex_seq_landmarks(seq, 0, 0, 0, nullptr, &n));
    EXPECT_EQ(0u, n);
    EXPECT_EQ(0, kvdex_seq_landmarks(seq, 0, 1, 1, buf, &n));  // at most max_blocks
    EXPECT_EQ(1u, n);
    EXPECT_EQ(0u, kvdex_seq_landmark_blocks(seq, 2));
    EXPECT_EQ(0u, kvdex_seq_landmark_blocks(nullptr, 0));

    uint64_t sbytes = kvdex_seq_bytes(seq), freed = 0;
    kvdex_seq_release(seq);
    ASSERT_EQ(0, kvdex_seq_delete(store_, nullptr, id.c_str(), &freed));
    EXPECT_EQ(sbytes, freed);
    EXPECT_EQ(0u, Stats().bytes_used);
  }
}

TEST_F(KvstoreTest, LandmarksGrowInPlaceAndByCopyWhateverTheAppendSizes) {
  kvdex_shape s = Shape(1, 3, 3, 5, 3, KVDEX_DTYPE_BF16);
  kvdex_seq *seq = Create("lmgrow", s);
  // One token per transaction (landmarks every third), then odd-sized appends, some
  // with several landmark-bearing pieces in one transaction.
  uint64_t t = 0;
  for (; t < 200; t++) ASSERT_EQ(0, AppendKVL(seq, 0, t, 1)) << kvdex_errmsg() << " t " << t;
  CheckLandmarks(seq, 0, 200 / 3);
  kvdex_txn *txn = nullptr;
  ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
  for (uint32_t n : {7u, 1u, 2u, 50u, 33u, 400u}) {
    const uint64_t b0 = t / 3, nb = (t + n) / 3 - b0;
    auto k = Rows(s, 1, 0, t, n, 0), v = Rows(s, 1, 0, t, n, 1), lm = LRows(s, 0, b0, nb);
    ASSERT_EQ(0, kvdex_txn_append(txn, 0, t, n, k.data(), v.data()));
    ASSERT_EQ(0, kvdex_txn_append_landmarks(txn, 0, t, n, nb ? lm.data() : nullptr))
        << kvdex_errmsg();
    t += n;
  }
  EXPECT_EQ(200u / 3, kvdex_seq_landmark_blocks(seq, 0));
  ASSERT_EQ(0, kvdex_txn_commit(txn, nullptr)) << kvdex_errmsg();
  CheckLandmarks(seq, 0, t / 3);
  EXPECT_EQ(Stats().bytes_used, kvdex_seq_bytes(seq));
  EXPECT_EQ(0u, CheckView(seq, 1, 0, 2, t));
  kvdex_seq_release(seq);
}

TEST_F(KvstoreTest, LandmarksOverTheCapAreEnomemAndAllocationFailuresChangeNothing) {
  // 1 KiB rows, one token per block: K/V 2 KiB a token, a landmark 1 KiB a block.
  MakeStore(200 << 10);
  kvdex_shape s = Shape(1, 1, 1, 256, 1, KVDEX_DTYPE_F32);
  kvdex_seq *seq = Create("lmcap", s);
  ASSERT_EQ(0, AppendKVL(seq, 0, 0, 40)) << kvdex_errmsg();
  kvdex_store_stats before = Stats();
  // K/V of 20 more tokens fit (40 KiB); their landmarks need a grown copy (80 KiB,
  // while the old 40 KiB is still counted), which does not.
  ASSERT_EQ(0, AppendKVL(seq, 0, 40, 20, false)) << kvdex_errmsg();
  ASSERT_EQ(0, kvdex_seq_delete(store_, nullptr, "lmcap", nullptr));
  kvdex_seq_release(seq);
  ASSERT_EQ(0u, Stats().bytes_used);
  seq = Create("lmcap", s);
  ASSERT_EQ(0, AppendKVL(seq, 0, 0, 40)) << kvdex_errmsg();
  EXPECT_EQ(before.bytes_used, Stats().bytes_used);
  EXPECT_EQ(KVDEX_ENOMEM, AppendKVL(seq, 0, 40, 20));
  EXPECT_NE(std::string::npos, std::string(kvdex_errmsg()).find("memory cap")) << kvdex_errmsg();
  EXPECT_EQ(before.bytes_used, Stats().bytes_used);
  EXPECT_EQ(40u, kvdex_seq_tokens(seq, 0));
  CheckLandmarks(seq, 0, 40);
  // An allocation failure of the copy: same.
  kvdex__alloc *a = kvdex__store_alloc(store_);
  kvdex_txn *txn = nullptr;
  ASSERT_EQ(0, kvdex_txn_begin(seq, &txn));
  auto k = Rows(s, 1, 0, 40, 4, 0), v = Rows(s, 1, 0, 40, 4, 1), lm = LRows(s, 0, 40, 4);
  ASSERT_EQ(0, kvdex_txn_append(txn, 0, 40, 4, k.data(), v.data()));
  uint64_t mid = Stats().bytes_used;
  kvdex__alloc_fail_after(a, 0);
  EXPECT_EQ(KVDEX_ENOMEM, kvdex_txn_append_landmarks(txn, 0, 40, 4, lm.data()));
  kvdex__alloc_fail_after(a, -1);
  EXPECT_EQ(mid, Stats().bytes_used);
  kvdex_txn_abort(txn);
  EXPECT_EQ(before.bytes_used, Stats().bytes_used);
  CheckLandmarks(seq, 0, 40);
  kvdex_seq_release(seq);
}

}  // namespace
