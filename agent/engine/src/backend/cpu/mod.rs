//! The CPU backend: f32 activations, multithreaded with rayon. It is the
//! reference the CUDA backend is checked against, and it runs everywhere,
//! CI included.
//!
//! Weights are f32 ([`CpuWeight::Dense`]), or, for a GGUF file's quantized
//! tensors, the stored blocks ([`CpuWeight::Quant`], multiplied by the
//! kernels of [`quant`]: in f32 — for up to [`fused::MAX_FUSED_ROWS`]
//! activation rows on the fused dequantize-and-dot kernels of [`fused`],
//! above that on panels of rows dequantized for the `gemm` crate — or with 8-bit activations on the instruction set [`simd`]
//! detects). Dense f32 weights below [`sgemm::GEMM_MIN_ROWS`] rows take
//! a row-parallel dot-product kernel written here: decode (few rows) is
//! bound by reading the weights, and it reads each weight row once per
//! step. From there on (prefill, batched decode) the product is
//! compute-bound and goes through `gemm`'s blocked kernels ([`sgemm`]).

pub mod attention;
pub mod fused;
pub mod panel_t;
pub mod quant;
pub mod sgemm;
pub mod simd;

use rayon::prelude::*;

use super::{AttentionShape, Backend, BatchLayout, KvCacheShape, RopeTable, SampleResults};
use crate::error::{EngineError, Result};
use crate::sampler::{BatchRow, Sampler};
use crate::weights::{BlockArithmetic, TensorView, WeightDtype};
use quant::QuantMatrix;
use simd::Isa;

/// A row-major f32 matrix (`rows × cols`); vectors have one row.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows * cols` values.
    pub data: Vec<f32>,
}

impl CpuTensor {
    pub(crate) fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub(crate) fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// A weight on the CPU: f32 values, or a matrix of stored quantized blocks.
#[derive(Clone, Debug, PartialEq)]
pub enum CpuWeight {
    /// f32 values (vectors, and matrices stored unquantized or dequantized).
    Dense(CpuTensor),
    /// Q4_0, Q4_1 or Q8_0 blocks as the file stores them.
    Quant(QuantMatrix),
}

impl CpuWeight {
    /// The f32 values, when the weight is dense.
    pub fn dense(&self) -> Option<&CpuTensor> {
        match self {
            Self::Dense(t) => Some(t),
            Self::Quant(_) => None,
        }
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Self::Dense(t) => (t.rows, t.cols),
            Self::Quant(q) => (q.rows(), q.cols()),
        }
    }

    /// Bytes of memory the weight holds.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.data.len() * 4,
            Self::Quant(q) => q.bytes(),
        }
    }
}

impl From<CpuTensor> for CpuWeight {
    fn from(t: CpuTensor) -> Self {
        Self::Dense(t)
    }
}

/// Paged K and V blocks of every layer:
/// `[layer][block][offset][kv_head][head_dim]`, flattened.
pub struct CpuKvCache {
    shape: KvCacheShape,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl CpuKvCache {
    fn slot_width(&self) -> usize {
        self.shape.num_kv_heads * self.shape.head_dim
    }
}

/// The CPU backend.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    /// A stored weight widened to f32 (dequantized when it is blocks).
    pub fn load_dense(&self, view: &TensorView<'_>) -> Result<CpuTensor> {
        let (rows, cols) = super::matrix_shape(&view.shape)?;
        Ok(CpuTensor {
            rows,
            cols,
            data: view.to_f32(),
        })
    }
}

fn dense<'a>(what: &str, w: &'a CpuWeight) -> Result<&'a CpuTensor> {
    w.dense()
        .ok_or_else(|| shape_err(what, "needs an f32 weight, not quantized blocks".into()))
}

fn shape_err(what: &str, detail: String) -> EngineError {
    EngineError::Backend(format!("{what}: {detail}"))
}

