#!/bin/sh
# Runs the gpu-worker end-to-end test with Debian's Python; $1 is the kvdex binary.
exec /usr/bin/python3 tests/gpu_worker/gpu_worker_cli_test.py "$@"
