//! Kubernetes actions against kube-fake-client served over HTTP (see `fake_kube`), through the
//! same `Kubernetes::connect` and `kube::Client` production uses; then the real binary end to end.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ApiResource;
use reactor::executor::kubernetes::{run, Change, KubeError, Kubernetes, Request};
use serde_json::{json, Value};

use crate::fake_kube::{deployment, hpa, pod, FakeApi, Fault};
use crate::helpers::{
    client, free_port, get_runs, payload, spawn_binary, wait_for, wait_healthy, Capture,
    PlaybookDir,
};

fn request(action: &str, params: Value) -> Request {
    let Value::Object(p) = params else { panic!() };
    Request::parse(action, p).expect("valid request")
}

/// Runs one request: (result, changes recorded).
async fn act(
    kube: &Kubernetes,
    action: &str,
    params: Value,
    dry_run: bool,
) -> (Result<Value, KubeError>, Vec<Change>) {
    let mut changes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = run(
        Some(kube),
        &request(action, params),
        dry_run,
        deadline,
        &mut changes,
    )
    .await;
    (r, changes)
}

fn pods() -> ApiResource {
    ApiResource::erase::<Pod>(&())
}

fn deployments() -> ApiResource {
    ApiResource::erase::<Deployment>(&())
}

fn replicas(d: &Option<Value>) -> u64 {
    d.as_ref().unwrap()["spec"]["replicas"].as_u64().unwrap()
}

#[tokio::test]
async fn restart_pod_deletes_a_controlled_pod_and_records_it() {
    let api = FakeApi::start(vec![pod("shop", "web-1", Some(("ReplicaSet", "web-5d9")))]).await;
    let kube = api.connect(api.settings()).await;
    let (r, changes) = act(
        &kube,
        "restart_pod",
        json!({"namespace": "shop", "pod": "web-1"}),
        false,
    )
    .await;
    let out = r.expect("restarted");
    assert_eq!(out["owner"], "ReplicaSet/web-5d9");
    assert!(
        api.get(&pods(), "shop", "web-1").await.is_none(),
        "pod gone"
    );
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].verb, "delete");
    assert_eq!(changes[0].object, "pods/web-1");
    assert_eq!(changes[0].namespace, "shop");
    assert_eq!(changes[0].result, "ok");
    assert!(!changes[0].dry_run);
}

#[tokio::test]
async fn a_standalone_pod_is_refused_unless_allowed() {
    let api = FakeApi::start(vec![pod("shop", "lonely", None)]).await;
    let kube = api.connect(api.settings()).await;
    let params = json!({"namespace": "shop", "pod": "lonely"});
    let (r, changes) = act(&kube, "restart_pod", params, false).await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("has no controller owner"), "{e}");
    assert!(changes.is_empty());
    assert!(api.mutations().is_empty(), "{:?}", api.mutations());
    assert!(api.get(&pods(), "shop", "lonely").await.is_some());

    let params = json!({"namespace": "shop", "pod": "lonely", "allow_standalone": true});
    let (r, _) = act(&kube, "restart_pod", params, false).await;
    r.expect("allowed");
    assert!(api.get(&pods(), "shop", "lonely").await.is_none());
}

#[tokio::test]
async fn rollout_restart_stamps_the_pod_template() {
    let api = FakeApi::start(vec![deployment("shop", "web", 3)]).await;
    let kube = api.connect(api.settings()).await;
    let params = json!({"namespace": "shop", "kind": "Deployment", "name": "web"});
    let (r, changes) = act(&kube, "rollout_restart", params, false).await;
    let out = r.expect("restarted");
    let d = api.get(&deployments(), "shop", "web").await.unwrap();
    let stamped =
        &d["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"];
    assert_eq!(*stamped, out["restartedAt"]);
    assert!(
        stamped.as_str().unwrap().parse::<jiff::Timestamp>().is_ok(),
        "{stamped}"
    );
    assert_eq!(d["spec"]["replicas"], 3, "nothing else changed");
    assert_eq!(changes[0].verb, "patch");
    assert_eq!(changes[0].object, "deployments.apps/web");
    assert!(api
        .mutations()
        .iter()
        .any(|m| m.starts_with("PATCH /apis/apps/v1/namespaces/shop/deployments/web")));
}

