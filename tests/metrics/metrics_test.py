#!/usr/bin/python3
"""End-to-end test of the metrics endpoint: `kvdex serve --listen 127.0.0.1:0
--metrics-listen 127.0.0.1:0`, both ports read from its log, real gRPC calls (the
generated stubs of //proto:kvdex_py), then GET /metrics over HTTP, parsed as the
Prometheus text format (0.0.4). Every test compares two scrapes around its own calls,
so the counters must move by exactly those calls. The HTTP side must survive 404s,
other methods, garbage, oversized and silent requests; the server must still serve
gRPC afterwards and exit 0 on SIGTERM.
Usage: metrics_test.py PATH_TO_KVDEX
"""
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest
import urllib.error
import urllib.request

import grpc
import numpy as np


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "py"))
import junit_main  # noqa: E402  (tests/py: the shared runner that writes test.xml)
from grpc_stubs import STUBS, health_pb2, kvdex_pb2, kvdex_pb2_grpc  # noqa: E402,F401

KVDEX = None
TIMEOUT = 30
C = grpc.StatusCode
F16 = kvdex_pb2.DTYPE_F16
MEMORY = 64 << 20
SERVER = None
CHANNEL = None


class ServerProcess:
    """`kvdex serve` with both endpoints on ephemeral ports, its stderr collected."""

    def __init__(self):
        self.lines = []
        self.grpc_port = self.metrics_port = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            [KVDEX, "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
             "--memory", str(MEMORY), "--threads", "2"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            m = re.search(r"(metrics )?listening on (\S+):(\d+)", line)
            if m and m.group(1):
                self.metrics_port = int(m.group(3))
            elif m:
                self.grpc_port = int(m.group(3))
            if self.grpc_port and self.metrics_port:
                self._ready.set()
        self._ready.set()  # EOF: the process died

    def wait_ready(self, timeout=60):
        if not self._ready.wait(timeout) or not (self.grpc_port and self.metrics_port):
            raise RuntimeError("server did not report both ports within %ss (exit %s):\n%s" %
                               (timeout, self.proc.poll(), self.log()))

    def log(self):
        return "\n".join(self.lines[-200:])

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        return self.proc.returncode


def setUpModule():
    global SERVER, CHANNEL
    SERVER = ServerProcess()
    try:
        SERVER.wait_ready()
    except Exception:
        SERVER.stop()
        raise
    CHANNEL = grpc.insecure_channel("127.0.0.1:%d" % SERVER.grpc_port)
    grpc.channel_ready_future(CHANNEL).result(timeout=TIMEOUT)


def tearDownModule():
    if CHANNEL is not None:
        CHANNEL.close()
    rc = SERVER.stop() if SERVER else 0
    if rc != 0:
        raise AssertionError("server exited with %s:\n%s" % (rc, SERVER.log()))


# ---- the exposition format -------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


class Scrape:
    """Parsed /metrics: samples[(name, frozenset(labels))] = value, plus HELP/TYPE."""

    def __init__(self, text):
        self.text = text
        self.samples, self.help, self.type = {}, {}, {}
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("# HELP "):
                name, _, doc = line[7:].partition(" ")
                self.help[name] = doc
                continue
            if line.startswith("# TYPE "):
                name, _, typ = line[7:].partition(" ")
                self.type[name] = typ
                continue
            if line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            if not m:
                raise AssertionError("not a sample line: %r" % line)
            labels = {}
            if m.group(2):
                rest = m.group(2)
                pos = 0
                while pos < len(rest):
                    lm = _LABEL.match(rest, pos)
                    if not lm:
                        raise AssertionError("bad labels in %r" % line)
                    labels[lm.group(1)] = lm.group(2)
                    pos = lm.end()
            key = (m.group(1), frozenset(labels.items()))
            if key in self.samples:
                raise AssertionError("duplicate sample %r" % line)
            self.samples[key] = float(m.group(3))

    def get(self, name, **labels):
        """The sample's value; 0 for a labelled counter not shown yet."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def family(self, name):
        return {k[1]: v for k, v in self.samples.items() if k[0] == name}


def http(path="/metrics", method="GET"):
    """(status, headers, body) of one request to the metrics port."""
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (SERVER.metrics_port, path),
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def scrape():
    status, headers, body = http()
    assert status == 200, (status, body)
    return Scrape(body)


def raw(data, read=True, timeout=10):
    """Sends raw bytes to the metrics port; returns what came back before the close."""
    with socket.create_connection(("127.0.0.1", SERVER.metrics_port), timeout=timeout) as s:
        if data:
            s.sendall(data)
        if not read:
            return b""
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except ConnectionResetError:
            pass
        return out


def ref(sid):
    return kvdex_pb2.SequenceRef(sequence_id=sid)


_rng = np.random.default_rng(7)


class MetricsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.kv = kvdex_pb2_grpc.KVStoreStub(CHANNEL)
        cls.ret = kvdex_pb2_grpc.RetrievalStub(CHANNEL)

    def assertCode(self, code, fn, *args, **kwargs):
        with self.assertRaises(grpc.RpcError) as cm:
            r = fn(*args, **kwargs)
            if hasattr(r, "__iter__") and not isinstance(r, (bytes, str)):
                list(r)
        self.assertEqual(cm.exception.code(), code, cm.exception.details())

    def delta(self, before, after, name, **labels):
        return after.get(name, **labels) - before.get(name, **labels)

    def make_seq(self, sid, n=256, n_kv=2, n_q=4, d=32, queries=False):
        shape = kvdex_pb2.Shape(n_layers=1, n_kv_heads=n_kv, n_q_heads=n_q, head_dim=d,
                                dtype=F16, block_tokens=16)
        self.kv.CreateSequence(kvdex_pb2.CreateSequenceRequest(seq=ref(sid), shape=shape),
                               timeout=TIMEOUT)
        k = _rng.standard_normal((n_kv, n, d)).astype(np.float16)
        v = _rng.standard_normal((n_kv, n, d)).astype(np.float16)
        m = kvdex_pb2.AppendKVRequest(seq=ref(sid), layer=0, token_start=0, n_tokens=n,
                                      k=k.tobytes(), v=v.tobytes())
        if queries:
            m.q = _rng.standard_normal((n_q, n, d)).astype(np.float16).tobytes()
        self.kv.AppendKV(iter([m]), timeout=TIMEOUT)

    def delete(self, sid):
        self.kv.DeleteSequence(kvdex_pb2.DeleteSequenceRequest(seq=ref(sid)), timeout=TIMEOUT)

    # ---- format ----------------------------------------------------------------

    def test_format_and_families(self):
        status, headers, body = http()
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"].split(";")[0].strip(), "text/plain")
        self.assertIn("version=0.0.4", headers["Content-Type"])
        s = Scrape(body)
        want = {"kvdex_rpc_total": "counter", "kvdex_rpc_duration_seconds": "histogram",
                "kvdex_bytes_stored": "gauge", "kvdex_memory_cap_bytes": "gauge",
                "kvdex_sequences": "gauge", "kvdex_index_builds_total": "counter",
                "kvdex_evictions_total": "counter", "kvdex_search_queries_total": "counter",
                "kvdex_search_keys_touched_total": "counter"}
        for name, typ in want.items():
            self.assertEqual(s.type.get(name), typ, name)
            self.assertTrue(s.help.get(name), name)
        # Every sample belongs to a family with HELP and TYPE.
        for (name, _), _v in s.samples.items():
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            self.assertTrue(name in s.type or base in s.type, name)
        self.assertEqual(s.get("kvdex_memory_cap_bytes"), MEMORY)
        self.assertEqual(s.get("kvdex_evictions_total"), 0)
        self.assertIn("refuses", s.help["kvdex_evictions_total"])
        # Histograms: cumulative buckets ending in +Inf == _count.
        for labels, count in s.family("kvdex_rpc_duration_seconds_count").items():
            method = dict(labels)["method"]
            buckets = sorted(
                ((float(dict(lb)["le"]), v) for lb, v in
                 s.family("kvdex_rpc_duration_seconds_bucket").items()
                 if dict(lb)["method"] == method), key=lambda x: x[0])
            self.assertGreaterEqual(len(buckets), 10)
            self.assertEqual(buckets[0][0], 0.0005)
            self.assertEqual(buckets[-1][0], float("inf"))
            self.assertEqual(buckets[-1][1], count, method)
            self.assertEqual([b[1] for b in buckets], sorted(b[1] for b in buckets), method)
        # HEAD: the headers only.
        status, headers, body = http(method="HEAD")
        self.assertEqual((status, body), (200, ""))
        self.assertGreater(int(headers["Content-Length"]), 0)

    # ---- RPC counters and histograms ----------------------------------------------

    def test_rpc_counters_move_exactly(self):
        before = scrape()
        self.make_seq("m-rpc", n=64)  # CreateSequence OK, AppendKV OK
        shape = kvdex_pb2.Shape(n_layers=1, n_kv_heads=2, n_q_heads=4, head_dim=32, dtype=F16,
                                block_tokens=16)
        self.assertCode(C.ALREADY_EXISTS, self.kv.CreateSequence,
                        kvdex_pb2.CreateSequenceRequest(seq=ref("m-rpc"), shape=shape),
                        timeout=TIMEOUT)
        for _ in range(3):
            self.assertCode(C.NOT_FOUND, self.kv.StatSequence,
                            kvdex_pb2.StatSequenceRequest(seq=ref("m-nope")), timeout=TIMEOUT)
        info = self.kv.StatSequence(kvdex_pb2.StatSequenceRequest(seq=ref("m-rpc")),
                                    timeout=TIMEOUT).info
        lst = self.kv.ListSequences(kvdex_pb2.ListSequencesRequest(), timeout=TIMEOUT)
        mid = scrape()
        d = lambda name, **lb: self.delta(before, mid, name, **lb)  # noqa: E731
        self.assertEqual(d("kvdex_rpc_total", method="CreateSequence", code="OK"), 1)
        self.assertEqual(d("kvdex_rpc_total", method="CreateSequence", code="ALREADY_EXISTS"), 1)
        self.assertEqual(d("kvdex_rpc_total", method="AppendKV", code="OK"), 1)
        self.assertEqual(d("kvdex_rpc_total", method="StatSequence", code="NOT_FOUND"), 3)
        self.assertEqual(d("kvdex_rpc_total", method="StatSequence", code="OK"), 1)
        self.assertEqual(d("kvdex_rpc_total", method="ListSequences", code="OK"), 1)
        self.assertEqual(d("kvdex_rpc_total", method="Search", code="OK"), 0)
        # _count equals the method's calls over every code, before and after.
        for s in (before, mid):
            totals = {}
            for labels, v in s.family("kvdex_rpc_total").items():
                m = dict(labels)["method"]
                totals[m] = totals.get(m, 0) + v
            for m, v in totals.items():
                self.assertEqual(s.get("kvdex_rpc_duration_seconds_count", method=m), v, m)
        self.assertEqual(d("kvdex_rpc_duration_seconds_count", method="StatSequence"), 4)
        self.assertGreater(d("kvdex_rpc_duration_seconds_sum", method="StatSequence"), 0)
        # Store gauges at scrape time.
        self.assertEqual(mid.get("kvdex_bytes_stored"), lst.node_bytes_used)
        self.assertEqual(mid.get("kvdex_memory_cap_bytes"), lst.node_bytes_cap)
        self.assertEqual(mid.get("kvdex_sequences"), len(lst.sequences))
        if len(lst.sequences) == 1:
            self.assertEqual(mid.get("kvdex_bytes_stored"), info.bytes)
        self.assertGreater(info.bytes, 0)
        self.delete("m-rpc")
        after = scrape()
        self.assertEqual(self.delta(mid, after, "kvdex_sequences"), -1)
        self.assertEqual(self.delta(mid, after, "kvdex_bytes_stored"), -info.bytes)
        self.assertEqual(self.delta(mid, after, "kvdex_rpc_total", method="DeleteSequence",
                                    code="OK"), 1)

    # ---- retrieval -----------------------------------------------------------------

    def test_search_and_attend_keys_touched(self):
        n, n_q, d = 256, 4, 32
        self.make_seq("m-search", n=n, n_q=n_q, d=d)
        try:
            before = scrape()
            q = _rng.standard_normal((n_q, d)).astype(np.float32).tobytes()
            r = self.ret.Search(kvdex_pb2.SearchRequest(
                layer=0, options=kvdex_pb2.SearchOptions(k=8),
                queries=[kvdex_pb2.SearchQuery(seq=ref("m-search"), q=q,
                                               query_dtype=kvdex_pb2.DTYPE_F32)] * 3),
                timeout=TIMEOUT)
            touched = sum(x.keys_scanned for x in r.results)
            self.assertGreater(touched, 0)
            a = self.ret.Attend(kvdex_pb2.AttendRequest(
                layer=0, k=8, items=[kvdex_pb2.AttendItem(seq=ref("m-search"), q=q)] * 2),
                timeout=TIMEOUT)
            a_touched = sum(x.keys_touched for x in a.results)
            self.assertGreater(a_touched, 0)
            # A failed Search counts as a call, not as retrieval work.
            self.assertCode(C.NOT_FOUND, self.ret.Search, kvdex_pb2.SearchRequest(
                options=kvdex_pb2.SearchOptions(k=1),
                queries=[kvdex_pb2.SearchQuery(seq=ref("m-none"), q=q)]), timeout=TIMEOUT)
            after = scrape()
            dd = lambda name, **lb: self.delta(before, after, name, **lb)  # noqa: E731
            self.assertEqual(dd("kvdex_search_queries_total", method="Search"), 3)
            self.assertEqual(dd("kvdex_search_keys_touched_total", method="Search"), touched)
            self.assertEqual(dd("kvdex_search_queries_total", method="Attend"), 2)
            self.assertEqual(dd("kvdex_search_keys_touched_total", method="Attend"), a_touched)
            self.assertEqual(dd("kvdex_rpc_total", method="Search", code="OK"), 1)
            self.assertEqual(dd("kvdex_rpc_total", method="Search", code="NOT_FOUND"), 1)
            self.assertEqual(dd("kvdex_rpc_total", method="Attend", code="OK"), 1)
        finally:
            self.delete("m-search")

    def test_index_builds(self):
        self.make_seq("m-index", n=1024, queries=True)
        try:
            before = scrape()
            r = self.ret.BuildIndex(kvdex_pb2.BuildIndexRequest(
                seq=ref("m-index"), layer=0, spec="ivf:nlist=16,nprobe=4"), timeout=TIMEOUT)
            self.assertTrue(r.accepted)

            def state():
                return self.kv.StatSequence(kvdex_pb2.StatSequenceRequest(seq=ref("m-index")),
                                            timeout=TIMEOUT).info.indexes[0]
            end = time.monotonic() + 120
            while state().state == kvdex_pb2.INDEX_STATE_BUILDING and time.monotonic() < end:
                time.sleep(0.05)
            li = state()
            self.assertEqual(li.state, kvdex_pb2.INDEX_STATE_READY, li.error)
            after = scrape()
            self.assertEqual(self.delta(before, after, "kvdex_index_builds_total",
                                        result="ready"), 1)
            self.assertEqual(self.delta(before, after, "kvdex_index_builds_total",
                                        result="failed"), 0)
            # Counted once: a second scrape does not count it again.
            again = scrape()
            self.assertEqual(self.delta(after, again, "kvdex_index_builds_total",
                                        result="ready"), 0)
            # The index's bytes are in the store gauge.
            self.assertEqual(again.get("kvdex_bytes_stored"), self.kv.ListSequences(
                kvdex_pb2.ListSequencesRequest(), timeout=TIMEOUT).node_bytes_used)
            self.assertEqual(self.delta(before, after, "kvdex_rpc_total", method="BuildIndex",
                                        code="OK"), 1)
        finally:
            self.delete("m-index")

    # ---- the HTTP side ---------------------------------------------------------------

    def test_not_found_and_methods(self):
        for path in ("/", "/metricsx", "/metrics/extra", "/favicon.ico"):
            status, _, body = http(path)
            self.assertEqual(status, 404, path)
        self.assertEqual(http("/metrics?name[]=x")[0], 200)
        for path in ("/healthz", "/readyz", "/readyz?verbose"):
            status, _, body = http(path)
            self.assertEqual((status, body), (200, "ok\n"), path)
        self.assertEqual(http("/healthzx")[0], 404)
        self.assertEqual(http(method="POST")[0], 405)
        self.assertEqual(http(method="DELETE")[0], 405)

    def test_garbage_and_partial_requests(self):
        for junk in (b"\x00\x01\x02garbage\xff\r\n\r\n", b"GET\r\n\r\n",
                     b"GET /metrics\r\n\r\n", b"GET /metrics SPDY/3\r\n\r\n",
                     b"\r\n\r\n", b"\n\n", os.urandom(4096) + b"\n\n"):
            out = raw(junk)
            self.assertTrue(out == b"" or out.startswith(b"HTTP/1.1 4"), (junk[:20], out[:80]))
        # Half a request, then the client goes away.
        raw(b"GET /metr", read=False)
        # Headers larger than the request buffer.
        out = raw(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        self.assertTrue(out == b"" or out.startswith(b"HTTP/1.1 431"), out[:80])
        # A raw, well-formed request gets the metrics and the connection is closed.
        out = raw(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"), out[:80])
        self.assertIn(b"\r\n\r\n# HELP kvdex_rpc_total", out)
        # Many idle connections at once: served again once they are gone.
        socks = [socket.create_connection(("127.0.0.1", SERVER.metrics_port), timeout=10)
                 for _ in range(80)]
        for s in socks:
            s.close()
        self.assertTrue(SERVER.alive(), SERVER.log())
        # Until the server has seen those closes, a new connection may be over the limit
        # and refused (reset): it must come back within a moment.
        end = time.monotonic() + 10
        while True:
            try:
                status = http()[0]
                break
            except (ConnectionError, urllib.error.URLError):
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        self.assertEqual(status, 200)
        self.assertGRPC()

    def test_silent_client_times_out(self):
        with socket.create_connection(("127.0.0.1", SERVER.metrics_port), timeout=20) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\n")  # never finishes its headers
            t0 = time.monotonic()
            try:
                data = s.recv(100)
            except ConnectionResetError:
                data = b""
            waited = time.monotonic() - t0
        self.assertEqual(data, b"")
        self.assertLess(waited, 15)
        self.assertEqual(http()[0], 200)

    def assertGRPC(self):
        before = scrape()
        lst = self.kv.ListSequences(kvdex_pb2.ListSequencesRequest(), timeout=TIMEOUT)
        self.assertIsNotNone(lst)
        self.assertEqual(self.delta(before, scrape(), "kvdex_rpc_total", method="ListSequences",
                                    code="OK"), 1)

    def test_zz_grpc_still_served(self):
        """Last: after everything above, both endpoints still work."""
        self.assertTrue(SERVER.alive(), SERVER.log())
        self.assertGRPC()


if __name__ == "__main__":
    KVDEX = os.path.abspath(sys.argv[1])
    result = junit_main.run("metrics")
    sys.exit(0 if result.wasSuccessful() else 1)
