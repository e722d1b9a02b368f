//! Constrained decoding: a sequence may carry a [`Grammar`] (JSON Schema,
//! regular expression, Lark grammar or a fixed set of choices), compiled by
//! `llguidance` against the model's vocabulary. Each step the engine asks
//! the grammar for the set of tokens it allows ([`Grammar::compute_mask`]),
//! the sampler drops every other token, and the grammar advances on the
//! sampled token ([`Grammar::accept`]). A grammar that can go no further
//! ([`Grammar::is_finished`]) ends its sequence with `stop`.
//!
//! Guarantees:
//! * every token a constrained sequence generates was in its mask, so the
//!   generated text is in the grammar's language (or a prefix of it, when
//!   `max_tokens` cut it short);
//! * the grammar's state is the sequence's own and depends only on the
//!   tokens it generated: preemption, recomputation and prefix reuse never
//!   touch it, since recomputed tokens are never sampled again;
//! * end-of-sequence tokens are allowed exactly when the grammar accepts.
//!
//! Compiling is the expensive part (milliseconds for a schema); callers
//! compile once per request, before it queues, so an invalid grammar is
//! refused up front. Clones of a compiled grammar are independent.

mod vocab;

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use toktrie::{SimpleVob, TokEnv};

use crate::tokenizer::TextTokenizer;

/// What a request's output must match.
#[derive(Clone, Debug, PartialEq)]
pub enum GrammarSpec {
    /// A JSON value valid against this JSON Schema (llguidance's subset).
    JsonSchema(Value),
    /// Text matching this regular expression (Rust `regex` syntax).
    Regex(String),
    /// Text in the language of this Lark grammar (llguidance's dialect).
    Lark(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

impl GrammarSpec {
    /// A stable text form, for cache keys: two specs with the same key
    /// constrain output the same way.
    pub fn cache_key(&self) -> String {
        match self {
            Self::JsonSchema(v) => format!("json:{v}"),
            Self::Regex(r) => format!("regex:{r}"),
            Self::Lark(g) => format!("lark:{g}"),
            Self::Choice(c) => format!("choice:{}", Value::from(c.clone())),
        }
    }

    fn to_llguidance(&self) -> TopLevelGrammar {
        match self {
            Self::JsonSchema(v) => TopLevelGrammar::from_json_schema(compact(v)),
            Self::Regex(r) => TopLevelGrammar::from_regex(r),
            Self::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            Self::Choice(items) => {
                // Each choice as a JSON string literal, which Lark reads as a
                // quoted string with the same escapes.
                let alts: Vec<String> = items
                    .iter()
                    .map(|s| Value::from(s.as_str()).to_string())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
        }
    }
}

/// The schema with llguidance's output options set, unless it sets them
/// itself (`x-guidance`): one space after `,` and `:` and no other
/// whitespace, as Python's `json.dumps` writes, so a model cannot pad its
/// output with whitespace until `max_tokens` runs out.
fn compact(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Value::Object(map) = &mut schema
        && !map.contains_key("x-guidance")
    {
        map.insert(
            "x-guidance".into(),
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            }),
        );
    }
    schema
}

/// Why a grammar could not be compiled or followed.
#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    /// The grammar is invalid or uses something llguidance does not support
    /// (the message names it).
    #[error("{0}")]
    Invalid(String),
    /// The grammar failed while generating (an internal error, or a token
    /// it did not allow).
    #[error("grammar: {0}")]
    Failed(String),
}

