//! Step 1, when the target has no ready replica: a request for a model
//! that exists (declared by a Model, or seen on a peer lately) but that no
//! replica serves now — scaled to zero, loading, moving — is held by the
//! agent that received it ([`crate::route::hold`]) until a replica reports
//! Ready, then resolved again. Nothing has been sent to the client yet, so
//! a streaming request gets its head only once it is answered; a client
//! that goes away while held drops this future and its place in the queue.
//!
//! Not held: requests another agent forwarded (the forwarding agent holds
//! them), and an ensemble's requests to its members (the ensemble falls
//! back to its next member instead).

use super::target::{self, Target};
use super::{Context, Incoming};
use crate::api::ApiError;
use crate::route::forward;
use crate::route::hold::Ticket;

/// The request's target, once the model has a ready replica (or at once
/// when it has one, or does not exist); 503 with `Retry-After` when the
/// hold is full or times out.
pub async fn resolve(ctx: &Context<'_>, incoming: &Incoming) -> Result<Target, ApiError> {
    let mut ticket: Option<Ticket<'_>> = None;
    loop {
        let target = target::resolve(ctx, incoming)?;
        let model = match &target {
            Target::Peer(request) if must_hold(ctx, request.model(), incoming) => {
                request.model().to_owned()
            }
            _ => {
                if let Some(t) = &ticket {
                    tracing::debug!(model = ?target_model(&target), waited = ?t.waited(), "held request released");
                }
                return Ok(target);
            }
        };
        let held = match &mut ticket {
            Some(t) => {
                t.wait_again()?;
                t
            }
            None => ticket.insert(ctx.holds.hold(&model)?),
        };
        // A replica may have become ready between the check and joining
        // the queue, its release already run.
        if has_replica(ctx, &model) {
            ticket = None;
            continue;
        }
        held.released().await?;
    }
}

/// Whether a request for `model` waits here rather than being refused.
fn must_hold(ctx: &Context<'_>, model: &str, incoming: &Incoming) -> bool {
    !incoming.for_member
        && !forward::was_forwarded(&incoming.headers)
        && !has_replica(ctx, model)
        && ctx.peers.is_known(model)
}

fn has_replica(ctx: &Context<'_>, model: &str) -> bool {
    ctx.is_local(model) || !ctx.peers.serving(model).is_empty()
}

fn target_model(target: &Target) -> Option<&str> {
    match target {
        Target::Local(_, r) | Target::Peer(r) => Some(r.model()),
        Target::Ensemble(_) => None,
    }
}
