//! Chat answers with tools rendered as OpenAI `tool_calls`: the message of
//! a whole response, and the SSE deltas of a stream.
//!
//! Streams follow OpenAI's delta shape: a call's first fragment carries
//! `index`, `id`, `type: "function"` and `function.name`, later ones only
//! `function.arguments` text. A named `tool_choice` streams its arguments
//! as the model writes them; `required` and `auto` answers that hold calls
//! are sent when the choice ends (the text must be parsed whole), while an
//! `auto` answer that is plainly text streams as content from the moment
//! it cannot be a call any more.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::response::sse::Event as SseEvent;
use futures::stream::{self, Stream, StreamExt};

use super::render::{json_event, merge_backlog, usage_chunk_for};
use crate::api::structured::{FunctionCallDelta, ToolCallDelta};
use crate::api::tools::{ParsedCall, ToolRender, call_id, may_be_call, to_tool_calls};
use crate::api::types::{AssistantMessage, ChatChunkChoice, ChatCompletionChunk, ChatDelta};
use crate::generate::{GenEvent, GenStream};
use crate::pipeline::validate::ResponseMeta;

/// The message and finish reason of one finished choice.
pub fn assistant_message(
    tools: Option<&ToolRender>,
    text: &str,
    finish: &str,
) -> (AssistantMessage, String) {
    let plain = || {
        let message = AssistantMessage {
            role: "assistant".into(),
            content: Some(text.to_owned()),
            tool_calls: None,
        };
        (message, finish.to_owned())
    };
    let Some(render) = tools else {
        return plain();
    };
    // A cut-off `required` or `auto` answer cannot be parsed; a cut-off
    // named call is still that call, with its arguments as far as they got.
    if finish != "stop" && !matches!(render, ToolRender::Named(_)) {
        return plain();
    }
    let parsed = render.parse(text);
    if parsed.calls.is_empty() {
        return plain();
    }
    let message = AssistantMessage {
        role: "assistant".into(),
        content: parsed.content,
        tool_calls: Some(to_tool_calls(&parsed.calls)),
    };
    (message, finish_reason(finish))
}

fn finish_reason(finish: &str) -> String {
    if finish == "stop" {
        "tool_calls".into()
    } else {
        finish.into()
    }
}

/// Where one choice of a stream stands.
enum ChoiceState {
    /// Named call: its id, and whether the first fragment went out.
    Named { id: String, started: bool },
    /// Held back until the choice ends (`required`, or `auto` that may
    /// still be a call).
    Held(String),
    /// `auto` answer that is plain text: streamed as content.
    Text,
}

struct ToolStream {
    meta: ResponseMeta,
    render: ToolRender,
    choices: HashMap<usize, (bool, ChoiceState)>,
}

impl ToolStream {
    fn chunk(
        &self,
        index: usize,
        first: bool,
        delta: ChatDelta,
        finish: Option<String>,
    ) -> SseEvent {
        let delta = ChatDelta {
            role: first.then(|| "assistant".to_owned()),
            ..delta
        };
        json_event(&ChatCompletionChunk {
            id: self.meta.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices: vec![ChatChunkChoice {
                index,
                delta,
                logprobs: None,
                finish_reason: finish,
            }],
            usage: None,
        })
    }

    /// Takes the choice's state, reporting whether its role went out yet.
    fn take(&mut self, index: usize) -> (bool, ChoiceState) {
        self.choices.remove(&index).unwrap_or_else(|| {
            let state = match &self.render {
                ToolRender::Named(_) => ChoiceState::Named {
                    id: call_id(),
                    started: false,
                },
                _ => ChoiceState::Held(String::new()),
            };
            (true, state)
        })
    }

