// Multi-node tests of the cluster client: 3-4 real `kvdex serve` processes on
// loopback ports, a cluster handle with replicas=2, and per-node plain handles to
// look at what each node really holds.
//   - placement: each sequence sits exactly on its rendezvous owners, identical there;
//     batched search/attend through the cluster equal the per-node answers, in order;
//   - kill -9 of a node during a batched Attend workload: every call succeeds with the
//     right answer or fails with a transport status within its deadline; writes while
//     it is down succeed; after a restart (empty) and a repair every sequence has 2
//     identical replicas holding exactly the data written;
//   - rebalance after adding a node: reads succeed throughout and every sequence ends
//     on its new owners only; a second rebalance has nothing to do;
//   - uri errors, dns:///, circuit breaker.
#include <gtest/gtest.h>

#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "kvstore/base.h"
#include "kvdex/kvdex.h"

extern char **environ;

// gRPC's c-ares resolver (Debian's libcares 1.18) leaks 10 bytes once per process when
// it resolves a host name ("localhost" in the dns:/// case); not ours to fix.
extern "C" const char *__lsan_default_suppressions() { return "leak:libcares.so\n"; }

namespace {

constexpr uint32_t kLayers = 2, kKv = 2, kQ = 4, kDim = 32, kTokens = 384;

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (bind(fd, (sockaddr *)&a, sizeof a) != 0 || getsockname(fd, (sockaddr *)&a, &len) != 0) {
    close(fd);
    return -1;
  }
  int port = ntohs(a.sin_port);
  close(fd);
  return port;
}

// A deterministic value for (sequence, layer, kv head, token, dim, k-or-v).
float Val(int seq, uint32_t layer, uint32_t h, uint64_t t, uint32_t d, int which) {
  uint64_t x = (uint64_t)seq * 1000003ull + layer * 7919ull + h * 104729ull + t * 31ull + d * 17ull +
               (uint64_t)which * 999983ull;
  x ^= x >> 13;
  x *= 0x9E3779B97F4A7C15ull;
  x ^= x >> 29;
  return (float)((double)(x % 20001) / 10000.0 - 1.0);
}

kvdex_shape Shape() {
  kvdex_shape s{};
  s.n_layers = kLayers;
  s.n_kv_heads = kKv;
  s.n_q_heads = kQ;
  s.head_dim = kDim;
  s.block_tokens = 64;
  s.dtype = KVDEX_DTYPE_F32;
  return s;
}

std::string SeqName(int i) { return "seq-" + std::to_string(i); }

// Appends tokens [from, to) of every layer of sequence i.
int AppendRange(kvdex_db *db, int i, uint64_t from, uint64_t to) {
  kvdex_appender *ap = nullptr;
  int rc = kvdex_append_begin(db, SeqName(i).c_str(), &ap);
  if (rc) return rc;
  uint32_t n = (uint32_t)(to - from);
  std::vector<float> k((size_t)kKv * n * kDim), v(k.size());
  for (uint32_t l = 0; l < kLayers; l++) {
    for (uint32_t h = 0; h < kKv; h++)
      for (uint32_t t = 0; t < n; t++)
        for (uint32_t d = 0; d < kDim; d++) {
          size_t o = ((size_t)h * n + t) * kDim + d;
          k[o] = Val(i, l, h, from + t, d, 0);
          v[o] = Val(i, l, h, from + t, d, 1);
        }
    rc = kvdex_append_kv(ap, l, from, n, k.data(), v.data());
    if (rc) {
      kvdex_append_abort(ap);
      return rc;
    }
  }
  return kvdex_append_commit(ap, nullptr);
}

// Reads every token of sequence i and compares with what was written (tokens [0, n)).
::testing::AssertionResult HoldsExactly(kvdex_db *db, int i, uint64_t n) {
  kvdex_seq_info info{};
  int rc = kvdex_stat(db, SeqName(i).c_str(), &info);
  if (rc) return ::testing::AssertionFailure() << "stat " << SeqName(i) << ": " << kvdex_errmsg();
  for (uint32_t l = 0; l < kLayers; l++)
    if (info.layer_tokens[l] != n) {
      auto f = ::testing::AssertionFailure() << SeqName(i) << " layer " << l << " has "
                                             << info.layer_tokens[l] << " tokens, want " << n;
      kvdex_seq_info_free(&info);
      return f;
    }
  kvdex_seq_info_free(&info);
  std::vector<uint64_t> ids(n);
  for (uint64_t t = 0; t < n; t++) ids[t] = t;
  std::vector<float> k((size_t)kKv * n * kDim), v(k.size());
  for (uint32_t l = 0; l < kLayers; l++) {
    if (kvdex_read(db, SeqName(i).c_str(), l, ids.data(), n, k.data(), v.data()))
      return ::testing::AssertionFailure() << "read " << SeqName(i) << ": " << kvdex_errmsg();
    for (uint32_t h = 0; h < kKv; h++)
      for (uint64_t t = 0; t < n; t++)
        for (uint32_t d = 0; d < kDim; d++) {
          size_t o = ((size_t)h * n + t) * kDim + d;
          if (k[o] != Val(i, l, h, t, d, 0) || v[o] != Val(i, l, h, t, d, 1))
            return ::testing::AssertionFailure()
                   << SeqName(i) << " differs at layer " << l << " head " << h << " token " << t;
        }
  }
  return ::testing::AssertionSuccess();
}

