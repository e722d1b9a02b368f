//! The HTTP server: OpenAI routes, health, readiness and metrics. Handlers
//! only translate: requests become [`Job`]s, jobs become engine requests
//! through [`respond`], and events become JSON or SSE.

pub mod embeddings;
pub mod ensemble;
pub mod error;
pub mod extract;
pub mod forward;
pub mod render;
pub mod respond;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use weir_engine::tokenizer::ChatMessage;

use crate::api::ApiError;
use crate::api::extract::parse;
use crate::api::types::{
    ChatCompletionRequest, CompletionRequest, MessageContent, ModelCard, ModelList, Prompt,
    SamplingFields,
};
use crate::generate::{Job, LogprobsWanted, SemanticInput, build_template, parse_priority};
use crate::gpu::GpuMonitor;
use crate::metrics::Metrics;
use crate::models::ServedEncoder;
use crate::models::{ModelRegistry, ServedModel};
use crate::route::ensemble::EnsembleTable;
use crate::route::{self, peers::PeerTable};
use extract::OpenAiBytes;
use forward as fwd;
use render::{ResponseMeta, Shape};
use respond::respond;

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
    /// Peers that serve other models.
    pub peers: Arc<PeerTable>,
    /// Ensembles by public name.
    pub ensembles: Arc<EnsembleTable>,
    /// Pooled keep-alive client for forwarding.
    pub http: reqwest::Client,
}

impl AppState {
    /// State over `models`, ready, without GPUs or an API key.
    pub fn new(models: ModelRegistry) -> Self {
        Self::with(models, Arc::new(GpuMonitor::default()), None)
    }

    /// State over `models` with a GPU monitor and an optional API key.
    pub fn with(models: ModelRegistry, gpu: Arc<GpuMonitor>, api_key: Option<String>) -> Self {
        let models = Arc::new(RwLock::new(models));
        Self {
            metrics: Metrics::new(models.clone(), gpu.clone()),
            models,
            ready: Arc::new(AtomicBool::new(true)),
            gpu,
            api_key: api_key.map(Arc::from),
            cluster: false,
            peers: Arc::default(),
            ensembles: Arc::default(),
            http: reqwest::Client::builder()
                .pool_idle_timeout(std::time::Duration::from_secs(90))
                .connect_timeout(std::time::Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
        }
    }

    fn model(&self, name: &str) -> Result<Arc<ServedModel>, ApiError> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        if models.encoder(name).is_some() {
            return Err(ApiError::invalid(
                "model",
                format!("`{name}` is an embedding model; use /v1/embeddings"),
            ));
        }
        models
            .get(name)
            .ok_or_else(|| ApiError::ModelNotFound(name.to_owned()))
    }

    /// Requests running and waiting for `name` here (0 if not local).
    pub fn load_of(&self, name: &str) -> f64 {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models.get(name).map_or(0.0, |m| {
            let s = m.engine.stats().snapshot();
            (s.running + s.waiting) as f64
        })
    }

    /// Whether a model of either kind is served here.
    pub fn is_local(&self, name: &str) -> bool {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .serves(name)
    }

    /// The encoder named `name`, if served here.
    pub fn encoder(&self, name: &str) -> Option<Arc<ServedEncoder>> {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .encoder(name)
    }

    /// Forwards a request for a model this agent does not hold.
    pub async fn forward(
        &self,
        model: &str,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
        prefix: &str,
    ) -> Response {
        if fwd::was_forwarded(headers) {
            return ApiError::ModelNotFound(model.to_owned()).into_response();
        }
        fwd::forward(
            &self.http,
            &self.peers,
            model,
            path,
            headers,
            body,
            route::prefix_hash(prefix),
        )
        .await
        .unwrap_or_else(IntoResponse::into_response)
    }
}

