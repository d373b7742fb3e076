//! The ledger side of reconciliation: every grant's stored balance against its allocations.
//!
//! # The ledger formula
//!
//! Derived from what the batch writer does (`store::writer`):
//!
//! - a deduction inserts `consumption_allocations(credits)` and adds `credits` to the grant's
//!   `used_credits` (taking it from `remaining_credits` when the grant is limited);
//! - a refund adds the restored share of an allocation to its `refunded_credits` and subtracts
//!   exactly that from `used_credits` (giving it back to `remaining_credits`); the forfeited
//!   share (the grant had expired by the time of the refund) only goes to `forfeited_credits`
//!   and never touches the grant, so it stays in `used_credits`;
//! - expiry and revocation move `remaining_credits` to `expired_credits`.
//!
//! So, for every grant:
//!
//! ```text
//! ledger_used = SUM(allocations.credits - allocations.refunded_credits)   (forfeited counts as used)
//! used_credits = ledger_used
//! total_credits = ledger_used + remaining_credits + expired_credits       (limited grants)
//! ```
//!
//! An unlimited grant keeps `total = remaining = expired = 0` (a table CHECK) and only the first
//! identity applies. This is the one definition of a balanced ledger: the tests' helper calls
//! `Store::ledger_mismatches` too.

use serde::Serialize;

/// The grants whose stored balance disagrees with the ledger formula above, with the count of
/// grants checked (in SQL that both backends run). Read in one statement, so it sees one
/// snapshot: a batch the writer commits meanwhile is either wholly in it or wholly not.
pub(crate) const LEDGER_MISMATCHES_SQL: &str = "
WITH ledger AS (
    SELECT g.user_id, g.id, g.status, g.unlimited, g.total_credits, g.used_credits,
           g.remaining_credits, g.expired_credits,
           CAST(COALESCE(SUM(a.credits - a.refunded_credits), 0) AS BIGINT) AS ledger_used_credits
    FROM user_packages g
    LEFT JOIN consumption_allocations a ON a.user_id = g.user_id AND a.user_package_id = g.id
    GROUP BY g.user_id, g.id
),
checked AS (SELECT CAST(count(*) AS BIGINT) AS checked_grants FROM ledger),
mismatched AS (
    SELECT * FROM ledger l
    WHERE l.used_credits <> l.ledger_used_credits
       OR (NOT l.unlimited
           AND l.total_credits <> l.ledger_used_credits + l.remaining_credits + l.expired_credits)
    ORDER BY l.user_id, l.id
    LIMIT $1
)
SELECT c.checked_grants, m.user_id, m.id, m.status, m.unlimited, m.total_credits,
       m.used_credits, m.remaining_credits, m.expired_credits, m.ledger_used_credits
FROM checked c
LEFT JOIN mismatched m ON true
ORDER BY m.user_id, m.id";

/// Allocations whose consumption record or grant does not exist: what the dropped foreign keys
/// of `consumption_allocations` used to forbid (PostgreSQL migration 0002; the SQLite schema
/// never had them). The batch writer never makes one, so any is a bug or a hand edit.
pub(crate) const ORPHAN_ALLOCATIONS_SQL: &str = "
SELECT a.user_id, a.consumption_id, a.user_package_id, a.credits,
       c.id IS NULL AS consumption_missing, g.id IS NULL AS grant_missing
FROM consumption_allocations a
LEFT JOIN consumption_records c ON c.user_id = a.user_id AND c.id = a.consumption_id
LEFT JOIN user_packages g ON g.user_id = a.user_id AND g.id = a.user_package_id
WHERE c.id IS NULL OR g.id IS NULL
ORDER BY a.user_id, a.consumption_id, a.user_package_id
LIMIT $1";

/// The `LIMIT` that reads one row more than `max`, so a cut list can tell it was cut.
pub(crate) fn limit_past(max: usize) -> i64 {
    i64::try_from(max).unwrap_or(i64::MAX - 1).saturating_add(1)
}

/// A grant whose stored balance disagrees with its allocations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct LedgerMismatch {
    pub user_id: i64,
    pub user_package_id: i64,
    pub status: String,
    pub unlimited: bool,
    pub total_credits: i64,
    pub used_credits: i64,
    pub remaining_credits: i64,
    pub expired_credits: i64,
    /// What the allocations say was used: `SUM(credits - refunded_credits)`.
    pub ledger_used_credits: i64,
    /// `used_credits - ledger_used_credits`: positive when the row claims more was used than
    /// its allocations show.
    pub difference: i64,
}

/// What one pass over the ledger found.
#[derive(Clone, Debug, Default)]
pub struct LedgerCheck {
    pub checked_grants: i64,
    /// At most the `max` asked for, ordered by (user_id, user_package_id).
    pub mismatches: Vec<LedgerMismatch>,
    /// More mismatches exist than were returned.
    pub truncated: bool,
}

#[derive(sqlx::FromRow)]
pub(crate) struct LedgerRow {
    checked_grants: i64,
    user_id: Option<i64>,
    id: Option<i64>,
    status: Option<String>,
    unlimited: Option<bool>,
    total_credits: Option<i64>,
    used_credits: Option<i64>,
    remaining_credits: Option<i64>,
    expired_credits: Option<i64>,
    ledger_used_credits: Option<i64>,
}

impl LedgerCheck {
    /// The check of the rows [`LEDGER_MISMATCHES_SQL`] answered with `LIMIT limit_past(max)`.
    pub(crate) fn of(rows: Vec<LedgerRow>, max: usize) -> LedgerCheck {
        let checked_grants = rows.first().map_or(0, |row| row.checked_grants);
        let mut mismatches: Vec<LedgerMismatch> =
            rows.into_iter().filter_map(LedgerRow::mismatch).collect();
        let truncated = mismatches.len() > max;
        mismatches.truncate(max);
        LedgerCheck {
            checked_grants,
            mismatches,
            truncated,
        }
    }
}

/// At most `max` of `orphans` (read with `LIMIT limit_past(max)`), and whether there are more.
pub(crate) fn cut_orphans(
    mut orphans: Vec<OrphanAllocation>,
    max: usize,
) -> (Vec<OrphanAllocation>, bool) {
    let truncated = orphans.len() > max;
    orphans.truncate(max);
    (orphans, truncated)
}

impl LedgerRow {
    /// `None` for the lone row of a check that found nothing (the outer join's empty side).
    fn mismatch(self) -> Option<LedgerMismatch> {
        let used_credits = self.used_credits?;
        let ledger_used_credits = self.ledger_used_credits?;
        Some(LedgerMismatch {
            user_id: self.user_id?,
            user_package_id: self.id?,
            status: self.status?,
            unlimited: self.unlimited?,
            total_credits: self.total_credits?,
            used_credits,
            remaining_credits: self.remaining_credits?,
            expired_credits: self.expired_credits?,
            ledger_used_credits,
            difference: used_credits - ledger_used_credits,
        })
    }
}

/// An allocation that names a consumption record or a grant that does not exist.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct OrphanAllocation {
    pub user_id: i64,
    pub consumption_id: i64,
    pub user_package_id: i64,
    pub credits: i64,
    pub consumption_missing: bool,
    pub grant_missing: bool,
}

/// Kind of the audit event a reconciliation mismatch is written as.
pub const MISMATCH_EVENT_KIND: &str = "billing_reconciliation_mismatch";
