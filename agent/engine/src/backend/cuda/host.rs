//! Host-side data the CUDA backend uploads, with no device and no `unsafe`:
//! weights converted to bf16 bit patterns, and the sampling parameters of a
//! batch packed as the sampling kernel reads them.

use crate::sampler::{LogprobsMode, SamplingParams, TokenHistory};
use crate::weights::{TensorView, WeightDtype};

/// f32 → bf16 bits, rounding to nearest even; NaN stays a quiet NaN. The
/// same rule as the kernels' `f32_to_bf16` and `half::bf16::from_f32`.
pub fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return ((bits >> 16) | 0x0040) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// bf16 bits → f32 (exact).
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// A stored weight as bf16 bit patterns: bf16 is copied as is, f16 and f32
/// are rounded.
pub fn weight_to_bf16(view: &TensorView<'_>) -> Vec<u16> {
    match view.dtype {
        WeightDtype::BF16 => view
            .data
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect(),
        WeightDtype::F16 | WeightDtype::F32 | WeightDtype::Ggml(..) => {
            view.to_f32().into_iter().map(bf16_bits).collect()
        }
    }
}

/// One row's parameters for the sampling kernel (`struct SampleRow` in
/// `kernels/sampling.cu`: twelve 4-byte fields, 48 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SampleRow {
    /// Temperature (> 0 unless greedy).
    pub temperature: f32,
    /// Nucleus mass; 1 is off.
    pub top_p: f32,
    /// Minimum probability relative to the most likely token; 0 is off.
    pub min_p: f32,
    /// Most candidates; 0 is off.
    pub top_k: i32,
    /// Repetition penalty; 1 is off.
    pub repetition_penalty: f32,
    /// Frequency penalty.
    pub frequency_penalty: f32,
    /// Presence penalty.
    pub presence_penalty: f32,
    /// First history entry of the row.
    pub pen_start: u32,
    /// History entries of the row (0 without penalties).
    pub pen_len: u32,
    /// The row's uniform draw in `[0, 1)`.
    pub uniform: f32,
    /// Non-zero: argmax.
    pub greedy: i32,
    /// Non-zero: report the chosen token's raw log probability.
    pub want_logprob: i32,
}

impl SampleRow {
    /// The row's bytes, as the kernel reads them (little-endian fields).
    pub fn to_bytes(&self) -> [u8; 48] {
        let words = [
            self.temperature.to_bits(),
            self.top_p.to_bits(),
            self.min_p.to_bits(),
            self.top_k as u32,
            self.repetition_penalty.to_bits(),
            self.frequency_penalty.to_bits(),
            self.presence_penalty.to_bits(),
            self.pen_start,
            self.pen_len,
            self.uniform.to_bits(),
            self.greedy as u32,
            self.want_logprob as u32,
        ];
        let mut out = [0u8; 48];
        for (dst, w) in out.chunks_exact_mut(4).zip(words) {
            dst.copy_from_slice(&w.to_le_bytes());
        }
        out
    }
}

/// Whether the device sampler handles a request with these parameters:
/// everything but `logit_bias`, `allowed_token_ids`, top-n log
/// probabilities and the processed log-probability mode, which go to the
/// CPU sampler (their rows' logits are copied to the host).
pub fn device_can_sample(params: &SamplingParams) -> bool {
    params.logit_bias.is_empty()
        && params.allowed_token_ids.is_none()
        && params.logprobs.is_none_or(|n| n == 0)
        && (params.logprobs.is_none() || params.logprobs_mode == LogprobsMode::Raw)
}

/// The rows and history arrays of one sampling launch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplePack {
    /// Packed parameter rows.
    pub rows: Vec<u8>,
    /// History tokens of every row, back to back.
    pub pen_tokens: Vec<u32>,
    /// How often each history token was generated.
    pub pen_generated: Vec<u32>,
}

impl SamplePack {
    /// Appends a row; `uniform` is the row's draw (ignored when greedy).
    pub fn push(&mut self, params: &SamplingParams, history: &TokenHistory, uniform: f64) {
        let start = self.pen_tokens.len() as u32;
        if params.has_penalties() {
            for (token, counts) in history.iter() {
                self.pen_tokens.push(token);
                self.pen_generated.push(counts.generated);
            }
        }
        let row = SampleRow {
            temperature: params.temperature,
            top_p: params.top_p,
            min_p: params.min_p,
            top_k: params
                .top_k_limit()
                .map_or(0, |k| k.min(i32::MAX as usize) as i32),
            repetition_penalty: params.repetition_penalty,
            frequency_penalty: params.frequency_penalty,
            presence_penalty: params.presence_penalty,
            pen_start: start,
            pen_len: self.pen_tokens.len() as u32 - start,
            // The kernel works in f32; a draw that rounds up to 1 would fall
            // past the last candidate, so it is kept just below.
            uniform: (uniform as f32).min(1.0 - f32::EPSILON / 2.0),
            greedy: i32::from(params.is_greedy()),
            want_logprob: i32::from(params.logprobs.is_some()),
        };
        self.rows.extend_from_slice(&row.to_bytes());
    }

