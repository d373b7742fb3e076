//! The axum front door. `router(state)` is kept apart from serving it, so tests drive the
//! router in memory with `oneshot`.

mod admin;
pub mod auth;
mod catalog;
pub mod error;
pub mod extract;
mod internal;
pub mod query;
mod reconcile;
mod reports;
mod user;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, patch, post, put};
use sqlx::PgPool;

use crate::catalog::Catalog;
use crate::clock::Clock;
use crate::registry::Registry;
use crate::supervisor::Reconciler;
use error::ApiError;

/// How long `/readyz` waits for the database to answer.
const READINESS_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    /// Runs reconciliation on demand (the supervisor's job shares it).
    pub reconciler: Arc<Reconciler>,
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
        .route(
            "/api/internal/billing/users/registered",
            post(internal::registered),
        )
        .route_layer(from_fn_with_state(state.clone(), auth::require_service));
    let admin = Router::new()
        .route(
            "/api/admin/billing/action-prices",
            get(catalog::list_prices).post(catalog::create_price),
        )
        .route(
            "/api/admin/billing/action-prices/{action_key}",
            put(catalog::update_price),
        )
        .route(
            "/api/admin/billing/action-prices/{action_key}/status",
            patch(catalog::set_price_status),
        )
        .route(
            "/api/admin/billing/packages",
            get(catalog::list_packages).post(catalog::create_package),
        )
        .route(
            "/api/admin/billing/packages/{id}",
            get(catalog::get_package)
                .put(catalog::update_package)
                .delete(catalog::delete_package),
        )
        .route(
            "/api/admin/billing/packages/{id}/visibility",
            patch(catalog::set_package_visibility),
        )
        .route(
            "/api/admin/billing/packages/{id}/users",
            get(admin::list_package_users),
        )
        .route(
            "/api/admin/billing/user-packages",
            post(admin::assign_user_package),
        )
        .route(
            "/api/admin/billing/user-packages/{id}/activate",
            post(admin::activate_user_package),
        )
        .route(
            "/api/admin/billing/user-packages/{id}/revoke",
            post(admin::revoke_user_package),
        )
        .route(
            "/api/admin/users/{user_id}/billing-packages",
            get(admin::list_user_packages),
        )
        .route(
            "/api/admin/billing/reconciliation",
            get(reconcile::reconciliation),
        )
        .merge(reports::admin_routes())
        .route_layer(from_fn_with_state(state.clone(), auth::require_admin));
    let user = Router::new()
        .route("/api/user/billing/credits", get(user::credits))
        .route("/api/user/billing/packages", get(user::packages))
        .merge(reports::user_routes())
        .route_layer(from_fn_with_state(state.clone(), auth::require_user));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/billing/action-prices", get(catalog::public_prices))
        .route("/api/billing/packages", get(catalog::public_packages))
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
