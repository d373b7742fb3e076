//! The SQLite store, the embedded default: one file on the engine's machine, in WAL mode with
//! `synchronous=FULL`, so an acknowledged deduction has reached the disk (the WAL is synced at
//! every commit) and survives a crash of the engine or the machine. One engine process owns
//! the file (see [`FileOwner`]); several engine nodes, a large history or a DBA's tooling call
//! for PostgreSQL.
//!
//! SQLite takes one writer at a time: the batch writer runs one lane, and every write
//! transaction here starts with `BEGIN IMMEDIATE`, so it takes the write lock first (waiting up
//! to [`BUSY_TIMEOUT`]) instead of failing when a read turns into a write. Readers never block
//! and see one snapshot per transaction.

pub(crate) mod batch;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Sqlite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::catalog::{PackageFields, PackageFilter, PackageSort, PriceFields};
use super::portable::{Portable, SQLITE};
use super::reconcile::{LedgerCheck, MISMATCH_EVENT_KIND, OrphanAllocation};
use super::reports::{
    ConsumptionExport, ConsumptionFilter, ConsumptionRow, EventFilter, EventRow, GroupBy,
    StatisticsGroup, StatisticsSums,
};
use super::writer::{self, WriterHandle, WriterLimits};
use super::{
    ACQUIRE_TIMEOUT, ActionPriceRow, GrantFilter, GrantListRow, Merge, Merged, PackageRow,
    PoolUsage, Store, StoredConsumption, UserPackageRow,
};
use crate::domain::{ConsumptionId, NewGrant, UserId, UserPackageId};

/// The migrations of the SQLite store, embedded in the binary and applied at start-up.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a write waits for another connection's write transaction to end.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The fewest connections the pool may have, whatever `CREDITS_DB_POOL_MAX` says: an export
/// holds one for as long as its client downloads, and wallet loads need another meanwhile.
const POOL_MIN: u32 = 2;

/// Opens every write transaction: takes the write lock at once (see the module doc).
const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// The SQLite store over its pool.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating the file and its directory if missing) the database `database_url`
    /// names, for example `sqlite://data/credits.db`, and applies the migrations.
    pub async fn connect(database_url: &str, pool_max: u32) -> Result<SqliteStore, sqlx::Error> {
        let options = connect_options(database_url)?;
        if let Some(directory) = options.get_filename().parent() {
            create_directory(directory)?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(pool_max.max(POOL_MIN))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(SqliteStore { pool })
    }
}

/// One engine process per file: wallets keep their users' balances and idempotency keys in
/// memory, so a second engine on the same file would serve the same users from a second memory.
/// An exclusive lock on `<file>.lock`, which the operating system releases when the process
/// ends, however it ends (a `kill -9` leaves no stale lock behind).
#[derive(Debug)]
pub struct FileOwner {
    _lock: std::fs::File,
}

impl FileOwner {
    /// Takes the file of `database_url` for this process, or says which process holds it.
    pub fn take(database_url: &str) -> Result<FileOwner, sqlx::Error> {
        let options = connect_options(database_url)?;
        let database = options.get_filename();
        if let Some(directory) = database.parent() {
            create_directory(directory)?;
        }
        let mut path = database.as_os_str().to_owned();
        path.push(".lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|error| {
                sqlx::Error::Configuration(
                    format!("cannot open {}: {error}", Path::new(&path).display()).into(),
                )
            })?;
        match lock.try_lock() {
            Ok(()) => Ok(FileOwner { _lock: lock }),
            Err(std::fs::TryLockError::WouldBlock) => Err(sqlx::Error::Configuration(
                format!(
                    "another engine process is using {}; one engine process owns an SQLite \
                     database",
                    database.display()
                )
                .into(),
            )),
            Err(std::fs::TryLockError::Error(error)) => Err(sqlx::Error::Configuration(
                format!("cannot lock {}: {error}", Path::new(&path).display()).into(),
            )),
        }
    }
}

