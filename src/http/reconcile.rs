//! `GET /api/admin/billing/reconciliation`: an operator runs a reconciliation now.

use axum::Json;
use axum::extract::State;

use super::AppState;
use super::error::ApiError;
use crate::supervisor::ReconciliationReport;

/// Compares every grant with its ledger and each idle live wallet with the database, writes a
/// `billing_reconciliation_mismatch` event per mismatch and answers the report. Fixes nothing.
#[tracing::instrument(skip_all)]
pub async fn reconciliation(
    State(state): State<AppState>,
) -> Result<Json<ReconciliationReport>, ApiError> {
    Ok(Json(state.reconciler.run().await?))
}
