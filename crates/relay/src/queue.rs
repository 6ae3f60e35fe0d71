//! The durable queue: a write-ahead journal for durability, redb as the index.
//!
//! A message is acknowledged with `250` only after the journal record holding it is on disk:
//! the writer thread folds concurrent inserts into one group commit, one `write` and one
//! `fdatasync` for all of them. The index thread puts the same operations into redb later,
//! in batches of about 20 ms. About once a second (a checkpoint) the writer starts a new
//! segment, and the segments before it are retired once redb holds their operations
//! durably. New mail waits for redb only when two full segments wait for a checkpoint (a
//! burst of large messages), for at most 10 s, and is refused with `452` at once if
//! checkpoints fail, or if no new segment can be started (a full disk); either clears by
//! itself once there is room. After a crash the segments left are replayed into redb at
//! startup; if the queue does not open for want of room (`ENOSPC`, `EDQUOT`, `EFBIG`), the
//! journal's spare segments (room held in reserve) are given back and it is tried once more.
//! Any other failure ([`OpenError`]) keeps them. A disk that failed under a checkpoint can
//! leave the index shorter than its header says (it is made longer, so that redb rolls back)
//! or damaged beyond redb's repair (it is made again from the journal while the journal
//! holds the queue's whole history). After a failed write the index is opened again only
//! once the disk takes a probe write.
//!
//! Removals after delivery and schedule updates are journaled without their own sync, within
//! moments, and become durable with the next group commit of new mail: a crash of the
//! machine can at worst deliver a message twice, never lose one. A relay killed alone (its
//! writes are in the page cache) delivers again at most what it delivered in its last
//! moments (some 20 ms).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use mxrelay_journal::{self as journal, Batch, Journal, Next, Record, SegmentEnd, SegmentReader};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::dsn::DsnRequest;

const ENVELOPES: TableDefinition<u64, &[u8]> = TableDefinition::new("envelopes");
const DATA: TableDefinition<u64, &[u8]> = TableDefinition::new("data");

/// Why the queue cannot do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    /// The queue did not open.
    #[error("cannot open queue {path}: {source}")]
    Open {
        /// The queue directory.
        path: PathBuf,
        /// The cause.
        source: Arc<OpenError>,
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

/// Why the queue did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The queue's directories could not be made, or a damaged index not moved aside.
    #[error("{0}")]
    Directory(std::io::Error),
    /// The index (redb) could not be opened, read, or brought up to date from the journal.
    #[error("index: {0}")]
    Index(#[from] redb::Error),
    /// The index is damaged beyond redb's repair, and the journal no longer holds all of its
    /// mail (a segment was retired), so it cannot be made again without loss.
    #[error(
        "the index {} is damaged beyond repair ({why}), and the journal no longer holds all the mail it held. \
         Restore it from a backup; or, to start with what the journal holds and give up the mail only the index held, \
         move it aside",
        path.display()
    )]
    IndexDamaged {
        /// `queue.redb`.
        path: PathBuf,
        /// redb's words.
        why: String,
    },
    /// A journal segment could not be listed, read, retired or started.
    #[error("journal: {0}")]
    Journal(#[from] journal::JournalError),
    /// An envelope in the index does not parse.
    #[error("corrupt envelope: {0}")]
    CorruptEnvelope(serde_json::Error),
    /// The index file's length could not be restored (see `restore_index_length`).
    #[error("restoring the index file's length: {0}")]
    IndexLength(std::io::Error),
    /// One of the queue's threads could not be started.
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
    /// Another process holds the queue's lock.
    #[error("{} is in use by another process (another mxrelay?): each relay needs a queue directory of its own", .0.display())]
    InUse(PathBuf),
}

impl OpenError {
    /// Whether the disk (or the user's quota or file-size limit) is out of room, so that
    /// room held in reserve may let the queue open.
    fn out_of_room(&self) -> bool {
        let io = match self {
            OpenError::Directory(e) | OpenError::IndexLength(e) | OpenError::Index(redb::Error::Io(e)) => Some(e),
            OpenError::Journal(journal::JournalError::Io { source, .. }) => Some(source),
            OpenError::Index(_)
            | OpenError::IndexDamaged { .. }
            | OpenError::Journal(_)
            | OpenError::CorruptEnvelope(_)
            | OpenError::Thread(_)
            | OpenError::InUse(_) => None,
        };
        io.is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded | std::io::ErrorKind::FileTooLarge
            )
        })
    }
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
    /// The sender's DSN requests (RFC 3461), when it made any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsn: Option<Box<DsnRequest>>,
    /// Kept without delivery attempts until an operator releases it (`queue hold`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
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

/// Folded into one group commit at most.
const MAX_BATCH: usize = 1024;
/// Journaled operations are handed to the indexer when this many are waiting (or after
/// [`Timing::apply_after`]).
const APPLY_MAX_OPS: usize = 2048;
/// Full journal segments that may wait for a checkpoint before new mail waits too (or is
/// refused, if checkpoints fail).
const MAX_SEGMENTS_BEHIND: u64 = 2;
/// How long a removal or update may wait for the writer at most, about. A writer that waits
/// longer (for the next checkpoint) is woken for it, so that a message delivered is written
/// off moments later: a relay killed meanwhile would deliver it again. Under load the writer
/// never waits this long, so the wake-up costs nothing there.
const DEFERRED_WAIT: Duration = Duration::from_millis(20);
/// How long one round of the writer may take before intake takes the queue's disk for hung
/// ([`Queue::stalled_for`]): far longer than any sync of a working disk. `/healthz` waits as
/// long for the writer, so it reports the writer unresponsive when sessions refuse mail.
pub const STALLED_AFTER: Duration = Duration::from_secs(5);

/// How far redb has caught up with the journal: set by the indexer, waited on by the writer.
#[derive(Debug, Default)]
struct IndexProgress {
    state: Mutex<Checkpointed>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Checkpointed {
    /// Every segment up to this one is in redb durably.
    through: u64,
    /// Why the last write to redb failed, if it did.
    failure: Option<String>,
}

impl IndexProgress {
    fn starting_at(through: u64) -> IndexProgress {
        IndexProgress { state: Mutex::new(Checkpointed { through, failure: None }), changed: Condvar::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Checkpointed> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a write to redb, and wakes a writer waiting for the index: one that failed
    /// makes a waiting writer refuse new mail at once, instead of waiting for a checkpoint
    /// queued behind more failing writes.
    fn wrote(&self, result: &Result<(), String>) {
        self.lock().failure = result.as_ref().err().cloned();
        self.changed.notify_all();
    }

    /// Records a checkpoint through segment `through`, and wakes a writer waiting for it.
    fn checkpointed(&self, through: u64) {
        let mut state = self.lock();
        state.through = state.through.max(through);
        self.changed.notify_all();
    }
}

/// When the writer moves journaled operations on to redb.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// Journaled operations wait at most this long before they are written to redb.
    apply_after: Duration,
    /// How often the writer starts a new segment, so that the ones before it can be retired.
    checkpoint_every: Duration,
    /// How long new mail may wait for a checkpoint before it is refused after all: its
    /// senders wait for their reply meanwhile.
    max_index_wait: Duration,
    /// [`STALLED_AFTER`], shorter in tests.
    stalled_after: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            apply_after: Duration::from_millis(20),
            checkpoint_every: Duration::from_secs(1),
            max_index_wait: Duration::from_secs(10),
            stalled_after: STALLED_AFTER,
        }
    }
}

enum Op {
    Insert(Vec<(Envelope, Arc<Vec<u8>>)>),
    Update(Envelope),
    Remove(u64),
    /// Everything before it is written to redb and committed durably.
    Checkpoint,
    /// Deferred updates or removals are waiting (sent only to a writer asleep without a timer).
    Wake,
    /// Answered once the writer has handled what came before it, so it is alive (the
    /// watchdog, `/healthz`): with why new mail is refused now, if it is.
    Ping(oneshot::Sender<Option<String>>),
}

struct Request {
    op: Op,
    done: Option<oneshot::Sender<Result<(), QueueError>>>,
}

/// A queue operation with its envelope serialized: journaled as it is, then written to redb.
enum Pending {
    Insert { id: u64, envelope: Vec<u8>, data: Arc<Vec<u8>> },
    Update { id: u64, envelope: Vec<u8> },
    Remove(u64),
}

impl Pending {
    fn id(&self) -> u64 {
        match self {
            Pending::Insert { id, .. } | Pending::Update { id, .. } | Pending::Remove(id) => *id,
        }
    }

    /// The same operation as a journal record: what is journaled and what replay applies.
    fn record(&self) -> Record<'_> {
        match self {
            Pending::Insert { id, envelope, data } => Record::Insert { id: *id, envelope, data },
            Pending::Update { id, envelope } => Record::Update { id: *id, envelope },
            Pending::Remove(id) => Record::Remove { id: *id },
        }
    }
}

/// Message data journaled but not yet in redb, for [`Queue::read_data`].
type Unapplied = Arc<Mutex<HashMap<u64, Arc<Vec<u8>>>>>;

/// redb behind a lock, so that the index thread can open it again: after an I/O error (a
/// full disk) redb refuses every later transaction on the same handle.
struct Index {
    path: PathBuf,
    db: RwLock<Option<Database>>,
    /// The queue's lock, held as long as the index is (see [`lock_queue`]).
    _lock: Arc<std::fs::File>,
}

