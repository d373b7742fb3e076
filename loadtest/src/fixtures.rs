//! The run's users in the engine's database: one package row and one active grant per user,
//! inserted directly (one statement) in a fresh range of user ids that no wallet has loaded, so
//! each wallet reads its grant from the database on its first request. The statements run on
//! either backend (sqlx's `Any` driver).

use sqlx::AnyPool;

use crate::Error;
use crate::config::Backend;

/// The users of a phase: ids `first ..= first + count - 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserRange {
    pub first: i64,
    pub count: u64,
}

impl UserRange {
    /// The `index`-th user (`index < count`).
    pub fn id(&self, index: u64) -> i64 {
        self.first + index as i64
    }

    pub fn last(&self) -> i64 {
        self.id(self.count.saturating_sub(1))
    }

    pub fn ids(&self) -> Vec<i64> {
        (0..self.count).map(|index| self.id(index)).collect()
    }
}

/// The current `credits_cost` of an enabled action.
pub async fn action_cost(pool: &AnyPool, action_key: &str) -> Result<i64, Error> {
    let cost: Option<i64> = sqlx::query_scalar(
        "SELECT credits_cost FROM action_prices WHERE action_key = $1 AND enabled",
    )
    .bind(action_key)
    .fetch_optional(pool)
    .await?;
    cost.ok_or_else(|| Error::Config(format!("no enabled action `{action_key}` in action_prices")))
}

/// The grants of users `$1 ..= $2` of package `$3` with `$4` credits each, activated at the
/// insert. PostgreSQL numbers them from its sequence; SQLite from its counter table, which
/// [`RESERVE_SQLITE_GRANT_IDS`] moved past them first (ids `$5 + 1 ..`).
const INSERT_POSTGRES_GRANTS: &str = "
    WITH RECURSIVE users (u) AS (SELECT $1 UNION ALL SELECT u + 1 FROM users WHERE u < $2)
    INSERT INTO user_packages (user_id, package_id, source, status, priority, unlimited,
        total_credits, remaining_credits, activated_at)
    SELECT u, $3, 'system', 'active', 100, false, $4, $4, now() FROM users";
const INSERT_SQLITE_GRANTS: &str = "
    WITH RECURSIVE users (u) AS (SELECT $1 UNION ALL SELECT u + 1 FROM users WHERE u < $2)
    INSERT INTO user_packages (user_id, id, package_id, source, status, priority, unlimited,
        total_credits, remaining_credits, activated_at)
    SELECT u, $5 + u - $1 + 1, $3, 'system', 'active', 100, false, $4, $4,
           strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')
    FROM users";
/// Reserves `$1` grant ids of SQLite's counter and answers the last id before them.
const RESERVE_SQLITE_GRANT_IDS: &str =
    "UPDATE user_packages_id_seq SET last_value = last_value + $1 RETURNING last_value - $1";

/// Creates `users` users above every user id the database knows, each with one active,
/// never-expiring grant of `credits_per_user` credits.
pub async fn create_engine_users(
    pool: &AnyPool,
    backend: Backend,
    users: u64,
    credits_per_user: i64,
) -> Result<UserRange, Error> {
    let mut tx = pool.begin().await?;
    // Above every user with a grant or a consumption: no wallet can hold any of these users
    // with an empty list of grants from an earlier request.
    let max_known: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(MAX(user_id), 0) AS BIGINT) FROM (
             SELECT user_id FROM user_packages UNION ALL SELECT user_id FROM consumption_records
         ) AS known",
    )
    .fetch_one(&mut *tx)
    .await?;
    let range = UserRange {
        first: max_known + 1,
        count: users,
    };
    let package_id: i64 = sqlx::query_scalar(
        "INSERT INTO packages (name, description, package_type, credits_amount, visible)
         VALUES ('loadtest', 'Grants of a load test run', 'credits', $1, false)
         RETURNING id",
    )
    .bind(credits_per_user)
    .fetch_one(&mut *tx)
    .await?;
    let count = i64::try_from(users).map_err(|_| Error::Config("too many users".into()))?;
    let (sql, first_id_before) = match backend {
        Backend::Postgres => (INSERT_POSTGRES_GRANTS, None),
        Backend::Sqlite => {
            let before: i64 = sqlx::query_scalar(RESERVE_SQLITE_GRANT_IDS)
                .bind(count)
                .fetch_one(&mut *tx)
                .await?;
            (INSERT_SQLITE_GRANTS, Some(before))
        }
    };
    let mut insert = sqlx::query(sql)
        .bind(range.first)
        .bind(range.last())
        .bind(package_id)
        .bind(credits_per_user);
    if let Some(before) = first_id_before {
        insert = insert.bind(before);
    }
    insert.execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(range)
}
