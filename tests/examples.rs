//! End to end with the real example apps in `examples/` (Flask, Express, Go, PHP, Java), each the
//! ElastiCache tutorial's app: one Redis, two copies of the app, each behind its own stickless
//! instance (same key), and one browser-like client that alternates between the two proxies. No
//! sticky sessions: the login, the visit counter and the logout are shared through Redis. Every
//! example runs the same scenarios (`examples::<language>::<scenario>`).
//!
//! Each needs its toolchain; a missing one fails the test with what to install (never a skip).
//! `bash scripts/test.sh` installs them all: Python with Flask (`$STICKLESS_TEST_PYTHON`, else
//! `python3`), Node with the Express example's `npm ci`, Go, PHP's CLI and a JDK.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use support::*;

/// Whole scenario (after the processes are up), so that a hang fails instead of blocking.
const SCENARIO_DEADLINE: Duration = Duration::from_secs(30);
/// How long one copy of an app may take to answer its first request (a JVM compiling the source
/// file on a busy machine is the slowest).
const APP_START_DEADLINE: Duration = Duration::from_secs(40);
/// How long a build step (`go build`) may take.
const BUILD_DEADLINE: Duration = Duration::from_secs(180);

const FORM: &str = "application/x-www-form-urlencoded";

// ---------------------------------------------------------------------------------------------
// The examples and their toolchains
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Example {
    Flask,
    Express,
    Go,
    Php,
    Java,
}

/// How to start one copy of an example on a port.
struct Launcher {
    example: Example,
    program: PathBuf,
    /// Keeps a built binary's directory until the test ends.
    _build: Option<TempDir>,
}

fn example_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

fn python() -> String {
    std::env::var("STICKLESS_TEST_PYTHON")
        .ok()
        .filter(|p| !p.trim().is_empty())
        .unwrap_or_else(|| "python3".to_owned())
}

/// Runs a short command (a toolchain check or a build) to its end within `deadline`; `None` when
/// it cannot be started. Output is captured; a command past its deadline is killed.
fn run_bounded(cmd: &mut Command, deadline: Duration) -> Option<Result<String, String>> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let read_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let read_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = format!(
        "{}{}",
        read_out.join().unwrap_or_default(),
        read_err.join().unwrap_or_default()
    );
    Some(match status {
        Some(s) if s.success() => Ok(text),
        Some(s) => Err(format!("{s}: {}", text.trim())),
        None => Err(format!("no answer within {deadline:?}: {}", text.trim())),
    })
}

/// Fails the test (no silent skip) when `program` cannot run `args` successfully.
fn require(program: &str, args: &[&str], what: &str, install: &str) -> String {
    let hint = format!(
        "{what} is needed for this example: {install}, or run `bash scripts/test.sh`, which \
         installs it"
    );
    match run_bounded(Command::new(program).args(args), Duration::from_secs(60)) {
        None => panic!("cannot run `{program}`: not installed? {hint}"),
        Some(Err(e)) => {
            let last = e.lines().rev().find(|l| !l.trim().is_empty());
            panic!(
                "`{program} {}` failed ({}); {hint}",
                args.join(" "),
                last.unwrap_or("no output").trim()
            )
        }
        Some(Ok(out)) => out,
    }
}

impl Example {
    fn dir(self) -> PathBuf {
        example_dir(match self {
            Example::Flask => "flask",
            Example::Express => "express",
            Example::Go => "go",
            Example::Php => "php",
            Example::Java => "java",
        })
    }

