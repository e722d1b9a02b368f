//! The models an agent serves: loading a Hugging Face directory or a GGUF
//! file onto the engine, the built-in standalone model, and the registry the server looks
//! names up in.

pub mod drain;
mod encoder;

pub use encoder::{MAX_INPUTS, MAX_WAITING, ServedEncoder};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weir_crds::batch_policy::BatchPolicySpec;
use weir_crds::cache_policy::CachePolicySpec;
use weir_crds::common::EngineConfig;
use weir_engine::engine::{EngineHandle, EngineOptions};
use weir_engine::scheduler::SchedulerConfig;
use weir_engine::testmodel::{TinyBertSpec, TinyModelSpec, write_tiny_bert, write_tiny_model};
use weir_engine::tokenizer::TextTokenizer;

use crate::admission::Admission;
use crate::breaker::CircuitBreaker;
use crate::cache::semantic::SemanticIndex;
use crate::cache::{CacheKey, ResponseCache};
use crate::coalesce::Coalescer;
use crate::generate::GenEvent;

/// Name the built-in model is served under.
pub const BUILTIN_MODEL: &str = "weir-tiny";

/// Everything needed to serve one model.
pub struct ServedModel {
    /// Name clients use.
    pub name: String,
    /// The engine.
    pub engine: EngineHandle,
    /// Its tokenizer and chat template.
    pub tokenizer: Arc<TextTokenizer>,
    /// Context length.
    pub max_model_len: usize,
    /// Unix seconds when loaded.
    pub created: u64,
    /// Cache settings.
    pub cache_policy: CachePolicySpec,
    /// Batching and admission settings.
    pub batch_policy: BatchPolicySpec,
    /// Admission control (bounded queue with priorities).
    pub admission: Admission,
    /// Circuit breaker around the engine.
    pub breaker: CircuitBreaker,
    /// What was loaded, for comparing with a new assignment.
    pub spec: ModelSpec,
    /// Response cache (L1, optional Redis L2), when the policy enables it.
    pub cache: Option<Arc<ResponseCache>>,
    /// Identical requests in flight share one generation.
    pub coalescer: Arc<Coalescer<CacheKey, GenEvent>>,
    /// Answers by meaning, when the policy enables the semantic cache.
    pub semantic: Option<Arc<SemanticIndex>>,
    /// Bytes of the weight files (reported for the GPU memory estimate).
    pub weights_bytes: u64,
    /// Whether it is being taken out of service, and its requests in flight.
    pub drain: Arc<drain::Drain>,
    /// Request defaults that follow load (its BatchPolicy's `tuning`).
    pub tuner: Arc<crate::tuning::Tuner>,
    /// Its finished requests of the last minutes, for the report.
    pub recent: Arc<crate::report::RecentRequests>,
}

/// A model to load: where, under what name, with which settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelSpec {
    /// Name clients use.
    pub name: String,
    /// Hugging Face directory, or a `.gguf` file.
    pub dir: PathBuf,
    /// Engine settings.
    pub engine: EngineConfig,
    /// Cache settings.
    pub cache: CachePolicySpec,
    /// Batching settings.
    pub batch: BatchPolicySpec,
    /// Redis URL for the L2 response cache (read from its Secret).
    pub redis_url: Option<String>,
}

