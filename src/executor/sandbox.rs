//! The Rhai sandbox: one shared [`rhai::Engine`] with limits on operations, call depth and
//! string/array/map sizes, no module loading (so no file system), and only the helpers registered
//! here. Per-evaluation state (wall-clock deadline, captured logs, dry-run flag) lives in a
//! thread-local, because each evaluation owns its thread for its whole duration.
//!
//! Memory: Rhai bounds each string, array and map, not their sum, so the sandbox also bounds the
//! bytes the evaluating thread holds (counted by [`crate::allocator`]), checked at every
//! operation: an evaluation that grows past `max_memory_bytes` stops with a clear error.
//!
//! An evaluation may first run *inline* on an async worker: then it gets [`INLINE_OPERATIONS`]
//! operations, and every helper that blocks or acts on the world (`sleep`, `disk_cleanup`,
//! `exec`, `http::`, `k8s::`) refuses before doing anything. Either ends the evaluation with [`NEEDS_THREAD_TOKEN`], which no
//! script can catch, and the caller evaluates the script again from the start on a blocking
//! thread. The inline attempt can only have logged, and its logs are dropped.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rhai::{Dynamic, Engine, EvalAltResult, Position};

use super::disk::{cleanup, CleanupRequest};
use super::error::StepError;
use super::exec::{ExecPolicy, ExecRequest};
use super::http::{HttpPolicy, HttpRequest};
use super::kubernetes::{self, Change, Kubernetes, Request};
use crate::config::SandboxLimits;

/// At most this many log lines, each at most this long, are kept per step attempt.
const MAX_LOG_LINES: usize = 200;
const MAX_LOG_LINE: usize = 4096;

/// State of the evaluation running on this thread.
pub(crate) struct EvalState {
    pub deadline: Instant,
    pub logs: Vec<String>,
    pub dry_run: bool,
    /// Set when the run is cancelled (its alert resolved); checked like the deadline.
    pub cancel: Option<tokio_util::sync::CancellationToken>,
    /// Kubernetes mutations made by `k8s::` calls, for the run's record.
    pub changes: Vec<Change>,
    /// Evaluating on an async worker: short and side-effect free, or it must move to a thread.
    pub inline: bool,
    /// Bytes the evaluation may hold (`sandbox.max_memory_bytes`).
    pub max_memory: usize,
    /// The last helper failure, with its class: when the script does not catch it, the attempt
    /// fails with this class rather than as a script's own `throw`.
    pub failure: Option<StepError>,
}

thread_local! {
    static STATE: RefCell<Option<EvalState>> = const { RefCell::new(None) };
    /// The thread's held bytes (see [`crate::allocator::thread_held`]) past which the running
    /// evaluation stops; `isize::MAX` when none runs. Apart from `STATE` so that the check at
    /// every operation is one read.
    static MEMORY_CEILING: Cell<isize> = const { Cell::new(isize::MAX) };
}

/// Bytes an evaluation may hold unless the executor is told otherwise.
pub const DEFAULT_MEMORY: usize = 32 << 20;

/// Installs the state for one evaluation on this thread and returns it when `f` is done. A panic
/// in `f` (Rhai is not expected to, but the evaluation may run on an async worker) is caught and
/// returned as its message, so it fails the attempt instead of unwinding the run's task.
pub(crate) fn with_state<T>(
    state: EvalState,
    f: impl FnOnce() -> T,
) -> (Result<T, String>, EvalState) {
    let ceiling = crate::allocator::thread_held()
        .saturating_add(isize::try_from(state.max_memory).unwrap_or(isize::MAX));
    STATE.with(|s| *s.borrow_mut() = Some(state));
    MEMORY_CEILING.with(|c| c.set(ceiling));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned())
    });
    MEMORY_CEILING.with(|c| c.set(isize::MAX));
    let state = STATE
        .with(|s| s.borrow_mut().take())
        .expect("eval state installed above");
    (out, state)
}

fn log_line(line: String) {
    STATE.with(|s| {
        if let Some(st) = s.borrow_mut().as_mut() {
            if st.logs.len() < MAX_LOG_LINES {
                let mut line = line;
                if line.len() > MAX_LOG_LINE {
                    let mut cut = MAX_LOG_LINE;
                    while !line.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    line.truncate(cut);
                    line.push('…');
                }
                st.logs.push(line);
            }
        }
    });
}

