//! The `reactor` command line as an SRE uses it: check, test, serve on defaults, runs.

use std::time::Duration;

use crate::helpers::{
    free_port, payload, repo, run_binary, spawn_binary, wait_for, wait_healthy, PlaybookDir,
};

#[test]
fn check_accepts_the_shipped_playbooks() {
    let (code, out, err) = run_binary(&["check", "playbooks/"], repo());
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok: 10 playbook(s)"), "{out}");
    // On the embedded defaults, the playbooks that need a program, a URL or a root allowed say
    // so, as warnings; --strict makes them fail the check.
    assert!(
        err.contains("playbooks/systemd.yaml:5: warning: playbook \"systemd-unit-restart\", step \"restart-unit\": exec(\"/usr/bin/systemctl\") is not in exec.allow"),
        "{err}"
    );
    assert!(
        err.contains("step \"flush-cache\": calls http::, and http.allow is empty"),
        "{err}"
    );
    let (code, _, _) = run_binary(&["check", "--strict", "playbooks/"], repo());
    assert_eq!(code, 1);
}

#[test]
fn check_names_file_and_line_of_yaml_and_rhai_errors() {
    let dir = PlaybookDir::new(&[
        ("playbooks/yaml.yaml", "name: d\nmatch: {alertname: X\nsteps: []\n"),
        ("playbooks/rhai.yaml", "name: a\nmatch:\n  alertname: X\nsteps:\n  - name: s\n    inline: |\n      let x = 1;\n      let y = ;\n"),
        ("scripts/broken.rhai", "let a = 1;\nfn f( { }\n"),
    ]);
    let (code, _, err) = run_binary(&["check", "playbooks"], dir.root.path());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("playbooks/yaml.yaml:3: YAML:"), "{err}");
    assert!(
        err.contains("playbooks/rhai.yaml:8: Rhai syntax error"),
        "{err}"
    );
    assert!(
        err.contains("scripts/broken.rhai:2: Rhai syntax error"),
        "{err}"
    );
}

#[test]
fn check_prints_every_problem_of_a_file_at_its_own_line() {
    let dir = PlaybookDir::new(&[(
        "playbooks/three.yaml",
        "name: a\nmatch: {alertname: X}\nguards:\n  cooldown: soon\nsteps:\n  - name: clean\n    inline: '1'\n    timeout: 99y\n    retries: 1000\n",
    )]);
    let (code, _, err) = run_binary(&["check", "playbooks"], dir.root.path());
    assert_eq!(code, 1, "{err}");
    let problems: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("playbooks/three.yaml:"))
        .map(|l| l.split(": ").next().unwrap())
        .collect();
    assert_eq!(
        problems,
        [
            "playbooks/three.yaml:4",
            "playbooks/three.yaml:8",
            "playbooks/three.yaml:9"
        ],
        "{err}"
    );
    assert!(err.contains("3 problem(s) found"), "{err}");
    // One file, named alone.
    let (code, _, alone) = run_binary(&["check", "playbooks/three.yaml"], dir.root.path());
    assert_eq!((code, alone), (1, err));
}

#[test]
fn serve_refuses_to_start_on_an_invalid_playbook() {
    let dir = PlaybookDir::new(&[(
        "playbooks/bad.yaml",
        "name: a\nmatch: {alertname: X}\nsteps:\n  - inline: 'let = 2'\n",
    )]);
    let port = free_port().to_string();
    let (code, _, err) = run_binary(
        &["serve", "--listen", &format!("127.0.0.1:{port}")],
        dir.root.path(),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("invalid playbooks") && err.contains("playbooks/bad.yaml:4"),
        "{err}"
    );
}

