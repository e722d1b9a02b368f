//! Standalone mode: Tenants from the `--config` file, their keys from the
//! Secrets directory (`<dir>/<secret>/<key>`, as Kubernetes mounts a
//! Secret), both read again every [`RELOAD_EVERY`] so that a rotated key,
//! or a changed Tenant, takes effect without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use weir_crds::common::SecretKeyRef;

use super::{Tenant, TenantTable, build};
use crate::metrics::tenants::TenantMetrics;

/// How often the config file and the key files are read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// A Secret key's value from the mounted Secrets directory.
pub fn read_secret(dir: &Path, r: &SecretKeyRef) -> Option<String> {
    std::fs::read_to_string(dir.join(&r.name).join(&r.key))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The tenants `config` declares, keys read from `secrets`.
pub fn load(config: &Path, secrets: &Path) -> Result<Vec<Tenant>, crate::config::ConfigError> {
    let specs = crate::config::load_tenants(config)?;
    Ok(build(&specs, |r| read_secret(secrets, r)))
}

/// Puts `tenants` in `table` when they differ from what it holds, and
/// updates the keys-loaded gauges; whether anything changed.
pub fn install(table: &TenantTable, metrics: &TenantMetrics, tenants: Vec<Tenant>) -> bool {
    let current = table.all();
    let same =
        current.len() == tenants.len() && current.iter().zip(&tenants).all(|(a, b)| **a == *b);
    if same {
        return false;
    }
    let keys: Vec<(String, usize)> = tenants
        .iter()
        .map(|t| (t.name.to_string(), t.keys_loaded()))
        .collect();
    for t in &tenants {
        let (loaded, named) = (t.keys_loaded(), t.spec.api_keys.len());
        if loaded < named {
            tracing::warn!(tenant = %t.name, loaded, named, "some tenant API keys could not be read (Secret file missing or empty)");
        } else {
            tracing::info!(tenant = %t.name, keys = loaded, "tenant loaded");
        }
    }
    metrics.set_keys(&keys);
    table.replace(tenants);
    true
}

/// Reads `config` and `secrets` again every [`RELOAD_EVERY`]; a file that
/// fails to parse keeps the tenants as they were (and says why).
pub fn spawn_reload(
    table: Arc<TenantTable>,
    metrics: TenantMetrics,
    config: PathBuf,
    secrets: PathBuf,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (config, secrets) = (config.clone(), secrets.clone());
            let loaded = tokio::task::spawn_blocking(move || load(&config, &secrets)).await;
            match loaded {
                Ok(Ok(tenants)) => {
                    install(&table, &metrics, tenants);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "tenants not reloaded; keeping the last good ones")
                }
                Err(_) => {}
            }
        }
    });
}
