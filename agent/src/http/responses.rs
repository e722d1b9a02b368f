//! `POST /v1/responses`, stateless: the request is translated into a chat
//! completions body ([`crate::api::responses`]) and answered by the chat
//! route exactly as a chat request would be (here, by a peer, or by an
//! ensemble); the chat answer, JSON or SSE, is translated into a Response
//! object or the Responses event stream. Errors before the answer starts
//! keep their status and OpenAI body; an error mid-stream becomes `error`
//! and `response.failed` events.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{BoxStream, StreamExt};
use serde_json::Value;

use super::AppState;
use super::extract::OpenAiBytes;
use crate::api::ApiError;
use crate::api::extract::parse;
use crate::api::responses::{EventWriter, Shell, from_chat_completion, to_chat_body};
use crate::api::types::ChatCompletionRequest;

/// Most bytes of a whole (non-streamed) chat answer read for translation.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;
/// Most bytes one chat stream event may take before the stream is failed.
const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// The handler.
pub(super) async fn responses(
    State(state): State<AppState>,
    headers: HeaderMap,
    OpenAiBytes(body): OpenAiBytes,
) -> Response {
    let request: Value = match parse(&body) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let (chat, shell) = match to_chat_body(&request) {
        Ok(translated) => translated,
        Err(e) => return e.into_response(),
    };
    let chat = Bytes::from(chat.to_string());
    // The translation is checked against the chat request type before it
    // goes anywhere, so that a bad field fails here with its path.
    if let Err(e) = parse::<ChatCompletionRequest>(&chat) {
        return e.into_response();
    }
    let answer = super::chat::entry(state, headers, chat, crate::api::Kind::Chat).await;
    if answer.status() != StatusCode::OK {
        return answer;
    }
    let (parts, body) = answer.into_parts();
    let mut response = if shell.stream {
        stream(shell, body)
    } else {
        whole(shell, body).await
    };
    // Where the answer came from (x-weir-cache, x-weir-coalesced, ...).
    for (name, value) in &parts.headers {
        if name.as_str().starts_with("x-weir-") {
            response.headers_mut().insert(name.clone(), value.clone());
        }
    }
    response
}

/// A whole chat completion as a Response object.
async fn whole(shell: Shell, body: Body) -> Response {
    let bytes = match axum::body::to_bytes(body, MAX_ANSWER_BYTES).await {
        Ok(bytes) => bytes,
        Err(e) => return ApiError::Internal(format!("reading the answer: {e}")).into_response(),
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(chat) => Json(from_chat_completion(&shell, &chat)).into_response(),
        Err(e) => ApiError::Internal(format!("the chat answer is not JSON: {e}")).into_response(),
    }
}

/// Reading a chat SSE body and writing Responses events.
struct Translation {
    body: BoxStream<'static, Result<Bytes, axum::Error>>,
    buffer: Vec<u8>,
    writer: EventWriter,
    ready: VecDeque<Value>,
    over: bool,
}

impl Translation {
    /// Handles one SSE event block of the chat stream; true once the
    /// Responses stream has ended.
    fn block(&mut self, block: &[u8]) -> bool {
        let text = String::from_utf8_lossy(block);
        for data in text.lines().filter_map(|l| l.strip_prefix("data:")) {
            let data = data.trim_start();
            if data == "[DONE]" {
                self.ready.extend(self.writer.finish());
                return true;
            }
            match serde_json::from_str::<Value>(data) {
                Ok(v) if v.get("error").is_some() => {
                    self.ready.extend(self.writer.fail(&v));
                    return true;
                }
                Ok(chunk) => self.ready.extend(self.writer.chunk(&chunk)),
                Err(e) => return self.fail(&format!("a chat chunk is not JSON: {e}")),
            }
        }
        false
    }

    fn fail(&mut self, message: &str) -> bool {
        let body = ApiError::Internal(message.to_owned()).body();
        self.ready.extend(self.writer.fail(&body));
        true
    }

