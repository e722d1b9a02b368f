//! Weights kept in the block format a GGUF file stores them in, and the
//! matrix product `x · Wᵀ` on them, in one of two arithmetics
//! ([`BlockArithmetic`]).
//!
//! [`matmul_f32`] (every quantized type): for one to [`MAX_FUSED_ROWS`]
//! activation rows (decode and decode batches) the fused kernels of
//! [`super::fused`], which unpack each block into registers once per
//! group of four rows; above that [`super::sgemm::matmul_blocks`] (panels
//! of dequantized rows through `gemm`). Both agree with weights
//! dequantized at load to float rounding.
//! [`matmul_f32_tiled`] dequantizes a tile of weight rows with the GGUF
//! reference arithmetic into a buffer that stays in cache and takes the
//! dense path's dot products, equal to weights dequantized at load bit
//! for bit (the reference the others are tested against).
//!
//! [`MAX_FUSED_ROWS`]: super::fused::MAX_FUSED_ROWS
//!
//! [`matmul`] (Q4_0, Q4_1, Q8_0): as in llama.cpp (`ggml_vec_dot_q4_1_q8_1` and friends), each row of `x`
//! is first rounded to 8 bits per 32-element block ([`Q8Rows`]: a scale
//! `d = max|x| / 127`, the rounded values and `d · Σq`), so that a block's
//! dot product is an integer sum scaled once. The scalar kernel
//! ([`dot_scalar`]) is the reference; the SIMD kernels in [`super::simd`]
//! compute the same integer sums and differ from it only in the order of
//! the f32 additions across blocks.
//!
//! [`matmul`] spreads tiles of weight rows over rayon's threads; within a
//! tile every activation row is multiplied by every weight row, four
//! activation rows per pass over a block, so each weight block is read from
//! memory once per call whatever the batch size.

use half::f16;
use rayon::prelude::*;

use super::simd::Isa;
use super::{CpuTensor, dot};
use crate::gguf::GgmlType;
use crate::weights::BlockArithmetic;

/// Elements per block of every type here.
pub const QK: usize = 32;

/// Weight rows per rayon task: sixteen rows of up to 1,152 bytes (Q8_0 at
/// 1,024 columns) stay in L1 while the activation rows stream past.
const TILE_ROWS: usize = 16;

/// A `[rows, cols]` weight matrix as stored blocks, row-major: row `j` is
/// `cols / 32` blocks of its type.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantMatrix {
    ty: GgmlType,
    arith: BlockArithmetic,
    rows: usize,
    cols: usize,
    blocks: Vec<u8>,
}

impl QuantMatrix {
    /// Wraps `blocks` of `ty` as a `rows × cols` matrix multiplied with
    /// `arith`; errors name what does not fit (a type `arith` has no
    /// kernel for, columns not whole blocks, a length that is not `rows`
    /// rows).
    pub fn new(
        ty: GgmlType,
        arith: BlockArithmetic,
        rows: usize,
        cols: usize,
        blocks: Vec<u8>,
    ) -> Result<Self, String> {
        let fits = match arith {
            BlockArithmetic::Q8 => crate::weights::BLOCK_TYPES.contains(&ty),
            BlockArithmetic::F32 => ty.block_elems() > 1,
        };
        if !fits {
            return Err(format!("{} weights have no {arith:?} kernel", ty.name()));
        }
        if !cols.is_multiple_of(ty.block_elems()) {
            return Err(format!(
                "{cols} columns are not whole {}-element blocks",
                ty.block_elems()
            ));
        }
        let want = rows * cols / ty.block_elems() * ty.block_bytes();
        if blocks.len() != want {
            return Err(format!(
                "{} bytes for {rows}×{cols} {} (want {want})",
                blocks.len(),
                ty.name()
            ));
        }
        Ok(Self {
            ty,
            arith,
            rows,
            cols,
            blocks,
        })
    }

    /// The stored type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// How products with it are computed.
    pub fn arithmetic(&self) -> BlockArithmetic {
        self.arith
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.blocks.len()
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_elems() * self.ty.block_bytes()
    }

    /// The blocks of rows `j..j + n`, back to back.
    pub fn rows_blocks(&self, j: usize, n: usize) -> &[u8] {
        &self.blocks[j * self.row_bytes()..][..n * self.row_bytes()]
    }

