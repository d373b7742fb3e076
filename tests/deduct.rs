//! The deduct path against a real PostgreSQL: concurrency, burn-down, idempotency, failed
//! batches.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::StatusCode;
use chrono::Duration;
use common::*;
use serde_json::json;

backend_tests! {
async fn concurrent_deducts_for_one_user_never_overdraw(db: TestDb) {
    let credits = create_package(&db, "credits", Some(50), None).await;
    let hybrid = create_package(&db, "hybrid", Some(50), Some(30)).await;
    let engine = Arc::new(engine_on(&db).await);
    let now = start_time();
    // Burn order: the priority-10 grant first, then the one expiring sooner, then the later one.
    let later = engine
        .grant(7, hybrid, json!({"expires_at": now + Duration::days(20)}))
        .await;
    let first = engine.grant(7, credits, json!({"priority": 10})).await;
    let sooner = engine
        .grant(7, hybrid, json!({"expires_at": now + Duration::days(10)}))
        .await;

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let engine = engine.clone();
        tasks.spawn(async move {
            engine
                .deduct(json!({"user_id": 7, "action_key": "ai_chat"}))
                .await
        });
    }
    let mut statuses: HashMap<StatusCode, usize> = HashMap::new();
    while let Some(result) = tasks.join_next().await {
        let (status, body) = result.unwrap();
        if status == StatusCode::PAYMENT_REQUIRED {
            assert_eq!(body["error"]["code"], "insufficient_credits");
            assert_eq!(body["error"]["remaining_credits"], 0);
            assert_eq!(body["error"]["credits_cost"], 1);
        }
        *statuses.entry(status).or_default() += 1;
    }
    assert_eq!(statuses.get(&StatusCode::OK), Some(&150), "{statuses:?}");
    assert_eq!(
        statuses.get(&StatusCode::PAYMENT_REQUIRED),
        Some(&50),
        "{statuses:?}"
    );

    // In commit order, the first 50 deductions drew on `first`, the next 50 on `sooner`, the
    // last 50 on `later`.
    let order: Vec<i64> = sqlx::query_scalar(
        "SELECT a.user_package_id FROM consumption_allocations a WHERE a.user_id = 7
         ORDER BY a.consumption_id",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    let expected: Vec<i64> = [first, sooner, later]
        .iter()
        .flat_map(|id| std::iter::repeat_n(*id, 50))
        .collect();
    assert_eq!(order, expected);
    let statuses: Vec<String> =
        sqlx::query_scalar("SELECT status FROM user_packages WHERE user_id = 7")
            .fetch_all(&db.sql)
            .await
            .unwrap();
    assert!(
        statuses.iter().all(|status| status == "depleted"),
        "{statuses:?}"
    );
    assert_eq!(remaining_of(&db, 7).await, 0);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM billing_events WHERE kind = 'billing_credits_deduct'"
        )
        .await,
        150
    );
    assert_ledger_balanced(&db).await;
    Arc::into_inner(engine).unwrap().stop().await;
}
}

backend_tests! {
async fn concurrent_deducts_across_a_thousand_users_match_the_database(db: TestDb) {
    const USERS: i64 = 1_000;
    let package = create_package(&db, "credits", Some(10), None).await;
    // Grants straight in the database: wallets load them on each user's first request.
    sqlx::query(
        "WITH RECURSIVE users (u) AS (SELECT 1 UNION ALL SELECT u + 1 FROM users WHERE u < $2)
         INSERT INTO user_packages (user_id, id, package_id, source, status, priority, unlimited,
             total_credits, remaining_credits, activated_at)
         SELECT u, 1000000 + u, $1, 'gift', 'active', 100, false, 10, 10,
                '2026-01-01T00:00:00+00:00'
         FROM users",
    )
    .bind(package)
    .bind(USERS)
    .execute(&db.sql)
    .await
    .unwrap();
    let engine = Arc::new(engine_on(&db).await);

    // User u asks for u % 13 deductions of 1 credit: some run out (10 credits), some do not.
    let limit = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for user in 1..=USERS {
        for _ in 0..(user % 13) {
            let engine = engine.clone();
            let limit = limit.clone();
            tasks.spawn(async move {
                let _permit = limit.acquire().await.unwrap();
                let (status, _) = engine
                    .deduct(json!({"user_id": user, "action_key": "ai_chat"}))
                    .await;
                (user, status)
            });
        }
    }
    let mut acknowledged: HashMap<i64, i64> = HashMap::new();
    while let Some(result) = tasks.join_next().await {
        let (user, status) = result.unwrap();
        match status {
            StatusCode::OK => *acknowledged.entry(user).or_default() += 1,
            StatusCode::PAYMENT_REQUIRED => {}
            other => panic!("unexpected status {other} for user {user}"),
        }
    }
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT g.user_id, g.remaining_credits,
                (SELECT CAST(COALESCE(SUM(a.credits), 0) AS BIGINT) FROM consumption_allocations a
                 WHERE a.user_id = g.user_id)
         FROM user_packages g ORDER BY g.user_id",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    assert_eq!(rows.len() as i64, USERS);
    for (user, remaining, allocated) in rows {
        let acked = acknowledged.get(&user).copied().unwrap_or(0);
        assert_eq!(acked, (user % 13).min(10), "user {user}");
        assert_eq!(remaining, 10 - acked, "user {user}");
        assert_eq!(allocated, acked, "user {user}");
    }
    assert_ledger_balanced(&db).await;
    Arc::into_inner(engine).unwrap().stop().await;
}
}

