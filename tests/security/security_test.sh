#!/bin/sh
# Runs the security test with Debian's Python (grpcio); $1 is the kvdex binary.
# Needs the openssl CLI (.ci/install: `openssl`).
exec /usr/bin/python3 tests/security/security_test.py "$@"
