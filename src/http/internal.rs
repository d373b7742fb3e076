//! The internal API that workflow services call: check, deduct, refund.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::ApiJson;
use super::validate;
use crate::domain::{ConsumptionId, Credits};
use crate::error::EngineError;
use crate::metrics;
use crate::wallet::{
    CheckAnswer, DeductAnswer, DeductRequest, RefundAnswer, RefundRequest, RefundTarget,
    RegisterAnswer, WalletMsg,
};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckBody {
    user_id: i64,
    action_key: String,
    /// Units of the action; 1 when left out.
    quantity: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeductBody {
    user_id: i64,
    action_key: String,
    /// Units of the action; 1 when left out.
    quantity: Option<i64>,
    /// Unique per user: a retry with the same key and request replays the first answer.
    idempotency_key: Option<String>,
    /// Any JSON object, stored with the consumption.
    metadata: Option<Value>,
}

/// Names the deduction to refund: `consumption_id` alone, or `user_id` with `idempotency_key`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundBody {
    consumption_id: Option<i64>,
    user_id: Option<i64>,
    idempotency_key: Option<String>,
    reason: Option<String>,
}

/// The price of `quantity` units of an action, from the catalog snapshot.
struct Priced {
    unit_cost: Credits,
    credits_cost: Credits,
    version: i64,
}

fn price(state: &AppState, action_key: &str, quantity: i64) -> Result<Priced, ApiError> {
    let snapshot = state.catalog.snapshot();
    let price = snapshot.price(action_key).ok_or_else(|| {
        ApiError::not_found("unknown_action", format!("no action named {action_key}"))
            .with("action_key", action_key)
    })?;
    if !price.enabled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "action_disabled",
            format!("the action {action_key} is disabled"),
        )
        .with("action_key", action_key));
    }
    let credits_cost = price.credits_cost.checked_mul(quantity).ok_or_else(|| {
        ApiError::invalid_field("quantity", "the cost of this quantity overflows")
    })?;
    Ok(Priced {
        unit_cost: price.credits_cost,
        credits_cost,
        version: price.version,
    })
}

/// The canonical form of a deduction request: serde_json sorts object keys, so the same request
/// always hashes the same however its metadata was ordered.
fn fingerprint(action_key: &str, quantity: i64, metadata: Option<&Value>) -> String {
    let canonical = json!({
        "action_key": action_key,
        "quantity": quantity,
        "metadata": metadata,
    });
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

/// Whether the user can pay for an action now; nothing is deducted.
#[utoipa::path(
    post,
    path = "/api/internal/billing/credits/check",
    tag = "internal",
    security(("service_token" = [])),
    request_body = CheckBody,
    responses(
        (status = 200, description = "What the action costs and what the user has", body = CheckAnswer),
        (status = 401, description = "No or an unknown service token", body = ErrorBody),
        (status = 404, description = "`unknown_action`", body = ErrorBody),
        (status = 409, description = "`action_disabled`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`overloaded` or `unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(level = "debug", skip_all, fields(user_id = body.user_id, action_key = %body.action_key))]
pub async fn check(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CheckBody>,
) -> Result<Json<CheckAnswer>, ApiError> {
    let user_id = validate::user_id("user_id", body.user_id)?;
    let action_key = validate::action_key(&body.action_key)?;
    let quantity = validate::quantity(body.quantity)?;
    let priced = price(&state, action_key, quantity)?;
    let answer = state
        .registry
        .ask(user_id, |reply| WalletMsg::Check {
            credits_cost: priced.credits_cost,
            reply,
        })
        .await?;
    Ok(Json(answer))
}

/// Charges the user for an action; the `200` is sent once the deduction is committed.
#[utoipa::path(
    post,
    path = "/api/internal/billing/credits/deduct",
    tag = "internal",
    security(("service_token" = [])),
    request_body = DeductBody,
    responses(
        (status = 200, description = "Deducted (or replayed, for a repeated idempotency key)", body = DeductAnswer),
        (status = 401, description = "No or an unknown service token", body = ErrorBody),
        (status = 402, description = "`insufficient_credits`; nothing was deducted", body = ErrorBody),
        (status = 404, description = "`unknown_action`", body = ErrorBody),
        (status = 409, description = "`action_disabled`, or `idempotency_conflict` (the key was used for another request)", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`overloaded` or `unavailable`; retry", body = ErrorBody),
    ),
)]
pub async fn deduct(
    State(state): State<AppState>,
    body: Result<ApiJson<DeductBody>, ApiError>,
) -> Result<Json<DeductAnswer>, ApiError> {
    let answer = match body {
        Ok(ApiJson(body)) => deduct_body(&state, body).await,
        Err(error) => Err(error),
    };
    metrics::deduct_outcome(match &answer {
        Ok(answer) if answer.replayed => "replayed",
        Ok(_) => "ok",
        Err(error) => metrics::outcome_of_code(error.code),
    });
    answer.map(Json)
}

#[tracing::instrument(level = "debug", skip_all, fields(user_id = body.user_id, action_key = %body.action_key))]
async fn deduct_body(state: &AppState, body: DeductBody) -> Result<DeductAnswer, ApiError> {
    let user_id = validate::user_id("user_id", body.user_id)?;
    let action_key = validate::action_key(&body.action_key)?.to_owned();
    let quantity = validate::quantity(body.quantity)?;
    let idempotency_key = validate::idempotency_key(body.idempotency_key)?;
    let metadata = validate::metadata(body.metadata)?;
    let priced = price(state, &action_key, quantity)?;
    let request = DeductRequest {
        fingerprint: fingerprint(&action_key, quantity, metadata.as_ref()),
        action_key,
        quantity,
        unit_cost: priced.unit_cost,
        credits_cost: priced.credits_cost,
        price_version: priced.version,
        idempotency_key,
        metadata,
    };
    Ok(state
        .registry
        .ask(user_id, |reply| WalletMsg::Deduct { request, reply })
        .await?)
}

/// Gives a deduction's credits back to the grants they came from.
#[utoipa::path(
    post,
    path = "/api/internal/billing/credits/refund",
    tag = "internal",
    security(("service_token" = [])),
    request_body = RefundBody,
    responses(
        (status = 200, description = "Refunded (or replayed, for a refund made before)", body = RefundAnswer),
        (status = 401, description = "No or an unknown service token", body = ErrorBody),
        (status = 404, description = "`consumption_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`overloaded` or `unavailable`; retry", body = ErrorBody),
    ),
)]
pub async fn refund(
    State(state): State<AppState>,
    body: Result<ApiJson<RefundBody>, ApiError>,
) -> Result<Json<RefundAnswer>, ApiError> {
    let answer = match body {
        Ok(ApiJson(body)) => refund_body(&state, body).await,
        Err(error) => Err(error),
    };
    metrics::refund_outcome(match &answer {
        Ok(answer) if answer.replayed => "replayed",
        Ok(_) => "ok",
        Err(error) => metrics::outcome_of_code(error.code),
    });
    answer.map(Json)
}

