//! Maintenance pauses: for a while, the alerts of one playbook, or the alerts matching a set of
//! Alertmanager matchers, are recorded as `paused` runs and nothing acts on them; reactor pages
//! nobody for them (the humans' own Alertmanager route still applies). A pause expires by itself
//! at its `until` and can be lifted early. Pauses live in sled (tree `pauses`); the engine reads
//! an in-memory copy of the ones in force, so an alert with no pause in force costs one read of
//! a lock.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::bounds::{parse_duration, Span};
use crate::domain::Labels;
use crate::history::{Store, StoreError};
use crate::playbook::{parse_matchers, LabelMatcher};

/// How long a pause may last: one second to thirty days.
pub const PAUSE_LENGTH: Span = Span {
    min: Duration::from_secs(1),
    max: Duration::from_secs(30 * 24 * 3600),
};
/// Longest reason and `by` a pause keeps.
pub const MAX_REASON: usize = 1024;
pub const MAX_BY: usize = 128;
/// How long an ended pause stays listed (`?all=true`).
pub const KEPT_AFTER_END: Duration = Duration::from_secs(30 * 24 * 3600);
/// At most this many pauses in force at once.
pub const MAX_IN_FORCE: usize = 1000;

/// One pause, as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pause {
    pub id: u64,
    /// Only this playbook's runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub playbook: Option<String>,
    /// Only alerts these Alertmanager matchers select (`namespace="shop"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matchers: Option<String>,
    pub reason: String,
    pub by: String,
    pub created_at: Timestamp,
    /// When it expires by itself.
    pub until: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifted_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifted_by: Option<String>,
}

impl Pause {
    /// In force at `now`: not lifted and not expired.
    pub fn in_force(&self, now: Timestamp) -> bool {
        self.lifted_at.is_none() && now < self.until
    }
}

