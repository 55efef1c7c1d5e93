//! Playbooks that act beyond Kubernetes: a script runs an allowed program through `exec()`, a
//! `command:` step runs one with the alert's labels, a script calls a service's admin API through
//! `http::post` with a configured credential, and nothing off the allow-lists runs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{payload, PlaybookDir, TestApp};

/// A stand-in for `systemctl`: appends its arguments, one per line after their count, and the
/// variables `ALERT_UNIT`, `GIVEN` and `HOME` (set in the tests' own environment, so `nohome`
/// shows it was cleared) to `calls`, then exits with `$EXIT_CODE` (0 unless given).
fn fake_program(dir: &Path) -> PathBuf {
    let path = dir.join("fake-systemctl");
    let calls = dir.join("calls");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n{{ echo \"argc=$#\"; for a in \"$@\"; do echo \"arg=$a\"; done; echo \"env=${{ALERT_UNIT:-}}|${{GIVEN:-}}|${{HOME:-nohome}}\"; }} >> {}\necho \"restarted $2\"\nexit ${{EXIT_CODE:-0}}\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn alert(name: &str, fp: &str, unit: &str) -> Value {
    let mut p = payload(&[(name, fp)]);
    p["alerts"][0]["labels"]["unit"] = json!(unit);
    p
}

async fn settled(app: &TestApp, name: &str) -> Value {
    let runs = app
        .wait_for_runs(&format!("alertname={name}"), Duration::from_secs(10), |r| {
            r.len() == 1 && r[0]["outcome"] != "running"
        })
        .await;
    runs[0].clone()
}

#[tokio::test]
async fn scripts_and_command_steps_run_allowed_programs_without_a_shell() {
    let tools = tempfile::tempdir().unwrap();
    let fake = fake_program(tools.path());
    let marker = tools.path().join("touched");
    let playbooks = format!(
        r#"
name: restart-unit
match: {{alertname: UnitDown}}
steps:
  - name: restart
    inline: |
      let r = exec("{fake}", ["restart", alert.labels.unit], #{{ env: #{{ GIVEN: "yes" }} }});
      if r.code != 0 {{ throw "systemctl failed: " + r.stderr; }}
      r.stdout
---
name: fix-with-command
match: {{alertname: DiskFull}}
steps:
  - name: fix
    command: ["{fake}", "clean", "{{{{ labels.unit }}}}"]
---
name: not-allowed
match: {{alertname: Sneaky}}
steps:
  - name: touch
    retries: 2
    retry_delay: 0s
    inline: 'exec("/usr/bin/touch", ["{marker}"])'
"#,
        fake = fake.display(),
        marker = marker.display(),
    );
    let dir = PlaybookDir::new(&[("playbooks/acting.yaml", &playbooks)]);
    let app = TestApp::spawn(|s| {
        s.playbooks_dir = dir.playbooks();
        s.scripts_dir = dir.scripts();
        s.exec.allow = vec![fake.clone()];
    })
    .await;

    // exec() from a script: the unit restarted, the call on the run's record.
    app.post_webhook(&alert("UnitDown", "u1", "nginx.service"))
        .await;
    let run = settled(&app, "UnitDown").await;
    assert_eq!(run["outcome"], "succeeded", "{run:#}");
    assert_eq!(run["steps"][0]["output"], "restarted nginx.service\n");
    let change = &run["steps"][0]["changes"][0];
    assert_eq!(change["verb"], "exec");
    assert_eq!(
        change["object"],
        format!("{} restart nginx.service", fake.display())
    );
    assert_eq!(change["result"], "exit 0");
    assert_eq!(
        change["detail"]["env"],
        json!(["GIVEN"]),
        "names, never values"
    );

    // A command step: a hostile label value is one literal argument, and the labels are
    // ALERT_* variables; nothing else is in the environment.
    app.post_webhook(&alert("DiskFull", "d1", "; rm -rf /"))
        .await;
    let run = settled(&app, "DiskFull").await;
    assert_eq!(run["outcome"], "succeeded", "{run:#}");
    assert_eq!(run["steps"][0]["output"]["code"], 0);
    let calls = std::fs::read_to_string(tools.path().join("calls")).unwrap();
    assert_eq!(
        calls,
        "argc=2\narg=restart\narg=nginx.service\nenv=|yes|nohome\n\
         argc=2\narg=clean\narg=; rm -rf /\nenv=; rm -rf /||nohome\n"
    );

    // Off the allow-list: refused, not retried, nothing touched.
    app.post_webhook(&alert("Sneaky", "s1", "x")).await;
    let run = settled(&app, "Sneaky").await;
    assert_eq!(run["outcome"], "failed");
    assert_eq!(run["steps"].as_array().unwrap().len(), 1, "{run:#}");
    assert_eq!(run["steps"][0]["errorClass"], "refused");
    let error = run["steps"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("exec \"/usr/bin/touch\": not in exec.allow; nothing was run"),
        "{error}"
    );
    assert!(!marker.exists());
    app.stop().await;
}

#[tokio::test]
async fn a_command_that_exits_non_zero_fails_its_step_with_the_status_and_is_retried() {
    let tools = tempfile::tempdir().unwrap();
    let failing = tools.path().join("fail");
    std::fs::write(
        &failing,
        "#!/bin/sh\necho \"disk still full\" >&2\nexit 4\n",
    )
    .unwrap();
    std::fs::set_permissions(&failing, std::fs::Permissions::from_mode(0o755)).unwrap();
    let playbooks = format!(
        "name: failing\nmatch: {{alertname: Failing}}\nsteps:\n  - name: fix\n    retries: 1\n    retry_delay: 0s\n    command: [\"{}\"]\n",
        failing.display()
    );
    let dir = PlaybookDir::new(&[("playbooks/f.yaml", &playbooks)]);
    let app = TestApp::spawn(|s| {
        s.playbooks_dir = dir.playbooks();
        s.scripts_dir = dir.scripts();
        s.exec.allow = vec![failing.clone()];
    })
    .await;
    app.post_webhook(&alert("Failing", "f1", "x")).await;
    let run = settled(&app, "Failing").await;
    assert_eq!(run["outcome"], "failed");
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "a non-zero exit is retried: {run:#}");
    assert_eq!(steps[1]["errorClass"], "exit_status");
    assert_eq!(
        steps[1]["error"],
        format!("{} exited with 4: disk still full", failing.display())
    );
    app.stop().await;
}

/// A service's admin API: records every request (method, path, authorization, content type,
/// body); `POST /admin/restart` answers 202 with what it restarted, `/admin/moved` redirects
/// outside the allowed prefix.
async fn admin_api() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    tokio_util::sync::CancellationToken,
) {
    use axum::extract::Request;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    let seen: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
    let s = seen.clone();
    let app = axum::Router::new().fallback(move |req: Request| {
        let s = s.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
            let header = |n: &str| parts.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
            s.lock().unwrap().push(json!({
                "method": parts.method.as_str(),
                "path": parts.uri.path(),
                "authorization": header("authorization"),
                "content_type": header("content-type"),
                "body": String::from_utf8_lossy(&body),
            }));
            let answer: Response = match (parts.method.as_str(), parts.uri.path()) {
                ("POST", "/admin/restart") => {
                    let asked: Value = serde_json::from_slice(&body).unwrap_or_default();
                    (
                        StatusCode::ACCEPTED,
                        axum::Json(json!({"restarted": asked["service"]})),
                    )
                        .into_response()
                }
                (_, "/admin/moved") => {
                    (StatusCode::FOUND, [("location", "/steal")], "").into_response()
                }
                _ => StatusCode::NOT_FOUND.into_response(),
            };
            answer
        }
    });
    let (addr, stop) = crate::helpers::serve_local(app).await;
    (addr, seen, stop)
}

