//! The sentence encoder: a BERT-family model (e.g. all-MiniLM-L6-v2) that
//! turns text into one unit-length vector, for `/v1/embeddings` and the
//! semantic cache. It runs on the CPU backend's matrix products; the
//! LayerNorm, GELU and bidirectional attention it needs beyond the decoder's
//! are here. Inputs are packed back to back (no padding), so a batch costs
//! only its real tokens.

mod config;
mod text;

pub use config::{Activation, EncoderConfig, Pooling, is_encoder_dir};
pub use text::{Embedding, TextEmbedder, Truncation};

use std::path::Path;

use rayon::prelude::*;

use crate::backend::Backend;
use crate::backend::cpu::{CpuBackend, CpuTensor, CpuWeight};
use crate::error::{EngineError, Result};
use crate::weights::Weights;

struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

struct Layer {
    q: (CpuWeight, CpuWeight),
    k: (CpuWeight, CpuWeight),
    v: (CpuWeight, CpuWeight),
    attn_out: (CpuWeight, CpuWeight),
    attn_norm: Norm,
    up: (CpuWeight, CpuWeight),
    down: (CpuWeight, CpuWeight),
    out_norm: Norm,
}

/// A loaded BERT encoder with its pooling head.
pub struct BertEncoder {
    config: EncoderConfig,
    backend: CpuBackend,
    word: CpuTensor,
    position: CpuTensor,
    token_type: CpuTensor,
    embed_norm: Norm,
    layers: Vec<Layer>,
}

impl BertEncoder {
    /// Loads `config.json`, the sentence-transformers files and the
    /// safetensors weights of `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = EncoderConfig::from_dir(dir)?;
        let weights = Weights::open(dir)?;
        Self::from_weights(config, &weights)
    }

    /// Builds the encoder from opened weights; tensor names may carry the
    /// `bert.` prefix of `BertFor*` checkpoints.
    pub fn from_weights(config: EncoderConfig, weights: &Weights) -> Result<Self> {
        let backend = CpuBackend;
        let prefix = if weights.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let c = &config;
        let (h, ff) = (c.hidden_size, c.intermediate_size);
        let load = |name: &str, shape: &[usize]| {
            backend.load_dense(&weights.get(&format!("{prefix}{name}"), shape)?)
        };
        let dense = |name: &str, out: usize, inp: usize| -> Result<(CpuWeight, CpuWeight)> {
            Ok((
                load(&format!("{name}.weight"), &[out, inp])?.into(),
                load(&format!("{name}.bias"), &[out])?.into(),
            ))
        };
        let norm = |name: &str| -> Result<Norm> {
            Ok(Norm {
                weight: load(&format!("{name}.weight"), &[h])?.data,
                bias: load(&format!("{name}.bias"), &[h])?.data,
            })
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                q: dense(&format!("{p}.attention.self.query"), h, h)?,
                k: dense(&format!("{p}.attention.self.key"), h, h)?,
                v: dense(&format!("{p}.attention.self.value"), h, h)?,
                attn_out: dense(&format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                up: dense(&format!("{p}.intermediate.dense"), ff, h)?,
                down: dense(&format!("{p}.output.dense"), h, ff)?,
                out_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(Self {
            word: load("embeddings.word_embeddings.weight", &[c.vocab_size, h])?,
            position: load(
                "embeddings.position_embeddings.weight",
                &[c.max_position_embeddings, h],
            )?,
            token_type: load(
                "embeddings.token_type_embeddings.weight",
                &[c.type_vocab_size, h],
            )?,
            embed_norm: norm("embeddings.LayerNorm")?,
            layers,
            backend,
            config,
        })
    }

    /// The encoder's configuration.
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    /// Width of the sentence vectors.
    pub fn dim(&self) -> usize {
        self.config.hidden_size
    }

    /// One sentence vector per input (token ids with their special tokens).
    pub fn encode(&self, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        for (i, ids) in inputs.iter().enumerate() {
            if ids.is_empty() || ids.len() > c.max_position_embeddings {
                return Err(EngineError::InvalidRequest(format!(
                    "input {i} has {} tokens; an encoder input needs 1 to {}",
                    ids.len(),
                    c.max_position_embeddings
                )));
            }
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(EngineError::InvalidRequest(format!(
                    "input {i}: token {bad} is outside the vocabulary ({})",
                    c.vocab_size
                )));
            }
        }
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let spans = spans(inputs);
        let mut x = self.embed(inputs);
        for layer in &self.layers {
            x = self.layer(layer, x, &spans)?;
        }
        Ok(spans.iter().map(|&(s, n)| self.pool(&x, s, n)).collect())
    }

    fn embed(&self, inputs: &[Vec<u32>]) -> CpuTensor {
        let h = self.config.hidden_size;
        let rows: usize = inputs.iter().map(Vec::len).sum();
        let mut x = CpuTensor {
            rows,
            cols: h,
            data: Vec::with_capacity(rows * h),
        };
        let token_type = &self.token_type.data[..h];
        for ids in inputs {
            for (pos, &id) in ids.iter().enumerate() {
                let word = &self.word.data[id as usize * h..][..h];
                let position = &self.position.data[pos * h..][..h];
                x.data.extend(
                    word.iter()
                        .zip(position)
                        .zip(token_type)
                        .map(|((w, p), t)| w + p + t),
                );
            }
        }
        layer_norm(&mut x, &self.embed_norm, self.config.layer_norm_eps);
        x
    }

    fn layer(&self, layer: &Layer, x: CpuTensor, spans: &[(usize, usize)]) -> Result<CpuTensor> {
        let b = &self.backend;
        let eps = self.config.layer_norm_eps;
        let linear = |x: &CpuTensor, (w, bias): &(CpuWeight, CpuWeight)| b.linear(x, w, Some(bias));
        let q = linear(&x, &layer.q)?;
        let k = linear(&x, &layer.k)?;
        let v = linear(&x, &layer.v)?;
        let context = attention(&q, &k, &v, spans, self.config.num_heads);
        let mut h = linear(&context, &layer.attn_out)?;
        b.add_assign(&mut h, &x)?;
        layer_norm(&mut h, &layer.attn_norm, eps);
        let mut up = linear(&h, &layer.up)?;
        activate(&mut up, self.config.activation);
        let mut out = linear(&up, &layer.down)?;
        b.add_assign(&mut out, &h)?;
        layer_norm(&mut out, &layer.out_norm, eps);
        Ok(out)
    }

    fn pool(&self, x: &CpuTensor, start: usize, len: usize) -> Vec<f32> {
        let h = x.cols;
        let rows = x.data[start * h..(start + len) * h].chunks_exact(h);
        let mut v = match self.config.pooling {
            Pooling::Cls => x.data[start * h..][..h].to_vec(),
            Pooling::Mean => {
                let mut acc = vec![0.0f32; h];
                for row in rows {
                    acc.iter_mut().zip(row).for_each(|(a, r)| *a += r);
                }
                acc.iter_mut().for_each(|a| *a /= len as f32);
                acc
            }
            Pooling::Max => {
                let mut acc = vec![f32::NEG_INFINITY; h];
                for row in rows {
                    acc.iter_mut().zip(row).for_each(|(a, r)| *a = a.max(*r));
                }
                acc
            }
        };
        if self.config.normalize {
            normalize(&mut v);
        }
        v
    }
}

