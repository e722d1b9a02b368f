//! GGUF loading: every tensor type dequantizes bit for bit as the `gguf`
//! Python package does (`scripts/golden_gguf.py`); the checked-in tiny
//! models written as GGUF (Q/K rows permuted as llama.cpp's converter
//! does, Llama 3 scaling as `rope_freqs`) give the same logits and token
//! ids as their Hugging Face directories; bad files fail at load with a
//! message naming the problem.

mod gguf_writer;

use std::path::{Path, PathBuf};

use gguf_writer::model::{Stored, to_gguf};
use gguf_writer::{Meta, RawTensor, gguf_bytes};
use weir_engine::backend::BatchLayout;
use weir_engine::backend::cpu::CpuBackend;
use weir_engine::config::ModelConfig;
use weir_engine::gguf::{GgufFile, dequant};
use weir_engine::model::{LlamaModel, inv_freq};
use weir_engine::tokenizer::TextTokenizer;
use weir_engine::weights::Weights;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn every_type_dequantizes_bit_for_bit_like_gguf_py() {
    let file = GgufFile::open(&fixtures().join("gguf/dequant.gguf")).unwrap();
    for ty in dequant::SUPPORTED {
        let (shape, got) = file.dequantize(&format!("q.{}", ty.name())).unwrap();
        let (expect_shape, expect) = file.dequantize(&format!("expect.{}", ty.name())).unwrap();
        assert_eq!(shape, expect_shape, "{}", ty.name());
        assert!(got.len() >= 64, "{}: {} values", ty.name(), got.len());
        let bad = got
            .iter()
            .zip(&expect)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(bad, None, "{}: first differing element", ty.name());
    }
}

fn write_temp(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

fn logits(path: &Path, ids: &[u32]) -> Vec<f32> {
    let model = LlamaModel::load(path, CpuBackend, 64).unwrap();
    let mut cache = model.alloc_kv_cache(8, 4).unwrap();
    let mut layout = BatchLayout::default();
    layout.push_seq(ids, 0, &[0, 1, 2, 3, 4, 5, 6, 7], 4, false);
    layout.logits_rows = (0..ids.len() as u32).collect();
    model.forward(&layout, &mut cache).unwrap()
}

#[test]
fn tiny_models_as_gguf_match_their_hugging_face_directories() {
    const TEXTS: [&str; 3] = [
        "Weir serves models on Kubernetes.",
        "caf\u{e9} 42, don't   stop\n",
        "<|im_start|>user",
    ];
    for name in ["tiny-llama", "tiny-qwen2"] {
        let dir = fixtures().join(name);
        let (_tmp, path) = write_temp(&to_gguf(&dir, Stored::F32));
        let hf_config = ModelConfig::from_dir(&dir).unwrap();
        let gguf_config = ModelConfig::from_dir(&path).unwrap();
        assert_eq!(gguf_config.architecture, hf_config.architecture, "{name}");
        assert_eq!(gguf_config.qkv_bias, hf_config.qkv_bias, "{name}");
        assert_eq!(
            gguf_config.tie_word_embeddings, hf_config.tie_word_embeddings,
            "{name}"
        );
        let (a, b) = (inv_freq(&hf_config), inv_freq(&gguf_config));
        assert!(
            a.iter().zip(&b).all(|(x, y)| ((x - y) / x).abs() < 1e-6),
            "{name}"
        );

        let hf_tok = TextTokenizer::from_dir(&dir).unwrap();
        let gguf_tok = TextTokenizer::from_dir(&path).unwrap();
        for text in TEXTS {
            let ids = hf_tok.encode(text, true).unwrap();
            assert_eq!(
                gguf_tok.encode(text, true).unwrap(),
                ids,
                "{name}: {text:?}"
            );
            assert_eq!(gguf_tok.decode(&ids, false).unwrap(), text, "{name}");
        }
        assert_eq!(gguf_tok.has_chat_template(), hf_tok.has_chat_template());

        let ids = hf_tok.encode(TEXTS[0], true).unwrap();
        let (want, got) = (logits(&dir, &ids), logits(&path, &ids));
        let diff = want
            .iter()
            .zip(&got)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        // Same f32 weights, same kernels: only the RoPE table can differ
        // (frequencies rebuilt from f32 factors).
        assert!(diff < 1e-4, "{name}: max |Δ| {diff}");
    }
}

/// A model whose matrices are Q8_0 and Q4_0 blocks: the CPU backend
/// multiplying by the blocks gives the logits of the same file dequantized
/// at load, and stays near the f32 original (quantization noise only).
#[test]
fn quantized_tiny_model_keeps_its_blocks_and_matches_it_dequantized() {
    use weir_engine::weights::QuantizedWeights;
    let dir = fixtures().join("tiny-llama");
    let (_tmp, path) = write_temp(&to_gguf(&dir, Stored::Quantized));
    let file = GgufFile::open(&path).unwrap();
    let types: std::collections::BTreeSet<&str> = file
        .tensor_names()
        .map(|n| file.tensor_info(n).unwrap().ty.name())
        .collect();
    assert!(
        types.contains("Q8_0") && types.contains("Q4_0"),
        "{types:?}"
    );
    let ids: Vec<u32> = (0..30).map(|i| 40 + (i * 37) % 290).collect();
    let run = |quantized: QuantizedWeights| {
        let config = ModelConfig::from_dir(&path).unwrap();
        let weights = Weights::open(&path).unwrap().with_quantized(quantized);
        let model = LlamaModel::from_weights(config, &weights, CpuBackend, 64).unwrap();
        let mut cache = model.alloc_kv_cache(16, 4).unwrap();
        let mut layout = BatchLayout::default();
        let table: Vec<u32> = (0..16).collect();
        layout.push_seq(&ids, 0, &table, 4, false);
        layout.logits_rows = (0..ids.len() as u32).collect();
        model.forward(&layout, &mut cache).unwrap()
    };
    let (blocks, dequantized) = (
        run(QuantizedWeights::Blocks),
        run(QuantizedWeights::Dequantize),
    );
    let scale = dequantized.iter().fold(0f32, |m, v| m.max(v.abs()));
    let rel =
        |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
    // Only the order of f32 additions may differ.
    assert!(
        rel(&blocks, &dequantized) < 1e-4,
        "{}",
        rel(&blocks, &dequantized)
    );
    let original = logits(&dir, &ids);
    let noise = rel(&blocks, &original);
    assert!(noise > 0.0 && noise < 0.2, "quantization noise {noise}");
}

fn load_error(bytes: &[u8]) -> String {
    let (_tmp, path) = write_temp(bytes);
    let config = ModelConfig::from_dir(&path);
    let tokenizer = TextTokenizer::from_dir(&path);
    let model = LlamaModel::load(&path, CpuBackend, 16);
    match (config, tokenizer, model) {
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            let text = e.to_string();
            assert!(text.contains("model.gguf"), "the file is not named: {text}");
            text
        }
        _ => panic!("the bad file loaded"),
    }
}

