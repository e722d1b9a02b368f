//! The engine side of `scripts/gpu-check.sh`, built here and carried to a
//! GPU machine (which has no Rust):
//!
//! * `cuda_check info` — the device, as one JSON line;
//! * `cuda_check logits --model DIR --tokens 1,2,3 [--backend cuda|cpu]
//!   --out FILE [--greedy N]` — logits of every prompt position as
//!   little-endian f32 `[rows][vocab]` in FILE, then optionally `N` greedy
//!   tokens (EOS ignored), each summary as a JSON line;
//! * `cuda_check bench --shape llama3.2-1b|llama3-8b [--batches 1,32,128]
//!   [--prompt 128] [--gen 128] [--prefill 2048]` — decode and prefill
//!   throughput on random bf16 weights made on the device, with the copy
//!   bandwidth and bf16 GEMM rate measured in the same run, as one JSON line.

#![allow(clippy::print_stdout)] // a command-line tool that prints its results

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;
use weir_engine::backend::cpu::CpuBackend;
use weir_engine::backend::cuda::plan::StepLimits;
use weir_engine::backend::cuda::{CudaBackend, CudaOptions, device, nvrtc};
use weir_engine::backend::{Backend, BatchLayout};
use weir_engine::config::{Architecture, ModelConfig, RopeScaling};
use weir_engine::model::LlamaModel;
use weir_engine::sampler::{BatchRow, SamplingParams, SequenceRng, TokenHistory};
use weir_engine::weights::Weights;

type Failure = Box<dyn std::error::Error>;

const BLOCK: usize = 16;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("info") => info(),
        Some("logits") => logits(&flags(&args[1..])),
        Some("bench") => bench(&flags(&args[1..])),
        _ => Err("usage: cuda_check info | logits --model DIR --tokens IDS --out FILE [--backend cuda|cpu] [--greedy N] | bench --shape NAME [--batches 1,32,128] [--prompt 128] [--gen 128] [--prefill 2048]".into()),
    };
    if let Err(e) = result {
        println!("{}", json!({ "error": e.to_string() }));
        std::process::exit(1);
    }
}

fn flags(args: &[String]) -> HashMap<String, String> {
    args.chunks(2)
        .filter_map(|p| Some((p[0].trim_start_matches("--").to_owned(), p.get(1)?.clone())))
        .collect()
}

fn list(value: Option<&String>, default: &str) -> Result<Vec<usize>, Failure> {
    value
        .map_or(default, String::as_str)
        .split(',')
        .map(|v| v.trim().parse::<usize>().map_err(Into::into))
        .collect()
}

fn num(f: &HashMap<String, String>, key: &str, default: usize) -> Result<usize, Failure> {
    Ok(f.get(key)
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(default))
}

fn info() -> Result<(), Failure> {
    if let Some(reason) = device::unavailable_reason() {
        return Err(reason.into());
    }
    let gpu = device::Gpu::open(0, 1 << 20)?;
    let i = gpu.info()?;
    let v = nvrtc::version()?;
    println!(
        "{}",
        json!({
            "device": i.name, "arch": i.arch.sm(), "sms": i.sm_count,
            "memory_total": i.total_bytes, "memory_free": i.free_bytes,
            "nvrtc": format!("{}.{}", v.0, v.1),
        })
    );
    Ok(())
}

fn cuda_backend(config: &ModelConfig, limits: StepLimits) -> Result<CudaBackend, Failure> {
    Ok(CudaBackend::new(
        config,
        CudaOptions {
            device: 0,
            limits,
            graphs: true,
            kernel_cache: nvrtc::default_cache_dir(),
        },
    )?)
}

