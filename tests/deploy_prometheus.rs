//! deploy/prometheus and deploy/grafana: promtool accepts the configuration and the rules, the
//! rules' unit tests pass, and every metric the rules, their tests and the dashboard name is one a
//! live stickless exports (and the dashboard shows every family), so they cannot drift from the
//! code. Needs `promtool`, from Debian's `prometheus` package (scripts/test.sh installs it).

#[path = "support/scrape.rs"]
mod scrape;
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use scrape::{metric_names, Scrape};
use support::*;

const CONFIG: &str = "deploy/prometheus/prometheus.yml";
const RULES: &str = "deploy/prometheus/rules/stickless.rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/tests/stickless.rules.test.yml";
const DASHBOARD: &str = "deploy/grafana/stickless.json";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `$STICKLESS_TEST_PROMTOOL`, else `promtool` on PATH (or in /usr/bin), or a failure saying how
/// to get it.
fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("STICKLESS_TEST_PROMTOOL").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("promtool"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "promtool not found: install Debian's `prometheus` package \
                 (apt-get install prometheus), or run `bash scripts/test.sh`, which installs it"
            )
        })
}

/// Runs `promtool <args>` in the repository and fails with its output unless it succeeds.
fn run_promtool(args: &[&str]) {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(repo())
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_scrape_configuration() {
    run_promtool(&["check", "config", CONFIG]);
}

#[test]
fn promtool_accepts_the_rules() {
    run_promtool(&["check", "rules", RULES]);
}

#[test]
fn the_rules_pass_their_unit_tests() {
    run_promtool(&["test", "rules", RULE_TESTS]);
}

/// The alert rules, each as the text from its `- alert:` line to the next rule.
fn alerts() -> Vec<(String, String)> {
    let rules = read(RULES);
    rules
        .split("\n      - ")
        .filter_map(|rule| {
            let name = rule.strip_prefix("alert: ")?.lines().next()?.trim();
            Some((name.to_string(), rule.to_string()))
        })
        .collect()
}

#[test]
fn every_alert_has_a_duration_a_severity_a_summary_and_a_description_and_is_in_the_readme() {
    let alerts = alerts();
    assert!(alerts.len() >= 4, "{alerts:?}");
    let readme = read("README.md");
    for (name, rule) in &alerts {
        for key in ["for: ", "severity: ", "summary: ", "description: "] {
            assert!(rule.contains(key), "alert {name} has no {key}");
        }
        assert!(
            readme.contains(&format!("`{name}`")),
            "README.md does not say which metric alert {name} watches"
        );
    }
    let names: BTreeSet<&str> = alerts.iter().map(|(n, _)| n.as_str()).collect();
    for wanted in [
        "SticklessHighErrorRatio",
        "SticklessStoreUnavailable",
        "SticklessBreakerOpen",
        "SticklessLatencySLOBurnFast",
    ] {
        assert!(names.contains(wanted), "no alert {wanted}");
    }
}

/// Every `expr` of the dashboard's panels, at any depth.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_is_an_importable_grafana_dashboard() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is valid JSON");
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert!(dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 36);
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    assert!(vars.iter().any(|v| v["name"] == "instance"), "no $instance");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64()), "panel id {} twice", p["id"]);
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"]["uid"], "${DS_PROMETHEUS}",
                "panel {}",
                p["title"]
            );
            assert!(p["targets"].as_array().is_some_and(|t| !t.is_empty()));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rules_and_the_dashboard_name_only_exported_metrics_and_show_every_family() {
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(&backend.url(), &[]);
    let scrape = Scrape::of(&proxy).await;
    let families: BTreeSet<String> = scrape.families().into_keys().collect();
    let exported: BTreeSet<String> = families.union(&scrape.sample_names()).cloned().collect();

    let rules = read(RULES);
    let recorded: BTreeSet<String> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(|n| n.trim().to_string())
        .collect();
    assert!(!recorded.is_empty());

    let dashboard: serde_json::Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let dashboard_text = exprs.join("\n");
    for (file, text) in [
        (RULES, rules.as_str()),
        (RULE_TESTS, read(RULE_TESTS).as_str()),
        (DASHBOARD, dashboard_text.as_str()),
    ] {
        for name in metric_names(text) {
            if name.contains(':') {
                assert!(
                    recorded.contains(&name),
                    "{file} uses {name}, recorded nowhere in {RULES}"
                );
            } else {
                assert!(
                    exported.contains(&name),
                    "{file} names {name}, which stickless does not export; it exports:\n{exported:#?}"
                );
            }
        }
    }

    // Every family has a panel, the process's included.
    let shown = metric_names(&dashboard_text);
    let has_panel = |family: &str| {
        ["", "_bucket", "_count", "_sum"]
            .iter()
            .any(|s| shown.contains(&format!("{family}{s}")))
    };
    for family in &families {
        assert!(has_panel(family), "no dashboard panel shows {family}");
    }
}
