//! The OpenAI-compatible embeddings API: `POST /v1/embeddings`,
//! `GET /v1/models`, `GET /v1/models/{model}`, so that the `openai` SDKs,
//! LiteLLM, LangChain and friends use capivara unchanged.
//!
//! Texts as OpenAI takes them (a string or a list of strings); images as
//! infinity takes them (`"modality": "image"`, inputs as `data:image/...;base64,`
//! URIs, or `http(s)://` URLs with `--allow-image-urls`). Errors on `/v1/`
//! routes take OpenAI's shape, `{"error": {"message", "type", "param",
//! "code"}}` ([`error_shape`]).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::input::{image_inputs, preprocess_all, JsonBody};
use super::state::{AppState, Limits};

/// OpenAI's `input`: a string, a list of strings; token arrays are refused.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// An embeddings request, in OpenAI's shape (plus infinity's `modality`).
#[derive(Debug, Deserialize, ToSchema)]
pub struct OpenAiEmbeddingsRequest {
    /// A model this server serves (`GET /v1/models`); default: its first.
    #[serde(default)]
    pub model: Option<String>,
    /// Texts (or, with `modality: "image"`, images as data URIs or URLs).
    pub input: EmbeddingInput,
    /// `float` (default) or `base64` (little-endian f32, as the SDKs decode it).
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Must be the model's dimension when given (CLIP embeddings are not
    /// truncatable).
    #[serde(default)]
    pub dimensions: Option<usize>,
    /// Accepted and ignored.
    #[serde(default)]
    pub user: Option<String>,
    /// `text` (default) or `image`.
    #[serde(default)]
    pub modality: Option<String>,
}

/// One embedding: a list of floats or a base64 string.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

/// One item of the answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Embedding {
    /// Always `embedding`.
    pub object: String,
    pub index: usize,
    pub embedding: EmbeddingVector,
}

/// Tokens embedded (texts; images count none).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// The answer, in OpenAI's shape.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OpenAiEmbeddingsResponse {
    /// Always `list`.
    pub object: String,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: Usage,
}

/// A model, as `GET /v1/models` lists it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelInfo {
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// When this server started (Unix seconds).
    pub created: u64,
    pub owned_by: String,
}

/// The models served.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<ModelInfo>,
}

fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, message)
}

/// Embeds texts or images, in OpenAI's request and answer shapes.
#[utoipa::path(post, path = "/v1/embeddings", tag = "openai",
    request_body(content = OpenAiEmbeddingsRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "One embedding per input, in order", body = OpenAiEmbeddingsResponse),
        (status = 400, description = "Invalid input, encoding_format, dimensions or modality; token arrays", body = ErrorBody),
        (status = 403, description = "An image URL refused: not a public address (`url_not_allowed`; with --allow-image-urls)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key (with --api-key-reads)", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON, or an unsupported image", body = ErrorBody),
        (status = 503, description = "Overloaded or still loading: retry after the Retry-After seconds", body = ErrorBody),
    ),
    )]
pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<OpenAiEmbeddingsRequest>,
) -> Result<Json<OpenAiEmbeddingsResponse>, ApiError> {
    let limits = &state.config.limits;
    let inputs = match req.input {
        EmbeddingInput::One(s) => vec![s],
        EmbeddingInput::Many(v) => v,
        EmbeddingInput::Tokens(_) | EmbeddingInput::TokenLists(_) => {
            return Err(invalid(
                "invalid_input",
                "token arrays are not accepted (this model has its own tokenizer): send the \
                 texts (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))",
            ))
        }
    };
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(invalid(
                "invalid_encoding_format",
                format!("encoding_format `{other}`: float or base64"),
            ))
        }
    };
    let image = match req.modality.as_deref() {
        None | Some("text") => false,
        Some("image") => true,
        Some(other) => {
            return Err(invalid(
                "invalid_modality",
                format!("modality `{other}`: text or image"),
            ))
        }
    };
    let model = state.loaded()?.model(req.model.as_deref())?;
    if let Some(d) = req.dimensions {
        let dim = model.embedder.embed_dim();
        if d != dim {
            return Err(invalid(
                "invalid_dimensions",
                format!(
                    "model `{}` embeds in {dim} dimensions (got dimensions={d})",
                    model.name
                ),
            ));
        }
    }
    let (rows, tokens) = if image {
        Limits::count("invalid_input", "images", inputs.len(), limits.max_images)?;
        let bytes = image_inputs(&state, "input", &inputs).await?;
        let pixels = preprocess_all(&model.embedder, bytes).await?;
        (model.embedder.embed_pixels(pixels).await?, 0)
    } else {
        Limits::count("invalid_input", "texts", inputs.len(), limits.max_texts)?;
        Limits::each_at_most("invalid_input", "text", &inputs, limits.max_query_chars)?;
        model.embedder.embed_texts_counted(inputs).await?
    };
    let data = rows
        .into_iter()
        .enumerate()
        .map(|(index, v)| Embedding {
            object: "embedding".into(),
            index,
            embedding: if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                EmbeddingVector::Float(v)
            },
        })
        .collect();
    Ok(Json(OpenAiEmbeddingsResponse {
        object: "list".into(),
        data,
        model: model.name.clone(),
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    }))
}

fn started_at() -> u64 {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    })
}

fn info(name: &str) -> ModelInfo {
    ModelInfo {
        id: name.to_string(),
        object: "model".into(),
        created: started_at(),
        owned_by: "capivara".into(),
    }
}

/// The models this server serves (loaded or not yet).
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses(
        (status = 200, description = "The models", body = ModelList),
        (status = 401, description = "Missing or wrong API key (with --api-key-reads)", body = ErrorBody),
    ),
    )]
pub async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: state.config.models.iter().map(|m| info(&m.name)).collect(),
    })
}

/// One model.
#[utoipa::path(get, path = "/v1/models/{model}", tag = "openai",
    params(("model" = String, Path, description = "A model name, as `GET /v1/models` lists it")),
    responses(
        (status = 200, description = "The model", body = ModelInfo),
        (status = 401, description = "Missing or wrong API key (with --api-key-reads)", body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
    ),
    )]
pub async fn model(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<ModelInfo>, ApiError> {
    if state.config.models.iter().any(|m| m.name == name) {
        Ok(Json(info(&name)))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("no model `{name}` here"),
        ))
    }
}

/// OpenAI's error `type` for a status, and the request field a code is
/// about.
fn kind(status: StatusCode, code: &str) -> (&'static str, Option<&'static str>) {
    let ty = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 if code != "model_not_found" => "not_found_error",
        408 | 503 => "server_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    let param = match code {
        "model_not_found" | "invalid_model" | "invalid_dimensions" => Some("model"),
        "invalid_encoding_format" => Some("encoding_format"),
        "invalid_modality" => Some("modality"),
        c if c.starts_with("invalid_input")
            || c.starts_with("url_")
            || c.contains("image")
            || c == "invalid_base64" =>
        {
            Some("input")
        }
        _ => None,
    };
    (ty, param)
}

/// Rewrites the JSON error answers of `/v1/` routes into OpenAI's shape
/// (`message`, `type`, `param`, `code`); other routes keep capivara's.
pub async fn error_shape(req: Request, next: Next) -> Response {
    let openai = req.uri().path().starts_with("/v1/");
    let resp = next.run(req).await;
    if !openai || resp.status().is_success() {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return (parts.status, "").into_response();
    };
    let ours: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    let Some(err) = ours.as_ref().and_then(|v| v.get("error")) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let code = err["code"].as_str().unwrap_or("error").to_string();
    let (ty, param) = kind(parts.status, &code);
    let body = serde_json::json!({"error": {
        "message": err["message"].as_str().unwrap_or(""),
        "type": ty,
        "param": param,
        "code": code,
    }});
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body.to_string()))
}
