use serde::{Deserialize, Serialize};

/// An amount of credits: never negative, and every operation on it is checked, so an overflow
/// or an overdraw is an error the caller must handle instead of a silent wrap.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(try_from = "i64", into = "i64")]
pub struct Credits(i64);

impl Credits {
    pub const ZERO: Credits = Credits(0);

    /// `None` for a negative amount.
    pub const fn new(amount: i64) -> Option<Credits> {
        if amount < 0 {
            None
        } else {
            Some(Credits(amount))
        }
    }

    pub const fn get(self) -> i64 {
        self.0
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn checked_add(self, other: Credits) -> Option<Credits> {
        self.0.checked_add(other.0).map(Credits)
    }

    /// `None` when the result would be negative.
    pub fn checked_sub(self, other: Credits) -> Option<Credits> {
        self.0.checked_sub(other.0).and_then(Credits::new)
    }

    /// The cost of `quantity` units at this unit price; `None` on overflow or a quantity < 0.
    pub fn checked_mul(self, quantity: i64) -> Option<Credits> {
        self.0.checked_mul(quantity).and_then(Credits::new)
    }
}

impl TryFrom<i64> for Credits {
    type Error = &'static str;

    fn try_from(amount: i64) -> Result<Self, Self::Error> {
        Credits::new(amount).ok_or("credits must not be negative")
    }
}

impl From<Credits> for i64 {
    fn from(credits: Credits) -> i64 {
        credits.0
    }
}

impl std::fmt::Display for Credits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_never_goes_negative_or_wraps() {
        let five = Credits::new(5).unwrap();
        assert_eq!(Credits::new(-1), None);
        assert_eq!(five.checked_sub(Credits::new(6).unwrap()), None);
        assert_eq!(Credits::new(i64::MAX).unwrap().checked_add(five), None);
        assert_eq!(five.checked_mul(i64::MAX), None);
        assert_eq!(five.checked_mul(-1), None);
        assert_eq!(five.checked_mul(3), Credits::new(15));
    }
}
