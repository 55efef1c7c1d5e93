//! `reactor-bench`: the load benchmark. Starts the release `reactor` binary on a temporary data
//! dir with 1,000 unrelated playbooks plus one whose single Rhai step does trivial work, drives it
//! over HTTP/1 with unique firing alerts (one per request, v4 payloads) on a fixed number of
//! connections for a fixed time, waits for every run to finish, stops reactor, then reads the
//! history back from sled to check that runs == 2xx answers and to measure receive-to-finish.
//! With `--ceiling`, it first drives the issue's reference server with the same load and reports
//! reactor's rate as a share of it.
//!
//! It lives in the workspace member `bench/`, so its load-generator crates (hyper's client,
//! anyhow, tempfile) are not the service's dependencies. Run it with `scripts/bench.sh` (builds
//! both release binaries first) or, after `cargo build --release --bin reactor`,
//! `cargo run --release -p reactor-bench -- --connections 16 --duration 20s`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

#[derive(Parser, Debug)]
#[command(
    about = "Load benchmark for reactor: accepted alerts/s, completed runs/s, latencies, RSS"
)]
struct Args {
    /// Concurrent HTTP/1 connections, each with one request in flight.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// How long to send alerts.
    #[arg(long, default_value = "20s")]
    duration: humantime::Duration,
    /// Unrelated playbooks loaded beside the benchmark one (start-up and matching cost).
    #[arg(long, default_value_t = 1000)]
    playbooks: usize,
    /// The reactor binary; defaults to the one next to this executable.
    #[arg(long)]
    reactor: Option<PathBuf>,
    /// Longest wait for the runs to finish after the load stops.
    #[arg(long, default_value = "300s")]
    drain_timeout: humantime::Duration,
    /// Alert name sent; anything but `BenchAlert` matches no playbook (intake and history only).
    #[arg(long, default_value = "BenchAlert")]
    alertname: String,
    /// Keep the temporary directory (data, logs) for inspection.
    #[arg(long)]
    keep: bool,
    /// First drive the issue's reference server (`target/release/examples/durable_ceiling`) with
    /// the same load and report reactor against it. This VM's speed drifts by 20% within an
    /// hour, so a figure means most beside the ceiling measured in the same minutes.
    #[arg(long)]
    ceiling: Option<PathBuf>,
}

const BENCH_PLAYBOOK: &str = r#"
name: bench
description: One trivial Rhai step.
match:
  alertname: BenchAlert
steps:
  - name: trivial
    inline: |
      let n = params.n + 1;
      #{ n: n, instance: alert.labels.instance }
    params:
      n: 41
"#;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

struct Reactor {
    child: Child,
    port: u16,
}

impl Reactor {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `VmRSS` or `VmHWM` of a process, in KiB.
fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used, from `/proc/<pid>/stat`. Those fields count
/// USER_HZ ticks, which Linux fixes at 100 per second for user space.
fn cpu_time(pid: &str) -> Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces:
            // state is field 3, utime 14 and stime 15.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn write_setup(root: &Path, playbooks: usize, port: u16) -> anyhow::Result<PathBuf> {
    let pb = root.join("playbooks");
    std::fs::create_dir_all(&pb)?;
    std::fs::create_dir_all(root.join("scripts"))?;
    std::fs::write(pb.join("bench.yaml"), BENCH_PLAYBOOK)?;
    let mut other = String::new();
    for i in 0..playbooks {
        other.push_str(&format!(
            "---\nname: unrelated-{i}\nmatch:\n  alertname: Unrelated{i}\n  matchers: ['severity=~\"warning|critical\"']\nsteps:\n  - inline: '1'\n"
        ));
    }
    std::fs::write(pb.join("unrelated.yaml"), other)?;
    let config = root.join("reactor.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\ndata_dir: {}\nplaybooks_dir: {}\nscripts_dir: {}\n",
            root.join("db").display(),
            pb.display(),
            root.join("scripts").display()
        ),
    )?;
    Ok(config)
}

async fn healthy(port: u16) -> bool {
    let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let Ok((mut send, conn)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
    else {
        return false;
    };
    tokio::spawn(conn);
    let req = hyper::Request::get("/healthz")
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::new()))
        .expect("request builds");
    matches!(send.send_request(req).await, Ok(r) if r.status().is_success())
}

fn body(alertname: &str, conn: usize, seq: u64) -> Bytes {
    let fp = format!("{conn:04x}{seq:012x}");
    Bytes::from(format!(
        r#"{{"receiver":"reactor","status":"firing","alerts":[{{"status":"firing","labels":{{"alertname":"{alertname}","instance":"host-{conn}","severity":"warning","seq":"{seq}"}},"annotations":{{"summary":"bench"}},"startsAt":"2026-11-21T00:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"http://127.0.0.1/graph","fingerprint":"{fp}"}}],"groupLabels":{{}},"commonLabels":{{}},"commonAnnotations":{{}},"externalURL":"http://127.0.0.1:9093","version":"4","groupKey":"{{}}","truncatedAlerts":0}}"#
    ))
}

