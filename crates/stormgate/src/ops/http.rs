//! The HTTP server of the operations endpoint: hyper's HTTP/1.1 on the `ops-http` thread's
//! current-thread runtime, every connection in a task of its own, routed by [`respond`].

use std::cell::Cell;
use std::convert::Infallible;
use std::fmt::{self, Write as _};
use std::net::TcpListener;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use stormgate_telemetry::LogLimiter;
use tracing::warn;

use super::OpsState;
use super::metrics::{self, Format};

/// Longest request head (request line and headers) the endpoint reads (hyper's smallest
/// buffer limit); a longer one is answered 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a connection may last, request and answer together: a client that does not take
/// its answer is closed then.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections served at once; more are closed as soon as they are accepted. Far above
/// what scrapers and probes open, far below the process's descriptors.
pub const MAX_CONNECTIONS: usize = 512;

/// Accepts connections until `stopped`, each served by a task of its own (on this thread's
/// `LocalSet`).
pub(super) async fn serve(
    listener: TcpListener,
    state: Arc<OpsState>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let errors = Rc::new(LogLimiter::new(Duration::from_secs(10)));
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(error) => {
            warn!(%error, "operations endpoint: cannot serve its listener");
            return;
        }
    };
    // Built once; its collector reads the shards at every scrape.
    let registry = Rc::new(metrics::registry(Arc::clone(&state)));
    let open = Rc::new(Cell::new(0usize));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stopped => return,
        };
        match accepted {
            Ok((stream, _)) => {
                if open.get() >= MAX_CONNECTIONS {
                    drop(stream);
                    continue;
                }
                open.set(open.get() + 1);
                let (state, registry) = (Arc::clone(&state), Rc::clone(&registry));
                let (open, errors) = (Rc::clone(&open), Rc::clone(&errors));
                tokio::task::spawn_local(async move {
                    serve_connection(stream, state, registry, &errors).await;
                    open.set(open.get() - 1);
                });
            }
            Err(error) => {
                // Out of descriptors, most likely: back off instead of spinning on it.
                if let Some(suppressed) = errors.allow(Instant::now()) {
                    warn!(%error, suppressed, "operations endpoint: accept failed");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Serves one connection: one request, one response, close; all within
/// [`CONNECTION_TIMEOUT`].
async fn serve_connection(
    stream: tokio::net::TcpStream,
    state: Arc<OpsState>,
    registry: Rc<Registry>,
    errors: &LogLimiter,
) {
    let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
        let accept = request.headers().get(hyper::header::ACCEPT);
        let response = respond(
            request.method().as_str(),
            request.uri().path(),
            accept.and_then(|a| a.to_str().ok()),
            &state,
            &registry,
        );
        async move { Ok::<_, Infallible>(response.into_hyper()) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(IO_TIMEOUT)
        .keep_alive(false)
        // Header names as the former server wrote them (and as scripts may grep for them).
        .title_case_headers(true)
        .max_buf_size(MAX_REQUEST_BYTES)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
        Ok(Err(error)) if !quiet(&error) => {
            if let Some(suppressed) = errors.allow(Instant::now()) {
                warn!(%error, suppressed, "operations endpoint: request failed");
            }
        }
        _ => {}
    }
}

/// Connection errors not worth a warning: a TCP-only probe that connects and leaves, a
/// client that stalls until the header timeout.
fn quiet(error: &hyper::Error) -> bool {
    error.is_incomplete_message() || error.is_timeout() || error.is_closed()
}

/// The response to `method path`; `accept` (the request's `Accept`) chooses the format of
/// `/metrics`.
fn respond(
    method: &str,
    path: &str,
    accept: Option<&str>,
    state: &OpsState,
    registry: &Registry,
) -> Response {
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return Response::text(404, "not found: try /metrics, /healthz or /readyz\n");
    }
    if method != "GET" {
        return Response::text(405, "only GET\n").header("Allow", "GET");
    }
    match path {
        "/metrics" => {
            let format = Format::negotiate(accept);
            match metrics::render(registry, format) {
                Ok(body) => Response {
                    status: 200,
                    content_type: format.content_type(),
                    extra: None,
                    body,
                },
                // Only a value the format cannot carry (a gauge over i64::MAX) gets here.
                Err(fmt::Error) => Response::text(500, "cannot encode the metrics\n"),
            }
        }
        "/healthz" => match state.liveness(Instant::now()) {
            Ok(()) => Response::text(200, "ok\n"),
            Err(reasons) => Response::text(503, &format!("not alive: {reasons}\n")),
        },
        _ => match state.readiness() {
            Ok(()) => {
                let mut body = String::from("ready\n");
                for note in state.readiness_notes() {
                    let _ = writeln!(body, "note: {note}");
                }
                Response::text(200, &body)
            }
            Err(reasons) => Response::text(503, &format!("not ready: {reasons}\n")),
        },
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    extra: Option<(&'static str, &'static str)>,
    body: String,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            extra: None,
            body: body.to_owned(),
        }
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Response {
        self.extra = Some((name, value));
        self
    }

    fn into_hyper(self) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
        let mut response = hyper::Response::builder()
            .status(self.status)
            .header("Content-Type", self.content_type)
            .header("Cache-Control", "no-store")
            .header("Connection", "close");
        if let Some((name, value)) = self.extra {
            response = response.header(name, value);
        }
        response
            .body(http_body_util::Full::new(hyper::body::Bytes::from(
                self.body,
            )))
            .expect("static header names and values are valid")
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::super::Ops;
    use super::super::tests::state;
    use super::*;

    /// Sends `request` as is to a running endpoint and returns the whole answer ("" when the
    /// server closed without one).
    fn exchange(addr: SocketAddr, request: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn requests_are_routed() {
        let (s, metrics) = state(Vec::new());
        let listener = Ops::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let ops = Ops::start(s, Some(listener), Duration::ZERO).unwrap();
        let status = |request: &str| {
            let out = exchange(addr, request);
            out.split_whitespace()
                .nth(1)
                .map_or(0, |c| c.parse().unwrap())
        };
        assert_eq!(status("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
        assert_eq!(status("GET /healthz HTTP/1.0\r\n\r\n"), 200);
        assert_eq!(status("GET /readyz?verbose=1 HTTP/1.1\r\n\r\n"), 200);
        assert_eq!(status("GET /nope HTTP/1.1\r\n\r\n"), 404);
        assert_eq!(status("POST /metrics HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status("HEAD /healthz HTTP/1.1\r\n\r\n"), 405);
        assert_ne!(status("GET /metrics SPDY/3\r\n\r\n"), 200);
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
            "x".repeat(MAX_REQUEST_BYTES)
        );
        assert_eq!(status(&huge), 431);
        let out = exchange(addr, "PUT /readyz HTTP/1.1\r\n\r\n");
        assert!(
            out.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{out}"
        );
        assert!(out.contains("\r\nAllow: GET\r\n"), "{out}");
        assert!(out.contains("\r\nConnection: close\r\n"), "{out}");
        assert!(out.contains("\r\nCache-Control: no-store\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nonly GET\n"), "{out}");
        let out = exchange(addr, "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(
            out.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{out}"
        );
        let out = exchange(
            addr,
            "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
        );
        assert!(
            out.contains(
                "\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
            ),
            "{out}"
        );
        assert!(out.ends_with("\n# EOF\n"), "{out}");
        // A shard whose last tick is 11 s old.
        let long_ago = Instant::now().checked_sub(Duration::from_secs(11));
        if let Some(at) = long_ago {
            metrics[1].heartbeat.beat_at(at);
            let out = exchange(addr, "GET /healthz HTTP/1.1\r\n\r\n");
            assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
            assert!(
                out.contains("\r\n\r\nnot alive: shard 1: no progress for "),
                "{out}"
            );
        }
        ops.stop();
    }
}
