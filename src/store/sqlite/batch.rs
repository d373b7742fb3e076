//! The batch writer's statements on SQLite: each kind of row a batch writes goes in one
//! multi-row statement (in chunks of [`ROWS_PER_STATEMENT_MAX`], under SQLite's limit on bound
//! values), as PostgreSQL's `UNNEST` arrays do: every statement is a hop to the connection's
//! thread, and a batch commits with one WAL sync.

use std::collections::HashSet;

use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

use super::find_consumptions_by_keys;
use crate::store::portable::{Portable, SQLITE};
use crate::store::writer::{
    AllocationColumns, BatchDialect, BatchRows, DeductColumns, Events, GrantDeltas, GrantEffect,
    RefundEffect, grant_use_assignments, protocol,
};
use crate::store::{StoredConsumption, UserPackageRow};

/// Rows in one statement: 12 bound values a consumption record, far below SQLite's 32,766.
const ROWS_PER_STATEMENT_MAX: usize = 512;

/// The row indexes `0..rows`, in chunks of at most [`ROWS_PER_STATEMENT_MAX`].
fn row_chunks(rows: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..rows)
        .step_by(ROWS_PER_STATEMENT_MAX)
        .map(move |start| start..(start + ROWS_PER_STATEMENT_MAX).min(rows))
}

/// The SQLite statements of the batch writer.
pub(crate) struct SqliteBatch;

impl BatchDialect for SqliteBatch {
    type Db = Sqlite;
    const BEGIN: &'static str = super::BEGIN_WRITE;
    /// SQLite rolls a transaction back by itself after an I/O, disk-full or out-of-memory error,
    /// which leaves the connection's own count of open transactions wrong: start afresh.
    const KEEPS_CONNECTION_AFTER_DATABASE_ERROR: bool = false;
    const ROWS_IN_ONE_STATEMENT: bool = false;

    /// Its own transaction (autocommit), like PostgreSQL's `nextval`. Read with `fetch_all`,
    /// which steps the statement to its end: the commit happens there, so a commit that fails
    /// is an error here (a statement reset after its first row would swallow it, and the block
    /// would be handed out again after a restart).
    async fn next_id_block(connection: &mut SqliteConnection) -> Result<i64, sqlx::Error> {
        let blocks: Vec<i64> = sqlx::query_scalar(
            "UPDATE consumption_id_blocks SET last_value = last_value + 1 RETURNING last_value",
        )
        .fetch_all(connection)
        .await?;
        blocks
            .first()
            .copied()
            .ok_or_else(|| protocol("consumption_id_blocks has no row"))
    }

    async fn write_rows(
        tx: &mut SqliteConnection,
        rows: &BatchRows,
        refunds: &[&RefundEffect],
    ) -> Result<HashSet<i64>, sqlx::Error> {
        // Deductions first: a key that already exists is skipped, and so is what it would use.
        let inserted = if rows.deducts.ids.is_empty() {
            HashSet::new()
        } else {
            insert_consumptions(tx, &rows.deducts).await?
        };
        let allocations = rows.allocations.inserted(&inserted);
        if !allocations.user_ids.is_empty() {
            insert_allocations(tx, &allocations).await?;
        }
        if !refunds.is_empty() {
            write_refunds(tx, refunds).await?;
        }
        let deltas = rows.grant_deltas(&inserted);
        if !deltas.user_ids.is_empty() {
            let updated = apply_grant_deltas(tx, &deltas).await?;
            if updated != deltas.user_ids.len() as u64 {
                return Err(protocol("a grant named by an allocation does not exist"));
            }
        }
        Self::insert_events(tx, &rows.events.inserted(&inserted)).await?;
        Ok(inserted)
    }

    async fn find_consumptions_by_keys(
        tx: &mut SqliteConnection,
        user_ids: &[i64],
        keys: &[&str],
    ) -> Result<Vec<(String, StoredConsumption)>, sqlx::Error> {
        find_consumptions_by_keys(tx, user_ids, keys).await
    }

    async fn write_grant_change(
        tx: &mut SqliteConnection,
        effect: &GrantEffect,
    ) -> Result<(UserPackageRow, i64), sqlx::Error> {
        Portable::<Sqlite>::write_grant_change(tx, &SQLITE, effect).await
    }

    async fn insert_events(tx: &mut SqliteConnection, events: &Events) -> Result<(), sqlx::Error> {
        for rows in row_chunks(events.kinds.len()) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO billing_events (kind, user_id, payload, created_at) ",
            );
            query.push_values(rows, |mut values, row| {
                values
                    .push_bind(events.kinds[row])
                    .push_bind(events.user_ids[row])
                    .push_bind(&events.payloads[row])
                    .push_bind(events.times[row]);
            });
            query.build().execute(&mut *tx).await?;
        }
        Ok(())
    }
}

