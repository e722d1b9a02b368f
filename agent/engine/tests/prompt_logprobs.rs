//! Prompt log probabilities on the CPU backend with the tiny Llama fixture:
//! each position's scores equal the next-token distribution the model gives
//! that prefix, through chunked prefill and with the prefix cache warm;
//! scoring never changes what is generated, also when requests are
//! preempted and recomputed; `max_tokens: 0` only scores.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use weir_engine::backend::cpu::CpuBackend;
use weir_engine::engine::{
    Completion, EngineHandle, EngineOptions, Event, GenerateRequest, PromptLogprob, SubmitError,
    TokenEvent, Usage,
};
use weir_engine::model::LlamaModel;
use weir_engine::sampler::SamplingParams;
use weir_engine::scheduler::{Priority, SchedulerConfig};
use weir_engine::tokenizer::TextTokenizer;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

/// An engine whose steps take at most 16 tokens, so a 40-token prompt is
/// prefilled in three chunks.
fn engine() -> EngineHandle {
    engine_with(64, 16)
}

/// An engine of `num_blocks` blocks of 16 tokens whose steps take at most
/// `budget` tokens.
fn engine_with(num_blocks: usize, budget: usize) -> EngineHandle {
    let model = LlamaModel::load(&fixture(), CpuBackend, 256).unwrap();
    let tokenizer = Arc::new(TextTokenizer::from_dir(&fixture()).unwrap());
    let options = EngineOptions {
        scheduler: SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: budget,
            long_prefill_chunk: budget,
            max_model_len: 256,
            aging: Duration::from_secs(5),
            prefix_caching: true,
        },
        num_blocks,
        block_size: 16,
        queue_capacity: 64,
    };
    EngineHandle::start(model, tokenizer, options).unwrap()
}

fn request(prompt: &[u32], max_tokens: usize, prompt_logprobs: Option<usize>) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.to_vec(),
        sampling: SamplingParams {
            logprobs: Some(3),
            ..SamplingParams::greedy()
        },
        max_tokens,
        prompt_logprobs,
        grammar: None,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        ignore_eos: true,
        priority: Priority::Normal,
    }
}

fn prompt(len: usize) -> Vec<u32> {
    prompt_seeded(0, len)
}

fn prompt_seeded(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 40 + (i.wrapping_mul(2654435761).wrapping_add(seed * 97) >> 7) % 260)
        .collect()
}