fn deadline() -> Option<Instant> {
    STATE.with(|s| s.borrow().as_ref().map(|st| st.deadline))
}

fn cancelled() -> bool {
    STATE.with(|s| {
        s.borrow()
            .as_ref()
            .is_some_and(|st| st.cancel.as_ref().is_some_and(|c| c.is_cancelled()))
    })
}

fn dry_run() -> bool {
    STATE.with(|s| s.borrow().as_ref().is_some_and(|st| st.dry_run))
}

fn inline() -> bool {
    STATE.with(|s| s.borrow().as_ref().is_some_and(|st| st.inline))
}

/// Called first by every helper that blocks or has effects: inline, it ends the evaluation so
/// that it is redone on a blocking thread.
fn off_worker() -> RhaiResult<()> {
    if inline() {
        return Err(terminate(NEEDS_THREAD_TOKEN));
    }
    Ok(())
}

/// Whether an inline evaluation ended because the script needs a blocking thread.
pub(crate) fn needs_thread<T>(result: &RhaiResult<T>) -> bool {
    matches!(result, Err(e) if terminated_by(e, NEEDS_THREAD_TOKEN))
}

/// Ends the evaluation with `token`; scripts cannot catch it.
fn terminate(token: &'static str) -> Box<EvalAltResult> {
    EvalAltResult::ErrorTerminated(Dynamic::from(token), Position::NONE).into()
}

/// A helper's failure: kept, typed, for the attempt's record, and raised in the script as the
/// error text, which the script may catch.
fn helper_failed(error: StepError) -> Box<EvalAltResult> {
    let text = error.to_string();
    STATE.with(|s| {
        if let Some(st) = s.borrow_mut().as_mut() {
            st.failure = Some(error);
        }
    });
    text.into()
}

fn terminated_by(err: &EvalAltResult, token: &str) -> bool {
    matches!(err, EvalAltResult::ErrorTerminated(t, _) if t.to_string() == token)
}

/// The token `on_progress` terminates a script with when its deadline passes.
pub(crate) const DEADLINE_TOKEN: &str = "reactor: step deadline exceeded";
/// The token `on_progress` terminates a script with when its run is cancelled.
pub(crate) const CANCEL_TOKEN: &str = "reactor: run cancelled";
/// The token `on_progress` terminates a script with when it holds too much memory.
pub(crate) const MEMORY_TOKEN: &str = "reactor: memory limit exceeded";
/// The token an inline evaluation ends with when it must continue on a blocking thread.
pub(crate) const NEEDS_THREAD_TOKEN: &str = "reactor: needs a blocking thread";
/// Operations an inline evaluation may take (tens of microseconds) before it moves to a thread.
pub const INLINE_OPERATIONS: u64 = 2048;

/// Stack a thread that evaluates scripts needs beyond its own work.
const STACK_BASE: usize = 2 << 20;
/// Stack one Rhai function-call level takes at most, measured in a debug build (the larger; see
/// `the_deepest_allowed_recursion_fits_the_stack_it_is_given`), rounded up.
pub const STACK_PER_CALL_LEVEL: usize = 64 << 10;
/// Stack one level of expression nesting takes at most, likewise.
pub const STACK_PER_EXPR_LEVEL: usize = 16 << 10;

/// The stack of the threads scripts run on, for the deepest call and expression nesting
/// `limits` allow, so that a recursive script fails with Rhai's depth error instead of
/// overflowing the stack and aborting the process.
pub fn thread_stack_size(limits: &SandboxLimits) -> usize {
    STACK_BASE
        .saturating_add(limits.max_call_levels.saturating_mul(STACK_PER_CALL_LEVEL))
        .saturating_add(limits.max_expr_depth.saturating_mul(STACK_PER_EXPR_LEVEL))
}

/// What the helpers that act may act on; the default allows nothing.
#[derive(Clone, Default)]
pub struct Helpers {
    /// The directories `disk_cleanup` may delete under.
    pub cleanup_roots: Vec<PathBuf>,
    /// The cluster the `k8s::` functions act on (`None`: they fail, not configured).
    pub kube: Option<Kubernetes>,
    /// The programs `exec()` may run.
    pub exec: ExecPolicy,
    /// The URLs `http::` may call.
    pub http: HttpPolicy,
}