impl Index {
    fn new(path: PathBuf, db: Database, lock: Arc<std::fs::File>) -> Index {
        Index { path, db: RwLock::new(Some(db)), _lock: lock }
    }

    /// Runs `f` on the database; its transactions end inside `f`.
    fn with<T>(&self, f: impl FnOnce(&Database) -> Result<T, String>) -> Result<T, String> {
        match self.db.read().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref() {
            Some(db) => f(db),
            None => Err("the queue index could not be opened again after a write error".into()),
        }
    }

    /// Closes the handle and opens the file again. redb locks its file, so the old handle
    /// goes first; no transaction outlives [`Index::with`], so none holds it.
    fn reopen(&self) -> Result<(), String> {
        // Not while the disk loses writes: opening again runs redb's repair, which commits,
        // and on a disk that fails under it (storage run out below the filesystem) repeated
        // repairs left both of redb's commit slots pointing at pages that never landed. A
        // small write and sync that succeed say the disk takes writes again.
        probe_writes(&self.path).map_err(|e| format!("the queue's disk does not take writes yet: {e}"))?;
        let mut slot = self.db.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = None;
        *slot = Some(open_index(&self.path).map_err(|e| e.to_string())?);
        tracing::info!("queue index opened again after a write error");
        Ok(())
    }
}

/// Writes a block to a new file next to `index` and syncs it: whether the disk takes writes.
fn probe_writes(index: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let probe = index.with_file_name("write-probe");
    let written = std::fs::File::create(&probe).and_then(|f| f.write_all_at(&[0; 4096], 0).and_then(|()| f.sync_data()));
    let _ = std::fs::remove_file(&probe);
    written
}

/// redb's page cache, in bytes. Its default (1 GiB) keeps every page written since the start
/// in memory, message data included, so RSS grew with the mail that passed through. Delivery
/// reads a message's data once, and reads after a restart are sequential: the kernel's page
/// cache serves them as well.
const INDEX_CACHE_BYTES: usize = 8 << 20;

fn open_index(path: &Path) -> Result<Database, redb::DatabaseError> {
    redb::Builder::new().set_cache_size(INDEX_CACHE_BYTES).create(path)
}

/// The start of redb's file header (file format 3): its magic number, then, after the god
/// byte and two bytes of padding, the little-endian `u32` layout fields the file's length
/// follows from.
const INDEX_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
const INDEX_HEADER_BYTES: usize = 32;

/// How long redb's header says its file is (one page of header, then the full regions and
/// a trailing partial one), and its page size, if `header` is a redb header; `None` for
/// anything else, which redb itself then judges.
fn index_length_in_header(header: &[u8; INDEX_HEADER_BYTES]) -> Option<(u64, u64)> {
    if header[..INDEX_MAGIC.len()] != INDEX_MAGIC {
        return None;
    }
    let field = |at: usize| header[at..at + 4].try_into().ok().map(|b| u64::from(u32::from_le_bytes(b)));
    let (page, region_header_pages, region_data_pages) = (field(12)?, field(16)?, field(20)?);
    let (full_regions, trailing_data_pages) = (field(24)?, field(28)?);
    let region = region_header_pages.checked_add(region_data_pages)?.checked_mul(page)?;
    let (regions, last) = match trailing_data_pages {
        0 => (full_regions, region),
        pages => (full_regions + 1, region_header_pages.checked_add(pages)?.checked_mul(page)?),
    };
    let length = page.checked_add(regions.checked_sub(1)?.checked_mul(region)?)?.checked_add(last)?;
    Some((length, page))
}

/// Takes the queue's lock, an `flock` on `DIR/lock`. The index and the journal writer hold it
/// until the last of them ends. redb's own lock is taken only when the index opens, after
/// the repair of the index file's length (`restore_index_length`), which may extend the file
/// the first relay is writing; this lock keeps a second relay from touching anything.
fn lock_queue(dir: &Path) -> Result<std::fs::File, OpenError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(OpenError::Directory)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(OpenError::InUse(dir.to_path_buf())),
        // A filesystem without locks (some FUSE ones) should not keep the relay from starting.
        Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
            tracing::warn!(queue = %dir.display(), error = %e, "the queue's filesystem has no file locks: nothing stops a second relay from using this queue too");
            Ok(file)
        }
        Err(std::fs::TryLockError::Error(e)) => Err(OpenError::Directory(e)),
    }
}

/// Makes the index file longer than its header says if it is shorter; returns the length it
/// had then. A disk that fails in a checkpoint (thin storage running out: `EIO`, and ext4
/// aborting its journal) can keep redb's header, a block overwritten in place, and lose the
/// file's growth, a metadata change that was not committed. redb then fails an assertion
/// (the relay could not start) instead of rolling back. With the file long enough its
/// recovery runs: the failed commit's pages, zeros now, fail their checksums, and it goes
/// back to the commit before; the journal, which that failed checkpoint did not retire, has
/// the rest. One page more than the header says makes the two lengths differ, which is what
/// starts redb's recovery.
fn restore_index_length(path: &Path) -> std::io::Result<Option<u64>> {
    use std::io::Read;
    let mut file = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        opened => opened?,
    };
    let mut header = [0u8; INDEX_HEADER_BYTES];
    if file.read_exact(&mut header).is_err() {
        return Ok(None);
    }
    let len = file.metadata()?.len();
    match index_length_in_header(&header) {
        Some((claimed, page)) if claimed > len => {
            file.set_len(claimed + page)?;
            file.sync_all()?;
            Ok(Some(len))
        }
        Some(_) | None => Ok(None),
    }
}

/// Handle to the queue; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    db: Arc<Index>,
    unapplied: Unapplied,
    writer: mpsc::Sender<Request>,
    /// Updates and removals, picked up by the writer when it next wakes.
    deferred: Deferred,
    writer_thread: Arc<Mutex<Option<thread::JoinHandle<()>>>>,
    next_id: Arc<AtomicU64>,
    status: Arc<WriterStatus>,
}

/// What sessions read of the writer without asking it (a writer stuck on the disk could not
/// answer): when its current round (a group commit and the timed work after it) began, and
/// whether new mail is refused.
#[derive(Debug)]
struct WriterStatus {
    epoch: Instant,
    stalled_after: Duration,
    /// Milliseconds from `epoch` to the round's start, plus one; 0 between rounds.
    started: AtomicU64,
    /// [`Writer::refusal`] as of the end of the last round, or of the last ping.
    refusing: AtomicBool,
}

impl WriterStatus {
    fn new(stalled_after: Duration) -> WriterStatus {
        WriterStatus { epoch: Instant::now(), stalled_after, started: AtomicU64::new(0), refusing: AtomicBool::new(false) }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn begin(&self) {
        self.started.store(self.now(), Ordering::Relaxed);
    }

    fn end(&self) {
        self.started.store(0, Ordering::Relaxed);
    }

    /// Publishes why new mail is refused, if it is, and passes it on.
    fn publish_refusal(&self, refusal: Option<String>) -> Option<String> {
        self.refusing.store(refusal.is_some(), Ordering::Relaxed);
        refusal
    }

    /// How long the round under way has taken, if one is.
    fn running_for(&self) -> Option<Duration> {
        match self.started.load(Ordering::Relaxed) {
            0 => None,
            started => Some(Duration::from_millis(self.now().saturating_sub(started))),
        }
    }
}

/// Updates and removals need no sync of their own, so they do not wake the writer (a
/// wake-up per delivered message would cost more than the write): it takes them with its
/// next group commit or timer. Only a writer asleep with no timer set is woken.
#[derive(Clone, Default)]
struct Deferred {
    ops: Arc<Mutex<Vec<Op>>>,
    /// The writer waits long, or without a deadline, and must be woken for deferred operations.
    writer_asleep: Arc<AtomicBool>,
}

impl Deferred {
    fn push(&self, op: Op, writer: &mpsc::Sender<Request>) {
        self.ops.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(op);
        if self.writer_asleep.swap(false, Ordering::SeqCst) {
            let _ = writer.send(Request { op: Op::Wake, done: None });
        }
    }

