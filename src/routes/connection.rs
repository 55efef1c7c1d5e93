//! One HTTP connection's clock. hyper's own header timer starts when it begins waiting for a
//! request, so it cannot tell a keep-alive connection at rest from a client sending its headers a
//! byte at a time; here the connection's IO and its service share an [`Activity`] instead: the IO
//! sees bytes, the service sees requests start and end. From that, a connection with no request
//! in progress that sends nothing for `idle_timeout` is closed, a request's headers must arrive
//! within `header_read_timeout` of its first byte, and a response the client stops reading for
//! `idle_timeout` is abandoned. The listener closes the longest-idle connection when it is full.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
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
    /// When the connection last became idle, in milliseconds since `epoch`.
    idle_since_ms: AtomicU64,
    epoch: Instant,
    close: CancellationToken,
}

impl Activity {
    /// A connection just accepted: idle from now.
    pub fn new(epoch: Instant) -> Arc<Activity> {
        Arc::new(Activity {
            phase: AtomicU8::new(Phase::Idle as u8),
            idle_since_ms: AtomicU64::new(epoch.elapsed().as_millis() as u64),
            epoch,
            close: CancellationToken::new(),
        })
    }

    fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// The service's moves, into `Busy` and `Responding`.
    fn set(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Moves `from` to `to` unless the other side moved the phase first; true if it moved.
    fn advance(&self, from: Phase, to: Phase) -> bool {
        let moved = self
            .phase
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if moved && to == Phase::Idle {
            let ms = self.epoch.elapsed().as_millis() as u64;
            self.idle_since_ms.store(ms, Ordering::Release);
        }
        moved
    }

    /// Since when this connection has been idle, when it is and has not been closed already.
    pub fn idle_since(&self) -> Option<u64> {
        (self.phase() == Phase::Idle && !self.close.is_cancelled())
            .then(|| self.idle_since_ms.load(Ordering::Acquire))
    }

    /// Asks the connection's task to drop it.
    pub fn close(&self) {
        self.close.cancel();
    }

    pub async fn closed(&self) {
        self.close.cancelled().await
    }
}

/// The socket with the connection's deadlines: reads fail with `TimedOut` when the connection
/// stays silent while idle or its headers take too long; writes when the client reads nothing.
pub struct TimedIo {
    stream: TcpStream,
    activity: Arc<Activity>,
    timeouts: Timeouts,
    read_deadline: Option<(Phase, Pin<Box<Sleep>>)>,
    write_deadline: Option<Pin<Box<Sleep>>>,
}

impl TimedIo {
    pub fn new(stream: TcpStream, activity: Arc<Activity>, timeouts: Timeouts) -> TimedIo {
        TimedIo {
            stream,
            activity,
            timeouts,
            read_deadline: None,
            write_deadline: None,
        }
    }

    /// The read deadline for `phase`, started now unless one for that phase is running.
    fn read_deadline(&mut self, phase: Phase) -> &mut Pin<Box<Sleep>> {
        let limit = match phase {
            Phase::Head => self.timeouts.header_read,
            _ => self.timeouts.idle,
        };
        if self.read_deadline.as_ref().map(|(p, _)| *p) != Some(phase) {
            self.read_deadline = Some((phase, Box::pin(tokio::time::sleep(limit))));
        }
        &mut self.read_deadline.as_mut().expect("set above").1
    }
}

fn timed_out(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

impl AsyncRead for TimedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let phase = this.activity.phase();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    match phase {
                        // A request begins: its headers are due within header_read_timeout.
                        Phase::Idle => {
                            if this.activity.advance(Phase::Idle, Phase::Head) {
                                this.read_deadline(Phase::Head);
                            }
                        }
                        // Trickled bytes do not extend the headers' deadline.
                        Phase::Head => {}
                        Phase::Busy | Phase::Responding => this.read_deadline = None,
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match phase {
                // The body's deadline is the handler's; a response being written is the
                // write side's.
                Phase::Busy | Phase::Responding => {
                    this.read_deadline = None;
                    Poll::Pending
                }
                Phase::Idle | Phase::Head => {
                    ready!(this.read_deadline(phase).as_mut().poll(cx));
                    Poll::Ready(Err(timed_out(if phase == Phase::Idle {
                        "idle_timeout: no request on this connection"
                    } else {
                        "header_read_timeout: request headers incomplete"
                    })))
                }
            },
        }
    }
}

impl TimedIo {
    /// Passes a write's outcome through, failing it when no byte could be written for
    /// `idle_timeout`: a client that stops reading cannot hold the connection.
    fn watch_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        res: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if res.is_ready() {
            self.write_deadline = None;
            return res;
        }
        let idle = self.timeouts.idle;
        let deadline = self
            .write_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        ready!(deadline.as_mut().poll(cx));
        Poll::Ready(Err(timed_out("idle_timeout: the client reads nothing")))
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.watch_write(cx, res)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.watch_write(cx, res)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.stream).poll_flush(cx);
        // hyper flushes its socket only once its own buffer is written out: the response is on
        // the wire, so the connection is at rest until the next request. hyper may have polled
        // the read side already in this turn, without a deadline: have it poll again.
        if let Poll::Ready(Ok(())) = res {
            if this.activity.advance(Phase::Responding, Phase::Idle) {
                cx.waker().wake_by_ref();
            }
        }
        this.watch_write(cx, res)
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