/// Builds the sandboxed engine with `disk_cleanup` under `cleanup_roots`, `k8s::` on `kube`, and
/// no program allowed to `exec()`.
pub fn build_engine(
    limits: &SandboxLimits,
    cleanup_roots: Vec<PathBuf>,
    kube: Option<Kubernetes>,
) -> Engine {
    build_engine_with(
        limits,
        Helpers {
            cleanup_roots,
            kube,
            ..Helpers::default()
        },
    )
}

/// Builds the sandboxed engine with these helpers.
pub fn build_engine_with(limits: &SandboxLimits, helpers: Helpers) -> Engine {
    let Helpers {
        cleanup_roots,
        kube,
        exec,
        http,
    } = helpers;
    let mut engine = Engine::new();
    // Static modules (`k8s::`) need module support; scripts still may not import anything.
    engine.disable_symbol("import");
    engine.disable_symbol("export");
    engine
        .set_max_operations(limits.max_operations)
        .set_max_call_levels(limits.max_call_levels)
        .set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth)
        .set_max_string_size(limits.max_string_size)
        .set_max_array_size(limits.max_array_size)
        .set_max_map_size(limits.max_map_size)
        .set_max_variables(1_000)
        .set_max_functions(1_000);
    // Checking the clock on every operation would dominate cheap scripts; every 1024 is enough.
    engine.on_progress(|ops| {
        if crate::allocator::thread_held() > MEMORY_CEILING.with(Cell::get) {
            Some(Dynamic::from(MEMORY_TOKEN))
        } else if ops % 256 != 0 {
            None
        } else if ops >= INLINE_OPERATIONS && inline() {
            Some(Dynamic::from(NEEDS_THREAD_TOKEN))
        } else if ops % 1024 != 0 {
            None
        } else if deadline().is_some_and(|d| Instant::now() >= d) {
            Some(Dynamic::from(DEADLINE_TOKEN))
        } else if cancelled() {
            Some(Dynamic::from(CANCEL_TOKEN))
        } else {
            None
        }
    });
    engine.on_print(|s| log_line(s.to_owned()));
    engine.on_debug(|s, _, _| log_line(s.to_owned()));
    engine.register_fn("log", |s: &str| log_line(s.to_owned()));
    engine.register_fn("log", |d: Dynamic| log_line(d.to_string()));
    engine.register_fn("is_dry_run", dry_run);
    // Native code is not interrupted by the deadline, so sleep never outlives it.
    engine.register_fn("sleep", |ms: i64| -> RhaiResult<()> {
        off_worker()?;
        let want = Duration::from_millis(ms.max(0) as u64);
        let left = deadline().map_or(want, |d| d.saturating_duration_since(Instant::now()));
        // Sleep in slices so that a cancelled run does not wait out the whole nap.
        let until = crate::clock::deadline(want.min(left));
        while !cancelled() {
            let now = Instant::now();
            if now >= until {
                break;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(50)));
        }
        if cancelled() {
            return Err(terminate(CANCEL_TOKEN));
        }
        Ok(())
    });
    register_disk_cleanup(&mut engine, cleanup_roots);
    register_exec(&mut engine, exec);
    engine.register_static_module("k8s", k8s_module(kube).into());
    engine.register_static_module("http", http_module(http).into());
    engine
}

