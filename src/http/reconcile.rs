//! `GET /api/admin/billing/reconciliation`: an operator runs a reconciliation now.

use axum::Json;
use axum::extract::State;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use crate::supervisor::ReconciliationReport;

/// Compares every grant with its ledger and each idle live wallet with the database, writes a
/// `billing_reconciliation_mismatch` event per mismatch and answers the report. Fixes nothing.
#[utoipa::path(
    get,
    path = "/api/admin/billing/reconciliation",
    tag = "admin",
    security(("jwt" = [])),
    responses(
        (status = 200, description = "What this run compared and every mismatch it found", body = ReconciliationReport),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The token is not an admin's", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all)]
pub async fn reconciliation(
    State(state): State<AppState>,
) -> Result<Json<ReconciliationReport>, ApiError> {
    Ok(Json(state.reconciler.run().await?))
}