/// `(first row, rows)` of each input in the packed batch.
fn spans(inputs: &[Vec<u32>]) -> Vec<(usize, usize)> {
    let mut start = 0;
    inputs
        .iter()
        .map(|ids| {
            let span = (start, ids.len());
            start += ids.len();
            span
        })
        .collect()
}

/// Scales `v` to unit length (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

fn layer_norm(x: &mut CpuTensor, norm: &Norm, eps: f32) {
    x.data.par_chunks_exact_mut(x.cols).for_each(|row| {
        let n = row.len() as f32;
        let mean = row.iter().sum::<f32>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let scale = 1.0 / (var + eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(&norm.weight).zip(&norm.bias) {
            *v = (*v - mean) * scale * w + b;
        }
    });
}

fn activate(x: &mut CpuTensor, activation: Activation) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    x.data.par_iter_mut().for_each(|v| {
        *v = match activation {
            Activation::Gelu => 0.5 * *v * (1.0 + libm::erff(*v / std::f32::consts::SQRT_2)),
            Activation::GeluTanh => {
                0.5 * *v * (1.0 + (SQRT_2_OVER_PI * (*v + 0.044_715 * *v * *v * *v)).tanh())
            }
            Activation::Relu => v.max(0.0),
        }
    });
}

/// Bidirectional attention within each input: one task per (row, head).
fn attention(
    q: &CpuTensor,
    k: &CpuTensor,
    v: &CpuTensor,
    spans: &[(usize, usize)],
    num_heads: usize,
) -> CpuTensor {
    let width = q.cols;
    let head_dim = width / num_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut row_span = vec![(0, 0); q.rows];
    for &(start, len) in spans {
        row_span[start..start + len].fill((start, len));
    }
    let mut out = CpuTensor {
        rows: q.rows,
        cols: width,
        data: vec![0.0; q.rows * width],
    };
    out.data
        .par_chunks_exact_mut(head_dim)
        .enumerate()
        .for_each(|(task, out_head)| {
            let (row, head) = (task / num_heads, task % num_heads);
            let (start, len) = row_span[row];
            let off = head * head_dim;
            let qh = &q.data[row * width + off..][..head_dim];
            let mut scores: Vec<f32> = (start..start + len)
                .map(|t| {
                    let kh = &k.data[t * width + off..][..head_dim];
                    qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>() * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in &mut scores {
                *s = (*s - max).exp();
                sum += *s;
            }
            for (t, p) in (start..start + len).zip(&scores) {
                let vh = &v.data[t * width + off..][..head_dim];
                for (o, x) in out_head.iter_mut().zip(vh) {
                    *o += p / sum * x;
                }
            }
        });
    out
}
