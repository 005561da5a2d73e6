#!/bin/sh
# Runs the layering test with Debian's Python; $1 is the repository's WORKSPACE file.
exec /usr/bin/python3 tests/layering/layering_test.py "$@"
