//! Two replicas of the real binary against the fake Kubernetes API served over HTTP: one leads
//! and the other answers 503; killing the leader under a stream of crash-loop alerts hands over
//! within the Lease's duration and a renewal, and every pod is deleted exactly once (the fake
//! API's own record of deletions judges), including those whose runs the old leader had started;
//! a pod restarted by one replica is not restarted by the other within the cooldown; and a leader
//! cut off from the API server steps down within the Lease's duration and acts on nothing after.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use k8s_openapi::api::coordination::v1::Lease;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fake_kube::{pod, FakeApi, Fault};
use crate::helpers::{client, free_port, serve_local, spawn_binary, wait_for, PlaybookDir, Proc};

const TOKEN: &str = "ha-token";
const LEASE: Duration = Duration::from_secs(3);
const RENEW: Duration = Duration::from_secs(1);

const CRASHLOOP: &str = "name: crashloop
match: {alertname: KubePodCrashLooping}
guards:
  target_labels: [namespace, pod]
  cooldown: 10m
  max_attempts: 3
  window: 1h
steps:
  - name: restart-pod
    kubernetes: restart_pod
    timeout: 30s
    params:
      namespace: '{{ labels.namespace }}'
      pod: '{{ labels.pod }}'
";

/// Alertmanager's API as the replicas read it: the firing alerts (`GET /api/v2/alerts`), and
/// whatever they post (heartbeats, pages) taken and dropped.
#[derive(Clone, Default)]
struct Firing(Arc<Mutex<Vec<Value>>>);

impl Firing {
    /// Serves it until the guard is dropped.
    async fn serve(&self) -> (String, tokio_util::sync::DropGuard) {
        let app =
            Router::new()
                .route(
                    "/api/v2/alerts",
                    get(|State(f): State<Firing>| async move {
                        Json(json!(f.0.lock().unwrap().clone()))
                    })
                    .post(|| async { "ok" }),
                )
                .with_state(self.clone());
        let (addr, shutdown) = serve_local(app).await;
        (format!("http://{addr}"), shutdown.drop_guard())
    }

    fn add(&self, webhook: &Value) {
        let a = &webhook["alerts"][0];
        self.0.lock().unwrap().push(json!({
            "labels": a["labels"], "annotations": {}, "startsAt": a["startsAt"],
            "fingerprint": a["fingerprint"], "status": {"state": "active", "silencedBy": [], "inhibitedBy": []},
        }));
    }
}

fn crashloop(i: usize) -> Value {
    let fp = format!("{:016x}", 0xc0de_0000_u64 + i as u64);
    json!({"receiver": "reactor", "status": "firing", "version": "4", "groupKey": "{}", "truncatedAlerts": 0,
           "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://127.0.0.1:9093",
           "alerts": [{"status": "firing",
               "labels": {"alertname": "KubePodCrashLooping", "namespace": "shop", "pod": format!("p-{i:02}"), "remediation": "auto"},
               "annotations": {}, "startsAt": "2026-12-03T08:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
               "generatorURL": "http://127.0.0.1/graph", "fingerprint": fp}]})
}

struct Replica {
    name: &'static str,
    port: u16,
    dir: PlaybookDir,
    proc: Option<Proc>,
}

