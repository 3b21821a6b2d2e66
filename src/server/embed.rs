//! `POST /embed/text`, `POST /embed/image`: raw normalised embeddings.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::input::{image_inputs, preprocess_all, JsonBody};
use super::state::{AppState, Limits};

/// Texts to embed.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbedTextRequest {
    /// 1 to 256 texts.
    #[schema(min_items = 1, max_items = 256)]
    pub texts: Vec<String>,
    /// The model to use (default: the server's first).
    #[serde(default)]
    pub model: Option<String>,
}

/// Images to embed, base64.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbedImageRequest {
    /// Images, base64 (or `http(s)://` URLs with `--allow-image-urls`).
    pub images: Vec<String>,
    /// The model to use (default: the server's first).
    #[serde(default)]
    pub model: Option<String>,
}

/// L2-normalised embeddings in request order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EmbeddingsResponse {
    pub embeddings: Vec<Vec<f32>>,
}

/// Embeds texts.
#[utoipa::path(post, path = "/embed/text", tag = "embed",
    request_body(content = EmbedTextRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "One embedding per text", body = EmbeddingsResponse),
        (status = 400, description = "No texts, too many, or one too long", body = ErrorBody),
        (status = 404, description = "No such model (`model_not_found`)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 503, description = "Overloaded: retry after the Retry-After seconds", body = ErrorBody),
    ))]
pub async fn embed_text(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<EmbedTextRequest>,
) -> Result<Json<EmbeddingsResponse>, ApiError> {
    let limits = &state.config.limits;
    Limits::count("invalid_texts", "texts", req.texts.len(), limits.max_texts)?;
    Limits::each_at_most("invalid_texts", "text", &req.texts, limits.max_query_chars)?;
    let model = state.loaded()?.model(req.model.as_deref())?;
    let embeddings = model.embedder.embed_texts(req.texts).await?;
    Ok(Json(EmbeddingsResponse { embeddings }))
}

/// Embeds images.
#[utoipa::path(post, path = "/embed/image", tag = "embed",
    request_body(content = EmbedImageRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "One embedding per image", body = EmbeddingsResponse),
        (status = 400, description = "No images, too many, bad base64 or undecodable image", body = ErrorBody),
        (status = 403, description = "An image URL refused: not a public address (`url_not_allowed`; with --allow-image-urls)", body = ErrorBody),
        (status = 404, description = "No such model (`model_not_found`)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON, or unsupported image format", body = ErrorBody),
        (status = 422, description = "Image has too many pixels", body = ErrorBody),
        (status = 503, description = "Overloaded: retry after the Retry-After seconds", body = ErrorBody),
    ))]
pub async fn embed_image(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<EmbedImageRequest>,
) -> Result<Json<EmbeddingsResponse>, ApiError> {
    let limits = &state.config.limits;
    Limits::count(
        "invalid_images",
        "images",
        req.images.len(),
        limits.max_images,
    )?;
    let embedder = &state.loaded()?.model(req.model.as_deref())?.embedder;
    let bytes = image_inputs(&state, "images", &req.images).await?;
    let pixels = preprocess_all(embedder, bytes).await?;
    let embeddings = embedder.embed_pixels(pixels).await?;
    Ok(Json(EmbeddingsResponse { embeddings }))
}
