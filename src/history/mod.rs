//! Durable state in sled: the intake of accepted alerts (written and flushed before the webhook
//! answers) and the run history (each step, output, timing and outcome). An intake entry lives
//! until its runs are recorded, so a crash between the 2xx and the run loses nothing.
//!
//! They are two sled databases: the intake in the data directory, the history (runs, guards,
//! outbox) in its `history/` subdirectory. Each answer waits for a flush of the first only, so
//! the runs' bytes stay off the accept path; an intake entry is removed only after the history
//! flush that holds its runs, so the order a single log used to give still holds.
//!
//! Sequence numbers (the first half of a run id) are never reused: the intake database keeps a
//! mark above every number handed out, reserved in blocks ([`SEQ_BLOCK`]) and written before the
//! first intake entry that uses the block, so that a restart after the history was pruned empty
//! does not start again at 1 and meet the old runs' outbox entries.

mod commit;
mod run;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use jiff::Timestamp;

pub use crate::config::Durability;
use crate::domain::Alert;
pub use commit::GroupCommit;
use commit::{Insert, Remove};
pub use run::*;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sled(#[from] sled::Error),
    #[error("database write or flush failed: {0}")]
    Durable(Arc<sled::Error>),
    #[error("could not start the database flusher thread: {0}")]
    Flusher(std::io::Error),
    #[error(
        "could not open the database log {path} to fdatasync it (durability: power): {source}"
    )]
    SyncFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the database in {} is in use by another process (is reactor already running on this data_dir?); stop it, or point data_dir elsewhere", .0.display())]
    InUse(std::path::PathBuf),
    #[error("corrupt record {key}: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
}

/// sled's lock error, which names a lock file and an errno, as what it means.
fn in_use(e: sled::Error, dir: &Path) -> StoreError {
    match &e {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            StoreError::InUse(dir.to_owned())
        }
        _ => StoreError::Sled(e),
    }
}

/// The database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// The intake's database.
    db: sled::Db,
    history: sled::Db,
    intake: sled::Tree,
    runs: sled::Tree,
    /// Flushes `db`: every accept waits for it.
    commit: GroupCommit,
    /// Flushes `history`, then removes the intake entries whose runs that flush made durable.
    history_commit: GroupCommit,
    next_seq: AtomicU64,
    /// Every sequence number below this is covered by the durable mark (`SEQ_KEY`).
    reserved: AtomicU64,
    /// Taken to move the mark, which happens once per [`SEQ_BLOCK`] accepted alerts.
    reserving: Mutex<()>,
}

/// The intake database's key for the sequence mark: no number at or above it was handed out.
const SEQ_KEY: &[u8] = b"next-seq";
/// Sequence numbers reserved at a time: one small write per this many accepted alerts.
pub const SEQ_BLOCK: u64 = 1 << 16;

impl Drop for Inner {
    /// A clean stop leaves the exact next number as the mark, so numbering goes on without a gap;
    /// after a crash it goes on from the reserved mark.
    fn drop(&mut self) {
        let next = self.next_seq.load(Ordering::Acquire);
        if self.db.insert(SEQ_KEY, &next.to_be_bytes()).is_ok() {
            let _ = self.db.flush();
        }
    }
}

/// The history database's directory, inside the data directory.
const HISTORY_DIR: &str = "history";
/// How long intake removals gather before the history flusher flushes them: under a steady
/// stream of alerts, one history flush per this interval. Measured in the load benchmark
/// against 2, 20, 50 and 200 ms (the load benchmark, docs/performance.md).
const HISTORY_LINGER: std::time::Duration = std::time::Duration::from_millis(10);

