//! The Responses event stream written from a chat stream's chunks.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{Shell, call_item, message_item, new_id, response_object, status_of, text_part};

/// The message item being streamed.
struct OpenMessage {
    output_index: usize,
    id: String,
    text: String,
}

/// A function call being streamed.
struct OpenCall {
    output_index: usize,
    id: String,
    call_id: String,
    name: String,
    arguments: String,
}

/// Writes the Responses event sequence for a chat stream: [`start`]
/// (`response.created`, `response.in_progress`), [`chunk`] per chat chunk
/// (items added, text and argument deltas), then [`finish`] (every item
/// done, `response.completed` or `response.incomplete`) or [`fail`]
/// (`error`, `response.failed`). Every event carries its `type` and a
/// `sequence_number` counting from 0.
///
/// [`start`]: EventWriter::start
/// [`chunk`]: EventWriter::chunk
/// [`finish`]: EventWriter::finish
/// [`fail`]: EventWriter::fail
pub struct EventWriter {
    shell: Shell,
    sequence: u64,
    done: Vec<Value>,
    message: Option<OpenMessage>,
    calls: BTreeMap<u64, OpenCall>,
    next_index: usize,
    finish_reason: Option<String>,
    usage: Option<Value>,
}

impl EventWriter {
    /// A writer for the response `shell`.
    pub fn new(shell: Shell) -> Self {
        Self {
            shell,
            sequence: 0,
            done: Vec::new(),
            message: None,
            calls: BTreeMap::new(),
            next_index: 0,
            finish_reason: None,
            usage: None,
        }
    }

    fn event(&mut self, kind: &str, mut body: Value) -> Value {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        body
    }

    /// `response.created` and `response.in_progress`.
    pub fn start(&mut self) -> Vec<Value> {
        let r = response_object(&self.shell, "in_progress", Vec::new(), None, None);
        vec![
            self.event("response.created", json!({"response": r.clone()})),
            self.event("response.in_progress", json!({"response": r})),
        ]
    }

    /// The events for one chat chunk (a parsed `data:` line).
    pub fn chunk(&mut self, chunk: &Value) -> Vec<Value> {
        let mut out = Vec::new();
        if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(usage.clone());
        }
        let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) else {
            return out;
        };
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.finish_reason = Some(reason.to_owned());
        }
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            self.text_delta(text, &mut out);
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            self.call_delta(call, &mut out);
        }
        out
    }

    fn text_delta(&mut self, text: &str, out: &mut Vec<Value>) {
        if self.message.is_none() {
            let id = new_id("msg");
            let output_index = self.next_index;
            self.next_index += 1;
            let item = json!({"type": "message", "id": id, "status": "in_progress",
                "role": "assistant", "content": []});
            out.push(self.event(
                "response.output_item.added",
                json!({"output_index": output_index, "item": item}),
            ));
            out.push(self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": output_index, "content_index": 0,
                    "part": text_part("")}),
            ));
            self.message = Some(OpenMessage {
                output_index,
                id,
                text: String::new(),
            });
        }
        let Some(m) = self.message.as_mut() else {
            return;
        };
        m.text.push_str(text);
        let body = json!({"item_id": m.id, "output_index": m.output_index,
            "content_index": 0, "delta": text, "logprobs": []});
        out.push(self.event("response.output_text.delta", body));
    }

    fn call_delta(&mut self, call: &Value, out: &mut Vec<Value>) {
        let index = call["index"].as_u64().unwrap_or(0);
        let f = &call["function"];
        if !self.calls.contains_key(&index) {
            let output_index = self.next_index;
            self.next_index += 1;
            let open = OpenCall {
                output_index,
                id: new_id("fc"),
                call_id: call["id"].as_str().unwrap_or_default().to_owned(),
                name: f["name"].as_str().unwrap_or_default().to_owned(),
                arguments: String::new(),
            };
            let item = call_item(&open.id, &open.call_id, &open.name, "", "in_progress");
            out.push(self.event(
                "response.output_item.added",
                json!({"output_index": output_index, "item": item}),
            ));
            self.calls.insert(index, open);
        }
        let Some(args) = f["arguments"].as_str().filter(|a| !a.is_empty()) else {
            return;
        };
        let Some(open) = self.calls.get_mut(&index) else {
            return;
        };
        open.arguments.push_str(args);
        let body = json!({"item_id": open.id, "output_index": open.output_index, "delta": args});
        out.push(self.event("response.function_call_arguments.delta", body));
    }

    /// Closes every item, then `response.completed` (or
    /// `response.incomplete` when cut by length).
    pub fn finish(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        let status = status_of(self.finish_reason.as_deref());
        if let Some(m) = self.message.take() {
            let (id, index) = (m.id.clone(), m.output_index);
            out.push(self.event(
                "response.output_text.done",
                json!({"item_id": id, "output_index": index, "content_index": 0,
                    "text": m.text, "logprobs": []}),
            ));
            out.push(self.event(
                "response.content_part.done",
                json!({"item_id": id, "output_index": index, "content_index": 0,
                    "part": text_part(&m.text)}),
            ));
            let item = message_item(&id, &m.text, status);
            out.push(self.event(
                "response.output_item.done",
                json!({"output_index": index, "item": item.clone()}),
            ));
            self.done.push(item);
        }
        for (_, c) in std::mem::take(&mut self.calls) {
            out.push(self.event(
                "response.function_call_arguments.done",
                json!({"item_id": c.id, "output_index": c.output_index, "arguments": c.arguments}),
            ));
            let item = call_item(&c.id, &c.call_id, &c.name, &c.arguments, "completed");
            out.push(self.event(
                "response.output_item.done",
                json!({"output_index": c.output_index, "item": item.clone()}),
            ));
            self.done.push(item);
        }
        let output = std::mem::take(&mut self.done);
        let r = response_object(&self.shell, status, output, self.usage.as_ref(), None);
        let kind = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        out.push(self.event(kind, json!({"response": r})));
        out
    }

    /// `error` and `response.failed` for an OpenAI error body met
    /// mid-stream.
    pub fn fail(&mut self, body: &Value) -> Vec<Value> {
        let e = &body["error"];
        let message = e["message"]
            .as_str()
            .unwrap_or("generation failed")
            .to_owned();
        let code = e["code"]
            .as_str()
            .or(e["type"].as_str())
            .unwrap_or("server_error")
            .to_owned();
        let error = self.event(
            "error",
            json!({"code": code, "message": message, "param": e["param"].clone()}),
        );
        let r = response_object(
            &self.shell,
            "failed",
            std::mem::take(&mut self.done),
            self.usage.as_ref(),
            Some(json!({"code": code, "message": message})),
        );
        vec![error, self.event("response.failed", json!({"response": r}))]
    }
}
