//! Notification channels against local stand-ins that check each service's request contract:
//! PagerDuty pages once and resolves with the same dedup key, Opsgenie's asynchronous requests
//! are checked, Slack's 429 and final errors are honoured, Teams gets one Adaptive Card, the
//! webhook an Alertmanager payload; a storm of failures gives a bounded number of pages; secrets
//! show nowhere.

use std::collections::BTreeMap;
use std::time::Duration;

use reactor::config::{resolve_channels, ChannelSettings, Settings};
use serde_json::{json, Value};

use crate::helpers::{payload, PlaybookDir, TestApp};
use crate::services::{Service, GENIE_KEY, PD_ROUTING_KEY};

const FAILS: &str = "name: always-fails\nmatch:\n  alertname: DiskFull\nguards:\n  max_attempts: 1000\n  circuit_breaker: {failures: 0}\nsteps:\n  - name: clean\n    inline: 'throw \"disk still full\"'\n";

/// Channels from YAML, their secrets read as the service reads them.
pub fn channels(yaml: &str) -> BTreeMap<String, ChannelSettings> {
    let mut map: BTreeMap<String, ChannelSettings> = serde_saphyr::from_str(yaml).unwrap();
    resolve_channels(&mut map, &|_| None).unwrap();
    map
}

/// A file holding `secret`, in `dir`.
pub fn secret_file(dir: &std::path::Path, name: &str, secret: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    path.display().to_string()
}

/// The app, and the directory it reads (kept until the test ends).
pub struct Setup {
    pub app: TestApp,
    pub _books: PlaybookDir,
}

/// The app with `books` (none: the failing playbook), `secrets` written as files in its directory
/// first, and the channels of `channel_yaml` (`{dir}` stands for that directory), every page
/// routed to all of them.
pub async fn start(
    books: &[(&str, &str)],
    secrets: &[(&str, &str)],
    channel_yaml: &str,
    configure: impl FnOnce(&mut Settings),
) -> Setup {
    let books = PlaybookDir::new(if books.is_empty() {
        &[("playbooks/fails.yaml", FAILS)]
    } else {
        books
    });
    for (name, secret) in secrets {
        secret_file(books.path(), name, secret);
    }
    let yaml = channel_yaml.replace("{dir}", &books.path().display().to_string());
    let chans = channels(&yaml);
    let (p, s) = (books.playbooks(), books.scripts());
    let app = TestApp::spawn(move |settings| {
        settings.playbooks_dir = p;
        settings.scripts_dir = s;
        settings.route.to = chans.keys().cloned().collect();
        settings.channels = chans;
        configure(settings);
    })
    .await;
    Setup { app, _books: books }
}

fn alert(fp: &str, status: &str) -> Value {
    let mut p = payload(&[("DiskFull", fp)]);
    p["status"] = status.into();
    p["alerts"][0]["status"] = status.into();
    if status == "resolved" {
        p["alerts"][0]["endsAt"] = "2026-11-20T23:45:13Z".into();
    }
    p
}

pub async fn wait_accepted(svc: &Service, n: usize, timeout: Duration) -> Vec<Value> {
    crate::helpers::wait_for(timeout, || async {
        let a = svc.seen.accepted();
        (a.len() >= n).then_some(a)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{n} request(s) not accepted in {timeout:?}; got {:?}; violations {:?}",
            svc.seen.accepted(),
            svc.seen.violations()
        )
    })
}

