//! Request parsing shared by the handlers: JSON or multipart bodies with JSON
//! errors for every rejection, base64 images, the API key, image decoding off
//! the async runtime.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, HeaderMap, StatusCode};
use base64::Engine as _;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::state::AppState;
use crate::engine::Embedder;
use crate::timing::{self, Stage};

/// A request body that is either JSON or `multipart/form-data`.
pub enum Payload {
    Json(Bytes),
    Multipart(Multipart),
}

fn rejection_status(status: StatusCode, what: &str, detail: String) -> ApiError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than the server accepts ({detail})"),
        ),
        _ => ApiError::bad_request("invalid_body", format!("cannot read the {what}: {detail}")),
    }
}

impl<S: Send + Sync> FromRequest<S> for Payload {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if ct.starts_with("application/json") {
            let bytes = Bytes::from_request(req, state)
                .await
                .map_err(|r| rejection_status(r.status(), "body", r.body_text()))?;
            Ok(Payload::Json(bytes))
        } else if ct.starts_with("multipart/form-data") {
            let mp = Multipart::from_request(req, state)
                .await
                .map_err(|r| rejection_status(r.status(), "multipart body", r.body_text()))?;
            Ok(Payload::Multipart(mp))
        } else {
            Err(unsupported_media_type(&ct))
        }
    }
}

fn unsupported_media_type(ct: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!(
            "Content-Type `{}` is not accepted: send application/json or multipart/form-data",
            if ct.is_empty() { "(none)" } else { ct }
        ),
    )
}

/// A JSON-only body: `application/json`, parsed into `T`.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Payload::from_request(req, state).await? {
            Payload::Json(b) => Ok(JsonBody(parse_json(&b)?)),
            Payload::Multipart(_) => Err(unsupported_media_type("multipart/form-data")),
        }
    }
}

/// Parses JSON with a 400 `invalid_json` naming what is wrong.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON body: {e}")))
}

/// A multipart field as bytes, with the body-limit error mapped.
pub async fn field_bytes(field: axum::extract::multipart::Field<'_>) -> Result<Bytes, ApiError> {
    field
        .bytes()
        .await
        .map_err(|e| rejection_status(e.status(), "multipart field", e.body_text()))
}

/// The next multipart field, with errors mapped.
pub async fn next_field(
    mp: &mut Multipart,
) -> Result<Option<axum::extract::multipart::Field<'_>>, ApiError> {
    mp.next_field()
        .await
        .map_err(|e| rejection_status(e.status(), "multipart body", e.body_text()))
}

/// A multipart text field.
pub async fn field_text(field: axum::extract::multipart::Field<'_>) -> Result<String, ApiError> {
    let name = field.name().unwrap_or("").to_string();
    let b = field_bytes(field).await?;
    String::from_utf8(b.to_vec()).map_err(|_| {
        ApiError::bad_request(
            "invalid_body",
            format!("multipart field `{name}` is not UTF-8 text"),
        )
    })
}

/// Decodes base64 (standard or URL-safe alphabet, padding optional, or a
/// `data:<type>;base64,` URL).
pub fn decode_base64(field: &str, s: &str) -> Result<Vec<u8>, ApiError> {
    let s = s.trim();
    let s = match s.strip_prefix("data:") {
        Some(rest) => rest.split_once(";base64,").map(|(_, d)| d).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_base64",
                format!("`{field}`: a data URL must be base64-encoded"),
            )
        })?,
        None => s,
    };
    let cleaned: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    engines
        .iter()
        .find_map(|e| e.decode(&cleaned).ok())
        .filter(|b| !b.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_base64",
                format!("`{field}` is not valid, non-empty base64"),
            )
        })
}

/// Checks `Authorization: Bearer <key>` when the server has an API key.
pub fn require_key(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = state.config.api_key.as_deref() else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong API key",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this endpoint needs `Authorization: Bearer <api key>`",
        )),
    }
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | ((a.len() ^ b.len()) >> 8) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0 && a.len() == b.len()
}

