//! Every SQL statement of the engine lives here. `writer` is the batch writer of the deduct path;
//! this module holds the reads and the rare writes (admin assign) that wallets perform directly.

pub mod catalog;
pub mod reconcile;
pub mod reports;
pub mod writer;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool, migrate::MigrateDatabase};
use std::str::FromStr;
use std::time::Duration;

use crate::domain::{
    Balance, ConsumptionId, Credits, Grant, GrantStatus, NewGrant, PackageType, RefundLine, UserId,
    UserPackageId,
};

/// The migrations of the PostgreSQL store, embedded in the binary and applied at start-up.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Connects to PostgreSQL, creating the database if it does not exist yet, and applies the
/// migrations. `pool_max` bounds the connections (the writer holds one while it commits).
pub async fn connect(database_url: &str, pool_max: u32) -> Result<PgPool, sqlx::Error> {
    if !sqlx::Postgres::database_exists(database_url).await? {
        sqlx::Postgres::create_database(database_url).await?;
    }
    let options = PgConnectOptions::from_str(database_url)?
        .application_name(APPLICATION_NAME)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
    let pool = pool_options(pool_max).connect_with(options).await?;
    migrate(&pool).await?;
    Ok(pool)
}

/// The engine's connections' `application_name`, so operators (and tests) can tell them apart
/// in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "credits-engine";

/// How the engine's pool behaves: at most `pool_max` connections, and a request that cannot get
/// one within [`ACQUIRE_TIMEOUT`] (the database is down or saturated) fails with `503`.
pub fn pool_options(pool_max: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(pool_max)
        .acquire_timeout(ACQUIRE_TIMEOUT)
}

/// Longest a query waits for a pooled connection.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::Error> {
    MIGRATOR.run(pool).await.map_err(sqlx::Error::from)
}

/// A row of `action_prices`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ActionPriceRow {
    pub action_key: String,
    pub name: String,
    pub description: Option<String>,
    pub credits_cost: i64,
    pub enabled: bool,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The columns of an [`ActionPriceRow`], for every statement that reads or returns one.
pub(crate) const PRICE_COLUMNS: &str =
    "action_key, name, description, credits_cost, enabled, version, created_at, updated_at";
/// The columns of a [`PackageRow`].
pub(crate) const PACKAGE_COLUMNS: &str = "id, name, description, package_type, credits_amount,
    duration_days, price_cents, currency, priority, visible, assign_to_new_users, sort_order,
    created_at, updated_at, deleted_at";

pub async fn load_action_prices(pool: &PgPool) -> Result<Vec<ActionPriceRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PRICE_COLUMNS} FROM action_prices ORDER BY action_key"
    )))
    .fetch_all(pool)
    .await
}

/// A row of `packages`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct PackageRow {
    pub id: i64,
    pub name: String,
    pub description: Option<String>,
    pub package_type: String,
    pub credits_amount: Option<i64>,
    pub duration_days: Option<i32>,
    pub price_cents: i64,
    pub currency: String,
    pub priority: i32,
    pub visible: bool,
    pub assign_to_new_users: bool,
    pub sort_order: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

pub async fn load_packages(pool: &PgPool) -> Result<Vec<PackageRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PACKAGE_COLUMNS} FROM packages ORDER BY sort_order, id"
    )))
    .fetch_all(pool)
    .await
}

/// A grant as the APIs show it: a row of `user_packages`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct UserPackageRow {
    pub id: i64,
    pub user_id: i64,
    pub package_id: i64,
    pub source: String,
    pub status: String,
    pub priority: i32,
    pub unlimited: bool,
    pub total_credits: i64,
    pub used_credits: i64,
    pub remaining_credits: i64,
    pub expired_credits: i64,
    /// Copied from the package when assigned; a pending grant's validity once activated.
    pub duration_days: Option<i32>,
    pub activated_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub external_ref: Option<String>,
    pub note: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub const USER_PACKAGE_COLUMNS: &str =
    "id, user_id, package_id, source, status, priority, unlimited,
    total_credits, used_credits, remaining_credits, expired_credits, duration_days, activated_at,
    expires_at, external_ref, note, created_at, updated_at";

