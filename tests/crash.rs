//! Crash safety: the real binary, killed with SIGKILL mid-load, then started again, on both
//! backends.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestDb;
use serde_json::{Value, json};

const SERVICE_TOKEN: &str = "crash-test-token";
const USERS: i64 = 40;
const CREDITS_EACH: i64 = 1_000_000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The engine as a child process; killed if the test ends (or fails) while it still runs, so a
/// failed run never leaves an engine holding the test's database.
struct EngineProcess(Child);

impl Drop for EngineProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn start_engine(database_url: &str, port: u16, log_name: &str) -> EngineProcess {
    let log = std::fs::File::create(std::env::temp_dir().join(log_name)).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_credits-engine"))
        .arg("serve")
        .env("DATABASE_URL", database_url)
        .env("CREDITS_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("CREDITS_SERVICE_TOKENS", SERVICE_TOKEN)
        .env("CREDITS_DB_POOL_MAX", "4")
        .env_remove("CREDITS_JWT_SECRET")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the engine binary starts");
    EngineProcess(child)
}

async fn wait_ready(client: &reqwest::Client, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .is_ok_and(|response| response.status().is_success());
        if ready {
            return;
        }
        assert!(Instant::now() < deadline, "the engine did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn deduct(client: &reqwest::Client, port: u16, body: &Value) -> Option<(u16, Value)> {
    let response = client
        .post(format!(
            "http://127.0.0.1:{port}/api/internal/billing/credits/deduct"
        ))
        .bearer_auth(SERVICE_TOKEN)
        .json(body)
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.ok()?))
}

backend_tests! {
async fn kill_9_mid_load_loses_no_acknowledged_deduct_and_applies_none_twice(db: TestDb) {
    let package: i64 = sqlx::query_scalar(
        "INSERT INTO packages (name, package_type, credits_amount) VALUES ('big', 'credits', $1) RETURNING id",
    )
    .bind(CREDITS_EACH)
    .fetch_one(&db.sql)
    .await
    .unwrap();
    sqlx::query(
        "WITH RECURSIVE users (u) AS (SELECT 1 UNION ALL SELECT u + 1 FROM users WHERE u < $3)
         INSERT INTO user_packages (user_id, id, package_id, source, status, priority, unlimited,
             total_credits, remaining_credits, activated_at)
         SELECT u, 1000000 + u, $1, 'gift', 'active', 100, false, $2, $2,
                '2026-01-01T00:00:00+00:00'
         FROM users",
    )
    .bind(package)
    .bind(CREDITS_EACH)
    .bind(USERS)
    .execute(&db.sql)
    .await
    .unwrap();

    let url = db.url.clone();
    let port = free_port();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut engine = start_engine(&url, port, &format!("crash-{port}-first.log"));
    wait_ready(&client, port).await;

    // 16 callers send keyed deducts until the engine dies under them.
    let acknowledged: Arc<Mutex<HashMap<String, (Value, Value)>>> = Arc::default();
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..16 {
        let client = client.clone();
        let acknowledged = acknowledged.clone();
        callers.spawn(async move {
            for n in 0.. {
                let body = json!({
                    "user_id": (caller * 7 + n) % USERS + 1,
                    "action_key": if n % 3 == 0 { "advanced_analysis" } else { "ai_chat" },
                    "idempotency_key": format!("c{caller}-n{n}"),
                });
                match deduct(&client, port, &body).await {
                    Some((200, answer)) => {
                        let key = body["idempotency_key"].as_str().unwrap().to_owned();
                        acknowledged.lock().unwrap().insert(key, (body, answer));
                    }
                    Some((status, answer)) => panic!("unexpected {status}: {answer}"),
                    None => return,
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    engine.0.kill().expect("SIGKILL the engine");
    engine.0.wait().unwrap();
    while let Some(result) = callers.join_next().await {
        result.unwrap();
    }
    // The dead engine's backends may still finish a batch whose COMMIT they had received
    // (committed, never acknowledged: allowed). Read the database once they are gone.
    wait_for_engine_backends_to_end(&db).await;
    let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap());
    assert!(
        acknowledged.len() > 100,
        "the load was too light to mean anything: {}",
        acknowledged.len()
    );

    // Every acknowledged deduction is in the database exactly once, as it was answered.
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT idempotency_key, id, user_id, credits_cost FROM consumption_records",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    let stored: HashMap<String, (i64, i64, i64)> = rows
        .iter()
        .map(|(key, id, user, cost)| (key.clone(), (*id, *user, *cost)))
        .collect();
    assert_eq!(stored.len(), rows.len(), "a key was stored twice");
    for (key, (body, answer)) in &acknowledged {
        let (id, user, cost) = stored
            .get(key)
            .unwrap_or_else(|| panic!("acknowledged deduct {key} is missing after the crash"));
        assert_eq!(answer["consumption_id"], json!(id));
        assert_eq!(body["user_id"], json!(user));
        assert_eq!(answer["credits_cost"], json!(cost));
    }

    // Balances equal the ledger.
    let off: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT g.user_id, g.remaining_credits,
                (SELECT CAST(COALESCE(SUM(c.credits_cost), 0) AS BIGINT) FROM consumption_records c
                 WHERE c.user_id = g.user_id)
         FROM user_packages g
         WHERE g.remaining_credits + g.used_credits <> g.total_credits
            OR g.used_credits <> (SELECT COALESCE(SUM(c.credits_cost), 0) FROM consumption_records c
                                  WHERE c.user_id = g.user_id)",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    assert!(off.is_empty(), "balances disagree with the ledger: {off:?}");

    // Started again, the engine answers every acknowledged key as a replay of the original.
    let port = free_port();
    let mut engine = start_engine(&url, port, &format!("crash-{port}-second.log"));
    wait_ready(&client, port).await;
    for (key, (body, answer)) in acknowledged.iter().take(200) {
        let (status, replay) = deduct(&client, port, body).await.unwrap();
        assert_eq!(status, 200, "{key}: {replay}");
        assert_eq!(replay["replayed"], true);
        assert_eq!(replay["consumption_id"], answer["consumption_id"]);
        assert_eq!(replay["remaining_credits"], answer["remaining_credits"]);
    }
    let records_after: i64 = sqlx::query_scalar("SELECT count(*) FROM consumption_records")
        .fetch_one(&db.sql)
        .await
        .unwrap();
    assert_eq!(
        records_after as usize,
        rows.len(),
        "a replay deducted again"
    );

    // SIGTERM drains and exits cleanly.
    let terminated = Command::new("kill")
        .args(["-TERM", &engine.0.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let exit = engine.0.wait().unwrap();
    assert!(exit.success(), "the engine exited with {exit:?} on SIGTERM");

    // Backends of the killed engine linger until PostgreSQL notices their dead sockets; end them
    // so the test harness can drop this test's database.
    if let Some(pool) = &db.pg {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .execute(pool)
        .await
        .unwrap();
    }
}
}

/// Waits until no connection of an engine (`application_name` credits-engine) is open on this
/// test's PostgreSQL database. (A killed process's SQLite connections die with it.)
async fn wait_for_engine_backends_to_end(db: &TestDb) {
    let Some(pool) = &db.pg else { return };
    for _ in 0..200 {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1",
        )
        .bind(credits_engine::store::postgres::APPLICATION_NAME)
        .fetch_one(pool)
        .await
        .unwrap();
        if open == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the killed engine's database sessions did not end");
}
