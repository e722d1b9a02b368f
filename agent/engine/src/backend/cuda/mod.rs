//! The CUDA backend: bf16 weights and KV cache, f32 accumulation, kernels
//! compiled by NVRTC to CUBIN for the device's own architecture, cuBLAS
//! for every GEMM, paged attention, on-device sampling and CUDA graphs for
//! decode steps.
//!
//! This module is the only place in the engine with `unsafe` (in
//! [`device`] and [`nvrtc`]); every block says why it is sound. Nothing
//! CUDA is needed to build it: the driver, NVRTC and cuBLAS are loaded at
//! run time, and without them [`CudaBackend::new`] returns an error that
//! says what is missing.
//!
//! Memory: weights and the KV pool are device allocations made at load;
//! every tensor of a step lives in one workspace allocated at start and
//! handed out by a deterministic [`arena::Arena`], so a step allocates no
//! device memory; a step's metadata goes up in one copy from pinned memory
//! ([`meta`]); sampling brings back only token ids and log probabilities.
//!
//! CUDA graphs: a decode step whose batch fits a bucket of
//! [`plan::GRAPH_BUCKETS`] is padded to the bucket, captured the first time
//! and replayed afterwards. Invariants this relies on: a step's tensors are
//! all dropped before the next step's `prepare`; the model issues the same
//! operations for the same bucket; and a captured graph's output is read
//! before another step runs (its workspace range is reused by others).

#![allow(unsafe_code)]

pub mod arena;
pub mod device;
pub mod host;
pub mod kernels;
pub mod meta;
pub mod nvrtc;
mod ops;
pub mod plan;
mod sample;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arena::Arena;
use device::{DeviceBuffer, DeviceInfo, Fence, Function, Gpu, Graph, Module, PinnedBuffer};
use meta::{MetaOffsets, StepShape};
use plan::StepLimits;

use crate::backend::KvCacheShape;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};

/// Settings of a CUDA backend.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Device ordinal.
    pub device: usize,
    /// Limits of one step (rows, sequences, context, block size).
    pub limits: StepLimits,
    /// Capture decode steps as CUDA graphs.
    pub graphs: bool,
    /// Where compiled kernels are cached (`None`: compile at every start).
    pub kernel_cache: Option<PathBuf>,
}

/// Element type of a tensor on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// f32 (the residual stream, logits).
    F32,
    /// bf16 bit patterns (everything a GEMM reads).
    BF16,
}

impl DType {
    fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }
}

/// A workspace range that goes back to the arena when dropped.
struct Lease {
    arena: Arc<Mutex<Arena>>,
    offset: usize,
    len: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut arena = self.arena.lock().unwrap_or_else(|p| p.into_inner());
        arena.release(self.offset, self.len);
    }
}

/// Activations on the device: `rows × cols` of `dtype` in the workspace.
pub struct CudaTensor {
    rows: usize,
    cols: usize,
    dtype: DType,
    ptr: u64,
    /// Rows the caller asked for (the rest pad a graph bucket).
    valid_rows: usize,
    /// The workspace range; `None` for a captured step's logits, which
    /// live in that step's own buffer.
    _lease: Option<Arc<Lease>>,
}

impl CudaTensor {
    fn len(&self) -> usize {
        self.rows * self.cols
    }
}

/// A bf16 weight on the device: a matrix `[rows, cols]` or a vector.
pub struct CudaWeight {
    rows: usize,
    cols: usize,
    ptr: u64,
    _buf: DeviceBuffer,
}

/// The RoPE cos/sin tables on the device (f32).
pub struct CudaRope {
    cos: DeviceBuffer,
    sin: DeviceBuffer,
    max_positions: usize,
    half_dim: usize,
}

/// The paged KV cache: one allocation holding K then V of every layer, with
/// one extra block at the end that padding rows write to.
pub struct CudaKvCache {
    shape: KvCacheShape,
    buf: DeviceBuffer,
    layer_bytes: usize,
}

impl CudaKvCache {
    fn k(&self, layer: usize) -> u64 {
        self.buf.ptr + (2 * layer * self.layer_bytes) as u64
    }

    fn v(&self, layer: usize) -> u64 {
        self.buf.ptr + ((2 * layer + 1) * self.layer_bytes) as u64
    }

    /// Slots including the padding block.
    fn num_slots(&self) -> usize {
        (self.shape.num_blocks + 1) * self.shape.block_size
    }
}

/// One step as uploaded.
pub struct CudaBatch {
    shape: StepShape,
}

/// Device addresses of the per-step metadata arrays.
#[derive(Clone, Copy, Debug)]
struct MetaPtrs {
    token_ids: u64,
    positions: u64,
    slots: u64,
    logits_rows: u64,
    context_lens: u64,
    block_tables: u64,
    tile: [u64; 4],
}

