#!/usr/bin/env python3
"""Parity of Weir's CUDA backend with Hugging Face transformers on a random
model of the Llama-3.2-1B shape (step d of scripts/gpu-check.sh).

1. Builds LlamaForCausalLM with the Llama-3.2-1B configuration (llama3 RoPE
   scaling, tied embeddings), weights N(0, 0.02) and RMSNorm gains 1, in
   bf16 under torch.manual_seed(0), and saves it (config.json +
   model.safetensors) into --model-dir, with the tiny-llama fixture's
   tokenizer beside it so that step f can serve the same folder (its ids
   stay below the vocabulary size).
2. transformers in bf16 on the GPU: logits at every position of a fixed
   32-token prompt, and generate(do_sample=False, max_new_tokens=32).
   Then the same model cast to f32 (TF32 off): the "truth", which measures
   how far transformers' own bf16 result is from it.
3. `cuda_check logits --model DIR --tokens IDS --backend cuda --out FILE
   --greedy 32`: FILE holds little-endian f32 logits [32][vocab]; stdout has
   {"rows": n, "vocab": v} and {"greedy": [ids...]} lines.

PASS criteria (both sides compute in bf16 with f32 accumulation, in a
different order, so they differ by about as much as each differs from f32):
  * the logits file has 32 rows of 128256 finite values;
  * max |Weir - transformers_bf16| <= max(0.10 * std, 2 * max |transformers_bf16 - f32|)
    mean |Weir - transformers_bf16| <= max(0.02 * std, 2 * mean |transformers_bf16 - f32|)
    where std is that of transformers' bf16 logits;
  * top-1 agrees at >= 90 % of positions, a disagreement counting as
    agreement when it is a near tie: transformers' logit of Weir's pick is
    within 2 bf16 ulps of its top logit (random models have many near ties,
    and bf16 logits cannot order them);
  * greedy: Weir's 32 tokens equal transformers', or the first divergence
    is such a near tie in transformers' logits at that step (after a
    divergence the two continue from different prefixes, so later tokens
    are not compared).
The figures are printed and written to --out as JSON either way; the last
stdout line is "RESULT: PASS|FAIL ...". Exit status 0 on PASS, 1 otherwise.

--smoke runs the same code on the CPU with a 2-layer model of the same
vocabulary, to test this script on a machine without a GPU (with a stand-in
for cuda_check); its figures say nothing about Weir.
"""
import argparse
import copy
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback

PROMPT_LEN = 32
GREEDY = 32
VOCAB = 128256
PROMPT_SEED = 1234
MAX_REL, MEAN_REL, CAL_FACTOR = 0.10, 0.02, 2.0
TOP1_MIN = 0.9
TIE_ULPS = 2

# Llama-3.2-1B. bos/eos are the tiny-llama tokenizer's (<|begin_of_text|>,
# <|eot_id|>, <|end_of_text|>), so that the served model stops where its
# tokenizer says; greedy here turns eos off.
CONFIG = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=VOCAB,
    tie_word_embeddings=True,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_scaling=dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=0,
    eos_token_id=[4, 1],
)
# A small model for --smoke: same vocabulary and RoPE, fewer and narrower layers.
SMOKE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
DEVICE = "cuda"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", required=True, help="where the random model is written")
    p.add_argument("--tokenizer-from", required=True, help="folder with tokenizer.json to copy")
    p.add_argument("--cuda-check", required=True, help="the cuda_check binary")
    p.add_argument("--work", required=True, help="folder for the logits file")
    p.add_argument("--out", required=True, help="JSON file for the figures")
    p.add_argument("--deadline", type=float, default=time.time() + 300,
                   help="epoch seconds by which to be done")
    p.add_argument("--smoke", action="store_true",
                   help="a small model on the CPU: tests this script, not Weir")
    return p.parse_args()


def bf16_ulp(x):
    """Spacing of bf16 numbers at |x| (8 significant bits)."""
    import torch
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(1e-30))) - 7)


