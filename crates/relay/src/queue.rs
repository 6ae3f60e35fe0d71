//! The durable queue: envelopes and message data in redb, written by one thread that
//! groups concurrent writes into one fsync'd commit.
//!
//! A message is acknowledged with `250` only after the commit holding it returned with
//! `Durability::Immediate`. Removals after delivery and schedule updates are written with
//! `Durability::None` and become durable with the next immediate commit: a crash can at worst
//! deliver a message twice, never lose one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

const ENVELOPES: TableDefinition<u64, &[u8]> = TableDefinition::new("envelopes");
const DATA: TableDefinition<u64, &[u8]> = TableDefinition::new("data");
/// Most operations folded into one commit.
const MAX_BATCH: usize = 1024;

/// Why the queue cannot do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    /// Opening the database failed.
    #[error("cannot open queue {path}: {reason}")]
    Open {
        /// The queue directory.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
    /// A write or commit failed (disk full, I/O error); nothing of it was acknowledged.
    #[error("queue write failed: {0}")]
    Write(String),
    /// A read failed.
    #[error("queue read failed: {0}")]
    Read(String),
    /// The writer thread is gone (shutting down).
    #[error("queue is closed")]
    Closed,
}

/// One queued delivery unit: a message for the recipients of one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Queue ID, unique and increasing.
    pub id: u64,
    /// Envelope sender; empty for the null reverse path.
    pub sender: String,
    /// Recipient domain (lower case).
    pub domain: String,
    /// Recipients not yet delivered or failed.
    pub recipients: Vec<String>,
    /// When the relay accepted it, ms since the epoch.
    pub received_ms: u64,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// When to try next, ms since the epoch.
    pub next_attempt_ms: u64,
    /// Why the last attempt did not finish.
    pub last_error: Option<String>,
    /// Size of the data in bytes.
    pub size: u64,
    /// Whether the sender was told of a delay already.
    #[serde(default)]
    pub warned: bool,
}

impl Envelope {
    /// The queue ID as printed in logs and replies.
    pub fn queue_id(&self) -> String {
        format_id(self.id)
    }
}

/// A queue ID as text: 16 hex digits.
pub fn format_id(id: u64) -> String {
    format!("{id:016X}")
}

enum Op {
    Insert(Vec<(Envelope, Arc<Vec<u8>>)>),
    Update(Envelope),
    Remove(u64),
}

impl Op {
    fn needs_sync(&self) -> bool {
        match self {
            Op::Insert(_) => true,
            Op::Update(_) | Op::Remove(_) => false,
        }
    }
}

struct Request {
    op: Op,
    done: Option<oneshot::Sender<Result<(), QueueError>>>,
}

/// Handle to the queue; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    db: Arc<Database>,
    writer: mpsc::UnboundedSender<Request>,
    writer_thread: Arc<std::sync::Mutex<Option<thread::JoinHandle<()>>>>,
    next_id: Arc<AtomicU64>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

impl Queue {
    /// Opens (or creates) the queue in `dir` and returns it with every envelope it holds.
    pub fn open(dir: &Path) -> Result<(Queue, Vec<Envelope>), QueueError> {
        let open_err = |reason: String| QueueError::Open { path: dir.into(), reason };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let db = Database::create(dir.join("queue.redb")).map_err(|e| open_err(e.to_string()))?;
        let mut envelopes = Vec::new();
        {
            let tx = db.begin_write().map_err(|e| open_err(e.to_string()))?;
            tx.open_table(ENVELOPES).map_err(|e| open_err(e.to_string()))?;
            tx.open_table(DATA).map_err(|e| open_err(e.to_string()))?;
            tx.commit().map_err(|e| open_err(e.to_string()))?;
            let rx = db.begin_read().map_err(|e| open_err(e.to_string()))?;
            let table = rx.open_table(ENVELOPES).map_err(|e| open_err(e.to_string()))?;
            for row in table.iter().map_err(|e| open_err(e.to_string()))? {
                let (_, value) = row.map_err(|e| open_err(e.to_string()))?;
                let env: Envelope =
                    serde_json::from_slice(value.value()).map_err(|e| open_err(format!("corrupt envelope: {e}")))?;
                envelopes.push(env);
            }
        }
        let last = envelopes.iter().map(|e| e.id).max().unwrap_or(0);
        let db = Arc::new(db);
        let (tx, rx) = mpsc::unbounded_channel();
        let writer_db = db.clone();
        let handle = thread::Builder::new()
            .name("queue-writer".into())
            .spawn(move || writer(&writer_db, rx))
            .map_err(|e| open_err(e.to_string()))?;
        let next_id = Arc::new(AtomicU64::new(last.max(now_ms() << 12) + 1));
        Ok((Queue { db, writer: tx, writer_thread: Arc::new(std::sync::Mutex::new(Some(handle))), next_id }, envelopes))
    }

    /// Writes what is pending and closes the database (the last handle must call this to
    /// reopen the same queue in-process).
    pub fn close(self) {
        let Queue { db, writer, writer_thread, .. } = self;
        drop(writer);
        let handle = writer_thread.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
        drop(db);
    }

