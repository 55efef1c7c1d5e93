//! Connections that hold on: silent, trickling headers or bodies, unfinished bodies, more of them
//! than the process has file descriptors. Each is closed by its deadline or refused, and webhooks
//! and `/healthz` keep being answered meanwhile.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    free_port, payload, wait_for, wait_healthy, PlaybookDir, Proc, TestApp, FIRING,
};

const TOKEN: &str = "soak-token";

/// A request's headers, never finished: trickled a byte at a time, they outlast any test.
fn endless_headers() -> Vec<u8> {
    let mut headers = b"POST /webhook/alertmanager HTTP/1.1\r\nHost: reactor\r\n".to_vec();
    for i in 0..1_000 {
        headers.extend_from_slice(format!("X-Filler-{i}: trickle\r\n").as_bytes());
    }
    headers
}

/// Complete headers of a webhook declaring a `length`-byte body, with `token` if given.
fn webhook_head(length: usize, token: Option<&str>) -> String {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!(
        "POST /webhook/alertmanager HTTP/1.1\r\nHost: reactor\r\nContent-Type: application/json\r\n\
         {auth}Content-Length: {length}\r\n\r\n"
    )
}

/// What the server did with a connection: when it closed it (from the connection's start), and
/// what it answered first.
#[derive(Debug)]
struct Ending {
    closed_after: Duration,
    answer: String,
}

