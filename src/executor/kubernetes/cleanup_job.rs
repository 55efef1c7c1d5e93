//! The disk cleanup Job: a one-shot pod pinned to the alert's node that runs `find … -delete`
//! under one allowed hostPath. Building the Job and its command is pure (and unit-tested); the
//! API calls that create, wait for and delete it are in [`super::actions`].

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use serde_json::json;

use crate::config::CleanupJobSettings;

/// Where the host path is mounted inside the Job's container.
const HOST_MOUNT: &str = "/host";

/// A validated cleanup request.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub node: String,
    /// The host directory, normalised and under an allowed path.
    pub path: String,
    pub glob: String,
    pub older_than: Duration,
    image: String,
    ttl: Duration,
}

pub use crate::playbook::kubernetes::{check_glob, parse_age};

/// `path` made absolute and free of `.`/`..`, if it lies under one of `allowed`.
fn allowed_path(path: &str, allowed: &[PathBuf]) -> Result<String, String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!("path {path:?} must be absolute"));
    }
    let mut clean = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(part) => clean.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("path {path:?} must not contain '..'"))
            }
        }
    }
    if allowed.is_empty() {
        return Err(
            "disk_cleanup jobs are disabled: kubernetes.disk_cleanup.allowed_host_paths is empty"
                .into(),
        );
    }
    if !allowed.iter().any(|a| clean.starts_with(a)) {
        return Err(format!(
            "path {path:?} is not under an allowed host path {:?} (kubernetes.disk_cleanup.allowed_host_paths)",
            allowed
        ));
    }
    Ok(clean.display().to_string())
}

impl Spec {
    pub fn new(
        node: &str,
        path: &str,
        glob: &str,
        older_than: &str,
        settings: &CleanupJobSettings,
    ) -> Result<Spec, String> {
        if node.is_empty() {
            return Err("node: the alert gave no node name".into());
        }
        check_glob(glob)?;
        Ok(Spec {
            node: node.to_owned(),
            path: allowed_path(path, &settings.allowed_host_paths)?,
            glob: glob.to_owned(),
            older_than: parse_age(older_than)?,
            image: settings.image.clone(),
            ttl: settings.ttl_after_finished,
        })
    }

    /// The container's command: regular files only, on this filesystem only, never following
    /// symlinks, printing what it deletes so the pod log says what went.
    pub fn command(&self) -> Vec<String> {
        let minutes = self.older_than.as_secs().div_ceil(60);
        [
            "find",
            &format!("{HOST_MOUNT}{}", self.path),
            "-xdev",
            "-type",
            "f",
            "-name",
            &self.glob,
            "-mmin",
            &format!("+{minutes}"),
            "-print",
            "-delete",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// A DNS-1123 name unique enough for one node and moment.
    fn name(&self) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let mut h: u64 = 0xcbf29ce484222325;
        for b in self.node.bytes().chain(nanos.to_le_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
        }
        format!("reactor-disk-cleanup-{:012x}", h & 0xffff_ffff_ffff)
    }

    /// The Job: pinned with `nodeName` (no scheduler, so a node under disk pressure still gets
    /// it), tolerating every taint, never retried, bounded by `active` and cleaned up by TTL.
    pub fn job(&self, active: Duration) -> Job {
        let name = self.name();
        let labels = json!({
            "app.kubernetes.io/managed-by": "reactor",
            "app.kubernetes.io/component": "disk-cleanup",
        });
        serde_json::from_value(json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "backoffLimit": 0,
                "activeDeadlineSeconds": active.as_secs().max(1),
                "ttlSecondsAfterFinished": self.ttl.as_secs(),
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "nodeName": self.node,
                        "restartPolicy": "Never",
                        "automountServiceAccountToken": false,
                        "tolerations": [{"operator": "Exists"}],
                        "containers": [{
                            "name": "cleanup",
                            "image": self.image,
                            "command": self.command(),
                            "securityContext": {
                                "runAsUser": 0,
                                "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "capabilities": {"drop": ["ALL"], "add": ["DAC_OVERRIDE", "FOWNER"]},
                            },
                            "resources": {
                                "requests": {"cpu": "10m", "memory": "16Mi"},
                                "limits": {"memory": "64Mi"},
                            },
                            "volumeMounts": [{"name": "target", "mountPath": format!("{HOST_MOUNT}{}", self.path)}],
                        }],
                        "volumes": [{"name": "target", "hostPath": {"path": self.path, "type": "Directory"}}],
                    },
                },
            },
        }))
        .expect("a Job literal deserialises")
    }
}

