//! The sampler: turns one row of f32 logits into the next token of a
//! sequence, per its [`SamplingParams`], its [`TokenHistory`] (for the
//! penalties) and its own [`SequenceRng`].
//!
//! It owns the request-level sampling knobs (temperature, `top_k`, `top_p`,
//! `min_p`, repetition/frequency/presence penalties, `logit_bias`,
//! `allowed_token_ids`, seeds and log probabilities). Stop strings, stop
//! token ids and `min_tokens` belong to the scheduler.
//!
//! Per step, in vLLM's order:
//! 1. validate the parameters and the row (NaN or `+inf` logits are errors;
//!    `-inf` means "never sample this token");
//! 2. `allowed_token_ids` mask, `logit_bias`, repetition penalty, frequency
//!    and presence penalties, in place ([`Sampler::process_logits`]);
//! 3. greedy (temperature below [`GREEDY_TEMPERATURE_EPS`]): argmax, ties to
//!    the lowest token id, no RNG draw;
//! 4. otherwise temperature, `min_p` (relative to the most likely token),
//!    `top_k`, `top_p` (each renormalising what is left) and one draw from
//!    the request's RNG.
//!
//! Cost per step: O(vocab + distinct history tokens + bias) and no sort of
//! the vocabulary. `top_k` selects (`select_nth_unstable`) among the tokens
//! above a bound taken from a sample of the row, then sorts the `k` kept;
//! `top_p` drops tokens provably outside the nucleus, then sorts only as
//! much of the rest as the nucleus needs. Log probabilities, when asked
//! for, cost one more pass.
//!
//! Log probabilities follow [`LogprobsMode`]: raw model log-softmax by
//! default (vLLM's default), or the processed distribution the token was
//! drawn from.
//!
//! Determinism: a request's tokens depend only on its logits, parameters,
//! history and [`SequenceRng`] (seeded from `seed`), never on the batch.
//! The token choice uses only IEEE-754 arithmetic in a fixed order (`exp`
//! is our own polynomial, not the platform's libm), so a seed gives the
//! same tokens on every platform for the same logits.

mod error;
mod history;
mod logprobs;
mod math;
mod params;
mod process;
mod rng;
mod select;

pub use error::SamplerError;
pub use history::{TokenCounts, TokenHistory};
pub use params::{
    GREEDY_TEMPERATURE_EPS, LogprobsMode, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_OPENAI_PENALTY,
    SamplingParams,
};
pub use rng::SequenceRng;

use logprobs::RawLogprobs;
// Also what prompt scoring (`crate::engine`) ranks and normalizes with.
pub(crate) use logprobs::top_n;
pub(crate) use math::log_sum_exp;

/// The outcome of one sampling step.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleOutput {
    /// The chosen token.
    pub token: u32,
    /// The chosen token's log probability, in the distribution
    /// [`SamplingParams::logprobs_mode`] names; `None` unless the request set
    /// [`SamplingParams::logprobs`] (`Some(0)` included), since computing it
    /// costs a pass of `exp` over the vocabulary.
    pub logprob: Option<f32>,
    /// The `logprobs` most likely tokens of that same distribution, most
    /// likely first (ties: lower id first). Tokens of probability zero are
    /// left out, so the list can be shorter. Empty unless asked for.
    pub top_logprobs: Vec<(u32, f32)>,
}

impl SampleOutput {
    /// A token without log probabilities.
    pub(crate) fn bare(token: u32) -> Self {
        Self {
            token,
            logprob: None,
            top_logprobs: Vec::new(),
        }
    }
}

/// One row of a batch for [`Sampler::sample_batch`].
#[derive(Debug)]
pub struct BatchRow<'a> {
    /// The request's parameters.
    pub params: &'a SamplingParams,
    /// The request's tokens so far.
    pub history: &'a TokenHistory,
    /// The request's own generator.
    pub rng: &'a mut SequenceRng,
    /// Tokens a grammar allows this step (bit `t % 32` of word `t / 32`);
    /// `None` allows every token.
    pub mask: Option<&'a [u32]>,
}

/// Samples tokens from logits over a vocabulary of a fixed size. Holds no
/// per-request state: that lives in the [`TokenHistory`] and
/// [`SequenceRng`] passed to each call.
#[derive(Debug, Clone)]
pub struct Sampler {
    vocab_size: usize,
}

impl Sampler {
    /// A sampler for rows of `vocab_size` logits (1 to 2^32).
    pub fn new(vocab_size: usize) -> Result<Self, SamplerError> {
        let fits = vocab_size
            .checked_sub(1)
            .is_some_and(|max_id| u32::try_from(max_id).is_ok());
        if !fits {
            return Err(SamplerError::InvalidVocabSize(vocab_size));
        }
        Ok(Self { vocab_size })
    }

    /// The number of logits per row.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Validates, then applies the `allowed_token_ids` mask, `logit_bias`
    /// and the penalties to `logits` in place: what [`sample`](Self::sample)
    /// does before choosing. On error `logits` is unchanged.
    pub fn process_logits(
        &self,
        logits: &mut [f32],
        params: &SamplingParams,
        history: &TokenHistory,
    ) -> Result<(), SamplerError> {
        self.check(logits, params, history)?;
        apply(logits, params, history);
        Ok(())
    }

