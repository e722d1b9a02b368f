//! Tool calls in the model's output: how a chat answer with `tools` is
//! turned into OpenAI `tool_calls`.
//!
//! * A named `tool_choice` constrains the output to the function's
//!   arguments (a JSON object valid against its `parameters`), so the text
//!   *is* the arguments.
//! * `required` constrains it to a JSON array of `{"name", "parameters"}`
//!   objects, one per call.
//! * `auto` leaves the model free and parses what it wrote by the formats
//!   model families are trained on: Hermes/Qwen `<tool_call>{...}</tool_call>`,
//!   Mistral `[TOOL_CALLS][{...}]`, and Llama 3.1+ JSON calls
//!   (`{"name": ..., "parameters": ...}`, optionally after
//!   `<|python_tag|>`, several separated by `;`). Calls to functions not in
//!   `tools` are not calls: the text stays content.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use super::structured::{FunctionCall, ToolCall};

/// How the text of a chat answer with tools becomes tool calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolRender {
    /// The text is the arguments of a call to this function.
    Named(String),
    /// The text is a JSON array of `{"name", "parameters"}` calls.
    Required,
    /// The text may hold calls in a model family's format, to these
    /// functions.
    Auto(Vec<String>),
}

/// A call parsed out of the output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedCall {
    /// The function's name.
    pub name: String,
    /// Its arguments as JSON text.
    pub arguments: String,
}

/// What an answer says: text before any call, and the calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedOutput {
    /// Text that is not a call (`None` when there is none).
    pub content: Option<String>,
    /// The calls, in order (empty: the answer is plain text).
    pub calls: Vec<ParsedCall>,
}

impl ToolRender {
    /// Parses a finished answer.
    pub fn parse(&self, text: &str) -> ParsedOutput {
        let calls = match self {
            Self::Named(name) => Some(vec![ParsedCall {
                name: name.clone(),
                arguments: text.to_owned(),
            }]),
            Self::Required => serde_json::from_str::<Value>(text)
                .ok()
                .and_then(|v| calls_from_json(&v)),
            Self::Auto(names) => {
                return parse_auto(text, names);
            }
        };
        match calls {
            Some(calls) if !calls.is_empty() => ParsedOutput {
                content: None,
                calls,
            },
            _ => plain(text),
        }
    }
}

fn plain(text: &str) -> ParsedOutput {
    ParsedOutput {
        content: Some(text.to_owned()),
        calls: Vec::new(),
    }
}

/// A new tool call id (`call_` and 24 hex digits, unique in this process).
pub fn call_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("call_{t:016x}{n:08x}")
}

/// OpenAI tool calls for parsed calls, with fresh ids.
pub fn to_tool_calls(calls: &[ParsedCall]) -> Vec<ToolCall> {
    calls
        .iter()
        .map(|c| ToolCall {
            id: call_id(),
            kind: "function".into(),
            function: FunctionCall {
                name: c.name.clone(),
                arguments: c.arguments.clone(),
            },
        })
        .collect()
}

/// One call from a JSON object `{"name", "parameters" | "arguments"}`.
fn call_from_object(v: &Value) -> Option<ParsedCall> {
    let name = v.get("name")?.as_str()?.to_owned();
    let args = v.get("parameters").or_else(|| v.get("arguments"));
    let arguments = match args {
        None => "{}".to_owned(),
        // Some models write the arguments as a JSON string.
        Some(Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
    };
    Some(ParsedCall { name, arguments })
}

/// Calls from a JSON object or an array of them.
fn calls_from_json(v: &Value) -> Option<Vec<ParsedCall>> {
    match v {
        Value::Array(items) => items.iter().map(call_from_object).collect(),
        Value::Object(_) => call_from_object(v).map(|c| vec![c]),
        _ => None,
    }
}

/// The JSON values written one after another in `text` (separated by
/// whitespace, `;` or `,`), or `None` when anything else is there.
fn json_sequence(text: &str) -> Option<Vec<Value>> {
    let mut values = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let value = stream.next()?.ok()?;
        values.push(value);
        rest = rest[stream.byte_offset()..].trim_start();
        rest = rest
            .strip_prefix(';')
            .or_else(|| rest.strip_prefix(','))
            .unwrap_or(rest)
            .trim_start();
    }
    Some(values)
}

