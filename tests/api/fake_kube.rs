//! A Kubernetes API for tests: kube-fake-client's in-memory `kube::Client`, served over HTTP on
//! 127.0.0.1 so that reactor connects to it exactly as to a real cluster (a kubeconfig with
//! `server: http://127.0.0.1:PORT`, the production `kube::Client`). Each request is forwarded with
//! `client.send(...)`. The fake's measured gaps are filled here, in the server, not in reactor:
//! `+` in query strings is rewritten to `%20` (it decodes `+` wrongly), and server-side dry run
//! (`dryRun=All` in the query, or in a DELETE's options body), which the fake ignores, is answered here without forwarding the mutation: the
//! object is read and the would-be result returned, as the API server does. Tests can also make a
//! path fail with an HTTP status or hang.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::Router;
use http_body_util::BodyExt;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams, Patch, PatchParams};
use reactor::config::KubernetesSettings;
use reactor::executor::kubernetes::Kubernetes;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// What a faulty path does.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this HTTP status and a Kubernetes `Status` body.
    Status(u16),
    /// Never answer.
    Hang,
    /// Answer, then let another writer merge-patch the object: the reader's `resourceVersion`
    /// is stale from then on.
    ConcurrentWrite(Value),
}

#[derive(Clone)]
struct Shared {
    client: kube::Client,
    requests: Arc<Mutex<Vec<String>>>,
    faults: Arc<Mutex<Vec<(String, String, Fault)>>>,
    /// Paths the fake deleted (answered 200 to a DELETE that was not a dry run).
    deleted: Arc<Mutex<Vec<String>>>,
}

pub struct FakeApi {
    /// The fake's own client, for setting up and inspecting objects directly.
    pub client: kube::Client,
    shared: Shared,
    shutdown: CancellationToken,
    dir: tempfile::TempDir,
}

impl FakeApi {
    /// reactor against this cluster, with `dir`'s playbooks and scripts and Alertmanager at
    /// `am`, then `more`.
    pub async fn app(
        &self,
        dir: &crate::helpers::PlaybookDir,
        am: &crate::helpers::Capture,
        more: impl FnOnce(&mut reactor::config::Settings),
    ) -> crate::helpers::TestApp {
        let (kube, books, scripts, am_url) =
            (self.settings(), dir.playbooks(), dir.scripts(), am.url());
        crate::helpers::TestApp::spawn(move |s| {
            s.kubernetes = kube;
            s.alertmanager.url = Some(am_url);
            s.playbooks_dir = books;
            s.scripts_dir = scripts;
            more(s);
        })
        .await
    }

    /// Serves a fake cluster holding `objects` (full manifests with apiVersion and kind).
    pub async fn start(objects: Vec<Value>) -> FakeApi {
        reactor::app::install_crypto_provider();
        let client = kube_fake_client::ClientBuilder::new()
            .with_runtime_objects(objects)
            .build()
            .await
            .expect("fake client builds");
        let shared = Shared {
            client: client.clone(),
            requests: Arc::default(),
            faults: Arc::default(),
            deleted: Arc::default(),
        };
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let (addr, shutdown) = super::helpers::serve_local(app).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("kubeconfig"),
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: fake\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\nusers:\n- name: fake\n  user:\n    token: fake-token\n"
            ),
        )
        .unwrap();
        FakeApi {
            client,
            shared,
            shutdown,
            dir,
        }
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Settings that connect to this server, as a deployment's config file would.
    pub fn settings(&self) -> KubernetesSettings {
        KubernetesSettings {
            kubeconfig: vec![self.kubeconfig()],
            request_timeout: Duration::from_secs(2),
            ..KubernetesSettings::default()
        }
    }

    /// reactor's client for this server, built by the production code path.
    pub async fn connect(&self, settings: KubernetesSettings) -> Kubernetes {
        Kubernetes::connect(&settings)
            .await
            .expect("kubeconfig loads")
            .expect("kubernetes is configured")
    }

    /// Requests whose method is `method` and whose path contains `path` get `fault`.
    pub fn fail(&self, method: &str, path: &str, fault: Fault) {
        self.shared
            .faults
            .lock()
            .unwrap()
            .push((method.to_owned(), path.to_owned(), fault));
    }

    /// No more injected faults.
    pub fn heal(&self) {
        self.shared.faults.lock().unwrap().clear();
    }

    /// The paths the fake itself deleted, in order: its record of deletions.
    pub fn deletions(&self) -> Vec<String> {
        self.shared.deleted.lock().unwrap().clone()
    }

    /// Every request so far, as `METHOD /path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Mutating requests so far (anything but GET).
    pub fn mutations(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| !r.starts_with("GET "))
            .collect()
    }

    pub async fn get(
        &self,
        api_resource: &kube::api::ApiResource,
        ns: &str,
        name: &str,
    ) -> Option<Value> {
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(self.client.clone(), ns, api_resource);
        match api.get(name).await {
            Ok(o) => Some(serde_json::to_value(o).unwrap()),
            Err(kube::Error::Api(s)) if s.code == 404 => None,
            Err(e) => panic!("fake get {ns}/{name}: {e}"),
        }
    }

    /// Plays the Job controller: waits for a Job to appear in `ns` and sets its status.
    pub async fn complete_next_job(&self, ns: &str, status: Value) -> String {
        let api: Api<Job> = Api::namespaced(self.client.clone(), ns);
        let name = super::helpers::wait_for(Duration::from_secs(20), || {
            let api = api.clone();
            async move {
                let list = api.list(&ListParams::default()).await.ok()?;
                list.items.first().and_then(|j| j.metadata.name.clone())
            }
        })
        .await
        .expect("a Job was created");
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .expect("job status set");
        name
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The manifest helpers tests build clusters from.
pub fn pod(ns: &str, name: &str, owner: Option<(&str, &str)>) -> Value {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    });
    if let Some((kind, owner)) = owner {
        p["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": kind, "name": owner,
            "uid": format!("uid-{owner}"), "controller": true,
        }]);
    }
    p
}

