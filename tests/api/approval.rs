//! Approval gates against the fake Kubernetes API: a gated restart deletes nothing until a human
//! approves it (then the pod is deleted), a denial ends the run `denied` with nothing deleted, no
//! answer before the deadline fails the run and pages once, the alert's resolution withdraws the
//! request, and a SIGKILL while waiting keeps the wait, which an approval through the CLI then
//! ends.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::channels::channels;
use crate::fake_kube::{pod, FakeApi};
use crate::helpers::{
    client, free_port, payload, run_binary, spawn_binary, wait_for, wait_healthy, Capture,
    PlaybookDir, TestApp,
};
use crate::oncall::{pages_to, wait_for_page, write_seed_oncall};

const POD: &str = "/api/v1/namespaces/shop/pods/web-1";

fn playbook(timeout: &str) -> String {
    format!(
        "name: crashloop-approved
match: {{alertname: KubePodCrashLooping}}
guards:
  target_labels: [namespace, pod]
steps:
  - name: restart-pod
    kubernetes: restart_pod
    approval: {{timeout: {timeout}, from: devops}}
    params:
      namespace: '{{{{ labels.namespace }}}}'
      pod: '{{{{ labels.pod }}}}'
"
    )
}

fn crashloop(status: &str) -> Value {
    let mut p = payload(&[("KubePodCrashLooping", "a99000000000001")]);
    let alert = &mut p["alerts"][0];
    alert["labels"]["namespace"] = json!("shop");
    alert["labels"]["pod"] = json!("web-1");
    alert["status"] = json!(status);
    p["status"] = json!(status);
    p
}

/// reactor with the gated playbook, the seed's on-call (`primary` of team devops on call today,
/// reached on the `pager` webhook), Alertmanager captured, and the fake API with pod web-1.
struct Gate {
    app: TestApp,
    api: FakeApi,
    pager: Capture,
    am: Capture,
    _dir: PlaybookDir,
}

impl Gate {
    async fn start(timeout: &str) -> Gate {
        let api = FakeApi::start(vec![pod("shop", "web-1", Some(("ReplicaSet", "web-5d9")))]).await;
        let (pager, am) = (Capture::start().await, Capture::start().await);
        let dir = PlaybookDir::new(&[("playbooks/crashloop.yaml", &playbook(timeout))]);
        let oncall = write_seed_oncall(dir.path(), "10m");
        let chans = channels(&format!(
            "pager:\n  type: webhook\n  url: {}/\n",
            pager.url()
        ));
        let app = api
            .app(&dir, &am, move |s| {
                s.oncall_dir = oncall;
                s.channels = chans;
            })
            .await;
        Gate {
            app,
            api,
            pager,
            am,
            _dir: dir,
        }
    }

    /// The alert arrives; returns its run once it waits for approval.
    async fn waiting_run(&self) -> Value {
        assert_eq!(
            self.app.post_webhook(&crashloop("firing")).await.status(),
            202
        );
        let runs = self
            .app
            .wait_for_runs(
                "playbook=crashloop-approved",
                Duration::from_secs(10),
                |r| r.iter().any(|x| x["outcome"] == "awaiting_approval"),
            )
            .await;
        runs[0].clone()
    }

    /// POSTs `body` to `path`, with the API key `key` if any: the status and the JSON answer.
    async fn post(&self, path: &str, body: Value, key: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.app.client.post(self.app.url(path)).json(&body);
        if let Some(k) = key {
            req = req.header("X-API-Key", k);
        }
        let resp = req.send().await.unwrap();
        (resp.status(), resp.json().await.unwrap_or(Value::Null))
    }

    async fn answer(&self, run: &str, decision: &str, by: &str) -> (StatusCode, Value) {
        let path = format!("/api/v1/runs/{run}/approval");
        self.post(&path, json!({"decision": decision, "by": by}), None)
            .await
    }

    async fn settled(&self, run: &str) -> Value {
        wait_for(Duration::from_secs(10), || async {
            let r: Value = self
                .app
                .client
                .get(self.app.url(&format!("/api/v1/runs/{run}")))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (!matches!(r["outcome"].as_str(), Some("running" | "awaiting_approval"))).then_some(r)
        })
        .await
        .expect("the run settles")
    }

