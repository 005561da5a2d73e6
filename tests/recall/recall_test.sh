#!/bin/sh
# Runs the gen / bench recall end-to-end test with Debian's Python; $1 is the kvdex binary.
exec /usr/bin/python3 tests/recall/recall_test.py "$@"
