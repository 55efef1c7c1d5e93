//! One HTTP connection's clock. hyper's own header timer starts when it begins waiting for a
//! request, so it cannot tell a keep-alive connection at rest from a client sending its headers a
//! byte at a time; here the connection's IO and its service share an [`Activity`] instead: the IO
//! sees bytes, the service sees requests start and end, and each move notes the time. The
//! listener's sweep ([`super::serve`]) closes a connection with no request in progress that sent
//! nothing for `idle_timeout`, one whose request headers took longer than `header_read_timeout`
//! from their first byte, and one whose response the client has not read for `idle_timeout`; and
//! it closes the longest-idle connection when the listener is full. No timer is armed per
//! request: the hot path only stores the phase and the time.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// How long a connection may stay silent, and how long a request's headers may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub idle: Duration,
    pub header_read: Duration,
}

/// Where a connection is between and within requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// No request in progress and the last response on the wire: may be closed to make room.
    Idle = 0,
    /// A request's first bytes arrived; its headers are not complete.
    Head = 1,
    /// The service is handling a request (and reading its body, under its own deadline).
    Busy = 2,
    /// The service answered; hyper is still writing the response.
    Responding = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Idle,
            1 => Phase::Head,
            2 => Phase::Busy,
            _ => Phase::Responding,
        }
    }
}

/// What the listener knows of one open connection.
#[derive(Debug)]
pub struct Activity {
    phase: AtomicU8,
    /// When the connection entered its phase, in milliseconds since `epoch`.
    since_ms: AtomicU64,
    epoch: Instant,
    close: CancellationToken,
}

impl Activity {
    /// A connection just accepted: idle from now.
    pub fn new(epoch: Instant) -> Arc<Activity> {
        Arc::new(Activity {
            phase: AtomicU8::new(Phase::Idle as u8),
            since_ms: AtomicU64::new(millis_since(epoch)),
            epoch,
            close: CancellationToken::new(),
        })
    }

    fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// The service's moves, into `Busy` and `Responding`.
    fn set(&self, phase: Phase) {
        self.since_ms
            .store(millis_since(self.epoch), Ordering::Release);
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Moves `from` to `to` unless the other side moved the phase first.
    fn advance(&self, from: Phase, to: Phase) {
        if self
            .phase
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.since_ms
                .store(millis_since(self.epoch), Ordering::Release);
        }
    }

    /// Since when this connection has been idle, when it is and has not been closed already.
    pub fn idle_since(&self) -> Option<u64> {
        (self.phase() == Phase::Idle && !self.close.is_cancelled())
            .then(|| self.since_ms.load(Ordering::Acquire))
    }

    /// Which deadline this connection has passed at `now_ms` (milliseconds since its epoch), if
    /// any: silent while idle, headers too slow, or a response the client does not read. A
    /// request being handled has its own deadline (the body's), so it is never overdue here.
    pub fn overdue(&self, now_ms: u64, timeouts: &Timeouts) -> Option<&'static str> {
        let phase = self.phase();
        let age = now_ms.saturating_sub(self.since_ms.load(Ordering::Acquire));
        let (limit, why) = match phase {
            Phase::Idle => (timeouts.idle, "idle_timeout: no request on this connection"),
            Phase::Head => (
                timeouts.header_read,
                "header_read_timeout: request headers incomplete",
            ),
            Phase::Responding => (timeouts.idle, "idle_timeout: the client reads nothing"),
            Phase::Busy => return None,
        };
        (u128::from(age) > limit.as_millis()).then_some(why)
    }

    /// Asks the connection's task to drop it.
    pub fn close(&self) {
        self.close.cancel();
    }

    pub async fn closed(&self) {
        self.close.cancelled().await
    }
}

/// Milliseconds from `epoch` to now.
pub fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The socket, telling the connection's [`Activity`] when a request's first byte arrives and
/// when its response is on the wire.
pub struct TrackedIo {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl TrackedIo {
    pub fn new(stream: TcpStream, activity: Arc<Activity>) -> TrackedIo {
        TrackedIo { stream, activity }
    }
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.stream).poll_read(cx, buf);
        // A request begins: its headers are due within header_read_timeout. Trickled bytes do
        // not move the phase again, so they do not extend that deadline.
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.advance(Phase::Idle, Phase::Head);
        }
        res
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.stream).poll_flush(cx);
        // hyper flushes its socket only once its own buffer is written out: the response is on
        // the wire, so the connection is at rest until the next request.
        if let Poll::Ready(Ok(())) = res {
            this.activity.advance(Phase::Responding, Phase::Idle);
        }
        res
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The router, telling the connection's [`Activity`] when a request starts and is answered.
#[derive(Clone)]
pub struct TrackedService {
    router: TowerToHyperService<Router>,
    activity: Arc<Activity>,
}

impl TrackedService {
    pub fn new(router: Router, activity: Arc<Activity>) -> TrackedService {
        TrackedService {
            router: TowerToHyperService::new(router),
            activity,
        }
    }
}

impl Service<hyper::Request<Incoming>> for TrackedService {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        self.activity.set(Phase::Busy);
        let answer = self.router.call(req);
        let activity = Arc::clone(&self.activity);
        Box::pin(async move {
            let response = answer.await;
            activity.set(Phase::Responding);
            response
        })
    }
}
