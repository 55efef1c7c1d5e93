//! Loop guards, persisted in sled so they survive restarts: idempotency of deliveries (one run per
//! fingerprint, startsAt and playbook), per-target cooldown and attempts-per-window, and a
//! per-playbook circuit breaker. Decisions are pure functions of stored state and the time; every
//! update is a compare-and-swap, so concurrent runs for one target cannot both slip through.
//!
//! When a playbook's target is all of the alert's labels (the default), the target is the alert,
//! so its delivery claims live in the target's record and one compare-and-swap both claims the
//! delivery and decides the target. A playbook with `target_labels` shares a target among alerts
//! and claims in its own tree. Claims made before that change are in the `dedup` tree, still
//! consulted until pruning has emptied it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::domain::Alert;
use crate::history::{RunId, Store, StoreError};

use crate::clock::later as plus;
pub use crate::playbook::{BreakerPolicy, GuardPolicy};

/// What the guards remember about one target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TargetState {
    /// Start times of runs inside the current window.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_start: Option<Timestamp>,
    /// A `RemediationLoop` page was raised for the current episode.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub loop_escalated: bool,
    /// Deliveries claimed for this target, oldest first, when the target is the whole alert.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<DeliveryClaim>,
}

/// One episode of an alert (its startsAt, in nanoseconds) and the run that owns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryClaim {
    pub starts: i128,
    pub run: RunId,
}

/// Claims kept per target record. Alertmanager resends only an alert's current episode, so the
/// last few suffice; older ones go first, and whole records go when pruned.
const CLAIMS_PER_TARGET: usize = 16;

/// Claims `starts` for `run` in the target's record; `Some(owner)` when another run owns it.
fn claim_in(s: &mut TargetState, starts: i128, run: RunId) -> Option<RunId> {
    if let Some(c) = s.claims.iter().find(|c| c.starts == starts) {
        return (c.run != run).then_some(c.run);
    }
    if s.claims.len() >= CLAIMS_PER_TARGET {
        s.claims.remove(0);
    }
    s.claims.push(DeliveryClaim { starts, run });
    None
}

#[derive(Debug, Clone, PartialEq)]
pub enum TargetDecision {
    Run,
    Cooldown {
        until: Timestamp,
    },
    /// Too many attempts in the window; `escalate` is true only the first time per episode.
    LoopGuard {
        escalate: bool,
        attempts: usize,
        until: Timestamp,
    },
}

/// Decides whether a target may be remediated now, recording the attempt when it may.
pub fn decide_target(s: &mut TargetState, now: Timestamp, p: &GuardPolicy) -> TargetDecision {
    s.attempts.retain(|t| plus(*t, p.window) > now);
    if p.max_attempts > 0 && s.attempts.len() < p.max_attempts as usize {
        s.loop_escalated = false;
    }
    if let Some(last) = s.last_start {
        let until = plus(last, p.cooldown);
        if now < until {
            return TargetDecision::Cooldown { until };
        }
    }
    if p.max_attempts > 0 && s.attempts.len() >= p.max_attempts as usize {
        let escalate = !s.loop_escalated;
        s.loop_escalated = true;
        return TargetDecision::LoopGuard {
            escalate,
            attempts: s.attempts.len(),
            until: plus(s.attempts[0], p.window),
        };
    }
    s.attempts.push(now);
    s.last_start = Some(now);
    TargetDecision::Run
}

/// A playbook's circuit breaker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BreakerState {
    /// Outcomes of the last runs, oldest first; `true` is a failure.
    pub recent: Vec<bool>,
    pub opened_at: Option<Timestamp>,
    /// A half-open trial run started at this time and has not reported yet.
    pub probe_started: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BreakerDecision {
    Closed,
    /// Half-open: this run is the trial.
    Probe,
    Open {
        since: Timestamp,
    },
}

pub fn breaker_admit(s: &mut BreakerState, now: Timestamp, p: &BreakerPolicy) -> BreakerDecision {
    let Some(opened) = s.opened_at else {
        return BreakerDecision::Closed;
    };
    // A trial that never reported (e.g. the process died) frees the slot after a cooldown.
    let trial_pending = s.probe_started.is_some_and(|t| now < plus(t, p.cooldown));
    if now < plus(opened, p.cooldown) || trial_pending {
        return BreakerDecision::Open { since: opened };
    }
    s.probe_started = Some(now);
    BreakerDecision::Probe
}

