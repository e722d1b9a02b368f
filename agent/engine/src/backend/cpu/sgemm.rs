//! Products of many activation rows (prefill, batched decode) through the
//! `gemm` crate's blocked, packed f32 kernels, all through one `unsafe`
//! call on operands of any strides: [`gemm_nt`] (`out = x · wᵀ` on
//! row-major slices, `w` transposed by its strides), the dense [`linear`]
//! on it, and [`matmul_blocks`], which dequantizes a panel of weight rows
//! at a time with the GGUF reference arithmetic, transposes it, and
//! multiplies every activation row by the panel at once.
//!
//! Below [`GEMM_MIN_ROWS`] activation rows the callers keep their
//! row-parallel dot products: there the product is bound by reading the
//! weights, and packing them for a blocked kernel would only add work.
//!
//! The summation order over `k` is the crate's (its `k` blocking and its
//! SIMD lanes), so results differ from the dot-product paths by rounding,
//! not bit for bit.

use gemm::Parallelism;
use rayon::prelude::*;

use super::CpuTensor;
use super::fused;
use super::quant::QuantMatrix;
use super::simd::Isa;

/// Activation rows from which [`linear`] and [`matmul_blocks`] are used.
pub const GEMM_MIN_ROWS: usize = 5;

/// `m · n · k` below which one thread does a dense product: splitting
/// smaller ones costs more than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 21;

/// Bytes of dequantized weights per panel of [`matmul_blocks`]: the panel
/// and its transposed copy stay in the 1 MiB L2 of a core.
const PANEL_BYTES: usize = 256 << 10;

/// The shape of `out[m, n] = x[m, k] · w[n, k]ᵀ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    /// Activation rows.
    pub m: usize,
    /// Weight rows (output features).
    pub n: usize,
    /// Shared inner dimension.
    pub k: usize,
}

/// `out[i·ldo + j] = x[i·k ..] · w[j·k ..]` for `i < m`, `j < n`, plus the
/// value already in `out` when `accumulate`; `x` (`[m, k]`) and `w`
/// (`[n, k]`, read transposed) are row-major and dense, `out` has row
/// stride `ldo ≥ n`. `threads > 1` lets the crate split the product over
/// rayon's pool.
///
/// # Panics
///
/// When a slice is too short for the shape, or `ldo < n`.
pub fn gemm_nt(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    shape: GemmShape,
    ldo: usize,
    accumulate: bool,
    threads: usize,
) {
    assert!(ldo >= shape.n, "row stride {ldo} < {} columns", shape.n);
    let operands = Operands {
        lhs: (x, Layout::rows(shape.k)),
        rhs: (w, Layout::cols(shape.k)),
        dst: (out, Layout::rows(ldo)),
    };
    gemm_strided(operands, shape, accumulate, threads);
}

/// As [`gemm_nt`] with `w` a row-major `[k, n]` matrix, not transposed:
/// `out[i, j] = Σ_l x[i, l] · w[l, j]`.
///
/// # Panics
///
/// When a slice is too short for the shape, or `ldo < n`.
pub fn gemm_nn(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    shape: GemmShape,
    ldo: usize,
    accumulate: bool,
    threads: usize,
) {
    assert!(ldo >= shape.n, "row stride {ldo} < {} columns", shape.n);
    let operands = Operands {
        lhs: (x, Layout::rows(shape.k)),
        rhs: (w, Layout::rows(shape.n)),
        dst: (out, Layout::rows(ldo)),
    };
    gemm_strided(operands, shape, accumulate, threads);
}

/// One panel's product for [`matmul_blocks`], on one thread, computed
/// transposed: `block[i·m + j] = Σ_l wt[l·m + j] · x[i·k + l]` (plus the
/// value there when `accumulate`) for the panel's `m` weight rows `j` and
/// the `n` activation rows `i`, with `wt` the dequantized panel transposed
/// (`[k, m]`) and `x` row-major `[n, k]`: `block` is `out[i, j0 + j]`
/// row-major, as the panel's columns of the result.
///
/// This is the layout the crate's kernels read: column-major weights (a
/// multiple of 16 rows) and activations contiguous along `k`, so it
/// packs neither. Given the panel row-major, it gathers it one value at a
/// time at stride `k`, which took about a fifth of a 32-sequence decode
/// step; [`super::panel_t::transpose`] does the same in 8×8 tiles.
///
/// # Panics
///
/// When a slice is too short for the shape.
fn gemm_panel(wt: &[f32], x: &[f32], block: &mut [f32], shape: GemmShape, accumulate: bool) {
    let operands = Operands {
        lhs: (wt, Layout::cols(shape.m)),
        rhs: (x, Layout::cols(shape.k)),
        dst: (block, Layout::cols(shape.m)),
    };
    gemm_strided(operands, shape, accumulate, 1);
}

