//! The console: server-rendered pages for operators (`/console`) and end users (`/me`).
//!
//! The console is a client of the engine's own API. Each page calls the API router in process
//! with the signed-in person's JWT, so it gets exactly the API's authorization, validation,
//! audit events and error codes, and renders the JSON answer as HTML. Nothing here writes to
//! the database itself, so a form can never save more or less than the API call it makes.
//!
//! Sign-in: the person pastes a JWT once; it is verified and kept in an `HttpOnly`,
//! `SameSite=Strict` cookie that expires with the token. Every form carries a CSRF token
//! derived from that cookie (an attacker who cannot read the cookie cannot compute it), and
//! every change is a `POST` answered with a redirect (post/redirect/get).

mod admin;
mod export;
mod filters;
mod me;
mod views;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tower::ServiceExt;

use crate::http::auth::{Auth, Principal};

/// The cookie that holds the signed-in person's JWT.
const SESSION_COOKIE: &str = "credits_session";

/// Largest JSON answer the console reads from the API (a page of 500 rows is far below it).
const API_ANSWER_BYTES_MAX: usize = 16 * 1024 * 1024;

/// What the console's handlers share: the API they call, and the verifier of sign-ins.
#[derive(Clone)]
pub struct Console {
    api: Router,
    auth: Arc<Auth>,
}

/// The console's routes over `api`, the engine's API router (without a fallback, so the two
/// merge).
pub fn router(api: Router, auth: Arc<Auth>) -> Router {
    let console = Console { api, auth };
    Router::new()
        .route("/console", get(admin::home))
        .route("/console/login", get(login_form).post(login))
        .route("/me/login", get(login_form).post(login))
        .route("/console/logout", post(logout))
        .route(
            "/console/prices",
            get(admin::prices).post(admin::create_price),
        )
        .route(
            "/console/prices/{action_key}",
            get(admin::price).post(admin::update_price),
        )
        .route(
            "/console/prices/{action_key}/status",
            post(admin::set_price_status),
        )
        .route(
            "/console/packages",
            get(admin::packages).post(admin::create_package),
        )
        .route(
            "/console/packages/{id}",
            get(admin::package).post(admin::update_package),
        )
        .route(
            "/console/packages/{id}/visibility",
            post(admin::set_package_visibility),
        )
        .route(
            "/console/packages/{id}/delete",
            get(admin::confirm_delete_package).post(admin::delete_package),
        )
        .route("/console/users", get(admin::users))
        .route("/console/users/{user_id}/grants", post(admin::assign))
        .route(
            "/console/users/{user_id}/grants/{id}/activate",
            post(admin::activate),
        )
        .route(
            "/console/users/{user_id}/grants/{id}/revoke",
            post(admin::revoke),
        )
        .route("/console/consumption", get(admin::consumption))
        .route(
            "/console/consumption/export.csv",
            get(export::consumption_csv),
        )
        .route(
            "/console/consumption/export.xlsx",
            get(export::consumption_xlsx),
        )
        .route("/console/events", get(admin::events))
        .route(
            "/console/reconciliation",
            get(admin::reconciliation_form).post(admin::reconciliation),
        )
        .route("/me", get(me::credits))
        .route("/me/packages", get(me::packages))
        .route("/me/consumption", get(me::consumption))
        .route("/console/assets/console.css", get(views::stylesheet))
        .route("/console/assets/console.js", get(views::script))
        .layer(axum::middleware::map_response(security_headers))
        .layer(axum::middleware::from_fn(refuse_cross_site_posts))
        .with_state(console)
}

/// Pages load only this site's own scripts and styles, cannot be framed (no clickjacking of
/// the console's buttons), and are not kept in shared caches: they show billing data.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// A `POST` another site made the browser send is refused before any handler runs: this backs
/// the forms' CSRF tokens and also covers the sign-in form, which has no session yet (so no
/// one can sign a victim in as themselves). Browsers say where a request comes from in
/// `Sec-Fetch-Site`, and older ones in `Origin`.
async fn refuse_cross_site_posts(request: Request, next: axum::middleware::Next) -> Response {
    if request.method() == Method::POST && is_cross_site(request.headers()) {
        return views::message_page(
            StatusCode::FORBIDDEN,
            None,
            "Refused",
            "This form was sent from another site. Open the console and send it from there.",
        );
    }
    next.run(request).await
}

