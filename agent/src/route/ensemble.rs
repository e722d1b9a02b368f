//! Ensembles: one public model name spread over member Models (local or on
//! peers) and external OpenAI-compatible endpoints. A member is chosen per
//! request by the ensemble's strategy — `Weighted` (random by effective
//! weight), `BestOf` (best recent latency), `Adaptive` (weighted, shifted
//! away from loaded members) — and on an error the next member is tried
//! when fallback is on.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::Duration;

use weir_crds::ensemble::{EnsembleStrategy, ModelEnsembleSpec, ModelEnsembleStatus};

/// Where a member sends requests.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// A Weir model (served here or by a peer).
    Model(String),
    /// An external OpenAI-compatible endpoint.
    External {
        /// Base URL including `/v1`.
        url: String,
        /// Model name at the endpoint.
        model: String,
        /// Bearer key, if any (read from its Secret).
        api_key: Option<String>,
        /// Time limit of one request.
        timeout: Duration,
    },
}

/// One member with its current share of traffic.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    /// Member name.
    pub name: String,
    /// Where it sends requests.
    pub target: Target,
    /// Effective share (from the status the operator writes, else the
    /// configured weight), not normalised.
    pub weight: f64,
}

/// A resolved ensemble.
#[derive(Clone, Debug, PartialEq)]
pub struct Ensemble {
    /// Public name.
    pub name: String,
    /// Members in configured order.
    pub members: Vec<Member>,
    /// Selection strategy.
    pub strategy: EnsembleStrategy,
    /// Most members tried for one request (1 = no fallback).
    pub max_attempts: usize,
}

impl Ensemble {
    /// Builds an ensemble from its spec and status; `model_of` maps a
    /// `modelRef` name to the served model name, `secret` reads an API key.
    pub fn resolve(
        name: &str,
        spec: &ModelEnsembleSpec,
        status: Option<&ModelEnsembleStatus>,
        model_of: impl Fn(&str) -> String,
        secret: impl Fn(&str, &str) -> Option<String>,
    ) -> Self {
        let effective: BTreeMap<&str, f64> = status
            .map(|s| {
                s.members
                    .iter()
                    .map(|m| (m.name.as_str(), m.weight))
                    .collect()
            })
            .unwrap_or_default();
        let members = spec
            .members
            .iter()
            .filter_map(|m| {
                let target = match (&m.model_ref, &m.endpoint) {
                    (Some(r), None) => Target::Model(model_of(&r.name)),
                    (None, Some(e)) => Target::External {
                        url: e.url.trim_end_matches('/').to_owned(),
                        model: e.model.clone(),
                        api_key: e
                            .api_key_secret_ref
                            .as_ref()
                            .and_then(|s| secret(&s.name, &s.key)),
                        timeout: Duration::from_secs(u64::from(e.timeout_seconds)),
                    },
                    _ => return None,
                };
                let weight = effective
                    .get(m.name.as_str())
                    .copied()
                    .unwrap_or(f64::from(m.weight));
                Some(Member {
                    name: m.name.clone(),
                    target,
                    weight,
                })
            })
            .collect();
        Self {
            name: spec.served_name.clone().unwrap_or_else(|| name.to_owned()),
            members,
            strategy: spec.strategy,
            max_attempts: if spec.fallback.enabled {
                spec.fallback.max_attempts.max(1) as usize
            } else {
                1
            },
        }
    }

    /// Members in the order to try them. `u` is a uniform draw in [0, 1);
    /// `latency` and `load` give a member's recent p50 latency (seconds) and
    /// in-flight requests, when known.
    pub fn order(
        &self,
        u: f64,
        latency: impl Fn(&Member) -> Option<f64>,
        load: impl Fn(&Member) -> f64,
    ) -> Vec<usize> {
        let n = self.members.len();
        let weights: Vec<f64> = match self.strategy {
            EnsembleStrategy::Weighted | EnsembleStrategy::BestOf => {
                self.members.iter().map(|m| m.weight.max(0.0)).collect()
            }
            // Shift weight away from members with many requests in flight.
            EnsembleStrategy::Adaptive => self
                .members
                .iter()
                .map(|m| m.weight.max(0.0) / (1.0 + load(m)))
                .collect(),
        };
        let first = match self.strategy {
            EnsembleStrategy::BestOf => (0..n).filter(|&i| weights[i] > 0.0).min_by(|&a, &b| {
                let la = latency(&self.members[a]).unwrap_or(f64::INFINITY);
                let lb = latency(&self.members[b]).unwrap_or(f64::INFINITY);
                la.total_cmp(&lb).then(a.cmp(&b))
            }),
            _ => pick_weighted(&weights, u),
        };
        let mut order: Vec<usize> = first.into_iter().collect();
        // Fallback: the rest by descending weight, then configured order.
        let mut rest: Vec<usize> = (0..n)
            .filter(|i| Some(*i) != first && weights[*i] > 0.0)
            .collect();
        rest.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
        order.extend(rest);
        order.truncate(self.max_attempts);
        order
    }
}