fn logits(f: &HashMap<String, String>) -> Result<(), Failure> {
    let dir = PathBuf::from(f.get("model").ok_or("--model DIR is required")?);
    let out = PathBuf::from(f.get("out").ok_or("--out FILE is required")?);
    let tokens: Vec<u32> = list(f.get("tokens"), "")?
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let greedy = num(f, "greedy", 0)?;
    let config = ModelConfig::from_dir(&dir)?;
    let context = (tokens.len() + greedy + 1).div_ceil(BLOCK) * BLOCK;
    let weights = Weights::open(&dir)?;
    match f.get("backend").map_or("cuda", String::as_str) {
        "cpu" => {
            let model = LlamaModel::from_weights(config, &weights, CpuBackend, context)?;
            run_logits(&model, &tokens, greedy, &out)
        }
        _ => {
            let limits = StepLimits {
                max_rows: tokens.len(),
                max_seqs: tokens.len(),
                max_context: context,
                block_size: BLOCK,
            };
            let backend = cuda_backend(&config, limits)?;
            let model = LlamaModel::from_weights(config, &weights, backend, context)?;
            run_logits(&model, &tokens, greedy, &out)
        }
    }
}

fn run_logits<B: Backend>(
    model: &LlamaModel<B>,
    tokens: &[u32],
    greedy: usize,
    out: &PathBuf,
) -> Result<(), Failure> {
    let context = tokens.len() + greedy + 1;
    let blocks = context.div_ceil(BLOCK);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut cache = model.alloc_kv_cache(blocks, BLOCK)?;
    let mut layout = BatchLayout::default();
    layout.push_seq(tokens, 0, &table, BLOCK, false);
    layout.logits_rows = (0..tokens.len() as u32).collect();
    let logits = model.forward(&layout, &mut cache)?;
    let vocab = model.config().vocab_size;
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out, bytes)?;
    println!("{}", json!({ "rows": tokens.len(), "vocab": vocab }));
    if greedy == 0 {
        return Ok(());
    }
    let argmax = |row: &[f32]| {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        row.iter().position(|&v| v == max).unwrap_or(0) as u32
    };
    let mut next = argmax(&logits[(tokens.len() - 1) * vocab..]);
    let mut generated = vec![next];
    while generated.len() < greedy {
        let mut step = BatchLayout::default();
        step.push_seq(
            &[next],
            tokens.len() + generated.len() - 1,
            &table,
            BLOCK,
            true,
        );
        let row = model.forward(&step, &mut cache)?;
        next = argmax(&row);
        generated.push(next);
    }
    println!("{}", json!({ "greedy": generated }));
    Ok(())
}

/// The benchmark shapes, as `../shared/bench/` builds them.
fn shape(name: &str) -> Result<ModelConfig, Failure> {
    let (h, inter, layers, tied) = match name {
        "llama3.2-1b" => (2048, 8192, 16, true),
        "llama3-8b" => (4096, 14336, 32, false),
        other => return Err(format!("unknown shape {other}").into()),
    };
    Ok(ModelConfig {
        architecture: Architecture::Llama,
        hidden_size: h,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: h / 32,
        vocab_size: 128_256,
        max_position_embeddings: 8192,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: RopeScaling::None,
        qkv_bias: false,
        o_bias: false,
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_ids: vec![],
    })
}

fn bench(f: &HashMap<String, String>) -> Result<(), Failure> {
    let name = f.get("shape").ok_or("--shape is required")?.clone();
    let config = shape(&name)?;
    let batches = list(f.get("batches"), "1,32,128")?;
    let (prompt, gen_len, prefill) = (
        num(f, "prompt", 128)?,
        num(f, "gen", 128)?,
        num(f, "prefill", 2048)?,
    );
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let decode_ctx = prompt + gen_len + 1;
    let limits = StepLimits {
        max_rows: prefill.max(prompt),
        max_seqs: max_batch,
        max_context: decode_ctx.max(prefill + 1),
        block_size: BLOCK,
    };
    let backend = cuda_backend(&config, limits)?;
    let copy_bw = backend.copy_bandwidth(1 << 30, 10)?;
    let gemm = backend.gemm_rate(8192, 10)?;
    let tied = config.tie_word_embeddings;
    let model = LlamaModel::from_loader(
        config,
        backend,
        limits.max_context,
        tied,
        |b, name, shape| {
            let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
                (h ^ u64::from(c)).wrapping_mul(0x100_0000_01b3)
            });
            if name.ends_with("norm.weight") {
                Ok(b.random_weight(shape, seed, 1.0, 0.0)?)
            } else {
                Ok(b.random_weight(shape, seed, 0.0, 0.02)?)
            }
        },
    )?;
    let per_seq = limits.max_context.div_ceil(BLOCK);
    let blocks = per_seq * max_batch.max(1) + per_seq;
    let mut cache = model.alloc_kv_cache(blocks, BLOCK)?;
    let mut decode = serde_json::Map::new();
    for &batch in &batches {
        let tok_s = decode_rate(&model, &mut cache, batch, prompt, gen_len, per_seq)?;
        decode.insert(batch.to_string(), json!(tok_s));
    }
    let prefill_tok_s = prefill_rate(&model, &mut cache, prefill, per_seq)?;
    let b = model.backend();
    println!(
        "{}",
        json!({
            "shape": name, "device": b.info().name,
            "copy_bw_GBps": copy_bw / 1e9, "gemm_bf16_tflops": gemm / 1e12,
            "weight_bytes": b.weight_bytes(), "decode_tok_s": decode,
            "prefill_tok_s": prefill_tok_s, "workspace_peak_bytes": b.workspace_peak(),
        })
    );
    Ok(())
}

