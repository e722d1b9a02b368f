//! GGUF model files (llama.cpp's format): the container ([`reader`]), the
//! tensor types and their dequantization ([`dequant`]), the model config
//! ([`config`]) and the tokenizer with its chat template ([`tokenizer`]).
//!
//! Written here rather than taken from a crate: the GGUF crates on
//! crates.io are young single-author readers that either lack the K-quants
//! or dequantize with their own arithmetic, while the engine needs every
//! type bit-exact against llama.cpp's reference, errors that name the file,
//! the tensor and the type, and raw quantized blocks for quantized kernels
//! later. The format itself is small.
//!
//! [`GgufWeights`] serves tensors under their Hugging Face names to
//! [`crate::model::LlamaModel`], as stored ([`GgufWeights::tensor_raw`]:
//! the CPU backend keeps Q4_0, Q4_1 and Q8_0 blocks and multiplies them
//! directly) or dequantized to f32 ([`GgufWeights::tensor_f32`]), with the
//! Q/K rows that llama.cpp's converter permutes for Llama and Mistral put
//! back in the order `transformers` uses ([`unpermute_rows`]).

pub mod config;
pub mod dequant;
pub mod reader;
pub mod tokenizer;

use std::path::Path;

pub use dequant::GgmlType;
pub use reader::{GgufFile, MetaValue, TensorInfo};

use crate::config::Architecture;
use crate::error::{EngineError, Result};

/// Whether `path` names a GGUF model (a file, not a Hugging Face directory).
pub fn is_gguf(path: &Path) -> bool {
    path.is_file()
}

/// The GGUF name of a tensor the model asks for by its Hugging Face name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_owned());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let (module, suffix) = part.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{suffix}"))
}

/// Undoes llama.cpp's Q/K permutation on whole rows: within each of `heads`
/// heads the converter interleaves the two rotary halves (row
/// `2i + half` of the file is row `half × d/2 + i` of `transformers`).
/// Rows are `row_bytes` long and may hold quantized blocks.
pub fn unpermute_rows(data: &[u8], heads: usize, row_bytes: usize) -> Vec<u8> {
    let rows = data.len() / row_bytes;
    let per_head = rows / heads;
    let half = per_head / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for part in 0..2 {
            for i in 0..half {
                let dst = h * per_head + part * half + i;
                let src = h * per_head + 2 * i + part;
                out[dst * row_bytes..][..row_bytes]
                    .copy_from_slice(&data[src * row_bytes..][..row_bytes]);
            }
        }
    }
    out
}

/// A GGUF file's tensors, as the model loads them.
pub struct GgufWeights {
    file: GgufFile,
    /// Q heads and KV heads, when Q/K rows must be unpermuted.
    permuted_heads: Option<(usize, usize)>,
}

impl GgufWeights {
    /// Opens `path` for a model of `architecture` with `heads` and
    /// `kv_heads` attention heads.
    pub fn new(file: GgufFile, architecture: Architecture, heads: usize, kv_heads: usize) -> Self {
        Self {
            file,
            permuted_heads: config::qk_permuted(architecture).then_some((heads, kv_heads)),
        }
    }

    /// The parsed file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// Whether the model's tensor `hf_name` is in the file.
    pub fn contains(&self, hf_name: &str) -> bool {
        gguf_name(hf_name).is_some_and(|n| self.file.tensor_info(&n).is_some())
    }

    /// The tensor `hf_name` dequantized to f32 (Q/K rows in `transformers`
    /// order), checked against `shape` when given. Returns its shape too.
    pub fn tensor_f32(
        &self,
        hf_name: &str,
        shape: Option<&[usize]>,
    ) -> Result<(Vec<usize>, Vec<f32>)> {
        let (ty, stored, data) = self.tensor_raw(hf_name, shape)?;
        let mut out = vec![0f32; stored.iter().product()];
        dequant::dequantize(ty, &data, &mut out);
        Ok((stored, out))
    }

    /// The tensor `hf_name` as stored: its type, shape and blocks (borrowed
    /// from the memory map, or copied when Q/K rows are unpermuted into
    /// `transformers` order), checked against `shape` when given.
    pub fn tensor_raw(
        &self,
        hf_name: &str,
        shape: Option<&[usize]>,
    ) -> Result<(GgmlType, Vec<usize>, std::borrow::Cow<'_, [u8]>)> {
        let path = self.file.path().to_path_buf();
        let err = |tensor: String, message: String| EngineError::Weights {
            path: path.clone(),
            tensor,
            message,
        };
        let name = gguf_name(hf_name)
            .ok_or_else(|| err(hf_name.to_owned(), "no GGUF name for this tensor".into()))?;
        let info = self
            .file
            .tensor_info(&name)
            .ok_or_else(|| err(format!("{name} ({hf_name})"), "missing".into()))?;
        let stored = info.shape();
        if let Some(shape) = shape
            && stored != shape
        {
            return Err(err(
                format!("{name} ({hf_name})"),
                format!("{} shape {stored:?}, expected {shape:?}", info.ty.name()),
            ));
        }
        let mut data = std::borrow::Cow::Borrowed(self.file.tensor_data(info));
        let heads = match (self.permuted_heads, hf_name.rsplit('.').nth(1)) {
            (Some((q, _)), Some("q_proj")) => Some(q),
            (Some((_, kv)), Some("k_proj")) => Some(kv),
            _ => None,
        };
        if let Some(heads) = heads {
            let rows = stored.first().copied().unwrap_or(0);
            if heads == 0 || rows % (2 * heads) != 0 {
                return Err(err(
                    format!("{name} ({hf_name})"),
                    format!("{rows} rows do not split into {heads} heads of rotary pairs"),
                ));
            }
            data = unpermute_rows(&data, heads, data.len() / rows).into();
        }
        Ok((info.ty, stored, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_gguf() {
        let n = |s: &str| gguf_name(s);
        assert_eq!(
            n("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(
            n("model.layers.7.self_attn.k_proj.bias").as_deref(),
            Some("blk.7.attn_k.bias")
        );
        assert_eq!(
            n("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(n("model.layers.0.mlp.experts.weight"), None);
    }

    #[test]
    fn unpermute_inverts_the_converters_permutation() {
        // One head of 4 rows of 1 byte, then a second head: the converter
        // writes HF rows [0 1 | 2 3] as [0 2 1 3].
        let file = [0u8, 2, 1, 3, 4, 6, 5, 7];
        assert_eq!(unpermute_rows(&file, 2, 1), vec![0, 1, 2, 3, 4, 5, 6, 7]);
        let rows2 = [0u8, 0, 2, 2, 1, 1, 3, 3];
        assert_eq!(unpermute_rows(&rows2, 1, 2), vec![0, 0, 1, 1, 2, 2, 3, 3]);
    }
}