impl UserPackageRow {
    /// The wallet's view of this row. `None` for a row the database's CHECKs would not allow.
    pub fn to_grant(&self) -> Option<Grant> {
        let status = GrantStatus::parse(&self.status)?;
        let balance = if self.unlimited {
            Balance::Unlimited {
                used: Credits::new(self.used_credits)?,
            }
        } else {
            Balance::Limited {
                total: Credits::new(self.total_credits)?,
                used: Credits::new(self.used_credits)?,
                remaining: Credits::new(self.remaining_credits)?,
                expired: Credits::new(self.expired_credits)?,
            }
        };
        Some(Grant {
            id: UserPackageId(self.id),
            priority: self.priority,
            expires_at: self.expires_at,
            status,
            balance,
        })
    }
}

/// The grants a wallet holds: every grant that can still pay or be paid back into, or be
/// activated. Expired and revoked grants stay in the database only.
pub async fn load_wallet_grants(pool: &PgPool, user_id: UserId) -> Result<Vec<Grant>, sqlx::Error> {
    let rows: Vec<UserPackageRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {USER_PACKAGE_COLUMNS} FROM user_packages
         WHERE user_id = $1 AND status IN ('pending', 'active', 'depleted')"
    )))
    .bind(user_id.get())
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            row.to_grant().ok_or_else(|| {
                sqlx::Error::Protocol(format!("user_packages row {} is malformed", row.id))
            })
        })
        .collect()
}

/// Assigns a grant in one transaction with its `billing_package_assign` event (and
/// `billing_package_activate` when it starts active). The same `external_ref` twice assigns
/// once: the second call returns the first grant and `false`.
pub async fn insert_grant(
    pool: &PgPool,
    user_id: UserId,
    grant: &NewGrant,
    external_ref: Option<&str>,
    note: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(UserPackageRow, bool), sqlx::Error> {
    let mut tx = pool.begin().await?;
    if let Some(row) = insert_grant_in(&mut tx, user_id, grant, external_ref, note, now).await? {
        tx.commit().await?;
        return Ok((row, true));
    }
    tx.rollback().await?;
    let existing: UserPackageRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {USER_PACKAGE_COLUMNS} FROM user_packages WHERE user_id = $1 AND external_ref = $2"
    )))
    .bind(user_id.get())
    .bind(external_ref)
    .fetch_one(pool)
    .await?;
    Ok((existing, false))
}

/// Inserts a grant and its events inside `tx`; `None` when `external_ref` is already taken.
async fn insert_grant_in(
    tx: &mut sqlx::PgConnection,
    user_id: UserId,
    grant: &NewGrant,
    external_ref: Option<&str>,
    note: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Option<UserPackageRow>, sqlx::Error> {
    let inserted: Option<UserPackageRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO user_packages (user_id, package_id, source, status, priority, unlimited,
             total_credits, remaining_credits, duration_days, activated_at, expires_at,
             external_ref, note, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9, $10, $11, $12, $13, $13)
         ON CONFLICT ON CONSTRAINT user_packages_external_ref DO NOTHING
         RETURNING {USER_PACKAGE_COLUMNS}"
    )))
    .bind(user_id.get())
    .bind(grant.package_id.get())
    .bind(grant.source.as_str())
    .bind(grant.status.as_str())
    .bind(grant.priority)
    .bind(grant.unlimited)
    .bind(grant.total_credits.get())
    .bind(grant.duration_days)
    .bind(grant.activated_at)
    .bind(grant.expires_at)
    .bind(external_ref)
    .bind(note)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = inserted else {
        return Ok(None);
    };
    let payload = serde_json::json!({
        "user_package_id": row.id,
        "package_id": row.package_id,
        "source": row.source,
        "status": row.status,
        "total_credits": row.total_credits,
        "unlimited": row.unlimited,
        "expires_at": row.expires_at,
        "external_ref": row.external_ref,
    });
    let mut kinds = vec!["billing_package_assign"];
    if grant.status == GrantStatus::Active {
        kinds.push("billing_package_activate");
    }
    for kind in kinds {
        insert_event(&mut *tx, kind, Some(user_id), &payload, now).await?;
    }
    Ok(Some(row))
}

