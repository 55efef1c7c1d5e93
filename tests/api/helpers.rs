//! Shared test plumbing: the app on port 0 with a temporary database, the real binary, a capture
//! server standing in for the humans' receiver, and the real Alertmanager from Debian's package.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::{Json, Router};
use reactor::app::Application;
use reactor::config::Settings;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

pub const FIRING: &str = include_str!("../fixtures/alertmanager-0.25-firing.json");

/// An HTTP client; installs the TLS crypto provider first, as every client here needs it.
pub fn client() -> reqwest::Client {
    reactor::app::install_crypto_provider();
    reqwest::Client::builder().build().expect("client builds")
}

/// Sends `req` and decodes its JSON answer; panics on a transport or decoding error.
pub async fn get_json<T: serde::de::DeserializeOwned>(req: reqwest::RequestBuilder) -> T {
    req.send().await.unwrap().json().await.unwrap()
}

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A directory of playbooks written for one test, with an empty scripts dir beside it.
pub struct PlaybookDir {
    pub root: tempfile::TempDir,
}

impl PlaybookDir {
    pub fn new(files: &[(&str, &str)]) -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("playbooks")).unwrap();
        std::fs::create_dir_all(root.path().join("scripts")).unwrap();
        for (name, text) in files {
            std::fs::write(root.path().join(name), text).unwrap();
        }
        PlaybookDir { root }
    }

    /// The directory holding `playbooks/` and `scripts/`, for the binary's cwd and data.
    pub fn path(&self) -> &Path {
        self.root.path()
    }

    pub fn playbooks(&self) -> PathBuf {
        self.root.path().join("playbooks")
    }

    pub fn scripts(&self) -> PathBuf {
        self.root.path().join("scripts")
    }

    /// Writes `reactor.yaml` for the binary: listening on 127.0.0.1:`port`, data, playbooks and
    /// scripts in this directory, the bearer `token`, then `extra` (more top-level YAML).
    pub fn binary_config(&self, port: u16, token: &str, extra: &str) -> PathBuf {
        let path = self.path().join("reactor.yaml");
        std::fs::write(
            &path,
            format!(
                "listen: 127.0.0.1:{port}\ndata_dir: {}\nplaybooks_dir: {}\nscripts_dir: {}\nauth:\n  bearer_token: {token}\n{extra}",
                self.path().join("db").display(),
                self.playbooks().display(),
                self.scripts().display(),
            ),
        )
        .unwrap();
        path
    }
}

/// A webhook payload with one alert per (alertname, fingerprint, extra labels).
pub fn payload(alerts: &[(&str, &str)]) -> Value {
    let alerts: Vec<Value> = alerts
        .iter()
        .map(|(name, fp)| {
            json!({
                "status": "firing",
                "labels": {"alertname": name, "instance": "test-host", "severity": "warning", "id": fp},
                "annotations": {"summary": "test alert"},
                "startsAt": "2026-11-20T23:35:13.24322Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://127.0.0.1/graph",
                "fingerprint": fp,
            })
        })
        .collect();
    json!({"receiver": "reactor", "status": "firing", "alerts": alerts, "groupLabels": {}, "commonLabels": {},
           "commonAnnotations": {}, "externalURL": "http://127.0.0.1:9093", "version": "4", "groupKey": "{}", "truncatedAlerts": 0})
}

/// The app, running in this process on port 0 with a temporary database.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub token: Option<String>,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    _data: tempfile::TempDir,
}

impl TestApp {
    pub async fn spawn(configure: impl FnOnce(&mut Settings)) -> TestApp {
        Self::spawn_with_clock(configure, Arc::new(reactor::clock::SystemClock)).await
    }

