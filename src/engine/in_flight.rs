//! The runs executing now, with what cancelling them, draining them at shutdown and spotting a
//! stuck one needs. The engine owns it; the watchdog holds it to check for stuck runs, and needs
//! nothing else of the engine for that.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::domain::Fingerprint;
use crate::history::RunId;

/// A run in progress.
pub struct InFlight {
    pub fingerprint: Fingerprint,
    pub playbook: String,
    pub cancel: CancellationToken,
    pub started: Instant,
    /// The longest the run's steps may take: timeouts, retries and retry delays.
    pub budget: Duration,
}

/// Every run in progress, by id.
#[derive(Default)]
pub struct InFlightRuns(Mutex<HashMap<RunId, InFlight>>);

impl InFlightRuns {
    fn lock(&self) -> MutexGuard<'_, HashMap<RunId, InFlight>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn insert(&self, id: RunId, run: InFlight) {
        self.lock().insert(id, run);
    }

    pub fn remove(&self, id: RunId) {
        self.lock().remove(&id);
    }

    /// Forgets the runs of the alert accepted as `seq`; returns how many there were.
    pub fn forget_alert(&self, seq: u64) -> usize {
        let mut runs = self.lock();
        let before = runs.len();
        runs.retain(|id, _| id.seq != seq);
        before - runs.len()
    }

    pub fn ids(&self) -> Vec<RunId> {
        self.lock().keys().copied().collect()
    }

    /// Cancels the runs of `playbook` for the alert `fingerprint`; returns their ids.
    pub fn cancel(&self, fingerprint: &Fingerprint, playbook: &str) -> Vec<RunId> {
        self.lock()
            .iter()
            .filter(|(_, f)| &f.fingerprint == fingerprint && f.playbook == playbook)
            .map(|(id, f)| {
                f.cancel.cancel();
                *id
            })
            .collect()
    }

    /// Runs in flight longer than their time budget plus `grace`, with how far past they are.
    pub fn stuck(&self, grace: Duration) -> Vec<(RunId, Duration)> {
        self.lock()
            .iter()
            .filter_map(|(id, f)| {
                let over = f
                    .started
                    .elapsed()
                    .checked_sub(f.budget.saturating_add(grace))?;
                Some((*id, over))
            })
            .collect()
    }
}
