//! The `stickless` binary: parses flags into a [`Config`], binds the listeners, and hands them to
//! the library. Bad flags exit with status 2 and a message that names the flag.

mod cli;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;

use cli::{Cli, Command, DemoArgs, ServeArgs};
use stickless::config::{AccessLog, Config, LogFormat, StoreConfig, Upstream};
use stickless::log_writer::{batched_stderr, Flusher};
use stickless::tls::Tls;

/// Keeps the log writer thread running; [`flush_logs`] drops it, which writes out what is queued.
static LOG_WRITER: Mutex<Option<Flusher>> = Mutex::new(None);

fn main() -> ExitCode {
    // Purge freed memory back to the system in the background (after jemalloc's dirty decay),
    // also while the process is idle.
    let _ = tikv_jemalloc_ctl::background_thread::write(true);
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Serve(args)) => init_tracing(args.log_format, args.access_log),
        None => init_tracing(cli.serve.log_format, cli.serve.access_log),
        Some(_) => init_tracing(LogFormat::Text, AccessLog::On),
    }
    let workers = match &cli.command {
        Some(Command::Serve(args)) => args.worker_count(),
        None => cli.serve.worker_count(),
        Some(_) => 1,
    };
    // With workers, each serves the proxy on a runtime of its own and this one on the main
    // thread: the admin listener, the store's tasks, the signals, and the first worker.
    let mut runtime = if workers > 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            flush_logs();
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Some(Command::GenKey) => {
            println!("{}", stickless::cookie::generate_key());
            Ok(())
        }
        Some(Command::Demo(args)) => runtime.block_on(demo(args)),
        Some(Command::Serve(args)) => runtime.block_on(serve(args)),
        None => runtime.block_on(serve(cli.serve)),
    };
    drop(runtime);
    flush_logs();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes out the log lines still queued and stops the writer thread: called once, on the way
/// out; lines logged afterwards are lost.
fn flush_logs() {
    let guard = LOG_WRITER.lock().map(|mut g| g.take()).unwrap_or_default();
    drop(guard);
}

/// Exits with `code` once the queued log lines are written, so that they come before the error
/// message that follows and are not lost with the process.
fn exit(code: i32, message: std::fmt::Arguments) -> ! {
    flush_logs();
    eprintln!("{message}");
    std::process::exit(code);
}

/// Logs to stderr (journald, a container's log) in `format`, filtered by `RUST_LOG` (default
/// `info`); `--access-log off` turns the access lines off whatever `RUST_LOG` says.
///
/// Lines are written by their own thread, in batches, off the request path: a request only
/// appends its line to a buffer in memory ([`stickless::log_writer`]).
fn init_tracing(format: LogFormat, access_log: AccessLog) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if access_log == AccessLog::Off {
        if let Ok(off) = format!("{}=off", stickless::access_log::TARGET).parse() {
            filter = filter.add_directive(off);
        }
    }
    let (writer, guard) = batched_stderr();
    if let Ok(mut slot) = LOG_WRITER.lock() {
        *slot = Some(guard);
    }
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // The event's fields at the top level beside `message`; the request's span (peer,
        // method, path, request id) under `span` for the events logged while serving it.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// Raises the soft limit on open files to the hard limit, and returns the limit in force.
///
/// Every client connection is a file descriptor (two while it is being proxied); distributions
/// start services with a soft limit as low as 1024, far below what a proxy needs, while the hard
/// limit is usually much higher. `None` when the limit cannot be read.
fn raise_fd_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::debug!(limit, "open-file limit");
            Some(limit)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit; keeping the default connection cap");
            None
        }
    }
}

/// Turns flags into a config, exiting with status 2 and the flag's name when they do not make one.
fn config_or_exit(args: ServeArgs) -> Config {
    match args.into_config(std::env::var("REDIS_URL").ok(), raise_fd_limit()) {
        Ok(c) => c,
        Err(e) => exit(
            2,
            format_args!(
                "error: invalid value for '{}': {}\n\nFor more information, try 'stickless --help'.",
                e.flag, e.message
            ),
        ),
    }
}

async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (set by {flag}); is another process using it? choose another address with {flag}"))
}