/// The agent's router.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_key,
        ));
    Router::new()
        .merge(api)
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|uri: Uri| async move { ApiError::RouteNotFound(uri.path().to_owned()) })
        .layer(DefaultBodyLimit::max(crate::api::extract::MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until Ctrl-C.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

/// Checks `Authorization: Bearer <key>` when the agent has an API key.
async fn require_key(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(key) = &state.api_key {
        let sent = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if sent != Some(key.as_ref()) {
            return ApiError::Unauthorized(
                "a valid API key is required (Authorization: Bearer ...)".into(),
            )
            .into_response();
        }
    }
    next.run(request).await
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn response_id(prefix: &str) -> String {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{:08x}", unix_now(), n)
}

/// The priority from the body, else the `x-weir-priority` header.
fn requested_priority(
    fields: &SamplingFields,
    headers: &HeaderMap,
) -> Result<Option<weir_engine::scheduler::Priority>, ApiError> {
    let header = headers.get("x-weir-priority").map(|v| {
        v.to_str()
            .map_err(|_| ApiError::invalid("x-weir-priority", "the header is not ASCII"))
    });
    match (&fields.priority, header) {
        (Some(p), _) => parse_priority(p).map(Some),
        (None, Some(h)) => parse_priority(h?).map(Some),
        (None, None) => Ok(None),
    }
}

fn chat_messages(request: &ChatCompletionRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    request
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content"),
                                    format!("content parts of type `{kind}` are not supported by this model"),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            let role = if m.role == "developer" { "system".to_owned() } else { m.role.clone() };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

/// Which OpenAI route a body belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

impl Kind {
    /// The route's path.
    pub fn path(self) -> &'static str {
        match self {
            Kind::Chat => "/v1/chat/completions",
            Kind::Completion => "/v1/completions",
        }
    }
}

#[derive(serde::Deserialize)]
struct ModelOnly {
    model: String,
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    OpenAiBytes(body): OpenAiBytes,
) -> Response {
    entry(state, headers, body, Kind::Chat).await
}

async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    OpenAiBytes(body): OpenAiBytes,
) -> Response {
    entry(state, headers, body, Kind::Completion).await
}

/// Ensembles first, then models served here or by peers.
async fn entry(state: AppState, headers: HeaderMap, body: Bytes, kind: Kind) -> Response {
    if let Ok(ModelOnly { model }) = serde_json::from_slice::<ModelOnly>(&body)
        && let Some(ensemble) = state.ensembles.get(&model)
    {
        return ensemble::serve(state, ensemble, headers, body, kind).await;
    }
    serve_model(state, headers, body, kind).await
}

/// Serves a body naming a model (not an ensemble): here if the model is
/// local, else by forwarding to a peer.
pub async fn serve_model(state: AppState, headers: HeaderMap, body: Bytes, kind: Kind) -> Response {
    match kind {
        Kind::Chat => serve_chat(state, headers, body).await,
        Kind::Completion => serve_completion(state, headers, body).await,
    }
}

async fn serve_chat(state: AppState, headers: HeaderMap, body: Bytes) -> Response {
    let request: ChatCompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if !state.is_local(&request.model) {
        let prefix = request.messages.iter().find_map(|m| match &m.content {
            Some(MessageContent::Text(t)) => Some(t.clone()),
            _ => None,
        });
        let prefix = prefix.unwrap_or_default();
        return state
            .forward(&request.model, Kind::Chat.path(), &headers, body, &prefix)
            .await;
    }
    match chat_job(&state, &headers, &request) {
        Ok((model, job, meta, stream)) => {
            respond(state, model, job, meta, Shape::Chat, stream).await
        }
        Err(e) => e.into_response(),
    }
}

type Prepared = (Arc<ServedModel>, Job, ResponseMeta, bool);

fn chat_job(
    state: &AppState,
    headers: &HeaderMap,
    request: &ChatCompletionRequest,
) -> Result<Prepared, ApiError> {
    let model = state.model(&request.model)?;
    let messages = chat_messages(request)?;
    let prompt_text = model
        .tokenizer
        .apply_chat_template(&messages, true, request.tools.as_ref())
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let prompt = model
        .tokenizer
        .encode(&prompt_text, false)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let logprobs = match (request.logprobs, request.top_logprobs) {
        (Some(true), top) => LogprobsWanted::Yes(top_logprobs(top, 20)?),
        (_, Some(t)) if t > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ));
        }
        _ => LogprobsWanted::No,
    };
    let mut prepared = prepare(
        state,
        model,
        headers,
        &request.sampling,
        vec![prompt],
        logprobs,
        &request.model,
        "chatcmpl",
    )?;
    prepared.1.semantic = Some(SemanticInput {
        route: "chat",
        messages,
    });
    Ok(prepared)
}

fn top_logprobs(value: Option<i64>, max: i64) -> Result<usize, ApiError> {
    match value.unwrap_or(0) {
        n if (0..=max).contains(&n) => Ok(n as usize),
        n => Err(ApiError::invalid(
            "top_logprobs",
            format!("must be between 0 and {max}, got {n}"),
        )),
    }
}