pub fn breaker_record(s: &mut BreakerState, failed: bool, now: Timestamp, p: &BreakerPolicy) {
    if s.opened_at.is_some() {
        s.probe_started = None;
        if failed {
            s.opened_at = Some(now);
        } else {
            s.opened_at = None;
            s.recent.clear();
        }
        return;
    }
    s.recent.push(failed);
    let keep = p.of_last.max(1) as usize;
    if s.recent.len() > keep {
        s.recent.drain(..s.recent.len() - keep);
    }
    if p.failures > 0 && s.recent.iter().filter(|f| **f).count() >= p.failures as usize {
        s.opened_at = Some(now);
        s.recent.clear();
    }
}

/// Identity of a target: the playbook plus the selected labels.
pub fn target_key(playbook: &str, alert: &Alert, labels: Option<&[String]>) -> String {
    let mut key = String::from(playbook);
    for (k, v) in &alert.labels {
        if labels.is_none_or(|l| l.iter().any(|x| x == k)) {
            key.push('\0');
            key.push_str(k);
            key.push('=');
            key.push_str(v);
        }
    }
    key
}

/// The guards' answer for one delivery of an alert to a playbook.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// A repeat delivery; the run that owns it.
    RepeatOf(RunId),
    /// The first delivery (or the same run, re-processed after a crash): the target's decision.
    Target(TargetDecision),
}

/// The guards' sled trees. Open it once per database and clone it: the breakers are cached.
#[derive(Clone)]
pub struct Guards {
    /// Claims of playbooks whose target is a subset of the labels.
    claims: sled::Tree,
    /// Claims made before they moved into target records; read while not empty.
    legacy: sled::Tree,
    legacy_live: Arc<AtomicBool>,
    targets: sled::Tree,
    breakers: sled::Tree,
    /// Breaker states by playbook, read from `breakers` once and written through when they
    /// change. Every run consults its playbook's breaker twice (admission and outcome), and a
    /// closed breaker's state rarely changes, so most of those cost no read, decode or encode.
    breaker_states: Arc<Mutex<HashMap<String, BreakerState>>>,
}

fn claim_key(alert: &Alert, playbook: &str) -> String {
    format!(
        "{}\0{}\0{playbook}",
        alert.fingerprint,
        alert.starts_at.as_nanosecond()
    )
}

fn owner_of(v: &[u8]) -> Option<RunId> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

impl Guards {
    pub fn open(store: &Store) -> Result<Guards, StoreError> {
        let legacy = store.tree("dedup")?;
        Ok(Guards {
            claims: store.tree("claims")?,
            legacy_live: Arc::new(AtomicBool::new(!legacy.is_empty())),
            legacy,
            targets: store.tree("targets")?,
            breakers: store.tree("breakers")?,
            breaker_states: Arc::default(),
        })
    }

    /// Claims the delivery (fingerprint, startsAt, playbook) for `run` and, when it is the first,
    /// decides whether the target may be remediated now (recording the attempt when it may). A
    /// later delivery of the same episode gets `RepeatOf` and changes nothing.
    pub fn admit(
        &self,
        alert: &Alert,
        playbook: &str,
        run: RunId,
        now: Timestamp,
        p: &GuardPolicy,
    ) -> Result<Admission, StoreError> {
        if self.legacy_live.load(Ordering::Relaxed) {
            if let Some(owner) = self.legacy.get(claim_key(alert, playbook))? {
                let owner = owner_of(&owner).unwrap_or(run);
                if owner != run {
                    return Ok(Admission::RepeatOf(owner));
                }
            }
        }
        let key = target_key(playbook, alert, p.target_labels.as_deref());
        if p.target_labels.is_some() {
            if let Some(owner) = self.claim_shared(alert, playbook, run)? {
                return Ok(Admission::RepeatOf(owner));
            }
            return Ok(Admission::Target(self.admit_target(&key, now, p)?));
        }
        let starts = alert.starts_at.as_nanosecond();
        // Most deliveries are an alert's first, so its record is guessed absent: one
        // compare-and-swap instead of a read and a compare-and-swap.
        update(
            &self.targets,
            key.as_bytes(),
            None,
            |s: &mut TargetState| match claim_in(s, starts, run) {
                Some(owner) => Admission::RepeatOf(owner),
                None => Admission::Target(decide_target(s, now, p)),
            },
        )
    }

