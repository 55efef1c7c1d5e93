//! End to end with the real Alertmanager (Debian's prometheus-alertmanager): an alert posted to
//! Alertmanager's v2 API reaches reactor through a webhook route with bearer authorization; a
//! failed remediation comes back as `RemediationFailed`, routed to the humans' receiver.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{alertmanager_config, Stack};

const TOKEN: &str = "e2e-token";

async fn stack() -> Stack {
    Stack::start(
        |s| s.auth.bearer_token = Some(TOKEN.into()),
        |reactor, humans| alertmanager_config(reactor, TOKEN, humans),
    )
    .await
}

fn alert(name: &str) -> Value {
    json!([{
        "labels": {"alertname": name, "instance": "e2e-host", "severity": "warning", "team": "sre"},
        "annotations": {"summary": "posted by the end-to-end test"},
        "generatorURL": "http://127.0.0.1/e2e"
    }])
}

#[tokio::test]
async fn a_failed_remediation_pages_the_humans_through_alertmanager() {
    let s = stack().await;
    s.am.post_alerts(&alert("ReactorSelfTestFail")).await;

    let pages = s
        .humans
        .wait_for_notification("RemediationFailed", Duration::from_secs(45))
        .await;
    let page = &pages[0]["alerts"][0];
    assert_eq!(page["status"], "firing");
    assert_eq!(page["labels"]["original_alertname"], "ReactorSelfTestFail");
    assert_eq!(page["labels"]["severity"], "critical");
    assert_eq!(
        page["labels"]["team"], "sre",
        "routing labels of the original alert are kept"
    );
    assert_eq!(page["annotations"]["failed_step"], "always-fails");

    let in_am = s.am.alerts("alertname=\"RemediationFailed\"").await;
    assert_eq!(in_am.len(), 1, "{in_am:#?}");
    assert_eq!(in_am[0]["labels"]["playbook"], "reactor-selftest-fail");

    let runs = s.reactor.runs("alertname=ReactorSelfTestFail").await;
    assert_eq!(
        runs.len(),
        1,
        "Alertmanager delivered the alert once and one run happened"
    );
    assert_eq!(runs[0]["outcome"], "failed");
    assert_eq!(runs[0]["escalation"]["status"], "delivered");
    assert_eq!(page["annotations"]["run_id"], runs[0]["id"]);
    s.reactor.stop().await;
}

#[tokio::test]
async fn a_successful_remediation_pages_nobody() {
    let s = stack().await;
    s.am.post_alerts(&alert("ReactorSelfTestOk")).await;
    let runs = s
        .reactor
        .wait_for_runs(
            "alertname=ReactorSelfTestOk",
            Duration::from_secs(30),
            |r| r.len() == 1 && r[0]["outcome"] == "succeeded",
        )
        .await;
    assert_eq!(runs[0]["playbook"], "reactor-selftest-ok");
    // Escalation happens inside the run, so nothing can still be on its way to Alertmanager;
    // wait out Alertmanager's group_wait and group_interval to be sure nothing was routed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(s.humans.received().is_empty(), "{:#?}", s.humans.received());
    assert!(s
        .am
        .alerts("alertname=\"RemediationFailed\"")
        .await
        .is_empty());
    s.reactor.stop().await;
}
