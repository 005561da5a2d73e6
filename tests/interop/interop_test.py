#!/usr/bin/python3
"""Interop test: a real kvdex server process against a real grpcio client.

Usage: interop_test.py SERVER_CMD [ARGS...]
The server command must serve on an ephemeral port and print a line containing
"listening on HOST:PORT" to stderr once it is serving (`kvdex serve --listen
127.0.0.1:0 ...` and tests/interop/test_server both do). Its memory cap must be
64 MiB or less for the RESOURCE_EXHAUSTED case (it is read from ListSequences).
The server is stopped with SIGTERM at the end and must exit 0 (so sanitizer
reports at exit fail the test).

Runs under `bazel test` with Debian's /usr/bin/python3 (python3-grpcio,
python3-protobuf, python3-numpy); the generated stubs come from //proto:kvdex_py.
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time
import unittest

import grpc
import numpy as np


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "py"))
import junit_main  # noqa: E402  (tests/py: the shared runner that writes test.xml)
from grpc_stubs import STUBS, health_pb2, kvdex_pb2, kvdex_pb2_grpc  # noqa: E402,F401

SERVER_CMD = []
TIMEOUT = 30  # seconds, every RPC
MAX_MSG = 256 << 20
F16, F32, BF16 = kvdex_pb2.DTYPE_F16, kvdex_pb2.DTYPE_F32, kvdex_pb2.DTYPE_BF16
C = grpc.StatusCode


class ServerProcess:
    """The server under test: started once, its stderr collected, always killed."""

    def __init__(self, cmd):
        self.cmd = cmd
        self.lines = []
        self.port = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            m = re.search(r"listening on (\S+):(\d+)", line)
            if m and self.port is None:
                self.port = int(m.group(2))
                self._ready.set()
        self._ready.set()  # EOF: the process died

    def wait_ready(self, timeout=60):
        if not self._ready.wait(timeout) or self.port is None:
            raise RuntimeError("server did not report its port within %ss (exit %s):\n%s" %
                               (timeout, self.proc.poll(), self.log()))

    def log(self, last=200):
        return "\n".join(self.lines[-last:])

    def stop(self, timeout=30):
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        return self.proc.returncode


SERVER = None
CHANNEL = None


def setUpModule():
    global SERVER, CHANNEL
    SERVER = ServerProcess(SERVER_CMD)
    try:
        SERVER.wait_ready()
    except Exception:
        SERVER.stop()
        raise
    CHANNEL = grpc.insecure_channel(
        "127.0.0.1:%d" % SERVER.port,
        options=[("grpc.max_receive_message_length", MAX_MSG),
                 ("grpc.max_send_message_length", MAX_MSG)])
    grpc.channel_ready_future(CHANNEL).result(timeout=TIMEOUT)


def tearDownModule():
    if CHANNEL is not None:
        CHANNEL.close()
    rc = SERVER.stop() if SERVER else 0
    if rc != 0:
        raise AssertionError("server exited with %s:\n%s" % (rc, SERVER.log()))


# ---- helpers -------------------------------------------------------------------

def ref(sid, ns=""):
    return kvdex_pb2.SequenceRef(namespace=ns, sequence_id=sid)


NP_DTYPE = {F32: np.float32, F16: np.float16}
_rng = np.random.default_rng(20240601)


class Seq:
    """A sequence on the server and its mirror here (K and V per layer)."""

    def __init__(self, test, sid, n_layers=2, n_kv=2, n_q=4, d=64, dtype=F16, block=16, ns=""):
        self.t, self.sid, self.ns = test, sid, ns
        self.n_layers, self.n_kv, self.n_q, self.d, self.dtype = n_layers, n_kv, n_q, d, dtype
        self.np = NP_DTYPE[dtype]
        self.K = [np.zeros((n_kv, 0, d), self.np) for _ in range(n_layers)]
        self.V = [np.zeros((n_kv, 0, d), self.np) for _ in range(n_layers)]
        test.kv.CreateSequence(kvdex_pb2.CreateSequenceRequest(
            seq=self.ref(), shape=self.shape(block)), timeout=TIMEOUT)

    def ref(self):
        return ref(self.sid, self.ns)

    def shape(self, block=16):
        return kvdex_pb2.Shape(n_layers=self.n_layers, n_kv_heads=self.n_kv, n_q_heads=self.n_q,
                               head_dim=self.d, dtype=self.dtype, block_tokens=block)

    def rand(self, n):
        k = _rng.standard_normal((self.n_kv, n, self.d)).astype(self.np)
        v = _rng.standard_normal((self.n_kv, n, self.d)).astype(self.np)
        return k, v

    def msg(self, layer, start, k, v, first=True):
        return kvdex_pb2.AppendKVRequest(seq=self.ref() if first else None, layer=layer,
                                         token_start=start, n_tokens=k.shape[1],
                                         k=k.tobytes(), v=v.tobytes())

    def append(self, blocks):
        """blocks: [(layer, n_tokens)]; appends new random tokens in one stream."""
        msgs = []
        for i, (layer, n) in enumerate(blocks):
            k, v = self.rand(n)
            msgs.append(self.msg(layer, self.K[layer].shape[1], k, v, first=(i == 0)))
            self.K[layer] = np.concatenate([self.K[layer], k], axis=1)
            self.V[layer] = np.concatenate([self.V[layer], v], axis=1)
        return self.t.kv.AppendKV(iter(msgs), timeout=TIMEOUT)

    def stat(self):
        return self.t.kv.StatSequence(kvdex_pb2.StatSequenceRequest(seq=self.ref()),
                                      timeout=TIMEOUT).info

    def tokens(self):
        return list(self.stat().layer_tokens)

    def read(self, layer, ranges=(), ids=(), chunk=0):
        req = kvdex_pb2.ReadKVRequest(
            seq=self.ref(), layer=layer,
            ranges=[kvdex_pb2.TokenRange(start=a, end=b) for a, b in ranges],
            token_ids=list(ids), max_tokens_per_message=chunk)
        got_ids, ks, vs, n_msgs = [], [], [], 0
        for r in self.t.kv.ReadKV(req, timeout=TIMEOUT):
            n = len(r.token_ids)
            got_ids += list(r.token_ids)
            ks.append(np.frombuffer(r.k, self.np).reshape(self.n_kv, n, self.d))
            vs.append(np.frombuffer(r.v, self.np).reshape(self.n_kv, n, self.d))
            n_msgs += 1
        if not ks:
            empty = np.zeros((self.n_kv, 0, self.d), self.np)
            return got_ids, empty, empty, 0
        return got_ids, np.concatenate(ks, axis=1), np.concatenate(vs, axis=1), n_msgs

    def delete(self):
        return self.t.kv.DeleteSequence(kvdex_pb2.DeleteSequenceRequest(seq=self.ref()),
                                        timeout=TIMEOUT)


def bytes_used(test):
    return test.kv.ListSequences(kvdex_pb2.ListSequencesRequest(),
                                 timeout=TIMEOUT).node_bytes_used


def wait_until(pred, timeout=15.0, step=0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


class InteropTest(unittest.TestCase):
    def setUp(self):
        self.kv = kvdex_pb2_grpc.KVStoreStub(CHANNEL)
        self.ret = kvdex_pb2_grpc.RetrievalStub(CHANNEL)

    def assertCode(self, code, fn, *args, **kwargs):
        with self.assertRaises(grpc.RpcError) as cm:
            r = fn(*args, **kwargs)
            if hasattr(r, "__iter__") and not isinstance(r, (bytes, str)):
                list(r)
        self.assertEqual(cm.exception.code(), code, cm.exception.details())
        return cm.exception.details()

    def search(self, seq, q, k, layer=0, qdtype=F32, **opts):
        qb = q.astype({F32: np.float32, F16: np.float16}[qdtype]).tobytes()
        req = kvdex_pb2.SearchRequest(
            layer=layer, options=kvdex_pb2.SearchOptions(k=k, **opts),
            queries=[kvdex_pb2.SearchQuery(seq=seq.ref(), q=qb, query_dtype=qdtype)])
        return self.ret.Search(req, timeout=TIMEOUT).results[0]

    def check_topk(self, seq, layer, q, res, k, lo=0, hi=None):
        """res against numpy brute force over tokens [lo, hi)."""
        T = seq.K[layer].shape[1]
        hi = T if hi is None else hi
        group = seq.n_q // seq.n_kv
        self.assertEqual(len(res.heads), seq.n_q)
        self.assertEqual(res.tokens, T)
        for h in range(seq.n_q):
            keys = seq.K[layer][h // group].astype(np.float64)
            true = keys @ q[h].astype(np.float64)
            elig = np.arange(lo, hi)
            want = min(k, len(elig))
            hh = res.heads[h]
            ids = np.array(hh.token_ids, dtype=np.int64)
            scores = np.array(hh.scores, dtype=np.float64)
            self.assertEqual(len(ids), want)
            self.assertEqual(len(scores), want)
            if want == 0:
                continue
            self.assertTrue(np.all((ids >= lo) & (ids < hi)), ids)
            self.assertEqual(len(set(ids.tolist())), want)
            self.assertTrue(np.all(np.diff(scores) <= 1e-6), scores)
            np.testing.assert_allclose(scores, true[ids], rtol=1e-3, atol=1e-3)
            kth = np.sort(true[elig])[::-1][want - 1]
            self.assertGreaterEqual(scores.min(), kth - 1e-3)
            exact = set(elig[np.argsort(-true[elig], kind="stable")[:want]].tolist())
            # identical unless near-ties reorder the boundary
            self.assertGreaterEqual(len(exact & set(ids.tolist())), want - 2)

    # ---- the main flow ----------------------------------------------------------

    def test_flow(self):
        s = Seq(self, "flow-1", n_layers=2, n_kv=2, n_q=4, d=64, dtype=F16, block=16)
        r = s.append([(0, 40), (0, 30), (1, 50), (0, 30), (1, 50)])
        self.assertEqual(r.tokens_appended, 200)
        self.assertEqual(r.tokens_replayed, 0)
        self.assertEqual(list(r.layer_tokens), [100, 100])
        self.assertEqual(s.tokens(), [100, 100])
        info = s.stat()
        self.assertEqual(info.seq.namespace, "default")
        self.assertEqual(info.seq.sequence_id, "flow-1")
        self.assertEqual((info.shape.n_layers, info.shape.n_kv_heads, info.shape.n_q_heads,
                          info.shape.head_dim, info.shape.dtype), (2, 2, 4, 64, F16))
        self.assertGreater(info.bytes, 2 * 2 * 100 * 64 * 2 * 2 - 1)

        lst = self.kv.ListSequences(kvdex_pb2.ListSequencesRequest(), timeout=TIMEOUT)
        mine = [x for x in lst.sequences if x.seq.sequence_id == "flow-1"]
        self.assertEqual(len(mine), 1)
        self.assertEqual(list(mine[0].layer_tokens), [100, 100])
        self.assertGreater(lst.node_bytes_cap, 0)
        self.assertGreaterEqual(lst.node_bytes_used, info.bytes)
        lst = self.kv.ListSequences(kvdex_pb2.ListSequencesRequest(namespace="default"),
                                    timeout=TIMEOUT)
        self.assertIn("flow-1", [x.seq.sequence_id for x in lst.sequences])
        lst = self.kv.ListSequences(kvdex_pb2.ListSequencesRequest(namespace="nobody"),
                                    timeout=TIMEOUT)
        self.assertEqual(len(lst.sequences), 0)

        # Search: f32 and f16 queries, both layers, against numpy.
        for layer in (0, 1):
            for qd in (F32, F16):
                q = _rng.standard_normal((s.n_q, s.d)).astype(np.float32)
                if qd == F16:
                    q = q.astype(np.float16).astype(np.float32)
                res = self.search(s, q, 10, layer=layer, qdtype=qd)
                self.check_topk(s, layer, q, res, 10)
                self.assertGreaterEqual(res.keys_scanned, 100)
        # sinks and window; k larger than the eligible tokens.
        q = _rng.standard_normal((s.n_q, s.d)).astype(np.float32)
        res = self.search(s, q, 7, sinks=5, window=10)
        self.check_topk(s, 0, q, res, 7, lo=5, hi=90)
        res = self.search(s, q, 500, sinks=40, window=40)
        self.check_topk(s, 0, q, res, 500, lo=40, hi=60)
        res = self.search(s, q, 5, index="exact")
        self.check_topk(s, 0, q, res, 5)
        res = self.search(s, q, 5, index="auto")
        self.check_topk(s, 0, q, res, 5)
        # return_kv: the K/V rows of each head's hits.
        res = self.search(s, q, 6, layer=1, return_kv=True)
        self.check_topk(s, 1, q, res, 6)
        for h, hh in enumerate(res.heads):
            kvh = h // (s.n_q // s.n_kv)
            ids = list(hh.token_ids)
            np.testing.assert_array_equal(
                np.frombuffer(hh.k, np.float16).reshape(len(ids), s.d), s.K[1][kvh][ids])
            np.testing.assert_array_equal(
                np.frombuffer(hh.v, np.float16).reshape(len(ids), s.d), s.V[1][kvh][ids])

        # Batched search over two sequences.
        s2 = Seq(self, "flow-2", n_layers=1, n_kv=1, n_q=2, d=64, dtype=F16)
        s2.append([(0, 33)])
        q2 = _rng.standard_normal((2, 64)).astype(np.float32)
        req = kvdex_pb2.SearchRequest(
            layer=0, options=kvdex_pb2.SearchOptions(k=4),
            queries=[kvdex_pb2.SearchQuery(seq=s.ref(), q=q.tobytes()),
                     kvdex_pb2.SearchQuery(seq=s2.ref(), q=q2.tobytes(), query_dtype=F32)])
        resp = self.ret.Search(req, timeout=TIMEOUT)
        self.assertEqual(len(resp.results), 2)
        self.check_topk(s, 0, q, resp.results[0], 4)
        self.check_topk(s2, 0, q2, resp.results[1], 4)

        # ReadKV: whole layers in several chunks, then ranges + ids in request order.
        for layer in (0, 1):
            ids, k, v, n_msgs = s.read(layer, ranges=[(0, 100)], chunk=32)
            self.assertEqual(ids, list(range(100)))
            self.assertEqual(n_msgs, 4)
            np.testing.assert_array_equal(k, s.K[layer])
            np.testing.assert_array_equal(v, s.V[layer])
        ids, k, v, n_msgs = s.read(0, ranges=[(10, 13), (50, 50), (98, 100)], ids=[7, 3, 99, 0])
        want = [10, 11, 12, 98, 99, 7, 3, 99, 0]
        self.assertEqual(ids, want)
        self.assertEqual(n_msgs, 1)
        np.testing.assert_array_equal(k, s.K[0][:, want])
        np.testing.assert_array_equal(v, s.V[0][:, want])
        ids, k, v, n_msgs = s.read(0)
        self.assertEqual((ids, n_msgs), ([], 0))

        # Health.
        check = CHANNEL.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                    response_deserializer=health_pb2.HealthCheckResponse.FromString)
        for svc in ("", "kvdex.v1.KVStore", "kvdex.v1.Retrieval"):
            self.assertEqual(check(health_pb2.HealthCheckRequest(service=svc), timeout=TIMEOUT).status,
                             health_pb2.HealthCheckResponse.SERVING)
        self.assertCode(C.NOT_FOUND, check, health_pb2.HealthCheckRequest(service="nope"),
                        timeout=TIMEOUT)
        watch = CHANNEL.unary_stream("/grpc.health.v1.Health/Watch",
                                     request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                     response_deserializer=health_pb2.HealthCheckResponse.FromString)
        self.assertCode(C.UNIMPLEMENTED, watch, health_pb2.HealthCheckRequest(), timeout=TIMEOUT)

        # Delete.
        d = s.delete()
        self.assertGreater(d.bytes_freed, 0)
        self.assertCode(C.NOT_FOUND, s.stat)
        self.assertCode(C.NOT_FOUND, s.delete)
        s2.delete()

    # ---- malformed requests ------------------------------------------------------

    def test_garbage_bytes(self):
        garbage = b"\xff\xff\xff"
        for m in ("CreateSequence", "DeleteSequence", "StatSequence", "ListSequences"):
            call = CHANNEL.unary_unary("/kvdex.v1.KVStore/" + m)
            d = self.assertCode(C.INVALID_ARGUMENT, call, garbage, timeout=TIMEOUT)
            self.assertIn("cannot parse", d)
        call = CHANNEL.unary_unary("/kvdex.v1.Retrieval/Search")
        self.assertCode(C.INVALID_ARGUMENT, call, garbage, timeout=TIMEOUT)
        call = CHANNEL.unary_unary("/grpc.health.v1.Health/Check")
        self.assertCode(C.INVALID_ARGUMENT, call, garbage, timeout=TIMEOUT)
        call = CHANNEL.unary_stream("/kvdex.v1.KVStore/ReadKV")
        self.assertCode(C.INVALID_ARGUMENT, call, garbage, timeout=TIMEOUT)
        call = CHANNEL.stream_unary("/kvdex.v1.KVStore/AppendKV")
        self.assertCode(C.INVALID_ARGUMENT, call, iter([garbage]), timeout=TIMEOUT)
        # a valid first message, then garbage: nothing stored
        s = Seq(self, "garbage-1", n_layers=1, n_kv=1, n_q=1, d=8)
        k, v = s.rand(4)
        first = s.msg(0, 0, k, v).SerializeToString()
        self.assertCode(C.INVALID_ARGUMENT, call, iter([first, garbage]), timeout=TIMEOUT)
        self.assertEqual(s.tokens(), [0])
        # unknown methods
        call = CHANNEL.unary_unary("/kvdex.v1.KVStore/Nope")
        self.assertCode(C.UNIMPLEMENTED, call, b"", timeout=TIMEOUT)
        call = CHANNEL.unary_unary("/nope.Service/Method")
        self.assertCode(C.UNIMPLEMENTED, call, garbage, timeout=TIMEOUT)
        s.delete()

    def test_bad_create(self):
        sh = kvdex_pb2.Shape(n_layers=1, n_kv_heads=2, n_q_heads=4, head_dim=8, dtype=F16)
        bad = [
            kvdex_pb2.CreateSequenceRequest(seq=ref("bad-1"), shape=kvdex_pb2.Shape(
                n_layers=1, n_kv_heads=3, n_q_heads=4, head_dim=8, dtype=F16)),  # GQA
            kvdex_pb2.CreateSequenceRequest(seq=ref("bad-1"), shape=kvdex_pb2.Shape(
                n_layers=1, n_kv_heads=2, n_q_heads=4, head_dim=0, dtype=F16)),
            kvdex_pb2.CreateSequenceRequest(seq=ref("bad-1"), shape=kvdex_pb2.Shape(
                n_layers=0, n_kv_heads=2, n_q_heads=4, head_dim=8, dtype=F16)),
            kvdex_pb2.CreateSequenceRequest(seq=ref("bad-1"), shape=kvdex_pb2.Shape(
                n_layers=1, n_kv_heads=2, n_q_heads=4, head_dim=8, dtype=0)),
            kvdex_pb2.CreateSequenceRequest(seq=ref("bad-1"), shape=kvdex_pb2.Shape(
                n_layers=1, n_kv_heads=2, n_q_heads=4, head_dim=8, dtype=9)),
            kvdex_pb2.CreateSequenceRequest(seq=ref("bad-1")),  # no shape
            kvdex_pb2.CreateSequenceRequest(shape=sh),  # no seq
            kvdex_pb2.CreateSequenceRequest(seq=ref("has space"), shape=sh),
            kvdex_pb2.CreateSequenceRequest(seq=ref("x" * 300), shape=sh),
            kvdex_pb2.CreateSequenceRequest(seq=ref("ok", ns="bad ns"), shape=sh),
        ]
        for req in bad:
            self.assertCode(C.INVALID_ARGUMENT, self.kv.CreateSequence, req, timeout=TIMEOUT)
        self.assertCode(C.INVALID_ARGUMENT, self.kv.ListSequences,
                        kvdex_pb2.ListSequencesRequest(namespace="bad ns"), timeout=TIMEOUT)
        # duplicate create
        req = kvdex_pb2.CreateSequenceRequest(seq=ref("dup-1", ns="t1"), shape=sh)
        self.kv.CreateSequence(req, timeout=TIMEOUT)
        self.assertCode(C.ALREADY_EXISTS, self.kv.CreateSequence, req, timeout=TIMEOUT)
        # same id in another namespace is another sequence
        self.kv.CreateSequence(kvdex_pb2.CreateSequenceRequest(seq=ref("dup-1"), shape=sh),
                               timeout=TIMEOUT)
        lst = self.kv.ListSequences(kvdex_pb2.ListSequencesRequest(namespace="t1"),
                                    timeout=TIMEOUT)
        self.assertEqual([x.seq.sequence_id for x in lst.sequences], ["dup-1"])
        for ns in ("t1", ""):
            self.kv.DeleteSequence(kvdex_pb2.DeleteSequenceRequest(seq=ref("dup-1", ns=ns)),
                                   timeout=TIMEOUT)

    def test_unknown_sequence(self):
        r = ref("missing-1")
        self.assertCode(C.NOT_FOUND, self.kv.StatSequence,
                        kvdex_pb2.StatSequenceRequest(seq=r), timeout=TIMEOUT)
        self.assertCode(C.NOT_FOUND, self.kv.DeleteSequence,
                        kvdex_pb2.DeleteSequenceRequest(seq=r), timeout=TIMEOUT)
        self.assertCode(C.NOT_FOUND, self.kv.ReadKV,
                        kvdex_pb2.ReadKVRequest(seq=r, ranges=[kvdex_pb2.TokenRange(end=1)]),
                        timeout=TIMEOUT)
        self.assertCode(C.NOT_FOUND, self.kv.AppendKV,
                        iter([kvdex_pb2.AppendKVRequest(seq=r, n_tokens=0)]), timeout=TIMEOUT)
        self.assertCode(C.NOT_FOUND, self.ret.Search, kvdex_pb2.SearchRequest(
            options=kvdex_pb2.SearchOptions(k=1),
            queries=[kvdex_pb2.SearchQuery(seq=r, q=b"\0" * 16)]), timeout=TIMEOUT)

    def test_bad_append_and_search(self):
        s = Seq(self, "bad-shapes", n_layers=2, n_kv=2, n_q=4, d=16, dtype=F16)
        s.append([(0, 20), (1, 20)])
        before = s.tokens()
        k, v = s.rand(5)
        k32 = k.astype(np.float32)
        wrong_d = np.zeros((2, 5, 8), np.float16)
        bad_streams = [
            [s.msg(0, 20, wrong_d, wrong_d)],                                  # head_dim
            [s.msg(0, 20, k32, k32)],                                          # dtype (f32 bytes)
            [kvdex_pb2.AppendKVRequest(seq=s.ref(), layer=0, token_start=20, n_tokens=5,
                                       k=k.tobytes()[:-2], v=v.tobytes())],    # size
            [kvdex_pb2.AppendKVRequest(seq=s.ref(), layer=0, token_start=20, n_tokens=6,
                                       k=k.tobytes(), v=v.tobytes())],         # n_tokens
            [s.msg(2, 0, k, v)],                                               # layer
            [s.msg(0, 20, k, v), s.msg(0, 25, wrong_d, wrong_d, first=False)], # 2nd message
            [kvdex_pb2.AppendKVRequest(layer=0, token_start=20, n_tokens=5,
                                       k=k.tobytes(), v=v.tobytes())],         # no seq
            [s.msg(0, 20, k, v), kvdex_pb2.AppendKVRequest(
                seq=ref("other"), layer=0, token_start=25, n_tokens=0)],      # other seq
            [],                                                                # empty stream
        ]
        for msgs in bad_streams:
            self.assertCode(C.INVALID_ARGUMENT, self.kv.AppendKV, iter(msgs), timeout=TIMEOUT)
            self.assertEqual(s.tokens(), before)

        q = _rng.standard_normal((4, 16)).astype(np.float32)

        def sreq(qb=q.tobytes(), qd=F32, layer=0, k=3, index=""):
            return kvdex_pb2.SearchRequest(
                layer=layer, options=kvdex_pb2.SearchOptions(k=k, index=index),
                queries=[kvdex_pb2.SearchQuery(seq=s.ref(), q=qb, query_dtype=qd)])
        bad_searches = [
            sreq(qb=q[:, :8].tobytes()),                   # head_dim
            sreq(qb=q[:2].tobytes()),                      # n_q_heads
            sreq(qd=F16),                                  # dtype vs size
            sreq(qb=q.astype(np.float16).tobytes()),       # f16 bytes declared f32
            sreq(qd=7),                                    # unknown dtype
            sreq(layer=2),
            sreq(k=0),
            sreq(k=70000),
            sreq(index="nope"),                            # unknown index kind
            sreq(index="hnsw:M=8"),                        # parameters belong to BuildIndex
            kvdex_pb2.SearchRequest(queries=[kvdex_pb2.SearchQuery(seq=s.ref(), q=q.tobytes())]),
        ]
        for req in bad_searches:
            self.assertCode(C.INVALID_ARGUMENT, self.ret.Search, req, timeout=TIMEOUT)
        # a known kind that was never built is a failed precondition, not a bad argument
        self.assertCode(C.FAILED_PRECONDITION, self.ret.Search, sreq(index="hnsw"),
                        timeout=TIMEOUT)
        qn = q.copy()
        qn[0, 0] = np.nan
        self.assertCode(C.INVALID_ARGUMENT, self.ret.Search, sreq(qb=qn.tobytes()),
                        timeout=TIMEOUT)

        # ReadKV out of range
        for ranges, ids, layer in (([(0, 21)], [], 0), ([(5, 4)], [], 0), ([], [20], 0),
                                   ([], [0], 2)):
            self.assertCode(C.INVALID_ARGUMENT, s.read, layer, ranges=ranges, ids=ids)
        # bf16 queries against an f16 sequence are fine (converted to f32)
        qb = (q.view(np.uint32) >> 16).astype(np.uint16)
        res = self.ret.Search(sreq(qb=qb.tobytes(), qd=BF16), timeout=TIMEOUT).results[0]
        qbf = (qb.astype(np.uint32) << 16).view(np.float32)
        self.check_topk(s, 0, qbf, res, 3)
        s.delete()

    # ---- append semantics ----------------------------------------------------------

    def test_gap_conflict_replay(self):
        s = Seq(self, "idem-1", n_layers=2, n_kv=2, n_q=2, d=32, dtype=F16, block=8)
        s.append([(0, 30), (1, 30)])
        before = s.tokens()
        used = bytes_used(self)
        # gap
        k, v = s.rand(4)
        d = self.assertCode(C.FAILED_PRECONDITION, self.kv.AppendKV,
                            iter([s.msg(0, 31, k, v)]), timeout=TIMEOUT)
        self.assertEqual(s.tokens(), before)
        # a good message then a gap: nothing of the stream stored
        self.assertCode(C.FAILED_PRECONDITION, self.kv.AppendKV,
                        iter([s.msg(0, 30, k, v), s.msg(1, 40, k, v, first=False)]),
                        timeout=TIMEOUT)
        self.assertEqual(s.tokens(), before)
        # conflicting rewrite of stored tokens
        kk = s.K[0][:, 10:20].copy()
        kk[0, 0, 0] += 1
        self.assertCode(C.FAILED_PRECONDITION, self.kv.AppendKV,
                        iter([s.msg(0, 10, kk, s.V[0][:, 10:20])]), timeout=TIMEOUT)
        self.assertEqual(s.tokens(), before)
        self.assertEqual(bytes_used(self), used)
        # idempotent replay: same bytes -> OK, nothing new
        r = self.kv.AppendKV(iter([s.msg(0, 0, s.K[0], s.V[0]),
                                   s.msg(1, 5, s.K[1][:, 5:30], s.V[1][:, 5:30], first=False)]),
                             timeout=TIMEOUT)
        self.assertEqual((r.tokens_appended, r.tokens_replayed), (0, 55))
        self.assertEqual(list(r.layer_tokens), before)
        self.assertEqual(s.tokens(), before)
        # replay overlapping new tokens: the overlap is replayed, the rest appended
        k, v = s.rand(10)
        kk = np.concatenate([s.K[0][:, 25:30], k], axis=1)
        vv = np.concatenate([s.V[0][:, 25:30], v], axis=1)
        r = self.kv.AppendKV(iter([s.msg(0, 25, kk, vv)]), timeout=TIMEOUT)
        self.assertEqual((r.tokens_appended, r.tokens_replayed), (10, 5))
        s.K[0] = np.concatenate([s.K[0], k], axis=1)
        s.V[0] = np.concatenate([s.V[0], v], axis=1)
        self.assertEqual(s.tokens(), [40, 30])
        _, rk, rv, _ = s.read(0, ranges=[(0, 40)])
        np.testing.assert_array_equal(rk, s.K[0])
        np.testing.assert_array_equal(rv, s.V[0])
        s.delete()

    def test_memory_cap(self):
        cap = self.kv.ListSequences(kvdex_pb2.ListSequencesRequest(),
                                    timeout=TIMEOUT).node_bytes_cap
        self.assertGreater(cap, 0)
        self.assertLessEqual(cap, 64 << 20, "the interop test wants a server capped at <= 64 MiB")
        s = Seq(self, "cap-1", n_layers=1, n_kv=8, n_q=8, d=128, dtype=F32, block=64)
        s.append([(0, 512)])  # 4 MiB
        before_tokens = s.tokens()
        _, k0, v0, _ = s.read(0, ranges=[(0, 512)])
        used = bytes_used(self)
        per_token = 8 * 128 * 4 * 2
        n_msgs = int(cap // (per_token * 1024)) + 2

        def msgs():
            for i in range(n_msgs):
                k, v = s.rand(1024)  # 8 MiB per message
                yield s.msg(0, 512 + 1024 * i, k, v, first=(i == 0))
        self.assertCode(C.RESOURCE_EXHAUSTED, self.kv.AppendKV, msgs(), timeout=TIMEOUT)
        self.assertEqual(s.tokens(), before_tokens)
        _, k1, v1, _ = s.read(0, ranges=[(0, 512)])
        np.testing.assert_array_equal(k0, k1)
        np.testing.assert_array_equal(v0, v1)
        self.assertTrue(wait_until(lambda: bytes_used(self) == used), (bytes_used(self), used))
        # still usable: a small append fits
        s.K[0], s.V[0] = k0, v0
        s.append([(0, 16)])
        self.assertEqual(s.tokens(), [528])
        s.delete()

    def _cancel_case(self, sid, how):
        """A stream that sends some messages, then is cancelled by the client."""
        s = Seq(self, sid, n_layers=1, n_kv=2, n_q=2, d=32, dtype=F16, block=8)
        s.append([(0, 8)])
        used = bytes_used(self)
        sent = threading.Event()
        release = threading.Event()

        def gen():
            for i in range(3):
                k, v = s.rand(10)
                yield s.msg(0, 8 + 10 * i, k, v, first=(i == 0))
            sent.set()
            release.wait(20)
            if how == "raise":
                raise RuntimeError("client gives up mid-stream")

        fut = self.kv.AppendKV.future(gen(), timeout=TIMEOUT)
        self.assertTrue(sent.wait(TIMEOUT))
        # The server has staged them once its reserved memory grew (client send
        # completion is not server receipt).
        staged = wait_until(lambda: bytes_used(self) > used, timeout=10)
        if how == "cancel":
            fut.cancel()
            release.set()
        else:
            release.set()
        with self.assertRaises((grpc.RpcError, grpc.FutureCancelledError)):
            fut.result(timeout=TIMEOUT)
        if not fut.cancelled():
            self.assertIn(fut.code(), (C.CANCELLED, C.UNKNOWN), fut.details())
        # Wait until the server has processed the cancel: its transaction is gone (a
        # new append is not ABORTED) and the reserved memory returned.
        self.assertTrue(wait_until(lambda: bytes_used(self) == used), (bytes_used(self), used))
        self.assertEqual(s.tokens(), [8])
        k, v = s.rand(2)
        r = self.kv.AppendKV(iter([s.msg(0, 8, k, v)]), timeout=TIMEOUT)
        self.assertEqual(r.tokens_appended, 2)
        self.assertEqual(s.tokens(), [10])
        s.delete()
        return staged

    def test_cancel_mid_stream(self):
        for i in range(3):
            self.assertTrue(self._cancel_case("cancel-%d" % i, "cancel"))

    def test_request_iterator_raises(self):
        self._cancel_case("raise-1", "raise")

    def test_concurrent_stream_aborted(self):
        s = Seq(self, "busy-1", n_layers=1, n_kv=1, n_q=1, d=16, dtype=F16)
        used = bytes_used(self)
        sent = threading.Event()
        release = threading.Event()
        k, v = s.rand(4)

        def gen():
            yield s.msg(0, 0, k, v)
            sent.set()
            release.wait(20)

        fut = self.kv.AppendKV.future(gen(), timeout=TIMEOUT)
        self.assertTrue(sent.wait(TIMEOUT))
        self.assertTrue(wait_until(lambda: bytes_used(self) > used, timeout=10))
        k2, v2 = s.rand(4)
        self.assertCode(C.ABORTED, self.kv.AppendKV, iter([s.msg(0, 0, k2, v2)]),
                        timeout=TIMEOUT)
        release.set()  # the first stream half-closes cleanly: committed
        r = fut.result(timeout=TIMEOUT)
        self.assertEqual(r.tokens_appended, 4)
        _, rk, _, _ = s.read(0, ranges=[(0, 4)])
        np.testing.assert_array_equal(rk, k)
        s.delete()

    # ---- retrieval indexes ---------------------------------------------------------

    def test_build_index_auto_search_stat(self):
        """AppendKV with prefill queries, BuildIndex, Stat BUILDING -> READY, Search auto."""
        base = bytes_used(self)
        s = Seq(self, "index-1", n_layers=2, n_kv=2, n_q=4, d=32, dtype=F16, block=16)
        n = 2048
        k, v = s.rand(n)
        q = _rng.standard_normal((s.n_q, n, s.d)).astype(np.float16)

        def msg(start, cnt, first, qb=None, landmarks=b""):
            m = s.msg(0, start, k[:, start:start + cnt], v[:, start:start + cnt], first=first)
            m.q = q[:, start:start + cnt].tobytes() if qb is None else qb
            m.landmarks = landmarks
            return m
        # Sizes are checked on the wire: queries and landmarks of the wrong size.
        self.assertIn("q has", self.assertCode(
            C.INVALID_ARGUMENT, self.kv.AppendKV, iter([msg(0, 16, True, qb=b"x" * 10)]),
            timeout=TIMEOUT))
        self.assertIn("landmarks has 64 bytes", self.assertCode(
            C.INVALID_ARGUMENT, self.kv.AppendKV, iter([msg(0, 16, True, landmarks=b"x" * 64)]),
            timeout=TIMEOUT))
        self.assertEqual(s.tokens(), [0, 0])
        r = self.kv.AppendKV(iter([msg(0, 1024, True), msg(1024, 1024, False)]), timeout=TIMEOUT)
        self.assertEqual(r.tokens_appended, n)
        s.K[0], s.V[0] = k, v
        info = s.stat()
        self.assertEqual(list(info.layer_query_tokens), [n, 0])
        self.assertEqual(len(info.indexes), 0)

        # Bad requests: nothing is queued.
        bi = kvdex_pb2.BuildIndexRequest
        for req, code in ((bi(seq=s.ref(), layer=0, spec="nope"), C.INVALID_ARGUMENT),
                          (bi(seq=s.ref(), layer=0, spec="ivf:bogus=1"), C.INVALID_ARGUMENT),
                          (bi(seq=s.ref(), layer=0, spec=""), C.INVALID_ARGUMENT),
                          (bi(seq=s.ref(), layer=5, spec="ivf"), C.INVALID_ARGUMENT),
                          (bi(seq=s.ref(), layer=1, spec="ivf"), C.FAILED_PRECONDITION),
                          (bi(seq=ref("index-none"), layer=0, spec="ivf"), C.NOT_FOUND)):
            details = self.assertCode(code, self.ret.BuildIndex, req, timeout=TIMEOUT)
            self.assertTrue(details)
        self.assertEqual(len(s.stat().indexes), 0)
        qd = _rng.standard_normal((s.n_q, s.d)).astype(np.float32)
        self.assertIn("no ready ivf index", self.assertCode(
            C.FAILED_PRECONDITION, self.search, s, qd, 5, index="ivf"))

        # Build every layer with tokens (only layer 0 has some).
        r = self.ret.BuildIndex(bi(seq=s.ref(), all_layers=True, spec="ivf:nlist=32,nprobe=4"),
                                timeout=TIMEOUT)
        self.assertTrue(r.accepted)
        self.assertEqual(list(r.layers), [0])
        st = s.stat().indexes
        self.assertEqual([x.layer for x in st], [0])
        self.assertIn(st[0].state, (kvdex_pb2.INDEX_STATE_BUILDING, kvdex_pb2.INDEX_STATE_READY))
        self.assertEqual(st[0].spec, "ivf:nlist=32,nprobe=4")

        def ready():
            return s.stat().indexes[0].state != kvdex_pb2.INDEX_STATE_BUILDING
        self.assertTrue(wait_until(ready, timeout=120))
        li = s.stat().indexes[0]
        self.assertEqual(li.state, kvdex_pb2.INDEX_STATE_READY, li.error)
        self.assertEqual(li.kind, "ivf")
        self.assertTrue(li.describe.startswith("ivf:nlist=32,nprobe=4"), li.describe)
        self.assertEqual(li.tokens, n)
        self.assertGreaterEqual(li.memory_bytes, 2 * n * s.d * 4)  # FAISS's f32 copies
        self.assertGreater(li.build_seconds, 0)
        info = s.stat()
        self.assertEqual(bytes_used(self), base + info.bytes)

        # Search: auto uses the index; probing every list is exact.
        res = self.search(s, qd, 8, index="auto")
        self.assertEqual(res.index, "ivf")
        self.assertLess(res.keys_scanned, s.n_q * n)
        self.assertEqual(len(res.heads), s.n_q)
        for hh in res.heads:
            self.assertEqual(len(hh.token_ids), 8)
        res = self.search(s, qd, 8, index="auto", nprobe=32)
        self.check_topk(s, 0, qd, res, 8)
        res = self.search(s, qd, 8, index="exact")
        self.assertEqual(res.index, "exact")
        self.assertEqual(res.keys_scanned, 2 * n)
        self.assertCode(C.FAILED_PRECONDITION, self.search, s, qd, 5, index="hnsw")

        # Tokens appended after the build are searched exactly: a planted top-1.
        k2, v2 = s.rand(16)
        target = qd[0].astype(np.float64)
        k2[0, 5] = (target * (800.0 / target.dot(target))).astype(np.float16)
        self.kv.AppendKV(iter([s.msg(0, n, k2, v2)]), timeout=TIMEOUT)
        s.K[0] = np.concatenate([s.K[0], k2], axis=1)
        res = self.search(s, qd, 8, index="auto")
        self.assertEqual(res.tokens, n + 16)
        self.assertEqual(res.heads[0].token_ids[0], n + 5)
        self.assertEqual(s.stat().indexes[0].tokens, n)

        # Delete returns everything, index included.
        held = s.stat().bytes
        self.assertGreater(held, li.memory_bytes)
        self.assertEqual(s.delete().bytes_freed, held)
        self.assertEqual(bytes_used(self), base)

    def test_landmarks_given(self):
        """AppendKV with landmark keys, BuildIndex landmark:mode=given, Search."""
        base = bytes_used(self)
        B, n, d = 16, 264, 32  # 16 complete blocks of 16 tokens and a tail of 8
        s = Seq(self, "landmark-1", n_layers=2, n_kv=2, n_q=4, d=d, dtype=F16, block=B)
        k, v = s.rand(n)
        # Query heads of a KV head all ask u[kv]; the landmarks of two blocks per KV head
        # point along it, all others against it, so blocks=2 selects exactly those.
        u = _rng.standard_normal((2, d)).astype(np.float32)
        chosen = [{2, 9}, {4, 15}]
        nb = n // B
        lm = np.empty((2, nb, d), np.float16)
        for kv in range(2):
            for b in range(nb):
                lm[kv, b] = (4.0 if b in chosen[kv] else -4.0) * u[kv]
        qd = np.repeat(u, 2, axis=0)  # [n_q][d]

        def msg(layer, start, cnt, first, landmarks=None):
            m = s.msg(layer, start, k[:, start:start + cnt], v[:, start:start + cnt],
                      first=first)
            if landmarks is None:  # the blocks that end in [start, start + cnt)
                b0, b1 = start // B, (start + cnt) // B
                landmarks = np.ascontiguousarray(lm[:, b0:b1]).tobytes()
            m.landmarks = landmarks
            return m

        # Bad sizes: INVALID_ARGUMENT naming expected and got; nothing stored.
        for start, cnt, bad in ((0, 40, 3), (0, 10, 1), (20, 20, 2)):
            details = self.assertCode(
                C.INVALID_ARGUMENT, self.kv.AppendKV,
                iter([msg(0, start, cnt, True, landmarks=b"\0" * (bad * 2 * d * 2 + 2))]),
                timeout=TIMEOUT)
            self.assertIn("landmarks has", details)
            self.assertIn("expected", details)
        self.assertEqual(s.tokens(), [0, 0])
        self.assertEqual(list(s.stat().layer_landmark_blocks), [0, 0])
        # Good ones: two streams, pieces that cross block edges.
        r = self.kv.AppendKV(iter([msg(0, 0, 100, True), msg(0, 100, 60, False)]), timeout=TIMEOUT)
        self.assertEqual(r.tokens_appended, 160)
        r = self.kv.AppendKV(iter([msg(0, 160, 7, True), msg(0, 167, n - 167, False)]),
                             timeout=TIMEOUT)
        self.assertEqual(r.tokens_appended, n - 160)
        s.K[0], s.V[0] = k, v
        info = s.stat()
        self.assertEqual(list(info.layer_tokens), [n, 0])
        self.assertEqual(list(info.layer_landmark_blocks), [nb, 0])
        # Replays: identical is a no-op, different is FAILED_PRECONDITION.
        r = self.kv.AppendKV(iter([msg(0, 32, 64, True)]), timeout=TIMEOUT)
        self.assertEqual((r.tokens_appended, r.tokens_replayed), (0, 64))
        other = lm[:, 2:6].copy()
        other[1, 0, 0] += 1
        self.assertIn("landmark", self.assertCode(
            C.FAILED_PRECONDITION, self.kv.AppendKV,
            iter([msg(0, 32, 64, True, landmarks=other.tobytes())]), timeout=TIMEOUT))
        # Layer 1 has tokens but no landmarks: mode=given is refused there.
        self.kv.AppendKV(iter([msg(1, 0, 40, True, landmarks=b"")]), timeout=TIMEOUT)
        bi = kvdex_pb2.BuildIndexRequest
        self.assertIn("no landmarks", self.assertCode(
            C.FAILED_PRECONDITION, self.ret.BuildIndex,
            bi(seq=s.ref(), layer=1, spec="landmark:mode=given"), timeout=TIMEOUT))
        # ...and landmarks after blocks that have none are refused too.
        self.assertIn("without landmarks", self.assertCode(
            C.FAILED_PRECONDITION, self.kv.AppendKV, iter([msg(1, 40, 10, True)]),
            timeout=TIMEOUT))

        r = self.ret.BuildIndex(bi(seq=s.ref(), layer=0, spec="landmark:mode=given,blocks=2"),
                                timeout=TIMEOUT)
        self.assertEqual(list(r.layers), [0])

        def built():
            return s.stat().indexes[0].state != kvdex_pb2.INDEX_STATE_BUILDING
        self.assertTrue(wait_until(built, timeout=60))
        li = s.stat().indexes[0]
        self.assertEqual(li.state, kvdex_pb2.INDEX_STATE_READY, li.error)
        self.assertEqual(li.kind, "landmark")
        self.assertEqual(li.tokens, nb * B)
        self.assertTrue(li.describe.startswith("landmark:mode=given,block=16,blocks=2"),
                        li.describe)

        res = self.search(s, qd, 6, index="landmark")
        self.assertEqual(res.index, "landmark")
        self.assertEqual(res.tokens, n)
        for h in range(4):
            kv = h // 2
            keys = k[kv].astype(np.float64)
            ids = np.array(res.heads[h].token_ids, dtype=np.int64)
            elig = np.array([t for t in range(n) if t >= nb * B or t // B in chosen[kv]])
            true = keys @ qd[h].astype(np.float64)
            want = elig[np.argsort(-true[elig], kind="stable")[:6]]
            self.assertTrue(all(t >= nb * B or t // B in chosen[kv] for t in ids), ids)
            np.testing.assert_allclose(res.heads[h].scores, true[want], rtol=1e-3, atol=1e-3)

        held = s.stat().bytes
        self.assertEqual(s.delete().bytes_freed, held)
        self.assertEqual(bytes_used(self), base)

    # ---- Attend and Retain ------------------------------------------------------

    def _np_attend(self, seq, layer, q, ids_per_head, scale=0.0):
        """numpy attention per query head over the given token ids: o, lse (float64)."""
        d, group = seq.d, seq.n_q // seq.n_kv
        scale = scale or 1.0 / np.sqrt(d)
        o = np.zeros((seq.n_q, d))
        lse = np.full(seq.n_q, -np.inf)
        for h in range(seq.n_q):
            ids = np.unique(np.asarray(ids_per_head[h], dtype=np.int64))
            if len(ids) == 0:
                continue
            K = seq.K[layer][h // group][ids].astype(np.float64)
            V = seq.V[layer][h // group][ids].astype(np.float64)
            lg = scale * (K @ q[h].astype(np.float64))
            mx = lg.max()
            p = np.exp(lg - mx)
            o[h] = p @ V / p.sum()
            lse[h] = mx + np.log(p.sum())
        return o, lse

    def attend(self, seq, q, layer=0, extra=(), **opts):
        req = kvdex_pb2.AttendRequest(layer=layer, items=[kvdex_pb2.AttendItem(
            seq=seq.ref(), q=q.astype(np.float32).tobytes(), extra_tokens=list(extra))], **opts)
        r = self.ret.Attend(req, timeout=TIMEOUT).results[0]
        o = np.frombuffer(r.o, np.float32).reshape(seq.n_q, seq.d)
        lse = np.frombuffer(r.lse, np.float32)
        return o, lse, r

    def test_attend_dense_and_topk(self):
        s = Seq(self, "attend-1", n_layers=1, n_kv=2, n_q=4, d=32, dtype=F16)
        s.append([(0, 300)])
        q = _rng.standard_normal((4, 32)).astype(np.float32)
        T, sinks, window = 300, 4, 16
        o, lse, r = self.attend(s, q, dense=True, sinks=sinks, window=window)
        self.assertEqual(r.index_used, "dense")
        self.assertEqual(r.tokens, T)
        ro, rl = self._np_attend(s, 0, q, [range(sinks, T - window)] * 4)
        np.testing.assert_allclose(o, ro, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(lse, rl, rtol=1e-4, atol=1e-4)
        # top-k exact: numpy top-k, then numpy attention over it
        k = 16
        o, lse, r = self.attend(s, q, k=k, sinks=sinks, window=window, index="exact",
                                extra=[10, 150])
        self.assertEqual(r.index_used, "exact")
        group = s.n_q // s.n_kv
        ids = []
        for h in range(4):
            sc = s.K[0][h // group][sinks:T - window].astype(np.float64) @ q[h].astype(np.float64)
            top = sinks + np.argsort(-sc, kind="stable")[:k]
            ids.append(list(top) + [10, 150])
        ro, rl = self._np_attend(s, 0, q, ids)
        np.testing.assert_allclose(o, ro, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(lse, rl, rtol=1e-4, atol=1e-4)
        # streaming heads: o = 0, lse = -inf
        o, lse, r = self.attend(s, q, k=k, streaming_heads=[True, False, False, False])
        self.assertTrue(np.all(o[0] == 0) and np.isneginf(lse[0]))
        self.assertTrue(np.all(np.isfinite(lse[1:])))
        s.delete()

    def test_retain_matches_numpy(self):
        s = Seq(self, "retain-1", n_layers=1, n_kv=2, n_q=4, d=16, dtype=F32)
        s.append([(0, 200)])
        n_obs, budget, sinks, window, pw = 3, 12, 2, 10, 3
        qobs = _rng.standard_normal((n_obs, 4, 16)).astype(np.float32)
        r = self.ret.Retain(kvdex_pb2.RetainRequest(
            seq=s.ref(), q_obs=qobs.tobytes(), n_obs=n_obs, budget=budget, pool_window=pw,
            pooling=kvdex_pb2.POOLING_MAX, sinks=sinks, window=window), timeout=TIMEOUT)
        self.assertEqual(len(r.heads), 2)
        lo, hi, group = sinks, 200 - window, 2
        for g in range(2):
            K = s.K[0][g][lo:hi].astype(np.float64)
            mass = np.zeros(hi - lo)
            for o in range(n_obs):
                for h in range(g * group, (g + 1) * group):
                    lg = K @ qobs[o, h].astype(np.float64) / np.sqrt(16)
                    p = np.exp(lg - lg.max())
                    mass += p / p.sum()
            pooled = np.array([mass[max(0, i - pw // 2):i + pw // 2 + 1].max()
                               for i in range(hi - lo)])
            order = np.lexsort((np.arange(hi - lo), -pooled))
            want = sorted((lo + order[:budget]).tolist())
            got = list(r.heads[g].ids)
            self.assertEqual(got, sorted(got))
            edge = pooled[order[budget - 1]] - pooled[order[budget]]
            if edge == 0 or edge > 1e-5:
                self.assertEqual(got, want)
            np.testing.assert_allclose(np.array(r.heads[g].scores), pooled[np.array(got) - lo],
                                       rtol=1e-4, atol=1e-6)
        s.delete()

    def test_attend_retain_errors(self):
        s = Seq(self, "attend-bad", n_layers=1, n_kv=2, n_q=4, d=16, dtype=F16)
        s.append([(0, 40)])
        before = s.stat().bytes
        q = _rng.standard_normal((4, 16)).astype(np.float32)

        def areq(qb=q.tobytes(), **opts):
            opts.setdefault("k", 4)
            return kvdex_pb2.AttendRequest(items=[kvdex_pb2.AttendItem(seq=s.ref(), q=qb)],
                                           **opts)
        A = self.ret.Attend
        d = self.assertCode(C.INVALID_ARGUMENT, A, areq(qb=q.tobytes()[:-4]), timeout=TIMEOUT)
        self.assertIn("items[0].q", d)
        self.assertCode(C.INVALID_ARGUMENT, A, areq(qb=q.astype(np.float16).tobytes()),
                        timeout=TIMEOUT)
        self.assertCode(C.INVALID_ARGUMENT, A, areq(k=0), timeout=TIMEOUT)
        qn = q.copy()
        qn[1, 3] = np.nan
        d = self.assertCode(C.INVALID_ARGUMENT, A, areq(qb=qn.tobytes()), timeout=TIMEOUT)
        self.assertIn("finite", d)
        self.assertCode(C.INVALID_ARGUMENT, A, areq(qb=qn.tobytes(), dense=True), timeout=TIMEOUT)
        self.assertCode(C.INVALID_ARGUMENT, A, areq(streaming_heads=[True]), timeout=TIMEOUT)
        self.assertCode(C.INVALID_ARGUMENT, A, kvdex_pb2.AttendRequest(k=4), timeout=TIMEOUT)
        self.assertCode(C.INVALID_ARGUMENT, A, areq(layer=1), timeout=TIMEOUT)
        self.assertCode(C.FAILED_PRECONDITION, A, areq(index="retained"), timeout=TIMEOUT)
        self.assertCode(C.NOT_FOUND, A, kvdex_pb2.AttendRequest(k=4, items=[
            kvdex_pb2.AttendItem(seq=ref("missing-attend"), q=q.tobytes())]), timeout=TIMEOUT)
        qobs = q.tobytes() * 2

        def rreq(**opts):
            opts.setdefault("budget", 4)
            opts.setdefault("n_obs", 2)
            opts.setdefault("q_obs", qobs)
            return kvdex_pb2.RetainRequest(seq=s.ref(), materialize=True, **opts)
        R = self.ret.Retain
        self.assertCode(C.INVALID_ARGUMENT, R, rreq(budget=41), timeout=TIMEOUT)
        self.assertCode(C.INVALID_ARGUMENT, R, rreq(budget=0), timeout=TIMEOUT)
        self.assertCode(C.INVALID_ARGUMENT, R, rreq(n_obs=3), timeout=TIMEOUT)
        self.assertCode(C.INVALID_ARGUMENT, R, rreq(pool_window=4), timeout=TIMEOUT)
        self.assertCode(C.INVALID_ARGUMENT, R, rreq(q_obs=qn.tobytes() * 2), timeout=TIMEOUT)
        self.assertCode(C.NOT_FOUND, R, kvdex_pb2.RetainRequest(
            seq=ref("missing-retain"), n_obs=2, q_obs=qobs, budget=1), timeout=TIMEOUT)
        self.assertEqual(s.stat().bytes, before)
        s.delete()

    def test_importing_hidden_until_publish(self):
        """CreateSequence(importing) hides a copy from reads until PublishSequence."""
        shape = kvdex_pb2.Shape(n_layers=1, n_kv_heads=1, n_q_heads=2, head_dim=16, dtype=F32,
                                block_tokens=8)
        self.kv.CreateSequence(kvdex_pb2.CreateSequenceRequest(
            seq=ref("hidden-1"), shape=shape, importing=True), timeout=TIMEOUT)
        k = _rng.standard_normal((1, 20, 16)).astype(np.float32)
        r = self.kv.AppendKV(iter([kvdex_pb2.AppendKVRequest(
            seq=ref("hidden-1"), layer=0, token_start=0, n_tokens=20, k=k.tobytes(),
            v=k.tobytes())]), timeout=TIMEOUT)
        self.assertEqual(r.tokens_appended, 20)
        # Reads: NOT_FOUND, as if absent.
        for call, req in (
                (self.kv.StatSequence, kvdex_pb2.StatSequenceRequest(seq=ref("hidden-1"))),
                (self.kv.ReadKV, kvdex_pb2.ReadKVRequest(
                    seq=ref("hidden-1"), layer=0, ranges=[kvdex_pb2.TokenRange(start=0, end=4)])),
                (self.ret.Search, kvdex_pb2.SearchRequest(
                    layer=0, options=kvdex_pb2.SearchOptions(k=3),
                    queries=[kvdex_pb2.SearchQuery(seq=ref("hidden-1"),
                                                   q=np.zeros(32, np.float32).tobytes())])),
                (self.ret.Attend, kvdex_pb2.AttendRequest(
                    layer=0, k=3, items=[kvdex_pb2.AttendItem(
                        seq=ref("hidden-1"), q=np.zeros(32, np.float32).tobytes())]))):
            details = self.assertCode(C.NOT_FOUND, call, req, timeout=TIMEOUT)
            self.assertIn("hidden-1", details)
        # Stat with include_importing and List see it, flagged.
        info = self.kv.StatSequence(kvdex_pb2.StatSequenceRequest(
            seq=ref("hidden-1"), include_importing=True), timeout=TIMEOUT).info
        self.assertTrue(info.importing)
        self.assertEqual(list(info.layer_tokens), [20])
        listed = {i.seq.sequence_id: i.importing for i in self.kv.ListSequences(
            kvdex_pb2.ListSequencesRequest(), timeout=TIMEOUT).sequences}
        self.assertTrue(listed["hidden-1"])
        # A second create is ALREADY_EXISTS, hidden or not.
        self.assertCode(C.ALREADY_EXISTS, self.kv.CreateSequence,
                        kvdex_pb2.CreateSequenceRequest(seq=ref("hidden-1"), shape=shape),
                        timeout=TIMEOUT)
        # Publish: visible; twice is fine; an absent one is NOT_FOUND.
        for _ in range(2):
            self.kv.PublishSequence(kvdex_pb2.PublishSequenceRequest(seq=ref("hidden-1")),
                                    timeout=TIMEOUT)
            info = self.kv.StatSequence(kvdex_pb2.StatSequenceRequest(seq=ref("hidden-1")),
                                        timeout=TIMEOUT).info
            self.assertFalse(info.importing)
        self.assertCode(C.NOT_FOUND, self.kv.PublishSequence,
                        kvdex_pb2.PublishSequenceRequest(seq=ref("never-made")), timeout=TIMEOUT)
        self.assertCode(C.INVALID_ARGUMENT, self.kv.PublishSequence,
                        kvdex_pb2.PublishSequenceRequest(), timeout=TIMEOUT)
        self.kv.DeleteSequence(kvdex_pb2.DeleteSequenceRequest(seq=ref("hidden-1")),
                               timeout=TIMEOUT)

    def test_read_with_queries_and_landmarks(self):
        """ReadKV with_queries / with_landmarks returns what AppendKV stored."""
        B, n, d, nq = 8, 40, 16, 4
        for dtype in (F32, F16):
            sid = "extras-%d" % dtype
            s = Seq(self, sid, n_layers=1, n_kv=2, n_q=nq, d=d, dtype=dtype, block=B)
            k, v = s.rand(n)
            q = _rng.standard_normal((nq, n, d)).astype(s.np)
            lm = _rng.standard_normal((2, n // B, d)).astype(s.np)
            m = s.msg(0, 0, k, v)
            m.q = q.tobytes()
            m.landmarks = lm.tobytes()
            self.kv.AppendKV(iter([m]), timeout=TIMEOUT)
            req = kvdex_pb2.ReadKVRequest(seq=s.ref(), layer=0, with_queries=True,
                                          with_landmarks=True,
                                          ranges=[kvdex_pb2.TokenRange(start=0, end=n)])
            kv_ids, qids, qrows, lms = [], [], [], []
            for r in self.kv.ReadKV(req, timeout=TIMEOUT):
                kinds = [bool(r.token_ids), bool(r.query_token_ids), r.landmark_blocks > 0]
                self.assertEqual(sum(kinds), 1, "one kind of payload per message")
                kv_ids += list(r.token_ids)
                if r.query_token_ids:
                    t = len(r.query_token_ids)
                    qids += list(r.query_token_ids)
                    qrows.append(np.frombuffer(r.q, np.float32).reshape(nq, t, d))
                if r.landmark_blocks:
                    self.assertEqual(r.landmark_block_start, sum(x.shape[1] for x in lms))
                    lms.append(np.frombuffer(r.landmarks, np.float32).reshape(
                        2, r.landmark_blocks, d))
            self.assertEqual(kv_ids, list(range(n)))
            self.assertEqual(qids, list(range(n)))  # n <= 4096: every token kept
            np.testing.assert_array_equal(np.concatenate(qrows, axis=1),
                                          q.astype(np.float32))
            np.testing.assert_array_equal(np.concatenate(lms, axis=1), lm.astype(np.float32))
            # Without the flags: K/V only.
            plain = list(self.kv.ReadKV(kvdex_pb2.ReadKVRequest(
                seq=s.ref(), layer=0, ranges=[kvdex_pb2.TokenRange(start=0, end=n)]),
                timeout=TIMEOUT))
            self.assertTrue(all(not r.query_token_ids and not r.landmark_blocks for r in plain))
            s.delete()

    def test_zz_still_serving(self):
        """Runs last (alphabetical order): after everything above, a search works."""
        s = Seq(self, "final-1", n_layers=1, n_kv=2, n_q=4, d=64, dtype=F16)
        s.append([(0, 64), (0, 64)])
        q = _rng.standard_normal((4, 64)).astype(np.float32)
        self.check_topk(s, 0, q, self.search(s, q, 8), 8)
        s.delete()


def main():
    global SERVER_CMD
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    SERVER_CMD = sys.argv[1:]
    result = junit_main.run("interop")
    ok = result.wasSuccessful()
    if (not ok or os.environ.get("KVDEX_TEST_SHOWLOG")) and SERVER is not None:
        print("---- server log (last lines) ----\n" + SERVER.log(), file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
