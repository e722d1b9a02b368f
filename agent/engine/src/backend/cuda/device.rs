//! The thin unsafe layer over the CUDA driver and cuBLAS (both loaded at
//! run time through `cudarc`): the device and its stream, device and
//! pinned host buffers that free themselves, modules and launches, CUDA
//! graphs, and the bf16 GEMM. Everything above this file works with
//! device addresses (`u64`) and this file's safe functions.
//!
//! Guarantees: every allocation is freed once, in `Drop`, with the context
//! bound; every launch and copy is issued on the one stream of the device,
//! so they run in program order; nothing here synchronizes with the host
//! except [`Gpu::synchronize`] and the downloads that say so.

use std::ffi::{CString, c_void};
use std::sync::Arc;

use cudarc::cublas::sys as blas;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, result, sys};

use super::plan::Launch;
use crate::error::{EngineError, Result};

fn driver_err(what: &str, e: impl std::fmt::Debug) -> EngineError {
    EngineError::Backend(format!("CUDA {what}: {e:?}"))
}

/// What the device is.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    /// Product name.
    pub name: String,
    /// Compute capability.
    pub arch: super::nvrtc::Arch,
    /// Total memory in bytes.
    pub total_bytes: usize,
    /// Free memory in bytes when asked.
    pub free_bytes: usize,
    /// Streaming multiprocessors.
    pub sm_count: u32,
}

/// Why there is no usable GPU, in words for the start-up log.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: each call only tries to open a shared library.
    let (driver, cublas, nvrtc) = unsafe {
        (
            sys::is_culib_present(),
            blas::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    };
    if !driver {
        return Some("the CUDA driver (libcuda) was not found".into());
    }
    if !nvrtc {
        return Some("libnvrtc was not found on the library path".into());
    }
    if !cublas {
        return Some("libcublas was not found on the library path".into());
    }
    match std::panic::catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) if n > 0 => None,
        Ok(Ok(_)) => Some("the CUDA driver reports no GPU".into()),
        Ok(Err(e)) => Some(format!("the CUDA driver failed to start: {e:?}")),
        Err(_) => Some("the CUDA driver lacks a required entry point".into()),
    }
}

/// One GPU: its context, the stream every operation goes on, and a cuBLAS
/// handle bound to that stream with its own workspace.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: blas::cublasHandle_t,
    _blas_workspace: DeviceBuffer,
}

// SAFETY: the cuBLAS handle is used only through `&Gpu` by the one thread
// that owns the backend at a time (the engine thread); the handle may move
// between threads as long as calls on it are not concurrent.
unsafe impl Send for Gpu {}

