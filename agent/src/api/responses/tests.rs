//! The Responses translation both ways, on JSON.

use serde_json::json;

use super::*;
use crate::api::types::ChatCompletionRequest;

fn chat_of(request: Value) -> Value {
    to_chat_body(&request).unwrap().0
}

fn refused_param(request: Value) -> String {
    let err = to_chat_body(&request).unwrap_err();
    assert_eq!(err.status(), 400, "{err}");
    err.body()["error"]["param"].as_str().unwrap().to_owned()
}

#[test]
fn text_input_and_instructions_become_messages_and_parse_as_chat() {
    let chat = chat_of(json!({
        "model": "m", "input": "Hi", "instructions": "Be brief",
        "max_output_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
    }));
    assert_eq!(
        chat,
        json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief"},
                {"role": "user", "content": "Hi"},
            ],
            "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
        })
    );
    let parsed: ChatCompletionRequest = serde_json::from_value(chat).unwrap();
    assert_eq!(parsed.sampling.max_completion_tokens, Some(7));
    assert_eq!(parsed.messages.len(), 2);
}

#[test]
fn message_items_function_calls_and_outputs_map_to_chat_roles() {
    let chat = chat_of(json!({"model": "m", "input": [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "weather in "},
            {"type": "input_text", "text": "Oslo?"},
        ]},
        {"type": "function_call", "call_id": "c1", "name": "get", "arguments": "{\"city\":\"Oslo\"}"},
        {"type": "function_call", "call_id": "c2", "name": "get", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "rain"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "It rains."}]},
    ]}));
    let messages = chat["messages"].as_array().unwrap();
    assert_eq!(
        messages[0],
        json!({"role": "developer", "content": "rules"})
    );
    assert_eq!(
        messages[1],
        json!({"role": "user", "content": "weather in Oslo?"})
    );
    // Calls made together are one assistant message with both calls.
    assert_eq!(messages[2]["role"], "assistant");
    assert!(messages[2]["content"].is_null());
    assert_eq!(
        messages[2]["tool_calls"],
        json!([
            {"id": "c1", "type": "function", "function": {"name": "get", "arguments": "{\"city\":\"Oslo\"}"}},
            {"id": "c2", "type": "function", "function": {"name": "get", "arguments": "{}"}},
        ])
    );
    assert_eq!(
        messages[3],
        json!({"role": "tool", "tool_call_id": "c1", "content": "rain"})
    );
    assert_eq!(
        messages[4],
        json!({"role": "assistant", "content": "It rains."})
    );
    assert_eq!(messages.len(), 5);
    let parsed: ChatCompletionRequest = serde_json::from_value(chat).unwrap();
    assert_eq!(parsed.messages[3].role, "tool");
}

#[test]
fn text_format_tools_and_tool_choice_take_the_chat_shapes() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let chat = chat_of(json!({
        "model": "m", "input": "x",
        "text": {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": true}},
        "tools": [{"type": "function", "name": "get", "description": "gets",
                   "parameters": schema, "strict": true}],
        "tool_choice": {"type": "function", "name": "get"},
        "parallel_tool_calls": false,
        "stream": true,
    }));
    assert_eq!(
        chat["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": true}})
    );
    assert_eq!(
        chat["tools"],
        json!([{"type": "function", "function": {"name": "get", "description": "gets",
                "parameters": schema, "strict": true}}])
    );
    assert_eq!(
        chat["tool_choice"],
        json!({"type": "function", "function": {"name": "get"}})
    );
    assert_eq!(chat["parallel_tool_calls"], false);
    assert_eq!(chat["stream"], true);
    assert_eq!(chat["stream_options"], json!({"include_usage": true}));
    let object =
        chat_of(json!({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}}));
    assert_eq!(object["response_format"], json!({"type": "json_object"}));
    let plain = chat_of(
        json!({"model": "m", "input": "x", "text": {"format": {"type": "text"}},
        "tool_choice": "required"}),
    );
    assert!(plain.get("response_format").is_none());
    assert_eq!(plain["tool_choice"], "required");
}

#[test]
fn stateful_and_unknown_fields_are_refused_by_name() {
    let base = || json!({"model": "m", "input": "x"});
    let with = |key: &str, value: Value| {
        let mut r = base();
        r[key] = value;
        r
    };
    assert_eq!(refused_param(with("store", json!(true))), "store");
    assert_eq!(
        refused_param(with("previous_response_id", json!("resp_1"))),
        "previous_response_id"
    );
    assert_eq!(refused_param(with("background", json!(true))), "background");
    assert_eq!(refused_param(with("frobnicate", json!(1))), "frobnicate");
    assert_eq!(
        refused_param(with("tools", json!([{"type": "web_search"}]))),
        "tools[0].type"
    );
    assert_eq!(
        refused_param(with(
            "input",
            json!([{"type": "message", "role": "user",
            "content": [{"type": "input_image", "image_url": "x"}]}])
        )),
        "input[0].content[0]"
    );
    assert_eq!(
        refused_param(with("input", json!([{"type": "reasoning"}]))),
        "input[0].type"
    );
    assert_eq!(
        refused_param(with("tool_choice", json!("sometimes"))),
        "tool_choice"
    );
    assert_eq!(refused_param(json!({"input": "x"})), "model");
    // Explicitly stateless is fine; absent store means stateless.
    assert!(to_chat_body(&with("store", json!(false))).is_ok());
    assert!(to_chat_body(&base()).is_ok());
}

