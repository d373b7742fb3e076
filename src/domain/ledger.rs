//! Burn-down, refunds and totals over a wallet's grants.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Balance, Credits, Grant, GrantStatus, UserPackageId};

/// Credits one grant paid (or gets back).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Allocation {
    pub user_package_id: UserPackageId,
    pub credits: Credits,
}

/// The answer when the live grants cannot pay the whole cost; nothing was deducted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insufficient {
    pub remaining_credits: Credits,
}

/// What a user holds at a moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Totals {
    /// Sum of the live limited grants' remaining credits.
    pub remaining_credits: Credits,
    /// Whether a live unlimited grant exists (then any cost is payable).
    pub unlimited: bool,
}

pub fn sort_burn_order(grants: &mut [Grant]) {
    grants.sort_by_key(Grant::burn_key);
}

pub fn is_burn_ordered(grants: &[Grant]) -> bool {
    grants
        .windows(2)
        .all(|pair| pair[0].burn_key() <= pair[1].burn_key())
}

pub fn totals(grants: &[Grant], now: DateTime<Utc>) -> Totals {
    let mut totals = Totals {
        remaining_credits: Credits::ZERO,
        unlimited: false,
    };
    for grant in grants.iter().filter(|grant| grant.is_live_at(now)) {
        match grant.balance {
            Balance::Unlimited { .. } => totals.unlimited = true,
            Balance::Limited { remaining, .. } => {
                // The sum of non-negative i64 balances that each fit the database cannot
                // realistically overflow; saturate rather than fail a read.
                totals.remaining_credits = totals
                    .remaining_credits
                    .checked_add(remaining)
                    .unwrap_or(Credits::new(i64::MAX).unwrap_or(Credits::ZERO));
            }
        }
    }
    totals
}

/// Which grants pay `cost` at `now`, all or nothing. `grants` must be in burn-down order.
///
/// A zero cost needs no grant and always succeeds with no allocation.
pub fn plan_deduction(
    grants: &[Grant],
    cost: Credits,
    now: DateTime<Utc>,
) -> Result<Vec<Allocation>, Insufficient> {
    debug_assert!(
        is_burn_ordered(grants),
        "wallet grants must stay in burn order"
    );
    let mut allocations = Vec::new();
    let mut owed = cost;
    for grant in grants.iter().filter(|grant| grant.is_live_at(now)) {
        if owed.is_zero() {
            break;
        }
        let take = match grant.balance {
            // An unlimited grant whose usage counter cannot record more pays nothing (never
            // reached with bounded prices, but it keeps `apply_deduction` total). A limited grant cannot
            // overflow: used + remaining = total.
            Balance::Unlimited { used } if used.checked_add(owed).is_none() => Credits::ZERO,
            Balance::Unlimited { .. } => owed,
            Balance::Limited { remaining, .. } => remaining.min(owed),
        };
        if take.is_zero() {
            continue;
        }
        allocations.push(Allocation {
            user_package_id: grant.id,
            credits: take,
        });
        // take <= owed by construction.
        owed = owed.checked_sub(take).unwrap_or(Credits::ZERO);
    }
    if owed.is_zero() {
        Ok(allocations)
    } else {
        Err(Insufficient {
            remaining_credits: totals(grants, now).remaining_credits,
        })
    }
}

/// Takes planned allocations out of the grants.
///
/// Panics (a proven invariant, not input) if an allocation names a grant that is absent or
/// cannot pay it: allocations only come from `plan_deduction` over the same grants.
pub fn apply_deduction(grants: &mut [Grant], allocations: &[Allocation]) {
    let mut cursor = 0;
    for allocation in allocations {
        cursor = position_from(grants, cursor, allocation.user_package_id)
            .expect("allocation names a grant of this wallet");
        let grant = &mut grants[cursor];
        match &mut grant.balance {
            Balance::Unlimited { used } => {
                *used = used.checked_add(allocation.credits).expect("used fits i64");
            }
            Balance::Limited {
                used, remaining, ..
            } => {
                *remaining = remaining
                    .checked_sub(allocation.credits)
                    .expect("plan_deduction never takes more than remains");
                *used = used.checked_add(allocation.credits).expect("used fits i64");
                if remaining.is_zero() && grant.status == GrantStatus::Active {
                    grant.status = GrantStatus::Depleted;
                }
            }
        }
    }
}

