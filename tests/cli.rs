//! The binary's command line: `gen-key`, flag and environment validation (exit status 2, the flag
//! named), listen errors, `--help`, and `stickless demo` driven like a browser.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use support::*;

/// How long any one run of the binary may take.
const RUN_LIMIT: Duration = Duration::from_secs(20);

/// A finished run of the binary.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// The binary with a clean environment: no `STICKLESS_*`, no `REDIS_URL`, then `env` added.
fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stickless"));
    cmd.args(args)
        .env_remove("REDIS_URL")
        .env_remove("RUST_LOG")
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env_remove("AWS_PROFILE");
    for (k, _) in std::env::vars() {
        if k.starts_with("STICKLESS_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied()).stdin(Stdio::null());
    cmd
}

/// Runs the binary to its end, killing it (and failing) if it runs longer than [`RUN_LIMIT`].
fn run(args: &[&str], env: &[(&str, &str)]) -> Run {
    let child = command(args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stickless starts");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(RUN_LIMIT) {
        Ok(out) => {
            let out = out.expect("stickless output");
            Run {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        Err(_) => {
            // Not yet reaped (the waiting thread holds it), so the pid is still our child's.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("stickless {args:?} (env {env:?}) did not exit within {RUN_LIMIT:?}");
        }
    }
}

/// Asserts a usage error: status 2 and a message that names `flag`.
fn assert_usage_error(r: &Run, flag: &str, what: &str) {
    assert_eq!(r.code, Some(2), "{what}: {r:?}");
    assert!(
        r.stderr.contains(flag),
        "{what}: stderr does not name {flag}: {}",
        r.stderr
    );
    assert!(r.stdout.is_empty(), "{what}: {r:?}");
}

/// Loopback listeners on free ports, so that a run that wrongly starts does not take a real port.
const SAFE_LISTEN: [&str; 4] = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];

#[test]
fn gen_key_prints_a_fresh_256_bit_key() {
    let a = run(&["gen-key"], &[]);
    let b = run(&["gen-key"], &[]);
    for r in [&a, &b] {
        assert_eq!(r.code, Some(0), "{r:?}");
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "{r:?}");
        let key = lines[0];
        assert_eq!(key.len(), 43, "{key}");
        assert!(
            key.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{key}"
        );
        assert!(r.stdout.ends_with('\n'));
    }
    assert_ne!(a.stdout, b.stdout);
}

#[test]
fn bad_flags_exit_2_and_name_the_flag() {
    let long_key = "k".repeat(32);
    let cases: &[(&[&str], &str)] = &[
        (&["--idle-timeout", "soon"], "--idle-timeout"),
        (&["--absolute-timeout", "later"], "--absolute-timeout"),
        (&["--upstream", "ftp://x"], "--upstream"),
        (&["--cookie-same-site", "sometimes"], "--cookie-same-site"),
        (&["--max-fields", "0"], "--max-fields"),
        (&["--redis-timeout", "0s"], "--redis-timeout"),
        (&["--secret-keys", "short"], "--secret-keys"),
        (
            &["--redis-url", "http://x", "--secret-keys", &long_key],
            "--redis-url",
        ),
        (&["--frobnicate"], "--frobnicate"),
        (&["--read-from", "anywhere"], "--read-from"),
        // The embedded store has no replicas; a cluster's replicas are not supported yet.
        (&["--read-from", "replica"], "--read-from"),
        (
            &[
                "--read-from",
                "replica",
                "--redis-url",
                "redis-cluster://127.0.0.1:1",
                "--secret-keys",
                &long_key,
            ],
            "--read-from",
        ),
        // A copy read from a lagging replica could outlive the invalidation meant to remove it.
        (
            &[
                "--read-from",
                "replica",
                "--local-cache",
                "100",
                "--redis-url",
                "redis://127.0.0.1:1",
                "--secret-keys",
                &long_key,
            ],
            "--local-cache",
        ),
    ];
    for (args, flag) in cases {
        for sub in [None, Some("serve")] {
            let mut all: Vec<&str> = sub.into_iter().collect();
            all.extend_from_slice(args);
            all.extend_from_slice(&SAFE_LISTEN);
            assert_usage_error(&run(&all, &[]), flag, &format!("{all:?}"));
        }
    }
    let r = run(
        &["--listen", "nowhere", "--admin-listen", "127.0.0.1:0"],
        &[],
    );
    assert_usage_error(&r, "--listen", "--listen nowhere");

    // Redis without keys: the message says which flag and how to make a key.
    let mut all = vec!["--redis-url", "redis://127.0.0.1:1"];
    all.extend_from_slice(&SAFE_LISTEN);
    let r = run(&all, &[]);
    assert_usage_error(&r, "--secret-keys", "redis without keys");
    assert!(r.stderr.contains("stickless gen-key"), "{}", r.stderr);

    // A short key is refused without echoing it.
    let mut all = vec!["--secret-keys", "s3cr3t"];
    all.extend_from_slice(&SAFE_LISTEN);
    let r = run(&all, &[]);
    assert_usage_error(&r, "--secret-keys", "short key");
    assert!(!r.stderr.contains("s3cr3t"), "{}", r.stderr);
}

#[test]
fn iam_authentication_is_checked_at_startup() {
    let long_key = "k".repeat(32);
    let url = "rediss://stickless@127.0.0.1:1";
    // Each case with the flag named, quoted as in the message (`--redis-iam` is a prefix of
    // `--redis-iam-region`), or as clap names a missing flag.
    let cases: &[(&[&str], &str)] = &[
        (&["--redis-iam", "my-sessions"], "'--redis-iam'"),
        (
            &[
                "--redis-url",
                "redis://stickless@127.0.0.1:1",
                "--redis-iam",
                "c",
            ],
            "'--redis-iam'",
        ),
        (
            &["--redis-url", "rediss://127.0.0.1:1", "--redis-iam", "c"],
            "'--redis-iam'",
        ),
        (
            &[
                "--redis-url",
                "rediss://stickless:pw-0d1e@127.0.0.1:1",
                "--redis-iam",
                "c",
            ],
            "'--redis-iam'",
        ),
        (
            &["--redis-iam-region", "us-east-1"],
            "--redis-iam <CACHE-NAME>",
        ),
        (&["--redis-iam-serverless"], "--redis-iam <CACHE-NAME>"),
        // No region anywhere in the AWS chain (no variable, no profile, no instance metadata).
        (
            &["--redis-url", url, "--redis-iam", "my-sessions"],
            "'--redis-iam-region'",
        ),
    ];
    let no_aws = [
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/nonexistent/aws-config"),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        ),
    ];
    for (args, flag) in cases {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--secret-keys", &long_key]);
        all.extend_from_slice(&SAFE_LISTEN);
        let r = run(&all, &no_aws);
        assert_usage_error(&r, flag, &format!("{all:?}"));
        assert!(!r.stderr.contains("pw-0d1e"), "{}", r.stderr);
    }
}

#[test]
fn bad_environment_variables_exit_2_and_name_the_flag() {
    let long_key = "k".repeat(32);
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("STICKLESS_IDLE_TIMEOUT", "soon")], "idle-timeout"),
        (&[("STICKLESS_UPSTREAM", "ftp://x")], "--upstream"),
        (
            &[("STICKLESS_COOKIE_SAME_SITE", "sometimes")],
            "--cookie-same-site",
        ),
        (&[("STICKLESS_MAX_FIELDS", "0")], "--max-fields"),
        (&[("STICKLESS_SECRET_KEYS", "short")], "--secret-keys"),
        (
            &[("STICKLESS_REDIS_URL", "redis://127.0.0.1:1")],
            "--secret-keys",
        ),
        // REDIS_URL is read when STICKLESS_REDIS_URL is unset.
        (&[("REDIS_URL", "redis://127.0.0.1:1")], "--secret-keys"),
        (
            &[
                ("REDIS_URL", "http://x"),
                ("STICKLESS_SECRET_KEYS", &long_key),
            ],
            "--redis-url",
        ),
        // STICKLESS_REDIS_URL wins over REDIS_URL.
        (
            &[
                ("STICKLESS_REDIS_URL", "http://x"),
                ("REDIS_URL", "redis://127.0.0.1:1"),
                ("STICKLESS_SECRET_KEYS", &long_key),
            ],
            "--redis-url",
        ),
    ];
    for (env, flag) in cases {
        let r = run(&SAFE_LISTEN, env);
        assert_usage_error(&r, flag, &format!("{env:?}"));
        if *flag == "--secret-keys" && env.iter().any(|(k, _)| k.ends_with("REDIS_URL")) {
            assert!(r.stderr.contains("stickless gen-key"), "{}", r.stderr);
        }
    }
    let r = run(
        &["--admin-listen", "127.0.0.1:0"],
        &[("STICKLESS_LISTEN", "nowhere")],
    );
    assert_usage_error(&r, "--listen", "STICKLESS_LISTEN=nowhere");
}

