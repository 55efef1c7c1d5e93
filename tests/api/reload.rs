//! Reloading playbooks without a restart: SIGHUP to the real binary and `POST /-/reload` to the
//! app add a playbook that the next alert runs; a broken set is refused whole and the set in force
//! keeps running; the reload metrics say which.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{
    client, free_port, get_runs, payload, spawn_binary, wait_for, wait_healthy, PlaybookDir,
    TestApp,
};

const FIRST: &str =
    "name: first\nmatch: {alertname: First}\nsteps:\n  - {name: ok, inline: '\"first\"'}\n";
const SECOND: &str =
    "name: second\nmatch: {alertname: Second}\nsteps:\n  - {name: ok, inline: '\"second\"'}\n";
const BROKEN: &str = "name: broken\nmatch: {alertname: Broken}\nsteps:\n  - name: bad\n    inline: '1'\n    timeout: soon\n";

/// The settled run of the one alert `name` with fingerprint `fp`.
async fn outcome(app: &TestApp, name: &str, fp: &str) -> (String, Option<String>) {
    assert!(app
        .post_webhook(&payload(&[(name, fp)]))
        .await
        .status()
        .is_success());
    let runs = app
        .wait_for_runs(&format!("alertname={name}"), Duration::from_secs(10), |r| {
            r.iter()
                .any(|r| r["alert"]["fingerprint"] == fp && r["outcome"] != "running")
        })
        .await;
    let run = runs
        .iter()
        .find(|r| r["alert"]["fingerprint"] == fp)
        .unwrap();
    (
        run["outcome"].as_str().unwrap().to_owned(),
        run["playbook"].as_str().map(str::to_owned),
    )
}

fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok())?
    })
}

async fn reload(app: &TestApp) -> (u16, Value) {
    let r = app
        .client
        .post(app.url("/-/reload"))
        .bearer_auth("reload-token")
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn post_reload_adds_a_playbook_and_refuses_a_broken_set_whole() {
    let dir = PlaybookDir::new(&[("playbooks/first.yaml", FIRST)]);
    let app = TestApp::spawn(|s| {
        s.playbooks_dir = dir.playbooks();
        s.scripts_dir = dir.scripts();
        s.auth.bearer_token = Some("reload-token".into());
    })
    .await;
    assert_eq!(
        outcome(&app, "Second", "s1").await,
        ("skipped".to_owned(), None),
        "not loaded yet"
    );

    // Without credentials, no reload.
    let anonymous = app.client.post(app.url("/-/reload")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);

    std::fs::write(dir.playbooks().join("second.yaml"), SECOND).unwrap();
    let (status, body) = reload(&app).await;
    assert_eq!(
        (status, &body["playbooks"]),
        (200, &Value::from(2)),
        "{body}"
    );
    assert_eq!(
        outcome(&app, "Second", "s2").await,
        ("succeeded".to_owned(), Some("second".to_owned()))
    );
    let metrics = app.metrics().await;
    assert_eq!(
        metric(&metrics, "reactor_config_last_reload_successful"),
        Some(1.0)
    );
    let loaded_at = metric(
        &metrics,
        "reactor_config_last_reload_success_timestamp_seconds",
    )
    .unwrap();

    // A broken file: refused whole, with the problem's file and line; both playbooks still run.
    std::fs::write(dir.playbooks().join("broken.yaml"), BROKEN).unwrap();
    let (status, body) = reload(&app).await;
    assert_eq!(status, 400, "{body}");
    let problems = body["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{body}");
    let problem = problems[0].as_str().unwrap();
    assert!(
        problem.ends_with("broken.yaml:6: step \"bad\": timeout: expected a duration like 30s or 5m, got \"soon\" (expected number at 0)"),
        "{problem}"
    );
    assert_eq!(
        outcome(&app, "Second", "s3").await,
        ("succeeded".to_owned(), Some("second".to_owned()))
    );
    assert_eq!(outcome(&app, "First", "f1").await.0, "succeeded");
    let metrics = app.metrics().await;
    assert_eq!(
        metric(&metrics, "reactor_config_last_reload_successful"),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "reactor_config_last_reload_success_timestamp_seconds"
        ),
        Some(loaded_at),
        "the set in force was loaded when it was"
    );
    assert_eq!(
        metric(
            &metrics,
            r#"reactor_config_reloads_total{result="failure"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &metrics,
            r#"reactor_config_reloads_total{result="success"}"#
        ),
        Some(1.0)
    );
    app.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_running_binary_instead_of_ending_it() {
    const TOKEN: &str = "hup-token";
    let dir = PlaybookDir::new(&[("playbooks/first.yaml", FIRST)]);
    let port = free_port();
    let config = dir.binary_config(port, TOKEN, "");
    let mut reactor = spawn_binary(&["--config", config.to_str().unwrap(), "serve"], dir.path());
    wait_healthy(port).await;
    let http = client();
    let healthz = || async {
        let v: Value = http
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["playbooks"].as_u64()
    };
    assert_eq!(healthz().await, Some(1));

    std::fs::write(dir.playbooks().join("second.yaml"), SECOND).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &reactor.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let reloaded = wait_for(Duration::from_secs(10), || async {
        (healthz().await == Some(2)).then_some(())
    })
    .await;
    assert!(
        reloaded.is_some(),
        "SIGHUP put the second playbook in force"
    );
    assert!(
        reactor.child.try_wait().unwrap().is_none(),
        "SIGHUP did not end reactor"
    );

    let r = http
        .post(format!("http://127.0.0.1:{port}/webhook/alertmanager"))
        .bearer_auth(TOKEN)
        .json(&payload(&[("Second", "h1")]))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let url = format!("http://127.0.0.1:{port}/api/v1/runs?alertname=Second");
    let ran = wait_for(Duration::from_secs(10), || async {
        let runs = get_runs(&http, &url, Some(TOKEN)).await;
        runs.iter()
            .any(|r| r["outcome"] == "succeeded" && r["playbook"] == "second")
            .then_some(())
    })
    .await;
    assert!(ran.is_some(), "the next alert ran the reloaded playbook");
    let log = std::fs::read_to_string(dir.path().join("reactor.log")).unwrap();
    assert!(log.contains("playbooks reloaded"), "{log}");
    assert!(reactor.terminate().success());
}

#[tokio::test]
async fn with_watch_a_changed_directory_is_reloaded_by_itself() {
    let dir = PlaybookDir::new(&[("playbooks/first.yaml", FIRST)]);
    let app = TestApp::spawn(|s| {
        s.playbooks_dir = dir.playbooks();
        s.scripts_dir = dir.scripts();
        s.watch = true;
    })
    .await;
    let loaded = || async {
        let v: Value = app
            .client
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["playbooks"].as_u64()
    };
    assert_eq!(loaded().await, Some(1));
    std::fs::write(dir.playbooks().join("second.yaml"), SECOND).unwrap();
    let seen = wait_for(Duration::from_secs(10), || async {
        (loaded().await == Some(2)).then_some(())
    })
    .await;
    assert!(seen.is_some(), "the new file was loaded without a signal");
    // A broken edit is refused; the set in force stays.
    std::fs::write(dir.playbooks().join("broken.yaml"), BROKEN).unwrap();
    let refused = wait_for(Duration::from_secs(10), || async {
        let metrics = app.metrics().await;
        (metric(&metrics, "reactor_config_last_reload_successful") == Some(0.0)).then_some(())
    })
    .await;
    assert!(refused.is_some(), "the broken set was refused");
    assert_eq!(loaded().await, Some(2));
    app.stop().await;
}
