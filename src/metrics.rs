//! Every metric the engine exports, in one place: names, help texts, buckets and the few
//! helpers the rest of the engine calls. Emitted through the `metrics` facade and rendered by
//! metrics-exporter-prometheus at `/metrics`.
//!
//! Labels are bounded sets only: a route pattern (never a raw path), a status class, an
//! outcome. Never a user id. Where work is batched (the writer), metrics are emitted once per
//! batch, not per effect.

use std::sync::OnceLock;
use std::time::Duration;

use dashmap::DashMap;
use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS: &str = "credits_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "credits_http_request_duration_seconds";

pub const DEDUCTS: &str = "credits_deducts_total";
pub const REFUNDS: &str = "credits_refunds_total";
pub const CREDITS_DEDUCTED: &str = "credits_deducted_total";
pub const CREDITS_REFUNDED: &str = "credits_refunded_total";
pub const CREDITS_FORFEITED: &str = "credits_forfeited_total";
pub const CREDITS_EXPIRED: &str = "credits_expired_total";
pub const CREDITS_REVOKED: &str = "credits_revoked_total";

pub const WALLETS_ACTIVE: &str = "credits_wallets_active";
pub const WALLETS_MAX: &str = "credits_wallets_max";
pub const WALLET_SPAWNS: &str = "credits_wallet_spawns_total";
pub const WALLET_LOAD_BATCH_SIZE: &str = "credits_wallet_load_batch_size";
pub const WALLET_PASSIVATIONS: &str = "credits_wallet_passivations_total";
pub const WALLET_RESTARTS: &str = "credits_wallet_restarts_total";
pub const WALLET_MAILBOX_DEPTH: &str = "credits_wallet_mailbox_depth";

pub const WRITER_QUEUE_DEPTH: &str = "credits_writer_queue_depth";
pub const WRITER_QUEUE_MAX: &str = "credits_writer_queue_max";
pub const WRITER_BATCH_SIZE: &str = "credits_writer_batch_size";
pub const WRITER_COMMIT_DURATION: &str = "credits_writer_commit_duration_seconds";
pub const WRITER_COMMIT_FAILURES: &str = "credits_writer_commit_failures_total";

pub const EXPIRIES: &str = "credits_expiries_total";
pub const RECONCILIATION_RUNS: &str = "credits_reconciliation_runs_total";
pub const RECONCILIATION_MISMATCHES: &str = "credits_reconciliation_mismatches_total";
pub const RECONCILIATION_LAST_MISMATCHES: &str = "credits_reconciliation_last_mismatches";

pub const DB_POOL_CONNECTIONS: &str = "credits_db_pool_connections";
pub const DB_POOL_MAX: &str = "credits_db_pool_max_connections";
pub const READY: &str = "credits_ready";

/// Every metric name above, for tests that check the dashboards and alert rules use only
/// metrics the engine exports.
pub const ALL: &[&str] = &[
    HTTP_REQUESTS,
    HTTP_REQUEST_DURATION,
    DEDUCTS,
    REFUNDS,
    CREDITS_DEDUCTED,
    CREDITS_REFUNDED,
    CREDITS_FORFEITED,
    CREDITS_EXPIRED,
    CREDITS_REVOKED,
    WALLETS_ACTIVE,
    WALLETS_MAX,
    WALLET_SPAWNS,
    WALLET_LOAD_BATCH_SIZE,
    WALLET_PASSIVATIONS,
    WALLET_RESTARTS,
    WALLET_MAILBOX_DEPTH,
    WRITER_QUEUE_DEPTH,
    WRITER_QUEUE_MAX,
    WRITER_BATCH_SIZE,
    WRITER_COMMIT_DURATION,
    WRITER_COMMIT_FAILURES,
    EXPIRIES,
    RECONCILIATION_RUNS,
    RECONCILIATION_MISMATCHES,
    RECONCILIATION_LAST_MISMATCHES,
    DB_POOL_CONNECTIONS,
    DB_POOL_MAX,
    READY,
];

