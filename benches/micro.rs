//! Micro-benchmarks (divan): playbook matching at 10 / 1,000 / 10,000 playbooks, one Rhai step
//! from a compiled AST, and the history write + read path. `cargo bench --bench micro`.

use std::sync::Arc;
use std::time::Duration;

use divan::Bencher;
use reactor::config::SandboxLimits;
use reactor::domain::{decode_webhook, Alert};
use reactor::executor::{sandbox, Attempt, Executor};
use reactor::history::{Outcome, Run, RunId, StepRecord, Store};
use reactor::playbook::{load_dir, Playbooks, StepAction};

fn main() {
    divan::main();
}

const FIXTURE: &str = include_str!("../tests/fixtures/alertmanager-0.25-firing.json");

fn alert(alertname: &str) -> Alert {
    let mut a = decode_webhook(FIXTURE.as_bytes()).unwrap().alerts.remove(0);
    a.labels.insert("alertname".into(), alertname.into());
    a.labels.insert("severity".into(), "warning".into());
    a
}

/// `n` playbooks, each for its own alertname with a regex matcher, the bench one among them.
/// `indexed: false` writes the alertname as a regex matcher, so the index cannot be used.
fn playbooks(n: usize, indexed: bool) -> Playbooks {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("p")).unwrap();
    std::fs::create_dir_all(dir.path().join("s")).unwrap();
    // serde-saphyr's budget allows 1,024 documents per file.
    let mut text = String::new();
    for i in 0..n {
        if i % 500 == 0 && !text.is_empty() {
            std::fs::write(
                dir.path().join(format!("p/{i}.yaml")),
                std::mem::take(&mut text),
            )
            .unwrap();
        }
        let name = if i == n / 2 {
            "Target".to_owned()
        } else {
            format!("Other{i}")
        };
        let m = if indexed {
            format!("  alertname: {name}\n  matchers: ['severity=~\"warning|critical\"', 'instance=~\".+\"']\n")
        } else {
            format!("  matchers: ['alertname=~\"{name}\"', 'severity=~\"warning|critical\"']\n")
        };
        text.push_str(&format!(
            "---\nname: p{i}\nmatch:\n{m}steps:\n  - inline: '1'\n"
        ));
    }
    std::fs::write(dir.path().join("p/all.yaml"), text).unwrap();
    let engine = sandbox::build_engine(&SandboxLimits::default(), vec![], None);
    load_dir(&dir.path().join("p"), &dir.path().join("s"), &engine).unwrap()
}

#[divan::bench(args = [10, 1_000, 10_000])]
fn match_indexed(bencher: Bencher, n: usize) {
    let pbs = playbooks(n, true);
    let a = alert("Target");
    bencher.bench_local(|| {
        let m = pbs.matching(divan::black_box(&a));
        assert_eq!(m.len(), 1);
        m
    });
}

/// The worst case: no playbook names an exact alertname, so every one is tried.
#[divan::bench(args = [10, 1_000, 10_000])]
fn match_unindexed(bencher: Bencher, n: usize) {
    let pbs = playbooks(n, false);
    let a = alert("Target");
    bencher.bench_local(|| pbs.matching(divan::black_box(&a)));
}

/// One step attempt as the engine runs it: the alert and params converted, evaluation on a
/// blocking thread, the result converted back.
#[divan::bench]
fn rhai_step_attempt(bencher: Bencher) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let engine = sandbox::build_engine(&SandboxLimits::default(), vec![], None);
    let ast = engine
        .compile("let n = params.n + 1; #{ n: n, instance: alert.labels.instance }")
        .unwrap();
    let ex = Executor::new(Arc::new(engine), false, None);
    let action = StepAction::Rhai {
        ast: Arc::new(ast),
        source: "bench".into(),
    };
    let a = alert("Target");
    let params: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(r#"{"n": 41}"#).unwrap();
    bencher.bench_local(|| {
        rt.block_on(ex.run(Attempt {
            action: &action,
            alert: &a,
            params: params.clone(),
            timeout: Duration::from_secs(5),
            dry_run: None,
            cancel: None,
        }))
    });
}

/// Evaluation alone, on the calling thread.
#[divan::bench]
fn rhai_eval_compiled_ast(bencher: Bencher) {
    let engine = sandbox::build_engine(&SandboxLimits::default(), vec![], None);
    let ast = engine.compile("let n = params.n + 1; #{ n: n }").unwrap();
    let params = rhai::serde::to_dynamic(serde_json::json!({"n": 41})).unwrap();
    bencher.bench_local(|| {
        let mut scope = rhai::Scope::new();
        scope.push_constant("params", params.clone());
        engine
            .eval_ast_with_scope::<rhai::Dynamic>(&mut scope, &ast)
            .unwrap()
    });
}

fn finished_run(seq: u64) -> Run {
    let now = jiff::Timestamp::now();
    let mut run = Run::new(
        RunId { seq, index: 0 },
        alert("Target"),
        Some("bench".into()),
        Outcome::Succeeded,
        now,
    );
    run.started_at = Some(now);
    run.finished_at = Some(now);
    run.steps.push(StepRecord {
        name: "trivial".into(),
        attempt: 1,
        succeeded: true,
        started_at: now,
        duration_ms: 0,
        output: Some(serde_json::json!({"n": 42, "instance": "curl-test"})),
        error: None,
        logs: vec![],
        changes: vec![],
    });
    run.note(now, "step trivial attempt 1 started");
    run.note(now, "step trivial attempt 1 succeeded");
    run
}

/// A finished run written (not flushed) and read back by id.
#[divan::bench]
fn history_put_then_get_run(bencher: Bencher) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = rt.block_on(async { Store::open(dir.path()) }).unwrap();
    let mut seq = 0;
    bencher.bench_local(|| {
        seq += 1;
        let run = finished_run(seq);
        store.put_run(&run).unwrap();
        store.get_run(run.id).unwrap().unwrap()
    });
}

/// One alert accepted durably by a lone writer: one fsync per call (concurrent writers share
/// flushes; that is what the load benchmark measures).
#[divan::bench(sample_count = 20, sample_size = 10)]
fn history_accept_durable_single_writer(bencher: Bencher) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = rt.block_on(async { Store::open(dir.path()) }).unwrap();
    let a = alert("Target");
    bencher.bench_local(|| {
        rt.block_on(store.accept(vec![a.clone()], jiff::Timestamp::now()))
            .unwrap()
    });
}