/// Strides of a matrix in its slice: `a[r, c]` at `r·row + c·col`.
#[derive(Clone, Copy)]
struct Layout {
    row: usize,
    col: usize,
}

impl Layout {
    /// Row-major with row stride `ld`.
    fn rows(ld: usize) -> Self {
        Self { row: ld, col: 1 }
    }

    /// Column-major with column stride `ld`.
    fn cols(ld: usize) -> Self {
        Self { row: 1, col: ld }
    }

    /// Elements a `rows × cols` matrix in this layout reaches (0 when
    /// empty).
    fn reach(self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            return 0;
        }
        (rows - 1) * self.row + (cols - 1) * self.col + 1
    }
}

/// The three matrices of `dst = lhs · rhs` and their layouts: `lhs` is
/// `[m, k]`, `rhs` is `[k, n]`, `dst` is `[m, n]`.
struct Operands<'a> {
    lhs: (&'a [f32], Layout),
    rhs: (&'a [f32], Layout),
    dst: (&'a mut [f32], Layout),
}

fn gemm_strided(operands: Operands<'_>, shape: GemmShape, accumulate: bool, threads: usize) {
    let GemmShape { m, n, k } = shape;
    let Operands {
        lhs: (x, lhs),
        rhs: (w, rhs),
        dst: (out, dst),
    } = operands;
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        x.len() >= lhs.reach(m, k),
        "x: {} values for {m}×{k}",
        x.len()
    );
    assert!(
        w.len() >= rhs.reach(k, n),
        "w: {} values for {k}×{n}",
        w.len()
    );
    assert!(
        out.len() >= dst.reach(m, n),
        "out: {} values for {m}×{n}",
        out.len()
    );
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    let s = |v: usize| v as isize;
    // SAFETY: the asserts above keep every element the strides reach in
    // bounds (`reach` is one past the largest offset). `out` is borrowed
    // mutably, so nothing else reads or writes it during the call, and it
    // does not overlap `x` or `w` (shared borrows). The callers' layouts
    // map distinct (i, j) of `out` to distinct offsets (`ldo ≥ n`, or
    // column stride `m`).
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            s(dst.col),
            s(dst.row),
            accumulate,
            x.as_ptr(),
            s(lhs.col),
            s(lhs.row),
            w.as_ptr(),
            s(rhs.col),
            s(rhs.row),
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Threads for a product of `shape`: rayon's pool, or one for small work.
fn threads_for(shape: GemmShape) -> usize {
    if shape.m * shape.n * shape.k < PARALLEL_MIN_WORK {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// A `[rows, cols]` tensor whose every row is `bias` (zeros without one).
fn bias_rows(rows: usize, bias: Option<&[f32]>, cols: usize) -> CpuTensor {
    match bias {
        Some(b) => CpuTensor {
            rows,
            cols,
            data: b.repeat(rows),
        },
        None => CpuTensor::zeros(rows, cols),
    }
}

/// `x · wᵀ (+ bias)` for dense `w` (`x.cols == w.cols`, checked by the
/// caller), one call split over rayon's threads.
pub fn linear(x: &CpuTensor, w: &CpuTensor, bias: Option<&[f32]>) -> CpuTensor {
    let shape = GemmShape {
        m: x.rows,
        n: w.rows,
        k: x.cols,
    };
    let mut out = bias_rows(x.rows, bias, w.rows);
    let threads = threads_for(shape);
    gemm_nt(
        &x.data,
        &w.data,
        &mut out.data,
        shape,
        w.rows,
        bias.is_some(),
        threads,
    );
    out
}

/// Weight rows per panel of [`matmul_blocks`] for `k` columns: as many as
/// fit [`PANEL_BYTES`], a multiple of 16, from 16 to 256.
pub fn panel_rows(k: usize) -> usize {
    (PANEL_BYTES / (4 * k.max(1)) / 16 * 16).clamp(16, 256)
}

thread_local! {
    /// Each thread's buffer for one dequantized panel and its transposed
    /// copy (as large as twice the largest panel it took, about 2 ×
    /// [`PANEL_BYTES`]), reused so that a step neither allocates nor
    /// zeroes a panel per task.
    static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `x · wᵀ (+ bias)` for quantized `w`: one rayon task per panel of
/// [`panel_rows`] weight rows dequantizes them (the GGUF reference
/// arithmetic, as [`QuantMatrix::dequantize_row`], with AVX2 for Q4_0,
/// Q4_1 and Q8_0 where the processor has it) and multiplies every
/// row of `x` by the panel, transposed, in one single-threaded
/// `gemm_panel` into its own `[m, panel]` block; the blocks are then
/// copied into place.
pub fn matmul_blocks(x: &CpuTensor, w: &QuantMatrix, bias: Option<&[f32]>) -> CpuTensor {
    let (m, n, k) = (x.rows, w.rows(), w.cols());
    let p = panel_rows(k);
    let mut out = CpuTensor::zeros(m, n);
    if m == 0 || n == 0 {
        return out;
    }
    // Panel-major: panel t holds out[:, t·p ..][.. its rows] row-major.
    let mut panels = vec![0f32; m * n];
    let isa = Isa::detect();
    // Panels in parallel, each product on one thread: measured faster than
    // panels in turn with the crate splitting each one (SmolLM2 Q4_1, 2
    // threads: prefill ≈ 1.1×, 32-sequence decode ≈ 1.5×).
    panels
        .par_chunks_mut(m * p)
        .enumerate()
        .for_each(|(t, block)| {
            let j0 = t * p;
            let rows = block.len() / m;
            PANEL.with_borrow_mut(|bufs| {
                // Grown, never shrunk: every value used is written below.
                if bufs.len() < 2 * rows * k {
                    bufs.resize(2 * rows * k, 0.0);
                }
                let (deq, deqt) = bufs[..2 * rows * k].split_at_mut(rows * k);
                fused::dequantize(isa, w.ty(), w.rows_blocks(j0, rows), deq);
                super::panel_t::transpose(deq, deqt, k, rows);
                if let Some(b) = bias {
                    for o in block.chunks_exact_mut(rows) {
                        o.copy_from_slice(&b[j0..j0 + rows]);
                    }
                }
                let shape = GemmShape { m: rows, n: m, k };
                gemm_panel(deqt, &x.data, block, shape, bias.is_some());
            });
        });
    for (t, block) in panels.chunks(m * p).enumerate() {
        let rows = block.len() / m;
        for (dst, src) in out.data.chunks_exact_mut(n).zip(block.chunks_exact(rows)) {
            dst[t * p..t * p + rows].copy_from_slice(src);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::quant::{self, tests::random_matrix_with, tests::random_x};
    use crate::gguf::GgmlType;
    use crate::weights::BlockArithmetic;

    /// `Σ_l |x[i, l] · w[j, l]|`: the scale rounding errors are relative to.
    fn abs_dot(x: &[f32], w: &[f32]) -> f32 {
        x.iter().zip(w).map(|(a, b)| (a * b).abs()).sum()
    }

    /// The crate's product against a naive triple loop (in f64), at sizes
    /// that are not multiples of its register tiles, with a row stride
    /// wider than the output, with accumulation into it, and with the
    /// right operand transposed or not.
    #[test]
    fn gemm_matches_a_naive_product_at_odd_sizes() {
        let mut worst = 0f64;
        for (m, n, k) in [
            (5, 7, 3),
            (17, 33, 65),
            (64, 100, 577),
            (5, 1, 31),
            (17, 129, 96),
        ] {
            let x = random_x(m, k, (m * n) as u64).data;
            let w = random_x(n, k, (n * k) as u64).data;
            // The same matrix stored `[k, n]`, for `gemm_nn`.
            let wt: Vec<f32> = (0..k * n).map(|v| w[(v % n) * k + v / n]).collect();
            let runs = [(false, 1, false), (true, 1, false), (false, 2, false)];
            for (accumulate, threads, nn) in runs.into_iter().chain([(true, 1, true)]) {
                let ldo = n + 3;
                let mut out: Vec<f32> = (0..m * ldo).map(|v| v as f32 / 64.0).collect();
                let before = out.clone();
                let shape = GemmShape { m, n, k };
                if nn {
                    gemm_nn(&x, &wt, &mut out, shape, ldo, accumulate, threads);
                } else {
                    gemm_nt(&x, &w, &mut out, shape, ldo, accumulate, threads);
                }
                for i in 0..m {
                    for j in 0..ldo {
                        let got = out[i * ldo + j];
                        if j >= n {
                            assert_eq!(got, before[i * ldo + j], "padding written");
                            continue;
                        }
                        let (xr, wr) = (&x[i * k..][..k], &w[j * k..][..k]);
                        let mut want: f64 = xr.iter().zip(wr).map(|(a, b)| f64::from(a * b)).sum();
                        if accumulate {
                            want += f64::from(before[i * ldo + j]);
                        }
                        let err = (f64::from(got) - want).abs() / f64::from(abs_dot(xr, wr) + 1.0);
                        worst = worst.max(err);
                        assert!(err < 1e-6, "{m}×{n}×{k} ({i}, {j}): {got} vs {want}");
                    }
                }
            }
        }
        eprintln!("gemm_nt: worst error / Σ|x·w| = {worst:e}");
    }

    #[test]
    #[allow(clippy::needless_range_loop)] // (i, j) index three arrays
    fn dense_linear_adds_bias_and_matches_dot_products() {
        let (m, n, k) = (9, 70, 130);
        let x = random_x(m, k, 1);
        let w = random_x(n, k, 2);
        let bias: Vec<f32> = (0..n).map(|j| j as f32 - 30.0).collect();
        let out = linear(&x, &w, Some(&bias));
        assert_eq!((out.rows, out.cols), (m, n));
        for i in 0..m {
            for (j, b) in bias.iter().enumerate() {
                let want = super::super::dot(x.row(i), w.row(j)) + b;
                let tol = 1e-6 * (abs_dot(x.row(i), w.row(j)) + b.abs() + 1.0);
                assert!((out.data[i * n + j] - want).abs() <= tol, "({i}, {j})");
            }
        }
    }

    /// The panel product on blocks against the tile path (one row at a
    /// time goes through it), over several panels and a partial last one.
    #[test]
    #[allow(clippy::needless_range_loop)] // (i, j) index three arrays
    fn block_panels_match_the_tile_path() {
        use GgmlType::*;
        let mut worst = 0f32;
        for ty in [Q4_1, Q8_0, Q4_K, Q6_K] {
            let (rows, cols) = (panel_rows(768) * 2 + 37, 768);
            let w = random_matrix_with(ty, BlockArithmetic::F32, rows, cols, 6);
            let bias: Vec<f32> = (0..rows).map(|j| j as f32 / 16.0).collect();
            let mut deq = vec![0f32; cols];
            for m in [5, 17, 64] {
                let x = random_x(m, cols, 40 + m as u64);
                let got = matmul_blocks(&x, &w, Some(&bias));
                assert_eq!((got.rows, got.cols), (m, rows));
                for i in 0..m {
                    let xi = CpuTensor {
                        rows: 1,
                        cols,
                        data: x.row(i).to_vec(),
                    };
                    let want = quant::matmul_f32_tiled(&xi, &w, Some(&bias));
                    for (j, b) in bias.iter().enumerate() {
                        w.dequantize_row(j, &mut deq);
                        let scale = abs_dot(x.row(i), &deq) + b.abs() + 1.0;
                        let err = (got.data[i * rows + j] - want.data[j]).abs() / scale;
                        worst = worst.max(err);
                        assert!(err < 1e-6, "{ty:?} m {m} ({i}, {j})");
                    }
                }
            }
        }
        eprintln!("matmul_blocks vs tiles: worst error / Σ|x·w| = {worst:e}");
    }
}
