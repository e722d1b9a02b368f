//! Starting a model's engine on a device: the CUDA backend when a GPU,
//! its driver, NVRTC and cuBLAS are there, the CPU backend otherwise (or
//! when `WEIR_DEVICE=cpu`). The choice is logged: once per model with the
//! device, its memory and the KV pool on a GPU, and once per process with
//! the reason when there is no GPU.

use std::path::Path;
use std::sync::{Arc, Once};

use weir_crds::common::{Dtype, EngineConfig};
use weir_engine::EngineError;
use weir_engine::backend::cpu::CpuBackend;
use weir_engine::backend::cuda::plan::StepLimits;
use weir_engine::backend::cuda::{CudaBackend, CudaOptions, device, nvrtc};
use weir_engine::config::ModelConfig;
use weir_engine::engine::{EngineHandle, EngineOptions};
use weir_engine::model::LlamaModel;
use weir_engine::tokenizer::TextTokenizer;
use weir_engine::weights::Weights;

/// Which device models run on (`WEIR_DEVICE`: `auto`, `cpu` or `cuda`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA when usable, else the CPU.
    Auto,
    /// Always the CPU.
    Cpu,
    /// CUDA, or the model fails to load.
    Cuda,
}

impl DeviceChoice {
    /// From `WEIR_DEVICE` (unset or unknown: `Auto`, with a warning for an
    /// unknown value).
    pub fn from_env() -> Self {
        match std::env::var("WEIR_DEVICE").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Self::Auto,
            Ok("cpu") => Self::Cpu,
            Ok("cuda") => Self::Cuda,
            Ok(other) => {
                tracing::warn!(
                    value = other,
                    "WEIR_DEVICE is not auto, cpu or cuda; using auto"
                );
                Self::Auto
            }
        }
    }
}

/// A started engine and where it runs.
pub struct StartedEngine {
    /// The engine.
    pub engine: EngineHandle,
    /// `cpu` or `cuda`.
    pub backend: &'static str,
    /// KV blocks of its pool.
    pub kv_blocks: usize,
}

/// KV blocks for the CPU backend: enough for `max_num_seqs` sequences of a
/// quarter of the context each, at least two full contexts.
fn cpu_kv_blocks(max_model_len: usize, block_size: usize, max_num_seqs: usize) -> usize {
    let per_seq = max_model_len.div_ceil(block_size);
    (per_seq * 2).max(per_seq * max_num_seqs / 4).min(1 << 16)
}

static NO_GPU_LOGGED: Once = Once::new();

/// Loads the weights of `dir` and starts the engine on the chosen device.
/// `options.num_blocks` is replaced by the device's own sizing.
pub fn start_engine(
    dir: &Path,
    config: ModelConfig,
    engine: &EngineConfig,
    tokenizer: Arc<TextTokenizer>,
    mut options: EngineOptions,
) -> Result<StartedEngine, EngineError> {
    let max_model_len = options.scheduler.max_model_len;
    let choice = DeviceChoice::from_env();
    let reason = match choice {
        DeviceChoice::Cpu => Some("WEIR_DEVICE=cpu".to_owned()),
        _ => device::unavailable_reason(),
    };
    if let Some(reason) = reason {
        if choice == DeviceChoice::Cuda {
            return Err(EngineError::Backend(format!(
                "WEIR_DEVICE=cuda, but there is no usable GPU: {reason}"
            )));
        }
        NO_GPU_LOGGED.call_once(|| {
            tracing::info!(backend = "cpu", %reason, "no usable GPU: models run on the CPU backend");
        });
        let model = LlamaModel::load(dir, CpuBackend, max_model_len)?;
        options.num_blocks = cpu_kv_blocks(
            max_model_len,
            options.block_size,
            options.scheduler.max_num_seqs,
        );
        let kv_blocks = options.num_blocks;
        return Ok(StartedEngine {
            engine: EngineHandle::start(model, tokenizer, options)?,
            backend: "cpu",
            kv_blocks,
        });
    }
    if matches!(engine.dtype, Dtype::Float16 | Dtype::Float32) {
        return Err(EngineError::Backend(format!(
            "engine.dtype {:?} is not supported on the CUDA backend, which computes in bf16 \
             with f32 accumulation; use Auto or BFloat16",
            engine.dtype
        )));
    }
    // The workspace is sized for the engine's hard limits, which adaptive
    // batching and later policies never exceed.
    let limits = StepLimits {
        max_rows: (engine.max_num_batched_tokens as usize)
            .max(options.scheduler.max_num_batched_tokens),
        max_seqs: (engine.max_num_seqs as usize).max(options.scheduler.max_num_seqs),
        max_context: max_model_len,
        block_size: options.block_size,
    };
    let backend = CudaBackend::new(
        &config,
        CudaOptions {
            device: 0,
            limits,
            graphs: std::env::var_os("WEIR_CUDA_GRAPHS").is_none_or(|v| v != "0"),
            kernel_cache: nvrtc::default_cache_dir(),
        },
    )?;
    let weights = Weights::open(dir)?;
    let model = LlamaModel::from_weights(config, &weights, backend, max_model_len)?;
    drop(weights);
    let cuda = model.backend();
    options.num_blocks = cuda.plan_kv_blocks(engine.gpu_memory_utilization)?;
    let info = cuda.info().clone();
    tracing::info!(
        backend = "cuda",
        device = %info.name,
        arch = %info.arch.sm(),
        memory_total_mib = info.total_bytes >> 20,
        memory_free_mib = info.free_bytes >> 20,
        weights_mib = cuda.weight_bytes() >> 20,
        workspace_mib = cuda.workspace_bytes() >> 20,
        kv_blocks = options.num_blocks,
        block_size = options.block_size,
        "model on the GPU"
    );
    let kv_blocks = options.num_blocks;
    Ok(StartedEngine {
        engine: EngineHandle::start(model, tokenizer, options)?,
        backend: "cuda",
        kv_blocks,
    })
}
