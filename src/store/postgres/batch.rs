//! The batch writer's statements on PostgreSQL: each kind of row a batch writes goes in one
//! array (`UNNEST`) statement, so a batch costs a handful of round trips whatever its size.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnectOptions;
use sqlx::{PgConnection, Postgres};

use crate::store::portable::{POSTGRES, Portable};
use crate::store::writer::{
    AllocationColumns, BatchDialect, DeductColumns, Events, GrantDeltas, GrantEffect, RefundEffect,
    protocol,
};
use crate::store::{StoredConsumption, UserPackageRow};

/// The PostgreSQL statements of the batch writer.
pub(crate) struct PgBatch;

impl BatchDialect for PgBatch {
    type Db = Postgres;
    const BEGIN: &'static str = "BEGIN";
    /// The server refused a statement and the transaction was rolled back: the connection is
    /// sound.
    const KEEPS_CONNECTION_AFTER_DATABASE_ERROR: bool = true;

    /// A lane runs only statements that find their rows by key, a batch's worth at a time,
    /// so it keeps PostgreSQL's cached (generic) plans, which spare it planning every statement
    /// of every batch, but never lets one scan a whole table or hash it: a plan cached while a
    /// new database's tables were nearly empty would otherwise do so for as long as the lane
    /// lives (measured on a new database: 1,764 deducts/s with the refunds' `UPDATE` scanning
    /// `consumption_records`, 6,749/s with every statement planned anew, 8,050/s with this).
    fn lane_options(pool: PgConnectOptions) -> PgConnectOptions {
        pool.options([
            ("plan_cache_mode", "force_generic_plan"),
            ("enable_seqscan", "off"),
            ("enable_hashjoin", "off"),
            ("enable_mergejoin", "off"),
        ])
    }

    async fn next_id_block(connection: &mut PgConnection) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT nextval('consumption_id_blocks')")
            .fetch_one(connection)
            .await
    }

    async fn insert_consumptions(
        tx: &mut PgConnection,
        columns: &DeductColumns,
    ) -> Result<HashSet<i64>, sqlx::Error> {
        let inserted: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO consumption_records (user_id, id, action_key, quantity, unit_cost,
                 credits_cost, price_version, idempotency_key, request_fingerprint,
                 remaining_after, metadata, created_at)
             SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::bigint[],
                 $5::bigint[], $6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::bigint[],
                 $11::jsonb[], $12::timestamptz[])
             ON CONFLICT ON CONSTRAINT consumption_records_idempotency DO NOTHING
             RETURNING id",
        )
        .bind(&columns.user_ids)
        .bind(&columns.ids)
        .bind(&columns.action_keys)
        .bind(&columns.quantities)
        .bind(&columns.unit_costs)
        .bind(&columns.credits_costs)
        .bind(&columns.price_versions)
        .bind(&columns.idempotency_keys)
        .bind(&columns.fingerprints)
        .bind(&columns.remaining_after)
        .bind(&columns.metadata)
        .bind(&columns.created_at)
        .fetch_all(tx)
        .await?;
        Ok(inserted.into_iter().collect())
    }

    async fn find_consumptions_by_keys(
        tx: &mut PgConnection,
        user_ids: &[i64],
        keys: &[&str],
    ) -> Result<Vec<(String, StoredConsumption)>, sqlx::Error> {
        super::find_consumptions_by_keys(tx, user_ids, keys).await
    }

    async fn insert_allocations(
        tx: &mut PgConnection,
        rows: &AllocationColumns,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO consumption_allocations (user_id, consumption_id, user_package_id, credits)
             SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[])",
        )
        .bind(&rows.user_ids)
        .bind(&rows.consumption_ids)
        .bind(&rows.user_package_ids)
        .bind(&rows.credits)
        .execute(tx)
        .await?;
        Ok(())
    }

    async fn write_refunds(
        tx: &mut PgConnection,
        refunds: &[&RefundEffect],
    ) -> Result<(), sqlx::Error> {
        write_refunds(tx, refunds).await
    }

    async fn apply_grant_deltas(
        tx: &mut PgConnection,
        deltas: &GrantDeltas,
    ) -> Result<u64, sqlx::Error> {
        let updated = sqlx::query(
            "UPDATE user_packages g
             SET used_credits = g.used_credits + d.used,
                 remaining_credits = CASE WHEN g.unlimited THEN 0 ELSE g.remaining_credits - d.used END,
                 status = CASE
                     WHEN g.unlimited OR g.status NOT IN ('active', 'depleted') THEN g.status
                     WHEN g.remaining_credits - d.used = 0 THEN 'depleted'
                     ELSE 'active' END,
                 updated_at = now()
             FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[]) AS d(user_id, id, used)
             WHERE g.user_id = d.user_id AND g.id = d.id",
        )
        .bind(&deltas.user_ids)
        .bind(&deltas.grant_ids)
        .bind(&deltas.used)
        .execute(tx)
        .await?
        .rows_affected();
        Ok(updated)
    }

    async fn write_grant_change(
        tx: &mut PgConnection,
        effect: &GrantEffect,
    ) -> Result<(UserPackageRow, i64), sqlx::Error> {
        Portable::<Postgres>::write_grant_change(tx, &POSTGRES, effect).await
    }

    async fn insert_events(tx: &mut PgConnection, events: &Events) -> Result<(), sqlx::Error> {
        if events.kinds.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO billing_events (kind, user_id, payload, created_at)
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::jsonb[], $4::timestamptz[])",
        )
        .bind(&events.kinds)
        .bind(&events.user_ids)
        .bind(&events.payloads)
        .bind(&events.times)
        .execute(tx)
        .await?;
        Ok(())
    }
}

