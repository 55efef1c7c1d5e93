//! Running a program for a step: the `exec()` helper of scripts and the `command:` step.
//!
//! The injection rules: there is no shell, ever. The program is an absolute path that must be on
//! the configured allow-list (`exec.allow`), compared exactly; the arguments are a vector handed
//! to `execve` as they are, so a label value of `; rm -rf /` is one literal argument. The
//! environment is cleared, and holds only the variables the step passes. The program runs in its
//! own process group, which is killed at the step's deadline; its output is read up to
//! `exec.max_output_bytes` per stream, and the rest is counted and dropped.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::error::{Class, StepError};
use crate::history::Change;

/// Which programs may run, and how much of their output is kept.
#[derive(Debug, Clone, Default)]
pub struct ExecPolicy {
    /// Absolute paths, compared exactly.
    pub allow: Vec<PathBuf>,
    /// Bytes kept of each of stdout and stderr.
    pub max_output: usize,
}

/// One program to run.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub program: String,
    pub args: Vec<String>,
    /// The whole environment of the program.
    pub env: Vec<(String, String)>,
    pub stdin: Option<Vec<u8>>,
    pub deadline: Instant,
    pub dry_run: bool,
}

/// What the program did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExecOutcome {
    /// The exit code; `None` when a signal ended it (or in a dry run).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// Some output was dropped past `exec.max_output_bytes`.
    pub truncated: bool,
    pub dry_run: bool,
    pub duration_ms: u64,
}

/// How long the wait for an exit sleeps between checks.
const POLL: Duration = Duration::from_millis(5);

impl ExecPolicy {
    /// Whether `program` may run: an absolute path on the allow-list.
    pub fn check(&self, program: &str) -> Result<&Path, StepError> {
        let path = Path::new(program);
        let refused = |why: String| StepError::Helper {
            message: format!("exec {program:?}: {why}; nothing was run"),
            class: Class::Refused,
        };
        if !path.is_absolute() {
            return Err(refused("the program must be an absolute path".into()));
        }
        if self.allow.is_empty() {
            return Err(refused(
                "no program is allowed (exec.allow is empty)".into(),
            ));
        }
        match self.allow.iter().find(|a| a.as_path() == path) {
            Some(allowed) => Ok(allowed),
            None => Err(refused("not in exec.allow".into())),
        }
    }

    /// Runs `req` if its program is allowed, and records it in `changes` (the environment's
    /// names only, never its values). Blocks the calling thread until the program exits or the
    /// deadline passes; `stop` is checked meanwhile (a cancelled run).
    pub fn run(
        &self,
        req: &ExecRequest,
        changes: &mut Vec<Change>,
        stop: impl Fn() -> bool,
    ) -> Result<ExecOutcome, StepError> {
        let program = self.check(&req.program)?;
        let started = Instant::now();
        let object = describe(&req.program, &req.args);
        let names: Vec<&str> = req.env.iter().map(|(k, _)| k.as_str()).collect();
        if req.dry_run {
            changes.push(Change {
                verb: "exec".into(),
                object,
                namespace: String::new(),
                dry_run: true,
                result: "ok".into(),
                detail: serde_json::json!({"env": names}),
            });
            return Ok(ExecOutcome {
                code: None,
                stdout: String::new(),
                stderr: String::new(),
                truncated: false,
                dry_run: true,
                duration_ms: 0,
            });
        }
        let result = self.spawn_and_wait(program, req, started, stop);
        let duration_ms = started.elapsed().as_millis() as u64;
        changes.push(Change {
            verb: "exec".into(),
            object,
            namespace: String::new(),
            dry_run: false,
            result: match &result {
                Ok(o) => match o.code {
                    Some(code) => format!("exit {code}"),
                    None => "ended by a signal".into(),
                },
                Err(e) => e.to_string(),
            },
            detail: serde_json::json!({"env": names, "duration_ms": duration_ms}),
        });
        result
    }

    fn spawn_and_wait(
        &self,
        program: &Path,
        req: &ExecRequest,
        started: Instant,
        stop: impl Fn() -> bool,
    ) -> Result<ExecOutcome, StepError> {
        let mut child = Command::new(program)
            .args(&req.args)
            .env_clear()
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .stdin(if req.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| {
                let class = match e.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                        Class::Refused
                    }
                    _ => Class::Io,
                };
                StepError::Helper {
                    message: format!("exec {:?}: cannot start: {e}", req.program),
                    class,
                }
            })?;
        let group = child.id();
        if let (Some(input), Some(mut pipe)) = (req.stdin.clone(), child.stdin.take()) {
            // A program that does not read its input must not block the step: written apart.
            std::thread::spawn(move || {
                let _ = pipe.write_all(&input);
            });
        }
        let stdout = reader(child.stdout.take(), self.max_output);
        let stderr = reader(child.stderr.take(), self.max_output);
        let mut timed_out = false;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= req.deadline || stop() => {
                    timed_out = Instant::now() >= req.deadline;
                    kill_group(group);
                    break child.wait().ok();
                }
                Ok(None) => std::thread::sleep(POLL),
                Err(_) => {
                    kill_group(group);
                    break child.wait().ok();
                }
            }
        };
        // A child the program left behind may hold the pipes open: wait for the output up to the
        // deadline, then end the whole group.
        let left = req.deadline.saturating_duration_since(Instant::now());
        let collect = |rx: mpsc::Receiver<Captured>| {
            rx.recv_timeout(left).or_else(|_| {
                kill_group(group);
                rx.recv_timeout(Duration::from_secs(1))
            })
        };
        let (out, err) = (collect(stdout), collect(stderr));
        if timed_out {
            return Err(StepError::Timeout {
                after: req.deadline.saturating_duration_since(started),
                hung: false,
            });
        }
        if stop() {
            return Err(StepError::Cancelled);
        }
        let (out, err) = (out.unwrap_or_default(), err.unwrap_or_default());
        Ok(ExecOutcome {
            code: status.and_then(|s| s.code()),
            stdout: String::from_utf8_lossy(&out.bytes).into_owned(),
            stderr: String::from_utf8_lossy(&err.bytes).into_owned(),
            truncated: out.dropped > 0 || err.dropped > 0,
            dry_run: false,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }
}

