#!/usr/bin/env bash
# Step functions are called through run_step, which shellcheck cannot follow.
# shellcheck disable=SC2317
# The GPU-machine check of Weir's CUDA backend: run from the repository root
# on the GPU machine, with gpu-carry/ built by scripts/gpu-prepare.sh. That
# machine has the NVIDIA driver, the CUDA toolkit and Python with torch and
# transformers, but no Rust and no network. See scripts/gpu/README.md.
#
# Steps (each timed, PASS/FAIL/SKIP with a reason; a failure does not stop
# the others):
#   a  environment: nvidia-smi, cuda_check info
#   b  CUDA-vs-CPU parity tests on the tiny fixtures
#   c  the same tests under compute-sanitizer memcheck
#   d  parity with transformers on a random Llama-3.2-1B-shaped model
#   e  benchmarks: Weir (1B and 8B shapes), PyTorch CUDA-graph step, transformers eager
#   f  weir-agent serving the OpenAI API from the GPU
# Prints one report at the end; with $OUT set, writes $OUT/gpu-report.json,
# $OUT/gpu-report.txt and $OUT/logs/. Exits non-zero if any step failed.
#
# WEIR_GPU_BUDGET_S: wall-time budget for all steps (default 285 s: the
#   whole run must stay under 5 minutes). A step gets at most what is left.
# WEIR_GPU_SKIP: step ids to skip, comma-separated (e.g. "c,e4").
# WEIR_GPU_KEEP=1: keep the work folder (the 2.5 GB random model) at the end.
# WEIR_GPU_STRICT_TARGETS=1: performance targets not met count as failures.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/gpu-carry/bin
BENCH=$ROOT/gpu-carry/bench
REPORT=$ROOT/scripts/gpu/report.py
BUDGET=${WEIR_GPU_BUDGET_S:-285}
SKIP_IDS=",${WEIR_GPU_SKIP:-},"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
WORK=$(mktemp -d /tmp/weir-gpu.XXXXXX)
LOGS=$WORK/logs
STEPS=$WORK/steps
mkdir -p "$LOGS" "$STEPS" "$WORK/torch"
# The served model name is this folder's base name.
MODEL_DIR=$WORK/weir-random-llama-3.2-1b
PORT=18080
AGENT_PID=""
MEMCHECK_PID=""

export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
export PATH=$PATH:/usr/local/cuda/bin
# The CUDA tests find their fixtures through this.
export WEIR_ENGINE_DIR=$ROOT/agent/engine
# Plain logs (tracing colours field names, which would hide `backend=cuda`),
# and Python output that reaches the log even when a step is killed.
export NO_COLOR=1
export PYTHONUNBUFFERED=1

now() { date +%s.%N; }

oneline() { printf '%s' "$1" | tr '\t\n\r' '   ' | cut -c1-400; }

# record ID TITLE STATUS SECONDS REASON: one TSV line per step, for report.py.
record() {
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$(oneline "$5")" >"$STEPS/$1.tsv"
}

# Runs the command under the step's time limit, output into the step log.
limited() { timeout --kill-after=10 "$STEP_TIMEOUT" "$@" >>"$STEP_LOG" 2>&1; }

# The same, with stdout into file $1 as well (and stderr into the step log).
limited_to() {
    local file=$1 rc=0
    shift
    timeout --kill-after=10 "$STEP_TIMEOUT" "$@" >"$file" 2>>"$STEP_LOG" || rc=$?
    cat "$file" >>"$STEP_LOG"
    return "$rc"
}

