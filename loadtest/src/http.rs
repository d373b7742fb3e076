//! The engine as a [`Target`]: a bare HTTP/1.1 keep-alive connection per worker (hyper's
//! connection API, no pool), bodies written by hand and answers read into small structs, so
//! the client spends as little of the shared CPU per request as it can.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

use crate::Error;
use crate::target::{DeductReply, Outcome, RefundReply, Session, Target};

/// Longest a request may take before it counts as a transport failure and its connection is
/// replaced (the engine's own queues answer `503` long before this).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest the connection attempt of a worker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest answer body the client reads; a deduct answer is a few hundred bytes.
const RESPONSE_BYTES_MAX: usize = 64 * 1024;

const DEDUCT_PATH: &str = "/api/internal/billing/credits/deduct";
const CHECK_PATH: &str = "/api/internal/billing/credits/check";
const REFUND_PATH: &str = "/api/internal/billing/credits/refund";

/// A running engine's internal API.
#[derive(Clone, Debug)]
pub struct HttpTarget {
    shared: Arc<Shared>,
}

/// What every session of a target sends alike, built once.
#[derive(Debug)]
struct Shared {
    addr: SocketAddr,
    host: HeaderValue,
    authorization: HeaderValue,
    action_key: String,
}

impl HttpTarget {
    pub fn new(addr: SocketAddr, service_token: &str, action_key: &str) -> Result<Self, Error> {
        let host = HeaderValue::from_str(&addr.to_string())
            .map_err(|error| Error::Http(format!("host header: {error}")))?;
        let mut authorization = HeaderValue::from_str(&format!("Bearer {service_token}"))
            .map_err(|_| Error::Config("the service token is not a valid header value".into()))?;
        authorization.set_sensitive(true);
        Ok(HttpTarget {
            shared: Arc::new(Shared {
                addr,
                host,
                authorization,
                action_key: action_key.to_owned(),
            }),
        })
    }
}

impl Target for HttpTarget {
    type Session = HttpSession;

    async fn session(&self) -> Result<HttpSession, Error> {
        let sender = connect(self.shared.addr).await?;
        Ok(HttpSession {
            shared: self.shared.clone(),
            sender: Some(sender),
            body: String::with_capacity(128),
        })
    }
}

/// Opens a keep-alive HTTP/1.1 connection; its IO runs on a task of its own.
async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, Error> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| Error::Http(format!("connecting to {addr} timed out")))??;
    // Requests and answers are small: send each at once rather than waiting to coalesce.
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| Error::Http(format!("handshake with {addr}: {error}")))?;
    tokio::spawn(async move {
        // The connection ends when its sender is dropped or the engine closes it; either way
        // the session notices on its next request.
        let _closed = connection.await;
    });
    Ok(sender)
}

/// One worker's connection to the engine.
pub struct HttpSession {
    shared: Arc<Shared>,
    /// `None` after a transport failure: the next request reconnects.
    sender: Option<SendRequest<Full<Bytes>>>,
    /// The request body, rebuilt in place for every request.
    body: String,
}

/// A `200` of deduct: only the fields the run needs.
#[derive(Deserialize)]
struct DeductOk {
    consumption_id: i64,
    credits_cost: i64,
    replayed: bool,
}

/// A `200` of refund.
#[derive(Deserialize)]
struct RefundOk {
    refunded_credits: i64,
    forfeited_credits: i64,
    replayed: bool,
}

/// `{"error": {"code": ...}}`.
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorCode,
}

#[derive(Deserialize)]
struct ErrorCode {
    code: String,
}

/// The outcome of a non-`200` answer.
fn outcome_of(status: StatusCode, body: &[u8]) -> Outcome {
    match status {
        StatusCode::PAYMENT_REQUIRED => Outcome::Insufficient,
        StatusCode::CONFLICT => Outcome::Conflict,
        StatusCode::SERVICE_UNAVAILABLE => match serde_json::from_slice::<ErrorBody>(body) {
            Ok(error) if error.error.code == "overloaded" => Outcome::Overloaded,
            _ => Outcome::Unavailable,
        },
        _ => Outcome::Other,
    }
}