fn is_cross_site(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return !matches!(site.as_bytes(), b"same-origin" | b"none");
    }
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|value| value.to_str().ok());
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok());
    match (origin, host) {
        (Some(origin), Some(host)) => {
            let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            origin_host != host
        }
        // No Origin: not a cross-site form post of a current browser.
        _ => false,
    }
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, no-store"),
        );
    }
    response
}

/// The signed-in person: their JWT (sent to the API as the bearer), who it speaks for, and the
/// CSRF token their forms carry.
pub struct Session {
    token: String,
    principal: Principal,
    csrf: String,
}

impl Session {
    fn from_headers(console: &Console, headers: &HeaderMap) -> Option<Session> {
        let token = cookie(headers, SESSION_COOKIE)?;
        let principal = console.auth.verify_jwt(token).ok()?;
        Some(Session {
            csrf: csrf_token(token),
            token: token.to_owned(),
            principal,
        })
    }

    pub fn user_id(&self) -> i64 {
        self.principal.user_id.get()
    }

    pub fn is_admin(&self) -> bool {
        self.principal.admin
    }

    /// The refusal of a submitted form that does not carry this session's CSRF token.
    fn refuse_forgery(&self, submitted: Option<&str>) -> Option<Response> {
        // Compared as digests, so the time taken does not tell how much of a guess was right.
        let matches = submitted.is_some_and(|token| {
            Sha256::digest(token.as_bytes()) == Sha256::digest(self.csrf.as_bytes())
        });
        (!matches).then(|| {
            views::message_page(
                StatusCode::FORBIDDEN,
                Some(self),
                "Form expired",
                "This form was not sent from a page of your current session. Reload the page and try again.",
            )
        })
    }
}

/// Any signed-in person; others are sent to the sign-in page and brought back.
impl FromRequestParts<Console> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, console: &Console) -> Result<Session, Response> {
        Session::from_headers(console, &parts.headers).ok_or_else(|| {
            let (login, start) = if parts.uri.path().starts_with("/me") {
                ("/me/login", "/me")
            } else {
                ("/console/login", "/console")
            };
            // Back to the page after signing in; a form's target only takes POSTs, so its
            // sender returns to the start instead.
            let back = match parts.uri.path_and_query() {
                Some(path) if parts.method == Method::GET => path.as_str(),
                _ => start,
            };
            Redirect::to(&format!("{login}?next={}", views::url_encode(back))).into_response()
        })
    }
}

/// A signed-in operator (a JWT with `role: admin`).
pub struct AdminSession(pub Session);

impl FromRequestParts<Console> for AdminSession {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Console,
    ) -> Result<AdminSession, Response> {
        let session = Session::from_request_parts(parts, console).await?;
        if !session.is_admin() {
            return Err(views::message_page(
                StatusCode::FORBIDDEN,
                Some(&session),
                "Operators only",
                "The console needs a token with the admin role. Your own billing is under /me.",
            ));
        }
        Ok(AdminSession(session))
    }
}

/// The value of one cookie of the request.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
        .filter(|value| !value.is_empty())
}

fn csrf_token(session_token: &str) -> String {
    hex::encode(Sha256::digest(
        format!("credits-console-csrf\0{session_token}").as_bytes(),
    ))
}

/// An API answer that was not a success, as the console shows it.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    /// The field the API named, for showing the message next to it.
    pub field: Option<String>,
}

impl Failure {
    fn from_answer(status: StatusCode, body: &Value) -> Failure {
        let error = &body["error"];
        Failure {
            status,
            code: error["code"].as_str().unwrap_or("error").to_owned(),
            message: error["message"]
                .as_str()
                .map_or_else(|| format!("the engine answered {status}"), str::to_owned),
            field: error["field"].as_str().map(str::to_owned),
        }
    }

    /// A field the console itself found wrong before calling the API.
    fn field(field: &str, message: impl Into<String>) -> Failure {
        Failure {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_field".to_owned(),
            message: message.into(),
            field: Some(field.to_owned()),
        }
    }

