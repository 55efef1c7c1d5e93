//! Assembles the service from [`Settings`]: loads playbooks (refusing to start on an invalid one),
//! opens the store, recovers what a previous process left, binds the listener, and runs the HTTP
//! server and the dispatcher until the shutdown token fires. Tests build it on port 0.
//!
//! Runs execute on a runtime of their own, one worker thread beside the HTTP workers: sharing the
//! workers, each run's task queued behind (and ahead of) the accepts; apart, reactor took ~25%
//! less CPU per alert and 17–41% more alerts/s on two cores (the load benchmark, docs/performance.md).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{Clock, SystemClock};
use crate::config::Settings;
use crate::engine::{dispatch, Engine};
use crate::escalation::{outbox, Escalator};
use crate::executor::kubernetes::Kubernetes;
use crate::executor::{sandbox, Executor};
use crate::history::{Store, StoreError};
use crate::playbook::{self, LoadErrors};
use crate::routes::{router, serve, AppState};
use crate::{poller, watchdog};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid setting, refusing to start: {0}")]
    Config(#[from] crate::config::InvalidSetting),
    #[error("invalid playbooks, refusing to start:\n{0}")]
    Playbooks(#[from] LoadErrors),
    #[error("invalid on-call files, refusing to start:\n{0}")]
    OnCall(LoadErrors),
    #[error("cannot open the database in {dir}: {source}")]
    Store { dir: String, source: StoreError },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("server: {0}")]
    Serve(std::io::Error),
    #[error("cannot start the runs' runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Kubernetes(#[from] crate::executor::kubernetes::ConnectError),
    #[error("refusing to listen on {0} without authentication: set auth.bearer_token or auth.basic, or pass --insecure")]
    Insecure(SocketAddr),
}

pub use crate::tls::install_crypto_provider;

/// Builds the sandboxed Rhai engine from settings; shared by `serve`, `check` and `test`
/// (which pass no cluster: `k8s::` calls then fail as not configured).
pub fn rhai_engine(settings: &Settings, kube: Option<Kubernetes>) -> rhai::Engine {
    sandbox::build_engine_with(&settings.sandbox, helpers(settings, kube))
}

/// What the acting helpers may act on, from the settings.
pub fn helpers(settings: &Settings, kube: Option<Kubernetes>) -> sandbox::Helpers {
    sandbox::Helpers {
        cleanup_roots: settings.disk_cleanup.allowed_roots.clone(),
        kube,
        exec: crate::executor::exec::ExecPolicy {
            allow: settings.exec.allow.clone(),
            max_output: settings.exec.max_output_bytes,
        },
        http: http_policy(&settings.http),
    }
}

/// The `http::` helpers' policy. The settings were validated, so every prefix parses. Its client
/// follows no redirect: a redirect could lead outside the allowed prefixes.
fn http_policy(settings: &crate::config::HttpSettings) -> crate::executor::http::HttpPolicy {
    use crate::executor::http::{Credential, CredentialValue, HttpPolicy};
    let prefix = |p: &str| crate::config::url_prefix(p).ok();
    let credentials = settings
        .credentials
        .iter()
        .filter_map(|c| {
            Some(Credential {
                prefix: prefix(&c.prefix)?,
                header: reqwest::header::HeaderName::from_bytes(c.header.as_bytes()).ok()?,
                value: match (&c.value, &c.value_file) {
                    (Some(secret), _) => CredentialValue::Fixed(secret.clone()),
                    (None, Some(file)) => CredentialValue::File(file.clone()),
                    (None, None) => return None,
                },
            })
        })
        .collect();
    crate::tls::install_crypto_provider();
    let client = (!settings.allow.is_empty())
        .then(|| {
            reqwest::Client::builder()
                .user_agent(concat!("reactor/", env!("CARGO_PKG_VERSION")))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .ok()
        })
        .flatten();
    HttpPolicy {
        client,
        allow: settings.allow.iter().filter_map(|p| prefix(p)).collect(),
        credentials,
        max_body: settings.max_body_bytes,
    }
}

