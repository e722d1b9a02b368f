//! Request fields that constrain a chat answer, in OpenAI's wire shapes:
//! `response_format`, `tools`, `tool_choice`, `parallel_tool_calls`, the
//! tool-call parts of messages; and vLLM's `structured_outputs` body extra
//! (with its older `guided_*` aliases).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `response_format`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Free text (the default).
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against a schema.
    JsonSchema {
        /// The schema and its name.
        json_schema: JsonSchemaFormat,
    },
}

/// `response_format.json_schema`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct JsonSchemaFormat {
    /// The schema's name (required by OpenAI; recorded only).
    pub name: Option<String>,
    /// What the schema is for (recorded only).
    pub description: Option<String>,
    /// The JSON Schema; absent means any JSON object.
    pub schema: Option<Value>,
    /// OpenAI's strict mode. The output always follows the schema here,
    /// strict or not.
    pub strict: Option<bool>,
}

/// One entry of `tools`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Tool {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: FunctionDef,
}

/// A function the model may call.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct FunctionDef {
    /// Its name.
    pub name: String,
    /// What it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of its arguments (an object schema).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// OpenAI's strict mode (arguments always follow the schema when the
    /// call is constrained).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: `none`, `auto`, `required`, or a named function.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ToolChoice {
    /// `none`, `auto` or `required`.
    Mode(String),
    /// `{"type": "function", "function": {"name": ...}}`.
    Named(NamedToolChoice),
}

/// A named `tool_choice`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct NamedToolChoice {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function to call.
    pub function: NamedFunction,
}

/// The function of a named `tool_choice`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct NamedFunction {
    /// Its name.
    pub name: String,
}

/// A tool call, in a response or in an assistant message sent back.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ToolCall {
    /// The call's id (a `tool` message answers it by `tool_call_id`).
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function and its arguments.
    pub function: FunctionCall,
}

/// The function part of a tool call.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// Its arguments, as a JSON text.
    pub arguments: String,
}

/// One tool call in a streamed delta: the first fragment carries `id`,
/// `type` and `function.name`; later ones only `function.arguments` text.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ToolCallDelta {
    /// Which call of the message this fragment belongs to.
    pub index: usize,
    /// The call's id (first fragment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function` (first fragment).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The function's name and arguments text so far.
    pub function: FunctionCallDelta,
}

/// The function part of a [`ToolCallDelta`].
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct FunctionCallDelta {
    /// The name (first fragment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// More arguments text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// vLLM's `structured_outputs` body extra: exactly one of its fields.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct StructuredOutputs {
    /// A JSON Schema (an object, or its JSON text).
    pub json: Option<Value>,
    /// A regular expression.
    pub regex: Option<String>,
    /// One of these strings.
    pub choice: Option<Vec<String>>,
    /// A Lark grammar (llguidance's dialect).
    pub grammar: Option<String>,
    /// Any JSON object (vLLM's `json_object`).
    pub json_object: Option<bool>,
}

/// The constraint fields of a chat request, flattened into its body.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ConstraintFields {
    /// `response_format`.
    pub response_format: Option<ResponseFormat>,
    /// `tool_choice`.
    pub tool_choice: Option<ToolChoice>,
    /// `parallel_tool_calls` (default true).
    pub parallel_tool_calls: Option<bool>,
    /// vLLM's `structured_outputs`.
    pub structured_outputs: Option<StructuredOutputs>,
    /// vLLM's older alias of `structured_outputs.json`.
    pub guided_json: Option<Value>,
    /// vLLM's older alias of `structured_outputs.regex`.
    pub guided_regex: Option<String>,
    /// vLLM's older alias of `structured_outputs.choice`.
    pub guided_choice: Option<Vec<String>>,
    /// vLLM's older alias of `structured_outputs.grammar`.
    pub guided_grammar: Option<String>,
}
