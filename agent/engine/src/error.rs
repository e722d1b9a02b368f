//! The engine's error type.

use std::path::PathBuf;

/// Everything that can go wrong in the engine, with enough context to act
/// on it (the file and field of a bad config, the tensor and shape of a bad
/// weight).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A config file is malformed, lacks a field or asks for something
    /// unsupported.
    #[error("{path}: field `{field}`: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The offending field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A weight tensor is missing, has the wrong shape or an unsupported type.
    #[error("weights in {path}: tensor `{tensor}`: {message}")]
    Weights {
        /// The file or directory holding the weights.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// A GGUF file is malformed (wrong magic, truncated, corrupt directory).
    #[error("GGUF file {path}: {message}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer or chat template could not be loaded or applied.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A request cannot be served as asked.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A backend operation failed.
    #[error("backend: {0}")]
    Backend(String),
}

impl EngineError {
    /// Short machine-readable label for metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Config { .. } => "config",
            Self::Weights { .. } => "weights",
            Self::Gguf { .. } => "gguf",
            Self::Tokenizer(_) => "tokenizer",
            Self::ChatTemplate(_) => "chat_template",
            Self::InvalidRequest(_) => "invalid_request",
            Self::Backend(_) => "backend",
        }
    }
}

/// Result with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
