//! The reports' reads on SQLite. Queries that read more than one statement run in one
//! (deferred, read-only) transaction: in WAL mode its reads see one snapshot, so the parts agree
//! even while the writer commits.

use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::store::reports::{
    AllocationRow, ConsumptionExport, ConsumptionFilter, ConsumptionRow, EXPORT_ROWS_BUFFERED,
    EventFilter, EventRow, GroupBy, GroupKeys, StatisticsGroup, StatisticsSums, attach,
    consumption_page_query, events_query, export_count_query, export_query, statistics_queries,
};

#[tracing::instrument(skip_all, fields(limit = limit))]
pub(super) async fn list_consumption(
    pool: &SqlitePool,
    filter: &ConsumptionFilter,
    after: Option<(DateTime<Utc>, i64)>,
    limit: i64,
) -> Result<Vec<ConsumptionRow>, sqlx::Error> {
    let mut query = consumption_page_query(filter, after, limit);
    let mut tx = pool.begin().await?;
    let mut rows: Vec<ConsumptionRow> = query.build_query_as().fetch_all(&mut *tx).await?;
    let allocations = allocations_of_page(&mut tx, &rows).await?;
    attach(&mut rows, allocations);
    tx.commit().await?;
    Ok(rows)
}

/// The allocations of every row of a page, in one statement (a page is far below SQLite's
/// limit on bound values).
async fn allocations_of_page(
    conn: &mut SqliteConnection,
    rows: &[ConsumptionRow],
) -> Result<Vec<AllocationRow>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut query = QueryBuilder::<Sqlite>::new(
        "SELECT a.consumption_id, a.user_package_id, a.credits, a.refunded_credits,
                a.forfeited_credits
         FROM consumption_allocations a
         WHERE (a.user_id, a.consumption_id) IN (VALUES ",
    );
    let mut pairs = query.separated(", ");
    for row in rows {
        pairs
            .push("(")
            .push_bind_unseparated(row.user_id)
            .push_unseparated(", ")
            .push_bind_unseparated(row.id)
            .push_unseparated(")");
    }
    query.push(") ORDER BY a.consumption_id, a.user_package_id");
    query.build_query_as().fetch_all(conn).await
}

/// `created_at` is stored as RFC 3339 text in UTC, whose first ten characters are the date.
const GROUP_KEYS: GroupKeys = GroupKeys {
    by_day: "date(created_at) AS day, NULL AS action_key, ",
    by_action_key: "NULL AS day, action_key, ",
};

#[tracing::instrument(skip_all, fields(group_by = ?group_by))]
pub(super) async fn consumption_statistics(
    pool: &SqlitePool,
    filter: &ConsumptionFilter,
    group_by: GroupBy,
    groups_max: i64,
) -> Result<(Vec<StatisticsGroup>, StatisticsSums), sqlx::Error> {
    let (mut groups_query, mut totals_query) =
        statistics_queries(filter, group_by, groups_max, &GROUP_KEYS);
    let mut tx = pool.begin().await?;
    let groups = groups_query.build_query_as().fetch_all(&mut *tx).await?;
    let totals = totals_query.build_query_as().fetch_one(&mut *tx).await?;
    tx.commit().await?;
    Ok((groups, totals))
}

/// Counts in a read transaction, then streams from the same snapshot on a task of its own.
#[tracing::instrument(skip_all)]
pub(super) async fn open_export(
    pool: &SqlitePool,
    filter: &ConsumptionFilter,
    rows_max: i64,
) -> Result<Option<ConsumptionExport>, sqlx::Error> {
    let mut count_query = export_count_query(filter, rows_max);
    let mut tx = pool.begin().await?;
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
            // The reader is gone: the transaction ends when `tx` drops.
            if sender.send(row).await.is_err() {
                break;
            }
        }
    });
    Ok(Some(ConsumptionExport::new(rows, receiver)))
}

#[tracing::instrument(skip_all, fields(limit = limit))]
pub(super) async fn list_events(
    pool: &SqlitePool,
    filter: &EventFilter,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<EventRow>, sqlx::Error> {
    let mut query = events_query(filter, before, limit);
    query.build_query_as().fetch_all(pool).await
}
