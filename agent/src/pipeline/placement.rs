//! Placing a request on a replica ([`crate::route::Routing`]): a model
//! served here may still be better served by a peer replica (its cache
//! holds more of the prompt, or it is less loaded), and a model only peers
//! serve goes to the one the policy puts first. Either way the request is
//! forwarded as the client sent it; when no peer ahead of this agent in
//! the order can take it, it is served here, so no request is lost to
//! routing.

use super::target::GenerationRequest;
use super::{Context, Incoming};
use crate::api::ApiError;
use crate::generate::Job;
use crate::metrics::RouteLabel;
use crate::models::ServedModel;
use crate::route::forward::{self, Relayed};
use crate::route::peers::Peer;
use crate::route::{Here, Placement, Policy, prefix_hash};

/// A peer's answer when the placement puts peers ahead of this agent and
/// one of them takes the request; `None` to serve it here.
pub async fn elsewhere(
    ctx: &Context<'_>,
    model: &ServedModel,
    job: &Job,
    request: &GenerationRequest,
    incoming: &Incoming,
) -> Option<Relayed> {
    if forward::was_forwarded(&incoming.headers) || ctx.peers.serving(&model.name).is_empty() {
        return None;
    }
    let here = Here {
        stats: model.engine.stats(),
        outstanding: model.admission.outstanding(),
    };
    let prompt = job.prompts.first().map(Vec::as_slice);
    let key = prefix_hash(&request.routing_prefix());
    let placement = ctx
        .routing
        .place(ctx.peers, &model.name, key, prompt, Some(here));
    let ahead: Vec<Peer> = placement.order.iter().map_while(Option::clone).collect();
    count(ctx, &model.name, &placement, ahead.is_empty());
    if ahead.is_empty() {
        return None;
    }
    let headers = forward::with_peer_token(&incoming.headers, ctx.peer_token);
    let relayed = forward::to_replicas(
        ctx.http,
        ctx.peers,
        &model.name,
        incoming.kind.path(),
        &headers,
        incoming.body.clone(),
        ahead,
        forward::head_timeout(request.stream()),
    )
    .await;
    match relayed {
        // Refused or unreachable: this agent serves it after all.
        Ok(r) if matches!(r.status, 429 | 503) => None,
        Ok(r) => Some(r),
        Err(_) => None,
    }
}

/// Forwards a request for a model only peers serve to the replica the
/// policy puts first. The prompt's tokens come from the model's tokenizer
/// as fetched from a peer ([`crate::route::tokenizers`]); until it is
/// here, the prefix policy falls back to hashing.
pub async fn to_peer(
    ctx: &Context<'_>,
    request: &GenerationRequest,
    incoming: Incoming,
) -> Result<Relayed, ApiError> {
    let model = request.model();
    let key = prefix_hash(&request.routing_prefix());
    let head = forward::head_timeout(request.stream());
    let path = incoming.kind.path();
    let headers = forward::with_peer_token(&incoming.headers, ctx.peer_token);
    if ctx.peers.serving(model).is_empty() || forward::was_forwarded(&incoming.headers) {
        // Says why nobody can take it (404 or 503).
        let (h, b) = (&headers, incoming.body.clone());
        return forward::to_peer(ctx.http, ctx.peers, model, path, h, b, key, head).await;
    }
    let tokenizers = &ctx.routing.tokenizers;
    let tokens = match ctx.routing.policy {
        Policy::Prefix => tokenizers
            .get(model, ctx.peers)
            .and_then(|t| super::validate::routing_tokens(&t, request)),
        _ => None,
    };
    let placement = ctx
        .routing
        .place(ctx.peers, model, key, tokens.as_deref(), None);
    count(ctx, model, &placement, false);
    let order = placement.order.into_iter().flatten().collect();
    forward::to_replicas(
        ctx.http,
        ctx.peers,
        model,
        path,
        &headers,
        incoming.body,
        order,
        head,
    )
    .await
}

fn count(ctx: &Context<'_>, model: &str, placement: &Placement, here: bool) {
    let label = RouteLabel {
        model_name: model.to_owned(),
        policy: ctx.routing.policy.as_str().to_owned(),
        basis: placement.basis.as_str().to_owned(),
        replica: if here { "here" } else { "peer" }.to_owned(),
    };
    ctx.metrics.route_decisions.get_or_create(&label).inc();
}
