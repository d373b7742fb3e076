//! The console's page shell and the pieces its pages share: tables, form fields with their
//! errors, pagination, charts. Everything is rendered with maud, which escapes by default.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use super::filters::{Query, param};
use super::{Failure, Session};

/// The stylesheet, embedded in the binary.
const STYLESHEET: &str = include_str!("console.css");

/// The console's only script: the package form's fields by type, and confirmations.
const SCRIPT: &str = include_str!("console.js");

pub async fn stylesheet() -> Response {
    asset("text/css; charset=utf-8", STYLESHEET)
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// A whole page: the navigation for who is signed in, an optional notice, the content.
pub fn page(
    title: &str,
    session: Option<&Session>,
    notice: Option<&str>,
    content: Markup,
) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · credits-engine" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
            }
            body {
                header {
                    strong { "credits-engine" }
                    @if let Some(session) = session {
                        nav {
                            @if session.is_admin() {
                                a href="/console/prices" { "Action prices" }
                                a href="/console/packages" { "Packages" }
                                a href="/console/users" { "User packages" }
                                a href="/console/consumption" { "Consumption" }
                                a href="/console/events" { "Audit events" }
                                a href="/console/reconciliation" { "Reconciliation" }
                            }
                            a href="/me" { "My credits" }
                            a href="/me/packages" { "My packages" }
                            a href="/me/consumption" { "My consumption" }
                        }
                        form.inline method="post" action="/console/logout" {
                            (csrf_field(session))
                            span.who { "user " (session.user_id()) @if session.is_admin() { " (admin)" } }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    @if let Some(notice) = notice {
                        p.notice role="status" { (notice) }
                    }
                    (content)
                }
            }
        }
    }
}

/// A page that only says something (an error, a refusal), with its status.
pub fn message_page(
    status: StatusCode,
    session: Option<&Session>,
    title: &str,
    message: &str,
) -> Response {
    let body = page(
        title,
        session,
        None,
        html! { p.error role="alert" { (message) } },
    );
    (status, body).into_response()
}

pub fn login_page(status: StatusCode, action: &str, next: &str, error: Option<&str>) -> Response {
    let content = html! {
        p { "Paste the token (JWT) you were given. Operators' tokens carry the admin role; "
            "the console keeps it in a cookie that only this site can send." }
        form method="post" action=(action) {
            input type="hidden" name="next" value=(next);
            label for="token" { "Token" }
            textarea id="token" name="token" rows="4" cols="70" required {}
            @if let Some(error) = error {
                p.field-error role="alert" { (error) }
            }
            button type="submit" { "Sign in" }
        }
    };
    (status, page("Sign in", None, None, content)).into_response()
}

pub fn csrf_field(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// A control with its label, and the API's message under it when that field was wrong.
fn labelled(
    label: &str,
    id: &str,
    name: &str,
    failure: Option<&Failure>,
    control: Markup,
) -> Markup {
    let error = failure.and_then(|failure| failure.for_field(name));
    html! {
        div.field.invalid[error.is_some()] id={ "field-" (id) } {
            label for=(id) { (label) }
            (control)
            @if let Some(error) = error {
                span.field-error role="alert" { (error) }
            }
        }
    }
}

/// A labelled input.
pub fn field(
    label: &str,
    name: &str,
    input_type: &str,
    value: Option<&str>,
    failure: Option<&Failure>,
) -> Markup {
    let input = html! { input id=(name) name=(name) type=(input_type) value=[value]; };
    labelled(label, name, name, failure, input)
}

/// The `from` and `to` dates of a filter form (UTC days, both inclusive).
pub fn date_range(query: &Query, failure: Option<&Failure>) -> Markup {
    html! {
        (field("From (UTC date)", "from", "date", Some(&param(query, "from")), failure))
        (field("To (UTC date, inclusive)", "to", "date", Some(&param(query, "to")), failure))
    }
}

fn options_of(options: &[(String, String)], selected: Option<&str>) -> Markup {
    html! {
        @for (value, text) in options {
            option value=(value) selected[selected == Some(value.as_str())] { (text) }
        }
    }
}

/// A labelled select; `options` are `(value, label)`.
pub fn select(
    label: &str,
    name: &str,
    options: &[(String, String)],
    selected: Option<&str>,
    failure: Option<&Failure>,
) -> Markup {
    let control = html! { select id=(name) name=(name) { (options_of(options, selected)) } };
    labelled(label, name, name, failure, control)
}

/// A select of a filter form: its id is `filter-<name>`, so it never collides with the field
/// of the same name in a form on the same page.
pub fn filter_select(
    label: &str,
    name: &str,
    options: &[(String, String)],
    selected: &str,
) -> Markup {
    let id = format!("filter-{name}");
    let control = html! { select id=(id) name=(name) { (options_of(options, Some(selected))) } };
    labelled(label, &id, name, None, control)
}

pub fn checkbox(label: &str, name: &str, checked: bool, failure: Option<&Failure>) -> Markup {
    let error = failure.and_then(|failure| failure.for_field(name));
    html! {
        div.field.check id={ "field-" (name) } {
            label {
                input type="checkbox" name=(name) value="on" checked[checked];
                " " (label)
            }
            @if let Some(error) = error {
                span.field-error role="alert" { (error) }
            }
        }
    }
}

/// The failure of a form that no single field explains.
pub fn form_error(failure: Option<&Failure>, fields: &[&str]) -> Markup {
    html! {
        @if let Some(failure) = failure {
            @if failure.field.as_deref().is_none_or(|field| !fields.contains(&field)) {
                p.error role="alert" { (failure.message) " (" (failure.code) ")" }
            }
        }
    }
}

/// A JSON value as a table cell: strings bare, `null` blank, times shortened.
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => time_text(text).unwrap_or_else(|| text.clone()),
        Value::Bool(true) => "yes".to_owned(),
        Value::Bool(false) => "no".to_owned(),
        other => other.to_string(),
    }
}

