//! The check that matters: after a phase, with nothing of it in flight, every credit of every
//! user of the run is accounted for in the database.
//!
//! For each user: starting credits = remaining (the sum over the user's grants) + acknowledged
//! deductions - acknowledged refunds. Every acknowledged consumption exists exactly once, for
//! the right user and cost; no consumption exists that nobody was told about; refunds match what
//! was acknowledged. Requests that got no definite answer (`503`, a dropped connection) may or
//! may not have been applied: they are looked up by idempotency key (or consumption id) and
//! counted when found, so they neither hide nor fake a difference. Grants never expire in a
//! run, so nothing may be forfeited or expired.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use sqlx::AnyPool;

use crate::Error;
use crate::driver::Ledger;
use crate::fixtures::UserRange;

/// Problems reported word for word (all are counted).
pub const PROBLEMS_KEPT_MAX: usize = 50;

/// Where a ledger lives: the engine's tables or the baseline's, shaped alike.
#[derive(Clone, Copy, Debug)]
pub struct Tables {
    pub user_packages: &'static str,
    pub consumption_records: &'static str,
}

pub const ENGINE_TABLES: Tables = Tables {
    user_packages: "user_packages",
    consumption_records: "consumption_records",
};

pub const BASELINE_TABLES: Tables = Tables {
    user_packages: "loadtest_baseline.user_packages",
    consumption_records: "loadtest_baseline.consumption_records",
};

/// The verdict on one phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Conservation {
    pub ok: bool,
    pub users: u64,
    /// Acknowledged deductions checked.
    pub consumptions: u64,
    /// Acknowledged refunds checked.
    pub refunds: u64,
    /// Deducts without a definite answer, and how many of them the database shows as charged.
    pub unsettled_deducts: u64,
    pub unsettled_deducts_charged: u64,
    /// Refunds without a definite answer, and how many of them the database shows as done.
    pub unsettled_refunds: u64,
    pub unsettled_refunds_done: u64,
    /// Every difference found; the first [`PROBLEMS_KEPT_MAX`] are in `problems`.
    pub problems_total: u64,
    pub problems: Vec<String>,
}

impl Conservation {
    fn problem(&mut self, text: String) {
        self.problems_total += 1;
        if self.problems.len() < PROBLEMS_KEPT_MAX {
            self.problems.push(text);
        }
    }
}

/// A row of `consumption_records`.
#[derive(Debug, sqlx::FromRow)]
struct Record {
    user_id: i64,
    id: i64,
    credits_cost: i64,
    refunded_credits: i64,
    forfeited_credits: i64,
    idempotency_key: Option<String>,
}