    /// Checks the toolchain and builds what needs building, or fails saying what is missing.
    fn prepare(self) -> Launcher {
        let dir = self.dir();
        let (program, build) = match self {
            Example::Flask => {
                let py = python();
                require(
                    &py,
                    &["-c", "import flask, markupsafe"],
                    "Python with Flask",
                    "`pip install -r examples/flask/requirements.txt` (or apt-get install \
                     python3-flask), or point STICKLESS_TEST_PYTHON at a python that has Flask",
                );
                (PathBuf::from(py), None)
            }
            Example::Express => {
                require(
                    "node",
                    &["--version"],
                    "Node.js 18 or later",
                    "`apt-get install nodejs npm`",
                );
                assert!(
                    dir.join("node_modules/express/package.json").is_file(),
                    "Express (the example's npm dependencies) is not installed: run `npm ci` in \
                     examples/express, or `bash scripts/test.sh`, which does"
                );
                (PathBuf::from("node"), None)
            }
            Example::Go => {
                require("go", &["version"], "Go", "`apt-get install golang-go`");
                let out = TempDir::new("go-example");
                let binary = out.path.join("app");
                let mut build = Command::new("go");
                build
                    .args(["build", "-o"])
                    .arg(&binary)
                    .arg(".")
                    .current_dir(&dir)
                    .env("GOTOOLCHAIN", "local")
                    .env("GOFLAGS", "-mod=mod");
                match run_bounded(&mut build, BUILD_DEADLINE) {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => panic!("`go build` of examples/go failed: {e}"),
                    None => panic!("cannot run `go build`"),
                }
                (binary, Some(out))
            }
            Example::Php => {
                require(
                    "php",
                    &["--version"],
                    "PHP's CLI",
                    "`apt-get install php-cli`",
                );
                (PathBuf::from("php"), None)
            }
            Example::Java => {
                require(
                    "java",
                    &["-version"],
                    "A Java 17 runtime and compiler",
                    "`apt-get install default-jdk-headless`",
                );
                require(
                    "javac",
                    &["-version"],
                    "A Java 17 compiler (the JDK, not only the JRE)",
                    "`apt-get install default-jdk-headless`",
                );
                (PathBuf::from("java"), None)
            }
        };
        Launcher {
            example: self,
            program,
            _build: build,
        }
    }

    /// Whether a line of the app's output logs a `GET /` answered with 200.
    fn served_home(self, line: &str) -> bool {
        let line = line.trim_end();
        match self {
            // werkzeug: 127.0.0.1 - - [date] "GET / HTTP/1.1" 200 -
            Example::Flask => line.contains("\"GET / HTTP/1.1\" 200"),
            // PHP's built-in server: [date] 127.0.0.1:port [200]: GET /
            Example::Php => line.ends_with("[200]: GET /"),
            // The others log `<method> <path> <status>`.
            Example::Express | Example::Go | Example::Java => line.ends_with("GET / 200"),
        }
    }
}

impl Launcher {
    fn command(&self, port: u16) -> Command {
        let dir = self.example.dir();
        let mut cmd = Command::new(&self.program);
        let port_s = port.to_string();
        let host_port = ["--host", "127.0.0.1", "--port", &port_s];
        match self.example {
            Example::Flask => {
                cmd.arg(dir.join("app.py"))
                    .args(host_port)
                    .env("PYTHONUNBUFFERED", "1")
                    .env("PYTHONDONTWRITEBYTECODE", "1")
                    .env_remove("FLASK_DEBUG")
                    .env_remove("FLASK_RUN_PORT");
            }
            Example::Express => {
                cmd.arg(dir.join("app.js"))
                    .args(host_port)
                    .env("NODE_ENV", "production");
            }
            Example::Go => {
                cmd.args(host_port);
            }
            Example::Php => {
                cmd.arg("-S")
                    .arg(format!("127.0.0.1:{port}"))
                    .arg(dir.join("index.php"))
                    .env_remove("PHP_CLI_SERVER_WORKERS");
            }
            Example::Java => {
                cmd.arg(dir.join("App.java")).args(host_port);
            }
        }
        cmd.current_dir(&dir);
        cmd
    }
}

// ---------------------------------------------------------------------------------------------
// One copy of an app as a process
// ---------------------------------------------------------------------------------------------

/// One copy of an example app on a free loopback port, killed on drop.
struct App {
    example: Example,
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

/// Collects a child's output lines (both streams) so that the pipes never fill up.
fn drain(stream: impl Read + Send + 'static, log: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            log.lock().unwrap().push(line);
        }
    });
}

