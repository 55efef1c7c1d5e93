//! A broken reactor pages too, checked with the real Alertmanager and Prometheus and the shipped
//! configuration files: the heartbeat's inhibition fails open when reactor is SIGKILLed, the
//! shipped `ReactorDown` rule fires, a failing self-check raises and resolves `ReactorUnhealthy`,
//! and the shipped rules, Alertmanager config and docker-compose stack are valid and agree.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{
    client, free_port, get_runs, repo, shipped_alertmanager_config, spawn_binary, wait_for,
    wait_healthy, Alertmanager, Capture, PlaybookDir, Prometheus, TestApp,
};

const TOKEN: &str = "watchdog-token";

fn run_tool(program: &str, args: &[&str], cwd: &Path) {
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shipped_rules_and_alertmanager_config_pass_promtool_and_amtool() {
    let prom = repo().join("deploy/prometheus");
    run_tool(
        "promtool",
        &["check", "rules", "reactor-rules.yml", "demo-rules.yml"],
        &prom,
    );
    run_tool(
        "promtool",
        &["test", "rules", "reactor-rules.test.yml"],
        &prom,
    );
    run_tool("promtool", &["check", "config", "prometheus.yml"], &prom);
    let am = repo().join("deploy/alertmanager");
    run_tool("amtool", &["check-config", "alertmanager.yml"], &am);
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap()
}

/// The Dockerfile's `COPY`s from the build context (not `--from` another stage), as
/// (stage, sources, destination); stage 0 is the first `FROM`.
fn dockerfile_copies() -> Vec<(usize, Vec<String>, String)> {
    let mut stage = None::<usize>;
    let mut copies = Vec::new();
    for line in read("Dockerfile").lines() {
        if line.starts_with("FROM ") {
            stage = Some(stage.map_or(0, |s| s + 1));
        }
        let Some(rest) = line
            .strip_prefix("COPY ")
            .filter(|r| !r.starts_with("--from"))
        else {
            continue;
        };
        let mut parts: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
        let dest = parts.pop().expect("COPY names a destination");
        copies.push((stage.expect("COPY after FROM"), parts, dest));
    }
    copies
}

/// The image's build stage sees only what the Dockerfile copies into it. Cargo must be able to read
/// the manifest from that alone: a target Cargo.toml declares (the micro-benchmarks, say) whose
/// source is not copied stops `cargo build` before it compiles anything.
#[test]
fn docker_build_stage_has_everything_cargo_reads() {
    fn copy(from: &Path, to: &Path) {
        if from.is_dir() {
            std::fs::create_dir_all(to).unwrap();
            for entry in std::fs::read_dir(from).unwrap() {
                let entry = entry.unwrap();
                copy(&entry.path(), &to.join(entry.file_name()));
            }
        } else {
            std::fs::copy(from, to).unwrap();
        }
    }
    let context = tempfile::tempdir().unwrap();
    for (_, sources, dest) in dockerfile_copies()
        .into_iter()
        .filter(|(stage, ..)| *stage == 0)
    {
        for src in &sources {
            let to = if dest.ends_with('/') {
                context.path().join(&dest).join(src)
            } else {
                context.path().join(&dest)
            };
            copy(&repo().join(src), &to);
        }
    }
    // Offline and for this platform only: the packages a build here already downloaded.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let version = Command::new(&cargo).arg("-vV").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout);
    let host = version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("cargo -vV names the host");
    run_tool(
        &cargo,
        &["fetch", "--offline", "--locked", "--target", host],
        context.path(),
    );
}

/// No Docker engine runs here, so the stack is checked by construction: every file it mounts or
/// copies exists, and every host, port, URL and token agrees across the configs.
#[test]
fn docker_compose_stack_is_consistent() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_object().unwrap();
    for name in ["reactor", "alertmanager", "prometheus", "demo", "humans"] {
        assert!(services.contains_key(name), "service {name} is missing");
    }
    for (name, svc) in services {
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let src = v.as_str().unwrap().split(':').next().unwrap();
            if src.starts_with("./") {
                assert!(
                    repo().join(src).exists(),
                    "{name} mounts {src}, which does not exist"
                );
            }
        }
    }
    assert_eq!(services["reactor"]["build"], ".");
    for (_, sources, _) in dockerfile_copies() {
        for src in sources {
            assert!(
                repo().join(&src).exists(),
                "Dockerfile copies missing {src}"
            );
        }
    }

    // reactor's own settings load, listen where the others look, and use the compose token.
    let settings = reactor::config::Settings::load(
        Some(&repo().join("deploy/reactor/reactor.yaml")),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(settings.listen.port(), 9097);
    assert_eq!(
        settings.alertmanager.url.as_deref(),
        Some("http://alertmanager:9093")
    );
    let token = services["reactor"]["environment"]["REACTOR_AUTH_TOKEN"]
        .as_str()
        .unwrap();
    for file in [
        "deploy/alertmanager/reactor-token",
        "deploy/prometheus/reactor-token",
    ] {
        assert_eq!(
            read(file).trim(),
            token,
            "{file} differs from the compose token"
        );
    }
    assert!(services["reactor"]["ports"][0]
        .as_str()
        .unwrap()
        .ends_with(":9097"));
    assert_eq!(
        services["reactor"]["volumes"][0],
        "./deploy/reactor/reactor.yaml:/etc/reactor/reactor.yaml:ro"
    );
    assert!(read("Dockerfile").contains("/etc/reactor/reactor.yaml"));

    // Alertmanager: listens on 9093 (its default), sends to reactor and the humans' stand-in.
    let am = read("deploy/alertmanager/alertmanager.yml");
    assert!(am.contains("url: http://reactor:9097/webhook/alertmanager"));
    let humans_port = services["humans"]["environment"]["HTTP_PORT"]
        .as_str()
        .unwrap();
    assert!(am.contains(&format!("url: http://humans:{humans_port}/")));
    assert!(services["alertmanager"]["ports"][0]
        .as_str()
        .unwrap()
        .ends_with(":9093"));

    // Prometheus: scrapes reactor and the demo where they listen, alerts to Alertmanager.
    let prom = yaml("deploy/prometheus/prometheus.yml");
    let targets: Vec<&str> = prom["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["static_configs"][0]["targets"].as_array().unwrap())
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(targets, ["reactor:9097", "demo:8000"]);
    let demo_cmd = services["demo"]["command"].as_array().unwrap();
    assert!(demo_cmd.iter().any(|a| a == "8000"));
    assert_eq!(
        prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0],
        "alertmanager:9093"
    );
    // The demo's metrics make both demo alerts fire, and playbooks exist for both.
    let metrics = read("deploy/demo/www/metrics");
    assert!(metrics.contains("demo_disk_used_ratio{mountpoint=\"/var/log/demo\"} 0.97"));
    assert!(metrics.contains("demo_worker_wedged{worker=\"demo-worker-1\"} 1"));
    let demo = read("playbooks/demo.yaml");
    assert!(demo.contains("alertname: DemoDiskFilling"));
    assert!(demo.contains("alertname: DemoWorkerWedged"));
}

