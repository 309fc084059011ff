//! Test fixtures: real `redis-server` processes on free loopback ports, an in-process test backend,
//! the `stickless` binary as a real process, and a small HTTP client with a cookie jar. Everything
//! started here is stopped when its handle drops.

#![allow(dead_code)]

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
                if ping(port) {
                    return Some(RedisServer { child, port, dir });
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

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
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
        let url = redis.url();
        let mut all = vec!["--redis-url", &url, "--secret-keys", TEST_KEY];
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
        let field = |name: &str| -> SocketAddr {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
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

    /// The `sid` cookie set by this response: `Some("")` when it clears it.
    pub fn sid(&self) -> Option<String> {
        self.set_cookies().iter().find_map(|c| {
            let (pair, _) = c.split_once(';').unwrap_or((c, ""));
            pair.strip_prefix("sid=").map(str::to_owned)
        })
    }
}

/// A small HTTP/1.1 client with a one-cookie jar for `sid`.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    pub sid: Option<String>,
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
            keep_cookies: false,
        }
    }

    /// A client that keeps the `sid` cookie like a browser.
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
        if let Some(sid) = self.sid.as_ref().filter(|_| self.keep_cookies) {
            req = req.header("cookie", format!("sid={sid}"));
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
        if self.keep_cookies {
            if let Some(sid) = reply.sid() {
                self.sid = (!sid.is_empty()).then_some(sid);
            }
        }
        reply
    }
}

/// The session id in a cookie value (`<id>.<tag>`), and so the Redis key suffix.
pub fn id_of(cookie: &str) -> &str {
    cookie.split('.').next().unwrap()
}
