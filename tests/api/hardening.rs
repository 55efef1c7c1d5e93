//! What a bug, a reused number or a hostile payload can do: a panic fails its run instead of the
//! runs' thread, a page is never mistaken for one already sent, a payload is refused naming
//! what is wrong.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use reactor::clock::Clock;
use reactor::domain::Fingerprint;
use reactor::escalation::outbox::{EntryState, Outbox};
use reactor::history::{RunId, Store};
use serde_json::json;

use crate::helpers::{payload, wait_for, Capture, TestApp};

/// The wall clock, which panics once when read on the runs' thread after it is armed: a
/// stand-in for any bug in the code that processes an alert.
#[derive(Default)]
struct PanicOnce {
    armed: AtomicBool,
}

impl Clock for PanicOnce {
    fn now(&self) -> Timestamp {
        let on_runs_thread = std::thread::current().name() == Some("reactor-runs");
        if on_runs_thread && self.armed.swap(false, Ordering::SeqCst) {
            panic!("the clock fell off the wall");
        }
        Timestamp::now()
    }
}

#[tokio::test]
async fn a_panic_while_processing_an_alert_fails_its_run_and_pages_instead_of_losing_it() {
    let pages = Capture::start().await;
    let clock = Arc::new(PanicOnce::default());
    let app = TestApp::spawn_with_clock(
        |s| s.alertmanager.url = Some(pages.url()),
        Arc::clone(&clock) as Arc<dyn Clock>,
    )
    .await;
    clock.armed.store(true, Ordering::SeqCst);
    let r = app
        .post_webhook(&payload(&[("ReactorSelfTestOk", "boom01")]))
        .await;
    assert_eq!(r.status(), 202);
    let runs = app
        .wait_for_runs("limit=10", Duration::from_secs(10), |r| {
            r.len() == 1 && r[0]["outcome"] == "failed"
        })
        .await;
    let reason = runs[0]["reason"].as_str().unwrap();
    assert!(reason.contains("the clock fell off the wall"), "{reason}");
    let paged = wait_for(Duration::from_secs(10), || async {
        Some(pages.posted_alerts("RemediationFailed")).filter(|p| !p.is_empty())
    })
    .await
    .expect("the failed run is paged");
    assert_eq!(
        paged[0]["labels"]["original_alertname"],
        "ReactorSelfTestOk"
    );

    // The runs' thread lives on: the next alert runs as usual.
    app.post_webhook(&payload(&[("ReactorSelfTestOk", "fine02")]))
        .await;
    app.wait_for_runs("limit=10", Duration::from_secs(10), |r| {
        r.iter()
            .any(|x| x["alert"]["fingerprint"] == "fine02" && x["outcome"] == "succeeded")
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_page_of_another_alert_under_an_old_run_id_is_queued_not_taken_as_sent() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let outbox = Outbox::open(&store).unwrap();
    let run = RunId { seq: 1, index: 0 };
    let page = |name: &str| reactor::escalation::PostableAlert {
        labels: [("alertname".to_owned(), name.to_owned())].into(),
        annotations: Default::default(),
        starts_at: Timestamp::now(),
        ends_at: Timestamp::now(),
        generator_url: String::new(),
    };
    let fp = |s: &str| Fingerprint::parse(s).unwrap();
    let now = Timestamp::now();
    assert!(outbox
        .enqueue(run, page("Old"), fp("aaaa"), now)
        .await
        .unwrap());
    assert!(
        !outbox
            .enqueue(run, page("Old"), fp("aaaa"), now)
            .await
            .unwrap(),
        "the same alert's page again (a re-run after a crash) is already queued"
    );
    assert!(
        outbox
            .enqueue(run, page("New"), fp("bbbb"), now)
            .await
            .unwrap(),
        "another alert's page under the same run id is queued"
    );
    let entry = outbox.get(run).unwrap().unwrap();
    assert_eq!(entry.state, EntryState::Pending);
    assert_eq!(entry.fingerprint, Some(fp("bbbb")));
    assert_eq!(entry.page.labels["alertname"], "New");
}

#[tokio::test]
async fn hostile_payloads_are_refused_naming_the_field() {
    let app = TestApp::spawn(|s| s.limits.max_label_bytes = 1024).await;
    let send = |body: String| {
        let app = &app;
        async move {
            let r = app
                .client
                .post(app.url("/webhook/alertmanager"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let alert = |labels: &str, extra: &str| {
        format!(
            r#"{{"version":"4","alerts":[{{"status":"firing","labels":{labels},"startsAt":"2026-11-20T23:35:13Z","fingerprint":"abc1"{extra}}}]}}"#
        )
    };
    let (status, body) = send(alert(r#"{"alertname":"A","pod":"x","pod":"y"}"#, "")).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("\"pod\" appears twice"),
        "{body}"
    );
    let long = "n".repeat(2000);
    let (status, body) = send(alert(
        r#"{"alertname":"A"}"#,
        &format!(r#","annotations":{{"{long}":"v"}}"#),
    ))
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = send(alert(
        r#"{"alertname":"A"}"#,
        &format!(r#","generatorURL":"http://x/{long}""#),
    ))
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("the limit is 1024"),
        "{body}"
    );
    // The two alerts over the size limits are not lost: each is recorded (and would be paged,
    // had an Alertmanager been configured), and nothing remediates them.
    let runs = app
        .wait_for_runs("limit=10", Duration::from_secs(5), |r| r.len() == 2)
        .await;
    for run in &runs {
        assert_eq!(run["outcome"], "failed", "{run}");
        let reason = run["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("reactor refused this alert (alerts[0]: "),
            "{reason}"
        );
        assert!(run["steps"].as_array().unwrap().is_empty());
    }
    app.stop().await;
}

#[tokio::test]
async fn a_grouped_payload_with_one_oversized_alert_runs_the_others_and_pages_that_one() {
    let pages = Capture::start().await;
    let app = TestApp::spawn(|s| {
        s.alertmanager.url = Some(pages.url());
        s.limits.max_label_bytes = 1024;
    })
    .await;
    let mut body = payload(&[
        ("ReactorSelfTestOk", "ok01"),
        ("ReactorSelfTestOk", "big2"),
        ("ReactorSelfTestOk", "ok03"),
    ]);
    body["alerts"][1]["labels"]["team"] = json!("db");
    body["alerts"][1]["labels"]["description"] = json!("x".repeat(5000));
    let r = app.post_webhook(&body).await;
    assert_eq!(r.status(), 400);
    let answer: serde_json::Value = r.json().await.unwrap();
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.starts_with("alerts[1]: label \"description\" of 5000 bytes")
            && error.contains("the limit is 1024")
            && error.ends_with(
                "1 alert(s) refused and recorded (paged when firing), the other 2 accepted"
            ),
        "{error}"
    );
    assert_eq!(answer["accepted"], 2);

    let runs = app
        .wait_for_runs(
            "alertname=ReactorSelfTestOk",
            Duration::from_secs(10),
            |r| r.len() == 3 && r.iter().all(|r| r["outcome"] != "running"),
        )
        .await;
    let outcome = |fp: &str| {
        let run = runs
            .iter()
            .find(|r| r["alert"]["fingerprint"] == fp)
            .unwrap();
        run["outcome"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        [outcome("ok01"), outcome("big2"), outcome("ok03")],
        ["succeeded", "failed", "succeeded"]
    );
    let paged = wait_for(Duration::from_secs(10), || async {
        Some(pages.posted_alerts("RemediationFailed")).filter(|p| !p.is_empty())
    })
    .await
    .expect("the refused alert is paged");
    assert_eq!(paged.len(), 1, "{paged:#?}");
    let labels = &paged[0]["labels"];
    assert_eq!(labels["original_alertname"], "ReactorSelfTestOk");
    assert_eq!(labels["team"], "db", "routing labels survive the cut");
    assert_eq!(
        labels["description"].as_str().unwrap().len(),
        1024,
        "the long label is cut to the limit"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"reactor_webhook_rejections_total{reason="label_too_long"} 1"#),
        "{metrics}"
    );
    app.stop().await;
}
