//! The Weir node agent: the OpenAI-compatible server in front of the
//! engine, with admission control, circuit breaking, response caching,
//! coalescing and metrics, in standalone or cluster mode.

pub mod adaptive;
pub mod admission;
pub mod api;
pub mod breaker;
pub mod cache;
pub mod cluster;
pub mod coalesce;
pub mod config;
pub mod engine_start;
pub mod generate;
pub mod gpu;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod models;
pub mod pipeline;
pub mod route;
