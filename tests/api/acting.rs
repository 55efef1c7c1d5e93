//! Playbooks that act beyond Kubernetes: a script runs an allowed program through `exec()`, a
//! `command:` step runs one with the alert's labels, and nothing off the allow-list runs.

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
