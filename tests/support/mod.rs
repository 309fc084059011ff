//! Test fixtures: real `redis-server` processes on free loopback ports, an in-process test backend,
//! the `stickless` binary as a real process, and a small HTTP client with a cookie jar. Everything
//! started here is stopped when its handle drops.

#![allow(dead_code)]

mod certs;
// Used by the TLS tests only; every test file compiles this module.
#[allow(unused_imports)]
pub use certs::{tls_server, Certs};
mod endpoint;
mod monitor;
#[allow(unused_imports)]
pub use endpoint::{addr, cmd, fail_over, Endpoint};
#[allow(unused_imports)]
pub use monitor::{command_name, Monitor};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Runs blocking fixture work (starting processes, polling ports) without holding up the
/// runtime's other tasks, which the in-process test backend needs: inside a multi-threaded tokio
/// runtime the thread is handed over for the duration; elsewhere the work just runs.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    blocking(|| {
        let end = Instant::now() + deadline;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

/// The async twin of [`wait_for`]: polls `f` until it returns `Some`, or panics after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A field of a process's `/proc/PID/status` in KiB (`"VmRSS:"`, `"VmHWM:"`), or 0.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// A loopback port held for the caller: bound but not listening, so connections to it are
/// refused and no other process can take it, until [`ReservedPort::listen`] turns it into a
/// listener. Unlike "bind, release, reuse", nothing can race for it in between.
pub struct ReservedPort {
    socket: tokio::net::TcpSocket,
    pub port: u16,
}

impl ReservedPort {
    /// Reserves a free loopback port.
    pub fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket
            .bind("127.0.0.1:0".parse().unwrap())
            .expect("a free loopback port");
        let port = socket.local_addr().expect("its address").port();
        ReservedPort { socket, port }
    }

    /// Starts listening on the reserved port.
    pub fn listen(self) -> tokio::net::TcpListener {
        self.socket
            .listen(1024)
            .expect("listen on the reserved port")
    }
}

/// A free loopback port (bound then released; the caller retries if someone takes it meanwhile).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn redis_server_binary() -> PathBuf {
    if let Ok(p) = std::env::var("STICKLESS_TEST_REDIS_SERVER") {
        return p.into();
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain([
        "/usr/bin",
        "/usr/sbin",
        "/usr/local/bin",
    ]) {
        let p = PathBuf::from(dir).join("redis-server");
        if p.is_file() {
            return p;
        }
    }
    panic!("redis-server not found: run `bash scripts/test.sh`, which installs it, or set STICKLESS_TEST_REDIS_SERVER");
}

/// Commands that ElastiCache refuses (and KEYS, FLUSHALL, MONITOR, which no session store has any
/// business sending). Every test server runs with them renamed to private names that only the
/// harness knows ([`private_name`]), so a use of any of them by stickless fails a test.
pub const RESTRICTED_COMMANDS: [&str; 12] = [
    "CONFIG",
    "DEBUG",
    "SAVE",
    "BGSAVE",
    "REPLICAOF",
    "SLAVEOF",
    "SYNC",
    "MIGRATE",
    "SHUTDOWN",
    "KEYS",
    "FLUSHALL",
    "MONITOR",
];

/// The name a restricted command has on the test servers: random per test process, so that
/// nothing outside the harness can guess it.
pub fn private_name(command: &str) -> String {
    static SUFFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let suffix = SUFFIX.get_or_init(|| format!("{:016x}", rand::random::<u64>()));
    format!("harness-{}-{suffix}", command.to_ascii_lowercase())
}

/// A restricted command under its private name, for the harness's own inspection.
pub fn private_cmd(command: &str) -> redis::Cmd {
    redis::cmd(&private_name(command))
}

/// `--rename-command NAME private-name` for every restricted command.
fn rename_args() -> Vec<String> {
    RESTRICTED_COMMANDS
        .iter()
        .flat_map(|c| {
            [
                "--rename-command".to_owned(),
                c.to_string(),
                private_name(c),
            ]
        })
        .collect()
}

/// A directory of our own under the system's temp dir, removed with everything in it on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    /// Creates a fresh, empty directory; `what` only helps to tell them apart.
    pub fn new(what: &str) -> Self {
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "stickless-{what}-{}-{n}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).expect("a temp dir");
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A `redis-server` process of our own on a free loopback port, killed on drop. Its working
/// directory (replication's temporary files, a cluster's node table) is a temp dir removed on
/// drop, and the [`RESTRICTED_COMMANDS`] are renamed away.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    // Declared after `child`: dropped, and so removed, only once the process is killed.
    dir: TempDir,
}

impl RedisServer {
    /// Starts a server with no persistence.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `--name value` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        for _ in 0..5 {
            if let Some(s) = Self::try_start_with(extra) {
                return s;
            }
        }
        panic!("could not start redis-server");
    }

    /// One try at starting a server on a fresh port; `None` when the port (or another one in
    /// `extra`) was taken meanwhile, so that the caller can retry with other ports.
    pub fn try_start_with(extra: &[&str]) -> Option<Self> {
        Self::try_start(free_port(), extra)
    }

    /// Starts a server on a given port (to bring one back where a killed one was).
    pub fn start_on(port: u16) -> Self {
        wait_for(
            "redis-server on its old port",
            Duration::from_secs(10),
            || Self::try_start(port, &[]),
        )
    }

    fn try_start(port: u16, extra: &[&str]) -> Option<Self> {
        blocking(|| {
            let dir = TempDir::new("redis");
            let mut child = Command::new(redis_server_binary())
                .current_dir(&dir.path)
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args([
                    "--protected-mode",
                    "no",
                    "--daemonize",
                    "no",
                    "--loglevel",
                    "warning",
                ])
                .args(rename_args())
                .arg("--dir")
                .arg(&dir.path)
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server starts");
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken meanwhile: try another
                }
                // The server answering must be this child: two tests can be handed the same free
                // port, and then the one that lost the race would talk to the other's server.
                let password = extra
                    .iter()
                    .position(|a| *a == "--requirepass")
                    .and_then(|i| extra.get(i + 1).copied());
                match server_pid(port, password) {
                    Ok(pid) if pid == child.id() => return Some(RedisServer { child, port, dir }),
                    Ok(_) => break, // another test's server holds the port: try another
                    // A server that refuses to say (ACL users without the default one): up, and
                    // ours if our child is still running once it answers.
                    Err(Refused) if ping(port) => {
                        std::thread::sleep(Duration::from_millis(50));
                        if let Ok(None) = child.try_wait() {
                            return Some(RedisServer { child, port, dir });
                        }
                        break;
                    }
                    Err(_) => {}
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
            None
        })
    }

    /// `redis://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// An independent client (the `redis` crate) to check what is really stored.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("valid url")
    }

    /// A multiplexed async connection of the independent client.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }

    /// Stops the server abruptly (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Pauses the server (SIGSTOP): connections stay open but nothing is answered.
    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
    }

    /// Resumes a paused server.
    pub fn resume(&self) {
        signal(self.child.id(), "CONT");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Only a live child may be signalled: a reaped pid may belong to another process by now.
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), "CONT");
            self.kill();
        }
    }
}

