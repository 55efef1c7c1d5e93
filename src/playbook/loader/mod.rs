//! Loads playbook YAML files (one or more playbooks per file, separated by `---`) and the Rhai
//! scripts they use. Every problem is reported with the file, the line when known, and what was
//! expected; all problems of a directory are collected, so `reactor check` shows them in one go.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{
    ApprovalGate, EscalateSpec, MatchOp, OnResolved, Origin, Param, Playbook, Playbooks, Step,
    StepAction, Template,
};
use super::{BreakerPolicy, GuardPolicy};
use crate::bounds;
use crate::domain::AlertStatus;

mod parts;

/// Timeout of a step that does not set one.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between attempts of a step that does not set one.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);

/// One problem in one file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct LoadError {
    pub file: PathBuf,
    pub line: Option<u64>,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Every problem found while loading a directory.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct LoadErrors(pub Vec<LoadError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlaybook {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(rename = "match")]
    matcher: Spanned<RawMatch>,
    #[serde(default)]
    statuses: Option<Spanned<Vec<String>>>,
    steps: Spanned<Vec<Spanned<RawStep>>>,
    #[serde(default)]
    escalate: Option<Spanned<RawEscalate>>,
    #[serde(default)]
    guards: Option<RawGuards>,
    #[serde(default)]
    idempotent: bool,
    #[serde(default)]
    on_resolved: OnResolved,
    #[serde(default)]
    max_concurrent: Option<Spanned<usize>>,
    #[serde(default)]
    verify: Option<Spanned<RawVerify>>,
    #[serde(default)]
    silence: bool,
    #[serde(default)]
    mode: super::Mode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVerify {
    resolved_within: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGuards {
    #[serde(default)]
    target_labels: Option<Vec<String>>,
    #[serde(default)]
    cooldown: Option<Spanned<String>>,
    #[serde(default)]
    max_attempts: Option<Spanned<u32>>,
    #[serde(default)]
    window: Option<Spanned<String>>,
    #[serde(default)]
    circuit_breaker: Option<Spanned<RawBreaker>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    /// 0 turns the breaker off.
    failures: u32,
    #[serde(default)]
    of_last: Option<Spanned<u32>>,
    #[serde(default)]
    cooldown: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    alertname: Option<String>,
    #[serde(default)]
    matchers: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    script: Option<Spanned<String>>,
    #[serde(default)]
    inline: Option<Spanned<String>>,
    /// A Kubernetes action name; its arguments are `params`.
    #[serde(default)]
    kubernetes: Option<Spanned<String>>,
    /// A program and its arguments (templates).
    #[serde(default)]
    command: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    retries: Option<Spanned<u32>>,
    #[serde(default)]
    retry_delay: Option<Spanned<String>>,
    #[serde(default)]
    params: BTreeMap<String, Spanned<serde_json::Value>>,
    #[serde(default)]
    dry_run: Option<bool>,
    /// `{timeout: 15m, from: TEAM_OR_PERSON}`: a human approves the step first.
    #[serde(default)]
    approval: Option<Spanned<RawApproval>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApproval {
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    from: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIncident {
    service: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEscalate {
    #[serde(default)]
    to: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    incident: Option<Spanned<RawIncident>>,
    #[serde(default)]
    severity: Option<String>,
    #[serde(default)]
    summary: Option<Spanned<String>>,
    #[serde(default)]
    description: Option<Spanned<String>>,
}

/// Loads every `*.yaml`/`*.yml` file in `playbooks_dir` (or that one file), compiling the `*.rhai` scripts of
/// `scripts_dir` with `engine` (all of them, used or not, so a broken script is found early).
pub fn load_dir(
    playbooks_dir: &Path,
    scripts_dir: &Path,
    engine: &rhai::Engine,
) -> Result<Playbooks, LoadErrors> {
    let mut errors = Vec::new();
    let scripts = compile_scripts(scripts_dir, engine, &mut errors);
    // A single file is checked alone (`reactor check playbooks/disk.yaml`).
    let files = if playbooks_dir.is_file() {
        Ok(vec![playbooks_dir.to_owned()])
    } else {
        list_files(playbooks_dir, &["yaml", "yml"])
    };
    let files = match files {
        Ok(f) => f,
        Err(e) => {
            errors.push(LoadError {
                file: playbooks_dir.to_owned(),
                line: None,
                message: format!("cannot read playbook directory: {e}"),
            });
            return Err(LoadErrors(errors));
        }
    };
    let mut playbooks = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let ctx = FileCtx {
                    file: &file,
                    text: &text,
                    scripts_dir,
                    scripts: &scripts,
                    engine,
                };
                playbooks.extend(ctx.load(&mut errors));
            }
            Err(e) => errors.push(LoadError {
                file: file.clone(),
                line: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    let mut seen: HashMap<String, Origin> = HashMap::new();
    for p in &playbooks {
        if let Some(first) = seen.insert(p.name.clone(), p.origin.clone()) {
            errors.push(LoadError {
                file: p.origin.file.clone(),
                line: Some(p.origin.line),
                message: format!(
                    "duplicate playbook name {:?}, first defined at {first}",
                    p.name
                ),
            });
        }
    }
    if errors.is_empty() {
        Ok(Playbooks::new(playbooks))
    } else {
        // In file and line order, whichever check found them.
        errors.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        Err(LoadErrors(errors))
    }
}

fn list_files(dir: &Path, exts: &[&str]) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| exts.iter().any(|e| x == *e)))
        .collect();
    files.sort();
    Ok(files)
}

/// Compiles every script in the scripts directory; a missing directory simply has no scripts.
/// A compiled script and its source.
type Script = (Arc<rhai::AST>, Arc<str>);

fn compile_scripts(
    dir: &Path,
    engine: &rhai::Engine,
    errors: &mut Vec<LoadError>,
) -> HashMap<String, Script> {
    let mut out = HashMap::new();
    let Ok(files) = list_files(dir, &["rhai"]) else {
        return out;
    };
    for file in files {
        let name = file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let compiled = std::fs::read_to_string(&file)
            .map_err(|e| (None, format!("cannot read: {e}")))
            .and_then(|src| {
                let ast = engine.compile(&src).map_err(|e| rhai_error(&e, 0))?;
                Ok((Arc::new(ast), Arc::from(src)))
            });
        match compiled {
            Ok(script) => {
                out.insert(name, script);
            }
            Err((line, message)) => errors.push(LoadError {
                file,
                line,
                message,
            }),
        }
    }
    out
}

fn rhai_error(e: &rhai::ParseError, line_offset: u64) -> (Option<u64>, String) {
    let line = e.position().line().map(|l| l as u64 + line_offset);
    (line, format!("Rhai syntax error: {}", e.err_type()))
}

struct FileCtx<'a> {
    file: &'a Path,
    text: &'a str,
    scripts_dir: &'a Path,
    scripts: &'a HashMap<String, Script>,
    engine: &'a rhai::Engine,
}

impl FileCtx<'_> {
    fn err(&self, line: Option<u64>, message: impl Into<String>) -> LoadError {
        LoadError {
            file: self.file.to_owned(),
            line,
            message: message.into(),
        }
    }

    fn load(&self, errors: &mut Vec<LoadError>) -> Vec<Playbook> {
        let raws: Vec<RawPlaybook> = match serde_saphyr::from_multiple_with_options(
            self.text,
            serde_saphyr::options! { budget: serde_saphyr::budget! { max_documents: MAX_DOCUMENTS } },
        ) {
            Ok(r) => r,
            Err(e) => {
                let line = e.location().map(|l| l.line());
                errors.push(self.err(line, yaml_message(&e)));
                return Vec::new();
            }
        };
        raws.into_iter()
            .filter_map(|raw| self.playbook(raw, errors))
            .collect()
    }

    /// One playbook, or `None` with every problem it has added to `errors`: each field is
    /// checked whatever the others hold, so one pass of `reactor check` shows them all.
    fn playbook(&self, raw: RawPlaybook, errors: &mut Vec<LoadError>) -> Option<Playbook> {
        let before = errors.len();
        let line = raw.name.referenced.line();
        let name = raw.name.value;
        if name.trim().is_empty() {
            errors.push(self.err(Some(line), "playbook name must not be empty"));
        }
        let matched = self.matchers(&raw.matcher, errors);
        let statuses = match raw.statuses {
            None => Some(vec![AlertStatus::Firing]),
            Some(s) => {
                let line = s.referenced.line();
                let parsed = s
                    .value
                    .iter()
                    .map(|v| v.parse::<AlertStatus>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| self.err(Some(line), format!("statuses: {e}")));
                keep(errors, parsed)
            }
        };
        let steps_line = Some(raw.steps.referenced.line());
        if raw.steps.value.is_empty() {
            errors.push(self.err(steps_line, "steps: expected at least one step"));
        }
        if let Err(m) = bounds::STEPS.check("steps", raw.steps.value.len() as u64) {
            errors.push(self.err(steps_line, m));
        }
        let max_concurrent = match raw.max_concurrent {
            None => Some(0),
            Some(m) => {
                let checked = bounds::PLAYBOOK_MAX_CONCURRENT
                    .check("max_concurrent", m.value as u64)
                    .map(|_| m.value)
                    .map_err(|e| self.err(Some(m.referenced.line()), e));
                keep(errors, checked)
            }
        };
        let steps: Vec<Option<Step>> = raw
            .steps
            .value
            .into_iter()
            .enumerate()
            .map(|(i, s)| self.step(i, s, errors))
            .collect();
        let escalate = match raw.escalate {
            None => Some(EscalateSpec::default()),
            Some(e) => {
                let mut tpl = |t: Option<Spanned<String>>| match t {
                    None => Some(None),
                    Some(t) => {
                        let parsed = Template::parse(&t.value).map(Some).map_err(|m| {
                            self.err(Some(t.referenced.line()), format!("escalate: {m}"))
                        });
                        keep(errors, parsed)
                    }
                };
                let summary = tpl(e.value.summary);
                let description = tpl(e.value.description);
                summary
                    .zip(description)
                    .map(|(summary, description)| EscalateSpec {
                        to: e.value.to.map(|t| (t.value, t.referenced.line())),
                        incident: e
                            .value
                            .incident
                            .map(|i| (i.value.service, i.referenced.line())),
                        severity: e.value.severity,
                        summary,
                        description,
                    })
            }
        };
        let guards = match raw.guards {
            None => Some(GuardPolicy::default()),
            Some(g) => self.guards(g, errors),
        };
        let verify = match raw.verify {
            None => Some(None),
            Some(v) => {
                let within = v.value.resolved_within;
                let parsed = bounds::parse_duration(
                    "verify.resolved_within",
                    &within.value,
                    bounds::VERIFY_WITHIN,
                )
                .map(Some)
                .map_err(|m| self.err(Some(within.referenced.line()), m));
                keep(errors, parsed)
            }
        };
        let steps: Option<Vec<Step>> = steps.into_iter().collect();
        let (
            Some((alertname, matchers)),
            Some(statuses),
            Some(max_concurrent),
            Some(steps),
            Some(escalate),
            Some(guards),
            Some(verify),
        ) = (
            matched,
            statuses,
            max_concurrent,
            steps,
            escalate,
            guards,
            verify,
        )
        else {
            return None;
        };
        if errors.len() > before {
            return None;
        }
        let budget = steps
            .iter()
            .map(|s| {
                s.timeout
                    .saturating_mul(s.retries.saturating_add(1))
                    .saturating_add(s.retry_delay.saturating_mul(s.retries))
            })
            .fold(Duration::ZERO, Duration::saturating_add);
        if let Err(m) =
            bounds::PLAYBOOK_BUDGET.check("steps (timeouts × attempts + retry delays)", budget)
        {
            errors.push(self.err(steps_line, m));
            return None;
        }
        Some(Playbook {
            verify,
            silence: raw.silence,
            mode: raw.mode,
            guards,
            idempotent: raw.idempotent,
            on_resolved: raw.on_resolved,
            max_concurrent,
            name,
            description: raw.description,
            origin: Origin {
                file: self.file.to_owned(),
                line,
            },
            alertname,
            matchers,
            statuses,
            steps,
            escalate,
        })
    }

    /// A duration field: its value, or `default` with the problem added to `errors` (at the
    /// field's line). `context` comes before the message, e.g. `step "clean": `.
    fn duration(
        &self,
        errors: &mut Vec<LoadError>,
        field: &str,
        value: Option<Spanned<String>>,
        default: Duration,
        span: bounds::Span,
        context: &str,
    ) -> Duration {
        let Some(value) = value else {
            return default;
        };
        match bounds::parse_duration(field, &value.value, span) {
            Ok(d) => d,
            Err(m) => {
                errors.push(self.err(Some(value.referenced.line()), format!("{context}{m}")));
                default
            }
        }
    }

    /// A count field: its value, with the problem added to `errors` when it is out of `range`.
    fn count(
        &self,
        errors: &mut Vec<LoadError>,
        field: &str,
        value: u32,
        line: u64,
        range: bounds::Count,
        context: &str,
    ) -> u32 {
        match range.check(field, value.into()) {
            Ok(_) => value,
            Err(m) => {
                errors.push(self.err(Some(line), format!("{context}{m}")));
                value
            }
        }
    }
}

/// `r`'s value, or `None` with its error added to `errors`.
fn keep<T>(errors: &mut Vec<LoadError>, r: Result<T, LoadError>) -> Option<T> {
    r.map_err(|e| errors.push(e)).ok()
}

/// Playbooks per file. serde-saphyr's default budget stops at 1,024 documents, which a generated
/// playbook file can pass; its other limits (nodes, events, bytes) still guard against YAML bombs.
const MAX_DOCUMENTS: usize = 100_000;

/// serde-saphyr's message without its own location prefix and source snippet: we print file:line.
fn yaml_message(e: &serde_saphyr::Error) -> String {
    if let serde_saphyr::Error::Budget { breach, .. } = e.without_snippet() {
        return format!(
            "YAML: this file is over the parser's safety limits ({breach:?}); split its playbooks over several files"
        );
    }
    let full = e.to_string();
    let first = full.lines().next().unwrap_or("invalid YAML").trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    // The line is already in our `file:line:` prefix; keep the column.
    let first = match first.split_once(" column ") {
        Some((head, rest)) if head.starts_with("line ") => rest
            .split_once(": ")
            .map_or(first.to_owned(), |(col, msg)| {
                format!("column {col}: {msg}")
            }),
        _ => first.to_owned(),
    };
    format!("YAML: {first}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SandboxLimits;
    use crate::executor::sandbox::build_engine;

    struct Dirs {
        _root: tempfile::TempDir,
        playbooks: PathBuf,
        scripts: PathBuf,
    }

    fn dirs(files: &[(&str, &str)]) -> Dirs {
        let root = tempfile::tempdir().unwrap();
        let playbooks = root.path().join("playbooks");
        let scripts = root.path().join("scripts");
        std::fs::create_dir_all(&playbooks).unwrap();
        std::fs::create_dir_all(&scripts).unwrap();
        for (name, text) in files {
            std::fs::write(root.path().join(name), text).unwrap();
        }
        Dirs {
            _root: root,
            playbooks,
            scripts,
        }
    }

    fn load(files: &[(&str, &str)]) -> Result<Playbooks, LoadErrors> {
        let d = dirs(files);
        load_dir(
            &d.playbooks,
            &d.scripts,
            &build_engine(&SandboxLimits::default(), vec![], None),
        )
    }

    fn only_error(files: &[(&str, &str)]) -> String {
        let errs = load(files).unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        let e = &errs.0[0];
        format!(
            "{}:{}: {}",
            e.file.file_name().unwrap().to_string_lossy(),
            e.line.unwrap_or(0),
            e.message
        )
    }

    #[test]
    fn the_shipped_playbooks_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let p = load_dir(
            &root.join("playbooks"),
            &root.join("scripts"),
            &build_engine(&SandboxLimits::default(), vec![], None),
        )
        .unwrap();
        for name in [
            "node-filesystem-cleanup",
            "reactor-selftest-ok",
            "reactor-selftest-fail",
            "systemd-unit-restart",
            "http-admin-flush-cache",
        ] {
            assert!(p.get(name).is_some(), "{name} missing");
        }
    }

    #[test]
    fn several_playbooks_per_file_with_defaults() {
        let p = load(&[(
            "playbooks/a.yaml",
            "name: a\nmatch: {alertname: A}\nsteps: [{inline: '1'}]\n---\nname: b\nmatch:\n  matchers: ['team=~\"x|y\"']\nstatuses: [firing, resolved]\nsteps:\n  - {name: s, inline: '2', timeout: 5s, retries: 2}\n",
        )])
        .unwrap();
        let a = p.get("a").unwrap();
        assert_eq!(
            a.statuses,
            vec![AlertStatus::Firing],
            "firing only by default"
        );
        assert_eq!(a.alertname.as_deref(), Some("A"));
        assert_eq!(a.steps[0].timeout, DEFAULT_STEP_TIMEOUT);
        assert_eq!(a.steps[0].name, "step-1");
        let b = p.get("b").unwrap();
        assert_eq!(b.origin.line, 5);
        assert_eq!(b.alertname, None);
        assert_eq!(b.statuses.len(), 2);
        assert_eq!(
            (b.steps[0].timeout, b.steps[0].retries),
            (Duration::from_secs(5), 2)
        );
    }

    #[test]
    fn yaml_errors_name_file_and_line() {
        let e = only_error(&[(
            "playbooks/y.yaml",
            "name: d\nmatch: {alertname: X\nsteps: []\n",
        )]);
        assert!(e.starts_with("y.yaml:3: YAML:"), "{e}");
        let e = only_error(&[(
            "playbooks/u.yaml",
            "name: c\nmatch:\n  alertname: X\nstpes:\n  - inline: '1'\n",
        )]);
        assert!(
            e.starts_with("u.yaml:4: YAML:") && e.contains("unknown field `stpes`"),
            "{e}"
        );
    }

    #[test]
    fn a_file_may_hold_thousands_of_playbooks_and_an_oversized_one_is_explained() {
        let many: String = (0..1_500)
            .map(|i| {
                format!("---\nname: p{i}\nmatch: {{alertname: A{i}}}\nsteps:\n  - inline: '1'\n")
            })
            .collect();
        let loaded = load(&[("playbooks/many.yaml", &many)]).unwrap();
        assert_eq!(loaded.len(), 1_500);
        let too_many = "---\n".repeat(MAX_DOCUMENTS + 1);
        let e = only_error(&[("playbooks/huge.yaml", &too_many)]);
        assert!(
            e.contains("over the parser's safety limits") && e.contains("split its playbooks"),
            "{e}"
        );
    }

    #[test]
    fn rhai_syntax_errors_name_the_line_inline_and_in_files() {
        let e = only_error(&[(
            "playbooks/r.yaml",
            "name: a\nmatch:\n  alertname: X\nsteps:\n  - name: s\n    inline: |\n      let x = 1;\n      let y = ;\n",
        )]);
        assert!(e.starts_with("r.yaml:8: Rhai syntax error"), "{e}");
        // The same in a later document, after multi-byte text, and as a plain scalar.
        let first = "name: é\nmatch: {alertname: X, matchers: ['summary=\"né\"']}\nsteps:\n  - inline: '1'\n";
        let e = only_error(&[(
            "playbooks/m.yaml",
            &format!("{first}---\nname: b\nmatch:\n  alertname: X\nsteps:\n  - inline: |\n      let x = 1;\n      let y = ;\n"),
        )]);
        assert!(e.starts_with("m.yaml:12: Rhai syntax error"), "{e}");
        let e = only_error(&[(
            "playbooks/m.yaml",
            &format!(
                "{first}---\nname: b\nmatch:\n  alertname: X\nsteps:\n  - inline: 'let y = ;'\n"
            ),
        )]);
        assert!(e.starts_with("m.yaml:10: Rhai syntax error"), "{e}");
        let errs = load(&[
            (
                "playbooks/s.yaml",
                "name: e\nmatch: {alertname: Y}\nsteps:\n  - script: broken.rhai\n",
            ),
            ("scripts/broken.rhai", "let a = 1;\n\nfn f( { }\n"),
        ])
        .unwrap_err();
        let text = errs.to_string();
        assert!(text.contains("broken.rhai:3: Rhai syntax error"), "{text}");
        assert!(
            text.contains("s.yaml:4: script \"broken.rhai\" does not compile"),
            "{text}"
        );
    }

    #[test]
    fn kubernetes_steps_are_checked_at_load_with_their_line() {
        let e = only_error(&[("playbooks/k.yaml", "name: k\nmatch: {alertname: X}\nsteps:\n  - name: s\n    kubernetes: scale_up\n    params: {namespace: '{{ labels.namespace }}', kind: deployment, name: web, by: 2}\n")]);
        assert!(
            e.starts_with(
                "k.yaml:5: step \"s\": kubernetes scale_up: missing field `max_replicas`"
            ),
            "{e}"
        );
        let e = only_error(&[(
            "playbooks/k.yaml",
            "name: k\nmatch: {alertname: X}\nsteps:\n  - kubernetes: drain_node\n",
        )]);
        assert!(
            e.contains("k.yaml:4:") && e.contains("unknown kubernetes action \"drain_node\""),
            "{e}"
        );
        let e = only_error(&[("playbooks/k.yaml", "name: k\nmatch: {alertname: X}\nsteps:\n  - kubernetes: restart_pod\n    inline: '1'\n")]);
        assert!(e.contains("expected exactly one of"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_line_and_what_was_expected() {
        let e = only_error(&[("playbooks/m.yaml", "name: b\nmatch:\n  alertname: X\n  matchers: ['sev=~\"(\"']\nsteps: [ {inline: '1'} ]\n")]);
        assert!(
            e.starts_with("m.yaml:4: match.matchers: bad matcher")
                && e.contains("unclosed group")
                && !e.contains('\n'),
            "{e}"
        );
        let e = only_error(&[("playbooks/t.yaml", "name: b\nmatch: {alertname: X}\nsteps:\n  - inline: '1'\n    params: {a: '{{ label.x }}'}\n")]);
        assert!(
            e.starts_with("t.yaml:5:") && e.contains("unknown template variable"),
            "{e}"
        );
        let e = only_error(&[(
            "playbooks/n.yaml",
            "name: b\nmatch: {}\nsteps: [{inline: '1'}]\n",
        )]);
        assert!(e.starts_with("n.yaml:2: match: expected"), "{e}");
        let e = only_error(&[(
            "playbooks/o.yaml",
            "name: b\nmatch: {alertname: X}\nsteps:\n  - script: nope.rhai\n",
        )]);
        assert!(
            e.contains("o.yaml:4: script \"nope.rhai\" not found"),
            "{e}"
        );
        let e = only_error(&[(
            "playbooks/p.yaml",
            "name: b\nmatch: {alertname: X}\nsteps:\n  - {inline: '1', timeout: soon}\n",
        )]);
        assert!(
            e.contains("p.yaml:4:") && e.contains("timeout: expected a duration"),
            "{e}"
        );
        let e = only_error(&[(
            "playbooks/q.yaml",
            "name: b\nmatch: {alertname: X}\nsteps:\n  - {inline: '1', script: x.rhai}\n",
        )]);
        assert!(
            e.contains("q.yaml:4:") && e.contains("exactly one of"),
            "{e}"
        );
        let e = only_error(&[(
            "playbooks/s.yaml",
            "name: b\nmatch: {alertname: X}\nstatuses: [burning]\nsteps: [{inline: '1'}]\n",
        )]);
        assert!(e.contains("s.yaml:3: statuses:"), "{e}");
    }

    #[test]
    fn guards_default_safely_and_can_be_tuned() {
        let p = load(&[(
            "playbooks/g.yaml",
            "name: a\nmatch: {alertname: A}\nsteps: [{inline: '1'}]\n---\nname: b\nmatch: {alertname: B}\nidempotent: true\non_resolved: cancel\nmax_concurrent: 2\nguards:\n  target_labels: [instance]\n  cooldown: 5m\n  max_attempts: 2\n  window: 30m\n  circuit_breaker: {failures: 0}\nsteps: [{inline: '1'}]\n",
        )])
        .unwrap();
        let a = p.get("a").unwrap();
        assert_eq!(a.guards, GuardPolicy::default());
        assert!(!a.idempotent);
        assert_eq!(a.on_resolved, OnResolved::Finish);
        let b = p.get("b").unwrap();
        assert_eq!(b.guards.max_attempts, 2);
        assert_eq!(b.guards.cooldown, Duration::from_secs(300));
        assert_eq!(
            b.guards.target_labels.as_deref(),
            Some(&["instance".to_owned()][..])
        );
        assert_eq!(b.guards.breaker, None);
        assert!(b.idempotent);
        assert_eq!((b.on_resolved, b.max_concurrent), (OnResolved::Cancel, 2));
        let e = only_error(&[(
            "playbooks/h.yaml",
            "name: a\nmatch: {alertname: A}\nguards:\n  window: 0s\nsteps: [{inline: '1'}]\n",
        )]);
        assert!(e.starts_with("h.yaml:4: guards.window"), "{e}");
    }

    #[test]
    fn every_problem_of_a_playbook_is_reported_at_the_line_of_its_key() {
        let text = "name: a\nmatch: {alertname: A}\nguards:\n  cooldown: soon\n  max_attempts: 10001\nsteps:\n  - name: one\n    inline: 'let x = ;'\n    timeout: 99y\n  - name: two\n    inline: '1'\n    retries: 1000\n    params: {a: '{{ label.x }}'}\n---\nname: b\nmatch: {alertname: B}\nsteps: [{inline: '1'}]\n";
        let errs = load(&[("playbooks/x.yaml", text)]).unwrap_err();
        let lines: Vec<String> = errs
            .0
            .iter()
            .map(|e| {
                let what: String = e.message.chars().take(32).collect();
                format!("{}: {what}", e.line.unwrap_or(0))
            })
            .collect();
        assert_eq!(
            lines,
            [
                "4: guards.cooldown: expected a dura",
                "5: guards.max_attempts: 10001 is ou",
                "8: Rhai syntax error: Unexpected ';",
                "9: step \"one\": timeout: 99years is ",
                "12: step \"two\": retries: 1000 is out",
                "13: step \"two\": params.a: unknown te",
            ],
            "{errs}"
        );
    }

    fn load_text(text: &str) -> (Vec<Playbook>, Vec<LoadError>) {
        let engine = build_engine(&SandboxLimits::default(), vec![], None);
        let scripts = HashMap::new();
        let ctx = FileCtx {
            file: Path::new("fuzz.yaml"),
            text,
            scripts_dir: Path::new("scripts"),
            scripts: &scripts,
            engine: &engine,
        };
        let mut errors = Vec::new();
        let loaded = ctx.load(&mut errors);
        (loaded, errors)
    }

    #[test]
    fn numbers_outside_their_ranges_are_refused_with_the_line_and_range() {
        let step = |extra: &str| {
            format!(
                "name: p\nmatch: {{alertname: A}}\nsteps:\n  - name: s\n    inline: '1'\n{extra}"
            )
        };
        for (extra, want) in [
            ("    retries: 4294967295\n", "6:"),
            ("    timeout: 500000000000y\n", "6:"),
            ("    timeout: 2d\n", "longer than the longest allowed, 1day"),
            ("    retry_delay: 1000000000y\n", "6:"),
            ("    retries: 101\n", "outside the allowed range 0..=100"),
            (
                "    timeout: 24h\n    retries: 10\n",
                "longer than the longest allowed, 7days",
            ),
        ] {
            let e = only_error(&[("playbooks/n.yaml", &step(extra))]);
            assert!(e.starts_with("n.yaml:"), "{e}");
            assert!(e.contains(want), "{extra:?}: {e}");
        }
        let e = only_error(&[(
            "playbooks/g.yaml",
            "name: p\nmatch: {alertname: A}\nmax_concurrent: 99999999\nsteps: [{inline: '1'}]\n",
        )]);
        assert!(
            e.starts_with("g.yaml:3:") && e.contains("max_concurrent"),
            "{e}"
        );
        let e = only_error(&[(
            "playbooks/g.yaml",
            "name: p\nmatch: {alertname: A}\nguards:\n  cooldown: 400d\nsteps: [{inline: '1'}]\n",
        )]);
        assert!(e.starts_with("g.yaml:4: guards.cooldown"), "{e}");
        let e = only_error(&[(
            "playbooks/v.yaml",
            "name: p\nmatch: {alertname: A}\nverify: {resolved_within: 9999999999999999h}\nsteps: [{inline: '1'}]\n",
        )]);
        assert!(e.starts_with("v.yaml:3: verify.resolved_within"), "{e}");
        let e = only_error(&[(
            "playbooks/k.yaml",
            "name: p\nmatch: {alertname: A}\nsteps:\n  - kubernetes: scale_up\n    params: {namespace: a, kind: deployment, name: w, by: 1, max_replicas: 4000000000}\n",
        )]);
        assert!(e.contains("k.yaml:4:") && e.contains("max_replicas"), "{e}");
    }

    fn edge_number() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            proptest::sample::select(vec![
                "0",
                "1",
                "2",
                "99",
                "100",
                "101",
                "1000",
                "1001",
                "10000",
                "10001",
                "2147483647",
                "4294967295",
                "4294967296",
                "18446744073709551615",
                "18446744073709551616",
                "-1",
                "1e9",
            ])
            .prop_map(str::to_owned),
            any::<u64>().prop_map(|n| n.to_string()),
        ]
    }

    fn edge_duration() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            proptest::sample::select(vec![
                "0s",
                "1ns",
                "1ms",
                "1s",
                "59s",
                "1h",
                "24h",
                "25h",
                "7d",
                "8d",
                "30d",
                "31d",
                "500000000000y",
                "18446744073709551615s",
                "99999999999999999999ms",
                "-1s",
                "soon",
            ])
            .prop_map(str::to_owned),
            any::<u64>().prop_map(|n| format!("{n}ms")),
            any::<u32>().prop_map(|n| format!("{n}d")),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// Every number a playbook sets, at the edges of its type and range: the playbook loads
        /// with every number in range, or is refused with the file and line, and what loads runs
        /// without a panic.
        #[test]
        fn playbooks_with_edge_numbers_load_within_bounds_or_are_refused_and_never_panic(
            n in proptest::collection::vec(edge_number(), 6),
            d in proptest::collection::vec(edge_duration(), 7),
        ) {
            let text = format!(
                "name: p\nmatch: {{alertname: A}}\nmax_concurrent: {}\nguards:\n  cooldown: {}\n  window: {}\n  max_attempts: {}\n  circuit_breaker: {{failures: {}, of_last: {}, cooldown: {}}}\nverify: {{resolved_within: {}}}\nsteps:\n  - inline: 'params.n'\n    timeout: {}\n    retries: {}\n    retry_delay: {}\n    params: {{n: {}}}\n",
                n[0], d[0], d[1], n[1], n[2], n[3], d[2], d[3], d[4], n[4], d[5], n[5],
            );
            let (loaded, errors) = load_text(&text);
            for e in &errors {
                proptest::prop_assert!(e.line.is_some(), "{e}");
            }
            for p in loaded {
                use crate::bounds::*;
                let s = &p.steps[0];
                proptest::prop_assert!(STEP_TIMEOUT.check("t", s.timeout).is_ok());
                proptest::prop_assert!(STEP_RETRIES.check("r", s.retries.into()).is_ok());
                proptest::prop_assert!(RETRY_DELAY.check("d", s.retry_delay).is_ok());
                proptest::prop_assert!(PLAYBOOK_BUDGET.check("b", p.time_budget()).is_ok());
                proptest::prop_assert!(GUARD_WINDOW.check("w", p.guards.window).is_ok());
                proptest::prop_assert!(GUARD_COOLDOWN.check("c", p.guards.cooldown).is_ok());
                proptest::prop_assert!(p.verify.is_none_or(|v| VERIFY_WITHIN.check("v", v).is_ok()));
                let now = jiff::Timestamp::now();
                let _ = crate::clock::later(now, p.time_budget().saturating_add(p.verify.unwrap_or_default()));
                let _ = crate::clock::deadline(s.timeout);
                // The step itself, with its timeout, through the executor.
                let executor = crate::executor::Executor::new(
                    Arc::new(build_engine(&SandboxLimits::default(), vec![], None)),
                    false,
                    None,
                );
                let alert = crate::domain::decode_webhook(
                    include_str!("../../../tests/fixtures/alertmanager-0.25-firing.json").as_bytes(),
                )
                .unwrap()
                .alerts
                .remove(0);
                let ctx = super::super::TemplateContext::new(&alert, &p.name);
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let result = rt.block_on(executor.run(crate::executor::Attempt {
                    action: &s.action,
                    alert: &alert,
                    params: super::super::render_params(s, &ctx),
                    timeout: s.timeout,
                    dry_run: None,
                    cancel: None,
                    args: s.action.render_args(&ctx),
                }));
                proptest::prop_assert!(result.result.is_ok() || s.timeout < Duration::from_millis(50), "{:?}", result.result);
            }
        }
    }

    proptest::proptest! {
        /// Fuzzing by property: no file content makes the loader panic.
        #[test]
        fn loader_never_panics_on_arbitrary_text(text in "\\PC{0,200}") {
            let _ = load_text(&text);
        }

        #[test]
        fn loader_never_panics_on_mutated_playbooks(pos in 0usize..600, c in proptest::char::any()) {
            let shipped = include_str!("../../../playbooks/selftest.yaml");
            let mut chars: Vec<char> = shipped.chars().collect();
            let i = pos % chars.len();
            chars[i] = c;
            let _ = load_text(&chars.iter().collect::<String>());
            let _ = load_text(&shipped[..shipped.char_indices().nth(i).map_or(0, |(b, _)| b)]);
        }
    }

    #[test]
    fn duplicate_names_are_refused() {
        let errs = load(&[
            (
                "playbooks/a.yaml",
                "name: a\nmatch: {alertname: A}\nsteps: [{inline: '1'}]\n",
            ),
            (
                "playbooks/b.yaml",
                "\nname: a\nmatch: {alertname: B}\nsteps: [{inline: '1'}]\n",
            ),
        ])
        .unwrap_err();
        assert!(
            errs.to_string()
                .contains("b.yaml:2: duplicate playbook name \"a\""),
            "{errs}"
        );
    }

    #[test]
    fn matching_uses_the_alertname_index_and_keeps_load_order() {
        let p = load(&[(
            "playbooks/a.yaml",
            "name: any-team-x\nmatch: {matchers: ['team=\"x\"']}\nsteps: [{inline: '1'}]\n---\nname: disk\nmatch: {alertname: Disk}\nsteps: [{inline: '1'}]\n---\nname: disk-critical\nmatch: {matchers: ['alertname=\"Disk\",severity=\"critical\"']}\nsteps: [{inline: '1'}]\n",
        )])
        .unwrap();
        let body = r#"{"alerts":[{"status":"firing","labels":{"alertname":"Disk","team":"x","severity":"critical"},"startsAt":"2026-01-01T00:00:00Z","fingerprint":"f"}]}"#;
        let alert = crate::domain::decode_webhook(body.as_bytes())
            .unwrap()
            .alerts
            .remove(0);
        let names: Vec<_> = p.matching(&alert).iter().map(|p| p.name.clone()).collect();
        assert_eq!(names, vec!["any-team-x", "disk", "disk-critical"]);
    }
}
