//! The catalog surfaces: action prices and packages for operators (admin JWT), and the public
//! lists of what is on sale.
//!
//! Every admin write commits with its audit event, then reloads the snapshot the deduct path
//! reads, under the catalog's write lock so snapshots are swapped in commit order.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tracing::Instrument;
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, Patch, path_id};
use super::query::{List, Params, key_cursor, key_id_cursor};
use super::validate;
use crate::domain::PackageType;
use crate::store::catalog::{PackageFields, PackageFilter, PackageSort, PriceFields};
use crate::store::{self, ActionPriceRow, Db, PackageRow};

/// The body of creating or changing an action price. On `PUT`, left-out fields keep their values.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceBody {
    /// Required on create; on `PUT` it may repeat the path's key, nothing else.
    action_key: Option<String>,
    /// Required on create.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    name: Patch<String>,
    /// `null` clears it.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    description: Patch<String>,
    /// Credits per unit; required on create.
    #[serde(default)]
    #[schema(value_type = Option<i64>)]
    credits_cost: Patch<i64>,
    /// `true` when left out on create.
    #[serde(default)]
    #[schema(value_type = Option<bool>)]
    enabled: Patch<bool>,
}

impl PriceBody {
    fn merge(self, current: Option<&ActionPriceRow>) -> Result<PriceFields, ApiError> {
        let name = self
            .name
            .apply_required("name", current.map(|row| row.name.clone()))?;
        let description = self
            .description
            .apply(current.and_then(|row| row.description.clone()));
        let credits_cost = self
            .credits_cost
            .apply_required("credits_cost", current.map(|row| row.credits_cost))?;
        let enabled = self
            .enabled
            .apply_required("enabled", Some(current.is_none_or(|row| row.enabled)))?;
        Ok(PriceFields {
            name: validate::name("name", name)?,
            description: validate::text("description", description, validate::TEXT_CHARS_MAX)?,
            credits_cost: validate::within(
                "credits_cost",
                credits_cost,
                0..=validate::CREDITS_COST_MAX,
            )?,
            enabled,
        })
    }
}

fn unknown_action(action_key: &str) -> ApiError {
    ApiError::not_found("unknown_action", format!("no action {action_key:?}"))
}

fn package_not_found(id: i64) -> ApiError {
    ApiError::not_found("package_not_found", format!("no package {id}"))
}

/// Runs a catalog write and the snapshot reload after it under the write lock, on a task of
/// its own: a client that hangs up cannot cancel it between the commit and the reload.
async fn write_catalog<T, F, Fut>(state: &AppState, write: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(Db, DateTime<Utc>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, ApiError>> + Send + 'static,
{
    let catalog = state.catalog.clone();
    let db = state.db.clone();
    let now = state.clock.now();
    let task = tokio::spawn(
        async move {
            let _writes = catalog.lock_writes().await;
            let written = write(db.clone(), now).await?;
            catalog.reload_after_write(&db).await;
            Ok(written)
        }
        .instrument(tracing::Span::current()),
    );
    task.await.unwrap_or_else(|error| {
        tracing::error!(%error, "a catalog write task failed");
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the change could not be completed; read it back before retrying",
        ))
    })
}

/// `GET /api/admin/billing/action-prices`: every action price by key (`enabled` filters).
#[utoipa::path(
    get,
    path = "/api/admin/billing/action-prices",
    tag = "admin",
    security(("jwt" = [])),
    params(
        ("enabled" = Option<bool>, Query, description = "Only enabled (`true`) or disabled (`false`) actions"),
        ("limit" = Option<i64>, Query, description = "Items per page, 1-500 (default 50)"),
        ("cursor" = Option<String>, Query, description = "The `next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of action prices, by key", body = List<ActionPriceRow>),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The JWT lacks `role: admin`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
pub async fn list_prices(
    State(state): State<AppState>,
    params: Params,
) -> Result<Json<List<ActionPriceRow>>, ApiError> {
    params.allow(&["enabled", "limit", "cursor"])?;
    let page = params.page()?;
    let rows = state
        .db
        .list_action_prices(
            params.bool("enabled")?,
            page.key()?.as_deref(),
            page.fetch_limit(),
        )
        .await?;
    Ok(Json(page.finish(rows, |row| key_cursor(&row.action_key))))
}

/// `POST /api/admin/billing/action-prices`: `201` with the price at version 1; a taken key is
/// `409 duplicate_action_key`.
#[utoipa::path(
    post,
    path = "/api/admin/billing/action-prices",
    tag = "admin",
    security(("jwt" = [])),
    request_body = PriceBody,
    responses(
        (status = 201, description = "The price, at version 1", body = ActionPriceRow),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The JWT lacks `role: admin`", body = ErrorBody),
        (status = 409, description = "`duplicate_action_key`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all)]
pub async fn create_price(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<PriceBody>,
) -> Result<(StatusCode, Json<ActionPriceRow>), ApiError> {
    let action_key = body
        .action_key
        .clone()
        .ok_or_else(|| ApiError::invalid_field("action_key", "is required"))?;
    let action_key = validate::action_key(&action_key)?.to_owned();
    let fields = body.merge(None)?;
    let row = write_catalog(&state, move |db, now| async move {
        db.insert_action_price(&action_key, &fields, now)
            .await?
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "duplicate_action_key",
                    format!("the action {action_key:?} already exists"),
                )
                .with("field", "action_key")
            })
    })
    .await?;
    Ok((StatusCode::CREATED, Json(row)))
}

