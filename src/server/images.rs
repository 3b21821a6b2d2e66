//! `POST /images` (ingest), `GET /images/{id}`, `DELETE /images/{id}`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::input::{
    field_bytes, field_text, image_input, next_field, parse_json, preprocess_with_thumbnails,
    require_key, IdPath, Payload,
};
use super::state::{AppState, Limits};
use crate::index::{validate_id, NewImage, Thumbnail};

/// One image to ingest.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestImage {
    /// The image, base64 (or an `http(s)://` URL with `--allow-image-urls`).
    pub image: String,
    /// Its id (1-128 characters of `A-Z a-z 0-9 . _ -`); generated when absent.
    /// An existing id is replaced.
    #[serde(default)]
    pub id: Option<String>,
    /// Any JSON object, returned with search results.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

/// JSON form of an ingest request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestRequest {
    pub images: Vec<IngestImage>,
}

/// The multipart form of an ingest (documentation only): `image` files, each
/// optionally followed by its `id` and `metadata` (JSON) fields.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct IngestForm {
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    image: Vec<String>,
    id: Option<Vec<String>>,
    metadata: Option<Vec<String>>,
}

/// The ids of the ingested images, in request order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IngestResponse {
    pub ids: Vec<String>,
}

/// An indexed image's metadata.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImageInfo {
    pub id: String,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
}

/// The answer to a delete.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    pub id: String,
    pub deleted: bool,
}

fn new_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..16)
        .map(|_| format!("{:x}", rng.random_range(0..16u8)))
        .collect()
}

struct Upload {
    image: Raw,
    id: Option<String>,
    metadata: Option<serde_json::Value>,
}

/// An uploaded image: a file's bytes, or a JSON field's text (base64 or a
/// URL) read once the request's ids and metadata are known to be valid.
enum Raw {
    Bytes(Vec<u8>),
    Field(String, String),
}

