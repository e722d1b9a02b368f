//! The portable kernels: each 256-element piece of a weight row is
//! dequantized with the GGUF reference arithmetic into a buffer on the
//! stack and multiplied with every activation row before the next piece is
//! read. They run on any processor and are the reference the SIMD kernels
//! are tested against.

use super::super::quant::{QK, half_at};
use crate::gguf::GgmlType;

/// Elements dequantized at a time: one K-quant block, eight small blocks.
const PIECE: usize = 256;

/// `out[r] = Σ w · xs[r]` over one weight row `w` (whole blocks of `ty`)
/// and up to four activation rows as long as the row.
pub fn dot_rows(ty: GgmlType, w: &[u8], xs: &[&[f32]], out: &mut [f32]) {
    let piece_bytes = PIECE / ty.block_elems() * ty.block_bytes();
    let mut buf = [0f32; PIECE];
    let mut acc = [[0f32; 8]; 4];
    for (p, blocks) in w.chunks(piece_bytes).enumerate() {
        let n = blocks.len() / ty.block_bytes() * ty.block_elems();
        let buf = &mut buf[..n];
        dequantize(ty, blocks, buf);
        for (acc, x) in acc.iter_mut().zip(xs) {
            let x = &x[p * PIECE..][..n];
            for (w8, x8) in buf.chunks_exact(8).zip(x.chunks_exact(8)) {
                for l in 0..8 {
                    acc[l] += w8[l] * x8[l];
                }
            }
        }
    }
    for (o, acc) in out.iter_mut().zip(&acc) {
        *o = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    }
}

/// Whole blocks of `ty` dequantized into `out`, with the GGUF reference
/// arithmetic: the same expressions as [`crate::gguf::dequant`], written
/// per type over whole blocks for Q4_0, Q4_1 and Q8_0 so that the compiler
/// vectorizes them (the reference goes through a function pointer per
/// block and indexes nibbles one at a time, several times slower).
pub fn dequantize(ty: GgmlType, blocks: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::Q4_0 => {
            for (b, o) in blocks.chunks_exact(18).zip(out.chunks_exact_mut(QK)) {
                let d = half_at(b, 0);
                let (lo, hi) = o.split_at_mut(QK / 2);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[2..18]) {
                    *l = d * f32::from((q & 15) as i8 - 8);
                    *h = d * f32::from((q >> 4) as i8 - 8);
                }
            }
        }
        GgmlType::Q4_1 => {
            for (b, o) in blocks.chunks_exact(20).zip(out.chunks_exact_mut(QK)) {
                let (d, m) = (half_at(b, 0), half_at(b, 2));
                let (lo, hi) = o.split_at_mut(QK / 2);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[4..20]) {
                    *l = d * f32::from(q & 15) + m;
                    *h = d * f32::from(q >> 4) + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (b, o) in blocks.chunks_exact(34).zip(out.chunks_exact_mut(QK)) {
                let d = half_at(b, 0);
                for (o, &q) in o.iter_mut().zip(&b[2..34]) {
                    *o = f32::from(q as i8) * d;
                }
            }
        }
        ty => crate::gguf::dequant::dequantize(ty, blocks, out),
    }
}