    /// With an injected clock, for guard windows and cooldowns.
    pub async fn spawn_with_clock(
        configure: impl FnOnce(&mut Settings),
        clock: Arc<dyn reactor::clock::Clock>,
    ) -> TestApp {
        reactor::app::install_crypto_provider();
        let data = tempfile::tempdir().unwrap();
        let mut settings = Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: data.path().join("db"),
            playbooks_dir: repo().join("playbooks"),
            scripts_dir: repo().join("scripts"),
            ..Settings::default()
        };
        settings.alertmanager.retry_backoff = Duration::from_millis(50);
        configure(&mut settings);
        let token = settings.auth.bearer_token.clone();
        let app = Application::build_with(settings, client(), clock)
            .await
            .expect("app builds");
        let addr = app.local_addr();
        let shutdown = app.shutdown_token();
        let handle = tokio::spawn(async move { app.run().await.expect("app runs") });
        TestApp {
            addr,
            client: client(),
            token,
            shutdown,
            handle,
            _data: data,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn post_webhook(&self, body: &Value) -> reqwest::Response {
        let mut req = self
            .client
            .post(self.url("/webhook/alertmanager"))
            .json(body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap()
    }

    pub async fn runs(&self, query: &str) -> Vec<Value> {
        get_runs(
            &self.client,
            &self.url(&format!("/api/v1/runs?{query}")),
            self.token.as_deref(),
        )
        .await
    }

    /// The `/metrics` exposition.
    pub async fn metrics(&self) -> String {
        let mut req = self.client.get(self.url("/metrics"));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap().text().await.unwrap()
    }

    /// Polls the run list until `done` holds for it.
    pub async fn wait_for_runs(
        &self,
        query: &str,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        wait_for(timeout, || async {
            Some(self.runs(query).await).filter(|r| done(r))
        })
        .await
        .unwrap_or_else(|| panic!("runs matching {query:?} did not appear in {timeout:?}"))
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.handle.await;
    }

    /// Drops the running app's future without a shutdown, as an aborted task or a failing test
    /// does, and returns how its task ended.
    pub async fn abort(self) -> tokio::task::JoinError {
        self.handle.abort();
        self.handle
            .await
            .expect_err("an aborted app does not finish")
    }
}

pub async fn get_runs(client: &reqwest::Client, url: &str, token: Option<&str>) -> Vec<Value> {
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    match req.send().await {
        Ok(r) if r.status().is_success() => r.json().await.unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Polls `probe` every 50 ms until it yields `Some` or the timeout passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, probe: F) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Serves `app` on 127.0.0.1 (port 0) until the returned token is cancelled.
pub async fn serve_local(app: Router) -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
            .unwrap()
    });
    (addr, shutdown)
}

/// An HTTP server that records every JSON body POSTed to it: the humans' webhook receiver, or an
/// Alertmanager API stand-in where a test needs no routing.
pub struct Capture {
    pub addr: SocketAddr,
    pub bodies: Arc<Mutex<Vec<Value>>>,
    shutdown: CancellationToken,
}

