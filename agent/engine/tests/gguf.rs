//! GGUF loading: every tensor type dequantizes bit for bit as the `gguf`
//! Python package does (`scripts/golden_gguf.py`); the checked-in tiny
//! models written as GGUF (Q/K rows permuted as llama.cpp's converter
//! does, Llama 3 scaling as `rope_freqs`) give the same logits and token
//! ids as their Hugging Face directories; bad files fail at load with a
//! message naming the problem.

mod gguf_writer;

use std::path::{Path, PathBuf};

use gguf_writer::{Meta, RawTensor, f32_tensor, gguf_bytes};
use weir_engine::backend::BatchLayout;
use weir_engine::backend::cpu::CpuBackend;
use weir_engine::config::{Architecture, ModelConfig, RopeScaling};
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

/// llama.cpp's converter order for Q/K rows (`LlamaModel.permute`).
fn permute(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = values.len() / cols;
    let (per_head, half) = (rows / heads, rows / heads / 2);
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for part in 0..2 {
            for i in 0..half {
                let src = h * per_head + part * half + i;
                let dst = h * per_head + 2 * i + part;
                out[dst * cols..][..cols].copy_from_slice(&values[src * cols..][..cols]);
            }
        }
    }
    out
}

fn tokenizer_meta(dir: &Path) -> Vec<(&'static str, Meta)> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = json["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let mut types = vec![1i32; tokens.len()];
    for added in json["added_tokens"].as_array().unwrap() {
        types[added["id"].as_u64().unwrap() as usize] = 3;
    }
    let merges = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            pair => format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            ),
        })
        .collect();
    let template = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap()["chat_template"]
        .as_str()
        .map(str::to_owned);
    let mut kv = vec![
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.merges", Meta::Strs(merges)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(false)),
    ];
    if let Some(t) = template {
        kv.push(("tokenizer.chat_template", Meta::Str(t)));
    }
    kv
}

/// The Hugging Face directory `dir` written as an F32 GGUF file the way
/// llama.cpp's converter lays it out.
fn to_gguf(dir: &Path) -> Vec<u8> {
    let c = ModelConfig::from_dir(dir).unwrap();
    let weights = Weights::open(dir).unwrap();
    let arch = match c.architecture {
        Architecture::Llama => "llama",
        Architecture::Mistral => "mistral",
        Architecture::Qwen2 => "qwen2",
    };
    let permuted = c.architecture != Architecture::Qwen2;
    let mut tensors: Vec<RawTensor> = Vec::new();
    let mut add = |hf: &str| {
        if !weights.contains(hf) {
            return;
        }
        let view = weights.get_any(hf).unwrap();
        let mut values = view.to_f32();
        let heads = match hf.rsplit('.').nth(1) {
            Some("q_proj") if permuted => Some(c.num_heads),
            Some("k_proj") if permuted => Some(c.num_kv_heads),
            _ => None,
        };
        if let Some(heads) = heads {
            let cols = if view.shape.len() == 2 {
                view.shape[1]
            } else {
                1
            };
            values = permute(&values, heads, cols);
        }
        let name = weir_engine::gguf::gguf_name(hf).unwrap();
        tensors.push(f32_tensor(&name, &view.shape, &values));
    };
    for name in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        add(name);
    }
    for i in 0..c.num_layers {
        for part in [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.q_proj.bias",
            "self_attn.k_proj.bias",
            "self_attn.v_proj.bias",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ] {
            add(&format!("model.layers.{i}.{part}"));
        }
    }
    if !matches!(c.rope_scaling, RopeScaling::None) {
        let plain = inv_freq(&ModelConfig {
            rope_scaling: RopeScaling::None,
            ..c.clone()
        });
        let factors: Vec<f32> = plain
            .iter()
            .zip(inv_freq(&c))
            .map(|(p, s)| (p / s) as f32)
            .collect();
        tensors.push(f32_tensor("rope_freqs.weight", &[factors.len()], &factors));
    }
    let key = |k: &str| -> &'static str { Box::leak(format!("{arch}.{k}").into_boxed_str()) };
    let mut kv = vec![
        ("general.architecture", Meta::Str(arch.into())),
        (key("block_count"), Meta::U32(c.num_layers as u32)),
        (
            key("context_length"),
            Meta::U32(c.max_position_embeddings as u32),
        ),
        (key("embedding_length"), Meta::U32(c.hidden_size as u32)),
        (
            key("feed_forward_length"),
            Meta::U32(c.intermediate_size as u32),
        ),
        (key("attention.head_count"), Meta::U32(c.num_heads as u32)),
        (
            key("attention.head_count_kv"),
            Meta::U32(c.num_kv_heads as u32),
        ),
        (key("rope.freq_base"), Meta::F32(c.rope_theta as f32)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Meta::F32(c.rms_norm_eps as f32),
        ),
        (key("vocab_size"), Meta::U32(c.vocab_size as u32)),
    ];
    if let Some(eos) = c.eos_token_ids.first() {
        kv.push(("tokenizer.ggml.eos_token_id", Meta::U32(*eos)));
    }
    kv.extend(tokenizer_meta(dir));
    gguf_bytes(&kv, &tensors)
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
        let (_tmp, path) = write_temp(&to_gguf(&dir));
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
    let good = to_gguf(&fixtures().join("tiny-qwen2"));
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
