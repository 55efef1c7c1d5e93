//! The app on port 0: webhook → durable intake → playbook → Rhai steps → history → escalation.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{get_json, payload, Capture, PlaybookDir, TestApp, FIRING};

fn one<'a>(runs: &'a [Value], alertname: &str) -> &'a Value {
    let matching: Vec<&Value> = runs
        .iter()
        .filter(|r| r["alert"]["labels"]["alertname"] == alertname)
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "expected one {alertname} run in {runs:#?}"
    );
    matching[0]
}

fn finished(runs: &[Value], n: usize) -> bool {
    runs.len() >= n && runs.iter().all(|r| r["outcome"] != "running")
}

#[tokio::test]
async fn the_fixture_is_accepted_and_its_run_listed_within_a_second() {
    let app = TestApp::spawn(|_| {}).await;
    let resp = app
        .client
        .post(app.url("/webhook/alertmanager"))
        .header("content-type", "application/json")
        .body(FIRING)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let runs = app
        .wait_for_runs("", Duration::from_secs(1), |r| finished(r, 1))
        .await;
    let run = one(&runs, "HarnessCurl");
    assert_eq!(run["outcome"], "skipped");
    assert_eq!(run["reason"], "no playbook matches this alert");
    assert_eq!(run["alert"]["fingerprint"], "3e27bcf000d7dae4");
    let id = run["id"].as_str().unwrap();
    let shown: Value = get_json(app.client.get(app.url(&format!("/api/v1/runs/{id}")))).await;
    assert_eq!(&shown, run);
    app.stop().await;
}