#[test]
fn test_prints_what_would_run_and_runs_nothing() {
    let (code, out, err) = run_binary(
        &["test", "tests/fixtures/alertmanager-0.25-firing.json"],
        repo(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("alert[0] HarnessCurl (firing)") && out.contains("no playbook matches"),
        "{out}"
    );
    let dir = PlaybookDir::new(&[]);
    let body = payload(&[
        ("ReactorSelfTestFail", "x1"),
        ("NodeFilesystemAlmostOutOfSpace", "x2"),
    ])
    .to_string();
    std::fs::write(dir.root.path().join("alert.json"), body).unwrap();
    let alert = dir.root.path().join("alert.json");
    let (code, out, _) = run_binary(&["test", alert.to_str().unwrap()], repo());
    assert_eq!(code, 0);
    assert!(
        out.contains("reactor-selftest-fail (playbooks/selftest.yaml:14): would run"),
        "{out}"
    );
    assert!(
        out.contains("1. always-fails: rhai inline at playbooks/selftest.yaml:"),
        "{out}"
    );
    let (code, _, err) = run_binary(&["test", "Cargo.toml"], repo());
    assert_eq!(code, 1);
    assert!(err.contains("malformed JSON"), "{err}");
}

#[test]
fn test_reads_an_api_list_says_which_matcher_failed_and_dry_runs_with_run() {
    let dir = PlaybookDir::new(&[]);
    // Alertmanager's API list (`GET /api/v2/alerts`): status objects, receivers.
    let api = serde_json::json!([
        {
            "labels": {"alertname": "NodeFilesystemAlmostOutOfSpace", "severity": "warning", "fstype": "tmpfs", "instance": "n1"},
            "annotations": {}, "startsAt": "2026-11-20T23:35:13Z", "endsAt": "2026-11-20T23:45:13Z",
            "fingerprint": "aa01", "updatedAt": "2026-11-20T23:35:13Z", "receivers": [{"name": "reactor"}],
            "status": {"state": "active", "silencedBy": [], "inhibitedBy": []}
        },
        {
            "labels": {"alertname": "ReactorSelfTestOk", "instance": "n1"},
            "annotations": {}, "startsAt": "2026-11-20T23:35:13Z", "endsAt": "2026-11-20T23:45:13Z",
            "fingerprint": "aa02", "status": {"state": "active", "silencedBy": [], "inhibitedBy": []}
        },
        {
            "labels": {"alertname": "ReactorSelfTestFail", "instance": "n1"},
            "annotations": {}, "startsAt": "2026-11-20T23:35:13Z", "endsAt": "2026-11-20T23:45:13Z",
            "fingerprint": "aa03", "status": {"state": "active", "silencedBy": [], "inhibitedBy": []}
        }
    ]);
    let file = dir.root.path().join("api.json");
    std::fs::write(&file, api.to_string()).unwrap();
    let (code, out, err) = run_binary(&["test", "--run", file.to_str().unwrap()], repo());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("node-filesystem-cleanup (playbooks/node-filesystem.yaml:5): does not match: fstype!~\"tmpfs|ramfs|squashfs\" fails (fstype is \"tmpfs\")"),
        "{out}"
    );
    assert!(
        out.contains("reactor-selftest-ok (playbooks/selftest.yaml:4): would run"),
        "{out}"
    );
    assert!(
        out.contains("       log: self-test for ReactorSelfTestOk aa02"),
        "{out}"
    );
    assert!(
        out.contains("       dry run: ok, output {\"instance\":\"n1\",\"ok\":true}"),
        "{out}"
    );
    assert!(
        out.contains("       dry run: failed (script_threw): script threw: ReactorSelfTestFail always fails (playbooks/selftest.yaml:24)"),
        "{out}"
    );
}

