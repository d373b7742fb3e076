//! The operator files in `dashboards/` against the engine: promtool accepts the alert rules,
//! their unit tests and the scrape config; every dashboard query is valid PromQL; every
//! `credits_` metric they name is one the engine exports; and the dashboard charts every metric
//! the engine exports. No database: nothing here starts the engine.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

use credits_engine::metrics::ALL;
use serde_json::Value;

const DASHBOARD: &str = "credits-engine.json";
const ALERTS: &str = "alerts.yml";
const ALERTS_TEST: &str = "alerts_test.yml";
const PROMETHEUS: &str = "prometheus.yml";

/// The suffixes Prometheus adds to a histogram's name for its series.
const HISTOGRAM_SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

fn read(file: &str) -> String {
    let path = dashboards_dir().join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("reading {path:?}: {error}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is valid JSON")
}

/// Runs `promtool args` in `dashboards/` (the files name each other relatively): its output
/// when it fails. A missing promtool fails the test: a check that skips itself on a machine
/// without the tool would pass without checking anything.
fn run_promtool(args: &[&str]) -> Result<(), String> {
    let output = match Command::new("promtool")
        .args(args)
        .current_dir(dashboards_dir())
        .output()
    {
        Ok(output) => output,
        Err(error) if error.kind() == ErrorKind::NotFound => panic!(
            "promtool is not installed. Install Debian's `prometheus` package, which ships it: \
             apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
             --no-install-recommends prometheus (.ci/run does this)"
        ),
        Err(error) => panic!("running promtool: {error}"),
    };
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "promtool {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    ))
}

fn promtool(args: &[&str]) {
    if let Err(report) = run_promtool(args) {
        panic!("{report}");
    }
}

/// Every `expr` in the dashboard (panel targets, rows' nested panels), with its JSON path.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(value: &Value, path: &str, found: &mut Vec<(String, String)>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    let path = format!("{path}/{key}");
                    match (key.as_str(), value) {
                        ("expr", Value::String(expr)) => found.push((path, expr.clone())),
                        _ => walk(value, &path, found),
                    }
                }
            }
            Value::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    walk(item, &format!("{path}/{index}"), found);
                }
            }
            _ => {}
        }
    }
    let mut found = Vec::new();
    walk(dashboard, "", &mut found);
    found
}

/// Every string in the dashboard: queries, variable definitions, titles and descriptions.
fn dashboard_strings(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::String(text) => found.push(text.clone()),
        Value::Array(items) => items.iter().for_each(|item| dashboard_strings(item, found)),
        Value::Object(map) => map.values().for_each(|item| dashboard_strings(item, found)),
        _ => {}
    }
}

/// The `credits_` names in `text`: PromQL identifiers are `[a-zA-Z_:][a-zA-Z0-9_:]*`, so
/// anything else separates them (a route such as `/billing/credits/deduct` names nothing).
/// A trailing colon is prose ("credits_ready: 1 when ..."), not part of a name.
fn credits_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .map(|word| word.trim_end_matches(':'))
        .filter(|word| word.starts_with("credits_"))
        .map(str::to_owned)
        .collect()
}

/// The exported metric a series name belongs to: itself, or a histogram's name without the
/// `_bucket`, `_sum` or `_count` of its series. None when the engine exports no such metric.
fn exported(name: &str) -> Option<&'static str> {
    let base = |name: &str| ALL.iter().copied().find(|metric| *metric == name);
    base(name).or_else(|| {
        HISTOGRAM_SUFFIXES
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).and_then(base))
    })
}

/// The dashboard's Grafana variables replaced by values Prometheus accepts.
fn without_grafana_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$instance", ".*")
}

#[test]
fn promtool_accepts_the_alert_rules() {
    promtool(&["check", "rules", ALERTS]);
}

#[test]
fn alert_rules_fire_as_their_unit_tests_expect() {
    promtool(&["test", "rules", ALERTS_TEST]);
}

