//! Start-up check that the cluster serves every Weir resource.

use std::time::Duration;

use kube::discovery::Discovery;

use crate::http::State;

/// Kinds the operator needs the API server to serve.
const KINDS: [&str; 5] = [
    "Model",
    "ModelEnsemble",
    "CachePolicy",
    "BatchPolicy",
    "NodeAgent",
];

/// Kinds of `weir.dev/v1alpha1` missing from the cluster's discovery data.
pub async fn missing_kinds(client: &kube::Client) -> Result<Vec<&'static str>, kube::Error> {
    let discovery = Discovery::new(client.clone())
        .filter(&[weir_crds::GROUP])
        .run()
        .await?;
    let served: Vec<String> = discovery
        .groups()
        .flat_map(|g| g.versioned_resources(weir_crds::VERSION))
        .map(|(resource, _)| resource.kind)
        .collect();
    Ok(KINDS
        .into_iter()
        .filter(|k| !served.iter().any(|s| s == k))
        .collect())
}

/// Polls discovery until every Weir kind is served, then marks the
/// operator ready. Missing CRDs are logged once per attempt with the command
/// that installs them.
pub async fn wait_for_api(client: &kube::Client, state: &State) {
    let mut delay = Duration::from_secs(1);
    loop {
        match missing_kinds(client).await {
            Ok(missing) if missing.is_empty() => {
                tracing::info!("all Weir CRDs are installed");
                state.set_ready(true);
                return;
            }
            Ok(missing) => tracing::warn!(
                ?missing,
                "Weir CRDs missing; install them with `kubectl apply -f crds/`"
            ),
            Err(err) => tracing::warn!(%err, "API discovery failed"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
