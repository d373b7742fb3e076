//! Every SQL statement of the engine lives here, behind one trait, [`Store`], with one
//! implementation per backend (as atuin's server does): [`postgres`] for a production deployment
//! and [`sqlite`], the embedded default, a file on the engine's machine. Each has its own
//! migrations folder (`migrations/postgres`, `migrations/sqlite`). The wallet, catalog,
//! supervisor and HTTP code hold a [`Db`] and never know which one runs.
//!
//! [`writer`] is the batch writer of the deduct path, shared by both backends (each supplies its
//! batch statements); the trait holds the reads and the rare writes (admin assign, the catalog)
//! that the rest of the engine performs directly.

pub mod catalog;
pub(crate) mod portable;
pub mod postgres;
pub mod reconcile;
pub mod reports;
pub mod sqlite;
pub mod writer;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::{
    Balance, ConsumptionId, Credits, Grant, GrantStatus, NewGrant, PackageType, RefundLine, UserId,
    UserPackageId,
};
use catalog::{PackageFields, PackageFilter, PackageSort, PriceFields};
use reconcile::{LedgerCheck, OrphanAllocation};
use reports::{
    ConsumptionExport, ConsumptionFilter, ConsumptionRow, EventFilter, EventRow, GroupBy,
    StatisticsGroup, StatisticsSums,
};
use writer::{WriterHandle, WriterLimits};

/// The engine's store, whichever backend it is.
pub type Db = Arc<dyn Store>;

/// Which database a [`Store`] keeps its data in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    /// The backend a database URL names, by its scheme.
    pub fn of_url(database_url: &str) -> Option<Backend> {
        if database_url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if database_url.starts_with("postgres:") || database_url.starts_with("postgresql:") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

/// Connects to the database `database_url` names (`postgres://...` or `sqlite://...`; a
/// `sqlite:` URL names a file, which is created with its directory if missing), applies its
/// migrations and answers the store. `pool_max` bounds the connections.
pub async fn connect(database_url: &str, pool_max: u32) -> Result<Db, sqlx::Error> {
    match Backend::of_url(database_url) {
        Some(Backend::Sqlite) => Ok(Arc::new(
            sqlite::SqliteStore::connect(database_url, pool_max).await?,
        )),
        Some(Backend::Postgres) => Ok(Arc::new(
            postgres::PgStore::connect(database_url, pool_max).await?,
        )),
        None => Err(sqlx::Error::Configuration(
            "DATABASE_URL must start with postgres://, postgresql:// or sqlite:".into(),
        )),
    }
}

/// The connections of a store's pool, for the metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolUsage {
    pub size: u32,
    pub idle: usize,
    pub max: u32,
}

/// The outcome of a read-modify-write of one catalog row (see [`Store::update_action_price`]).
#[derive(Debug)]
pub enum Merged<T> {
    Updated(T),
    /// No such row: nothing was written.
    NotFound,
    /// The merge refused the change: nothing was written.
    Refused,
}

/// Turns the current row into the new fields; `None` refuses the change.
pub type Merge<'a, R, F> = Box<dyn FnOnce(&R) -> Option<F> + Send + 'a>;

