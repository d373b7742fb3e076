//! Finds a user's wallet, spawning it on the user's first request, and supervises wallets.
//!
//! The map holds a slot (a once-cell) per user: concurrent first requests for one user all wait
//! on the same spawn, so a user never gets two wallets. A request that finds a wallet which has
//! stopped gets its message back from ractor (`SendErr`), retires the stale slot and retries
//! with a fresh wallet, so no request is swallowed by a dead actor.
//!
//! Supervision: wallets are linked to a [`WalletSupervisor`] actor. A wallet that panics is
//! restarted from the database at once; the requests in its mailbox get a retryable `503`
//! (their reply ports are dropped with it), and no other wallet notices. Its effects already
//! handed to the writer still commit or fail, so the successor's slot names its predecessor and
//! the successor loads only once those effects have settled: memory never misses a write that
//! was in flight when the old wallet died.
//!
//! Limits: `wallets_max` wallets in memory. When the map is full, the least recently used
//! wallets with nothing in flight are evicted (passivated) to make room; if none can go, the
//! request is `503 overloaded`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use ractor::{
    Actor, ActorId, ActorProcessingErr, ActorRef, MessagingErr, SpawnErr, SupervisionEvent,
};
use tokio::sync::{Mutex, OnceCell, oneshot};

use crate::domain::UserId;
use crate::error::EngineError;
use crate::metrics;
use crate::wallet::{Reply, Wallet, WalletArgs, WalletDeps, WalletLife, WalletMsg};

/// How often a request retries after finding a stopped wallet before giving up with `503`.
const STALE_WALLET_RETRIES_MAX: usize = 3;

/// Longest a restarted wallet waits for its predecessor's in-flight effects to settle before
/// the request that needs it gets a retryable `503` (the next request waits again).
const PREDECESSOR_SETTLE_WAIT_MAX: Duration = Duration::from_secs(10);

/// Wallets asked to leave at once when the map is full: a share of `wallets_max`, at most this,
/// so one scan of the map makes room for many spawns.
const EVICTION_BATCH_MAX: usize = 256;

/// Longest an eviction pass waits for the answers of the wallets it asked (all are asked at
/// once; one that has not answered by then is busy and skipped).
const EVICTION_ANSWER_WAIT: Duration = Duration::from_millis(50);

/// The high bit of a wallet's mailbox counter: set by the wallet itself, only while the
/// counter is zero, when it passivates. A request is admitted by raising the counter with a
/// compare-and-swap that fails once the bit is set, so no request can slip into the mailbox of
/// a wallet that has decided to stop: it goes to a fresh wallet instead.
pub const WALLET_CLOSING: usize = 1 << (usize::BITS - 1);

enum Admission {
    /// Admitted behind this many queued requests.
    Admitted(usize),
    Full,
    Closing,
}

