//! The OpenAI API below the HTTP layer: request and response bodies, the
//! error enum, and parsing bodies as OpenAI does.

pub mod error;
pub mod extract;
pub mod responses;
pub mod structured;
pub mod tokenize;
pub mod tools;
pub mod types;

pub use error::ApiError;

/// Which OpenAI generation route a body belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

impl Kind {
    /// The route's path.
    pub fn path(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Completion => "/v1/completions",
        }
    }
}