    /// The message, when it belongs next to `field`.
    pub fn for_field(&self, field: &str) -> Option<&str> {
        (self.field.as_deref() == Some(field)).then_some(self.message.as_str())
    }

    /// A whole page for a failure that no form can show (a read that failed).
    /// A list page's answer, or the page to show instead: a filter the API refused is shown
    /// in `form`, next to the field it names, with the API's status; any other failure is an
    /// error page.
    fn list_or_page(
        listed: Result<Value, Failure>,
        title: &str,
        session: &Session,
        form: impl Fn(Option<&Failure>) -> maud::Markup,
    ) -> Result<Value, Box<Response>> {
        match listed {
            Ok(answer) => Ok(answer),
            Err(failure) if failure.field.is_some() => {
                let body = views::page(title, Some(session), None, form(Some(&failure)));
                Err(Box::new((failure.status, body).into_response()))
            }
            Err(failure) => Err(Box::new(failure.page(session))),
        }
    }

    fn page(&self, session: &Session) -> Response {
        if self.status == StatusCode::UNAUTHORIZED {
            let login = if session.is_admin() {
                "/console/login"
            } else {
                "/me/login"
            };
            return Redirect::to(login).into_response();
        }
        views::message_page(
            self.status,
            Some(session),
            "Something went wrong",
            &format!("{} ({})", self.message, self.code),
        )
    }
}

impl Console {
    /// Calls the API as `session` and answers the JSON body of a success.
    async fn call(
        &self,
        session: &Session,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        self.call_with_status(session, method, uri, body)
            .await
            .map(|(_, answer)| answer)
    }

    /// [`Console::call`], with the status of the success (`201` created, `200` already there).
    async fn call_with_status(
        &self,
        session: &Session,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), Failure> {
        let response = self.send(session, method, uri, body).await?;
        let status = response.status();
        let bytes = read_body(response).await?;
        let answer: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|error| Failure {
                status: StatusCode::BAD_GATEWAY,
                code: "bad_answer".to_owned(),
                message: format!("the API's answer is not JSON: {error}"),
                field: None,
            })?
        };
        if status.is_success() {
            Ok((status, answer))
        } else {
            Err(Failure::from_answer(status, &answer))
        }
    }

    /// A read for a page: the answer, or the page that explains why there is none.
    async fn read(&self, session: &Session, uri: &str) -> Result<Value, Response> {
        self.call(session, Method::GET, uri, None)
            .await
            .map_err(|failure| failure.page(session))
    }

    /// Calls the API as `session` and answers its response as it is when it succeeded (for
    /// streaming downloads through).
    async fn send(
        &self,
        session: &Session,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> Result<Response, Failure> {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", session.token));
        let body = match body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        let request = request.body(body).map_err(|error| Failure {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request".to_owned(),
            message: format!("cannot build the request: {error}"),
            field: None,
        })?;
        let response = match self.api.clone().oneshot(request).await {
            Ok(response) => response,
            Err(infallible) => match infallible {},
        };
        if response.status().is_success() {
            Ok(response)
        } else {
            let status = response.status();
            let bytes = read_body(response).await?;
            let answer = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            Err(Failure::from_answer(status, &answer))
        }
    }
}

async fn read_body(response: Response) -> Result<axum::body::Bytes, Failure> {
    axum::body::to_bytes(response.into_body(), API_ANSWER_BYTES_MAX)
        .await
        .map_err(|error| Failure {
            status: StatusCode::BAD_GATEWAY,
            code: "bad_answer".to_owned(),
            message: format!("cannot read the API's answer: {error}"),
            field: None,
        })
}

/// The sign-in form's fields.
#[derive(Debug, serde::Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

async fn login_form(
    axum::extract::OriginalUri(uri): axum::extract::OriginalUri,
    axum::extract::Query(query): axum::extract::Query<NextQuery>,
) -> Response {
    let next = safe_next(query.next.as_deref(), uri.path());
    views::login_page(StatusCode::OK, uri.path(), &next, None).into_response()
}