/// `Some(Ok)` when the Job succeeded, `Some(Err(reason))` when it failed, `None` while it runs.
pub fn finished(job: &Job) -> Option<Result<(), String>> {
    let status = job.status.as_ref()?;
    for c in status.conditions.iter().flatten() {
        if c.status != "True" {
            continue;
        }
        match c.type_.as_str() {
            "Complete" | "SuccessCriteriaMet" => return Some(Ok(())),
            "Failed" => {
                let why = [c.reason.as_deref(), c.message.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(": ");
                return Some(Err(if why.is_empty() { "Failed".into() } else { why }));
            }
            _ => {}
        }
    }
    if status.succeeded.unwrap_or(0) > 0 {
        return Some(Ok(()));
    }
    if status.failed.unwrap_or(0) > 0 {
        return Some(Err("its pod failed".into()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CleanupJobSettings {
        CleanupJobSettings {
            allowed_host_paths: vec!["/var/log".into()],
            ..CleanupJobSettings::default()
        }
    }

    #[test]
    fn the_command_is_a_bounded_find() {
        let s = Spec::new("node-a", "/var/log/app/", "*.gz", "7d", &settings()).unwrap();
        assert_eq!(s.path, "/var/log/app");
        assert_eq!(
            s.command(),
            [
                "find",
                "/host/var/log/app",
                "-xdev",
                "-type",
                "f",
                "-name",
                "*.gz",
                "-mmin",
                "+10080",
                "-print",
                "-delete"
            ]
        );
        let ninety_s = Spec::new("n", "/var/log", "*", "90s", &settings()).unwrap();
        assert_eq!(ninety_s.command()[8], "+2", "minutes round up");
    }

    #[test]
    fn paths_outside_the_allow_list_are_refused() {
        let e = Spec::new("n", "/var/log/../lib", "*", "1d", &settings()).unwrap_err();
        assert!(e.contains("'..'"), "{e}");
        let e = Spec::new("n", "/etc", "*", "1d", &settings()).unwrap_err();
        assert!(e.contains("not under an allowed host path"), "{e}");
        let e = Spec::new("n", "/var/logs-other", "*", "1d", &settings()).unwrap_err();
        assert!(e.contains("not under an allowed host path"), "{e}");
        let e = Spec::new("n", "var/log", "*", "1d", &settings()).unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        let e = Spec::new("n", "/var/log", "*/x", "1d", &settings()).unwrap_err();
        assert!(e.contains("glob"), "{e}");
        let e = Spec::new("n", "/var/log", "*", "1d", &CleanupJobSettings::default()).unwrap_err();
        assert!(e.contains("disabled"), "{e}");
    }

    #[test]
    fn the_job_is_pinned_bounded_and_mounts_only_the_path() {
        let s = Spec::new("node-a", "/var/log/app", "*.gz", "7d", &settings()).unwrap();
        let job = serde_json::to_value(s.job(Duration::from_secs(120))).unwrap();
        let spec = &job["spec"];
        assert_eq!(spec["backoffLimit"], 0);
        assert_eq!(spec["activeDeadlineSeconds"], 120);
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["nodeName"], "node-a");
        assert_eq!(pod["restartPolicy"], "Never");
        assert_eq!(pod["volumes"][0]["hostPath"]["path"], "/var/log/app");
        assert_eq!(
            pod["containers"][0]["volumeMounts"][0]["mountPath"],
            "/host/var/log/app"
        );
        let name = job["metadata"]["name"].as_str().unwrap();
        assert!(name.len() <= 63 && name.starts_with("reactor-disk-cleanup-"));
    }

    #[test]
    fn job_status_is_read_like_the_job_controller_writes_it() {
        let job = |status: serde_json::Value| -> Job {
            serde_json::from_value(json!({"metadata": {"name": "j"}, "status": status})).unwrap()
        };
        assert_eq!(finished(&job(json!({"active": 1}))), None);
        assert_eq!(
            finished(&job(
                json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
            )),
            Some(Ok(()))
        );
        assert_eq!(
            finished(&job(
                json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"}]})
            )),
            Some(Err(
                "DeadlineExceeded: Job was active longer than specified deadline".into()
            ))
        );
    }
}
