//! Choosing the token from a processed row: the greedy argmax, and for
//! random sampling temperature, `min_p`, `top_k`, `top_p` and the draw.
//!
//! Random sampling works on scaled logits `s = (l - max) / temperature`, so
//! the most likely token has `s = 0` and weight `exp(s) = 1`, weights never
//! overflow, and `min_p` is the threshold `exp(s) >= min_p`. Weights are
//! summed in f64.

use super::logprobs::{more_likely, top_n};
use super::math::{self, exp_nonpos, sum_weights};
use super::{SampleOutput, SamplerError, SamplingParams, SequenceRng};

/// Number of candidates sorted in the first round of `top_p`; each later
/// round sorts four times more. Nuclei are usually small, so this avoids
/// sorting the whole vocabulary.
const TOP_P_FIRST_CHUNK: usize = 64;

/// Tokens per block of the full-row draw: block sums find the block where
/// the cumulative weight crosses the target, then only that block is walked
/// token by token.
const DRAW_BLOCK: usize = 1024;

/// The most likely token, ties to the lowest id; `None` if all are `-inf`.
pub(crate) fn argmax(logits: &[f32]) -> Option<u32> {
    let max = math::max(logits);
    if max == f32::NEG_INFINITY {
        return None;
    }
    logits.iter().position(|&v| v == max).map(|i| i as u32)
}

/// Draws a token from the row after temperature, `min_p`, `top_k` and
/// `top_p`, taking exactly one draw from `rng` (none on error). With
/// `processed` = `Some(n)` the output carries the token's log probability
/// and the top `n` in the distribution drawn from; otherwise none.
pub(crate) fn sample_random(
    logits: &[f32],
    params: &SamplingParams,
    rng: &mut SequenceRng,
    processed: Option<usize>,
) -> Result<SampleOutput, SamplerError> {
    let max = math::max(logits);
    if max == f32::NEG_INFINITY {
        return Err(SamplerError::NoCandidates);
    }
    let row = Scale {
        max,
        temperature: params.temperature,
        inv_t: 1.0 / params.temperature,
        min_p: params.min_p,
    };
    let u = rng.next_unit();
    let top_p = (params.top_p < 1.0).then_some(f64::from(params.top_p));
    let (mut cands, total) = match (params.top_k_limit(), top_p) {
        (None, None) => return Ok(row.draw_row(logits, u, processed)),
        (Some(k), _) => {
            let mut cands = row.candidates(logits, kth_largest_lower_bound(logits, k));
            keep_top_k(&mut cands, k);
            let total = cands.iter().map(|c| f64::from(exp_nonpos(c.1))).sum();
            (cands, total)
        }
        (None, Some(p)) => row.nucleus_candidates(logits, p),
    };
    if let Some(p) = top_p {
        keep_top_p(&mut cands, p, total);
    }
    Ok(draw_candidates(&cands, u, processed))
}

/// A value at most the `k`-th largest logit: the `k`-th largest of a
/// strided sample of about `64 k` logits, at most half the row (a subset's
/// `k`-th largest never exceeds the whole row's). Tokens below it cannot be
/// in the top `k`, so `top_k` only selects among the few above. `-inf`
/// when `k` is too large for a sample to help.
fn kth_largest_lower_bound(logits: &[f32], k: usize) -> f32 {
    let stride = (logits.len() / k.saturating_mul(64).max(1)).max(2);
    let mut sample: Vec<f32> = logits.iter().step_by(stride).copied().collect();
    if sample.len() < k.saturating_mul(4) {
        return f32::NEG_INFINITY;
    }
    let (_, kth, _) = sample.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    *kth
}

/// Temperature and `min_p` applied to one row.
#[derive(Clone, Copy)]
struct Scale {
    max: f32,
    temperature: f32,
    inv_t: f32,
    min_p: f32,
}

impl Scale {
    /// The scaled logit, `<= 0`.
    #[inline(always)]
    fn scaled(self, l: f32) -> f32 {
        (l - self.max) * self.inv_t
    }

    /// The unnormalised probability (1 for the maximum), 0 below `min_p`.
    #[inline(always)]
    fn weight(self, l: f32) -> f32 {
        let w = exp_nonpos(self.scaled(l));
        if w >= self.min_p { w } else { 0.0 }
    }

    /// `(token, scaled logit)` of every token of logit at least `l_min` and
    /// of non-zero weight. The cheap comparison runs first.
    fn candidates(self, logits: &[f32], l_min: f32) -> Vec<(u32, f32)> {
        let ids = logits.iter().enumerate();
        ids.filter(|&(_, &l)| l >= l_min && self.weight(l) > 0.0)
            .map(|(i, &l)| (i as u32, self.scaled(l)))
            .collect()
    }

