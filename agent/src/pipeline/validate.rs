//! Validating a request into a [`Job`] for the engine: chat messages
//! through the model's template, prompts into token ids (inside the
//! vocabulary), the OpenAI sampling fields (400 naming the parameter),
//! log probabilities, priority (body, else the `x-weir-priority` header),
//! and the identity of the response.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use weir_engine::tokenizer::ChatMessage;

use crate::api::ApiError;
use crate::api::types::{
    ChatCompletionRequest, CompletionRequest, MessageContent, Prompt, SamplingFields,
};
use crate::generate::{Job, LogprobsWanted, SemanticInput, build_template, parse_priority};
use crate::models::ServedModel;

/// The `x-weir-priority` header: absent, text, or the error for a value
/// that is not ASCII.
pub type PriorityHeader<'a> = Option<Result<&'a str, ApiError>>;

/// Reads the `x-weir-priority` header from `headers`.
pub fn priority_header(headers: &http::HeaderMap) -> PriorityHeader<'_> {
    headers.get("x-weir-priority").map(|v| {
        v.to_str()
            .map_err(|_| ApiError::invalid("x-weir-priority", "the header is not ASCII"))
    })
}

/// Identity of one response: id, creation time, model name, logprobs asked.
#[derive(Clone, Debug)]
pub struct ResponseMeta {
    /// Response id.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// Model name as requested.
    pub model: String,
    /// Whether log probabilities were asked for.
    pub logprobs: bool,
    /// Whether to send a usage chunk at the end of a stream.
    pub include_usage: bool,
    /// Prompt tokens the optimization saved, when it ran.
    pub prompt_tokens_saved: Option<usize>,
    /// Oldest turns dropped to fit the context.
    pub dropped_turns: usize,
    /// The tuning mode whose defaults the request got, when tuning is on.
    pub tuning: Option<&'static str>,
    /// With `echo`: each prompt's text, put before its choices' text.
    pub echo: Vec<String>,
    /// Choices per prompt (choice `i` belongs to prompt `i / n`).
    pub choices_per_prompt: usize,
    /// How the answer's text becomes `tool_calls`, when tools are on.
    pub tools: Option<crate::api::tools::ToolRender>,
}

/// How the prompt is shaped before tokenization.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shaping {
    /// Whether to run the conservative optimization ([`super::prompt`]);
    /// `None` follows the model's CachePolicy.
    pub optimize: Option<bool>,
}

impl Shaping {
    /// From the `x-weir-prompt-optimization` header (`conservative`, `off`).
    pub fn from_headers(headers: &http::HeaderMap) -> Result<Self, ApiError> {
        let optimize = match headers.get("x-weir-prompt-optimization") {
            None => None,
            Some(v) => match v.to_str().map(str::to_ascii_lowercase).as_deref() {
                Ok("conservative") => Some(true),
                Ok("off") => Some(false),
                _ => {
                    return Err(ApiError::invalid(
                        "x-weir-prompt-optimization",
                        "must be `conservative` or `off`",
                    ));
                }
            },
        };
        Ok(Self { optimize })
    }

    fn optimize_for(self, model: &ServedModel) -> bool {
        self.optimize.unwrap_or(
            model.cache_policy.prompt_optimization
                == weir_crds::cache_policy::PromptOptimization::Conservative,
        )
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn response_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{:08x}", unix_now(), n)
}

/// The priority from the body, else the `x-weir-priority` header.
fn requested_priority(
    fields: &SamplingFields,
    header: PriorityHeader<'_>,
) -> Result<Option<weir_engine::scheduler::Priority>, ApiError> {
    match (&fields.priority, header) {
        (Some(p), _) => parse_priority(p).map(Some),
        (None, Some(h)) => parse_priority(h?).map(Some),
        (None, None) => Ok(None),
    }
}

fn chat_messages(request: &ChatCompletionRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    request
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content"),
                                    format!("content parts of type `{kind}` are not supported by this model"),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            let role = if m.role == "developer" { "system".to_owned() } else { m.role.clone() };
            if role == "tool" && m.tool_call_id.is_none() {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].tool_call_id"),
                    "a tool message needs the tool_call_id it answers",
                ));
            }
            Ok(ChatMessage {
                role,
                content,
                tool_calls: m.tool_calls.as_ref().map(|calls| template_tool_calls(calls)),
                tool_call_id: m.tool_call_id.clone(),
                name: m.name.clone(),
            })
        })
        .collect()
}