/// `PUT /api/admin/billing/action-prices/{action_key}`: changes the named fields; the version
/// goes up by one.
#[utoipa::path(
    put,
    path = "/api/admin/billing/action-prices/{action_key}",
    tag = "admin",
    security(("jwt" = [])),
    params(
        ("action_key" = String, Path, description = "The action's key"),
    ),
    request_body = PriceBody,
    responses(
        (status = 200, description = "The price, its version one higher", body = ActionPriceRow),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The JWT lacks `role: admin`", body = ErrorBody),
        (status = 404, description = "`unknown_action`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all, fields(action_key = %action_key))]
pub async fn update_price(
    State(state): State<AppState>,
    Path(action_key): Path<String>,
    ApiJson(body): ApiJson<PriceBody>,
) -> Result<Json<ActionPriceRow>, ApiError> {
    if body
        .action_key
        .as_ref()
        .is_some_and(|key| *key != action_key)
    {
        return Err(ApiError::invalid_field(
            "action_key",
            "cannot be changed; create a new action instead",
        ));
    }
    let row = write_catalog(&state, move |db, now| async move {
        store::update_action_price(&*db, &action_key, now, |row| body.merge(Some(row)))
            .await?
            .ok_or_else(|| unknown_action(&action_key))
    })
    .await?;
    Ok(Json(row))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusBody {
    enabled: bool,
}

/// `PATCH /api/admin/billing/action-prices/{action_key}/status`: enables or disables an action.
#[utoipa::path(
    patch,
    path = "/api/admin/billing/action-prices/{action_key}/status",
    tag = "admin",
    security(("jwt" = [])),
    params(
        ("action_key" = String, Path, description = "The action's key"),
    ),
    request_body = StatusBody,
    responses(
        (status = 200, description = "The price", body = ActionPriceRow),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The JWT lacks `role: admin`", body = ErrorBody),
        (status = 404, description = "`unknown_action`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all, fields(action_key = %action_key))]
pub async fn set_price_status(
    State(state): State<AppState>,
    Path(action_key): Path<String>,
    ApiJson(body): ApiJson<StatusBody>,
) -> Result<Json<ActionPriceRow>, ApiError> {
    let row = write_catalog(&state, move |db, now| async move {
        store::update_action_price(&*db, &action_key, now, |row| {
            Ok::<_, ApiError>(PriceFields {
                enabled: body.enabled,
                ..PriceFields::of(row)
            })
        })
        .await?
        .ok_or_else(|| unknown_action(&action_key))
    })
    .await?;
    Ok(Json(row))
}

/// The body of creating or changing a package. On `PUT`, left-out fields keep their values and
/// `null` clears a nullable one (for example `credits_amount` when a package becomes `duration`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PackageBody {
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    name: Patch<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    description: Patch<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    package_type: Patch<String>,
    #[serde(default)]
    #[schema(value_type = Option<i64>)]
    credits_amount: Patch<i64>,
    #[serde(default)]
    #[schema(value_type = Option<i32>)]
    duration_days: Patch<i32>,
    #[serde(default)]
    #[schema(value_type = Option<i64>)]
    price_cents: Patch<i64>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    currency: Patch<String>,
    #[serde(default)]
    #[schema(value_type = Option<i32>)]
    priority: Patch<i32>,
    #[serde(default)]
    #[schema(value_type = Option<bool>)]
    visible: Patch<bool>,
    #[serde(default)]
    #[schema(value_type = Option<bool>)]
    assign_to_new_users: Patch<bool>,
    #[serde(default)]
    #[schema(value_type = Option<i32>)]
    sort_order: Patch<i32>,
}

impl PackageBody {
    fn merge(self, current: Option<&PackageRow>) -> Result<PackageFields, ApiError> {
        let defaults = current.map(PackageFields::of);
        let d = defaults.as_ref();
        let package_type = self
            .package_type
            .apply_required("package_type", d.map(|d| d.package_type.clone()))?;
        let package_type = PackageType::parse(&package_type).ok_or_else(|| {
            ApiError::invalid_field(
                "package_type",
                "must be one of credits, hybrid, duration, permanent",
            )
        })?;
        let credits_amount = self.credits_amount.apply(d.and_then(|d| d.credits_amount));
        let duration_days = self.duration_days.apply(d.and_then(|d| d.duration_days));
        let (credits_amount, duration_days) =
            package_shape(package_type, credits_amount, duration_days)?;
        let currency = self.currency.apply_required(
            "currency",
            Some(
                d.map(|d| d.currency.clone())
                    .unwrap_or_else(|| "CNY".into()),
            ),
        )?;
        if !(currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_uppercase())) {
            return Err(ApiError::invalid_field(
                "currency",
                "must be a 3-letter ISO 4217 code in capitals, for example CNY",
            ));
        }
        let name = self
            .name
            .apply_required("name", d.map(|d| d.name.clone()))?;
        let description = self
            .description
            .apply(d.and_then(|d| d.description.clone()));
        let order = -validate::ORDER_ABS_MAX..=validate::ORDER_ABS_MAX;
        Ok(PackageFields {
            name: validate::name("name", name)?,
            description: validate::text("description", description, validate::TEXT_CHARS_MAX)?,
            package_type: package_type.as_str().to_owned(),
            credits_amount,
            duration_days,
            price_cents: validate::within(
                "price_cents",
                self.price_cents
                    .apply_required("price_cents", Some(d.map(|d| d.price_cents).unwrap_or(0)))?,
                0..=validate::PRICE_CENTS_MAX,
            )?,
            currency,
            priority: validate::within(
                "priority",
                self.priority
                    .apply_required("priority", Some(d.map(|d| d.priority).unwrap_or(100)))?,
                order.clone(),
            )?,
            visible: self
                .visible
                .apply_required("visible", Some(d.map(|d| d.visible).unwrap_or(true)))?,
            assign_to_new_users: self.assign_to_new_users.apply_required(
                "assign_to_new_users",
                Some(d.map(|d| d.assign_to_new_users).unwrap_or(false)),
            )?,
            sort_order: validate::within(
                "sort_order",
                self.sort_order
                    .apply_required("sort_order", Some(d.map(|d| d.sort_order).unwrap_or(0)))?,
                order,
            )?,
        })
    }
}

/// The 2 x 2 of package types: limited types need `credits_amount`, expiring types need
/// `duration_days`, and neither may carry the other's field.
fn package_shape(
    package_type: PackageType,
    credits_amount: Option<i64>,
    duration_days: Option<i32>,
) -> Result<(Option<i64>, Option<i32>), ApiError> {
    let limited = !package_type.is_unlimited();
    let expiring = matches!(package_type, PackageType::Hybrid | PackageType::Duration);
    let kind = package_type.as_str();
    let credits_amount = shape_field(
        "credits_amount",
        credits_amount,
        limited.then_some(1..=validate::CREDITS_AMOUNT_MAX),
        kind,
        "it is unlimited",
    )?;
    let duration_days = shape_field(
        "duration_days",
        duration_days,
        expiring.then_some(1..=validate::DURATION_DAYS_MAX),
        kind,
        "it never expires",
    )?;
    Ok((credits_amount, duration_days))
}

/// One dimension of the 2 x 2: with a `range` the field is required and must lie in it;
/// without one it must be null, and `why_null` says why.
fn shape_field<T>(
    field: &str,
    value: Option<T>,
    range: Option<std::ops::RangeInclusive<T>>,
    kind: &str,
    why_null: &str,
) -> Result<Option<T>, ApiError>
where
    T: PartialOrd + std::fmt::Display + Copy,
{
    match (range, value) {
        (Some(range), Some(value)) => validate::within(field, value, range).map(Some),
        (Some(_), None) => Err(ApiError::invalid_field(
            field,
            format!("is required for a {kind} package"),
        )),
        (None, Some(_)) => Err(ApiError::invalid_field(
            field,
            format!("must be null for a {kind} package ({why_null})"),
        )),
        (None, None) => Ok(None),
    }
}

/// `GET /api/admin/billing/packages`: filters `package_type`, `visible`,
/// `assign_to_new_users`, `include_deleted`; `sort` (sort_order, id, credits_amount,
/// price_cents) and `order` (asc, desc).
#[utoipa::path(
    get,
    path = "/api/admin/billing/packages",
    tag = "admin",
    security(("jwt" = [])),
    params(
        ("package_type" = Option<String>, Query, description = "One of credits, hybrid, duration, permanent"),
        ("visible" = Option<bool>, Query, description = "Only visible (`true`) or hidden (`false`) packages"),
        ("assign_to_new_users" = Option<bool>, Query, description = "Only packages that are (or are not) given to new users"),
        ("include_deleted" = Option<bool>, Query, description = "Also deleted packages (default false)"),
        ("sort" = Option<String>, Query, description = "One of sort_order (the default), id, credits_amount, price_cents"),
        ("order" = Option<String>, Query, description = "asc (the default) or desc"),
        ("limit" = Option<i64>, Query, description = "Items per page, 1-500 (default 50)"),
        ("cursor" = Option<String>, Query, description = "The `next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of packages", body = List<PackageRow>),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The JWT lacks `role: admin`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
pub async fn list_packages(
    State(state): State<AppState>,
    params: Params,
) -> Result<Json<List<PackageRow>>, ApiError> {
    params.allow(&[
        "package_type",
        "visible",
        "assign_to_new_users",
        "include_deleted",
        "sort",
        "order",
        "limit",
        "cursor",
    ])?;
    let filter = PackageFilter {
        package_type: params.one_of(
            "package_type",
            &["credits", "hybrid", "duration", "permanent"],
        )?,
        visible: params.bool("visible")?,
        assign_to_new_users: params.bool("assign_to_new_users")?,
        include_deleted: params.bool("include_deleted")?.unwrap_or(false),
    };
    let sort = params
        .one_of("sort", PackageSort::NAMES)?
        .and_then(|name| PackageSort::parse(&name))
        .unwrap_or(PackageSort::SortOrder);
    let descending = params.one_of("order", &["asc", "desc"])?.as_deref() == Some("desc");
    let page = params.page()?;
    let rows = state
        .db
        .list_packages(
            &filter,
            sort,
            descending,
            page.key_id()?,
            page.fetch_limit(),
        )
        .await?;
    Ok(Json(page.finish(rows, |row| {
        key_id_cursor(sort.key_of(row), row.id)
    })))
}

/// `POST /api/admin/billing/packages`: `201` with the package.
#[utoipa::path(
    post,
    path = "/api/admin/billing/packages",
    tag = "admin",
    security(("jwt" = [])),
    request_body = PackageBody,
    responses(
        (status = 201, description = "The package", body = PackageRow),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The JWT lacks `role: admin`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all)]
pub async fn create_package(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<PackageBody>,
) -> Result<(StatusCode, Json<PackageRow>), ApiError> {
    let fields = body.merge(None)?;
    let row = write_catalog(&state, move |db, now| async move {
        Ok(db.insert_package(&fields, now).await?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(row)))
}

/// `GET /api/admin/billing/packages/{id}`: also a deleted package (with its `deleted_at`).
#[utoipa::path(
    get,
    path = "/api/admin/billing/packages/{id}",
    tag = "admin",
    security(("jwt" = [])),
    params(
        ("id" = i64, Path, description = "The package's id"),
    ),
    responses(
        (status = 200, description = "The package", body = PackageRow),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The JWT lacks `role: admin`", body = ErrorBody),
        (status = 404, description = "`package_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
pub async fn get_package(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<PackageRow>, ApiError> {
    let id = path_id("id", &id)?;
    state
        .db
        .find_package(id)
        .await?
        .map(Json)
        .ok_or_else(|| package_not_found(id))
}

/// `PUT /api/admin/billing/packages/{id}`: a deleted package is `404`.
#[utoipa::path(
    put,
    path = "/api/admin/billing/packages/{id}",
    tag = "admin",
    security(("jwt" = [])),
    params(
        ("id" = i64, Path, description = "The package's id"),
    ),
    request_body = PackageBody,
    responses(
        (status = 200, description = "The package", body = PackageRow),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The JWT lacks `role: admin`", body = ErrorBody),
        (status = 404, description = "`package_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all, fields(package_id = %id))]
pub async fn update_package(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PackageBody>,
) -> Result<Json<PackageRow>, ApiError> {
    let id = path_id("id", &id)?;
    let row = write_catalog(&state, move |db, now| async move {
        store::update_package(&*db, id, now, |row| body.merge(Some(row)))
            .await?
            .ok_or_else(|| package_not_found(id))
    })
    .await?;
    Ok(Json(row))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VisibilityBody {
    visible: bool,
}

/// `PATCH /api/admin/billing/packages/{id}/visibility`.
#[utoipa::path(
    patch,
    path = "/api/admin/billing/packages/{id}/visibility",
    tag = "admin",
    security(("jwt" = [])),
    params(
        ("id" = i64, Path, description = "The package's id"),
    ),
    request_body = VisibilityBody,
    responses(
        (status = 200, description = "The package", body = PackageRow),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The JWT lacks `role: admin`", body = ErrorBody),
        (status = 404, description = "`package_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all, fields(package_id = %id))]
pub async fn set_package_visibility(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<VisibilityBody>,
) -> Result<Json<PackageRow>, ApiError> {
    let id = path_id("id", &id)?;
    let row = write_catalog(&state, move |db, now| async move {
        store::update_package(&*db, id, now, |row| {
            Ok::<_, ApiError>(PackageFields {
                visible: body.visible,
                ..PackageFields::of(row)
            })
        })
        .await?
        .ok_or_else(|| package_not_found(id))
    })
    .await?;
    Ok(Json(row))
}

/// `DELETE /api/admin/billing/packages/{id}`: soft; `204` (also when already deleted).
#[utoipa::path(
    delete,
    path = "/api/admin/billing/packages/{id}",
    tag = "admin",
    security(("jwt" = [])),
    params(
        ("id" = i64, Path, description = "The package's id"),
    ),
    responses(
        (status = 204, description = "Deleted (also when it already was)"),
        (status = 401, description = "No or an invalid JWT", body = ErrorBody),
        (status = 403, description = "The JWT lacks `role: admin`", body = ErrorBody),
        (status = 404, description = "`package_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
        (status = 503, description = "`unavailable`; retry", body = ErrorBody),
    ),
)]
#[tracing::instrument(skip_all, fields(package_id = %id))]
pub async fn delete_package(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = path_id("id", &id)?;
    write_catalog(&state, move |db, now| async move {
        if db.delete_package(id, now).await? {
            Ok(())
        } else {
            Err(package_not_found(id))
        }
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What the public sees of an action price.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct PublicPrice {
    action_key: String,
    name: String,
    description: Option<String>,
    credits_cost: i64,
}

/// `GET /api/billing/action-prices`: enabled actions and their costs, from the snapshot.
#[utoipa::path(
    get,
    path = "/api/billing/action-prices",
    tag = "public",
    responses(
        (status = 200, description = "Every enabled action, on one page", body = List<PublicPrice>),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
    ),
)]
pub async fn public_prices(
    State(state): State<AppState>,
    params: Params,
) -> Result<Json<List<PublicPrice>>, ApiError> {
    params.allow(&[])?;
    let snapshot = state.catalog.snapshot();
    let items = snapshot
        .enabled_prices()
        .map(|row| PublicPrice {
            action_key: row.action_key.clone(),
            name: row.name.clone(),
            description: row.description.clone(),
            credits_cost: row.credits_cost,
        })
        .collect();
    Ok(Json(List {
        items,
        next_cursor: None,
    }))
}

/// What the public sees of a package.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct PublicPackage {
    id: i64,
    name: String,
    description: Option<String>,
    package_type: String,
    credits_amount: Option<i64>,
    duration_days: Option<i32>,
    price_cents: i64,
    currency: String,
    sort_order: i32,
}

/// `GET /api/billing/packages`: visible, not deleted packages in `sort_order`, from the snapshot.
#[utoipa::path(
    get,
    path = "/api/billing/packages",
    tag = "public",
    responses(
        (status = 200, description = "Every visible package, on one page", body = List<PublicPackage>),
        (status = 422, description = "`invalid_field`", body = ErrorBody),
    ),
)]
pub async fn public_packages(
    State(state): State<AppState>,
    params: Params,
) -> Result<Json<List<PublicPackage>>, ApiError> {
    params.allow(&[])?;
    let snapshot = state.catalog.snapshot();
    let items = snapshot
        .visible_packages()
        .map(|row| PublicPackage {
            id: row.id,
            name: row.name.clone(),
            description: row.description.clone(),
            package_type: row.package_type.clone(),
            credits_amount: row.credits_amount,
            duration_days: row.duration_days,
            price_cents: row.price_cents,
            currency: row.currency.clone(),
            sort_order: row.sort_order,
        })
        .collect();
    Ok(Json(List {
        items,
        next_cursor: None,
    }))
}
