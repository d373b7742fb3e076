//! Reconciliation's reads and events on PostgreSQL (the formula is in `store::reconcile`).

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::store::reconcile::MISMATCH_EVENT_KIND;

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
