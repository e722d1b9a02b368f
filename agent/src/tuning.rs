//! Load-based tuning of request defaults ([`weir_crds::tuning`]): every
//! `intervalSeconds` (looked at when requests arrive) the model's load —
//! running plus waiting sequences over its sequence limit, smoothed — picks
//! a mode: *performance* at or above `highLoad`, *quality* at or below
//! `lowLoad`, *balanced* between. A mode is left only once the load has
//! moved a margin past its threshold (a tenth of the gap between the two,
//! at least 0.02), so a load hovering at a threshold does not flap.
//! Performance gives requests that set none its `maxTokens`, `temperature`
//! and `topK`; balanced interpolates `maxTokens` and `temperature` between
//! the usual defaults and those by where the load sits; quality changes
//! nothing. A field the client set is never changed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use weir_crds::tuning::{TuningMode, TuningSpec};

use crate::api::types::SamplingFields;

/// The usual `max_tokens` default (the engine's), interpolated from.
const USUAL_MAX_TOKENS: f64 = crate::generate::DEFAULT_MAX_TOKENS as f64;
/// The usual `temperature` default (OpenAI's), interpolated from.
const USUAL_TEMPERATURE: f64 = 1.0;

/// A tuning mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Low load: usual defaults.
    Quality,
    /// Between: interpolated defaults.
    Balanced,
    /// High load: the performance defaults.
    Performance,
}

impl Mode {
    /// Its name, as in `x-weir-tuning` and the status.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Quality => "quality",
            Mode::Balanced => "balanced",
            Mode::Performance => "performance",
        }
    }

    /// Its number in `weir_tuning_mode` (0 quality, 1 balanced, 2
    /// performance).
    pub fn level(self) -> i64 {
        self as i64
    }
}

/// The mode after `mode` at smoothed `load`, with hysteresis.
pub fn next_mode(mode: Mode, load: f64, low: f64, high: f64) -> Mode {
    let margin = ((high - low) / 10.0).max(0.02);
    match mode {
        _ if load >= high => Mode::Performance,
        Mode::Performance if load >= high - margin => Mode::Performance,
        _ if load <= low => Mode::Quality,
        Mode::Quality if load <= low + margin => Mode::Quality,
        _ => Mode::Balanced,
    }
}

/// One model's tuner.
#[derive(Debug)]
pub struct Tuner {
    spec: TuningSpec,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    mode: Mode,
    load: f64,
    looked: Option<Instant>,
}

impl Tuner {
    /// A tuner per `spec` (off unless its mode is `LoadBased`).
    pub fn new(spec: &TuningSpec) -> Self {
        Self {
            spec: spec.clone(),
            state: Mutex::new(State {
                mode: Mode::Quality,
                load: 0.0,
                looked: None,
            }),
        }
    }

    fn enabled(&self) -> bool {
        self.spec.mode == TuningMode::LoadBased
    }

    /// The mode in force, if tuning is on.
    pub fn current(&self) -> Option<Mode> {
        self.enabled()
            .then(|| self.state.lock().unwrap_or_else(|p| p.into_inner()).mode)
    }

    /// The mode in force at `now`, looking at `load` once an interval has
    /// passed since the last look; `None` when tuning is off.
    pub fn observe(&self, now: Instant, load: impl FnOnce() -> f64) -> Option<Mode> {
        if !self.enabled() {
            return None;
        }
        let interval = Duration::from_secs(u64::from(self.spec.interval_seconds.max(1)));
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.looked.is_none_or(|at| now.duration_since(at) >= interval) {
            let seen = load();
            // Half the weight to the newest look.
            s.load = if s.looked.is_some() {
                (s.load + seen) / 2.0
            } else {
                seen
            };
            s.looked = Some(now);
            s.mode = next_mode(s.mode, s.load, self.spec.low_load, self.spec.high_load);
        }
        Some(s.mode)
    }

    /// Where the smoothed load sits between the thresholds (0 at `lowLoad`,
    /// 1 at `highLoad`).
    fn position(&self) -> f64 {
        let load = self.state.lock().unwrap_or_else(|p| p.into_inner()).load;
        let (low, high) = (self.spec.low_load, self.spec.high_load);
        ((load - low) / (high - low).max(1e-9)).clamp(0.0, 1.0)
    }

