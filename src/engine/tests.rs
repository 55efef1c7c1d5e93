//! The engine's decisions, driven directly: an [`Engine`] on a temporary store, playbooks from
//! text, no cluster, no Alertmanager, and a [`ManualClock`] the tests move instead of sleeping.

use serde_json::json;

use super::*;
use crate::clock::ManualClock;
use crate::config::{AlertmanagerSettings, SandboxLimits};
use crate::executor::sandbox::build_engine;

/// An engine over its own store and playbooks, and the clock it reads.
struct Harness {
    engine: Arc<Engine>,
    clock: ManualClock,
    dir: tempfile::TempDir,
}

impl Harness {
    fn new(playbooks: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        Harness::open(dir, playbooks)
    }

    /// An engine over the store and playbooks in `dir`, as a restart would open it.
    fn open(dir: tempfile::TempDir, playbooks: &str) -> Harness {
        crate::tls::install_crypto_provider();
        let books = dir.path().join("playbooks");
        std::fs::create_dir_all(&books).unwrap();
        std::fs::write(books.join("p.yaml"), playbooks).unwrap();
        let sandbox = Arc::new(build_engine(&SandboxLimits::default(), vec![], None));
        let playbooks =
            crate::playbook::loader::load_dir(&books, &dir.path().join("scripts"), &sandbox)
                .unwrap_or_else(|e| panic!("{e}"));
        let clock = ManualClock::new("2026-01-05T03:00:00Z".parse().unwrap());
        let store = Store::open(&dir.path().join("db")).unwrap();
        let notifier = crate::notify::Notifier::open(
            &store,
            crate::notify::Channels::default(),
            Default::default(),
            "http://reactor.test".into(),
            clock.now(),
        )
        .unwrap();
        let engine = Engine::new(
            store,
            Arc::new(crate::playbook::InForce::new(playbooks)),
            Executor::new(sandbox, false, None),
            Escalator::new(reqwest::Client::new(), AlertmanagerSettings::default()),
            notifier,
            Arc::new(clock.clone()),
            "http://reactor.test".into(),
        )
        .unwrap();
        Harness {
            engine: Arc::new(engine),
            clock,
            dir,
        }
    }

    /// Accepts one firing alert named `alertname` for `instance`, processes it, and returns the
    /// runs it led to.
    async fn fire(&self, alertname: &str, instance: &str, starts_at: &str) -> Vec<Run> {
        let intake = self.accept(alertname, instance, starts_at).await;
        let seq = intake.seq;
        self.engine.process(intake).await;
        self.engine.store.runs_of(seq).unwrap()
    }

    async fn accept(&self, alertname: &str, instance: &str, starts_at: &str) -> Intake {
        let alert = alert(alertname, instance, starts_at);
        let now = self.clock.now();
        self.engine
            .store
            .accept(vec![alert], now)
            .await
            .unwrap()
            .remove(0)
    }

    fn step_failures(&self, playbook: &str, reason: &str) -> u64 {
        self.engine
            .metrics
            .step_failures
            .get_or_create(&crate::metrics::StepFailureLabels {
                playbook: playbook.into(),
                reason: reason.into(),
            })
            .get()
    }
}

fn alert(alertname: &str, instance: &str, starts_at: &str) -> Alert {
    let body = json!({
        "version": "4",
        "status": "firing",
        "receiver": "reactor",
        "groupKey": "{}:{}",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://am",
        "alerts": [{
            "status": "firing",
            "labels": {"alertname": alertname, "instance": instance},
            "annotations": {},
            "startsAt": starts_at,
            "endsAt": "0001-01-01T00:00:00Z",
            "fingerprint": format!("{:016x}", fxhash(alertname, instance)),
        }],
    });
    crate::domain::decode_webhook(body.to_string().as_bytes())
        .unwrap()
        .alerts
        .remove(0)
}

fn fxhash(a: &str, b: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (a, b).hash(&mut h);
    h.finish()
}

fn only(runs: Vec<Run>) -> Run {
    assert_eq!(runs.len(), 1, "{runs:#?}");
    runs.into_iter().next().unwrap()
}

const COOLDOWN: &str = "name: restart\nmatch: {alertname: Wedged}\nguards:\n  cooldown: 10m\nsteps:\n  - {name: fix, inline: '\"ok\"'}\n";