    /// A run asked for by hand: no repeat-delivery check (it runs an alert again on purpose), but
    /// the target's cooldown and attempts window as for any run.
    pub fn admit_manual(
        &self,
        alert: &Alert,
        playbook: &str,
        now: Timestamp,
        p: &GuardPolicy,
    ) -> Result<TargetDecision, StoreError> {
        let key = target_key(playbook, alert, p.target_labels.as_deref());
        self.admit_target(&key, now, p)
    }

    /// Claims in the shared tree; `Some(owner)` when another run owns the delivery.
    fn claim_shared(
        &self,
        alert: &Alert,
        playbook: &str,
        run: RunId,
    ) -> Result<Option<RunId>, StoreError> {
        let value = run.to_string();
        let current = match self.claims.compare_and_swap(
            claim_key(alert, playbook),
            None as Option<&[u8]>,
            Some(value.as_bytes()),
        )? {
            Ok(()) => return Ok(None),
            Err(e) => e.current,
        };
        let owner = current.and_then(|v| owner_of(&v)).unwrap_or(run);
        Ok((owner != run).then_some(owner))
    }

    pub fn admit_target(
        &self,
        key: &str,
        now: Timestamp,
        p: &GuardPolicy,
    ) -> Result<TargetDecision, StoreError> {
        let stored = self.targets.get(key)?;
        update(
            &self.targets,
            key.as_bytes(),
            stored,
            |s: &mut TargetState| decide_target(s, now, p),
        )
    }

    pub fn admit_breaker(
        &self,
        playbook: &str,
        now: Timestamp,
        p: &BreakerPolicy,
    ) -> Result<BreakerDecision, StoreError> {
        self.update_breaker(playbook, |s| breaker_admit(s, now, p))
    }

    pub fn record_breaker(
        &self,
        playbook: &str,
        failed: bool,
        now: Timestamp,
        p: &BreakerPolicy,
    ) -> Result<(), StoreError> {
        self.update_breaker(playbook, |s| breaker_record(s, failed, now, p))
    }

    /// Applies `f` to the playbook's breaker; a changed state is written to sled before the cache
    /// takes it. The lock serializes a playbook's updates as compare-and-swap did.
    fn update_breaker<R>(
        &self,
        playbook: &str,
        f: impl FnOnce(&mut BreakerState) -> R,
    ) -> Result<R, StoreError> {
        let mut states = self
            .breaker_states
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !states.contains_key(playbook) {
            let state = match self.breakers.get(playbook)? {
                Some(v) => decode_record(playbook.as_bytes(), &v)?,
                None => BreakerState::default(),
            };
            states.insert(playbook.to_owned(), state);
        }
        let state = states.get_mut(playbook).expect("inserted above");
        let mut next = state.clone();
        let r = f(&mut next);
        if next != *state {
            let bytes = serde_json::to_vec(&next).expect("guard state serializes");
            self.breakers.insert(playbook, bytes)?;
            *state = next;
        }
        Ok(r)
    }

