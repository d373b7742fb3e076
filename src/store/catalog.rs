//! The catalog's fields, filters and orders, shared by both backends' statements (which live
//! in `postgres/catalog.rs` and `sqlite/catalog.rs`). Every write commits with its audit event
//! in one transaction; the caller then reloads the in-memory snapshot.

use serde_json::json;

use super::{ActionPriceRow, PackageRow};

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

/// What a price event records of the price (an update adds the `previous` values).
pub(crate) fn price_event_payload(row: &ActionPriceRow) -> serde_json::Value {
    json!({
        "action_key": row.action_key,
        "version": row.version,
        "credits_cost": row.credits_cost,
        "enabled": row.enabled,
        "name": row.name,
    })
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

    pub(crate) fn payload(&self) -> serde_json::Value {
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
    pub(crate) fn key_sql(self) -> &'static str {
        match self {
            PackageSort::SortOrder => "CAST(sort_order AS BIGINT)",
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
