//! The grammar of `kubernetes:` steps: the action names, their parameters, and the checks that
//! need no cluster (kinds, bounds, durations, globs). A playbook's steps are checked with it at
//! load time, with their templates unrendered, and again when a run renders them; the executor
//! then acts on the [`Request`] (names and namespaces are checked there, against the values the
//! alert brought).

use std::time::Duration;

use serde::Deserialize;

/// A kubernetes step's request, from its rendered `params` plus the `kubernetes:` action name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    RestartPod {
        namespace: String,
        pod: String,
        #[serde(default)]
        allow_standalone: bool,
    },
    RolloutRestart {
        namespace: String,
        kind: String,
        name: String,
    },
    ScaleUp {
        namespace: String,
        kind: String,
        name: String,
        #[serde(default)]
        by: Option<u32>,
        #[serde(default)]
        factor: Option<f64>,
        max_replicas: u32,
    },
    DiskCleanup {
        node: String,
        path: String,
        glob: String,
        older_than: String,
    },
}

/// The action names a `kubernetes:` step accepts.
pub const ACTIONS: &[&str] = &["restart_pod", "rollout_restart", "scale_up", "disk_cleanup"];

impl Request {
    /// Builds the request from an action name and parameters, checking everything that does not
    /// depend on the alert (kinds, bounds, durations). Used at load time with unrendered
    /// templates and again at run time with the rendered values.
    pub fn parse(
        action: &str,
        params: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Request, String> {
        let mut obj = params;
        obj.insert("action".into(), action.into());
        let req: Request = serde_json::from_value(serde_json::Value::Object(obj)).map_err(|e| {
            let e = e.to_string();
            if e.starts_with("unknown variant") {
                format!("unknown kubernetes action {action:?}: expected one of {ACTIONS:?}")
            } else {
                e
            }
        })?;
        req.validate()?;
        Ok(req)
    }

    fn validate(&self) -> Result<(), String> {
        match self {
            Request::RolloutRestart { kind, .. } => {
                Workload::parse(kind, &["deployment", "statefulset", "daemonset"])?;
            }
            Request::ScaleUp {
                kind,
                by,
                factor,
                max_replicas,
                ..
            } => {
                Workload::parse(kind, &["deployment", "statefulset"])?;
                ScaleBy::new(*by, *factor)?;
                crate::bounds::MAX_REPLICAS.check("max_replicas", (*max_replicas).into())?;
            }
            Request::DiskCleanup {
                older_than, glob, ..
            } => {
                parse_age(older_than)?;
                check_glob(glob)?;
            }
            Request::RestartPod { .. } => {}
        }
        Ok(())
    }
}

/// The workload kinds actions address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl Workload {
    /// Parses a kind case-insensitively (`Deployment`, `deployment`, `deployments`), accepting
    /// only the `allowed` ones.
    pub fn parse(kind: &str, allowed: &[&str]) -> Result<Workload, String> {
        let k = kind.to_ascii_lowercase();
        let k = k.strip_suffix('s').unwrap_or(&k);
        let w = match k {
            "deployment" => Workload::Deployment,
            "statefulset" => Workload::StatefulSet,
            "daemonset" => Workload::DaemonSet,
            _ => return Err(format!("kind {kind:?}: expected one of {allowed:?}")),
        };
        if !allowed.contains(&w.singular()) {
            return Err(format!("kind {kind:?}: expected one of {allowed:?}"));
        }
        Ok(w)
    }

    pub fn singular(self) -> &'static str {
        match self {
            Workload::Deployment => "deployment",
            Workload::StatefulSet => "statefulset",
            Workload::DaemonSet => "daemonset",
        }
    }

    /// The `Kind` as the API spells it (an HPA's `scaleTargetRef.kind`).
    pub fn kind(self) -> &'static str {
        match self {
            Workload::Deployment => "Deployment",
            Workload::StatefulSet => "StatefulSet",
            Workload::DaemonSet => "DaemonSet",
        }
    }
}

/// How far `scale_up` raises replicas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScaleBy {
    Add(u32),
    Factor(f64),
}

impl ScaleBy {
    pub fn new(by: Option<u32>, factor: Option<f64>) -> Result<ScaleBy, String> {
        use crate::bounds::{SCALE_BY, SCALE_FACTOR_MAX};
        match (by, factor) {
            (Some(n), None) => SCALE_BY.check("by", n.into()).map(|_| ScaleBy::Add(n)),
            (None, Some(f)) if f > 1.0 && f <= SCALE_FACTOR_MAX => Ok(ScaleBy::Factor(f)),
            (None, Some(f)) => Err(format!(
                "factor must be greater than 1 and at most {SCALE_FACTOR_MAX}, got {f}"
            )),
            _ => Err("scale_up needs exactly one of `by` or `factor`".into()),
        }
    }