    async fn incident(&self, number: u64) -> Value {
        let url = self.app.url(&format!("/api/v1/incidents/{number}"));
        self.app
            .client
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn nothing_is_deleted_before_approval_and_the_pod_is_deleted_after_an_approve() {
    let gate = Gate::start("15m").await;
    let run = gate.waiting_run().await;
    let id = run["id"].as_str().unwrap().to_owned();
    let asked = &run["approvals"][0];
    assert_eq!(asked["step"], "restart-pod", "{run}");
    assert_eq!(asked["from"], "devops", "{run}");
    let number = asked["incident"].as_u64().expect("an incident asks");
    let incident = gate.incident(number).await;
    assert_eq!(
        incident["title"],
        "approve restart-pod of crashloop-approved for namespace=shop, pod=web-1?"
    );
    // The approvers are asked through the team's escalation policy: its on-call first.
    wait_for_page(&gate.pager, number, "primary").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        gate.api.deletions().is_empty(),
        "nothing deleted before approval"
    );

    let (status, answered) = gate.answer(&id, "approve", "alice").await;
    assert_eq!(status, StatusCode::OK, "{answered}");
    let run = gate.settled(&id).await;
    assert_eq!(run["outcome"], "succeeded", "{run}");
    assert_eq!(gate.api.deletions(), [POD]);
    let decided = &run["approvals"][0];
    assert_eq!(decided["decision"], "approved");
    assert_eq!(decided["decidedBy"], "alice");
    assert!(decided["decidedAt"].is_string());
    assert_eq!(gate.incident(number).await["state"], "RESOLVED");

    let (status, again) = gate.answer(&id, "deny", "bob").await;
    assert_eq!(status, StatusCode::CONFLICT, "answered already: {again}");
    assert!(
        again["error"].as_str().unwrap().contains("succeeded"),
        "{again}"
    );
    gate.app.stop().await;
}

#[tokio::test]
async fn a_deny_ends_the_run_denied_with_nothing_deleted_and_nobody_paged() {
    let gate = Gate::start("15m").await;
    let run = gate.waiting_run().await;
    let id = run["id"].as_str().unwrap();
    // An answer meant for another step changes nothing.
    let path = format!("/api/v1/runs/{id}/approval");
    let body = json!({"decision": "approve", "by": "alice", "step": "another-step"});
    let (other, _) = gate.post(&path, body, None).await;
    assert_eq!(other, StatusCode::CONFLICT);
    // An on-call's API key with incidents:ack denies; the record names the key too.
    let key = json!({"name": "oncall", "scopes": ["incidents:ack"]});
    let (_, made) = gate.post("/api/v1/keys", key, None).await;
    let body = json!({"decision": "deny", "by": "alice"});
    let (denied, _) = gate.post(&path, body, made["key"].as_str()).await;
    assert_eq!(denied, StatusCode::OK);
    let run = gate.settled(id).await;
    assert_eq!(run["outcome"], "denied", "{run}");
    assert_eq!(run["approvals"][0]["decidedBy"], "alice (key oncall)");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(gate.api.deletions().is_empty());
    assert!(gate.am.posted_alerts("RemediationFailed").is_empty());
    // A malformed answer names the field.
    let (status, body) = gate.answer(id, "maybe", "alice").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap().contains("decision"),
        "{body}"
    );
    gate.app.stop().await;
}

#[tokio::test]
async fn no_answer_before_the_deadline_fails_the_run_and_escalates_once() {
    let gate = Gate::start("1s").await;
    let run = gate.waiting_run().await;
    let id = run["id"].as_str().unwrap();
    let run = gate.settled(id).await;
    assert_eq!(run["outcome"], "failed", "{run}");
    assert_eq!(run["approvals"][0]["decision"], "timed_out", "{run}");
    wait_for(Duration::from_secs(10), || async {
        (!gate.am.posted_alerts("RemediationFailed").is_empty()).then_some(())
    })
    .await
    .expect("the failed run pages");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(gate.am.posted_alerts("RemediationFailed").len(), 1, "once");
    assert!(gate.api.deletions().is_empty());
    let (status, _) = gate.answer(id, "approve", "late").await;
    assert_eq!(status, StatusCode::CONFLICT, "too late");
    gate.app.stop().await;
}

