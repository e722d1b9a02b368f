//! What an agent must do to serve its NodeAgent's spec: resolve each
//! assigned model's source to a directory, and diff the assignment against
//! what is loaded. Pure functions; the cluster loop carries them out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use weir_crds::node_agent::AssignedModel;

use crate::models::ModelSpec;

/// One step towards the assigned state.
#[derive(Clone, Debug, PartialEq)]
pub enum SyncAction {
    /// Load a model that is not served yet.
    Load(ModelSpec),
    /// Source or engine settings changed: load anew, then swap it in.
    Replace(ModelSpec),
    /// Only cache or batch policies changed: keep the engine.
    UpdatePolicies(ModelSpec),
    /// No longer assigned: stop serving (requests in flight finish).
    Unload(String),
}

/// Where model sources live on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceRoots {
    /// Downloaded `hf://` models: `<model_cache>/hf/<org>/<name>`.
    pub model_cache: PathBuf,
    /// Mounted PersistentVolumeClaims: `<pvc_root>/<claim>/<path>`.
    pub pvc_root: PathBuf,
}

/// The directory holding `uri` (for `hf://`, where the model cache keeps
/// it, downloaded or not), or why it cannot be served here.
pub fn resolve_source(
    uri: &str,
    revision: Option<&str>,
    roots: &SourceRoots,
) -> Result<PathBuf, String> {
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(path));
    }
    if let Some(rest) = uri.strip_prefix("pvc://") {
        let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
        if claim.is_empty() || path.split('/').any(|p| p == "..") {
            return Err(format!("`{uri}` is not a valid pvc:// source"));
        }
        return Ok(roots.pvc_root.join(claim).join(path));
    }
    if let Some(rest) = uri.strip_prefix("hf://") {
        let parts: Vec<&str> = rest.split('/').collect();
        let gguf = parts.len() == 3 && parts[2].ends_with(".gguf");
        if !(parts.len() == 2 || gguf)
            || parts
                .iter()
                .any(|p| p.is_empty() || *p == ".." || *p == ".")
        {
            return Err(format!(
                "`{uri}` is not a valid hf:// source (hf://org/name or hf://org/name/FILE.gguf)"
            ));
        }
        let repo = format!("{}/{}", parts[0], parts[1]);
        // Downloaded there when missing (see `cluster::fetch`).
        if gguf {
            let dir = crate::hub::file_dir(&roots.model_cache, &repo, revision, parts[2]);
            return Ok(dir.join(parts[2]));
        }
        return Ok(crate::hub::cache_dir(&roots.model_cache, &repo, revision));
    }
    Err(format!("unsupported source scheme in `{uri}`"))
}

/// The loadable spec for an assignment.
pub fn model_spec(assigned: &AssignedModel, roots: &SourceRoots) -> Result<ModelSpec, String> {
    Ok(ModelSpec {
        name: assigned.served_name.clone(),
        dir: resolve_source(
            &assigned.source.uri,
            assigned.source.revision.as_deref(),
            roots,
        )?,
        engine: assigned.engine.clone(),
        cache: assigned.cache.clone(),
        batch: assigned.batch.clone(),
        redis_url: None,
    })
}

/// The actions that turn `loaded` into `desired`, unloads first (they free
/// memory for what comes next).
pub fn plan(loaded: &BTreeMap<String, ModelSpec>, desired: &[ModelSpec]) -> Vec<SyncAction> {
    let wanted: BTreeMap<&str, &ModelSpec> = desired.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut actions: Vec<SyncAction> = loaded
        .keys()
        .filter(|name| !wanted.contains_key(name.as_str()))
        .map(|name| SyncAction::Unload(name.clone()))
        .collect();
    for (name, spec) in wanted {
        match loaded.get(name) {
            None => actions.push(SyncAction::Load(spec.clone())),
            Some(current) if current == spec => {}
            Some(current) if same_engine(current, spec) => {
                actions.push(SyncAction::UpdatePolicies(spec.clone()))
            }
            Some(_) => actions.push(SyncAction::Replace(spec.clone())),
        }
    }
    actions
}

fn same_engine(a: &ModelSpec, b: &ModelSpec) -> bool {
    a.dir == b.dir && a.engine == b.engine && a.cache.prefix_cache == b.cache.prefix_cache
}

/// Whether `path` lies inside `root` (for logs and checks).
pub fn is_inside(path: &Path, root: &Path) -> bool {
    path.starts_with(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots() -> SourceRoots {
        SourceRoots {
            model_cache: "/var/lib/weir/models".into(),
            pvc_root: "/mnt/pvc".into(),
        }
    }

    fn spec(name: &str, dir: &str) -> ModelSpec {
        ModelSpec {
            name: name.into(),
            dir: dir.into(),
            engine: Default::default(),
            cache: Default::default(),
            batch: Default::default(),
            redis_url: None,
        }
    }

    #[test]
    fn sources_resolve_or_explain() {
        let r = |uri: &str| resolve_source(uri, None, &roots());
        assert_eq!(r("file:///models/a"), Ok("/models/a".into()));
        assert_eq!(
            r("pvc://store/llama/3b"),
            Ok("/mnt/pvc/store/llama/3b".into())
        );
        assert!(r("pvc://store/../../etc").is_err());
        assert_eq!(
            r("hf://meta-llama/Llama-3.2-1B"),
            Ok("/var/lib/weir/models/hf/meta-llama/Llama-3.2-1B".into())
        );
        assert_eq!(
            resolve_source("hf://org/m", Some("v2"), &roots()),
            Ok("/var/lib/weir/models/hf/org/m@v2".into())
        );
        assert_eq!(
            resolve_source("hf://org/m/m.Q4_1.gguf", None, &roots()),
            Ok("/var/lib/weir/models/hf/org/m~m.Q4_1.gguf/m.Q4_1.gguf".into())
        );
        for bad in [
            "hf://org",
            "hf://org/../x",
            "hf://a/b/c",
            "hf://a/b/../c.gguf",
            "s3://bucket/x",
        ] {
            assert!(r(bad).is_err(), "{bad}");
        }
        assert!(is_inside(&r("pvc://c/p").unwrap(), &roots().pvc_root));
    }

    #[test]
    fn plan_loads_unloads_and_swaps_only_what_changed() {
        let loaded: BTreeMap<_, _> = [("a", "/m/a"), ("b", "/m/b"), ("c", "/m/c")]
            .map(|(n, d)| (n.to_owned(), spec(n, d)))
            .into();
        let mut b_policy = spec("b", "/m/b");
        b_policy.batch.max_num_seqs = 8;
        let c_moved = spec("c", "/m/c2");
        let desired = vec![
            spec("a", "/m/a"),
            b_policy.clone(),
            c_moved.clone(),
            spec("d", "/m/d"),
        ];
        let actions = plan(&loaded, &desired);
        assert_eq!(
            actions,
            vec![
                SyncAction::UpdatePolicies(b_policy),
                SyncAction::Replace(c_moved),
                SyncAction::Load(spec("d", "/m/d")),
            ]
        );
        let gone = plan(&loaded, &[spec("a", "/m/a")]);
        assert_eq!(
            gone,
            vec![
                SyncAction::Unload("b".into()),
                SyncAction::Unload("c".into())
            ]
        );
        assert!(plan(&loaded, &loaded.values().cloned().collect::<Vec<_>>()).is_empty());
    }
}