#[tokio::test]
async fn a_target_in_its_cooldown_is_skipped_until_the_clock_passes_it() {
    let h = Harness::new(COOLDOWN);
    let first = only(h.fire("Wedged", "db-1", "2026-01-05T02:59:00Z").await);
    assert_eq!(first.outcome, Outcome::Succeeded);

    // The same target fires again (a new episode) five minutes later: held by the cooldown.
    h.clock.advance(Duration::from_secs(300));
    let second = only(h.fire("Wedged", "db-1", "2026-01-05T03:04:00Z").await);
    assert_eq!(second.outcome, Outcome::Skipped);
    let reason = second.reason.unwrap();
    assert!(reason.starts_with("cooldown:"), "{reason}");
    assert!(second.steps.is_empty(), "a skipped run acts on nothing");

    // Another target is not held by it.
    let other = only(h.fire("Wedged", "db-2", "2026-01-05T03:04:00Z").await);
    assert_eq!(other.outcome, Outcome::Succeeded);

    // Past the cooldown, the first target may be remediated again.
    h.clock.advance(Duration::from_secs(301));
    let third = only(h.fire("Wedged", "db-1", "2026-01-05T03:09:00Z").await);
    assert_eq!(third.outcome, Outcome::Succeeded);
}

#[tokio::test]
async fn a_repeat_delivery_of_the_same_alert_is_deduplicated_not_run_twice() {
    let h = Harness::new(COOLDOWN);
    let first = only(h.fire("Wedged", "db-1", "2026-01-05T02:59:00Z").await);
    h.clock.advance(Duration::from_secs(30));
    let again = only(h.fire("Wedged", "db-1", "2026-01-05T02:59:00Z").await);
    assert_eq!(again.outcome, Outcome::Deduplicated);
    assert_eq!(
        again.reason.as_deref(),
        Some(&*format!("repeat delivery of run {}", first.id))
    );
}

#[tokio::test]
async fn an_alert_no_playbook_matches_is_recorded_as_skipped() {
    let h = Harness::new(COOLDOWN);
    let run = only(h.fire("Unrelated", "db-1", "2026-01-05T02:59:00Z").await);
    assert_eq!(
        (run.outcome, run.playbook, run.reason.as_deref()),
        (
            Outcome::Skipped,
            None,
            Some("no playbook matches this alert")
        )
    );
}

const RETRIES: &str = r#"
name: flaky
match: {alertname: Flaky}
steps:
  - name: throw
    retries: 2
    retry_delay: 0s
    inline: 'throw "still broken"'
---
name: refused
match: {alertname: Refused}
steps:
  - name: clean
    retries: 3
    retry_delay: 0s
    inline: 'disk_cleanup("/var/log", "*.log", "1d")'
---
name: no-cluster
match: {alertname: NoCluster}
steps:
  - name: restart
    retries: 3
    retry_delay: 0s
    kubernetes: restart_pod
    params: {namespace: shop, pod: web-1}
"#;

#[tokio::test]
async fn a_retryable_failure_is_tried_again_until_the_retries_are_used() {
    let h = Harness::new(RETRIES);
    let run = only(h.fire("Flaky", "a", "2026-01-05T02:59:00Z").await);
    assert_eq!(run.outcome, Outcome::Failed);
    let attempts: Vec<_> = run.steps.iter().map(|s| s.attempt).collect();
    assert_eq!(attempts, [1, 2, 3], "the first attempt and two retries");
    assert!(run
        .steps
        .iter()
        .all(|s| s.error_class.as_deref() == Some("script_threw")));
    let reason = run.reason.unwrap();
    assert!(
        reason
            .starts_with("step \"throw\" failed after 3 attempt(s): script threw: still broken (")
            && reason.ends_with("playbooks/p.yaml:8)"),
        "the line in the playbook file: {reason}"
    );
    assert_eq!(h.step_failures("flaky", "script_threw"), 3);
}