    /// `fields` with `mode`'s defaults where the client set nothing.
    pub fn apply(&self, mode: Mode, fields: &SamplingFields) -> SamplingFields {
        let mut tuned = fields.clone();
        let t = match mode {
            Mode::Quality => return tuned,
            Mode::Balanced => self.position(),
            Mode::Performance => 1.0,
        };
        let p = &self.spec.performance;
        let lerp = |usual: f64, target: f64| usual + (target - usual) * t;
        if fields.max_tokens.is_none() && fields.max_completion_tokens.is_none() {
            tuned.max_tokens = Some(lerp(USUAL_MAX_TOKENS, f64::from(p.max_tokens)).round() as i64);
        }
        if fields.temperature.is_none() {
            tuned.temperature = Some(lerp(USUAL_TEMPERATURE, p.temperature) as f32);
        }
        if mode == Mode::Performance && fields.top_k.is_none() && p.top_k > 0 {
            tuned.top_k = Some(i64::from(p.top_k));
        }
        tuned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> TuningSpec {
        TuningSpec {
            mode: TuningMode::LoadBased,
            ..TuningSpec::default()
        }
    }

    #[test]
    fn modes_follow_load_with_hysteresis() {
        let (low, high) = (0.3, 0.8);
        let mut mode = Mode::Quality;
        let mut seen = Vec::new();
        for load in [
            0.1, 0.5, 0.85, 0.79, 0.76, 0.74, 0.5, 0.31, 0.29, 0.33, 0.36,
        ] {
            mode = next_mode(mode, load, low, high);
            seen.push(mode.label());
        }
        assert_eq!(
            seen,
            [
                "quality",
                "balanced",
                "performance",
                "performance", // 0.79: within the margin below 0.8
                "performance", // 0.76: still within it (0.05)
                "balanced",    // 0.74: out
                "balanced",
                "balanced",
                "quality",
                "quality", // 0.33: within the margin above 0.3
                "balanced",
            ]
        );
    }

    #[test]
    fn the_load_is_looked_at_once_an_interval() {
        let tuner = Tuner::new(&on());
        let t0 = Instant::now();
        assert_eq!(tuner.observe(t0, || 0.9), Some(Mode::Performance));
        // Within the interval the load is not read.
        assert_eq!(
            tuner.observe(t0 + Duration::from_secs(1), || panic!()),
            Some(Mode::Performance)
        );
        // Smoothed: (0.9 + 0.1) / 2 = 0.5 → balanced.
        assert_eq!(
            tuner.observe(t0 + Duration::from_secs(5), || 0.1),
            Some(Mode::Balanced)
        );
        assert_eq!(
            tuner.observe(t0 + Duration::from_secs(10), || 0.0),
            Some(Mode::Quality)
        );
        let off = Tuner::new(&TuningSpec::default());
        assert_eq!(off.observe(t0, || 0.9), None);
        assert_eq!(off.current(), None);
    }

    #[test]
    fn only_fields_the_client_left_unset_change() {
        let tuner = Tuner::new(&on());
        let unset = SamplingFields::default();
        let fast = tuner.apply(Mode::Performance, &unset);
        assert_eq!(fast.max_tokens, Some(256));
        assert_eq!(fast.temperature, Some(0.7));
        assert_eq!(fast.top_k, Some(40));
        let set = SamplingFields {
            max_tokens: Some(900),
            temperature: Some(1.3),
            top_k: Some(5),
            ..SamplingFields::default()
        };
        let kept = tuner.apply(Mode::Performance, &set);
        assert_eq!(
            (kept.max_tokens, kept.temperature, kept.top_k),
            (Some(900), Some(1.3), Some(5))
        );
        let quality = tuner.apply(Mode::Quality, &unset);
        assert_eq!((quality.max_tokens, quality.temperature), (None, None));
        // Balanced at the middle of the thresholds: halfway values, no topK.
        tuner.observe(Instant::now(), || 0.55);
        let mid = tuner.apply(Mode::Balanced, &unset);
        assert_eq!(mid.max_tokens, Some(640));
        assert!((mid.temperature.unwrap() - 0.85).abs() < 1e-6);
        assert_eq!(mid.top_k, None);
    }
}
