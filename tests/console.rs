//! The console's pages through the router, as a browser would send them (cookies, urlencoded
//! forms): sign-in, CSRF, who sees what, and the operators' forms end to end against the
//! database. `console_browser.rs` drives the same pages in a real browser.

#[macro_use]
mod common;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::{Answer, TestDb, TestEngine};
use http_body_util::BodyExt;
use serde_json::json;
use sqlx::PgPool;
use tower::ServiceExt;

/// A signed-in browser: the session cookie, and the CSRF token its pages carry.
struct Browser {
    router: Router,
    cookie: Option<String>,
}

impl Browser {
    fn anonymous(engine: &TestEngine) -> Browser {
        Browser {
            router: engine.router.clone(),
            cookie: None,
        }
    }

    async fn signed_in(engine: &TestEngine, token: &str) -> Browser {
        let mut browser = Browser::anonymous(engine);
        let answer = browser
            .send("POST", "/console/login", Some(&form(&[("token", token)])))
            .await;
        assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.text());
        let set_cookie = answer.headers[header::SET_COOKIE].to_str().unwrap();
        browser.cookie = Some(set_cookie.split(';').next().unwrap().to_owned());
        browser
    }

    async fn send(&self, method: &str, path: &str, form: Option<&str>) -> Answer {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(cookie) = &self.cookie {
            request = request.header(header::COOKIE, cookie);
        }
        let request = match form {
            Some(form) => request
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(form.to_owned())),
            None => request.body(Body::empty()),
        }
        .unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body: body.to_vec(),
        }
    }

    async fn get(&self, path: &str) -> Answer {
        self.send("GET", path, None).await
    }

    /// Submits a form from `page` (whose CSRF token it carries, as the page's forms do).
    async fn submit(&self, page: &str, action: &str, fields: &[(&str, &str)]) -> Answer {
        let shown = self.get(page).await;
        assert_eq!(shown.status, StatusCode::OK, "{}", shown.text());
        let csrf = csrf_of(&shown.text());
        let mut fields = fields.to_vec();
        fields.push(("csrf", &csrf));
        self.send("POST", action, Some(&form(&fields))).await
    }
}

fn form(fields: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(fields).unwrap()
}

fn csrf_of(page: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = page
        .find(marker)
        .expect("the page has a form with a CSRF token")
        + marker.len();
    page[start..start + 64].to_owned()
}

fn location(answer: &Answer) -> &str {
    answer.headers[header::LOCATION].to_str().unwrap()
}

