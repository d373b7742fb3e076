//! A test engine over a fresh database (one per test, from `#[sqlx::test]`), driven through its
//! router without a socket, with a clock the test moves by hand.
#![allow(dead_code)]

pub mod proxy;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::{DateTime, TimeZone, Utc};
use credits_engine::app::App;
use credits_engine::clock::ManualClock;
use credits_engine::config::{Secret, Settings};
use credits_engine::http::auth::mint_token;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt;

pub const SERVICE_TOKEN: &str = "test-service-token";
pub const JWT_SECRET: &str = "test-jwt-secret";

pub fn settings(database_url: &str) -> Settings {
    let mut settings = Settings::for_database(database_url);
    settings.listen_addr = "127.0.0.1:0".parse().unwrap();
    settings.service_tokens = vec![Secret::new(SERVICE_TOKEN)];
    settings.jwt_secret = Some(Secret::new(JWT_SECRET));
    settings.db_pool_max = 8;
    // Tests drive expiry by hand (`app.expirer().run_once()`) at the times they choose.
    settings.expiry_tick_ms = 0;
    settings
}

pub fn start_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

pub struct TestEngine {
    pub app: App,
    pub router: Router,
    pub pool: PgPool,
    pub clock: Arc<ManualClock>,
}

pub async fn engine(pool: PgPool) -> TestEngine {
    engine_with_clock(pool, Arc::new(ManualClock::new(start_time()))).await
}

pub async fn engine_with_clock(pool: PgPool, clock: Arc<ManualClock>) -> TestEngine {
    engine_with(pool, settings("postgres://unused"), clock).await
}

/// An engine with settings of the test's choosing, over `pool` (which may reach the database
/// some other way than the test's own pool, for example through a [`proxy::Proxy`]).
pub async fn engine_with(pool: PgPool, settings: Settings, clock: Arc<ManualClock>) -> TestEngine {
    let app = App::build_with(pool.clone(), settings, clock.clone())
        .await
        .expect("engine builds");
    let router = app.router();
    TestEngine {
        app,
        router,
        pool,
        clock,
    }
}

impl TestEngine {
    pub async fn request(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        send(&self.router, path, bearer, body).await
    }

    /// An internal API call with the service token.
    pub async fn internal(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.request(path, Some(SERVICE_TOKEN), body).await
    }

    pub async fn deduct(&self, body: Value) -> (StatusCode, Value) {
        self.internal("/api/internal/billing/credits/deduct", body)
            .await
    }

    pub async fn refund(&self, body: Value) -> (StatusCode, Value) {
        self.internal("/api/internal/billing/credits/refund", body)
            .await
    }

    pub async fn check(&self, body: Value) -> (StatusCode, Value) {
        self.internal("/api/internal/billing/credits/check", body)
            .await
    }

    /// Assigns a package through the admin API and returns the grant's id.
    pub async fn grant(&self, user_id: i64, package_id: i64, extra: Value) -> i64 {
        let mut body = json!({"user_id": user_id, "package_id": package_id, "source": "gift"});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let admin = admin_token();
        let (status, grant) = self
            .request("/api/admin/billing/user-packages", Some(&admin), body)
            .await;
        assert_eq!(status, StatusCode::CREATED, "{grant}");
        grant["id"].as_i64().unwrap()
    }

    pub async fn stop(self) {
        self.app.stop().await;
    }
}

pub fn admin_token() -> String {
    mint_token(
        &Secret::new(JWT_SECRET),
        1,
        Some("admin"),
        chrono::Duration::hours(1),
        Utc::now(),
    )
    .unwrap()
}

/// A token of an ordinary user.
pub fn user_token(user_id: i64) -> String {
    mint_token(
        &Secret::new(JWT_SECRET),
        user_id,
        None,
        chrono::Duration::hours(1),
        Utc::now(),
    )
    .unwrap()
}

/// What a call answered: status, headers and the raw body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("the body is UTF-8")
    }
}

