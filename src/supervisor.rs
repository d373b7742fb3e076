//! Housekeeping beside the request path: grant expiry, reconciliation and the database health
//! probe. (Restarting a wallet that panicked is the registry's wallet supervisor's job, in
//! [`crate::registry`].)
//!
//! Expiry: a grant is never spendable at or after its `expires_at` (the ledger checks validity
//! against the clock on every deduct). The expiry job then records it: each tick reads the due
//! grants from the expiry index and asks each owner's wallet to expire them, so the change
//! goes through the wallet and the batch writer like any other and is written once, with its
//! `billing_package_expired` event. The first tick runs at start-up and catches up on grants
//! that expired while the engine was down.
//!
//! Reconciliation compares every grant's stored balance with its ledger (see
//! [`crate::store::reconcile`] for the formula) and each live wallet's memory with the database.
//! A mismatch is logged at warn, answered to whoever asked, and written as a
//! `billing_reconciliation_mismatch` event, and counted in `credits_reconciliation_mismatches_total`.
//! It is never "fixed": a mismatch means a bug or a hand
//! edit, and an operator decides what the right balance is.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::domain::{Balance, Credits, Grant, GrantStatus, UserId, UserPackageId};
use crate::metrics;
use crate::registry::Registry;
use crate::store::Db;
use crate::store::reconcile::{LedgerMismatch, OrphanAllocation};
use crate::wallet::{WalletMsg, WalletSnapshot};

/// Mismatches one run reports and writes as events (ledger and wallet together); beyond it the
/// report says `truncated`. A thousand is already an incident, not a list to read.
pub const MISMATCHES_MAX: usize = 1_000;

/// Live wallets one run asks for a snapshot. Successive runs start where the last left off, so
/// every wallet is visited when more than this are in memory.
pub const WALLETS_CHECKED_MAX: usize = 10_000;

/// How long a run waits for one wallet's snapshot; a wallet slower than that is counted busy.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(2);

/// One disagreement, tagged by what disagreed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Mismatch {
    /// A grant's stored balance against its allocations.
    Ledger(LedgerMismatch),
    /// A live wallet's memory against the database.
    Wallet(WalletMismatch),
    /// An allocation whose consumption record or grant is missing.
    Allocation(OrphanAllocation),
}

impl Mismatch {
    pub fn user_id(&self) -> i64 {
        match self {
            Mismatch::Ledger(mismatch) => mismatch.user_id,
            Mismatch::Wallet(mismatch) => mismatch.user_id,
            Mismatch::Allocation(orphan) => orphan.user_id,
        }
    }

    pub fn user_package_id(&self) -> i64 {
        match self {
            Mismatch::Ledger(mismatch) => mismatch.user_package_id,
            Mismatch::Wallet(mismatch) => mismatch.user_package_id,
            Mismatch::Allocation(orphan) => orphan.user_package_id,
        }
    }
}

/// A grant a live wallet holds differently from the database (or holds and the database does
/// not, or the other way round: then one side is `null`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct WalletMismatch {
    pub user_id: i64,
    pub user_package_id: i64,
    pub memory: Option<GrantView>,
    pub stored: Option<GrantView>,
}

/// The part of a grant reconciliation compares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct GrantView {
    pub status: GrantStatus,
    pub unlimited: bool,
    pub total_credits: Credits,
    pub used_credits: Credits,
    pub remaining_credits: Credits,
    pub expired_credits: Credits,
}

impl GrantView {
    fn of(grant: &Grant) -> GrantView {
        let (unlimited, total, used, remaining, expired) = match grant.balance {
            Balance::Limited {
                total,
                used,
                remaining,
                expired,
            } => (false, total, used, remaining, expired),
            Balance::Unlimited { used } => {
                (true, Credits::ZERO, used, Credits::ZERO, Credits::ZERO)
            }
        };
        GrantView {
            status: grant.status,
            unlimited,
            total_credits: total,
            used_credits: used,
            remaining_credits: remaining,
            expired_credits: expired,
        }
    }
}