/// Compiles grammars for one model. The vocabulary trie is built on first
/// use (a few milliseconds to a few hundred for a large vocabulary) and
/// shared by every grammar.
pub struct GrammarCompiler {
    tokenizer: Arc<TextTokenizer>,
    vocab_size: usize,
    eos: Vec<u32>,
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("vocab_size", &self.vocab_size)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl GrammarCompiler {
    /// A compiler for a model with `vocab_size` logits per row whose
    /// end-of-sequence tokens are `eos` (the first is the grammar's EOS).
    pub fn new(tokenizer: Arc<TextTokenizer>, vocab_size: usize, eos: Vec<u32>) -> Self {
        Self {
            tokenizer,
            vocab_size,
            eos,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&Arc<ParserFactory>, GrammarError> {
        self.factory
            .get_or_init(|| {
                let eos = self.eos.first().copied().unwrap_or(0);
                let env: TokEnv = vocab::tok_env(&self.tokenizer, self.vocab_size, eos);
                let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                factory.quiet();
                Ok(Arc::new(factory))
            })
            .as_ref()
            .map_err(|e| GrammarError::Invalid(format!("the vocabulary: {e}")))
    }

    /// Compiles `spec`; an invalid or unsupported grammar is
    /// [`GrammarError::Invalid`] with llguidance's explanation.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Grammar, GrammarError> {
        if let GrammarSpec::Choice(items) = spec
            && (items.is_empty() || items.iter().any(String::is_empty))
        {
            return Err(GrammarError::Invalid(
                "choice needs at least one non-empty string".into(),
            ));
        }
        let factory = self.factory()?;
        let parser = factory
            .create_parser(spec.to_llguidance())
            .map_err(|e| GrammarError::Invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Invalid(e));
        }
        Ok(Grammar {
            matcher,
            eos: self.eos.clone(),
            vocab_size: self.vocab_size,
            key: spec.cache_key(),
        })
    }
}

/// The allowed tokens of one step: bit `t % 32` of word `t / 32` is set
/// when token `t` may be sampled.
pub type TokenMask = Vec<u32>;

/// One sequence's grammar state.
pub struct Grammar {
    matcher: Matcher,
    eos: Vec<u32>,
    vocab_size: usize,
    key: String,
}

impl Clone for Grammar {
    /// An independent copy (its own parser state and caches).
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            eos: self.eos.clone(),
            vocab_size: self.vocab_size,
            key: self.key.clone(),
        }
    }
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar").field("key", &self.key).finish()
    }
}

impl Grammar {
    /// The tokens allowed next, as a bit mask over the model's vocabulary.
    /// Every end-of-sequence token is allowed when the grammar accepts.
    pub fn compute_mask(&mut self) -> Result<TokenMask, GrammarError> {
        let vob: SimpleVob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| GrammarError::Failed(e.to_string()))?;
        let words = self.vocab_size.div_ceil(32);
        let mut mask: TokenMask = vob.as_slice().to_vec();
        mask.resize(words, 0);
        // Padding bits past the vocabulary stay clear.
        if !self.vocab_size.is_multiple_of(32)
            && let Some(last) = mask.last_mut()
        {
            *last &= (1u32 << (self.vocab_size % 32)) - 1;
        }
        let eos_allowed = self.eos.iter().any(|&t| allowed(&mask, t));
        if eos_allowed {
            for &t in &self.eos {
                if (t as usize) < self.vocab_size {
                    mask[t as usize / 32] |= 1 << (t % 32);
                }
            }
        }
        Ok(mask)
    }

    /// Advances on the sampled `token`. End-of-sequence tokens end the
    /// sequence elsewhere and are not passed here.
    pub fn accept(&mut self, token: u32) -> Result<(), GrammarError> {
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError::Failed(e.to_string()))
    }

    /// Whether the grammar can go no further (only end-of-sequence remains).
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether the text so far is a complete sentence of the grammar.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }

    /// The cache key of the spec this grammar was compiled from.
    pub fn cache_key(&self) -> &str {
        &self.key
    }

    /// Whether `token` is an end-of-sequence token of the model.
    pub fn is_eos(&self, token: u32) -> bool {
        self.eos.contains(&token)
    }
}

/// Whether `mask` allows `token`.
pub fn allowed(mask: &[u32], token: u32) -> bool {
    mask.get(token as usize / 32)
        .is_some_and(|w| w & (1 << (token % 32)) != 0)
}
