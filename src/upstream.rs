//! Connections to the backend. Each read from a backend socket takes at most
//! [`MAX_READ_BYTES`]: hyper slices a response body into chunks of what one read returned, and a
//! chunk waiting for a slow client keeps its read buffer alive, so small reads are what keeps a
//! slow reader's cost small. A response head may still span many reads, up to hyper's own limit.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Most bytes one read from a backend socket takes: just under hyper's first read buffer (8 KiB),
/// whose adaptive strategy doubles the buffer only after a read that fills it, so the buffer of a
/// connection streaming a large body stays at 8 KiB (a response head still grows it as needed).
pub const MAX_READ_BYTES: usize = 8 * 1024 - 1;

/// An [`HttpConnector`] whose connections read at most [`MAX_READ_BYTES`] at a time.
#[derive(Clone)]
pub struct Connector {
    inner: HttpConnector,
}

impl Connector {
    /// Wraps `inner`, which sets the connect timeout and socket options.
    pub fn new(inner: HttpConnector) -> Self {
        Connector { inner }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<SmallReads>;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            Ok(TokioIo::new(SmallReads(io.into_inner())))
        })
    }
}

/// A backend socket whose reads take at most [`MAX_READ_BYTES`].
pub struct SmallReads(TcpStream);

impl Connection for SmallReads {
    /// Without the addresses (`HttpInfo`) the plain TCP connection would attach: hyper's client
    /// copies them into every response's extensions, and nothing reads them.
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for SmallReads {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() <= MAX_READ_BYTES {
            return Pin::new(&mut self.0).poll_read(cx, buf);
        }
        // Only large buffers get here (hyper's start at 8 KiB and grow with big bodies), so the
        // zeroing of the slice is paid once per 16 KiB read.
        let slice = buf.initialize_unfilled_to(MAX_READ_BYTES);
        let mut small = ReadBuf::new(slice);
        let polled = Pin::new(&mut self.0).poll_read(cx, &mut small);
        let n = small.filled().len();
        buf.advance(n);
        polled
    }
}

impl AsyncWrite for SmallReads {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
