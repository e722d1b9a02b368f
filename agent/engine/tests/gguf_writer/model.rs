//! Whole models as GGUF files for tests: a Hugging Face directory written
//! as llama.cpp's converter writes it (Q/K rows permuted, Llama 3 scaling
//! as `rope_freqs`, the tokenizer as `tokenizer.ggml.*`), its matrices in
//! f32 or quantized to Q8_0 and Q4_0 with llama.cpp's rounding.

use std::path::Path;

use half::f16;
use weir_engine::config::{Architecture, ModelConfig, RopeScaling};
use weir_engine::model::inv_freq;
use weir_engine::weights::Weights;

use super::{Meta, RawTensor, f32_tensor, gguf_bytes};

/// How a model's matrices are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Everything in f32.
    F32,
    /// Attention matrices and the embeddings as Q8_0, the MLP as Q4_0
    /// (types mixed as in llama.cpp's quantized files); norms stay f32.
    Quantized,
}

impl Stored {
    /// `values` of `shape` as this storage keeps them.
    pub fn tensor(self, name: &str, shape: &[usize], values: &[f32]) -> RawTensor {
        let quantizable = shape.len() == 2 && shape[1].is_multiple_of(32);
        if self == Self::F32 || !quantizable {
            return f32_tensor(name, shape, values);
        }
        let (ty, data) = if name.contains("ffn_") {
            (2, values.chunks_exact(32).flat_map(q4_0_block).collect())
        } else {
            (8, values.chunks_exact(32).flat_map(q8_0_block).collect())
        };
        RawTensor {
            name: name.to_owned(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ty,
            data,
        }
    }
}

/// One Q8_0 block: `d = max|x| / 127`, `q = round(x / d)`.
pub fn q8_0_block(x: &[f32]) -> Vec<u8> {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut out = f16::from_f32(d).to_le_bytes().to_vec();
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
    out
}

/// One Q4_0 block as llama.cpp rounds it: `d = max / -8` for the value of
/// largest magnitude, nibbles `min(15, x / d + 8.5)`, the first sixteen
/// values in the low nibbles.
pub fn q4_0_block(x: &[f32]) -> Vec<u8> {
    let max = x
        .iter()
        .copied()
        .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let nibble = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
    let mut out = f16::from_f32(d).to_le_bytes().to_vec();
    out.extend((0..16).map(|i| nibble(x[i]) | (nibble(x[i + 16]) << 4)));
    out
}

/// llama.cpp's converter order for Q/K rows (`LlamaModel.permute`).
pub fn permute(values: &[f32], heads: usize, cols: usize) -> Vec<f32> {
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

pub fn tokenizer_meta(dir: &Path) -> Vec<(&'static str, Meta)> {
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

/// The Hugging Face directory `dir` written as a GGUF file the way
/// llama.cpp's converter lays it out, its matrices stored as `stored`.
pub fn to_gguf(dir: &Path, stored: Stored) -> Vec<u8> {
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
        tensors.push(stored.tensor(&name, &view.shape, &values));
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