    fn take(&self) -> Vec<Op> {
        std::mem::take(&mut *self.ops.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Marks the writer awake: deferred operations wait for its next round.
    fn awake(&self) {
        self.writer_asleep.store(false, Ordering::SeqCst);
    }

    /// Marks the writer asleep unless something is waiting; true if it may sleep.
    fn may_sleep(&self) -> bool {
        self.writer_asleep.store(true, Ordering::SeqCst);
        let empty = self.ops.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_empty();
        if !empty {
            self.writer_asleep.store(false, Ordering::SeqCst);
        }
        empty
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

impl Queue {
    /// Opens (or creates) the queue in `dir`, replays the journal left by a crash, and
    /// returns the queue with every envelope it holds.
    pub fn open(dir: &Path) -> Result<(Queue, Vec<Envelope>), QueueError> {
        Queue::open_with(dir, Timing::default())
    }

    fn open_with(dir: &Path, timing: Timing) -> Result<(Queue, Vec<Envelope>), QueueError> {
        let opened = Queue::open_once(dir, timing).or_else(|first| {
            if !first.out_of_room() {
                return Err(first);
            }
            // After a crash on a full disk, replay into redb may need room that the journal's
            // spare segments hold only in reserve: given back, they let the relay start and
            // deliver, which frees more.
            match journal::release_spares(&dir.join("journal")) {
                Ok(released) if released > 0 => {
                    tracing::warn!(error = %first, released, "the queue did not open for want of room; gave back the journal's spare segments and trying again");
                    Queue::open_once(dir, timing)
                }
                Ok(_) | Err(_) => Err(first),
            }
        });
        opened.map_err(|e| QueueError::Open { path: dir.into(), source: Arc::new(e) })
    }

    fn open_once(dir: &Path, timing: Timing) -> Result<(Queue, Vec<Envelope>), OpenError> {
        let journal_dir = dir.join("journal");
        std::fs::create_dir_all(&journal_dir).map_err(OpenError::Directory)?;
        let lock = Arc::new(lock_queue(dir)?);
        let db_path = dir.join("queue.redb");
        let new_queue = !db_path.exists() && journal::segments(&journal_dir)?.is_empty();
        if let Some(was) = restore_index_length(&db_path).map_err(OpenError::IndexLength)? {
            tracing::warn!(index = %db_path.display(), was, "the queue index was shorter than its header says (a disk failed during a checkpoint); extended, so that it rolls back to its last whole commit and the journal replays the rest");
        }
        let db = match open_index(&db_path) {
            Ok(db) => db,
            // A disk that failed under a run of checkpoints can leave both of redb's commit
            // slots pointing at pages it never wrote. Nothing is lost while the journal still
            // holds every operation since the queue began: the index is made again from it.
            Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(why))) => {
                // Once a segment was retired, mail the index alone held would be lost.
                if !journal::holds_whole_history(&journal_dir) {
                    return Err(OpenError::IndexDamaged { path: db_path, why });
                }
                let aside = dir.join(format!("queue.redb.damaged-{}", now_ms()));
                std::fs::rename(&db_path, &aside).map_err(OpenError::Directory)?;
                tracing::warn!(why, damaged = %aside.display(), "the queue index is damaged beyond repair; set aside, and made again from the journal, which holds every operation since the queue began");
                open_index(&db_path).map_err(redb::Error::from)?
            }
            Err(e) => return Err(redb::Error::from(e).into()),
        };
        if new_queue {
            journal::mark_whole_history(&journal_dir)?;
        }
        let last_seq = replay(&db, &journal_dir)?;
        let journal = Journal::start(&journal_dir, last_seq + 1, 0)?;
        let mut envelopes = Vec::new();
        {
            let rx = db.begin_read().map_err(redb::Error::from)?;
            let table = rx.open_table(ENVELOPES).map_err(redb::Error::from)?;
            for row in table.iter().map_err(redb::Error::from)? {
                let (_, value) = row.map_err(redb::Error::from)?;
                let env: Envelope = serde_json::from_slice(value.value()).map_err(OpenError::CorruptEnvelope)?;
                envelopes.push(env);
            }
        }
        let last = envelopes.iter().map(|e| e.id).max().unwrap_or(0);
        let db = Arc::new(Index::new(db_path, db, lock.clone()));
        let unapplied = Unapplied::default();
        let deferred = Deferred::default();
        let (tx, rx) = mpsc::channel();
        let progress = Arc::new(IndexProgress::starting_at(last_seq));
        let (index, index_rx) = mpsc::channel();
        let mut indexer = Indexer {
            db: db.clone(),
            reopen_first: false,
            dir: journal_dir,
            pending: Vec::new(),
            unapplied: unapplied.clone(),
            progress: progress.clone(),
        };
        let indexer =
            thread::Builder::new().name("queue-index".into()).spawn(move || indexer.run(&index_rx)).map_err(OpenError::Thread)?;
        let status = Arc::new(WriterStatus::new(timing.stalled_after));
        let writer = Writer {
            _lock: lock,
            status: status.clone(),
            journal,
            timing,
            rotate_first: false,
            rotation_failure: None,
            progress,
            last_checkpoint: Instant::now(),
            unapplied: unapplied.clone(),
            to_index: Vec::new(),
            to_index_since: None,
            deferred: deferred.clone(),
            index,
            indexer,
            batch: Batch::default(),
        };
        let handle =
            thread::Builder::new().name("queue-writer".into()).spawn(move || writer.run(&rx)).map_err(OpenError::Thread)?;
        let next_id = Arc::new(AtomicU64::new(last.max(now_ms() << 12) + 1));
        let writer_thread = Arc::new(Mutex::new(Some(handle)));
        Ok((Queue { db, unapplied, writer: tx, deferred, writer_thread, next_id, status }, envelopes))
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

    /// How long the writer has been in one write, sync or checkpoint, once that is
    /// [`STALLED_AFTER`] or more: the disk hangs, and mail accepted now would wait as long.
    pub fn stalled_for(&self) -> Option<Duration> {
        self.status.running_for().filter(|d| *d >= self.status.stalled_after)
    }

    /// Whether new mail is refused for want of room (see [`Readiness::Refusing`]), as of the
    /// writer's last round: while it is, the writer has a round at least every
    /// `checkpoint_every`, so this clears within about a second of room coming back.
    ///
    /// [`Readiness::Refusing`]: crate::relay::Readiness::Refusing
    pub fn refusing(&self) -> bool {
        self.status.refusing.load(Ordering::Relaxed)
    }

    /// Stores envelopes and their data durably; returns once they are on disk.
    pub async fn insert(&self, items: Vec<(Envelope, Arc<Vec<u8>>)>) -> Result<(), QueueError> {
        self.request(Op::Insert(items)).await
    }

    /// Records a new schedule or recipient list (not waited for; durable with the next insert).
    pub fn update(&self, env: Envelope) {
        self.deferred.push(Op::Update(env), &self.writer);
    }

    /// Forgets a finished envelope (not waited for; durable with the next insert).
    pub fn remove(&self, id: u64) {
        self.deferred.push(Op::Remove(id), &self.writer);
    }

    /// Waits until every earlier request is written to redb and committed durably (used on
    /// shutdown and in tests).
    pub async fn flush(&self) -> Result<(), QueueError> {
        self.request(Op::Checkpoint).await
    }

    /// Returns once the writer has handled every earlier request, with no disk write of its
    /// own: proof that intake's path to the disk is not stuck. The answer says why new mail
    /// is refused now (a full disk), if it is.
    pub async fn ping(&self) -> Result<Option<String>, QueueError> {
        let (answer, answered) = oneshot::channel();
        self.writer.send(Request { op: Op::Ping(answer), done: None }).map_err(|_| QueueError::Closed)?;
        answered.await.map_err(|_| QueueError::Closed)
    }

    async fn request(&self, op: Op) -> Result<(), QueueError> {
        let (done, wait) = oneshot::channel();
        self.writer.send(Request { op, done: Some(done) }).map_err(|_| QueueError::Closed)?;
        wait.await.map_err(|_| QueueError::Closed)?
    }

    /// [`Queue::read_data`] on tokio's blocking threads, so that reading a large message from
    /// disk holds up no task.
    pub async fn load_data(&self, id: u64) -> Result<Vec<u8>, QueueError> {
        let queue = self.clone();
        tokio::task::spawn_blocking(move || queue.read_data(id)).await.map_err(|_| QueueError::Closed)?
    }

    /// The message data of an envelope.
    pub fn read_data(&self, id: u64) -> Result<Vec<u8>, QueueError> {
        // The journaled-but-unapplied map first: the index thread removes data from it only
        // after redb has it, so one of the two always does.
        if let Some(data) = self.unapplied.lock().map_err(|_| QueueError::Closed)?.get(&id) {
            return Ok(data.to_vec());
        }
        let value = self.db.with(|db| {
            let rx = db.begin_read().map_err(|e| e.to_string())?;
            let table = rx.open_table(DATA).map_err(|e| e.to_string())?;
            let value = table.get(id).map_err(|e| e.to_string())?;
            Ok(value.map(|v| v.value().to_vec()))
        });
        value.map_err(QueueError::Read)?.ok_or_else(|| QueueError::Read(format!("no data for {}", format_id(id))))
    }
}

fn envelope_json(env: &Envelope) -> Vec<u8> {
    // Plain fields only: serializing cannot fail.
    serde_json::to_vec(env).expect("an Envelope always serializes")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Brings redb up to date from the journal segments a crash left, in one durable commit,
/// then retires them. A damaged segment is kept aside as `*.wal.damaged` for the operator.
/// Returns the last sequence number seen.
fn replay(db: &Database, dir: &Path) -> Result<u64, OpenError> {
    let segments = journal::segments(dir)?;
    let mut tx = db.begin_write().map_err(redb::Error::from)?;
    tx.set_durability(Durability::Immediate).map_err(redb::Error::from)?;
    let mut damaged = Vec::new();
    {
        let mut tables = Tables::open(&tx)?;
        for segment in &segments {
            let mut reader = SegmentReader::open(segment)?;
            let mut records = 0u64;
            let end = loop {
                match reader.next_record().map_err(journal::io_error(&segment.path))? {
                    Next::Record(record) => {
                        tables.apply(record)?;
                        records += 1;
                    }
                    Next::End(end) => break end,
                }
            };
            let path = segment.path.display();
            match end {
                SegmentEnd::Clean => tracing::info!(segment = %path, records, "journal replayed"),
                // A write whose sync never returned, or a recycled segment's older records.
                SegmentEnd::Torn { offset, reason } => {
                    tracing::info!(segment = %path, records, offset, reason, "journal replayed up to an unacknowledged tail")
                }
                SegmentEnd::Corrupt { offset, reason } => {
                    tracing::error!(segment = %path, records, offset, reason, "journal segment damaged; kept as .damaged");
                    damaged.push(segment.path.clone());
                }
            }
        }
    }
    tx.commit().map_err(redb::Error::from)?;
    for path in &damaged {
        std::fs::rename(path, path.with_extension("wal.damaged")).map_err(journal::io_error(path))?;
    }
    let replayed: Vec<_> = segments.iter().filter(|s| !damaged.contains(&s.path)).cloned().collect();
    journal::retire(dir, &replayed)?;
    Ok(segments.last().map_or(0, |s| s.seq))
}

/// The two tables inside one write transaction.
struct Tables<'t> {
    envelopes: redb::Table<'t, u64, &'static [u8]>,
    data: redb::Table<'t, u64, &'static [u8]>,
}

impl<'t> Tables<'t> {
    fn open(tx: &'t redb::WriteTransaction) -> Result<Self, redb::Error> {
        Ok(Tables { envelopes: tx.open_table(ENVELOPES)?, data: tx.open_table(DATA)? })
    }

    /// One operation, from the writer or from replay.
    fn apply(&mut self, record: Record<'_>) -> Result<(), redb::Error> {
        match record {
            Record::Insert { id, envelope, data } => {
                self.envelopes.insert(id, envelope)?;
                self.data.insert(id, data)?;
            }
            // An update racing a removal must not resurrect the envelope.
            Record::Update { id, envelope } => {
                if self.envelopes.get(id)?.is_some() {
                    self.envelopes.insert(id, envelope)?;
                }
            }
            Record::Remove { id } => {
                self.envelopes.remove(id)?;
                self.data.remove(id)?;
            }
        }
        Ok(())
    }
}

/// The queue's journal writer: journals each group commit, acknowledges it, and hands the
/// operations on to the [`Indexer`].
struct Writer {
    /// The queue's lock: held until the last journal write is done.
    _lock: Arc<std::fs::File>,
    status: Arc<WriterStatus>,
    journal: Journal,
    timing: Timing,
    /// Set when a journal write failed: its segment may end in a torn record, so nothing may
    /// follow it there.
    rotate_first: bool,
    /// Why the last start of a new segment failed (a full disk), until one starts.
    rotation_failure: Option<String>,
    /// How far redb has caught up (the indexer moves it on).
    progress: Arc<IndexProgress>,
    /// When a checkpoint was last started or tried (a rotation, or the indexer asked).
    last_checkpoint: Instant,
    unapplied: Unapplied,
    /// Journaled operations collected for the indexer, which gets them in batches: one
    /// wake-up per [`Timing::apply_after`], not one per group commit.
    to_index: Vec<Pending>,
    to_index_since: Option<Instant>,
    deferred: Deferred,
    index: mpsc::Sender<IndexMsg>,
    indexer: thread::JoinHandle<()>,
    batch: Batch,
}

impl Writer {
    fn run(mut self, rx: &mpsc::Receiver<Request>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let wait = self.next_deadline().map(|at| at.saturating_duration_since(Instant::now()));
            let first = match wait {
                Some(wait) if wait <= DEFERRED_WAIT => rx.recv_timeout(wait),
                // A long wait, or none: deferred operations wake the writer.
                _ if !self.deferred.may_sleep() => Ok(Request { op: Op::Wake, done: None }),
                Some(wait) => rx.recv_timeout(wait),
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            };
            self.status.begin();
            self.deferred.awake();
            // Deferred operations first: a flush must cover those made before it.
            batch.extend(self.deferred.take().into_iter().map(|op| Request { op, done: None }));
            match first {
                Ok(r) => batch.push(r),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.group_commit(&mut batch);
            }
            self.on_time();
            self.status.publish_refusal(self.refusal());
            self.status.end();
        }
        // Closing: what is deferred, and a last checkpoint that covers the current segment.
        batch.extend(self.deferred.take().into_iter().map(|op| Request { op, done: None }));
        self.group_commit(&mut batch);
        self.hand_over();
        let (done, wait) = oneshot::channel();
        let finished = if self.rotate_first { Ok(()) } else { self.journal.finish() };
        match finished {
            Ok(()) => {
                let _ = self.index.send(IndexMsg::Checkpoint { through: self.journal.seq(), done: Some(done) });
                if let Ok(Err(e)) = wait.blocking_recv() {
                    tracing::error!(error = %e, "final queue checkpoint failed; the journal will be replayed at the next start");
                }
            }
            Err(e) => tracing::error!(error = %e, "final journal sync failed; the journal will be replayed at the next start"),
        }
        // The indexer ends when its channel closes.
        let Writer { index, indexer, .. } = self;
        drop(index);
        let _ = indexer.join();
    }

    /// When the current segment is due to be closed and checkpointed, if it holds anything.
    fn checkpoint_due(&self) -> Option<Instant> {
        // While new mail is refused, checkpoints are retried even with nothing new to cover:
        // once there is room, one succeeds and mail is taken again, with no mail or
        // delivery needed to set it off.
        let due = !self.journal.is_empty() || self.refusal().is_some();
        due.then_some(self.last_checkpoint + self.timing.checkpoint_every)
    }

    /// When the collected operations are due at the indexer, if there are any.
    fn hand_over_due(&self) -> Option<Instant> {
        self.to_index_since.map(|t| t + self.timing.apply_after)
    }

    /// When the next timed work is due.
    fn next_deadline(&self) -> Option<Instant> {
        match (self.checkpoint_due(), self.hand_over_due()) {
            (Some(c), Some(h)) => Some(c.min(h)),
            (c, h) => c.or(h),
        }
    }

    fn on_time(&mut self) {
        let now = Instant::now();
        if self.checkpoint_due().is_some_and(|at| now >= at) {
            self.checkpoint(None);
        } else if self.hand_over_due().is_some_and(|at| now >= at) || self.to_index.len() >= APPLY_MAX_OPS {
            self.hand_over();
        }
    }

    /// Sends the collected operations to the indexer.
    fn hand_over(&mut self) {
        self.to_index_since = None;
        if !self.to_index.is_empty() {
            let _ = self.index.send(IndexMsg::Ops(std::mem::take(&mut self.to_index)));
        }
    }

    /// Journals a batch with one write and, if it holds new mail, one `fdatasync`, then
    /// answers its waiters.
    fn group_commit(&mut self, batch: &mut Vec<Request>) {
        self.batch.clear();
        let mut staged = Vec::with_capacity(batch.len());
        for req in batch.iter() {
            match &req.op {
                Op::Insert(items) => staged.extend(items.iter().map(|(env, data)| Pending::Insert {
                    id: env.id,
                    envelope: envelope_json(env),
                    data: data.clone(),
                })),
                Op::Update(env) => staged.push(Pending::Update { id: env.id, envelope: envelope_json(env) }),
                Op::Remove(id) => staged.push(Pending::Remove(*id)),
                Op::Checkpoint | Op::Wake | Op::Ping(_) => {}
            }
        }
        let inserts = staged.iter().any(|op| matches!(op, Pending::Insert { .. }));
        let encoded: Result<(), _> = staged.iter().try_for_each(|op| self.batch.push(&op.record()));
        let written = encoded.map_err(|e| e.to_string()).and_then(|()| self.journal_write(inserts));
        if let Err(e) = &written {
            tracing::error!(error = %e, "queue journal write failed; its new mail was not acknowledged");
            // Not acknowledged, so not queued. Updates and removals still reach redb: they
            // were never promised to be durable on their own.
            staged.retain(|op| !matches!(op, Pending::Insert { .. }));
        }
        {
            // Only after the data is findable may the sender hear that it was queued.
            let mut unapplied = self.unapplied.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for op in &staged {
                if let Pending::Insert { id, data, .. } = op {
                    unapplied.insert(*id, data.clone());
                }
            }
        }
        if !staged.is_empty() {
            self.to_index.extend(staged);
            self.to_index_since.get_or_insert_with(Instant::now);
        }
        let written = written.map_err(QueueError::Write);
        for req in batch.drain(..) {
            match req.op {
                Op::Checkpoint => self.checkpoint(req.done),
                Op::Ping(answer) => {
                    // Published first: mail sent after a health check sees what it said.
                    let _ = answer.send(self.status.publish_refusal(self.refusal()));
                }
                Op::Insert(_) | Op::Update(_) | Op::Remove(_) | Op::Wake => {
                    if let Some(done) = req.done {
                        let _ = done.send(written.clone());
                    }
                }
            }
        }
    }

    fn journal_write(&mut self, sync: bool) -> Result<(), String> {
        if self.batch.is_empty() {
            return Ok(());
        }
        if self.rotate_first || (self.batch.len() as u64) > self.journal.remaining() {
            // A full segment is a good moment to checkpoint: the next one starts anyway.
            self.rotate().map_err(|e| e.to_string())?;
            self.ask_checkpoint(None);
        }
        if sync {
            self.wait_for_index()?;
        }
        let result = self.journal.append(&mut self.batch).and_then(|()| if sync { self.journal.sync() } else { Ok(()) });
        self.rotate_first = result.is_err();
        if result.is_err() {
            // Tried now, not when the next message comes: a disk that took no write may take
            // no new segment either (a failing disk turns read-only), and then new mail is
            // refused at `MAIL`, and `/healthz` says so, before anyone sends a whole message
            // only to have it refused.
            match self.rotate() {
                Ok(()) => self.ask_checkpoint(None),
                Err(e) => tracing::error!(error = %e, "journal rotation failed"),
            }
        }
        result.map_err(|e| e.to_string())
    }

    /// Why new mail is refused now, if it is:
    /// * no new journal segment could be started (a full disk), so mail that does not fit
    ///   the current one cannot be stored. Clears once a segment starts; one is tried at each
    ///   checkpoint time;
    /// * the last write to redb failed (a full disk) while [`MAX_SEGMENTS_BEHIND`] segments
    ///   wait for a checkpoint. The journal must not grow without end, and the indexer holds
    ///   the unapplied operations in memory. Clears once a checkpoint succeeds.
    fn refusal(&self) -> Option<String> {
        if let Some(failure) = &self.rotation_failure {
            return Some(format!("the queue journal cannot start a new segment ({failure}); new mail refused"));
        }
        self.refusal_in(&self.progress.lock())
    }

    fn refusal_in(&self, index: &Checkpointed) -> Option<String> {
        let behind = self.segments_behind(index);
        let failure = index.failure.as_ref().filter(|_| behind >= MAX_SEGMENTS_BEHIND)?;
        Some(format!("the queue index is {behind} journal segments behind (checkpoints fail: {failure}); new mail refused"))
    }

    /// Full segments not yet checkpointed.
    fn segments_behind(&self, index: &Checkpointed) -> u64 {
        (self.journal.seq() - 1).saturating_sub(index.through)
    }

    /// Holds new mail back while [`MAX_SEGMENTS_BEHIND`] segments wait for a checkpoint:
    /// refused if writes to redb fail ([`Writer::refusal`]), otherwise until the checkpoint
    /// under way ends, for at most [`Timing::max_index_wait`]. A burst of large messages can fill
    /// segments faster than redb takes them; its senders then wait for their `250` instead
    /// of getting a `452`. A rotation asks for a checkpoint of every segment before the
    /// current one, so one is under way.
    fn wait_for_index(&self) -> Result<(), String> {
        let until = Instant::now() + self.timing.max_index_wait;
        let mut index = self.progress.lock();
        loop {
            if let Some(why) = self.refusal_in(&index) {
                return Err(why);
            }
            let behind = self.segments_behind(&index);
            if behind < MAX_SEGMENTS_BEHIND {
                return Ok(());
            }
            let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                return Err(format!(
                    "the queue index is {behind} journal segments behind and no checkpoint ended within {:?}; new mail refused",
                    self.timing.max_index_wait
                ));
            };
            index = self.progress.changed.wait_timeout(index, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }

    /// Continues in a new segment, so that a checkpoint covers the older ones whole.
    fn rotate(&mut self) -> Result<(), journal::JournalError> {
        self.last_checkpoint = Instant::now();
        let rotated = self.start_next_segment();
        self.rotation_failure = rotated.as_ref().err().map(ToString::to_string);
        rotated
    }

    fn start_next_segment(&mut self) -> Result<(), journal::JournalError> {
        // Updates and removals are not synced when written; the old segment keeps them.
        if !self.rotate_first {
            self.journal.finish()?;
        }
        self.journal = Journal::start(self.journal.dir(), self.journal.seq() + 1, self.batch.len() as u64)?;
        self.rotate_first = false;
        Ok(())
    }

    /// Starts a new segment if the current one holds anything, and asks for a checkpoint of
    /// every segment before it.
    fn checkpoint(&mut self, done: Option<oneshot::Sender<Result<(), QueueError>>>) {
        if (!self.journal.is_empty() || self.rotate_first || self.rotation_failure.is_some())
            && let Err(e) = self.rotate()
        {
            // Retried at the next checkpoint time (`rotate` set it), not in a busy loop.
            tracing::error!(error = %e, "journal rotation failed");
            if let Some(done) = done {
                let _ = done.send(Err(QueueError::Write(e.to_string())));
            }
            return;
        }
        self.ask_checkpoint(done);
    }

    /// Hands over what is collected, then asks the indexer to commit redb durably and retire
    /// the segments before the current one: the indexer has every operation of those by then.
    fn ask_checkpoint(&mut self, done: Option<oneshot::Sender<Result<(), QueueError>>>) {
        self.last_checkpoint = Instant::now();
        self.hand_over();
        let _ = self.index.send(IndexMsg::Checkpoint { through: self.journal.seq() - 1, done });
    }
}

/// What the writer hands the indexer, in journal order.
enum IndexMsg {
    /// Journaled operations.
    Ops(Vec<Pending>),
    /// Commit redb durably, then retire the segments up to `through`.
    Checkpoint { through: u64, done: Option<oneshot::Sender<Result<(), QueueError>>> },
}

/// Writes the journaled operations to redb in the batches the writer hands over, on its own
/// thread, so that the journal does not wait for each redb commit. A batch's new mail waits
/// for the next batch, by which time most of it is delivered and need not be written at
/// all. Each commit is durable: small syncs every 20 ms keep the disk evenly busy, where one
/// large commit a second (10 MB at full load) held up the journal's syncs behind it and
/// raised the p99 acceptance latency about threefold.
struct Indexer {
    db: Arc<Index>,
    /// Set by a failed write: redb is opened again before the next one.
    reopen_first: bool,
    dir: PathBuf,
    /// Operations not yet in redb: a failed write is retried with the next batch.
    pending: Vec<Pending>,
    unapplied: Unapplied,
    progress: Arc<IndexProgress>,
}

impl Indexer {
    fn run(&mut self, rx: &mpsc::Receiver<IndexMsg>) {
        self.prepare_spare();
        while let Ok(msg) = rx.recv() {
            match msg {
                IndexMsg::Ops(ops) => {
                    // Mail queued in this batch waits for the next one: most of it is delivered
                    // by then and need never be written (see `settled`).
                    let newest = queued_in(&ops);
                    self.pending.extend(ops);
                    if let Err(e) = self.apply(&newest) {
                        tracing::error!(error = %e, "queue index update failed; the journal keeps the operations");
                    }
                }
                IndexMsg::Checkpoint { through, done } => {
                    let result = self.checkpoint(through);
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "queue checkpoint failed; the journal keeps the operations");
                    }
                    if let Some(done) = done {
                        let _ = done.send(result);
                    }
                    self.prepare_spare();
                }
            }
        }
    }

    /// Keeps a spare segment ready, so the writer never waits for a new one to be written.
    fn prepare_spare(&self) {
        if let Err(e) = journal::prepare_spare(&self.dir) {
            tracing::warn!(error = %e, "could not prepare a spare journal segment; the writer will make its own");
        }
    }

    /// Writes the pending operations to redb in one transaction, except those of the messages
    /// in `held`, which stay pending; true if there was anything to write. Under load nearly
    /// every message is queued and removed before it is written (see [`settled`]), and a
    /// commit with nothing in it would still cost a sync that competes with the journal's.
    fn apply(&mut self, held: &HashSet<u64>) -> Result<bool, QueueError> {
        // One message's operations are kept in order, and no operation touches another
        // message's rows, so holding some messages back reorders nothing that matters.
        let (kept, due): (Vec<Pending>, Vec<Pending>) =
            std::mem::take(&mut self.pending).into_iter().partition(|op| held.contains(&op.id()));
        let changes = settled(&due).next().is_some();
        if changes && let Err(e) = self.write(&due) {
            // Retried with the next batch, in the same order.
            self.pending = due;
            self.pending.extend(kept);
            return Err(QueueError::Write(e));
        }
        self.pending = kept;
        let mut unapplied = self.unapplied.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for op in due {
            if let Pending::Insert { id, .. } = op {
                unapplied.remove(&id);
            }
        }
        Ok(changes)
    }

    /// Writes `pending` to redb in one durable transaction, opening redb again first if the
    /// last write failed.
    fn write(&mut self, pending: &[Pending]) -> Result<(), String> {
        let reopened = if self.reopen_first { self.db.reopen() } else { Ok(()) };
        let written = reopened.and_then(|()| {
            self.db.with(|db| {
                let mut tx = db.begin_write().map_err(|e| e.to_string())?;
                tx.set_durability(Durability::Immediate).map_err(|e| e.to_string())?;
                {
                    let mut tables = Tables::open(&tx).map_err(|e| e.to_string())?;
                    settled(pending).try_for_each(|op| tables.apply(op.record())).map_err(|e| e.to_string())?;
                }
                tx.commit().map_err(|e| e.to_string())
            })
        });
        self.reopen_first = written.is_err();
        self.progress.wrote(&written);
        written
    }

    /// Commits redb durably with everything received so far, which includes every operation
    /// of the segments up to `through`, then retires those segments.
    fn checkpoint(&mut self, through: u64) -> Result<(), QueueError> {
        self.apply(&HashSet::new())?;
        self.progress.checkpointed(through);
        let covered: Vec<_> = journal::segments(&self.dir)
            .map_err(|e| QueueError::Write(e.to_string()))?
            .into_iter()
            .filter(|s| s.seq <= through)
            .collect();
        journal::retire(&self.dir, &covered).map_err(|e| QueueError::Write(e.to_string()))
    }
}

/// The messages `ops` queues.
fn queued_in(ops: &[Pending]) -> HashSet<u64> {
    ops.iter().filter(|op| matches!(op, Pending::Insert { .. })).map(Pending::id).collect()
}

/// `pending` without the messages that were both queued and removed within it: delivered
/// before redb saw them, they would be written there only to be deleted. Under load that is
/// nearly every message. The result is the same redb state, so a checkpoint may still retire
/// the journal segments that hold them.
fn settled(pending: &[Pending]) -> impl Iterator<Item = &Pending> {
    let inserted: HashSet<u64> = pending.iter().filter(|op| matches!(op, Pending::Insert { .. })).map(Pending::id).collect();
    let delivered: HashSet<u64> =
        pending.iter().filter(|op| matches!(op, Pending::Remove(id) if inserted.contains(id))).map(Pending::id).collect();
    pending.iter().filter(move |op| !delivered.contains(&op.id()))
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
            dsn: None,
            held: false,
        }
    }

