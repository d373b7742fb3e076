//! The OpenAPI document: it is valid, it lists every route of the contract, and every route it
//! lists is served.

mod common;

use std::collections::BTreeSet;

use axum::http::StatusCode;
use common::*;
use oas3::spec::ParameterIn;
use serde_json::Value;
use sqlx::PgPool;

/// Every route of `CONTRACT.md` that exists today, as (method, path).
const CONTRACT_ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/admin/billing/consumption"),
    ("GET", "/api/admin/billing/consumption/statistics"),
    ("GET", "/api/admin/billing/consumption/export"),
    ("GET", "/api/admin/billing/events"),
    ("GET", "/api/admin/billing/reconciliation"),
    ("GET", "/api/user/billing/consumption"),
    ("POST", "/api/internal/billing/credits/check"),
    ("POST", "/api/internal/billing/credits/deduct"),
    ("POST", "/api/internal/billing/credits/refund"),
    ("POST", "/api/internal/billing/users/registered"),
    ("GET", "/api/admin/billing/action-prices"),
    ("POST", "/api/admin/billing/action-prices"),
    ("PUT", "/api/admin/billing/action-prices/{action_key}"),
    (
        "PATCH",
        "/api/admin/billing/action-prices/{action_key}/status",
    ),
    ("GET", "/api/admin/billing/packages"),
    ("POST", "/api/admin/billing/packages"),
    ("GET", "/api/admin/billing/packages/{id}"),
    ("PUT", "/api/admin/billing/packages/{id}"),
    ("DELETE", "/api/admin/billing/packages/{id}"),
    ("PATCH", "/api/admin/billing/packages/{id}/visibility"),
    ("GET", "/api/admin/billing/packages/{id}/users"),
    ("POST", "/api/admin/billing/user-packages"),
    ("POST", "/api/admin/billing/user-packages/{id}/activate"),
    ("POST", "/api/admin/billing/user-packages/{id}/revoke"),
    ("GET", "/api/admin/users/{user_id}/billing-packages"),
    ("GET", "/api/user/billing/credits"),
    ("GET", "/api/user/billing/packages"),
    ("GET", "/api/billing/action-prices"),
    ("GET", "/api/billing/packages"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
];

async fn document(engine: &TestEngine) -> oas3::Spec {
    oas3::from_json(document_json(engine).await.to_string())
        .expect("the document is an OpenAPI 3.1 document")
}

async fn document_json(engine: &TestEngine) -> Value {
    let answer = call(&engine.router, "GET", "/api/openapi.json", None, None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert!(
        answer.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    answer.json()
}

/// Every `$ref` anywhere in `value`.
fn references<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(target)) = map.get("$ref") {
                found.push(target);
            }
            map.values().for_each(|value| references(value, found));
        }
        Value::Array(items) => items.iter().for_each(|value| references(value, found)),
        _ => {}
    }
}

