//! The real binary, killed and stopped: an alert answered with 2xx is never lost.
//!
//! Documented behaviour: after SIGKILL, accepted alerts without a run are processed at the next
//! start; a run that was in progress is recorded as `interrupted` and escalated, not re-run.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{
    free_port, get_runs, payload, spawn_binary, wait_for, wait_healthy, PlaybookDir,
};

const SLOW: &str = "name: slow\nmatch: {alertname: Slow}\nsteps:\n  - name: nap\n    timeout: 10s\n    inline: |\n      sleep(params.ms);\n      \"rested\"\n    params: {ms: 300}\n";

fn serve_args(port: u16, dir: &Path) -> Vec<String> {
    vec![
        "serve".into(),
        "--config".into(),
        dir.join("reactor.yaml").display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--data".into(),
        dir.join("db").display().to_string(),
        "--playbooks".into(),
        dir.join("playbooks").display().to_string(),
        "--scripts".into(),
        dir.join("scripts").display().to_string(),
    ]
}

async fn post(port: u16, body: &Value) -> reqwest::StatusCode {
    crate::helpers::client()
        .post(format!("http://127.0.0.1:{port}/webhook/alertmanager"))
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
}

async fn settled_runs(port: u16, n: usize) -> Vec<Value> {
    let client = crate::helpers::client();
    let url = format!("http://127.0.0.1:{port}/api/v1/runs?limit=1000");
    wait_for(Duration::from_secs(30), || async {
        let runs = get_runs(&client, &url, None).await;
        (runs.len() >= n
            && runs.iter().all(|r| {
                r["outcome"] != "running"
                    && (r["outcome"] != "interrupted" || r["escalation"].is_object())
            }))
        .then_some(runs)
    })
    .await
    .expect("runs settle after restart")
}

#[tokio::test]
async fn sigkill_right_after_the_2xx_loses_no_accepted_alert() {
    let dir = PlaybookDir::new(&[
        ("playbooks/slow.yaml", SLOW),
        ("reactor.yaml", "limits:\n  max_concurrent_runs: 1\n"),
    ]);
    let root = dir.root.path();
    let port = free_port();
    let args = serve_args(port, root);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut reactor = spawn_binary(&args, root);
    wait_healthy(port).await;
    let fingerprints: Vec<String> = (0..20).map(|i| format!("f{i:03}")).collect();
    let alerts: Vec<(&str, &str)> = fingerprints.iter().map(|f| ("Slow", f.as_str())).collect();
    assert_eq!(post(port, &payload(&alerts)).await, 202);
    reactor.kill();

    let _restarted = spawn_binary(&args, root);
    wait_healthy(port).await;
    let runs = settled_runs(port, 20).await;
    assert_eq!(
        runs.len(),
        20,
        "exactly one run per accepted alert: {runs:#?}"
    );
    let seen: HashSet<&str> = runs
        .iter()
        .map(|r| r["alert"]["fingerprint"].as_str().unwrap())
        .collect();
    assert_eq!(seen.len(), 20);
    let interrupted: Vec<&Value> = runs
        .iter()
        .filter(|r| r["outcome"] == "interrupted")
        .collect();
    assert!(
        interrupted.len() <= 1,
        "only the run in flight can be interrupted: {interrupted:#?}"
    );
    for r in &interrupted {
        assert!(
            r["escalation"].is_object(),
            "interrupted runs are escalated"
        );
    }
    let succeeded = runs.iter().filter(|r| r["outcome"] == "succeeded").count();
    assert_eq!(succeeded + interrupted.len(), 20);
}

#[tokio::test]
async fn sigterm_drains_in_flight_runs_and_exits_zero() {
    let slow = SLOW.replace("{ms: 300}", "{ms: 1500}");
    let dir = PlaybookDir::new(&[("playbooks/slow.yaml", &slow), ("reactor.yaml", "")]);
    let root = dir.root.path();
    let port = free_port();
    let args = serve_args(port, root);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut reactor = spawn_binary(&args, root);
    wait_healthy(port).await;
    assert_eq!(post(port, &payload(&[("Slow", "g001")])).await, 202);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = reactor.terminate();
    assert!(status.success(), "exit status {status:?}");

    let _restarted = spawn_binary(&args, root);
    wait_healthy(port).await;
    let runs = settled_runs(port, 1).await;
    assert_eq!(
        runs[0]["outcome"], "succeeded",
        "drained, not interrupted: {:#?}",
        runs[0]
    );
}

#[tokio::test]
async fn a_run_of_an_idempotent_playbook_is_re_run_after_sigkill() {
    let slow = SLOW
        .replace(
            "match: {alertname: Slow}",
            "match: {alertname: Slow}\nidempotent: true",
        )
        .replace("{ms: 300}", "{ms: 1500}");
    let dir = PlaybookDir::new(&[("playbooks/slow.yaml", &slow), ("reactor.yaml", "")]);
    let root = dir.root.path();
    let port = free_port();
    let args = serve_args(port, root);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut reactor = spawn_binary(&args, root);
    wait_healthy(port).await;
    assert_eq!(post(port, &payload(&[("Slow", "i001")])).await, 202);
    let client = crate::helpers::client();
    let url = format!("http://127.0.0.1:{port}/api/v1/runs");
    wait_for(Duration::from_secs(10), || async {
        let runs = get_runs(&client, &url, None).await;
        (runs.len() == 1 && runs[0]["outcome"] == "running").then_some(())
    })
    .await
    .expect("the run started");
    // Past sled's background flush (200 ms), so the `running` record is on disk when killed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    reactor.kill();

    let _restarted = spawn_binary(&args, root);
    wait_healthy(port).await;
    let runs = settled_runs(port, 1).await;
    assert_eq!(runs[0]["outcome"], "succeeded", "{:#?}", runs[0]);
    assert_eq!(
        runs[0]["reason"],
        "re-run after a restart interrupted it (playbook is idempotent)"
    );
}
