//! The sampler's error type.

/// Why a token could not be sampled. Every variant is a property of the
/// request or of the logits row, never an internal invariant: the sampler
/// does not panic on bad input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplerError {
    /// A sampling parameter is out of its documented range.
    #[error("sampling parameter `{param}`: {message}")]
    InvalidParam {
        /// The parameter's name, as in [`SamplingParams`](super::SamplingParams).
        param: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A logit is NaN or `+inf` (`-inf` is allowed and means "never").
    #[error("logit of token {token} is {value}: logits must be finite or -inf")]
    InvalidLogit {
        /// The token whose logit is bad.
        token: u32,
        /// The bad value.
        value: f32,
    },
    /// A token id (in `logit_bias`, `allowed_token_ids` or the history) is
    /// not in the vocabulary.
    #[error("{source_name}: token id {token} is outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfVocab {
        /// Where the id came from.
        source_name: &'static str,
        /// The id.
        token: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// A logits row or batch has the wrong length.
    #[error("logits have {got} entries, expected {expected}")]
    ShapeMismatch {
        /// The expected number of entries.
        expected: usize,
        /// The number received.
        got: usize,
    },
    /// The vocabulary size given to [`Sampler::new`](super::Sampler::new) is
    /// zero or does not fit token ids (`u32`).
    #[error("vocabulary size {0} must be in 1..=2^32")]
    InvalidVocabSize(usize),
    /// After processing, every token has probability zero (all logits
    /// `-inf`), so nothing can be sampled.
    #[error("no token can be sampled: every token has zero probability")]
    NoCandidates,
    /// The operating system's entropy source failed while seeding a
    /// [`SequenceRng`](super::SequenceRng) without a seed.
    #[error("system entropy unavailable: {0}")]
    Entropy(String),
}

impl SamplerError {
    pub(crate) fn param(param: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidParam {
            param,
            message: message.into(),
        }
    }
}