/// Gives credits back to the grants they came from: the inverse of `apply_deduction`, used
/// for refunds and for deductions that turned out to be replays. Allocations naming a grant
/// the wallet no longer holds are skipped (their credits were forfeited by the caller's plan).
pub fn restore(grants: &mut [Grant], allocations: &[Allocation]) {
    let mut cursor = 0;
    for allocation in allocations {
        let Some(found) = position_from(grants, cursor, allocation.user_package_id) else {
            continue;
        };
        cursor = found;
        let grant = &mut grants[cursor];
        match &mut grant.balance {
            Balance::Unlimited { used } => {
                *used = used
                    .checked_sub(allocation.credits)
                    .unwrap_or(Credits::ZERO);
            }
            Balance::Limited {
                used, remaining, ..
            } => {
                *used = used
                    .checked_sub(allocation.credits)
                    .expect("never restores more than the grant paid");
                *remaining = remaining
                    .checked_add(allocation.credits)
                    .expect("remaining stays <= total");
                if !remaining.is_zero() && grant.status == GrantStatus::Depleted {
                    grant.status = GrantStatus::Active;
                }
            }
        }
    }
}

/// Where grant `id` is, searching from `start` onwards and then from the beginning.
/// Allocations come in burn order, so walking them this way is linear in the grants, not
/// quadratic.
fn position_from(grants: &[Grant], start: usize, id: UserPackageId) -> Option<usize> {
    let start = start.min(grants.len());
    grants[start..]
        .iter()
        .position(|grant| grant.id == id)
        .map(|offset| start + offset)
        .or_else(|| grants[..start].iter().position(|grant| grant.id == id))
}

/// One allocation of a consumption as stored, with what has already come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefundLine {
    pub user_package_id: UserPackageId,
    pub credits: Credits,
    pub refunded: Credits,
    pub forfeited: Credits,
}

/// What a refund does: `restore` goes back to live grants, `forfeit` is void because its grant
/// expired or was revoked meanwhile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RefundPlan {
    pub restore: Vec<Allocation>,
    pub forfeit: Vec<Allocation>,
}

impl RefundPlan {
    pub fn refunded_credits(&self) -> Credits {
        sum(&self.restore)
    }

    pub fn forfeited_credits(&self) -> Credits {
        sum(&self.forfeit)
    }

    /// Per allocation share: the grant it came from, the credits it gives back and the
    /// credits it forfeits (one of the two is zero); restored shares first.
    pub fn shares(&self) -> impl Iterator<Item = (UserPackageId, i64, i64)> + '_ {
        let restored = self
            .restore
            .iter()
            .map(|share| (share.user_package_id, share.credits.get(), 0));
        let forfeited = self
            .forfeit
            .iter()
            .map(|share| (share.user_package_id, 0, share.credits.get()));
        restored.chain(forfeited)
    }
}

fn sum(allocations: &[Allocation]) -> Credits {
    allocations
        .iter()
        .try_fold(Credits::ZERO, |total, allocation| {
            total.checked_add(allocation.credits)
        })
        .unwrap_or(Credits::ZERO)
}

