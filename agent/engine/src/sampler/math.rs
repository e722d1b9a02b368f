//! Numeric kernels over a row: maximum, validity scan, `exp` and sums of
//! weights. They are written in plain Rust with fixed lanes so that the
//! compiler vectorises them, and use only IEEE additions and
//! multiplications (no libm), so results are bit-identical on every
//! platform: a seeded request samples the same tokens everywhere.

/// Independent accumulators per reduction (16 f32: one AVX-512 register,
/// two AVX2 or four SSE ones); the order of additions is fixed, so sums
/// are deterministic.
const LANES: usize = 16;

/// Tokens per block of [`sum_weights`]: each lane sums 16 weights in f32,
/// blocks are summed in f64.
const SUM_BLOCK: usize = 256;

/// Below this `exp` returns exactly 0: `e^-87` is near the smallest normal
/// f32, and a weight that small relative to the maximum's 1 never matters.
const EXP_FLOOR: f32 = -87.0;

/// `e^x` for `x <= 0` (`-inf` included), within 1e-7 relative; exactly 0
/// below [`EXP_FLOOR`]. Cephes' `expf`: `x = n ln 2 + r`, a polynomial for
/// `e^r`, and `2^n` built from the exponent bits. Branch-free, so loops
/// over it vectorise.
#[inline(always)]
pub(crate) fn exp_nonpos(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that `n * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to the nearest integer, which then sits
    // in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = if x > EXP_FLOOR { x } else { EXP_FLOOR };
    let t = xc * LOG2_E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * (r * r) + r + 1.0;
    // n is an integer in [-126, 0], so the biased exponent stays normal.
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < EXP_FLOOR { 0.0 } else { e_r * two_n }
}

/// The largest value of a row (`-inf` if empty or all `-inf`); the row
/// holds no NaN.
pub(crate) fn max(values: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter()
        .chain(tail)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// The first NaN or `+inf` in the row, if any.
pub(crate) fn first_invalid(values: &[f32]) -> Option<usize> {
    // Branch-free scan first (vectorised); locate only if something is bad.
    let invalid = |v: f32| v.is_nan() | (v == f32::INFINITY);
    let bad = values.iter().fold(false, |acc, &v| acc | invalid(v));
    if bad {
        values.iter().position(|&v| invalid(v))
    } else {
        None
    }
}

/// `Σ weight(v)` over the row: f32 lanes within blocks of [`SUM_BLOCK`],
/// f64 across blocks (relative error around 1e-7), in a fixed order.
#[inline(always)]
pub(crate) fn sum_weights(values: &[f32], weight: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0.0f64;
    for block in values.chunks(SUM_BLOCK) {
        let mut acc = [0.0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += weight(v);
            }
        }
        let lanes: f64 = acc.iter().map(|&a| f64::from(a)).sum();
        let tail: f64 = tail.iter().map(|&v| f64::from(weight(v))).sum();
        total += lanes + tail;
    }
    total
}

/// `ln Σ exp(v)` computed stably (the maximum is subtracted first, the sum
/// is kept in f64); `-inf` when every value is `-inf`.
pub(crate) fn log_sum_exp(values: &[f32]) -> f32 {
    let max = max(values);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let sum = sum_weights(values, |v| exp_nonpos(v - max));
    (f64::from(max) + sum.ln()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_reference_within_a_few_ulp() {
        let mut worst: f64 = 0.0;
        let mut x = 0.0f32;
        while x > EXP_FLOOR {
            let got = f64::from(exp_nonpos(x));
            let want = f64::from(x).exp();
            worst = worst.max((got - want).abs() / want);
            x -= 0.000_37;
        }
        assert!(
            worst < 3.0 * f64::from(f32::EPSILON),
            "relative error {worst}"
        );
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(-87.5), 0.0);
        assert!(exp_nonpos(-86.9) > 0.0);
        assert_eq!(exp_nonpos(-f32::MAX), 0.0);
    }

    #[test]
    fn max_and_invalid_scan_cover_lanes_and_tail() {
        let mut v: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 9.0).collect();
        v[3] = 100.0;
        assert_eq!(max(&v), 100.0);
        v[36] = 200.0;
        assert_eq!(max(&v), 200.0);
        assert_eq!(max(&[f32::NEG_INFINITY; 9]), f32::NEG_INFINITY);
        assert_eq!(first_invalid(&v), None);
        v[20] = f32::NAN;
        v[30] = f32::INFINITY;
        assert_eq!(first_invalid(&v), Some(20));
        v[20] = f32::NEG_INFINITY;
        assert_eq!(first_invalid(&v), Some(30));
    }

    #[test]
    fn log_sum_exp_is_stable_and_exact() {
        let v = [1000.0, 1000.0];
        assert!((log_sum_exp(&v) - (1000.0 + 2f32.ln())).abs() < 1e-3);
        let v: Vec<f32> = (0..21).map(|i| i as f32 * 0.3 - 2.0).collect();
        let naive = v.iter().map(|x| f64::from(*x).exp()).sum::<f64>().ln() as f32;
        assert!((log_sum_exp(&v) - naive).abs() < 1e-6);
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
    }
}