/// A JSON value as an input's value, unformatted (what the API holds, so saving the form
/// unchanged sends back the same value); `None` for `null`.
pub fn raw(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(text) => Some(text.clone()),
        other => Some(other.to_string()),
    }
}

/// An RFC 3339 time as `2026-11-25 14:03:07 UTC`; `None` for other text.
fn time_text(text: &str) -> Option<String> {
    let time = chrono::DateTime::parse_from_rfc3339(text).ok()?;
    Some(
        time.with_timezone(&chrono::Utc)
            .format("%Y-%m-%d %H:%M:%S UTC")
            .to_string(),
    )
}

/// A table of `items` (JSON objects) with the named columns.
pub fn table(items: &[Value], columns: &[(&str, &str)]) -> Markup {
    html! {
        @if items.is_empty() {
            p.empty { "Nothing to show." }
        } @else {
            table {
                thead { tr { @for (_, title) in columns { th { (title) } } } }
                tbody {
                    @for item in items {
                        tr { @for (key, _) in columns { td { (cell(&item[*key])) } } }
                    }
                }
            }
        }
    }
}

/// The items of a list answer.
pub fn items(answer: &Value) -> &[Value] {
    answer["items"].as_array().map_or(&[], Vec::as_slice)
}

/// A link to the next page of a keyset-paged list, keeping the current filters.
pub fn next_page(path: &str, query: &[(&str, String)], answer: &Value) -> Markup {
    let Some(cursor) = answer["next_cursor"].as_str() else {
        return html! {};
    };
    let mut query = query.to_vec();
    query.push(("cursor", cursor.to_owned()));
    let href = format!("{path}?{}", query_string(&query));
    html! { p.pager { a href=(href) { "Next page →" } } }
}

/// `key=value&...` of the non-empty values, percent-encoded.
pub fn query_string(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(key, value)| format!("{key}={}", url_encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

pub fn url_encode(text: &str) -> String {
    serde_urlencoded::to_string([("", text)])
        .map(|encoded| encoded.trim_start_matches('=').to_owned())
        .unwrap_or_default()
}

/// A bar chart as inline SVG: one bar per `(label, value)`, scaled to the largest.
pub fn bar_chart(title: &str, bars: &[(String, i64)]) -> Markup {
    const WIDTH: f64 = 720.0;
    const HEIGHT: f64 = 220.0;
    const LABELS: f64 = 48.0;
    const TOP: f64 = 16.0;
    let max = bars
        .iter()
        .map(|(_, value)| *value)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let slot = WIDTH / bars.len().max(1) as f64;
    let bar_width = (slot * 0.7).max(1.0);
    // Label at most about 16 bars so the labels never overlap.
    let label_every = bars.len().div_ceil(16).max(1);
    let plot = HEIGHT - LABELS - TOP;
    html! {
        figure.chart {
            figcaption { (title) }
            @if bars.is_empty() {
                p.empty { "No records in this range." }
            } @else {
                svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label=(title)
                    viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } width=(WIDTH) height=(HEIGHT) {
                    @for (index, (label, value)) in bars.iter().enumerate() {
                        @let height = (*value as f64 / max) * plot;
                        @let x = index as f64 * slot + (slot - bar_width) / 2.0;
                        @let y = TOP + plot - height;
                        rect x=(format!("{x:.1}")) y=(format!("{y:.1}")) width=(format!("{bar_width:.1}"))
                            height=(format!("{height:.1}")) class="bar" {
                            title { (label) ": " (value) }
                        }
                        @if bars.len() <= 16 {
                            text x=(format!("{:.1}", x + bar_width / 2.0)) y=(format!("{:.1}", (y - 3.0).max(10.0)))
                                text-anchor="middle" class="value" { (value) }
                        }
                        @if index % label_every == 0 {
                            text x=(format!("{:.1}", x + bar_width / 2.0)) y=(format!("{:.1}", HEIGHT - LABELS + 14.0))
                                text-anchor="middle" class="label" { (label) }
                        }
                    }
                    line x1="0" x2=(WIDTH) y1=(TOP + plot) y2=(TOP + plot) class="axis" {}
                }
            }
        }
    }
}
