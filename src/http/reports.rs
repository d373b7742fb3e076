//! Read-only reports: consumption lists, statistics and CSV export, the audit log, and the
//! user's own consumption history.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::AppState;
use super::auth::Principal;
use super::error::{ApiError, ErrorBody};
use super::query::{List, Params, TimeRange, id_cursor, time_id_cursor};
use crate::store::reports::{
    ConsumptionExport, ConsumptionFilter, ConsumptionRow, EventFilter, EventRow, GroupBy,
    StatisticsGroup, StatisticsSums,
};

/// Most groups a statistics answer holds. A `group_by=day` range given with both ends may span
/// at most this many UTC days (else `422` on `to`); an open range whose data spans more
/// answers the first groups in report order with `"truncated": true`. The totals always cover
/// the whole range.
pub const STATISTICS_GROUPS_MAX: i64 = 1_000;

/// Most rows one CSV export holds. A filter matching more is refused up front (`422` on
/// `from`: narrow the time range) rather than cut short.
pub const EXPORT_ROWS_MAX: i64 = 1_000_000;
/// CSV rows encoded into one chunk of the response body.
const EXPORT_CHUNK_ROWS: usize = 500;
/// Chunks buffered between the database reader and the client: a slow client holds at most
/// this many chunks in memory before the reader waits for it.
const EXPORT_CHUNKS_BUFFERED: usize = 4;
/// Exports running at once per engine. Each holds a pooled connection (and a snapshot) for as
/// long as its client reads, so they are capped to leave the pool to the deduct path; one more
/// is `503 overloaded`.
const EXPORTS_CONCURRENT_MAX: usize = 2;
/// The columns of the CSV export, in order.
const EXPORT_COLUMNS: [&str; 13] = [
    "id",
    "user_id",
    "action_key",
    "quantity",
    "unit_cost",
    "credits_cost",
    "price_version",
    "idempotency_key",
    "status",
    "refunded_credits",
    "forfeited_credits",
    "created_at",
    "metadata",
];

/// Longest `kind` of the audit log, as the table's CHECK allows.
const EVENT_KIND_CHARS_MAX: usize = 64;

/// Routes of the admin surface (behind `require_admin`).
pub fn admin_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(admin_consumption))
        .routes(routes!(consumption_statistics))
        .routes(routes!(consumption_export))
        .routes(routes!(events))
        .layer(Extension(ExportSlots(Arc::new(Semaphore::new(
            EXPORTS_CONCURRENT_MAX,
        )))))
}

/// The running exports of one router (one engine): a permit each.
#[derive(Clone)]
pub struct ExportSlots(Arc<Semaphore>);

/// Routes of the user surface (behind `require_user`).
pub fn user_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(user_consumption))
}

/// The consumption filters every admin consumption report shares.
fn admin_consumption_filter(params: &Params) -> Result<ConsumptionFilter, ApiError> {
    let TimeRange { from, to } = params.time_range()?;
    Ok(ConsumptionFilter {
        user_id: params.user_id("user_id")?,
        action_key: params.action_key("action_key")?,
        status: params.one_of("status", &["completed", "refunded"])?,
        from,
        to,
    })
}

/// `GET /api/admin/billing/consumption`: every user's consumption records, newest first.
#[utoipa::path(
    get,
    path = "/api/admin/billing/consumption",
    tag = "admin",
    security(("jwt" = [])),
    params(
        ("user_id" = Option<i64>, Query, description = "Only this user's records"),
        ("action_key" = Option<String>, Query, description = "Only this action"),
        ("status" = Option<String>, Query, description = "completed or refunded"),
        ("from" = Option<String>, Query, description = "RFC 3339, inclusive"),
        ("to" = Option<String>, Query, description = "RFC 3339, exclusive"),
        ("limit" = Option<i64>, Query, description = "Items per page, 1-500 (default 50)"),
        ("cursor" = Option<String>, Query, description = "The `next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of consumption records, newest first", body = List<ConsumptionRow>),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The token is not an admin's", body = ErrorBody),
        (status = 422, description = "`invalid_field` naming the parameter", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all)]
pub async fn admin_consumption(
    State(state): State<AppState>,
    params: Params,
) -> Result<Json<List<ConsumptionRow>>, ApiError> {
    params.allow(&[
        "user_id",
        "action_key",
        "status",
        "from",
        "to",
        "limit",
        "cursor",
    ])?;
    let filter = admin_consumption_filter(&params)?;
    consumption_page(&state, &params, &filter).await
}

