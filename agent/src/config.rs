//! Standalone configuration: Model, CachePolicy, BatchPolicy,
//! ModelEnsemble and Tenant resources in their CRD shape, read from one
//! YAML file (`--config weir.yaml`), and resolved into the [`ModelSpec`]s
//! the agent loads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use weir_crds::{
    BatchPolicySpec, CachePolicySpec, ModelEnsembleSpec, ModelSpec as ModelResource, TenantSpec,
};

use crate::models::ModelSpec;

/// Errors in a configuration file, naming the document and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A document is not valid YAML or does not match its kind's schema.
    #[error("{path}: document {index}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Zero-based document index.
        index: usize,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
struct Doc {
    kind: String,
    metadata: Meta,
    #[serde(default)]
    spec: serde_yaml::Value,
}

#[derive(Deserialize)]
struct Meta {
    name: String,
}

/// Every non-empty document of `path`, with its index.
fn documents(path: &Path) -> Result<Vec<(usize, Doc)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.into(),
        source,
    })?;
    let invalid = |index, message: String| ConfigError::Invalid {
        path: path.into(),
        index,
        message,
    };
    let mut docs = Vec::new();
    for (index, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value =
            serde_yaml::Value::deserialize(de).map_err(|e| invalid(index, e.to_string()))?;
        if value.is_null() {
            continue;
        }
        docs.push((
            index,
            serde_yaml::from_value(value).map_err(|e| invalid(index, e.to_string()))?,
        ));
    }
    Ok(docs)
}

/// Everything a standalone configuration file declares.
#[derive(Clone, Debug, Default)]
pub struct Standalone {
    /// Models to load.
    pub models: Vec<ModelSpec>,
    /// Ensembles: name and spec, `modelRef`s already mapped to served names.
    pub ensembles: Vec<(String, ModelEnsembleSpec)>,
    /// Tenants: name and spec (their keys are read from the Secrets dir).
    pub tenants: Vec<(String, TenantSpec)>,
}

/// Reads only the Tenants of `path` (re-read while the agent runs, so that
/// tenants and their keys change without a restart).
pub fn load_tenants(path: &Path) -> Result<Vec<(String, TenantSpec)>, ConfigError> {
    let mut tenants = Vec::new();
    for (index, doc) in documents(path)? {
        if doc.kind == "Tenant" {
            let spec: TenantSpec =
                serde_yaml::from_value(doc.spec).map_err(|e| ConfigError::Invalid {
                    path: path.into(),
                    index,
                    message: format!("Tenant {}: {e}", doc.metadata.name),
                })?;
            tenants.push((doc.metadata.name, spec));
        }
    }
    Ok(tenants)
}

/// Reads `path`: Models (with their policies resolved) and ModelEnsembles.
pub fn load_all(path: &Path) -> Result<Standalone, ConfigError> {
    let invalid = |index, message: String| ConfigError::Invalid {
        path: path.into(),
        index,
        message,
    };
    let mut served = BTreeMap::new();
    let mut ensembles = Vec::new();
    for (index, doc) in documents(path)? {
        match doc.kind.as_str() {
            "Model" => {
                let name = doc
                    .spec
                    .get("servedName")
                    .and_then(serde_yaml::Value::as_str)
                    .map(str::to_owned);
                served.insert(doc.metadata.name.clone(), name.unwrap_or(doc.metadata.name));
            }
            "ModelEnsemble" => {
                let spec: ModelEnsembleSpec = serde_yaml::from_value(doc.spec).map_err(|e| {
                    invalid(index, format!("ModelEnsemble {}: {e}", doc.metadata.name))
                })?;
                ensembles.push((index, doc.metadata.name, spec));
            }
            _ => {}
        }
    }
    let models = load(path)?;
    let ensembles = ensembles
        .into_iter()
        .map(|(index, name, mut spec)| {
            for member in &mut spec.members {
                if let Some(r) = &mut member.model_ref {
                    r.name = served.get(&r.name).cloned().ok_or_else(|| {
                        invalid(
                            index,
                            format!(
                                "ModelEnsemble {name}: member {}: no Model named `{}`",
                                member.name, r.name
                            ),
                        )
                    })?;
                }
            }
            Ok((name, spec))
        })
        .collect::<Result<_, ConfigError>>()?;
    let tenants = load_tenants(path)?;
    Ok(Standalone {
        models,
        ensembles,
        tenants,
    })
}