/// Tool calls as chat templates expect them: OpenAI's shape, with each
/// call's `arguments` text parsed into an object when it is JSON (as vLLM
/// does; templates write it with `tojson`).
fn template_tool_calls(calls: &[crate::api::structured::ToolCall]) -> serde_json::Value {
    let calls: Vec<serde_json::Value> = calls
        .iter()
        .map(|c| {
            let arguments = serde_json::from_str(&c.function.arguments)
                .unwrap_or_else(|_| serde_json::Value::String(c.function.arguments.clone()));
            serde_json::json!({
                "id": c.id,
                "type": c.kind,
                "function": {"name": c.function.name, "arguments": arguments},
            })
        })
        .collect();
    serde_json::Value::Array(calls)
}

/// A validated request: the model, its job, the response's identity, and
/// whether to stream.
pub type Prepared = (Arc<ServedModel>, Job, ResponseMeta, bool);

/// The prompt of `messages` through `model`'s chat template, as token ids.
fn render_chat(
    model: &ServedModel,
    messages: &[ChatMessage],
    request: &ChatCompletionRequest,
) -> Result<Vec<u32>, ApiError> {
    let text = model
        .tokenizer
        .apply_chat_template(messages, true, request.tools.as_ref())
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    model
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))
}

/// The token ids of `request`'s messages through `model`'s chat template,
/// ending with the assistant's turn opener when `add_generation_prompt`
/// (what `/tokenize` counts; no shaping), with the tokenizer's own special
/// tokens when `add_special_tokens`.
pub fn chat_prompt_ids(
    model: &ServedModel,
    request: &ChatCompletionRequest,
    add_generation_prompt: bool,
    add_special_tokens: bool,
) -> Result<Vec<u32>, ApiError> {
    let messages = chat_messages(request)?;
    let text = model
        .tokenizer
        .apply_chat_template(&messages, add_generation_prompt, request.tools.as_ref())
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    model
        .tokenizer
        .encode(&text, add_special_tokens)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))
}

/// The prompt tokens `request` would have on a replica with `tokenizer`
/// (its first prompt, unshaped), for placing it by its cached prefix
/// where the model is not served; `None` when they cannot be made here
/// (the replica will say why).
pub fn routing_tokens(
    tokenizer: &weir_engine::tokenizer::TextTokenizer,
    request: &super::target::GenerationRequest,
) -> Option<Vec<u32>> {
    use super::target::GenerationRequest;
    match request {
        GenerationRequest::Chat(r) => {
            let messages = chat_messages(r).ok()?;
            let text = tokenizer
                .apply_chat_template(&messages, true, r.tools.as_ref())
                .ok()?;
            tokenizer.encode(&text, false).ok()
        }
        GenerationRequest::Completion(r) => match &r.prompt {
            Prompt::Text(t) => tokenizer.encode(t, true).ok(),
            Prompt::Texts(ts) => tokenizer.encode(ts.first()?, true).ok(),
            Prompt::Tokens(ids) => Some(ids.clone()),
            Prompt::TokenLists(lists) => lists.first().cloned(),
        },
    }
}

/// A chat's messages as shaped, their prompt, the tokens the optimization
/// saved (when it ran) and the turns dropped to fit the context.
type ShapedChat = (Vec<ChatMessage>, Vec<u32>, Option<usize>, usize);