    /// Reads on until events are ready (or the stream is over).
    async fn next_events(&mut self) {
        while self.ready.is_empty() && !self.over {
            if let Some(end) = find_block_end(&self.buffer) {
                let block: Vec<u8> = self.buffer.drain(..end).collect();
                self.over = self.block(&block);
                continue;
            }
            if self.buffer.len() > MAX_EVENT_BYTES {
                self.over = self.fail("a chat stream event is too large");
                continue;
            }
            match self.body.next().await {
                Some(Ok(bytes)) => self.buffer.extend_from_slice(&bytes),
                Some(Err(e)) => self.over = self.fail(&format!("the chat stream failed: {e}")),
                None => self.over = self.fail("the chat stream ended before [DONE]"),
            }
        }
    }
}

/// The end (after the blank line) of the first whole SSE event in `buf`.
fn find_block_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A chat SSE body as the Responses event stream (`event:` the type,
/// `data:` the event).
fn stream(shell: Shell, body: Body) -> Response {
    let mut writer = EventWriter::new(shell);
    let ready: VecDeque<Value> = writer.start().into();
    let translation = Translation {
        body: body.into_data_stream().boxed(),
        buffer: Vec::new(),
        writer,
        ready,
        over: false,
    };
    let events = futures::stream::unfold(translation, |mut t| async move {
        t.next_events().await;
        let event = t.ready.pop_front()?;
        Some((event, t))
    })
    .map(|event| {
        let kind = event["type"].as_str().unwrap_or("message").to_owned();
        Ok::<_, Infallible>(SseEvent::default().event(kind).data(event.to_string()))
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-cache"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The Responses events written for a chat SSE body sent in `parts`.
    async fn translate(parts: &[&str]) -> Vec<Value> {
        let (_, shell) =
            to_chat_body(&json!({"model": "m", "input": "x", "stream": true})).unwrap();
        let chunks: Vec<Result<Bytes, std::io::Error>> = parts
            .iter()
            .map(|p| Ok(Bytes::from(p.to_string())))
            .collect();
        let body = Body::from_stream(futures::stream::iter(chunks));
        let response = stream(shell, body);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec())
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    fn kinds(events: &[Value]) -> Vec<&str> {
        events.iter().map(|e| e["type"].as_str().unwrap()).collect()
    }

    #[tokio::test]
    async fn chat_events_split_anywhere_translate_the_same() {
        let whole = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n\
                     : keep-alive\n\n\
                     data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\r\n\r\n\
                     data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n\
                     data: [DONE]\n\n";
        let at_once = translate(&[whole]).await;
        assert_eq!(at_once.last().unwrap()["type"], "response.completed");
        assert_eq!(
            at_once.last().unwrap()["response"]["usage"]["total_tokens"],
            5
        );
        let text: String = at_once
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .map(|e| e["delta"].as_str().unwrap())
            .collect();
        assert_eq!(text, "Hello");
        // Byte by byte: the same events (ids aside).
        let bytes: Vec<String> = whole.chars().map(String::from).collect();
        let parts: Vec<&str> = bytes.iter().map(String::as_str).collect();
        let split = translate(&parts).await;
        assert_eq!(kinds(&split), kinds(&at_once));
    }

    #[tokio::test]
    async fn an_error_or_an_early_end_fails_the_response() {
        let error = translate(&[
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n",
            "data: {\"error\":{\"message\":\"engine stopped\",\"type\":\"internal_error\",\"param\":null,\"code\":null}}\n\n",
            "data: [DONE]\n\n",
        ])
        .await;
        let k = kinds(&error);
        assert_eq!(&k[k.len() - 2..], ["error", "response.failed"]);
        assert_eq!(error[error.len() - 2]["message"], "engine stopped");
        let cut =
            translate(&["data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n"])
                .await;
        let last = cut.last().unwrap();
        assert_eq!(last["type"], "response.failed");
        assert!(
            last["response"]["error"]["message"]
                .as_str()
                .unwrap()
                .contains("[DONE]")
        );
    }
}
