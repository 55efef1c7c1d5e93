//! Group commit: one thread owns every flush (concurrent `flush_async` callers deadlock sled
//! 0.34, upstream sled#1308). Writers register after their insert, or hand the flusher their
//! inserts to apply; each flush answers every waiter that was registered before it started, so N
//! concurrent accepts cost one fsync, not N.
//!
//! The flusher is a plain thread calling sled's blocking `flush`, not a task awaiting
//! `flush_async`: `flush_async` hands each flush to sled's I/O pool as one more job, and in
//! upstream sled 0.34.7 each job woke all seven of the pool's idle threads (the vendored copy
//! wakes one; `vendor/sled/PATCHED.md`). In the vendored copy, `flush` also writes and syncs the
//! log buffer on this thread instead of waiting for a pool thread to do it.
//!
//! The intake's inserts are applied by the flusher too: the intake alone then costs ~20% less CPU
//! per alert (the load benchmark, docs/performance.md). Accepts arrive on every HTTP worker at once with ascending
//! keys, so inserted where they arrive they race for the tree's last leaf (sled retries a lost
//! compare-and-swap); one thread applying them just before its flush never races.
//!
//! The history database has a flusher of its own, which nobody waits for on the accept path: it
//! applies the intake's removals after the flush that makes the removed alerts' runs durable,
//! so an alert leaves the intake only once its runs are on disk.

use std::fs::File;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;

type Waiter = oneshot::Sender<Result<(), Arc<sled::Error>>>;

/// One insert for the flusher to apply before its next flush.
pub(crate) struct Insert {
    pub tree: sled::Tree,
    pub key: [u8; 8],
    pub value: Vec<u8>,
}

/// One removal for the flusher to apply once its next flush succeeded: what this database holds
/// when it is applied is on disk, whatever the removed key's own database is.
pub(crate) struct Remove {
    pub tree: sled::Tree,
    pub key: [u8; 8],
}

/// Inserts to apply before the next flush, and who waits for it. A job with neither only wakes
/// the flusher for queued removals.
struct Job {
    inserts: Vec<Insert>,
    waiter: Option<Waiter>,
}

/// Handle for waiting until earlier writes are durable. The flusher thread stops when the last
/// handle is dropped.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::Sender<Job>,
    /// Removals for after the next flush. Not sent through `tx`: a message per removal would
    /// wake the lingering flusher once per alert.
    removes: Arc<Mutex<Vec<Remove>>>,
    /// The first flush that failed. sled keeps an I/O error for the rest of the process (its
    /// "global error"), so every later flush fails too: only a restart reopens the database.
    failed: Arc<OnceLock<String>>,
}

fn closed() -> Arc<sled::Error> {
    Arc::new(sled::Error::ReportableBug(
        "group commit flusher stopped".into(),
    ))
}

impl GroupCommit {
    /// Starts the flusher thread `name`. With `sync_data`, every flush is followed by an
    /// `fdatasync` of that file (sled's log), so an answer also survives a kernel crash or power
    /// loss: sled's own flush syncs with `sync_file_range`, which neither flushes the disk's
    /// write cache nor the file's metadata (see [`crate::history::Durability`]). A failed
    /// `fdatasync` fails every later flush too: Linux may report a lost write-back once and then
    /// forget it, so a later sync that succeeds would not prove the earlier data durable.
    ///
    /// Removals that nobody waits for gather for `linger` before they are flushed, so that a
    /// steady stream of them costs one flush per `linger`, not one each.
    pub fn spawn(
        name: &str,
        db: sled::Db,
        sync_data: Option<File>,
        linger: Duration,
    ) -> std::io::Result<GroupCommit> {
        let (tx, rx) = mpsc::channel();
        let removes = Arc::new(Mutex::new(Vec::new()));
        let queued = Arc::clone(&removes);
        let failed = Arc::new(OnceLock::new());
        let failure = Arc::clone(&failed);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || flusher(db, sync_data, linger, rx, queued, failure))?;
        Ok(GroupCommit {
            tx,
            removes,
            failed,
        })
    }

    /// Why a flush failed, once one has: from then on the database takes no more writes.
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// Resolves once everything written before this call is on disk.
    pub async fn durable(&self) -> Result<(), Arc<sled::Error>> {
        self.insert_durable(Vec::new()).await
    }

    /// Applies `inserts` in order on the flusher thread and resolves once they are on disk. The
    /// first insert that fails is this call's error, and the inserts after it are not applied.
    pub(crate) async fn insert_durable(
        &self,
        inserts: Vec<Insert>,
    ) -> Result<(), Arc<sled::Error>> {
        let (waiter, rx) = oneshot::channel();
        self.tx
            .send(Job {
                inserts,
                waiter: Some(waiter),
            })
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Queues `remove` for after the next flush that succeeds, without waiting for it. A flush
    /// that fails drops the removals it would have applied.
    pub(crate) fn remove_after_flush(&self, remove: Remove) -> Result<(), Arc<sled::Error>> {
        let first = {
            let mut queue = self.removes.lock().unwrap();
            queue.push(remove);
            queue.len() == 1
        };
        if first {
            let wake = Job {
                inserts: Vec::new(),
                waiter: None,
            };
            self.tx.send(wake).map_err(|_| closed())?;
        }
        Ok(())
    }
}