/// Records the user as registered and assigns `grants` (the new-user packages), all in one
/// transaction. A user registered before gets nothing: `(false, [])`.
pub async fn register_user(
    pool: &PgPool,
    user_id: UserId,
    grants: &[NewGrant],
    now: DateTime<Utc>,
) -> Result<(bool, Vec<UserPackageRow>), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let registered: Option<i64> = sqlx::query_scalar(
        "INSERT INTO user_registrations (user_id, registered_at) VALUES ($1, $2)
         ON CONFLICT (user_id) DO NOTHING RETURNING user_id",
    )
    .bind(user_id.get())
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    if registered.is_none() {
        tx.rollback().await?;
        return Ok((false, Vec::new()));
    }
    let mut rows = Vec::with_capacity(grants.len());
    for grant in grants {
        // One per package and user, whatever else assigned that package before.
        let external_ref = format!("new-user:{}", grant.package_id.get());
        if let Some(row) =
            insert_grant_in(&mut tx, user_id, grant, Some(&external_ref), None, now).await?
        {
            rows.push(row);
        }
    }
    let package_ids: Vec<i64> = rows.iter().map(|row| row.package_id).collect();
    insert_event(
        &mut tx,
        "billing_user_registered",
        Some(user_id),
        &serde_json::json!({ "assigned_package_ids": package_ids }),
        now,
    )
    .await?;
    tx.commit().await?;
    Ok((true, rows))
}

/// A grant's row by its id alone (admin routes name grants by id).
pub async fn find_user_package(
    pool: &PgPool,
    id: UserPackageId,
) -> Result<Option<UserPackageRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {USER_PACKAGE_COLUMNS} FROM user_packages WHERE id = $1"
    )))
    .bind(id.get())
    .fetch_optional(pool)
    .await
}

pub(crate) async fn insert_event(
    tx: &mut sqlx::PgConnection,
    kind: &str,
    user_id: Option<UserId>,
    payload: &serde_json::Value,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO billing_events (kind, user_id, payload, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(kind)
    .bind(user_id.map(UserId::get))
    .bind(payload)
    .bind(now)
    .execute(tx)
    .await?;
    Ok(())
}

/// A committed deduction with its allocations: what a replay answers and a refund starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredConsumption {
    pub id: ConsumptionId,
    pub user_id: UserId,
    pub credits_cost: Credits,
    pub remaining_after: Credits,
    pub request_fingerprint: String,
    pub refunded: bool,
    pub refunded_credits: Credits,
    pub forfeited_credits: Credits,
    pub lines: Vec<RefundLine>,
}

#[derive(sqlx::FromRow)]
struct ConsumptionHead {
    id: i64,
    user_id: i64,
    credits_cost: i64,
    remaining_after: i64,
    request_fingerprint: String,
    status: String,
    refunded_credits: i64,
    forfeited_credits: i64,
}

#[derive(sqlx::FromRow)]
struct AllocationRow {
    user_id: i64,
    consumption_id: i64,
    user_package_id: i64,
    credits: i64,
    refunded_credits: i64,
    forfeited_credits: i64,
}

/// Qualified with `c`, the alias of `consumption_records` wherever these are read.
const CONSUMPTION_HEAD_COLUMNS: &str = "c.id, c.user_id, c.credits_cost, c.remaining_after,
    c.request_fingerprint, c.status, c.refunded_credits, c.forfeited_credits";

fn credits(amount: i64) -> Result<Credits, sqlx::Error> {
    Credits::new(amount).ok_or_else(|| sqlx::Error::Protocol(format!("negative credits {amount}")))
}