/// Compares `ledger` (what the phase was told) with `tables` for every user of `users`.
pub async fn check(
    pool: &AnyPool,
    tables: Tables,
    users: UserRange,
    credits_per_user: i64,
    ledger: &Ledger,
) -> Result<Conservation, Error> {
    let mut verdict = Conservation {
        users: users.count,
        consumptions: ledger.deducts.len() as u64,
        refunds: ledger.refunds.len() as u64,
        unsettled_deducts: ledger.unsettled_deducts.len() as u64,
        unsettled_refunds: ledger.unsettled_refunds.len() as u64,
        ..Conservation::default()
    };
    let grants: Vec<(i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT user_id, CAST(SUM(remaining_credits) AS BIGINT),
                CAST(SUM(expired_credits) AS BIGINT)
         FROM {} WHERE user_id BETWEEN $1 AND $2 GROUP BY user_id",
        tables.user_packages
    )))
    .bind(users.first)
    .bind(users.last())
    .fetch_all(pool)
    .await?;
    let records: Vec<Record> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT user_id, id, credits_cost, refunded_credits, forfeited_credits, idempotency_key
         FROM {} WHERE user_id BETWEEN $1 AND $2",
        tables.consumption_records
    )))
    .bind(users.first)
    .bind(users.last())
    .fetch_all(pool)
    .await?;
    let acked_ids: HashSet<i64> = ledger.deducts.iter().map(|a| a.consumption_id).collect();
    // An acknowledged id recorded for a user outside the run is in the wrong place. Read by the
    // range of acknowledged ids (a list of ids would pass SQLite's limit on bound values).
    let (lowest, highest) = (
        acked_ids.iter().min().copied().unwrap_or(0),
        acked_ids.iter().max().copied().unwrap_or(-1),
    );
    let strays: Vec<(i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT user_id, id FROM {} WHERE id BETWEEN $1 AND $2 AND (user_id < $3 OR user_id > $4)",
        tables.consumption_records
    )))
    .bind(lowest)
    .bind(highest)
    .bind(users.first)
    .bind(users.last())
    .fetch_all(pool)
    .await?;
    let strays = strays.into_iter().filter(|(_, id)| acked_ids.contains(id));

    let mut by_id: HashMap<i64, Vec<&Record>> = HashMap::with_capacity(records.len());
    for record in &records {
        by_id.entry(record.id).or_default().push(record);
    }
    for (user_id, id) in strays {
        verdict.problem(format!(
            "acknowledged consumption {id} is recorded for user {user_id}, outside the run"
        ));
    }
    let mut charged: HashMap<i64, i64> = HashMap::new();
    let mut refunded: HashMap<i64, i64> = HashMap::new();

    // Every acknowledged deduction: exactly once, the right user, the right cost.
    let mut acked: HashSet<i64> = HashSet::with_capacity(ledger.deducts.len());
    for ack in &ledger.deducts {
        if !acked.insert(ack.consumption_id) {
            verdict.problem(format!(
                "consumption {} was acknowledged twice as a new charge",
                ack.consumption_id
            ));
            continue;
        }
        *charged.entry(ack.user_id).or_default() += ack.credits_cost;
        match by_id.get(&ack.consumption_id).map(Vec::as_slice) {
            None | Some([]) => verdict.problem(format!(
                "acknowledged consumption {} of user {} is not in the database",
                ack.consumption_id, ack.user_id
            )),
            Some([record]) => {
                if record.user_id != ack.user_id || record.credits_cost != ack.credits_cost {
                    verdict.problem(format!(
                        "consumption {} was acknowledged for user {} costing {}, recorded for \
                         user {} costing {}",
                        ack.consumption_id,
                        ack.user_id,
                        ack.credits_cost,
                        record.user_id,
                        record.credits_cost
                    ));
                }
            }
            Some(many) => verdict.problem(format!(
                "acknowledged consumption {} is recorded {} times",
                ack.consumption_id,
                many.len()
            )),
        }
    }

    // Every other consumption of the run's users must be an unanswered deduct that went through.
    let unsettled: HashSet<(i64, &str)> = ledger
        .unsettled_deducts
        .iter()
        .map(|(user_id, key)| (*user_id, key.as_str()))
        .collect();
    for record in records.iter().filter(|r| !acked.contains(&r.id)) {
        let key = record.idempotency_key.as_deref().unwrap_or_default();
        if unsettled.contains(&(record.user_id, key)) {
            verdict.unsettled_deducts_charged += 1;
            *charged.entry(record.user_id).or_default() += record.credits_cost;
        } else {
            verdict.problem(format!(
                "consumption {} of user {} (key {key:?}, cost {}) was never acknowledged",
                record.id, record.user_id, record.credits_cost
            ));
        }
    }

    // Refunds: as acknowledged, and none that nobody asked for.
    let mut refund_acked: HashSet<i64> = HashSet::with_capacity(ledger.refunds.len());
    for ack in &ledger.refunds {
        if !refund_acked.insert(ack.consumption_id) {
            verdict.problem(format!(
                "consumption {} was refunded twice (both acknowledged as new)",
                ack.consumption_id
            ));
            continue;
        }
        *refunded.entry(ack.user_id).or_default() += ack.refunded_credits;
        let Some([record]) = by_id.get(&ack.consumption_id).map(Vec::as_slice) else {
            continue; // Reported above.
        };
        if (record.refunded_credits, record.forfeited_credits)
            != (ack.refunded_credits, ack.forfeited_credits)
        {
            verdict.problem(format!(
                "the refund of consumption {} was acknowledged as {} refunded + {} forfeited, \
                 recorded as {} + {}",
                ack.consumption_id,
                ack.refunded_credits,
                ack.forfeited_credits,
                record.refunded_credits,
                record.forfeited_credits
            ));
        }
    }
    let unsettled_refunds: HashSet<i64> = ledger.unsettled_refunds.iter().copied().collect();
    let mut forfeited = 0;
    for record in &records {
        forfeited += record.forfeited_credits;
        let touched = record.refunded_credits > 0 || record.forfeited_credits > 0;
        if !touched || refund_acked.contains(&record.id) {
            continue;
        }
        if unsettled_refunds.contains(&record.id) {
            verdict.unsettled_refunds_done += 1;
            *refunded.entry(record.user_id).or_default() += record.refunded_credits;
        } else {
            verdict.problem(format!(
                "consumption {} of user {} was refunded without an acknowledged refund",
                record.id, record.user_id
            ));
        }
    }
    if forfeited != 0 {
        verdict.problem(format!(
            "{forfeited} credits were forfeited, though no grant of the run expires"
        ));
    }

    // The balance of every user.
    let balances: HashMap<i64, (i64, i64)> = grants
        .into_iter()
        .map(|(user_id, remaining, expired)| (user_id, (remaining, expired)))
        .collect();
    for user_id in users.ids() {
        let Some(&(remaining, expired)) = balances.get(&user_id) else {
            verdict.problem(format!("user {user_id} has no grant"));
            continue;
        };
        if expired != 0 {
            verdict.problem(format!(
                "user {user_id} has {expired} expired credits, though no grant expires"
            ));
        }
        let deducted = charged.get(&user_id).copied().unwrap_or(0);
        let returned = refunded.get(&user_id).copied().unwrap_or(0);
        let accounted = remaining + deducted - returned;
        if accounted != credits_per_user {
            verdict.problem(format!(
                "user {user_id}: started with {credits_per_user}, but remaining {remaining} + \
                 acknowledged deductions {deducted} - acknowledged refunds {returned} = \
                 {accounted} (off by {})",
                accounted - credits_per_user
            ));
        }
    }

    for anomaly in &ledger.anomalies {
        verdict.problem(anomaly.clone());
    }
    // The anomalies beyond those kept word for word still count.
    let unkept = ledger.anomalies_total - ledger.anomalies.len() as u64;
    verdict.problems_total += unkept;
    verdict.ok = verdict.problems_total == 0;
    Ok(verdict)
}
