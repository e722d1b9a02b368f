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
//! the weights the kernels multiply equal the GGUF reference
//! dequantization bit for bit; only the order of the f32 additions (eight
//! lanes, several accumulators, FMA on AVX2) differs from the dense dot
//! product, so results agree with the tile path to float rounding (the
//! tests bound it at 1e-5 of `Σ|w·x|`), not bit for bit.
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

/// `out[r] = Σ w · xs[r]` for one weight row `w` (whole blocks of `ty`)
/// and one to four activation rows `xs` as long as the row, on the AVX2
/// kernels when `isa` is AVX2 or better and the processor has them, else
/// on the portable ones.
pub fn dot_rows(isa: Isa, ty: GgmlType, w: &[u8], xs: &[&[f32]], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && avx2::available() {
        return avx2::dot_rows(ty, w, xs, out);
    }
    let _ = isa;
    portable::dot_rows(ty, w, xs, out)
}

/// `x · wᵀ (+ bias)` for `x` of one to [`MAX_ROWS`] rows, output features
/// spread over rayon's threads [`TASK_ROWS`] at a time.
pub fn matmul(x: &CpuTensor, w: &QuantMatrix, bias: Option<&[f32]>, isa: Isa) -> CpuTensor {
    let (m, n) = (x.rows, w.rows());
    assert!((1..=MAX_ROWS).contains(&m), "{m} rows");
    assert_eq!(x.cols, w.cols());
    let xs: Vec<&[f32]> = (0..m).map(|i| x.row(i)).collect();
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(TASK_ROWS * m)
        .enumerate()
        .for_each(|(t, tile)| {
            for (jj, col) in tile.chunks_exact_mut(m).enumerate() {
                let j = t * TASK_ROWS + jj;
                dot_rows(isa, w.ty(), w.row(j), &xs, col);
                if let Some(bias) = bias {
                    col.iter_mut().for_each(|o| *o += bias[j]);
                }
            }
        });
    transpose_into(&out_t, m, n)
}