#[tokio::test]
async fn a_final_failure_is_not_retried_whatever_retries_are_left() {
    let h = Harness::new(RETRIES);
    // A helper refused by policy (no directory is allowed for disk_cleanup).
    let run = only(h.fire("Refused", "a", "2026-01-05T02:59:00Z").await);
    assert_eq!(run.outcome, Outcome::Failed);
    assert_eq!(run.steps.len(), 1, "{:#?}", run.steps);
    assert_eq!(run.steps[0].error_class.as_deref(), Some("refused"));
    let reason = run.reason.unwrap();
    assert!(
        reason.starts_with(
            "step \"clean\" failed after 1 attempt(s) (not retried: refused errors are final): script threw: disk_cleanup: disk_cleanup is disabled"
        ),
        "{reason}"
    );
    assert_eq!(h.step_failures("refused", "refused"), 1);

    // A kubernetes step with no cluster configured.
    let run = only(h.fire("NoCluster", "a", "2026-01-05T02:59:00Z").await);
    assert_eq!((run.outcome, run.steps.len()), (Outcome::Failed, 1));
    assert_eq!(run.steps[0].error_class.as_deref(), Some("not_configured"));
    assert_eq!(h.step_failures("no-cluster", "not_configured"), 1);
}

#[test]
fn the_retry_rule() {
    use super::run::{retry_decision, Retry};
    let timeout = StepError::Timeout {
        after: Duration::from_secs(1),
        hung: false,
    };
    let refused = StepError::bad_arguments("k8s::restart_pod: missing pod".into());
    assert_eq!(retry_decision(&timeout, 1, 2), Retry::Again);
    assert_eq!(retry_decision(&timeout, 2, 2), Retry::Again);
    assert_eq!(retry_decision(&timeout, 3, 2), Retry::Exhausted);
    assert_eq!(retry_decision(&refused, 1, 2), Retry::Final);
    assert_eq!(retry_decision(&timeout, 1, 0), Retry::Exhausted);
}

const IDEMPOTENT: &str = "name: safe\nmatch: {alertname: Safe}\nidempotent: true\nsteps:\n  - {name: fix, inline: '\"ok\"'}\n---\nname: unsafe\nmatch: {alertname: Unsafe}\nsteps:\n  - {name: fix, inline: '\"ok\"'}\n";

/// Records a run of `alertname` as a crash would leave it: started, steps not finished.
async fn caught_in_progress(h: &Harness, alertname: &str, playbook: &str) -> RunId {
    let intake = h.accept(alertname, "a", "2026-01-05T02:59:00Z").await;
    let playbook = h.engine.playbooks.get(playbook).unwrap();
    let mut run = new_run(
        intake.seq,
        0,
        intake.received_at,
        false,
        intake.alert,
        Some(&playbook),
    );
    run.started_at = Some(h.clock.now());
    h.engine.store.put_run(&run).unwrap();
    h.engine.store.remove_intake(intake.seq).unwrap();
    h.engine.store.history_durable().await.unwrap();
    run.id
}

/// Closes the engine's store and opens a new engine over it, as a restart does.
async fn restart(h: Harness, playbooks: &str) -> Harness {
    let Harness { engine, dir, .. } = h;
    drop(engine);
    // The flusher threads let go of the database once its last handle is dropped.
    let db = dir.path().join("db");
    let mut waited = 0;
    while sled::Config::new().path(&db).open().is_err() && waited < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
    }
    Harness::open(dir, playbooks)
}

#[tokio::test]
async fn recovery_reruns_an_idempotent_run_and_interrupts_any_other() {
    let h = Harness::new(IDEMPOTENT);
    let safe = caught_in_progress(&h, "Safe", "safe").await;
    let unsafe_ = caught_in_progress(&h, "Unsafe", "unsafe").await;
    let h = restart(h, IDEMPOTENT).await;

    let (pending, rerun) = h.engine.recover().await.unwrap();
    assert!(pending.is_empty(), "both alerts were recorded");
    let ids: Vec<RunId> = rerun.iter().map(|(r, _)| r.id).collect();
    assert_eq!(ids, [safe], "only the idempotent run is re-run");

    let interrupted = h.engine.store.get_run(unsafe_).unwrap().unwrap();
    assert_eq!(interrupted.outcome, Outcome::Interrupted);
    assert!(interrupted
        .reason
        .unwrap()
        .contains("does not declare idempotent: true"));
}

#[tokio::test]
async fn recovery_hands_back_an_accepted_alert_that_has_no_run_yet() {
    let h = Harness::new(IDEMPOTENT);
    let intake = h.accept("Unsafe", "a", "2026-01-05T02:59:00Z").await;
    let h = restart(h, IDEMPOTENT).await;
    let (pending, rerun) = h.engine.recover().await.unwrap();
    assert!(rerun.is_empty());
    let seqs: Vec<u64> = pending.iter().map(|i| i.seq).collect();
    assert_eq!(seqs, [intake.seq]);
}