/// A captured decode step and the buffer its replay leaves the logits in
/// (the graph's last node copies them there, so no workspace range stays
/// reserved between steps).
struct CapturedStep {
    graph: Graph,
    logits: DeviceBuffer,
    rows: usize,
    cols: usize,
}

/// The CUDA backend of one engine.
pub struct CudaBackend {
    info: DeviceInfo,
    config: ModelConfig,
    options: CudaOptions,
    kernels: HashMap<&'static str, Function>,
    graphs: RefCell<HashMap<usize, CapturedStep>>,
    /// Buckets whose capture failed: they run eagerly from then on.
    no_graph: RefCell<Vec<usize>>,
    arena: Arc<Mutex<Arena>>,
    workspace: DeviceBuffer,
    meta: DeviceBuffer,
    meta_ptrs: MetaPtrs,
    staging: RefCell<PinnedBuffer>,
    /// Passed once the last metadata upload has read `staging`.
    staging_read: Fence,
    /// Positions the RoPE table covers (set by `load_rope`).
    rope_positions: Cell<usize>,
    sampling: sample::SampleBuffers,
    ones: DeviceBuffer,
    weight_bytes: RefCell<usize>,
    /// The KV padding block (the pool's block count), once allocated.
    pad_block: Cell<Option<usize>>,
    /// Free device memory before anything was loaded.
    free_at_start: usize,
    _modules: Vec<Module>,
    gpu: Gpu,
}

impl CudaBackend {
    /// Opens the GPU, compiles (or reads from the cache) every kernel for its
    /// architecture and allocates the step workspace for `config` under
    /// `options.limits`. Missing driver or libraries, an unsupported
    /// architecture, an unsupported model shape, a compile failure or too
    /// little memory are errors that say so.
    pub fn new(config: &ModelConfig, options: CudaOptions) -> Result<Self> {
        plan::check_attention_shape(config)?;
        let gpu = Gpu::open(options.device, plan::CUBLAS_WORKSPACE_BYTES)?;
        let info = gpu.info()?;
        if !info.arch.is_supported() {
            return Err(EngineError::Backend(format!(
                "{} is {}; the CUDA backend needs sm_80 (Ampere) or newer",
                info.name,
                info.arch.sm()
            )));
        }
        let free_at_start = info.free_bytes;
        let mut modules = Vec::new();
        let mut kernels = HashMap::new();
        for m in kernels::MODULES {
            let (cubin, _cached) = nvrtc::compile_cached(
                m.name,
                &m.full_source(),
                info.arch,
                options.kernel_cache.as_deref(),
            )?;
            let module = gpu.load_module(&cubin)?;
            for &k in m.kernels {
                kernels.insert(k, module.function(k)?);
            }
            modules.push(module);
        }
        let limits = options.limits;
        let ws_bytes = plan::workspace_bytes(config, &limits);
        let workspace = gpu.alloc_zeroed(ws_bytes)?;
        let offsets = MetaOffsets::new(&limits);
        let meta = gpu.alloc_zeroed(offsets.total * 4)?;
        let word = |off: usize| meta.ptr + (off * 4) as u64;
        let meta_ptrs = MetaPtrs {
            token_ids: word(offsets.token_ids),
            positions: word(offsets.positions),
            slots: word(offsets.slots),
            logits_rows: word(offsets.logits_rows),
            context_lens: word(offsets.context_lens),
            block_tables: word(offsets.block_tables),
            tile: [0, 1, 2, 3].map(|i| word(offsets.tile_array(i, &limits))),
        };
        let staging = gpu.alloc_pinned(offsets.total * 4)?;
        let sampling = sample::SampleBuffers::new(&gpu, &limits)?;
        let rows = limits.padded_rows();
        let ones = gpu.alloc_zeroed(rows * 2)?;
        gpu.upload(ones.ptr, &vec![host::bf16_bits(1.0); rows], ones.bytes)?;
        Ok(Self {
            info,
            config: config.clone(),
            arena: Arc::new(Mutex::new(Arena::new(ws_bytes))),
            workspace,
            meta,
            meta_ptrs,
            staging: RefCell::new(staging),
            staging_read: gpu.fence()?,
            rope_positions: Cell::new(0),
            sampling,
            ones,
            kernels,
            graphs: RefCell::new(HashMap::new()),
            no_graph: RefCell::new(Vec::new()),
            weight_bytes: RefCell::new(0),
            pad_block: Cell::new(None),
            free_at_start,
            options,
            _modules: modules,
            gpu,
        })
    }

    /// The device.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Bytes of weights loaded so far.
    pub fn weight_bytes(&self) -> usize {
        *self.weight_bytes.borrow()
    }

    /// Bytes of the step workspace, metadata and cuBLAS workspace.
    pub fn workspace_bytes(&self) -> usize {
        self.workspace.bytes
            + self.meta.bytes
            + self.ones.bytes
            + plan::CUBLAS_WORKSPACE_BYTES
            + self.sampling.bytes()
    }

