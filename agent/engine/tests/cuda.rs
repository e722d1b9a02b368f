//! The CUDA backend against the CPU backend on the checked-in tiny models:
//! logits within bf16 tolerance (prefill, chunked prefill and decode
//! through the paged cache), 64 greedy tokens equal, batch invariance,
//! prefix reuse, preemption, on-device sampling, CUDA graph replay.
//!
//! Every test needs a GPU; without one each prints `skipped: <reason>` and
//! returns (CI has no GPU). `scripts/gpu-check.sh` runs this binary on a
//! GPU machine, where the fixtures are found through `WEIR_ENGINE_DIR`
//! (the binary is built elsewhere).

#![allow(clippy::print_stdout)] // skip reasons and the register report are the output

mod gguf_writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use weir_engine::backend::cpu::CpuBackend;
use weir_engine::backend::cuda::plan::StepLimits;
use weir_engine::backend::cuda::{CudaBackend, CudaOptions, device};
use weir_engine::backend::{Backend, BatchLayout};
use weir_engine::config::ModelConfig;
use weir_engine::engine::{EngineHandle, EngineOptions, Event, GenerateRequest, Usage};
use weir_engine::model::LlamaModel;
use weir_engine::sampler::SamplingParams;
use weir_engine::scheduler::{Priority, SchedulerConfig};
use weir_engine::tokenizer::TextTokenizer;
use weir_engine::weights::Weights;

const BLOCK: usize = 16;
const MAX_LEN: usize = 1100;

/// Prints why and returns `true` when there is no usable GPU.
fn skip() -> bool {
    match device::unavailable_reason() {
        Some(reason) => {
            println!("skipped: {reason}");
            true
        }
        None => false,
    }
}

fn fixture(name: &str) -> PathBuf {
    let root = std::env::var_os("WEIR_ENGINE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    root.join("tests/fixtures").join(name)
}

fn limits(max_seqs: usize) -> StepLimits {
    StepLimits {
        max_rows: 1024,
        max_seqs,
        max_context: MAX_LEN,
        block_size: BLOCK,
    }
}

fn cuda_model(name: &str, graphs: bool) -> LlamaModel<CudaBackend> {
    cuda_model_at(&fixture(name), graphs)
}

/// The model at `dir` (a directory or a GGUF file) on the device.
fn cuda_model_at(dir: &std::path::Path, graphs: bool) -> LlamaModel<CudaBackend> {
    let config = ModelConfig::from_dir(dir).unwrap();
    let options = CudaOptions {
        device: 0,
        limits: limits(32),
        graphs,
        kernel_cache: None,
    };
    let backend = CudaBackend::new(&config, options).unwrap();
    LlamaModel::from_weights(config, &Weights::open(dir).unwrap(), backend, MAX_LEN).unwrap()
}

fn cpu_model(name: &str) -> LlamaModel<CpuBackend> {
    LlamaModel::load(&fixture(name), CpuBackend, MAX_LEN).unwrap()
}

/// Largest |Δ| relative to the largest |logit| of the reference.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// bf16 keeps 8 bits of mantissa; over a few layers of random weights the
/// logits stay within a few percent of the f32 reference.
const BF16_TOLERANCE: f32 = 0.05;

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 40 + (i.wrapping_mul(2654435761).wrapping_add(seed * 97) >> 7) % 260)
        .collect()
}

/// Logits of every step: a prefill of `ids[..split]`, a chunk up to
/// `ids.len() - 4`, then the rest one token at a time.
fn stepwise<B: Backend>(model: &LlamaModel<B>, ids: &[u32], split: usize) -> Vec<Vec<f32>> {
    let blocks = MAX_LEN.div_ceil(BLOCK);
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let mut cache = model.alloc_kv_cache(blocks, BLOCK).unwrap();
    let mut cuts = vec![0, split, ids.len() - 4];
    cuts.extend(ids.len() - 3..=ids.len());
    cuts.windows(2)
        .map(|w| {
            let mut layout = BatchLayout::default();
            layout.push_seq(&ids[w[0]..w[1]], w[0], &table, BLOCK, true);
            model.forward(&layout, &mut cache).unwrap()
        })
        .collect()
}

#[test]
fn logits_match_the_cpu_backend_through_prefill_chunks_and_decode() {
    if skip() {
        return;
    }
    for name in ["tiny-llama", "tiny-qwen2"] {
        let ids = prompt(3, 300);
        let gpu = stepwise(&cuda_model(name, false), &ids, 170);
        let cpu = stepwise(&cpu_model(name), &ids, 170);
        for (step, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
            let d = rel_diff(g, c);
            assert!(d < BF16_TOLERANCE, "{name} step {step}: relative Δ {d}");
        }
    }
}

/// GGUF weights in quantized blocks (Q8_0 and Q4_0) are dequantized to
/// bf16 at load: the device's logits stay within bf16 tolerance of the CPU
/// backend's on the same file (which multiplies by the blocks).
#[test]
fn quantized_gguf_weights_on_the_device_match_the_cpu_backend() {
    if skip() {
        return;
    }
    use gguf_writer::model::{Stored, to_gguf};
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny-llama-q8_0-q4_0.gguf");
    std::fs::write(&path, to_gguf(&fixture("tiny-llama"), Stored::Quantized)).unwrap();
    let ids = prompt(5, 200);
    let gpu = stepwise(&cuda_model_at(&path, false), &ids, 120);
    let cpu = stepwise(
        &LlamaModel::load(&path, CpuBackend, MAX_LEN).unwrap(),
        &ids,
        120,
    );
    for (step, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
        let d = rel_diff(g, c);
        assert!(d < BF16_TOLERANCE, "step {step}: relative Δ {d}");
    }
}