impl Store {
    /// Opens (or creates) the intake's database in `dir` and the history's in `dir/history`, and
    /// starts a flusher thread for each.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, Durability::Process)
    }

    /// [`Store::open`], with accepts made `durability`-durable before they are answered.
    pub fn open_with(dir: &Path, durability: Durability) -> Result<Store, StoreError> {
        // The intake holds only the alerts not yet recorded: a small cache does.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(16 << 20)
            .flush_every_ms(Some(200))
            .open()
            .map_err(|e| in_use(e, dir))?;
        let history_dir = dir.join(HISTORY_DIR);
        let history = sled::Config::new()
            .path(&history_dir)
            .cache_capacity(64 << 20)
            .flush_every_ms(Some(200))
            .open()
            .map_err(|e| in_use(e, dir))?;
        migrate(&db, &history)?;
        let intake = db.open_tree("intake")?;
        let runs = history.open_tree("runs")?;
        let last_intake = intake.last()?.and_then(|(k, _)| {
            k.get(..8)
                .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
        });
        let last_run = runs
            .last()?
            .and_then(|(k, _)| RunId::from_key(&k))
            .map(|id| id.seq);
        let mark = db
            .get(SEQ_KEY)?
            .and_then(|v| Some(u64::from_be_bytes(v.as_ref().try_into().ok()?)));
        let next = last_intake
            .max(last_run)
            .map_or(1, |s| s + 1)
            .max(mark.unwrap_or(1));
        let reserved = next.saturating_add(SEQ_BLOCK);
        db.insert(SEQ_KEY, &reserved.to_be_bytes())?;
        db.flush()?;
        let commit = GroupCommit::spawn(
            "reactor-flush",
            db.clone(),
            sync_file(dir, durability)?,
            std::time::Duration::ZERO,
        )
        .map_err(StoreError::Flusher)?;
        let history_commit = GroupCommit::spawn(
            "reactor-history",
            history.clone(),
            sync_file(&history_dir, durability)?,
            HISTORY_LINGER,
        )
        .map_err(StoreError::Flusher)?;
        Ok(Store {
            inner: Arc::new(Inner {
                commit,
                history_commit,
                db,
                history,
                intake,
                runs,
                next_seq: AtomicU64::new(next),
                reserved: AtomicU64::new(reserved),
                reserving: Mutex::new(()),
            }),
        })
    }

    /// Records the alerts and returns once they are on disk. The group-commit flusher applies the
    /// inserts just before its flush. One insert per alert, not a batch (see [`Store::put_runs`]):
    /// a crash before the flush may keep some of a payload's alerts, which were never answered,
    /// so Alertmanager resends them and the repeats are deduplicated.
    pub async fn accept(
        &self,
        alerts: Vec<Alert>,
        received_at: Timestamp,
    ) -> Result<Vec<Intake>, StoreError> {
        self.accept_with(alerts, received_at, false).await
    }

    /// [`Store::accept`], marking whether Alertmanager holds these alerts back from humans.
    pub async fn accept_with(
        &self,
        alerts: Vec<Alert>,
        received_at: Timestamp,
        held: bool,
    ) -> Result<Vec<Intake>, StoreError> {
        let first = self.reserve(alerts.len())?;
        let intakes = alerts
            .into_iter()
            .enumerate()
            .map(|(i, alert)| Intake {
                seq: first + i as u64,
                received_at,
                alert,
                held,
                refused: None,
                manual: None,
            })
            .collect();
        self.commit_intakes(intakes).await
    }

    /// Records alerts for a run asked for by hand.
    pub async fn accept_manual(
        &self,
        alerts: Vec<Alert>,
        received_at: Timestamp,
        manual: Manual,
    ) -> Result<Vec<Intake>, StoreError> {
        let first = self.reserve(alerts.len())?;
        let intakes = alerts
            .into_iter()
            .enumerate()
            .map(|(i, alert)| Intake {
                seq: first + i as u64,
                received_at,
                alert,
                held: false,
                refused: None,
                manual: Some(manual.clone()),
            })
            .collect();
        self.commit_intakes(intakes).await
    }

    /// Records alerts reactor refused (each with why), so that they are paged, not lost.
    pub async fn accept_refused(
        &self,
        refused: Vec<(Alert, String)>,
        received_at: Timestamp,
    ) -> Result<Vec<Intake>, StoreError> {
        let first = self.reserve(refused.len())?;
        let intakes = refused
            .into_iter()
            .enumerate()
            .map(|(i, (alert, why))| Intake {
                seq: first + i as u64,
                received_at,
                alert,
                held: false,
                refused: Some(why),
                manual: None,
            })
            .collect();
        self.commit_intakes(intakes).await
    }

    /// The first of `n` new sequence numbers.
    fn reserve(&self, n: usize) -> Result<u64, StoreError> {
        let n = n as u64;
        let first = self.inner.next_seq.fetch_add(n, Ordering::Relaxed);
        self.reserve_through(first + n)?;
        Ok(first)
    }

    /// Writes `intakes` and returns them once they are on disk.
    async fn commit_intakes(&self, intakes: Vec<Intake>) -> Result<Vec<Intake>, StoreError> {
        let inserts = intakes
            .iter()
            .map(|it| Insert {
                tree: self.inner.intake.clone(),
                key: it.seq.to_be_bytes(),
                value: serde_json::to_vec(it).expect("intake serializes"),
            })
            .collect();
        self.inner
            .commit
            .insert_durable(inserts)
            .await
            .map_err(StoreError::Durable)?;
        Ok(intakes)
    }

    /// Moves the durable sequence mark past `end` when it is not already: written to the intake's
    /// database before this accept's entries, so the same flush (or an earlier one) carries it.
    fn reserve_through(&self, end: u64) -> Result<(), StoreError> {
        if end <= self.inner.reserved.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one_at_a_time = self
            .inner
            .reserving
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if end > self.inner.reserved.load(Ordering::Acquire) {
            let mark = end.saturating_add(SEQ_BLOCK);
            self.inner.db.insert(SEQ_KEY, &mark.to_be_bytes())?;
            self.inner.reserved.store(mark, Ordering::Release);
        }
        Ok(())
    }

    /// A small write to each database made durable: the watchdog's check that both still take
    /// writes.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let now = Timestamp::now().as_millisecond().to_be_bytes();
        self.inner.db.insert("watchdog-probe", &now)?;
        self.inner.history.insert("watchdog-probe", &now)?;
        self.durable().await
    }

    /// Waits until every earlier write to either database is on disk, and every intake removal
    /// asked for before is applied and on disk too.
    pub async fn durable(&self) -> Result<(), StoreError> {
        self.history_durable().await?;
        self.inner
            .commit
            .durable()
            .await
            .map_err(StoreError::Durable)
    }

    /// Waits until every earlier write to the history (runs, guards, outbox) is on disk: the
    /// outbox's writes, and a run before a step that may act, so that a crash finds the run in
    /// progress rather than none.
    pub async fn history_durable(&self) -> Result<(), StoreError> {
        self.inner
            .history_commit
            .durable()
            .await
            .map_err(StoreError::Durable)
    }

    /// Why the store stopped taking writes, once a flush of either database failed (a full disk,
    /// an I/O error). sled keeps that error until the process restarts, so this never clears:
    /// `/healthz` fails on it, and a liveness probe restarts reactor, which reopens the
    /// databases and processes what was accepted.
    pub fn failure(&self) -> Option<String> {
        self.inner
            .commit
            .failure()
            .or(self.inner.history_commit.failure())
            .map(str::to_owned)
    }

    /// The alert accepted as `seq`, while it is in the intake.
    pub fn get_intake(&self, seq: u64) -> Result<Option<Intake>, StoreError> {
        let key = seq.to_be_bytes();
        self.inner
            .intake
            .get(key)?
            .map(|v| decode(&key, &v))
            .transpose()
    }

    /// Accepted alerts whose runs were never recorded, oldest first.
    pub fn pending_intake(&self) -> Result<Vec<Intake>, StoreError> {
        self.inner
            .intake
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Takes the alert accepted as `seq` off the intake once every history write made before
    /// this call is durable (its runs, written first). Returns without waiting for that.
    pub fn remove_intake(&self, seq: u64) -> Result<(), StoreError> {
        self.inner
            .history_commit
            .remove_after_flush(Remove {
                tree: self.inner.intake.clone(),
                key: seq.to_be_bytes(),
            })
            .map_err(StoreError::Durable)
    }

    /// Another tree of the history database, for the guards and the outbox.
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.inner.history.open_tree(name)?)
    }

    /// Writes an alert's runs, one insert each with run index 0 last: its presence marks the set
    /// complete (see [`Store::intake_recorded`]). Not a sled batch: the first batch or transaction
    /// in a process switches sled 0.34 to a global reader-writer lock taken by every later read
    /// and write of every tree, which cut accepted alerts from ~14,000/s to ~5,400/s here.
    pub fn put_runs<'a>(&self, runs: impl IntoIterator<Item = &'a Run>) -> Result<(), StoreError> {
        let mut first = None;
        for run in runs {
            if run.id.index == 0 {
                first = Some(run);
            } else {
                self.put_run(run)?;
            }
        }
        first.map_or(Ok(()), |run| self.put_run(run))
    }

    /// Retention: removes the oldest runs while there are more than `max_runs` or they were
    /// received before `cutoff`. A run still in progress (running or verifying) is kept and
    /// stepped over, so one that never ends cannot stop pruning. Returns how many were removed
    /// and the sequence number below which every run was looked at (the outbox prunes below it).
    pub fn prune_runs(
        &self,
        cutoff: Timestamp,
        max_runs: usize,
    ) -> Result<(usize, u64), StoreError> {
        let mut count = self.inner.runs.len();
        let mut removed = 0;
        let mut looked_below = 0;
        for kv in self.inner.runs.iter() {
            let (k, v) = kv?;
            let run: Run = decode(&k, &v)?;
            if count <= max_runs && run.received_at >= cutoff {
                break;
            }
            looked_below = looked_below.max(run.id.seq + 1);
            if matches!(
                run.outcome,
                Outcome::Running | Outcome::Verifying | Outcome::AwaitingApproval
            ) {
                continue;
            }
            self.inner.runs.remove(&k)?;
            count -= 1;
            removed += 1;
        }
        Ok((removed, looked_below))
    }

    pub fn put_run(&self, run: &Run) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(run).expect("run serializes");
        self.inner.runs.insert(run.id.key(), bytes)?;
        Ok(())
    }

    /// Changes the stored run `id` with `f`, atomically: tasks that each change one part of a
    /// run (the outboxes recording deliveries, the engine linking an incident) never undo each
    /// other's writes. Returns the run as stored, or `None` when there is none.
    pub fn update_run(
        &self,
        id: RunId,
        mut f: impl FnMut(&mut Run),
    ) -> Result<Option<Run>, StoreError> {
        loop {
            let Some(old) = self.inner.runs.get(id.key())? else {
                return Ok(None);
            };
            let mut run: Run = decode(&id.key(), &old)?;
            f(&mut run);
            let new = serde_json::to_vec(&run).expect("run serializes");
            if self
                .inner
                .runs
                .compare_and_swap(id.key(), Some(old), Some(new))?
                .is_ok()
            {
                return Ok(Some(run));
            }
        }
    }

    pub fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        self.inner
            .runs
            .get(id.key())?
            .map(|v| decode(&id.key(), &v))
            .transpose()
    }

    /// Whether the runs of the alert accepted as `seq` were recorded. Run index 0 is written last
    /// and sled recovers a prefix of its log, so without it any of the alert's runs present are
    /// a partial set from a crash, which never started: they are removed, and the alert is to
    /// be processed again.
    pub fn intake_recorded(&self, seq: u64) -> Result<bool, StoreError> {
        if self
            .inner
            .runs
            .contains_key(RunId { seq, index: 0 }.key())?
        {
            return Ok(true);
        }
        for k in self.inner.runs.scan_prefix(seq.to_be_bytes()).keys() {
            self.inner.runs.remove(k?)?;
        }
        Ok(false)
    }

    /// The runs of the alert accepted as `seq`.
    pub fn runs_of(&self, seq: u64) -> Result<Vec<Run>, StoreError> {
        self.inner
            .runs
            .scan_prefix(seq.to_be_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Newest first. A full scan in the worst case: call it off the async workers.
    pub fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        let limit = filter
            .limit
            .unwrap_or(RunFilter::DEFAULT_LIMIT)
            .min(RunFilter::MAX_LIMIT);
        let mut out = Vec::new();
        for run in self.all_runs().rev() {
            if out.len() >= limit {
                break;
            }
            let run = run?;
            if filter.accepts(&run) {
                out.push(run);
            }
        }
        Ok(out)
    }

    /// Every run, oldest first (`.rev()` for newest first); a full scan.
    pub fn all_runs(&self) -> impl DoubleEndedIterator<Item = Result<Run, StoreError>> + '_ {
        self.inner.runs.iter().map(|kv| {
            let (k, v) = kv?;
            decode(&k, &v)
        })
    }

    /// Runs a crash may have left unfinished: in progress, or with a page not yet delivered.
    pub fn unfinished_runs(&self) -> Result<Vec<Run>, StoreError> {
        let mut out = Vec::new();
        for run in self.all_runs() {
            let run = run?;
            let page_pending = run
                .escalation
                .as_ref()
                .is_some_and(|e| e.status == DeliveryStatus::Pending)
                || run.notifications.iter().any(|n| n.state == "queued");
            if matches!(run.outcome, Outcome::Running | Outcome::Verifying) || page_pending {
                out.push(run);
            }
        }
        Ok(out)
    }

    pub fn run_count(&self) -> usize {
        self.inner.runs.len()
    }

    /// Size of both databases on disk, for benchmarks and metrics.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0) + self.inner.history.size_on_disk().unwrap_or(0)
    }
}

