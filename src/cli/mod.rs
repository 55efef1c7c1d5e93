//! The `reactor` command line: `serve`, `check`, `test`, `runs`, `reload`, `run` and `channels`. Each subcommand parses its
//! flags here and calls into the library; output formatting for humans lives here too.

mod authoring;
mod channels;
mod gates;
mod incidents;
mod keys;
mod oncall;
mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::app::{self, Application};
use crate::config::{Overrides, Settings};
use crate::history::Outcome;
use crate::telemetry::{self, LogFormat};
use authoring::{check, test};
use service::{reload, run_by_hand, runs};

#[derive(Debug, Parser)]
#[command(
    name = "reactor",
    version,
    about = "Self-healing remediation engine for Prometheus Alertmanager"
)]
pub struct Cli {
    /// YAML configuration file; REACTOR_* environment variables and flags override it.
    #[arg(long, global = true, env = "REACTOR_CONFIG")]
    config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the webhook receiver and remediation engine.
    Serve(ServeArgs),
    /// Parse every playbook and compile every Rhai script; exit 1 with file:line errors if any.
    Check(CheckArgs),
    /// Show which playbooks would run for each alert of a webhook payload or an Alertmanager API
    /// list of alerts (running nothing, unless --run: a dry run).
    Test(TestArgs),
    /// List runs from the history (via the API, or from the database when the service is stopped).
    Runs(RunsArgs),
    /// Ask the running service to reload its playbooks and scripts (as SIGHUP does).
    Reload(ServiceArgs),
    /// Ask the running service to run one playbook for an alert, through the guards and the
    /// history like any run.
    Run(RunArgs),
    /// List the notification channels, or send one a test notification.
    Channels(ChannelsArgs),
    /// Make, list or revoke API keys of the incident API (through the running service).
    Keys(KeysArgs),
    /// List incidents, show, claim or resolve one, or print its report (through the running
    /// service).
    Incidents(IncidentsArgs),
    /// Pause remediation for a playbook or for the alerts some matchers select, for a while
    /// (matching alerts are recorded as `paused` runs and nothing acts).
    Pause(GateArgs<PauseArgs>),
    /// List the maintenance pauses in force (--all: every one).
    Pauses(GateArgs<PausesArgs>),
    /// Lift a maintenance pause early.
    Unpause(GateArgs<UnpauseArgs>),
    /// Approve the step a run waits on.
    Approve(GateArgs<AnswerArgs>),
    /// Deny the step a run waits on: the run ends `denied` and nothing of it acts.
    Deny(GateArgs<AnswerArgs>),
    /// Who is on call for each team now (or --at a time), and whom each escalation level
    /// notifies; read from the on-call files.
    Oncall(OncallArgs),
}

#[derive(Debug, Args)]
struct GateArgs<T: Args> {
    #[command(flatten)]
    what: T,
    #[command(flatten)]
    service: ServiceArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("scope").required(true).multiple(true).args(["playbook", "matchers"])))]
struct PauseArgs {
    /// Only this playbook's runs.
    #[arg(long)]
    playbook: Option<String>,
    /// Only alerts these Alertmanager matchers select: 'namespace="shop"'.
    #[arg(long)]
    matchers: Option<String>,
    /// How long: 30m, 2h (1s to 30d).
    #[arg(long = "for")]
    length: String,
    /// Why, for the runs it holds and the list.
    #[arg(long)]
    reason: String,
    /// Who pauses (default: $USER).
    #[arg(long)]
    by: Option<String>,
}

