//! Finds a user's wallet, spawning it on the user's first request.
//!
//! The map holds a once-cell per user: concurrent first requests for one user all wait on the
//! same spawn, so a user never gets two wallets. A request that finds a wallet which has
//! stopped gets its message back from ractor (`SendErr`), drops the stale entry and retries with
//! a fresh wallet, so no request is swallowed by a dead actor.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use ractor::{Actor, ActorRef, MessagingErr};
use tokio::sync::{OnceCell, oneshot};

use crate::domain::UserId;
use crate::error::EngineError;
use crate::wallet::{Reply, Wallet, WalletArgs, WalletDeps, WalletMsg};

/// How often a request retries after finding a stopped wallet before giving up with `503`.
const STALE_WALLET_RETRIES_MAX: usize = 3;

/// The high bit of a wallet's mailbox counter: set by the wallet itself, only while the
/// counter is zero, when it passivates. A request is admitted by raising the counter with a
/// compare-and-swap that fails once the bit is set, so no request can slip into the mailbox of
/// a wallet that has decided to stop: it goes to a fresh wallet instead.
pub const WALLET_CLOSING: usize = 1 << (usize::BITS - 1);

enum Admission {
    Admitted,
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
            Ok(_) => return Admission::Admitted,
            Err(seen) => current = seen,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct RegistryLimits {
    /// Wallets in memory at once; a request for a new user beyond it is `503 overloaded`.
    pub wallets_max: usize,
    /// Requests queued in one wallet's mailbox; beyond it, `503 overloaded`.
    pub mailbox_max: usize,
}

#[derive(Clone)]
struct WalletHandle {
    actor: ActorRef<WalletMsg>,
    mailbox_depth: Arc<AtomicUsize>,
}

pub struct Registry {
    wallets: DashMap<UserId, Arc<OnceCell<WalletHandle>>>,
    deps: Arc<WalletDeps>,
    limits: RegistryLimits,
}

impl Registry {
    pub fn new(deps: Arc<WalletDeps>, limits: RegistryLimits) -> Registry {
        Registry {
            wallets: DashMap::new(),
            deps,
            limits,
        }
    }

    /// Wallets currently in memory.
    pub fn len(&self) -> usize {
        self.wallets.len()
    }

    /// Wallets in memory that have not passivated.
    pub fn live_len(&self) -> usize {
        self.sweep_passivated();
        self.wallets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.wallets.is_empty()
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
            match admit(&handle.mailbox_depth, self.limits.mailbox_max) {
                Admission::Admitted => {}
                Admission::Full => {
                    return Err(EngineError::Overloaded(
                        "this user's wallet mailbox is full",
                    ));
                }
                Admission::Closing => {
                    // Passivated: it admits nothing more and has nothing in flight, so its
                    // successor may load from the database right away.
                    self.forget(user_id, &handle.actor);
                    continue;
                }
            }
            match handle.actor.send_message(message) {
                Ok(()) => return Ok(()),
                Err(MessagingErr::SendErr(returned)) => {
                    handle.mailbox_depth.fetch_sub(1, Ordering::AcqRel);
                    self.forget(user_id, &handle.actor);
                    message = returned;
                }
                Err(_) => {
                    handle.mailbox_depth.fetch_sub(1, Ordering::AcqRel);
                    self.forget(user_id, &handle.actor);
                    return Err(EngineError::Unavailable("the wallet stopped; retry"));
                }
            }
        }
        Err(EngineError::Unavailable("the wallet keeps stopping; retry"))
    }

    async fn get_or_spawn(&self, user_id: UserId) -> Result<WalletHandle, EngineError> {
        let cell = match self.wallets.get(&user_id) {
            Some(cell) => cell.clone(),
            None => {
                if self.wallets.len() >= self.limits.wallets_max {
                    self.sweep_passivated();
                }
                if self.wallets.len() >= self.limits.wallets_max {
                    return Err(EngineError::Overloaded("too many wallets in memory"));
                }
                self.wallets.entry(user_id).or_default().clone()
            }
        };
        match cell.get_or_try_init(|| self.spawn(user_id)).await {
            Ok(handle) => Ok(handle.clone()),
            Err(error) => {
                // Leave no empty cell behind to count against `wallets_max`.
                self.wallets
                    .remove_if(&user_id, |_, cell| cell.get().is_none());
                Err(error)
            }
        }
    }

    async fn spawn(&self, user_id: UserId) -> Result<WalletHandle, EngineError> {
        let mailbox_depth = Arc::new(AtomicUsize::new(0));
        let args = WalletArgs {
            user_id,
            deps: self.deps.clone(),
            mailbox_depth: mailbox_depth.clone(),
        };
        match Actor::spawn(None, Wallet, args).await {
            Ok((actor, _join)) => Ok(WalletHandle {
                actor,
                mailbox_depth,
            }),
            Err(error) => {
                tracing::warn!(%user_id, %error, "wallet failed to start");
                Err(EngineError::Unavailable(
                    "the wallet could not load its grants",
                ))
            }
        }
    }

    /// Drops the entries of wallets that passivated and were not asked for since (done when the
    /// map is full, and by `live_len`).
    pub fn sweep_passivated(&self) {
        self.wallets.retain(|_, cell| {
            cell.get().is_none_or(|handle| {
                handle.mailbox_depth.load(Ordering::Acquire) & WALLET_CLOSING == 0
            })
        });
    }

    /// Drops the entry of a wallet that stopped, unless a newer wallet already replaced it.
    fn forget(&self, user_id: UserId, stopped: &ActorRef<WalletMsg>) {
        self.wallets.remove_if(&user_id, |_, cell| {
            cell.get()
                .is_some_and(|handle| handle.actor.get_id() == stopped.get_id())
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
            .filter_map(|entry| entry.value().get().map(|_| *entry.key()))
            .take(max)
            .collect();
        if users.len() < max {
            let more = max - users.len();
            users.extend(
                self.wallets
                    .iter()
                    .take(start)
                    .filter_map(|entry| entry.value().get().map(|_| *entry.key()))
                    .take(more),
            );
        }
        users
    }

    /// Asks the user's wallet only if one is in memory (`None` otherwise): reconciliation looks
    /// at live wallets and must not load new ones. Counts against the mailbox like a request.
    pub async fn ask_live<T>(
        &self,
        user_id: UserId,
        make: impl FnOnce(Reply<T>) -> WalletMsg,
    ) -> Option<Result<T, EngineError>> {
        let handle = self.wallets.get(&user_id)?.get()?.clone();
        match admit(&handle.mailbox_depth, self.limits.mailbox_max) {
            Admission::Admitted => {}
            Admission::Full => {
                return Some(Err(EngineError::Overloaded(
                    "this user's wallet mailbox is full",
                )));
            }
            Admission::Closing => {
                self.forget(user_id, &handle.actor);
                return None;
            }
        }
        let (reply, answer) = oneshot::channel();
        if handle.actor.send_message(make(reply)).is_err() {
            handle.mailbox_depth.fetch_sub(1, Ordering::AcqRel);
            self.forget(user_id, &handle.actor);
            return None;
        }
        Some(answer.await.unwrap_or(Err(EngineError::Unavailable(
            "the wallet stopped before answering",
        ))))
    }

    /// Stops every wallet (at shutdown, after the HTTP server has drained).
    pub fn stop_all(&self) {
        for entry in self.wallets.iter() {
            if let Some(handle) = entry.value().get() {
                handle.actor.stop(Some("engine shutting down".into()));
            }
        }
        self.wallets.clear();
    }
}