/// What `GET /api/admin/billing/reconciliation` answers and the job logs.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ReconciliationReport {
    pub checked_grants: i64,
    /// Live wallets whose memory was compared (idle ones: nothing in flight).
    pub checked_wallets: usize,
    /// Live wallets skipped this run: effects in flight, a reload pending, or no answer in time.
    pub busy_wallets: usize,
    pub mismatches: Vec<Mismatch>,
    /// More mismatches exist than `MISMATCHES_MAX`; only the first are reported and written.
    pub truncated: bool,
    pub checked_at: DateTime<Utc>,
}

/// Runs reconciliation; shared by the job and the admin endpoint.
pub struct Reconciler {
    db: Db,
    registry: Arc<Registry>,
    clock: Arc<dyn Clock>,
    /// Where the next run starts among live wallets, so bounded runs rotate through all.
    wallet_cursor: AtomicUsize,
}

impl Reconciler {
    pub fn new(db: Db, registry: Arc<Registry>, clock: Arc<dyn Clock>) -> Reconciler {
        Reconciler {
            db,
            registry,
            clock,
            wallet_cursor: AtomicUsize::new(0),
        }
    }

    /// Checks now: reads the ledger and live wallets, writes one event per mismatch, changes
    /// no balance.
    #[tracing::instrument(skip(self))]
    pub async fn run(&self) -> Result<ReconciliationReport, sqlx::Error> {
        let checked_at = self.clock.now();
        let ledger = self.db.ledger_mismatches(MISMATCHES_MAX).await?;
        let (orphans, orphans_truncated) = self.db.orphan_allocations(MISMATCHES_MAX).await?;
        let wallets = self.check_wallets().await;

        let mut truncated = ledger.truncated || orphans_truncated;
        let mut mismatches: Vec<Mismatch> = ledger
            .mismatches
            .into_iter()
            .map(Mismatch::Ledger)
            .collect();
        let others = orphans
            .into_iter()
            .map(Mismatch::Allocation)
            .chain(wallets.mismatches.into_iter().map(Mismatch::Wallet));
        for mismatch in others {
            if mismatches.len() >= MISMATCHES_MAX {
                truncated = true;
                break;
            }
            mismatches.push(mismatch);
        }

        for mismatch in &mismatches {
            tracing::warn!(
                user_id = mismatch.user_id(),
                user_package_id = mismatch.user_package_id(),
                ?mismatch,
                "reconciliation mismatch"
            );
        }
        let events: Vec<(i64, serde_json::Value)> = mismatches
            .iter()
            .map(|mismatch| {
                // Plain structs with string keys: serialization cannot fail.
                let payload = serde_json::to_value(mismatch).unwrap_or_default();
                (mismatch.user_id(), payload)
            })
            .collect();
        self.db.insert_mismatch_events(&events, checked_at).await?;
        metrics::reconciliation_finished(mismatches.len());

        Ok(ReconciliationReport {
            checked_grants: ledger.checked_grants,
            checked_wallets: wallets.checked,
            busy_wallets: wallets.busy,
            mismatches,
            truncated,
            checked_at,
        })
    }

    /// Asks up to `WALLETS_CHECKED_MAX` live wallets, one at a time, for their snapshot.
    async fn check_wallets(&self) -> WalletCheck {
        let offset = self
            .wallet_cursor
            .fetch_add(WALLETS_CHECKED_MAX, Ordering::Relaxed);
        let users = self.registry.live_users(offset, WALLETS_CHECKED_MAX);
        let mut check = WalletCheck::default();
        for user_id in users {
            let ask = self
                .registry
                .ask_live(user_id, |reply| WalletMsg::Snapshot { reply });
            match tokio::time::timeout(SNAPSHOT_WAIT, ask).await {
                Ok(Some(Ok(WalletSnapshot::Ready { memory, stored }))) => {
                    check.checked += 1;
                    check
                        .mismatches
                        .extend(compare_wallet(user_id, &memory, &stored));
                }
                // The wallet stopped since it was listed: its successor loads from the database.
                Ok(None) => {}
                Ok(Some(Ok(WalletSnapshot::Busy))) | Err(_) => check.busy += 1,
                Ok(Some(Err(error))) => {
                    tracing::warn!(%user_id, %error, "wallet snapshot failed");
                    check.busy += 1;
                }
            }
        }
        check
    }
}

