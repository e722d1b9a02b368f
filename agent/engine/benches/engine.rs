//! Engine benchmarks on the CPU backend, one command:
//! `cargo bench -p weir-engine --bench engine`.
//!
//! Prints one table: generated tokens/s at batch 1, 8 and 32 on a small
//! random model; continuous batching against one request at a time, with
//! their ratio, measured in the same run; scheduler step time with 1,000
//! live sequences; KV pool allocate/free rate.

#![allow(clippy::print_stdout)] // a benchmark reports on stdout

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_engine::backend::cpu::CpuBackend;
use weir_engine::engine::{EngineHandle, EngineOptions, Event, GenerateRequest, ResponseStream};
use weir_engine::kv_pool::KvBlockPool;
use weir_engine::model::LlamaModel;
use weir_engine::sampler::SamplingParams;
use weir_engine::scheduler::{Priority, Scheduler, SchedulerConfig, SequenceRequest};
use weir_engine::testmodel::{TinyModelSpec, write_tiny_model};
use weir_engine::tokenizer::TextTokenizer;

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

fn request(seed: u32, prompt_len: usize, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: (0..prompt_len as u32)
            .map(|i| 40 + (i * 31 + seed * 17) % 250)
            .collect(),
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

fn drain(mut stream: ResponseStream) -> usize {
    let mut tokens = 0;
    while let Some(event) = stream.blocking_recv() {
        match event {
            Event::Token(_) => tokens += 1,
            Event::PromptLogprobs(_) => {}
            Event::Finished { .. } => return tokens,
            Event::Failed(e) => panic!("benchmark request failed: {e}"),
        }
    }
    tokens
}

/// Generated tokens per second with `batch` requests submitted together.
fn throughput(engine: &EngineHandle, batch: usize, new_tokens: usize) -> f64 {
    let start = Instant::now();
    let streams: Vec<_> = (0..batch)
        .map(|i| {
            engine
                .submit(request(i as u32, 32, new_tokens))
                .expect("submit")
        })
        .collect();
    let tokens: usize = streams.into_iter().map(drain).sum();
    tokens as f64 / start.elapsed().as_secs_f64()
}

/// Seconds to serve `requests` one at a time, then all at once.
fn sequential_vs_continuous(engine: &EngineHandle, requests: &[GenerateRequest]) -> (f64, f64) {
    let start = Instant::now();
    for r in requests {
        drain(engine.submit(r.clone()).expect("submit"));
    }
    let sequential = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let streams: Vec<_> = requests
        .iter()
        .map(|r| engine.submit(r.clone()).expect("submit"))
        .collect();
    streams.into_iter().for_each(|s| {
        drain(s);
    });
    (sequential, start.elapsed().as_secs_f64())
}

/// Microseconds per `schedule` + `update` with `live` decoding sequences.
fn scheduler_step(live: usize) -> f64 {
    let config = SchedulerConfig {
        max_num_seqs: live,
        max_num_batched_tokens: live * 16,
        long_prefill_chunk: 16,
        max_model_len: 4096,
        aging: Duration::from_secs(10),
        prefix_caching: true,
    };
    let mut scheduler = Scheduler::new(config, live * 8, 16).expect("scheduler");
    let now = Instant::now();
    for id in 0..live as u64 {
        let prompt = (0..16).map(|t| (id as u32 * 16 + t) % 30000).collect();
        scheduler
            .add(SequenceRequest::new(id, prompt, 1_000_000, now))
            .expect("add");
    }
    let step = |scheduler: &mut Scheduler| {
        let out = scheduler.schedule(now);
        let sampled: Vec<_> = out
            .scheduled
            .iter()
            .filter(|s| s.samples)
            .map(|s| (s.id, 7u32))
            .collect();
        scheduler.update(&sampled).expect("update");
    };
    step(&mut scheduler); // all prompts computed: every sequence now decodes
    let steps = 200;
    let start = Instant::now();
    for _ in 0..steps {
        step(&mut scheduler);
    }
    start.elapsed().as_secs_f64() * 1e6 / steps as f64
}

/// Allocate-and-release cycles of `n` blocks per second.
fn pool_rate(n: usize) -> f64 {
    let mut pool = KvBlockPool::new(4096, 16, true).expect("pool");
    let cycles = 200_000 / n;
    let start = Instant::now();
    for _ in 0..cycles {
        let blocks = pool.allocate(n).expect("allocate");
        pool.release(black_box(&blocks)).expect("release");
    }
    (cycles * n) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let dir = std::env::temp_dir().join(format!("weir-bench-model-{}", std::process::id()));
    write_tiny_model(&dir, &TinyModelSpec::small()).expect("write model");
    let engine = start_engine(&dir);
    throughput(&engine, 4, 8); // warm up

    println!(
        "Weir engine benchmarks (CPU backend, {} threads)",
        rayon::current_num_threads()
    );
    println!("model: 4 layers, hidden 256, GQA 8:2, 32-token prompts, greedy\n");
    println!("{:<52} {:>14}", "measurement", "value");
    let new_tokens = 64;
    let single = throughput(&engine, 1, new_tokens);
    for batch in [1usize, 8, 32] {
        let tps = if batch == 1 {
            single
        } else {
            throughput(&engine, batch, new_tokens)
        };
        println!(
            "{:<52} {:>10.0} tok/s  ({:.1}x batch 1)",
            format!("decode throughput, batch {batch}, {new_tokens} new tokens"),
            tps,
            tps / single
        );
    }
    let mixed: Vec<_> = (0..32)
        .map(|i| {
            request(
                100 + i,
                16 + (i as usize * 37) % 200,
                16 + (i as usize * 13) % 48,
            )
        })
        .collect();
    let (seq, cont) = sequential_vs_continuous(&engine, &mixed);
    println!("{:<52} {:>10.2} s", "32 mixed requests, one at a time", seq);
    println!(
        "{:<52} {:>10.2} s",
        "32 mixed requests, continuous batching", cont
    );
    println!(
        "{:<52} {:>10.1}x",
        "continuous batching speed-up (same run)",
        seq / cont
    );
    println!(
        "{:<52} {:>10.1} µs",
        "scheduler step, 1,000 live sequences",
        scheduler_step(1000)
    );
    println!(
        "{:<52} {:>10.1} µs",
        "scheduler step, 100 live sequences",
        scheduler_step(100)
    );
    println!(
        "{:<52} {:>10.2} M blocks/s",
        "KV pool allocate+release, 1 block",
        pool_rate(1) / 1e6
    );
    println!(
        "{:<52} {:>10.2} M blocks/s",
        "KV pool allocate+release, 16 blocks",
        pool_rate(16) / 1e6
    );
    let _ = std::fs::remove_dir_all(&dir);
}