async fn insert_consumptions(
    tx: &mut SqliteConnection,
    columns: &DeductColumns,
) -> Result<HashSet<i64>, sqlx::Error> {
    let mut inserted = HashSet::with_capacity(columns.ids.len());
    for rows in row_chunks(columns.ids.len()) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO consumption_records (user_id, id, action_key, quantity, unit_cost,
                 credits_cost, price_version, idempotency_key, request_fingerprint,
                 remaining_after, metadata, created_at) ",
        );
        query.push_values(rows, |mut values, row| {
            values
                .push_bind(columns.user_ids[row])
                .push_bind(columns.ids[row])
                .push_bind(&columns.action_keys[row])
                .push_bind(columns.quantities[row])
                .push_bind(columns.unit_costs[row])
                .push_bind(columns.credits_costs[row])
                .push_bind(columns.price_versions[row])
                .push_bind(&columns.idempotency_keys[row])
                .push_bind(&columns.fingerprints[row])
                .push_bind(columns.remaining_after[row])
                .push_bind(&columns.metadata[row])
                .push_bind(columns.created_at[row]);
        });
        query.push(" ON CONFLICT (user_id, idempotency_key) DO NOTHING RETURNING id");
        let ids: Vec<i64> = query.build_query_scalar().fetch_all(&mut *tx).await?;
        inserted.extend(ids);
    }
    Ok(inserted)
}

async fn insert_allocations(
    tx: &mut SqliteConnection,
    rows: &AllocationColumns,
) -> Result<(), sqlx::Error> {
    for chunk in row_chunks(rows.user_ids.len()) {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO consumption_allocations
                 (user_id, consumption_id, user_package_id, credits) ",
        );
        query.push_values(chunk, |mut values, row| {
            values
                .push_bind(rows.user_ids[row])
                .push_bind(rows.consumption_ids[row])
                .push_bind(rows.user_package_ids[row])
                .push_bind(rows.credits[row]);
        });
        query.build().execute(&mut *tx).await?;
    }
    Ok(())
}

async fn write_refunds(
    tx: &mut SqliteConnection,
    refunds: &[&RefundEffect],
) -> Result<(), sqlx::Error> {
    for refund in refunds {
        let marked = sqlx::query(
            "UPDATE consumption_records
             SET status = 'refunded', refunded_credits = $3, forfeited_credits = $4,
                 refund_reason = $5, refunded_at = $6
             WHERE user_id = $1 AND id = $2 AND status = 'completed'",
        )
        .bind(refund.user_id.get())
        .bind(refund.consumption_id.get())
        .bind(refund.plan.refunded_credits().get())
        .bind(refund.plan.forfeited_credits().get())
        .bind(&refund.reason)
        .bind(refund.refunded_at)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if marked != 1 {
            return Err(protocol(
                "a refunded consumption was not in state completed",
            ));
        }
        for (grant_id, refunded, forfeited) in refund.plan.shares() {
            let updated = sqlx::query(
                "UPDATE consumption_allocations
                 SET refunded_credits = refunded_credits + $4,
                     forfeited_credits = forfeited_credits + $5
                 WHERE user_id = $1 AND consumption_id = $2 AND user_package_id = $3",
            )
            .bind(refund.user_id.get())
            .bind(refund.consumption_id.get())
            .bind(grant_id.get())
            .bind(refunded)
            .bind(forfeited)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated != 1 {
                return Err(protocol("a refunded allocation does not exist"));
            }
        }
    }
    Ok(())
}

async fn apply_grant_deltas(
    tx: &mut SqliteConnection,
    deltas: &GrantDeltas,
) -> Result<u64, sqlx::Error> {
    let now = chrono::Utc::now();
    let mut updated = 0;
    for rows in row_chunks(deltas.user_ids.len()) {
        // A VALUES list names its columns column1, column2, column3.
        let mut query = QueryBuilder::<Sqlite>::new(format!(
            "UPDATE user_packages AS g SET {}, updated_at = ",
            grant_use_assignments("d.column3")
        ));
        query.push_bind(now).push(" FROM (");
        query.push_values(rows, |mut values, row| {
            values
                .push_bind(deltas.user_ids[row])
                .push_bind(deltas.grant_ids[row])
                .push_bind(deltas.used[row]);
        });
        query.push(") AS d WHERE g.user_id = d.column1 AND g.id = d.column2");
        updated += query.build().execute(&mut *tx).await?.rows_affected();
    }
    Ok(updated)
}
