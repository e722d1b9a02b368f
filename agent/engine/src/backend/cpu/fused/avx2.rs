//! The AVX2 kernels (with FMA and F16C): each block is unpacked into
//! 8-lane f32 registers, 32 weights at a time, with the operations of the
//! GGUF reference in the same order (scale × quant, then the offset, no
//! fused multiply-add), so the weights in the registers equal
//! [`crate::gguf::dequant`]'s bit for bit; each register is then
//! multiply-added into every activation row's accumulators. Only the
//! summation order differs from the dequantize-then-dot product.
//!
//! Accumulators: four per row for one row, two per row for two to four
//! rows, so that enough independent FMA chains hide the FMA latency.

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use crate::gguf::GgmlType;
use crate::gguf::dequant::{q3_k_scales, scale_min_k4};

/// Whether this processor runs these kernels.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// `out[r] = Σ w · xs[r]` over one weight row `w` (whole blocks of `ty`,
/// a quantized type) and one to four activation rows as long as the row.
///
/// # Panics
/// When the processor lacks the features, `ty` is not block-quantized, or
/// the lengths do not fit.
pub fn dot_rows(ty: GgmlType, w: &[u8], xs: &[&[f32]], out: &mut [f32]) {
    assert!(available(), "AVX2, FMA and F16C are required");
    let elems = w.len() / ty.block_bytes() * ty.block_elems();
    assert!((1..=4).contains(&xs.len()) && out.len() == xs.len());
    assert!(xs.iter().all(|x| x.len() == elems) && w.len().is_multiple_of(ty.block_bytes()));
    macro_rules! go {
        ($kernel:ident) => {
            // SAFETY: the processor has AVX2, FMA and F16C, and every
            // activation row holds as many values as `w` has weights
            // (both asserted above).
            unsafe {
                match xs.len() {
                    1 => $kernel::<1, 4>(w, ptrs(xs), out),
                    2 => $kernel::<2, 2>(w, ptrs(xs), out),
                    3 => $kernel::<3, 2>(w, ptrs(xs), out),
                    _ => $kernel::<4, 2>(w, ptrs(xs), out),
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

fn ptrs<const M: usize>(xs: &[&[f32]]) -> [*const f32; M] {
    std::array::from_fn(|r| xs[r].as_ptr())
}

/// `A` accumulators of eight lanes for each of `M` activation rows.
struct Acc<const M: usize, const A: usize> {
    v: [[__m256; A]; M],
    x: [*const f32; M],
}

impl<const M: usize, const A: usize> Acc<M, A> {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn new(x: [*const f32; M]) -> Self {
        Self {
            v: [[_mm256_setzero_ps(); A]; M],
            x,
        }
    }

    /// Adds `w` (32 weights) times activations `off..off + 32` of every row.
    ///
    /// # Safety
    /// Every row holds at least `off + 32` values.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fma32(&mut self, off: usize, w: [__m256; 4]) {
        for r in 0..M {
            for (i, w) in w.iter().enumerate() {
                // SAFETY: `off + 8i + 8 <= off + 32` values exist (the
                // caller's contract).
                let x = unsafe { _mm256_loadu_ps(self.x[r].add(off + 8 * i)) };
                let a = &mut self.v[r][i % A];
                *a = _mm256_fmadd_ps(*w, x, *a);
            }
        }
    }

    /// Writes each row's sum.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn finish(self, out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(&self.v) {
            let mut s = v[0];
            for a in &v[1..] {
                s = _mm256_add_ps(s, *a);
            }
            let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            *o = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)));
        }
    }
}

/// Sixteen bytes of `b` from `at`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load16(b: &[u8], at: usize) -> __m128i {
    let s = &b[at..at + 16];
    // SAFETY: `s` holds 16 bytes; the load is unaligned.
    unsafe { _mm_loadu_si128(s.as_ptr().cast()) }
}