#[tokio::test]
async fn scale_up_stops_at_max_replicas_and_never_past_it() {
    let api = FakeApi::start(vec![deployment("shop", "web", 8)]).await;
    let kube = api.connect(api.settings()).await;
    let params = json!({"namespace": "shop", "kind": "deployment", "name": "web", "by": 4, "max_replicas": 10});
    let (r, changes) = act(&kube, "scale_up", params.clone(), false).await;
    let out = r.expect("scaled");
    assert_eq!(
        (
            out["replicas_before"].as_u64(),
            out["replicas_after"].as_u64()
        ),
        (Some(8), Some(10))
    );
    assert_eq!(replicas(&api.get(&deployments(), "shop", "web").await), 10);
    assert_eq!(
        changes[0].detail,
        json!({"replicas": {"before": 8, "after": 10}})
    );

    let before = api.mutations().len();
    let (r, changes) = act(&kube, "scale_up", params, false).await;
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("already has 10 replicas, at or above max_replicas 10"),
        "{e}"
    );
    assert!(changes.is_empty());
    assert_eq!(api.mutations().len(), before, "no write when refused");
    assert_eq!(replicas(&api.get(&deployments(), "shop", "web").await), 10);

    let factor = json!({"namespace": "shop", "kind": "Deployment", "name": "web", "factor": 1.5, "max_replicas": 100});
    let (r, _) = act(&kube, "scale_up", factor, false).await;
    assert_eq!(r.unwrap()["replicas_after"], 15);
}

#[tokio::test]
async fn scale_up_conflicts_instead_of_overwriting_a_concurrent_change() {
    let api = FakeApi::start(vec![deployment("shop", "web", 2)]).await;
    // Another writer (a human, a GitOps sync) sets 7 replicas right after reactor read 2.
    api.fail(
        "GET",
        "/deployments/web",
        Fault::ConcurrentWrite(json!({"spec": {"replicas": 7}})),
    );
    let kube = api.connect(api.settings()).await;
    let params = json!({"namespace": "shop", "kind": "deployment", "name": "web", "by": 1, "max_replicas": 10});
    let (r, changes) = act(&kube, "scale_up", params, false).await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("HTTP 409"), "{e}");
    assert!(e.contains("changed since reactor read it"), "{e}");
    assert_eq!(
        replicas(&api.get(&deployments(), "shop", "web").await),
        7,
        "not overwritten with 3"
    );
    assert_eq!(changes.len(), 1);
    assert!(changes[0].result.contains("409"), "{:?}", changes[0]);
}

#[tokio::test]
async fn scale_up_raises_the_hpa_minimum_instead_of_fighting_it() {
    let api = FakeApi::start(vec![
        deployment("shop", "web", 3),
        hpa("shop", "web", "web", 2, 6),
    ])
    .await;
    let kube = api.connect(api.settings()).await;
    let params = json!({"namespace": "shop", "kind": "deployment", "name": "web", "by": 5, "max_replicas": 20});
    let (r, changes) = act(&kube, "scale_up", params.clone(), false).await;
    let out = r.expect("hpa raised");
    assert_eq!(out["hpa"], "web");
    assert_eq!(
        out["min_replicas_after"], 6,
        "bounded by the HPA's maxReplicas"
    );
    let h = api
        .get(
            &ApiResource::erase::<HorizontalPodAutoscaler>(&()),
            "shop",
            "web",
        )
        .await
        .unwrap();
    assert_eq!(h["spec"]["minReplicas"], 6);
    assert_eq!(
        replicas(&api.get(&deployments(), "shop", "web").await),
        3,
        "the HPA scales it, not reactor"
    );
    assert_eq!(
        changes[0].object,
        "horizontalpodautoscalers.autoscaling/web"
    );
    assert_eq!(
        changes[0].detail["minReplicas"],
        json!({"before": 2, "after": 6})
    );

    let (r, _) = act(&kube, "scale_up", params, false).await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("minReplicas is already 6"), "{e}");
}

