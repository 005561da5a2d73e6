#!/usr/bin/python3
"""deploy/local-cluster end to end, with the real kvdex binary: three nodes come up on
free loopback ports, each answers gRPC (Health/Check, ListSequences with the --memory
cap) and GET /readyz, /healthz on its metrics port; the printed URI names them all.
SIGTERM (or Ctrl-C's SIGINT to the process group) stops every node, exit 0; a node killed
with SIGKILL is named with the end of its log and the rest stopped, exit 1; a node that
cannot start is reported the same way; bad arguments exit 2; a busy port is named, exit 1.
Usage: local_cluster_test.py PATH_TO_LOCAL_CLUSTER PATH_TO_KVDEX
"""
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.request

import grpc


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "py"))
import junit_main  # noqa: E402  (tests/py: the shared runner that writes test.xml)
from grpc_stubs import STUBS, health_pb2, kvdex_pb2, kvdex_pb2_grpc  # noqa: E402,F401

SCRIPT = KVDEX = None
N = 3
MEMORY = "256M"
START_TIMEOUT = 60
STOP_TIMEOUT = 20  # the script's 5 s grace + margin


def _port_free(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_base_port(n=N):
    """P with P..P+n-1 and P+100..P+100+n-1 free on 127.0.0.1."""
    for _ in range(200):
        p = random.randrange(20000, 40000)
        if all(_port_free(q) for i in range(n) for q in (p + i, p + 100 + i)):
            return p
    raise RuntimeError("no free port range")


def _pid_running(pid):
    """True while pid exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _wait_gone(pids, timeout=STOP_TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(_pid_running(p) for p in pids):
            return []
        time.sleep(0.1)
    return [p for p in pids if _pid_running(p)]


def _http(port, path):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as r:
        return r.status, r.read().decode()


class Cluster:
    """deploy/local-cluster run in its own session (so a group signal is Ctrl-C), its
    stdout+stderr collected line by line."""

    def __init__(self, *args, tmp, script=None, env=None):
        self.lines = []
        self.uri = None
        self.nodes = {}  # i -> (pid, grpc port, metrics port)
        self._ready = threading.Event()
        env = dict(os.environ, TMPDIR=tmp, **(env or {}))
        self.proc = subprocess.Popen([script or SCRIPT, *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            m = re.match(r"\s+node (\d+)\s+pid (\d+)\s+grpc 127\.0\.0\.1:(\d+)\s+metrics "
                         r"http://127\.0\.0\.1:(\d+)/metrics", line)
            if m:
                self.nodes[int(m.group(1))] = tuple(int(g) for g in m.group(2, 3, 4))
            if line.startswith("URI: "):
                self.uri = line[5:]
                self._ready.set()
        self._ready.set()

    def output(self):
        self._reader.join(10)
        return "\n".join(self.lines)

    def wait_ready(self):
        if not self._ready.wait(START_TIMEOUT) or self.uri is None:
            raise AssertionError("local-cluster printed no URI within %ss (exit %s):\n%s" %
                                 (START_TIMEOUT, self.proc.poll(), "\n".join(self.lines)))

    def wait(self, timeout=STOP_TIMEOUT):
        return self.proc.wait(timeout)

    def cleanup(self):
        """Whatever is left after a failed test: the script and its nodes, by pid."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid, _, _ in self.nodes.values():
            if _pid_running(pid):
                os.kill(pid, signal.SIGKILL)
        self._reader.join(10)


class LocalClusterTest(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(dir=os.environ.get("TEST_TMPDIR"))
        self.tmp = self._tmp.name
        self.clusters = []

    def tearDown(self):
        for c in self.clusters:
            c.cleanup()
        self._tmp.cleanup()

    def start(self, *args):
        c = Cluster(*args, tmp=self.tmp)
        self.clusters.append(c)
        return c

    def started(self, n=N):
        base = free_base_port(n)
        c = self.start(str(n), "--base-port", str(base), "--memory", MEMORY, "--kvdex", KVDEX)
        c.wait_ready()
        self.assertEqual(sorted(c.nodes), list(range(n)), c.output())
        for i, (_, gport, mport) in c.nodes.items():
            self.assertEqual((gport, mport), (base + i, base + 100 + i))
        return c, base

    def run_script(self, *args, timeout=30):
        r = subprocess.run([SCRIPT, *args], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=timeout, env=dict(os.environ, TMPDIR=self.tmp))
        return r.returncode, r.stdout, r.stderr

    def node_logs(self):
        logs = {}
        for d in os.listdir(self.tmp):
            if d.startswith("kvdex-local-cluster."):
                for f in os.listdir(os.path.join(self.tmp, d)):
                    with open(os.path.join(self.tmp, d, f)) as fh:
                        logs[f] = fh.read()
        return logs

    # ---- a healthy cluster ----------------------------------------------------------------

    def test_three_nodes_serve_then_sigterm_stops_all(self):
        c, base = self.started()
        hosts = ["127.0.0.1:%d" % (base + i) for i in range(N)]
        self.assertEqual(c.uri, "grpc://%s?replicas=2" % ",".join(hosts))
        for i, (pid, gport, mport) in sorted(c.nodes.items()):
            with grpc.insecure_channel("127.0.0.1:%d" % gport) as ch:
                grpc.channel_ready_future(ch).result(timeout=10)
                check = ch.unary_unary(
                    "/grpc.health.v1.Health/Check",
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString)
                h = check(health_pb2.HealthCheckRequest(), timeout=10)
                self.assertEqual(h.status, health_pb2.HealthCheckResponse.SERVING)
                ls = kvdex_pb2_grpc.KVStoreStub(ch).ListSequences(
                    kvdex_pb2.ListSequencesRequest(), timeout=10)
                self.assertEqual(ls.node_bytes_cap, 256 << 20, "--memory not passed on")
                self.assertEqual(len(ls.sequences), 0)
            self.assertEqual(_http(mport, "/readyz"), (200, "ok\n"))
            self.assertEqual(_http(mport, "/healthz"), (200, "ok\n"))
            self.assertTrue(_pid_running(pid))
            with open("/proc/%d/stat" % pid) as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            self.assertEqual(ppid, c.proc.pid, "node %d is not the script's child" % i)
        c.proc.send_signal(signal.SIGTERM)
        self.assertEqual(c.wait(), 0, c.output())
        pids = [p for p, _, _ in c.nodes.values()]
        self.assertEqual(_wait_gone(pids, 1), [], "nodes left running after the script exited")
        for _, gport, mport in c.nodes.values():
            self.assertTrue(_port_free(gport) and _port_free(mport))
        out = c.output()
        self.assertIn("cluster status --uri \"%s\"" % c.uri, out)
        self.assertIn("demo --uri \"%s\"" % c.uri, out)
        self.assertIn("stopping 3 node(s)", out)
        self.assertNotIn("SIGKILL", out, "a node needed SIGKILL: it did not drain")
        logs = self.node_logs()
        self.assertEqual(sorted(logs), ["node-%d.log" % i for i in range(N)])
        for name, text in logs.items():
            self.assertIn("stopped cleanly", text, name)

    def test_ctrl_c_stops_all(self):
        # Ctrl-C signals the terminal's whole process group: the script and every node.
        c, _ = self.started(2)
        os.killpg(c.proc.pid, signal.SIGINT)
        self.assertEqual(c.wait(), 0, c.output())
        self.assertEqual(_wait_gone([p for p, _, _ in c.nodes.values()], 1), [])
        self.assertNotIn("exited with status", c.output())

    # ---- failures -------------------------------------------------------------------------

    def test_killed_node_is_reported_and_the_rest_stopped(self):
        c, base = self.started()
        victim, _, _ = c.nodes[1]
        os.kill(victim, signal.SIGKILL)
        self.assertEqual(c.wait(), 1, c.output())
        out = c.output()
        self.assertRegex(out, r"node 1 \(pid %d, 127\.0\.0\.1:%d\) was killed by SIGKILL" %
                         (victim, base + 1))
        # The end of its log comes with it.
        self.assertIn("listening on 127.0.0.1:%d" % (base + 1), out.split("SIGKILL", 1)[1])
        self.assertIn("stopping 2 node(s)", out)
        self.assertEqual(_wait_gone([p for p, _, _ in c.nodes.values()], 1), [])

    def test_node_that_cannot_start_is_reported(self):
        base = free_base_port()
        c = self.start("2", "--base-port", str(base), "--kvdex", KVDEX, "--",
                       "--max-message", "1")
        self.assertEqual(c.wait(START_TIMEOUT), 1, c.output())
        out = c.output()
        self.assertRegex(out, r"node [01] \(pid \d+, 127\.0\.0\.1:(%d|%d)\) exited with "
                              r"status 2" % (base, base + 1))
        self.assertIn("max-message", out.split("exited with status 2", 1)[1])
        self.assertNotIn("URI:", out)

    def test_bad_arguments_exit_2(self):
        for args, says in ((["0"], "N must be a number of nodes in 1..32"),
                           (["three"], "N must be"),
                           (["33"], "N must be"),
                           (["3", "4"], "unexpected argument '4'"),
                           (["--nope"], "unknown option '--nope'"),
                           (["--base-port"], "--base-port needs a value"),
                           (["--base-port", "80"], "--base-port must be a port"),
                           (["--base-port", "65500"], "--base-port must be a port"),
                           (["--memory", "lots"], "--memory must be a size"),
                           (["--kvdex", "/nonexistent/kvdex"], "is not an executable file")):
            rc, out, err = self.run_script(*args, "--kvdex", KVDEX) if "--kvdex" not in args \
                else self.run_script(*args)
            self.assertEqual(rc, 2, (args, out, err))
            self.assertIn(says, err, args)
            self.assertIn("--help", err)
            self.assertEqual(out, "", args)
        self.assertEqual(os.listdir(self.tmp), [], "bad arguments started something")

    def test_help(self):
        rc, out, err = self.run_script("--help")
        self.assertEqual((rc, err), (0, ""))
        for word in ("--base-port", "--memory", "--kvdex", "bazel build -c opt //workers:kvdex",
                     "/readyz", "replicas", "Exit status"):
            self.assertIn(word, out)

    def _fake_repo(self, fail=False):
        """A copy of the script in a repository whose `bazel` is a stub: it records its
        arguments and links bazel-bin/workers/kvdex to the real binary (or fails)."""
        repo = os.path.join(self.tmp, "repo")
        os.makedirs(os.path.join(repo, "deploy"))
        os.makedirs(os.path.join(self.tmp, "fakebin"))
        script = os.path.join(repo, "deploy", "local-cluster")
        with open(SCRIPT) as src, open(script, "w") as dst:
            dst.write(src.read())
        os.chmod(script, 0o755)
        bazel = os.path.join(self.tmp, "fakebin", "bazel")
        with open(bazel, "w") as fh:
            fh.write("#!/bin/sh\n"
                     "echo \"$(pwd) $*\" >> %s/bazel.log\n"
                     "%s"
                     "mkdir -p bazel-bin/workers && ln -sf %s bazel-bin/workers/kvdex\n"
                     % (self.tmp, "echo 'ERROR: stub build failure' >&2; exit 1\n" if fail
                        else "", KVDEX))
        os.chmod(bazel, 0o755)
        env_path = os.path.join(self.tmp, "fakebin") + ":" + os.environ.get("PATH", "/usr/bin:/bin")
        return script, env_path

    def test_builds_kvdex_without_kvdex_flag(self):
        script, path = self._fake_repo()
        base = free_base_port(1)
        c = Cluster("1", "--base-port", str(base), tmp=self.tmp, script=script,
                    env={"PATH": path})
        self.clusters.append(c)
        c.wait_ready()
        self.assertEqual(c.uri, "grpc://127.0.0.1:%d?replicas=1" % base)
        c.proc.send_signal(signal.SIGTERM)
        self.assertEqual(c.wait(), 0, c.output())
        repo = os.path.dirname(os.path.dirname(script))
        with open(os.path.join(self.tmp, "bazel.log")) as fh:
            self.assertEqual(fh.read().splitlines()[0], repo + " build -c opt //workers:kvdex")
        out = c.output()
        self.assertIn("bazel build -c opt //workers:kvdex", out)
        self.assertIn("using %s/bazel-bin/workers/kvdex" % repo, out)

    def test_failed_build_exits_1(self):
        script, path = self._fake_repo(fail=True)
        r = subprocess.run([script, "1", "--base-port", str(free_base_port(1))],
                           capture_output=True, text=True, timeout=30,
                           env=dict(os.environ, PATH=path, TMPDIR=self.tmp))
        self.assertEqual(r.returncode, 1, r)
        self.assertIn("stub build failure", r.stderr)
        self.assertIn("the build failed", r.stderr)
        self.assertFalse(any(d.startswith("kvdex-local-cluster.") for d in os.listdir(self.tmp)))

    def test_busy_port_is_named(self):
        base = free_base_port()
        for busy in (base + 2, base + 101):  # node 2's gRPC port, node 1's metrics port
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", busy))
            s.listen()
            try:
                rc, out, err = self.run_script("3", "--base-port", str(base), "--kvdex", KVDEX)
            finally:
                s.close()
            self.assertEqual(rc, 1, (out, err))
            self.assertIn("port(s) already in use on 127.0.0.1: %d" % busy, err)
            self.assertIn("--base-port", err)
            self.assertNotIn("starting", out)
        self.assertEqual(os.listdir(self.tmp), [], "a busy port started something")


if __name__ == "__main__":
    SCRIPT, KVDEX = (os.path.abspath(p) for p in sys.argv[1:3])
    result = junit_main.run("local_cluster")
    sys.exit(0 if result.wasSuccessful() else 1)
