//! The manifests an operator applies (`kubectl apply -k deploy/kubernetes`), checked without a
//! cluster: every file the kustomization names parses into its Kubernetes type with no field the
//! type does not know (parsed, written back, compared), the config loads as reactor reads it, the
//! ConfigMaps carry the current playbooks and scripts, the PrometheusRule the shipped rules, and
//! the pods meet PodSecurity `restricted`.

use std::collections::BTreeSet;

use k8s_openapi::api::{apps, core, policy, rbac};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::helpers::repo;

fn dir() -> std::path::PathBuf {
    repo().join("deploy/kubernetes")
}

fn yaml_docs(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// `doc` as type `T`, refusing any field `T` drops: written back, it must be `doc` again.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{} {}: {e}", doc["kind"], doc["metadata"]["name"]));
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(
        &back, doc,
        "{} {}: a field its type does not have (or a wrong value)",
        doc["kind"], doc["metadata"]["name"]
    );
    t
}

/// The Prometheus Operator's kinds have no k8s-openapi type: the fields used, and no other.
#[derive(serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorSpec {
    job_label: String,
    selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    endpoints: Vec<Endpoint>,
}

#[derive(serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Endpoint {
    port: String,
    path: String,
    interval: String,
    bearer_token_secret: core::v1::SecretKeySelector,
}

fn manifests() -> Vec<Value> {
    let k = &yaml_docs(&dir().join("kustomization.yaml"))[0];
    assert_eq!(k["kind"], "Kustomization");
    let mut docs = Vec::new();
    for r in k["resources"].as_array().unwrap() {
        docs.extend(yaml_docs(&dir().join(r.as_str().unwrap())));
    }
    docs
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type_with_no_unknown_field() {
    let docs = manifests();
    let mut kinds = BTreeSet::new();
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap();
        kinds.insert(kind.to_owned());
        match kind {
            "Namespace" => drop(typed::<core::v1::Namespace>(doc)),
            "ServiceAccount" => drop(typed::<core::v1::ServiceAccount>(doc)),
            "ConfigMap" => drop(typed::<core::v1::ConfigMap>(doc)),
            "Service" => drop(typed::<core::v1::Service>(doc)),
            "StatefulSet" => drop(typed::<apps::v1::StatefulSet>(doc)),
            "PodDisruptionBudget" => drop(typed::<policy::v1::PodDisruptionBudget>(doc)),
            "ClusterRole" => drop(typed::<rbac::v1::ClusterRole>(doc)),
            "ClusterRoleBinding" => drop(typed::<rbac::v1::ClusterRoleBinding>(doc)),
            "Role" => drop(typed::<rbac::v1::Role>(doc)),
            "RoleBinding" => drop(typed::<rbac::v1::RoleBinding>(doc)),
            "ServiceMonitor" => {
                let spec: ServiceMonitorSpec = serde_json::from_value(doc["spec"].clone())
                    .unwrap_or_else(|e| panic!("ServiceMonitor: {e}"));
                assert_eq!(spec.endpoints[0].bearer_token_secret.name, "reactor-token");
            }
            "PrometheusRule" => {
                let shipped = &yaml_docs(&repo().join("deploy/prometheus/reactor-rules.yml"))[0];
                assert_eq!(
                    doc["spec"]["groups"], shipped["groups"],
                    "the PrometheusRule holds the shipped rules"
                );
            }
            other => panic!("a manifest of kind {other} the test does not know"),
        }
    }
    for needed in [
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "Role",
        "ServiceMonitor",
        "PrometheusRule",
    ] {
        assert!(kinds.contains(needed), "no {needed} in {kinds:?}");
    }
}

#[test]
fn the_statefulset_runs_two_restricted_replicas_with_the_shipped_config_playbooks_and_scripts() {
    let docs = manifests();
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let set: apps::v1::StatefulSet = typed(find("StatefulSet", "reactor"));
    let spec = set.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("reactor"));
    let psc = pod.security_context.unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let c = &pod.containers[0];
    let csc = c.security_context.clone().unwrap();
    assert_eq!(csc.allow_privilege_escalation, Some(false));
    assert_eq!(csc.capabilities.unwrap().drop, Some(vec!["ALL".to_owned()]));
    let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    for var in ["REACTOR_AUTH_TOKEN", "POD_NAME", "POD_NAMESPACE"] {
        assert!(env.contains(&var), "{var} in {env:?}");
    }
    assert!(
        c.args.iter().flatten().any(|a| a == "--watch"),
        "reloads mounted playbooks"
    );
    assert_eq!(
        find("Namespace", "reactor")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    for volume in pod.volumes.iter().flatten() {
        let cm = volume.config_map.as_ref().unwrap().name.clone();
        find("ConfigMap", &cm);
    }

    // The config loads as reactor reads it: two replicas, in the cluster.
    let d = tempfile::tempdir().unwrap();
    let config = d.path().join("reactor.yaml");
    std::fs::write(
        &config,
        find("ConfigMap", "reactor-config")["data"]["reactor.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let s = reactor::config::Settings::load(Some(&config), &Default::default()).expect("loads");
    assert!(s.ha.enabled && s.kubernetes.in_cluster);
    s.validate().expect("valid");
    assert_eq!(s.kubernetes.disk_cleanup.namespace, "reactor-cleanup");

    // The ConfigMaps carry the playbooks and scripts as they are in the repository.
    for (name, folder, ext) in [
        ("reactor-playbooks", "playbooks", "yaml"),
        ("reactor-scripts", "scripts", "rhai"),
    ] {
        let data = find("ConfigMap", name)["data"].as_object().unwrap().clone();
        let mut files = BTreeSet::new();
        for entry in std::fs::read_dir(repo().join(folder)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == ext) {
                let file = path.file_name().unwrap().to_str().unwrap().to_owned();
                assert_eq!(
                    data.get(&file).and_then(Value::as_str),
                    Some(std::fs::read_to_string(&path).unwrap().as_str()),
                    "{folder}/{file} differs from deploy/kubernetes/playbooks.yaml: run scripts/render-configmaps.sh"
                );
                files.insert(file);
            }
        }
        let shipped: BTreeSet<String> = data.keys().cloned().collect();
        assert_eq!(shipped, files, "{name}: run scripts/render-configmaps.sh");
    }
}
