//! Errors of the engine below HTTP. `http::error` maps each to a status and a machine code.

use crate::domain::Credits;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("insufficient credits: {remaining_credits} remaining, {credits_cost} needed")]
    InsufficientCredits {
        remaining_credits: Credits,
        credits_cost: Credits,
    },
    #[error("the idempotency key was already used with a different request")]
    IdempotencyConflict,
    #[error("the consumption was not found")]
    ConsumptionNotFound,
    #[error("the package was not found")]
    PackageNotFound,
    #[error("the user package was not found")]
    GrantNotFound,
    /// The grant is in a status that does not allow the change (for example activating an
    /// active grant, or revoking an expired one).
    #[error("the user package is {status}; it cannot be {change}")]
    GrantStatusConflict {
        status: String,
        change: &'static str,
    },
    #[error("the user package's fixed expiry has already passed; it cannot be activated")]
    GrantExpiryPassed,
    /// A queue or mailbox is full: the caller may retry after a pause.
    #[error("the engine is overloaded: {0}")]
    Overloaded(&'static str),
    /// The database is unreachable or a commit failed: nothing was applied; retry later.
    #[error("the engine cannot serve this request right now: {0}")]
    Unavailable(&'static str),
    /// A database error outside the deduct path (reads, admin writes).
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}