/// Latency buckets, in seconds: 0.5 ms to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.5, 5.0,
    10.0,
];
/// Batch sizes and mailbox depths: 1 to 4096.
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process (tests build many engines in one
/// process) and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Full(WRITER_BATCH_SIZE.into()),
                        COUNT_BUCKETS,
                    )
                })
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Full(WALLET_LOAD_BATCH_SIZE.into()),
                        COUNT_BUCKETS,
                    )
                })
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Full(WALLET_MAILBOX_DEPTH.into()),
                        COUNT_BUCKETS,
                    )
                })
                // The bucket lists above are constants and not empty, so this never fails;
                // should it, plain summaries are still a working exporter.
                .unwrap_or_else(|_| PrometheusBuilder::new())
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a metrics recorder was already installed; /metrics shows ours only"
                );
            }
            describe();
            start_at_zero();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests by route pattern, method and status class"
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "HTTP request latency by route pattern, method and status class"
    );
    describe_counter!(
        DEDUCTS,
        "Deduct requests by outcome: ok, replayed, insufficient, conflict, unknown_action, disabled, invalid, overloaded, unavailable"
    );
    describe_counter!(
        REFUNDS,
        "Refund requests by outcome: ok, replayed, not_found, invalid, overloaded, unavailable"
    );
    describe_counter!(CREDITS_DEDUCTED, "Credits deducted, counted at commit");
    describe_counter!(CREDITS_REFUNDED, "Credits refunded, counted at commit");
    describe_counter!(
        CREDITS_FORFEITED,
        "Credits of refunds that went back to grants no longer valid, so were forfeited"
    );
    describe_counter!(CREDITS_EXPIRED, "Credits voided by grant expiry");
    describe_counter!(CREDITS_REVOKED, "Credits voided by an operator's revoke");
    describe_gauge!(WALLETS_ACTIVE, "Wallet actors in memory");
    describe_gauge!(WALLETS_MAX, "The configured maximum of wallets in memory");
    describe_counter!(WALLET_SPAWNS, "Wallets loaded from the database");
    describe_histogram!(
        WALLET_LOAD_BATCH_SIZE,
        "Wallets whose grants one query loaded (wallets that start together load together)"
    );
    describe_counter!(
        WALLET_PASSIVATIONS,
        "Wallets that left memory: reason idle, or evicted (least recently used, map full)"
    );
    describe_counter!(
        WALLET_RESTARTS,
        "Wallets that panicked and were restarted from the database"
    );
    describe_histogram!(
        WALLET_MAILBOX_DEPTH,
        "Requests already queued in a wallet's mailbox when one more is admitted"
    );
    describe_gauge!(
        WRITER_QUEUE_DEPTH,
        "Effects queued in a writer lane, sampled every 5 s"
    );
    describe_gauge!(
        WRITER_QUEUE_MAX,
        "The configured capacity of all writer lanes together"
    );
    describe_histogram!(WRITER_BATCH_SIZE, "Effects per committed batch");
    describe_histogram!(
        WRITER_COMMIT_DURATION,
        Unit::Seconds,
        "Time to commit one batch"
    );
    describe_counter!(
        WRITER_COMMIT_FAILURES,
        "Batches that failed to commit (none of their effects was acknowledged)"
    );
    describe_counter!(EXPIRIES, "Grants expired by the supervisor");
    describe_counter!(RECONCILIATION_RUNS, "Reconciliation passes completed");
    describe_counter!(
        RECONCILIATION_MISMATCHES,
        "Mismatches found by reconciliation (ledger or memory versus the database)"
    );
    describe_gauge!(
        RECONCILIATION_LAST_MISMATCHES,
        "Mismatches found by the latest reconciliation pass"
    );
    describe_gauge!(
        DB_POOL_CONNECTIONS,
        "Database pool connections by state: idle, in_use"
    );
    describe_gauge!(
        DB_POOL_MAX,
        "The configured maximum of database connections"
    );
    describe_gauge!(
        READY,
        "1 when the database answered the latest probe, else 0"
    );
}

/// Shows the unlabelled counters from the start: a counter that first appears at 1 looks like
/// no increase to `increase()`, so an alert on the first commit failure or panic would miss it.
fn start_at_zero() {
    for name in [
        CREDITS_DEDUCTED,
        CREDITS_REFUNDED,
        CREDITS_FORFEITED,
        CREDITS_EXPIRED,
        CREDITS_REVOKED,
        WALLET_SPAWNS,
        WALLET_RESTARTS,
        WRITER_COMMIT_FAILURES,
        EXPIRIES,
        RECONCILIATION_RUNS,
        RECONCILIATION_MISMATCHES,
    ] {
        counter!(name).absolute(0);
    }
}

/// The status class label of an HTTP status: `2xx`, `4xx`, ...
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The request counter and latency histogram of one (route, method, status class), looked up
/// once and kept: the macros would build and hash the label set on every request.
type HttpSeries = (metrics::Counter, metrics::Histogram);

/// Route patterns kept; the router has a few dozen, so this is only a bound. Beyond it series
/// are still recorded, just looked up each time.
const HTTP_ROUTES_MAX: usize = 1_024;

/// The series of each (method, status class) seen on one route pattern.
type RouteSeries = Vec<(&'static str, &'static str, HttpSeries)>;

/// Per route pattern.
static HTTP_SERIES: OnceLock<DashMap<String, RouteSeries>> = OnceLock::new();

/// The method label: the standard methods by name, anything else as `other`.
fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