    /// Total weight of the row, summed block by block as [`Self::draw_row`]
    /// walks it.
    fn total(self, logits: &[f32]) -> f64 {
        let weigh = |l| self.weight(l);
        logits
            .chunks(DRAW_BLOCK)
            .map(|b| sum_weights(b, weigh))
            .sum()
    }

    /// Candidates that may be in the `top_p` nucleus, with the row's total
    /// weight. A token of the nucleus has the rest of the row, at most
    /// `vocab` tokens no heavier than it, holding more than `(1 - p)` of the
    /// mass, so its weight exceeds `(1 - p) total / vocab`: lighter tokens
    /// (with a factor 2 of margin for rounding) are left out before any
    /// sorting.
    fn nucleus_candidates(self, logits: &[f32], p: f64) -> (Vec<(u32, f32)>, f64) {
        let total = self.total(logits);
        let w_min = 0.5 * (1.0 - p) * total / logits.len() as f64;
        let l_min = self.max + self.temperature * (w_min.ln() as f32);
        (self.candidates(logits, l_min), total)
    }

    /// Inverse-CDF draw over the whole row, in token order, without
    /// building a candidate list: O(vocab), about 1.5 passes of `exp`.
    fn draw_row(self, logits: &[f32], u: f64, processed: Option<usize>) -> SampleOutput {
        let total = self.total(logits);
        let target = u * total;
        let mut cum = 0.0;
        let mut chosen = None;
        'blocks: for (b, block) in logits.chunks(DRAW_BLOCK).enumerate() {
            let block_sum = sum_weights(block, |l| self.weight(l));
            if cum + block_sum <= target {
                cum += block_sum;
                continue;
            }
            for (j, &l) in block.iter().enumerate() {
                let w = self.weight(l);
                cum += f64::from(w);
                if cum > target && w > 0.0 {
                    chosen = Some(b * DRAW_BLOCK + j);
                    break 'blocks;
                }
            }
        }
        // Rounding can leave `cum` just short of `target` when `u` is close to
        // 1: take the last token of non-zero weight (the maximum has weight 1).
        let token = chosen.or_else(|| logits.iter().rposition(|&l| self.weight(l) > 0.0));
        let token = token.unwrap_or_default();
        // The tokens of non-zero weight are the top of the row, so the top
        // `n` of the row that have a weight are the top `n` candidates.
        let n = processed.unwrap_or(0);
        let row = logits.iter().enumerate().map(|(i, &l)| (i as u32, l));
        let scaled = top_n(row, n)
            .into_iter()
            .filter(|&(_, l)| self.weight(l) > 0.0)
            .map(|(i, l)| (i, self.scaled(l)));
        processed_output(
            token as u32,
            self.scaled(logits[token]),
            total,
            processed,
            scaled,
        )
    }
}

/// Keeps the `k` most likely candidates (ties: lower id), sorted; O(len +
/// k log k) with `select_nth_unstable_by`.
pub(crate) fn keep_top_k(cands: &mut Vec<(u32, f32)>, k: usize) {
    if k >= cands.len() {
        return;
    }
    cands.select_nth_unstable_by(k - 1, more_likely);
    cands.truncate(k);
    cands.sort_unstable_by(more_likely);
}

/// Keeps the smallest most-likely-first prefix whose mass is at least `p`
/// of `total` (the weight of the candidates and of any lighter tokens
/// already left out), at least one candidate, sorted. Sorts only
/// as much as it needs: rounds of `select_nth_unstable_by` and a sort of
/// growing chunks.
pub(crate) fn keep_top_p(cands: &mut Vec<(u32, f32)>, p: f64, total: f64) {
    let target = p * total;
    let len = cands.len();
    let mut cum = 0.0;
    let (mut start, mut chunk) = (0, TOP_P_FIRST_CHUNK);
    while start < len {
        let end = (start + chunk).min(len);
        if end < len {
            cands[start..].select_nth_unstable_by(end - start - 1, more_likely);
        }
        cands[start..end].sort_unstable_by(more_likely);
        for i in start..end {
            cum += f64::from(exp_nonpos(cands[i].1));
            if cum >= target {
                cands.truncate(i + 1);
                return;
            }
        }
        start = end;
        chunk = chunk.saturating_mul(4);
    }
}

