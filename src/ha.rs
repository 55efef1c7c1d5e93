//! Two replicas, one leader, no duplicate actions. reactor invents no consensus of its own: the
//! Kubernetes API server (etcd) decides, through Leases (`coordination.k8s.io/v1`).
//!
//! - **Leadership.** Each replica campaigns for one Lease with `kube-leader-election` (its
//!   get/create/renew of the Lease), driven by the loop here: try every `renew_every`, each try
//!   bounded by `renew_every`. A renewal that succeeded makes this replica the leader until the
//!   Lease's end minus `clock_skew`; an error or a timeout extends nothing, so a leader cut off
//!   from the API server stops leading before its Lease can pass to another. Only the leader
//!   takes alerts, runs steps, sends heartbeats and pages; a standby answers 503.
//! - **Cluster-held guards.** Before a run acts, it takes a Lease named from a hash of its
//!   playbook and target, created or replaced only with the `resourceVersion` it read (the API
//!   server refuses a stale one with 409). While its steps run the Lease says `acting` and holds
//!   for the leader's Lease duration; when they end it says `acted` and holds for the
//!   playbook's cooldown. A run that finds another replica's `acted` lock is deduplicated; one
//!   that finds an `acting` lock waits for it to run out (its holder died mid-run) and takes it.
//!   Stale locks run out by themselves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use kube_leader_election::{LeaseLock, LeaseLockParams, LeaseLockResult};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::HaSettings;

/// Whether this replica leads, and until when it may act.
pub struct Leadership {
    enabled: bool,
    identity: String,
    origin: Instant,
    /// Milliseconds after `origin` until which this replica may act; 0: not leading.
    until_ms: AtomicU64,
    /// Who holds the Lease, as last read.
    holder: Mutex<Option<String>>,
}

impl Leadership {
    fn new(enabled: bool, identity: String) -> Arc<Leadership> {
        Arc::new(Leadership {
            enabled,
            identity,
            origin: Instant::now(),
            until_ms: AtomicU64::new(0),
            holder: Mutex::new(None),
        })
    }

    /// One replica: always the leader.
    pub fn single() -> Arc<Leadership> {
        Leadership::new(false, String::new())
    }

    /// A replica that leads only while it holds the Lease.
    pub fn elected(identity: String) -> Arc<Leadership> {
        Leadership::new(true, identity)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Whether this replica may take alerts and act now.
    pub fn is_leader(&self) -> bool {
        !self.enabled
            || (self.origin.elapsed().as_millis() as u64) < self.until_ms.load(Ordering::Acquire)
    }

    /// Returns once this replica leads (at once with one replica).
    pub async fn wait_to_lead(&self) {
        while !self.is_leader() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The holder of the Lease as last read (`None`: unknown or nobody).
    pub fn holder(&self) -> Option<String> {
        self.holder.lock().unwrap().clone()
    }

    fn hold_until(&self, until: Instant) {
        let was = self.is_leader();
        let ms = until.saturating_duration_since(self.origin).as_millis() as u64;
        self.until_ms.store(ms, Ordering::Release);
        *self.holder.lock().unwrap() = Some(self.identity.clone());
        if !was {
            tracing::info!(identity = %self.identity, "this replica leads: it takes alerts and acts");
        }
    }

    fn lose(&self, holder: Option<String>) {
        let was = self.is_leader();
        self.until_ms.store(0, Ordering::Release);
        if was {
            tracing::warn!(identity = %self.identity, holder = holder.as_deref(), "this replica no longer leads: it stops taking alerts and acting");
        }
        *self.holder.lock().unwrap() = holder;
    }
}

/// The holder named in a Lease.
fn holder_of(lease: &Lease) -> Option<String> {
    lease.spec.as_ref()?.holder_identity.clone()
}

/// The label a Service selects the leader by.
pub const ROLE_LABEL: &str = "reactor.dev/role";

/// Writes `reactor.dev/role: leader|standby` on pod `name`; whether it was written.
async fn label_pod(
    pods: &Api<k8s_openapi::api::core::v1::Pod>,
    name: &str,
    leading: bool,
    timeout: Duration,
) -> bool {
    let role = if leading { "leader" } else { "standby" };
    let patch = json!({"metadata": {"labels": {ROLE_LABEL: role}}});
    let (params, patch) = (
        kube::api::PatchParams::default(),
        kube::api::Patch::Merge(&patch),
    );
    let call = pods.patch(name, &params, &patch);
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(_)) => {
            tracing::info!(pod = name, role, "labelled this replica's pod");
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(pod = name, error = %e, "could not label this replica's pod (ha.label_pod)");
            false
        }
        Err(_) => false,
    }
}