async fn manual_run(app: &TestApp, fp: &str) {
    let r = app
        .client
        .post(app.url("/api/v1/runs"))
        .json(&json!({"playbook": "always-fails", "by": "test",
                      "alert": {"labels": {"alertname": "DiskFull", "instance": "test-host", "severity": "warning", "id": fp},
                                "fingerprint": fp}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
}

#[tokio::test]
async fn a_failed_run_pages_pagerduty_once_and_its_resolution_resolves_the_same_dedup_key() {
    let pd = Service::pagerduty().await;
    let setup = start(
        &[],
        &[("pd.key", PD_ROUTING_KEY)],
        &format!(
            "pd:\n  type: pagerduty\n  url: {}\n  routing_key_file: {{dir}}/pd.key\n",
            pd.url()
        ),
        |_| {},
    )
    .await;
    let app = &setup.app;

    assert_eq!(
        app.post_webhook(&alert("a1b2c3d4e5f60001", "firing"))
            .await
            .status(),
        202
    );
    let events = wait_accepted(&pd, 1, Duration::from_secs(20)).await;
    let trigger = &events[0];
    assert_eq!(trigger["event_action"], "trigger");
    let dedup = trigger["dedup_key"].as_str().unwrap().to_owned();
    assert_eq!(trigger["payload"]["severity"], "critical");
    assert_eq!(trigger["payload"]["source"], "test-host");
    assert_eq!(trigger["payload"]["component"], "always-fails");
    assert_eq!(trigger["payload"]["class"], "DiskFull");
    assert_eq!(trigger["payload"]["custom_details"]["failed_step"], "clean");
    assert!(trigger["payload"]["custom_details"]["error"]
        .as_str()
        .unwrap()
        .contains("disk still full"));
    assert!(trigger["client_url"]
        .as_str()
        .unwrap()
        .contains("/api/v1/runs/"));

    // The same target fails again by hand: the same dedup key, so PagerDuty updates one alert.
    manual_run(app, "a1b2c3d4e5f60001").await;
    let events = wait_accepted(&pd, 2, Duration::from_secs(20)).await;
    assert_eq!(events[1]["event_action"], "trigger");
    assert_eq!(events[1]["dedup_key"], dedup.as_str());

    // The alert resolves: one resolve, with that key and nothing else.
    assert_eq!(
        app.post_webhook(&alert("a1b2c3d4e5f60001", "resolved"))
            .await
            .status(),
        202
    );
    let events = wait_accepted(&pd, 3, Duration::from_secs(20)).await;
    assert_eq!(
        events[2],
        json!({"routing_key": PD_ROUTING_KEY, "dedup_key": dedup, "event_action": "resolve", "_path": "/v2/enqueue"})
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pd.seen.accepted().len(),
        3,
        "one resolve for two pages of one key: {:?}",
        pd.seen.accepted()
    );
    assert!(
        pd.seen.violations().is_empty(),
        "{:?}",
        pd.seen.violations()
    );

    // The run shows the delivery; its JSON holds no secret.
    let runs = app
        .wait_for_runs("?playbook=always-fails", Duration::from_secs(10), |r| {
            r.iter()
                .any(|run| run["notifications"][0]["state"] == "resolved")
        })
        .await;
    let text = serde_json::to_string(&runs).unwrap();
    assert!(
        !text.contains(PD_ROUTING_KEY),
        "the routing key is in the run's JSON"
    );
    let n = &runs
        .iter()
        .find(|r| r["notifications"][0]["state"] == "resolved")
        .unwrap()["notifications"][0];
    assert_eq!(n["channel"], "pd");
    assert_eq!(n["dedupKey"], dedup.as_str());
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("reactor_notifications_total{channel=\"pd\",result=\"delivered\"} 2"),
        "{metrics}"
    );
    setup.app.stop().await;
}

#[tokio::test]
async fn pagerduty_429_and_5xx_are_retried_and_400_is_final_and_one_channel_never_waits_for_another(
) {
    let pd = Service::pagerduty().await;
    pd.seen.answer_first(&[429, 500]);
    let other = Service::pagerduty().await;
    // A third channel's server takes the connection and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let setup = start(
        &[],
        &[("pd.key", PD_ROUTING_KEY), ("bad.key", "not-the-key")],
        &format!(
            "pd:\n  type: pagerduty\n  url: {}\n  routing_key_file: {{dir}}/pd.key\nbad:\n  type: pagerduty\n  url: {}\n  routing_key_file: {{dir}}/bad.key\nsilent:\n  type: webhook\n  url: http://{}/hook\n  timeout: 5m\n",
            pd.url(),
            other.url(),
            silent.local_addr().unwrap()
        ),
        |_| {},
    )
    .await;
    let app = &setup.app;
    let posted = std::time::Instant::now();
    app.post_webhook(&alert("a1b2c3d4e5f60002", "firing")).await;
    let runs = app
        .wait_for_runs("?playbook=always-fails", Duration::from_secs(30), |r| {
            r.first().is_some_and(|run| {
                let n = run["notifications"].as_array().cloned().unwrap_or_default();
                n.iter()
                    .any(|x| x["channel"] == "pd" && x["state"] == "delivered")
                    && n.iter()
                        .any(|x| x["channel"] == "bad" && x["state"] == "failed")
            })
        })
        .await;
    let n = runs[0]["notifications"].as_array().unwrap();
    let pd_record = n.iter().find(|x| x["channel"] == "pd").unwrap();
    assert_eq!(
        pd_record["attempts"], 3,
        "429, then 500, then 202: {pd_record}"
    );
    let bad = n.iter().find(|x| x["channel"] == "bad").unwrap();
    assert_eq!(bad["attempts"], 1, "400 is final: {bad}");
    assert!(bad["lastError"].as_str().unwrap().contains("400"), "{bad}");
    assert_eq!(pd.seen.accepted().len(), 1);
    assert!(
        posted.elapsed() < Duration::from_secs(30),
        "the silent channel held nobody back: {:?}",
        posted.elapsed()
    );
    let silent_record = n.iter().find(|x| x["channel"] == "silent").unwrap();
    assert_eq!(silent_record["state"], "pending", "{silent_record}");
    setup.app.stop().await;
    drop(silent);
}

#[tokio::test]
async fn opsgenie_requests_are_checked_so_a_rejected_one_fails_on_the_run() {
    let og = Service::opsgenie().await;
    let setup = start(
        &[],
        &[("genie.key", GENIE_KEY)],
        &format!(
            "og:\n  type: opsgenie\n  url: {}\n  api_key_file: {{dir}}/genie.key\n  responders: [{{type: team, name: SRE}}]\n  tags: [reactor]\n",
            og.url()
        ),
        |_| {},
    )
    .await;
    let app = &setup.app;

    app.post_webhook(&alert("a1b2c3d4e5f60003", "firing")).await;
    let runs = app
        .wait_for_runs("?playbook=always-fails", Duration::from_secs(20), |r| {
            r.first()
                .is_some_and(|run| run["notifications"][0]["state"] == "delivered")
        })
        .await;
    let created = &og.seen.accepted()[0];
    assert_eq!(
        created["priority"], "P1",
        "pages are critical (alertmanager.severity), so P1"
    );
    assert_eq!(
        created["responders"],
        json!([{"type": "team", "name": "SRE"}])
    );
    assert_eq!(created["source"], "reactor");
    let alias = created["alias"].as_str().unwrap().to_owned();
    assert!(runs[0]["notifications"][0]["requestId"]
        .as_str()
        .unwrap()
        .starts_with("req-"));

    // Resolving closes it by alias.
    app.post_webhook(&alert("a1b2c3d4e5f60003", "resolved"))
        .await;
    let all = wait_accepted(&og, 2, Duration::from_secs(20)).await;
    assert_eq!(all[1]["_path"], "/v2/alerts/close");
    assert_eq!(all[1]["alias"], alias.as_str());

    // A request Opsgenie takes (202) and then fails shows as failed on the run.
    og.seen
        .reject_processing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    app.post_webhook(&alert("a1b2c3d4e5f60004", "firing")).await;
    let runs = app
        .wait_for_runs("?playbook=always-fails", Duration::from_secs(20), |r| {
            r.iter()
                .any(|run| run["notifications"][0]["state"] == "failed")
        })
        .await;
    let failed = runs
        .iter()
        .find(|r| r["notifications"][0]["state"] == "failed")
        .unwrap();
    assert!(
        failed["notifications"][0]["lastError"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{failed}"
    );
    assert!(
        og.seen.violations().is_empty(),
        "{:?}",
        og.seen.violations()
    );
    setup.app.stop().await;
}

#[tokio::test]
async fn slack_429_waits_for_retry_after_and_its_final_errors_are_recorded() {
    let slack = Service::slack().await;
    slack.seen.fail(429, 1);
    let hook = format!("{}/services/T000/B000/XXXXSECRET", slack.url());
    let setup = start(
        &[],
        &[("slack.url", &hook)],
        "chat:\n  type: slack\n  url_file: {dir}/slack.url\n",
        |_| {},
    )
    .await;
    let app = &setup.app;

    let started = std::time::Instant::now();
    app.post_webhook(&alert("a1b2c3d4e5f60005", "firing")).await;
    let msgs = wait_accepted(&slack, 1, Duration::from_secs(20)).await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was honoured"
    );
    let m = &msgs[0];
    assert!(m["text"].as_str().unwrap().contains("always-fails"), "{m}");
    let blocks = m["blocks"].to_string();
    assert!(
        blocks.contains("disk still full") && blocks.contains("/api/v1/runs/"),
        "{blocks}"
    );

    slack.seen.fail(404, u32::MAX);
    app.post_webhook(&alert("a1b2c3d4e5f60006", "firing")).await;
    let runs = app
        .wait_for_runs("?playbook=always-fails", Duration::from_secs(20), |r| {
            r.iter()
                .any(|run| run["notifications"][0]["state"] == "failed")
        })
        .await;
    let failed = runs
        .iter()
        .find(|r| r["notifications"][0]["state"] == "failed")
        .unwrap();
    let error = failed["notifications"][0]["lastError"].as_str().unwrap();
    assert!(
        error.contains("404") && error.contains("channel_not_found"),
        "{error}"
    );
    assert!(
        !serde_json::to_string(&runs).unwrap().contains("XXXXSECRET"),
        "the webhook URL is a secret"
    );
    assert!(
        slack.seen.violations().is_empty(),
        "{:?}",
        slack.seen.violations()
    );
    setup.app.stop().await;
}

#[tokio::test]
async fn teams_gets_one_adaptive_card_and_the_webhook_an_alertmanager_payload() {
    let teams = Service::teams().await;
    let hook = Service::webhook().await;
    let teams_url = format!("{}/workflows/abc", teams.url());
    let setup = start(
        &[],
        &[("teams.url", &teams_url), ("hook.token", "hook-token")],
        &format!(
            "teams:\n  type: msteams\n  url_file: {{dir}}/teams.url\nhook:\n  type: webhook\n  url: {}/hook\n  bearer_token_file: {{dir}}/hook.token\n",
            hook.url()
        ),
        |_| {},
    )
    .await;
    let app = &setup.app;
    app.post_webhook(&alert("a1b2c3d4e5f60007", "firing")).await;
    let cards = wait_accepted(&teams, 1, Duration::from_secs(20)).await;
    let card = &cards[0]["attachments"][0]["content"];
    assert!(card.to_string().contains("disk still full"), "{card}");
    assert_eq!(card["actions"][0]["type"], "Action.OpenUrl");
    let posts = wait_accepted(&hook, 1, Duration::from_secs(20)).await;
    assert_eq!(posts[0]["status"], "firing");
    assert_eq!(
        posts[0]["alerts"][0]["labels"]["alertname"],
        "RemediationFailed"
    );
    assert_eq!(
        posts[0]["alerts"][0]["labels"]["original_alertname"],
        "DiskFull"
    );

    // The webhook hears the resolution; Teams, a chat, does not by default.
    app.post_webhook(&alert("a1b2c3d4e5f60007", "resolved"))
        .await;
    let posts = wait_accepted(&hook, 2, Duration::from_secs(20)).await;
    assert_eq!(posts[1]["status"], "resolved");
    assert_eq!(teams.seen.accepted().len(), 1);
    assert!(teams.seen.violations().is_empty() && hook.seen.violations().is_empty());
    setup.app.stop().await;
}

#[tokio::test]
async fn five_hundred_failures_in_ten_seconds_give_at_most_threshold_plus_one_pages() {
    let hook = Service::webhook().await;
    let setup = start(
        &[],
        &[("hook.token", "hook-token")],
        &format!(
            "hook:\n  type: webhook\n  url: {}/hook\n  bearer_token_file: {{dir}}/hook.token\n",
            hook.url()
        ),
        |s| {
            s.storm.threshold = 5;
            s.storm.window = Duration::from_secs(300);
            s.storm.summary_after = Duration::from_secs(15);
            s.limits.queue_capacity = 1000;
        },
    )
    .await;
    let app = &setup.app;
    for batch in 0..50 {
        let alerts: Vec<(String, String)> = (0..10)
            .map(|i| {
                (
                    "DiskFull".to_owned(),
                    format!("{:016x}", 0xf000 + batch * 10 + i),
                )
            })
            .collect();
        let refs: Vec<(&str, &str)> = alerts
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(app.post_webhook(&payload(&refs)).await.status(), 202);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    app.wait_for_runs(
        "?playbook=always-fails&limit=1000",
        Duration::from_secs(60),
        |r| {
            r.len() == 500
                && r.iter()
                    .all(|run| run["notifications"][0]["state"] != "queued")
        },
    )
    .await;
    let posts = wait_accepted(&hook, 6, Duration::from_secs(40)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let posts_after = hook.seen.accepted();
    assert_eq!(
        posts_after.len(),
        6,
        "5 pages and one summary, not {}",
        posts_after.len()
    );
    let summary = &posts[5];
    assert_eq!(
        summary["alerts"][0]["labels"]["alertname"],
        "RemediationStorm"
    );
    let text = summary["alerts"][0]["annotations"]["summary"]
        .as_str()
        .unwrap();
    assert!(text.starts_with("500 remediations failed"), "{text}");
    let runs = app.runs("?playbook=always-fails&limit=1000").await;
    let folded = runs
        .iter()
        .filter(|r| r["notifications"][0]["state"] == "folded")
        .count();
    assert_eq!(
        folded, 495,
        "the rest are recorded as folded into the summary"
    );
    setup.app.stop().await;
}
