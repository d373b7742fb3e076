//! Read-only queries behind the reports: consumption lists, statistics, exports, the audit log.
//!
//! The queries are built here, for either backend: filters are appended with
//! `QueryBuilder::push_bind`, so a value from a query string never becomes SQL text; the only
//! text pushed is fixed fragments of this module and of the backends' report modules. Queries
//! that read more than one statement (a page and its allocations, groups and their totals, an
//! export and its row count) read one snapshot, so the parts agree even while deductions and
//! refunds commit.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::{Database, Encode, QueryBuilder, Type};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

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
    fn push_where<DB: Database>(&self, query: &mut QueryBuilder<DB>) -> Glue
    where
        i64: for<'t> Encode<'t, DB> + Type<DB>,
        String: for<'t> Encode<'t, DB> + Type<DB>,
        DateTime<Utc>: for<'t> Encode<'t, DB> + Type<DB>,
    {
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

pub(crate) const CONSUMPTION_COLUMNS: &str = "SELECT id, user_id, action_key, quantity, unit_cost, \
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

const SUMS_COLUMNS: &str = "CAST(COUNT(*) AS BIGINT) AS records, \
    CAST(COALESCE(SUM(credits_cost), 0) AS BIGINT) AS credits, \
    CAST(COALESCE(SUM(refunded_credits), 0) AS BIGINT) AS refunded_credits, \
    CAST(COALESCE(SUM(credits_cost - refunded_credits), 0) AS BIGINT) AS net_credits, \
    CAST(COUNT(DISTINCT user_id) AS BIGINT) AS distinct_users";

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

/// The query of one page of consumption records, newest first (`created_at DESC, id DESC`),
/// after the keyset position `after`.
pub(crate) fn consumption_page_query<DB: Database>(
    filter: &ConsumptionFilter,
    after: Option<(DateTime<Utc>, i64)>,
    limit: i64,
) -> QueryBuilder<DB>
where
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    String: for<'t> Encode<'t, DB> + Type<DB>,
    DateTime<Utc>: for<'t> Encode<'t, DB> + Type<DB>,
{
    let mut query = QueryBuilder::new(CONSUMPTION_COLUMNS);
    let mut glue = filter.push_where(&mut query);
    if let Some((at, id)) = after {
        query.push(glue.next()).push("(created_at, id) < (");
        query.push_bind(at).push(", ").push_bind(id).push(")");
    }
    query.push(" ORDER BY created_at DESC, id DESC LIMIT ");
    query.push_bind(limit);
    query
}

/// Hands each allocation to its row of the page.
pub(crate) fn attach(rows: &mut [ConsumptionRow], allocations: Vec<AllocationRow>) {
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
}

/// The SQL of a statistics group's key in one backend: the UTC date of `created_at` (as
/// `day`) and a null `action_key`, or the other way round.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupKeys {
    pub by_day: &'static str,
    pub by_action_key: &'static str,
}

/// The statistics' queries: the groups (at most `groups_max`, in report order), and the totals
/// over the whole filter.
pub(crate) fn statistics_queries<DB: Database>(
    filter: &ConsumptionFilter,
    group_by: GroupBy,
    groups_max: i64,
    keys: &GroupKeys,
) -> (QueryBuilder<DB>, QueryBuilder<DB>)
where
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    String: for<'t> Encode<'t, DB> + Type<DB>,
    DateTime<Utc>: for<'t> Encode<'t, DB> + Type<DB>,
{
    let (key_columns, group_and_order) = match group_by {
        GroupBy::Day => (keys.by_day, " GROUP BY 1 ORDER BY 1 ASC"),
        GroupBy::ActionKey => (
            keys.by_action_key,
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
    (groups_query, totals_query)
}

/// Counts the rows of an export, stopping at `rows_max + 1` so a huge table is not counted to
/// its end.
pub(crate) fn export_count_query<DB: Database>(
    filter: &ConsumptionFilter,
    rows_max: i64,
) -> QueryBuilder<DB>
where
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    String: for<'t> Encode<'t, DB> + Type<DB>,
    DateTime<Utc>: for<'t> Encode<'t, DB> + Type<DB>,
{
    let mut query = QueryBuilder::new(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM (SELECT 1 FROM consumption_records",
    );
    filter.push_where(&mut query);
    query.push(" LIMIT ");
    query.push_bind(rows_max.saturating_add(1));
    query.push(") AS bounded");
    query
}

/// The rows of an export, newest first.
pub(crate) fn export_query<DB: Database>(
    filter: &ConsumptionFilter,
    rows_max: i64,
) -> QueryBuilder<DB>
where
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    String: for<'t> Encode<'t, DB> + Type<DB>,
    DateTime<Utc>: for<'t> Encode<'t, DB> + Type<DB>,
{
    let mut query = QueryBuilder::new(CONSUMPTION_COLUMNS);
    filter.push_where(&mut query);
    query.push(" ORDER BY created_at DESC, id DESC LIMIT ");
    query.push_bind(rows_max);
    query
}

/// Rows an export's reader holds before it waits for the response to take them.
pub(crate) const EXPORT_ROWS_BUFFERED: usize = 512;

/// A consumption export: the rows counted when it opened, and a stream of exactly those rows
/// (allocations left empty), newest first. A task holds the snapshot the rows are read from
/// until the stream ends or is dropped.
pub struct ConsumptionExport {
    /// Rows the export will stream.
    pub rows: i64,
    stream: ReceiverStream<Result<ConsumptionRow, sqlx::Error>>,
}

impl ConsumptionExport {
    pub(crate) fn new(
        rows: i64,
        receiver: mpsc::Receiver<Result<ConsumptionRow, sqlx::Error>>,
    ) -> ConsumptionExport {
        ConsumptionExport {
            rows,
            stream: ReceiverStream::new(receiver),
        }
    }

    /// The rows, as the database yields them.
    pub fn stream(&mut self) -> &mut ReceiverStream<Result<ConsumptionRow, sqlx::Error>> {
        &mut self.stream
    }
}

/// One page of the audit log, newest first by id, below the id `before`.
pub(crate) fn events_query<DB: Database>(
    filter: &EventFilter,
    before: Option<i64>,
    limit: i64,
) -> QueryBuilder<DB>
where
    i64: for<'t> Encode<'t, DB> + Type<DB>,
    String: for<'t> Encode<'t, DB> + Type<DB>,
    DateTime<Utc>: for<'t> Encode<'t, DB> + Type<DB>,
{
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
    query
}
