#!/bin/sh
# Runs the interop test with Debian's Python (the one that has grpcio); the
# arguments are the server command line.
exec /usr/bin/python3 tests/interop/interop_test.py "$@"
