//! The PostgreSQL store: for several engine nodes, a large history, and the operations
//! tooling (backups, replicas, `psql`) a production deployment has. `batch` holds the batch
//! writer's statements.

pub(crate) mod batch;
mod reconcile;

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool, Postgres, migrate::MigrateDatabase};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::catalog::{PackageFields, PackageFilter, PackageSort, PriceFields};
use super::portable::{POSTGRES, Portable};
use super::reconcile::{LedgerCheck, OrphanAllocation};
use super::reports::{
    ConsumptionExport, ConsumptionFilter, ConsumptionRow, EventFilter, EventRow, GroupBy,
    StatisticsGroup, StatisticsSums,
};
use super::writer::{self, WriterHandle, WriterLimits};
use super::{
    ACQUIRE_TIMEOUT, ActionPriceRow, CONSUMPTION_HEAD_COLUMNS, CONSUMPTION_LINES,
    ConsumptionLineRow, Db, GrantFilter, GrantListRow, Merge, Merged, PackageRow, PoolUsage, Store,
    StoredConsumption, UserPackageRow, assemble_lines,
};
use crate::domain::{ConsumptionId, NewGrant, UserId, UserPackageId};

/// The PostgreSQL store over its pool.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects (see [`connect`]).
    pub async fn connect(database_url: &str, pool_max: u32) -> Result<PgStore, sqlx::Error> {
        Ok(PgStore::new(connect(database_url, pool_max).await?))
    }

    /// A store over an existing pool, whose database is migrated (tests make theirs with
    /// `#[sqlx::test]`).
    pub fn new(pool: PgPool) -> PgStore {
        PgStore { pool }
    }

    /// A [`Db`] over an existing, migrated pool.
    pub fn db(pool: PgPool) -> Db {
        std::sync::Arc::new(PgStore::new(pool))
    }
}

#[async_trait]
impl Store for PgStore {
    fn spawn_writer(
        &self,
        limits: WriterLimits,
        stop: CancellationToken,
        tracker: &TaskTracker,
    ) -> std::io::Result<WriterHandle> {
        writer::spawn_lanes::<batch::PgBatch>(self.pool.clone(), limits, stop, tracker)
    }