/// Errors loading a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The cache policy cannot be applied.
    #[error("model `{name}`: {source}")]
    Cache {
        /// The model.
        name: String,
        /// The cause.
        source: crate::cache::CacheError,
    },
    /// The engine refused the model or its settings.
    #[error("model `{name}`: {source}")]
    Engine {
        /// The model.
        name: String,
        /// The cause.
        source: weir_engine::EngineError,
    },
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ServedModel {
    /// Loads `spec` onto the GPU (or the CPU without one) and starts its
    /// engine.
    pub fn load(spec: &ModelSpec) -> Result<Self, LoadError> {
        let err = |source| LoadError::Engine {
            name: spec.name.clone(),
            source,
        };
        let config = weir_engine::config::ModelConfig::from_dir(&spec.dir).map_err(err)?;
        let max_model_len = spec
            .engine
            .max_model_len
            .map_or(config.max_position_embeddings, |m| {
                (m as usize).min(config.max_position_embeddings)
            });
        let tokenizer = Arc::new(TextTokenizer::from_dir(&spec.dir).map_err(err)?);
        let block_size = spec.engine.block_size as usize;
        let max_num_seqs = spec.batch.max_num_seqs.min(spec.engine.max_num_seqs) as usize;
        let max_num_batched_tokens = spec
            .batch
            .max_num_batched_tokens
            .min(spec.engine.max_num_batched_tokens) as usize;
        let chunk = if spec.batch.chunked_prefill.enabled {
            spec.batch.chunked_prefill.chunk_size as usize
        } else {
            max_num_batched_tokens
        };
        let options = EngineOptions {
            scheduler: SchedulerConfig {
                max_num_seqs,
                max_num_batched_tokens,
                long_prefill_chunk: chunk.min(max_num_batched_tokens),
                max_model_len,
                aging: Duration::from_secs(u64::from(spec.batch.priority.aging_seconds)),
                prefix_caching: spec.cache.prefix_cache.enabled,
            },
            // Sized by the device in `start_engine`.
            num_blocks: 0,
            block_size,
            queue_capacity: spec.batch.queue.max_queued as usize + max_num_seqs,
        };
        let started = crate::engine_start::start_engine(
            &spec.dir,
            config,
            &spec.engine,
            tokenizer.clone(),
            options,
        )
        .map_err(err)?;
        tracing::info!(
            model = %spec.name,
            backend = started.backend,
            kv_blocks = started.kv_blocks,
            "engine started"
        );
        let engine = started.engine;
        Ok(Self {
            name: spec.name.clone(),
            engine,
            tokenizer,
            max_model_len,
            created: now_secs(),
            admission: Admission::new(&spec.batch, max_num_seqs),
            breaker: CircuitBreaker::new(
                spec.batch.circuit_breaker.failure_threshold,
                Duration::from_secs(u64::from(spec.batch.circuit_breaker.open_seconds)),
                spec.batch.circuit_breaker.enabled,
            ),
            cache_policy: spec.cache.clone(),
            batch_policy: spec.batch.clone(),
            spec: spec.clone(),
            cache: response_cache(spec)?,
            weights_bytes: weights_bytes(&spec.dir),
            semantic: crate::cache::semantic::build_index(&spec.cache.semantic_cache).map_err(
                |e| LoadError::Cache {
                    name: spec.name.clone(),
                    source: e,
                },
            )?,
            coalescer: Arc::new(Coalescer::new(
                spec.cache.coalescing.max_subscribers as usize,
            )),
            drain: Arc::default(),
            tuner: Arc::new(crate::tuning::Tuner::new(&spec.batch.tuning)),
            recent: Arc::default(),
        })
    }

    /// The same engine under new cache and batch policies: the engine and
    /// requests in flight carry on; new requests see the new admission
    /// bounds, breaker and caching rules. Engine limits follow through
    /// [`weir_engine::engine::EngineHandle::set_limits`].
    pub fn with_policies(&self, spec: &ModelSpec) -> Self {
        let max_num_seqs = spec.batch.max_num_seqs.min(spec.engine.max_num_seqs) as usize;
        let max_tokens = spec
            .batch
            .max_num_batched_tokens
            .min(spec.engine.max_num_batched_tokens) as usize;
        if let Err(e) = self.engine.set_limits(max_num_seqs, max_tokens) {
            tracing::warn!(model = %self.name, error = %e, "could not apply new batch limits");
        }
        Self {
            name: spec.name.clone(),
            engine: self.engine.clone(),
            tokenizer: self.tokenizer.clone(),
            max_model_len: self.max_model_len,
            created: self.created,
            cache_policy: spec.cache.clone(),
            batch_policy: spec.batch.clone(),
            admission: Admission::new(&spec.batch, max_num_seqs),
            breaker: CircuitBreaker::new(
                spec.batch.circuit_breaker.failure_threshold,
                Duration::from_secs(u64::from(spec.batch.circuit_breaker.open_seconds)),
                spec.batch.circuit_breaker.enabled,
            ),
            spec: spec.clone(),
            weights_bytes: self.weights_bytes,
            cache: response_cache(spec).unwrap_or_else(|e| {
                tracing::warn!(model = %spec.name, error = %e, "response cache disabled");
                None
            }),
            semantic: crate::cache::semantic::build_index(&spec.cache.semantic_cache)
                .unwrap_or_else(|e| {
                    tracing::warn!(model = %spec.name, error = %e, "semantic cache disabled");
                    None
                }),
            coalescer: Arc::new(Coalescer::new(
                spec.cache.coalescing.max_subscribers as usize,
            )),
            drain: self.drain.clone(),
            tuner: Arc::new(crate::tuning::Tuner::new(&spec.batch.tuning)),
            recent: self.recent.clone(),
        }
    }
}