    /// The blocks of row `j`.
    pub fn row(&self, j: usize) -> &[u8] {
        let len = self.row_bytes();
        &self.blocks[j * len..][..len]
    }

    /// Row `j` dequantized into `out` (`cols` values), with the GGUF
    /// reference arithmetic ([`super::fused::portable::dequantize`]).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        super::fused::portable::dequantize(self.ty, self.row(j), out);
    }
}

/// Activation rows rounded to 8 bits per 32-element block.
#[derive(Clone, Debug, PartialEq)]
pub struct Q8Rows {
    cols: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

/// One row of [`Q8Rows`]: per block `b`, values `qs[32b..32b + 32]`, scale
/// `d[b]` and `s[b] = d[b] · Σ qs` of the block.
#[derive(Clone, Copy, Debug)]
pub struct Q8Row<'a> {
    /// Rounded values.
    pub qs: &'a [i8],
    /// Block scales.
    pub d: &'a [f32],
    /// Block scale times the block's sum of values.
    pub s: &'a [f32],
}

impl Q8Rows {
    /// Rounds every row of `x` (`x.cols` a multiple of 32).
    pub fn quantize(x: &CpuTensor) -> Self {
        assert!(
            x.cols.is_multiple_of(QK),
            "{} columns are not whole blocks",
            x.cols
        );
        let nb = x.cols / QK;
        let mut qs = vec![0i8; x.data.len()];
        let mut d = vec![0f32; x.rows * nb];
        let mut s = vec![0f32; x.rows * nb];
        qs.par_chunks_mut(QK)
            .zip(d.par_iter_mut().zip(s.par_iter_mut()))
            .zip(x.data.par_chunks(QK))
            .with_min_len(64)
            .for_each(|((q, (d, s)), v)| (*d, *s) = quantize_block(v, q));
        Self {
            cols: x.cols,
            qs,
            d,
            s,
        }
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.d.len() / (self.cols / QK).max(1)
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> Q8Row<'_> {
        let nb = self.cols / QK;
        Q8Row {
            qs: &self.qs[i * self.cols..][..self.cols],
            d: &self.d[i * nb..][..nb],
            s: &self.s[i * nb..][..nb],
        }
    }
}

/// Rounds one block to nearest (halves away from zero, as llama.cpp's
/// `roundf`); returns `(d, d · Σq)`.
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in q.iter_mut().zip(x) {
        let r = (v * id).round() as i8;
        *q = r;
        sum += i32::from(r);
    }
    (d, d * sum as f32)
}

/// The f16 at byte `at` of a block, widened.
pub(super) fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// The integer dot product of one weight block with 32 activations.
fn block_isum(ty: GgmlType, wb: &[u8], q: &[i8]) -> i32 {
    let q = |j: usize| i32::from(q[j]);
    match ty {
        GgmlType::Q4_0 => (0..16)
            .map(|j| {
                (i32::from(wb[2 + j] & 15) - 8) * q(j) + (i32::from(wb[2 + j] >> 4) - 8) * q(j + 16)
            })
            .sum(),
        GgmlType::Q4_1 => (0..16)
            .map(|j| i32::from(wb[4 + j] & 15) * q(j) + i32::from(wb[4 + j] >> 4) * q(j + 16))
            .sum(),
        _ => (0..32).map(|j| i32::from(wb[2 + j] as i8) * q(j)).sum(),
    }
}

/// `Σ_blocks d_w · d_a · Σ w·q (+ m_w · s_a for Q4_1)` of one weight row
/// (`ty` blocks) and one activation row: the reference for every kernel.
pub fn dot_scalar(ty: GgmlType, w: &[u8], a: Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, wb) in w.chunks_exact(ty.block_bytes()).enumerate() {
        let isum = block_isum(ty, wb, &a.qs[b * QK..][..QK]);
        acc += half_at(wb, 0) * a.d[b] * isum as f32;
        if ty == GgmlType::Q4_1 {
            acc += half_at(wb, 2) * a.s[b];
        }
    }
    acc
}

