//! What a run does: the command line ([`Args`]) and the validated [`Config`] it turns into.
//! Tests build a [`Config`] directly.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use sqlx::postgres::PgConnectOptions;

use crate::Error;

/// Most users one run creates grants for (one array in one insert, and one row each in the
/// conservation check).
pub const USERS_MAX: u64 = 1_000_000;

/// Most concurrent workers (each holds a connection to the engine, or a baseline transaction).
pub const CONCURRENCY_MAX: usize = 4_096;

/// The service token a running engine (`--target`) is assumed to accept unless told otherwise.
pub const DEFAULT_SERVICE_TOKEN: &str = "dev-service-token";

/// The command line. Every run needs the engine's database (to create the users' grants and to
/// check conservation afterwards) and either an engine binary to start or a running engine.
#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    about = "Drives credits-engine's internal API, optionally runs the naive one-transaction-per-request \
             baseline on the same workload, and checks that every credit is accounted for"
)]
pub struct Args {
    /// URL of the engine's database, `postgres://...` or `sqlite://...`; the baseline (which
    /// needs PostgreSQL) uses its own schema in it.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Start this credits-engine binary (`PATH serve`) on the database, on a free port, and stop
    /// it with SIGTERM at the end.
    #[arg(long, required_unless_present = "target", conflicts_with = "target")]
    pub engine_bin: Option<PathBuf>,

    /// Use an engine that is already running, for example `http://127.0.0.1:8080`.
    #[arg(long)]
    pub target: Option<String>,

    /// Service token for `--target` (a started engine gets a fresh one).
    #[arg(long, default_value = DEFAULT_SERVICE_TOKEN)]
    pub service_token: String,

    /// How long each phase sends requests (`20s`, `500ms`, `1m`).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Before each phase, the same workload for this long, unmeasured (its acknowledgements are
    /// still checked): wallets loaded, connections and caches warm. `0s`: none.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,

    /// Users, each with one grant of `--credits-per-user`.
    #[arg(long, default_value_t = 10_000)]
    pub users: u64,

    /// Workers. Closed loop: each sends its next request when the last one is answered. With
    /// `--rate`: the connections (and the most requests in flight) the rate is spread over.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,

    /// Open loop: requests per second in total, each latency measured from its intended start.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Weights of the operations, for example `deduct=90,check=5,refund=5`.
    #[arg(long, default_value = "deduct=90,check=5,refund=5")]
    pub mix: Mix,

    /// Users that receive `--hot-share` of all requests (0: every user alike).
    #[arg(long, default_value_t = 0)]
    pub hot_users: u64,

    /// Share of requests that goes to the `--hot-users`.
    #[arg(long, default_value_t = 0.5)]
    pub hot_share: f64,

    /// Share of deducts that retry an already acknowledged idempotency key (each must be
    /// answered `replayed: true` and charge nothing).
    #[arg(long, default_value_t = 0.01)]
    pub retry_share: f64,

    /// The action every deduct and check names; its cost is read from `action_prices`.
    #[arg(long = "action", default_value = "ai_chat")]
    pub action_key: String,

    /// Starting credits of each user's grant (large enough never to run out by default).
    #[arg(long, default_value_t = 1_000_000_000)]
    pub credits_per_user: i64,

    /// Also run the naive baseline on the same workload, after the engine.
    #[arg(long)]
    pub baseline: bool,

    /// Write the summary as JSON to this file.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,