/// Sends `sig` (`TERM`, `HUP`...) to `pid` with `kill`.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// Why the process id of a server could not be read.
enum NoPid {
    /// Nothing answers yet.
    NotYet,
    /// The server answered with an error (it wants a user it was not given).
    Refused,
}
use NoPid::{NotYet, Refused};

/// The process id of the server on `port` (`INFO server`), once it answers.
fn server_pid(port: u16, password: Option<&str>) -> Result<u32, NoPid> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|_| NotYet)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|_| NotYet)?;
    if let Some(pw) = password {
        s.write_all(format!("AUTH {pw}\r\n").as_bytes())
            .map_err(|_| NotYet)?;
        let mut ok = [0u8; 5];
        s.read_exact(&mut ok).map_err(|_| NotYet)?;
        if &ok != b"+OK\r\n" {
            return Err(Refused);
        }
    }
    s.write_all(b"INFO server\r\n").map_err(|_| NotYet)?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let n = s.read(&mut buf).map_err(|_| NotYet)?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        if let Some(pid) = text
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|v| v.trim().parse().ok())
        {
            return Ok(pid);
        }
        if text.starts_with('-') {
            return Err(Refused);
        }
    }
    Err(NotYet)
}

fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    // A server that requires a password answers NOAUTH: it is up all the same.
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && (&buf == b"+PONG\r\n" || &buf == b"-NOAUTH")
}

/// Reads a whole hash with the independent client (including stickless' `_created` field).
pub async fn hgetall(redis: &RedisServer, key: &str) -> BTreeMap<String, String> {
    let mut c = redis.conn().await;
    redis::cmd("HGETALL")
        .arg(key)
        .query_async(&mut c)
        .await
        .expect("HGETALL")
}

/// Milliseconds left on a key (-2 when it does not exist, -1 without expiry).
pub async fn pttl(redis: &RedisServer, key: &str) -> i64 {
    let mut c = redis.conn().await;
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut c)
        .await
        .expect("PTTL")
}

/// All keys with the prefix.
pub async fn keys(redis: &RedisServer, pattern: &str) -> Vec<String> {
    let mut c = redis.conn().await;
    private_cmd("KEYS")
        .arg(pattern)
        .query_async(&mut c)
        .await
        .expect("KEYS")
}

/// What the test backend saw.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, Vec<String>>,
}

impl Seen {
    /// The first value of a header (names are lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    /// The session fields the backend received (`x-session-field-*`, still encoded).
    pub fn fields(&self) -> BTreeMap<String, String> {
        self.headers
            .iter()
            .filter_map(|(k, v)| {
                Some((k.strip_prefix("x-session-field-")?.to_owned(), v[0].clone()))
            })
            .collect()
    }
}

/// An in-process backend on a free loopback port.
///
/// - Every response body is JSON describing the request it received ([`Seen`]).
/// - Each request header `x-test-reply: Name: value` becomes a response header `Name: value`.
/// - `/slow/<ms>` waits before answering; `/status/<code>` answers with that status;
///   `/echo-body` streams the request body back; `/stream/<n>` sends n chunks 50 ms apart.
pub struct TestBackend {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub hits: Arc<Mutex<u64>>,
}

