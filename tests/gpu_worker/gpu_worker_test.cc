// The decode loop of workers/gpu_worker.h on the CPU twins against an embedded store
// ("local:"): every merged output is compared with dense attention computed here in
// double precision from K/V read back from the store (ReadKV) plus the new token, and
// on S2 layers with attention masked by the S2 formula written out in this file.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

extern "C" {
#include "client/kvdex.h"
#include "workers/gpu_worker.h"
}

namespace {

struct Ref {
  kvdex_db *db = nullptr;
  const kvdex_gw_config *cfg = nullptr;
  double max_err = 0;
  uint64_t compared = 0;
  uint64_t s2_compared = 0;
  int failures = 0;
  uint64_t hash = 1469598103934665603ull;
};

bool s2_active(const kvdex_gw_config *c, uint32_t h, uint64_t i, uint64_t j) {
  uint32_t vs = c->s2_vert_stride, nh = c->shape.n_q_heads;
  uint32_t step = vs / nh ? vs / nh : 1;
  if (j > i) return false;
  if (i - j < c->s2_local_blocks) return true;
  return (j + (uint64_t)h * step + 1) % vs == 0;
}

void on_output(void *ctx, uint32_t step, uint32_t layer, uint64_t stored, const float *q,
               const void *k_new, const void *v_new, const float *o) {
  Ref *r = static_cast<Ref *>(ctx);
  const kvdex_shape &sh = r->cfg->shape;
  uint32_t Hkv = sh.n_kv_heads, Hq = sh.n_q_heads, D = sh.head_dim, G = Hq / Hkv;
  size_t es = kvdex_dtype_size(sh.dtype);
  uint64_t n = stored + 1;
  std::vector<uint64_t> ids(stored);
  for (uint64_t t = 0; t < stored; t++) ids[t] = t;
  std::vector<char> kb(Hkv * stored * D * es), vb(Hkv * stored * D * es);
  if (kvdex_read(r->db, r->cfg->seq_id, layer, ids.data(), stored, kb.data(), vb.data())) {
    ADD_FAILURE() << "read: " << kvdex_errmsg();
    r->failures++;
    return;
  }
  bool s2 = r->cfg->s2_vert_stride && layer % 2 == 1;
  uint64_t qblk = (n - 1) / sh.block_tokens;
  std::vector<float> kr(D), vr(D);
  std::vector<double> w(n), acc(D);
  for (uint32_t h = 0; h < Hq; h++) {
    uint32_t g = h / G;
    auto krow = [&](uint64_t t) {
      const char *src = t < stored ? kb.data() + ((size_t)g * stored + t) * D * es
                                   : static_cast<const char *>(k_new) + (size_t)g * D * es;
      kvdex__to_f32(sh.dtype, src, kr.data(), D);
    };
    auto vrow = [&](uint64_t t) {
      const char *src = t < stored ? vb.data() + ((size_t)g * stored + t) * D * es
                                   : static_cast<const char *>(v_new) + (size_t)g * D * es;
      kvdex__to_f32(sh.dtype, src, vr.data(), D);
    };
    double mx = -INFINITY;
    for (uint64_t t = 0; t < n; t++) {
      if (s2 && !s2_active(r->cfg, h, qblk, t / sh.block_tokens)) {
        w[t] = -INFINITY;
        continue;
      }
      krow(t);
      double s = 0;
      for (uint32_t i = 0; i < D; i++) s += (double)q[h * D + i] * kr[i];
      w[t] = s / std::sqrt((double)D);
      mx = std::max(mx, w[t]);
    }
    double den = 0;
    std::fill(acc.begin(), acc.end(), 0.0);
    for (uint64_t t = 0; t < n; t++) {
      if (w[t] == -INFINITY) continue;
      double e = std::exp(w[t] - mx);
      den += e;
      vrow(t);
      for (uint32_t i = 0; i < D; i++) acc[i] += e * vr[i];
    }
    double ref_max = 0, err = 0;
    for (uint32_t i = 0; i < D; i++) {
      double ref = acc[i] / den;
      ref_max = std::max(ref_max, std::fabs(ref));
      double e = std::fabs(o[h * D + i] - ref);
      if (!(e <= err)) err = e;
    }
    double rel = err / ref_max;
    if (!(rel <= r->max_err)) r->max_err = rel;
    r->compared++;
    if (s2) r->s2_compared++;
  }
  for (size_t i = 0; i < (size_t)Hq * D; i++) {
    uint32_t bits;
    std::memcpy(&bits, &o[i], 4);
    r->hash = (r->hash ^ bits) * 1099511628211ull;
  }
  (void)step;
}

kvdex_gw_config base_config(const char *id) {
  kvdex_gw_config c{};
  c.seq_id = id;
  c.shape.n_layers = 2;
  c.shape.n_kv_heads = 2;
  c.shape.n_q_heads = 4;
  c.shape.head_dim = 64;
  c.shape.block_tokens = 64;
  c.shape.dtype = KVDEX_DTYPE_F16;
  c.context = 700;
  c.steps = 6;
  c.sinks = 4;
  c.window = 100;
  c.k = 50;
  c.index = "dense";
  c.seed = 7;
  c.s2_local_blocks = 2;
  return c;
}

struct Outcome {
  int rc;
  kvdex_gw_stats st;
  Ref ref;
};

Outcome run_loop(const kvdex_gw_config &c) {
  Outcome out{};
  kvdex_db *db = nullptr;
  EXPECT_EQ(kvdex_open("local:", nullptr, &db), 0) << kvdex_errmsg();
  out.ref.db = db;
  out.ref.cfg = &c;
  out.rc = kvdex_gw_run(db, &c, kvdex_gw_twin_backend(), nullptr, on_output, &out.ref, &out.st);
  if (out.rc) ADD_FAILURE() << "run: " << kvdex_errmsg();
  kvdex_close(db);
  return out;
}

TEST(GpuWorker, DenseMergeEqualsDenseAttention) {
  kvdex_gw_config c = base_config("gw-dense");
  Outcome r = run_loop(c);
  ASSERT_EQ(r.rc, 0);
  EXPECT_EQ(r.ref.failures, 0);
  EXPECT_EQ(r.ref.compared, (uint64_t)c.steps * c.shape.n_layers * c.shape.n_q_heads);
  EXPECT_LT(r.ref.max_err, 1e-3);
  EXPECT_EQ(r.st.steps_done, c.steps);
  EXPECT_EQ(r.st.final_tokens, c.context + c.steps);
  // The store attended everything but sinks + window; the worker the rest.
  uint64_t per_head_store = 0;
  for (uint32_t s = 0; s < c.steps; s++) per_head_store += c.context + s - c.sinks - c.window;
  EXPECT_EQ(r.st.store_attended, per_head_store * c.shape.n_layers * c.shape.n_q_heads);
  EXPECT_EQ(r.st.local_attended,
            (uint64_t)(c.sinks + c.window + 1) * c.steps * c.shape.n_layers * c.shape.n_q_heads);
}

TEST(GpuWorker, CheckOptionAgreesWithIndependentReference) {
  kvdex_gw_config c = base_config("gw-check");
  c.check = 1;
  Outcome r = run_loop(c);
  ASSERT_EQ(r.rc, 0);
  EXPECT_EQ(r.st.checked, r.ref.compared);
  EXPECT_LT(r.st.max_rel_err, 1e-3);
  EXPECT_LT(r.ref.max_err, 1e-3);
}

// Small blocks, a window that crosses many blocks and sinks that end mid-block: the
// pool maps and frees blocks every few steps.
TEST(GpuWorker, WindowSlidesAcrossBlocksBf16Gqa) {
  kvdex_gw_config c = base_config("gw-slide");
  c.shape.block_tokens = 16;
  c.shape.dtype = KVDEX_DTYPE_BF16;
  c.shape.n_kv_heads = 2;
  c.shape.n_q_heads = 8;
  c.shape.head_dim = 32;
  c.sinks = 3;
  c.window = 21;
  c.context = 300;
  c.steps = 40;
  Outcome r = run_loop(c);
  ASSERT_EQ(r.rc, 0);
  EXPECT_LT(r.ref.max_err, 1e-3);
  EXPECT_EQ(r.st.final_tokens, c.context + c.steps);
  // Held at the end: the sink block plus the window's blocks, per layer, K and V.
  uint64_t blocks = 1 + (c.window + 1 + 15) / 16 + 1;
  EXPECT_LE(r.st.local_bytes,
            blocks * 16 * c.shape.head_dim * 2 * 2 * c.shape.n_kv_heads * c.shape.n_layers);
}

// Top-k that covers every eligible token is dense attention again; a small k is not.
TEST(GpuWorker, ExactTopK) {
  kvdex_gw_config c = base_config("gw-exact-all");
  c.index = "exact";
  c.k = 4096;
  c.check = 1;
  Outcome all = run_loop(c);
  ASSERT_EQ(all.rc, 0);
  EXPECT_LT(all.ref.max_err, 1e-3);
  EXPECT_LT(all.st.max_rel_err, 1e-3);

  c.seq_id = "gw-exact-few";
  c.k = 8;
  Outcome few = run_loop(c);
  ASSERT_EQ(few.rc, 0);
  EXPECT_GT(few.st.max_rel_err, 1e-3);  // 8 of ~600 tokens: not dense
  EXPECT_TRUE(std::isfinite(few.st.max_rel_err));
  EXPECT_NEAR(few.st.max_rel_err, few.ref.max_err, 1e-4);
  EXPECT_EQ(few.st.store_attended, (uint64_t)8 * c.steps * c.shape.n_layers * c.shape.n_q_heads);
}

TEST(GpuWorker, S2LayersMatchMaskedAttention) {
  kvdex_gw_config c = base_config("gw-s2");
  c.shape.block_tokens = 16;
  c.shape.n_layers = 3;  // layer 1 is an S2 layer
  c.shape.n_q_heads = 4;
  c.s2_vert_stride = 4;
  c.s2_local_blocks = 2;
  c.context = 500;
  c.steps = 20;  // crosses a block boundary: local blocks slide, shards stay
  c.check = 1;
  Outcome r = run_loop(c);
  ASSERT_EQ(r.rc, 0);
  EXPECT_EQ(r.ref.s2_compared, (uint64_t)c.steps * c.shape.n_q_heads);
  EXPECT_LT(r.ref.max_err, 1e-3);
  EXPECT_LT(r.st.max_rel_err, 1e-3);
  EXPECT_EQ(r.st.final_tokens, c.context + c.steps);
}

TEST(GpuWorker, Deterministic) {
  kvdex_gw_config c = base_config("gw-det");
  c.index = "exact";
  Outcome a = run_loop(c);
  Outcome b = run_loop(c);
  ASSERT_EQ(a.rc, 0);
  ASSERT_EQ(b.rc, 0);
  EXPECT_EQ(a.ref.hash, b.ref.hash);
  c.seed = 8;
  Outcome other = run_loop(c);
  EXPECT_NE(a.ref.hash, other.ref.hash);
}

TEST(GpuWorker, RefusesBadConfigs) {
  kvdex_gw_config c = base_config("gw-bad");
  c.shape.n_q_heads = 6;
  c.shape.n_kv_heads = 4;
  EXPECT_EQ(kvdex_gw_config_check(&c), KVDEX_EINVAL);
  EXPECT_NE(std::string(kvdex_errmsg()).find("not a multiple"), std::string::npos);
  c = base_config("gw-bad");
  c.shape.dtype = KVDEX_DTYPE_F32;
  EXPECT_EQ(kvdex_gw_config_check(&c), KVDEX_EINVAL);
  c = base_config("gw-bad");
  c.shape.head_dim = 40;
  EXPECT_EQ(kvdex_gw_config_check(&c), KVDEX_EINVAL);
  c = base_config("gw-bad");
  c.context = c.sinks + c.window;
  EXPECT_EQ(kvdex_gw_config_check(&c), KVDEX_EINVAL);
  c = base_config("gw-bad");
  c.index = "exact";
  c.k = 0;
  EXPECT_EQ(kvdex_gw_config_check(&c), KVDEX_EINVAL);
  EXPECT_EQ(kvdex_gw_config_check(&c), KVDEX_EINVAL);
}

// An existing sequence is not touched: the run fails before doing anything.
TEST(GpuWorker, ExistingSequenceIsRefused) {
  kvdex_db *db = nullptr;
  ASSERT_EQ(kvdex_open("local:", nullptr, &db), 0);
  kvdex_gw_config c = base_config("gw-taken");
  ASSERT_EQ(kvdex_create(db, "gw-taken", &c.shape), 0);
  kvdex_gw_stats st;
  EXPECT_EQ(kvdex_gw_run(db, &c, kvdex_gw_twin_backend(), nullptr, nullptr, nullptr, &st),
            KVDEX_EEXIST);
  EXPECT_EQ(st.created, 0);
  kvdex_seq_info info{};
  ASSERT_EQ(kvdex_stat(db, "gw-taken", &info), 0);
  EXPECT_EQ(info.n_layers ? info.layer_tokens[0] : 0, 0u);
  kvdex_seq_info_free(&info);
  kvdex_close(db);
}

}  // namespace