backend_tests! {
async fn visitors_sign_in_with_a_token_kept_in_a_strict_http_only_cookie(db: TestDb) {
    let engine = common::engine_on(&db).await;
    let anonymous = Browser::anonymous(&engine);

    let sent = anonymous.get("/console/packages?visible=true").await;
    assert_eq!(sent.status, StatusCode::SEE_OTHER);
    assert_eq!(
        location(&sent),
        "/console/login?next=%2Fconsole%2Fpackages%3Fvisible%3Dtrue"
    );
    let sent = anonymous.get("/me/consumption").await;
    assert_eq!(location(&sent), "/me/login?next=%2Fme%2Fconsumption");

    let refused = anonymous
        .send(
            "POST",
            "/console/login",
            Some(&form(&[("token", "nonsense")])),
        )
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(
        refused.text().contains("invalid token"),
        "{}",
        refused.text()
    );
    assert!(!refused.headers.contains_key(header::SET_COOKIE));

    // A valid admin token: the cookie, and back to where they were going: only console pages,
    // on this site, whole path segments, nothing a header cannot carry.
    let admin = common::admin_token();
    for (next, expected) in [
        ("/console/events", "/console/events"),
        ("https://evil.example/", "/console"),
        ("//evil.example/console", "/console"),
        ("/metrics", "/console"),
        ("/console/prices\n", "/console"),
        ("/mexico", "/console"),
        ("/console\\evil", "/console"),
    ] {
        let signed_in = anonymous
            .send(
                "POST",
                "/console/login",
                Some(&form(&[("token", &admin), ("next", next)])),
            )
            .await;
        assert_eq!(signed_in.status, StatusCode::SEE_OTHER);
        assert_eq!(location(&signed_in), expected, "next = {next:?}");
        let cookie = signed_in.headers[header::SET_COOKIE].to_str().unwrap();
        assert!(cookie.starts_with(&format!("credits_session={admin};")));
        for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(cookie.contains(attribute), "{cookie}");
        }
        let max_age: i64 = cookie.split("Max-Age=").nth(1).unwrap().parse().unwrap();
        assert!(
            (3590..=3600).contains(&max_age),
            "expires with the token: {cookie}"
        );
    }

    // Behind a TLS-terminating proxy the cookie is also Secure; over plain HTTP it cannot be.
    assert!(
        !anonymous
            .send("POST", "/console/login", Some(&form(&[("token", &admin)])))
            .await
            .headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Secure")
    );
    let behind_tls = Request::post("/console/login")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .body(Body::from(form(&[("token", &admin)])))
        .unwrap();
    let response = engine.router.clone().oneshot(behind_tls).await.unwrap();
    assert!(
        response.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .ends_with("; Secure")
    );

    // A sign-in another site makes the browser send is refused (login CSRF).
    let cross_site = Request::post("/console/login")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header("sec-fetch-site", "cross-site")
        .body(Body::from(form(&[("token", &admin)])))
        .unwrap();
    let response = engine.router.clone().oneshot(cross_site).await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(!response.headers().contains_key(header::SET_COOKIE));
    // A form sent after the session ended comes back to the start, not to its POST target.
    let expired = anonymous
        .send("POST", "/console/users/5/grants/1/revoke", Some(""))
        .await;
    assert_eq!(location(&expired), "/console/login?next=%2Fconsole");

    // A user's token goes to their own page, and the console refuses it.
    let user = Browser::signed_in(&engine, &common::user_token(7)).await;
    let console = user.get("/console/prices").await;
    assert_eq!(console.status, StatusCode::FORBIDDEN);
    assert!(console.text().contains("admin role"));
    let home = user.get("/console").await;
    assert_eq!(location(&home), "/me");

    // Every page is framed by nobody and cached by nobody.
    let page = user.get("/me").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.headers[header::X_FRAME_OPTIONS], "DENY");
    assert_eq!(page.headers[header::CACHE_CONTROL], "private, no-store");
    assert!(
        page.headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );

    // Signing out clears the cookie.
    let out = user.submit("/me", "/console/logout", &[]).await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert!(
        out.headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    engine.stop().await;
}
}

backend_tests! {
async fn a_form_without_its_sessions_csrf_token_changes_nothing(db: TestDb) {
    let engine = common::engine_on(&db).await;
    let admin = Browser::signed_in(&engine, &common::admin_token()).await;
    let fields = [
        ("action_key", "forged"),
        ("name", "Forged"),
        ("credits_cost", "5"),
        ("enabled", "on"),
    ];

    let missing = admin
        .send("POST", "/console/prices", Some(&form(&fields)))
        .await;
    assert_eq!(missing.status, StatusCode::FORBIDDEN);
    // Another session's token (another admin's page) does not fit this session either.
    let other = Browser::signed_in(&engine, &common::user_token(9)).await;
    let foreign = csrf_of(&other.get("/me").await.text());
    let mut with_foreign = fields.to_vec();
    with_foreign.push(("csrf", &foreign));
    let forged = admin
        .send("POST", "/console/prices", Some(&form(&with_foreign)))
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert!(forged.text().contains("Reload the page"));
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM action_prices WHERE action_key = 'forged'")
            .fetch_one(&db.sql)
            .await
            .unwrap();
    assert_eq!(count, 0);

    let created = admin
        .submit("/console/prices", "/console/prices", &fields)
        .await;
    assert_eq!(created.status, StatusCode::SEE_OTHER);
    assert_eq!(location(&created), "/console/prices?done=price_created");
    let listed = admin.get(location(&created)).await.text();
    assert!(listed.contains("The action price was created."));
    assert!(listed.contains("data-action-key=\"forged\""));
    engine.stop().await;
}
}