    /// Chooses the next token from one row of `logits` (length
    /// [`vocab_size`](Self::vocab_size)).
    ///
    /// `logits` is scratch: on success it holds the processed logits (as
    /// after [`process_logits`](Self::process_logits), before temperature).
    /// It is unchanged after a validation error, unspecified after
    /// [`SamplerError::NoCandidates`]. Non-greedy steps take exactly one draw from
    /// `rng`; greedy steps and failed steps take none. The caller records
    /// the returned token in `history`.
    pub fn sample(
        &self,
        logits: &mut [f32],
        params: &SamplingParams,
        history: &TokenHistory,
        rng: &mut SequenceRng,
    ) -> Result<SampleOutput, SamplerError> {
        self.sample_with(logits, None, params, history, rng)
    }

    fn sample_with(
        &self,
        logits: &mut [f32],
        mask: Option<&[u32]>,
        params: &SamplingParams,
        history: &TokenHistory,
        rng: &mut SequenceRng,
    ) -> Result<SampleOutput, SamplerError> {
        self.check(logits, params, history)?;
        let wanted = params.logprobs.is_some().then(|| params.top_logprobs());
        let raw_mode = params.logprobs_mode == LogprobsMode::Raw;
        let raw = wanted
            .filter(|_| raw_mode)
            .map(|n| RawLogprobs::capture(logits, params, history, n));
        let processed = wanted.filter(|_| !raw_mode);
        if let Some(mask) = mask {
            process::apply_mask(logits, mask);
        }
        apply(logits, params, history);
        let out = if params.is_greedy() {
            let token = select::argmax(logits).ok_or(SamplerError::NoCandidates)?;
            match processed {
                Some(n) => greedy_processed(logits, token, n),
                None => SampleOutput::bare(token),
            }
        } else {
            select::sample_random(logits, params, rng, processed)?
        };
        Ok(match raw {
            Some(raw) => raw.output(logits, out.token),
            None => out,
        })
    }

    /// Samples every row of a batch: `logits` holds `rows.len()` rows of
    /// [`vocab_size`](Self::vocab_size) logits back to back. Rows are
    /// independent (each has its own parameters, history and generator), so
    /// the result for a row does not depend on the other rows or their
    /// order. Fails as a whole only if `logits` has the wrong length.
    pub fn sample_batch(
        &self,
        logits: &mut [f32],
        rows: &mut [BatchRow<'_>],
    ) -> Result<Vec<Result<SampleOutput, SamplerError>>, SamplerError> {
        let expected = rows.len().saturating_mul(self.vocab_size);
        if logits.len() != expected {
            return Err(SamplerError::ShapeMismatch {
                expected,
                got: logits.len(),
            });
        }
        let rows_of_logits = logits.chunks_exact_mut(self.vocab_size);
        Ok(rows_of_logits
            .zip(rows.iter_mut())
            .map(|(row, r)| match r.mask {
                Some(mask) => self.sample_masked(row, mask, r.params, r.history, r.rng),
                None => self.sample(row, r.params, r.history, r.rng),
            })
            .collect())
    }

    /// [`sample`](Self::sample) with a grammar's mask: tokens whose bit is
    /// clear are set to `-inf` before any other processing, so they are
    /// never chosen. Raw log probabilities still describe the model's own
    /// distribution (they are captured before the mask).
    pub fn sample_masked(
        &self,
        logits: &mut [f32],
        mask: &[u32],
        params: &SamplingParams,
        history: &TokenHistory,
        rng: &mut SequenceRng,
    ) -> Result<SampleOutput, SamplerError> {
        self.sample_with(logits, Some(mask), params, history, rng)
    }

    /// Everything that can be wrong with a call, checked before any edit.
    fn check(
        &self,
        logits: &[f32],
        params: &SamplingParams,
        history: &TokenHistory,
    ) -> Result<(), SamplerError> {
        params.validate()?;
        if logits.len() != self.vocab_size {
            return Err(SamplerError::ShapeMismatch {
                expected: self.vocab_size,
                got: logits.len(),
            });
        }
        params.check_vocab(self.vocab_size)?;
        history.check_vocab(self.vocab_size)?;
        match math::first_invalid(logits) {
            Some(i) => Err(SamplerError::InvalidLogit {
                token: i as u32,
                value: logits[i],
            }),
            None => Ok(()),
        }
    }
}

/// Mask, bias and penalties, in vLLM's order. The caller has checked ids.
fn apply(logits: &mut [f32], params: &SamplingParams, history: &TokenHistory) {
    if let Some(allowed) = &params.allowed_token_ids {
        process::apply_allowed(logits, allowed);
    }
    process::apply_logit_bias(logits, &params.logit_bias);
    process::apply_penalties(logits, params, history);
}

/// `token`'s log probability and the top `n_top` under the log-softmax of
/// the processed row (no temperature, no truncation): greedy's processed
/// distribution.
fn greedy_processed(logits: &[f32], token: u32, n_top: usize) -> SampleOutput {
    let log_norm = log_sum_exp(logits);
    let items = logits.iter().enumerate().map(|(i, &v)| (i as u32, v));
    let top_logprobs = top_n(items, n_top)
        .into_iter()
        .map(|(t, v)| (t, v - log_norm))
        .collect();
    SampleOutput {
        token,
        logprob: Some(logits[token as usize] - log_norm),
        top_logprobs,
    }
}
