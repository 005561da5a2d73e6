"""End-to-end tests of `kvdex gen` and `kvdex bench recall` as a user runs them:
the generated .npy files checked with NumPy (shapes, dtypes, determinism, needles
are the true top-1 of their query), exact recall 1.0 touching every key, the
approximate kinds in (0, 1] touching fewer, repeated/';'-joined --index, the sweep
CSV (recall rising with the knob) and its plot, and bad inputs -> exit 2 with a
clear message. Usage: recall_test.py PATH_TO_KVDEX"""
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "py"))
import junit_main  # noqa: E402  (tests/py: the shared runner that writes test.xml)

KVDEX = None
HERE = os.path.dirname(os.path.abspath(__file__))
PLOT = os.path.join(HERE, "..", "..", "bench", "plot_recall.py")
TMP = None  # the class-wide scratch directory
N, D, TRAIN, TEST, NEEDLES = 8192, 64, 512, 200, 8


def run(*args, timeout=240, env=None):
    return subprocess.run([KVDEX, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def path(*parts):
    return os.path.join(TMP, *parts)


def recall(*args, data="main", **kw):
    d = path(data)
    base = ["bench", "recall", "--keys", os.path.join(d, "keys.npy"),
            "--queries", os.path.join(d, "queries.npy"),
            "--train-queries", os.path.join(d, "train_queries.npy"),
            "--needles", os.path.join(d, "needles.npy"), "--threads", "2"]
    return run(*base, *args, **kw)


def recall_json(testcase, *args, **kw):
    r = recall("--json", *args, **kw)
    testcase.assertEqual(r.returncode, 0, r.stderr)
    return json.loads(r.stdout)


def have_kind(kind):
    """Whether this build has an index kind (graph is added by its own target)."""
    r = recall("--index", kind, "--k", "1", data="tiny")
    if r.returncode == 0:
        return True
    if "unknown kind" in r.stderr:
        return False
    raise AssertionError(r.stderr)


class RecallTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        for name, extra in (("main", ["--keys", str(N), "--dim", str(D), "--train-queries",
                                      str(TRAIN), "--test-queries", str(TEST), "--needles",
                                      str(NEEDLES), "--dtype", "f32", "--seed", "3"]),
                            ("tiny", ["--keys", "1024", "--dim", "32", "--train-queries", "64",
                                      "--test-queries", "20", "--needles", "4", "--dtype", "f16",
                                      "--seed", "7"])):
            r = run("gen", "--out", path(name), *extra)
            if r.returncode != 0:
                raise RuntimeError(f"kvdex gen {name} failed: {r.stderr}")

    # ---- kvdex gen ------------------------------------------------------------------
    def test_gen_files(self):
        k = np.load(path("main", "keys.npy"))
        v = np.load(path("main", "values.npy"))
        tq = np.load(path("main", "train_queries.npy"))
        q = np.load(path("main", "queries.npy"))
        nd = np.load(path("main", "needles.npy"))
        self.assertEqual((k.shape, v.shape, tq.shape, q.shape, nd.shape),
                         ((N, D), (N, D), (TRAIN, D), (TEST, D), (NEEDLES, 2)))
        for a in (k, v, tq, q, nd):
            self.assertEqual(a.dtype, np.float32)
            self.assertTrue(np.isfinite(a).all())
        meta = json.load(open(path("main", "gen.json")))
        self.assertEqual((meta["keys"], meta["dim"], meta["needles"], meta["needles_top1"]),
                         (N, D, NEEDLES, NEEDLES))
        # Needles: integer positions spread over the context, each the true top-1.
        pos, qi = nd[:, 0].astype(np.int64), nd[:, 1].astype(np.int64)
        self.assertTrue((nd == np.floor(nd)).all())
        self.assertEqual(pos[0], 0)
        self.assertEqual(pos[-1], N - 1)
        self.assertTrue((qi < TEST).all())
        scores = q[qi].astype(np.float64) @ k.astype(np.float64).T
        self.assertEqual(list(scores.argmax(axis=1)), list(pos))

    def test_gen_f16_and_deterministic(self):
        k = np.load(path("tiny", "keys.npy"))
        self.assertEqual((k.shape, k.dtype), ((1024, 32), np.float16))
        self.assertEqual(np.load(path("tiny", "queries.npy")).dtype, np.float16)
        self.assertEqual(np.load(path("tiny", "needles.npy")).dtype, np.float32)
        r = run("gen", "--out", path("tiny2"), "--keys", "1024", "--dim", "32",
                "--train-queries", "64", "--test-queries", "20", "--needles", "4",
                "--dtype", "f16", "--seed", "7")
        self.assertEqual(r.returncode, 0, r.stderr)
        for f in ("keys.npy", "values.npy", "train_queries.npy", "queries.npy", "needles.npy"):
            with open(path("tiny", f), "rb") as a, open(path("tiny2", f), "rb") as b:
                self.assertEqual(a.read(), b.read(), f)
        r = run("gen", "--out", path("tiny3"), "--keys", "1024", "--dim", "32",
                "--test-queries", "20", "--needles", "4", "--seed", "8", "--dtype", "f16")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertFalse(np.array_equal(np.load(path("tiny3", "keys.npy")), k))
        self.assertFalse(any(f.endswith(".tmp") for f in os.listdir(path("tiny3"))))

    def test_gen_knobs(self):
        r = run("gen", "--out", path("knobs"), "--keys", "512", "--dim", "16", "--test-queries",
                "4", "--needles", "0", "--train-queries", "0", "--drift", "0", "--noise", "0.5",
                "--heavy-frac", "0", "--topics", "3", "--span", "16", "--query-offset", "8")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(np.load(path("knobs", "needles.npy")).shape, (0, 2))
        self.assertEqual(np.load(path("knobs", "train_queries.npy")).shape, (0, 16))
        meta = json.load(open(path("knobs", "gen.json")))
        self.assertEqual((meta["topics"], meta["span"], meta["query_offset"]), (3, 16, 8))

    # ---- kvdex bench recall ----------------------------------------------------------
    def test_exact(self):
        j = recall_json(self, "--index", "exact")
        self.assertEqual((j["keys"], j["dim"], j["queries"], j["k"]), (N, D, TEST, 100))
        self.assertEqual(len(j["results"]), 1)
        res = j["results"][0]
        self.assertEqual(res["kind"], "exact")
        self.assertEqual(res["recall"], 1.0)
        self.assertEqual(res["touched_frac"], 1.0)
        self.assertEqual(res["needle_hits"], NEEDLES)
        self.assertEqual(j["needles_exact"], NEEDLES)
        self.assertGreater(res["qps"], 0)

    def test_exact_f16(self):
        j = recall_json(self, "--index", "exact", "--k", "10", data="tiny")
        self.assertEqual(j["dtype"], "f16")
        self.assertEqual(j["results"][0]["recall"], 1.0)
        # kvdex's exact top-1 agrees with NumPy's on the f16 keys, and gen.json's count.
        k = np.load(path("tiny", "keys.npy")).astype(np.float64)
        q = np.load(path("tiny", "queries.npy")).astype(np.float64)
        nd = np.load(path("tiny", "needles.npy")).astype(np.int64)
        top1 = int(((q[nd[:, 1]] @ k.T).argmax(axis=1) == nd[:, 0]).sum())
        self.assertEqual(j["needles_exact"], top1)
        self.assertEqual(j["results"][0]["needle_hits"], top1)
        self.assertEqual(json.load(open(path("tiny", "gen.json")))["needles_top1"], top1)

    def test_ivf(self):
        j = recall_json(self, "--index", "ivf:nlist=64,nprobe=8")
        res = j["results"][0]
        self.assertEqual(res["kind"], "ivf")
        self.assertEqual((res["knob"], res["value"]), ("nprobe", 8))
        self.assertGreater(res["recall"], 0)
        self.assertLessEqual(res["recall"], 1)
        self.assertLess(res["touched_frac"], 1)
        self.assertGreater(res["touched_frac"], 0)
        self.assertGreater(res["bytes_per_key"], 4 * D)  # FAISS keeps its own f32 copy
        self.assertGreater(res["build_s"], 0)

    def test_repeated_and_joined_index(self):
        j = recall_json(self, "--index", "ivf:nlist=64,nprobe=8;hnsw:M=16,ef=64",
                        "--index", "landmark:blocks=8")
        self.assertEqual([r["kind"] for r in j["results"]], ["ivf", "hnsw", "landmark"])
        self.assertEqual(j["results"][1]["spec"], "hnsw:M=16,ef=64")
        for res in j["results"]:
            self.assertGreater(res["recall"], 0, res)
            self.assertLessEqual(res["recall"], 1, res)
            self.assertLess(res["touched_frac"], 1, res)
        env = dict(os.environ, KVDEX_RECALL_INDEX="exact;landmark")
        j = recall_json(self, env=env)
        self.assertEqual([r["kind"] for r in j["results"]], ["exact", "landmark"])

    def test_graph(self):
        if not have_kind("graph"):
            self.skipTest("this build has no graph kind (//index:ann without graph.c)")
        j = recall_json(self, "--index", "graph")
        res = j["results"][0]
        self.assertEqual(res["kind"], "graph")
        self.assertGreater(res["recall"], 0)
        self.assertLessEqual(res["recall"], 1)
        self.assertLess(res["touched_frac"], 1)

    def test_all_text(self):
        r = recall("--k", "10", "--threads", "1", data="tiny")
        self.assertEqual(r.returncode, 0, r.stderr)
        out = r.stdout
        for word in ("recall@10", "touched", "qps", "B/key", "needles", "exact", "ivf:nlist=",
                     "hnsw:M=", "landmark:"):
            self.assertIn(word, out)
        self.assertIn("exact top-k", r.stderr)  # progress goes to stderr

    def test_sweep_csv_and_plot(self):
        kinds = ["ivf:nlist=64,nprobe=8", "landmark", "hnsw:M=16", "exact"]
        if have_kind("graph"):
            kinds.append("graph")
        csv_path = path("sweep.csv")
        j = recall_json(self, "--sweep", "--csv", csv_path, *sum((["--index", s] for s in kinds), []))
        with open(csv_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        self.assertEqual(list(rows[0].keys()),
                         ["kind", "spec", "knob", "value", "recall", "touched_frac", "qps"])
        by_kind = {}
        for row in rows:
            by_kind.setdefault(row["kind"], []).append(row)
        self.assertEqual(set(by_kind), {s.split(":")[0] for s in kinds})
        self.assertEqual(len(by_kind["exact"]), 1)
        self.assertEqual(float(by_kind["exact"][0]["recall"]), 1.0)
        self.assertEqual([int(r["value"]) for r in by_kind["ivf"]], [1, 2, 4, 8, 16, 32, 64])
        self.assertEqual([int(r["value"]) for r in by_kind["hnsw"]][:2], [16, 32])
        for kind, pts in by_kind.items():
            rec = [float(r["recall"]) for r in pts]
            tch = [float(r["touched_frac"]) for r in pts]
            for a, b in zip(rec, rec[1:]):
                self.assertGreaterEqual(b, a - 0.02, (kind, rec))
            self.assertGreaterEqual(rec[-1], rec[0], (kind, rec))
            if kind in ("ivf", "landmark"):  # touched grows with nprobe / blocks
                for a, b in zip(tch, tch[1:]):
                    self.assertGreaterEqual(b, a, (kind, tch))
        self.assertGreaterEqual(float(by_kind["ivf"][-1]["recall"]), 0.99)  # nprobe = nlist
        self.assertGreaterEqual(float(by_kind["landmark"][-1]["recall"]), 0.99)  # every block
        self.assertIn("sweep", j["results"][0])
        self.assertEqual(len(j["results"][0]["sweep"]), 7)

    def test_plot(self):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.skipTest("python3-matplotlib is not installed: plot not checked")
        csv_path, png = path("plot.csv"), path("plot.png")
        r = recall("--k", "10", "--index", "ivf:nlist=8;landmark;exact", "--sweep", "--csv",
                   csv_path, data="tiny")
        self.assertEqual(r.returncode, 0, r.stderr)
        env = dict(os.environ, MPLCONFIGDIR=path("mpl"))
        r = subprocess.run(["/usr/bin/python3", PLOT, csv_path, png, "--k", "10"],
                           capture_output=True, text=True, timeout=120, env=env)
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(png, "rb") as fh:
            self.assertEqual(fh.read(8), b"\x89PNG\r\n\x1a\n")
        self.assertGreater(os.path.getsize(png), 10000)

    def test_help(self):
        for args, flags in ((["gen"], ["--out", "--keys", "--needles", "--heavy-frac",
                                      "KVDEX_GEN_KEYS"]),
                            (["bench", "recall"], ["--keys", "--queries", "--index", "--sweep",
                                                   "--csv", "repeatable", "KVDEX_RECALL_KEYS"])):
            r = run(*args, "--help")
            self.assertEqual(r.returncode, 0, args)
            self.assertIn("usage: kvdex " + " ".join(args), r.stdout)
            for f in flags:
                self.assertIn(f, r.stdout, (args, f))
        self.assertIn("recall", run("bench", "--help").stdout)
        self.assertIn("gen", run("--help").stdout)

    def test_bad_inputs(self):
        m = path("main")
        bad3d = path("bad3d.npy")
        np.save(bad3d, np.zeros((4, 4, 4), np.float32))
        needles_oob = path("needles_oob.npy")
        np.save(needles_oob, np.array([[N + 5, 0]], np.float32))
        ints = path("ints.npy")
        np.save(ints, np.zeros((4, 4), np.int64))
        km, qm = os.path.join(m, "keys.npy"), os.path.join(m, "queries.npy")
        qt = path("tiny", "queries.npy")  # dim 32, not 64
        cases = [
            (["bench", "recall", "--queries", qm], "--keys FILE.npy is required"),
            (["bench", "recall", "--keys", km], "--queries FILE.npy is required"),
            (["bench", "recall", "--keys", path("nope.npy"), "--queries", qm],
             "No such file or directory"),
            (["bench", "recall", "--keys", km, "--queries", qt], "does not match the keys' dim"),
            (["bench", "recall", "--keys", km, "--queries", qm, "--train-queries", qt],
             "--train-queries"),
            (["bench", "recall", "--keys", bad3d, "--queries", qm], "2-D array"),
            (["bench", "recall", "--keys", ints, "--queries", qm], "is not supported"),
            (["bench", "recall", "--keys", km, "--queries", qm, "--index", "bogus"],
             "unknown kind 'bogus'"),
            (["bench", "recall", "--keys", km, "--queries", qm, "--index", "ivf:nprobe=zero"],
             "bad nprobe"),
            (["bench", "recall", "--keys", km, "--queries", qm, "--index", "exact;ivf:frob=1"],
             "unknown parameter"),
            (["bench", "recall", "--keys", km, "--queries", qm, "--needles", needles_oob],
             "position <"),
            (["bench", "recall", "--keys", km, "--queries", qm, "--k", "0"], "out of range"),
            (["bench", "recall", "--keys", km, "--queries", qm, "--csv",
              path("no", "such", "dir", "x.csv"), "--index", "exact"], "--csv"),
            (["gen", "--keys", "100"], "--out DIR is required"),
            (["gen", "--out", path("g"), "--dtype", "bf16"], "f32 or f16"),
            (["gen", "--out", path("g"), "--needles", "50", "--test-queries", "10"],
             "at least as many --test-queries"),
            (["gen", "--out", path("g"), "--heavy-frac", "2"], "out of range"),
            (["gen", "--out", path("g"), "--noise", "lots"], "is not a number"),
            (["gen", "--out", path("g"), "--index", "exact"], "unknown option '--index'"),
            (["bench", "recall", "--out", path("g")], "unknown option '--out'"),
        ]
        for args, msg in cases:
            r = run(*args)
            self.assertEqual(r.returncode, 2, (args, r.stdout, r.stderr))
            self.assertIn(msg, r.stderr, args)
        self.assertFalse(os.path.exists(path("g")))  # rejected before creating anything


if __name__ == "__main__":
    KVDEX = os.path.abspath(sys.argv[1])
    TMP = tempfile.mkdtemp(prefix="kvdex-recall-", dir=os.environ.get("TEST_TMPDIR"))
    try:
        result = junit_main.run("recall")
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(0 if result.wasSuccessful() else 1)