/// The f16 at byte `at` of `b`, widened.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16(b: &[u8], at: usize) -> f32 {
    let h = u16::from_le_bytes([b[at], b[at + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
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

/// `d · q`, the first 16 elements with `d[0]`, the others with `d[1]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scaled(q: [__m256; 4], d: [f32; 2]) -> [__m256; 4] {
    let d = d.map(|d| _mm256_set1_ps(d));
    std::array::from_fn(|i| _mm256_mul_ps(d[i / 2], q[i]))
}

/// `d · q + m`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scaled_plus(q: [__m256; 4], d: f32, m: f32) -> [__m256; 4] {
    let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
    q.map(|q| _mm256_add_ps(_mm256_mul_ps(d, q), m))
}

/// `d · q − m`, the first 16 elements with `d[0], m[0]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scaled_minus(q: [__m256; 4], d: [f32; 2], m: [f32; 2]) -> [__m256; 4] {
    let (d, m) = (d.map(|d| _mm256_set1_ps(d)), m.map(|m| _mm256_set1_ps(m)));
    std::array::from_fn(|i| _mm256_sub_ps(_mm256_mul_ps(d[i / 2], q[i]), m[i / 2]))
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

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_q4_0(b: &[u8]) -> [__m256; 4] {
    let (lo, hi) = nibbles(b, 2);
    let eight = _mm_set1_epi8(8);
    let q = widen(_mm_sub_epi8(lo, eight), _mm_sub_epi8(hi, eight));
    let d = f16(b, 0);
    scaled(q, [d, d])
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_q4_1(b: &[u8]) -> [__m256; 4] {
    let (lo, hi) = nibbles(b, 4);
    scaled_plus(widen(lo, hi), f16(b, 0), f16(b, 2))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_q5_0(b: &[u8]) -> [__m256; 4] {
    let (lo, hi) = nibbles(b, 6);
    let (hlo, hhi) = fifth_bits(b, 2);
    let sixteen = _mm_set1_epi8(16);
    let lo = _mm_sub_epi8(_mm_or_si128(lo, hlo), sixteen);
    let hi = _mm_sub_epi8(_mm_or_si128(hi, hhi), sixteen);
    let d = f16(b, 0);
    scaled(widen(lo, hi), [d, d])
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_q5_1(b: &[u8]) -> [__m256; 4] {
    let (lo, hi) = nibbles(b, 8);
    let (hlo, hhi) = fifth_bits(b, 4);
    let q = widen(_mm_or_si128(lo, hlo), _mm_or_si128(hi, hhi));
    scaled_plus(q, f16(b, 0), f16(b, 2))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_q8_0(b: &[u8]) -> [__m256; 4] {
    let d = f16(b, 0);
    scaled(widen(load16(b, 2), load16(b, 18)), [d, d])
}

/// A kernel over 32-element blocks of `$bytes` bytes unpacked by `$block`.
macro_rules! small_kernel {
    ($name:ident, $bytes:literal, $block:ident) => {
        /// # Safety
        /// The processor has AVX2, FMA and F16C; every row of `x` holds
        /// as many values as `w` has weights.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name<const M: usize, const A: usize>(
            w: &[u8],
            x: [*const f32; M],
            out: &mut [f32],
        ) {
            let mut acc = Acc::<M, A>::new(x);
            for (b, block) in w.chunks_exact($bytes).enumerate() {
                // SAFETY: block `b`'s 32 activations exist (the contract).
                unsafe { acc.fma32(32 * b, $block(block)) };
            }
            acc.finish(out);
        }
    };
}

small_kernel!(q4_0, 18, block_q4_0);
small_kernel!(q4_1, 20, block_q4_1);
small_kernel!(q5_0, 22, block_q5_0);
small_kernel!(q5_1, 24, block_q5_1);
small_kernel!(q8_0, 34, block_q8_0);

/// A kernel over 256-element blocks of `$bytes` bytes; `$group(block, g)`
/// unpacks elements `32g..32g + 32` of a block.
macro_rules! k_kernel {
    ($name:ident, $bytes:literal, $group:expr) => {
        /// # Safety
        /// As for the small-block kernels.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name<const M: usize, const A: usize>(
            w: &[u8],
            x: [*const f32; M],
            out: &mut [f32],
        ) {
            let mut acc = Acc::<M, A>::new(x);
            for (b, block) in w.chunks_exact($bytes).enumerate() {
                let unpack = $group(block);
                for g in 0..8 {
                    // SAFETY: block `b`'s 256 activations exist.
                    unsafe { acc.fma32(256 * b + 32 * g, unpack.group(block, g)) };
                }
            }
            acc.finish(out);
        }
    };
}

/// Per-block state of a K-quant: its scales, decoded once per block.
struct KScales<const T: u8> {
    d: [f32; 16],
    m: [f32; 16],
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q2_k_scales(b: &[u8]) -> KScales<2> {
    let (d, dmin) = (f16(b, 80), f16(b, 82));
    KScales {
        d: std::array::from_fn(|s| d * f32::from(b[s] & 0x0F)),
        m: std::array::from_fn(|s| dmin * f32::from(b[s] >> 4)),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q3_k_block_scales(b: &[u8]) -> KScales<3> {
    let d = f16(b, 108);
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
    let (d, dmin) = (f16(b, 0), f16(b, 2));
    let (sc, mn) = scale_min_k4(&b[4..16]);
    KScales {
        d: std::array::from_fn(|s| d * f32::from(sc[s / 2])),
        m: std::array::from_fn(|s| dmin * f32::from(mn[s / 2])),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6_k_scales(b: &[u8]) -> KScales<6> {
    let d = f16(b, 208);
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
        let q = widen(
            bits(load16(b, at), shift, 3),
            bits(load16(b, at + 16), shift, 3),
        );
        scaled_minus(
            q,
            [self.d[2 * g], self.d[2 * g + 1]],
            [self.m[2 * g], self.m[2 * g + 1]],
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
        scaled(widen(half(0), half(16)), [self.d[2 * g], self.d[2 * g + 1]])
    }
}

impl KScales<4> {
    /// Nibble `g % 2` of `qs[32(g / 2)..][..32]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn group(&self, b: &[u8], g: usize) -> [__m256; 4] {
        let (at, shift) = (16 + 32 * (g / 2), 4 * (g % 2) as u32);
        let q = widen(
            bits(load16(b, at), shift, 0x0F),
            bits(load16(b, at + 16), shift, 0x0F),
        );
        scaled_minus(q, [self.d[2 * g]; 2], [self.m[2 * g]; 2])
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
        scaled_minus(
            widen(half(0), half(16)),
            [self.d[2 * g]; 2],
            [self.m[2 * g]; 2],
        )
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
        scaled(widen(half(0), half(16)), [self.d[2 * g], self.d[2 * g + 1]])
    }
}

k_kernel!(q2_k, 84, q2_k_scales);
k_kernel!(q3_k, 110, q3_k_block_scales);
k_kernel!(q4_k, 144, q45_k_scales::<4>);
k_kernel!(q5_k, 176, q45_k_scales::<5>);
k_kernel!(q6_k, 210, q6_k_scales);
