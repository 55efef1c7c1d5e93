//! `disk_cleanup`: the one host-level helper Rhai scripts get. It deletes regular files matching a
//! glob and older than an age, only under roots the configuration allows, never following
//! symlinks, with a deadline of its own (Rhai's wall-clock limit cannot interrupt native code).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// At most this many files are deleted (or listed) by one call.
const MAX_FILES: usize = 100_000;

/// What a call asks for.
#[derive(Debug, Clone)]
pub struct CleanupRequest {
    pub path: PathBuf,
    pub glob: String,
    pub older_than: Duration,
    pub dry_run: bool,
}

/// What a call did (or, in a dry run, would have done).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct CleanupReport {
    pub files: Vec<String>,
    pub bytes: u64,
    pub dry_run: bool,
    /// True when the deadline or the file cap stopped the walk early.
    pub truncated: bool,
    pub errors: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(
        "disk_cleanup is disabled: no allowed roots are configured (disk_cleanup.allowed_roots)"
    )]
    NoRoots,
    #[error("path {0} is not under an allowed root")]
    NotAllowed(String),
    #[error("path {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("bad glob {0:?}: {1}")]
    Glob(String, glob::PatternError),
}

/// Runs a cleanup. `roots` are the configured allowed roots; `deadline` bounds the walk.
pub fn cleanup(
    req: &CleanupRequest,
    roots: &[PathBuf],
    deadline: Instant,
) -> Result<CleanupReport, CleanupError> {
    if roots.is_empty() {
        return Err(CleanupError::NoRoots);
    }
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CleanupError::Io { path, source }
    };
    let target = req.path.canonicalize().map_err(io(&req.path))?;
    let allowed = roots
        .iter()
        .filter_map(|r| r.canonicalize().ok())
        .any(|root| target.starts_with(&root));
    if !allowed {
        return Err(CleanupError::NotAllowed(req.path.display().to_string()));
    }
    let pattern =
        glob::Pattern::new(&req.glob).map_err(|e| CleanupError::Glob(req.glob.clone(), e))?;
    // A pattern without '/' matches file names at any depth; with '/', the path below `path`.
    let by_name = !req.glob.contains('/');
    let cutoff = SystemTime::now()
        .checked_sub(req.older_than)
        .unwrap_or(SystemTime::UNIX_EPOCH);

    let mut report = CleanupReport {
        dry_run: req.dry_run,
        ..Default::default()
    };
    let mut stack = vec![target.clone()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                report.errors.push(format!("{}: {e}", dir.display()));
                continue;
            }
        };
        for entry in entries.flatten() {
            if Instant::now() >= deadline || report.files.len() >= MAX_FILES {
                report.truncated = true;
                return Ok(report);
            }
            let path = entry.path();
            // symlink_metadata: a symlink is never followed, neither as a directory nor a file.
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            if !meta.is_file() {
                continue;
            }
            let subject = if by_name {
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            } else {
                path.strip_prefix(&target)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned()
            };
            if !pattern.matches(&subject) {
                continue;
            }
            let old = meta.modified().map(|m| m <= cutoff).unwrap_or(false);
            if !old {
                continue;
            }
            if !req.dry_run {
                if let Err(e) = std::fs::remove_file(&path) {
                    report.errors.push(format!("{}: {e}", path.display()));
                    continue;
                }
            }
            report.bytes += meta.len();
            report.files.push(path.display().to_string());
        }
    }
    report.files.sort();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    fn touch(dir: &Path, name: &str, bytes: usize, age: Duration) -> PathBuf {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, vec![b'x'; bytes]).unwrap();
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(SystemTime::now() - age)
            .unwrap();
        p
    }

    fn req(path: &Path, glob: &str, dry_run: bool) -> CleanupRequest {
        CleanupRequest {
            path: path.to_owned(),
            glob: glob.into(),
            older_than: Duration::from_secs(3600),
            dry_run,
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn deletes_only_old_matching_files_and_counts_bytes() {
        let root = tempfile::tempdir().unwrap();
        let old = touch(root.path(), "logs/a.log.gz", 100, DAY);
        let young = touch(root.path(), "logs/b.log.gz", 50, Duration::ZERO);
        let other = touch(root.path(), "logs/c.txt", 70, DAY);
        let r = cleanup(
            &req(root.path(), "*.gz", false),
            &[root.path().into()],
            far(),
        )
        .unwrap();
        assert_eq!(r.bytes, 100);
        assert_eq!(r.files.len(), 1);
        assert!(!old.exists());
        assert!(young.exists() && other.exists());
    }

    #[test]
    fn dry_run_reports_without_deleting() {
        let root = tempfile::tempdir().unwrap();
        let old = touch(root.path(), "a.log", 10, DAY);
        let r = cleanup(
            &req(root.path(), "*.log", true),
            &[root.path().into()],
            far(),
        )
        .unwrap();
        assert!(r.dry_run);
        assert_eq!((r.files.len(), r.bytes), (1, 10));
        assert!(old.exists());
    }

    #[test]
    fn paths_outside_allowed_roots_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        touch(elsewhere.path(), "a.log", 10, DAY);
        let e = cleanup(
            &req(elsewhere.path(), "*", false),
            &[root.path().into()],
            far(),
        )
        .unwrap_err();
        assert!(matches!(e, CleanupError::NotAllowed(_)), "{e}");
        let e = cleanup(
            &req(&root.path().join(".."), "*", false),
            &[root.path().into()],
            far(),
        )
        .unwrap_err();
        assert!(matches!(e, CleanupError::NotAllowed(_)), "{e}");
        assert!(matches!(
            cleanup(&req(root.path(), "*", false), &[], far()),
            Err(CleanupError::NoRoots)
        ));
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_are_never_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let precious = touch(outside.path(), "precious.log", 10, DAY);
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).unwrap();
        std::os::unix::fs::symlink(&precious, root.path().join("link.log")).unwrap();
        let r = cleanup(
            &req(root.path(), "*.log", false),
            &[root.path().into()],
            far(),
        )
        .unwrap();
        assert!(r.files.is_empty());
        assert!(precious.exists());
    }

    #[test]
    fn a_passed_deadline_stops_the_walk() {
        let root = tempfile::tempdir().unwrap();
        let f = touch(root.path(), "a.log", 10, DAY);
        let r = cleanup(
            &req(root.path(), "*.log", false),
            &[root.path().into()],
            Instant::now(),
        )
        .unwrap();
        assert!(r.truncated);
        assert!(f.exists());
    }
}
