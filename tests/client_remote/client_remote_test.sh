#!/bin/sh
# Runs the remote-client test with Debian's Python; $1 remote_probe, $2 full_probe.
# Needs ldd, readelf and nm (binutils).
exec /usr/bin/python3 tests/client_remote/client_remote_test.py "$@"
