#!/usr/bin/env bash
# Runs the cluster suite (e2e/tests/cluster_operator.rs, cluster_nodes.rs,
# cluster_moves.rs and cluster_scale_zero.rs) against the development API server
# (scripts/dev-apiserver), building it first if needed, in
# $CARGO_TARGET_DIR/dev-apiserver (target/dev-apiserver without one). With
# KUBECONFIG already set, runs against that cluster instead.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -p weir-agent -p weir-operator
if [ -z "${KUBECONFIG:-}" ]; then
  H=${CARGO_TARGET_DIR:-target}/dev-apiserver
  [ -x "$H/bin/weir-dev-apiserver" ] || scripts/dev-apiserver/setup.sh "$H"
  trap 'scripts/dev-apiserver/stop.sh "$H"' EXIT
  scripts/dev-apiserver/start.sh "$H"
  export KUBECONFIG=$(realpath "$H")/run/kubeconfig
fi
cargo test --no-fail-fast -p weir-e2e --test cluster_operator --test cluster_nodes --test cluster_moves --test cluster_scale_zero -- --nocapture "$@"
