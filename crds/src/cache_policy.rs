//! `CachePolicy`: the response cache (in-process L1, Redis L2), the
//! semantic cache, engine prefix caching and request coalescing.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{CommonStatus, SecretKeyRef};

/// Caching settings that Models refer to by name.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "weir.dev",
    doc = "Response, semantic and prefix caching and request coalescing settings that Models refer to.",
    version = "v1alpha1",
    kind = "CachePolicy",
    namespaced,
    status = "CachePolicyStatus",
    shortname = "wcp",
    category = "weir",
    printcolumn = r#"{"name":"Cacheable","type":"string","jsonPath":".spec.responseCache.cacheable"}"#,
    printcolumn = r#"{"name":"Semantic","type":"boolean","jsonPath":".spec.semanticCache.enabled"}"#,
    printcolumn = r#"{"name":"Models","type":"integer","jsonPath":".status.modelCount"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CachePolicySpec {
    /// Exact-match response cache.
    #[serde(default)]
    pub response_cache: ResponseCacheSpec,
    /// Cache keyed by meaning of the last user message.
    #[serde(default)]
    pub semantic_cache: SemanticCacheSpec,
    /// Engine reuse of KV blocks for shared prompt prefixes.
    #[serde(default)]
    pub prefix_cache: PrefixCacheSpec,
    /// Identical requests in flight share one generation.
    #[serde(default)]
    pub coalescing: CoalescingSpec,
    /// Rewriting prompts to fewer tokens before tokenization and before the
    /// cache key (a request's `x-weir-prompt-optimization` header overrides).
    #[serde(default)]
    pub prompt_optimization: PromptOptimization,
}

/// How prompts are rewritten to save tokens.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum PromptOptimization {
    /// Prompts are used as sent.
    #[default]
    Off,
    /// Whitespace normalized, repeated lines and blank runs removed, list
    /// markers made uniform; words are never changed.
    Conservative,
}

/// Which responses may be cached.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Cacheability {
    /// Only requests whose output is fixed by their inputs: temperature 0,
    /// or a seed. Sampled output is never replayed to another client.
    #[default]
    DeterministicOnly,
    /// Every successful response, sampled ones included.
    All,
}

/// Exact-match response cache: L1 in process, L2 in Redis.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResponseCacheSpec {
    /// Whether responses are cached at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Which responses may be cached.
    #[serde(default)]
    pub cacheable: Cacheability,
    /// In-process cache on each agent.
    #[serde(default)]
    pub l1: L1CacheSpec,
    /// Shared Redis cache. Unset disables L2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l2: Option<RedisCacheSpec>,
    /// With L2: at start, fill L1 from L2 with the most asked answers (the
    /// keys every agent keeps in Redis).
    #[serde(default)]
    pub warm_on_start: bool,
    /// How many of the most asked keys are kept for warming.
    #[serde(default = "default_popular_keys")]
    #[schemars(range(min = 1, max = 100000))]
    pub popular_keys: u32,
}

impl Default for ResponseCacheSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            cacheable: Cacheability::default(),
            l1: L1CacheSpec::default(),
            l2: None,
            warm_on_start: false,
            popular_keys: default_popular_keys(),
        }
    }
}

/// Bounds of the in-process cache.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct L1CacheSpec {
    /// Most cached responses.
    #[serde(default = "default_l1_entries")]
    #[schemars(range(min = 1, max = 10000000))]
    pub max_entries: u64,
    /// Most bytes of cached responses (a Kubernetes quantity, e.g. `256Mi`).
    #[serde(default = "default_l1_bytes")]
    pub max_bytes: Quantity,
    /// Seconds an entry lives.
    #[serde(default = "default_l1_ttl")]
    #[schemars(range(min = 1, max = 604800))]
    pub ttl_seconds: u32,
}

impl Default for L1CacheSpec {
    fn default() -> Self {
        Self {
            max_entries: default_l1_entries(),
            max_bytes: default_l1_bytes(),
            ttl_seconds: default_l1_ttl(),
        }
    }
}

