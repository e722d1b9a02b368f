//! The Weir operator: leader election, collected agent metrics, and (as
//! they land) the controllers that place models on nodes, autoscale them
//! and reweight ensembles.

pub mod api_check;
pub mod apply;
pub mod autoscale;
pub mod controller;
pub mod drain;
pub mod grades;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod placement;
pub mod reweight;
pub mod scale_zero;
pub mod scrape;
pub mod taints;
pub mod weights;
pub mod world;
