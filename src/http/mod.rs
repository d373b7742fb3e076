//! The axum front door. `router(state)` is kept apart from serving it, so tests drive the
//! router in memory with `oneshot`.

mod admin;
pub mod auth;
mod catalog;
pub mod error;
pub mod extract;
mod internal;
pub mod openapi;
pub mod query;
mod reconcile;
mod reports;
mod user;
pub mod validate;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::catalog::Catalog;
use crate::clock::Clock;
use crate::error::EngineError;
use crate::registry::Registry;
use crate::supervisor::Reconciler;
use error::{ApiError, ErrorBody};

#[derive(Clone)]
pub struct AppState {
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// The expiry job's worker, also run on demand by tests.
    pub expirer: Arc<crate::supervisor::Expirer>,
    pub registry: Arc<Registry>,
    /// Runs reconciliation on demand (the supervisor's job shares it).
    pub reconciler: Arc<Reconciler>,
    pub catalog: Arc<Catalog>,
    pub db: crate::store::Db,
    pub auth: Arc<auth::Auth>,
    pub clock: Arc<dyn Clock>,
}

/// Every route is registered with `routes!`, which adds the handler to the router and its
/// `#[utoipa::path]` to the OpenAPI document in the same call; the document is then served at
/// `/api/openapi.json`. `/metrics` is served here unless it has its own address
/// (`with_metrics` false; see [`metrics_router`]).
pub fn router(state: AppState, with_metrics: bool) -> Router {
    let internal = OpenApiRouter::new()
        .routes(routes!(internal::check))
        .routes(routes!(internal::deduct))
        .routes(routes!(internal::refund))
        .routes(routes!(internal::registered))
        .route_layer(from_fn_with_state(state.clone(), auth::require_service));
    let admin = OpenApiRouter::new()
        .routes(routes!(catalog::list_prices, catalog::create_price))
        .routes(routes!(catalog::update_price))
        .routes(routes!(catalog::set_price_status))
        .routes(routes!(catalog::list_packages, catalog::create_package))
        .routes(routes!(
            catalog::get_package,
            catalog::update_package,
            catalog::delete_package
        ))
        .routes(routes!(catalog::set_package_visibility))
        .routes(routes!(admin::list_package_users))
        .routes(routes!(admin::assign_user_package))
        .routes(routes!(admin::activate_user_package))
        .routes(routes!(admin::revoke_user_package))
        .routes(routes!(admin::list_user_packages))
        .routes(routes!(reconcile::reconciliation))
        .merge(reports::admin_routes())
        .route_layer(from_fn_with_state(state.clone(), auth::require_admin));
    let user = OpenApiRouter::new()
        .routes(routes!(user::credits))
        .routes(routes!(user::packages))
        .merge(reports::user_routes())
        .route_layer(from_fn_with_state(state.clone(), auth::require_user));
    let (api, document) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(openapi::document))
        .routes(routes!(catalog::public_prices))
        .routes(routes!(catalog::public_packages))
        .merge(internal)
        .merge(admin)
        .merge(user)
        .split_for_parts();
    let api = api
        .layer(Extension(openapi::Shared::new(document)))
        .layer(DefaultBodyLimit::max(extract::BODY_BYTES_MAX))
        .with_state(state.clone());
    // The console calls the API in process; its requests are not counted again as API
    // requests (the console's own request is).
    let console = crate::console::router(api.clone(), state.auth.clone());
    let mut router = api.merge(console);
    if with_metrics {
        router = router.route("/metrics", get(metrics).with_state(state));
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn(track_requests))
}

/// `/metrics` alone, for its own listen address.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// Counts every request and its latency by route pattern (the matched route, never the raw
/// path, so ids do not explode the label set), method and status class.
async fn track_requests(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().cloned();
    let method = request.method().clone();
    let response = next.run(request).await;
    crate::metrics::http_request(
        route.as_ref().map_or("unmatched", MatchedPath::as_str),
        method.as_str(),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// The engine's metrics in the Prometheus text format (no credentials: serve it on a private
/// address with `CREDITS_METRICS_ADDR` when the API's address is public).
async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.prometheus.render(),
    )
        .into_response()
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "public",
    responses((status = 200, description = "The process is up", body = String, content_type = "text/plain")),
)]
async fn healthz() -> &'static str {
    "ok"
}

/// Ready once migrations ran (the engine only serves after they did) and the database answers.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "public",
    responses(
        (status = 200, description = "Ready to serve", body = String, content_type = "text/plain"),
        (status = 503, description = "`unavailable`: the database does not answer", body = ErrorBody),
    ),
)]
async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    if crate::supervisor::probe_database(&state.db).await {
        Ok("ready")
    } else {
        Err(EngineError::Unavailable("the database does not answer").into())
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route")
}
