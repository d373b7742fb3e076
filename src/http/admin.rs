//! The admin API (operators, admin JWT).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use super::extract::ApiJson;
use super::validate;
use crate::domain::{GrantSource, NewGrant, PackageId};
use crate::store::UserPackageRow;
use crate::wallet::{AssignRequest, WalletMsg};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignBody {
    user_id: i64,
    package_id: i64,
    source: String,
    priority: Option<i32>,
    expires_at: Option<DateTime<Utc>>,
    note: Option<String>,
    external_ref: Option<String>,
    /// Activate now (the default) or leave pending.
    activate: Option<bool>,
}

/// `POST /api/admin/billing/user-packages`: gives a user a package. The same `external_ref`
/// twice assigns once (`200` with the first grant instead of `201`).
#[tracing::instrument(skip_all, fields(user_id = body.user_id, package_id = body.package_id))]
pub async fn assign_user_package(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<AssignBody>,
) -> Result<(StatusCode, Json<UserPackageRow>), ApiError> {
    let user_id = validate::user_id("user_id", body.user_id)?;
    let source = GrantSource::parse(&body.source).ok_or_else(|| {
        ApiError::invalid_field("source", "must be one of purchase, gift, promotion, system")
    })?;
    let note = validate::text("note", body.note, validate::TEXT_CHARS_MAX)?;
    let external_ref = validate::text(
        "external_ref",
        body.external_ref,
        validate::EXTERNAL_REF_CHARS_MAX,
    )?;
    let now = state.clock.now();
    if body.expires_at.is_some_and(|at| at <= now) {
        return Err(ApiError::invalid_field(
            "expires_at",
            "must be in the future",
        ));
    }
    let snapshot = state.catalog.snapshot();
    let package = snapshot
        .package(PackageId(body.package_id))
        .filter(|package| !package.deleted)
        .ok_or_else(|| {
            ApiError::not_found(
                "package_not_found",
                format!("no package {}", body.package_id),
            )
            .with("field", "package_id")
        })?;
    let grant = NewGrant::from_package(
        package.id,
        package.package_type,
        package.credits_amount,
        package.duration_days,
        body.priority.unwrap_or(package.priority),
        source,
        body.expires_at,
        body.activate.unwrap_or(true),
        now,
    );
    let request = AssignRequest {
        grant,
        external_ref,
        note,
    };
    let answer = state
        .registry
        .ask(user_id, |reply| WalletMsg::Assign { request, reply })
        .await?;
    let status = if answer.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(answer.user_package)))
}
