//! What wallets are asked, what they answer, and what the batch writer reports back to them.

use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;
use utoipa::ToSchema;

use crate::domain::{Allocation, ConsumptionId, Credits, Grant, NewGrant, UserPackageId};
use crate::error::EngineError;
use crate::store::{StoredConsumption, UserPackageRow};

/// Where a wallet (or the writer, after the commit) sends its answer.
pub type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// A priced, validated deduction. The HTTP edge has already read the catalog snapshot.
#[derive(Clone, Debug)]
pub struct DeductRequest {
    pub action_key: String,
    pub quantity: i64,
    pub unit_cost: Credits,
    pub credits_cost: Credits,
    pub price_version: i64,
    pub idempotency_key: Option<String>,
    /// sha-256 of the request's canonical form; the same key with another fingerprint conflicts.
    pub fingerprint: String,
    pub metadata: Option<Value>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct DeductAnswer {
    pub consumption_id: ConsumptionId,
    pub credits_cost: Credits,
    pub remaining_credits: Credits,
    pub allocations: Vec<Allocation>,
    pub replayed: bool,
}

impl DeductAnswer {
    pub fn replayed(&self) -> DeductAnswer {
        DeductAnswer {
            replayed: true,
            ..self.clone()
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct CheckAnswer {
    pub sufficient: bool,
    pub credits_cost: Credits,
    pub remaining_credits: Credits,
    pub unlimited: bool,
}

#[derive(Clone, Debug)]
pub enum RefundTarget {
    Id(ConsumptionId),
    IdempotencyKey(String),
}

#[derive(Clone, Debug)]
pub struct RefundRequest {
    pub target: RefundTarget,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct RefundAnswer {
    pub consumption_id: ConsumptionId,
    pub refunded_credits: Credits,
    pub forfeited_credits: Credits,
    pub remaining_credits: Credits,
    pub replayed: bool,
}

#[derive(Clone, Debug)]
pub struct AssignRequest {
    pub grant: NewGrant,
    pub external_ref: Option<String>,
    pub note: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AssignAnswer {
    pub user_package: UserPackageRow,
    /// False when `external_ref` named an earlier assignment, which is returned instead.
    pub created: bool,
}

/// A user announced by the host application: new-user packages are assigned once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct RegisterAnswer {
    pub user_id: i64,
    /// False when the user was announced before (nothing was assigned this time).
    pub newly_registered: bool,
    pub assigned: Vec<UserPackageRow>,
}

/// What the batch writer reports to a wallet about one effect it handed over.
#[derive(Debug)]
pub enum Settlement {
    Deduct {
        idempotency_key: Option<String>,
        allocations: Vec<Allocation>,
        outcome: DeductOutcome,
    },
    Refund {
        consumption_id: ConsumptionId,
        outcome: RefundOutcome,
    },
    /// An operator's grant change; the writer has already answered its caller.
    Grant,
}

#[derive(Debug)]
pub enum DeductOutcome {
    Committed(DeductAnswer),
    /// The key was already committed (by an earlier life of this wallet): nothing was written,
    /// and the wallet gives back the allocations it had taken.
    Duplicate {
        fingerprint: String,
        original: DeductAnswer,
    },
    /// The batch did not commit: memory is ahead of the database until the wallet reloads.
    Failed,
}

#[derive(Debug)]
pub enum RefundOutcome {
    Committed(RefundAnswer),
    Failed,
}

/// A wallet's mailbox.
#[derive(Debug)]
pub enum WalletMsg {
    Check {
        credits_cost: Credits,
        reply: Reply<CheckAnswer>,
    },
    Deduct {
        request: DeductRequest,
        reply: Reply<DeductAnswer>,
    },
    Refund {
        request: RefundRequest,
        reply: Reply<RefundAnswer>,
    },
    Assign {
        request: AssignRequest,
        reply: Reply<AssignAnswer>,
    },
    /// An operator activates a pending grant. `duration_days` is the grant's copy of its
    /// package's duration (grants do not carry it in memory).
    Activate {
        grant_id: UserPackageId,
        duration_days: Option<i32>,
        reply: Reply<UserPackageRow>,
    },
    /// An operator revokes a grant: its remaining credits are void.
    Revoke {
        grant_id: UserPackageId,
        reason: Option<String>,
        reply: Reply<UserPackageRow>,
    },
    /// The supervisor found the grant past its `expires_at`: mark it expired (its remaining
    /// credits void). Answers a status conflict when the grant has already ended or is not due.
    Expire {
        grant_id: UserPackageId,
        reply: Reply<UserPackageRow>,
    },
    /// The host application announced the user: assign the new-user packages once.
    Register {
        grants: Vec<NewGrant>,
        reply: Reply<RegisterAnswer>,
    },
    /// Reconciliation asks for the wallet's memory next to the database's rows.
    Snapshot { reply: Reply<WalletSnapshot> },
    /// The wallet's own idle timer: stop if idle with nothing in flight.
    Passivate,
    /// The registry is full and this wallet is among the least recently used: stop now if
    /// nothing is in flight or queued. Answers whether it stopped.
    Evict { reply: Reply<bool> },
    /// Fault injection for the supervision tests: the wallet panics while handling it.
    #[cfg(feature = "fault-injection")]
    Panic,
    /// From the batch writer, once per batch that held effects of this wallet.
    Settled(Vec<Settlement>),
    /// The consumption a refund names, read from the database off the wallet's turn.
    RefundRead {
        request: RefundRequest,
        reply: Reply<RefundAnswer>,
        read: Result<Option<StoredConsumption>, EngineError>,
    },
}

/// A wallet's answer to reconciliation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalletSnapshot {
    /// Effects are in flight (or the wallet awaits a reload): memory is ahead of the database
    /// by design, so there is nothing to compare this round.
    Busy,
    /// Nothing in flight: memory should equal the database exactly. `stored` was read by the
    /// wallet itself while it held its mailbox, so nothing of this user committed in between.
    Ready {
        memory: Vec<Grant>,
        /// The user's pending, active and depleted grants as the database holds them.
        stored: Vec<Grant>,
    },
}

impl WalletMsg {
    /// Requests count against the mailbox limit; settlements do not (they are bounded by the
    /// writer's queue, and refusing them would strand the wallet).
    pub fn is_request(&self) -> bool {
        !matches!(
            self,
            WalletMsg::Settled(_) | WalletMsg::Passivate | WalletMsg::RefundRead { .. }
        )
    }

    /// A request of a caller (not of housekeeping): it keeps the wallet from going idle.
    pub fn is_use(&self) -> bool {
        self.is_request() && !matches!(self, WalletMsg::Evict { .. } | WalletMsg::Snapshot { .. })
    }
}