    /// A fresh queue ID: larger than every ID before it, also across restarts.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Stores envelopes and their data durably; returns once they are on disk.
    pub async fn insert(&self, items: Vec<(Envelope, Arc<Vec<u8>>)>) -> Result<(), QueueError> {
        self.request(Op::Insert(items)).await
    }

    /// Records a new schedule or recipient list (not waited for; durable with the next insert).
    pub fn update(&self, env: Envelope) {
        let _ = self.writer.send(Request { op: Op::Update(env), done: None });
    }

    /// Forgets a finished envelope (not waited for; durable with the next insert).
    pub fn remove(&self, id: u64) {
        let _ = self.writer.send(Request { op: Op::Remove(id), done: None });
    }

    /// Waits until every earlier request has been written (used on shutdown and in tests).
    pub async fn flush(&self) -> Result<(), QueueError> {
        self.request(Op::Insert(Vec::new())).await
    }

    async fn request(&self, op: Op) -> Result<(), QueueError> {
        let (done, wait) = oneshot::channel();
        self.writer.send(Request { op, done: Some(done) }).map_err(|_| QueueError::Closed)?;
        wait.await.map_err(|_| QueueError::Closed)?
    }

    /// The message data of an envelope.
    pub fn read_data(&self, id: u64) -> Result<Vec<u8>, QueueError> {
        let rx = self.db.begin_read().map_err(|e| QueueError::Read(e.to_string()))?;
        let table = rx.open_table(DATA).map_err(|e| QueueError::Read(e.to_string()))?;
        let value = table.get(id).map_err(|e| QueueError::Read(e.to_string()))?;
        value.map(|v| v.value().to_vec()).ok_or_else(|| QueueError::Read(format!("no data for {}", format_id(id))))
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn writer(db: &Database, mut rx: mpsc::UnboundedReceiver<Request>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let result = commit(db, &batch).map_err(QueueError::Write);
        if let Err(e) = &result {
            tracing::error!(error = %e, ops = batch.len(), "queue commit failed; nothing in it was acknowledged");
        }
        for req in batch.drain(..) {
            if let Some(done) = req.done {
                let _ = done.send(result.clone());
            }
        }
    }
}

fn commit(db: &Database, batch: &[Request]) -> Result<(), String> {
    let mut tx = db.begin_write().map_err(|e| e.to_string())?;
    let durability = if batch.iter().any(|r| r.op.needs_sync()) { Durability::Immediate } else { Durability::None };
    tx.set_durability(durability).map_err(|e| e.to_string())?;
    {
        let mut envelopes = tx.open_table(ENVELOPES).map_err(|e| e.to_string())?;
        let mut data = tx.open_table(DATA).map_err(|e| e.to_string())?;
        for req in batch {
            match &req.op {
                Op::Insert(items) => {
                    for (env, bytes) in items {
                        let json = serde_json::to_vec(env).map_err(|e| e.to_string())?;
                        envelopes.insert(env.id, json.as_slice()).map_err(|e| e.to_string())?;
                        data.insert(env.id, bytes.as_slice()).map_err(|e| e.to_string())?;
                    }
                }
                Op::Update(env) => {
                    // An update racing a removal must not resurrect the envelope.
                    if envelopes.get(env.id).map_err(|e| e.to_string())?.is_some() {
                        let json = serde_json::to_vec(env).map_err(|e| e.to_string())?;
                        envelopes.insert(env.id, json.as_slice()).map_err(|e| e.to_string())?;
                    }
                }
                Op::Remove(id) => {
                    envelopes.remove(*id).map_err(|e| e.to_string())?;
                    data.remove(*id).map_err(|e| e.to_string())?;
                }
            }
        }
    }
    tx.commit().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(q: &Queue, rcpt: &str) -> Envelope {
        Envelope {
            id: q.next_id(),
            sender: "a@src.test".into(),
            domain: "customer.test".into(),
            recipients: vec![rcpt.into()],
            received_ms: now_ms(),
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
            size: 5,
            warned: false,
        }
    }

    #[tokio::test]
    async fn insert_survives_reopen_and_remove_is_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (kept, removed) = {
            let (q, existing) = Queue::open(dir.path()).expect("open");
            assert!(existing.is_empty());
            let a = envelope(&q, "a@customer.test");
            let b = envelope(&q, "b@customer.test");
            q.insert(vec![(a.clone(), Arc::new(b"hello".to_vec())), (b.clone(), Arc::new(b"world".to_vec()))])
                .await
                .expect("insert");
            q.remove(b.id);
            let mut a2 = a.clone();
            a2.attempts = 1;
            q.update(a2.clone());
            q.flush().await.expect("flush");
            q.close();
            (a2, b)
        };
        let (q, existing) = Queue::open(dir.path()).expect("reopen");
        assert_eq!(existing, vec![kept.clone()]);
        assert_eq!(q.read_data(kept.id).expect("data"), b"hello");
        assert!(q.read_data(removed.id).is_err());
        assert!(q.next_id() > kept.id);
    }
}
