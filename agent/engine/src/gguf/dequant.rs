//! GGML tensor types and their dequantization to f32.
//!
//! Block layouts follow llama.cpp's `ggml-common.h`; the arithmetic follows
//! the reference of `gguf-py` (`gguf/quants.py`) operation for operation in
//! f32 (scale × quant, then the offset; no fused multiply-add), so the
//! results equal `gguf.quants.dequantize` bit for bit
//! (`tests/gguf.rs` checks every type against it).

use half::f16;

/// Elements in one K-quant super-block.
const QK_K: usize = 256;

/// A tensor type of a GGUF file (`ggml_type`), with the ids llama.cpp
/// writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)] // the names llama.cpp and every GGUF tool use
pub enum GgmlType {
    /// IEEE single.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 32 × 8-bit with an f16 scale.
    Q8_0,
    /// 32 × 4-bit, f16 scale, offset −8.
    Q4_0,
    /// 32 × 4-bit, f16 scale and minimum.
    Q4_1,
    /// 32 × 5-bit, f16 scale, offset −16.
    Q5_0,
    /// 32 × 5-bit, f16 scale and minimum.
    Q5_1,
    /// 256 × 2-bit in 16 groups with 4-bit scales and minimums.
    Q2_K,
    /// 256 × 3-bit in 16 groups with 6-bit scales.
    Q3_K,
    /// 256 × 4-bit in 8 groups with 6-bit scales and minimums.
    Q4_K,
    /// 256 × 5-bit in 8 groups with 6-bit scales and minimums.
    Q5_K,
    /// 256 × 6-bit in 16 groups with 8-bit scales.
    Q6_K,
}

/// Every type the engine reads.
pub const SUPPORTED: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Names of the `ggml_type` ids the engine does not read, for errors.
fn unsupported_name(id: u32) -> Option<&'static str> {
    Some(match id {
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

impl GgmlType {
    /// The type with `ggml_type` id `id`; the error says what it is.
    pub fn from_id(id: u32) -> Result<Self, String> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            30 => Self::BF16,
            other => {
                let supported: Vec<&str> = SUPPORTED.iter().map(|t| t.name()).collect();
                let what = match unsupported_name(other) {
                    Some(name) => format!("type {name} (id {other}) is not supported"),
                    None => format!("unknown tensor type id {other}"),
                };
                return Err(format!("{what}; supported: {}", supported.join(", ")));
            }
        })
    }

    /// The name llama.cpp gives the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q2_K => "Q2_K",
            Self::Q3_K => "Q3_K",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
        }
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q8_0 | Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q2_K => 84,
            Self::Q3_K => 110,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
        }
    }

    /// Bytes of `elems` elements (a whole number of blocks), or `None` when
    /// `elems` is not a multiple of the block.
    pub fn bytes_for(self, elems: usize) -> Option<usize> {
        elems
            .is_multiple_of(self.block_elems())
            .then(|| elems / self.block_elems())
            .and_then(|blocks| blocks.checked_mul(self.block_bytes()))
    }
}

/// Dequantizes `data` (whole blocks of `ty`) into `out`, whose length is
/// the number of elements.
///
/// # Panics
/// When `data` does not hold exactly `out.len()` elements of `ty`; the
/// reader checks sizes before it hands tensors out.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    assert_eq!(
        ty.bytes_for(out.len()),
        Some(data.len()),
        "{} bytes are not {} elements of {}",
        data.len(),
        out.len(),
        ty.name()
    );
    let blocks = data
        .chunks_exact(ty.block_bytes())
        .zip(out.chunks_exact_mut(ty.block_elems()));
    let f: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, o| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, o| o[0] = half_at(b, 0),
        GgmlType::BF16 => |b, o| o[0] = f32::from_bits(u32::from(u16_at(b, 0)) << 16),
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q2_K => q2_k,
        GgmlType::Q3_K => q3_k,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
    };
    for (block, out) in blocks {
        f(block, out);
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16_at(b, at)).to_f32()
}

fn q8_0(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = f32::from(q as i8) * d;
    }
}

/// The 4-bit quant `j` of a 32-element block: low nibbles first, then high.
fn nibble(qs: &[u8], j: usize) -> u8 {
    (qs[j % 16] >> (4 * (j / 16))) & 0x0F
}

fn q4_0(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, o) in out.iter_mut().enumerate() {
        *o = d * f32::from(nibble(&b[2..18], j) as i8 - 8);
    }
}

fn q4_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    for (j, o) in out.iter_mut().enumerate() {
        *o = d * f32::from(nibble(&b[4..20], j)) + m;
    }
}

/// The 5-bit quant `j`: a nibble and bit `j` of the little-endian `qh`.
fn five_bits(qh: &[u8], qs: &[u8], j: usize) -> u8 {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    nibble(qs, j) | ((((qh >> j) & 1) as u8) << 4)
}

fn q5_0(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, o) in out.iter_mut().enumerate() {
        *o = d * f32::from(five_bits(&b[2..6], &b[6..22], j) as i8 - 16);
    }
}

fn q5_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    for (j, o) in out.iter_mut().enumerate() {
        *o = d * f32::from(five_bits(&b[4..8], &b[8..24], j)) + m;
    }
}