impl TestBackend {
    /// Starts the backend on the current tokio runtime.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let hits = Arc::new(Mutex::new(0));
        let h = hits.clone();
        tokio::spawn(stickless::server::serve_http(
            listener,
            move |req, _| {
                *h.lock().unwrap() += 1;
                backend_handle(req)
            },
            async {
                let _ = rx.await;
            },
        ));
        TestBackend {
            addr,
            stop: Some(tx),
            hits,
        }
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests served so far.
    pub fn hits(&self) -> u64 {
        *self.hits.lock().unwrap()
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

type BackendBody =
    http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

async fn backend_handle(req: Request<Incoming>) -> Response<BackendBody> {
    let path = req.uri().path().to_owned();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let replies: Vec<(HeaderName, HeaderValue)> = req
        .headers()
        .get_all("x-test-reply")
        .iter()
        .filter_map(|v| {
            let s = v.to_str().ok()?;
            let (k, v) = s.split_once(':')?;
            Some((
                HeaderName::from_bytes(k.trim().as_bytes()).ok()?,
                HeaderValue::from_str(v.trim()).ok()?,
            ))
        })
        .collect();
    let seen = serde_json::json!({
        "method": req.method().as_str(),
        "path": path,
        "headers": headers,
    });
    let mut status = StatusCode::OK;
    let body: BackendBody = if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        full(seen.to_string())
    } else if let Some(code) = path.strip_prefix("/status/") {
        status = StatusCode::from_u16(code.parse().unwrap_or(500))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        full(seen.to_string())
    } else if path == "/echo-body" {
        req.into_body().map_err(|e| Box::new(e) as _).boxed()
    } else if let Some(n) = path.strip_prefix("/stream/") {
        let n: usize = n.parse().unwrap_or(1);
        let (mut tx, body) = http_body_util::channel::Channel::<
            Bytes,
            Box<dyn std::error::Error + Send + Sync>,
        >::new(1);
        tokio::spawn(async move {
            for i in 0..n {
                if tx
                    .send_data(Bytes::from(format!("chunk {i}\n")))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        body.boxed()
    } else {
        full(seen.to_string())
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    for (k, v) in replies {
        resp.headers_mut().append(k, v);
    }
    resp
}

fn full(s: String) -> BackendBody {
    Full::new(Bytes::from(s)).map_err(|e| match e {}).boxed()
}

/// The `stickless` binary, running as a real process on free loopback ports; killed on drop.
pub struct Stickless {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// A fixed secret key for tests that share cookies between instances.
pub const TEST_KEY: &str = "test-key-0123456789abcdef0123456789abcdef";

impl Stickless {
    /// Starts `stickless serve` with `args` in front of `upstream`, on free ports.
    pub fn start(upstream: &str, args: &[&str]) -> Self {
        let mut all: Vec<String> = vec!["--upstream".into(), upstream.into()];
        all.extend(args.iter().map(|s| s.to_string()));
        Self::spawn(all, Vec::new(), "127.0.0.1:0".parse().unwrap())
    }

    /// Like [`Stickless::start`], with extra environment variables.
    pub fn start_with_env(upstream: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut all: Vec<String> = vec!["--upstream".into(), upstream.into()];
        all.extend(args.iter().map(|s| s.to_string()));
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::spawn(all, env, "127.0.0.1:0".parse().unwrap())
    }

    /// Starts stickless on Redis with the shared test key.
    pub fn on_redis(upstream: &str, redis: &RedisServer, args: &[&str]) -> Self {
        Self::on_redis_url(upstream, &redis.url(), args)
    }

    /// Starts stickless on the Redis at `url` (a Sentinel group, a cluster, a forwarder) with
    /// the shared test key.
    pub fn on_redis_url(upstream: &str, url: &str, args: &[&str]) -> Self {
        let mut all = vec!["--redis-url", url, "--secret-keys", TEST_KEY];
        all.extend_from_slice(args);
        Self::start(upstream, &all)
    }

    fn spawn(args: Vec<String>, env: Vec<(String, String)>, listen: SocketAddr) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stickless"));
        // Only what the test says configures the process.
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("STICKLESS_")) {
            command.env_remove(k);
        }
        let mut child = command
            .arg("serve")
            .args([
                "--listen",
                &listen.to_string(),
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(&args)
            .env_remove("REDIS_URL")
            .env("RUST_LOG", "info")
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("stickless starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("stickless ready") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line.clone());
                    }
                }
                l.lock().unwrap().push(line);
            }
        });
        let ready = match blocking(|| rx.recv_timeout(Duration::from_secs(20))) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "stickless did not start:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        // `--log-format json` writes the line as an object with the fields at the top level.
        let json: Option<serde_json::Value> = serde_json::from_str(&ready).ok();
        let field = |name: &str| -> SocketAddr {
            match &json {
                Some(line) => line[name].as_str().map(str::to_owned),
                None => ready
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{name}=")))
                    .map(str::to_owned),
            }
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in {ready}"))
        };
        Stickless {
            addr: field("listen"),
            admin: field("admin"),
            child,
            args,
            env,
            log,
        }
    }

    /// Stops the process and starts it again with the same flags on the same proxy port.
    pub fn restart(&mut self) {
        self.stop();
        // The old process is gone; dropping its handle again is harmless.
        *self = Self::spawn(self.args.clone(), self.env.clone(), self.addr);
    }

    /// Stops the process (SIGKILL).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM, as systemd does to stop a service (a second call is a second signal).
    pub fn terminate(&mut self) {
        // Only a live child may be signalled: a reaped pid may belong to another process by now.
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), "TERM");
        }
    }

    /// Waits for the process to exit by itself, or panics with its log after `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + deadline;
        blocking(|| loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < end,
                "stickless did not exit within {deadline:?}; its log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        })
    }

    /// `http://<addr><path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, once the process has ended by itself.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// `http://<admin><path>`
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The value of a counter or gauge line in `/metrics` (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        let r = Http::new().get(&self.admin_url("/metrics")).await;
        r.text()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Stickless {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as the test backend's description of the request.
    pub fn seen(&self) -> Seen {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not a backend echo ({e}): {}", self.text()))
    }

    /// All `Set-Cookie` values.
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    /// The `Set-Cookie` values other than the version cookie (`<session cookie>_v`, which goes
    /// with every change while the local cache is on, as it is by default on Redis).
    pub fn set_cookies_but_versions(&self) -> Vec<String> {
        self.set_cookies()
            .into_iter()
            .filter(|c| !c.split('=').next().is_some_and(|name| name.ends_with("_v")))
            .collect()
    }

    /// The `sid` cookie set by this response: `Some("")` when it clears it.
    pub fn sid(&self) -> Option<String> {
        self.cookie("sid")
    }

    /// The `sid_v` (version) cookie set by this response: `Some("")` when it clears it.
    pub fn sid_v(&self) -> Option<String> {
        self.cookie("sid_v")
    }

    /// The cookie `name` set by this response: `Some("")` when it clears it.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.set_cookies().iter().find_map(|c| {
            let (pair, _) = c.split_once(';').unwrap_or((c, ""));
            let (k, v) = pair.split_once('=')?;
            (k == name).then(|| v.to_owned())
        })
    }
}

