//! The stateless Responses API (`POST /v1/responses`) as a translation of
//! chat completions, on JSON in OpenAI's shapes both ways: a Responses
//! request becomes a chat-completions body ([`to_chat_body`]); a chat
//! completion becomes a Response object ([`from_chat_completion`]); a chat
//! stream's chunks become the Responses event sequence ([`EventWriter`],
//! in `stream.rs`).
//! Working on the public JSON shapes (not on the engine's events) keeps
//! the translation independent of how the chat route makes its answer:
//! here, on a peer, or at an ensemble's external member.
//!
//! Nothing is stored: `store: true`, `previous_response_id`, `background`,
//! `conversation` and the built-in tools are refused with a 400 naming the
//! field. OpenAI's default for `store` is true; an absent `store` is taken
//! as stateless, only an explicit `true` is refused.

mod stream;

pub use stream::EventWriter;

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value, json};

use super::ApiError;

/// Fields read and translated.
const SUPPORTED: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "text",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "stream",
    "stream_options",
    "store",
    "metadata",
    "user",
    "truncation",
    "include",
    "reasoning",
    "service_tier",
    "background",
    "previous_response_id",
    "conversation",
];

/// Chat-completions extensions passed through unchanged (vLLM's and
/// Weir's sampling fields).
const PASSED: &[&str] = &[
    "seed",
    "top_k",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "stop",
    "priority",
    "ignore_eos",
];

/// What the Response object repeats of its request, and its identity.
#[derive(Clone, Debug, PartialEq)]
pub struct Shell {
    /// `resp_…`.
    pub id: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The model as requested.
    pub model: String,
    /// Whether the answer is streamed.
    pub stream: bool,
    /// The request fields a Response repeats (instructions, limits,
    /// sampling, text format, tools, tool choice, metadata).
    pub echo: Map<String, Value>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A new id with `prefix` (`resp`, `msg`, `fc`), unique in this process.
fn new_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}_{:x}{:08x}", unix_now(), n)
}

fn refuse(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(field, message)
}

/// Refuses what a stateless server cannot do, and fields it does not know.
fn check_fields(request: &Map<String, Value>) -> Result<(), ApiError> {
    for (name, value) in request {
        if !SUPPORTED.contains(&name.as_str()) && !PASSED.contains(&name.as_str()) {
            return Err(refuse(
                name,
                format!("unknown or unsupported parameter `{name}`"),
            ));
        }
        let set = !value.is_null();
        let refused = match name.as_str() {
            "store" => value == &Value::Bool(true),
            "background" => value == &Value::Bool(true),
            "previous_response_id" | "conversation" | "reasoning" => set,
            "include" => value.as_array().is_some_and(|a| !a.is_empty()),
            "truncation" => set && value != "disabled",
            _ => false,
        };
        if refused {
            let why = match name.as_str() {
                "store" => "responses are not stored here; send `store: false` (or leave it out)",
                "previous_response_id" | "conversation" => {
                    "responses are not stored here; send the whole conversation in `input`"
                }
                "background" => "background responses are not supported",
                "reasoning" => "reasoning options are not supported",
                "include" => "no extra output can be included",
                _ => "only `truncation: \"disabled\"` is supported",
            };
            return Err(refuse(name, why));
        }
    }
    Ok(())
}

/// Text of a content value: a string, or `input_text`/`output_text`/`text`
/// parts joined; `field` names it in errors.
fn content_text(content: &Value, field: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, part.get("text").and_then(Value::as_str)) {
                    ("input_text" | "output_text" | "text", Some(t)) => text.push_str(t),
                    _ => {
                        return Err(refuse(
                            &format!("{field}[{j}]"),
                            format!("content parts of type `{kind}` are not supported"),
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(refuse(
            field,
            "content must be a string or a list of text parts",
        )),
    }
}

/// A string field of an input item, or a 400 naming it.
fn item_str<'a>(item: &'a Value, key: &str, field: &str) -> Result<&'a str, ApiError> {
    item.get(key).and_then(Value::as_str).ok_or_else(|| {
        refuse(
            &format!("{field}.{key}"),
            format!("`{key}` must be a string"),
        )
    })
}

