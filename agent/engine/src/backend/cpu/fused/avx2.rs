//! The AVX2 kernels (with FMA and F16C). Each block is unpacked in
//! registers, 32 quants at a time, to f32 integers `q` (offsets such as
//! Q5_0's −16 or Q6_K's −32 applied to the integers or folded into `m`);
//! a group of 32 weights is then `w = d·q + m` with one or two scales `d`
//! and offsets `m` (per 16 elements). Every activation row takes
//! `d · Σ q·x` with FMA and, where the type has an offset, `m · Σ x` from
//! the row's precomputed sums of 16 ([`super::Rows`]): the weights'
//! arithmetic reassociated, so results agree with dequantize-then-dot to
//! float rounding (relative to `Σ |w·x|`), not bit for bit. Each block is
//! read once for all rows; two accumulators per row (the first and the
//! second 16 of each group) hide the FMA latency.

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::Rows;
use crate::gguf::GgmlType;
use crate::gguf::dequant::{q3_k_scales, scale_min_k4};

/// Whether this processor runs these kernels.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// `out[r] = Σ w · x[r]` over one weight row `w` (whole blocks of `ty`,
/// a quantized type) and the one to four rows of `x`, as long as the row.
///
/// # Panics
/// When the processor lacks the features, `ty` is not block-quantized, or
/// the lengths do not fit.
pub fn dot_rows(ty: GgmlType, w: &[u8], x: &Rows<'_>, out: &mut [f32]) {
    assert!(available(), "AVX2, FMA and F16C are required");
    let elems = w.len() / ty.block_bytes() * ty.block_elems();
    assert!((1..=4).contains(&x.len()) && out.len() == x.len());
    assert!(x.cols() == elems && w.len().is_multiple_of(ty.block_bytes()));
    macro_rules! go {
        ($kernel:ident) => {
            // SAFETY: the processor has AVX2, FMA and F16C, and every
            // activation row holds as many values as `w` has weights, with
            // a sum for each 16 (both asserted above).
            unsafe {
                match x.len() {
                    1 => $kernel::<1>(w, x, out),
                    2 => $kernel::<2>(w, x, out),
                    3 => $kernel::<3>(w, x, out),
                    _ => $kernel::<4>(w, x, out),
                }
            }
        };
    }
    match ty {
        GgmlType::Q4_0 => go!(q4_0),
        GgmlType::Q4_1 => go!(q4_1),
        GgmlType::Q5_0 => go!(q5_0),
        GgmlType::Q5_1 => go!(q5_1),
        GgmlType::Q8_0 => go!(q8_0),
        GgmlType::Q2_K => go!(q2_k),
        GgmlType::Q3_K => go!(q3_k),
        GgmlType::Q4_K => go!(q4_k),
        GgmlType::Q5_K => go!(q5_k),
        GgmlType::Q6_K => go!(q6_k),
        other => panic!("{} has no fused kernel", other.name()),
    }
}

/// Two accumulators of eight lanes and an offset sum for each of `M`
/// activation rows, and the rows' values and sums of 16.
struct Acc<const M: usize> {
    v: [[__m256; 2]; M],
    mins: [f32; M],
    x: [*const f32; M],
    sums: [*const f32; M],
}

impl<const M: usize> Acc<M> {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn new(x: &Rows<'_>) -> Self {
        let zero = _mm256_setzero_ps();
        Self {
            v: [[zero; 2]; M],
            mins: [0.0; M],
            x: std::array::from_fn(|r| x.row(r).as_ptr()),
            sums: std::array::from_fn(|r| x.sums(r).as_ptr()),
        }
    }

