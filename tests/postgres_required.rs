//! The suite runs every backend test on PostgreSQL as well as on SQLite: the PostgreSQL half is
//! required, never skipped. Without a reachable server this test fails first, saying why (the
//! PostgreSQL tests fail too, each with sqlx's connection error).

use std::time::Duration;

use sqlx::Connection;

#[tokio::test]
async fn the_postgresql_half_of_the_suite_has_its_server() {
    let url = std::env::var("DATABASE_URL").unwrap_or_default();
    assert!(
        url.starts_with("postgres://") || url.starts_with("postgresql://"),
        "DATABASE_URL must name the PostgreSQL server the tests create their databases on \
         (the README's test command sets postgres://postgres@127.0.0.1:5432/postgres); got {:?}",
        url.split('@').next_back().unwrap_or_default()
    );
    let connected =
        tokio::time::timeout(Duration::from_secs(10), sqlx::PgConnection::connect(&url)).await;
    match connected {
        Ok(Ok(connection)) => connection.close().await.expect("closes"),
        Ok(Err(error)) => panic!(
            "PostgreSQL at DATABASE_URL is not reachable ({error}); start it, for example with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
        ),
        Err(_) => panic!("PostgreSQL at DATABASE_URL did not answer within 10 s"),
    }
}
