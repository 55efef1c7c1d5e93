//! Warnings for playbooks that load but can only fail under the configuration in force: a
//! `kubernetes:` step or a `k8s::` call with no cluster, `disk_cleanup` with no allowed root, a
//! program not in `exec.allow`, a URL not under `http.allow`. `reactor check` prints them (exit 0,
//! or 1 with `--strict`). Scripts are read as text, so a call in a comment counts too: these are
//! warnings, not errors.

use std::path::PathBuf;

use super::{Playbook, StepAction};

/// What the configuration lets steps reach.
#[derive(Debug, Clone, Default)]
pub struct Capabilities {
    /// A Kubernetes cluster is configured.
    pub cluster: bool,
    /// `disk_cleanup.allowed_roots` is not empty.
    pub cleanup_roots: bool,
    /// `exec.allow`.
    pub exec_allow: Vec<PathBuf>,
    /// `http.allow`, normalized.
    pub http_allow: Vec<reqwest::Url>,
}

/// One warning: where, and what can only fail.
#[derive(Debug, Clone, PartialEq)]
pub struct Warning {
    pub playbook: String,
    pub origin: String,
    pub step: String,
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: warning: playbook {:?}, step {:?}: {}",
            self.origin, self.playbook, self.step, self.message
        )
    }
}

/// Every step of `playbooks` that can only fail with `can`.
pub fn warnings<'a>(
    playbooks: impl IntoIterator<Item = &'a Playbook>,
    can: &Capabilities,
) -> Vec<Warning> {
    let mut out = Vec::new();
    for p in playbooks {
        for step in &p.steps {
            let mut warn = |message: String| {
                out.push(Warning {
                    playbook: p.name.clone(),
                    origin: p.origin.to_string(),
                    step: step.name.clone(),
                    message,
                })
            };
            match &step.action {
                StepAction::Kubernetes { action } if !can.cluster => warn(format!(
                    "kubernetes {action} needs a cluster, and none is configured (kubernetes.kubeconfig, KUBECONFIG, or in a pod)"
                )),
                StepAction::Kubernetes { .. } => {}
                StepAction::Command { program, .. } => {
                    if !can.exec_allow.iter().any(|a| a.as_os_str() == program.as_str()) {
                        warn(format!("command {program} is not in exec.allow"));
                    }
                }
                StepAction::Rhai { code, .. } => {
                    for message in script_warnings(code, can) {
                        warn(message);
                    }
                }
            }
        }
    }
    out
}

fn script_warnings(code: &str, can: &Capabilities) -> Vec<String> {
    let mut out = Vec::new();
    if !can.cluster && code.contains("k8s::") {
        out.push("calls k8s::, and no Kubernetes cluster is configured".into());
    }
    let local_cleanup = code
        .match_indices("disk_cleanup(")
        .any(|(at, _)| !code[..at].ends_with("k8s::"));
    if local_cleanup && !can.cleanup_roots {
        out.push("calls disk_cleanup, and disk_cleanup.allowed_roots is empty".into());
    }
    for program in literal_arguments(code, "exec(") {
        if !can
            .exec_allow
            .iter()
            .any(|a| a.as_os_str() == program.as_str())
        {
            out.push(format!("exec({program:?}) is not in exec.allow"));
        }
    }
    if code.contains("exec(") && can.exec_allow.is_empty() {
        out.push("calls exec, and exec.allow is empty".into());
    }
    let calls_http = ["get(", "post(", "put(", "delete("]
        .iter()
        .any(|m| code.contains(&format!("http::{m}")));
    if calls_http && can.http_allow.is_empty() {
        out.push("calls http::, and http.allow is empty".into());
    }
    for m in ["get(", "post(", "put(", "delete("] {
        for url in literal_arguments(code, &format!("http::{m}")) {
            let allowed = reqwest::Url::parse(&url).is_ok_and(|u| {
                can.http_allow
                    .iter()
                    .any(|p| u.origin() == p.origin() && u.path().starts_with(p.path()))
            });
            if !allowed && !can.http_allow.is_empty() {
                out.push(format!(
                    "http::{m}{url:?}) is not under a prefix in http.allow"
                ));
            }
        }
    }
    out
}

/// The string literals passed first to `call` (e.g. `exec(`), where the argument is one.
fn literal_arguments(code: &str, call: &str) -> Vec<String> {
    code.match_indices(call)
        .filter_map(|(at, _)| {
            let rest = code[at + call.len()..].trim_start();
            let rest = rest.strip_prefix('"')?;
            let end = rest.find('"')?;
            Some(rest[..end].to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_that_can_only_fail_are_named() {
        let none = Capabilities::default();
        let w = script_warnings(
            r#"k8s::restart_pod("a", "b"); disk_cleanup("/var/log", "*.gz", "7d"); exec("/usr/bin/systemctl", []); http::post("https://x/")"#,
            &none,
        );
        assert_eq!(
            w,
            [
                "calls k8s::, and no Kubernetes cluster is configured",
                "calls disk_cleanup, and disk_cleanup.allowed_roots is empty",
                "exec(\"/usr/bin/systemctl\") is not in exec.allow",
                "calls exec, and exec.allow is empty",
                "calls http::, and http.allow is empty",
            ]
        );
        let can = Capabilities {
            cluster: true,
            cleanup_roots: true,
            exec_allow: vec!["/usr/bin/systemctl".into()],
            http_allow: vec![reqwest::Url::parse("https://admin.internal/api/").unwrap()],
        };
        assert!(script_warnings(
            r#"k8s::disk_cleanup("n", "/p", "*", "1d"); exec("/usr/bin/systemctl", []); http::get("https://admin.internal/api/x")"#,
            &can
        )
        .is_empty());
        assert_eq!(
            script_warnings(r#"http::get("https://admin.internal/other")"#, &can),
            ["http::get(\"https://admin.internal/other\") is not under a prefix in http.allow"]
        );
    }
}
