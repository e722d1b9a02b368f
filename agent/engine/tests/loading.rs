//! Loading a Hugging Face directory: dtypes, sharding, and a clear error
//! naming the file and field or tensor for everything that is wrong.

use std::path::Path;

use weir_engine::backend::BatchLayout;
use weir_engine::backend::cpu::CpuBackend;
use weir_engine::model::LlamaModel;
use weir_engine::testmodel::{TinyModelSpec, write_tiny_model};
use weir_engine::weights::WeightDtype;

fn load(dir: &Path) -> Result<LlamaModel<CpuBackend>, String> {
    LlamaModel::load(dir, CpuBackend, 64).map_err(|e| e.to_string())
}

fn load_err(dir: &Path) -> String {
    match load(dir) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => e,
    }
}

fn logits(model: &LlamaModel<CpuBackend>, tokens: &[u32]) -> Vec<f32> {
    let mut cache = model.alloc_kv_cache(8, 4).unwrap();
    let mut layout = BatchLayout::default();
    layout.push_seq(tokens, 0, &(0..8).collect::<Vec<u32>>(), 4, true);
    model.forward(&layout, &mut cache).unwrap()
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
}

#[test]
fn bf16_and_f16_weights_load_and_stay_close_to_f32() {
    let root = tempfile::tempdir().unwrap();
    let reference = {
        let dir = root.path().join("f32");
        write_tiny_model(&dir, &TinyModelSpec::llama()).unwrap();
        logits(&load(&dir).unwrap(), &[5, 9, 17, 33])
    };
    for dtype in [WeightDtype::BF16, WeightDtype::F16] {
        let dir = root.path().join(format!("{dtype:?}"));
        write_tiny_model(
            &dir,
            &TinyModelSpec {
                dtype,
                ..TinyModelSpec::llama()
            },
        )
        .unwrap();
        let got = logits(&load(&dir).unwrap(), &[5, 9, 17, 33]);
        let diff = got
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff > 0.0 && diff < 0.1, "{dtype:?}: max |Δ| {diff}");
    }
}

#[test]
fn sharded_weights_load_through_the_index() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &TinyModelSpec::qwen2()).unwrap();
    let single = logits(&load(dir.path()).unwrap(), &[3, 4, 5]);
    // Move the file behind an index; the tensors are the same.
    std::fs::rename(
        dir.path().join("model.safetensors"),
        dir.path().join("model-00001-of-00001.safetensors"),
    )
    .unwrap();
    let weights = weir_engine::weights::Weights::open_file(
        &dir.path().join("model-00001-of-00001.safetensors"),
    )
    .unwrap();
    assert!(weights.contains("model.norm.weight"));
    let index = serde_json::json!({"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_eq!(logits(&load(dir.path()).unwrap(), &[3, 4, 5]), single);
}

#[test]
fn bad_directories_give_errors_naming_file_and_field() {
    let root = tempfile::tempdir().unwrap();
    let fresh = |name: &str| {
        let dir = root.path().join(name);
        write_tiny_model(&dir, &TinyModelSpec::llama()).unwrap();
        dir
    };

    let dir = fresh("arch");
    edit_config(&dir, |c| {
        c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
        c["model_type"] = serde_json::json!("gpt_neox");
    });
    let err = load_err(&dir);
    assert!(
        err.contains("config.json") && err.contains("architectures") && err.contains("GPTNeoX"),
        "{err}"
    );

    let dir = fresh("shape");
    edit_config(&dir, |c| c["intermediate_size"] = serde_json::json!(96));
    let err = load_err(&dir);
    assert!(
        err.contains("mlp.gate_proj.weight") && err.contains("expected [96, 64]"),
        "{err}"
    );

    let dir = fresh("missing");
    edit_config(&dir, |c| c["num_hidden_layers"] = serde_json::json!(3));
    let err = load_err(&dir);
    assert!(
        err.contains("model.layers.2.") && err.contains("missing"),
        "{err}"
    );

    let dir = fresh("noweights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert!(load_err(&dir).contains("model.safetensors"));

    let dir = fresh("garbage");
    std::fs::write(dir.join("model.safetensors"), b"not a safetensors file").unwrap();
    assert!(load_err(&dir).contains("not a valid safetensors file"));

    let dir = fresh("noconfig");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert!(load_err(&dir).contains("config.json"));
}

#[test]
fn fixture_writer_is_deterministic_and_matches_the_checked_in_fixtures() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &TinyModelSpec::llama()).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        let a = std::fs::read(dir.path().join(file)).unwrap();
        let b = std::fs::read(fixture.join(file)).unwrap();
        assert!(
            a == b,
            "{file} differs from the checked-in fixture: rerun make_fixtures and golden_logits.py"
        );
    }
}