/// The options every connection to the file is opened with.
pub fn connect_options(database_url: &str) -> Result<SqliteConnectOptions, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(database_url)?;
    // sqlx names its shared in-memory databases `file:sqlx-in-memory-N`.
    let in_memory = database_url.contains(":memory:")
        || database_url.contains("mode=memory")
        || options
            .get_filename()
            .to_string_lossy()
            .starts_with("file:");
    if in_memory {
        return Err(sqlx::Error::Configuration(
            "an in-memory SQLite database loses acknowledged deductions when the engine stops; \
             name a file"
                .into(),
        ));
    }
    Ok(options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500)))
}

fn create_directory(directory: &Path) -> Result<(), sqlx::Error> {
    if directory.as_os_str().is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(directory).map_err(|error| {
        sqlx::Error::Configuration(
            format!(
                "cannot create the data directory {}: {error}",
                directory.display()
            )
            .into(),
        )
    })
}

#[async_trait]
impl Store for SqliteStore {
    /// One lane, whatever `limits.lanes` says: SQLite has one writer at a time, and more lanes
    /// would only queue for its lock.
    fn spawn_writer(
        &self,
        limits: WriterLimits,
        stop: CancellationToken,
        tracker: &TaskTracker,
    ) -> std::io::Result<WriterHandle> {
        let limits = WriterLimits { lanes: 1, ..limits };
        writer::spawn_lanes::<batch::SqliteBatch>(self.pool.clone(), limits, stop, tracker)
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
        Portable::<Sqlite>::load_action_prices(&self.pool).await
    }

    async fn load_packages(&self) -> Result<Vec<PackageRow>, sqlx::Error> {
        Portable::<Sqlite>::load_packages(&self.pool).await
    }

    async fn insert_action_price(
        &self,
        action_key: &str,
        fields: &PriceFields,
        now: DateTime<Utc>,
    ) -> Result<Option<ActionPriceRow>, sqlx::Error> {
        Portable::<Sqlite>::insert_action_price(&self.pool, &SQLITE, action_key, fields, now).await
    }

    async fn update_action_price(
        &self,
        action_key: &str,
        now: DateTime<Utc>,
        merge: Merge<'_, ActionPriceRow, PriceFields>,
    ) -> Result<Merged<ActionPriceRow>, sqlx::Error> {
        Portable::<Sqlite>::update_action_price(&self.pool, &SQLITE, action_key, now, merge).await
    }

