//! What constrains a chat answer: `response_format`, `tools` with
//! `tool_choice`, and vLLM's `structured_outputs` (or its older `guided_*`
//! fields), validated and compiled into the engine's grammar before the
//! request queues. Anything wrong is a 400 naming the field; nothing
//! reaches the engine.
//!
//! A forced tool call (`required`, or a named function) is a grammar too:
//! the named function's arguments schema, or for `required` a JSON array
//! of `{"name": <one of the tools>, "parameters": <its schema>}` objects
//! (at most one when `parallel_tool_calls` is false).

use serde_json::{Value, json};
use weir_engine::engine::EngineHandle;
use weir_engine::grammar::{Grammar, GrammarError, GrammarSpec};

use crate::api::ApiError;
use crate::api::structured::{
    ConstraintFields, ResponseFormat, StructuredOutputs, Tool, ToolChoice,
};
use crate::api::tools::ToolRender;

/// Most tools a request may define.
const MAX_TOOLS: usize = 128;
/// Most calls one `required` answer may hold.
const MAX_PARALLEL_CALLS: usize = 8;

/// A chat request's constraint: the compiled grammar (if any), how tool
/// calls are read from the answer (if tools are on), and the tools as the
/// chat template gets them.
#[derive(Debug, Default)]
pub struct Constraint {
    /// The grammar the output follows.
    pub grammar: Option<Grammar>,
    /// How the answer becomes `tool_calls`.
    pub tools: Option<ToolRender>,
}

/// The validated tools of a request (empty when it has none).
pub fn parse_tools(tools: Option<&Value>) -> Result<Vec<Tool>, ApiError> {
    let Some(value) = tools else {
        return Ok(Vec::new());
    };
    let items = value
        .as_array()
        .ok_or_else(|| ApiError::invalid("tools", "must be an array of tools"))?;
    if items.len() > MAX_TOOLS {
        return Err(ApiError::invalid(
            "tools",
            format!("at most {MAX_TOOLS} tools are allowed"),
        ));
    }
    let mut out: Vec<Tool> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let tool: Tool = serde_json::from_value(item.clone())
            .map_err(|e| ApiError::invalid(&format!("tools[{i}]"), e.to_string()))?;
        if tool.kind != "function" {
            return Err(ApiError::invalid(
                &format!("tools[{i}].type"),
                format!("`{}` tools are not supported; use `function`", tool.kind),
            ));
        }
        let name = &tool.function.name;
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !name_ok {
            return Err(ApiError::invalid(
                &format!("tools[{i}].function.name"),
                "must be 1 to 64 letters, digits, underscores or dashes",
            ));
        }
        if out.iter().any(|t| &t.function.name == name) {
            return Err(ApiError::invalid(
                &format!("tools[{i}].function.name"),
                format!("`{name}` is defined twice"),
            ));
        }
        if let Some(p) = &tool.function.parameters
            && !p.is_object()
        {
            return Err(ApiError::invalid(
                &format!("tools[{i}].function.parameters"),
                "must be a JSON Schema object",
            ));
        }
        out.push(tool);
    }
    Ok(out)
}

/// The arguments schema of a tool (any object when it declares none).
fn parameters(tool: &Tool) -> Value {
    tool.function
        .parameters
        .clone()
        .unwrap_or_else(|| json!({"type": "object"}))
}

/// The grammar source a request names, with the field to blame for it.
fn requested_spec(fields: &ConstraintFields) -> Result<Option<(GrammarSpec, String)>, ApiError> {
    let mut found: Vec<(GrammarSpec, String)> = Vec::new();
    match &fields.response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => found.push((
            GrammarSpec::JsonSchema(json!({"type": "object"})),
            "response_format".into(),
        )),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            let schema = json_schema
                .schema
                .clone()
                .unwrap_or_else(|| json!({"type": "object"}));
            if !schema.is_object() && !schema.is_boolean() {
                return Err(ApiError::invalid(
                    "response_format.json_schema.schema",
                    "must be a JSON Schema object",
                ));
            }
            found.push((
                GrammarSpec::JsonSchema(schema),
                "response_format.json_schema.schema".into(),
            ));
        }
    }
    if let Some(so) = &fields.structured_outputs {
        found.extend(structured_outputs(so, "structured_outputs")?);
    }
    let aliases = StructuredOutputs {
        json: fields.guided_json.clone(),
        regex: fields.guided_regex.clone(),
        choice: fields.guided_choice.clone(),
        grammar: fields.guided_grammar.clone(),
        json_object: None,
    };
    found.extend(structured_outputs(&aliases, "guided")?);
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|(_, p)| p.as_str()).collect();
        return Err(ApiError::invalid(
            &found[1].1,
            format!(
                "give one output constraint, not several ({})",
                names.join(", ")
            ),
        ));
    }
    Ok(found.pop())
}