backend_tests! {
async fn a_user_page_shows_only_that_users_data(db: TestDb) {
    let package = common::create_package(&db, "credits", Some(40), None).await;
    let engine = common::engine_on(&db).await;
    for user in [7, 8] {
        engine
            .grant(user, package, json!({ "note": format!("for {user}") }))
            .await;
        let (status, _) = engine
            .deduct(
                json!({"user_id": user, "action_key": "ai_chat", "quantity": user,
                "idempotency_key": format!("key-of-user-{user}")}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let user = Browser::signed_in(&engine, &common::user_token(7)).await;

    let credits = user.get("/me").await.text();
    assert!(credits.contains(">33<"), "40 - 7 remaining: {credits}");
    assert!(!credits.contains(">32<"), "not user 8's balance");
    // A user id in the query is not a filter the page takes: still only user 7's history.
    let history = user.get("/me/consumption?user_id=8").await.text();
    assert!(history.contains("ai_chat"));
    assert!(!history.contains("key-of-user-8"));
    let packages = user.get("/me/packages").await;
    assert_eq!(packages.status, StatusCode::OK);

    // A bad date is shown next to its field, not as a failure of the page.
    let bad = user.get("/me/consumption?from=yesterday").await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(bad.text().contains("must be a date, YYYY-MM-DD"));
    engine.stop().await;
}
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn operators_manage_packages_and_grants_through_forms(pool: PgPool) {
    let engine = common::engine(pool.clone()).await;
    let admin = Browser::signed_in(&engine, &common::admin_token()).await;
    let package_fields = [
        ("name", "Starter"),
        ("package_type", "credits"),
        ("credits_amount", "30"),
        ("price_cents", "990"),
        ("visible", "on"),
    ];

    // A package whose credits are not a number: named, and nothing saved.
    let mut bad = package_fields.to_vec();
    bad[2] = ("credits_amount", "thirty");
    let refused = admin
        .submit("/console/packages", "/console/packages", &bad)
        .await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(refused.text().contains("field-credits_amount\""));
    assert!(
        refused.text().contains("value=\"thirty\""),
        "the form keeps what was typed"
    );
    let starters = || async {
        sqlx::query_as::<_, (i64, String, bool, Option<chrono::DateTime<chrono::Utc>>)>(
            "SELECT id, name, visible, deleted_at FROM packages WHERE name LIKE 'Starter%'",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    assert!(starters().await.is_empty());

    let created = admin
        .submit("/console/packages", "/console/packages", &package_fields)
        .await;
    assert_eq!(location(&created), "/console/packages?done=package_created");
    let id = starters().await[0].0;
    let page = format!("/console/packages/{id}");

    let mut renamed = package_fields.to_vec();
    renamed[0] = ("name", "Starter plus");
    let saved = admin.submit(&page, &page, &renamed).await;
    assert_eq!(location(&saved), "/console/packages?done=package_updated");
    let hidden = admin
        .submit(
            "/console/packages",
            &format!("/console/packages/{id}/visibility"),
            &[("visible", "false")],
        )
        .await;
    assert_eq!(hidden.status, StatusCode::SEE_OTHER);
    let (_, name, visible, deleted_at) = starters().await.remove(0);
    assert_eq!(
        (name.as_str(), visible, deleted_at),
        ("Starter plus", false, None)
    );

    // Assign it pending, activate it, revoke it.
    let user_page = "/console/users?user_id=31";
    let package_id = id.to_string();
    let assigned = admin
        .submit(
            user_page,
            "/console/users/31/grants",
            &[
                ("package_id", &package_id),
                ("source", "purchase"),
                ("external_ref", "order-1"),
            ],
        )
        .await;
    assert_eq!(
        location(&assigned),
        "/console/users?user_id=31&done=grant_assigned"
    );
    let grant = || async {
        sqlx::query_as::<_, (i64, String, i64)>(
            "SELECT id, status, remaining_credits FROM user_packages
             WHERE user_id = 31 AND source = 'purchase'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    // The same form sent twice (a double click, a retry) assigns once.
    let page = admin.get(user_page).await.text();
    let csrf = csrf_of(&page);
    let marker = "name=\"submission\" value=\"";
    let start = page.find(marker).unwrap() + marker.len();
    let submission = &page[start..start + page[start..].find('"').unwrap()];
    let twice = form(&[
        ("package_id", &package_id),
        ("source", "gift"),
        ("submission", submission),
        ("csrf", &csrf),
    ]);
    let first = admin
        .send("POST", "/console/users/31/grants", Some(&twice))
        .await;
    assert_eq!(
        location(&first),
        "/console/users?user_id=31&done=grant_assigned"
    );
    let second = admin
        .send("POST", "/console/users/31/grants", Some(&twice))
        .await;
    assert_eq!(
        location(&second),
        "/console/users?user_id=31&done=grant_exists"
    );
    assert!(
        admin
            .get(location(&second))
            .await
            .text()
            .contains("Nothing new was assigned")
    );
    let gifts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM user_packages WHERE user_id = 31 AND source = 'gift'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(gifts, 1);

    let (grant_id, status, _) = grant().await;
    assert_eq!(status, "pending", "the box was left unchecked");
    let activated = admin
        .submit(
            user_page,
            &format!("/console/users/31/grants/{grant_id}/activate"),
            &[],
        )
        .await;
    assert_eq!(activated.status, StatusCode::SEE_OTHER);
    assert_eq!(grant().await.1, "active");
    let shown = admin.get(user_page).await.text();
    assert!(
        shown.contains("<strong id=\"remaining\">30</strong>"),
        "{shown}"
    );

    let revoke = format!("/console/users/31/grants/{grant_id}/revoke");
    let revoked = admin
        .submit(user_page, &revoke, &[("reason", "refunded order")])
        .await;
    assert_eq!(revoked.status, StatusCode::SEE_OTHER);
    assert_eq!(grant().await.1, "revoked");
    // Revoking again is refused with the API's reason on the page; nothing changes.
    let again = admin.submit(user_page, &revoke, &[]).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert!(again.text().contains("invalid_user_package_status"));
    assert_eq!(grant().await.1, "revoked");

    // Delete asks first; the package then leaves the list but keeps its row.
    let confirm = admin.get(&format!("/console/packages/{id}/delete")).await;
    assert!(confirm.text().contains("Delete package"));
    let deleted = admin
        .submit(
            &format!("/console/packages/{id}/delete"),
            &format!("/console/packages/{id}/delete"),
            &[],
        )
        .await;
    assert_eq!(location(&deleted), "/console/packages?done=package_deleted");
    assert!(starters().await[0].3.is_some());
    let listed = admin.get("/console/packages").await.text();
    assert!(!listed.contains(&format!("data-package-id=\"{id}\"")));
    engine.stop().await;
}

backend_tests! {
async fn the_report_pages_render_and_export(db: TestDb) {
    let package = common::create_package(&db, "credits", Some(100), None).await;
    let engine = common::engine_on(&db).await;
    engine.grant(5, package, json!({})).await;
    for key in ["a", "b"] {
        let (status, _) = engine
            .deduct(
                json!({"user_id": 5, "action_key": "advanced_analysis", "idempotency_key": key,
                "metadata": {"note": "comma, \"quoted\""}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let admin = Browser::signed_in(&engine, &common::admin_token()).await;

    let report = admin.get("/console/consumption?user_id=5").await;
    assert_eq!(report.status, StatusCode::OK);
    let text = report.text();
    assert!(
        text.contains("<strong id=\"total-credits\">6</strong>"),
        "{text}"
    );
    assert_eq!(
        text.matches("<svg").count(),
        2,
        "a daily and a per-action chart"
    );
    let bad = admin.get("/console/consumption?to=2026-13-01").await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(bad.text().contains("field-to"));

    let csv = admin.get("/console/consumption/export.csv?user_id=5").await;
    assert_eq!(csv.status, StatusCode::OK);
    assert!(
        csv.headers[header::CONTENT_DISPOSITION]
            .to_str()
            .unwrap()
            .contains("consumption.csv")
    );
    let rows = csv.text();
    assert_eq!(rows.lines().count(), 3, "{rows}");
    let xlsx = admin
        .get("/console/consumption/export.xlsx?user_id=5")
        .await;
    assert_eq!(xlsx.status, StatusCode::OK);
    assert!(xlsx.body.starts_with(b"PK"), "a zip container");

    // A range longer than the daily chart's limit: no charts, but the records and exports.
    let long = admin
        .get("/console/consumption?user_id=5&from=2020-01-01&to=2099-12-31")
        .await;
    assert_eq!(long.status, StatusCode::OK);
    assert!(
        long.text()
            .contains("No totals or charts for these filters")
    );
    assert!(
        long.text().contains("advanced_analysis"),
        "the records are listed"
    );
    // A filter the form does not show still says what is wrong with it.
    let bad_status = admin.get("/console/consumption?status=lost").await;
    assert_eq!(bad_status.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        bad_status.text().contains("role=\"alert\""),
        "{}",
        bad_status.text()
    );

    // Reconciliation runs from a button (each run writes events), not on every page view.
    let intro = admin.get("/console/reconciliation").await.text();
    assert!(intro.contains("Run reconciliation now"));
    assert!(!intro.contains("mismatch-count"));
    let ran = admin
        .submit("/console/reconciliation", "/console/reconciliation", &[])
        .await;
    assert_eq!(ran.status, StatusCode::OK);
    assert!(
        ran.text()
            .contains("<strong id=\"mismatch-count\">0</strong>")
    );
    assert!(
        admin
            .get("/console/events?user_id=5")
            .await
            .text()
            .contains("billing_credits_deduct")
    );
    engine.stop().await;
}
}