/// Index drawn in proportion to `weights` with `u` in [0, 1); `None` when
/// all weights are zero.
pub fn pick_weighted(weights: &[f64], u: f64) -> Option<usize> {
    let total: f64 = weights.iter().filter(|w| **w > 0.0).sum();
    if total <= 0.0 {
        return None;
    }
    let mut target = u.clamp(0.0, 1.0 - f64::EPSILON) * total;
    for (i, w) in weights.iter().enumerate() {
        if *w <= 0.0 {
            continue;
        }
        if target < *w {
            return Some(i);
        }
        target -= w;
    }
    weights.iter().rposition(|w| *w > 0.0)
}

/// Ensembles by public name.
#[derive(Debug, Default)]
pub struct EnsembleTable {
    ensembles: RwLock<BTreeMap<String, Ensemble>>,
}

impl EnsembleTable {
    /// Replaces every ensemble.
    pub fn replace(&self, ensembles: Vec<Ensemble>) {
        *self.ensembles.write().unwrap_or_else(|p| p.into_inner()) =
            ensembles.into_iter().map(|e| (e.name.clone(), e)).collect();
    }

    /// The ensemble named `name`.
    pub fn get(&self, name: &str) -> Option<Ensemble> {
        self.ensembles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Every public name.
    pub fn names(&self) -> Vec<String> {
        self.ensembles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ensemble(strategy: EnsembleStrategy, weights: &[f64], attempts: usize) -> Ensemble {
        Ensemble {
            name: "chat".into(),
            members: weights
                .iter()
                .enumerate()
                .map(|(i, w)| Member {
                    name: format!("m{i}"),
                    target: Target::Model(format!("model{i}")),
                    weight: *w,
                })
                .collect(),
            strategy,
            max_attempts: attempts,
        }
    }

    #[test]
    fn weighted_choice_follows_the_weights() {
        let e = ensemble(EnsembleStrategy::Weighted, &[3.0, 1.0, 0.0], 3);
        let mut counts = [0usize; 3];
        for i in 0..10_000 {
            counts[e.order(i as f64 / 10_000.0, |_| None, |_| 0.0)[0]] += 1;
        }
        assert_eq!(counts, [7500, 2500, 0]);
        // Fallback never tries a member of weight zero.
        assert_eq!(e.order(0.1, |_| None, |_| 0.0), vec![0, 1]);
    }

    #[test]
    fn best_of_takes_the_fastest_and_adaptive_avoids_load() {
        let e = ensemble(EnsembleStrategy::BestOf, &[1.0, 1.0, 1.0], 2);
        let latency = |m: &Member| {
            Some(match m.name.as_str() {
                "m0" => 0.9,
                "m1" => 0.2,
                _ => 0.5,
            })
        };
        assert_eq!(e.order(0.99, latency, |_| 0.0)[0], 1);
        assert_eq!(e.order(0.0, latency, |_| 0.0).len(), 2);
        let a = ensemble(EnsembleStrategy::Adaptive, &[1.0, 1.0], 2);
        let load = |m: &Member| if m.name == "m0" { 9.0 } else { 0.0 };
        let firsts = (0..100)
            .filter(|i| a.order(*i as f64 / 100.0, |_| None, load)[0] == 1)
            .count();
        assert!(firsts >= 90, "{firsts}");
    }

    #[test]
    fn pick_handles_edges() {
        assert_eq!(pick_weighted(&[0.0, 0.0], 0.5), None);
        assert_eq!(pick_weighted(&[0.0, 2.0], 0.999_999), Some(1));
        assert_eq!(pick_weighted(&[1.0], 1.0), Some(0));
    }
}
