//! What reactor knows of its own health, shared by the parts that report it and those that read
//! it: the accepted alerts not yet started ([`Backlog`]), whether the dispatcher runs, the
//! watchdog's latest self-check report and when Alertmanager last accepted the heartbeat. The
//! watchdog writes the report; `/readyz`, `/metrics` and the engine read or feed it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;

use crate::metrics::Metrics;

/// The self-checks, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    Dispatcher,
    StuckRuns,
    Storage,
    EscalationBacklog,
    EscalationRejected,
}

impl Check {
    pub const ALL: [Check; 5] = [
        Check::Dispatcher,
        Check::StuckRuns,
        Check::Storage,
        Check::EscalationBacklog,
        Check::EscalationRejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Check::Dispatcher => "dispatcher",
            Check::StuckRuns => "stuck_runs",
            Check::Storage => "storage",
            Check::EscalationBacklog => "escalation_backlog",
            Check::EscalationRejected => "escalation_rejected",
        }
    }

    /// Whether a failure means alerts are not being remediated, so the heartbeat is withheld and
    /// the humans get the original alerts. Pages that wait or were refused do not stop
    /// remediation.
    pub fn stops_remediation(self) -> bool {
        !matches!(self, Check::EscalationBacklog | Check::EscalationRejected)
    }
}

/// Accepted alerts not yet started, and when the queue last made progress.
pub struct Backlog {
    depth: Gauge,
    origin: Instant,
    /// Milliseconds since `origin` of the last run start, or of the queue becoming non-empty.
    progress_ms: AtomicU64,
}

impl Backlog {
    pub fn new(depth: Gauge) -> Self {
        Backlog {
            depth,
            origin: Instant::now(),
            progress_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.progress_ms
            .store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// `n` alerts were accepted and queued.
    pub fn added(&self, n: usize) {
        if self.depth.inc_by(n as i64) <= 0 {
            self.touch();
        }
    }

    /// A queued alert got a worker.
    pub fn started(&self) {
        self.depth.dec();
        self.touch();
    }

    pub fn depth(&self) -> i64 {
        self.depth.get()
    }

    /// How long alerts have waited with no run starting; `None` when nothing waits.
    pub fn stalled_for(&self) -> Option<Duration> {
        if self.depth() <= 0 {
            return None;
        }
        let since = Duration::from_millis(self.progress_ms.load(Ordering::Relaxed));
        Some(self.origin.elapsed().saturating_sub(since))
    }
}

/// One check's latest result, as `/readyz` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What the watchdog knows, shared with `/readyz` and `/metrics`.
pub struct Health {
    pub backlog: Backlog,
    dispatcher_alive: AtomicBool,
    report: Mutex<BTreeMap<Check, CheckResult>>,
    origin: Instant,
    /// Milliseconds since `origin` when Alertmanager last accepted the heartbeat; -1: never.
    heartbeat_ok_ms: AtomicI64,
    /// The dead man's switch: the always-firing alert to expect, and milliseconds since `origin`
    /// when it last arrived (0: since start).
    deadman: std::sync::OnceLock<String>,
    deadman_seen_ms: AtomicI64,
}

impl Health {
    pub fn new(metrics: &Metrics) -> Self {
        Health {
            backlog: Backlog::new(metrics.queue_depth.clone()),
            dispatcher_alive: AtomicBool::new(false),
            report: Mutex::new(BTreeMap::new()),
            origin: Instant::now(),
            heartbeat_ok_ms: AtomicI64::new(-1),
            deadman: std::sync::OnceLock::new(),
            deadman_seen_ms: AtomicI64::new(0),
        }
    }

    /// Sets the dead man's switch's alertname (once, at start).
    pub fn expect_deadman(&self, alertname: &str) {
        let _ = self.deadman.set(alertname.to_owned());
    }

    /// A firing alert named `alertname` arrived: notes it when it is the dead man's switch.
    pub fn alert_seen(&self, alertname: &str) {
        if self.deadman.get().is_some_and(|d| d == alertname) {
            self.deadman_seen_ms
                .store(self.origin.elapsed().as_millis() as i64, Ordering::Relaxed);
        }
    }

    /// Time since the dead man's switch alert last arrived (since start when it never did);
    /// `None` when no switch is configured.
    pub fn deadman_age(&self) -> Option<Duration> {
        self.deadman.get()?;
        let seen = self.deadman_seen_ms.load(Ordering::Relaxed).max(0) as u64;
        Some(
            self.origin
                .elapsed()
                .saturating_sub(Duration::from_millis(seen)),
        )
    }

    /// Marks the dispatcher running until the returned guard drops (also on panic).
    pub fn dispatcher_running(self: &Arc<Self>) -> DispatcherGuard {
        self.dispatcher_alive.store(true, Ordering::Relaxed);
        DispatcherGuard(Arc::clone(self))
    }

    /// The latest report; `None` before the first round of checks.
    pub fn report(&self) -> BTreeMap<Check, CheckResult> {
        self.report.lock().unwrap().clone()
    }

    /// Whether the dispatcher task is running.
    pub fn dispatcher_alive(&self) -> bool {
        self.dispatcher_alive.load(Ordering::Relaxed)
    }

    /// Replaces the report with the watchdog's latest round.
    pub fn set_report(&self, report: BTreeMap<Check, CheckResult>) {
        *self.report.lock().unwrap_or_else(|p| p.into_inner()) = report;
    }

    /// Alertmanager accepted the heartbeat just now.
    pub fn heartbeat_accepted(&self) {
        self.heartbeat_ok_ms
            .store(self.origin.elapsed().as_millis() as i64, Ordering::Relaxed);
    }

    /// Time since Alertmanager last accepted the heartbeat (since start when it never did).
    pub fn heartbeat_age(&self) -> Duration {
        let ok = self.heartbeat_ok_ms.load(Ordering::Relaxed).max(0) as u64;
        self.origin
            .elapsed()
            .saturating_sub(Duration::from_millis(ok))
    }
}

pub struct DispatcherGuard(Arc<Health>);

impl Drop for DispatcherGuard {
    fn drop(&mut self) {
        self.0.dispatcher_alive.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_stalls_only_while_alerts_wait() {
        let b = Backlog::new(Gauge::default());
        assert_eq!(b.stalled_for(), None);
        b.added(2);
        assert!(b.stalled_for().unwrap() < Duration::from_secs(1));
        b.started();
        b.started();
        assert_eq!(b.stalled_for(), None);
        assert_eq!(b.depth(), 0);
    }
}
