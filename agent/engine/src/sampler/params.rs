//! Per-request sampling parameters and their validation.

use super::SamplerError;

/// Largest number of top log-probabilities a request may ask for per token
/// (OpenAI's `top_logprobs` and vLLM's default `max_logprobs`).
pub const MAX_LOGPROBS: usize = 20;

/// Temperatures below this are treated as greedy, as vLLM does: dividing by
/// a smaller one only overflows, and the result is an argmax anyway.
pub const GREEDY_TEMPERATURE_EPS: f32 = 1e-5;

/// Largest magnitude of a `logit_bias` value (OpenAI's range).
pub const MAX_LOGIT_BIAS: f32 = 100.0;

/// Largest magnitude of `frequency_penalty` and `presence_penalty`
/// (OpenAI's and vLLM's range).
pub const MAX_OPENAI_PENALTY: f32 = 2.0;

/// Which distribution [`SampleOutput`](super::SampleOutput)'s log
/// probabilities describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogprobsMode {
    /// Log-softmax of the model's raw logits, before penalties, bias,
    /// temperature and truncation. vLLM's default (`raw_logprobs`): the values
    /// do not depend on the sampling knobs, so they can be compared across
    /// requests and used for scoring.
    #[default]
    Raw,
    /// Log-softmax of the distribution the token was actually drawn from:
    /// after `allowed_token_ids`, bias, penalties, temperature, `min_p`,
    /// `top_k` and `top_p`, renormalised over the tokens that survive
    /// (vLLM's `processed_logprobs`). For greedy requests it is the
    /// log-softmax of the penalised logits (no temperature, no truncation).
    /// Truncated tokens have probability zero and never appear in
    /// `top_logprobs`.
    Processed,
}

/// How one request wants its tokens chosen. Build with `..Default::default()`
/// and check with [`validate`](Self::validate); [`Sampler::sample`] validates
/// again on every call.
///
/// Processing order (vLLM's): `allowed_token_ids` mask, `logit_bias`,
/// `repetition_penalty`, then `frequency_penalty`/`presence_penalty`; then
/// greedy argmax, or temperature, `min_p`, `top_k`, `top_p` and a draw.
///
/// [`Sampler::sample`]: super::Sampler::sample
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature, `>= 0` and finite. Below
    /// [`GREEDY_TEMPERATURE_EPS`] (0 in particular) sampling is greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens. `None` or `Some(0)` disables it;
    /// a `k` at least the vocabulary size keeps everything.
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose
    /// probability mass is at least `top_p` (always at least one token). In
    /// `(0, 1]`; 1 disables it.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely
    /// token's. In `[0, 1]`; 0 disables it.
    pub min_p: f32,
    /// HF/vLLM repetition penalty, `> 0` and finite, 1 disables it: the logit
    /// of every token present in the prompt or the output is divided by it if
    /// positive and multiplied by it otherwise.
    pub repetition_penalty: f32,
    /// OpenAI frequency penalty in `[-2, 2]`: subtracted from a token's logit
    /// once per time it was generated (prompt tokens do not count).
    pub frequency_penalty: f32,
    /// OpenAI presence penalty in `[-2, 2]`: subtracted from a token's logit
    /// if it was generated at least once (prompt tokens do not count).
    pub presence_penalty: f32,
    /// Added to the logits of the given tokens, each value in `[-100, 100]`.
    /// Entries for the same token add up.
    pub logit_bias: Vec<(u32, f32)>,
    /// If set, only these tokens can be sampled (vLLM's
    /// `allowed_token_ids`); must not be empty.
    pub allowed_token_ids: Option<Vec<u32>>,
    /// Seed of the request's [`SequenceRng`](super::SequenceRng); `None` seeds
    /// it from system entropy. The sampler itself never reads it: it is here
    /// so that one struct carries the request's sampling settings.
    pub seed: Option<u64>,
    /// Log probabilities to return per step: `None`, none (the cheapest);
    /// `Some(0)`, the sampled token's only; `Some(n)`, also the `n` most
    /// likely tokens, `n` at most [`MAX_LOGPROBS`]. OpenAI's `logprobs` and
    /// `top_logprobs` map to `None`, `Some(0)` and `Some(top_logprobs)`.
    pub logprobs: Option<usize>,
    /// Which distribution the returned log probabilities describe.
    pub logprobs_mode: LogprobsMode,
}

impl Default for SamplingParams {
    /// Plain sampling at temperature 1 with every filter and penalty off.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            allowed_token_ids: None,
            seed: None,
            logprobs: None,
            logprobs_mode: LogprobsMode::Raw,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every parameter against its documented range. Token ids are
    /// checked against the vocabulary when sampling.
    pub fn validate(&self) -> Result<(), SamplerError> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(SamplerError::param(
                "temperature",
                format!("{t} is not a finite number >= 0"),
            ));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(SamplerError::param(
                "top_p",
                format!("{p} is not in (0, 1]"),
            ));
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            return Err(SamplerError::param(
                "min_p",
                format!("{m} is not in [0, 1]"),
            ));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(SamplerError::param(
                "repetition_penalty",
                format!("{r} is not a finite number > 0"),
            ));
        }
        check_openai_penalty("frequency_penalty", self.frequency_penalty)?;
        check_openai_penalty("presence_penalty", self.presence_penalty)?;
        for &(token, bias) in &self.logit_bias {
            if !(bias.is_finite() && bias.abs() <= MAX_LOGIT_BIAS) {
                return Err(SamplerError::param(
                    "logit_bias",
                    format!("bias {bias} for token {token} is not in [-100, 100]"),
                ));
            }
        }
        if self.allowed_token_ids.as_ref().is_some_and(Vec::is_empty) {
            return Err(SamplerError::param(
                "allowed_token_ids",
                "must not be empty (leave it unset to allow every token)",
            ));
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_LOGPROBS) {
            return Err(SamplerError::param(
                "logprobs",
                format!("{n} is more than the maximum of {MAX_LOGPROBS}"),
            ));
        }
        Ok(())
    }

    /// Whether this request samples greedily (temperature below
    /// [`GREEDY_TEMPERATURE_EPS`]); greedy steps never draw from the RNG.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE_EPS
    }

    /// The effective `top_k`: `None` when disabled.
    pub(crate) fn top_k_limit(&self) -> Option<usize> {
        self.top_k.filter(|&k| k > 0)
    }

    /// The number of top log probabilities to return.
    pub(crate) fn top_logprobs(&self) -> usize {
        self.logprobs.unwrap_or(0)
    }

    /// Whether any history-based penalty changes logits.
    pub(crate) fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }

    /// Checks every token id the parameters name against the vocabulary.
    pub(crate) fn check_vocab(&self, vocab_size: usize) -> Result<(), SamplerError> {
        let ids = self.logit_bias.iter().map(|&(t, _)| ("logit_bias", t));
        let allowed = self.allowed_token_ids.iter().flatten();
        let ids = ids.chain(allowed.map(|&t| ("allowed_token_ids", t)));
        for (source_name, token) in ids {
            if token as usize >= vocab_size {
                return Err(SamplerError::TokenOutOfVocab {
                    source_name,
                    token,
                    vocab_size,
                });
            }
        }
        Ok(())
    }
}

fn check_openai_penalty(param: &'static str, value: f32) -> Result<(), SamplerError> {
    if (-MAX_OPENAI_PENALTY..=MAX_OPENAI_PENALTY).contains(&value) {
        Ok(())
    } else {
        Err(SamplerError::param(
            param,
            format!("{value} is not in [-2, 2]"),
        ))
    }
}
