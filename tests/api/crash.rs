//! The real binary, killed and stopped: an alert answered with 2xx is never lost.
//!
//! Documented behaviour: after SIGKILL, accepted alerts without a run are processed at the next
//! start; a run that was in progress is recorded as `interrupted` and escalated, not re-run.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{
    free_port, get_runs, payload, spawn_binary, wait_for, wait_healthy, PlaybookDir,
};

const SLOW: &str = "name: slow\nmatch: {alertname: Slow}\nsteps:\n  - name: nap\n    timeout: 10s\n    inline: |\n      sleep(params.ms);\n      \"rested\"\n    params: {ms: 300}\n";

/// The reactor binary serving from `dir` on `port`; `start` (re)starts it with the same arguments
/// and returns once it answers `/healthz`.
struct Served {
    port: u16,
    dir: std::path::PathBuf,
    args: Vec<String>,
}

impl Served {
    fn new(port: u16, dir: &Path) -> Served {
        let path = |p: &str| dir.join(p).display().to_string();
        let args = vec![
            "serve".into(),
            "--config".into(),
            path("reactor.yaml"),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data".into(),
            path("db"),
            "--playbooks".into(),
            path("playbooks"),
            "--scripts".into(),
            path("scripts"),
        ];
        Served {
            port,
            dir: dir.to_owned(),
            args,
        }
    }

    async fn start(&self) -> crate::helpers::Proc {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let proc = spawn_binary(&args, &self.dir);
        wait_healthy(self.port).await;
        proc
    }
}

async fn post(port: u16, body: &Value) -> reqwest::StatusCode {
    crate::helpers::client()
        .post(format!("http://127.0.0.1:{port}/webhook/alertmanager"))
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
}

async fn settled_runs(port: u16, n: usize) -> Vec<Value> {
    let client = crate::helpers::client();
    let url = format!("http://127.0.0.1:{port}/api/v1/runs?limit=1000");
    wait_for(Duration::from_secs(30), || async {
        let runs = get_runs(&client, &url, None).await;
        (runs.len() >= n
            && runs.iter().all(|r| {
                r["outcome"] != "running"
                    && (r["outcome"] != "interrupted" || r["escalation"].is_object())
            }))
        .then_some(runs)
    })
    .await
    .expect("runs settle after restart")
}

#[tokio::test]
async fn sigkill_right_after_the_2xx_loses_no_accepted_alert() {
    let dir = PlaybookDir::new(&[
        ("playbooks/slow.yaml", SLOW),
        ("reactor.yaml", "limits:\n  max_concurrent_runs: 1\n"),
    ]);
    let root = dir.root.path();
    let port = free_port();
    let served = Served::new(port, root);
    let mut reactor = served.start().await;
    let fingerprints: Vec<String> = (0..20).map(|i| format!("f{i:03}")).collect();
    let alerts: Vec<(&str, &str)> = fingerprints.iter().map(|f| ("Slow", f.as_str())).collect();
    assert_eq!(post(port, &payload(&alerts)).await, 202);
    reactor.kill();

    let _restarted = served.start().await;
    let runs = settled_runs(port, 20).await;
    assert_eq!(
        runs.len(),
        20,
        "exactly one run per accepted alert: {runs:#?}"
    );
    let seen: HashSet<&str> = runs
        .iter()
        .map(|r| r["alert"]["fingerprint"].as_str().unwrap())
        .collect();
    assert_eq!(seen.len(), 20);
    let interrupted: Vec<&Value> = runs
        .iter()
        .filter(|r| r["outcome"] == "interrupted")
        .collect();
    assert!(
        interrupted.len() <= 1,
        "only the run in flight can be interrupted: {interrupted:#?}"
    );
    for r in &interrupted {
        assert!(
            r["escalation"].is_object(),
            "interrupted runs are escalated"
        );
    }
    let succeeded = runs.iter().filter(|r| r["outcome"] == "succeeded").count();
    assert_eq!(succeeded + interrupted.len(), 20);
}