/// `x · wᵀ (+ bias)` in f32: on the fused kernels of [`super::fused`] for
/// one to [`MAX_FUSED_ROWS`](super::fused::MAX_FUSED_ROWS) rows, through
/// [`super::sgemm::matmul_blocks`] for more (both equal to
/// [`matmul_f32_tiled`] to float rounding), else [`matmul_f32_tiled`].
pub fn matmul_f32(x: &CpuTensor, w: &QuantMatrix, bias: Option<&[f32]>) -> CpuTensor {
    if (1..=super::fused::MAX_FUSED_ROWS).contains(&x.rows) {
        return super::fused::matmul(x, w, bias, Isa::detect());
    }
    if x.rows >= super::sgemm::GEMM_MIN_ROWS {
        return super::sgemm::matmul_blocks(x, w, bias);
    }
    matmul_f32_tiled(x, w, bias)
}

/// `x · wᵀ (+ bias)` in f32: each task dequantizes [`TILE_ROWS`] weight
/// rows (the GGUF reference arithmetic) and takes the dense path's dot
/// products with them, so the result equals the product with weights
/// dequantized at load, bit for bit.
pub fn matmul_f32_tiled(x: &CpuTensor, w: &QuantMatrix, bias: Option<&[f32]>) -> CpuTensor {
    let (m, n, k) = (x.rows, w.rows, w.cols);
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(TILE_ROWS * m.max(1))
        .enumerate()
        .for_each(|(t, tile)| {
            let j0 = t * TILE_ROWS;
            let mut rows = vec![0f32; tile.len() / m.max(1) * k];
            for (jj, row) in rows.chunks_exact_mut(k).enumerate() {
                w.dequantize_row(j0 + jj, row);
            }
            for ((jj, col), row) in tile
                .chunks_exact_mut(m)
                .enumerate()
                .zip(rows.chunks_exact(k))
            {
                let b = bias.map_or(0.0, |b| b[j0 + jj]);
                for (i, o) in col.iter_mut().enumerate() {
                    *o = dot(x.row(i), row) + b;
                }
            }
        });
    transpose_into(&out_t, m, n)
}

/// The `[m, n]` tensor of a transposed `[n, m]` result.
pub(super) fn transpose_into(out_t: &[f32], m: usize, n: usize) -> CpuTensor {
    let mut out = CpuTensor::zeros(m, n);
    for (i, row) in out.data.chunks_exact_mut(n.max(1)).enumerate().take(m) {
        for (j, o) in row.iter_mut().enumerate() {
            *o = out_t[j * m + i];
        }
    }
    out
}

