//! Wires store -> catalog -> writer -> registry -> supervisor -> http, and owns the shutdown
//! order: stop accepting, let in-flight requests finish (each waits for its commit), stop the
//! supervisor's jobs, stop the wallets, then let the writer commit whatever is still queued.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::catalog::Catalog;
use crate::clock::{Clock, SystemClock};
use crate::config::Settings;
use crate::http::{self, AppState, auth::Auth};
use crate::metrics;
use crate::registry::{Registry, RegistryLimits};
use crate::store::{self, Db, writer};
use crate::supervisor::{self, Reconciler};
use crate::wallet::{GrantLoader, WalletDeps, WalletLimits};

/// How often the supervisor samples readiness, the pool and the wallet count into the metrics.
const HEALTH_PROBE_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("cannot start a writer lane: {0}")]
    Writer(std::io::Error),
    #[error("cannot start the wallet supervisor: {0}")]
    Supervisor(#[from] ractor::SpawnErr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct App {
    listener: TcpListener,
    /// `/metrics` on its own address, when configured.
    metrics_listener: Option<TcpListener>,
    state: AppState,
    /// Stops the writer lanes once nothing can hand them more work.
    writer_stop: CancellationToken,
    /// Stops the supervisor's jobs first: they ask wallets, which stop next.
    supervisor_stop: CancellationToken,
    /// The writer lanes and supervisor jobs: shutdown waits for them to finish.
    tracker: TaskTracker,
    settings: Settings,
    /// The SQLite file's lock for this process (see `FileOwner`), held until the engine has
    /// stopped.
    owner: Option<store::sqlite::FileOwner>,
}

impl App {
    /// Connects to the database (creating it and applying migrations) and builds the engine.
    pub async fn build(settings: Settings) -> Result<App, StartupError> {
        let url = settings.database_url();
        let owner = match store::Backend::of_url(&url) {
            Some(store::Backend::Sqlite) => {
                // Only a file path: nothing secret in it.
                tracing::info!(database = %url, "using the embedded SQLite store");
                Some(store::sqlite::FileOwner::take(&url)?)
            }
            Some(store::Backend::Postgres) => {
                tracing::info!("using the PostgreSQL store");
                None
            }
            // `connect` says what is wrong with the URL.
            None => None,
        };
        let db = store::connect(&url, settings.db_pool_max).await?;
        let mut app = App::build_with(db, settings, Arc::new(SystemClock)).await?;
        app.owner = owner;
        Ok(app)
    }