/// Whether an image field holds an `http(s)://` URL.
fn is_url(value: &str) -> bool {
    let v = value.trim();
    let lower = v.get(..8).unwrap_or(v).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// An image field's bytes, untimed: base64 (or a `data:` URL), or an
/// `http(s)://` URL fetched within the policy.
async fn bytes_of(state: &AppState, field: &str, value: &str) -> Result<Vec<u8>, ApiError> {
    let v = value.trim();
    if is_url(v) {
        state.fetcher.fetch(field, v).await
    } else {
        decode_base64(field, v)
    }
}

/// An image field's bytes: base64 (or a `data:` URL), or with
/// `--allow-image-urls` an `http(s)://` URL, fetched within the policy
/// (timed as `fetch`).
pub async fn image_input(state: &AppState, field: &str, value: &str) -> Result<Vec<u8>, ApiError> {
    if is_url(value) {
        timing::timed(Stage::Fetch, bytes_of(state, field, value)).await
    } else {
        bytes_of(state, field, value).await
    }
}

/// [`image_input`] of several fields, `name[i]`: the URLs among them fetched
/// at once (one `fetch` stage: the wall time of them all).
pub async fn image_inputs<S: AsRef<str>>(
    state: &AppState,
    name: &str,
    values: &[S],
) -> Result<Vec<Vec<u8>>, ApiError> {
    let started = std::time::Instant::now();
    let any_url = values.iter().any(|v| is_url(v.as_ref()));
    let out = futures_util::future::try_join_all(values.iter().enumerate().map(|(i, v)| {
        let field = format!("{name}[{i}]");
        async move { bytes_of(state, &field, v.as_ref()).await }
    }))
    .await?;
    if any_url {
        timing::record(Stage::Fetch, started.elapsed());
    }
    Ok(out)
}

/// Decodes and preprocesses images for `embedder` on blocking threads, in
/// parallel.
pub async fn preprocess_all(
    embedder: &Arc<Embedder>,
    images: Vec<Vec<u8>>,
) -> Result<Vec<Vec<f32>>, ApiError> {
    preprocess_each(embedder, images, |e, b| e.preprocess(b)).await
}

/// [`preprocess_all`] with a JPEG thumbnail of each image.
pub async fn preprocess_with_thumbnails(
    embedder: &Arc<Embedder>,
    images: Vec<Vec<u8>>,
) -> Result<Vec<(Vec<f32>, Vec<u8>)>, ApiError> {
    preprocess_each(embedder, images, |e, b| e.preprocess_with_thumbnail(b)).await
}

async fn preprocess_each<T: Send + 'static>(
    embedder: &Arc<Embedder>,
    images: Vec<Vec<u8>>,
    f: fn(&Embedder, &[u8]) -> Result<T, crate::Error>,
) -> Result<Vec<T>, ApiError> {
    let embedder = embedder.clone();
    let _slot = embedder.decode_slot()?;
    timing::timed(Stage::Decode, async move {
        let mut tasks = Vec::with_capacity(images.len());
        for bytes in images {
            let embedder = embedder.clone();
            tasks.push(tokio::task::spawn_blocking(move || f(&embedder, &bytes)));
        }
        let mut out = Vec::with_capacity(tasks.len());
        for (i, t) in tasks.into_iter().enumerate() {
            let px = t
                .await
                .map_err(|e| ApiError::internal(format!("preprocessing task failed: {e}")))?
                .map_err(|e| {
                    let mut api: ApiError = e.into();
                    api.message = format!("image {i}: {}", api.message);
                    api
                })?;
            out.push(px);
        }
        Ok(out)
    })
    .await
}

/// The `{id}` of a path, with a JSON 400 when it cannot be read (percent-
/// encoded bytes that are not UTF-8; axum's own rejection is plain text).
pub struct IdPath(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(id)) => Ok(IdPath(id)),
            Err(e) => Err(ApiError::bad_request(
                "invalid_id",
                format!("the id in the path cannot be read: {}", e.body_text()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_variants_and_errors() {
        assert_eq!(decode_base64("x", "aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64("x", "aGk").unwrap(), b"hi");
        assert_eq!(
            decode_base64("x", "data:image/png;base64,aGk=").unwrap(),
            b"hi"
        );
        assert_eq!(decode_base64("x", " aG\nk= ").unwrap(), b"hi");
        assert_eq!(
            decode_base64("x", "!!!").unwrap_err().code,
            "invalid_base64"
        );
        assert_eq!(decode_base64("x", "").unwrap_err().code, "invalid_base64");
        assert_eq!(
            decode_base64("x", "data:image/png,abc").unwrap_err().code,
            "invalid_base64"
        );
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
