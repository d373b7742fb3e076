//! The catalog and user-package admin API, new users, and the public and user lists.

#[macro_use]
mod common;

use std::collections::HashMap;

use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use common::*;
use futures_util::future::join_all;
use serde_json::{Value, json};
use sqlx::PgPool;

backend_tests! {
async fn a_price_change_during_deducts_never_mixes_price_and_version(db: TestDb) {
    let credits = create_package(&db, "credits", Some(1_000_000), None).await;
    let engine = engine_on(&db).await;
    for user in 1..=20 {
        engine.grant(user, credits, json!({})).await;
    }

    let deducts = async {
        let calls = (0..400).map(|n| {
            engine.deduct(json!({"user_id": n % 20 + 1, "action_key": "ai_chat", "quantity": 2}))
        });
        for (status, body) in join_all(calls).await {
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    };
    let price_changes = async {
        for cost in 2..=11 {
            let (status, price) = engine
                .admin(
                    "PUT",
                    "/api/admin/billing/action-prices/ai_chat",
                    Some(json!({"credits_cost": cost})),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{price}");
            assert_eq!(price["credits_cost"], cost);
            assert_eq!(price["version"], cost);
            tokio::task::yield_now().await;
        }
    };
    tokio::join!(deducts, price_changes);

    // The price of each version, as the audit log recorded it (version 1 is the default).
    let mut cost_of_version: HashMap<i64, i64> = HashMap::from([(1, 1)]);
    let events = payloads(
        &db,
        "SELECT CAST(payload AS TEXT) FROM billing_events
         WHERE kind = 'billing_action_price_update'",
    )
    .await;
    assert_eq!(events.len(), 10, "one event per change");
    for event in events {
        cost_of_version.insert(
            event["version"].as_i64().unwrap(),
            event["credits_cost"].as_i64().unwrap(),
        );
    }
    let records: Vec<(i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT price_version, unit_cost, quantity, credits_cost FROM consumption_records",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    assert_eq!(records.len(), 400);
    for (version, unit_cost, quantity, credits_cost) in records {
        assert_eq!(
            cost_of_version.get(&version),
            Some(&unit_cost),
            "version {version} was charged at {unit_cost}"
        );
        assert_eq!(credits_cost, unit_cost * quantity);
    }
    assert_ledger_balanced(&db).await;

    // The snapshot holds the last price: the next deduct pays it.
    let (status, deducted) = engine
        .deduct(json!({"user_id": 1, "action_key": "ai_chat"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(deducted["credits_cost"], 11);
}
}

backend_tests! {
async fn action_prices_are_created_changed_disabled_and_validated(db: TestDb) {
    let engine = engine_on(&db).await;
    let (status, created) = engine
        .admin(
            "POST",
            "/api/admin/billing/action-prices",
            Some(json!({"action_key": "video_render", "name": "Video render", "credits_cost": 5})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["version"], 1);
    assert_eq!(created["enabled"], true);

    let (status, duplicate) = engine
        .admin(
            "POST",
            "/api/admin/billing/action-prices",
            Some(json!({"action_key": "video_render", "name": "Again", "credits_cost": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(duplicate["error"]["code"], "duplicate_action_key");

    // PUT changes only what it names; the version counts every change.
    let (status, changed) = engine
        .admin(
            "PUT",
            "/api/admin/billing/action-prices/video_render",
            Some(json!({"description": "Renders a video"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(changed["credits_cost"], 5);
    assert_eq!(changed["name"], "Video render");
    assert_eq!(changed["version"], 2);

    // Disabled: a deduct is 409 action_disabled, and the public list leaves it out.
    let (status, disabled) = engine
        .admin(
            "PATCH",
            "/api/admin/billing/action-prices/video_render/status",
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(disabled["version"], 3);
    let (status, refused) = engine
        .deduct(json!({"user_id": 1, "action_key": "video_render"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(refused["error"]["code"], "action_disabled");
    let (status, public) = engine.get("/api/billing/action-prices", None).await;
    assert_eq!(status, StatusCode::OK);
    let keys: Vec<&str> = public["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["action_key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "advanced_analysis",
            "ai_chat",
            "pdf_export",
            "resume_optimize"
        ]
    );

    // Admin list pages by key.
    let (status, first) = engine
        .admin("GET", "/api/admin/billing/action-prices?limit=3", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["items"].as_array().unwrap().len(), 3);
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = engine
        .admin(
            "GET",
            &format!("/api/admin/billing/action-prices?limit=3&cursor={cursor}"),
            None,
        )
        .await;
    assert_eq!(second["items"].as_array().unwrap().len(), 2);
    assert_eq!(second["next_cursor"], Value::Null);

    // Bad input names its field and writes nothing.
    let events_before = count(&db, "SELECT count(*) FROM billing_events").await;
    for (method, path, body, field, status) in [
        (
            "POST",
            "/api/admin/billing/action-prices",
            json!({"action_key": "Bad Key", "name": "x", "credits_cost": 1}),
            "action_key",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/admin/billing/action-prices",
            json!({"action_key": "ok", "name": "x", "credits_cost": -1}),
            "credits_cost",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/admin/billing/action-prices",
            json!({"action_key": "ok", "name": "", "credits_cost": 1}),
            "name",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/admin/billing/action-prices",
            json!({"action_key": "ok", "credits_cost": 1}),
            "name",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/api/admin/billing/action-prices",
            json!({"action_key": "ok", "name": "x", "credits_cost": 10_000_000_000_i64}),
            "credits_cost",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "PUT",
            "/api/admin/billing/action-prices/ai_chat",
            json!({"credits_cost": null}),
            "credits_cost",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "PUT",
            "/api/admin/billing/action-prices/ai_chat",
            json!({"action_key": "other"}),
            "action_key",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "PATCH",
            "/api/admin/billing/action-prices/ai_chat/status",
            json!({"enabled": "no"}),
            "enabled",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let (got, body) = engine.admin(method, path, Some(body)).await;
        assert_eq!(got, status, "{method} {path}: {body}");
        assert_eq!(body["error"]["field"], field, "{body}");
    }
    let (status, missing) = engine
        .admin(
            "PUT",
            "/api/admin/billing/action-prices/nope",
            Some(json!({"credits_cost": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(missing["error"]["code"], "unknown_action");
    assert_eq!(
        count(&db, "SELECT count(*) FROM billing_events").await,
        events_before
    );
    let (_, chat) = engine
        .admin("GET", "/api/admin/billing/action-prices?limit=500", None)
        .await;
    let chat = chat["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|item| item["action_key"] == "ai_chat")
        .unwrap()
        .clone();
    assert_eq!(chat["version"], 1, "a refused change changed nothing");
}
}

backend_tests! {
async fn packages_follow_the_two_by_two_and_soft_delete_keeps_grants(db: TestDb) {
    let engine = engine_on(&db).await;
    for (body, field) in [
        (
            json!({"name": "x", "package_type": "hybrid", "credits_amount": 10}),
            "duration_days",
        ),
        (
            json!({"name": "x", "package_type": "credits"}),
            "credits_amount",
        ),
        (
            json!({"name": "x", "package_type": "permanent", "credits_amount": 5}),
            "credits_amount",
        ),
        (
            json!({"name": "x", "package_type": "duration", "duration_days": 30, "credits_amount": 1}),
            "credits_amount",
        ),
        (
            json!({"name": "x", "package_type": "credits", "credits_amount": 5, "duration_days": 3}),
            "duration_days",
        ),
        (
            json!({"name": "x", "package_type": "weekly"}),
            "package_type",
        ),
        (
            json!({"name": "x", "package_type": "credits", "credits_amount": 0}),
            "credits_amount",
        ),
        (
            json!({"name": "x", "package_type": "credits", "credits_amount": 5, "currency": "usd"}),
            "currency",
        ),
        (
            json!({"name": "x", "package_type": "credits", "credits_amount": 5, "price_cents": -1}),
            "price_cents",
        ),
        (json!({"package_type": "permanent"}), "name"),
    ] {
        let (status, error) = engine
            .admin("POST", "/api/admin/billing/packages", Some(body.clone()))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {error}");
        assert_eq!(error["error"]["field"], field, "{body}: {error}");
    }
    assert_eq!(count(&db, "SELECT count(*) FROM packages").await, 2);

    let (status, pack) = engine
        .admin(
            "POST",
            "/api/admin/billing/packages",
            Some(json!({"name": "Starter", "package_type": "credits", "credits_amount": 20, "price_cents": 990, "sort_order": 5})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{pack}");
    assert_eq!(pack["currency"], "CNY");
    assert_eq!(pack["priority"], 100);
    assert_eq!(pack["visible"], true);
    let id = pack["id"].as_i64().unwrap();

    // A PUT that turns it into a duration package must clear credits_amount explicitly.
    let path = format!("/api/admin/billing/packages/{id}");
    let (status, error) = engine
        .admin(
            "PUT",
            &path,
            Some(json!({"package_type": "duration", "duration_days": 7})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error["error"]["field"], "credits_amount");
    let (status, changed) = engine
        .admin(
            "PUT",
            &path,
            Some(json!({"name": "Starter+", "price_cents": 1290})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(changed["name"], "Starter+");
    assert_eq!(changed["credits_amount"], 20);
    assert_eq!(changed["sort_order"], 5);

    let grant = engine.grant(3, id, json!({})).await;

    let (status, hidden) = engine
        .admin(
            "PATCH",
            &format!("{path}/visibility"),
            Some(json!({"visible": false})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(hidden["visible"], false);
    assert!(!public_package_ids(&engine).await.contains(&id));
    engine
        .admin(
            "PATCH",
            &format!("{path}/visibility"),
            Some(json!({"visible": true})),
        )
        .await;
    assert!(public_package_ids(&engine).await.contains(&id));

    // Soft delete: gone from lists and the public API, not assignable, grants keep working.
    let (status, _) = engine.admin("DELETE", &path, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = engine.admin("DELETE", &path, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "deleting twice is a no-op");
    assert!(!public_package_ids(&engine).await.contains(&id));
    let (_, listed) = engine
        .admin("GET", "/api/admin/billing/packages", None)
        .await;
    assert!(!ids_of(&listed).contains(&id));
    let (_, with_deleted) = engine
        .admin(
            "GET",
            "/api/admin/billing/packages?include_deleted=true",
            None,
        )
        .await;
    assert!(ids_of(&with_deleted).contains(&id));
    let (status, fetched) = engine.admin("GET", &path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(fetched["deleted_at"].is_string());
    let (status, _) = engine
        .admin("PUT", &path, Some(json!({"name": "zombie"})))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, refused) = engine
        .admin(
            "POST",
            "/api/admin/billing/user-packages",
            Some(json!({"user_id": 4, "package_id": id, "source": "gift"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{refused}");
    let (status, deducted) = engine
        .deduct(json!({"user_id": 3, "action_key": "advanced_analysis"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{deducted}");
    assert_eq!(deducted["allocations"][0]["user_package_id"], grant);
    assert_eq!(deducted["remaining_credits"], 17);

    // The package's users still list the grant.
    let (status, users) = engine.admin("GET", &format!("{path}/users"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(users["items"][0]["user_id"], 3);
    assert_eq!(users["items"][0]["package_name"], "Starter+");

    let (status, _) = engine
        .admin("GET", "/api/admin/billing/packages/999", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, bad) = engine
        .admin("GET", "/api/admin/billing/packages/abc", None)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad["error"]["field"], "id");
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM billing_events WHERE user_id IS NULL ORDER BY id")
            .fetch_all(&db.sql)
            .await
            .unwrap();
    assert_eq!(
        kinds,
        [
            "billing_package_create",
            "billing_package_update",
            "billing_package_update",
            "billing_package_update",
            "billing_package_delete"
        ]
    );
}
}

backend_tests! {
async fn package_lists_sort_filter_and_page(db: TestDb) {
    let engine = engine_on(&db).await;
    for (n, price) in [(1, 500), (2, 100), (3, 300), (4, 200)] {
        let (status, _) = engine
            .admin(
                "POST",
                "/api/admin/billing/packages",
                Some(json!({"name": format!("P{n}"), "package_type": "permanent", "price_cents": price})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let mut prices = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cursor) => format!(
                "/api/admin/billing/packages?package_type=permanent&sort=price_cents&order=desc&limit=3&cursor={cursor}"
            ),
            None => "/api/admin/billing/packages?package_type=permanent&sort=price_cents&order=desc&limit=3".into(),
        };
        let (status, page) = engine.admin("GET", &path, None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        prices.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|item| item["price_cents"].as_i64().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(prices, [500, 300, 200, 100]);
    for (query, field) in [
        ("sort=name", "sort"),
        ("order=up", "order"),
        ("visible=maybe", "visible"),
        ("limit=501", "limit"),
        ("cursor=00zz", "cursor"),
        ("colour=red", "colour"),
    ] {
        let (status, error) = engine
            .admin("GET", &format!("/api/admin/billing/packages?{query}"), None)
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {error}");
        assert_eq!(error["error"]["field"], field);
    }
}
}

async fn public_package_ids(engine: &TestEngine) -> Vec<i64> {
    let (status, public) = engine.get("/api/billing/packages", None).await;
    assert_eq!(status, StatusCode::OK);
    ids_of(&public)
}

fn ids_of(list: &Value) -> Vec<i64> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_i64().unwrap())
        .collect()
}

backend_tests! {
async fn registering_twice_at_once_assigns_new_user_packages_once(db: TestDb) {
    let engine = engine_on(&db).await;
    let register = || {
        engine.internal(
            "/api/internal/billing/users/registered",
            json!({"user_id": 42}),
        )
    };
    let (first, second) = tokio::join!(register(), register());
    let mut statuses = [first.0, second.0];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::CREATED]);
    let (status, again) = register().await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["newly_registered"], false);
    assert_eq!(again["assigned"], json!([]));

    // The default trial (package 1) once: 10 credits for 30 days.
    let grants: Vec<(i64, String, i64)> = sqlx::query_as(
        "SELECT package_id, source, total_credits FROM user_packages WHERE user_id = 42",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    assert_eq!(grants, [(1, "system".to_owned(), 10)]);
    let (status, checked) = engine
        .check(json!({"user_id": 42, "action_key": "ai_chat"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(checked["remaining_credits"], 10);

    // The same external_ref twice at once assigns once.
    let assign = || {
        engine.admin(
            "POST",
            "/api/admin/billing/user-packages",
            Some(json!({"user_id": 42, "package_id": 2, "source": "purchase", "external_ref": "order-9"})),
        )
    };
    let (first, second) = tokio::join!(assign(), assign());
    let mut statuses = [first.0, second.0];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::CREATED]);
    assert_eq!(first.1["id"], second.1["id"]);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM user_packages WHERE external_ref = 'order-9'"
        )
        .await,
        1
    );
    assert_eq!(remaining_of(&db, 42).await, 110);

    let (status, bad) = engine
        .internal(
            "/api/internal/billing/users/registered",
            json!({"user_id": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad["error"]["field"], "user_id");
}
}

backend_tests! {
async fn grants_activate_and_revoke_through_the_wallet(db: TestDb) {
    let hybrid = create_package(&db, "hybrid", Some(30), Some(10)).await;
    let engine = engine_on(&db).await;
    let pending = engine.grant(5, hybrid, json!({"activate": false})).await;

    // Pending credits cannot be spent.
    let (status, _) = engine
        .deduct(json!({"user_id": 5, "action_key": "ai_chat"}))
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);

    engine.clock.advance(Duration::days(2));
    let (status, active) = engine
        .admin(
            "POST",
            &format!("/api/admin/billing/user-packages/{pending}/activate"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{active}");
    assert_eq!(active["status"], "active");
    let activated_at: DateTime<Utc> = active["activated_at"].as_str().unwrap().parse().unwrap();
    let expires_at: DateTime<Utc> = active["expires_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(activated_at, start_time() + Duration::days(2));
    assert_eq!(expires_at, activated_at + Duration::days(10));
    let (status, again) = engine
        .admin(
            "POST",
            &format!("/api/admin/billing/user-packages/{pending}/activate"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(again["error"]["status"], "active");

    // Spend some, then revoke while deducts are in flight: what remained is void and recorded.
    let deducts =
        (0..5).map(|_| engine.deduct(json!({"user_id": 5, "action_key": "advanced_analysis"})));
    let revoke_path = format!("/api/admin/billing/user-packages/{pending}/revoke");
    let revoke = engine.admin("POST", &revoke_path, Some(json!({"reason": "chargeback"})));
    let (answers, (status, revoked)) = tokio::join!(join_all(deducts), revoke);
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert_eq!(revoked["status"], "revoked");
    assert_eq!(revoked["remaining_credits"], 0);
    let paid = answers
        .iter()
        .filter(|(status, _)| *status == StatusCode::OK)
        .count() as i64;
    assert_eq!(revoked["used_credits"], paid * 3);
    assert_eq!(revoked["expired_credits"], 30 - paid * 3);
    let (status, _) = engine
        .deduct(json!({"user_id": 5, "action_key": "ai_chat"}))
        .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    let (status, twice) = engine
        .admin(
            "POST",
            &format!("/api/admin/billing/user-packages/{pending}/revoke"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(twice["error"]["status"], "revoked");
    let (status, _) = engine
        .admin(
            "POST",
            "/api/admin/billing/user-packages/999999/revoke",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let voided = payloads(
        &db,
        "SELECT CAST(payload AS TEXT) FROM billing_events WHERE kind = 'billing_package_revoke'",
    )
    .await
    .remove(0);
    assert_eq!(voided["voided_credits"], 30 - paid * 3);
    assert_eq!(voided["reason"], "chargeback");
    assert_ledger_balanced(&db).await;

    // The admin sees the user's grants.
    let (status, listed) = engine
        .admin("GET", "/api/admin/users/5/billing-packages", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["items"][0]["status"], "revoked");
}
}

backend_tests! {
async fn users_see_their_own_credits_with_unlimited_grants_as_unlimited(db: TestDb) {
    let credits = create_package(&db, "credits", Some(25), None).await;
    let unlimited = create_package(&db, "duration", None, Some(30)).await;
    let engine = engine_on(&db).await;
    engine.grant(8, credits, json!({})).await;
    engine.grant(9, credits, json!({})).await;
    let (status, summary) = engine
        .get("/api/user/billing/credits", Some(&user_token(8)))
        .await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["user_id"], 8);
    assert_eq!(summary["remaining_credits"], 25);
    assert_eq!(summary["unlimited"], false);

    engine.grant(8, unlimited, json!({"priority": 1})).await;
    let (_, deducted) = engine
        .deduct(json!({"user_id": 8, "action_key": "advanced_analysis"}))
        .await;
    assert_eq!(deducted["credits_cost"], 3);
    let (_, summary) = engine
        .get("/api/user/billing/credits", Some(&user_token(8)))
        .await;
    assert_eq!(summary["unlimited"], true);
    assert_eq!(summary["remaining_credits"], 25);
    let unlimited_grant = summary["grants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|grant| grant["unlimited"] == true)
        .unwrap();
    assert_eq!(unlimited_grant["remaining_credits"], Value::Null);
    assert_eq!(unlimited_grant["total_credits"], Value::Null);
    assert_eq!(unlimited_grant["used_credits"], 3);

    // Once the unlimited grant lapses it shows as expired and stops counting.
    engine.clock.advance(Duration::days(31));
    let (_, summary) = engine
        .get("/api/user/billing/credits", Some(&user_token(8)))
        .await;
    assert_eq!(summary["unlimited"], false);
    let lapsed = summary["grants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|grant| grant["unlimited"] == true)
        .unwrap();
    assert_eq!(lapsed["status"], "expired");

    // Packages list: own grants only; someone else's user_id cannot be asked for.
    let (status, packages) = engine
        .get("/api/user/billing/packages", Some(&user_token(9)))
        .await;
    assert_eq!(status, StatusCode::OK);
    let owners: Vec<i64> = packages["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["user_id"].as_i64().unwrap())
        .collect();
    assert_eq!(owners, [9]);
    let (status, refused) = engine
        .get("/api/user/billing/packages?user_id=8", Some(&user_token(9)))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused["error"]["field"], "user_id");
}
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn a_revoke_racing_a_replayed_deduct_voids_what_the_database_holds(pool: PgPool) {
    // A wallet that remembers one key: older keys are looked up by the writer, so a retry of
    // one is taken from memory first and only found to be a replay at commit.
    let credits = create_package(&pool, "credits", Some(40), None).await;
    let mut settings = settings("postgres://unused");
    settings.idempotency_cache_max = 1;
    let clock = std::sync::Arc::new(credits_engine::clock::ManualClock::new(start_time()));
    let app = credits_engine::app::App::build_with(
        credits_engine::store::postgres::PgStore::db(pool.clone()),
        settings,
        clock.clone(),
    )
    .await
    .unwrap();
    let engine = TestEngine {
        router: app.router(),
        app,
        db: credits_engine::store::postgres::PgStore::db(pool.clone()),
        clock,
    };
    let grant = engine.grant(11, credits, json!({})).await;
    let first = json!({"user_id": 11, "action_key": "advanced_analysis", "idempotency_key": "k1"});
    let (status, original) = engine.deduct(first.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = engine
        .deduct(json!({"user_id": 11, "action_key": "ai_chat", "idempotency_key": "k2"}))
        .await;
    assert_eq!(status, StatusCode::OK);

    let revoke_path = format!("/api/admin/billing/user-packages/{grant}/revoke");
    let ((status, replay), (revoke_status, revoked)) = tokio::join!(
        engine.deduct(first.clone()),
        engine.admin("POST", &revoke_path, None)
    );
    assert_eq!(revoke_status, StatusCode::OK, "{revoked}");
    assert_eq!(revoked["remaining_credits"], 0);
    // Nothing but the two real deductions was ever used; the rest is void, none lost.
    assert_eq!(revoked["used_credits"], 4);
    assert_eq!(revoked["expired_credits"], 36);
    if status == StatusCode::OK {
        assert_eq!(replay["replayed"], true);
        assert_eq!(replay["consumption_id"], original["consumption_id"]);
    } else {
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{replay}");
    }
    assert_eq!(
        count(&pool, "SELECT count(*) FROM consumption_records").await,
        2
    );
    assert_ledger_balanced(&pool).await;
}
