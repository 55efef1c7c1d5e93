//! The on-call files: every `*.yaml` in the on-call directory (`oncall_dir`, default `oncall/`)
//! names teams and the services they own. They are checked like playbooks: a problem is reported
//! with its file, line and what was expected, and a service naming an unknown team is refused.
//!
//! ```yaml
//! teams:
//!   - name: devops
//! services:
//!   - name: athens
//!     team: devops
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::playbook::{LoadError, LoadErrors};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    teams: Vec<Spanned<RawTeam>>,
    #[serde(default)]
    services: Vec<Spanned<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTeam {
    name: String,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    team: Spanned<String>,
    #[serde(default)]
    description: String,
}

/// A service and the team that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub team: String,
    pub description: String,
}

/// The teams and services in force.
#[derive(Debug, Clone, Default)]
pub struct OnCall {
    pub teams: BTreeMap<String, String>,
    pub services: BTreeMap<String, Service>,
}

impl OnCall {
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.get(name)
    }
}

/// A name teams and services may take: letters, digits, `-`, `_`, `.`; 1 to 128 characters.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Loads every `*.yaml`/`*.yml` file of `dir`. A directory that does not exist holds nothing.
pub fn load_dir(dir: &Path) -> Result<OnCall, LoadErrors> {
    let mut errors = Vec::new();
    let err = |file: &PathBuf, line: Option<u64>, message: String| LoadError {
        file: file.clone(),
        line,
        message,
    };
    let files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(OnCall::default()),
        Err(e) => {
            return Err(LoadErrors(vec![err(
                &dir.to_owned(),
                None,
                format!("cannot read the on-call directory: {e}"),
            )]))
        }
        Ok(entries) => {
            let mut f: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            f.sort();
            f
        }
    };
    let mut raw_files = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                errors.push(err(&file, None, format!("cannot read: {e}")));
                continue;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        match serde_saphyr::from_str::<RawFile>(&text) {
            Ok(raw) => raw_files.push((file, raw)),
            Err(e) => {
                let line = e.location().map(|l| l.line());
                let message = e.to_string().lines().next().unwrap_or_default().to_owned();
                errors.push(err(&file, line, format!("YAML: {message}")));
            }
        }
    }
    let mut oncall = OnCall::default();
    let mut team_at: BTreeMap<String, (PathBuf, u64)> = BTreeMap::new();
    for (file, raw) in &raw_files {
        for t in &raw.teams {
            let line = t.referenced.line();
            let name = &t.value.name;
            if !valid_name(name) {
                errors.push(err(
                    file,
                    Some(line),
                    format!(
                        "team name {name:?}: expected 1 to 128 letters, digits, '-', '_' or '.'"
                    ),
                ));
            } else if let Some((f, l)) = team_at.get(name) {
                errors.push(err(
                    file,
                    Some(line),
                    format!(
                        "duplicate team {name:?}, first defined at {}:{l}",
                        f.display()
                    ),
                ));
            } else {
                team_at.insert(name.clone(), (file.clone(), line));
                oncall
                    .teams
                    .insert(name.clone(), t.value.description.clone());
            }
        }
    }
    let mut service_at: BTreeMap<String, (PathBuf, u64)> = BTreeMap::new();
    for (file, raw) in &raw_files {
        for s in &raw.services {
            let line = s.referenced.line();
            let name = &s.value.name;
            let team = &s.value.team;
            if !valid_name(name) {
                errors.push(err(
                    file,
                    Some(line),
                    format!(
                        "service name {name:?}: expected 1 to 128 letters, digits, '-', '_' or '.'"
                    ),
                ));
            } else if let Some((f, l)) = service_at.get(name) {
                errors.push(err(
                    file,
                    Some(line),
                    format!(
                        "duplicate service {name:?}, first defined at {}:{l}",
                        f.display()
                    ),
                ));
            } else if !oncall.teams.contains_key(&team.value) {
                let known: Vec<&str> = oncall.teams.keys().map(String::as_str).collect();
                errors.push(err(
                    file,
                    Some(team.referenced.line()),
                    format!(
                        "service {name:?}: unknown team {:?} (teams: {})",
                        team.value,
                        known.join(", ")
                    ),
                ));
            } else {
                service_at.insert(name.clone(), (file.clone(), line));
                oncall.services.insert(
                    name.clone(),
                    Service {
                        name: name.clone(),
                        team: team.value.clone(),
                        description: s.value.description.clone(),
                    },
                );
            }
        }
    }
    if errors.is_empty() {
        Ok(oncall)
    } else {
        errors.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        Err(LoadErrors(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_name_their_team_and_an_unknown_team_is_refused_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("devops.yaml"),
            "teams:\n  - name: devops\nservices:\n  - name: athens\n    team: devops\n  - name: sparta\n    team: devopz\n",
        )
        .unwrap();
        let errors = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            errors.contains("devops.yaml:7:")
                && errors.contains("unknown team \"devopz\" (teams: devops)"),
            "{errors}"
        );
        std::fs::write(
            dir.path().join("devops.yaml"),
            "teams:\n  - name: devops\nservices:\n  - name: athens\n    team: devops\n",
        )
        .unwrap();
        let oncall = load_dir(dir.path()).unwrap();
        assert_eq!(oncall.service("athens").unwrap().team, "devops");
        assert!(load_dir(&dir.path().join("missing"))
            .unwrap()
            .services
            .is_empty());
    }
}