impl Capture {
    pub async fn start() -> Capture {
        let bodies: Arc<Mutex<Vec<Value>>> = Arc::default();
        let b = bodies.clone();
        let record = move |Json(v): Json<Value>| {
            let b = b.clone();
            async move {
                // As the Alertmanager API stand-in, reactor's heartbeat arrives every interval;
                // it is not a page, so it is not recorded.
                let heartbeat = v.as_array().is_some_and(|alerts| {
                    alerts
                        .iter()
                        .all(|a| a["labels"]["alertname"] == "ReactorHeartbeat")
                });
                if !heartbeat {
                    b.lock().unwrap().push(v);
                }
                "ok"
            }
        };
        let app = Router::new()
            .route("/", post(record.clone()))
            .route("/api/v2/alerts", post(record));
        let (addr, shutdown) = serve_local(app).await;
        Capture {
            addr,
            bodies,
            shutdown,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn received(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }

    /// Alertmanager notifications received whose group is all `alertname`.
    pub fn notifications(&self, alertname: &str) -> Vec<Value> {
        self.received()
            .into_iter()
            .filter(|b| b["commonLabels"]["alertname"] == alertname)
            .collect()
    }

    /// Alerts posted to the Alertmanager API stand-in (`POST /api/v2/alerts`) named `alertname`.
    pub fn posted_alerts(&self, alertname: &str) -> Vec<Value> {
        self.received()
            .into_iter()
            .flat_map(|b| b.as_array().cloned().unwrap_or_default())
            .filter(|a| a["labels"]["alertname"] == alertname)
            .collect()
    }

    /// Waits until at least one notification for `alertname` has arrived.
    pub async fn wait_for_notification(&self, alertname: &str, timeout: Duration) -> Vec<Value> {
        wait_for(timeout, || async {
            Some(self.notifications(alertname)).filter(|n| !n.is_empty())
        })
        .await
        .unwrap_or_else(|| panic!("no {alertname} notification within {timeout:?}"))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A free 127.0.0.1 port for programs that cannot report the port they bound.
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range: a port found free there cannot be handed to a `bind` on
    // port 0 or to an outgoing connection before the daemon binds it, as 43517 once was.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(0);
    const FIRST: u32 = 10_000;
    if low <= FIRST + 1_000 {
        // No room below the range: take what the kernel gives.
        return StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    // Test binaries run one at a time, but start each at its own offset anyway.
    let span = low - FIRST;
    let start = std::process::id().wrapping_mul(7919);
    (0..span)
        .map(|_| FIRST + start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span)
        .find(|&port| StdListener::bind(("127.0.0.1", port as u16)).is_ok())
        .expect("a free port below the ephemeral range") as u16
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

/// The real Alertmanager, on 127.0.0.1 with clustering off and its own storage.
pub struct Alertmanager {
    pub port: u16,
    /// Held so that dropping the Alertmanager kills the process.
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    pub async fn start(port: u16, config: &str) -> Alertmanager {
        let (proc, dir) = start_daemon(
            ALERTMANAGER,
            "prometheus-alertmanager",
            config,
            "--storage.path",
            port,
            &["--cluster.listen-address="],
        )
        .await;
        Alertmanager {
            port,
            _proc: proc,
            _dir: dir,
        }
    }

    /// One of a cluster on loopback: gossiping on `cluster_port` with the peer on `peer_port`;
    /// each waits its position times `peer_timeout` before sending what no peer has sent.
    /// Gossip is slow (every 30s, full state every minute), as on a congested network, so a
    /// peer's notification log usually arrives after both have sent; the cluster settles in 2s.
    pub async fn start_clustered(
        port: u16,
        cluster_port: u16,
        peer_port: u16,
        peer_timeout: &str,
        config: &str,
    ) -> Alertmanager {
        let listen = format!("--cluster.listen-address=127.0.0.1:{cluster_port}");
        let peer = format!("--cluster.peer=127.0.0.1:{peer_port}");
        let timeout = format!("--cluster.peer-timeout={peer_timeout}");
        let (proc, dir) = start_daemon(
            ALERTMANAGER,
            "prometheus-alertmanager",
            config,
            "--storage.path",
            port,
            &[
                listen.as_str(),
                peer.as_str(),
                timeout.as_str(),
                "--cluster.gossip-interval=30s",
                "--cluster.pushpull-interval=1m",
                "--cluster.settle-timeout=2s",
            ],
        )
        .await;
        Alertmanager {
            port,
            _proc: proc,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Posts alerts as Prometheus would, through the v2 API.
    pub async fn post_alerts(&self, alerts: &Value) {
        let r = client()
            .post(format!("{}/api/v2/alerts", self.url()))
            .json(alerts)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "alertmanager refused alerts: {}",
            r.status()
        );
    }

    pub async fn alerts(&self, filter: &str) -> Vec<Value> {
        let req = client()
            .get(format!("{}/api/v2/alerts", self.url()))
            .query(&[("filter", filter)]);
        get_json(req).await
    }
}

/// Alertmanager routing: everything to reactor, `RemediationFailed` to the humans.
pub fn alertmanager_config(reactor: SocketAddr, token: &str, humans: &str) -> String {
    format!(
        r#"route:
  receiver: reactor
  group_by: ['...']
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
  routes:
    - receiver: humans
      matchers: ['alertname="RemediationFailed"']
    - receiver: blackhole
      matchers: ['alertname="ReactorHeartbeat"']
receivers:
  - name: blackhole
  - name: reactor
    webhook_configs:
      - url: http://{reactor}/webhook/alertmanager
        send_resolved: true
        http_config:
          authorization:
            credentials: {token}
  - name: humans
    webhook_configs:
      - url: {humans}/
        send_resolved: true
"#
    )
}

/// reactor in process with the real Alertmanager it escalates to, and a humans' receiver.
pub struct Stack {
    pub am: Alertmanager,
    pub reactor: TestApp,
    pub humans: Capture,
}

impl Stack {
    /// `configure` adjusts reactor's settings (the Alertmanager URL is set already);
    /// `am_config` builds Alertmanager's config from reactor's address and the humans' URL.
    pub async fn start(
        configure: impl FnOnce(&mut Settings),
        am_config: impl FnOnce(SocketAddr, &str) -> String,
    ) -> Stack {
        let humans = Capture::start().await;
        let am_port = free_port();
        let reactor = TestApp::spawn(|s| {
            s.alertmanager.url = Some(format!("http://127.0.0.1:{am_port}"));
            configure(s);
        })
        .await;
        let am = Alertmanager::start(am_port, &am_config(reactor.addr, &humans.url())).await;
        Stack {
            am,
            reactor,
            humans,
        }
    }
}

/// The shipped `deploy/alertmanager/alertmanager.yml`, pointed at this test's reactor and humans'
/// receiver, with the token inline instead of in a file. Nothing else is changed.
pub fn shipped_alertmanager_config(reactor: SocketAddr, token: &str, humans: &str) -> String {
    let shipped =
        std::fs::read_to_string(repo().join("deploy/alertmanager/alertmanager.yml")).unwrap();
    let replaced = shipped
        .replace(
            "http://reactor:9097/webhook/alertmanager",
            &format!("http://{reactor}/webhook/alertmanager"),
        )
        .replace(
            "credentials_file: reactor-token",
            &format!("credentials: {token}"),
        )
        .replace("http://humans:8080/alerts", &format!("{humans}/"));
    assert_ne!(shipped, replaced);
    replaced
}

pub const PROMETHEUS: &str = "/usr/bin/prometheus";

/// Starts `binary` (Alertmanager or Prometheus, from Debian's `package`) on 127.0.0.1:`port`
/// with `config` and a temporary storage directory, and waits until it answers `/-/ready`.
/// Its log is `<dir>/daemon.log`, printed when it does not become ready.
async fn start_daemon(
    binary: &str,
    package: &str,
    config: &str,
    storage_flag: &str,
    port: u16,
    extra: &[&str],
) -> (Proc, tempfile::TempDir) {
    assert!(
        Path::new(binary).exists(),
        "{binary} is missing: install Debian's {package} (scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yml");
    std::fs::write(&cfg, config).unwrap();
    let log_path = dir.path().join("daemon.log");
    let child = Command::new(binary)
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "{storage_flag}={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{binary} starts: {e}"));
    let proc = Proc { child };
    let client = client();
    let ready = wait_for(Duration::from_secs(30), || async {
        let r = client
            .get(format!("http://127.0.0.1:{port}/-/ready"))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    if ready.is_none() {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        panic!("{binary} did not become ready:\n{log}");
    }
    (proc, dir)
}

/// The real Prometheus from Debian's package, on 127.0.0.1, stopped when dropped.
pub struct Prometheus {
    pub port: u16,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    pub async fn start(config: &str) -> Prometheus {
        let port = free_port();
        let (proc, dir) = start_daemon(
            PROMETHEUS,
            "prometheus",
            config,
            "--storage.tsdb.path",
            port,
            &[],
        )
        .await;
        Prometheus {
            port,
            _proc: proc,
            _dir: dir,
        }
    }

    /// Active alerts of the rules (`GET /api/v1/alerts`).
    pub async fn alerts(&self) -> Vec<Value> {
        let url = format!("http://127.0.0.1:{}/api/v1/alerts", self.port);
        let v: Value = get_json(client().get(url)).await;
        v["data"]["alerts"].as_array().cloned().unwrap_or_default()
    }
}

/// The real `reactor` binary with the given arguments, run in `cwd`, logging to `cwd/reactor.log`.
pub fn spawn_binary(args: &[&str], cwd: &Path) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cwd.join("reactor.log"))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_reactor"))
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("reactor binary starts");
    Proc { child }
}

/// Runs the binary to completion: (exit code, stdout, stderr).
pub fn run_binary(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_reactor"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("reactor binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub async fn wait_healthy(port: u16) {
    let client = client();
    wait_for(Duration::from_secs(20), || async {
        let r = client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await
    .expect("reactor answers /healthz");
}

/// `<node>/var/log/syslog.2.gz`, 4096 bytes, last written 8 days ago: what the shipped disk
/// playbook cleans up.
pub fn old_log(node: &std::path::Path) -> PathBuf {
    let logs = node.join("var/log");
    std::fs::create_dir_all(&logs).unwrap();
    let old = logs.join("syslog.2.gz");
    std::fs::write(&old, vec![0u8; 4096]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(8 * 86_400))
        .unwrap();
    old
}
