//! The helpers that block or act, registered in the sandbox: `k8s::` (the Kubernetes actions and
//! `get`), `exec()`, `http::`, and `disk_cleanup`. Each starts with [`off_worker`] (never inline),
//! bounds itself by the step's deadline (Rhai's cannot interrupt native code), keeps what it
//! changed for the run's record, and raises a failure with its class ([`helper_failed`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rhai::{Dynamic, Engine};

use super::super::disk::{cleanup, CleanupRequest};
use super::super::exec::{ExecPolicy, ExecRequest};
use super::super::http::{HttpPolicy, HttpRequest};
use super::super::kubernetes::{self, Change, Kubernetes, Request};
use super::*;

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

pub(super) fn register_exec(engine: &mut Engine, policy: ExecPolicy) {
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
pub(super) fn http_module(policy: HttpPolicy) -> rhai::Module {
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
pub(super) fn k8s_module(kube: Option<Kubernetes>) -> rhai::Module {
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

pub(super) fn register_disk_cleanup(engine: &mut Engine, roots: Vec<PathBuf>) {
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
        if !report.files.is_empty() {
            // On the run as a change, so a shadow run lists what it would have deleted.
            let shown: Vec<&String> = report.files.iter().take(20).collect();
            record_changes(&mut vec![Change {
                verb: "delete".into(),
                object: format!(
                    "{} file(s) matching {glob} under {path}",
                    report.files.len()
                ),
                namespace: String::new(),
                dry_run: report.dry_run,
                result: "ok".into(),
                detail: serde_json::json!({"files": shown, "bytes": report.bytes}),
            }]);
        }
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
