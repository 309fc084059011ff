//! Body wrappers for the proxied streams: [`IdleTimeout`] fails a body that stays silent for too
//! long, so that a backend that stops sending halfway through a response cannot hold a client
//! connection for ever; [`StripTrailers`] removes protocol headers from trailers, which a client
//! could otherwise use to smuggle session fields past the header stripping (and a backend to leak
//! operations to the client); [`ClientBody`] remembers whether the client's upload failed, so that
//! a malformed request body is answered as the client's fault; [`Detached`] copies each chunk of
//! a backend's body out of the connection's read buffer, so that a chunk waiting for a slow client
//! does not keep that whole buffer alive.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::log_limit::LogLimit;
use crate::protocol::Protocol;

/// Session headers in trailers come from a client or a backend that means harm: warn, but not
/// more than once a second.
static TRAILER_WARNINGS: LogLimit = LogLimit::new(1000);

/// Boxed error of a proxied body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The inner body sent nothing for the whole idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("body idle for more than {0:?}")]
pub struct BodyIdleTimeout(pub Duration);

pin_project! {
    /// Passes frames through; errors with [`BodyIdleTimeout`] after `timeout` without a frame.
    pub struct IdleTimeout<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
        timeout: Duration,
    }
}

impl<B> IdleTimeout<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, timeout: Duration) -> Self {
        IdleTimeout {
            inner,
            sleep: None,
            timeout,
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep.set(None);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if this.sleep.is_none() {
                    this.sleep.set(Some(tokio::time::sleep(*this.timeout)));
                }
                match this.sleep.as_pin_mut().map(|s| s.poll(cx)) {
                    Some(Poll::Ready(())) => {
                        Poll::Ready(Some(Err(Box::new(BodyIdleTimeout(*this.timeout)))))
                    }
                    _ => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// Passes frames through, removing protocol headers from trailer frames.
    pub struct StripTrailers<B> {
        #[pin]
        inner: B,
        protocol: Arc<Protocol>,
    }
}

impl<B> StripTrailers<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, protocol: Arc<Protocol>) -> Self {
        StripTrailers { inner, protocol }
    }
}

impl<B: Body> Body for StripTrailers<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(match frame.into_trailers() {
                Ok(mut trailers) => {
                    let removed = this.protocol.strip(&mut trailers);
                    if removed > 0 {
                        if let Some(held_back) = TRAILER_WARNINGS.allow() {
                            tracing::warn!(
                                count = removed,
                                held_back,
                                "removed session headers sent as trailers"
                            );
                        }
                    }
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            }))),
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// Passes the client's request body through and records whether it failed (a malformed
    /// chunked encoding, a connection cut mid-upload).
    pub struct ClientBody<B> {
        #[pin]
        inner: B,
        failed: Arc<AtomicBool>,
    }
}

impl<B> ClientBody<B> {
    /// Wraps `inner`; `failed` is set once it yields an error.
    pub fn new(inner: B, failed: Arc<AtomicBool>) -> Self {
        ClientBody { inner, failed }
    }
}

impl<B: Body> Body for ClientBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            this.failed.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// Passes frames through, each data chunk copied into memory of its own size.
    pub struct Detached<B> {
        #[pin]
        inner: B,
    }
}

impl<B> Detached<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Detached { inner }
    }
}

impl<B: Body<Data = bytes::Bytes>> Body for Detached<B> {
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        // A chunk is a slice of the buffer hyper read it into: held in a slow client's write
        // queue, it would keep all of that buffer, and hyper would read on into a new one.
        self.project()
            .inner
            .poll_frame(cx)
            .map_ok(|frame| frame.map_data(|data| bytes::Bytes::copy_from_slice(&data)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    /// A body that never sends anything.
    struct Silent;

    impl Body for Silent {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn trailers_lose_their_session_headers() {
        use http::{HeaderMap, HeaderValue};
        let mut trailers = HeaderMap::new();
        trailers.insert("x-session-field-user", HeaderValue::from_static("admin"));
        trailers.insert("x_session", HeaderValue::from_static("active"));
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let body =
            Full::new(Bytes::from_static(b"data")).with_trailers(async { Some(Ok(trailers)) });
        let protocol = Arc::new(Protocol::new(crate::config::ProtocolConfig::default()));
        let collected = StripTrailers::new(body, protocol).collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(trailers.len(), 1);
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "data");
    }

    #[tokio::test]
    async fn passes_a_complete_body() {
        let body = IdleTimeout::new(
            Full::new(Bytes::from_static(b"hello")),
            Duration::from_millis(50),
        );
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
    }

    #[tokio::test]
    async fn fails_a_silent_body() {
        let started = std::time::Instant::now();
        let err = IdleTimeout::new(Silent, Duration::from_millis(50))
            .collect()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("idle"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