#[test]
fn bad_files_fail_at_load_naming_the_problem() {
    let good = to_gguf(&fixtures().join("tiny-qwen2"), Stored::F32);
    let e = load_error(b"GGML\x03\0\0\0");
    assert!(e.contains("not a GGUF file"), "{e}");
    let e = load_error(&good[..good.len() / 2]);
    assert!(
        e.contains("truncated") && e.contains("extends past the end"),
        "{e}"
    );
    let e = load_error(&good[..100]);
    assert!(e.contains("truncated"), "{e}");

    // A tensor of an unsupported type, then one of an unknown type.
    let arch = [("general.architecture", Meta::Str("qwen2".into()))];
    for (ty, expect) in [(16, "IQ2_XXS"), (99, "unknown tensor type id 99")] {
        let t = RawTensor {
            name: "blk.0.attn_q.weight".into(),
            dims: vec![256, 1],
            ty,
            data: vec![0; 256],
        };
        let e = load_error(&gguf_bytes(&arch, &[t]));
        assert!(
            e.contains("blk.0.attn_q.weight") && e.contains(expect),
            "{e}"
        );
    }

    let phi = replace_str(&good, "qwen2", "phi-3");
    let e = load_error(&phi);
    assert!(
        e.contains("general.architecture") && e.contains("phi-3"),
        "{e}"
    );

    let no_tokenizer = replace_str(&good, "tokenizer.ggml.tokens", "tokenizer.ggml.tokenz");
    let e = load_error(&no_tokenizer);
    assert!(
        e.contains("tokenizer.ggml.tokens") && e.contains("no tokenizer"),
        "{e}"
    );
}

/// `bytes` with the first occurrence of the GGUF string `from` (length
/// prefix included) replaced by `to` (same length).
fn replace_str(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut needle = (from.len() as u64).to_le_bytes().to_vec();
    needle.extend(from.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .unwrap();
    let mut out = bytes.to_vec();
    out[at + 8..at + 8 + to.len()].copy_from_slice(to.as_bytes());
    out
}
