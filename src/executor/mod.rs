//! Runs one attempt of one playbook step. Rhai evaluation is bounded by the sandbox's limits and
//! the step's wall-clock timeout. A short script that calls no blocking helper finishes inline on
//! the async worker; any other is evaluated on a blocking thread, carrying the caller's tracing
//! span, with an async backstop in case a native helper does not return.

pub mod disk;
pub mod error;
pub mod exec;
pub mod http;
pub mod kubernetes;
pub mod sandbox;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rhai::{Dynamic, Scope};
use serde_json::{Map, Value};

use crate::domain::Alert;
use crate::playbook::StepAction;
pub use error::{Class, StepError};

/// Grace given to a native helper past the step timeout before the run stops waiting for it.
const BACKSTOP_GRACE: Duration = Duration::from_secs(2);

/// Runs step actions; cheap to clone and shared by every run.
#[derive(Clone)]
pub struct Executor {
    engine: Arc<rhai::Engine>,
    global_dry_run: bool,
    kube: Option<kubernetes::Kubernetes>,
    /// Bytes one evaluation may hold (`sandbox.max_memory_bytes`).
    max_memory: usize,
    /// The programs `command:` steps may run.
    exec: exec::ExecPolicy,
}

/// What one attempt produced.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptResult {
    pub result: Result<Value, StepError>,
    pub logs: Vec<String>,
    /// Kubernetes mutations the attempt made (or, in a dry run, would have made).
    pub changes: Vec<kubernetes::Change>,
}

/// An attempt just started: finished already (a short script, inline), or still to be awaited.
/// Only a pending attempt can have acted on the world.
pub enum Started<'a> {
    Done(AttemptResult),
    Pending(Pin<Box<dyn Future<Output = AttemptResult> + Send + 'a>>),
}

/// The inputs of one attempt.
pub struct Attempt<'a> {
    pub action: &'a StepAction,
    pub alert: &'a Alert,
    pub params: Map<String, Value>,
    pub timeout: Duration,
    pub dry_run: Option<bool>,
    /// Cancelling it stops the script at its next operation.
    pub cancel: Option<tokio_util::sync::CancellationToken>,
    /// A `command:` step's rendered arguments (see [`StepAction::render_args`]).
    pub args: Vec<String>,
}

impl Executor {
    /// `kube` must be the same cluster the engine's `k8s::` functions were built with.
    pub fn new(
        engine: Arc<rhai::Engine>,
        global_dry_run: bool,
        kube: Option<kubernetes::Kubernetes>,
    ) -> Self {
        Executor {
            engine,
            global_dry_run,
            kube,
            max_memory: sandbox::DEFAULT_MEMORY,
            exec: exec::ExecPolicy::default(),
        }
    }

    /// Allows `command:` steps to run the programs of `policy`.
    pub fn with_exec(mut self, policy: exec::ExecPolicy) -> Self {
        self.exec = policy;
        self
    }

    /// Bounds the bytes one script evaluation may hold.
    pub fn with_max_memory(mut self, bytes: usize) -> Self {
        self.max_memory = bytes;
        self
    }

    pub fn engine(&self) -> &rhai::Engine {
        &self.engine
    }

    pub async fn run(&self, attempt: Attempt<'_>) -> AttemptResult {
        match self.start(attempt) {
            Started::Done(r) => r,
            Started::Pending(f) => f.await,
        }
    }

    /// Starts an attempt. A Rhai script that finishes within the inline budget without calling
    /// a helper that blocks or acts is done on return, having had no effect but its result.
    pub fn start<'a>(&'a self, attempt: Attempt<'a>) -> Started<'a> {
        match attempt.action {
            StepAction::Rhai { ast, at, .. } => {
                self.start_rhai(Arc::clone(ast), Arc::clone(at), attempt)
            }
            StepAction::Kubernetes { action } => {
                Started::Pending(Box::pin(self.run_kubernetes(action, attempt)))
            }
            StepAction::Command { program, .. } => {
                Started::Pending(Box::pin(self.run_command(program, attempt)))
            }
        }
    }