#[tracing::instrument(level = "debug", skip_all)]
async fn refund_body(state: &AppState, body: RefundBody) -> Result<RefundAnswer, ApiError> {
    let reason = validate::text("reason", body.reason, validate::TEXT_CHARS_MAX)?;
    let (user_id, target) = match (body.consumption_id, body.user_id, body.idempotency_key) {
        (Some(id), None, None) => {
            if id <= 0 {
                return Err(ApiError::invalid_field(
                    "consumption_id",
                    "must be a positive integer",
                ));
            }
            let id = ConsumptionId(id);
            let owner = state
                .db
                .find_consumption_owner(id)
                .await
                .map_err(EngineError::from)?
                .ok_or(EngineError::ConsumptionNotFound)?;
            (owner, RefundTarget::Id(id))
        }
        (None, Some(user_id), Some(key)) => {
            let user_id = validate::user_id("user_id", user_id)?;
            let key = validate::idempotency_key(Some(key))?.unwrap_or_default();
            (user_id, RefundTarget::IdempotencyKey(key))
        }
        (None, Some(_), None) => {
            return Err(ApiError::invalid_field(
                "idempotency_key",
                "a refund by user_id needs the deduction's idempotency_key",
            ));
        }
        (None, None, _) => {
            return Err(ApiError::invalid_field(
                "consumption_id",
                "send consumption_id, or user_id with idempotency_key",
            ));
        }
        (Some(_), _, _) => {
            return Err(ApiError::invalid_field(
                "consumption_id",
                "send consumption_id alone, or user_id with idempotency_key, not both",
            ));
        }
    };
    let request = RefundRequest { target, reason };
    Ok(state
        .registry
        .ask(user_id, |reply| WalletMsg::Refund { request, reply })
        .await?)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisteredBody {
    user_id: i64,
}

/// `POST /api/internal/billing/users/registered`: assigns every package marked for new users,
/// once per user however often it is retried (`201` the first time, `200` after).
#[utoipa::path(
    post,
    path = "/api/internal/billing/users/registered",
    tag = "internal",
    security(("service_token" = [])),
    request_body = RegisteredBody,
    responses(
        (status = 201, description = "The user is new: the new-user packages were assigned", body = RegisterAnswer),
        (status = 200, description = "The user was announced before: nothing was assigned", body = RegisterAnswer),
        (status = 401, description = "No or an unknown service token", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`overloaded` or `unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all, fields(user_id = body.user_id))]
pub async fn registered(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RegisteredBody>,
) -> Result<(StatusCode, Json<RegisterAnswer>), ApiError> {
    let user_id = validate::user_id("user_id", body.user_id)?;
    let now = state.clock.now();
    let snapshot = state.catalog.snapshot();
    let grants = snapshot
        .new_user_packages()
        .map(|package| {
            crate::domain::NewGrant::from_package(
                package.id,
                package.package_type,
                package.credits_amount,
                package.duration_days,
                package.priority,
                crate::domain::GrantSource::System,
                None,
                true,
                now,
            )
        })
        .collect();
    let answer = state
        .registry
        .ask(user_id, |reply| WalletMsg::Register { grants, reply })
        .await?;
    let status = if answer.newly_registered {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(answer)))
}
