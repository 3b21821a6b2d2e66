//! `GET /healthz` (alive) and `GET /readyz` (model loaded and warmed up).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::state::AppState;

/// Liveness or readiness.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Status {
    /// `ok` or `ready`.
    pub status: String,
    /// With readiness: each model's state (`ready`), by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<std::collections::BTreeMap<String, String>>,
    /// With readiness: the model a request that names none is answered by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_model: Option<String>,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Alive", body = Status)))]
pub async fn healthz() -> Json<Status> {
    Json(Status {
        status: "ok".into(),
        models: None,
        default_model: None,
    })
}

/// The model is loaded and warmed up, the index is open and answers.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready to serve", body = Status),
        (status = 503, description = "Still loading (`not_ready`, saying what it waits for), or the index cannot be reached (`index_unavailable`)", body = ErrorBody),
    ))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Result<Json<Status>, ApiError> {
    let models = state.model_states();
    let loaded = state.loaded().map_err(|mut e| {
        let each: Vec<String> = models
            .iter()
            .map(|(name, s)| format!("model `{name}`: {s}"))
            .collect();
        e.message = format!("{} ({})", e.message, each.join("; "));
        e
    })?;
    loaded.index.check().await?;
    Ok(Json(Status {
        status: "ready".into(),
        models: Some(models.into_iter().collect()),
        default_model: state.config.models.first().map(|m| m.name.clone()),
    }))
}
