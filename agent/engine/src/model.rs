//! The Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2/2.5): RMSNorm,
//! RoPE with scaling, grouped-query attention over the paged KV cache,
//! SwiGLU, optional QKV bias, tied embeddings. Written once against
//! [`Backend`]; it never asks which device it runs on.

use std::path::Path;

use crate::backend::{AttentionShape, Backend, BatchLayout, KvCacheShape, RopeTable};
use crate::config::{ModelConfig, RopeScaling};
use crate::error::{EngineError, Result};
use crate::weights::Weights;

struct Layer<B: Backend> {
    input_norm: B::Weight,
    q: B::Weight,
    k: B::Weight,
    v: B::Weight,
    q_bias: Option<B::Weight>,
    k_bias: Option<B::Weight>,
    v_bias: Option<B::Weight>,
    o: B::Weight,
    o_bias: Option<B::Weight>,
    post_norm: B::Weight,
    gate: B::Weight,
    up: B::Weight,
    down: B::Weight,
}

/// A loaded decoder on backend `B`.
pub struct LlamaModel<B: Backend> {
    config: ModelConfig,
    backend: B,
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    norm: B::Weight,
    /// `None` when tied to the embedding.
    lm_head: Option<B::Weight>,
    rope: B::Rope,
}

impl<B: Backend> LlamaModel<B> {
    /// Loads `config.json` and the safetensors weights of `dir` onto
    /// `backend`, with a RoPE table for `max_positions` positions.
    pub fn load(dir: &Path, backend: B, max_positions: usize) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let weights = Weights::open(dir)?;
        Self::from_weights(config, &weights, backend, max_positions)
    }

    /// Builds the model from an opened weight set.
    pub fn from_weights(
        config: ModelConfig,
        weights: &Weights,
        backend: B,
        max_positions: usize,
    ) -> Result<Self> {
        let tied = config.tie_word_embeddings && !weights.contains("lm_head.weight");
        Self::from_loader(config, backend, max_positions, tied, |b, name, shape| {
            b.load_weight(&weights.get(name, shape)?)
        })
    }

    /// Builds the model from `load(backend, name, shape)`, which gives each
    /// tensor under its Hugging Face name (checked against `shape`);
    /// `tied` shares the embedding as the LM head. Benchmarks use this to
    /// make weights on the device.
    pub fn from_loader<L>(
        config: ModelConfig,
        backend: B,
        max_positions: usize,
        tied: bool,
        load: L,
    ) -> Result<Self>
    where
        L: Fn(&B, &str, &[usize]) -> Result<B::Weight>,
    {
        let c = &config;
        let (h, kv) = (c.hidden_size, c.num_kv_heads * c.head_dim);
        let qd = c.num_heads * c.head_dim;
        let load = |name: &str, shape: &[usize]| load(&backend, name, shape);
        let opt = |name: &str, shape: &[usize], on: bool| -> Result<Option<B::Weight>> {
            if on {
                load(name, shape).map(Some)
            } else {
                Ok(None)
            }
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_norm: load(&format!("{p}.input_layernorm.weight"), &[h])?,
                q: load(&format!("{p}.self_attn.q_proj.weight"), &[qd, h])?,
                k: load(&format!("{p}.self_attn.k_proj.weight"), &[kv, h])?,
                v: load(&format!("{p}.self_attn.v_proj.weight"), &[kv, h])?,
                q_bias: opt(&format!("{p}.self_attn.q_proj.bias"), &[qd], c.qkv_bias)?,
                k_bias: opt(&format!("{p}.self_attn.k_proj.bias"), &[kv], c.qkv_bias)?,
                v_bias: opt(&format!("{p}.self_attn.v_proj.bias"), &[kv], c.qkv_bias)?,
                o: load(&format!("{p}.self_attn.o_proj.weight"), &[h, qd])?,
                o_bias: opt(&format!("{p}.self_attn.o_proj.bias"), &[h], c.o_bias)?,
                post_norm: load(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate: load(
                    &format!("{p}.mlp.gate_proj.weight"),
                    &[c.intermediate_size, h],
                )?,
                up: load(
                    &format!("{p}.mlp.up_proj.weight"),
                    &[c.intermediate_size, h],
                )?,
                down: load(
                    &format!("{p}.mlp.down_proj.weight"),
                    &[h, c.intermediate_size],
                )?,
            });
        }
        let embed = load("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let lm_head = if tied {
            None
        } else {
            Some(load("lm_head.weight", &[c.vocab_size, h])?)
        };
        let norm = load("model.norm.weight", &[h])?;
        let rope = backend.load_rope(&rope_table(c, max_positions))?;
        Ok(Self {
            config,
            backend,
            embed,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Allocates a KV cache of `num_blocks` blocks of `block_size` tokens.
    pub fn alloc_kv_cache(&self, num_blocks: usize, block_size: usize) -> Result<B::KvCache> {
        self.backend
            .alloc_kv_cache(self.kv_cache_shape(num_blocks, block_size))
    }

    /// The KV cache shape for `num_blocks` blocks of `block_size` tokens.
    pub fn kv_cache_shape(&self, num_blocks: usize, block_size: usize) -> KvCacheShape {
        KvCacheShape {
            num_layers: self.config.num_layers,
            num_blocks,
            block_size,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Runs one step: computes every row of `layout`, writes their keys and
    /// values into `cache`, and returns the logits of `layout.logits_rows`
    /// (row-major, `vocab_size` per row).
    pub fn forward(&self, layout: &BatchLayout, cache: &mut B::KvCache) -> Result<Vec<f32>> {
        match self.forward_logits(layout, cache)? {
            Some(logits) => self.backend.to_host(&logits),
            None => Ok(Vec::new()),
        }
    }

    /// As [`forward`](Self::forward), leaving the logits on the device for
    /// [`Backend::sample`]; `None` when the step asks for no logits.
    pub fn forward_logits(
        &self,
        layout: &BatchLayout,
        cache: &mut B::KvCache,
    ) -> Result<Option<B::Tensor>> {
        if layout.num_rows() == 0 {
            return Err(EngineError::InvalidRequest("empty batch".into()));
        }
        let batch = self.backend.prepare(layout)?;
        if layout.logits_rows.is_empty() {
            self.layers(&batch, cache)?;
            return Ok(None);
        }
        let b = &self.backend;
        let logits = b.run_step(&batch, || {
            let x = self.layers(&batch, cache)?;
            let last = b.gather_logits_rows(&x, &batch)?;
            let normed = b.rms_norm(&last, &self.norm, self.config.rms_norm_eps as f32)?;
            b.logits(&normed, self.lm_head.as_ref().unwrap_or(&self.embed))
        })?;
        Ok(Some(logits))
    }

    /// Every decoder layer over the batch; returns the residual stream.
    fn layers(&self, batch: &B::Batch, cache: &mut B::KvCache) -> Result<B::Tensor> {
        let b = &self.backend;
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let shape = AttentionShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let mut x = b.embed(&self.embed, batch)?;
        let Some(first) = self.layers.first() else {
            return Ok(x);
        };
        let mut normed = b.rms_norm(&x, &first.input_norm, eps)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let mut q = b.linear(&normed, &layer.q, layer.q_bias.as_ref())?;
            let mut k = b.linear(&normed, &layer.k, layer.k_bias.as_ref())?;
            let v = b.linear(&normed, &layer.v, layer.v_bias.as_ref())?;
            drop(normed);
            b.rope(&mut q, &self.rope, batch, c.num_heads, c.head_dim)?;
            b.rope(&mut k, &self.rope, batch, c.num_kv_heads, c.head_dim)?;
            b.write_kv(cache, i, &k, &v, batch)?;
            drop((k, v));
            let attn = b.attention(&q, cache, i, batch, shape)?;
            drop(q);
            let attn_out = b.linear(&attn, &layer.o, layer.o_bias.as_ref())?;
            drop(attn);
            let post = b.add_rms_norm(&mut x, &attn_out, &layer.post_norm, eps)?;
            drop(attn_out);
            let gate = b.linear(&post, &layer.gate, None)?;
            let up = b.linear(&post, &layer.up, None)?;
            drop(post);
            let act = b.silu_mul(&gate, &up)?;
            drop((gate, up));
            let mlp = b.linear(&act, &layer.down, None)?;
            drop(act);
            // The next layer's input norm is fused with this residual add;
            // after the last layer only the add remains (the final norm runs
            // on the gathered logits rows).
            match self.layers.get(i + 1) {
                Some(next) => normed = b.add_rms_norm(&mut x, &mlp, &next.input_norm, eps)?,
                None => {
                    b.add_assign(&mut x, &mlp)?;
                    return Ok(x);
                }
            }
        }
        Ok(x)
    }
}

/// Inverse frequencies of each rotary pair, with the model's scaling
/// applied (as `transformers` computes them).
pub fn inv_freq(config: &ModelConfig) -> Vec<f64> {
    let dim = config.head_dim;
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / dim as f64))
        .collect();
    match config.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Factors(ref factors) => base.iter().zip(factors).map(|(f, d)| f / d).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// The cos/sin table for positions `0..max_positions`.
pub fn rope_table(config: &ModelConfig, max_positions: usize) -> RopeTable {
    let freqs = inv_freq(config);
    let half = freqs.len();
    let mut cos = Vec::with_capacity(max_positions * half);
    let mut sin = Vec::with_capacity(max_positions * half);
    for pos in 0..max_positions {
        for f in &freqs {
            // transformers computes the inverse frequency in f32 and the
            // angle in f32; matching that keeps long positions comparable.
            let angle = (pos as f32) * (*f as f32);
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    RopeTable {
        max_positions,
        half_dim: half,
        cos,
        sin,
    }
}