#[tokio::test]
async fn dry_run_uses_the_server_side_dry_run_and_changes_nothing() {
    let api = FakeApi::start(vec![
        pod("shop", "web-1", Some(("ReplicaSet", "web-5d9"))),
        deployment("shop", "web", 2),
    ])
    .await;
    let kube = api.connect(api.settings()).await;
    let (r, changes) = act(
        &kube,
        "restart_pod",
        json!({"namespace": "shop", "pod": "web-1"}),
        true,
    )
    .await;
    assert_eq!(r.unwrap()["deleted"], false);
    assert!(changes[0].dry_run && changes[0].result == "ok");
    let params = json!({"namespace": "shop", "kind": "deployment", "name": "web", "by": 3, "max_replicas": 10});
    let (r, changes) = act(&kube, "scale_up", params, true).await;
    assert_eq!(r.unwrap()["replicas_after"], 5, "what would have changed");
    assert_eq!(
        changes[0].detail,
        json!({"replicas": {"before": 2, "after": 5}})
    );
    assert!(changes[0].dry_run);
    let params = json!({"namespace": "shop", "kind": "deployment", "name": "web"});
    let (r, _) = act(&kube, "rollout_restart", params, true).await;
    r.unwrap();

    assert!(
        api.get(&pods(), "shop", "web-1").await.is_some(),
        "pod kept"
    );
    let d = api.get(&deployments(), "shop", "web").await;
    assert_eq!(replicas(&d), 2, "replicas kept");
    assert!(d.unwrap()["spec"]["template"]["metadata"]["annotations"].is_null());
    let mutations = api.mutations();
    assert_eq!(mutations.len(), 3, "{mutations:?}");
    assert!(
        mutations.iter().all(|m| m.contains("dryRun=All")),
        "{mutations:?}"
    );
}

#[tokio::test]
async fn a_denied_namespace_is_refused_before_any_call() {
    let api = FakeApi::start(vec![pod(
        "kube-system",
        "coredns-1",
        Some(("ReplicaSet", "coredns")),
    )])
    .await;
    let kube = api.connect(api.settings()).await;
    let (r, changes) = act(
        &kube,
        "restart_pod",
        json!({"namespace": "kube-system", "pod": "coredns-1"}),
        false,
    )
    .await;
    assert_eq!(
        r.unwrap_err().to_string(),
        "namespace \"kube-system\" is not allowed (kubernetes.namespaces)"
    );
    assert!(changes.is_empty());
    assert!(api.requests().is_empty(), "{:?}", api.requests());

    let mut only_shop = api.settings();
    only_shop.namespaces.allow = vec!["shop".into()];
    let kube = api.connect(only_shop).await;
    let params = json!({"namespace": "billing", "kind": "deployment", "name": "x", "by": 1, "max_replicas": 3});
    let (r, _) = act(&kube, "scale_up", params, false).await;
    assert!(matches!(r, Err(KubeError::NamespaceDenied(ns)) if ns == "billing"));
}

#[tokio::test]
async fn api_errors_and_timeouts_fail_the_action_with_the_reason() {
    let api = FakeApi::start(vec![
        pod("shop", "web-1", Some(("ReplicaSet", "web-5d9"))),
        deployment("shop", "slow", 1),
    ])
    .await;
    let mut settings = api.settings();
    settings.request_timeout = Duration::from_millis(500);
    let kube = api.connect(settings).await;

    let (r, _) = act(
        &kube,
        "restart_pod",
        json!({"namespace": "shop", "pod": "gone"}),
        false,
    )
    .await;
    let e = r.unwrap_err().to_string();
    assert!(
        e.starts_with("get pods/gone:") && e.contains("HTTP 404"),
        "{e}"
    );

    api.fail("DELETE", "/pods/web-1", Fault::Status(403));
    let (r, changes) = act(
        &kube,
        "restart_pod",
        json!({"namespace": "shop", "pod": "web-1"}),
        false,
    )
    .await;
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("delete pods/web-1") && e.contains("HTTP 403"),
        "{e}"
    );
    assert!(
        changes[0].result.contains("403"),
        "the failed mutation is recorded"
    );

    api.fail("PATCH", "/deployments/slow", Fault::Hang);
    let params = json!({"namespace": "shop", "kind": "deployment", "name": "slow"});
    let (r, changes) = act(&kube, "rollout_restart", params, false).await;
    assert!(matches!(r, Err(KubeError::Timeout { .. })), "{r:?}");
    assert!(
        changes[0].result.contains("no answer within 500ms"),
        "{changes:?}"
    );
}

