//! Playbooks: which alerts a remediation applies to and what it runs. This module owns the
//! validated [`Playbook`] model, the [`Playbooks`] index that picks the playbooks for an alert,
//! and [`InForce`], the set in force that a reload replaces; [`loader`] turns YAML files into
//! it, [`matcher`] and [`template`] are its building blocks.

pub mod kubernetes;
pub mod lint;
pub mod loader;
pub mod matcher;
pub mod template;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::domain::{Alert, AlertStatus};
pub use loader::{load_dir, LoadError, LoadErrors};
pub use matcher::{parse_matchers, LabelMatcher, MatchOp};
pub use template::{Template, TemplateContext};

/// A playbook's guard settings (see docs/playbooks.md).
#[derive(Debug, Clone, PartialEq)]
pub struct GuardPolicy {
    /// Labels that identify the target; `None` means all of the alert's labels.
    pub target_labels: Option<Vec<String>>,
    /// No new run for the same target within this long after the last one started.
    pub cooldown: Duration,
    /// At most this many runs per target per `window`; 0 disables the limit.
    pub max_attempts: u32,
    pub window: Duration,
    pub breaker: Option<BreakerPolicy>,
}

impl Default for GuardPolicy {
    fn default() -> Self {
        GuardPolicy {
            target_labels: None,
            cooldown: Duration::ZERO,
            max_attempts: 3,
            window: Duration::from_secs(3600),
            breaker: Some(BreakerPolicy::default()),
        }
    }
}

/// Open the breaker when `failures` of the last `of_last` runs failed; try again after `cooldown`.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerPolicy {
    pub failures: u32,
    pub of_last: u32,
    pub cooldown: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failures: 5,
            of_last: 10,
            cooldown: Duration::from_secs(600),
        }
    }
}

/// Where a playbook was defined, for messages and `reactor test`.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: u64,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A loaded, validated playbook.
#[derive(Debug)]
pub struct Playbook {
    pub name: String,
    pub description: String,
    pub origin: Origin,
    /// Exact alertname this playbook is indexed under, when it has one.
    pub alertname: Option<String>,
    /// Every matcher, including the alertname one.
    pub matchers: Vec<LabelMatcher>,
    /// Alert statuses that start a run. Firing only unless the playbook says otherwise.
    pub statuses: Vec<AlertStatus>,
    pub steps: Vec<Step>,
    pub escalate: EscalateSpec,
    pub guards: GuardPolicy,
    /// Steps are safe to run again: a run interrupted by a crash is re-run instead of escalated.
    pub idempotent: bool,
    pub on_resolved: OnResolved,
    /// Runs of this playbook at once; 0 means only the global limit applies.
    pub max_concurrent: usize,
    /// `verify.resolved_within`: after the steps succeed, how long the alert has to resolve
    /// before the run counts as failed.
    pub verify: Option<Duration>,
    /// Silence the alert in Alertmanager while the run (and its verification) is in progress.
    pub silence: bool,
    /// `shadow`: every step runs as a dry run, nobody is paged, the run records what it would
    /// have done.
    pub mode: Mode,
}

/// Whether a playbook acts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Live,
    Shadow,
}

/// What a resolved notification does to a run of this playbook that is still in progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnResolved {
    /// Let it finish (default).
    #[default]
    Finish,
    /// Stop it between operations and record it as `cancelled`.
    Cancel,
}

impl Playbook {
    pub fn matches(&self, alert: &Alert) -> bool {
        self.matchers.iter().all(|m| m.matches(&alert.labels))
    }

    pub fn triggers_on(&self, status: AlertStatus) -> bool {
        self.statuses.contains(&status)
    }

    /// The longest the steps may take: every attempt's timeout plus the delays between them.
    pub fn time_budget(&self) -> Duration {
        self.steps
            .iter()
            .map(|s| {
                let attempts = s.retries.saturating_add(1);
                s.timeout
                    .saturating_mul(attempts)
                    .saturating_add(s.retry_delay.saturating_mul(s.retries))
            })
            .fold(Duration::ZERO, Duration::saturating_add)
    }
}

/// One step of a playbook.
#[derive(Debug)]
pub struct Step {
    pub name: String,
    pub action: StepAction,
    pub timeout: Duration,
    /// Extra attempts after the first failure.
    pub retries: u32,
    pub retry_delay: Duration,
    pub params: Vec<(String, Param)>,
    /// Step-level dry run; `None` falls back to the global setting.
    pub dry_run: Option<bool>,
    /// A human approves this step before it runs.
    pub approval: Option<ApprovalGate>,
}

