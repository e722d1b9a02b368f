//! The interface between the model and the hardware it runs on.
//!
//! The model code calls these operations and never branches on the device:
//! the CPU backend (f32, the reference, runs everywhere) and the CUDA
//! backend implement the same trait. Per-step metadata (positions, KV slots,
//! block tables) is handed over once per step through [`Backend::prepare`],
//! so a device backend can upload it in one copy and keep every operation
//! asynchronous.

pub mod cpu;
pub mod cuda;

use crate::error::Result;
use crate::sampler::{BatchRow, SampleOutput, SamplerError};
use crate::weights::TensorView;

/// Each sampled row's outcome: a token, or why that row could not be
/// sampled (the other rows are unaffected).
pub type SampleResults = Vec<std::result::Result<SampleOutput, SamplerError>>;

/// Where one sequence's rows sit in a batch and which KV blocks hold its
/// context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLayout {
    /// First row of the batch that belongs to the sequence.
    pub query_start: usize,
    /// Rows (tokens computed this step) of the sequence.
    pub query_len: usize,
    /// Tokens of context after this step (cached plus new); the new tokens
    /// sit at positions `context_len - query_len .. context_len`.
    pub context_len: usize,
    /// KV blocks holding positions `0..context_len`, in order.
    pub block_table: Vec<u32>,
}

/// Host-side description of one engine step: the tokens to compute, where
/// their keys and values go, and which rows need logits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchLayout {
    /// Token id of each row.
    pub token_ids: Vec<u32>,
    /// Position of each row within its sequence.
    pub positions: Vec<u32>,
    /// KV slot of each row: `block * block_size + offset`.
    pub slot_mapping: Vec<u32>,
    /// The sequences, in row order.
    pub seqs: Vec<SeqLayout>,
    /// Rows whose logits are returned, in output order.
    pub logits_rows: Vec<u32>,
}

impl BatchLayout {
    /// Appends a sequence that computes `tokens` at positions
    /// `start_pos..start_pos + tokens.len()`, its KV cache laid out in
    /// `block_table` blocks of `block_size`; `want_logits` asks for the
    /// logits of its last row.
    pub fn push_seq(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
        block_table: &[u32],
        block_size: usize,
        want_logits: bool,
    ) {
        let query_start = self.token_ids.len();
        for (i, &token) in tokens.iter().enumerate() {
            let pos = start_pos + i;
            self.token_ids.push(token);
            self.positions.push(pos as u32);
            let block = block_table[pos / block_size];
            self.slot_mapping
                .push(block * block_size as u32 + (pos % block_size) as u32);
        }
        if want_logits && !tokens.is_empty() {
            self.logits_rows
                .push((query_start + tokens.len() - 1) as u32);
        }
        self.seqs.push(SeqLayout {
            query_start,
            query_len: tokens.len(),
            context_len: start_pos + tokens.len(),
            block_table: block_table.to_vec(),
        });
    }

    /// Rows in the batch.
    pub fn num_rows(&self) -> usize {
        self.token_ids.len()
    }
}

/// Shape of the paged KV cache: per layer, `num_blocks` blocks of
/// `block_size` tokens × `num_kv_heads` × `head_dim` for K and for V.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheShape {
    /// Decoder layers.
    pub num_layers: usize,
    /// Blocks per layer.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// `(rows, cols)` of a stored weight: a matrix, or a vector as one row.
pub(crate) fn matrix_shape(shape: &[usize]) -> Result<(usize, usize)> {
    match shape {
        [n] => Ok((1, *n)),
        [r, c] => Ok((*r, *c)),
        other => Err(crate::error::EngineError::Backend(format!(
            "load_weight: unsupported rank {other:?}"
        ))),
    }
}

/// Head counts for attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// Cosine and sine of every (position, frequency) pair, position-major:
/// `cos[pos * half + i]` with `half = head_dim / 2`.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeTable {
    /// Positions covered.
    pub max_positions: usize,
    /// Half the head width.
    pub half_dim: usize,
    /// Cosines.
    pub cos: Vec<f32>,
    /// Sines.
    pub sin: Vec<f32>,
}

