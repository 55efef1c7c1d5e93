//! Why a step attempt failed, by class. Every attempt error is a [`StepError`]; its [`Class`]
//! decides whether the engine retries it ([`StepError::is_retryable`]) and labels it in
//! `reactor_step_failures_total{playbook,reason}` ([`StepError::metric_label`]).
//!
//! The rule: a failure that may pass by itself is retried (a timeout, a peer that could not be
//! reached, HTTP 429, 5xx and 409, an I/O error, a script's own `throw`, a command's non-zero
//! exit); a failure that would
//! recur on the same input is final (a refusal by policy, an invalid name, HTTP 4xx otherwise,
//! a sandbox limit, a script error such as an unknown function, an internal error). A script that
//! does not catch a helper's failure fails with that helper's class.

use std::time::Duration;

use super::disk::CleanupError;
use super::kubernetes::KubeError;

/// The kind of a failure: whether it is retried and its metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The step's timeout, a helper that did not return, or a call that got no answer in time.
    Timeout,
    /// The run was cancelled (its alert resolved); never retried.
    Cancelled,
    /// A peer that could not be reached or answered nonsense.
    Unreachable,
    /// HTTP 429.
    Throttled,
    /// HTTP 5xx.
    ServerError,
    /// HTTP 409: the object changed under reactor; reading it again may succeed.
    Conflict,
    /// Any other HTTP 4xx (403, 404, 422, ...).
    Rejected,
    /// Refused before any call: namespace policy, an invalid name, a path outside the allowed
    /// roots, an action's safety rule, bad parameters.
    Refused,
    /// The helper's peer is not configured (e.g. no Kubernetes cluster).
    NotConfigured,
    /// A file-system error while acting.
    Io,
    /// The script threw.
    ScriptThrew,
    /// A `command:` step's program exited with a status other than 0.
    ExitStatus,
    /// The script hit a sandbox limit (operations, memory, depth).
    ScriptLimit,
    /// Any other script error: a type mismatch, an unknown function, a result that is not data.
    ScriptError,
    /// A panic or a lost evaluation thread.
    Internal,
}

impl Class {
    /// Whether an attempt that failed this way is tried again (within the step's `retries`).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Class::Timeout
                | Class::Unreachable
                | Class::Throttled
                | Class::ServerError
                | Class::Conflict
                | Class::Io
                | Class::ScriptThrew
                | Class::ExitStatus
        )
    }

    /// The `reason` label of `reactor_step_failures_total`, and the run record's `errorClass`.
    pub fn label(self) -> &'static str {
        match self {
            Class::Timeout => "timeout",
            Class::Cancelled => "cancelled",
            Class::Unreachable => "unreachable",
            Class::Throttled => "throttled",
            Class::ServerError => "server_error",
            Class::Conflict => "conflict",
            Class::Rejected => "rejected",
            Class::Refused => "refused",
            Class::NotConfigured => "not_configured",
            Class::Io => "io",
            Class::ScriptThrew => "script_threw",
            Class::ExitStatus => "exit_status",
            Class::ScriptLimit => "script_limit",
            Class::ScriptError => "script_error",
            Class::Internal => "internal",
        }
    }

    /// The class of an HTTP status that is not a success.
    pub fn of_http_status(code: u16) -> Class {
        match code {
            429 => Class::Throttled,
            409 => Class::Conflict,
            500..=599 => Class::ServerError,
            400..=499 => Class::Rejected,
            _ => Class::Unreachable,
        }
    }
}

/// Why one step attempt failed. Its text is what the run records as the attempt's `error`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StepError {
    /// The step's timeout passed; `hung`: a helper had not returned even after a grace period.
    #[error("timed out after {}{}", humantime::format_duration(*after), if *hung { ": a helper call did not return" } else { "" })]
    Timeout { after: Duration, hung: bool },
    #[error("cancelled")]
    Cancelled,
    /// A Kubernetes request failed; `context` names the step action or the script helper.
    #[error("{context}: {error}")]
    Kubernetes { context: String, error: KubeError },
    /// Another helper failed (e.g. `disk_cleanup`), with the class of its failure.
    #[error("{message}")]
    Helper { message: String, class: Class },
    /// The script threw, itself or by not catching a helper's failure (`cause`); `at` is the
    /// file and line (empty when unknown).
    #[error("script threw: {message}{}", at_place(at))]
    Threw {
        message: String,
        at: String,
        cause: Option<Box<StepError>>,
    },
    /// The script was stopped by a sandbox limit.
    #[error("stopped: {0}")]
    Limit(String),
    /// Any other script error.
    #[error("{0}")]
    Script(String),
    /// The attempt could not be carried out: a panic, a lost thread.
    #[error("{0}")]
    Internal(String),
}