/// Inverse-CDF draw over candidates in their (sorted) order: the first
/// whose cumulative weight exceeds `u * total`.
fn draw_candidates(cands: &[(u32, f32)], u: f64, processed: Option<usize>) -> SampleOutput {
    let total: f64 = cands.iter().map(|c| f64::from(exp_nonpos(c.1))).sum();
    let target = u * total;
    let mut cum = 0.0;
    // Candidates all have non-zero weight; the last one is the fallback
    // when rounding leaves `cum` just short of `target`.
    let mut chosen = cands.last().copied().unwrap_or_default();
    for &c in cands {
        cum += f64::from(exp_nonpos(c.1));
        if cum > target {
            chosen = c;
            break;
        }
    }
    processed_output(chosen.0, chosen.1, total, processed, cands.iter().copied())
}

/// The output for `token` of scaled logit `scaled`; with `processed` set,
/// its log probability and the top `n` among `items`, normalised by
/// `total` weight.
fn processed_output(
    token: u32,
    scaled: f32,
    total: f64,
    processed: Option<usize>,
    items: impl Iterator<Item = (u32, f32)>,
) -> SampleOutput {
    let Some(n) = processed else {
        return SampleOutput::bare(token);
    };
    let ln_total = total.ln();
    let logprob = |s: f32| (f64::from(s) - ln_total) as f32;
    SampleOutput {
        token,
        logprob: Some(logprob(scaled)),
        top_logprobs: top_n(items, n)
            .into_iter()
            .map(|(t, s)| (t, logprob(s)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(probs: &[f64]) -> Vec<(u32, f32)> {
        let max = probs.iter().copied().fold(0.0, f64::max);
        let scaled = probs.iter().map(|p| (p / max).ln() as f32);
        scaled.enumerate().map(|(i, s)| (i as u32, s)).collect()
    }

    fn total(c: &[(u32, f32)]) -> f64 {
        c.iter().map(|x| f64::from(exp_nonpos(x.1))).sum()
    }

    #[test]
    fn argmax_prefers_lowest_id_on_ties() {
        assert_eq!(argmax(&[1.0, 5.0, 5.0, 2.0]), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY, -3.0]), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY; 4]), None);
    }

    #[test]
    fn top_k_keeps_the_k_best_sorted_ties_to_lower_ids() {
        let mut c = vec![(0, -1.0), (1, 0.0), (2, -1.0), (3, -0.5), (4, -1.0)];
        keep_top_k(&mut c, 3);
        assert_eq!(c, vec![(1, 0.0), (3, -0.5), (0, -1.0)]);
    }

    #[test]
    fn top_p_spanning_several_chunks_keeps_the_smallest_nucleus() {
        // 1000 tokens: 300 "large" ones of weight 3 and 700 of weight 1.
        // Mass of the large ones: 900 / 1600 = 0.5625.
        let probs: Vec<f64> = (0..1000)
            .map(|i| if i % 10 < 3 { 3.0 } else { 1.0 })
            .collect();
        let mut c = cands(&probs);
        let t = total(&c);
        keep_top_p(&mut c, 0.5625 - 1e-6, t);
        assert_eq!(c.len(), 300);
        assert!(c.iter().all(|&(t, _)| t % 10 < 3));
        assert!(c.windows(2).all(|w| w[0].0 < w[1].0), "sorted, ties by id");
        let mut c = cands(&probs);
        let t = total(&c);
        keep_top_p(&mut c, 0.5625 + 1e-4, t);
        assert_eq!(c.len(), 301, "one more than the large ones");
        assert_eq!(c[300].0, 3, "the lowest-id small token");
    }

    #[test]
    fn top_p_keeps_at_least_one_and_everything_at_one() {
        let mut c = cands(&[0.9, 0.05, 0.05]);
        let t = total(&c);
        keep_top_p(&mut c, 1e-9, t);
        assert_eq!(c.len(), 1);
        let mut c = cands(&[0.25; 4]);
        let t = total(&c);
        keep_top_p(&mut c, 1.0, t);
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn draw_walks_the_cdf() {
        let c = cands(&[0.5, 0.25, 0.25]);
        let token = |u| draw_candidates(&c, u, None).token;
        assert_eq!(token(0.0), 0);
        assert_eq!(token(0.49), 0);
        assert_eq!(token(0.51), 1);
        assert_eq!(token(0.76), 2);
        assert_eq!(token(1.0 - 1e-16), 2);
        let d = draw_candidates(&c, 0.6, Some(2));
        assert!((d.logprob.unwrap() - 0.25f32.ln()).abs() < 1e-6);
        assert_eq!(d.top_logprobs[0].0, 0);
        assert!((d.top_logprobs[0].1 - 0.5f32.ln()).abs() < 1e-6);
    }
}