fn engine<B>(model: LlamaModel<B>, name: &str, num_blocks: usize) -> EngineHandle
where
    B: Backend + 'static,
    B::KvCache: Send,
    B::Weight: Send,
    B::Rope: Send,
{
    let tokenizer = Arc::new(TextTokenizer::from_dir(&fixture(name)).unwrap());
    let options = EngineOptions {
        scheduler: SchedulerConfig {
            max_num_seqs: 32,
            max_num_batched_tokens: 512,
            long_prefill_chunk: 256,
            max_model_len: MAX_LEN,
            aging: Duration::from_secs(5),
            prefix_caching: true,
        },
        num_blocks,
        block_size: BLOCK,
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
        ignore_eos: true,
        priority: Priority::Normal,
        grammar: None,
    }
}

fn collect(engine: &EngineHandle, req: GenerateRequest) -> (Vec<u32>, Usage) {
    drain(engine.submit(req).unwrap())
}

fn drain(mut stream: weir_engine::engine::ResponseStream) -> (Vec<u32>, Usage) {
    let mut tokens = Vec::new();
    loop {
        match stream.blocking_recv().expect("stream ended early") {
            Event::Token(t) => tokens.push(t.token),
            Event::PromptLogprobs(_) => {}
            Event::Finished { usage, .. } => return (tokens, usage),
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
}

#[test]
fn greedy_tokens_equal_the_cpu_backend_for_64_steps_with_graphs() {
    if skip() {
        return;
    }
    let gpu = engine(cuda_model("tiny-llama", true), "tiny-llama", 512);
    let cpu = engine(cpu_model("tiny-llama"), "tiny-llama", 512);
    for seed in 0..4 {
        let req = request(
            prompt(seed, 20 + 7 * seed as usize),
            64,
            SamplingParams::greedy(),
        );
        assert_eq!(
            collect(&gpu, req.clone()).0,
            collect(&cpu, req).0,
            "prompt {seed}"
        );
    }
}

#[test]
fn batch_invariance_prefix_reuse_and_preemption() {
    if skip() {
        return;
    }
    let big = engine(cuda_model("tiny-llama", true), "tiny-llama", 512);
    let target = request(prompt(1, 37), 24, SamplingParams::greedy());
    let (alone, _) = collect(&big, target.clone());
    // The same request among others of every length (decode buckets of
    // several sizes, mixed prefill and decode steps).
    let others: Vec<_> = (0..16)
        .map(|i| {
            let r = request(
                prompt(100 + i, 5 + 13 * i as usize),
                8 + i as usize,
                SamplingParams::greedy(),
            );
            big.submit(r).unwrap()
        })
        .collect();
    assert_eq!(collect(&big, target.clone()).0, alone, "batch invariance");
    drop(others);
    // Prefix reuse: a second prompt sharing 992 tokens of prefix.
    let prefix = prompt(7, 1000);
    let with = |s: u32| {
        let mut p = prefix.clone();
        p.extend(prompt(s, 12));
        request(p, 8, SamplingParams::greedy())
    };
    let (first, _) = collect(&big, with(1));
    let (second, usage) = collect(&big, with(2));
    assert_eq!(usage.cached_tokens, 992);
    let cold = engine(cuda_model("tiny-llama", true), "tiny-llama", 512);
    assert_eq!(
        collect(&cold, with(2)).0,
        second,
        "reuse does not change the output"
    );
    assert_ne!(first, Vec::<u32>::new());
    // Preemption: a pool too small for all requests at once.
    let small = engine(cuda_model("tiny-llama", true), "tiny-llama", 24);
    let reqs: Vec<_> = (0..6)
        .map(|i| request(prompt(50 + i, 60), 40, SamplingParams::greedy()))
        .collect();
    let streams: Vec<_> = reqs
        .iter()
        .map(|r| small.submit(r.clone()).unwrap())
        .collect();
    let outputs: Vec<_> = streams.into_iter().map(|s| drain(s).0).collect();
    assert!(
        small.stats().snapshot().preemptions > 0,
        "the small pool preempted"
    );
    for (r, tokens) in reqs.iter().zip(outputs) {
        assert_eq!(
            tokens,
            collect(&big, r.clone()).0,
            "preempted output matches"
        );
    }
}

#[test]
fn seeded_sampling_on_the_device_is_reproducible_and_honours_penalties() {
    if skip() {
        return;
    }
    let gpu = engine(cuda_model("tiny-llama", true), "tiny-llama", 512);
    let mut params = SamplingParams::greedy();
    params.temperature = 0.8;
    params.top_k = Some(20);
    params.top_p = 0.9;
    params.seed = Some(42);
    let req = request(prompt(9, 30), 48, params.clone());
    let (a, _) = collect(&gpu, req.clone());
    let (b, _) = collect(&gpu, req);
    assert_eq!(a, b, "same seed, same tokens");
    params.seed = Some(43);
    let (c, _) = collect(&gpu, request(prompt(9, 30), 48, params.clone()));
    assert_ne!(a, c, "another seed, other tokens");
    // A strong presence penalty forbids repeating any generated token.
    let mut pen = SamplingParams::greedy();
    pen.presence_penalty = 2.0;
    pen.repetition_penalty = 2.0;
    let (tokens, _) = collect(&gpu, request(prompt(2, 10), 40, pen));
    let (plain, _) = collect(&gpu, request(prompt(2, 10), 40, SamplingParams::greedy()));
    assert_ne!(tokens, plain, "penalties change greedy output");
}
