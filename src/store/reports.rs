//! Read-only queries behind the reports: consumption lists, statistics, exports, the audit log.
//!
//! Filters are appended with `QueryBuilder::push_bind`, so a value from a query string never
//! becomes SQL text; the only text pushed is fixed fragments of this module. Queries that read
//! more than one statement (a page and its allocations, groups and their totals, an export and
//! its row count) run in one `REPEATABLE READ READ ONLY` transaction, so the parts agree even
//! while deductions and refunds commit.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder, Transaction};
use tokio_stream::Stream;

use crate::domain::UserId;

/// Which consumption records a report covers. Every field narrows; `None` leaves it open.
#[derive(Clone, Debug, Default)]
pub struct ConsumptionFilter {
    pub user_id: Option<UserId>,
    pub action_key: Option<String>,
    /// `completed` or `refunded`.
    pub status: Option<String>,
    /// Inclusive.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive.
    pub to: Option<DateTime<Utc>>,
}

impl ConsumptionFilter {
    /// Appends ` WHERE ...` (or nothing) for this filter to a query over `consumption_records`;
    /// the answer glues on further conditions.
    fn push_where(&self, query: &mut QueryBuilder<Postgres>) -> Glue {
        let mut glue = Glue::default();
        if let Some(user_id) = self.user_id {
            query.push(glue.next()).push("user_id = ");
            query.push_bind(user_id.get());
        }
        if let Some(action_key) = &self.action_key {
            query.push(glue.next()).push("action_key = ");
            query.push_bind(action_key.clone());
        }
        if let Some(status) = &self.status {
            query.push(glue.next()).push("status = ");
            query.push_bind(status.clone());
        }
        if let Some(from) = self.from {
            query.push(glue.next()).push("created_at >= ");
            query.push_bind(from);
        }
        if let Some(to) = self.to {
            query.push(glue.next()).push("created_at < ");
            query.push_bind(to);
        }
        glue
    }
}

/// Hands out ` WHERE ` for the first condition and ` AND ` for the rest.
#[derive(Default)]
struct Glue {
    started: bool,
}

impl Glue {
    fn next(&mut self) -> &'static str {
        if std::mem::replace(&mut self.started, true) {
            " AND "
        } else {
            " WHERE "
        }
    }
}

/// A consumption record as the reports show it, with the grants that paid for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ConsumptionRow {
    pub id: i64,
    pub user_id: i64,
    pub action_key: String,
    pub quantity: i64,
    pub unit_cost: i64,
    pub credits_cost: i64,
    pub price_version: i64,
    pub idempotency_key: Option<String>,
    pub status: String,
    pub refunded_credits: i64,
    pub forfeited_credits: i64,
    pub refund_reason: Option<String>,
    pub refunded_at: Option<DateTime<Utc>>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    /// Filled by a second query for a page; left empty by the export, whose CSV has no
    /// allocation columns.
    #[sqlx(skip)]
    pub allocations: Vec<AllocationRow>,
}

const CONSUMPTION_COLUMNS: &str = "SELECT id, user_id, action_key, quantity, unit_cost, \
    credits_cost, price_version, idempotency_key, status, refunded_credits, forfeited_credits, \
    refund_reason, refunded_at, metadata, created_at FROM consumption_records";

/// What one grant paid of a deduction, and what of it came back or was forfeited.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AllocationRow {
    #[serde(skip)]
    pub consumption_id: i64,
    pub user_package_id: i64,
    pub credits: i64,
    pub refunded_credits: i64,
    pub forfeited_credits: i64,
}