impl App {
    fn start(launcher: &Launcher) -> Self {
        let example = launcher.example;
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = free_port();
            let started = Instant::now();
            let mut child = launcher
                .command(port)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start the {example:?} example: {e}"));
            let log = Arc::new(Mutex::new(Vec::new()));
            drain(child.stdout.take().unwrap(), log.clone());
            drain(child.stderr.take().unwrap(), log.clone());
            // The guard owns the process from here: a panic below still kills it.
            let mut app = App {
                example,
                child,
                port,
                log,
            };
            let up = wait_for(
                &format!("the {example:?} app on port {port}"),
                APP_START_DEADLINE,
                || {
                    if let Ok(Some(_)) = app.child.try_wait() {
                        return Some(false); // exited (port taken meanwhile?): try another port
                    }
                    answers_200(port).then_some(true)
                },
            );
            if up {
                eprintln!(
                    "{example:?} app on port {port} answered after {:?}",
                    started.elapsed()
                );
                return app;
            }
            // Let the drain threads catch the last lines, then drop (kills) and retry.
            std::thread::sleep(Duration::from_millis(50));
            last_log = app.logs();
        }
        panic!("the {example:?} app did not start (5 attempts); last output:\n{last_log}");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// How many logged `GET /` this copy answered with 200.
    fn home_pages_served(&self) -> usize {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| self.example.served_home(l)).count()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {:?} app on port {} ---\n{}",
                self.example,
                self.port,
                self.logs()
            );
        }
    }
}

/// A raw, blocking `GET /api/session` answered with 200 (the app is up, not just the socket).
fn answers_200(port: u16) -> bool {
    let addr = ([127, 0, 0, 1], port).into();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /api/session HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.starts_with("HTTP/1.") && text.lines().next().is_some_and(|l| l.contains(" 200 "))
}

// ---------------------------------------------------------------------------------------------
// The whole setup: 1 Redis, 2 apps, 2 proxies
// ---------------------------------------------------------------------------------------------

struct Cluster {
    // Dropped in declaration order: proxies first, then the apps, then Redis.
    a: Stickless,
    b: Stickless,
    app_a: App,
    app_b: App,
    redis: RedisServer,
}

impl Cluster {
    fn start(example: Example) -> Self {
        let launcher = example.prepare();
        let redis = RedisServer::start();
        let app_a = App::start(&launcher);
        let app_b = App::start(&launcher);
        let a = Stickless::on_redis(&app_a.url(), &redis, &[]);
        let b = Stickless::on_redis(&app_b.url(), &redis, &[]);
        Cluster {
            a,
            b,
            app_a,
            app_b,
            redis,
        }
    }

    /// What the proxies logged, for failure messages (each app prints its own when dropped).
    fn logs(&self) -> String {
        format!(
            "--- stickless A ---\n{}\n--- stickless B ---\n{}",
            self.a.logs(),
            self.b.logs()
        )
    }

    /// Runs the scenario with a deadline; on failure or timeout, prints the processes' logs.
    async fn run(&self, scenario: impl std::future::Future<Output = ()>) {
        struct DumpOnPanic<'a>(&'a Cluster);
        impl Drop for DumpOnPanic<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    eprintln!("{}", self.0.logs());
                }
            }
        }
        let _dump = DumpOnPanic(self);
        if tokio::time::timeout(SCENARIO_DEADLINE, scenario)
            .await
            .is_err()
        {
            panic!("the scenario did not finish within {SCENARIO_DEADLINE:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Page and reply helpers
// ---------------------------------------------------------------------------------------------

/// The text between `marker` and the next `<` (the pages put each value in its own `<p>`).
fn after<'a>(body: &'a str, marker: &str) -> Option<&'a str> {
    let rest = &body[body.find(marker)? + marker.len()..];
    Some(&rest[..rest.find('<').unwrap_or(rest.len())])
}

/// The name after `Logged in as `, HTML entities decoded (each language escapes in its own way).
fn logged_in_as(r: &Reply) -> Option<String> {
    after(&r.text(), "Logged in as ").map(html_unescape)
}

/// `Visits: <n>`.
fn visits(r: &Reply) -> Option<u64> {
    after(&r.text(), "Visits: ").map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("Visits is not a number: {v:?}"))
    })
}

