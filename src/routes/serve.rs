//! The HTTP listener: an accept loop of our own around hyper's HTTP/1 connections, since
//! `axum::serve` bounds nothing. Open connections are capped below the file-descriptor limit, so
//! the process never runs out of descriptors for its database and clients; at the cap the
//! longest-idle connection is closed to make room, or, with none idle, new connections wait in
//! the listen backlog. Each connection runs with the deadlines of [`super::connection`]. On
//! shutdown the listener closes, requests in flight get `shutdown_grace` to finish, and whatever
//! is still open then is dropped.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::connection::{millis_since, Activity, Timeouts, TrackedIo, TrackedService};
use crate::config::Limits;

/// File descriptors kept out of the connection cap: sled's files, the runs' runtime, the
/// outbox's and Kubernetes' clients, the Alertmanager poller, a connection held while the cap
/// is full.
const FD_RESERVE: u64 = 128;

/// Largest buffer hyper keeps per connection (its default is ~400 KiB). Headers must fit; a
/// thousand connections cannot pin 400 MB between them.
const MAX_CONNECTION_BUFFER: usize = 64 * 1024;

/// How often a listener waiting at the cap looks for a connection that became idle.
const IDLE_RECHECK: Duration = Duration::from_millis(250);

/// Pause after an accept error such as EMFILE, so the loop does not spin while it lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Raises the soft limit on open files to the hard limit, where the hard limit allows more, and
/// returns the soft limit in force afterwards (`None`: unlimited).
pub fn raise_nofile_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = match (limit.current, limit.maximum) {
        (Some(soft), hard) if hard.is_none_or(|h| h > soft) => {
            let wanted = Rlimit {
                current: hard,
                maximum: hard,
            };
            match setrlimit(Resource::Nofile, wanted) {
                Ok(()) => hard,
                Err(e) => {
                    tracing::warn!(error = %e, soft, hard = ?hard, "cannot raise the open-files limit");
                    Some(soft)
                }
            }
        }
        (soft, _) => soft,
    };
    tracing::debug!(before = ?limit.current, after = ?raised, "open-files limit");
    raised
}

/// The soft limit on open files now (`None`: unlimited).
fn nofile_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Connections served at once: the configured most, and [`FD_RESERVE`] below the open-files
/// limit (half of it, when the limit is that small); at least one.
fn connection_cap(configured: usize, nofile: Option<u64>) -> usize {
    let by_fds = nofile.map_or(u64::MAX, |n| n - FD_RESERVE.min(n / 2));
    let by_fds = usize::try_from(by_fds).unwrap_or(usize::MAX);
    configured.min(by_fds).max(1)
}

/// Serves `router` on `listener` until `shutdown` fires, then drains open connections for up to
/// `limits.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &Limits,
    shutdown: CancellationToken,
) {
    let nofile = nofile_limit();
    let cap = connection_cap(limits.max_connections, nofile);
    tracing::info!(
        max_connections = cap,
        configured = limits.max_connections,
        open_files_limit = ?nofile,
        "connection cap"
    );
    let mut http = http1::Builder::new();
    // The connection's own IO keeps the header deadline (see `connection`): hyper's would also
    // cut a kept-alive connection at rest.
    http.keep_alive(true)
        .header_read_timeout(None)
        .max_buf_size(MAX_CONNECTION_BUFFER);
    let timeouts = Timeouts {
        idle: limits.idle_timeout,
        header_read: limits.header_read_timeout,
    };
    let open = Arc::new(Connections::new());
    let permits = Arc::new(Semaphore::new(cap));
    let tracker = TaskTracker::new();
    let abandon = CancellationToken::new();
    let sweeping = CancellationToken::new();
    let sweeper = tokio::spawn(sweep(Arc::clone(&open), timeouts, sweeping.clone()));
    let mut full = FullEpisode::default();
    let mut accept_failing = false;
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    accept_failing = false;
                    stream
                }
                Err(e) => {
                    if !is_connection_error(&e) {
                        // Once per streak: EMFILE could otherwise log ten lines a second.
                        if !std::mem::replace(&mut accept_failing, true) {
                            tracing::warn!(error = %e, "accept failed; retrying");
                        }
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        }
                    }
                    continue;
                }
            },
        };
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => {
                full.end();
                permit
            }
            Err(_) => {
                let admitted = tokio::select! {
                    _ = shutdown.cancelled() => None,
                    permit = make_room(&open, &permits, cap, &mut full) => Some(permit),
                };
                match admitted {
                    Some(permit) => permit,
                    None => break,
                }
            }
        };
        let (id, activity) = open.add();
        let connection = serve_connection(
            http.clone(),
            stream,
            router.clone(),
            Arc::clone(&activity),
            shutdown.clone(),
            abandon.clone(),
        );
        let open = Arc::clone(&open);
        tracker.spawn(async move {
            connection.await;
            open.remove(id);
            drop::<OwnedSemaphorePermit>(permit);
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(limits.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            grace = ?limits.shutdown_grace,
            "connections still open after the shutdown grace; closing them"
        );
        abandon.cancel();
        tracker.wait().await;
    }
    sweeping.cancel();
    let _ = sweeper.await;
}

