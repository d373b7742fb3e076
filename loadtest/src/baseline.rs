//! The naive design this engine replaces, as a [`Target`] for comparison: every request is its
//! own PostgreSQL transaction. A deduct locks the user's active grants (`SELECT ... FOR UPDATE`
//! in burn-down order), computes the burn-down, updates each drawn grant, inserts the
//! consumption record (unique per user and idempotency key) and its allocations, and commits
//! before answering. A check is a plain `SELECT SUM`. A refund locks the consumption and its
//! grants and gives the credits back.
//!
//! It lives in its own schema, [`SCHEMA`], reset at the start of every baseline phase, with
//! tables shaped like the engine's (the same names and balance CHECKs), so the conservation
//! check reads both the same way. Unlike the engine it writes no audit event per deduct, which
//! only flatters it.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

use crate::Error;
use crate::config::Workload;
use crate::fixtures::UserRange;
use crate::target::{DeductReply, Outcome, RefundReply, Session, Target};

/// The schema of the baseline's tables, in the engine's database.
pub const SCHEMA: &str = "loadtest_baseline";

/// Most connections the baseline holds. A closed loop gets one per worker up to this; an open
/// loop (`--rate`) spreads its workers over at most this many. PostgreSQL's default
/// `max_connections` is 100, and the engine (with `--target`) keeps its own pool open.
pub const POOL_MAX: usize = 64;

/// Longest a request waits for a pooled connection before it counts as `overloaded`, as the
/// engine's own pool does.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Drops and recreates the baseline's tables. Allocations carry no foreign keys, as the
/// engine's do not (their per-row triggers cost the hottest insert and guard nothing the
/// transaction does not already); the comparison is of designs, not of schema choices.
const RESET_SCHEMA: &str = r#"
DROP SCHEMA IF EXISTS loadtest_baseline CASCADE;
CREATE SCHEMA loadtest_baseline;
CREATE TABLE loadtest_baseline.user_packages (
    user_id           bigint NOT NULL CHECK (user_id > 0),
    id                bigint GENERATED ALWAYS AS IDENTITY,
    status            text NOT NULL CHECK (status IN ('active', 'depleted', 'expired', 'revoked')),
    priority          integer NOT NULL,
    total_credits     bigint NOT NULL CHECK (total_credits >= 0),
    used_credits      bigint NOT NULL DEFAULT 0 CHECK (used_credits >= 0),
    remaining_credits bigint NOT NULL CHECK (remaining_credits >= 0),
    expired_credits   bigint NOT NULL DEFAULT 0 CHECK (expired_credits >= 0),
    expires_at        timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, id),
    CONSTRAINT user_packages_balance CHECK (used_credits + remaining_credits + expired_credits = total_credits)
);
CREATE TABLE loadtest_baseline.consumption_records (
    user_id           bigint NOT NULL CHECK (user_id > 0),
    id                bigint GENERATED ALWAYS AS IDENTITY,
    action_key        text NOT NULL,
    quantity          bigint NOT NULL CHECK (quantity > 0),
    credits_cost      bigint NOT NULL CHECK (credits_cost >= 0),
    idempotency_key   text CHECK (char_length(idempotency_key) BETWEEN 1 AND 128),
    remaining_after   bigint NOT NULL CHECK (remaining_after >= 0),
    status            text NOT NULL DEFAULT 'completed' CHECK (status IN ('completed', 'refunded')),
    refunded_credits  bigint NOT NULL DEFAULT 0 CHECK (refunded_credits >= 0),
    forfeited_credits bigint NOT NULL DEFAULT 0 CHECK (forfeited_credits >= 0),
    refunded_at       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, id),
    CONSTRAINT consumption_records_idempotency UNIQUE (user_id, idempotency_key),
    CONSTRAINT consumption_records_refund_le_cost CHECK (refunded_credits + forfeited_credits <= credits_cost)
);
CREATE INDEX consumption_records_by_id ON loadtest_baseline.consumption_records (id);
CREATE TABLE loadtest_baseline.consumption_allocations (
    user_id           bigint NOT NULL,
    consumption_id    bigint NOT NULL,
    user_package_id   bigint NOT NULL,
    credits           bigint NOT NULL CHECK (credits > 0),
    refunded_credits  bigint NOT NULL DEFAULT 0 CHECK (refunded_credits >= 0),
    forfeited_credits bigint NOT NULL DEFAULT 0 CHECK (forfeited_credits >= 0),
    PRIMARY KEY (user_id, consumption_id, user_package_id),
    CONSTRAINT consumption_allocations_le_credits CHECK (refunded_credits + forfeited_credits <= credits)
);
"#;

