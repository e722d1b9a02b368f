//! `config.json` of a Hugging Face Llama-family model: parsing, defaults,
//! and the checks that turn unsupported settings into clear errors.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{EngineError, Result};

/// Architectures the engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (Llama 2, 3, 3.x).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5): bias on Q, K and V.
    Qwen2,
}

/// RoPE frequency scaling.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1 scaling: long wavelengths divided by `factor`, short ones
    /// kept, smooth in between.
    Llama3 {
        /// Divisor of long wavelengths.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length the model was trained with.
        original_max_position_embeddings: usize,
    },
    /// Each rotary pair's inverse frequency divided by its own factor: how
    /// GGUF files store Llama 3 scaling (the `rope_freqs.weight` tensor,
    /// one factor per pair).
    Factors(Vec<f64>),
}

/// The model's shape and numerics, as the engine uses them.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Which architecture.
    pub architecture: Architecture,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (fewer than query heads under grouped-query attention).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding and the LM head).
    pub vocab_size: usize,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Bias on the Q, K and V projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Begin-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    sliding_window: Option<Value>,
    use_sliding_window: Option<bool>,
}

impl ModelConfig {
    /// Reads and checks `dir/config.json`; when `dir` is a file, reads the
    /// metadata of that GGUF file instead.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if crate::gguf::is_gguf(dir) {
            return Self::from_gguf(&crate::gguf::GgufFile::open(dir)?);
        }
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json(&path, &text)
    }

    /// Parses and checks the text of a `config.json` (`path` names it in
    /// errors).
    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let err = |field: &str, message: String| EngineError::Config {
            path: PathBuf::from(path),
            field: field.to_owned(),
            message,
        };
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| err("(document)", e.to_string()))?;
        let architecture = architecture(&raw).map_err(|m| err("architectures", m))?;
        let need = |v: Option<usize>, field: &str| -> Result<usize> {
            match v {
                Some(0) => Err(err(field, "must be positive".into())),
                Some(n) => Ok(n),
                None => Err(err(field, "missing".into())),
            }
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = need(
            raw.num_key_value_heads.or(Some(num_heads)),
            "num_key_value_heads",
        )?;
        if num_heads % num_kv_heads != 0 {
            return Err(err(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => need(Some(d), "head_dim")?,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(err(
                    "head_dim",
                    "missing, and hidden_size is not a multiple of num_attention_heads".into(),
                ));
            }
        };
        if head_dim % 2 != 0 {
            return Err(err(
                "head_dim",
                format!("{head_dim} is odd; RoPE needs pairs"),
            ));
        }
        if let Some(act) = &raw.hidden_act
            && act != "silu"
        {
            return Err(err(
                "hidden_act",
                format!("`{act}` is not supported (only silu)"),
            ));
        }
        if raw.mlp_bias == Some(true) {
            return Err(err("mlp_bias", "MLP bias is not supported".into()));
        }
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(4096);
        let max_position_embeddings = cap_by_sliding_window(&raw, max_position_embeddings)
            .map_err(|m| err("sliding_window", m))?;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        Ok(Self {
            architecture,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_scaling: rope_scaling(raw.rope_scaling.as_ref())
                .map_err(|m| err("rope_scaling", m))?,
            qkv_bias: architecture == Architecture::Qwen2 || attention_bias,
            o_bias: architecture != Architecture::Qwen2 && attention_bias,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: token_ids(raw.bos_token_id.as_ref())
                .map_err(|m| err("bos_token_id", m))?
                .first()
                .copied(),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref())
                .map_err(|m| err("eos_token_id", m))?,
        })
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

fn architecture(raw: &RawConfig) -> std::result::Result<Architecture, String> {
    let names = raw.architectures.clone().unwrap_or_default();
    let by_name = names.iter().find_map(|a| match a.as_str() {
        "LlamaForCausalLM" => Some(Architecture::Llama),
        "MistralForCausalLM" => Some(Architecture::Mistral),
        "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
        _ => None,
    });
    let by_type = match raw.model_type.as_deref() {
        Some("llama") => Some(Architecture::Llama),
        Some("mistral") => Some(Architecture::Mistral),
        Some("qwen2") => Some(Architecture::Qwen2),
        _ => None,
    };
    by_name.or(by_type).ok_or_else(|| {
        format!(
            "unsupported architecture {names:?} (model_type {:?}); supported: \
             LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
            raw.model_type
        )
    })
}

/// A sliding window shorter than the context would change attention; the
/// engine keeps every sequence inside the window instead, where sliding and
/// full attention agree.
fn cap_by_sliding_window(raw: &RawConfig, max_pos: usize) -> std::result::Result<usize, String> {
    if raw.use_sliding_window == Some(false) {
        return Ok(max_pos);
    }
    match &raw.sliding_window {
        None | Some(Value::Null) => Ok(max_pos),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(w) if w > 0 => Ok(max_pos.min(w as usize)),
            _ => Err(format!("{n} is not a positive integer")),
        },
        Some(other) => Err(format!("{other} is not a positive integer")),
    }
}

