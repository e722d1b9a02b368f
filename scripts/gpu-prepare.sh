#!/usr/bin/env bash
# Builds, on the CPU development machine, everything the GPU check needs and
# puts it into gpu-carry/ (ignored by git): the GPU machine has no Rust and
# no network, so it only runs what is carried there. See scripts/gpu/README.md.
#
#   scripts/gpu-prepare.sh      then carry ["gpu-carry"] and run scripts/gpu-check.sh
#
# WEIR_SHARED_BENCH: the folder holding hf_baseline.py and
# torch_graph_decode.py (default: ../shared/bench beside the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
carry=gpu-carry
bench_src=${WEIR_SHARED_BENCH:-$root/../shared/bench}
# The device tool carries at most 64 MiB in all.
limit=$((64 * 1024 * 1024))

step() { printf '\n==> %s\n' "$*"; }

# Prints the executable of the artifact whose target is named $1 and whose
# kinds include $2, read from cargo's JSON messages on stdin.
artifact() {
    python3 -c '
import json, sys
name, kind = sys.argv[1], sys.argv[2]
exe = None
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        continue
    msg = json.loads(line)
    t = msg.get("target") or {}
    if msg.get("reason") == "compiler-artifact" and t.get("name") == name \
            and kind in t.get("kind", []) and msg.get("executable"):
        exe = msg["executable"]
if not exe:
    sys.exit(f"no {kind} artifact named {name} in the cargo output")
print(exe)
' "$1" "$2"
}

for f in hf_baseline.py torch_graph_decode.py; do
    if [ ! -f "$bench_src/$f" ]; then
        echo "missing $bench_src/$f (set WEIR_SHARED_BENCH to the folder that has it)" >&2
        exit 1
    fi
done

rm -rf "$carry"
mkdir -p "$carry/bin" "$carry/bench"

# json-render-diagnostics: artifacts as JSON on stdout, warnings and errors
# rendered for people on stderr.
step "cargo build --release -p weir-agent"
exe=$(cargo build --release --locked -p weir-agent --message-format=json-render-diagnostics |
    artifact weir-agent bin)
cp "$exe" "$carry/bin/weir-agent"

step "cargo build --release -p weir-engine --example cuda_check"
exe=$(cargo build --release --locked -p weir-engine --example cuda_check \
    --message-format=json-render-diagnostics | artifact cuda_check example)
cp "$exe" "$carry/bin/cuda_check"

step "cargo test --release -p weir-engine --test cuda --no-run"
exe=$(cargo test --release --locked -p weir-engine --test cuda --no-run \
    --message-format=json-render-diagnostics | artifact cuda test)
cp "$exe" "$carry/bin/cuda-tests"

step "bench scripts from $bench_src"
cp "$bench_src/hf_baseline.py" "$bench_src/torch_graph_decode.py" "$carry/bench/"

step "strip"
if command -v strip >/dev/null 2>&1; then
    strip "$carry"/bin/*
else
    echo "strip not found: binaries carried with symbols (may pass the 64 MiB limit)" >&2
fi
chmod +x "$carry"/bin/*

if ! git check-ignore -q "$carry/bin/weir-agent"; then
    echo "warning: $carry/ is not ignored by git (.gitignore should list /gpu-carry)" >&2
fi

step "contents"
ls -l "$carry/bin" "$carry/bench"
bytes=$(du -sb "$carry" | cut -f1)
printf 'total: %s bytes (%.1f MiB; the device tool carries at most 64 MiB)\n' \
    "$bytes" "$(echo "$bytes" | awk '{print $1 / 1048576}')"
if [ "$bytes" -gt "$limit" ]; then
    echo "error: $carry/ is over 64 MiB" >&2
    exit 1
fi

cat <<'EOF'

Ready. Run on the GPU machine through the device tool with:
  carry:     ["gpu-carry"]
  command:   bash scripts/gpu-check.sh
  timeout_s: 330   (the check keeps itself under 5 minutes)
EOF