fn shell() -> Shell {
    let (_, shell) =
        to_chat_body(&json!({"model": "m", "input": "x", "max_output_tokens": 5})).unwrap();
    shell
}

#[test]
fn a_chat_completion_becomes_a_response_with_text_calls_and_usage() {
    let chat = json!({
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Let me look.",
            "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get", "arguments": "{\"city\":\"Oslo\"}"}}],
        }}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
                  "prompt_tokens_details": {"cached_tokens": 3}},
    });
    let r = from_chat_completion(&shell(), &chat);
    assert!(r["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(r["object"], "response");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["model"], "m");
    assert_eq!(r["max_output_tokens"], 5);
    assert!(r["incomplete_details"].is_null());
    let output = r["output"].as_array().unwrap();
    assert_eq!(output.len(), 2);
    assert_eq!(output[0]["type"], "message");
    assert_eq!(output[0]["content"][0]["type"], "output_text");
    assert_eq!(output[0]["content"][0]["text"], "Let me look.");
    assert_eq!(output[1]["type"], "function_call");
    assert_eq!(output[1]["call_id"], "call_1");
    assert_eq!(output[1]["name"], "get");
    assert_eq!(output[1]["arguments"], "{\"city\":\"Oslo\"}");
    assert_eq!(
        r["usage"],
        json!({"input_tokens": 10, "input_tokens_details": {"cached_tokens": 3},
               "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 0},
               "total_tokens": 14})
    );
    let cut = json!({"choices": [{"finish_reason": "length",
        "message": {"role": "assistant", "content": "abc"}}], "usage": {}});
    let r = from_chat_completion(&shell(), &cut);
    assert_eq!(r["status"], "incomplete");
    assert_eq!(
        r["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(r["output"][0]["status"], "incomplete");
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

#[test]
fn a_chat_stream_becomes_the_responses_event_sequence() {
    let mut w = EventWriter::new(shell());
    let mut events = w.start();
    for chunk in [
        json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        json!({"choices": [{"index": 0, "delta": {"content": "Hel"}}]}),
        json!({"choices": [{"index": 0, "delta": {"content": "lo"}}]}),
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_9",
            "type": "function", "function": {"name": "get", "arguments": "{\"a\""}}]}}]}),
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,
            "function": {"arguments": ":1}"}}]}}]}),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        json!({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}}),
    ] {
        events.extend(w.chunk(&chunk));
    }
    events.extend(w.finish());
    assert_eq!(
        types(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let numbers: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
    assert_eq!(events[9]["text"], "Hello");
    assert_eq!(events[12]["arguments"], "{\"a\":1}");
    let done = &events[14]["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
    assert_eq!(done["output"][1]["call_id"], "call_9");
    assert_eq!(done["output"][1]["output_index"], Value::Null);
    assert_eq!(done["usage"]["total_tokens"], 5);
    // The message's deltas and the function call name their own items.
    assert_eq!(events[4]["item_id"], events[2]["item"]["id"]);
    assert_eq!(events[7]["item_id"], events[6]["item"]["id"]);
    assert_eq!(events[6]["output_index"], 1);
}

#[test]
fn a_stream_cut_by_length_is_incomplete_and_an_error_fails_it() {
    let mut w = EventWriter::new(shell());
    let mut events = w.start();
    events.extend(
        w.chunk(&json!({"choices": [{"delta": {"content": "ab"}, "finish_reason": "length"}]})),
    );
    events.extend(w.finish());
    let last = events.last().unwrap();
    assert_eq!(last["type"], "response.incomplete");
    assert_eq!(
        last["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );

    let mut w = EventWriter::new(shell());
    let _ = w.start();
    let failed = w.fail(&json!({"error": {"message": "boom", "type": "internal_error", "param": null, "code": null}}));
    assert_eq!(types(&failed), ["error", "response.failed"]);
    assert_eq!(failed[0]["message"], "boom");
    assert_eq!(failed[0]["sequence_number"], 2);
    assert_eq!(failed[1]["response"]["status"], "failed");
    assert_eq!(failed[1]["response"]["error"]["message"], "boom");
}
