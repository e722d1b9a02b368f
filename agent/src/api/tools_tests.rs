//! The `auto`-mode parsers on outputs recorded from each model family's
//! tool-call format, and the constrained modes.

use super::*;

fn names() -> Vec<String> {
    vec!["get_weather".into(), "get_time".into()]
}

fn call(name: &str, arguments: &str) -> ParsedCall {
    ParsedCall {
        name: name.into(),
        arguments: arguments.into(),
    }
}

fn args(c: &ParsedCall) -> Value {
    serde_json::from_str(&c.arguments).unwrap()
}

#[test]
fn hermes_qwen_tool_call_tags() {
    // Qwen2.5-7B-Instruct, two parallel calls.
    let out = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"location\": \"Paris, France\", \"unit\": \"celsius\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"timezone\": \"Europe/Paris\"}}\n</tool_call>";
    let parsed = parse_auto(out, &names());
    assert_eq!(parsed.content, None);
    assert_eq!(parsed.calls.len(), 2);
    assert_eq!(parsed.calls[0].name, "get_weather");
    assert_eq!(args(&parsed.calls[0])["location"], "Paris, France");
    assert_eq!(args(&parsed.calls[1])["timezone"], "Europe/Paris");
}

#[test]
fn hermes_with_leading_text_and_missing_close_tag() {
    // Hermes-2-Pro: a thought before the call, stopped at </tool_call>.
    let out = "Let me check that.\n<tool_call>\n{\"arguments\": {\"location\": \"Oslo\"}, \"name\": \"get_weather\"}\n";
    let parsed = parse_auto(out, &names());
    assert_eq!(parsed.content.as_deref(), Some("Let me check that."));
    assert_eq!(
        parsed.calls,
        vec![call("get_weather", r#"{"location":"Oslo"}"#)]
    );
}

#[test]
fn mistral_tool_calls_array_and_v11_args() {
    // Mistral-7B-Instruct-v0.3.
    let out = "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"location\": \"Paris\", \"unit\": \"celsius\"}}]";
    let parsed = parse_auto(out, &names());
    assert_eq!(parsed.calls.len(), 1);
    assert_eq!(args(&parsed.calls[0])["unit"], "celsius");
    // Mistral-Small-3.2 (tokenizer v11): name[ARGS]json per call.
    let out = "[TOOL_CALLS]get_weather[ARGS]{\"location\": \"Rome\"}[TOOL_CALLS]get_time[ARGS]{}";
    let parsed = parse_auto(out, &names());
    assert_eq!(
        parsed.calls,
        vec![
            call("get_weather", r#"{"location":"Rome"}"#),
            call("get_time", "{}")
        ]
    );
}

#[test]
fn llama_json_calls_with_and_without_python_tag() {
    // Llama-3.1-8B-Instruct, JSON-based tool calling.
    let out = "{\"name\": \"get_weather\", \"parameters\": {\"location\": \"San Francisco, CA\"}}";
    let parsed = parse_auto(out, &names());
    assert_eq!(parsed.content, None);
    assert_eq!(args(&parsed.calls[0])["location"], "San Francisco, CA");
    let out = "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"location\": \"Tokyo\"}}; {\"name\": \"get_time\", \"parameters\": {\"timezone\": \"Asia/Tokyo\"}}<|eom_id|>";
    let parsed = parse_auto(out, &names());
    assert_eq!(parsed.calls.len(), 2);
    assert_eq!(parsed.calls[1].name, "get_time");
}

#[test]
fn plain_text_and_unknown_functions_stay_content() {
    let text = "The weather in Paris is sunny, 21 degrees.";
    assert_eq!(parse_auto(text, &names()), plain(text));
    let unknown = "{\"name\": \"launch_rocket\", \"parameters\": {}}";
    assert_eq!(parse_auto(unknown, &names()).calls, Vec::new());
    let json_answer = "{\"city\": \"Paris\"}";
    assert_eq!(parse_auto(json_answer, &names()).calls, Vec::new());
}

#[test]
fn constrained_modes() {
    let named = ToolRender::Named("get_weather".into());
    let parsed = named.parse(r#"{"location": "Paris"}"#);
    assert_eq!(
        parsed.calls,
        vec![call("get_weather", r#"{"location": "Paris"}"#)]
    );
    let required = ToolRender::Required;
    let parsed = required.parse(r#"[{"name": "get_time", "parameters": {"timezone": "UTC"}}]"#);
    assert_eq!(
        parsed.calls,
        vec![call("get_time", r#"{"timezone":"UTC"}"#)]
    );
    assert!(required.parse("[{\"name\": \"get_t").calls.is_empty());
}

#[test]
fn streams_hold_back_what_may_become_a_call() {
    assert!(may_be_call(""));
    assert!(may_be_call("  <tool_"));
    assert!(may_be_call("{\"name\""));
    assert!(may_be_call("[TOOL"));
    assert!(!may_be_call("Hello"));
    assert!(call_id().starts_with("call_"));
    assert_ne!(call_id(), call_id());
}
