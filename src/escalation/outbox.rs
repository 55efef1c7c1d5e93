//! The durable escalation outbox. A page is stored before anything is sent, keyed by the run that
//! raised it, so one run can never enqueue two pages. One sender task delivers due entries,
//! retrying with backoff (capped at a minute) for as long as Alertmanager is unreachable, across
//! restarts, and records each delivery on its run.
//!
//! Delivery is at-least-once toward Alertmanager: a crash between Alertmanager's 2xx and the
//! durable "delivered" mark re-posts the same alert. Alertmanager treats an alert with the same
//! labels as the same alert, so the humans are not notified twice.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{backoff, Escalator, PostableAlert};
use crate::clock::Clock;
use crate::domain::Fingerprint;
use crate::history::{DeliveryStatus, EscalationRecord, RunId, Store, StoreError};
use crate::metrics::Metrics;

const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    Pending,
    Delivered,
    /// Alertmanager refused it for good (4xx other than 429); retrying cannot help. Nobody was
    /// paged, so the watchdog's `escalation_rejected` check fails for a while; `next_attempt`
    /// holds when it was refused.
    Rejected,
    /// The problem is fixed: the page is to be re-posted with `endsAt` = now.
    Resolving,
    /// Alertmanager accepted the resolved page.
    Resolved,
}

/// One page in the outbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub run: RunId,
    pub page: PostableAlert,
    pub state: EntryState,
    pub attempts: u32,
    pub created: Timestamp,
    pub next_attempt: Timestamp,
    #[serde(default)]
    pub last_error: Option<String>,
    /// The alert the failed run was for: its resolution resolves the page.
    #[serde(default)]
    pub fingerprint: Option<Fingerprint>,
    #[serde(default)]
    pub resolved_at: Option<Timestamp>,
}

impl Entry {
    fn alertname(&self) -> String {
        self.page
            .labels
            .get("alertname")
            .cloned()
            .unwrap_or_default()
    }

    fn record(&self, status: DeliveryStatus, at: Timestamp) -> EscalationRecord {
        EscalationRecord {
            alertname: self.alertname(),
            status,
            attempts: self.attempts,
            at,
            last_error: self.last_error.clone(),
            resolved_at: self.resolved_at,
        }
    }
}

/// What [`Outbox::unsettled`] found.
#[derive(Debug, Default)]
pub struct Unsettled {
    pub pending: Vec<Entry>,
    pub rejected: Vec<Entry>,
}

/// The outbox's sled tree plus a wake-up for the sender.
#[derive(Clone)]
pub struct Outbox {
    tree: sled::Tree,
    /// Index of entries by the fingerprint of their alert (`fingerprint 0x00 run-key`), so
    /// resolving an alert's pages reads only that alert's entries.
    by_alert: sled::Tree,
    store: Store,
    wake: Arc<Notify>,
}

impl Outbox {
    pub fn open(store: &Store) -> Result<Outbox, StoreError> {
        Ok(Outbox {
            tree: store.tree("outbox")?,
            by_alert: store.tree("outbox_by_alert")?,
            store: store.clone(),
            wake: Arc::new(Notify::new()),
        })
    }

    /// Stores a page for `run` unless that run already has one; returns whether it was added.
    /// An entry left under the same run id by a different alert (run ids are never reused, but
    /// an entry from a data directory that predates that must not swallow a new page) is
    /// replaced, not taken for this page. The page is durable when this returns.
    pub async fn enqueue(
        &self,
        run: RunId,
        page: PostableAlert,
        fingerprint: Fingerprint,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let entry = Entry {
            run,
            page,
            state: EntryState::Pending,
            attempts: 0,
            created: now,
            next_attempt: now,
            last_error: None,
            fingerprint: Some(fingerprint),
            resolved_at: None,
        };
        let bytes = serde_json::to_vec(&entry).expect("outbox entry serializes");
        let added = match self.tree.compare_and_swap(
            key(run),
            None as Option<&[u8]>,
            Some(bytes.clone()),
        )? {
            Ok(()) => true,
            Err(existing) => {
                let old = existing
                    .current
                    .and_then(|v| serde_json::from_slice::<Entry>(&v).ok());
                let same_alert = old
                    .as_ref()
                    .is_some_and(|o| o.fingerprint == entry.fingerprint);
                if !same_alert {
                    tracing::warn!(run_id = %run, "an outbox entry of another alert held this run id; replacing it");
                    if let Some(fp) = old.and_then(|o| o.fingerprint) {
                        self.by_alert.remove(index_key(&fp, run))?;
                    }
                    self.tree.insert(key(run), bytes)?;
                }
                !same_alert
            }
        };
        if added {
            if let Some(fp) = &entry.fingerprint {
                self.by_alert.insert(index_key(fp, run), &[])?;
            }
            self.store.history_durable().await?;
            self.wake.notify_one();
        }
        Ok(added)
    }

