//! Transposing a dequantized weight panel into the column-major layout
//! the `gemm` crate's kernels read without packing ([`transpose()`]): AVX2
//! in 8×8 tiles where the processor has it and both sides are multiples
//! of 8, the `transpose` crate otherwise.
//!
//! Written here rather than left to a crate: the crate's cache-oblivious
//! transpose is scalar, and at about 17 % of a 32-sequence decode step on
//! SmolLM2 it cost most of what skipping the `gemm` crate's own packing
//! saved. Three shuffle stages per tile turn eight rows into eight columns
//! in registers.

/// `dst[c·rows + r] = src[r·cols + c]`: `src` is `[rows, cols]` row-major.
///
/// # Panics
///
/// When either slice is shorter than `rows · cols`.
pub fn transpose(src: &[f32], dst: &mut [f32], cols: usize, rows: usize) {
    let n = rows * cols;
    let (src, dst) = (&src[..n], &mut dst[..n]);
    #[cfg(target_arch = "x86_64")]
    if rows.is_multiple_of(8)
        && cols.is_multiple_of(8)
        && std::arch::is_x86_feature_detected!("avx2")
    {
        // SAFETY: the processor has AVX2 (checked above).
        #[allow(unsafe_code)]
        unsafe {
            avx2::tiles(src, dst, cols, rows)
        };
        return;
    }
    transpose::transpose(src, dst, cols, rows);
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    /// Eight values of `s` from `at`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load(s: &[f32], at: usize) -> __m256 {
        let s = &s[at..at + 8];
        // SAFETY: `s` holds the eight values read; the load is unaligned.
        unsafe { _mm256_loadu_ps(s.as_ptr()) }
    }

    /// Stores `v` into `d[at..at + 8]`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn store(d: &mut [f32], at: usize, v: __m256) {
        let d = &mut d[at..at + 8];
        // SAFETY: `d` holds the eight values written; the store is unaligned.
        unsafe { _mm256_storeu_ps(d.as_mut_ptr(), v) }
    }

    /// Eight rows of eight values, as eight columns.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn tile(v: [__m256; 8]) -> [__m256; 8] {
        // Pairs of rows interleaved: (a0 b0 a1 b1 | a4 b4 a5 b5), ...
        let lo = |a, b| _mm256_unpacklo_ps(a, b);
        let hi = |a, b| _mm256_unpackhi_ps(a, b);
        let t = [
            lo(v[0], v[1]),
            hi(v[0], v[1]),
            lo(v[2], v[3]),
            hi(v[2], v[3]),
            lo(v[4], v[5]),
            hi(v[4], v[5]),
            lo(v[6], v[7]),
            hi(v[6], v[7]),
        ];
        // Four rows' element c (and c + 4) together: (a0 b0 c0 d0 | a4 ..).
        let s = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        // Halves of the first four rows and the last four joined.
        [
            _mm256_permute2f128_ps::<0x20>(s[0], s[4]),
            _mm256_permute2f128_ps::<0x20>(s[1], s[5]),
            _mm256_permute2f128_ps::<0x20>(s[2], s[6]),
            _mm256_permute2f128_ps::<0x20>(s[3], s[7]),
            _mm256_permute2f128_ps::<0x31>(s[0], s[4]),
            _mm256_permute2f128_ps::<0x31>(s[1], s[5]),
            _mm256_permute2f128_ps::<0x31>(s[2], s[6]),
            _mm256_permute2f128_ps::<0x31>(s[3], s[7]),
        ]
    }

    /// [`super::transpose`] for multiples of 8, a tile at a time.
    #[target_feature(enable = "avx2")]
    pub fn tiles(src: &[f32], dst: &mut [f32], cols: usize, rows: usize) {
        for r0 in (0..rows).step_by(8) {
            for c0 in (0..cols).step_by(8) {
                let v = std::array::from_fn(|i| load(src, (r0 + i) * cols + c0));
                for (j, col) in tile(v).into_iter().enumerate() {
                    store(dst, (c0 + j) * rows + r0, col);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_equal_the_crate_at_tile_and_odd_sizes() {
        for (rows, cols) in [
            (8, 8),
            (16, 576),
            (112, 64),
            (24, 40),
            (7, 9),
            (16, 12),
            (1, 5),
        ] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 3.0).collect();
            let mut got = vec![f32::NAN; rows * cols];
            transpose(&src, &mut got, cols, rows);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        got[c * rows + r],
                        src[r * cols + c],
                        "{rows}×{cols} at {r},{c}"
                    );
                }
            }
        }
    }
}
