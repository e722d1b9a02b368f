#!/usr/bin/env bash
# Runs every check Weir has, from a fresh clone on a Debian machine with the
# Rust toolchain (cargo, rustfmt, clippy, cargo-nextest) and python3:
#   formatting, lints, CRD drift, all Rust tests, and the Helm chart check
#   (rendered with default and CI values, validated against the Kubernetes
#   schemas). It installs what is missing (a Python venv in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "Python tools for the chart check (.venv)"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-ci.txt

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "CRD manifests match the Rust types"
cargo run --quiet --locked -p weir-crds --bin crdgen -- --check

step "Rust tests"
cargo nextest run --workspace --locked --no-fail-fast

step "Helm chart: lint, render, Kubernetes schema validation"
.venv/bin/python scripts/check_chart.py

step "all checks passed"
