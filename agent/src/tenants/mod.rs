//! Tenants: who may call, with which models, under which limits. The
//! [`TenantTable`] holds each Tenant's spec and the SHA-256 of its API keys
//! (read from Secrets: mounted files in standalone mode, the API in cluster
//! mode; never kept in plain text, never logged), and answers "whose key is
//! this" in constant time ([`keys`]). The limits are counted by a
//! [`limits::Limiter`], shared across agents through Redis.
//!
//! Identity travels with a forwarded request in [`TENANT_HEADER`], which an
//! agent honours only from a peer that sent the cluster's peer token
//! ([`PEER_TOKEN_HEADER`]); from anyone else it is dropped before the
//! request is read further.

pub mod files;
pub mod keys;
pub mod limits;
pub mod window;

use std::sync::{Arc, RwLock};

use weir_crds::common::SecretKeyRef;
use weir_crds::tenant::TenantSpec;

use keys::KeyHash;

/// Header carrying the authenticated tenant of a request (set by the HTTP
/// layer; trusted from peers with the peer token only).
pub const TENANT_HEADER: &str = "x-weir-tenant";
/// Header carrying the cluster-internal token between agents.
pub const PEER_TOKEN_HEADER: &str = "x-weir-peer-token";

/// One tenant as the agent knows it.
#[derive(Debug, PartialEq)]
pub struct Tenant {
    /// The Tenant object's name (the metric label).
    pub name: Arc<str>,
    /// Its spec.
    pub spec: TenantSpec,
    keys: Vec<KeyHash>,
}

impl Tenant {
    /// A tenant named `name` whose keys are `keys` (plain, hashed here).
    pub fn new<'a>(name: &str, spec: TenantSpec, keys: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            name: name.into(),
            spec,
            keys: keys.into_iter().map(KeyHash::of).collect(),
        }
    }

    /// How many of its keys were loaded.
    pub fn keys_loaded(&self) -> usize {
        self.keys.len()
    }

    /// The scope its cache entries live in: `None` (the shared pool) when
    /// it shares, else its own name.
    pub fn cache_scope(&self) -> Option<Arc<str>> {
        (!self.spec.share_cache).then(|| self.name.clone())
    }
}

/// Every tenant this agent knows, replaced whole when Tenants or their
/// Secrets change.
#[derive(Debug, Default)]
pub struct TenantTable {
    tenants: RwLock<Arc<Vec<Arc<Tenant>>>>,
}

impl TenantTable {
    /// Replaces every tenant.
    pub fn replace(&self, tenants: Vec<Tenant>) {
        let tenants = tenants.into_iter().map(Arc::new).collect();
        *self.tenants.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tenants);
    }

    fn all(&self) -> Arc<Vec<Arc<Tenant>>> {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether any tenant is configured (then every request needs a key).
    pub fn is_empty(&self) -> bool {
        self.all().is_empty()
    }

    /// The tenant whose key is `key`: every stored hash is compared, in
    /// constant time each.
    pub fn by_key(&self, key: &str) -> Option<Arc<Tenant>> {
        let sent = KeyHash::of(key);
        let all = self.all();
        let mut found = None;
        for tenant in all.iter() {
            if keys::find(&tenant.keys, &sent).is_some() && found.is_none() {
                found = Some(tenant.clone());
            }
        }
        found
    }

    /// The tenant named `name`.
    pub fn by_name(&self, name: &str) -> Option<Arc<Tenant>> {
        self.all().iter().find(|t| &*t.name == name).cloned()
    }

    /// Every tenant's name (the metrics' label values).
    pub fn names(&self) -> Vec<Arc<str>> {
        self.all().iter().map(|t| t.name.clone()).collect()
    }
}

/// Builds tenants from their specs, reading each key with `read` (a
/// Secret's value, or `None` when it cannot be read: logged by name, and
/// left out).
pub fn build(
    specs: &[(String, TenantSpec)],
    read: impl Fn(&SecretKeyRef) -> Option<String>,
) -> Vec<Tenant> {
    specs
        .iter()
        .map(|(name, spec)| {
            let values: Vec<String> = spec
                .api_keys
                .iter()
                .filter_map(|r| {
                    let value = read(r).filter(|v| !v.trim().is_empty());
                    if value.is_none() {
                        tracing::debug!(tenant = %name, secret = %r.name, key = %r.key, "tenant API key not readable; left out");
                    }
                    value
                })
                .collect();
            Tenant::new(name, spec.clone(), values.iter().map(String::as_str))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(share: bool) -> TenantSpec {
        serde_json::from_value(serde_json::json!({
            "apiKeys": [{"name": "s", "key": "a"}, {"name": "s", "key": "b"}],
            "shareCache": share,
        }))
        .unwrap()
    }

    #[test]
    fn keys_map_to_their_tenant_and_unreadable_ones_are_left_out() {
        let table = TenantTable::default();
        assert!(table.is_empty());
        let read = |r: &SecretKeyRef| (r.key == "a").then(|| "sk-one\n".to_owned());
        let mut built = build(&[("one".into(), spec(false))], read);
        built.push(Tenant::new("two", spec(true), ["sk-two", "sk-two-old"]));
        table.replace(built);
        assert_eq!(table.by_key("sk-one").unwrap().name.as_ref(), "one");
        assert_eq!(table.by_key("sk-two-old").unwrap().name.as_ref(), "two");
        assert!(table.by_key("sk-three").is_none());
        assert_eq!(table.by_name("one").unwrap().keys_loaded(), 1);
        assert_eq!(
            table.by_name("one").unwrap().cache_scope().as_deref(),
            Some("one")
        );
        assert_eq!(table.by_name("two").unwrap().cache_scope(), None);
    }
}