#[allow(clippy::too_many_arguments)] // one call site per route; a struct would only rename them
fn prepare(
    state: &AppState,
    model: Arc<ServedModel>,
    headers: &HeaderMap,
    fields: &SamplingFields,
    prompts: Vec<Vec<u32>>,
    logprobs: LogprobsWanted,
    requested_name: &str,
    id_prefix: &str,
) -> Result<Prepared, ApiError> {
    let _ = state;
    if prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    let priority = model
        .admission
        .effective_priority(requested_priority(fields, headers)?);
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let (template, n) = build_template(fields, priority, logprobs, longest, model.max_model_len)?;
    let stream = fields.stream.unwrap_or(false);
    let meta = ResponseMeta {
        id: response_id(id_prefix),
        created: unix_now(),
        model: requested_name.to_owned(),
        logprobs: logprobs != LogprobsWanted::No,
        include_usage: stream
            && fields
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
    };
    Ok((
        model,
        Job {
            prompts,
            n,
            template,
            logprobs,
            semantic: None,
        },
        meta,
        stream,
    ))
}

async fn serve_completion(state: AppState, headers: HeaderMap, body: Bytes) -> Response {
    let request: CompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if !state.is_local(&request.model) {
        let prefix = match &request.prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Texts(ts) => ts.first().cloned().unwrap_or_default(),
            Prompt::Tokens(ids) => format!("{:?}", &ids[..ids.len().min(64)]),
            Prompt::TokenLists(l) => {
                format!("{:?}", l.first().map(|ids| &ids[..ids.len().min(64)]))
            }
        };
        return state
            .forward(
                &request.model,
                Kind::Completion.path(),
                &headers,
                body,
                &prefix,
            )
            .await;
    }
    match completion_job(&state, &headers, &request) {
        Ok((model, job, meta, stream)) => {
            respond(state, model, job, meta, Shape::Completion, stream).await
        }
        Err(e) => e.into_response(),
    }
}

fn completion_job(
    state: &AppState,
    headers: &HeaderMap,
    request: &CompletionRequest,
) -> Result<Prepared, ApiError> {
    let model = state.model(&request.model)?;
    let encode = |text: &str| {
        model
            .tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))
    };
    let prompts = match &request.prompt {
        Prompt::Text(t) => vec![encode(t)?],
        Prompt::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        Prompt::Tokens(ids) => vec![ids.clone()],
        Prompt::TokenLists(lists) => lists.clone(),
    };
    if prompts.is_empty() || prompts.len() > 64 {
        return Err(ApiError::invalid("prompt", "give between 1 and 64 prompts"));
    }
    let vocab = model.tokenizer.vocab_size() as u32;
    if let Some(bad) = prompts.iter().flatten().find(|&&id| id >= vocab) {
        return Err(ApiError::invalid(
            "prompt",
            format!("token id {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    if request.echo == Some(true) {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    let logprobs = match request.logprobs {
        None => LogprobsWanted::No,
        Some(n) => LogprobsWanted::Yes(top_logprobs(Some(n), 5).map_err(|_| {
            ApiError::invalid(
                "logprobs",
                format!("logprobs must be between 0 and 5, got {n}"),
            )
        })?),
    };
    let mut prepared = prepare(
        state,
        model,
        headers,
        &request.sampling,
        prompts,
        logprobs,
        &request.model,
        "cmpl",
    )?;
    if let Prompt::Text(text) = &request.prompt {
        prepared.1.semantic = Some(SemanticInput {
            route: "completion",
            messages: vec![ChatMessage {
                role: "user".into(),
                content: text.clone(),
            }],
        });
    }
    Ok(prepared)
}

async fn list_models(State(state): State<AppState>, headers: HeaderMap) -> axum::Json<ModelList> {
    let card = |id: String, created: u64| ModelCard {
        id,
        object: "model".into(),
        created,
        owned_by: "weir".into(),
    };
    let mut data: Vec<ModelCard> = {
        let models = state.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .iter()
            .map(|m| card(m.name.clone(), m.created))
            .chain(models.encoders().map(|e| card(e.name.clone(), e.created)))
            .collect()
    };
    // Peers ask for what this agent holds itself; clients see the cluster.
    if !fwd::was_forwarded(&headers) {
        for name in state
            .peers
            .models()
            .into_iter()
            .chain(state.ensembles.names())
        {
            if !data.iter().any(|c| c.id == name) {
                data.push(card(name, 0));
            }
        }
    }
    axum::Json(ModelList {
        object: "list".into(),
        data,
    })
}

async fn ready(State(state): State<AppState>) -> Response {
    let has_models = state
        .models
        .read()
        .map(|m| m.iter().next().is_some())
        .unwrap_or(false);
    if state.ready.load(Ordering::Acquire) && (has_models || state.cluster) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics.encode() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => ApiError::Internal(format!("encoding metrics: {e}")).into_response(),
    }
}