/// Output read from one stream: what was kept and how many bytes were dropped.
#[derive(Debug, Default)]
struct Captured {
    bytes: Vec<u8>,
    dropped: u64,
}

/// Reads `stream` to its end on a thread, keeping at most `max` bytes.
fn reader(stream: Option<impl Read + Send + 'static>, max: usize) -> mpsc::Receiver<Captured> {
    let (tx, rx) = mpsc::channel();
    let Some(mut stream) = stream else {
        let _ = tx.send(Captured::default());
        return rx;
    };
    std::thread::spawn(move || {
        let mut captured = Captured::default();
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let keep = n.min(max.saturating_sub(captured.bytes.len()));
                    captured.bytes.extend_from_slice(&buf[..keep]);
                    captured.dropped += (n - keep) as u64;
                }
            }
        }
        let _ = tx.send(captured);
    });
    rx
}

fn kill_group(group: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(group as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// The command line as a person would read it, each argument quoted when it needs to be. For
/// the record only: nothing is ever run through a shell.
pub fn describe(program: &str, args: &[String]) -> String {
    let quote = |a: &str| {
        if !a.is_empty()
            && a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+".contains(&b))
        {
            a.to_owned()
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        }
    };
    std::iter::once(program)
        .chain(args.iter().map(String::as_str))
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str]) -> ExecPolicy {
        ExecPolicy {
            allow: allow.iter().map(PathBuf::from).collect(),
            max_output: 1024,
        }
    }

    fn request(program: &str, args: &[&str]) -> ExecRequest {
        ExecRequest {
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: vec![("GREETING".into(), "hello".into())],
            stdin: None,
            deadline: Instant::now() + Duration::from_secs(10),
            dry_run: false,
        }
    }

    #[test]
    fn an_allowed_program_gets_its_arguments_literally_and_only_the_given_environment() {
        let mut changes = Vec::new();
        let out = policy(&["/bin/sh"])
            .run(
                &request(
                    "/bin/sh",
                    &[
                        "-c",
                        r#"printf '%s|' "$1" "$GREETING" "${HOME:-unset}"; exit 3"#,
                        "sh",
                        "; rm -rf /",
                    ],
                ),
                &mut changes,
                || false,
            )
            .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "; rm -rf /|hello|unset|");
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].verb, "exec");
        assert_eq!(changes[0].result, "exit 3");
        assert!(
            changes[0].object.ends_with("sh '; rm -rf /'"),
            "{}",
            changes[0].object
        );
        assert_eq!(changes[0].detail["env"], serde_json::json!(["GREETING"]));
    }

    #[test]
    fn a_program_not_on_the_list_or_not_absolute_is_refused_and_nothing_runs() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let touch = format!("/usr/bin/touch {}", marker.display());
        let mut changes = Vec::new();
        for program in ["/usr/bin/touch", "touch", "/usr/bin/../bin/touch"] {
            let e = policy(&["/bin/true"])
                .run(&request(program, &[&touch]), &mut changes, || false)
                .unwrap_err();
            assert_eq!((e.metric_label(), e.is_retryable()), ("refused", false));
            assert!(e.to_string().contains("nothing was run"), "{e}");
        }
        let e = policy(&[])
            .run(&request("/bin/true", &[]), &mut changes, || false)
            .unwrap_err();
        assert!(e.to_string().contains("exec.allow is empty"), "{e}");
        assert!(changes.is_empty() && !marker.exists());
    }

    #[test]
    fn the_deadline_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("late");
        let mut req = request(
            "/bin/sh",
            &[
                "-c",
                &format!("(sleep 1; /usr/bin/touch {}) & sleep 30", marker.display()),
            ],
        );
        req.deadline = Instant::now() + Duration::from_millis(300);
        let started = Instant::now();
        let e = policy(&["/bin/sh"])
            .run(&req, &mut Vec::new(), || false)
            .unwrap_err();
        assert_eq!(e.metric_label(), "timeout");
        assert!(started.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(!marker.exists(), "the background child was killed too");
    }

    #[test]
    fn output_is_bounded_and_input_is_given() {
        let mut req = request("/bin/sh", &["-c", "cat; head -c 5000 /dev/zero"]);
        req.stdin = Some(b"from stdin ".to_vec());
        let out = policy(&["/bin/sh"])
            .run(&req, &mut Vec::new(), || false)
            .unwrap();
        assert_eq!(out.stdout.len(), 1024);
        assert!(out.stdout.starts_with("from stdin "));
        assert!(out.truncated);
    }

    #[test]
    fn a_dry_run_records_what_would_run_and_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let mut req = request("/usr/bin/touch", &[marker.to_str().unwrap()]);
        req.dry_run = true;
        let mut changes = Vec::new();
        let out = policy(&["/usr/bin/touch"])
            .run(&req, &mut changes, || false)
            .unwrap();
        assert!(out.dry_run && out.code.is_none());
        assert!(changes[0].dry_run);
        assert!(!marker.exists());
    }
}
