//! The NodeAgent controller: two conditions that only the operator owns
//! on a NodeAgent's status (the agent's own `Ready` is untouched), each
//! applied under a field manager of its own so that neither writer
//! releases the other's entry:
//!
//! - `Heartbeat` (manager [`apply::FIELD_MANAGER`]): `False` with an event
//!   when the agent's heartbeat went stale, back to `True` when it reports
//!   again; healthy agents are not written.
//! - `Drained` (manager [`apply::DRAIN_MANAGER`]): while a drain is asked
//!   for ([`drain::DRAIN_ANNOTATION`] on the NodeAgent or its Node),
//!   `False`/`Draining` with the replicas left, `True`/`Drained` once none
//!   is; removed when the annotation goes. Events `DrainStarted`,
//!   `Drained`, `DrainEnded`.
//!
//! Requeued every interval, since staleness is the absence of updates and
//! a Node's annotation does not trigger a NodeAgent reconcile.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use weir_crds::NodeAgent;

use super::{Context, Error, observe};
use crate::{apply, drain, world};

/// Reconciles one NodeAgent (the controller's entry point).
pub async fn reconcile(agent: Arc<NodeAgent>, ctx: Arc<Context>) -> Result<Action, Error> {
    observe(&ctx, agent.as_ref(), async {
        let now = Timestamp::now();
        mark_heartbeat(&ctx, &agent, now).await?;
        report_drain(&ctx, &agent, now).await?;
        Ok(Action::requeue(ctx.interval))
    })
    .await
}

async fn mark_heartbeat(ctx: &Context, agent: &NodeAgent, now: Timestamp) -> Result<(), Error> {
    let Some(condition) = world::heartbeat_condition(agent, now, ctx.stale_after) else {
        return Ok(());
    };
    let result =
        apply::agent_condition(&ctx.client, agent, apply::FIELD_MANAGER, Some(&condition)).await;
    ctx.metrics.record("NodeAgentStatus", &result);
    if let Err(e) = result {
        tracing::warn!(agent = %agent.name_any(), error = %e, "marking the heartbeat");
        return Err(e.into());
    }
    let stale = condition.status == "False";
    apply::event(
        &ctx.client,
        agent,
        stale,
        &condition.reason,
        condition.message,
    )
    .await;
    Ok(())
}

async fn report_drain(ctx: &Context, agent: &NodeAgent, now: Timestamp) -> Result<(), Error> {
    let nodes = ctx.caches.nodes.state();
    let node = nodes.iter().find(|n| n.name_any() == agent.spec.node_name);
    let requested = drain::requested(agent, node.map(|n| n.as_ref()));
    let Some(report) = drain::report(agent, requested, now) else {
        return Ok(());
    };
    let result = apply::agent_condition(
        &ctx.client,
        agent,
        apply::DRAIN_MANAGER,
        report.condition.as_ref(),
    )
    .await;
    ctx.metrics.record("NodeAgentStatus", &result);
    if let Err(e) = result {
        tracing::warn!(agent = %agent.name_any(), error = %e, "reporting the drain");
        return Err(e.into());
    }
    if let Some((reason, note)) = report.event {
        apply::event(&ctx.client, agent, false, reason, note).await;
    }
    Ok(())
}
