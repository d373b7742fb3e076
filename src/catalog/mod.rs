//! Action prices and packages as an immutable snapshot. The deduct path reads the snapshot
//! (never the price table); admin writes build a new snapshot and swap it in whole, so a deduct
//! sees either the old price or the new one, never half of a change.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::domain::{Credits, PackageId, PackageType};
use crate::store::{self, ActionPriceRow, Db, PackageRow, Store};

/// What a deduct needs of an action's price.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Price {
    pub credits_cost: Credits,
    pub version: i64,
    pub enabled: bool,
}

/// What assigning a package needs of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Package {
    pub id: PackageId,
    pub package_type: PackageType,
    pub credits_amount: Option<Credits>,
    pub duration_days: Option<i32>,
    pub name: String,
    pub priority: i32,
    pub deleted: bool,
    pub assign_to_new_users: bool,
}

#[derive(Debug, Default)]
pub struct Snapshot {
    prices: HashMap<String, Price>,
    packages: HashMap<PackageId, Package>,
    /// The rows themselves, for the public lists (which never query the database).
    price_rows: Vec<ActionPriceRow>,
    package_rows: Vec<PackageRow>,
}

impl Snapshot {
    pub fn from_rows(
        prices_in: &[ActionPriceRow],
        packages_in: &[PackageRow],
    ) -> Result<Snapshot, sqlx::Error> {
        let prices = prices_in
            .iter()
            .map(|row| {
                let credits_cost = Credits::new(row.credits_cost).ok_or_else(|| {
                    sqlx::Error::Protocol(format!("negative price for {}", row.action_key))
                })?;
                let price = Price {
                    credits_cost,
                    version: row.version,
                    enabled: row.enabled,
                };
                Ok((row.action_key.clone(), price))
            })
            .collect::<Result<_, sqlx::Error>>()?;
        let packages = packages_in
            .iter()
            .map(|row| {
                let package = Package {
                    id: PackageId(row.id),
                    package_type: store::parse_package_type(&row.package_type)?,
                    credits_amount: row.credits_amount.and_then(Credits::new),
                    duration_days: row.duration_days,
                    name: row.name.clone(),
                    priority: row.priority,
                    deleted: row.deleted_at.is_some(),
                    assign_to_new_users: row.assign_to_new_users,
                };
                Ok((package.id, package))
            })
            .collect::<Result<_, sqlx::Error>>()?;
        Ok(Snapshot {
            prices,
            packages,
            price_rows: prices_rows_sorted(prices_in),
            package_rows: packages_in.to_vec(),
        })
    }

    /// Enabled action prices, by key.
    pub fn enabled_prices(&self) -> impl Iterator<Item = &ActionPriceRow> {
        self.price_rows.iter().filter(|row| row.enabled)
    }

    /// Packages visible to customers (visible and not deleted), in `sort_order`.
    pub fn visible_packages(&self) -> impl Iterator<Item = &PackageRow> {
        self.package_rows
            .iter()
            .filter(|row| row.visible && row.deleted_at.is_none())
    }

    /// Packages assigned to every new user (not deleted).
    pub fn new_user_packages(&self) -> impl Iterator<Item = &Package> {
        let mut packages: Vec<&Package> = self
            .packages
            .values()
            .filter(|package| package.assign_to_new_users && !package.deleted)
            .collect();
        packages.sort_by_key(|package| package.id);
        packages.into_iter()
    }

    pub fn price(&self, action_key: &str) -> Option<&Price> {
        self.prices.get(action_key)
    }

    pub fn package(&self, id: PackageId) -> Option<&Package> {
        self.packages.get(&id)
    }
}

fn prices_rows_sorted(rows: &[ActionPriceRow]) -> Vec<ActionPriceRow> {
    let mut rows = rows.to_vec();
    rows.sort_by(|a, b| a.action_key.cmp(&b.action_key));
    rows
}

/// The current snapshot, swapped whole on every reload.
#[derive(Debug, Default)]
pub struct Catalog {
    current: RwLock<Arc<Snapshot>>,
    /// Admin writes take this around "commit, then reload", so two writes cannot swap in their
    /// snapshots out of order (an older snapshot replacing a newer one).
    writes: tokio::sync::Mutex<()>,
    /// Set while a failed reload is being retried in the background.
    retrying: std::sync::atomic::AtomicBool,
}

/// How often a failed reload after a committed write is retried.
const RELOAD_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl Catalog {
    pub async fn load(db: &dyn Store) -> Result<Catalog, sqlx::Error> {
        let catalog = Catalog::default();
        catalog.reload(db).await?;
        Ok(catalog)
    }

    /// Reads both tables and swaps the snapshot in one step.
    pub async fn reload(&self, db: &dyn Store) -> Result<(), sqlx::Error> {
        let prices = db.load_action_prices().await?;
        let packages = db.load_packages().await?;
        let snapshot = Arc::new(Snapshot::from_rows(&prices, &packages)?);
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = snapshot;
        Ok(())
    }

    /// Reloads after a committed write. A failure (the database went away right after the
    /// commit) does not fail the write: the reload is retried in the background until it
    /// succeeds, so the snapshot catches up by itself.
    pub async fn reload_after_write(self: &Arc<Self>, db: &Db) {
        let Err(error) = self.reload(&**db).await else {
            return;
        };
        tracing::error!(%error, "catalog reload after a committed write failed; retrying");
        if self
            .retrying
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let catalog = self.clone();
        let db = db.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_RETRY_INTERVAL).await;
                let _writes = catalog.lock_writes().await;
                match catalog.reload(&*db).await {
                    Ok(()) => break,
                    Err(error) => tracing::warn!(%error, "catalog reload still failing"),
                }
            }
            catalog
                .retrying
                .store(false, std::sync::atomic::Ordering::Release);
            tracing::info!("catalog reloaded after earlier failures");
        });
    }

    /// Held by an admin write from before its commit until its reload.
    pub async fn lock_writes(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.writes.lock().await
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}
