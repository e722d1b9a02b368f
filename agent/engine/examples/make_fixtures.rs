//! Writes the tiny test models checked in under `agent/engine/tests/fixtures/`:
//! `cargo run -p weir-engine --example make_fixtures`. Golden logits for
//! them come from `scripts/golden_logits.py` (transformers).

use std::path::Path;

use weir_engine::testmodel::{TinyModelSpec, write_tiny_model};

fn main() -> Result<(), weir_engine::EngineError> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    write_tiny_model(&root.join("tiny-llama"), &TinyModelSpec::llama())?;
    write_tiny_model(&root.join("tiny-qwen2"), &TinyModelSpec::qwen2())?;
    eprintln!("wrote {}", root.display());
    Ok(())
}
