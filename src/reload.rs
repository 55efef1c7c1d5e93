//! Reloading playbooks and scripts without a restart, as Prometheus reloads its configuration: on
//! SIGHUP or an authenticated `POST /-/reload`. The directories are loaded and checked whole; a
//! set with any problem is refused whole (logged, counted) and the set in force keeps running.
//! Runs in flight finish on the playbook they started with. The service's settings (listen
//! address, data directory, limits, credentials, Alertmanager, Kubernetes) are read at start only.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::playbook::{load_dir, InForce, LoadError, LoadErrors};

/// Loads the playbook directories again and puts a valid set in force.
pub struct Reloader {
    playbooks_dir: PathBuf,
    scripts_dir: PathBuf,
    /// The sandbox the scripts are compiled for (the executor's).
    rhai: Arc<rhai::Engine>,
    in_force: Arc<InForce>,
    metrics: Arc<Metrics>,
    /// The channels an `escalate.to` may name.
    channels: Vec<String>,
    /// The services an `escalate.incident` may name.
    services: Vec<String>,
    /// The teams and people an `approval.from` may name.
    approvers: Vec<String>,
    /// One reload at a time: a second waits for the first and then loads again.
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// A reloader for the set `in_force`, which was loaded from these directories just now.
    pub fn new(
        playbooks_dir: PathBuf,
        scripts_dir: PathBuf,
        rhai: Arc<rhai::Engine>,
        in_force: Arc<InForce>,
        metrics: Arc<Metrics>,
    ) -> Reloader {
        metrics.config_reloaded(true);
        Reloader {
            playbooks_dir,
            scripts_dir,
            rhai,
            in_force,
            metrics,
            channels: vec![crate::config::ALERTMANAGER_CHANNEL.to_owned()],
            services: Vec::new(),
            approvers: Vec::new(),
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// The services a reloaded playbook's `escalate.incident` may name, and the teams and
    /// people its `approval.from` may name.
    pub fn with_services(mut self, services: Vec<String>, approvers: Vec<String>) -> Reloader {
        self.services = services;
        self.approvers = approvers;
        self
    }

    /// The channels a reloaded playbook's `escalate.to` may name.
    pub fn with_channels(mut self, channels: Vec<String>) -> Reloader {
        self.channels = channels;
        self
    }

    /// The set in force.
    pub fn in_force(&self) -> &InForce {
        &self.in_force
    }

    /// Loads the directories again; puts the new set in force and returns its size, or refuses
    /// it with every problem found. `trigger` names what asked, for the log.
    pub async fn reload(&self, trigger: &'static str) -> Result<usize, LoadErrors> {
        let _one = self.one_at_a_time.lock().await;
        let (dir, scripts, rhai) = (
            self.playbooks_dir.clone(),
            self.scripts_dir.clone(),
            Arc::clone(&self.rhai),
        );
        let loaded = tokio::task::spawn_blocking(move || load_dir(&dir, &scripts, &rhai))
            .await
            .unwrap_or_else(|join| {
                Err(LoadErrors(vec![LoadError {
                    file: self.playbooks_dir.clone(),
                    line: None,
                    message: format!("loading failed: {join}"),
                }]))
            });
        let known: Vec<&str> = self.channels.iter().map(String::as_str).collect();
        let services: Vec<&str> = self.services.iter().map(String::as_str).collect();
        let approvers: Vec<&str> = self.approvers.iter().map(String::as_str).collect();
        let loaded = loaded
            .and_then(|p| p.check_routes(&known).map(|()| p))
            .and_then(|p| p.check_services(&services, &approvers).map(|()| p));
        match loaded {
            Ok(playbooks) => {
                let count = playbooks.len();
                self.in_force.replace(playbooks);
                self.metrics.config_reloaded(true);
                self.metrics.reload_counted(true);
                tracing::info!(trigger, playbooks = count, "playbooks reloaded");
                Ok(count)
            }
            Err(errors) => {
                self.metrics.config_reloaded(false);
                self.metrics.reload_counted(false);
                for e in &errors.0 {
                    tracing::warn!(trigger, problem = %e, "playbook problem");
                }
                tracing::error!(
                    trigger,
                    problems = errors.0.len(),
                    "reload refused; the playbooks in force keep running"
                );
                Err(errors)
            }
        }
    }
}

/// The task that reloads at every SIGHUP until `shutdown`. The handler is installed before this
/// returns, so from then on a SIGHUP reloads and never ends the process.
pub fn on_sighup(
    reloader: Arc<Reloader>,
    shutdown: CancellationToken,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup())?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                got = hangups.recv() => {
                    if got.is_none() {
                        break;
                    }
                    let _ = reloader.reload("SIGHUP").await;
                }
            }
        }
    })
}

/// How often `--watch` looks at the directories.
pub const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The task that reloads when a file in the playbook or script directory changes (`serve
/// --watch`), looking every `interval`: the names, sizes and modification times of the files,
/// without a file-system notification API. The directories are first looked at before this
/// returns, so a change made once the service answers is never taken for the starting state. A
/// change that leaves an invalid set is refused as any reload is.
pub fn watch(
    reloader: Arc<Reloader>,
    interval: std::time::Duration,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> {
    let dirs = [reloader.playbooks_dir.clone(), reloader.scripts_dir.clone()];
    let look = move || dirs.iter().map(|d| listing(d)).collect::<Vec<_>>();
    let mut last = Some(look());
    async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
            }
            let now = tokio::task::spawn_blocking(look.clone()).await.ok();
            if now != last {
                last = now;
                let _ = reloader.reload("a file changed (--watch)").await;
            }
        }
    }
}

/// A directory's files (or the one file), with their sizes and modification times.
fn listing(path: &std::path::Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let entries: Vec<PathBuf> = if path.is_file() {
        vec![path.to_owned()]
    } else {
        std::fs::read_dir(path)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let mut out: Vec<_> = entries
        .into_iter()
        .filter_map(|p| {
            let m = std::fs::metadata(&p).ok()?;
            Some((p, m.len(), m.modified().ok()))
        })
        .collect();
    out.sort();
    out
}
