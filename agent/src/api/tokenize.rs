//! Bodies of `POST /tokenize` and `POST /detokenize`, as vLLM has them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /tokenize`: a prompt, or chat messages through the chat template.
#[derive(Clone, Debug, Deserialize)]
pub struct TokenizeRequest {
    /// Served model; optional when this agent serves one generation model.
    pub model: Option<String>,
    /// Text to tokenize (the completions form).
    pub prompt: Option<String>,
    /// Chat messages (the chat form), in chat-completions shape.
    pub messages: Option<Vec<Value>>,
    /// Tool definitions for the chat template (chat form).
    pub tools: Option<Value>,
    /// Add the tokenizer's special tokens (BOS): default true for a prompt,
    /// false for messages (the chat template writes its own).
    pub add_special_tokens: Option<bool>,
    /// End the rendered chat with the assistant's turn opener (default true).
    pub add_generation_prompt: Option<bool>,
    /// Also return each token's text.
    pub return_token_strs: Option<bool>,
}

/// The answer of `POST /tokenize`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenizeResponse {
    /// Number of tokens.
    pub count: usize,
    /// The model's context length.
    pub max_model_len: usize,
    /// The token ids.
    pub tokens: Vec<u32>,
    /// Each token's text, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<String>>,
}

/// `POST /detokenize`.
#[derive(Clone, Debug, Deserialize)]
pub struct DetokenizeRequest {
    /// Served model; optional when this agent serves one generation model.
    pub model: Option<String>,
    /// Token ids to turn back into text.
    pub tokens: Vec<u32>,
}

/// The answer of `POST /detokenize`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DetokenizeResponse {
    /// The text of the tokens (special tokens included).
    pub prompt: String,
}
