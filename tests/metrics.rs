//! `/metrics`: what the engine's Prometheus endpoint shows after real traffic, with bounded
//! labels, and its own listen address when `CREDITS_METRICS_ADDR` is set.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::*;
use credits_engine::app::App;
use credits_engine::clock::ManualClock;
use serde_json::json;
use sqlx::PgPool;

#[sqlx::test(migrations = "./migrations/postgres")]
async fn traffic_shows_in_the_metrics_with_route_patterns_not_raw_paths(pool: PgPool) {
    let credits = create_package(&pool, "credits", Some(10), None).await;
    let engine = engine(pool.clone()).await;
    let grant = engine.grant(77, credits, json!({})).await;
    let keyed = |key: &str| json!({"user_id": 77, "action_key": "ai_chat", "idempotency_key": key});
    let (status, first) = engine.deduct(keyed("a")).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let cost = first["credits_cost"].as_i64().unwrap();
    let (status, _) = engine.deduct(keyed("a")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = engine
        .deduct(json!({"user_id": 77, "action_key": "no_such_action"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = engine
        .deduct(json!({"user_id": 77, "action_key": ""}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = engine
        .refund(json!({"user_id": 77, "idempotency_key": "a"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = engine
        .admin("GET", "/api/admin/users/77/billing-packages", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = engine.get(&format!("/no/such/{grant}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let answer = call(&engine.router, "GET", "/metrics", None, None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = answer.text();
    let value = |series: &str| metric_in(&text, series);
    assert_eq!(
        value(r#"credits_deducts_total{outcome="ok"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(value(r#"credits_deducts_total{outcome="replayed"}"#), 1.0);
    assert_eq!(
        value(r#"credits_deducts_total{outcome="unknown_action"}"#),
        1.0
    );
    assert_eq!(value(r#"credits_deducts_total{outcome="invalid"}"#), 1.0);
    assert_eq!(value(r#"credits_refunds_total{outcome="ok"}"#), 1.0);
    // Credits are counted at commit, once per batch: the replay charged nothing.
    assert_eq!(value("credits_deducted_total"), cost as f64);
    assert_eq!(value("credits_refunded_total"), cost as f64);
    // Two effects committed (the deduct and the refund), in batches the histogram counted.
    assert!(value("credits_writer_batch_size_count") >= 1.0);
    assert_eq!(value("credits_writer_batch_size_sum"), 2.0);
    assert!(value("credits_writer_commit_duration_seconds_count") >= 1.0);
    assert_eq!(value("credits_writer_commit_failures_total"), 0.0);
    assert!(value("credits_wallet_spawns_total") >= 1.0);
    // Requests are labelled by the route's pattern and status class, never by a raw path.
    assert_eq!(
        value(
            r#"credits_http_requests_total{route="/api/internal/billing/credits/deduct",method="POST",status="2xx"}"#
        ),
        2.0
    );
    assert!(
        value(
            r#"credits_http_requests_total{route="/api/admin/users/{user_id}/billing-packages",method="GET",status="2xx"}"#
        ) >= 1.0
    );
    assert_eq!(
        value(r#"credits_http_requests_total{route="unmatched",method="GET",status="4xx"}"#),
        1.0
    );
    for line in text.lines().filter(|line| line.starts_with("credits_http")) {
        assert!(
            !line.contains("/77/"),
            "a raw path leaked into a label: {line}"
        );
        assert!(
            !line.contains("/no/such"),
            "a raw path leaked into a label: {line}"
        );
    }
    engine.stop().await;
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn metrics_can_have_their_own_address(pool: PgPool) {
    let mut settings = settings("postgres://unused");
    settings.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    let app = App::build_with(
        credits_engine::store::postgres::PgStore::db(pool),
        settings,
        Arc::new(ManualClock::new(start_time())),
    )
    .await
    .unwrap();
    let api = app.local_addr().unwrap();
    let metrics = app.metrics_addr().expect("a metrics listener");
    assert_ne!(api, metrics);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));

    let client = reqwest::Client::new();
    let answer = client
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert!(answer.text().await.unwrap().contains("credits_wallets_max"));
    // The API's address no longer serves it, and the metrics address serves nothing else.
    let answer = client
        .get(format!("http://{api}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 404);
    let answer = client
        .get(format!("http://{metrics}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 404);
    let answer = client
        .get(format!("http://{api}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    stop.send(()).unwrap();
    serving.await.unwrap().unwrap();
}
