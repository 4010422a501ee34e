//! The accept loop of `garret serve`: HTTP/1 and h2c gRPC on one port, with
//! the connection-level bounds a public cache needs.
//!
//! axum's own `serve` has none of them: a client that opens a socket and
//! sends nothing, or half a request head, holds a file descriptor forever,
//! and one such connection also blocks a graceful stop. Here every
//! connection is watched:
//!
//! - a request head must arrive within `header_read_timeout` (hyper's own
//!   timer, which also runs while an HTTP/1 connection waits for its next
//!   request);
//! - a connection with no request in flight for `keepalive_idle` is closed,
//!   whatever protocol it speaks, which also covers clients that never
//!   finish the first bytes hyper needs to tell HTTP/1 from HTTP/2;
//! - a connection with requests in flight but no bytes moving either way
//!   for the body idle timeout is dropped (a stalled upload or a reader
//!   that stopped reading);
//! - HTTP/2 pings find peers that vanished;
//! - at most `max_connections` at once, clamped to the file-descriptor
//!   limit, so the process never runs out of descriptors for its database
//!   and storage;
//! - on shutdown every connection is asked to finish and the whole stop is
//!   bounded by `shutdown_timeout`.
//!
//! Request bodies carry their own idle and total timeouts (see
//! `http::body`); this module only bounds what happens between requests.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use tracing::Instrument as _;

use crate::config::Connections;
use crate::metrics::Metrics;
use crate::request_log::RequestLog;

/// How long a connection asked to stop gracefully (idle, or at shutdown)
/// may take to do so before it is dropped.
const GRACEFUL_CLOSE: Duration = Duration::from_secs(5);

/// Descriptors kept free of connections for the database pool, storage
/// clients and logs.
const RESERVED_FDS: u64 = 256;

/// HTTP/2 streams one connection may run at once (Bazel opens a few
/// hundred at most; hyper's default is unbounded).
const MAX_CONCURRENT_STREAMS: u32 = 256;

/// The bounds `serve` applies, from `Connections` plus the body idle time.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    pub header_read_timeout: Duration,
    pub keepalive_idle: Duration,
    pub h2_keepalive_interval: Duration,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
    /// A connection with requests in flight and no traffic this long is
    /// dropped: twice the idle bound request bodies have, so a handler's
    /// own clear 408 always comes first and this only catches what no
    /// handler watches (a client that stopped reading its response).
    pub stalled_timeout: Duration,
}

impl ServeLimits {
    pub fn new(connections: &Connections, body_idle_timeout: Duration) -> Self {
        Self {
            header_read_timeout: Duration::from_secs(connections.header_read_timeout_secs),
            keepalive_idle: Duration::from_secs(connections.keepalive_idle_secs),
            h2_keepalive_interval: Duration::from_secs(connections.h2_keepalive_interval_secs),
            max_connections: connections.max_connections,
            shutdown_timeout: Duration::from_secs(connections.shutdown_timeout_secs),
            stalled_timeout: body_idle_timeout.saturating_mul(2),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets requests
/// in flight finish for at most `limits.shutdown_timeout`. Every request is
/// logged and counted in `metrics`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    metrics: Metrics,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()>,
) {
    let max_connections = connection_budget(limits.max_connections);
    let permits = Arc::new(Semaphore::new(max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let builder = builder(&limits);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // Reap finished connection tasks so the set stays small.
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the
                    // idle bounds free descriptors soon.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let app = app.clone();
        let metrics = metrics.clone();
        let stop = stop_rx.clone();
        connections.spawn(async move {
            serve_connection(&builder, stream, app, metrics, limits, stop).await;
            tracing::trace!(%peer, "connection closed");
            drop(permit);
        });
    }
    drop(listener);
    let open = connections.len();
    tracing::info!(
        connections = open,
        "shutting down: no new connections, finishing in-flight requests"
    );
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "requests still in flight after the shutdown timeout; dropping them"
        );
        connections.shutdown().await;
    }
}

fn builder(limits: &ServeLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.h2_keepalive_interval)
        .keep_alive_timeout(limits.h2_keepalive_interval)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    builder
}