impl HttpSession {
    /// Sends `self.body` to `path`; the status and body, or `Transport` when no answer came.
    async fn post(&mut self, path: &'static str) -> Result<(StatusCode, Bytes), Outcome> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(HOST, self.shared.host.clone())
            .header(AUTHORIZATION, self.shared.authorization.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(Bytes::copy_from_slice(self.body.as_bytes())))
            .map_err(|_| Outcome::Other)?;
        match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(request)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(())) | Err(_) => {
                // The connection is in an unknown state: drop it and reconnect next time.
                self.sender = None;
                Err(Outcome::Transport)
            }
        }
    }

    async fn exchange(&mut self, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), ()> {
        if self.sender.is_none() {
            self.sender = Some(connect(self.shared.addr).await.map_err(|_| ())?);
        }
        let sender = self.sender.as_mut().ok_or(())?;
        sender.ready().await.map_err(|_| ())?;
        let response = sender.send_request(request).await.map_err(|_| ())?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), RESPONSE_BYTES_MAX)
            .collect()
            .await
            .map_err(|_| ())?
            .to_bytes();
        Ok((status, body))
    }
}

impl Session for HttpSession {
    async fn deduct(&mut self, user_id: i64, idempotency_key: &str) -> DeductReply {
        use std::fmt::Write;
        self.body.clear();
        // The action key and the generated idempotency keys are [a-z0-9_.-]: nothing to escape.
        let _infallible = write!(
            self.body,
            r#"{{"user_id":{user_id},"action_key":"{}","idempotency_key":"{idempotency_key}"}}"#,
            self.shared.action_key
        );
        match self.post(DEDUCT_PATH).await {
            Ok((StatusCode::OK, body)) => match serde_json::from_slice::<DeductOk>(&body) {
                Ok(ok) => DeductReply::Acked {
                    consumption_id: ok.consumption_id,
                    credits_cost: ok.credits_cost,
                    replayed: ok.replayed,
                },
                Err(_) => DeductReply::Failed(Outcome::Other),
            },
            Ok((status, body)) => DeductReply::Failed(outcome_of(status, &body)),
            Err(outcome) => DeductReply::Failed(outcome),
        }
    }

    async fn check(&mut self, user_id: i64) -> Outcome {
        use std::fmt::Write;
        self.body.clear();
        let _infallible = write!(
            self.body,
            r#"{{"user_id":{user_id},"action_key":"{}"}}"#,
            self.shared.action_key
        );
        match self.post(CHECK_PATH).await {
            Ok((StatusCode::OK, _)) => Outcome::Ok,
            Ok((status, body)) => outcome_of(status, &body),
            Err(outcome) => outcome,
        }
    }

    async fn refund(&mut self, consumption_id: i64) -> RefundReply {
        use std::fmt::Write;
        self.body.clear();
        let _infallible = write!(self.body, r#"{{"consumption_id":{consumption_id}}}"#);
        match self.post(REFUND_PATH).await {
            Ok((StatusCode::OK, body)) => match serde_json::from_slice::<RefundOk>(&body) {
                Ok(ok) => RefundReply::Acked {
                    refunded_credits: ok.refunded_credits,
                    forfeited_credits: ok.forfeited_credits,
                    replayed: ok.replayed,
                },
                Err(_) => RefundReply::Failed(Outcome::Other),
            },
            Ok((status, body)) => RefundReply::Failed(outcome_of(status, &body)),
            Err(outcome) => RefundReply::Failed(outcome),
        }
    }
}

/// Whether `GET /readyz` answers `200` now (a fresh connection each time: the engine may not
/// be listening yet).
pub async fn ready(addr: SocketAddr) -> bool {
    let Ok(mut sender) = connect(addr).await else {
        return false;
    };
    let Ok(request) = Request::builder()
        .uri("/readyz")
        .header(HOST, addr.to_string())
        .body(Full::new(Bytes::new()))
    else {
        return false;
    };
    let answer = tokio::time::timeout(CONNECT_TIMEOUT, sender.send_request(request)).await;
    matches!(answer, Ok(Ok(response)) if response.status() == StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_answers_map_to_outcomes() {
        let overloaded = br#"{"error":{"code":"overloaded","message":"m","retryable":true}}"#;
        let unavailable = br#"{"error":{"code":"unavailable","message":"m"}}"#;
        assert_eq!(
            outcome_of(StatusCode::SERVICE_UNAVAILABLE, overloaded),
            Outcome::Overloaded
        );
        assert_eq!(
            outcome_of(StatusCode::SERVICE_UNAVAILABLE, unavailable),
            Outcome::Unavailable
        );
        assert_eq!(
            outcome_of(StatusCode::PAYMENT_REQUIRED, b"{}"),
            Outcome::Insufficient
        );
        assert_eq!(outcome_of(StatusCode::CONFLICT, b""), Outcome::Conflict);
        assert_eq!(
            outcome_of(StatusCode::UNPROCESSABLE_ENTITY, b""),
            Outcome::Other
        );
    }
}
