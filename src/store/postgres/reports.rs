//! The reports' reads on PostgreSQL. Queries that read more than one statement (a page and its
//! allocations, groups and their totals, an export and its row count) run in one
//! `REPEATABLE READ READ ONLY` transaction, so the parts agree even while deductions and refunds
//! commit.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::store::reports::{
    AllocationRow, ConsumptionExport, ConsumptionFilter, ConsumptionRow, EXPORT_ROWS_BUFFERED,
    EventFilter, EventRow, GroupBy, GroupKeys, StatisticsGroup, StatisticsSums, attach,
    consumption_page_query, events_query, export_count_query, export_query, statistics_queries,
};

/// Opens a read-only transaction whose statements all see one snapshot.
async fn snapshot(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

#[tracing::instrument(skip_all, fields(limit = limit))]
pub(super) async fn list_consumption(
    pool: &PgPool,
    filter: &ConsumptionFilter,
    after: Option<(DateTime<Utc>, i64)>,
    limit: i64,
) -> Result<Vec<ConsumptionRow>, sqlx::Error> {
    let mut query = consumption_page_query(filter, after, limit);
    let mut tx = snapshot(pool).await?;
    let mut rows: Vec<ConsumptionRow> = query.build_query_as().fetch_all(&mut *tx).await?;
    let allocations = allocations_of_page(&mut tx, &rows).await?;
    attach(&mut rows, allocations);
    tx.commit().await?;
    Ok(rows)
}

/// The allocations of every row of a page, in one statement.
async fn allocations_of_page(
    conn: &mut PgConnection,
    rows: &[ConsumptionRow],
) -> Result<Vec<AllocationRow>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let user_ids: Vec<i64> = rows.iter().map(|row| row.user_id).collect();
    let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
    sqlx::query_as(
        "SELECT a.consumption_id, a.user_package_id, a.credits, a.refunded_credits,
                a.forfeited_credits
         FROM consumption_allocations a
         JOIN UNNEST($1::bigint[], $2::bigint[]) AS page (user_id, consumption_id)
           ON a.user_id = page.user_id AND a.consumption_id = page.consumption_id
         ORDER BY a.consumption_id, a.user_package_id",
    )
    .bind(&user_ids)
    .bind(&ids)
    .fetch_all(conn)
    .await
}

const GROUP_KEYS: GroupKeys = GroupKeys {
    by_day: "(created_at AT TIME ZONE 'UTC')::date AS day, NULL::text AS action_key, ",
    by_action_key: "NULL::date AS day, action_key, ",
};

#[tracing::instrument(skip_all, fields(group_by = ?group_by))]
pub(super) async fn consumption_statistics(
    pool: &PgPool,
    filter: &ConsumptionFilter,
    group_by: GroupBy,
    groups_max: i64,
) -> Result<(Vec<StatisticsGroup>, StatisticsSums), sqlx::Error> {
    let (mut groups_query, mut totals_query) =
        statistics_queries(filter, group_by, groups_max, &GROUP_KEYS);
    let mut tx = snapshot(pool).await?;
    let groups = groups_query.build_query_as().fetch_all(&mut *tx).await?;
    let totals = totals_query.build_query_as().fetch_one(&mut *tx).await?;
    tx.commit().await?;
    Ok((groups, totals))
}

/// Counts in a snapshot, then streams from the same snapshot on a task of its own.
#[tracing::instrument(skip_all)]
pub(super) async fn open_export(
    pool: &PgPool,
    filter: &ConsumptionFilter,
    rows_max: i64,
) -> Result<Option<ConsumptionExport>, sqlx::Error> {
    let mut count_query = export_count_query(filter, rows_max);
    let mut tx = snapshot(pool).await?;
    let rows: i64 = count_query.build_query_scalar().fetch_one(&mut *tx).await?;
    if rows > rows_max {
        tx.rollback().await?;
        return Ok(None);
    }
    let mut query = export_query(filter, rows_max);
    let (sender, receiver) = mpsc::channel(EXPORT_ROWS_BUFFERED);
    tokio::spawn(async move {
        let mut stream = query.build_query_as().fetch(&mut *tx);
        while let Some(row) = stream.next().await {
            // The reader is gone: the snapshot is rolled back when `tx` drops.
            if sender.send(row).await.is_err() {
                break;
            }
        }
    });
    Ok(Some(ConsumptionExport::new(rows, receiver)))
}

#[tracing::instrument(skip_all, fields(limit = limit))]
pub(super) async fn list_events(
    pool: &PgPool,
    filter: &EventFilter,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<EventRow>, sqlx::Error> {
    let mut query = events_query(filter, before, limit);
    query.build_query_as().fetch_all(pool).await
}
