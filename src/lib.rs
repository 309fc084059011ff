//! stickless: a session proxy that makes any web app's sessions independent of the instance that
//! serves a request.
//!
//! It sits in front of a backend, keeps each user's session as one hash in Redis (Amazon
//! ElastiCache, Valkey) and speaks a small header protocol with the backend, so the backend needs
//! no session library and never talks to Redis.
//!
//! A request's path through the modules:
//! 1. [`server`] accepts the connection and hands each request to [`proxy`].
//! 2. [`proxy`] takes the session cookie out of the request and verifies it with [`cookie`]; a
//!    forged or malformed cookie is treated as no session and never reaches the store.
//! 3. The session is loaded from the [`store`] (one round trip, its TTL renewed in the background
//!    when due, or none when the local cache, on by default, holds it; with `--read-from replica`,
//!    one round trip to a replica).
//! 4. [`protocol`] removes any session headers the client sent and injects the real ones.
//! 5. The request is forwarded; the backend's response headers are parsed by [`protocol`] into
//!    changes, which the [`store`] applies atomically before the response leaves.
//! 6. The cookie is set (new or rotated session) or cleared (destroyed), and the response streams
//!    back. [`metrics`] records every step; [`admin`] serves them.
//! 7. Every request carries an id ([`request_id`]) to the backend and back to the client, and
//!    leaves one line in the [`access_log`] once its response is done; a warning logged while it
//!    is handled carries it ([`request_scope`]).
//!
//! Plain HTTP/1.1 requests without a body (nearly all of them) take [`proxy`]'s direct path: the
//! head parsed and written back out by [`h1`], one pooled backend connection per request, no
//! hyper; everything else (bodies, TLS, h2, upgrades, malformed heads) goes to hyper from the same
//! bytes, through the same steps.
//!
//! Around that path: [`server`] bounds client connections (a cap, a deadline to the first request,
//! an idle timeout, a cap on unsent response bytes) and terminates TLS with [`tls`] when given a
//! certificate, [`upstream`] opens the backend's connections, [`hop`] handles hop-by-hop headers
//! and upgrades (with [`tunnel`] carrying upgraded connections), [`body`] wraps the streamed
//! bodies, and [`log_limit`] keeps client-triggered warnings from flooding the log. [`shutdown`]
//! runs a graceful stop (drain, close, cut) and [`notify`] tells systemd when stickless is ready
//! and when it stops.
//!
//! [`config`] holds the typed configuration: [`config::Settings`] checked into a
//! [`config::Config`] (the binary's flags are turned into settings; [`value`] is the error of a bad
//! value), and [`demo`] is the built-in demo backend.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access_log;
pub mod admin;
pub mod body;
pub mod config;
pub mod cookie;
pub mod demo;
pub mod h1;
pub mod hop;
pub mod log_limit;
pub mod log_writer;
pub mod metrics;
pub mod notify;
pub mod protocol;
pub mod proxy;
pub mod request_id;
pub mod request_scope;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod value;
