//! One generation job: OpenAI sampling fields turned into engine requests
//! (one per prompt and choice), submitted together, and their outputs merged
//! into one stream of [`GenEvent`]s that both the JSON and the SSE renderers
//! consume. Dropping the stream drops the engine streams, which aborts the
//! requests and frees their KV blocks.

use std::pin::Pin;
use std::sync::Arc;

use futures::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use weir_engine::engine::{Completion, EngineHandle, Event, GenerateRequest, SubmitError};
use weir_engine::sampler::{LogprobsMode, SamplingParams};
use weir_engine::scheduler::Priority;
use weir_engine::tokenizer::TextTokenizer;

use crate::api::ApiError;
use crate::api::types::{SamplingFields, Usage};

/// Default `max_tokens` when the request names none: the rest of the context,
/// capped so that a forgotten limit does not hold a slot for minutes.
pub const DEFAULT_MAX_TOKENS: usize = 1024;
/// Most choices per request.
const MAX_N: usize = 16;

/// One token's log probability with alternatives, as text.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenLogprob {
    /// Token text.
    pub token: String,
    /// Log probability.
    pub logprob: f32,
    /// Alternatives, most likely first.
    pub top: Vec<(String, f32)>,
}

/// One prompt token's log probability (`None` for the first token) with
/// alternatives, as text: what `echo` with `logprobs` returns.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PromptLogprob {
    /// Token text.
    pub token: String,
    /// Log probability given the tokens before it.
    pub logprob: Option<f32>,
    /// Alternatives, most likely first.
    pub top: Vec<(String, f32)>,
}

/// What a generation produces, in order. Every choice ends with
/// `ChoiceDone`; the whole job ends with `Done` or `Error`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum GenEvent {
    /// The log probabilities of a choice's prompt, when asked for (before
    /// its first delta).
    PromptLogprobs {
        /// Choice index.
        index: usize,
        /// One per prompt token.
        logprobs: Vec<PromptLogprob>,
    },
    /// New text for a choice.
    Delta {
        /// Choice index.
        index: usize,
        /// The text.
        text: String,
        /// Log probabilities of the tokens behind the text, when asked for.
        logprobs: Vec<TokenLogprob>,
    },
    /// A choice ended.
    ChoiceDone {
        /// Choice index.
        index: usize,
        /// `stop` or `length`.
        finish_reason: String,
    },
    /// Every choice ended.
    Done {
        /// Token counts.
        usage: Usage,
    },
    /// The job failed; nothing follows.
    Error {
        /// HTTP status the error maps to.
        status: u16,
        /// OpenAI error body.
        body: serde_json::Value,
    },
}

impl GenEvent {
    /// The error event for `err`.
    pub fn error(err: &ApiError) -> Self {
        Self::Error {
            status: err.status().as_u16(),
            body: err.body(),
        }
    }
}

/// A stream of generation events.
pub type GenStream = Pin<Box<dyn Stream<Item = GenEvent> + Send>>;

/// Which log probabilities the client wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogprobsWanted {
    /// None.
    No,
    /// The sampled token's and this many alternatives.
    Yes(usize),
}

/// A validated job: prompts (token ids), choices per prompt, engine settings.
#[derive(Clone, Debug)]
pub struct Job {
    /// Token ids of each prompt.
    pub prompts: Vec<Vec<u32>>,
    /// Choices per prompt.
    pub n: usize,
    /// Engine request template (prompt is replaced per prompt).
    pub template: GenerateRequest,
    /// Log probabilities to return.
    pub logprobs: LogprobsWanted,
    /// The messages, for the semantic cache (single-prompt requests only).
    pub semantic: Option<SemanticInput>,
    /// The tenant whose cache entries (and shared generations) this job
    /// may use; `None` is the shared pool.
    pub cache_scope: Option<std::sync::Arc<str>>,
}

/// What the semantic cache compares: the route and the conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct SemanticInput {
    /// `chat` or `completion`: answers are never shared across routes.
    pub route: &'static str,
    /// The conversation (a completion prompt is one user message).
    pub messages: Vec<weir_engine::tokenizer::ChatMessage>,
}

fn check_range(name: &str, value: Option<f32>, lo: f32, hi: f32) -> Result<(), ApiError> {
    match value {
        Some(v) if !(lo..=hi).contains(&v) || v.is_nan() => Err(ApiError::invalid(
            name,
            format!("{name} must be between {lo} and {hi}, got {v}"),
        )),
        _ => Ok(()),
    }
}

