//! Downloads `hf://org/name` models from the Hugging Face Hub (or any
//! server speaking its HTTP API, e.g. a mirror named by `HF_ENDPOINT`) into
//! the node's model cache: the revision's file list from
//! `/api/models/{repo}/revision/{rev}`, then each file the engine reads
//! from `/{repo}/resolve/{sha}/{file}`, streamed to disk. A download goes
//! to a private directory and is renamed into place only when every file is
//! complete, so a crash or a failed transfer never leaves a half model that
//! looks loadable. Written here rather than taken from `hf-hub` because the
//! agent needs progress, size limits, a bearer token from a Secret and
//! atomic placement under its own cache layout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

/// Largest model accepted (bytes over all files).
pub const MAX_MODEL_BYTES: u64 = 2 << 40;
/// Most files fetched for one model.
pub const MAX_FILES: usize = 2048;

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The Hub refused the token or needs one.
    #[error("{0}: the repository is private or gated; set the Model's source.tokenSecretRef")]
    Unauthorized(String),
    /// No such repository, revision or file.
    #[error("{0}: not found on the Hub")]
    NotFound(String),
    /// The revision has no weights the engine reads.
    #[error("{0}")]
    Unusable(String),
    /// Network or server trouble.
    #[error("{0}")]
    Transfer(String),
    /// Writing the cache failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

#[derive(Deserialize)]
struct RevisionInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
}

/// Bytes fetched so far and expected in all (0 while unknown).
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes written.
    pub done: AtomicU64,
    /// Bytes expected (sum of the sizes seen so far).
    pub total: AtomicU64,
}

impl Progress {
    /// Fraction done, if the total is known.
    pub fn fraction(&self) -> Option<f64> {
        let total = self.total.load(Ordering::Relaxed);
        (total > 0).then(|| self.done.load(Ordering::Relaxed) as f64 / total as f64)
    }
}

/// A Hub endpoint and the token to send.
#[derive(Clone)]
pub struct Hub {
    http: reqwest::Client,
    endpoint: String,
    max_bytes: u64,
    max_files: usize,
}