    pub fn get(&self, run: RunId) -> Result<Option<Entry>, StoreError> {
        Ok(self
            .tree
            .get(key(run))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Entries still waiting for Alertmanager.
    pub fn pending(&self) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.iter() {
            let (_, v) = kv?;
            if let Ok(e) = serde_json::from_slice::<Entry>(&v) {
                if matches!(e.state, EntryState::Pending | EntryState::Resolving) {
                    out.push(e);
                }
            }
        }
        Ok(out)
    }

    /// In one pass over the outbox: the entries still waiting for Alertmanager, and those it
    /// refused at or after `rejected_since`.
    pub fn unsettled(&self, rejected_since: Timestamp) -> Result<Unsettled, StoreError> {
        let mut out = Unsettled::default();
        for kv in self.tree.iter() {
            let (_, v) = kv?;
            let Ok(e) = serde_json::from_slice::<Entry>(&v) else {
                continue;
            };
            match e.state {
                EntryState::Pending | EntryState::Resolving => out.pending.push(e),
                EntryState::Rejected if e.next_attempt >= rejected_since => out.rejected.push(e),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Removes settled entries of runs below `seq` that retention removed (retention).
    pub fn prune_before(&self, seq: u64) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.tree.range(..RunId { seq, index: 0 }.key().to_vec()) {
            let (k, v) = kv?;
            let settled = serde_json::from_slice::<Entry>(&v)
                .ok()
                .filter(|e| e.state != EntryState::Pending);
            let settled = match settled {
                Some(e) if self.store.get_run(e.run)?.is_none() => Some(e),
                _ => None,
            };
            if let Some(e) = settled {
                self.tree.remove(k)?;
                if let Some(fp) = &e.fingerprint {
                    self.by_alert.remove(index_key(fp, e.run))?;
                }
                n += 1;
            }
        }
        Ok(n)
    }

    fn put(&self, e: &Entry) -> Result<(), StoreError> {
        self.tree.insert(
            key(e.run),
            serde_json::to_vec(e).expect("outbox entry serializes"),
        )?;
        Ok(())
    }

    /// Copies a settled entry's state onto its run; a crash can lose that write while the
    /// entry's own state was already durable. Pending entries are the sender's business.
    pub fn sync_run(&self, run: RunId, now: Timestamp) -> Result<(), StoreError> {
        if let Some(e) = self.get(run)? {
            match e.state {
                EntryState::Pending => {}
                EntryState::Delivered => self.record_on_run(&e, DeliveryStatus::Delivered, now)?,
                EntryState::Rejected => self.record_on_run(&e, DeliveryStatus::Failed, now)?,
                EntryState::Resolving | EntryState::Resolved => {
                    self.record_on_run(&e, DeliveryStatus::Delivered, now)?
                }
            }
        }
        Ok(())
    }

    /// The alert behind `fingerprint` resolved, or a later run fixed it: every open page for it
    /// is re-posted with `endsAt` = now, so Alertmanager resolves it. Returns the runs affected.
    pub async fn resolve_for(
        &self,
        fingerprint: &Fingerprint,
        now: Timestamp,
    ) -> Result<Vec<RunId>, StoreError> {
        let mut resolved = Vec::new();
        let prefix = alert_prefix(fingerprint);
        for kv in self.by_alert.scan_prefix(&prefix) {
            let (k, _) = kv?;
            // Whatever this entry's state, it is not open once this pass is over.
            self.by_alert.remove(&k)?;
            let Some(run) = RunId::from_key(&k[prefix.len()..]) else {
                continue;
            };
            let Some(mut e) = self.get(run)? else {
                continue;
            };
            if !matches!(e.state, EntryState::Pending | EntryState::Delivered) {
                continue;
            }
            e.page.ends_at = now;
            e.state = EntryState::Resolving;
            e.attempts = 0;
            e.next_attempt = now;
            self.put(&e)?;
            resolved.push(e.run);
        }
        if !resolved.is_empty() {
            self.store.history_durable().await?;
            self.wake.notify_one();
        }
        Ok(resolved)
    }

    /// Records the delivery state on the run the page belongs to.
    fn record_on_run(
        &self,
        e: &Entry,
        status: DeliveryStatus,
        at: Timestamp,
    ) -> Result<(), StoreError> {
        // Atomically: the notification outbox and the engine write the same run.
        self.store.update_run(e.run, |run| {
            let before = run.escalation.clone();
            run.escalation = Some(e.record(status, at));
            if run.escalation != before {
                match (e.state, status) {
                    (EntryState::Resolved, _) => run.note(at, "escalation resolved"),
                    (_, DeliveryStatus::Delivered) => run.note(at, "escalation delivered"),
                    (_, DeliveryStatus::Failed) => run.note(at, "escalation rejected"),
                    _ => {}
                }
            }
        })?;
        Ok(())
    }
}

fn key(run: RunId) -> [u8; 10] {
    run.key()
}

fn alert_prefix(fingerprint: &Fingerprint) -> Vec<u8> {
    let mut k = Vec::with_capacity(fingerprint.as_str().len() + 11);
    k.extend_from_slice(fingerprint.as_str().as_bytes());
    k.push(0);
    k
}

fn index_key(fingerprint: &Fingerprint, run: RunId) -> Vec<u8> {
    let mut k = alert_prefix(fingerprint);
    k.extend_from_slice(&run.key());
    k
}

/// Delivers due pages until `shutdown`. Owns every POST of a page to Alertmanager.
pub async fn send_loop(
    outbox: Outbox,
    escalator: Escalator,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let base = escalator.settings().retry_backoff;
    loop {
        let next_due = match deliver_due(&outbox, &escalator, clock.as_ref(), &metrics, base).await
        {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "escalation outbox failed; retrying");
                Some(clock.now())
            }
        };
        if !super::wait_for_due(next_due, clock.as_ref(), &outbox.wake, &shutdown).await {
            break;
        }
    }
    tracing::debug!("escalation outbox sender stopped");
}

/// One pass: delivers every due entry; returns when the next pending one is due.
async fn deliver_due(
    outbox: &Outbox,
    escalator: &Escalator,
    clock: &dyn Clock,
    metrics: &Metrics,
    base: Duration,
) -> Result<Option<Timestamp>, StoreError> {
    let mut next: Option<Timestamp> = None;
    for mut e in outbox.pending()? {
        if e.next_attempt > clock.now() {
            next = Some(next.map_or(e.next_attempt, |n| n.min(e.next_attempt)));
            continue;
        }
        e.attempts += 1;
        let alertname = e.alertname();
        let resolving = e.state == EntryState::Resolving;
        match escalator.post_once(&e.page).await {
            Ok(()) if resolving => {
                e.state = EntryState::Resolved;
                e.resolved_at = Some(clock.now());
                outbox.put(&e)?;
                outbox.store.history_durable().await?;
                outbox.record_on_run(&e, DeliveryStatus::Delivered, clock.now())?;
                tracing::info!(run_id = %e.run, %alertname, "page resolved in Alertmanager");
            }
            Ok(()) => {
                e.state = EntryState::Delivered;
                outbox.put(&e)?;
                outbox.store.history_durable().await?;
                outbox.record_on_run(&e, DeliveryStatus::Delivered, clock.now())?;
                metrics.escalation_result("delivered");
                tracing::info!(run_id = %e.run, %alertname, attempts = e.attempts, "escalation delivered to Alertmanager");
            }
            Err((retryable, error)) => {
                e.last_error = Some(error.clone());
                if retryable {
                    let delay = backoff(base, e.attempts, MAX_BACKOFF);
                    e.next_attempt = crate::clock::later(clock.now(), delay);
                    next = Some(next.map_or(e.next_attempt, |n| n.min(e.next_attempt)));
                    outbox.put(&e)?;
                    outbox.record_on_run(&e, DeliveryStatus::Pending, clock.now())?;
                    metrics.escalation_attempts_failed.inc();
                    tracing::warn!(run_id = %e.run, %alertname, attempts = e.attempts, %error, "escalation not delivered yet; will retry");
                } else if resolving {
                    e.state = EntryState::Resolved;
                    outbox.put(&e)?;
                    tracing::error!(run_id = %e.run, %alertname, %error, "Alertmanager refused to resolve the page");
                } else {
                    e.state = EntryState::Rejected;
                    e.next_attempt = clock.now();
                    outbox.put(&e)?;
                    outbox.record_on_run(&e, DeliveryStatus::Failed, clock.now())?;
                    metrics.escalation_result("rejected");
                    tracing::error!(run_id = %e.run, %alertname, %error, "Alertmanager rejected the escalation: nobody was paged; the escalation_rejected self-check fails");
                }
            }
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry as stored, built from its JSON so that it names only the fields this test needs.
    fn entry(seq: u64, state: &str, at: Timestamp) -> Entry {
        serde_json::from_value(serde_json::json!({
            "run": format!("{seq}-0"),
            "page": {"labels": {"alertname": "RemediationFailed"}, "annotations": {},
                     "startsAt": at, "endsAt": at, "generatorURL": ""},
            "state": state,
            "attempts": 1,
            "created": at,
            "nextAttempt": at,
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn only_pages_refused_within_the_window_count_as_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let outbox = Outbox::open(&store).unwrap();
        let t = |s| Timestamp::from_second(s).unwrap();
        outbox.put(&entry(1, "rejected", t(1_000))).unwrap();
        outbox.put(&entry(2, "rejected", t(5_000))).unwrap();
        outbox.put(&entry(3, "pending", t(100))).unwrap();
        outbox.put(&entry(4, "delivered", t(5_000))).unwrap();
        let found = outbox.unsettled(t(2_000)).unwrap();
        let seqs = |entries: &[Entry]| entries.iter().map(|e| e.run.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(&found.rejected),
            [2],
            "run 1 was refused before the window"
        );
        assert_eq!(seqs(&found.pending), [3]);
    }
}