/// Dot product with eight independent accumulators, so the compiler can
/// keep them in one vector register.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() / 8 * 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type KvCache = CpuKvCache;
    type Batch = BatchLayout;
    type Rope = RopeTable;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn load_weight(&self, view: &TensorView<'_>) -> Result<CpuWeight> {
        if let (WeightDtype::Ggml(ty, arith), [rows, cols]) = (view.dtype, view.shape.as_slice()) {
            let q = QuantMatrix::new(ty, arith, *rows, *cols, view.data.to_vec())
                .map_err(|e| shape_err("load_weight", e))?;
            return Ok(CpuWeight::Quant(q));
        }
        self.load_dense(view).map(CpuWeight::Dense)
    }

    fn load_rope(&self, table: &RopeTable) -> Result<RopeTable> {
        Ok(table.clone())
    }

    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<CpuKvCache> {
        let per_layer = shape.num_blocks * shape.block_size * shape.num_kv_heads * shape.head_dim;
        Ok(CpuKvCache {
            shape,
            k: (0..shape.num_layers)
                .map(|_| vec![0.0; per_layer])
                .collect(),
            v: (0..shape.num_layers)
                .map(|_| vec![0.0; per_layer])
                .collect(),
        })
    }

    fn prepare(&self, layout: &BatchLayout) -> Result<BatchLayout> {
        Ok(layout.clone())
    }

    fn embed(&self, table: &CpuWeight, batch: &BatchLayout) -> Result<CpuTensor> {
        let (vocab, cols) = table.shape();
        let mut out = CpuTensor::zeros(batch.token_ids.len(), cols);
        for (row, &id) in out.data.chunks_exact_mut(cols).zip(&batch.token_ids) {
            if id as usize >= vocab {
                return Err(shape_err("embed", format!("token {id} ≥ vocab {vocab}")));
            }
            match table {
                CpuWeight::Dense(t) => row.copy_from_slice(t.row(id as usize)),
                CpuWeight::Quant(q) => q.dequantize_row(id as usize, row),
            }
        }
        Ok(out)
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuWeight, eps: f32) -> Result<CpuTensor> {
        let weight = dense("rms_norm", weight)?;
        if weight.data.len() != x.cols {
            return Err(shape_err(
                "rms_norm",
                format!("{} vs {}", weight.data.len(), x.cols),
            ));
        }
        let mut out = x.clone();
        out.data.par_chunks_exact_mut(x.cols).for_each(|row| {
            let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            let scale = 1.0 / (mean_sq + eps).sqrt();
            for (v, w) in row.iter_mut().zip(&weight.data) {
                *v = *v * scale * w;
            }
        });
        Ok(out)
    }

    fn add_rms_norm(
        &self,
        x: &mut CpuTensor,
        delta: &CpuTensor,
        weight: &CpuWeight,
        eps: f32,
    ) -> Result<CpuTensor> {
        self.add_assign(x, delta)?;
        self.rms_norm(x, weight, eps)
    }

    fn logits(&self, x: &CpuTensor, w: &CpuWeight) -> Result<CpuTensor> {
        self.linear(x, w, None)
    }

    fn linear(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuWeight>) -> Result<CpuTensor> {
        let bias = bias.map(|b| dense("linear bias", b)).transpose()?;
        let w = match w {
            CpuWeight::Dense(w) => w,
            CpuWeight::Quant(q) => {
                if q.cols() != x.cols || bias.is_some_and(|b| b.data.len() != q.rows()) {
                    return Err(shape_err(
                        "linear",
                        format!("x has {} cols, w is {}x{}", x.cols, q.rows(), q.cols()),
                    ));
                }
                let bias = bias.map(|b| b.data.as_slice());
                return Ok(match q.arithmetic() {
                    BlockArithmetic::Q8 => quant::matmul(x, q, bias, Isa::detect()),
                    BlockArithmetic::F32 => quant::matmul_f32(x, q, bias),
                });
            }
        };
        if w.cols != x.cols {
            return Err(shape_err(
                "linear",
                format!("x has {} cols, w is {}x{}", x.cols, w.rows, w.cols),
            ));
        }
        if x.rows == 0 {
            return Ok(CpuTensor::zeros(0, w.rows));
        }
        if x.rows >= sgemm::GEMM_MIN_ROWS {
            return Ok(sgemm::linear(x, w, bias.map(|b| b.data.as_slice())));
        }
        // Transposed result: one output feature per task, so each weight row
        // is read once while every activation row stays in cache.
        let mut out_t = vec![0.0f32; w.rows * x.rows];
        out_t
            .par_chunks_exact_mut(x.rows)
            .enumerate()
            .for_each(|(j, col)| {
                let w_row = w.row(j);
                let b = bias.map_or(0.0, |b| b.data[j]);
                for (i, out) in col.iter_mut().enumerate() {
                    *out = dot(x.row(i), w_row) + b;
                }
            });
        let mut out = CpuTensor::zeros(x.rows, w.rows);
        for j in 0..w.rows {
            for i in 0..x.rows {
                out.data[i * w.rows + j] = out_t[j * x.rows + i];
            }
        }
        Ok(out)
    }

    fn rope(
        &self,
        x: &mut CpuTensor,
        rope: &RopeTable,
        batch: &BatchLayout,
        num_heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let half = head_dim / 2;
        if half != rope.half_dim || x.cols != num_heads * head_dim {
            return Err(shape_err(
                "rope",
                format!("head_dim {head_dim}, cols {}", x.cols),
            ));
        }
        if let Some(&p) = batch
            .positions
            .iter()
            .find(|&&p| p as usize >= rope.max_positions)
        {
            return Err(shape_err(
                "rope",
                format!("position {p} ≥ {}", rope.max_positions),
            ));
        }
        x.data
            .par_chunks_exact_mut(x.cols)
            .zip(&batch.positions)
            .for_each(|(row, &pos)| {
                let cos = &rope.cos[pos as usize * half..][..half];
                let sin = &rope.sin[pos as usize * half..][..half];
                for head in row.chunks_exact_mut(head_dim) {
                    let (lo, hi) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (lo[i], hi[i]);
                        lo[i] = a * cos[i] - b * sin[i];
                        hi[i] = b * cos[i] + a * sin[i];
                    }
                }
            });
        Ok(())
    }

    fn write_kv(
        &self,
        cache: &mut CpuKvCache,
        layer: usize,
        k: &CpuTensor,
        v: &CpuTensor,
        batch: &BatchLayout,
    ) -> Result<()> {
        let width = cache.slot_width();
        let slots = cache.shape.num_blocks * cache.shape.block_size;
        if k.cols != width || v.cols != width {
            return Err(shape_err(
                "write_kv",
                format!("{} cols, slot width {width}", k.cols),
            ));
        }
        for (row, &slot) in batch.slot_mapping.iter().enumerate() {
            let slot = slot as usize;
            if slot >= slots {
                return Err(shape_err("write_kv", format!("slot {slot} ≥ {slots}")));
            }
            cache.k[layer][slot * width..][..width].copy_from_slice(k.row(row));
            cache.v[layer][slot * width..][..width].copy_from_slice(v.row(row));
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &CpuTensor,
        cache: &CpuKvCache,
        layer: usize,
        batch: &BatchLayout,
        shape: AttentionShape,
    ) -> Result<CpuTensor> {
        let kv = attention::KvLayer {
            keys: &cache.k[layer],
            values: &cache.v[layer],
            block_size: cache.shape.block_size,
        };
        attention::attention(q, kv, batch, shape, attention::CHUNK_MIN_ROWS)
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        if gate.data.len() != up.data.len() {
            return Err(shape_err(
                "silu_mul",
                format!("{} vs {}", gate.data.len(), up.data.len()),
            ));
        }
        let mut out = gate.clone();
        out.data.par_iter_mut().zip(&up.data).for_each(|(g, u)| {
            *g = *g / (1.0 + (-*g).exp()) * u;
        });
        Ok(out)
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        if x.data.len() != y.data.len() {
            return Err(shape_err(
                "add_assign",
                format!("{} vs {}", x.data.len(), y.data.len()),
            ));
        }
        x.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn gather_logits_rows(&self, x: &CpuTensor, batch: &BatchLayout) -> Result<CpuTensor> {
        let mut out = CpuTensor::zeros(batch.logits_rows.len(), x.cols);
        for (dst, &row) in out.data.chunks_exact_mut(x.cols).zip(&batch.logits_rows) {
            dst.copy_from_slice(x.row(row as usize));
        }
        Ok(out)
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn run_step<F>(&self, _batch: &BatchLayout, mut forward: F) -> Result<CpuTensor>
    where
        F: FnMut() -> Result<CpuTensor>,
    {
        forward()
    }

    fn sample(&self, logits: CpuTensor, rows: &mut [BatchRow<'_>]) -> Result<SampleResults> {
        let sampler = Sampler::new(logits.cols).map_err(|e| shape_err("sample", e.to_string()))?;
        let mut data = logits.data;
        sampler
            .sample_batch(&mut data, rows)
            .map_err(|e| shape_err("sample", e.to_string()))
    }
}
