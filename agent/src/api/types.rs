//! OpenAI request and response bodies, as the official SDKs send and expect
//! them, plus the extensions vLLM users rely on (`top_k`, `min_p`,
//! `repetition_penalty`, `ignore_eos`) and Weir's `priority`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `"a"` or `["a", "b"]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single string.
    One(String),
    /// A list of strings.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The strings, in order.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// Sampling and length settings shared by chat and completions.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SamplingFields {
    /// Most tokens to generate (legacy name).
    pub max_tokens: Option<i64>,
    /// Most tokens to generate.
    pub max_completion_tokens: Option<i64>,
    /// Softmax temperature (0 = greedy).
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Top-k (vLLM extension).
    pub top_k: Option<i64>,
    /// Min-p (vLLM extension).
    pub min_p: Option<f32>,
    /// Repetition penalty (vLLM extension).
    pub repetition_penalty: Option<f32>,
    /// OpenAI frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// OpenAI presence penalty.
    pub presence_penalty: Option<f32>,
    /// Choices to generate.
    pub n: Option<i64>,
    /// Stop strings.
    pub stop: Option<OneOrMany>,
    /// Stop token ids (vLLM extension).
    pub stop_token_ids: Option<Vec<u32>>,
    /// Seed for reproducible sampling.
    pub seed: Option<i64>,
    /// Token id (as a string) → bias.
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// Stream the answer as server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// End user id (recorded, not used for output).
    pub user: Option<String>,
    /// Priority class: critical, high, normal, low or background (Weir).
    pub priority: Option<String>,
    /// Keep generating after EOS (vLLM extension).
    pub ignore_eos: Option<bool>,
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// A chat message's content: a string or a list of parts.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts; only `text` parts are supported.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    /// Part type (`text`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// One incoming chat message.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatMessageIn {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The content (may be null for assistant tool calls).
    pub content: Option<MessageContent>,
    /// Participant name.
    pub name: Option<String>,
    /// An assistant message's tool calls, sent back in the conversation.
    pub tool_calls: Option<Vec<crate::api::structured::ToolCall>>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatCompletionRequest {
    /// Model or ensemble name.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessageIn>,
    /// Sampling and length settings.
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Return log probabilities of the output tokens.
    pub logprobs: Option<bool>,
    /// Alternatives per token (0-20), with `logprobs`.
    pub top_logprobs: Option<i64>,
    /// Tool definitions, passed to the chat template.
    pub tools: Option<Value>,
    /// `response_format`, `tool_choice`, `structured_outputs`, ...
    #[serde(flatten)]
    pub constraints: Box<crate::api::structured::ConstraintFields>,
}

/// A completion prompt: text, texts, token ids or lists of token ids.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One text.
    Text(String),
    /// Several texts (one choice set each).
    Texts(Vec<String>),
    /// One token-id prompt.
    Tokens(Vec<u32>),
    /// Several token-id prompts.
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    /// Model or ensemble name.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling and length settings.
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Alternatives per token (0-5) with their log probabilities.
    pub logprobs: Option<i64>,
    /// Return the prompt before the completion.
    pub echo: Option<bool>,
}

/// Token counts.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Sum of both.
    pub total_tokens: usize,
    /// Prompt details (cached tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// Prompt tokens the prompt optimization removed (Weir's own field,
    /// present when it ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_saved: Option<usize>,
}

/// `usage.prompt_tokens_details`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// Log probability of one token with alternatives (chat shape).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenLogprob {
    /// Token text.
    pub token: String,
    /// Log probability.
    pub logprob: f32,
    /// UTF-8 bytes of the token text.
    pub bytes: Vec<u8>,
    /// Most likely alternatives.
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TopLogprob {
    /// Token text.
    pub token: String,
    /// Log probability.
    pub logprob: f32,
    /// UTF-8 bytes of the token text.
    pub bytes: Vec<u8>,
}

/// `choices[].logprobs` of a chat response.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChoiceLogprobs {
    /// Per generated token.
    pub content: Vec<TokenLogprob>,
}

/// An assistant message.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: String,
    /// The text (null when the answer is only tool calls).
    pub content: Option<String>,
    /// The tool calls of the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<crate::api::structured::ToolCall>>,
}

/// One choice of a chat response.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChatChoice {
    /// Choice index.
    pub index: usize,
    /// The message.
    pub message: AssistantMessage,
    /// Log probabilities, if asked for.
    pub logprobs: Option<ChoiceLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// A chat response.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChatCompletion {
    /// Response id.
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Model name as requested.
    pub model: String,
    /// The choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// A streamed delta.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ChatDelta {
    /// `assistant` in the first chunk of a choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Tool call fragments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<crate::api::structured::ToolCallDelta>>,
}

/// One choice of a chat chunk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChatChunkChoice {
    /// Choice index.
    pub index: usize,
    /// The delta.
    pub delta: ChatDelta,
    /// Log probabilities of the delta's tokens.
    pub logprobs: Option<ChoiceLogprobs>,
    /// Set in the choice's last chunk.
    pub finish_reason: Option<String>,
}

/// A chat stream chunk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChatCompletionChunk {
    /// Response id (same in every chunk).
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Model name as requested.
    pub model: String,
    /// Choices with news.
    pub choices: Vec<ChatChunkChoice>,
    /// Usage in the last chunk when asked for; null before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// Legacy completion log probabilities.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CompletionLogprobs {
    /// Token texts.
    pub tokens: Vec<String>,
    /// Their log probabilities (null for the first prompt token with
    /// `echo`).
    pub token_logprobs: Vec<Option<f32>>,
    /// Alternatives per token (null for the first prompt token with `echo`).
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Character offsets of each token in the text.
    pub text_offset: Vec<usize>,
}

/// One completion choice (also a streamed chunk's choice).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CompletionChoice {
    /// Choice index.
    pub index: usize,
    /// The text.
    pub text: String,
    /// Log probabilities, if asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length` (null in intermediate chunks).
    pub finish_reason: Option<String>,
}

/// A completion response or stream chunk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Completion {
    /// Response id.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Model name as requested.
    pub model: String,
    /// The choices.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (last chunk only when streaming).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One embedding.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Embedding {
    /// `embedding`.
    pub object: String,
    /// Input index.
    pub index: usize,
    /// The vector (floats, or a base64 string of little-endian f32).
    pub embedding: Value,
}

/// `POST /v1/embeddings` response.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingResponse {
    /// `list`.
    pub object: String,
    /// One per input.
    pub data: Vec<Embedding>,
    /// Model name.
    pub model: String,
    /// Token counts.
    pub usage: Usage,
}

/// One entry of `GET /v1/models`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelCard {
    /// Served name.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds the model was loaded.
    pub created: u64,
    /// `weir`.
    pub owned_by: String,
}

/// `GET /v1/models`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The models.
    pub data: Vec<ModelCard>,
}

/// `input` of an embeddings request: text, texts, token ids or lists of
/// token ids.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    Text(String),
    /// Several texts.
    Texts(Vec<String>),
    /// One input as token ids.
    Tokens(Vec<u32>),
    /// Several inputs as token ids.
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/embeddings`.
#[derive(Clone, Debug, Deserialize)]
pub struct EmbeddingRequest {
    /// Served encoder name.
    pub model: String,
    /// What to embed.
    pub input: EmbeddingInput,
    /// `float` (default) or `base64` (little-endian f32).
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Requested width; only the model's own width is accepted.
    #[serde(default)]
    pub dimensions: Option<i64>,
    /// End-user id (accepted, not used).
    #[serde(default)]
    pub user: Option<String>,
}
