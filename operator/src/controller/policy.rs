//! The CachePolicy and BatchPolicy controllers: each policy's status
//! counts the Models in its namespace that name it (reconciled again on
//! every Model change). Written only when the count changes.

use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use weir_crds::common::LocalRef;
use weir_crds::{BatchPolicy, CachePolicy, Model};

use super::{Context, Error, observe};
use crate::apply;

/// A policy kind Models refer to.
pub trait Policy:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
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

/// Reconciles one policy (the controller's entry point).
pub async fn reconcile<P: Policy>(policy: Arc<P>, ctx: Arc<Context>) -> Result<Action, Error> {
    observe(&ctx, policy.as_ref(), async {
        let (ns, name) = (policy.namespace(), policy.name_any());
        let count = ctx
            .caches
            .models
            .state()
            .iter()
            .filter(|m| m.namespace() == ns && m.metadata.deletion_timestamp.is_none())
            .filter(|m| P::reference(m).is_some_and(|r| r.name == name))
            .count() as u32;
        if policy.count() != Some(count) {
            let kind = P::kind(&());
            let result = apply::policy_count(&ctx.client, policy.as_ref(), &kind, count).await;
            ctx.metrics.record(&kind, &result);
            result?;
        }
        Ok(Action::await_change())
    })
    .await
}
