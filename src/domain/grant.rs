use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::{Credits, PackageId, UserPackageId};

/// The 2 x 2 of limited/unlimited and expiring/non-expiring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackageType {
    /// `credits_amount`, counted down, never expires.
    Credits,
    /// `credits_amount`, counted down, expires `duration_days` after activation.
    Hybrid,
    /// Unlimited while valid, expires `duration_days` after activation.
    Duration,
    /// Unlimited, never expires.
    Permanent,
}

impl PackageType {
    pub const fn as_str(self) -> &'static str {
        match self {
            PackageType::Credits => "credits",
            PackageType::Hybrid => "hybrid",
            PackageType::Duration => "duration",
            PackageType::Permanent => "permanent",
        }
    }

    pub fn parse(text: &str) -> Option<PackageType> {
        match text {
            "credits" => Some(PackageType::Credits),
            "hybrid" => Some(PackageType::Hybrid),
            "duration" => Some(PackageType::Duration),
            "permanent" => Some(PackageType::Permanent),
            _ => None,
        }
    }

    pub const fn is_unlimited(self) -> bool {
        matches!(self, PackageType::Duration | PackageType::Permanent)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GrantStatus {
    /// Assigned but not activated: not spendable, never expires.
    Pending,
    Active,
    /// A limited grant with nothing left; a refund makes it active again.
    Depleted,
    Expired,
    Revoked,
}

impl GrantStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            GrantStatus::Pending => "pending",
            GrantStatus::Active => "active",
            GrantStatus::Depleted => "depleted",
            GrantStatus::Expired => "expired",
            GrantStatus::Revoked => "revoked",
        }
    }

    pub fn parse(text: &str) -> Option<GrantStatus> {
        match text {
            "pending" => Some(GrantStatus::Pending),
            "active" => Some(GrantStatus::Active),
            "depleted" => Some(GrantStatus::Depleted),
            "expired" => Some(GrantStatus::Expired),
            "revoked" => Some(GrantStatus::Revoked),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantSource {
    Purchase,
    Gift,
    Promotion,
    System,
}

impl GrantSource {
    pub const fn as_str(self) -> &'static str {
        match self {
            GrantSource::Purchase => "purchase",
            GrantSource::Gift => "gift",
            GrantSource::Promotion => "promotion",
            GrantSource::System => "system",
        }
    }

    pub fn parse(text: &str) -> Option<GrantSource> {
        match text {
            "purchase" => Some(GrantSource::Purchase),
            "gift" => Some(GrantSource::Gift),
            "promotion" => Some(GrantSource::Promotion),
            "system" => Some(GrantSource::System),
            _ => None,
        }
    }
}

/// What a grant can still pay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    /// Invariant: `total = used + remaining + expired`.
    Limited {
        total: Credits,
        used: Credits,
        remaining: Credits,
        expired: Credits,
    },
    /// Pays any cost while valid; `used` still counts what it paid.
    Unlimited { used: Credits },
}

/// A grant as the wallet holds it: the part of a `user_packages` row that deductions touch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub id: UserPackageId,
    /// Lower burns first.
    pub priority: i32,
    pub expires_at: Option<DateTime<Utc>>,
    pub status: GrantStatus,
    pub balance: Balance,
}

impl Grant {
    /// Whether the grant may pay or take back credits at `now`: activated, not expired or
    /// revoked, and before its expiry (a grant is void at and after `expires_at`, whether or not
    /// the supervisor has marked it yet).
    pub fn is_live_at(&self, now: DateTime<Utc>) -> bool {
        matches!(self.status, GrantStatus::Active | GrantStatus::Depleted)
            && self.expires_at.is_none_or(|expires_at| now < expires_at)
    }

    pub fn is_unlimited(&self) -> bool {
        matches!(self.balance, Balance::Unlimited { .. })
    }

    /// Remaining credits of a limited grant; zero for an unlimited one.
    pub fn remaining(&self) -> Credits {
        match self.balance {
            Balance::Limited { remaining, .. } => remaining,
            Balance::Unlimited { .. } => Credits::ZERO,
        }
    }

    pub fn used(&self) -> Credits {
        match self.balance {
            Balance::Limited { used, .. } | Balance::Unlimited { used } => used,
        }
    }

    /// The burn-down sort key: `priority ASC`, then `expires_at ASC` with never-expiring last,
    /// then creation order (ids come from one increasing sequence).
    pub fn burn_key(&self) -> (i32, bool, Option<DateTime<Utc>>, UserPackageId) {
        (
            self.priority,
            self.expires_at.is_none(),
            self.expires_at,
            self.id,
        )
    }
}

/// Why a grant cannot make the change an operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantChangeError {
    /// Only a pending grant can be activated; the grant is in this status.
    NotPending(GrantStatus),
    /// Its fixed expiry (an operator's override) has already passed.
    ExpiryPassed,
}

