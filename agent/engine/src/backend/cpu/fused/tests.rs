//! The fused kernels against dequantize-then-dot, for every block type
//! and one to four activation rows.

use super::*;
use crate::backend::cpu::dot;
use crate::backend::cpu::quant::matmul_f32_tiled;
use crate::backend::cpu::quant::tests::{random_matrix_with, random_x};
use crate::weights::BlockArithmetic;

/// Every type with a fused kernel.
const TYPES: [GgmlType; 10] = {
    use GgmlType::*;
    [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K]
};

/// Allowed |Δ| relative to `Σ|w·x|`: the portable kernels multiply the
/// reference's weights in another order, the AVX2 ones also reassociate
/// `d·q + m` (measured: see the test's output; reassociating 1,024 terms
/// could reach ~6e-5 in the worst case, far from what random data does).
const REL: f32 = 1e-5;

/// The kernel sets this processor runs, by name.
fn kernels() -> Vec<(&'static str, Isa)> {
    let mut out = vec![("portable", Isa::Scalar)];
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        out.push(("avx2", Isa::Avx2));
    }
    out
}

/// Checks `got` against `dot(x, wf)` within [`REL`] of `Σ|w·x|`; returns
/// the relative difference.
fn assert_close(what: &str, got: f32, x: &[f32], wf: &[f32]) -> f32 {
    let want = dot(x, wf);
    let scale: f32 = x.iter().zip(wf).map(|(a, b)| (a * b).abs()).sum();
    assert!(
        (got - want).abs() <= REL * scale,
        "{what}: {got} vs {want} (Σ|w·x| {scale})"
    );
    (got - want).abs() / scale
}

#[test]
fn every_kernel_matches_dequantize_then_dot_for_every_type_and_row_count() {
    let found: Vec<&str> = kernels().iter().map(|k| k.0).collect();
    eprintln!("fused kernels on this processor: {found:?}");
    let (rows, cols) = (3, 1024);
    let mut worst = 0f32;
    for ty in TYPES {
        let w = random_matrix_with(ty, BlockArithmetic::F32, rows, cols, 13);
        let x = random_x(MAX_ROWS, cols, 17);
        let mut wf = vec![0f32; cols];
        for j in 0..rows {
            crate::gguf::dequant::dequantize(ty, w.row(j), &mut wf);
            assert!(wf.iter().all(|v| v.is_finite()), "{ty:?}");
            for m in 1..=MAX_ROWS {
                let xs: Vec<&[f32]> = (MAX_ROWS - m..MAX_ROWS).map(|i| x.row(i)).collect();
                let rows = Rows::new(xs.clone());
                for (name, isa) in kernels() {
                    let mut got = vec![f32::NAN; m];
                    dot_rows(isa, ty, w.row(j), &rows, &mut got);
                    for (g, xr) in got.iter().zip(&xs) {
                        let what = format!("{name} {ty:?} row {j} m {m}");
                        worst = worst.max(assert_close(&what, *g, xr, &wf));
                    }
                }
            }
        }
    }
    eprintln!("worst |Δ| / Σ|w·x|: {worst:.1e}");
}

/// A block whose scale or offset the kernel misread would show here: a
/// single block per row, each weight field varied on its own.
#[test]
fn kernels_read_every_field_of_a_single_block() {
    for ty in TYPES {
        let cols = ty.block_elems();
        for seed in 0..8 {
            let w = random_matrix_with(ty, BlockArithmetic::F32, 1, cols, 100 + seed);
            let x = random_x(2, cols, 200 + seed);
            let mut wf = vec![0f32; cols];
            crate::gguf::dequant::dequantize(ty, w.row(0), &mut wf);
            let xs = [x.row(0), x.row(1)];
            let rows = Rows::new(xs.to_vec());
            for (name, isa) in kernels() {
                let mut got = [0f32; 2];
                dot_rows(isa, ty, w.row(0), &rows, &mut got);
                assert_close(&format!("{name} {ty:?} seed {seed}"), got[0], xs[0], &wf);
                assert_close(&format!("{name} {ty:?} seed {seed}"), got[1], xs[1], &wf);
            }
        }
    }
}

/// The whole product (tasks, a remainder task, bias, groups of four rows
/// and a partial last group) for every row count the fused path takes
/// against the tile path, on the detected kernels and the portable ones.
#[test]
fn matmul_f32_on_small_batches_matches_the_tile_path() {
    let (rows, cols) = (37, 512);
    let bias: Vec<f32> = (0..rows).map(|j| j as f32 / 8.0).collect();
    for ty in TYPES {
        let w = random_matrix_with(ty, BlockArithmetic::F32, rows, cols, 5);
        let mut abs_w = vec![0f32; rows * cols];
        for (j, row) in abs_w.chunks_exact_mut(cols).enumerate() {
            w.dequantize_row(j, row);
            row.iter_mut().for_each(|v| *v = v.abs());
        }
        for m in (1..=MAX_ROWS).chain([7, MAX_FUSED_ROWS]) {
            let x = random_x(m, cols, 3 + m as u64);
            let want = matmul_f32_tiled(&x, &w, Some(&bias));
            for isa in [Isa::Scalar, Isa::detect()] {
                let got = if isa == Isa::detect() {
                    crate::backend::cpu::quant::matmul_f32(&x, &w, Some(&bias))
                } else {
                    matmul(&x, &w, Some(&bias), isa)
                };
                assert_eq!((got.rows, got.cols), (m, rows));
                for i in 0..m {
                    let ax: Vec<f32> = x.row(i).iter().map(|v| v.abs()).collect();
                    for j in 0..rows {
                        let scale = dot(&ax, &abs_w[j * cols..][..cols]) + bias[j].abs();
                        let (g, e) = (got.data[i * rows + j], want.data[i * rows + j]);
                        assert!(
                            (g - e).abs() <= REL * scale,
                            "{isa:?} {ty:?} m {m} ({i}, {j}): {g} vs {e}"
                        );
                    }
                }
            }
        }
    }
}

/// The AVX2 dequantization the `gemm` path's panels take equals the
/// portable reference bit for bit, for the types it covers, and the
/// dispatcher falls back to the reference for every other type.
#[test]
fn fast_dequantization_equals_the_reference_bit_for_bit() {
    let (rows, cols) = (3, 256);
    for ty in TYPES {
        let w = random_matrix_with(ty, BlockArithmetic::F32, rows, cols, 41);
        let mut want = vec![0f32; rows * cols];
        for (j, row) in want.chunks_exact_mut(cols).enumerate() {
            w.dequantize_row(j, row);
        }
        for isa in [Isa::Scalar, Isa::detect()] {
            let mut got = vec![f32::NAN; rows * cols];
            dequantize(isa, ty, w.rows_blocks(0, rows), &mut got);
            let same = got
                .iter()
                .zip(&want)
                .all(|(g, e)| g.to_bits() == e.to_bits());
            assert!(same, "{isa:?} {ty:?}");
        }
    }
}
