//! Kernel compilation: CUDA C to CUBIN for one GPU architecture with NVRTC
//! (loaded at run time), ptxas's register and spill report, and the on-disk
//! cache of compiled images.
//!
//! CUBIN, not PTX: a PTX image must be JIT-compiled by the driver, which
//! refuses PTX from a newer toolkit than itself, whereas a CUBIN built for
//! the device's own `sm_XY` runs on any driver that supports the device.
//!
//! The cache key covers everything that changes the image: the source
//! (common header included), the compile options, the architecture and the
//! NVRTC version. Entries are written to a temporary file and renamed, so
//! a crash never leaves a half-written image that a later start would load.

use std::ffi::{CStr, CString, c_char};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::sys as nv;
use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};

/// Options every kernel is compiled with (besides the architecture).
/// No include path: the kernels include no header, so the agent needs no
/// CUDA toolkit headers on the node.
pub const COMPILE_OPTIONS: [&str; 3] = [
    "--std=c++17",
    "--ptxas-options=--verbose",
    "--ptxas-options=--warn-on-spills",
];

/// A GPU architecture, `sm_{major}{minor}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Arch {
    /// Compute capability, major.
    pub major: u32,
    /// Compute capability, minor.
    pub minor: u32,
}

impl Arch {
    /// The option value, e.g. `sm_90`.
    pub fn sm(&self) -> String {
        format!("sm_{}{}", self.major, self.minor)
    }

    /// Whether the kernels support it: Ampere (sm_80) and newer, which
    /// have native bf16 conversions and enough shared memory.
    pub fn is_supported(&self) -> bool {
        self.major >= 8
    }
}

/// One kernel's resource use, as ptxas reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelUsage {
    /// Kernel name.
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of spill stores.
    pub spill_stores: u32,
    /// Bytes of spill loads.
    pub spill_loads: u32,
    /// Bytes of stack frame (local memory).
    pub stack_frame: u32,
}

/// A compiled module.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The CUBIN image.
    pub cubin: Vec<u8>,
    /// NVRTC's log (ptxas info lines, warnings).
    pub log: String,
}

impl Compiled {
    /// Warning lines of the log.
    pub fn warnings(&self) -> Vec<&str> {
        self.log
            .lines()
            .filter(|l| l.to_ascii_lowercase().contains("warning"))
            .collect()
    }

    /// Per-kernel registers and spills from the ptxas lines of the log.
    pub fn usage(&self) -> Vec<KernelUsage> {
        parse_ptxas_log(&self.log)
    }
}