    /// A playbook's breaker as stored, for the console.
    pub fn breaker_state(&self, playbook: &str) -> Result<Option<BreakerState>, StoreError> {
        match self.breakers.get(playbook)? {
            Some(v) => Ok(Some(decode_record(playbook.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Up to `limit` of a playbook's target records, each with its labels as `name=value, …`,
    /// for the console.
    pub fn targets_of(
        &self,
        playbook: &str,
        limit: usize,
    ) -> Result<Vec<(String, TargetState)>, StoreError> {
        let mut prefix = playbook.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for kv in self.targets.scan_prefix(&prefix).take(limit) {
            let (k, v) = kv?;
            let labels = String::from_utf8_lossy(&k[prefix.len()..]).replace('\0', ", ");
            out.push((labels, decode_record(&k, &v)?));
        }
        Ok(out)
    }

    /// Forgets delivery claims older than `cutoff` (by the alert's startsAt) in the claim trees;
    /// claims in target records go with their records (see [`Guards::prune_targets`]).
    pub fn prune_claims(&self, cutoff: Timestamp) -> Result<usize, StoreError> {
        let mut n = 0;
        for tree in [&self.claims, &self.legacy] {
            for kv in tree.iter() {
                let (k, _) = kv?;
                let starts: Option<i128> = std::str::from_utf8(&k)
                    .ok()
                    .and_then(|s| s.split('\0').nth(1))
                    .and_then(|s| s.parse().ok());
                if starts.is_some_and(|s| s < cutoff.as_nanosecond()) {
                    tree.remove(k)?;
                    n += 1;
                }
            }
        }
        self.legacy_live
            .store(!self.legacy.is_empty(), Ordering::Relaxed);
        Ok(n)
    }

    /// Forgets target records that no longer affect a decision: the last run started longer ago
    /// than the playbook's window and cooldown, so the record decides exactly as a missing one
    /// would. Such a record that still holds a delivery claim of an episode that started after
    /// `claim_cutoff` is cut down to its claims instead; only deletions are counted. `horizon`
    /// gives a playbook's max(window, cooldown), `None` for a playbook no longer loaded, whose
    /// records go once their last run is older than `claim_cutoff`. A record updated meanwhile
    /// is kept (compare-and-swap on the value read).
    pub fn prune_targets(
        &self,
        now: Timestamp,
        claim_cutoff: Timestamp,
        horizon: impl Fn(&str) -> Option<Duration>,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.targets.iter() {
            let (k, v) = kv?;
            let playbook = k.split(|b| *b == 0).next().unwrap_or(&k);
            let stale_before = match horizon(&String::from_utf8_lossy(playbook)) {
                Some(h) => crate::clock::earlier(now, h),
                None => claim_cutoff,
            };
            // A corrupt record is left for a human: pruning it would reset the target's guards.
            let Ok(state) = serde_json::from_slice::<TargetState>(&v) else {
                continue;
            };
            if state.last_start.is_some_and(|t| t >= stale_before) {
                continue;
            }
            let claimed = state
                .claims
                .iter()
                .any(|c| c.starts >= claim_cutoff.as_nanosecond());
            // A stale record still holding claims keeps only them: it decides as a new target.
            let trimmed = claimed.then(|| TargetState {
                claims: state.claims,
                ..TargetState::default()
            });
            let new = trimmed.map(|s| serde_json::to_vec(&s).expect("guard state serializes"));
            if new.as_deref() == Some(&v[..]) {
                continue;
            }
            if self.targets.compare_and_swap(&k, Some(&v), new)?.is_ok() && !claimed {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// A stored guard record. One that does not decode is an error, never an empty record: reading
/// it as empty would reset the target's cooldown, attempts and breaker without a word. The
/// engine refuses the run, counts the error and pages (see `Engine::admit`).
fn decode_record<S: DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<S, StoreError> {
    serde_json::from_slice(v).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).replace('\0', "/"),
        source,
    })
}

/// Read-modify-write of one record with compare-and-swap, retried on conflict; no write when the
/// record is unchanged. It starts from `old`: the value read, or a guess (`None` for records that
/// are usually new, saving the read). A wrong guess costs one failed compare-and-swap, which
/// returns the stored value to go on from.
fn update<S, R>(
    tree: &sled::Tree,
    key: &[u8],
    mut old: Option<sled::IVec>,
    mut f: impl FnMut(&mut S) -> R,
) -> Result<R, StoreError>
where
    S: Serialize + DeserializeOwned + Default,
{
    loop {
        let mut state: S = match &old {
            Some(v) => decode_record(key, v)?,
            None => S::default(),
        };
        let r = f(&mut state);
        let new = serde_json::to_vec(&state).expect("guard state serializes");
        // An unchanged state needs no write (a repeat delivery, for one).
        if old.as_deref() == Some(new.as_slice()) {
            return Ok(r);
        }
        match tree.compare_and_swap(key, old, Some(new))? {
            Ok(()) => return Ok(r),
            Err(e) => old = e.current,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn policy(max_attempts: u32, window: u64, cooldown: u64) -> GuardPolicy {
        GuardPolicy {
            max_attempts,
            window: Duration::from_secs(window),
            cooldown: Duration::from_secs(cooldown),
            ..GuardPolicy::default()
        }
    }

    #[test]
    fn attempts_are_limited_per_window_and_the_loop_pages_once() {
        let p = policy(3, 3600, 0);
        let mut s = TargetState::default();
        for i in 0..3 {
            assert_eq!(decide_target(&mut s, t(i), &p), TargetDecision::Run);
        }
        assert!(matches!(
            decide_target(&mut s, t(10), &p),
            TargetDecision::LoopGuard {
                escalate: true,
                attempts: 3,
                ..
            }
        ));
        assert!(matches!(
            decide_target(&mut s, t(20), &p),
            TargetDecision::LoopGuard {
                escalate: false,
                ..
            }
        ));
        // The first attempt leaves the window one hour after it started.
        assert_eq!(decide_target(&mut s, t(3600), &p), TargetDecision::Run);
        // A new episode pages again, once.
        assert!(matches!(
            decide_target(&mut s, t(3600), &p),
            TargetDecision::LoopGuard { escalate: true, .. }
        ));
        assert!(matches!(
            decide_target(&mut s, t(3600), &p),
            TargetDecision::LoopGuard {
                escalate: false,
                ..
            }
        ));
    }

    #[test]
    fn cooldown_holds_back_a_new_run() {
        let p = policy(0, 3600, 300);
        let mut s = TargetState::default();
        assert_eq!(decide_target(&mut s, t(0), &p), TargetDecision::Run);
        assert_eq!(
            decide_target(&mut s, t(299), &p),
            TargetDecision::Cooldown { until: t(300) }
        );
        assert_eq!(decide_target(&mut s, t(300), &p), TargetDecision::Run);
    }

    #[test]
    fn breaker_opens_on_failures_half_opens_after_cooldown_and_closes_on_success() {
        let p = BreakerPolicy {
            failures: 2,
            of_last: 3,
            cooldown: Duration::from_secs(60),
        };
        let mut s = BreakerState::default();
        assert_eq!(breaker_admit(&mut s, t(0), &p), BreakerDecision::Closed);
        breaker_record(&mut s, true, t(0), &p);
        breaker_record(&mut s, false, t(1), &p);
        assert_eq!(breaker_admit(&mut s, t(2), &p), BreakerDecision::Closed);
        breaker_record(&mut s, true, t(2), &p);
        assert_eq!(
            breaker_admit(&mut s, t(3), &p),
            BreakerDecision::Open { since: t(2) }
        );
        assert_eq!(breaker_admit(&mut s, t(62), &p), BreakerDecision::Probe);
        assert!(
            matches!(
                breaker_admit(&mut s, t(63), &p),
                BreakerDecision::Open { .. }
            ),
            "one trial at a time"
        );
        breaker_record(&mut s, true, t(64), &p);
        assert!(
            matches!(
                breaker_admit(&mut s, t(100), &p),
                BreakerDecision::Open { .. }
            ),
            "a failed trial re-opens"
        );
        assert_eq!(breaker_admit(&mut s, t(124), &p), BreakerDecision::Probe);
        breaker_record(&mut s, false, t(125), &p);
        assert_eq!(breaker_admit(&mut s, t(126), &p), BreakerDecision::Closed);
    }

    #[test]
    fn target_keys_use_the_selected_labels() {
        let body = include_str!("../tests/fixtures/alertmanager-0.25-firing.json");
        let a = crate::domain::decode_webhook(body.as_bytes())
            .unwrap()
            .alerts
            .remove(0);
        assert_eq!(
            target_key("p", &a, Some(&["instance".to_owned()])),
            "p\0instance=curl-test"
        );
        assert_eq!(target_key("p", &a, None).matches('\0').count(), 3);
    }

    fn fixture_alert() -> Alert {
        let body = include_str!("../tests/fixtures/alertmanager-0.25-firing.json");
        crate::domain::decode_webhook(body.as_bytes())
            .unwrap()
            .alerts
            .remove(0)
    }

    fn run(seq: u64) -> RunId {
        RunId { seq, index: 0 }
    }

    /// Guards on a fresh database, with the directory that holds it.
    fn open_guards() -> (tempfile::TempDir, Guards) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let g = Guards::open(&store).unwrap();
        (dir, g)
    }

    #[tokio::test]
    async fn breaker_changes_are_written_through_and_a_new_cache_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let g = Guards::open(&store).unwrap();
        let p = BreakerPolicy {
            failures: 2,
            of_last: 3,
            cooldown: Duration::from_secs(60),
        };
        assert_eq!(
            g.admit_breaker("p", t(0), &p).unwrap(),
            BreakerDecision::Closed
        );
        assert!(
            g.breakers.is_empty(),
            "a closed breaker's admission writes nothing"
        );
        g.record_breaker("p", true, t(0), &p).unwrap();
        g.record_breaker("p", true, t(1), &p).unwrap();
        let open = BreakerDecision::Open { since: t(1) };
        assert_eq!(g.admit_breaker("p", t(2), &p).unwrap(), open);
        assert_eq!(
            g.admit_breaker("q", t(2), &p).unwrap(),
            BreakerDecision::Closed
        );
        // What a restart sees: the stored state, through an empty cache.
        let restarted = Guards::open(&store).unwrap();
        assert_eq!(restarted.admit_breaker("p", t(3), &p).unwrap(), open);
        assert_eq!(
            restarted.admit_breaker("p", t(62), &p).unwrap(),
            BreakerDecision::Probe
        );
    }

    #[tokio::test]
    async fn a_corrupt_record_makes_the_guard_refuse_instead_of_forgetting() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let g = Guards::open(&store).unwrap();
        let p = policy(1, 3600, 600);
        let a = fixture_alert();
        assert!(matches!(
            g.admit(&a, "p", run(1), t(0), &p).unwrap(),
            Admission::Target(TargetDecision::Run)
        ));
        let key = target_key("p", &a, None);
        g.targets
            .insert(key.as_bytes(), &b"{\"attempts\": [tru"[..])
            .unwrap();
        let mut later = a.clone();
        later.starts_at = a.starts_at + SignedDuration::from_secs(7200);
        // Read as empty, the record would let a second run through within the cooldown.
        let e = g.admit(&later, "p", run(2), t(10), &p).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("corrupt record p/"), "{e}");
        // Pruning leaves it for a human rather than resetting the target.
        g.prune_targets(t(999_999), t(999_999), |_| Some(Duration::ZERO))
            .unwrap();
        assert!(g.targets.get(key.as_bytes()).unwrap().is_some());
        g.breakers.insert("p", &b"not json"[..]).unwrap();
        let restarted = Guards::open(&store).unwrap();
        let bp = BreakerPolicy::default();
        assert!(restarted.admit_breaker("p", t(0), &bp).is_err());
    }

    #[tokio::test]
    async fn deliveries_are_claimed_first_come_in_the_target_record() {
        let (_dir, g) = open_guards();
        let p = policy(0, 3600, 0);
        let a = fixture_alert();
        let admit = |a: &Alert, playbook, r| g.admit(a, playbook, r, t(0), &p).unwrap();
        let run_ = Admission::Target(TargetDecision::Run);
        assert_eq!(admit(&a, "p", run(1)), run_);
        assert_eq!(admit(&a, "p", run(1)), run_, "the same run, re-processed");
        assert_eq!(admit(&a, "p", run(2)), Admission::RepeatOf(run(1)));
        assert_eq!(admit(&a, "other", run(2)), run_);
        // A new episode (startsAt) of the alert is a new delivery.
        let mut next = a.clone();
        next.starts_at = a.starts_at + SignedDuration::from_secs(60);
        assert_eq!(admit(&next, "p", run(3)), run_);
        assert_eq!(admit(&next, "p", run(4)), Admission::RepeatOf(run(3)));
        assert!(g.claims.is_empty(), "claims live in the target records");
        assert_eq!(g.targets.len(), 2);
        // A flapping alert keeps only its last episodes' claims.
        for i in 0..40 {
            next.starts_at = a.starts_at + SignedDuration::from_secs(120 + i);
            admit(&next, "p", run(10 + i as u64));
        }
        let key = target_key("p", &a, None);
        let state: TargetState =
            serde_json::from_slice(&g.targets.get(key).unwrap().unwrap()).unwrap();
        assert_eq!(state.claims.len(), CLAIMS_PER_TARGET);
        assert_eq!(state.claims.last().unwrap().run, run(49));
    }

    #[tokio::test]
    async fn a_shared_target_claims_in_its_own_tree() {
        let (_dir, g) = open_guards();
        let p = GuardPolicy {
            target_labels: Some(vec!["instance".to_owned()]),
            ..policy(0, 3600, 0)
        };
        let a = fixture_alert();
        let run_ = Admission::Target(TargetDecision::Run);
        assert_eq!(g.admit(&a, "p", run(1), t(0), &p).unwrap(), run_);
        assert_eq!(g.admit(&a, "p", run(1), t(0), &p).unwrap(), run_);
        assert_eq!(
            g.admit(&a, "p", run(2), t(0), &p).unwrap(),
            Admission::RepeatOf(run(1))
        );
        assert_eq!(g.claims.len(), 1);
        assert_eq!(g.prune_claims(Timestamp::MAX).unwrap(), 1);
        assert_eq!(g.admit(&a, "p", run(2), t(0), &p).unwrap(), run_);
    }

    #[tokio::test]
    async fn claims_made_before_they_moved_into_target_records_still_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = fixture_alert();
        // What an earlier version wrote for run 1.
        store
            .tree("dedup")
            .unwrap()
            .insert(claim_key(&a, "p"), "1-0")
            .unwrap();
        let g = Guards::open(&store).unwrap();
        let p = policy(0, 3600, 0);
        assert_eq!(
            g.admit(&a, "p", run(2), t(0), &p).unwrap(),
            Admission::RepeatOf(run(1))
        );
        assert_eq!(
            g.admit(&a, "p", run(1), t(0), &p).unwrap(),
            Admission::Target(TargetDecision::Run),
            "the owner itself, re-processed"
        );
        assert_eq!(g.prune_claims(Timestamp::MAX).unwrap(), 1);
        assert!(!g.legacy_live.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_target_record_holding_a_live_claim_is_kept() {
        let (_dir, g) = open_guards();
        let p = policy(0, 100, 0);
        let a = fixture_alert();
        g.admit(&a, "p", run(1), t(0), &p).unwrap();
        let horizon = |_: &str| Some(Duration::from_secs(100));
        let before_episode = a.starts_at - SignedDuration::from_secs(1);
        assert_eq!(
            g.prune_targets(t(1000), before_episode, horizon).unwrap(),
            0
        );
        let key = target_key("p", &a, None);
        let kept: TargetState =
            serde_json::from_slice(&g.targets.get(&key).unwrap().unwrap()).unwrap();
        assert_eq!(
            kept,
            TargetState {
                claims: vec![DeliveryClaim {
                    starts: a.starts_at.as_nanosecond(),
                    run: run(1)
                }],
                ..TargetState::default()
            },
            "cut down to its claims"
        );
        assert_eq!(
            g.admit(&a, "p", run(2), t(1000), &p).unwrap(),
            Admission::RepeatOf(run(1))
        );
        // It decides as a new target would: a new episode runs at once.
        let mut next = a.clone();
        next.starts_at = a.starts_at + SignedDuration::from_secs(1);
        assert_eq!(
            g.admit(&next, "p", run(3), t(1000), &p).unwrap(),
            Admission::Target(TargetDecision::Run)
        );
        assert_eq!(
            g.prune_targets(t(2000), Timestamp::MAX, horizon).unwrap(),
            1
        );
        assert!(g.targets.is_empty());
    }

    #[tokio::test]
    async fn stale_target_records_are_pruned_and_decide_as_missing_ones() {
        let (_dir, g) = open_guards();
        let p = policy(2, 100, 10);
        let horizon = |name: &str| (name == "p").then_some(Duration::from_secs(100));
        for (key, at) in [
            ("p\0a=1", 0),
            ("p\0a=2", 50),
            ("gone\0a=1", 0),
            ("gone\0a=2", 90),
        ] {
            g.admit_target(key, t(at), &p).unwrap();
            g.admit_target(key, t(at + 20), &p).unwrap();
        }
        // At 125 "p a=1" last started at 20: older than the 100 s window, so it goes; "p a=2"
        // (last start 70) stays. The unloaded playbook's records go once older than the cutoff.
        assert_eq!(g.prune_targets(t(125), t(50), horizon).unwrap(), 2);
        let left: Vec<_> = g.targets.iter().keys().map(|k| k.unwrap()).collect();
        assert_eq!(left, [&b"gone\0a=2"[..], &b"p\0a=2"[..]]);
        assert_eq!(
            g.admit_target("p\0a=2", t(125), &p).unwrap(),
            TargetDecision::LoopGuard {
                escalate: true,
                attempts: 2,
                until: t(150)
            },
            "a kept record still limits"
        );
        assert_eq!(
            g.admit_target("p\0a=1", t(125), &p).unwrap(),
            TargetDecision::Run
        );
    }
}
