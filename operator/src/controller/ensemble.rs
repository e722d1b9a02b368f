//! The ModelEnsemble controller: each reweighting interval an ensemble gets
//! new effective weights from the collected figures of its member Models
//! (requests, p50 latency and TTFT, error rate since its previous
//! reweighting), written into `ModelEnsemble.status` with the figures
//! behind them; agents route by those weights. External members have no
//! collected figures yet and keep their share.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;
use weir_crds::common::CommonStatus;
use weir_crds::ensemble::{MemberStatus, ModelEnsembleStatus};
use weir_crds::{Model, ModelEnsemble};

use super::{Context, Error, observe};
use crate::reweight::{MemberFigures, reweight};
use crate::scrape::ModelFigures;
use crate::world;

/// Each member's figures between two collections.
pub fn member_figures(
    ensemble: &ModelEnsemble,
    models: &[Arc<Model>],
    now: &BTreeMap<String, ModelFigures>,
    before: &BTreeMap<String, ModelFigures>,
) -> Vec<MemberFigures> {
    let ns = ensemble.namespace();
    ensemble
        .spec
        .members
        .iter()
        .map(|m| {
            let model = m.model_ref.as_ref().and_then(|r| {
                models
                    .iter()
                    .find(|x| x.name_any() == r.name && x.namespace() == ns)
            });
            let mut f = MemberFigures {
                name: m.name.clone(),
                configured: f64::from(m.weight),
                available: m.endpoint.is_some(),
                ..MemberFigures::default()
            };
            if let Some(model) = model {
                f.available = model.status.as_ref().is_some_and(|s| s.ready_replicas > 0);
                let served = world::served_name(model);
                if let Some(cur) = now.get(&served) {
                    let prev = before.get(&served).cloned().unwrap_or_default();
                    let ok = (cur.successes - prev.successes).max(0.0);
                    let bad = (cur.failures - prev.failures).max(0.0);
                    f.requests = ok + bad;
                    f.error_rate = (f.requests > 0.0).then(|| bad / f.requests);
                    f.latency_p50 = cur.e2e.since(&prev.e2e).quantile(0.5);
                    f.ttft_p50 = cur.ttft.since(&prev.ttft).quantile(0.5);
                }
            }
            f
        })
        .collect()
}

/// Reconciles one ensemble (the controller's entry point): when its
/// reweighting interval has passed (or it has no status yet), reweights it
/// from the figures collected since its last reweighting and writes its
/// status; requeued for the next interval.
pub async fn reconcile(ensemble: Arc<ModelEnsemble>, ctx: Arc<Context>) -> Result<Action, Error> {
    observe(&ctx, ensemble.as_ref(), async {
        let key = format!(
            "{}/{}",
            ensemble.namespace().unwrap_or_default(),
            ensemble.name_any()
        );
        let interval = ensemble
            .spec
            .reweighting
            .as_ref()
            .map_or(Duration::from_secs(30), |r| {
                Duration::from_secs(u64::from(r.interval_seconds.max(1)))
            });
        let figures = ctx.figures.read().await.clone();
        let collection = ctx.collections.load(std::sync::atomic::Ordering::Acquire);
        let models = ctx.caches.models.state();
        let mut reweights = ctx.reweights().lock().await;
        let last = reweights.get(&key).cloned();
        let before = last.as_ref().map(|l| l.figures.clone()).unwrap_or_default();
        let members = member_figures(&ensemble, &models, &figures, &before);
        // Availability changes are written at once; weights move each interval.
        let changed = ensemble.status.as_ref().is_none_or(|s| {
            let now: Vec<(&str, bool)> = members
                .iter()
                .map(|m| (m.name.as_str(), m.available))
                .collect();
            let then: Vec<(&str, bool)> = s
                .members
                .iter()
                .map(|m| (m.name.as_str(), m.available))
                .collect();
            now != then
        });
        // Weights move only on figures collected since the last move.
        let fresh = last
            .as_ref()
            .is_none_or(|l| l.at.elapsed() >= interval && collection > l.collection);
        if !fresh && !changed {
            let wait = last.map_or(interval, |l| interval.saturating_sub(l.at.elapsed()));
            return Ok(Action::requeue(wait.max(Duration::from_secs(1))));
        }
        let status = status(&ensemble, &members, fresh);
        let api: Api<ModelEnsemble> = Api::namespaced(
            ctx.client.clone(),
            &ensemble.namespace().unwrap_or_default(),
        );
        let patch =
            json!({"apiVersion": "weir.dev/v1alpha1", "kind": "ModelEnsemble", "status": status});
        let params = PatchParams::apply(crate::apply::FIELD_MANAGER).force();
        let result = api
            .patch_status(&ensemble.name_any(), &params, &Patch::Apply(patch))
            .await;
        ctx.metrics.record("ModelEnsemble", &result);
        result?;
        if fresh {
            let at = Instant::now();
            let last = Reweighted {
                at,
                figures,
                collection,
            };
            reweights.insert(key, last);
        }
        Ok(Action::requeue(interval))
    })
    .await
}

