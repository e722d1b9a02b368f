//! The request pipeline: every step a generation request goes through
//! once the HTTP layer has parsed its route, body and headers. [`generate`]
//! reads them in order:
//!
//! 1. resolve the target: an ensemble, a model served here, or a peer
//!    ([`target`]), held first while the model has no ready replica
//!    ([`hold`]); an ensemble tries its members ([`ensemble`]), each
//!    through the rest of this pipeline; a peer gets the request as it came
//!    ([`crate::route::forward`]), with the tenant and the peer token;
//!    the tenant must be allowed the model ([`tenant`]);
//! 2. validate into an engine job ([`validate`]), the prompt shaped first
//!    when asked: optimized, fitted into the context ([`prompt`]); the
//!    tenant's priority classes and limits ([`tenant`]), its cache scope;
//! 3. the response cache, L1 then L2 ([`response_cache`]);
//! 4. coalescing with an identical request in flight;
//! 5. the semantic cache ([`semantic_cache`]);
//! 6. the circuit breaker and admission;
//! 7. the engine ([`crate::generate`]);
//! 8. filling the caches on the way out, and the measurements ([`measure`]).
//!
//! It knows no HTTP server: it answers with events (or a relayed answer)
//! and the headers that say where they came from.

pub mod ensemble;
pub mod hold;
pub mod measure;
pub mod placement;
pub mod prompt;
pub mod response_cache;
pub mod semantic_cache;
pub mod structured;
pub mod target;
pub mod tenant;
pub mod validate;

use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
use http::HeaderMap;

use crate::api::{ApiError, Kind};
use crate::cache::CacheKey;
use crate::coalesce::{Joined, Publisher, Subscription};
use crate::generate::{self, GenEvent, GenStream, Generation, Job};
use crate::metrics::{Metrics, ModelLabel, OutcomeLabel, TierLabel};
use crate::models::{ModelRegistry, ServedEncoder, ServedModel};
use crate::route::ensemble::EnsembleTable;
use crate::route::forward::Relayed;
use crate::route::hold::HoldQueues;
use crate::route::peers::PeerTable;
use semantic_cache::Probe;
use target::{GenerationRequest, Target};
use validate::ResponseMeta;

/// Header saying which cache tier answered (`l1`, `l2`, `semantic`, or
/// `miss`).
pub const CACHE_HEADER: &str = "x-weir-cache";
/// Header marking an answer shared with an identical request in flight.
pub const COALESCED_HEADER: &str = "x-weir-coalesced";
/// Header saying how many of a chat's oldest turns were dropped to fit
/// the context.
pub const DROPPED_TURNS_HEADER: &str = "x-weir-context-dropped-turns";
/// Header naming the tuning mode whose defaults a request got.
pub const TUNING_HEADER: &str = "x-weir-tuning";
/// Header with the cosine similarity of the semantic candidate that
/// answered (or was vetoed).
pub const SIMILARITY_HEADER: &str = "x-weir-semantic-similarity";
/// Header naming why the nearest semantic candidate was not served.
pub const VETO_HEADER: &str = "x-weir-semantic-veto";

/// What the client's `Cache-Control` allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheControl {
    /// Answers may come from the caches.
    Use,
    /// `no-cache`: generate afresh (the answer is still stored), and count
    /// a recent semantic hit for the same question as refuted.
    Refresh,
}

impl CacheControl {
    /// Reads `Cache-Control` (`no-cache` or `no-store` among its
    /// directives means [`CacheControl::Refresh`]).
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let refresh = headers
            .get_all(http::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|d| {
                matches!(
                    d.trim().to_ascii_lowercase().as_str(),
                    "no-cache" | "no-store"
                )
            });
        if refresh { Self::Refresh } else { Self::Use }
    }
}

/// What the pipeline uses of the agent: its models, metrics, peers,
/// ensembles and the client it forwards with.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    /// Served models.
    pub models: &'a RwLock<ModelRegistry>,
    /// The agent's metrics.
    pub metrics: &'a Metrics,
    /// Peers and the models they serve.
    pub peers: &'a PeerTable,
    /// Ensembles by public name.
    pub ensembles: &'a EnsembleTable,
    /// Requests held for models without a ready replica.
    pub holds: &'a HoldQueues,
    /// Pooled keep-alive client for peers and external members.
    pub http: &'a reqwest::Client,
    /// Tenants, by key and by name.
    pub tenants: &'a crate::tenants::TenantTable,
    /// The tenants' limits.
    pub limiter: &'a crate::tenants::limits::Limiter,
    /// The token peers send one another, if set.
    pub peer_token: Option<&'a str>,
    /// Placement on replicas and peers' KV summaries.
    pub routing: &'a crate::route::Routing,
}

