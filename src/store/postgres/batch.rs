//! The batch writer's statements on PostgreSQL: a batch's rows go in array (`UNNEST`) queries
//! of one statement, so a batch of deductions and refunds is one round trip whatever its size.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnectOptions;
use sqlx::{PgConnection, Postgres};

use crate::store::portable::{POSTGRES, Portable};
use crate::store::writer::{
    BatchDialect, BatchRows, Events, GrantEffect, RefundEffect, grant_use_assignments,
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
    const ROWS_IN_ONE_STATEMENT: bool = true;

    /// A lane runs only statements that find their rows by key, a batch's worth at a time,
    /// so it always uses PostgreSQL's cached (generic) plans, which spare it planning every
    /// statement of every batch (left to itself, PostgreSQL kept planning anew: a generic plan
    /// costs each array at a fixed guess of rows, dearer than a batch's few), but never lets
    /// one scan a whole table or hash it: a plan cached while a new database's tables were
    /// nearly empty would otherwise do so for as long as the lane lives (measured on a new
    /// database: 1,764 deducts/s with the refunds' `UPDATE` scanning `consumption_records`;
    /// 6,749/s with every statement planned anew; 8,050/s with such plans forbidden).
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

    /// One statement, so a batch of deductions and refunds is one round trip (each round trip
    /// is two context switches on each side; measured on 2 cores, five more of them per batch
    /// cost about a quarter of the deducts/s). Its parts are data-modifying `WITH` queries, all
    /// run against one snapshot, so what depends on which deductions were inserted reads the
    /// ids the insert returns (`new`): their allocations, the grants' use and their events.
    /// `credits_batch_check` (migration 0003) fails the statement when a row it meant to update
    /// was not there, so a refused batch has written nothing.
    async fn write_rows(
        connection: &mut PgConnection,
        rows: &BatchRows,
        refunds: &[&RefundEffect],
    ) -> Result<HashSet<i64>, sqlx::Error> {
        let deducts = &rows.deducts;
        let allocations = &rows.allocations;
        let refunded = RefundColumns::of(refunds);
        let restores = &rows.restores;
        let events = &rows.events;
        let grant_use = grant_use_assignments("d.used");
        let inserted: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "WITH new AS (
                 INSERT INTO consumption_records (user_id, id, action_key, quantity, unit_cost,
                     credits_cost, price_version, idempotency_key, request_fingerprint,
                     remaining_after, metadata, created_at)
                 SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::bigint[],
                     $5::bigint[], $6::bigint[], $7::bigint[], $8::text[], $9::text[],
                     $10::bigint[], $11::jsonb[], $12::timestamptz[])
                 ON CONFLICT ON CONSTRAINT consumption_records_idempotency DO NOTHING
                 RETURNING id
             ), new_allocations AS (
                 -- `IS TRUE` keeps the `IN` a hashed subplan: left bare, it becomes a semi
                 -- join, which without hash joins (see `lane_options`) is a nested loop over
                 -- `new`, quadratic in the batch (measured, backend CPU for a batch of 1,000
                 -- deductions: 118-126 ms as a semi join, 52-71 ms hashed).
                 SELECT a.* FROM UNNEST($13::bigint[], $14::bigint[], $15::bigint[], $16::bigint[])
                     AS a(user_id, consumption_id, user_package_id, credits)
                 WHERE (a.consumption_id IN (SELECT id FROM new)) IS TRUE
             ), allocated AS (
                 INSERT INTO consumption_allocations (user_id, consumption_id, user_package_id, credits)
                 SELECT * FROM new_allocations
             ), refunded AS (
                 UPDATE consumption_records c
                 SET status = 'refunded', refunded_credits = r.refunded,
                     forfeited_credits = r.forfeited, refund_reason = r.reason, refunded_at = r.at
                 FROM UNNEST($17::bigint[], $18::bigint[], $19::bigint[], $20::bigint[],
                     $21::text[], $22::timestamptz[]) AS r(user_id, id, refunded, forfeited, reason, at)
                 WHERE c.user_id = r.user_id AND c.id = r.id AND c.status = 'completed'
                 RETURNING 1
             ), refunded_shares AS (
                 -- `user_package_id + 0` keeps the grant's index out of the cached plan, which
                 -- cannot know that one grant may hold every allocation of its user (measured:
                 -- a hot user's refund read them all); (user, consumption) finds one to few.
                 UPDATE consumption_allocations a
                 SET refunded_credits = a.refunded_credits + x.refunded,
                     forfeited_credits = a.forfeited_credits + x.forfeited
                 FROM UNNEST($23::bigint[], $24::bigint[], $25::bigint[], $26::bigint[],
                     $27::bigint[]) AS x(user_id, consumption_id, user_package_id, refunded, forfeited)
                 WHERE a.user_id = x.user_id AND a.consumption_id = x.consumption_id
                   AND a.user_package_id + 0 = x.user_package_id
                 RETURNING 1
             ), deltas AS (
                 SELECT d.user_id, d.id, sum(d.used)::bigint AS used
                 FROM (SELECT user_id, user_package_id, credits FROM new_allocations
                       UNION ALL
                       SELECT * FROM UNNEST($28::bigint[], $29::bigint[], $30::bigint[]))
                     AS d(user_id, id, used)
                 GROUP BY d.user_id, d.id
                 HAVING sum(d.used) <> 0
             ), used AS (
                 UPDATE user_packages g
                 SET {grant_use}, updated_at = now()
                 FROM deltas d
                 WHERE g.user_id = d.user_id AND g.id = d.id
                 RETURNING 1
             ), logged AS (
                 INSERT INTO billing_events (kind, user_id, payload, created_at)
                 SELECT e.kind, e.user_id, e.payload, e.at
                 FROM UNNEST($31::text[], $32::bigint[], $33::jsonb[], $34::timestamptz[],
                     $35::bigint[]) WITH ORDINALITY AS e(kind, user_id, payload, at, needs, n)
                 WHERE e.needs IS NULL OR e.needs IN (SELECT id FROM new)
                 ORDER BY e.n
             )
             SELECT ARRAY(SELECT id FROM new)
             WHERE credits_batch_check(
                 (SELECT count(*) FROM refunded) = cardinality($17::bigint[]),
                 'a refunded consumption was not in state completed')
               AND credits_batch_check(
                 (SELECT count(*) FROM refunded_shares) = cardinality($23::bigint[]),
                 'a refunded allocation does not exist')
               AND credits_batch_check(
                 (SELECT count(*) FROM used) = (SELECT count(*) FROM deltas),
                 'a grant named by an allocation does not exist')"
        )))
        .bind(&deducts.user_ids)
        .bind(&deducts.ids)
        .bind(&deducts.action_keys)
        .bind(&deducts.quantities)
        .bind(&deducts.unit_costs)
        .bind(&deducts.credits_costs)
        .bind(&deducts.price_versions)
        .bind(&deducts.idempotency_keys)
        .bind(&deducts.fingerprints)
        .bind(&deducts.remaining_after)
        .bind(&deducts.metadata)
        .bind(&deducts.created_at)
        .bind(&allocations.user_ids)
        .bind(&allocations.consumption_ids)
        .bind(&allocations.user_package_ids)
        .bind(&allocations.credits)
        .bind(&refunded.user_ids)
        .bind(&refunded.ids)
        .bind(&refunded.refunded)
        .bind(&refunded.forfeited)
        .bind(&refunded.reasons)
        .bind(&refunded.times)
        .bind(&refunded.shares[0])
        .bind(&refunded.shares[1])
        .bind(&refunded.shares[2])
        .bind(&refunded.shares[3])
        .bind(&refunded.shares[4])
        .bind(&restores.user_ids)
        .bind(&restores.grant_ids)
        .bind(&restores.used)
        .bind(&events.kinds)
        .bind(&events.user_ids)
        .bind(&events.payloads)
        .bind(&events.times)
        .bind(&events.needs)
        .fetch_one(connection)
        .await?;
        Ok(inserted.into_iter().collect())
    }

    async fn find_consumptions_by_keys(
        connection: &mut PgConnection,
        user_ids: &[i64],
        keys: &[&str],
    ) -> Result<Vec<(String, StoredConsumption)>, sqlx::Error> {
        super::find_consumptions_by_keys(connection, user_ids, keys).await
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

/// The refunds of a batch as column arrays: one row per consumption, and one per share of an
/// allocation (what it gives back and what it forfeits).
#[derive(Default)]
struct RefundColumns {
    user_ids: Vec<i64>,
    ids: Vec<i64>,
    refunded: Vec<i64>,
    forfeited: Vec<i64>,
    reasons: Vec<Option<String>>,
    times: Vec<DateTime<Utc>>,
    /// user, consumption, grant, refunded, forfeited
    shares: [Vec<i64>; 5],
}

impl RefundColumns {
    fn of(refunds: &[&RefundEffect]) -> RefundColumns {
        let mut columns = RefundColumns::default();
        for refund in refunds {
            columns.user_ids.push(refund.user_id.get());
            columns.ids.push(refund.consumption_id.get());
            columns.refunded.push(refund.plan.refunded_credits().get());
            columns
                .forfeited
                .push(refund.plan.forfeited_credits().get());
            columns.reasons.push(refund.reason.clone());
            columns.times.push(refund.refunded_at);
            for (grant_id, refunded, forfeited) in refund.plan.shares() {
                columns.shares[0].push(refund.user_id.get());
                columns.shares[1].push(refund.consumption_id.get());
                columns.shares[2].push(grant_id.get());
                columns.shares[3].push(refunded);
                columns.shares[4].push(forfeited);
            }
        }
        columns
    }
}
