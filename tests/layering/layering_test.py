"""Tests of the layering check (layering.py): on small synthetic trees it must report
each kind of upward or sideways edge (an #include, a BUILD dep, gpu reaching into
index, a folder outside the order) and nothing for the edges the order allows; then it
runs on the real repository tree.
Usage: layering_test.py PATH_TO_WORKSPACE_FILE (the repository's WORKSPACE)"""
import os
import subprocess
import sys
import tempfile
import textwrap
import unittest
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "py"))
sys.path.insert(0, HERE)
import junit_main  # noqa: E402  (tests/py: the shared runner that writes test.xml)
import layering  # noqa: E402

REPO = None  # the real tree, from argv

# A clean miniature of the repository: every folder of the order with a BUILD file, and
# edges that only reach down (plus the floor, gpu used by workers, tests using anything).
CLEAN = {
    "BUILD": 'config_setting(name = "asan", define_values = {"kvdex_asan": "1"})\n',
    "kvstore/BUILD": """\
        cc_library(name = "base", hdrs = ["base.h", "kvdex_base.h"])
        cc_library(name = "kvstore", hdrs = ["kvstore.h"], deps = [":base"],
                   visibility = ["//tests/kvstore:__pkg__"])
        """,
    "kvstore/base.h": '#include "kvstore/kvdex_base.h"\n',
    "kvstore/kvdex_base.h": "",
    "kvstore/kvstore.h": '#include "kvstore/base.h"\n',
    "proto/BUILD": 'cc_library(name = "wire", deps = ["//kvstore"])\n',
    "proto/wire.h": '#include "kvstore/kvstore.h"\n#include "kvdex/v1/kvdex.pb-c.h"\n',
    "index/BUILD": 'cc_library(name = "index", deps = ["//kvstore", "//kvstore:base"])\n',
    "index/index.h": '#include "kvstore/kvstore.h"\n#include <stdio.h>\n#include "local.h"\n',
    "engine/BUILD": 'cc_library(name = "node", deps = ["//index", "//proto:wire"])\n',
    "engine/node.h": '#include "index/index.h"\n',
    "client/BUILD": 'cc_library(name = "kvdex", deps = ["//engine:node", "//index"])\n',
    "client/kvdex.h": '#include "kvdex/kvdex_base.h"\n#include "engine/node.h"\n',
    "bench/BUILD": 'cc_library(name = "bench", deps = ["//client:kvdex", "//:asan"])\n',
    "bench/bench.c": '#include "client/kvdex.h"\n',
    "workers/BUILD": """\
        cc_binary(name = "kvdex", deps = ["//bench", "//client:kvdex", "//gpu:twin"])
        exports_files(["cuda.c"], visibility = ["//tests/gpu:__pkg__"])
        """,
    "workers/main.c": '#include "bench/bench.h"\n#include "gpu/gpu.h"\n',
    "gpu/BUILD": """\
        cc_library(name = "twin", hdrs = ["gpu.h"], deps = ["//kvstore:base"],
                   visibility = ["//workers:__pkg__", "//tests/gpu:__pkg__"])
        genrule(name = "k", srcs = ["//kvstore:base.h"], outs = ["k.a"],
                cmd = "nvcc $(location //kvstore:base.h) -o $@")
        """,
    "gpu/gpu.h": '#include "kvstore/base.h"\n',
    "gpu/decode.cu": '#include "gpu/gpu.h"\n#include "kvstore/kvdex_base.h"\n',
    "tests/gpu/BUILD": 'cc_test(name = "t", deps = ["//gpu:twin", "//workers:kvdex"])\n',
    "tests/gpu/t.cc": '#include "gpu/gpu.h"\n#include "workers/server.h"\n',
    "third_party/rules_cc/BUILD": "",
    "docs/BUILD": 'filegroup(name = "cli_md", srcs = ["CLI.md"])\n',
}


def make_tree(root, files):
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(textwrap.dedent(text))


