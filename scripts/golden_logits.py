#!/usr/bin/env python3
"""Golden values for the engine's tiny test models, computed by transformers.

For every fixture directory under agent/engine/tests/fixtures/ this writes
  golden.json          the prompt text, its token ids, the chat-template
                       rendering of a fixed conversation, and 16 greedy tokens
  golden.safetensors   `logits`: f32 [tokens, vocab] for every prompt position

Run after `cargo run -p weir-engine --example make_fixtures`:
    pip install torch transformers safetensors
    python3 scripts/golden_logits.py
"""

import json
import pathlib
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent / "agent/engine/tests/fixtures"
PROMPT = ("The operator places model replicas on nodes with GPUs. What is the capital of "
          "France? Naïve café 🙂 and 12345.")
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan?"},
]


def golden(directory: pathlib.Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().contiguous()
        # Plain argmax over full forwards: no generation config, no stopping.
        generated = []
        for _ in range(16):
            step = model(torch.tensor([ids + generated])).logits[0, -1]
            generated.append(int(step.argmax()))
    chat = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    save_file({"logits": logits}, str(directory / "golden.safetensors"))
    record = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "prompt": PROMPT,
        "input_ids": ids,
        "greedy_tokens": generated,
        "conversation": CONVERSATION,
        "chat_prompt": chat,
    }
    (directory / "golden.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(f"{directory.name}: {len(ids)} tokens, vocab {logits.shape[1]}", file=sys.stderr)


def main() -> None:
    dirs = sorted(p for p in ROOT.iterdir() if (p / "config.json").exists())
    if not dirs:
        sys.exit(f"no fixtures under {ROOT}; run make_fixtures first")
    for directory in dirs:
        golden(directory)


if __name__ == "__main__":
    main()
