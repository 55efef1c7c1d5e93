//! The closed loop, against the real Alertmanager: a fix counts only when the alert resolves
//! (`verify.resolved_within`), the wait survives a SIGKILL, and a page resolves itself when the
//! alert behind it resolves.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{
    alertmanager_config, client, free_port, get_runs, spawn_binary, wait_for, wait_healthy,
    Alertmanager, Capture, PlaybookDir, Stack, TestApp,
};

const TOKEN: &str = "loop-token";

fn verify_playbook(alertname: &str, within: &str) -> String {
    format!(
        r#"name: fix-{alertname}
match:
  alertname: {alertname}
steps:
  - name: fix
    inline: |
      log("fixed, supposedly");
verify:
  resolved_within: {within}
"#
    )
}

/// The alert as Prometheus posts it: firing for an hour, or resolved a second ago.
fn alert(name: &str, firing: bool) -> Value {
    let now = jiff::Timestamp::now();
    // A firing alert starts now: Alertmanager flushes a new group at once when the first alert
    // started more than group_wait ago, before any silence could be created.
    let (starts, ends) = if firing {
        (now, now + jiff::SignedDuration::from_hours(1))
    } else {
        (
            now - jiff::SignedDuration::from_mins(1),
            now - jiff::SignedDuration::from_secs(1),
        )
    };
    json!([{
        "labels": {"alertname": name, "instance": "node-7", "severity": "warning"},
        "annotations": {"summary": "closed-loop test"},
        "startsAt": starts.to_string(),
        "endsAt": ends.to_string(),
    }])
}

/// The stack with `dir` as reactor's playbooks and `am_config` as Alertmanager's config.
async fn stack_with(
    dir: &PlaybookDir,
    am_config: impl FnOnce(SocketAddr, &str) -> String,
) -> Stack {
    Stack::start(
        |s| {
            s.playbooks_dir = dir.playbooks();
            s.scripts_dir = dir.scripts();
            s.alertmanager.poll_interval = Duration::from_secs(1);
            s.auth.bearer_token = Some(TOKEN.into());
        },
        am_config,
    )
    .await
}

async fn stack(dir: &PlaybookDir) -> Stack {
    stack_with(dir, |reactor, humans| {
        alertmanager_config(reactor, TOKEN, humans)
    })
    .await
}

async fn wait_outcome(app: &TestApp, alertname: &str, outcome: &str) -> Value {
    let runs = app
        .wait_for_runs(
            &format!("alertname={alertname}"),
            Duration::from_secs(40),
            |runs| runs.iter().any(|r| r["outcome"] == outcome),
        )
        .await;
    runs.into_iter().find(|r| r["outcome"] == outcome).unwrap()
}

