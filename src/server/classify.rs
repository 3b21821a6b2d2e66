//! `POST /classify`: zero-shot classification of one image against labels.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::input::{
    field_bytes, field_text, image_input, next_field, parse_json, preprocess_all, Payload,
};
use super::state::{AppState, Limits};

/// JSON form of a classification request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    /// The image, base64 (JPEG, PNG, WebP, GIF, BMP), or with
    /// `--allow-image-urls` an `http(s)://` URL.
    pub image: String,
    /// The model to use (default: the server's first).
    #[serde(default)]
    pub model: Option<String>,
    /// Candidate labels, 1..=1000.
    pub labels: Vec<String>,
    /// Prompt templates with `{}` for the label; default: the server's set.
    #[serde(default)]
    pub templates: Option<Vec<String>>,
    /// Return only the best `top_k` labels (default: all).
    #[serde(default)]
    pub top_k: Option<usize>,
}

/// The multipart form of a classification request (documentation only).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ClassifyForm {
    /// The image file.
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    image: String,
    /// Labels: repeat the field, or give a JSON array, or a comma-separated list.
    labels: Vec<String>,
    /// Templates: repeat the field or give a JSON array.
    templates: Option<Vec<String>>,
    top_k: Option<usize>,
    /// The model to use (default: the server's first).
    model: Option<String>,
}

/// One label and its probability.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Prediction {
    pub label: String,
    pub score: f32,
}

/// Labels sorted by probability (softmax over all labels, summing to 1).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClassifyResponse {
    pub predictions: Vec<Prediction>,
}

/// Splits a multipart `labels`/`templates` value: a JSON array, else a
/// comma-separated list.
fn list_field(text: &str, comma: bool) -> Vec<String> {
    if let Ok(v) = serde_json::from_str::<Vec<String>>(text) {
        return v;
    }
    if comma {
        text.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    } else {
        vec![text.to_string()]
    }
}

async fn read(
    state: &AppState,
    payload: Payload,
) -> Result<(Vec<u8>, ClassifyRequestParts), ApiError> {
    match payload {
        Payload::Json(b) => {
            let r: ClassifyRequest = parse_json(&b)?;
            let image = image_input(state, "image", &r.image).await?;
            Ok((
                image,
                ClassifyRequestParts {
                    labels: r.labels,
                    templates: r.templates,
                    top_k: r.top_k,
                    model: r.model,
                },
            ))
        }
        Payload::Multipart(mut mp) => {
            let (mut image, mut labels, mut templates, mut top_k) =
                (None, Vec::new(), None::<Vec<String>>, None);
            let mut model = None;
            while let Some(field) = next_field(&mut mp).await? {
                match field.name().unwrap_or("") {
                    "image" => image = Some(field_bytes(field).await?.to_vec()),
                    "labels" | "label" => {
                        labels.extend(list_field(&field_text(field).await?, true))
                    }
                    "templates" | "template" => templates
                        .get_or_insert_with(Vec::new)
                        .extend(list_field(&field_text(field).await?, false)),
                    "model" => model = Some(field_text(field).await?.trim().to_string()),
                    "top_k" => {
                        let t = field_text(field).await?;
                        top_k = Some(t.trim().parse().map_err(|_| {
                            ApiError::bad_request(
                                "invalid_top_k",
                                format!("top_k `{t}` is not a positive integer"),
                            )
                        })?)
                    }
                    other => {
                        return Err(ApiError::bad_request(
                            "invalid_body",
                            format!(
                            "unknown multipart field `{other}` (image, labels, templates, top_k, model)"
                        ),
                        ))
                    }
                }
            }
            let image = image.ok_or_else(|| {
                ApiError::bad_request("missing_image", "the form has no `image` file")
            })?;
            Ok((
                image,
                ClassifyRequestParts {
                    labels,
                    templates,
                    top_k,
                    model,
                },
            ))
        }
    }
}

struct ClassifyRequestParts {
    labels: Vec<String>,
    templates: Option<Vec<String>>,
    top_k: Option<usize>,
    model: Option<String>,
}

/// Zero-shot classification: the probability of each label for the image.
#[utoipa::path(post, path = "/classify", tag = "classify",
    request_body(description = "JSON with a base64 image, or a multipart form with an image file",
        content((ClassifyRequest = "application/json"), (ClassifyForm = "multipart/form-data"))),
    responses(
        (status = 200, description = "Labels sorted by probability", body = ClassifyResponse),
        (status = 400, description = "Invalid request (labels, top_k, base64, undecodable image)", body = ErrorBody),
        (status = 403, description = "An image URL refused: not a public address (`url_not_allowed`; with --allow-image-urls)", body = ErrorBody),
        (status = 404, description = "No such model (`model_not_found`)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Unsupported content type or image format", body = ErrorBody),
        (status = 422, description = "Image has too many pixels", body = ErrorBody),
        (status = 503, description = "Overloaded: retry after the Retry-After seconds", body = ErrorBody),
    ))]
pub async fn classify(
    State(state): State<Arc<AppState>>,
    payload: Payload,
) -> Result<Json<ClassifyResponse>, ApiError> {
    let (image, req) = read(&state, payload).await?;
    let limits = &state.config.limits;
    Limits::count(
        "invalid_labels",
        "labels",
        req.labels.len(),
        limits.max_labels,
    )?;
    Limits::each_nonblank(
        "invalid_labels",
        "label",
        &req.labels,
        limits.max_label_chars,
    )?;
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = req.labels.iter().find(|l| !seen.insert(l.as_str())) {
        return Err(ApiError::bad_request(
            "invalid_labels",
            format!("label `{dup}` is given twice"),
        ));
    }
    let templates = match req.templates {
        Some(t) => {
            Limits::count(
                "invalid_templates",
                "templates",
                t.len(),
                limits.max_templates,
            )?;
            Limits::each_nonblank("invalid_templates", "template", &t, limits.max_label_chars)?;
            t
        }
        None => state.config.templates.clone(),
    };
    if req.top_k == Some(0) {
        return Err(ApiError::bad_request(
            "invalid_top_k",
            "top_k must be at least 1",
        ));
    }
    let embedder = &state.loaded()?.model(req.model.as_deref())?.embedder;
    let pixels = preprocess_all(embedder, vec![image]).await?;
    // The image pass and the (cached) label pass run concurrently.
    let (img, classes) = tokio::join!(
        embedder.embed_pixels(pixels),
        embedder.class_embeddings(&req.labels, &templates)
    );
    let img = img?
        .pop()
        .ok_or_else(|| ApiError::internal("no image embedding"))?;
    let probs = embedder.zero_shot(&img, &classes?);
    let mut predictions: Vec<Prediction> = req
        .labels
        .into_iter()
        .zip(probs)
        .map(|(label, score)| Prediction { label, score })
        .collect();
    predictions.sort_by(|a, b| b.score.total_cmp(&a.score));
    if let Some(k) = req.top_k {
        predictions.truncate(k);
    }
    Ok(Json(ClassifyResponse { predictions }))
}
