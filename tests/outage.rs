//! Database connections killed mid-load: the engine recovers by itself and stays exact.

mod common;

use axum::http::StatusCode;
use common::*;
use futures_util::future::join_all;
use serde_json::json;
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
                    let mut settled = false;
                    for _ in 0..50 {
                        let (status, _) = engine.deduct(body.clone()).await;
                        if status == StatusCode::OK {
                            settled = true;
                            break;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    assert!(settled, "the engine did not recover for {body}");
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
    let (status, report) = engine
        .admin("GET", "/api/admin/billing/reconciliation", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["mismatches"], json!([]), "{report}");
    let (status, _) = engine.get("/readyz", None).await;
    assert_eq!(status, StatusCode::OK);
}
