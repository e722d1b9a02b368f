//! `weir-agent`: the node agent. `weir-agent serve` with no arguments serves
//! a small built-in model on the CPU at http://127.0.0.1:8080.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weir_agent::gpu::GpuMonitor;
use weir_agent::http::AppState;
use weir_agent::models::{
    BUILTIN_ENCODER, BUILTIN_MODEL, Loaded, ModelRegistry, ModelSpec, ensure_builtin,
    ensure_builtin_encoder,
};
use weir_agent::route::ensemble::Ensemble;
use weir_agent::shutdown;

/// Command line of the node agent.
#[derive(Parser, Debug)]
#[command(name = "weir-agent", version, about = "The Weir node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the OpenAI API.
    Serve(ServeArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "WEIR_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Serve this Hugging Face directory or GGUF file (`FILE.gguf`: weights,
    /// tokenizer and chat template from the file) instead of the built-in
    /// model.
    #[arg(long, conflicts_with = "config")]
    model: Option<PathBuf>,
    /// Name to serve `--model` under (default: the directory name).
    #[arg(long, requires = "model")]
    served_name: Option<String>,
    /// Also serve this sentence-encoder directory (a BERT-family model such
    /// as all-MiniLM-L6-v2) for `/v1/embeddings` and the semantic cache.
    #[arg(long)]
    embedding_model: Option<PathBuf>,
    /// Name to serve `--embedding-model` under (default: the directory name).
    #[arg(long, requires = "embedding_model")]
    embedding_name: Option<String>,
    /// Serve the Model, CachePolicy and BatchPolicy resources in this YAML file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Another agent to forward requests for models not served here
    /// (standalone mode; repeat for several). Cluster mode finds peers itself.
    #[arg(long = "peer", value_name = "URL")]
    peers: Vec<String>,
    /// Require `Authorization: Bearer <key>` on the OpenAI routes.
    #[arg(long, env = "WEIR_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Redis that counts tenant limits for every agent (`redis://` or
    /// `rediss://`); without it each agent counts alone.
    #[arg(long, env = "WEIR_LIMITS_REDIS_URL", hide_env_values = true)]
    limits_redis_url: Option<String>,
    /// Prefix of the Redis keys tenant limits are counted under.
    #[arg(long, env = "WEIR_LIMITS_REDIS_PREFIX", default_value = "weir:")]
    limits_redis_prefix: String,
    /// Token agents send one another on forwarded requests and peer polls
    /// (separate from client keys); a forwarded request's tenant is only
    /// trusted with it.
    #[arg(long, env = "WEIR_PEER_TOKEN", hide_env_values = true)]
    peer_token: Option<String>,
    /// Bearer token `/metrics` requires (scrapers send
    /// `Authorization: Bearer <token>`); unset, `/metrics` is open.
    #[arg(long, env = "WEIR_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
    /// Cluster mode: register this node's NodeAgent and serve what the
    /// operator assigns (needs NODE_NAME and POD_IP, from the downward API).
    #[arg(long, conflicts_with_all = ["model", "config"])]
    cluster: bool,
    /// Node name in cluster mode.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Pod IP in cluster mode (peers and the operator reach the agent there).
    #[arg(long, env = "POD_IP")]
    pod_ip: Option<String>,
    /// Where PersistentVolumeClaims with models are mounted (`pvc://` sources).
    #[arg(long, env = "WEIR_PVC_ROOT", default_value = "/mnt/weir/pvc")]
    pvc_root: PathBuf,
    /// Where Secrets named by resources are mounted: `<dir>/<secret>/<key>`.
    #[arg(
        long,
        env = "WEIR_SECRETS_DIR",
        default_value = "/var/run/weir/secrets"
    )]
    secrets_dir: PathBuf,
    /// Where downloaded and built-in models are kept.
    #[arg(long, env = "WEIR_MODEL_CACHE")]
    model_cache: Option<PathBuf>,
    /// Seconds requests in flight get to finish when the agent stops
    /// (SIGTERM) or a model is unassigned; those still running then end
    /// with an error event.
    #[arg(long, env = "WEIR_DRAIN_TIMEOUT", default_value_t = 30)]
    drain_timeout: u64,
    /// Connections open at once (default: three quarters of the
    /// descriptor limit, at most 16384); more are refused with a 503.
    #[arg(long, env = "WEIR_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Connections open at once from one client address.
    #[arg(long, env = "WEIR_MAX_CONNECTIONS_PER_CLIENT", default_value_t = 1024)]
    max_connections_per_client: usize,
    /// How requests are placed on a model's replicas: `prefix` (lowest
    /// uncached prefill plus load, from the KV summaries peers publish),
    /// `hash` (rendezvous hashing of the prompt's start), `least-load` or
    /// `round-robin`.
    #[arg(long, env = "WEIR_ROUTING_POLICY", default_value = "prefix")]
    routing_policy: weir_agent::route::Policy,
    /// Milliseconds between two polls of a peer's KV summary.
    #[arg(long, env = "WEIR_KV_SUMMARY_INTERVAL_MS", default_value_t = 250)]
    kv_summary_interval_ms: u64,
    /// Milliseconds a peer's KV summary is trusted without a new report;
    /// after that the request is placed by hashing.
    #[arg(long, env = "WEIR_KV_SUMMARY_TTL_MS", default_value_t = 2000)]
    kv_summary_ttl_ms: u64,
    /// Seconds a client has to send request headers; also the longest idle
    /// keep-alive.
    #[arg(long, env = "WEIR_HEADER_TIMEOUT", default_value_t = 30)]
    header_timeout: u64,
    /// Seconds a client has to send a request body once its headers came.
    #[arg(long, env = "WEIR_BODY_TIMEOUT", default_value_t = 30)]
    body_timeout: u64,
    /// Seconds a request for a model with no ready replica (known from a
    /// peer) is held before a 503, in standalone mode; cluster mode takes
    /// each Model's `replicas.holdTimeoutSeconds`. 0 refuses at once.
    #[arg(long, env = "WEIR_HOLD_TIMEOUT", default_value_t = 120)]
    hold_timeout: u64,
    /// Most requests held per model at once in standalone mode (cluster
    /// mode: `replicas.maxHeldRequests`); more get a 503 at once.
    #[arg(long, env = "WEIR_MAX_HELD_REQUESTS", default_value_t = 64)]
    max_held_requests: usize,
}

