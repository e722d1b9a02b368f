//! CPU throughput of a GGUF model with its quantized weights dequantized to
//! f32 at load, kept as blocks multiplied in f32 (the default), and kept
//! as blocks with 8-bit activations, in one run:
//! `cargo run --release -p weir-engine --example cpu_bench -- --model FILE.gguf [--threads 2]`.
//! Add `--decode-only q8|blocks|f32 [--steps N] [--seqs N]` to run one
//! path's decode alone (batch 1 unless `--seqs`), for a profiler. Everything runs on a worker of
//! rayon's pool, as the engine's step loop does.
//! Prints prefill tok/s of a 512-token prompt, decode tok/s at batch 1,
//! total tok/s of 8 and 32 sequences decoding together, the resident size
//! of each loaded model, and each path's ratio to the f32 one.

#![allow(clippy::print_stdout)] // the table is the output

use std::path::{Path, PathBuf};
use std::time::Instant;

use weir_engine::backend::BatchLayout;
use weir_engine::backend::cpu::CpuBackend;
use weir_engine::config::ModelConfig;
use weir_engine::model::LlamaModel;
use weir_engine::weights::{QuantizedWeights, Weights};

type Model = LlamaModel<CpuBackend>;
const BLOCK: usize = 16;

/// Resident set size of this process in bytes.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn load(path: &Path, quantized: QuantizedWeights) -> (Model, usize) {
    let before = rss();
    let config = ModelConfig::from_dir(path).expect("config");
    let weights = Weights::open(path)
        .expect("weights")
        .with_quantized(quantized);
    let model = LlamaModel::from_weights(config, &weights, CpuBackend, 1024).expect("model");
    drop(weights);
    (model, rss().saturating_sub(before))
}

fn tokens(n: usize, seed: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % (vocab - 256) + 200) as u32)
        .collect()
}

fn prefill_tok_s(model: &Model) -> f64 {
    let vocab = model.config().vocab_size;
    let prompt = tokens(512, 1, vocab);
    let table: Vec<u32> = (0..(512 / BLOCK) as u32).collect();
    let mut best = f64::MAX;
    for _ in 0..2 {
        let mut cache = model.alloc_kv_cache(table.len(), BLOCK).expect("cache");
        let mut layout = BatchLayout::default();
        layout.push_seq(&prompt, 0, &table, BLOCK, true);
        let started = Instant::now();
        model.forward(&layout, &mut cache).expect("forward");
        best = best.min(started.elapsed().as_secs_f64());
    }
    512.0 / best
}

/// `seqs` sequences with 32-token prompts, then `steps` decode steps with
/// all of them in each batch: generated tokens per second.
fn decode_tok_s(model: &Model, seqs: usize, steps: usize) -> f64 {
    let vocab = model.config().vocab_size;
    let per_seq = (32 + steps).div_ceil(BLOCK);
    let mut cache = model.alloc_kv_cache(seqs * per_seq, BLOCK).expect("cache");
    let tables: Vec<Vec<u32>> = (0..seqs)
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect();
    let mut layout = BatchLayout::default();
    for (s, table) in tables.iter().enumerate() {
        layout.push_seq(&tokens(32, s + 2, vocab), 0, table, BLOCK, true);
    }
    model.forward(&layout, &mut cache).expect("prefill");
    let started = Instant::now();
    for step in 0..steps {
        let mut layout = BatchLayout::default();
        for (s, table) in tables.iter().enumerate() {
            let token = tokens(1, s + step + 3, vocab);
            layout.push_seq(&token, 32 + step, table, BLOCK, true);
        }
        model.forward(&layout, &mut cache).expect("decode");
    }
    (seqs * steps) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let path = PathBuf::from(arg("--model").expect("--model FILE.gguf is required"));
    let threads: usize = arg("--threads").map_or(2, |t| t.parse().expect("--threads N"));
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("rayon");
    println!(
        "{} with {threads} threads, kernels {:?}",
        path.display(),
        weir_engine::backend::cpu::simd::Isa::detect()
    );

    // `--decode-only q8|blocks|f32 [--steps N] [--seqs N]`: one path's
    // decode and nothing else, for a profiler.
    if let Some(mode) = arg("--decode-only") {
        let mode = match mode.as_str() {
            "q8" => QuantizedWeights::BlocksQ8,
            "f32" => QuantizedWeights::Dequantize,
            _ => QuantizedWeights::Blocks,
        };
        let steps = arg("--steps").map_or(256, |s| s.parse().expect("--steps N"));
        let (model, _) = load(&path, mode);
        let seqs = arg("--seqs").map_or(1, |s| s.parse().expect("--seqs N"));
        let tok_s = rayon::scope(|_| decode_tok_s(&model, seqs, steps));
        println!("decode {seqs} seqs tok/s {tok_s:.1}");
        return;
    }
    let modes = [
        QuantizedWeights::Dequantize,
        QuantizedWeights::Blocks,
        QuantizedWeights::BlocksQ8,
    ];
    let mut results = Vec::new();
    for mode in modes {
        let (model, bytes) = load(&path, mode);
        // On a worker of the pool, as the engine's step loop runs.
        let r = rayon::scope(|_| {
            [
                bytes as f64 / 1048576.0,
                prefill_tok_s(&model),
                decode_tok_s(&model, 1, 64),
                decode_tok_s(&model, 8, 32),
                decode_tok_s(&model, 32, 16),
            ]
        });
        results.push(r);
    }
    let names = [
        "resident MiB",
        "prefill 512 tok/s",
        "decode b=1 tok/s",
        "decode 8 seqs tok/s",
        "decode 32 seqs tok/s",
    ];
    println!(
        "{:<22} {:>9} {:>9} {:>6} {:>9} {:>6}",
        "", "f32", "blocks", "ratio", "blocks-q8", "ratio"
    );
    for (i, name) in names.iter().enumerate() {
        let (f, b, q) = (results[0][i], results[1][i], results[2][i]);
        println!(
            "{name:<22} {f:>9.1} {b:>9.1} {:>6.2} {q:>9.1} {:>6.2}",
            b / f,
            q / f
        );
    }
}