/// Campaigns for the leader's Lease until `shutdown`, then gives it up if held.
pub async fn campaign(
    leadership: Arc<Leadership>,
    client: kube::Client,
    settings: HaSettings,
    namespace: String,
    shutdown: CancellationToken,
) {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &namespace);
    let lock = LeaseLock::new(
        client,
        &namespace,
        LeaseLockParams {
            lease_name: settings.lease_name.clone(),
            holder_id: leadership.identity().to_owned(),
            lease_ttl: settings.lease_duration,
        },
    );
    // The role last written on this replica's pod (None: not yet, or it failed).
    let mut labelled: Option<bool> = None;
    loop {
        let tried = Instant::now();
        if settings.label_pod {
            let leading = leadership.is_leader();
            if labelled != Some(leading) {
                labelled = label_pod(&pods, leadership.identity(), leading, settings.renew_every)
                    .await
                    .then_some(leading);
            }
        }
        match tokio::time::timeout(settings.renew_every, lock.try_acquire_or_renew()).await {
            Ok(Ok(LeaseLockResult::Acquired(lease))) => {
                // The crate's patches carry no resourceVersion: believe the Lease it got back,
                // which must name this replica (another may have written it last).
                if holder_of(&lease).as_deref() == Some(leadership.identity()) {
                    // It runs from about when we asked; minus the margin for clock skew.
                    let until = tried + settings.lease_duration.saturating_sub(settings.clock_skew);
                    leadership.hold_until(until);
                } else {
                    leadership.lose(holder_of(&lease));
                }
            }
            Ok(Ok(LeaseLockResult::NotAcquired(lease))) => leadership.lose(holder_of(&lease)),
            Ok(Err(e)) => {
                // Leading continues only until the last renewal's end: nothing is extended.
                tracing::warn!(error = %e, "could not renew or acquire the leader's Lease");
            }
            Err(_) => {
                tracing::warn!(timeout = ?settings.renew_every, "the leader's Lease: no answer from the API server");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(settings.renew_every.saturating_sub(tried.elapsed())) => {}
        }
    }
    if settings.label_pod && labelled != Some(false) {
        label_pod(&pods, leadership.identity(), false, settings.renew_every).await;
    }
    if leadership.is_leader() {
        leadership.lose(None);
        // Hand over at once instead of after the Lease runs out.
        match tokio::time::timeout(settings.renew_every, lock.step_down()).await {
            Ok(Ok(())) => tracing::info!("gave up the leader's Lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not give up the leader's Lease"),
            Err(_) => tracing::warn!("could not give up the leader's Lease: no answer"),
        }
    }
}

/// Why a run may not act on its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockRefused {
    /// Another replica holds the target's lock.
    HeldBy {
        holder: String,
        until: Timestamp,
        why: Held,
    },
    /// The lock could not be read or written.
    Unavailable(String),
}

/// What another replica's lock says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// It is acting on the target now (or died doing so: the lock runs out).
    Acting,
    /// It ran this very episode of the alert.
    SameEpisode,
    /// It acted on the target within the cooldown.
    Cooldown,
}

/// How long an `acted` lock remembers the episode it ran, whatever the cooldown.
pub const EPISODE_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// Per-target locks held in the cluster.
#[derive(Clone)]
pub struct TargetLocks {
    api: Api<Lease>,
    identity: String,
    timeout: Duration,
    /// How long an `acting` lock holds without renewal, how often it is renewed, and the margin
    /// for another node's clock.
    pub acting_hold: Duration,
    pub renew_every: Duration,
    pub clock_skew: Duration,
}

/// The lock's name: `reactor-target-` and 16 hex digits of the target's key (FNV-1a).
pub fn lock_name(key: &str) -> String {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("reactor-target-{hash:016x}")
}