#[derive(Debug, Args)]
struct PausesArgs {
    /// Every pause, also expired and lifted ones.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Args)]
struct UnpauseArgs {
    id: u64,
    /// Who lifts it (default: $USER).
    #[arg(long)]
    by: Option<String>,
}

#[derive(Debug, Args)]
struct AnswerArgs {
    /// The run waiting for approval (42-0).
    run: String,
    /// Who answers (default: $USER).
    #[arg(long)]
    by: Option<String>,
}

/// What `gates` does.
#[derive(Debug)]
enum GateCommand {
    Pause {
        playbook: Option<String>,
        matchers: Option<String>,
        length: String,
        reason: String,
        by: Option<String>,
    },
    Pauses {
        all: bool,
    },
    Unpause {
        id: u64,
        by: Option<String>,
    },
    Approve {
        run: String,
        by: Option<String>,
    },
    Deny {
        run: String,
        by: Option<String>,
    },
}

#[derive(Debug, Args)]
struct OncallArgs {
    /// Only this team.
    team: Option<String>,
    /// An RFC 3339 instant (2027-03-29T07:30:00Z) or a local time in the team's zone
    /// (2027-03-29T09:30); default now.
    #[arg(long)]
    at: Option<String>,
}

#[derive(Debug, Args)]
struct IncidentsArgs {
    #[command(subcommand)]
    command: Option<IncidentsCommand>,
    /// Only incidents in this state (OPEN, CLAIMED, RESOLVED).
    #[arg(long)]
    state: Option<String>,
    #[command(flatten)]
    service: ServiceArgs,
}

#[derive(Debug, Subcommand)]
enum IncidentsCommand {
    /// One incident with its timeline, as JSON.
    Show { number: u64 },
    /// Claim an incident.
    Claim {
        number: u64,
        /// Who claims it (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
    /// Resolve an incident.
    Resolve {
        number: u64,
        /// Who resolves it (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
    /// The post-incident report, in Markdown.
    Report { number: u64 },
}

#[derive(Debug, Args)]
struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
    #[command(flatten)]
    service: ServiceArgs,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Make a key and print it, once.
    Create {
        /// Who uses it (e.g. nagios).
        #[arg(long)]
        name: String,
        /// incidents:write, incidents:ack or read; repeat for several.
        #[arg(long, required = true)]
        scope: Vec<String>,
    },
    /// The keys, with their scopes (never the keys themselves).
    List,
    /// Revoke a key by its name.
    Revoke { name: String },
}

#[derive(Debug, Args)]
struct ChannelsArgs {
    #[command(subcommand)]
    command: Option<ChannelsCommand>,
}

#[derive(Debug, Subcommand)]
enum ChannelsCommand {
    /// Send a clearly labelled test notification to channel NAME and print the service's answer.
    Test {
        /// The channel's name under `channels:`.
        name: String,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The playbook to run, whatever its matchers say.
    playbook: String,
    /// A file with an alert: a webhook payload (each of its alerts runs), or one alert object
    /// ("-" reads standard input).
    #[arg(long)]
    alert: PathBuf,
    /// Run every step as a dry run.
    #[arg(long)]
    dry_run: bool,
    /// Who asks, for the record (default: $USER).
    #[arg(long)]
    by: Option<String>,
    #[command(flatten)]
    service: ServiceArgs,
}

/// How to reach the running service.
#[derive(Debug, Args)]
struct ServiceArgs {
    /// reactor's base URL (default: http:// plus the configured listen address).
    #[arg(long)]
    url: Option<String>,
    /// The API's bearer token (default: the configured auth.bearer_token).
    #[arg(long, env = "REACTOR_AUTH_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on: IP:PORT or localhost:PORT (default 127.0.0.1:9097).
    #[arg(long, value_parser = crate::config::parse_listen)]
    listen: Option<SocketAddr>,
    /// Database directory (default ./data).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Playbook directory (default ./playbooks).
    #[arg(long)]
    playbooks: Option<PathBuf>,
    /// Rhai script directory (default ./scripts).
    #[arg(long)]
    scripts: Option<PathBuf>,
    /// Alertmanager base URL that escalations are posted to.
    #[arg(long)]
    alertmanager_url: Option<String>,
    /// Allow a non-loopback listen address without authentication.
    #[arg(long)]
    insecure: bool,
    /// Reload the playbooks and scripts when a file in their directories changes.
    #[arg(long)]
    watch: bool,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Playbook directory (default: the configured one, ./playbooks).
    dir: Option<PathBuf>,
    /// Rhai script directory (default: `scripts` beside DIR if it exists, else the configured one).
    #[arg(long)]
    scripts: Option<PathBuf>,
    /// Exit 1 on warnings too (a step that can only fail under the configuration).
    #[arg(long)]
    strict: bool,
}

#[derive(Debug, Args)]
struct TestArgs {
    /// A webhook payload as Alertmanager sends it, or its API's list of alerts ("-" reads
    /// standard input).
    alert: PathBuf,
    /// Playbook directory or file (default: the configured one, ./playbooks).
    #[arg(long)]
    playbooks: Option<PathBuf>,
    /// Rhai script directory (default: `scripts` beside the playbooks if it exists, else the
    /// configured one).
    #[arg(long)]
    scripts: Option<PathBuf>,
    /// Also run each step of the playbooks that would run, once, as a dry run (with no
    /// Kubernetes cluster), and print its output.
    #[arg(long)]
    run: bool,
}

#[derive(Debug, Args)]
struct RunsArgs {
    #[command(subcommand)]
    show: Option<RunsCommand>,
    /// Only runs with this outcome (succeeded, failed, skipped, deduplicated, verifying, ...).
    #[arg(long)]
    outcome: Option<Outcome>,
    /// Only runs of this playbook.
    #[arg(long)]
    playbook: Option<String>,
    /// Only runs of alerts with this alertname.
    #[arg(long)]
    alertname: Option<String>,
    /// Only shadow runs (`shadow`: what shadow playbooks would have done) or only live ones.
    #[arg(long, value_parser = ["shadow", "live"])]
    mode: Option<String>,
    /// At most this many runs, newest first.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    service: ServiceArgs,
    /// Database directory used when the service is not running (default: the configured one).
    #[arg(long)]
    data: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum RunsCommand {
    /// Show one run with every step attempt, its output and logs.
    Show {
        /// The run's id, e.g. 42-0.
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a recorded run's alert again with its playbook, through the guards.
    Rerun {
        /// The run's id, e.g. 42-0.
        id: String,
        /// Run every step as a dry run.
        #[arg(long)]
        dry_run: bool,
        /// Who asks, for the record (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(run(cli))
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

async fn run(cli: Cli) -> ExitCode {
    let overrides = match &cli.command {
        Command::Serve(a) => Overrides {
            listen: a.listen,
            data_dir: a.data.clone(),
            playbooks_dir: a.playbooks.clone(),
            scripts_dir: a.scripts.clone(),
            alertmanager_url: a.alertmanager_url.clone(),
            insecure: a.insecure,
            watch: a.watch,
        },
        Command::Runs(a) => Overrides {
            data_dir: a.data.clone(),
            ..Overrides::default()
        },
        _ => Overrides::default(),
    };
    let settings = match Settings::load(cli.config.as_deref(), &overrides) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    match cli.command {
        Command::Serve(_) => serve(settings).await,
        Command::Check(a) => check(settings, a),
        Command::Test(a) => test(settings, a).await,
        Command::Runs(a) => runs(settings, a).await,
        Command::Reload(a) => reload(settings, a).await,
        Command::Run(a) => run_by_hand(settings, a).await,
        Command::Keys(a) => keys::keys(settings, a.command, a.service).await,
        Command::Incidents(a) => {
            incidents::incidents(settings, a.command, a.state, a.service).await
        }
        Command::Oncall(a) => oncall::oncall(&settings, a.team, a.at),
        Command::Pause(GateArgs { what: a, service }) => {
            let c = GateCommand::Pause {
                playbook: a.playbook,
                matchers: a.matchers,
                length: a.length,
                reason: a.reason,
                by: a.by,
            };
            gates::gates(settings, c, service).await
        }
        Command::Pauses(GateArgs { what, service }) => {
            gates::gates(settings, GateCommand::Pauses { all: what.all }, service).await
        }
        Command::Unpause(GateArgs { what, service }) => {
            let c = GateCommand::Unpause {
                id: what.id,
                by: what.by,
            };
            gates::gates(settings, c, service).await
        }
        Command::Approve(GateArgs { what, service }) => {
            let c = GateCommand::Approve {
                run: what.run,
                by: what.by,
            };
            gates::gates(settings, c, service).await
        }
        Command::Deny(GateArgs { what, service }) => {
            let c = GateCommand::Deny {
                run: what.run,
                by: what.by,
            };
            gates::gates(settings, c, service).await
        }
        Command::Channels(a) => match a.command {
            None => channels::list(&settings),
            Some(ChannelsCommand::Test { name }) => channels::test(settings, &name).await,
        },
    }
}

async fn serve(settings: Settings) -> ExitCode {
    let app = match Application::build(settings).await {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let token = app.shutdown_token();
    tokio::spawn(async move {
        app::shutdown_signal().await;
        token.cancel();
    });
    match app.run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