    /// Seed of the request stream (a random one when left out).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl Args {
    /// The validated configuration: every limit checked, the target resolved.
    pub fn into_config(self) -> Result<Config, Error> {
        let backend = Backend::of(&self.database_url)?;
        let baseline_database = match (self.baseline, backend) {
            (false, _) => None,
            (true, Backend::Postgres) => Some(PgConnectOptions::from_str(&self.database_url)?),
            (true, Backend::Sqlite) => {
                return Err(Error::Config(
                    "--baseline runs the naive design on PostgreSQL: give a postgres:// \
                     --database-url"
                        .into(),
                ));
            }
        };
        let database_url = self.database_url.clone();
        let engine = match (self.engine_bin, self.target) {
            (Some(bin), None) => EngineSource::Spawn {
                bin,
                database_url: self.database_url,
            },
            (None, Some(target)) => EngineSource::Running {
                addr: parse_target(&target)?,
                service_token: self.service_token,
            },
            _ => {
                return Err(Error::Config(
                    "name exactly one of --engine-bin and --target".into(),
                ));
            }
        };
        let workload = Workload {
            duration: self.duration,
            warmup: self.warmup,
            users: self.users,
            concurrency: self.concurrency,
            rate: self.rate,
            mix: self.mix,
            hot: (self.hot_users > 0).then_some(HotUsers {
                users: self.hot_users,
                share: self.hot_share,
            }),
            retry_share: self.retry_share,
            action_key: self.action_key,
            credits_per_user: self.credits_per_user,
            seed: self.seed.unwrap_or_else(|| fastrand::u64(..)),
        };
        workload.validate()?;
        Ok(Config {
            database_url,
            backend,
            baseline_database,
            engine,
            workload,
        })
    }
}

/// `http://127.0.0.1:8080`, `127.0.0.1:8080/` or `localhost:8080` to a socket address.
fn parse_target(target: &str) -> Result<SocketAddr, Error> {
    let host_port = target
        .strip_prefix("http://")
        .unwrap_or(target)
        .trim_end_matches('/');
    host_port
        .to_socket_addrs()
        .map_err(|error| Error::Config(format!("--target {target}: {error}")))?
        .next()
        .ok_or_else(|| Error::Config(format!("--target {target} resolves to no address")))
}

/// One run.
#[derive(Clone, Debug)]
pub struct Config {
    /// The engine's database, for the run's set-up and checks.
    pub database_url: String,
    pub backend: Backend,
    /// Where the baseline runs (`--baseline`): the same PostgreSQL database.
    pub baseline_database: Option<PgConnectOptions>,
    pub engine: EngineSource,
    pub workload: Workload,
}

/// Which database the engine keeps its data in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn of(database_url: &str) -> Result<Backend, Error> {
        if database_url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if database_url.starts_with("postgres:") || database_url.starts_with("postgresql:") {
            Ok(Backend::Postgres)
        } else {
            Err(Error::Config(
                "--database-url must start with postgres://, postgresql:// or sqlite:".into(),
            ))
        }
    }
}

/// Where the engine comes from.
#[derive(Clone, Debug)]
pub enum EngineSource {
    /// Started by the run and stopped at its end.
    Spawn {
        bin: PathBuf,
        /// Handed to the engine as `DATABASE_URL`.
        database_url: String,
    },
    /// Already running (another process, or in-process in a test).
    Running {
        addr: SocketAddr,
        service_token: String,
    },
}

/// The requests of a phase; the engine and the baseline get the same.
#[derive(Clone, Debug)]
pub struct Workload {
    pub duration: Duration,
    /// Unmeasured lead-in of each phase (zero: none).
    pub warmup: Duration,
    pub users: u64,
    pub concurrency: usize,
    /// Requests per second in total (open loop); `None` is a closed loop.
    pub rate: Option<f64>,
    pub mix: Mix,
    pub hot: Option<HotUsers>,
    pub retry_share: f64,
    pub action_key: String,
    pub credits_per_user: i64,
    /// Seeds each worker's random choices (worker `i` uses `seed + i`).
    pub seed: u64,
}