fn prometheus_config(reactor_port: u16, am_port: u16) -> String {
    format!(
        r#"global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
alerting:
  alertmanagers:
    - static_configs:
        - targets: ['127.0.0.1:{am_port}']
scrape_configs:
  - job_name: reactor
    authorization:
      credentials: {TOKEN}
    static_configs:
      - targets: ['127.0.0.1:{reactor_port}']
"#,
        rules = repo().join("deploy/prometheus/reactor-rules.yml").display()
    )
}

const DISK_PLAYBOOK: &str = r#"name: disk-cleanup
match:
  alertname: DiskFull
steps:
  - name: clean
    inline: |
      log("cleaning " + alert.labels.instance);
"#;

fn alert_firing_for_an_hour(name: &str) -> Value {
    let now = jiff::Timestamp::now();
    json!([{
        "labels": {"alertname": name, "remediation": "auto", "instance": "node-1", "severity": "warning"},
        "annotations": {"summary": "disk almost full"},
        "startsAt": now.to_string(),
        "endsAt": (now + jiff::SignedDuration::from_hours(1)).to_string(),
    }])
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_reactor_lifts_the_inhibition_and_reactor_down_fires() {
    let humans = Capture::start().await;
    let dir = PlaybookDir::new(&[("playbooks/disk.yaml", DISK_PLAYBOOK)]);
    let port = free_port();
    let am_port = free_port();
    let am = Alertmanager::start(
        am_port,
        &shipped_alertmanager_config(
            format!("127.0.0.1:{port}").parse().unwrap(),
            TOKEN,
            &humans.url(),
        ),
    )
    .await;
    let config = dir.binary_config(
        port,
        TOKEN,
        &format!("alertmanager:\n  url: http://127.0.0.1:{am_port}\n  poll_interval: 1s\n"),
    );
    let mut reactor = spawn_binary(&["--config", config.to_str().unwrap(), "serve"], dir.path());
    wait_healthy(port).await;
    let prometheus = Prometheus::start(&prometheus_config(port, am_port)).await;

    // The heartbeat is alive in Alertmanager, so the humans' copy of DiskFull is held back.
    wait_for(Duration::from_secs(20), || async {
        let beats = am.alerts("alertname=\"ReactorHeartbeat\"").await;
        (!beats.is_empty()).then_some(())
    })
    .await
    .expect("reactor posts its heartbeat");
    let posted = Instant::now();
    am.post_alerts(&alert_firing_for_an_hour("DiskFull")).await;

    // reactor reads the held alert from Alertmanager's API and remediates it.
    let url = format!("http://127.0.0.1:{port}/api/v1/runs?alertname=DiskFull");
    let runs = wait_for(Duration::from_secs(30), || async {
        let runs = get_runs(&client(), &url, Some(TOKEN)).await;
        Some(runs).filter(|r| r.iter().any(|r| r["outcome"] == "succeeded"))
    })
    .await
    .unwrap_or_else(|| {
        let log = std::fs::read_to_string(dir.path().join("reactor.log")).unwrap_or_default();
        panic!("reactor did not remediate the held alert:\n{log}")
    });
    assert_eq!(runs.len(), 1, "one run: {runs:?}");
    let held = am.alerts("alertname=\"DiskFull\"").await;
    assert_eq!(
        held[0]["status"]["state"], "suppressed",
        "Alertmanager holds DiskFull back: {held:?}"
    );
    // Past the humans' group_wait (10s) and a group_interval: still nothing for the humans.
    tokio::time::sleep(Duration::from_secs(21).saturating_sub(posted.elapsed())).await;
    assert!(
        humans.notifications("DiskFull").is_empty(),
        "the humans' copy is inhibited while reactor is alive"
    );

    reactor.kill();
    let killed = Instant::now();
    let notes = humans
        .wait_for_notification("DiskFull", Duration::from_secs(60))
        .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let original = &notes[0]["alerts"][0];
    assert_eq!(original["status"], "firing");
    assert_eq!(original["labels"]["remediation"], "auto");
    assert_eq!(original["labels"]["instance"], "node-1");
    eprintln!("humans got DiskFull {took:?} after SIGKILL");

    // The shipped ReactorDown rule (for: 1m) fires in Prometheus and reaches the humans.
    let down = humans
        .wait_for_notification("ReactorDown", Duration::from_secs(120))
        .await;
    assert_eq!(down[0]["alerts"][0]["labels"]["severity"], "critical");
    let firing = prometheus.alerts().await;
    assert!(
        firing
            .iter()
            .any(|a| a["labels"]["alertname"] == "ReactorDown" && a["state"] == "firing"),
        "{firing:?}"
    );
    eprintln!(
        "ReactorDown reached the humans {:?} after SIGKILL",
        killed.elapsed()
    );
}

const WEDGE_PLAYBOOK: &str = r#"name: wedge
match:
  alertname: Wedge
steps:
  - name: hang
    timeout: 6s
    inline: |
      loop { sleep(200); }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_self_check_pages_reactor_unhealthy_and_resolves_it() {
    let humans = Capture::start().await;
    let dir = PlaybookDir::new(&[("playbooks/wedge.yaml", WEDGE_PLAYBOOK)]);
    let am_port = free_port();
    let reactor = TestApp::spawn(|s| {
        s.playbooks_dir = dir.playbooks();
        s.scripts_dir = dir.scripts();
        s.alertmanager.url = Some(format!("http://127.0.0.1:{am_port}"));
        s.limits.max_concurrent_runs = 1;
        s.watchdog.heartbeat_interval = Duration::from_secs(1);
        s.watchdog.stall_after = Duration::from_secs(2);
    })
    .await;
    let _am = Alertmanager::start(
        am_port,
        &shipped_alertmanager_config(reactor.addr, TOKEN, &humans.url()),
    )
    .await;
    let ready = client().get(reactor.url("/readyz")).send().await.unwrap();
    let status = ready.status();
    let detail: Value = ready.json().await.unwrap();
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["ready"], true);

    // One worker, busy for 6 s with the first alert: the second waits and the dispatcher check fails.
    let body = crate::helpers::payload(&[("Wedge", "aaa1"), ("Wedge", "bbb2")]);
    assert_eq!(reactor.post_webhook(&body).await.status(), 202);
    let pages = humans
        .wait_for_notification("ReactorUnhealthy", Duration::from_secs(20))
        .await;
    let page = &pages[0]["alerts"][0];
    assert_eq!(page["status"], "firing");
    assert_eq!(page["labels"]["check"], "dispatcher");
    assert_eq!(page["labels"]["severity"], "critical");
    let r = client().get(reactor.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let detail: Value = r.json().await.unwrap();
    assert_eq!(detail["checks"]["dispatcher"]["ok"], false, "{detail}");

    // The first run times out, the second starts: the check passes and the page resolves.
    let resolved = wait_for(Duration::from_secs(40), || async {
        humans
            .notifications("ReactorUnhealthy")
            .into_iter()
            .find(|n| n["status"] == "resolved")
    })
    .await
    .expect("ReactorUnhealthy is resolved after recovery");
    assert_eq!(resolved["alerts"][0]["labels"]["check"], "dispatcher");
    reactor.stop().await;
}

#[tokio::test]
async fn metrics_show_every_series_with_values_after_a_scripted_sequence() {
    let am = Capture::start().await;
    let app = TestApp::spawn(|s| {
        s.alertmanager.url = Some(am.url());
        s.watchdog.heartbeat_interval = Duration::from_millis(200);
    })
    .await;
    // 2 succeeding runs, 1 failing run (paged), 1 repeat delivery, 1 alert without a playbook.
    let body = crate::helpers::payload(&[
        ("ReactorSelfTestOk", "0k1"),
        ("ReactorSelfTestOk", "0k2"),
        ("ReactorSelfTestFail", "fa1"),
        ("NoSuchPlaybook", "n01"),
    ]);
    assert_eq!(app.post_webhook(&body).await.status(), 202);
    let repeat = crate::helpers::payload(&[("ReactorSelfTestOk", "0k1")]);
    assert_eq!(app.post_webhook(&repeat).await.status(), 202);
    app.wait_for_runs("", Duration::from_secs(20), |runs| {
        runs.len() == 5 && runs.iter().all(|r| r["outcome"] != "running")
    })
    .await;
    wait_for(Duration::from_secs(10), || async {
        am.received()
            .iter()
            .flat_map(|b| b.as_array().cloned().unwrap_or_default())
            .find(|a| a["labels"]["alertname"] == "RemediationFailed")
    })
    .await
    .expect("the page is posted");

    let text = wait_for(Duration::from_secs(10), || async {
        let text = app
            .client
            .get(app.url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        Some(text).filter(|t| {
            t.contains("reactor_escalations_total{result=\"delivered\"} 1")
                && t.contains("reactor_heartbeats_total{result=\"ok\"}")
        })
    })
    .await
    .expect("the page and a heartbeat are delivered");
    for series in [
        "reactor_alerts_received_total{status=\"firing\"} 5",
        "reactor_runs_total{playbook=\"reactor-selftest-ok\",outcome=\"succeeded\"} 2",
        "reactor_runs_total{playbook=\"reactor-selftest-fail\",outcome=\"failed\"} 1",
        "reactor_runs_total{playbook=\"reactor-selftest-ok\",outcome=\"deduplicated\"} 1",
        "reactor_runs_total{playbook=\"-\",outcome=\"skipped\"} 1",
        "reactor_deduplicated_deliveries_total{status=\"firing\"} 1",
        // selftest-ok: 1 step × 2 runs; selftest-fail: 2 attempts.
        "reactor_step_duration_seconds_count{playbook=\"reactor-selftest-ok\"} 2",
        "reactor_step_duration_seconds_count{playbook=\"reactor-selftest-fail\"} 2",
        "reactor_queue_depth 0",
        "reactor_in_flight_runs 0",
        "reactor_escalations_total{result=\"delivered\"} 1",
        "reactor_escalations_pending 0",
        "reactor_self_check_failing{check=\"dispatcher\"} 0",
        "reactor_self_check_failing{check=\"storage\"} 0",
        "reactor_store_errors_total 0",
        "reactor_build_info{version=\"",
        "reactor_heartbeat_age_seconds ",
    ] {
        assert!(text.contains(series), "missing {series:?} in:\n{text}");
    }
    let age: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("reactor_heartbeat_age_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(age < 5.0, "heartbeat age {age}");
    app.stop().await;
}