impl Replica {
    fn start(name: &'static str, api: &FakeApi, alertmanager: &str) -> Replica {
        let dir = PlaybookDir::new(&[("playbooks/crashloop.yaml", CRASHLOOP)]);
        let port = free_port();
        let config = dir
            .binary_config(
                port,
                TOKEN,
                &format!(
                    "kubernetes:\n  kubeconfig: [{}]\n  request_timeout: 1s\nha:\n  enabled: true\n  lease_name: reactor\n  namespace: default\n  lease_duration: 3s\n  renew_every: 1s\n  clock_skew: 500ms\n  identity: {name}\nalertmanager:\n  url: {alertmanager}\n  poll_interval: 1s\n",
                    api.kubeconfig().display()
                ),
            )
            .display()
            .to_string();
        let proc = spawn_binary(&["--config", &config, "serve"], dir.path());
        Replica {
            name,
            port,
            dir,
            proc: Some(proc),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Whether it leads, as its `/readyz` says; `None` when it does not answer.
    async fn leads(&self) -> Option<bool> {
        let r = client().get(self.url("/readyz")).send().await.ok()?;
        let v: Value = r.json().await.ok()?;
        v["checks"]["leadership"]["leading"].as_bool()
    }

    async fn post(&self, body: &Value) -> Option<reqwest::Response> {
        client()
            .post(self.url("/webhook/alertmanager"))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
            .ok()
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("reactor.log")).unwrap_or_default()
    }
}

/// Waits until exactly one of the replicas leads and the others answer as standbys: its index.
async fn leader(replicas: &[&Replica], within: Duration) -> usize {
    wait_for(within, || async {
        let mut states = Vec::new();
        for r in replicas {
            states.push(r.leads().await?);
        }
        let leaders: Vec<usize> = (0..states.len()).filter(|&i| states[i]).collect();
        (leaders.len() == 1).then(|| leaders[0])
    })
    .await
    .unwrap_or_else(|| {
        let logs: Vec<String> = replicas
            .iter()
            .map(|r| format!("{}:\n{}", r.name, r.log()))
            .collect();
        panic!("no single leader within {within:?}\n{}", logs.join("\n"))
    })
}

/// The fake cluster with `n` pods, Alertmanager's API, and two replicas: the leader first.
struct Pair {
    api: FakeApi,
    firing: Firing,
    _stop: tokio_util::sync::DropGuard,
    leader: Replica,
    standby: Replica,
}

async fn pair(n: usize) -> Pair {
    let api = FakeApi::start(pods(n)).await;
    let firing = Firing::default();
    let (am, stop) = firing.serve().await;
    let a = Replica::start("a", &api, &am);
    let b = Replica::start("b", &api, &am);
    let l = leader(&[&a, &b], Duration::from_secs(20)).await;
    let (leader, standby) = if l == 0 { (a, b) } else { (b, a) };
    Pair {
        api,
        firing,
        _stop: stop,
        leader,
        standby,
    }
}

async fn lease_holder(api: &FakeApi) -> Option<String> {
    let leases: kube::Api<Lease> = kube::Api::namespaced(api.client.clone(), "default");
    leases.get("reactor").await.ok()?.spec?.holder_identity
}

/// `n` crash-looping pods in `shop`, and the replicas' own pods `a` and `b`.
fn pods(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| pod("shop", &format!("p-{i:02}"), Some(("ReplicaSet", "p-rs"))))
        .chain(["a", "b"].map(|r| pod("default", r, Some(("StatefulSet", "reactor")))))
        .collect()
}

/// The role label on a replica's pod.
async fn role(api: &FakeApi, replica: &str) -> Option<String> {
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(api.client.clone(), "default");
    pods.get(replica)
        .await
        .ok()?
        .metadata
        .labels?
        .get("reactor.dev/role")
        .cloned()
}