impl Workload {
    pub fn validate(&self) -> Result<(), Error> {
        let fail = |message: String| Err(Error::Config(message));
        if self.duration.is_zero() {
            return fail("--duration must be more than zero".into());
        }
        if self.users == 0 || self.users > USERS_MAX {
            return fail(format!("--users must be 1..={USERS_MAX}"));
        }
        if self.concurrency == 0 || self.concurrency > CONCURRENCY_MAX {
            return fail(format!("--concurrency must be 1..={CONCURRENCY_MAX}"));
        }
        if let Some(rate) = self.rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return fail("--rate must be a positive number of requests per second".into());
        }
        if let Some(hot) = &self.hot {
            if hot.users > self.users {
                return fail("--hot-users cannot exceed --users".into());
            }
            if !(0.0..=1.0).contains(&hot.share) {
                return fail("--hot-share must be within 0..=1".into());
            }
        }
        if !(0.0..=1.0).contains(&self.retry_share) {
            return fail("--retry-share must be within 0..=1".into());
        }
        if self.credits_per_user <= 0 {
            return fail("--credits-per-user must be positive".into());
        }
        let key_ok = !self.action_key.is_empty()
            && self.action_key.len() <= 64
            && self
                .action_key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
        if !key_ok {
            return fail("--action must match [a-z0-9_.-]{1,64}".into());
        }
        Ok(())
    }
}

/// A share of requests concentrated on a few users.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HotUsers {
    pub users: u64,
    /// Share of all requests (0..=1) that goes to these users.
    pub share: f64,
}

/// Relative weights of deduct, check and refund. A refund is only possible once the worker has
/// an acknowledged deduction to refund; until then its turn is a deduct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mix {
    pub deduct: u32,
    pub check: u32,
    pub refund: u32,
}

impl Mix {
    pub fn total(&self) -> u32 {
        self.deduct + self.check + self.refund
    }
}

impl FromStr for Mix {
    type Err = String;

    fn from_str(value: &str) -> Result<Mix, String> {
        let mut mix = Mix {
            deduct: 0,
            check: 0,
            refund: 0,
        };
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not name=weight"))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("the weight of {name} is not a whole number"))?;
            match name.trim() {
                "deduct" => mix.deduct = weight,
                "check" => mix.check = weight,
                "refund" => mix.refund = weight,
                other => {
                    return Err(format!(
                        "unknown operation `{other}` (deduct, check, refund)"
                    ));
                }
            }
        }
        if mix.deduct == 0 {
            return Err(
                "the mix needs deducts (refunds and retries name acknowledged ones)".into(),
            );
        }
        if mix.total() > 1_000_000 {
            return Err("weights add up to more than 1,000,000".into());
        }
        Ok(mix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_rejects() {
        let mix: Mix = "deduct=90,check=5,refund=5".parse().unwrap();
        assert_eq!((mix.deduct, mix.check, mix.refund), (90, 5, 5));
        assert_eq!("deduct=1".parse::<Mix>().unwrap().total(), 1);
        assert!("check=5".parse::<Mix>().is_err());
        assert!("deduct=x".parse::<Mix>().is_err());
        assert!("deduct=1,burn=2".parse::<Mix>().is_err());
    }

    #[test]
    fn command_line_of_the_spec_parses() {
        let args = Args::try_parse_from([
            "loadtest",
            "--database-url",
            "postgres://postgres@127.0.0.1:5432/loadtest_dev",
            "--engine-bin",
            "target/release/credits-engine",
            "--duration",
            "500ms",
            "--users",
            "10",
            "--concurrency",
            "4",
            "--baseline",
        ])
        .unwrap();
        let config = args.into_config().unwrap();
        assert_eq!(config.workload.duration, Duration::from_millis(500));
        assert!(config.baseline_database.is_some());
        assert!(matches!(config.engine, EngineSource::Spawn { .. }));
    }

    #[test]
    fn target_and_engine_bin_exclude_each_other() {
        let both = Args::try_parse_from([
            "loadtest",
            "--database-url",
            "postgres://x/y",
            "--engine-bin",
            "e",
            "--target",
            "http://127.0.0.1:1",
        ]);
        assert!(both.is_err());
        assert_eq!(
            parse_target("http://127.0.0.1:8080/").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
    }
}
