//! Constrained against unconstrained decoding on the CPU backend, one
//! command: `cargo run --release -p weir-engine --example grammar_bench`
//! (`-- --model DIR_OR_GGUF` for a real model instead of the benchmark's
//! small random one).
//!
//! The same workload twice (32-token prompts, 64 new tokens each, seeded
//! sampling), once free and once under a JSON Schema whose array cannot
//! close before the token budget runs out, so both runs generate the same
//! number of tokens. Prints decode throughput at batch 1 and 32 with the
//! constrained/unconstrained ratio, then the time to compute one token's
//! mask (p50/p99 µs), measured by replaying the constrained outputs
//! through fresh grammars.

#![allow(clippy::print_stdout)] // the table is the output

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use weir_engine::backend::cpu::CpuBackend;
use weir_engine::engine::{EngineHandle, EngineOptions, Event, GenerateRequest, ResponseStream};
use weir_engine::grammar::GrammarSpec;
use weir_engine::model::LlamaModel;
use weir_engine::sampler::SamplingParams;
use weir_engine::scheduler::{Priority, SchedulerConfig};
use weir_engine::testmodel::{TinyModelSpec, write_tiny_model};
use weir_engine::tokenizer::TextTokenizer;

const NEW_TOKENS: usize = 64;

fn start_engine(dir: &std::path::Path) -> EngineHandle {
    let model = LlamaModel::load(dir, CpuBackend, 1024).expect("model");
    let tokenizer = Arc::new(TextTokenizer::from_dir(dir).expect("tokenizer"));
    let options = EngineOptions {
        scheduler: SchedulerConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            long_prefill_chunk: 512,
            max_model_len: 1024,
            aging: Duration::from_secs(10),
            prefix_caching: false,
        },
        num_blocks: 1024,
        block_size: 16,
        queue_capacity: 1024,
    };
    EngineHandle::start(model, tokenizer, options).expect("engine")
}

/// Records of `{id, name, tags}`; at least 100 of them, so the array never
/// closes within the benchmark's token budget.
fn schema() -> GrammarSpec {
    GrammarSpec::JsonSchema(json!({
        "type": "array",
        "minItems": 100,
        "items": {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "name": {"type": "string", "maxLength": 16},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}}
            },
            "required": ["id", "name", "tags"],
            "additionalProperties": false
        }
    }))
}

fn request(engine: &EngineHandle, i: usize, constrained: bool) -> GenerateRequest {
    GenerateRequest {
        prompt: (0..32u32)
            .map(|t| 40 + (t * 31 + i as u32 * 17) % 250)
            .collect(),
        sampling: SamplingParams {
            temperature: 0.8,
            seed: Some(i as u64),
            ..Default::default()
        },
        max_tokens: NEW_TOKENS,
        prompt_logprobs: None,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        ignore_eos: true,
        priority: Priority::Normal,
        grammar: constrained.then(|| engine.compile_grammar(&schema()).expect("grammar")),
    }
}

fn drain(mut stream: ResponseStream) -> Vec<u32> {
    let mut tokens = Vec::new();
    while let Some(event) = stream.blocking_recv() {
        match event {
            Event::Token(t) => tokens.push(t.token),
            Event::Finished { .. } => break,
            Event::PromptLogprobs(_) => {}
            Event::Failed(e) => panic!("benchmark request failed: {e}"),
        }
    }
    tokens
}

/// Generated tokens per second with `batch` requests submitted together
/// (grammars compiled beforehand, as the agent does before queueing), and
/// the outputs.
fn run(engine: &EngineHandle, batch: usize, constrained: bool) -> (f64, Vec<Vec<u32>>) {
    let requests: Vec<_> = (0..batch)
        .map(|i| request(engine, i, constrained))
        .collect();
    let start = Instant::now();
    let streams: Vec<_> = requests
        .into_iter()
        .map(|r| engine.submit(r).expect("submit"))
        .collect();
    let outputs: Vec<Vec<u32>> = streams.into_iter().map(drain).collect();
    let tokens: usize = outputs.iter().map(Vec::len).sum();
    (tokens as f64 / start.elapsed().as_secs_f64(), outputs)
}

/// Microseconds to compute each mask of the constrained `outputs`, replayed
/// through fresh grammars on one thread.
fn mask_times(engine: &EngineHandle, outputs: &[Vec<u32>]) -> Vec<f64> {
    let mut times = Vec::new();
    for tokens in outputs {
        let mut grammar = engine.compile_grammar(&schema()).expect("grammar");
        for &t in tokens {
            let start = Instant::now();
            let mask = grammar.compute_mask().expect("mask");
            times.push(start.elapsed().as_secs_f64() * 1e6);
            assert!(
                weir_engine::grammar::allowed(&mask, t),
                "token {t} was not allowed"
            );
            grammar.accept(t).expect("accept");
        }
    }
    times.sort_by(f64::total_cmp);
    times
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let given = args
        .iter()
        .position(|a| a == "--model")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let scratch = std::env::temp_dir().join(format!("weir-grammar-bench-{}", std::process::id()));
    let dir = match &given {
        Some(dir) => dir.clone(),
        None => {
            write_tiny_model(&scratch, &TinyModelSpec::small()).expect("write model");
            scratch.clone()
        }
    };
    let engine = start_engine(&dir);
    run(&engine, 4, true); // warm up (and build the vocabulary trie)
    run(&engine, 4, false);

    println!(
        "Weir constrained decoding benchmark (CPU backend, {} threads)",
        rayon::current_num_threads()
    );
    match &given {
        Some(d) => println!("model: {}", d.display()),
        None => println!("model: benchmark model (4 layers, hidden 256, random weights)"),
    }
    println!("workload: 32-token prompts, {NEW_TOKENS} new tokens, seeded sampling\n");
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "batch", "free tok/s", "json tok/s", "ratio"
    );
    let mut replayed = Vec::new();
    for batch in [1usize, 32] {
        let (free, _) = run(&engine, batch, false);
        let (constrained, outputs) = run(&engine, batch, true);
        println!(
            "{:<44} {:>12.0} {:>12.0} {:>7.2}x",
            format!("decode throughput, batch {batch}"),
            free,
            constrained,
            constrained / free
        );
        replayed = outputs;
    }
    let times = mask_times(&engine, &replayed);
    println!(
        "\nmask time per token ({} tokens): p50 {:.1} µs, p99 {:.1} µs",
        times.len(),
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
    if given.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
}