/// `GET /api/user/billing/consumption`: the token's own consumption records, newest first.
/// There is no `user_id` parameter: a user cannot ask for anyone else's records.
#[utoipa::path(
    get,
    path = "/api/user/billing/consumption",
    tag = "user",
    security(("jwt" = [])),
    params(
        ("action_key" = Option<String>, Query, description = "Only this action"),
        ("from" = Option<String>, Query, description = "RFC 3339, inclusive"),
        ("to" = Option<String>, Query, description = "RFC 3339, exclusive"),
        ("limit" = Option<i64>, Query, description = "Items per page, 1-500 (default 50)"),
        ("cursor" = Option<String>, Query, description = "The `next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of the token's user's records, newest first", body = List<ConsumptionRow>),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 422, description = "`invalid_field` naming the parameter", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all, fields(user_id = principal.user_id.get()))]
pub async fn user_consumption(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    params: Params,
) -> Result<Json<List<ConsumptionRow>>, ApiError> {
    params.allow(&["action_key", "from", "to", "limit", "cursor"])?;
    let TimeRange { from, to } = params.time_range()?;
    let filter = ConsumptionFilter {
        user_id: Some(principal.user_id),
        action_key: params.action_key("action_key")?,
        status: None,
        from,
        to,
    };
    consumption_page(&state, &params, &filter).await
}