fn known(calls: Vec<ParsedCall>, names: &[String]) -> Option<Vec<ParsedCall>> {
    (!calls.is_empty() && calls.iter().all(|c| names.contains(&c.name))).then_some(calls)
}

fn non_empty(text: &str) -> Option<String> {
    let t = text.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

/// `auto` mode: the first family format that parses into calls to known
/// functions wins; otherwise the text is content.
pub fn parse_auto(text: &str, names: &[String]) -> ParsedOutput {
    hermes(text, names)
        .or_else(|| mistral(text, names))
        .or_else(|| llama(text, names))
        .unwrap_or_else(|| plain(text))
}

/// Hermes / Qwen: `<tool_call>{json}</tool_call>`, one block per call,
/// possibly after some text (the last block may lack its closing tag when
/// the model stopped there).
fn hermes(text: &str, names: &[String]) -> Option<ParsedOutput> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let start = text.find(OPEN)?;
    let mut calls = Vec::new();
    let mut rest = &text[start..];
    while let Some(body) = rest.strip_prefix(OPEN) {
        let (inner, after) = match body.find(CLOSE) {
            Some(end) => (&body[..end], &body[end + CLOSE.len()..]),
            None => (body, ""),
        };
        let value: Value = serde_json::from_str(inner.trim()).ok()?;
        calls.push(call_from_object(&value)?);
        rest = after.trim_start();
    }
    Some(ParsedOutput {
        content: non_empty(&text[..start]),
        calls: known(calls, names)?,
    })
}

/// Mistral: `[TOOL_CALLS]` then a JSON array of calls (v3 tokenizers), or
/// `[TOOL_CALLS]name[ARGS]{json}` repeated (v11+).
fn mistral(text: &str, names: &[String]) -> Option<ParsedOutput> {
    const TAG: &str = "[TOOL_CALLS]";
    let start = text.find(TAG)?;
    let body = &text[start + TAG.len()..];
    let calls = if body.contains("[ARGS]") {
        body.split(TAG)
            .map(|part| {
                let (name, args) = part.split_once("[ARGS]")?;
                let args: Value = serde_json::from_str(args.trim()).ok()?;
                Some(ParsedCall {
                    name: name.trim().to_owned(),
                    arguments: args.to_string(),
                })
            })
            .collect::<Option<Vec<_>>>()?
    } else {
        let values = json_sequence(body)?;
        let mut calls = Vec::new();
        for v in &values {
            calls.extend(calls_from_json(v)?);
        }
        calls
    };
    Some(ParsedOutput {
        content: non_empty(&text[..start]),
        calls: known(calls, names)?,
    })
}

/// Llama 3.1+: the whole answer is one or more JSON calls, optionally after
/// `<|python_tag|>` (ends with `<|eom_id|>` when the template keeps it).
fn llama(text: &str, names: &[String]) -> Option<ParsedOutput> {
    let body = text.trim();
    let body = body.strip_prefix("<|python_tag|>").unwrap_or(body);
    let body = body.strip_suffix("<|eom_id|>").unwrap_or(body);
    let values = json_sequence(body)?;
    let mut calls = Vec::new();
    for v in &values {
        calls.extend(calls_from_json(v)?);
    }
    Some(ParsedOutput {
        content: None,
        calls: known(calls, names)?,
    })
}

/// Whether `text` (the start of an answer in `auto` mode) may still turn
/// out to be a tool call, so that a stream should hold it back.
pub fn may_be_call(text: &str) -> bool {
    let t = text.trim_start();
    if t.is_empty() {
        return true;
    }
    const MARKERS: [&str; 3] = ["<tool_call>", "[TOOL_CALLS]", "<|python_tag|>"];
    t.starts_with('{')
        || t.starts_with('[')
        || MARKERS
            .iter()
            .any(|m| t.starts_with(m) || m.starts_with(t) || text.contains(m))
}

#[cfg(test)]
#[path = "tools_tests.rs"]
mod tests;
