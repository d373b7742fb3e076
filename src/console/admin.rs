//! The operators' pages: action prices, packages, user packages, the consumption report, the
//! audit events and reconciliation. Each page reads through the admin API; each form makes one
//! admin API call and, when it fails, shows the form again with the API's message next to the
//! field it names.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde_json::{Value, json};

use super::filters::{self, param};
use super::views::{
    self, cell, checkbox, csrf_field, field, filter_select, form_error, items, select, table,
};
use super::{AdminSession, Console, Failure, Form, Kind, Session, json_body};

/// Pages of 500 the console reads to show a whole catalog list (prices, packages to assign).
const CATALOG_PAGES_MAX: usize = 20;

const PACKAGE_TYPES: [&str; 4] = ["credits", "hybrid", "duration", "permanent"];
const SOURCES: [&str; 4] = ["gift", "purchase", "promotion", "system"];
const GRANT_STATUSES: [&str; 5] = ["pending", "active", "depleted", "expired", "revoked"];

/// What a redirect after a change says on the next page (`?done=`).
fn notice(query: &filters::Query) -> Option<&'static str> {
    Some(match query.get("done")?.as_str() {
        "price_created" => "The action price was created.",
        "price_updated" => "The action price was saved; its version went up by one.",
        "price_status" => "The action's status was changed.",
        "package_created" => "The package was created.",
        "package_updated" => "The package was saved.",
        "package_visibility" => "The package's visibility was changed.",
        "package_deleted" => "The package was deleted. Grants already given keep working.",
        "grant_assigned" => "The package was assigned.",
        "grant_exists" => {
            "Nothing new was assigned: this external reference (or this same form, sent twice) assigned a grant before; it is listed below."
        }
        "grant_activated" => "The grant was activated.",
        "grant_revoked" => "The grant was revoked; its remaining credits are void.",
        _ => return None,
    })
}

fn options(values: &[&str]) -> Vec<(String, String)> {
    values
        .iter()
        .map(|value| ((*value).to_owned(), (*value).to_owned()))
        .collect()
}

fn with_any(values: &[&str]) -> Vec<(String, String)> {
    let mut all = vec![(String::new(), "any".to_owned())];
    all.extend(options(values));
    all
}