/// When writes reach Redis.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum WriteMode {
    /// The response is written before the request completes.
    #[default]
    WriteThrough,
    /// Writes go through a bounded queue; when it is full they are dropped
    /// and counted.
    WriteBehind,
}

/// The shared Redis cache.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisCacheSpec {
    /// Secret key holding the Redis URL (`redis://` or `rediss://`, with
    /// credentials if any).
    pub url_secret_ref: SecretKeyRef,
    /// Prefix of every key Weir writes.
    #[serde(default = "default_key_prefix")]
    #[schemars(length(min = 1, max = 128))]
    pub key_prefix: String,
    /// Seconds an entry lives in Redis.
    #[serde(default = "default_l2_ttl")]
    #[schemars(range(min = 1, max = 2592000))]
    pub ttl_seconds: u32,
    /// Values larger than this many bytes are compressed with zstd.
    #[serde(default = "default_compress_above")]
    #[schemars(range(min = 0, max = 67108864))]
    pub compress_above_bytes: u32,
    /// When writes reach Redis.
    #[serde(default)]
    pub write_mode: WriteMode,
    /// Capacity of the write-behind queue.
    #[serde(default = "default_write_queue")]
    #[schemars(range(min = 1, max = 1000000))]
    pub write_behind_queue: u32,
    /// Time limit of every Redis call; a slower call is a miss.
    #[serde(default = "default_redis_timeout")]
    #[schemars(range(min = 1, max = 10000))]
    pub timeout_ms: u32,
}

/// What the semantic cache compares.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum SemanticScope {
    /// Earlier turns must match exactly; the last user message is compared
    /// by meaning.
    #[default]
    LastUserMessage,
    /// The whole conversation is embedded and compared by meaning.
    Conversation,
}

/// How a candidate from the embedding index is checked before it is served.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum SemanticVerify {
    /// Cosine similarity alone decides (the cache before verification).
    Off,
    /// Cheap rules: numbers, units, dates, versions, quoted strings,
    /// names, negation, opposites and the roles of the entities must
    /// agree.
    #[default]
    Rules,
    /// The verifier model decides alone.
    Model,
    /// The rules first; a candidate they pass is asked of the verifier
    /// model.
    RulesThenModel,
}

/// Cache that answers requests whose meaning matches an earlier one: the
/// embedding index finds candidates, the verifier decides whether one asks
/// the same thing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.minThreshold) || !has(self.maxThreshold) || self.minThreshold <= self.maxThreshold", "message": "semanticCache.minThreshold must not exceed maxThreshold", "fieldPath": ".minThreshold"},
    {"rule": "!has(self.verify) || (self.verify != 'Model' && self.verify != 'RulesThenModel') || has(self.verifierModel)", "message": "semanticCache.verify Model and RulesThenModel need verifierModel", "fieldPath": ".verifierModel"}
]))]
pub struct SemanticCacheSpec {
    /// Off by default: a semantic hit returns an answer to a different
    /// wording of the question.
    #[serde(default)]
    pub enabled: bool,
    /// Sentence-embedding model (a served Model's name, or a built-in one).
    #[serde(default = "default_embedding_model")]
    #[schemars(length(min = 1, max = 253))]
    pub embedding_model: String,
    /// Least cosine similarity (0..1) for a candidate: the starting point
    /// of calibration, and the fixed threshold when `calibrate` is false.
    #[serde(default = "default_threshold")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub threshold: f64,
    /// What is compared by meaning.
    #[serde(default)]
    pub scope: SemanticScope,
    /// How a candidate is checked before it is served.
    #[serde(default)]
    pub verify: SemanticVerify,
    /// A served generation Model asked a yes/no question (one token) for
    /// `Model` and `RulesThenModel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub verifier_model: Option<String>,
    /// Milliseconds the verifier model may take; slower is no hit.
    #[serde(default = "default_verifier_timeout")]
    #[schemars(range(min = 1, max = 10000))]
    pub verifier_timeout_ms: u32,
    /// Share of served semantic hits that should be right (0.5..1);
    /// calibration moves the threshold to reach it.
    #[serde(default = "default_target_precision")]
    #[schemars(range(min = 0.5, max = 1.0))]
    pub target_precision: f64,
    /// Whether the agent calibrates the threshold from what it observes
    /// (hits re-asked with `Cache-Control: no-cache`, verifier vetoes).
    #[serde(default = "default_true")]
    pub calibrate: bool,
    /// Lowest threshold calibration may choose.
    #[serde(default = "default_min_threshold")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_threshold: f64,
    /// Highest threshold calibration may choose.
    #[serde(default = "default_max_threshold")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_threshold: f64,
    /// Most entries in the index.
    #[serde(default = "default_semantic_entries")]
    #[schemars(range(min = 1, max = 10000000))]
    pub max_entries: u64,
    /// Most bytes of vectors and answers in the index (a quantity).
    #[serde(default = "default_semantic_bytes")]
    pub max_bytes: Quantity,
    /// Seconds an entry lives.
    #[serde(default = "default_l1_ttl")]
    #[schemars(range(min = 1, max = 604800))]
    pub ttl_seconds: u32,
}