/// Parses `priority` names (case-insensitive).
pub fn parse_priority(name: &str) -> Result<Priority, ApiError> {
    match name.to_ascii_lowercase().as_str() {
        "critical" => Ok(Priority::Critical),
        "high" => Ok(Priority::High),
        "normal" | "default" => Ok(Priority::Normal),
        "low" => Ok(Priority::Low),
        "background" | "batch" => Ok(Priority::Background),
        other => Err(ApiError::invalid(
            "priority",
            format!("unknown priority `{other}`; use critical, high, normal, low or background"),
        )),
    }
}

/// Turns OpenAI sampling fields into an engine request template.
pub fn build_template(
    f: &SamplingFields,
    priority: Priority,
    logprobs: LogprobsWanted,
    longest_prompt: usize,
    max_model_len: usize,
) -> Result<(GenerateRequest, usize), ApiError> {
    check_range("temperature", f.temperature, 0.0, 2.0)?;
    check_range("top_p", f.top_p, f32::MIN_POSITIVE, 1.0)?;
    check_range("min_p", f.min_p, 0.0, 1.0)?;
    check_range("frequency_penalty", f.frequency_penalty, -2.0, 2.0)?;
    check_range("presence_penalty", f.presence_penalty, -2.0, 2.0)?;
    check_range("repetition_penalty", f.repetition_penalty, 0.01, 10.0)?;
    let n = match f.n {
        None => 1,
        Some(n) if (1..=MAX_N as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                "n",
                format!("n must be between 1 and {MAX_N}, got {n}"),
            ));
        }
    };
    if longest_prompt >= max_model_len {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the prompt has {longest_prompt} tokens; this model's maximum context length is {max_model_len} tokens"
            ),
        ));
    }
    let room = max_model_len - longest_prompt;
    let max_tokens = match f.max_completion_tokens.or(f.max_tokens) {
        None => room.min(DEFAULT_MAX_TOKENS),
        Some(m) if m >= 1 && (m as u64) <= room as u64 => m as usize,
        Some(m) if m >= 1 => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "max_tokens is {m}, but the prompt of {longest_prompt} tokens leaves room for {room} in a context of {max_model_len}"
                ),
            ));
        }
        Some(m) => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("max_tokens must be at least 1, got {m}"),
            ));
        }
    };
    let stop = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > 16 || stop.iter().any(|s| s.len() > 256) {
        return Err(ApiError::invalid(
            "stop",
            "at most 16 stop strings of at most 256 bytes",
        ));
    }
    let mut logit_bias = Vec::new();
    for (token, bias) in f.logit_bias.iter().flatten() {
        let id = token
            .parse::<u32>()
            .map_err(|_| ApiError::invalid("logit_bias", format!("`{token}` is not a token id")))?;
        logit_bias.push((id, *bias));
    }
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be -1, 0 or positive, got {k}"),
            ));
        }
    };
    let sampling = SamplingParams {
        temperature: f.temperature.unwrap_or(1.0),
        top_k,
        top_p: f.top_p.unwrap_or(1.0),
        min_p: f.min_p.unwrap_or(0.0),
        repetition_penalty: f.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
        presence_penalty: f.presence_penalty.unwrap_or(0.0),
        logit_bias,
        allowed_token_ids: None,
        seed: f.seed.map(|s| s as u64),
        logprobs: match logprobs {
            LogprobsWanted::No => None,
            LogprobsWanted::Yes(n) => Some(n),
        },
        logprobs_mode: LogprobsMode::Processed,
    };
    sampling.validate().map_err(|e| ApiError::InvalidRequest {
        message: e.to_string(),
        param: None,
    })?;
    let template = GenerateRequest {
        prompt: Vec::new(),
        sampling,
        max_tokens,
        prompt_logprobs: None,
        stop,
        stop_token_ids: f.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: f.ignore_eos.unwrap_or(false),
        priority,
        grammar: None,
    };
    Ok((template, n))
}

/// Whether the job's output is fixed by its inputs (cacheable by default).
pub fn is_deterministic(job: &Job) -> bool {
    job.template.sampling.is_greedy() || job.template.sampling.seed.is_some()
}

