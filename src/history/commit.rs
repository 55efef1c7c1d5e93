//! Group commit: one task owns every `flush_async` call (concurrent callers deadlock sled 0.34,
//! upstream sled#1308). Writers register after their insert; each flush answers every waiter that
//! was registered before it started, so N concurrent accepts cost one fsync, not N.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

type Waiter = oneshot::Sender<Result<(), Arc<sled::Error>>>;

/// Handle for waiting until earlier writes are durable. The flusher task stops when the last
/// handle is dropped.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<Waiter>,
}

impl GroupCommit {
    pub fn spawn(db: sled::Db) -> GroupCommit {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(flusher(db, rx));
        GroupCommit { tx }
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

async fn flusher(db: sled::Db, mut rx: mpsc::UnboundedReceiver<Waiter>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 4096).await > 0 {
        let result = db.flush_async().await.map(|_| ()).map_err(Arc::new);
        if let Err(e) = &result {
            tracing::error!(error = %e, "sled flush failed");
        }
        for w in batch.drain(..) {
            let _ = w.send(result.clone());
        }
    }
    tracing::debug!("group commit flusher stopped: no writers left");
}
