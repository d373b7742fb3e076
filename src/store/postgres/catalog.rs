//! The catalog's writes and lists on PostgreSQL. Every write commits with its audit event in one
//! transaction; the caller then reloads the in-memory snapshot.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{PgPool, Postgres, QueryBuilder};

use super::insert_event;
use crate::store::catalog::{
    PackageFields, PackageFilter, PackageSort, PriceFields, price_event_payload,
};
use crate::store::{ActionPriceRow, Merge, Merged, PACKAGE_COLUMNS, PRICE_COLUMNS, PackageRow};

/// Creates an action price at version 1; `None` when the key is taken.
pub(super) async fn insert_action_price(
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
pub(super) async fn update_action_price(
    pool: &PgPool,
    action_key: &str,
    now: DateTime<Utc>,
    merge: Merge<'_, ActionPriceRow, PriceFields>,
) -> Result<Merged<ActionPriceRow>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let current: Option<ActionPriceRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PRICE_COLUMNS} FROM action_prices WHERE action_key = $1 FOR UPDATE"
    )))
    .bind(action_key)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(current) = current else {
        return Ok(Merged::NotFound);
    };
    let Some(fields) = merge(&current) else {
        return Ok(Merged::Refused);
    };
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
    Ok(Merged::Updated(row))
}

/// Every action price, by key (a catalog holds tens, not thousands).
pub(super) async fn list_action_prices(
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

pub(super) async fn insert_package(
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
pub(super) async fn update_package(
    pool: &PgPool,
    id: i64,
    now: DateTime<Utc>,
    merge: Merge<'_, PackageRow, PackageFields>,
) -> Result<Merged<PackageRow>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let current: Option<PackageRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PACKAGE_COLUMNS} FROM packages WHERE id = $1 AND deleted_at IS NULL FOR UPDATE"
    )))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(current) = current else {
        return Ok(Merged::NotFound);
    };
    let Some(fields) = merge(&current) else {
        return Ok(Merged::Refused);
    };
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
    Ok(Merged::Updated(row))
}

/// Soft-deletes a package: it leaves lists and can no longer be assigned; grants already made
/// from it keep working. `Ok(false)` when there is no such package; deleting twice is a no-op.
pub(super) async fn delete_package(
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

pub(super) async fn find_package(
    pool: &PgPool,
    id: i64,
) -> Result<Option<PackageRow>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {PACKAGE_COLUMNS} FROM packages WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// A page of packages in `sort` order (`descending` flips it), after the keyset `after`.
pub(super) async fn list_packages(
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