#[tokio::test]
async fn each_alert_of_a_grouped_payload_is_its_own_run() {
    let pages = Capture::start().await;
    let app = TestApp::spawn(|s| s.alertmanager.url = Some(pages.url())).await;
    let body = payload(&[
        ("ReactorSelfTestOk", "aaa1"),
        ("ReactorSelfTestOk", "aaa2"),
        ("Unrelated", "aaa3"),
    ]);
    assert_eq!(app.post_webhook(&body).await.status(), 202);
    let runs = app
        .wait_for_runs("", Duration::from_secs(5), |r| finished(r, 3))
        .await;
    assert_eq!(runs.len(), 3);
    let ok: Vec<&Value> = runs
        .iter()
        .filter(|r| r["playbook"] == "reactor-selftest-ok")
        .collect();
    assert_eq!(ok.len(), 2);
    for r in &ok {
        assert_eq!(r["outcome"], "succeeded");
        let step = &r["steps"][0];
        assert_eq!(step["name"], "say-hello");
        assert_eq!(step["succeeded"], true);
        assert_eq!(step["output"], json!({"ok": true, "instance": "test-host"}));
        assert!(step["logs"][0]
            .as_str()
            .unwrap()
            .starts_with("self-test for ReactorSelfTestOk"));
        assert!(step["durationMs"].is_u64() && step["startedAt"].is_string());
    }
    assert_eq!(one(&runs, "Unrelated")["outcome"], "skipped");
    assert!(pages.received().is_empty(), "a successful run pages nobody");
    let filtered = app
        .runs("outcome=succeeded&playbook=reactor-selftest-ok&limit=1")
        .await;
    assert_eq!(filtered.len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_failing_run_retries_then_escalates_once() {
    let pages = Capture::start().await;
    let app = TestApp::spawn(|s| s.alertmanager.url = Some(pages.url())).await;
    assert_eq!(
        app.post_webhook(&payload(&[("ReactorSelfTestFail", "bbb1")]))
            .await
            .status(),
        202
    );
    let runs = app
        .wait_for_runs(
            "alertname=ReactorSelfTestFail",
            Duration::from_secs(5),
            |r| r.len() == 1 && r[0]["escalation"]["status"] == "delivered",
        )
        .await;
    let run = &runs[0];
    assert_eq!(run["outcome"], "failed");
    assert_eq!(run["steps"].as_array().unwrap().len(), 2, "one retry");
    assert_eq!(run["steps"][1]["attempt"], 2);
    let error = run["steps"][1]["error"].as_str().unwrap();
    assert!(
        error.starts_with("script threw: ReactorSelfTestFail always fails (")
            && error.ends_with("playbooks/selftest.yaml:24)"),
        "the line in the playbook file: {error}"
    );
    assert_eq!(run["escalation"]["status"], "delivered");
    let received = pages.received();
    assert_eq!(received.len(), 1, "{received:#?}");
    let page = &received[0][0];
    assert_eq!(page["labels"]["alertname"], "RemediationFailed");
    assert_eq!(page["labels"]["severity"], "critical");
    assert_eq!(page["labels"]["original_alertname"], "ReactorSelfTestFail");
    assert_eq!(page["labels"]["original_severity"], "warning");
    assert_eq!(page["labels"]["playbook"], "reactor-selftest-fail");
    assert_eq!(page["annotations"]["run_id"], run["id"]);
    assert_eq!(page["annotations"]["failed_step"], "always-fails");
    assert_eq!(
        page["annotations"]["summary"],
        "reactor self-test: the escalation path works (test-host)"
    );
    let run_url = page["annotations"]["run_url"].as_str().unwrap();
    assert_eq!(
        run_url,
        app.url(&format!("/api/v1/runs/{}", run["id"].as_str().unwrap()))
    );
    let linked: Value = get_json(app.client.get(run_url)).await;
    assert_eq!(linked["id"], run["id"]);
    app.stop().await;
}

const ENDLESS: &str = "name: endless\nmatch: {alertname: Endless}\nsteps:\n  - name: spin\n    timeout: 2s\n    inline: |\n      loop { }\n";

/// Runs the endless playbook with the given operation limit; returns its settled run.
async fn endless_run(max_operations: u64) -> Value {
    let dir = PlaybookDir::new(&[("playbooks/endless.yaml", ENDLESS)]);
    let pages = Capture::start().await;
    let app = TestApp::spawn(|s| {
        s.playbooks_dir = dir.playbooks();
        s.scripts_dir = dir.scripts();
        s.sandbox.max_operations = max_operations;
        s.alertmanager.url = Some(pages.url());
    })
    .await;
    app.post_webhook(&payload(&[("Endless", "ccc1")])).await;
    let runs = app
        .wait_for_runs("", Duration::from_secs(10), |r| {
            r.len() == 1 && r[0]["escalation"]["status"] == "delivered"
        })
        .await;
    assert_eq!(runs[0]["outcome"], "failed");
    assert_eq!(pages.received().len(), 1, "the failure paged once");
    app.stop().await;
    runs[0].clone()
}

#[tokio::test]
async fn an_endless_script_is_stopped_by_the_operation_limit_and_escalates() {
    let run = endless_run(reactor::config::SandboxLimits::default().max_operations).await;
    let err = run["steps"][0]["error"].as_str().unwrap();
    assert!(err.contains("operation limit exceeded"), "{err}");
}

#[tokio::test]
async fn an_endless_script_is_stopped_by_the_wall_clock_when_operations_are_unlimited() {
    let run = endless_run(0).await;
    assert_eq!(run["steps"][0]["error"], "timed out after 2s");
}

#[tokio::test]
async fn resolved_alerts_never_start_a_remediation() {
    let pages = Capture::start().await;
    let app = TestApp::spawn(|s| s.alertmanager.url = Some(pages.url())).await;
    let mut body = payload(&[("ReactorSelfTestFail", "ddd1")]);
    body["alerts"][0]["status"] = json!("resolved");
    body["alerts"][0]["endsAt"] = json!("2026-11-20T23:40:00Z");
    app.post_webhook(&body).await;
    let runs = app
        .wait_for_runs("", Duration::from_secs(5), |r| finished(r, 1))
        .await;
    assert_eq!(runs[0]["outcome"], "skipped");
    assert_eq!(
        runs[0]["reason"],
        "playbook does not run on resolved alerts"
    );
    assert!(runs[0]["steps"].as_array().unwrap().is_empty());
    assert!(pages.received().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn an_undeliverable_escalation_is_visible_on_the_run() {
    let closed = crate::helpers::free_port();
    let app =
        TestApp::spawn(|s| s.alertmanager.url = Some(format!("http://127.0.0.1:{closed}"))).await;
    app.post_webhook(&payload(&[("ReactorSelfTestFail", "eee1")]))
        .await;
    // Delivery keeps retrying (the outbox never gives up on an unreachable Alertmanager), and
    // the run shows that the page is still pending, how often it was tried, and why.
    let runs = app
        .wait_for_runs("", Duration::from_secs(10), |r| {
            r.len() == 1 && r[0]["escalation"]["attempts"].as_u64() >= Some(2)
        })
        .await;
    let esc = &runs[0]["escalation"];
    assert_eq!(esc["status"], "pending");
    assert!(
        esc["lastError"]
            .as_str()
            .unwrap()
            .contains("/api/v2/alerts"),
        "{esc}"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_shipped_disk_playbook_frees_space_under_an_allowed_root() {
    let node = tempfile::tempdir().unwrap();
    let old = crate::helpers::old_log(node.path());
    let logs = old.parent().unwrap().to_path_buf();
    let fresh = logs.join("syslog.1.gz");
    std::fs::write(&fresh, b"new").unwrap();
    let root = logs.clone();
    let app = TestApp::spawn(move |s| s.disk_cleanup.allowed_roots = vec![root]).await;
    let mut body = payload(&[("NodeFilesystemAlmostOutOfSpace", "fff1")]);
    let labels = &mut body["alerts"][0]["labels"];
    labels["mountpoint"] = json!(node.path());
    labels["device"] = json!("/dev/sda1");
    labels["fstype"] = json!("ext4");
    app.post_webhook(&body).await;
    let runs = app
        .wait_for_runs("", Duration::from_secs(5), |r| finished(r, 1))
        .await;
    assert_eq!(runs[0]["playbook"], "node-filesystem-cleanup");
    assert_eq!(runs[0]["outcome"], "succeeded", "{:#?}", runs[0]);
    assert_eq!(runs[0]["steps"][0]["output"]["freed_bytes"], 4096);
    assert!(!old.exists() && fresh.exists());
    app.stop().await;
}

#[tokio::test]
async fn dropping_the_running_app_cancels_it_without_a_panic() {
    let app = TestApp::spawn(|_| {}).await;
    let answer = app
        .post_webhook(&payload(&[("ReactorSelfTestOk", "d1")]))
        .await;
    assert!(answer.status().is_success());
    let ended = app.abort().await;
    assert!(ended.is_cancelled(), "{ended}");
}
