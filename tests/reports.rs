//! The read-only reports against a real PostgreSQL: consumption list, statistics and CSV
//! export, the audit log, the user's own history, and the parameters they refuse.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};

use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use common::*;
use serde_json::{Value, json};
use sqlx::PgPool;

const CONSUMPTION: &str = "/api/admin/billing/consumption";
const STATISTICS: &str = "/api/admin/billing/consumption/statistics";
const EXPORT: &str = "/api/admin/billing/consumption/export";
const EVENTS: &str = "/api/admin/billing/events";
const USER_CONSUMPTION: &str = "/api/user/billing/consumption";

/// Metadata that CSV must quote: a comma, double quotes and a newline.
fn tricky_metadata() -> Value {
    json!({"note": "a, \"quoted\"\nsecond line", "n": 1})
}

/// Three users over three UTC days (2026-01-01 .. 03), with refunds, an idempotency key and
/// metadata that needs quoting. Several records share a timestamp, so the keyset's id
/// tie-break matters.
async fn seeded(db: &TestDb) -> TestEngine {
    let package = create_package(db, "credits", Some(100), None).await;
    let engine = engine_on(db).await;
    for user in [7, 8, 9] {
        engine.grant(user, package, json!({})).await;
    }
    let deduct = |body: Value| {
        let engine = &engine;
        async move {
            let (status, answer) = engine.deduct(body).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            answer["consumption_id"].as_i64().unwrap()
        }
    };
    // Day 1.
    deduct(
        json!({"user_id": 7, "action_key": "ai_chat", "idempotency_key": "order-1",
                  "metadata": tricky_metadata()}),
    )
    .await;
    deduct(json!({"user_id": 7, "action_key": "ai_chat"})).await;
    let refunded = deduct(json!({"user_id": 8, "action_key": "advanced_analysis"})).await;
    deduct(json!({"user_id": 9, "action_key": "pdf_export", "quantity": 2})).await;
    // Day 2.
    engine.clock.advance(Duration::hours(25));
    deduct(json!({"user_id": 7, "action_key": "advanced_analysis", "metadata": {"k": "v"}})).await;
    deduct(json!({"user_id": 8, "action_key": "ai_chat", "idempotency_key": "k,\"2\""})).await;
    let (status, answer) = engine
        .refund(json!({"consumption_id": refunded, "reason": "failed job"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // Day 3.
    engine.clock.advance(Duration::hours(25));
    deduct(json!({"user_id": 9, "action_key": "resume_optimize"})).await;
    let refunded = deduct(json!({"user_id": 7, "action_key": "ai_chat", "quantity": 3})).await;
    deduct(json!({"user_id": 8, "action_key": "advanced_analysis", "quantity": 2})).await;
    let (status, answer) = engine.refund(json!({"consumption_id": refunded})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    engine
}

/// Every page of a list, following `next_cursor`; asserts no item shows twice.
async fn all_pages(engine: &TestEngine, path: &str, token: &str) -> Vec<Value> {
    let separator = if path.contains('?') { '&' } else { '?' };
    let mut items: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let url = match &cursor {
            Some(cursor) => format!("{path}{separator}cursor={cursor}"),
            None => path.to_owned(),
        };
        let (status, page) = engine.get(&url, Some(token)).await;
        assert_eq!(status, StatusCode::OK, "{url}: {page}");
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let ids: HashSet<i64> = items
        .iter()
        .map(|item| item["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), items.len(), "an item showed twice: {path}");
    items
}

fn ids(items: &[Value]) -> Vec<i64> {
    items
        .iter()
        .map(|item| item["id"].as_i64().unwrap())
        .collect()
}

/// Consumption ids newest first, as SQL selects them with `condition`.
async fn sql_ids<'a>(db: impl Into<SqlRef<'a>>, condition: &str) -> Vec<i64> {
    db.into()
        .ids(&format!(
            "SELECT id FROM consumption_records WHERE {condition} ORDER BY created_at DESC, id DESC"
        ))
        .await
}

fn time(value: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(value.as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc)
}

backend_tests! {
async fn admin_list_pages_every_row_once_and_filters_like_sql(db: TestDb) {
    let engine = seeded(&db).await;
    let admin = admin_token();

    let everything = all_pages(&engine, &format!("{CONSUMPTION}?limit=2"), &admin).await;
    assert_eq!(everything.len(), 9);
    assert_eq!(ids(&everything), sql_ids(&db, "true").await);
    let times: Vec<DateTime<Utc>> = everything.iter().map(|i| time(&i["created_at"])).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");
    // One page of 500 is the same list.
    let (_, one_page) = engine
        .admin("GET", &format!("{CONSUMPTION}?limit=500"), None)
        .await;
    assert_eq!(one_page["next_cursor"], Value::Null);
    assert_eq!(ids(one_page["items"].as_array().unwrap()), ids(&everything));

    let filters = [
        ("user_id=7", "user_id = 7"),
        ("action_key=ai_chat", "action_key = 'ai_chat'"),
        ("status=refunded", "status = 'refunded'"),
        ("status=completed", "status = 'completed'"),
        (
            "from=2026-01-02T00:00:00Z&to=2026-01-03T00:00:00Z",
            "created_at >= '2026-01-02T00:00:00+00:00' AND created_at < '2026-01-03T00:00:00+00:00'",
        ),
        (
            "user_id=7&action_key=ai_chat&from=2026-01-01T00:00:00Z",
            "user_id = 7 AND action_key = 'ai_chat' AND created_at >= '2026-01-01T00:00:00+00:00'",
        ),
        ("user_id=12345", "user_id = 12345"),
    ];
    for (query, condition) in filters {
        let items = all_pages(&engine, &format!("{CONSUMPTION}?limit=1&{query}"), &admin).await;
        assert_eq!(ids(&items), sql_ids(&db, condition).await, "{query}");
    }
    let refunded = all_pages(&engine, &format!("{CONSUMPTION}?status=refunded"), &admin).await;
    assert_eq!(refunded.len(), 2);

    // Each item carries its record's fields and allocations as stored.
    let first_key = everything
        .iter()
        .find(|item| item["idempotency_key"] == "order-1")
        .unwrap();
    assert_eq!(first_key["metadata"], tricky_metadata());
    assert_eq!(first_key["user_id"], 7);
    assert_eq!(first_key["credits_cost"], 1);
    assert_eq!(first_key["price_version"], 1);
    let refunded_3 = everything
        .iter()
        .find(|item| item["status"] == "refunded" && item["quantity"] == 3)
        .unwrap();
    assert_eq!(refunded_3["refunded_credits"], 3);
    assert_eq!(refunded_3["unit_cost"], 1);
    assert!(refunded_3["refunded_at"].is_string());
    for item in &everything {
        let allocations = item["allocations"].as_array().unwrap();
        assert_eq!(allocations.len(), 1, "{item}");
        let allocated: i64 = allocations
            .iter()
            .map(|a| a["credits"].as_i64().unwrap())
            .sum();
        let refunded: i64 = allocations
            .iter()
            .map(|a| a["refunded_credits"].as_i64().unwrap())
            .sum();
        assert_eq!(allocated, item["credits_cost"].as_i64().unwrap());
        assert_eq!(refunded, item["refunded_credits"].as_i64().unwrap());
        let stored: i64 = sqlx::query_scalar(
            "SELECT user_package_id FROM consumption_allocations WHERE consumption_id = $1",
        )
        .bind(item["id"].as_i64().unwrap())
        .fetch_one(&db.sql)
        .await
        .unwrap();
        assert_eq!(allocations[0]["user_package_id"], stored);
    }
}
}

backend_tests! {
async fn csv_export_parses_back_into_the_rows_of_the_list(db: TestDb) {
    let engine = seeded(&db).await;
    let admin = admin_token();
    for query in ["", "?user_id=7", "?status=refunded&action_key=ai_chat"] {
        let answer = call(
            &engine.router,
            "GET",
            &format!("{EXPORT}{query}"),
            Some(&admin),
            None,
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(
            answer.headers["content-type"], "text/csv; charset=utf-8",
            "{query}"
        );
        assert_eq!(
            answer.headers["content-disposition"],
            "attachment; filename=\"consumption.csv\""
        );
        let text = answer.text();

        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        assert_eq!(
            header,
            [
                "id",
                "user_id",
                "action_key",
                "quantity",
                "unit_cost",
                "credits_cost",
                "price_version",
                "idempotency_key",
                "status",
                "refunded_credits",
                "forfeited_credits",
                "created_at",
                "metadata"
            ]
        );
        let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        let listed = all_pages(&engine, &format!("{CONSUMPTION}{query}"), &admin).await;
        assert!(!listed.is_empty(), "{query}");
        assert_eq!(records.len(), listed.len(), "{query}");
        for (record, item) in records.iter().zip(&listed) {
            for (index, field) in [
                "id",
                "user_id",
                "quantity",
                "unit_cost",
                "credits_cost",
                "price_version",
                "refunded_credits",
                "forfeited_credits",
            ]
            .iter()
            .enumerate()
            {
                let column = header.iter().position(|name| name == field).unwrap();
                assert_eq!(
                    record[column].parse::<i64>().unwrap(),
                    item[*field].as_i64().unwrap(),
                    "{field} of {item} (#{index})"
                );
            }
            assert_eq!(record[2], *item["action_key"].as_str().unwrap());
            assert_eq!(record[7], *item["idempotency_key"].as_str().unwrap_or(""));
            assert_eq!(record[8], *item["status"].as_str().unwrap());
            assert_eq!(
                DateTime::parse_from_rfc3339(&record[11]).unwrap(),
                time(&item["created_at"])
            );
            let metadata = if record[12].is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&record[12]).unwrap()
            };
            assert_eq!(metadata, item["metadata"]);
        }
    }

    // The tricky values survived the round trip.
    let text = call(&engine.router, "GET", EXPORT, Some(&admin), None)
        .await
        .text();
    // A key with a comma and quotes is quoted, its quotes doubled. Metadata is compact JSON,
    // whose own escapes (\" and \n) come through with the backslash kept and the quote doubled.
    assert!(text.contains(r#","k,""2""","#), "{text}");
    assert!(text.contains(r#"\""quoted\""\nsecond line"#), "{text}");
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let keyed: Vec<csv::StringRecord> = reader
        .records()
        .map(Result::unwrap)
        .filter(|record| !record[7].is_empty())
        .collect();
    let keys: BTreeSet<&str> = keyed.iter().map(|record| &record[7]).collect();
    assert_eq!(keys, BTreeSet::from(["k,\"2\"", "order-1"]));
    let order_1 = keyed.iter().find(|record| &record[7] == "order-1").unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&order_1[12]).unwrap(),
        tricky_metadata()
    );

    // An export with nothing to show is just the header.
    let empty = call(
        &engine.router,
        "GET",
        &format!("{EXPORT}?user_id=4242"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(empty.status, StatusCode::OK);
    assert_eq!(empty.text().lines().count(), 1);
}
}

/// Sums of list items by a key, as the statistics should report them.
fn expected_groups(items: &[Value], key: impl Fn(&Value) -> String) -> BTreeMap<String, Value> {
    let mut groups: BTreeMap<String, (i64, i64, i64, BTreeSet<i64>)> = BTreeMap::new();
    for item in items {
        let group = groups.entry(key(item)).or_default();
        group.0 += 1;
        group.1 += item["credits_cost"].as_i64().unwrap();
        group.2 += item["refunded_credits"].as_i64().unwrap();
        group.3.insert(item["user_id"].as_i64().unwrap());
    }
    groups
        .into_iter()
        .map(|(key, (records, credits, refunded, users))| {
            (
                key,
                json!({"records": records, "credits": credits, "refunded_credits": refunded,
                       "net_credits": credits - refunded, "distinct_users": users.len()}),
            )
        })
        .collect()
}

fn sums(value: &Value) -> Value {
    json!({
        "records": value["records"],
        "credits": value["credits"],
        "refunded_credits": value["refunded_credits"],
        "net_credits": value["net_credits"],
        "distinct_users": value["distinct_users"],
    })
}

backend_tests! {
async fn statistics_agree_with_the_rows_they_summarise(db: TestDb) {
    let engine = seeded(&db).await;
    let admin = admin_token();

    for filter in [
        "",
        "&user_id=7",
        "&from=2026-01-02T00:00:00Z",
        "&from=2026-01-01T00:00:00Z&to=2026-01-03T00:00:00Z",
        "&action_key=advanced_analysis",
    ] {
        let items = all_pages(&engine, &format!("{CONSUMPTION}?limit=500{filter}"), &admin).await;
        let overall = expected_groups(&items, |_| String::new());
        let overall = overall.get("").cloned().unwrap_or_else(
            || json!({"records": 0, "credits": 0, "refunded_credits": 0, "net_credits": 0, "distinct_users": 0}),
        );

        // By day (the default), ascending.
        let (status, by_day) = engine
            .admin("GET", &format!("{STATISTICS}?group_by=day{filter}"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{by_day}");
        assert_eq!(by_day["group_by"], "day");
        assert_eq!(by_day["truncated"], false);
        let expected = expected_groups(&items, |item| {
            time(&item["created_at"]).date_naive().to_string()
        });
        let days: Vec<&str> = by_day["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["day"].as_str().unwrap())
            .collect();
        assert_eq!(
            days,
            expected.keys().map(String::as_str).collect::<Vec<_>>()
        );
        for group in by_day["items"].as_array().unwrap() {
            assert_eq!(
                sums(group),
                expected[group["day"].as_str().unwrap()],
                "{filter}"
            );
            assert!(group.get("action_key").is_none());
        }
        assert_eq!(sums(&by_day["totals"]), overall, "{filter}");
        let (_, default) = engine
            .admin("GET", &format!("{STATISTICS}?{filter}"), None)
            .await;
        assert_eq!(default["items"], by_day["items"]);

        // By action: most credits first, then action_key.
        let (status, by_action) = engine
            .admin(
                "GET",
                &format!("{STATISTICS}?group_by=action{filter}"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{by_action}");
        assert_eq!(by_action["group_by"], "action");
        let expected = expected_groups(&items, |item| {
            item["action_key"].as_str().unwrap().to_owned()
        });
        let mut order: Vec<(i64, String)> = expected
            .iter()
            .map(|(key, sums)| (-sums["credits"].as_i64().unwrap(), key.clone()))
            .collect();
        order.sort();
        let actions: Vec<String> = by_action["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["action_key"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            actions,
            order.into_iter().map(|(_, key)| key).collect::<Vec<_>>()
        );
        for group in by_action["items"].as_array().unwrap() {
            assert_eq!(sums(group), expected[group["action_key"].as_str().unwrap()]);
        }
        assert_eq!(sums(&by_action["totals"]), overall, "{filter}");
    }

    // The seeded data, spelled out: day 2 had 2 records (4 credits) by 2 users, and the day-1
    // refund happened on day 2 but belongs to its day-1 record.
    let (_, by_day) = engine.admin("GET", STATISTICS, None).await;
    assert_eq!(
        by_day["items"][1],
        json!({"day": "2026-01-02", "records": 2, "credits": 4, "refunded_credits": 0,
               "net_credits": 4, "distinct_users": 2})
    );
    assert_eq!(by_day["items"][0]["refunded_credits"], 3);
    // Distinct users over the whole range is 3, not the sum of the days' 3 + 2 + 3.
    assert_eq!(by_day["totals"]["distinct_users"], 3);
    assert_eq!(by_day["totals"]["records"], 9);
    assert_eq!(by_day["totals"]["credits"], 21);
    assert_eq!(by_day["totals"]["refunded_credits"], 6);
    assert_eq!(by_day["totals"]["net_credits"], 15);
    let sql_total: i64 = count(
        &db,
        "SELECT CAST(SUM(credits_cost) AS BIGINT) FROM consumption_records",
    )
    .await;
    assert_eq!(by_day["totals"]["credits"], sql_total);
}
}

backend_tests! {
async fn events_list_filters_by_kind_and_user_and_pages(db: TestDb) {
    let engine = seeded(&db).await;
    let admin = admin_token();

    let everything = all_pages(&engine, &format!("{EVENTS}?limit=3"), &admin).await;
    let sql: Vec<i64> = sqlx::query_scalar("SELECT id FROM billing_events ORDER BY id DESC")
        .fetch_all(&db.sql)
        .await
        .unwrap();
    assert_eq!(ids(&everything), sql);

    let deducts = all_pages(
        &engine,
        &format!("{EVENTS}?kind=billing_credits_deduct&limit=2"),
        &admin,
    )
    .await;
    assert_eq!(deducts.len(), 9, "one event per deduction");
    assert!(
        deducts
            .iter()
            .all(|e| e["kind"] == "billing_credits_deduct")
    );
    let assigns = all_pages(
        &engine,
        &format!("{EVENTS}?kind=billing_package_assign"),
        &admin,
    )
    .await;
    assert_eq!(assigns.len(), 3, "one per grant");
    let users: BTreeSet<i64> = assigns
        .iter()
        .map(|e| e["user_id"].as_i64().unwrap())
        .collect();
    assert_eq!(users, BTreeSet::from([7, 8, 9]));

    let user_8 = all_pages(
        &engine,
        &format!("{EVENTS}?kind=billing_credits_deduct&user_id=8&limit=1"),
        &admin,
    )
    .await;
    let sql: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM billing_events WHERE kind = 'billing_credits_deduct' AND user_id = 8
         ORDER BY id DESC",
    )
    .fetch_all(&db.sql)
    .await
    .unwrap();
    assert_eq!(ids(&user_8), sql);
    assert_eq!(user_8.len(), 3);
    assert!(
        user_8
            .iter()
            .all(|e| e["payload"].is_object() && e["created_at"].is_string())
    );

    // Day 3 only: its three deductions and one refund.
    let day_3 = all_pages(
        &engine,
        &format!("{EVENTS}?from=2026-01-03T00:00:00Z&to=2026-01-04T00:00:00Z"),
        &admin,
    )
    .await;
    let kinds: Vec<&str> = day_3.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "billing_credits_deduct")
            .count(),
        3
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == "billing_consumption_refund")
            .count(),
        1
    );

    let (status, nothing) = engine
        .admin("GET", &format!("{EVENTS}?kind=no_such_kind"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(nothing["items"], json!([]));
}
}

backend_tests! {
async fn a_user_sees_only_their_own_consumption(db: TestDb) {
    let engine = seeded(&db).await;
    let token = user_token(7);

    let mine = all_pages(&engine, &format!("{USER_CONSUMPTION}?limit=2"), &token).await;
    assert_eq!(ids(&mine), sql_ids(&db, "user_id = 7").await);
    assert_eq!(mine.len(), 4);
    assert!(mine.iter().all(|item| item["user_id"] == 7));
    assert!(mine.iter().all(|item| item["allocations"].is_array()));
    let chats = all_pages(
        &engine,
        &format!("{USER_CONSUMPTION}?action_key=ai_chat&from=2026-01-02T00:00:00Z"),
        &token,
    )
    .await;
    assert_eq!(
        ids(&chats),
        sql_ids(
            &db,
            "user_id = 7 AND action_key = 'ai_chat' AND created_at >= '2026-01-02T00:00:00+00:00'"
        )
        .await
    );
    assert_eq!(chats.len(), 1);

    let (status, body) = engine
        .get(&format!("{USER_CONSUMPTION}?user_id=8"), Some(&token))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["field"], "user_id");
    let (status, _) = engine.get(USER_CONSUMPTION, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The admin reports are not for users.
    let (status, _) = engine.get(CONSUMPTION, Some(&token)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = engine.get(EXPORT, Some(&token)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}
}

backend_tests! {
async fn bad_parameters_are_422_naming_the_parameter(db: TestDb) {
    let engine = engine_on(&db).await;
    let admin = admin_token();
    let forged = hex::encode("not-a-cursor");
    let reversed = "from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z";
    let mut cases: Vec<(String, &str)> = Vec::new();
    for list in [CONSUMPTION, EVENTS, USER_CONSUMPTION] {
        cases.extend([
            (format!("{list}?limit=0"), "limit"),
            (format!("{list}?limit=501"), "limit"),
            (format!("{list}?limit=ten"), "limit"),
            (format!("{list}?{reversed}"), "to"),
            (format!("{list}?cursor={forged}"), "cursor"),
            (format!("{list}?cursor=zz"), "cursor"),
            (format!("{list}?sort=id"), "sort"),
            (format!("{list}?from=yesterday"), "from"),
        ]);
    }
    cases.extend([
        (format!("{CONSUMPTION}?status=pending"), "status"),
        (format!("{CONSUMPTION}?user_id=0"), "user_id"),
        (format!("{CONSUMPTION}?action_key=AI%20chat"), "action_key"),
        (format!("{STATISTICS}?group_by=week"), "group_by"),
        (format!("{STATISTICS}?from=2026-13-01"), "from"),
        (format!("{STATISTICS}?{reversed}"), "to"),
        (format!("{STATISTICS}?limit=10"), "limit"),
        (
            format!("{STATISTICS}?from=2020-01-01T00:00:00Z&to=2026-01-01T00:00:00Z"),
            "to",
        ),
        (format!("{EXPORT}?limit=10"), "limit"),
        (format!("{EXPORT}?cursor={forged}"), "cursor"),
        (format!("{EXPORT}?{reversed}"), "to"),
        (format!("{EXPORT}?status=lost"), "status"),
        (format!("{EVENTS}?kind=Deduct!"), "kind"),
        (format!("{EVENTS}?kind={}", "a".repeat(65)), "kind"),
        (format!("{EVENTS}?user_id=-3"), "user_id"),
    ]);
    for (path, field) in cases {
        let token = if path.starts_with(USER_CONSUMPTION) {
            user_token(7)
        } else {
            admin.clone()
        };
        let answer = call(&engine.router, "GET", &path, Some(&token), None).await;
        assert_eq!(
            answer.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path}: {}",
            answer.text()
        );
        let body = answer.json();
        assert_eq!(body["error"]["code"], "invalid_field", "{path}");
        assert_eq!(body["error"]["field"], field, "{path}: {body}");
    }
}
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn a_large_export_streams_every_row_across_chunks(pool: PgPool) {
    // 1,234 records straight in the table (more than two chunks of 500 rows), several sharing
    // a second, so the order's id tie-break is exercised too.
    sqlx::query(
        "INSERT INTO consumption_records (user_id, id, action_key, quantity, unit_cost,
             credits_cost, price_version, request_fingerprint, remaining_after, metadata,
             created_at)
         SELECT 5, 100000 + g, 'ai_chat', 1, 1, 1, 1, 'fp', 0, jsonb_build_object('g', g),
                '2026-01-01T00:00:00Z'::timestamptz + (g / 3) * interval '1 second'
         FROM generate_series(1, 1234) AS g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let engine = engine(pool.clone()).await;
    let answer = call(&engine.router, "GET", EXPORT, Some(&admin_token()), None).await;
    assert_eq!(answer.status, StatusCode::OK);
    let text = answer.text();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let exported: Vec<i64> = reader
        .records()
        .map(|record| record.unwrap()[0].parse().unwrap())
        .collect();
    assert_eq!(exported, sql_ids(&pool, "true").await);
    assert_eq!(exported.len(), 1234);
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn a_database_failure_mid_export_truncates_the_transfer(pool: PgPool) {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    // Far more rows than the channel buffers and the sockets hold, so the export is still
    // reading from PostgreSQL when its connection is killed.
    sqlx::query(
        "INSERT INTO consumption_records (user_id, id, action_key, quantity, unit_cost,
             credits_cost, price_version, request_fingerprint, remaining_after, metadata,
             created_at)
         SELECT 5, g, 'ai_chat', 1, 1, 1, 1, 'fp', 0, jsonb_build_object('pad', repeat('x', 200)),
                '2026-01-01T00:00:00Z'::timestamptz + g * interval '1 second'
         FROM generate_series(1, 60000) AS g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let engine = engine(pool.clone()).await;
    let request = Request::get(EXPORT)
        .header("authorization", format!("Bearer {}", admin_token()))
        .body(Body::empty())
        .unwrap();
    let response = engine.router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(
        first
            .data_ref()
            .is_some_and(|data| data.starts_with(b"id,"))
    );

    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND query LIKE 'SELECT id, user_id, action_key%ORDER BY created_at DESC%') AS killed",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(terminated, 1, "the export's connection was found");

    let mut rows = 0usize;
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                rows += frame
                    .data_ref()
                    .map_or(0, |data| data.iter().filter(|b| **b == b'\n').count())
            }
            Some(Err(_)) => break,
            None => panic!("the body ended cleanly after {rows} more rows: a silently short file"),
        }
    }
    assert!(rows < 60_000);
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn exports_beyond_the_concurrent_limit_are_503(pool: PgPool) {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    // Enough rows that an unread export fills its channel and keeps its slot.
    sqlx::query(
        "INSERT INTO consumption_records (user_id, id, action_key, quantity, unit_cost,
             credits_cost, price_version, request_fingerprint, remaining_after, created_at)
         SELECT 5, g, 'ai_chat', 1, 1, 1, 1, 'fp', 0,
                '2026-01-01T00:00:00Z'::timestamptz + g * interval '1 second'
         FROM generate_series(1, 5000) AS g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let engine = engine(pool.clone()).await;
    let start = || {
        let request = Request::get(EXPORT)
            .header("authorization", format!("Bearer {}", admin_token()))
            .body(Body::empty())
            .unwrap();
        engine.router.clone().oneshot(request)
    };
    let mut running = Vec::new();
    for _ in 0..2 {
        let response = start().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        let lines = frame
            .data_ref()
            .unwrap()
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        running.push((body, lines));
    }
    let (status, refused) = engine.admin("GET", EXPORT, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{refused}");
    assert_eq!(refused["error"]["code"], "overloaded");
    // A finished export gives its slot back.
    let (body, lines) = running.remove(0);
    let rest = body.collect().await.unwrap().to_bytes();
    let lines = lines + rest.iter().filter(|b| **b == b'\n').count();
    assert_eq!(lines, 1 + 5000, "the header and every row");
    let third = call(&engine.router, "GET", EXPORT, Some(&admin_token()), None).await;
    assert_eq!(third.status, StatusCode::OK);
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn the_audit_logs_kind_rule_is_the_same_after_its_cheaper_check(pool: PgPool) {
    // Migration 0004 rewrote `kind ~ '^[a-z_]{1,64}$'` as a length test and an unbounded
    // class. The kinds it accepts and refuses are the same: both rules side by side, then the
    // check in force.
    let accepted = ["a", "_", "billing_credits_deduct", &"z".repeat(64)];
    let refused = [
        "",
        "Billing",
        "billing-credits",
        "billing credits",
        "billing\ncredits",
        "billing_credits_deduct\n",
        "é",
        &"z".repeat(65),
    ];
    for kind in accepted.iter().chain(&refused) {
        let (old_rule, new_rule): (bool, bool) = sqlx::query_as(
            "SELECT $1 ~ '^[a-z_]{1,64}$', char_length($1) <= 64 AND $1 ~ '^[a-z_]+$'",
        )
        .bind(kind)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(old_rule, accepted.contains(kind), "{kind:?}");
        assert_eq!(new_rule, old_rule, "{kind:?}");
        let inserted = sqlx::query("INSERT INTO billing_events (kind) VALUES ($1)")
            .bind(kind)
            .execute(&pool)
            .await;
        match inserted {
            Ok(_) => assert!(accepted.contains(kind), "{kind:?} was accepted"),
            Err(error) => {
                assert!(refused.contains(kind), "{kind:?} was refused: {error}");
                let code = error.as_database_error().and_then(|e| e.code());
                assert_eq!(code.as_deref(), Some("23514"), "{kind:?}: {error}");
            }
        }
    }
    let stored: Vec<String> = sqlx::query_scalar("SELECT kind FROM billing_events ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(stored, accepted);
}
