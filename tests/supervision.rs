//! Supervision and the wallet limit: a wallet that panics is restarted from the database while
//! every other user is served on; a full map evicts the least recently used wallet.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use credits_engine::clock::ManualClock;
use credits_engine::domain::UserId;
use futures_util::future::join_all;
use serde_json::{Value, json};
use sqlx::PgPool;

const CREDITS_EACH: i64 = 100_000;
const CRASHING_USER: i64 = 1;
const OTHER_USERS: std::ops::RangeInclusive<i64> = 2..=10;

fn keyed(user_id: i64, key: &str) -> Value {
    json!({"user_id": user_id, "action_key": "ai_chat", "idempotency_key": key})
}

async fn wait_for_metric(engine: &TestEngine, name: &str, at_least: f64) {
    for _ in 0..200 {
        if metric(engine, name).await >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{name} stayed at {} (expected at least {at_least})",
        metric(engine, name).await
    );
}

backend_tests! {
async fn a_panicking_wallet_is_restarted_and_no_other_user_notices(db: TestDb) {
    let credits = create_package(&db, "credits", Some(CREDITS_EACH), None).await;
    let engine = engine_on(&db).await;
    for user in CRASHING_USER..=*OTHER_USERS.end() {
        engine.grant(user, credits, json!({})).await;
    }
    let (status, first) = engine.deduct(keyed(CRASHING_USER, "warm")).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let cost = first["credits_cost"].as_i64().unwrap();

    // Two waves for the crashing user with the panic queued between them, beside bursts for
    // the others. The first wave's deductions are at the writer when the wallet dies; the
    // second wave is in its mailbox behind the panic.
    let crashing: Vec<Value> = (0..60)
        .map(|n| keyed(CRASHING_USER, &format!("c{n}")))
        .collect();
    let others: Vec<Value> = OTHER_USERS
        .flat_map(|user| (0..20).map(move |n| keyed(user, &format!("o{user}-{n}"))))
        .collect();
    let spawns_before = metric(&engine, "credits_wallet_spawns_total").await;
    let first_wave = join_all(
        crashing[..30]
            .iter()
            .map(|body| engine.deduct(body.clone())),
    );
    let second_wave = join_all(
        crashing[30..]
            .iter()
            .map(|body| engine.deduct(body.clone())),
    );
    let crash_then_second_wave = async {
        assert!(engine.app.inject_wallet_panic(UserId(CRASHING_USER)));
        second_wave.await
    };
    let (first_answers, second_answers, other_answers) = tokio::join!(
        first_wave,
        crash_then_second_wave,
        join_all(others.iter().map(|body| engine.deduct(body.clone()))),
    );
    let crashing_answers: Vec<_> = first_answers.into_iter().chain(second_answers).collect();

    for (status, answer) in &other_answers {
        assert_eq!(
            *status,
            StatusCode::OK,
            "another user was disturbed: {answer}"
        );
    }
    let mut unavailable = 0;
    for (status, answer) in &crashing_answers {
        match *status {
            StatusCode::OK => {}
            StatusCode::SERVICE_UNAVAILABLE => {
                unavailable += 1;
                assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
                assert_eq!(answer["error"]["retryable"], true, "{answer}");
            }
            other => panic!("the crashing user got {other}: {answer}"),
        }
    }
    assert!(unavailable > 0, "the panic landed amid the requests");
    // The supervisor saw the failure and loaded a successor.
    wait_for_metric(&engine, "credits_wallet_restarts_total", 1.0).await;
    wait_for_metric(&engine, "credits_wallet_spawns_total", spawns_before + 1.0).await;

    // Every key, retried where it got a 503, is charged exactly once.
    for body in &crashing {
        let (status, answer) = deduct_until_answered(&engine, body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    let charged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM consumption_records WHERE user_id = $1 AND idempotency_key LIKE 'c%'",
    )
    .bind(CRASHING_USER)
    .fetch_one(&db.sql)
    .await
    .unwrap();
    assert_eq!(
        charged, 60,
        "{unavailable} answers were 503 before their retry"
    );
    assert_eq!(
        remaining_of(&db, CRASHING_USER).await,
        CREDITS_EACH - 61 * cost
    );
    for user in OTHER_USERS {
        assert_eq!(remaining_of(&db, user).await, CREDITS_EACH - 20 * cost);
    }
    assert_ledger_balanced(&db).await;
    // The successor's memory is exactly the database: it loaded after every effect of its
    // predecessor had settled.
    let report = engine.assert_reconciliation_clean().await;
    assert!(
        report["checked_wallets"].as_i64().unwrap() >= 10,
        "{report}"
    );

    // With nothing going on, the supervisor alone brings a crashed wallet back.
    let spawns = metric(&engine, "credits_wallet_spawns_total").await;
    assert!(engine.app.inject_wallet_panic(UserId(CRASHING_USER)));
    wait_for_metric(&engine, "credits_wallet_restarts_total", 2.0).await;
    wait_for_metric(&engine, "credits_wallet_spawns_total", spawns + 1.0).await;
    let (status, answer) = engine.deduct(keyed(CRASHING_USER, "after")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["remaining_credits"].as_i64().unwrap(),
        CREDITS_EACH - 62 * cost
    );
    engine.stop().await;
}
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn a_full_map_evicts_the_least_recently_used_wallet(pool: PgPool) {
    let credits = create_package(&pool, "credits", Some(1_000), None).await;
    let mut settings = settings("postgres://unused");
    settings.wallets_max = 3;
    // No idle passivation: only the limit makes wallets leave.
    settings.wallet_idle_ms = 0;
    let engine = engine_with(
        pool.clone(),
        settings,
        Arc::new(ManualClock::new(start_time())),
    )
    .await;
    let loaded = |user: i64| engine.app.wallet_loaded(UserId(user));

    for user in 1..=3 {
        engine.grant(user, credits, json!({})).await;
    }
    // User 1 is used again, so user 2 is now the least recently used.
    let (status, answer) = engine.deduct(keyed(1, "a")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let cost = answer["credits_cost"].as_i64().unwrap();

    engine.grant(4, credits, json!({})).await;
    assert_eq!(engine.app.wallets_in_memory(), 3);
    assert!(!loaded(2), "user 2 was the least recently used");
    assert!(loaded(1) && loaded(3) && loaded(4));

    // User 2 comes back from the database intact, and user 3 makes room for it.
    let (status, answer) = engine.deduct(keyed(2, "b")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["remaining_credits"].as_i64().unwrap(), 1_000 - cost);
    assert_eq!(engine.app.wallets_in_memory(), 3);
    assert!(!loaded(3) && loaded(1) && loaded(2) && loaded(4));

    // Eviction lost nothing: a retried key is still a replay.
    let (status, answer) = engine.deduct(keyed(1, "a")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["replayed"], true);
    for (user, spent) in [(1, cost), (2, cost), (3, 0), (4, 0)] {
        assert_eq!(remaining_of(&pool, user).await, 1_000 - spent);
    }
    assert!(metric(&engine, "credits_wallet_passivations_total").await >= 2.0);
    assert_ledger_balanced(&pool).await;
    engine.stop().await;
}