async fn consumption_page(
    state: &AppState,
    params: &Params,
    filter: &ConsumptionFilter,
) -> Result<Json<List<ConsumptionRow>>, ApiError> {
    let page = params.page()?;
    let after = page.time_id()?;
    let rows = state
        .db
        .list_consumption(filter, after, page.fetch_limit())
        .await?;
    Ok(Json(page.finish(rows, |row| {
        time_id_cursor(row.created_at, row.id)
    })))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StatisticsAnswer {
    group_by: &'static str,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    items: Vec<StatisticsGroup>,
    /// More groups matched than `STATISTICS_GROUPS_MAX`; `items` holds the first of them.
    truncated: bool,
    totals: StatisticsSums,
}

/// `GET /api/admin/billing/consumption/statistics`: records, credits, refunds and distinct
/// users per UTC day (ascending) or per action (most credits first), with totals over the
/// whole range. At most [`STATISTICS_GROUPS_MAX`] groups.
#[utoipa::path(
    get,
    path = "/api/admin/billing/consumption/statistics",
    tag = "admin",
    security(("jwt" = [])),
    params(
        ("group_by" = Option<String>, Query, description = "day (default) or action"),
        ("user_id" = Option<i64>, Query, description = "Only this user's records"),
        ("action_key" = Option<String>, Query, description = "Only this action"),
        ("from" = Option<String>, Query, description = "RFC 3339, inclusive"),
        ("to" = Option<String>, Query, description = "RFC 3339, exclusive"),
    ),
    responses(
        (status = 200, description = "Groups and totals", body = StatisticsAnswer),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The token is not an admin's", body = ErrorBody),
        (status = 422, description = "`invalid_field` naming the parameter", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all)]
pub async fn consumption_statistics(
    State(state): State<AppState>,
    params: Params,
) -> Result<Json<StatisticsAnswer>, ApiError> {
    params.allow(&["group_by", "user_id", "action_key", "from", "to"])?;
    let (group_by, group_by_name) = match params.one_of("group_by", &["day", "action"])? {
        Some(name) if name == "action" => (GroupBy::ActionKey, "action"),
        _ => (GroupBy::Day, "day"),
    };
    let TimeRange { from, to } = params.time_range()?;
    if let (GroupBy::Day, Some(from), Some(to)) = (group_by, from, to) {
        let days = days_touched(from, to);
        if days > STATISTICS_GROUPS_MAX {
            return Err(ApiError::invalid_field(
                "to",
                format!(
                    "the range spans {days} days; group_by=day answers at most \
                     {STATISTICS_GROUPS_MAX} days"
                ),
            ));
        }
    }
    let filter = ConsumptionFilter {
        user_id: params.user_id("user_id")?,
        action_key: params.action_key("action_key")?,
        status: None,
        from,
        to,
    };
    let (mut items, totals) = state
        .db
        .consumption_statistics(&filter, group_by, STATISTICS_GROUPS_MAX + 1)
        .await?;
    let truncated = items.len() as i64 > STATISTICS_GROUPS_MAX;
    items.truncate(usize::try_from(STATISTICS_GROUPS_MAX).unwrap_or(usize::MAX));
    Ok(Json(StatisticsAnswer {
        group_by: group_by_name,
        from,
        to,
        items,
        truncated,
        totals,
    }))
}

/// The UTC dates that `[from, to)` touches (`from < to`, checked by `time_range`).
fn days_touched(from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
    let last = to - chrono::Duration::microseconds(1);
    (last.date_naive() - from.date_naive()).num_days() + 1
}

/// `GET /api/admin/billing/consumption/export`: the records of the list's filters as CSV,
/// newest first, streamed as the database yields them. At most [`EXPORT_ROWS_MAX`] rows.
#[utoipa::path(
    get,
    path = "/api/admin/billing/consumption/export",
    tag = "admin",
    security(("jwt" = [])),
    params(
        ("user_id" = Option<i64>, Query, description = "Only this user's records"),
        ("action_key" = Option<String>, Query, description = "Only this action"),
        ("status" = Option<String>, Query, description = "completed or refunded"),
        ("from" = Option<String>, Query, description = "RFC 3339, inclusive"),
        ("to" = Option<String>, Query, description = "RFC 3339, exclusive"),
    ),
    responses(
        (status = 200, description = "CSV with a header row", content_type = "text/csv", body = String),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The token is not an admin's", body = ErrorBody),
        (status = 422, description = "`invalid_field` naming the parameter", body = ErrorBody),
        (status = 503, description = "`overloaded` (too many exports) or `unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all)]
pub async fn consumption_export(
    State(state): State<AppState>,
    Extension(ExportSlots(slots)): Extension<ExportSlots>,
    params: Params,
) -> Result<Response, ApiError> {
    params.allow(&["user_id", "action_key", "status", "from", "to"])?;
    let filter = admin_consumption_filter(&params)?;
    let slot = slots.try_acquire_owned().map_err(|_| {
        ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!("{EXPORTS_CONCURRENT_MAX} exports are already running; retry later"),
        )
        .with("retryable", true)
    })?;
    let export = state
        .db
        .open_export(&filter, EXPORT_ROWS_MAX)
        .await?
        .ok_or_else(|| {
            ApiError::invalid_field(
                "from",
                format!(
                    "more than {EXPORT_ROWS_MAX} records match; narrow the time range or \
                     the filters"
                ),
            )
            .with("rows_max", EXPORT_ROWS_MAX)
        })?;
    tracing::info!(rows = export.rows, "consumption export starts");
    let (sender, receiver) = mpsc::channel(EXPORT_CHUNKS_BUFFERED);
    // The task logs in this request's span, so a mid-stream failure is traced to its export.
    tokio::spawn(write_export(export, sender, slot).instrument(tracing::Span::current()));
    let headers = [
        (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
        (
            header::CONTENT_DISPOSITION,
            "attachment; filename=\"consumption.csv\"",
        ),
    ];
    Ok((headers, Body::from_stream(ReceiverStream::new(receiver))).into_response())
}

type Chunk = Result<Bytes, std::io::Error>;

/// One CSV row of the export. Field order is `EXPORT_COLUMNS`.
#[derive(Serialize)]
struct CsvRow<'a> {
    id: i64,
    user_id: i64,
    action_key: &'a str,
    quantity: i64,
    unit_cost: i64,
    credits_cost: i64,
    price_version: i64,
    idempotency_key: Option<&'a str>,
    status: &'a str,
    refunded_credits: i64,
    forfeited_credits: i64,
    created_at: String,
    /// Compact JSON text; empty when the record has no metadata.
    metadata: String,
}

impl<'a> CsvRow<'a> {
    fn of(row: &'a ConsumptionRow) -> CsvRow<'a> {
        CsvRow {
            id: row.id,
            user_id: row.user_id,
            action_key: &row.action_key,
            quantity: row.quantity,
            unit_cost: row.unit_cost,
            credits_cost: row.credits_cost,
            price_version: row.price_version,
            idempotency_key: row.idempotency_key.as_deref(),
            status: &row.status,
            refunded_credits: row.refunded_credits,
            forfeited_credits: row.forfeited_credits,
            created_at: row.created_at.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            metadata: row
                .metadata
                .as_ref()
                .map(serde_json::Value::to_string)
                .unwrap_or_default(),
        }
    }
}

/// Reads the export's rows and sends them as CSV chunks until the rows end, the client goes
/// away (the receiver is dropped), or an error ends the body with an error: the client then
/// sees a truncated transfer rather than a file that looks complete.
/// `_slot` is held until the export ends.
async fn write_export(
    mut export: ConsumptionExport,
    sender: mpsc::Sender<Chunk>,
    _slot: OwnedSemaphorePermit,
) {
    match encode_export(&mut export, &sender).await {
        Ok(Sent::All { rows }) => tracing::info!(rows, "consumption export done"),
        Ok(Sent::ClientGone { rows }) => {
            tracing::info!(rows, "consumption export abandoned by the client")
        }
        Err(error) => {
            tracing::error!(%error, "consumption export failed mid-stream");
            // Ignored: if the client is gone there is nobody left to tell.
            let _ = sender
                .send(Err(std::io::Error::other("the export failed; retry")))
                .await;
        }
    }
}

enum Sent {
    All { rows: u64 },
    ClientGone { rows: u64 },
}

#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("csv: {0}")]
    Csv(#[from] csv::Error),
    #[error("csv buffer: {0}")]
    Io(#[from] std::io::Error),
}

async fn encode_export(
    export: &mut ConsumptionExport,
    sender: &mpsc::Sender<Chunk>,
) -> Result<Sent, ExportError> {
    let mut csv = csv_writer();
    csv.write_record(EXPORT_COLUMNS)?;
    let rows = export.stream();
    let mut sent: u64 = 0;
    let mut in_chunk: usize = 0;
    while let Some(row) = rows.next().await {
        let row = row?;
        csv.serialize(CsvRow::of(&row))?;
        in_chunk += 1;
        if in_chunk == EXPORT_CHUNK_ROWS {
            if !send_chunk(&mut csv, sender).await? {
                return Ok(Sent::ClientGone { rows: sent });
            }
            sent += in_chunk as u64;
            in_chunk = 0;
        }
    }
    if !send_chunk(&mut csv, sender).await? {
        return Ok(Sent::ClientGone { rows: sent });
    }
    Ok(Sent::All {
        rows: sent + in_chunk as u64,
    })
}

/// Sends what the writer holds and leaves a fresh writer in its place; `false` when the
/// client has gone away.
async fn send_chunk(
    csv: &mut csv::Writer<Vec<u8>>,
    sender: &mpsc::Sender<Chunk>,
) -> Result<bool, ExportError> {
    let full = std::mem::replace(csv, csv_writer());
    let chunk = full.into_inner().map_err(|error| error.into_error())?;
    Ok(sender.send(Ok(Bytes::from(chunk))).await.is_ok())
}

fn csv_writer() -> csv::Writer<Vec<u8>> {
    csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(Vec::new())
}

/// `GET /api/admin/billing/events`: the audit log, newest first.
#[utoipa::path(
    get,
    path = "/api/admin/billing/events",
    tag = "admin",
    security(("jwt" = [])),
    params(
        ("kind" = Option<String>, Query, description = "An event kind, for example billing_credits_deduct"),
        ("user_id" = Option<i64>, Query, description = "Only this user's events"),
        ("from" = Option<String>, Query, description = "RFC 3339, inclusive"),
        ("to" = Option<String>, Query, description = "RFC 3339, exclusive"),
        ("limit" = Option<i64>, Query, description = "Items per page, 1-500 (default 50)"),
        ("cursor" = Option<String>, Query, description = "The `next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of audit events, newest first", body = List<EventRow>),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The token is not an admin's", body = ErrorBody),
        (status = 422, description = "`invalid_field` naming the parameter", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all)]
pub async fn events(
    State(state): State<AppState>,
    params: Params,
) -> Result<Json<List<EventRow>>, ApiError> {
    params.allow(&["kind", "user_id", "from", "to", "limit", "cursor"])?;
    let kind = params.text("kind").map(event_kind).transpose()?;
    let TimeRange { from, to } = params.time_range()?;
    let filter = EventFilter {
        kind,
        user_id: params.user_id("user_id")?,
        from,
        to,
    };
    let page = params.page()?;
    let before = page.id()?;
    let rows = state
        .db
        .list_events(&filter, before, page.fetch_limit())
        .await?;
    Ok(Json(page.finish(rows, |row| id_cursor(row.id))))
}

/// A `kind` of the audit log: 1-64 characters of `[a-z_]`.
fn event_kind(kind: &str) -> Result<String, ApiError> {
    let valid = kind.len() <= EVENT_KIND_CHARS_MAX
        && kind
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte == b'_');
    if valid {
        Ok(kind.to_owned())
    } else {
        Err(ApiError::invalid_field(
            "kind",
            "must be 1-64 characters of [a-z_]",
        ))
    }
}