pub fn http_request(route: &str, method: &str, status: u16, elapsed: Duration) {
    let class = status_class(status);
    let method = method_label(method);
    let routes = HTTP_SERIES.get_or_init(DashMap::new);
    let known = routes.get(route).and_then(|series| {
        series
            .iter()
            .find(|(m, c, _)| *m == method && *c == class)
            .map(|(_, _, handles)| handles.clone())
    });
    let (requests, duration) = match known {
        Some(handles) => handles,
        None => {
            let labels = [
                ("route", route.to_owned()),
                ("method", method.to_owned()),
                ("status", class.to_owned()),
            ];
            let handles = (
                counter!(HTTP_REQUESTS, &labels),
                metrics::histogram!(HTTP_REQUEST_DURATION, &labels),
            );
            if routes.len() < HTTP_ROUTES_MAX || routes.contains_key(route) {
                routes
                    .entry(route.to_owned())
                    .or_default()
                    .push((method, class, handles.clone()));
            }
            handles
        }
    };
    requests.increment(1);
    duration.record(elapsed.as_secs_f64());
}

/// The outcome label of an API error code on the deduct and refund paths.
pub fn outcome_of_code(code: &str) -> &'static str {
    match code {
        "insufficient_credits" => "insufficient",
        "idempotency_conflict" => "conflict",
        "unknown_action" => "unknown_action",
        "action_disabled" => "disabled",
        "consumption_not_found" => "not_found",
        "overloaded" => "overloaded",
        "unavailable" => "unavailable",
        "invalid_field" | "malformed_json" | "body_too_large" | "unsupported_media_type" => {
            "invalid"
        }
        _ => "other",
    }
}

pub fn deduct_outcome(outcome: &'static str) {
    counter!(DEDUCTS, "outcome" => outcome).increment(1);
}

pub fn refund_outcome(outcome: &'static str) {
    counter!(REFUNDS, "outcome" => outcome).increment(1);
}

/// What one committed batch did, emitted once per batch.
#[derive(Debug, Default)]
pub struct BatchTotals {
    pub credits_deducted: u64,
    pub credits_refunded: u64,
    pub credits_forfeited: u64,
    pub credits_expired: u64,
    pub credits_revoked: u64,
    pub grants_expired: u64,
}

pub fn batch_committed(effects: usize, elapsed: Duration, totals: &BatchTotals) {
    metrics::histogram!(WRITER_BATCH_SIZE).record(effects as f64);
    metrics::histogram!(WRITER_COMMIT_DURATION).record(elapsed.as_secs_f64());
    let counts = [
        (CREDITS_DEDUCTED, totals.credits_deducted),
        (CREDITS_REFUNDED, totals.credits_refunded),
        (CREDITS_FORFEITED, totals.credits_forfeited),
        (CREDITS_EXPIRED, totals.credits_expired),
        (CREDITS_REVOKED, totals.credits_revoked),
        (EXPIRIES, totals.grants_expired),
    ];
    for (name, value) in counts {
        if value > 0 {
            counter!(name).increment(value);
        }
    }
}

pub fn batch_failed(elapsed: Duration) {
    metrics::histogram!(WRITER_COMMIT_DURATION).record(elapsed.as_secs_f64());
    counter!(WRITER_COMMIT_FAILURES).increment(1);
}

pub fn writer_queue_depth(lane: usize, depth: usize) {
    gauge!(WRITER_QUEUE_DEPTH, "lane" => lane.to_string()).set(depth as f64);
}

pub fn wallet_load_batch(wallets: usize) {
    metrics::histogram!(WALLET_LOAD_BATCH_SIZE).record(wallets as f64);
}

pub fn wallet_spawned() {
    counter!(WALLET_SPAWNS).increment(1);
}

pub fn wallet_passivated(reason: &'static str) {
    counter!(WALLET_PASSIVATIONS, "reason" => reason).increment(1);
}

pub fn wallet_restarted() {
    counter!(WALLET_RESTARTS).increment(1);
}

pub fn wallets_active(count: usize) {
    gauge!(WALLETS_ACTIVE).set(count as f64);
}

pub fn mailbox_depth(depth: usize) {
    metrics::histogram!(WALLET_MAILBOX_DEPTH).record(depth as f64);
}

pub fn reconciliation_finished(mismatches: usize) {
    counter!(RECONCILIATION_RUNS).increment(1);
    counter!(RECONCILIATION_MISMATCHES).increment(mismatches as u64);
    gauge!(RECONCILIATION_LAST_MISMATCHES).set(mismatches as f64);
}

/// The pool's connections and the readiness probe, sampled by the supervisor.
pub fn database(ready: bool, size: u32, idle: usize, max: u32) {
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
    let idle = idle as f64;
    gauge!(DB_POOL_CONNECTIONS, "state" => "idle").set(idle);
    gauge!(DB_POOL_CONNECTIONS, "state" => "in_use").set((f64::from(size) - idle).max(0.0));
    gauge!(DB_POOL_MAX).set(f64::from(max));
}

/// The configured limits, set once at start so dashboards can show saturation.
pub fn limits(wallets_max: usize, writer_queue_max: usize) {
    gauge!(WALLETS_MAX).set(wallets_max as f64);
    gauge!(WRITER_QUEUE_MAX).set(writer_queue_max as f64);
}
