//! What an encoder directory says about itself: the BERT `config.json`
//! and the sentence-transformers files beside it (`modules.json`,
//! `1_Pooling/config.json`, `sentence_bert_config.json`) that fix pooling,
//! normalization and the longest input.

use std::path::Path;

use serde_json::Value;

use crate::error::{EngineError, Result};

/// How token vectors become one sentence vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the tokens (sentence-transformers' default).
    Mean,
    /// The first (`[CLS]`) token.
    Cls,
    /// Element-wise maximum over the tokens.
    Max,
}

/// The feed-forward activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// GELU with the exact error function (`gelu`).
    Gelu,
    /// GELU's tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// ReLU.
    Relu,
}

/// A BERT-family encoder's shape and its sentence-embedding head.
#[derive(Clone, Debug, PartialEq)]
pub struct EncoderConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Rows of the position-embedding table.
    pub max_position_embeddings: usize,
    /// Rows of the token-type table.
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f32,
    /// Feed-forward activation.
    pub activation: Activation,
    /// Sentence pooling.
    pub pooling: Pooling,
    /// Whether sentence vectors are scaled to unit length.
    pub normalize: bool,
    /// Most tokens (special tokens included) one input may have.
    pub max_seq_len: usize,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(EngineError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| EngineError::Config {
            path: path.to_path_buf(),
            field: "(document)".into(),
            message: e.to_string(),
        })
}

/// Whether `dir` holds an encoder (a `bert` model) rather than a decoder.
pub fn is_encoder_dir(dir: &Path) -> bool {
    read_json(&dir.join("config.json"))
        .ok()
        .flatten()
        .and_then(|c| {
            c.get("model_type")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .is_some_and(|t| t == "bert")
}

impl EncoderConfig {
    /// Reads the encoder's configuration from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let config = read_json(&path)?.ok_or_else(|| EngineError::Config {
            path: path.clone(),
            field: "(document)".into(),
            message: "missing".into(),
        })?;
        let err = |field: &str, message: String| EngineError::Config {
            path: path.clone(),
            field: field.to_owned(),
            message,
        };
        let model_type = config.get("model_type").and_then(Value::as_str);
        if model_type != Some("bert") {
            return Err(err(
                "model_type",
                format!("{model_type:?} is not an encoder Weir runs (bert)"),
            ));
        }
        let size = |field: &str| -> Result<usize> {
            config
                .get(field)
                .and_then(Value::as_u64)
                .filter(|&v| v > 0)
                .map(|v| v as usize)
                .ok_or_else(|| err(field, "missing or not a positive integer".into()))
        };
        let activation = match config.get("hidden_act").and_then(Value::as_str) {
            Some("gelu") | None => Activation::Gelu,
            Some("gelu_new" | "gelu_pytorch_tanh") => Activation::GeluTanh,
            Some("relu") => Activation::Relu,
            Some(other) => return Err(err("hidden_act", format!("`{other}` is not supported"))),
        };
        let position = config
            .get("position_embedding_type")
            .and_then(Value::as_str)
            .unwrap_or("absolute");
        if position != "absolute" {
            return Err(err(
                "position_embedding_type",
                format!("`{position}` is not supported (absolute)"),
            ));
        }
        let (hidden_size, num_heads) = (size("hidden_size")?, size("num_attention_heads")?);
        if hidden_size % num_heads != 0 {
            return Err(err(
                "num_attention_heads",
                format!("{num_heads} does not divide hidden_size {hidden_size}"),
            ));
        }
        let max_position_embeddings = size("max_position_embeddings")?;
        let (pooling, normalize) = sentence_head(dir)?;
        let max_seq_len = read_json(&dir.join("sentence_bert_config.json"))?
            .and_then(|c| c.get("max_seq_length").and_then(Value::as_u64))
            .map_or(max_position_embeddings, |m| {
                (m as usize).min(max_position_embeddings)
            });
        Ok(Self {
            vocab_size: size("vocab_size")?,
            hidden_size,
            num_layers: size("num_hidden_layers")?,
            num_heads,
            intermediate_size: size("intermediate_size")?,
            max_position_embeddings,
            type_vocab_size: size("type_vocab_size").unwrap_or(2),
            layer_norm_eps: config
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-12) as f32,
            activation,
            pooling,
            normalize,
            max_seq_len,
        })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

/// Pooling and normalization from the sentence-transformers files; a plain
/// Hugging Face directory gets mean pooling and unit-length vectors, the
/// usual choice for similarity search.
fn sentence_head(dir: &Path) -> Result<(Pooling, bool)> {
    let Some(modules) = read_json(&dir.join("modules.json"))? else {
        return Ok((Pooling::Mean, true));
    };
    let modules = modules.as_array().cloned().unwrap_or_default();
    let of_type = |suffix: &str| {
        modules.iter().find(|m| {
            m.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with(suffix))
        })
    };
    let normalize = of_type(".Normalize").is_some();
    let mut pooling = Pooling::Mean;
    if let Some(module) = of_type(".Pooling") {
        let sub = module.get("path").and_then(Value::as_str).unwrap_or("");
        let path = dir.join(sub).join("config.json");
        if let Some(c) = read_json(&path)? {
            let on = |k: &str| c.get(k).and_then(Value::as_bool).unwrap_or(false);
            pooling = if on("pooling_mode_cls_token") {
                Pooling::Cls
            } else if on("pooling_mode_max_tokens") {
                Pooling::Max
            } else if on("pooling_mode_mean_tokens") {
                Pooling::Mean
            } else {
                return Err(EngineError::Config {
                    path,
                    field: "pooling_mode_*".into(),
                    message: "no supported pooling mode (mean, cls, max) is on".into(),
                });
            };
        }
    }
    Ok((pooling, normalize))
}
