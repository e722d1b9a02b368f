//! The NodeAgent controller: marks an agent whose heartbeat went stale
//! with a `Heartbeat=False` condition (which only the operator owns; the
//! agent's own `Ready` is untouched) and an event, and clears the mark when
//! it reports again. Healthy agents are not written. Requeued every
//! interval, since staleness is the absence of updates.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use weir_crds::NodeAgent;

use super::{Context, Error, observe};
use crate::{apply, world};

/// Reconciles one NodeAgent (the controller's entry point).
pub async fn reconcile(agent: Arc<NodeAgent>, ctx: Arc<Context>) -> Result<Action, Error> {
    observe(&ctx, agent.as_ref(), async {
        let now = Timestamp::now();
        if let Some(condition) = world::heartbeat_condition(&agent, now, ctx.stale_after) {
            let result = apply::agent_condition(&ctx.client, &agent, &condition).await;
            ctx.metrics.record("NodeAgentStatus", &result);
            if let Err(e) = result {
                tracing::warn!(agent = %agent.name_any(), error = %e, "marking the heartbeat");
                return Err(e.into());
            }
            let stale = condition.status == "False";
            let reason = condition.reason.clone();
            apply::event(
                &ctx.client,
                agent.as_ref(),
                stale,
                &reason,
                condition.message,
            )
            .await;
        }
        Ok(Action::requeue(ctx.interval))
    })
    .await
}
