//! A sequence's token history as the penalties need it: which tokens the
//! prompt holds and how often each was generated.

use std::collections::HashMap;

use super::SamplerError;

/// What the history knows about one distinct token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenCounts {
    /// Whether the token occurs in the prompt.
    pub in_prompt: bool,
    /// How many times it was generated.
    pub generated: u32,
}

/// Prompt and generated tokens of one sequence, kept as per-token counts so
/// that a sampling step costs O(distinct tokens) for the penalties rather
/// than O(length). [`push`](Self::push) is O(1); the caller pushes each
/// sampled token after [`Sampler::sample`](super::Sampler::sample) returns.
#[derive(Debug, Clone, Default)]
pub struct TokenHistory {
    counts: HashMap<u32, TokenCounts>,
    prompt_len: usize,
    generated_len: usize,
    max_token: Option<u32>,
}

impl TokenHistory {
    /// A history holding the prompt and no generated token.
    pub fn new(prompt: &[u32]) -> Self {
        let mut history = Self {
            prompt_len: prompt.len(),
            ..Self::default()
        };
        for &token in prompt {
            history.note(token).in_prompt = true;
        }
        history
    }

    /// Records one generated token.
    pub fn push(&mut self, token: u32) {
        let counts = self.note(token);
        counts.generated = counts.generated.saturating_add(1);
        self.generated_len += 1;
    }

    /// Records several generated tokens, in order.
    pub fn extend(&mut self, tokens: &[u32]) {
        for &token in tokens {
            self.push(token);
        }
    }

    /// Number of prompt tokens.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Number of generated tokens.
    pub fn generated_len(&self) -> usize {
        self.generated_len
    }

    /// Number of distinct tokens in prompt and output together.
    pub fn distinct(&self) -> usize {
        self.counts.len()
    }

    /// What the history knows about `token` (all zero when absent).
    pub fn counts(&self, token: u32) -> TokenCounts {
        self.counts.get(&token).copied().unwrap_or_default()
    }

    /// Every distinct token with its counts, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, TokenCounts)> + '_ {
        self.counts.iter().map(|(&t, &c)| (t, c))
    }

    /// Fails if any recorded token id is outside a vocabulary of
    /// `vocab_size`; O(1).
    pub(crate) fn check_vocab(&self, vocab_size: usize) -> Result<(), SamplerError> {
        match self.max_token {
            Some(token) if token as usize >= vocab_size => Err(SamplerError::TokenOutOfVocab {
                source_name: "token history",
                token,
                vocab_size,
            }),
            _ => Ok(()),
        }
    }

    fn note(&mut self, token: u32) -> &mut TokenCounts {
        self.max_token = self.max_token.max(Some(token));
        self.counts.entry(token).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_prompt_and_generated_tokens_separately() {
        let mut h = TokenHistory::new(&[5, 7, 5]);
        h.extend(&[7, 9, 9, 9]);
        assert_eq!(h.prompt_len(), 3);
        assert_eq!(h.generated_len(), 4);
        assert_eq!(h.distinct(), 3);
        let c = |t| h.counts(t);
        assert_eq!(
            c(5),
            TokenCounts {
                in_prompt: true,
                generated: 0
            }
        );
        assert_eq!(
            c(7),
            TokenCounts {
                in_prompt: true,
                generated: 1
            }
        );
        assert_eq!(
            c(9),
            TokenCounts {
                in_prompt: false,
                generated: 3
            }
        );
        assert_eq!(c(1), TokenCounts::default());
    }

    #[test]
    fn vocab_check_uses_the_largest_id() {
        let mut h = TokenHistory::new(&[3]);
        assert!(h.check_vocab(4).is_ok());
        h.push(10);
        assert_eq!(
            h.check_vocab(10),
            Err(SamplerError::TokenOutOfVocab {
                source_name: "token history",
                token: 10,
                vocab_size: 10
            })
        );
        assert!(h.check_vocab(11).is_ok());
        assert!(TokenHistory::default().check_vocab(1).is_ok());
    }
}