impl Default for SemanticCacheSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            embedding_model: default_embedding_model(),
            threshold: default_threshold(),
            scope: SemanticScope::default(),
            verify: SemanticVerify::default(),
            verifier_model: None,
            verifier_timeout_ms: default_verifier_timeout(),
            target_precision: default_target_precision(),
            calibrate: true,
            min_threshold: default_min_threshold(),
            max_threshold: default_max_threshold(),
            max_entries: default_semantic_entries(),
            max_bytes: default_semantic_bytes(),
            ttl_seconds: default_l1_ttl(),
        }
    }
}

/// Engine reuse of KV blocks for shared prompt prefixes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrefixCacheSpec {
    /// Keep and reuse full KV blocks of earlier prompts.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for PrefixCacheSpec {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// Sharing of one generation among identical requests in flight.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CoalescingSpec {
    /// Identical cacheable requests in flight share one generation.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Most requests sharing one generation; later ones start their own.
    #[serde(default = "default_subscribers")]
    #[schemars(range(min = 2, max = 100000))]
    pub max_subscribers: u32,
}

impl Default for CoalescingSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            max_subscribers: default_subscribers(),
        }
    }
}

fn default_popular_keys() -> u32 {
    1000
}

fn default_true() -> bool {
    true
}
fn default_l1_entries() -> u64 {
    10_000
}
fn default_l1_bytes() -> Quantity {
    Quantity("256Mi".to_owned())
}
fn default_l1_ttl() -> u32 {
    600
}
fn default_key_prefix() -> String {
    "weir:".to_owned()
}
fn default_l2_ttl() -> u32 {
    86_400
}
fn default_compress_above() -> u32 {
    1024
}
fn default_write_queue() -> u32 {
    1024
}
fn default_redis_timeout() -> u32 {
    50
}
fn default_embedding_model() -> String {
    "all-MiniLM-L6-v2".to_owned()
}
fn default_threshold() -> f64 {
    0.95
}
fn default_verifier_timeout() -> u32 {
    500
}
fn default_target_precision() -> f64 {
    0.99
}
fn default_min_threshold() -> f64 {
    0.80
}
fn default_max_threshold() -> f64 {
    0.99
}
fn default_semantic_entries() -> u64 {
    10_000
}
fn default_semantic_bytes() -> Quantity {
    Quantity("64Mi".to_owned())
}
fn default_subscribers() -> u32 {
    1024
}

/// Observed state of a CachePolicy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CachePolicyStatus {
    /// Generation and conditions.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Models that refer to this policy.
    #[serde(default)]
    pub model_count: u32,
}