#[tokio::test]
async fn scripts_call_allowed_urls_with_configured_credentials_and_nothing_else() {
    let (addr, seen, stop) = admin_api().await;
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin-token");
    std::fs::write(&token_file, "Bearer s3cret-admin\n").unwrap();
    let playbooks = format!(
        r#"
name: admin-restart
match: {{alertname: Wedged}}
steps:
  - name: restart
    inline: |
      let r = http::post("http://{addr}/admin/restart", #{{ json: #{{ service: alert.labels.unit }} }});
      if r.status != 202 {{ throw `admin API answered ${{r.status}}: ${{r.body}}`; }}
      parse_json(r.body)
---
name: outside
match: {{alertname: Outside}}
steps:
  - name: read
    retries: 2
    retry_delay: 0s
    inline: 'http::get("http://{addr}/private/keys")'
---
name: redirected
match: {{alertname: Redirected}}
steps:
  - name: read
    inline: 'http::get("http://{addr}/admin/moved").status'
"#
    );
    let dir = PlaybookDir::new(&[("playbooks/http.yaml", &playbooks)]);
    let app = TestApp::spawn(|s| {
        s.playbooks_dir = dir.playbooks();
        s.scripts_dir = dir.scripts();
        s.http.allow = vec![format!("http://{addr}/admin/")];
        s.http.credentials = vec![reactor::config::HttpCredential {
            prefix: format!("http://{addr}/admin/"),
            header: "Authorization".into(),
            value_file: Some(token_file.clone()),
            value_env: None,
            value: None,
        }];
    })
    .await;

    app.post_webhook(&alert("Wedged", "w1", "nginx")).await;
    let run = settled(&app, "Wedged").await;
    assert_eq!(run["outcome"], "succeeded", "{run:#}");
    assert_eq!(run["steps"][0]["output"], json!({"restarted": "nginx"}));
    let requests = seen.lock().unwrap().clone();
    assert_eq!(
        requests,
        [json!({
            "method": "POST",
            "path": "/admin/restart",
            "authorization": "Bearer s3cret-admin",
            "content_type": "application/json",
            "body": "{\"service\":\"nginx\"}",
        })]
    );
    let change = &run["steps"][0]["changes"][0];
    assert_eq!(change["verb"], "http POST");
    assert_eq!(change["result"], "HTTP 202");
    assert!(
        change["detail"]["headers"]
            .as_array()
            .unwrap()
            .contains(&json!("authorization")),
        "{change}"
    );
    assert!(
        !run.to_string().contains("s3cret"),
        "the credential is not on the run"
    );

    // Outside the prefix: refused before any request, and not retried.
    app.post_webhook(&alert("Outside", "o1", "x")).await;
    let run = settled(&app, "Outside").await;
    assert_eq!(run["outcome"], "failed");
    assert_eq!(run["steps"].as_array().unwrap().len(), 1);
    assert_eq!(run["steps"][0]["errorClass"], "refused");
    let error = run["steps"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("not under a prefix in http.allow; nothing was sent"),
        "{error}"
    );

    // A redirect is an answer, not followed out of the prefix.
    app.post_webhook(&alert("Redirected", "r1", "x")).await;
    let run = settled(&app, "Redirected").await;
    assert_eq!(run["steps"][0]["output"], 302, "{run:#}");
    let paths: Vec<Value> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| r["path"].clone())
        .collect();
    assert_eq!(paths, [json!("/admin/restart"), json!("/admin/moved")]);
    app.stop().await;
    stop.cancel();
}
