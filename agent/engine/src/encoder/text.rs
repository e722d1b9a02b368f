//! Text to sentence vectors: the encoder's WordPiece tokenizer (with the
//! padding and truncation that `tokenizer.json` files often carry switched
//! off, since inputs are packed without padding) and the length rule.

use std::path::Path;

use super::BertEncoder;
use crate::error::{EngineError, Result};

/// What to do with an input longer than the encoder takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Truncation {
    /// Refuse it (the embeddings API: a client must know its text was cut).
    Error,
    /// Keep the first tokens (the semantic cache: a prefix is a fine key).
    Keep,
}

/// One sentence vector and the tokens it cost.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    /// Unit-length vector (when the model normalizes).
    pub vector: Vec<f32>,
    /// Tokens read, special tokens included.
    pub tokens: usize,
}

/// A tokenizer and encoder pair that embeds text.
pub struct TextEmbedder {
    tokenizer: tokenizers::Tokenizer,
    encoder: BertEncoder,
}

impl TextEmbedder {
    /// Loads the encoder and `tokenizer.json` of a model directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(Self {
            tokenizer,
            encoder: BertEncoder::load(dir)?,
        })
    }

    /// The encoder.
    pub fn encoder(&self) -> &BertEncoder {
        &self.encoder
    }

    /// Width of the vectors.
    pub fn dim(&self) -> usize {
        self.encoder.dim()
    }

    /// Most tokens one input may have, special tokens included.
    pub fn max_input_tokens(&self) -> usize {
        self.encoder.config().max_seq_len
    }

    /// Token ids of `text` with the model's special tokens (`[CLS] … [SEP]`).
    pub fn tokenize(&self, text: &str, truncation: Truncation) -> Result<Vec<u32>> {
        let ids = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec();
        self.fit(ids, truncation)
    }

    /// Wraps raw token ids in the model's special tokens.
    pub fn wrap_ids(&self, ids: &[u32], truncation: Truncation) -> Result<Vec<u32>> {
        let cls = self.tokenizer.token_to_id("[CLS]");
        let sep = self.tokenizer.token_to_id("[SEP]");
        let mut out = Vec::with_capacity(ids.len() + 2);
        out.extend(cls);
        out.extend_from_slice(ids);
        out.extend(sep);
        self.fit(out, truncation)
    }

    fn fit(&self, mut ids: Vec<u32>, truncation: Truncation) -> Result<Vec<u32>> {
        let max = self.max_input_tokens();
        if ids.len() <= max {
            return Ok(ids);
        }
        match truncation {
            Truncation::Error => Err(EngineError::InvalidRequest(format!(
                "input has {} tokens; this model takes at most {max}",
                ids.len()
            ))),
            Truncation::Keep => {
                // Keep the closing special token, as Hugging Face truncation does.
                let last = ids[ids.len() - 1];
                ids.truncate(max - 1);
                ids.push(last);
                Ok(ids)
            }
        }
    }

    /// Sentence vectors of already-fitted token ids (see [`Self::tokenize`]).
    pub fn embed_ids(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Embedding>> {
        let vectors = self.encoder.encode(&inputs)?;
        Ok(vectors
            .into_iter()
            .zip(&inputs)
            .map(|(vector, ids)| Embedding {
                vector,
                tokens: ids.len(),
            })
            .collect())
    }

    /// Sentence vectors of `texts`.
    pub fn embed_texts(&self, texts: &[&str], truncation: Truncation) -> Result<Vec<Embedding>> {
        let inputs = texts
            .iter()
            .map(|t| self.tokenize(t, truncation))
            .collect::<Result<Vec<_>>>()?;
        self.embed_ids(inputs)
    }
}
