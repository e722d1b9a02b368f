//! Ensemble status: each round, ensembles whose reweighting interval has
//! passed get new effective weights from the collected figures of their
//! member Models (requests, p50 latency and TTFT, error rate since the
//! previous collection round), written into `ModelEnsemble.status` with the figures behind
//! them; agents route by those weights. External members have no collected
//! figures yet and keep their share.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::Mutex;
use weir_crds::common::CommonStatus;
use weir_crds::ensemble::{MemberStatus, ModelEnsembleStatus};
use weir_crds::{Model, ModelEnsemble};

use crate::controller::Context;
use crate::reweight::{MemberFigures, reweight};
use crate::scrape::ModelFigures;
use crate::world;

fn member_figures(
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

/// Reweights every ensemble that is due and writes its status.
pub async fn reweight_all(
    ctx: &Context,
    ensembles: &[Arc<ModelEnsemble>],
    models: &[Arc<Model>],
    figures: &BTreeMap<String, ModelFigures>,
    previous: &Mutex<BTreeMap<String, ModelFigures>>,
    last: &Mutex<HashMap<String, Instant>>,
) {
    let before = previous.lock().await.clone();
    let mut last = last.lock().await;
    for ensemble in ensembles {
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
                Duration::from_secs(u64::from(r.interval_seconds))
            });
        if last.get(&key).is_some_and(|t| t.elapsed() < interval) && ensemble.status.is_some() {
            continue;
        }
        last.insert(key.clone(), Instant::now());
        let members = member_figures(ensemble, models, figures, &before);
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
                &members,
                r.objective,
                r.min_weight,
                r.max_step,
                &previous_shares,
            ),
            // Without reweighting the configured weights stand (normalised).
            None => reweight(&members, Default::default(), 0.0, 0.0, &BTreeMap::new()),
        };
        let status = ModelEnsembleStatus {
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
                .map(|m| MemberStatus {
                    name: m.name.clone(),
                    weight: shares.get(&m.name).copied().unwrap_or(0.0),
                    requests: m.requests as u64,
                    latency_p50_ms: m.latency_p50.map(|s| s * 1e3),
                    ttft_p50_ms: m.ttft_p50.map(|s| s * 1e3),
                    error_rate: m.error_rate,
                    available: m.available,
                })
                .collect(),
            last_reweight_time: Some(Time(Timestamp::now())),
        };
        let api: Api<ModelEnsemble> = Api::namespaced(
            ctx.client.clone(),
            &ensemble.namespace().unwrap_or_default(),
        );
        let patch =
            json!({"apiVersion": "weir.dev/v1alpha1", "kind": "ModelEnsemble", "status": status});
        let params = PatchParams::apply(crate::apply::FIELD_MANAGER).force();
        if let Err(e) = api
            .patch_status(&ensemble.name_any(), &params, &Patch::Apply(patch))
            .await
        {
            tracing::warn!(ensemble = %key, error = %e, "writing ModelEnsemble status");
        }
    }
    *previous.lock().await = figures.clone();
}
