#!/usr/bin/env python3
"""The report of scripts/gpu-check.sh, from what its steps left in the work
folder (standard library only).

  report.py lastjson FILE [KEY...]   print FILE's last JSON-object line that has every KEY
  report.py build --work DIR --elapsed S --budget S --text FILE --json FILE [--strict-targets]

The work folder holds steps/<id>.tsv (id, title, status, seconds, reason:
one per step, written by the shell), nvidia-smi.csv, cuda_info.json,
hf_parity.json, bench_weir_<shape>.json, torch/torch_graph_decode.json,
torch/hf_baseline.json, agent.json and logs/. Anything missing shows as n/a.
`build` exits 1 when a step failed (or, with --strict-targets, when a
performance target is not met).
"""
import argparse
import ast
import csv
import glob
import json
import os
import re
import sys
import textwrap

SHAPES = ("llama3.2-1b", "llama3-8b")
BATCHES = (1, 32, 128)
WIDTH = 100


def last_json(path, keys=()):
    found = None
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and all(k in obj for k in keys):
                found = obj
    return found


def cmd_lastjson(args):
    obj = last_json(args.file, args.keys)
    if obj is None:
        print(f"{args.file}: no JSON line with {args.keys}", file=sys.stderr)
        return 1
    print(json.dumps(obj, separators=(",", ":")))
    return 0


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_steps(work):
    steps = []
    for path in sorted(glob.glob(os.path.join(work, "steps", "*.tsv"))):
        with open(path, errors="replace") as f:
            parts = f.read().rstrip("\n").split("\t")
        parts += [""] * (5 - len(parts))
        sid, title, status, secs, reason = parts[:5]
        try:
            secs = float(secs)
        except ValueError:
            secs = None
        steps.append(dict(id=sid, title=title, status=status, seconds=secs, reason=reason))
    return steps


def salvage(log):
    """Per-shape results from the `shape {dict}` lines the shared anchors
    print as they go: what a run cut short still measured."""
    out = {}
    try:
        with open(log, errors="replace") as f:
            for line in f:
                m = re.match(r"^(\S+) (\{.*\})\s*$", line)
                if m and m.group(1) in SHAPES:
                    try:
                        out[m.group(1)] = ast.literal_eval(m.group(2))
                    except (ValueError, SyntaxError):
                        pass
    except OSError:
        pass
    return out


def num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def ratio(a, b):
    a, b = num(a), num(b)
    return a / b if a is not None and b else None


