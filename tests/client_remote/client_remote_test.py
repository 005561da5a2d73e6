#!/usr/bin/python3
"""//client:kvdex_remote alone: what a program linked against it carries and does.

remote_probe (probe.c against //client:kvdex_remote) must link neither FAISS nor
OpenBLAS, OpenMP, jemalloc, the store or the index: checked in the built binary with
ldd (every shared library it loads), readelf (what it names itself) and nm (its
symbols). full_probe (the same source against //client:kvdex) must show them, which
proves the inspection finds what it looks for. Then the probes run: "local:" through
kvdex_remote is KVDEX_EUNIMPL naming the library to link, and a closed grpc:// port
(or a cluster of them) is KVDEX_EUNAVAIL at the first call, as kvdex.h documents.

Usage: client_remote_test.py REMOTE_PROBE FULL_PROBE. Writes $XML_OUTPUT_FILE.
"""
import os
import re
import socket
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "py"))
import junit_main  # noqa: E402  (tests/py: the shared runner that writes test.xml)

REMOTE = None
FULL = None

# Shared libraries (ldd, readelf NEEDED) a remote-only program must not load.
HEAVY_LIBS = {
    "OpenBLAS": re.compile(r"libopenblas|libblas|liblapack"),
    "OpenMP": re.compile(r"libgomp|libomp|libiomp"),
    "jemalloc": re.compile(r"libjemalloc"),
    "FAISS": re.compile(r"libfaiss"),
}
# Symbols (defined or referenced) that betray the same, or kvdex's store and index.
HEAVY_SYMBOLS = {
    "FAISS": re.compile(r"faiss", re.I),
    "jemalloc": re.compile(r"^(mallocx|rallocx|xallocx|sallocx|dallocx|sdallocx|nallocx|"
                           r"mallctl\w*|je_\w+)(@.*)?$"),
    "OpenBLAS": re.compile(r"^(cblas_\w+|[sdcz]gemm_?|openblas_\w+)(@.*)?$"),
    "OpenMP": re.compile(r"^(GOMP_\w+|omp_\w+|__kmpc_\w+)(@.*)?$"),
    "store": re.compile(r"^kvdex_(store|txn)_\w+$"),
    "index": re.compile(r"^kvdex_(index|indexer|pool|attend_ctx|retain_layer)\w*$"),
}


def run(*args):
    return subprocess.run(args, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60).stdout


def shared_libs(binary):
    """Every shared library the binary loads (ldd: its own and theirs)."""
    return [line.split()[0] for line in run("ldd", binary).splitlines() if line.strip()]


def needed(binary):
    """The shared libraries the binary names itself (its link line's -l's that stayed)."""
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", run("readelf", "-d", binary))


def symbols(binary):
    names = set()
    for flags in (["-a"], ["-D"]):
        out = subprocess.run(["nm"] + flags + [binary], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, universal_newlines=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if parts:
                names.add(parts[-1])
    return names


def found(binary):
    """{what: [evidence]} for every heavy library or module found in the binary."""
    hits = {}
    for lib in shared_libs(binary) + needed(binary):
        for what, rx in HEAVY_LIBS.items():
            if rx.search(lib):
                hits.setdefault(what, []).append(lib)
    for sym in symbols(binary):
        for what, rx in HEAVY_SYMBOLS.items():
            if rx.search(sym):
                hits.setdefault(what, []).append(sym)
    return hits


def probe(binary, *args):
    out = run(binary, *args).rstrip("\n")
    code, _, msg = out.partition("\t")
    return code, msg


def closed_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class LinkLine(unittest.TestCase):
    def test_remote_loads_no_heavy_library(self):
        libs = shared_libs(REMOTE)
        self.assertTrue(any("libgrpc" in l for l in libs), libs)  # ldd did read it
        bad = [l for l in libs for rx in HEAVY_LIBS.values() if rx.search(l)]
        self.assertEqual(bad, [], "remote_probe loads %s" % bad)

    def test_remote_names_no_heavy_library(self):
        libs = needed(REMOTE)
        self.assertTrue(any("libgrpc" in l for l in libs), libs)
        bad = [l for l in libs for rx in HEAVY_LIBS.values() if rx.search(l)]
        self.assertEqual(bad, [], "remote_probe's NEEDED has %s" % bad)

    def test_remote_has_no_heavy_symbols(self):
        syms = symbols(REMOTE)
        self.assertIn("kvdex_open", syms)  # nm did read it
        hits = {what: sorted(s for s in syms if rx.search(s))[:5]
                for what, rx in HEAVY_SYMBOLS.items()}
        self.assertEqual({k: v for k, v in hits.items() if v}, {},
                         "remote_probe carries symbols of these")

    def test_inspection_finds_them_in_the_full_client(self):
        """The same checks on //client:kvdex's program must fire, or they prove nothing."""
        hits = found(FULL)
        expect = {"FAISS", "OpenBLAS", "OpenMP", "store", "index"}
        asan = "__asan_init" in symbols(FULL)
        if not asan:  # --config=asan swaps jemalloc for malloc (kvstore/BUILD)
            expect.add("jemalloc")
        self.assertEqual(expect - set(hits), set(), "found only %s" % sorted(hits))
        self.assertEqual(found(REMOTE), {})


class Behaviour(unittest.TestCase):
    def test_local_through_remote_is_unimplemented(self):
        code, msg = probe(REMOTE, "local")
        self.assertEqual(code, "EUNIMPL", msg)
        self.assertIn("local:", msg)
        self.assertIn("link //client:kvdex instead of //client:kvdex_remote", msg)

    def test_local_works_in_the_full_client(self):
        self.assertEqual(probe(FULL, "local"), ("OK", ""))

    def test_closed_port_is_unavailable(self):
        addr = "127.0.0.1:%d" % closed_port()
        code, msg = probe(REMOTE, "grpc", addr)
        self.assertEqual(code, "EUNAVAIL", msg)
        self.assertIn("unavailable", msg)
        self.assertIn(addr, msg)

    def test_cluster_of_closed_ports_is_unavailable(self):
        uri = "127.0.0.1:%d,127.0.0.1:%d?replicas=2" % (closed_port(), closed_port())
        code, msg = probe(REMOTE, "grpc", uri)
        self.assertEqual(code, "EUNAVAIL", msg)
        self.assertIn("no node answered", msg)

    def test_bad_uri_is_still_rejected(self):
        code, msg = probe(REMOTE, "grpc", "no-port")
        self.assertEqual(code, "EINVAL", msg)
        self.assertIn("missing ':port'", msg)


if __name__ == "__main__":
    REMOTE, FULL = sys.argv[1], sys.argv[2]
    del sys.argv[1:]
    sys.exit(0 if junit_main.run("client_remote").wasSuccessful() else 1)
