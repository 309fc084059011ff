//! The request a log line belongs to.
//!
//! A warning logged while a request is handled carries the request's `peer`, `method`, `path`
//! and `request_id` in a span named `request`. A span made for every request costs a few
//! hundred nanoseconds to a microsecond (its fields formatted into a string, the registry's slot,
//! entered and left on every poll) that almost every request never uses; so the request's
//! future carries only a [`Scope`] (what the span would hold, a task-local), and [`in_request`]
//! makes the span when a line is actually written. Whenever `debug` or `trace` lines are on,
//! where the libraries' own lines (hyper, fred) also belong to the request, the span is made
//! for every request instead ([`Scope::eager_span`]).

use std::future::Future;
use std::net::SocketAddr;

use http::{Method, Uri};
use tracing::level_filters::LevelFilter;
use tracing::Span;

use crate::request_id::RequestId;

tokio::task_local! {
    static CURRENT: Scope;
}

/// What the `request` span of a request holds. Cheap to make: the method, the URI and the id
/// share the request's buffers.
pub struct Scope {
    peer: SocketAddr,
    method: Method,
    uri: Uri,
    id: RequestId,
}

impl Scope {
    /// The scope of the request `method` `uri` from `peer`, known by `id`.
    pub fn new(peer: SocketAddr, method: Method, uri: Uri, id: RequestId) -> Self {
        Scope {
            peer,
            method,
            uri,
            id,
        }
    }

    /// The request's span. Never the query: it may carry tokens.
    fn span(&self) -> Span {
        tracing::info_span!(
            "request",
            peer = %self.peer,
            method = %self.method,
            path = self.uri.path(),
            request_id = %self.id
        )
    }

    /// The span to run the whole request in: a real one when debug lines are on, none otherwise.
    pub fn eager_span(&self) -> Span {
        if eager() {
            self.span()
        } else {
            Span::none()
        }
    }

    /// Runs `fut` as this request's: [`in_request`] finds the scope while it is polled.
    pub fn run<F: Future>(self, fut: F) -> impl Future<Output = F::Output> {
        CURRENT.scope(self, fut)
    }
}

/// Whether every request gets its span up front.
fn eager() -> bool {
    LevelFilter::current() >= LevelFilter::DEBUG
}

/// Runs `log` (a `tracing` macro) inside the span of the request being handled, if any; outside
/// a request (a background task), as it is.
pub fn in_request<R>(log: impl FnOnce() -> R) -> R {
    if eager() {
        // The request already runs in its span.
        return log();
    }
    match CURRENT.try_with(Scope::span) {
        Ok(span) => span.in_scope(log),
        Err(_) => log(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_line_gets_the_span_of_its_request_only_inside_it() {
        let scope = Scope::new(
            "127.0.0.1:9".parse().unwrap(),
            Method::GET,
            "/cart?token=secret".parse().unwrap(),
            RequestId::generate(),
        );
        // No subscriber here: spans are disabled, but the scope is found or not.
        let inside = scope
            .run(async { CURRENT.try_with(|s| s.uri.path().to_owned()) })
            .await;
        assert_eq!(inside.as_deref(), Ok("/cart"));
        assert!(CURRENT.try_with(|_| ()).is_err());
        assert!(in_request(|| true));
    }
}