impl Gpu {
    /// Opens device `ordinal`. Missing libraries or entry points are
    /// errors, never panics.
    pub fn open(ordinal: usize, blas_workspace_bytes: usize) -> Result<Self> {
        if let Some(reason) = unavailable_reason() {
            return Err(EngineError::Backend(reason));
        }
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| EngineError::Backend("the CUDA driver panicked at start".into()))?
            .map_err(|e| driver_err("context", e))?;
        // Event tracking guards cudarc's own slices; this backend manages
        // raw allocations on one stream and needs none of it.
        // SAFETY: no cudarc slice is created on this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| driver_err("stream", e))?;
        let workspace = DeviceBuffer::alloc(&ctx, blas_workspace_bytes)?;
        let mut handle = std::ptr::null_mut();
        // SAFETY: cuBLAS is present (checked above); the handle pointer is
        // valid for writes; the stream and workspace outlive the handle
        // (dropped after it in `Drop`).
        unsafe {
            check_blas("create", blas::cublasCreate_v2(&mut handle))?;
            check_blas(
                "set stream",
                blas::cublasSetStream_v2(handle, stream.cu_stream() as blas::cudaStream_t),
            )?;
            check_blas(
                "set workspace",
                blas::cublasSetWorkspace_v2(handle, workspace.ptr as *mut c_void, workspace.bytes),
            )?;
        }
        Ok(Self {
            ctx,
            stream,
            blas: handle,
            _blas_workspace: workspace,
        })
    }

    /// Binds the context to the calling thread (the engine thread calls
    /// this at each step; it is cheap when already bound).
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_err("bind", e))
    }

    /// The device's name, architecture and memory.
    pub fn info(&self) -> Result<DeviceInfo> {
        let (major, minor) = self
            .ctx
            .compute_capability()
            .map_err(|e| driver_err("compute capability", e))?;
        let (free, total) = self
            .ctx
            .mem_get_info()
            .map_err(|e| driver_err("memory", e))?;
        let sm = self
            .ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .unwrap_or(0);
        Ok(DeviceInfo {
            name: self.ctx.name().unwrap_or_else(|_| "unknown GPU".into()),
            arch: super::nvrtc::Arch {
                major: major as u32,
                minor: minor as u32,
            },
            total_bytes: total,
            free_bytes: free,
            sm_count: sm as u32,
        })
    }

    /// Allocates `bytes` of device memory, zeroed.
    pub fn alloc_zeroed(&self, bytes: usize) -> Result<DeviceBuffer> {
        let buf = DeviceBuffer::alloc(&self.ctx, bytes)?;
        // SAFETY: `buf` owns `bytes` bytes at `ptr`.
        unsafe { result::memset_d8_sync(buf.ptr, 0, buf.bytes) }
            .map_err(|e| driver_err("memset", e))?;
        Ok(buf)
    }

    /// Allocates `bytes` of page-locked host memory.
    pub fn alloc_pinned(&self, bytes: usize) -> Result<PinnedBuffer> {
        self.bind()?;
        // SAFETY: a plain page-locked allocation, freed in Drop.
        let ptr = unsafe { result::malloc_host(bytes.max(1), 0) }
            .map_err(|e| driver_err("pinned allocation", e))?;
        Ok(PinnedBuffer {
            ptr: ptr as *mut u8,
            bytes: bytes.max(1),
        })
    }

    /// Copies `src` to device address `dst` on the stream. `src` must stay
    /// unchanged until the stream reaches the copy (the engine reuses its
    /// pinned staging buffers only after the step's final download).
    pub fn upload<T: Copy>(&self, dst: u64, src: &[T], room: usize) -> Result<()> {
        if std::mem::size_of_val(src) > room {
            return Err(EngineError::Backend(format!(
                "upload of {} bytes into {room}",
                std::mem::size_of_val(src)
            )));
        }
        // SAFETY: `dst` has `room` bytes (checked against the source size);
        // the source outlives the copy as documented above.
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| driver_err("upload", e))
    }

    /// Copies device memory at `src` into `dst`, then waits for the stream.
    pub fn download<T: Copy>(&self, dst: &mut [T], src: u64) -> Result<()> {
        // SAFETY: the caller's `src` holds at least `dst`'s size (the
        // backend checks tensor sizes); the stream sync below finishes the
        // copy before `dst` is read.
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| driver_err("download", e))?;
        self.synchronize()
    }

    /// Device-to-device copy of `bytes` on the stream.
    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: both ranges are owned device memory of at least `bytes`
        // (the callers pass sizes of their own buffers).
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(|e| driver_err("copy", e))
    }

    /// Waits until the stream has finished everything issued.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("synchronize", e))
    }

    /// Loads a CUBIN image.
    pub fn load_module(&self, cubin: &[u8]) -> Result<Module> {
        self.bind()?;
        // cuModuleLoadData reads the ELF header for the length; keep the
        // image in an owned buffer for the duration of the call.
        let image = cubin.to_vec();
        // SAFETY: `image` is a complete CUBIN produced by NVRTC for this
        // device's architecture, alive during the call.
        let module = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }
            .map_err(|e| driver_err("loading a kernel module", e))?;
        Ok(Module {
            module,
            ctx: self.ctx.clone(),
        })
    }

    /// Launches `f` with `args` (each a 4- or 8-byte scalar or a device
    /// address) on the stream.
    pub fn launch(&self, f: &Function, launch: Launch, args: &[Arg]) -> Result<()> {
        if args.len() > MAX_ARGS {
            return Err(EngineError::Backend(format!(
                "{} takes {} arguments, more than {MAX_ARGS}",
                f.name,
                args.len()
            )));
        }
        // Fixed arrays: a launch allocates nothing on the host either.
        let mut values = [0u64; MAX_ARGS];
        for (v, a) in values.iter_mut().zip(args) {
            *v = a.bits();
        }
        let mut params = [std::ptr::null_mut::<c_void>(); MAX_ARGS];
        for (p, v) in params.iter_mut().zip(values.iter_mut()) {
            *p = v as *mut u64 as *mut c_void;
        }
        let params = &mut params[..args.len()];
        // SAFETY: `f` comes from a loaded module that outlives the backend;
        // each parameter points at a value whose low bytes hold the
        // argument in the width the kernel declares (little-endian), and
        // the buffers the addresses point into are owned by the backend
        // and outlive the launch (freed only after a final synchronize).
        unsafe {
            result::launch_kernel(
                f.raw,
                launch.grid,
                launch.block,
                0,
                self.stream.cu_stream(),
                params,
            )
        }
        .map_err(|e| driver_err(&format!("launching {}", f.name), e))
    }

    /// `C[m×n] = A[m×k] · B[n×k]ᵀ` with row-major bf16 `A` (activations) and
    /// `B` (a weight `[out, in]`), f32 accumulation; `C` is bf16 or f32.
    pub fn gemm(&self, g: Gemm) -> Result<()> {
        // Row-major C = A·Bᵀ is column-major Cᵀ = B·Aᵀ: cuBLAS computes
        // (n×m) = op(B)(n×k) · op(A)(k×m) with B transposed from its
        // column-major (k×n) view and A as stored.
        let (alpha, beta) = (1.0f32, if g.accumulate { 1.0f32 } else { 0.0f32 });
        let c_type = if g.c_f32 {
            blas::cudaDataType::CUDA_R_32F
        } else {
            blas::cudaDataType::CUDA_R_16BF
        };
        let dims = [g.m, g.n, g.k].map(|d| i32::try_from(d).unwrap_or(i32::MAX));
        // SAFETY: the handle is live and bound to the stream; A, B and C
        // hold m×k, n×k and m×n elements (the backend checks shapes before
        // calling); alpha and beta are host scalars alive during the call.
        let status = unsafe {
            blas::cublasGemmEx(
                self.blas,
                blas::cublasOperation_t::CUBLAS_OP_T,
                blas::cublasOperation_t::CUBLAS_OP_N,
                dims[1],
                dims[0],
                dims[2],
                &alpha as *const f32 as *const c_void,
                g.b as *const c_void,
                blas::cudaDataType::CUDA_R_16BF,
                dims[2],
                g.a as *const c_void,
                blas::cudaDataType::CUDA_R_16BF,
                dims[2],
                &beta as *const f32 as *const c_void,
                g.c as *mut c_void,
                c_type,
                dims[1],
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        };
        check_blas("GEMM", status)
    }

    /// A fence: an event that [`Gpu::signal`] re-records and
    /// [`Fence::wait`] waits on (made once, so steps create no events).
    pub fn fence(&self) -> Result<Fence> {
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| driver_err("event", e))?;
        Ok(Fence(event))
    }

    /// Marks the point the stream has reached in `fence`.
    pub fn signal(&self, fence: &Fence) -> Result<()> {
        fence
            .0
            .record(&self.stream)
            .map_err(|e| driver_err("event record", e))
    }

    /// Starts capturing the stream's work into a graph.
    pub fn begin_capture(&self) -> Result<()> {
        // SAFETY: the stream is live; thread-local mode keeps other threads'
        // CUDA calls out of the capture.
        unsafe {
            result::stream::begin_capture(
                self.stream.cu_stream(),
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| driver_err("begin capture", e))
    }

    /// Ends the capture and instantiates it.
    pub fn end_capture(&self) -> Result<Graph> {
        // SAFETY: a capture was begun on this stream by `begin_capture`.
        let graph = unsafe { result::stream::end_capture(self.stream.cu_stream()) }
            .map_err(|e| driver_err("end capture", e))?;
        // SAFETY: `graph` is the valid graph just captured; it is destroyed
        // once instantiated (the executable keeps what it needs).
        let exec = unsafe {
            let exec = result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0));
            let _ = result::graph::destroy(graph);
            exec
        }
        .map_err(|e| driver_err("instantiate graph", e))?;
        Ok(Graph {
            exec,
            ctx: self.ctx.clone(),
        })
    }

    /// Replays a captured graph on the stream.
    pub fn replay(&self, graph: &Graph) -> Result<()> {
        // SAFETY: `graph` was instantiated on this context; the buffers it
        // reads are owned by the backend at the addresses captured.
        unsafe { result::graph::launch(graph.exec, self.stream.cu_stream()) }
            .map_err(|e| driver_err("graph launch", e))
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let _ = self.stream.synchronize();
        // SAFETY: the handle was created in `open` and is destroyed once.
        unsafe {
            let _ = blas::cublasDestroy_v2(self.blas);
        }
    }
}