/// Opens a read-only transaction whose statements all see one snapshot.
async fn snapshot(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// One page of consumption records, newest first (`created_at DESC, id DESC`), starting after
/// the keyset position `after`, at most `limit` rows, each with its allocations.
#[tracing::instrument(skip_all, fields(limit = limit))]
pub async fn list_consumption(
    pool: &PgPool,
    filter: &ConsumptionFilter,
    after: Option<(DateTime<Utc>, i64)>,
    limit: i64,
) -> Result<Vec<ConsumptionRow>, sqlx::Error> {
    let mut query = QueryBuilder::new(CONSUMPTION_COLUMNS);
    let mut glue = filter.push_where(&mut query);
    if let Some((at, id)) = after {
        query.push(glue.next()).push("(created_at, id) < (");
        query.push_bind(at).push(", ").push_bind(id).push(")");
    }
    query.push(" ORDER BY created_at DESC, id DESC LIMIT ");
    query.push_bind(limit);

    let mut tx = snapshot(pool).await?;
    let mut rows: Vec<ConsumptionRow> = query.build_query_as().fetch_all(&mut *tx).await?;
    attach_allocations(&mut tx, &mut rows).await?;
    tx.commit().await?;
    Ok(rows)
}

/// Loads the allocations of every row of a page in one statement.
async fn attach_allocations(
    conn: &mut PgConnection,
    rows: &mut [ConsumptionRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let user_ids: Vec<i64> = rows.iter().map(|row| row.user_id).collect();
    let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
    let allocations: Vec<AllocationRow> = sqlx::query_as(
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
    .await?;
    // Consumption ids are unique across users, so the id alone finds the row.
    let index: HashMap<i64, usize> = rows
        .iter()
        .enumerate()
        .map(|(position, row)| (row.id, position))
        .collect();
    for allocation in allocations {
        if let Some(&position) = index.get(&allocation.consumption_id) {
            rows[position].allocations.push(allocation);
        }
    }
    Ok(())
}

/// How statistics group their records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    /// The UTC date of `created_at`.
    Day,
    ActionKey,
}

/// One group of the statistics; exactly one of `day` and `action_key` is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StatisticsGroup {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Date)]
    pub day: Option<NaiveDate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action_key: Option<String>,
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub sums: StatisticsSums,
}

/// The sums of a group, or of the whole range.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StatisticsSums {
    pub records: i64,
    /// What the records cost when deducted.
    pub credits: i64,
    /// What refunds gave back to the users' grants.
    pub refunded_credits: i64,
    /// `credits - refunded_credits`: what the users were charged in the end. Forfeited credits
    /// (refunded onto a grant that had expired) count as charged.
    pub net_credits: i64,
    pub distinct_users: i64,
}

const SUMS_COLUMNS: &str = "COUNT(*)::bigint AS records, \
    COALESCE(SUM(credits_cost), 0)::bigint AS credits, \
    COALESCE(SUM(refunded_credits), 0)::bigint AS refunded_credits, \
    COALESCE(SUM(credits_cost - refunded_credits), 0)::bigint AS net_credits, \
    COUNT(DISTINCT user_id)::bigint AS distinct_users";

/// The groups (at most `groups_max`, in report order) and the totals over the whole filter.
#[tracing::instrument(skip_all, fields(group_by = ?group_by))]
pub async fn consumption_statistics(
    pool: &PgPool,
    filter: &ConsumptionFilter,
    group_by: GroupBy,
    groups_max: i64,
) -> Result<(Vec<StatisticsGroup>, StatisticsSums), sqlx::Error> {
    let (key_columns, group_and_order) = match group_by {
        GroupBy::Day => (
            "(created_at AT TIME ZONE 'UTC')::date AS day, NULL::text AS action_key, ",
            " GROUP BY 1 ORDER BY 1 ASC",
        ),
        GroupBy::ActionKey => (
            "NULL::date AS day, action_key, ",
            " GROUP BY action_key ORDER BY credits DESC, action_key ASC",
        ),
    };
    let mut groups_query = QueryBuilder::new("SELECT ");
    groups_query
        .push(key_columns)
        .push(SUMS_COLUMNS)
        .push(" FROM consumption_records");
    filter.push_where(&mut groups_query);
    groups_query.push(group_and_order).push(" LIMIT ");
    groups_query.push_bind(groups_max);

    let mut totals_query = QueryBuilder::new("SELECT ");
    totals_query
        .push(SUMS_COLUMNS)
        .push(" FROM consumption_records");
    filter.push_where(&mut totals_query);

    let mut tx = snapshot(pool).await?;
    let groups = groups_query.build_query_as().fetch_all(&mut *tx).await?;
    let totals = totals_query.build_query_as().fetch_one(&mut *tx).await?;
    tx.commit().await?;
    Ok((groups, totals))
}