    async fn list_action_prices(
        &self,
        enabled: Option<bool>,
        after_key: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ActionPriceRow>, sqlx::Error> {
        Portable::<Sqlite>::list_action_prices(&self.pool, enabled, after_key, limit).await
    }

    async fn insert_package(
        &self,
        fields: &PackageFields,
        now: DateTime<Utc>,
    ) -> Result<PackageRow, sqlx::Error> {
        Portable::<Sqlite>::insert_package(&self.pool, &SQLITE, fields, now).await
    }

    async fn update_package(
        &self,
        id: i64,
        now: DateTime<Utc>,
        merge: Merge<'_, PackageRow, PackageFields>,
    ) -> Result<Merged<PackageRow>, sqlx::Error> {
        Portable::<Sqlite>::update_package(&self.pool, &SQLITE, id, now, merge).await
    }

    async fn delete_package(&self, id: i64, now: DateTime<Utc>) -> Result<bool, sqlx::Error> {
        Portable::<Sqlite>::delete_package(&self.pool, &SQLITE, id, now).await
    }

    async fn find_package(&self, id: i64) -> Result<Option<PackageRow>, sqlx::Error> {
        Portable::<Sqlite>::find_package(&self.pool, id).await
    }

    async fn list_packages(
        &self,
        filter: &PackageFilter,
        sort: PackageSort,
        descending: bool,
        after: Option<(i64, i64)>,
        limit: i64,
    ) -> Result<Vec<PackageRow>, sqlx::Error> {
        Portable::<Sqlite>::list_packages(&self.pool, filter, sort, descending, after, limit).await
    }

    /// The ids go in as one JSON array (SQLite has no array parameters): one statement
    /// whatever the batch's size.
    async fn load_grants_of_wallets(
        &self,
        user_ids: &[UserId],
    ) -> Result<Vec<UserPackageRow>, sqlx::Error> {
        let ids: Vec<i64> = user_ids.iter().map(|user_id| user_id.get()).collect();
        let ids = serde_json::to_string(&ids).map_err(|error| sqlx::Error::Encode(error.into()))?;
        Portable::<Sqlite>::load_grants_of_wallets(
            &self.pool,
            "IN (SELECT value FROM json_each($1))",
            ids,
        )
        .await
    }

    async fn insert_grant(
        &self,
        user_id: UserId,
        grant: &NewGrant,
        external_ref: Option<&str>,
        note: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(UserPackageRow, bool), sqlx::Error> {
        Portable::<Sqlite>::insert_grant(
            &self.pool,
            &SQLITE,
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
        Portable::<Sqlite>::register_user(&self.pool, &SQLITE, user_id, grants, now).await
    }

    async fn find_user_package(
        &self,
        id: UserPackageId,
    ) -> Result<Option<UserPackageRow>, sqlx::Error> {
        Portable::<Sqlite>::find_user_package(&self.pool, id).await
    }

    async fn list_grants(
        &self,
        filter: &GrantFilter,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<GrantListRow>, sqlx::Error> {
        Portable::<Sqlite>::list_grants(&self.pool, filter, before, limit).await
    }

    async fn live_grants(&self, user_id: UserId) -> Result<Vec<GrantListRow>, sqlx::Error> {
        Portable::<Sqlite>::live_grants(&self.pool, user_id).await
    }

    async fn due_expiries(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<(UserId, UserPackageId)>, sqlx::Error> {
        Portable::<Sqlite>::due_expiries(&self.pool, now, limit).await
    }

    async fn find_consumption_by_key(
        &self,
        user_id: UserId,
        key: &str,
    ) -> Result<Option<StoredConsumption>, sqlx::Error> {
        Portable::<Sqlite>::find_consumption_by_key(&self.pool, user_id.get(), key).await
    }

    async fn find_consumption(
        &self,
        user_id: UserId,
        id: ConsumptionId,
    ) -> Result<Option<StoredConsumption>, sqlx::Error> {
        Portable::<Sqlite>::find_consumption(&self.pool, user_id, id).await
    }

    async fn find_consumption_owner(
        &self,
        id: ConsumptionId,
    ) -> Result<Option<UserId>, sqlx::Error> {
        Portable::<Sqlite>::find_consumption_owner(&self.pool, id).await
    }

    async fn list_consumption(
        &self,
        filter: &ConsumptionFilter,
        after: Option<(DateTime<Utc>, i64)>,
        limit: i64,
    ) -> Result<Vec<ConsumptionRow>, sqlx::Error> {
        Portable::<Sqlite>::list_consumption(&self.pool, &SQLITE, filter, after, limit).await
    }

    async fn consumption_statistics(
        &self,
        filter: &ConsumptionFilter,
        group_by: GroupBy,
        groups_max: i64,
    ) -> Result<(Vec<StatisticsGroup>, StatisticsSums), sqlx::Error> {
        Portable::<Sqlite>::consumption_statistics(
            &self.pool, &SQLITE, filter, group_by, groups_max,
        )
        .await
    }

    async fn open_export(
        &self,
        filter: &ConsumptionFilter,
        rows_max: i64,
    ) -> Result<Option<ConsumptionExport>, sqlx::Error> {
        Portable::<Sqlite>::open_export(&self.pool, &SQLITE, filter, rows_max).await
    }

    async fn list_events(
        &self,
        filter: &EventFilter,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<EventRow>, sqlx::Error> {
        Portable::<Sqlite>::list_events(&self.pool, filter, before, limit).await
    }

    async fn ledger_mismatches(&self, max: usize) -> Result<LedgerCheck, sqlx::Error> {
        Portable::<Sqlite>::ledger_mismatches(&self.pool, max).await
    }

    async fn orphan_allocations(
        &self,
        max: usize,
    ) -> Result<(Vec<OrphanAllocation>, bool), sqlx::Error> {
        Portable::<Sqlite>::orphan_allocations(&self.pool, max).await
    }

    async fn insert_mismatch_events(
        &self,
        events: &[(i64, serde_json::Value)],
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        for (user_id, payload) in events {
            Portable::<Sqlite>::insert_event(
                &mut tx,
                MISMATCH_EVENT_KIND,
                Some(UserId(*user_id)),
                payload,
                now,
            )
            .await?;
        }
        tx.commit().await
    }
}

/// The committed deductions of these (user, idempotency key) pairs, one look-up per pair: they
/// are the rare replays a batch met, and the wallet's look-up of a single key.
pub(super) async fn find_consumptions_by_keys(
    conn: &mut SqliteConnection,
    user_ids: &[i64],
    keys: &[&str],
) -> Result<Vec<(String, StoredConsumption)>, sqlx::Error> {
    let mut found = Vec::new();
    for (&user_id, &key) in user_ids.iter().zip(keys) {
        if let Some(stored) =
            Portable::<Sqlite>::find_consumption_by_key(&mut *conn, user_id, key).await?
        {
            found.push((key.to_owned(), stored));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_owns_a_file_until_it_lets_go() {
        let directory = std::env::temp_dir().join(format!("credits-owner-{}", std::process::id()));
        let url = format!("sqlite://{}", directory.join("credits.db").display());
        let owner = FileOwner::take(&url).expect("the first owner takes the file");
        let refused = FileOwner::take(&url).expect_err("a second owner is refused");
        assert!(
            refused
                .to_string()
                .contains("another engine process is using"),
            "{refused}"
        );
        drop(owner);
        FileOwner::take(&url).expect("the file is free again once its owner is gone");
        let _ = std::fs::remove_dir_all(directory);
    }

    /// The durability a deduct's acknowledgement relies on, on a pooled connection and on one
    /// made the way the writer lane makes its own (from the pool's options).
    #[tokio::test]
    async fn every_connection_syncs_the_wal_at_each_commit() {
        use sqlx::{Connection, SqliteConnection};
        let directory =
            std::env::temp_dir().join(format!("credits-pragmas-{}", std::process::id()));
        let url = format!("sqlite://{}", directory.join("credits.db").display());
        let store = SqliteStore::connect(&url, 4).await.expect("opens");
        let mut pooled = store.pool.acquire().await.expect("a pooled connection");
        let mut lane = SqliteConnection::connect_with(&store.pool.connect_options())
            .await
            .expect("a lane's connection");
        for connection in [&mut *pooled, &mut lane] {
            let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
                .fetch_one(&mut *connection)
                .await
                .unwrap();
            let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(&mut *connection)
                .await
                .unwrap();
            let busy_ms: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
                .fetch_one(&mut *connection)
                .await
                .unwrap();
            let foreign_keys: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
                .fetch_one(&mut *connection)
                .await
                .unwrap();
            assert_eq!(synchronous, 2, "synchronous=FULL");
            assert_eq!(journal, "wal");
            assert_eq!(busy_ms, 5_000);
            assert_eq!(foreign_keys, 1);
        }
        drop(pooled);
        lane.close().await.unwrap();
        store.pool.close().await;
        let _ = std::fs::remove_dir_all(directory);
    }

    #[test]
    fn a_data_directory_may_hold_characters_a_url_treats_specially() {
        use clap::Parser;
        let cli = crate::config::Cli::parse_from([
            "credits-engine",
            "serve",
            "--data-dir",
            "/tmp/odd?dir#with%chars",
        ]);
        let crate::config::Command::Serve(mut settings) = cli.command else {
            panic!("parsed a serve command");
        };
        // The test runner's own DATABASE_URL would otherwise be read.
        settings.database_url = None;
        let options = connect_options(&settings.database_url()).unwrap();
        assert_eq!(
            options.get_filename(),
            Path::new("/tmp/odd?dir#with%chars/credits.db")
        );
    }

    #[test]
    fn an_in_memory_database_is_refused() {
        let refused = connect_options("sqlite::memory:").expect_err("refused");
        assert!(refused.to_string().contains("name a file"), "{refused}");
    }
}
