//! Connecting to Redis the way ElastiCache is reached in production: with a password (AUTH), with
//! an ACL user, and over TLS (`rediss://`). The credentials never reach a log line.

mod support;

use support::*;

/// A session created through `proxy` is in Redis, read with the independent client at `url`.
async fn session_round_trip(proxy: &Stickless, check_url: &str) {
    let mut http = Http::with_jar();
    let r = http
        .get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    assert_eq!(r.status, 200, "{}", proxy.logs());
    let cookie = http.sid.clone().expect("session cookie");
    let r = http.get(&proxy.url("/")).await;
    assert_eq!(
        r.seen().fields().get("user").map(String::as_str),
        Some("alice")
    );
    let client = redis::Client::open(check_url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let user: Option<String> = redis::cmd("HGET")
        .arg(format!("stickless:{}", id_of(&cookie)))
        .arg("user")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(user.as_deref(), Some("alice"));
}

fn assert_secret_not_logged(proxy: &Stickless, secret: &str) {
    let logs = proxy.logs();
    assert!(
        !logs.contains(secret),
        "the password leaked into the logs:\n{logs}"
    );
}

async fn readyz(proxy: &Stickless) -> u16 {
    Http::new()
        .get(&proxy.admin_url("/readyz"))
        .await
        .status
        .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn password_in_the_url_authenticates() {
    let secret = "pw-7f3a9c1e";
    let redis = RedisServer::start_with(&["--requirepass", secret]);
    let backend = TestBackend::start().await;
    let url = format!("redis://:{secret}@127.0.0.1:{}", redis.port);
    let proxy = Stickless::start(
        &backend.url(),
        &["--redis-url", &url, "--secret-keys", TEST_KEY],
    );
    assert_eq!(readyz(&proxy).await, 200);
    session_round_trip(&proxy, &url).await;
    assert_secret_not_logged(&proxy, secret);
}

#[tokio::test(flavor = "multi_thread")]
async fn acl_user_and_password_authenticate() {
    let secret = "acl-pw-51d0";
    let rule = format!(">{secret}");
    let redis = RedisServer::start_with(&[
        "--user", "default", "off", "--user", "app", "on", &rule, "~*", "+@all",
    ]);
    let backend = TestBackend::start().await;
    let url = format!("redis://app:{secret}@127.0.0.1:{}", redis.port);
    let proxy = Stickless::start(
        &backend.url(),
        &["--redis-url", &url, "--secret-keys", TEST_KEY],
    );
    assert_eq!(readyz(&proxy).await, 200);
    session_round_trip(&proxy, &url).await;
    assert_secret_not_logged(&proxy, secret);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_is_not_ready_and_answers_503() {
    let redis = RedisServer::start_with(&["--requirepass", "the-right-one"]);
    let backend = TestBackend::start().await;
    let wrong = "not-the-password-4242";
    let url = format!("redis://:{wrong}@127.0.0.1:{}", redis.port);
    let proxy = Stickless::start(
        &backend.url(),
        &[
            "--redis-url",
            &url,
            "--secret-keys",
            TEST_KEY,
            "--redis-timeout",
            "300ms",
        ],
    );
    assert_eq!(readyz(&proxy).await, 503);
    let r = Http::new()
        .get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "1");
    assert_secret_not_logged(&proxy, wrong);
}

#[tokio::test(flavor = "multi_thread")]
async fn rediss_with_a_password_over_tls() {
    let certs = Certs::make();
    let secret = "tls-pw-90ab";
    let (cert, key, ca) = (
        certs.path("server.pem"),
        certs.path("server.key"),
        certs.path("ca.pem"),
    );
    // The plain port is only for the harness and the independent client; stickless uses TLS.
    // Both ports are picked anew on each try, in case another process took one meanwhile.
    let (redis, tls_port) = (0..5)
        .find_map(|_| {
            let tls_port = free_port().to_string();
            RedisServer::try_start_with(&[
                "--requirepass",
                secret,
                "--tls-port",
                &tls_port,
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "no",
            ])
            .map(|r| (r, tls_port))
        })
        .expect("redis-server with TLS starts");
    let backend = TestBackend::start().await;
    let tls_url = format!("rediss://:{secret}@127.0.0.1:{tls_port}");
    // The CA is trusted the way an operator trusts a private CA: through SSL_CERT_FILE.
    let proxy = Stickless::start_with_env(
        &backend.url(),
        &["--redis-url", &tls_url, "--secret-keys", TEST_KEY],
        &[("SSL_CERT_FILE", &ca)],
    );
    assert_eq!(readyz(&proxy).await, 200, "{}", proxy.logs());
    session_round_trip(
        &proxy,
        &format!("redis://:{secret}@127.0.0.1:{}", redis.port),
    )
    .await;
    assert_secret_not_logged(&proxy, secret);

    // Without trusting the CA, the TLS handshake fails: not ready, never a plain-text fallback.
    let untrusted = Stickless::start_with_env(
        &backend.url(),
        &[
            "--redis-url",
            &tls_url,
            "--secret-keys",
            TEST_KEY,
            "--redis-timeout",
            "300ms",
        ],
        &[("SSL_CERT_FILE", &certs.path("server.pem"))],
    );
    assert_eq!(readyz(&untrusted).await, 503, "{}", untrusted.logs());
}
