//! `GET /v1/models` and `GET /v1/models/{id}`: the models and encoders
//! served here, and (for clients, not for peers asking) those peers serve
//! and the ensembles.

use axum::extract::{Path, State};
use axum::http::HeaderMap;

use super::AppState;
use crate::api::ApiError;
use crate::api::types::{ModelCard, ModelList};
use crate::route::forward;

/// Every model a client may name here: served here first, then (unless a
/// peer is asking) those peers serve and the ensembles.
fn cards(state: &AppState, headers: &HeaderMap) -> Vec<ModelCard> {
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
    if !forward::was_forwarded(headers) {
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
    data
}

/// `GET /v1/models`.
pub(super) async fn list_models(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> axum::Json<ModelList> {
    axum::Json(ModelList {
        object: "list".into(),
        data: cards(&state, &headers),
    })
}

/// `GET /v1/models/{id}`: one entry of the list (ids may contain `/`,
/// sent as is or percent-encoded), else 404 `model_not_found`.
pub(super) async fn retrieve_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<axum::Json<ModelCard>, ApiError> {
    cards(&state, &headers)
        .into_iter()
        .find(|c| c.id == id)
        .map(axum::Json)
        .ok_or(ApiError::ModelNotFound(id))
}