/// Prompt scores (asserted to come before any token), tokens, the end.
fn run(
    engine: &EngineHandle,
    req: GenerateRequest,
) -> (
    Option<Vec<PromptLogprob>>,
    Vec<TokenEvent>,
    Completion,
    Usage,
) {
    let mut stream = engine.submit(req).unwrap();
    let (mut scores, mut tokens) = (None, Vec::new());
    loop {
        match stream
            .blocking_recv()
            .expect("stream ended without Finished")
        {
            Event::PromptLogprobs(s) => {
                assert!(tokens.is_empty(), "prompt scores came after a token");
                assert!(scores.replace(s).is_none(), "prompt scores sent twice");
            }
            Event::Token(t) => tokens.push(t),
            Event::Finished { reason, usage, .. } => return (scores, tokens, reason, usage),
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() < 1e-3
}

#[test]
fn each_position_scores_as_the_model_predicts_that_prefix() {
    let engine = engine();
    let p = prompt(40);
    let (scores, generated, _, usage) = run(&engine, request(&p, 2, Some(3)));
    let scores = scores.expect("no prompt scores");
    assert_eq!(scores.len(), p.len());
    assert_eq!(scores.iter().map(|s| s.token).collect::<Vec<_>>(), p);
    assert_eq!(scores[0].logprob, None);
    assert!(scores[0].top_logprobs.is_empty());
    assert_eq!(usage.cached_tokens, 0);
    // Position k's scores are the distribution of the first token after
    // p[..k], as a plain request for that prefix reports it; positions in
    // each of the three prefill chunks.
    for k in [1, 15, 16, 17, 33, 39] {
        let (_, first, _, _) = run(&engine, request(&p[..k], 1, None));
        let alone = &first[0].top_logprobs;
        let scored = &scores[k];
        assert_eq!(scored.top_logprobs.len(), 3);
        for ((ta, la), (tb, lb)) in alone.iter().zip(&scored.top_logprobs) {
            assert_eq!(ta, tb, "position {k}: a different alternative");
            assert!(close(*la, *lb), "position {k}: {la} vs {lb}");
        }
        let lp = scored.logprob.unwrap();
        assert!(lp <= scored.top_logprobs[0].1 + 1e-5, "position {k}");
        if let Some((_, l)) = scored.top_logprobs.iter().find(|(t, _)| *t == p[k]) {
            assert!(close(*l, lp), "position {k}: the token's own score differs");
        }
    }
    // Scoring changes nothing about what is generated.
    let (none, plain, _, _) = run(&engine, request(&p, 2, None));
    assert!(none.is_none());
    let ids = |t: &[TokenEvent]| t.iter().map(|t| t.token).collect::<Vec<_>>();
    assert_eq!(ids(&plain), ids(&generated));
    // With the prefix now cached, the prompt is still computed and scored
    // whole, to the same values.
    let (again, _, _, usage) = run(&engine, request(&p, 2, Some(3)));
    assert_eq!(usage.cached_tokens, 0);
    let again = again.unwrap();
    for (a, b) in scores.iter().zip(&again) {
        assert_eq!(a.token, b.token);
        assert_eq!(a.logprob.is_some(), b.logprob.is_some());
        assert!(close(a.logprob.unwrap_or(0.0), b.logprob.unwrap_or(0.0)));
    }
}

#[test]
fn max_tokens_zero_only_scores_the_prompt() {
    let engine = engine();
    let p = prompt(20);
    let (scores, tokens, reason, usage) = run(&engine, request(&p, 0, Some(0)));
    assert!(tokens.is_empty());
    assert_eq!(reason, Completion::Length);
    assert_eq!(usage.completion_tokens, 0);
    assert_eq!(usage.prompt_tokens, 20);
    let scores = scores.unwrap();
    assert_eq!(scores.len(), 20);
    assert!(
        scores[1..]
            .iter()
            .all(|s| s.logprob.is_some_and(|l| l <= 0.0))
    );
    assert!(scores.iter().all(|s| s.top_logprobs.is_empty()));
    // A one-token prompt has only its unscored first token.
    let (scores, _, _, _) = run(&engine, request(&p[..1], 0, Some(2)));
    assert_eq!(scores.unwrap().len(), 1);
    // Without prompt scoring, nothing to do is refused.
    assert!(matches!(
        engine.submit(request(&p, 0, None)),
        Err(SubmitError::Invalid(_))
    ));
}

fn drain(mut stream: weir_engine::engine::ResponseStream) -> (Vec<PromptLogprob>, Vec<u32>) {
    let (mut scores, mut tokens) = (Vec::new(), Vec::new());
    loop {
        match stream
            .blocking_recv()
            .expect("stream ended without Finished")
        {
            Event::PromptLogprobs(s) => scores = s,
            Event::Token(t) => tokens.push(t.token),
            Event::Finished { .. } => return (scores, tokens),
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
}

#[test]
fn preempted_and_recomputed_requests_score_as_alone() {
    let requests: Vec<_> = (0..10)
        .map(|i| request(&prompt_seeded(i, 48 + 10 * i as usize), 24, Some(2)))
        .collect();
    let large = engine_with(256, 512);
    let expected: Vec<_> = requests
        .iter()
        .map(|r| drain(large.submit(r.clone()).unwrap()))
        .collect();
    // 16 blocks of 16 tokens (one 256-token sequence) against 10 sequences
    // of 72-162 tokens, each step at most 32 tokens: prefills run while
    // others decode, and the pool runs short.
    let small = engine_with(16, 32);
    let streams: Vec<_> = requests
        .iter()
        .map(|r| small.submit(r.clone()).unwrap())
        .collect();
    for (stream, (want_scores, want_tokens)) in streams.into_iter().zip(expected) {
        let (scores, tokens) = drain(stream);
        assert_eq!(tokens, want_tokens);
        assert_eq!(scores.len(), want_scores.len());
        for (a, b) in scores.iter().zip(&want_scores) {
            assert_eq!(a.token, b.token);
            assert!(close(a.logprob.unwrap_or(0.0), b.logprob.unwrap_or(0.0)));
            let ids = |s: &PromptLogprob| s.top_logprobs.iter().map(|t| t.0).collect::<Vec<_>>();
            assert_eq!(ids(a), ids(b));
        }
    }
    assert!(
        small.stats().snapshot().preemptions > 0,
        "the pool was never short"
    );
}