/// The file whose `fdatasync` follows each flush of the database in `dir`, for `power`.
fn sync_file(dir: &Path, durability: Durability) -> Result<Option<std::fs::File>, StoreError> {
    match durability {
        Durability::Process => Ok(None),
        // sled 0.34 keeps its whole log in this one file; its snapshots it syncs itself.
        Durability::Power => {
            let path = dir.join("db");
            let file = std::fs::File::open(&path)
                .map_err(|source| StoreError::SyncFile { path, source })?;
            Ok(Some(file))
        }
    }
}

/// Moves the trees an earlier version kept beside the intake (runs, guards, outbox) into the
/// history database: copied, the copy flushed, and only then dropped from the first, so a crash
/// midway leaves both copies and the next start copies again.
fn migrate(db: &sled::Db, history: &sled::Db) -> Result<(), StoreError> {
    let names: Vec<sled::IVec> = db
        .tree_names()
        .into_iter()
        .filter(|n| n != &db.name() && &**n != b"intake")
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let mut entries = 0;
    for name in &names {
        let to = history.open_tree(name)?;
        for kv in db.open_tree(name)?.iter() {
            let (k, v) = kv?;
            to.insert(k, v)?;
            entries += 1;
        }
    }
    history.flush()?;
    for name in &names {
        db.drop_tree(name)?;
    }
    db.flush()?;
    tracing::info!(
        trees = names.len(),
        entries,
        "moved the history out of the intake's database into {HISTORY_DIR}/"
    );
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|source| StoreError::Corrupt {
        key: format!("{key:02x?}"),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::decode_webhook;

    fn alert() -> Alert {
        let body = include_str!("../../tests/fixtures/alertmanager-0.25-firing.json");
        decode_webhook(body.as_bytes()).unwrap().alerts.remove(0)
    }

    fn run(id: RunId, playbook: &str, outcome: Outcome) -> Run {
        Run::new(
            id,
            alert(),
            Some(playbook.into()),
            outcome,
            Timestamp::now(),
        )
    }

    #[test]
    fn a_database_in_use_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let second = Store::open(dir.path()).err().unwrap();
        assert!(matches!(second, StoreError::InUse(_)), "{second}");
        assert!(
            second.to_string().contains("is in use by another process"),
            "{second}"
        );
    }

    #[test]
    fn run_ids_round_trip_and_sort_by_sequence() {
        let id: RunId = "42-1".parse().unwrap();
        assert_eq!(id, RunId { seq: 42, index: 1 });
        assert_eq!(id.to_string(), "42-1");
        assert!(RunId { seq: 9, index: 0 }.key() < RunId { seq: 10, index: 0 }.key());
        assert!("42".parse::<RunId>().is_err());
    }

    #[tokio::test]
    async fn power_durability_opens_sleds_log_and_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(dir.path(), Durability::Power).unwrap();
        let accepted = store.accept(vec![alert()], Timestamp::now()).await.unwrap();
        assert_eq!(accepted.len(), 1);
        assert_eq!(store.pending_intake().unwrap().len(), 1);
        store.durable().await.unwrap();
    }

    #[tokio::test]
    async fn an_alerts_runs_count_as_recorded_only_with_run_zero_and_a_partial_set_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = |seq, index| RunId { seq, index };
        // A crash after run 7-1 was written, before run 7-0: a partial set.
        store
            .put_run(&run(id(7, 1), "b", Outcome::Running))
            .unwrap();
        assert!(!store.intake_recorded(7).unwrap());
        assert!(
            store.get_run(id(7, 1)).unwrap().is_none(),
            "partial set removed"
        );
        // put_runs writes index 0 last, whatever the order given.
        store
            .put_runs(&[
                run(id(8, 0), "a", Outcome::Running),
                run(id(8, 1), "b", Outcome::Running),
            ])
            .unwrap();
        assert!(store.intake_recorded(8).unwrap());
        assert!(store.get_run(id(8, 1)).unwrap().is_some());
    }

    #[tokio::test]
    async fn accepted_alerts_stay_pending_until_removed_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let accepted = store
                .accept(vec![alert(), alert()], Timestamp::now())
                .await
                .unwrap();
            assert_eq!(
                accepted.iter().map(|i| i.seq).collect::<Vec<_>>(),
                vec![1, 2]
            );
            store.remove_intake(1).unwrap();
            store
                .put_run(&run(RunId { seq: 1, index: 0 }, "p", Outcome::Succeeded))
                .unwrap();
            store.durable().await.unwrap();
        }
        let store = reopen(dir.path()).await;
        let pending = store.pending_intake().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].seq, 2);
        let next = store.accept(vec![alert()], Timestamp::now()).await.unwrap();
        assert_eq!(next[0].seq, 3, "sequence numbers continue after a restart");
    }

    #[tokio::test]
    async fn run_ids_are_never_reused_after_the_history_is_pruned_empty() {
        let dir = tempfile::tempdir().unwrap();
        let used = {
            let store = Store::open(dir.path()).unwrap();
            let seqs: Vec<u64> = store
                .accept(vec![alert(), alert(), alert()], Timestamp::now())
                .await
                .unwrap()
                .iter()
                .map(|i| i.seq)
                .collect();
            for &seq in &seqs {
                store
                    .put_run(&run(RunId { seq, index: 0 }, "p", Outcome::Failed))
                    .unwrap();
                store.remove_intake(seq).unwrap();
            }
            store.durable().await.unwrap();
            assert_eq!(store.prune_runs(Timestamp::MAX, 0).unwrap().0, 3);
            store.durable().await.unwrap();
            assert!(store.pending_intake().unwrap().is_empty());
            *seqs.last().unwrap()
        };
        let store = reopen(dir.path()).await;
        assert_eq!(store.run_count(), 0, "pruned empty");
        let next = store.accept(vec![alert()], Timestamp::now()).await.unwrap();
        assert!(
            next[0].seq > used,
            "{} reuses a number up to {used}",
            next[0].seq
        );
    }

    #[tokio::test]
    async fn after_a_crash_numbering_goes_on_above_every_number_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Past the first reserved block, so the mark had to move while running.
        let mut last = 0;
        for _ in 0..3 {
            let batch = vec![alert(); 1000];
            last = store.accept(batch, Timestamp::now()).await.unwrap()[999].seq;
        }
        store.inner.next_seq.fetch_add(SEQ_BLOCK, Ordering::Relaxed);
        let far = store.accept(vec![alert()], Timestamp::now()).await.unwrap()[0].seq;
        assert!(far > SEQ_BLOCK && far > last);
        // Every entry processed and gone, so only the mark remembers the numbers.
        for seq in (1..=last).chain([far]) {
            store.remove_intake(seq).unwrap();
        }
        store.durable().await.unwrap();
        assert!(store.pending_intake().unwrap().is_empty());
        // A crash: the mark left is the reserved one, not the exact next number. Copy the
        // directory while the store is open (what a SIGKILL leaves), then open the copy.
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        let reopened = reopen(copy.path()).await;
        let next = reopened
            .accept(vec![alert()], Timestamp::now())
            .await
            .unwrap()[0]
            .seq;
        assert!(next > far, "{next} <= {far}");
    }

    fn copy_dir(from: &Path, to: &Path) {
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                std::fs::create_dir_all(&target).unwrap();
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    /// Opens the store in `dir` once the flusher threads of a dropped one have let go of it.
    async fn reopen(dir: &Path) -> Store {
        loop {
            match Store::open(dir) {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    }

    #[tokio::test]
    async fn an_intake_entry_leaves_only_after_the_history_flush_and_survives_until_then() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let seq = store.accept(vec![alert()], Timestamp::now()).await.unwrap()[0].seq;
        store
            .put_run(&run(RunId { seq, index: 0 }, "p", Outcome::Succeeded))
            .unwrap();
        store.remove_intake(seq).unwrap();
        store.durable().await.unwrap();
        assert!(store.pending_intake().unwrap().is_empty());
        drop(store);
        let store = reopen(dir.path()).await;
        assert!(store.pending_intake().unwrap().is_empty());
        assert!(store.get_run(RunId { seq, index: 0 }).unwrap().is_some());
        assert!(dir.path().join(HISTORY_DIR).join("db").exists());
    }

    #[tokio::test]
    async fn a_database_from_before_the_split_moves_its_history_over() {
        let dir = tempfile::tempdir().unwrap();
        let id = RunId { seq: 7, index: 0 };
        {
            // What an earlier version left: intake, runs and the outbox in one database.
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let intake = Intake {
                seq: 8,
                received_at: Timestamp::now(),
                alert: alert(),
                held: false,
                refused: None,
                manual: None,
            };
            db.open_tree("intake")
                .unwrap()
                .insert(8u64.to_be_bytes(), serde_json::to_vec(&intake).unwrap())
                .unwrap();
            let bytes = serde_json::to_vec(&run(id, "p", Outcome::Running)).unwrap();
            db.open_tree("runs")
                .unwrap()
                .insert(id.key(), bytes)
                .unwrap();
            db.open_tree("outbox")
                .unwrap()
                .insert("page", "queued")
                .unwrap();
            db.flush().unwrap();
        }
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(
                store.get_run(id).unwrap().unwrap().outcome,
                Outcome::Running
            );
            assert_eq!(
                &*store.tree("outbox").unwrap().get("page").unwrap().unwrap(),
                b"queued"
            );
            assert_eq!(store.pending_intake().unwrap()[0].seq, 8);
            let next = store.accept(vec![alert()], Timestamp::now()).await.unwrap();
            assert_eq!(next[0].seq, 9);
        }
        // The first database keeps only the intake; opening again moves nothing twice.
        let store = reopen(dir.path()).await;
        assert_eq!(store.run_count(), 1);
        assert_eq!(store.pending_intake().unwrap().len(), 2);
        let names = store.inner.db.tree_names();
        assert!(
            names.iter().all(|n| &**n != b"runs" && &**n != b"outbox"),
            "{names:?}"
        );
    }

    #[tokio::test]
    async fn lists_newest_first_with_filters() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for seq in 1..=5 {
            let outcome = if seq % 2 == 0 {
                Outcome::Failed
            } else {
                Outcome::Succeeded
            };
            store
                .put_run(&run(
                    RunId { seq, index: 0 },
                    if seq < 3 { "a" } else { "b" },
                    outcome,
                ))
                .unwrap();
        }
        let all = store.list_runs(&RunFilter::default()).unwrap();
        assert_eq!(
            all.iter().map(|r| r.id.seq).collect::<Vec<_>>(),
            vec![5, 4, 3, 2, 1]
        );
        let failed = store
            .list_runs(&RunFilter {
                outcome: Some(Outcome::Failed),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            failed.iter().map(|r| r.id.seq).collect::<Vec<_>>(),
            vec![4, 2]
        );
        let a = store
            .list_runs(&RunFilter {
                playbook: Some("a".into()),
                limit: Some(1),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(a.iter().map(|r| r.id.seq).collect::<Vec<_>>(), vec![2]);
        assert!(store.intake_recorded(3).unwrap());
    }

    #[tokio::test]
    async fn retention_removes_the_oldest_runs_by_count_and_age() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = Timestamp::now();
        for seq in 1..=10 {
            let mut r = run(RunId { seq, index: 0 }, "p", Outcome::Succeeded);
            r.received_at = now - jiff::SignedDuration::from_hours(20 - seq as i64);
            store.put_run(&r).unwrap();
        }
        assert_eq!(store.prune_runs(Timestamp::MIN, 7).unwrap(), (3, 4));
        assert_eq!(store.run_count(), 7);
        // Runs 4..=7 were received more than 12 hours ago.
        let cutoff = now - jiff::SignedDuration::from_hours(12);
        assert_eq!(store.prune_runs(cutoff, 100).unwrap(), (4, 8));
        assert_eq!(store.run_count(), 3);
    }

    #[tokio::test]
    async fn pruning_steps_over_a_run_that_never_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = Timestamp::now();
        for seq in 1..=6 {
            let outcome = match seq {
                2 => Outcome::Running,
                3 => Outcome::Verifying,
                _ => Outcome::Succeeded,
            };
            let mut r = run(RunId { seq, index: 0 }, "p", outcome);
            r.received_at = now - jiff::SignedDuration::from_hours(48);
            store.put_run(&r).unwrap();
        }
        assert_eq!(store.prune_runs(now, 1_000).unwrap(), (4, 7));
        let left: Vec<u64> = store.all_runs().map(|r| r.unwrap().id.seq).collect();
        assert_eq!(left, vec![2, 3], "only the runs in progress stay");
    }
}
