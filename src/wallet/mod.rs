//! One ractor actor per active user: the only writer of that user's balances while it lives.
//!
//! A wallet applies each deduction to its in-memory grants at once and hands the effect to the
//! batch writer, then takes the next message: it never waits for a commit. The writer answers
//! the caller after the commit and reports back (`Settled`). So memory is always the committed
//! state minus the effects in flight; when a batch fails, the wallet refuses work until its
//! in-flight effects have settled and then reloads from the database.

mod loader;
mod messages;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

pub use loader::GrantLoader;
pub use messages::*;

use crate::clock::Clock;
use crate::domain::{self, ConsumptionId, Grant, GrantStatus, NewGrant, UserId, UserPackageId};
use crate::error::EngineError;
use crate::metrics;
use crate::registry::WALLET_CLOSING;
use crate::store::writer::{
    self, DeductEffect, Effect, Envelope, GrantChange, GrantEffect, Origin, RefundEffect,
    WriterHandle,
};
use crate::store::{Db, StoredConsumption, UserPackageRow};

/// Shortest period between a wallet's idle checks.
const PASSIVATION_CHECK_MIN: Duration = Duration::from_millis(10);

/// What every wallet shares.
pub struct WalletDeps {
    pub db: Db,
    /// Where a starting wallet loads its grants: together with the wallets starting with it.
    pub loader: GrantLoader,
    pub writer: WriterHandle,
    pub clock: Arc<dyn Clock>,
    pub limits: WalletLimits,
}

#[derive(Clone, Copy, Debug)]
pub struct WalletLimits {
    /// How long a wallet waits for room in the writer queue before `503 overloaded`.
    pub enqueue_wait: Duration,
    /// Committed idempotency keys remembered per wallet; older ones fall back to the database.
    pub idempotency_cache_max: usize,
    /// A wallet with no request for this long, and nothing in flight, stops (passivates) and
    /// leaves memory; its user's next request loads a fresh one. `None`: wallets stay.
    pub idle: Option<Duration>,
}

pub struct WalletArgs {
    pub user_id: UserId,
    pub deps: Arc<WalletDeps>,
    pub life: Arc<WalletLife>,
    /// Grants to start from instead of loading them (benchmarks of the actor without a
    /// database); the registry always loads.
    pub preloaded: Option<Vec<Grant>>,
}

/// What one life of a wallet shares with the registry and the batch writer.
#[derive(Debug, Default)]
pub struct WalletLife {
    /// Requests sent but not yet taken from the mailbox; the registry bounds it. Its high bit
    /// ([`WALLET_CLOSING`]) is set when the wallet passivates.
    pub mailbox_depth: AtomicUsize,
    /// The registry's sequence number of the last request admitted here: for evicting the
    /// least recently used wallets when the map is full.
    pub last_use: AtomicU64,
    /// Effects handed to the writer and not yet committed or failed.
    pub unsettled: Unsettled,
}

/// A count of effects in flight that can be waited on to reach zero. The envelopes carrying the
/// effects settle them ([`SettleOnDrop`]) once the writer is done with them, so the count falls
/// even when the wallet that handed them over has died: a successor loads from the database only
/// once its predecessor's effects are there (or known to have failed).
#[derive(Debug, Default)]
pub struct Unsettled {
    count: AtomicUsize,
    settled: tokio::sync::Notify,
}

/// Settles one effect of a wallet life when dropped. The envelope that carries the effect owns
/// it, so the count falls exactly once per effect, whether the writer commits the effect, fails
/// it, or drops it unanswered (a lane that died, a send that raced the lanes' last drain).
#[derive(Debug)]
pub struct SettleOnDrop(Arc<WalletLife>);

impl SettleOnDrop {
    pub fn new(life: Arc<WalletLife>) -> SettleOnDrop {
        life.unsettled.add();
        SettleOnDrop(life)
    }
}

impl Drop for SettleOnDrop {
    fn drop(&mut self) {
        self.0.unsettled.settle(1);
    }
}