#[tokio::test]
async fn sigterm_drains_in_flight_runs_and_exits_zero() {
    let slow = SLOW.replace("{ms: 300}", "{ms: 1500}");
    let dir = PlaybookDir::new(&[("playbooks/slow.yaml", &slow), ("reactor.yaml", "")]);
    let root = dir.root.path();
    let port = free_port();
    let served = Served::new(port, root);
    let mut reactor = served.start().await;
    assert_eq!(post(port, &payload(&[("Slow", "g001")])).await, 202);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = reactor.terminate();
    assert!(status.success(), "exit status {status:?}");

    let _restarted = served.start().await;
    let runs = settled_runs(port, 1).await;
    assert_eq!(
        runs[0]["outcome"], "succeeded",
        "drained, not interrupted: {:#?}",
        runs[0]
    );
}

#[tokio::test]
async fn a_run_of_an_idempotent_playbook_is_re_run_after_sigkill() {
    let slow = SLOW
        .replace(
            "match: {alertname: Slow}",
            "match: {alertname: Slow}\nidempotent: true",
        )
        .replace("{ms: 300}", "{ms: 1500}");
    let dir = PlaybookDir::new(&[("playbooks/slow.yaml", &slow), ("reactor.yaml", "")]);
    let root = dir.root.path();
    let port = free_port();
    let served = Served::new(port, root);
    let mut reactor = served.start().await;
    assert_eq!(post(port, &payload(&[("Slow", "i001")])).await, 202);
    let client = crate::helpers::client();
    let url = format!("http://127.0.0.1:{port}/api/v1/runs");
    wait_for(Duration::from_secs(10), || async {
        let runs = get_runs(&client, &url, None).await;
        (runs.len() == 1 && runs[0]["outcome"] == "running").then_some(())
    })
    .await
    .expect("the run started");
    // Past sled's background flush (200 ms), so the `running` record is on disk when killed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    reactor.kill();

    let _restarted = served.start().await;
    let runs = settled_runs(port, 1).await;
    assert_eq!(runs[0]["outcome"], "succeeded", "{:#?}", runs[0]);
    assert_eq!(
        runs[0]["reason"],
        "re-run after a restart interrupted it (playbook is idempotent)"
    );
}

const MIXED: &str = "name: ok\nmatch: {alertname: Good}\nsteps:\n  - inline: '1'\n---\nname: bad\nmatch: {alertname: Bad}\nsteps:\n  - inline: 'throw \"no\"'\n";

/// A tiny deterministic generator for kill timings (no extra dependency for one test).
fn next(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

/// Posts one unique alert at a time to reactor on `port` until `stop`, pausing `pause_ms` between
/// them: alert `i` is named `name(i)` with fingerprint `{prefix}{i:05}`, and pushed onto `accepted`
/// when answered with 202.
fn stream_alerts(
    port: u16,
    prefix: &'static str,
    name: fn(u32) -> &'static str,
    pause_ms: u64,
    accepted: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = crate::helpers::client();
        let url = format!("http://127.0.0.1:{port}/webhook/alertmanager");
        let mut i = 0u32;
        while !stop.is_cancelled() {
            let fp = format!("{prefix}{i:05}");
            let sent = client.post(&url).json(&payload(&[(name(i), &fp)])).send();
            if let Ok(r) = sent.await {
                if r.status() == 202 {
                    accepted.lock().unwrap().push(fp);
                }
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        }
    })
}

/// Kills `reactor` `kills` times, each after a random pause within `ms` milliseconds, and starts
/// it again each time; returns the last one started.
async fn sigkill_at_random(
    served: &Served,
    mut reactor: crate::helpers::Proc,
    kills: usize,
    ms: std::ops::Range<u64>,
) -> crate::helpers::Proc {
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    for _ in 0..kills {
        let pause = ms.start + next(&mut seed) % (ms.end - ms.start);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        reactor.kill();
        reactor = served.start().await;
    }
    reactor
}

