//! The OpenAPI document. Paths and their schemas come from the routes
//! themselves ([`super::api`] registers each handler with its entry); this
//! file holds what is not a route: the title, the tags, the API-key scheme.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// The document's frame, before the routes add their paths.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "capivara",
        description = "Zero-shot image classification and text-to-image search with multilingual (Portuguese-first) CLIP models of the CAPIVARA family."
    ),
    modifiers(&ApiKey),
    tags(
        (name = "classify", description = "Zero-shot classification"),
        (name = "search", description = "Text-to-image search"),
        (name = "images", description = "The image index"),
        (name = "embed", description = "Raw embeddings"),
        (name = "health", description = "Health, readiness, metrics"),
        (name = "openai", description = "OpenAI-compatible embeddings"),
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

/// The frame the router starts from.
pub fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The routes' document with the crate's version.
pub fn finish(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

/// The document the server serves at `/openapi.json`.
pub fn spec() -> utoipa::openapi::OpenApi {
    finish(super::api().split_for_parts().1)
}

/// `openapi/openapi.json`, as `capivara openapi` prints it.
pub fn document() -> String {
    spec()
        .to_pretty_json()
        .expect("serialising the OpenAPI document")
        + "\n"
}