/// Reads `path` and resolves every Model into a loadable spec: `file://`
/// sources become directories, policy references are looked up by name.
pub fn load(path: &Path) -> Result<Vec<ModelSpec>, ConfigError> {
    let invalid = |index, message: String| ConfigError::Invalid {
        path: path.into(),
        index,
        message,
    };
    let mut caches = BTreeMap::new();
    let mut batches = BTreeMap::new();
    let mut models = Vec::new();
    for (index, doc) in documents(path)? {
        let name = doc.metadata.name.clone();
        let spec = doc.spec;
        match doc.kind.as_str() {
            "CachePolicy" => {
                let s: CachePolicySpec = serde_yaml::from_value(spec)
                    .map_err(|e| invalid(index, format!("CachePolicy {name}: {e}")))?;
                caches.insert(name, s);
            }
            "BatchPolicy" => {
                let s: BatchPolicySpec = serde_yaml::from_value(spec)
                    .map_err(|e| invalid(index, format!("BatchPolicy {name}: {e}")))?;
                batches.insert(name, s);
            }
            "ModelEnsemble" | "Tenant" => {}
            "Model" => {
                let s: ModelResource = serde_yaml::from_value(spec)
                    .map_err(|e| invalid(index, format!("Model {name}: {e}")))?;
                models.push((index, name, s));
            }
            other => {
                return Err(invalid(
                    index,
                    format!("kind `{other}` is not supported in a standalone config"),
                ));
            }
        }
    }
    models
        .into_iter()
        .map(|(index, name, m)| {
            let dir = match m.source.uri.strip_prefix("file://") {
                Some(dir) => PathBuf::from(dir),
                None => {
                    return Err(invalid(
                        index,
                        format!(
                            "Model {name}: spec.source.uri `{}`: standalone mode serves file:// directories only",
                            m.source.uri
                        ),
                    ));
                }
            };
            let cache = match &m.cache_policy_ref {
                None => CachePolicySpec::default(),
                Some(r) => caches.get(&r.name).cloned().ok_or_else(|| {
                    invalid(index, format!("Model {name}: spec.cachePolicyRef: no CachePolicy named `{}`", r.name))
                })?,
            };
            let batch = match &m.batch_policy_ref {
                None => BatchPolicySpec::default(),
                Some(r) => batches.get(&r.name).cloned().ok_or_else(|| {
                    invalid(index, format!("Model {name}: spec.batchPolicyRef: no BatchPolicy named `{}`", r.name))
                })?,
            };
            Ok(ModelSpec { name: m.served_name.clone().unwrap_or(name), dir, engine: m.engine, cache, batch, redis_url: None })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_policies_and_reports_bad_references() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weir.yaml");
        std::fs::write(
            &path,
            "kind: BatchPolicy\nmetadata: {name: fast}\nspec: {maxNumSeqs: 8}\n---\n\
             kind: Model\nmetadata: {name: m}\nspec:\n  source: {uri: 'file:///models/m'}\n  servedName: tiny\n  batchPolicyRef: {name: fast}\n",
        )
        .unwrap();
        let specs = load(&path).unwrap();
        assert_eq!(specs[0].name, "tiny");
        assert_eq!(specs[0].batch.max_num_seqs, 8);
        assert_eq!(specs[0].dir, PathBuf::from("/models/m"));

        std::fs::write(&path, "kind: Model\nmetadata: {name: m}\nspec:\n  source: {uri: 'file:///x'}\n  cachePolicyRef: {name: nope}\n").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("cachePolicyRef") && err.contains("nope"),
            "{err}"
        );

        std::fs::write(
            &path,
            "kind: Model\nmetadata: {name: m}\nspec:\n  source: {uri: 'hf://org/x'}\n",
        )
        .unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("file://"));
    }
}