    /// A `command:` step: the program with the rendered arguments and the alert's labels as
    /// `ALERT_<NAME>` variables, on a blocking thread; a non-zero exit fails the attempt.
    async fn run_command(&self, program: &str, a: Attempt<'_>) -> AttemptResult {
        let req = exec::ExecRequest {
            program: program.to_owned(),
            args: a.args,
            env: alert_env(a.alert),
            stdin: None,
            deadline: crate::clock::deadline(a.timeout),
            dry_run: a.dry_run.unwrap_or(self.global_dry_run),
        };
        let policy = self.exec.clone();
        let cancel = a.cancel.unwrap_or_default();
        let task = tokio::task::spawn_blocking(move || {
            let mut changes = Vec::new();
            let result = policy.run(&req, &mut changes, || cancel.is_cancelled());
            (result, changes)
        });
        let (result, changes) =
            match tokio::time::timeout(a.timeout.saturating_add(BACKSTOP_GRACE), task).await {
                Ok(Ok(done)) => done,
                Ok(Err(join)) => {
                    return failed(StepError::Internal(format!("command failed: {join}")))
                }
                Err(_) => {
                    return failed(StepError::Timeout {
                        after: a.timeout,
                        hung: true,
                    })
                }
            };
        let result = result.and_then(|out| {
            if out.dry_run || out.code == Some(0) {
                return Ok(serde_json::to_value(&out).unwrap_or_default());
            }
            let how = match out.code {
                Some(code) => format!("exited with {code}"),
                None => "was ended by a signal".to_owned(),
            };
            // The end of stderr says why, usually.
            let stderr = out.stderr.trim();
            let skip = stderr.chars().count().saturating_sub(500);
            let tail: String = stderr.chars().skip(skip).collect();
            let why = if tail.is_empty() {
                String::new()
            } else {
                format!(": {tail}")
            };
            Err(StepError::Helper {
                message: format!("{program} {how}{why}"),
                class: Class::ExitStatus,
            })
        });
        AttemptResult {
            result,
            logs: Vec::new(),
            changes,
        }
    }

    /// A `kubernetes:` step: its rendered params make the request; the step's timeout and the
    /// run's cancellation bound it.
    async fn run_kubernetes(&self, action: &str, a: Attempt<'_>) -> AttemptResult {
        let request = match kubernetes::Request::parse(action, a.params) {
            Ok(r) => r,
            Err(e) => {
                return failed(StepError::bad_arguments(format!(
                    "kubernetes {action}: {e}"
                )))
            }
        };
        let dry_run = a.dry_run.unwrap_or(self.global_dry_run);
        let deadline = crate::clock::deadline(a.timeout);
        let cancel = a.cancel.unwrap_or_default();
        let mut changes = Vec::new();
        let run = kubernetes::run(
            self.kube.as_ref(),
            &request,
            dry_run,
            deadline,
            &mut changes,
        );
        // Each call stops at the deadline itself, so the mutation it was making is recorded;
        // the outer timeout is only a backstop.
        let result = tokio::select! {
            r = tokio::time::timeout(a.timeout.saturating_add(BACKSTOP_GRACE), run) => match r {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(error)) => Err(StepError::Kubernetes { context: format!("kubernetes {action}"), error }),
                Err(_) => Err(StepError::Timeout { after: a.timeout, hung: false }),
            },
            _ = cancel.cancelled() => Err(StepError::Cancelled),
        };
        AttemptResult {
            result,
            logs: Vec::new(),
            changes,
        }
    }

    fn start_rhai<'a>(
        &self,
        ast: Arc<rhai::AST>,
        at: Arc<crate::playbook::Origin>,
        a: Attempt<'a>,
    ) -> Started<'a> {
        let alert = alert_dynamic(a.alert);
        let params = match rhai::serde::to_dynamic(Value::Object(a.params)) {
            Ok(d) => d,
            Err(e) => {
                return Started::Done(failed(StepError::Internal(format!(
                    "cannot pass params to the script: {e}"
                ))))
            }
        };
        let engine = Arc::clone(&self.engine);
        let timeout = a.timeout;
        let dry_run = a.dry_run.unwrap_or(self.global_dry_run);
        let cancel = a.cancel;
        let max_memory = self.max_memory;
        let state = move |inline| sandbox::EvalState {
            deadline: crate::clock::deadline(timeout),
            logs: Vec::new(),
            dry_run,
            cancel: cancel.clone(),
            changes: Vec::new(),
            inline,
            max_memory,
            failure: None,
        };
        let mut scope = Scope::new();
        scope.push_constant("alert", alert);
        scope.push_constant("params", params);
        scope.push_constant("dry_run", dry_run);
        let inputs = scope.len();
        // Most scripts finish in a few hundred operations: evaluating them here saves the two
        // thread switches of a blocking thread, which cost more than the script. A script that
        // runs longer or calls a helper that blocks is redone from the start on a blocking thread.
        let (res, st) = sandbox::with_state(state(true), || {
            engine.eval_ast_with_scope::<Dynamic>(&mut scope, &ast)
        });
        if res.as_ref().map_or(true, |r| !sandbox::needs_thread(r)) {
            return Started::Done(finish(res, st, timeout, &at));
        }
        scope.rewind(inputs);
        let span = tracing::Span::current();
        // Spawned when first polled, so the caller can record the run before the script acts.
        Started::Pending(Box::pin(async move {
            let task = tokio::task::spawn_blocking(move || {
                let _enter = span.enter();
                let (res, st) = sandbox::with_state(state(false), || {
                    engine.eval_ast_with_scope::<Dynamic>(&mut scope, &ast)
                });
                finish(res, st, timeout, &at)
            });
            match tokio::time::timeout(timeout.saturating_add(BACKSTOP_GRACE), task).await {
                Ok(Ok(r)) => r,
                Ok(Err(join)) => failed(StepError::Internal(format!(
                    "script evaluation failed: {join}"
                ))),
                Err(_) => failed(StepError::Timeout {
                    after: timeout,
                    hung: true,
                }),
            }
        }))
    }
}