const STATE: &str = "reactor/state";
const EPISODE: &str = "reactor/episode";
const COOLDOWN_UNTIL: &str = "reactor/cooldown-until";

fn annotation<'a>(lease: &'a Lease, key: &str) -> Option<&'a str> {
    lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn lease_until(lease: &Lease) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    let renewed = spec.renew_time.as_ref()?.0;
    let secs = i64::from(spec.lease_duration_seconds?);
    renewed
        .checked_add(jiff::SignedDuration::from_secs(secs))
        .ok()
}

/// What this replica writes into a lock.
struct Write<'a> {
    key: &'a str,
    episode: &'a str,
    state: &'a str,
    hold: Duration,
    cooldown_until: Option<Timestamp>,
}

impl TargetLocks {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        identity: String,
        timeout: Duration,
        settings: &HaSettings,
    ) -> Self {
        TargetLocks {
            api: Api::namespaced(client, namespace),
            identity,
            timeout,
            acting_hold: settings.lease_duration,
            renew_every: settings.renew_every,
            clock_skew: settings.clock_skew,
        }
    }

    fn lease(&self, name: &str, w: &Write, now: Timestamp, base: Option<&Lease>) -> Lease {
        let micro = |t: Timestamp| format!("{:.6}", t.display_with_offset(jiff::tz::Offset::UTC));
        let mut annotations = json!({
            // The key names labels; an annotation keeps it readable (bounded).
            "reactor/target": w.key.chars().take(1024).collect::<String>(),
            STATE: w.state,
            EPISODE: w.episode.chars().take(256).collect::<String>(),
        });
        if let Some(t) = w.cooldown_until {
            annotations[COOLDOWN_UNTIL] = json!(t.to_string());
        }
        let mut value = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {
                "holderIdentity": self.identity,
                "acquireTime": micro(now),
                "renewTime": micro(now),
                "leaseDurationSeconds": w.hold.as_secs().clamp(1, i32::MAX as u64),
            },
        });
        if let Some(rv) = base.and_then(|b| b.metadata.resource_version.clone()) {
            value["metadata"]["resourceVersion"] = json!(rv);
        }
        serde_json::from_value(value).expect("a Lease")
    }

    /// Takes the lock of target `key` for `episode` (the alert's fingerprint and start), in
    /// state `acting`: `Ok` when this replica may act.
    pub async fn take(&self, key: &str, episode: &str, now: Timestamp) -> Result<(), LockRefused> {
        self.acting(key, episode, now, false).await
    }

    /// Renews this replica's `acting` lock while its steps run; refused once another holds it.
    pub async fn renew(&self, key: &str, episode: &str, now: Timestamp) -> Result<(), LockRefused> {
        self.acting(key, episode, now, true).await
    }

    async fn acting(
        &self,
        key: &str,
        episode: &str,
        now: Timestamp,
        only_mine: bool,
    ) -> Result<(), LockRefused> {
        let w = Write {
            key,
            episode,
            state: "acting",
            hold: self.acting_hold,
            cooldown_until: None,
        };
        self.bounded(self.write(&w, now, only_mine)).await
    }

    /// The steps ended: the lock says `acted`, remembers the episode, and holds the cooldown.
    pub async fn acted(
        &self,
        key: &str,
        episode: &str,
        cooldown: Duration,
        now: Timestamp,
    ) -> Result<(), LockRefused> {
        let w = Write {
            key,
            episode,
            state: "acted",
            hold: cooldown.max(EPISODE_MEMORY),
            cooldown_until: Some(crate::clock::later(now, cooldown)),
        };
        self.bounded(self.write(&w, now, true)).await
    }

    async fn bounded(
        &self,
        f: impl std::future::Future<Output = Result<(), LockRefused>>,
    ) -> Result<(), LockRefused> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(LockRefused::Unavailable(format!(
                "no answer from the API server within {}",
                humantime::format_duration(self.timeout)
            ))),
        }
    }

    /// Whether another replica's `lease` keeps this replica from acting for `episode` at `now`.
    fn refusal(&self, lease: &Lease, episode: &str, now: Timestamp) -> Option<Held> {
        let skew = jiff::SignedDuration::try_from(self.clock_skew).unwrap_or_default();
        let until = lease_until(lease)?;
        if until.checked_add(skew).map_or(true, |end| end <= now) {
            return None; // ran out (its holder's clock may be ahead by the skew)
        }
        match annotation(lease, STATE) {
            Some("acted") => {
                if annotation(lease, EPISODE) == Some(episode) {
                    return Some(Held::SameEpisode);
                }
                let cooling = annotation(lease, COOLDOWN_UNTIL)
                    .and_then(|t| t.parse::<Timestamp>().ok())
                    .is_none_or(|t| t > now);
                cooling.then_some(Held::Cooldown)
            }
            _ => Some(Held::Acting),
        }
    }

    async fn write(
        &self,
        w: &Write<'_>,
        now: Timestamp,
        only_mine: bool,
    ) -> Result<(), LockRefused> {
        let name = lock_name(w.key);
        let unavailable = |e: kube::Error| LockRefused::Unavailable(e.to_string());
        let held = |lease: &Lease, why: Held| LockRefused::HeldBy {
            holder: holder_of(lease).unwrap_or_default(),
            until: lease_until(lease).unwrap_or(now),
            why,
        };
        let current = self.api.get_opt(&name).await.map_err(unavailable)?;
        let result = match &current {
            None if only_mine => {
                return Err(LockRefused::Unavailable("the target's lock is gone".into()))
            }
            None => {
                let lease = self.lease(&name, w, now, None);
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(lease) => {
                let mine = holder_of(lease).as_deref() == Some(self.identity.as_str());
                if !mine {
                    if only_mine {
                        return Err(held(lease, Held::Acting));
                    }
                    if let Some(why) = self.refusal(lease, w.episode, now) {
                        return Err(held(lease, why));
                    }
                }
                // Replaced only if nobody wrote it since it was read.
                let next = self.lease(&name, w, now, Some(lease));
                self.api.replace(&name, &PostParams::default(), &next).await
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Another replica wrote it first: it acts.
                match self.api.get_opt(&name).await {
                    Ok(Some(lease)) => Err(held(&lease, Held::Acting)),
                    Ok(None) => Err(LockRefused::HeldBy {
                        holder: String::new(),
                        until: now,
                        why: Held::Acting,
                    }),
                    Err(e) => Err(unavailable(e)),
                }
            }
            Err(e) => Err(unavailable(e)),
        }
    }
}

