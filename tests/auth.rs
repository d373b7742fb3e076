//! The authorization matrix: every route family against every kind of credential.

mod common;

use axum::http::StatusCode;
use chrono::{Duration, Utc};
use common::*;
use credits_engine::config::Secret;
use credits_engine::http::auth::mint_token;
use serde_json::{Value, json};
use sqlx::PgPool;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Credential {
    None,
    Malformed,
    Forged,
    Expired,
    User,
    OtherUser,
    Admin,
    Service,
}

const CREDENTIALS: [Credential; 8] = [
    Credential::None,
    Credential::Malformed,
    Credential::Forged,
    Credential::Expired,
    Credential::User,
    Credential::OtherUser,
    Credential::Admin,
    Credential::Service,
];

/// The user the routes below are about; `OtherUser` is someone else.
const USER: i64 = 7;
const OTHER_USER: i64 = 8;

fn token(credential: Credential) -> Option<String> {
    match credential {
        Credential::None => None,
        Credential::Malformed => Some("not-a-jwt".into()),
        // An admin token signed with a secret the engine does not know.
        Credential::Forged => Some(
            mint_token(
                &Secret::new("someone-elses-secret"),
                USER,
                Some("admin"),
                Duration::hours(1),
                Utc::now(),
            )
            .unwrap(),
        ),
        Credential::Expired => Some(
            mint_token(
                &Secret::new(JWT_SECRET),
                USER,
                Some("admin"),
                Duration::hours(1),
                Utc::now() - Duration::hours(2),
            )
            .unwrap(),
        ),
        Credential::User => Some(user_token(USER)),
        Credential::OtherUser => Some(user_token(OTHER_USER)),
        Credential::Admin => Some(admin_token()),
        Credential::Service => Some(SERVICE_TOKEN.into()),
    }
}

#[derive(Clone, Copy, Debug)]
enum Surface {
    Public,
    Internal,
    Admin,
    User,
}

impl Surface {
    /// What a credential gets on this surface; `Ok` means it passes authorization.
    fn expected(self, credential: Credential) -> Result<(), StatusCode> {
        use Credential::*;
        match (self, credential) {
            (Surface::Public, _) => Ok(()),
            (Surface::Internal, Service) => Ok(()),
            (Surface::Internal, _) => Err(StatusCode::UNAUTHORIZED),
            (Surface::Admin, Admin) => Ok(()),
            (Surface::Admin, User | OtherUser) => Err(StatusCode::FORBIDDEN),
            (Surface::Admin, _) => Err(StatusCode::UNAUTHORIZED),
            (Surface::User, User | OtherUser | Admin) => Ok(()),
            (Surface::User, _) => Err(StatusCode::UNAUTHORIZED),
        }
    }
}

struct Route {
    surface: Surface,
    method: &'static str,
    path: String,
    body: Option<Value>,
    /// The status of an authorized call.
    ok: StatusCode,
}

