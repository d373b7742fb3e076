//! Statements whose SQL both backends share, written once over any sqlx database that binds
//! and reads the engine's column types: the catalog's writes and lists, grant assignment and
//! registration, the wallet's and the lists' reads, the reports (with the CSV export's stream),
//! reconciliation's reads, audit events, and the grant changes of the batch writer. The
//! backends call them with their own pool or connection; what differs between them (how a
//! transaction begins, row locks, a timestamp's day, where grant ids come from) is a
//! [`Dialect`]. Every write commits with its audit event in one transaction; after a catalog
//! write the caller reloads the in-memory snapshot.

use std::marker::PhantomData;

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{Database, Decode, Encode, Executor, FromRow, IntoArguments, Pool, QueryBuilder, Type};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::domain::{ConsumptionId, GrantStatus, NewGrant, UserId, UserPackageId};
use crate::store::catalog::{
    PackageFields, PackageFilter, PackageSort, PriceFields, price_event_payload,
};
use crate::store::reconcile::{
    LEDGER_MISMATCHES_SQL, LedgerCheck, LedgerRow, ORPHAN_ALLOCATIONS_SQL, OrphanAllocation,
    cut_orphans, limit_past,
};
use crate::store::reports::{
    AllocationRow, ConsumptionExport, ConsumptionFilter, ConsumptionRow, EXPORT_ROWS_BUFFERED,
    EventFilter, EventRow, GroupBy, GroupKeys, StatisticsGroup, StatisticsSums, attach,
    consumption_page_query, events_query, export_count_query, export_query, statistics_queries,
};
use crate::store::writer::{GrantChange, GrantEffect, protocol};
use crate::store::{
    ActionPriceRow, CONSUMPTION_HEAD_COLUMNS, CONSUMPTION_LINES, ConsumptionLineRow, GrantFilter,
    GrantListRow, Merge, Merged, PACKAGE_COLUMNS, PRICE_COLUMNS, PackageRow, SUMMARY_GRANTS_MAX,
    StoredConsumption, USER_PACKAGE_COLUMNS, UserPackageRow, assemble_lines, grant_columns_of,
};

/// What the shared statements do differently on each backend.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dialect {
    /// Opens a transaction that writes.
    pub begin_write: &'static str,
    /// Opens a transaction whose reads all see one snapshot and that writes nothing.
    pub begin_snapshot: &'static str,
    /// Appended to a read of a row the transaction then changes.
    pub lock_row: &'static str,
    /// A statistics group's key columns.
    pub group_keys: GroupKeys,
    /// Answers the next grant id (ids come from one sequence, so they are unique across users).
    pub next_grant_id: &'static str,
}

pub(crate) const POSTGRES: Dialect = Dialect {
    begin_write: "BEGIN",
    begin_snapshot: "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
    lock_row: " FOR UPDATE",
    group_keys: GroupKeys {
        by_day: "(created_at AT TIME ZONE 'UTC')::date AS day, NULL::text AS action_key, ",
        by_action_key: "NULL::date AS day, action_key, ",
    },
    next_grant_id: "SELECT nextval('user_packages_id_seq')",
};

/// SQLite has no row locks: `BEGIN IMMEDIATE` takes the database's write lock up front. A
/// deferred transaction in WAL mode reads one snapshot.
pub(crate) const SQLITE: Dialect = Dialect {
    begin_write: "BEGIN IMMEDIATE",
    begin_snapshot: "BEGIN",
    lock_row: "",
    // `created_at` is stored as RFC 3339 text in UTC.
    group_keys: GroupKeys {
        by_day: "date(created_at) AS day, NULL AS action_key, ",
        by_action_key: "NULL AS day, action_key, ",
    },
    next_grant_id: "UPDATE user_packages_id_seq SET last_value = last_value + 1 \
                    RETURNING last_value",
};