#[derive(Default)]
struct WalletCheck {
    checked: usize,
    busy: usize,
    mismatches: Vec<WalletMismatch>,
}

/// Every grant whose status or balance differs between memory and the database, or that only
/// one side holds.
fn compare_wallet(user_id: UserId, memory: &[Grant], stored: &[Grant]) -> Vec<WalletMismatch> {
    let mut sides: BTreeMap<UserPackageId, (Option<GrantView>, Option<GrantView>)> =
        BTreeMap::new();
    for grant in memory {
        sides.entry(grant.id).or_default().0 = Some(GrantView::of(grant));
    }
    for grant in stored {
        sides.entry(grant.id).or_default().1 = Some(GrantView::of(grant));
    }
    sides
        .into_iter()
        .filter(|(_, (memory, stored))| memory != stored)
        .map(|(id, (memory, stored))| WalletMismatch {
            user_id: user_id.get(),
            user_package_id: id.get(),
            memory,
            stored,
        })
        .collect()
}

/// Starts the periodic reconciliation on `tracker`; it stops when `stop` fires (a run in
/// progress is dropped: it only reads, and its events go in one statement). An `interval` of
/// zero disables it. The first run is one interval after start.
pub fn spawn_reconciliation(
    reconciler: Arc<Reconciler>,
    interval: Duration,
    stop: CancellationToken,
    tracker: &TaskTracker,
) {
    if interval.is_zero() {
        tracing::info!("reconciliation job disabled");
        return;
    }
    let first = Instant::now() + interval;
    spawn_periodic(
        "reconciliation",
        first,
        interval,
        stop,
        tracker,
        move || {
            let reconciler = reconciler.clone();
            async move {
                match reconciler.run().await {
                    Ok(report) => tracing::info!(
                        checked_grants = report.checked_grants,
                        checked_wallets = report.checked_wallets,
                        busy_wallets = report.busy_wallets,
                        mismatches = report.mismatches.len(),
                        truncated = report.truncated,
                        "reconciliation run finished"
                    ),
                    Err(error) => tracing::warn!(%error, "reconciliation run failed"),
                }
            }
        },
    );
}

/// Due grants read per query; a tick reads again while a full page comes back.
pub const EXPIRIES_PER_QUERY_MAX: i64 = 1_000;
/// Queries one tick makes at most, bounding a catch-up after a long outage to this many pages
/// per tick (the next tick goes on).
const EXPIRY_QUERIES_PER_TICK_MAX: usize = 100;

/// Marks due grants expired through their wallets.
pub struct Expirer {
    db: Db,
    registry: Arc<Registry>,
    clock: Arc<dyn Clock>,
}

impl Expirer {
    pub fn new(db: Db, registry: Arc<Registry>, clock: Arc<dyn Clock>) -> Expirer {
        Expirer {
            db,
            registry,
            clock,
        }
    }

    /// Expires every grant due at the clock's now; answers how many this run expired. A grant
    /// that another run, or an operator's revoke, ended first is skipped.
    pub async fn run_once(&self) -> Result<usize, crate::error::EngineError> {
        let mut expired = 0;
        for _ in 0..EXPIRY_QUERIES_PER_TICK_MAX {
            let now = self.clock.now();
            let due = self.db.due_expiries(now, EXPIRIES_PER_QUERY_MAX).await?;
            let full = due.len() as i64 == EXPIRIES_PER_QUERY_MAX;
            let mut progressed = false;
            for (user_id, grant_id) in due {
                let answer = self
                    .registry
                    .ask(user_id, |reply| WalletMsg::Expire { grant_id, reply })
                    .await;
                match answer {
                    Ok(_) => {
                        expired += 1;
                        progressed = true;
                    }
                    Err(crate::error::EngineError::GrantStatusConflict { .. }) => {}
                    Err(error) => {
                        tracing::warn!(%user_id, %error, "grant expiry deferred to the next tick");
                    }
                }
            }
            if !full || !progressed {
                break;
            }
        }
        Ok(expired)
    }
}