    /// Builds the engine on a connected, migrated store and a clock (tests inject a manual
    /// clock).
    pub async fn build_with(
        db: Db,
        settings: Settings,
        clock: Arc<dyn Clock>,
    ) -> Result<App, StartupError> {
        let prometheus = metrics::install();
        let catalog = Arc::new(Catalog::load(&*db).await?);
        let tracker = TaskTracker::new();
        let writer_stop = CancellationToken::new();
        let writer = db
            .spawn_writer(
                writer::WriterLimits {
                    lanes: settings.writer_lanes,
                    queue_max: settings.writer_queue_max,
                    batch_max: settings.writer_batch_max,
                },
                writer_stop.clone(),
                &tracker,
            )
            .map_err(StartupError::Writer)?;
        metrics::limits(
            settings.wallets_max,
            settings.writer_queue_max * writer.lanes(),
        );
        let deps = Arc::new(WalletDeps {
            db: db.clone(),
            loader: GrantLoader::spawn(db.clone()),
            writer: writer.clone(),
            clock: clock.clone(),
            limits: WalletLimits {
                enqueue_wait: settings.enqueue_wait(),
                idempotency_cache_max: settings.idempotency_cache_max,
                idle: settings.wallet_idle(),
            },
        });
        let registry = Registry::start(
            deps,
            RegistryLimits {
                wallets_max: settings.wallets_max,
                mailbox_max: settings.mailbox_max,
            },
        )
        .await?;
        let reconciler = Arc::new(Reconciler::new(db.clone(), registry.clone(), clock.clone()));
        let supervisor_stop = CancellationToken::new();
        supervisor::spawn_reconciliation(
            reconciler.clone(),
            settings.reconcile_interval(),
            supervisor_stop.clone(),
            &tracker,
        );
        let expirer = Arc::new(supervisor::Expirer::new(
            db.clone(),
            registry.clone(),
            clock.clone(),
        ));
        supervisor::spawn_expiry(
            expirer.clone(),
            settings.expiry_tick(),
            supervisor_stop.clone(),
            &tracker,
        );
        supervisor::spawn_health_probe(
            db.clone(),
            registry.clone(),
            writer,
            prometheus.clone(),
            HEALTH_PROBE_EVERY,
            supervisor_stop.clone(),
            &tracker,
        );
        let state = AppState {
            prometheus,
            expirer,
            registry,
            reconciler,
            catalog,
            db,
            auth: Arc::new(Auth::new(
                &settings.service_tokens,
                settings.jwt_secret.as_ref(),
            )),
            clock,
        };
        let listener = bind(settings.listen_addr).await?;
        let metrics_listener = match settings.metrics_addr {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        Ok(App {
            listener,
            metrics_listener,
            state,
            writer_stop,
            supervisor_stop,
            tracker,
            settings,
            owner: None,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where `/metrics` is served when it has its own address.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
    }

    /// Wallets in memory now.
    pub fn wallets_in_memory(&self) -> usize {
        self.state.registry.live_len()
    }

    /// Whether this user's wallet is in memory now (passivated ones are not).
    pub fn wallet_loaded(&self, user_id: crate::domain::UserId) -> bool {
        self.state.registry.is_loaded(user_id)
    }

    /// Test support: makes the user's wallet panic, as a bug would. False if it is not loaded.
    #[cfg(feature = "fault-injection")]
    pub fn inject_wallet_panic(&self, user_id: crate::domain::UserId) -> bool {
        self.state.registry.inject_panic(user_id)
    }

    /// The expiry job's worker (tests run it by hand with the job's tick disabled).
    pub fn expirer(&self) -> Arc<supervisor::Expirer> {
        self.state.expirer.clone()
    }

    /// The router over this engine, for driving it without a socket.
    pub fn router(&self) -> Router {
        http::router(self.state.clone(), self.metrics_listener.is_none())
    }

    /// Serves until `shutdown` completes, then drains and stops.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let stopping = CancellationToken::new();
        let signal = stopping.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutdown requested: draining in-flight requests");
            signal.cancel();
        });
        let with_metrics = self.metrics_listener.is_none();
        // TCP_NODELAY: a response is written whole, so waiting to coalesce it with more (Nagle)
        // only adds latency against the client's delayed ACK.
        let listener = self.listener.tap_io(|stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "could not set TCP_NODELAY");
            }
        });
        let server = axum::serve(listener, http::router(self.state.clone(), with_metrics))
            .with_graceful_shutdown(stopping.clone().cancelled_owned());
        if let Some(listener) = self.metrics_listener {
            let metrics_router = http::metrics_router(self.state.clone());
            let stopped = stopping.clone();
            tokio::spawn(async move {
                let served = axum::serve(listener, metrics_router)
                    .with_graceful_shutdown(stopped.cancelled_owned())
                    .await;
                if let Err(error) = served {
                    tracing::error!(%error, "the metrics listener failed");
                }
            });
        }
        let deadline = async {
            stopping.cancelled().await;
            tokio::time::sleep(self.settings.shutdown_timeout()).await;
        };
        tokio::select! {
            served = server => served?,
            () = deadline => tracing::warn!("in-flight requests did not finish in time"),
        }
        Engine {
            state: self.state,
            writer_stop: self.writer_stop,
            supervisor_stop: self.supervisor_stop,
            tracker: self.tracker,
        }
        .stop()
        .await;
        Ok(())
    }

    /// Stops without serving: for tests that drove the router directly.
    pub async fn stop(self) {
        Engine {
            state: self.state,
            writer_stop: self.writer_stop,
            supervisor_stop: self.supervisor_stop,
            tracker: self.tracker,
        }
        .stop()
        .await;
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { addr, source })
}

/// The parts that outlive the HTTP server during shutdown.
struct Engine {
    state: AppState,
    writer_stop: CancellationToken,
    supervisor_stop: CancellationToken,
    tracker: TaskTracker,
}

impl Engine {
    async fn stop(self) {
        self.supervisor_stop.cancel();
        self.state.registry.stop_all();
        self.writer_stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        tracing::info!("engine stopped: every queued write committed or answered");
    }
}