const INSERT_GRANTS: &str = "INSERT INTO loadtest_baseline.user_packages
        (user_id, status, priority, total_credits, remaining_credits)
    SELECT u, 'active', 100, $2, $2 FROM UNNEST($1::bigint[]) AS u";

/// The user's spendable grants, locked, in burn-down order.
const LOCK_SPENDABLE_GRANTS: &str = "SELECT id, remaining_credits
    FROM loadtest_baseline.user_packages
    WHERE user_id = $1 AND status = 'active' AND (expires_at IS NULL OR expires_at > now())
    ORDER BY priority, expires_at NULLS LAST, id
    FOR UPDATE";

const INSERT_RECORD: &str = "INSERT INTO loadtest_baseline.consumption_records
        (user_id, action_key, quantity, credits_cost, idempotency_key, remaining_after)
    VALUES ($1, $2, 1, $3, $4, $5)
    ON CONFLICT (user_id, idempotency_key) DO NOTHING
    RETURNING id";

const FIND_BY_KEY: &str = "SELECT id, credits_cost FROM loadtest_baseline.consumption_records
    WHERE user_id = $1 AND idempotency_key = $2";

const DRAW_GRANT: &str = "UPDATE loadtest_baseline.user_packages
    SET remaining_credits = remaining_credits - $3,
        used_credits = used_credits + $3,
        status = CASE WHEN remaining_credits - $3 = 0 THEN 'depleted' ELSE status END,
        updated_at = now()
    WHERE user_id = $1 AND id = $2";

const INSERT_ALLOCATION: &str = "INSERT INTO loadtest_baseline.consumption_allocations
        (user_id, consumption_id, user_package_id, credits)
    VALUES ($1, $2, $3, $4)";

const SUM_SPENDABLE: &str = "SELECT COALESCE(SUM(remaining_credits), 0)::bigint
    FROM loadtest_baseline.user_packages
    WHERE user_id = $1 AND status = 'active' AND (expires_at IS NULL OR expires_at > now())";

const FIND_OWNER: &str = "SELECT user_id FROM loadtest_baseline.consumption_records WHERE id = $1";

/// Every grant a refund may pay back into, locked in the same order as a deduct locks them,
/// so a refund and a deduct of one user never deadlock.
const LOCK_USER_GRANTS: &str = "SELECT id FROM loadtest_baseline.user_packages
    WHERE user_id = $1 AND status IN ('active', 'depleted')
    ORDER BY priority, expires_at NULLS LAST, id
    FOR UPDATE";

const LOCK_RECORD: &str = "SELECT status, refunded_credits, forfeited_credits
    FROM loadtest_baseline.consumption_records
    WHERE user_id = $1 AND id = $2
    FOR UPDATE";

/// A consumption's allocations, and whether each grant can still take credits back.
const ALLOCATIONS: &str = "SELECT a.user_package_id, a.credits,
        (g.status IN ('active', 'depleted') AND (g.expires_at IS NULL OR g.expires_at > now()))
    FROM loadtest_baseline.consumption_allocations a
    JOIN loadtest_baseline.user_packages g ON g.user_id = a.user_id AND g.id = a.user_package_id
    WHERE a.user_id = $1 AND a.consumption_id = $2";

const RETURN_TO_GRANT: &str = "UPDATE loadtest_baseline.user_packages
    SET remaining_credits = remaining_credits + $3,
        used_credits = used_credits - $3,
        status = 'active',
        updated_at = now()
    WHERE user_id = $1 AND id = $2";

const SETTLE_ALLOCATION: &str = "UPDATE loadtest_baseline.consumption_allocations
    SET refunded_credits = $4, forfeited_credits = $5
    WHERE user_id = $1 AND consumption_id = $2 AND user_package_id = $3";

const SETTLE_RECORD: &str = "UPDATE loadtest_baseline.consumption_records
    SET status = 'refunded', refunded_credits = $3, forfeited_credits = $4, refunded_at = now()
    WHERE user_id = $1 AND id = $2";