#[tokio::test]
async fn the_alert_resolving_while_waiting_cancels_the_run_and_withdraws_the_request() {
    let gate = Gate::start("15m").await;
    let run = gate.waiting_run().await;
    let id = run["id"].as_str().unwrap();
    let number = run["approvals"][0]["incident"].as_u64().unwrap();
    assert_eq!(
        gate.app.post_webhook(&crashloop("resolved")).await.status(),
        202
    );
    let run = gate.settled(id).await;
    assert_eq!(run["outcome"], "cancelled", "{run}");
    assert_eq!(run["approvals"][0]["decision"], "withdrawn");
    // The request's incident resolves just after the run is settled.
    let state = wait_for(Duration::from_secs(10), || async {
        let state = gate.incident(number).await["state"].clone();
        (state == "RESOLVED").then_some(state)
    })
    .await;
    assert_eq!(state.unwrap_or_default(), "RESOLVED");
    assert!(gate.api.deletions().is_empty());
    assert_eq!(pages_to(&gate.pager, number, "manager"), 0);
    gate.app.stop().await;
}

#[tokio::test]
async fn a_sigkill_while_waiting_keeps_the_wait_and_reactor_approve_ends_it_after_the_restart() {
    let api = FakeApi::start(vec![pod("shop", "web-1", Some(("ReplicaSet", "web-5d9")))]).await;
    let dir = PlaybookDir::new(&[("playbooks/crashloop.yaml", &playbook("15m"))]);
    let oncall = write_seed_oncall(dir.path(), "10m");
    let port = free_port();
    let config = dir.binary_config(
        port,
        "gate-token",
        &format!(
            "kubernetes:\n  kubeconfig: [{}]\noncall_dir: {}\nchannels:\n  pager:\n    type: webhook\n    url: http://127.0.0.1:9/\n",
            api.kubeconfig().display(),
            oncall.display()
        ),
    );
    let config = config.display().to_string();
    let base = format!("http://127.0.0.1:{port}");
    let mut reactor = spawn_binary(&["--config", &config, "serve"], dir.path());
    wait_healthy(port).await;
    let sent = client()
        .post(format!("{base}/webhook/alertmanager"))
        .bearer_auth("gate-token")
        .json(&crashloop("firing"))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202);
    let runs_of = || async {
        client()
            .get(format!("{base}/api/v1/runs"))
            .bearer_auth("gate-token")
            .send()
            .await
            .ok()?
            .json::<Vec<Value>>()
            .await
            .ok()
    };
    let waiting = wait_for(Duration::from_secs(10), || async {
        runs_of()
            .await?
            .into_iter()
            .find(|r| r["outcome"] == "awaiting_approval")
    })
    .await
    .expect("the run waits for approval");
    let id = waiting["id"].as_str().unwrap().to_owned();

    reactor.kill(); // SIGKILL
    let _reactor = spawn_binary(&["--config", &config, "serve"], dir.path());
    wait_healthy(port).await;
    let still = runs_of().await.unwrap();
    assert_eq!(still[0]["outcome"], "awaiting_approval", "{still:?}");
    assert!(api.deletions().is_empty());

    let (code, out, err) = run_binary(
        &[
            "approve",
            &id,
            "--by",
            "alice",
            "--url",
            &base,
            "--token",
            "gate-token",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("run {id}: running")), "{out}");
    let done = wait_for(Duration::from_secs(10), || async {
        runs_of()
            .await?
            .into_iter()
            .find(|r| r["id"] == id.as_str() && r["outcome"] == "succeeded")
    })
    .await
    .expect("the approved run succeeds after the restart");
    assert_eq!(done["approvals"][0]["decidedBy"], "alice");
    assert_eq!(api.deletions(), [POD]);
}

const GATED: &str = "name: gated-echo
match: {alertname: GatedEcho}
steps:
  - name: echo
    inline: '\"acted\"'
    approval: {timeout: 15m, from: devops}
";