#[test]
fn promtool_accepts_the_scrape_config_and_the_rules_it_loads() {
    promtool(&["check", "config", PROMETHEUS]);
    let config = read(PROMETHEUS);
    for wanted in [
        "job_name: credits-engine",
        "metrics_path: /metrics",
        "scrape_interval: 15s",
        "- alerts.yml",
    ] {
        assert!(config.contains(wanted), "prometheus.yml lacks `{wanted}`");
    }
}

/// Grafana sends the queries as they are, so each one is checked by promtool as the
/// expression of a recording rule in a scratch rules file.
#[test]
fn every_dashboard_query_is_valid_promql() {
    let exprs = dashboard_exprs(&dashboard());
    assert!(!exprs.is_empty(), "the dashboard has no queries");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (index, (path, expr)) in exprs.iter().enumerate() {
        let expr = without_grafana_variables(expr);
        assert!(
            !expr.contains('$'),
            "{path}: a Grafana variable this test does not know: {expr}"
        );
        // A JSON string is a valid YAML double-quoted scalar.
        let quoted = serde_json::to_string(&expr).expect("a string serializes");
        rules.push_str(&format!(
            "      - record: dashboard:expr_{index}\n        expr: {quoted}\n"
        ));
    }
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("dashboard-exprs-{}.yml", std::process::id()));
    std::fs::write(&scratch, &rules).expect("writing the scratch rules file");
    let checked = run_promtool(&["check", "rules", scratch.to_str().expect("a UTF-8 path")]);
    let _ = std::fs::remove_file(&scratch);
    if let Err(report) = checked {
        let listing: Vec<String> = exprs
            .iter()
            .enumerate()
            .map(|(index, (path, expr))| format!("dashboard:expr_{index} = {path}: {expr}"))
            .collect();
        panic!("{report}\nthe dashboard's queries:\n{}", listing.join("\n"));
    }
}

/// A renamed or misspelt metric leaves a panel or an alert silently empty; this names it.
#[test]
fn dashboards_and_alerts_name_only_metrics_the_engine_exports() {
    let mut strings = Vec::new();
    dashboard_strings(&dashboard(), &mut strings);
    let mut sources = vec![(DASHBOARD, strings.join("\n"))];
    for file in [ALERTS, ALERTS_TEST, PROMETHEUS] {
        sources.push((file, read(file)));
    }
    let unknown: Vec<String> = sources
        .iter()
        .flat_map(|(file, text)| {
            credits_names(text)
                .into_iter()
                .filter(|name| exported(name).is_none())
                .map(move |name| format!("{file}: {name}"))
        })
        .collect();
    assert!(
        unknown.is_empty(),
        "metrics the engine does not export (credits_engine::metrics::ALL):\n{}",
        unknown.join("\n")
    );
    // The alert rules do watch the engine's own metrics, not only `up`.
    assert!(
        credits_names(&read(ALERTS)).len() >= 8,
        "alerts.yml names too few engine metrics"
    );
}

#[test]
fn the_dashboard_charts_every_metric_the_engine_exports() {
    let charted: BTreeSet<&str> = dashboard_exprs(&dashboard())
        .iter()
        .flat_map(|(_, expr)| credits_names(expr))
        .filter_map(|name| exported(&name))
        .collect();
    let missing: Vec<&str> = ALL
        .iter()
        .copied()
        .filter(|metric| !charted.contains(metric))
        .collect();
    assert!(
        missing.is_empty(),
        "exported metrics no dashboard query uses: {missing:?}"
    );
}

/// An imported dashboard asks for its data source once; a panel pinned to a data source uid
/// from somebody's Grafana shows "data source not found" everywhere else.
#[test]
fn every_panel_queries_the_datasource_variable() {
    let dashboard = dashboard();
    assert!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion missing or older than 36"
    );
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(
        variables
            .iter()
            .any(|variable| variable["name"] == "datasource"
                && variable["type"] == "datasource"
                && variable["query"] == "prometheus"),
        "no `datasource` variable of Prometheus data sources"
    );
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        assert!(
            ids.insert(panel["id"].as_u64().expect("a numeric panel id")),
            "panel id repeated: {title}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {title}");
        let targets = panel["targets"].as_array().expect("panel targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "panel {title}"
            );
        }
    }
}
