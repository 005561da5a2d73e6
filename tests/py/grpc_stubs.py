"""The Python stubs generated from proto/ (//proto:kvdex_py) for the tests that speak
gRPC, found in the runfiles (bazel test) or in bazel-bin (run by hand):

    from grpc_stubs import health_pb2, kvdex_pb2, kvdex_pb2_grpc
"""
import importlib.util
import os
import sys


def _stub_dir():
    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir)
    candidates = []
    for env in ("TEST_SRCDIR", "RUNFILES_DIR"):
        if os.environ.get(env):
            ws = os.environ.get("TEST_WORKSPACE", "kvdex")
            candidates.append(os.path.join(os.environ[env], ws, "proto", "py"))
    candidates += [
        os.path.join(os.getcwd(), "proto", "py"),
        os.path.join(repo, "proto", "py"),
        os.path.join(repo, "bazel-bin", "proto", "py"),
    ]
    for c in candidates:
        if os.path.exists(os.path.join(c, "kvdex", "v1", "kvdex_pb2.py")):
            return c
    raise RuntimeError("generated stubs not found in %s" % candidates)


STUBS = _stub_dir()
sys.path.insert(0, STUBS)
from kvdex.v1 import kvdex_pb2, kvdex_pb2_grpc  # noqa: E402,F401

# health_pb2 lives under a `grpc/` folder that the real grpc package shadows: load it by
# path (it imports only google.protobuf).
_spec = importlib.util.spec_from_file_location(
    "kvdex_health_pb2", os.path.join(STUBS, "grpc", "health", "v1", "health_pb2.py"))
health_pb2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(health_pb2)