/// An evaluation's result as an attempt's: errors described, the value converted to data.
fn finish(
    res: Result<Result<Dynamic, Box<rhai::EvalAltResult>>, String>,
    state: sandbox::EvalState,
    timeout: Duration,
    at: &crate::playbook::Origin,
) -> AttemptResult {
    let res = match res {
        Ok(res) => res,
        Err(panic) => {
            return failed(StepError::Internal(format!(
                "script evaluation panicked: {panic}"
            )))
        }
    };
    let sandbox::EvalState {
        logs,
        changes,
        max_memory,
        failure,
        ..
    } = state;
    let result = res
        .map_err(|e| sandbox::describe_error(&e, timeout, max_memory, failure, at))
        .and_then(|d| {
            rhai::serde::from_dynamic::<Value>(&d).map_err(|e| {
                StepError::Script(format!("script returned a value that is not data: {e}"))
            })
        });
    AttemptResult {
        result,
        logs,
        changes,
    }
}

fn failed(error: StepError) -> AttemptResult {
    AttemptResult {
        result: Err(error),
        logs: Vec::new(),
        changes: Vec::new(),
    }
}

/// The alert's labels as a program's environment: `ALERT_<NAME>` (upper case; any character
/// other than a letter, digit or `_` becomes `_`).
fn alert_env(alert: &Alert) -> Vec<(String, String)> {
    alert
        .labels
        .iter()
        .map(|(k, v)| {
            let name: String = k
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            (format!("ALERT_{name}"), v.clone())
        })
        .collect()
}

