//! Cluster mode: Tenants from the API (a watched store), their keys from
//! their Secrets, read again every [`REFRESH_EVERY`] so that a rotated
//! Secret takes effect without a restart. A tenant is named
//! `namespace/name` (the metric label the operator maps back to the
//! object). Keys never leave this module as plain text: the table keeps
//! their SHA-256 only.

use std::time::Duration;

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use weir_crds::Tenant;

use crate::http::AppState;
use crate::tenants::{build, files};

/// How often Tenants' Secrets are read again.
pub const REFRESH_EVERY: Duration = Duration::from_secs(3);

fn tenant_store(client: &kube::Client) -> Store<Tenant> {
    let (reader, writer) = reflector::store();
    let api: Api<Tenant> = Api::all(client.clone());
    let stream =
        reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    tokio::spawn(stream.for_each(|_| async {}));
    reader
}

/// Keeps `state.tenants` current until the process ends.
pub async fn run(client: kube::Client, state: AppState) {
    let store = tenant_store(&client);
    let _ = store.wait_until_ready().await;
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    loop {
        tick.tick().await;
        let tenants = store.state();
        let mut specs = Vec::with_capacity(tenants.len());
        let mut values = Vec::new();
        for t in &tenants {
            let ns = t.namespace().unwrap_or_default();
            specs.push((format!("{ns}/{}", t.name_any()), t.spec.clone()));
            for r in &t.spec.api_keys {
                let value = super::secret_value(&client, &ns, r).await;
                values.push(((ns.clone(), r.name.clone(), r.key.clone()), value));
            }
        }
        let read = |name: &str, r: &weir_crds::common::SecretKeyRef| {
            let ns = name.split_once('/').map_or("", |(ns, _)| ns);
            values
                .iter()
                .find(|((n, s, k), _)| n == ns && *s == r.name && *k == r.key)
                .and_then(|(_, v)| v.clone())
        };
        let built = build_named(&specs, read);
        files::install(&state.tenants, &state.metrics.tenants, built);
    }
}

/// [`build`] with the tenant's name passed to `read` (Secrets are looked
/// up in the tenant's namespace).
fn build_named(
    specs: &[(String, weir_crds::TenantSpec)],
    read: impl Fn(&str, &weir_crds::common::SecretKeyRef) -> Option<String>,
) -> Vec<crate::tenants::Tenant> {
    specs
        .iter()
        .flat_map(|(name, spec)| {
            let one = [(name.clone(), spec.clone())];
            build(&one, |r| read(name, r))
        })
        .collect()
}