/// `scales[16] qs[64] d dmin`: element `j` is bits `2 × ((j / 32) % 4)` of
/// `qs[32 × (j / 128) + j % 32]`, group `j / 16`.
fn q2_k(b: &[u8], out: &mut [f32]) {
    let (scales, qs) = (&b[..16], &b[16..80]);
    let (d, dmin) = (half_at(b, 80), half_at(b, 82));
    for (j, o) in out.iter_mut().enumerate() {
        let s = scales[j / 16];
        let dl = d * f32::from(s & 0x0F);
        let ml = dmin * f32::from(s >> 4);
        let q = (qs[32 * (j / 128) + j % 32] >> (2 * ((j / 32) % 4))) & 3;
        *o = dl * f32::from(q) - ml;
    }
}

/// `hmask[32] qs[64] scales[12] d`: 6-bit signed scales packed as low
/// nibbles in bytes 0..8 and high pairs in bytes 8..12; a quant's third bit
/// is bit `j / 32` of `hmask[j % 32]`, set meaning "no −4".
fn q3_k(b: &[u8], out: &mut [f32]) {
    let (hmask, qs, packed) = (&b[..32], &b[32..96], &b[96..108]);
    let d = half_at(b, 108);
    let scales = q3_k_scales(packed);
    for (j, o) in out.iter_mut().enumerate() {
        let dl = d * scales[j / 16];
        let low = (qs[32 * (j / 128) + j % 32] >> (2 * ((j / 32) % 4))) & 3;
        let high = ((hmask[j % 32] >> (j / 32)) & 1) ^ 1;
        *o = dl * f32::from(low as i8 - (high << 2) as i8);
    }
}

/// The sixteen signed 6-bit scales of a Q3_K block (its 12 packed bytes).
pub(crate) fn q3_k_scales(packed: &[u8]) -> [f32; 16] {
    let mut scales = [0f32; 16];
    for (s, scale) in scales.iter_mut().enumerate() {
        let low = (packed[s % 8] >> (4 * (s / 8))) & 0x0F;
        let high = (packed[8 + s % 4] >> (2 * (s / 4))) & 0x03;
        *scale = f32::from((low | (high << 4)) as i8 - 32);
    }
    scales
}

/// The eight 6-bit scales and minimums of a Q4_K/Q5_K block (12 bytes).
pub(crate) fn scale_min_k4(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for i in 0..4 {
        let (d, m, md) = (packed[i], packed[4 + i], packed[8 + i]);
        sc[i] = d & 0x3F;
        mn[i] = m & 0x3F;
        sc[4 + i] = (md & 0x0F) | ((d >> 2) & 0x30);
        mn[4 + i] = (md >> 4) | ((m >> 2) & 0x30);
    }
    (sc, mn)
}

/// `d dmin scales[12] qs[128]`: group `g = j / 32` reads nibble `g % 2` of
/// `qs[32 × (g / 2) + j % 32]`.
fn q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let (sc, mn) = scale_min_k4(&b[4..16]);
    let qs = &b[16..144];
    for (j, o) in out.iter_mut().enumerate() {
        let g = j / 32;
        let q = (qs[32 * (g / 2) + j % 32] >> (4 * (g % 2))) & 0x0F;
        *o = d * f32::from(sc[g]) * f32::from(q) - dmin * f32::from(mn[g]);
    }
}

/// As Q4_K with a fifth bit: bit `g` of `qh[j % 32]`.
fn q5_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let (sc, mn) = scale_min_k4(&b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for (j, o) in out.iter_mut().enumerate() {
        let g = j / 32;
        let low = (qs[32 * (g / 2) + j % 32] >> (4 * (g % 2))) & 0x0F;
        let high = (qh[j % 32] >> g) & 1;
        *o = d * f32::from(sc[g]) * f32::from(low | (high << 4)) - dmin * f32::from(mn[g]);
    }
}

/// `ql[128] qh[64] scales[16] d`: per half of 128, nibble `(j % 128) / 64`
/// of `ql[64 × half + j % 64]` and bits `2 × ((j % 128) / 32)` of
/// `qh[32 × half + j % 32]`, minus 32; group `j / 16`.
fn q6_k(b: &[u8], out: &mut [f32]) {
    let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
    let d = half_at(b, 208);
    for (j, o) in out.iter_mut().enumerate() {
        let (half, r) = (j / 128, j % 128);
        let low = (ql[64 * half + r % 64] >> (4 * (r / 64))) & 0x0F;
        let high = (qh[32 * half + r % 32] >> (2 * (r / 32))) & 0x03;
        let q = (low | (high << 4)) as i8 - 32;
        let dl = d * f32::from(scales[j / 16] as i8);
        *o = dl * f32::from(q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_unknown_types_are_named() {
        for (id, ty) in [
            (0, GgmlType::F32),
            (12, GgmlType::Q4_K),
            (30, GgmlType::BF16),
        ] {
            assert_eq!(GgmlType::from_id(id), Ok(ty));
        }
        let e = GgmlType::from_id(16).unwrap_err();
        assert!(e.contains("IQ2_XXS") && e.contains("Q6_K"), "{e}");
        assert!(
            GgmlType::from_id(99)
                .unwrap_err()
                .contains("unknown tensor type id 99")
        );
    }

    #[test]
    fn sizes_are_whole_blocks() {
        assert_eq!(GgmlType::Q4_K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q4_0.bytes_for(33), None);
        assert_eq!(GgmlType::F16.bytes_for(3), Some(6));
    }

    #[test]
    fn q8_0_scales_signed_bytes() {
        let mut block = vec![0u8; 34];
        block[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block[2] = 4;
        block[3] = (-6i8) as u8;
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q8_0, &block, &mut out);
        assert_eq!(&out[..3], &[2.0, -3.0, 0.0]);
    }
}