/// Sends `head` on a new connection, then trickles `trickle` one byte per `every` while reading
/// whatever comes back, until the server closes the connection or `give_up` passes (`None`).
async fn watch(
    addr: std::net::SocketAddr,
    head: &[u8],
    trickle: Vec<u8>,
    every: Duration,
    give_up: Duration,
) -> Option<Ending> {
    let started = Instant::now();
    let (mut rx, mut tx) = TcpStream::connect(addr).await.unwrap().into_split();
    tx.write_all(head).await.unwrap();
    let writer = tokio::spawn(async move {
        for byte in trickle {
            tokio::time::sleep(every).await;
            if tx.write_all(&[byte]).await.is_err() {
                break;
            }
        }
        // Keep the write side open: a half-close is not what a slow client does.
        std::future::pending::<()>().await;
    });
    let mut answer = Vec::new();
    let ended = tokio::time::timeout(give_up, async {
        let mut buf = [0u8; 4096];
        loop {
            match rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    writer.abort();
    ended.ok().map(|()| Ending {
        closed_after: started.elapsed(),
        answer: String::from_utf8_lossy(&answer).into_owned(),
    })
}

fn between(d: Duration, low_ms: u64, high_ms: u64) -> bool {
    d >= Duration::from_millis(low_ms) && d <= Duration::from_millis(high_ms)
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_and_trickling_connections_are_closed_after_their_timeouts() {
    let app = TestApp::spawn(|s| {
        s.auth.bearer_token = Some(TOKEN.into());
        s.limits.idle_timeout = Duration::from_secs(2);
        s.limits.header_read_timeout = Duration::from_secs(1);
        s.limits.body_read_timeout = Duration::from_millis(1_500);
    })
    .await;
    let every = Duration::from_millis(200);
    let give_up = Duration::from_secs(6);
    let silent = watch(app.addr, b"", vec![], every, give_up);
    let headers = endless_headers();
    let trickled_headers = watch(
        app.addr,
        &headers[..1],
        headers[1..].to_vec(),
        every,
        give_up,
    );
    let head = webhook_head(FIRING.len(), Some(TOKEN));
    let trickled_body = watch(
        app.addr,
        head.as_bytes(),
        FIRING.as_bytes().to_vec(),
        every,
        give_up,
    );
    // A kept-alive connection at rest is idle, not slow with its headers: it lasts idle_timeout.
    let kept_alive = watch(
        app.addr,
        b"GET /healthz HTTP/1.1\r\nHost: reactor\r\n\r\n",
        vec![],
        every,
        give_up,
    );
    let (silent, trickled_headers, trickled_body, kept_alive) =
        tokio::join!(silent, trickled_headers, trickled_body, kept_alive);

    let silent = silent.expect("a silent connection is closed");
    assert!(between(silent.closed_after, 1_800, 3_500), "{silent:?}");
    assert_eq!(silent.answer, "");
    let trickled_headers = trickled_headers.expect("trickled headers are cut off");
    assert!(
        between(trickled_headers.closed_after, 800, 1_900),
        "closed by header_read_timeout, though a byte arrives every 200 ms: {trickled_headers:?}"
    );
    let trickled_body = trickled_body.expect("a trickled body is cut off");
    assert!(
        trickled_body.answer.starts_with("HTTP/1.1 408"),
        "{trickled_body:?}"
    );
    assert!(
        trickled_body.answer.contains("body_read_timeout"),
        "{trickled_body:?}"
    );
    assert!(
        between(trickled_body.closed_after, 1_300, 3_000),
        "{trickled_body:?}"
    );
    let kept_alive = kept_alive.expect("a kept-alive connection at rest is closed");
    assert!(
        kept_alive.answer.starts_with("HTTP/1.1 200"),
        "{kept_alive:?}"
    );
    assert!(
        between(kept_alive.closed_after, 1_800, 3_500),
        "{kept_alive:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unauthenticated_bodies_are_refused_before_they_are_read() {
    let app = TestApp::spawn(|s| s.auth.bearer_token = Some(TOKEN.into())).await;
    let head = webhook_head(4 << 20, None);
    let ending = watch(
        app.addr,
        head.as_bytes(),
        vec![],
        Duration::from_millis(200),
        Duration::from_secs(5),
    )
    .await
    .expect("the connection is closed, not held for a body");
    assert!(ending.answer.starts_with("HTTP/1.1 401"), "{ending:?}");
    assert!(ending.closed_after < Duration::from_secs(1), "{ending:?}");
    app.stop().await;
}

/// How the connections of [`hold_connections`] behave.
#[derive(Clone, Copy)]
struct Holding {
    /// Send nothing.
    idle: usize,
    /// Trickle header bytes.
    headers: usize,
    /// Send an authenticated webhook's headers, then trickle its 64 KiB body.
    bodies: usize,
}

/// Connections held open until `stop`, the trickling ones sending a byte every 200 ms.
struct Held {
    /// Per connection: whether it was still open at the end.
    tasks: Vec<tokio::task::JoinHandle<bool>>,
    connected: Arc<AtomicUsize>,
}

impl Held {
    /// Waits until every connection is established, for at most `timeout`.
    async fn connected(&self, timeout: Duration) -> usize {
        let all = self.tasks.len();
        let count = || self.connected.load(Ordering::SeqCst);
        wait_for(timeout, || async { (count() == all).then_some(()) }).await;
        count()
    }

    /// How many connections were still open at the end.
    async fn still_open(self) -> usize {
        let mut open = 0;
        for t in self.tasks {
            open += usize::from(t.await.unwrap());
        }
        open
    }
}

fn hold_connections(
    addr: std::net::SocketAddr,
    holding: Holding,
    stop: &CancellationToken,
) -> Held {
    let headers = endless_headers();
    let body_head = webhook_head(64 << 10, Some(TOKEN)).into_bytes();
    let connected = Arc::new(AtomicUsize::new(0));
    let tasks = (0..holding.idle + holding.headers + holding.bodies)
        .map(|i| {
            let stop = stop.clone();
            let (head, trickle) = if i < holding.idle {
                (vec![], vec![])
            } else if i < holding.idle + holding.headers {
                (vec![], headers.clone())
            } else {
                (body_head.clone(), vec![b' '; 64 << 10])
            };
            let connected = Arc::clone(&connected);
            tokio::spawn(async move {
                // 50 every 50 ms: the listen backlog never overflows, so each connection is
                // accepted (or refused) by the server, not left half-open by the kernel.
                tokio::time::sleep(Duration::from_millis(i as u64 / 50 * 50)).await;
                let mut stream = tokio::select! {
                    _ = stop.cancelled() => return false,
                    stream = TcpStream::connect(addr) => stream.unwrap(),
                };
                connected.fetch_add(1, Ordering::SeqCst);
                if stream.write_all(&head).await.is_err() {
                    return false;
                }
                let mut bytes = trickle.into_iter();
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {
                            if let Some(b) = bytes.next() {
                                if stream.write_all(&[b]).await.is_err() {
                                    return false;
                                }
                            }
                        }
                    }
                }
                let mut probe = [0u8; 1];
                matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
        })
        .collect();
    Held { tasks, connected }
}

/// A client opening a new connection per request, timing out after 2 s.
fn fresh_connections() -> reqwest::Client {
    reactor::app::install_crypto_provider();
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// Posts `n` webhooks, `concurrency` at a time, each on a new connection; returns their statuses.
async fn post_webhooks(url: &str, n: usize, concurrency: usize) -> Vec<u16> {
    use futures_util::StreamExt;
    let client = fresh_connections();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let req = client
                .post(url)
                .bearer_auth(TOKEN)
                .json(&payload(&[("SoakTest", &format!("{i:016x}"))]));
            async move { req.send().await.map_or(0, |r| r.status().as_u16()) }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Asks `/healthz` every 100 ms on a new connection until `stop`; returns the slowest answer
/// (a failed request counts as an hour).
async fn slowest_healthz(url: String, stop: CancellationToken) -> (Duration, usize) {
    let client = fresh_connections();
    let (mut slowest, mut asked) = (Duration::ZERO, 0);
    while !stop.is_cancelled() {
        let started = Instant::now();
        let ok = client
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        let took = if ok {
            started.elapsed()
        } else {
            Duration::from_secs(3600)
        };
        slowest = slowest.max(took);
        asked += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (slowest, asked)
}

#[tokio::test(flavor = "multi_thread")]
async fn hundreds_of_idle_and_trickling_connections_do_not_stop_webhooks_or_healthz() {
    tokio::time::timeout(Duration::from_secs(60), async {
        reactor::routes::serve::raise_nofile_limit();
        let app = TestApp::spawn(|s| {
            s.auth.bearer_token = Some(TOKEN.into());
            // Longer than the soak, so every connection stays open through it.
            s.limits.idle_timeout = Duration::from_secs(120);
            s.limits.header_read_timeout = Duration::from_secs(120);
            s.limits.body_read_timeout = Duration::from_secs(120);
        })
        .await;
        let stop = CancellationToken::new();
        let holding = Holding {
            idle: 300,
            headers: 100,
            bodies: 100,
        };
        let held = hold_connections(app.addr, holding, &stop);
        assert_eq!(held.connected(Duration::from_secs(10)).await, 500);
        let healthz = tokio::spawn(slowest_healthz(app.url("/healthz"), stop.clone()));
        let statuses = post_webhooks(&app.url("/webhook/alertmanager"), 200, 8).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        let (slowest, asked) = healthz.await.unwrap();
        let still_open = held.still_open().await;
        eprintln!(
            "soak: {} of 200 webhooks 202, slowest /healthz {slowest:?} of {asked}, {still_open} of 500 held open",
            statuses.iter().filter(|&&s| s == 202).count()
        );
        assert!(
            statuses.iter().all(|&s| s == 202),
            "every webhook answered 202: {statuses:?}"
        );
        assert_eq!(statuses.len(), 200);
        assert!(asked >= 5, "healthz asked {asked} times");
        assert!(
            slowest < Duration::from_secs(1),
            "slowest /healthz {slowest:?}"
        );
        assert_eq!(
            still_open, 500,
            "the held connections were held, not dropped"
        );
        app.stop().await;
    })
    .await
    .expect("the soak finishes within 60 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn at_the_connection_cap_idle_connections_make_room_and_busy_ones_make_requests_wait() {
    let app = TestApp::spawn(|s| {
        s.auth.bearer_token = Some(TOKEN.into());
        s.limits.max_connections = 20;
        s.limits.header_read_timeout = Duration::from_millis(1_500);
    })
    .await;
    let client = fresh_connections();
    // The cap full of clients slow with their headers, which are never closed to make room: a
    // new request waits until header_read_timeout frees a place, and is then served.
    let stop = CancellationToken::new();
    let only_headers = Holding {
        idle: 0,
        headers: 20,
        bodies: 0,
    };
    let trickling = hold_connections(app.addr, only_headers, &stop);
    assert_eq!(trickling.connected(Duration::from_secs(5)).await, 20);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let r = client.get(app.url("/healthz")).send().await.unwrap();
    let waited = started.elapsed();
    assert_eq!(r.status(), 200);
    assert!(
        between(waited, 900, 4_000),
        "served once a slow client's headers timed out: {waited:?}"
    );
    // The others' headers are as late: give the server a moment to cut them all.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    assert_eq!(
        trickling.still_open().await,
        0,
        "every slow client was cut off"
    );

    // The cap full of idle connections: each new one closes the longest-idle.
    let stop = CancellationToken::new();
    let only_idle = Holding {
        idle: 40,
        headers: 0,
        bodies: 0,
    };
    let idle = hold_connections(app.addr, only_idle, &stop);
    assert_eq!(idle.connected(Duration::from_secs(5)).await, 40);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..10 {
        let started = Instant::now();
        let r = client.get(app.url("/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "healthz {i} took {took:?}");
    }
    let statuses = post_webhooks(&app.url("/webhook/alertmanager"), 10, 2).await;
    assert!(statuses.iter().all(|&s| s == 202), "{statuses:?}");
    stop.cancel();
    let closed = 40 - idle.still_open().await;
    assert!(
        closed >= 20,
        "at most 20 connections open at once: {closed} of 40 idle ones closed"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spent_body_budget_is_503_with_retry_after() {
    let app = TestApp::spawn(|s| {
        s.auth.bearer_token = Some(TOKEN.into());
        s.limits.max_buffered_body_bytes = 1 << 20;
        s.limits.max_body_bytes = 1 << 20;
    })
    .await;
    // A client holding most of the budget: it declared 800 KiB and sends them slowly.
    let mut holder = TcpStream::connect(app.addr).await.unwrap();
    holder
        .write_all(webhook_head(800 << 10, Some(TOKEN)).as_bytes())
        .await
        .unwrap();
    holder.write_all(b"{").await.unwrap();
    let padded = format!("{FIRING}{}", " ".repeat(300 << 10));
    let post = || async {
        app.client
            .post(app.url("/webhook/alertmanager"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(padded.clone())
            .send()
            .await
            .unwrap()
    };
    let refused = wait_for(Duration::from_secs(5), || async {
        let r = post().await;
        (r.status() == 503).then_some(r)
    })
    .await
    .expect("a body that does not fit the budget is refused");
    assert_eq!(
        refused.headers()["retry-after"],
        "5",
        "Alertmanager retries a 503 after Retry-After"
    );
    let error: serde_json::Value = refused.json().await.unwrap();
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("max_buffered_body_bytes"),
        "{error}"
    );
    drop(holder);
    let accepted = wait_for(Duration::from_secs(5), || async {
        (post().await.status() == 202).then_some(())
    })
    .await;
    assert!(
        accepted.is_some(),
        "the budget comes back when the holder leaves"
    );
    app.stop().await;
}

/// The reactor binary with its open-files limit (soft and hard) at `nofile`, serving on `port`.
fn spawn_limited(dir: &PlaybookDir, port: u16, nofile: u32) -> Proc {
    let config = dir.binary_config(port, TOKEN, "");
    let log = std::fs::File::create(dir.path().join("reactor.log")).unwrap();
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_reactor"))
        .args(["--config", config.to_str().unwrap(), "serve"])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("reactor starts");
    Proc { child }
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("reactor.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn more_connections_than_open_files_do_not_stop_webhooks_or_healthz() {
    tokio::time::timeout(Duration::from_secs(60), async {
        reactor::routes::serve::raise_nofile_limit();
        let dir = PlaybookDir::new(&[]);
        let port = free_port();
        let _reactor = spawn_limited(&dir, port, 1024);
        wait_healthy(port).await;
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let stop = CancellationToken::new();
        let holding = Holding {
            idle: 1_100,
            headers: 50,
            bodies: 50,
        };
        let held = hold_connections(addr, holding, &stop);
        // Past the descriptors left, connections are established only as the server makes room.
        let connected = held.connected(Duration::from_secs(10)).await;
        let healthz = tokio::spawn(slowest_healthz(
            format!("http://{addr}/healthz"),
            stop.clone(),
        ));
        let statuses = post_webhooks(&format!("http://{addr}/webhook/alertmanager"), 100, 10).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        let (slowest, asked) = healthz.await.unwrap();
        let still_open = held.still_open().await;
        eprintln!(
            "soak under nofile 1024: {connected} of 1200 connected, {} of 100 webhooks 202, slowest /healthz {slowest:?} of {asked}, {still_open} held open",
            statuses.iter().filter(|&&s| s == 202).count()
        );
        let log = log_of(dir.path());
        assert!(
            statuses.iter().all(|&s| s == 202),
            "every webhook answered 202: {statuses:?}\n{log}"
        );
        assert!(asked >= 5, "healthz asked {asked} times");
        assert!(
            slowest < Duration::from_secs(1),
            "slowest /healthz {slowest:?}\n{log}"
        );
        assert_eq!(connected, 1_200, "every connection was established\n{log}");
        assert!(log.contains("max_connections=896"), "{log}");
    })
    .await
    .expect("the soak finishes within 60 s");
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kb * 1024
}

/// The first status line read from `stream` within `wait`: `closed` when the server closed the
/// connection first (a refusal may arrive as a reset), `held` when nothing came.
async fn status_line(stream: &mut TcpStream, wait: Duration) -> String {
    let mut answer = vec![0u8; 64];
    match tokio::time::timeout(wait, stream.read(&mut answer)).await {
        Ok(Ok(n)) if n > 0 => String::from_utf8_lossy(&answer[..n.min(12)]).into_owned(),
        Ok(_) => "closed".to_owned(),
        Err(_) => "held".to_owned(),
    }
}

/// Opens `n` connections that each send the headers of a 4 MiB webhook (the fixture, padded
/// with spaces) and all of its body but the last byte; returns them with what each got within
/// half a second.
async fn unfinished_bodies(
    addr: std::net::SocketAddr,
    n: usize,
    token: Option<&'static str>,
) -> Vec<(TcpStream, String)> {
    let size = 4 << 20;
    let mut body = FIRING.as_bytes().to_vec();
    body.resize(size - 1, b' ');
    let body = Arc::new(body);
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let body = Arc::clone(&body);
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let _ = stream.write_all(webhook_head(size, token).as_bytes()).await;
                let _ = stream.write_all(&body).await;
                let status = status_line(&mut stream, Duration::from_millis(500)).await;
                (stream, status)
            })
        })
        .collect();
    let mut unfinished = Vec::new();
    for t in tasks {
        unfinished.push(t.await.unwrap());
    }
    unfinished
}

fn count(statuses: &[String], status: &str) -> usize {
    statuses.iter().filter(|s| *s == status).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn unfinished_bodies_do_not_grow_memory_without_bound() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = PlaybookDir::new(&[]);
        let port = free_port();
        let reactor = spawn_limited(&dir, port, 4096);
        wait_healthy(port).await;
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let pid = reactor.child.id();
        let before = rss(pid);

        let unauthenticated = unfinished_bodies(addr, 100, None).await;
        let grown_unauthenticated = rss(pid).saturating_sub(before);
        let statuses: Vec<String> = unauthenticated.into_iter().map(|(_, s)| s).collect();
        assert_eq!(
            count(&statuses, "held"),
            0,
            "every unauthenticated body refused at once: {statuses:?}"
        );
        assert!(count(&statuses, "HTTP/1.1 401") > 0, "{statuses:?}");

        let authenticated = unfinished_bodies(addr, 100, Some(TOKEN)).await;
        let grown = rss(pid).saturating_sub(before);
        eprintln!(
            "RSS growth: 100 unauthenticated unfinished 4 MiB bodies {} MiB, 100 authenticated {} MiB",
            grown_unauthenticated >> 20,
            grown >> 20
        );
        assert!(
            grown_unauthenticated < 32 << 20,
            "100 unauthenticated 4 MiB bodies grew RSS by {} MiB",
            grown_unauthenticated >> 20
        );
        assert!(
            grown < 128 << 20,
            "100 unfinished 4 MiB bodies grew RSS by {} MiB (budget 64 MiB)",
            grown >> 20
        );
        // Finished, the bodies inside the budget are accepted and the rest were refused.
        let mut statuses = Vec::new();
        for (mut stream, _) in authenticated {
            let _ = stream.write_all(b" ").await;
            statuses.push(status_line(&mut stream, Duration::from_secs(10)).await);
        }
        assert!(
            count(&statuses, "HTTP/1.1 202") <= 16,
            "at most 64 MiB / 4 MiB bodies are taken in: {statuses:?}"
        );
        assert_eq!(
            count(&statuses, "HTTP/1.1 202") + count(&statuses, "HTTP/1.1 503"),
            100,
            "the others are refused with 503: {statuses:?}"
        );
    })
    .await
    .expect("finishes within 60 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_closes_idle_connections_at_once_and_slow_ones_after_the_grace() {
    let app = TestApp::spawn(|s| s.limits.shutdown_grace = Duration::from_secs(1)).await;
    let stop = CancellationToken::new();
    let holding = Holding {
        idle: 5,
        headers: 5,
        bodies: 0,
    };
    let held = hold_connections(app.addr, holding, &stop);
    assert_eq!(held.connected(Duration::from_secs(5)).await, 10);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), app.stop())
        .await
        .expect("the app stops though clients are still sending headers");
    let took = started.elapsed();
    assert!(
        between(took, 900, 3_000),
        "stopped after the 1 s grace: {took:?}"
    );
    stop.cancel();
    assert_eq!(held.still_open().await, 0);
}