def fmt(x, spec=",.1f", unit=""):
    x = num(x)
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def bench(work):
    graph_all = load(os.path.join(work, "torch", "torch_graph_decode.json"))
    graph_src = "torch_graph_decode.json"
    if graph_all is None:
        graph_all, graph_src = salvage(os.path.join(work, "logs", "e3.log")), "e3 log (partial)"
    hf_all = load(os.path.join(work, "torch", "hf_baseline.json"))
    hf_src = "hf_baseline.json"
    if hf_all is None:
        hf_all, hf_src = salvage(os.path.join(work, "logs", "e4.log")), "e4 log (partial)"
    hf_copy = num(hf_all.get("copy_bw_GBps"))
    shapes, targets = {}, []
    for shape in SHAPES:
        weir = load(os.path.join(work, f"bench_weir_{shape}.json")) or {}
        graph = graph_all.get(shape) or {}
        eager = hf_all.get(shape) or {}
        dec = weir.get("decode_tok_s") or {}
        s = {"weir": weir or None, "torch_graph": graph or None, "hf_eager": eager or None}
        rows = {}
        for b in BATCHES:
            w = num(dec.get(str(b)))
            g = num(graph.get(f"graph_tok_s_b{b}"))
            e = num(eager.get(f"hf_eager_tok_s_b{b}"))
            rows[str(b)] = dict(weir=w, torch_graph=g, hf_eager=e,
                                weir_over_graph=ratio(w, g), weir_over_eager=ratio(w, e))
        s["decode"] = rows
        wb = num(weir.get("weight_bytes"))
        copy = num(weir.get("copy_bw_GBps"))
        b1 = rows["1"]["weir"]
        achieved = wb * b1 / 1e9 if wb and b1 else None
        g_ach = num(graph.get("achieved_GBps_b1"))
        copy_hf = hf_copy
        if copy_hf is None and num(eager.get("roofline_tok_s_batch1")) and num(eager.get("weight_GB")):
            copy_hf = eager["roofline_tok_s_batch1"] * eager["weight_GB"]  # derived from the roofline
        s["bandwidth_b1"] = dict(
            convention="copy bandwidth counts bytes read + bytes written (as hf_baseline's "
                       "copy_bw_GBps); decode reads each weight byte once per step",
            weir_achieved_GBps=achieved, weir_copy_bw_GBps=copy,
            weir_utilisation=ratio(achieved, copy),
            torch_graph_achieved_GBps=g_ach, torch_graph_utilisation=ratio(g_ach, copy),
            hf_copy_bw_GBps=copy_hf)
        pre = num(weir.get("prefill_tok_s"))
        gemm = num(weir.get("gemm_bf16_tflops"))
        # 2 x params x tokens, params ~ weight_bytes / 2 (bf16): attention
        # and an untied embedding table are not counted exactly.
        tflops = wb * pre / 1e12 if wb and pre else None
        s["prefill"] = dict(tok_s=pre, tflops=tflops, gemm_bf16_tflops=gemm,
                            fraction_of_gemm=ratio(tflops, gemm))
        shapes[shape] = s

        def target(name, value, limit, unit="x", why=None):
            if value is None:
                status = "not measured"
            else:
                status = "met" if value >= limit else "not met"
            targets.append(dict(shape=shape, target=name, value=value, limit=limit, unit=unit,
                                status=status, note=why))

        def missing(b, other, label):
            r = rows[b]
            gone = [n for n, v in (("Weir", r["weir"]), (label, r[other])) if v is None]
            return "no figure from " + " and ".join(gone) if gone else None

        target("batch-1 decode >= torch CUDA-graph step", rows["1"]["weir_over_graph"], 1.0,
               why=missing("1", "torch_graph", "torch_graph_decode"))
        for b in ("32", "128"):
            target(f"batch-{b} decode >= 0.9x torch CUDA-graph step", rows[b]["weir_over_graph"], 0.9,
                   why=missing(b, "torch_graph", "torch_graph_decode"))
            target(f"batch-{b} decode >= 10x transformers eager", rows[b]["weir_over_eager"], 10.0,
                   why="hf_baseline measures eager at batch 1 and 32 only" if b == "128"
                   else missing(b, "hf_eager", "hf_baseline"))
        target("prefill >= 40 % of the measured bf16 GEMM rate", s["prefill"]["fraction_of_gemm"], 0.4,
               unit="%", why=None if s["prefill"]["fraction_of_gemm"] is not None
               else "no prefill or GEMM figure from cuda_check")
    return dict(shapes=shapes, torch_graph_source=graph_src, hf_eager_source=hf_src,
                hf_copy_bw_GBps=hf_copy), targets


def gpu_info(work):
    try:
        with open(os.path.join(work, "nvidia-smi.csv")) as f:
            rows = list(csv.reader(f, skipinitialspace=True))
        return dict(zip(rows[0], rows[1])) if len(rows) >= 2 else None
    except OSError:
        return None


def wrap(text, indent):
    return textwrap.wrap(text, WIDTH - indent, break_on_hyphens=False) or [""]


def add_wrapped(add, text, first="  ", rest="    "):
    for i, line in enumerate(wrap(text, len(rest))):
        add((first if i == 0 else rest) + line)


