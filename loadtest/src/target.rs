//! What the load is driven against: a [`Target`] opens [`Session`]s, one per worker, and a
//! session answers deducts, checks and refunds. The engine over HTTP ([`crate::http`]) and the
//! naive baseline on PostgreSQL ([`crate::baseline`]) both implement it, so the same workload
//! code drives both.

use std::future::Future;

use crate::Error;

/// How one request ended, as the summary counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `200`, not a replay.
    Ok,
    /// `200` with `replayed: true` (an idempotency key or refund seen before).
    Replayed,
    /// `402 insufficient_credits`.
    Insufficient,
    /// `409`: `idempotency_conflict` or `action_disabled`.
    Conflict,
    /// `503 overloaded`: a queue was full; nothing was admitted.
    Overloaded,
    /// `503 unavailable` (or any other `503`): the database could not be reached.
    Unavailable,
    /// Any other status, or a `200` whose body could not be read.
    Other,
    /// No answer: connection refused or reset, or the request timed out.
    Transport,
}

impl Outcome {
    /// Every outcome, in the order the summary prints them.
    pub const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::Replayed,
        Outcome::Insufficient,
        Outcome::Conflict,
        Outcome::Overloaded,
        Outcome::Unavailable,
        Outcome::Other,
        Outcome::Transport,
    ];

    /// The name in the summary and its JSON.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Replayed => "replayed",
            Outcome::Insufficient => "insufficient",
            Outcome::Conflict => "conflict",
            Outcome::Overloaded => "overloaded",
            Outcome::Unavailable => "unavailable",
            Outcome::Other => "other",
            Outcome::Transport => "transport",
        }
    }

    /// Whether the answer says for certain that nothing was charged (or refunded). Anything
    /// else that is not a `200` may or may not have been applied, so the conservation check
    /// looks it up in the database instead of assuming.
    pub fn settles_nothing_applied(self) -> bool {
        matches!(self, Outcome::Insufficient | Outcome::Conflict)
    }
}

/// What a deduct answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeductReply {
    /// A `200`.
    Acked {
        consumption_id: i64,
        credits_cost: i64,
        replayed: bool,
    },
    /// Anything else.
    Failed(Outcome),
}

/// What a refund answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefundReply {
    /// A `200`.
    Acked {
        refunded_credits: i64,
        forfeited_credits: i64,
        replayed: bool,
    },
    /// Anything else.
    Failed(Outcome),
}

/// A system under load: the engine or the baseline.
pub trait Target {
    type Session: Session + 'static;

    /// Opens one worker's session (for HTTP, its keep-alive connection), before the clock starts.
    fn session(&self) -> impl Future<Output = Result<Self::Session, Error>> + Send;
}

/// One worker's way to the target. Requests on a session are sequential.
pub trait Session: Send {
    /// Charges `user_id` for the run's action under `idempotency_key`.
    fn deduct(
        &mut self,
        user_id: i64,
        idempotency_key: &str,
    ) -> impl Future<Output = DeductReply> + Send;

    /// Asks whether `user_id` can pay for the run's action; `Outcome::Ok` when answered.
    fn check(&mut self, user_id: i64) -> impl Future<Output = Outcome> + Send;

    /// Refunds a consumption this run was acknowledged for.
    fn refund(&mut self, consumption_id: i64) -> impl Future<Output = RefundReply> + Send;
}
