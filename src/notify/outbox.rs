//! The durable notification outbox: one entry per (page, channel), stored before anything is
//! sent, so a page survives restarts and outages and is never sent twice for one run and channel.
//! One sender task delivers due entries, each channel on its own (a channel that fails or hangs
//! never holds back another), within the channel's rate limit, retrying 429, 5xx and network
//! errors with backoff, and records each delivery on its run.
//!
//! Storm control happens when a page is stored: past `storm.threshold` pages to one channel
//! within `storm.window`, a page is stored `folded` into one summary entry for that channel,
//! sent `storm.summary_after` after the first fold, and resolved when every page folded into it
//! has resolved. Keys: `run/<run id>/<channel>`, `storm/<channel>/<ms>`,
//! `watchdog/<check>/<channel>`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Action, Channels, Kind, Notice, RequestStatus, Sent, Severity};
use crate::clock::{later, Clock};
use crate::config::StormSettings;
use crate::domain::Fingerprint;
use crate::history::{NotificationRecord, RunId, Store, StoreError};
use crate::metrics::Metrics;

const MAX_BACKOFF: Duration = Duration::from_secs(60);
const BASE_BACKOFF: Duration = Duration::from_secs(1);
/// How often a request the service took for later is asked about before reactor gives up.
const MAX_CHECKS: u32 = 20;

/// Where one page on one channel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Stored, not yet taken by the service.
    Pending,
    /// Taken for later (Opsgenie's 202): its request id is being checked.
    Checking,
    Delivered,
    /// The service refused it for good; nobody was paged on this channel.
    Failed,
    /// Folded into a storm summary instead of being sent.
    Folded,
    /// The problem is fixed: the resolution is to be sent.
    Resolving,
    Resolved,
    /// Resolved before it was sent: nothing is sent.
    Cancelled,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Checking => "checking",
            State::Delivered => "delivered",
            State::Failed => "failed",
            State::Folded => "folded",
            State::Resolving => "resolving",
            State::Resolved => "resolved",
            State::Cancelled => "cancelled",
        }
    }

    fn due(self) -> bool {
        matches!(self, State::Pending | State::Checking | State::Resolving)
    }
}

/// One page on one channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub key: String,
    pub channel: String,
    #[serde(default)]
    pub run: Option<RunId>,
    #[serde(default)]
    pub fingerprint: Option<Fingerprint>,
    pub notice: Notice,
    pub state: State,
    /// What a `Checking` entry checks: the trigger or the resolution.
    #[serde(default = "trigger")]
    pub action: Action,
    pub attempts: u32,
    pub created: Timestamp,
    pub next_attempt: Timestamp,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub request_id: Option<String>,
    #[serde(default)]
    pub resolved_at: Option<Timestamp>,
    /// The storm summary this page was folded into.
    #[serde(default)]
    pub folded_into: Option<String>,
    /// A storm summary: the pages folded into it that have not resolved yet.
    #[serde(default)]
    pub open_folds: Vec<String>,
    /// A storm summary: pages folded, by playbook and by target.
    #[serde(default)]
    pub folded_total: u32,
    #[serde(default)]
    pub by_playbook: BTreeMap<String, u32>,
    #[serde(default)]
    pub by_target: BTreeMap<String, u32>,
}

fn trigger() -> Action {
    Action::Trigger
}

impl Entry {
    fn new(key: String, channel: &str, notice: Notice, now: Timestamp) -> Entry {
        Entry {
            key,
            channel: channel.to_owned(),
            run: None,
            fingerprint: None,
            notice,
            state: State::Pending,
            action: Action::Trigger,
            attempts: 0,
            created: now,
            next_attempt: now,
            last_error: None,
            request_id: None,
            resolved_at: None,
            folded_into: None,
            open_folds: Vec::new(),
            folded_total: 0,
            by_playbook: BTreeMap::new(),
            by_target: BTreeMap::new(),
        }
    }

    fn record(&self, at: Timestamp) -> NotificationRecord {
        NotificationRecord {
            channel: self.channel.clone(),
            dedup_key: self.notice.dedup_key.clone(),
            state: self.state.as_str().to_owned(),
            attempts: self.attempts,
            at,
            last_error: self.last_error.clone(),
            request_id: self.request_id.clone(),
            folded_into: self.folded_into.clone(),
            resolved_at: self.resolved_at,
        }
    }
}

