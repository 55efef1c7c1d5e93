//! The API calls behind each action. Every call is bounded by `kubernetes.request_timeout`;
//! every mutation honours dry run (`dryRun=All`, so the API server validates it and changes
//! nothing) and appends a [`Change`] whether it worked or not. Patches are JSON merge patches;
//! writes that must not overwrite a concurrent change carry the `resourceVersion` they read.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
    Preconditions,
};
use serde_json::{json, Value};

use super::{cleanup_job, Change, KubeError, Kubernetes, Namespace, ObjectName};
pub use crate::playbook::kubernetes::{ScaleBy, Workload};

/// The field manager reactor's writes are recorded under.
const FIELD_MANAGER: &str = "reactor";

/// One action's view of the cluster: the client and policy, the dry-run flag, and where its
/// mutations are recorded.
pub struct Ctx<'a> {
    pub kube: &'a Kubernetes,
    pub dry_run: bool,
    /// The step's deadline: no call outlives it, so a call cut short is still recorded.
    pub deadline: Instant,
    pub changes: &'a mut Vec<Change>,
}

impl Workload {
    fn api_resource(self) -> ApiResource {
        use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
        match self {
            Workload::Deployment => ApiResource::erase::<Deployment>(&()),
            Workload::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
            Workload::DaemonSet => ApiResource::erase::<DaemonSet>(&()),
        }
    }

    fn object(self, name: &str) -> String {
        format!("{}s.apps/{name}", self.singular())
    }
}

impl Kubernetes {
    /// One API call, bounded by `request_timeout` and `deadline`, its error named after the verb
    /// and object.
    async fn call<T>(
        &self,
        verb: &'static str,
        object: &str,
        deadline: Instant,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, KubeError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let after = self
            .settings
            .request_timeout
            .min(Duration::from_millis(left.as_millis() as u64));
        match tokio::time::timeout(after, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(kube::Error::Api(status))) => Err(KubeError::Api {
                verb,
                object: object.to_owned(),
                code: status.code,
                message: if status.code == 409 && verb == "patch" {
                    format!(
                        "conflict: it changed since reactor read it, not overwriting ({})",
                        status.message
                    )
                } else {
                    status.message.clone()
                },
            }),
            Ok(Err(e)) => Err(KubeError::Client {
                verb,
                object: object.to_owned(),
                message: e.to_string(),
            }),
            Err(_) => Err(KubeError::Timeout {
                verb,
                object: object.to_owned(),
                after,
            }),
        }
    }

    /// Reads one object as JSON, for scripts that inspect before they act. Reads are not subject
    /// to the namespace policy (RBAC bounds them) and change nothing, so nothing is recorded.
    pub async fn get(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
        deadline: Instant,
    ) -> Result<Value, KubeError> {
        use k8s_openapi::api::core::v1::Node;
        let (ar, namespaced) = match kind.to_ascii_lowercase().trim_end_matches('s') {
            "pod" => (ApiResource::erase::<Pod>(&()), true),
            "node" => (ApiResource::erase::<Node>(&()), false),
            "job" => (ApiResource::erase::<Job>(&()), true),
            "horizontalpodautoscaler" | "hpa" => {
                (ApiResource::erase::<HorizontalPodAutoscaler>(&()), true)
            }
            _ => {
                let w = Workload::parse(kind, &["deployment", "statefulset", "daemonset"])
                    .map_err(|_| {
                        KubeError::Params(format!(
                            "k8s::get: kind {kind:?}: expected pod, node, job, hpa, deployment, \
                             statefulset or daemonset"
                        ))
                    })?;
                (w.api_resource(), true)
            }
        };
        let name = ObjectName::parse("name", name)?;
        let api: Api<DynamicObject> = if namespaced {
            let ns = Namespace::parse("namespace", ns)?;
            Api::namespaced_with(self.client.clone(), ns.as_str(), &ar)
        } else {
            Api::all_with(self.client.clone(), &ar)
        };
        let object = format!("{}/{name}", ar.plural);
        let obj = self
            .call("get", &object, deadline, api.get(name.as_str()))
            .await?;
        serde_json::to_value(obj).map_err(|e| KubeError::Client {
            verb: "get",
            object,
            message: e.to_string(),
        })
    }
}

