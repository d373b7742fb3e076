//! The load generator end to end: an engine in-process on a fresh database (one per test),
//! driven for a moment with deducts, checks, refunds and keyed retries, then the baseline on
//! the same workload; both must account for every credit. Speed is never asserted.

use std::sync::Arc;
use std::time::Duration;

use credits_engine::app::App;
use credits_engine::clock::SystemClock;
use credits_engine::config::{Secret, Settings};
use credits_engine::store::Db;
use credits_engine::store::postgres::PgStore;
use credits_engine::store::sqlite::SqliteStore;
use loadtest::config::Backend;
use loadtest::conservation::{self, ENGINE_TABLES};
use loadtest::driver::{DeductAck, Ledger, RefundAck};
use loadtest::target::Outcome;
use loadtest::{Config, EngineSource, HotUsers, Workload, fixtures};
use sqlx::AnyPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

const SERVICE_TOKEN: &str = "loadtest-test-token";

fn workload() -> Workload {
    Workload {
        duration: Duration::from_secs(1),
        warmup: Duration::from_millis(300),
        users: 20,
        concurrency: 8,
        rate: None,
        mix: "deduct=70,check=10,refund=20".parse().unwrap(),
        hot: Some(HotUsers {
            users: 2,
            share: 0.5,
        }),
        retry_share: 0.1,
        action_key: "ai_chat".into(),
        credits_per_user: 1_000_000,
        seed: 7,
    }
}

#[sqlx::test(migrations = "../migrations/postgres")]
async fn engine_and_baseline_conserve_every_credit(
    pool_options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = pool_options.connect_with(connect.clone()).await.unwrap();
    let url = url_of(&connect);
    let summary = run_in_process(PgStore::db(pool), url, Backend::Postgres, Some(connect)).await;

    let baseline = summary.baseline.as_ref().expect("the baseline ran");
    assert!(summary.conservation_ok, "{summary}");
    for phase in [&summary.engine, baseline] {
        assert!(phase.conservation.ok, "{summary}");
        assert!(phase.deducts_acknowledged > 0, "{summary}");
        // Every acknowledged deduct was checked, the warm-up's too.
        assert!(
            phase.conservation.consumptions >= phase.deducts_acknowledged,
            "{summary}"
        );
        // Retries of acknowledged keys came back as replays, and refunds went through.
        assert!(phase.outcomes.get(Outcome::Replayed) > 0, "{summary}");
        assert!(phase.conservation.refunds > 0, "{summary}");
        assert!(
            phase.by_op["check"].outcomes.get(Outcome::Ok) > 0,
            "{summary}"
        );
    }
    let ratio = summary.ratio.expect("both phases acknowledged deducts");
    assert!(ratio > 0.0);
    let json = serde_json::to_value(&summary).unwrap();
    for key in [
        "deducts_per_s",
        "requests_per_s",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "outcomes",
    ] {
        assert!(json["engine"].get(key).is_some(), "engine.{key} in {json}");
        assert!(
            json["baseline"].get(key).is_some(),
            "baseline.{key} in {json}"
        );
    }
    assert_eq!(json["conservation_ok"], true);
}