/// The chat messages of `input` (after `instructions`, if any).
fn messages(input: &Value, instructions: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    match instructions {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => out.push(json!({"role": "system", "content": s})),
        Some(_) => return Err(refuse("instructions", "instructions must be a string")),
    }
    let items = match input {
        Value::String(s) => {
            out.push(json!({"role": "user", "content": s}));
            return Ok(out);
        }
        Value::Array(items) => items,
        _ => {
            return Err(refuse("input", "input must be a string or a list of items"));
        }
    };
    for (i, item) in items.iter().enumerate() {
        let field = format!("input[{i}]");
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        match kind {
            "message" => {
                let role = item_str(item, "role", &field)?;
                if !matches!(role, "user" | "assistant" | "system" | "developer") {
                    return Err(refuse(
                        &format!("{field}.role"),
                        format!("unknown role `{role}`"),
                    ));
                }
                let content = item.get("content").unwrap_or(&Value::Null);
                let text = content_text(content, &format!("{field}.content"))?;
                out.push(json!({"role": role, "content": text}));
            }
            "function_call" => {
                let call = json!({
                    "id": item_str(item, "call_id", &field)?,
                    "type": "function",
                    "function": {
                        "name": item_str(item, "name", &field)?,
                        "arguments": item_str(item, "arguments", &field)?,
                    },
                });
                // Calls made together are one assistant message.
                let last = out.last_mut().filter(|m| {
                    m["role"] == "assistant" && m["content"].is_null() && m["tool_calls"].is_array()
                });
                match last.and_then(|m| m["tool_calls"].as_array_mut()) {
                    Some(calls) => calls.push(call),
                    None => out
                        .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            "function_call_output" => {
                let output = item.get("output").unwrap_or(&Value::Null);
                out.push(json!({
                    "role": "tool",
                    "tool_call_id": item_str(item, "call_id", &field)?,
                    "content": content_text(output, &format!("{field}.output"))?,
                }));
            }
            other => {
                return Err(refuse(
                    &format!("{field}.type"),
                    format!("input items of type `{other}` are not supported"),
                ));
            }
        }
    }
    if out.is_empty() {
        return Err(refuse("input", "input must not be empty"));
    }
    Ok(out)
}

/// `text.format` as a chat `response_format`; `None` for plain text.
fn response_format(text: &Value) -> Result<Option<Value>, ApiError> {
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            for key in ["name", "schema", "strict", "description"] {
                if let Some(v) = format.get(key).filter(|v| !v.is_null()) {
                    schema.insert(key.to_owned(), v.clone());
                }
            }
            if !schema.contains_key("schema") {
                return Err(refuse(
                    "text.format.schema",
                    "a json_schema format needs `schema`",
                ));
            }
            schema.entry("name").or_insert_with(|| json!("response"));
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        other => Err(refuse(
            "text.format.type",
            format!("unknown text format `{}`", other.unwrap_or("")),
        )),
    }
}

/// Responses' flat function tools in the chat shape.
fn chat_tools(tools: &Value) -> Result<Vec<Value>, ApiError> {
    let Some(tools) = tools.as_array() else {
        return Err(refuse("tools", "tools must be a list"));
    };
    tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
            if kind != "function" {
                return Err(refuse(
                    &format!("tools[{i}].type"),
                    format!("tools of type `{kind}` are not supported; only `function`"),
                ));
            }
            let mut function = Map::new();
            function.insert(
                "name".into(),
                json!(item_str(tool, "name", &format!("tools[{i}]"))?),
            );
            for key in ["description", "parameters", "strict"] {
                if let Some(v) = tool.get(key).filter(|v| !v.is_null()) {
                    function.insert(key.to_owned(), v.clone());
                }
            }
            Ok(json!({"type": "function", "function": function}))
        })
        .collect()
}

/// `tool_choice` in the chat shape.
fn chat_tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(s) if matches!(s.as_str(), "none" | "auto" | "required") => {
            Ok(choice.clone())
        }
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = item_str(choice, "name", "tool_choice")?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ => Err(refuse(
            "tool_choice",
            "tool_choice must be `none`, `auto`, `required` or {\"type\": \"function\", \"name\": …}",
        )),
    }
}

