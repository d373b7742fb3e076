//! Drives a [`Target`] with a workload for a bounded time: one task per worker, each with its
//! own session, random stream, statistics and record of what was acknowledged (nothing shared
//! on the hot path), merged when every worker has finished its last request.
//!
//! Closed loop: a worker sends its next request when the last is answered. Open loop
//! (`rate`): worker `i` of `C` owns the intended start times `t0 + (i + k * C) / rate`; it
//! sends each at its time, or at once when it is behind, and every latency runs from the
//! intended start, so a stall shows as the latency of everything queued behind it instead of
//! as fewer samples (no coordinated omission). Nothing new is sent after the deadline.

use std::fmt::Write;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::Error;
use crate::config::{HotUsers, Mix, Workload};
use crate::fixtures::UserRange;
use crate::stats::{Op, PhaseStats};
use crate::target::{DeductReply, Outcome, RefundReply, Session, Target};

/// Acknowledgements (deducts, refunds, unsettled requests) a phase records, shared out evenly
/// among its workers; a worker whose share is full stops early. About 50 bytes each, so a full
/// ledger holds some 1 GB.
pub const LEDGER_ENTRIES_MAX: usize = 20_000_000;

/// Acknowledged, not yet refunded consumptions a worker keeps to pick refunds from; beyond it a
/// new one replaces a random one.
pub const REFUNDABLE_MAX: usize = 1_024;

/// Acknowledged idempotency keys a worker keeps to pick retries from; beyond it a new one
/// replaces a random one.
pub const RETRYABLE_MAX: usize = 256;

/// Surprising answers kept word for word (all are counted).
pub const ANOMALIES_KEPT_MAX: usize = 100;

/// An acknowledged (`200`, not replayed) deduction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeductAck {
    pub user_id: i64,
    pub consumption_id: i64,
    pub credits_cost: i64,
}

/// An acknowledged (`200`, not replayed) refund.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefundAck {
    pub user_id: i64,
    pub consumption_id: i64,
    pub refunded_credits: i64,
    pub forfeited_credits: i64,
}

/// What the target acknowledged, as the client saw it: the conservation check compares it with
/// the database.
#[derive(Debug, Default)]
pub struct Ledger {
    pub deducts: Vec<DeductAck>,
    pub refunds: Vec<RefundAck>,
    /// Deducts that got no definite answer (`503`, transport failure, ...): `(user_id,
    /// idempotency_key)`. Each may or may not have been charged; the check looks them up.
    pub unsettled_deducts: Vec<(i64, String)>,
    /// Refunds without a definite answer, by consumption id.
    pub unsettled_refunds: Vec<i64>,
    /// Answers that break the contract on their own (a retry charged again, a fresh key
    /// replayed), the first [`ANOMALIES_KEPT_MAX`] of them.
    pub anomalies: Vec<String>,
    pub anomalies_total: u64,
}

impl Ledger {
    fn entries(&self) -> usize {
        self.deducts.len()
            + self.refunds.len()
            + self.unsettled_deducts.len()
            + self.unsettled_refunds.len()
    }

    fn anomaly(&mut self, text: String) {
        self.anomalies_total += 1;
        if self.anomalies.len() < ANOMALIES_KEPT_MAX {
            self.anomalies.push(text);
        }
    }

    fn merge(&mut self, other: Ledger) {
        self.deducts.extend(other.deducts);
        self.refunds.extend(other.refunds);
        self.unsettled_deducts.extend(other.unsettled_deducts);
        self.unsettled_refunds.extend(other.unsettled_refunds);
        self.anomalies_total += other.anomalies_total;
        let room = ANOMALIES_KEPT_MAX.saturating_sub(self.anomalies.len());
        self.anomalies
            .extend(other.anomalies.into_iter().take(room));
    }
}

/// One phase, driven.
#[derive(Debug)]
pub struct PhaseRun {
    pub stats: PhaseStats,
    pub ledger: Ledger,
    /// From the first request until the last worker's last answer.
    pub elapsed: Duration,
    /// Some worker filled its ledger and stopped before the deadline.
    pub stopped_early: bool,
    pub workers: usize,
}

/// Runs `workload` against `target` over `users` (after its unmeasured warm-up, if any);
/// returns once every request has been answered (or has timed out), so nothing of the phase is
/// still in flight. The ledger holds the warm-up's acknowledgements too.
pub async fn drive<T: Target>(
    target: &T,
    workload: &Workload,
    users: UserRange,
) -> Result<PhaseRun, Error> {
    if workload.warmup.is_zero() {
        return drive_for(target, workload, users, workload.duration, workload.seed).await;
    }
    // Another stream than the measured one, so the measurement does not replay the warm-up.
    let warm_seed = workload.seed ^ 0x5741_524d_5550_0000;
    let warmup = drive_for(target, workload, users, workload.warmup, warm_seed).await?;
    let mut run = drive_for(target, workload, users, workload.duration, workload.seed).await?;
    run.ledger.merge(warmup.ledger);
    run.stopped_early |= warmup.stopped_early;
    Ok(run)
}