#[tokio::test]
async fn disk_cleanup_runs_a_pinned_job_waits_for_it_and_deletes_it() {
    let api = FakeApi::start(vec![]).await;
    let mut settings = api.settings();
    settings.disk_cleanup.allowed_host_paths = vec!["/var/log".into()];
    settings.disk_cleanup.poll_interval = Duration::from_millis(100);
    let kube = api.connect(settings).await;
    let params =
        json!({"node": "node-a", "path": "/var/log/app", "glob": "*.gz", "older_than": "7d"});

    let cleanup = act(&kube, "disk_cleanup", params.clone(), false);
    let controller = api.complete_next_job(
        "reactor",
        json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}),
    );
    let ((r, changes), job) = tokio::join!(cleanup, controller);
    let out = r.expect("cleanup succeeded");
    assert_eq!(out["job"], job);
    assert_eq!(out["succeeded"], true);
    let verbs: Vec<_> = changes.iter().map(|c| c.verb.as_str()).collect();
    assert_eq!(verbs, ["create", "delete"]);
    assert_eq!(changes[0].detail["node"], "node-a");
    assert_eq!(changes[0].detail["command"][1], "/host/var/log/app");
    let jobs = ApiResource::erase::<k8s_openapi::api::batch::v1::Job>(&());
    assert!(
        api.get(&jobs, "reactor", &job).await.is_none(),
        "job deleted"
    );

    // A failed Job fails the action, and is deleted all the same.
    let cleanup = act(&kube, "disk_cleanup", params.clone(), false);
    let controller = api.complete_next_job(
        "reactor",
        json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]}),
    );
    let ((r, changes), job) = tokio::join!(cleanup, controller);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("BackoffLimitExceeded"), "{e}");
    assert_eq!(changes.len(), 2);
    assert!(api.get(&jobs, "reactor", &job).await.is_none());

    let outside = json!({"node": "node-a", "path": "/etc", "glob": "*", "older_than": "1d"});
    let (r, _) = act(&kube, "disk_cleanup", outside, false).await;
    assert!(r
        .unwrap_err()
        .to_string()
        .contains("not under an allowed host path"));
}