/// Decodes the entities the examples' escaping functions write for `& < > " '`.
fn html_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let entities = [
            ("&amp;", '&'),
            ("&lt;", '<'),
            ("&gt;", '>'),
            ("&quot;", '"'),
            ("&#34;", '"'),
            ("&#x22;", '"'),
            ("&#39;", '\''),
            ("&#039;", '\''),
            ("&#x27;", '\''),
            ("&apos;", '\''),
        ];
        match entities.iter().find(|(e, _)| rest.starts_with(e)) {
            Some((e, c)) => {
                out.push(*c);
                rest = &rest[e.len()..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The protocol's response headers never reach the client.
fn assert_no_protocol_headers(r: &Reply, what: &str) {
    let leaked: Vec<&str> = r
        .headers
        .keys()
        .map(|k| k.as_str())
        .filter(|k| k.starts_with("x-session"))
        .collect();
    assert!(
        leaked.is_empty(),
        "{what}: protocol headers reached the client: {leaked:?}"
    );
}

fn assert_not_logged_in(r: &Reply, what: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    let body = r.text();
    assert!(
        body.contains("Not logged in"),
        "{what}: expected `Not logged in`, got:\n{body}"
    );
    assert!(
        !body.contains("Logged in as") && !body.contains("Visits:"),
        "{what}: a logged-out page shows session data:\n{body}"
    );
    assert_no_protocol_headers(r, what);
}

fn assert_home(r: &Reply, name: &str, n: u64, what: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    assert_eq!(
        logged_in_as(r).as_deref(),
        Some(name),
        "{what}: {}",
        r.text()
    );
    assert_eq!(visits(r), Some(n), "{what}: {}", r.text());
    assert!(!r.text().contains("Not logged in"), "{what}: {}", r.text());
    assert_no_protocol_headers(r, what);
}

/// POST /login with an already URL-encoded form value; checks the 302 and returns it.
async fn login(http: &mut Http, proxy: &Stickless, encoded_username: &str) -> Reply {
    let r = http
        .send(
            Method::POST,
            &proxy.url("/login"),
            &[("content-type", FORM)],
            Bytes::from(format!("username={encoded_username}")),
        )
        .await;
    assert_eq!(r.status, 302, "POST /login: {}", r.text());
    let location = r
        .headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    // Werkzeug >= 2.1 sends "/" as is; older versions make it absolute (http://host/).
    let path = location.strip_prefix("http://").map_or(location, |rest| {
        &rest[rest.find('/').unwrap_or(rest.len())..]
    });
    assert_eq!(path, "/", "POST /login redirects to /, got {location:?}");
    assert_no_protocol_headers(&r, "POST /login");
    r
}

/// `GET /api/session`: what the app received, decoded by the app (`session`, `fields`).
async fn app_view(http: &mut Http, proxy: &Stickless) -> (String, BTreeMap<String, String>) {
    let r = http.get(&proxy.url("/api/session")).await;
    assert_eq!(r.status, 200, "GET /api/session: {}", r.text());
    #[derive(serde::Deserialize)]
    struct View {
        session: String,
        fields: BTreeMap<String, String>,
    }
    let v: View = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("/api/session is not JSON ({e}): {}", r.text()));
    (v.session, v.fields)
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The hash without stickless' own `_created` and `_v` fields (asserted present).
async fn stored_fields(redis: &RedisServer, key: &str) -> BTreeMap<String, String> {
    let mut h = hgetall(redis, key).await;
    for own in ["_created", "_v"] {
        let value = h.remove(own);
        assert!(
            value.is_some_and(|c| c.parse::<u64>().is_ok()),
            "{key} has a numeric {own} field"
        );
    }
    h
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Login on B, six visits alternating A/B counting 1..6 through Redis, logout on A, gone on B.
async fn login_visits_logout(example: Example) {
    let c = Cluster::start(example);
    c.run(async {
        let (a, b, redis) = (&c.a, &c.b, &c.redis);
        let mut http = Http::with_jar();

        // Anonymous: the app sees no session and none is created.
        let r = http.get(&a.url("/")).await;
        assert_not_logged_in(&r, "GET / on A before login");
        assert!(r.sid().is_none(), "no cookie for an anonymous visit");
        assert!(http.sid.is_none());
        assert!(keys(redis, "stickless:*").await.is_empty());

        // Login on the other instance: 302 with a new session cookie.
        let r = login(&mut http, b, "alice").await;
        let cookie = r.sid().expect("POST /login sets the session cookie");
        assert!(!cookie.is_empty(), "the login sets, not clears, the cookie");
        assert_eq!(http.sid.as_deref(), Some(cookie.as_str()));
        let id = id_of(&cookie).to_owned();
        assert_eq!(id.len(), 43, "a 256-bit base64url id: {id}");
        let key = format!("stickless:{id}");
        assert_eq!(keys(redis, "stickless:*").await, vec![key.clone()]);
        assert_eq!(
            stored_fields(redis, &key).await,
            map(&[("username", "alice")])
        );
        assert!(pttl(redis, &key).await > 0, "the session expires when idle");

        // The app behind A receives the session B created.
        let (status, fields) = app_view(&mut http, a).await;
        assert_eq!(status, "active");
        assert_eq!(fields, map(&[("username", "alice")]));

        // Six visits, alternating A, B, A, ...: one counter in Redis, no sticky sessions.
        for n in 1..=6u64 {
            let (name, proxy) = if n % 2 == 1 { ("A", a) } else { ("B", b) };
            let r = http.get(&proxy.url("/")).await;
            assert_home(&r, "alice", n, &format!("visit {n} on {name}"));
            assert!(
                r.sid().is_none(),
                "visit {n}: the cookie is neither reissued nor cleared"
            );
            assert_eq!(
                stored_fields(redis, &key).await,
                map(&[("username", "alice"), ("visits", &n.to_string())]),
                "after visit {n}"
            );
        }
        assert_eq!(http.sid.as_deref(), Some(cookie.as_str()));
        assert_eq!(keys(redis, "stickless:*").await, vec![key.clone()]);
        // Each app process really served its share of the visits (its access log).
        for (name, app) in [("A", &c.app_a), ("B", &c.app_b)] {
            wait_for(
                &format!("3 logged-in visits in app {name}'s access log"),
                Duration::from_secs(5),
                || (app.home_pages_served() >= 3).then_some(()),
            );
        }
        let (status, fields) = app_view(&mut http, b).await;
        assert_eq!(status, "active");
        assert_eq!(fields, map(&[("username", "alice"), ("visits", "6")]));

        // A client cannot forge the session headers, in any spelling.
        let mut stranger = Http::new();
        let r = stranger
            .send(
                Method::GET,
                &a.url("/"),
                &[
                    ("x-session", "active"),
                    ("X-Session-Field-username", "mallory"),
                    ("x_session_field_visits", "41"),
                ],
                Bytes::new(),
            )
            .await;
        assert_not_logged_in(&r, "GET / with forged x-session headers");
        assert!(r.sid().is_none());

        // Logout on A: cookie cleared, key gone.
        let r = http.get(&a.url("/logout")).await;
        assert_eq!(r.status, 302, "GET /logout: {}", r.text());
        assert_no_protocol_headers(&r, "GET /logout");
        assert_eq!(r.sid().as_deref(), Some(""), "the logout clears the cookie");
        assert!(http.sid.is_none());
        assert_eq!(
            pttl(redis, &key).await,
            -2,
            "the logout deletes the session"
        );
        assert!(keys(redis, "stickless:*").await.is_empty());

        // B agrees, with the browser's (empty) jar and with the old cookie replayed.
        let r = http.get(&b.url("/")).await;
        assert_not_logged_in(&r, "GET / on B after logout");
        let mut replay = Http::with_jar();
        replay.sid = Some(cookie.clone());
        let r = replay.get(&b.url("/")).await;
        assert_not_logged_in(&r, "GET / on B with the cookie from before the logout");
        let (status, fields) = app_view(&mut replay, b).await;
        assert_eq!(status, "none");
        assert!(fields.is_empty(), "{fields:?}");
        assert!(
            keys(redis, "stickless:*").await.is_empty(),
            "an old cookie does not bring the session back"
        );
    })
    .await;
}

/// A non-ASCII username with `%` round-trips form → app → stickless → Redis → app → page, and a
/// second login on a live session rotates it (new id, old key gone, visits and `_created` kept).
async fn non_ascii_username_round_trips_and_login_rotates(example: Example) {
    let c = Cluster::start(example);
    c.run(async {
        let (a, b, redis) = (&c.a, &c.b, &c.redis);
        let mut http = Http::with_jar();

        // A first session (alice, one visit), so that the next login has something to rotate.
        let r = login(&mut http, a, "alice").await;
        let old_cookie = r.sid().expect("first login sets the cookie");
        let old_key = format!("stickless:{}", id_of(&old_cookie));
        let r = http.get(&b.url("/")).await;
        assert_home(&r, "alice", 1, "GET / on B after the first login");
        let old_created = hgetall(redis, &old_key).await.remove("_created");
        assert!(old_created.is_some());

        // Log in as `Zoë 100%` (UTF-8, URL-encoded as a browser does) on B.
        let name = "Zoë 100%";
        let r = login(&mut http, b, "Zo%C3%AB+100%25").await;
        let cookie = r.sid().expect("the login reissues the cookie");
        assert!(!cookie.is_empty());
        assert_ne!(
            id_of(&cookie),
            id_of(&old_cookie),
            "the login rotated the session id"
        );
        let key = format!("stickless:{}", id_of(&cookie));
        // The old id is only a tombstone for the rotation grace: marked, without the new fields.
        let tombstone = hgetall(redis, &old_key).await;
        assert!(tombstone.contains_key("_rotated"), "{tombstone:?}");
        assert_eq!(tombstone.get("username").map(String::as_str), Some("alice"));
        let mut all = keys(redis, "stickless:*").await;
        all.sort();
        let mut expected = vec![key.clone(), old_key.clone()];
        expected.sort();
        assert_eq!(all, expected);

        // Redis holds the decoded value, byte for byte; the rotation kept the rest.
        let stored = hgetall(redis, &key).await;
        assert_eq!(
            stored.get("username").map(|s| s.as_bytes()),
            Some(name.as_bytes()),
            "stored decoded: {stored:?}"
        );
        assert_eq!(
            stored.get("_created"),
            old_created.as_ref(),
            "rotation keeps _created"
        );
        assert_eq!(
            stored_fields(redis, &key).await,
            map(&[("username", name), ("visits", "1")])
        );
        assert!(pttl(redis, &key).await > 0);

        // The app (behind either proxy) gets it back decoded.
        for proxy in [a, b] {
            let (status, fields) = app_view(&mut http, proxy).await;
            assert_eq!(status, "active");
            assert_eq!(fields, map(&[("username", name), ("visits", "1")]));
        }

        // The page shows it (`ë` and `%` as is) on both sides.
        let r = http.get(&a.url("/")).await;
        assert_home(&r, name, 2, "GET / on A as Zoë");
        assert!(r.text().contains("Logged in as Zoë 100%"), "{}", r.text());
        let r = http.get(&b.url("/")).await;
        assert_home(&r, name, 3, "GET / on B as Zoë");
        assert_eq!(
            stored_fields(redis, &key).await,
            map(&[("username", name), ("visits", "3")])
        );
        assert_eq!(http.sid.as_deref(), Some(cookie.as_str()));

        // The cookie from before the rotation is worthless now.
        let mut replay = Http::with_jar();
        replay.sid = Some(old_cookie.clone());
        let r = replay.get(&a.url("/")).await;
        assert_not_logged_in(&r, "GET / with the cookie from before the rotation");

        // Logout on B, gone on A.
        let r = http.get(&b.url("/logout")).await;
        assert_eq!(r.status, 302);
        assert_eq!(r.sid().as_deref(), Some(""));
        assert_eq!(pttl(redis, &key).await, -2);
        let r = http.get(&a.url("/")).await;
        assert_not_logged_in(&r, "GET / on A after logout");
        assert_eq!(
            keys(redis, "stickless:*").await,
            vec![old_key],
            "only the rotation's tombstone is left"
        );

        // A name with markup is stored as typed and shown escaped, never as markup.
        let name = "<b>O'Neil & \"Co\"</b>";
        let r = login(&mut http, a, "%3Cb%3EO%27Neil+%26+%22Co%22%3C%2Fb%3E").await;
        let key = format!("stickless:{}", id_of(&r.sid().expect("a new session")));
        assert_eq!(stored_fields(redis, &key).await, map(&[("username", name)]));
        let r = http.get(&b.url("/")).await;
        assert_home(&r, name, 1, "GET / on B as a name with markup");
        assert!(
            !r.text().contains("<b>"),
            "the name is escaped: {}",
            r.text()
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Every example runs every scenario: `examples::<language>::<scenario>`
// ---------------------------------------------------------------------------------------------

macro_rules! scenarios {
    ($($language:ident => $example:expr),* $(,)?) => {
        mod examples {
            $(
                mod $language {
                    use super::super::*;

                    #[tokio::test(flavor = "multi_thread")]
                    async fn login_visits_logout_across_two_app_servers() {
                        login_visits_logout($example).await;
                    }

                    #[tokio::test(flavor = "multi_thread")]
                    async fn non_ascii_username_round_trips_and_login_rotates() {
                        super::super::non_ascii_username_round_trips_and_login_rotates($example)
                            .await;
                    }
                }
            )*
        }
    };
}

scenarios! {
    flask => Example::Flask,
    express => Example::Express,
    go => Example::Go,
    php => Example::Php,
    java => Example::Java,
}