/// Per channel: when pages were stored (storm control) and sent (rate limit) lately, and the
/// storm summary open now.
#[derive(Default)]
struct Window {
    stored: VecDeque<Timestamp>,
    sent: VecDeque<Timestamp>,
    storm: Option<(String, Timestamp)>,
}

/// The notification side of escalation: the channels, the outbox tree, storm control.
#[derive(Clone)]
pub struct Notifier {
    channels: Channels,
    tree: sled::Tree,
    /// `fingerprint 0x00 entry-key`, so resolving an alert's pages reads only its entries.
    by_alert: sled::Tree,
    store: Store,
    wake: Arc<Notify>,
    storm: StormSettings,
    windows: Arc<Mutex<HashMap<String, Window>>>,
    /// Base URL of reactor, for the storm summary's link.
    external_url: String,
}

impl Notifier {
    pub fn open(
        store: &Store,
        channels: Channels,
        storm: StormSettings,
        external_url: String,
        now: Timestamp,
    ) -> Result<Notifier, StoreError> {
        let n = Notifier {
            channels,
            tree: store.tree("notify_outbox")?,
            by_alert: store.tree("notify_by_alert")?,
            store: store.clone(),
            wake: Arc::new(Notify::new()),
            storm,
            windows: Arc::default(),
            external_url,
        };
        n.restore_windows(now)?;
        Ok(n)
    }

    pub fn channels(&self) -> &Channels {
        &self.channels
    }

    /// Storm control's counts survive a restart: pages stored within the window, and the summary
    /// still gathering.
    fn restore_windows(&self, now: Timestamp) -> Result<(), StoreError> {
        let since = crate::clock::earlier(now, self.storm.window);
        let mut windows = self.windows.lock().unwrap();
        for e in self.entries()? {
            if e.created < since {
                continue;
            }
            let w = windows.entry(e.channel.clone()).or_default();
            match e.notice.kind {
                Kind::Run if e.state != State::Folded => w.stored.push_back(e.created),
                Kind::Storm => w.storm = Some((e.key.clone(), e.created)),
                _ => {}
            }
        }
        for w in windows.values_mut() {
            w.stored.make_contiguous().sort();
        }
        Ok(())
    }

    fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.iter() {
            let (_, v) = kv?;
            if let Ok(e) = serde_json::from_slice::<Entry>(&v) {
                out.push(e);
            }
        }
        Ok(out)
    }

    pub fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self
            .tree
            .get(key)?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    fn put(&self, e: &Entry) -> Result<(), StoreError> {
        self.tree.insert(
            e.key.as_bytes(),
            serde_json::to_vec(e).expect("an entry serializes"),
        )?;
        Ok(())
    }

    /// Changes the stored entry `key` with `f`, atomically: the sender, the engine and the
    /// watchdog change entries from different tasks, and no change may overwrite another.
    /// Returns the entry as stored, or `None` when there is none.
    fn update(
        &self,
        key: &str,
        mut f: impl FnMut(&mut Entry),
    ) -> Result<Option<Entry>, StoreError> {
        loop {
            let Some(old) = self.tree.get(key.as_bytes())? else {
                return Ok(None);
            };
            let Ok(mut e) = serde_json::from_slice::<Entry>(&old) else {
                return Ok(None);
            };
            f(&mut e);
            let new = serde_json::to_vec(&e).expect("an entry serializes");
            if self
                .tree
                .compare_and_swap(key.as_bytes(), Some(&old), Some(new))?
                .is_ok()
            {
                return Ok(Some(e));
            }
        }
    }

    /// Stores `notice` for `run` on each of `channels` (those it has not been stored on yet),
    /// folding it into a storm summary where a channel is past its threshold. Durable when this
    /// returns. Returns the entries stored.
    pub async fn page_run(
        &self,
        run: RunId,
        fingerprint: &Fingerprint,
        notice: &Notice,
        channels: &[String],
        now: Timestamp,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut stored = Vec::new();
        for channel in channels {
            let key = format!("run/{run}/{channel}");
            if let Some(existing) = self.get(&key)? {
                self.record_on_run(&existing, now)?;
                continue;
            }
            let mut e = Entry::new(key, channel, notice.clone(), now);
            e.run = Some(run);
            e.fingerprint = Some(fingerprint.clone());
            if let Some(summary) = self.fold_into(channel, now)? {
                e.state = State::Folded;
                e.folded_into = Some(summary.clone());
                self.update(&summary, |s| {
                    s.open_folds.push(e.key.clone());
                    s.folded_total += 1;
                    *s.by_playbook.entry(notice.component.clone()).or_default() += 1;
                    *s.by_target.entry(notice.source.clone()).or_default() += 1;
                })?;
            }
            self.put(&e)?;
            let mut index = fingerprint.as_str().as_bytes().to_vec();
            index.push(0);
            index.extend_from_slice(e.key.as_bytes());
            self.by_alert.insert(index, &[])?;
            self.record_on_run(&e, now)?;
            stored.push(e);
        }
        if !stored.is_empty() {
            self.store.history_durable().await?;
            self.wake.notify_one();
        }
        Ok(stored)
    }

    /// Counts a page for `channel`; past the threshold, returns the key of the storm summary to
    /// fold it into (stored first when there is none).
    fn fold_into(&self, channel: &str, now: Timestamp) -> Result<Option<String>, StoreError> {
        if self.storm.threshold == 0 {
            return Ok(None);
        }
        let since = crate::clock::earlier(now, self.storm.window);
        let mut windows = self.windows.lock().unwrap();
        let w = windows.entry(channel.to_owned()).or_default();
        while w.stored.front().is_some_and(|t| *t < since) {
            w.stored.pop_front();
        }
        if (w.stored.len() as u64) < u64::from(self.storm.threshold) {
            w.stored.push_back(now);
            return Ok(None);
        }
        if let Some((key, started)) = &w.storm {
            if *started >= since {
                if let Some(s) = self.get(key)? {
                    if matches!(s.state, State::Pending | State::Checking | State::Delivered) {
                        return Ok(Some(s.key));
                    }
                }
            }
        }
        let key = format!("storm/{channel}/{}", now.as_millisecond());
        let notice = Notice {
            kind: Kind::Storm,
            dedup_key: format!("reactor/storm/{channel}/{}", now.as_millisecond()),
            summary: String::new(),
            description: String::new(),
            severity: Severity::Critical,
            source: "reactor".into(),
            component: "reactor".into(),
            group: String::new(),
            class: "RemediationStorm".into(),
            link: format!("{}/api/v1/runs?outcome=failed", self.external_url),
            labels: [("alertname".to_owned(), "RemediationStorm".to_owned())].into(),
            annotations: Default::default(),
            details: Default::default(),
            at: now,
        };
        let mut s = Entry::new(key.clone(), channel, notice, now);
        s.next_attempt = later(now, self.storm.summary_after);
        self.put(&s)?;
        w.storm = Some((key.clone(), now));
        tracing::warn!(%channel, threshold = self.storm.threshold, "page storm: further pages are folded into one summary");
        Ok(Some(key))
    }

    /// Pages (`firing`) or resolves a watchdog condition named `check` on `channels`. Idempotent:
    /// a condition already paged is not paged again.
    pub async fn watchdog(
        &self,
        check: &str,
        firing: bool,
        notice: impl FnOnce() -> Notice,
        channels: &[String],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let mut changed = false;
        let mut notice = Some(notice);
        let mut built: Option<Notice> = None;
        for channel in channels {
            let key = format!("watchdog/{check}/{channel}");
            let existing = self.get(&key)?;
            let open = existing.as_ref().is_some_and(|e| {
                matches!(e.state, State::Pending | State::Checking | State::Delivered)
            });
            if firing && !open {
                let n = built.get_or_insert_with(|| (notice.take().expect("built once"))());
                self.put(&Entry::new(key, channel, n.clone(), now))?;
                changed = true;
            } else if !firing && open {
                self.update(&key, |e| self.close(e, now))?;
                changed = true;
            }
        }
        if changed {
            self.store.history_durable().await?;
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Moves an open entry towards resolved: a sent page is resolved on its channel when the
    /// channel sends resolutions, one never sent is cancelled.
    fn close(&self, e: &mut Entry, now: Timestamp) {
        let send_resolved = self
            .channels
            .get(&e.channel)
            .is_some_and(|c| c.send_resolved());
        e.state = match e.state {
            State::Pending => State::Cancelled,
            State::Checking if e.action == Action::Resolve => State::Resolving,
            State::Delivered | State::Checking if send_resolved => State::Resolving,
            State::Delivered | State::Checking | State::Folded => State::Resolved,
            other => other,
        };
        if e.state == State::Resolving {
            e.action = Action::Resolve;
            e.attempts = 0;
            e.next_attempt = now;
            e.request_id = None;
        } else if matches!(e.state, State::Resolved | State::Cancelled) {
            e.resolved_at = Some(now);
        }
    }

    /// The alert behind `fingerprint` resolved, or a later run fixed it: every open page for it
    /// resolves, one resolution per channel and dedup key; storm summaries whose folded pages
    /// have all resolved resolve too. Returns the runs affected.
    pub async fn resolve_for(
        &self,
        fingerprint: &Fingerprint,
        now: Timestamp,
    ) -> Result<Vec<RunId>, StoreError> {
        let mut prefix = fingerprint.as_str().as_bytes().to_vec();
        prefix.push(0);
        let mut runs = Vec::new();
        let mut resolving: Vec<(String, String)> = Vec::new();
        for kv in self.by_alert.scan_prefix(&prefix) {
            let (k, _) = kv?;
            self.by_alert.remove(&k)?;
            let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            let mut folded_into = None;
            let mut closed = false;
            let updated = self.update(&key, |e| {
                folded_into = None;
                closed = matches!(
                    e.state,
                    State::Pending | State::Checking | State::Delivered | State::Folded
                );
                if !closed {
                    return;
                }
                if e.state == State::Folded {
                    folded_into = e.folded_into.clone();
                }
                self.close(e, now);
                if e.state == State::Resolving {
                    let id = (e.channel.clone(), e.notice.dedup_key.clone());
                    // One resolution per channel and dedup key.
                    if resolving.contains(&id) || self.resolution_pending(&id).unwrap_or(false) {
                        e.state = State::Resolved;
                        e.resolved_at = Some(now);
                    }
                }
            })?;
            let Some(e) = updated.filter(|_| closed) else {
                continue;
            };
            if e.state == State::Resolving {
                resolving.push((e.channel.clone(), e.notice.dedup_key.clone()));
            }
            self.record_on_run(&e, now)?;
            if let Some(summary) = folded_into {
                self.unfold(&summary, &e.key, now)?;
            }
            runs.extend(e.run);
        }
        if !runs.is_empty() {
            self.store.history_durable().await?;
            self.wake.notify_one();
        }
        Ok(runs)
    }

    /// Whether another entry is already sending the resolution for this channel and dedup key.
    fn resolution_pending(&self, id: &(String, String)) -> Result<bool, StoreError> {
        // Rare enough (several delivered pages of one target) to scan only on demand.
        Ok(self.entries()?.iter().any(|e| {
            e.state == State::Resolving && e.channel == id.0 && e.notice.dedup_key == id.1
        }))
    }

    fn unfold(&self, summary: &str, folded: &str, now: Timestamp) -> Result<(), StoreError> {
        self.update(summary, |s| {
            s.open_folds.retain(|k| k != folded);
            if s.open_folds.is_empty() {
                // Every page folded into it resolved: so does the summary (cancelled if not sent
                // yet; a later fold opens a new one).
                self.close(s, now);
            }
        })?;
        Ok(())
    }

    /// Copies an entry's state onto its run.
    fn record_on_run(&self, e: &Entry, at: Timestamp) -> Result<(), StoreError> {
        let Some(id) = e.run else {
            return Ok(());
        };
        if let Some(mut run) = self.store.get_run(id)? {
            let record = e.record(at);
            match run
                .notifications
                .iter_mut()
                .find(|r| r.channel == e.channel)
            {
                Some(r) if r.state == record.state && r.attempts == record.attempts => {
                    return Ok(())
                }
                Some(r) => {
                    if r.state != record.state {
                        run.timeline.push(crate::history::Event {
                            at,
                            event: format!("{} page {}", e.channel, record.state),
                        });
                    }
                    *r = record;
                }
                None => run.notifications.push(record),
            }
            self.store.put_run(&run)?;
        }
        Ok(())
    }

    /// Entries waiting to be sent or checked.
    pub fn pending(&self) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|e| e.state.due())
            .collect())
    }

    /// Removes settled entries of runs below `seq` (retention) and settled watchdog, storm and
    /// test entries older than `before`.
    pub fn prune(&self, seq: u64, before: Timestamp) -> Result<usize, StoreError> {
        let mut n = 0;
        for e in self.entries()? {
            let settled = matches!(e.state, State::Resolved | State::Cancelled | State::Failed);
            let old = match e.run {
                Some(run) => run.seq < seq,
                None => e.created < before,
            };
            if settled && old {
                self.tree.remove(e.key.as_bytes())?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Sends `e` (one attempt) and stores what came of it. The entry may have changed while the
    /// request was out (the alert resolved, pages were folded into a summary): what came of the
    /// attempt is applied to the entry as it is then.
    async fn deliver(
        &self,
        mut e: Entry,
        clock: &dyn Clock,
        metrics: &Metrics,
    ) -> Result<(), StoreError> {
        if e.notice.kind == Kind::Storm && e.action == Action::Trigger {
            self.describe_storm(&mut e);
        }
        let (start_state, start_action) = (e.state, e.action);
        let action = if e.state == State::Resolving {
            Action::Resolve
        } else {
            e.action
        };
        let checking = e.state == State::Checking;
        let attempts = e.attempts + 1;
        let result = if checking {
            let id = e.request_id.clone().unwrap_or_default();
            match self.channels.request_status(&e.channel, &id).await {
                Ok(RequestStatus::Succeeded) => Ok(Sent::default()),
                Ok(RequestStatus::Processing) if attempts < MAX_CHECKS => Err(
                    super::SendError::retry("the service has not processed the request yet"),
                ),
                Ok(RequestStatus::Processing) => Err(super::SendError::final_(format!(
                    "request {id} was still not processed after {MAX_CHECKS} checks"
                ))),
                Ok(RequestStatus::Failed(why)) => Err(super::SendError::final_(format!(
                    "the service rejected request {id}: {why}"
                ))),
                Err(err) => Err(err),
            }
        } else {
            self.channels.send(&e.channel, &e.notice, action).await
        };
        let now = clock.now();
        let channel = e.channel.clone();
        let send_resolved = self
            .channels
            .get(&channel)
            .is_some_and(|c| c.send_resolved());
        let storm_text = (e.notice.kind == Kind::Storm).then(|| e.notice.clone());
        let outcome = |x: &mut Entry| {
            if let Some(n) = &storm_text {
                x.notice = n.clone();
            }
            if x.state != start_state || x.action != start_action {
                // Changed while the request was out: the alert resolved. A trigger that got
                // through after all must be resolved too.
                let sent_trigger = action == Action::Trigger && result.is_ok();
                if sent_trigger && matches!(x.state, State::Cancelled) {
                    if send_resolved {
                        x.state = State::Resolving;
                        x.action = Action::Resolve;
                        x.attempts = 0;
                        x.next_attempt = now;
                        x.resolved_at = None;
                    } else {
                        x.state = State::Resolved;
                    }
                }
                return;
            }
            x.attempts = attempts;
            match &result {
                Ok(Sent {
                    request_id: Some(id),
                }) if !checking => {
                    // Taken for later: check the request before calling it delivered.
                    x.request_id = Some(id.clone());
                    x.state = State::Checking;
                    x.action = action;
                    x.attempts = 0;
                    x.last_error = None;
                    x.next_attempt = later(now, Duration::from_millis(200));
                }
                Ok(_) => {
                    x.last_error = None;
                    if action == Action::Resolve {
                        x.state = State::Resolved;
                        x.resolved_at = Some(now);
                    } else {
                        x.state = State::Delivered;
                    }
                }
                Err(err) if err.retryable => {
                    let delay = err.retry_after.unwrap_or_else(|| backoff(attempts));
                    x.next_attempt = later(now, delay.max(Duration::from_millis(10)));
                    if !checking {
                        x.last_error = Some(err.reason.clone());
                    }
                }
                Err(err) => {
                    x.last_error = Some(err.reason.clone());
                    x.state = if action == Action::Resolve {
                        State::Resolved
                    } else {
                        State::Failed
                    };
                }
            }
        };
        let Some(stored) = self.update(&e.key, outcome)? else {
            return Ok(());
        };
        match &result {
            Ok(Sent {
                request_id: Some(_),
            }) if !checking => {}
            Ok(_) => {
                let label = if action == Action::Resolve {
                    "resolved"
                } else {
                    "delivered"
                };
                metrics.notification(&channel, label);
                tracing::info!(key = %e.key, %channel, attempts, ?action, "notification delivered");
            }
            Err(err) if checking && err.retryable => {}
            Err(err) => {
                metrics.notification(&channel, err.result_label());
                if err.retryable {
                    tracing::warn!(key = %e.key, %channel, attempts, error = %err, "notification not delivered yet; will retry");
                } else {
                    tracing::error!(key = %e.key, %channel, error = %err, "the channel refused the notification for good");
                }
            }
        }
        if !stored.state.due() || stored.state == State::Checking {
            self.store.history_durable().await?;
        }
        self.record_on_run(&stored, now)
    }

    /// Fills a storm summary's text from what was folded into it.
    fn describe_storm(&self, e: &mut Entry) {
        let window = humantime::format_duration(self.storm.window);
        let top = |m: &BTreeMap<String, u32>| {
            let mut v: Vec<_> = m.iter().collect();
            v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            v.iter()
                .take(5)
                .map(|(k, n)| format!("{k} ({n})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let n = e.folded_total + self.storm.threshold;
        e.notice.summary = format!(
            "{n} remediations failed within {window} on {}: further pages are folded into this one",
            e.channel
        );
        e.notice.description = format!(
            "Top playbooks: {}. Top targets: {}. {} page(s) folded; the first {} were sent on their own.",
            top(&e.by_playbook),
            top(&e.by_target),
            e.folded_total,
            self.storm.threshold
        );
        e.notice.details = [
            ("folded".to_owned(), e.folded_total.into()),
            ("top_playbooks".to_owned(), top(&e.by_playbook).into()),
            ("top_targets".to_owned(), top(&e.by_target).into()),
        ]
        .into_iter()
        .collect();
        e.notice.annotations = [
            ("summary".to_owned(), e.notice.summary.clone()),
            ("description".to_owned(), e.notice.description.clone()),
        ]
        .into();
    }

    /// Whether `channel` may send now; if not, when it may.
    fn rate_wait(&self, channel: &str, now: Timestamp) -> Option<Timestamp> {
        let per_minute = self
            .channels
            .get(channel)
            .map_or(0, |c| c.rate_per_minute());
        if per_minute == 0 {
            return None;
        }
        let minute_ago = crate::clock::earlier(now, Duration::from_secs(60));
        let mut windows = self.windows.lock().unwrap();
        let w = windows.entry(channel.to_owned()).or_default();
        while w.sent.front().is_some_and(|t| *t <= minute_ago) {
            w.sent.pop_front();
        }
        if w.sent.len() >= per_minute as usize {
            return w.sent.front().map(|t| later(*t, Duration::from_secs(60)));
        }
        w.sent.push_back(now);
        None
    }
}

fn backoff(attempt: u32) -> Duration {
    crate::escalation::backoff(BASE_BACKOFF, attempt, MAX_BACKOFF)
}

/// Delivers due entries until `shutdown`. Each channel's due entries go out in order on a task of
/// their own, so a channel that hangs until its timeout, or fails, never holds back another; a
/// channel is not given a second task while its first is at work.
pub async fn send_loop(
    notifier: Notifier,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut at_work: tokio::task::JoinSet<String> = tokio::task::JoinSet::new();
    let mut busy: std::collections::HashSet<String> = std::collections::HashSet::new();
    loop {
        let next = match due_by_channel(&notifier, clock.now(), &busy) {
            Ok((due, next)) => {
                for (channel, entries) in due {
                    busy.insert(channel.clone());
                    let (n, c, m) = (notifier.clone(), Arc::clone(&clock), Arc::clone(&metrics));
                    at_work.spawn(async move {
                        if let Err(e) = deliver_in_order(&n, entries, c.as_ref(), &m).await {
                            tracing::error!(%channel, error = %e, "notification outbox failed; retrying");
                        }
                        channel
                    });
                }
                next
            }
            Err(e) => {
                tracing::error!(error = %e, "notification outbox failed; retrying");
                Some(later(clock.now(), Duration::from_secs(1)))
            }
        };
        let woken =
            crate::escalation::wait_for_due(next, clock.as_ref(), &notifier.wake, &shutdown);
        tokio::select! {
            go_on = woken => if !go_on { break },
            Some(done) = at_work.join_next(), if !at_work.is_empty() => {
                if let Ok(channel) = done {
                    busy.remove(&channel);
                } else {
                    // A task that panicked: look at every channel again.
                    busy.clear();
                }
            }
        }
    }
    // What is in flight stays pending in the outbox: the next start sends it.
    at_work.shutdown().await;
    tracing::debug!("notification sender stopped");
}

/// The due entries of channels not at work, by channel, and when the next entry is due.
#[allow(clippy::type_complexity)]
fn due_by_channel(
    notifier: &Notifier,
    now: Timestamp,
    busy: &std::collections::HashSet<String>,
) -> Result<(BTreeMap<String, Vec<Entry>>, Option<Timestamp>), StoreError> {
    let mut next: Option<Timestamp> = None;
    let mut due: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    for e in notifier.pending()? {
        if busy.contains(&e.channel) {
            continue;
        }
        if e.next_attempt > now {
            next = Some(next.map_or(e.next_attempt, |n| n.min(e.next_attempt)));
        } else {
            due.entry(e.channel.clone()).or_default().push(e);
        }
    }
    Ok((due, next))
}

/// Delivers one channel's due entries, oldest first, within its rate limit: past the limit, the
/// rest wait (not counted as attempts) until it allows them.
async fn deliver_in_order(
    notifier: &Notifier,
    mut entries: Vec<Entry>,
    clock: &dyn Clock,
    metrics: &Metrics,
) -> Result<(), StoreError> {
    entries.sort_by_key(|e| (e.next_attempt, e.created));
    let mut held_until: Option<Timestamp> = None;
    for e in entries {
        let checking = e.state == State::Checking;
        if !checking {
            if held_until.is_none() {
                held_until = notifier.rate_wait(&e.channel, clock.now());
            }
            if let Some(at) = held_until {
                metrics.notification(&e.channel, "rate_limited");
                notifier.update(&e.key, |x| {
                    if x.state == e.state {
                        x.next_attempt = x.next_attempt.max(at);
                    }
                })?;
                continue;
            }
        }
        notifier.deliver(e, clock, metrics).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{resolve_channels, ChannelSettings};

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn notifier(dir: &std::path::Path, yaml: &str, storm: StormSettings) -> Notifier {
        crate::tls::install_crypto_provider();
        let mut map: BTreeMap<String, ChannelSettings> = serde_saphyr::from_str(yaml).unwrap();
        resolve_channels(&mut map, &|_| Some("k".into())).unwrap();
        let store = Store::open(dir).unwrap();
        let channels = Channels::new(reqwest::Client::new(), map);
        Notifier::open(&store, channels, storm, "http://r".into(), ts(0)).unwrap()
    }

    fn notice(fp: &str) -> Notice {
        Notice {
            kind: Kind::Run,
            dedup_key: format!("reactor/p/{fp}"),
            summary: "s".into(),
            description: String::new(),
            severity: Severity::Critical,
            source: "host".into(),
            component: "p".into(),
            group: String::new(),
            class: "A".into(),
            link: String::new(),
            labels: Default::default(),
            annotations: Default::default(),
            details: Default::default(),
            at: ts(0),
        }
    }

    const PD: &str = "pd:\n  type: pagerduty\n  routing_key_env: K\n  rate_limit_per_minute: 2\n";

    #[test]
    fn a_channel_sends_at_most_its_rate_a_minute_and_then_waits() {
        let dir = tempfile::tempdir().unwrap();
        let n = notifier(dir.path(), PD, StormSettings::default());
        assert_eq!(n.rate_wait("pd", ts(1_000)), None);
        assert_eq!(n.rate_wait("pd", ts(1_001)), None);
        assert_eq!(
            n.rate_wait("pd", ts(1_002)),
            Some(ts(1_060)),
            "third within the minute waits"
        );
        assert_eq!(n.rate_wait("pd", ts(1_059)), Some(ts(1_060)));
        assert_eq!(
            n.rate_wait("pd", ts(1_060)),
            None,
            "the first send left the window"
        );
        let dir = tempfile::tempdir().unwrap();
        let default = notifier(
            dir.path(),
            "pd:\n  type: pagerduty\n  routing_key_env: K\n",
            StormSettings::default(),
        );
        let allowed = (0..200)
            .filter(|i| default.rate_wait("pd", ts(2_000 + i / 10)).is_none())
            .count();
        assert_eq!(
            allowed, 120,
            "PagerDuty's 120 events a minute per routing key"
        );
    }

    #[tokio::test]
    async fn pages_past_the_threshold_fold_into_one_summary_that_resolves_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let storm = StormSettings {
            threshold: 2,
            window: Duration::from_secs(300),
            summary_after: Duration::from_secs(30),
        };
        let n = notifier(dir.path(), PD, storm);
        let pd = ["pd".to_owned()];
        let mut keys = Vec::new();
        for i in 0..5u64 {
            let fp = Fingerprint::parse(&format!("{i:016x}")).unwrap();
            let run = RunId {
                seq: i + 1,
                index: 0,
            };
            let stored = n
                .page_run(run, &fp, &notice(fp.as_str()), &pd, ts(10))
                .await
                .unwrap();
            keys.push((fp, stored[0].key.clone(), stored[0].state));
        }
        let states: Vec<State> = keys.iter().map(|k| k.2).collect();
        assert_eq!(
            states,
            [
                State::Pending,
                State::Pending,
                State::Folded,
                State::Folded,
                State::Folded
            ]
        );
        let summary_key = n.get(&keys[2].1).unwrap().unwrap().folded_into.unwrap();
        let summary = n.get(&summary_key).unwrap().unwrap();
        assert_eq!(summary.folded_total, 3);
        assert_eq!(
            summary.next_attempt,
            ts(40),
            "sent summary_after the first fold"
        );
        for (fp, _, _) in &keys[2..4] {
            n.resolve_for(fp, ts(20)).await.unwrap();
        }
        let summary = n.get(&summary_key).unwrap().unwrap();
        assert_eq!(
            summary.state,
            State::Pending,
            "one folded page is still open"
        );
        n.resolve_for(&keys[4].0, ts(21)).await.unwrap();
        let summary = n.get(&summary_key).unwrap().unwrap();
        assert_eq!(
            summary.state,
            State::Cancelled,
            "all resolved before it was sent"
        );
        n.resolve_for(&keys[0].0, ts(22)).await.unwrap();
        assert_eq!(n.get(&keys[0].1).unwrap().unwrap().state, State::Cancelled);
    }

    #[tokio::test]
    async fn delivered_pages_of_one_key_resolve_once() {
        let dir = tempfile::tempdir().unwrap();
        let n = notifier(dir.path(), PD, StormSettings::default());
        let fp = Fingerprint::parse("00000000000000aa").unwrap();
        let pd = ["pd".to_owned()];
        let mut keys = Vec::new();
        for seq in 1..=2 {
            let run = RunId { seq, index: 0 };
            let stored = n
                .page_run(run, &fp, &notice(fp.as_str()), &pd, ts(10))
                .await
                .unwrap();
            n.update(&stored[0].key, |e| e.state = State::Delivered)
                .unwrap();
            keys.push(stored[0].key.clone());
        }
        n.resolve_for(&fp, ts(20)).await.unwrap();
        let states: Vec<State> = keys
            .iter()
            .map(|k| n.get(k).unwrap().unwrap().state)
            .collect();
        assert_eq!(states, [State::Resolving, State::Resolved]);
    }
}