/// Every item of a keyset-paged admin list, up to [`CATALOG_PAGES_MAX`] pages.
async fn all_items(
    console: &Console,
    session: &Session,
    uri: &str,
) -> Result<Vec<Value>, Response> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..CATALOG_PAGES_MAX {
        let separator = if uri.contains('?') { '&' } else { '?' };
        let page_uri = match &cursor {
            Some(cursor) => format!(
                "{uri}{separator}limit=500&cursor={}",
                views::url_encode(cursor)
            ),
            None => format!("{uri}{separator}limit=500"),
        };
        let answer = console.read(session, &page_uri).await?;
        all.extend(items(&answer).iter().cloned());
        match answer["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    Ok(all)
}

fn redirect(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// `/console`: operators start at the prices; anyone else has their own page.
pub async fn home(session: Session) -> Response {
    redirect(if session.is_admin() {
        "/console/prices"
    } else {
        "/me"
    })
}

// --- Action prices -------------------------------------------------------------------------

pub async fn prices(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Query(query): Query<filters::Query>,
) -> Response {
    prices_page(&console, &session, notice(&query), None, None).await
}

async fn prices_page(
    console: &Console,
    session: &Session,
    notice: Option<&str>,
    form: Option<&Form>,
    failure: Option<&Failure>,
) -> Response {
    let prices = match all_items(console, session, "/api/admin/billing/action-prices").await {
        Ok(prices) => prices,
        Err(page) => return page,
    };
    let value = |name: &str| form.and_then(|form| form.get(name));
    let content = html! {
        table {
            thead { tr { th { "Key" } th { "Name" } th { "Credits" } th { "Enabled" } th { "Version" } th { "Updated" } th {} } }
            tbody {
                @for price in &prices {
                    @let key = price["action_key"].as_str().unwrap_or_default();
                    tr data-action-key=(key) {
                        td { code { (key) } }
                        td { (cell(&price["name"])) }
                        td { (cell(&price["credits_cost"])) }
                        td { (cell(&price["enabled"])) }
                        td { (cell(&price["version"])) }
                        td { (cell(&price["updated_at"])) }
                        td {
                            a href={ "/console/prices/" (views::url_encode(key)) } { "Edit" }
                            " "
                            form method="post" action={ "/console/prices/" (views::url_encode(key)) "/status" } {
                                (csrf_field(session))
                                @if price["enabled"].as_bool() == Some(true) {
                                    input type="hidden" name="enabled" value="false";
                                    button.secondary type="submit" { "Disable" }
                                } @else {
                                    input type="hidden" name="enabled" value="true";
                                    button.secondary type="submit" { "Enable" }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "New action price" }
        form.card #price-create method="post" action="/console/prices" {
            (csrf_field(session))
            (form_error(failure, &["action_key", "name", "description", "credits_cost", "enabled"]))
            (field("Key (a-z 0-9 _ . -)", "action_key", "text", value("action_key"), failure))
            (field("Name", "name", "text", value("name"), failure))
            (field("Description", "description", "text", value("description"), failure))
            (field("Credits per unit", "credits_cost", "number", value("credits_cost"), failure))
            (checkbox("Enabled", "enabled", form.is_none_or(|form| form.checked("enabled")), failure))
            button type="submit" { "Create price" }
        }
    };
    page_response(failure, "Action prices", session, notice, content)
}

/// The page with the failure's status (the form shown again), or 200.
fn page_response(
    failure: Option<&Failure>,
    title: &str,
    session: &Session,
    notice: Option<&str>,
    content: Markup,
) -> Response {
    let status = failure.map_or(StatusCode::OK, |failure| failure.status);
    (status, views::page(title, Some(session), notice, content)).into_response()
}

const PRICE_FIELDS: [(&str, Kind); 4] = [
    ("name", Kind::Text),
    ("description", Kind::Text),
    ("credits_cost", Kind::Integer),
    ("enabled", Kind::Checkbox),
];

pub async fn create_price(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    form: Form,
) -> Response {
    if let Some(refused) = session.refuse_forgery(form.get("csrf")) {
        return refused;
    }
    let mut body = json_body(&form, &PRICE_FIELDS);
    body["action_key"] = json_body(&form, &[("action_key", Kind::Text)])["action_key"].clone();
    match console
        .call(
            &session,
            Method::POST,
            "/api/admin/billing/action-prices",
            Some(body),
        )
        .await
    {
        Ok(_) => redirect("/console/prices?done=price_created"),
        Err(failure) => prices_page(&console, &session, None, Some(&form), Some(&failure)).await,
    }
}

pub async fn price(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Path(action_key): Path<String>,
) -> Response {
    price_page(&console, &session, &action_key, None, None).await
}

async fn price_page(
    console: &Console,
    session: &Session,
    action_key: &str,
    form: Option<&Form>,
    failure: Option<&Failure>,
) -> Response {
    let prices = match all_items(console, session, "/api/admin/billing/action-prices").await {
        Ok(prices) => prices,
        Err(page) => return page,
    };
    let Some(price) = prices
        .iter()
        .find(|price| price["action_key"].as_str() == Some(action_key))
    else {
        return views::message_page(
            StatusCode::NOT_FOUND,
            Some(session),
            "No such action",
            &format!("There is no action price {action_key:?}."),
        );
    };
    let current = |name: &str| match form {
        Some(form) => form.get(name).map(str::to_owned),
        None => views::raw(&price[name]),
    };
    let enabled = form.map_or(price["enabled"].as_bool() == Some(true), |form| {
        form.checked("enabled")
    });
    let content = html! {
        p { "Key " code { (action_key) } ", version " (cell(&price["version"]))
            ". Saving raises the version; deductions already made keep the price they were charged." }
        form.card method="post" action={ "/console/prices/" (views::url_encode(action_key)) } {
            (csrf_field(session))
            (form_error(failure, &["name", "description", "credits_cost", "enabled"]))
            (field("Name", "name", "text", current("name").as_deref(), failure))
            (field("Description", "description", "text", current("description").as_deref(), failure))
            (field("Credits per unit", "credits_cost", "number", current("credits_cost").as_deref(), failure))
            (checkbox("Enabled", "enabled", enabled, failure))
            button type="submit" { "Save" }
            " " a href="/console/prices" { "Back" }
        }
    };
    page_response(
        failure,
        &format!("Action price {action_key}"),
        session,
        None,
        content,
    )
}

pub async fn update_price(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Path(action_key): Path<String>,
    form: Form,
) -> Response {
    if let Some(refused) = session.refuse_forgery(form.get("csrf")) {
        return refused;
    }
    let uri = format!(
        "/api/admin/billing/action-prices/{}",
        views::url_encode(&action_key)
    );
    let body = json_body(&form, &PRICE_FIELDS);
    match console.call(&session, Method::PUT, &uri, Some(body)).await {
        Ok(_) => redirect("/console/prices?done=price_updated"),
        Err(failure) => {
            price_page(&console, &session, &action_key, Some(&form), Some(&failure)).await
        }
    }
}

pub async fn set_price_status(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Path(action_key): Path<String>,
    form: Form,
) -> Response {
    let uri = format!(
        "/api/admin/billing/action-prices/{}/status",
        views::url_encode(&action_key)
    );
    let done = "/console/prices?done=price_status";
    set_flag(&console, &session, &form, &uri, "enabled", done).await
}

/// A button that turns one flag on or off (`PATCH {flag: bool}`), then back to the list.
async fn set_flag(
    console: &Console,
    session: &Session,
    form: &Form,
    uri: &str,
    flag: &str,
    done: &str,
) -> Response {
    if let Some(refused) = session.refuse_forgery(form.get("csrf")) {
        return refused;
    }
    let body = json!({ flag: form.get(flag) == Some("true") });
    match console.call(session, Method::PATCH, uri, Some(body)).await {
        Ok(_) => redirect(done),
        Err(failure) => failure.page(session),
    }
}

// --- Packages ------------------------------------------------------------------------------

const PACKAGE_FILTERS: [&str; 5] = [
    "package_type",
    "visible",
    "include_deleted",
    "sort",
    "order",
];

const PACKAGE_FIELDS: [(&str, Kind); 11] = [
    ("name", Kind::Text),
    ("description", Kind::Text),
    ("package_type", Kind::Text),
    ("credits_amount", Kind::NullableInteger),
    ("duration_days", Kind::NullableInteger),
    ("price_cents", Kind::Integer),
    ("currency", Kind::OptionalText),
    ("priority", Kind::Integer),
    ("visible", Kind::Checkbox),
    ("assign_to_new_users", Kind::Checkbox),
    ("sort_order", Kind::Integer),
];

pub async fn packages(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Query(query): Query<filters::Query>,
) -> Response {
    packages_page(&console, &session, &query, None, None).await
}

async fn packages_page(
    console: &Console,
    session: &Session,
    query: &filters::Query,
    form: Option<&Form>,
    failure: Option<&Failure>,
) -> Response {
    let mut pairs: Vec<(&str, String)> = PACKAGE_FILTERS
        .iter()
        .map(|name| (*name, param(query, name)))
        .collect();
    pairs.push(("cursor", param(query, "cursor")));
    let uri = format!(
        "/api/admin/billing/packages?{}",
        views::query_string(&pairs)
    );
    let answer = match console.read(session, &uri).await {
        Ok(answer) => answer,
        Err(page) => return page,
    };
    pairs.pop();
    let current = |name: &str| param(query, name);
    let content = html! {
        form.filters method="get" action="/console/packages" {
            (filter_select("Type", "package_type", &with_any(&PACKAGE_TYPES), &current("package_type")))
            (filter_select("Visible", "visible", &with_any(&["true", "false"]), &current("visible")))
            (filter_select("Deleted", "include_deleted", &[(String::new(), "hide".to_owned()), ("true".to_owned(), "show".to_owned())], &current("include_deleted")))
            (filter_select("Sort by", "sort", &options(&["sort_order", "id", "credits_amount", "price_cents"]), &current("sort")))
            (filter_select("Order", "order", &options(&["asc", "desc"]), &current("order")))
            button type="submit" { "Filter" }
        }
        table {
            thead { tr { th { "Id" } th { "Name" } th { "Type" } th { "Credits" } th { "Days" } th { "Price" }
                th { "Priority" } th { "Visible" } th { "New users" } th { "Sort" } th { "Deleted" } th {} } }
            tbody {
                @for package in items(&answer) {
                    @let id = package["id"].as_i64().unwrap_or_default();
                    tr data-package-id=(id) {
                        td { (id) }
                        td { (cell(&package["name"])) }
                        td { (cell(&package["package_type"])) }
                        td { (cell(&package["credits_amount"])) }
                        td { (cell(&package["duration_days"])) }
                        td { (cell(&package["price_cents"])) " " (cell(&package["currency"])) }
                        td { (cell(&package["priority"])) }
                        td { (cell(&package["visible"])) }
                        td { (cell(&package["assign_to_new_users"])) }
                        td { (cell(&package["sort_order"])) }
                        td { (cell(&package["deleted_at"])) }
                        td {
                            @if package["deleted_at"].is_null() {
                                a href={ "/console/packages/" (id) } { "Edit" }
                                " "
                                form method="post" action={ "/console/packages/" (id) "/visibility" } {
                                    (csrf_field(session))
                                    @let visible = package["visible"].as_bool() == Some(true);
                                    input type="hidden" name="visible" value=(if visible { "false" } else { "true" });
                                    button.secondary type="submit" { (if visible { "Hide" } else { "Show" }) }
                                }
                                " "
                                a href={ "/console/packages/" (id) "/delete" } { "Delete" }
                            }
                        }
                    }
                }
            }
        }
        (views::next_page("/console/packages", &pairs, &answer))
        h2 { "New package" }
        (package_form(session, "/console/packages", None, form, failure, "Create package"))
    };
    page_response(failure, "Packages", session, notice(query), content)
}

/// The create and edit form: values from the submitted form, else the package, else defaults.
fn package_form(
    session: &Session,
    action: &str,
    package: Option<&Value>,
    form: Option<&Form>,
    failure: Option<&Failure>,
    submit: &str,
) -> Markup {
    let value = |name: &str| -> Option<String> {
        match (form, package) {
            (Some(form), _) => form.get(name).map(str::to_owned),
            (None, Some(package)) => views::raw(&package[name]),
            (None, None) => None,
        }
    };
    let flag = |name: &str, default: bool| match (form, package) {
        (Some(form), _) => form.checked(name),
        (None, Some(package)) => package[name].as_bool() == Some(true),
        (None, None) => default,
    };
    let package_type = value("package_type").unwrap_or_else(|| "credits".to_owned());
    let names: Vec<&str> = PACKAGE_FIELDS.iter().map(|(name, _)| *name).collect();
    html! {
        form.card #package-form method="post" action=(action) {
            (csrf_field(session))
            (form_error(failure, &names))
            (field("Name", "name", "text", value("name").as_deref(), failure))
            (field("Description", "description", "text", value("description").as_deref(), failure))
            (select("Type", "package_type", &options(&PACKAGE_TYPES), Some(&package_type), failure))
            (field("Credits (credits and hybrid)", "credits_amount", "number", value("credits_amount").as_deref(), failure))
            (field("Valid for days (hybrid and duration)", "duration_days", "number", value("duration_days").as_deref(), failure))
            (field("Price in cents", "price_cents", "number", value("price_cents").as_deref(), failure))
            (field("Currency", "currency", "text", value("currency").as_deref(), failure))
            (field("Priority (lower burns first)", "priority", "number", value("priority").as_deref(), failure))
            (field("Sort order", "sort_order", "number", value("sort_order").as_deref(), failure))
            (checkbox("Visible in the public list", "visible", flag("visible", true), failure))
            (checkbox("Assign to new users", "assign_to_new_users", flag("assign_to_new_users", false), failure))
            button type="submit" { (submit) }
        }
    }
}

pub async fn create_package(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    form: Form,
) -> Response {
    if let Some(refused) = session.refuse_forgery(form.get("csrf")) {
        return refused;
    }
    let body = json_body(&form, &PACKAGE_FIELDS);
    match console
        .call(
            &session,
            Method::POST,
            "/api/admin/billing/packages",
            Some(body),
        )
        .await
    {
        Ok(_) => redirect("/console/packages?done=package_created"),
        Err(failure) => {
            packages_page(
                &console,
                &session,
                &filters::Query::new(),
                Some(&form),
                Some(&failure),
            )
            .await
        }
    }
}

pub async fn package(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Path(id): Path<String>,
    Query(query): Query<filters::Query>,
) -> Response {
    let holders_cursor = param(&query, "cursor");
    package_page(&console, &session, &id, &holders_cursor, None, None).await
}

/// A package's edit form, and a page of the grants given of it (`holders_cursor` pages on).
async fn package_page(
    console: &Console,
    session: &Session,
    id: &str,
    holders_cursor: &str,
    form: Option<&Form>,
    failure: Option<&Failure>,
) -> Response {
    let id = views::url_encode(id);
    let package = match console
        .read(session, &format!("/api/admin/billing/packages/{id}"))
        .await
    {
        Ok(package) => package,
        Err(page) => return page,
    };
    let holders = match console
        .read(
            session,
            &format!(
                "/api/admin/billing/packages/{id}/users?limit=50&{}",
                views::query_string(&[("cursor", holders_cursor.to_owned())])
            ),
        )
        .await
    {
        Ok(holders) => holders,
        Err(page) => return page,
    };
    let content = html! {
        (package_form(session, &format!("/console/packages/{id}"), Some(&package), form, failure, "Save"))
        h2 { "Holders" }
        (table(items(&holders), &[("user_id", "User"), ("id", "Grant"), ("status", "Status"),
            ("remaining_credits", "Remaining"), ("expires_at", "Expires")]))
        (views::next_page(&format!("/console/packages/{id}"), &[], &holders))
    };
    let title = format!("Package {}", cell(&package["name"]));
    page_response(failure, &title, session, None, content)
}

pub async fn update_package(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Path(id): Path<String>,
    form: Form,
) -> Response {
    if let Some(refused) = session.refuse_forgery(form.get("csrf")) {
        return refused;
    }
    let uri = format!("/api/admin/billing/packages/{}", views::url_encode(&id));
    let body = json_body(&form, &PACKAGE_FIELDS);
    match console.call(&session, Method::PUT, &uri, Some(body)).await {
        Ok(_) => redirect("/console/packages?done=package_updated"),
        Err(failure) => {
            package_page(&console, &session, &id, "", Some(&form), Some(&failure)).await
        }
    }
}

pub async fn set_package_visibility(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Path(id): Path<String>,
    form: Form,
) -> Response {
    let uri = format!(
        "/api/admin/billing/packages/{}/visibility",
        views::url_encode(&id)
    );
    let done = "/console/packages?done=package_visibility";
    set_flag(&console, &session, &form, &uri, "visible", done).await
}

pub async fn confirm_delete_package(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Path(id): Path<String>,
) -> Response {
    let id = views::url_encode(&id);
    let package = match console
        .read(&session, &format!("/api/admin/billing/packages/{id}"))
        .await
    {
        Ok(package) => package,
        Err(page) => return page,
    };
    let content = html! {
        p { "Delete the package " strong { (cell(&package["name"])) } " (id " (id) ")? It leaves the "
            "catalog and the public list; grants already given keep working." }
        form.card method="post" action={ "/console/packages/" (id) "/delete" } {
            (csrf_field(&session))
            button.danger type="submit" { "Delete package" }
            " " a href="/console/packages" { "Cancel" }
        }
    };
    views::page("Delete package", Some(&session), None, content).into_response()
}

pub async fn delete_package(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Path(id): Path<String>,
    form: Form,
) -> Response {
    if let Some(refused) = session.refuse_forgery(form.get("csrf")) {
        return refused;
    }
    let uri = format!("/api/admin/billing/packages/{}", views::url_encode(&id));
    match console.call(&session, Method::DELETE, &uri, None).await {
        Ok(_) => redirect("/console/packages?done=package_deleted"),
        Err(failure) => failure.page(&session),
    }
}

// --- User packages -------------------------------------------------------------------------

pub async fn users(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Query(query): Query<filters::Query>,
) -> Response {
    users_page(&console, &session, &query, None, None).await
}

async fn users_page(
    console: &Console,
    session: &Session,
    query: &filters::Query,
    form: Option<&Form>,
    failure: Option<&Failure>,
) -> Response {
    let user_id = param(query, "user_id");
    let status = param(query, "status");
    let finder = html! {
        form.filters method="get" action="/console/users" {
            (field("User id", "user_id", "number", Some(&user_id), None))
            (filter_select("Status", "status", &with_any(&GRANT_STATUSES), &status))
            button type="submit" { "Find" }
        }
    };
    if user_id.is_empty() {
        return page_response(failure, "User packages", session, notice(query), finder);
    }
    let Ok(user) = user_id.parse::<i64>() else {
        let failure = Failure::field("user_id", "must be a whole number");
        return page_response(
            Some(&failure),
            "User packages",
            session,
            None,
            html! {
                (finder) p.error role="alert" { "User id " (failure.message) "." }
            },
        );
    };
    let pairs = [
        ("status", status.clone()),
        ("cursor", param(query, "cursor")),
    ];
    let uri = format!(
        "/api/admin/users/{user}/billing-packages?{}",
        views::query_string(&pairs)
    );
    let grants = match console.read(session, &uri).await {
        Ok(grants) => grants,
        Err(page) => return page,
    };
    let packages = match all_items(console, session, "/api/admin/billing/packages?sort=id").await {
        Ok(packages) => packages,
        Err(page) => return page,
    };
    let package_options: Vec<(String, String)> = packages
        .iter()
        .map(|package| {
            (
                cell(&package["id"]),
                format!(
                    "{} ({}, {})",
                    cell(&package["name"]),
                    cell(&package["package_type"]),
                    cell(&package["id"])
                ),
            )
        })
        .collect();
    let remaining: i64 = items(&grants)
        .iter()
        .filter(|grant| grant["status"].as_str() == Some("active"))
        .filter_map(|grant| grant["remaining_credits"].as_i64())
        .sum();
    let unlimited = items(&grants).iter().any(|grant| {
        grant["status"].as_str() == Some("active") && grant["unlimited"].as_bool() == Some(true)
    });
    let value = |name: &str| form.and_then(|form| form.get(name));
    let back = format!("/console/users?user_id={user}");
    let content = html! {
        (finder)
        div.totals {
            div { "Remaining credits (active grants on this page)" strong #remaining { (remaining) } }
            @if unlimited { div { "Unlimited" strong { "yes" } } }
        }
        (form_error(failure.filter(|failure| failure.field.is_none()), &[]))
        table #grants {
            thead { tr { th { "Grant" } th { "Package" } th { "Source" } th { "Status" } th { "Priority" }
                th { "Total" } th { "Used" } th { "Remaining" } th { "Expired" } th { "Activated" } th { "Expires" }
                th { "Note" } th { "External ref" } th {} } }
            tbody {
                @for grant in items(&grants) {
                    @let id = grant["id"].as_i64().unwrap_or_default();
                    @let status = grant["status"].as_str().unwrap_or_default();
                    @let unlimited = grant["unlimited"].as_bool() == Some(true);
                    tr data-grant-id=(id) {
                        td { (id) }
                        td { (cell(&grant["package_name"])) }
                        td { (cell(&grant["source"])) }
                        td class={ "status-" (status) } { (status) }
                        td { (cell(&grant["priority"])) }
                        td { @if unlimited { "unlimited" } @else { (cell(&grant["total_credits"])) } }
                        td { (cell(&grant["used_credits"])) }
                        td.remaining { @if unlimited { "unlimited" } @else { (cell(&grant["remaining_credits"])) } }
                        td { (cell(&grant["expired_credits"])) }
                        td { (cell(&grant["activated_at"])) }
                        td { @if grant["expires_at"].is_null() { "never" } @else { (cell(&grant["expires_at"])) } }
                        td { (cell(&grant["note"])) }
                        td { (cell(&grant["external_ref"])) }
                        td {
                            @if status == "pending" {
                                form method="post" action={ "/console/users/" (user) "/grants/" (id) "/activate" } {
                                    (csrf_field(session))
                                    button.secondary type="submit" { "Activate" }
                                }
                            }
                            @if matches!(status, "pending" | "active" | "depleted") {
                                form method="post" action={ "/console/users/" (user) "/grants/" (id) "/revoke" }
                                    data-confirm={ "Revoke grant " (id) "? Its remaining credits become void." } {
                                    (csrf_field(session))
                                    input name="reason" placeholder="reason" size="12";
                                    button.danger type="submit" { "Revoke" }
                                }
                            }
                        }
                    }
                }
            }
        }
        (views::next_page("/console/users", &[("user_id", user_id.clone()), ("status", status.clone())], &grants))
        h2 { "Assign a package" }
        form.card #assign method="post" action={ "/console/users/" (user) "/grants" } {
            (csrf_field(session))
            // Sent again by a double click or a retry, the same form assigns once: without an
            // external reference of the operator's, this one is the assignment's.
            input type="hidden" name="submission" value=(value("submission").map_or_else(submission_id, str::to_owned));
            (form_error(failure.filter(|failure| failure.field.is_some()), &["package_id", "source", "priority", "expires_at", "note", "external_ref", "activate"]))
            (select("Package", "package_id", &package_options, value("package_id"), failure))
            (select("Source", "source", &options(&SOURCES), value("source"), failure))
            (field("Priority (blank: the package's)", "priority", "number", value("priority"), failure))
            (field("Expires at, UTC (blank: the package's duration)", "expires_at", "datetime-local", value("expires_at"), failure))
            (field("Note", "note", "text", value("note"), failure))
            (field("External reference (assigns once)", "external_ref", "text", value("external_ref"), failure))
            (checkbox("Activate now", "activate", form.is_none_or(|form| form.checked("activate")), failure))
            button type="submit" { "Assign" }
        }
        p { a href=(back) { "Reload" } }
    };
    page_response(
        failure,
        &format!("User {user}"),
        session,
        notice(query),
        content,
    )
}

/// A new id for one rendering of the assign form (unique per process run and across runs).
fn submission_id() -> String {
    static RENDERED: AtomicU64 = AtomicU64::new(0);
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    format!(
        "{started:x}-{}-{}",
        std::process::id(),
        RENDERED.fetch_add(1, Ordering::Relaxed)
    )
}

fn user_query(user_id: i64) -> filters::Query {
    filters::Query::from([("user_id".to_owned(), user_id.to_string())])
}

pub async fn assign(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Path(user_id): Path<i64>,
    form: Form,
) -> Response {
    if let Some(refused) = session.refuse_forgery(form.get("csrf")) {
        return refused;
    }
    let mut body = json_body(
        &form,
        &[
            ("package_id", Kind::Integer),
            ("source", Kind::Text),
            ("priority", Kind::Integer),
            ("note", Kind::OptionalText),
            ("external_ref", Kind::OptionalText),
            ("activate", Kind::Checkbox),
        ],
    );
    body["user_id"] = json!(user_id);
    if form.text("external_ref").is_none()
        && let Some(submission) = form.text("submission")
    {
        body["external_ref"] = json!(format!("console:{submission}"));
    }
    let sent = match form
        .text("expires_at")
        .map(|text| filters::datetime_local("expires_at", text))
    {
        Some(Err(failure)) => Err(failure),
        Some(Ok(expires_at)) => {
            body["expires_at"] = json!(expires_at);
            Ok(body)
        }
        None => Ok(body),
    };
    let answer = match sent {
        Ok(body) => {
            console
                .call_with_status(
                    &session,
                    Method::POST,
                    "/api/admin/billing/user-packages",
                    Some(body),
                )
                .await
        }
        Err(failure) => Err(failure),
    };
    match answer {
        // 200, not 201: this external reference (or this very form) assigned before.
        Ok((StatusCode::OK, _)) => redirect(&format!(
            "/console/users?user_id={user_id}&done=grant_exists"
        )),
        Ok(_) => redirect(&format!(
            "/console/users?user_id={user_id}&done=grant_assigned"
        )),
        Err(failure) => {
            users_page(
                &console,
                &session,
                &user_query(user_id),
                Some(&form),
                Some(&failure),
            )
            .await
        }
    }
}

pub async fn activate(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Path((user_id, id)): Path<(i64, i64)>,
    form: Form,
) -> Response {
    grant_action(
        &console,
        &session,
        user_id,
        &form,
        &format!("{id}/activate"),
        None,
        "grant_activated",
    )
    .await
}

pub async fn revoke(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Path((user_id, id)): Path<(i64, i64)>,
    form: Form,
) -> Response {
    let body = json_body(&form, &[("reason", Kind::OptionalText)]);
    grant_action(
        &console,
        &session,
        user_id,
        &form,
        &format!("{id}/revoke"),
        Some(body),
        "grant_revoked",
    )
    .await
}

async fn grant_action(
    console: &Console,
    session: &Session,
    user_id: i64,
    form: &Form,
    action: &str,
    body: Option<Value>,
    done: &str,
) -> Response {
    if let Some(refused) = session.refuse_forgery(form.get("csrf")) {
        return refused;
    }
    let uri = format!("/api/admin/billing/user-packages/{action}");
    match console.call(session, Method::POST, &uri, body).await {
        Ok(_) => redirect(&format!("/console/users?user_id={user_id}&done={done}")),
        Err(failure) => {
            users_page(console, session, &user_query(user_id), None, Some(&failure)).await
        }
    }
}

// --- Reports -------------------------------------------------------------------------------

const CONSUMPTION_FILTERS: [&str; 3] = ["user_id", "action_key", "status"];

pub async fn consumption(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Query(query): Query<filters::Query>,
) -> Response {
    let shown = filters::page_filters(&query, &CONSUMPTION_FILTERS);
    let value = |name: &str| param(&query, name);
    let filter_form = |failure: Option<&Failure>| {
        html! {
            form.filters method="get" action="/console/consumption" {
                (form_error(failure, &["user_id", "action_key", "from", "to"]))
                (field("User id", "user_id", "number", Some(&value("user_id")), failure))
                (field("Action", "action_key", "text", Some(&value("action_key")), failure))
                (filter_select("Status", "status", &with_any(&["completed", "refunded"]), &value("status")))
                (views::date_range(&query, failure))
                button type="submit" { "Filter" }
            }
        }
    };
    let api = match filters::api_filters(&query, &CONSUMPTION_FILTERS) {
        Ok(api) => api,
        Err(failure) => {
            return page_response(
                Some(&failure),
                "Consumption",
                &session,
                None,
                filter_form(Some(&failure)),
            );
        }
    };
    // The statistics take the same filters as the list except the status.
    let statistics_filters: Vec<(&str, String)> = api
        .iter()
        .filter(|(name, _)| *name != "status")
        .cloned()
        .collect();
    let mut list_filters = api.clone();
    list_filters.push(("cursor", param(&query, "cursor")));
    let list_uri = format!(
        "/api/admin/billing/consumption?{}",
        views::query_string(&list_filters)
    );
    let day_uri = format!(
        "/api/admin/billing/consumption/statistics?group_by=day&{}",
        views::query_string(&statistics_filters)
    );
    let action_uri = format!(
        "/api/admin/billing/consumption/statistics?group_by=action&{}",
        views::query_string(&statistics_filters)
    );
    let (list, by_day, by_action) = tokio::join!(
        console.call(&session, Method::GET, &list_uri, None),
        console.call(&session, Method::GET, &day_uri, None),
        console.call(&session, Method::GET, &action_uri, None),
    );
    let list = match Failure::list_or_page(list, "Consumption", &session, filter_form) {
        Ok(list) => list,
        Err(page) => return *page,
    };
    let export_query = views::query_string(&shown);
    let status_note = !value("status").is_empty();
    let content = html! {
        (filter_form(None))
        (statistics_view(&by_day, &by_action, status_note))
        p {
            // No `download` attribute: a refused export (too many rows, busy) shows its page.
            a #export-csv href={ "/console/consumption/export.csv?" (export_query) } { "Export CSV" }
            " · "
            a #export-xlsx href={ "/console/consumption/export.xlsx?" (export_query) } { "Export Excel (.xlsx)" }
        }
        h2 { "Records" }
        (table(items(&list), &[("id", "Id"), ("created_at", "Time"), ("user_id", "User"), ("action_key", "Action"),
            ("quantity", "Quantity"), ("credits_cost", "Credits"), ("status", "Status"),
            ("refunded_credits", "Refunded"), ("idempotency_key", "Idempotency key")]))
        (views::next_page("/console/consumption", &shown, &list))
    };
    views::page("Consumption", Some(&session), None, content).into_response()
}

/// The totals and both charts, or why they are missing: the list and the exports stay usable
/// when only the statistics fail (for example a daily range over their group limit).
fn statistics_view(
    by_day: &Result<Value, Failure>,
    by_action: &Result<Value, Failure>,
    status_filtered: bool,
) -> Markup {
    let (by_day, by_action) = match (by_day, by_action) {
        (Ok(by_day), Ok(by_action)) => (by_day, by_action),
        (Err(failure), _) | (_, Err(failure)) => {
            return html! {
                p.error role="alert" { "No totals or charts for these filters: " (failure.message)
                    ". The records and the exports below are complete." }
            };
        }
    };
    let totals = &by_day["totals"];
    let truncated = by_day["truncated"].as_bool() == Some(true)
        || by_action["truncated"].as_bool() == Some(true);
    let per_action: Vec<(String, i64)> = items(by_action)
        .iter()
        .map(|group| (cell(&group["action_key"]), credits_of(group)))
        .collect();
    html! {
        div.totals #totals {
            div { "Records" strong #total-records { (cell(&totals["records"])) } }
            div { "Credits charged" strong #total-credits { (cell(&totals["credits"])) } }
            div { "Refunded" strong { (cell(&totals["refunded_credits"])) } }
            div { "Net credits" strong { (cell(&totals["net_credits"])) } }
            div { "Users" strong { (cell(&totals["distinct_users"])) } }
        }
        @if status_filtered {
            p.notice { "Totals and charts cover every status; the records and the exports below are filtered by status." }
        }
        @if truncated {
            p.error { "More groups matched than a chart shows: narrow the time range to see them all (the totals cover the whole range)." }
        }
        (views::bar_chart("Credits per day (UTC)", &daily_bars(items(by_day))))
        (views::bar_chart("Credits per action", &per_action))
    }
}

fn credits_of(group: &Value) -> i64 {
    group["credits"].as_i64().unwrap_or_default()
}

/// One bar per day from the first to the last day with records, days without any at zero, so
/// the bars are a real time axis. At most the statistics' own group limit of days.
fn daily_bars(groups: &[Value]) -> Vec<(String, i64)> {
    let days: Vec<(chrono::NaiveDate, i64)> = groups
        .iter()
        .filter_map(|group| {
            let day = group["day"].as_str()?.parse::<chrono::NaiveDate>().ok()?;
            Some((day, credits_of(group)))
        })
        .collect();
    let (Some(first), Some(last)) = (days.first(), days.last()) else {
        return Vec::new();
    };
    let mut bars = Vec::new();
    let mut known = days.iter().peekable();
    let mut day = first.0;
    while day <= last.0 && bars.len() < DAILY_BARS_MAX {
        let credits = match known.peek() {
            Some((known_day, credits)) if *known_day == day => {
                known.next();
                *credits
            }
            _ => 0,
        };
        bars.push((day.format("%Y-%m-%d").to_string(), credits));
        match day.succ_opt() {
            Some(next) => day = next,
            None => break,
        }
    }
    bars
}

/// Bars of the daily chart at most (the statistics answer at most 1,000 groups).
const DAILY_BARS_MAX: usize = 1_000;

const EVENT_FILTERS: [&str; 2] = ["kind", "user_id"];

pub async fn events(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    Query(query): Query<filters::Query>,
) -> Response {
    let value = |name: &str| param(&query, name);
    let filter_form = |failure: Option<&Failure>| {
        html! {
            form.filters method="get" action="/console/events" {
                (form_error(failure, &["kind", "user_id", "from", "to"]))
                (field("Kind", "kind", "text", Some(&value("kind")), failure))
                (field("User id", "user_id", "number", Some(&value("user_id")), failure))
                (views::date_range(&query, failure))
                button type="submit" { "Filter" }
            }
        }
    };
    let listed = match filters::api_filters(&query, &EVENT_FILTERS) {
        Ok(mut api) => {
            api.push(("cursor", value("cursor")));
            let uri = format!("/api/admin/billing/events?{}", views::query_string(&api));
            console.call(&session, Method::GET, &uri, None).await
        }
        Err(failure) => Err(failure),
    };
    let answer = match Failure::list_or_page(listed, "Audit events", &session, filter_form) {
        Ok(answer) => answer,
        Err(page) => return *page,
    };
    let content = html! {
        (filter_form(None))
        table {
            thead { tr { th { "Id" } th { "Time" } th { "Kind" } th { "User" } th { "Details" } } }
            tbody {
                @for event in items(&answer) {
                    tr {
                        td { (cell(&event["id"])) }
                        td { (cell(&event["created_at"])) }
                        td { code { (cell(&event["kind"])) } }
                        td { (cell(&event["user_id"])) }
                        td { code { (event["payload"].to_string()) } }
                    }
                }
            }
        }
        (views::next_page("/console/events", &filters::page_filters(&query, &EVENT_FILTERS), &answer))
    };
    views::page("Audit events", Some(&session), None, content).into_response()
}

/// `GET`: what a run does, and the button that runs it. A run writes an audit event per
/// mismatch, so it is a form (`POST`), not something a reload repeats.
pub async fn reconciliation_form(AdminSession(session): AdminSession) -> Response {
    let content = html! {
        (reconciliation_intro())
        (run_reconciliation_button(&session))
    };
    views::page("Reconciliation", Some(&session), None, content).into_response()
}

fn reconciliation_intro() -> Markup {
    html! {
        p { "Compares every grant's stored balance with its ledger, and idle wallets in memory with "
            "the database. It reports; it never fixes. Each mismatch is also written to the audit "
            "events. The engine also runs it on its own schedule." }
    }
}

fn run_reconciliation_button(session: &Session) -> Markup {
    html! {
        form.card method="post" action="/console/reconciliation" {
            (csrf_field(session))
            button #run-reconciliation type="submit" { "Run reconciliation now" }
        }
    }
}

pub async fn reconciliation(
    State(console): State<Console>,
    AdminSession(session): AdminSession,
    form: Form,
) -> Response {
    if let Some(refused) = session.refuse_forgery(form.get("csrf")) {
        return refused;
    }
    let report = match console
        .read(&session, "/api/admin/billing/reconciliation")
        .await
    {
        Ok(report) => report,
        Err(page) => return page,
    };
    let mismatches = report["mismatches"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let mut columns: Vec<String> = Vec::new();
    for mismatch in mismatches {
        if let Some(object) = mismatch.as_object() {
            for key in object.keys() {
                if !columns.contains(key) {
                    columns.push(key.clone());
                }
            }
        }
    }
    let content = html! {
        (reconciliation_intro())
        div.totals {
            div { "Grants checked" strong { (cell(&report["checked_grants"])) } }
            div { "Wallets checked" strong { (cell(&report["checked_wallets"])) } }
            div { "Wallets busy (skipped)" strong { (cell(&report["busy_wallets"])) } }
            div { "Mismatches" strong #mismatch-count { (mismatches.len()) } }
        }
        p { "Checked at " (cell(&report["checked_at"])) "." }
        @if mismatches.is_empty() {
            p.notice { "No mismatches: every balance agrees with its ledger." }
        } @else {
            @if report["truncated"].as_bool() == Some(true) {
                p.error { "More mismatches exist than one report shows; the first are listed." }
            }
            table {
                thead { tr { @for column in &columns { th { (column) } } } }
                tbody {
                    @for mismatch in mismatches {
                        tr { @for column in &columns { td { (cell(&mismatch[column.as_str()])) } } }
                    }
                }
            }
        }
        (run_reconciliation_button(&session))
    };
    views::page("Reconciliation", Some(&session), None, content).into_response()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::daily_bars;

    #[test]
    fn days_without_records_are_zero_bars() {
        let groups = [
            json!({"day": "2026-02-27", "credits": 5}),
            json!({"day": "2026-03-02", "credits": 7}),
        ];
        let bars: Vec<(String, i64)> = daily_bars(&groups);
        let expected = [
            ("2026-02-27", 5),
            ("2026-02-28", 0),
            ("2026-03-01", 0),
            ("2026-03-02", 7),
        ];
        assert_eq!(
            bars,
            expected.map(|(day, credits)| (day.to_owned(), credits))
        );
        assert!(daily_bars(&[]).is_empty());
    }
}