/// Everything the engine reads and writes outside the batch writer, in one backend.
///
/// Writes that belong together (a row and its audit event) commit in one transaction. Errors
/// are `sqlx::Error`s, whose `DatabaseError::kind` (unique, check, foreign key) is the same on
/// both backends.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Starts the batch writer's lanes over this store (see `writer::spawn_lanes`).
    fn spawn_writer(
        &self,
        limits: WriterLimits,
        stop: CancellationToken,
        tracker: &TaskTracker,
    ) -> std::io::Result<WriterHandle>;

    /// Answers whether the database answers a trivial query.
    async fn ping(&self) -> Result<(), sqlx::Error>;

    fn pool_usage(&self) -> PoolUsage;

    /// Closes the pool: the writer lanes drain and stop, and no query starts afterwards.
    async fn close(&self);

    // The catalog.
    async fn load_action_prices(&self) -> Result<Vec<ActionPriceRow>, sqlx::Error>;
    async fn load_packages(&self) -> Result<Vec<PackageRow>, sqlx::Error>;
    /// Creates an action price at version 1; `None` when the key is taken.
    async fn insert_action_price(
        &self,
        action_key: &str,
        fields: &PriceFields,
        now: DateTime<Utc>,
    ) -> Result<Option<ActionPriceRow>, sqlx::Error>;
    /// Changes an action price: `merge` turns the current row (locked) into the new fields.
    /// The version goes up by one and a `billing_action_price_update` event records old and new.
    async fn update_action_price(
        &self,
        action_key: &str,
        now: DateTime<Utc>,
        merge: Merge<'_, ActionPriceRow, PriceFields>,
    ) -> Result<Merged<ActionPriceRow>, sqlx::Error>;
    /// Every action price, by key, after `after_key`.
    async fn list_action_prices(
        &self,
        enabled: Option<bool>,
        after_key: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ActionPriceRow>, sqlx::Error>;
    async fn insert_package(
        &self,
        fields: &PackageFields,
        now: DateTime<Utc>,
    ) -> Result<PackageRow, sqlx::Error>;
    /// Changes a package that is not deleted, as [`Store::update_action_price`] does.
    async fn update_package(
        &self,
        id: i64,
        now: DateTime<Utc>,
        merge: Merge<'_, PackageRow, PackageFields>,
    ) -> Result<Merged<PackageRow>, sqlx::Error>;
    /// Soft-deletes a package; `Ok(false)` when there is no such package.
    async fn delete_package(&self, id: i64, now: DateTime<Utc>) -> Result<bool, sqlx::Error>;
    async fn find_package(&self, id: i64) -> Result<Option<PackageRow>, sqlx::Error>;
    /// A page of packages in `sort` order after the keyset position `after` (key, id).
    async fn list_packages(
        &self,
        filter: &PackageFilter,
        sort: PackageSort,
        descending: bool,
        after: Option<(i64, i64)>,
        limit: i64,
    ) -> Result<Vec<PackageRow>, sqlx::Error>;

    // Grants and wallets.
    /// The grants several users' wallets hold, in one query (the grant loader's batches:
    /// wallets that start together load together): every grant that can still pay or be paid
    /// back into, or be activated. Expired and revoked grants stay in the database only. Rows,
    /// not grants, so a malformed row fails only its own user's wallet.
    async fn load_grants_of_wallets(
        &self,
        user_ids: &[UserId],
    ) -> Result<Vec<UserPackageRow>, sqlx::Error>;
    /// Assigns a grant in one transaction with its `billing_package_assign` event (and
    /// `billing_package_activate` when it starts active). The same `external_ref` twice
    /// assigns once: the second call returns the first grant and `false`.
    async fn insert_grant(
        &self,
        user_id: UserId,
        grant: &NewGrant,
        external_ref: Option<&str>,
        note: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(UserPackageRow, bool), sqlx::Error>;
    /// Records the user as registered and assigns `grants` (the new-user packages), all in one
    /// transaction. A user registered before gets nothing: `(false, [])`.
    async fn register_user(
        &self,
        user_id: UserId,
        grants: &[NewGrant],
        now: DateTime<Utc>,
    ) -> Result<(bool, Vec<UserPackageRow>), sqlx::Error>;
    /// A grant's row by its id alone (admin routes name grants by id).
    async fn find_user_package(
        &self,
        id: UserPackageId,
    ) -> Result<Option<UserPackageRow>, sqlx::Error>;
    /// A page of grants, newest first, after the id `before` (exclusive).
    async fn list_grants(
        &self,
        filter: &GrantFilter,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<GrantListRow>, sqlx::Error>;
    /// The grants that can pay or be activated (pending, active, depleted), with package
    /// names, in id order; at most `SUMMARY_GRANTS_MAX` + 1, so the caller can tell it was cut.
    async fn live_grants(&self, user_id: UserId) -> Result<Vec<GrantListRow>, sqlx::Error>;
    /// Live grants at or past their expiry, soonest first: the expiry schedule.
    async fn due_expiries(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<(UserId, UserPackageId)>, sqlx::Error>;

    // Committed deductions.
    async fn find_consumption_by_key(
        &self,
        user_id: UserId,
        key: &str,
    ) -> Result<Option<StoredConsumption>, sqlx::Error>;
    async fn find_consumption(
        &self,
        user_id: UserId,
        id: ConsumptionId,
    ) -> Result<Option<StoredConsumption>, sqlx::Error>;
    /// Whose consumption this is: refunds by id are routed to that user's wallet.
    async fn find_consumption_owner(
        &self,
        id: ConsumptionId,
    ) -> Result<Option<UserId>, sqlx::Error>;

    // Reports: reads only. A report that reads more than one statement reads one snapshot.
    /// One page of consumption records, newest first (`created_at DESC, id DESC`), after the
    /// keyset position `after`, at most `limit` rows, each with its allocations.
    async fn list_consumption(
        &self,
        filter: &ConsumptionFilter,
        after: Option<(DateTime<Utc>, i64)>,
        limit: i64,
    ) -> Result<Vec<ConsumptionRow>, sqlx::Error>;
    /// The groups (at most `groups_max`, in report order) and the totals over the whole filter.
    async fn consumption_statistics(
        &self,
        filter: &ConsumptionFilter,
        group_by: GroupBy,
        groups_max: i64,
    ) -> Result<(Vec<StatisticsGroup>, StatisticsSums), sqlx::Error>;
    /// Counts the rows of `filter` (stopping at `rows_max + 1`) and starts streaming them,
    /// newest first, from the same snapshot. `Ok(None)` when more than `rows_max` rows match.
    async fn open_export(
        &self,
        filter: &ConsumptionFilter,
        rows_max: i64,
    ) -> Result<Option<ConsumptionExport>, sqlx::Error>;
    /// One page of the audit log, newest first by id, below the id `before`.
    async fn list_events(
        &self,
        filter: &EventFilter,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<EventRow>, sqlx::Error>;

    // Reconciliation (see [`reconcile`] for the formula): reads, and the events it writes.
    async fn ledger_mismatches(&self, max: usize) -> Result<LedgerCheck, sqlx::Error>;
    /// At most `max` orphaned allocations, and whether there are more.
    async fn orphan_allocations(
        &self,
        max: usize,
    ) -> Result<(Vec<OrphanAllocation>, bool), sqlx::Error>;
    /// Writes one `billing_reconciliation_mismatch` event per (user, payload).
    async fn insert_mismatch_events(
        &self,
        events: &[(i64, serde_json::Value)],
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error>;
}

/// [`Store::update_action_price`] with a merge that may refuse with the caller's own error:
/// `Ok(None)` when there is no such action.
pub async fn update_action_price<E: From<sqlx::Error> + Send>(
    db: &dyn Store,
    action_key: &str,
    now: DateTime<Utc>,
    merge: impl FnOnce(&ActionPriceRow) -> Result<PriceFields, E> + Send,
) -> Result<Option<ActionPriceRow>, E> {
    let mut refused = None;
    let merged = db
        .update_action_price(
            action_key,
            now,
            Box::new(|row| keep_refusal(&mut refused, merge(row))),
        )
        .await?;
    merged.resolve(refused)
}

/// [`Store::update_package`] with a merge that may refuse with the caller's own error:
/// `Ok(None)` when there is no such package (or it is deleted).
pub async fn update_package<E: From<sqlx::Error> + Send>(
    db: &dyn Store,
    id: i64,
    now: DateTime<Utc>,
    merge: impl FnOnce(&PackageRow) -> Result<PackageFields, E> + Send,
) -> Result<Option<PackageRow>, E> {
    let mut refused = None;
    let merged = db
        .update_package(
            id,
            now,
            Box::new(|row| keep_refusal(&mut refused, merge(row))),
        )
        .await?;
    merged.resolve(refused)
}

fn keep_refusal<F, E>(refused: &mut Option<E>, merged: Result<F, E>) -> Option<F> {
    merged.map_err(|error| *refused = Some(error)).ok()
}

impl<T> Merged<T> {
    fn resolve<E: From<sqlx::Error>>(self, refused: Option<E>) -> Result<Option<T>, E> {
        match (self, refused) {
            (Merged::Updated(row), _) => Ok(Some(row)),
            (Merged::NotFound, _) => Ok(None),
            (Merged::Refused, Some(error)) => Err(error),
            (Merged::Refused, None) => Err(E::from(sqlx::Error::Protocol(
                "a catalog merge refused without a reason".into(),
            ))),
        }
    }
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
    /// [`UserPackageRow::to_grant`] for a wallet's load: an error names the malformed row.
    pub fn to_wallet_grant(&self) -> Result<Grant, sqlx::Error> {
        self.to_grant().ok_or_else(|| {
            sqlx::Error::Protocol(format!("user_packages row {} is malformed", self.id))
        })
    }

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
pub(crate) struct ConsumptionHead {
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
pub(crate) struct AllocationRow {
    user_id: i64,
    consumption_id: i64,
    user_package_id: i64,
    credits: i64,
    refunded_credits: i64,
    forfeited_credits: i64,
}

/// A consumption's head with one of its allocations, or with none (`line_*` all `NULL`) when
/// it has no allocation: one row of [`CONSUMPTION_LINES`].
#[derive(sqlx::FromRow)]
pub(crate) struct ConsumptionLineRow {
    #[sqlx(flatten)]
    head: ConsumptionHead,
    line_grant: Option<i64>,
    line_credits: Option<i64>,
    line_refunded: Option<i64>,
    line_forfeited: Option<i64>,
}

/// With [`CONSUMPTION_HEAD_COLUMNS`] before it, a consumption and its allocations in one read:
/// one row per allocation (one row without an allocation for a deduction that drew nothing).
pub(crate) const CONSUMPTION_LINES: &str = "a.user_package_id AS line_grant,
        a.credits AS line_credits, a.refunded_credits AS line_refunded,
        a.forfeited_credits AS line_forfeited
    FROM consumption_records c
    LEFT JOIN consumption_allocations a ON a.user_id = c.user_id AND a.consumption_id = c.id";

/// The one consumption that rows of [`CONSUMPTION_LINES`] describe, or `None` without rows.
pub(crate) fn assemble_lines(
    rows: Vec<ConsumptionLineRow>,
) -> Result<Option<StoredConsumption>, sqlx::Error> {
    let mut allocations = Vec::with_capacity(rows.len());
    let mut head = None;
    for row in rows {
        if let (Some(user_package_id), Some(credits), Some(refunded), Some(forfeited)) = (
            row.line_grant,
            row.line_credits,
            row.line_refunded,
            row.line_forfeited,
        ) {
            allocations.push(AllocationRow {
                user_id: row.head.user_id,
                consumption_id: row.head.id,
                user_package_id,
                credits,
                refunded_credits: refunded,
                forfeited_credits: forfeited,
            });
        }
        head.get_or_insert(row.head);
    }
    let Some(head) = head else { return Ok(None) };
    Ok(assemble(vec![head], allocations)?.into_iter().next())
}

/// Qualified with `c`, the alias of `consumption_records` wherever these are read.
pub(crate) const CONSUMPTION_HEAD_COLUMNS: &str =
    "c.id, c.user_id, c.credits_cost, c.remaining_after,
    c.request_fingerprint, c.status, c.refunded_credits, c.forfeited_credits";

pub(crate) fn credits(amount: i64) -> Result<Credits, sqlx::Error> {
    Credits::new(amount).ok_or_else(|| sqlx::Error::Protocol(format!("negative credits {amount}")))
}

pub(crate) fn assemble(
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
pub(crate) fn grant_columns_of(alias: &str) -> String {
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

/// Longest a query waits for a pooled connection: a request that cannot get one in time (the
/// database is down or saturated) fails with `503`.
pub const ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