/// Plans the refund of a consumption's outstanding allocations at `now`. A share whose grant is
/// still live returns to it; any other share is forfeited. It never returns more than was taken
/// and not yet given back.
pub fn plan_refund(grants: &[Grant], lines: &[RefundLine], now: DateTime<Utc>) -> RefundPlan {
    let mut plan = RefundPlan::default();
    for line in lines {
        let outstanding = line
            .credits
            .checked_sub(line.refunded)
            .and_then(|rest| rest.checked_sub(line.forfeited))
            .unwrap_or(Credits::ZERO);
        if outstanding.is_zero() {
            continue;
        }
        let share = Allocation {
            user_package_id: line.user_package_id,
            credits: outstanding,
        };
        let live = grants
            .iter()
            .any(|grant| grant.id == line.user_package_id && grant.is_live_at(now));
        if live {
            plan.restore.push(share);
        } else {
            plan.forfeit.push(share);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};
    use proptest::prelude::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + seconds, 0).unwrap()
    }

    fn limited(id: i64, priority: i32, expires_in: Option<i64>, remaining: i64) -> Grant {
        Grant {
            id: UserPackageId(id),
            priority,
            expires_at: expires_in.map(at),
            status: if remaining == 0 {
                GrantStatus::Depleted
            } else {
                GrantStatus::Active
            },
            balance: Balance::Limited {
                total: Credits::new(remaining).unwrap(),
                used: Credits::ZERO,
                remaining: Credits::new(remaining).unwrap(),
                expired: Credits::ZERO,
            },
        }
    }

    fn c(amount: i64) -> Credits {
        Credits::new(amount).unwrap()
    }

    #[test]
    fn burns_priority_then_expiry_then_creation() {
        let mut grants = vec![
            limited(1, 100, None, 5),
            limited(2, 100, Some(100), 5),
            limited(3, 10, None, 5),
            limited(4, 100, Some(50), 5),
        ];
        sort_burn_order(&mut grants);
        let plan = plan_deduction(&grants, c(20), at(0)).unwrap();
        let order: Vec<i64> = plan.iter().map(|a| a.user_package_id.get()).collect();
        assert_eq!(order, vec![3, 4, 2, 1]);
    }

    #[test]
    fn short_total_deducts_nothing() {
        let grants = vec![limited(1, 1, None, 3), limited(2, 2, None, 4)];
        let err = plan_deduction(&grants, c(8), at(0)).unwrap_err();
        assert_eq!(err.remaining_credits, c(7));
    }

    #[test]
    fn grant_is_void_at_its_expiry_instant() {
        let grants = vec![limited(1, 1, Some(10), 3)];
        let just_before = at(10) - Duration::milliseconds(1);
        assert!(plan_deduction(&grants, c(1), just_before).is_ok());
        assert!(plan_deduction(&grants, c(1), at(10)).is_err());
    }

    #[test]
    fn unlimited_pays_whatever_is_left_after_earlier_grants() {
        let mut grants = vec![
            limited(1, 1, None, 2),
            Grant {
                id: UserPackageId(2),
                priority: 5,
                expires_at: Some(at(100)),
                status: GrantStatus::Active,
                balance: Balance::Unlimited {
                    used: Credits::ZERO,
                },
            },
        ];
        let plan = plan_deduction(&grants, c(1_000), at(0)).unwrap();
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[1].credits, c(998));
        apply_deduction(&mut grants, &plan);
        assert_eq!(grants[0].status, GrantStatus::Depleted);
        assert_eq!(grants[1].used(), c(998));
        assert!(totals(&grants, at(0)).unlimited);
        assert!(!totals(&grants, at(100)).unlimited);
    }

    #[test]
    fn refund_forfeits_the_share_of_an_expired_grant() {
        let mut grants = vec![limited(1, 1, Some(10), 2), limited(2, 2, None, 5)];
        let plan = plan_deduction(&grants, c(4), at(0)).unwrap();
        apply_deduction(&mut grants, &plan);
        let lines: Vec<RefundLine> = plan
            .iter()
            .map(|a| RefundLine {
                user_package_id: a.user_package_id,
                credits: a.credits,
                refunded: Credits::ZERO,
                forfeited: Credits::ZERO,
            })
            .collect();
        let refund = plan_refund(&grants, &lines, at(20));
        assert_eq!(refund.forfeited_credits(), c(2));
        assert_eq!(refund.refunded_credits(), c(2));
        restore(&mut grants, &refund.restore);
        assert_eq!(grants[1].remaining(), c(5));
        assert_eq!(grants[0].remaining(), c(0));
    }

    /// The balance identity of a limited grant and non-negativity of everything.
    fn conserved(grant: &Grant) -> bool {
        match grant.balance {
            Balance::Limited {
                total,
                used,
                remaining,
                expired,
            } => {
                used.get() + remaining.get() + expired.get() == total.get()
                    && (grant.status != GrantStatus::Depleted || remaining.is_zero())
            }
            Balance::Unlimited { used } => used.get() >= 0,
        }
    }

    fn arb_grant() -> impl Strategy<Value = Grant> {
        (
            1i32..4,
            proptest::option::of(-5i64..20),
            0i64..50,
            proptest::bool::weighted(0.15),
            proptest::sample::select(vec![
                GrantStatus::Active,
                GrantStatus::Active,
                GrantStatus::Active,
                GrantStatus::Pending,
                GrantStatus::Expired,
                GrantStatus::Revoked,
            ]),
        )
            .prop_map(|(priority, expires, remaining, unlimited, status)| {
                let status = if !unlimited && remaining == 0 && status == GrantStatus::Active {
                    GrantStatus::Depleted
                } else {
                    status
                };
                Grant {
                    id: UserPackageId(0),
                    priority,
                    expires_at: expires.map(at),
                    status,
                    balance: if unlimited {
                        Balance::Unlimited {
                            used: Credits::ZERO,
                        }
                    } else {
                        Balance::Limited {
                            total: Credits::new(remaining).unwrap(),
                            used: Credits::ZERO,
                            remaining: Credits::new(remaining).unwrap(),
                            expired: Credits::ZERO,
                        }
                    },
                }
            })
    }

    fn arb_wallet() -> impl Strategy<Value = Vec<Grant>> {
        proptest::collection::vec(arb_grant(), 0..8).prop_map(|mut grants| {
            for (index, grant) in grants.iter_mut().enumerate() {
                grant.id = UserPackageId(index as i64 + 1);
            }
            sort_burn_order(&mut grants);
            grants
        })
    }

    fn lines_of(allocations: &[Allocation]) -> Vec<RefundLine> {
        allocations
            .iter()
            .map(|a| RefundLine {
                user_package_id: a.user_package_id,
                credits: a.credits,
                refunded: Credits::ZERO,
                forfeited: Credits::ZERO,
            })
            .collect()
    }

    proptest! {
        /// A sequence of deductions conserves credits: every grant's identity holds, the
        /// user's remaining drops by exactly what was allocated, nothing goes negative, and a
        /// deduction either pays in full or changes nothing.
        #[test]
        fn deductions_conserve_credits(mut grants in arb_wallet(), costs in proptest::collection::vec(0i64..40, 1..12), now in -2i64..25) {
            let now = at(now);
            for cost in costs {
                let before = grants.clone();
                let remaining_before = totals(&grants, now).remaining_credits;
                match plan_deduction(&grants, c(cost), now) {
                    Ok(plan) => {
                        let allocated: i64 = plan.iter().map(|a| a.credits.get()).sum();
                        prop_assert_eq!(allocated, cost);
                        prop_assert!(plan.iter().all(|a| !a.credits.is_zero()));
                        apply_deduction(&mut grants, &plan);
                        let limited_taken: i64 = plan
                            .iter()
                            .filter(|a| before.iter().any(|g| g.id == a.user_package_id && !g.is_unlimited()))
                            .map(|a| a.credits.get())
                            .sum();
                        prop_assert_eq!(
                            totals(&grants, now).remaining_credits.get(),
                            remaining_before.get() - limited_taken
                        );
                    }
                    Err(short) => {
                        prop_assert_eq!(&grants, &before);
                        prop_assert!(short.remaining_credits.get() < cost);
                        prop_assert!(!totals(&grants, now).unlimited);
                    }
                }
                prop_assert!(grants.iter().all(conserved));
            }
        }

        /// Allocations follow burn-down order: a grant is only touched once every live grant
        /// before it is exhausted, and only live grants pay.
        #[test]
        fn burn_down_order_holds(grants in arb_wallet(), cost in 0i64..120, now in -2i64..25) {
            let now = at(now);
            if let Ok(plan) = plan_deduction(&grants, c(cost), now) {
                let positions: Vec<usize> = plan
                    .iter()
                    .map(|a| grants.iter().position(|g| g.id == a.user_package_id).unwrap())
                    .collect();
                prop_assert!(positions.windows(2).all(|w| w[0] < w[1]));
                for (allocation, &position) in plan.iter().zip(&positions) {
                    prop_assert!(grants[position].is_live_at(now));
                    let is_last = position == *positions.last().unwrap();
                    if !is_last && !grants[position].is_unlimited() {
                        prop_assert_eq!(allocation.credits, grants[position].remaining());
                    }
                }
                // Every live limited grant before the last payer was emptied by this plan.
                if let Some(&last) = positions.last() {
                    for grant in grants[..last].iter().filter(|g| g.is_live_at(now)) {
                        let paid = plan.iter().find(|a| a.user_package_id == grant.id).map(|a| a.credits);
                        prop_assert_eq!(paid.unwrap_or(Credits::ZERO), grant.remaining());
                    }
                }
            }
        }

        /// A refund never returns more than was taken, splits it exactly into restored and
        /// forfeited, and restoring brings every still-live grant back to where it started.
        #[test]
        fn refund_returns_at_most_what_was_taken(
            mut grants in arb_wallet(),
            cost in 0i64..60,
            now in -2i64..10,
            later in 0i64..30,
        ) {
            let now = at(now);
            let refund_at = now + Duration::seconds(later);
            let before = grants.clone();
            let Ok(plan) = plan_deduction(&grants, c(cost), now) else { return Ok(()); };
            apply_deduction(&mut grants, &plan);
            let refund = plan_refund(&grants, &lines_of(&plan), refund_at);
            prop_assert_eq!(refund.refunded_credits().get() + refund.forfeited_credits().get(), cost);
            restore(&mut grants, &refund.restore);
            prop_assert!(grants.iter().all(conserved));
            for (after, original) in grants.iter().zip(&before) {
                if after.is_live_at(refund_at) {
                    prop_assert_eq!(after.remaining(), original.remaining());
                    prop_assert_eq!(after.used(), original.used());
                }
            }
            // A second refund over the now fully refunded lines gives nothing back.
            let settled: Vec<RefundLine> = lines_of(&plan)
                .into_iter()
                .map(|line| RefundLine { refunded: line.credits, ..line })
                .collect();
            let again = plan_refund(&grants, &settled, refund_at);
            prop_assert!(again.restore.is_empty() && again.forfeit.is_empty());
        }

        /// Giving back a deduction that turned out to be a replay leaves the wallet exactly as
        /// it was: a replay changes nothing.
        #[test]
        fn a_replay_changes_nothing(mut grants in arb_wallet(), cost in 0i64..60, now in -2i64..25) {
            let now = at(now);
            let before = grants.clone();
            if let Ok(plan) = plan_deduction(&grants, c(cost), now) {
                apply_deduction(&mut grants, &plan);
                restore(&mut grants, &plan);
                prop_assert_eq!(grants, before);
            }
        }
    }
}
