"""End-to-end tests of `kvdex gpu-worker --cpu` against a real `kvdex serve`: with
--index dense the merged outputs equal dense attention within 1e-3 (--check), the
store's sequence grows by one token per step per layer (seen with `kvdex inspect`),
exact top-k reports its error, GPU mode in this CUDA-free binary names the CUDA build,
and bad options exit 2 with a clear message. Nothing here is timing-based.
Usage: gpu_worker_cli_test.py PATH_TO_KVDEX"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import unittest
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "py"))
import junit_main  # noqa: E402  (tests/py: the shared runner that writes test.xml)

KVDEX = None
SHAPE = ["--layers", "2", "--kv-heads", "2", "--q-heads", "4", "--head-dim", "64",
         "--context", "2048", "--steps", "8"]


def run(*args, timeout=300, env=None):
    return subprocess.run([KVDEX, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


class Server:
    def __init__(self, *extra):
        self.proc = subprocess.Popen([KVDEX, "serve", "--listen", "127.0.0.1:0", *extra],
                                     stderr=subprocess.PIPE, text=True)
        self.lines = []
        deadline = time.time() + 60
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"listening on (\S+):(\d+)", line)
            if m:
                self.port = int(m.group(2))
                self.uri = f"grpc://127.0.0.1:{self.port}"
                return
        self.proc.kill()
        raise RuntimeError("server did not start: " + "".join(self.lines))

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        self.lines.append(err or "")
        return self.proc.returncode, "".join(self.lines)


class GpuWorkerCliTest(unittest.TestCase):
    srv = None

    @classmethod
    def setUpClass(cls):
        cls.srv = Server("--memory", "512M", "--threads", "2")

    @classmethod
    def tearDownClass(cls):
        rc, log = cls.srv.stop()
        assert rc == 0, log

    def test_dense_matches_dense_attention(self):
        r = run("gpu-worker", "--cpu", "--uri", self.srv.uri, "--index", "dense", "--check",
                *SHAPE, "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        j = json.loads(r.stdout)
        self.assertEqual(j["backend"], "twin (CPU)")
        self.assertEqual(j["checked"], 8 * 2 * 4)
        self.assertTrue(j["check_asserted"])
        self.assertTrue(j["check_ok"])
        self.assertLess(j["max_rel_err"], 1e-3)
        self.assertEqual(j["final_tokens"], 2048 + 8)
        # every token outside sinks (4) + window (256) went to the store, per q head
        want = sum(2048 + s - 4 - 256 for s in range(8)) * 2 * 4
        self.assertEqual(j["store_attended"], want)
        self.assertEqual(j["local_attended"], (4 + 256 + 1) * 8 * 2 * 4)
        for key in ("tokens_per_s", "local_ms", "store_ms", "store_cpu_ms", "network_ms",
                    "merge_ms", "append_ms"):
            self.assertGreater(j[key], 0, key)
        # the server's own time is part of the call's wall time
        self.assertLessEqual(j["store_cpu_ms"], j["store_ms"])

    def test_text_report_and_store_growth(self):
        seq = "gw-cli-keep"
        r = run("gpu-worker", "--cpu", "--uri", self.srv.uri, "--index", "dense", "--check",
                "--seq", seq, "--keep", *SHAPE)
        self.assertEqual(r.returncode, 0, r.stderr)
        for text in ("tokens/s", "local attention (twin (CPU))",
                     "store CPU attend (retrieval + attention)",
                     "network + queueing (store calls)", "LSE merge",
                     "append new K/V to the store", "PASS",
                     "2056 tokens per layer after the run (context 2048 + 8 steps): OK",
                     "kept:    sequence " + seq):
            self.assertIn(text, r.stdout)
        m = re.search(r"max relative error (\S+)", r.stdout)
        self.assertLess(float(m.group(1)), 1e-3)
        # the store itself: 2048 prompt + 8 decoded tokens in layer 0 (inspect shows it)
        r = run("inspect", "--uri", self.srv.uri)
        self.assertEqual(r.returncode, 0, r.stderr)
        line = next(l for l in r.stdout.splitlines() if l.startswith(seq))
        self.assertEqual(line.split()[7], "2056", line)
        # a second run may not reuse the id (it refuses, and leaves the sequence alone)
        r = run("gpu-worker", "--cpu", "--uri", self.srv.uri, "--seq", seq, *SHAPE)
        self.assertEqual(r.returncode, 1)
        self.assertIn("exists", r.stderr.lower())
        r = run("inspect", "--uri", self.srv.uri)
        self.assertIn(seq, r.stdout)

    def test_exact_topk_reports_error(self):
        r = run("gpu-worker", "--cpu", "--uri", self.srv.uri, "--index", "exact", "--k", "32",
                "--check", *SHAPE, "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        j = json.loads(r.stdout)
        self.assertFalse(j["check_asserted"])
        self.assertEqual(j["checked"], 8 * 2 * 4)
        self.assertGreater(j["max_rel_err"], 0)
        self.assertEqual(j["store_attended"], 32 * 8 * 2 * 4)
        r = run("gpu-worker", "--cpu", "--uri", self.srv.uri, "--index", "exact", "--k", "32",
                "--check", *SHAPE)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("reported, not asserted", r.stdout)

    def test_s2_layers(self):
        r = run("gpu-worker", "--cpu", "--uri", self.srv.uri, "--index", "dense", "--check",
                "--s2-vert-stride", "4", "--s2-local-blocks", "2", "--block-tokens", "32",
                *SHAPE, "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        j = json.loads(r.stdout)
        self.assertLess(j["max_rel_err"], 1e-3)
        self.assertEqual(j["final_tokens"], 2048 + 8)

    def test_embedded_store(self):
        r = run("gpu-worker", "--cpu", "--uri", "local:", "--index", "dense", "--check",
                "--context", "600", "--steps", "3", "--head-dim", "32", "--kv-heads", "1",
                "--q-heads", "2", "--window", "40", "--dtype", "bf16")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("store CPU attend (retrieval + attention)", r.stdout)
        self.assertIn("store call overhead (in-process)", r.stdout)
        self.assertIn("PASS", r.stdout)

    def test_gpu_mode_needs_cuda_build(self):
        r = run("gpu-worker", "--uri", self.srv.uri, *SHAPE)
        self.assertEqual(r.returncode, 2)
        self.assertIn("GPU mode needs the CUDA build", r.stderr)
        self.assertIn("//workers:kvdex_gpu_worker", r.stderr)
        self.assertIn("--cpu", r.stderr)

    def test_help(self):
        r = run("gpu-worker", "--help")
        self.assertEqual(r.returncode, 0)
        for flag in ("--cpu", "--uri", "--context", "--sinks", "--window", "--index", "--check",
                     "--s2-vert-stride", "--tolerance", "KVDEX_GPU_WORKER_URI"):
            self.assertIn(flag, r.stdout)
        self.assertIn("gpu-worker", run("--help").stdout)

    def test_bad_options(self):
        cases = [
            (["--bogus"], "unknown option '--bogus'"),
            (["--q-heads", "6", "--kv-heads", "4"], "not a multiple of --kv-heads"),
            (["--dtype", "f32"], "f16 or bf16"),
            (["--head-dim", "40"], "multiple of 16"),
            (["--context", "100", "--window", "100"], "must exceed --sinks"),
            (["--context", "0"], "out of range"),
            (["--k", "0"], "out of range"),
            (["--index", ""], "--index is empty"),
            (["--tolerance", "2"], "out of range"),
            (["--steps"], "needs a value"),
            (["--uri", "http://x"], "cannot open"),
        ]
        for args, msg in cases:
            r = run("gpu-worker", "--cpu", *args)
            self.assertEqual(r.returncode, 2, (args, r.stderr))
            self.assertIn(msg, r.stderr, args)
        env = dict(os.environ, KVDEX_GPU_WORKER_CONTEXT="lots")
        r = run("gpu-worker", "--cpu", env=env)
        self.assertEqual(r.returncode, 2)
        self.assertIn("KVDEX_GPU_WORKER_CONTEXT", r.stderr)

    def test_unknown_index_fails_cleanly(self):
        r = run("gpu-worker", "--cpu", "--uri", self.srv.uri, "--index", "nonsense", *SHAPE)
        self.assertEqual(r.returncode, 1)
        self.assertIn("after 0 of 8 steps", r.stderr)
        # the worker deleted what it created
        self.assertNotIn("gpu-worker-", run("inspect", "--uri", self.srv.uri).stdout)


if __name__ == "__main__":
    KVDEX = os.path.abspath(sys.argv[1])
    result = junit_main.run("gpu_worker_cli")
    sys.exit(0 if result.wasSuccessful() else 1)