/// One timed stretch of the workload: `duration` of requests from a fresh set of sessions.
async fn drive_for<T: Target>(
    target: &T,
    workload: &Workload,
    users: UserRange,
    duration: Duration,
    seed: u64,
) -> Result<PhaseRun, Error> {
    let workers = workload.concurrency;
    let ledger_max = LEDGER_ENTRIES_MAX / workers.max(1);
    let mut sessions = Vec::with_capacity(workers);
    for _ in 0..workers {
        sessions.push(target.session().await?);
    }
    // Unique across runs and phases, though every run uses fresh users anyway.
    let key_prefix = format!("lt{:08x}", fastrand::u32(..));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for (index, session) in sessions.into_iter().enumerate() {
        let pacing = workload.rate.map(|rate| Pacing {
            first: start + Duration::from_secs_f64(index as f64 / rate),
            interval: Duration::from_secs_f64(workers as f64 / rate),
        });
        let worker = Worker {
            session,
            index,
            rng: fastrand::Rng::with_seed(seed.wrapping_add(index as u64)),
            users,
            hot: workload.hot,
            mix: workload.mix,
            retry_share: workload.retry_share,
            key_prefix: key_prefix.clone(),
            key: String::with_capacity(64),
            seq: 0,
            stats: PhaseStats::new()?,
            ledger: Ledger::default(),
            refundable: Vec::with_capacity(REFUNDABLE_MAX),
            retryable: Vec::with_capacity(RETRYABLE_MAX),
        };
        tasks.spawn(worker.run(pacing, deadline, ledger_max));
    }
    let mut stats = PhaseStats::new()?;
    let mut ledger = Ledger::default();
    let mut stopped_early = false;
    while let Some(joined) = tasks.join_next().await {
        let done = joined.map_err(|error| Error::Internal(format!("a worker failed: {error}")))?;
        stats.merge(&done.stats)?;
        ledger.merge(done.ledger);
        stopped_early |= done.stopped_early;
    }
    Ok(PhaseRun {
        stats,
        ledger,
        elapsed: start.elapsed(),
        stopped_early,
        workers,
    })
}

/// A worker's schedule in an open loop.
#[derive(Clone, Copy, Debug)]
struct Pacing {
    first: Instant,
    interval: Duration,
}

/// An acknowledged key a worker may retry.
#[derive(Clone, Copy, Debug)]
struct Retryable {
    user_id: i64,
    seq: u64,
    consumption_id: i64,
    credits_cost: i64,
}

struct Worker<S> {
    session: S,
    index: usize,
    rng: fastrand::Rng,
    users: UserRange,
    hot: Option<HotUsers>,
    mix: Mix,
    retry_share: f64,
    /// Idempotency keys are `{key_prefix}-{index}-{seq}`.
    key_prefix: String,
    /// The current key, rebuilt in place.
    key: String,
    /// The last sequence number this worker used in a key.
    seq: u64,
    stats: PhaseStats,
    ledger: Ledger,
    /// `(user_id, consumption_id)` of acknowledged deductions not refunded yet.
    refundable: Vec<(i64, i64)>,
    retryable: Vec<Retryable>,
}

/// What a worker hands back.
struct Done {
    stats: PhaseStats,
    ledger: Ledger,
    stopped_early: bool,
}

/// Adds `item` to a bounded sample: appended while there is room, else over a random entry.
fn remember<T>(ring: &mut Vec<T>, max: usize, item: T, rng: &mut fastrand::Rng) {
    if ring.len() < max {
        ring.push(item);
    } else {
        let slot = rng.usize(..ring.len());
        ring[slot] = item;
    }
}