/// Connections for a workload: one per worker, at most [`POOL_MAX`].
pub fn pool_size(workload: &Workload) -> usize {
    workload.concurrency.min(POOL_MAX)
}

/// The baseline, ready to be driven.
#[derive(Clone, Debug)]
pub struct Baseline {
    pool: PgPool,
    action_key: Arc<str>,
    credits_cost: i64,
}

impl Baseline {
    /// Resets [`SCHEMA`], gives users `1..=workload.users` one grant each, and opens (and
    /// warms) the pool.
    pub async fn prepare(
        database: &PgConnectOptions,
        workload: &Workload,
        credits_cost: i64,
    ) -> Result<(Baseline, UserRange), Error> {
        let size = pool_size(workload);
        let pool = PgPoolOptions::new()
            .max_connections(u32::try_from(size).unwrap_or(u32::MAX))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(database.clone())
            .await?;
        sqlx::raw_sql(RESET_SCHEMA).execute(&pool).await?;
        let users = UserRange {
            first: 1,
            count: workload.users,
        };
        sqlx::query(INSERT_GRANTS)
            .bind(users.ids())
            .bind(workload.credits_per_user)
            .execute(&pool)
            .await?;
        // Open every connection now, so the phase does not time connection set-up.
        let mut held = Vec::with_capacity(size);
        for _ in 0..size {
            held.push(pool.acquire().await?);
        }
        drop(held);
        Ok((
            Baseline {
                pool,
                action_key: workload.action_key.as_str().into(),
                credits_cost,
            },
            users,
        ))
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}

impl Target for Baseline {
    type Session = Baseline;

    async fn session(&self) -> Result<Baseline, Error> {
        Ok(self.clone())
    }
}

/// Which grants pay `cost`, in burn-down order: `(grant id, credits)` pairs, or `None` when
/// the grants hold less than `cost` in total.
pub fn burn_down(grants: &[(i64, i64)], cost: i64) -> Option<Vec<(i64, i64)>> {
    let mut left = cost;
    let mut draws = Vec::new();
    for &(grant, remaining) in grants {
        if left == 0 {
            break;
        }
        let take = remaining.min(left);
        if take > 0 {
            draws.push((grant, take));
            left -= take;
        }
    }
    (left == 0).then_some(draws)
}

/// The outcome of a failed statement: a full pool is `overloaded`; a transaction PostgreSQL
/// aborted (unique violation, deadlock, serialization) is a `conflict` that applied nothing; a
/// lost connection is `unavailable`.
fn outcome_of(error: &sqlx::Error) -> Outcome {
    match error {
        sqlx::Error::PoolTimedOut => Outcome::Overloaded,
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("23505" | "40001" | "40P01") => Outcome::Conflict,
            _ => Outcome::Other,
        },
        _ => Outcome::Unavailable,
    }
}

impl Baseline {
    async fn try_deduct(&self, user_id: i64, key: &str) -> Result<DeductReply, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let grants: Vec<(i64, i64)> = sqlx::query_as(LOCK_SPENDABLE_GRANTS)
            .bind(user_id)
            .fetch_all(&mut *tx)
            .await?;
        let available: i64 = grants.iter().map(|(_, remaining)| remaining).sum();
        let Some(draws) = burn_down(&grants, self.credits_cost) else {
            // A retry of an acknowledged key answers its first result even when short now.
            let reply = replay(&mut tx, user_id, key).await?;
            tx.rollback().await?;
            return Ok(reply.unwrap_or(DeductReply::Failed(Outcome::Insufficient)));
        };
        let inserted: Option<i64> = sqlx::query_scalar(INSERT_RECORD)
            .bind(user_id)
            .bind(&*self.action_key)
            .bind(self.credits_cost)
            .bind(key)
            .bind(available - self.credits_cost)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(consumption_id) = inserted else {
            let reply = replay(&mut tx, user_id, key).await?;
            tx.rollback().await?;
            return Ok(reply.unwrap_or(DeductReply::Failed(Outcome::Other)));
        };
        for &(grant, credits) in &draws {
            sqlx::query(DRAW_GRANT)
                .bind(user_id)
                .bind(grant)
                .bind(credits)
                .execute(&mut *tx)
                .await?;
        }
        for &(grant, credits) in &draws {
            sqlx::query(INSERT_ALLOCATION)
                .bind(user_id)
                .bind(consumption_id)
                .bind(grant)
                .bind(credits)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(DeductReply::Acked {
            consumption_id,
            credits_cost: self.credits_cost,
            replayed: false,
        })
    }

