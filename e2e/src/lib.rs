//! Support for Weir's end-to-end tests: repository paths, YAML fixtures and
//! access to a real cluster when `KUBECONFIG` names one.

pub mod chaos;
pub mod process;

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

/// Every YAML document in `path`, as JSON values (empty documents skipped).
pub fn yaml_docs(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let value: serde_yaml::Value =
                serde::Deserialize::deserialize(doc).expect("valid YAML");
            serde_json::to_value(value).expect("YAML maps to JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The `.yaml` files of a folder, sorted.
pub fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// A client for the cluster `KUBECONFIG` names, or `None` (with a note on
/// stderr) when the variable is unset, so cluster suites skip cleanly in CI.
pub async fn cluster_client() -> Option<kube::Client> {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("KUBECONFIG is not set: skipping the cluster suite");
        return None;
    }
    Some(
        kube::Client::try_default()
            .await
            .expect("KUBECONFIG names a reachable cluster"),
    )
}