    fn delta(&mut self, index: usize, text: String) -> Vec<SseEvent> {
        let (first, state) = self.take(index);
        let mut out = Vec::new();
        let state = match state {
            ChoiceState::Named { id, started } => {
                let name = match &self.render {
                    ToolRender::Named(n) => n.clone(),
                    _ => String::new(),
                };
                let call = ToolCallDelta {
                    index: 0,
                    id: (!started).then(|| id.clone()),
                    kind: (!started).then(|| "function".to_owned()),
                    function: FunctionCallDelta {
                        name: (!started).then_some(name),
                        arguments: Some(text),
                    },
                };
                out.push(self.chunk(index, first, tool_delta(vec![call]), None));
                ChoiceState::Named { id, started: true }
            }
            ChoiceState::Held(mut held) => {
                held.push_str(&text);
                let is_auto = matches!(self.render, ToolRender::Auto(_));
                if is_auto && !may_be_call(&held) {
                    out.push(self.chunk(index, first, content_delta(held), None));
                    ChoiceState::Text
                } else {
                    self.choices.insert(index, (first, ChoiceState::Held(held)));
                    return out;
                }
            }
            ChoiceState::Text => {
                out.push(self.chunk(index, first, content_delta(text), None));
                ChoiceState::Text
            }
        };
        self.choices.insert(index, (false, state));
        out
    }

    fn done(&mut self, index: usize, finish: String) -> Vec<SseEvent> {
        let (first, state) = self.take(index);
        match state {
            ChoiceState::Named { .. } => {
                vec![self.chunk(
                    index,
                    first,
                    ChatDelta::default(),
                    Some(finish_reason(&finish)),
                )]
            }
            ChoiceState::Text => vec![self.chunk(index, first, ChatDelta::default(), Some(finish))],
            ChoiceState::Held(text) => {
                let (message, reason) = assistant_message(Some(&self.render), &text, &finish);
                let mut out = Vec::new();
                let mut first = first;
                if let Some(content) = message.content.filter(|c| !c.is_empty()) {
                    out.push(self.chunk(index, first, content_delta(content), None));
                    first = false;
                }
                for (k, call) in message
                    .tool_calls
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                {
                    let parsed = ParsedCall {
                        name: call.function.name,
                        arguments: call.function.arguments,
                    };
                    let head = ToolCallDelta {
                        index: k,
                        id: Some(call.id),
                        kind: Some("function".into()),
                        function: FunctionCallDelta {
                            name: Some(parsed.name),
                            arguments: Some(String::new()),
                        },
                    };
                    let body = ToolCallDelta {
                        index: k,
                        function: FunctionCallDelta {
                            name: None,
                            arguments: Some(parsed.arguments),
                        },
                        ..Default::default()
                    };
                    out.push(self.chunk(index, first, tool_delta(vec![head]), None));
                    out.push(self.chunk(index, false, tool_delta(vec![body]), None));
                    first = false;
                }
                out.push(self.chunk(index, first, ChatDelta::default(), Some(reason)));
                out
            }
        }
    }
}

fn content_delta(text: String) -> ChatDelta {
    ChatDelta {
        content: Some(text),
        ..Default::default()
    }
}

fn tool_delta(calls: Vec<ToolCallDelta>) -> ChatDelta {
    ChatDelta {
        tool_calls: Some(calls),
        ..Default::default()
    }
}

/// Renders a chat stream whose answers may be tool calls.
pub fn sse(
    meta: ResponseMeta,
    render: ToolRender,
    events: GenStream,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let mut state = ToolStream {
        meta,
        render,
        choices: HashMap::new(),
    };
    merge_backlog(events).flat_map(move |event| {
        let out: Vec<SseEvent> = match event {
            GenEvent::Delta { index, text, .. } => state.delta(index, text),
            GenEvent::ChoiceDone {
                index,
                finish_reason,
            } => state.done(index, finish_reason),
            GenEvent::Done { usage } => {
                let mut v = Vec::new();
                if state.meta.include_usage {
                    v.push(usage_chunk_for(&state.meta, usage));
                }
                v.push(SseEvent::default().data("[DONE]"));
                v
            }
            GenEvent::Error { body, .. } => vec![
                SseEvent::default().data(body.to_string()),
                SseEvent::default().data("[DONE]"),
            ],
            // Chat does not score prompts (that is `echo` on completions).
            GenEvent::PromptLogprobs { .. } => Vec::new(),
        };
        stream::iter(out.into_iter().map(Ok))
    })
}
