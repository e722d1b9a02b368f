//! Constrained decoding on the CPU backend with the tiny random-weight
//! Llama fixture: whatever the weights say, a grammar's output is in the
//! grammar's language (checked independently with a JSON Schema validator),
//! under every sampler setting, after preemption, and without changing the
//! tokens of the free sequences batched with it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use weir_engine::backend::cpu::CpuBackend;
use weir_engine::engine::{
    Completion, EngineHandle, EngineOptions, Event, GenerateRequest, ResponseStream,
};
use weir_engine::grammar::{GrammarError, GrammarSpec};
use weir_engine::model::LlamaModel;
use weir_engine::sampler::{LogprobsMode, SamplingParams};
use weir_engine::scheduler::{Priority, SchedulerConfig};
use weir_engine::tokenizer::TextTokenizer;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

fn engine(num_blocks: usize, max_model_len: usize) -> EngineHandle {
    let model = LlamaModel::load(&fixture(), CpuBackend, max_model_len).unwrap();
    let tokenizer = Arc::new(TextTokenizer::from_dir(&fixture()).unwrap());
    let options = EngineOptions {
        scheduler: SchedulerConfig {
            max_num_seqs: 32,
            max_num_batched_tokens: 512,
            long_prefill_chunk: 256,
            max_model_len,
            aging: Duration::from_secs(5),
            prefix_caching: false,
        },
        num_blocks,
        block_size: 16,
        queue_capacity: 256,
    };
    EngineHandle::start(model, tokenizer, options).unwrap()
}

fn request(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        prompt,
        sampling,
        max_tokens,
        prompt_logprobs: None,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        ignore_eos: false,
        priority: Priority::Normal,
        grammar: None,
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 40 + (i.wrapping_mul(2654435761).wrapping_add(seed * 97) >> 7) % 260)
        .collect()
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "ok": {"type": "boolean"}
        },
        "required": ["name", "age", "tags", "ok"],
        "additionalProperties": false
    })
}

struct Outcome {
    tokens: Vec<u32>,
    text: String,
    reason: Completion,
}

fn collect(mut stream: ResponseStream) -> Outcome {
    let (mut tokens, mut text) = (Vec::new(), String::new());
    loop {
        match stream.blocking_recv().expect("stream ended early") {
            Event::Token(t) => {
                tokens.push(t.token);
                text.push_str(&t.text);
            }
            Event::PromptLogprobs(_) => panic!("no prompt scores were asked for"),
            Event::Finished {
                text: tail, reason, ..
            } => {
                text.push_str(&tail);
                return Outcome {
                    tokens,
                    text,
                    reason,
                };
            }
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
}

fn constrained(e: &EngineHandle, spec: &GrammarSpec, mut req: GenerateRequest) -> GenerateRequest {
    req.grammar = Some(e.compile_grammar(spec).unwrap());
    req
}

#[test]
fn every_sampler_setting_produces_schema_valid_json() {
    let e = engine(256, 512);
    let schema = person_schema();
    let spec = GrammarSpec::JsonSchema(schema.clone());
    let validator = jsonschema::validator_for(&schema).unwrap();
    let settings = [
        SamplingParams::greedy(),
        SamplingParams {
            temperature: 1.5,
            seed: Some(1),
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.8,
            top_k: Some(5),
            top_p: 0.9,
            min_p: 0.05,
            seed: Some(2),
            logprobs: Some(3),
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.0,
            repetition_penalty: 1.3,
            frequency_penalty: 1.0,
            presence_penalty: 0.5,
            seed: Some(3),
            logprobs: Some(0),
            logprobs_mode: LogprobsMode::Processed,
            ..Default::default()
        },
    ];
    let streams: Vec<_> = settings
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let req = request(prompt(i as u32, 20), 200, s.clone());
            e.submit(constrained(&e, &spec, req)).unwrap()
        })
        .collect();
    for (stream, setting) in streams.into_iter().zip(&settings) {
        let out = collect(stream);
        assert_eq!(out.reason, Completion::Stop, "{setting:?}: {}", out.text);
        let value: Value = serde_json::from_str(&out.text)
            .unwrap_or_else(|err| panic!("{setting:?}: not JSON ({err}): {}", out.text));
        assert!(
            validator.is_valid(&value),
            "{setting:?}: invalid against the schema: {}",
            out.text
        );
    }
}

