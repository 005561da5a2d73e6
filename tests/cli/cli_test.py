"""End-to-end tests of the `kvdex` binary as a user runs it: --help everywhere,
clear errors for bad flags, docs/CLI.md in sync with the settings table, the demo
embedded and against a real `kvdex serve`, `inspect`, and a clean SIGTERM drain.
Usage: cli_test.py PATH_TO_KVDEX"""
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


def run(*args, timeout=120, env=None):
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
                return
        self.proc.kill()
        raise RuntimeError("server did not start: " + "".join(self.lines))

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        self.lines.append(err or "")
        return self.proc.returncode, "".join(self.lines)


class CliTest(unittest.TestCase):
    def test_help(self):
        r = run("--help")
        self.assertEqual(r.returncode, 0)
        for cmd in ("serve", "demo", "bench", "inspect"):
            self.assertIn(cmd, r.stdout)
        for cmd in (["serve"], ["demo"], ["bench", "scan"], ["inspect"], ["bench"]):
            r = run(*cmd, "--help")
            self.assertEqual(r.returncode, 0, cmd)
            self.assertIn("usage: kvdex", r.stdout)
        self.assertIn("--memory", run("serve", "--help").stdout)
        self.assertIn("KVDEX_TOKENS", run("demo", "--help").stdout)

    def test_bad_flags(self):
        cases = [
            (["frobnicate"], "unknown command"),
            (["demo", "--bogus"], "unknown option '--bogus'"),
            (["serve", "--memory", "12Q"], "is not a size"),
            (["demo", "--tokens", "0"], "out of range"),
            (["demo", "--dtype", "int4"], "not one of f32, f16, bf16"),
            (["demo", "--steps"], "needs a value"),
            (["demo", "--q-heads", "6", "--kv-heads", "4", "--tokens", "64"], "not a multiple"),
            (["inspect"], "needs a server"),
            (["bench", "nope"], "unknown benchmark"),
        ]
        for args, msg in cases:
            r = run(*args)
            self.assertEqual(r.returncode, 2, (args, r.stderr))
            self.assertIn(msg, r.stderr, args)

    def test_env_and_flag_precedence(self):
        env = dict(os.environ, KVDEX_TOKENS="notanumber")
        r = run("demo", env=env)
        self.assertEqual(r.returncode, 2)
        self.assertIn("KVDEX_TOKENS", r.stderr)

    def test_settings_table_matches_docs(self):
        docs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "CLI.md")
        table = run("settings").stdout
        with open(docs) as fh:
            text = fh.read()
        self.assertIn(table.strip(), text, "docs/CLI.md is out of date: regenerate it with "
                                           "`kvdex settings`")

    def test_demo_embedded(self):
        r = run("demo", "--tokens", "5000", "--steps", "12", "--k", "20", "--sinks", "4",
                "--window", "16", "--memory", "256M")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("all top-k lists match", r.stdout)
        self.assertIn("12 of 12 steps", r.stdout)
        for word in ("ingest:", "p50", "p99", "memory read bandwidth"):
            self.assertIn(word, r.stdout)

    def test_demo_json_bf16_multilayer(self):
        r = run("demo", "--tokens", "3000", "--layers", "3", "--steps", "6", "--dtype", "bf16",
                "--head-dim", "64", "--kv-heads", "2", "--q-heads", "8", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        import json
        j = json.loads(r.stdout)
        self.assertEqual(j["mismatches"], 0)
        self.assertEqual(j["heads_checked"], 6 * 8)
        self.assertGreater(j["ingest_gbps"], 0)

    def test_demo_memory_cap(self):
        r = run("demo", "--tokens", "100000", "--steps", "1", "--memory", "8M")
        self.assertEqual(r.returncode, 1)
        self.assertIn("memory cap", r.stderr)

    def test_demo_and_inspect_against_server(self):
        srv = Server("--memory", "512M", "--threads", "2")
        try:
            uri = f"grpc://127.0.0.1:{srv.port}"
            r = run("demo", "--uri", uri, "--tokens", "6000", "--steps", "10", "--k", "50")
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("all top-k lists match", r.stdout)
            r = run("inspect", "--uri", uri)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("0 sequence(s)", r.stdout)  # the demo cleaned up after itself
            r = run("inspect", "--uri", "grpc://127.0.0.1:1", "--timeout", "2000")
            self.assertEqual(r.returncode, 1)
            self.assertIn("UNAVAILABLE", r.stderr.upper())
        finally:
            rc, log = srv.stop()
        self.assertEqual(rc, 0, log)
        self.assertIn("stopped cleanly", log)

    def test_second_server_on_same_port_fails(self):
        srv = Server()
        try:
            r = subprocess.run([KVDEX, "serve", "--listen", f"127.0.0.1:{srv.port}"],
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(r.returncode, 1)
            self.assertIn("cannot serve", r.stderr)
        finally:
            rc, log = srv.stop()
        self.assertEqual(rc, 0, log)


if __name__ == "__main__":
    KVDEX = os.path.abspath(sys.argv[1])
    result = junit_main.run("cli")
    sys.exit(0 if result.wasSuccessful() else 1)