/// Bytes of the safetensors files in `dir`, or of the GGUF file `dir` is
/// (0 when unreadable).
pub fn weights_bytes(dir: &Path) -> u64 {
    if dir.is_file() {
        return std::fs::metadata(dir).map_or(0, |m| m.len());
    }
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn response_cache(spec: &ModelSpec) -> Result<Option<Arc<ResponseCache>>, LoadError> {
    if !spec.cache.response_cache.enabled {
        return Ok(None);
    }
    let cache = ResponseCache::new(&spec.cache.response_cache, spec.redis_url.clone())
        .map(Arc::new)
        .map_err(|e| LoadError::Cache {
            name: spec.name.clone(),
            source: e,
        })?;
    cache.start(&spec.cache.response_cache);
    Ok(Some(cache))
}

/// A loaded model of either kind.
#[allow(clippy::large_enum_variant)] // built once per load, never stored
pub enum Loaded {
    /// A text generator (decoder on the engine).
    Generator(ServedModel),
    /// A sentence encoder (for `/v1/embeddings` and the semantic cache).
    Encoder(ServedEncoder),
}

impl Loaded {
    /// Loads `spec` as an encoder when its directory holds one (a `bert`
    /// config), else as a generator.
    pub fn load(spec: &ModelSpec) -> Result<Self, LoadError> {
        if weir_engine::encoder::is_encoder_dir(&spec.dir) {
            ServedEncoder::load(spec, now_secs()).map(Self::Encoder)
        } else {
            ServedModel::load(spec).map(Self::Generator)
        }
    }
}

/// Served models by name: generators and encoders.
#[derive(Default, Clone)]
pub struct ModelRegistry {
    models: BTreeMap<String, Arc<ServedModel>>,
    encoders: BTreeMap<String, Arc<ServedEncoder>>,
}

impl ModelRegistry {
    /// Adds (or replaces) a model; returns the shared handle.
    pub fn insert(&mut self, model: ServedModel) -> Arc<ServedModel> {
        let model = Arc::new(model);
        self.models.insert(model.name.clone(), model.clone());
        model
    }

    /// Adds (or replaces) a loaded model of either kind.
    pub fn insert_loaded(&mut self, loaded: Loaded) {
        match loaded {
            Loaded::Generator(model) => {
                self.encoders.remove(&model.name);
                self.insert(model);
            }
            Loaded::Encoder(encoder) => {
                self.models.remove(&encoder.name);
                self.encoders
                    .insert(encoder.name.clone(), Arc::new(encoder));
            }
        }
    }

    /// Removes a generator; requests in flight keep their handle and finish.
    pub fn remove(&mut self, name: &str) -> Option<Arc<ServedModel>> {
        self.models.remove(name)
    }

    /// Removes `model` if it is still the one served under its name (not
    /// replaced by a newer load meanwhile).
    pub fn remove_this(&mut self, model: &Arc<ServedModel>) -> bool {
        let same = self
            .models
            .get(&model.name)
            .is_some_and(|m| Arc::ptr_eq(&m.drain, &model.drain));
        if same {
            self.models.remove(&model.name);
        }
        same
    }

    /// Removes an encoder.
    pub fn remove_encoder(&mut self, name: &str) -> Option<Arc<ServedEncoder>> {
        self.encoders.remove(name)
    }

    /// The encoder named `name`.
    pub fn encoder(&self, name: &str) -> Option<Arc<ServedEncoder>> {
        self.encoders.get(name).cloned()
    }

    /// Every encoder, by name.
    pub fn encoders(&self) -> impl Iterator<Item = &Arc<ServedEncoder>> {
        self.encoders.values()
    }

    /// Whether a model of either kind is served under `name`.
    pub fn serves(&self, name: &str) -> bool {
        self.models.contains_key(name) || self.encoders.contains_key(name)
    }

    /// The model named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<ServedModel>> {
        self.models.get(name).cloned()
    }

    /// Every model, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ServedModel>> {
        self.models.values()
    }
}

/// The built-in model's shape: small enough to answer at interactive speed
/// on a laptop CPU (4 layers, width 256).
pub fn builtin_spec() -> TinyModelSpec {
    TinyModelSpec {
        seed: 2026,
        ..TinyModelSpec::small()
    }
}

/// Name the built-in sentence encoder is served under.
pub const BUILTIN_ENCODER: &str = "weir-embed-tiny";

/// Writes the built-in model into `cache_dir/builtin-<version>` unless it is
/// already there (made deterministically, so every agent has the same one),
/// and returns the directory.
pub fn ensure_builtin(cache_dir: &Path) -> Result<PathBuf, weir_engine::EngineError> {
    ensure_written(cache_dir, "builtin", |dir| {
        write_tiny_model(dir, &builtin_spec())
    })
}

/// Writes the built-in sentence encoder (a tiny random BERT: its vectors
/// exercise `/v1/embeddings` but carry no meaning; serve a real encoder
/// with `--embedding-model` for the semantic cache) and returns its
/// directory.
pub fn ensure_builtin_encoder(cache_dir: &Path) -> Result<PathBuf, weir_engine::EngineError> {
    ensure_written(cache_dir, "builtin-encoder", |dir| {
        write_tiny_bert(dir, &TinyBertSpec::default())
    })
}

fn ensure_written(
    cache_dir: &Path,
    stem: &str,
    write: impl Fn(&Path) -> Result<(), weir_engine::EngineError>,
) -> Result<PathBuf, weir_engine::EngineError> {
    let version = env!("CARGO_PKG_VERSION");
    let dir = cache_dir.join(format!("{stem}-{version}"));
    let complete =
        |d: &Path| d.join("model.safetensors").exists() && d.join("config.json").exists();
    if complete(&dir) {
        return Ok(dir);
    }
    // Write into a temporary sibling and rename, so a crash never leaves a
    // half-written model behind.
    static ATTEMPT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let attempt = ATTEMPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = cache_dir.join(format!(
        ".{stem}-{version}-{}-{attempt}",
        std::process::id()
    ));
    write(&tmp)?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process finished first: its copy is identical.
        Err(_) if complete(&dir) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(source) => Err(weir_engine::EngineError::Io { path: dir, source }),
    }
}