async fn write_refunds(
    tx: &mut PgConnection,
    refunds: &[&RefundEffect],
) -> Result<(), sqlx::Error> {
    let user_ids: Vec<i64> = refunds.iter().map(|r| r.user_id.get()).collect();
    let ids: Vec<i64> = refunds.iter().map(|r| r.consumption_id.get()).collect();
    let refunded: Vec<i64> = refunds
        .iter()
        .map(|r| r.plan.refunded_credits().get())
        .collect();
    let forfeited: Vec<i64> = refunds
        .iter()
        .map(|r| r.plan.forfeited_credits().get())
        .collect();
    let reasons: Vec<Option<String>> = refunds.iter().map(|r| r.reason.clone()).collect();
    let times: Vec<DateTime<Utc>> = refunds.iter().map(|r| r.refunded_at).collect();
    let marked = sqlx::query(
        "UPDATE consumption_records c
         SET status = 'refunded', refunded_credits = r.refunded, forfeited_credits = r.forfeited,
             refund_reason = r.reason, refunded_at = r.at
         FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[],
                     $6::timestamptz[]) AS r(user_id, id, refunded, forfeited, reason, at)
         WHERE c.user_id = r.user_id AND c.id = r.id AND c.status = 'completed'",
    )
    .bind(&user_ids)
    .bind(&ids)
    .bind(&refunded)
    .bind(&forfeited)
    .bind(&reasons)
    .bind(&times)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if marked != refunds.len() as u64 {
        return Err(protocol(
            "a refunded consumption was not in state completed",
        ));
    }

    let mut lines: [Vec<i64>; 5] = Default::default();
    for refund in refunds {
        let shares = refund
            .plan
            .restore
            .iter()
            .map(|a| (a, true))
            .chain(refund.plan.forfeit.iter().map(|a| (a, false)));
        for (allocation, restored) in shares {
            lines[0].push(refund.user_id.get());
            lines[1].push(refund.consumption_id.get());
            lines[2].push(allocation.user_package_id.get());
            lines[3].push(if restored {
                allocation.credits.get()
            } else {
                0
            });
            lines[4].push(if restored {
                0
            } else {
                allocation.credits.get()
            });
        }
    }
    // `user_package_id + 0` keeps the grant's index (`consumption_allocations_by_grant`) out of
    // the lane's cached plan, which could not know that a grant may hold every allocation of
    // its user: found measured, a refund of a hot user's deduction read all of them. The key
    // (user, consumption) finds a consumption's one to few allocations.
    let updated = sqlx::query(
        "UPDATE consumption_allocations a
         SET refunded_credits = a.refunded_credits + x.refunded,
             forfeited_credits = a.forfeited_credits + x.forfeited
         FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])
              AS x(user_id, consumption_id, user_package_id, refunded, forfeited)
         WHERE a.user_id = x.user_id AND a.consumption_id = x.consumption_id
           AND a.user_package_id + 0 = x.user_package_id",
    )
    .bind(&lines[0])
    .bind(&lines[1])
    .bind(&lines[2])
    .bind(&lines[3])
    .bind(&lines[4])
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated != lines[0].len() as u64 {
        return Err(protocol("a refunded allocation does not exist"));
    }
    Ok(())
}