/// Runs the expiry job: once at start (catch-up), then every `tick`, until `stop`.
pub fn spawn_expiry(
    expirer: Arc<Expirer>,
    tick: Duration,
    stop: CancellationToken,
    tracker: &TaskTracker,
) {
    if tick.is_zero() {
        tracing::info!("expiry job disabled");
        return;
    }
    spawn_periodic("expiry", Instant::now(), tick, stop, tracker, move || {
        let expirer = expirer.clone();
        async move {
            match expirer.run_once().await {
                Ok(0) => {}
                Ok(expired) => tracing::info!(expired, "grants expired"),
                Err(error) => tracing::warn!(%error, "expiry run failed; retrying next tick"),
            }
        }
    });
}

/// How long the health probe waits for the database to answer.
pub const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks the database for `SELECT 1` within [`HEALTH_PROBE_TIMEOUT`], and records the answer
/// with the pool's connection counts in the metrics. Shared by `/readyz` and the probe job.
pub async fn probe_database(db: &Db) -> bool {
    let probe = db.ping();
    let ready = matches!(
        tokio::time::timeout(HEALTH_PROBE_TIMEOUT, probe).await,
        Ok(Ok(()))
    );
    let usage = db.pool_usage();
    metrics::database(ready, usage.size, usage.idle, usage.max);
    ready
}

/// Samples the writer lanes' queues, readiness, the pool and the wallet count into the metrics
/// every `every`, and keeps the Prometheus histograms trimmed, until `stop`. (The queues are
/// sampled here rather than by the lanes, which would only see them right after taking a batch
/// and not at all while a commit hangs.)
pub fn spawn_health_probe(
    db: Db,
    registry: Arc<Registry>,
    writer: crate::store::writer::WriterHandle,
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
    every: Duration,
    stop: CancellationToken,
    tracker: &TaskTracker,
) {
    spawn_periodic(
        "health probe",
        Instant::now(),
        every,
        stop,
        tracker,
        move || {
            for (lane, depth) in writer.queued_by_lane().enumerate() {
                metrics::writer_queue_depth(lane, depth);
            }
            let (db, registry, prometheus) = (db.clone(), registry.clone(), prometheus.clone());
            async move {
                if !probe_database(&db).await {
                    tracing::warn!("the database does not answer the health probe");
                }
                registry.sweep_passivated();
                prometheus.run_upkeep();
            }
        },
    );
}

/// Runs `job` at `first` and then every `every` on `tracker`, one run at a time, until `stop`
/// fires (a run in progress is dropped then: every job here only reads, or writes through the
/// wallets and the writer, which finish what they took). A late run delays the next one rather
/// than bunching up.
fn spawn_periodic<F, Fut>(
    name: &'static str,
    first: Instant,
    every: Duration,
    stop: CancellationToken,
    tracker: &TaskTracker,
    mut job: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tracker.spawn(async move {
        let mut ticks = tokio::time::interval_at(first, every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                _ = ticks.tick() => {}
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                () = job() => {}
            }
        }
        tracing::info!(job = name, "supervisor job stopped");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limited(id: i64, remaining: i64, used: i64) -> Grant {
        Grant {
            id: UserPackageId(id),
            priority: 100,
            expires_at: None,
            status: GrantStatus::Active,
            balance: Balance::Limited {
                total: Credits::new(remaining + used).unwrap(),
                used: Credits::new(used).unwrap(),
                remaining: Credits::new(remaining).unwrap(),
                expired: Credits::ZERO,
            },
        }
    }

    #[test]
    fn equal_sides_agree() {
        let grants = vec![limited(1, 5, 5), limited(2, 10, 0)];
        assert!(compare_wallet(UserId(7), &grants, &grants).is_empty());
    }

    #[test]
    fn a_differing_balance_and_a_one_sided_grant_are_reported() {
        let memory = vec![limited(1, 5, 5), limited(2, 10, 0)];
        let stored = vec![limited(1, 4, 6), limited(3, 1, 0)];
        let found = compare_wallet(UserId(7), &memory, &stored);
        let ids: Vec<i64> = found.iter().map(|m| m.user_package_id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(found[0].memory.as_ref().unwrap().remaining_credits.get(), 5);
        assert_eq!(found[0].stored.as_ref().unwrap().remaining_credits.get(), 4);
        assert!(found[1].stored.is_none());
        assert!(found[2].memory.is_none());
    }
}
