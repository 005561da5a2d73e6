#!/bin/sh
# Runs the local-cluster test with Debian's Python (grpcio); $1 deploy/local-cluster,
# $2 the kvdex binary.
exec /usr/bin/python3 tests/local_cluster/local_cluster_test.py "$@"