fn check_blas(what: &str, status: blas::cublasStatus_t) -> Result<()> {
    match status {
        blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
        other => Err(EngineError::Backend(format!("cuBLAS {what}: {other:?}"))),
    }
}

/// A point in the stream the host can wait for.
pub struct Fence(CudaEvent);

impl Fence {
    /// Blocks until the stream has passed the last [`Gpu::signal`].
    pub fn wait(&self) -> Result<()> {
        self.0
            .synchronize()
            .map_err(|e| driver_err("event wait", e))
    }
}

/// Most arguments a kernel launch takes.
const MAX_ARGS: usize = 24;

/// One GEMM's operands: device addresses and sizes.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    /// Activations, `m × k` bf16.
    pub a: u64,
    /// Weight, `n × k` bf16.
    pub b: u64,
    /// Output, `m × n`.
    pub c: u64,
    /// Rows.
    pub m: usize,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Output in f32 instead of bf16.
    pub c_f32: bool,
    /// `C += A·Bᵀ` instead of `C = A·Bᵀ`.
    pub accumulate: bool,
}

/// A kernel argument.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device address.
    Ptr(u64),
    /// `int`.
    I32(i32),
    /// `unsigned int`.
    U32(u32),
    /// `long long`.
    I64(i64),
    /// `unsigned long long`.
    U64(u64),
    /// `float`.
    F32(f32),
}

