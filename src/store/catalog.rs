//! Writes and lists of the catalog: action prices and packages. Every write commits with its
//! audit event in one transaction; the caller then reloads the in-memory snapshot.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{PgPool, Postgres, QueryBuilder};

use super::{ActionPriceRow, PACKAGE_COLUMNS, PRICE_COLUMNS, PackageRow, insert_event};

/// The fields of an action price an operator sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceFields {
    pub name: String,
    pub description: Option<String>,
    pub credits_cost: i64,
    pub enabled: bool,
}

impl PriceFields {
    pub fn of(row: &ActionPriceRow) -> PriceFields {
        PriceFields {
            name: row.name.clone(),
            description: row.description.clone(),
            credits_cost: row.credits_cost,
            enabled: row.enabled,
        }
    }
}

/// Creates an action price at version 1; `None` when the key is taken.
pub async fn insert_action_price(
    pool: &PgPool,
    action_key: &str,
    fields: &PriceFields,
    now: DateTime<Utc>,
) -> Result<Option<ActionPriceRow>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row: Option<ActionPriceRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO action_prices (action_key, name, description, credits_cost, enabled,
             created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $6)
         ON CONFLICT (action_key) DO NOTHING
         RETURNING {PRICE_COLUMNS}"
    )))
    .bind(action_key)
    .bind(&fields.name)
    .bind(&fields.description)
    .bind(fields.credits_cost)
    .bind(fields.enabled)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let payload = price_event_payload(&row);
    insert_event(&mut tx, "billing_action_price_create", None, &payload, now).await?;
    tx.commit().await?;
    Ok(Some(row))
}

/// Changes an action price: `merge` turns the current row (locked) into the new fields. The
/// version goes up by one and a `billing_action_price_update` event records old and new.
/// `Ok(None)` when there is no such action.
pub async fn update_action_price<E: From<sqlx::Error>>(
    pool: &PgPool,
    action_key: &str,
    now: DateTime<Utc>,
    merge: impl FnOnce(&ActionPriceRow) -> Result<PriceFields, E>,
) -> Result<Option<ActionPriceRow>, E> {
    let mut tx = pool.begin().await?;
    let current: Option<ActionPriceRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PRICE_COLUMNS} FROM action_prices WHERE action_key = $1 FOR UPDATE"
    )))
    .bind(action_key)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(current) = current else {
        return Ok(None);
    };
    let fields = merge(&current)?;
    let row: ActionPriceRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE action_prices
         SET name = $2, description = $3, credits_cost = $4, enabled = $5,
             version = version + 1, updated_at = $6
         WHERE action_key = $1
         RETURNING {PRICE_COLUMNS}"
    )))
    .bind(action_key)
    .bind(&fields.name)
    .bind(&fields.description)
    .bind(fields.credits_cost)
    .bind(fields.enabled)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    let mut payload = price_event_payload(&row);
    payload["previous"] = json!({
        "version": current.version,
        "credits_cost": current.credits_cost,
        "enabled": current.enabled,
        "name": current.name,
    });
    insert_event(&mut tx, "billing_action_price_update", None, &payload, now).await?;
    tx.commit().await?;
    Ok(Some(row))
}

/// What a price event records of the price (an update adds the `previous` values).
fn price_event_payload(row: &ActionPriceRow) -> serde_json::Value {
    json!({
        "action_key": row.action_key,
        "version": row.version,
        "credits_cost": row.credits_cost,
        "enabled": row.enabled,
        "name": row.name,
    })
}

/// Every action price, by key (a catalog holds tens, not thousands).
pub async fn list_action_prices(
    pool: &PgPool,
    enabled: Option<bool>,
    after_key: Option<&str>,
    limit: i64,
) -> Result<Vec<ActionPriceRow>, sqlx::Error> {
    let mut query = QueryBuilder::<Postgres>::new(format!(
        "SELECT {PRICE_COLUMNS} FROM action_prices WHERE true"
    ));
    if let Some(enabled) = enabled {
        query.push(" AND enabled = ").push_bind(enabled);
    }
    if let Some(after) = after_key {
        query.push(" AND action_key > ").push_bind(after.to_owned());
    }
    query.push(" ORDER BY action_key LIMIT ").push_bind(limit);
    query.build_query_as().fetch_all(pool).await
}