    /// Adds 32 weights `w[e] = d[e / 16] · q[e] + m[e / 16]` (one scale
    /// and offset for all 32 when `ONE_D`; `m` ignored unless `MIN`) times
    /// activations `off..off + 32` of every row.
    ///
    /// # Safety
    /// `off` is a multiple of 32 and every row holds at least `off + 32`
    /// values.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn add<const MIN: bool, const ONE_D: bool>(
        &mut self,
        off: usize,
        q: [__m256; 4],
        d: [f32; 2],
        m: [f32; 2],
    ) {
        let d0 = _mm256_set1_ps(d[0]);
        let d1 = if ONE_D { d0 } else { _mm256_set1_ps(d[1]) };
        for r in 0..M {
            // SAFETY: values `off..off + 32` and sums `off / 16` and the
            // next exist (the caller's contract).
            let (x, s) = unsafe {
                let p = self.x[r].add(off);
                let x: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
                let s = self.sums[r].add(off / 16);
                (x, [*s, *s.add(1)])
            };
            let t0 = _mm256_fmadd_ps(q[1], x[1], _mm256_mul_ps(q[0], x[0]));
            let t1 = _mm256_fmadd_ps(q[3], x[3], _mm256_mul_ps(q[2], x[2]));
            let acc = &mut self.v[r];
            acc[0] = _mm256_fmadd_ps(d0, t0, acc[0]);
            acc[1] = _mm256_fmadd_ps(d1, t1, acc[1]);
            if MIN && ONE_D {
                self.mins[r] += m[0] * (s[0] + s[1]);
            } else if MIN {
                self.mins[r] += m[0] * s[0] + m[1] * s[1];
            }
        }
    }

    /// Writes each row's sum.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn finish(self, out: &mut [f32]) {
        for ((o, v), m) in out.iter_mut().zip(&self.v).zip(self.mins) {
            let s = _mm256_add_ps(v[0], v[1]);
            let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            *o = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h))) + m;
        }
    }
}

/// Bytes `at..at + 8` of `b` widened to eight i32, unsigned or signed.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load8<const SIGNED: bool>(b: &[u8], at: usize) -> __m256i {
    let s = &b[at..at + 8];
    // SAFETY: `s` holds the 8 bytes read; the load is unaligned.
    let v = unsafe { _mm_loadl_epi64(s.as_ptr().cast()) };
    if SIGNED {
        _mm256_cvtepi8_epi32(v)
    } else {
        _mm256_cvtepu8_epi32(v)
    }
}

/// The 32 nibbles of a small block's 16 bytes at `at`, as f32: low
/// nibbles (elements 0..16), then high ones.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn nibbles_f32(b: &[u8], at: usize) -> [__m256; 4] {
    let (v0, v1) = (load8::<false>(b, at), load8::<false>(b, at + 8));
    let low = _mm256_set1_epi32(0x0F);
    [
        _mm256_cvtepi32_ps(_mm256_and_si256(v0, low)),
        _mm256_cvtepi32_ps(_mm256_and_si256(v1, low)),
        _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(v0)),
        _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(v1)),
    ]
}

/// Sixteen bytes of `b` from `at`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load16(b: &[u8], at: usize) -> __m128i {
    let s = &b[at..at + 16];
    // SAFETY: `s` holds 16 bytes; the load is unaligned.
    unsafe { _mm_loadu_si128(s.as_ptr().cast()) }
}

/// The four f16 at bytes `at..at + 8` of `b`, widened.
///
/// Written as assembly because the compiler narrows a conversion of which
/// one lane is used to a 16-bit insert that merges into whatever register
/// it picks, often an accumulator, chaining every block behind the
/// previous one's FMA; the memory form here writes its whole register.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16x4(b: &[u8], at: usize) -> [f32; 4] {
    let s = &b[at..at + 8];
    let v: __m128;
    // SAFETY: the instruction reads the 8 bytes of `s` and writes `v`
    // only; the processor has F16C (this function's features).
    unsafe {
        std::arch::asm!(
            "vcvtph2ps {v}, qword ptr [{p}]",
            v = out(xmm_reg) v,
            p = in(reg) s.as_ptr(),
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    let mut out = [0f32; 4];
    // SAFETY: a 16-byte unaligned store into a 16-byte array.
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), v) };
    out
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn to_f32(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
}

/// 32 signed bytes (elements 0..16 in `lo`, 16..32 in `hi`) as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn widen(lo: __m128i, hi: __m128i) -> [__m256; 4] {
    [
        to_f32(lo),
        to_f32(_mm_srli_si128::<8>(lo)),
        to_f32(hi),
        to_f32(_mm_srli_si128::<8>(hi)),
    ]
}

