//! How late escalation steps fire under load: 10,000 open incidents, each with a pending
//! escalation, through reactor's own escalation engine ([`Escalations::run_with`]) on a sled store
//! in a temporary directory, with the system clock. Each incident's level 1 is due when it opens
//! and its level 2 `LEVEL_1_WAIT` later; the example prints the lateness distribution (fired at −
//! due) of each level. A step has fired when its notification is stored in the outbox and the
//! incident has moved to its next step; sending is the outbox's work, paced by each channel's
//! rate limit, and is not measured here.
//!
//! ```sh
//! cargo run --release -p reactor-bench --example escalation_lateness [-- INCIDENTS [WAIT_SECONDS]]
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reactor::clock::SystemClock;
use reactor::history::Store;
use reactor::incident::escalate::{Escalations, Fired};
use reactor::incident::{oncall, Incidents, NewIncident, Severity};
use reactor::metrics::Metrics;
use reactor::notify::{Channels, Notifier};
use tokio_util::sync::CancellationToken;

const ONCALL: &str = "teams:
  - name: devops
    policy:
      levels:
        - {notify: ['channel:pager'], timeout: WAIT}
        - {notify: ['channel:pager']}
services:
  - name: athens
    team: devops
";

fn percentiles(label: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    let late = ms.iter().filter(|&&m| m > 1000.0).count();
    println!(
        "{label}: {} steps, lateness ms p50 {:.1}, p90 {:.1}, p99 {:.1}, max {:.1}; over 1 s: {late}",
        ms.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0),
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    reactor::app::install_crypto_provider();
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let wait: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("oncall")).unwrap();
    std::fs::write(
        dir.path().join("oncall/devops.yaml"),
        ONCALL.replace("WAIT", &format!("{wait}s")),
    )
    .unwrap();
    let oncall = Arc::new(oncall::load_dir(&dir.path().join("oncall")).unwrap());
    let store = Store::open(&dir.path().join("db")).unwrap();
    let clock = Arc::new(SystemClock);
    let notifier = Notifier::open(
        &store,
        Channels::default(),
        Default::default(),
        "http://reactor.test".into(),
        jiff::Timestamp::now(),
    )
    .unwrap();
    let incidents = Incidents::open(&store, Arc::new(Metrics::default()))
        .unwrap()
        .with_pages(notifier.clone());
    let engine = Escalations::new(
        incidents.clone(),
        notifier,
        oncall,
        clock,
        "http://reactor.test".into(),
        incidents.signer(),
    );
    let fired: Arc<Mutex<Vec<Fired>>> = Arc::default();
    let seen = Arc::clone(&fired);
    let stop = CancellationToken::new();
    let task = tokio::spawn(engine.run_with(stop.clone(), move |f| {
        seen.lock().unwrap().extend_from_slice(f)
    }));

    let started = Instant::now();
    let openers = 8;
    let mut tasks = Vec::new();
    for w in 0..openers {
        let incidents = incidents.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(openers) {
                let new = NewIncident {
                    service: "athens".into(),
                    severity: Severity::Crit,
                    title: format!("incident {i}"),
                    message: String::new(),
                    source: "bench".into(),
                    detected_at: None,
                    dedup_key: Some(format!("bench-{i}")),
                    run: None,
                    fingerprint: None,
                    approvers: None,
                };
                incidents.create(new, jiff::Timestamp::now()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "opened {n} incidents in {:.1} s; level 2 of each is due {wait} s after its level 1",
        started.elapsed().as_secs_f64()
    );
    let deadline = Instant::now() + Duration::from_secs(wait * 3 + 60);
    while fired.lock().unwrap().len() < 2 * n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    task.await.unwrap();
    let fired = fired.lock().unwrap().clone();
    for level in [1, 2] {
        percentiles(
            &format!("level {level}"),
            fired
                .iter()
                .filter(|f| f.level == level)
                .map(|f| f.lateness.as_secs_f64() * 1000.0)
                .collect(),
        );
    }
    assert_eq!(fired.len(), 2 * n, "every step fired once");
}
