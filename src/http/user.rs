//! The user API: an end user's own credits and packages (user JWT). A user sees only their
//! own data: the user id comes from the token, never from the request.

use axum::extract::State;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::admin::grant_page;
use super::auth::Principal;
use super::error::{ApiError, ErrorBody};
use super::query::{List, Params};
use crate::domain::{self, GrantStatus};
use crate::store::{self, GrantFilter, GrantListRow};

#[derive(Debug, Serialize, ToSchema)]
pub struct CreditSummary {
    user_id: i64,
    /// Credits the user can spend now across limited grants.
    remaining_credits: i64,
    /// True while an unlimited grant is active: deductions succeed whatever the total says.
    unlimited: bool,
    grants: Vec<GrantSummary>,
    /// True when the user holds more live grants than one summary reads
    /// (`SUMMARY_GRANTS_MAX`); the totals then cover only the oldest of them.
    truncated: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GrantSummary {
    user_package_id: i64,
    package_id: i64,
    package_name: String,
    /// `expired` as soon as `expires_at` passes, even before the supervisor records it.
    status: &'static str,
    priority: i32,
    unlimited: bool,
    /// `null` for an unlimited grant.
    total_credits: Option<i64>,
    used_credits: i64,
    /// `null` for an unlimited grant.
    remaining_credits: Option<i64>,
    activated_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
}

/// `GET /api/user/billing/credits`: what the user can spend now, and per grant.
#[utoipa::path(
    get,
    path = "/api/user/billing/credits",
    tag = "user",
    security(("jwt" = [])),
    responses(
        (status = 200, description = "The token's user's credits", body = CreditSummary),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
pub async fn credits(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    params: Params,
) -> Result<Json<CreditSummary>, ApiError> {
    params.allow(&[])?;
    let now = state.clock.now();
    let mut rows = state.db.live_grants(principal.user_id).await?;
    let truncated = rows.len() as i64 > store::SUMMARY_GRANTS_MAX;
    rows.truncate(usize::try_from(store::SUMMARY_GRANTS_MAX).unwrap_or(usize::MAX));
    let mut grants = Vec::with_capacity(rows.len());
    let mut wallet = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(grant) = row.grant.to_grant() else {
            continue;
        };
        let status = if grant.expires_at.is_some_and(|at| at <= now)
            && grant.status != GrantStatus::Pending
        {
            GrantStatus::Expired
        } else {
            grant.status
        };
        let unlimited = row.grant.unlimited;
        grants.push(GrantSummary {
            user_package_id: row.grant.id,
            package_id: row.grant.package_id,
            package_name: row.package_name,
            status: status.as_str(),
            priority: row.grant.priority,
            unlimited,
            total_credits: (!unlimited).then_some(row.grant.total_credits),
            used_credits: row.grant.used_credits,
            remaining_credits: (!unlimited).then_some(row.grant.remaining_credits),
            activated_at: row.grant.activated_at,
            expires_at: row.grant.expires_at,
        });
        wallet.push(grant);
    }
    let totals = domain::totals(&wallet, now);
    Ok(Json(CreditSummary {
        user_id: principal.user_id.get(),
        remaining_credits: totals.remaining_credits.get(),
        unlimited: totals.unlimited,
        grants,
        truncated,
    }))
}

/// `GET /api/user/billing/packages`: all of the user's grants, newest first (`status` filters).
#[utoipa::path(
    get,
    path = "/api/user/billing/packages",
    tag = "user",
    security(("jwt" = [])),
    params(
        ("status" = Option<String>, Query, description = "One of pending, active, depleted, expired, revoked"),
        ("limit" = Option<i64>, Query, description = "Items per page, 1-500 (default 50)"),
        ("cursor" = Option<String>, Query, description = "The `next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of the token's user's grants, newest first", body = List<GrantListRow>),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
pub async fn packages(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    params: Params,
) -> Result<Json<List<GrantListRow>>, ApiError> {
    params.allow(&["status", "limit", "cursor"])?;
    let filter = GrantFilter {
        user_id: Some(principal.user_id),
        status: params.one_of(
            "status",
            &["pending", "active", "depleted", "expired", "revoked"],
        )?,
        ..GrantFilter::default()
    };
    let Json(mut page) = grant_page(&state, &filter, &params).await?;
    // Operators' notes and payment references are theirs, not the customer's.
    for row in &mut page.items {
        row.grant.note = None;
        row.grant.external_ref = None;
    }
    Ok(Json(page))
}