/// One connection's results: accept latencies (µs) of 2xx answers, and the count of others.
#[derive(Default)]
struct ConnStats {
    ok_us: Vec<u32>,
    rejected: u64,
    errors: u64,
}

impl ConnStats {
    fn sorted_us(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.ok_us.iter().map(|&u| u64::from(u)).collect();
        v.sort_unstable();
        v
    }
}

async fn drive(
    port: u16,
    alertname: String,
    conn: usize,
    until: Instant,
) -> anyhow::Result<ConnStats> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let (mut send, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut stats = ConnStats::default();
    let mut seq = 0u64;
    while Instant::now() < until {
        let req = hyper::Request::post("/webhook/alertmanager")
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .body(Full::new(body(&alertname, conn, seq)))?;
        seq += 1;
        let start = Instant::now();
        match send.send_request(req).await {
            Ok(res) => {
                let ok = res.status().is_success();
                let _ = res.into_body().collect().await;
                if ok {
                    stats.ok_us.push(start.elapsed().as_micros() as u32);
                } else {
                    stats.rejected += 1;
                }
            }
            Err(_) => {
                stats.errors += 1;
                break;
            }
        }
    }
    Ok(stats)
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

/// Finished runs, from `reactor_runs_total` on /metrics.
async fn finished_runs(client: &reqwest::Client, port: u16) -> Option<u64> {
    let text = client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with("reactor_runs_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64,
    )
}

/// Spawns `binary serve` on a fresh setup in `root` and waits for its first healthy answer.
async fn start(
    binary: &Path,
    root: &Path,
    playbooks: usize,
) -> anyhow::Result<(Reactor, Duration)> {
    let port = free_port()?;
    let config = write_setup(root, playbooks, port)?;
    let log_path = root.join("reactor.log");
    let started = Instant::now();
    let child = Command::new(binary)
        .args(["--config", config.to_str().unwrap_or_default(), "serve"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    let mut server = Reactor { child, port };
    while !healthy(port).await {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "{} did not become healthy; see {}",
            binary.display(),
            log_path.display()
        );
        if let Some(status) = server.child.try_wait()? {
            anyhow::bail!(
                "{} exited with {status}; see {}",
                binary.display(),
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok((server, started.elapsed()))
}

/// `--connections` connections sending unique alerts for `--duration`; the results and how long
/// the load took.
async fn load(port: u16, args: &Args) -> anyhow::Result<(ConnStats, Duration)> {
    let start = Instant::now();
    let until = start + Duration::from(args.duration);
    let tasks: Vec<_> = (0..args.connections)
        .map(|c| tokio::spawn(drive(port, args.alertname.clone(), c, until)))
        .collect();
    let mut stats = ConnStats::default();
    for t in tasks {
        let s = t.await??;
        stats.ok_us.extend(s.ok_us);
        stats.rejected += s.rejected;
        stats.errors += s.errors;
    }
    Ok((stats, start.elapsed()))
}

/// The reference server's figures under the same load.
struct Ceiling {
    rate: f64,
    p99_us: u64,
    cpu_us: f64,
}

async fn measure_ceiling(binary: &Path, args: &Args) -> anyhow::Result<Ceiling> {
    let tmp = tempfile::Builder::new()
        .prefix("reactor-bench-ceiling-")
        .tempdir()?;
    let (server, _) = start(binary, tmp.path(), 0).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = server.pid().to_string();
    let cpu = cpu_time(&pid);
    let (stats, elapsed) = load(server.port, args).await?;
    let cpu = cpu_time(&pid).saturating_sub(cpu);
    drop(server);
    let accepted = stats.ok_us.len();
    anyhow::ensure!(accepted > 0, "the ceiling server accepted nothing");
    Ok(Ceiling {
        rate: accepted as f64 / elapsed.as_secs_f64(),
        p99_us: pct(&stats.sorted_us(), 0.99),
        cpu_us: cpu.as_secs_f64() * 1e6 / accepted as f64,
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    reactor::app::install_crypto_provider();
    let binary = match args.reactor.clone() {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("reactor"),
    };
    anyhow::ensure!(
        binary.is_file(),
        "{} not found: build it (cargo build --release) or pass --reactor",
        binary.display()
    );
    let ceiling = match &args.ceiling {
        Some(path) => Some(measure_ceiling(path, &args).await?),
        None => None,
    };
    let tmp = tempfile::Builder::new()
        .prefix("reactor-bench-")
        .tempdir()?;
    let root = tmp.path().to_owned();
    let (mut reactor, startup) = start(&binary, &root, args.playbooks).await?;
    let port = reactor.port;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = proc_kib(reactor.pid(), "VmRSS:");

    // Load.
    let pid = reactor.pid().to_string();
    let (cpu_reactor, cpu_bench) = (cpu_time(&pid), cpu_time("self"));
    let duration: Duration = args.duration.into();
    let load_start = Instant::now();
    let (stats, load_elapsed) = load(port, &args).await?;
    let accepted = stats.ok_us.len() as u64;
    let rate = accepted as f64 / load_elapsed.as_secs_f64();

    // Drain: wait until every accepted alert has a finished run.
    let http = reqwest::Client::new();
    let drain_deadline = Instant::now() + Duration::from(args.drain_timeout);
    let mut finished = 0;
    while Instant::now() < drain_deadline {
        finished = finished_runs(&http, port).await.unwrap_or(finished);
        if finished >= accepted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained = load_start.elapsed();
    let peak_rss = proc_kib(reactor.pid(), "VmHWM:");
    let cpu_reactor = cpu_time(&pid).saturating_sub(cpu_reactor);
    let cpu_bench = cpu_time("self").saturating_sub(cpu_bench);

    // Stop reactor cleanly (SIGTERM), then read its history.
    let _ = Command::new("kill")
        .args(["-TERM", &reactor.pid().to_string()])
        .status();
    let stop_deadline = Instant::now() + Duration::from_secs(30);
    while reactor.child.try_wait()?.is_none() && Instant::now() < stop_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(reactor);
    let db_dir = root.join("db");
    let db_bytes = dir_bytes(&db_dir);
    let store = reactor::history::Store::open(&db_dir)?;
    let mut runs = 0u64;
    let mut succeeded = 0u64;
    let mut finish_us = Vec::new();
    let (mut first_received, mut last_finished) = (None, None);
    for run in store.all_runs() {
        let run = run?;
        runs += 1;
        if matches!(
            run.outcome,
            reactor::history::Outcome::Succeeded | reactor::history::Outcome::Skipped
        ) {
            succeeded += 1;
        }
        if let Some(f) = run.finished_at {
            let d = f.duration_since(run.received_at);
            finish_us.push(d.as_micros().max(0) as u64);
            last_finished = Some(last_finished.map_or(f, |l: jiff::Timestamp| l.max(f)));
        }
        first_received = Some(
            first_received.map_or(run.received_at, |r: jiff::Timestamp| r.min(run.received_at)),
        );
    }
    drop(store);

    let accept = stats.sorted_us();
    finish_us.sort_unstable();
    let span = match (first_received, last_finished) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "reactor-bench: {} connections, {:?} of load, {} cores, {} unrelated playbooks loaded",
        args.connections, duration, cores, args.playbooks
    );
    println!(
        "start-up to /healthz        {:.0} ms",
        startup.as_secs_f64() * 1000.0
    );
    println!(
        "idle RSS                    {:.1} MiB",
        idle_rss as f64 / 1024.0
    );
    println!("accepted (2xx)              {accepted} ({rate:.0}/s)");
    println!(
        "rejected (non-2xx), errors  {}, {}",
        stats.rejected, stats.errors
    );
    println!(
        "accept latency              p50 {}  p99 {}  p99.9 {}  max {}",
        ms(pct(&accept, 0.50)),
        ms(pct(&accept, 0.99)),
        ms(pct(&accept, 0.999)),
        ms(accept.last().copied().unwrap_or(0))
    );
    println!(
        "runs finished               {runs} ({succeeded} succeeded or skipped) in {:.1} s after load start; {:.0} runs/s (first receive to last finish)",
        drained.as_secs_f64(),
        if span > 0.0 { runs as f64 / span } else { 0.0 }
    );
    println!(
        "receive-to-finish latency   p50 {}  p99 {}",
        ms(pct(&finish_us, 0.50)),
        ms(pct(&finish_us, 0.99))
    );
    println!(
        "CPU time, load and drain    reactor {:.1} s ({:.0} µs per accepted alert, {:.2} cores busy), load generator {:.1} s",
        cpu_reactor.as_secs_f64(),
        cpu_reactor.as_secs_f64() * 1e6 / accepted.max(1) as f64,
        cpu_reactor.as_secs_f64() / drained.as_secs_f64(),
        cpu_bench.as_secs_f64()
    );
    println!(
        "peak RSS                    {:.1} MiB",
        peak_rss as f64 / 1024.0
    );
    println!(
        "database                    {:.1} MiB, {:.0} bytes/run",
        db_bytes as f64 / 1048576.0,
        if runs > 0 {
            db_bytes as f64 / runs as f64
        } else {
            0.0
        }
    );
    if let Some(c) = ceiling {
        println!(
            "ceiling, measured just before {:.0}/s, p99 {}, {:.0} µs per accepted alert: reactor took {:.0}% of its rate",
            c.rate,
            ms(c.p99_us),
            c.cpu_us,
            100.0 * rate / c.rate.max(1.0)
        );
    }
    let verified = runs == accepted && finished >= accepted;
    println!(
        "verify: runs in history ({runs}) == 2xx answers ({accepted}): {}",
        if verified { "ok" } else { "MISMATCH" }
    );
    if args.keep {
        println!("kept {}", tmp.keep().display());
    }
    anyhow::ensure!(verified, "history does not match the accepted alerts");
    Ok(())
}
