#!/usr/bin/python3
"""Security test: `kvdex serve` with --tls-cert/--tls-key, --tls-client-ca and
--auth-file, against a grpcio client. A CA, a server certificate (SAN 127.0.0.1,
localhost) and a client certificate are made with the openssl CLI in a temp dir.

Usage: security_test.py KVDEX_BINARY. Writes JUnit XML to $XML_OUTPUT_FILE.
"""
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import unittest

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "interop"))


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "py"))
import junit_main  # noqa: E402  (tests/py: the shared runner that writes test.xml)
from grpc_stubs import STUBS, health_pb2, kvdex_pb2, kvdex_pb2_grpc  # noqa: E402,F401

KVDEX = None
TMP = None
T = 20
C = grpc.StatusCode


def sh(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=TMP)


def make_certs():
    ext = os.path.join(TMP, "san.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
       "-subj", "/CN=kvdex-test-ca", "-keyout", "ca.key", "-out", "ca.pem")
    for name, cn, extra in (("server", "127.0.0.1", ["-extfile", ext]), ("client", "client", [])):
        sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=" + cn,
           "-keyout", name + ".key", "-out", name + ".csr")
        sh("openssl", "x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
           "-CAcreateserial", "-days", "2", "-out", name + ".pem", *extra)
    with open(os.path.join(TMP, "auth.txt"), "w") as f:
        f.write("# test tokens\n\ntok-a a\ntok-ab a,b\ntok-all *\n")


def p(name):
    return os.path.join(TMP, name)


def read(name):
    with open(p(name), "rb") as f:
        return f.read()