impl Unsettled {
    fn add(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    fn settle(&self, effects: usize) {
        if self.count.fetch_sub(effects, Ordering::AcqRel) == effects {
            self.settled.notify_waiters();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Returns once nothing is in flight.
    pub async fn wait_empty(&self) {
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.is_empty() {
                return;
            }
            settled.await;
        }
    }
}

/// The actor type; all of its state lives in [`WalletState`].
pub struct Wallet;

enum KeyState {
    /// Handed to the writer; duplicates that arrive meanwhile wait for its outcome.
    InFlight {
        fingerprint: String,
        waiters: Vec<Reply<DeductAnswer>>,
    },
    /// Committed: a retry is answered from memory.
    Done {
        fingerprint: String,
        answer: DeductAnswer,
    },
}

/// A refund's consumption is read from the database by a task of its own, which reports back
/// with [`WalletMsg::RefundRead`]; one read at a time, the others wait in order.
///
/// A read is never stale for this wallet's own refunds: a refund this life committed before
/// the read began is in what it reads (a life's predecessor settled all of its refunds before
/// this life loaded), one still in flight when it ends is found in `refunds_in_flight`, and one
/// committed while it ran is noted in `settled_while_reading`, so that read is made again.
#[derive(Default)]
struct RefundReads {
    reading: bool,
    waiting: VecDeque<(RefundRequest, Reply<RefundAnswer>)>,
    settled_while_reading: HashSet<ConsumptionId>,
}

pub struct WalletState {
    user_id: UserId,
    deps: Arc<WalletDeps>,
    life: Arc<WalletLife>,
    /// The user's pending, active and depleted grants, in burn-down order.
    grants: Vec<Grant>,
    keys: HashMap<String, KeyState>,
    /// Committed keys, oldest first, for evicting beyond `idempotency_cache_max`.
    done_keys: VecDeque<String>,
    /// Refunds handed to the writer; concurrent refunds of the same consumption wait here.
    refunds_in_flight: HashMap<ConsumptionId, Vec<Reply<RefundAnswer>>>,
    /// Refunds by idempotency key whose deduction is still in flight; re-sent once it settles.
    refunds_awaiting_key: HashMap<String, Vec<(RefundRequest, Reply<RefundAnswer>)>>,
    /// The reads of the consumptions that refunds name, made off the wallet's turn so its other
    /// requests go on meanwhile.
    refund_reads: RefundReads,
    /// Effects handed to the writer and not yet settled.
    in_flight: usize,
    /// The epoch this memory was loaded under; effects carry it.
    epoch: u64,
    /// Bumped by the writer when a batch holding this wallet's effects fails.
    epoch_cell: Arc<AtomicU64>,
    /// When the last request arrived, for idle passivation.
    last_request: tokio::time::Instant,
}

impl Actor for Wallet {
    type Msg = WalletMsg;
    type State = WalletState;
    type Arguments = WalletArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<WalletMsg>,
        args: WalletArgs,
    ) -> Result<WalletState, ActorProcessingErr> {
        let grants = match args.preloaded {
            Some(mut grants) => {
                domain::sort_burn_order(&mut grants);
                grants
            }
            None => args.deps.loader.load(args.user_id).await?,
        };
        Ok(WalletState {
            user_id: args.user_id,
            deps: args.deps,
            life: args.life,
            grants,
            keys: HashMap::new(),
            done_keys: VecDeque::new(),
            refunds_in_flight: HashMap::new(),
            refunds_awaiting_key: HashMap::new(),
            refund_reads: RefundReads::default(),
            in_flight: 0,
            epoch: 0,
            epoch_cell: Arc::new(AtomicU64::new(0)),
            last_request: tokio::time::Instant::now(),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<WalletMsg>,
        state: &mut WalletState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(idle) = state.deps.limits.idle {
            // The timer task ends by itself when the wallet stops.
            let check_every = (idle / 2).max(PASSIVATION_CHECK_MIN);
            myself.send_interval(check_every, || WalletMsg::Passivate);
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<WalletMsg>,
        message: WalletMsg,
        state: &mut WalletState,
    ) -> Result<(), ActorProcessingErr> {
        if message.is_request() {
            state.life.mailbox_depth.fetch_sub(1, Ordering::AcqRel);
        }
        if message.is_use() {
            state.last_request = tokio::time::Instant::now();
        }
        match message {
            WalletMsg::Check {
                credits_cost,
                reply,
            } => {
                let answer = state.check(credits_cost).await;
                let _ = reply.send(answer);
            }
            WalletMsg::Deduct { request, reply } => state.deduct(&myself, request, reply).await,
            // The cold messages' futures are boxed, so the hot ones (check, deduct, settled)
            // stay small: ractor allocates and moves each message's future.
            WalletMsg::Refund { request, reply } => {
                Box::pin(state.refund(&myself, request, reply)).await;
            }
            WalletMsg::Assign { request, reply } => {
                let _ = reply.send(Box::pin(state.assign(request)).await);
            }
            WalletMsg::Activate {
                grant_id,
                duration_days,
                reply,
            } => {
                let now = state.deps.clock.now();
                let change = move |grant: &mut Grant| {
                    grant
                        .activate(now, duration_days)
                        .map(GrantChange::Activate)
                        .map_err(|error| match error {
                            domain::GrantChangeError::NotPending(status) => {
                                EngineError::GrantStatusConflict {
                                    status: status.as_str().to_owned(),
                                    change: "activated",
                                }
                            }
                            domain::GrantChangeError::ExpiryPassed => {
                                EngineError::GrantExpiryPassed
                            }
                        })
                };
                Box::pin(state.change_grant(&myself, grant_id, "activated", change, reply)).await;
            }
            WalletMsg::Revoke {
                grant_id,
                reason,
                reply,
            } => {
                let change = move |grant: &mut Grant| {
                    grant.end(GrantStatus::Revoked);
                    Ok(GrantChange::Revoke { reason })
                };
                Box::pin(state.change_grant(&myself, grant_id, "revoked", change, reply)).await;
            }
            WalletMsg::Expire { grant_id, reply } => {
                let now = state.deps.clock.now();
                let change = move |grant: &mut Grant| {
                    let due = grant.expires_at.is_some_and(|at| at <= now)
                        && matches!(grant.status, GrantStatus::Active | GrantStatus::Depleted);
                    if !due {
                        return Err(EngineError::GrantStatusConflict {
                            status: grant.status.as_str().to_owned(),
                            change: "expired (it is not due)",
                        });
                    }
                    grant.end(GrantStatus::Expired);
                    Ok(GrantChange::Expire)
                };
                Box::pin(state.change_grant(&myself, grant_id, "expired", change, reply)).await;
            }
            WalletMsg::Register { grants, reply } => {
                let _ = reply.send(Box::pin(state.register(grants)).await);
            }
            WalletMsg::Snapshot { reply } => {
                let _ = reply.send(Box::pin(state.snapshot()).await);
            }
            WalletMsg::Settled(settlements) => state.settle(&myself, settlements).await,
            WalletMsg::RefundRead {
                request,
                reply,
                read,
            } => {
                Box::pin(state.refund_read(&myself, request, reply, read)).await;
            }
            WalletMsg::Passivate => {
                if state.is_idle() && state.close() {
                    tracing::debug!(user_id = %state.user_id, "wallet passivated");
                    metrics::wallet_passivated("idle");
                    myself.stop(Some("idle".into()));
                }
            }
            WalletMsg::Evict { reply } => {
                let closed = state.close();
                if closed {
                    tracing::debug!(user_id = %state.user_id, "wallet evicted");
                    metrics::wallet_passivated("evicted");
                    myself.stop(Some("evicted".into()));
                }
                let _ = reply.send(Ok(closed));
            }
            #[cfg(feature = "fault-injection")]
            WalletMsg::Panic => panic!("fault injection: wallet of user {}", state.user_id),
        }
        Ok(())
    }
}

impl WalletState {
    fn is_stale(&self) -> bool {
        self.epoch_cell.load(Ordering::Acquire) != self.epoch
    }

    /// Makes sure memory matches the database plus what is in flight. After a failed batch the
    /// wallet waits for its in-flight effects to settle, then reloads.
    async fn ensure_fresh(&mut self) -> Result<(), EngineError> {
        if !self.is_stale() {
            return Ok(());
        }
        if self.in_flight > 0 {
            return Err(EngineError::Unavailable(
                "this wallet is resynchronizing after a failed write",
            ));
        }
        // Boxed: the rare reload's database future would otherwise sit inline in every
        // message's future, which ractor allocates and moves per message.
        Box::pin(self.reload()).await
    }

    async fn reload(&mut self) -> Result<(), EngineError> {
        let epoch = self.epoch_cell.load(Ordering::Acquire);
        match self.deps.loader.load(self.user_id).await {
            Ok(grants) => {
                self.grants = grants;
                self.epoch = epoch;
                tracing::info!(user_id = %self.user_id, epoch, "wallet reloaded after a failed write");
                Ok(())
            }
            Err(error) => {
                tracing::warn!(user_id = %self.user_id, %error, "wallet reload failed");
                Err(EngineError::Unavailable("the database is unreachable"))
            }
        }
    }

    /// Hands an effect to the writer; it is in flight until the writer settles it.
    fn hand_over(
        &mut self,
        myself: &ActorRef<WalletMsg>,
        permit: tokio::sync::mpsc::Permit<'_, Envelope>,
        effect: Effect,
    ) {
        self.in_flight += 1;
        permit.send(Envelope {
            origin: Origin {
                wallet: myself.clone(),
                epoch: self.epoch,
                epoch_cell: self.epoch_cell.clone(),
            },
            effect,
            settles: SettleOnDrop::new(self.life.clone()),
        });
    }

    async fn check(&mut self, credits_cost: domain::Credits) -> Result<CheckAnswer, EngineError> {
        self.ensure_fresh().await?;
        let now = self.deps.clock.now();
        let totals = domain::totals(&self.grants, now);
        Ok(CheckAnswer {
            sufficient: domain::plan_deduction(&self.grants, credits_cost, now).is_ok(),
            credits_cost,
            remaining_credits: totals.remaining_credits,
            unlimited: totals.unlimited,
        })
    }

    async fn deduct(
        &mut self,
        myself: &ActorRef<WalletMsg>,
        request: DeductRequest,
        reply: Reply<DeductAnswer>,
    ) {
        if let Err(error) = self.ensure_fresh().await {
            let _ = reply.send(Err(error));
            return;
        }
        // A key seen since this wallet started is answered (or queued) from memory.
        let reply = match &request.idempotency_key {
            Some(key) => match self.keys.get_mut(key) {
                Some(KeyState::Done {
                    fingerprint,
                    answer,
                }) => {
                    let _ = reply.send(replay_or_conflict(
                        fingerprint,
                        &request.fingerprint,
                        answer,
                    ));
                    return;
                }
                Some(KeyState::InFlight {
                    fingerprint,
                    waiters,
                }) => {
                    if *fingerprint == request.fingerprint {
                        waiters.push(reply);
                    } else {
                        let _ = reply.send(Err(EngineError::IdempotencyConflict));
                    }
                    return;
                }
                None => reply,
            },
            None => reply,
        };

        let deps = self.deps.clone();
        let permit =
            match writer::reserve(deps.writer.lane(self.user_id), deps.limits.enqueue_wait).await {
                Ok(permit) => permit,
                Err(error) => {
                    let _ = reply.send(Err(error));
                    return;
                }
            };
        let now = deps.clock.now();
        let allocations = match domain::plan_deduction(&self.grants, request.credits_cost, now) {
            Ok(allocations) => allocations,
            Err(short) => {
                drop(permit);
                // Boxed: the database lookup is the rare path (see `ensure_fresh`).
                let answer = Box::pin(self.insufficient(&request, short, reply)).await;
                if let Some((reply, answer)) = answer {
                    let _ = reply.send(answer);
                }
                return;
            }
        };
        domain::apply_deduction(&mut self.grants, &allocations);
        let remaining_after = domain::totals(&self.grants, now).remaining_credits;
        if let Some(key) = &request.idempotency_key {
            self.keys.insert(
                key.clone(),
                KeyState::InFlight {
                    fingerprint: request.fingerprint.clone(),
                    waiters: Vec::new(),
                },
            );
        }
        let effect = Effect::Deduct(DeductEffect {
            user_id: self.user_id,
            request,
            allocations,
            remaining_after,
            created_at: now,
            reply,
        });
        self.hand_over(myself, permit, effect);
    }

    /// A deduction the grants cannot pay. With an idempotency key this wallet has not seen,
    /// the key may have been committed by an earlier life of the wallet: look it up, so a retry
    /// of a charge that succeeded is a replay, not a `402`.
    async fn insufficient(
        &mut self,
        request: &DeductRequest,
        short: domain::Insufficient,
        reply: Reply<DeductAnswer>,
    ) -> Option<(Reply<DeductAnswer>, Result<DeductAnswer, EngineError>)> {
        let insufficient = Err(EngineError::InsufficientCredits {
            remaining_credits: short.remaining_credits,
            credits_cost: request.credits_cost,
        });
        let Some(key) = &request.idempotency_key else {
            return Some((reply, insufficient));
        };
        match self
            .deps
            .db
            .find_consumption_by_key(self.user_id, key)
            .await
        {
            Ok(None) => Some((reply, insufficient)),
            Ok(Some(stored)) => {
                let original = original_answer(&stored);
                let answer = replay_or_conflict(
                    &stored.request_fingerprint,
                    &request.fingerprint,
                    &original,
                );
                self.remember(key.clone(), stored.request_fingerprint, original);
                Some((reply, answer))
            }
            Err(error) => {
                tracing::warn!(user_id = %self.user_id, %error, "idempotency lookup failed");
                Some((
                    reply,
                    Err(EngineError::Unavailable("the database is unreachable")),
                ))
            }
        }
    }

    fn remember(&mut self, key: String, fingerprint: String, answer: DeductAnswer) {
        let replaced = self.keys.insert(
            key.clone(),
            KeyState::Done {
                fingerprint,
                answer,
            },
        );
        if !matches!(replaced, Some(KeyState::Done { .. })) {
            self.done_keys.push_back(key);
        }
        while self.done_keys.len() > self.deps.limits.idempotency_cache_max {
            if let Some(oldest) = self.done_keys.pop_front() {
                self.keys.remove(&oldest);
            }
        }
    }

    async fn refund(
        &mut self,
        myself: &ActorRef<WalletMsg>,
        request: RefundRequest,
        reply: Reply<RefundAnswer>,
    ) {
        // A refund of a keyed deduction still being committed waits for its outcome.
        if let RefundTarget::IdempotencyKey(key) = &request.target
            && matches!(self.keys.get(key), Some(KeyState::InFlight { .. }))
        {
            self.refunds_awaiting_key
                .entry(key.clone())
                .or_default()
                .push((request, reply));
            return;
        }
        if self.refund_reads.reading {
            self.refund_reads.waiting.push_back((request, reply));
            return;
        }
        if let Err(error) = self.ensure_fresh().await {
            let _ = reply.send(Err(error));
            return;
        }
        self.start_refund_read(myself, request, reply);
    }

    /// Reads the consumption a refund names in a task of its own, which reports back.
    fn start_refund_read(
        &mut self,
        myself: &ActorRef<WalletMsg>,
        request: RefundRequest,
        reply: Reply<RefundAnswer>,
    ) {
        self.refund_reads.reading = true;
        self.refund_reads.settled_while_reading.clear();
        let db = self.deps.db.clone();
        let user_id = self.user_id;
        let myself = myself.clone();
        tokio::spawn(async move {
            let read = match &request.target {
                RefundTarget::IdempotencyKey(key) => db.find_consumption_by_key(user_id, key).await,
                RefundTarget::Id(id) => db.find_consumption(user_id, *id).await,
            }
            .map_err(EngineError::from);
            let message = WalletMsg::RefundRead {
                request,
                reply,
                read,
            };
            if let Err(ractor::MessagingErr::SendErr(WalletMsg::RefundRead { reply, .. })) =
                myself.send_message(message)
            {
                let _ = reply.send(Err(EngineError::Unavailable("the wallet stopped; retry")));
            }
        });
    }

    /// A refund's consumption has been read: refund it, then start the next read waiting.
    async fn refund_read(
        &mut self,
        myself: &ActorRef<WalletMsg>,
        request: RefundRequest,
        reply: Reply<RefundAnswer>,
        read: Result<Option<StoredConsumption>, EngineError>,
    ) {
        self.refund_reads.reading = false;
        match read.and_then(|stored| stored.ok_or(EngineError::ConsumptionNotFound)) {
            Ok(stored)
                if !stored.refunded
                    && self.refund_reads.settled_while_reading.contains(&stored.id) =>
            {
                // This wallet refunded it while the read ran: read it again.
                self.start_refund_read(myself, request, reply);
                return;
            }
            Ok(stored) => self.refund_stored(myself, stored, request, reply).await,
            Err(error) => {
                let _ = reply.send(Err(error));
            }
        }
        if let Some((request, reply)) = self.refund_reads.waiting.pop_front() {
            Box::pin(self.refund(myself, request, reply)).await;
        }
    }

    /// Refunds a committed consumption (or answers how it was refunded before).
    async fn refund_stored(
        &mut self,
        myself: &ActorRef<WalletMsg>,
        stored: StoredConsumption,
        request: RefundRequest,
        reply: Reply<RefundAnswer>,
    ) {
        if let Err(error) = self.ensure_fresh().await {
            let _ = reply.send(Err(error));
            return;
        }
        if let Some(waiters) = self.refunds_in_flight.get_mut(&stored.id) {
            waiters.push(reply);
            return;
        }
        let now = self.deps.clock.now();
        if stored.refunded {
            let _ = reply.send(Ok(RefundAnswer {
                consumption_id: stored.id,
                refunded_credits: stored.refunded_credits,
                forfeited_credits: stored.forfeited_credits,
                remaining_credits: domain::totals(&self.grants, now).remaining_credits,
                replayed: true,
            }));
            return;
        }
        let deps = self.deps.clone();
        let permit =
            match writer::reserve(deps.writer.lane(self.user_id), deps.limits.enqueue_wait).await {
                Ok(permit) => permit,
                Err(error) => {
                    let _ = reply.send(Err(error));
                    return;
                }
            };
        let plan = domain::plan_refund(&self.grants, &stored.lines, now);
        domain::restore(&mut self.grants, &plan.restore);
        let remaining_after = domain::totals(&self.grants, now).remaining_credits;
        self.refunds_in_flight.insert(stored.id, Vec::new());
        let effect = Effect::Refund(RefundEffect {
            user_id: self.user_id,
            consumption_id: stored.id,
            plan,
            reason: request.reason,
            remaining_after,
            refunded_at: now,
            reply,
        });
        self.hand_over(myself, permit, effect);
    }

    async fn assign(&mut self, request: AssignRequest) -> Result<AssignAnswer, EngineError> {
        self.ensure_fresh().await?;
        let now = self.deps.clock.now();
        let inserted = self
            .deps
            .db
            .insert_grant(
                self.user_id,
                &request.grant,
                request.external_ref.as_deref(),
                request.note.as_deref(),
                now,
            )
            .await;
        let (row, created) = inserted.inspect_err(|_| self.reload_soon())?;
        // A repeated external_ref returns the first grant; if an earlier attempt's commit was
        // lost to us (its outcome unknown), memory may lack it: adopt it now.
        let known = self.grants.iter().any(|grant| grant.id.get() == row.id);
        if !known
            && let Some(grant) = row.to_grant().filter(|grant| {
                matches!(
                    grant.status,
                    GrantStatus::Pending | GrantStatus::Active | GrantStatus::Depleted
                )
            })
        {
            self.grants.push(grant);
            domain::sort_burn_order(&mut self.grants);
        }
        Ok(AssignAnswer {
            user_package: row,
            created,
        })
    }

    /// A direct write failed, maybe after committing: reload before the next request is served
    /// (effects already handed to the writer are failed unwritten, as after a failed batch).
    fn reload_soon(&self) {
        self.epoch_cell.fetch_add(1, Ordering::AcqRel);
    }

    /// No request for the configured idle time.
    fn is_idle(&self) -> bool {
        self.deps
            .limits
            .idle
            .is_some_and(|idle| self.last_request.elapsed() >= idle)
    }

    /// True, and from then on no request is admitted, when nothing is in flight and the
    /// mailbox is empty (the closing bit is only set from zero, so no admitted request can be
    /// stranded).
    fn close(&self) -> bool {
        let quiet = self.in_flight == 0
            && self.refunds_in_flight.is_empty()
            && self.refunds_awaiting_key.is_empty()
            && !self.refund_reads.reading
            && self.refund_reads.waiting.is_empty()
            && !self
                .keys
                .values()
                .any(|state| matches!(state, KeyState::InFlight { .. }));
        quiet
            && self
                .life
                .mailbox_depth
                .compare_exchange(0, WALLET_CLOSING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Applies an operator's change to one grant in memory and hands it to the writer, behind
    /// whatever this wallet handed over before. A grant this wallet does not hold has ended
    /// (expired or revoked): the caller learns its status.
    async fn change_grant(
        &mut self,
        myself: &ActorRef<WalletMsg>,
        grant_id: UserPackageId,
        change_name: &'static str,
        change: impl FnOnce(&mut Grant) -> Result<GrantChange, EngineError>,
        reply: Reply<UserPackageRow>,
    ) {
        if let Err(error) = self.ensure_fresh().await {
            let _ = reply.send(Err(error));
            return;
        }
        let Some(index) = self.grants.iter().position(|grant| grant.id == grant_id) else {
            let answer = match self.deps.db.find_user_package(grant_id).await {
                Ok(Some(row)) if row.user_id == self.user_id.get() => {
                    Err(EngineError::GrantStatusConflict {
                        status: row.status,
                        change: change_name,
                    })
                }
                Ok(_) => Err(EngineError::GrantNotFound),
                Err(error) => Err(error.into()),
            };
            let _ = reply.send(answer);
            return;
        };
        let deps = self.deps.clone();
        let permit =
            match writer::reserve(deps.writer.lane(self.user_id), deps.limits.enqueue_wait).await {
                Ok(permit) => permit,
                Err(error) => {
                    let _ = reply.send(Err(error));
                    return;
                }
            };
        let mut changed = self.grants[index].clone();
        let change = match change(&mut changed) {
            Ok(change) => change,
            Err(error) => {
                let _ = reply.send(Err(error));
                return;
            }
        };
        if matches!(changed.status, GrantStatus::Revoked | GrantStatus::Expired) {
            self.grants.remove(index);
        } else {
            self.grants[index] = changed;
            domain::sort_burn_order(&mut self.grants);
        }
        let effect = Effect::Grant(GrantEffect {
            user_id: self.user_id,
            grant_id,
            change,
            at: deps.clock.now(),
            reply,
        });
        self.hand_over(myself, permit, effect);
    }

    /// Memory and the database side by side, only when they must agree: nothing in flight and
    /// no reload pending. The read happens inside the handler, so no effect of this wallet can
    /// commit between the two halves.
    async fn snapshot(&mut self) -> Result<WalletSnapshot, EngineError> {
        if self.in_flight > 0 || self.is_stale() {
            return Ok(WalletSnapshot::Busy);
        }
        let stored = self.deps.loader.load(self.user_id).await?;
        Ok(WalletSnapshot::Ready {
            memory: self.grants.clone(),
            stored,
        })
    }

    async fn register(&mut self, grants: Vec<NewGrant>) -> Result<RegisterAnswer, EngineError> {
        let now = self.deps.clock.now();
        self.ensure_fresh().await?;
        let (newly_registered, rows) = self
            .deps
            .db
            .register_user(self.user_id, &grants, now)
            .await
            .inspect_err(|_| self.reload_soon())?;
        self.grants
            .extend(rows.iter().filter_map(UserPackageRow::to_grant));
        domain::sort_burn_order(&mut self.grants);
        Ok(RegisterAnswer {
            user_id: self.user_id.get(),
            newly_registered,
            assigned: rows,
        })
    }

    async fn settle(&mut self, myself: &ActorRef<WalletMsg>, settlements: Vec<Settlement>) {
        for settlement in settlements {
            self.in_flight = self.in_flight.saturating_sub(1);
            match settlement {
                Settlement::Deduct {
                    idempotency_key,
                    allocations,
                    outcome,
                } => {
                    if let Some(key) = &idempotency_key {
                        self.resend_refunds_awaiting(myself, key);
                    }
                    self.settle_deduct(idempotency_key, &allocations, outcome);
                }
                // Memory already holds the change; a failure bumped the epoch and reloads.
                Settlement::Grant => {}
                Settlement::Refund {
                    consumption_id,
                    outcome,
                } => {
                    if self.refund_reads.reading && matches!(outcome, RefundOutcome::Committed(_)) {
                        self.refund_reads
                            .settled_while_reading
                            .insert(consumption_id);
                    }
                    let waiters = self
                        .refunds_in_flight
                        .remove(&consumption_id)
                        .unwrap_or_default();
                    for waiter in waiters {
                        let _ = waiter.send(match &outcome {
                            RefundOutcome::Committed(answer) => Ok(RefundAnswer {
                                replayed: true,
                                ..answer.clone()
                            }),
                            RefundOutcome::Failed => {
                                Err(EngineError::Unavailable("the refund did not commit; retry"))
                            }
                        });
                    }
                }
            }
        }
        if self.is_stale() && self.in_flight == 0 {
            // Reload right away; if the database is still down, the next request retries.
            let _ = self.ensure_fresh().await;
        }
    }

    /// Puts refunds that waited on a keyed deduction back in the mailbox, behind this settlement,
    /// so they see its outcome.
    fn resend_refunds_awaiting(&mut self, myself: &ActorRef<WalletMsg>, key: &str) {
        for (request, reply) in self.refunds_awaiting_key.remove(key).unwrap_or_default() {
            self.life.mailbox_depth.fetch_add(1, Ordering::AcqRel);
            if let Err(error) = myself.send_message(WalletMsg::Refund { request, reply }) {
                self.life.mailbox_depth.fetch_sub(1, Ordering::AcqRel);
                if let ractor::MessagingErr::SendErr(WalletMsg::Refund { reply, .. }) = error {
                    let _ = reply.send(Err(EngineError::Unavailable("the wallet stopped; retry")));
                }
            }
        }
    }

    fn settle_deduct(
        &mut self,
        idempotency_key: Option<String>,
        allocations: &[domain::Allocation],
        outcome: DeductOutcome,
    ) {
        let in_flight = idempotency_key
            .as_ref()
            .and_then(|key| match self.keys.remove(key) {
                Some(KeyState::InFlight {
                    fingerprint,
                    waiters,
                }) => Some((fingerprint, waiters)),
                _ => None,
            });
        match outcome {
            DeductOutcome::Committed(answer) => {
                if let (Some(key), Some((fingerprint, waiters))) = (idempotency_key, in_flight) {
                    for waiter in waiters {
                        let _ = waiter.send(Ok(answer.replayed()));
                    }
                    self.remember(key, fingerprint, answer);
                }
            }
            DeductOutcome::Duplicate {
                fingerprint,
                original,
            } => {
                // Nothing was written: give back exactly what this wallet had taken.
                domain::restore(&mut self.grants, allocations);
                if let (Some(key), Some((sent, waiters))) = (idempotency_key, in_flight) {
                    for waiter in waiters {
                        let _ = waiter.send(replay_or_conflict(&fingerprint, &sent, &original));
                    }
                    self.remember(key, fingerprint, original);
                }
            }
            DeductOutcome::Failed => {
                for waiter in in_flight.into_iter().flat_map(|(_, waiters)| waiters) {
                    let _ = waiter.send(Err(EngineError::Unavailable(
                        "the deduction did not commit; retry",
                    )));
                }
            }
        }
    }
}

/// The answer to a repeated key: the original, marked replayed, if the request is the same.
fn replay_or_conflict(
    stored_fingerprint: &str,
    request_fingerprint: &str,
    original: &DeductAnswer,
) -> Result<DeductAnswer, EngineError> {
    if stored_fingerprint == request_fingerprint {
        Ok(original.replayed())
    } else {
        Err(EngineError::IdempotencyConflict)
    }
}

/// The answer a committed deduction gave, rebuilt from its stored record.
pub fn original_answer(stored: &StoredConsumption) -> DeductAnswer {
    DeductAnswer {
        consumption_id: stored.id,
        credits_cost: stored.credits_cost,
        remaining_credits: stored.remaining_after,
        allocations: stored
            .lines
            .iter()
            .map(|line| domain::Allocation {
                user_package_id: line.user_package_id,
                credits: line.credits,
            })
            .collect(),
        replayed: false,
    }
}