/// `approval: {timeout: 15m, from: NAME}`: the step runs only once a human says yes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalGate {
    /// Without an answer by then, the run fails and escalates.
    pub timeout: Duration,
    /// A team of the on-call files (asked through its escalation policy) or a person.
    pub from: String,
    /// The line of `approval:`, for `reactor check`.
    pub line: u64,
}

/// The default wait for an approval.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// What a step does.
#[derive(Debug, Clone)]
pub enum StepAction {
    /// A Rhai script, compiled once at load. `source` names the file or the inline location.
    Rhai {
        ast: Arc<rhai::AST>,
        source: String,
        /// The script's text, for `reactor check`'s warnings.
        code: Arc<str>,
        /// Its file, and the line before its first: the script's line N is line `at.line + N`
        /// of `at.file` (a playbook's, for inline scripts), which errors name.
        at: Arc<Origin>,
    },
    /// A Kubernetes action (`restart_pod`, `rollout_restart`, `scale_up`, `disk_cleanup`) whose
    /// arguments are the step's templated `params`.
    Kubernetes { action: String },
    /// A program (an absolute path, never templated) and its templated arguments, run without a
    /// shell with the alert's labels as `ALERT_*` variables.
    Command {
        program: String,
        args: Vec<Template>,
    },
}

impl StepAction {
    pub fn describe(&self) -> String {
        match self {
            StepAction::Rhai { source, .. } => format!("rhai {source}"),
            StepAction::Kubernetes { action } => format!("kubernetes {action}"),
            StepAction::Command { program, .. } => format!("command {program}"),
        }
    }

    /// A `command:` step's arguments for one run; empty for other steps.
    pub fn render_args(&self, ctx: &TemplateContext<'_>) -> Vec<String> {
        match self {
            StepAction::Command { args, .. } => args.iter().map(|t| t.render(ctx)).collect(),
            _ => Vec::new(),
        }
    }
}

/// A step parameter: strings are templates, everything else passes through as written.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Text(Template),
    Value(serde_json::Value),
    List(Vec<Param>),
    Map(Vec<(String, Param)>),
}

