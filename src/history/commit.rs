//! Group commit: one thread owns every flush (concurrent `flush_async` callers deadlock sled
//! 0.34, upstream sled#1308). Writers register after their insert; each flush answers every waiter
//! that was registered before it started, so N concurrent accepts cost one fsync, not N.
//!
//! The flusher is a plain thread calling sled's blocking `flush`, not a task awaiting
//! `flush_async`: `flush_async` hands each flush to sled's I/O pool, whose every job wakes all of
//! its idle threads, and under load those wake-ups cost more CPU than the fsyncs themselves.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

type Waiter = oneshot::Sender<Result<(), Arc<sled::Error>>>;

/// Handle for waiting until earlier writes are durable. The flusher thread stops when the last
/// handle is dropped.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<Waiter>,
}

impl GroupCommit {
    pub fn spawn(db: sled::Db) -> std::io::Result<GroupCommit> {
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("reactor-flush".into())
            .spawn(move || flusher(db, rx))?;
        Ok(GroupCommit { tx })
    }

    /// Resolves once everything written before this call is on disk.
    pub async fn durable(&self) -> Result<(), Arc<sled::Error>> {
        let (tx, rx) = oneshot::channel();
        let closed = || {
            Arc::new(sled::Error::ReportableBug(
                "group commit flusher stopped".into(),
            ))
        };
        self.tx.send(tx).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

fn flusher(db: sled::Db, mut rx: mpsc::UnboundedReceiver<Waiter>) {
    let mut batch = Vec::new();
    while rx.blocking_recv_many(&mut batch, 4096) > 0 {
        let result = db.flush().map(|_| ()).map_err(Arc::new);
        if let Err(e) = &result {
            tracing::error!(error = %e, "sled flush failed");
        }
        for w in batch.drain(..) {
            let _ = w.send(result.clone());
        }
    }
    tracing::debug!("group commit flusher stopped: no writers left");
}
