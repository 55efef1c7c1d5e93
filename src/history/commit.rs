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
//! per alert (README, Performance). Accepts arrive on every HTTP worker at once with ascending
//! keys, so inserted where they arrive they race for the tree's last leaf (sled retries a lost
//! compare-and-swap); one thread applying them just before its flush never races.

use std::fs::File;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

type Waiter = oneshot::Sender<Result<(), Arc<sled::Error>>>;

/// One insert for the flusher to apply before its next flush.
pub(crate) struct Insert {
    pub tree: sled::Tree,
    pub key: [u8; 8],
    pub value: Vec<u8>,
}

/// A waiter, and the inserts to apply before answering it.
struct Job {
    inserts: Vec<Insert>,
    waiter: Waiter,
}

/// Handle for waiting until earlier writes are durable. The flusher thread stops when the last
/// handle is dropped.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<Job>,
}

impl GroupCommit {
    /// Starts the flusher thread. With `sync_data`, every flush is followed by an `fdatasync` of
    /// that file (sled's log), so an answer also survives a kernel crash or power loss: sled's
    /// own flush syncs with `sync_file_range`, which neither flushes the disk's write cache nor
    /// the file's metadata (see [`crate::history::Durability`]). A failed `fdatasync` fails every
    /// later flush too: Linux may report a lost write-back once and then forget it, so a later
    /// sync that succeeds would not prove the earlier data durable.
    pub fn spawn(db: sled::Db, sync_data: Option<File>) -> std::io::Result<GroupCommit> {
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("reactor-flush".into())
            .spawn(move || flusher(db, sync_data, rx))?;
        Ok(GroupCommit { tx })
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
        let closed = || {
            Arc::new(sled::Error::ReportableBug(
                "group commit flusher stopped".into(),
            ))
        };
        self.tx
            .send(Job { inserts, waiter })
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

fn flusher(db: sled::Db, sync_data: Option<File>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut batch: Vec<Job> = Vec::new();
    // The waiters still to answer once the flush is done.
    let mut waiting = Vec::new();
    let mut sync_failed: Option<Arc<sled::Error>> = None;
    while rx.blocking_recv_many(&mut batch, 4096) > 0 {
        for job in batch.drain(..) {
            let applied = job
                .inserts
                .into_iter()
                .try_for_each(|i| i.tree.insert(i.key, i.value).map(drop));
            match applied {
                Ok(()) => waiting.push(job.waiter),
                Err(e) => {
                    tracing::error!(error = %e, "sled insert failed");
                    let _ = job.waiter.send(Err(Arc::new(e)));
                }
            }
        }
        let result = db
            .flush()
            .map(drop)
            .map_err(Arc::new)
            .and_then(|()| sync_log(sync_data.as_ref(), &mut sync_failed));
        if let Err(e) = &result {
            tracing::error!(error = %e, "group commit failed");
        }
        for waiter in waiting.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }
    tracing::debug!("group commit flusher stopped: no writers left");
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
        let commit = GroupCommit::spawn(db.clone(), None).unwrap();
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
    async fn a_failed_fdatasync_fails_the_waiters_instead_of_answering_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        // Linux refuses to sync /dev/null (EINVAL): a stand-in for a disk that fails the sync.
        let unsyncable = File::open("/dev/null").unwrap();
        let commit = GroupCommit::spawn(db.clone(), Some(unsyncable)).unwrap();
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
        let commit = GroupCommit::spawn(db.clone(), Some(log)).unwrap();
        commit
            .insert_durable(vec![insert(&tree, 2, b"alert")])
            .await
            .unwrap();
    }
}
