//! Pages that must get through when something is broken: PagerDuty down across a SIGKILL of
//! reactor, email through a real SMTP server, Alertmanager stopped, the dead man's switch gone
//! quiet; and the configuration's channel errors and secrets as `reactor check` shows them.

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use crate::channels::{secret_file, start, wait_accepted};
use crate::helpers::{
    free_port, get_runs, payload, run_binary, spawn_binary, wait_for, wait_healthy, Alertmanager,
    PlaybookDir, Proc,
};
use crate::services::{Service, PD_ROUTING_KEY};

const FAILS: &str = "name: always-fails\nmatch:\n  alertname: DiskFull\nsteps:\n  - name: clean\n    inline: 'throw \"disk still full\"'\n";

async fn post(port: u16, body: &Value) -> u16 {
    crate::helpers::client()
        .post(format!("http://127.0.0.1:{port}/webhook/alertmanager"))
        .bearer_auth("tok")
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn pagerduty_down_then_up_gets_the_page_exactly_once_across_a_sigkill() {
    let pd = Service::pagerduty().await;
    pd.seen.fail(500, u32::MAX);
    let books = PlaybookDir::new(&[("playbooks/fails.yaml", FAILS)]);
    secret_file(books.path(), "pd.key", PD_ROUTING_KEY);
    let port = free_port();
    let config = books.binary_config(
        port,
        "tok",
        &format!(
            "channels:\n  pd:\n    type: pagerduty\n    url: {}\n    routing_key_file: {}/pd.key\nroute:\n  to: [pd]\n",
            pd.url(),
            books.path().display()
        ),
    );
    let args = ["--config", config.to_str().unwrap(), "serve"];
    let mut reactor = spawn_binary(&args, books.path());
    wait_healthy(port).await;
    assert_eq!(
        post(port, &payload(&[("DiskFull", "b1b2c3d4e5f60001")])).await,
        202
    );
    let outage = std::time::Instant::now();
    wait_for(Duration::from_secs(20), || async {
        (pd.seen.requests.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await
    .expect("reactor tries PagerDuty while it answers 500");

    reactor.kill();
    let before = pd.seen.requests.load(Ordering::SeqCst);
    let _reactor = spawn_binary(&args, books.path());
    wait_healthy(port).await;
    wait_for(Duration::from_secs(30), || async {
        (pd.seen.requests.load(Ordering::SeqCst) > before).then_some(())
    })
    .await
    .expect("the restarted reactor goes on trying");
    assert!(pd.seen.accepted().is_empty());

    // PagerDuty answers 500 for a minute in all.
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(outage.elapsed())).await;
    assert!(pd.seen.accepted().is_empty());
    pd.seen.recover();
    wait_for(Duration::from_secs(90), || async {
        (!pd.seen.accepted().is_empty()).then_some(())
    })
    .await
    .expect("the page arrives once PagerDuty is back");
    assert!(outage.elapsed() >= Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let accepted = pd.seen.accepted();
    assert_eq!(accepted.len(), 1, "exactly one page: {accepted:?}");
    assert_eq!(accepted[0]["event_action"], "trigger");

    let runs = get_runs(
        &crate::helpers::client(),
        &format!("http://127.0.0.1:{port}/api/v1/runs"),
        Some("tok"),
    )
    .await;
    let n = &runs[0]["notifications"][0];
    assert_eq!(n["state"], "delivered", "{n}");
    assert!(n["attempts"].as_u64().unwrap() >= 1);
    let log = std::fs::read_to_string(books.path().join("reactor.log")).unwrap();
    assert!(log.contains("notification not delivered yet"), "{log}");
    assert!(
        !log.contains(PD_ROUTING_KEY),
        "the routing key is in the log"
    );
    assert!(!serde_json::to_string(&runs)
        .unwrap()
        .contains(PD_ROUTING_KEY));
}

/// The real SMTP server from Debian's `python3-aiosmtpd`, delivering into a Maildir.
pub struct Smtp {
    pub port: u16,
    maildir: tempfile::TempDir,
    _proc: Proc,
}

impl Smtp {
    pub async fn start() -> Smtp {
        Smtp::start_with(&[]).await
    }

    /// With extra arguments (`--tlscert`, `--tlskey`: STARTTLS required).
    async fn start_with(extra: &[&str]) -> Smtp {
        let port = free_port();
        let maildir = tempfile::tempdir().unwrap();
        let child = Command::new("/usr/bin/python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(extra)
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(maildir.path().join("mail"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3-aiosmtpd is installed (scripts/test.sh installs it)");
        let proc = Proc { child };
        wait_for(Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(drop)
        })
        .await
        .expect("the SMTP server listens");
        Smtp {
            port,
            maildir,
            _proc: proc,
        }
    }

    pub fn messages(&self) -> Vec<String> {
        let dir = self.maildir.path().join("mail/new");
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[tokio::test]
async fn email_goes_through_a_real_smtp_server_with_text_and_html_and_the_run_link() {
    let smtp = Smtp::start().await;
    let setup = start(
        &[],
        &[],
        &format!(
            "mail:\n  type: email\n  smarthost: 127.0.0.1:{}\n  tls: none\n  from: reactor@example.com\n  to: [oncall@example.com]\n",
            smtp.port
        ),
        |_| {},
    )
    .await;
    let app = &setup.app;
    app.post_webhook(&payload(&[("DiskFull", "c1b2c3d4e5f60001")]))
        .await;
    let mail = wait_for(Duration::from_secs(20), || async { smtp.messages().pop() })
        .await
        .expect("a message is delivered");
    assert!(
        mail.contains("Subject: [reactor] Remediation always-fails failed"),
        "{mail}"
    );
    assert!(mail.contains("To: oncall@example.com"), "{mail}");
    assert!(mail.contains("multipart/alternative"), "{mail}");
    assert!(
        mail.contains("text/plain") && mail.contains("text/html"),
        "{mail}"
    );
    assert!(mail.contains("disk still full"), "{mail}");
    assert!(mail.contains("/api/v1/runs/"), "the run link: {mail}");
    app.wait_for_runs("?playbook=always-fails", Duration::from_secs(10), |r| {
        r.first()
            .is_some_and(|run| run["notifications"][0]["state"] == "delivered")
    })
    .await;
    setup.app.stop().await;
}

fn hook_channel(hook: &Service) -> String {
    format!(
        "hook:\n  type: webhook\n  url: {}/hook\n  bearer_token_file: {{dir}}/hook.token\n",
        hook.url()
    )
}

/// A certificate authority and a certificate for `localhost` it signed, made with openssl in
/// `dir`: (ca.pem, leaf.pem, leaf.key).
fn certificates(dir: &std::path::Path) -> (String, String, String) {
    let path = |name: &str| dir.join(name).display().to_string();
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &path("ca.key"),
            "-out",
            &path("ca.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=reactor test CA",
        ],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &path("leaf.key"),
            "-out",
            &path("leaf.csr"),
            "-subj",
            "/CN=localhost",
        ],
        &[
            "x509",
            "-req",
            "-in",
            &path("leaf.csr"),
            "-CA",
            &path("ca.pem"),
            "-CAkey",
            &path("ca.key"),
            "-CAcreateserial",
            "-out",
            &path("leaf.pem"),
            "-days",
            "1",
            "-extfile",
            &path("leaf.ext"),
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (path("ca.pem"), path("leaf.pem"), path("leaf.key"))
}

#[tokio::test]
async fn email_over_starttls_verifies_the_server_against_the_configured_ca() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(certs.path());
    let smtp = Smtp::start_with(&["--tlscert", &cert, "--tlskey", &key]).await;
    let mail = |name: &str, ca: &str| {
        format!(
            "{name}:\n  type: email\n  smarthost: localhost:{}\n  tls: starttls\n{ca}  from: reactor@example.com\n  to: [oncall@example.com]\n",
            smtp.port
        )
    };
    let yaml = format!(
        "{}{}",
        mail("trusted", &format!("  ca_file: {ca}\n")),
        mail("untrusted", "")
    );
    let setup = start(&[], &[], &yaml, |_| {}).await;
    let app = &setup.app;
    app.post_webhook(&payload(&[("DiskFull", "c1b2c3d4e5f60002")]))
        .await;
    let runs = app
        .wait_for_runs("?playbook=always-fails", Duration::from_secs(20), |r| {
            r.first().is_some_and(|run| {
                let n = run["notifications"].as_array().cloned().unwrap_or_default();
                n.iter()
                    .any(|x| x["channel"] == "trusted" && x["state"] == "delivered")
                    && n.iter()
                        .any(|x| x["channel"] == "untrusted" && x["attempts"].as_u64() >= Some(1))
            })
        })
        .await;
    let untrusted = runs[0]["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["channel"] == "untrusted")
        .unwrap()
        .clone();
    assert_eq!(
        untrusted["state"], "pending",
        "a server reactor cannot verify gets no page: {untrusted}"
    );
    let error = untrusted["lastError"].as_str().unwrap_or_default();
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    let delivered = wait_for(Duration::from_secs(10), || async { smtp.messages().pop() })
        .await
        .expect("the trusted channel's message arrived over TLS");
    assert!(delivered.contains("disk still full"), "{delivered}");
    assert_eq!(
        smtp.messages().len(),
        1,
        "only the verified server got the page"
    );
    setup.app.stop().await;
}

const NULL_ROUTE: &str = "route:\n  receiver: 'null'\nreceivers:\n  - name: 'null'\n";

#[tokio::test]
async fn alertmanager_stopped_pages_the_watchdog_channel_once_and_resolves_when_it_is_back() {
    let am_port = free_port();
    let am = Alertmanager::start(am_port, NULL_ROUTE).await;
    let hook = Service::webhook().await;
    let url = am.url();
    let setup = start(
        &[],
        &[("hook.token", "hook-token")],
        &hook_channel(&hook),
        |s| {
            s.alertmanager.url = Some(url);
            s.alertmanager.timeout = Duration::from_millis(500);
            s.watchdog.heartbeat_interval = Duration::from_millis(200);
            s.watchdog.alertmanager_down_after = Duration::from_secs(1);
            s.watchdog.channels = vec!["hook".into()];
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        hook.seen.accepted().is_empty(),
        "Alertmanager is up: no page"
    );

    drop(am);
    let stopped = std::time::Instant::now();
    let posts = wait_accepted(&hook, 1, Duration::from_secs(20)).await;
    // alertmanager_down_after + one heartbeat, with room for the stand-in's delivery.
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(posts[0]["status"], "firing");
    assert_eq!(
        posts[0]["alerts"][0]["labels"]["check"],
        "alertmanager_down"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        hook.seen.accepted().len(),
        1,
        "paged once, not every heartbeat"
    );

    let _am = Alertmanager::start(am_port, NULL_ROUTE).await;
    let posts = wait_accepted(&hook, 2, Duration::from_secs(20)).await;
    assert_eq!(posts[1]["status"], "resolved");
    assert_eq!(posts[1]["groupKey"], posts[0]["groupKey"]);
    setup.app.stop().await;
}

#[tokio::test]
async fn the_dead_mans_switch_pages_when_its_alert_stops_and_resolves_when_it_returns() {
    let hook = Service::webhook().await;
    let setup = start(
        &[],
        &[("hook.token", "hook-token")],
        &hook_channel(&hook),
        |s| {
            s.watchdog.heartbeat_interval = Duration::from_millis(200);
            s.watchdog.channels = vec!["hook".into()];
            s.deadman.alertname = Some("Watchdog".into());
            s.deadman.after = Duration::from_millis(1500);
        },
    )
    .await;
    let app = &setup.app;
    let watchdog = payload(&[("Watchdog", "d1b2c3d4e5f60001")]);
    for _ in 0..10 {
        app.post_webhook(&watchdog).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        hook.seen.accepted().is_empty(),
        "the switch's alert arrives: no page"
    );

    let posts = wait_accepted(&hook, 1, Duration::from_secs(20)).await;
    assert_eq!(posts[0]["alerts"][0]["labels"]["check"], "deadman");
    assert_eq!(posts[0]["status"], "firing");

    app.post_webhook(&watchdog).await;
    let posts = wait_accepted(&hook, 2, Duration::from_secs(20)).await;
    assert_eq!(posts[1]["status"], "resolved");
    setup.app.stop().await;
}

#[test]
fn check_names_unknown_channels_at_their_lines_and_never_prints_a_secret() {
    let books = PlaybookDir::new(&[(
        "playbooks/fails.yaml",
        "name: always-fails\nmatch:\n  alertname: DiskFull\nescalate:\n  to: [pd, nosuch]\nsteps:\n  - inline: '1'\n",
    )]);
    let config = books.path().join("reactor.yaml");
    std::fs::write(
        &config,
        "channels:\n  pd:\n    type: pagerduty\n    routing_key_env: PD_KEY_FOR_TEST\nroute:\n  to: [pd]\n",
    )
    .unwrap();
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_reactor"))
            .args(["--config", config.to_str().unwrap(), "check", "playbooks"])
            .current_dir(books.path())
            .env("PD_KEY_FOR_TEST", PD_ROUTING_KEY)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run();
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("fails.yaml:5:") && err.contains("unknown channel \"nosuch\""),
        "{err}"
    );
    assert!(!out.contains(PD_ROUTING_KEY) && !err.contains(PD_ROUTING_KEY));

    std::fs::write(
        &config,
        "channels:\n  pd:\n    type: pagerduty\n    routing_key_env: PD_KEY_FOR_TEST\nroute:\n  to: [pd, pagerdty]\n",
    )
    .unwrap();
    let (code, out, err) = run();
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains("reactor.yaml:6:") && err.contains("route.to: unknown channel \"pagerdty\""),
        "{err}"
    );

    std::fs::write(
        books.path().join("playbooks/fails.yaml"),
        "name: always-fails\nmatch:\n  alertname: DiskFull\nescalate:\n  to: [pd]\nsteps:\n  - inline: '1'\n",
    )
    .unwrap();
    std::fs::write(
        &config,
        "channels:\n  pd:\n    type: pagerduty\n    routing_key_env: PD_KEY_FOR_TEST\n",
    )
    .unwrap();
    let (code, out, err) = run();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("channels: alertmanager, pd"), "{out}");
    assert!(!out.contains(PD_ROUTING_KEY) && !err.contains(PD_ROUTING_KEY));
    let (code, out, _) = run_binary(
        &["--config", config.to_str().unwrap(), "channels"],
        books.path(),
    );
    // PD_KEY_FOR_TEST is not set for run_binary: the configuration is refused, naming the variable.
    assert_eq!(code, 2);
    assert!(!out.contains(PD_ROUTING_KEY));
}

/// Multi-threaded: the stand-in answers while the binary runs on this thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_test_sends_a_labelled_test_notification_and_prints_the_answer() {
    let pd = Service::pagerduty().await;
    let books = PlaybookDir::new(&[]);
    secret_file(books.path(), "pd.key", PD_ROUTING_KEY);
    let config = books.binary_config(
        free_port(),
        "tok",
        &format!(
            "channels:\n  pd:\n    type: pagerduty\n    url: {}\n    routing_key_file: {}/pd.key\n",
            pd.url(),
            books.path().display()
        ),
    );
    let args = [
        "--config",
        config.to_str().unwrap(),
        "channels",
        "test",
        "pd",
    ];
    let (code, out, err) = run_binary(&args, books.path());
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ok: pd (pagerduty) accepted the test notification"),
        "{out}"
    );
    assert!(
        out.contains("ok: pd (pagerduty) accepted its resolution"),
        "{out}"
    );
    let sent = pd.seen.accepted();
    assert_eq!(
        sent.len(),
        2,
        "the test page, then its resolution: {sent:?}"
    );
    assert_eq!(sent[1]["event_action"], "resolve");
    assert_eq!(sent[1]["dedup_key"], sent[0]["dedup_key"]);
    let summary = sent[0]["payload"]["summary"].as_str().unwrap();
    assert!(summary.contains("test notification"), "{summary}");
    assert!(!out.contains(PD_ROUTING_KEY) && !err.contains(PD_ROUTING_KEY));

    pd.seen.fail(400, 1);
    let (code, _, err) = run_binary(&args, books.path());
    assert_eq!(code, 1);
    assert!(
        err.contains("PagerDuty answered 400") && err.contains("(final)"),
        "{err}"
    );
    let (code, out, _) = run_binary(
        &["--config", config.to_str().unwrap(), "channels"],
        books.path(),
    );
    assert_eq!(code, 0);
    assert!(out.contains("pd (pagerduty)"), "{out}");
}
