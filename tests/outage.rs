//! Database trouble: connections killed mid-load, and the database unreachable for a while.
//! The engine answers `503` with Retry-After meanwhile, acknowledges nothing it did not
//! commit, reports itself not ready, and recovers by itself, exact.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::proxy::Proxy;
use common::*;
use credits_engine::clock::ManualClock;
use credits_engine::store;
use futures_util::future::join_all;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};

const USERS: i64 = 20;
const CREDITS_EACH: i64 = 100_000;

/// Ends every other session on the test's database, as a failover or an operator would.
async fn kill_engine_connections(pool: &PgPool) {
    let database = pool
        .connect_options()
        .get_database()
        .expect("the test pool names its database")
        .to_owned();
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set");
    let (server, _) = base.rsplit_once('/').expect("DATABASE_URL has a path");
    let mut killer = PgConnection::connect(&format!("{server}/{database}"))
        .await
        .unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(&mut killer)
    .await
    .unwrap();
    killer.close().await.unwrap();
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn killed_connections_mid_load_lose_nothing_and_double_nothing(pool: PgPool) {
    let credits = create_package(&pool, "credits", Some(CREDITS_EACH), None).await;
    let engine = engine(pool.clone()).await;
    for user in 1..=USERS {
        engine.grant(user, credits, json!({})).await;
    }

    let mut unavailable = 0;
    let mut keys = Vec::new();
    for round in 0..30_i64 {
        let bodies: Vec<_> = (0..40)
            .map(|n| {
                json!({
                    "user_id": (round * 7 + n) % USERS + 1,
                    "action_key": "ai_chat",
                    "idempotency_key": format!("r{round}-n{n}"),
                })
            })
            .collect();
        let burst = join_all(bodies.iter().map(|body| engine.deduct(body.clone())));
        let answers = if round % 10 == 5 {
            let (answers, ()) = tokio::join!(burst, kill_engine_connections(&pool));
            answers
        } else {
            burst.await
        };
        for (body, (status, answer)) in bodies.iter().zip(answers) {
            match status {
                StatusCode::OK => {}
                StatusCode::SERVICE_UNAVAILABLE => {
                    assert_eq!(answer["error"]["retryable"], true, "{answer}");
                    unavailable += 1;
                    // The caller retries with the same key until it has an answer.
                    let (status, answer) = deduct_until_answered(&engine, body).await;
                    assert_eq!(status, StatusCode::OK, "{answer}");
                }
                other => panic!("unexpected {other}: {answer}"),
            }
            keys.push(body["idempotency_key"].as_str().unwrap().to_owned());
        }
    }
    eprintln!("{unavailable} deducts answered 503 and were retried");

    // Each key charged exactly once, balances equal the ledger, memory equals the database.
    assert_eq!(
        count(&pool, "SELECT count(*) FROM consumption_records").await,
        keys.len() as i64
    );
    let remaining: i64 =
        sqlx::query_scalar("SELECT SUM(remaining_credits)::bigint FROM user_packages")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(remaining, USERS * CREDITS_EACH - keys.len() as i64);
    assert_ledger_balanced(&pool).await;
    engine.assert_reconciliation_clean().await;
    let (status, _) = engine.get("/readyz", None).await;
    assert_eq!(status, StatusCode::OK);
}

/// Where the test's database server listens.
async fn database_server(pool: &PgPool) -> SocketAddr {
    let options = pool.connect_options();
    tokio::net::lookup_host((options.get_host(), options.get_port()))
        .await
        .unwrap()
        .next()
        .expect("the database host resolves")
}

fn assert_unavailable(status: StatusCode, answer: &Answer) {
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{}", answer.text());
    assert_eq!(
        answer.json()["error"]["code"],
        "unavailable",
        "{}",
        answer.text()
    );
    assert!(
        answer.headers.contains_key("retry-after"),
        "a 503 says when to retry"
    );
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn an_unreachable_database_turns_readiness_off_until_it_returns(pool: PgPool) {
    let credits = create_package(&pool, "credits", Some(1_000), None).await;
    let proxy = Proxy::start(database_server(&pool).await).await;
    let through_proxy = (*pool.connect_options())
        .clone()
        .host("127.0.0.1")
        .port(proxy.addr.port());
    let engine_pool = store::postgres::pool_options(8)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy_with(through_proxy);
    let clock = Arc::new(ManualClock::new(start_time()));
    let engine = engine_with(engine_pool, settings("postgres://unused"), clock).await;
    engine.grant(1, credits, json!({})).await;
    let keyed = |key: &str| json!({"user_id": 1, "action_key": "ai_chat", "idempotency_key": key});
    let (status, answer) = engine.deduct(keyed("before")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let cost = answer["credits_cost"].as_i64().unwrap();
    let ready = call(&engine.router, "GET", "/readyz", None, None).await;
    assert_eq!(ready.status, StatusCode::OK);

    proxy.cut();
    let ready = call(&engine.router, "GET", "/readyz", None, None).await;
    assert_unavailable(ready.status, &ready);
    let during: Vec<Value> = (0..5).map(|n| keyed(&format!("during-{n}"))).collect();
    let answers = join_all(during.iter().map(|body| {
        call(
            &engine.router,
            "POST",
            "/api/internal/billing/credits/deduct",
            Some(SERVICE_TOKEN),
            Some(body.clone()),
        )
    }))
    .await;
    for answer in &answers {
        assert_unavailable(answer.status, answer);
    }
    let check = call(
        &engine.router,
        "POST",
        "/api/internal/billing/credits/check",
        Some(SERVICE_TOKEN),
        Some(json!({"user_id": 1, "action_key": "ai_chat"})),
    )
    .await;
    assert_unavailable(check.status, &check);
    assert_eq!(metric(&engine, "credits_ready").await, 0.0);
    // Nothing that was refused was written.
    assert_eq!(
        count(&pool, "SELECT count(*) FROM consumption_records").await,
        1
    );
    assert_eq!(remaining_of(&pool, 1).await, 1_000 - cost);

    proxy.restore();
    let mut recovered = false;
    for _ in 0..100 {
        if call(&engine.router, "GET", "/readyz", None, None)
            .await
            .status
            == StatusCode::OK
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "the engine reports ready again without a restart"
    );
    assert_eq!(metric(&engine, "credits_ready").await, 1.0);
    for body in &during {
        let (status, answer) = deduct_until_answered(&engine, body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["replayed"], false, "{answer}");
    }
    assert_eq!(
        count(&pool, "SELECT count(*) FROM consumption_records").await,
        6
    );
    assert_eq!(remaining_of(&pool, 1).await, 1_000 - 6 * cost);
    assert_ledger_balanced(&pool).await;
    engine.assert_reconciliation_clean().await;
    engine.stop().await;
}