/// A request to pause, before it is checked.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewPause {
    #[serde(default)]
    pub playbook: Option<String>,
    #[serde(default)]
    pub matchers: Option<String>,
    /// How long: `2h`, `30m`.
    #[serde(rename = "for")]
    pub length: String,
    pub reason: String,
    #[serde(default)]
    pub by: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// The request names a field wrongly: the message names it.
    #[error("{0}")]
    Invalid(String),
    #[error("no pause {0}")]
    NotFound(u64),
    #[error("pause {0} is no longer in force: it expired or was lifted")]
    NotInForce(u64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sled::Error> for PauseError {
    fn from(e: sled::Error) -> Self {
        PauseError::Store(e.into())
    }
}

/// The pauses in force, each with its matchers parsed.
type InForce = Arc<RwLock<Vec<(Pause, Vec<LabelMatcher>)>>>;

/// The pauses: sled, and the ones in force with their matchers parsed.
#[derive(Clone)]
pub struct Pauses {
    store: Store,
    tree: sled::Tree,
    in_force: InForce,
}

impl Pauses {
    /// The pauses in `store`, with those in force at `now` read into memory.
    pub fn open(store: &Store, now: Timestamp) -> Result<Pauses, StoreError> {
        let pauses = Pauses {
            store: store.clone(),
            tree: store.tree("pauses")?,
            in_force: Arc::default(),
        };
        pauses.refresh(now)?;
        Ok(pauses)
    }

    /// Reads the pauses in force at `now` from sled into memory, and forgets those that ended
    /// more than [`KEPT_AFTER_END`] ago.
    fn refresh(&self, now: Timestamp) -> Result<(), StoreError> {
        let mut live = Vec::new();
        let forget_before =
            now - jiff::SignedDuration::try_from(KEPT_AFTER_END).unwrap_or_default();
        for p in self.all()? {
            if p.lifted_at.unwrap_or(p.until) < forget_before {
                self.tree.remove(p.id.to_be_bytes())?;
                continue;
            }
            if p.in_force(now) {
                let matchers = p
                    .matchers
                    .as_deref()
                    .and_then(|m| parse_matchers(m).ok())
                    .unwrap_or_default();
                live.push((p, matchers));
            }
        }
        *self.in_force.write().unwrap() = live;
        Ok(())
    }

    /// Every pause, newest first.
    pub fn all(&self) -> Result<Vec<Pause>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.iter().rev() {
            let (_, v) = kv?;
            if let Ok(p) = serde_json::from_slice::<Pause>(&v) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// The pause in force at `now` that holds `playbook`'s run for an alert with `labels`.
    pub fn holding(&self, labels: &Labels, playbook: &str, now: Timestamp) -> Option<Pause> {
        let live = self.in_force.read().unwrap();
        live.iter()
            .find(|(p, matchers)| {
                p.in_force(now)
                    && p.playbook.as_deref().is_none_or(|name| name == playbook)
                    && matchers.iter().all(|m| m.matches(labels))
            })
            .map(|(p, _)| p.clone())
    }

    /// Checks `new` and stores it as a pause from `now`. `loaded`: whether a playbook of that
    /// name is loaded. Durable when this returns.
    pub async fn create(
        &self,
        new: NewPause,
        loaded: impl Fn(&str) -> bool,
        now: Timestamp,
    ) -> Result<Pause, PauseError> {
        let invalid = |m: String| PauseError::Invalid(m);
        let playbook = new.playbook.filter(|p| !p.trim().is_empty());
        let matchers = new.matchers.filter(|m| !m.trim().is_empty());
        if playbook.is_none() && matchers.is_none() {
            return Err(invalid(
                "playbook or matchers: a pause names a playbook, matchers, or both".into(),
            ));
        }
        if let Some(p) = &playbook {
            if !loaded(p) {
                return Err(invalid(format!("playbook: no playbook {p:?} is loaded")));
            }
        }
        if let Some(m) = &matchers {
            let parsed = parse_matchers(m).map_err(|e| invalid(format!("matchers: {e}")))?;
            if parsed.is_empty() {
                return Err(invalid("matchers: at least one matcher".into()));
            }
        }
        let length = parse_duration("for", &new.length, PAUSE_LENGTH).map_err(invalid)?;
        let reason = new.reason.trim().to_owned();
        if reason.is_empty() {
            return Err(invalid("reason: say why reactor pauses".into()));
        }
        if reason.len() > MAX_REASON {
            return Err(invalid(format!("reason: longer than {MAX_REASON} bytes")));
        }
        let by = new.by.unwrap_or_else(|| "api".into());
        if by.is_empty() || by.len() > MAX_BY {
            return Err(invalid(format!("by: 1 to {MAX_BY} bytes")));
        }
        if self.in_force.read().unwrap().len() >= MAX_IN_FORCE {
            return Err(invalid(format!(
                "at most {MAX_IN_FORCE} pauses in force; lift some first"
            )));
        }
        let mut pause = Pause {
            id: 0,
            playbook,
            matchers,
            reason,
            by,
            created_at: now,
            until: crate::clock::later(now, length),
            lifted_at: None,
            lifted_by: None,
        };
        // The next number; another create taking it meanwhile makes this one try the next.
        loop {
            pause.id = match self.tree.last()? {
                Some((k, _)) => <[u8; 8]>::try_from(&*k).map_or(1, |b| u64::from_be_bytes(b) + 1),
                None => 1,
            };
            let value = serde_json::to_vec(&pause).expect("a pause serializes");
            let key = pause.id.to_be_bytes();
            if self
                .tree
                .compare_and_swap(key, None as Option<&[u8]>, Some(value))?
                .is_ok()
            {
                break;
            }
        }
        self.store.history_durable().await?;
        self.refresh(now)?;
        Ok(pause)
    }

    /// Lifts pause `id` early, by `by`.
    pub async fn lift(&self, id: u64, by: &str, now: Timestamp) -> Result<Pause, PauseError> {
        let key = id.to_be_bytes();
        let old = self.tree.get(key)?.ok_or(PauseError::NotFound(id))?;
        let mut pause: Pause =
            serde_json::from_slice(&old).map_err(|_| PauseError::NotFound(id))?;
        if !pause.in_force(now) {
            return Err(PauseError::NotInForce(id));
        }
        pause.lifted_at = Some(now);
        pause.lifted_by = Some(by.chars().take(MAX_BY).collect());
        let new = serde_json::to_vec(&pause).expect("a pause serializes");
        if self
            .tree
            .compare_and_swap(key, Some(old), Some(new))?
            .is_err()
        {
            return Err(PauseError::NotInForce(id));
        }
        self.store.history_durable().await?;
        self.refresh(now)?;
        Ok(pause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(namespace: &str) -> Labels {
        let mut labels = Labels::default();
        labels.insert("alertname".into(), "KubePodCrashLooping".into());
        labels.insert("namespace".into(), namespace.into());
        labels
    }

    #[tokio::test]
    async fn a_pause_holds_matching_alerts_until_it_expires_or_is_lifted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let pauses = Pauses::open(&store, Timestamp::now()).unwrap();
        let now: Timestamp = "2026-12-03T10:00:00Z".parse().unwrap();
        let new = NewPause {
            matchers: Some("namespace=\"shop\"".into()),
            length: "2h".into(),
            reason: "database migration".into(),
            ..NewPause::default()
        };
        let p = pauses.create(new, |_| true, now).await.unwrap();
        assert!(pauses.holding(&alert("shop"), "any", now).is_some());
        assert!(pauses.holding(&alert("web"), "any", now).is_none());
        let later = crate::clock::later(now, Duration::from_secs(7200));
        assert!(
            pauses.holding(&alert("shop"), "any", later).is_none(),
            "expired"
        );
        pauses.lift(p.id, "ann", now).await.unwrap();
        assert!(
            pauses.holding(&alert("shop"), "any", now).is_none(),
            "lifted"
        );
        assert!(matches!(
            pauses.lift(p.id, "ann", now).await,
            Err(PauseError::NotInForce(_))
        ));
        // Pauses survive a restart.
        drop(pauses);
        let again = Pauses::open(&store, Timestamp::now()).unwrap();
        assert_eq!(again.all().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_bad_pause_is_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let pauses = Pauses::open(&store, Timestamp::now()).unwrap();
        let now = Timestamp::now();
        let refused = |new: NewPause| {
            let pauses = pauses.clone();
            async move {
                match pauses.create(new, |p| p == "known", now).await {
                    Err(PauseError::Invalid(m)) => m,
                    other => panic!("{other:?}"),
                }
            }
        };
        let base = NewPause {
            playbook: Some("known".into()),
            length: "1h".into(),
            reason: "why".into(),
            ..NewPause::default()
        };
        let e = refused(NewPause {
            playbook: None,
            ..base.clone()
        })
        .await;
        assert!(e.starts_with("playbook or matchers"), "{e}");
        let e = refused(NewPause {
            playbook: Some("nope".into()),
            ..base.clone()
        })
        .await;
        assert!(e.starts_with("playbook: "), "{e}");
        let e = refused(NewPause {
            matchers: Some("=\"shop\"".into()),
            ..base.clone()
        })
        .await;
        assert!(e.starts_with("matchers: "), "{e}");
        let e = refused(NewPause {
            length: "31d".into(),
            ..base.clone()
        })
        .await;
        assert!(e.starts_with("for: "), "{e}");
        let e = refused(NewPause {
            reason: " ".into(),
            ..base.clone()
        })
        .await;
        assert!(e.starts_with("reason: "), "{e}");
    }
}
