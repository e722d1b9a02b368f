#!/usr/bin/env bash
# Runs the cluster suite (e2e/tests/cluster_operator.rs) against the
# development API server (scripts/dev-apiserver), building it first if
# needed. With KUBECONFIG already set, runs against that cluster instead.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -p weir-agent -p weir-operator
if [ -z "${KUBECONFIG:-}" ]; then
  H=target/dev-apiserver
  [ -x "$H/bin/weir-dev-apiserver" ] || scripts/dev-apiserver/setup.sh "$H"
  trap 'scripts/dev-apiserver/stop.sh "$H"' EXIT
  scripts/dev-apiserver/start.sh "$H"
  export KUBECONFIG=$PWD/$H/run/kubeconfig
fi
cargo test -p weir-e2e --test cluster_operator -- --nocapture "$@"