async fn login(
    State(console): State<Console>,
    axum::extract::OriginalUri(uri): axum::extract::OriginalUri,
    headers: HeaderMap,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    let next = safe_next(form.next.as_deref(), uri.path());
    let token = form.token.trim();
    let verified = if token.is_empty() {
        Err("paste the token you were given".to_owned())
    } else {
        console
            .auth
            .verify_claims(token)
            .map_err(|error| error.message)
    };
    let (principal, expires_at) = match verified {
        Ok(verified) => verified,
        Err(message) => {
            return views::login_page(StatusCode::UNAUTHORIZED, uri.path(), &next, Some(&message))
                .into_response();
        }
    };
    let next = if principal.admin || next.starts_with("/me") {
        next
    } else {
        "/me".to_owned()
    };
    let max_age = (expires_at - chrono::Utc::now().timestamp()).max(0);
    // Behind a proxy that terminates TLS, the cookie is also never sent over plain HTTP.
    let secure = headers
        .get("x-forwarded-proto")
        .is_some_and(|proto| proto.as_bytes().eq_ignore_ascii_case(b"https"))
        || headers
            .get(header::FORWARDED)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.to_ascii_lowercase().contains("proto=https"));
    let cookie = format!(
        "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    );
    session_redirect(&next, &cookie)
}

async fn logout(State(console): State<Console>, headers: HeaderMap, form: Form) -> Response {
    if let Some(session) = Session::from_headers(&console, &headers)
        && let Some(refused) = session.refuse_forgery(form.get("csrf"))
    {
        return refused;
    }
    let cookie = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    session_redirect("/console/login", &cookie)
}

fn session_redirect(to: &str, cookie: &str) -> Response {
    let mut response = Redirect::to(to).into_response();
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// Where to go after signing in: a console or `/me` page of this site only (never `//host`, a
/// full URL, or anything a `Location` header cannot carry as it is).
fn safe_next(next: Option<&str>, login_path: &str) -> String {
    let default = if login_path.starts_with("/me") {
        "/me"
    } else {
        "/console"
    };
    next.filter(|next| is_console_path(next))
        .unwrap_or(default)
        .to_owned()
}

fn is_console_path(target: &str) -> bool {
    let within = |root: &str| {
        target
            .strip_prefix(root)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
    };
    (within("/console") || within("/me"))
        && target.bytes().all(|byte| byte.is_ascii_graphic())
        && !target.contains("//")
        && !target.contains('\\')
        && target.parse::<axum::http::uri::PathAndQuery>().is_ok()
}

/// A submitted form: its fields by name (a field sent twice keeps its last value).
pub struct Form(std::collections::HashMap<String, String>);

impl Form {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// The field, trimmed, or `None` when it is missing or blank.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.get(name)
            .map(str::trim)
            .filter(|text| !text.is_empty())
    }

    /// A checkbox: present means checked.
    pub fn checked(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

impl<S: Send + Sync> axum::extract::FromRequest<S> for Form {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Form, Response> {
        let axum::Form(fields) = axum::Form::<Vec<(String, String)>>::from_request(request, state)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Form(fields.into_iter().collect()))
    }
}

/// How a form field becomes a JSON field of an API body.
#[derive(Clone, Copy)]
enum Kind {
    /// Text; blank is `null` (cleared, or "missing" where the API requires it).
    Text,
    /// Text; blank leaves the field out, so the API's default or the current value holds.
    OptionalText,
    /// A whole number; blank leaves it out. Not a number is sent as text, so the API names
    /// the field in its answer.
    Integer,
    /// A whole number; blank is `null`.
    NullableInteger,
    /// A checkbox.
    Checkbox,
}

/// Builds an API body from form fields.
fn json_body(form: &Form, fields: &[(&str, Kind)]) -> Value {
    let mut body = serde_json::Map::new();
    for &(name, kind) in fields {
        let text = form.text(name);
        let value = match (kind, text) {
            (Kind::Checkbox, _) => Value::Bool(form.checked(name)),
            (Kind::Text | Kind::NullableInteger, None) => Value::Null,
            (Kind::OptionalText | Kind::Integer, None) => continue,
            (Kind::Text | Kind::OptionalText, Some(text)) => Value::String(text.to_owned()),
            (Kind::Integer | Kind::NullableInteger, Some(text)) => text
                .parse::<i64>()
                .map_or_else(|_| Value::String(text.to_owned()), Value::from),
        };
        body.insert(name.to_owned(), value);
    }
    Value::Object(body)
}
