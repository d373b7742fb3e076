//! The pure ledger: no IO, no tokio, no clock. `now` is always an argument.
//!
//! A wallet holds its user's grants sorted in burn-down order and asks this module what a
//! deduction or a refund would do; it applies the answer to memory and hands the same answer to
//! the batch writer, so memory and database change by the same deltas.

mod credits;
mod grant;
mod ids;
mod ledger;

pub use credits::Credits;
pub use grant::{
    Activation, Balance, Grant, GrantChangeError, GrantSource, GrantStatus, NewGrant, PackageType,
};
pub use ids::{ConsumptionId, PackageId, UserId, UserPackageId};
pub use ledger::{
    Allocation, Insufficient, RefundLine, RefundPlan, Totals, apply_deduction, is_burn_ordered,
    plan_deduction, plan_refund, restore, sort_burn_order, totals,
};