backend_tests! {
async fn wallets_that_start_together_each_load_their_own_grants(db: TestDb) {
    // 600 users whose wallets all start at once, so their grants load in shared batches:
    // user u holds u % 4 live grants of distinct sizes (every fifth user also an expired one).
    // Each user's first answer is their own balance, so a grant given to the wrong wallet, or
    // a user the batch query missed, shows.
    const USERS: i64 = 600;
    let package = create_package(&db, "credits", Some(10), None).await;
    sqlx::query(
        "WITH RECURSIVE users (u) AS (SELECT 1 UNION ALL SELECT u + 1 FROM users WHERE u < $2),
             slots (k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM slots WHERE k < 3)
         INSERT INTO user_packages (user_id, id, package_id, source, status, priority, unlimited,
             total_credits, used_credits, remaining_credits, expired_credits, activated_at)
         SELECT u, 10 * u + k, $1, 'gift',
                CASE WHEN k = 3 THEN 'expired' ELSE 'active' END, 100, false,
                u + k, 0,
                CASE WHEN k = 3 THEN 0 ELSE u + k END,
                CASE WHEN k = 3 THEN u + k ELSE 0 END,
                '2026-01-01T00:00:00+00:00'
         FROM users, slots
         WHERE k < u % 4 OR (k = 3 AND u % 5 = 0)",
    )
    .bind(package)
    .bind(USERS)
    .execute(&db.sql)
    .await
    .unwrap();
    let engine = Arc::new(engine_on(&db).await);
    let mut tasks = tokio::task::JoinSet::new();
    for user in 1..=USERS {
        let engine = engine.clone();
        tasks.spawn(async move {
            let (status, answer) = engine
                .check(json!({"user_id": user, "action_key": "ai_chat"}))
                .await;
            assert_eq!(status, StatusCode::OK, "user {user}: {answer}");
            (user, answer["remaining_credits"].as_i64().unwrap())
        });
    }
    let mut seen = 0;
    while let Some(result) = tasks.join_next().await {
        let (user, remaining) = result.unwrap();
        let own: i64 = (0..user % 4).map(|k| user + k).sum();
        assert_eq!(remaining, own, "user {user}");
        seen += 1;
    }
    assert_eq!(seen, USERS);
    // They did load together: fewer queries than wallets. (Metrics are per process: nextest
    // runs each test in a process of its own, as the README's test command does.)
    let loads = metric(&engine, "credits_wallet_load_batch_size_count").await;
    let loaded = metric(&engine, "credits_wallet_load_batch_size_sum").await;
    assert_eq!(loaded, USERS as f64);
    assert!(loads < loaded, "{loads} queries for {loaded} wallets");
    // And they pay from their own grants.
    let (status, answer) = engine
        .deduct(json!({"user_id": 7, "action_key": "ai_chat"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(remaining_of(&db, 7).await, 7 + 8 + 9 - 1);
    Arc::into_inner(engine).unwrap().stop().await;
}
}

backend_tests! {
async fn one_idempotency_key_sent_twenty_times_at_once_deducts_once(db: TestDb) {
    let package = create_package(&db, "credits", Some(100), None).await;
    let engine = Arc::new(engine_on(&db).await);
    engine.grant(5, package, json!({})).await;
    let request = json!({
        "user_id": 5, "action_key": "advanced_analysis", "quantity": 2,
        "idempotency_key": "job-42", "metadata": {"b": 1, "a": [1, 2]},
    });

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let engine = engine.clone();
        let request = request.clone();
        tasks.spawn(async move { engine.deduct(request).await });
    }
    let mut answers = Vec::new();
    while let Some(result) = tasks.join_next().await {
        let (status, body) = result.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        answers.push(body);
    }
    let originals: Vec<_> = answers.iter().filter(|a| a["replayed"] == false).collect();
    assert_eq!(originals.len(), 1);
    let original = originals[0];
    assert_eq!(original["credits_cost"], 6);
    assert_eq!(original["remaining_credits"], 94);
    for answer in &answers {
        assert_eq!(answer["consumption_id"], original["consumption_id"]);
        assert_eq!(answer["remaining_credits"], 94);
        assert_eq!(answer["allocations"], original["allocations"]);
    }
    assert_eq!(remaining_of(&db, 5).await, 94);
    assert_eq!(
        count(&db, "SELECT count(*) FROM consumption_records").await,
        1
    );

    // The same key with another request is a conflict; metadata key order does not matter.
    let (status, body) = engine
        .deduct(json!({"user_id": 5, "action_key": "advanced_analysis", "quantity": 3, "idempotency_key": "job-42"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "idempotency_conflict");
    let (status, body) = engine
        .deduct(json!({
            "user_id": 5, "action_key": "advanced_analysis", "quantity": 2,
            "idempotency_key": "job-42", "metadata": {"a": [1, 2], "b": 1},
        }))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["replayed"], true);
    // Another user may use the same key.
    let (status, _) = engine
        .deduct(json!({"user_id": 6, "action_key": "ai_chat", "idempotency_key": "job-42"}))
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    Arc::into_inner(engine).unwrap().stop().await;

    // After a restart the key is answered from the database: by the optimistic insert while
    // the user can pay, and by a look-up when the balance could not pay any more.
    let engine = engine_on(&db).await;
    let (status, body) = engine.deduct(request.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["replayed"], true);
    assert_eq!(body["consumption_id"], original["consumption_id"]);
    assert_eq!(body["remaining_credits"], 94);
    assert_eq!(remaining_of(&db, 5).await, 94);
    let (status, _) = engine
        .deduct(json!({"user_id": 5, "action_key": "advanced_analysis", "quantity": 2, "idempotency_key": "job-42"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    // Memory gave back what the replays had taken: a check still sees 94.
    let (_, check) = engine
        .check(json!({"user_id": 5, "action_key": "ai_chat"}))
        .await;
    assert_eq!(check["remaining_credits"], 94);
    engine.stop().await;

    let engine = engine_on(&db).await;
    sqlx::query(
        "UPDATE user_packages SET remaining_credits = 0, expired_credits = 94 WHERE user_id = 5",
    )
    .execute(&db.sql)
    .await
    .unwrap();
    let (status, body) = engine.deduct(request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["replayed"], true);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM consumption_records WHERE user_id = 5"
        )
        .await,
        1
    );
    engine.stop().await;
}
}

backend_tests! {
async fn a_forgotten_key_is_replayed_at_commit_with_every_grant_it_drew_on(db: TestDb) {
    // The wallet remembers one key, so a retry of an older one reaches the writer, whose
    // insert finds the key committed and answers with what the database holds.
    let mut settings = settings("postgres://unused");
    settings.idempotency_cache_max = 1;
    let small = create_package(&db, "credits", Some(2), None).await;
    let large = create_package(&db, "credits", Some(10), None).await;
    let engine = engine_on_with(
        &db,
        settings,
        Arc::new(credits_engine::clock::ManualClock::new(start_time())),
    )
    .await;
    let first_grant = engine.grant(12, small, json!({"priority": 1})).await;
    let second_grant = engine.grant(12, large, json!({"priority": 2})).await;

    let k1 = json!({"user_id": 12, "action_key": "advanced_analysis", "idempotency_key": "k1"});
    let (status, original) = engine.deduct(k1.clone()).await;
    assert_eq!(status, StatusCode::OK, "{original}");
    assert_eq!(
        original["allocations"],
        json!([{"user_package_id": first_grant, "credits": 2},
               {"user_package_id": second_grant, "credits": 1}])
    );
    let (status, _) = engine
        .deduct(json!({"user_id": 12, "action_key": "ai_chat", "idempotency_key": "k2"}))
        .await;
    assert_eq!(status, StatusCode::OK);

    let (status, replay) = engine.deduct(k1).await;
    assert_eq!(status, StatusCode::OK, "{replay}");
    assert_eq!(replay["replayed"], true);
    for field in ["consumption_id", "credits_cost", "remaining_credits", "allocations"] {
        assert_eq!(replay[field], original[field], "{field}");
    }
    assert_eq!(remaining_of(&db, 12).await, 8);
    assert_eq!(
        count(&db, "SELECT count(*) FROM consumption_records").await,
        2
    );
    assert_ledger_balanced(&db).await;
    engine.stop().await;
}
}

backend_tests! {
async fn a_failed_batch_acknowledges_nothing_and_the_wallet_reloads(db: TestDb) {
    let package = create_package(&db, "credits", Some(10), None).await;
    let engine = engine_on(&db).await;
    engine.grant(3, package, json!({})).await;
    let (status, _) = engine
        .deduct(json!({"user_id": 3, "action_key": "ai_chat"}))
        .await;
    assert_eq!(status, StatusCode::OK);

    // Someone voids the grant behind the wallet's back: memory says 9, the database 0.
    sqlx::query(
        "UPDATE user_packages SET remaining_credits = 0, expired_credits = 9 WHERE user_id = 3",
    )
    .execute(&db.sql)
    .await
    .unwrap();
    let (status, body) = engine
        .deduct(json!({"user_id": 3, "action_key": "advanced_analysis"}))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");

    // The wallet reloaded: it now sees what the database holds.
    let (status, body) = engine
        .deduct(json!({"user_id": 3, "action_key": "ai_chat"}))
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    assert_eq!(body["error"]["remaining_credits"], 0);
    assert_eq!(
        count(&db, "SELECT count(*) FROM consumption_records").await,
        1
    );
    assert_ledger_balanced(&db).await;
    engine.stop().await;
}
}

backend_tests! {
async fn a_batch_naming_a_missing_grant_writes_nothing(db: TestDb) {
    let package = create_package(&db, "credits", Some(10), None).await;
    let engine = engine_on(&db).await;
    engine.grant(5, package, json!({})).await;
    let (status, _) = engine
        .deduct(json!({"user_id": 5, "action_key": "ai_chat", "idempotency_key": "first"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let events_before = count(&db, "SELECT count(*) FROM billing_events").await;

    // The grant disappears behind the wallet's back: the batch's balance update finds no row,
    // and the batch's consumption, allocation and event must not be written without it.
    sqlx::query("DELETE FROM user_packages WHERE user_id = 5")
        .execute(&db.sql)
        .await
        .unwrap();
    let (status, body) = engine
        .deduct(json!({"user_id": 5, "action_key": "ai_chat", "idempotency_key": "second"}))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert_eq!(
        count(&db, "SELECT count(*) FROM consumption_records").await,
        1
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM consumption_allocations").await,
        1
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM billing_events").await,
        events_before
    );

    // The wallet reloaded what the database holds: nothing to pay with.
    let (status, body) = engine
        .deduct(json!({"user_id": 5, "action_key": "ai_chat", "idempotency_key": "second"}))
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    engine.stop().await;
}
}

backend_tests! {
async fn check_reports_without_deducting_and_unlimited_grants_pay_anything(db: TestDb) {
    let permanent = create_package(&db, "permanent", None, None).await;
    let credits = create_package(&db, "credits", Some(2), None).await;
    let engine = engine_on(&db).await;
    engine.grant(9, credits, json!({"priority": 1})).await;
    let (status, body) = engine
        .check(json!({"user_id": 9, "action_key": "advanced_analysis"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"sufficient": false, "credits_cost": 3, "remaining_credits": 2, "unlimited": false})
    );

    let unlimited = engine.grant(9, permanent, json!({})).await;
    let (_, body) = engine
        .deduct(json!({"user_id": 9, "action_key": "advanced_analysis", "quantity": 1000}))
        .await;
    assert_eq!(body["credits_cost"], 3000);
    assert_eq!(body["remaining_credits"], 0);
    assert_eq!(
        body["allocations"][1],
        json!({"user_package_id": unlimited, "credits": 2998})
    );
    let used: i64 = sqlx::query_scalar("SELECT used_credits FROM user_packages WHERE id = $1")
        .bind(unlimited)
        .fetch_one(&db.sql)
        .await
        .unwrap();
    assert_eq!(used, 2998);
    assert_ledger_balanced(&db).await;
    engine.stop().await;
}
}
