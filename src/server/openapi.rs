//! The OpenAPI document, generated from the handlers' annotations.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{classify, embed, error, health, images, metrics, search};

/// The whole API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "capivara",
        description = "Zero-shot image classification and text-to-image search with multilingual (Portuguese-first) CLIP models of the CAPIVARA family."
    ),
    paths(
        classify::classify,
        search::search,
        images::ingest,
        images::get_image,
        images::delete_image,
        images::get_thumbnail,
        embed::embed_text,
        embed::embed_image,
        health::healthz,
        health::readyz,
        metrics::metrics,
    ),
    components(schemas(
        error::ErrorBody,
        error::ErrorDetail,
        classify::ClassifyRequest,
        classify::ClassifyForm,
        classify::ClassifyResponse,
        classify::Prediction,
        search::SearchRequest,
        search::SearchResponse,
        search::SearchResult,
        images::IngestRequest,
        images::IngestImage,
        images::IngestForm,
        images::IngestResponse,
        images::ImageInfo,
        images::Deleted,
        images::Jpeg,
        embed::EmbedTextRequest,
        embed::EmbedImageRequest,
        embed::EmbeddingsResponse,
        health::Status,
    )),
    modifiers(&ApiKey),
    tags(
        (name = "classify", description = "Zero-shot classification"),
        (name = "search", description = "Text-to-image search"),
        (name = "images", description = "The image index"),
        (name = "embed", description = "Raw embeddings"),
        (name = "health", description = "Health, readiness, metrics"),
    )
)]
pub struct ApiDoc;

struct ApiKey;

impl Modify for ApiKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document the server serves at `/openapi.json`.
pub fn spec() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

/// `openapi/openapi.json`, as `capivara openapi` prints it.
pub fn document() -> String {
    spec()
        .to_pretty_json()
        .expect("serialising the OpenAPI document")
        + "\n"
}
