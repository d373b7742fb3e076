//! Read-only reports: consumption lists, statistics and CSV export, the audit log, and the
//! user's own consumption history.

use utoipa_axum::router::OpenApiRouter;

use super::AppState;

/// Routes of the admin surface (behind `require_admin`).
pub fn admin_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
}

/// Routes of the user surface (behind `require_user`).
pub fn user_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
}
