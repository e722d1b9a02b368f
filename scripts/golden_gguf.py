#!/usr/bin/env python3
"""Golden dequantization of every GGUF tensor type Weir reads, by the `gguf`
Python package (llama.cpp's own gguf-py, `gguf.quants.dequantize`).

Writes agent/engine/tests/fixtures/gguf/dequant.gguf: for each type T a
tensor `q.T` of random blocks stored as T, and an F32 tensor `expect.T`
holding what `gguf.quants.dequantize` makes of them. `cargo test -p
weir-engine --test gguf` reads the file with Weir's own GGUF reader,
dequantizes every `q.T` and compares with `expect.T` bit for bit.

Blocks are random bytes, except that the f16 scales of each block are
set to finite values (random bits would make NaN and infinity, whose
payloads say nothing about the dequantizer), and F32/F16/BF16 tensors
are random normal numbers.

    pip install gguf==0.19.0 numpy
    python3 scripts/golden_gguf.py
"""

import pathlib

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

OUT = pathlib.Path(__file__).resolve().parent.parent / "agent/engine/tests/fixtures/gguf/dequant.gguf"

# Byte offsets of the f16 scale fields inside one block, per type.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
BLOCKS = 6


def random_blocks(rng: np.random.Generator, qtype: T) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(BLOCKS, size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scale = rng.normal(0.0, 0.05, size=BLOCKS).astype(np.float16)
        raw[:, offset:offset + 2] = scale.view(np.uint8).reshape(BLOCKS, 2)
    # Two rows of BLOCKS/2 blocks each: rows of several blocks are tested too.
    return raw.reshape(2, BLOCKS // 2 * size)


def main() -> None:
    rng = np.random.default_rng(14)
    writer = gguf.GGUFWriter(str(OUT), "weir-dequant-golden")
    for qtype in F16_FIELDS:
        raw = random_blocks(rng, qtype)
        expect = gguf.quants.dequantize(raw, qtype).astype(np.float32)
        writer.add_tensor(f"q.{qtype.name}", raw, raw_dtype=qtype)
        writer.add_tensor(f"expect.{qtype.name}", expect)
    values = rng.normal(0.0, 1.0, size=(2, 64)).astype(np.float32)
    for qtype, stored in [
        (T.F32, values),
        (T.F16, values.astype(np.float16)),
        (T.BF16, gguf.quants.quantize(values, T.BF16)),
    ]:
        writer.add_tensor(f"q.{qtype.name}", stored, raw_dtype=qtype)
        expect = gguf.quants.dequantize(stored, qtype).astype(np.float32)
        writer.add_tensor(f"expect.{qtype.name}", expect)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
