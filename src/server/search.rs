//! `POST /search`: text (or image) -> the most similar indexed images.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::input::{image_input, preprocess_all, JsonBody};
use super::state::AppState;
use crate::index::Hit;

fn default_k() -> usize {
    10
}

/// A search by text (`query`), by example image (`image`, base64), or by an
/// embedding (`vector`): exactly one of the three.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// Text to search for, e.g. "um cachorro na praia".
    #[serde(default)]
    pub query: Option<String>,
    /// An example image, base64 (instead of `query`).
    #[serde(default)]
    pub image: Option<String>,
    /// An embedding in the index model's space (as `/embed/text` or
    /// `/embed/image` return them), of the model's dimension; any norm.
    #[serde(default)]
    pub vector: Option<Vec<f32>>,
    /// The model that embeds `query` (default: `--query-model`, else the
    /// index's model); it must share the index model's image tower.
    #[serde(default)]
    pub model: Option<String>,
    /// How many results, 1..=1000.
    #[serde(default = "default_k")]
    #[schema(minimum = 1, maximum = 1000)]
    pub k: usize,
}

/// Results, best first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SearchResponse {
    pub results: Vec<Hit>,
}

/// Text-to-image (or image-to-image) search over the index.
#[utoipa::path(post, path = "/search", tag = "search",
    request_body(content = SearchRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "The best matches, best first", body = SearchResponse),
        (status = 400, description = "Empty query, several or none of query/image/vector, a vector of the wrong dimension or zero, k out of range", body = ErrorBody),
        (status = 403, description = "An image URL refused: not a public address (`url_not_allowed`; with --allow-image-urls)", body = ErrorBody),
        (status = 404, description = "No such model (`model_not_found`)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON, or unsupported image format", body = ErrorBody),
        (status = 422, description = "Image has too many pixels", body = ErrorBody),
        (status = 503, description = "Overloaded or the index unavailable: retry after the Retry-After seconds", body = ErrorBody),
    ))]
pub async fn search(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<SearchRequest>,
) -> Result<Json<SearchResponse>, ApiError> {
    let limits = &state.config.limits;
    if req.k == 0 || req.k > limits.max_k {
        return Err(ApiError::bad_request(
            "invalid_k",
            format!("k must be between 1 and {} (got {})", limits.max_k, req.k),
        ));
    }
    let vector = match (req.query, req.image, req.vector) {
        (None, None, Some(v)) => vec![v],
        (Some(q), None, None) => {
            if q.trim().is_empty() {
                return Err(ApiError::bad_request("empty_query", "the query is empty"));
            }
            if q.chars().count() > limits.max_query_chars {
                return Err(ApiError::bad_request(
                    "query_too_long",
                    format!(
                        "the query is longer than {} characters",
                        limits.max_query_chars
                    ),
                ));
            }
            let model = state.loaded()?.query_model(req.model.as_deref())?;
            model.embedder.embed_texts(vec![q]).await?
        }
        (None, Some(img), None) => {
            let model = state.loaded()?.query_model(req.model.as_deref())?;
            let bytes = image_input(&state, "image", &img).await?;
            let px = preprocess_all(&model.embedder, vec![bytes]).await?;
            model.embedder.embed_pixels(px).await?
        }
        (None, None, None) => {
            return Err(ApiError::bad_request(
                "empty_query",
                "give a `query` (text), an `image` or a `vector`",
            ))
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "give one of `query`, `image` and `vector`, not several",
            ))
        }
    };
    let v = vector
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::internal("no embedding"))?;
    let results = state.loaded()?.index.search(v, req.k).await?;
    Ok(Json(SearchResponse { results }))
}