    /// Rows packed.
    pub fn len(&self) -> usize {
        self.rows.len() / 48
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Empties the pack, keeping its allocations.
    pub fn clear(&mut self) {
        self.rows.clear();
        self.pen_tokens.clear();
        self.pen_generated.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_half() {
        let mut values = vec![
            0.0f32,
            -0.0,
            1.0,
            -1.5,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            3.140625,
            // Ties: exactly halfway between two bf16 values.
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
        ];
        let mut x: u32 = 0x1234_5678;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            values.push(f32::from_bits(x));
        }
        for v in values {
            let ours = bf16_bits(v);
            let theirs = half::bf16::from_f32(v);
            if v.is_nan() {
                assert!(bf16_to_f32(ours).is_nan(), "{v}");
                assert_ne!(ours & 0x0040, 0, "quiet");
            } else {
                assert_eq!(ours, theirs.to_bits(), "{v} ({:#x})", v.to_bits());
                let back = bf16_to_f32(ours);
                assert_eq!(back, theirs.to_f32());
            }
        }
        assert_eq!(
            bf16_bits(f32::from_bits(0x3f80_8000)),
            0x3f80,
            "tie to even"
        );
        assert_eq!(
            bf16_bits(f32::from_bits(0x3f81_8000)),
            0x3f82,
            "tie to even"
        );
    }

    #[test]
    fn weights_convert_from_every_stored_type() {
        let vals = [1.0f32, -2.5, 0.333];
        let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf16_bytes: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let f16_bytes: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let expect: Vec<u16> = vals.iter().map(|&v| bf16_bits(v)).collect();
        for (dtype, data) in [
            (WeightDtype::F32, &f32_bytes),
            (WeightDtype::BF16, &bf16_bytes),
        ] {
            let view = TensorView {
                dtype,
                shape: vec![3],
                data: data.as_slice().into(),
            };
            assert_eq!(weight_to_bf16(&view), expect, "{dtype:?}");
        }
        let view = TensorView {
            dtype: WeightDtype::F16,
            shape: vec![3],
            data: f16_bytes.as_slice().into(),
        };
        let got = weight_to_bf16(&view);
        for (g, v) in got.iter().zip(vals) {
            assert!((bf16_to_f32(*g) - v).abs() < 1e-2);
        }
    }

    #[test]
    fn sample_rows_pack_as_the_kernel_reads_them() {
        assert_eq!(std::mem::size_of::<SampleRow>(), 48);
        let mut params = SamplingParams::greedy();
        let history = TokenHistory::new(&[5, 6, 5]);
        let mut pack = SamplePack::default();
        pack.push(&params, &history, 0.25);
        params.temperature = 0.7;
        params.top_k = Some(40);
        params.repetition_penalty = 1.2;
        let mut h2 = TokenHistory::new(&[5, 6]);
        h2.push(6);
        pack.push(&params, &h2, 0.5);
        assert_eq!(pack.len(), 2);
        assert_eq!(
            pack.pen_tokens.len(),
            2,
            "only the penalised row uploads history"
        );
        let mut entries: Vec<_> = pack.pen_tokens.iter().zip(&pack.pen_generated).collect();
        entries.sort();
        assert_eq!(entries, vec![(&5, &0), (&6, &1)]);
        let word_of = |pack: &SamplePack, row: usize, i: usize| {
            u32::from_le_bytes(pack.rows[row * 48 + i * 4..][..4].try_into().unwrap())
        };
        let word = |row, i| word_of(&pack, row, i);
        assert_eq!(word(0, 10), 1, "greedy");
        assert_eq!(word(1, 10), 0);
        assert_eq!(f32::from_bits(word(1, 0)), 0.7);
        assert_eq!(word(1, 3), 40);
        assert_eq!(word(1, 7), 0, "pen_start");
        assert_eq!(word(1, 8), 2, "pen_len");
        assert_eq!(f32::from_bits(word(1, 9)), 0.5);
        let mut pack = SamplePack::default();
        pack.push(&params, &h2, 1.0 - 1e-12);
        assert!(
            f32::from_bits(word_of(&pack, 0, 9)) < 1.0,
            "a draw never rounds to 1"
        );
        pack.clear();
        assert!(pack.is_empty());
    }

    #[test]
    fn device_sampler_takes_plain_requests_only() {
        let mut p = SamplingParams::greedy();
        assert!(device_can_sample(&p));
        p.logprobs = Some(0);
        assert!(device_can_sample(&p));
        p.logprobs = Some(3);
        assert!(!device_can_sample(&p));
        let mut p = SamplingParams::greedy();
        p.logit_bias = vec![(1, 2.0)];
        assert!(!device_can_sample(&p));
        let mut p = SamplingParams::greedy();
        p.allowed_token_ids = Some(vec![1]);
        assert!(!device_can_sample(&p));
    }
}
