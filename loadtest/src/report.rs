//! What a run reports: a [`PhaseSummary`] per phase and the [`Summary`] of the run, printed as
//! a side-by-side table and written as JSON (`--summary-json`).

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::config::Workload;
use crate::conservation::Conservation;
use crate::driver::PhaseRun;
use crate::stats::{Op, OpStats, Outcomes};
use crate::target::Outcome;

/// One operation of a phase.
#[derive(Clone, Debug, Serialize)]
pub struct OpSummary {
    pub requests: u64,
    pub outcomes: Outcomes,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

impl OpSummary {
    fn new(stats: &OpStats) -> OpSummary {
        OpSummary {
            requests: stats.outcomes.total(),
            outcomes: stats.outcomes,
            p50_ms: stats.latency_ms(0.5),
            p99_ms: stats.latency_ms(0.99),
            p999_ms: stats.latency_ms(0.999),
        }
    }
}

/// One phase (the engine, or the baseline).
#[derive(Clone, Debug, Serialize)]
pub struct PhaseSummary {
    /// Acknowledged (`200`, not replayed) deducts per second of the phase.
    pub deducts_per_s: f64,
    /// Requests of every kind and outcome per second.
    pub requests_per_s: f64,
    /// Deduct latency percentiles (every outcome), from each request's intended start.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Outcomes of all requests together.
    pub outcomes: Outcomes,
    pub deducts_acknowledged: u64,
    pub requests: u64,
    /// From the first request to the last answer (the duration plus the last requests' tail).
    pub elapsed_s: f64,
    pub workers: usize,
    /// A worker filled its ledger and stopped before the duration was over.
    pub stopped_early: bool,
    /// `deduct`, `check`, `refund`.
    pub by_op: BTreeMap<&'static str, OpSummary>,
    pub conservation: Conservation,
}

impl PhaseSummary {
    pub fn new(run: &PhaseRun, conservation: Conservation) -> PhaseSummary {
        let seconds = run.elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        let deducts = run.stats.op(Op::Deduct);
        let acknowledged = deducts.outcomes.get(Outcome::Ok);
        let requests = run.stats.all.outcomes.total();
        PhaseSummary {
            deducts_per_s: acknowledged as f64 / seconds,
            requests_per_s: requests as f64 / seconds,
            p50_ms: deducts.latency_ms(0.5),
            p99_ms: deducts.latency_ms(0.99),
            p999_ms: deducts.latency_ms(0.999),
            outcomes: run.stats.all.outcomes,
            deducts_acknowledged: acknowledged,
            requests,
            elapsed_s: seconds,
            workers: run.workers,
            stopped_early: run.stopped_early,
            by_op: Op::ALL
                .iter()
                .map(|op| (op.name(), OpSummary::new(run.stats.op(*op))))
                .collect(),
            conservation,
        }
    }
}

/// The workload both phases ran, for the record.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadSummary {
    pub users: u64,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub mix: String,
    pub hot_users: u64,
    pub hot_share: f64,
    pub retry_share: f64,
    pub action_key: String,
    pub credits_cost: i64,
    pub seed: u64,
}

impl WorkloadSummary {
    pub fn new(workload: &Workload, credits_cost: i64) -> WorkloadSummary {
        let mix = workload.mix;
        WorkloadSummary {
            users: workload.users,
            concurrency: workload.concurrency,
            rate: workload.rate,
            duration_s: workload.duration.as_secs_f64(),
            warmup_s: workload.warmup.as_secs_f64(),
            mix: format!(
                "deduct={},check={},refund={}",
                mix.deduct, mix.check, mix.refund
            ),
            hot_users: workload.hot.map_or(0, |hot| hot.users),
            hot_share: workload.hot.map_or(0.0, |hot| hot.share),
            retry_share: workload.retry_share,
            action_key: workload.action_key.clone(),
            credits_cost,
            seed: workload.seed,
        }
    }
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub engine: PhaseSummary,
    pub baseline: Option<PhaseSummary>,
    /// Engine deducts/s over baseline deducts/s.
    pub ratio: Option<f64>,
    /// Both phases conserved every credit.
    pub conservation_ok: bool,
    pub workload: WorkloadSummary,
}

impl Summary {
    pub fn new(
        engine: PhaseSummary,
        baseline: Option<PhaseSummary>,
        workload: WorkloadSummary,
    ) -> Summary {
        let ratio = baseline
            .as_ref()
            .filter(|b| b.deducts_per_s > 0.0)
            .map(|b| engine.deducts_per_s / b.deducts_per_s);
        let conservation_ok =
            engine.conservation.ok && baseline.as_ref().is_none_or(|b| b.conservation.ok);
        Summary {
            engine,
            baseline,
            ratio,
            conservation_ok,
            workload,
        }
    }

