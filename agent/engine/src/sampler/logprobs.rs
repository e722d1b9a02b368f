//! Log-probability helpers: the `n` most likely tokens, and the raw
//! (unprocessed) log probabilities captured before processing.

use std::cmp::Ordering;

use super::math::log_sum_exp;
use super::{SampleOutput, SamplingParams, TokenHistory};

/// Orders `(token, value)` pairs most likely first, ties by lower token id.
pub(crate) fn more_likely(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The `n` largest values of `items` with their token ids, most likely
/// first (ties: lower id first), skipping `-inf`. One pass with a buffer of
/// `n`: O(len) when `n` is small, with no allocation proportional to `len`.
pub(crate) fn top_n(items: impl Iterator<Item = (u32, f32)>, n: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return best;
    }
    for item in items {
        if item.1 == f32::NEG_INFINITY {
            continue;
        }
        if best.len() == n {
            // Most items are rejected by the cheap comparison.
            let last = best[n - 1];
            if item.1 < last.1 || more_likely(&item, &last) != Ordering::Less {
                continue;
            }
        }
        let at = best.partition_point(|b| more_likely(b, &item) == Ordering::Less);
        best.insert(at, item);
        best.truncate(n);
    }
    best
}

/// Raw log probabilities of a row, captured before processing edits it.
pub(crate) struct RawLogprobs {
    log_norm: f32,
    top: Vec<(u32, f32)>,
    /// Raw logits of the tokens that processing may change (biased tokens
    /// and, when penalties are on, the history's tokens). Every other token
    /// that can still be sampled keeps its raw logit in the processed row.
    saved: Vec<(u32, f32)>,
}

impl RawLogprobs {
    /// Captures the normaliser, the top `n` and the logits processing will
    /// change; O(vocab + bias + distinct history tokens).
    pub(crate) fn capture(
        logits: &[f32],
        params: &SamplingParams,
        history: &TokenHistory,
        n: usize,
    ) -> Self {
        let log_norm = log_sum_exp(logits);
        let top = top_n(
            logits
                .iter()
                .copied()
                .enumerate()
                .map(|(i, v)| (i as u32, v)),
            n,
        )
        .into_iter()
        .map(|(t, v)| (t, v - log_norm))
        .collect();
        let mut saved: Vec<(u32, f32)> = params
            .logit_bias
            .iter()
            .map(|&(t, _)| (t, logits[t as usize]))
            .collect();
        if params.has_penalties() {
            saved.extend(history.iter().map(|(t, _)| (t, logits[t as usize])));
        }
        Self {
            log_norm,
            top,
            saved,
        }
    }

    /// The output for `token` (chosen from the `processed` row) with raw
    /// log probabilities.
    pub(crate) fn output(self, processed: &[f32], token: u32) -> SampleOutput {
        let raw = self
            .saved
            .iter()
            .find(|&&(t, _)| t == token)
            .map_or(processed[token as usize], |&(_, v)| v);
        SampleOutput {
            token,
            logprob: Some(raw - self.log_norm),
            top_logprobs: self.top,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_n_sorts_breaks_ties_by_id_and_skips_neg_inf() {
        let v = [1.0, 3.0, f32::NEG_INFINITY, 3.0, 2.0, 0.5];
        let items = || v.iter().copied().enumerate().map(|(i, x)| (i as u32, x));
        assert_eq!(top_n(items(), 3), vec![(1, 3.0), (3, 3.0), (4, 2.0)]);
        assert_eq!(top_n(items(), 0), vec![]);
        assert_eq!(top_n(items(), 10).len(), 5);
        // Reverse order of arrival gives the same answer.
        assert_eq!(top_n(items().rev(), 3), vec![(1, 3.0), (3, 3.0), (4, 2.0)]);
        // A tie arriving later with a lower id displaces the full buffer's last.
        assert_eq!(top_n([(5, 1.0), (2, 1.0)].into_iter(), 1), vec![(2, 1.0)]);
        assert_eq!(top_n([(2, 1.0), (5, 1.0)].into_iter(), 1), vec![(2, 1.0)]);
    }
}
