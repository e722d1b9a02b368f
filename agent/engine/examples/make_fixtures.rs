//! Writes the tiny test models checked in under `agent/engine/tests/fixtures/`:
//! `cargo run -p weir-engine --example make_fixtures`. Golden logits for
//! them come from `scripts/golden_logits.py`, golden sentence vectors from
//! `scripts/golden_embeddings.py` (both transformers).

use std::path::Path;

use weir_engine::testmodel::{TinyBertSpec, TinyModelSpec, write_tiny_bert, write_tiny_model};

fn main() -> Result<(), weir_engine::EngineError> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    write_tiny_model(&root.join("tiny-llama"), &TinyModelSpec::llama())?;
    write_tiny_model(&root.join("tiny-qwen2"), &TinyModelSpec::qwen2())?;
    write_tiny_bert(&root.join("tiny-bert"), &TinyBertSpec::default())?;
    eprintln!("wrote {}", root.display());
    Ok(())
}