fn rope_scaling(value: Option<&Value>) -> std::result::Result<RopeScaling, String> {
    let Some(Value::Object(map)) = value else {
        return match value {
            None | Some(Value::Null) => Ok(RopeScaling::None),
            Some(other) => Err(format!("expected an object, got {other}")),
        };
    };
    let kind = map
        .get("rope_type")
        .or_else(|| map.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> std::result::Result<f64, String> {
        map.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("`{key}` missing or not a number"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => Err(format!(
            "rope type `{other}` is not supported (default, linear, llama3)"
        )),
    }
}

fn token_ids(value: Option<&Value>) -> std::result::Result<Vec<u32>, String> {
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("{v} is not a token id"))
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(Path::new("m/config.json"), json)
    }

    const LLAMA: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,
        "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"vocab_size":300,"rms_norm_eps":1e-5,
        "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
        "high_freq_factor":4.0,"original_max_position_embeddings":8192},
        "eos_token_id":[1,2],"bos_token_id":0}"#;

    #[test]
    fn parses_llama3_with_gqa_and_scaling() {
        let c = parse(LLAMA).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!((c.head_dim, c.group_size()), (16, 2));
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.bos_token_id, Some(0));
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert!(!c.qkv_bias);
    }

    #[test]
    fn qwen2_has_qkv_bias() {
        let json = LLAMA.replace("LlamaForCausalLM", "Qwen2ForCausalLM");
        assert!(parse(&json).unwrap().qkv_bias);
    }

    #[test]
    fn errors_name_file_and_field() {
        let unknown = LLAMA.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let e = parse(&unknown).unwrap_err().to_string();
        assert!(
            e.contains("m/config.json") && e.contains("architectures"),
            "{e}"
        );
        let missing = LLAMA.replace(r#""vocab_size":300,"#, "");
        assert!(
            parse(&missing)
                .unwrap_err()
                .to_string()
                .contains("`vocab_size`: missing")
        );
        let gqa = LLAMA.replace(r#""num_key_value_heads":2"#, r#""num_key_value_heads":3"#);
        assert!(
            parse(&gqa)
                .unwrap_err()
                .to_string()
                .contains("num_key_value_heads")
        );
        let act = LLAMA.replace(
            r#""vocab_size":300"#,
            r#""vocab_size":300,"hidden_act":"gelu""#,
        );
        assert!(parse(&act).unwrap_err().to_string().contains("hidden_act"));
        let rope = LLAMA.replace("llama3", "yarn");
        assert!(
            parse(&rope)
                .unwrap_err()
                .to_string()
                .contains("rope_scaling")
        );
        assert!(
            parse("not json")
                .unwrap_err()
                .to_string()
                .contains("m/config.json")
        );
    }

    #[test]
    fn sliding_window_caps_the_context() {
        let json = LLAMA.replace(
            r#""vocab_size":300"#,
            r#""vocab_size":300,"max_position_embeddings":32768,"sliding_window":4096"#,
        );
        assert_eq!(parse(&json).unwrap().max_position_embeddings, 4096);
    }
}
