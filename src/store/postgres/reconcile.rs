//! Reconciliation's reads and events on PostgreSQL (the formula is in `store::reconcile`).

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::store::reconcile::{
    LEDGER_MISMATCHES_SQL, LedgerCheck, LedgerRow, MISMATCH_EVENT_KIND, ORPHAN_ALLOCATIONS_SQL,
    OrphanAllocation, cut_orphans, limit_past,
};

/// It scans all grants and allocations (a hash aggregate over `consumption_allocations`): meant
/// for a periodic job and an operator's request, not a hot path.
#[tracing::instrument(skip(pool))]
pub(super) async fn ledger_mismatches(
    pool: &PgPool,
    max: usize,
) -> Result<LedgerCheck, sqlx::Error> {
    let rows: Vec<LedgerRow> = sqlx::query_as(LEDGER_MISMATCHES_SQL)
        .bind(limit_past(max))
        .fetch_all(pool)
        .await?;
    Ok(LedgerCheck::of(rows, max))
}

#[tracing::instrument(skip(pool))]
pub(super) async fn orphan_allocations(
    pool: &PgPool,
    max: usize,
) -> Result<(Vec<OrphanAllocation>, bool), sqlx::Error> {
    let orphans = sqlx::query_as(ORPHAN_ALLOCATIONS_SQL)
        .bind(limit_past(max))
        .fetch_all(pool)
        .await?;
    Ok(cut_orphans(orphans, max))
}

/// One statement for all the events. Never touches a balance: reconciliation reports, it does
/// not fix.
pub(super) async fn insert_mismatch_events(
    pool: &PgPool,
    events: &[(i64, serde_json::Value)],
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let user_ids: Vec<i64> = events.iter().map(|(user_id, _)| *user_id).collect();
    let payloads: Vec<serde_json::Value> =
        events.iter().map(|(_, payload)| payload.clone()).collect();
    sqlx::query(
        "INSERT INTO billing_events (kind, user_id, payload, created_at)
         SELECT $1, u, p, $4 FROM UNNEST($2::bigint[], $3::jsonb[]) AS e(u, p)",
    )
    .bind(MISMATCH_EVENT_KIND)
    .bind(&user_ids)
    .bind(&payloads)
    .bind(now)
    .execute(pool)
    .await?;
    Ok(())
}