/// Bytes `(v >> shift) & mask`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bits(v: __m128i, shift: u32, mask: i8) -> __m128i {
    let s = _mm_srl_epi16(v, _mm_cvtsi32_si128(shift as i32));
    _mm_and_si128(s, _mm_set1_epi8(mask))
}

/// `value` in each byte of `v` that has bit `bit` set (`when_set`) or clear.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bit_to(v: __m128i, bit: usize, when_set: bool, value: i8) -> __m128i {
    let b = _mm_set1_epi8((1u8 << bit) as i8);
    let set = _mm_cmpeq_epi8(_mm_and_si128(v, b), b);
    let hit = if when_set {
        set
    } else {
        _mm_xor_si128(set, _mm_set1_epi8(-1))
    };
    _mm_and_si128(hit, _mm_set1_epi8(value))
}

/// The 4-bit quants of a small block: low nibbles, then high ones.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn nibbles(b: &[u8], at: usize) -> (__m128i, __m128i) {
    let qs = load16(b, at);
    (bits(qs, 0, 0x0F), bits(qs, 4, 0x0F))
}

/// `0x10` in byte `e` for each set bit `e` of the 32-bit `qh` at `at`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn fifth_bits(b: &[u8], at: usize) -> (__m128i, __m128i) {
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let v = _mm_set1_epi32(qh as i32);
    // Byte `i` of each eight: every bit but `i`, so `| byte == 0xFF` iff
    // bit `i` of the selected byte of `qh` is set.
    let others = _mm_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    let pick = |sel: __m128i| {
        let spread = _mm_or_si128(_mm_shuffle_epi8(v, sel), others);
        let set = _mm_cmpeq_epi8(spread, _mm_set1_epi8(-1));
        _mm_and_si128(set, _mm_set1_epi8(0x10))
    };
    (
        pick(_mm_set_epi64x(0x0101_0101_0101_0101, 0)),
        pick(_mm_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202)),
    )
}

/// A kernel over 32-element blocks of `$bytes` bytes: `$block(block)`
/// gives the quants as f32, the scale and the offset (`$min`: whether
/// there is one).
macro_rules! small_kernel {
    ($name:ident, $bytes:literal, $min:literal, $block:ident) => {
        /// # Safety
        /// The processor has AVX2, FMA and F16C; every row of `x` holds
        /// as many values as `w` has weights.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name<const M: usize>(w: &[u8], x: &Rows<'_>, out: &mut [f32]) {
            let mut acc = Acc::<M>::new(x);
            for (b, block) in w.chunks_exact($bytes).enumerate() {
                let (q, d, m) = $block(block);
                // SAFETY: block `b`'s 32 activations exist (the contract).
                unsafe { acc.add::<$min, true>(32 * b, q, [d; 2], [m; 2]) };
            }
            acc.finish(out);
        }
    };
}

/// `d · (q − 8)` as `d · q − 8d`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_q4_0(b: &[u8]) -> ([__m256; 4], f32, f32) {
    let d = f16x4(b, 0)[0];
    (nibbles_f32(b, 2), d, -8.0 * d)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_q4_1(b: &[u8]) -> ([__m256; 4], f32, f32) {
    let [d, m, ..] = f16x4(b, 0);
    (nibbles_f32(b, 4), d, m)
}

/// Nibbles and fifth bits of a Q5 block (`qh` at `at`, quants after it).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn five_bit_quants(b: &[u8], at: usize) -> [__m256; 4] {
    let (lo, hi) = nibbles(b, at + 4);
    let (hlo, hhi) = fifth_bits(b, at);
    widen(_mm_or_si128(lo, hlo), _mm_or_si128(hi, hhi))
}

