//! `hf://` downloads over real HTTP from a local server that speaks the
//! Hugging Face Hub's API (revision info, then `resolve/{sha}/{file}`):
//! only engine files are fetched, the token is sent, the result loads, and
//! failures leave nothing that looks like a model.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use weir_agent::cluster::fetch::{Downloads, Fetch};
use weir_agent::hub::{Hub, HubError, Progress};
use weir_agent::models::{ModelSpec, ServedModel};
use weir_crds::node_agent::ModelPhase;
use weir_engine::testmodel::{TinyModelSpec, write_tiny_model};

#[derive(Clone)]
struct Repo {
    dir: PathBuf,
    token: Option<&'static str>,
    broken_file: Option<&'static str>,
    fetched: Arc<Mutex<Vec<String>>>,
    /// Serve files without a Content-Length (chunked).
    chunked: Arc<AtomicBool>,
}

fn authorized(repo: &Repo, headers: &HeaderMap) -> bool {
    let sent = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    repo.token
        .is_none_or(|t| sent == Some(format!("Bearer {t}")))
}

async fn revision(
    State(repo): State<Repo>,
    UrlPath((org, name, rev)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&repo, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if (org.as_str(), name.as_str(), rev.as_str()) != ("acme", "tiny", "main") {
        return StatusCode::NOT_FOUND.into_response();
    }
    let mut siblings = Vec::new();
    for entry in std::fs::read_dir(&repo.dir).unwrap() {
        siblings.push(json!({"rfilename": entry.unwrap().file_name().to_string_lossy()}));
    }
    axum::Json(json!({"id": "acme/tiny", "sha": "0123abcd", "siblings": siblings})).into_response()
}

async fn resolve(
    State(repo): State<Repo>,
    UrlPath((_org, _name, sha, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&repo, &headers) || sha != "0123abcd" {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    repo.fetched.lock().unwrap().push(file.clone());
    if repo.broken_file == Some(file.as_str()) {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    match std::fs::read(repo.dir.join(&file)) {
        Ok(bytes) if repo.chunked.load(Ordering::Relaxed) => {
            let chunks = bytes
                .chunks(256)
                .map(|c| Ok::<_, std::io::Error>(c.to_vec()));
            axum::body::Body::from_stream(futures::stream::iter(chunks.collect::<Vec<_>>()))
                .into_response()
        }
        Ok(bytes) => bytes.into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A hub serving `acme/tiny` (a tiny Llama plus files the engine never
/// reads); returns its URL and the repository state.
async fn hub(
    token: Option<&'static str>,
    broken_file: Option<&'static str>,
) -> (String, Repo, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("repo");
    write_tiny_model(&dir, &TinyModelSpec::llama()).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"pickle").unwrap();
    std::fs::write(dir.join("README.md"), b"# tiny").unwrap();
    let repo = Repo {
        dir,
        token,
        broken_file,
        fetched: Arc::default(),
        chunked: Arc::default(),
    };
    let app = axum::Router::new()
        .route("/api/models/{org}/{name}/revision/{rev}", get(revision))
        .route("/{org}/{name}/resolve/{sha}/{*file}", get(resolve))
        .with_state(repo.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, repo, tmp)
}

fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_model_downloads_with_its_token_and_loads() {
    let (url, repo, tmp) = hub(Some("hf_secret"), None).await;
    let dest = tmp.path().join("cache/hf/acme/tiny");
    let progress = Progress::default();
    let hub = Hub::new(&url);

    let err = hub
        .download("acme/tiny", "main", None, &dest, &progress)
        .await
        .unwrap_err();
    assert!(matches!(err, HubError::Unauthorized(_)), "{err}");
    assert!(err.to_string().contains("tokenSecretRef"), "{err}");
    assert!(!dest.exists());

    let dir = hub
        .download("acme/tiny", "main", Some("hf_secret"), &dest, &progress)
        .await
        .unwrap();
    assert_eq!(dir, dest);
    let mut fetched = repo.fetched.lock().unwrap().clone();
    fetched.sort();
    assert_eq!(
        fetched,
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    assert_eq!(progress.fraction(), Some(1.0));
    assert_eq!(
        leftovers(dest.parent().unwrap()),
        ["tiny"],
        "no temporary directory left"
    );
    let model = ServedModel::load(&ModelSpec {
        name: "tiny".into(),
        dir,
        ..ModelSpec::default()
    })
    .unwrap();
    assert_eq!(model.name, "tiny");

    let missing = hub
        .download(
            "acme/other",
            "main",
            Some("hf_secret"),
            &tmp.path().join("x"),
            &progress,
        )
        .await
        .unwrap_err();
    assert!(matches!(missing, HubError::NotFound(_)), "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_transfer_leaves_no_model_and_is_reported_then_retried_later() {
    let (url, _repo, tmp) = hub(None, Some("model.safetensors")).await;
    let dest = tmp.path().join("cache/hf/acme/tiny");
    let downloads = Downloads::new(Hub::new(&url));
    let fetch = || Fetch {
        repo: "acme/tiny".into(),
        revision: "main".into(),
        token: None,
        dir: dest.clone(),
        file: None,
    };
    assert_eq!(downloads.ensure(fetch()).phase, ModelPhase::Loading);
    tokio::time::timeout(std::time::Duration::from_secs(20), downloads.finished())
        .await
        .expect("the download ends");
    assert!(!dest.exists());
    assert!(
        leftovers(dest.parent().unwrap()).is_empty(),
        "{:?}",
        leftovers(dest.parent().unwrap())
    );
    let state = downloads.ensure(fetch());
    assert_eq!(state.phase, ModelPhase::Failed, "not retried at once");
    assert_eq!(state.reason.as_deref(), Some("DownloadFailed"));
    assert!(state.message.unwrap().contains("HTTP 500"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_in_cluster_mode_end_with_a_loadable_directory() {
    let (url, _repo, tmp) = hub(None, None).await;
    let dest = tmp.path().join("cache/hf/acme/tiny");
    let downloads = Downloads::new(Hub::new(&url));
    let fetch = Fetch {
        repo: "acme/tiny".into(),
        revision: "main".into(),
        token: None,
        dir: dest.clone(),
        file: None,
    };
    assert_eq!(downloads.ensure(fetch).phase, ModelPhase::Loading);
    tokio::time::timeout(std::time::Duration::from_secs(20), downloads.finished())
        .await
        .expect("the download ends");
    assert!(dest.join("config.json").exists());
    assert!(dest.join("model.safetensors").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_over_the_file_or_byte_limits_are_refused_and_leave_nothing() {
    let (url, repo, tmp) = hub(None, None).await;
    let dest = tmp.path().join("cache/hf/acme/tiny");
    let progress = Progress::default();
    let parent = || leftovers(dest.parent().unwrap());

    let few_files = Hub::new(&url).with_limits(u64::MAX, 2);
    let err = few_files
        .download("acme/tiny", "main", None, &dest, &progress)
        .await
        .unwrap_err();
    assert!(matches!(err, HubError::Unusable(_)), "{err}");
    assert!(err.to_string().contains("limit of 2"), "{err}");
    assert!(repo.fetched.lock().unwrap().is_empty(), "nothing fetched");

    // Declared sizes over the limit stop the download before the body;
    // bodies without a length (chunked) are counted as they stream.
    let small = Hub::new(&url).with_limits(1024, 2048);
    for chunked in [false, true] {
        repo.chunked.store(chunked, Ordering::Relaxed);
        let err = small
            .download("acme/tiny", "main", None, &dest, &Progress::default())
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("larger than the limit of 1024"),
            "chunked {chunked}: {text}"
        );
        assert!(!dest.exists() && parent().is_empty(), "{:?}", parent());
    }

    // Within the limits, the chunked model downloads.
    Hub::new(&url)
        .download("acme/tiny", "main", None, &dest, &Progress::default())
        .await
        .unwrap();
    assert!(dest.join("model.safetensors").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gguf_file_of_a_repository_downloads_into_its_own_directory() {
    let (url, repo, tmp) = hub(None, None).await;
    std::fs::write(repo.dir.join("tiny.Q4_1.gguf"), b"GGUF stand-in bytes").unwrap();
    std::fs::write(repo.dir.join("tiny.Q8_0.gguf"), b"another one").unwrap();
    let cache = tmp.path().join("cache");
    let path = weir_agent::cluster::plan::resolve_source(
        "hf://acme/tiny/tiny.Q4_1.gguf",
        None,
        &weir_agent::cluster::plan::SourceRoots {
            model_cache: cache.clone(),
            pvc_root: tmp.path().join("pvc"),
        },
    )
    .unwrap();
    assert_eq!(
        path,
        cache.join("hf/acme/tiny~tiny.Q4_1.gguf/tiny.Q4_1.gguf")
    );
    let downloads = Downloads::new(Hub::new(&url));
    let fetch = Fetch {
        repo: "acme/tiny".into(),
        revision: "main".into(),
        token: None,
        dir: path.parent().unwrap().to_path_buf(),
        file: Some("tiny.Q4_1.gguf".into()),
    };
    assert_eq!(downloads.ensure(fetch).phase, ModelPhase::Loading);
    tokio::time::timeout(std::time::Duration::from_secs(20), downloads.finished())
        .await
        .expect("the download ends");
    assert_eq!(std::fs::read(&path).unwrap(), b"GGUF stand-in bytes");
    assert_eq!(
        *repo.fetched.lock().unwrap(),
        ["tiny.Q4_1.gguf"],
        "only that file"
    );
    // A file the repository does not have is not found.
    let missing = Hub::new(&url)
        .download_file(
            "acme/tiny",
            "main",
            "nope.gguf",
            None,
            &tmp.path().join("x"),
            &Progress::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(missing, HubError::NotFound(_)), "{missing}");
}