def render(rep):
    out = []
    add = out.append
    add(f"Weir GPU check: {rep['overall']} ({rep['elapsed_s']} s of a {rep['budget_s']} s budget)")
    if rep["gpu"]:
        add("GPU: " + ", ".join(f"{k} {v}" for k, v in rep["gpu"].items()))
    if rep["cuda_info"]:
        add("cuda_check info: " + json.dumps(rep["cuda_info"], separators=(",", ":")))
    add("")
    add(f"{'step':5} {'check':52} {'status':6} {'time':>7}")
    for s in rep["steps"]:
        secs = "" if s["seconds"] is None else f"{s['seconds']:.1f}s"
        add(f"{s['id']:5} {s['title'][:52]:52} {s['status']:6} {secs:>7}")
        for line in wrap(s["reason"], 8):
            add("      " + line)

    hp = rep["hf_parity"]
    if hp:
        f = hp.get("figures", {})
        add("")
        add("Parity with transformers (random Llama-3.2-1B shape, 32-token prompt, bf16): "
            + ("PASS" if hp.get("pass") else "FAIL"))
        if "max_abs" in f:
            add(f"  max |d| {f['max_abs']:.4g} = {f['max_rel_std']:.3f} std (limit {f['max_abs_limit']:.4g});"
                f" mean |d| {f['mean_abs']:.4g} = {f['mean_rel_std']:.4f} std (limit {f['mean_abs_limit']:.4g});"
                f" std {f['hf_std']:.4g}")
            add(f"  transformers bf16 vs f32: max {f['hf_bf16_vs_f32_max_abs']:.4g}, mean "
                f"{f['hf_bf16_vs_f32_mean_abs']:.4g}; Weir vs f32: max {f['weir_vs_f32_max_abs']:.4g}, "
                f"mean {f['weir_vs_f32_mean_abs']:.4g}")
        if "top1" in f:
            add(f"  top-1 agreement {f['top1']:.3f} counting near ties (strict {f['top1_strict']:.3f};"
                f" transformers bf16 vs f32 {f['top1_hf_bf16_vs_f32']:.3f})")
        if "greedy_first_divergence" in f:
            d = f["greedy_first_divergence"]
            if d is None:
                add(f"  greedy: identical over {len(f.get('weir_greedy') or [])} tokens")
            else:
                tie = "a near tie" if f.get("greedy_divergence_near_tie") else "not a near tie"
                add(f"  greedy: first divergence at step {d} ({tie}; transformers' gap "
                    f"{f.get('greedy_divergence_hf_gap', float('nan')):.4g})")
        for line in hp.get("failures", []):
            for i, w in enumerate(wrap(line, 10)):
                add(("  failed: " if i == 0 else "          ") + w)

    b = rep["bench"]
    for shape, s in b["shapes"].items():
        weir = s["weir"] or {}
        gb = num(weir.get("weight_bytes"))
        add("")
        if not (s["weir"] or s["torch_graph"] or s["hf_eager"]):
            add(f"Benchmarks: {shape}: no figures")
            continue
        add(f"Benchmarks: {shape}" + (f" (weights {gb / 1e9:.2f} GB)" if gb else ""))
        add(f"  {'decode, 128-token prompts, 128 new tokens':44}" + "".join(f"{'batch ' + k:>12}" for k in s["decode"]))
        for key, label, spec in (("weir", "Weir tok/s", ",.1f"), ("torch_graph", "PyTorch CUDA graph tok/s", ",.1f"),
                                 ("hf_eager", "transformers eager tok/s", ",.1f"),
                                 ("weir_over_graph", "Weir / CUDA graph", ".2f"),
                                 ("weir_over_eager", "Weir / eager", ".1f")):
            unit = "x" if key.startswith("weir_over") else ""
            add(f"  {label:44}" + "".join(f"{fmt(r[key], spec, unit):>12}" for r in s["decode"].values()))
        p = s["prefill"]
        frac = p["fraction_of_gemm"]
        add_wrapped(add, f"prefill (2048-token prompts): {fmt(p['tok_s'], ',.0f')} tok/s = {fmt(p['tflops'])} TFLOP/s"
            f" (2 x params x tok/s, params = weight_bytes/2) = {fmt(frac and 100 * frac, '.0f', ' %')}"
            f" of the measured bf16 GEMM rate ({fmt(p['gemm_bf16_tflops'])} TFLOP/s)")
        bw = s["bandwidth_b1"]
        util = bw["weir_utilisation"]
        gutil = bw["torch_graph_utilisation"]
        add_wrapped(add, f"batch-1 bandwidth: Weir weight_bytes x tok/s = {fmt(bw['weir_achieved_GBps'], ',.0f')} GB/s"
            f" = {fmt(util and 100 * util, '.0f', ' %')} of the copy bandwidth cuda_check measured"
            f" ({fmt(bw['weir_copy_bw_GBps'], ',.0f')} GB/s); CUDA graph {fmt(bw['torch_graph_achieved_GBps'], ',.0f')} GB/s"
            f" = {fmt(gutil and 100 * gutil, '.0f', ' %')}; hf_baseline copy {fmt(bw['hf_copy_bw_GBps'], ',.0f')} GB/s")
        c = ratio(bw["weir_copy_bw_GBps"], bw["hf_copy_bw_GBps"])
        if c is not None and not 0.7 <= c <= 1.4:
            add(f"  note: cuda_check's copy bandwidth is {c:.2f}x hf_baseline's: do both count read + written bytes?")
    if any(s["weir"] or s["torch_graph"] or s["hf_eager"] for s in b["shapes"].values()):
        add_wrapped(add, "(copy bandwidth = bytes read + bytes written per second, as hf_baseline's copy_bw_GBps;"
            f" torch figures from {b['torch_graph_source']}, {b['hf_eager_source']})")

    if rep["targets"]:
        add("")
        add("Targets" + (" (strict: not met fails the run)" if rep["strict_targets"] else " (informational)"))
        for t in rep["targets"]:
            if t["value"] is None:
                val = "n/a"
            elif t["unit"] == "%":
                val = f"{100 * t['value']:.0f} %"
            else:
                val = f"{t['value']:.2f}x"
            line = f"  {t['shape']:12} {t['target']:48} {val:>8}  {t['status']}"
            if t.get("note") and t["value"] is None:
                line += f" ({t['note']})"
            add(line)

    ag = rep["agent"]
    if ag:
        add("")
        add("Agent: " + ("PASS" if ag.get("pass") else "FAIL")
            + f"; health after {ag.get('health_seconds', 'n/a')} s, chat {ag.get('chat_seconds', 'n/a')} s"
            f" ({ag.get('chat_finish_reason')}, usage {json.dumps(ag.get('chat_usage'))}),"
            f" stream {ag.get('stream_chunks', 'n/a')} chunks, first after {ag.get('stream_first_chunk_seconds', 'n/a')} s")
    add("")
    add("Logs: $OUT/logs/ (one per step, agent.log); figures: $OUT/data/, $OUT/gpu-report.json")
    return "\n".join(out) + "\n"


