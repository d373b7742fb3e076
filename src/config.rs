//! Command line and environment: every flag also reads an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "credits-engine",
    version,
    about = "A credits engine for AI features"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the engine.
    Serve(Box<Settings>),
    /// Mint a JWT for the user or admin API.
    Token(TokenArgs),
}

/// A secret that never shows in logs or `Debug` output.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Secret(value.to_owned()))
    }
}

#[derive(Clone, Debug, Args)]
pub struct Settings {
    /// Where the data is kept: `postgres://...` (the database is created if it does not
    /// exist) or `sqlite://path/to/file.db`. Unset: an SQLite file, `credits.db` in
    /// `--data-dir`.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,
    /// The directory of the embedded SQLite database when no `DATABASE_URL` is given; created
    /// if missing.
    #[arg(long, env = "CREDITS_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// HTTP listen address.
    #[arg(long, env = "CREDITS_LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen_addr: SocketAddr,

    /// Serve `/metrics` (Prometheus text format) on this address instead of the API's, so it
    /// can stay on a private interface. Unset: `/metrics` is served on the API's address.
    #[arg(long, env = "CREDITS_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Comma-separated bearer tokens for the internal API; none means it refuses all.
    #[arg(
        long,
        env = "CREDITS_SERVICE_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub service_tokens: Vec<Secret>,

    /// HS256 secret for user and admin JWTs; none means those APIs refuse all.
    #[arg(long, env = "CREDITS_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// Connections in the database pool (reads, wallet loads, catalog writes). Each writer
    /// lane has one connection of its own besides.
    #[arg(long, env = "CREDITS_DB_POOL_MAX", default_value_t = 16)]
    pub db_pool_max: u32,

    /// Writer lanes (each commits on its own connection; a user always maps to one lane).
    /// SQLite takes one writer at a time, so it always runs one lane.
    #[arg(long, env = "CREDITS_WRITER_LANES", default_value_t = 1)]
    pub writer_lanes: usize,

    /// Effects queued per writer lane before wallets wait.
    #[arg(long, env = "CREDITS_WRITER_QUEUE_MAX", default_value_t = 16_384)]
    pub writer_queue_max: usize,

    /// Effects committed in one transaction.
    #[arg(long, env = "CREDITS_WRITER_BATCH_MAX", default_value_t = 1_024)]
    pub writer_batch_max: usize,

    /// How long a request waits for room in a full writer queue before `503 overloaded`.
    #[arg(long, env = "CREDITS_ENQUEUE_WAIT_MS", default_value_t = 200)]
    pub enqueue_wait_ms: u64,

    /// Requests queued in one wallet's mailbox before `503 overloaded`.
    #[arg(long, env = "CREDITS_MAILBOX_MAX", default_value_t = 1_024)]
    pub mailbox_max: usize,

    /// Wallets held in memory at once.
    /// Measured at about 10 KB per loaded wallet (release build, 73,763 wallets: 13 MB -> 733 MB
    /// RSS), so a full map at the default is about 2 GB; when it is full the least recently used
    /// idle wallets are evicted.
    #[arg(long, env = "CREDITS_WALLETS_MAX", default_value_t = 200_000)]
    pub wallets_max: usize,

    /// Committed idempotency keys each wallet answers from memory.
    #[arg(long, env = "CREDITS_IDEMPOTENCY_CACHE_MAX", default_value_t = 1_024)]
    pub idempotency_cache_max: usize,

    /// Seconds between reconciliation runs (ledger and live wallets against the database);
    /// 0 disables the job (`GET /api/admin/billing/reconciliation` still runs one on demand).
    #[arg(long, env = "CREDITS_RECONCILE_INTERVAL_SECS", default_value_t = 300)]
    pub reconcile_interval_secs: u64,

    /// Milliseconds a wallet may sit idle (no request, nothing in flight) before it leaves
    /// memory; 0 keeps wallets until shutdown.
    #[arg(long, env = "CREDITS_WALLET_IDLE_MS", default_value_t = 300_000)]
    pub wallet_idle_ms: u64,

    /// Milliseconds between expiry ticks (grants past `expires_at` are marked expired and their
    /// remaining credits recorded as void); 0 disables the job. Spending stops at `expires_at`
    /// whatever the tick.
    #[arg(long, env = "CREDITS_EXPIRY_TICK_MS", default_value_t = 1_000)]
    pub expiry_tick_ms: u64,

    /// Longest a graceful shutdown waits for in-flight requests before it stops anyway.
    #[arg(long, env = "CREDITS_SHUTDOWN_TIMEOUT_MS", default_value_t = 30_000)]
    pub shutdown_timeout_ms: u64,
}

impl Settings {
    /// Settings for a database URL with every other value at its default.
    pub fn for_database(database_url: &str) -> Settings {
        let cli = Cli::parse_from(["credits-engine", "serve", "--database-url", database_url]);
        match cli.command {
            Command::Serve(settings) => *settings,
            Command::Token(_) => unreachable!("parsed a serve command"),
        }
    }

    /// The URL of the database the engine keeps its data in: `DATABASE_URL`, else the SQLite
    /// file `credits.db` in the data directory.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.expose().to_owned(),
            None => {
                // The URL's path is percent-decoded: a directory may hold `%`, `?` or `#`.
                let path = self.data_dir.join(DATA_FILE).display().to_string();
                let path = path
                    .replace('%', "%25")
                    .replace('?', "%3F")
                    .replace('#', "%23");
                format!("sqlite://{path}")
            }
        }
    }

    pub fn enqueue_wait(&self) -> Duration {
        Duration::from_millis(self.enqueue_wait_ms)
    }

    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_secs(self.reconcile_interval_secs)
    }

    pub fn wallet_idle(&self) -> Option<Duration> {
        (self.wallet_idle_ms > 0).then(|| Duration::from_millis(self.wallet_idle_ms))
    }

    pub fn expiry_tick(&self) -> Duration {
        Duration::from_millis(self.expiry_tick_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

/// The embedded database's file name in the data directory.
pub const DATA_FILE: &str = "credits.db";

#[derive(Clone, Debug, Args)]
pub struct TokenArgs {
    /// The user id the token speaks for (the JWT `sub`).
    #[arg(long)]
    pub sub: i64,

    /// `admin` for the admin API.
    #[arg(long)]
    pub role: Option<String>,

    /// Lifetime in seconds.
    #[arg(long = "ttl", value_name = "SECONDS", default_value_t = 3_600)]
    pub ttl_seconds: i64,

    #[arg(long, env = "CREDITS_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Secret,
}
