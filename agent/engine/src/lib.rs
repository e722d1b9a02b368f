//! Weir's inference engine: the paged KV block pool, the continuous-batching
//! scheduler, the sampler, the Llama-family model and its backends.
//!
//! The engine knows token ids, blocks and tensors; it has no HTTP and no
//! Kubernetes dependency, so it can be tested and benchmarked alone.

pub mod backend;
pub mod config;
pub mod encoder;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod grammar;
pub mod kv_pool;
pub mod model;
pub mod sampler;
pub mod scheduler;
pub mod stats;
pub mod testmodel;
pub mod tokenizer;
pub mod weights;

pub use error::{EngineError, Result};