/// Any method on any path; `body` is sent as JSON when given.
pub async fn call(
    router: &Router,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> Answer {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = match body {
        Some(body) => request
            .header("content-type", "application/json")
            .body(Body::from(body.to_string())),
        None => request.body(Body::empty()),
    }
    .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

impl TestEngine {
    /// A GET with a token; answers status and JSON.
    pub async fn get(&self, path: &str, bearer: Option<&str>) -> (StatusCode, Value) {
        let answer = call(&self.router, "GET", path, bearer, None).await;
        (answer.status, answer.json())
    }

    /// Any method as the admin.
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let answer = call(&self.router, method, path, Some(&admin_token()), body).await;
        (answer.status, answer.json())
    }
}

pub async fn send(
    router: &Router,
    path: &str,
    bearer: Option<&str>,
    body: Value,
) -> (StatusCode, Value) {
    let mut request = Request::post(path).header("content-type", "application/json");
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request.body(Body::from(body.to_string())).unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, value)
}

/// Creates a package straight in the database (before the engine loads its catalog).
pub async fn create_package(
    pool: &PgPool,
    package_type: &str,
    credits_amount: Option<i64>,
    duration_days: Option<i32>,
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO packages (name, package_type, credits_amount, duration_days)
         VALUES ($1, $1, $2, $3) RETURNING id",
    )
    .bind(package_type)
    .bind(credits_amount)
    .bind(duration_days)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Every grant's stored balance agrees with its ledger, by the engine's own definition
/// (`store::reconcile::ledger_mismatches`): used = allocated - refunded, and for a limited grant
/// total = used + remaining + expired.
pub async fn assert_ledger_balanced(pool: &PgPool) {
    let check = credits_engine::store::reconcile::ledger_mismatches(pool, 100)
        .await
        .unwrap();
    assert!(
        check.mismatches.is_empty(),
        "grants out of balance: {:?}",
        check.mismatches
    );
    // Every consumption's allocations add up to its cost.
    let uneven: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT c.id, c.credits_cost, COALESCE(SUM(a.credits), 0)::bigint
         FROM consumption_records c
         LEFT JOIN consumption_allocations a ON a.user_id = c.user_id AND a.consumption_id = c.id
         GROUP BY c.id, c.credits_cost
         HAVING c.credits_cost <> COALESCE(SUM(a.credits), 0)",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(
        uneven.is_empty(),
        "consumptions whose allocations miss their cost: {uneven:?}"
    );
}

pub async fn remaining_of(pool: &PgPool, user_id: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(SUM(remaining_credits), 0)::bigint FROM user_packages WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_one(pool)
    .await
    .unwrap()
}

pub async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// The sum of every series of one metric in `/metrics` (0 when the engine has not emitted it).
pub async fn metric(engine: &TestEngine, name: &str) -> f64 {
    let answer = call(&engine.router, "GET", "/metrics", None, None).await;
    assert_eq!(answer.status, StatusCode::OK);
    metric_in(&answer.text(), name)
}

pub fn metric_in(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            line.rsplit_once(' ')?.1.parse::<f64>().ok()
        })
        .sum()
}

/// Retries a keyed deduct that got a retryable `503`, as a well-behaved caller does, until it
/// is answered otherwise; panics if the engine never recovers.
pub async fn deduct_until_answered(engine: &TestEngine, body: &Value) -> (StatusCode, Value) {
    for _ in 0..100 {
        let (status, answer) = engine.deduct(body.clone()).await;
        if status != StatusCode::SERVICE_UNAVAILABLE {
            return (status, answer);
        }
        assert_eq!(answer["error"]["retryable"], true, "{answer}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the engine did not recover for {body}");
}

impl TestEngine {
    /// Runs reconciliation through the admin API, asserts it found nothing, and returns its
    /// report.
    pub async fn assert_reconciliation_clean(&self) -> Value {
        let (status, report) = self
            .admin("GET", "/api/admin/billing/reconciliation", None)
            .await;
        assert_eq!(status, StatusCode::OK, "{report}");
        assert_eq!(report["mismatches"], json!([]), "{report}");
        report
    }
}
