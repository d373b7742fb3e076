//! Starting and stopping an engine binary for a run: `PATH serve` on a free port of
//! 127.0.0.1, ready once `GET /readyz` answers `200`, stopped with SIGTERM (it drains: every
//! request it admitted is answered and committed) and waited for.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::Error;
use crate::http;

/// Longest the engine may take to answer `/readyz` (it creates and migrates the database first).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest a SIGTERM-ed engine may take to drain and exit before it is killed. Its own drain
/// timeout (`CREDITS_SHUTDOWN_TIMEOUT_MS`) is 30 s by default.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Pause between readiness polls.
const READY_POLL: Duration = Duration::from_millis(50);

/// An engine process this run started. Dropping it kills the process (a run that fails midway
/// leaves nothing behind); [`EngineProcess::stop`] stops it gracefully.
pub struct EngineProcess {
    child: Child,
    pub addr: SocketAddr,
    /// The service token the engine was started with.
    pub service_token: String,
}

impl EngineProcess {
    /// Starts `bin serve` on `database_url` and waits until it is ready.
    pub async fn start(bin: &Path, database_url: &str) -> Result<EngineProcess, Error> {
        let addr = free_port()?;
        let service_token = format!("loadtest-{:016x}", fastrand::u64(..));
        let mut command = Command::new(bin);
        command
            .arg("serve")
            .env("DATABASE_URL", database_url)
            .env("CREDITS_LISTEN_ADDR", addr.to_string())
            .env("CREDITS_SERVICE_TOKENS", &service_token)
            .env(
                "CREDITS_JWT_SECRET",
                format!("loadtest-{:016x}", fastrand::u64(..)),
            )
            .stdin(Stdio::null())
            // stdout is the summary's; the engine logs to stderr, which it shares.
            .stdout(Stdio::null())
            .kill_on_drop(true);
        // The engine's info log says nothing a load run needs; its warnings and errors do.
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
        let child = command
            .spawn()
            .map_err(|error| Error::Engine(format!("cannot start {}: {error}", bin.display())))?;
        let mut engine = EngineProcess {
            child,
            addr,
            service_token,
        };
        engine.wait_ready().await?;
        Ok(engine)
    }

    async fn wait_ready(&mut self) -> Result<(), Error> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(Error::Engine(format!(
                    "exited before it was ready: {status}"
                )));
            }
            if http::ready(self.addr).await {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(Error::Engine(format!(
                    "not ready on {} after {START_TIMEOUT:?}",
                    self.addr
                )));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// SIGTERM, then waits for the engine to drain and exit (killing it after [`STOP_TIMEOUT`]).
    pub async fn stop(mut self) -> Result<ExitStatus, Error> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| Error::Engine("exited before it was stopped".into()))?;
        let pid = i32::try_from(pid)
            .map_err(|_| Error::Engine(format!("process id {pid} out of range")))?;
        kill(Pid::from_raw(pid), Signal::SIGTERM)
            .map_err(|error| Error::Engine(format!("SIGTERM: {error}")))?;
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                self.child.kill().await?;
                Err(Error::Engine(format!(
                    "did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed"
                )))
            }
        }
    }
}

/// A port of 127.0.0.1 that nothing listens on now (the OS picks it; the engine binds it a
/// moment later).
fn free_port() -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}