impl ServeArgs {
    fn limits(&self) -> weir_agent::http::listen::Limits {
        let defaults = weir_agent::http::listen::Limits::default();
        weir_agent::http::listen::Limits {
            total: self.max_connections.unwrap_or(defaults.total),
            per_client: self.max_connections_per_client,
            header_read: std::time::Duration::from_secs(self.header_timeout.max(1)),
            body_read: std::time::Duration::from_secs(self.body_timeout.max(1)),
        }
    }
}

/// Placement on replicas for an agent reached at `self_url`, polling its
/// peers' KV summaries.
fn start_routing(args: &ServeArgs, state: &mut AppState, self_url: String) {
    let options = weir_agent::route::summary::SummaryOptions {
        interval: std::time::Duration::from_millis(args.kv_summary_interval_ms.max(10)),
        ttl: std::time::Duration::from_millis(args.kv_summary_ttl_ms.max(10)),
    };
    let mut routing = weir_agent::route::Routing::new(args.routing_policy, options, self_url);
    routing.tokenizers = weir_agent::route::tokenizers::PeerTokenizers::fetching(
        state.http.clone(),
        state.api_key.clone(),
        state.metrics.routing_tokenizers.clone(),
    );
    weir_agent::route::summary::poll(
        state.peers.clone(),
        routing.summaries.clone(),
        state.http.clone(),
        state.api_key.clone(),
        state.metrics.kv_summaries.clone(),
    );
    state.routing = Arc::new(routing);
}

fn default_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("weir")
}

fn model_specs(args: &ServeArgs) -> anyhow::Result<Vec<ModelSpec>> {
    let mut specs = main_specs(args)?;
    if let Some(dir) = &args.embedding_model {
        let name = args.embedding_name.clone().unwrap_or_else(|| dir_name(dir));
        specs.push(ModelSpec {
            name,
            dir: dir.clone(),
            ..ModelSpec::default()
        });
    }
    Ok(specs)
}

