//! Idle wallets leave memory, and requests racing a passivation are neither lost nor doubled.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use credits_engine::clock::ManualClock;
use futures_util::future::join_all;
use serde_json::json;

const USERS: i64 = 20;
const CREDITS_EACH: i64 = 100_000;

backend_tests! {
async fn deducts_racing_passivation_are_neither_lost_nor_doubled(db: TestDb) {
    let credits = create_package(&db, "credits", Some(CREDITS_EACH), None).await;
    let mut settings = settings("postgres://unused");
    // Wallets idle for 20 ms passivate: far shorter than the pauses between bursts below, and
    // the same order as the bursts themselves, so stops land between and amid requests.
    settings.wallet_idle_ms = 20;
    let clock = Arc::new(ManualClock::new(start_time()));
    let engine = engine_on_with(&db, settings, clock).await;
    for user in 1..=USERS {
        engine.grant(user, credits, json!({})).await;
    }

    let mut acknowledged = 0_i64;
    let mut emptied = false;
    for round in 0..40_u64 {
        let burst = (0..50).map(|n| {
            engine.deduct(json!({
                "user_id": (round as i64 * 7 + n) % USERS + 1,
                "action_key": "ai_chat",
                "idempotency_key": format!("r{round}-n{n}"),
            }))
        });
        for (status, body) in join_all(burst).await {
            assert_eq!(status, StatusCode::OK, "{body}");
            acknowledged += 1;
        }
        tokio::time::sleep(Duration::from_millis(round % 4 * 15)).await;
        if round % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(120)).await;
            emptied |= engine.app.wallets_in_memory() == 0;
        }
    }
    assert!(emptied, "idle wallets never left memory");

    // Every acknowledged deduct is in the database once; balances equal the ledger.
    assert_eq!(
        count(&db, "SELECT count(*) FROM consumption_records").await,
        acknowledged
    );
    let remaining = count(
        &db,
        "SELECT CAST(SUM(remaining_credits) AS BIGINT) FROM user_packages",
    )
    .await;
    assert_eq!(remaining, USERS * CREDITS_EACH - acknowledged);
    assert_ledger_balanced(&db).await;

    // A passivated user's retry is still a replay, answered by a fresh wallet.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let (status, replay) = engine
        .deduct(json!({"user_id": 1, "action_key": "ai_chat", "idempotency_key": "r0-n0"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(replay["replayed"], true);
    engine.assert_reconciliation_clean().await;
}
}