/// When an activated grant starts and ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activation {
    pub activated_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl Grant {
    /// Activates a pending grant at `now`: it expires `duration_days` later unless an expiry was
    /// fixed when it was assigned.
    pub fn activate(
        &mut self,
        now: DateTime<Utc>,
        duration_days: Option<i32>,
    ) -> Result<Activation, GrantChangeError> {
        if self.status != GrantStatus::Pending {
            return Err(GrantChangeError::NotPending(self.status));
        }
        let expires_at = match (self.expires_at, duration_days) {
            (Some(at), _) => Some(at),
            (None, Some(days)) => Some(now + Duration::days(i64::from(days))),
            (None, None) => None,
        };
        if expires_at.is_some_and(|at| at <= now) {
            return Err(GrantChangeError::ExpiryPassed);
        }
        self.status = if self.is_unlimited() || !self.remaining().is_zero() {
            GrantStatus::Active
        } else {
            GrantStatus::Depleted
        };
        self.expires_at = expires_at;
        Ok(Activation {
            activated_at: now,
            expires_at,
        })
    }

    /// Ends the grant (`Expired` or `Revoked`): whatever remains is void, recorded as expired
    /// credits, never silently dropped. Returns the voided credits.
    pub fn end(&mut self, status: GrantStatus) -> Credits {
        debug_assert!(matches!(
            status,
            GrantStatus::Expired | GrantStatus::Revoked
        ));
        self.status = status;
        match &mut self.balance {
            Balance::Limited {
                remaining, expired, ..
            } => {
                let voided = *remaining;
                *remaining = Credits::ZERO;
                // total = used + remaining + expired: moving remaining into expired keeps it.
                *expired = expired.checked_add(voided).unwrap_or(*expired);
                voided
            }
            Balance::Unlimited { .. } => Credits::ZERO,
        }
    }
}

/// A grant about to be assigned: computed from a package snapshot and the operator's overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewGrant {
    pub package_id: PackageId,
    pub source: GrantSource,
    pub status: GrantStatus,
    pub priority: i32,
    pub unlimited: bool,
    pub total_credits: Credits,
    pub duration_days: Option<i32>,
    pub activated_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl NewGrant {
    /// The grant a package gives. Activated now, it expires `duration_days` from `now` unless
    /// `expires_at` overrides it (a campaign gift); left pending, it has no expiry until activated
    /// unless overridden.
    #[allow(clippy::too_many_arguments)]
    pub fn from_package(
        package_id: PackageId,
        package_type: PackageType,
        credits_amount: Option<Credits>,
        duration_days: Option<i32>,
        priority: i32,
        source: GrantSource,
        expires_at_override: Option<DateTime<Utc>>,
        activate: bool,
        now: DateTime<Utc>,
    ) -> NewGrant {
        let unlimited = package_type.is_unlimited();
        let total_credits = if unlimited {
            Credits::ZERO
        } else {
            credits_amount.unwrap_or(Credits::ZERO)
        };
        let expires_at = match (expires_at_override, activate, duration_days) {
            (Some(at), _, _) => Some(at),
            (None, true, Some(days)) => Some(now + Duration::days(i64::from(days))),
            _ => None,
        };
        NewGrant {
            package_id,
            source,
            status: if activate {
                GrantStatus::Active
            } else {
                GrantStatus::Pending
            },
            priority,
            unlimited,
            total_credits,
            duration_days,
            activated_at: activate.then_some(now),
            expires_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap()
    }

    fn limited(status: GrantStatus, remaining: i64, used: i64) -> Grant {
        Grant {
            id: UserPackageId(1),
            priority: 100,
            expires_at: None,
            status,
            balance: Balance::Limited {
                total: Credits::new(remaining + used).unwrap(),
                used: Credits::new(used).unwrap(),
                remaining: Credits::new(remaining).unwrap(),
                expired: Credits::ZERO,
            },
        }
    }

    #[test]
    fn activation_starts_the_duration_now_unless_an_expiry_was_fixed() {
        let mut grant = limited(GrantStatus::Pending, 10, 0);
        let activation = grant.activate(now(), Some(30)).unwrap();
        assert_eq!(activation.expires_at, Some(now() + Duration::days(30)));
        assert_eq!(grant.status, GrantStatus::Active);
        assert_eq!(
            grant.activate(now(), Some(30)),
            Err(GrantChangeError::NotPending(GrantStatus::Active))
        );

        let fixed = now() + Duration::days(3);
        let mut gift = limited(GrantStatus::Pending, 10, 0);
        gift.expires_at = Some(fixed);
        assert_eq!(
            gift.activate(now(), Some(30)).unwrap().expires_at,
            Some(fixed)
        );

        let mut late = limited(GrantStatus::Pending, 10, 0);
        late.expires_at = Some(now());
        assert_eq!(
            late.activate(now(), Some(30)),
            Err(GrantChangeError::ExpiryPassed)
        );
        assert_eq!(
            late.status,
            GrantStatus::Pending,
            "a refused activation changes nothing"
        );
    }

    #[test]
    fn ending_a_grant_voids_what_remains_and_keeps_the_balance_identity() {
        let mut grant = limited(GrantStatus::Active, 7, 3);
        assert_eq!(grant.end(GrantStatus::Revoked), Credits::new(7).unwrap());
        assert_eq!(grant.status, GrantStatus::Revoked);
        assert_eq!(
            grant.balance,
            Balance::Limited {
                total: Credits::new(10).unwrap(),
                used: Credits::new(3).unwrap(),
                remaining: Credits::ZERO,
                expired: Credits::new(7).unwrap(),
            }
        );
        let mut unlimited = Grant {
            balance: Balance::Unlimited {
                used: Credits::new(4).unwrap(),
            },
            ..limited(GrantStatus::Active, 0, 0)
        };
        assert_eq!(unlimited.end(GrantStatus::Expired), Credits::ZERO);
        assert_eq!(unlimited.status, GrantStatus::Expired);
    }
}
