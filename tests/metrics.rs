//! What a fresh stickless exports on `/metrics`: every family the README lists (and nothing it
//! does not), every series at 0 before the first request, the version and the process's own
//! figures.

#[path = "support/scrape.rs"]
mod scrape;
mod support;

use scrape::{metric_names, Scrape};
use support::*;

/// The metric names the README's Observability section mentions.
fn readme_metrics() -> std::collections::BTreeSet<String> {
    let readme = include_str!("../README.md");
    let start = readme
        .find("\n## Observability")
        .expect("README has an Observability section");
    let section = &readme[start + 1..];
    let end = section.find("\n## ").unwrap_or(section.len());
    metric_names(&section[..end])
        .into_iter()
        .filter(|n| !n.contains(':'))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_stickless_exports_every_family_of_the_readme_at_zero() {
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(&backend.url(), &[]);
    let scrape = Scrape::of(&proxy).await;
    let families = scrape.families();

    let listed = readme_metrics();
    for name in &listed {
        assert!(
            families.contains_key(name),
            "the README lists {name}, which /metrics does not export:\n{}",
            scrape.text
        );
    }
    for name in families.keys() {
        assert!(
            listed.contains(name),
            "/metrics exports {name}, which the README's metric list does not mention"
        );
    }

    // Before the first request, every counter and histogram is there, at 0.
    for (series, value) in scrape.samples() {
        let name = series.split('{').next().unwrap_or_default();
        let kind = families
            .iter()
            .find(|(f, _)| {
                name.strip_prefix(f.as_str())
                    .is_some_and(|s| ["", "_bucket", "_count", "_sum"].contains(&s))
            })
            .map(|(_, k)| k.as_str());
        if name.starts_with("stickless_") && matches!(kind, Some("counter" | "histogram")) {
            assert_eq!(value, 0.0, "{series} before any request");
        }
    }
    for series in [
        "stickless_upstream_errors_total{reason=\"connect\"}",
        "stickless_upstream_errors_total{reason=\"timeout\"}",
        "stickless_upstream_errors_total{reason=\"response\"}",
        "stickless_store_errors_total{kind=\"circuit_open\"}",
        "stickless_session_events_total{event=\"protocol_error\"}",
        "stickless_request_duration_seconds_count{status=\"5xx\"}",
        "stickless_request_duration_seconds_bucket{status=\"2xx\",le=\"0.25\"}",
        "stickless_breaker_state",
    ] {
        assert_eq!(scrape.value(series), Some(0.0), "{series}");
    }

    let build_info = format!(
        "stickless_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(scrape.value(&build_info), Some(1.0), "{build_info}");

    // The process's own figures, as every Prometheus client exports them.
    for family in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "process_virtual_memory_bytes",
    ] {
        assert!(families.contains_key(family), "no {family}");
    }
    let rss = scrape.value("process_resident_memory_bytes").unwrap();
    let kib = proc_status_kib(proxy.pid(), "VmRSS:") as f64;
    assert!(
        rss > kib * 1024.0 / 4.0 && rss < kib * 1024.0 * 4.0,
        "resident memory {rss} bytes, /proc says {kib} KiB"
    );
    let open = scrape.value("process_open_fds").unwrap();
    let max = scrape.value("process_max_fds").unwrap();
    assert!(open >= 3.0 && open < max, "open fds {open}, limit {max}");
    let started = scrape.value("process_start_time_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - started).abs() < 600.0,
        "start time {started}, now {now}"
    );
}