/// The specs in one `structured_outputs` object (or the `guided_*`
/// aliases, `prefix` "guided"), each with its field name.
fn structured_outputs(
    so: &StructuredOutputs,
    prefix: &str,
) -> Result<Vec<(GrammarSpec, String)>, ApiError> {
    let field = |name: &str| {
        if prefix == "guided" {
            format!("guided_{name}")
        } else {
            format!("{prefix}.{name}")
        }
    };
    let mut out = Vec::new();
    if let Some(json) = &so.json {
        let param = field("json");
        let schema = match json {
            Value::String(text) => serde_json::from_str(text)
                .map_err(|e| ApiError::invalid(&param, format!("not JSON: {e}")))?,
            other => other.clone(),
        };
        out.push((GrammarSpec::JsonSchema(schema), param));
    }
    if let Some(regex) = &so.regex {
        out.push((GrammarSpec::Regex(regex.clone()), field("regex")));
    }
    if let Some(choice) = &so.choice {
        out.push((GrammarSpec::Choice(choice.clone()), field("choice")));
    }
    if let Some(grammar) = &so.grammar {
        out.push((GrammarSpec::Lark(grammar.clone()), field("grammar")));
    }
    if so.json_object == Some(true) {
        out.push((
            GrammarSpec::JsonSchema(json!({"type": "object"})),
            field("json_object"),
        ));
    }
    Ok(out)
}

/// The grammar of a `required` answer: an array of calls to the tools.
fn required_spec(tools: &[Tool], parallel: bool) -> GrammarSpec {
    let calls: Vec<Value> = tools
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "parameters": parameters(t),
                },
                "required": ["name", "parameters"],
                "additionalProperties": false,
            })
        })
        .collect();
    let max = if parallel { MAX_PARALLEL_CALLS } else { 1 };
    GrammarSpec::JsonSchema(json!({
        "type": "array",
        "items": {"anyOf": calls},
        "minItems": 1,
        "maxItems": max,
    }))
}

fn compile(engine: &EngineHandle, spec: &GrammarSpec, param: &str) -> Result<Grammar, ApiError> {
    engine.compile_grammar(spec).map_err(|e| match e {
        GrammarError::Invalid(message) => ApiError::invalid(param, message),
        GrammarError::Failed(message) => ApiError::Internal(message),
    })
}

/// Validates and compiles the constraint of a chat request with `tools`
/// (already parsed by [`parse_tools`]) on `engine`.
pub fn chat_constraint(
    engine: &EngineHandle,
    fields: &ConstraintFields,
    tools: &[Tool],
) -> Result<Constraint, ApiError> {
    // Every tool's schema must compile, whether or not this answer is
    // forced to call it: a malformed tool is refused up front.
    for (i, tool) in tools.iter().enumerate() {
        if tool.function.parameters.is_some() {
            let param = format!("tools[{i}].function.parameters");
            compile(engine, &GrammarSpec::JsonSchema(parameters(tool)), &param)?;
        }
    }
    let requested = requested_spec(fields)?;
    let names: Vec<String> = tools.iter().map(|t| t.function.name.clone()).collect();
    let forced = match &fields.tool_choice {
        None => None,
        Some(ToolChoice::Mode(mode)) => match mode.as_str() {
            "none" | "auto" => None,
            "required" if tools.is_empty() => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "`required` needs at least one tool in `tools`",
                ));
            }
            "required" => {
                let parallel = fields.parallel_tool_calls.unwrap_or(true);
                Some((required_spec(tools, parallel), ToolRender::Required))
            }
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("`{other}` is not one of none, auto, required or a named function"),
                ));
            }
        },
        Some(ToolChoice::Named(named)) => {
            let name = &named.function.name;
            let tool = tools
                .iter()
                .find(|t| &t.function.name == name)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "tool_choice",
                        format!("names `{name}`, which is not in `tools`"),
                    )
                })?;
            let spec = GrammarSpec::JsonSchema(parameters(tool));
            Some((spec, ToolRender::Named(name.clone())))
        }
    };
    let auto = !tools.is_empty()
        && !matches!(&fields.tool_choice, Some(ToolChoice::Mode(m)) if m == "none");
    match (forced, requested) {
        (Some(_), Some((_, param))) => Err(ApiError::invalid(
            &param,
            "cannot be combined with a forced tool_choice (required or a named function)",
        )),
        (Some((spec, render)), None) => Ok(Constraint {
            grammar: Some(compile(engine, &spec, "tool_choice")?),
            tools: Some(render),
        }),
        (None, Some((spec, param))) => Ok(Constraint {
            grammar: Some(compile(engine, &spec, &param)?),
            tools: None,
        }),
        (None, None) => Ok(Constraint {
            grammar: None,
            tools: auto.then_some(ToolRender::Auto(names)),
        }),
    }
}
