//! Logit processing that does not depend on temperature: the
//! `allowed_token_ids` mask, `logit_bias` and the history penalties. Each
//! step edits the row in place.

use super::{SamplingParams, TokenHistory};

/// Sets every token not in `allowed` to `-inf`; O(vocab + allowed).
pub(crate) fn apply_allowed(logits: &mut [f32], allowed: &[u32]) {
    let kept: Vec<f32> = allowed.iter().map(|&t| logits[t as usize]).collect();
    logits.fill(f32::NEG_INFINITY);
    for (&t, &v) in allowed.iter().zip(&kept) {
        logits[t as usize] = v;
    }
}

/// Sets every token whose bit in `mask` is clear to `-inf` (bit `t % 32`
/// of word `t / 32`; tokens past the mask are cleared too); O(vocab).
pub(crate) fn apply_mask(logits: &mut [f32], mask: &[u32]) {
    for (chunk, i) in logits.chunks_mut(32).zip(0..) {
        let word = mask.get(i).copied().unwrap_or(0);
        if word == u32::MAX {
            continue;
        }
        for (bit, logit) in chunk.iter_mut().enumerate() {
            if word & (1 << bit) == 0 {
                *logit = f32::NEG_INFINITY;
            }
        }
    }
}

/// Adds each bias to its token's logit.
pub(crate) fn apply_logit_bias(logits: &mut [f32], bias: &[(u32, f32)]) {
    for &(t, b) in bias {
        logits[t as usize] += b;
    }
}

/// Applies the repetition penalty (tokens in prompt or output) and then the
/// frequency and presence penalties (generated tokens only); O(distinct).
pub(crate) fn apply_penalties(logits: &mut [f32], params: &SamplingParams, history: &TokenHistory) {
    if !params.has_penalties() {
        return;
    }
    let rep = params.repetition_penalty;
    for (token, counts) in history.iter() {
        let logit = &mut logits[token as usize];
        if rep != 1.0 {
            // A penalty below 1 can push a huge logit to +inf; keep it finite.
            *logit = if *logit > 0.0 {
                (*logit / rep).min(f32::MAX)
            } else {
                *logit * rep
            };
        }
        if counts.generated > 0 {
            *logit -= params.frequency_penalty * counts.generated as f32;
            *logit -= params.presence_penalty;
        }
    }
}