impl Param {
    pub fn from_yaml(value: serde_json::Value) -> Result<Param, String> {
        Ok(match value {
            serde_json::Value::String(s) => Param::Text(Template::parse(&s)?),
            serde_json::Value::Array(items) => Param::List(
                items
                    .into_iter()
                    .map(Param::from_yaml)
                    .collect::<Result<_, _>>()?,
            ),
            serde_json::Value::Object(map) => Param::Map(
                map.into_iter()
                    .map(|(k, v)| Ok((k, Param::from_yaml(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => Param::Value(other),
        })
    }

    pub fn render(&self, ctx: &TemplateContext<'_>) -> serde_json::Value {
        match self {
            Param::Text(t) => serde_json::Value::String(t.render(ctx)),
            Param::Value(v) => v.clone(),
            Param::List(items) => items.iter().map(|p| p.render(ctx)).collect(),
            Param::Map(entries) => entries
                .iter()
                .map(|(k, p)| (k.clone(), p.render(ctx)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        }
    }
}

/// Renders a step's parameters into one JSON object.
pub fn render_params(
    step: &Step,
    ctx: &TemplateContext<'_>,
) -> serde_json::Map<String, serde_json::Value> {
    step.params
        .iter()
        .map(|(k, p)| (k.clone(), p.render(ctx)))
        .collect()
}

/// How a failed run pages. Unset fields fall back to the global escalation settings.
#[derive(Debug, Default)]
pub struct EscalateSpec {
    /// `escalate.to`: the channels this playbook's pages go to, and the line naming them; unset
    /// follows the configuration's `route.to`.
    pub to: Option<(Vec<String>, u64)>,
    /// `escalate.incident.service`: the service a failed run opens an incident for, and the
    /// line naming it; unset follows the configuration's `incidents.service`.
    pub incident: Option<(String, u64)>,
    pub severity: Option<String>,
    pub summary: Option<Template>,
    pub description: Option<Template>,
}

/// The playbooks in force: read for every alert, replaced whole by a reload. A run holds the
/// [`Playbook`] it started with, so a reload never changes a run in flight.
#[derive(Debug, Default)]
pub struct InForce(std::sync::RwLock<Arc<Playbooks>>);

impl InForce {
    pub fn new(playbooks: Playbooks) -> InForce {
        InForce(std::sync::RwLock::new(Arc::new(playbooks)))
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<Playbooks> {
        let set = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(&set)
    }

    /// Puts `playbooks` in force; alerts from here on are matched against them.
    pub fn replace(&self, playbooks: Playbooks) {
        let mut set = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *set = Arc::new(playbooks);
    }

    /// The playbook of that name in the set in force.
    pub fn get(&self, name: &str) -> Option<Arc<Playbook>> {
        self.current().get(name).cloned()
    }
}

/// Every loaded playbook, indexed by exact alertname so that matching one alert looks only at the
/// playbooks that can apply to it, plus those without an exact alertname.
#[derive(Debug, Default)]
pub struct Playbooks {
    list: Vec<Arc<Playbook>>,
    by_alertname: HashMap<String, Vec<usize>>,
    unindexed: Vec<usize>,
}

impl Playbooks {
    pub fn new(list: Vec<Playbook>) -> Playbooks {
        let mut by_alertname: HashMap<String, Vec<usize>> = HashMap::new();
        let mut unindexed = Vec::new();
        for (i, p) in list.iter().enumerate() {
            match &p.alertname {
                Some(name) => by_alertname.entry(name.clone()).or_default().push(i),
                None => unindexed.push(i),
            }
        }
        Playbooks {
            list: list.into_iter().map(Arc::new).collect(),
            by_alertname,
            unindexed,
        }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Playbook>> {
        self.list.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Playbook>> {
        self.list.iter().find(|p| p.name == name)
    }

    /// Every `escalate.incident.service` naming a service not in `known`, and every approval's
    /// `from` naming neither a team nor a person of `approvers`, at its file and line.
    pub fn check_services(
        &self,
        known: &[&str],
        approvers: &[&str],
    ) -> Result<(), loader::LoadErrors> {
        let gates = self.list.iter().flat_map(|p| {
            p.steps.iter().filter_map(move |s| {
                let gate = s.approval.as_ref()?;
                (!approvers.contains(&gate.from.as_str())).then(|| loader::LoadError {
                    file: p.origin.file.clone(),
                    line: Some(gate.line),
                    message: format!(
                        "playbook {:?}: step {:?}: approval.from: {:?} is neither a team nor a person of the on-call files ({})",
                        p.name,
                        s.name,
                        gate.from,
                        approvers.join(", ")
                    ),
                })
            })
        });
        let errors: Vec<loader::LoadError> = self
            .list
            .iter()
            .filter_map(|p| {
                let (service, line) = p.escalate.incident.as_ref()?;
                (!known.contains(&service.as_str())).then(|| loader::LoadError {
                    file: p.origin.file.clone(),
                    line: Some(*line),
                    message: format!(
                        "playbook {:?}: escalate.incident.service: unknown service {service:?} (services of the on-call files: {})",
                        p.name,
                        known.join(", ")
                    ),
                })
            })
            .chain(gates)
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(loader::LoadErrors(errors))
        }
    }

    /// Every `escalate.to` naming a channel not in `known`, at its file and line.
    pub fn check_routes(&self, known: &[&str]) -> Result<(), loader::LoadErrors> {
        let errors: Vec<loader::LoadError> = self
            .list
            .iter()
            .filter_map(|p| {
                let (to, line) = p.escalate.to.as_ref()?;
                let message = match to.iter().find(|n| !known.contains(&n.as_str())) {
                    Some(unknown) => format!(
                        "playbook {:?}: escalate.to: unknown channel {unknown:?} (channels: {})",
                        p.name,
                        known.join(", ")
                    ),
                    None if to.is_empty() => format!(
                        "playbook {:?}: escalate.to: name at least one channel ({})",
                        p.name,
                        known.join(", ")
                    ),
                    None => return None,
                };
                Some(loader::LoadError {
                    file: p.origin.file.clone(),
                    line: Some(*line),
                    message,
                })
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(loader::LoadErrors(errors))
        }
    }

    /// The playbooks whose matchers accept the alert's labels, in load order. Status is not
    /// considered here: the engine records a skip when a matching playbook does not trigger on it.
    pub fn matching(&self, alert: &Alert) -> Vec<Arc<Playbook>> {
        let indexed = self
            .by_alertname
            .get(alert.alertname())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut out = Vec::new();
        let (mut i, mut j) = (0, 0);
        // Merge the two sorted index lists to keep load order.
        while i < indexed.len() || j < self.unindexed.len() {
            let take_indexed =
                j >= self.unindexed.len() || (i < indexed.len() && indexed[i] < self.unindexed[j]);
            let idx = if take_indexed {
                i += 1;
                indexed[i - 1]
            } else {
                j += 1;
                self.unindexed[j - 1]
            };
            let p = &self.list[idx];
            if p.matches(alert) {
                out.push(Arc::clone(p));
            }
        }
        out
    }
}