/// Sends the backend's `reply` (`name: value`) through `url` with `http`'s cookies until it is
/// answered 200, as during a failover, when the store answers 503 until it finds the new primary.
/// Panics after 15 s.
pub async fn change_until_stored(http: &mut Http, url: &str, reply: &str) {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let r = http.get_replying(url, &[reply]).await;
        if r.status == 200 {
            return;
        }
        assert!(
            Instant::now() < end,
            "`{reply}` not stored within 15 s: {}",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small HTTP/1.1 client with a jar for `sid` and its version cookie `sid_v`.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    pub sid: Option<String>,
    pub sid_v: Option<String>,
    pub keep_cookies: bool,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    /// A client without a jar.
    pub fn new() -> Self {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
            sid: None,
            sid_v: None,
            keep_cookies: false,
        }
    }

    /// A client that keeps the `sid` and `sid_v` cookies like a browser.
    pub fn with_jar() -> Self {
        Http {
            keep_cookies: true,
            ..Self::new()
        }
    }

    /// GET `url`.
    pub async fn get(&mut self, url: &str) -> Reply {
        self.send(Method::GET, url, &[], Bytes::new()).await
    }

    /// GET `url` with the backend asked to reply with these headers (`name: value` each).
    pub async fn get_replying(&mut self, url: &str, replies: &[&str]) -> Reply {
        let headers: Vec<(&str, &str)> = replies.iter().map(|r| ("x-test-reply", *r)).collect();
        self.send(Method::GET, url, &headers, Bytes::new()).await
    }

    /// Sends a request; the jar's cookie is added when there is one. Bounded by 30 s.
    pub async fn send(
        &mut self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(url);
        if let Some(cookie) = self.cookie_header() {
            req = req.header("cookie", cookie);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).expect("valid request");
        let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .expect("response within 30 s")
            .expect("response");
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(Duration::from_secs(30), body.collect())
            .await
            .expect("body within 30 s")
            .expect("body")
            .to_bytes();
        let reply = Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        };
        self.keep(&reply);
        reply
    }

    /// The `Cookie` header the jar sends, if any.
    fn cookie_header(&self) -> Option<String> {
        if !self.keep_cookies {
            return None;
        }
        let sid = self.sid.as_ref().map(|v| format!("sid={v}"));
        let sid_v = self.sid_v.as_ref().map(|v| format!("sid_v={v}"));
        let both: Vec<String> = sid.into_iter().chain(sid_v).collect();
        (!both.is_empty()).then(|| both.join("; "))
    }

    /// Keeps (or drops) the cookies a reply sets, like a browser.
    fn keep(&mut self, reply: &Reply) {
        if self.keep_cookies {
            if let Some(sid) = reply.sid() {
                self.sid = (!sid.is_empty()).then_some(sid);
            }
            if let Some(v) = reply.sid_v() {
                self.sid_v = (!v.is_empty()).then_some(v);
            }
        }
    }
}

