#!/bin/sh
# Runs the metrics end-to-end test with Debian's Python (grpcio); $1 is the kvdex binary.
exec /usr/bin/python3 tests/metrics/metrics_test.py "$@"
