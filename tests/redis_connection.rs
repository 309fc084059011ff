//! Connecting to Redis the way ElastiCache is reached in production: with a password (AUTH), with
//! an ACL user, over TLS (`rediss://`), and with IAM authentication (`--redis-iam`), the local
//! cache's invalidation connection included. The credentials never reach a log line.

mod support;

use std::time::Duration;

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

/// The local cache went live over this connection (its invalidation client authenticated and
/// turned tracking on): reads of a session come from the cache, and a change made with the
/// independent client at `check_url` is seen through the proxy once Redis's invalidation arrives.
async fn local_cache_follows_redis(proxy: &Stickless, check_url: &str) {
    let mut http = Http::with_jar();
    http.get_replying(&proxy.url("/"), &["x-session-set-user: carol"])
        .await;
    let hit = r#"stickless_local_cache_lookups_total{result="hit"}"#;
    eventually(
        "a read from the local cache",
        Duration::from_secs(10),
        || {
            let mut http = http.clone();
            async move {
                http.get(&proxy.url("/")).await;
                (proxy.metric(hit).await > 0.0).then_some(())
            }
        },
    )
    .await;
    let client = redis::Client::open(check_url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("stickless:{}", id_of(http.sid.as_deref().unwrap()));
    let _: i64 = redis::cmd("HSET")
        .arg(&key)
        .arg("user")
        .arg("dave")
        .query_async(&mut c)
        .await
        .unwrap();
    eventually(
        "the change seen through the cache",
        Duration::from_secs(5),
        || {
            let mut http = http.clone();
            async move {
                let r = http.get(&proxy.url("/")).await;
                (r.seen().fields().get("user").map(String::as_str) == Some("dave")).then_some(())
            }
        },
    )
    .await;
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
    let ca = certs.path("ca.pem");
    // The plain port is only for the harness and the independent client; stickless uses TLS.
    let (redis, tls_port) = tls_server(&certs, &["--requirepass", secret]);
    let backend = TestBackend::start().await;
    let tls_url = format!("rediss://:{secret}@127.0.0.1:{tls_port}");
    // The CA is trusted the way an operator trusts a private CA: through SSL_CERT_FILE.
    let proxy = Stickless::start_with_env(
        &backend.url(),
        &[
            "--redis-url",
            &tls_url,
            "--secret-keys",
            TEST_KEY,
            "--local-cache",
            "1000",
        ],
        &[("SSL_CERT_FILE", &ca)],
    );
    assert_eq!(readyz(&proxy).await, 200, "{}", proxy.logs());
    let plain_url = format!("redis://:{secret}@127.0.0.1:{}", redis.port);
    session_round_trip(&proxy, &plain_url).await;
    local_cache_follows_redis(&proxy, &plain_url).await;
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

/// AWS's documented example keys, as the environment part of the standard AWS chain.
const AWS_SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
const AWS_SESSION_TOKEN: &str = "IQoJb3JpZ2luX2VjEXAMPLEsessiontoken";

/// The AWS chain reduced to the environment: no profile files, no instance metadata.
fn aws_environment(ca: &str, with_keys: bool) -> Vec<(&str, &str)> {
    let mut env = vec![
        ("SSL_CERT_FILE", ca),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/nonexistent/aws-config"),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        ),
        ("AWS_REGION", "eu-west-3"),
    ];
    if with_keys {
        env.extend([
            ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", AWS_SECRET),
            ("AWS_SESSION_TOKEN", AWS_SESSION_TOKEN),
        ]);
    } else {
        env.extend([
            ("AWS_ACCESS_KEY_ID", ""),
            ("AWS_SECRET_ACCESS_KEY", ""),
            ("AWS_SESSION_TOKEN", ""),
        ]);
    }
    env
}

/// A real Redis cannot check an IAM token (only ElastiCache can), so the user `stickless` takes
/// any password here, and the `default` user is off: a connection that does not `AUTH` as
/// `stickless` over TLS gets nothing. What this shows is the path of the token: the user from
/// the URL, a password from the credential provider on every connection, TLS, credentials and
/// region from the standard AWS chain; the token itself is checked against botocore's by the
/// unit tests of `store::iam`.
#[tokio::test(flavor = "multi_thread")]
async fn iam_authentication_authenticates_as_the_url_user_over_tls() {
    let certs = Certs::make();
    let admin = "admin-pw-6c2e";
    let admin_rule = format!(">{admin}");
    let ca = certs.path("ca.pem");
    let (redis, tls_port) = tls_server(
        &certs,
        &[
            "--user",
            "default",
            "off",
            "--user",
            "admin",
            "on",
            &admin_rule,
            "~*",
            "+@all",
            "--user",
            "stickless",
            "on",
            "nopass",
            "~*",
            "+@all",
        ],
    );
    let backend = TestBackend::start().await;
    let url = format!("rediss://stickless@127.0.0.1:{tls_port}");
    let args = [
        "--redis-url",
        &url,
        "--secret-keys",
        TEST_KEY,
        "--redis-iam",
        "my-sessions",
        "--redis-timeout",
        "300ms",
    ];
    let cached: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--local-cache", "1000"])
        .collect();
    let proxy = Stickless::start_with_env(&backend.url(), &cached, &aws_environment(&ca, true));
    assert_eq!(readyz(&proxy).await, 200, "{}", proxy.logs());
    let admin_url = format!("redis://admin:{admin}@127.0.0.1:{}", redis.port);
    session_round_trip(&proxy, &admin_url).await;
    local_cache_follows_redis(&proxy, &admin_url).await;
    let client = redis::Client::open(admin_url.as_str()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        clients.lines().any(|l| l.contains(" user=stickless ")),
        "{clients}"
    );
    let logs = proxy.logs();
    assert!(
        logs.contains("ElastiCache IAM authentication")
            && logs.contains("my-sessions")
            && logs.contains("eu-west-3"),
        "{logs}"
    );
    for secret in [AWS_SECRET, AWS_SESSION_TOKEN, "X-Amz-Signature"] {
        assert_secret_not_logged(&proxy, secret);
    }

    // Without credentials anywhere in the chain there is no token, so no connection: not ready,
    // and never a connection without AUTH.
    let no_credentials =
        Stickless::start_with_env(&backend.url(), &args, &aws_environment(&ca, false));
    assert_eq!(
        readyz(&no_credentials).await,
        503,
        "{}",
        no_credentials.logs()
    );
    assert!(
        no_credentials.logs().contains("no ElastiCache IAM token"),
        "{}",
        no_credentials.logs()
    );
}