/// Translates a Responses request into a chat-completions body, with the
/// [`Shell`] its answer is written into.
pub fn to_chat_body(request: &Value) -> Result<(Value, Shell), ApiError> {
    let Some(fields) = request.as_object() else {
        return Err(ApiError::InvalidRequest {
            message: "the request body must be a JSON object".into(),
            param: None,
        });
    };
    check_fields(fields)?;
    let model = fields
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| refuse("model", "`model` is required"))?;
    let input = fields
        .get("input")
        .ok_or_else(|| refuse("input", "`input` is required"))?;
    let stream = match fields.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(refuse("stream", "stream must be a boolean")),
    };
    let mut chat = Map::new();
    chat.insert("model".into(), json!(model));
    chat.insert(
        "messages".into(),
        Value::Array(messages(input, fields.get("instructions"))?),
    );
    let copy = |chat: &mut Map<String, Value>, from: &str, to: &str| {
        if let Some(v) = fields.get(from).filter(|v| !v.is_null()) {
            chat.insert(to.to_owned(), v.clone());
        }
    };
    copy(&mut chat, "max_output_tokens", "max_completion_tokens");
    copy(&mut chat, "temperature", "temperature");
    copy(&mut chat, "top_p", "top_p");
    copy(&mut chat, "user", "user");
    copy(&mut chat, "parallel_tool_calls", "parallel_tool_calls");
    for name in PASSED {
        copy(&mut chat, name, name);
    }
    if let Some(text) = fields.get("text").filter(|v| !v.is_null())
        && let Some(format) = response_format(text)?
    {
        chat.insert("response_format".into(), format);
    }
    if let Some(tools) = fields.get("tools").filter(|v| !v.is_null()) {
        let tools = chat_tools(tools)?;
        if !tools.is_empty() {
            chat.insert("tools".into(), Value::Array(tools));
        }
    }
    if let Some(choice) = fields.get("tool_choice").filter(|v| !v.is_null()) {
        chat.insert("tool_choice".into(), chat_tool_choice(choice)?);
    }
    if stream {
        chat.insert("stream".into(), json!(true));
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let mut echo = Map::new();
    for key in [
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "text",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "metadata",
        "user",
    ] {
        if let Some(v) = fields.get(key) {
            echo.insert(key.to_owned(), v.clone());
        }
    }
    let shell = Shell {
        id: new_id("resp"),
        created_at: unix_now(),
        model: model.to_owned(),
        stream,
        echo,
    };
    Ok((Value::Object(chat), shell))
}

/// OpenAI's Response object around `output`, with `status`, the details
/// of an incomplete one, the error of a failed one, and the usage.
fn response_object(
    shell: &Shell,
    status: &str,
    output: Vec<Value>,
    usage: Option<&Value>,
    error: Option<Value>,
) -> Value {
    let e = |key: &str, default: Value| shell.echo.get(key).cloned().unwrap_or(default);
    let usage = usage.map(|u| {
        let input = u["prompt_tokens"].as_u64().unwrap_or(0);
        let output = u["completion_tokens"].as_u64().unwrap_or(0);
        let cached = u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0);
        json!({
            "input_tokens": input,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input + output,
        })
    });
    let incomplete = (status == "incomplete").then(|| json!({"reason": "max_output_tokens"}));
    json!({
        "id": shell.id,
        "object": "response",
        "created_at": shell.created_at,
        "status": status,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": e("instructions", Value::Null),
        "max_output_tokens": e("max_output_tokens", Value::Null),
        "model": shell.model,
        "output": output,
        "parallel_tool_calls": e("parallel_tool_calls", json!(true)),
        "previous_response_id": null,
        "reasoning": null,
        "store": false,
        "temperature": e("temperature", json!(1.0)),
        "text": e("text", json!({"format": {"type": "text"}})),
        "tool_choice": e("tool_choice", json!("auto")),
        "tools": e("tools", json!([])),
        "top_p": e("top_p", json!(1.0)),
        "truncation": "disabled",
        "usage": usage,
        "user": e("user", Value::Null),
        "metadata": e("metadata", json!({})),
    })
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "type": "message",
        "id": id,
        "status": status,
        "role": "assistant",
        "content": [text_part(text)],
    })
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({
        "type": "function_call",
        "id": id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    })
}

/// `completed`, or `incomplete` when the answer was cut by its length.
fn status_of(finish_reason: Option<&str>) -> &'static str {
    if finish_reason == Some("length") {
        "incomplete"
    } else {
        "completed"
    }
}

/// The Response object for a chat completion (its first choice).
pub fn from_chat_completion(shell: &Shell, chat: &Value) -> Value {
    let choice = &chat["choices"][0];
    let message = &choice["message"];
    let finish = choice["finish_reason"].as_str();
    let status = status_of(finish);
    let mut output = Vec::new();
    if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
        output.push(message_item(&new_id("msg"), text, status));
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        let f = &call["function"];
        output.push(call_item(
            &new_id("fc"),
            call["id"].as_str().unwrap_or_default(),
            f["name"].as_str().unwrap_or_default(),
            f["arguments"].as_str().unwrap_or_default(),
            "completed",
        ));
    }
    response_object(shell, status, output, Some(&chat["usage"]), None)
}

#[cfg(test)]
mod tests;
