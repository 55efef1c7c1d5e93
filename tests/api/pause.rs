//! Maintenance pauses against the fake Kubernetes API: a pause for `namespace="shop"` records
//! the alerts it selects as `paused` runs and acts on nothing; once it expires (or is lifted) the
//! next alert is remediated. A bad pause is refused naming its field, and the CLI pauses, lists
//! and lifts through the service.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fake_kube::{pod, FakeApi};
use crate::helpers::{payload, run_binary, wait_for, Capture, PlaybookDir, TestApp};

const PLAYBOOK: &str = "name: crashloop-restart
match: {alertname: KubePodCrashLooping}
steps:
  - name: restart-pod
    kubernetes: restart_pod
    params:
      namespace: '{{ labels.namespace }}'
      pod: '{{ labels.pod }}'
";

fn crashloop(fingerprint: &str) -> Value {
    let mut p = payload(&[("KubePodCrashLooping", fingerprint)]);
    p["alerts"][0]["labels"]["namespace"] = json!("shop");
    p["alerts"][0]["labels"]["pod"] = json!("web-1");
    p
}

struct Shop {
    app: TestApp,
    api: FakeApi,
    am: Capture,
    dir: PlaybookDir,
}

impl Shop {
    async fn start() -> Shop {
        let api = FakeApi::start(vec![pod("shop", "web-1", Some(("ReplicaSet", "web-5d9")))]).await;
        let am = Capture::start().await;
        let dir = PlaybookDir::new(&[("playbooks/crashloop.yaml", PLAYBOOK)]);
        let app = api.app(&dir, &am, |_| {}).await;
        Shop { app, api, am, dir }
    }

    async fn pause(&self, body: Value) -> (StatusCode, Value) {
        let resp = self
            .app
            .client
            .post(self.app.url("/api/v1/pauses"))
            .json(&body)
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json().await.unwrap_or(Value::Null))
    }

    /// Sends the alert `fingerprint`; its run once it settles.
    async fn run_of(&self, fingerprint: &str) -> Value {
        assert_eq!(
            self.app
                .post_webhook(&crashloop(fingerprint))
                .await
                .status(),
            202
        );
        let runs = self
            .app
            .wait_for_runs(
                "alertname=KubePodCrashLooping",
                Duration::from_secs(10),
                |r| {
                    r.iter().any(|x| {
                        x["alert"]["fingerprint"] == fingerprint && x["outcome"] != "running"
                    })
                },
            )
            .await;
        runs.into_iter()
            .find(|x| x["alert"]["fingerprint"] == fingerprint)
            .unwrap()
    }
}

#[tokio::test]
async fn a_pause_for_the_shop_namespace_holds_its_alerts_until_it_expires() {
    let shop = Shop::start().await;
    let (status, pause) = shop
        .pause(json!({"matchers": "namespace=\"shop\"", "for": "2s", "reason": "database migration", "by": "ann"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{pause}");
    let listed: Vec<Value> = shop
        .app
        .client
        .get(shop.app.url("/api/v1/pauses"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");

    let run = shop.run_of("9a0000000000001").await;
    assert_eq!(run["outcome"], "paused", "{run}");
    let reason = run["reason"].as_str().unwrap();
    assert!(
        reason.contains("database migration") && reason.contains("ann"),
        "{reason}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(shop.api.deletions().is_empty(), "nothing acted");
    assert!(
        shop.am.posted_alerts("RemediationFailed").is_empty(),
        "nobody paged"
    );

    // After it expires, the next alert is remediated.
    let until: jiff::Timestamp = pause["until"].as_str().unwrap().parse().unwrap();
    wait_for(Duration::from_secs(5), || async {
        (jiff::Timestamp::now() > until).then_some(())
    })
    .await
    .unwrap();
    let run = shop.run_of("9a0000000000002").await;
    assert_eq!(run["outcome"], "succeeded", "{run}");
    assert_eq!(shop.api.deletions(), ["/api/v1/namespaces/shop/pods/web-1"]);
    shop.app.stop().await;
}

#[tokio::test]
async fn a_bad_pause_is_refused_naming_the_field() {
    let shop = Shop::start().await;
    for (body, field) in [
        (json!({"for": "2h", "reason": "x"}), "playbook or matchers"),
        (
            json!({"playbook": "nope", "for": "2h", "reason": "x"}),
            "playbook: ",
        ),
        (
            json!({"matchers": "=\"shop\"", "for": "2h", "reason": "x"}),
            "matchers: ",
        ),
        (
            json!({"playbook": "crashloop-restart", "for": "90d", "reason": "x"}),
            "for: ",
        ),
        (
            json!({"playbook": "crashloop-restart", "for": "2h", "reason": ""}),
            "reason: ",
        ),
        (
            json!({"playbook": "crashloop-restart", "reason": "x"}),
            "for",
        ),
    ] {
        let (status, answer) = shop.pause(body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(field), "{body}: {error}");
    }
    shop.app.stop().await;
}

// The CLI blocks its thread while the app answers on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reactor_pause_lists_and_unpause_lift_a_pause_through_the_service() {
    let shop = Shop::start().await;
    let url = shop.app.url("");
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--url", url.as_str()]);
        run_binary(&all, shop.dir.path())
    };
    let (code, out, err) = cli(&[
        "pause",
        "--playbook",
        "crashloop-restart",
        "--for",
        "1h",
        "--reason",
        "node upgrade",
        "--by",
        "ann",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let id = out.split('\t').next().unwrap().trim().to_owned();
    let (code, out, _) = cli(&["pauses"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("playbook=crashloop-restart") && out.contains("node upgrade"),
        "{out}"
    );
    let run = shop.run_of("9b0000000000001").await;
    assert_eq!(run["outcome"], "paused", "{run}");

    let (code, out, err) = cli(&["unpause", &id, "--by", "ann"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("lifted by ann"), "{out}");
    let (_, out, _) = cli(&["pauses"]);
    assert!(out.trim().is_empty(), "none in force: {out}");
    let run = shop.run_of("9b0000000000002").await;
    assert_eq!(run["outcome"], "succeeded", "{run}");
    let (code, _, err) = cli(&["unpause", &id]);
    assert_ne!(code, 0);
    assert!(
        err.contains("409") && err.contains("no longer in force"),
        "{err}"
    );
    shop.app.stop().await;
}