/// `reactor serve` with no config file in a directory laid out like the repository.
#[tokio::test]
async fn serve_runs_on_embedded_defaults_and_runs_reads_history_live_and_stopped() {
    let dir = PlaybookDir::new(&[]);
    let root = dir.root.path();
    for sub in ["playbooks", "scripts"] {
        for entry in std::fs::read_dir(repo().join(sub)).unwrap() {
            let p = entry.unwrap().path();
            std::fs::copy(&p, root.join(sub).join(p.file_name().unwrap())).unwrap();
        }
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut reactor = spawn_binary(&["serve", "--listen", &listen], root);
    wait_healthy(port).await;
    assert!(
        root.join("data").is_dir(),
        "the database lives in ./data by default"
    );
    let client = crate::helpers::client();
    let r = client
        .post(format!("http://{listen}/webhook/alertmanager"))
        .json(&payload(&[
            ("ReactorSelfTestOk", "cli1"),
            ("ReactorSelfTestFail", "cli2"),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let url = format!("http://{listen}");
    let listed = wait_for(Duration::from_secs(10), || async {
        let (_, out, _) = run_binary(&["runs", "--url", &url], root);
        (out.contains("succeeded") && out.contains("failed")).then_some(out)
    })
    .await
    .expect("runs lists both runs");
    assert!(
        listed.contains("reactor-selftest-ok") && listed.contains("reactor-selftest-fail"),
        "{listed}"
    );
    let (_, failed_only, _) = run_binary(&["runs", "--url", &url, "--outcome", "failed"], root);
    assert!(
        !failed_only.contains("reactor-selftest-ok")
            && failed_only.contains("reactor-selftest-fail"),
        "{failed_only}"
    );
    let id = failed_only
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let (code, shown, _) = run_binary(&["runs", "--url", &url, "show", &id], root);
    assert_eq!(code, 0);
    assert!(
        shown.contains("outcome    failed") && shown.contains("always-fails attempt 2: failed"),
        "{shown}"
    );
    assert!(
        shown.contains("escalated  RemediationFailed not_configured"),
        "{shown}"
    );

    assert!(reactor.terminate().success());
    let closed = format!("http://127.0.0.1:{}", free_port());
    let (code, offline, err) = run_binary(&["runs", "--url", &closed, "--outcome", "failed"], root);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        offline, failed_only,
        "the database gives the same answer as the API"
    );
    let (code, shown_offline, _) =
        run_binary(&["runs", "--url", &closed, "show", &id, "--json"], root);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&shown_offline).unwrap();
    assert_eq!(v["id"].as_str(), Some(id.as_str()));
}

#[tokio::test]
async fn the_cli_reaches_a_protected_service_with_a_token_and_says_how_when_it_has_none() {
    const FIRST: &str = "name: first\nmatch: {alertname: First}\nsteps:\n  - {inline: '1'}\n";
    let dir = PlaybookDir::new(&[("playbooks/first.yaml", FIRST)]);
    let port = free_port();
    let config = dir.binary_config(port, "cli-token", "");
    let config = config.to_str().unwrap();
    let listen = format!("localhost:{port}");
    let mut reactor = spawn_binary(
        &["--config", config, "serve", "--listen", &listen],
        dir.path(),
    );
    wait_healthy(port).await;
    let url = format!("http://127.0.0.1:{port}");

    let (code, _, err) = run_binary(&["runs", "--url", &url], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("pass --token or set REACTOR_AUTH_TOKEN"),
        "{err}"
    );
    let (code, _, err) = run_binary(&["runs", "--url", &url, "--token", "cli-token"], dir.path());
    assert_eq!(code, 0, "{err}");

    std::fs::write(
        dir.playbooks().join("second.yaml"),
        FIRST.replace("first", "second").replace("First", "Second"),
    )
    .unwrap();
    let (code, out, err) = run_binary(
        &["reload", "--url", &url, "--token", "cli-token"],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "reloaded: 2 playbook(s) in force");

    let ready: serde_json::Value = crate::helpers::client()
        .get(format!("{url}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["mode"], "live", "{ready}");

    // A run by hand, then the same again in dry run.
    std::fs::write(
        dir.path().join("alert.json"),
        r#"{"labels": {"alertname": "Second", "instance": "web-1"}}"#,
    )
    .unwrap();
    let (code, out, err) = run_binary(
        &[
            "run",
            "second",
            "--alert",
            "alert.json",
            "--by",
            "carol",
            "--url",
            &url,
            "--token",
            "cli-token",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    let id = out.trim().strip_prefix("started run ").unwrap().to_owned();
    let shown = wait_for(Duration::from_secs(10), || async {
        let (_, out, _) = run_binary(
            &["runs", "--url", &url, "--token", "cli-token", "show", &id],
            dir.path(),
        );
        out.contains("outcome    succeeded").then_some(out)
    })
    .await
    .expect("the run by hand succeeds");
    assert!(shown.contains("asked by   carol"), "{shown}");
    let (code, out, err) = run_binary(
        &[
            "runs",
            "--url",
            &url,
            "--token",
            "cli-token",
            "rerun",
            &id,
            "--dry-run",
            "--by",
            "dave",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    let again = out.trim().strip_prefix("started run ").unwrap().to_owned();
    let shown = wait_for(Duration::from_secs(10), || async {
        let (_, out, _) = run_binary(
            &[
                "runs",
                "--url",
                &url,
                "--token",
                "cli-token",
                "show",
                &again,
            ],
            dir.path(),
        );
        out.contains("outcome    succeeded").then_some(out)
    })
    .await
    .expect("the re-run succeeds");
    assert!(
        shown.contains(&format!("asked by   dave, dry run, re-running {id}")),
        "{shown}"
    );

    // A second service on the same data directory says so, instead of sled's lock error.
    let (code, _, err) = run_binary(
        &["--config", config, "serve", "--listen", "127.0.0.1:0"],
        dir.path(),
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("is in use by another process (is reactor already running on this data_dir?)"),
        "{err}"
    );
    reactor.terminate();
}
