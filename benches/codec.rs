//! CPU cost of the per-request header work, without any I/O: cookie verification, cookie
//! splitting, header stripping and injection, and parsing of the backend's changes.
//! Run with `cargo bench --bench codec`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue};
use stickless::config::ProtocolConfig;
use stickless::cookie::{split_cookies, SessionId, SigningKeys};
use stickless::protocol::{decode_value, encode_value, Fields, Protocol};

fn bench(c: &mut Criterion) {
    let keys =
        SigningKeys::parse("0123456789abcdef0123456789abcdef,fedcba9876543210fedcba9876543210")
            .unwrap();
    let id = SessionId::generate();
    let cookie = keys.sign(&id);
    c.bench_function("cookie sign", |b| b.iter(|| keys.sign(black_box(&id))));
    c.bench_function("cookie verify (first key)", |b| {
        b.iter(|| keys.verify(black_box(&cookie)))
    });
    let header =
        [HeaderValue::from_str(&format!("_ga=GA1.2.3; sid={cookie}; theme=dark")).unwrap()];
    c.bench_function("split Cookie header", |b| {
        b.iter(|| split_cookies(black_box(header.iter()), "sid"))
    });

    c.bench_function("encode plain value", |b| {
        b.iter(|| encode_value(black_box("alice@example.com")))
    });
    c.bench_function("encode non-ASCII value", |b| {
        b.iter(|| encode_value(black_box("Zoë 100% ünïcødé")))
    });
    c.bench_function("decode escaped value", |b| {
        b.iter(|| decode_value(black_box(b"Zo%C3%AB 100%25")))
    });

    let protocol = Protocol::new(ProtocolConfig::default());
    let mut fields = Fields::new();
    for (k, v) in [
        ("user", "alice"),
        ("role", "admin"),
        ("cart", "3 items"),
        ("visits", "42"),
        ("locale", "fr-FR"),
    ] {
        fields.insert(k.into(), v.into());
    }
    let mut request = HeaderMap::new();
    for (k, v) in [
        ("host", "example.com"),
        ("accept", "*/*"),
        ("user-agent", "bench"),
        ("x-session-field-user", "mallory"),
    ] {
        request.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    c.bench_function("strip + inject 5 fields", |b| {
        b.iter(|| {
            let mut h = request.clone();
            protocol.strip(&mut h);
            protocol.inject(&mut h, Some(&protocol.field_headers(black_box(&fields))));
            h
        })
    });
    let mut response = HeaderMap::new();
    for (k, v) in [
        ("content-type", "text/html"),
        ("x-session-set-user", "alice"),
        ("x-session-incr-visits", "1"),
        ("x-session-rotate", "true"),
    ] {
        response.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    c.bench_function("parse backend changes (3 ops)", |b| {
        b.iter(|| {
            let mut h = response.clone();
            protocol.take_changes(&mut h)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