/// Runs one kubernetes request from a script: blocks this (blocking) thread on the runtime,
/// bounded by the step's deadline, and keeps the changes for the run.
fn k8s_call(
    kube: Option<&Kubernetes>,
    name: &str,
    params: serde_json::Value,
) -> RhaiResult<Dynamic> {
    off_worker()?;
    let serde_json::Value::Object(params) = params else {
        unreachable!("built from an object literal or a Rhai map")
    };
    let req = Request::parse(name, params)
        .map_err(|e| helper_failed(StepError::bad_arguments(format!("k8s::{name}: {e}"))))?;
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        helper_failed(StepError::Internal(format!(
            "k8s::{name}: no async runtime on this thread"
        )))
    })?;
    let until = deadline().unwrap_or_else(|| Instant::now() + Duration::from_secs(30));
    let left = until.saturating_duration_since(Instant::now());
    let mut changes = Vec::new();
    // Calls stop at the deadline themselves (and record it); this is the backstop.
    let res = handle.block_on(tokio::time::timeout(
        left + Duration::from_secs(1),
        kubernetes::run(kube, &req, dry_run(), until, &mut changes),
    ));
    record_changes(&mut changes);
    match res {
        Ok(Ok(v)) => rhai::serde::to_dynamic(v),
        Ok(Err(error)) => Err(helper_failed(StepError::Kubernetes {
            context: format!("k8s::{name}"),
            error,
        })),
        Err(_) => Err(terminate(DEADLINE_TOKEN)),
    }
}

/// Keeps the changes a helper made for the run's record.
fn record_changes(changes: &mut Vec<Change>) {
    STATE.with(|s| {
        if let Some(st) = s.borrow_mut().as_mut() {
            st.changes.append(changes);
        }
    });
}