/// A consumption export: a snapshot transaction and the query it streams, newest first.
/// Holding the snapshot keeps the streamed rows equal to the rows counted when it opened.
pub struct ConsumptionExport {
    tx: Transaction<'static, Postgres>,
    query: QueryBuilder<Postgres>,
    /// Rows the export will stream.
    pub rows: i64,
}

impl ConsumptionExport {
    /// Counts the rows of `filter` (stopping at `rows_max + 1`, so a huge table is not
    /// counted to its end) and prepares their query. `Ok(None)` when more than `rows_max`
    /// rows match.
    #[tracing::instrument(skip_all)]
    pub async fn open(
        pool: &PgPool,
        filter: &ConsumptionFilter,
        rows_max: i64,
    ) -> Result<Option<ConsumptionExport>, sqlx::Error> {
        let mut count_query =
            QueryBuilder::new("SELECT COUNT(*)::bigint FROM (SELECT 1 FROM consumption_records");
        filter.push_where(&mut count_query);
        count_query.push(" LIMIT ");
        count_query.push_bind(rows_max.saturating_add(1));
        count_query.push(") AS bounded");

        let mut tx = snapshot(pool).await?;
        let rows: i64 = count_query.build_query_scalar().fetch_one(&mut *tx).await?;
        if rows > rows_max {
            tx.rollback().await?;
            return Ok(None);
        }
        let mut query = QueryBuilder::new(CONSUMPTION_COLUMNS);
        filter.push_where(&mut query);
        query.push(" ORDER BY created_at DESC, id DESC LIMIT ");
        query.push_bind(rows_max);
        Ok(Some(ConsumptionExport { tx, query, rows }))
    }

    /// The rows, streamed from the database as they arrive (allocations are left empty).
    pub fn stream(
        &mut self,
    ) -> impl Stream<Item = Result<ConsumptionRow, sqlx::Error>> + Send + '_ {
        self.query.build_query_as().fetch(&mut *self.tx)
    }
}

/// A row of the audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct EventRow {
    pub id: i64,
    pub kind: String,
    pub user_id: Option<i64>,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// Which audit events a page covers.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub kind: Option<String>,
    pub user_id: Option<UserId>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

/// One page of the audit log, newest first by id, starting below the id `before`.
#[tracing::instrument(skip_all, fields(limit = limit))]
pub async fn list_events(
    pool: &PgPool,
    filter: &EventFilter,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<EventRow>, sqlx::Error> {
    let mut query =
        QueryBuilder::new("SELECT id, kind, user_id, payload, created_at FROM billing_events");
    let mut glue = Glue::default();
    if let Some(kind) = &filter.kind {
        query.push(glue.next()).push("kind = ");
        query.push_bind(kind.clone());
    }
    if let Some(user_id) = filter.user_id {
        query.push(glue.next()).push("user_id = ");
        query.push_bind(user_id.get());
    }
    if let Some(from) = filter.from {
        query.push(glue.next()).push("created_at >= ");
        query.push_bind(from);
    }
    if let Some(to) = filter.to {
        query.push(glue.next()).push("created_at < ");
        query.push_bind(to);
    }
    if let Some(before) = before {
        query.push(glue.next()).push("id < ");
        query.push_bind(before);
    }
    query.push(" ORDER BY id DESC LIMIT ");
    query.push_bind(limit);
    query.build_query_as().fetch_all(pool).await
}
