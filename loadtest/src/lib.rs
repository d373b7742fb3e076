//! loadtest: measures credits-engine under load and proves it lost nothing while doing so.
//!
//! One run drives the engine's internal API (deduct, check, refund, with keyed retries) for a
//! bounded time, then, with `baseline`, drives the naive one-transaction-per-request design on
//! the same workload, and prints both figures and their ratio. After each phase it checks in
//! the database that every credit of every user of the run is accounted for.
//!
//! # Data flow
//!
//! ```text
//!   Config ──> fixtures: fresh users, one grant each (one UNNEST insert)
//!                │
//!                v
//!   driver: C workers, each with its own Session, rng, stats, ledger
//!                │  deduct / check / refund             │
//!                v                                      v
//!   http: keep-alive HTTP/1.1 to the engine   baseline: sqlx, one transaction per request
//!                │                                      │
//!                v                                      v
//!   PhaseRun (stats + what was acknowledged) ──> conservation: compare with PostgreSQL
//!                │
//!                v
//!   report: Summary, printed side by side and as JSON
//! ```
//!
//! # Layout
//!
//! - [`config`]: the command line and the validated [`Config`].
//! - [`engine`]: starts an engine binary on a free port and stops it with SIGTERM.
//! - [`fixtures`]: the run's users and grants in the engine's database.
//! - [`target`]: the [`target::Target`] / [`target::Session`] seam both systems implement.
//! - [`http`]: the engine's API over a bare hyper connection per worker.
//! - [`baseline`]: the naive design in its own schema.
//! - [`driver`]: closed and open loop workers; [`stats`]: outcomes and histograms.
//! - [`conservation`]: the check; [`report`]: the summary.

pub mod baseline;
pub mod config;
pub mod conservation;
pub mod driver;
pub mod engine;
pub mod fixtures;
pub mod http;
pub mod report;
pub mod stats;
pub mod target;

use sqlx::any::AnyPoolOptions;

pub use config::{Args, Config, EngineSource, HotUsers, Mix, Workload};
pub use report::Summary;

use crate::baseline::Baseline;
use crate::conservation::{BASELINE_TABLES, ENGINE_TABLES};
use crate::engine::EngineProcess;
use crate::http::HttpTarget;
use crate::report::{PhaseSummary, WorkloadSummary};

/// Connections the run itself uses for set-up and the conservation checks.
const SETUP_POOL_MAX: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("engine: {0}")]
    Engine(String),
    #[error("http: {0}")]
    Http(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("internal: {0}")]
    Internal(String),
}

/// Progress on stderr, so stdout carries only the summary.
macro_rules! progress {
    ($($arg:tt)*) => { eprintln!("loadtest: {}", format_args!($($arg)*)) };
}

/// Runs the engine phase, then the baseline phase if asked, checking conservation after each.
pub async fn run(config: &Config) -> Result<Summary, Error> {
    let workload = &config.workload;
    workload.validate()?;
    let (process, addr, service_token) = match &config.engine {
        EngineSource::Spawn { bin, database_url } => {
            progress!("starting {} serve", bin.display());
            let process = EngineProcess::start(bin, database_url).await?;
            let (addr, token) = (process.addr, process.service_token.clone());
            (Some(process), addr, token)
        }
        EngineSource::Running {
            addr,
            service_token,
        } => (None, *addr, service_token.clone()),
    };
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(SETUP_POOL_MAX)
        .connect(&config.database_url)
        .await?;
    let credits_cost = fixtures::action_cost(&pool, &workload.action_key).await?;
    let users = fixtures::create_engine_users(
        &pool,
        config.backend,
        workload.users,
        workload.credits_per_user,
    )
    .await?;
    progress!(
        "engine on {addr}: users {}..={}, {} workers, {:?}",
        users.first,
        users.last(),
        workload.concurrency,
        workload.duration
    );
    let target = HttpTarget::new(addr, &service_token, &workload.action_key)?;
    let engine_run = driver::drive(&target, workload, users).await?;
    if let Some(process) = process {
        // Drained and exited: nothing the engine admitted is still uncommitted.
        let status = process.stop().await?;
        if !status.success() {
            progress!("warning: the engine exited with {status} after SIGTERM");
        }
    }
    let conservation = conservation::check(
        &pool,
        ENGINE_TABLES,
        users,
        workload.credits_per_user,
        &engine_run.ledger,
    )
    .await?;
    let engine = PhaseSummary::new(&engine_run, conservation);
    drop(engine_run);
    progress!(
        "engine: {:.0} acknowledged deducts/s, conservation {}",
        engine.deducts_per_s,
        if engine.conservation.ok {
            "ok"
        } else {
            "BROKEN"
        }
    );

    let baseline = if let Some(database) = &config.baseline_database {
        let (baseline, users) = Baseline::prepare(database, workload, credits_cost).await?;
        progress!(
            "baseline ({}): users {}..={}, {} workers over {} connections, {:?}",
            baseline::SCHEMA,
            users.first,
            users.last(),
            workload.concurrency,
            baseline::pool_size(workload),
            workload.duration
        );
        let baseline_run = driver::drive(&baseline, workload, users).await?;
        baseline.close().await;
        let conservation = conservation::check(
            &pool,
            BASELINE_TABLES,
            users,
            workload.credits_per_user,
            &baseline_run.ledger,
        )
        .await?;
        Some(PhaseSummary::new(&baseline_run, conservation))
    } else {
        None
    };
    pool.close().await;
    Ok(Summary::new(
        engine,
        baseline,
        WorkloadSummary::new(workload, credits_cost),
    ))
}