/// The fields of a package an operator sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackageFields {
    pub name: String,
    pub description: Option<String>,
    pub package_type: String,
    pub credits_amount: Option<i64>,
    pub duration_days: Option<i32>,
    pub price_cents: i64,
    pub currency: String,
    pub priority: i32,
    pub visible: bool,
    pub assign_to_new_users: bool,
    pub sort_order: i32,
}

impl PackageFields {
    pub fn of(row: &PackageRow) -> PackageFields {
        PackageFields {
            name: row.name.clone(),
            description: row.description.clone(),
            package_type: row.package_type.clone(),
            credits_amount: row.credits_amount,
            duration_days: row.duration_days,
            price_cents: row.price_cents,
            currency: row.currency.clone(),
            priority: row.priority,
            visible: row.visible,
            assign_to_new_users: row.assign_to_new_users,
            sort_order: row.sort_order,
        }
    }

    fn payload(&self) -> serde_json::Value {
        json!({
            "name": self.name,
            "package_type": self.package_type,
            "credits_amount": self.credits_amount,
            "duration_days": self.duration_days,
            "price_cents": self.price_cents,
            "currency": self.currency,
            "priority": self.priority,
            "visible": self.visible,
            "assign_to_new_users": self.assign_to_new_users,
            "sort_order": self.sort_order,
        })
    }
}

pub async fn insert_package(
    pool: &PgPool,
    fields: &PackageFields,
    now: DateTime<Utc>,
) -> Result<PackageRow, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row: PackageRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO packages (name, description, package_type, credits_amount, duration_days,
             price_cents, currency, priority, visible, assign_to_new_users, sort_order,
             created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12)
         RETURNING {PACKAGE_COLUMNS}"
    )))
    .bind(&fields.name)
    .bind(&fields.description)
    .bind(&fields.package_type)
    .bind(fields.credits_amount)
    .bind(fields.duration_days)
    .bind(fields.price_cents)
    .bind(&fields.currency)
    .bind(fields.priority)
    .bind(fields.visible)
    .bind(fields.assign_to_new_users)
    .bind(fields.sort_order)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    let mut payload = fields.payload();
    payload["package_id"] = json!(row.id);
    insert_event(&mut tx, "billing_package_create", None, &payload, now).await?;
    tx.commit().await?;
    Ok(row)
}

/// Changes a package that is not deleted; `Ok(None)` when there is none.
pub async fn update_package<E: From<sqlx::Error>>(
    pool: &PgPool,
    id: i64,
    now: DateTime<Utc>,
    merge: impl FnOnce(&PackageRow) -> Result<PackageFields, E>,
) -> Result<Option<PackageRow>, E> {
    let mut tx = pool.begin().await?;
    let current: Option<PackageRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PACKAGE_COLUMNS} FROM packages WHERE id = $1 AND deleted_at IS NULL FOR UPDATE"
    )))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(current) = current else {
        return Ok(None);
    };
    let fields = merge(&current)?;
    let row: PackageRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE packages
         SET name = $2, description = $3, package_type = $4, credits_amount = $5,
             duration_days = $6, price_cents = $7, currency = $8, priority = $9, visible = $10,
             assign_to_new_users = $11, sort_order = $12, updated_at = $13
         WHERE id = $1
         RETURNING {PACKAGE_COLUMNS}"
    )))
    .bind(id)
    .bind(&fields.name)
    .bind(&fields.description)
    .bind(&fields.package_type)
    .bind(fields.credits_amount)
    .bind(fields.duration_days)
    .bind(fields.price_cents)
    .bind(&fields.currency)
    .bind(fields.priority)
    .bind(fields.visible)
    .bind(fields.assign_to_new_users)
    .bind(fields.sort_order)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    let mut payload = fields.payload();
    payload["package_id"] = json!(id);
    payload["previous"] = PackageFields::of(&current).payload();
    insert_event(&mut tx, "billing_package_update", None, &payload, now).await?;
    tx.commit().await?;
    Ok(Some(row))
}