pub fn deployment(ns: &str, name: &str, replicas: u32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "app:1"}]},
            },
        },
    })
}

pub fn hpa(ns: &str, name: &str, target: &str, min: u32, max: u32) -> Value {
    json!({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicas": min, "maxReplicas": max,
        },
    })
}

fn status(code: u16, message: &str) -> Response {
    let reason = match code {
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        _ => "InternalError",
    };
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": message, "reason": reason, "code": code,
            })
            .to_string(),
        ))
        .unwrap()
}

fn json_response(code: u16, v: &Value) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap()
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

async fn handle(State(s): State<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let method = parts.method.as_str().to_owned();
    let path = parts.uri.path().to_owned();
    // The fake decodes `+` in query strings as a literal plus; the API server reads a space.
    let query = parts.uri.query().map(|q| q.replace('+', "%20"));
    let target = match &query {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    // DELETE carries its dry run in the DeleteOptions body, everything else in the query.
    let body_dry_run = serde_json::from_slice::<Value>(&bytes).is_ok_and(|b| {
        b["dryRun"]
            .as_array()
            .is_some_and(|d| d.contains(&json!("All")))
    });
    let dry_run = body_dry_run
        || query
            .as_deref()
            .is_some_and(|q| q.split('&').any(|kv| kv == "dryRun=All"));
    let marker = if body_dry_run {
        " (body: dryRun=All)"
    } else {
        ""
    };
    s.requests
        .lock()
        .unwrap()
        .push(format!("{method} {target}{marker}"));

    let fault = s
        .faults
        .lock()
        .unwrap()
        .iter()
        .find(|(m, p, _)| *m == method && path.contains(p.as_str()))
        .map(|(_, _, f)| f.clone());
    match fault {
        Some(Fault::Status(code)) => return status(code, &format!("injected failure on {path}")),
        Some(Fault::Hang) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Some(Fault::ConcurrentWrite(_)) | None => {}
    }

    let forward = |method: &str, uri: &str, content_type: Option<&str>, body: Vec<u8>| {
        let mut b = axum::http::Request::builder().method(method).uri(uri);
        if let Some(ct) = content_type {
            b = b.header("content-type", ct);
        }
        let req = b.body(kube::client::Body::from(body)).unwrap();
        let client = s.client.clone();
        async move {
            let res = client.send(req).await.expect("fake client answers");
            let (parts, body) = res.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            (parts.status.as_u16(), bytes)
        }
    };

    if dry_run && method != "GET" {
        // Server-side dry run: validate against the stored object, return the result, store nothing.
        let request: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if method == "POST" {
            let mut created = request;
            created["metadata"]["uid"] = "dry-run".into();
            return json_response(201, &created);
        }
        let (code, current) = forward("GET", &path, None, Vec::new()).await;
        if code != 200 {
            return Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(current))
                .unwrap();
        }
        let mut object: Value = serde_json::from_slice(&current).unwrap();
        if method == "PATCH" {
            let wanted_rv = &request["metadata"]["resourceVersion"];
            if wanted_rv.is_string() && *wanted_rv != object["metadata"]["resourceVersion"] {
                return status(409, "the object has been modified (dry run)");
            }
            merge(&mut object, &request);
        }
        return json_response(200, &object);
    }

    let content_type = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (code, body) = forward(&method, &target, content_type.as_deref(), bytes.to_vec()).await;
    if method == "DELETE" && code == 200 {
        s.deleted.lock().unwrap().push(path.clone());
    }
    if let Some(Fault::ConcurrentWrite(patch)) = fault {
        let (c, _) = forward(
            "PATCH",
            &path,
            Some("application/merge-patch+json"),
            patch.to_string().into_bytes(),
        )
        .await;
        assert_eq!(c, 200, "the concurrent write lands");
    }
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}