#[tokio::test]
async fn scripts_inspect_then_act_through_k8s_functions() {
    use reactor::executor::{sandbox, Attempt, Executor};
    let api = FakeApi::start(vec![
        pod("shop", "web-1", Some(("ReplicaSet", "web-5d9"))),
        deployment("shop", "web", 2),
    ])
    .await;
    let kube = api.connect(api.settings()).await;
    let engine = sandbox::build_engine(&Default::default(), vec![], Some(kube.clone()));
    let ex = Executor::new(std::sync::Arc::new(engine), false, Some(kube));
    let mut alert = reactor::domain::decode_webhook(crate::helpers::FIRING.as_bytes())
        .unwrap()
        .alerts
        .remove(0);
    alert.labels.insert("namespace".into(), "shop".into());
    alert.labels.insert("pod".into(), "web-1".into());
    let script = |src: &str| {
        let action = reactor::playbook::StepAction::Rhai {
            ast: std::sync::Arc::new(ex.engine().compile(src).unwrap()),
            source: "test".into(),
            code: src.into(),
            at: std::sync::Arc::new(reactor::playbook::Origin {
                file: "test.rhai".into(),
                line: 0,
            }),
        };
        let (ex, alert) = (ex.clone(), alert.clone());
        async move {
            ex.run(Attempt {
                action: &action,
                alert: &alert,
                params: Default::default(),
                timeout: Duration::from_secs(10),
                dry_run: None,
                cancel: None,
                args: Vec::new(),
            })
            .await
        }
    };
    let r = script(
        r#"
        let p = k8s::get("pod", alert.labels.namespace, alert.labels.pod);
        log("owner " + p.metadata.ownerReferences[0].name);
        k8s::restart_pod(p.metadata.namespace, p.metadata.name);
        let s = k8s::scale_up("shop", "deployment", "web", #{ by: 1, max_replicas: 3 });
        s.replicas_after
    "#,
    )
    .await;
    assert_eq!(r.result, Ok(json!(3)));
    assert_eq!(r.logs, vec!["owner web-5d9".to_owned()]);
    let objects: Vec<_> = r.changes.iter().map(|c| c.object.as_str()).collect();
    assert_eq!(objects, ["pods/web-1", "deployments.apps/web"]);
    assert!(api.get(&pods(), "shop", "web-1").await.is_none());

    let r = script(r#"k8s::restart_pod("kube-system", "coredns-1")"#).await;
    let e = r.result.unwrap_err();
    assert!(
        e.to_string()
            .contains("k8s::restart_pod: namespace \"kube-system\" is not allowed"),
        "{e}"
    );
    assert_eq!(
        (e.metric_label(), e.is_retryable()),
        ("refused", false),
        "a script that lets a helper's refusal through fails with the helper's class"
    );
}

const TOKEN: &str = "kube-e2e-token";

const PLAYBOOKS: &str = r#"
name: crashloop-restart
match:
  alertname: KubePodCrashLooping
steps:
  - name: restart
    kubernetes: restart_pod
    retries: 2
    retry_delay: 0s
    params:
      namespace: "{{ labels.namespace }}"
      pod: "{{ labels.pod }}"
---
name: saturation-scale-up
match:
  alertname: WebSaturated
steps:
  - name: scale
    kubernetes: scale_up
    params:
      namespace: "{{ labels.namespace }}"
      kind: deployment
      name: "{{ labels.deployment }}"
      by: 3
      max_replicas: 6
---
name: stuck-rollout-restart
match:
  alertname: KubeDeploymentStuck
steps:
  - name: rollout-restart
    kubernetes: rollout_restart
    timeout: 2s
    params:
      namespace: "{{ labels.namespace }}"
      kind: Deployment
      name: "{{ labels.deployment }}"
"#;

fn alert(name: &str, fp: &str, labels: Value) -> Value {
    let mut p = payload(&[(name, fp)]);
    for (k, v) in labels.as_object().unwrap() {
        p["alerts"][0]["labels"][k] = v.clone();
    }
    p
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_restarts_pods_scales_up_and_pages_when_the_api_fails() {
    let api = FakeApi::start(vec![
        pod("shop", "web-1", Some(("ReplicaSet", "web-5d9"))),
        pod("shop", "web-2", Some(("ReplicaSet", "web-5d9"))),
        pod("shop", "web-3", Some(("ReplicaSet", "web-5d9"))),
        deployment("shop", "web", 4),
        deployment("shop", "stuck", 1),
    ])
    .await;
    api.fail("DELETE", "/pods/web-2", Fault::Status(403));
    api.fail("DELETE", "/pods/web-3", Fault::Status(500));
    api.fail("PATCH", "/deployments/stuck", Fault::Hang);
    let alertmanager = Capture::start().await;
    let dir = PlaybookDir::new(&[("playbooks/k8s.yaml", PLAYBOOKS)]);
    let port = free_port();
    let config = dir.binary_config(
        port,
        TOKEN,
        &format!(
            "alertmanager:\n  url: {}\n  poll_interval: 0s\nkubernetes:\n  kubeconfig: {}\n",
            alertmanager.url(),
            api.kubeconfig().display(),
        ),
    );
    let mut reactor = spawn_binary(&["--config", config.to_str().unwrap(), "serve"], dir.path());
    wait_healthy(port).await;
    let http = client();
    for (name, fp, labels) in [
        (
            "KubePodCrashLooping",
            "c1",
            json!({"namespace": "shop", "pod": "web-1"}),
        ),
        (
            "WebSaturated",
            "s1",
            json!({"namespace": "shop", "deployment": "web"}),
        ),
        (
            "KubePodCrashLooping",
            "c2",
            json!({"namespace": "shop", "pod": "web-2"}),
        ),
        (
            "KubePodCrashLooping",
            "c3",
            json!({"namespace": "shop", "pod": "ghost"}),
        ),
        (
            "KubeDeploymentStuck",
            "t1",
            json!({"namespace": "shop", "deployment": "stuck"}),
        ),
        (
            "KubePodCrashLooping",
            "c4",
            json!({"namespace": "shop", "pod": "web-3"}),
        ),
    ] {
        let body = alert(name, fp, labels);
        let r = http
            .post(format!("http://127.0.0.1:{port}/webhook/alertmanager"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let url = format!("http://127.0.0.1:{port}/api/v1/runs");
    let runs = wait_for(Duration::from_secs(30), || async {
        let runs = get_runs(&http, &url, Some(TOKEN)).await;
        (runs.len() == 6
            && runs
                .iter()
                .all(|r| r["outcome"] != "running" && r["outcome"] != "pending"))
        .then_some(runs)
    })
    .await
    .expect("six runs finish");
    let by_fp = |fp: &str| {
        runs.iter()
            .find(|r| r["alert"]["fingerprint"] == fp)
            .unwrap_or_else(|| panic!("run for {fp} in {runs:?}"))
            .clone()
    };

    let restart = by_fp("c1");
    assert_eq!(restart["outcome"], "succeeded", "{restart}");
    assert!(
        api.get(&pods(), "shop", "web-1").await.is_none(),
        "the crash-looping pod is gone"
    );
    let change = &restart["steps"][0]["changes"][0];
    assert_eq!(
        (
            change["verb"].as_str(),
            change["object"].as_str(),
            change["result"].as_str()
        ),
        (Some("delete"), Some("pods/web-1"), Some("ok")),
        "{restart}"
    );

    let scale = by_fp("s1");
    assert_eq!(scale["outcome"], "succeeded", "{scale}");
    assert_eq!(
        replicas(&api.get(&deployments(), "shop", "web").await),
        6,
        "4 + 3, bounded at 6"
    );
    assert_eq!(
        scale["steps"][0]["changes"][0]["detail"],
        json!({"replicas": {"before": 4, "after": 6}})
    );

    let refused = by_fp("c2");
    assert_eq!(refused["outcome"], "failed", "{refused}");
    let reason = refused["reason"].as_str().unwrap();
    assert!(
        reason.contains("delete pods/web-2") && reason.contains("HTTP 403"),
        "{reason}"
    );
    assert!(api.get(&pods(), "shop", "web-2").await.is_some());
    let missing = by_fp("c3");
    assert_eq!(missing["outcome"], "failed", "{missing}");
    let reason = missing["reason"].as_str().unwrap();
    assert!(
        reason.contains("get pods/ghost") && reason.contains("HTTP 404"),
        "{reason}"
    );
    // 403 and 404 would recur: one attempt each, although the step has two retries. A 5xx may
    // pass (a 500 here; kube-rs itself retries 503 until the timeout): the step is tried three times.
    let attempts = |run: &Value| -> Vec<(u64, String)> {
        run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let class = s["errorClass"].as_str().unwrap_or("-").to_owned();
                (s["attempt"].as_u64().unwrap(), class)
            })
            .collect()
    };
    assert_eq!(attempts(&refused), [(1, "rejected".to_owned())]);
    assert_eq!(attempts(&missing), [(1, "rejected".to_owned())]);
    assert!(
        reason.contains("failed after 1 attempt(s) (not retried: rejected errors are final)"),
        "{reason}"
    );
    let unavailable = by_fp("c4");
    assert_eq!(unavailable["outcome"], "failed", "{unavailable}");
    let server_error = |n| (n, "server_error".to_owned());
    assert_eq!(
        attempts(&unavailable),
        [server_error(1), server_error(2), server_error(3)]
    );
    let metrics = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"reactor_step_failures_total{playbook="crashloop-restart",reason="rejected"} 2"#,
        r#"reactor_step_failures_total{playbook="crashloop-restart",reason="server_error"} 3"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    let hung = by_fp("t1");
    assert_eq!(hung["outcome"], "failed", "{hung}");
    let reason = hung["reason"].as_str().unwrap();
    assert!(
        reason.contains("patch deployments.apps/stuck: no answer within"),
        "{reason}"
    );
    let change = &hung["steps"][0]["changes"][0];
    assert!(
        change["result"].as_str().unwrap().contains("no answer"),
        "{hung}"
    );

    let pages = wait_for(Duration::from_secs(20), || async {
        let pages = alertmanager.posted_alerts("RemediationFailed");
        (pages.len() >= 4).then_some(pages)
    })
    .await
    .expect("each failed run pages");
    let mut paged: Vec<_> = pages
        .iter()
        .map(|p| {
            p["labels"]["original_alertname"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    paged.sort();
    assert_eq!(
        paged,
        [
            "KubeDeploymentStuck",
            "KubePodCrashLooping",
            "KubePodCrashLooping",
            "KubePodCrashLooping"
        ],
        "{pages:?}"
    );
    reactor.terminate();
}

/// (API group, resource, verb) of a request to the fake API, as RBAC names it.
fn rbac_verb(request: &str) -> (String, String, String) {
    let (method, rest) = request.split_once(' ').unwrap();
    let path = rest.split(['?', ' ']).next().unwrap();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, after) = match parts[0] {
        "api" => ("", &parts[2..]),
        _ => (parts[1], &parts[3..]),
    };
    let after = if after.first() == Some(&"namespaces") {
        &after[2..]
    } else {
        after
    };
    let named = after.len() > 1;
    let verb = match (method, named) {
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("DELETE", _) => "delete",
        ("PATCH", _) => "patch",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        other => panic!("unexpected {other:?}"),
    };
    (group.to_owned(), after[0].to_owned(), verb.to_owned())
}

#[tokio::test]
async fn the_shipped_rbac_grants_exactly_the_verbs_the_actions_use() {
    use std::collections::BTreeSet;
    let api = FakeApi::start(vec![
        pod("shop", "web-1", Some(("ReplicaSet", "web-5d9"))),
        deployment("shop", "web", 2),
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db", "namespace": "shop"},
               "spec": {"replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                        "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{"name": "db", "image": "db:1"}]}}}}),
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent", "namespace": "shop"},
               "spec": {"selector": {"matchLabels": {"app": "agent"}},
                        "template": {"metadata": {"labels": {"app": "agent"}}, "spec": {"containers": [{"name": "a", "image": "a:1"}]}}}}),
        {
            let mut h = hpa("shop", "db", "db", 1, 5);
            h["spec"]["scaleTargetRef"]["kind"] = "StatefulSet".into();
            h
        },
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}),
    ])
    .await;
    let mut settings = api.settings();
    settings.disk_cleanup.allowed_host_paths = vec!["/var/log".into()];
    settings.disk_cleanup.poll_interval = Duration::from_millis(50);
    let kube = api.connect(settings).await;
    let ok = |r: (Result<Value, KubeError>, Vec<Change>)| r.0.expect("action works");
    ok(act(
        &kube,
        "restart_pod",
        json!({"namespace": "shop", "pod": "web-1"}),
        false,
    )
    .await);
    for (kind, name) in [
        ("deployment", "web"),
        ("statefulset", "db"),
        ("daemonset", "agent"),
    ] {
        let p = json!({"namespace": "shop", "kind": kind, "name": name});
        ok(act(&kube, "rollout_restart", p, false).await);
    }
    for (kind, name) in [("deployment", "web"), ("statefulset", "db")] {
        let p =
            json!({"namespace": "shop", "kind": kind, "name": name, "by": 1, "max_replicas": 5});
        ok(act(&kube, "scale_up", p, false).await);
    }
    let cleanup = act(
        &kube,
        "disk_cleanup",
        json!({"node": "node-a", "path": "/var/log", "glob": "*.gz", "older_than": "1d"}),
        false,
    );
    let controller = api.complete_next_job("reactor", json!({"succeeded": 1}));
    let ((r, _), job) = tokio::join!(cleanup, controller);
    r.expect("cleanup");
    let deadline = Instant::now() + Duration::from_secs(10);
    for (kind, ns, name) in [
        ("pod", "reactor", "x"),
        ("node", "", "node-a"),
        ("job", "reactor", job.as_str()),
        ("hpa", "shop", "db"),
        ("deployment", "shop", "web"),
        ("statefulset", "shop", "db"),
        ("daemonset", "shop", "agent"),
    ] {
        let _ = kube.get(kind, ns, name, deadline).await;
    }
    let used: BTreeSet<_> = api.requests().iter().map(|r| rbac_verb(r)).collect();

    let text = std::fs::read_to_string(crate::helpers::repo().join("deploy/kubernetes/rbac.yaml"))
        .unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    let mut granted = BTreeSet::new();
    // The Leases of two replicas are checked by the ha tests, which use them.
    for doc in docs.iter().filter(|d| {
        (d["kind"] == "ClusterRole" || d["kind"] == "Role")
            && d["metadata"]["name"] != "reactor-leases"
    }) {
        for rule in doc["rules"].as_array().unwrap() {
            for g in rule["apiGroups"].as_array().unwrap() {
                for r in rule["resources"].as_array().unwrap() {
                    for v in rule["verbs"].as_array().unwrap() {
                        let s = |v: &Value| v.as_str().unwrap().to_owned();
                        granted.insert((s(g), s(r), s(v)));
                    }
                }
            }
        }
    }
    assert_eq!(used, granted, "used (left) vs granted by rbac.yaml (right)");
}

