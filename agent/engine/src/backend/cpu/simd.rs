//! Instruction sets for the quantized kernels, chosen at run time, and the
//! SIMD kernels themselves: the only `unsafe` of the CPU backend.
//!
//! [`Isa::detect`] picks the best set the processor has (AVX-512 VNNI,
//! then AVX2 with FMA and F16C, else the portable scalar kernel; NEON is
//! not written yet and takes the scalar kernel). `WEIR_CPU_ISA=scalar` or
//! `avx2` caps the choice, for comparisons. Every SIMD entry point checks
//! the processor before it runs, so a wrongly constructed [`Isa`] falls
//! back to the scalar kernel instead of faulting.
//!
//! The kernels compute exactly the integer block sums of
//! [`super::quant::dot_scalar`]; the f32 accumulation runs in eight lanes
//! summed at the end, so results agree with the scalar kernel to rounding
//! (the tests bound the difference). Q8_0 weights of −128 (llama.cpp never
//! writes them) could saturate `maddubs` by one unit in a pair.

use super::quant::{Q8Rows, dot_scalar};
use crate::gguf::GgmlType;

/// An instruction set for the quantized kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, any processor.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 VNNI (with VL) on 256-bit vectors, plus AVX2.
    Avx512Vnni,
}

impl Isa {
    /// The best set this processor has, capped by `WEIR_CPU_ISA`; detected
    /// once.
    pub fn detect() -> Self {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let cap = std::env::var("WEIR_CPU_ISA").ok();
            let best = Self::available().into_iter().last().unwrap_or(Self::Scalar);
            match cap.as_deref() {
                Some("scalar") => Self::Scalar,
                Some("avx2") if best != Self::Scalar => Self::Avx2,
                _ => best,
            }
        })
    }

    /// Every set this processor runs, worst first.
    pub fn available() -> Vec<Self> {
        let mut out = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_avx2() {
                out.push(Self::Avx2);
            }
            if x86::has_vnni() {
                out.push(Self::Avx512Vnni);
            }
        }
        out
    }

    /// `out[r] = dot(w, a.row(first + r))` for `out.len()` (1 to 4) rows,
    /// `w` one weight row of `ty` blocks as long as `a`'s rows.
    pub fn dot_rows(self, ty: GgmlType, w: &[u8], a: &Q8Rows, first: usize, out: &mut [f32]) {
        let rows = out.len();
        self.dot_tile(ty, w, a, first, rows, out, rows);
    }

    /// [`dot_rows`](Self::dot_rows) for every weight row of `w` (whole
    /// rows, back to back) against the `rows` (1 to 4) activation rows from
    /// `first`: weight row `j` writes `out[j * stride..][..rows]`. The
    /// processor is checked and the kernel chosen once for the whole tile.
    ///
    /// # Panics
    /// On 0 or more than 4 rows, rows past `a`'s, `w` not whole rows, or
    /// `out` too short.
    #[allow(clippy::too_many_arguments)] // one tile's geometry
    pub fn dot_tile(
        self,
        ty: GgmlType,
        w: &[u8],
        a: &Q8Rows,
        first: usize,
        rows: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        assert!((1..=4).contains(&rows) && first + rows <= a.rows() && rows <= stride);
        let row_bytes = a.row(first).d.len() * ty.block_bytes();
        assert!(row_bytes > 0 && w.len().is_multiple_of(row_bytes));
        let n = w.len() / row_bytes;
        assert!(n == 0 || out.len() >= (n - 1) * stride + rows);
        #[cfg(target_arch = "x86_64")]
        match self {
            Self::Avx512Vnni if x86::has_vnni() => {
                return x86::dot_tile_vnni(ty, w, row_bytes, a, first, rows, out, stride);
            }
            Self::Avx2 | Self::Avx512Vnni if x86::has_avx2() => {
                return x86::dot_tile_avx2(ty, w, row_bytes, a, first, rows, out, stride);
            }
            _ => {}
        }
        for (j, wr) in w.chunks_exact(row_bytes).enumerate() {
            for (r, o) in out[j * stride..][..rows].iter_mut().enumerate() {
                *o = dot_scalar(ty, wr, a.row(first + r));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::quant::{Q8Row, Q8Rows, QK};
    use crate::gguf::GgmlType;

    pub(super) fn has_avx2() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    pub(super) fn has_vnni() -> bool {
        has_avx2()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }

    /// Sums pairs of `u8 × i8` products into eight i32 (AVX2).
    #[inline(always)]
    unsafe fn mul_sum_avx2(x: __m256i, y: __m256i) -> __m256i {
        // SAFETY: only inlined into functions with AVX2 enabled.
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1)) }
    }

    /// Sums quadruples of `u8 × i8` products into eight i32 (VNNI).
    #[inline(always)]
    unsafe fn mul_sum_vnni(x: __m256i, y: __m256i) -> __m256i {
        // SAFETY: only inlined into functions with AVX-512 VNNI and VL.
        unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), x, y) }
    }

    /// Writes one kernel per instruction set: the body is the same, the
    /// `u8 × i8` multiply-sum differs.
    macro_rules! kernel {
        ($entry:ident, $tile:ident, $imp:ident, $features:literal, $mul_sum:ident) => {
            /// Safe entry: the caller checked the processor; lengths were
            /// checked by [`super::Isa::dot_tile`].
            #[allow(clippy::too_many_arguments)] // one tile's geometry
            pub(super) fn $entry(
                ty: GgmlType,
                w: &[u8],
                row_bytes: usize,
                a: &Q8Rows,
                first: usize,
                rows: usize,
                out: &mut [f32],
                stride: usize,
            ) {
                macro_rules! go {
                    ($t:literal) => {
                        match rows {
                            // SAFETY: the processor has the features (checked
                            // by the caller); `w` is whole rows of as many
                            // blocks as the activation rows `first..first +
                            // R`, which exist, and `out` holds every row's
                            // results (checked by `dot_tile`).
                            1 => unsafe { $tile::<$t, 1>(w, row_bytes, a, first, out, stride) },
                            2 => unsafe { $tile::<$t, 2>(w, row_bytes, a, first, out, stride) },
                            3 => unsafe { $tile::<$t, 3>(w, row_bytes, a, first, out, stride) },
                            _ => unsafe { $tile::<$t, 4>(w, row_bytes, a, first, out, stride) },
                        }
                    };
                }
                match ty {
                    GgmlType::Q4_0 => go!(0),
                    GgmlType::Q4_1 => go!(1),
                    _ => go!(2),
                }
            }

            /// Every weight row of `w` against `R` activation rows.
            #[target_feature(enable = $features)]
            unsafe fn $tile<const T: u8, const R: usize>(
                w: &[u8],
                row_bytes: usize,
                a: &Q8Rows,
                first: usize,
                out: &mut [f32],
                stride: usize,
            ) {
                let rows: [Q8Row<'_>; R] = std::array::from_fn(|r| a.row(first + r));
                for (j, wr) in w.chunks_exact(row_bytes).enumerate() {
                    // SAFETY: the caller's contract, per weight row.
                    unsafe { $imp::<T, R>(wr, &rows, &mut out[j * stride..][..R]) };
                }
            }

            /// `T`: 0 Q4_0, 1 Q4_1, 2 Q8_0; `R` activation rows.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn $imp<const T: u8, const R: usize>(
                w: &[u8],
                rows: &[Q8Row<'_>; R],
                out: &mut [f32],
            ) {
                let bb = [18usize, 20, 34][T as usize];
                let nb = w.len() / bb;
                let mut acc = [_mm256_setzero_ps(); R];
                let mut mins = [0f32; R];
                let low = _mm_set1_epi8(0x0F);
                for b in 0..nb {
                    // SAFETY: block `b` lies within `w` (b < nb); each
                    // activation row holds `nb` blocks of 32 values, scales
                    // and sums (checked by `dot_tile`).
                    unsafe {
                        let wb = w.as_ptr().add(b * bb);
                        let scales =
                            _mm_cvtph_ps(_mm_cvtsi32_si128((wb as *const i32).read_unaligned()));
                        let dw = _mm_cvtss_f32(scales);
                        let mw = _mm_cvtss_f32(_mm_shuffle_ps::<1>(scales, scales));
                        let wq = if T == 2 {
                            _mm256_loadu_si256(wb.add(2) as *const __m256i)
                        } else {
                            let qs = _mm_loadu_si128(
                                wb.add(if T == 1 { 4 } else { 2 }) as *const __m128i
                            );
                            let lo = _mm_and_si128(qs, low);
                            let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), low);
                            _mm256_set_m128i(hi, lo)
                        };
                        // Q4_1 nibbles are unsigned; signed weights use
                        // |w| · sign(q, w) so the multiply stays u8 × i8.
                        let wq = if T == 0 {
                            _mm256_sub_epi8(wq, _mm256_set1_epi8(8))
                        } else {
                            wq
                        };
                        let wu = if T == 1 { wq } else { _mm256_sign_epi8(wq, wq) };
                        for r in 0..R {
                            let row = rows.get_unchecked(r);
                            let qa =
                                _mm256_loadu_si256(row.qs.as_ptr().add(b * QK) as *const __m256i);
                            let qa = if T == 1 { qa } else { _mm256_sign_epi8(qa, wq) };
                            let isum = _mm256_cvtepi32_ps($mul_sum(wu, qa));
                            let d = _mm256_set1_ps(dw * *row.d.get_unchecked(b));
                            acc[r] = _mm256_fmadd_ps(d, isum, acc[r]);
                            if T == 1 {
                                mins[r] += mw * *row.s.get_unchecked(b);
                            }
                        }
                    }
                }
                for r in 0..R {
                    out[r] = hsum(acc[r]) + mins[r];
                }
            }
        };
    }

    kernel!(
        dot_tile_avx2,
        tile_avx2,
        dot_avx2,
        "avx2,fma,f16c",
        mul_sum_avx2
    );
    kernel!(
        dot_tile_vnni,
        tile_vnni,
        dot_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        mul_sum_vnni
    );

    /// Sum of eight lanes.
    #[inline(always)]
    fn hsum(v: __m256) -> f32 {
        let mut lanes = [0f32; 8];
        // SAFETY: an unaligned store of 32 bytes into a 32-byte array.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        (lanes[0] + lanes[4])
            + (lanes[1] + lanes[5])
            + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::quant::QuantMatrix;
    use crate::backend::cpu::quant::tests::{random_matrix, random_x};

    /// Every available kernel against the scalar reference, for every type
    /// and 1 to 4 rows: the integer sums are equal, so the results differ
    /// by f32 reassociation only (≤ 1e-5 relative to Σ|terms|).
    #[test]
    fn simd_kernels_match_the_scalar_kernel() {
        let isas = Isa::available();
        eprintln!("kernels on this processor: {isas:?}");
        for ty in crate::weights::BLOCK_TYPES {
            let w: QuantMatrix = random_matrix(ty, 3, 1536, 21);
            let x = random_x(4, 1536, 5);
            let a = Q8Rows::quantize(&x);
            for j in 0..w.rows() {
                for rows in 1..=4 {
                    let mut want = vec![0f32; rows];
                    Isa::Scalar.dot_rows(ty, w.row(j), &a, 4 - rows, &mut want);
                    for &isa in &isas {
                        let mut got = vec![0f32; rows];
                        isa.dot_rows(ty, w.row(j), &a, 4 - rows, &mut got);
                        for (g, e) in got.iter().zip(&want) {
                            assert!(
                                (g - e).abs() <= 1e-5 * (e.abs() + 10.0),
                                "{isa:?} {ty:?}: {g} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A tile of weight rows writes each row's results at its stride, equal
    /// to the kernel run one weight row at a time, and nothing else.
    #[test]
    fn tiles_equal_their_rows_at_the_stride() {
        for ty in crate::weights::BLOCK_TYPES {
            let w: QuantMatrix = random_matrix(ty, 5, 256, 8);
            let a = Q8Rows::quantize(&random_x(4, 256, 9));
            for &isa in &Isa::available() {
                for rows in 1..=4 {
                    let stride = 6;
                    let mut got = vec![-7f32; 5 * stride];
                    isa.dot_tile(
                        ty,
                        &(0..5).flat_map(|j| w.row(j).to_vec()).collect::<Vec<u8>>(),
                        &a,
                        4 - rows,
                        rows,
                        &mut got,
                        stride,
                    );
                    for j in 0..5 {
                        let mut want = vec![0f32; rows];
                        isa.dot_rows(ty, w.row(j), &a, 4 - rows, &mut want);
                        assert_eq!(got[j * stride..][..rows], want[..], "{isa:?} {ty:?}");
                        assert!(
                            got[j * stride + rows..][..stride - rows]
                                .iter()
                                .all(|&v| v == -7.0)
                        );
                    }
                }
            }
        }
    }

    /// A kernel must not treat a Q4_1 block like Q4_0 (or miss the
    /// minimum): changing only the minimum changes the result by exactly
    /// `Δm · s` on every set.
    #[test]
    fn q4_1_minimum_enters_every_kernel() {
        let mut w = random_matrix(GgmlType::Q4_1, 1, 32, 2);
        let x = random_x(1, 32, 3);
        let a = Q8Rows::quantize(&x);
        let before: Vec<f32> = Isa::available()
            .iter()
            .map(|isa| {
                let mut o = [0f32];
                isa.dot_rows(w.ty(), w.row(0), &a, 0, &mut o);
                o[0]
            })
            .collect();
        let mut blocks = w.row(0).to_vec();
        let m = super::super::quant::half_at(&blocks, 2);
        blocks[2..4].copy_from_slice(&half::f16::from_f32(m + 1.0).to_le_bytes());
        w = QuantMatrix::new(
            GgmlType::Q4_1,
            crate::weights::BlockArithmetic::Q8,
            1,
            32,
            blocks,
        )
        .unwrap();
        let delta = (super::super::quant::half_at(w.row(0), 2) - m) * a.row(0).s[0];
        for (isa, b) in Isa::available().iter().zip(before) {
            let mut o = [0f32];
            isa.dot_rows(w.ty(), w.row(0), &a, 0, &mut o);
            assert!((o[0] - b - delta).abs() < 1e-4, "{isa:?}");
        }
    }
}
