//! The demo backend behind `stickless demo`: the login / visit counter / logout app of the
//! ElastiCache session-store tutorial, written against the header protocol instead of a Redis
//! client. It reads the session from `X-Session-Field-*` request headers and changes it with
//! `X-Session-*` response headers; it holds no state of its own.

use std::future::Future;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::protocol::{decode_value, encode_value};

/// Largest login form accepted.
const MAX_FORM_BYTES: usize = 4096;

/// Serves the demo app on `listener` until `shutdown` completes.
pub async fn serve_app(listener: TcpListener, shutdown: impl Future<Output = ()>) {
    crate::server::serve_http(listener, |req, _| handle(req), shutdown).await;
}

fn field(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get(format!("x-session-field-{name}"))
        .and_then(|v| decode_value(v.as_bytes()).ok())
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>stickless demo</title></head>\
         <body style=\"font-family:sans-serif;max-width:40em;margin:2em auto\">{body}\
         <hr><p><small>Served by the stickless demo backend. The backend holds no session: \
         stickless passes it in request headers and stores the changes it returns.</small></p>\
         </body></html>\n"
    );
    let mut resp = Response::new(Full::new(Bytes::from(html)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn redirect_home() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SEE_OTHER;
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/"));
    resp
}

/// The username from an `application/x-www-form-urlencoded` body.
fn form_username(body: &[u8]) -> Option<String> {
    body.split(|&b| b == b'&').find_map(|pair| {
        let value = pair.strip_prefix(b"username=")?;
        let spaced: Vec<u8> = value
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        decode_value(&spaced).ok()
    })
}

async fn handle(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let user = field(&req, "username").filter(|u| !u.is_empty());
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => match user {
            Some(user) => {
                let visits = field(&req, "visits")
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0)
                    + 1;
                let mut resp = page(
                    StatusCode::OK,
                    format!(
                        "<h1>Hello {u}</h1><p>Logged in as {u}</p><p>Visits: {visits}</p>\
                         <p><a href=\"/\">Reload</a> · <a href=\"/logout\">Log out</a></p>",
                        u = escape_html(&user)
                    ),
                );
                resp.headers_mut()
                    .insert("x-session-incr-visits", HeaderValue::from_static("1"));
                resp
            }
            None => page(
                StatusCode::OK,
                "<h1>Hello</h1><p>Not logged in</p><p><a href=\"/login\">Log in</a></p>".into(),
            ),
        },
        (&Method::GET, "/login") => page(StatusCode::OK, login_form("")),
        (&Method::POST, "/login") => {
            let body = match Limited::new(req.into_body(), MAX_FORM_BYTES)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return page(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        login_form("That form is too large."),
                    )
                }
            };
            match form_username(&body)
                .map(|u| u.trim().to_owned())
                .filter(|u| !u.is_empty() && u.len() <= 64)
            {
                Some(name) => {
                    let mut resp = redirect_home();
                    let h = resp.headers_mut();
                    // Against session fixation: a login moves the session to a new id.
                    h.insert("x-session-rotate", HeaderValue::from_static("true"));
                    h.insert("x-session-set-username", encode_value(&name));
                    h.insert("x-session-set-visits", HeaderValue::from_static("0"));
                    resp
                }
                None => page(
                    StatusCode::BAD_REQUEST,
                    login_form("Enter a username (at most 64 characters)."),
                ),
            }
        }
        (_, "/logout") => {
            let mut resp = redirect_home();
            resp.headers_mut()
                .insert("x-session-destroy", HeaderValue::from_static("true"));
            resp
        }
        _ => page(
            StatusCode::NOT_FOUND,
            "<h1>Not found</h1><p><a href=\"/\">Home</a></p>".into(),
        ),
    }
}

fn login_form(message: &str) -> String {
    format!(
        "<h1>Log in</h1><p>{message}</p><form method=\"post\" action=\"/login\">\
         <label>Username <input name=\"username\" autofocus></label> <button>Log in</button></form>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_parsing() {
        assert_eq!(
            form_username(b"username=ann+lee").as_deref(),
            Some("ann lee")
        );
        assert_eq!(form_username(b"x=1&username=%C3%A9").as_deref(), Some("é"));
        assert_eq!(form_username(b"x=1"), None);
        assert_eq!(escape_html("<a&'\">"), "&lt;a&amp;&#39;&quot;&gt;");
    }
}
