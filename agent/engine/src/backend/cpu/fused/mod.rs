//! Fused dequantize-and-dot kernels for small batches: the product
//! `x · Wᵀ` on stored blocks when `x` has one to four rows (decode).
//!
//! Each weight block is unpacked once, into registers (AVX2) or a small
//! stack buffer (portable), and multiplied with every activation row before
//! the next block is read, so a step reads the blocks once and never
//! writes dequantized rows to memory, as [`super::quant::matmul_f32`]'s
//! tile path does for larger batches.
//!
//! Guarantees: activations stay f32 (nothing is rounded to 8 bits), and
//! the portable kernels multiply the GGUF reference's dequantized weights.
//! The AVX2 kernels reassociate each weight's `d·q + m` as `d · Σ q·x +
//! m · Σ x` per group of 16 or 32 (the sums of `x` precomputed once per
//! product in [`Rows`]). Neither is bit-equal to the tile path: the order
//! of the f32 additions differs, and results agree with it to float
//! rounding (the tests bound the difference at 1e-5 of `Σ|w·x|`).
//!
//! Kernels: [`avx2`] (AVX2 + FMA + F16C, chosen when [`Isa::detect`] finds
//! AVX2 or AVX-512, so `WEIR_CPU_ISA=scalar` selects the portable kernels)
//! and [`portable`] everywhere else; NEON takes the portable kernels.

#[cfg(target_arch = "x86_64")]
pub mod avx2;
pub mod portable;
#[cfg(test)]
mod tests;

use rayon::prelude::*;

use super::CpuTensor;
use super::quant::{QuantMatrix, transpose_into};
use super::simd::Isa;
use crate::gguf::GgmlType;

/// Most activation rows the kernels take at once.
pub const MAX_ROWS: usize = 4;

/// Output features per rayon task.
const TASK_ROWS: usize = 16;

/// One to [`MAX_ROWS`] activation rows of equal length (a multiple of 16)
/// and the sum of every 16 consecutive values of each, for the kernels
/// that fold a block's offset into `m · Σ x`.
pub struct Rows<'a> {
    x: Vec<&'a [f32]>,
    sums: Vec<f32>,
}

impl<'a> Rows<'a> {
    /// Wraps `x` and sums it.
    ///
    /// # Panics
    /// On zero or more than [`MAX_ROWS`] rows, rows of unequal lengths or
    /// lengths that are not a multiple of 16.
    pub fn new(x: Vec<&'a [f32]>) -> Self {
        assert!((1..=MAX_ROWS).contains(&x.len()), "{} rows", x.len());
        let cols = x[0].len();
        assert!(cols.is_multiple_of(16) && x.iter().all(|r| r.len() == cols));
        let sums = x
            .iter()
            .flat_map(|r| r.chunks_exact(16).map(|c| c.iter().sum::<f32>()))
            .collect();
        Self { x, sums }
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.x.len()
    }

    /// Never: a `Rows` holds at least one row.
    pub fn is_empty(&self) -> bool {
        self.x.is_empty()
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.x[0].len()
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &'a [f32] {
        self.x[i]
    }

    /// Sums of 16 of row `i`.
    pub fn sums(&self, i: usize) -> &[f32] {
        let n = self.cols() / 16;
        &self.sums[i * n..][..n]
    }
}

/// `out[r] = Σ w · x.row(r)` for one weight row `w` (whole blocks of `ty`)
/// as long as the rows, on the AVX2 kernels when `isa` is AVX2 or better
/// and the processor has them, else on the portable ones.
pub fn dot_rows(isa: Isa, ty: GgmlType, w: &[u8], x: &Rows<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && avx2::available() {
        return avx2::dot_rows(ty, w, x, out);
    }
    let _ = isa;
    portable::dot_rows(ty, w, &x.x, out)
}

/// `blocks` of `ty` (whole rows, back to back) dequantized into `out`,
/// bit for bit as [`portable::dequantize`]: with AVX2 for Q4_0, Q4_1 and
/// Q8_0 when `isa` allows and the processor has it, else portably.
pub fn dequantize(isa: Isa, ty: GgmlType, blocks: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && avx2::dequantize(ty, blocks, out) {
        return;
    }
    let _ = isa;
    portable::dequantize(ty, blocks, out)
}

/// Most activation rows [`matmul`] takes: up to this many, a weight row
/// read once from memory and kept in L1 while groups of [`MAX_ROWS`] rows
/// pass costs less than the `gemm` path's dequantized panels. Measured
/// with `cpu_bench` on SmolLM2 Q4_1, 2 threads: 8 sequences decoding
/// 90–122 tok/s on `gemm`, 160–189 here; at 32 rows 155 here against
/// 169–210 on `gemm`.
pub const MAX_FUSED_ROWS: usize = 16;

/// `x · wᵀ (+ bias)` for `x` of one to [`MAX_FUSED_ROWS`] rows, taken in
/// groups of up to [`MAX_ROWS`]: output features spread over rayon's
/// threads [`TASK_ROWS`] at a time, each weight row multiplied with every
/// group before the next.
///
/// # Panics
/// On zero or more than [`MAX_FUSED_ROWS`] rows, or shapes that differ.
pub fn matmul(x: &CpuTensor, w: &QuantMatrix, bias: Option<&[f32]>, isa: Isa) -> CpuTensor {
    let (m, n) = (x.rows, w.rows());
    assert!((1..=MAX_FUSED_ROWS).contains(&m), "{m} rows");
    assert_eq!(x.cols, w.cols());
    let groups: Vec<Rows<'_>> = (0..m)
        .step_by(MAX_ROWS)
        .map(|g| Rows::new((g..m.min(g + MAX_ROWS)).map(|i| x.row(i)).collect()))
        .collect();
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(TASK_ROWS * m)
        .enumerate()
        .for_each(|(t, tile)| {
            for (jj, col) in tile.chunks_exact_mut(m).enumerate() {
                let j = t * TASK_ROWS + jj;
                for (rows, out) in groups.iter().zip(col.chunks_mut(MAX_ROWS)) {
                    dot_rows(isa, w.ty(), w.row(j), rows, out);
                }
                if let Some(bias) = bias {
                    col.iter_mut().for_each(|o| *o += bias[j]);
                }
            }
        });
    transpose_into(&out_t, m, n)
}
