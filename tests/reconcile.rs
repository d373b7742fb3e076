//! Reconciliation: the ledger and live wallets against the database, reported and never fixed.

#[macro_use]
mod common;

use axum::http::StatusCode;
use common::*;
use serde_json::{Value, json};
use sqlx::PgPool;

const PATH: &str = "/api/admin/billing/reconciliation";

async fn mismatch_events(db: &TestDb) -> Vec<(Option<i64>, Value)> {
    let rows: Vec<(Option<i64>, String)> = sqlx::query_as(
        "SELECT user_id, CAST(payload AS TEXT) FROM billing_events
         WHERE kind = 'billing_reconciliation_mismatch' ORDER BY id",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(user_id, payload)| (user_id, serde_json::from_str(&payload).unwrap()))
        .collect()
}

async fn balance_of(db: &TestDb, id: i64) -> (String, i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT status, total_credits, used_credits, remaining_credits, expired_credits
         FROM user_packages WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.sql)
    .await
    .unwrap()
}

backend_tests! {
async fn a_clean_ledger_after_deducts_and_refunds_reports_nothing(db: TestDb) {
    let credits = create_package(&db, "credits", Some(100), None).await;
    let unlimited = create_package(&db, "permanent", None, None).await;
    let engine = engine_on(&db).await;
    engine.grant(5, credits, json!({})).await;
    engine.grant(6, unlimited, json!({})).await;
    for (user_id, key) in [(5, "a"), (5, "b"), (6, "c")] {
        let (status, body) = engine
            .deduct(json!({"user_id": user_id, "action_key": "advanced_analysis", "idempotency_key": key}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    for (user_id, key) in [(5, "a"), (6, "c")] {
        let (status, body) = engine
            .refund(json!({"user_id": user_id, "idempotency_key": key}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    let (status, report) = engine.admin("GET", PATH, None).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["mismatches"], json!([]));
    assert_eq!(report["truncated"], false);
    // Both grants were read, and both wallets (idle once the refunds answered) compared.
    assert_eq!(report["checked_grants"], 2);
    assert_eq!(report["checked_wallets"], 2);
    assert!(report["checked_at"].is_string());
    assert!(mismatch_events(&db).await.is_empty());
    engine.stop().await;
}
}

backend_tests! {
async fn a_planted_ledger_mismatch_is_reported_and_written_but_not_fixed(db: TestDb) {
    let credits = create_package(&db, "credits", Some(100), None).await;
    let engine = engine_on(&db).await;
    let grant = engine.grant(5, credits, json!({})).await;
    let (status, _) = engine
        .deduct(json!({"user_id": 5, "action_key": "advanced_analysis"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    // Restart first, so no live wallet holds the grant and only the ledger disagrees.
    engine.stop().await;
    let engine = common::engine_on(&db).await;
    sqlx::query(
        "UPDATE user_packages SET used_credits = used_credits + 5,
             remaining_credits = remaining_credits - 5 WHERE id = $1",
    )
    .bind(grant)
    .execute(&db.sql)
    .await
    .unwrap();
    let planted = balance_of(&db, grant).await;
    assert_eq!(planted, ("active".into(), 100, 8, 92, 0));

    let (status, report) = engine.admin("GET", PATH, None).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let expected = json!({
        "kind": "ledger", "user_id": 5, "user_package_id": grant, "status": "active",
        "unlimited": false, "total_credits": 100, "used_credits": 8, "remaining_credits": 92,
        "expired_credits": 0, "ledger_used_credits": 3, "difference": 5,
    });
    assert_eq!(report["mismatches"], json!([expected]));
    assert_eq!(report["checked_wallets"], 0);

    // One event with the details; the row is exactly as planted.
    assert_eq!(mismatch_events(&db).await, vec![(Some(5), expected)]);
    assert_eq!(balance_of(&db, grant).await, planted);

    // Every run reports it again (and writes it again): nothing was silently repaired.
    let (_, again) = engine.admin("GET", PATH, None).await;
    assert_eq!(again["mismatches"].as_array().unwrap().len(), 1);
    assert_eq!(mismatch_events(&db).await.len(), 2);
    // The run is counted in the metrics, with its mismatch.
    assert_eq!(
        metric(&engine, "credits_reconciliation_last_mismatches").await,
        1.0
    );
    assert!(metric(&engine, "credits_reconciliation_mismatches_total").await >= 2.0);
    engine.stop().await;
}
}

backend_tests! {
/// What the dropped foreign keys of `consumption_allocations` forbade (migration 0002) is still
/// caught: an allocation naming a missing grant or consumption record.
async fn an_allocation_without_its_grant_or_consumption_is_reported(db: TestDb) {
    let credits = create_package(&db, "credits", Some(100), None).await;
    let engine = engine_on(&db).await;
    let grant = engine.grant(5, credits, json!({})).await;
    let (status, deducted) = engine
        .deduct(json!({"user_id": 5, "action_key": "advanced_analysis"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{deducted}");
    let consumption = deducted["consumption_id"].as_i64().unwrap();
    sqlx::query(
        "INSERT INTO consumption_allocations (user_id, consumption_id, user_package_id, credits)
         VALUES (5, $1, 987654, 1), (5, 123456789, $2, 0 + 1)",
    )
    .bind(consumption)
    .bind(grant)
    .execute(&db.sql)
    .await
    .unwrap();
    // The second plant also unbalances the real grant's ledger: its allocations now say 4.
    let (status, report) = engine.admin("GET", PATH, None).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let kinds: Vec<&str> = report["mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|mismatch| mismatch["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["ledger", "allocation", "allocation"], "{report}");
    assert_eq!(
        report["mismatches"][1],
        json!({"kind": "allocation", "user_id": 5, "consumption_id": consumption,
               "user_package_id": 987654, "credits": 1,
               "consumption_missing": false, "grant_missing": true})
    );
    assert_eq!(
        report["mismatches"][2],
        json!({"kind": "allocation", "user_id": 5, "consumption_id": 123456789,
               "user_package_id": grant, "credits": 1,
               "consumption_missing": true, "grant_missing": false})
    );
    assert_eq!(mismatch_events(&db).await.len(), 3);
    engine.stop().await;
}
}

backend_tests! {
async fn a_wallet_whose_memory_disagrees_with_the_database_is_reported(db: TestDb) {
    let credits = create_package(&db, "credits", Some(100), None).await;
    let engine = engine_on(&db).await;
    let grant = engine.grant(5, credits, json!({})).await;
    let (status, _) = engine
        .deduct(json!({"user_id": 5, "action_key": "advanced_analysis"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    // Behind the live wallet's back, and balanced on its own: 10 more granted. Only the
    // wallet, which still believes 97 remain, disagrees.
    sqlx::query(
        "UPDATE user_packages SET total_credits = total_credits + 10,
             remaining_credits = remaining_credits + 10 WHERE id = $1",
    )
    .bind(grant)
    .execute(&db.sql)
    .await
    .unwrap();

    let (status, report) = engine.admin("GET", PATH, None).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["checked_wallets"], 1);
    let view = |total: i64, remaining: i64| {
        json!({"status": "active", "unlimited": false, "total_credits": total,
               "used_credits": 3, "remaining_credits": remaining, "expired_credits": 0})
    };
    let expected = json!({
        "kind": "wallet", "user_id": 5, "user_package_id": grant,
        "memory": view(100, 97), "stored": view(110, 107),
    });
    assert_eq!(report["mismatches"], json!([expected]));
    assert_eq!(mismatch_events(&db).await, vec![(Some(5), expected)]);
    // Memory was not overwritten either: the wallet still disagrees on the next run.
    let (_, again) = engine.admin("GET", PATH, None).await;
    assert_eq!(again["mismatches"].as_array().unwrap().len(), 1);
    assert_eq!(
        balance_of(&db, grant).await,
        ("active".into(), 110, 3, 107, 0)
    );
    engine.stop().await;
}
}

backend_tests! {
async fn only_admins_may_run_reconciliation(db: TestDb) {
    let engine = engine_on(&db).await;
    let (status, body) = engine.get(PATH, Some(&user_token(5))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = engine.get(PATH, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(mismatch_events(&db).await.is_empty());
    engine.stop().await;
}
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn the_background_job_writes_mismatches_and_stops_with_the_engine(pool: PgPool) {
    let db = TestDb::postgres(pool.clone()).await;
    let credits = create_package(&pool, "credits", Some(100), None).await;
    let grant: i64 = sqlx::query_scalar(
        "INSERT INTO user_packages (user_id, package_id, source, status, priority, unlimited,
             total_credits, used_credits, remaining_credits, activated_at)
         VALUES (9, $1, 'gift', 'active', 100, false, 100, 4, 96, now()) RETURNING id",
    )
    .bind(credits)
    .fetch_one(&pool)
    .await
    .unwrap();
    let mut settings = settings("postgres://unused");
    settings.reconcile_interval_secs = 1;
    let clock = std::sync::Arc::new(credits_engine::clock::ManualClock::new(start_time()));
    let app = credits_engine::app::App::build_with(
        credits_engine::store::postgres::PgStore::db(pool.clone()),
        settings,
        clock,
    )
    .await
    .unwrap();

    // Used 4 with no allocation behind it: the job finds it within a few intervals.
    let mut events = Vec::new();
    for _ in 0..100 {
        events = mismatch_events(&db).await;
        if !events.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (user_id, payload) = events.first().expect("the job wrote a mismatch event");
    assert_eq!(*user_id, Some(9));
    assert_eq!(payload["user_package_id"], grant);
    assert_eq!(payload["difference"], 4);
    // Stopping waits for the job: it would hang here if the job ignored its stop.
    app.stop().await;
    assert_eq!(
        balance_of(&db, grant).await,
        ("active".into(), 100, 4, 96, 0)
    );
}