/// Parses ptxas `--verbose` output: a "Compiling entry function 'NAME'"
/// line, then the stack/spill line and the registers line of that kernel.
pub fn parse_ptxas_log(log: &str) -> Vec<KernelUsage> {
    let mut out: Vec<KernelUsage> = Vec::new();
    let number_before = |line: &str, marker: &str| -> Option<u32> {
        let head = &line[..line.find(marker)?];
        head.split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_owned();
            out.push(KernelUsage {
                name,
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
                stack_frame: 0,
            });
            continue;
        }
        let Some(last) = out.last_mut() else { continue };
        if line.contains("bytes spill stores") {
            last.stack_frame = number_before(line, "bytes stack frame").unwrap_or(0);
            last.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            last.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains("registers") {
            last.registers = line
                .split("Used ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    out
}

fn nvrtc_err(what: &str, code: nv::nvrtcResult) -> EngineError {
    EngineError::Backend(format!("NVRTC {what}: {code:?}"))
}

/// Whether libnvrtc can be loaded (it is looked up on the library path).
pub fn is_available() -> bool {
    // SAFETY: only tries to open the shared library; no symbol is called.
    unsafe { nv::is_culib_present() }
}

/// The loaded NVRTC's version, `(major, minor)`.
pub fn version() -> Result<(i32, i32)> {
    if !is_available() {
        return Err(EngineError::Backend(
            "libnvrtc was not found on the library path".into(),
        ));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; both pointers are valid for writes.
    let code = unsafe { nv::nvrtcVersion(&mut major, &mut minor) };
    match code {
        nv::nvrtcResult::NVRTC_SUCCESS => Ok((major, minor)),
        other => Err(nvrtc_err("version", other)),
    }
}

/// Owns an NVRTC program and destroys it on every path out.
struct Program(nv::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from nvrtcCreateProgram and is destroyed once.
        unsafe {
            let _ = nv::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

impl Program {
    fn log(&self) -> String {
        let mut size = 0usize;
        // SAFETY: a live program; `size` is valid for writes.
        if unsafe { nv::nvrtcGetProgramLogSize(self.0, &mut size) }
            != nv::nvrtcResult::NVRTC_SUCCESS
        {
            return String::new();
        }
        let mut buf = vec![0u8; size.max(1)];
        // SAFETY: `buf` holds the `size` bytes NVRTC said the log takes.
        unsafe { nv::nvrtcGetProgramLog(self.0, buf.as_mut_ptr() as *mut c_char) };
        CStr::from_bytes_until_nul(&buf)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn cubin(&self) -> Result<Vec<u8>> {
        let mut size = 0usize;
        // SAFETY: a compiled program; `size` is valid for writes.
        let code = unsafe { nv::nvrtcGetCUBINSize(self.0, &mut size) };
        if code != nv::nvrtcResult::NVRTC_SUCCESS {
            return Err(nvrtc_err("CUBIN size", code));
        }
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` holds the `size` bytes NVRTC reported.
        let code = unsafe { nv::nvrtcGetCUBIN(self.0, buf.as_mut_ptr() as *mut c_char) };
        match code {
            nv::nvrtcResult::NVRTC_SUCCESS => Ok(buf),
            other => Err(nvrtc_err("CUBIN", other)),
        }
    }
}

/// Compiles `source` (named `name` in messages) to a CUBIN for `arch`.
/// A compile error carries NVRTC's log.
pub fn compile(name: &str, source: &str, arch: Arch) -> Result<Compiled> {
    version()?;
    let c_src = CString::new(source)
        .map_err(|_| EngineError::Backend(format!("kernel source {name} holds a NUL byte")))?;
    let c_name = CString::new(name).unwrap_or_default();
    let mut raw = std::ptr::null_mut();
    // SAFETY: both strings outlive the program (dropped at the end of this
    // function, after the program); no headers are passed.
    let code = unsafe {
        nv::nvrtcCreateProgram(
            &mut raw,
            c_src.as_ptr(),
            c_name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if code != nv::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err("create program", code));
    }
    let program = Program(raw);
    let mut options: Vec<CString> =
        vec![CString::new(format!("--gpu-architecture={}", arch.sm())).unwrap_or_default()];
    options.extend(COMPILE_OPTIONS.iter().filter_map(|o| CString::new(*o).ok()));
    let pointers: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: a live program; `pointers` are valid C strings owned by
    // `options`, which outlives the call.
    let code =
        unsafe { nv::nvrtcCompileProgram(program.0, pointers.len() as i32, pointers.as_ptr()) };
    let log = program.log();
    if code != nv::nvrtcResult::NVRTC_SUCCESS {
        return Err(EngineError::Backend(format!(
            "NVRTC could not compile {name} for {}: {code:?}\n{log}",
            arch.sm()
        )));
    }
    Ok(Compiled {
        cubin: program.cubin()?,
        log,
    })
}

/// The cache file name of a module: a hash of the source, the options, the
/// architecture and the NVRTC version.
pub fn cache_key(source: &str, arch: Arch, nvrtc: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    for o in COMPILE_OPTIONS {
        h.update([0]);
        h.update(o.as_bytes());
    }
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}-{}-nvrtc{}.{}.cubin", arch.sm(), nvrtc.0, nvrtc.1)
}

/// Where compiled kernels are kept: `$WEIR_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/weir/kernels`, else `~/.cache/weir/kernels`; `None`
/// when none can be found (the kernels are then compiled at every start).
pub fn default_cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("WEIR_KERNEL_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("weir/kernels")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/weir/kernels")))
}

/// Compiles through the cache in `dir`: a hit is read back, a miss is
/// compiled and stored (a cache that cannot be written is only logged).
/// Returns the image and whether it came from the cache.
pub fn compile_cached(
    name: &str,
    source: &str,
    arch: Arch,
    dir: Option<&Path>,
) -> Result<(Vec<u8>, bool)> {
    let nvrtc = version()?;
    let path = dir.map(|d| d.join(cache_key(source, arch, nvrtc)));
    if let Some(cubin) = path.as_ref().and_then(|p| std::fs::read(p).ok())
        && !cubin.is_empty()
    {
        return Ok((cubin, true));
    }
    let compiled = compile(name, source, arch)?;
    if let Some(path) = &path
        && let Err(e) = store(path, &compiled.cubin)
    {
        tracing::warn!(path = %path.display(), error = %e, "could not cache a compiled kernel");
    }
    Ok((compiled.cubin, false))
}

fn store(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_reports() {
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'rms_norm' for 'sm_90'\n\
            ptxas info    : Function properties for rms_norm\n\
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 18 registers, used 1 barriers, 32 bytes smem\n\
            ptxas info    : Compiling entry function 'attention_prefill' for 'sm_90'\n\
            ptxas info    : Function properties for attention_prefill\n\
            ptxas         .     24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads\n\
            ptxas info    : Used 255 registers, used 1 barriers\n";
        let usage = parse_ptxas_log(log);
        assert_eq!(usage.len(), 2);
        assert_eq!(
            usage[0],
            KernelUsage {
                name: "rms_norm".into(),
                registers: 18,
                spill_stores: 0,
                spill_loads: 0,
                stack_frame: 0
            }
        );
        assert_eq!(usage[1].registers, 255);
        assert_eq!(usage[1].spill_stores, 16);
        assert_eq!(usage[1].spill_loads, 8);
        assert_eq!(usage[1].stack_frame, 24);
        let c = Compiled {
            cubin: vec![],
            log: "k.cu(3): warning #177-D: variable \"x\" was declared but never referenced\n"
                .into(),
        };
        assert_eq!(c.warnings().len(), 1);
    }

    #[test]
    fn cache_keys_change_with_source_arch_and_version() {
        let sm90 = Arch { major: 9, minor: 0 };
        let sm80 = Arch { major: 8, minor: 0 };
        let k = cache_key("a", sm90, (13, 0));
        assert_eq!(k, cache_key("a", sm90, (13, 0)), "stable");
        assert!(k.ends_with("-sm_90-nvrtc13.0.cubin"), "{k}");
        assert_ne!(k, cache_key("b", sm90, (13, 0)));
        assert_ne!(k, cache_key("a", sm80, (13, 0)));
        assert_ne!(k, cache_key("a", sm90, (13, 1)));
        assert!(sm80.is_supported() && !Arch { major: 7, minor: 5 }.is_supported());
    }

    #[test]
    fn cache_entries_are_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x/y.cubin");
        store(&path, b"image").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"image");
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers.len(),
            1,
            "no temporary file is left: {leftovers:?}"
        );
    }
}