#[tokio::test]
async fn without_a_cluster_reactor_starts_and_kubernetes_steps_fail_and_page() {
    let am = Capture::start().await;
    let app = crate::helpers::TestApp::spawn(|s| {
        s.alertmanager.url = Some(am.url());
    })
    .await;
    let body = alert(
        "KubePodCrashLooping",
        "nk1",
        json!({"namespace": "shop", "pod": "web-1"}),
    );
    assert!(app.post_webhook(&body).await.status().is_success());
    let runs = app
        .wait_for_runs(
            "alertname=KubePodCrashLooping",
            Duration::from_secs(20),
            |r| r.first().is_some_and(|r| r["outcome"] == "failed"),
        )
        .await;
    assert_eq!(
        runs[0]["playbook"], "crashloop-restart-pod",
        "the shipped playbook"
    );
    let reason = runs[0]["reason"].as_str().unwrap();
    assert!(reason.contains("kubernetes is not configured"), "{reason}");
    wait_for(Duration::from_secs(20), || async {
        (!am.posted_alerts("RemediationFailed").is_empty()).then_some(())
    })
    .await
    .expect("the failed run pages");
    app.stop().await;
}

#[tokio::test]
async fn a_broken_kubeconfig_is_a_startup_error_naming_the_file() {
    let settings = reactor::config::KubernetesSettings {
        kubeconfig: vec!["/nonexistent/kubeconfig".into()],
        ..Default::default()
    };
    let e = Kubernetes::connect(&settings).await.err().expect("refused");
    assert!(
        e.to_string()
            .starts_with("kubeconfig /nonexistent/kubeconfig:"),
        "{e}"
    );
    assert!(Kubernetes::connect(&Default::default())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn a_label_cannot_turn_off_dry_run_or_leave_its_namespace() {
    let api = FakeApi::start(vec![
        deployment("shop", "web", 2),
        pod("kube-system", "coredns-1", Some(("ReplicaSet", "coredns"))),
    ])
    .await;
    let kube = api.connect(api.settings()).await;
    let hostile = [
        (
            "scale_up",
            json!({"namespace": "shop", "kind": "Deployment", "name": "web#anchor", "by": 1, "max_replicas": 5}),
        ),
        (
            "scale_up",
            json!({"namespace": "shop", "kind": "Deployment", "name": "web?dryRun=&x=", "by": 1, "max_replicas": 5}),
        ),
        (
            "rollout_restart",
            json!({"namespace": "shop", "kind": "Deployment", "name": "web%3Fpretty"}),
        ),
        (
            "restart_pod",
            json!({"namespace": "shop/./../kube-system", "pod": "coredns-1"}),
        ),
        (
            "restart_pod",
            json!({"namespace": "shop", "pod": "../../kube-system/pods/coredns-1"}),
        ),
        (
            "restart_pod",
            json!({"namespace": "..", "pod": "coredns-1"}),
        ),
    ];
    for (action, params) in hostile {
        let (r, changes) = act(&kube, action, params.clone(), true).await;
        let e = r.expect_err("refused");
        assert!(
            matches!(e, KubeError::InvalidName(_)),
            "{action} {params}: {e}"
        );
        assert!(e.to_string().contains("nothing was sent"), "{e}");
        assert!(changes.is_empty(), "{changes:?}");
    }
    assert!(
        api.requests().is_empty(),
        "no request reached the API server: {:?}",
        api.requests()
    );
    let d = api.get(&deployments(), "shop", "web").await;
    assert_eq!(replicas(&d), 2);
    assert!(api.get(&pods(), "kube-system", "coredns-1").await.is_some());
}
