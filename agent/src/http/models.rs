//! `GET /v1/models`: the models and encoders served here, and (for clients,
//! not for peers asking) those peers serve and the ensembles.

use axum::extract::State;
use axum::http::HeaderMap;

use super::AppState;
use crate::api::types::{ModelCard, ModelList};
use crate::route::forward;

/// The handler.
pub(super) async fn list_models(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> axum::Json<ModelList> {
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
    if !forward::was_forwarded(&headers) {
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