/// The check is not a formality: a ledger that disagrees with the database is reported, with
/// the user and the consumption named.
#[sqlx::test(migrations = "../migrations/postgres")]
async fn conservation_names_what_does_not_add_up(
    _pool_options: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = any_pool(&url_of(&connect)).await;
    let users = fixtures::create_engine_users(&pool, Backend::Postgres, 3, 100)
        .await
        .unwrap();
    let fine = conservation::check(&pool, ENGINE_TABLES, users, 100, &Ledger::default())
        .await
        .unwrap();
    assert!(fine.ok, "{fine:?}");

    // A deduction the client was told about but the database never saw.
    let mut ledger = Ledger::default();
    ledger.deducts.push(DeductAck {
        user_id: users.first,
        consumption_id: 987_654,
        credits_cost: 1,
    });
    let broken = conservation::check(&pool, ENGINE_TABLES, users, 100, &ledger)
        .await
        .unwrap();
    assert!(!broken.ok);
    let problems = broken.problems.join("\n");
    assert!(problems.contains("987654"), "{problems}");
    assert!(
        problems.contains(&format!("user {}", users.first)),
        "{problems}"
    );

    // Credits that vanished from a grant without any acknowledged deduction.
    sqlx::query(
        "UPDATE user_packages SET remaining_credits = remaining_credits - 5,
             used_credits = used_credits + 5 WHERE user_id = $1",
    )
    .bind(users.last())
    .execute(&pool)
    .await
    .unwrap();
    let mut refund_only = Ledger::default();
    refund_only.refunds.push(RefundAck {
        user_id: users.first,
        consumption_id: 123,
        refunded_credits: 2,
        forfeited_credits: 0,
    });
    let broken = conservation::check(&pool, ENGINE_TABLES, users, 100, &refund_only)
        .await
        .unwrap();
    assert!(!broken.ok);
    let problems = broken.problems.join("\n");
    assert!(
        problems.contains(&format!("user {}", users.last())),
        "{problems}"
    );
    assert!(problems.contains("off by -5"), "{problems}");
    assert!(problems.contains("off by -2"), "{problems}");
}

/// The engine on its embedded SQLite store, under the same workload: every credit accounted
/// for there too (the baseline is PostgreSQL's, so it does not run).
#[tokio::test]
async fn the_engine_on_sqlite_conserves_every_credit() {
    let file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("loadtest-conservation-{}.db", std::process::id()));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
    }
    let url = format!("sqlite://{}", file.display());
    let store = SqliteStore::connect(&url, 8).await.unwrap();
    let summary = run_in_process(Arc::new(store), url, Backend::Sqlite, None).await;

    assert!(summary.baseline.is_none());
    assert!(summary.conservation_ok, "{summary}");
    let engine = &summary.engine;
    assert!(engine.deducts_acknowledged > 0, "{summary}");
    assert!(
        engine.conservation.consumptions >= engine.deducts_acknowledged,
        "{summary}"
    );
    assert!(engine.outcomes.get(Outcome::Replayed) > 0, "{summary}");
    assert!(engine.conservation.refunds > 0, "{summary}");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
    }
}

/// Runs the workload against an engine served in this process over `db`, whose database
/// `database_url` names; the baseline too when `baseline_database` is given.
async fn run_in_process(
    db: Db,
    database_url: String,
    backend: Backend,
    baseline_database: Option<PgConnectOptions>,
) -> loadtest::Summary {
    let mut settings = Settings::for_database("postgres://unused");
    settings.listen_addr = "127.0.0.1:0".parse().unwrap();
    settings.service_tokens = vec![Secret::new(SERVICE_TOKEN)];
    settings.jwt_secret = Some(Secret::new("loadtest-test-jwt-secret"));
    settings.db_pool_max = 8;
    let app = App::build_with(db, settings, Arc::new(SystemClock))
        .await
        .unwrap();
    let config = Config {
        database_url,
        backend,
        baseline_database,
        engine: EngineSource::Running {
            addr: app.local_addr().unwrap(),
            service_token: SERVICE_TOKEN.into(),
        },
        workload: workload(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let summary = loadtest::run(&config).await.unwrap();
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    summary
}

/// A URL for the test's database (the load generator connects by URL): `DATABASE_URL`, with
/// its credentials and parameters, naming the test's database.
fn url_of(connect: &PgConnectOptions) -> String {
    let database = connect
        .get_database()
        .expect("sqlx::test names its database");
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL names the test server");
    let (address, parameters) = base.split_once('?').unwrap_or((&base, ""));
    let (server, _) = address
        .rsplit_once('/')
        .expect("DATABASE_URL has a database path");
    if parameters.is_empty() {
        format!("{server}/{database}")
    } else {
        format!("{server}/{database}?{parameters}")
    }
}

async fn any_pool(url: &str) -> AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .unwrap()
}