    async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(drop)
    }

    fn pool_usage(&self) -> PoolUsage {
        PoolUsage {
            size: self.pool.size(),
            idle: self.pool.num_idle(),
            max: self.pool.options().get_max_connections(),
        }
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn load_action_prices(&self) -> Result<Vec<ActionPriceRow>, sqlx::Error> {
        Portable::<Postgres>::load_action_prices(&self.pool).await
    }

    async fn load_packages(&self) -> Result<Vec<PackageRow>, sqlx::Error> {
        Portable::<Postgres>::load_packages(&self.pool).await
    }

    async fn insert_action_price(
        &self,
        action_key: &str,
        fields: &PriceFields,
        now: DateTime<Utc>,
    ) -> Result<Option<ActionPriceRow>, sqlx::Error> {
        Portable::<Postgres>::insert_action_price(&self.pool, &POSTGRES, action_key, fields, now)
            .await
    }

    async fn update_action_price(
        &self,
        action_key: &str,
        now: DateTime<Utc>,
        merge: Merge<'_, ActionPriceRow, PriceFields>,
    ) -> Result<Merged<ActionPriceRow>, sqlx::Error> {
        Portable::<Postgres>::update_action_price(&self.pool, &POSTGRES, action_key, now, merge)
            .await
    }

    async fn list_action_prices(
        &self,
        enabled: Option<bool>,
        after_key: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ActionPriceRow>, sqlx::Error> {
        Portable::<Postgres>::list_action_prices(&self.pool, enabled, after_key, limit).await
    }

    async fn insert_package(
        &self,
        fields: &PackageFields,
        now: DateTime<Utc>,
    ) -> Result<PackageRow, sqlx::Error> {
        Portable::<Postgres>::insert_package(&self.pool, &POSTGRES, fields, now).await
    }

    async fn update_package(
        &self,
        id: i64,
        now: DateTime<Utc>,
        merge: Merge<'_, PackageRow, PackageFields>,
    ) -> Result<Merged<PackageRow>, sqlx::Error> {
        Portable::<Postgres>::update_package(&self.pool, &POSTGRES, id, now, merge).await
    }

    async fn delete_package(&self, id: i64, now: DateTime<Utc>) -> Result<bool, sqlx::Error> {
        Portable::<Postgres>::delete_package(&self.pool, &POSTGRES, id, now).await
    }

    async fn find_package(&self, id: i64) -> Result<Option<PackageRow>, sqlx::Error> {
        Portable::<Postgres>::find_package(&self.pool, id).await
    }

    async fn list_packages(
        &self,
        filter: &PackageFilter,
        sort: PackageSort,
        descending: bool,
        after: Option<(i64, i64)>,
        limit: i64,
    ) -> Result<Vec<PackageRow>, sqlx::Error> {
        Portable::<Postgres>::list_packages(&self.pool, filter, sort, descending, after, limit)
            .await
    }

    async fn load_grants_of_wallets(
        &self,
        user_ids: &[UserId],
    ) -> Result<Vec<UserPackageRow>, sqlx::Error> {
        let ids: Vec<i64> = user_ids.iter().map(|user_id| user_id.get()).collect();
        Portable::<Postgres>::load_grants_of_wallets(&self.pool, "= ANY($1)", ids).await
    }

    async fn insert_grant(
        &self,
        user_id: UserId,
        grant: &NewGrant,
        external_ref: Option<&str>,
        note: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(UserPackageRow, bool), sqlx::Error> {
        Portable::<Postgres>::insert_grant(
            &self.pool,
            &POSTGRES,
            user_id,
            grant,
            external_ref,
            note,
            now,
        )
        .await
    }

    async fn register_user(
        &self,
        user_id: UserId,
        grants: &[NewGrant],
        now: DateTime<Utc>,
    ) -> Result<(bool, Vec<UserPackageRow>), sqlx::Error> {
        Portable::<Postgres>::register_user(&self.pool, &POSTGRES, user_id, grants, now).await
    }

    async fn find_user_package(
        &self,
        id: UserPackageId,
    ) -> Result<Option<UserPackageRow>, sqlx::Error> {
        Portable::<Postgres>::find_user_package(&self.pool, id).await
    }

    async fn list_grants(
        &self,
        filter: &GrantFilter,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<GrantListRow>, sqlx::Error> {
        Portable::<Postgres>::list_grants(&self.pool, filter, before, limit).await
    }

    async fn live_grants(&self, user_id: UserId) -> Result<Vec<GrantListRow>, sqlx::Error> {
        Portable::<Postgres>::live_grants(&self.pool, user_id).await
    }

    async fn due_expiries(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<(UserId, UserPackageId)>, sqlx::Error> {
        Portable::<Postgres>::due_expiries(&self.pool, now, limit).await
    }

    async fn find_consumption_by_key(
        &self,
        user_id: UserId,
        key: &str,
    ) -> Result<Option<StoredConsumption>, sqlx::Error> {
        Portable::<Postgres>::find_consumption_by_key(&self.pool, user_id.get(), key).await
    }

    async fn find_consumption(
        &self,
        user_id: UserId,
        id: ConsumptionId,
    ) -> Result<Option<StoredConsumption>, sqlx::Error> {
        Portable::<Postgres>::find_consumption(&self.pool, user_id, id).await
    }

    async fn find_consumption_owner(
        &self,
        id: ConsumptionId,
    ) -> Result<Option<UserId>, sqlx::Error> {
        Portable::<Postgres>::find_consumption_owner(&self.pool, id).await
    }

    async fn list_consumption(
        &self,
        filter: &ConsumptionFilter,
        after: Option<(DateTime<Utc>, i64)>,
        limit: i64,
    ) -> Result<Vec<ConsumptionRow>, sqlx::Error> {
        Portable::<Postgres>::list_consumption(&self.pool, &POSTGRES, filter, after, limit).await
    }

    async fn consumption_statistics(
        &self,
        filter: &ConsumptionFilter,
        group_by: GroupBy,
        groups_max: i64,
    ) -> Result<(Vec<StatisticsGroup>, StatisticsSums), sqlx::Error> {
        Portable::<Postgres>::consumption_statistics(
            &self.pool, &POSTGRES, filter, group_by, groups_max,
        )
        .await
    }

    async fn open_export(
        &self,
        filter: &ConsumptionFilter,
        rows_max: i64,
    ) -> Result<Option<ConsumptionExport>, sqlx::Error> {
        Portable::<Postgres>::open_export(&self.pool, &POSTGRES, filter, rows_max).await
    }

    async fn list_events(
        &self,
        filter: &EventFilter,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<EventRow>, sqlx::Error> {
        Portable::<Postgres>::list_events(&self.pool, filter, before, limit).await
    }

    async fn ledger_mismatches(&self, max: usize) -> Result<LedgerCheck, sqlx::Error> {
        Portable::<Postgres>::ledger_mismatches(&self.pool, max).await
    }

    async fn orphan_allocations(
        &self,
        max: usize,
    ) -> Result<(Vec<OrphanAllocation>, bool), sqlx::Error> {
        Portable::<Postgres>::orphan_allocations(&self.pool, max).await
    }

    async fn insert_mismatch_events(
        &self,
        events: &[(i64, serde_json::Value)],
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        reconcile::insert_mismatch_events(&self.pool, events, now).await
    }
}

/// The migrations of the PostgreSQL store, embedded in the binary and applied at start-up.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Connects to PostgreSQL, creating the database if it does not exist yet, and applies the
/// migrations. `pool_max` bounds the connections (each writer lane holds one more).
pub async fn connect(database_url: &str, pool_max: u32) -> Result<PgPool, sqlx::Error> {
    if !sqlx::Postgres::database_exists(database_url).await? {
        sqlx::Postgres::create_database(database_url).await?;
    }
    let options = PgConnectOptions::from_str(database_url)?
        .application_name(APPLICATION_NAME)
        // Every statement is planned for its own arguments. A generic plan, which PostgreSQL
        // caches per connection after five executions, is costed for the table sizes of that
        // moment: made while a new database's tables were nearly empty, it scans them whole
        // for as long as the connection lives. (Found on a writer lane, whose connection has
        // its own remedy: a refund's `UPDATE` scanning all of `consumption_records`, 1,764
        // deducts/s on a new database against 8,556/s on a used one.)
        .options([("plan_cache_mode", "force_custom_plan")])
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
    let pool = pool_options(pool_max).connect_with(options).await?;
    migrate(&pool).await?;
    Ok(pool)
}

/// The engine's connections' `application_name`, so operators (and tests) can tell them apart
/// in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "credits-engine";

/// How the engine's pool behaves: at most `pool_max` connections, and a request that cannot get
/// one within [`ACQUIRE_TIMEOUT`] fails with `503`.
pub fn pool_options(pool_max: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(pool_max)
        .acquire_timeout(ACQUIRE_TIMEOUT)
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::Error> {
    MIGRATOR.run(pool).await.map_err(sqlx::Error::from)
}

/// The committed deductions of these (user, idempotency key) pairs, in no particular order.
pub(super) async fn find_consumptions_by_keys(
    conn: &mut sqlx::PgConnection,
    user_ids: &[i64],
    keys: &[&str],
) -> Result<Vec<(String, StoredConsumption)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Keyed {
        idempotency_key: String,
        #[sqlx(flatten)]
        line: ConsumptionLineRow,
    }
    let rows: Vec<Keyed> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT c.idempotency_key, {CONSUMPTION_HEAD_COLUMNS}, {CONSUMPTION_LINES}
         JOIN UNNEST($1::bigint[], $2::text[]) AS k(user_id, idempotency_key)
           ON c.user_id = k.user_id AND c.idempotency_key = k.idempotency_key
         ORDER BY c.user_id, c.id, a.user_package_id"
    )))
    .bind(user_ids)
    .bind(keys)
    .fetch_all(conn)
    .await?;
    // One consumption's rows are adjacent: its head repeated beside each allocation.
    let mut found = Vec::new();
    let mut rows = rows.into_iter().peekable();
    while let Some(first) = rows.next() {
        let head = (first.line.head.user_id, first.line.head.id);
        let key = first.idempotency_key;
        let mut lines = vec![first.line];
        while let Some(next) = rows.next_if(|row| (row.line.head.user_id, row.line.head.id) == head)
        {
            lines.push(next.line);
        }
        if let Some(stored) = assemble_lines(lines)? {
            found.push((key, stored));
        }
    }
    Ok(found)
}
