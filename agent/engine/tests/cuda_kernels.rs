//! Every CUDA kernel source compiles with NVRTC to CUBIN for sm_80, sm_89
//! and sm_90, through the same code the engine runs at start
//! (`nvrtc::compile` on `kernels::MODULES`), with no warnings, and the hot
//! kernels spill no registers. No GPU is needed, only libnvrtc on the
//! library path: `scripts/test.sh` installs it from the PyPI package
//! `nvidia-cuda-nvrtc` and sets `WEIR_REQUIRE_NVRTC=1`, so in CI a missing
//! NVRTC fails instead of skipping.

#![allow(clippy::print_stdout)] // skip reasons and the register report are the output

use weir_engine::backend::cuda::kernels::{HOT_KERNELS, MODULES};
use weir_engine::backend::cuda::nvrtc::{self, Arch};

const ARCHS: [Arch; 3] = [
    Arch { major: 8, minor: 0 },
    Arch { major: 8, minor: 9 },
    Arch { major: 9, minor: 0 },
];

/// `None` when NVRTC is missing and not required (printed as skipped).
fn nvrtc_or_skip() -> Option<(i32, i32)> {
    match nvrtc::version() {
        Ok(v) => Some(v),
        Err(e) => {
            assert!(
                std::env::var_os("WEIR_REQUIRE_NVRTC").is_none(),
                "WEIR_REQUIRE_NVRTC is set but NVRTC cannot be loaded: {e}"
            );
            println!(
                "skipped: {e} (install nvidia-cuda-nvrtc and put its lib folder on LD_LIBRARY_PATH)"
            );
            None
        }
    }
}

#[test]
fn every_kernel_compiles_to_cubin_without_warnings_or_hot_spills() {
    let Some(version) = nvrtc_or_skip() else {
        return;
    };
    println!("NVRTC {}.{}", version.0, version.1);
    let mut report = Vec::new();
    for arch in ARCHS {
        for module in MODULES {
            let compiled = nvrtc::compile(module.name, &module.full_source(), arch)
                .unwrap_or_else(|e| panic!("{} for {}: {e}", module.name, arch.sm()));
            assert!(
                compiled.cubin.starts_with(b"\x7fELF"),
                "{} for {} is not a CUBIN (ELF) image",
                module.name,
                arch.sm()
            );
            let warnings = compiled.warnings();
            assert!(
                warnings.is_empty(),
                "{} for {}: {warnings:#?}",
                module.name,
                arch.sm()
            );
            let usage = compiled.usage();
            for &kernel in module.kernels {
                let u = usage.iter().find(|u| u.name == kernel).unwrap_or_else(|| {
                    panic!("{kernel} missing from ptxas's report for {}", arch.sm())
                });
                if HOT_KERNELS.contains(&kernel) {
                    assert_eq!(
                        (u.spill_stores, u.spill_loads),
                        (0, 0),
                        "{kernel} spills on {}: {u:?}",
                        arch.sm()
                    );
                }
                report.push(format!(
                    "{:6} {kernel:26} {:3} registers, {} B stack, {} B spilled",
                    arch.sm(),
                    u.registers,
                    u.stack_frame,
                    u.spill_stores
                ));
            }
        }
    }
    println!("{}", report.join("\n"));
}

#[test]
fn compiled_kernels_are_cached_by_source_arch_and_version() {
    let Some(_) = nvrtc_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let module = MODULES[0];
    let source = module.full_source();
    let (first, hit) =
        nvrtc::compile_cached(module.name, &source, ARCHS[2], Some(dir.path())).unwrap();
    assert!(!hit, "an empty cache misses");
    let (second, hit) =
        nvrtc::compile_cached(module.name, &source, ARCHS[2], Some(dir.path())).unwrap();
    assert!(hit, "the second start reads the image back");
    assert_eq!(first, second);
    let (_, hit) = nvrtc::compile_cached(module.name, &source, ARCHS[0], Some(dir.path())).unwrap();
    assert!(!hit, "another architecture is another entry");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn a_broken_kernel_is_an_error_carrying_the_compiler_log() {
    let Some(_) = nvrtc_or_skip() else {
        return;
    };
    let e = nvrtc::compile(
        "broken.cu",
        "extern \"C\" __global__ void k() { undefined_thing(); }",
        ARCHS[2],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("broken.cu") && e.contains("undefined_thing"),
        "{e}"
    );
}