    /// KV blocks of `block_size` tokens that fit in `utilization` of the
    /// memory that was free at start, after the weights loaded so far and
    /// the workspace.
    pub fn plan_kv_blocks(&self, utilization: f64) -> Result<usize> {
        let limits = self.options.limits;
        let plan = plan::MemoryPlan {
            free_bytes: self.free_at_start,
            utilization,
            weight_bytes: self.weight_bytes(),
            workspace_bytes: self.workspace_bytes(),
            block_bytes: plan::kv_block_bytes(&self.config, limits.block_size),
            min_blocks: limits.max_blocks_per_seq() + 1,
        };
        plan.kv_blocks()
    }

    /// Peak workspace use so far, in bytes.
    pub fn workspace_peak(&self) -> usize {
        self.arena.lock().map(|a| a.peak()).unwrap_or(0)
    }

    /// A weight of `shape` filled with N(`mean`, `std`) values made on the
    /// device from `seed` (for benchmarks: no host copy of the weights).
    pub fn random_weight(
        &self,
        shape: &[usize],
        seed: u64,
        mean: f32,
        std: f32,
    ) -> Result<CudaWeight> {
        let (rows, cols) = crate::backend::matrix_shape(shape)?;
        let buf = self.gpu.alloc_zeroed(rows * cols * 2)?;
        self.launch(
            "fill_normal_bf16",
            plan::Launch::elementwise(rows * cols),
            &[
                device::Arg::Ptr(buf.ptr),
                device::Arg::I64((rows * cols) as i64),
                device::Arg::U64(seed),
                device::Arg::F32(mean),
                device::Arg::F32(std),
            ],
        )?;
        *self.weight_bytes.borrow_mut() += buf.bytes;
        Ok(CudaWeight {
            rows,
            cols,
            ptr: buf.ptr,
            _buf: buf,
        })
    }

    /// Waits for all issued work (benchmarks time steps with it).
    pub fn synchronize(&self) -> Result<()> {
        self.gpu.synchronize()
    }

    /// Measures device-to-device copy bandwidth over `bytes` (read plus
    /// written bytes per second), for the roofline in benchmarks.
    pub fn copy_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64> {
        let a = self.gpu.alloc_zeroed(bytes)?;
        let b = self.gpu.alloc_zeroed(bytes)?;
        self.gpu.copy(b.ptr, a.ptr, bytes)?;
        self.gpu.synchronize()?;
        let start = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            self.gpu.copy(b.ptr, a.ptr, bytes)?;
        }
        self.gpu.synchronize()?;
        let secs = start.elapsed().as_secs_f64();
        Ok(2.0 * bytes as f64 * reps.max(1) as f64 / secs)
    }

    /// Measures the bf16 GEMM rate of cuBLAS on an `n × n × n` product, in
    /// FLOP/s.
    pub fn gemm_rate(&self, n: usize, reps: usize) -> Result<f64> {
        let a = self.gpu.alloc_zeroed(n * n * 2)?;
        let b = self.gpu.alloc_zeroed(n * n * 2)?;
        let c = self.gpu.alloc_zeroed(n * n * 2)?;
        let g = device::Gemm {
            a: a.ptr,
            b: b.ptr,
            c: c.ptr,
            m: n,
            n,
            k: n,
            c_f32: false,
            accumulate: false,
        };
        self.gpu.gemm(g)?;
        self.gpu.synchronize()?;
        let start = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            self.gpu.gemm(g)?;
        }
        self.gpu.synchronize()?;
        let secs = start.elapsed().as_secs_f64();
        Ok(2.0 * (n as f64).powi(3) * reps.max(1) as f64 / secs)
    }

    fn kernel(&self, name: &'static str) -> Result<&Function> {
        self.kernels
            .get(name)
            .ok_or_else(|| EngineError::Backend(format!("kernel {name} is not loaded")))
    }

    fn launch(&self, name: &'static str, launch: plan::Launch, args: &[device::Arg]) -> Result<()> {
        self.gpu.launch(self.kernel(name)?, launch, args)
    }

    /// A workspace tensor of `rows × cols` `dtype` (uninitialised).
    fn tensor(&self, rows: usize, cols: usize, dtype: DType) -> Result<CudaTensor> {
        let bytes = rows * cols * dtype.size();
        let (offset, len) = self
            .arena
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .alloc(bytes)?;
        Ok(CudaTensor {
            rows,
            cols,
            dtype,
            ptr: self.workspace.ptr + offset as u64,
            valid_rows: rows,
            _lease: Some(Arc::new(Lease {
                arena: self.arena.clone(),
                offset,
                len,
            })),
        })
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Work still queued may read the buffers about to be freed.
        if let Err(e) = self.gpu.bind().and_then(|()| self.gpu.synchronize()) {
            tracing::warn!(error = %e, "CUDA work failed while the backend shut down");
        }
    }
}
