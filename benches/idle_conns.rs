//! Memory held by the proxy for open, idle keep-alive connections: the release `stickless`
//! binary as its own process on the embedded store, and an in-process backend that answers
//! `ok`, all on loopback.
//!
//! Run with `cargo bench --bench idle_conns`. N clients each open a connection, send one request,
//! read the whole response and keep the connection open without a word more (what a browser or
//! a load balancer's pool does between requests). stickless's RSS (`VmRSS` in /proc/PID/status)
//! is read before, with all N connections open (2 s and 12 s after the last answer), and after
//! they are closed; the growth divided by
//! N is what one idle connection costs. For scale, the bench then holds as many connections
//! (as many as its open-file limit allows) to its own backend, which is stickless's HTTP server with
//! a handler that only answers, and reports its own RSS growth. BENCHMARKS.md ("Memory per open connection") records the
//! results.
//!
//! `STICKLESS_TEST_BENCH_CONNS` (default 10000) sets N; `STICKLESS_TEST_BENCH_BIN` runs another
//! `stickless` binary (a build of another commit, for a before/after). The open-file limit of
//! this process is raised to its hard limit, which must leave room for N connections.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use support::{eventually, free_port, proc_status_kib};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Connections being opened at once: the kernel's accept backlog is the limit that matters.
const OPENING_AT_ONCE: usize = 256;
/// The whole run's bound.
const DEADLINE: Duration = Duration::from_secs(120);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Opens a connection, sends one request and reads its response to the end; the connection is
/// returned open.
async fn one_request(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
    let mut got = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..n]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(std::io::Error::other(head));
        }
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if got.len() >= end + 4 + len {
            return Ok(s);
        }
    }
}

/// Opens `n` connections to `addr`, a few hundred at a time, each answered once and kept open.
/// Returns the open connections and how many failed.
async fn open_idle(addr: SocketAddr, n: usize, deadline: Instant) -> (Vec<TcpStream>, usize) {
    let mut open = Vec::with_capacity(n);
    let mut opening = tokio::task::JoinSet::new();
    let mut failed = 0usize;
    while open.len() + failed < n {
        while opening.len() < OPENING_AT_ONCE && open.len() + failed + opening.len() < n {
            opening.spawn(tokio::time::timeout_at(deadline.into(), one_request(addr)));
        }
        match opening.join_next().await {
            Some(Ok(Ok(Ok(s)))) => open.push(s),
            Some(Ok(Ok(Err(e)))) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("a connection failed: {e}");
                }
            }
            _ => failed += 1,
        }
    }
    (open, failed)
}

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    // `cargo test` and nextest run bench targets too: the measurement is only for `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let conns = env_or("STICKLESS_TEST_BENCH_CONNS", 10_000) as usize;
    let fd_limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    assert!(
        fd_limit as usize > conns + 1000,
        "the open-file limit ({fd_limit}) is too low for {conns} connections: raise the hard limit \
         (ulimit -Hn) or lower STICKLESS_TEST_BENCH_CONNS"
    );
    let bin = std::env::var("STICKLESS_TEST_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_stickless").to_owned());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        let backend_url = format!("http://{backend_addr}");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(stickless::server::serve_http(
            backend,
            |_req: Request<hyper::body::Incoming>, _| async {
                Response::new(Full::new(Bytes::from_static(b"ok")))
            },
            async {
                let _ = stop_rx.await;
            },
        ));
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let max = (conns + 100).to_string();
        let proxy = Proxy(
            Command::new(&bin)
                .args(["serve", "--listen", &addr.to_string()])
                .args(["--admin-listen", "127.0.0.1:0", "--upstream", &backend_url])
                .args(["--max-connections", &max, "--access-log", "off"])
                .env_remove("REDIS_URL")
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("stickless starts"),
        );
        let pid = proxy.0.id();
        let warm = eventually("stickless to answer", Duration::from_secs(20), || async {
            one_request(addr).await.ok()
        });
        drop(warm.await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_idle = proc_status_kib(pid, "VmRSS:");

        let started = Instant::now();
        let (open, failed) = open_idle(addr, conns, started + DEADLINE).await;
        let opened_in = started.elapsed();
        let rss_open = proc_status_kib(pid, "VmRSS:");
        // Past the proxy's idle timeout for backend connections (1 s): what stays is the clients'.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_settled = proc_status_kib(pid, "VmRSS:");
        // Idle connections give hyper's buffers back after a second; what jemalloc does not reuse
        // is returned to the system by its background thread after its dirty decay (10 s).
        tokio::time::sleep(Duration::from_secs(10)).await;
        let rss_later = proc_status_kib(pid, "VmRSS:");
        let n = open.len();
        drop(open);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_closed = proc_status_kib(pid, "VmRSS:");
        let hwm = proc_status_kib(pid, "VmHWM:");
        let per = |kib: u64| kib.saturating_sub(rss_idle) as f64 * 1024.0 / n.max(1) as f64;
        println!(
            "\nstickless idle connections: {n} of {conns} opened and answered in {:.1} s ({failed} failed), \
             one request each, then held open; embedded store, --access-log off\n",
            opened_in.as_secs_f64()
        );
        println!("| stickless RSS | KiB | per connection above idle, bytes |");
        println!("|---|---|---|");
        println!("| idle (after one request) | {rss_idle} | |");
        println!("| {n} connections open, just answered | {rss_open} | {:.0} |", per(rss_open));
        println!("| {n} connections open, 2 s later | {rss_settled} | {:.0} |", per(rss_settled));
        println!("| {n} connections open, 12 s later | {rss_later} | {:.0} |", per(rss_later));
        println!("| all closed, 2 s later | {rss_closed} | {:.0} |", per(rss_closed));
        println!("| peak (VmHWM) | {hwm} | {:.0} |", per(hwm));
        drop(proxy);
        assert_eq!(failed, 0, "every connection is answered");

        // For scale: the same number of connections to the bench's own backend, which is
        // stickless's HTTP server (`server::serve_http`) with a handler that only answers `ok`.
        // This process holds both ends, so the figure is an upper bound of the server's share.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let me = std::process::id();
        let rss_before = proc_status_kib(me, "VmRSS:");
        // (Two descriptors per connection here.)
        let scale = conns.min((fd_limit as usize).saturating_sub(1000) / 2);
        let (open, failed) = open_idle(backend_addr, scale, Instant::now() + DEADLINE).await;
        let rss_open = proc_status_kib(me, "VmRSS:");
        println!(
            "\nfor scale, {} connections held open to the bench's backend (stickless's HTTP server \
             alone, handler answering `ok`; client and server ends in one process): RSS {rss_before} -> \
             {rss_open} KiB, {:.0} bytes per connection",
            open.len(),
            rss_open.saturating_sub(rss_before) as f64 * 1024.0 / open.len().max(1) as f64
        );
        drop(open);
        let _ = stop_tx.send(());
        assert_eq!(failed, 0, "every connection to the backend is answered");
    });
}