/// `wanted`, clamped to the descriptors this process may open after
/// raising its soft limit to the hard one.
fn connection_budget(wanted: usize) -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::debug!(error = %e, "could not raise the file-descriptor limit");
        }
        limit = getrlimit(Resource::Nofile);
    }
    let Some(fds) = limit.current else {
        return wanted;
    };
    let budget = usize::try_from(fds.saturating_sub(RESERVED_FDS).max(16)).unwrap_or(usize::MAX);
    if budget < wanted {
        tracing::warn!(
            wanted,
            budget,
            file_descriptors = fds,
            "max_connections lowered to fit the file-descriptor limit"
        );
    }
    wanted.min(budget)
}

/// One connection, from its first byte until it is closed: by the client,
/// by an idle or stalled bound, or by shutdown.
async fn serve_connection(
    builder: &auto::Builder<TokioExecutor>,
    stream: TcpStream,
    app: Router,
    metrics: Metrics,
    limits: ServeLimits,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: Arc::clone(&activity),
    });
    let service = TrackedService {
        app,
        metrics,
        activity: Arc::clone(&activity),
    };
    let connection = builder.serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    let reason = tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            return;
        }
        reason = activity.expired(&limits) => reason,
        _ = stop.wait_for(|stop| *stop) => "shutdown",
    };
    tracing::debug!(reason, "closing connection");
    if reason == "stalled" {
        return;
    }
    connection.as_mut().graceful_shutdown();
    let grace = if reason == "shutdown" {
        limits.shutdown_timeout
    } else {
        GRACEFUL_CLOSE
    };
    let _ = tokio::time::timeout(grace, connection).await;
}

/// What a connection is doing: requests in flight and when bytes last
/// moved or the last request ended, in milliseconds since `start`.
#[derive(Debug)]
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    last_io_ms: AtomicU64,
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_io_ms: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_io_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// Resolves when the connection has been idle (no request in flight)
    /// for `keepalive_idle`, or stalled (requests in flight, no traffic)
    /// for `stalled_timeout`; says which.
    async fn expired(&self, limits: &ServeLimits) -> &'static str {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        loop {
            let now = self.now_ms();
            let (since, bound, reason) = if self.in_flight.load(Ordering::Acquire) == 0 {
                let since = self.idle_since_ms.load(Ordering::Relaxed);
                (since, ms(limits.keepalive_idle), "idle")
            } else {
                let since = self.last_io_ms.load(Ordering::Relaxed);
                (since, ms(limits.stalled_timeout), "stalled")
            };
            let deadline = since.saturating_add(bound);
            if now >= deadline {
                return reason;
            }
            // Wake at least every keep-alive period: a connection whose
            // requests end while it sleeps on the longer stalled bound
            // must still close on time once idle.
            let nap = (deadline - now).min(ms(limits.keepalive_idle));
            tokio::time::sleep(Duration::from_millis(nap)).await;
        }
    }
}

/// Held while a request is in flight, from its head until its response
/// body is sent (or dropped).
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .idle_since_ms
            .store(activity.now_ms(), Ordering::Relaxed);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The socket, noting when bytes move.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The router, counting each request in flight until its response body
/// has been sent.
#[derive(Clone)]
struct TrackedService {
    app: Router,
    metrics: Metrics,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for TrackedService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.enter();
        let (mut log, request) = RequestLog::start(request, self.metrics.clone());
        let span = log.span().clone();
        let mut app = self.app.clone();
        let handled = log.scope(tower_service::Service::call(&mut app, request));
        Box::pin(
            async move {
                let response = handled.await?;
                log.responded(&response);
                Ok(response.map(|body| TrackedBody {
                    inner: body,
                    log,
                    _in_flight: in_flight,
                }))
            }
            .instrument(span),
        )
    }
}

/// A response body that keeps its request counted as in flight and logs
/// it once sent.
struct TrackedBody {
    inner: Body,
    log: RequestLog,
    _in_flight: InFlight,
}

impl HttpBody for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            self.log.sent(frame);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