#[tokio::test]
async fn the_console_and_a_signed_link_answer_an_approval_and_refuse_a_forged_form() {
    use crate::console::{claim_link, csrf, Console};
    let dir = PlaybookDir::new(&[("playbooks/gated.yaml", GATED)]);
    let (books, scripts) = (dir.playbooks(), dir.scripts());
    let c = Console::from(
        crate::oncall::Desk::start_with(move |s| {
            s.playbooks_dir = books;
            s.scripts_dir = scripts;
        })
        .await,
    );
    let app = &c.desk.app;
    let waiting = |fingerprint: &'static str| async move {
        assert_eq!(
            app.post_webhook(&payload(&[("GatedEcho", fingerprint)]))
                .await
                .status(),
            202
        );
        let runs = app
            .wait_for_runs("playbook=gated-echo", Duration::from_secs(10), |r| {
                r.iter().any(|x| {
                    x["alert"]["fingerprint"] == fingerprint && x["outcome"] == "awaiting_approval"
                })
            })
            .await;
        runs.into_iter()
            .find(|x| x["alert"]["fingerprint"] == fingerprint)
            .unwrap()
    };
    let settled = |id: String| async move {
        wait_for(Duration::from_secs(10), || async {
            let runs = app.runs("playbook=gated-echo").await;
            runs.into_iter().find(|r| {
                r["id"] == id.as_str()
                    && r["outcome"] != "awaiting_approval"
                    && r["outcome"] != "running"
            })
        })
        .await
        .expect("the run settles")
    };

    // The approver's page carries a signed link: it shows Approve and Deny, and approves.
    let run = waiting("ca0000000000001").await;
    let number = run["approvals"][0]["incident"].as_u64().unwrap();
    wait_for_page(&c.desk.pager, number, "primary").await;
    let link = claim_link(&c.desk, number, "primary");
    let path = link.strip_prefix(&app.url("")).unwrap().to_owned();
    let shown = c.get(&path, None).await;
    assert!(
        shown.body.contains("id=\"approve\"") && shown.body.contains("id=\"deny\""),
        "{}",
        shown.body
    );
    let answered = c
        .post(
            &path,
            None,
            &[("decision", "approve"), ("csrf", &csrf(&shown.body))],
        )
        .await;
    assert_eq!(answered.status, StatusCode::OK, "{}", answered.body);
    let done = settled(run["id"].as_str().unwrap().to_owned()).await;
    assert_eq!(done["outcome"], "succeeded", "{done}");
    assert_eq!(done["approvals"][0]["decidedBy"], "primary");

    // The console's run page: a forged form and a key without incidents:ack change nothing.
    let run = waiting("ca0000000000002").await;
    let id = run["id"].as_str().unwrap().to_owned();
    let page_path = format!("/ui/runs/{id}");
    let reader = c.sign_in(&c.key("reader", &["read"]).await).await;
    let page = c.get(&page_path, Some(&reader)).await;
    assert!(page.body.contains("id=\"approve\""), "{}", page.body);
    let refused = c
        .post(
            &page_path,
            Some(&reader),
            &[
                ("decision", "approve"),
                ("step", "echo"),
                ("csrf", &csrf(&page.body)),
            ],
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let oncall = c
        .sign_in(&c.key("oncall", &["read", "incidents:ack"]).await)
        .await;
    let forged = c
        .post(
            &page_path,
            Some(&oncall),
            &[
                ("decision", "approve"),
                ("step", "echo"),
                ("csrf", "forged"),
            ],
        )
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert_eq!(
        app.runs("playbook=gated-echo")
            .await
            .iter()
            .find(|r| r["id"] == id.as_str())
            .unwrap()["outcome"],
        "awaiting_approval"
    );
    let page = c.get(&page_path, Some(&oncall)).await;
    let denied = c
        .post(
            &page_path,
            Some(&oncall),
            &[
                ("decision", "deny"),
                ("step", "echo"),
                ("csrf", &csrf(&page.body)),
            ],
        )
        .await;
    assert_eq!(denied.status, StatusCode::OK, "{}", denied.body);
    let done = settled(id).await;
    assert_eq!(done["outcome"], "denied", "{done}");
    assert_eq!(done["approvals"][0]["decidedBy"], "oncall");
    assert!(
        done["steps"].as_array().is_none_or(|s| s.is_empty()),
        "nothing ran: {done}"
    );
}
