//! Pages that must reach a human: a page for an alert whose label names Alertmanager refuses is
//! still accepted by the real Alertmanager, and a page Alertmanager refuses anyway makes reactor
//! report itself unhealthy.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::helpers::{alertmanager_config, client, serve_local, wait_for, Stack, TestApp};

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
    let metrics = client()
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("reactor_escalations_total{result=\"rejected\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("reactor_self_check_failing{check=\"escalation_rejected\"} 1"));
    app.stop().await;
    stop.cancel();
}
