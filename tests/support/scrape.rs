//! Reading a `/metrics` scrape, and the metric names a rule file or dashboard mentions.

// Each test file takes what it needs.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use crate::support::{Http, Stickless};

/// One scrape of a stickless's `/metrics`.
pub struct Scrape {
    pub text: String,
}

impl Scrape {
    /// Scrapes `proxy`'s admin listener.
    pub async fn of(proxy: &Stickless) -> Self {
        let r = Http::new().get(&proxy.admin_url("/metrics")).await;
        assert_eq!(r.status, 200, "GET /metrics");
        Scrape { text: r.text() }
    }

    /// Every family, from its `# TYPE` line, with its type.
    pub fn families(&self) -> BTreeMap<String, String> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .map(|(name, kind)| (name.to_string(), kind.to_string()))
            .collect()
    }

    /// Every sample line: the series (name and labels) and its value.
    pub fn samples(&self) -> Vec<(String, f64)> {
        self.text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    /// The names of every sample (`_bucket`, `_count` and `_sum` of histograms included).
    pub fn sample_names(&self) -> BTreeSet<String> {
        self.samples()
            .into_iter()
            .map(|(s, _)| s.split('{').next().unwrap_or_default().to_string())
            .collect()
    }

    /// The value of one series, written as in the text format.
    pub fn value(&self, series: &str) -> Option<f64> {
        self.samples()
            .into_iter()
            .find_map(|(s, v)| (s == series).then_some(v))
    }
}

/// The metric names in `text`: every word (of letters, digits, `_` and `:`) that starts with
/// `stickless_`, `stickless:` (a recorded series) or `process_`.
pub fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .map(|w| w.trim_end_matches(':'))
        .filter(|w| {
            w.starts_with("stickless_") || w.starts_with("stickless:") || w.starts_with("process_")
        })
        .map(str::to_string)
        .collect()
}