    fn index_header(path: &Path) -> [u8; INDEX_HEADER_BYTES] {
        let bytes = std::fs::read(path).expect("index file");
        bytes[..INDEX_HEADER_BYTES].try_into().expect("header")
    }

    fn put(db: &Database, key: u64, value: &[u8]) {
        let tx = db.begin_write().expect("write");
        tx.open_table(DATA).expect("table").insert(key, value).expect("insert");
        tx.commit().expect("commit");
    }

    /// The header's layout read as redb writes it (this fails first if an upgrade of redb
    /// changes its file format): a whole index file is exactly as long as its header says.
    #[test]
    fn an_index_file_is_as_long_as_its_header_says() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("queue.redb");
        for size in [0, 100 << 10, 3 << 20] {
            let db = open_index(&path).expect("open");
            put(&db, size as u64, &vec![7; size]);
            drop(db);
            let len = std::fs::metadata(&path).expect("metadata").len();
            assert_eq!(index_length_in_header(&index_header(&path)).map(|(length, _)| length), Some(len), "after {size} bytes");
        }
        assert_eq!(index_length_in_header(&[0; INDEX_HEADER_BYTES]), None);
        assert_eq!(restore_index_length(&dir.path().join("none.redb")).expect("no file"), None);
    }

    /// A disk that failed in a checkpoint kept redb's header and lost the file's last growth
    /// (found on a loop-mounted ext4 on thin storage that ran out). Given its length back, the
    /// index rolls back to the commit before the lost one, and opens.
    #[test]
    fn an_index_that_lost_its_last_growth_opens_at_the_commit_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("queue.redb");
        let db = open_index(&path).expect("open");
        put(&db, 1, b"kept");
        let before = std::fs::metadata(&path).expect("metadata").len();
        put(&db, 2, &vec![9; 4 << 20]);
        // The relay was killed: no clean close. The file as the disk left it is a copy (the
        // lost handle keeps its lock on the original).
        std::mem::forget(db);
        let path = dir.path().join("after-the-failure.redb");
        std::fs::copy(dir.path().join("queue.redb"), &path).expect("copy");
        assert!(std::fs::metadata(&path).expect("metadata").len() > before, "the second commit did not grow the file");
        std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(before)).expect("cut the growth");

        assert_eq!(restore_index_length(&path).expect("restore"), Some(before));
        let db = open_index(&path).expect("the index opens");
        let rx = db.begin_read().expect("read");
        let table = rx.open_table(DATA).expect("table");
        assert_eq!(table.get(1).expect("get").map(|v| v.value().to_vec()), Some(b"kept".to_vec()));
        assert!(table.get(2).expect("get").is_none(), "the lost commit is not there");
        assert_eq!(restore_index_length(&path).expect("whole again"), None);
    }

    /// Only a queue that did not open for want of room gives back the journal's spares: they
    /// are what lets the next segments start without writing 16 MiB while mail waits.
    #[test]
    fn spares_are_given_back_only_when_the_disk_is_out_of_room() {
        use std::io::{Error, ErrorKind};
        let room = |kind: ErrorKind| Error::from(kind);
        assert!(OpenError::Directory(room(ErrorKind::StorageFull)).out_of_room());
        assert!(OpenError::Index(redb::Error::Io(room(ErrorKind::QuotaExceeded))).out_of_room());
        let journal_io = |kind| journal::JournalError::Io { path: "j".into(), source: room(kind) };
        assert!(OpenError::Journal(journal_io(ErrorKind::FileTooLarge)).out_of_room());
        assert!(!OpenError::Journal(journal_io(ErrorKind::PermissionDenied)).out_of_room());
        assert!(!OpenError::Index(redb::Error::Corrupted("bad page".into())).out_of_room());
        assert!(!OpenError::Thread(room(ErrorKind::StorageFull)).out_of_room());

        // A damaged index is no lack of room: the spare stays.
        let dir = tempfile::tempdir().expect("tempdir");
        let journal_dir = dir.path().join("journal");
        std::fs::create_dir(&journal_dir).expect("journal directory");
        assert!(journal::prepare_spare(&journal_dir).expect("spare"));
        std::fs::write(dir.path().join("queue.redb"), vec![0x5a; 64 << 10]).expect("a damaged index");
        let opened = Queue::open(dir.path());
        let Err(QueueError::Open { source, .. }) = &opened else { panic!("a damaged index opened: {opened:?}") };
        assert!(!source.out_of_room(), "{source}");
        assert_eq!(journal::release_spares(&journal_dir).expect("release"), 1, "the spare was given back for {source}");
    }

    /// Envelopes are JSON in the queue: one queued before DSN requests were kept still loads,
    /// and one without a request is written as before, so an older build can read it back.
    #[test]
    fn envelopes_without_dsn_requests_keep_their_format() {
        let old = r#"{"id":7,"sender":"a@src.test","domain":"customer.test","recipients":["u@customer.test"],"received_ms":1,"attempts":0,"next_attempt_ms":1,"last_error":null,"size":5,"warned":false}"#;
        let env: Envelope = serde_json::from_str(old).expect("an envelope queued by an older build");
        assert_eq!(env.dsn, None);
        assert_eq!(envelope_json(&env), old.as_bytes());
        let mut request = DsnRequest { envid: Some("e1".into()), ..DsnRequest::default() };
        request
            .recipients
            .insert("u@customer.test".into(), crate::dsn::RcptDsn { notify: None, orcpt: Some("o@old.test".into()) });
        let with = Envelope { dsn: Some(Box::new(request)), ..env.clone() };
        let back: Envelope = serde_json::from_slice(&envelope_json(&with)).expect("round trip");
        assert_eq!(back, with);
        assert!(!env.held, "older builds held nothing");
        let held = Envelope { held: true, ..env };
        let back: Envelope = serde_json::from_slice(&envelope_json(&held)).expect("round trip");
        assert!(back.held, "a hold survives a restart");
    }

    /// What a crash leaves of a queue: its journal and index as they are on disk now.
    fn crash_image(from: &Path, to: &Path) {
        std::fs::create_dir_all(to.join("journal")).expect("journal directory");
        for entry in std::fs::read_dir(from.join("journal")).expect("journal").flatten() {
            std::fs::copy(entry.path(), to.join("journal").join(entry.file_name())).expect("copy");
        }
        std::fs::copy(from.join("queue.redb"), to.join("queue.redb")).expect("copy the index");
    }

    /// An index damaged beyond redb's repair (both commit slots lost, as a disk that failed
    /// under a run of checkpoints left it) is made again from the journal while the journal
    /// holds every operation since the queue began; once a segment was retired, it is not,
    /// and the queue does not open rather than lose what was in the index alone.
    #[tokio::test]
    async fn a_damaged_index_is_made_again_from_a_journal_that_holds_its_whole_history() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (q, _) = Queue::open(&dir.path().join("live")).expect("open");
        assert!(journal::holds_whole_history(&dir.path().join("live/journal")), "a new queue's journal holds it all");
        let (a, b) = (envelope(&q, "a@customer.test"), envelope(&q, "b@customer.test"));
        q.insert(vec![(a.clone(), Arc::new(b"hello".to_vec())), (b.clone(), Arc::new(b"world".to_vec()))]).await.expect("insert");
        let damaged = |name: &str| {
            let image = dir.path().join(name);
            crash_image(&dir.path().join("live"), &image);
            let index = image.join("queue.redb");
            let mut bytes = std::fs::read(&index).expect("index");
            bytes[64..320].fill(0); // both commit slots
            std::fs::write(&index, bytes).expect("damage");
            image
        };

        let image = damaged("whole");
        let (rebuilt, envelopes) = Queue::open(&image).expect("made again from the journal");
        let ids: HashSet<u64> = envelopes.iter().map(|e| e.id).collect();
        assert_eq!(ids, HashSet::from([a.id, b.id]));
        assert_eq!(rebuilt.read_data(b.id).expect("data"), b"world");
        let aside = std::fs::read_dir(&image)
            .expect("list")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("queue.redb.damaged-"));
        assert_eq!(aside.count(), 1, "the damaged index is kept aside");
        rebuilt.close();

        let image = damaged("retired");
        std::fs::remove_file(image.join("journal/whole-history")).expect("as after a retired segment");
        let opened = Queue::open(&image);
        let Err(QueueError::Open { source, .. }) = &opened else { panic!("opened without its history: {opened:?}") };
        assert!(matches!(**source, OpenError::IndexDamaged { .. }), "{source}");
        // The operator is told what to do, and doing it starts the queue with what the
        // journal holds (here all of it: the image was taken before any checkpoint).
        let told = source.to_string();
        assert!(told.contains("queue.redb") && told.contains("move it aside"), "{told}");
        std::fs::rename(image.join("queue.redb"), image.join("queue.redb.bad")).expect("move aside");
        let (started, envelopes) = Queue::open(&image).expect("started with what the journal holds");
        assert_eq!(envelopes.iter().map(|e| e.id).collect::<HashSet<_>>(), HashSet::from([a.id, b.id]));
        started.close();

        q.close();
        assert!(!journal::holds_whole_history(&dir.path().join("live/journal")), "the last checkpoint retired a segment");
    }

    /// A second relay started on a queue in use is refused before it touches a file, and the
    /// queue opens again once the lock is free.
    #[tokio::test]
    async fn a_queue_in_use_is_refused_before_anything_is_touched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (q, _) = Queue::open(dir.path()).expect("open");
        let a = envelope(&q, "a@customer.test");
        q.insert(vec![(a.clone(), Arc::new(b"hello".to_vec()))]).await.expect("insert");
        q.close();
        let files = |dir: &Path| {
            let mut all = Vec::new();
            for sub in [dir.to_path_buf(), dir.join("journal")] {
                for e in std::fs::read_dir(sub).expect("list").flatten() {
                    let m = e.metadata().expect("metadata");
                    all.push((e.path(), m.len(), m.modified().expect("mtime")));
                }
            }
            all.sort();
            all
        };
        // The lock as a running relay holds it, on a queue that nothing else writes meanwhile.
        let held = lock_queue(dir.path()).expect("lock");
        let before = files(dir.path());
        let second = Queue::open(dir.path());
        let Err(QueueError::Open { source, .. }) = &second else { panic!("a second open of a queue in use: {second:?}") };
        assert!(matches!(**source, OpenError::InUse(_)), "{source}");
        assert!(source.to_string().contains("in use by another process"), "{source}");
        assert_eq!(files(dir.path()), before, "the refused open changed nothing");
        drop(held);
        let (reopened, existing) = Queue::open(dir.path()).expect("open once the lock is free");
        assert_eq!(existing.iter().map(|e| e.id).collect::<Vec<_>>(), vec![a.id]);
        // A queue's handles hold the lock until the last of them is closed.
        assert!(matches!(lock_queue(dir.path()), Err(OpenError::InUse(_))), "the open queue holds its lock");
        reopened.close();
        assert!(lock_queue(dir.path()).is_ok(), "closed, the queue holds no lock");
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

    #[test]
    fn mail_delivered_by_the_next_hand_over_makes_no_redb_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("queue.redb");
        let db = Database::create(&path).expect("redb");
        let tx = db.begin_write().expect("write");
        drop(Tables::open(&tx).expect("tables"));
        tx.commit().expect("commit");
        let db = Arc::new(Index::new(path, db, Arc::new(lock_queue(dir.path()).expect("lock"))));
        let unapplied = Unapplied::default();
        let mut indexer = Indexer {
            db: db.clone(),
            reopen_first: false,
            dir: dir.path().to_path_buf(),
            pending: Vec::new(),
            unapplied: unapplied.clone(),
            progress: Arc::default(),
        };
        let insert = |id| Pending::Insert { id, envelope: b"{}".to_vec(), data: Arc::new(b"data".to_vec()) };
        let stored = |id: u64| {
            db.with(|db| Ok(db.begin_read().expect("read").open_table(ENVELOPES).expect("table").get(id).expect("get").is_some()))
                .expect("read")
        };
        let held_in_memory = |id: u64| unapplied.lock().expect("lock").contains_key(&id);
        for id in [1, 2] {
            unapplied.lock().expect("lock").insert(id, Arc::new(Vec::new()));
        }
        // As `run` hands them over: each batch holds back the mail it queues.
        let mut batch = |ops: Vec<Pending>| {
            let newest = queued_in(&ops);
            indexer.pending.extend(ops);
            indexer.apply(&newest).expect("apply")
        };

        assert!(!batch(vec![insert(1)]), "mail just queued waits for the next batch");
        assert!(!stored(1) && held_in_memory(1), "and is read from memory meanwhile");
        assert!(!batch(vec![Pending::Remove(1), insert(2)]), "delivered by then: nothing to write, no commit");
        assert!(!stored(1) && !held_in_memory(1), "message 1 is gone without ever reaching redb");
        assert!(batch(Vec::new()), "still queued a batch later: written");
        assert!(stored(2) && !held_in_memory(2));
    }

    #[test]
    fn messages_queued_and_removed_in_one_batch_never_reach_redb() {
        let insert = |id| Pending::Insert { id, envelope: Vec::new(), data: Arc::new(Vec::new()) };
        let update = |id| Pending::Update { id, envelope: Vec::new() };
        let pending = [insert(1), insert(2), update(1), Pending::Remove(1), update(3), Pending::Remove(3), update(2)];
        let left: Vec<String> = settled(&pending).map(|op| format!("{:?}", op.record())).collect();
        let expected: Vec<String> =
            [insert(2), update(3), Pending::Remove(3), update(2)].iter().map(|op| format!("{:?}", op.record())).collect();
        assert_eq!(left, expected);
    }

    /// The writer leaves redb alone for an hour: everything since `open` is in the journal
    /// only, as after a crash.
    const JOURNAL_ONLY: Timing = Timing {
        apply_after: Duration::from_secs(3600),
        checkpoint_every: Duration::from_secs(3600),
        max_index_wait: Duration::from_secs(10),
        stalled_after: STALLED_AFTER,
    };

    /// A queue that leaves redb alone, holding one acknowledged message with `data`.
    async fn journal_only_with_one(dir: &Path, data: &[u8]) -> (Queue, Envelope) {
        let (q, _) = Queue::open_with(dir, JOURNAL_ONLY).expect("open");
        let a = envelope(&q, "a@customer.test");
        q.insert(vec![(a.clone(), Arc::new(data.to_vec()))]).await.expect("insert");
        (q, a)
    }

    /// A copy of the queue directory as a crash would leave it: taken while the writer is idle.
    fn crash_copy(from: &Path) -> tempfile::TempDir {
        let to = tempfile::tempdir().expect("tempdir");
        std::fs::copy(from.join("queue.redb"), to.path().join("queue.redb")).expect("copy redb");
        std::fs::create_dir(to.path().join("journal")).expect("mkdir");
        for segment in journal::segments(&from.join("journal")).expect("segments") {
            let name = segment.path.file_name().expect("name");
            std::fs::copy(&segment.path, to.path().join("journal").join(name)).expect("copy segment");
        }
        to
    }

    /// A queue directory as a crash leaves it: one acknowledged message (data `kept`) in the
    /// journal only, then `tail(sequence number)` written right after its record.
    async fn crashed_with_tail(tail: impl FnOnce(u64) -> Vec<u8>) -> (tempfile::TempDir, Envelope, journal::Segment) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (q, acked) = journal_only_with_one(dir.path(), b"kept").await;
        let crashed = crash_copy(dir.path());
        q.close();
        let segment = journal::segments(&crashed.path().join("journal")).expect("segments").remove(0);
        let mut content = std::fs::read(&segment.path).expect("read");
        let end = content.iter().rposition(|&b| b != 0).expect("records") + 1;
        let extra = tail(segment.seq);
        content[end..end + extra.len()].copy_from_slice(&extra);
        std::fs::write(&segment.path, &content).expect("write");
        (crashed, acked, segment)
    }

    #[tokio::test]
    async fn a_ping_is_answered_without_a_write_of_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (q, _) = journal_only_with_one(dir.path(), b"data").await;
        let journal = || {
            let segments = journal::segments(&dir.path().join("journal")).expect("segments");
            segments.iter().map(|s| std::fs::read(&s.path).expect("read")).collect::<Vec<_>>()
        };
        let before = journal();
        assert_eq!(q.ping().await.expect("the writer answers"), None, "new mail is taken");
        assert_eq!(journal(), before);
        q.close();
    }

    #[tokio::test]
    async fn acknowledged_mail_is_in_the_journal_before_redb_has_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (q, _) = Queue::open_with(dir.path(), JOURNAL_ONLY).expect("open");
        let a = envelope(&q, "a@customer.test");
        let b = envelope(&q, "b@customer.test");
        let c = envelope(&q, "c@customer.test");
        let items = [&a, &b, &c].map(|e| (e.clone(), Arc::new(format!("data of {}", e.id).into_bytes())));
        q.insert(items.to_vec()).await.expect("insert");
        // Readable at once, although redb does not have it yet.
        assert_eq!(q.read_data(b.id).expect("data"), format!("data of {}", b.id).into_bytes());
        q.remove(a.id);
        let mut b2 = b.clone();
        b2.attempts = 3;
        q.update(b2.clone());
        // Removals and updates become durable with the next insert's sync.
        let d = envelope(&q, "d@customer.test");
        q.insert(vec![(d.clone(), Arc::new(b"last".to_vec()))]).await.expect("insert");

        let crashed = crash_copy(dir.path());
        let (replayed, mut existing) = Queue::open(crashed.path()).expect("replay");
        existing.sort_by_key(|e| e.id);
        assert_eq!(existing, vec![b2, c.clone(), d.clone()], "removed one gone, updated one updated");
        assert_eq!(replayed.read_data(c.id).expect("data"), format!("data of {}", c.id).into_bytes());
        assert_eq!(replayed.read_data(d.id).expect("data"), b"last");
        assert_eq!(journal::segments(&crashed.path().join("journal")).expect("segments").len(), 1, "replayed segments retired");
        replayed.close();
        q.close();
    }

    #[tokio::test]
    async fn a_torn_tail_loses_only_what_was_never_acknowledged() {
        // Half a record after the acknowledged one: a group commit whose sync never returned.
        let (crashed, a, _) = crashed_with_tail(|_| vec![0x40, 0, 0, 0, 0xde, 0xad]).await;
        let (replayed, existing) = Queue::open(crashed.path()).expect("replay");
        assert_eq!(existing, vec![a.clone()]);
        assert_eq!(replayed.read_data(a.id).expect("data"), b"kept");
        replayed.close();
    }

    #[tokio::test]
    async fn a_damaged_segment_is_replayed_up_to_the_damage_and_kept_for_the_operator() {
        // After the acknowledged record, one whose checksum is right but whose kind is unknown
        // (the journal's format: length, CRC-32 of sequence number and body, body).
        let (crashed, a, segment) = crashed_with_tail(|seq| {
            let body = [9u8, 0, 0, 0, 0, 0, 0, 0, 1];
            let mut crc = crc32fast::Hasher::new();
            crc.update(&seq.to_le_bytes());
            crc.update(&body);
            [&(body.len() as u32).to_le_bytes()[..], &crc.finalize().to_le_bytes(), &body].concat()
        })
        .await;
        let (replayed, existing) = Queue::open(crashed.path()).expect("replay");
        assert_eq!(existing, vec![a], "the records before the damage are replayed");
        assert!(segment.path.with_extension("wal.damaged").is_file(), "the damaged segment is kept aside");
        assert!(!segment.path.exists(), "and not replayed again");
        replayed.close();
    }

    #[tokio::test]
    async fn a_checkpoint_moves_everything_to_redb_and_retires_the_journal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (q, a) = journal_only_with_one(dir.path(), b"x").await;
        q.flush().await.expect("checkpoint");
        // Only the (empty) segment started by the checkpoint is left to replay.
        let crashed = crash_copy(dir.path());
        let segments = journal::segments(&crashed.path().join("journal")).expect("segments");
        assert_eq!(segments.len(), 1);
        let mut reader = SegmentReader::open(&segments[0]).expect("open");
        assert!(matches!(reader.next_record().expect("read"), Next::End(SegmentEnd::Clean)));
        let (replayed, existing) = Queue::open(crashed.path()).expect("reopen");
        assert_eq!(existing, vec![a]);
        replayed.close();
        q.close();
    }

    #[tokio::test]
    async fn a_removal_reaches_redb_without_more_mail_to_carry_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (q, _) = Queue::open(dir.path()).expect("open");
        let a = envelope(&q, "a@customer.test");
        q.insert(vec![(a.clone(), Arc::new(b"x".to_vec()))]).await.expect("insert");
        // After the checkpoint the writer has nothing timed left and sleeps until woken.
        q.flush().await.expect("checkpoint");
        q.remove(a.id);
        // Within 10 s, or the sleeping writer was not woken.
        eventually(|| q.read_data(a.id).is_err().then_some(())).await;
        q.close();
    }

    /// A removal is written moments after it is made, though the writer has nothing timed
    /// for an hour: a relay killed after a delivery does not deliver the message again.
    #[tokio::test]
    async fn a_removal_is_journaled_at_once_though_the_writer_waits_long() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (q, a) = journal_only_with_one(dir.path(), b"delivered").await;
        q.remove(a.id);
        // Within 10 s, where the writer's next checkpoint is an hour away.
        eventually(|| {
            let crashed = crash_copy(dir.path());
            let (replayed, existing) = Queue::open(crashed.path()).expect("replay");
            replayed.close();
            existing.is_empty().then_some(())
        })
        .await;
        q.close();
    }

    /// A writer that is stuck stops answering pings, so `/healthz` and the watchdog (both
    /// [`crate::relay::check_alive`]) report it, and it answers again once free. Stuck here
    /// on the lock it shares with the index thread, held by the test, as a sync that never
    /// returns would hold it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[expect(clippy::await_holding_lock, reason = "the held lock is what the writer is stuck on")]
    async fn a_stuck_writer_is_reported_unresponsive_until_it_moves_again() {
        use crate::relay::{Readiness, Unresponsive, check_alive};
        use crate::scheduler::Event;
        let dir = tempfile::tempdir().expect("tempdir");
        let (q, _) = Queue::open(dir.path()).expect("open");
        // A scheduler that answers.
        let (events, mut scheduler) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(event) = scheduler.recv().await {
                if let Event::Ping(answer) = event {
                    let _ = answer.send(());
                }
            }
        });
        let patience = Duration::from_secs(10);
        assert!(matches!(check_alive(&q, &events, patience).await, Ok(Readiness::Ready)));
        let held = q.unapplied.lock().expect("lock");
        let a = envelope(&q, "a@customer.test");
        let mut insert = Box::pin(q.insert(vec![(a.clone(), Arc::new(b"x".to_vec()))]));
        // Polled once, so the insert is in the writer's channel before the ping.
        tokio::select! {
            biased;
            _ = &mut insert => panic!("inserted while the writer could not move"),
            () = std::future::ready(()) => {}
        }
        let stuck = check_alive(&q, &events, Duration::from_millis(300)).await;
        assert!(matches!(stuck, Err(Unresponsive::QueueWriter)), "{stuck:?}");
        drop(held);
        insert.await.expect("insert once free");
        assert!(matches!(check_alive(&q, &events, patience).await, Ok(Readiness::Ready)));
        assert_eq!(q.read_data(a.id).expect("data"), b"x");
        q.close();
    }

    /// A writer stuck in one round for `stalled_after` is seen as stalled, without asking it
    /// (it could not answer), so sessions refuse new mail at MAIL; once it moves again, it is not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[expect(clippy::await_holding_lock, reason = "the held lock is what the writer is stuck on")]
    async fn a_writer_stuck_in_a_round_is_stalled_until_it_moves_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let timing = Timing { stalled_after: Duration::from_secs(1), ..Timing::default() };
        let (q, _) = Queue::open_with(dir.path(), timing).expect("open");
        let a = envelope(&q, "a@customer.test");
        q.insert(vec![(a.clone(), Arc::new(b"a".to_vec()))]).await.expect("insert");
        assert_eq!(q.stalled_for(), None, "a writer that got through is not stalled");
        let held = q.unapplied.lock().expect("lock");
        let b = envelope(&q, "b@customer.test");
        let insert = tokio::spawn({
            let q = q.clone();
            async move { q.insert(vec![(b, Arc::new(b"b".to_vec()))]).await }
        });
        let stalled = eventually(|| q.stalled_for()).await;
        assert!(stalled >= Duration::from_secs(1), "{stalled:?}");
        drop(held);
        insert.await.expect("task").expect("insert once free");
        eventually(|| q.stalled_for().is_none().then_some(())).await;
        q.close();
    }

    /// Polls `f` until it gives something (at most 10 s).
    async fn eventually<T>(f: impl Fn() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(t) = f() {
                return t;
            }
            assert!(Instant::now() < deadline, "not within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// New mail waits for a checkpoint under way, but only for `max_index_wait`: past it,
    /// with the index stuck (here on its lock, held by the test), the sender is refused, not
    /// kept waiting. Once the index moves again, mail is taken again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[expect(clippy::await_holding_lock, reason = "the held lock is what the index is stuck on")]
    async fn mail_waits_for_a_stuck_index_only_so_long() {
        let dir = tempfile::tempdir().expect("tempdir");
        let timing = Timing {
            checkpoint_every: Duration::from_secs(3600),
            max_index_wait: Duration::from_millis(200),
            ..Timing::default()
        };
        let (q, _) = Queue::open_with(dir.path(), timing).expect("open");
        let stuck = q.db.db.write().expect("lock");
        let data = Arc::new(vec![b'x'; 2 << 20]);
        let mut taken = 0;
        let (refusal, waited) = loop {
            let env = envelope(&q, "a@customer.test");
            let started = Instant::now();
            match q.insert(vec![(env, data.clone())]).await {
                Ok(()) => taken += 1,
                Err(e) => break (e.to_string(), started.elapsed()),
            }
            assert!(taken < 100, "never refused with the index stuck");
        };
        // Two full 16 MiB segments (seven 2 MiB messages each) wait before mail does.
        assert!(taken >= 14, "refused after {taken} messages: {refusal}");
        assert!(refusal.contains("no checkpoint ended within 200ms"), "{refusal}");
        assert!(waited >= Duration::from_millis(200), "refused after {waited:?}, without waiting for the index");
        drop(stuck);
        q.flush().await.expect("the index moves again");
        let env = envelope(&q, "a@customer.test");
        q.insert(vec![(env, data)]).await.expect("taken again");
        q.close();
    }
}
