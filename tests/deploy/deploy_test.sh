#!/bin/sh
# Runs the deployment checks with Debian's Python (python3-yaml); $1 docs/CLI.md,
# $2 deploy/k8s/kustomization.yaml, $3 deploy/Dockerfile.
exec /usr/bin/python3 tests/deploy/deploy_test.py "$@"
