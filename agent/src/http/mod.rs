//! The HTTP surface, the only layer that knows axum: the routes, who is
//! calling ([`auth`]), the body limit, and the state every handler shares. One handler
//! module per endpoint family ([`chat`], [`embeddings`], [`models`],
//! [`probes`], [`responses`], [`tokenize`]); requests are parsed into typed requests, answered through
//! [`crate::pipeline`], and rendered as JSON or SSE ([`render`],
//! [`respond`]); every
//! error becomes a status and an OpenAI body in one place ([`error`]).

pub mod auth;
pub mod chat;
pub mod embeddings;
pub mod error;
pub mod extract;
pub mod kv;
pub mod listen;
pub mod models;
pub mod probes;
pub mod render;
pub mod report;
pub mod respond;
pub mod responses;
pub mod tokenize;
pub mod tool_stream;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::api::ApiError;
use crate::gpu::GpuMonitor;
use crate::metrics::Metrics;
use crate::models::{ModelRegistry, ServedEncoder};
use crate::pipeline;
use crate::route::Routing;
use crate::route::ensemble::EnsembleTable;
use crate::route::forward;
use crate::route::hold::HoldQueues;
use crate::route::peers::PeerTable;

/// State shared by every handler.
#[derive(Clone)]
pub struct AppState {
    /// Served models.
    pub models: Arc<RwLock<ModelRegistry>>,
    /// Metrics.
    pub metrics: Metrics,
    /// Whether the agent takes traffic.
    pub ready: Arc<AtomicBool>,
    /// GPU readings.
    pub gpu: Arc<GpuMonitor>,
    /// Bearer key clients must send, if set.
    pub api_key: Option<Arc<str>>,
    /// Cluster mode: ready once registered, even before models arrive.
    pub cluster: bool,
    /// Whether routing knows the cluster (in cluster mode: after discovery's
    /// first pass over synced stores); `/ready` waits for it.
    pub synced: Arc<AtomicBool>,
    /// Peers that serve other models.
    pub peers: Arc<PeerTable>,
    /// Ensembles by public name.
    pub ensembles: Arc<EnsembleTable>,
    /// Requests held for models without a ready replica; released by peer
    /// table changes and by models loading here.
    pub holds: Arc<HoldQueues>,
    /// Pooled keep-alive client for forwarding.
    pub http: reqwest::Client,
    /// Tenants, their keys and limits.
    pub tenants: Arc<crate::tenants::TenantTable>,
    /// Counts the tenants' limits (in Redis when configured).
    pub limiter: crate::tenants::limits::Limiter,
    /// Token agents send one another (forwards and polls), if set.
    pub peer_token: Option<Arc<str>>,
    /// Bearer token `/metrics` needs, if set.
    pub metrics_token: Option<Arc<str>>,
    /// How requests are placed on replicas, and peers' KV summaries.
    pub routing: Arc<Routing>,
}

impl AppState {
    /// State over `models`, ready, without GPUs or an API key.
    pub fn new(models: ModelRegistry) -> Self {
        Self::with(models, Arc::new(GpuMonitor::default()), None)
    }

    /// State over `models` with a GPU monitor and an optional API key.
    pub fn with(models: ModelRegistry, gpu: Arc<GpuMonitor>, api_key: Option<String>) -> Self {
        let models = Arc::new(RwLock::new(models));
        let metrics = Metrics::new(models.clone(), gpu.clone());
        let holds = Arc::new(HoldQueues::new(metrics.held.clone()));
        let peers = Arc::new(PeerTable::default());
        let release = holds.clone();
        peers.on_change(move |table| {
            release.release_where(|m| !table.serving(m).is_empty());
        });
        Self {
            metrics,
            models,
            ready: Arc::new(AtomicBool::new(true)),
            gpu,
            api_key: api_key.map(Arc::from),
            cluster: false,
            synced: Arc::new(AtomicBool::new(true)),
            peers,
            ensembles: Arc::default(),
            holds,
            http: reqwest::Client::builder()
                .pool_idle_timeout(std::time::Duration::from_secs(20))
                .connect_timeout(std::time::Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
            tenants: Arc::default(),
            limiter: Default::default(),
            peer_token: None,
            metrics_token: None,
            routing: Arc::default(),
        }
    }

    /// What the request pipeline uses of this state.
    pub fn pipeline(&self) -> pipeline::Context<'_> {
        pipeline::Context {
            models: &self.models,
            metrics: &self.metrics,
            peers: &self.peers,
            ensembles: &self.ensembles,
            holds: &self.holds,
            http: &self.http,
            tenants: &self.tenants,
            limiter: &self.limiter,
            peer_token: self.peer_token.as_deref(),
            routing: &self.routing,
        }
    }

    /// Requests running and waiting for `name` here (0 if not local).
    pub fn load_of(&self, name: &str) -> f64 {
        self.pipeline().load_of(name)
    }

    /// Whether a model of either kind is served here.
    pub fn is_local(&self, name: &str) -> bool {
        self.pipeline().is_local(name)
    }

    /// The encoder named `name`, if served here.
    pub fn encoder(&self, name: &str) -> Option<Arc<ServedEncoder>> {
        self.pipeline().encoder(name)
    }

    /// Forwards a request for a model this agent does not hold to a peer
    /// that does (routed by `prefix`).
    pub async fn forward(
        &self,
        model: &str,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
        prefix: &str,
    ) -> Response {
        let prefix = crate::route::prefix_hash(prefix);
        let head = forward::head_timeout(false);
        let headers = forward::with_peer_token(headers, self.peer_token.as_deref());
        let forwarded = forward::to_peer(
            &self.http,
            &self.peers,
            model,
            path,
            &headers,
            body,
            prefix,
            head,
        );
        match forwarded.await {
            Ok(relayed) => respond::relay(relayed),
            Err(e) => e.into_response(),
        }
    }
}

/// The agent's router.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(chat::completions))
        .route("/v1/models", get(models::list_models))
        .route("/v1/models/{*id}", get(models::retrieve_model))
        .route("/v1/responses", post(responses::responses))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/weir/report", get(report::report))
        .route("/v1/weir/kv", get(kv::kv_summary))
        .route("/v1/weir/tokenizer", get(kv::tokenizer))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    let metrics = Router::new()
        .route("/metrics", get(probes::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_metrics_token,
        ));
    Router::new()
        .merge(api)
        .merge(metrics)
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(probes::ready))
        .fallback(|uri: Uri| async move { ApiError::RouteNotFound(uri.path().to_owned()) })
        .layer(DefaultBodyLimit::max(crate::api::extract::MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(limit_headers))
        .with_state(state)
}

/// Serves `router(state)` on `listener` within `limits` until `stop`
/// resolves, then stops accepting connections and waits for those open to
/// finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    limits: listen::Limits,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listen::serve(listener, router(state), limits, stop).await
}

/// Most headers a request may carry.
pub const MAX_HEADERS: usize = 100;
/// Most bytes of headers (names and values) a request may carry.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Refuses requests with too many or too large headers (431, OpenAI's
/// shape).
async fn limit_headers(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let headers = request.headers();
    let bytes: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len())
        .sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return ApiError::HeadersTooLarge(format!(
            "the request has {} headers of {bytes} bytes; the limits are {MAX_HEADERS} headers \
             and {MAX_HEADER_BYTES} bytes",
            headers.len()
        ))
        .into_response();
    }
    next.run(request).await
}
