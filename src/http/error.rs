//! The error body of the contract: `{"error": {"code", "message", ...details}}`. Internals are
//! logged, never shown to clients.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::error::EngineError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Map<String, Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// A field the client sent wrong (or left out): `422 invalid_field` naming it.
    pub fn invalid_field(field: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
            .with("field", field)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        let message = error.to_string();
        match error {
            EngineError::InsufficientCredits {
                remaining_credits,
                credits_cost,
            } => ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "insufficient_credits",
                message,
            )
            .with("remaining_credits", remaining_credits.get())
            .with("credits_cost", credits_cost.get()),
            EngineError::IdempotencyConflict => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_conflict", message)
            }
            EngineError::ConsumptionNotFound => {
                ApiError::not_found("consumption_not_found", message)
            }
            EngineError::PackageNotFound => ApiError::not_found("package_not_found", message),
            EngineError::GrantNotFound => ApiError::not_found("user_package_not_found", message),
            EngineError::GrantStatusConflict { status, .. } => {
                ApiError::new(StatusCode::CONFLICT, "invalid_user_package_status", message)
                    .with("status", status)
            }
            EngineError::GrantExpiryPassed => {
                ApiError::new(StatusCode::CONFLICT, "user_package_expiry_passed", message)
            }
            EngineError::Overloaded(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
                    .with("retryable", true)
            }
            EngineError::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
                    .with("retryable", true)
            }
            EngineError::Database(error) => {
                tracing::error!(%error, "database error");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the database could not serve this request; retry",
                )
                .with("retryable", true)
            }
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> ApiError {
        EngineError::Database(error).into()
    }
}

/// The body of every error answer (and its schema in the OpenAPI document).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorObject {
    /// Stable and machine-readable, for example `invalid_field` or `package_not_found`.
    pub code: &'static str,
    /// For people; its wording may change.
    pub message: String,
    /// The offending field (of `invalid_field`, and some `404`s).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String, required = false)]
    pub field: Option<Value>,
    /// Further details of some codes, for example `retryable` (on `503`), or
    /// `remaining_credits` and `credits_cost` (on `insufficient_credits`).
    #[serde(flatten)]
    pub details: Map<String, Value>,
}

impl IntoResponse for ApiError {
    fn into_response(mut self) -> Response {
        let body = ErrorBody {
            error: ErrorObject {
                code: self.code,
                field: self.details.remove("field"),
                message: self.message,
                details: self.details,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
