//! Pages that must reach a human: a page for an alert whose label names Alertmanager refuses is
//! still accepted by the real Alertmanager, a page Alertmanager refuses anyway makes reactor report
//! itself unhealthy, and credentials for Alertmanager are sent on every call but never shown in a
//! run or a log line.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::helpers::{
    alertmanager_config, client, free_port, get_runs, serve_local, spawn_binary, wait_for,
    wait_healthy, PlaybookDir, Stack, TestApp,
};

const TOKEN: &str = "pages-token";

/// A webhook payload with one firing alert carrying `labels` besides its alertname.
fn alert_with_labels(alertname: &str, labels: &[(&str, &str)]) -> Value {
    let mut all = serde_json::Map::new();
    all.insert("alertname".into(), alertname.into());
    for (k, v) in labels {
        all.insert((*k).into(), (*v).into());
    }
    json!({"receiver": "reactor", "status": "firing", "version": "4", "groupKey": "{}",
    "truncatedAlerts": 0, "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
    "externalURL": "http://127.0.0.1:9093",
    "alerts": [{
        "status": "firing",
        "labels": all,
        "annotations": {"summary": "pages test"},
        "startsAt": "2026-11-20T23:35:13.24322Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "fingerprint": "0a0b0c0d0e0f1011",
    }]})
}

/// A port on 127.0.0.1 with nothing listening.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn a_page_for_an_alert_with_invalid_label_names_is_accepted_by_alertmanager() {
    let s = Stack::start(
        |s| s.auth.bearer_token = Some(TOKEN.into()),
        |reactor, humans| alertmanager_config(reactor, TOKEN, humans),
    )
    .await;
    // Alertmanager itself would refuse this alert; reactor's webhook takes it as it comes.
    let hostile = [
        ("has space", "a"),
        ("9lives", "b"),
        ("dash-ed", "c"),
        ("team", "sre"),
    ];
    let body = alert_with_labels("ReactorSelfTestFail", &hostile);
    assert_eq!(s.reactor.post_webhook(&body).await.status(), 202);

    let runs = s
        .reactor
        .wait_for_runs(
            "alertname=ReactorSelfTestFail",
            Duration::from_secs(30),
            |r| {
                r.len() == 1
                    && ["delivered", "failed"]
                        .map(Value::from)
                        .contains(&r[0]["escalation"]["status"])
            },
        )
        .await;
    assert_eq!(
        runs[0]["escalation"]["status"], "delivered",
        "Alertmanager accepted the page: {:#}",
        runs[0]["escalation"]
    );
    let pages = s.am.alerts("alertname=\"RemediationFailed\"").await;
    assert_eq!(pages.len(), 1, "{pages:#?}");
    let page = &pages[0];
    assert_eq!(page["labels"]["team"], "sre", "valid labels still route");
    assert_eq!(page["labels"]["original_alertname"], "ReactorSelfTestFail");
    let carried: Value =
        serde_json::from_str(page["annotations"]["invalid_labels"].as_str().unwrap()).unwrap();
    assert_eq!(
        carried,
        json!({"has space": "a", "9lives": "b", "dash-ed": "c"})
    );
    assert_eq!(page["annotations"]["run_id"], runs[0]["id"]);
    s.reactor.stop().await;
}

/// An Alertmanager stand-in that answers 400 to `RemediationFailed` pages, as Alertmanager does to
/// an alert it finds invalid, and records (and accepts) everything else reactor posts.
async fn refusing_alertmanager() -> (
    String,
    Arc<Mutex<Vec<Value>>>,
    tokio_util::sync::CancellationToken,
) {
    let accepted: Arc<Mutex<Vec<Value>>> = Arc::default();
    let record = accepted.clone();
    let app = Router::new().route(
        "/api/v2/alerts",
        post(move |Json(alerts): Json<Vec<Value>>| {
            let record = record.clone();
            async move {
                if alerts
                    .iter()
                    .any(|a| a["labels"]["alertname"] == "RemediationFailed")
                {
                    return (
                        StatusCode::BAD_REQUEST,
                        "invalid label set: invalid name \"has space\"",
                    );
                }
                record.lock().unwrap().extend(alerts);
                (StatusCode::OK, "")
            }
        }),
    );
    let (addr, stop) = serve_local(app).await;
    (format!("http://{addr}"), accepted, stop)
}