/// The chat's messages shaped (optimized, fitted into the context).
fn shaped_chat(
    model: &ServedModel,
    request: &ChatCompletionRequest,
    shaping: Shaping,
) -> Result<ShapedChat, ApiError> {
    let mut messages = chat_messages(request)?;
    let render = |m: &[ChatMessage]| render_chat(model, m, request);
    // Saved: the whole chat as sent against the whole chat optimized.
    let mut saved = None;
    if shaping.optimize_for(model) {
        let before = render(&messages)?.len();
        for m in &mut messages {
            m.content = super::prompt::optimize(&m.content);
        }
        saved = Some(before.saturating_sub(render(&messages)?.len()));
    }
    let (messages, prompt, dropped) = match model.spec.engine.context_overflow {
        weir_crds::common::ContextOverflow::Error => {
            let prompt = render(&messages)?;
            (messages, prompt, 0)
        }
        weir_crds::common::ContextOverflow::TruncateOldest => {
            // Room kept for the answer: what the client asked for, else a
            // quarter of the context (at most the default answer length).
            let asked = request
                .sampling
                .max_completion_tokens
                .or(request.sampling.max_tokens);
            let reserve = asked.map_or(
                (model.max_model_len / 4).min(crate::generate::DEFAULT_MAX_TOKENS),
                |m| m.max(1) as usize,
            );
            let fitted = super::prompt::fit_turns(messages, model.max_model_len, reserve, render)?;
            (fitted.messages, fitted.prompt, fitted.dropped)
        }
    };
    Ok((messages, prompt, saved, dropped))
}

/// Validates a chat request for `model` into a job.
pub fn chat_job(
    model: Arc<ServedModel>,
    priority_header: PriorityHeader<'_>,
    request: &ChatCompletionRequest,
    shaping: Shaping,
) -> Result<Prepared, ApiError> {
    let tools = super::structured::parse_tools(request.tools.as_ref())?;
    let constraint =
        super::structured::chat_constraint(&model.engine, &request.constraints, &tools)?;
    let (messages, prompt, saved, dropped) = shaped_chat(&model, request, shaping)?;
    let logprobs = match (request.logprobs, request.top_logprobs) {
        (Some(true), top) => LogprobsWanted::Yes(top_logprobs(top, 20)?),
        (_, Some(t)) if t > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ));
        }
        _ => LogprobsWanted::No,
    };
    let mut prepared = prepare(
        model,
        priority_header,
        &request.sampling,
        vec![prompt],
        logprobs,
        &request.model,
        "chatcmpl",
    )?;
    // A constrained or tool-using answer is never served from (or stored
    // in) the semantic cache: a similar free-text question's answer would
    // not follow the grammar. The exact cache keys on the grammar.
    let constrained = constraint.grammar.is_some() || constraint.tools.is_some();
    prepared.1.semantic = (!constrained).then_some(SemanticInput {
        route: "chat",
        messages,
    });
    prepared.1.template.grammar = constraint.grammar;
    prepared.2.tools = constraint.tools;
    prepared.2.prompt_tokens_saved = saved;
    prepared.2.dropped_turns = dropped;
    Ok(prepared)
}

fn top_logprobs(value: Option<i64>, max: i64) -> Result<usize, ApiError> {
    match value.unwrap_or(0) {
        n if (0..=max).contains(&n) => Ok(n as usize),
        n => Err(ApiError::invalid(
            "top_logprobs",
            format!("must be between 0 and {max}, got {n}"),
        )),
    }
}

#[allow(clippy::too_many_arguments)] // one call site per route; a struct would only rename them
fn prepare(
    model: Arc<ServedModel>,
    priority_header: PriorityHeader<'_>,
    fields: &SamplingFields,
    prompts: Vec<Vec<u32>>,
    logprobs: LogprobsWanted,
    requested_name: &str,
    id_prefix: &str,
) -> Result<Prepared, ApiError> {
    if prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    let priority = model
        .admission
        .effective_priority(requested_priority(fields, priority_header)?);
    let mode = model
        .tuner
        .observe(std::time::Instant::now(), || load_of(&model));
    let tuned = mode.map(|mode| model.tuner.apply(mode, fields));
    let fields = tuned.as_ref().unwrap_or(fields);
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let (template, n) = build_template(fields, priority, logprobs, longest, model.max_model_len)?;
    let stream = fields.stream.unwrap_or(false);
    let meta = ResponseMeta {
        id: response_id(id_prefix),
        created: unix_now(),
        model: requested_name.to_owned(),
        logprobs: logprobs != LogprobsWanted::No,
        include_usage: stream
            && fields
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        prompt_tokens_saved: None,
        dropped_turns: 0,
        tuning: mode.map(crate::tuning::Mode::label),
        echo: Vec::new(),
        choices_per_prompt: n,
        tools: None,
    };
    Ok((
        model,
        Job {
            prompts,
            n,
            template,
            logprobs,
            semantic: None,
            cache_scope: None,
        },
        meta,
        stream,
    ))
}