#[tokio::test]
async fn random_sigkills_under_a_stream_lose_nothing_and_page_once() {
    use crate::helpers::{alertmanager_config, Alertmanager, Capture};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    let humans = Capture::start().await;
    let am_port = free_port();
    let port = free_port();
    let listen: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let am = Alertmanager::start(
        am_port,
        &alertmanager_config(listen, "unused", &humans.url()),
    )
    .await;
    let config =
        format!("alertmanager:\n  url: http://127.0.0.1:{am_port}\n  retry_backoff: 100ms\n");
    let dir = PlaybookDir::new(&[("playbooks/mixed.yaml", MIXED), ("reactor.yaml", &config)]);
    let root = dir.root.path();
    let served = Served::new(port, root);
    let reactor = served.start().await;

    // The stream: unique alerts, half of them failing, each remembered when answered with a 2xx.
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let name = |i: u32| if i.is_multiple_of(2) { "Good" } else { "Bad" };
    let sender = stream_alerts(port, "s", name, 5, accepted.clone(), stop.clone());
    let _reactor = sigkill_at_random(&served, reactor, 4, 200..1000).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    sender.await.unwrap();
    let accepted = accepted.lock().unwrap().clone();
    assert!(
        accepted.len() > 50,
        "the stream ran: {} accepted",
        accepted.len()
    );

    let client = crate::helpers::client();
    let url = format!("http://127.0.0.1:{port}/api/v1/runs?limit=10000");
    let runs = wait_for(Duration::from_secs(60), || async {
        let runs = get_runs(&client, &url, None).await;
        let settled = runs.len() >= accepted.len()
            && runs
                .iter()
                .all(|r| r["outcome"] != "running" && r["escalation"]["status"] != "pending");
        settled.then_some(runs)
    })
    .await;
    let Some(runs) = runs else {
        let runs = get_runs(&client, &url, None).await;
        let have: std::collections::HashSet<&str> = runs
            .iter()
            .map(|r| r["alert"]["fingerprint"].as_str().unwrap())
            .collect();
        let missing: Vec<&String> = accepted
            .iter()
            .filter(|f| !have.contains(f.as_str()))
            .collect();
        let stuck: Vec<String> = runs
            .iter()
            .filter(|r| r["outcome"] == "running" || r["escalation"]["status"] == "pending")
            .map(|r| format!("{} {} {}", r["id"], r["outcome"], r["escalation"]))
            .collect();
        let log = std::fs::read_to_string(root.join("reactor.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "not settled: {} runs, {} accepted, missing {missing:?}, stuck {stuck:?}\n{}",
            runs.len(),
            accepted.len(),
            tail.join("\n")
        );
    };

    let mut by_fp: HashMap<&str, Vec<&Value>> = HashMap::new();
    for r in &runs {
        by_fp
            .entry(r["alert"]["fingerprint"].as_str().unwrap())
            .or_default()
            .push(r);
    }
    for fp in &accepted {
        let records = by_fp
            .get(fp.as_str())
            .unwrap_or_else(|| panic!("accepted alert {fp} has no run"));
        assert_eq!(
            records.len(),
            1,
            "{fp} has one run or decision: {records:#?}"
        );
    }
    let paged: Vec<&Value> = runs
        .iter()
        .filter(|r| r["escalation"].is_object())
        .collect();
    assert!(
        paged
            .iter()
            .all(|r| r["escalation"]["status"] == "delivered"),
        "every page delivered"
    );
    let ids: Vec<String> = paged
        .iter()
        .map(|r| r["alert"]["labels"]["id"].as_str().unwrap().to_owned())
        .collect();
    // Every page reaches the humans, and none twice.
    let notified = wait_for(Duration::from_secs(30), || async {
        let mut count: HashMap<String, usize> = HashMap::new();
        for body in humans.received() {
            for a in body["alerts"].as_array().unwrap() {
                if a["status"] == "firing" {
                    *count
                        .entry(a["labels"]["id"].as_str().unwrap_or("").to_owned())
                        .or_default() += 1;
                }
            }
        }
        ids.iter().all(|id| count.contains_key(id)).then_some(count)
    })
    .await
    .expect("every page reached the humans");
    for id in &ids {
        assert_eq!(notified[id], 1, "page for {id} delivered once");
    }
    drop(am);
}

/// Runs that settle inline and page nobody: nothing but the history flusher puts them on disk, so
/// this is where an intake entry removed before its run was durable would show as a lost alert.
#[tokio::test]
async fn sigkills_under_a_stream_of_quiet_successes_lose_no_run() {
    const OK: &str = "name: ok\nmatch: {alertname: Good}\nsteps:\n  - inline: '1'\n";
    let dir = PlaybookDir::new(&[("playbooks/ok.yaml", OK), ("reactor.yaml", "")]);
    let root = dir.root.path();
    let port = free_port();
    let served = Served::new(port, root);
    let reactor = served.start().await;

    let accepted: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let senders: Vec<_> = ["q0", "q1", "q2", "q3"]
        .into_iter()
        .map(|prefix| stream_alerts(port, prefix, |_| "Good", 2, accepted.clone(), stop.clone()))
        .collect();
    let _reactor = sigkill_at_random(&served, reactor, 3, 300..800).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    for s in senders {
        s.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() > 100, "the stream ran: {}", accepted.len());

    let client = crate::helpers::client();
    let url = format!("http://127.0.0.1:{port}/api/v1/runs?limit=10000");
    let settled = wait_for(Duration::from_secs(30), || async {
        let runs = get_runs(&client, &url, None).await;
        (runs.len() >= accepted.len()).then_some(runs)
    })
    .await;
    let runs = match settled {
        Some(runs) => runs,
        None => get_runs(&client, &url, None).await,
    };
    // Alerts recorded but killed before their answer have runs too: more runs than answers is
    // fine, an answered alert without exactly one run is not.
    let fingerprints: Vec<&str> = runs
        .iter()
        .map(|r| r["alert"]["fingerprint"].as_str().unwrap())
        .collect();
    let have: HashSet<&str> = fingerprints.iter().copied().collect();
    assert_eq!(have.len(), fingerprints.len(), "one run per alert");
    let missing: Vec<&String> = accepted
        .iter()
        .filter(|f| !have.contains(f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} accepted alerts have no run: {missing:?}",
        missing.len(),
        accepted.len()
    );
}

const PAIR: &str = "name: first\nmatch: {alertname: Pair}\nsteps:\n  - name: nap\n    timeout: 30s\n    inline: |\n      sleep(20000);\n      \"rested\"\n---\nname: second\nmatch: {alertname: Pair}\nsteps:\n  - name: quick\n    inline: '\"done\"'\n";

#[tokio::test]
async fn a_run_that_never_started_simply_runs_after_a_crash() {
    let dir = PlaybookDir::new(&[("playbooks/pair.yaml", PAIR), ("reactor.yaml", "")]);
    let root = dir.root.path();
    let port = free_port();
    let served = Served::new(port, root);
    let mut reactor = served.start().await;
    assert_eq!(post(port, &payload(&[("Pair", "p001")])).await, 202);
    let client = crate::helpers::client();
    let url = format!("http://127.0.0.1:{port}/api/v1/runs");
    // The first playbook's step is under way (its run is recorded before it may act); the
    // second run, of the same alert, waits its turn.
    wait_for(Duration::from_secs(10), || async {
        let runs = get_runs(&client, &url, None).await;
        runs.iter()
            .any(|r| r["playbook"] == "first" && r["outcome"] == "running")
            .then_some(())
    })
    .await
    .expect("the first run started");
    tokio::time::sleep(Duration::from_millis(500)).await;
    reactor.kill();

    let _restarted = served.start().await;
    let runs = settled_runs(port, 2).await;
    let of = |name: &str| {
        runs.iter()
            .find(|r| r["playbook"] == name)
            .unwrap_or_else(|| panic!("no run of {name}: {runs:#?}"))
    };
    assert_eq!(of("first")["outcome"], "interrupted", "{runs:#?}");
    let second = of("second");
    assert_eq!(second["outcome"], "succeeded", "{second:#?}");
    assert!(
        second["escalation"].is_null(),
        "nobody is paged for a run that never started: {second:#?}"
    );
}

/// The binary with its files limited to `max_file_bytes` (as a full disk would), writes past it
/// failing with EFBIG instead of killing it (SIGXFSZ ignored, which `exec` keeps).
fn spawn_with_file_limit(served: &Served, max_file_bytes: u64) -> crate::helpers::Proc {
    let log = std::fs::File::create(served.dir.join("reactor.log")).unwrap();
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; exec prlimit --fsize={max_file_bytes} -- \"$0\" \"$@\""
        ))
        .arg(env!("CARGO_BIN_EXE_reactor"))
        .args(&served.args)
        .current_dir(&served.dir)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("reactor starts under prlimit");
    crate::helpers::Proc { child }
}

