//! Upgraded connections: WebSocket and any other HTTP/1.1 `Upgrade` protocol. Once the backend
//! answers `101 Switching Protocols`, bytes are copied both ways until either side closes, or until
//! the tunnel has been silent in both directions for the idle timeout (as nginx's
//! `proxy_read_timeout` does; WebSocket libraries ping well within it). The handshake's headers
//! are read and written by [`crate::hop`].

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Copies between the client's and the backend's upgraded connections until one closes or both
/// stay silent for `idle`.
pub async fn splice(client: OnUpgrade, backend: OnUpgrade, idle: Duration) {
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let started = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut client = Activity::new(TokioIo::new(client), started, last.clone());
    let mut backend = Activity::new(TokioIo::new(backend), started, last.clone());
    let copy = tokio::io::copy_bidirectional(&mut client, &mut backend);
    tokio::pin!(copy);
    let check = (idle / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            done = &mut copy => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "upgraded connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep(check) => {
                let quiet = started.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                if quiet >= idle {
                    tracing::debug!(?idle, "upgraded connection idle; closing it");
                    return;
                }
            }
        }
    }
}

/// An I/O wrapper that records when bytes last moved.
struct Activity<T> {
    inner: T,
    started: Instant,
    last: Arc<AtomicU64>,
}

impl<T> Activity<T> {
    fn new(inner: T, started: Instant, last: Arc<AtomicU64>) -> Self {
        Activity {
            inner,
            started,
            last,
        }
    }

    fn touch(&self) {
        self.last
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