/// Runs the task `start` makes while this replica leads: started when it becomes leader, its
/// token cancelled (and the task awaited) when it stops leading, started again when it leads
/// again. With one replica it simply runs until `shutdown`.
pub async fn while_leading<F, Fut>(
    leadership: Arc<Leadership>,
    shutdown: CancellationToken,
    mut start: F,
) where
    F: FnMut(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    const LOOK: Duration = Duration::from_millis(100);
    if !leadership.enabled() {
        start(shutdown).await;
        return;
    }
    loop {
        while !leadership.is_leader() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(LOOK) => {}
            }
        }
        let token = shutdown.child_token();
        let task = tokio::spawn(start(token.clone()));
        while leadership.is_leader() && !shutdown.is_cancelled() {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(LOOK) => {}
            }
        }
        token.cancel();
        let _ = task.await;
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// The namespace of the pod reactor runs in, when in a cluster.
pub fn own_namespace() -> Option<String> {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// This replica's name: the setting, else the host name.
pub fn identity(settings: &HaSettings) -> String {
    settings
        .identity
        .clone()
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| format!("reactor-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_leads_only_until_its_last_renewal_runs_out() {
        let l = Leadership::elected("a".into());
        assert!(!l.is_leader(), "not before it holds the Lease");
        l.hold_until(Instant::now() + Duration::from_secs(60));
        assert!(l.is_leader());
        l.hold_until(Instant::now());
        assert!(!l.is_leader(), "a Lease run out is not held");
        l.hold_until(Instant::now() + Duration::from_secs(60));
        l.lose(Some("b".into()));
        assert!(!l.is_leader());
        assert_eq!(l.holder().as_deref(), Some("b"));
        assert!(Leadership::single().is_leader(), "one replica always leads");
        assert_eq!(lock_name("p\0instance=x"), lock_name("p\0instance=x"));
        assert_ne!(lock_name("p\0instance=x"), lock_name("p\0instance=y"));
    }
}
