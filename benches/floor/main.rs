//! `hyper-floor`: the least a hyper proxy can do. It forwards every request to one upstream
//! with the same stack nimgate runs on (hyper-util's auto server, its pooled legacy client over
//! HTTP/1.1, a current-thread tokio runtime, mimalloc) and nothing else: no auth, no limits, no
//! routing, no body peek. The harness runs it beside nimgate (`--floor`) so that the report
//! separates what nimgate's own work costs from what the HTTP stack costs.
//!
//! Usage: `hyper-floor LISTEN=UPSTREAM...`, e.g. `hyper-floor 127.0.0.1:9000=127.0.0.1:8000`.

use std::net::SocketAddr;
use std::process::ExitCode;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut pairs = Vec::new();
    for arg in std::env::args().skip(1) {
        let parsed = arg.split_once('=').and_then(|(l, u)| Some((l.parse::<SocketAddr>().ok()?, u.parse().ok()?)));
        match parsed {
            Some(pair) => pairs.push(pair),
            None => {
                eprintln!("hyper-floor: expected LISTEN=UPSTREAM (socket addresses), got `{arg}`");
                return ExitCode::FAILURE;
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    match runtime.map_err(|e| e.to_string()).and_then(|rt| rt.block_on(serve(pairs))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hyper-floor: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(pairs: Vec<(SocketAddr, SocketAddr)>) -> Result<(), String> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new()).build(connector);
    for (listen, upstream) in pairs {
        let listener = TcpListener::bind(listen).await.map_err(|e| format!("{listen}: {e}"))?;
        let client = client.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                let client = client.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |mut request: Request<Incoming>| {
                        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
                        *request.uri_mut() =
                            Uri::try_from(format!("http://{upstream}{path}")).unwrap_or_else(|_| Uri::from_static("/"));
                        client.request(request)
                    });
                    let _ =
                        auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
    }
    // Serves until killed.
    std::future::pending::<()>().await;
    Ok(())
}
