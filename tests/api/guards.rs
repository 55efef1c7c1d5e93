//! Exactly-once remediation: repeats, loops, overload, outages and resolved alerts.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use reactor::clock::ManualClock;
use serde_json::{json, Value};

use crate::helpers::{
    alertmanager_config, free_port, payload, wait_for, Alertmanager, Capture, PlaybookDir, TestApp,
};

fn count(runs: &[Value], outcome: &str) -> usize {
    runs.iter().filter(|r| r["outcome"] == outcome).count()
}

#[tokio::test]
async fn fifty_repeats_of_one_firing_alert_make_one_run() {
    let app = TestApp::spawn(|_| {}).await;
    let body = payload(&[("ReactorSelfTestOk", "rep1")]);
    for _ in 0..50 {
        assert_eq!(app.post_webhook(&body).await.status(), 202);
    }
    let runs = app
        .wait_for_runs("limit=100", Duration::from_secs(10), |r| {
            r.len() == 50 && r.iter().all(|x| x["outcome"] != "running")
        })
        .await;
    assert_eq!(count(&runs, "succeeded"), 1, "one run");
    assert_eq!(
        count(&runs, "deduplicated"),
        49,
        "every repeat is recorded, not dropped"
    );
    let original = runs.iter().find(|r| r["outcome"] == "succeeded").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(runs
        .iter()
        .filter(|r| r["outcome"] == "deduplicated")
        .all(|r| r["reason"] == format!("repeat delivery of run {original}")));
    let metrics = app.metrics().await;
    for line in [
        "reactor_alerts_received_total{status=\"firing\"} 50",
        "reactor_deduplicated_deliveries_total{status=\"firing\"} 49",
        "reactor_runs_total{playbook=\"reactor-selftest-ok\",outcome=\"succeeded\"} 1",
        "reactor_runs_total{playbook=\"reactor-selftest-ok\",outcome=\"deduplicated\"} 49",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    app.stop().await;
}

const ALWAYS_FAILS: &str = "name: flaky-fix\nmatch: {alertname: Wedged}\nguards:\n  target_labels: [instance]\n  max_attempts: 3\n  window: 1h\n  circuit_breaker: {failures: 0}\nsteps:\n  - inline: 'throw \"still wedged\"'\n";

/// Each firing episode of the alert has its own startsAt, as after a resolve and re-fire.
fn episode(n: usize) -> Value {
    let mut body = payload(&[("Wedged", &format!("w{n:03}"))]);
    body["alerts"][0]["startsAt"] = json!(format!("2026-11-21T00:{:02}:00Z", n % 60));
    body["alerts"][0]["labels"]["id"] = json!("same-target");
    body
}

#[tokio::test]
async fn a_failing_target_gets_max_attempts_runs_then_one_loop_page_until_the_window_passes() {
    let dir = PlaybookDir::new(&[("playbooks/flaky.yaml", ALWAYS_FAILS)]);
    let pages = Capture::start().await;
    let clock = ManualClock::new(Timestamp::now());
    let app = TestApp::spawn_with_clock(
        |s| {
            s.playbooks_dir = dir.playbooks();
            s.scripts_dir = dir.scripts();
            s.alertmanager.url = Some(pages.url());
            // Retention passes throughout: a target record pruned before its window and
            // cooldown passed would let more than max_attempts runs through.
            s.history.prune_interval = Duration::from_millis(20);
        },
        Arc::new(clock.clone()),
    )
    .await;
    let settled = |n: usize| {
        move |r: &[Value]| {
            r.len() == n
                && r.iter()
                    .all(|x| x["outcome"] != "running" && x["escalation"]["status"] != "pending")
        }
    };
    for n in 0..6 {
        app.post_webhook(&episode(n)).await;
        app.wait_for_runs("limit=100", Duration::from_secs(5), settled(n + 1))
            .await;
        clock.advance(Duration::from_secs(60));
    }
    let runs = app.runs("limit=100").await;
    assert_eq!(count(&runs, "failed"), 3, "max_attempts runs");
    assert_eq!(count(&runs, "skipped"), 3);
    let loop_pages: Vec<Value> = pages
        .received()
        .into_iter()
        .filter(|b| b[0]["labels"]["alertname"] == "RemediationLoop")
        .collect();
    assert_eq!(loop_pages.len(), 1, "exactly one RemediationLoop page");
    assert_eq!(
        pages.received().len(),
        4,
        "three RemediationFailed pages and one RemediationLoop"
    );

    clock.advance(Duration::from_secs(3600));
    app.post_webhook(&episode(6)).await;
    let runs = app
        .wait_for_runs("limit=100", Duration::from_secs(5), settled(7))
        .await;
    assert_eq!(
        count(&runs, "failed"),
        4,
        "the window passed: the target is remediated again"
    );
    app.stop().await;
}

#[tokio::test]
async fn overload_answers_503_with_retry_after_and_loses_nothing_accepted() {
    let slow = "name: slow\nmatch: {alertname: Slow}\nsteps:\n  - inline: 'sleep(200); 1'\n";
    let dir = PlaybookDir::new(&[("playbooks/slow.yaml", slow)]);
    let app = TestApp::spawn(|s| {
        s.playbooks_dir = dir.playbooks();
        s.scripts_dir = dir.scripts();
        s.limits.queue_capacity = 2;
        s.limits.max_alerts_per_payload = 2;
        s.limits.max_concurrent_runs = 1;
    })
    .await;
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..20 {
        let r = app
            .post_webhook(&payload(&[("Slow", &format!("o{i:03}"))]))
            .await;
        match r.status().as_u16() {
            202 => accepted += 1,
            503 => {
                assert_eq!(r.headers()["retry-after"], "5");
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(refused > 0, "the queue must have filled");
    let runs = app
        .wait_for_runs("limit=100", Duration::from_secs(30), |r| {
            r.len() == accepted && r.iter().all(|x| x["outcome"] != "running")
        })
        .await;
    assert_eq!(
        count(&runs, "succeeded"),
        accepted,
        "every accepted alert ran"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_resolved_notification_cancels_a_run_when_the_playbook_says_so() {
    let pb = "name: long\nmatch: {alertname: Long}\non_resolved: cancel\nsteps:\n  - inline: 'sleep(20000); 1'\n    timeout: 30s\n";
    let dir = PlaybookDir::new(&[("playbooks/long.yaml", pb)]);
    let app = TestApp::spawn(|s| {
        s.playbooks_dir = dir.playbooks();
        s.scripts_dir = dir.scripts();
    })
    .await;
    let firing = payload(&[("Long", "l001")]);
    app.post_webhook(&firing).await;
    app.wait_for_runs("", Duration::from_secs(5), |r| {
        r.len() == 1 && r[0]["outcome"] == "running"
    })
    .await;
    let mut resolved = firing.clone();
    resolved["alerts"][0]["status"] = json!("resolved");
    resolved["alerts"][0]["endsAt"] = json!("2026-11-21T00:00:00Z");
    app.post_webhook(&resolved).await;
    let runs = app
        .wait_for_runs("", Duration::from_secs(5), |r| {
            r.len() == 2 && r.iter().all(|x| x["outcome"] != "running")
        })
        .await;
    let cancelled = runs
        .iter()
        .find(|r| r["outcome"] == "cancelled")
        .expect("the run was cancelled");
    assert_eq!(cancelled["steps"][0]["error"], "cancelled");
    let note = runs.iter().find(|r| r["outcome"] == "skipped").unwrap();
    assert_eq!(
        note["reason"],
        format!(
            "alert resolved: cancelled run {}",
            cancelled["id"].as_str().unwrap()
        )
    );
    app.stop().await;
}

/// Alertmanager is down when the run fails; once it is up, the page is delivered exactly once.
#[tokio::test]
async fn an_escalation_survives_an_alertmanager_outage_and_is_delivered_once() {
    let humans = Capture::start().await;
    let am_port = free_port();
    let app = TestApp::spawn(|s| {
        s.alertmanager.url = Some(format!("http://127.0.0.1:{am_port}"));
        s.alertmanager.retry_backoff = Duration::from_millis(200);
    })
    .await;
    app.post_webhook(&payload(&[("ReactorSelfTestFail", "out1")]))
        .await;
    let runs = app
        .wait_for_runs("", Duration::from_secs(10), |r| {
            r.len() == 1 && r[0]["escalation"]["attempts"].as_u64() >= Some(2)
        })
        .await;
    assert_eq!(
        runs[0]["escalation"]["status"], "pending",
        "Alertmanager is down"
    );

    let config = alertmanager_config(app.addr, "unused", &humans.url());
    let am = Alertmanager::start(am_port, &config).await;
    let delivered = wait_for(Duration::from_secs(30), || async {
        let runs = app.runs("").await;
        (runs[0]["escalation"]["status"] == "delivered").then_some(runs)
    })
    .await
    .expect("delivered once Alertmanager is back");
    assert_eq!(delivered[0]["outcome"], "failed");
    let notified = humans
        .wait_for_notification("RemediationFailed", Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = humans.notifications("RemediationFailed");
    assert_eq!(all.len(), notified.len(), "no second delivery");
    assert_eq!(am.alerts("alertname=\"RemediationFailed\"").await.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn serve_refuses_a_public_address_without_auth() {
    reactor::app::install_crypto_provider();
    let settings = reactor::config::Settings {
        listen: "0.0.0.0:0".parse().unwrap(),
        ..Default::default()
    };
    let err = reactor::app::Application::build(settings)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("without authentication"), "{err}");
}