#[test]
fn regex_and_choice_grammars_hold_and_finish_with_stop() {
    let e = engine(128, 256);
    let hot = SamplingParams {
        temperature: 2.0,
        seed: Some(7),
        ..Default::default()
    };
    let choice = GrammarSpec::Choice(vec!["red".into(), "green light".into()]);
    let out = collect(
        e.submit(constrained(
            &e,
            &choice,
            request(prompt(5, 9), 50, hot.clone()),
        ))
        .unwrap(),
    );
    assert!(
        ["red", "green light"].contains(&out.text.as_str()),
        "{}",
        out.text
    );
    assert_eq!(out.reason, Completion::Stop);

    let regex = GrammarSpec::Regex("[0-9]{3}-[a-z]{2,4}".into());
    let out = collect(
        e.submit(constrained(&e, &regex, request(prompt(6, 9), 50, hot)))
            .unwrap(),
    );
    let (digits, letters) = out.text.split_once('-').expect("a dash");
    assert!(digits.len() == 3 && digits.chars().all(|c| c.is_ascii_digit()));
    assert!((2..=4).contains(&letters.len()) && letters.chars().all(|c| c.is_ascii_lowercase()));
}

#[test]
fn preemption_and_recompute_keep_each_grammar_state() {
    let spec = GrammarSpec::JsonSchema(json!({
        "type": "array",
        "items": {"type": "string", "maxLength": 6},
        "minItems": 4, "maxItems": 8
    }));
    let requests: Vec<_> = (0..10)
        .map(|i| {
            request(
                prompt(300 + i, 40 + 9 * i as usize),
                60,
                SamplingParams::greedy(),
            )
        })
        .collect();
    let large = engine(512, 256);
    let expected: Vec<_> = requests
        .iter()
        .map(|r| collect(large.submit(constrained(&large, &spec, r.clone())).unwrap()))
        .collect();
    // 16 blocks of 16 tokens: far less than ten prompts of 40-121 tokens.
    let small = engine(16, 256);
    let streams: Vec<_> = requests
        .iter()
        .map(|r| small.submit(constrained(&small, &spec, r.clone())).unwrap())
        .collect();
    for (stream, want) in streams.into_iter().zip(expected) {
        let got = collect(stream);
        assert_eq!(got.tokens, want.tokens);
        if got.reason == Completion::Stop {
            let v: Value = serde_json::from_str(&got.text).unwrap();
            assert!(v.as_array().is_some_and(|a| (4..=8).contains(&a.len())));
        }
    }
    assert!(small.stats().snapshot().preemptions > 0, "never preempted");
}

#[test]
fn a_mixed_batch_gives_each_sequence_the_tokens_it_gets_alone() {
    let e = engine(512, 512);
    let spec = GrammarSpec::JsonSchema(person_schema());
    let seeded = |seed| SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        ..Default::default()
    };
    let mut requests = Vec::new();
    for i in 0..6u32 {
        let free = request(prompt(50 + i, 10 + 3 * i as usize), 24, seeded(i as u64));
        let req = request(
            prompt(60 + i, 12 + 2 * i as usize),
            120,
            seeded(100 + i as u64),
        );
        requests.push(free);
        requests.push(constrained(&e, &spec, req));
    }
    let alone: Vec<_> = requests
        .iter()
        .map(|r| collect(e.submit(r.clone()).unwrap()).tokens)
        .collect();
    let streams: Vec<_> = requests
        .iter()
        .map(|r| e.submit(r.clone()).unwrap())
        .collect();
    for (stream, want) in streams.into_iter().zip(alone) {
        assert_eq!(collect(stream).tokens, want);
    }
}

#[test]
fn invalid_and_unsupported_grammars_are_refused_at_compile_time() {
    let e = engine(64, 128);
    let bad = [
        GrammarSpec::JsonSchema(json!({"type": "no-such-type"})),
        GrammarSpec::JsonSchema(json!({"type": "string", "minLength": 5, "maxLength": 2})),
        // Keywords outside llguidance's subset are refused, not ignored.
        GrammarSpec::JsonSchema(json!({"type": "array", "uniqueItems": true})),
        GrammarSpec::JsonSchema(json!({"if": {"type": "string"}, "then": {"maxLength": 3}})),
        GrammarSpec::Regex("[a-".into()),
        GrammarSpec::Lark("start: undefined_rule".into()),
        GrammarSpec::Choice(Vec::new()),
    ];
    for spec in bad {
        match e.compile_grammar(&spec) {
            Err(GrammarError::Invalid(message)) => assert!(!message.is_empty()),
            other => panic!("{spec:?} compiled: {other:?}"),
        }
    }
}