class Synthetic(unittest.TestCase):
    """The checker on miniature trees: CLEAN, plus one bad edge at a time."""

    def check(self, extra):
        with tempfile.TemporaryDirectory() as root:
            make_tree(root, {**CLEAN, **extra})
            return layering.check(root)

    def assertReported(self, found, where, edge):
        hits = [f for f in found if f.startswith(where + ":") and edge in f]
        self.assertEqual(len(hits), 1, "expected one report of %s at %s, got:\n%s" % (
            edge, where, "\n".join(found)))

    def test_clean_tree_has_no_violations(self):
        self.assertEqual(self.check({}), [])

    def test_upward_include(self):
        found = self.check({"client/local.c": '#include "client/kvdex.h"\n\n'
                                              '#include "workers/indexer.h"\n'})
        self.assertReported(found, "client/local.c:3", "client -> workers")
        self.assertEqual(len(found), 1, found)

    def test_upward_include_through_an_installed_name(self):
        found = self.check({"index/x.c": '#include "kvdex/kvdex.h"\n'})
        self.assertReported(found, "index/x.c:1", "index -> client")

    def test_upward_build_dep(self):
        found = self.check({"proto/BUILD": 'cc_library(\n    name = "wire",\n'
                                           '    deps = ["//kvstore", "//index:ann"],\n)\n'})
        self.assertReported(found, "proto/BUILD:3", "proto -> index (//index:ann)")
        self.assertEqual(len(found), 1, found)

    def test_upward_dep_in_a_genrule_command(self):
        found = self.check({"index/BUILD": 'genrule(name = "g", outs = ["g.h"],\n'
                                           '        cmd = "cp $(location //bench:x) $@")\n'})
        self.assertReported(found, "index/BUILD:2", "index -> bench (//bench:x)")

    def test_gpu_into_index(self):
        found = self.check({
            "gpu/topk.cu": '#include "gpu/gpu.h"\n#include "index/index.h"\n',
            "gpu/BUILD": 'cc_library(name = "twin", deps = ["//kvstore:base", "//index"])\n'})
        self.assertReported(found, "gpu/topk.cu:2", "gpu -> index")
        self.assertReported(found, "gpu/BUILD:1", "gpu -> index (//index)")
        self.assertEqual(len(found), 2, found)

    def test_gpu_beyond_the_floor(self):
        found = self.check({"gpu/twin.c": '#include "kvstore/kvstore.h"\n',
                            "gpu/BUILD": 'cc_library(name = "twin", deps = ["//kvstore"])\n'})
        self.assertReported(found, "gpu/twin.c:1", "gpu -> kvstore")
        self.assertReported(found, "gpu/BUILD:1", "gpu -> kvstore (//kvstore)")

    def test_gpu_compiles_a_workers_file(self):
        found = self.check({"gpu/BUILD": 'cc_binary(name = "w", srcs = ["//workers:cuda.c"])\n'})
        self.assertReported(found, "gpu/BUILD:1", "gpu -> workers (//workers:cuda.c)")

    def test_gpu_used_below_workers(self):
        found = self.check({"engine/attend.c": '#include "gpu/gpu.h"\n'})
        self.assertReported(found, "engine/attend.c:1", "engine -> gpu")

    def test_product_folder_uses_tests(self):
        found = self.check({"bench/BUILD": 'cc_library(name = "b", deps = ["//tests/gpu:t"])\n'})
        self.assertReported(found, "bench/BUILD:1", "bench -> tests")

    def test_folder_outside_the_order(self):
        found = self.check({"plugins/BUILD": "", "plugins/p.c": '#include "workers/x.h"\n'})
        self.assertReported(found, "plugins/", "not in the layer order")

    def test_command_line_exit_status(self):
        script = os.path.join(HERE, "layering.py")
        with tempfile.TemporaryDirectory() as root:
            make_tree(root, CLEAN)
            r = subprocess.run([sys.executable, script, root], capture_output=True, text=True)
            self.assertEqual((r.returncode, r.stdout), (0, ""), r.stderr)
            make_tree(root, {"kvstore/kvstore.c": '#include "proto/wire.h"\n'})
            r = subprocess.run([sys.executable, script, root], capture_output=True, text=True)
            self.assertEqual(r.returncode, 1, r.stderr)
            self.assertIn("kvstore/kvstore.c:1: kvstore -> proto", r.stdout)


class RealTree(unittest.TestCase):
    """The repository itself: no edge goes up or sideways (violations are printed)."""

    def test_tree_only_reaches_down(self):
        self.assertTrue(os.path.isdir(os.path.join(REPO, "kvstore")), REPO)
        found = layering.check(REPO)
        for line in found:
            print("layering violation: " + line, file=sys.stderr)
        self.assertEqual(found, [], "\n".join(found))


if __name__ == "__main__":
    # The WORKSPACE file's runfiles link leads to the source tree itself.
    REPO = os.path.dirname(os.path.realpath(sys.argv[1]))
    sys.exit(0 if junit_main.run("layering").wasSuccessful() else 1)