/// Running plus waiting sequences over the sequence limit.
fn load_of(model: &ServedModel) -> f64 {
    let s = model.engine.stats().snapshot();
    (s.running + s.waiting) as f64 / s.max_num_seqs.max(1) as f64
}

/// Validates a completion request for `model` into a job.
pub fn completion_job(
    model: Arc<ServedModel>,
    priority_header: PriorityHeader<'_>,
    request: &CompletionRequest,
    shaping: Shaping,
) -> Result<Prepared, ApiError> {
    let optimize = shaping.optimize_for(&model);
    let saved = std::cell::Cell::new(0usize);
    let encode = |text: &str| {
        let ids = |t: &str| {
            model
                .tokenizer
                .encode(t, true)
                .map_err(|e| ApiError::invalid("prompt", e.to_string()))
        };
        if !optimize {
            return ids(text);
        }
        let (before, after) = (ids(text)?, ids(&super::prompt::optimize(text))?);
        saved.set(saved.get() + before.len().saturating_sub(after.len()));
        Ok(after)
    };
    let prompts = match &request.prompt {
        Prompt::Text(t) => vec![encode(t)?],
        Prompt::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        Prompt::Tokens(ids) => vec![ids.clone()],
        Prompt::TokenLists(lists) => lists.clone(),
    };
    if prompts.is_empty() || prompts.len() > 64 {
        return Err(ApiError::invalid("prompt", "give between 1 and 64 prompts"));
    }
    let vocab = model.tokenizer.vocab_size() as u32;
    if let Some(bad) = prompts.iter().flatten().find(|&&id| id >= vocab) {
        return Err(ApiError::invalid(
            "prompt",
            format!("token id {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    let echo = request.echo == Some(true);
    let echo_texts: Vec<String> = match &request.prompt {
        _ if !echo => Vec::new(),
        // The text the model read (optimized, when that ran).
        Prompt::Text(t) if optimize => vec![super::prompt::optimize(t)],
        Prompt::Text(t) => vec![t.clone()],
        Prompt::Texts(ts) if optimize => ts.iter().map(|t| super::prompt::optimize(t)).collect(),
        Prompt::Texts(ts) => ts.clone(),
        Prompt::Tokens(_) | Prompt::TokenLists(_) => prompts
            .iter()
            .map(|ids| model.tokenizer.decode(ids, false).unwrap_or_default())
            .collect(),
    };
    // `max_tokens: 0` with echo scores the prompt and generates nothing.
    let asked = request
        .sampling
        .max_completion_tokens
        .or(request.sampling.max_tokens);
    let score_only = echo && asked == Some(0);
    let mut sampling = std::borrow::Cow::Borrowed(&request.sampling);
    if score_only {
        let fields = sampling.to_mut();
        (fields.max_tokens, fields.max_completion_tokens) = (Some(1), None);
    }
    let logprobs = match request.logprobs {
        None => LogprobsWanted::No,
        Some(n) => LogprobsWanted::Yes(top_logprobs(Some(n), 5).map_err(|_| {
            ApiError::invalid(
                "logprobs",
                format!("logprobs must be between 0 and 5, got {n}"),
            )
        })?),
    };
    let mut prepared = prepare(
        model,
        priority_header,
        &sampling,
        prompts,
        logprobs,
        &request.model,
        "cmpl",
    )?;
    if echo {
        let top = match logprobs {
            LogprobsWanted::Yes(n) => Some(n),
            LogprobsWanted::No => score_only.then_some(0),
        };
        prepared.1.template.prompt_logprobs = top;
        if score_only {
            prepared.1.template.max_tokens = 0;
        }
        prepared.2.echo = echo_texts;
        prepared.2.prompt_tokens_saved = optimize.then(|| saved.get());
        // Echo answers are about this exact prompt: no semantic neighbours.
        return Ok(prepared);
    }
    if let Prompt::Text(text) = &request.prompt {
        let content = if optimize {
            super::prompt::optimize(text)
        } else {
            text.clone()
        };
        prepared.1.semantic = Some(SemanticInput {
            route: "completion",
            messages: vec![ChatMessage {
                role: "user".into(),
                content,
                ..Default::default()
            }],
        });
    }
    prepared.2.prompt_tokens_saved = optimize.then(|| saved.get());
    Ok(prepared)
}
