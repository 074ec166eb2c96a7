//! The integration tests' tailscale-rs node: it joins the tailnet of <control-url> with
//! <auth-key> as <hostname> and serves a small site on its tailnet IPv4, port 80:
//!
//! - `GET /index.html`: a page naming tailscale-rs;
//! - `GET /assets/index.css`: its style sheet;
//! - `POST /count`: `{"count":N}`, N counting the earlier POSTs (state kept across
//!   connections);
//! - `GET /`: `tsrs <caller address>`, so a caller can tell its request crossed the tailnet.
//!
//! Usage: tsrs-axum <control-url> <auth-key> <key-file> <hostname>
//! Logs go to stderr at the level in TSRS_LOG (error, warn, info, debug, trace; default info).

use std::{
    error::Error,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::{
    Router,
    extract::{ConnectInfo, State, connect_info::Connected},
    http::header::CONTENT_TYPE,
    routing::{get, post},
    serve::IncomingStream,
};
use tailscale::{Config, Device};
use tracing_subscriber::filter::LevelFilter;

const INDEX: &str = "<!doctype html>\n<html><head><title>tailscale-rs node</title>\
<link rel=\"stylesheet\" href=\"/assets/index.css\"></head>\n\
<body><h1>Served by tailscale-rs over the tailnet</h1></body></html>\n";
const CSS: &str = "body { font-family: sans-serif; margin: 2em; }\n";

/// The caller's address as the tailnet listener accepted it (axum only knows how to take it
/// from its own TCP listener).
#[derive(Clone)]
struct Caller(SocketAddr);

impl Connected<IncomingStream<'_, tailscale::axum::Listener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, tailscale::axum::Listener>) -> Self {
        Caller(*stream.remote_addr())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let level = std::env::var("TSRS_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();

    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        return Err("usage: tsrs-axum <control-url> <auth-key> <key-file> <hostname>".into());
    }
    let mut config = Config::default_with_key_file(&args[3]).await?;
    config.control_server_url = url::Url::parse(&args[1])?;
    config.requested_hostname = Some(args[4].clone());
    let dev = Device::new(&config, Some(args[2].clone())).await?;
    if let tailscale::AuthState::NotAuthorized(url) = dev.is_authorized().await? {
        return Err(format!("not authorized: {url}").into());
    }
    let listener = dev.tcp_listen((dev.ipv4_addr().await?, 80).into()).await?;
    println!("TSRS_LISTENING {}", listener.local_addr());

    let counter = Arc::new(AtomicU64::new(0));
    let router = Router::new()
        .route(
            "/",
            get(|ConnectInfo(Caller(peer)): ConnectInfo<Caller>| async move {
                format!("tsrs {}", peer.ip())
            }),
        )
        .route("/index.html", get(|| async { ([(CONTENT_TYPE, "text/html")], INDEX) }))
        .route("/assets/index.css", get(|| async { ([(CONTENT_TYPE, "text/css")], CSS) }))
        .route(
            "/count",
            post(|State(counter): State<Arc<AtomicU64>>| async move {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                ([(CONTENT_TYPE, "application/json")], format!("{{\"count\":{n}}}\n"))
            }),
        )
        .with_state(counter);
    axum::serve(
        tailscale::axum::Listener::from(listener),
        router.into_make_service_with_connect_info::<Caller>(),
    )
    .await?;
    Ok(())
}
