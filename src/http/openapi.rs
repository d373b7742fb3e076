//! The OpenAPI 3 document of the HTTP API. Routes are registered with `utoipa_axum::routes!`,
//! which adds each handler to the router and its `#[utoipa::path]` to the document in one call,
//! so the two cannot drift apart.

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use utoipa::openapi::OpenApi as Document;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// The document's skeleton: info, tags and security schemes. Paths and schemas are added by
/// the router as it registers each route.
#[derive(OpenApi)]
#[openapi(
    modifiers(&Skeleton),
    tags(
        (name = "public", description = "No credentials"),
        (name = "internal", description = "Workflow services; a service token"),
        (name = "admin", description = "Operators; a JWT with `role: admin`"),
        (name = "user", description = "End users; a JWT whose `sub` is the user id"),
    ),
)]
pub struct ApiDoc;

struct Skeleton;

impl Modify for Skeleton {
    fn modify(&self, openapi: &mut Document) {
        openapi.info.title = "credits-engine".to_owned();
        openapi.info.version = env!("CARGO_PKG_VERSION").to_owned();
        openapi.info.description = Some(
            "Credits for AI features: check, deduct and refund for workflow services, the \
             catalog and grants for operators, balances for end users. See the README for how \
             it works."
                .to_owned(),
        );
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "service_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("One of the configured `CREDITS_SERVICE_TOKENS`"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "jwt",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("HS256, signed with `CREDITS_JWT_SECRET`"))
                    .build(),
            ),
        );
    }
}

/// The finished document, built once with the router and handed to `document` as an extension.
pub type Shared = Arc<Document>;

/// `GET /api/openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "public",
    responses((status = 200, description = "The OpenAPI document of this API", body = Object)),
)]
pub async fn document(Extension(document): Extension<Shared>) -> Response {
    Json(document.as_ref()).into_response()
}
