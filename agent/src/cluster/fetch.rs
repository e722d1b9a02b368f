//! Downloads of `hf://` sources in cluster mode: at most one per
//! destination, running beside the sync loop, with progress reported as the
//! model's Loading progress. When one ends the sync loop is woken to load
//! the model (or report why it failed); a failed download is retried after
//! [`RETRY_AFTER`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::status::ModelState;
use crate::hub::{Hub, Progress};

/// Wait before a failed download is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(60);

enum Entry {
    Running(Arc<Progress>),
    Failed(String, Instant),
}

/// Downloads in flight and recently failed, by destination.
#[derive(Clone)]
pub struct Downloads {
    hub: Hub,
    entries: Arc<Mutex<HashMap<PathBuf, Entry>>>,
    finished: Arc<Notify>,
}

impl std::fmt::Debug for Downloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downloads").finish_non_exhaustive()
    }
}

/// What to fetch.
pub struct Fetch {
    /// `org/name`.
    pub repo: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// Bearer token, from the Model's Secret.
    pub token: Option<String>,
    /// Where the model goes.
    pub dir: PathBuf,
    /// The one file to fetch (a GGUF model), or the whole model.
    pub file: Option<String>,
}

impl Downloads {
    /// Downloads from `hub`.
    pub fn new(hub: Hub) -> Self {
        Self {
            hub,
            entries: Arc::default(),
            finished: Arc::default(),
        }
    }

    /// The state of the download `fetch` describes, starting it unless one
    /// runs or failed less than [`RETRY_AFTER`] ago.
    pub fn ensure(&self, fetch: Fetch) -> ModelState {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        // Failures are remembered only as long as they hold a retry back.
        entries.retain(|_, e| !matches!(e, Entry::Failed(_, at) if at.elapsed() >= RETRY_AFTER));
        match entries.get(&fetch.dir) {
            Some(Entry::Running(progress)) => return loading(progress),
            Some(Entry::Failed(why, _)) => {
                return ModelState::failed("DownloadFailed", why.clone());
            }
            _ => {}
        }
        let progress = Arc::new(Progress::default());
        entries.insert(fetch.dir.clone(), Entry::Running(progress.clone()));
        let (hub, all, finished) = (
            self.hub.clone(),
            self.entries.clone(),
            self.finished.clone(),
        );
        tokio::spawn(async move {
            tracing::info!(repo = %fetch.repo, revision = %fetch.revision, "downloading");
            let token = fetch.token.as_deref();
            let result = match &fetch.file {
                Some(file) => {
                    hub.download_file(
                        &fetch.repo,
                        &fetch.revision,
                        file,
                        token,
                        &fetch.dir,
                        &progress,
                    )
                    .await
                }
                None => {
                    hub.download(&fetch.repo, &fetch.revision, token, &fetch.dir, &progress)
                        .await
                }
            };
            let mut entries = all.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(_) => {
                    tracing::info!(repo = %fetch.repo, "downloaded");
                    entries.remove(&fetch.dir);
                }
                Err(e) => {
                    tracing::warn!(repo = %fetch.repo, error = %e, "download failed");
                    entries.insert(
                        fetch.dir.clone(),
                        Entry::Failed(e.to_string(), Instant::now()),
                    );
                    // Wake the sync loop again when a retry is due.
                    let again = finished.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(RETRY_AFTER).await;
                        again.notify_one();
                    });
                }
            }
            drop(entries);
            finished.notify_one();
        });
        ModelState::loading()
    }

    /// Resolves when a download has ended since the last call.
    pub async fn finished(&self) {
        self.finished.notified().await;
    }
}

fn loading(progress: &Progress) -> ModelState {
    ModelState {
        progress: progress.fraction(),
        ..ModelState::loading()
    }
}