/// Submits every choice of `job` and merges their outputs.
pub fn run(
    engine: &EngineHandle,
    tokenizer: Arc<TextTokenizer>,
    job: &Job,
) -> Result<GenStream, ApiError> {
    let mut streams = Vec::new();
    let mut index = 0;
    for prompt in &job.prompts {
        for choice in 0..job.n {
            let mut request = job.template.clone();
            request.prompt = prompt.clone();
            // Choices of one request must differ even with a seed.
            if let Some(seed) = request.sampling.seed.as_mut() {
                *seed = seed.wrapping_add(choice as u64);
            }
            let stream = engine.submit(request).map_err(|e| match e {
                SubmitError::Overloaded => ApiError::Overloaded {
                    message: "the engine queue is full; retry shortly".into(),
                    retry_after: std::time::Duration::from_secs(1),
                },
                SubmitError::Stopped => ApiError::Unavailable {
                    message: "the engine has stopped".into(),
                    retry_after: std::time::Duration::from_secs(5),
                },
                SubmitError::Invalid(e) => ApiError::InvalidRequest {
                    message: e.to_string(),
                    param: None,
                },
            })?;
            streams.push(choice_stream(
                index,
                choice == 0,
                stream,
                tokenizer.clone(),
                job.logprobs,
            ));
            index += 1;
        }
    }
    let merged = stream::select_all(streams);
    let total = index;
    let summed = merged.scan(
        (0usize, Usage::default(), false),
        move |(done, usage, failed), item| {
            let out = match item {
                ChoiceItem::Event(e) => {
                    if let GenEvent::Error { .. } = e {
                        *failed = true;
                    }
                    vec![e]
                }
                ChoiceItem::Finished {
                    index,
                    reason,
                    usage: u,
                    first_of_prompt,
                } => {
                    *done += 1;
                    if first_of_prompt {
                        usage.prompt_tokens += u.prompt_tokens;
                        let cached = usage.prompt_tokens_details.get_or_insert_default();
                        cached.cached_tokens += u.cached_tokens;
                    }
                    usage.completion_tokens += u.completion_tokens;
                    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
                    let mut v = vec![GenEvent::ChoiceDone {
                        index,
                        finish_reason: reason.into(),
                    }];
                    if *done == total {
                        v.push(GenEvent::Done { usage: *usage });
                    }
                    v
                }
            };
            let stop = *failed;
            futures::future::ready(if stop && out.is_empty() {
                None
            } else {
                Some(out)
            })
        },
    );
    Ok(Box::pin(summed.flat_map(stream::iter)))
}

enum ChoiceItem {
    Event(GenEvent),
    Finished {
        index: usize,
        reason: &'static str,
        usage: weir_engine::engine::Usage,
        first_of_prompt: bool,
    },
}

enum ChoiceState {
    Streaming(weir_engine::engine::ResponseStream),
    Ending(ChoiceItem),
    Over,
}