fn tables(batch: usize, per_seq: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect()
}

/// Generated tokens per second over `gen_len` decode steps of `batch`
/// sequences after `prompt`-token prompts, sampling greedily on the device.
fn decode_rate(
    model: &LlamaModel<CudaBackend>,
    cache: &mut <CudaBackend as Backend>::KvCache,
    batch: usize,
    prompt: usize,
    gen_len: usize,
    per_seq: usize,
) -> Result<f64, Failure> {
    let tables = tables(batch, per_seq);
    let prompt_ids: Vec<u32> = (0..prompt as u32).map(|i| (i * 7919) % 128_000).collect();
    // Prompts go in steps of at most 2,048 rows (the workspace's bound).
    let seqs_per_step = (2048 / prompt.max(1)).max(1);
    for group in tables.chunks(seqs_per_step) {
        let mut layout = BatchLayout::default();
        for t in group {
            layout.push_seq(&prompt_ids, 0, t, BLOCK, false);
        }
        model.forward_logits(&layout, cache)?;
    }
    let params = SamplingParams::greedy();
    let history = TokenHistory::new(&[1]);
    let mut rngs: Vec<SequenceRng> = (0..batch).map(|_| SequenceRng::from_seed(0)).collect();
    let mut step = |pos: usize, tokens: &[u32]| -> Result<Vec<u32>, Failure> {
        let mut layout = BatchLayout::default();
        for (t, &tok) in tables.iter().zip(tokens) {
            layout.push_seq(&[tok], pos, t, BLOCK, true);
        }
        let logits = model.forward_logits(&layout, cache)?.ok_or("no logits")?;
        let mut rows: Vec<BatchRow<'_>> = rngs
            .iter_mut()
            .map(|rng| BatchRow {
                params: &params,
                history: &history,
                rng,
                mask: None,
            })
            .collect();
        let out = model.backend().sample(logits, &mut rows)?;
        Ok(out.into_iter().map(|o| o.map_or(0, |o| o.token)).collect())
    };
    // One step captures the bucket's graph; it is not timed.
    let mut tokens = step(prompt, &vec![1; batch])?;
    let start = Instant::now();
    for i in 0..gen_len {
        tokens = step(prompt + i, &tokens)?;
    }
    Ok((batch * gen_len) as f64 / start.elapsed().as_secs_f64())
}

/// Prompt tokens per second for one `len`-token prompt in one step.
fn prefill_rate(
    model: &LlamaModel<CudaBackend>,
    cache: &mut <CudaBackend as Backend>::KvCache,
    len: usize,
    per_seq: usize,
) -> Result<f64, Failure> {
    let table: Vec<u32> = (0..per_seq as u32).collect();
    let ids: Vec<u32> = (0..len as u32).map(|i| (i * 104_729) % 128_000).collect();
    let mut layout = BatchLayout::default();
    layout.push_seq(&ids, 0, &table, BLOCK, true);
    model.forward(&layout, cache)?;
    let reps = 3;
    let start = Instant::now();
    for _ in 0..reps {
        model.forward(&layout, cache)?;
    }
    Ok((len * reps) as f64 / start.elapsed().as_secs_f64())
}
