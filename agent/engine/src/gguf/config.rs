//! A GGUF file's metadata (`general.*`, `{arch}.*`, `tokenizer.ggml.*` ids)
//! and tensor directory turned into the engine's [`ModelConfig`]: the
//! architecture, shapes, RoPE base and scaling, RMSNorm epsilon, GQA,
//! biases and tied embeddings (no `output.weight`). Errors name the file
//! and the key.

use super::reader::GgufFile;
use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{EngineError, Result};

/// The architecture named by `general.architecture`, with the name its
/// keys are prefixed by.
fn architecture(file: &GgufFile) -> Result<(Architecture, &str)> {
    let name = file
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| err(file, "general.architecture", "missing or not a string"))?;
    let arch = match name {
        "llama" => Architecture::Llama,
        "mistral" => Architecture::Mistral,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(err(
                file,
                "general.architecture",
                &format!("unsupported architecture `{other}`; supported: llama, mistral, qwen2"),
            ));
        }
    };
    Ok((arch, name))
}

fn err(file: &GgufFile, key: &str, message: &str) -> EngineError {
    EngineError::Config {
        path: file.path().to_path_buf(),
        field: key.to_owned(),
        message: message.to_owned(),
    }
}

/// Whether the file's Q and K rows are in llama.cpp's interleaved RoPE
/// order (its converter permutes them for Llama and Mistral, not Qwen2).
pub fn qk_permuted(arch: Architecture) -> bool {
    matches!(arch, Architecture::Llama | Architecture::Mistral)
}

impl ModelConfig {
    /// The configuration a GGUF file describes.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let (architecture, a) = architecture(file)?;
        let key = |k: &str| format!("{a}.{k}");
        let int = |k: &str| -> Result<Option<usize>> {
            let k = key(k);
            match file.get(&k) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if n > 0 => Ok(Some(n as usize)),
                    _ => Err(err(file, &k, "not a positive integer")),
                },
            }
        };
        let need = |k: &str| int(k)?.ok_or_else(|| err(file, &key(k), "missing"));
        let float = |k: &str| file.get(&key(k)).and_then(|v| v.as_f64());
        let hidden_size = need("embedding_length")?;
        let num_heads = need("attention.head_count")?;
        let num_kv_heads = int("attention.head_count_kv")?.unwrap_or(num_heads);
        if num_heads % num_kv_heads != 0 {
            return Err(err(
                file,
                &key("attention.head_count_kv"),
                &format!("{num_kv_heads} does not divide the head count {num_heads}"),
            ));
        }
        let head_dim = match int("attention.key_length")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => return Err(err(file, &key("attention.key_length"), "missing")),
        };
        if head_dim % 2 != 0 {
            return Err(err(file, &key("attention.key_length"), "odd head width"));
        }
        if let Some(rot) = int("rope.dimension_count")?
            && rot != head_dim
        {
            return Err(err(
                file,
                &key("rope.dimension_count"),
                &format!("partial rotary ({rot} of {head_dim}) is not supported"),
            ));
        }
        let vocab_size = match int("vocab_size")? {
            Some(v) => v,
            None => file
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.as_array())
                .map(<[_]>::len)
                .ok_or_else(|| err(file, &key("vocab_size"), "missing, and no tokenizer"))?,
        };
        let mut max_position_embeddings = int("context_length")?.unwrap_or(4096);
        if let Some(window) = int("attention.sliding_window")? {
            max_position_embeddings = max_position_embeddings.min(window);
        }
        let has = |t: &str| file.tensor_info(t).is_some();
        let token_id = |k: &str| {
            file.get(&format!("tokenizer.ggml.{k}"))
                .and_then(|v| v.as_u64())
                .map(|v| v as u32)
        };
        let mut eos_token_ids: Vec<u32> = ["eos_token_id", "eot_token_id", "eom_token_id"]
            .iter()
            .filter_map(|k| token_id(k))
            .collect();
        eos_token_ids.dedup();
        Ok(Self {
            architecture,
            hidden_size,
            intermediate_size: need("feed_forward_length")?,
            num_layers: need("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
            rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling: rope_scaling(file, a, head_dim)?,
            qkv_bias: architecture == Architecture::Qwen2 || has("blk.0.attn_q.bias"),
            o_bias: has("blk.0.attn_output.bias"),
            tie_word_embeddings: !has("output.weight"),
            bos_token_id: token_id("bos_token_id"),
            eos_token_ids,
        })
    }
}

fn rope_scaling(file: &GgufFile, a: &str, head_dim: usize) -> Result<RopeScaling> {
    if file.tensor_info("rope_freqs.weight").is_some() {
        let (_, factors) = file.dequantize("rope_freqs.weight")?;
        if factors.len() != head_dim / 2 {
            return Err(EngineError::Weights {
                path: file.path().to_path_buf(),
                tensor: "rope_freqs.weight".into(),
                message: format!("{} factors, expected {}", factors.len(), head_dim / 2),
            });
        }
        return Ok(RopeScaling::Factors(
            factors.into_iter().map(f64::from).collect(),
        ));
    }
    let kind_key = format!("{a}.rope.scaling.type");
    let kind = file
        .get(&kind_key)
        .and_then(|v| v.as_str())
        .unwrap_or("none");
    let factor = file
        .get(&format!("{a}.rope.scaling.factor"))
        .and_then(|v| v.as_f64());
    match (kind, factor) {
        ("none", _) => Ok(RopeScaling::None),
        ("linear", Some(f)) if f > 0.0 => Ok(RopeScaling::Linear { factor: f }),
        ("linear", _) => Err(err(
            file,
            &format!("{a}.rope.scaling.factor"),
            "missing or not positive",
        )),
        (other, _) => Err(err(
            file,
            &kind_key,
            &format!("RoPE scaling `{other}` is not supported (none, linear)"),
        )),
    }
}
