//! The CUDA C sources of the engine's kernels and the names each module
//! exports. The sources live in `kernels/*.cu`; `kernels/common.cuh` is
//! prepended to each before NVRTC compiles it.

/// The shared header every module starts with.
pub const COMMON: &str = include_str!("kernels/common.cuh");

/// One compiled module: a `.cu` file and the kernels it must export.
#[derive(Clone, Copy, Debug)]
pub struct ModuleSource {
    /// File name, used in messages and as NVRTC's program name.
    pub name: &'static str,
    /// The file's own text (without the common header).
    pub body: &'static str,
    /// Kernels the host launches from it.
    pub kernels: &'static [&'static str],
}

impl ModuleSource {
    /// What NVRTC compiles: the common header, then the file.
    pub fn full_source(&self) -> String {
        format!("{COMMON}\n#line 1 \"{}\"\n{}", self.name, self.body)
    }
}

/// Element-wise and row-wise kernels.
pub const ELEMENTWISE: ModuleSource = ModuleSource {
    name: "elementwise.cu",
    body: include_str!("kernels/elementwise.cu"),
    kernels: &[
        "embed_rows",
        "rms_norm",
        "add_rms_norm",
        "rms_norm_f32",
        "rope_rotate",
        "write_kv",
        "silu_mul",
        "add_bf16_to_f32",
        "add_f32",
        "gather_rows_f32",
        "fill_normal_bf16",
    ],
};

/// Paged attention: decode (split over the context) and prefill.
pub const ATTENTION: ModuleSource = ModuleSource {
    name: "attention.cu",
    body: include_str!("kernels/attention.cu"),
    kernels: &[
        "attention_decode_partial",
        "attention_decode_reduce",
        "attention_prefill",
    ],
};

/// The on-device sampler.
pub const SAMPLING: ModuleSource = ModuleSource {
    name: "sampling.cu",
    body: include_str!("kernels/sampling.cu"),
    kernels: &["sample_rows"],
};

/// Every module, in load order.
pub const MODULES: [ModuleSource; 3] = [ELEMENTWISE, ATTENTION, SAMPLING];

/// Kernels on the hot path of every step, which must not spill registers.
pub const HOT_KERNELS: [&str; 7] = [
    "rms_norm",
    "add_rms_norm",
    "rms_norm_f32",
    "attention_decode_partial",
    "attention_decode_reduce",
    "attention_prefill",
    "sample_rows",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_kernel_is_defined_in_its_source() {
        for m in MODULES {
            for k in m.kernels {
                let defined = m.body.lines().any(|l| l.contains("__global__"))
                    && m.body.contains(&format!(" {k}("));
                assert!(defined, "{} does not define {k}", m.name);
            }
            assert!(!m.body.contains("#include"), "{} includes a header", m.name);
        }
        for k in HOT_KERNELS {
            assert!(MODULES.iter().any(|m| m.kernels.contains(&k)), "{k}");
        }
    }
}
