//! The axum front door. `router(state)` is kept apart from serving it, so tests drive the
//! router in memory with `oneshot`.

mod admin;
pub mod auth;
pub mod error;
pub mod extract;
mod internal;
pub mod query;
mod reports;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use sqlx::PgPool;

use crate::catalog::Catalog;
use crate::clock::Clock;
use crate::registry::Registry;
use error::ApiError;

/// How long `/readyz` waits for the database to answer.
const READINESS_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub catalog: Arc<Catalog>,
    pub pool: PgPool,
    pub auth: Arc<auth::Auth>,
    pub clock: Arc<dyn Clock>,
}

pub fn router(state: AppState) -> Router {
    let internal = Router::new()
        .route("/api/internal/billing/credits/check", post(internal::check))
        .route(
            "/api/internal/billing/credits/deduct",
            post(internal::deduct),
        )
        .route(
            "/api/internal/billing/credits/refund",
            post(internal::refund),
        )
        .route_layer(from_fn_with_state(state.clone(), auth::require_service));
    let admin = Router::new()
        .route(
            "/api/admin/billing/user-packages",
            post(admin::assign_user_package),
        )
        .merge(reports::admin_routes())
        .route_layer(from_fn_with_state(state.clone(), auth::require_admin));
    let user = Router::new()
        .merge(reports::user_routes())
        .route_layer(from_fn_with_state(state.clone(), auth::require_user));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(internal)
        .merge(admin)
        .merge(user)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(extract::BODY_BYTES_MAX))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready once migrations ran (the engine only serves after they did) and the database answers.
async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    let probe = sqlx::query("SELECT 1").execute(&state.pool);
    match tokio::time::timeout(READINESS_PROBE_TIMEOUT, probe).await {
        Ok(Ok(_)) => Ok("ready"),
        _ => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the database does not answer",
        )),
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