/// `exec(program, args[, #{env, timeout, stdin}])`: runs an allowed program (see
/// [`super::exec`]) and returns `#{code, stdout, stderr, truncated, dry_run, duration_ms}`. A
/// non-zero exit is a result, not an error: the script decides.
fn exec_call(
    policy: &ExecPolicy,
    program: &str,
    args: rhai::Array,
    opts: rhai::Map,
) -> RhaiResult<Dynamic> {
    off_worker()?;
    let bad = |m: String| helper_failed(StepError::bad_arguments(format!("exec: {m}")));
    let args = args
        .into_iter()
        .map(|a| {
            a.into_string()
                .map_err(|t| bad(format!("every argument must be a string, got {t}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut env = Vec::new();
    let mut timeout = None;
    let mut stdin = None;
    for (key, value) in opts {
        match key.as_str() {
            "env" => {
                let vars = value
                    .try_cast::<rhai::Map>()
                    .ok_or_else(|| bad("env must be a map of strings".into()))?;
                for (name, v) in vars {
                    let v = v
                        .into_string()
                        .map_err(|t| bad(format!("env.{name} must be a string, got {t}")))?;
                    env.push((name.to_string(), v));
                }
            }
            "timeout" => timeout = Some(timeout_option(value).map_err(bad)?),
            "stdin" => {
                let text = value
                    .into_string()
                    .map_err(|t| bad(format!("stdin must be a string, got {t}")))?;
                stdin = Some(text.into_bytes());
            }
            other => {
                return Err(bad(format!(
                    "unknown option {other:?} (env, timeout, stdin)"
                )))
            }
        }
    }
    let step_deadline = deadline().unwrap_or_else(|| Instant::now() + Duration::from_secs(30));
    let until = timeout.map_or(step_deadline, |t| {
        crate::clock::deadline(t).min(step_deadline)
    });
    let req = ExecRequest {
        program: program.to_owned(),
        args,
        env,
        stdin,
        deadline: until,
        dry_run: dry_run(),
    };
    let mut changes = Vec::new();
    let res = policy.run(&req, &mut changes, cancelled);
    if let Some(change) = changes.first() {
        log_line(format!("exec {}: {}", change.object, change.result));
    }
    record_changes(&mut changes);
    match res {
        Ok(out) => rhai::serde::to_dynamic(&out),
        Err(_) if Instant::now() >= step_deadline => Err(terminate(DEADLINE_TOKEN)),
        Err(_) if cancelled() => Err(terminate(CANCEL_TOKEN)),
        Err(e) => Err(helper_failed(e)),
    }
}

fn register_exec(engine: &mut Engine, policy: ExecPolicy) {
    let policy = std::sync::Arc::new(policy);
    let p = std::sync::Arc::clone(&policy);
    engine.register_fn("exec", move |program: &str, args: rhai::Array| {
        exec_call(&p, program, args, rhai::Map::new())
    });
    engine.register_fn(
        "exec",
        move |program: &str, args: rhai::Array, opts: rhai::Map| {
            exec_call(&policy, program, args, opts)
        },
    );
}

/// A duration option of a helper: milliseconds, or a string like `"10s"`.
fn timeout_option(value: Dynamic) -> Result<Duration, String> {
    if let Some(ms) = value.clone().try_cast::<i64>() {
        return Ok(Duration::from_millis(ms.max(0) as u64));
    }
    let text = value
        .into_string()
        .map_err(|t| format!("timeout must be a duration like \"10s\" or milliseconds, got {t}"))?;
    crate::bounds::parse_duration("timeout", &text, crate::bounds::STEP_TIMEOUT)
}

/// `http::<method>(url[, #{headers, body, json, timeout}])`: one request to an allowed URL (see
/// [`super::http`]); returns `#{status, headers, body, truncated, dry_run, duration_ms}`. A 4xx
/// or 5xx answer is a result, not an error: the script decides.
fn http_call(
    policy: &HttpPolicy,
    method: &'static str,
    url: &str,
    opts: rhai::Map,
) -> RhaiResult<Dynamic> {
    off_worker()?;
    let bad = |m: String| helper_failed(StepError::bad_arguments(format!("http::{method}: {m}")));
    let mut headers = Vec::new();
    let mut body = None;
    let mut timeout = None;
    for (key, value) in opts {
        match key.as_str() {
            "headers" => {
                let map = value
                    .try_cast::<rhai::Map>()
                    .ok_or_else(|| bad("headers must be a map of strings".into()))?;
                for (name, v) in map {
                    let v = v
                        .into_string()
                        .map_err(|t| bad(format!("headers.{name} must be a string, got {t}")))?;
                    headers.push((name.to_string(), v));
                }
            }
            "body" => {
                let text = value
                    .into_string()
                    .map_err(|t| bad(format!("body must be a string (or use json), got {t}")))?;
                body = Some(text.into_bytes());
            }
            "json" => {
                let data: serde_json::Value =
                    rhai::serde::from_dynamic(&value).map_err(|e| bad(format!("json: {e}")))?;
                body = Some(data.to_string().into_bytes());
                if !headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                {
                    headers.push(("content-type".into(), "application/json".into()));
                }
            }
            "timeout" => timeout = Some(timeout_option(value).map_err(bad)?),
            other => {
                return Err(bad(format!(
                    "unknown option {other:?} (headers, body, json, timeout)"
                )))
            }
        }
    }
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        helper_failed(StepError::Internal(format!(
            "http::{method}: no async runtime on this thread"
        )))
    })?;
    let step_deadline = deadline().unwrap_or_else(|| Instant::now() + Duration::from_secs(30));
    let until = timeout.map_or(step_deadline, |t| {
        crate::clock::deadline(t).min(step_deadline)
    });
    let req = HttpRequest {
        method: reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .expect("a known method"),
        url: url.to_owned(),
        headers,
        body,
        deadline: until,
        dry_run: dry_run(),
    };
    let mut changes = Vec::new();
    let res = handle.block_on(policy.send(req, &mut changes));
    if let Some(change) = changes.first() {
        log_line(format!(
            "{} {}: {}",
            change.verb, change.object, change.result
        ));
    }
    record_changes(&mut changes);
    match res {
        Ok(answer) => rhai::serde::to_dynamic(&answer),
        Err(_) if Instant::now() >= step_deadline => Err(terminate(DEADLINE_TOKEN)),
        Err(e) => Err(helper_failed(e)),
    }
}

/// The `http::` functions.
fn http_module(policy: HttpPolicy) -> rhai::Module {
    let policy = std::sync::Arc::new(policy);
    let mut m = rhai::Module::new();
    for method in ["get", "post", "put", "delete"] {
        let p = std::sync::Arc::clone(&policy);
        m.set_native_fn(method, move |url: &str| {
            http_call(&p, method, url, rhai::Map::new())
        });
        let p = std::sync::Arc::clone(&policy);
        m.set_native_fn(method, move |url: &str, opts: rhai::Map| {
            http_call(&p, method, url, opts)
        });
    }
    m
}

/// Reads one object for a script.
fn k8s_get(kube: Option<&Kubernetes>, kind: &str, ns: &str, name: &str) -> RhaiResult<Dynamic> {
    off_worker()?;
    let context = || "k8s::get".to_owned();
    let Some(kube) = kube else {
        return Err(helper_failed(StepError::Kubernetes {
            context: context(),
            error: kubernetes::KubeError::NotConfigured,
        }));
    };
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        helper_failed(StepError::Internal(
            "k8s::get: no async runtime on this thread".to_owned(),
        ))
    })?;
    let until = deadline().unwrap_or_else(|| Instant::now() + Duration::from_secs(30));
    let v = handle
        .block_on(kube.get(kind, ns, name, until))
        .map_err(|error| {
            helper_failed(StepError::Kubernetes {
                context: context(),
                error,
            })
        })?;
    rhai::serde::to_dynamic(v)
}

/// The `k8s::` functions: the kubernetes step actions, plus `get` to inspect before acting.
fn k8s_module(kube: Option<Kubernetes>) -> rhai::Module {
    use serde_json::json;
    let mut m = rhai::Module::new();
    let k = kube.clone();
    m.set_native_fn("restart_pod", move |ns: &str, pod: &str| {
        k8s_call(
            k.as_ref(),
            "restart_pod",
            json!({"namespace": ns, "pod": pod}),
        )
    });
    let k = kube.clone();
    m.set_native_fn(
        "restart_pod",
        move |ns: &str, pod: &str, standalone: bool| {
            let params = json!({"namespace": ns, "pod": pod, "allow_standalone": standalone});
            k8s_call(k.as_ref(), "restart_pod", params)
        },
    );
    let k = kube.clone();
    m.set_native_fn(
        "rollout_restart",
        move |ns: &str, kind: &str, name: &str| {
            let params = json!({"namespace": ns, "kind": kind, "name": name});
            k8s_call(k.as_ref(), "rollout_restart", params)
        },
    );
    let k = kube.clone();
    m.set_native_fn(
        "scale_up",
        move |ns: &str, kind: &str, name: &str, opts: rhai::Map| {
            let mut params: serde_json::Value = rhai::serde::from_dynamic(&opts.into())?;
            params["namespace"] = ns.into();
            params["kind"] = kind.into();
            params["name"] = name.into();
            k8s_call(k.as_ref(), "scale_up", params)
        },
    );
    let k = kube.clone();
    m.set_native_fn(
        "disk_cleanup",
        move |node: &str, path: &str, glob: &str, age: &str| {
            let params = json!({"node": node, "path": path, "glob": glob, "older_than": age});
            k8s_call(k.as_ref(), "disk_cleanup", params)
        },
    );
    m.set_native_fn("get", move |kind: &str, ns: &str, name: &str| {
        k8s_get(kube.as_ref(), kind, ns, name)
    });
    m
}

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

fn register_disk_cleanup(engine: &mut Engine, roots: Vec<PathBuf>) {
    let roots = std::sync::Arc::new(roots);
    let run = move |path: &str,
                    glob: &str,
                    older: Dynamic,
                    dry: Option<bool>|
          -> RhaiResult<Dynamic> {
        off_worker()?;
        let older_than = if let Some(secs) = older.clone().try_cast::<i64>() {
            Duration::from_secs(secs.max(0) as u64)
        } else {
            let s = older.into_string().map_err(|t| helper_failed(StepError::bad_arguments(format!("disk_cleanup: older_than must be a duration string like \"7d\" or seconds, got {t}"))))?;
            crate::bounds::parse_duration("older_than", &s, crate::bounds::HELPER_CLEANUP_AGE)
                .map_err(|e| {
                    helper_failed(StepError::bad_arguments(format!("disk_cleanup: {e}")))
                })?
        };
        let req = CleanupRequest {
            path: path.into(),
            glob: glob.to_owned(),
            older_than,
            dry_run: dry.unwrap_or(false) || dry_run(),
        };
        let until = deadline().unwrap_or_else(|| Instant::now() + Duration::from_secs(30));
        let report = cleanup(&req, &roots, until)
            .map_err(|e| helper_failed(StepError::cleanup("disk_cleanup", &e)))?;
        log_line(format!(
            "disk_cleanup {}: {} files, {} bytes{}",
            path,
            report.files.len(),
            report.bytes,
            if report.dry_run { " (dry run)" } else { "" }
        ));
        rhai::serde::to_dynamic(&report)
    };
    let r3 = run.clone();
    engine.register_fn("disk_cleanup", move |p: &str, g: &str, o: Dynamic| {
        r3(p, g, o, None)
    });
    engine.register_fn(
        "disk_cleanup",
        move |p: &str, g: &str, o: Dynamic, d: bool| run(p, g, o, Some(d)),
    );
}

/// Turns an evaluation error into the attempt's error. `failure` is the last helper failure: when
/// the script let it through uncaught, the error keeps the helper's class.
pub(crate) fn describe_error(
    err: &EvalAltResult,
    timeout: Duration,
    max_memory: usize,
    failure: Option<StepError>,
) -> StepError {
    match err {
        e if terminated_by(e, DEADLINE_TOKEN) => StepError::Timeout {
            after: timeout,
            hung: false,
        },
        e if terminated_by(e, CANCEL_TOKEN) => StepError::Cancelled,
        e if terminated_by(e, MEMORY_TOKEN) => StepError::Limit(format!(
            "stopped: the script held more than {max_memory} bytes (sandbox.max_memory_bytes)"
        )),
        EvalAltResult::ErrorTooManyOperations(pos) => {
            StepError::Limit(format!("stopped: operation limit exceeded{}", at(*pos)))
        }
        EvalAltResult::ErrorTooManyVariables(_)
        | EvalAltResult::ErrorTooManyModules(_)
        | EvalAltResult::ErrorStackOverflow(_)
        | EvalAltResult::ErrorDataTooLarge(..) => StepError::Limit(err.to_string()),
        EvalAltResult::ErrorRuntime(value, pos) => {
            let message = value.to_string();
            let cause = failure.filter(|f| f.to_string() == message).map(Box::new);
            StepError::Threw {
                message,
                line: pos.line(),
                cause,
            }
        }
        other => StepError::Script(other.to_string()),
    }
}

fn at(pos: Position) -> String {
    pos.line()
        .map(|l| format!(" (line {l})"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `src` on a thread with the stack `thread_stack_size` gives for `limits`, as the runs'
    /// runtime does. An overflow would abort this whole test binary.
    fn eval_on_sized_thread(limits: SandboxLimits, src: String) -> String {
        std::thread::Builder::new()
            .stack_size(thread_stack_size(&limits))
            .spawn(move || {
                let engine = build_engine(&limits, vec![], None);
                match engine.eval::<Dynamic>(&src) {
                    Ok(v) => format!("ok {v}"),
                    Err(e) => e.to_string(),
                }
            })
            .unwrap()
            .join()
            .unwrap()
    }

    #[test]
    fn the_deepest_allowed_recursion_fits_the_stack_it_is_given() {
        let deepest = SandboxLimits {
            max_call_levels: crate::bounds::SANDBOX_CALL_LEVELS.max as usize,
            max_expr_depth: crate::bounds::SANDBOX_EXPR_DEPTH.max as usize,
            max_operations: 0,
            ..SandboxLimits::default()
        };
        let e = eval_on_sized_thread(
            deepest.clone(),
            "fn down(n) { let a = [n, n + 1, #{x: n}]; if n == 0 { 0 } else { 1 + down(n - 1) } } down(100000)".into(),
        );
        assert!(e.contains("Stack overflow"), "{e}");
        // Nesting just inside the expression limit parses and runs.
        let nested = format!("{}1{}", "(".repeat(120), ")".repeat(120));
        assert_eq!(eval_on_sized_thread(deepest, nested), "ok 1");
    }

    #[test]
    fn a_panic_in_an_evaluation_is_returned_and_the_state_comes_back() {
        let state = EvalState {
            deadline: Instant::now(),
            logs: Vec::new(),
            dry_run: false,
            cancel: None,
            changes: Vec::new(),
            inline: true,
            max_memory: DEFAULT_MEMORY,
            failure: None,
        };
        let (out, st) = with_state(state, || -> () {
            log_line("before".to_owned());
            panic!("boom")
        });
        assert_eq!(out, Err("boom".to_owned()));
        assert_eq!(st.logs, ["before"]);
        assert!(
            STATE.with(|s| s.borrow().is_none()),
            "nothing left on the thread"
        );
    }
}