#[tokio::test]
async fn a_full_disk_fails_liveness_and_a_restart_processes_what_was_accepted() {
    let quick = "name: quick\nmatch: {alertname: Fill}\nsteps:\n  - inline: '\"ok\"'\n";
    let dir = PlaybookDir::new(&[("playbooks/quick.yaml", quick), ("reactor.yaml", "")]);
    let root = dir.root.path();
    let port = free_port();
    let served = Served::new(port, root);
    let mut reactor = spawn_with_file_limit(&served, 4 << 20);
    wait_healthy(port).await;
    let client = crate::helpers::client();
    let health = |path: &'static str| {
        let client = client.clone();
        async move {
            client
                .get(format!("http://127.0.0.1:{port}{path}"))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    // Alerts with large annotations until the database's files reach the limit.
    let big = "x".repeat(8_000);
    let mut accepted = 0;
    let mut refused = None;
    for batch in 0..400 {
        let fingerprints: Vec<String> = (0..20).map(|i| format!("f{batch:03}x{i:02}")).collect();
        let alerts: Vec<(&str, &str)> = fingerprints.iter().map(|f| ("Fill", f.as_str())).collect();
        let mut body = payload(&alerts);
        for a in body["alerts"].as_array_mut().unwrap() {
            a["annotations"]["filler"] = big.clone().into();
        }
        let status = post(port, &body).await;
        if status == 202 {
            accepted += 20;
        } else {
            refused = Some(status);
            break;
        }
    }
    assert_eq!(
        refused,
        Some(reqwest::StatusCode::INTERNAL_SERVER_ERROR),
        "the disk filled after {accepted} alerts"
    );
    assert!(accepted > 0);
    // The database failed for good: liveness says so, so Kubernetes would restart reactor.
    let failed = wait_for(Duration::from_secs(10), || async {
        (health("/healthz").await == 503).then_some(())
    })
    .await;
    assert!(
        failed.is_some(),
        "/healthz still answers 200 with a dead database"
    );
    assert_eq!(health("/readyz").await, 503);
    reactor.kill();

    // Space is back (no limit): a restart serves again and every accepted alert gets its run.
    let _restarted = served.start().await;
    assert_eq!(health("/healthz").await, 200);
    let runs = settled_runs(port, accepted).await;
    let fingerprints: HashSet<&str> = runs
        .iter()
        .map(|r| r["alert"]["fingerprint"].as_str().unwrap())
        .collect();
    assert!(
        fingerprints.len() >= accepted,
        "{} runs for {accepted} accepted alerts",
        fingerprints.len()
    );
}
