//! Refunds, and bad input on every internal route.

#[macro_use]
mod common;

use axum::http::StatusCode;
use chrono::Duration;
use common::*;
use serde_json::{Value, json};

backend_tests! {
async fn refund_restores_grants_forfeits_expired_shares_and_replays(db: TestDb) {
    let credits = create_package(&db, "credits", Some(10), None).await;
    let hybrid = create_package(&db, "hybrid", Some(2), Some(1)).await;
    let engine = engine_on(&db).await;
    let expiring = engine
        .grant(
            4,
            hybrid,
            json!({"priority": 1, "expires_at": start_time() + Duration::hours(1)}),
        )
        .await;
    let lasting = engine.grant(4, credits, json!({})).await;

    let (status, deducted) = engine
        .deduct(
            json!({"user_id": 4, "action_key": "advanced_analysis", "idempotency_key": "run-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        deducted["allocations"],
        json!([{"user_package_id": expiring, "credits": 2}, {"user_package_id": lasting, "credits": 1}])
    );
    assert_eq!(deducted["remaining_credits"], 9);

    // The expiring grant lapses before the refund: its share is forfeited, the rest returns.
    engine.clock.advance(Duration::hours(2));
    let (status, refunded) = engine
        .refund(json!({"consumption_id": deducted["consumption_id"], "reason": "job failed"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{refunded}");
    assert_eq!(
        refunded,
        json!({"consumption_id": deducted["consumption_id"], "refunded_credits": 1,
               "forfeited_credits": 2, "remaining_credits": 10, "replayed": false})
    );
    let lasting_remaining: i64 =
        sqlx::query_scalar("SELECT remaining_credits FROM user_packages WHERE id = $1")
            .bind(lasting)
            .fetch_one(&db.sql)
            .await
            .unwrap();
    assert_eq!(lasting_remaining, 10);
    let (status, refunded_credits, forfeited_credits, reason): (String, i64, i64, Option<String>) =
        sqlx::query_as(
            "SELECT status, refunded_credits, forfeited_credits, refund_reason FROM consumption_records",
        )
        .fetch_one(&db.sql)
        .await
        .unwrap();
    assert_eq!(
        (status.as_str(), refunded_credits, forfeited_credits),
        ("refunded", 1, 2)
    );
    assert_eq!(reason.as_deref(), Some("job failed"));
    let lines: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT user_package_id, refunded_credits, forfeited_credits FROM consumption_allocations
         ORDER BY user_package_id",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    assert_eq!(lines, vec![(expiring, 0, 2), (lasting, 1, 0)]);

    // A second refund, by id or by key, is a replay that changes nothing.
    for again in [
        json!({"consumption_id": deducted["consumption_id"]}),
        json!({"user_id": 4, "idempotency_key": "run-1"}),
    ] {
        let (status, body) = engine.refund(again).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["replayed"], true);
        assert_eq!(body["refunded_credits"], 1);
        assert_eq!(body["forfeited_credits"], 2);
    }
    assert_eq!(remaining_of(&db, 4).await, 10);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM billing_events WHERE kind = 'billing_consumption_refund'"
        )
        .await,
        1
    );
    assert_ledger_balanced(&db).await;

    // Unknown consumptions are 404.
    let (status, body) = engine.refund(json!({"consumption_id": 999_999})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "consumption_not_found");
    let (status, _) = engine
        .refund(json!({"user_id": 4, "idempotency_key": "never-sent"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    engine.stop().await;
}
}

backend_tests! {
async fn refunds_of_one_consumption_at_once_refund_it_once_while_deducts_go_on(db: TestDb) {
    let package = create_package(&db, "credits", Some(100), None).await;
    let engine = std::sync::Arc::new(engine_on(&db).await);
    engine.grant(6, package, json!({})).await;
    let mut consumptions = Vec::new();
    for key in ["a", "b", "c"] {
        let (status, body) = engine
            .deduct(json!({"user_id": 6, "action_key": "advanced_analysis", "idempotency_key": key}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        consumptions.push(body["consumption_id"].clone());
    }
    assert_eq!(remaining_of(&db, 6).await, 91);

    // Ten refunds of each of the three, by id and by key, with deducts in between: the wallet
    // reads each refund's consumption off its turn and goes on serving.
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..10 {
        for (index, key) in ["a", "b", "c"].into_iter().enumerate() {
            let engine = engine.clone();
            let by = if round % 2 == 0 {
                json!({"consumption_id": consumptions[index]})
            } else {
                json!({"user_id": 6, "idempotency_key": key})
            };
            tasks.spawn(async move { ("refund", engine.refund(by).await) });
        }
        let engine = engine.clone();
        tasks.spawn(async move {
            ("deduct", engine.deduct(json!({"user_id": 6, "action_key": "ai_chat"})).await)
        });
    }
    let mut first_refunds = 0;
    while let Some(result) = tasks.join_next().await {
        let (kind, (status, body)) = result.unwrap();
        assert_eq!(status, StatusCode::OK, "{kind}: {body}");
        if kind == "refund" {
            assert_eq!(body["refunded_credits"], 3, "{body}");
            if body["replayed"] == false {
                first_refunds += 1;
            }
        }
    }
    assert_eq!(first_refunds, 3);
    // 100 - 3 x 3 + 3 x 3 refunded - 10 x 1 deducted.
    assert_eq!(remaining_of(&db, 6).await, 90);
    assert_eq!(
        count(&db, "SELECT count(*) FROM consumption_records WHERE status = 'refunded'").await,
        3
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM billing_events WHERE kind = 'billing_consumption_refund'").await,
        3
    );
    assert_ledger_balanced(&db).await;
    std::sync::Arc::into_inner(engine).unwrap().stop().await;
}
}

backend_tests! {
async fn a_refund_by_key_sent_with_its_deduct_waits_for_the_commit(db: TestDb) {
    let credits = create_package(&db, "credits", Some(50), None).await;
    let engine = engine_on(&db).await;
    engine.grant(6, credits, json!({})).await;

    // Deduct and refund race: the refund arrives while the deduct may still be in flight.
    for round in 0..20 {
        let key = format!("job-{round}");
        let (deducted, refunded) = tokio::join!(
            engine.deduct(json!({"user_id": 6, "action_key": "ai_chat", "idempotency_key": key})),
            async {
                tokio::task::yield_now().await;
                engine
                    .refund(json!({"user_id": 6, "idempotency_key": key}))
                    .await
            }
        );
        assert_eq!(deducted.0, StatusCode::OK, "{}", deducted.1);
        // Either the refund came first (nothing to refund yet) or it saw the committed deduct;
        // never a "pending" error the caller has to interpret.
        match refunded.0 {
            StatusCode::OK => assert_eq!(refunded.1["refunded_credits"], 1),
            StatusCode::NOT_FOUND => {
                assert_eq!(refunded.1["error"]["code"], "consumption_not_found");
                let (status, again) = engine
                    .refund(json!({"user_id": 6, "idempotency_key": key}))
                    .await;
                assert_eq!(status, StatusCode::OK, "{again}");
            }
            other => panic!("refund answered {other}: {}", refunded.1),
        }
    }
    assert_eq!(remaining_of(&db, 6).await, 50);
    assert_ledger_balanced(&db).await;
}
}

backend_tests! {
async fn a_refund_of_a_depleted_grant_makes_it_active_again(db: TestDb) {
    let credits = create_package(&db, "credits", Some(3), None).await;
    let engine = engine_on(&db).await;
    let grant = engine.grant(8, credits, json!({})).await;
    let (_, deducted) = engine
        .deduct(json!({"user_id": 8, "action_key": "advanced_analysis"}))
        .await;
    let status: String = sqlx::query_scalar("SELECT status FROM user_packages WHERE id = $1")
        .bind(grant)
        .fetch_one(&db.sql)
        .await
        .unwrap();
    assert_eq!(status, "depleted");
    let (status, _) = engine
        .refund(json!({"consumption_id": deducted["consumption_id"]}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, remaining): (String, i64) =
        sqlx::query_as("SELECT status, remaining_credits FROM user_packages WHERE id = $1")
            .bind(grant)
            .fetch_one(&db.sql)
            .await
            .unwrap();
    assert_eq!((status.as_str(), remaining), ("active", 3));
    let (status, _) = engine
        .deduct(json!({"user_id": 8, "action_key": "ai_chat"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_ledger_balanced(&db).await;
    engine.stop().await;
}
}

backend_tests! {
async fn a_free_actions_deduct_is_refunded_and_replayed_like_any_other(db: TestDb) {
    let credits = create_package(&db, "credits", Some(5), None).await;
    let engine = engine_on(&db).await;
    engine.grant(9, credits, json!({})).await;
    let (status, body) = engine
        .admin(
            "POST",
            "/api/admin/billing/action-prices",
            Some(json!({"action_key": "free_preview", "name": "Preview", "credits_cost": 0})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // A deduction that costs nothing draws on no grant: its record has no allocation, which
    // the refund's read must still find.
    let (status, deducted) = engine
        .deduct(json!({"user_id": 9, "action_key": "free_preview", "idempotency_key": "free-1"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{deducted}");
    assert_eq!(deducted["credits_cost"], 0);
    assert_eq!(deducted["allocations"], json!([]));
    assert_eq!(
        count(&db, "SELECT count(*) FROM consumption_allocations").await,
        0
    );

    let (status, refunded) = engine
        .refund(json!({"consumption_id": deducted["consumption_id"]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{refunded}");
    assert_eq!(
        refunded,
        json!({"consumption_id": deducted["consumption_id"], "refunded_credits": 0,
               "forfeited_credits": 0, "remaining_credits": 5, "replayed": false})
    );
    let (status, again) = engine
        .refund(json!({"user_id": 9, "idempotency_key": "free-1"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["replayed"], true);
    let refunded_status: String =
        sqlx::query_scalar("SELECT status FROM consumption_records WHERE idempotency_key = 'free-1'")
            .fetch_one(&db.sql)
            .await
            .unwrap();
    assert_eq!(refunded_status, "refunded");
    assert_eq!(remaining_of(&db, 9).await, 5);
    assert_ledger_balanced(&db).await;
    engine.stop().await;
}
}

/// What the database holds, to prove a rejected request wrote nothing.
async fn snapshot(db: &TestDb) -> Value {
    let row: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM consumption_records), (SELECT count(*) FROM consumption_allocations),
                (SELECT count(*) FROM billing_events),
                (SELECT CAST(COALESCE(SUM(remaining_credits), 0) AS BIGINT) FROM user_packages)",
    )
    .fetch_one(&db.sql)
    .await
    .unwrap();
    json!([row.0, row.1, row.2, row.3])
}

backend_tests! {
async fn bad_input_is_a_4xx_naming_the_field_and_writes_nothing(db: TestDb) {
    let credits = create_package(&db, "credits", Some(100), None).await;
    sqlx::query("INSERT INTO action_prices (action_key, name, credits_cost, enabled) VALUES ('off', 'Off', 1, false), ('huge', 'Huge', 9223372036854775807, true)")
        .execute(&db.sql)
        .await
        .unwrap();
    let engine = engine_on(&db).await;
    engine.grant(1, credits, json!({})).await;
    let before = snapshot(&db).await;

    let deduct = "/api/internal/billing/credits/deduct";
    let check = "/api/internal/billing/credits/check";
    let refund = "/api/internal/billing/credits/refund";
    let long_key = "k".repeat(129);
    let big_metadata = json!({"blob": "x".repeat(5_000)});
    let cases: Vec<(&str, Value, StatusCode, &str, Option<&str>)> = vec![
        (
            deduct,
            json!({"action_key": "ai_chat"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("user_id"),
        ),
        (
            deduct,
            json!({"user_id": 0, "action_key": "ai_chat"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("user_id"),
        ),
        (
            deduct,
            json!({"user_id": -5, "action_key": "ai_chat"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("user_id"),
        ),
        (
            deduct,
            json!({"user_id": "1", "action_key": "ai_chat"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("user_id"),
        ),
        (
            deduct,
            json!({"user_id": 1.5, "action_key": "ai_chat"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("user_id"),
        ),
        (
            deduct,
            json!({"user_id": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("action_key"),
        ),
        (
            deduct,
            json!({"user_id": 1, "action_key": "AI CHAT"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("action_key"),
        ),
        (
            deduct,
            json!({"user_id": 1, "action_key": "ai_chat", "quantity": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("quantity"),
        ),
        (
            deduct,
            json!({"user_id": 1, "action_key": "ai_chat", "quantity": -1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("quantity"),
        ),
        (
            deduct,
            json!({"user_id": 1, "action_key": "ai_chat", "quantity": 1_000_001}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("quantity"),
        ),
        (
            deduct,
            json!({"user_id": 1, "action_key": "huge", "quantity": 2}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("quantity"),
        ),
        (
            deduct,
            json!({"user_id": 1, "action_key": "ai_chat", "idempotency_key": ""}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("idempotency_key"),
        ),
        (
            deduct,
            json!({"user_id": 1, "action_key": "ai_chat", "idempotency_key": long_key}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("idempotency_key"),
        ),
        (
            deduct,
            json!({"user_id": 1, "action_key": "ai_chat", "idempotency_key": "has space"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("idempotency_key"),
        ),
        (
            deduct,
            json!({"user_id": 1, "action_key": "ai_chat", "metadata": [1]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("metadata"),
        ),
        (
            deduct,
            json!({"user_id": 1, "action_key": "ai_chat", "metadata": big_metadata}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("metadata"),
        ),
        (
            deduct,
            json!({"user_id": 1, "action_key": "ai_chat", "metadata": {"note": "a\0b"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("metadata"),
        ),
        (
            deduct,
            json!({"user_id": 1, "action_key": "ai_chat", "metadata": {"nested": [{"k\0": 1}]}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("metadata"),
        ),
        (
            deduct,
            json!({"user_id": 1, "action_key": "ai_chat", "qty": 2}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("qty"),
        ),
        (
            deduct,
            json!({"user_id": 1, "action_key": "no_such_action"}),
            StatusCode::NOT_FOUND,
            "unknown_action",
            None,
        ),
        (
            deduct,
            json!({"user_id": 1, "action_key": "off"}),
            StatusCode::CONFLICT,
            "action_disabled",
            None,
        ),
        (
            check,
            json!({"user_id": 1, "action_key": "ai_chat", "quantity": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("quantity"),
        ),
        (
            check,
            json!({"user_id": 1, "action_key": "ai_chat", "idempotency_key": "x"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("idempotency_key"),
        ),
        (
            refund,
            json!({}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("consumption_id"),
        ),
        (
            refund,
            json!({"consumption_id": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("consumption_id"),
        ),
        (
            refund,
            json!({"consumption_id": 1, "user_id": 1, "idempotency_key": "k"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("consumption_id"),
        ),
        (
            refund,
            json!({"user_id": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("idempotency_key"),
        ),
        (
            refund,
            json!({"consumption_id": 1, "reason": "r".repeat(1_025)}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("reason"),
        ),
    ];
    for (path, body, status, code, field) in cases {
        let (got, answer) = engine.internal(path, body.clone()).await;
        assert_eq!(got, status, "{path} {body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{path} {body}: {answer}");
        if let Some(field) = field {
            assert_eq!(answer["error"]["field"], field, "{path} {body}: {answer}");
        }
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }

    // Malformed JSON, the wrong media type and an oversized body.
    let raw = |body: &'static str, content_type: &'static str| {
        let router = engine.router.clone();
        async move {
            use tower::ServiceExt;
            let request = axum::http::Request::post(deduct)
                .header("content-type", content_type)
                .header("authorization", format!("Bearer {SERVICE_TOKEN}"))
                .body(axum::body::Body::from(body))
                .unwrap();
            router.oneshot(request).await.unwrap().status()
        }
    };
    assert_eq!(
        raw("{\"user_id\": 1,", "application/json").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        raw("user_id=1", "application/x-www-form-urlencoded").await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let huge: &'static str = Box::leak(
        format!(
            "{{\"user_id\": 1, \"action_key\": \"{}\"}}",
            "a".repeat(70_000)
        )
        .into_boxed_str(),
    );
    assert_eq!(
        raw(huge, "application/json").await,
        StatusCode::PAYLOAD_TOO_LARGE
    );

    // No or wrong credentials.
    let (status, _) = engine
        .request(deduct, None, json!({"user_id": 1, "action_key": "ai_chat"}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = engine
        .request(
            deduct,
            Some("wrong"),
            json!({"user_id": 1, "action_key": "ai_chat"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = engine
        .request(
            deduct,
            Some(&admin_token()),
            json!({"user_id": 1, "action_key": "ai_chat"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = engine
        .request(
            "/api/admin/billing/user-packages",
            Some(SERVICE_TOKEN),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    assert_eq!(
        snapshot(&db).await,
        before,
        "a rejected request wrote something"
    );
    engine.stop().await;
}
}

backend_tests! {
async fn admin_assign_validates_and_assigns_an_external_ref_once(db: TestDb) {
    let engine = engine_on(&db).await;
    let admin = admin_token();
    let user_token = credits_engine::http::auth::mint_token(
        &credits_engine::config::Secret::new(JWT_SECRET),
        7,
        None,
        Duration::hours(1),
        chrono::Utc::now(),
    )
    .unwrap();
    let path = "/api/admin/billing/user-packages";
    let (status, _) = engine
        .request(
            path,
            Some(&user_token),
            json!({"user_id": 7, "package_id": 2, "source": "gift"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for (body, field) in [
        (
            json!({"user_id": 7, "package_id": 2, "source": "stolen"}),
            "source",
        ),
        (
            json!({"user_id": 0, "package_id": 2, "source": "gift"}),
            "user_id",
        ),
        (
            json!({"user_id": 7, "package_id": 2, "source": "gift", "expires_at": "tomorrow"}),
            "expires_at",
        ),
        (
            json!({"user_id": 7, "package_id": 2, "source": "gift", "expires_at": "2020-01-01T00:00:00Z"}),
            "expires_at",
        ),
    ] {
        let (status, answer) = engine.request(path, Some(&admin), body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
        assert_eq!(answer["error"]["field"], field);
    }
    let (status, answer) = engine
        .request(
            path,
            Some(&admin),
            json!({"user_id": 7, "package_id": 999, "source": "gift"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert_eq!(count(&db, "SELECT count(*) FROM user_packages").await, 0);

    let order =
        json!({"user_id": 7, "package_id": 2, "source": "purchase", "external_ref": "order-9"});
    let (status, first) = engine.request(path, Some(&admin), order.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(first["remaining_credits"], 100);
    assert_eq!(first["status"], "active");
    let expected_expiry =
        (start_time() + Duration::days(30)).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    assert_eq!(first["expires_at"], expected_expiry);
    let (status, second) = engine.request(path, Some(&admin), order).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(second["id"], first["id"]);
    assert_eq!(count(&db, "SELECT count(*) FROM user_packages").await, 1);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM billing_events WHERE kind = 'billing_package_assign'"
        )
        .await,
        1
    );

    // A pending grant cannot pay.
    let (status, pending) = engine
        .request(
            path,
            Some(&admin),
            json!({"user_id": 8, "package_id": 2, "source": "gift", "activate": false}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(pending["status"], "pending");
    assert_eq!(pending["expires_at"], Value::Null);
    let (status, _) = engine
        .deduct(json!({"user_id": 8, "action_key": "ai_chat"}))
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    engine.stop().await;
}
}
