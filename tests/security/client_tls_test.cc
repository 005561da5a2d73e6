// The C client over grpcs:// with a bearer token, against an in-process server with
// TLS and token auth: the certificates are made with the openssl CLI in a temp dir.
#include <gtest/gtest.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <string>

#include <kvdex/kvdex.h>

#include "kvstore/kvstore.h"
#include "workers/auth.h"
#include "workers/server.h"

namespace {

std::string g_dir;  // temp dir with ca.pem, server.pem, server.key

bool Sh(const std::string &cmd) { return system(("cd " + g_dir + " && " + cmd + " >/dev/null 2>&1").c_str()) == 0; }

class ClientTls : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/kvdex-tls-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    g_dir = tmpl;
    FILE *f = fopen((g_dir + "/san.ext").c_str(), "w");
    ASSERT_NE(f, nullptr);
    fputs("subjectAltName=IP:127.0.0.1,DNS:localhost\n", f);
    fclose(f);
    ASSERT_TRUE(Sh("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=kvdex-test-ca "
                   "-keyout ca.key -out ca.pem"));
    ASSERT_TRUE(Sh("openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout server.key "
                   "-out server.csr"));
    ASSERT_TRUE(Sh("openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial "
                   "-days 2 -out server.pem -extfile san.ext"));
  }
  static void TearDownTestSuite() { system(("rm -rf " + g_dir).c_str()); }

  void SetUp() override {
    const char text[] = "tok-a a\ntok-all *\n";
    ASSERT_EQ(0, kvdex_auth_parse(text, sizeof text - 1, "test", &auth_)) << kvdex_errmsg();
    ASSERT_EQ(0, kvdex_store_create(1ull << 30, &store_));
    ASSERT_EQ(0, kvdex_pool_create(1, &pool_));
    kvdex_server_opts so{};
    so.listen = "127.0.0.1:0";
    so.threads = 2;
    cert_ = g_dir + "/server.pem";
    key_ = g_dir + "/server.key";
    ca_ = g_dir + "/ca.pem";
    so.tls_cert_file = cert_.c_str();
    so.tls_key_file = key_.c_str();
    so.auth = auth_;
    ASSERT_EQ(0, kvdex_server_start(store_, pool_, &so, &srv_)) << kvdex_errmsg();
    port_ = std::to_string(kvdex_server_port(srv_));
  }
  void TearDown() override {
    kvdex_server_stop(srv_, 1000);
    kvdex_pool_destroy(pool_);
    kvdex_store_destroy(store_);
    kvdex_auth_free(auth_);
  }
  // Opens a handle; returns the kvdex_open code.
  int Open(const std::string &scheme, const char *ns, const char *token, kvdex_db **db) {
    kvdex_open_opts o{};
    o.name_space = ns;
    o.timeout_ms = 10000;
    o.tls_ca_file = ca_.c_str();
    o.auth_token = token;
    return kvdex_open((scheme + "://127.0.0.1:" + port_).c_str(), &o, db);
  }

  kvdex_auth *auth_ = nullptr;
  kvdex_store *store_ = nullptr;
  kvdex_pool *pool_ = nullptr;
  kvdex_server *srv_ = nullptr;
  std::string port_, cert_, key_, ca_;
};

const kvdex_shape kShape = {1, 2, 4, 16, 0, KVDEX_DTYPE_F32};

TEST_F(ClientTls, TokenOfTheNamespaceWorksOverTls) {
  kvdex_db *db = nullptr;
  ASSERT_EQ(0, Open("grpcs", "a", "tok-a", &db)) << kvdex_errmsg();
  EXPECT_EQ(0, kvdex_create(db, "s1", &kShape)) << kvdex_errmsg();
  kvdex_seq_info info{};
  EXPECT_EQ(0, kvdex_stat(db, "s1", &info)) << kvdex_errmsg();
  EXPECT_EQ(2u, info.shape.n_kv_heads);
  kvdex_seq_info_free(&info);
  kvdex_close(db);
}

TEST_F(ClientTls, NoOrWrongTokenIsUnauthenticated) {
  for (const char *tok : {(const char *)nullptr, "tok-b", "tok-", "tok-aa"}) {
    kvdex_db *db = nullptr;
    ASSERT_EQ(0, Open("grpcs", "a", tok, &db)) << kvdex_errmsg();
    EXPECT_EQ(KVDEX_EUNAUTH, kvdex_create(db, "s2", &kShape)) << (tok ? tok : "(none)");
    EXPECT_NE(nullptr, strstr(kvdex_errmsg(), "UNAUTHENTICATED")) << kvdex_errmsg();
    kvdex_close(db);
  }
}

TEST_F(ClientTls, OtherNamespaceIsDeniedWithoutTellingWhatExists) {
  kvdex_db *all = nullptr, *a = nullptr;
  ASSERT_EQ(0, Open("grpcs", "b", "tok-all", &all));
  ASSERT_EQ(0, kvdex_create(all, "there", &kShape)) << kvdex_errmsg();
  ASSERT_EQ(0, Open("grpcs", "b", "tok-a", &a));
  kvdex_seq_info info{};
  EXPECT_EQ(KVDEX_EPERM, kvdex_stat(a, "there", &info));
  std::string m1 = kvdex_errmsg();
  EXPECT_EQ(KVDEX_EPERM, kvdex_stat(a, "there", &info));  // same answer for an existing ...
  EXPECT_EQ(KVDEX_EPERM, kvdex_stat(a, "nothere", &info));  // ... and a missing sequence
  std::string m2 = kvdex_errmsg();
  EXPECT_EQ(std::string::npos, m1.find("there")) << m1;
  EXPECT_EQ(std::string::npos, m2.find("nothere")) << m2;
  EXPECT_EQ(0, kvdex_stat(all, "there", &info));  // still there
  kvdex_seq_info_free(&info);
  kvdex_close(a);
  kvdex_close(all);
}

TEST_F(ClientTls, PlaintextClientCannotTalkToATlsServer) {
  kvdex_db *db = nullptr;
  ASSERT_EQ(0, Open("grpc", "a", "tok-a", &db));
  EXPECT_NE(0, kvdex_create(db, "s3", &kShape));
  kvdex_close(db);
}

}  // namespace