/// The shared statements over database `DB` (`Postgres` or `Sqlite`).
pub(crate) struct Portable<DB>(PhantomData<DB>);

impl<DB> Portable<DB>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    i64: for<'q> Encode<'q, DB> + Type<DB> + for<'r> Decode<'r, DB>,
    i32: for<'q> Encode<'q, DB> + Type<DB>,
    bool: for<'q> Encode<'q, DB> + Type<DB>,
    String: for<'q> Encode<'q, DB> + Type<DB>,
    DateTime<Utc>: for<'q> Encode<'q, DB> + Type<DB>,
    serde_json::Value: for<'q> Encode<'q, DB> + Type<DB>,
    Option<i64>: for<'q> Encode<'q, DB> + Type<DB>,
    Option<i32>: for<'q> Encode<'q, DB> + Type<DB>,
    Option<String>: for<'q> Encode<'q, DB> + Type<DB>,
    Option<DateTime<Utc>>: for<'q> Encode<'q, DB> + Type<DB>,
    (i64,): for<'r> FromRow<'r, DB::Row>,
    (Option<DateTime<Utc>>,): for<'r> FromRow<'r, DB::Row>,
    (i64, i64): for<'r> FromRow<'r, DB::Row>,
    ActionPriceRow: for<'r> FromRow<'r, DB::Row>,
    PackageRow: for<'r> FromRow<'r, DB::Row>,
    UserPackageRow: for<'r> FromRow<'r, DB::Row>,
    GrantListRow: for<'r> FromRow<'r, DB::Row>,
    EventRow: for<'r> FromRow<'r, DB::Row>,
    LedgerRow: for<'r> FromRow<'r, DB::Row>,
    OrphanAllocation: for<'r> FromRow<'r, DB::Row>,
    ConsumptionRow: for<'r> FromRow<'r, DB::Row>,
    StatisticsGroup: for<'r> FromRow<'r, DB::Row>,
    StatisticsSums: for<'r> FromRow<'r, DB::Row>,
    AllocationRow: for<'r> FromRow<'r, DB::Row>,
    ConsumptionLineRow: for<'r> FromRow<'r, DB::Row>,
{
    /// Assigns a grant in one transaction with its `billing_package_assign` event (and
    /// `billing_package_activate` when it starts active). The same `external_ref` twice
    /// assigns once: the second call returns the first grant and `false`.
    pub async fn insert_grant(
        pool: &Pool<DB>,
        dialect: &Dialect,
        user_id: UserId,
        grant: &NewGrant,
        external_ref: Option<&str>,
        note: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(UserPackageRow, bool), sqlx::Error> {
        let mut tx = pool.begin_with(dialect.begin_write).await?;
        let inserted =
            Self::insert_grant_in(&mut tx, dialect, user_id, grant, external_ref, note, now)
                .await?;
        if let Some(row) = inserted {
            tx.commit().await?;
            return Ok((row, true));
        }
        let existing: UserPackageRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {USER_PACKAGE_COLUMNS} FROM user_packages
             WHERE user_id = $1 AND external_ref = $2"
        )))
        .bind(user_id.get())
        .bind(external_ref.map(str::to_owned))
        .fetch_one(&mut *tx)
        .await?;
        tx.rollback().await?;
        Ok((existing, false))
    }

    /// Records the user as registered and assigns `grants` (the new-user packages), all in one
    /// transaction. A user registered before gets nothing: `(false, [])`.
    pub async fn register_user(
        pool: &Pool<DB>,
        dialect: &Dialect,
        user_id: UserId,
        grants: &[NewGrant],
        now: DateTime<Utc>,
    ) -> Result<(bool, Vec<UserPackageRow>), sqlx::Error> {
        let mut tx = pool.begin_with(dialect.begin_write).await?;
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
            let inserted = Self::insert_grant_in(
                &mut tx,
                dialect,
                user_id,
                grant,
                Some(&external_ref),
                None,
                now,
            )
            .await?;
            rows.extend(inserted);
        }
        let package_ids: Vec<i64> = rows.iter().map(|row| row.package_id).collect();
        Self::insert_event(
            &mut tx,
            "billing_user_registered",
            Some(user_id),
            &json!({ "assigned_package_ids": package_ids }),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok((true, rows))
    }

    /// Inserts a grant and its events inside `tx`; `None` when `external_ref` is already taken.
    async fn insert_grant_in(
        tx: &mut DB::Connection,
        dialect: &Dialect,
        user_id: UserId,
        grant: &NewGrant,
        external_ref: Option<&str>,
        note: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Option<UserPackageRow>, sqlx::Error> {
        let id: i64 = sqlx::query_scalar(dialect.next_grant_id)
            .fetch_one(&mut *tx)
            .await?;
        let inserted: Option<UserPackageRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO user_packages (user_id, id, package_id, source, status, priority,
                 unlimited, total_credits, remaining_credits, duration_days, activated_at,
                 expires_at, external_ref, note, created_at, updated_at)
             VALUES ($1, $14, $2, $3, $4, $5, $6, $7, $7, $8, $9, $10, $11, $12, $13, $13)
             ON CONFLICT (user_id, external_ref) DO NOTHING
             RETURNING {USER_PACKAGE_COLUMNS}"
        )))
        .bind(user_id.get())
        .bind(grant.package_id.get())
        .bind(grant.source.as_str().to_owned())
        .bind(grant.status.as_str().to_owned())
        .bind(grant.priority)
        .bind(grant.unlimited)
        .bind(grant.total_credits.get())
        .bind(grant.duration_days)
        .bind(grant.activated_at)
        .bind(grant.expires_at)
        .bind(external_ref.map(str::to_owned))
        .bind(note.map(str::to_owned))
        .bind(now)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = inserted else {
            return Ok(None);
        };
        // What the assign (and activate) events record of the grant.
        let payload = json!({
            "user_package_id": row.id,
            "package_id": row.package_id,
            "source": row.source,
            "status": row.status,
            "total_credits": row.total_credits,
            "unlimited": row.unlimited,
            "expires_at": row.expires_at,
            "external_ref": row.external_ref,
        });
        Self::insert_event(
            &mut *tx,
            "billing_package_assign",
            Some(user_id),
            &payload,
            now,
        )
        .await?;
        if grant.status == GrantStatus::Active {
            Self::insert_event(
                &mut *tx,
                "billing_package_activate",
                Some(user_id),
                &payload,
                now,
            )
            .await?;
        }
        Ok(Some(row))
    }

    /// A committed deduction by its id, with its allocations, in one read.
    pub async fn find_consumption(
        pool: &Pool<DB>,
        user_id: UserId,
        id: ConsumptionId,
    ) -> Result<Option<StoredConsumption>, sqlx::Error> {
        Self::consumption_with_lines(pool, "c.id = $2", user_id.get(), id.get()).await
    }

    /// A committed deduction by its user and idempotency key, with its allocations, in one
    /// read.
    pub async fn find_consumption_by_key<'e, E>(
        executor: E,
        user_id: i64,
        key: &str,
    ) -> Result<Option<StoredConsumption>, sqlx::Error>
    where
        E: Executor<'e, Database = DB>,
    {
        let matching = "c.idempotency_key = $2";
        Self::consumption_with_lines(executor, matching, user_id, key.to_owned()).await
    }

    /// The user's one deduction that `matching` picks (its `$2` is `value`), with its
    /// allocations in grant order.
    async fn consumption_with_lines<'e, E, V>(
        executor: E,
        matching: &str,
        user_id: i64,
        value: V,
    ) -> Result<Option<StoredConsumption>, sqlx::Error>
    where
        E: Executor<'e, Database = DB>,
        V: for<'q> Encode<'q, DB> + Type<DB> + Send + 'static,
    {
        let rows: Vec<ConsumptionLineRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {CONSUMPTION_HEAD_COLUMNS}, {CONSUMPTION_LINES}
             WHERE c.user_id = $1 AND {matching}
             ORDER BY a.user_package_id"
        )))
        .bind(user_id)
        .bind(value)
        .fetch_all(executor)
        .await?;
        assemble_lines(rows)
    }

    /// One page of consumption records with their allocations, from one snapshot.
    #[tracing::instrument(skip_all, fields(limit = limit))]
    pub async fn list_consumption(
        pool: &Pool<DB>,
        dialect: &Dialect,
        filter: &ConsumptionFilter,
        after: Option<(DateTime<Utc>, i64)>,
        limit: i64,
    ) -> Result<Vec<ConsumptionRow>, sqlx::Error> {
        let mut query = consumption_page_query::<DB>(filter, after, limit);
        let mut tx = pool.begin_with(dialect.begin_snapshot).await?;
        let mut rows: Vec<ConsumptionRow> = query.build_query_as().fetch_all(&mut *tx).await?;
        let allocations = Self::allocations_of_page(&mut tx, &rows).await?;
        attach(&mut rows, allocations);
        tx.commit().await?;
        Ok(rows)
    }

    /// The allocations of every row of a page, in one statement: a join with the page's
    /// (user, consumption) pairs as a `VALUES` list (a page is far below either backend's limit
    /// on bound values).
    async fn allocations_of_page(
        conn: &mut DB::Connection,
        rows: &[ConsumptionRow],
    ) -> Result<Vec<AllocationRow>, sqlx::Error> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = QueryBuilder::<DB>::new(
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

    /// The groups (at most `groups_max`, in report order) and the totals over the whole
    /// filter, from one snapshot.
    pub async fn consumption_statistics(
        pool: &Pool<DB>,
        dialect: &Dialect,
        filter: &ConsumptionFilter,
        group_by: GroupBy,
        groups_max: i64,
    ) -> Result<(Vec<StatisticsGroup>, StatisticsSums), sqlx::Error> {
        let (mut groups_query, mut totals_query) =
            statistics_queries::<DB>(filter, group_by, groups_max, &dialect.group_keys);
        let mut tx = pool.begin_with(dialect.begin_snapshot).await?;
        let groups = groups_query.build_query_as().fetch_all(&mut *tx).await?;
        let totals = totals_query.build_query_as().fetch_one(&mut *tx).await?;
        tx.commit().await?;
        Ok((groups, totals))
    }

    /// Counts the export's rows in a snapshot, then streams them from the same snapshot on a
    /// task of its own, which ends (and rolls the snapshot back) when the reader goes away.
    pub async fn open_export(
        pool: &Pool<DB>,
        dialect: &Dialect,
        filter: &ConsumptionFilter,
        rows_max: i64,
    ) -> Result<Option<ConsumptionExport>, sqlx::Error> {
        let mut count_query = export_count_query::<DB>(filter, rows_max);
        let mut tx = pool.begin_with(dialect.begin_snapshot).await?;
        let rows: i64 = count_query.build_query_scalar().fetch_one(&mut *tx).await?;
        if rows > rows_max {
            tx.rollback().await?;
            return Ok(None);
        }
        let mut query = export_query::<DB>(filter, rows_max);
        let (sender, receiver) = mpsc::channel(EXPORT_ROWS_BUFFERED);
        tokio::spawn(async move {
            let mut stream = query.build_query_as().fetch(&mut *tx);
            while let Some(row) = stream.next().await {
                if sender.send(row).await.is_err() {
                    break;
                }
            }
        });
        Ok(Some(ConsumptionExport::new(rows, receiver)))
    }

    pub async fn load_action_prices(pool: &Pool<DB>) -> Result<Vec<ActionPriceRow>, sqlx::Error> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {PRICE_COLUMNS} FROM action_prices ORDER BY action_key"
        )))
        .fetch_all(pool)
        .await
    }

    pub async fn load_packages(pool: &Pool<DB>) -> Result<Vec<PackageRow>, sqlx::Error> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {PACKAGE_COLUMNS} FROM packages ORDER BY sort_order, id"
        )))
        .fetch_all(pool)
        .await
    }

    /// The grants of several wallets in one query (wallets that start together load
    /// together): `owners` is the backend's test of `user_id` against the one bound list.
    pub async fn load_grants_of_wallets<L>(
        pool: &Pool<DB>,
        owners: &str,
        user_ids: L,
    ) -> Result<Vec<UserPackageRow>, sqlx::Error>
    where
        L: for<'q> Encode<'q, DB> + Type<DB> + Send + 'static,
    {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {USER_PACKAGE_COLUMNS} FROM user_packages
             WHERE user_id {owners} AND status IN ('pending', 'active', 'depleted')"
        )))
        .bind(user_ids)
        .fetch_all(pool)
        .await
    }

    pub async fn find_user_package(
        pool: &Pool<DB>,
        id: UserPackageId,
    ) -> Result<Option<UserPackageRow>, sqlx::Error> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {USER_PACKAGE_COLUMNS} FROM user_packages WHERE id = $1"
        )))
        .bind(id.get())
        .fetch_optional(pool)
        .await
    }

    /// A page of grants with package names, newest first, after the id `before` (exclusive).
    pub async fn list_grants(
        pool: &Pool<DB>,
        filter: &GrantFilter,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<GrantListRow>, sqlx::Error> {
        let columns = grant_columns_of("g");
        let mut query = QueryBuilder::<DB>::new(format!(
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

    pub async fn live_grants(
        pool: &Pool<DB>,
        user_id: UserId,
    ) -> Result<Vec<GrantListRow>, sqlx::Error> {
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

    /// Live grants at or past their expiry, soonest first: the expiry schedule, read through
    /// the `user_packages_live_expiry` index (only due rows are touched, not every user).
    pub async fn due_expiries(
        pool: &Pool<DB>,
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

    pub async fn find_consumption_owner(
        pool: &Pool<DB>,
        id: ConsumptionId,
    ) -> Result<Option<UserId>, sqlx::Error> {
        let owner: Option<i64> =
            sqlx::query_scalar("SELECT user_id FROM consumption_records WHERE id = $1")
                .bind(id.get())
                .fetch_optional(pool)
                .await?;
        Ok(owner.map(UserId))
    }

    pub async fn list_events(
        pool: &Pool<DB>,
        filter: &EventFilter,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<EventRow>, sqlx::Error> {
        let mut query: QueryBuilder<DB> = events_query(filter, before, limit);
        query.build_query_as().fetch_all(pool).await
    }

    /// Scans all grants and allocations (a hash aggregate over `consumption_allocations`):
    /// meant for a periodic job and an operator's request, not a hot path.
    pub async fn ledger_mismatches(
        pool: &Pool<DB>,
        max: usize,
    ) -> Result<LedgerCheck, sqlx::Error> {
        let rows: Vec<LedgerRow> = sqlx::query_as(LEDGER_MISMATCHES_SQL)
            .bind(limit_past(max))
            .fetch_all(pool)
            .await?;
        Ok(LedgerCheck::of(rows, max))
    }

    pub async fn orphan_allocations(
        pool: &Pool<DB>,
        max: usize,
    ) -> Result<(Vec<OrphanAllocation>, bool), sqlx::Error> {
        let orphans = sqlx::query_as(ORPHAN_ALLOCATIONS_SQL)
            .bind(limit_past(max))
            .fetch_all(pool)
            .await?;
        Ok(cut_orphans(orphans, max))
    }

    pub async fn insert_event(
        tx: &mut DB::Connection,
        kind: &str,
        user_id: Option<UserId>,
        payload: &serde_json::Value,
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO billing_events (kind, user_id, payload, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(kind.to_owned())
        .bind(user_id.map(UserId::get))
        .bind(payload.clone())
        .bind(now)
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Creates an action price at version 1; `None` when the key is taken.
    pub async fn insert_action_price(
        pool: &Pool<DB>,
        dialect: &Dialect,
        action_key: &str,
        fields: &PriceFields,
        now: DateTime<Utc>,
    ) -> Result<Option<ActionPriceRow>, sqlx::Error> {
        let mut tx = pool.begin_with(dialect.begin_write).await?;
        let row: Option<ActionPriceRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO action_prices (action_key, name, description, credits_cost, enabled,
                 created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $6)
             ON CONFLICT (action_key) DO NOTHING
             RETURNING {PRICE_COLUMNS}"
        )))
        .bind(action_key.to_owned())
        .bind(&fields.name)
        .bind(&fields.description)
        .bind(fields.credits_cost)
        .bind(fields.enabled)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let payload = price_event_payload(&row);
        Self::insert_event(&mut tx, "billing_action_price_create", None, &payload, now).await?;
        tx.commit().await?;
        Ok(Some(row))
    }

    /// Changes an action price: `merge` turns the current row (locked) into the new fields. The
    /// version goes up by one and a `billing_action_price_update` event records old and new.
    /// `Ok(None)` when there is no such action.
    pub async fn update_action_price(
        pool: &Pool<DB>,
        dialect: &Dialect,
        action_key: &str,
        now: DateTime<Utc>,
        merge: Merge<'_, ActionPriceRow, PriceFields>,
    ) -> Result<Merged<ActionPriceRow>, sqlx::Error> {
        let mut tx = pool.begin_with(dialect.begin_write).await?;
        let current: Option<ActionPriceRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {PRICE_COLUMNS} FROM action_prices WHERE action_key = $1{lock}",
            lock = dialect.lock_row
        )))
        .bind(action_key.to_owned())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(current) = current else {
            return Ok(Merged::NotFound);
        };
        let Some(fields) = merge(&current) else {
            return Ok(Merged::Refused);
        };
        let row: ActionPriceRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE action_prices
             SET name = $2, description = $3, credits_cost = $4, enabled = $5,
                 version = version + 1, updated_at = $6
             WHERE action_key = $1
             RETURNING {PRICE_COLUMNS}"
        )))
        .bind(action_key.to_owned())
        .bind(&fields.name)
        .bind(&fields.description)
        .bind(fields.credits_cost)
        .bind(fields.enabled)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let mut payload = price_event_payload(&row);
        payload["previous"] = json!({
            "version": current.version,
            "credits_cost": current.credits_cost,
            "enabled": current.enabled,
            "name": current.name,
        });
        Self::insert_event(&mut tx, "billing_action_price_update", None, &payload, now).await?;
        tx.commit().await?;
        Ok(Merged::Updated(row))
    }

    /// Every action price, by key (a catalog holds tens, not thousands).
    pub async fn list_action_prices(
        pool: &Pool<DB>,
        enabled: Option<bool>,
        after_key: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ActionPriceRow>, sqlx::Error> {
        let mut query = QueryBuilder::<DB>::new(format!(
            "SELECT {PRICE_COLUMNS} FROM action_prices WHERE true"
        ));
        if let Some(enabled) = enabled {
            query.push(" AND enabled = ").push_bind(enabled);
        }
        if let Some(after) = after_key {
            query.push(" AND action_key > ").push_bind(after.to_owned());
        }
        query.push(" ORDER BY action_key LIMIT ").push_bind(limit);
        query.build_query_as().fetch_all(pool).await
    }

    pub async fn insert_package(
        pool: &Pool<DB>,
        dialect: &Dialect,
        fields: &PackageFields,
        now: DateTime<Utc>,
    ) -> Result<PackageRow, sqlx::Error> {
        let mut tx = pool.begin_with(dialect.begin_write).await?;
        let row: PackageRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO packages (name, description, package_type, credits_amount, duration_days,
                 price_cents, currency, priority, visible, assign_to_new_users, sort_order,
                 created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12)
             RETURNING {PACKAGE_COLUMNS}"
        )))
        .bind(&fields.name)
        .bind(&fields.description)
        .bind(&fields.package_type)
        .bind(fields.credits_amount)
        .bind(fields.duration_days)
        .bind(fields.price_cents)
        .bind(&fields.currency)
        .bind(fields.priority)
        .bind(fields.visible)
        .bind(fields.assign_to_new_users)
        .bind(fields.sort_order)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let mut payload = fields.payload();
        payload["package_id"] = json!(row.id);
        Self::insert_event(&mut tx, "billing_package_create", None, &payload, now).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Changes a package that is not deleted; `Ok(None)` when there is none.
    pub async fn update_package(
        pool: &Pool<DB>,
        dialect: &Dialect,
        id: i64,
        now: DateTime<Utc>,
        merge: Merge<'_, PackageRow, PackageFields>,
    ) -> Result<Merged<PackageRow>, sqlx::Error> {
        let mut tx = pool.begin_with(dialect.begin_write).await?;
        let current: Option<PackageRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {PACKAGE_COLUMNS} FROM packages WHERE id = $1 AND deleted_at IS NULL{lock}",
            lock = dialect.lock_row
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(current) = current else {
            return Ok(Merged::NotFound);
        };
        let Some(fields) = merge(&current) else {
            return Ok(Merged::Refused);
        };
        let row: PackageRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE packages
             SET name = $2, description = $3, package_type = $4, credits_amount = $5,
                 duration_days = $6, price_cents = $7, currency = $8, priority = $9, visible = $10,
                 assign_to_new_users = $11, sort_order = $12, updated_at = $13
             WHERE id = $1
             RETURNING {PACKAGE_COLUMNS}"
        )))
        .bind(id)
        .bind(&fields.name)
        .bind(&fields.description)
        .bind(&fields.package_type)
        .bind(fields.credits_amount)
        .bind(fields.duration_days)
        .bind(fields.price_cents)
        .bind(&fields.currency)
        .bind(fields.priority)
        .bind(fields.visible)
        .bind(fields.assign_to_new_users)
        .bind(fields.sort_order)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let mut payload = fields.payload();
        payload["package_id"] = json!(id);
        payload["previous"] = PackageFields::of(&current).payload();
        Self::insert_event(&mut tx, "billing_package_update", None, &payload, now).await?;
        tx.commit().await?;
        Ok(Merged::Updated(row))
    }

    /// Soft-deletes a package: it leaves lists and can no longer be assigned; grants already made
    /// from it keep working. `Ok(false)` when there is no such package; deleting twice is a no-op.
    pub async fn delete_package(
        pool: &Pool<DB>,
        dialect: &Dialect,
        id: i64,
        now: DateTime<Utc>,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = pool.begin_with(dialect.begin_write).await?;
        let deleted_before: Option<Option<DateTime<Utc>>> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT deleted_at FROM packages WHERE id = $1{}",
                dialect.lock_row
            )))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        match deleted_before {
            None => return Ok(false),
            Some(Some(_)) => return Ok(true),
            Some(None) => {}
        }
        sqlx::query("UPDATE packages SET deleted_at = $2, updated_at = $2 WHERE id = $1")
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        Self::insert_event(
            &mut tx,
            "billing_package_delete",
            None,
            &json!({ "package_id": id }),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn find_package(pool: &Pool<DB>, id: i64) -> Result<Option<PackageRow>, sqlx::Error> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {PACKAGE_COLUMNS} FROM packages WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(pool)
        .await
    }

    /// A page of packages in `sort` order (`descending` flips it), after the keyset `after`.
    pub async fn list_packages(
        pool: &Pool<DB>,
        filter: &PackageFilter,
        sort: PackageSort,
        descending: bool,
        after: Option<(i64, i64)>,
        limit: i64,
    ) -> Result<Vec<PackageRow>, sqlx::Error> {
        let mut query =
            QueryBuilder::<DB>::new(format!("SELECT {PACKAGE_COLUMNS} FROM packages WHERE true"));
        if !filter.include_deleted {
            query.push(" AND deleted_at IS NULL");
        }
        if let Some(package_type) = &filter.package_type {
            query
                .push(" AND package_type = ")
                .push_bind(package_type.clone());
        }
        if let Some(visible) = filter.visible {
            query.push(" AND visible = ").push_bind(visible);
        }
        if let Some(assign) = filter.assign_to_new_users {
            query.push(" AND assign_to_new_users = ").push_bind(assign);
        }
        let key = sort.key_sql();
        let (compare, direction) = if descending {
            ("<", "DESC")
        } else {
            (">", "ASC")
        };
        if let Some((after_key, after_id)) = after {
            query
                .push(format_args!(" AND ({key}, id) {compare} ("))
                .push_bind(after_key)
                .push(", ")
                .push_bind(after_id)
                .push(")");
        }
        query
            .push(format_args!(
                " ORDER BY {key} {direction}, id {direction} LIMIT "
            ))
            .push_bind(limit);
        query.build_query_as().fetch_all(pool).await
    }

    /// Applies one grant change and returns the grant's row as it now stands, with the credits it
    /// voided (see `BatchDialect::write_grant_change`).
    pub async fn write_grant_change(
        tx: &mut DB::Connection,
        dialect: &Dialect,
        effect: &GrantEffect,
    ) -> Result<(UserPackageRow, i64), sqlx::Error> {
        let columns = USER_PACKAGE_COLUMNS;
        let (query, voided) = match &effect.change {
            GrantChange::Activate(activation) => {
                let query = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "UPDATE user_packages
                     SET status = CASE WHEN unlimited OR remaining_credits > 0 THEN 'active' ELSE 'depleted' END,
                         activated_at = $3, expires_at = $4, updated_at = $5
                     WHERE user_id = $1 AND id = $2 AND status = 'pending'
                     RETURNING {columns}"
                )))
                .bind(effect.user_id.get())
                .bind(effect.grant_id.get())
                .bind(activation.activated_at)
                .bind(activation.expires_at)
                .bind(effect.at);
                (query, 0)
            }
            GrantChange::Revoke { .. } | GrantChange::Expire => {
                let (ended, live) = match effect.change {
                    GrantChange::Expire => ("expired", "('active', 'depleted')"),
                    _ => ("revoked", "('pending', 'active', 'depleted')"),
                };
                // Locked (PostgreSQL's row lock, SQLite's write lock): what the row holds now is what
                // is voided.
                let remaining: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT remaining_credits FROM user_packages
                     WHERE user_id = $1 AND id = $2 AND status IN {live}{lock}",
                    lock = dialect.lock_row
                )))
                .bind(effect.user_id.get())
                .bind(effect.grant_id.get())
                .fetch_optional(&mut *tx)
                .await?;
                let query = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "UPDATE user_packages
                     SET status = '{ended}',
                         expired_credits = expired_credits + remaining_credits,
                         remaining_credits = 0,
                         updated_at = $3
                     WHERE user_id = $1 AND id = $2 AND status IN {live}
                     RETURNING {columns}"
                )))
                .bind(effect.user_id.get())
                .bind(effect.grant_id.get())
                .bind(effect.at);
                (query, remaining.unwrap_or(0))
            }
        };
        let row: Option<UserPackageRow> = query.fetch_optional(&mut *tx).await?;
        let row =
            row.ok_or_else(|| protocol("a grant change found the grant in another status"))?;
        Ok((row, voided))
    }
}