fn choice_stream(
    index: usize,
    first_of_prompt: bool,
    stream: weir_engine::engine::ResponseStream,
    tokenizer: Arc<TextTokenizer>,
    logprobs: LogprobsWanted,
) -> Pin<Box<dyn Stream<Item = ChoiceItem> + Send>> {
    Box::pin(stream::unfold(
        ChoiceState::Streaming(stream),
        move |state| {
            let tokenizer = tokenizer.clone();
            async move {
                let mut stream = match state {
                    ChoiceState::Streaming(stream) => stream,
                    ChoiceState::Ending(item) => return Some((item, ChoiceState::Over)),
                    ChoiceState::Over => return None,
                };
                let item = match stream.recv().await {
                    Some(Event::PromptLogprobs(scores)) => {
                        let logprobs = scores
                            .iter()
                            .map(|s| PromptLogprob {
                                token: token_text(&tokenizer, s.token),
                                logprob: s.logprob,
                                top: s
                                    .top_logprobs
                                    .iter()
                                    .map(|(id, p)| (token_text(&tokenizer, *id), *p))
                                    .collect(),
                            })
                            .collect();
                        let event = GenEvent::PromptLogprobs { index, logprobs };
                        return Some((ChoiceItem::Event(event), ChoiceState::Streaming(stream)));
                    }
                    Some(Event::Token(t)) => {
                        let logprobs = match (logprobs, t.logprob) {
                            (LogprobsWanted::Yes(_), Some(lp)) => vec![TokenLogprob {
                                token: token_text(&tokenizer, t.token),
                                logprob: lp,
                                top: t
                                    .top_logprobs
                                    .iter()
                                    .map(|(id, p)| (token_text(&tokenizer, *id), *p))
                                    .collect(),
                            }],
                            _ => Vec::new(),
                        };
                        let delta = GenEvent::Delta {
                            index,
                            text: t.text,
                            logprobs,
                        };
                        return Some((ChoiceItem::Event(delta), ChoiceState::Streaming(stream)));
                    }
                    Some(Event::Finished {
                        text,
                        reason,
                        usage,
                    }) => {
                        let reason = match reason {
                            Completion::Stop => "stop",
                            Completion::Length => "length",
                        };
                        let end = ChoiceItem::Finished {
                            index,
                            reason,
                            usage,
                            first_of_prompt,
                        };
                        if text.is_empty() {
                            end
                        } else {
                            // Text held back as a possible stop string comes first.
                            let delta = GenEvent::Delta {
                                index,
                                text,
                                logprobs: Vec::new(),
                            };
                            return Some((ChoiceItem::Event(delta), ChoiceState::Ending(end)));
                        }
                    }
                    Some(Event::Failed(message)) => {
                        ChoiceItem::Event(GenEvent::error(&ApiError::Internal(message)))
                    }
                    None => ChoiceItem::Event(GenEvent::error(&ApiError::Internal(
                        "the engine stopped during generation".into(),
                    ))),
                };
                Some((item, ChoiceState::Over))
            }
        },
    ))
}

/// Token text for log probabilities (special tokens included).
fn token_text(tokenizer: &TextTokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

/// A finished generation: what the response cache stores and replays.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Generation {
    /// Per choice: text, finish reason, token log probabilities.
    pub choices: Vec<ChoiceResult>,
    /// Token counts.
    pub usage: Usage,
}

/// One finished choice.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ChoiceResult {
    /// The text.
    pub text: String,
    /// `stop` or `length`.
    pub finish_reason: String,
    /// Per-token log probabilities, when asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// The prompt's log probabilities, when asked for (`echo`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_logprobs: Vec<PromptLogprob>,
}

/// Collects a stream into a [`Generation`], or the error it ended with.
pub async fn collect(mut events: GenStream) -> Result<Generation, (u16, serde_json::Value)> {
    let mut generation = Generation::default();
    while let Some(event) = events.next().await {
        match event {
            GenEvent::PromptLogprobs { index, logprobs } => {
                choice_mut(&mut generation, index).prompt_logprobs = logprobs;
            }
            GenEvent::Delta {
                index,
                text,
                logprobs,
            } => {
                let choice = choice_mut(&mut generation, index);
                choice.text.push_str(&text);
                choice.logprobs.extend(logprobs);
            }
            GenEvent::ChoiceDone {
                index,
                finish_reason,
            } => {
                choice_mut(&mut generation, index).finish_reason = finish_reason;
            }
            GenEvent::Done { usage } => {
                generation.usage = usage;
                return Ok(generation);
            }
            GenEvent::Error { status, body } => return Err((status, body)),
        }
    }
    Err((
        500,
        serde_json::json!({"error": {"message": "generation ended early", "type": "internal_error"}}),
    ))
}

fn choice_mut(g: &mut Generation, index: usize) -> &mut ChoiceResult {
    if g.choices.len() <= index {
        g.choices.resize_with(index + 1, ChoiceResult::default);
    }
    &mut g.choices[index]
}

/// Replays a stored generation as events (one delta per choice).
pub fn replay(generation: &Generation) -> GenStream {
    let mut events = Vec::new();
    for (index, c) in generation.choices.iter().enumerate() {
        if !c.prompt_logprobs.is_empty() {
            events.push(GenEvent::PromptLogprobs {
                index,
                logprobs: c.prompt_logprobs.clone(),
            });
        }
        events.push(GenEvent::Delta {
            index,
            text: c.text.clone(),
            logprobs: c.logprobs.clone(),
        });
        events.push(GenEvent::ChoiceDone {
            index,
            finish_reason: c.finish_reason.clone(),
        });
    }
    events.push(GenEvent::Done {
        usage: generation.usage,
    });
    Box::pin(stream::iter(events))
}
