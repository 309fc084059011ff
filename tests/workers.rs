//! `--workers`: several threads serve the proxy's port, each with its own listening socket
//! (`SO_REUSEPORT`). They answer as one: `--max-connections` caps the connections of all of
//! them together, and a SIGTERM drains and stops every one of them.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Whether `stream` gets the start of a response within `wait`.
async fn answered(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, stream.read(&mut buf)).await,
        Ok(Ok(n)) if n > 0 && buf.starts_with(b"HTTP/1.1 200")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_connection_cap_counts_the_connections_of_every_worker() {
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(
        &backend.url(),
        &["--workers", "4", "--max-connections", "2"],
    );
    // Ten clients on four listeners: with a cap per listener, most of them would be served (the
    // kernel spreads them by their ports).
    let mut conns = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        conns.push(s);
    }
    let mut served = Vec::new();
    let mut waiting = Vec::new();
    for mut s in conns {
        if answered(&mut s, Duration::from_millis(500)).await {
            served.push(s);
        } else {
            waiting.push(s);
        }
    }
    assert_eq!(served.len(), 2, "served at once under a cap of 2");
    let open = proxy
        .metric("stickless_open_connections{listener=\"proxy\"}")
        .await;
    assert_eq!(open, 2.0);

    // Closing the served ones lets the waiting ones in, whichever worker they wait on.
    drop(served);
    // Each one, once answered, closes and makes room for the next.
    let tasks: Vec<_> = waiting
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let ok = answered(&mut s, Duration::from_secs(20)).await;
                drop(s);
                ok
            })
        })
        .collect();
    let mut late = 0;
    for t in tasks {
        if t.await.unwrap() {
            late += 1;
        }
    }
    assert_eq!(late, 8, "every waiting client is served once there is room");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_and_stops_every_worker() {
    let backend = TestBackend::start().await;
    let mut proxy = Stickless::start(&backend.url(), &["--workers", "3", "--drain-delay", "0s"]);
    // Idle keep-alive connections, spread over the workers by the kernel.
    let mut conns = Vec::new();
    for _ in 0..12 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(answered(&mut s, Duration::from_secs(10)).await);
        conns.push(s);
    }
    signal(proxy.pid(), "TERM");
    // Every connection is closed by its worker, and the process ends.
    for s in &mut conns {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
                Err(_) => panic!("a connection is still open 10 s after SIGTERM"),
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
            }
        }
    }
    let status = proxy.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
}
