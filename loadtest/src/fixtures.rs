//! The run's users in the engine's database: one package row and one active grant per user,
//! inserted directly (one UNNEST insert) in a fresh range of user ids that no wallet has loaded,
//! so each wallet reads its grant from the database on its first request.

use sqlx::PgPool;

use crate::Error;

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
pub async fn action_cost(pool: &PgPool, action_key: &str) -> Result<i64, Error> {
    let cost: Option<i64> = sqlx::query_scalar(
        "SELECT credits_cost FROM action_prices WHERE action_key = $1 AND enabled",
    )
    .bind(action_key)
    .fetch_optional(pool)
    .await?;
    cost.ok_or_else(|| Error::Config(format!("no enabled action `{action_key}` in action_prices")))
}

/// Creates `users` users above every user id the database knows, each with one active,
/// never-expiring grant of `credits_per_user` credits.
pub async fn create_engine_users(
    pool: &PgPool,
    users: u64,
    credits_per_user: i64,
) -> Result<UserRange, Error> {
    let mut tx = pool.begin().await?;
    // Above every user with a grant or a consumption: no wallet can hold any of these users
    // with an empty list of grants from an earlier request.
    let max_known: i64 = sqlx::query_scalar(
        "SELECT GREATEST(
             (SELECT COALESCE(MAX(user_id), 0) FROM user_packages),
             (SELECT COALESCE(MAX(user_id), 0) FROM consumption_records))",
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
    sqlx::query(
        "INSERT INTO user_packages (user_id, package_id, source, status, priority, unlimited,
             total_credits, remaining_credits, activated_at)
         SELECT u, $2, 'system', 'active', 100, false, $3, $3, now()
         FROM UNNEST($1::bigint[]) AS u",
    )
    .bind(range.ids())
    .bind(package_id)
    .bind(credits_per_user)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(range)
}
