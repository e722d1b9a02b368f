//! Text in and out of the engine: `tokenizer.json` through the `tokenizers`
//! crate, the chat template of `tokenizer_config.json` rendered with
//! `minijinja` (with the helpers Hugging Face templates call), and
//! incremental detokenization that never splits a UTF-8 character.

use std::path::Path;

use minijinja::value::Serde;
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value as JinjaValue, context};
use serde::Serialize;
use serde_json::Value;

use crate::error::{EngineError, Result};

/// One chat message as templates see it.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
    /// An assistant message's tool calls (OpenAI's shape, with `arguments`
    /// also given parsed as `function.arguments`' object where templates
    /// expect one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// The call a `tool` message answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The tool's name, for `tool` messages (some templates print it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A tokenizer with its special tokens and chat template.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// A tokenizer as data: `tokenizer.json`'s text, the chat template and
/// the special tokens the template names. The same ids come out of
/// [`TextTokenizer::from_portable`] as out of the tokenizer it was made of.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct PortableTokenizer {
    /// The `tokenizers` serialization (`tokenizer.json`).
    pub tokenizer: String,
    /// The chat template, if any.
    pub chat_template: Option<String>,
    /// The BOS token string templates print.
    pub bos_token: Option<String>,
    /// The EOS token string templates print.
    pub eos_token: Option<String>,
}

/// A special token in `tokenizer_config.json`: a string, or an object with
/// a `content` field.
fn token_string(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map
            .get("content")
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

/// The chat template: a string, or a list of `{name, template}` where the
/// one named `default` wins.
fn template_string(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => {
            let named = |n: &str| {
                items
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(n))
            };
            named("default")
                .or(items.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        }
        _ => None,
    }
}

impl TextTokenizer {
    /// A tokenizer built elsewhere (e.g. from a GGUF file's metadata).
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        Self {
            inner,
            chat_template,
            bos_token,
            eos_token,
        }
    }

    /// Everything needed to build this tokenizer again elsewhere (an
    /// agent that routes a model's requests without its weights).
    pub fn to_portable(&self) -> Result<PortableTokenizer> {
        let tokenizer = self
            .inner
            .to_string(false)
            .map_err(|e| EngineError::Tokenizer(format!("serializing the tokenizer: {e}")))?;
        Ok(PortableTokenizer {
            tokenizer,
            chat_template: self.chat_template.clone(),
            bos_token: self.bos_token.clone(),
            eos_token: self.eos_token.clone(),
        })
    }

    /// Builds a tokenizer from its [`PortableTokenizer`] form.
    pub fn from_portable(portable: PortableTokenizer) -> Result<Self> {
        let inner: tokenizers::Tokenizer = portable
            .tokenizer
            .parse()
            .map_err(|e| EngineError::Tokenizer(format!("a portable tokenizer: {e}")))?;
        Ok(Self::from_parts(
            inner,
            portable.chat_template,
            portable.bos_token,
            portable.eos_token,
        ))
    }

    /// Loads `tokenizer.json`, `tokenizer_config.json` (if present) and a
    /// `chat_template.jinja` file (if present, it takes precedence); when
    /// `dir` is a file, the tokenizer and chat template of that GGUF file.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if crate::gguf::is_gguf(dir) {
            return crate::gguf::tokenizer::text_tokenizer(&crate::gguf::GgufFile::open(dir)?);
        }
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| EngineError::Config {
                path: config_path.clone(),
                field: "(document)".into(),
                message: e.to_string(),
            })?,
            Err(_) => Value::Null,
        };
        let jinja_file = std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
        Ok(Self {
            inner,
            chat_template: jinja_file.or_else(|| template_string(config.get("chat_template"))),
            bos_token: token_string(config.get("bos_token")),
            eos_token: token_string(config.get("eos_token")),
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's
    /// post-processor (e.g. a BOS token).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// The underlying `tokenizers` tokenizer.
    pub(crate) fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether a chat template is available.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template for `messages`. `tools` (OpenAI tool
    /// definitions) are passed through to templates that use them.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&Value>,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            EngineError::ChatTemplate("the model has no chat template; use /v1/completions".into())
        })?;
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        // transformers renders with trim_blocks and lstrip_blocks on.
        let syntax = env
            .syntax()
            .to_builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        env.set_syntax(syntax);
        env.add_template("chat", template)
            .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        tmpl.render(context! {
            messages => JinjaValue::from(Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            tools => tools.map(|t| JinjaValue::from(Serde(t))),
        })
        .map_err(|e| EngineError::ChatTemplate(e.to_string()))
    }
}

fn raise_exception(message: String) -> std::result::Result<JinjaValue, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> String {
    chrono::Utc::now().format(&format).to_string()
}

/// Turns a growing list of token ids into text deltas without ever emitting
/// half a UTF-8 character or a detokenization artifact that a later token
/// corrects (the prefix/read offset scheme of TGI and vLLM).
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder that starts after `prompt` (its text is never emitted, but it
    /// gives the first generated tokens their context).
    pub fn new(prompt: &[u32]) -> Self {
        let keep = prompt.len().min(6);
        Self {
            ids: prompt[prompt.len() - keep..].to_vec(),
            prefix_offset: 0,
            read_offset: keep,
        }
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let delta = full[prefix.len()..].to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }
}

/// Finds stop strings in generated text, also when a stop string is split
/// across tokens: text that could still become a stop string is held back.
#[derive(Debug)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

/// What to emit after feeding text to [`StopStrings`].
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Emit this text and continue.
    Continue(String),
    /// Emit this text (the part before the stop string) and stop.
    Stopped(String),
}

impl StopStrings {
    /// A checker for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Feeds a text delta.
    pub fn push(&mut self, delta: &str) -> StopCheck {
        self.pending.push_str(delta);
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = found {
            let text = self.pending[..at].to_owned();
            self.pending.clear();
            return StopCheck::Stopped(text);
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n))
                    .filter(|&n| self.pending.ends_with(&s[..n]))
            })
            .max()
            .unwrap_or(0);
        let emit_to = self.pending.len() - hold;
        let text = self.pending[..emit_to].to_owned();
        self.pending.drain(..emit_to);
        StopCheck::Continue(text)
    }

    /// Text still held back, released when generation ends for another
    /// reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_split_across_tokens_is_found() {
        let mut s = StopStrings::new(&["</end>".to_owned()]);
        assert_eq!(s.push("hello </"), StopCheck::Continue("hello ".into()));
        assert_eq!(s.push("en"), StopCheck::Continue(String::new()));
        assert_eq!(s.push("d> tail"), StopCheck::Stopped(String::new()));
    }

    #[test]
    fn held_text_is_released_when_it_cannot_become_a_stop() {
        let mut s = StopStrings::new(&["STOP".to_owned()]);
        assert_eq!(s.push("abc ST"), StopCheck::Continue("abc ".into()));
        assert_eq!(s.push("x"), StopCheck::Continue("STx".into()));
        assert_eq!(s.push("ST"), StopCheck::Continue(String::new()));
        assert_eq!(s.flush(), "ST");
    }

    #[test]
    fn earliest_stop_wins() {
        let mut s = StopStrings::new(&["b".to_owned(), "a".to_owned()]);
        assert_eq!(s.push("xxaxb"), StopCheck::Stopped("xx".into()));
    }
}