fn assemble(
    heads: Vec<ConsumptionHead>,
    allocations: Vec<AllocationRow>,
) -> Result<Vec<StoredConsumption>, sqlx::Error> {
    heads
        .into_iter()
        .map(|head| {
            let lines = allocations
                .iter()
                .filter(|a| a.user_id == head.user_id && a.consumption_id == head.id)
                .map(|a| {
                    Ok(RefundLine {
                        user_package_id: UserPackageId(a.user_package_id),
                        credits: credits(a.credits)?,
                        refunded: credits(a.refunded_credits)?,
                        forfeited: credits(a.forfeited_credits)?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
            Ok(StoredConsumption {
                id: ConsumptionId(head.id),
                user_id: UserId(head.user_id),
                credits_cost: credits(head.credits_cost)?,
                remaining_after: credits(head.remaining_after)?,
                request_fingerprint: head.request_fingerprint,
                refunded: head.status == "refunded",
                refunded_credits: credits(head.refunded_credits)?,
                forfeited_credits: credits(head.forfeited_credits)?,
                lines,
            })
        })
        .collect()
}

async fn allocations_of(
    executor: impl sqlx::PgExecutor<'_>,
    user_ids: &[i64],
    consumption_ids: &[i64],
) -> Result<Vec<AllocationRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.user_id, a.consumption_id, a.user_package_id, a.credits, a.refunded_credits,
                a.forfeited_credits
         FROM consumption_allocations a
         JOIN UNNEST($1::bigint[], $2::bigint[]) AS k(user_id, consumption_id)
           ON a.user_id = k.user_id AND a.consumption_id = k.consumption_id
         ORDER BY a.user_id, a.consumption_id, a.user_package_id",
    )
    .bind(user_ids)
    .bind(consumption_ids)
    .fetch_all(executor)
    .await
}

/// The committed deductions of these (user, idempotency key) pairs, in no particular order.
pub async fn find_consumptions_by_keys(
    conn: &mut sqlx::PgConnection,
    user_ids: &[i64],
    keys: &[&str],
) -> Result<Vec<(String, StoredConsumption)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Keyed {
        idempotency_key: String,
        #[sqlx(flatten)]
        head: ConsumptionHead,
    }
    let rows: Vec<Keyed> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT c.idempotency_key, {CONSUMPTION_HEAD_COLUMNS}
         FROM consumption_records c
         JOIN UNNEST($1::bigint[], $2::text[]) AS k(user_id, idempotency_key)
           ON c.user_id = k.user_id AND c.idempotency_key = k.idempotency_key"
    )))
    .bind(user_ids)
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    let head_users: Vec<i64> = rows.iter().map(|r| r.head.user_id).collect();
    let head_ids: Vec<i64> = rows.iter().map(|r| r.head.id).collect();
    let allocations = allocations_of(&mut *conn, &head_users, &head_ids).await?;
    let keys: Vec<String> = rows.iter().map(|r| r.idempotency_key.clone()).collect();
    let stored = assemble(rows.into_iter().map(|r| r.head).collect(), allocations)?;
    Ok(keys.into_iter().zip(stored).collect())
}

pub async fn find_consumption_by_key(
    pool: &PgPool,
    user_id: UserId,
    key: &str,
) -> Result<Option<StoredConsumption>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let found = find_consumptions_by_keys(&mut conn, &[user_id.get()], &[key]).await?;
    Ok(found.into_iter().next().map(|(_, stored)| stored))
}

pub async fn find_consumption(
    pool: &PgPool,
    user_id: UserId,
    id: ConsumptionId,
) -> Result<Option<StoredConsumption>, sqlx::Error> {
    let head: Option<ConsumptionHead> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {CONSUMPTION_HEAD_COLUMNS} FROM consumption_records c WHERE c.user_id = $1 AND c.id = $2"
    )))
    .bind(user_id.get())
    .bind(id.get())
    .fetch_optional(pool)
    .await?;
    let Some(head) = head else { return Ok(None) };
    let allocations = allocations_of(pool, &[head.user_id], &[head.id]).await?;
    Ok(assemble(vec![head], allocations)?.into_iter().next())
}

