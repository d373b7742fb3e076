//! Parse, don't validate: request fields become domain values here or a `422` naming the field.

use serde_json::Value;

use super::error::ApiError;
use crate::domain::UserId;

/// Largest quantity one deduction may carry.
pub const QUANTITY_MAX: i64 = 1_000_000;
/// Longest idempotency key, in characters (printable ASCII).
pub const IDEMPOTENCY_KEY_CHARS_MAX: usize = 128;
/// Largest metadata object, in bytes of its JSON.
pub const METADATA_BYTES_MAX: usize = 4_096;
/// Longest free-text field (reason, note), in characters.
pub const TEXT_CHARS_MAX: usize = 1_024;
/// Longest external reference, in characters.
pub const EXTERNAL_REF_CHARS_MAX: usize = 128;

/// Largest price of one unit of an action, in credits. With `QUANTITY_MAX` it bounds one
/// deduction to 10^15 credits, far from `i64` overflow.
pub const CREDITS_COST_MAX: i64 = 1_000_000_000;
/// Largest credits a package may grant.
pub const CREDITS_AMOUNT_MAX: i64 = 1_000_000_000_000;
/// Longest validity of a package, in days (100 years).
pub const DURATION_DAYS_MAX: i32 = 36_500;
/// Largest package price, in cents.
pub const PRICE_CENTS_MAX: i64 = 1_000_000_000_000;
/// Bound of priorities and sort orders, either sign.
pub const ORDER_ABS_MAX: i32 = 1_000_000;
/// Longest name, in characters.
pub const NAME_CHARS_MAX: usize = 128;

/// A required name: 1 to 128 characters, not only spaces.
pub fn name(field: &str, value: String) -> Result<String, ApiError> {
    let trimmed = value.trim();
    if trimmed.is_empty() || trimmed.chars().count() > NAME_CHARS_MAX || trimmed.contains('\0') {
        return Err(ApiError::invalid_field(
            field,
            format!("must be 1-{NAME_CHARS_MAX} characters"),
        ));
    }
    Ok(trimmed.to_owned())
}

/// An integer within `range`, named in the error.
pub fn within<T>(field: &str, value: T, range: std::ops::RangeInclusive<T>) -> Result<T, ApiError>
where
    T: PartialOrd + std::fmt::Display + Copy,
{
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(ApiError::invalid_field(
            field,
            format!("must be between {} and {}", range.start(), range.end()),
        ))
    }
}

pub fn user_id(field: &str, value: i64) -> Result<UserId, ApiError> {
    if value <= 0 {
        return Err(ApiError::invalid_field(field, "must be a positive integer"));
    }
    Ok(UserId(value))
}

/// `[a-z0-9_.-]`, 1 to 64 characters.
pub fn action_key(value: &str) -> Result<&str, ApiError> {
    let well_formed = (1..=64).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if !well_formed {
        return Err(ApiError::invalid_field(
            "action_key",
            "must be 1-64 characters of [a-z0-9_.-]",
        ));
    }
    Ok(value)
}

pub fn quantity(value: Option<i64>) -> Result<i64, ApiError> {
    let quantity = value.unwrap_or(1);
    if !(1..=QUANTITY_MAX).contains(&quantity) {
        return Err(ApiError::invalid_field(
            "quantity",
            format!("must be between 1 and {QUANTITY_MAX}"),
        ));
    }
    Ok(quantity)
}

pub fn idempotency_key(value: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(key) = value else { return Ok(None) };
    let well_formed = (1..=IDEMPOTENCY_KEY_CHARS_MAX).contains(&key.len())
        && key.bytes().all(|b| b.is_ascii_graphic());
    if !well_formed {
        return Err(ApiError::invalid_field(
            "idempotency_key",
            format!("must be 1-{IDEMPOTENCY_KEY_CHARS_MAX} printable ASCII characters"),
        ));
    }
    Ok(Some(key))
}

pub fn metadata(value: Option<Value>) -> Result<Option<Value>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => {
            let value = Value::Object(map);
            let bytes = serde_json::to_vec(&value)
                .map(|json| json.len())
                .unwrap_or(usize::MAX);
            if bytes > METADATA_BYTES_MAX {
                return Err(ApiError::invalid_field(
                    "metadata",
                    format!("must be at most {METADATA_BYTES_MAX} bytes of JSON"),
                ));
            }
            if contains_nul(&value) {
                // PostgreSQL's jsonb cannot store U+0000; refusing it here keeps it out of a batch.
                return Err(ApiError::invalid_field(
                    "metadata",
                    "must not contain NUL (\\u0000) characters",
                ));
            }
            Ok(Some(value))
        }
        Some(_) => Err(ApiError::invalid_field("metadata", "must be a JSON object")),
    }
}

/// True when any key or string inside `value` holds U+0000.
fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map
            .iter()
            .any(|(key, value)| key.contains('\0') || contains_nul(value)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Optional free text bounded to `max` characters; empty counts as absent.
pub fn text(field: &str, value: Option<String>, max: usize) -> Result<Option<String>, ApiError> {
    let Some(text) = value.filter(|text| !text.is_empty()) else {
        return Ok(None);
    };
    if text.chars().count() > max {
        return Err(ApiError::invalid_field(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if text.contains('\0') {
        return Err(ApiError::invalid_field(
            field,
            "must not contain NUL characters",
        ));
    }
    Ok(Some(text))
}
