//! The whole engine on the CPU backend with the tiny Llama fixture: batch
//! invariance, prefix caching, preemption, stop strings, cancellation, seeds
//! and bad input.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_engine::backend::cpu::CpuBackend;
use weir_engine::engine::{
    Completion, EngineHandle, EngineOptions, Event, GenerateRequest, SubmitError, Usage,
};
use weir_engine::model::LlamaModel;
use weir_engine::sampler::SamplingParams;
use weir_engine::scheduler::{Priority, SchedulerConfig};
use weir_engine::tokenizer::TextTokenizer;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

fn engine(num_blocks: usize, max_model_len: usize, prefix_caching: bool) -> EngineHandle {
    let model = LlamaModel::load(&fixture(), CpuBackend, max_model_len).unwrap();
    let tokenizer = Arc::new(TextTokenizer::from_dir(&fixture()).unwrap());
    let options = EngineOptions {
        scheduler: SchedulerConfig {
            max_num_seqs: 32,
            max_num_batched_tokens: 512,
            long_prefill_chunk: 256,
            max_model_len,
            aging: Duration::from_secs(5),
            prefix_caching,
        },
        num_blocks,
        block_size: 16,
        queue_capacity: 256,
    };
    EngineHandle::start(model, tokenizer, options).unwrap()
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt,
        sampling: SamplingParams::greedy(),
        max_tokens,
        prompt_logprobs: None,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        ignore_eos: true,
        priority: Priority::Normal,
        grammar: None,
    }
}

/// Deterministic prompt of `len` ordinary tokens (ids 40..300).
fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 40 + (i.wrapping_mul(2654435761).wrapping_add(seed * 97) >> 7) % 260)
        .collect()
}

struct Outcome {
    tokens: Vec<u32>,
    text: String,
    reason: Completion,
    usage: Usage,
}