impl Arg {
    fn bits(&self) -> u64 {
        match *self {
            Arg::Ptr(p) | Arg::U64(p) => p,
            Arg::I32(v) => u64::from(v as u32),
            Arg::U32(v) => u64::from(v),
            Arg::I64(v) => v as u64,
            Arg::F32(v) => u64::from(v.to_bits()),
        }
    }
}

/// Device memory owned by the backend.
pub struct DeviceBuffer {
    /// Device address.
    pub ptr: u64,
    /// Size in bytes.
    pub bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DeviceBuffer {
    fn alloc(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        ctx.bind_to_thread().map_err(|e| driver_err("bind", e))?;
        // SAFETY: a plain allocation on the bound context, freed in Drop.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }.map_err(|e| {
            EngineError::Backend(format!(
                "out of GPU memory allocating {} MiB: {e:?}",
                bytes >> 20
            ))
        })?;
        Ok(Self {
            ptr,
            bytes,
            ctx: ctx.clone(),
        })
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from malloc_sync and is freed once; the work
        // using it was issued on the stream the owner synchronizes before
        // dropping its buffers.
        unsafe {
            let _ = result::free_sync(self.ptr);
        }
    }
}

/// Page-locked host memory, for uploads that do not block the host.
pub struct PinnedBuffer {
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: plain host memory owned by this value; no aliasing handles exist.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    /// The buffer as words.
    pub fn words_mut(&mut self) -> &mut [u32] {
        // SAFETY: `ptr` is page-aligned, `bytes` long and owned; the slice
        // borrows `self` mutably so nothing else can reach it meanwhile.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u32, self.bytes / 4) }
    }

    /// The buffer as bytes.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `words_mut`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from malloc_host and is freed once.
        unsafe {
            let _ = result::free_host(self.ptr as *mut c_void);
        }
    }
}

/// A loaded module.
pub struct Module {
    module: sys::CUmodule,
    ctx: Arc<CudaContext>,
}

// SAFETY: a module handle is context-wide and may be used from any thread
// that binds the context.
unsafe impl Send for Module {}

impl Module {
    /// A kernel of the module; a missing kernel is an error naming it.
    pub fn function(&self, name: &'static str) -> Result<Function> {
        let c = CString::new(name).unwrap_or_default();
        // SAFETY: the module is loaded and outlives the returned function
        // (both are owned by the backend's kernel table, module last).
        let raw = unsafe { result::module::get_function(self.module, c) }
            .map_err(|e| driver_err(&format!("kernel {name}"), e))?;
        Ok(Function { raw, name })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: loaded once, unloaded once, after the stream is idle.
        unsafe {
            let _ = result::module::unload(self.module);
        }
    }
}

/// A kernel.
pub struct Function {
    raw: sys::CUfunction,
    name: &'static str,
}

// SAFETY: as `Module`.
unsafe impl Send for Function {}

/// An instantiated CUDA graph.
pub struct Graph {
    exec: sys::CUgraphExec,
    ctx: Arc<CudaContext>,
}

// SAFETY: as `Module`.
unsafe impl Send for Graph {}

impl Drop for Graph {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: instantiated once, destroyed once.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
        }
    }
}
