//! `cargo run --release -p loadtest -- --database-url URL --engine-bin PATH --duration 20s
//! --users N --concurrency C [--baseline] [--summary-json PATH]`: see the crate documentation
//! and docs/performance.md.

use std::process::ExitCode;

use clap::Parser;
use loadtest::Args;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let summary_json = args.summary_json.clone();
    let config = match args.into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("loadtest: {error}");
            return ExitCode::from(2);
        }
    };
    let summary = match loadtest::run(&config).await {
        Ok(summary) => summary,
        Err(error) => {
            eprintln!("loadtest: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("{summary}");
    if let Some(path) = summary_json {
        let written = serde_json::to_vec_pretty(&summary)
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(&path, json));
        if let Err(error) = written {
            eprintln!("loadtest: cannot write {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if !summary.conservation_ok {
        eprintln!("loadtest: conservation BROKEN: see the problems listed above");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
