//! The OpenAI API below the HTTP layer: request and response bodies, the
//! error enum, and parsing bodies as OpenAI does.

pub mod error;
pub mod extract;
pub mod types;

pub use error::ApiError;
