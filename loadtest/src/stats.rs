//! Counting what happened: outcome counts and latency histograms per operation, one set per
//! worker (no sharing on the hot path), merged when the phase ends.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

use crate::Error;
use crate::target::Outcome;

/// Largest latency the histograms tell apart; slower requests are recorded as this.
pub const LATENCY_US_MAX: u64 = 60_000_000;

/// Significant decimal digits the histograms keep (0.1% relative error).
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

/// How many requests ended in each [`Outcome`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcomes([u64; Outcome::ALL.len()]);

impl Outcomes {
    pub fn add(&mut self, outcome: Outcome) {
        self.0[outcome as usize] += 1;
    }

    pub fn get(&self, outcome: Outcome) -> u64 {
        self.0[outcome as usize]
    }

    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    pub fn merge(&mut self, other: &Outcomes) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }

    /// `{"ok": n, "replayed": n, ...}` with every outcome present, in a stable order.
    pub fn to_map(&self) -> BTreeMap<&'static str, u64> {
        Outcome::ALL
            .iter()
            .map(|outcome| (outcome.name(), self.get(*outcome)))
            .collect()
    }
}

impl Serialize for Outcomes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(Outcome::ALL.iter().map(|o| (o.name(), self.get(*o))))
    }
}

/// Outcomes and latencies of one operation (deduct, check or refund).
#[derive(Clone, Debug)]
pub struct OpStats {
    pub outcomes: Outcomes,
    /// Microseconds from each request's intended start to its answer, whatever the outcome.
    pub latency_us: Histogram<u64>,
}

impl OpStats {
    pub fn new() -> Result<OpStats, Error> {
        let latency_us = Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGNIFICANT_DIGITS)
            .map_err(|error| Error::Internal(format!("latency histogram: {error}")))?;
        Ok(OpStats {
            outcomes: Outcomes::default(),
            latency_us,
        })
    }

    pub fn record(&mut self, outcome: Outcome, latency: Duration) {
        self.outcomes.add(outcome);
        let us = u64::try_from(latency.as_micros()).unwrap_or(LATENCY_US_MAX);
        self.latency_us.saturating_record(us.max(1));
    }

    pub fn merge(&mut self, other: &OpStats) -> Result<(), Error> {
        self.outcomes.merge(&other.outcomes);
        self.latency_us
            .add(&other.latency_us)
            .map_err(|error| Error::Internal(format!("merging latency histograms: {error}")))
    }

    /// The latency at `quantile` (0.5 = median) in milliseconds; 0 when nothing was recorded.
    pub fn latency_ms(&self, quantile: f64) -> f64 {
        if self.latency_us.is_empty() {
            return 0.0;
        }
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// The three operations of the mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Deduct,
    Check,
    Refund,
}

impl Op {
    pub const ALL: [Op; 3] = [Op::Deduct, Op::Check, Op::Refund];

    pub fn name(self) -> &'static str {
        match self {
            Op::Deduct => "deduct",
            Op::Check => "check",
            Op::Refund => "refund",
        }
    }
}

/// One [`OpStats`] per operation, plus all requests together.
#[derive(Clone, Debug)]
pub struct PhaseStats {
    pub by_op: [OpStats; 3],
    pub all: OpStats,
}

impl PhaseStats {
    pub fn new() -> Result<PhaseStats, Error> {
        Ok(PhaseStats {
            by_op: [OpStats::new()?, OpStats::new()?, OpStats::new()?],
            all: OpStats::new()?,
        })
    }

    pub fn record(&mut self, op: Op, outcome: Outcome, latency: Duration) {
        self.by_op[op as usize].record(outcome, latency);
        self.all.record(outcome, latency);
    }

    pub fn op(&self, op: Op) -> &OpStats {
        &self.by_op[op as usize]
    }

    pub fn merge(&mut self, other: &PhaseStats) -> Result<(), Error> {
        for (mine, theirs) in self.by_op.iter_mut().zip(&other.by_op) {
            mine.merge(theirs)?;
        }
        self.all.merge(&other.all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_count_and_merge() {
        let mut a = Outcomes::default();
        a.add(Outcome::Ok);
        a.add(Outcome::Ok);
        let mut b = Outcomes::default();
        b.add(Outcome::Transport);
        a.merge(&b);
        assert_eq!(a.get(Outcome::Ok), 2);
        assert_eq!(a.get(Outcome::Transport), 1);
        assert_eq!(a.total(), 3);
        assert_eq!(a.to_map().len(), Outcome::ALL.len());
    }

    #[test]
    fn latency_percentiles_in_milliseconds() {
        let mut stats = OpStats::new().unwrap();
        assert_eq!(stats.latency_ms(0.5), 0.0);
        for ms in 1..=100 {
            stats.record(Outcome::Ok, Duration::from_millis(ms));
        }
        let p50 = stats.latency_ms(0.5);
        assert!((49.9..=50.1).contains(&p50), "{p50}");
        // Beyond the histogram's range is recorded at its top, not dropped.
        stats.record(Outcome::Ok, Duration::from_secs(3600));
        assert_eq!(stats.outcomes.total(), 101);
    }
}