def cmd_build(args):
    steps = read_steps(args.work)
    bench_rep, targets = bench(args.work)
    failed = [s["id"] for s in steps if s["status"] == "FAIL"]
    missed = [t for t in targets if t["status"] == "not met"]
    bad = bool(failed) or not steps or (args.strict_targets and bool(missed))
    rep = dict(
        overall="FAIL" if bad else "PASS",
        elapsed_s=args.elapsed, budget_s=args.budget,
        failed_steps=failed, strict_targets=args.strict_targets,
        gpu=gpu_info(args.work), cuda_info=load(os.path.join(args.work, "cuda_info.json")),
        steps=steps,
        hf_parity=load(os.path.join(args.work, "hf_parity.json")),
        bench=bench_rep, targets=targets,
        agent=load(os.path.join(args.work, "agent.json")),
    )
    text = render(rep)
    with open(args.text, "w") as f:
        f.write(text)
    with open(args.json, "w") as f:
        json.dump(rep, f, indent=1)
    return 1 if bad else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    lj = sub.add_parser("lastjson")
    lj.add_argument("file")
    lj.add_argument("keys", nargs="*")
    b = sub.add_parser("build")
    b.add_argument("--work", required=True)
    b.add_argument("--elapsed", type=float, required=True)
    b.add_argument("--budget", type=float, required=True)
    b.add_argument("--text", required=True)
    b.add_argument("--json", required=True)
    b.add_argument("--strict-targets", action="store_true")
    args = p.parse_args()
    return cmd_lastjson(args) if args.cmd == "lastjson" else cmd_build(args)


if __name__ == "__main__":
    sys.exit(main())
