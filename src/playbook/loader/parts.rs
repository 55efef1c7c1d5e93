//! The checks of a playbook's parts, each adding every problem it finds to `errors`: the
//! matchers, the guards, and each step with its action (a script file, inline Rhai, a Kubernetes
//! action or a command).

use std::path::Path;
use std::sync::Arc;

use serde_saphyr::Spanned;

use super::*;

impl FileCtx<'_> {
    pub(super) fn guards(
        &self,
        raw: RawGuards,
        errors: &mut Vec<LoadError>,
    ) -> Option<GuardPolicy> {
        let before = errors.len();
        let d = GuardPolicy::default();
        let breaker = match raw.circuit_breaker {
            None => d.breaker.clone(),
            Some(b) if b.value.failures == 0 => None,
            Some(b) => {
                let at = b.referenced.line();
                let b = b.value;
                let bd = BreakerPolicy::default();
                let failures = self.count(
                    errors,
                    "guards.circuit_breaker.failures",
                    b.failures,
                    at,
                    bounds::BREAKER_FAILURES,
                    "",
                );
                let of_last = match b.of_last {
                    None => bd.of_last.max(failures),
                    Some(n) => self.count(
                        errors,
                        "guards.circuit_breaker.of_last",
                        n.value,
                        n.referenced.line(),
                        bounds::BREAKER_FAILURES,
                        "",
                    ),
                };
                if of_last < failures {
                    errors.push(self.err(
                        Some(at),
                        format!("guards.circuit_breaker: of_last ({of_last}) must be at least failures ({failures})"),
                    ));
                }
                let cooldown = self.duration(
                    errors,
                    "guards.circuit_breaker.cooldown",
                    b.cooldown,
                    bd.cooldown,
                    bounds::BREAKER_COOLDOWN,
                    "",
                );
                Some(BreakerPolicy {
                    failures,
                    of_last,
                    cooldown,
                })
            }
        };
        let window = self.duration(
            errors,
            "guards.window",
            raw.window,
            d.window,
            bounds::GUARD_WINDOW,
            "",
        );
        let max_attempts = match raw.max_attempts {
            None => d.max_attempts,
            Some(n) => self.count(
                errors,
                "guards.max_attempts",
                n.value,
                n.referenced.line(),
                bounds::GUARD_MAX_ATTEMPTS,
                "",
            ),
        };
        let cooldown = self.duration(
            errors,
            "guards.cooldown",
            raw.cooldown,
            d.cooldown,
            bounds::GUARD_COOLDOWN,
            "",
        );
        (errors.len() == before).then_some(GuardPolicy {
            target_labels: raw.target_labels,
            cooldown,
            max_attempts,
            window,
            breaker,
        })
    }

    pub(super) fn matchers(
        &self,
        raw: &Spanned<RawMatch>,
        errors: &mut Vec<LoadError>,
    ) -> Option<(Option<String>, Vec<crate::playbook::LabelMatcher>)> {
        let before = errors.len();
        let mut matchers = Vec::new();
        if let Some(name) = &raw.value.alertname {
            match crate::playbook::LabelMatcher::new("alertname", MatchOp::Equal, name) {
                Ok(m) => matchers.push(m),
                Err(e) => errors.push(self.err(Some(raw.referenced.line()), e)),
            }
        }
        for m in &raw.value.matchers {
            match crate::playbook::parse_matchers(&m.value) {
                Ok(parsed) => matchers.extend(parsed),
                Err(e) => {
                    errors.push(self.err(Some(m.referenced.line()), format!("match.matchers: {e}")))
                }
            }
        }
        if errors.len() > before {
            return None;
        }
        if matchers.is_empty() {
            errors.push(self.err(
                Some(raw.referenced.line()),
                "match: expected `alertname` and/or `matchers` (e.g. severity=~\"warning|critical\"); \
                 a playbook that matches every alert must say so with a matcher such as alertname=~\".+\"",
            ));
            return None;
        }
        let alertname = matchers
            .iter()
            .find(|m| m.name() == "alertname" && m.op() == MatchOp::Equal)
            .map(|m| m.value().to_owned());
        Some((alertname, matchers))
    }

    /// One step, or `None` with every problem it has added to `errors`, each at the line of
    /// its key where the key has one.
    pub(super) fn step(
        &self,
        index: usize,
        raw: Spanned<RawStep>,
        errors: &mut Vec<LoadError>,
    ) -> Option<Step> {
        let before = errors.len();
        let line = Some(raw.referenced.line());
        let s = raw.value;
        let name = s.name.unwrap_or_else(|| format!("step-{}", index + 1));
        let context = format!("step {name:?}: ");
        let given = [
            s.script.is_some(),
            s.inline.is_some(),
            s.kubernetes.is_some(),
            s.command.is_some(),
        ];
        let action = if given.iter().filter(|g| **g).count() != 1 {
            errors.push(self.err(line, format!("{context}expected exactly one of `script` (a file under scripts/), `inline` (Rhai source), `kubernetes` (an action: restart_pod, rollout_restart, scale_up, disk_cleanup) or `command` (a program and its arguments)")));
            None
        } else if let Some(script) = s.script {
            keep(errors, self.script_file(&script))
        } else if let Some(inline) = s.inline {
            keep(errors, self.inline_script(&inline))
        } else if let Some(action) = s.kubernetes {
            let params = s
                .params
                .iter()
                .map(|(k, v)| (k.clone(), v.value.clone()))
                .collect();
            match crate::playbook::kubernetes::Request::parse(&action.value, params) {
                Ok(_) => Some(StepAction::Kubernetes {
                    action: action.value,
                }),
                Err(e) => {
                    errors.push(self.err(
                        Some(action.referenced.line()),
                        format!("{context}kubernetes {}: {e}", action.value),
                    ));
                    None
                }
            }
        } else if let Some(command) = s.command {
            keep(errors, self.command(&command, &context))
        } else {
            None
        };
        let timeout = self.duration(
            errors,
            "timeout",
            s.timeout,
            DEFAULT_STEP_TIMEOUT,
            bounds::STEP_TIMEOUT,
            &context,
        );
        let retry_delay = self.duration(
            errors,
            "retry_delay",
            s.retry_delay,
            DEFAULT_RETRY_DELAY,
            bounds::RETRY_DELAY,
            &context,
        );
        let retries = match s.retries {
            None => 0,
            Some(n) => self.count(
                errors,
                "retries",
                n.value,
                n.referenced.line(),
                bounds::STEP_RETRIES,
                &context,
            ),
        };
        let mut params = Vec::new();
        for (k, v) in s.params {
            match Param::from_yaml(v.value) {
                Ok(p) => params.push((k, p)),
                Err(m) => errors.push(self.err(
                    Some(v.referenced.line()),
                    format!("{context}params.{k}: {m}"),
                )),
            }
        }
        let approval = s.approval.map(|a| {
            let line = a.referenced.line();
            ApprovalGate {
                timeout: self.duration(
                    errors,
                    "approval.timeout",
                    a.value.timeout,
                    crate::playbook::DEFAULT_APPROVAL_TIMEOUT,
                    bounds::APPROVAL_TIMEOUT,
                    &context,
                ),
                from: a.value.from,
                line,
            }
        });
        let action = action?;
        (errors.len() == before).then_some(Step {
            name,
            action,
            timeout,
            retries,
            retry_delay,
            params,
            dry_run: s.dry_run,
            approval,
        })
    }

    /// A `command:` step: an absolute program path, written out (never a template, so the
    /// allow-list decides what runs), and templated arguments.
    fn command(
        &self,
        command: &Spanned<Vec<String>>,
        context: &str,
    ) -> Result<StepAction, LoadError> {
        let line = Some(command.referenced.line());
        let err = |m: String| self.err(line, format!("{context}command: {m}"));
        let Some((program, args)) = command.value.split_first() else {
            return Err(err("expected a program and its arguments, e.g. [/usr/local/bin/fix-disk, \"{{ labels.mountpoint }}\"]".into()));
        };
        if !Path::new(program).is_absolute() || program.contains("{{") {
            return Err(err(format!(
                "the program must be an absolute path written out (not a template), got {program:?}"
            )));
        }
        let args = args
            .iter()
            .map(|a| Template::parse(a).map_err(&err))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StepAction::Command {
            program: program.clone(),
            args,
        })
    }

    fn script_file(&self, script: &Spanned<String>) -> Result<StepAction, LoadError> {
        let name = script.value.as_str();
        let line = Some(script.referenced.line());
        let path = Path::new(name);
        if path.is_absolute() || path.components().count() != 1 {
            return Err(self.err(
                line,
                format!("script: expected a file name under the scripts directory, got {name:?}"),
            ));
        }
        match self.scripts.get(name) {
            Some((ast, code)) => Ok(StepAction::Rhai {
                ast: Arc::clone(ast),
                source: self.scripts_dir.join(name).display().to_string(),
                code: Arc::clone(code),
                at: Arc::new(Origin {
                    file: self.scripts_dir.join(name),
                    line: 0,
                }),
            }),
            None if self.scripts_dir.join(name).is_file() => {
                // Exists but failed to compile: that error is reported against the script itself.
                Err(self.err(
                    line,
                    format!("script {name:?} does not compile (see its own error)"),
                ))
            }
            None => Err(self.err(
                line,
                format!(
                    "script {name:?} not found in {}",
                    self.scripts_dir.display()
                ),
            )),
        }
    }

    fn inline_script(&self, inline: &Spanned<String>) -> Result<StepAction, LoadError> {
        let line = inline.referenced.line();
        // A block scalar (`inline: |`) starts on the line after the indicator. The value's byte
        // offset finds the indicator; counting lines from the top instead made loading a file of
        // many playbooks quadratic (59% of `reactor check` on one file of 1,000).
        let block = inline
            .referenced
            .span()
            .byte_offset()
            .and_then(|at| self.text.get(at as usize..))
            .is_some_and(|rest| rest.starts_with('|') || rest.starts_with('>'));
        let offset = if block { line } else { line - 1 };
        match self.engine.compile(&inline.value) {
            Ok(ast) => Ok(StepAction::Rhai {
                ast: Arc::new(ast),
                source: format!("inline at {}:{}", self.file.display(), line),
                code: Arc::from(inline.value.as_str()),
                at: Arc::new(Origin {
                    file: self.file.to_owned(),
                    line: offset,
                }),
            }),
            Err(e) => {
                let (line, message) = rhai_error(&e, offset);
                Err(self.err(line, message))
            }
        }
    }
}
