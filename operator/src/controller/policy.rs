//! The CachePolicy and BatchPolicy controllers: each policy's status
//! counts the Models in its namespace that name it (reconciled again on
//! every Model change), written only when the count changes. A policy
//! carries the finalizer [`POLICY_FINALIZER`]: deleting one that Models
//! still name is held, with an `InUse` warning event naming them, until no
//! Model does (those Models would otherwise lose their replicas to
//! `PolicyNotFound`). Removing the finalizer by hand forces the deletion.

use std::sync::Arc;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use weir_crds::common::LocalRef;
use weir_crds::{BatchPolicy, CachePolicy, Model};

use super::{Context, Error, finalizer_error, observe};
use crate::apply;

/// A policy kind Models refer to.
pub trait Policy:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + serde::Serialize
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// The Model field that names a policy of this kind.
    fn reference(model: &Model) -> Option<&LocalRef>;
    /// The count in the current status.
    fn count(&self) -> Option<u32>;
}

impl Policy for CachePolicy {
    fn reference(model: &Model) -> Option<&LocalRef> {
        model.spec.cache_policy_ref.as_ref()
    }
    fn count(&self) -> Option<u32> {
        self.status.as_ref().map(|s| s.model_count)
    }
}

impl Policy for BatchPolicy {
    fn reference(model: &Model) -> Option<&LocalRef> {
        model.spec.batch_policy_ref.as_ref()
    }
    fn count(&self) -> Option<u32> {
        self.status.as_ref().map(|s| s.model_count)
    }
}

/// Finalizer that holds a deleted policy while Models still name it.
pub const POLICY_FINALIZER: &str = "weir.dev/in-use";

/// Reconciles one policy (the controller's entry point).
pub async fn reconcile<P: Policy>(policy: Arc<P>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<P> = Api::namespaced(ctx.client.clone(), &policy.namespace().unwrap_or_default());
    observe(&ctx, policy.as_ref(), async {
        finalizer(&api, POLICY_FINALIZER, policy.clone(), |event| async {
            match event {
                Finalizer::Apply(p) => count(p.as_ref(), &ctx).await,
                Finalizer::Cleanup(p) => release(p.as_ref(), &ctx).await,
            }
        })
        .await
        .map_err(finalizer_error)
    })
    .await
}

/// The live Models in the policy's namespace that name it.
fn users<P: Policy>(policy: &P, ctx: &Context) -> Vec<String> {
    let (ns, name) = (policy.namespace(), policy.name_any());
    let mut users: Vec<String> = ctx
        .caches
        .models
        .state()
        .iter()
        .filter(|m| m.namespace() == ns && m.metadata.deletion_timestamp.is_none())
        .filter(|m| P::reference(m).is_some_and(|r| r.name == name))
        .map(|m| m.name_any())
        .collect();
    users.sort();
    users
}

async fn count<P: Policy>(policy: &P, ctx: &Context) -> Result<Action, Error> {
    let count = users(policy, ctx).len() as u32;
    if policy.count() != Some(count) {
        let kind = P::kind(&());
        let result = apply::policy_count(&ctx.client, policy, &kind, count).await;
        ctx.metrics.record(&kind, &result);
        result?;
    }
    Ok(Action::await_change())
}

/// Lets a deleted policy go once no Model names it.
async fn release<P: Policy>(policy: &P, ctx: &Context) -> Result<Action, Error> {
    let users = users(policy, ctx);
    if users.is_empty() {
        return Ok(Action::await_change());
    }
    let note = format!(
        "still named by Model(s) {}; the deletion waits until none does",
        users.join(", ")
    );
    apply::event(&ctx.client, policy, true, "InUse", note).await;
    Err(Error::InUse(users.len()))
}