    /// The wanted replica count before the bound; always more than `current`.
    pub fn apply(self, current: u32) -> u32 {
        match self {
            ScaleBy::Add(n) => current.saturating_add(n),
            ScaleBy::Factor(f) => {
                let scaled = (f64::from(current) * f).ceil().min(f64::from(u32::MAX)) as u32;
                scaled.max(current.saturating_add(1))
            }
        }
    }
}

/// `older_than` as a duration (`7d`, `12h`); at least a minute, since `find -mmin` counts minutes.
pub fn parse_age(s: &str) -> Result<Duration, String> {
    crate::bounds::parse_duration("older_than", s, crate::bounds::CLEANUP_AGE)
}

/// A file-name glob (`*.gz`), matched by `find -name`: no path separators, not empty.
pub fn check_glob(glob: &str) -> Result<(), String> {
    if glob.is_empty() || glob.contains('/') || glob.contains('\0') {
        return Err(format!(
            "glob: expected a file-name pattern such as \"*.gz\" (no '/'), got {glob:?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        match v {
            serde_json::Value::Object(m) => m,
            _ => panic!(),
        }
    }

    #[test]
    fn requests_are_checked_before_any_call() {
        let ok = Request::parse(
            "scale_up",
            params(
                serde_json::json!({"namespace": "{{ labels.namespace }}", "kind": "Deployment", "name": "web", "by": 2, "max_replicas": 10}),
            ),
        );
        assert!(ok.is_ok(), "{ok:?}");
        let e = Request::parse("reboot_node", params(serde_json::json!({}))).unwrap_err();
        assert!(
            e.contains("unknown kubernetes action \"reboot_node\""),
            "{e}"
        );
        let e = Request::parse(
            "scale_up",
            params(
                serde_json::json!({"namespace": "a", "kind": "deployment", "name": "w", "by": 1}),
            ),
        )
        .unwrap_err();
        assert!(e.contains("missing field `max_replicas`"), "{e}");
        let e = Request::parse(
            "scale_up",
            params(serde_json::json!({"namespace": "a", "kind": "daemonset", "name": "w", "by": 1, "max_replicas": 3})),
        )
        .unwrap_err();
        assert!(e.contains("daemonset"), "{e}");
        let e = Request::parse(
            "scale_up",
            params(serde_json::json!({"namespace": "a", "kind": "deployment", "name": "w", "by": 1, "factor": 2.0, "max_replicas": 3})),
        )
        .unwrap_err();
        assert!(e.contains("exactly one of `by` or `factor`"), "{e}");
        let e = Request::parse(
            "restart_pod",
            params(serde_json::json!({"namespace": "a", "pod": "p", "force": true})),
        )
        .unwrap_err();
        assert!(e.contains("unknown field `force`"), "{e}");
        let e = Request::parse(
            "disk_cleanup",
            params(serde_json::json!({"node": "n", "path": "/var/log", "glob": "*.gz", "older_than": "soon"})),
        )
        .unwrap_err();
        assert!(e.contains("older_than"), "{e}");
    }

    #[test]
    fn scale_by_always_raises() {
        assert_eq!(ScaleBy::Add(2).apply(3), 5);
        assert_eq!(ScaleBy::Factor(1.5).apply(3), 5);
        assert_eq!(ScaleBy::Factor(1.1).apply(1), 2, "at least one more");
        assert_eq!(ScaleBy::Factor(2.0).apply(0), 1);
        assert!(ScaleBy::new(Some(0), None).is_err());
        assert!(ScaleBy::new(None, Some(1.0)).is_err());
        assert!(ScaleBy::new(None, None).is_err());
    }

    #[test]
    fn kinds_parse_loosely_but_only_the_allowed_ones() {
        let all = ["deployment", "statefulset", "daemonset"];
        assert_eq!(
            Workload::parse("Deployment", &all),
            Ok(Workload::Deployment)
        );
        assert_eq!(
            Workload::parse("statefulsets", &all),
            Ok(Workload::StatefulSet)
        );
        assert!(Workload::parse("DaemonSet", &all[..2]).is_err());
        assert!(Workload::parse("ReplicaSet", &all).is_err());
    }
}
