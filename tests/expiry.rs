//! Grant expiry: exact to the instant, recorded once, caught up after downtime.

#[macro_use]
mod common;

use axum::http::StatusCode;
use chrono::Duration;
use common::*;
use serde_json::{Value, json};

async fn expired_events(db: &TestDb) -> Vec<Value> {
    payloads(
        db,
        "SELECT CAST(payload AS TEXT) FROM billing_events
         WHERE kind = 'billing_package_expired' ORDER BY id",
    )
    .await
}

backend_tests! {
async fn a_grant_pays_until_its_expiry_instant_and_is_recorded_expired_once(db: TestDb) {
    let credits = create_package(&db, "credits", Some(100), None).await;
    let hybrid = create_package(&db, "hybrid", Some(10), Some(1)).await;
    let engine = engine_on(&db).await;
    let expires_at = start_time() + Duration::hours(1);
    let expiring = engine
        .grant(3, hybrid, json!({"priority": 1, "expires_at": expires_at}))
        .await;
    let lasting = engine.grant(3, credits, json!({})).await;

    // 1 ms before the instant the expiring grant pays; at and after it, it does not.
    engine.clock.set(expires_at - Duration::milliseconds(1));
    let (status, before) = engine
        .deduct(json!({"user_id": 3, "action_key": "advanced_analysis"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(before["allocations"][0]["user_package_id"], expiring);
    engine.clock.set(expires_at + Duration::milliseconds(1));
    let (status, after) = engine
        .deduct(json!({"user_id": 3, "action_key": "advanced_analysis"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        after["allocations"],
        json!([{"user_package_id": lasting, "credits": 3}])
    );

    // The job records it: status, the 7 credits left voided, one event, however often it runs.
    let expirer = engine.app.expirer();
    assert_eq!(expirer.run_once().await.unwrap(), 1);
    assert_eq!(expirer.run_once().await.unwrap(), 0);
    let (status_text, remaining, expired): (String, i64, i64) = sqlx::query_as(
        "SELECT status, remaining_credits, expired_credits FROM user_packages WHERE id = $1",
    )
    .bind(expiring)
    .fetch_one(&db.sql)
    .await
    .unwrap();
    assert_eq!(
        (status_text.as_str(), remaining, expired),
        ("expired", 0, 7)
    );
    let events = expired_events(&db).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["voided_credits"], 7);
    assert_eq!(events[0]["user_package_id"], expiring);
    assert_ledger_balanced(&db).await;

    // Memory agrees with the database afterwards.
    engine.assert_reconciliation_clean().await;

    // A pending grant never expires, even with a fixed expiry that has passed.
    let pending = engine
        .grant(
            4,
            hybrid,
            json!({"activate": false, "expires_at": expires_at + Duration::hours(1)}),
        )
        .await;
    engine.clock.advance(Duration::days(3));
    assert_eq!(expirer.run_once().await.unwrap(), 0);
    let pending_status: String =
        sqlx::query_scalar("SELECT status FROM user_packages WHERE id = $1")
            .bind(pending)
            .fetch_one(&db.sql)
            .await
            .unwrap();
    assert_eq!(pending_status, "pending");
}
}

backend_tests! {
async fn grants_that_expired_while_the_engine_was_down_are_caught_up_once(db: TestDb) {
    let hybrid = create_package(&db, "hybrid", Some(10), Some(1)).await;
    let first = engine_on(&db).await;
    for user in 1..=5 {
        first
            .grant(
                user,
                hybrid,
                json!({"expires_at": start_time() + Duration::hours(2)}),
            )
            .await;
    }
    first.stop().await;

    // Down for a day; two engines come up one after the other (a restart), each catching up.
    for _ in 0..2 {
        let engine = engine_on(&db).await;
        engine.clock.advance(Duration::days(1));
        engine.app.expirer().run_once().await.unwrap();
        engine.stop().await;
    }
    assert_eq!(expired_events(&db).await.len(), 5);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM user_packages WHERE status = 'expired' AND expired_credits = 10"
        )
        .await,
        5
    );
    assert_ledger_balanced(&db).await;
}
}