fn operations(spec: &oas3::Spec) -> BTreeSet<(String, String)> {
    spec.operations()
        .map(|(path, method, _)| (method.to_string(), path))
        .collect()
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn the_document_is_valid(pool: PgPool) {
    let engine = engine(pool).await;
    let spec = document(&engine).await;
    let version = spec.validate_version().expect("a 3.1 version");
    assert_eq!(version.major, 3);
    assert_eq!(spec.info.title, "credits-engine");
    assert_eq!(spec.info.version, env!("CARGO_PKG_VERSION"));
    let schemes = &spec.components.as_ref().unwrap().security_schemes;
    assert!(schemes.contains_key("service_token") && schemes.contains_key("jwt"));

    let surfaces = ["public", "internal", "admin", "user"];
    let mut operation_ids = BTreeSet::new();
    for (path, method, operation) in spec.operations() {
        let route = format!("{method} {path}");
        let operation_id = operation.operation_id.clone().expect("an operationId");
        assert!(
            operation_ids.insert(operation_id.clone()),
            "{route}: operationId {operation_id} is taken"
        );
        assert_eq!(operation.tags.len(), 1, "{route} has one tag");
        let tag = operation.tags[0].as_str();
        assert!(surfaces.contains(&tag), "{route} is tagged {tag}");
        let expected_scheme = match tag {
            "internal" => Some("service_token"),
            "admin" | "user" => Some("jwt"),
            _ => None,
        };
        let schemes: Vec<&String> = operation
            .security
            .iter()
            .flat_map(|requirement| requirement.0.keys())
            .collect();
        assert_eq!(
            schemes.first().map(|scheme| scheme.as_str()),
            expected_scheme,
            "{route} names its surface's credential"
        );
        let responses = operation.responses.as_ref().expect("responses");
        if expected_scheme.is_some() {
            assert!(responses.contains_key("401"), "{route} documents 401");
        }
        assert!(
            responses.keys().any(|status| status.starts_with('2')),
            "{route} has a success response"
        );
        // Every reference resolves: responses, their bodies, parameters and the request body.
        for (status, response) in responses {
            let response = response.resolve(&spec).unwrap();
            for media in response.content.values() {
                media
                    .schema(&spec)
                    .unwrap_or_else(|error| panic!("{route} {status}: {error}"));
            }
        }
        if let Some(body) = &operation.request_body {
            let body = body.resolve(&spec).unwrap();
            for media in body.content.values() {
                media.schema(&spec).unwrap().expect("a body schema");
            }
        }
        let parameters: Vec<_> = operation
            .parameters
            .iter()
            .map(|parameter| parameter.resolve(&spec).unwrap())
            .collect();
        // Every `{name}` of the path is a documented path parameter, and no other is.
        let in_path: BTreeSet<&str> = path
            .split('/')
            .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        let documented: BTreeSet<&str> = parameters
            .iter()
            .filter(|parameter| parameter.location == ParameterIn::Path)
            .map(|parameter| parameter.name.as_str())
            .collect();
        assert_eq!(in_path, documented, "{route} path parameters");
    }
    // No reference dangles, however deep in a schema it sits.
    let json = document_json(&engine).await;
    let mut found = Vec::new();
    references(&json, &mut found);
    assert!(!found.is_empty());
    let schemas = &spec.components.as_ref().unwrap().schemas;
    for target in found {
        let name = target
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("{target} is not a schema reference"));
        assert!(schemas.contains_key(name), "{target} dangles");
    }
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn the_document_lists_every_route_of_the_contract(pool: PgPool) {
    let engine = engine(pool).await;
    let documented = operations(&document(&engine).await);
    for (method, path) in CONTRACT_ROUTES {
        assert!(
            documented.contains(&(method.to_string(), path.to_string())),
            "{method} {path} is not in the document"
        );
    }
    assert!(documented.contains(&("GET".into(), "/api/openapi.json".into())));
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn every_documented_route_is_served(pool: PgPool) {
    let engine = engine(pool).await;
    let documented = operations(&document(&engine).await);
    for (method, path) in &documented {
        let concrete = path
            .replace("{action_key}", "ai_chat")
            .replace("{id}", "1")
            .replace("{user_id}", "1");
        assert!(!concrete.contains('{'), "{path} has an unknown parameter");
        let answer = call(&engine.router, method, &concrete, None, None).await;
        let code = answer.json()["error"]["code"].clone();
        assert!(
            !(answer.status == StatusCode::NOT_FOUND && code == "not_found"),
            "{method} {path} falls through to the router's fallback"
        );
        assert_ne!(
            answer.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path} is not routed for {method}"
        );
        let public = !(path.starts_with("/api/internal/")
            || path.starts_with("/api/admin/")
            || path.starts_with("/api/user/"));
        if !public {
            assert_eq!(
                answer.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} asks for credentials first"
            );
        }
    }
}
