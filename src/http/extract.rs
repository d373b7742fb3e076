//! Request bodies: JSON parsed so that every mistake names its field.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Largest request body accepted, in bytes.
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// Like `axum::Json`, but a malformed body is `400 malformed_json`, and a missing, unknown or
/// wrongly typed field is `422 invalid_field` with the field's path.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("application/json"));
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            ));
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body must be at most {BODY_BYTES_MAX} bytes"),
            )
        })?;
        parse(&bytes).map(ApiJson)
    }
}

pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("the body is not valid JSON: {inner}"),
            );
        }
        let message = inner.to_string();
        // A missing field is reported at its parent's path; any other error at the field's own.
        let field = match missing_field(&message) {
            Some(name) if path == "." => name.to_owned(),
            Some(name) => format!("{path}.{name}"),
            None => path,
        };
        // serde appends " at line 1 column 9"; the field name says more to a client.
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_owned();
        ApiError::invalid_field(&field, message)
    })
}

/// A field of a body that may leave it out: absent keeps the stored value (`PUT` updates only
/// what it names), `null` clears it, a value sets it. Use with `#[serde(default)]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Patch<T> {
    #[default]
    Keep,
    Clear,
    Set(T),
}

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Patch<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(deserializer)? {
            None => Patch::Clear,
            Some(value) => Patch::Set(value),
        })
    }
}

impl<T> Patch<T> {
    /// The value after applying this patch to `current` (for a nullable field).
    pub fn apply(self, current: Option<T>) -> Option<T> {
        match self {
            Patch::Keep => current,
            Patch::Clear => None,
            Patch::Set(value) => Some(value),
        }
    }

    /// The value after applying this patch to a field that cannot be null.
    pub fn apply_required(self, field: &str, current: Option<T>) -> Result<T, ApiError> {
        match self {
            Patch::Keep => current.ok_or_else(|| ApiError::invalid_field(field, "is required")),
            Patch::Clear => Err(ApiError::invalid_field(field, "must not be null")),
            Patch::Set(value) => Ok(value),
        }
    }
}

/// A numeric id from a path segment: `422` naming `field` when it is not one.
pub fn path_id(field: &str, segment: &str) -> Result<i64, ApiError> {
    segment
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::invalid_field(field, "must be a positive integer"))
}

/// serde names a missing field only in its message: "missing field `x`".
fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        user_id: i64,
        quantity: Option<i64>,
    }

    fn field_of(json: &str) -> String {
        let error = parse::<Body>(json.as_bytes()).unwrap_err();
        assert_eq!(error.status, StatusCode::UNPROCESSABLE_ENTITY, "{error:?}");
        error.details["field"].as_str().unwrap().to_owned()
    }

    #[test]
    fn names_the_offending_field() {
        assert_eq!(field_of(r#"{"quantity": 1}"#), "user_id");
        assert_eq!(field_of(r#"{"user_id": "7"}"#), "user_id");
        assert_eq!(field_of(r#"{"user_id": 7, "quantity": 1.5}"#), "quantity");
        assert_eq!(field_of(r#"{"user_id": 7, "qty": 1}"#), "qty");
    }

    #[test]
    fn malformed_json_is_a_400() {
        let error = parse::<Body>(b"{\"user_id\": ").unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert_eq!(error.code, "malformed_json");
    }
}