class Server:
    def __init__(self, *flags):
        self.lines, self.port = [], None
        self._ready = threading.Event()
        self.proc = subprocess.Popen([KVDEX, "serve", "--listen", "127.0.0.1:0", "--memory", "64M",
                                      "--threads", "2", *flags],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(60) or self.port is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "\n".join(self.lines))

    def _read(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            m = re.search(r"listening on (\S+):(\d+)", line)
            if m and self.port is None:
                self.port = int(m.group(2))
                self._ready.set()
        self._ready.set()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def tls_channel(port, cert=False):
    creds = grpc.ssl_channel_credentials(
        root_certificates=read("ca.pem"),
        private_key=read("client.key") if cert else None,
        certificate_chain=read("client.pem") if cert else None)
    return grpc.secure_channel("127.0.0.1:%d" % port, creds)


def health(ch, md=None):
    stub = ch.unary_unary("/grpc.health.v1.Health/Check",
                          request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                          response_deserializer=health_pb2.HealthCheckResponse.FromString)
    return stub(health_pb2.HealthCheckRequest(), timeout=T, metadata=md)


def ref(sid, ns):
    return kvdex_pb2.SequenceRef(namespace=ns, sequence_id=sid)


SHAPE = kvdex_pb2.Shape(n_layers=1, n_kv_heads=1, n_q_heads=1, head_dim=8,
                        dtype=kvdex_pb2.DTYPE_F32)


def bearer(tok):
    return (("authorization", "Bearer " + tok),)


class TlsTest(unittest.TestCase):
    def test_tls(self):
        srv = Server("--tls-cert", p("server.pem"), "--tls-key", p("server.key"))
        try:
            with tls_channel(srv.port) as ch:
                self.assertEqual(health(ch).status, 1)
                kv = kvdex_pb2_grpc.KVStoreStub(ch)
                kv.ListSequences(kvdex_pb2.ListSequencesRequest(), timeout=T)
            with grpc.insecure_channel("127.0.0.1:%d" % srv.port) as ch:
                with self.assertRaises(grpc.RpcError) as e:
                    health(ch)
                self.assertEqual(e.exception.code(), C.UNAVAILABLE)
        finally:
            self.assertEqual(srv.stop(), 0)

    def test_mtls(self):
        srv = Server("--tls-cert", p("server.pem"), "--tls-key", p("server.key"),
                     "--tls-client-ca", p("ca.pem"))
        try:
            with tls_channel(srv.port, cert=True) as ch:
                self.assertEqual(health(ch).status, 1)
            with tls_channel(srv.port, cert=False) as ch:
                with self.assertRaises(grpc.RpcError) as e:
                    health(ch)
                self.assertEqual(e.exception.code(), C.UNAVAILABLE)
        finally:
            self.assertEqual(srv.stop(), 0)

    def test_half_tls_refused(self):
        r = subprocess.run([KVDEX, "serve", "--listen", "127.0.0.1:0", "--tls-cert",
                            p("server.pem")], stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=60)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(b"key", r.stderr)


class AuthTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = Server("--auth-file", p("auth.txt"))
        cls.ch = grpc.insecure_channel("127.0.0.1:%d" % cls.srv.port)
        cls.kv = kvdex_pb2_grpc.KVStoreStub(cls.ch)
        cls.kv.CreateSequence(kvdex_pb2.CreateSequenceRequest(seq=ref("s1", "b"), shape=SHAPE),
                              timeout=T, metadata=bearer("tok-all"))
        cls.kv.CreateSequence(kvdex_pb2.CreateSequenceRequest(seq=ref("s1", "a"), shape=SHAPE),
                              timeout=T, metadata=bearer("tok-a"))

    @classmethod
    def tearDownClass(cls):
        cls.ch.close()
        assert cls.srv.stop() == 0, "\n".join(cls.srv.lines)

    def code(self, fn, req, md):
        with self.assertRaises(grpc.RpcError) as e:
            fn(req, timeout=T, metadata=md)
        return e.exception

    def test_health_needs_no_token(self):
        self.assertEqual(health(self.ch).status, 1)

    def test_no_token(self):
        e = self.code(self.kv.StatSequence, kvdex_pb2.StatSequenceRequest(seq=ref("s1", "a")), None)
        self.assertEqual(e.code(), C.UNAUTHENTICATED)

    def test_bad_token(self):
        for md in (bearer("tok-b"), bearer("tok-"), bearer("tok-aa"), (("authorization", "tok-a"),)):
            e = self.code(self.kv.StatSequence, kvdex_pb2.StatSequenceRequest(seq=ref("s1", "a")),
                          md)
            self.assertEqual(e.code(), C.UNAUTHENTICATED, md)

    def test_allowed(self):
        r = self.kv.StatSequence(kvdex_pb2.StatSequenceRequest(seq=ref("s1", "a")), timeout=T,
                                 metadata=bearer("tok-a"))
        self.assertEqual(r.info.seq.sequence_id, "s1")
        r = self.kv.ListSequences(kvdex_pb2.ListSequencesRequest(namespace="a"), timeout=T,
                                  metadata=bearer("tok-a"))
        self.assertEqual([i.seq.namespace for i in r.sequences], ["a"])
        # all namespaces: only the token's ones are listed
        r = self.kv.ListSequences(kvdex_pb2.ListSequencesRequest(), timeout=T,
                                  metadata=bearer("tok-a"))
        self.assertEqual(sorted(i.seq.namespace for i in r.sequences), ["a"])
        r = self.kv.ListSequences(kvdex_pb2.ListSequencesRequest(), timeout=T,
                                  metadata=bearer("tok-all"))
        self.assertEqual(sorted(i.seq.namespace for i in r.sequences), ["a", "b"])

    def test_forbidden_namespace(self):
        exists = self.code(self.kv.StatSequence,
                           kvdex_pb2.StatSequenceRequest(seq=ref("s1", "b")), bearer("tok-a"))
        missing = self.code(self.kv.StatSequence,
                            kvdex_pb2.StatSequenceRequest(seq=ref("nope", "b")), bearer("tok-a"))
        self.assertEqual(exists.code(), C.PERMISSION_DENIED)
        self.assertEqual(missing.code(), C.PERMISSION_DENIED)
        self.assertEqual(exists.details(), missing.details())
        self.assertNotIn("s1", exists.details())
        e = self.code(self.kv.DeleteSequence,
                      kvdex_pb2.DeleteSequenceRequest(seq=ref("s1", "b")), bearer("tok-a"))
        self.assertEqual(e.code(), C.PERMISSION_DENIED)
        e = self.code(self.kv.ListSequences, kvdex_pb2.ListSequencesRequest(namespace="b"),
                      bearer("tok-a"))
        self.assertEqual(e.code(), C.PERMISSION_DENIED)
        # the sequence is still there for a token that may see it
        self.kv.StatSequence(kvdex_pb2.StatSequenceRequest(seq=ref("s1", "b")), timeout=T,
                             metadata=bearer("tok-ab"))


class ClientCommandsTest(unittest.TestCase):
    """kvdex inspect / demo / cluster reach a TLS + token server with --tls-ca and
    KVDEX_TOKEN (or --token), and say why when they cannot."""

    @classmethod
    def setUpClass(cls):
        cls.srv = Server("--tls-cert", p("server.pem"), "--tls-key", p("server.key"),
                         "--auth-file", p("auth.txt"))
        cls.uri = "grpcs://127.0.0.1:%d" % cls.srv.port

    @classmethod
    def tearDownClass(cls):
        assert cls.srv.stop() == 0, "\n".join(cls.srv.lines)

    def run_kvdex(self, *args, token=None):
        env = dict(os.environ)
        env.pop("KVDEX_TOKEN", None)
        if token:
            env["KVDEX_TOKEN"] = token
        return subprocess.run([KVDEX, *args], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=120, env=env)

    def test_demo_then_inspect(self):
        r = self.run_kvdex("demo", "--uri", self.uri, "--tls-ca", p("ca.pem"), "--namespace", "a",
                           "--tokens", "2048", "--kv-heads", "1", "--q-heads", "2",
                           "--head-dim", "32", "--steps", "3", token="tok-a")
        self.assertEqual(r.returncode, 0, r.stderr.decode())
        r = self.run_kvdex("inspect", "--uri", self.uri, "--tls-ca", p("ca.pem"),
                           "--namespace", "a", token="tok-a")
        self.assertEqual(r.returncode, 0, r.stderr.decode())
        self.assertIn(b"in namespace a", r.stdout)
        # --token works too (the environment is better: flags show in ps).
        r = self.run_kvdex("inspect", "--uri", self.uri, "--tls-ca", p("ca.pem"),
                           "--namespace", "a", "--token", "tok-a")
        self.assertEqual(r.returncode, 0, r.stderr.decode())

    def test_refusals_are_explained(self):
        r = self.run_kvdex("inspect", "--uri", self.uri, "--tls-ca", p("ca.pem"),
                           "--namespace", "a")
        self.assertEqual(r.returncode, 1)
        self.assertIn(b"UNAUTHENTICATED", r.stderr)
        r = self.run_kvdex("inspect", "--uri", self.uri, "--tls-ca", p("ca.pem"),
                           "--namespace", "b", token="tok-a")
        self.assertEqual(r.returncode, 1)
        self.assertIn(b"PERMISSION_DENIED", r.stderr)
        # No CA: the system roots do not know the test CA.
        r = self.run_kvdex("inspect", "--uri", self.uri, "--namespace", "a", token="tok-a")
        self.assertEqual(r.returncode, 1)
        self.assertIn(b"unavailable", r.stderr)
        r = self.run_kvdex("inspect", "--uri", self.uri, "--tls-ca", p("missing.pem"),
                           token="tok-a")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(b"missing.pem", r.stderr)

    def test_cluster_status_over_tls(self):
        uri = "grpcs://127.0.0.1:%d?replicas=1" % self.srv.port
        r = self.run_kvdex("cluster", "status", "--uri", uri, "--tls-ca", p("ca.pem"),
                           token="tok-all")
        self.assertIn(r.returncode, (0, 1), r.stderr.decode())
        self.assertIn(b"1 nodes (1 up)", r.stdout)


if __name__ == "__main__":
    KVDEX = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory() as TMP:
        make_certs()
        result = junit_main.run("security")
    sys.exit(0 if result.wasSuccessful() else 1)
