//! Rendering [`GenEvent`]s as OpenAI responses: a whole JSON body, or a
//! server-sent event stream of chunks ending in `data: [DONE]`, with an
//! error event in OpenAI's shape when generation fails mid-stream.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::response::sse::Event as SseEvent;
use futures::FutureExt;
use futures::stream::{self, Stream, StreamExt};
use serde::Serialize;

use super::tool_stream::assistant_message;
use crate::api::types::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta, ChoiceLogprobs,
    Completion, CompletionChoice, CompletionLogprobs, TokenLogprob as ChatTokenLogprob, TopLogprob,
    Usage,
};
use crate::generate::{GenEvent, GenStream, Generation, PromptLogprob, TokenLogprob};
use crate::pipeline::validate::ResponseMeta;

fn chat_logprobs(lps: &[TokenLogprob]) -> ChoiceLogprobs {
    ChoiceLogprobs {
        content: lps
            .iter()
            .map(|t| ChatTokenLogprob {
                token: t.token.clone(),
                logprob: t.logprob,
                bytes: t.token.as_bytes().to_vec(),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|(token, logprob)| TopLogprob {
                        token: token.clone(),
                        logprob: *logprob,
                        bytes: token.as_bytes().to_vec(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Legacy log probabilities of `prompt` (with `echo`; the first token's
/// are null, nothing precedes it) then of `lps`, offsets counted over the
/// token texts from 0.
fn legacy_logprobs(prompt: &[PromptLogprob], lps: &[TokenLogprob]) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = 0;
    let prompt = prompt.iter().map(|p| (&p.token, p.logprob, &p.top));
    let generated = lps.iter().map(|t| (&t.token, Some(t.logprob), &t.top));
    for (token, logprob, top) in prompt.chain(generated) {
        out.tokens.push(token.clone());
        out.token_logprobs.push(logprob);
        out.top_logprobs
            .push(logprob.map(|_| top.iter().cloned().collect::<BTreeMap<_, _>>()));
        out.text_offset.push(offset);
        offset += token.len();
    }
    out
}

/// The prompt text `echo` puts before choice `index`'s text, if asked.
fn echo_of(meta: &ResponseMeta, index: usize) -> Option<&str> {
    meta.echo
        .get(index / meta.choices_per_prompt.max(1))
        .map(String::as_str)
}

/// The chat response body for a finished generation.
pub fn chat_body(meta: &ResponseMeta, g: &Generation) -> ChatCompletion {
    ChatCompletion {
        id: meta.id.clone(),
        object: "chat.completion".into(),
        created: meta.created,
        model: meta.model.clone(),
        choices: g
            .choices
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let (message, finish_reason) =
                    assistant_message(meta.tools.as_ref(), &c.text, &c.finish_reason);
                ChatChoice {
                    index,
                    message,
                    logprobs: meta.logprobs.then(|| chat_logprobs(&c.logprobs)),
                    finish_reason,
                }
            })
            .collect(),
        usage: usage_of(meta, g.usage),
    }
}

/// The completion response body for a finished generation.
pub fn completion_body(meta: &ResponseMeta, g: &Generation) -> Completion {
    Completion {
        id: meta.id.clone(),
        object: "text_completion".into(),
        created: meta.created,
        model: meta.model.clone(),
        choices: g
            .choices
            .iter()
            .enumerate()
            .map(|(index, c)| CompletionChoice {
                index,
                text: format!("{}{}", echo_of(meta, index).unwrap_or(""), c.text),
                logprobs: meta
                    .logprobs
                    .then(|| legacy_logprobs(&c.prompt_logprobs, &c.logprobs)),
                finish_reason: Some(c.finish_reason.clone()),
            })
            .collect(),
        usage: Some(usage_of(meta, g.usage)),
    }
}

pub(super) fn json_event<T: Serialize>(value: &T) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(value).unwrap_or_else(|e| {
        format!(
            "{{\"error\":{{\"message\":\"serializing a chunk: {e}\",\"type\":\"internal_error\"}}}}"
        )
    }))
}

/// Which response shape a stream renders: that of its route.
pub use crate::api::Kind as Shape;

/// Most text one merged delta carries.
pub const MERGE_MAX_BYTES: usize = 16 * 1024;

/// Merges the deltas already waiting when the stream is polled: a client
/// that reads slowly (its socket not draining, so the body is polled
/// rarely) gets the backlog of one choice in one chunk of at most
/// [`MERGE_MAX_BYTES`], while a client that keeps up gets every delta as
/// it comes. Nothing waits to be merged, nothing is reordered, and the
/// text is unchanged.
pub fn merge_backlog(events: GenStream) -> GenStream {
    let state = Backlog {
        events,
        pending: None,
        ended: false,
    };
    Box::pin(futures::stream::unfold(state, |mut b| async move {
        let first = match b.pending.take() {
            Some(event) => event,
            None if b.ended => return None,
            None => b.events.next().await?,
        };
        let GenEvent::Delta {
            index,
            mut text,
            mut logprobs,
        } = first
        else {
            return Some((first, b));
        };
        while text.len() < MERGE_MAX_BYTES {
            match b.events.next().now_or_never() {
                Some(Some(GenEvent::Delta {
                    index: i,
                    text: more,
                    logprobs: more_logprobs,
                })) if i == index && text.len() + more.len() <= MERGE_MAX_BYTES => {
                    text.push_str(&more);
                    logprobs.extend(more_logprobs);
                }
                Some(Some(other)) => {
                    b.pending = Some(other);
                    break;
                }
                Some(None) => {
                    b.ended = true;
                    break;
                }
                None => break,
            }
        }
        let merged = GenEvent::Delta {
            index,
            text,
            logprobs,
        };
        Some((merged, b))
    }))
}

/// The state of [`merge_backlog`]: the events, one read ahead that did
/// not merge, and whether the events have ended.
struct Backlog {
    events: GenStream,
    pending: Option<GenEvent>,
    ended: bool,
}

/// Renders events as SSE chunks, ending with `[DONE]`; deltas waiting
/// behind a slow client are merged ([`merge_backlog`]).
pub fn sse(
    meta: ResponseMeta,
    shape: Shape,
    events: GenStream,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let mut started = std::collections::HashSet::new();
    merge_backlog(events).flat_map(move |event| {
        let out: Vec<SseEvent> = match event {
            // With echo, a choice's first chunk carries its prompt (and the
            // prompt's log probabilities, which come first when asked for).
            GenEvent::PromptLogprobs { index, logprobs } => {
                match echo_of(&meta, index).filter(|_| started.insert(index)) {
                    Some(text) => vec![echo_chunk(&meta, index, text, &logprobs)],
                    None => Vec::new(),
                }
            }
            GenEvent::Delta {
                index,
                text,
                logprobs,
            } => {
                let first = started.insert(index);
                let mut v = first_echo(&meta, index, first);
                v.push(delta_chunk(
                    &meta, shape, index, first, text, &logprobs, None,
                ));
                v
            }
            GenEvent::ChoiceDone {
                index,
                finish_reason,
            } => {
                let first = started.insert(index);
                let mut v = first_echo(&meta, index, first);
                v.push(delta_chunk(
                    &meta,
                    shape,
                    index,
                    first,
                    String::new(),
                    &[],
                    Some(finish_reason),
                ));
                v
            }
            GenEvent::Done { usage } => {
                let mut v = Vec::new();
                if meta.include_usage {
                    v.push(usage_chunk(&meta, shape, usage));
                }
                v.push(SseEvent::default().data("[DONE]"));
                v
            }
            GenEvent::Error { body, .. } => {
                vec![
                    SseEvent::default().data(body.to_string()),
                    SseEvent::default().data("[DONE]"),
                ]
            }
        };
        stream::iter(out.into_iter().map(Ok))
    })
}

/// The echo chunk of a choice that starts without prompt log probabilities.
fn first_echo(meta: &ResponseMeta, index: usize, first: bool) -> Vec<SseEvent> {
    match echo_of(meta, index).filter(|_| first) {
        Some(text) => vec![echo_chunk(meta, index, text, &[])],
        None => Vec::new(),
    }
}

/// A completion chunk with the prompt `text` (and its log probabilities).
fn echo_chunk(
    meta: &ResponseMeta,
    index: usize,
    text: &str,
    prompt_logprobs: &[PromptLogprob],
) -> SseEvent {
    json_event(&Completion {
        id: meta.id.clone(),
        object: "text_completion".into(),
        created: meta.created,
        model: meta.model.clone(),
        choices: vec![CompletionChoice {
            index,
            text: text.to_owned(),
            logprobs: meta.logprobs.then(|| legacy_logprobs(prompt_logprobs, &[])),
            finish_reason: None,
        }],
        usage: None,
    })
}

fn delta_chunk(
    meta: &ResponseMeta,
    shape: Shape,
    index: usize,
    first: bool,
    text: String,
    logprobs: &[TokenLogprob],
    finish_reason: Option<String>,
) -> SseEvent {
    match shape {
        Shape::Chat => json_event(&ChatCompletionChunk {
            id: meta.id.clone(),
            object: "chat.completion.chunk".into(),
            created: meta.created,
            model: meta.model.clone(),
            choices: vec![ChatChunkChoice {
                index,
                delta: ChatDelta {
                    role: first.then(|| "assistant".to_owned()),
                    content: (!text.is_empty() || finish_reason.is_none()).then_some(text),
                    tool_calls: None,
                },
                logprobs: (meta.logprobs && !logprobs.is_empty()).then(|| chat_logprobs(logprobs)),
                finish_reason,
            }],
            usage: None,
        }),
        Shape::Completion => json_event(&Completion {
            id: meta.id.clone(),
            object: "text_completion".into(),
            created: meta.created,
            model: meta.model.clone(),
            choices: vec![CompletionChoice {
                index,
                text,
                logprobs: (meta.logprobs && !logprobs.is_empty())
                    .then(|| legacy_logprobs(&[], logprobs)),
                finish_reason,
            }],
            usage: None,
        }),
    }
}

/// The usage to report: the engine's counts and what the prompt
/// optimization saved for this request.
fn usage_of(meta: &ResponseMeta, usage: Usage) -> Usage {
    Usage {
        prompt_tokens_saved: meta.prompt_tokens_saved,
        ..usage
    }
}

/// The usage chunk of a chat stream.
pub(super) fn usage_chunk_for(meta: &ResponseMeta, usage: Usage) -> SseEvent {
    usage_chunk(meta, Shape::Chat, usage)
}

fn usage_chunk(meta: &ResponseMeta, shape: Shape, usage: Usage) -> SseEvent {
    match shape {
        Shape::Chat => json_event(&ChatCompletionChunk {
            id: meta.id.clone(),
            object: "chat.completion.chunk".into(),
            created: meta.created,
            model: meta.model.clone(),
            choices: Vec::new(),
            usage: Some(usage_of(meta, usage)),
        }),
        Shape::Completion => json_event(&Completion {
            id: meta.id.clone(),
            object: "text_completion".into(),
            created: meta.created,
            model: meta.model.clone(),
            choices: Vec::new(),
            usage: Some(usage_of(meta, usage)),
        }),
    }
}
