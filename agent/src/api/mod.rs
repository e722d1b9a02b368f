//! The OpenAI-compatible API surface: bodies, errors and the JSON extractor.

pub mod error;
pub mod extract;
pub mod types;

pub use error::ApiError;