/// A built, bound, not yet running reactor.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    engine: Arc<Engine>,
    queue_rx: mpsc::Receiver<crate::history::Intake>,
    escalations: crate::incident::escalate::Escalations,
    /// Two replicas: the client and namespace of the leader's Lease.
    ha: Option<(kube::Client, String)>,
    settings: Settings,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .user_agent(concat!("reactor/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Self::build_with(settings, http, Arc::new(SystemClock)).await
    }

    /// Like [`Application::build`], with the HTTP client used for escalations and the clock the
    /// guards read injected.
    pub async fn build_with(
        settings: Settings,
        http: reqwest::Client,
        clock: Arc<dyn Clock>,
    ) -> Result<Application, StartupError> {
        settings.validate()?;
        if !settings.listen.ip().is_loopback() && !settings.auth.enabled() && !settings.insecure {
            return Err(StartupError::Insecure(settings.listen));
        }
        install_crypto_provider();
        // Before anything opens files: the connection cap is taken below this limit.
        serve::raise_nofile_limit();
        let kube = Kubernetes::connect(&settings.kubernetes).await?;
        match &kube {
            Some(_) => {
                tracing::info!(in_cluster = settings.kubernetes.in_cluster, kubeconfig = ?settings.kubernetes.kubeconfig, "kubernetes client ready")
            }
            None => tracing::info!("kubernetes is not configured; kubernetes steps will fail"),
        }
        let rhai = Arc::new(rhai_engine(&settings, kube.clone()));
        // Two replicas: the leader's Lease and the target locks live in the cluster.
        let ha_client = kube
            .as_ref()
            .filter(|_| settings.ha.enabled)
            .map(|k| k.client().clone());
        let ha_namespace = settings
            .ha
            .namespace
            .clone()
            .or_else(crate::ha::own_namespace)
            .unwrap_or_else(|| "default".into());
        let leadership = if settings.ha.enabled {
            let identity = crate::ha::identity(&settings.ha);
            tracing::info!(%identity, namespace = %ha_namespace, lease = %settings.ha.lease_name, "two replicas: campaigning for the leader's Lease");
            crate::ha::Leadership::elected(identity)
        } else {
            crate::ha::Leadership::single()
        };
        let target_locks = ha_client.clone().map(|client| {
            crate::ha::TargetLocks::new(
                client,
                &ha_namespace,
                leadership.identity().to_owned(),
                settings.kubernetes.request_timeout,
                &settings.ha,
            )
        });
        let playbooks = playbook::load_dir(&settings.playbooks_dir, &settings.scripts_dir, &rhai)?;
        playbooks.check_routes(&settings.channel_names())?;
        let oncall = crate::incident::oncall::load_dir(&settings.oncall_dir)
            .map_err(StartupError::OnCall)?;
        tracing::info!(services = oncall.services.len(), teams = oncall.teams.len(), dir = %settings.oncall_dir.display(), "on-call files loaded");
        let services: Vec<String> = oncall.services.keys().cloned().collect();
        let known: Vec<&str> = services.iter().map(String::as_str).collect();
        let approvers = oncall.approvers();
        let approver_names: Vec<&str> = approvers.iter().map(String::as_str).collect();
        playbooks.check_services(&known, &approver_names)?;
        oncall
            .check_channels(&settings.channel_names(), |c| {
                settings.channel_needs_address(c)
            })
            .map_err(StartupError::OnCall)?;
        for (field, service) in [
            ("incidents.service", &settings.incidents.service),
            (
                "incidents.reactor_service",
                &settings.incidents.reactor_service,
            ),
        ] {
            if let Some(service) = service.as_deref().filter(|s| !known.contains(s)) {
                return Err(StartupError::Config(crate::config::InvalidSetting {
                    field,
                    message: format!(
                        "{field}: unknown service {service:?} (services of the on-call files: {})",
                        known.join(", ")
                    ),
                }));
            }
        }
        tracing::info!(count = playbooks.len(), dir = %settings.playbooks_dir.display(), "playbooks loaded");
        if settings.dry_run {
            tracing::warn!(
                mode = "dry run",
                "dry run: steps act on nothing (dry_run / REACTOR_DRY_RUN)"
            );
        } else {
            tracing::info!(mode = "live", "live: steps act");
        }
        if settings.alertmanager.url.is_none() {
            tracing::warn!("no escalation target is configured (alertmanager.url): a remediation that fails pages nobody");
        }
        let store =
            Store::open_with(&settings.data_dir, settings.durability).map_err(|source| {
                StartupError::Store {
                    dir: settings.data_dir.display().to_string(),
                    source,
                }
            })?;
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| StartupError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        let bound = listener.local_addr().map_err(StartupError::Serve)?;
        let (queue, queue_rx) = mpsc::channel(settings.limits.queue_capacity.max(1));
        let store_error = |source| StartupError::Store {
            dir: settings.data_dir.display().to_string(),
            source,
        };
        let in_force = Arc::new(playbook::InForce::new(playbooks));
        let external_url = settings.external_url(bound);
        // One outbox and one incident store, shared by the engine, the watchdog, the incident
        // API and the escalation engine.
        let notifier = crate::notify::Notifier::open(
            &store,
            crate::notify::Channels::new(http.clone(), settings.channels.clone()),
            settings.storm.clone(),
            external_url.clone(),
            clock.now(),
        )
        .map_err(store_error)?;
        let engine = Engine::new(
            store.clone(),
            Arc::clone(&in_force),
            Executor::new(Arc::clone(&rhai), settings.dry_run, kube)
                .with_max_memory(settings.sandbox.max_memory_bytes)
                .with_exec(helpers(&settings, None).exec),
            Escalator::new(http, settings.alertmanager.clone()),
            notifier.clone(),
            Arc::clone(&clock),
            external_url.clone(),
        )
        .map_err(store_error)?
        .with_route(settings.route.to.clone())
        .with_shadow(settings.mode == crate::playbook::Mode::Shadow)
        .with_ha(Arc::clone(&leadership), target_locks);
        let incidents = crate::incident::Incidents::open(&store, Arc::clone(&engine.metrics))
            .map_err(store_error)?
            .with_pages(notifier.clone());
        incidents.count_open().map_err(store_error)?;
        let engine = engine.with_incidents(incidents.clone(), settings.incidents.service.clone());
        let restored = incidents.restore_timers().map_err(store_error)?;
        tracing::debug!(restored, "escalation timers of open incidents set");
        let signer = incidents.signer();
        let oncall = Arc::new(oncall);
        let escalations = crate::incident::escalate::Escalations::new(
            incidents.clone(),
            notifier,
            Arc::clone(&oncall),
            clock,
            external_url.clone(),
            signer.clone(),
        );
        if let Some(name) = &settings.deadman.alertname {
            engine.health.expect_deadman(name);
        }
        let engine = Arc::new(engine);
        let reloader = Arc::new(
            crate::reload::Reloader::new(
                settings.playbooks_dir.clone(),
                settings.scripts_dir.clone(),
                rhai,
                in_force,
                Arc::clone(&engine.metrics),
            )
            .with_channels(
                settings
                    .channel_names()
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
            )
            .with_services(services.clone(), approvers.clone()),
        );
        let desk = Arc::new(crate::incident::Desk {
            incidents,
            keys: crate::incident::keys::Keys::open(&store).map_err(store_error)?,
            oncall,
            clock: Arc::clone(&engine.clock),
            signer,
            external_url,
        });
        let state = AppState {
            store,
            queue,
            limits: Arc::new(settings.limits.clone()),
            credentials: crate::routes::credentials(&settings.auth),
            reloader,
            dry_run: settings.dry_run,
            metrics: Arc::clone(&engine.metrics),
            health: Arc::clone(&engine.health),
            guards: engine.guards.clone(),
            leadership: Arc::clone(&leadership),
            pauses: engine.pauses.clone(),
            approver: Some(crate::engine::Approver(Arc::clone(&engine))),
            desk,
        };
        Ok(Application {
            listener,
            state,
            engine,
            queue_rx,
            escalations,
            ha: ha_client.map(|c| (c, ha_namespace)),
            settings,
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// Cancelling this token stops the service gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until the shutdown token fires, then drains in-flight runs (up to the configured
    /// grace) and flushes the database.
    pub async fn run(self) -> Result<(), StartupError> {
        let Application {
            listener,
            state,
            engine,
            queue_rx,
            escalations,
            ha,
            settings,
            tracker,
            shutdown,
        } = self;
        let (pending, rerun) = engine
            .recover()
            .await
            .map_err(|source| StartupError::Store {
                dir: settings.data_dir.display().to_string(),
                source,
            })?;
        let addr = listener.local_addr().map_err(StartupError::Serve)?;
        // Every run, resumed or dispatched, on the runs' own worker thread. It drives its own I/O
        // and timers, so a script on a blocking thread can still wait on them.
        let runs_runtime = RunsRuntime::build(sandbox::thread_stack_size(&settings.sandbox))?;
        for (run, playbook) in rerun {
            let engine = Arc::clone(&engine);
            runs_runtime
                .spawn(tracker.track_future(async move { engine.resume(run, playbook).await }));
        }
        // Alive from here, so the watchdog's first check does not see a dispatcher not yet spawned.
        let alive = engine.health.dispatcher_running();
        let background = TaskTracker::new();
        let leadership = Arc::clone(&engine.leadership);
        if let Some((client, namespace)) = ha {
            background.spawn(crate::ha::campaign(
                Arc::clone(&leadership),
                client,
                settings.ha.clone(),
                namespace,
                shutdown.clone(),
            ));
        }
        // Pages, heartbeats, escalations and held alerts: the leader's work only.
        {
            let (outbox, escalator, clock, metrics) = (
                engine.outbox.clone(),
                engine.escalator.clone(),
                Arc::clone(&engine.clock),
                Arc::clone(&engine.metrics),
            );
            background.spawn(crate::ha::while_leading(
                Arc::clone(&leadership),
                shutdown.clone(),
                move |token| {
                    outbox::send_loop(
                        outbox.clone(),
                        escalator.clone(),
                        Arc::clone(&clock),
                        Arc::clone(&metrics),
                        token,
                    )
                },
            ));
        }
        {
            let (notifier, clock, metrics) = (
                engine.notifier.clone(),
                Arc::clone(&engine.clock),
                Arc::clone(&engine.metrics),
            );
            background.spawn(crate::ha::while_leading(
                Arc::clone(&leadership),
                shutdown.clone(),
                move |token| {
                    crate::notify::outbox::send_loop(
                        notifier.clone(),
                        Arc::clone(&clock),
                        Arc::clone(&metrics),
                        token,
                    )
                },
            ));
        }
        background.spawn(crate::ha::while_leading(
            Arc::clone(&leadership),
            shutdown.clone(),
            move |token| escalations.clone().run(token),
        ));
        let watched = watchdog::Watched {
            health: Arc::clone(&engine.health),
            metrics: Arc::clone(&engine.metrics),
            store: engine.store.clone(),
            outbox: engine.outbox.clone(),
            clock: Arc::clone(&engine.clock),
            in_flight: Arc::clone(&engine.in_flight),
        };
        let paging = watchdog::Paging {
            notifier: engine.notifier.clone(),
            deadman_after: settings.deadman.after,
            incidents: engine
                .incidents
                .clone()
                .zip(settings.incidents.reactor_service.clone()),
        };
        let (api, watchdog_settings, instance) = (
            engine.escalator.api().clone(),
            settings.watchdog.clone(),
            engine.external_url.clone(),
        );
        background.spawn(crate::ha::while_leading(
            Arc::clone(&leadership),
            shutdown.clone(),
            move |token| {
                watchdog::watch(
                    watched.clone(),
                    api.clone(),
                    watchdog_settings.clone(),
                    instance.clone(),
                    paging.clone(),
                    token,
                )
            },
        ));
        background.spawn(crate::engine::approval_loop(
            Arc::clone(&engine),
            shutdown.clone(),
        ));
        let am = &settings.alertmanager;
        let verify_poll = if am.poll_interval.is_zero() {
            std::time::Duration::from_secs(5)
        } else {
            am.poll_interval
        };
        {
            let engine = Arc::clone(&engine);
            background.spawn(crate::ha::while_leading(
                Arc::clone(&leadership),
                shutdown.clone(),
                move |token| crate::engine::verify_loop(Arc::clone(&engine), verify_poll, token),
            ));
        }
        if am.url.is_some() && !am.poll_interval.is_zero() {
            let inbox = poller::Inbox {
                store: engine.store.clone(),
                health: Arc::clone(&engine.health),
                metrics: Arc::clone(&engine.metrics),
                queue: state.queue.clone(),
            };
            let (api, interval, filter) = (
                engine.escalator.api().clone(),
                am.poll_interval,
                am.poll_filter.clone(),
            );
            // A replica that becomes leader first catches up with Alertmanager's firing alerts.
            let catch_up = settings.ha.enabled;
            background.spawn(crate::ha::while_leading(
                Arc::clone(&leadership),
                shutdown.clone(),
                move |token| {
                    poller::poll_loop(
                        inbox.clone(),
                        api.clone(),
                        interval,
                        filter.clone(),
                        catch_up,
                        token,
                    )
                },
            ));
        }
        let retention = crate::retention::Retention {
            store: engine.store.clone(),
            outbox: engine.outbox.clone(),
            notifier: engine.notifier.clone(),
            guards: engine.guards.clone(),
            clock: Arc::clone(&engine.clock),
            playbooks: Arc::clone(&engine.playbooks),
        };
        background.spawn(crate::retention::prune_loop(
            retention,
            settings.history.clone(),
            shutdown.clone(),
        ));
        if settings.watch {
            tracing::info!("reloading the playbooks when their files change (--watch)");
            background.spawn(crate::reload::watch(
                Arc::clone(&state.reloader),
                crate::reload::WATCH_INTERVAL,
                shutdown.clone(),
            ));
        }
        match crate::reload::on_sighup(Arc::clone(&state.reloader), shutdown.clone()) {
            Ok(task) => {
                background.spawn(task);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /-/reload")
            }
        }
        background.close();
        if !pending.is_empty() {
            engine.health.backlog.added(pending.len());
            let queue = state.queue.clone();
            let stop = shutdown.clone();
            tracker.spawn(async move {
                for intake in pending {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        sent = queue.send(intake) => if sent.is_err() { return },
                    }
                }
            });
        }
        let store = state.store.clone();
        let limits = settings.limits.clone();
        let dispatcher = runs_runtime.spawn({
            let shutdown = shutdown.clone();
            async move {
                let _alive = alive;
                dispatch(
                    engine,
                    queue_rx,
                    settings.limits.max_concurrent_runs,
                    tracker,
                    shutdown,
                    settings.limits.shutdown_grace,
                )
                .await
            }
        });
        tracing::info!(%addr, "reactor listening");
        serve::serve(listener, router(state), &limits, shutdown.clone()).await;
        shutdown.cancel();
        if let Err(e) = dispatcher.await {
            tracing::error!(error = %e, "dispatcher task failed");
        }
        // Runs still in flight were recorded as interrupted by the dispatcher; don't wait on them.
        drop(runs_runtime);
        background.wait().await;
        if let Err(e) = store.durable().await {
            tracing::error!(error = %e, "final database flush failed");
        }
        tracing::info!("reactor stopped");
        Ok(())
    }
}

/// The runs' runtime, shut down without waiting for its threads however `run` ends: also when
/// its future is dropped inside another runtime (aborted, or its test failing), where dropping a
/// runtime the usual way would block and panic.
struct RunsRuntime(Option<tokio::runtime::Runtime>);

impl RunsRuntime {
    /// `stack`: each thread's stack, sized for the deepest script the sandbox allows (scripts
    /// run on these threads, inline or on the blocking ones).
    fn build(stack: usize) -> Result<RunsRuntime, StartupError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_stack_size(stack)
            .thread_name("reactor-runs")
            .enable_all()
            .build()
            .map(|rt| RunsRuntime(Some(rt)))
            .map_err(StartupError::Runtime)
    }
}

impl std::ops::Deref for RunsRuntime {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("present until dropped")
    }
}

impl Drop for RunsRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown signal received");
}