/// The `alert` map scripts see, built directly rather than through JSON.
fn alert_dynamic(alert: &Alert) -> Dynamic {
    let strings = |labels: &crate::domain::Labels| -> Dynamic {
        let map: rhai::Map = labels
            .iter()
            .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
            .collect();
        map.into()
    };
    let mut map = rhai::Map::new();
    map.insert("alertname".into(), alert.alertname().into());
    map.insert("status".into(), alert.status.as_str().into());
    map.insert("fingerprint".into(), alert.fingerprint.as_str().into());
    map.insert("labels".into(), strings(&alert.labels));
    map.insert("annotations".into(), strings(&alert.annotations));
    map.insert("startsAt".into(), alert.starts_at.to_string().into());
    map.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SandboxLimits;
    use crate::domain::decode_webhook;

    fn executor(roots: Vec<std::path::PathBuf>) -> Executor {
        Executor::new(
            Arc::new(sandbox::build_engine(
                &SandboxLimits::default(),
                roots,
                None,
            )),
            false,
            None,
        )
    }

    fn alert() -> Alert {
        let body = include_str!("../../tests/fixtures/alertmanager-0.25-firing.json");
        decode_webhook(body.as_bytes()).unwrap().alerts.remove(0)
    }

    #[test]
    fn the_script_sees_the_alert_as_documented() {
        let a = alert();
        let seen: Value = rhai::serde::from_dynamic(&alert_dynamic(&a)).unwrap();
        assert_eq!(
            seen,
            serde_json::json!({
                "alertname": a.alertname(),
                "status": "firing",
                "fingerprint": a.fingerprint.as_str(),
                "labels": a.labels,
                "annotations": a.annotations,
                "startsAt": a.starts_at.to_string(),
            })
        );
        assert!(seen["labels"].as_object().is_some_and(|l| !l.is_empty()));
    }

    async fn run(ex: &Executor, src: &str, params: Value, timeout: Duration) -> AttemptResult {
        let action = StepAction::Rhai {
            ast: Arc::new(ex.engine().compile(src).unwrap()),
            source: "test".into(),
            code: src.into(),
            at: Arc::new(crate::playbook::Origin {
                file: "test.rhai".into(),
                line: 0,
            }),
        };
        let Value::Object(params) = params else {
            panic!()
        };
        ex.run(Attempt {
            action: &action,
            alert: &alert(),
            params,
            timeout,
            dry_run: None,
            cancel: None,
            args: Vec::new(),
        })
        .await
    }

    #[tokio::test]
    async fn scripts_see_the_alert_and_params_log_and_return_a_value() {
        let ex = executor(vec![]);
        let r = run(
            &ex,
            r#"log("hello " + alert.labels.instance); print(params.n); #{ fp: alert.fingerprint, n: params.n + 1 }"#,
            serde_json::json!({"n": 41}),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(
            r.result,
            Ok(serde_json::json!({"fp": "3e27bcf000d7dae4", "n": 42}))
        );
        assert_eq!(r.logs, vec!["hello curl-test".to_owned(), "41".to_owned()]);
    }

    #[tokio::test]
    async fn throw_fails_the_attempt_with_the_message() {
        let r = run(
            &executor(vec![]),
            r#"throw "disk still full""#,
            serde_json::json!({}),
            Duration::from_secs(5),
        )
        .await;
        let e = r.result.unwrap_err();
        assert_eq!(e.to_string(), "script threw: disk still full (test.rhai:1)");
        assert_eq!(e.metric_label(), "script_threw");
    }

    #[tokio::test]
    async fn a_runtime_error_names_the_file_and_line_and_a_missing_label_says_so() {
        let r = run(
            &executor(vec![]),
            "let a = 1;\nlet unit = alert.labels.unit;\nunit.len()",
            serde_json::json!({}),
            Duration::from_secs(5),
        )
        .await;
        let e = r.result.unwrap_err().to_string();
        assert!(
            e.starts_with("Function not found: len (()) (test.rhai:3)"),
            "{e}"
        );
        assert!(
            e.contains("a label, annotation or field that is not set reads as ()"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_endless_loop_is_stopped_by_the_limits() {
        let r = run(
            &executor(vec![]),
            "loop { }",
            serde_json::json!({}),
            Duration::from_secs(30),
        )
        .await;
        let err = r.result.unwrap_err().to_string();
        assert!(
            err.contains("operation limit exceeded") || err.contains("timed out"),
            "{err}"
        );
    }

    /// A script that keeps `n` strings of 256 KiB in as many variables: each is within Rhai's own
    /// limits (1 MiB a string, 1,000 variables), their sum is not bounded by them.
    fn hoarder(n: usize) -> String {
        let mut src = String::from("let s = \"\"; s.pad(262144, 'y');\n");
        for i in 0..n {
            src.push_str(&format!("let v{i} = s + {i};\n"));
        }
        src.push_str(&format!("{n}"));
        src
    }

    #[tokio::test]
    async fn a_script_that_hoards_memory_is_stopped_with_a_clear_error() {
        let r = run(
            &executor(vec![]).with_max_memory(8 << 20),
            &hoarder(200),
            serde_json::json!({}),
            Duration::from_secs(20),
        )
        .await;
        let e = r.result.unwrap_err();
        assert_eq!(e.metric_label(), "script_limit");
        assert!(e.to_string().contains("sandbox.max_memory_bytes"), "{e}");
        // Within the limit, the same kind of script runs.
        let r = run(
            &executor(vec![]).with_max_memory(64 << 20),
            &hoarder(20),
            serde_json::json!({}),
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(r.result, Ok(serde_json::json!(20)));
    }

    #[tokio::test]
    async fn the_wall_clock_deadline_stops_a_slow_script() {
        let ex = Executor::new(
            Arc::new(sandbox::build_engine(
                &SandboxLimits {
                    max_operations: 0,
                    ..SandboxLimits::default()
                },
                vec![],
                None,
            )),
            false,
            None,
        );
        let r = run(
            &ex,
            "loop { sleep(50); }",
            serde_json::json!({}),
            Duration::from_millis(300),
        )
        .await;
        let e = r.result.unwrap_err();
        assert_eq!(e.to_string(), "timed out after 300ms");
        assert!(e.is_retryable());
    }

    #[tokio::test]
    async fn no_file_system_access_from_scripts() {
        let ex = executor(vec![]);
        assert!(
            ex.engine().compile(r#"import "std" as s; 1"#).is_err(),
            "modules cannot be loaded"
        );
        let r = run(
            &executor(vec![]),
            r#"disk_cleanup("/", "*", 0)"#,
            serde_json::json!({}),
            Duration::from_secs(5),
        )
        .await;
        let e = r.result.unwrap_err();
        assert!(e.to_string().contains("no allowed roots"), "{e}");
        assert_eq!((e.metric_label(), e.is_retryable()), ("refused", false));
    }

    #[tokio::test]
    async fn disk_cleanup_honours_dry_run_and_reports_bytes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.log"), b"12345").unwrap();
        let ex = executor(vec![dir.path().to_owned()]);
        let src = r#"let r = disk_cleanup(params.path, "*.log", 0, true); r"#;
        let r = run(
            &ex,
            src,
            serde_json::json!({"path": dir.path()}),
            Duration::from_secs(5),
        )
        .await;
        let v = r.result.unwrap();
        assert_eq!(v["bytes"], 5);
        assert_eq!(v["dry_run"], true);
        assert!(dir.path().join("a.log").exists());
        let src = r#"disk_cleanup(params.path, "*.log", "0s")"#;
        let v = run(
            &ex,
            src,
            serde_json::json!({"path": dir.path()}),
            Duration::from_secs(5),
        )
        .await
        .result
        .unwrap();
        assert_eq!(v["bytes"], 5);
        assert!(!dir.path().join("a.log").exists());
    }

    fn attempt<'a>(action: &'a StepAction, alert: &'a Alert, params: Value) -> Attempt<'a> {
        let Value::Object(params) = params else {
            panic!()
        };
        Attempt {
            action,
            alert,
            params,
            timeout: Duration::from_secs(5),
            dry_run: None,
            cancel: None,
            args: Vec::new(),
        }
    }

    #[tokio::test]
    async fn short_scripts_finish_inline_and_others_act_only_once_awaited() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.log"), b"12345").unwrap();
        let ex = executor(vec![dir.path().to_owned()]);
        let rhai = |src: &str| StepAction::Rhai {
            ast: Arc::new(ex.engine().compile(src).unwrap()),
            source: "test".into(),
            code: src.into(),
            at: Arc::new(crate::playbook::Origin {
                file: "test.rhai".into(),
                line: 0,
            }),
        };
        let alert = alert();

        let short = rhai(r#"log("x"); params.n + 1"#);
        let Started::Done(r) = ex.start(attempt(&short, &alert, serde_json::json!({"n": 1})))
        else {
            panic!("a short script finishes inline");
        };
        assert_eq!(
            (r.result, r.logs),
            (Ok(serde_json::json!(2)), vec!["x".to_owned()])
        );

        // Past the inline budget: redone on a blocking thread, same result.
        let long = rhai("let s = 0; for i in 0..5000 { s += i; } s");
        let Started::Pending(f) = ex.start(attempt(&long, &alert, serde_json::json!({}))) else {
            panic!("a long script leaves the worker");
        };
        assert_eq!(f.await.result, Ok(serde_json::json!(12_497_500)));

        // A helper that acts: nothing happens before the caller awaits, and the logs of the
        // abandoned inline attempt are not repeated.
        let acting = rhai(
            r#"log("before"); let r = disk_cleanup(params.path, "*.log", 0); log("after"); r.bytes"#,
        );
        let params = serde_json::json!({"path": dir.path()});
        let Started::Pending(f) = ex.start(attempt(&acting, &alert, params)) else {
            panic!("disk_cleanup never runs inline");
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            dir.path().join("a.log").exists(),
            "nothing acted before the await"
        );
        let r = f.await;
        assert_eq!(r.result, Ok(serde_json::json!(5)));
        assert_eq!(r.logs.len(), 3, "{:?}", r.logs);
        assert_eq!((&*r.logs[0], &*r.logs[2]), ("before", "after"));
        assert!(r.logs[1].starts_with("disk_cleanup "), "{:?}", r.logs);
        assert!(!dir.path().join("a.log").exists());

        // try/catch cannot swallow the move to a thread.
        let caught =
            rhai(r#"let r = "none"; try { sleep(1); r = "slept"; } catch (e) { r = "caught"; } r"#);
        let r = ex
            .run(attempt(&caught, &alert, serde_json::json!({})))
            .await;
        assert_eq!(r.result, Ok(serde_json::json!("slept")));
    }
}