impl Http {
    /// GET `url` with the backend asked to reply with these headers, bounded by `limit` as a
    /// whole; a transport error or the limit is an `Err` describing it, never a panic.
    pub async fn try_get_replying(
        &mut self,
        url: &str,
        replies: &[&str],
        limit: Duration,
    ) -> Result<Reply, String> {
        let mut req = Request::builder().method(Method::GET).uri(url);
        if let Some(cookie) = self.cookie_header() {
            req = req.header("cookie", cookie);
        }
        for r in replies {
            req = req.header("x-test-reply", *r);
        }
        let req = req.body(Full::new(Bytes::new())).expect("valid request");
        let client = self.client.clone();
        let exchange = async move {
            let resp = client
                .request(req)
                .await
                .map_err(|e| format!("request: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok::<_, String>(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        let reply = tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| format!("no answer within {limit:?}"))??;
        self.keep(&reply);
        Ok(reply)
    }
}

// ---------------------------------------------------------------------------------------------
// Failover drills: logged-in users incrementing a counter without pause.
// ---------------------------------------------------------------------------------------------

/// A drill request that did not end in a 200 on the user's own session.
#[derive(Debug, Clone)]
pub struct Failure {
    /// When it was sent.
    pub sent: Instant,
    /// When it ended.
    pub at: Instant,
    /// The status, or `None` when no answer came within the client timeout (a hang) or the
    /// connection failed (`error` says which).
    pub status: Option<u16>,
    pub retry_after: Option<String>,
    pub error: String,
}

/// What one user saw during a drill.
#[derive(Debug, Clone)]
pub struct UserRun {
    pub cookie: String,
    pub requests: u64,
    /// Increments answered 200 on the user's own, existing session.
    pub acked: u64,
    /// 200s on which the backend was told there was no session (the session was gone).
    pub sessionless: u64,
    pub failures: Vec<Failure>,
}

/// Users incrementing `n` in their sessions through a proxy, one request after another each,
/// until stopped.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    last_failure: Arc<Mutex<Option<Instant>>>,
    tasks: Vec<tokio::task::JoinHandle<UserRun>>,
}

impl Load {
    /// Starts one task per cookie, each request bounded by `client_timeout`.
    pub fn start(url: String, cookies: Vec<String>, client_timeout: Duration) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let last_failure = Arc::new(Mutex::new(None));
        let tasks = cookies
            .into_iter()
            .map(|cookie| {
                let (stop, last_failure, url) = (stop.clone(), last_failure.clone(), url.clone());
                tokio::spawn(async move {
                    let mut run = UserRun {
                        cookie: cookie.clone(),
                        requests: 0,
                        acked: 0,
                        sessionless: 0,
                        failures: Vec::new(),
                    };
                    let mut http = Http::with_jar();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        // Always the user's own session, even if a lost one got replaced.
                        http.sid = Some(cookie.clone());
                        run.requests += 1;
                        let sent = Instant::now();
                        let failure = match http
                            .try_get_replying(&url, &["x-session-incr-n: 1"], client_timeout)
                            .await
                        {
                            Ok(r) if r.status == 200 => {
                                if r.seen().header("x-session") == Some("active") {
                                    run.acked += 1;
                                } else {
                                    run.sessionless += 1;
                                }
                                None
                            }
                            Ok(r) => Some(Failure {
                                sent,
                                at: Instant::now(),
                                status: Some(r.status.as_u16()),
                                retry_after: r
                                    .headers
                                    .get("retry-after")
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_owned),
                                error: r.text(),
                            }),
                            Err(error) => Some(Failure {
                                sent,
                                at: Instant::now(),
                                status: None,
                                retry_after: None,
                                error,
                            }),
                        };
                        if let Some(f) = failure {
                            *last_failure.lock().unwrap() = Some(f.at);
                            run.failures.push(f);
                            // A user who got 503 tries again at once: the worst case for the
                            // store, and what keeps the measure of recovery fine-grained.
                        }
                    }
                    run
                })
            })
            .collect();
        Load {
            stop,
            last_failure,
            tasks,
        }
    }

    /// When the latest failed request ended.
    pub fn last_failure(&self) -> Option<Instant> {
        *self.last_failure.lock().unwrap()
    }

    /// Waits until no request has failed for `quiet` since `since` (or since the latest failure
    /// after it), or until `deadline` after `since`.
    pub async fn settle(&self, since: Instant, quiet: Duration, deadline: Duration) {
        while since.elapsed() < deadline {
            let from = self.last_failure().map_or(since, |f| f.max(since));
            if from.elapsed() >= quiet {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every user after its request in flight and returns what each saw.
    pub async fn stop(self) -> Vec<UserRun> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut runs = Vec::new();
        for t in self.tasks {
            runs.push(t.await.expect("a drill user task"));
        }
        runs
    }
}

/// The figures of a failover drill.
#[derive(Debug, Default)]
pub struct DrillReport {
    pub users: usize,
    pub requests: u64,
    pub acked: u64,
    /// From the kill to the end of the last failed request.
    pub recovery: Option<Duration>,
    /// From the kill to the start of the last failed request: the store was back at some point
    /// between this and `recovery` (failures end in steps of the store timeout).
    pub last_failed_sent: Option<Duration>,
    /// Failed requests by status ("hung" for no answer within the client timeout, "transport"
    /// for a failed connection).
    pub failed: BTreeMap<String, u64>,
    /// Failed requests with a status other than 503 or without `Retry-After`, with what they
    /// said (at most a few).
    pub unexpected: Vec<String>,
    /// 200s on which the user's session was not found.
    pub sessionless: u64,
    /// Users whose session was gone at the end.
    pub sessions_lost: usize,
    /// Acknowledged increments missing from the final counters.
    pub acked_lost: u64,
    /// Increments in the final counters beyond those acknowledged (answered with a failure, but
    /// applied).
    pub applied_unacked: u64,
}

impl DrillReport {
    /// What every failover drill asserts: every user got through, every failure was a 503 with
    /// `Retry-After`, the failures ended within `recovery` (when recovery is expected), and no
    /// request was served without its session. `logs` is stickless's log, shown on failure.
    pub fn assert_held(&self, runs: &[UserRun], recovery: Option<Duration>, logs: &str) {
        assert!(
            self.acked > 0 && runs.iter().all(|r| r.acked > 0),
            "every user got through"
        );
        assert!(
            self.unexpected.is_empty(),
            "failed requests other than 503 with Retry-After: {:?}\nstickless log:\n{logs}",
            self.unexpected,
        );
        if let Some(limit) = recovery {
            let took = self.recovery.unwrap_or_default();
            assert!(
                took <= limit,
                "recovered in {took:?}; stickless log:\n{logs}"
            );
        }
        assert_eq!(self.sessionless, 0, "a request found no session");
    }

    /// Counts what the users saw; `final_counters` holds each user's final counter, `None` when
    /// the session was gone.
    pub fn new(kill: Instant, runs: &[UserRun], final_counters: &[Option<u64>]) -> Self {
        let mut r = DrillReport {
            users: runs.len(),
            ..Default::default()
        };
        for (run, end) in runs.iter().zip(final_counters) {
            r.requests += run.requests;
            r.acked += run.acked;
            r.sessionless += run.sessionless;
            for f in &run.failures {
                let kind = match (f.status, f.error.starts_with("no answer")) {
                    (Some(s), _) => s.to_string(),
                    (None, true) => "hung".to_owned(),
                    (None, false) => "transport".to_owned(),
                };
                *r.failed.entry(kind).or_default() += 1;
                if f.at > kill {
                    let after = f.at - kill;
                    if r.recovery.is_none_or(|d| after > d) {
                        r.recovery = Some(after);
                        r.last_failed_sent = Some(f.sent.saturating_duration_since(kill));
                    }
                }
                let ok = f.status == Some(503) && f.retry_after.as_deref() == Some("1");
                if !ok && r.unexpected.len() < 5 {
                    r.unexpected.push(format!(
                        "{:?} retry-after {:?}: {}",
                        f.status,
                        f.retry_after,
                        f.error.trim()
                    ));
                }
            }
            match end {
                None => r.sessions_lost += 1,
                Some(n) => {
                    r.acked_lost += run.acked.saturating_sub(*n);
                    r.applied_unacked += n.saturating_sub(run.acked);
                }
            }
        }
        r
    }

    /// Failed requests in all.
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    /// Prints the figures (shown by `cargo nextest run --no-capture`).
    pub fn print(&self, drill: &str) {
        println!("--- {drill} ---");
        println!(
            "users: {}, requests: {}, acknowledged increments: {}",
            self.users, self.requests, self.acked
        );
        match (self.last_failed_sent, self.recovery) {
            (Some(sent), Some(ended)) => println!(
                "time from kill to the last failed request: {:.2} s (it was sent at {:.2} s)",
                ended.as_secs_f64(),
                sent.as_secs_f64()
            ),
            _ => println!("time from kill to the last failed request: no failed request"),
        }
        println!(
            "failed requests by status: {:?} (total {})",
            self.failed,
            self.failed_total()
        );
        println!(
            "hung requests: {}",
            self.failed.get("hung").copied().unwrap_or(0)
        );
        println!("200s without the user's session: {}", self.sessionless);
        println!("sessions lost: {} of {}", self.sessions_lost, self.users);
        println!("acknowledged increments lost: {}", self.acked_lost);
        println!(
            "increments applied though answered with a failure: {}",
            self.applied_unacked
        );
        for u in &self.unexpected {
            println!("unexpected failure: {u}");
        }
    }
}

/// Prints the kinds of warnings stickless logged, counted, with numbers (ports, ids) folded into
/// `N`: what the store answered while it failed over.
pub fn print_warnings(proxy: &Stickless) {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for line in proxy.logs().lines().filter(|l| l.contains(" WARN ")) {
        let what = line.split_once(" WARN ").map_or(line, |(_, w)| w);
        let mut folded = String::with_capacity(what.len());
        let mut in_number = false;
        for c in what.chars() {
            if c.is_ascii_digit() {
                if !in_number {
                    folded.push('N');
                }
                in_number = true;
            } else {
                folded.push(c);
                in_number = false;
            }
        }
        *kinds.entry(folded).or_default() += 1;
    }
    for (kind, n) in kinds {
        println!("stickless warned {n}x: {kind}");
    }
}

/// Each user's counter `n` as stickless reads it now (`None` when the session is gone), each
/// read retried for a while if the store is still unavailable.
pub async fn final_counters(proxy: &Stickless, cookies: &[String]) -> Vec<Option<u64>> {
    let mut out = Vec::new();
    for cookie in cookies {
        let mut http = Http::with_jar();
        let end = Instant::now() + Duration::from_secs(20);
        let value = loop {
            http.sid = Some(cookie.clone());
            match http
                .try_get_replying(&proxy.url("/"), &[], Duration::from_secs(5))
                .await
            {
                Ok(r) if r.status == 200 => {
                    let seen = r.seen();
                    break (seen.header("x-session") == Some("active")).then(|| {
                        seen.fields()
                            .get("n")
                            .map_or(0, |n| n.parse().expect("a counter"))
                    });
                }
                other => {
                    assert!(
                        Instant::now() < end,
                        "the final read keeps failing: {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        out.push(value);
    }
    out
}

/// Each user's counter `n` as stored on the server on `port` (`None` when the session is not
/// there): what survived, whichever server stickless talks to.
pub fn counters_on(port: u16, cookies: &[String]) -> Vec<Option<u64>> {
    cookies
        .iter()
        .map(|c| {
            let key = format!("stickless:{}", id_of(c));
            let hash: BTreeMap<String, String> =
                query(port, redis::cmd("HGETALL").arg(&key)).expect("HGETALL");
            (!hash.is_empty()).then(|| hash.get("n").map_or(0, |n| n.parse().expect("a counter")))
        })
        .collect()
}

/// Logs `count` users in through `proxy` and returns their session cookies.
pub async fn log_in_users(proxy: &Stickless, count: usize) -> Vec<String> {
    let mut cookies = Vec::new();
    for i in 0..count {
        let r = Http::with_jar()
            .get_replying(
                &proxy.url("/login"),
                &[&format!("x-session-set-user: user{i}")],
            )
            .await;
        assert_eq!(r.status, 200, "login: {}", r.text());
        cookies.push(r.sid().expect("login sets the session cookie"));
    }
    cookies
}

/// The settings the Sentinel and cluster failover drills share.
pub mod drill {
    use std::time::Duration;

    /// Users, each with a request in flight at every moment.
    pub const USERS: usize = 24;
    /// Each request's bound on the client side: past it the request counts as hung.
    pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
    /// The bound on recovery that the drills assert; the goal is under 5 s.
    pub const RECOVERY_LIMIT: Duration = Duration::from_secs(15);
}

/// The session id in a cookie value (`<id>.<tag>`), and so the Redis key suffix.
pub fn id_of(cookie: &str) -> &str {
    cookie.split('.').next().unwrap()
}

impl Http {
    /// GET `url` with the jar's cookie, the whole exchange (body included) bounded by `limit`:
    /// `None` when it took longer or the connection failed, so that a load test can count hung
    /// requests instead of stopping at the first.
    pub async fn get_within(&mut self, url: &str, limit: Duration) -> Option<Reply> {
        let mut req = Request::builder().method(Method::GET).uri(url);
        if let Some(cookie) = self.cookie_header() {
            req = req.header("cookie", cookie);
        }
        let req = req.body(Full::new(Bytes::new())).expect("valid request");
        let exchange = async {
            let resp = self.client.request(req).await.ok()?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.ok()?.to_bytes();
            Some(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(limit, exchange).await.ok().flatten()
    }
}

// ---------------------------------------------------------------------------------------------
// Topologies: a replicated pair, a Sentinel group, a cluster.
// ---------------------------------------------------------------------------------------------

/// One command on a loopback server through a short-lived blocking connection, for fixture work
/// that polls; `None` on any error (not up yet, not ready yet).
pub fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Option<T> {
    query_as(port, None, cmd)
}

/// [`query`] on a server that requires `password`.
pub fn query_as<T: redis::FromRedisValue>(
    port: u16,
    password: Option<&str>,
    cmd: &redis::Cmd,
) -> Option<T> {
    let auth = password.map_or(String::new(), |p| format!(":{p}@"));
    let client = redis::Client::open(format!("redis://{auth}127.0.0.1:{port}")).ok()?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    cmd.query(&mut conn).ok()
}

/// The `field:value` lines of `INFO <section>`.
pub fn info(port: u16, section: &str) -> BTreeMap<String, String> {
    info_as(port, None, section)
}

/// [`info`] on a server that requires `password`.
pub fn info_as(port: u16, password: Option<&str>, section: &str) -> BTreeMap<String, String> {
    query_as::<String>(port, password, redis::cmd("INFO").arg(section))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Whether every replica of the primary on `port` has acknowledged all of its writes. Writes
/// made before this returns true survive a failover to any of its replicas.
pub fn replicated(port: u16, replicas: usize) -> bool {
    let info = info(port, "replication");
    let Some(offset) = info.get("master_repl_offset") else {
        return false;
    };
    let acked = (0..replicas)
        .filter(|i| {
            info.get(&format!("slave{i}")).is_some_and(|s| {
                s.contains("state=online") && s.contains(&format!("offset={offset},"))
            })
        })
        .count();
    acked == replicas
}

/// A primary and one replica.
pub struct ReplicatedPair {
    pub primary: RedisServer,
    pub replica: RedisServer,
}

impl ReplicatedPair {
    /// Starts both and waits until the replica is in sync.
    pub fn start() -> Self {
        Self::start_with_password(None)
    }

    /// Like [`ReplicatedPair::start`], both servers requiring `password` (and using it to
    /// replicate from each other, whichever is the primary).
    pub fn start_with_password(password: Option<&str>) -> Self {
        let auth: Vec<&str> = password
            .map(|p| vec!["--requirepass", p, "--masterauth", p])
            .unwrap_or_default();
        let primary = RedisServer::start_with(&auth);
        let primary_port = primary.port.to_string();
        let mut args = vec!["--replicaof", "127.0.0.1", &primary_port];
        args.extend(&auth);
        let replica = RedisServer::start_with(&args);
        wait_for("the replica's first sync", Duration::from_secs(20), || {
            (info_as(replica.port, password, "replication")
                .get("master_link_status")
                .map(String::as_str)
                == Some("up"))
            .then_some(())
        });
        ReplicatedPair { primary, replica }
    }
}

/// A `redis-server --sentinel` process on a free loopback port, killed on drop.
pub struct SentinelServer {
    child: Child,
    pub port: u16,
    /// What the sentinel requires of its clients (and of the other sentinels).
    password: Option<String>,
    dir: TempDir,
}

/// The passwords of a Sentinel group: the data nodes', and the sentinels' own.
#[derive(Debug, Clone, Copy, Default)]
pub struct GroupPasswords<'a> {
    pub data: Option<&'a str>,
    pub sentinels: Option<&'a str>,
}

impl SentinelServer {
    /// Starts a sentinel watching `primary_port` as `service`.
    fn start(service: &str, primary_port: u16, quorum: usize, auth: GroupPasswords) -> Self {
        for _ in 0..5 {
            if let Some(s) = Self::try_start(service, primary_port, quorum, auth) {
                return s;
            }
        }
        panic!("could not start a sentinel");
    }

    fn try_start(
        service: &str,
        primary_port: u16,
        quorum: usize,
        auth: GroupPasswords,
    ) -> Option<Self> {
        blocking(|| {
            let dir = TempDir::new("sentinel");
            let port = free_port();
            let mut conf = format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\nloglevel warning\n\
                 dir {dir}\n\
                 sentinel monitor {service} 127.0.0.1 {primary_port} {quorum}\n\
                 sentinel down-after-milliseconds {service} 1000\n\
                 sentinel failover-timeout {service} 5000\n\
                 sentinel parallel-syncs {service} 1\n",
                dir = dir.path.display(),
            );
            // A failover promotes with REPLICAOF (SLAVEOF before Redis 7.2 / Valkey) and saves
            // the new roles with CONFIG REWRITE: the sentinels are the harness, so they get the
            // private names.
            for c in ["CONFIG", "SLAVEOF", "REPLICAOF"] {
                conf.push_str(&format!(
                    "sentinel rename-command {service} {c} {}\n",
                    private_name(c)
                ));
            }
            if let Some(p) = auth.data {
                conf.push_str(&format!("sentinel auth-pass {service} {p}\n"));
            }
            if let Some(p) = auth.sentinels {
                conf.push_str(&format!("requirepass {p}\nsentinel sentinel-pass {p}\n"));
            }
            let path = dir.path.join("sentinel.conf");
            std::fs::write(&path, conf).expect("the sentinel's config");
            let mut child = Command::new(redis_server_binary())
                .arg(&path)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("a sentinel starts");
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if ping(port) {
                    let password = auth.sentinels.map(str::to_owned);
                    return Some(SentinelServer {
                        child,
                        port,
                        password,
                        dir,
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
            None
        })
    }

    /// `SENTINEL MASTER <service>` as a map.
    pub fn primary_state(&self, service: &str) -> BTreeMap<String, String> {
        let flat: Vec<String> = query_as(
            self.port,
            self.password.as_deref(),
            redis::cmd("SENTINEL").arg("MASTER").arg(service),
        )
        .unwrap_or_default();
        flat.chunks(2)
            .filter_map(|kv| Some((kv.first()?.clone(), kv.get(1)?.clone())))
            .collect()
    }

    /// The port of the primary this sentinel currently names.
    pub fn primary_port(&self, service: &str) -> Option<u16> {
        let addr: Vec<String> = query_as(
            self.port,
            self.password.as_deref(),
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(service),
        )?;
        addr.get(1)?.parse().ok()
    }
}

impl Drop for SentinelServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A primary, one replica and three sentinels (quorum 2) that fail over a second after the
/// primary stops answering.
pub struct SentinelGroup {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<SentinelServer>,
    data_password: Option<String>,
}

impl SentinelGroup {
    /// The service name the sentinels know the primary by.
    pub const SERVICE: &'static str = "mymaster";

    /// `SENTINEL FAILOVER`, waited for until the old primary is demoted.
    pub fn switchover(&self) {
        let ok: String = query(
            self.sentinels[0].port,
            redis::cmd("SENTINEL").arg("FAILOVER").arg(Self::SERVICE),
        )
        .expect("SENTINEL FAILOVER");
        assert_eq!(ok, "OK");
        let (replica, old) = (self.replica.port, self.primary.port);
        wait_for("the switchover", Duration::from_secs(15), || {
            (self.primary_port() == Some(replica)).then_some(())
        });
        // The sentinels demote the old primary only after announcing the new one.
        wait_for(
            "the old primary's demotion",
            Duration::from_secs(15),
            || {
                (info(old, "replication").get("role").map(String::as_str) == Some("slave"))
                    .then_some(())
            },
        );
    }

    /// Starts the group and waits until every sentinel knows the replica and the other two
    /// sentinels, so that a failover can happen.
    pub fn start() -> Self {
        Self::start_with_passwords(GroupPasswords::default())
    }

    /// Like [`SentinelGroup::start`], with passwords on the data nodes, the sentinels or both.
    pub fn start_with_passwords(auth: GroupPasswords) -> Self {
        let ReplicatedPair { primary, replica } = ReplicatedPair::start_with_password(auth.data);
        let sentinels: Vec<_> = (0..3)
            .map(|_| SentinelServer::start(Self::SERVICE, primary.port, 2, auth))
            .collect();
        wait_for(
            "sentinels that can fail over",
            Duration::from_secs(30),
            || {
                sentinels
                    .iter()
                    .all(|s| {
                        let m = s.primary_state(Self::SERVICE);
                        m.get("num-slaves").map(String::as_str) == Some("1")
                            && m.get("num-other-sentinels").map(String::as_str) == Some("2")
                            && m.get("flags").map(String::as_str) == Some("master")
                    })
                    .then_some(())
            },
        );
        SentinelGroup {
            primary,
            replica,
            sentinels,
            data_password: auth.data.map(str::to_owned),
        }
    }

    /// `redis-sentinel://` URL naming every sentinel, with the passwords.
    pub fn url(&self) -> String {
        let auth = self
            .data_password
            .as_ref()
            .map_or(String::new(), |p| format!(":{p}@"));
        let mut url = format!(
            "redis-sentinel://{auth}127.0.0.1:{}?sentinelServiceName={}",
            self.sentinels[0].port,
            Self::SERVICE
        );
        for s in &self.sentinels[1..] {
            url.push_str(&format!("&node=127.0.0.1:{}", s.port));
        }
        if let Some(p) = &self.sentinels[0].password {
            url.push_str(&format!("&sentinelPassword={p}"));
        }
        url
    }

    /// The primary's port according to a majority of the sentinels.
    pub fn primary_port(&self) -> Option<u16> {
        let ports: Vec<u16> = self
            .sentinels
            .iter()
            .filter_map(|s| s.primary_port(Self::SERVICE))
            .collect();
        ports
            .iter()
            .copied()
            .find(|p| ports.iter().filter(|q| *q == p).count() >= 2)
    }
}

/// Three primaries and three replicas in cluster mode, on loopback, with a node timeout of one
/// second.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts six nodes, gives each primary a third of the slots, joins them, makes nodes 3-5 the
    /// replicas of 0-2, and waits until every node says `cluster_state:ok` and every replica is
    /// in sync.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                ])
            })
            .collect();
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        let run = |port: u16, cmd: &redis::Cmd| -> redis::Value {
            query(port, cmd).unwrap_or_else(|| panic!("{cmd:?} on :{port}"))
        };
        let ids: Vec<String> = ports
            .iter()
            .map(|&p| query(p, redis::cmd("CLUSTER").arg("MYID")).expect("CLUSTER MYID"))
            .collect();
        for (i, &p) in ports.iter().enumerate() {
            // Distinct epochs from the start spare the nodes a round of collision handling.
            run(p, redis::cmd("CLUSTER").arg("SET-CONFIG-EPOCH").arg(i + 1));
        }
        for (i, range) in [(0, 5460), (5461, 10922), (10923, 16383)]
            .iter()
            .enumerate()
        {
            run(
                ports[i],
                redis::cmd("CLUSTER")
                    .arg("ADDSLOTSRANGE")
                    .arg(range.0)
                    .arg(range.1),
            );
        }
        for &p in &ports[1..] {
            run(
                ports[0],
                redis::cmd("CLUSTER").arg("MEET").arg("127.0.0.1").arg(p),
            );
        }
        wait_for(
            "every node to know the others",
            Duration::from_secs(30),
            || {
                ports
                    .iter()
                    .all(|&p| {
                        let nodes: String =
                            query(p, redis::cmd("CLUSTER").arg("NODES")).unwrap_or_default();
                        nodes.lines().count() == 6 && !nodes.contains("handshake")
                    })
                    .then_some(())
            },
        );
        for r in 3..6 {
            run(
                ports[r],
                redis::cmd("CLUSTER").arg("REPLICATE").arg(&ids[r - 3]),
            );
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_ok(Duration::from_secs(30));
        wait_for("the replicas' first sync", Duration::from_secs(30), || {
            ports[0..3].iter().all(|&p| replicated(p, 1)).then_some(())
        });
        cluster
    }

    /// Waits until every live node says `cluster_state:ok` and agrees on three primaries that
    /// are all alive.
    pub fn wait_ok(&self, deadline: Duration) {
        wait_for("cluster_state:ok", deadline, || {
            let live: Vec<u16> = self
                .nodes
                .iter()
                .map(|n| n.port)
                .filter(|&p| ping(p))
                .collect();
            live.iter()
                .all(|&p| {
                    let state =
                        query::<String>(p, redis::cmd("CLUSTER").arg("INFO")).unwrap_or_default();
                    state.contains("cluster_state:ok")
                        && self.primaries_seen_by(p).iter().all(|q| live.contains(q))
                })
                .then_some(())
        });
    }

    /// The primaries that hold slots, as the node on `port` sees them.
    fn primaries_seen_by(&self, port: u16) -> Vec<u16> {
        let nodes: String = query(port, redis::cmd("CLUSTER").arg("NODES")).unwrap_or_default();
        nodes
            .lines()
            .filter(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                f.len() > 8 && f[2].contains("master") && !f[2].contains("fail")
            })
            .filter_map(|l| {
                let addr = l.split(' ').nth(1)?;
                addr.split(['@', ','])
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// The ports of the live nodes that are primaries now, by their own account.
    pub fn primaries(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .map(|n| n.port)
            .filter(|&p| info(p, "replication").get("role").map(String::as_str) == Some("master"))
            .collect()
    }

    /// The port of a live replica of the primary on `primary`.
    pub fn replica_of(&self, primary: u16) -> Option<u16> {
        self.nodes.iter().map(|n| n.port).find(|&p| {
            let info = info(p, "replication");
            info.get("role").map(String::as_str) == Some("slave")
                && info.get("master_port").map(String::as_str) == Some(&primary.to_string())
        })
    }

    /// `CLUSTER FAILOVER` on the replica of the primary on `victim`, waited for: the replica
    /// takes over the shard and the old primary becomes its replica.
    pub fn switchover(&self, victim: u16) {
        let replica = self.replica_of(victim).expect("the primary's replica");
        let ok: String =
            query(replica, redis::cmd("CLUSTER").arg("FAILOVER")).expect("CLUSTER FAILOVER");
        assert_eq!(ok, "OK");
        wait_for("the switchover", Duration::from_secs(10), || {
            (!self.primaries().contains(&victim)).then_some(())
        });
    }

    /// The node on `port`.
    pub fn node(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of this cluster")
    }

    /// `redis-cluster://` URL naming every node, as a configuration endpoint would resolve.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port);
        for (i, n) in self.nodes[1..].iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", n.port));
        }
        url
    }

    /// The keys matching `pattern` on each primary (the harness's KEYS).
    pub fn keys_by_primary(&self, pattern: &str) -> BTreeMap<u16, Vec<String>> {
        self.primaries()
            .into_iter()
            .map(|p| {
                let keys: Vec<String> =
                    query(p, private_cmd("KEYS").arg(pattern)).expect("KEYS on a primary");
                (p, keys)
            })
            .collect()
    }

    /// Whether every primary's replica has acknowledged all of its writes.
    pub fn replicated(&self) -> bool {
        self.primaries().iter().all(|&p| replicated(p, 1))
    }
}
