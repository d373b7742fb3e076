//! The console in a real browser: `e2e/console.spec.mjs` drives Debian's chromium (through
//! playwright-core) against an engine served on a real socket over a fresh database. Then this
//! test checks what the operator downloaded and what the database holds.
//!
//! Needs `node`, `/usr/bin/chromium` (Debian's `chromium` package) and `e2e/node_modules`
//! (`npm ci --prefix e2e`); `scripts/test-deps.sh` installs them. A missing one fails the test:
//! a browser test that skips itself on a machine without a browser would prove nothing.
//! Screenshots and downloads are kept in `target/e2e/console/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use calamine::{Data, Reader, Xlsx, open_workbook};
use credits_engine::app::App;
use credits_engine::clock::SystemClock;
use serde_json::Value;
use sqlx::PgPool;

const USER_ID: i64 = 4242;

fn out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e/console")
}

/// The rows of the CSV download, by column name.
fn csv_rows(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let mut reader = csv::Reader::from_path(path).expect("the CSV download is readable");
    let headers = reader.headers().unwrap().clone();
    reader
        .records()
        .map(|record| {
            let record = record.unwrap();
            headers
                .iter()
                .zip(record.iter())
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect()
        })
        .collect()
}

#[sqlx::test(migrations = "./migrations/postgres")]
async fn an_operator_and_a_user_use_the_console_in_a_browser(pool: PgPool) {
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e");
    assert!(
        e2e.join("node_modules/playwright-core").is_dir(),
        "e2e/node_modules is missing: run `npm ci --prefix e2e` (scripts/test-deps.sh does)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's chromium package (scripts/test-deps.sh does)"
    );

    let app = App::build_with(
        credits_engine::store::postgres::PgStore::db(pool.clone()),
        common::settings("postgres://unused"),
        Arc::new(SystemClock),
    )
    .await
    .expect("engine builds");
    let addr = app.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));

    let out = out_dir();
    let _ = std::fs::remove_dir_all(&out);
    let script = e2e.join("console.spec.mjs");
    let run = {
        let (base, out) = (format!("http://{addr}"), out.clone());
        tokio::task::spawn_blocking(move || {
            Command::new("node")
                .arg(script)
                .env("BASE_URL", base)
                .env("ADMIN_TOKEN", common::admin_token())
                .env("USER_TOKEN", common::user_token(USER_ID))
                .env("SERVICE_TOKEN", common::SERVICE_TOKEN)
                .env("USER_ID", USER_ID.to_string())
                .env("OUT_DIR", &out)
                .env("CHROMIUM", chromium)
                .output()
                .expect("node runs (is Node.js installed?)")
        })
        .await
        .unwrap()
    };
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the browser script failed ({}); screenshots in {}\nstdout:\n{stdout}\nstderr:\n{}",
        run.status,
        out.display(),
        String::from_utf8_lossy(&run.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .expect("the script prints what it saw as JSON");
    let consumption_id = seen["consumption_id"].as_i64().unwrap();
    let package_id = seen["package_id"].as_i64().unwrap();

    // The downloads hold the deduct the operator saw, the same in both files.
    let rows = csv_rows(&out.join("consumption.csv"));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["id"], consumption_id.to_string());
    assert_eq!(rows[0]["user_id"], USER_ID.to_string());
    assert_eq!(rows[0]["action_key"], "e2e_summary");
    assert_eq!(rows[0]["quantity"], "3");
    assert_eq!(rows[0]["credits_cost"], "6");
    assert_eq!(rows[0]["idempotency_key"], "e2e-1");

    let mut workbook: Xlsx<_> =
        open_workbook(out.join("consumption.xlsx")).expect("the .xlsx download opens");
    let sheet = workbook
        .worksheet_range("consumption")
        .expect("a consumption sheet");
    let cells: Vec<Vec<Data>> = sheet.rows().map(<[Data]>::to_vec).collect();
    assert_eq!(cells.len(), 2, "a header and one row: {cells:?}");
    let column = |name: &str| {
        cells[0]
            .iter()
            .position(|cell| *cell == Data::String(name.to_owned()))
            .unwrap_or_else(|| panic!("no {name} column"))
    };
    assert_eq!(cells[1][column("id")], Data::Float(consumption_id as f64));
    assert_eq!(cells[1][column("credits_cost")], Data::Float(6.0));
    assert_eq!(
        cells[1][column("action_key")],
        Data::String("e2e_summary".to_owned())
    );

    // The database holds what the forms saved, and nothing the refused forms sent.
    let (cost, version): (i64, i64) = sqlx::query_as(
        "SELECT credits_cost, version FROM action_prices WHERE action_key = 'e2e_summary'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((cost, version), (2, 1));
    let packages: Vec<(i64, String, Option<i64>)> = sqlx::query_as(
        "SELECT id, package_type, credits_amount FROM packages WHERE name = 'E2E pack'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(packages, vec![(package_id, "credits".to_owned(), Some(50))]);
    let grants: Vec<(String, i64, Option<String>)> = sqlx::query_as(
        "SELECT status, remaining_credits, note FROM user_packages WHERE user_id = $1",
    )
    .bind(USER_ID)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        grants,
        vec![("active".to_owned(), 44, Some("browser test".to_owned()))]
    );
    for screenshot in ["prices", "consumption", "me"] {
        let found = std::fs::read_dir(&out)
            .unwrap()
            .filter_map(Result::ok)
            .any(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                name.ends_with(&format!("-{screenshot}.png"))
            });
        assert!(found, "a screenshot of {screenshot} in {}", out.display());
    }
}
