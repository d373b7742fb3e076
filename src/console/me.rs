//! An end user's pages: their credits, their packages and their consumption. Each reads the
//! user API with the user's own token, so it can only ever show that user's data.

use axum::extract::{Query, State};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use maud::html;

use super::filters::{self, param};
use super::views::{self, cell, field, filter_select, items, table};
use super::{Console, Failure, Session};

pub async fn credits(State(console): State<Console>, session: Session) -> Response {
    let summary = match console.read(&session, "/api/user/billing/credits").await {
        Ok(summary) => summary,
        Err(page) => return page,
    };
    let grants = summary["grants"].as_array().map_or(&[][..], Vec::as_slice);
    let content = html! {
        div.totals {
            div { "Credits you can spend" strong #my-remaining {
                @if summary["unlimited"].as_bool() == Some(true) { "unlimited" } @else { (cell(&summary["remaining_credits"])) }
            } }
            @if summary["unlimited"].as_bool() == Some(true) {
                div { "Also limited credits" strong { (cell(&summary["remaining_credits"])) } }
            }
        }
        @if summary["truncated"].as_bool() == Some(true) {
            p.error { "You hold more packages than one page sums; the total covers the oldest of them." }
        }
        h2 { "By package (the order they are spent in)" }
        table #my-grants {
            thead { tr { th { "Package" } th { "Status" } th { "Total" } th { "Used" } th { "Remaining" } th { "Activated" } th { "Expires" } } }
            tbody {
                @for grant in grants {
                    @let unlimited = grant["unlimited"].as_bool() == Some(true);
                    tr {
                        td { (cell(&grant["package_name"])) }
                        td { (cell(&grant["status"])) }
                        td { @if unlimited { "unlimited" } @else { (cell(&grant["total_credits"])) } }
                        td { (cell(&grant["used_credits"])) }
                        td { @if unlimited { "unlimited" } @else { (cell(&grant["remaining_credits"])) } }
                        td { (cell(&grant["activated_at"])) }
                        td { @if grant["expires_at"].is_null() { "never" } @else { (cell(&grant["expires_at"])) } }
                    }
                }
            }
        }
        @if grants.is_empty() { p.empty { "You have no active packages." } }
    };
    views::page("My credits", Some(&session), None, content).into_response()
}

pub async fn packages(
    State(console): State<Console>,
    session: Session,
    Query(query): Query<filters::Query>,
) -> Response {
    let status = param(&query, "status");
    let pairs = [
        ("status", status.clone()),
        ("cursor", param(&query, "cursor")),
    ];
    let uri = format!("/api/user/billing/packages?{}", views::query_string(&pairs));
    let answer = match console.read(&session, &uri).await {
        Ok(answer) => answer,
        Err(page) => return page,
    };
    let statuses = ["", "pending", "active", "depleted", "expired", "revoked"].map(|value| {
        (
            value.to_owned(),
            if value.is_empty() { "any" } else { value }.to_owned(),
        )
    });
    let content = html! {
        form.filters method="get" action="/me/packages" {
            (filter_select("Status", "status", &statuses, &status))
            button type="submit" { "Filter" }
        }
        (table(items(&answer), &[("package_name", "Package"), ("status", "Status"), ("source", "Source"),
            ("total_credits", "Total"), ("used_credits", "Used"), ("remaining_credits", "Remaining"),
            ("unlimited", "Unlimited"), ("activated_at", "Activated"), ("expires_at", "Expires")]))
        (views::next_page("/me/packages", &[("status", status)], &answer))
    };
    views::page("My packages", Some(&session), None, content).into_response()
}

pub async fn consumption(
    State(console): State<Console>,
    session: Session,
    Query(query): Query<filters::Query>,
) -> Response {
    let value = |name: &str| param(&query, name);
    let filter_form = |failure: Option<&Failure>| {
        html! {
            form.filters method="get" action="/me/consumption" {
                (views::form_error(failure, &["action_key", "from", "to"]))
                (field("Action", "action_key", "text", Some(&value("action_key")), failure))
                (views::date_range(&query, failure))
                button type="submit" { "Filter" }
            }
        }
    };
    let listed = match filters::api_filters(&query, &["action_key"]) {
        Ok(mut api) => {
            api.push(("cursor", value("cursor")));
            let uri = format!(
                "/api/user/billing/consumption?{}",
                views::query_string(&api)
            );
            console.call(&session, Method::GET, &uri, None).await
        }
        Err(failure) => Err(failure),
    };
    let answer = match Failure::list_or_page(listed, "My consumption", &session, filter_form) {
        Ok(answer) => answer,
        Err(page) => return *page,
    };
    let content = html! {
        (filter_form(None))
        (table(items(&answer), &[("created_at", "Time"), ("action_key", "Action"), ("quantity", "Quantity"),
            ("credits_cost", "Credits"), ("status", "Status"), ("refunded_credits", "Refunded")]))
        (views::next_page("/me/consumption", &filters::page_filters(&query, &["action_key"]), &answer))
    };
    views::page("My consumption", Some(&session), None, content).into_response()
}