/// How many times the fake deleted pod `i`.
fn deleted(api: &FakeApi, i: usize) -> usize {
    let path = format!("/api/v1/namespaces/shop/pods/p-{i:02}");
    api.deletions().iter().filter(|p| **p == path).count()
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_the_standby_answers_503() {
    let Pair {
        api,
        leader,
        standby,
        ..
    } = pair(1).await;
    let (leader, standby) = (&leader, &standby);
    assert_eq!(lease_holder(&api).await.as_deref(), Some(leader.name));

    // Each labels its own pod: the Service selects the leader's.
    wait_for(Duration::from_secs(10), || async {
        let roles = (
            role(&api, leader.name).await?,
            role(&api, standby.name).await?,
        );
        (roles == ("leader".into(), "standby".into())).then_some(())
    })
    .await
    .expect("the leader's pod says leader, the standby's standby");
    // Ready as a pod (rollouts, the disruption budget), not for traffic.
    let pod_ready = client()
        .get(standby.url("/readyz?standby=ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(pod_ready.status(), StatusCode::OK);
    let ready = client().get(standby.url("/readyz")).send().await.unwrap();
    assert_eq!(
        ready.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "a Service routes to the leader only"
    );
    let refused = standby.post(&crashloop(0)).await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        refused.headers().get("retry-after").is_some(),
        "Alertmanager retries"
    );
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains(&format!("{} leads", leader.name)),
        "{body}"
    );

    let accepted = leader.post(&crashloop(0)).await.unwrap();
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
    wait_for(Duration::from_secs(10), || async {
        (deleted(&api, 0) == 1).then_some(())
    })
    .await
    .expect("the leader restarts the pod");
}

#[tokio::test]
async fn a_killed_leader_hands_over_within_the_lease_and_every_pod_is_deleted_once() {
    const PODS: usize = 24;
    let Pair {
        api,
        firing,
        _stop,
        leader: mut old,
        standby: new,
    } = pair(PODS).await;
    let new = &new;

    // Alertmanager's delivery: to the replica the Service routes to, retried on a 503.
    async fn deliver(replicas: [&Replica; 2], body: &Value) {
        wait_for(Duration::from_secs(30), || async {
            for r in replicas {
                if let Some(resp) = r.post(body).await {
                    if resp.status() == StatusCode::ACCEPTED {
                        return Some(());
                    }
                }
            }
            None
        })
        .await
        .expect("a replica takes the alert");
    }

    // The last alerts before the kill reach the old leader, which starts their runs but dies
    // before their deletes land.
    let in_flight = [10, 11, 12];
    for i in in_flight {
        api.fail("DELETE", &format!("/pods/p-{i:02}"), Fault::Hang);
    }
    for i in 0..13 {
        let body = crashloop(i);
        firing.add(&body);
        deliver([&old, new], &body).await;
    }
    wait_for(Duration::from_secs(10), || async {
        ((0..10).all(|i| deleted(&api, i) == 1)).then_some(())
    })
    .await
    .expect("the old leader restarted the first pods");
    let hung = |api: &FakeApi| {
        in_flight
            .iter()
            .filter(|i| {
                api.requests()
                    .iter()
                    .any(|r| r.starts_with("DELETE") && r.contains(&format!("/pods/p-{i:02}")))
            })
            .count()
    };
    wait_for(Duration::from_secs(10), || async {
        (hung(&api) == 3).then_some(())
    })
    .await
    .expect("the old leader's last runs are acting");

    old.kill(); // SIGKILL
    let killed = Instant::now();
    api.heal();
    // The stream goes on: Alertmanager retries each alert until a replica takes it.
    for i in 13..PODS {
        let body = crashloop(i);
        firing.add(&body);
        deliver([&old, new], &body).await;
    }
    wait_for(Duration::from_secs(30), || async {
        (new.leads().await == Some(true)).then_some(())
    })
    .await
    .expect("the standby leads");
    let takeover = killed.elapsed();
    println!("takeover after SIGKILL: {takeover:?} (lease {LEASE:?} + renew {RENEW:?})");
    assert!(
        takeover <= LEASE + RENEW + Duration::from_secs(1),
        "took {takeover:?}"
    );

    let all_once = wait_for(Duration::from_secs(30), || async {
        ((0..PODS).all(|i| deleted(&api, i) == 1)).then_some(())
    })
    .await;
    let counts: Vec<usize> = (0..PODS).map(|i| deleted(&api, i)).collect();
    assert!(
        all_once.is_some(),
        "deletions per pod: {counts:?}\n{}",
        new.log()
    );
    // And nothing more arrives later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counts: Vec<usize> = (0..PODS).map(|i| deleted(&api, i)).collect();
    assert!(
        counts.iter().all(|&c| c == 1),
        "deletions per pod: {counts:?}"
    );

    // The verbs used on Leases are exactly those rbac.yaml grants.
    let verb = |r: &String| match r.split(' ').next().unwrap() {
        "GET" => "get",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        other => panic!("{other} on a Lease"),
    };
    let used: std::collections::BTreeSet<&str> = api
        .requests()
        .iter()
        .filter(|r| r.contains("/leases"))
        .map(verb)
        .collect();
    let rbac = std::fs::read_to_string(crate::helpers::repo().join("deploy/kubernetes/rbac.yaml"))
        .unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&rbac).unwrap();
    let role = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "reactor-leases" && d["kind"] == "Role")
        .unwrap();
    let granted: std::collections::BTreeSet<&str> = role["rules"][0]["verbs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        used, granted,
        "Lease verbs used (left) vs granted by rbac.yaml"
    );
}