/// Whose consumption this is: refunds by id are routed to that user's wallet.
pub async fn find_consumption_owner(
    pool: &PgPool,
    id: ConsumptionId,
) -> Result<Option<UserId>, sqlx::Error> {
    let owner: Option<i64> =
        sqlx::query_scalar("SELECT user_id FROM consumption_records WHERE id = $1")
            .bind(id.get())
            .fetch_optional(pool)
            .await?;
    Ok(owner.map(UserId))
}

/// Parses a stored package type; the database's CHECK makes failure impossible, but a clear
/// error beats a panic if someone edits the schema by hand.
pub fn parse_package_type(text: &str) -> Result<PackageType, sqlx::Error> {
    PackageType::parse(text)
        .ok_or_else(|| sqlx::Error::Protocol(format!("unknown package_type {text}")))
}

/// A grant with its package's name, as lists show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct GrantListRow {
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub grant: UserPackageRow,
    pub package_name: String,
}

/// `USER_PACKAGE_COLUMNS` qualified by a table alias, for joins.
fn grant_columns_of(alias: &str) -> String {
    USER_PACKAGE_COLUMNS
        .split(',')
        .map(|column| format!("{alias}.{}", column.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which grants a list shows.
#[derive(Clone, Debug, Default)]
pub struct GrantFilter {
    pub user_id: Option<UserId>,
    pub package_id: Option<i64>,
    pub status: Option<String>,
}

/// Most grants the credit summary reads for one user.
pub const SUMMARY_GRANTS_MAX: i64 = 1_000;

/// A page of grants, newest first, after the id `before` (exclusive).
pub async fn list_grants(
    pool: &PgPool,
    filter: &GrantFilter,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<GrantListRow>, sqlx::Error> {
    let columns = grant_columns_of("g");
    let mut query = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
        "SELECT {columns}, p.name AS package_name
         FROM user_packages g JOIN packages p ON p.id = g.package_id WHERE true"
    ));
    if let Some(user_id) = filter.user_id {
        query.push(" AND g.user_id = ").push_bind(user_id.get());
    }
    if let Some(package_id) = filter.package_id {
        query.push(" AND g.package_id = ").push_bind(package_id);
    }
    if let Some(status) = &filter.status {
        query.push(" AND g.status = ").push_bind(status.clone());
    }
    if let Some(before) = before {
        query.push(" AND g.id < ").push_bind(before);
    }
    query.push(" ORDER BY g.id DESC LIMIT ").push_bind(limit);
    query.build_query_as().fetch_all(pool).await
}

/// The grants that can pay or be activated (pending, active, depleted), with package names,
/// in id order; at most `SUMMARY_GRANTS_MAX` + 1, so the caller can tell it was cut.
pub async fn live_grants(pool: &PgPool, user_id: UserId) -> Result<Vec<GrantListRow>, sqlx::Error> {
    let columns = grant_columns_of("g");
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {columns}, p.name AS package_name
         FROM user_packages g JOIN packages p ON p.id = g.package_id
         WHERE g.user_id = $1 AND g.status IN ('pending', 'active', 'depleted')
         ORDER BY g.id LIMIT $2"
    )))
    .bind(user_id.get())
    .bind(SUMMARY_GRANTS_MAX + 1)
    .fetch_all(pool)
    .await
}

/// Live grants at or past their expiry, soonest first: the expiry schedule, read through the
/// `user_packages_live_expiry` index (only due rows are touched, not every user).
pub async fn due_expiries(
    pool: &PgPool,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(UserId, UserPackageId)>, sqlx::Error> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT user_id, id FROM user_packages
         WHERE status IN ('active', 'depleted') AND expires_at <= $1
         ORDER BY expires_at, id LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(user_id, id)| (UserId(user_id), UserPackageId(id)))
        .collect())
}