fn route(
    surface: Surface,
    method: &'static str,
    path: &str,
    body: Option<Value>,
    ok: StatusCode,
) -> Route {
    Route {
        surface,
        method,
        path: path.to_owned(),
        body,
        ok,
    }
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn every_route_family_against_every_credential(pool: PgPool) {
    let doomed = create_package(&pool, "permanent", None, None).await;
    let engine = engine(pool.clone()).await;
    engine.grant(USER, 2, json!({})).await;
    engine.grant(OTHER_USER, 2, json!({})).await;
    let to_activate = engine.grant(USER, 2, json!({"activate": false})).await;
    let to_revoke = engine.grant(USER, 2, json!({})).await;

    use Surface::*;
    let ok = StatusCode::OK;
    let created = StatusCode::CREATED;
    let routes = [
        route(Public, "GET", "/healthz", None, ok),
        route(Public, "GET", "/readyz", None, ok),
        route(Public, "GET", "/api/billing/action-prices", None, ok),
        route(Public, "GET", "/api/billing/packages", None, ok),
        route(
            Internal,
            "POST",
            "/api/internal/billing/credits/check",
            Some(json!({"user_id": USER, "action_key": "ai_chat"})),
            ok,
        ),
        route(
            Internal,
            "POST",
            "/api/internal/billing/credits/deduct",
            Some(json!({"user_id": USER, "action_key": "ai_chat", "idempotency_key": "auth-1"})),
            ok,
        ),
        route(
            Internal,
            "POST",
            "/api/internal/billing/credits/refund",
            Some(json!({"user_id": USER, "idempotency_key": "auth-1"})),
            ok,
        ),
        route(
            Internal,
            "POST",
            "/api/internal/billing/users/registered",
            Some(json!({"user_id": USER})),
            created,
        ),
        route(Admin, "GET", "/api/admin/billing/action-prices", None, ok),
        route(
            Admin,
            "POST",
            "/api/admin/billing/action-prices",
            Some(json!({"action_key": "auth_probe", "name": "Probe", "credits_cost": 2})),
            created,
        ),
        route(
            Admin,
            "PUT",
            "/api/admin/billing/action-prices/ai_chat",
            Some(json!({"credits_cost": 1})),
            ok,
        ),
        route(
            Admin,
            "PATCH",
            "/api/admin/billing/action-prices/ai_chat/status",
            Some(json!({"enabled": true})),
            ok,
        ),
        route(Admin, "GET", "/api/admin/billing/packages", None, ok),
        route(
            Admin,
            "POST",
            "/api/admin/billing/packages",
            Some(json!({"name": "Probe", "package_type": "permanent"})),
            created,
        ),
        route(Admin, "GET", "/api/admin/billing/packages/2", None, ok),
        route(
            Admin,
            "PUT",
            "/api/admin/billing/packages/2",
            Some(json!({"sort_order": 3})),
            ok,
        ),
        route(
            Admin,
            "PATCH",
            "/api/admin/billing/packages/2/visibility",
            Some(json!({"visible": true})),
            ok,
        ),
        route(
            Admin,
            "DELETE",
            &format!("/api/admin/billing/packages/{doomed}"),
            None,
            StatusCode::NO_CONTENT,
        ),
        route(
            Admin,
            "GET",
            "/api/admin/billing/packages/2/users",
            None,
            ok,
        ),
        route(
            Admin,
            "POST",
            "/api/admin/billing/user-packages",
            Some(json!({"user_id": USER, "package_id": 2, "source": "gift"})),
            created,
        ),
        route(
            Admin,
            "POST",
            &format!("/api/admin/billing/user-packages/{to_activate}/activate"),
            None,
            ok,
        ),
        route(
            Admin,
            "POST",
            &format!("/api/admin/billing/user-packages/{to_revoke}/revoke"),
            None,
            ok,
        ),
        // About user 7, yet user 7's own token is not enough: it is an admin route.
        route(
            Admin,
            "GET",
            &format!("/api/admin/users/{USER}/billing-packages"),
            None,
            ok,
        ),
        route(Admin, "GET", "/api/admin/billing/consumption", None, ok),
        route(
            Admin,
            "GET",
            "/api/admin/billing/consumption/statistics?group_by=action",
            None,
            ok,
        ),
        route(
            Admin,
            "GET",
            "/api/admin/billing/consumption/export",
            None,
            ok,
        ),
        route(Admin, "GET", "/api/admin/billing/events", None, ok),
        route(Admin, "GET", "/api/admin/billing/reconciliation", None, ok),
        route(User, "GET", "/api/user/billing/consumption", None, ok),
        route(User, "GET", "/api/user/billing/credits", None, ok),
        route(User, "GET", "/api/user/billing/packages", None, ok),
    ];

    for route in &routes {
        for credential in CREDENTIALS {
            let bearer = token(credential);
            let answer = call(
                &engine.router,
                route.method,
                &route.path,
                bearer.as_deref(),
                route.body.clone(),
            )
            .await;
            let body = answer.json();
            match route.surface.expected(credential) {
                Ok(()) => assert_eq!(
                    answer.status, route.ok,
                    "{} {} with {credential:?}: {body}",
                    route.method, route.path
                ),
                Err(status) => {
                    assert_eq!(
                        answer.status, status,
                        "{} {} with {credential:?}: {body}",
                        route.method, route.path
                    );
                    let code = if status == StatusCode::FORBIDDEN {
                        "forbidden"
                    } else {
                        "unauthorized"
                    };
                    assert_eq!(body["error"]["code"], code);
                }
            }
        }
    }

    // The refused calls wrote nothing: one deduct, one refund, one registration, one price.
    assert_eq!(
        count(&pool, "SELECT count(*) FROM consumption_records").await,
        1
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM user_registrations").await,
        1
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM action_prices WHERE action_key = 'auth_probe'"
        )
        .await,
        1
    );

    // A user's token shows that user's data, whoever else asks.
    for (user, credential) in [
        (USER, Credential::User),
        (OTHER_USER, Credential::OtherUser),
    ] {
        let (_, summary) = engine
            .get("/api/user/billing/credits", token(credential).as_deref())
            .await;
        assert_eq!(summary["user_id"], user);
    }
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn without_configured_secrets_the_surfaces_refuse_everyone(pool: PgPool) {
    let mut settings = settings("postgres://unused");
    settings.service_tokens = Vec::new();
    settings.jwt_secret = None;
    let app = credits_engine::app::App::build_with(
        credits_engine::store::postgres::PgStore::db(pool),
        settings,
        std::sync::Arc::new(credits_engine::clock::ManualClock::new(start_time())),
    )
    .await
    .unwrap();
    let router = app.router();
    for (path, bearer) in [
        (
            "/api/internal/billing/credits/check",
            Some(SERVICE_TOKEN.to_owned()),
        ),
        ("/api/internal/billing/credits/check", Some(String::new())),
        ("/api/user/billing/credits", Some(user_token(USER))),
        ("/api/admin/billing/packages", Some(admin_token())),
    ] {
        let method = if path.contains("internal") {
            "POST"
        } else {
            "GET"
        };
        let body = (method == "POST").then(|| json!({"user_id": 1, "action_key": "ai_chat"}));
        let answer = call(&router, method, path, bearer.as_deref(), body).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{path}");
    }
    app.stop().await;
}