    fn phases(&self) -> Vec<(&'static str, &PhaseSummary)> {
        let mut phases = vec![("engine", &self.engine)];
        if let Some(baseline) = &self.baseline {
            phases.push(("baseline", baseline));
        }
        phases
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.workload;
        let pacing = match w.rate {
            Some(rate) => format!(
                "open loop at {rate} requests/s over {} workers",
                w.concurrency
            ),
            None => format!("closed loop, {} workers", w.concurrency),
        };
        let warmup = if w.warmup_s > 0.0 {
            format!(" (after {} s unmeasured)", w.warmup_s)
        } else {
            String::new()
        };
        writeln!(
            f,
            "workload: users {}, {pacing}, {} s per phase{warmup}, mix {}, \
             {}% of deducts retried, action {} costing {}, seed {}",
            w.users,
            w.duration_s,
            w.mix,
            w.retry_share * 100.0,
            w.action_key,
            w.credits_cost,
            w.seed
        )?;
        if w.hot_users > 0 {
            writeln!(
                f,
                "hot users: {} of them get {}% of requests",
                w.hot_users,
                w.hot_share * 100.0
            )?;
        }
        let phases = self.phases();
        write!(f, "\n{:<28}", "")?;
        for (name, _) in &phases {
            write!(f, "{name:>14}")?;
        }
        writeln!(f)?;
        let row = |f: &mut fmt::Formatter<'_>,
                   label: &str,
                   value: &dyn Fn(&PhaseSummary) -> String|
         -> fmt::Result {
            write!(f, "{label:<28}")?;
            for (_, phase) in &phases {
                write!(f, "{:>14}", value(phase))?;
            }
            writeln!(f)
        };
        row(f, "acknowledged deducts/s", &|p| {
            format!("{:.0}", p.deducts_per_s)
        })?;
        row(f, "requests/s", &|p| format!("{:.0}", p.requests_per_s))?;
        row(f, "deduct latency p50 ms", &|p| format!("{:.2}", p.p50_ms))?;
        row(f, "deduct latency p99 ms", &|p| format!("{:.2}", p.p99_ms))?;
        row(f, "deduct latency p999 ms", &|p| {
            format!("{:.2}", p.p999_ms)
        })?;
        for outcome in Outcome::ALL {
            row(f, &format!("outcome {}", outcome.name()), &|p| {
                p.outcomes.get(outcome).to_string()
            })?;
        }
        row(f, "conservation", &|p| {
            if p.conservation.ok {
                "ok".into()
            } else {
                format!("BROKEN ({})", p.conservation.problems_total)
            }
        })?;
        match self.ratio {
            Some(ratio) => writeln!(f, "\nengine / baseline acknowledged deducts/s: {ratio:.2}x")?,
            None if self.baseline.is_some() => writeln!(
                f,
                "\nengine / baseline: no ratio (the baseline acknowledged no deduct)"
            )?,
            None => {}
        }
        for (name, phase) in &phases {
            writeln!(
                f,
                "\n{name}: {} requests in {:.2} s over {} workers{}",
                phase.requests,
                phase.elapsed_s,
                phase.workers,
                if phase.stopped_early {
                    " (stopped early: a worker's share of the ledger was full)"
                } else {
                    ""
                }
            )?;
            for (op, summary) in &phase.by_op {
                let outcomes: Vec<String> = summary
                    .outcomes
                    .to_map()
                    .into_iter()
                    .filter(|(_, count)| *count > 0)
                    .map(|(outcome, count)| format!("{outcome}={count}"))
                    .collect();
                writeln!(
                    f,
                    "  {op:<7} {:>9} requests  p50 {:.2} ms  p99 {:.2} ms  p999 {:.2} ms  {}",
                    summary.requests,
                    summary.p50_ms,
                    summary.p99_ms,
                    summary.p999_ms,
                    outcomes.join(" ")
                )?;
            }
            let c = &phase.conservation;
            writeln!(
                f,
                "  conservation: {} ({} users, {} acknowledged deductions, {} acknowledged refunds; \
                 unanswered: {} deducts of which {} charged, {} refunds of which {} done)",
                if c.ok { "ok" } else { "BROKEN" },
                c.users,
                c.consumptions,
                c.refunds,
                c.unsettled_deducts,
                c.unsettled_deducts_charged,
                c.unsettled_refunds,
                c.unsettled_refunds_done
            )?;
            for problem in &c.problems {
                writeln!(f, "    - {problem}")?;
            }
            let unlisted = c.problems_total - c.problems.len() as u64;
            if unlisted > 0 {
                writeln!(f, "    ... and {unlisted} more")?;
            }
        }
        Ok(())
    }
}