/// `d · (q − 16)` as `d · q − 16d`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_q5_0(b: &[u8]) -> ([__m256; 4], f32, f32) {
    let d = f16x4(b, 0)[0];
    (five_bit_quants(b, 2), d, -16.0 * d)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_q5_1(b: &[u8]) -> ([__m256; 4], f32, f32) {
    let [d, m, ..] = f16x4(b, 0);
    (five_bit_quants(b, 4), d, m)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_q8_0(b: &[u8]) -> ([__m256; 4], f32, f32) {
    let q = std::array::from_fn(|i| _mm256_cvtepi32_ps(load8::<true>(b, 2 + 8 * i)));
    (q, f16x4(b, 0)[0], 0.0)
}

/// Q4_0, Q4_1 or Q8_0 blocks dequantized into `out` exactly as
/// [`super::portable::dequantize`] does it, bit for bit (`d · (q − 8)`,
/// `d · q + m` and `d · q`, each product and sum rounded as there);
/// `false`, with nothing written, for another type or a processor
/// without AVX2, FMA and F16C.
///
/// # Panics
/// When `out` holds fewer values than `blocks` has weights.
pub fn dequantize(ty: GgmlType, blocks: &[u8], out: &mut [f32]) -> bool {
    let supported = matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0);
    if !supported || !available() {
        return false;
    }
    assert!(out.len() >= blocks.len() / ty.block_bytes() * 32);
    // SAFETY: the processor has the features (checked above).
    unsafe { dequantize_small(ty, blocks, out) };
    true
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dequantize_small(ty: GgmlType, blocks: &[u8], out: &mut [f32]) {
    for (b, o) in blocks
        .chunks_exact(ty.block_bytes())
        .zip(out.chunks_exact_mut(32))
    {
        let (q, d, m) = match ty {
            GgmlType::Q4_0 => {
                let eight = _mm256_set1_ps(8.0);
                let q = nibbles_f32(b, 2).map(|v| _mm256_sub_ps(v, eight));
                (q, f16x4(b, 0)[0], None)
            }
            GgmlType::Q4_1 => {
                let [d, m, ..] = f16x4(b, 0);
                (nibbles_f32(b, 4), d, Some(m))
            }
            _ => {
                let (q, d, _) = block_q8_0(b);
                (q, d, None)
            }
        };
        let d = _mm256_set1_ps(d);
        for (i, q) in q.into_iter().enumerate() {
            let mut v = _mm256_mul_ps(d, q);
            if let Some(m) = m {
                v = _mm256_add_ps(v, _mm256_set1_ps(m));
            }
            // SAFETY: `o` holds 32 values; this stores 8 from `8 i`.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * i), v) };
        }
    }
}

small_kernel!(q4_0, 18, true, block_q4_0);
small_kernel!(q4_1, 20, true, block_q4_1);
small_kernel!(q5_0, 22, true, block_q5_0);
small_kernel!(q5_1, 24, true, block_q5_1);
small_kernel!(q8_0, 34, false, block_q8_0);

/// A kernel over 256-element blocks of `$bytes` bytes: `$scales(block)`
/// decodes a block's scales and offsets (`$min`: whether it has offsets;
/// `$one_d`: one scale per 32 elements rather than 16), whose `group(block,
/// g)` unpacks the quants of elements `32g..32g + 32`.
macro_rules! k_kernel {
    ($name:ident, $bytes:literal, $min:literal, $one_d:literal, $scales:expr) => {
        /// # Safety
        /// As for the small-block kernels.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name<const M: usize>(w: &[u8], x: &Rows<'_>, out: &mut [f32]) {
            let mut acc = Acc::<M>::new(x);
            for (b, block) in w.chunks_exact($bytes).enumerate() {
                let k = $scales(block);
                for g in 0..8 {
                    let (d, m) = ([k.d[2 * g], k.d[2 * g + 1]], [k.m[2 * g], k.m[2 * g + 1]]);
                    let q = k.group(block, g);
                    // SAFETY: block `b`'s 256 activations exist.
                    unsafe { acc.add::<$min, $one_d>(256 * b + 32 * g, q, d, m) };
                }
            }
            acc.finish(out);
        }
    };
}

