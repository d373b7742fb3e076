//! Wallets that start at the same time load their grants together.
//!
//! A wallet's first request loads its grants before anything else can happen for that user.
//! After a restart, or under load spread over many users, hundreds of wallets start within
//! a few milliseconds; one query each cost a pool round trip, the server's parse, plan and
//! execution, and a task wake-up per wallet (measured: a uniform run over 10,000 users did
//! 5,042 deducts/s with its wallets loaded beforehand, 4,323/s loading them as it went).
//! The loader takes every load request queued (up to [`LOAD_BATCH_MAX`]) and answers them
//! with one query. A lone request is not held back: it goes at once, in a batch of one.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::domain::{self, Grant, UserId};
use crate::metrics;
use crate::store::writer::fill_batch;
use crate::store::{Db, UserPackageRow};

/// Load requests waiting for a batch; a wallet that finds the queue full waits for room.
pub const LOAD_QUEUE_MAX: usize = 4_096;
/// Users per query.
pub const LOAD_BATCH_MAX: usize = 256;
/// Queries at once (each holds one pool connection); while all are out, requests gather
/// into the next batch.
pub const LOADS_IN_FLIGHT_MAX: usize = 4;

/// A failed query fails every wallet of its batch, so its error is shared.
type Answer = Result<Vec<Grant>, Arc<sqlx::Error>>;

/// One starting wallet's request.
struct LoadRequest {
    user_id: UserId,
    /// The wallet's grants, or why they could not be read.
    reply: oneshot::Sender<Answer>,
}

/// The handle wallets load through. The loader stops when every handle is gone.
#[derive(Clone)]
pub struct GrantLoader {
    /// The loader's queue, at most [`LOAD_QUEUE_MAX`] requests.
    requests: mpsc::Sender<LoadRequest>,
}

impl GrantLoader {
    /// Starts the loader on the current tokio runtime.
    pub fn spawn(db: Db) -> GrantLoader {
        let (requests, queue) = mpsc::channel(LOAD_QUEUE_MAX);
        tokio::spawn(run(db, queue));
        GrantLoader { requests }
    }

    /// The grants `user_id`'s wallet holds (every grant that can still pay or be paid back
    /// into, or be activated), in burn order. Every read of a wallet's grants comes here: its
    /// start, its reload after a failed batch, and reconciliation's snapshot.
    pub async fn load(&self, user_id: UserId) -> Result<Vec<Grant>, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(LoadRequest { user_id, reply })
            .await
            .map_err(|_| stopped())?;
        match answer.await {
            Ok(Ok(grants)) => Ok(grants),
            Ok(Err(error)) => Err(sqlx::Error::Protocol(format!(
                "loading the grants of a wallet: {error}"
            ))),
            Err(_) => Err(stopped()),
        }
    }
}

fn stopped() -> sqlx::Error {
    sqlx::Error::Protocol("the grant loader has stopped".to_owned())
}

async fn run(db: Db, mut queue: mpsc::Receiver<LoadRequest>) {
    let in_flight = Arc::new(Semaphore::new(LOADS_IN_FLIGHT_MAX));
    while let Some(first) = queue.recv().await {
        // Taken before the batch is: while every query is out, requests gather.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let batch = fill_batch(first, &mut queue, LOAD_BATCH_MAX);
        let db = db.clone();
        tokio::spawn(async move {
            answer(&db, batch).await;
            drop(permit);
        });
    }
}

async fn answer(db: &Db, batch: Vec<LoadRequest>) {
    let mut user_ids: Vec<UserId> = batch.iter().map(|request| request.user_id).collect();
    user_ids.sort_unstable();
    user_ids.dedup();
    metrics::wallet_load_batch(user_ids.len());
    match db.load_grants_of_wallets(&user_ids).await {
        Ok(rows) => {
            let mut by_user: HashMap<UserId, Vec<UserPackageRow>> =
                HashMap::with_capacity(user_ids.len());
            for row in rows {
                by_user.entry(UserId(row.user_id)).or_default().push(row);
            }
            for request in batch {
                // A malformed row fails its own user's wallet only.
                let grants = by_user
                    .get(&request.user_id)
                    .map_or(Ok(Vec::new()), |rows| {
                        rows.iter().map(UserPackageRow::to_wallet_grant).collect()
                    })
                    .map(|mut grants| {
                        domain::sort_burn_order(&mut grants);
                        grants
                    });
                // A wallet that gave up waiting is gone; nothing to tell it.
                let _ = request.reply.send(grants.map_err(Arc::new));
            }
        }
        Err(error) => {
            tracing::warn!(%error, users = user_ids.len(), "loading the grants of a batch of wallets failed");
            let error = Arc::new(error);
            for request in batch {
                let _ = request.reply.send(Err(error.clone()));
            }
        }
    }
}