impl Ctx<'_> {
    fn client(&self) -> kube::Client {
        self.kube.client.clone()
    }

    async fn call<T>(
        &self,
        verb: &'static str,
        object: &str,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, KubeError> {
        self.kube.call(verb, object, self.deadline, fut).await
    }

    /// A JSON merge patch of `object` through `api` (dry run when asked), recorded as a change
    /// with `detail`.
    async fn patch<K>(
        &mut self,
        api: &Api<K>,
        name: &ObjectName,
        object: &str,
        patch: &Value,
        detail: Value,
    ) -> Result<K, KubeError>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let params = PatchParams {
            dry_run: self.dry_run,
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let res = self
            .call(
                "patch",
                object,
                api.patch(name.as_str(), &params, &Patch::Merge(patch)),
            )
            .await;
        self.record(
            "patch",
            object,
            api.namespace().unwrap_or_default(),
            &res,
            detail,
        );
        res
    }

    fn record<T>(
        &mut self,
        verb: &str,
        object: &str,
        namespace: &str,
        result: &Result<T, KubeError>,
        detail: Value,
    ) {
        let result = match result {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.to_string(),
        };
        tracing::info!(verb, object, namespace, dry_run = self.dry_run, %result, "kubernetes change");
        self.changes.push(Change {
            verb: verb.to_owned(),
            object: object.to_owned(),
            namespace: namespace.to_owned(),
            dry_run: self.dry_run,
            result,
            detail,
        });
    }

    /// Deletes a pod so that its controller recreates it. A pod without a controller owner is
    /// refused unless `allow_standalone`: nothing would bring it back.
    pub async fn restart_pod(
        &mut self,
        ns: &Namespace,
        name: &ObjectName,
        allow_standalone: bool,
    ) -> Result<Value, KubeError> {
        self.kube.check_namespace(ns)?;
        let api: Api<Pod> = Api::namespaced(self.client(), ns.as_str());
        let object = format!("pods/{name}");
        let pod = self.call("get", &object, api.get(name.as_str())).await?;
        let owner = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
            .map(|o| format!("{}/{}", o.kind, o.name));
        if owner.is_none() && !allow_standalone {
            return Err(KubeError::Refused(format!(
                "pod {ns}/{name} has no controller owner, so nothing would recreate it \
                 (set allow_standalone: true to delete it anyway)"
            )));
        }
        let params = DeleteParams {
            dry_run: self.dry_run,
            // The same name may already belong to a new pod (StatefulSets): delete only this one.
            preconditions: pod.metadata.uid.clone().map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let res = self
            .call("delete", &object, api.delete(name.as_str(), &params))
            .await;
        self.record(
            "delete",
            &object,
            ns.as_str(),
            &res,
            json!({ "owner": owner }),
        );
        res?;
        Ok(json!({
            "namespace": ns.as_str(),
            "pod": name.as_str(),
            "owner": owner,
            "deleted": !self.dry_run,
            "dry_run": self.dry_run,
        }))
    }

    /// What `kubectl rollout restart` does: stamp the pod template with a restart time.
    pub async fn rollout_restart(
        &mut self,
        ns: &Namespace,
        kind: &str,
        name: &ObjectName,
    ) -> Result<Value, KubeError> {
        let w = Workload::parse(kind, &["deployment", "statefulset", "daemonset"])
            .map_err(KubeError::Params)?;
        self.kube.check_namespace(ns)?;
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client(), ns.as_str(), &w.api_resource());
        let object = w.object(name.as_str());
        let at = jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {
            "kubectl.kubernetes.io/restartedAt": at
        }}}}});
        self.patch(&api, name, &object, &patch, json!({ "restartedAt": at }))
            .await?;
        Ok(json!({
            "namespace": ns.as_str(),
            "object": object,
            "restartedAt": at,
            "dry_run": self.dry_run,
        }))
    }

    /// Raises replicas by `by`, never above `max_replicas` and never down. When an HPA targets
    /// the workload, its `minReplicas` is raised instead (within its `maxReplicas`), so the two
    /// do not fight. Writes carry the `resourceVersion` read, so a concurrent change conflicts.
    pub async fn scale_up(
        &mut self,
        ns: &Namespace,
        kind: &str,
        name: &ObjectName,
        by: ScaleBy,
        max_replicas: u32,
    ) -> Result<Value, KubeError> {
        let w = Workload::parse(kind, &["deployment", "statefulset"]).map_err(KubeError::Params)?;
        self.kube.check_namespace(ns)?;
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client(), ns.as_str(), &w.api_resource());
        let object = w.object(name.as_str());
        let current = self.call("get", &object, api.get(name.as_str())).await?;
        let before = current.data["spec"]["replicas"].as_u64().unwrap_or(1) as u32;
        if before >= max_replicas {
            return Err(KubeError::Refused(format!(
                "{object} already has {before} replicas, at or above max_replicas {max_replicas}"
            )));
        }
        let want = by.apply(before).min(max_replicas);

        let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(self.client(), ns.as_str());
        let list = self
            .call(
                "list",
                "horizontalpodautoscalers.autoscaling",
                hpas.list(&ListParams::default()),
            )
            .await?;
        let hpa = list.items.into_iter().find(|h| {
            h.spec.as_ref().is_some_and(|s| {
                s.scale_target_ref.kind == w.kind() && s.scale_target_ref.name == name.as_str()
            })
        });
        if let Some(hpa) = hpa {
            return self.raise_hpa_min(ns, &object, before, want, hpa).await;
        }

        let patch = json!({
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "spec": {"replicas": want},
        });
        let detail = json!({"replicas": {"before": before, "after": want}});
        self.patch(&api, name, &object, &patch, detail).await?;
        Ok(json!({
            "namespace": ns.as_str(),
            "object": object,
            "replicas_before": before,
            "replicas_after": want,
            "max_replicas": max_replicas,
            "dry_run": self.dry_run,
        }))
    }

    async fn raise_hpa_min(
        &mut self,
        ns: &Namespace,
        target: &str,
        replicas: u32,
        want: u32,
        hpa: HorizontalPodAutoscaler,
    ) -> Result<Value, KubeError> {
        // The API server's own answer, but it goes into a path all the same.
        let hpa_name = ObjectName::parse("hpa", hpa.metadata.name.as_deref().unwrap_or_default())?;
        let object = format!("horizontalpodautoscalers.autoscaling/{hpa_name}");
        let spec = hpa.spec.unwrap_or_default();
        let hpa_max = spec.max_replicas.max(0) as u32;
        let min_before = spec.min_replicas.unwrap_or(1).max(0) as u32;
        let min_after = want.min(hpa_max);
        if min_after <= min_before {
            return Err(KubeError::Refused(format!(
                "{target} is scaled by {object}, whose minReplicas is already {min_before} \
                 (maxReplicas {hpa_max}); raising it to {want} is not within bounds"
            )));
        }
        let api: Api<HorizontalPodAutoscaler> = Api::namespaced(self.client(), ns.as_str());
        let patch = json!({
            "metadata": {"resourceVersion": hpa.metadata.resource_version},
            "spec": {"minReplicas": min_after},
        });
        let detail = json!({
            "target": target,
            "replicas": replicas,
            "minReplicas": {"before": min_before, "after": min_after},
        });
        self.patch(&api, &hpa_name, &object, &patch, detail).await?;
        Ok(json!({
            "namespace": ns.as_str(),
            "object": target,
            "hpa": hpa_name.as_str(),
            "replicas_before": replicas,
            "min_replicas_before": min_before,
            "min_replicas_after": min_after,
            "dry_run": self.dry_run,
        }))
    }

    /// Runs a Job pinned to `node` that deletes files matching `glob`, older than `older_than`,
    /// under an allowed host path; waits for it (bounded), records its result and deletes it.
    pub async fn disk_cleanup(
        &mut self,
        node: &ObjectName,
        path: &str,
        glob: &str,
        older_than: &str,
    ) -> Result<Value, KubeError> {
        let settings = self.kube.settings.disk_cleanup.clone();
        let namespace = Namespace::parse("kubernetes.disk_cleanup.namespace", &settings.namespace)?;
        self.kube.check_namespace(&namespace)?;
        let ns = namespace.as_str();
        let node = node.as_str();
        let spec = cleanup_job::Spec::new(node, path, glob, older_than, &settings)
            .map_err(KubeError::Params)?;
        // The Job may run until the step's deadline, less one request to delete it.
        let left = self
            .deadline
            .saturating_duration_since(Instant::now())
            .saturating_sub(self.kube.settings.request_timeout);
        let active = left.min(settings.job_deadline).max(Duration::from_secs(1));
        let job = spec.job(active);
        let name = job.metadata.name.clone().unwrap_or_default();
        let object = format!("jobs.batch/{name}");
        let api: Api<Job> = Api::namespaced(self.client(), ns);
        let post = PostParams {
            dry_run: self.dry_run,
            field_manager: Some(FIELD_MANAGER.into()),
        };
        let res = self.call("create", &object, api.create(&post, &job)).await;
        let detail = json!({
            "node": node,
            "path": spec.path,
            "glob": glob,
            "olderThan": older_than,
            "command": spec.command(),
        });
        self.record("create", &object, ns, &res, detail);
        res?;
        let summary = json!({
            "job": name,
            "namespace": ns,
            "node": node,
            "path": spec.path,
            "command": spec.command(),
            "dry_run": self.dry_run,
        });
        if self.dry_run {
            return Ok(summary);
        }

        let until = crate::clock::deadline(active);
        let finished = loop {
            let job = match self.call("get", &object, api.get(&name)).await {
                Ok(j) => j,
                Err(e) => break Err(e),
            };
            match cleanup_job::finished(&job) {
                Some(result) => break Ok(result),
                None if Instant::now() >= until => {
                    break Err(KubeError::Timeout {
                        verb: "wait for",
                        object: object.clone(),
                        after: active,
                    })
                }
                None => tokio::time::sleep(settings.poll_interval).await,
            }
        };
        // Whatever happened, the Job goes (its pods with it); its TTL is the backstop.
        let del = self
            .call(
                "delete",
                &object,
                api.delete(&name, &DeleteParams::background()),
            )
            .await;
        self.record("delete", &object, ns, &del, Value::Null);
        match finished? {
            Ok(()) => {
                let mut out = summary;
                out["succeeded"] = true.into();
                Ok(out)
            }
            Err(reason) => Err(KubeError::Refused(format!(
                "cleanup job {name} on node {node} failed: {reason}"
            ))),
        }
    }
}