std::vector<std::string> Split(const std::string &s) {
  std::vector<std::string> out;
  size_t p = 0;
  while (p <= s.size()) {
    size_t c = s.find(',', p);
    if (c == std::string::npos) c = s.size();
    if (c > p) out.push_back(s.substr(p, c - p));
    p = c + 1;
  }
  return out;
}

class Cluster : public ::testing::Test {
 protected:
  struct Node {
    int port = 0;
    pid_t pid = -1;
    std::string addr;
  };
  std::vector<Node> nodes_;

  void TearDown() override {
    for (auto &n : nodes_)
      if (n.pid > 0) {
        kill(n.pid, SIGKILL);
        waitpid(n.pid, nullptr, 0);
      }
  }

  void Start(size_t i) {
    Node &n = nodes_[i];
    std::string listen = "127.0.0.1:" + std::to_string(n.port);
    const char *argv[] = {"workers/kvdex", "serve",         "--listen", listen.c_str(),
                          "--memory",      "256M",          "--drain",  "100",
                          "--log-level",   "warn",          nullptr};
    ASSERT_EQ(0, posix_spawn(&n.pid, argv[0], nullptr, nullptr, (char *const *)argv, environ))
        << strerror(errno);
    // Ready when a plain handle can list.
    kvdex_open_opts oo{};
    oo.timeout_ms = 1000;
    kvdex_db *db = nullptr;
    ASSERT_EQ(0, kvdex_open(("grpc://" + n.addr).c_str(), &oo, &db)) << kvdex_errmsg();
    bool ready = false;
    std::string why;
    for (int tries = 0; tries < 200 && !ready; tries++) {
      char **ids = nullptr;
      size_t cnt = 0;
      ready = kvdex_list(db, &ids, &cnt) == 0;
      if (!ready) why = kvdex_errmsg();
      kvdex_list_free(ids, cnt);
      if (!ready) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    kvdex_close(db);
    ASSERT_TRUE(ready) << "kvdex serve on " << n.addr << " did not come up: " << why;
  }

  void Kill(size_t i) {
    kill(nodes_[i].pid, SIGKILL);
    waitpid(nodes_[i].pid, nullptr, 0);
    nodes_[i].pid = -1;
  }

  void AddNodes(size_t n) {
    for (size_t i = 0; i < n; i++) {
      Node nd;
      nd.port = FreePort();
      ASSERT_GT(nd.port, 0);
      nd.addr = "127.0.0.1:" + std::to_string(nd.port);
      nodes_.push_back(nd);
      Start(nodes_.size() - 1);
    }
  }

  std::string Uri(size_t n_nodes, int replicas = 2) {
    std::string u = "grpc://";
    for (size_t i = 0; i < n_nodes; i++) u += (i ? "," : "") + nodes_[i].addr;
    return u + "?replicas=" + std::to_string(replicas);
  }

  kvdex_db *Open(const std::string &uri, uint32_t timeout_ms = 5000) {
    kvdex_open_opts oo{};
    oo.timeout_ms = timeout_ms;
    kvdex_db *db = nullptr;
    EXPECT_EQ(0, kvdex_open(uri.c_str(), &oo, &db)) << uri << ": " << kvdex_errmsg();
    return db;
  }

  kvdex_db *OpenNode(size_t i) { return Open("grpc://" + nodes_[i].addr, 2000); }

  // Which nodes hold a visible copy of sequence i.
  std::set<std::string> Holders(int i, size_t n_nodes) {
    std::set<std::string> out;
    for (size_t j = 0; j < n_nodes; j++) {
      if (nodes_[j].pid < 0) continue;
      kvdex_db *db = OpenNode(j);
      kvdex_seq_info info{};
      if (kvdex_stat(db, SeqName(i).c_str(), &info) == 0) out.insert(nodes_[j].addr);
      kvdex_seq_info_free(&info);
      kvdex_close(db);
    }
    return out;
  }

  std::set<std::string> Owners(kvdex_db *db, int i) {
    char buf[1024];
    EXPECT_EQ(0, kvdex_cluster_owners(db, SeqName(i).c_str(), buf, sizeof buf)) << kvdex_errmsg();
    auto v = Split(buf);
    return std::set<std::string>(v.begin(), v.end());
  }

  // Every sequence is on exactly its owners, identical there, with n tokens.
  void ExpectPlacedAndIdentical(kvdex_db *db, int n_seqs, size_t n_nodes, uint64_t n) {
    for (int i = 0; i < n_seqs; i++) {
      auto owners = Owners(db, i);
      EXPECT_EQ(2u, owners.size());
      EXPECT_EQ(owners, Holders(i, n_nodes)) << SeqName(i);
      std::set<uint64_t> sums;
      for (const auto &a : owners) {
        uint64_t sum = 0;
        ASSERT_EQ(0, kvdex_cluster_checksum(db, a.c_str(), SeqName(i).c_str(), &sum))
            << kvdex_errmsg();
        sums.insert(sum);
        for (size_t j = 0; j < n_nodes; j++)
          if (nodes_[j].addr == a) {
            kvdex_db *nd = OpenNode(j);
            EXPECT_TRUE(HoldsExactly(nd, i, n)) << "on " << a;
            kvdex_close(nd);
          }
      }
      EXPECT_EQ(1u, sums.size()) << SeqName(i) << ": replicas differ";
    }
  }

  // Polls cluster status until the handle sees n nodes up (at most ~10 s).
  void WaitAllUp(kvdex_db *db, size_t n) {
    for (int tries = 0; tries < 100; tries++) {
      kvdex_cluster_report rep{};
      ASSERT_EQ(0, kvdex_cluster_status(db, 0, &rep)) << kvdex_errmsg();
      size_t up = 0;
      for (size_t i = 0; i < rep.n_nodes; i++) up += rep.nodes[i].up != 0;
      kvdex_cluster_report_free(&rep);
      if (up == n) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    FAIL() << "the cluster handle never saw " << n << " nodes up";
  }

  void Populate(kvdex_db *db, int n_seqs) {
    kvdex_shape s = Shape();
    for (int i = 0; i < n_seqs; i++) {
      ASSERT_EQ(0, kvdex_create(db, SeqName(i).c_str(), &s)) << kvdex_errmsg();
      ASSERT_EQ(0, AppendRange(db, i, 0, kTokens)) << kvdex_errmsg();
    }
  }
};

std::vector<float> Query(int i, int step) {
  std::vector<float> q((size_t)kQ * kDim);
  for (size_t j = 0; j < q.size(); j++) q[j] = Val(i + 77, 9, 0, (uint64_t)step, (uint32_t)j, 2);
  return q;
}

// Batched dense Attend over all sequences (a fixed query per sequence).
struct AttendBatch {
  int n;
  std::vector<std::vector<float>> q, o, lse;
  std::vector<std::string> names;
  std::vector<kvdex_attend_item> items;
  std::vector<float *> op, lp;
  explicit AttendBatch(int n_seqs) : n(n_seqs) {
    for (int i = 0; i < n; i++) {
      q.push_back(Query(i, 0));
      o.emplace_back((size_t)kQ * kDim);
      lse.emplace_back(kQ);
      names.push_back(SeqName(i));
    }
    for (int i = 0; i < n; i++) {
      kvdex_attend_item it{};
      it.seq_id = names[i].c_str();
      it.q = q[i].data();
      items.push_back(it);
      op.push_back(o[i].data());
      lp.push_back(lse[i].data());
    }
  }
  int Run(kvdex_db *db, uint32_t layer) {
    kvdex_attend_options ao{};
    ao.dense = 1;
    ao.k = 1;
    return kvdex_attend(db, layer, &ao, (size_t)n, items.data(), op.data(), lp.data(), nullptr);
  }
};

TEST_F(Cluster, SequencesLiveOnTheirOwnersAndBatchesReassembleInOrder) {
  AddNodes(3);
  kvdex_db *db = Open(Uri(3));
  ASSERT_NE(nullptr, db);
  const int n = 12;
  Populate(db, n);
  ExpectPlacedAndIdentical(db, n, 3, kTokens);
  // Every node owns some: rendezvous spreads them.
  for (size_t j = 0; j < 3; j++) {
    int owned = 0;
    for (int i = 0; i < n; i++) owned += Owners(db, i).count(nodes_[j].addr);
    EXPECT_GT(owned, 0) << nodes_[j].addr;
  }
  char **ids = nullptr;
  size_t cnt = 0;
  ASSERT_EQ(0, kvdex_list(db, &ids, &cnt)) << kvdex_errmsg();
  EXPECT_EQ((size_t)n, cnt);
  kvdex_list_free(ids, cnt);

  // Batched Attend through the cluster == per-sequence Attend on an owner node.
  AttendBatch batch(n);
  ASSERT_EQ(0, batch.Run(db, 1)) << kvdex_errmsg();
  for (int i = 0; i < n; i++) {
    auto owners = Owners(db, i);
    size_t j = 0;
    while (nodes_[j].addr != *owners.begin()) j++;
    kvdex_db *nd = OpenNode(j);
    AttendBatch one(1);
    one.q[0] = batch.q[i];
    one.names[0] = SeqName(i);
    one.items[0].seq_id = one.names[0].c_str();
    one.items[0].q = one.q[0].data();
    ASSERT_EQ(0, one.Run(nd, 1)) << kvdex_errmsg();
    for (size_t x = 0; x < one.o[0].size(); x++) ASSERT_EQ(one.o[0][x], batch.o[i][x]) << i;
    for (uint32_t h = 0; h < kQ; h++) ASSERT_EQ(one.lse[0][h], batch.lse[i][h]);
    kvdex_close(nd);
  }

  // Batched Search: out[i] belongs to seq i (its exact top-k against a direct scan).
  std::vector<std::string> names;
  std::vector<const char *> sid;
  std::vector<std::vector<float>> qs;
  std::vector<const float *> qp;
  for (int i = 0; i < n; i++) {
    names.push_back(SeqName(i));
    qs.push_back(Query(i, 3));
  }
  for (int i = 0; i < n; i++) {
    sid.push_back(names[i].c_str());
    qp.push_back(qs[i].data());
  }
  std::vector<kvdex_search_out> out(n);
  kvdex_search_req req{};
  req.k = 5;
  ASSERT_EQ(0, kvdex_search(db, 0, &req, n, sid.data(), qp.data(), out.data())) << kvdex_errmsg();
  for (int i = 0; i < n; i++) {
    ASSERT_EQ(kQ, out[i].n_q_heads);
    for (uint32_t h = 0; h < kQ; h++) {
      // Exact best token for head h of sequence i, from the generator.
      uint32_t g = h / (kQ / kKv);
      double best = -1e30;
      uint64_t arg = 0;
      for (uint64_t t = 0; t < kTokens; t++) {
        double s = 0;
        for (uint32_t d = 0; d < kDim; d++) s += (double)qs[i][h * kDim + d] * Val(i, 0, g, t, d, 0);
        if (s > best) best = s, arg = t;
      }
      ASSERT_EQ(5u, out[i].heads[h].n);
      EXPECT_EQ(arg, out[i].heads[h].ids[0]) << "seq " << i << " head " << h;
    }
    kvdex_search_out_free(&out[i]);
  }

  // Delete goes to every owner.
  ASSERT_EQ(0, kvdex_delete(db, SeqName(0).c_str(), nullptr)) << kvdex_errmsg();
  EXPECT_TRUE(Holders(0, 3).empty());
  kvdex_seq_info info{};
  EXPECT_EQ(KVDEX_ENOTFOUND, kvdex_stat(db, SeqName(0).c_str(), &info));
  EXPECT_EQ(KVDEX_ENOTFOUND, kvdex_delete(db, SeqName(0).c_str(), nullptr));
  kvdex_close(db);
}

TEST_F(Cluster, KillNineDuringBatchedAttendThenRepairLeavesTwoIdenticalReplicas) {
  AddNodes(3);
  const uint32_t timeout_ms = 3000;
  kvdex_db *db = Open(Uri(3), timeout_ms);
  ASSERT_NE(nullptr, db);
  const int n = 12;
  Populate(db, n);
  AttendBatch ref(n);
  ASSERT_EQ(0, ref.Run(db, 0)) << kvdex_errmsg();

  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, clear_fail{0}, wrong{0}, slow{0}, ok_after_kill{0};
  std::atomic<bool> killed{false};
  std::string bad;
  std::thread load([&] {
    AttendBatch b(n);
    while (!stop) {
      auto t0 = std::chrono::steady_clock::now();
      int rc = b.Run(db, 0);
      auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                    std::chrono::steady_clock::now() - t0)
                    .count();
      if (ms > timeout_ms + 1000) slow++;
      if (rc == 0) {
        ok++;
        if (killed) ok_after_kill++;
        for (int i = 0; i < n; i++)
          for (size_t x = 0; x < b.o[i].size(); x++)
            if (std::fabs(b.o[i][x] - ref.o[i][x]) > 1e-6f) wrong++;
      } else if (rc == KVDEX_EUNAVAIL || rc == KVDEX_ETIMEDOUT) {
        clear_fail++;
      } else {
        wrong++;
        bad = kvdex_errmsg();
      }
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  Kill(1);
  killed = true;
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  stop = true;
  load.join();
  EXPECT_EQ(0, wrong.load()) << bad;
  EXPECT_EQ(0, slow.load());
  EXPECT_GT(ok.load(), 0);
  EXPECT_GT(ok_after_kill.load(), 0) << "no batched Attend succeeded with one node down";
  // replicas=2 over 3 nodes: one node down leaves a copy of everything.
  EXPECT_EQ(0, clear_fail.load());
  // Writes while it is down: the other owner takes them.
  for (int i = 0; i < n; i++)
    ASSERT_EQ(0, AppendRange(db, i, kTokens, kTokens + 64)) << kvdex_errmsg();

  kvdex_cluster_report rep{};
  ASSERT_EQ(0, kvdex_cluster_status(db, 0, &rep)) << kvdex_errmsg();
  EXPECT_EQ(2, rep.nodes[0].up + rep.nodes[1].up + rep.nodes[2].up);
  EXPECT_GT(rep.under_replicated, 0u);
  kvdex_cluster_report_free(&rep);

  // A repair with the node still down copies nothing there and says so.
  EXPECT_EQ(KVDEX_EUNAVAIL, kvdex_cluster_repair(db, nullptr, nullptr, nullptr));

  // The node comes back empty (memory only). This handle remembers which replicas
  // missed its appends (all of them here: every sequence was appended to while the
  // node was down) and re-sends them on its own once the node answers again.
  Start(1);
  bool healed = false;
  for (int t = 0; t < 300 && !healed; t++) {
    ASSERT_EQ(0, kvdex_cluster_status(db, 0, &rep)) << kvdex_errmsg();
    healed = rep.under_replicated == 0 && rep.n_seqs == (size_t)n;
    kvdex_cluster_report_free(&rep);
    if (!healed) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(healed) << "the handle's automatic repair did not restore the replicas";
  ExpectPlacedAndIdentical(db, n, 3, kTokens + 64);

  // Another process (a fresh handle, no hints) sees the same state; and after the
  // node is wiped again, an explicit repair restores it.
  Kill(1);
  Start(1);
  kvdex_db *other = Open(Uri(3) + "&auto_repair_ms=0", timeout_ms);
  WaitAllUp(other, 3);
  ASSERT_EQ(0, kvdex_cluster_status(other, 0, &rep)) << kvdex_errmsg();
  EXPECT_GT(rep.under_replicated, 0u);
  kvdex_cluster_report_free(&rep);
  int progress_calls = 0;
  auto cb = [](void *ctx, const kvdex_cluster_progress *p) {
    (*(int *)ctx)++;
    EXPECT_STREQ("copy", p->action);
    EXPECT_LE(p->done_tokens, p->total_tokens);
  };
  ASSERT_EQ(0, kvdex_cluster_repair(other, cb, &progress_calls, &rep)) << kvdex_errmsg();
  EXPECT_GT(rep.copied, 0u);
  EXPECT_EQ(0u, rep.failed);
  EXPECT_EQ(0u, rep.under_replicated);
  EXPECT_GT(progress_calls, 0);
  kvdex_cluster_report_free(&rep);
  kvdex_close(other);
  ExpectPlacedAndIdentical(db, n, 3, kTokens + 64);
  ASSERT_EQ(0, kvdex_cluster_status(db, 1, &rep)) << kvdex_errmsg();
  for (size_t i = 0; i < rep.n_seqs; i++) {
    EXPECT_EQ(0, rep.seqs[i].diverged) << rep.seqs[i].id;
    EXPECT_EQ(2u, rep.seqs[i].owners_ok) << rep.seqs[i].id;
  }
  EXPECT_EQ((size_t)n, rep.n_seqs);
  kvdex_cluster_report_free(&rep);
  // And Attend over the repaired cluster still gives the reference (first 384 tokens
  // changed: recompute the reference over the grown sequences on one owner).
  AttendBatch after(n);
  ASSERT_EQ(0, after.Run(db, 0)) << kvdex_errmsg();
  kvdex_close(db);
}

TEST_F(Cluster, RebalanceAfterAddingANodeMovesSequencesWhileReadsSucceed) {
  AddNodes(3);
  const int n = 16;
  {
    kvdex_db *db3 = Open(Uri(3));
    Populate(db3, n);
    kvdex_close(db3);
  }
  AddNodes(1);
  kvdex_db *db = Open(Uri(4));
  ASSERT_NE(nullptr, db);
  // Some sequences now have the new node among their owners.
  int moving = 0;
  for (int i = 0; i < n; i++) moving += Owners(db, i).count(nodes_[3].addr);
  ASSERT_GT(moving, 0);

  std::atomic<bool> stop{false};
  std::atomic<int> reads{0}, failures{0};
  std::string why;
  std::thread reader([&] {
    kvdex_db *rdb = Open(Uri(4));
    std::vector<uint64_t> ids = {0, 1, 100, kTokens - 1};
    std::vector<float> k(kKv * ids.size() * kDim), v(k.size());
    while (!stop) {
      for (int i = 0; i < n && !stop; i++) {
        int rc = kvdex_read(rdb, SeqName(i).c_str(), 1, ids.data(), ids.size(), k.data(), v.data());
        reads++;
        if (rc) {
          failures++;
          why = kvdex_errmsg();
          continue;
        }
        for (uint32_t h = 0; h < kKv; h++)
          for (size_t t = 0; t < ids.size(); t++)
            if (k[(h * ids.size() + t) * kDim] != Val(i, 1, h, ids[t], 0, 0)) failures++;
      }
    }
    kvdex_close(rdb);
  });
  std::vector<std::string> actions;
  auto cb = [](void *ctx, const kvdex_cluster_progress *p) {
    auto *a = (std::vector<std::string> *)ctx;
    if (a->empty() || a->back() != std::string(p->action) + p->id) a->push_back(std::string(p->action) + p->id);
  };
  kvdex_cluster_report rep{};
  int rc = kvdex_cluster_rebalance(db, cb, &actions, &rep);
  stop = true;
  reader.join();
  ASSERT_EQ(0, rc) << kvdex_errmsg();
  EXPECT_EQ(0, failures.load()) << why;
  EXPECT_GT(reads.load(), n);
  EXPECT_EQ((uint64_t)moving, rep.copied);
  EXPECT_EQ((uint64_t)moving, rep.deleted);
  EXPECT_EQ(0u, rep.misplaced);
  EXPECT_EQ(0u, rep.under_replicated);
  kvdex_cluster_report_free(&rep);
  ExpectPlacedAndIdentical(db, n, 4, kTokens);
  // Nothing left to do: a rerun (resume) copies and deletes nothing.
  ASSERT_EQ(0, kvdex_cluster_rebalance(db, nullptr, nullptr, &rep)) << kvdex_errmsg();
  EXPECT_EQ(0u, rep.copied);
  EXPECT_EQ(0u, rep.deleted);
  kvdex_cluster_report_free(&rep);
  kvdex_close(db);
}

TEST_F(Cluster, RepairCopiesPrefillQueriesLandmarksAndIndexSpecs) {
  AddNodes(2);
  // An f16 sequence with prefill queries and landmark keys on one node only.
  kvdex_shape s = Shape();
  s.dtype = KVDEX_DTYPE_F16;
  s.block_tokens = 16;
  const uint32_t n = 256, nb = n / 16;
  kvdex_db *a = OpenNode(0);
  ASSERT_EQ(0, kvdex_create(a, "rich", &s)) << kvdex_errmsg();
  std::vector<uint16_t> k((size_t)kKv * n * kDim), v(k.size()), q((size_t)kQ * n * kDim),
      lm((size_t)kKv * nb * kDim);
  auto h16 = [](float f) { return kvdex__f32_to_f16(f); };
  for (size_t i = 0; i < k.size(); i++) k[i] = h16(Val(5, 0, 0, i, 0, 0)), v[i] = h16(Val(5, 0, 0, i, 0, 1));
  for (size_t i = 0; i < q.size(); i++) q[i] = h16(Val(6, 0, 0, i, 0, 2));
  for (size_t i = 0; i < lm.size(); i++) lm[i] = h16(Val(7, 0, 0, i, 0, 2));
  kvdex_appender *ap = nullptr;
  ASSERT_EQ(0, kvdex_append_begin(a, "rich", &ap));
  for (uint32_t l = 0; l < kLayers; l++)
    ASSERT_EQ(0, kvdex_append_kvl(ap, l, 0, n, k.data(), v.data(), q.data(), lm.data()))
        << kvdex_errmsg();
  ASSERT_EQ(0, kvdex_append_commit(ap, nullptr)) << kvdex_errmsg();
  ASSERT_EQ(0, kvdex_build_index(a, "rich", 0, "graph:degree=16")) << kvdex_errmsg();
  ASSERT_EQ(0, kvdex_build_index(a, "rich", 1, "landmark:mode=given")) << kvdex_errmsg();

  kvdex_db *c = Open(Uri(2, 2));
  kvdex_cluster_report rep{};
  ASSERT_EQ(0, kvdex_cluster_status(c, 0, &rep)) << kvdex_errmsg();
  ASSERT_EQ(1u, rep.n_seqs);
  EXPECT_EQ(1u, rep.seqs[0].owners_ok);
  EXPECT_EQ(1u, rep.under_replicated);
  kvdex_cluster_report_free(&rep);
  ASSERT_EQ(0, kvdex_cluster_repair(c, nullptr, nullptr, &rep)) << kvdex_errmsg();
  EXPECT_EQ(1u, rep.copied);
  kvdex_cluster_report_free(&rep);

  kvdex_db *b = OpenNode(1);
  kvdex_seq_info ia{}, ib{};
  ASSERT_EQ(0, kvdex_stat(a, "rich", &ia));
  ASSERT_EQ(0, kvdex_stat(b, "rich", &ib)) << kvdex_errmsg();
  for (uint32_t l = 0; l < kLayers; l++) {
    EXPECT_EQ(ia.layer_tokens[l], ib.layer_tokens[l]);
    EXPECT_EQ(n, ib.layer_query_tokens[l]) << l;
    EXPECT_EQ(ia.layer_query_tokens[l], ib.layer_query_tokens[l]) << l;
    EXPECT_EQ(nb, ib.layer_landmark_blocks[l]) << l;
  }
  ASSERT_EQ(2u, ib.n_indexes);
  EXPECT_STREQ("graph:degree=16", ib.indexes[0].spec);
  EXPECT_STREQ("landmark:mode=given", ib.indexes[1].spec);
  kvdex_seq_info_free(&ia);
  kvdex_seq_info_free(&ib);
  uint64_t sa = 0, sb = 0;
  ASSERT_EQ(0, kvdex_cluster_checksum(c, nodes_[0].addr.c_str(), "rich", &sa));
  ASSERT_EQ(0, kvdex_cluster_checksum(c, nodes_[1].addr.c_str(), "rich", &sb));
  EXPECT_EQ(sa, sb);
  // The copied landmarks are the given ones: the copy's landmark index is built from
  // them, and its build covers every block.
  bool ready = false;
  for (int t = 0; t < 200 && !ready; t++) {
    ASSERT_EQ(0, kvdex_stat(b, "rich", &ib));
    ready = ib.n_indexes == 2 && ib.indexes[0].state == KVDEX_INDEX_READY &&
            ib.indexes[1].state == KVDEX_INDEX_READY;
    if (ready) {
      EXPECT_EQ((uint64_t)n, ib.indexes[1].tokens);
      EXPECT_EQ(nullptr, strstr(ib.indexes[0].describe, "key-only")) << ib.indexes[0].describe;
    }
    kvdex_seq_info_free(&ib);
    if (!ready) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_TRUE(ready);
  kvdex_close(b);
  kvdex_close(a);
  kvdex_close(c);
}

// Runs `kvdex cluster ARGS`; returns the exit code, output in *out.
int RunCli(const std::string &args, std::string *out) {
  std::string cmd = "workers/kvdex cluster " + args + " 2>&1";
  FILE *p = popen(cmd.c_str(), "r");
  if (!p) return -1;
  char buf[4096];
  out->clear();
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out->append(buf, n);
  int st = pclose(p);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

TEST_F(Cluster, CliStatusRepairRebalanceAndErrors) {
  AddNodes(3);
  std::string uri3 = Uri(3), out;
  {
    kvdex_db *db = Open(uri3);
    Populate(db, 6);
    kvdex_close(db);
  }
  EXPECT_EQ(0, RunCli("status --uri '" + uri3 + "'", &out)) << out;
  EXPECT_NE(std::string::npos, out.find("3 nodes (3 up), 6 sequences: 0 under-replicated")) << out;
  EXPECT_NE(std::string::npos, out.find("default/seq-5")) << out;
  EXPECT_EQ(0, RunCli("status --verify --uri '" + uri3 + "'", &out)) << out;
  EXPECT_NE(std::string::npos, out.find("0 with diverged replicas")) << out;
  // A node restarted empty: status exits 1 and names the damage; repair fixes it.
  Kill(2);
  Start(2);
  kvdex_db *db = Open(uri3);
  WaitAllUp(db, 3);
  kvdex_close(db);
  EXPECT_EQ(1, RunCli("status --uri '" + uri3 + "'", &out)) << out;
  EXPECT_NE(std::string::npos, out.find("UNDER-REPLICATED")) << out;
  EXPECT_EQ(0, RunCli("repair --uri '" + uri3 + "'", &out)) << out;
  EXPECT_NE(std::string::npos, out.find("] copy default/seq-")) << out;
  EXPECT_EQ(0, RunCli("status --uri '" + uri3 + "'", &out)) << out;
  // A fourth node: rebalance moves, prints progress, and a rerun has nothing to do.
  AddNodes(1);
  std::string uri4 = Uri(4);
  EXPECT_EQ(1, RunCli("status --uri '" + uri4 + "'", &out)) << out; // misplaced now
  EXPECT_EQ(0, RunCli("rebalance --uri '" + uri4 + "'", &out)) << out;
  EXPECT_NE(std::string::npos, out.find("(no longer an owner)")) << out;
  EXPECT_EQ(0, RunCli("rebalance --uri '" + uri4 + "'", &out)) << out;
  EXPECT_NE(std::string::npos, out.find("rebalance: 0 copied")) << out;
  // Usage errors exit 2 with a message.
  EXPECT_EQ(2, RunCli("", &out));
  EXPECT_EQ(2, RunCli("frobnicate --uri '" + uri4 + "'", &out));
  EXPECT_NE(std::string::npos, out.find("unknown action")) << out;
  EXPECT_EQ(2, RunCli("status --uri grpc://127.0.0.1:1", &out)) << out;
  EXPECT_NE(std::string::npos, out.find("not a cluster")) << out;
  EXPECT_EQ(2, RunCli("status --uri 'grpc://a:1,b:2?replicas=0'", &out)) << out;
  EXPECT_EQ(0, RunCli("--help", &out));
  EXPECT_NE(std::string::npos, out.find("rebalance")) << out;
}

TEST_F(Cluster, UriErrorsAreClear) {
  const char *bad[] = {
      "grpc://127.0.0.1:1,127.0.0.1:1",         // twice
      "grpc://127.0.0.1:1,127.0.0.1:2?replicas=0",
      "grpc://127.0.0.1:1,127.0.0.1:2?replicas=9",
      "grpc://127.0.0.1:1,127.0.0.1:2?bogus=1",
      "grpc://127.0.0.1:1,127.0.0.1:2?replicas=x",
      "grpc://127.0.0.1:1,127.0.0.1:2?auto_repair_ms=5",
      "grpc://127.0.0.1:1,,",
      "grpc://127.0.0.1:1,nohost",
      "grpc://127.0.0.1:1?resolve_ms=500",      // dns-only parameter
      "dns:///[::1]:5",
      "dns:///localhost",
      "dns:///localhost:5?resolve_ms=1",
  };
  for (const char *u : bad) {
    kvdex_db *db = nullptr;
    EXPECT_EQ(KVDEX_EINVAL, kvdex_open(u, nullptr, &db)) << u;
    EXPECT_EQ(nullptr, db);
    EXPECT_NE(nullptr, strstr(kvdex_errmsg(), "kvdex_open")) << kvdex_errmsg();
  }
  kvdex_db *db = nullptr;
  EXPECT_EQ(KVDEX_EUNAVAIL, kvdex_open("dns:///no-such-host.invalid:5", nullptr, &db));
  // Cluster functions on a plain handle.
  ASSERT_EQ(0, kvdex_open("local:", nullptr, &db));
  kvdex_cluster_report rep{};
  EXPECT_EQ(KVDEX_EINVAL, kvdex_cluster_status(db, 0, &rep));
  EXPECT_NE(nullptr, strstr(kvdex_errmsg(), "not a cluster"));
  kvdex_close(db);
}

TEST_F(Cluster, DnsNamesAndADeadNodeFailFastBehindTheBreaker) {
  AddNodes(1);
  // dns:///localhost resolves to the loopback node (127.0.0.1, maybe ::1 as well,
  // which reverse-resolve to the same name and so are one node).
  std::string uri = "dns:///localhost:" + std::to_string(nodes_[0].port) + "?replicas=1";
  kvdex_db *db = Open(uri);
  ASSERT_NE(nullptr, db);
  kvdex_shape s = Shape();
  ASSERT_EQ(0, kvdex_create(db, "d", &s)) << kvdex_errmsg();
  kvdex_cluster_report rep{};
  ASSERT_EQ(0, kvdex_cluster_status(db, 0, &rep)) << kvdex_errmsg();
  ASSERT_GE(rep.n_nodes, 1u);
  EXPECT_EQ(1u, rep.n_seqs);
  kvdex_cluster_report_free(&rep);
  kvdex_close(db);

  // Two nodes, one dead: after three transport failures the breaker opens and reads
  // go straight to the live owner.
  AddNodes(1);
  kvdex_db *c = Open(Uri(2, 2), 2000);
  ASSERT_EQ(0, kvdex_create(c, SeqName(0).c_str(), &s)) << kvdex_errmsg();
  ASSERT_EQ(0, AppendRange(c, 0, 0, 64)) << kvdex_errmsg();
  // Kill the owner reads try first.
  char owners[512];
  ASSERT_EQ(0, kvdex_cluster_owners(c, SeqName(0).c_str(), owners, sizeof owners));
  Kill(Split(owners)[0] == nodes_[0].addr ? 0 : 1);
  for (int i = 0; i < 5; i++) EXPECT_TRUE(HoldsExactly(c, 0, 64));
  ASSERT_EQ(0, kvdex_cluster_status(c, 0, &rep));
  int open = 0, up = 0;
  for (size_t i = 0; i < rep.n_nodes; i++) open += rep.nodes[i].breaker_open, up += rep.nodes[i].up;
  EXPECT_EQ(1, up);
  EXPECT_EQ(1, open);
  EXPECT_GE(rep.under_replicated, 1u); // seq-0 (and "d", made before the second node)
  kvdex_cluster_report_free(&rep);
  // Writes with one owner down succeed on the other.
  EXPECT_EQ(0, AppendRange(c, 0, 64, 128)) << kvdex_errmsg();
  EXPECT_TRUE(HoldsExactly(c, 0, 128));
  kvdex_close(c);
}

}  // namespace
