//! The Weir node agent: the OpenAI-compatible server in front of the
//! engine, in layers that only look down: `http` (the only one that knows
//! axum), `pipeline` (what a generation request goes through), the services
//! (caches, coalescing, admission, breaker, adaptive limits, routing and
//! ensembles, the model registry and loading, the Hub), and `cluster` and
//! `shutdown` on top. See docs/agent.md.

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
pub mod report;
pub mod route;
pub mod shutdown;
pub mod tenants;
pub mod tuning;