impl<S: Session> Worker<S> {
    async fn run(mut self, pacing: Option<Pacing>, deadline: Instant, ledger_max: usize) -> Done {
        let mut next = pacing.map(|p| p.first);
        let mut stopped_early = false;
        loop {
            let intended = match (next, pacing) {
                (Some(at), Some(p)) => {
                    // A worker that fell behind stops at the deadline too: the backlog shows in
                    // the latency of what it did send and in the requests/s it reached, and the
                    // phase lasts its duration however far the target is from the rate.
                    if at >= deadline || Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(at).await;
                    next = Some(at + p.interval);
                    at
                }
                _ => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    now
                }
            };
            if self.ledger.entries() >= ledger_max {
                stopped_early = true;
                break;
            }
            self.one_request(intended).await;
        }
        Done {
            stats: self.stats,
            ledger: self.ledger,
            stopped_early,
        }
    }

    async fn one_request(&mut self, intended: Instant) {
        let roll = self.rng.u32(..self.mix.total());
        if roll < self.mix.deduct {
            self.deduct(intended).await;
        } else if roll < self.mix.deduct + self.mix.check {
            self.check(intended).await;
        } else if self.refundable.is_empty() {
            // Nothing acknowledged to refund yet.
            self.deduct(intended).await;
        } else {
            self.refund(intended).await;
        }
    }

    fn pick_user(&mut self) -> i64 {
        let count = self.users.count;
        let index = match self.hot {
            Some(hot) if hot.users >= count || self.rng.f64() < hot.share => {
                self.rng.u64(..hot.users)
            }
            Some(hot) => self.rng.u64(hot.users..count),
            None => self.rng.u64(..count),
        };
        self.users.id(index)
    }

    fn set_key(&mut self, seq: u64) {
        self.key.clear();
        let _infallible = write!(self.key, "{}-{}-{seq}", self.key_prefix, self.index);
    }

    async fn deduct(&mut self, intended: Instant) {
        if !self.retryable.is_empty() && self.rng.f64() < self.retry_share {
            return self.retry(intended).await;
        }
        self.seq += 1;
        self.set_key(self.seq);
        let user_id = self.pick_user();
        let reply = self.session.deduct(user_id, &self.key).await;
        let latency = intended.elapsed();
        match reply {
            DeductReply::Acked {
                consumption_id,
                credits_cost,
                replayed: false,
            } => {
                self.stats.record(Op::Deduct, Outcome::Ok, latency);
                self.ledger.deducts.push(DeductAck {
                    user_id,
                    consumption_id,
                    credits_cost,
                });
                let rng = &mut self.rng;
                remember(
                    &mut self.refundable,
                    REFUNDABLE_MAX,
                    (user_id, consumption_id),
                    rng,
                );
                remember(
                    &mut self.retryable,
                    RETRYABLE_MAX,
                    Retryable {
                        user_id,
                        seq: self.seq,
                        consumption_id,
                        credits_cost,
                    },
                    rng,
                );
            }
            DeductReply::Acked { replayed: true, .. } => {
                self.stats.record(Op::Deduct, Outcome::Replayed, latency);
                self.ledger.anomaly(format!(
                    "the fresh key {} of user {user_id} was answered as a replay",
                    self.key
                ));
            }
            DeductReply::Failed(outcome) => {
                self.stats.record(Op::Deduct, outcome, latency);
                if !outcome.settles_nothing_applied() {
                    self.ledger
                        .unsettled_deducts
                        .push((user_id, self.key.clone()));
                }
            }
        }
    }

    /// Sends an acknowledged deduct again: it must be replayed, not charged again.
    async fn retry(&mut self, intended: Instant) {
        let first = self.retryable[self.rng.usize(..self.retryable.len())];
        self.set_key(first.seq);
        let reply = self.session.deduct(first.user_id, &self.key).await;
        let latency = intended.elapsed();
        match reply {
            DeductReply::Acked {
                consumption_id,
                credits_cost,
                replayed: true,
            } => {
                self.stats.record(Op::Deduct, Outcome::Replayed, latency);
                if (consumption_id, credits_cost) != (first.consumption_id, first.credits_cost) {
                    self.ledger.anomaly(format!(
                        "the retry of key {} (user {}) replayed consumption {consumption_id} \
                         costing {credits_cost}, not {} costing {}",
                        self.key, first.user_id, first.consumption_id, first.credits_cost
                    ));
                }
            }
            DeductReply::Acked {
                consumption_id,
                replayed: false,
                ..
            } => {
                self.stats.record(Op::Deduct, Outcome::Ok, latency);
                self.ledger.anomaly(format!(
                    "the retry of acknowledged key {} (user {}, consumption {}) was charged \
                     again as consumption {consumption_id}",
                    self.key, first.user_id, first.consumption_id
                ));
            }
            // The key was acknowledged before: whatever this answer, it was charged once.
            DeductReply::Failed(outcome) => self.stats.record(Op::Deduct, outcome, latency),
        }
    }

    async fn check(&mut self, intended: Instant) {
        let user_id = self.pick_user();
        let outcome = self.session.check(user_id).await;
        self.stats.record(Op::Check, outcome, intended.elapsed());
    }

    async fn refund(&mut self, intended: Instant) {
        let (user_id, consumption_id) = self
            .refundable
            .swap_remove(self.rng.usize(..self.refundable.len()));
        let reply = self.session.refund(consumption_id).await;
        let latency = intended.elapsed();
        match reply {
            RefundReply::Acked {
                refunded_credits,
                forfeited_credits,
                replayed: false,
            } => {
                self.stats.record(Op::Refund, Outcome::Ok, latency);
                self.ledger.refunds.push(RefundAck {
                    user_id,
                    consumption_id,
                    refunded_credits,
                    forfeited_credits,
                });
            }
            RefundReply::Acked { replayed: true, .. } => {
                self.stats.record(Op::Refund, Outcome::Replayed, latency);
                self.ledger.anomaly(format!(
                    "the first refund of consumption {consumption_id} (user {user_id}) was \
                     answered as a replay"
                ));
            }
            RefundReply::Failed(outcome) => {
                self.stats.record(Op::Refund, outcome, latency);
                if !outcome.settles_nothing_applied() {
                    self.ledger.unsettled_refunds.push(consumption_id);
                }
            }
        }
    }
}