/// Binds one of the `--workers` listening sockets on `addr`: each worker has its own, and
/// `SO_REUSEPORT` lets them share the port (the kernel spreads connections over them).
fn bind_shared(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let context = || {
        format!("cannot listen on {addr} (set by --listen) with SO_REUSEPORT for --workers; is another process using it? choose another address with --listen")
    };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .with_context(context)?;
    socket.set_reuseaddr(true).with_context(context)?;
    socket.set_reuseport(true).with_context(context)?;
    socket.bind(addr).with_context(context)?;
    // tokio's own backlog for `TcpListener::bind`.
    socket.listen(1024).with_context(context)
}

/// Reads the TLS certificate and key when the configuration has them, exiting with status 2 and
/// the flag's name when they cannot be used.
fn tls_or_exit(config: &Config) -> Option<Arc<Tls>> {
    let files = config.tls()?;
    match Tls::load(files) {
        Ok(tls) => {
            let cert = tls.summary();
            tracing::info!(
                fingerprint_sha256 = %cert.fingerprint,
                chain = cert.chain_len,
                "TLS on the proxy's listener; SIGHUP reloads the certificate"
            );
            Some(Arc::new(tls))
        }
        Err(e) => exit(
            2,
            format_args!("error: invalid value for '--{}': {e}", e.setting()),
        ),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // SIGHUP is taken over before anything that can take time (TLS files, IAM credentials, the
    // first Redis connection): by default it would end the process.
    let hangups = stickless::tls::hangups();
    stickless::notify::starting();
    let config = config_or_exit(args);
    let tls = tls_or_exit(&config);
    let (listener, workers) = if config.workers > 1 {
        let first = bind_shared(config.listen)?;
        // The port the first one got, for the others to share when --listen asked for any port.
        let port = first.local_addr()?;
        let mut workers = Vec::with_capacity(config.workers - 1);
        for _ in 1..config.workers {
            let listener = bind_shared(port)?;
            workers.push(
                listener
                    .into_std()
                    .context("cannot hand a listener to a worker")?,
            );
        }
        (first, workers)
    } else {
        (bind(config.listen, "--listen").await?, Vec::new())
    };
    let admin = bind(config.admin_listen, "--admin-listen").await?;
    let store = match stickless::server::build_store(&config).await {
        Ok(store) => store,
        Err(e) => exit(
            2,
            format_args!("error: invalid value for '--{}': {e}", e.setting()),
        ),
    };
    let kind = match &config.store {
        StoreConfig::Memory => {
            tracing::warn!(
                "no --redis-url (or REDIS_URL): sessions are kept in this process's memory, local to this \
                 instance and lost when it stops; set --redis-url to share them between instances"
            );
            "memory"
        }
        StoreConfig::Redis { .. } => "redis",
    };
    tracing::info!(
        listen = %listener.local_addr()?,
        admin = %admin.local_addr()?,
        upstream = %config.upstream.authority,
        store = kind,
        max_connections = config.connection_cap(),
        workers = config.workers,
        tls = tls.is_some(),
        "stickless ready"
    );
    tokio::spawn(stickless::tls::reload_on_hangup(hangups, tls.clone()));
    stickless::server::serve_proxy(
        config,
        store,
        listener,
        workers,
        tls,
        admin,
        stickless::shutdown::Shutdown::on_signals(),
    )
    .await;
    Ok(())
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let backend = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot start the demo backend")?;
    let backend_addr = backend.local_addr()?;
    let mut serve_args = Cli::parse_from(["stickless"]).serve;
    serve_args.listen = args.listen;
    serve_args.admin_listen = args.admin_listen;
    serve_args.upstream =
        Upstream::parse(&format!("http://{backend_addr}")).map_err(anyhow::Error::msg)?;
    serve_args.redis_url = None;
    serve_args.secret_keys = None;
    let config = config_or_exit(serve_args);
    let listener = bind(config.listen, "--listen").await?;
    let admin = bind(config.admin_listen, "--admin-listen").await?;
    let store = stickless::server::build_store(&config).await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let backend_task = tokio::spawn(stickless::demo::serve_app(backend, async {
        let _ = stop_rx.await;
    }));
    tracing::info!(listen = %addr, admin = %admin.local_addr()?, "stickless demo ready");
    println!("stickless demo: open http://{addr}/ in a browser (sessions on the embedded store; Ctrl-C stops)");
    println!("metrics: http://{}/metrics", admin.local_addr()?);
    stickless::server::serve_proxy(
        config,
        store,
        listener,
        Vec::new(),
        None,
        admin,
        stickless::shutdown::Shutdown::on_signals(),
    )
    .await;
    let _ = stop_tx.send(());
    let _ = backend_task.await;
    Ok(())
}