fn collect(mut stream: weir_engine::engine::ResponseStream) -> Outcome {
    let (mut tokens, mut text) = (Vec::new(), String::new());
    loop {
        match stream
            .blocking_recv()
            .expect("stream ended without Finished")
        {
            Event::Token(t) => {
                tokens.push(t.token);
                text.push_str(&t.text);
            }
            Event::PromptLogprobs(_) => {}
            Event::Finished {
                text: tail,
                reason,
                usage,
            } => {
                text.push_str(&tail);
                return Outcome {
                    tokens,
                    text,
                    reason,
                    usage,
                };
            }
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
}

fn run_alone(engine: &EngineHandle, req: GenerateRequest) -> Outcome {
    collect(engine.submit(req).unwrap())
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn greedy_output_is_the_same_alone_and_in_a_mixed_batch() {
    let e = engine(512, 512, true);
    let target = request(prompt(1, 37), 24);
    let alone = run_alone(&e, target.clone());
    assert_eq!(alone.tokens.len(), 24);
    let others: Vec<_> = (0..16)
        .map(|i| {
            e.submit(request(
                prompt(100 + i, 5 + 13 * i as usize),
                8 + i as usize,
            ))
            .unwrap()
        })
        .collect();
    let crowded = e.submit(target).unwrap();
    let more: Vec<_> = (0..4)
        .map(|i| e.submit(request(prompt(200 + i, 90), 30)).unwrap())
        .collect();
    assert_eq!(collect(crowded).tokens, alone.tokens);
    for s in others.into_iter().chain(more) {
        collect(s);
    }
}

#[test]
fn shared_prefix_is_computed_once_and_output_is_unchanged() {
    let prefix = prompt(7, 1000);
    let with_suffix = |s: u32| {
        let mut p = prefix.clone();
        p.extend(prompt(s, 12));
        request(p, 8)
    };
    let cached = engine(256, 1100, true);
    let first = run_alone(&cached, with_suffix(1));
    let before = cached.stats().snapshot().prompt_tokens;
    let second = run_alone(&cached, with_suffix(2));
    let computed = cached.stats().snapshot().prompt_tokens - before;
    // The 1,000-token prefix fills 62 full blocks of 16 (992 tokens); only
    // the rest of the prompt is computed.
    assert_eq!(second.usage.cached_tokens, 992);
    assert_eq!(computed, 1012 - 992);
    assert_eq!(first.usage.cached_tokens, 0);

    let uncached = engine(256, 1100, false);
    assert_eq!(run_alone(&uncached, with_suffix(2)).tokens, second.tokens);
    assert_eq!(uncached.stats().snapshot().prefix_hits, 0);
}

#[test]
fn an_undersized_pool_preempts_but_every_request_matches_a_large_pool() {
    let requests: Vec<_> = (0..12)
        .map(|i| request(prompt(300 + i, 40 + 7 * i as usize), 40))
        .collect();
    let large = engine(512, 256, false);
    let expected: Vec<_> = requests
        .iter()
        .map(|r| run_alone(&large, r.clone()).tokens)
        .collect();

    // 16 blocks of 16 tokens hold one 256-token sequence, far less than the
    // offered load of 12 sequences of 80-160 tokens.
    let small = engine(16, 256, false);
    let streams: Vec<_> = requests
        .iter()
        .map(|r| small.submit(r.clone()).unwrap())
        .collect();
    for (stream, want) in streams.into_iter().zip(expected) {
        assert_eq!(collect(stream).tokens, want);
    }
    assert!(
        small.stats().snapshot().preemptions > 0,
        "the pool was never short"
    );
    wait_until("the pool to drain", || {
        small.stats().snapshot().kv_usage == 0.0
    });
}

#[test]
fn stop_strings_end_generation_and_are_not_returned() {
    let e = engine(128, 256, true);
    let full = run_alone(&e, request(prompt(9, 20), 40));
    assert_eq!(full.reason, Completion::Length);
    // A stop string taken from the middle of the text the model produces.
    let chars: Vec<char> = full.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let mut req = request(prompt(9, 20), 40);
    req.stop = vec![stop.clone()];
    let stopped = run_alone(&e, req);
    assert_eq!(stopped.reason, Completion::Stop);
    let cut = full.text.find(&stop).unwrap();
    assert_eq!(stopped.text, full.text[..cut]);
}

#[test]
fn eos_stops_unless_ignored() {
    let e = engine(128, 256, true);
    let full = run_alone(&e, request(prompt(11, 10), 30));
    // Make the third generated token a stop token.
    let mut req = request(prompt(11, 10), 30);
    req.stop_token_ids = vec![full.tokens[2]];
    let first = full
        .tokens
        .iter()
        .position(|&t| t == full.tokens[2])
        .unwrap();
    let stopped = run_alone(&e, req);
    assert_eq!(stopped.reason, Completion::Stop);
    assert_eq!(stopped.tokens, full.tokens[..=first]);
    assert_eq!(stopped.usage.completion_tokens, first + 1);
}

#[test]
fn dropping_the_stream_aborts_and_frees_blocks() {
    let e = engine(128, 1024, false);
    let mut stream = e.submit(request(prompt(13, 200), 800)).unwrap();
    assert!(matches!(stream.blocking_recv(), Some(Event::Token(_))));
    wait_until("blocks in use", || e.stats().snapshot().kv_usage > 0.0);
    drop(stream);
    wait_until("blocks to be freed", || {
        let s = e.stats().snapshot();
        s.kv_usage == 0.0 && s.running == 0
    });
    // The engine keeps serving.
    assert_eq!(run_alone(&e, request(prompt(14, 5), 3)).tokens.len(), 3);
}

#[test]
fn seeded_sampling_is_reproducible_in_any_batch() {
    let e = engine(256, 256, true);
    let seeded = |seed| {
        let mut r = request(prompt(17, 12), 20);
        r.sampling = SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        r
    };
    let alone = run_alone(&e, seeded(42));
    let noise: Vec<_> = (0..6)
        .map(|i| e.submit(request(prompt(400 + i, 30), 25)).unwrap())
        .collect();
    let again = collect(e.submit(seeded(42)).unwrap());
    assert_eq!(again.tokens, alone.tokens);
    let other = run_alone(&e, seeded(43));
    assert_ne!(other.tokens, alone.tokens);
    for s in noise {
        collect(s);
    }
}

#[test]
fn bad_requests_are_refused_with_clear_errors() {
    let e = engine(64, 128, true);
    let too_long = e.submit(request(prompt(1, 128), 4)).err().unwrap();
    assert!(matches!(too_long, SubmitError::Invalid(_)));
    assert!(too_long.to_string().contains("128 tokens"), "{too_long}");
    let zero = e.submit(request(prompt(1, 8), 0)).err().unwrap();
    assert!(zero.to_string().contains("max_tokens"), "{zero}");
    let empty = e.submit(request(Vec::new(), 4)).err().unwrap();
    assert!(empty.to_string().contains("empty"), "{empty}");
    let mut bad = request(prompt(1, 8), 4);
    bad.sampling.top_p = 1.5;
    assert!(matches!(e.submit(bad), Err(SubmitError::Invalid(_))));
    // Generation that reaches the context length ends with `length`.
    let edge = run_alone(&e, request(prompt(2, 120), 50));
    assert_eq!((edge.reason, edge.tokens.len()), (Completion::Length, 8));
}