async fn read(payload: Payload) -> Result<Vec<Upload>, ApiError> {
    match payload {
        Payload::Json(b) => {
            let r: IngestRequest = parse_json(&b)?;
            r.images
                .into_iter()
                .enumerate()
                .map(|(i, im)| {
                    Ok(Upload {
                        image: Raw::Field(format!("images[{i}].image"), im.image),
                        id: im.id,
                        metadata: im.metadata,
                    })
                })
                .collect()
        }
        Payload::Multipart(mut mp) => {
            let mut out: Vec<Upload> = Vec::new();
            while let Some(field) = next_field(&mut mp).await? {
                let name = field.name().unwrap_or("").to_string();
                match name.as_str() {
                    "image" => out.push(Upload {
                        image: Raw::Bytes(field_bytes(field).await?.to_vec()),
                        id: None,
                        metadata: None,
                    }),
                    "id" | "metadata" => {
                        let text = field_text(field).await?;
                        let last = out.last_mut().ok_or_else(|| {
                            ApiError::bad_request(
                                "invalid_body",
                                format!("`{name}` must follow the `image` it belongs to"),
                            )
                        })?;
                        if name == "id" {
                            last.id = Some(text);
                        } else {
                            last.metadata = Some(serde_json::from_str(&text).map_err(|e| {
                                ApiError::bad_request(
                                    "invalid_metadata",
                                    format!("metadata is not JSON: {e}"),
                                )
                            })?);
                        }
                    }
                    other => {
                        return Err(ApiError::bad_request(
                            "invalid_body",
                            format!("unknown multipart field `{other}` (image, id, metadata)"),
                        ))
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Adds images to the index. Answered only once they are durable.
#[utoipa::path(post, path = "/images", tag = "images",
    request_body(description = "JSON with base64 images, or a multipart form of image files",
        content((IngestRequest = "application/json"), (IngestForm = "multipart/form-data"))),
    responses(
        (status = 200, description = "Ingested and durable", body = IngestResponse),
        (status = 400, description = "Invalid request (ids, metadata, base64, undecodable image)", body = ErrorBody),
        (status = 403, description = "An image URL refused: not a public address (`url_not_allowed`; with --allow-image-urls)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Unsupported content type or image format", body = ErrorBody),
        (status = 422, description = "Image has too many pixels", body = ErrorBody),
        (status = 503, description = "Overloaded or the index unavailable: retry after the Retry-After seconds", body = ErrorBody),
        (status = 507, description = "The data directory is full", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn ingest(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    payload: Payload,
) -> Result<Json<IngestResponse>, ApiError> {
    require_key(&state, &headers)?;
    let uploads = read(payload).await?;
    let limits = &state.config.limits;
    Limits::count("invalid_images", "images", uploads.len(), limits.max_images)?;
    let mut ids = Vec::with_capacity(uploads.len());
    let mut metas = Vec::with_capacity(uploads.len());
    let mut images = Vec::with_capacity(uploads.len());
    for (i, u) in uploads.into_iter().enumerate() {
        // The index's own rule, checked before any model work.
        let id = match u.id {
            Some(id) => {
                validate_id(&id)
                    .map_err(|e| ApiError::bad_request("invalid_id", format!("image {i}: {e}")))?;
                id
            }
            None => new_id(),
        };
        if ids.contains(&id) {
            return Err(ApiError::bad_request(
                "invalid_id",
                format!("id `{id}` appears twice"),
            ));
        }
        let metadata = u.metadata.unwrap_or_else(|| serde_json::json!({}));
        if !metadata.is_object() {
            return Err(ApiError::bad_request(
                "invalid_metadata",
                format!("metadata of image {i} must be a JSON object"),
            ));
        }
        if metadata.to_string().len() > limits.max_metadata_bytes {
            return Err(ApiError::bad_request(
                "invalid_metadata",
                format!(
                    "metadata of image {i} is larger than {} bytes",
                    limits.max_metadata_bytes
                ),
            ));
        }
        ids.push(id);
        metas.push(metadata);
        images.push(u.image);
    }
    let mut bytes = Vec::with_capacity(images.len());
    for raw in images {
        bytes.push(match raw {
            Raw::Bytes(b) => b,
            Raw::Field(field, value) => image_input(&state, &field, &value).await?,
        });
    }
    let embedder = &state.loaded()?.ingest_model().embedder;
    let (pixels, thumbs): (Vec<_>, Vec<_>) = preprocess_with_thumbnails(embedder, bytes)
        .await?
        .into_iter()
        .unzip();
    let vectors = embedder.embed_pixels(pixels).await?;
    let images: Vec<NewImage> = ids
        .iter()
        .zip(vectors)
        .zip(metas.into_iter().zip(thumbs))
        .map(|((id, vector), (metadata, thumbnail))| NewImage {
            id: id.clone(),
            vector,
            metadata,
            thumbnail: Some(thumbnail),
        })
        .collect();
    state.loaded()?.index.insert(images).await?;
    Ok(Json(IngestResponse { ids }))
}

/// An indexed image's metadata.
#[utoipa::path(get, path = "/images/{id}", tag = "images",
    params(("id" = String, Path, description = "The image id: 1-128 characters of A-Z a-z 0-9 . _ -", pattern = r"^[A-Za-z0-9._-]{1,128}$")),
    responses(
        (status = 200, description = "The image's metadata", body = ImageInfo),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 404, description = "No such image", body = ErrorBody),
        (status = 503, description = "The index is unavailable: retry after the Retry-After seconds", body = ErrorBody),
    ))]
pub async fn get_image(
    State(state): State<Arc<AppState>>,
    IdPath(id): IdPath,
) -> Result<Json<ImageInfo>, ApiError> {
    validate_id(&id)?;
    match state.loaded()?.index.get(&id).await? {
        Some(metadata) => Ok(Json(ImageInfo { id, metadata })),
        None => Err(ApiError::not_found(format!("no image with id `{id}`"))),
    }
}

/// Removes an image from the index (durable when answered).
#[utoipa::path(delete, path = "/images/{id}", tag = "images",
    params(("id" = String, Path, description = "The image id: 1-128 characters of A-Z a-z 0-9 . _ -", pattern = r"^[A-Za-z0-9._-]{1,128}$")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "No such image", body = ErrorBody),
        (status = 503, description = "The index is unavailable: retry after the Retry-After seconds", body = ErrorBody),
        (status = 507, description = "The data directory is full", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn delete_image(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    IdPath(id): IdPath,
) -> Result<Json<Deleted>, ApiError> {
    require_key(&state, &headers)?;
    validate_id(&id)?;
    let deleted = state.loaded()?.index.delete(&id).await?;
    if deleted {
        Ok(Json(Deleted { id, deleted }))
    } else {
        Err(ApiError::not_found(format!("no image with id `{id}`")))
    }
}

/// JPEG bytes (documentation only).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct Jpeg(Vec<u8>);

/// The image's thumbnail: a JPEG whose longest side is at most 256 pixels,
/// made at ingest.
#[utoipa::path(get, path = "/images/{id}/thumbnail", tag = "images",
    params(("id" = String, Path, description = "The image id: 1-128 characters of A-Z a-z 0-9 . _ -", pattern = r"^[A-Za-z0-9._-]{1,128}$")),
    responses(
        (status = 200, description = "The thumbnail", content_type = "image/jpeg", body = Jpeg),
        (status = 400, description = "Invalid id", body = ErrorBody),
        (status = 404, description = "No such image, or none kept for it", body = ErrorBody),
        (status = 503, description = "The index is unavailable: retry after the Retry-After seconds", body = ErrorBody),
    ))]
pub async fn get_thumbnail(
    State(state): State<Arc<AppState>>,
    IdPath(id): IdPath,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    validate_id(&id)?;
    match state.loaded()?.index.thumbnail(&id).await? {
        Thumbnail::NoImage => Err(ApiError::not_found(format!("no image with id `{id}`"))),
        Thumbnail::Jpeg(b) => Ok((
            [
                (axum::http::header::CONTENT_TYPE, "image/jpeg"),
                (axum::http::header::CACHE_CONTROL, "no-cache"),
            ],
            b,
        )
            .into_response()),
        Thumbnail::NotKept => Err(ApiError::not_found(format!("no thumbnail kept for `{id}`"))),
    }
}