#[tokio::test]
async fn a_pod_restarted_by_one_replica_is_not_restarted_by_the_other_within_the_cooldown() {
    let Pair {
        api,
        _stop,
        leader: mut old,
        standby: new,
        ..
    } = pair(1).await;
    let body = crashloop(0);
    assert_eq!(
        old.post(&body).await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    wait_for(Duration::from_secs(10), || async {
        (deleted(&api, 0) == 1).then_some(())
    })
    .await
    .expect("the first leader restarts the pod");
    // The pod crash-loops again at once; its controller made a new one under the same name.
    let pods_api: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(api.client.clone(), "shop");
    pods_api
        .create(
            &kube::api::PostParams::default(),
            &serde_json::from_value(pod("shop", "p-00", Some(("ReplicaSet", "p-rs")))).unwrap(),
        )
        .await
        .unwrap();

    old.kill();
    wait_for(Duration::from_secs(20), || async {
        (new.leads().await == Some(true)).then_some(())
    })
    .await
    .expect("the other replica leads");
    // A new episode of the alert (Alertmanager re-fires it): a new run, which the cluster's lock
    // deduplicates.
    let mut again = crashloop(0);
    again["alerts"][0]["startsAt"] = json!("2026-12-03T08:05:00Z");
    assert_eq!(
        new.post(&again).await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    let run = wait_for(Duration::from_secs(10), || async {
        let runs: Vec<Value> = client()
            .get(new.url("/api/v1/runs"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        runs.into_iter().find(|r| r["outcome"] != "running")
    })
    .await
    .expect("the run is recorded");
    assert_eq!(run["outcome"], "deduplicated", "{run}");
    assert!(
        run["reason"].as_str().unwrap().contains(&format!(
            "another replica ({}) acted on this target",
            old.name
        )),
        "{run}"
    );
    assert_eq!(deleted(&api, 0), 1, "restarted once within the cooldown");
}

#[tokio::test]
async fn a_leader_cut_off_from_the_api_server_steps_down_within_the_lease_and_acts_on_nothing() {
    let api = FakeApi::start(pods(1)).await;
    let firing = Firing::default();
    let (am, _stop) = firing.serve().await;
    let a = Replica::start("a", &api, &am);
    leader(&[&a], Duration::from_secs(20)).await;
    // The API server stops answering anything.
    for method in ["GET", "PUT", "PATCH", "POST", "DELETE"] {
        api.fail(method, "/", Fault::Hang);
    }
    let cut = Instant::now();
    wait_for(Duration::from_secs(10), || async {
        (a.leads().await == Some(false)).then_some(())
    })
    .await
    .expect("the leader steps down");
    let stepped = cut.elapsed();
    println!("stepped down {stepped:?} after the API server went away (lease {LEASE:?})");
    assert!(stepped <= LEASE, "stepped down after {stepped:?}");
    let refused = a.post(&crashloop(0)).await.unwrap();
    assert_eq!(
        refused.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "it takes no alert"
    );
    let before = api.requests().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: Vec<String> = api.requests()[before..].to_vec();
    assert!(
        after
            .iter()
            .all(|r| r.contains("/leases/")
                || r.starts_with("PATCH /api/v1/namespaces/default/pods/a?")),
        "only its campaign for the Lease and its own pod's role label, no action: {after:?}"
    );
    assert_eq!(deleted(&api, 0), 0);
}

#[tokio::test]
async fn two_clustered_alertmanagers_both_delivering_the_same_alert_make_one_run() {
    let app = crate::helpers::TestApp::spawn(|s| {
        s.auth.bearer_token = Some(TOKEN.into());
    })
    .await;
    let humans = crate::helpers::Capture::start().await;
    let config = crate::helpers::alertmanager_config(app.addr, TOKEN, &humans.url());
    let (p1, p2, c1, c2) = (free_port(), free_port(), free_port(), free_port());
    // A peer timeout of 0: neither waits for the other, so both deliver, as Alertmanager's HA
    // does whenever gossip is slower than sending (it delivers at least once, by design).
    let (am1, am2) = tokio::join!(
        crate::helpers::Alertmanager::start_clustered(p1, c1, c2, "0s", &config),
        crate::helpers::Alertmanager::start_clustered(p2, c2, c1, "0s", &config),
    );
    // The two gossip: each lists both peers.
    for am in [&am1, &am2] {
        wait_for(Duration::from_secs(30), || async {
            let status: Value = client()
                .get(format!("{}/api/v2/status", am.url()))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (status["cluster"]["peers"].as_array()?.len() == 2).then_some(())
        })
        .await
        .expect("the Alertmanagers form a cluster");
    }
    // Prometheus sends each alert to every Alertmanager. Whether both deliver is a race with
    // the gossip of the notification log (slow here), so a fresh alert is tried until one is
    // delivered twice; an alert that one Alertmanager suppressed is still run exactly once.
    let mut twice = None;
    for attempt in 1..=5 {
        let instance = format!("ha-{attempt}");
        let alerts = json!([{
            "labels": {"alertname": "ReactorSelfTestOk", "instance": instance, "severity": "warning"},
            "annotations": {"summary": "clustered"},
            "startsAt": jiff::Timestamp::now().to_string(),
        }]);
        tokio::join!(am1.post_alerts(&alerts), am2.post_alerts(&alerts));
        let runs_of_this = || async {
            let runs = app.runs("alertname=ReactorSelfTestOk").await;
            let this = |r: &Value| r["alert"]["labels"]["instance"] == instance.as_str();
            runs.into_iter().filter(this).collect::<Vec<_>>()
        };
        let settled = |r: &[Value]| !r.is_empty() && r.iter().all(|x| x["outcome"] != "running");
        wait_for(Duration::from_secs(30), || async {
            Some(runs_of_this().await).filter(|r| settled(r))
        })
        .await
        .expect("the alert is run");
        // The second copy, if any, follows within the group wait.
        let both = wait_for(Duration::from_secs(5), || async {
            Some(runs_of_this().await).filter(|r| r.len() >= 2 && settled(r))
        })
        .await;
        let runs = match both {
            Some(runs) => runs,
            None => runs_of_this().await,
        };
        let succeeded = runs.iter().filter(|r| r["outcome"] == "succeeded").count();
        assert_eq!(succeeded, 1, "one run per alert: {runs:?}");
        assert!(
            runs.iter()
                .all(|r| r["outcome"] == "succeeded" || r["outcome"] == "deduplicated"),
            "every other copy is deduplicated: {runs:?}"
        );
        if runs.len() >= 2 {
            twice = Some(attempt);
            break;
        }
    }
    let attempt = twice.expect("in five alerts, both Alertmanagers delivered one of them");
    println!("both Alertmanagers delivered alert {attempt}; reactor ran it once");
    app.stop().await;
}
