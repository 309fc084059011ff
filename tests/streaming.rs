//! Bodies stream through the proxy: proven by a response whose first chunk must reach the client
//! before the backend sends the next, and by bodies far larger than the proxy's memory ever gets.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use support::*;

type Body = http_body_util::channel::Channel<Bytes, std::convert::Infallible>;

#[tokio::test(flavor = "multi_thread")]
async fn the_first_chunk_arrives_before_the_backend_sends_the_next() {
    // A backend whose body the test writes chunk by chunk.
    let (bodies_tx, bodies_rx) = tokio::sync::mpsc::channel::<Body>(1);
    let bodies_rx = std::sync::Arc::new(tokio::sync::Mutex::new(bodies_rx));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(stickless::server::serve_http(
        listener,
        move |_req: Request<hyper::body::Incoming>, _| {
            let bodies_rx = bodies_rx.clone();
            async move {
                let body = bodies_rx.lock().await.recv().await.expect("a body to send");
                Response::new(body)
            }
        },
        async {
            let _ = stop_rx.await;
        },
    ));
    let proxy = Stickless::start(&format!("http://{backend}"), &[]);

    let (mut tx, body) = Body::new(1);
    bodies_tx.send(body).await.unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.get(proxy.url("/").parse().unwrap()),
    )
    .await
    .expect("headers in time")
    .unwrap();
    let mut body = resp.into_body();
    for i in 0..5 {
        tx.send_data(Bytes::from(format!("chunk {i}")))
            .await
            .unwrap();
        // The chunk reaches the client while the backend still holds the rest back: a proxy
        // that waited for the whole body would never deliver it.
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .unwrap_or_else(|_| panic!("chunk {i} held back by the proxy"))
            .expect("a frame")
            .expect("no error");
        assert_eq!(frame.into_data().expect("data"), format!("chunk {i}"));
    }
    drop(tx);
    let rest = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("end of body")
        .unwrap()
        .to_bytes();
    assert!(rest.is_empty());
    let _ = stop_tx.send(());
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_far_larger_than_the_proxys_memory_pass_both_ways() {
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(&backend.url(), &[]);
    let before = proc_status_kib(proxy.pid(), "VmHWM:");
    // 128 MiB up and the same back down through /echo-body, made and checked as it streams.
    const SIZE: usize = 128 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let (mut tx, body) =
        http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(4);
    let sender = tokio::spawn(async move {
        for i in 0..SIZE / CHUNK {
            if tx
                .send_data(Bytes::from(vec![(i % 251) as u8; CHUNK]))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let req = Request::post(proxy.url("/echo-body")).body(body).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .expect("headers in time")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut received = 0usize;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(60), body.frame())
        .await
        .expect("the echo keeps flowing")
    {
        if let Ok(data) = frame.unwrap().into_data() {
            for (j, b) in data.iter().enumerate() {
                assert_eq!(
                    *b as usize,
                    ((received + j) / CHUNK) % 251,
                    "byte {}",
                    received + j
                );
            }
            received += data.len();
        }
    }
    sender.await.unwrap();
    assert_eq!(received, SIZE);
    let peak = proc_status_kib(proxy.pid(), "VmHWM:");
    // Buffering either body whole would need 128 MiB; streaming needs a few buffers.
    assert!(
        peak < before + 32 * 1024,
        "peak RSS grew from {before} KiB to {peak} KiB for a {SIZE}-byte body each way"
    );
}