#[test]
fn a_listen_address_in_use_is_an_error_naming_the_flag() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for (flag, other) in [
        ("--listen", "--admin-listen"),
        ("--admin-listen", "--listen"),
    ] {
        let r = run(&["serve", flag, &addr, other, "127.0.0.1:0"], &[]);
        assert!(matches!(r.code, Some(c) if c != 0), "{flag} in use: {r:?}");
        let err = r
            .stderr
            .lines()
            .find(|l| l.starts_with("error"))
            .unwrap_or_else(|| panic!("no error line: {}", r.stderr));
        assert!(err.contains(flag), "{err}");
        assert!(err.contains(&addr), "{err}");
        assert!(!r.stderr.contains("stickless ready"), "{}", r.stderr);
    }
}

#[test]
fn help_lists_every_flag_and_hides_secrets() {
    let secret = "help-must-not-show-this-0123456789abcdef";
    let password = "hunter2-redis-password";
    let redis_url = format!("redis://:{password}@127.0.0.1:1");
    let env = [
        ("STICKLESS_SECRET_KEYS", secret),
        ("STICKLESS_REDIS_URL", redis_url.as_str()),
    ];
    for args in [&["--help"][..], &["serve", "--help"][..]] {
        let r = run(args, &env);
        assert_eq!(r.code, Some(0), "{r:?}");
        for flag in [
            "--listen",
            "--upstream",
            "--admin-listen",
            "--redis-url",
            "--secret-keys",
            "--cookie-name",
            "--cookie-domain",
            "--cookie-path",
            "--cookie-secure",
            "--cookie-same-site",
            "--idle-timeout",
            "--absolute-timeout",
            "--header-prefix",
            "--key-prefix",
            "--redis-timeout",
        ] {
            assert!(r.stdout.contains(flag), "{args:?} does not list {flag}");
        }
        for hidden in [secret, password] {
            assert!(!r.stdout.contains(hidden), "{args:?} shows {hidden}");
            assert!(!r.stderr.contains(hidden), "{args:?} shows {hidden}");
        }
    }
    let r = run(&["--help"], &[]);
    assert!(r.stdout.contains("gen-key") && r.stdout.contains("demo"));
}

