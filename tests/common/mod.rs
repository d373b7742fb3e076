//! A test engine over a fresh database (one per test: PostgreSQL's from `#[sqlx::test]`, or a
//! new SQLite file), driven through its router without a socket, with a clock the test moves by
//! hand. [`backend_tests!`] runs one test body on both backends.
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
use credits_engine::store::Db;
use credits_engine::store::postgres::PgStore;
use credits_engine::store::sqlite::SqliteStore;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sqlx::{AnyPool, PgPool};
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

/// Runs each test body twice, as `<name>::postgres` (a fresh database from `#[sqlx::test]`)
/// and `<name>::sqlite` (a fresh file), with `$db` bound to the [`TestDb`].
#[macro_export]
macro_rules! backend_tests {
    ($(
        $(#[$meta:meta])*
        async fn $name:ident($db:ident: TestDb) $body:block
    )*) => {$(
        $(#[$meta])*
        mod $name {
            use super::*;

            #[sqlx::test(migrations = "./migrations/postgres")]
            async fn postgres(pool: sqlx::PgPool) {
                let $db = TestDb::postgres(pool).await;
                $body
            }

            #[tokio::test]
            async fn sqlite() {
                let $db = TestDb::sqlite(concat!(module_path!(), "-", stringify!($name))).await;
                $body
            }
        }
    )*};
}

/// A fresh database of either backend: the engine's store over it, and a pool for the test's
/// own statements (portable SQL with `$1` placeholders, through sqlx's `Any` driver).
pub struct TestDb {
    pub store: Db,
    pub sql: AnyPool,
    /// A `DATABASE_URL` that reaches it, for an engine in another process.
    pub url: String,
    /// The PostgreSQL test pool (`None` on SQLite).
    pub pg: Option<PgPool>,
    /// The SQLite file, removed (with its WAL) when the test ends.
    file: Option<std::path::PathBuf>,
}

impl TestDb {
    pub async fn postgres(pool: PgPool) -> TestDb {
        let database = pool
            .connect_options()
            .get_database()
            .expect("sqlx::test names its database")
            .to_owned();
        let url = database_url_for(&database);
        TestDb {
            store: PgStore::db(pool.clone()),
            sql: any_pool(&url).await,
            url,
            pg: Some(pool),
            file: None,
        }
    }

    pub async fn sqlite(name: &str) -> TestDb {
        let file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "{}-{}.db",
            name.replace("::", "-"),
            std::process::id()
        ));
        remove_sqlite_files(&file);
        let url = format!("sqlite://{}", file.display());
        let store = SqliteStore::connect(&url, 8)
            .await
            .expect("the SQLite test database opens");
        TestDb {
            store: Arc::new(store),
            sql: any_pool(&url).await,
            url,
            pg: None,
            file: Some(file),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(file) = &self.file {
            remove_sqlite_files(file);
        }
    }
}

/// `DATABASE_URL` (the server the tests create their databases on, with its credentials and
/// parameters) naming `database` instead of its own.
pub fn database_url_for(database: &str) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL names the test server");
    let (address, parameters) = match base.split_once('?') {
        Some((address, parameters)) => (address, Some(parameters)),
        None => (base.as_str(), None),
    };
    let (server, _) = address
        .rsplit_once('/')
        .expect("DATABASE_URL has a database path");
    match parameters {
        Some(parameters) => format!("{server}/{database}?{parameters}"),
        None => format!("{server}/{database}"),
    }
}

fn remove_sqlite_files(file: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut path = file.as_os_str().to_owned();
        path.push(suffix);
        let _ = std::fs::remove_file(path);
    }
}

async fn any_pool(url: &str) -> AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .expect("the test's own pool connects")
}

/// Either a PostgreSQL test pool or a [`TestDb`]: what the helpers below read and write.
#[derive(Clone, Copy)]
pub enum SqlRef<'a> {
    Pg(&'a PgPool),
    Test(&'a TestDb),
}

impl<'a> From<&'a PgPool> for SqlRef<'a> {
    fn from(pool: &'a PgPool) -> SqlRef<'a> {
        SqlRef::Pg(pool)
    }
}

impl<'a> From<&'a TestDb> for SqlRef<'a> {
    fn from(db: &'a TestDb) -> SqlRef<'a> {
        SqlRef::Test(db)
    }
}

impl SqlRef<'_> {
    fn store(self) -> Db {
        match self {
            SqlRef::Pg(pool) => PgStore::db(pool.clone()),
            SqlRef::Test(db) => db.store.clone(),
        }
    }

    /// One `bigint` that `sql` answers, with `binds` for `$1`, `$2`...
    async fn scalar(self, sql: &str, binds: &[i64]) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            SqlRef::Pg(pool) => {
                let mut query = sqlx::query_scalar(sql);
                for bind in binds {
                    query = query.bind(*bind);
                }
                query.fetch_one(pool).await.unwrap()
            }
            SqlRef::Test(db) => {
                let mut query = sqlx::query_scalar(sql);
                for bind in binds {
                    query = query.bind(*bind);
                }
                query.fetch_one(&db.sql).await.unwrap()
            }
        }
    }
}