impl StepError {
    pub fn class(&self) -> Class {
        match self {
            StepError::Timeout { .. } => Class::Timeout,
            StepError::Cancelled => Class::Cancelled,
            StepError::Kubernetes { error, .. } => error.class(),
            StepError::Helper { class, .. } => *class,
            StepError::Threw {
                cause: Some(cause), ..
            } => cause.class(),
            StepError::Threw { cause: None, .. } => Class::ScriptThrew,
            StepError::Limit(_) => Class::ScriptLimit,
            StepError::Script(_) => Class::ScriptError,
            StepError::Internal(_) => Class::Internal,
        }
    }

    /// Whether the engine tries the step again (when it has retries left).
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// The `reason` label of `reactor_step_failures_total`.
    pub fn metric_label(&self) -> &'static str {
        self.class().label()
    }

    /// A `disk_cleanup` failure, with `context` before its text.
    pub fn cleanup(context: &str, error: &CleanupError) -> StepError {
        let class = match error {
            CleanupError::NoRoots | CleanupError::NotAllowed(_) | CleanupError::Glob(..) => {
                Class::Refused
            }
            CleanupError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Class::Refused
            }
            CleanupError::Io { .. } => Class::Io,
        };
        StepError::Helper {
            message: format!("{context}: {error}"),
            class,
        }
    }

    /// A helper called with arguments it cannot use.
    pub fn bad_arguments(message: String) -> StepError {
        StepError::Helper {
            message,
            class: Class::Refused,
        }
    }
}

impl KubeError {
    pub fn class(&self) -> Class {
        match self {
            KubeError::NotConfigured => Class::NotConfigured,
            KubeError::NamespaceDenied(_)
            | KubeError::InvalidName(_)
            | KubeError::Refused(_)
            | KubeError::Params(_) => Class::Refused,
            KubeError::Api { code, .. } => Class::of_http_status(*code),
            KubeError::Client { .. } => Class::Unreachable,
            KubeError::Timeout { .. } => Class::Timeout,
        }
    }
}

fn at_place(at: &str) -> String {
    if at.is_empty() {
        String::new()
    } else {
        format!(" ({at})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> StepError {
        StepError::Kubernetes {
            context: "kubernetes restart_pod".into(),
            error: KubeError::Api {
                verb: "delete",
                object: "pod shop/web-1".into(),
                code,
                message: "denied".into(),
            },
        }
    }

    #[test]
    fn kubernetes_answers_keep_their_http_class() {
        let classes: Vec<_> = [403, 404, 409, 422, 429, 500, 503]
            .map(|c| (c, api(c).metric_label(), api(c).is_retryable()))
            .into();
        assert_eq!(
            classes,
            vec![
                (403, "rejected", false),
                (404, "rejected", false),
                (409, "conflict", true),
                (422, "rejected", false),
                (429, "throttled", true),
                (500, "server_error", true),
                (503, "server_error", true),
            ]
        );
        assert_eq!(
            api(403).to_string(),
            "kubernetes restart_pod: delete pod shop/web-1: denied (HTTP 403)"
        );
    }

    #[test]
    fn a_refusal_is_final_and_a_timeout_is_retried() {
        let refused = StepError::Kubernetes {
            context: "k8s::restart_pod".into(),
            error: KubeError::NamespaceDenied("kube-system".into()),
        };
        assert_eq!(
            (refused.metric_label(), refused.is_retryable()),
            ("refused", false)
        );
        let timeout = StepError::Timeout {
            after: Duration::from_secs(2),
            hung: false,
        };
        assert_eq!(timeout.to_string(), "timed out after 2s");
        assert!(timeout.is_retryable());
        assert!(!StepError::Cancelled.is_retryable());
        assert!(!StepError::Limit("operation limit exceeded".into()).is_retryable());
    }

    #[test]
    fn a_script_that_lets_a_helper_failure_through_fails_with_the_helpers_class() {
        let own = StepError::Threw {
            message: "disk still full".into(),
            at: "playbooks/disk.yaml:14".into(),
            cause: None,
        };
        assert_eq!(
            own.to_string(),
            "script threw: disk still full (playbooks/disk.yaml:14)"
        );
        assert_eq!(
            (own.metric_label(), own.is_retryable()),
            ("script_threw", true)
        );
        let through = StepError::Threw {
            message: api(403).to_string(),
            at: String::new(),
            cause: Some(Box::new(api(403))),
        };
        assert_eq!(
            (through.metric_label(), through.is_retryable()),
            ("rejected", false)
        );
    }
}