/// A running `stickless demo`, killed on drop.
struct Demo {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_starts_and_serves_login_visits_logout() {
    let mut child = command(
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("stickless demo starts");
    let stdout = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let demo = Demo {
        child,
        stderr: Arc::new(Mutex::new(String::new())),
    };
    let log = demo.stderr.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err_pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            log.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let base = loop {
        let line = rx
            .recv_timeout(RUN_LIMIT)
            .unwrap_or_else(|_| panic!("no address printed: {}", demo.stderr.lock().unwrap()));
        if let Some(rest) = line.split("open http://").nth(1) {
            let addr = rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches('/');
            let addr: std::net::SocketAddr = addr.parse().unwrap_or_else(|_| panic!("{line}"));
            assert!(addr.ip().is_loopback() && addr.port() != 0, "{line}");
            break format!("http://{addr}");
        }
    };

    let mut http = Http::with_jar();
    let r = http.get(&format!("{base}/")).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("Not logged in"), "{}", r.text());
    assert!(r.sid().is_none());

    let r = http
        .send(
            Method::POST,
            &format!("{base}/login"),
            &[("content-type", "application/x-www-form-urlencoded")],
            Bytes::from_static(b"username=ann+lee"),
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.headers["location"], "/");
    let cookie = http.sid.clone().expect("login sets the session cookie");

    for n in 1..=3 {
        let r = http.get(&format!("{base}/")).await;
        assert_eq!(r.status, 200);
        let page = r.text();
        assert!(page.contains("Logged in as ann lee"), "{page}");
        assert!(page.contains(&format!("Visits: {n}")), "visit {n}: {page}");
        assert!(r.sid().is_none(), "the cookie stays the same");
    }

    let r = http.get(&format!("{base}/logout")).await;
    assert_eq!(r.status, 303);
    assert_eq!(r.sid().as_deref(), Some(""), "logout clears the cookie");
    assert!(http.sid.is_none());
    let r = http.get(&format!("{base}/")).await;
    assert!(r.text().contains("Not logged in"), "{}", r.text());
    // The old cookie no longer opens the session.
    let mut old = Http::with_jar();
    old.sid = Some(cookie);
    let r = old.get(&format!("{base}/")).await;
    assert!(r.text().contains("Not logged in"), "{}", r.text());
    drop(demo);
}

#[test]
fn every_flag_is_documented_in_the_readme_and_the_env_example() {
    let help = run(&["serve", "--help"], &[]);
    assert_eq!(help.code, Some(0), "{}", help.stderr);
    let flags: std::collections::BTreeSet<&str> = help
        .stdout
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.split('=').next().unwrap_or(w))
        .filter(|w| !matches!(*w, "--help" | "--version"))
        .collect();
    assert!(
        flags.len() >= 20,
        "too few flags found in --help: {flags:?}"
    );
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let env_example =
        std::fs::read_to_string(format!("{root}/deploy/stickless.env.example")).unwrap();
    for flag in flags {
        assert!(
            readme.contains(&format!("| `{flag}` |")),
            "{flag} has no row in the README's flag table"
        );
        let var = format!(
            "STICKLESS_{}",
            flag.trim_start_matches('-')
                .replace('-', "_")
                .to_uppercase()
        );
        assert!(
            env_example.contains(&var),
            "{var} is missing from deploy/stickless.env.example"
        );
    }
}