fn timeline(run: &Value) -> Vec<String> {
    run["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fix_whose_alert_keeps_firing_escalates_after_resolved_within() {
    let pb = verify_playbook("StillFiring", "4s");
    let dir = PlaybookDir::new(&[("playbooks/v.yaml", &pb)]);
    let s = stack(&dir).await;
    s.am.post_alerts(&alert("StillFiring", true)).await;

    let run = wait_outcome(&s.reactor, "StillFiring", "verifying").await;
    assert!(run["verifyDeadline"].is_string());
    let run = wait_outcome(&s.reactor, "StillFiring", "failed").await;
    assert_eq!(run["reason"], "not resolved after remediation");
    let events = timeline(&run);
    for expected in [
        "received",
        "matched playbook fix-StillFiring",
        "step fix attempt 1 started",
        "step fix attempt 1 succeeded",
        "verify started: waiting up to 4s for the alert to resolve",
        "failed: not resolved after remediation",
        "escalation RemediationFailed queued",
    ] {
        assert!(
            events.iter().any(|e| e == expected),
            "{expected:?} not in {events:?}"
        );
    }
    let pages = s
        .humans
        .wait_for_notification("RemediationFailed", Duration::from_secs(20))
        .await;
    assert_eq!(
        pages[0]["alerts"][0]["labels"]["original_alertname"],
        "StillFiring"
    );
    assert_eq!(
        pages[0]["alerts"][0]["annotations"]["error"],
        "not resolved after remediation"
    );
    s.reactor.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fix_whose_alert_resolves_in_time_is_verified_and_pages_nobody() {
    let pb = verify_playbook("GetsFixed", "30s");
    let dir = PlaybookDir::new(&[("playbooks/v.yaml", &pb)]);
    let s = stack(&dir).await;
    s.am.post_alerts(&alert("GetsFixed", true)).await;
    wait_outcome(&s.reactor, "GetsFixed", "verifying").await;

    s.am.post_alerts(&alert("GetsFixed", false)).await;
    let run = wait_outcome(&s.reactor, "GetsFixed", "succeeded").await;
    assert!(run["verifiedAt"].is_string(), "{run}");
    assert_eq!(
        run["reason"],
        "verified: the alert resolved after remediation"
    );
    let events = timeline(&run);
    assert!(
        events.iter().any(|e| e.starts_with("resolved seen")),
        "{events:?}"
    );
    assert!(events.iter().any(|e| e == "succeeded (verified)"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(s.humans.notifications("RemediationFailed").is_empty());
    s.reactor.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resolving_the_original_alert_resolves_the_page_for_the_humans() {
    let failing = "name: always-fails\nmatch:\n  alertname: Unfixable\nsteps:\n  - name: try\n    inline: throw \"no luck\";\n";
    let dir = PlaybookDir::new(&[("playbooks/f.yaml", failing)]);
    let s = stack(&dir).await;
    s.am.post_alerts(&alert("Unfixable", true)).await;
    let pages = s
        .humans
        .wait_for_notification("RemediationFailed", Duration::from_secs(30))
        .await;
    assert_eq!(pages[0]["status"], "firing");

    s.am.post_alerts(&alert("Unfixable", false)).await;
    let resolved = wait_for(Duration::from_secs(30), || async {
        s.humans
            .notifications("RemediationFailed")
            .into_iter()
            .find(|n| n["status"] == "resolved")
    })
    .await
    .expect("the humans get RemediationFailed resolved");
    assert_eq!(
        resolved["alerts"][0]["labels"]["original_alertname"],
        "Unfixable"
    );
    let run = wait_outcome(&s.reactor, "Unfixable", "failed").await;
    let events = timeline(&run);
    assert!(
        events
            .iter()
            .any(|e| e == "escalation resolving: the alert resolved"),
        "{events:?}"
    );
    assert!(run["escalation"]["resolvedAt"].is_string(), "{run}");
    s.reactor.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_during_the_verify_window_still_ends_the_run() {
    let humans = Capture::start().await;
    let pb = verify_playbook("SurvivesRestart", "8s");
    let dir = PlaybookDir::new(&[("playbooks/v.yaml", &pb)]);
    let port = free_port();
    let am_port = free_port();
    let config = dir.binary_config(
        port,
        TOKEN,
        &format!("alertmanager:\n  url: http://127.0.0.1:{am_port}\n  poll_interval: 1s\n"),
    );
    let args = ["--config", config.to_str().unwrap(), "serve"];
    let mut reactor = spawn_binary(&args, dir.path());
    wait_healthy(port).await;
    let am = Alertmanager::start(
        am_port,
        &alertmanager_config(
            format!("127.0.0.1:{port}").parse().unwrap(),
            TOKEN,
            &humans.url(),
        ),
    )
    .await;
    am.post_alerts(&alert("SurvivesRestart", true)).await;
    let url = format!("http://127.0.0.1:{port}/api/v1/runs?alertname=SurvivesRestart");
    wait_for(Duration::from_secs(30), || async {
        let runs = get_runs(&client(), &url, Some(TOKEN)).await;
        runs.iter()
            .any(|r| r["outcome"] == "verifying")
            .then_some(())
    })
    .await
    .expect("the run is verifying");

    reactor.kill();
    let _reactor = spawn_binary(&args, dir.path());
    wait_healthy(port).await;
    let run = wait_for(Duration::from_secs(30), || async {
        let runs = get_runs(&client(), &url, Some(TOKEN)).await;
        runs.into_iter().find(|r| r["outcome"] == "failed")
    })
    .await
    .expect("the verification ends after the restart");
    assert_eq!(run["reason"], "not resolved after remediation");
    humans
        .wait_for_notification("RemediationFailed", Duration::from_secs(20))
        .await;
}

const NOISY_PLAYBOOK: &str = r#"name: quiet-while-fixing
match:
  alertname: Noisy
silence: true
steps:
  - name: slow-and-failing
    inline: |
      let i = 0;
      while i < 30 { sleep(200); i += 1; }
      throw "still noisy";
"#;

#[tokio::test(flavor = "multi_thread")]
async fn with_silence_the_humans_hear_nothing_while_fixing_and_get_the_alert_after_a_failure() {
    let dir = PlaybookDir::new(&[("playbooks/n.yaml", NOISY_PLAYBOOK)]);
    // Noisy goes to reactor at once and to the humans after 4 s.
    let s = stack_with(&dir, |reactor, humans| {
        format!(
            r#"route:
  receiver: reactor
  group_by: ['...']
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
  routes:
    - receiver: humans
      matchers: ['alertname="RemediationFailed"']
    - receiver: reactor
      matchers: ['alertname="Noisy"']
      continue: true
    - receiver: humans
      matchers: ['alertname="Noisy"']
      group_wait: 4s
      group_interval: 2s
receivers:
  - name: reactor
    webhook_configs:
      - url: http://{}/webhook/alertmanager
        send_resolved: true
        http_config:
          authorization:
            credentials: {TOKEN}
  - name: humans
    webhook_configs:
      - url: {}/
        send_resolved: true
"#,
            reactor, humans
        )
    })
    .await;
    s.am.post_alerts(&alert("Noisy", true)).await;

    let running = s
        .reactor
        .wait_for_runs("alertname=Noisy", Duration::from_secs(20), |runs| {
            runs.iter().any(|r| r["silence"]["id"].is_string())
        })
        .await;
    assert_eq!(running[0]["outcome"], "running");
    let silence_id = running[0]["silence"]["id"].as_str().unwrap().to_owned();
    // Until the run is recorded failed (it expires the silence only after that), the humans
    // hear nothing, though their 4 s group_wait passes well within the 6 s run.
    loop {
        let heard = !s.humans.notifications("Noisy").is_empty();
        let runs = s.reactor.runs("alertname=Noisy").await;
        if runs[0]["outcome"] != "running" {
            break;
        }
        assert!(
            !heard,
            "the humans heard of Noisy while reactor was fixing it: {:?} run {} silences {}",
            s.humans.notifications("Noisy"),
            runs[0],
            client()
                .get(format!("{}/api/v2/silences", s.am.url()))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let failed = wait_outcome(&s.reactor, "Noisy", "failed").await;
    assert!(failed["silence"]["expiredAt"].is_string(), "{failed}");
    let events = timeline(&failed);
    assert!(events
        .iter()
        .any(|e| e.starts_with(&format!("silence {silence_id} created"))));
    assert!(events.contains(&format!("silence {silence_id} expired")));

    let original = s
        .humans
        .wait_for_notification("Noisy", Duration::from_secs(20))
        .await;
    assert_eq!(original[0]["alerts"][0]["status"], "firing");
    s.humans
        .wait_for_notification("RemediationFailed", Duration::from_secs(20))
        .await;
    s.reactor.stop().await;
}