def build_and_save(args, res):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**copy.deepcopy(CONFIG))  # transformers edits the rope dict it is given
    try:
        cfg._attn_implementation = "sdpa"  # what transformers picks on a GPU anyway
    except (AttributeError, ValueError):
        pass
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        # Built on the GPU directly; the RoPE inverse frequencies are
        # computed in f32 whatever the default dtype, as from_pretrained does.
        with torch.device(DEVICE):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    torch.manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # RMSNorm gains
            else:
                p.normal_(0.0, 0.02)
    model.eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight, "embeddings not tied"
    check_rope(model, res)
    res["params"] = sum(p.numel() for p in model.parameters())

    if os.path.exists(args.model_dir):
        shutil.rmtree(args.model_dir)
    # One file: a 2.5 GB model stays under the shard size given here.
    try:
        model.save_pretrained(args.model_dir, safe_serialization=True, max_shard_size="20GB")
    except TypeError:  # transformers that always write safetensors
        model.save_pretrained(args.model_dir, max_shard_size="20GB")
    if not os.path.exists(os.path.join(args.model_dir, "model.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no model.safetensors: {os.listdir(args.model_dir)}")
    hub_style_config(args.model_dir, res)
    for name in TOKENIZER_FILES:
        src = os.path.join(args.tokenizer_from, name)
        if os.path.exists(src):
            shutil.copy(src, args.model_dir)
    res["model_dir"] = args.model_dir
    res["model_files"] = sorted(os.listdir(args.model_dir))
    return model


def llama3_inv_freq():
    """The llama3 RoPE frequencies, written out (as in Llama 3.1's reference
    code), to check that this transformers applied rope_scaling."""
    import torch

    c, r = CONFIG, CONFIG["rope_scaling"]
    dim = c["head_dim"]
    inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    old = r["original_max_position_embeddings"]
    low_wl, high_wl = old / r["low_freq_factor"], old / r["high_freq_factor"]
    wl = 2 * math.pi / inv
    out = torch.where(wl > low_wl, inv / r["factor"], inv)
    smooth = (old / wl - r["low_freq_factor"]) / (r["high_freq_factor"] - r["low_freq_factor"])
    mid = (wl >= high_wl) & (wl <= low_wl)
    return torch.where(mid, (1 - smooth) * inv / r["factor"] + smooth * inv, out)


def check_rope(model, res):
    import torch

    rot = getattr(model.model, "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        res["rope_check"] = "not checked (no model.model.rotary_emb.inv_freq)"
        return
    got = rot.inv_freq.double().cpu()
    want = llama3_inv_freq()
    res["rope_inv_freq_dtype"] = str(rot.inv_freq.dtype)
    if rot.inv_freq.dtype != torch.float32:
        print(f"note: transformers keeps RoPE frequencies in {rot.inv_freq.dtype}", flush=True)
    err = ((got - want).abs() / want).max().item()
    res["rope_check"] = f"llama3 inv_freq max relative error {err:.2e}"
    if err > 1e-3:
        # The reference itself is off: say so, but still write the model for step f.
        res["failures"].append(f"transformers' RoPE frequencies are not llama3-scaled ({res['rope_check']})")


def hub_style_config(model_dir, res):
    """Newer transformers may write rope_parameters/dtype instead of the
    rope_theta/rope_scaling/torch_dtype keys that Llama-3.2's own
    config.json has: add those keys so Weir reads what it meets on the Hub."""
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    added = []
    for key, value in (("rope_theta", CONFIG["rope_theta"]), ("rope_scaling", CONFIG["rope_scaling"]),
                       ("torch_dtype", "bfloat16"), ("head_dim", CONFIG["head_dim"])):
        if key not in cfg or cfg[key] is None:
            cfg[key] = value
            added.append(key)
    if added:
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
        res["config_keys_added"] = added


def hf_reference(model, prompt, res):
    import torch

    ids = torch.tensor([prompt], device=DEVICE)
    with torch.no_grad():
        ref = model(ids).logits[0].float().cpu()
    # Weir's --greedy N runs N steps whatever it picks: no eos stop here.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=GREEDY, output_scores=True,
                             return_dict_in_generate=True)
    greedy = out.sequences[0, PROMPT_LEN:].tolist()
    steps = [s[0].float().cpu() for s in out.scores]
    res["hf_generate_tokens"] = len(greedy)
    if len(greedy) < GREEDY:
        # generate stopped early after all (a stop rule from the model's
        # defaults): the same greedy decode, by hand.
        greedy, steps = manual_greedy(model, ids)
        res["hf_greedy_by_hand"] = True

    # The f32 truth: same weights, f32 everywhere, TF32 off.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model.float()
    with torch.no_grad():
        ref32 = model(ids).logits[0].float().cpu()
    return ref, ref32, greedy, steps


def manual_greedy(model, ids):
    """Greedy without a KV cache (whose argument names change between
    transformers versions): 32 full forward passes of <= 64 tokens."""
    import torch

    toks, steps, seq = [], [], ids
    with torch.no_grad():
        for _ in range(GREEDY):
            lg = model(seq, use_cache=False).logits[0, -1].float().cpu()
            t = int(lg.argmax())
            toks.append(t)
            steps.append(lg)
            seq = torch.cat([seq, torch.tensor([[t]], device=ids.device)], dim=1)
    return toks, steps


def run_weir(args, prompt, res):
    import torch

    out_file = os.path.join(args.work, "weir_logits.f32")
    cmd = [args.cuda_check, "logits", "--model", args.model_dir,
           "--tokens", ",".join(map(str, prompt)), "--backend", "cuda",
           "--out", out_file, "--greedy", str(GREEDY)]
    print("$", " ".join(cmd[:3]), "... --greedy", GREEDY, flush=True)
    left = max(5.0, args.deadline - time.time())
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
    res["weir_seconds"] = round(time.time() - t, 1)
    sys.stdout.write(p.stdout)
    sys.stdout.write(p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"cuda_check logits exited {p.returncode}: {p.stderr.strip()[-300:]}")
    shape, greedy = None, None
    for line in p.stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "rows" in obj and "vocab" in obj:
            shape = (int(obj["rows"]), int(obj["vocab"]))
        if "greedy" in obj:
            greedy = [int(t) for t in obj["greedy"]]
    if shape is None:
        raise RuntimeError('cuda_check logits printed no {"rows": n, "vocab": v} line')
    rows, vocab = shape
    res["weir_rows"], res["weir_vocab"] = rows, vocab
    with open(out_file, "rb") as f:
        data = f.read()
    if len(data) != rows * vocab * 4:
        raise RuntimeError(f"{out_file}: {len(data)} bytes, expected {rows}x{vocab}x4")
    if sys.byteorder != "little":
        raise RuntimeError("the logits file is little-endian; this machine is not")
    logits = torch.frombuffer(bytearray(data), dtype=torch.float32).view(rows, vocab)
    if greedy is not None and len(greedy) == PROMPT_LEN + GREEDY and greedy[:PROMPT_LEN] == prompt:
        greedy = greedy[PROMPT_LEN:]  # a binary that echoes the prompt
    return logits, greedy


def compare(ref, ref32, weir, hf_greedy, hf_steps, weir_greedy, res, failures):
    import torch

    fig = res["figures"]
    if weir.shape != (PROMPT_LEN, VOCAB):
        failures.append(f"logits shape {tuple(weir.shape)}, expected ({PROMPT_LEN}, {VOCAB})")
        return
    if not torch.isfinite(weir).all():
        failures.append(f"{int((~torch.isfinite(weir)).sum())} logits are not finite")
        return
    std = ref.std().item()
    d = (weir - ref).abs()
    cal = (ref - ref32).abs()
    w32 = (weir - ref32).abs()
    fig.update(
        hf_std=std,
        max_abs=d.max().item(), mean_abs=d.mean().item(),
        max_rel_std=d.max().item() / std, mean_rel_std=d.mean().item() / std,
        hf_bf16_vs_f32_max_abs=cal.max().item(), hf_bf16_vs_f32_mean_abs=cal.mean().item(),
        weir_vs_f32_max_abs=w32.max().item(), weir_vs_f32_mean_abs=w32.mean().item(),
    )
    thr_max = max(MAX_REL * std, CAL_FACTOR * fig["hf_bf16_vs_f32_max_abs"])
    thr_mean = max(MEAN_REL * std, CAL_FACTOR * fig["hf_bf16_vs_f32_mean_abs"])
    fig.update(max_abs_limit=thr_max, mean_abs_limit=thr_mean)
    if fig["max_abs"] > thr_max:
        failures.append(f"max |d| {fig['max_abs']:.4g} > {thr_max:.4g}")
    if fig["mean_abs"] > thr_mean:
        failures.append(f"mean |d| {fig['mean_abs']:.4g} > {thr_mean:.4g}")

    wa, ha = weir.argmax(-1), ref.argmax(-1)
    top = ref.max(-1).values
    gap = top - ref.gather(1, wa[:, None])[:, 0]
    tie = gap <= TIE_ULPS * bf16_ulp(top)
    same = wa == ha
    fig["top1_strict"] = same.float().mean().item()
    fig["top1"] = (same | tie).float().mean().item()
    fig["top1_hf_bf16_vs_f32"] = (ha == ref32.argmax(-1)).float().mean().item()
    fig["top1_disagreements"] = [
        dict(pos=i, hf=int(ha[i]), weir=int(wa[i]), hf_gap=round(gap[i].item(), 5), near_tie=bool(tie[i]))
        for i in range(PROMPT_LEN) if not same[i]
    ]
    if fig["top1"] < TOP1_MIN:
        failures.append(f"top-1 agreement {fig['top1']:.3f} < {TOP1_MIN}")

    fig["hf_greedy"] = hf_greedy
    fig["weir_greedy"] = weir_greedy
    if weir_greedy is None:
        failures.append('cuda_check printed no {"greedy": [...]} line')
        return
    first = next((i for i, (a, b) in enumerate(zip(weir_greedy, hf_greedy)) if a != b), None)
    fig["greedy_first_divergence"] = first
    if first is None:
        if len(weir_greedy) != GREEDY:
            failures.append(f"greedy: Weir gave {len(weir_greedy)} tokens, expected {GREEDY}")
        return
    s = hf_steps[first]
    pick = weir_greedy[first]
    if not 0 <= pick < s.numel():
        failures.append(f"greedy: Weir token {pick} at step {first} is outside the vocabulary")
        return
    g = (s.max() - s[pick]).item()
    near = g <= (TIE_ULPS * bf16_ulp(s.max())).item()
    fig["greedy_divergence_hf_gap"] = g
    fig["greedy_divergence_near_tie"] = near
    if not near:
        failures.append(f"greedy diverges at step {first} (transformers' gap {g:.4g}, not a near tie)")


def summary(res):
    f = res["figures"]
    parts = []
    if "max_rel_std" in f:
        parts.append(f"max|d| {f['max_abs']:.4f} ({f['max_rel_std']:.3f} std, limit "
                     f"{f['max_abs_limit']:.4f}), mean|d| {f['mean_abs']:.5f} "
                     f"({f['mean_rel_std']:.4f} std, limit {f['mean_abs_limit']:.5f})")
    if "top1" in f:
        parts.append(f"top-1 {f['top1']:.3f} (strict {f['top1_strict']:.3f})")
    if "greedy_first_divergence" in f:
        d = f["greedy_first_divergence"]
        parts.append("greedy identical" if d is None else f"greedy diverges at {d}"
                     + (" (near tie)" if f.get("greedy_divergence_near_tie") else ""))
    return "; ".join(parts)


def main():
    global DEVICE
    args = parse_args()
    if args.smoke:
        DEVICE = "cpu"
        CONFIG.update(SMOKE)
    res = {"criteria": __doc__[__doc__.index("PASS criteria"):__doc__.index("The figures")].strip(),
           "figures": {}, "failures": [], "pass": False}
    failures = res["failures"]
    t0 = time.time()
    try:
        import torch
        import transformers
        res["torch"], res["transformers"] = torch.__version__, transformers.__version__
        g = torch.Generator().manual_seed(PROMPT_SEED)
        prompt = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=g).tolist()
        res["prompt"] = prompt
        model = build_and_save(args, res)
        res["build_seconds"] = round(time.time() - t0, 1)
        ref, ref32, hf_greedy, hf_steps = hf_reference(model, prompt, res)
        del model
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()  # leave the GPU to cuda_check
        res["hf_seconds"] = round(time.time() - t0, 1)
        weir, weir_greedy = run_weir(args, prompt, res)
        compare(ref, ref32, weir, hf_greedy, hf_steps, weir_greedy, res, failures)
    except Exception as e:  # noqa: BLE001 - every failure goes into the report
        traceback.print_exc()
        failures.append(f"{type(e).__name__}: {e}")
    res["pass"] = not failures
    res["seconds"] = round(time.time() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    fig = res["figures"]
    for k in ("hf_std", "max_abs", "mean_abs", "max_rel_std", "mean_rel_std",
              "hf_bf16_vs_f32_max_abs", "hf_bf16_vs_f32_mean_abs",
              "weir_vs_f32_max_abs", "weir_vs_f32_mean_abs", "max_abs_limit", "mean_abs_limit",
              "top1", "top1_strict", "top1_hf_bf16_vs_f32", "greedy_first_divergence"):
        if k in fig:
            v = fig[k]
            print(f"  {k:26} {v:.6g}" if isinstance(v, float) else f"  {k:26} {v}")
    for d in fig.get("top1_disagreements", []):
        print(f"  top-1 differs at {d['pos']}: transformers {d['hf']}, Weir {d['weir']}, "
              f"gap {d['hf_gap']} {'(near tie)' if d['near_tie'] else ''}")
    verdict = "PASS" if res["pass"] else "FAIL"
    detail = summary(res)
    if failures:
        detail = "; ".join(failures) + (f" | {detail}" if detail else "")
    print(f"RESULT: {verdict} {detail}", flush=True)
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
