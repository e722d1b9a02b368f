//! Load-based tuning of request defaults (part of a BatchPolicy): under
//! high load a *performance* mode gives requests shorter and more focused
//! defaults, under low load a *quality* mode leaves them as they are, and a
//! *balanced* mode in between interpolates. Only fields a client did not
//! set are ever changed.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Whether and how request defaults follow load.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.lowLoad < self.highLoad", "message": "tuning.lowLoad must be below tuning.highLoad", "fieldPath": ".lowLoad"}
]))]
pub struct TuningSpec {
    /// `Off` (the default) or `LoadBased`.
    #[serde(default)]
    pub mode: TuningMode,
    /// Load (running plus waiting sequences over the sequence limit) at or
    /// above which the performance mode applies.
    #[serde(default = "default_high")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub high_load: f64,
    /// Load at or below which the quality mode applies.
    #[serde(default = "default_low")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub low_load: f64,
    /// Seconds between two looks at the load.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub interval_seconds: u32,
    /// Defaults under high load.
    #[serde(default)]
    pub performance: TunedDefaults,
}

impl Default for TuningSpec {
    fn default() -> Self {
        Self {
            mode: TuningMode::Off,
            high_load: default_high(),
            low_load: default_low(),
            interval_seconds: default_interval(),
            performance: TunedDefaults::default(),
        }
    }
}

/// Whether request defaults follow load.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum TuningMode {
    /// Requests get the model's usual defaults.
    #[default]
    Off,
    /// Defaults follow load: performance, balanced or quality.
    LoadBased,
}

/// The defaults the performance mode gives requests that set none.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TunedDefaults {
    /// `max_tokens` for requests that name none.
    #[serde(default = "default_max_tokens")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_tokens: u32,
    /// `temperature` for requests that name none (a ceiling: lower than
    /// the usual default of 1).
    #[serde(default = "default_temperature")]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: f64,
    /// `top_k` for requests that name none (0: no limit).
    #[serde(default = "default_top_k")]
    #[schemars(range(min = 0, max = 1000))]
    pub top_k: u32,
}

impl Default for TunedDefaults {
    fn default() -> Self {
        Self {
            max_tokens: default_max_tokens(),
            temperature: default_temperature(),
            top_k: default_top_k(),
        }
    }
}

fn default_high() -> f64 {
    0.8
}
fn default_low() -> f64 {
    0.3
}
fn default_interval() -> u32 {
    5
}
fn default_max_tokens() -> u32 {
    256
}
fn default_temperature() -> f64 {
    0.7
}
fn default_top_k() -> u32 {
    40
}