/// Whether the engine reads `file` (weights, configs, tokenizer files).
fn wanted(file: &str) -> bool {
    if file.split('/').any(|p| p == ".." || p.is_empty()) || file.starts_with('.') {
        return false;
    }
    if file == "1_Pooling/config.json" {
        return true;
    }
    if file.contains('/') {
        return false;
    }
    file.ends_with(".safetensors")
        || matches!(
            file,
            "config.json"
                | "generation_config.json"
                | "model.safetensors.index.json"
                | "tokenizer.json"
                | "tokenizer_config.json"
                | "special_tokens_map.json"
                | "chat_template.jinja"
                | "modules.json"
                | "sentence_bert_config.json"
        )
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Hub {
    /// The Hub at `endpoint` (no trailing slash needed).
    pub fn new(endpoint: &str) -> Self {
        Self {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(60))
                .build()
                .unwrap_or_default(),
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            max_bytes: MAX_MODEL_BYTES,
            max_files: MAX_FILES,
        }
    }

    /// The same Hub with other size limits (bytes over all files, files).
    pub fn with_limits(mut self, max_bytes: u64, max_files: usize) -> Self {
        self.max_bytes = max_bytes;
        self.max_files = max_files;
        self
    }

    /// `HF_ENDPOINT`, else the public Hub.
    pub fn from_env() -> Self {
        Self::new(&std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into()))
    }

    async fn get(
        &self,
        url: &str,
        what: &str,
        token: Option<&str>,
    ) -> Result<reqwest::Response, HubError> {
        let mut request = self.http.get(url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| HubError::Transfer(format!("{what}: {e}")))?;
        match response.status().as_u16() {
            200..=299 => Ok(response),
            401 | 403 => Err(HubError::Unauthorized(what.to_owned())),
            404 => Err(HubError::NotFound(what.to_owned())),
            s => Err(HubError::Transfer(format!("{what}: HTTP {s}"))),
        }
    }

    /// Downloads `repo` at `revision` into `dest` (which must not exist yet;
    /// its parent is created) and returns `dest`.
    pub async fn download(
        &self,
        repo: &str,
        revision: &str,
        token: Option<&str>,
        dest: &Path,
        progress: &Progress,
    ) -> Result<PathBuf, HubError> {
        self.download_files(repo, revision, None, token, dest, progress)
            .await
    }

    /// Downloads the one file `file` of `repo` (a GGUF model) at `revision`
    /// into the directory `dest`, as [`Self::download`] does a whole model.
    pub async fn download_file(
        &self,
        repo: &str,
        revision: &str,
        file: &str,
        token: Option<&str>,
        dest: &Path,
        progress: &Progress,
    ) -> Result<PathBuf, HubError> {
        self.download_files(repo, revision, Some(file), token, dest, progress)
            .await
    }

    async fn download_files(
        &self,
        repo: &str,
        revision: &str,
        only: Option<&str>,
        token: Option<&str>,
        dest: &Path,
        progress: &Progress,
    ) -> Result<PathBuf, HubError> {
        let what = format!("hf://{repo}@{revision}");
        let url = format!("{}/api/models/{repo}/revision/{revision}", self.endpoint);
        let info: RevisionInfo = self
            .get(&url, &what, token)
            .await?
            .json()
            .await
            .map_err(|e| HubError::Transfer(format!("{what}: revision info: {e}")))?;
        let sha = info.sha.unwrap_or_else(|| revision.to_owned());
        let names = info.siblings.into_iter().map(|s| s.rfilename);
        let files: Vec<String> = match only {
            Some(file) => {
                let safe = !file.split('/').any(|p| p == ".." || p.is_empty());
                if !safe || !names.into_iter().any(|f| f == file) {
                    return Err(HubError::NotFound(format!("{what}/{file}")));
                }
                vec![file.to_owned()]
            }
            None => names.filter(|f| wanted(f)).collect(),
        };
        if only.is_none()
            && (!files.iter().any(|f| f == "config.json")
                || !files.iter().any(|f| f.ends_with(".safetensors")))
        {
            return Err(HubError::Unusable(format!(
                "{what} has no config.json or no safetensors weights"
            )));
        }
        if files.len() > self.max_files {
            return Err(HubError::Unusable(format!(
                "{what} has {} files to fetch, more than the limit of {}",
                files.len(),
                self.max_files
            )));
        }
        let parent = dest.parent().unwrap_or(Path::new("."));
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(io(parent))?;
        static ATTEMPT: AtomicU64 = AtomicU64::new(0);
        let tmp = parent.join(format!(
            ".download-{}-{}",
            std::process::id(),
            ATTEMPT.fetch_add(1, Ordering::Relaxed)
        ));
        let result = self
            .fetch_all(repo, &sha, token, &files, &tmp, progress)
            .await;
        let result = match result {
            Ok(()) => tokio::fs::rename(&tmp, dest).await.map_err(io(dest)),
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
        }
        result.map(|()| dest.to_path_buf())
    }

    async fn fetch_all(
        &self,
        repo: &str,
        sha: &str,
        token: Option<&str>,
        files: &[String],
        tmp: &Path,
        progress: &Progress,
    ) -> Result<(), HubError> {
        for file in files {
            let url = format!("{}/{repo}/resolve/{sha}/{file}", self.endpoint);
            let what = format!("hf://{repo}/{file}");
            let response = self.get(&url, &what, token).await?;
            let expected = response.content_length();
            let too_large = || {
                HubError::Unusable(format!(
                    "hf://{repo} is larger than the limit of {} bytes",
                    self.max_bytes
                ))
            };
            if let Some(n) = expected {
                let total = progress.total.fetch_add(n, Ordering::Relaxed) + n;
                if total > self.max_bytes {
                    return Err(too_large());
                }
            }
            let path = tmp.join(file);
            if let Some(dir) = path.parent() {
                tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
            }
            let mut out = tokio::fs::File::create(&path).await.map_err(io(&path))?;
            let mut written = 0u64;
            let mut body = response.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| HubError::Transfer(format!("{what}: {e}")))?;
                written += chunk.len() as u64;
                let done = progress
                    .done
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed)
                    + chunk.len() as u64;
                // Also for bodies without (or lying about) a length.
                if done > self.max_bytes {
                    return Err(too_large());
                }
                out.write_all(&chunk).await.map_err(io(&path))?;
            }
            out.flush().await.map_err(io(&path))?;
            if expected.is_some_and(|n| n != written) {
                return Err(HubError::Transfer(format!(
                    "{what}: got {written} of {} bytes",
                    expected.unwrap_or(0)
                )));
            }
        }
        Ok(())
    }
}

/// Where one file of `hf://repo` (a GGUF model) at `revision` lives: in a
/// directory of its own beside the repository's, `<repo dir>~<file>`, so
/// two files of one repository never share a download.
pub fn file_dir(model_cache: &Path, repo: &str, revision: Option<&str>, file: &str) -> PathBuf {
    let dir = cache_dir(model_cache, repo, revision);
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!("~{}", file.replace('/', "_")));
    dir.with_file_name(name)
}

/// Where `hf://repo` at `revision` lives in the model cache: the default
/// branch at `<cache>/hf/<repo>`, any other revision at `<cache>/hf/<repo>@<rev>`.
pub fn cache_dir(model_cache: &Path, repo: &str, revision: Option<&str>) -> PathBuf {
    let base = model_cache.join("hf");
    match revision {
        None | Some("main") => base.join(repo),
        Some(rev) => base.join(format!("{repo}@{rev}")),
    }
}

/// Shared progress of the downloads in flight, by destination.
pub type InFlight = Arc<std::sync::Mutex<std::collections::HashMap<PathBuf, Arc<Progress>>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_engine_files_inside_the_repository_are_fetched() {
        for f in [
            "config.json",
            "model-00001-of-00002.safetensors",
            "tokenizer.json",
            "1_Pooling/config.json",
        ] {
            assert!(wanted(f), "{f}");
        }
        for f in [
            "pytorch_model.bin",
            "../etc/passwd",
            "a/../../b.safetensors",
            "onnx/model.onnx",
            ".gitattributes",
            "sub/model.safetensors",
        ] {
            assert!(!wanted(f), "{f}");
        }
        let cache = Path::new("/c");
        assert_eq!(cache_dir(cache, "org/m", None), Path::new("/c/hf/org/m"));
        assert_eq!(
            cache_dir(cache, "org/m", Some("v2")),
            Path::new("/c/hf/org/m@v2")
        );
    }
}