impl SqlRef<'_> {
    /// The `bigint`s of the first column `sql` answers, in its order.
    pub async fn ids(self, sql: &str) -> Vec<i64> {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            SqlRef::Pg(pool) => sqlx::query_scalar(sql).fetch_all(pool).await.unwrap(),
            SqlRef::Test(db) => sqlx::query_scalar(sql).fetch_all(&db.sql).await.unwrap(),
        }
    }
}

/// The JSON documents `sql` answers as text (`CAST(payload AS TEXT)`), parsed, in its order.
pub async fn payloads(db: &TestDb, sql: &str) -> Vec<Value> {
    let texts: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_all(&db.sql)
        .await
        .unwrap();
    texts
        .iter()
        .map(|text| serde_json::from_str(text).expect("a JSON column holds JSON"))
        .collect()
}

pub struct TestEngine {
    pub app: App,
    pub router: Router,
    pub db: Db,
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
    engine_over(PgStore::db(pool), settings, clock).await
}

/// An engine over a [`TestDb`] of either backend.
pub async fn engine_on(db: &TestDb) -> TestEngine {
    engine_on_with_clock(db, Arc::new(ManualClock::new(start_time()))).await
}

pub async fn engine_on_with_clock(db: &TestDb, clock: Arc<ManualClock>) -> TestEngine {
    engine_on_with(db, settings("postgres://unused"), clock).await
}

/// An engine over a [`TestDb`] with settings of the test's choosing.
pub async fn engine_on_with(
    db: &TestDb,
    settings: Settings,
    clock: Arc<ManualClock>,
) -> TestEngine {
    engine_over(db.store.clone(), settings, clock).await
}

async fn engine_over(db: Db, settings: Settings, clock: Arc<ManualClock>) -> TestEngine {
    let app = App::build_with(db.clone(), settings, clock.clone())
        .await
        .expect("engine builds");
    let router = app.router();
    TestEngine {
        app,
        router,
        db,
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
pub async fn create_package<'a>(
    db: impl Into<SqlRef<'a>>,
    package_type: &str,
    credits_amount: Option<i64>,
    duration_days: Option<i32>,
) -> i64 {
    const INSERT: &str = "INSERT INTO packages (name, package_type, credits_amount, duration_days)
         VALUES ($1, $1, $2, $3) RETURNING id";
    let duration_days = duration_days.map(i64::from);
    match db.into() {
        SqlRef::Pg(pool) => sqlx::query_scalar(INSERT)
            .bind(package_type)
            .bind(credits_amount)
            .bind(duration_days.map(|days| days as i32))
            .fetch_one(pool)
            .await
            .unwrap(),
        SqlRef::Test(db) => sqlx::query_scalar(INSERT)
            .bind(package_type)
            .bind(credits_amount)
            .bind(duration_days)
            .fetch_one(&db.sql)
            .await
            .unwrap(),
    }
}

/// Every grant's stored balance agrees with its ledger, by the engine's own definition
/// (`store::reconcile::ledger_mismatches`): used = allocated - refunded, and for a limited grant
/// total = used + remaining + expired.
pub async fn assert_ledger_balanced<'a>(db: impl Into<SqlRef<'a>>) {
    let db = db.into();
    let check = db.store().ledger_mismatches(100).await.unwrap();
    assert!(
        check.mismatches.is_empty(),
        "grants out of balance: {:?}",
        check.mismatches
    );
    // Every consumption's allocations add up to its cost.
    let uneven = db
        .scalar(
            "SELECT count(*) FROM (
                 SELECT c.id FROM consumption_records c
                 LEFT JOIN consumption_allocations a
                   ON a.user_id = c.user_id AND a.consumption_id = c.id
                 GROUP BY c.user_id, c.id, c.credits_cost
                 HAVING c.credits_cost <> COALESCE(SUM(a.credits), 0)) AS uneven",
            &[],
        )
        .await;
    assert_eq!(uneven, 0, "consumptions whose allocations miss their cost");
}

pub async fn remaining_of<'a>(db: impl Into<SqlRef<'a>>, user_id: i64) -> i64 {
    db.into()
        .scalar(
            "SELECT CAST(COALESCE(SUM(remaining_credits), 0) AS BIGINT) FROM user_packages
             WHERE user_id = $1",
            &[user_id],
        )
        .await
}

/// What `sql` (one `bigint`, such as a `count(*)`) answers.
pub async fn count<'a>(db: impl Into<SqlRef<'a>>, sql: &'static str) -> i64 {
    db.into().scalar(sql, &[]).await
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
