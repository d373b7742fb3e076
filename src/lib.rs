//! credits-engine: charges users in credits for AI features, exactly, fast and durably.
//!
//! Each active user gets an in-memory wallet actor that serializes that user's deductions;
//! wallets hand their effects to a batch writer that commits them to the database in group
//! commits (an SQLite file by default, PostgreSQL when `DATABASE_URL` names one), and a deduct
//! is answered only after its batch committed.
//!
//! # Data flow
//!
//! ```text
//!   HTTP (axum)                      http/     auth, validation, catalog snapshot lookup
//!      |  ask(user_id, msg)
//!      v
//!   Registry (DashMap<user, wallet>) registry.rs   get-or-spawn, bounded mailboxes
//!      |
//!      v
//!   Wallet actor (ractor)            wallet/   pure ledger logic (domain/) on memory,
//!      |  Envelope{effect, reply}              never waits for a commit
//!      v
//!   Batch writer lanes               store/writer.rs   one transaction per batch
//!      |  commit, then reply + Settled
//!      v
//!   Store (one trait)                store/sqlite (default), store/postgres; migrations/<backend>
//! ```
//!
//! The catalog (prices, packages) sits beside this path as an immutable snapshot; the
//! supervisor (reconciliation) sits beside it too, reading the ledger and asking idle wallets.
//!
//! # Layout
//!
//! - [`domain`]: pure burn-down, refund and expiry rules; `now` is an argument.
//! - [`catalog`]: action prices and packages, swapped whole on change.
//! - [`wallet`]: the per-user actor, its messages, and the loader that reads the grants of
//!   wallets starting together in one query.
//! - [`registry`]: finds or spawns wallets.
//! - [`store`]: every SQL statement, behind the [`store::Store`] trait with a PostgreSQL and an
//!   SQLite implementation; [`store::writer`] is the group-commit writer both share.
//! - [`http`]: the router, one module per surface, the error body, and the OpenAPI document.
//! - [`console`]: server-rendered pages for operators (`/console`) and users (`/me`), a
//!   client of the API in process.
//! - [`supervisor`]: beside the path: grant expiry, reconciliation and the database health
//!   probe. (Restarting a wallet that panicked is the registry's `WalletSupervisor`.)
//! - [`metrics`]: every Prometheus metric name, in one place.
//! - [`app`]: wiring and shutdown order; [`config`]: flags and environment.

pub mod app;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod console;
pub mod domain;
pub mod error;
pub mod http;
pub mod metrics;
pub mod registry;
pub mod store;
pub mod supervisor;
pub mod wallet;
