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

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

mod send;
mod storm;

pub use send::send_loop;

use super::{Action, Channels, Notice};
use crate::config::StormSettings;
use crate::domain::Fingerprint;
use crate::history::{NotificationRecord, RunId, Store, StoreError};

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
    /// The problem was fixed while the service still processed the trigger (Opsgenie): resolve
    /// once the trigger is processed, so the close cannot overtake the create.
    #[serde(default)]
    pub resolve_after: bool,
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
            resolve_after: false,
            open_folds: Vec::new(),
            folded_total: 0,
            by_playbook: BTreeMap::new(),
            by_target: BTreeMap::new(),
        }
    }

    /// Its resolution is to be sent now.
    fn resolve_next(&mut self, now: Timestamp) {
        self.state = State::Resolving;
        self.action = Action::Resolve;
        self.attempts = 0;
        self.next_attempt = now;
        self.request_id = None;
        self.resolved_at = None;
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
    /// The keys of entries waiting to be sent or checked, so the sender does not read the
    /// settled ones. A hint: a full pass now and then catches what a race left out of it.
    due: sled::Tree,
    /// When the sender last read every entry.
    full_pass: Arc<Mutex<Option<std::time::Instant>>>,
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
            due: store.tree("notify_due")?,
            full_pass: Arc::default(),
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
        self.index_due(e)
    }

    fn index_due(&self, e: &Entry) -> Result<(), StoreError> {
        if e.state.due() {
            self.due.insert(e.key.as_bytes(), &[])?;
        } else {
            self.due.remove(e.key.as_bytes())?;
        }
        Ok(())
    }

    /// Waits until the changes made so far are on disk, then wakes the sender.
    async fn durable_then_wake(&self) -> Result<(), StoreError> {
        self.store.history_durable().await?;
        self.wake.notify_one();
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
                self.index_due(&e)?;
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
            // The index first: an entry is never stored without it, even across a crash.
            self.by_alert.insert(index_key(fingerprint, &key), &[])?;
            if let Some(existing) = self.get(&key)? {
                self.record_on_run(&existing, now)?;
                continue;
            }
            let mut e = Entry::new(key, channel, notice.clone(), now);
            e.run = Some(run);
            e.fingerprint = Some(fingerprint.clone());
            self.supersede_resolutions(fingerprint, channel, &notice.dedup_key, now)?;
            let summary = self.fold_into(channel, now)?;
            if let Some(summary) = &summary {
                e.state = State::Folded;
                e.folded_into = Some(summary.clone());
            }
            self.put(&e)?;
            if let Some(summary) = summary {
                let mut folded = false;
                self.update(&summary, |s| {
                    // Closed meanwhile (its folded pages all resolved): this page goes alone.
                    folded = matches!(s.state, State::Pending | State::Checking | State::Delivered);
                    if folded {
                        s.open_folds.push(e.key.clone());
                        s.folded_total += 1;
                        *s.by_playbook.entry(notice.component.clone()).or_default() += 1;
                        *s.by_target.entry(notice.source.clone()).or_default() += 1;
                    }
                })?;
                if !folded {
                    e.state = State::Pending;
                    e.folded_into = None;
                    self.put(&e)?;
                }
            }
            self.record_on_run(&e, now)?;
            stored.push(e);
        }
        if !stored.is_empty() {
            self.durable_then_wake().await?;
        }
        Ok(stored)
    }

    /// A new trigger for `dedup_key` on `channel` reopens (or updates) the service's incident: a
    /// resolution of an earlier page with that key still waiting to be sent would close it, so
    /// it is dropped.
    fn supersede_resolutions(
        &self,
        fingerprint: &Fingerprint,
        channel: &str,
        dedup_key: &str,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        for e in self.entries_of(fingerprint)? {
            if e.state == State::Resolving
                && e.channel == channel
                && e.notice.dedup_key == dedup_key
            {
                self.update(&e.key, |x| {
                    if x.state == State::Resolving {
                        x.state = State::Resolved;
                        x.resolved_at = Some(now);
                        x.last_error =
                            Some("not sent: a new page with the same key came first".into());
                    }
                })?;
            }
        }
        Ok(())
    }

    /// The entries of the alert behind `fingerprint`, through the index.
    fn entries_of(&self, fingerprint: &Fingerprint) -> Result<Vec<Entry>, StoreError> {
        let prefix = index_key(fingerprint, "");
        let mut out = Vec::new();
        for kv in self.by_alert.scan_prefix(&prefix) {
            let (k, _) = kv?;
            if let Some(e) = self.get(&String::from_utf8_lossy(&k[prefix.len()..]))? {
                out.push(e);
            }
        }
        Ok(out)
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
            let state = self.get(&key)?.map(|e| (e.state, e.action));
            // A page refused for good counts as sent until the condition clears: it is not sent
            // again at every heartbeat.
            let paged = state.is_some_and(|(s, a)| {
                matches!(s, State::Pending | State::Delivered | State::Failed)
                    || (s == State::Checking && a == Action::Trigger)
            });
            if firing && state.is_none_or(|(s, _)| matches!(s, State::Resolved | State::Cancelled))
            {
                let n = built.get_or_insert_with(|| (notice.take().expect("built once"))());
                self.put(&Entry::new(key, channel, n.clone(), now))?;
                changed = true;
            } else if !firing && paged {
                self.update(&key, |e| {
                    if e.state == State::Failed {
                        e.state = State::Resolved;
                        e.resolved_at = Some(now);
                    } else {
                        self.close(e, now);
                    }
                })?;
                changed = true;
            }
        }
        if changed {
            self.durable_then_wake().await?;
        }
        Ok(())
    }

    /// Stores `notice` on `channel` under `key` unless an entry of that key exists (a step that
    /// fires again after a restart sends nothing twice). Not durable until
    /// [`Notifier::commit`]. `true` when stored.
    pub fn stage(
        &self,
        key: &str,
        channel: &str,
        notice: &Notice,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        if self.tree.contains_key(key.as_bytes())? {
            return Ok(false);
        }
        self.put(&Entry::new(key.to_owned(), channel, notice.clone(), now))?;
        Ok(true)
    }

    /// Makes what was staged durable, then wakes the sender.
    pub async fn commit(&self) -> Result<(), StoreError> {
        self.durable_then_wake().await
    }

    /// Closes every open entry whose key starts with `prefix` (an incident resolved): a page
    /// sent is resolved where its channel sends resolutions, one not sent yet is cancelled.
    /// Durable when this returns.
    pub async fn close_prefix(&self, prefix: &str, now: Timestamp) -> Result<usize, StoreError> {
        let n = self.cancel_staged(prefix, now)?;
        if n > 0 {
            self.durable_then_wake().await?;
        }
        Ok(n)
    }

    /// [`Notifier::close_prefix`] without waiting for durability: for entries just staged whose
    /// reason went away (an escalation step that lost the race to a claim).
    pub fn cancel_staged(&self, prefix: &str, now: Timestamp) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.tree.scan_prefix(prefix.as_bytes()) {
            let (k, _) = kv?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let mut closed = false;
            self.update(&key, |e| {
                closed = matches!(e.state, State::Pending | State::Checking | State::Delivered);
                if closed {
                    self.close(e, now);
                }
            })?;
            n += usize::from(closed);
        }
        Ok(n)
    }

    /// Moves an open entry towards resolved: a sent page is resolved on its channel when the
    /// channel sends resolutions, one never sent is cancelled.
    fn close(&self, e: &mut Entry, now: Timestamp) {
        let send_resolved = self
            .channels
            .get(&e.channel)
            .is_some_and(|c| c.send_resolved());
        if e.state == State::Checking && e.action == Action::Trigger {
            // The service is still processing the trigger: resolve once it has.
            e.resolve_after = true;
            return;
        }
        e.state = match e.state {
            State::Pending => State::Cancelled,
            State::Checking => State::Resolving,
            State::Delivered if send_resolved => State::Resolving,
            State::Delivered | State::Folded => State::Resolved,
            other => other,
        };
        if e.state == State::Resolving {
            e.resolve_next(now);
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
        let mut runs = Vec::new();
        let entries = self.entries_of(fingerprint)?;
        // One resolution per channel and dedup key: those already on their way count.
        let mut resolving: Vec<(String, String)> = entries
            .iter()
            .filter(|e| e.state == State::Resolving)
            .map(|e| (e.channel.clone(), e.notice.dedup_key.clone()))
            .collect();
        for entry in entries {
            let mut folded_into = None;
            let mut closed = false;
            let updated = self.update(&entry.key, |e| {
                folded_into = None;
                closed = matches!(
                    e.state,
                    State::Pending | State::Checking | State::Delivered | State::Folded
                ) && !e.resolve_after;
                if !closed {
                    return;
                }
                if e.state == State::Folded {
                    folded_into = e.folded_into.clone();
                }
                self.close(e, now);
                let id = (e.channel.clone(), e.notice.dedup_key.clone());
                if e.state == State::Resolving && resolving.contains(&id) {
                    e.state = State::Resolved;
                    e.resolved_at = Some(now);
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
            self.durable_then_wake().await?;
        }
        Ok(runs)
    }

    /// Copies an entry's state onto its run.
    fn record_on_run(&self, e: &Entry, at: Timestamp) -> Result<(), StoreError> {
        let Some(id) = e.run else {
            return Ok(());
        };
        let record = e.record(at);
        self.store.update_run(id, |run| {
            match run
                .notifications
                .iter_mut()
                .find(|r| r.channel == e.channel)
            {
                Some(r) if r.state == record.state && r.attempts == record.attempts => {}
                Some(r) => {
                    if r.state != record.state {
                        run.timeline.push(crate::history::Event {
                            at,
                            event: format!("{} page {}", e.channel, record.state),
                        });
                    }
                    *r = record.clone();
                }
                None => run.notifications.push(record.clone()),
            }
        })?;
        Ok(())
    }

    /// Entries waiting to be sent or checked: those the index names, and once a minute (and at
    /// the first call) every entry, which also mends the index.
    pub fn pending(&self) -> Result<Vec<Entry>, StoreError> {
        let full = {
            let mut last = self.full_pass.lock().unwrap();
            let due = last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60));
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        let mut out = Vec::new();
        if full {
            for e in self.entries()? {
                self.index_due(&e)?;
                if e.state.due() {
                    out.push(e);
                }
            }
            return Ok(out);
        }
        for kv in self.due.iter() {
            let (k, _) = kv?;
            let key = String::from_utf8_lossy(&k).into_owned();
            match self.get(&key)? {
                Some(e) if e.state.due() => out.push(e),
                _ => {
                    self.due.remove(&k)?;
                    // Made due again in between: keep it named.
                    if let Some(e) = self.get(&key)? {
                        self.index_due(&e)?;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Removes settled entries of runs below `seq` (retention) and settled watchdog, storm and
    /// test entries older than `before`.
    pub fn prune(&self, seq: u64, before: Timestamp) -> Result<usize, StoreError> {
        let mut n = 0;
        for e in self.entries()? {
            let settled = matches!(e.state, State::Resolved | State::Cancelled | State::Failed);
            let (old, done) = match e.run {
                // A run retention removed: its pages are forgotten, open or not.
                Some(run) => (
                    run.seq < seq,
                    settled || matches!(e.state, State::Delivered | State::Folded),
                ),
                None => (e.created < before, settled),
            };
            if done && old {
                self.tree.remove(e.key.as_bytes())?;
                self.due.remove(e.key.as_bytes())?;
                if let Some(fp) = &e.fingerprint {
                    self.by_alert.remove(index_key(fp, &e.key))?;
                }
                n += 1;
            }
        }
        Ok(n)
    }
}

/// `fingerprint 0x00 key`: the index of entries by their alert.
fn index_key(fingerprint: &Fingerprint, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(fingerprint.as_str().len() + 1 + key.len());
    k.extend_from_slice(fingerprint.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{resolve_channels, ChannelSettings};
    use crate::notify::{Kind, Severity};

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
            to: None,
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

    #[tokio::test]
    async fn a_new_page_drops_an_unsent_resolution_of_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let n = notifier(dir.path(), PD, StormSettings::default());
        let fp = Fingerprint::parse("00000000000000bb").unwrap();
        let pd = ["pd".to_owned()];
        let first = n
            .page_run(
                RunId { seq: 1, index: 0 },
                &fp,
                &notice(fp.as_str()),
                &pd,
                ts(10),
            )
            .await
            .unwrap();
        n.update(&first[0].key, |e| e.state = State::Delivered)
            .unwrap();
        n.resolve_for(&fp, ts(20)).await.unwrap();
        assert_eq!(
            n.get(&first[0].key).unwrap().unwrap().state,
            State::Resolving
        );
        // The alert fires again and the fix fails again before the resolution went out: that
        // resolution would close the incident the new page reopens.
        n.page_run(
            RunId { seq: 2, index: 0 },
            &fp,
            &notice(fp.as_str()),
            &pd,
            ts(30),
        )
        .await
        .unwrap();
        let old = n.get(&first[0].key).unwrap().unwrap();
        assert_eq!(old.state, State::Resolved);
        assert!(old.last_error.unwrap().contains("new page"));
    }

    #[tokio::test]
    async fn a_trigger_still_being_processed_is_resolved_only_after_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let n = notifier(dir.path(), PD, StormSettings::default());
        let fp = Fingerprint::parse("00000000000000cc").unwrap();
        let stored = n
            .page_run(
                RunId { seq: 1, index: 0 },
                &fp,
                &notice(fp.as_str()),
                &["pd".to_owned()],
                ts(10),
            )
            .await
            .unwrap();
        n.update(&stored[0].key, |e| {
            e.state = State::Checking;
            e.request_id = Some("req-1".into());
        })
        .unwrap();
        n.resolve_for(&fp, ts(20)).await.unwrap();
        let e = n.get(&stored[0].key).unwrap().unwrap();
        assert_eq!(
            (e.state, e.action, e.resolve_after),
            (State::Checking, Action::Trigger, true)
        );
    }
}