impl Context<'_> {
    fn registry(&self) -> std::sync::RwLockReadGuard<'_, ModelRegistry> {
        self.models.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The generation model served here as `name`, or why not.
    pub fn model(&self, name: &str) -> Result<Arc<ServedModel>, ApiError> {
        let models = self.registry();
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

    /// Whether a model of either kind is served here.
    pub fn is_local(&self, name: &str) -> bool {
        self.registry().serves(name)
    }

    /// The encoder served here as `name`, if any.
    pub fn encoder(&self, name: &str) -> Option<Arc<ServedEncoder>> {
        self.registry().encoder(name)
    }

    /// Requests running and waiting for `name` here (0 if not local).
    pub fn load_of(&self, name: &str) -> f64 {
        self.registry().get(name).map_or(0.0, |m| {
            let s = m.engine.stats().snapshot();
            (s.running + s.waiting) as f64
        })
    }
}

/// A generation request as the HTTP layer hands it over.
pub struct Incoming {
    /// Its route.
    pub kind: Kind,
    /// Its body, unparsed (peers and external members get it as it came).
    pub body: Bytes,
    /// Its headers (priority, and those passed on to peers).
    pub headers: HeaderMap,
    /// Sent by an ensemble to one of its members.
    pub for_member: bool,
}

/// How a request was answered, and the headers saying by whom.
pub struct Outcome {
    /// The answer.
    pub reply: Reply,
    /// `x-weir-cache`, `x-weir-coalesced`, `x-weir-ensemble-member`.
    pub headers: Vec<(&'static str, String)>,
}

/// An answer made here, or one passed on from elsewhere.
pub enum Reply {
    /// Events of a generation here (engine, cache or a shared one).
    Answered {
        /// The events, to render as JSON or SSE.
        events: GenStream,
        /// Ids and names for the rendered body.
        meta: ResponseMeta,
        /// Whether the client asked for SSE.
        stream: bool,
    },
    /// A peer's or an external endpoint's answer, passed on unchanged.
    Relayed(Relayed),
}

impl Outcome {
    /// The HTTP status this answer starts with.
    pub fn status(&self) -> u16 {
        match &self.reply {
            Reply::Answered { .. } => 200,
            Reply::Relayed(r) => r.status,
        }
    }
}

/// Answers one generation request, every step in order.
pub async fn generate(ctx: &Context<'_>, incoming: Incoming) -> Result<Outcome, ApiError> {
    let caller = tenant::caller(ctx, &incoming.headers);
    // The model is checked before anything else, holding included: a
    // tenant may not wait for a model it may not use.
    if let Some(t) = caller.as_deref().filter(|_| !incoming.for_member)
        && let Some(name) = tenant::model_named(&incoming.body)
    {
        tenant::check_model(ctx, t, &name)?;
    }
    let (model, request) = match hold::resolve(ctx, &incoming).await? {
        Target::Ensemble(e) => return ensemble::serve(ctx, &e, &incoming).await,
        Target::Peer(request) => return to_peer(ctx, &request, incoming).await,
        Target::Local(model, request) => (model, request),
    };
    let priority = validate::priority_header(&incoming.headers);
    let shaping = validate::Shaping::from_headers(&incoming.headers)?;
    let (model, mut job, meta, stream) = match &request {
        GenerationRequest::Chat(r) => validate::chat_job(model, priority, r, shaping)?,
        GenerationRequest::Completion(r) => validate::completion_job(model, priority, r, shaping)?,
    };
    if let Some(relayed) = placement::elsewhere(ctx, &model, &job, &request, &incoming).await {
        return Ok(Outcome {
            reply: Reply::Relayed(relayed),
            headers: Vec::new(),
        });
    }
    let label = ModelLabel {
        model_name: model.name.clone(),
    };
    if let Some(saved) = meta.prompt_tokens_saved {
        let saved = saved as u64;
        ctx.metrics
            .prompt_tokens_saved
            .get_or_create(&label)
            .inc_by(saved);
    }
    let grant = match caller.as_deref() {
        Some(t) => {
            tenant::apply_priority(t, &incoming.body, &incoming.headers, &mut job);
            job.cache_scope = t.cache_scope();
            Some(tenant::admit(ctx, t, &job).await?)
        }
        None => None,
    };
    let (dropped, tuning) = (meta.dropped_turns, meta.tuning);
    let control = CacheControl::from_headers(&incoming.headers);
    let answer = match run(ctx, model, job, control).await {
        Ok(answer) => answer,
        Err(e) => {
            // Refused before any work (breaker, admission): no token used.
            if let Some(mut grant) = grant {
                grant.finish(0);
            }
            return Err(e);
        }
    };
    let mut headers = answer.headers;
    let mut events = answer.events;
    if let (Some(t), Some(grant)) = (caller.as_deref(), grant) {
        tenant::count_hit(&ctx.metrics.tenants, t, &headers);
        headers.extend(grant.usage.headers());
        events = tenant::hold(events, grant, ctx.metrics.tenants.clone());
    }
    if !ctx.routing.self_url.is_empty() {
        headers.push((crate::route::REPLICA_HEADER, ctx.routing.self_url.clone()));
    }
    if dropped > 0 {
        headers.push((DROPPED_TURNS_HEADER, dropped.to_string()));
    }
    if let Some(mode) = tuning {
        headers.push((TUNING_HEADER, mode.to_owned()));
    }
    Ok(Outcome {
        reply: Reply::Answered {
            events,
            meta,
            stream,
        },
        headers,
    })
}

/// Passes the request on to a peer that serves its model.
async fn to_peer(
    ctx: &Context<'_>,
    request: &GenerationRequest,
    incoming: Incoming,
) -> Result<Outcome, ApiError> {
    let relayed = placement::to_peer(ctx, request, incoming).await?;
    Ok(Outcome {
        reply: Reply::Relayed(relayed),
        headers: Vec::new(),
    })
}

/// The events that answer a job, and the header (name, value) saying where
/// they came from, if any.
pub struct Answer {
    /// The generation's events, to render as JSON or SSE.
    pub events: GenStream,
    /// `x-weir-cache` or `x-weir-coalesced` with its value, and the
    /// semantic cache's similarity and veto.
    pub headers: Vec<(&'static str, String)>,
}

/// Steps 3 to 8 for `job` on `model`: from the response cache when it
/// holds the answer, by joining an identical generation in flight when
/// there is one, else from the semantic cache or the engine (filling the
/// caches). With [`CacheControl::Refresh`] no cache answers and no
/// generation in flight is joined.
pub async fn run(
    ctx: &Context<'_>,
    model: Arc<ServedModel>,
    job: Job,
    control: CacheControl,
) -> Result<Answer, ApiError> {
    let metrics = ctx.metrics;
    let label = ModelLabel {
        model_name: model.name.clone(),
    };
    let key = response_cache::cache_key(&model, &job);
    let refresh = control == CacheControl::Refresh;
    if !refresh && let Some(answer) = cached_answer(metrics, &model, key, &label).await {
        return Ok(answer);
    }
    let leader = match coalesce(metrics, &model, key.filter(|_| !refresh), &label) {
        Coalesced::Follower(answer) => return Ok(answer),
        Coalesced::Leader(leader) => leader,
    };
    // Only a leader asks the semantic cache: followers share its answer.
    let found = semantic_or_engine(ctx, &model, &job, &label, key, refresh).await;
    let (events, headers) = match found {
        Ok(found) => found,
        Err(e) => {
            // Requests that joined meanwhile get the same answer.
            if let Some((publisher, _)) = leader {
                publisher.send(GenEvent::error(&e));
            }
            return Err(e);
        }
    };
    let events = share_with_followers(events, leader);
    Ok(Answer { events, headers })
}

/// The response cache's answer (L1, then L2), counting the hit or miss.
async fn cached_answer(
    metrics: &Metrics,
    model: &ServedModel,
    key: Option<CacheKey>,
    label: &ModelLabel,
) -> Option<Answer> {
    let (Some(key), Some(cache)) = (key, model.cache.clone()) else {
        return None;
    };
    if let Some((tier, bytes)) = cache.get(&key).await
        && let Ok(generation) = serde_json::from_slice::<Generation>(&bytes)
    {
        let tier_label = TierLabel {
            model_name: model.name.clone(),
            tier: tier.label().into(),
        };
        metrics.cache_hits.get_or_create(&tier_label).inc();
        count_success(metrics, model);
        return Some(Answer {
            events: generate::replay(&generation),
            headers: vec![(CACHE_HEADER, tier.label().to_owned())],
        });
    }
    metrics.cache_misses.get_or_create(label).inc();
    None
}

type Leader = Option<(Publisher<CacheKey, GenEvent>, Subscription<GenEvent>)>;

/// Whether this request joins one in flight or leads its own generation.
enum Coalesced {
    Follower(Answer),
    Leader(Leader),
}

/// Joins an identical generation in flight when the policy coalesces.
fn coalesce(
    metrics: &Metrics,
    model: &ServedModel,
    key: Option<CacheKey>,
    label: &ModelLabel,
) -> Coalesced {
    let Some(key) = key.filter(|_| model.cache_policy.coalescing.enabled) else {
        return Coalesced::Leader(None);
    };
    match model.coalescer.join(key) {
        Joined::Follower(subscription) => {
            metrics.coalesced.get_or_create(label).inc();
            count_success(metrics, model);
            Coalesced::Follower(Answer {
                events: response_cache::subscription_stream(subscription),
                headers: vec![(COALESCED_HEADER, "true".to_owned())],
            })
        }
        Joined::Leader(publisher, subscription) => {
            Coalesced::Leader(Some((publisher, subscription)))
        }
    }
}

/// A leader's events go to every follower; the leader reads its own
/// subscription like them.
fn share_with_followers(events: GenStream, leader: Leader) -> GenStream {
    match leader {
        Some((publisher, subscription)) => {
            response_cache::pump(events, publisher);
            response_cache::subscription_stream(subscription)
        }
        None => events,
    }
}

/// A semantic hit's replay, else a fresh generation that fills the caches;
/// with the headers to answer with (`x-weir-cache`, the semantic
/// similarity and veto).
async fn semantic_or_engine(
    ctx: &Context<'_>,
    model: &Arc<ServedModel>,
    job: &Job,
    label: &ModelLabel,
    key: Option<CacheKey>,
    refresh: bool,
) -> Result<(GenStream, Vec<(&'static str, String)>), ApiError> {
    let metrics = ctx.metrics;
    let mut semantic = None;
    let mut headers = Vec::new();
    match semantic_cache::probe(ctx, model, job, refresh).await {
        Some(Probe::Hit(hit)) => {
            if let Ok(generation) = serde_json::from_slice::<Generation>(&hit.answer) {
                let tier_label = TierLabel {
                    model_name: model.name.clone(),
                    tier: "semantic".into(),
                };
                metrics.cache_hits.get_or_create(&tier_label).inc();
                count_success(metrics, model);
                let headers = vec![
                    (CACHE_HEADER, "semantic".to_owned()),
                    (SIMILARITY_HEADER, format!("{:.4}", hit.similarity)),
                ];
                return Ok((generate::replay(&generation), headers));
            }
        }
        Some(Probe::Miss(fill, veto)) => {
            semantic = Some(fill);
            if let Some((veto, similarity)) = veto {
                headers.push((VETO_HEADER, veto.label().to_owned()));
                headers.push((SIMILARITY_HEADER, format!("{similarity:.4}")));
            }
        }
        None => {}
    }
    let events = admit_and_generate(metrics, model, job, label)?;
    let sinks = response_cache::Sinks {
        exact: key.zip(model.cache.clone()).map(|(k, c)| (c, k)),
        semantic,
    };
    if key.is_some() && model.cache.is_some() {
        headers.insert(0, (CACHE_HEADER, "miss".to_owned()));
    }
    Ok((response_cache::fill_cache(events, sinks), headers))
}

/// Counts a request answered without the engine (cache hit, coalesced).
fn count_success(metrics: &Metrics, model: &ServedModel) {
    let label = OutcomeLabel {
        model_name: model.name.clone(),
        outcome: "success".into(),
    };
    metrics.requests.get_or_create(&label).inc();
}

/// Breaker, admission and the engine: the events of a fresh generation.
fn admit_and_generate(
    metrics: &Metrics,
    model: &Arc<ServedModel>,
    job: &Job,
    label: &ModelLabel,
) -> Result<GenStream, ApiError> {
    if let Err(wait) = model.breaker.allow(Instant::now()) {
        return Err(ApiError::Unavailable {
            message: format!(
                "model `{}` is failing; the circuit breaker is open",
                model.name
            ),
            retry_after: wait,
        });
    }
    let cost = job.prompts.len() * job.n;
    let permits = model
        .admission
        .try_admit(job.template.priority, cost)
        .map_err(|retry_after| {
            metrics.rejected.get_or_create(label).inc();
            ApiError::Overloaded {
                message: format!(
                    "model `{}` has too many requests queued; retry shortly",
                    model.name
                ),
                retry_after,
            }
        })?;
    let events = generate::run(&model.engine, model.tokenizer.clone(), job)?;
    Ok(measure::instrument(events, metrics, model.clone(), permits))
}
