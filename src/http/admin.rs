//! The admin API (operators, admin JWT).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, path_id};
use super::query::{List, Params, id_cursor};
use super::validate;
use crate::domain::{GrantSource, NewGrant, PackageId, UserId, UserPackageId};
use crate::store::{GrantFilter, GrantListRow, UserPackageRow};
use crate::wallet::{AssignRequest, WalletMsg};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignBody {
    user_id: i64,
    package_id: i64,
    /// One of purchase, gift, promotion, system.
    source: String,
    /// The package's priority when left out.
    priority: Option<i32>,
    /// Overrides the package's `duration_days`; must be in the future.
    expires_at: Option<DateTime<Utc>>,
    note: Option<String>,
    external_ref: Option<String>,
    /// Activate now (the default) or leave pending.
    activate: Option<bool>,
}

/// `POST /api/admin/billing/user-packages`: gives a user a package. The same `external_ref`
/// twice assigns once (`200` with the first grant instead of `201`).
#[utoipa::path(
    post,
    path = "/api/admin/billing/user-packages",
    tag = "admin",
    security(("jwt" = [])),
    request_body = AssignBody,
    responses(
        (status = 201, description = "The new grant", body = UserPackageRow),
        (status = 200, description = "The grant assigned before with this `external_ref`", body = UserPackageRow),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The JWT lacks `role: admin`", body = ErrorBody),
        (status = 404, description = "`package_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
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

/// The grant an admin route names by id, and its owner.
async fn grant_by_id(state: &AppState, segment: &str) -> Result<UserPackageRow, ApiError> {
    let id = path_id("id", segment)?;
    state
        .db
        .find_user_package(UserPackageId(id))
        .await?
        .ok_or_else(|| {
            ApiError::not_found("user_package_not_found", format!("no user package {id}"))
        })
}

/// `POST /api/admin/billing/user-packages/{id}/activate`: a pending grant starts now and
/// expires `duration_days` later (or at the expiry fixed when it was assigned).
#[utoipa::path(
    post,
    path = "/api/admin/billing/user-packages/{id}/activate",
    tag = "admin",
    security(("jwt" = [])),
    params(
        ("id" = i64, Path, description = "The user package's (grant's) id"),
    ),
    responses(
        (status = 200, description = "The grant, now active", body = UserPackageRow),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The JWT lacks `role: admin`", body = ErrorBody),
        (status = 404, description = "`user_package_not_found`", body = ErrorBody),
        (status = 409, description = "`invalid_user_package_status`, or `user_package_expiry_passed`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all, fields(user_package_id = %id))]
pub async fn activate_user_package(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<UserPackageRow>, ApiError> {
    let row = grant_by_id(&state, &id).await?;
    let grant_id = UserPackageId(row.id);
    let duration_days = row.duration_days;
    let answer = state
        .registry
        .ask(UserId(row.user_id), |reply| WalletMsg::Activate {
            grant_id,
            duration_days,
            reply,
        })
        .await?;
    Ok(Json(answer))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    reason: Option<String>,
}

/// `POST /api/admin/billing/user-packages/{id}/revoke`: the grant ends now; its remaining
/// credits are void and recorded as expired credits. The body (`reason`) is optional.
#[utoipa::path(
    post,
    path = "/api/admin/billing/user-packages/{id}/revoke",
    tag = "admin",
    security(("jwt" = [])),
    params(
        ("id" = i64, Path, description = "The user package's (grant's) id"),
    ),
    request_body = Option<RevokeBody>,
    responses(
        (status = 200, description = "The grant, now revoked", body = UserPackageRow),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The JWT lacks `role: admin`", body = ErrorBody),
        (status = 404, description = "`user_package_not_found`", body = ErrorBody),
        (status = 409, description = "`invalid_user_package_status`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all, fields(user_package_id = %id))]
pub async fn revoke_user_package(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<UserPackageRow>, ApiError> {
    let body: RevokeBody = if body.is_empty() {
        RevokeBody::default()
    } else {
        super::extract::parse(&body)?
    };
    let reason = body.reason;
    let reason = validate::text("reason", reason, validate::TEXT_CHARS_MAX)?;
    let row = grant_by_id(&state, &id).await?;
    let grant_id = UserPackageId(row.id);
    let answer = state
        .registry
        .ask(UserId(row.user_id), |reply| WalletMsg::Revoke {
            grant_id,
            reason,
            reply,
        })
        .await?;
    Ok(Json(answer))
}

const GRANT_STATUSES: &[&str] = &["pending", "active", "depleted", "expired", "revoked"];

/// `GET /api/admin/users/{user_id}/billing-packages`: the user's grants, newest first
/// (`status` filters).
#[utoipa::path(
    get,
    path = "/api/admin/users/{user_id}/billing-packages",
    tag = "admin",
    security(("jwt" = [])),
    params(
        ("user_id" = i64, Path, description = "The user's id"),
        ("status" = Option<String>, Query, description = "One of pending, active, depleted, expired, revoked"),
        ("limit" = Option<i64>, Query, description = "Items per page, 1-500 (default 50)"),
        ("cursor" = Option<String>, Query, description = "The `next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of the user's grants, newest first", body = List<GrantListRow>),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The JWT lacks `role: admin`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
pub async fn list_user_packages(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
    params: Params,
) -> Result<Json<List<GrantListRow>>, ApiError> {
    let user_id = validate::user_id("user_id", path_id("user_id", &user_id)?)?;
    params.allow(&["status", "limit", "cursor"])?;
    let filter = GrantFilter {
        user_id: Some(user_id),
        status: params.one_of("status", GRANT_STATUSES)?,
        ..GrantFilter::default()
    };
    grant_page(&state, &filter, &params).await
}

/// `GET /api/admin/billing/packages/{id}/users`: who holds grants of a package, newest first
/// (`status`, `user_id` filter). A deleted package still lists its grants.
#[utoipa::path(
    get,
    path = "/api/admin/billing/packages/{id}/users",
    tag = "admin",
    security(("jwt" = [])),
    params(
        ("id" = i64, Path, description = "The package's id"),
        ("status" = Option<String>, Query, description = "One of pending, active, depleted, expired, revoked"),
        ("user_id" = Option<i64>, Query, description = "Only this user's grants"),
        ("limit" = Option<i64>, Query, description = "Items per page, 1-500 (default 50)"),
        ("cursor" = Option<String>, Query, description = "The `next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of the package's grants, newest first", body = List<GrantListRow>),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The JWT lacks `role: admin`", body = ErrorBody),
        (status = 404, description = "`package_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
pub async fn list_package_users(
    State(state): State<AppState>,
    Path(id): Path<String>,
    params: Params,
) -> Result<Json<List<GrantListRow>>, ApiError> {
    let id = path_id("id", &id)?;
    params.allow(&["status", "user_id", "limit", "cursor"])?;
    if state.db.find_package(id).await?.is_none() {
        return Err(ApiError::not_found(
            "package_not_found",
            format!("no package {id}"),
        ));
    }
    let filter = GrantFilter {
        user_id: params.user_id("user_id")?,
        package_id: Some(id),
        status: params.one_of("status", GRANT_STATUSES)?,
    };
    grant_page(&state, &filter, &params).await
}

/// A page of grants (shared by the admin and user lists).
pub async fn grant_page(
    state: &AppState,
    filter: &GrantFilter,
    params: &Params,
) -> Result<Json<List<GrantListRow>>, ApiError> {
    let page = params.page()?;
    let rows = state
        .db
        .list_grants(filter, page.id()?, page.fetch_limit())
        .await?;
    Ok(Json(page.finish(rows, |row| id_cursor(row.grant.id))))
}