/// An ensemble's last reweighting.
#[derive(Clone, Debug)]
pub struct Reweighted {
    /// When.
    pub at: Instant,
    /// The collected figures it used (the baseline of the next one).
    pub figures: BTreeMap<String, ModelFigures>,
    /// Which collection they came from.
    pub collection: u64,
}

/// The ensemble's status: effective weights from its members' figures.
/// Without `fresh` figures (only availability changed) the weights stay
/// and the figures shown are the previous ones.
pub fn status(
    ensemble: &ModelEnsemble,
    members: &[MemberFigures],
    fresh: bool,
) -> ModelEnsembleStatus {
    let shown = |name: &str| {
        ensemble
            .status
            .as_ref()
            .filter(|_| !fresh)
            .and_then(|s| s.members.iter().find(|m| m.name == name))
    };
    let previous_shares: BTreeMap<String, f64> = ensemble
        .status
        .as_ref()
        .map(|s| {
            s.members
                .iter()
                .map(|m| (m.name.clone(), m.weight))
                .collect()
        })
        .unwrap_or_default();
    let shares = match &ensemble.spec.reweighting {
        Some(r) => reweight(
            members,
            r.objective,
            r.min_weight,
            r.max_step,
            &previous_shares,
        ),
        // Without reweighting the configured weights stand (normalised).
        None => reweight(members, Default::default(), 0.0, 0.0, &BTreeMap::new()),
    };
    ModelEnsembleStatus {
        common: CommonStatus {
            observed_generation: ensemble.metadata.generation,
            conditions: vec![world::condition(
                &ensemble
                    .status
                    .as_ref()
                    .map(|s| s.common.conditions.clone())
                    .unwrap_or_default(),
                "Ready",
                members.iter().any(|m| m.available),
                "Members",
                format!(
                    "{} of {} members available",
                    members.iter().filter(|m| m.available).count(),
                    members.len()
                ),
                ensemble.metadata.generation,
                Timestamp::now(),
            )],
        },
        served_name: Some(
            ensemble
                .spec
                .served_name
                .clone()
                .unwrap_or_else(|| ensemble.name_any()),
        ),
        members: members
            .iter()
            .map(|m| match shown(&m.name) {
                Some(before) => MemberStatus {
                    weight: shares.get(&m.name).copied().unwrap_or(0.0),
                    available: m.available,
                    ..before.clone()
                },
                None => MemberStatus {
                    name: m.name.clone(),
                    weight: shares.get(&m.name).copied().unwrap_or(0.0),
                    requests: m.requests as u64,
                    latency_p50_ms: m.latency_p50.map(|s| s * 1e3),
                    ttft_p50_ms: m.ttft_p50.map(|s| s * 1e3),
                    error_rate: m.error_rate,
                    available: m.available,
                },
            })
            .collect(),
        last_reweight_time: match ensemble.status.as_ref() {
            Some(s) if !fresh => s.last_reweight_time.clone(),
            _ => Some(Time(Timestamp::now())),
        },
    }
}
