//! End-to-end latency, throughput and memory of the proxy: a real redis-server, the release
//! `stickless` binary as its own process, and a backend, all on loopback.
//!
//! Run with `cargo bench --bench proxy` (needs `redis-server`; `bash scripts/test.sh` installs
//! it). Results are printed as a Markdown table; BENCHMARKS.md records them.
//! `STICKLESS_TEST_BENCH_N` sets the number of sequential requests per scenario (default 5000);
//! `STICKLESS_TEST_BENCH_ARGS` adds flags to stickless (`--local-cache 1000`), split on spaces.
//! `STICKLESS_TEST_BENCH_REPLICA=1` gives the Redis primary a replica (for `--read-from replica`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{proc_status_kib, Http, RedisServer, Stickless, TestBackend};

type C = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// `tasks` clients at once, each sending `per` requests with `headers` to `url`: the time it took.
async fn concurrently(
    client: &Arc<C>,
    url: String,
    tasks: usize,
    per: usize,
    headers: Vec<(&'static str, String)>,
) -> Duration {
    let started = Instant::now();
    let headers = Arc::new(headers);
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (client, url, headers) = (client.clone(), url.clone(), headers.clone());
        handles.push(tokio::spawn(async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            for _ in 0..per {
                one(&client, &url, &headers).await;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    started.elapsed()
}

async fn one(client: &C, url: &str, headers: &[(&str, &str)]) -> Duration {
    let mut req = Request::builder().method(Method::GET).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let started = Instant::now();
    let resp = client
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .expect("response");
    assert!(resp.status().is_success(), "status {}", resp.status());
    resp.into_body().collect().await.expect("body");
    started.elapsed()
}

struct Stats {
    p50: f64,
    p90: f64,
    p99: f64,
    mean: f64,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let at = |q: f64| us(v[((v.len() as f64 * q) as usize).min(v.len() - 1)]);
    Stats {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        mean: v.iter().map(|d| us(*d)).sum::<f64>() / v.len() as f64,
    }
}

async fn scenario(client: &C, n: usize, url: &str, headers: &[(&str, &str)]) -> Stats {
    for _ in 0..n / 10 {
        one(client, url, headers).await;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(one(client, url, headers).await);
    }
    stats(v)
}

fn main() {
    // `cargo test` and nextest run bench targets too (with `--list` or no `--bench`): the
    // measurement is only for `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n: usize = std::env::var("STICKLESS_TEST_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // With a replica, `redis` is the primary; the replica lives as long as the run.
        let (redis, _replica) = if std::env::var("STICKLESS_TEST_BENCH_REPLICA").is_ok_and(|v| v == "1") {
            let pair = support::ReplicatedPair::start();
            (pair.primary, Some(pair.replica))
        } else {
            (RedisServer::start(), None)
        };
        let backend = TestBackend::start().await;
        let extra = std::env::var("STICKLESS_TEST_BENCH_ARGS").unwrap_or_default();
        let extra: Vec<&str> = extra.split_whitespace().collect();
        let proxy = Stickless::on_redis(&backend.url(), &redis, &extra);
        let client: C = Client::builder(TokioExecutor::new()).build_http();
        let rss_idle = proc_status_kib(proxy.pid(), "VmRSS:");

        // A session to read and increment.
        let mut http = Http::with_jar();
        http.get_replying(&proxy.url("/"), &["x-session-set-user: alice", "x-session-set-cart: 3 items"]).await;
        let cookie = format!("sid={}", http.sid.clone().expect("session"));

        let direct = scenario(&client, n, &format!("{}/", backend.url()), &[]).await;
        let anon = scenario(&client, n, &proxy.url("/"), &[]).await;
        let read = scenario(&client, n, &proxy.url("/"), &[("cookie", &cookie)]).await;
        let write = scenario(
            &client,
            n,
            &proxy.url("/"),
            &[("cookie", &cookie), ("x-test-reply", "x-session-incr-visits: 1")],
        )
        .await;

        let tasks = 64;
        let per = (n / 10).max(50);
        let client = Arc::new(client);
        // Read throughput: 64 concurrent clients, each reading the same session.
        let read_elapsed = concurrently(&client, proxy.url("/"), tasks, per, vec![("cookie", cookie.clone())]).await;
        // Throughput: 64 concurrent clients, each incrementing the same session's counter.
        let elapsed = concurrently(
            &client,
            proxy.url("/"),
            tasks,
            per,
            vec![("cookie", cookie.clone()), ("x-test-reply", "x-session-incr-hits: 1".to_owned())],
        )
        .await;
        let total = tasks * per;
        let key = format!("stickless:{}", support::id_of(cookie.trim_start_matches("sid=")));
        let stored = support::hgetall(&redis, &key).await;
        assert_eq!(stored.get("hits").map(String::as_str), Some(total.to_string().as_str()), "no lost increment");

        println!("\nstickless proxy benchmark: {n} sequential keep-alive requests per row, loopback, Redis {}, stickless flags {extra:?}", redis.url());
        println!("\n| scenario | p50 µs | p90 µs | p99 µs | mean µs |");
        println!("|---|---|---|---|---|");
        for (name, s) in [
            ("backend direct", &direct),
            ("through stickless, no session", &anon),
            ("through stickless, session read (1 Redis round trip)", &read),
            ("through stickless, session read + incr (2 round trips)", &write),
        ] {
            println!("| {name} | {:.0} | {:.0} | {:.0} | {:.0} |", s.p50, s.p90, s.p99, s.mean);
        }
        println!(
            "\nadded p50 latency: no session {:.0} µs, read {:.0} µs, read + write {:.0} µs",
            anon.p50 - direct.p50,
            read.p50 - direct.p50,
            write.p50 - direct.p50
        );
        println!(
            "\nread throughput: {total} session reads from {tasks} concurrent clients in {:.2} s = {:.0} req/s",
            read_elapsed.as_secs_f64(),
            total as f64 / read_elapsed.as_secs_f64()
        );
        println!(
            "throughput: {total} requests (session read + HINCRBY) from {tasks} concurrent clients in {:.2} s = {:.0} req/s; counter in Redis = {total} (no lost update)",
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64()
        );
        println!(
            "memory of the stickless process: RSS {} KiB at start, {} KiB after the run, peak {} KiB",
            rss_idle,
            proc_status_kib(proxy.pid(), "VmRSS:"),
            proc_status_kib(proxy.pid(), "VmHWM:")
        );
    });
}