why() {
    if [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; then
        echo "timed out after ${STEP_TIMEOUT}s"
    else
        echo "exit status $1"
    fi
}

# need FILE: a SKIP unless gpu-carry has it (step a already fails then).
need() {
    if [ -x "$BIN/$1" ]; then return 0; fi
    STEP_STATUS=SKIP
    STEP_REASON="gpu-carry/bin/$1 missing (run scripts/gpu-prepare.sh, carry gpu-carry)"
    return 1
}

# run_step ID TITLE MAX_SECONDS FUNCTION: the function sets STEP_STATUS and
# STEP_REASON; errexit is off inside it (it runs under ||), so a failing
# command is a recorded failure, never the end of the run.
run_step() {
    local id=$1 title=$2 max=$3 fn=$4 left t0 rc=0
    left=$((DEADLINE - $(date +%s)))
    if [[ $SKIP_IDS == *",$id,"* ]]; then
        record "$id" "$title" SKIP 0 "skipped by WEIR_GPU_SKIP"
        return 0
    fi
    if [ "$left" -lt 15 ]; then
        record "$id" "$title" SKIP 0 "no time left in the ${BUDGET}s budget"
        return 0
    fi
    STEP_TIMEOUT=$((max < left ? max : left))
    STEP_STATUS=FAIL
    STEP_REASON="the step did not report"
    STEP_LOG=$LOGS/$id.log
    : >"$STEP_LOG"
    printf '\n==> %s: %s (limit %ss)\n' "$id" "$title" "$STEP_TIMEOUT"
    t0=$(now)
    "$fn" || rc=$?
    if [ "$rc" -ne 0 ]; then
        STEP_STATUS=FAIL
        STEP_REASON="the step itself failed (status $rc): $STEP_REASON"
    fi
    record "$id" "$title" "$STEP_STATUS" "$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')" "$STEP_REASON"
    printf '    %s %s: %s\n' "$id" "$STEP_STATUS" "$STEP_REASON"
}

# --- a: environment ---------------------------------------------------------

step_env() {
    local missing="" f rc=0
    for f in weir-agent cuda_check cuda-tests; do
        [ -x "$BIN/$f" ] || missing="$missing gpu-carry/bin/$f"
    done
    for f in hf_baseline.py torch_graph_decode.py; do
        [ -f "$BENCH/$f" ] || missing="$missing gpu-carry/bench/$f"
    done
    limited_to "$WORK/nvidia-smi.csv" nvidia-smi \
        --query-gpu=name,memory.total,driver_version,compute_mode --format=csv || rc=$?
    if [ "$rc" -ne 0 ]; then
        STEP_REASON="nvidia-smi: $(why "$rc")"
        return 0
    fi
    local gpu
    gpu=$(sed -n 2p "$WORK/nvidia-smi.csv")
    if [ -n "$missing" ]; then
        STEP_REASON="missing:$missing (run scripts/gpu-prepare.sh, carry gpu-carry); GPU: $gpu"
        return 0
    fi
    limited_to "$WORK/cuda_info.out" "$BIN/cuda_check" info || rc=$?
    if [ "$rc" -ne 0 ]; then
        STEP_REASON="cuda_check info: $(why "$rc"); GPU: $gpu"
        return 0
    fi
    if ! python3 "$REPORT" lastjson "$WORK/cuda_info.out" >"$WORK/cuda_info.json"; then
        STEP_REASON="cuda_check info printed no JSON line; GPU: $gpu"
        return 0
    fi
    STEP_STATUS=PASS
    STEP_REASON="$gpu; cuda_check: $(cat "$WORK/cuda_info.json")"
}

# --- b: parity tests ---------------------------------------------------------

# test_summary LOG: libtest's last "test result:" line.
test_summary() { grep -E '^test result:' "$1" | tail -n 1 || true; }

step_parity() {
    need cuda-tests || return 0
    local rc=0 summary passed skipped
    # --nocapture: libtest hides what passing tests print, and a test that
    # found no GPU passes after printing "skipped: <reason>".
    limited "$BIN/cuda-tests" --test-threads=1 --nocapture || rc=$?
    summary=$(test_summary "$STEP_LOG")
    passed=$(printf '%s' "$summary" | sed -n 's/.* \([0-9][0-9]*\) passed.*/\1/p')
    skipped=$(grep -i -m 1 'skipped' "$STEP_LOG" || true)
    if [ -n "$skipped" ]; then
        STEP_REASON="a CUDA test was skipped on the GPU machine: $skipped"
    elif [ "$rc" -ne 0 ]; then
        STEP_REASON="$(why "$rc"); ${summary:-no test result line}"
    elif [ "${passed:-0}" -eq 0 ]; then
        STEP_REASON="no test ran: ${summary:-no test result line}"
    else
        STEP_STATUS=PASS
        STEP_REASON=$summary
    fi
}

# --- c: memcheck ---------------------------------------------------------------

step_memcheck() {
    need cuda-tests || return 0
    local san rc=0 summary errors
    san=$(command -v compute-sanitizer || true)
    if [ -z "$san" ]; then
        STEP_REASON="compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
        return 0
    fi
    limited "$san" --tool memcheck --error-exitcode 1 "$BIN/cuda-tests" --test-threads=1 || rc=$?
    summary=$(grep -E 'ERROR SUMMARY: [0-9]+ error' "$STEP_LOG" | tail -n 1 | sed 's/^=* *//' || true)
    errors=$(printf '%s' "$summary" | sed -n 's/.*ERROR SUMMARY: \([0-9][0-9]*\) error.*/\1/p')
    if [ -z "$summary" ]; then
        STEP_REASON="$(why "$rc"); no ERROR SUMMARY line; $(test_summary "$STEP_LOG")"
    elif [ "$rc" -eq 0 ] && [ "${errors:-1}" -eq 0 ]; then
        STEP_STATUS=PASS
        STEP_REASON="$summary; $(test_summary "$STEP_LOG")"
    else
        STEP_REASON="$summary ($(why "$rc")); $(test_summary "$STEP_LOG")"
    fi
}

# --- d: parity with transformers ----------------------------------------------

step_hf_parity() {
    need cuda_check || return 0
    local rc=0 result
    limited python3 scripts/gpu/hf_parity.py \
        --model-dir "$MODEL_DIR" \
        --tokenizer-from "$ROOT/agent/engine/tests/fixtures/tiny-llama" \
        --cuda-check "$BIN/cuda_check" \
        --work "$WORK" \
        --out "$WORK/hf_parity.json" \
        --deadline "$(($(date +%s) + STEP_TIMEOUT - 5))" || rc=$?
    result=$(sed -n 's/^RESULT: [A-Z]* //p' "$STEP_LOG" | tail -n 1)
    if [ "$rc" -eq 0 ]; then
        STEP_STATUS=PASS
    fi
    STEP_REASON=${result:-$(why "$rc")}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        STEP_REASON="$(why "$rc"); ${result}"
    fi
}

# --- e: benchmarks ---------------------------------------------------------------

bench_weir() {
    local shape=$1 rc=0
    need cuda_check || return 0
    limited_to "$WORK/bench_weir_$shape.out" "$BIN/cuda_check" bench --shape "$shape" || rc=$?
    if [ "$rc" -ne 0 ]; then
        STEP_REASON="cuda_check bench: $(why "$rc")"
        return 0
    fi
    if ! python3 "$REPORT" lastjson "$WORK/bench_weir_$shape.out" shape copy_bw_GBps \
        gemm_bf16_tflops weight_bytes decode_tok_s prefill_tok_s >"$WORK/bench_weir_$shape.json"; then
        rm -f "$WORK/bench_weir_$shape.json"
        STEP_REASON="cuda_check bench printed no JSON line with all the keys"
        return 0
    fi
    STEP_STATUS=PASS
    STEP_REASON=$(cat "$WORK/bench_weir_$shape.json")
}
step_bench_weir_1b() { bench_weir llama3.2-1b; }
step_bench_weir_8b() { bench_weir llama3-8b; }

# bench_torch SCRIPT: the shared anchors write SCRIPT's name .json into $OUT.
bench_torch() {
    local name=$1 rc=0
    if [ ! -f "$BENCH/$name.py" ]; then
        STEP_STATUS=SKIP
        STEP_REASON="gpu-carry/bench/$name.py missing (run scripts/gpu-prepare.sh, carry gpu-carry)"
        return 0
    fi
    OUT=$WORK/torch limited python3 "$BENCH/$name.py" || rc=$?
    if [ "$rc" -eq 0 ] && [ -f "$WORK/torch/$name.json" ]; then
        STEP_STATUS=PASS
        STEP_REASON="wrote $name.json"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        STEP_REASON="$(why "$rc") (too slow for the budget; the report uses the shapes it finished)"
    else
        STEP_REASON="$name.py: $(why "$rc"); $(tail -n 1 "$STEP_LOG")"
    fi
}
step_torch_graph() { bench_torch torch_graph_decode; }
step_hf_eager() { bench_torch hf_baseline; }

# --- f: the agent ------------------------------------------------------------------

start_agent() {
    RUST_LOG=${RUST_LOG:-info} "$BIN/weir-agent" serve --model "$MODEL_DIR" "$@" \
        >"$LOGS/agent.log" 2>&1 &
    AGENT_PID=$!
}

stop_agent() {
    if [ -z "$AGENT_PID" ]; then return 0; fi
    if kill -0 "$AGENT_PID" 2>/dev/null; then
        kill -TERM "$AGENT_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$AGENT_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$AGENT_PID" 2>/dev/null || true
    fi
    wait "$AGENT_PID" 2>/dev/null || true
    AGENT_PID=""
}

agent_check() {
    local wait_s=$((STEP_TIMEOUT - 25))
    [ "$wait_s" -le 120 ] || wait_s=120
    limited python3 scripts/gpu/agent_check.py \
        --url "http://127.0.0.1:$PORT" \
        --model "$(basename "$MODEL_DIR")" \
        --pid "$AGENT_PID" \
        --log "$LOGS/agent.log" \
        --wait "$wait_s" \
        --out "$WORK/agent.json"
}

step_agent() {
    need weir-agent || return 0
    if [ ! -f "$MODEL_DIR/config.json" ] || [ ! -f "$MODEL_DIR/tokenizer.json" ]; then
        STEP_STATUS=SKIP
        STEP_REASON="no model folder: step d did not write $MODEL_DIR"
        return 0
    fi
    local rc=0 note="" result
    start_agent --host 127.0.0.1 --port "$PORT"
    agent_check || rc=$?
    # Status 3: the agent exited before answering. The CLI before the CUDA
    # work had --listen ADDR instead of --host/--port.
    if [ "$rc" -eq 3 ] && grep -q "unexpected argument '--host'" "$LOGS/agent.log"; then
        stop_agent
        mv "$LOGS/agent.log" "$LOGS/agent-host-port-refused.log"
        note=" (--host/--port refused: used --listen 127.0.0.1:$PORT)"
        start_agent --listen "127.0.0.1:$PORT"
        rc=0
        agent_check || rc=$?
    fi
    stop_agent
    result=$(sed -n 's/^RESULT: [A-Z]* //p' "$STEP_LOG" | tail -n 1)
    if [ "$rc" -eq 0 ]; then
        STEP_STATUS=PASS
    fi
    STEP_REASON="${result:-$(why "$rc")}$note"
}

cleanup() {
    stop_agent
    if [ -n "$MEMCHECK_PID" ]; then
        kill "$MEMCHECK_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the run ---------------------------------------------------------------------

echo "Weir GPU check: work folder $WORK, budget ${BUDGET}s"
run_step a "environment" 30 step_env
run_step b "CUDA vs CPU parity tests (tiny fixtures)" 90 step_parity

# memcheck runs beside the correctness steps d and f (timing does not
# matter there), and is waited for before any benchmark; only when the GPU
# lets several processes share it.
if grep -qi 'default' "$WORK/nvidia-smi.csv" 2>/dev/null; then
    run_step c "compute-sanitizer memcheck of the parity tests" 120 step_memcheck &
    MEMCHECK_PID=$!
else
    run_step c "compute-sanitizer memcheck of the parity tests" 90 step_memcheck
fi
run_step d "parity with transformers (random Llama-3.2-1B shape)" 100 step_hf_parity
run_step f "weir-agent serving the OpenAI API" 90 step_agent
if [ -n "$MEMCHECK_PID" ]; then
    wait "$MEMCHECK_PID" || true
    MEMCHECK_PID=""
fi

run_step e1 "bench: Weir, llama3.2-1b shape" 45 step_bench_weir_1b
run_step e2 "bench: Weir, llama3-8b shape" 75 step_bench_weir_8b
run_step e3 "bench: PyTorch CUDA-graph decode step" 90 step_torch_graph
run_step e4 "bench: transformers eager generate" 90 step_hf_eager

# --- the report --------------------------------------------------------------------

elapsed=$(($(date +%s) - START))
report_rc=0
strict=()
if [ "${WEIR_GPU_STRICT_TARGETS:-0}" = 1 ]; then strict=(--strict-targets); fi
python3 "$REPORT" build --work "$WORK" --elapsed "$elapsed" --budget "$BUDGET" \
    --text "$WORK/gpu-report.txt" --json "$WORK/gpu-report.json" "${strict[@]}" || report_rc=$?
echo
if [ -f "$WORK/gpu-report.txt" ]; then
    cat "$WORK/gpu-report.txt"
else
    # report.py itself broke: the step records are still worth showing.
    echo "report.py failed (status $report_rc); step records:"
    cat "$STEPS"/*.tsv
fi

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/logs" "$OUT/data"
    cp "$LOGS"/* "$OUT/logs/" 2>/dev/null || true
    for f in "$WORK"/*.json "$WORK"/*.csv "$WORK"/torch/*.json "$STEPS"/*.tsv; do
        case $f in */gpu-report.json | *\**) ;; *) cp "$f" "$OUT/data/" ;; esac
    done
    for f in gpu-report.json gpu-report.txt; do
        if [ -f "$WORK/$f" ]; then cp "$WORK/$f" "$OUT/"; fi
    done
fi
# Failed steps decide, even if report.py broke.
status=0
if grep -q $'\tFAIL\t' "$STEPS"/*.tsv 2>/dev/null || [ "$report_rc" -ne 0 ]; then
    status=1
fi
if [ "${WEIR_GPU_KEEP:-0}" = 1 ]; then
    echo "work folder kept: $WORK"
else
    rm -rf "$WORK"
fi
exit "$status"