/// The name a model is served under by default: its directory's name, or
/// a GGUF file's name without `.gguf`.
fn dir_name(dir: &std::path::Path) -> String {
    let path = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let name = if path.is_file() {
        path.file_stem()
    } else {
        path.file_name()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

fn main_specs(args: &ServeArgs) -> anyhow::Result<Vec<ModelSpec>> {
    if let Some(path) = &args.config {
        return Ok(weir_agent::config::load(path)?);
    }
    let spec = |name: String, dir: PathBuf| ModelSpec {
        name,
        dir,
        engine: Default::default(),
        cache: Default::default(),
        batch: Default::default(),
        redis_url: None,
    };
    if let Some(dir) = &args.model {
        let name = args.served_name.clone().unwrap_or_else(|| dir_name(dir));
        return Ok(vec![spec(name, dir.clone())]);
    }
    let cache = args.model_cache.clone().unwrap_or_else(default_cache);
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let dir = ensure_builtin(&cache).context("writing the built-in model")?;
    let encoder = ensure_builtin_encoder(&cache).context("writing the built-in encoder")?;
    Ok(vec![
        spec(BUILTIN_MODEL.to_owned(), dir),
        spec(BUILTIN_ENCODER.to_owned(), encoder),
    ])
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.cluster {
        return serve_cluster(args).await;
    }
    let mut registry = ModelRegistry::default();
    let mut specs = model_specs(&args)?;
    for spec in &mut specs {
        // The Redis URL of an L2 cache comes from its mounted Secret.
        if let Some(l2) = &spec.cache.response_cache.l2 {
            let file = args
                .secrets_dir
                .join(&l2.url_secret_ref.name)
                .join(&l2.url_secret_ref.key);
            match std::fs::read_to_string(&file) {
                Ok(url) => spec.redis_url = Some(url.trim().to_owned()),
                Err(e) => {
                    tracing::warn!(model = %spec.name, file = %file.display(), error = %e, "no Redis URL: L2 cache off")
                }
            }
        }
    }
    // A model that fails to load (a bad file, an unknown architecture) is
    // reported and left out; the agent serves the others.
    let mut failed = Vec::new();
    for spec in &specs {
        tracing::info!(model = %spec.name, dir = %spec.dir.display(), "loading");
        match Loaded::load(spec) {
            Ok(loaded) => registry.insert_loaded(loaded),
            Err(e) => {
                tracing::error!(model = %spec.name, error = %e, "model failed to load; not served");
                failed.push(e);
            }
        }
    }
    if registry.iter().next().is_none()
        && registry.encoders().next().is_none()
        && let Some(e) = failed.into_iter().next()
    {
        return Err(e.into());
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let first = registry
        .iter()
        .next()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    tracing::info!(%addr, "serving the OpenAI API");
    eprintln!(
        "Weir agent serving `{first}` on http://{addr}\nTry:\n  curl http://{addr}/v1/chat/completions -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{first}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], \"max_tokens\": 32}}'"
    );
    let gpu = GpuMonitor::start(std::time::Duration::from_secs(2));
    for model in registry.iter() {
        weir_agent::adaptive::spawn(model.clone(), gpu.clone());
    }
    let mut state = AppState::with(registry, gpu, args.api_key.clone());
    state
        .holds
        .set_default(weir_agent::route::hold::HoldLimits {
            timeout: std::time::Duration::from_secs(args.hold_timeout),
            max_held: args.max_held_requests,
        });
    with_credentials(&mut state, &args);
    if let Some(path) = &args.config {
        let tenants = weir_agent::tenants::files::load(path, &args.secrets_dir)?;
        weir_agent::tenants::files::install(&state.tenants, &state.metrics.tenants, tenants);
        weir_agent::tenants::files::spawn_reload(
            state.tenants.clone(),
            state.metrics.tenants.clone(),
            path.clone(),
            args.secrets_dir.clone(),
        );
    }
    start_routing(&args, &mut state, format!("http://{addr}"));
    if let Some(path) = &args.config {
        let ensembles = weir_agent::config::load_all(path)?
            .ensembles
            .iter()
            .map(|(name, spec)| {
                let secret = |secret: &str, key: &str| {
                    let file = args.secrets_dir.join(secret).join(key);
                    std::fs::read_to_string(&file)
                        .map(|s| s.trim().to_owned())
                        .ok()
                };
                Ensemble::resolve(name, spec, None, str::to_owned, secret)
            })
            .collect();
        state.ensembles.replace(ensembles);
    }
    if !args.peers.is_empty() {
        let peers = args
            .peers
            .iter()
            .map(|p| p.trim_end_matches('/').to_owned())
            .collect();
        let period = std::time::Duration::from_secs(2);
        weir_agent::route::peers::poll_static(
            state.peers.clone(),
            peers,
            poll_client(state.peer_token.as_deref()),
            period,
            state.api_key.clone(),
        );
    }
    let timeout = std::time::Duration::from_secs(args.drain_timeout);
    let stop = {
        let state = state.clone();
        async move {
            shutdown::signal().await;
            shutdown::drain_all(&state, None, timeout).await;
        }
    };
    weir_agent::http::serve(listener, state, args.limits(), stop)
        .await
        .context("HTTP server")
}

async fn serve_cluster(args: ServeArgs) -> anyhow::Result<()> {
    let node_name = args
        .node_name
        .clone()
        .context("--cluster needs NODE_NAME (or --node-name)")?;
    let pod_ip = args
        .pod_ip
        .clone()
        .context("--cluster needs POD_IP (or --pod-ip)")?;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let port = listener.local_addr()?.port();
    let gpu = GpuMonitor::start(std::time::Duration::from_secs(2));
    let mut state = AppState::with(ModelRegistry::default(), gpu, args.api_key.clone());
    with_credentials(&mut state, &args);
    state.cluster = true;
    state.synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let config = weir_agent::cluster::ClusterConfig {
        node_name,
        endpoint: format!("http://{pod_ip}:{port}"),
        heartbeat: std::time::Duration::from_secs(10),
        roots: weir_agent::cluster::plan::SourceRoots {
            model_cache: args.model_cache.clone().unwrap_or_else(default_cache),
            pvc_root: args.pvc_root.clone(),
        },
        downloads: weir_agent::cluster::fetch::Downloads::new(weir_agent::hub::Hub::from_env()),
        drain_timeout: std::time::Duration::from_secs(args.drain_timeout),
        beat_now: Arc::default(),
    };
    tracing::info!(node = %config.node_name, endpoint = %config.endpoint, "cluster mode");
    start_routing(&args, &mut state, config.endpoint.clone());
    let stop = {
        let (state, beat_now, timeout) =
            (state.clone(), config.beat_now.clone(), config.drain_timeout);
        async move {
            shutdown::signal().await;
            shutdown::drain_all(&state, Some(&beat_now), timeout).await;
        }
    };
    tokio::spawn(weir_agent::cluster::run(client, config, state.clone()));
    weir_agent::http::serve(listener, state, args.limits(), stop)
        .await
        .context("HTTP server")
}

/// The tenant limiter, the peer token and the metrics token from `args`.
fn with_credentials(state: &mut AppState, args: &ServeArgs) {
    state.limiter = weir_agent::tenants::limits::Limiter::new(
        args.limits_redis_url.clone(),
        &args.limits_redis_prefix,
    );
    state.peer_token = args.peer_token.as_deref().map(Arc::from);
    state.metrics_token = args.metrics_token.as_deref().map(Arc::from);
}

/// The client peer polls use: with the peer token on every request (never
/// used for external endpoints, so the token stays inside the cluster).
fn poll_client(token: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(value) = token.and_then(|t| reqwest::header::HeaderValue::from_str(t).ok()) {
        headers.insert(weir_agent::tenants::PEER_TOKEN_HEADER, value);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(std::time::Duration::from_secs(2))
        .build()
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
    }
}
