#!/bin/sh
# Runs the CLI end-to-end test with Debian's Python; $1 is the kvdex binary.
exec /usr/bin/python3 tests/cli/cli_test.py "$@"
