//! A first, simple load against a running engine: keyed deducts from N concurrent callers over
//! a fresh range of users for a bounded time, printing acknowledged deducts/s and latency
//! percentiles. The full load generator (open loop, baseline, conservation) is `loadtest/`.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/credits CREDITS_SERVICE_TOKEN=dev-service-token \
//!   cargo run --release --example quickload -- 127.0.0.1:8080 10000 64 10
//! ```
//! (arguments: engine address, users, concurrent callers, seconds; use 1 user for a hot user)

use std::time::{Duration, Instant};

use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let addr = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let users: i64 = args.get(2).map_or(Ok(10_000), |a| a.parse())?;
    let concurrency: usize = args.get(3).map_or(Ok(64), |a| a.parse())?;
    let seconds: u64 = args.get(4).map_or(Ok(10), |a| a.parse())?;
    let token = std::env::var("CREDITS_SERVICE_TOKEN")?;
    let pool = sqlx::PgPool::connect(&std::env::var("DATABASE_URL")?).await?;

    // A fresh range of users, so no wallet of an earlier run holds them.
    let base: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(user_id), 0) FROM user_packages")
        .fetch_one(&pool)
        .await?;
    let package: i64 = sqlx::query_scalar(
        "INSERT INTO packages (name, package_type, credits_amount, visible)
         VALUES ('quickload', 'credits', 1000000000, false) RETURNING id",
    )
    .fetch_one(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO user_packages (user_id, package_id, source, status, priority, unlimited,
             total_credits, remaining_credits, activated_at)
         SELECT $1 + u, $2, 'system', 'active', 100, false, 1000000000, 1000000000, now()
         FROM generate_series(1, $3) u",
    )
    .bind(base)
    .bind(package)
    .bind(users)
    .execute(&pool)
    .await?;

    let client = reqwest::Client::new();
    let url = format!("http://{addr}/api/internal/billing/credits/deduct");
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..concurrency {
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        callers.spawn(async move {
            let mut latencies_us = Vec::new();
            let mut failures = 0u64;
            let mut n: i64 = 0;
            while Instant::now() < deadline {
                n += 1;
                let user = base + 1 + (n * 7919 + caller as i64 * 104_729) % users;
                let body = json!({"user_id": user, "action_key": "ai_chat",
                                  "idempotency_key": format!("q{caller}-{n}")});
                let sent = Instant::now();
                let ok = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    latencies_us.push(sent.elapsed().as_micros() as u64);
                } else {
                    failures += 1;
                }
            }
            (latencies_us, failures)
        });
    }
    let mut latencies_us = Vec::new();
    let mut failures = 0;
    while let Some(result) = callers.join_next().await {
        let (mut caller_latencies, caller_failures) = result?;
        latencies_us.append(&mut caller_latencies);
        failures += caller_failures;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies_us.sort_unstable();
    let percentile = |p: f64| {
        latencies_us
            .get(
                ((latencies_us.len() as f64 * p) as usize)
                    .min(latencies_us.len().saturating_sub(1)),
            )
            .map_or(0.0, |us| *us as f64 / 1000.0)
    };
    println!(
        "users={users} concurrency={concurrency} seconds={seconds}: {} acknowledged deducts, {:.0}/s, \
         p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, {failures} failed",
        latencies_us.len(),
        latencies_us.len() as f64 / elapsed,
        percentile(0.50),
        percentile(0.99),
        percentile(0.999),
    );
    Ok(())
}