/// Soft-deletes a package: it leaves lists and can no longer be assigned; grants already made
/// from it keep working. `Ok(false)` when there is no such package; deleting twice is a no-op.
pub async fn delete_package(
    pool: &PgPool,
    id: i64,
    now: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let deleted_before: Option<Option<DateTime<Utc>>> =
        sqlx::query_scalar("SELECT deleted_at FROM packages WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    match deleted_before {
        None => return Ok(false),
        Some(Some(_)) => return Ok(true),
        Some(None) => {}
    }
    sqlx::query("UPDATE packages SET deleted_at = $2, updated_at = $2 WHERE id = $1")
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    insert_event(
        &mut tx,
        "billing_package_delete",
        None,
        &json!({ "package_id": id }),
        now,
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

pub async fn find_package(pool: &PgPool, id: i64) -> Result<Option<PackageRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PACKAGE_COLUMNS} FROM packages WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// How the admin package list is ordered; every order ends with `id` so keysets are exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackageSort {
    SortOrder,
    Id,
    CreditsAmount,
    PriceCents,
}

impl PackageSort {
    /// `id` is also creation order.
    pub const NAMES: &[&str] = &["sort_order", "id", "credits_amount", "price_cents"];

    pub fn parse(name: &str) -> Option<PackageSort> {
        match name {
            "sort_order" => Some(PackageSort::SortOrder),
            "id" => Some(PackageSort::Id),
            "credits_amount" => Some(PackageSort::CreditsAmount),
            "price_cents" => Some(PackageSort::PriceCents),
            _ => None,
        }
    }

    /// The sort key as a bigint expression (NULL credits sort as 0).
    fn key_sql(self) -> &'static str {
        match self {
            PackageSort::SortOrder => "sort_order::bigint",
            PackageSort::Id => "id",
            PackageSort::CreditsAmount => "COALESCE(credits_amount, 0)",
            PackageSort::PriceCents => "price_cents",
        }
    }

    /// The key of a row, as `key_sql` computes it, for the next page's cursor.
    pub fn key_of(self, row: &PackageRow) -> i64 {
        match self {
            PackageSort::SortOrder => i64::from(row.sort_order),
            PackageSort::Id => row.id,
            PackageSort::CreditsAmount => row.credits_amount.unwrap_or(0),
            PackageSort::PriceCents => row.price_cents,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct PackageFilter {
    pub package_type: Option<String>,
    pub visible: Option<bool>,
    pub assign_to_new_users: Option<bool>,
    pub include_deleted: bool,
}

/// A page of packages in `sort` order (`descending` flips it), after the keyset `after`.
pub async fn list_packages(
    pool: &PgPool,
    filter: &PackageFilter,
    sort: PackageSort,
    descending: bool,
    after: Option<(i64, i64)>,
    limit: i64,
) -> Result<Vec<PackageRow>, sqlx::Error> {
    let mut query =
        QueryBuilder::<Postgres>::new(format!("SELECT {PACKAGE_COLUMNS} FROM packages WHERE true"));
    if !filter.include_deleted {
        query.push(" AND deleted_at IS NULL");
    }
    if let Some(package_type) = &filter.package_type {
        query
            .push(" AND package_type = ")
            .push_bind(package_type.clone());
    }
    if let Some(visible) = filter.visible {
        query.push(" AND visible = ").push_bind(visible);
    }
    if let Some(assign) = filter.assign_to_new_users {
        query.push(" AND assign_to_new_users = ").push_bind(assign);
    }
    let key = sort.key_sql();
    let (compare, direction) = if descending {
        ("<", "DESC")
    } else {
        (">", "ASC")
    };
    if let Some((after_key, after_id)) = after {
        query
            .push(format_args!(" AND ({key}, id) {compare} ("))
            .push_bind(after_key)
            .push(", ")
            .push_bind(after_id)
            .push(")");
    }
    query
        .push(format_args!(
            " ORDER BY {key} {direction}, id {direction} LIMIT "
        ))
        .push_bind(limit);
    query.build_query_as().fetch_all(pool).await
}