/// Applies a job's inserts; returns its waiter to answer after the flush, or answers it with the
/// insert's error.
fn take(job: Job, waiting: &mut Vec<Waiter>) {
    let applied = job
        .inserts
        .into_iter()
        .try_for_each(|i| i.tree.insert(i.key, i.value).map(drop));
    match (applied, job.waiter) {
        (Ok(()), Some(waiter)) => waiting.push(waiter),
        (Ok(()), None) => {}
        (Err(e), waiter) => {
            tracing::error!(error = %e, "sled insert failed");
            if let Some(waiter) = waiter {
                let _ = waiter.send(Err(Arc::new(e)));
            }
        }
    }
}

fn flusher(
    db: sled::Db,
    sync_data: Option<File>,
    linger: Duration,
    rx: mpsc::Receiver<Job>,
    removes: Arc<Mutex<Vec<Remove>>>,
    failed: Arc<OnceLock<String>>,
) {
    // The waiters to answer once the flush is done.
    let mut waiting = Vec::new();
    let mut sync_failed: Option<Arc<sled::Error>> = None;
    let mut open = true;
    while open {
        match rx.recv() {
            Ok(job) => take(job, &mut waiting),
            // The last handle is gone: what was queued before still gets its flush.
            Err(_) => open = false,
        }
        if open && waiting.is_empty() && !linger.is_zero() {
            // Woken for removals: nobody waits, so let more of them gather first.
            match rx.recv_timeout(linger) {
                Ok(job) => take(job, &mut waiting),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
        }
        while let Ok(job) = rx.try_recv() {
            take(job, &mut waiting);
        }
        // Taken before the flush: each was queued after its own writes, which this flush covers.
        let removes = std::mem::take(&mut *removes.lock().unwrap());
        if !(waiting.is_empty() && removes.is_empty()) {
            flush(
                &db,
                sync_data.as_ref(),
                &mut sync_failed,
                &mut waiting,
                removes,
                &failed,
            );
        }
    }
    tracing::debug!("group commit flusher stopped: no writers left");
}

/// One flush (and sync): on success the removals are applied; then every waiter is answered.
fn flush(
    db: &sled::Db,
    sync_data: Option<&File>,
    sync_failed: &mut Option<Arc<sled::Error>>,
    waiting: &mut Vec<Waiter>,
    removes: Vec<Remove>,
    failed: &OnceLock<String>,
) {
    let result = db
        .flush()
        .map(drop)
        .map_err(Arc::new)
        .and_then(|()| sync_log(sync_data, sync_failed));
    match &result {
        Ok(()) => {
            for r in removes {
                if let Err(e) = r.tree.remove(r.key) {
                    tracing::error!(error = %e, "sled remove failed");
                }
            }
        }
        Err(e) => {
            tracing::error!(
                error = %e,
                dropped_removals = removes.len(),
                "group commit failed"
            );
            let _ = failed.set(e.to_string());
        }
    }
    for waiter in waiting.drain(..) {
        let _ = waiter.send(result.clone());
    }
}

/// `fdatasync`s the log, if asked to; once that failed, fails every time (see [`GroupCommit::spawn`]).
fn sync_log(
    file: Option<&File>,
    failed: &mut Option<Arc<sled::Error>>,
) -> Result<(), Arc<sled::Error>> {
    if let Some(e) = failed {
        return Err(Arc::clone(e));
    }
    let Some(file) = file else {
        return Ok(());
    };
    file.sync_data().map_err(|e| {
        let e = Arc::new(sled::Error::Io(e));
        tracing::error!(error = %e, "fdatasync of the database log failed; every later accept fails too");
        *failed = Some(Arc::clone(&e));
        e
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert(tree: &sled::Tree, key: u64, value: &[u8]) -> Insert {
        Insert {
            tree: tree.clone(),
            key: key.to_be_bytes(),
            value: value.to_vec(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_each_get_their_inserts_applied_in_order_and_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        let commit = GroupCommit::spawn("test-flush", db.clone(), None, Duration::ZERO).unwrap();
        let tasks: Vec<_> = (0u64..64)
            .map(|i| {
                let (commit, tree) = (commit.clone(), tree.clone());
                tokio::spawn(async move {
                    // Two inserts of one key in one call: the second wins.
                    commit
                        .insert_durable(vec![
                            insert(&tree, i, b"first"),
                            insert(&tree, i, b"second"),
                        ])
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        commit.durable().await.unwrap();
        assert_eq!(tree.len(), 64);
        assert!(tree.iter().values().all(|v| &*v.unwrap() == b"second"));
    }

    #[tokio::test]
    async fn removals_wait_for_a_flush_that_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        tree.insert(1u64.to_be_bytes(), "a").unwrap();
        tree.insert(2u64.to_be_bytes(), "b").unwrap();
        let remove = |key: u64| Remove {
            tree: tree.clone(),
            key: key.to_be_bytes(),
        };
        // Removals alone linger (an hour here) until someone waits for a flush.
        let commit =
            GroupCommit::spawn("test-flush", db.clone(), None, Duration::from_secs(3600)).unwrap();
        commit.remove_after_flush(remove(1)).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(tree.contains_key(1u64.to_be_bytes()).unwrap());
        commit.durable().await.unwrap();
        assert!(!tree.contains_key(1u64.to_be_bytes()).unwrap());

        // A flush whose sync fails drops its removals: the entry stays.
        let unsyncable = File::open("/dev/null").unwrap();
        let failing =
            GroupCommit::spawn("test-flush", db.clone(), Some(unsyncable), Duration::ZERO).unwrap();
        failing.remove_after_flush(remove(2)).unwrap();
        assert!(failing.durable().await.is_err());
        assert!(tree.contains_key(2u64.to_be_bytes()).unwrap());
        assert!(failing.failure().is_some(), "a failed flush is remembered");
        assert_eq!(commit.failure(), None);
    }

    #[tokio::test]
    async fn a_failed_fdatasync_fails_the_waiters_instead_of_answering_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        // Linux refuses to sync /dev/null (EINVAL): a stand-in for a disk that fails the sync.
        let unsyncable = File::open("/dev/null").unwrap();
        let commit =
            GroupCommit::spawn("test-flush", db.clone(), Some(unsyncable), Duration::ZERO).unwrap();
        let err = commit
            .insert_durable(vec![insert(&tree, 1, b"alert")])
            .await
            .unwrap_err();
        assert!(
            matches!(&*err, sled::Error::Io(e) if e.kind() == std::io::ErrorKind::InvalidInput)
        );
        assert!(commit.durable().await.is_err());

        // The same database with its own log as the file to sync: answered.
        let log = File::open(dir.path().join("db")).unwrap();
        let commit =
            GroupCommit::spawn("test-flush", db.clone(), Some(log), Duration::ZERO).unwrap();
        commit
            .insert_durable(vec![insert(&tree, 2, b"alert")])
            .await
            .unwrap();
    }
}
