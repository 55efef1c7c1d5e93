//! History retention: a background task that prunes runs past the configured age or count, the
//! delivery claims of alerts that old, settled outbox entries of pruned runs, and target guard
//! records that no longer affect a decision.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::HistorySettings;
use crate::escalation::outbox::Outbox;
use crate::guard::Guards;
use crate::history::{Store, StoreError};
use crate::playbook::InForce;

/// What pruning touches: the history, the outbox and guard records that follow the runs, the
/// clock, and the playbooks (whose guard windows say how long a target record matters).
#[derive(Clone)]
pub struct Retention {
    pub store: Store,
    pub outbox: Outbox,
    pub notifier: crate::notify::Notifier,
    pub guards: Guards,
    pub clock: Arc<dyn Clock>,
    pub playbooks: Arc<InForce>,
}

/// Prunes every `prune_interval` until `shutdown`.
pub async fn prune_loop(
    retention: Retention,
    settings: HistorySettings,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(settings.prune_interval) => {},
        }
        let r = retention.clone();
        let s = settings.clone();
        let result = tokio::task::spawn_blocking(move || prune_once(&r, &s)).await;
        match result {
            Ok(Ok(n)) if n > 0 => tracing::info!(removed = n, "pruned old history"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "history pruning failed"),
            Err(e) => tracing::error!(error = %e, "history pruning task failed"),
        }
    }
}

/// One pruning pass; returns how many runs were removed.
pub fn prune_once(r: &Retention, settings: &HistorySettings) -> Result<usize, StoreError> {
    let now = r.clock.now();
    let cutoff = crate::clock::earlier(now, settings.max_age);
    let (removed, first_kept) = r.store.prune_runs(cutoff, settings.max_runs)?;
    if removed > 0 {
        r.outbox.prune_before(first_kept)?;
    }
    r.notifier.prune(first_kept, cutoff)?;
    r.guards.prune_claims(cutoff)?;
    let playbooks = r.playbooks.current();
    let horizons: HashMap<&str, Duration> = playbooks
        .iter()
        .map(|p| (p.name.as_str(), p.guards.window.max(p.guards.cooldown)))
        .collect();
    r.guards
        .prune_targets(now, cutoff, |name| horizons.get(name).copied())?;
    Ok(removed)
}
