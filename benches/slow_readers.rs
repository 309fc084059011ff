//! Memory held by the proxy for clients that read a large download slowly: a real redis-server,
//! the release `stickless` binary as its own process, and an in-process backend that answers
//! every request with the same large body, all on loopback.
//!
//! Run with `cargo bench --bench slow_readers` (needs `redis-server`). N clients each ask for the
//! body, read it at a throttled rate for a while (so that the kernel's socket buffers fill and
//! stickless has to hold back), then read the rest at full speed and close. stickless's RSS
//! (`VmRSS` in /proc/PID/status) is sampled before, during and after; the growth per client is
//! what one slow reader costs. BENCHMARKS.md records the results.
//!
//! `STICKLESS_TEST_BENCH_CLIENTS` (default 200), `STICKLESS_TEST_BENCH_BODY_MIB` (default 4),
//! `STICKLESS_TEST_BENCH_RATE_KIB` (read rate per client in the slow phase, default 50) and
//! `STICKLESS_TEST_BENCH_SLOW_SECS` (length of the slow phase, default 10) change the load;
//! `STICKLESS_TEST_BENCH_QUIET_SECS` (default 3) is how long after the downloads the last sample is
//! taken (past 60 s, the proxy's idle backend connections have been closed too).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use support::{proc_status_kib, RedisServer, Stickless};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// One client: asks for the body, reads `slow_bytes` of it at `rate` bytes/s, then the rest at
/// full speed. Returns the bytes of body received.
async fn slow_reader(
    addr: std::net::SocketAddr,
    rate: u64,
    slow_bytes: u64,
    deadline: Instant,
) -> u64 {
    let socket = TcpSocket::new_v4().expect("socket");
    // A small receive buffer, as a slow client far away has in effect: the kernel cannot absorb
    // the whole body, so what the client does not read stays with stickless.
    socket.set_recv_buffer_size(32 * 1024).expect("SO_RCVBUF");
    let mut s = socket.connect(addr).await.expect("connect");
    s.write_all(b"GET /big HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await
        .expect("request");
    let mut buf = vec![0u8; 16 * 1024];
    let mut head = Vec::new();
    let mut body_len = None;
    let mut received = 0u64;
    let started = Instant::now();
    let mut total = 0u64;
    loop {
        if total < slow_bytes {
            // Throttle: never ahead of `rate` since the start.
            let due = started + Duration::from_secs_f64(total as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let want = if total < slow_bytes { 4096 } else { buf.len() };
        let n = match tokio::time::timeout_at(deadline.into(), s.read(&mut buf[..want])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => n,
        };
        total += n as u64;
        match body_len {
            None => {
                head.extend_from_slice(&buf[..n]);
                if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
                    let len = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .expect("content-length");
                    body_len = Some(len);
                    received = (head.len() - end - 4) as u64;
                }
            }
            Some(_) => received += n as u64,
        }
        if body_len.is_some_and(|len| received >= len) {
            break;
        }
    }
    received
}

fn main() {
    // `cargo test` and nextest run bench targets too (with `--list` or no `--bench`): the
    // measurement is only for `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let clients = env_or("STICKLESS_TEST_BENCH_CLIENTS", 200);
    let body_mib = env_or("STICKLESS_TEST_BENCH_BODY_MIB", 4);
    let rate = env_or("STICKLESS_TEST_BENCH_RATE_KIB", 50) * 1024;
    let slow_secs = env_or("STICKLESS_TEST_BENCH_SLOW_SECS", 10);
    let quiet_secs = env_or("STICKLESS_TEST_BENCH_QUIET_SECS", 3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let body = Bytes::from(vec![b'x'; (body_mib * 1024 * 1024) as usize]);
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_url = format!("http://{}", backend.local_addr().unwrap());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(stickless::server::serve_http(
            backend,
            move |_req: Request<hyper::body::Incoming>, _| {
                let body = body.clone();
                async move { Response::new(Full::new(body)) }
            },
            async {
                let _ = stop_rx.await;
            },
        ));
        let redis = RedisServer::start();
        let proxy = Stickless::on_redis(&backend_url, &redis, &[]);
        let pid = proxy.pid();

        // Warm up: one full download, so the start figure includes the runtime's first
        // allocations and the backend connection pool.
        let warm = slow_reader(proxy.addr, u64::MAX, 0, Instant::now() + Duration::from_secs(30)).await;
        assert_eq!(warm, body_mib * 1024 * 1024, "warm-up download");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_start = proc_status_kib(pid, "VmRSS:");

        let slow_bytes = rate * slow_secs;
        println!(
            "\nstickless slow readers: {clients} clients x {body_mib} MiB, read at {} KiB/s each for {slow_secs} s \
             (32 KiB receive buffer), then at full speed; two rounds",
            rate / 1024
        );
        println!("\n| stickless RSS | KiB | per client above start, KiB |");
        println!("|---|---|---|");
        println!("| at start (after one warm-up download) | {rss_start} | |");
        let per = |kib: u64| kib.saturating_sub(rss_start) as f64 / clients as f64;
        // A second round shows whether the memory of the first is reused or lost.
        for round in 1..=2 {
            let started = Instant::now();
            let deadline = started + Duration::from_secs(slow_secs + 60);
            let tasks: Vec<_> = (0..clients)
                .map(|_| tokio::spawn(slow_reader(proxy.addr, rate, slow_bytes, deadline)))
                .collect();
            // Sample through the slow phase.
            let mut peak_during = 0;
            let sample_every = Duration::from_millis(500);
            while started.elapsed() + sample_every < Duration::from_secs(slow_secs) {
                tokio::time::sleep(sample_every).await;
                peak_during = peak_during.max(proc_status_kib(pid, "VmRSS:"));
            }
            let mut complete = 0;
            for t in tasks {
                if t.await.unwrap() == body_mib * 1024 * 1024 {
                    complete += 1;
                }
            }
            assert_eq!(complete, clients, "every download completes");
            let elapsed = started.elapsed();
            let rss_done = proc_status_kib(pid, "VmRSS:");
            // Give closed connections and the allocator a moment, as a quiet period would.
            tokio::time::sleep(Duration::from_secs(quiet_secs)).await;
            let rss_after = proc_status_kib(pid, "VmRSS:");
            println!(
                "| round {round}: peak during the slow phase | {peak_during} | {:.0} |",
                per(peak_during)
            );
            println!(
                "| round {round}: all {clients} downloads done ({:.1} s) | {rss_done} | {:.0} |",
                elapsed.as_secs_f64(),
                per(rss_done)
            );
            println!(
                "| round {round}: {quiet_secs} s later | {rss_after} | {:.0} |",
                per(rss_after)
            );
        }
        let hwm = proc_status_kib(pid, "VmHWM:");
        println!("| peak (VmHWM) | {hwm} | {:.0} |", per(hwm));
        let _ = stop_tx.send(());
    });
}
