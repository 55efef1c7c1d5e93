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

mod helpers;

use super::error::StepError;
use super::exec::ExecPolicy;
use super::http::HttpPolicy;
use super::kubernetes::{Change, Kubernetes};
use crate::config::SandboxLimits;
use helpers::{http_module, k8s_module, register_disk_cleanup, register_exec};

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

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// Turns an evaluation error into the attempt's error, located in its file (`at`: the script's
/// file and the line before its first). `failure` is the last helper failure: when the script let
/// it through uncaught, the error keeps the helper's class.
pub(crate) fn describe_error(
    err: &EvalAltResult,
    timeout: Duration,
    max_memory: usize,
    failure: Option<StepError>,
    at: &crate::playbook::Origin,
) -> StepError {
    let place = |pos: Position| {
        pos.line()
            .map(|l| format!(" ({}:{})", at.file.display(), at.line + l as u64))
            .unwrap_or_default()
    };
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
            StepError::Limit(format!("stopped: operation limit exceeded{}", place(*pos)))
        }
        EvalAltResult::ErrorTooManyVariables(_)
        | EvalAltResult::ErrorTooManyModules(_)
        | EvalAltResult::ErrorStackOverflow(_)
        | EvalAltResult::ErrorDataTooLarge(..) => StepError::Limit(format!(
            "{}{}",
            without_position(err),
            place(err.position())
        )),
        EvalAltResult::ErrorRuntime(value, pos) => {
            let message = value.to_string();
            let cause = failure.filter(|f| f.to_string() == message).map(Box::new);
            StepError::Threw {
                message,
                at: place(*pos).trim().trim_matches(['(', ')']).to_owned(),
                cause,
            }
        }
        other => {
            // A label the alert does not have reads as (), and the first function given it
            // fails: say what probably happened.
            let hint = match other {
                EvalAltResult::ErrorFunctionNotFound(sig, _) if sig.contains("()") => {
                    "; a label, annotation or field that is not set reads as (): test it first, e.g. `if \"unit\" in alert.labels`"
                }
                _ => "",
            };
            StepError::Script(format!(
                "{}{}{hint}",
                without_position(other),
                place(other.position())
            ))
        }
    }
}

/// Rhai's message without the `(line L, position P)` it appends: the caller names the file.
fn without_position(e: &EvalAltResult) -> String {
    let text = e.to_string();
    match text.rfind(" (line ") {
        Some(i) if !e.position().is_none() => text[..i].to_owned(),
        _ => text,
    }
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