    async fn try_check(&self, user_id: i64) -> Result<Outcome, sqlx::Error> {
        let _remaining: i64 = sqlx::query_scalar(SUM_SPENDABLE)
            .bind(user_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(Outcome::Ok)
    }

    async fn try_refund(&self, consumption_id: i64) -> Result<RefundReply, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let owner: Option<i64> = sqlx::query_scalar(FIND_OWNER)
            .bind(consumption_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(user_id) = owner else {
            tx.rollback().await?;
            return Ok(RefundReply::Failed(Outcome::Other));
        };
        sqlx::query(LOCK_USER_GRANTS)
            .bind(user_id)
            .fetch_all(&mut *tx)
            .await?;
        let (status, refunded, forfeited): (String, i64, i64) = sqlx::query_as(LOCK_RECORD)
            .bind(user_id)
            .bind(consumption_id)
            .fetch_one(&mut *tx)
            .await?;
        if status == "refunded" {
            tx.rollback().await?;
            return Ok(RefundReply::Acked {
                refunded_credits: refunded,
                forfeited_credits: forfeited,
                replayed: true,
            });
        }
        let allocations: Vec<(i64, i64, bool)> = sqlx::query_as(ALLOCATIONS)
            .bind(user_id)
            .bind(consumption_id)
            .fetch_all(&mut *tx)
            .await?;
        let (mut refunded, mut forfeited) = (0, 0);
        for (grant, credits, live) in allocations {
            let (back, void) = if live { (credits, 0) } else { (0, credits) };
            if live {
                sqlx::query(RETURN_TO_GRANT)
                    .bind(user_id)
                    .bind(grant)
                    .bind(credits)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(SETTLE_ALLOCATION)
                .bind(user_id)
                .bind(consumption_id)
                .bind(grant)
                .bind(back)
                .bind(void)
                .execute(&mut *tx)
                .await?;
            refunded += back;
            forfeited += void;
        }
        sqlx::query(SETTLE_RECORD)
            .bind(user_id)
            .bind(consumption_id)
            .bind(refunded)
            .bind(forfeited)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(RefundReply::Acked {
            refunded_credits: refunded,
            forfeited_credits: forfeited,
            replayed: false,
        })
    }
}

/// The first answer of an idempotency key the user already used, if any.
async fn replay(
    tx: &mut Transaction<'static, Postgres>,
    user_id: i64,
    key: &str,
) -> Result<Option<DeductReply>, sqlx::Error> {
    let found: Option<(i64, i64)> = sqlx::query_as(FIND_BY_KEY)
        .bind(user_id)
        .bind(key)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(
        found.map(|(consumption_id, credits_cost)| DeductReply::Acked {
            consumption_id,
            credits_cost,
            replayed: true,
        }),
    )
}

impl Session for Baseline {
    async fn deduct(&mut self, user_id: i64, idempotency_key: &str) -> DeductReply {
        self.try_deduct(user_id, idempotency_key)
            .await
            .unwrap_or_else(|error| DeductReply::Failed(outcome_of(&error)))
    }

    async fn check(&mut self, user_id: i64) -> Outcome {
        self.try_check(user_id)
            .await
            .unwrap_or_else(|error| outcome_of(&error))
    }

    async fn refund(&mut self, consumption_id: i64) -> RefundReply {
        self.try_refund(consumption_id)
            .await
            .unwrap_or_else(|error| RefundReply::Failed(outcome_of(&error)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burn_down_draws_in_order_and_is_all_or_nothing() {
        assert_eq!(burn_down(&[(1, 2), (2, 5)], 4), Some(vec![(1, 2), (2, 2)]));
        assert_eq!(burn_down(&[(1, 0), (2, 5)], 5), Some(vec![(2, 5)]));
        assert_eq!(burn_down(&[(1, 2), (2, 1)], 4), None);
        assert_eq!(burn_down(&[], 0), Some(vec![]));
    }
}