/// A K-quant block's scales `d` and offsets `m` per 16 elements (`w = d·q
/// + m`), decoded once per block; `T` names the type.
struct KScales<const T: u8> {
    d: [f32; 16],
    m: [f32; 16],
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q2_k_scales(b: &[u8]) -> KScales<2> {
    let [.., d, dmin] = f16x4(b, 76);
    KScales {
        d: std::array::from_fn(|s| d * f32::from(b[s] & 0x0F)),
        m: std::array::from_fn(|s| -(dmin * f32::from(b[s] >> 4))),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q3_k_block_scales(b: &[u8]) -> KScales<3> {
    let d = f16x4(b, 102)[3];
    KScales {
        d: q3_k_scales(&b[96..108]).map(|s| d * s),
        m: [0.0; 16],
    }
}

/// Q4_K and Q5_K: eight scales of 32 elements, stored twice (as pairs of
/// 16) so that every type indexes `2g` and `2g + 1`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q45_k_scales<const T: u8>(b: &[u8]) -> KScales<T> {
    let [d, dmin, ..] = f16x4(b, 0);
    let (sc, mn) = scale_min_k4(&b[4..16]);
    KScales {
        d: std::array::from_fn(|s| d * f32::from(sc[s / 2])),
        m: std::array::from_fn(|s| -(dmin * f32::from(mn[s / 2]))),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6_k_scales(b: &[u8]) -> KScales<6> {
    let d = f16x4(b, 202)[3];
    KScales {
        d: std::array::from_fn(|s| d * f32::from(b[192 + s] as i8)),
        m: [0.0; 16],
    }
}

impl KScales<2> {
    /// `qs[32h..32h + 32]`, bits `2t`, with `g = 4h + t`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn group(&self, b: &[u8], g: usize) -> [__m256; 4] {
        let (at, shift) = (16 + 32 * (g / 4), 2 * (g % 4) as u32);
        widen(
            bits(load16(b, at), shift, 3),
            bits(load16(b, at + 16), shift, 3),
        )
    }
}

impl KScales<3> {
    /// As Q2_K, minus 4 where bit `g` of `hmask[e]` is clear.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn group(&self, b: &[u8], g: usize) -> [__m256; 4] {
        let (at, shift) = (32 + 32 * (g / 4), 2 * (g % 4) as u32);
        let half = |off: usize| {
            let low = bits(load16(b, at + off), shift, 3);
            _mm_sub_epi8(low, bit_to(load16(b, off), g, false, 4))
        };
        widen(half(0), half(16))
    }
}

impl KScales<4> {
    /// Nibble `g % 2` of `qs[32(g / 2)..][..32]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn group(&self, b: &[u8], g: usize) -> [__m256; 4] {
        let (at, shift) = (16 + 32 * (g / 2), 4 * (g % 2) as u32);
        widen(
            bits(load16(b, at), shift, 0x0F),
            bits(load16(b, at + 16), shift, 0x0F),
        )
    }
}

impl KScales<5> {
    /// As Q4_K (quants from byte 48), plus 16 where bit `g` of `qh[e]` is set.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn group(&self, b: &[u8], g: usize) -> [__m256; 4] {
        let (at, shift) = (48 + 32 * (g / 2), 4 * (g % 2) as u32);
        let half = |off: usize| {
            let low = bits(load16(b, at + off), shift, 0x0F);
            _mm_or_si128(low, bit_to(load16(b, 16 + off), g, true, 0x10))
        };
        widen(half(0), half(16))
    }
}

impl KScales<6> {
    /// With `g = 4h + t`: nibble `t / 2` of `ql[64h + 32(t % 2)..][..32]`
    /// and bits `2t` of `qh[32h..][..32]` as bits 4 and 5, minus 32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn group(&self, b: &[u8], g: usize) -> [__m256; 4] {
        let (h, t) = (g / 4, g % 4);
        let (at_l, at_h) = (64 * h + 32 * (t % 2), 128 + 32 * h);
        let half = |off: usize| {
            let low = bits(load16(b, at_l + off), 4 * (t / 2) as u32, 0x0F);
            let high = bits(load16(b, at_h + off), 2 * t as u32, 3);
            let q = _mm_or_si128(low, _mm_slli_epi16::<4>(high));
            _mm_sub_epi8(q, _mm_set1_epi8(32))
        };
        widen(half(0), half(16))
    }
}

k_kernel!(q2_k, 84, true, false, q2_k_scales);
k_kernel!(q3_k, 110, false, false, q3_k_block_scales);
k_kernel!(q4_k, 144, true, true, q45_k_scales::<4>);
k_kernel!(q5_k, 176, true, true, q45_k_scales::<5>);
k_kernel!(q6_k, 210, false, false, q6_k_scales);