/// `x · wᵀ (+ bias)` with `x` rounded per block, on the kernels of `isa`.
pub fn matmul(x: &CpuTensor, w: &QuantMatrix, bias: Option<&[f32]>, isa: Isa) -> CpuTensor {
    let (m, n) = (x.rows, w.rows);
    let a = Q8Rows::quantize(x);
    // Transposed result, one tile of weight rows per task.
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(TILE_ROWS * m.max(1))
        .enumerate()
        .for_each(|(t, tile)| {
            let j0 = t * TILE_ROWS;
            let n_rows = tile.len() / m;
            let weights = w.rows_blocks(j0, n_rows);
            let mut i = 0;
            while i < m {
                let r = (m - i).min(4);
                isa.dot_tile(w.ty, weights, &a, i, r, &mut tile[i..], m);
                i += r;
            }
            if let Some(bias) = bias {
                for (jj, col) in tile.chunks_exact_mut(m).enumerate() {
                    col.iter_mut().for_each(|o| *o += bias[j0 + jj]);
                }
            }
        });
    transpose_into(&out_t, m, n)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::cpu::dot;

    /// Deterministic pseudo-random bytes.
    pub(crate) fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 33) as u8
            })
            .collect()
    }

    /// Byte offsets of the f16 scales (and minimums) in a block of `ty`.
    fn f16_fields(ty: GgmlType) -> &'static [usize] {
        match ty {
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            GgmlType::Q2_K => &[80, 82],
            GgmlType::Q3_K => &[108],
            GgmlType::Q6_K => &[208],
            _ => &[0],
        }
    }

    /// Random blocks of `ty` with scales of about 0.01 (and minimums of
    /// about −0.08 where the type has them), multiplied with `arith`.
    pub(crate) fn random_matrix_with(
        ty: GgmlType,
        arith: BlockArithmetic,
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> QuantMatrix {
        let bb = ty.block_bytes();
        let mut blocks = noise(seed, rows * cols / ty.block_elems() * bb);
        for (i, b) in blocks.chunks_exact_mut(bb).enumerate() {
            for (f, &at) in f16_fields(ty).iter().enumerate() {
                let v = if f == 0 {
                    0.005 + 0.01 * (i % 7) as f32
                } else {
                    -0.08 + 0.01 * (i % 5) as f32
                };
                b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
            if ty == GgmlType::Q8_0 {
                // llama.cpp rounds Q8_0 to −127..=127.
                b[2..]
                    .iter_mut()
                    .for_each(|v| *v = (*v as i8).max(-127) as u8);
            }
        }
        QuantMatrix::new(ty, arith, rows, cols, blocks).unwrap()
    }

    /// [`random_matrix_with`] for the 8-bit activation kernels.
    pub(crate) fn random_matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> QuantMatrix {
        random_matrix_with(ty, BlockArithmetic::Q8, rows, cols, seed)
    }

    pub(crate) fn random_x(rows: usize, cols: usize, seed: u64) -> CpuTensor {
        let data = noise(seed, rows * cols)
            .iter()
            .map(|&b| (f32::from(b) - 127.5) / 40.0)
            .collect();
        CpuTensor { rows, cols, data }
    }

    #[test]
    fn activation_rounding_keeps_scale_and_sum() {
        let x = random_x(3, 64, 1);
        let q = Q8Rows::quantize(&x);
        assert_eq!(q.rows(), 3);
        let r = q.row(1);
        for b in 0..2 {
            let block = &x.row(1)[b * QK..][..QK];
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(r.d[b], amax / 127.0);
            let qs = &r.qs[b * QK..][..QK];
            assert!(qs.iter().any(|&v| v.abs() == 127));
            let sum: i32 = qs.iter().map(|&v| i32::from(v)).sum();
            assert_eq!(r.s[b], r.d[b] * sum as f32);
            for (v, &q) in block.iter().zip(qs) {
                assert!((v - r.d[b] * f32::from(q)).abs() <= r.d[b] * 0.5 + 1e-6);
            }
        }
        let zeros = Q8Rows::quantize(&CpuTensor::zeros(1, 32));
        assert!(zeros.row(0).qs.iter().all(|&v| v == 0) && zeros.row(0).d[0] == 0.0);
    }

    /// The quantized product against dequantize-then-f32: the only error is
    /// the activations' rounding, at most half a step per element, so
    /// |Δ| ≤ Σ_b d_b/2 · Σ|w| over the row (checked with that bound).
    #[test]
    fn scalar_kernel_matches_dequantized_f32_within_the_rounding_bound() {
        for ty in crate::weights::BLOCK_TYPES {
            let (rows, cols) = (5, 128);
            let w = random_matrix(ty, rows, cols, 7);
            let x = random_x(3, cols, 9);
            let a = Q8Rows::quantize(&x);
            let mut wf = vec![0f32; cols];
            for j in 0..rows {
                w.dequantize_row(j, &mut wf);
                for i in 0..x.rows {
                    let exact = dot(x.row(i), &wf);
                    let got = dot_scalar(ty, w.row(j), a.row(i));
                    let bound: f32 = (0..cols / QK)
                        .map(|b| {
                            let wsum: f32 = wf[b * QK..][..QK].iter().map(|v| v.abs()).sum();
                            a.row(i).d[b] * 0.5 * wsum
                        })
                        .sum();
                    assert!(
                        (got - exact).abs() <= bound * 1.01 + 1e-4,
                        "{ty:?} row {j}/{i}: {got} vs {exact} (bound {bound})"
                    );
                    assert!((got - exact).abs() < 0.05 * exact.abs().max(1.0), "{ty:?}");
                }
            }
        }
    }

    #[test]
    fn matmul_equals_the_scalar_kernel_for_every_batch_size_and_adds_bias() {
        let w = random_matrix(GgmlType::Q4_1, 37, 64, 3);
        let bias: Vec<f32> = (0..37).map(|j| j as f32).collect();
        for m in [1, 3, 4, 9] {
            let x = random_x(m, 64, 11 + m as u64);
            let out = matmul(&x, &w, Some(&bias), Isa::Scalar);
            assert_eq!((out.rows, out.cols), (m, 37));
            let a = Q8Rows::quantize(&x);
            for i in 0..m {
                for (j, b) in bias.iter().enumerate() {
                    let want = dot_scalar(w.ty(), w.row(j), a.row(i)) + b;
                    assert_eq!(out.data[i * 37 + j], want, "m {m} ({i}, {j})");
                }
            }
        }
        assert_eq!(
            matmul(&CpuTensor::zeros(0, 64), &w, None, Isa::Scalar)
                .data
                .len(),
            0
        );
    }

    /// The detected kernels through the whole product (tiles, row groups
    /// and their remainders) against the scalar one.
    #[test]
    fn matmul_on_the_detected_kernels_matches_the_scalar_product() {
        for ty in crate::weights::BLOCK_TYPES {
            let w = random_matrix(ty, 40, 576, 4);
            let x = random_x(11, 576, 8);
            let want = matmul(&x, &w, None, Isa::Scalar);
            let got = matmul(&x, &w, None, Isa::detect());
            for (g, e) in got.data.iter().zip(&want.data) {
                assert!(
                    (g - e).abs() <= 1e-5 * (e.abs() + 10.0),
                    "{ty:?}: {g} vs {e}"
                );
            }
        }
    }

    /// The f32 product on blocks against the dense product on the same
    /// weights dequantized: equal bit for bit, for every quantized type,
    /// The tile product on blocks against the dense product on the same
    /// weights dequantized: equal bit for bit, for every quantized type,
    /// below `GEMM_MIN_ROWS` rows (where the dense path takes dot
    /// products), with a bias. The fused kernels are checked in
    /// `fused::tests`, the gemm path in `sgemm`'s tests.
    #[test]
    fn f32_block_product_equals_the_dense_product_bit_for_bit() {
        use GgmlType::*;
        let backend = super::super::CpuBackend;
        for ty in [Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K] {
            let (rows, cols) = (37, 512);
            let w = random_matrix_with(ty, BlockArithmetic::F32, rows, cols, 5);
            let mut dense = vec![0f32; rows * cols];
            for (j, row) in dense.chunks_exact_mut(cols).enumerate() {
                crate::gguf::dequant::dequantize(ty, w.row(j), row);
            }
            assert!(dense.iter().all(|v| v.is_finite()), "{ty:?}");
            let dense = super::super::CpuWeight::Dense(CpuTensor {
                rows,
                cols,
                data: dense,
            });
            let bias: Vec<f32> = (0..rows).map(|j| j as f32 / 8.0).collect();
            let bias_w = super::super::CpuWeight::Dense(CpuTensor {
                rows: 1,
                cols: rows,
                data: bias.clone(),
            });
            for m in [0, 1, 3, 4] {
                let x = random_x(m, cols, 3 + m as u64);
                let got = matmul_f32_tiled(&x, &w, Some(&bias));
                let want =
                    crate::backend::Backend::linear(&backend, &x, &dense, Some(&bias_w)).unwrap();
                assert_eq!((got.rows, got.cols), (m, rows));
                let same = got
                    .data
                    .iter()
                    .zip(&want.data)
                    .all(|(g, e)| g.to_bits() == e.to_bits());
                assert!(same, "{ty:?} m {m}");
            }
        }
    }

    #[test]
    fn matrices_that_do_not_fit_are_refused() {
        let q8 = BlockArithmetic::Q8;
        let f32 = BlockArithmetic::F32;
        assert!(QuantMatrix::new(GgmlType::Q4_1, q8, 2, 33, vec![0; 40]).is_err());
        assert!(QuantMatrix::new(GgmlType::Q4_1, q8, 2, 32, vec![0; 39]).is_err());
        assert!(QuantMatrix::new(GgmlType::Q4_K, q8, 1, 256, vec![0; 144]).is_err());
        assert!(QuantMatrix::new(GgmlType::Q4_K, f32, 1, 256, vec![0; 144]).is_ok());
        assert!(QuantMatrix::new(GgmlType::Q4_K, f32, 1, 128, vec![0; 72]).is_err());
        assert!(QuantMatrix::new(GgmlType::F16, f32, 1, 32, vec![0; 64]).is_err());
        assert!(QuantMatrix::new(GgmlType::Q8_0, q8, 2, 32, vec![0; 68]).is_ok());
    }
}
