//! The load generator's parts, shared by `weir-loadgen` and the
//! end-to-end tests: requests measured one by one ([`request`]), the
//! figures ([`report`]), the prompt mix ([`workload`]) and the routing
//! scenarios ([`scenarios`]).

pub mod report;
pub mod request;
pub mod scenarios;
pub mod workload;