/// The operations a Llama-family decoder needs. Activations are 2-D:
/// one row per token.
pub trait Backend: Send {
    /// Activations on the device.
    type Tensor;
    /// A weight (matrix `[out, in]` or vector) on the device.
    type Weight;
    /// The paged KV cache of every layer.
    type KvCache;
    /// One step's metadata on the device.
    type Batch;
    /// The RoPE table on the device.
    type Rope;

    /// Short name for logs and metrics (`cpu`, `cuda`).
    fn name(&self) -> &'static str;
    /// Copies a stored weight to the device in the backend's compute type.
    fn load_weight(&self, view: &TensorView<'_>) -> Result<Self::Weight>;
    /// Copies the RoPE table to the device.
    fn load_rope(&self, table: &RopeTable) -> Result<Self::Rope>;
    /// Allocates the KV cache (zeroed).
    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<Self::KvCache>;
    /// Uploads a step's metadata.
    fn prepare(&self, layout: &BatchLayout) -> Result<Self::Batch>;

    /// Rows of `table` for the batch's token ids.
    fn embed(&self, table: &Self::Weight, batch: &Self::Batch) -> Result<Self::Tensor>;
    /// RMSNorm of each row, scaled by `weight`.
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Weight, eps: f32) -> Result<Self::Tensor>;
    /// `x += delta`, then the RMSNorm of `x` scaled by `weight`: the
    /// residual add and the next norm in one pass.
    fn add_rms_norm(
        &self,
        x: &mut Self::Tensor,
        delta: &Self::Tensor,
        weight: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// `x · wᵀ (+ bias)` for `w` of shape `[out, in]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Result<Self::Tensor>;
    /// `x · wᵀ` for the LM head: like [`linear`](Self::linear), with logits
    /// kept in f32.
    fn logits(&self, x: &Self::Tensor, w: &Self::Weight) -> Result<Self::Tensor>;
    /// Rotates each head of each row by its position (rotate-half layout).
    fn rope(
        &self,
        x: &mut Self::Tensor,
        rope: &Self::Rope,
        batch: &Self::Batch,
        num_heads: usize,
        head_dim: usize,
    ) -> Result<()>;
    /// Stores each row's key and value in its KV slot of `layer`.
    fn write_kv(
        &self,
        cache: &mut Self::KvCache,
        layer: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
        batch: &Self::Batch,
    ) -> Result<()>;
    /// Causal attention of each row over its sequence's cached context in
    /// `layer` (grouped-query: query head `h` reads KV head `h / group`).
    fn attention(
        &self,
        q: &Self::Tensor,
        cache: &Self::KvCache,
        layer: usize,
        batch: &Self::Batch,
        shape: AttentionShape,
    ) -> Result<Self::Tensor>;
    /// `silu(gate) * up`, element-wise.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// The batch's logits rows of `x`.
    fn gather_logits_rows(&self, x: &Self::Tensor, batch: &Self::Batch) -> Result<Self::Tensor>;
    /// Copies a tensor to the host, row-major.
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>>;

    /// Runs one step's forward pass, `forward`, for `batch`. A backend may
    /// record the work and replay it for later steps of the same shape
    /// (CUDA graphs), and may call `forward` again if a recording fails;
    /// the CPU backend just calls it once.
    fn run_step<F>(&self, batch: &Self::Batch, forward: F) -> Result<Self::Tensor>
    where
        F: FnMut() -> Result<Self::Tensor>;

    /// Samples the next token of each row of `logits` (consumed: it is
    /// scratch for the penalties; one row per entry of
    /// `rows`, in order), each with its own parameters, history and
    /// generator. Only token ids (and asked-for log probabilities) need
    /// reach the host.
    fn sample(&self, logits: Self::Tensor, rows: &mut [BatchRow<'_>]) -> Result<SampleResults>;
}