#[tokio::test]
async fn a_refused_page_makes_reactor_report_itself_unhealthy() {
    let (url, accepted, stop) = refusing_alertmanager().await;
    let app = TestApp::spawn(|s| {
        s.alertmanager.url = Some(url);
        s.watchdog.heartbeat_interval = Duration::from_millis(200);
    })
    .await;
    let body = alert_with_labels("ReactorSelfTestFail", &[("instance", "refused-host")]);
    assert_eq!(app.post_webhook(&body).await.status(), 202);
    let runs = app
        .wait_for_runs(
            "alertname=ReactorSelfTestFail",
            Duration::from_secs(20),
            |r| r.len() == 1 && r[0]["escalation"]["status"] == "failed",
        )
        .await;
    let run_id = runs[0]["id"].as_str().unwrap().to_owned();

    let unhealthy = wait_for(Duration::from_secs(20), || async {
        accepted
            .lock()
            .unwrap()
            .iter()
            .find(|a| {
                a["labels"]["alertname"] == "ReactorUnhealthy"
                    && a["labels"]["check"] == "escalation_rejected"
            })
            .cloned()
    })
    .await
    .expect("reactor raises ReactorUnhealthy for the refused page");
    let detail = unhealthy["annotations"]["description"].as_str().unwrap();
    assert!(detail.contains(&format!("run {run_id}")), "{detail}");
    assert!(detail.contains("400 Bad Request"), "{detail}");

    let ready = client().get(app.url("/readyz")).send().await.unwrap();
    let report: Value = ready.json().await.unwrap();
    assert_eq!(
        report["checks"]["escalation_rejected"]["ok"], false,
        "{report}"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("reactor_escalations_total{result=\"rejected\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("reactor_self_check_failing{check=\"escalation_rejected\"} 1"));
    app.stop().await;
    stop.cancel();
}

#[tokio::test]
async fn a_password_in_the_alertmanager_url_never_reaches_runs_or_logs() {
    let secret = format!(
        "pw-{}-{}",
        std::process::id(),
        jiff::Timestamp::now().as_nanosecond()
    );
    let dead = closed_port();
    let am_url = format!("http://someuser:{secret}@127.0.0.1:{dead}");
    let body = alert_with_labels("ReactorSelfTestFail", &[("instance", "leak-host")]);
    let has_error = |r: &[Value]| r.len() == 1 && r[0]["escalation"]["lastError"].is_string();

    // In process, the URL set directly in the settings.
    let app = TestApp::spawn(|s| s.alertmanager.url = Some(am_url.clone())).await;
    assert_eq!(app.post_webhook(&body).await.status(), 202);
    let runs = app
        .wait_for_runs("", Duration::from_secs(20), has_error)
        .await;
    let error = runs[0]["escalation"]["lastError"].as_str().unwrap();
    assert!(error.contains(&format!("127.0.0.1:{dead}")), "{error}");
    let all = serde_json::to_string(&runs).unwrap();
    assert!(
        !all.contains(&secret),
        "the password is in /api/v1/runs: {all}"
    );
    app.stop().await;

    // The binary, the URL from its config file: neither the runs nor its log show the password.
    let dir = PlaybookDir::new(&[(
        "playbooks/selftest.yaml",
        include_str!("../../playbooks/selftest.yaml"),
    )]);
    let port = free_port();
    let config = dir.binary_config(
        port,
        TOKEN,
        &format!("alertmanager:\n  url: {am_url}\n  retry_backoff: 50ms\n"),
    );
    let _reactor = spawn_binary(&["--config", config.to_str().unwrap(), "serve"], dir.path());
    wait_healthy(port).await;
    let r = client()
        .post(format!("http://127.0.0.1:{port}/webhook/alertmanager"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let url = format!("http://127.0.0.1:{port}/api/v1/runs");
    let runs = wait_for(Duration::from_secs(20), || async {
        let runs = get_runs(&client(), &url, Some(TOKEN)).await;
        Some(runs).filter(|r| has_error(r) && r[0]["escalation"]["attempts"].as_u64() >= Some(2))
    })
    .await
    .expect("the binary records a failed delivery");
    assert!(!serde_json::to_string(&runs).unwrap().contains(&secret));
    let log = std::fs::read_to_string(dir.path().join("reactor.log")).unwrap();
    assert!(
        log.contains("escalation not delivered yet") && log.contains(&format!("127.0.0.1:{dead}")),
        "the WARN line names the URL:\n{log}"
    );
    assert!(!log.contains(&secret), "the password is in the log:\n{log}");
}

/// An Alertmanager stand-in recording the `Authorization` header of every request.
async fn recording_alertmanager() -> (
    String,
    Arc<Mutex<Vec<Option<String>>>>,
    tokio_util::sync::CancellationToken,
) {
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let record = seen.clone();
    let app = Router::new().route(
        "/api/v2/alerts",
        post(move |headers: HeaderMap| {
            let record = record.clone();
            async move {
                let auth = headers
                    .get("authorization")
                    .map(|v| v.to_str().unwrap_or("<not text>").to_owned());
                record.lock().unwrap().push(auth);
                ""
            }
        })
        .get(|| async { "[]" }),
    );
    let (addr, stop) = serve_local(app).await;
    (format!("127.0.0.1:{}", addr.port()), seen, stop)
}

#[tokio::test]
async fn alertmanager_gets_basic_auth_from_the_url_and_from_a_password_file() {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("someuser:f1le-or-url-secret")
    );
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("am-password");
    std::fs::write(&password_file, "f1le-or-url-secret\n").unwrap();

    for from_file in [false, true] {
        let (host, seen, stop) = recording_alertmanager().await;
        let password_file = password_file.clone();
        let app = TestApp::spawn(|s| {
            s.watchdog.heartbeat_interval = Duration::from_millis(100);
            if from_file {
                s.alertmanager.url = Some(format!("http://{host}"));
                s.alertmanager.basic_auth = Some(reactor::config::ClientBasicAuth {
                    username: "someuser".into(),
                    password: None,
                    password_file: Some(password_file),
                });
            } else {
                s.alertmanager.url = Some(format!("http://someuser:f1le-or-url-secret@{host}"));
            }
        })
        .await;
        // The heartbeat is posted at once and then every interval.
        let auth = wait_for(Duration::from_secs(10), || async {
            let seen = seen.lock().unwrap();
            (seen.len() >= 2).then(|| seen.clone())
        })
        .await
        .expect("reactor posts its heartbeat");
        for a in auth {
            assert_eq!(
                a.as_deref(),
                Some(expected.as_str()),
                "from_file: {from_file}"
            );
        }
        app.stop().await;
        stop.cancel();
    }
}
