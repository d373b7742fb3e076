//! The wallet actor's round trip without the database: a request goes into the real `Wallet`
//! actor's mailbox, is planned and applied in memory, handed to a writer lane, and answered.
//! The lane here answers at once instead of committing, so the figures are the actor's own
//! cost (message passing, burn-down, hand-over, settlement), not PostgreSQL's.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use credits_engine::clock::SystemClock;
use credits_engine::domain::{Balance, Credits, Grant, GrantStatus, UserId, UserPackageId};
use credits_engine::error::EngineError;
use credits_engine::store::writer::{Effect, WriterHandle};
use credits_engine::wallet::{
    DeductAnswer, DeductOutcome, DeductRequest, GrantLoader, Reply, Settlement, Wallet, WalletArgs,
    WalletDeps, WalletLife, WalletLimits, WalletMsg,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ractor::{Actor, ActorRef};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;

/// Effects the fake lane takes per pass, like the real writer's batch.
const FAKE_BATCH_MAX: usize = 1_024;

fn grant(id: i64, credits: i64) -> Grant {
    Grant {
        id: UserPackageId(id),
        priority: 100,
        expires_at: None,
        status: GrantStatus::Active,
        balance: Balance::Limited {
            total: Credits::new(credits).unwrap(),
            used: Credits::ZERO,
            remaining: Credits::new(credits).unwrap(),
            expired: Credits::ZERO,
        },
    }
}

/// A wallet over three grants, with a writer lane that "commits" instantly.
async fn wallet() -> (ActorRef<WalletMsg>, Arc<WalletLife>) {
    let (writer, mut lanes) = WriterHandle::detached(1, 16_384);
    let mut lane = lanes.remove(0);
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(FAKE_BATCH_MAX);
        while lane.recv_many(&mut batch, FAKE_BATCH_MAX).await > 0 {
            for envelope in batch.drain(..) {
                if let Effect::Deduct(effect) = envelope.effect {
                    let answer = DeductAnswer {
                        consumption_id: credits_engine::domain::ConsumptionId(1),
                        credits_cost: effect.request.credits_cost,
                        remaining_credits: effect.remaining_after,
                        allocations: effect.allocations.clone(),
                        replayed: false,
                    };
                    let _ = effect.reply.send(Ok(answer.clone()));
                    let _ = envelope.origin.wallet.send_message(WalletMsg::Settled(vec![
                        Settlement::Deduct {
                            idempotency_key: None,
                            allocations: effect.allocations,
                            outcome: DeductOutcome::Committed(answer),
                        },
                    ]));
                }
            }
        }
    });
    // Never connected: the preloaded wallet does not read the database on these paths.
    let db = credits_engine::store::postgres::PgStore::db(
        sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://127.0.0.1:1/unused")
            .unwrap(),
    );
    let deps = Arc::new(WalletDeps {
        loader: GrantLoader::spawn(db.clone()),
        db,
        writer,
        clock: Arc::new(SystemClock),
        limits: WalletLimits {
            enqueue_wait: Duration::from_millis(200),
            idempotency_cache_max: 1_024,
            idle: None,
        },
    });
    let life = Arc::new(WalletLife::default());
    let args = WalletArgs {
        user_id: UserId(1),
        deps,
        life: life.clone(),
        preloaded: Some(vec![
            grant(1, i64::MAX / 4),
            grant(2, i64::MAX / 4),
            grant(3, i64::MAX / 4),
        ]),
    };
    let (actor, _) = Actor::spawn(None, Wallet, args).await.unwrap();
    (actor, life)
}

fn deduct_request() -> DeductRequest {
    DeductRequest {
        action_key: "ai_chat".into(),
        quantity: 1,
        unit_cost: Credits::new(1).unwrap(),
        credits_cost: Credits::new(1).unwrap(),
        price_version: 1,
        idempotency_key: None,
        fingerprint: String::new(),
        metadata: None,
    }
}

/// Sends a request into the wallet's mailbox as the registry does (counting it in the mailbox
/// depth the wallet counts down), and returns where its answer arrives.
fn send<T>(
    actor: &ActorRef<WalletMsg>,
    life: &WalletLife,
    make: impl FnOnce(Reply<T>) -> WalletMsg,
) -> oneshot::Receiver<Result<T, EngineError>> {
    let (reply, answer) = oneshot::channel();
    life.mailbox_depth.fetch_add(1, Ordering::AcqRel);
    actor.send_message(make(reply)).unwrap();
    answer
}

fn deduct(reply: Reply<DeductAnswer>) -> WalletMsg {
    WalletMsg::Deduct {
        request: deduct_request(),
        reply,
    }
}

fn round_trip(c: &mut Criterion) {
    let runtime = Runtime::new().unwrap();
    let (actor, life) = runtime.block_on(wallet());
    let mut group = c.benchmark_group("wallet_round_trip");
    group.throughput(Throughput::Elements(1));
    group.bench_function("check", |b| {
        b.to_async(&runtime).iter(|| async {
            let check = |reply| WalletMsg::Check {
                credits_cost: Credits::new(1).unwrap(),
                reply,
            };
            send(&actor, &life, check).await.unwrap().unwrap()
        });
    });
    group.bench_function("deduct_through_fake_writer", |b| {
        b.to_async(&runtime)
            .iter(|| async { send(&actor, &life, deduct).await.unwrap().unwrap() });
    });
    // 64 deducts in flight at once, as concurrent callers make them: the actor pipelines.
    group.throughput(Throughput::Elements(64));
    group.bench_function("deduct_64_in_flight", |b| {
        b.to_async(&runtime).iter(|| async {
            let answers: Vec<_> = (0..64).map(|_| send(&actor, &life, deduct)).collect();
            for answer in answers {
                answer.await.unwrap().unwrap();
            }
        });
    });
    group.finish();
    actor.stop(None);
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
