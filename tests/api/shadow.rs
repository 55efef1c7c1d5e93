//! Earning trust before acting: a shadow playbook goes through matching, guards and every step
//! against the fake Kubernetes API, but acts as a dry run, pages nobody, and records what it
//! would have done; switched to live, it starts with clean guard counters and acts.

use std::time::Duration;

use serde_json::{json, Value};

use crate::fake_kube::{pod, FakeApi};
use crate::helpers::{payload, Capture, PlaybookDir, TestApp};

const PLAYBOOK: &str = "name: crashloop-shadow
match: {alertname: KubePodCrashLooping}
guards:
  target_labels: [namespace, pod]
  max_attempts: 1
  window: 1h
steps:
  - name: restart-pod
    kubernetes: restart_pod
    params:
      namespace: '{{ labels.namespace }}'
      pod: '{{ labels.pod }}'
";

fn crashloop(starts: &str) -> Value {
    let mut p = payload(&[("KubePodCrashLooping", "5ad0000000000001")]);
    let labels = &mut p["alerts"][0]["labels"];
    labels["namespace"] = json!("shop");
    labels["pod"] = json!("web-1");
    p["alerts"][0]["startsAt"] = json!(starts);
    p
}

#[tokio::test]
async fn a_shadow_playbook_deletes_nothing_pages_nobody_and_lists_the_delete_it_would_have_made() {
    let api = FakeApi::start(vec![pod("shop", "web-1", Some(("ReplicaSet", "web-5d9")))]).await;
    let am = Capture::start().await;
    // The shadow version also has a step that fails: still nobody is paged.
    let shadow = format!(
        "mode: shadow\n{PLAYBOOK}  - name: then-fails\n    inline: 'throw \"would have failed\"'\n"
    );
    let dir = PlaybookDir::new(&[("playbooks/crashloop.yaml", &shadow)]);
    let app = api.app(&dir, &am, |_| {}).await;
    assert_eq!(
        app.post_webhook(&crashloop("2026-12-03T08:00:00Z"))
            .await
            .status(),
        202
    );
    let runs = app
        .wait_for_runs("mode=shadow", Duration::from_secs(10), |r| !r.is_empty())
        .await;
    let run = &runs[0];
    assert_eq!(run["outcome"], "shadow", "{run}");
    assert_eq!(
        run["shadowActions"],
        json!(["delete pods/web-1 in shop"]),
        "{run}"
    );
    assert!(
        run["reason"]
            .as_str()
            .unwrap()
            .contains("would have failed"),
        "{run}"
    );
    assert!(
        run["steps"][0]["changes"][0]["dryRun"] == true,
        "the delete was a server-side dry run: {run}"
    );
    assert!(api.deletions().is_empty(), "nothing deleted");
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(api.client.clone(), "shop");
    assert!(pods.get("web-1").await.is_ok(), "the pod still exists");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        am.posted_alerts("RemediationFailed").is_empty(),
        "nobody paged"
    );
    assert!(run["notifications"].is_null(), "{run}");
    let metrics = app.metrics().await;
    let line = "reactor_shadow_actions_total{playbook=\"crashloop-shadow\",action=\"delete\"} 1";
    assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    assert!(app.runs("mode=live").await.is_empty(), "the API's filter");

    // Switched to live: the guards start clean (max_attempts 1 was used by the shadow run) and
    // the pod is restarted.
    std::fs::write(dir.playbooks().join("crashloop.yaml"), PLAYBOOK).unwrap();
    let reloaded = app.client.post(app.url("/-/reload")).send().await.unwrap();
    assert_eq!(reloaded.status(), 200);
    assert_eq!(
        app.post_webhook(&crashloop("2026-12-03T08:05:00Z"))
            .await
            .status(),
        202
    );
    let live = app
        .wait_for_runs("mode=live", Duration::from_secs(10), |r| {
            r.iter().any(|x| x["outcome"] != "running")
        })
        .await;
    assert_eq!(live[0]["outcome"], "succeeded", "{}", live[0]);
    assert_eq!(api.deletions(), ["/api/v1/namespaces/shop/pods/web-1"]);
    app.stop().await;
}

#[tokio::test]
async fn in_shadow_for_all_the_shipped_disk_playbook_lists_the_file_it_would_delete_and_keeps_it() {
    let node = tempfile::tempdir().unwrap();
    let old = crate::helpers::old_log(node.path());
    let logs = old.parent().unwrap().to_path_buf();
    let root = logs.clone();
    // As REACTOR_MODE=shadow sets it.
    let app = TestApp::spawn(move |s| {
        s.disk_cleanup.allowed_roots = vec![root];
        s.mode = reactor::playbook::Mode::Shadow;
    })
    .await;
    let mut body = payload(&[("NodeFilesystemAlmostOutOfSpace", "5ad0000000000d15")]);
    let labels = &mut body["alerts"][0]["labels"];
    labels["mountpoint"] = json!(node.path());
    labels["device"] = json!("/dev/sda1");
    labels["fstype"] = json!("ext4");
    assert_eq!(app.post_webhook(&body).await.status(), 202);
    let runs = app
        .wait_for_runs("mode=shadow", Duration::from_secs(10), |r| !r.is_empty())
        .await;
    let run = &runs[0];
    assert_eq!(run["outcome"], "shadow", "{run}");
    let actions = run["shadowActions"].as_array().unwrap();
    assert_eq!(actions.len(), 1, "{run}");
    let action = actions[0].as_str().unwrap();
    assert!(action.starts_with("delete 1 file(s) matching"), "{action}");
    assert!(old.exists(), "nothing deleted");
    app.stop().await;
}