/// How often the sweep looks for connections past their deadlines: a tenth of the shorter
/// deadline, between 10 and 250 ms, so a deadline is kept to within a tenth or a quarter second.
fn sweep_every(timeouts: &Timeouts) -> Duration {
    (timeouts.idle.min(timeouts.header_read) / 10)
        .clamp(Duration::from_millis(10), Duration::from_millis(250))
}

/// Closes connections past their deadlines (see [`Activity::overdue`]) until `stop`. One timer
/// for all connections, instead of one per request on the hot path.
async fn sweep(open: Arc<Connections>, timeouts: Timeouts, stop: CancellationToken) {
    let mut tick = tokio::time::interval(sweep_every(&timeouts));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => open.close_overdue(&timeouts),
        }
    }
}

/// A permit for one more connection when the cap is reached: closes the longest-idle connection
/// and takes its permit, or, with none idle, waits for a connection to end or become idle.
async fn make_room(
    open: &Connections,
    permits: &Arc<Semaphore>,
    cap: usize,
    full: &mut FullEpisode,
) -> OwnedSemaphorePermit {
    let closing = open.close_idlest();
    full.hit(cap, closing);
    loop {
        // A closed connection's permit comes back at once; without one, look for a connection
        // that has finished its request now and then.
        let recheck = if closing { Duration::MAX } else { IDLE_RECHECK };
        tokio::select! {
            permit = Arc::clone(permits).acquire_owned() => {
                return permit.expect("the semaphore is never closed");
            }
            _ = tokio::time::sleep(recheck) => {
                if open.close_idlest() {
                    full.closed_idle += 1;
                    let permit = Arc::clone(permits).acquire_owned().await;
                    return permit.expect("the semaphore is never closed");
                }
            }
        }
    }
}

/// Serves one connection until it ends, is closed to make room, or shutdown: then its request
/// in flight finishes unless `abandon` fires first.
async fn serve_connection(
    http: http1::Builder,
    stream: TcpStream,
    router: Router,
    activity: Arc<Activity>,
    shutdown: CancellationToken,
    abandon: CancellationToken,
) {
    let io = TokioIo::new(TrackedIo::new(stream, Arc::clone(&activity)));
    let connection = http.serve_connection(io, TrackedService::new(router, Arc::clone(&activity)));
    let mut connection = std::pin::pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        _ = activity.closed() => return,
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                ended = connection.as_mut() => ended,
                _ = abandon.cancelled() => return,
            }
        }
    };
    // Timeouts and clients going away end connections every day: not worth more than debug.
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended");
    }
}

/// Errors of one connection that `accept` reports; the listener itself is fine.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The open connections, for closing the longest-idle one when the cap is reached.
struct Connections {
    epoch: Instant,
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
}

impl Connections {
    fn new() -> Connections {
        Connections {
            epoch: Instant::now(),
            next: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn add(&self) -> (u64, Arc<Activity>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let activity = Activity::new(self.epoch);
        self.lock().insert(id, Arc::clone(&activity));
        (id, activity)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Closes every connection past one of its deadlines.
    fn close_overdue(&self, timeouts: &Timeouts) {
        let now = millis_since(self.epoch);
        for activity in self.lock().values() {
            if let Some(why) = activity.overdue(now, timeouts) {
                tracing::debug!(reason = why, "closing a connection");
                activity.close();
            }
        }
    }

    /// Closes the connection idle longest; false when none is idle.
    fn close_idlest(&self) -> bool {
        let open = self.lock();
        let idlest = open
            .values()
            .filter_map(|a| Some((a.idle_since()?, a)))
            .min_by_key(|(since, _)| *since);
        match idlest {
            Some((_, activity)) => {
                activity.close();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Activity>>> {
        // The map stays consistent whatever panicked while holding it.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A stretch of time at the connection cap, logged once when it starts and once when it ends.
#[derive(Default)]
struct FullEpisode {
    since: Option<Instant>,
    closed_idle: u64,
    waited: u64,
}

impl FullEpisode {
    fn hit(&mut self, cap: usize, closed_idle: bool) {
        if self.since.is_none() {
            self.since = Some(Instant::now());
            tracing::warn!(
                max_connections = cap,
                "connection cap reached: closing the longest-idle connection for each new one, \
                 new connections wait when none is idle"
            );
        }
        if closed_idle {
            self.closed_idle += 1;
        } else {
            self.waited += 1;
        }
    }

    fn end(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                lasted = ?since.elapsed(),
                closed_idle = self.closed_idle,
                waited = self.waited,
                "below the connection cap again"
            );
            *self = FullEpisode::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_stays_below_the_open_files_limit() {
        assert_eq!(connection_cap(1024, Some(1024)), 896);
        assert_eq!(connection_cap(1024, Some(65_536)), 1024);
        assert_eq!(connection_cap(1024, None), 1024);
        assert_eq!(connection_cap(1024, Some(200)), 100);
        assert_eq!(connection_cap(0, Some(1024)), 1);
        assert_eq!(connection_cap(50, Some(1)), 1);
    }
}
