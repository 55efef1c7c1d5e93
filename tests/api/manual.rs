//! Runs asked for by hand (`POST /api/v1/runs`, `POST /api/v1/runs/{id}/rerun`, and the CLI's
//! `reactor run` and `reactor runs rerun`): the same guards and history as webhook alerts, marked
//! with who asked, and dry run when asked.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{payload, PlaybookDir, TestApp};

const PLAYBOOKS: &str = r#"
name: restart
match: {alertname: Wedged}
guards:
  cooldown: 10m
steps:
  - {name: fix, inline: '"fixed"'}
---
name: probe
match: {alertname: Probe}
steps:
  - {name: look, inline: 'is_dry_run()'}
"#;

async fn post(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    let r = app
        .client
        .post(app.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn settled(app: &TestApp, id: &str) -> Value {
    let url = app.url(&format!("/api/v1/runs/{id}"));
    crate::helpers::wait_for(Duration::from_secs(10), || async {
        let run: Value = app.client.get(&url).send().await.ok()?.json().await.ok()?;
        (run["outcome"].is_string() && run["outcome"] != "running").then_some(run)
    })
    .await
    .unwrap_or_else(|| panic!("run {id} did not settle"))
}

#[tokio::test]
async fn a_run_by_hand_goes_through_the_guards_and_the_history_and_says_who_asked() {
    let dir = PlaybookDir::new(&[("playbooks/p.yaml", PLAYBOOKS)]);
    let app = TestApp::spawn(|s| {
        s.playbooks_dir = dir.playbooks();
        s.scripts_dir = dir.scripts();
    })
    .await;
    let alert = json!({"labels": {"alertname": "Wedged", "instance": "db-1"}});
    let (status, body) = post(
        &app,
        "/api/v1/runs",
        json!({"playbook": "restart", "alert": alert, "by": "alice"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let first = settled(&app, body["run"].as_str().unwrap()).await;
    assert_eq!(first["outcome"], "succeeded", "{first:#}");
    assert_eq!(
        first["manual"],
        json!({"by": "alice", "playbook": "restart", "dryRun": false})
    );
    assert!(first["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["event"] == "asked for by alice"));

    // The same guards as any run: the target is in its cooldown now.
    let (_, body) = post(
        &app,
        "/api/v1/runs",
        json!({"playbook": "restart", "alert": alert, "by": "alice"}),
    )
    .await;
    let second = settled(&app, body["run"].as_str().unwrap()).await;
    assert_eq!(second["outcome"], "skipped");
    assert!(
        second["reason"].as_str().unwrap().starts_with("cooldown:"),
        "{second}"
    );

    // A webhook alert's run, run again by hand: not taken for a repeat delivery, and in dry
    // run when asked.
    app.post_webhook(&payload(&[("Probe", "p1")])).await;
    let original = app
        .wait_for_runs("alertname=Probe", Duration::from_secs(10), |r| {
            r.len() == 1 && r[0]["outcome"] == "succeeded"
        })
        .await;
    assert_eq!(original[0]["steps"][0]["output"], false);
    let id = original[0]["id"].as_str().unwrap();
    let (status, body) = post(
        &app,
        &format!("/api/v1/runs/{id}/rerun"),
        json!({"by": "bob", "dryRun": true}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let again = settled(&app, body["run"].as_str().unwrap()).await;
    assert_eq!(again["outcome"], "succeeded", "{again:#}");
    assert_eq!(
        again["steps"][0]["output"], true,
        "the steps ran as a dry run"
    );
    assert_eq!(again["manual"]["rerunOf"], id);
    assert_eq!(again["alert"]["fingerprint"], "p1");

    // Clear refusals.
    let (status, body) = post(
        &app,
        "/api/v1/runs",
        json!({"playbook": "nope", "alert": alert}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "no playbook named \"nope\" is loaded");
    let (status, body) = post(
        &app,
        "/api/v1/runs",
        json!({"playbook": "restart", "alert": {"annotations": {}}}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().starts_with("alert.labels"),
        "{body}"
    );
    let (status, _) = post(&app, "/api/v1/runs/999-0/rerun", json!({})).await;
    assert_eq!(status, 404);
    app.stop().await;
}