fn admit(depth: &AtomicUsize, max: usize) -> Admission {
    let mut current = depth.load(Ordering::Acquire);
    loop {
        if current & WALLET_CLOSING != 0 {
            return Admission::Closing;
        }
        if current >= max {
            return Admission::Full;
        }
        match depth.compare_exchange_weak(current, current + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return Admission::Admitted(current),
            Err(seen) => current = seen,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct RegistryLimits {
    /// Wallets in memory at once; beyond it the least recently used idle ones are evicted, and
    /// if none can go a request for a new user is `503 overloaded`.
    pub wallets_max: usize,
    /// Requests queued in one wallet's mailbox; beyond it, `503 overloaded`.
    pub mailbox_max: usize,
}

#[derive(Clone)]
struct WalletHandle {
    actor: ActorRef<WalletMsg>,
    life: Arc<WalletLife>,
}

/// One user's place in the map.
#[derive(Default)]
struct Slot {
    wallet: OnceCell<WalletHandle>,
    /// The life this slot's wallet replaces, when that one died with effects in flight.
    predecessor: Option<Arc<WalletLife>>,
}

impl Slot {
    fn handle(&self) -> Option<&WalletHandle> {
        self.wallet.get()
    }

    fn holds(&self, actor: &ActorRef<WalletMsg>) -> bool {
        self.handle()
            .is_some_and(|handle| handle.actor.get_id() == actor.get_id())
    }

    /// Nothing loaded and no predecessor still settling: safe to drop.
    fn is_vacant(&self) -> bool {
        self.wallet.get().is_none()
            && self
                .predecessor
                .as_ref()
                .is_none_or(|life| life.unsettled.is_empty())
    }
}

pub struct Registry {
    wallets: DashMap<UserId, Arc<Slot>>,
    deps: Arc<WalletDeps>,
    limits: RegistryLimits,
    /// The wallets' supervisor, set once right after the registry is built.
    supervisor: OnceLock<ActorRef<()>>,
    /// One eviction pass at a time; the others wait for it and then find room.
    evicting: Mutex<()>,
    /// Counts admitted requests; each stamps its wallet's `last_use`, which orders wallets
    /// from least to most recently used exactly (a clock would tie).
    uses: AtomicU64,
    /// Set by `stop_all`: a supervisor restart racing shutdown loads nothing.
    stopped: AtomicBool,
}

impl Registry {
    /// Builds the registry and starts the supervisor its wallets are linked to.
    pub async fn start(
        deps: Arc<WalletDeps>,
        limits: RegistryLimits,
    ) -> Result<Arc<Registry>, SpawnErr> {
        let registry = Arc::new(Registry {
            wallets: DashMap::new(),
            deps,
            limits,
            supervisor: OnceLock::new(),
            evicting: Mutex::new(()),
            uses: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
        });
        let (supervisor, _join) =
            Actor::spawn(None, WalletSupervisor, Arc::downgrade(&registry)).await?;
        // Set once, here, before the registry is shared.
        let _ = registry.supervisor.set(supervisor);
        Ok(registry)
    }

    /// Wallets in memory that have not passivated.
    pub fn live_len(&self) -> usize {
        self.sweep_passivated();
        self.wallets.len()
    }

    /// Whether the user's wallet is loaded and has not passivated.
    pub fn is_loaded(&self, user_id: UserId) -> bool {
        self.wallets
            .get(&user_id)
            .and_then(|slot| slot.handle().cloned())
            .is_some_and(|handle| {
                handle.life.mailbox_depth.load(Ordering::Acquire) & WALLET_CLOSING == 0
            })
    }

    /// Sends a request to the user's wallet and waits for its answer (which, for a deduction,
    /// comes from the batch writer after the commit).
    pub async fn ask<T>(
        &self,
        user_id: UserId,
        make: impl FnOnce(Reply<T>) -> WalletMsg,
    ) -> Result<T, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.tell(user_id, make(reply)).await?;
        answer.await.unwrap_or(Err(EngineError::Unavailable(
            "the wallet stopped before answering; retry",
        )))
    }

    async fn tell(&self, user_id: UserId, mut message: WalletMsg) -> Result<(), EngineError> {
        for _ in 0..STALE_WALLET_RETRIES_MAX {
            let handle = self.get_or_spawn(user_id).await?;
            match admit(&handle.life.mailbox_depth, self.limits.mailbox_max) {
                Admission::Admitted(depth) => metrics::mailbox_depth(depth),
                Admission::Full => {
                    return Err(EngineError::Overloaded(
                        "this user's wallet mailbox is full",
                    ));
                }
                Admission::Closing => {
                    // Passivated: it admits nothing more and has nothing in flight, so its
                    // successor may load from the database right away.
                    self.retire(user_id, &handle);
                    continue;
                }
            }
            handle
                .life
                .last_use
                .store(self.next_use(), Ordering::Relaxed);
            match handle.actor.send_message(message) {
                Ok(()) => return Ok(()),
                Err(MessagingErr::SendErr(returned)) => {
                    handle.life.mailbox_depth.fetch_sub(1, Ordering::AcqRel);
                    self.retire(user_id, &handle);
                    message = returned;
                }
                Err(_) => {
                    handle.life.mailbox_depth.fetch_sub(1, Ordering::AcqRel);
                    self.retire(user_id, &handle);
                    return Err(EngineError::Unavailable("the wallet stopped; retry"));
                }
            }
        }
        Err(EngineError::Unavailable("the wallet keeps stopping; retry"))
    }

    fn next_use(&self) -> u64 {
        self.uses.fetch_add(1, Ordering::Relaxed)
    }

    async fn get_or_spawn(&self, user_id: UserId) -> Result<WalletHandle, EngineError> {
        let slot = match self.wallets.get(&user_id) {
            Some(slot) => slot.clone(),
            None => {
                if self.wallets.len() >= self.limits.wallets_max {
                    Box::pin(self.make_room()).await?;
                }
                self.wallets.entry(user_id).or_default().clone()
            }
        };
        if let Some(handle) = slot.handle() {
            return Ok(handle.clone());
        }
        // A wallet that died with effects in flight: its successor loads once they settled.
        // Waited for here, each request within its own bound, not inside the once-cell's
        // initialization (which queued requests would run one after another).
        if let Some(predecessor) = &slot.predecessor {
            let settled = predecessor.unsettled.wait_empty();
            if tokio::time::timeout(PREDECESSOR_SETTLE_WAIT_MAX, settled)
                .await
                .is_err()
            {
                return Err(EngineError::Unavailable(
                    "the wallet is restarting after a failure; retry",
                ));
            }
        }
        let spawned = slot
            .wallet
            // Boxed: spawning is the cold path, and its future would otherwise sit inline in
            // every request's future.
            .get_or_try_init(|| Box::pin(self.spawn(user_id)))
            .await;
        match spawned {
            Ok(handle) => Ok(handle.clone()),
            Err(error) => {
                // Leave no empty slot behind to count against `wallets_max`, unless another
                // request holds it (it takes the initialization over from this one) or it still
                // has to hold back a successor until its predecessor's effects settle. Two
                // references: the map's and this one.
                self.wallets.remove_if(&user_id, |_, current| {
                    Arc::ptr_eq(current, &slot)
                        && current.is_vacant()
                        && Arc::strong_count(current) == 2
                });
                Err(error)
            }
        }
    }

    async fn spawn(&self, user_id: UserId) -> Result<WalletHandle, EngineError> {
        let life = Arc::new(WalletLife::default());
        life.last_use.store(self.next_use(), Ordering::Relaxed);
        let args = WalletArgs {
            user_id,
            deps: self.deps.clone(),
            life: life.clone(),
            preloaded: None,
        };
        let spawned = match self.supervisor.get() {
            Some(supervisor) => {
                Actor::spawn_linked(None, Wallet, args, supervisor.get_cell()).await
            }
            None => Actor::spawn(None, Wallet, args).await,
        };
        match spawned {
            Ok((actor, _join)) => {
                metrics::wallet_spawned();
                Ok(WalletHandle { actor, life })
            }
            Err(error) => {
                tracing::warn!(%user_id, %error, "wallet failed to start");
                Err(EngineError::Unavailable(
                    "the wallet could not load its grants",
                ))
            }
        }
    }

    /// The map is full: drops passivated entries, then asks the least recently used wallets
    /// to leave. `503 overloaded` if none could (every wallet is busy).
    async fn make_room(&self) -> Result<(), EngineError> {
        let _one_pass = self.evicting.lock().await;
        self.sweep_passivated();
        if self.wallets.len() < self.limits.wallets_max {
            return Ok(());
        }
        let batch = (self.limits.wallets_max / 64).clamp(1, EVICTION_BATCH_MAX);
        // Asked all at once, answered within one bound: a wallet that does not answer in time
        // is busy, so not a candidate anyway.
        let answers: Vec<_> = self
            .least_recently_used(batch)
            .into_iter()
            .filter_map(|user_id| self.send_live(user_id, |reply| WalletMsg::Evict { reply }))
            .filter_map(Result::ok)
            .collect();
        let all_answered = async {
            for answer in answers {
                let _ = answer.await;
            }
        };
        let _ = tokio::time::timeout(EVICTION_ANSWER_WAIT, all_answered).await;
        self.sweep_passivated();
        if self.wallets.len() < self.limits.wallets_max {
            Ok(())
        } else {
            Err(EngineError::Overloaded(
                "too many wallets in memory, and none is idle",
            ))
        }
    }

    /// The `count` loaded wallets used longest ago.
    fn least_recently_used(&self, count: usize) -> Vec<UserId> {
        let mut candidates: Vec<(u64, UserId)> = self
            .wallets
            .iter()
            .filter_map(|entry| {
                let handle = entry.value().handle()?;
                Some((handle.life.last_use.load(Ordering::Relaxed), *entry.key()))
            })
            .collect();
        if candidates.len() > count {
            candidates.select_nth_unstable(count);
            candidates.truncate(count);
        }
        candidates.into_iter().map(|(_, user_id)| user_id).collect()
    }

    /// Drops the entries of wallets that passivated and were not asked for since, and records
    /// how many are left in the metrics (done when the map is full, by `live_len`, and by the
    /// health probe).
    pub fn sweep_passivated(&self) {
        self.wallets.retain(|_, slot| match slot.handle() {
            Some(handle) => handle.life.mailbox_depth.load(Ordering::Acquire) & WALLET_CLOSING == 0,
            // A slot nobody is loading into (the map holds the only reference) and with no
            // predecessor left to wait for is dropped.
            None => !(slot.is_vacant() && Arc::strong_count(slot) == 1),
        });
        metrics::wallets_active(self.wallets.len());
    }

    /// Takes a wallet that stopped (passivated, or died) out of its slot, unless a newer wallet
    /// already replaced it. If effects it handed over are still in flight, the slot keeps its
    /// life as the predecessor its successor waits for.
    fn retire(&self, user_id: UserId, stopped: &WalletHandle) {
        if let Entry::Occupied(mut entry) = self.wallets.entry(user_id) {
            if !entry.get().holds(&stopped.actor) {
                return;
            }
            if stopped.life.unsettled.is_empty() {
                entry.remove();
            } else {
                entry.insert(Arc::new(Slot {
                    wallet: OnceCell::new(),
                    predecessor: Some(stopped.life.clone()),
                }));
            }
        }
    }

    /// The supervisor saw a wallet fail: retire it and start its successor now, so the user's
    /// next request finds a loaded wallet.
    fn restart_failed(self: Arc<Self>, failed: ActorId, reason: String) {
        metrics::wallet_restarted();
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        let found = self.wallets.iter().find_map(|entry| {
            let handle = entry.value().handle()?;
            (handle.actor.get_id() == failed).then(|| (*entry.key(), handle.clone()))
        });
        // Already retired by a request that found it dead.
        let Some((user_id, handle)) = found else {
            tracing::error!(%failed, reason, "a wallet panicked; its user's next request restarts it");
            return;
        };
        tracing::error!(%user_id, reason, "a wallet panicked; restarting it from the database");
        self.retire(user_id, &handle);
        tokio::spawn(async move {
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            if let Err(error) = self.get_or_spawn(user_id).await {
                tracing::warn!(%user_id, %error, "restarting the wallet failed; the next request retries");
            }
        });
    }

    /// Up to `max` users whose wallet is in memory, starting `offset` entries into the map
    /// (wrapping), so successive bounded passes cover every wallet. Never spawns one.
    pub fn live_users(&self, offset: usize, max: usize) -> Vec<UserId> {
        let len = self.wallets.len();
        if len == 0 || max == 0 {
            return Vec::new();
        }
        let start = offset % len;
        let mut users: Vec<UserId> = self
            .wallets
            .iter()
            .skip(start)
            .filter_map(|entry| entry.value().handle().map(|_| *entry.key()))
            .take(max)
            .collect();
        if users.len() < max {
            let more = max - users.len();
            users.extend(
                self.wallets
                    .iter()
                    .take(start)
                    .filter_map(|entry| entry.value().handle().map(|_| *entry.key()))
                    .take(more),
            );
        }
        users
    }

    /// Asks the user's wallet only if one is in memory (`None` otherwise): reconciliation and
    /// eviction look at live wallets and must not load new ones. Counts against the mailbox
    /// like a request.
    pub async fn ask_live<T>(
        &self,
        user_id: UserId,
        make: impl FnOnce(Reply<T>) -> WalletMsg,
    ) -> Option<Result<T, EngineError>> {
        let answer = match self.send_live(user_id, make)? {
            Ok(answer) => answer,
            Err(error) => return Some(Err(error)),
        };
        Some(answer.await.unwrap_or(Err(EngineError::Unavailable(
            "the wallet stopped before answering",
        ))))
    }

    /// The sending half of [`Registry::ask_live`]: the answer's receiver, an error if the
    /// mailbox is full, `None` if no live wallet took the message.
    fn send_live<T>(
        &self,
        user_id: UserId,
        make: impl FnOnce(Reply<T>) -> WalletMsg,
    ) -> Option<Result<oneshot::Receiver<Result<T, EngineError>>, EngineError>> {
        let handle = self.wallets.get(&user_id)?.handle()?.clone();
        match admit(&handle.life.mailbox_depth, self.limits.mailbox_max) {
            Admission::Admitted(_) => {}
            Admission::Full => {
                return Some(Err(EngineError::Overloaded(
                    "this user's wallet mailbox is full",
                )));
            }
            Admission::Closing => {
                self.retire(user_id, &handle);
                return None;
            }
        }
        let (reply, answer) = oneshot::channel();
        if handle.actor.send_message(make(reply)).is_err() {
            handle.life.mailbox_depth.fetch_sub(1, Ordering::AcqRel);
            self.retire(user_id, &handle);
            return None;
        }
        Some(Ok(answer))
    }

    /// Test support: makes the user's wallet panic (only with the `fault-injection` feature).
    #[cfg(feature = "fault-injection")]
    pub fn inject_panic(&self, user_id: UserId) -> bool {
        let Some(handle) = self
            .wallets
            .get(&user_id)
            .and_then(|slot| slot.handle().cloned())
        else {
            return false;
        };
        handle.life.mailbox_depth.fetch_add(1, Ordering::AcqRel);
        handle.actor.send_message(WalletMsg::Panic).is_ok()
    }

    /// Stops every wallet and their supervisor (at shutdown, after the HTTP server has drained).
    pub fn stop_all(&self) {
        self.stopped.store(true, Ordering::Release);
        for entry in self.wallets.iter() {
            if let Some(handle) = entry.value().handle() {
                handle.actor.stop(Some("engine shutting down".into()));
            }
        }
        self.wallets.clear();
        if let Some(supervisor) = self.supervisor.get() {
            supervisor.stop(Some("engine shutting down".into()));
        }
    }
}

/// The wallets' supervisor: restarts a wallet that failed. A wallet that stops normally
/// (passivation, shutdown) needs nothing: its user's next request loads a fresh one.
pub struct WalletSupervisor;

impl Actor for WalletSupervisor {
    type Msg = ();
    type State = Weak<Registry>;
    type Arguments = Weak<Registry>;

    async fn pre_start(
        &self,
        _myself: ActorRef<()>,
        registry: Weak<Registry>,
    ) -> Result<Weak<Registry>, ActorProcessingErr> {
        Ok(registry)
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<()>,
        event: SupervisionEvent,
        registry: &mut Weak<Registry>,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(wallet, error) = event
            && let Some(registry) = registry.upgrade()
        {
            registry.restart_failed(wallet.get_id(), error.to_string());
        }
        Ok(())
    }
}
