//! The queue's write-ahead journal.
//!
//! Accepted mail becomes durable by appending one record per envelope to the current
//! segment file and calling `fdatasync` once for the whole group commit: one write and one
//! sync, however many sessions share them. The queue's index (redb) is brought up to date
//! from the same operations later, in batches, and checkpointed now and then; after a crash,
//! the segments left since the last checkpoint are replayed into it in order.
//!
//! A segment is `<sequence as 16 hex digits>.wal`, written in full (with zeros) when it is
//! created and recycled after a checkpoint (as `<sequence>.spare`) instead of deleted: a
//! sync that only overwrites blocks already on disk allocates none, which makes it about
//! half as costly. Spares are only room held in reserve: [`release_spares`] gives it back
//! to a full disk. A new queue's journal is marked as holding its whole history
//! ([`mark_whole_history`]) until the first segment is retired, so that its index can be
//! rebuilt from the segments alone. Each record's checksum covers the segment's sequence
//! number, so the records a recycled segment held before do not read back. Records:
//!
//! ```text
//! [body length: u32 LE][CRC-32 of (sequence: u64 LE, body): u32 LE][body]
//! body = [kind: u8][queue ID: u64 LE] and then, by kind:
//!   1 insert: [envelope length: u32 LE][envelope][message data]
//!   2 update: [envelope]
//!   3 remove: nothing
//! ```
//!
//! An all-zero header ends a segment. A record cut short or failing its checksum ends it
//! too: it is either the torn tail of a write whose sync never returned, so nothing in it
//! was acknowledged, or what a recycled segment held before.
#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Size of a new segment (larger when one group commit needs more).
pub const SEGMENT_BYTES: u64 = 16 << 20;
/// Recycled segments kept for later.
const SPARES_KEPT: usize = 2;
const HEADER_BYTES: usize = 8;
const SUFFIX: &str = ".wal";
const SPARE_SUFFIX: &str = ".spare";
/// Present while no segment was ever retired (see [`holds_whole_history`]).
const WHOLE_HISTORY: &str = "whole-history";

const INSERT: u8 = 1;
const UPDATE: u8 = 2;
const REMOVE: u8 = 3;

/// Why the journal cannot do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The segment or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A record (or one of its parts) does not fit the format's 32-bit lengths.
    #[error("record of {0} bytes is too large for the journal")]
    TooLarge(usize),
    /// A group commit does not fit in what is left of the segment; start a new one.
    #[error("segment {seq:016x} has {remaining} bytes left, {needed} needed")]
    SegmentFull {
        /// The segment's sequence number.
        seq: u64,
        /// Bytes left.
        remaining: u64,
        /// Bytes asked for.
        needed: usize,
    },
    /// A record body with a valid checksum that is not a record.
    #[error("malformed record: {0}")]
    Malformed(String),
}

/// Turns an I/O error on `path` into a [`JournalError`] (for `map_err`), also for callers
/// that handle the journal's files themselves (replay, setting a damaged segment aside).
pub fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io { path: path.to_path_buf(), source }
}

/// One queue operation as journaled. Envelopes are opaque bytes to the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// A newly accepted envelope and its message data.
    Insert {
        /// Queue ID.
        id: u64,
        /// The serialized envelope.
        envelope: &'a [u8],
        /// The message data.
        data: &'a [u8],
    },
    /// A new state for an envelope (schedule, recipients left).
    Update {
        /// Queue ID.
        id: u64,
        /// The serialized envelope.
        envelope: &'a [u8],
    },
    /// The envelope is finished: delivered, bounced or removed.
    Remove {
        /// Queue ID.
        id: u64,
    },
}

/// Records of one group commit, encoded; their checksums are sealed by [`Journal::append`]
/// with the sequence number of the segment they go to.
#[derive(Debug, Default)]
pub struct Batch {
    buf: Vec<u8>,
}

impl Batch {
    /// Adds a record.
    pub fn push(&mut self, record: &Record<'_>) -> Result<(), JournalError> {
        record.encode(&mut self.buf)
    }

    /// Bytes the batch takes in a segment.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether it holds no records.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Empties it, keeping the allocation.
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// The batch's bytes as they go to segment `seq`.
    pub fn sealed_bytes(&mut self, seq: u64) -> &[u8] {
        self.seal(seq);
        &self.buf
    }

    /// Fills in each record's checksum for segment `seq`.
    fn seal(&mut self, seq: u64) {
        let mut at = 0;
        while at + HEADER_BYTES <= self.buf.len() {
            let len = u32::from_le_bytes([self.buf[at], self.buf[at + 1], self.buf[at + 2], self.buf[at + 3]]) as usize;
            let body = at + HEADER_BYTES;
            let crc = checksum(seq, &self.buf[body..body + len]);
            self.buf[at + 4..body].copy_from_slice(&crc.to_le_bytes());
            at = body + len;
        }
    }
}

fn checksum(seq: u64, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(body);
    h.finalize()
}

impl<'a> Record<'a> {
    /// Appends the record to `out`, its header's checksum left for [`Batch::seal`].
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), JournalError> {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_BYTES]);
        match *self {
            Record::Insert { id, envelope, data } => {
                let envelope_len = u32::try_from(envelope.len()).map_err(|_| JournalError::TooLarge(envelope.len()))?;
                out.push(INSERT);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&envelope_len.to_le_bytes());
                out.extend_from_slice(envelope);
                out.extend_from_slice(data);
            }
            Record::Update { id, envelope } => {
                out.push(UPDATE);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(envelope);
            }
            Record::Remove { id } => {
                out.push(REMOVE);
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
        let body_len = out.len() - start - HEADER_BYTES;
        let Ok(len) = u32::try_from(body_len) else {
            out.truncate(start);
            return Err(JournalError::TooLarge(body_len));
        };
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        Ok(())
    }

    /// Reads a record body (what follows the header).
    pub fn decode(body: &'a [u8]) -> Result<Record<'a>, JournalError> {
        let malformed = |what: &str| JournalError::Malformed(what.to_string());
        let (&kind, rest) = body.split_first().ok_or_else(|| malformed("empty record"))?;
        let (id, rest) = rest.split_first_chunk::<8>().ok_or_else(|| malformed("record shorter than its queue ID"))?;
        let id = u64::from_le_bytes(*id);
        match kind {
            INSERT => {
                let (len, rest) = rest.split_first_chunk::<4>().ok_or_else(|| malformed("insert without an envelope length"))?;
                let len = u32::from_le_bytes(*len) as usize;
                if len > rest.len() {
                    return Err(JournalError::Malformed(format!(
                        "insert's envelope length {len} runs past the record's {} bytes",
                        rest.len()
                    )));
                }
                let (envelope, data) = rest.split_at(len);
                Ok(Record::Insert { id, envelope, data })
            }
            UPDATE => Ok(Record::Update { id, envelope: rest }),
            REMOVE if rest.is_empty() => Ok(Record::Remove { id }),
            REMOVE => Err(malformed("remove with trailing bytes")),
            other => Err(JournalError::Malformed(format!("unknown record kind {other}"))),
        }
    }
}

/// How a segment's records end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentEnd {
    /// At the end of the file or at the zeros after the last record.
    Clean,
    /// A record cut short or failing its checksum: an unacknowledged write.
    Torn {
        /// Where the record starts.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A record with a valid checksum that is not a record (a format this build does not
    /// know, or damage the checksum missed).
    Corrupt {
        /// Where the record starts.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
}

/// What [`SegmentReader::next_record`] found.
#[derive(Debug)]
pub enum Next<'a> {
    /// The next record.
    Record(Record<'a>),
    /// No more records.
    End(SegmentEnd),
}

/// Reads a segment's records in order.
#[derive(Debug)]
pub struct SegmentReader<R> {
    reader: R,
    seq: u64,
    offset: u64,
    size: u64,
    body: Vec<u8>,
    ended: Option<SegmentEnd>,
}

impl SegmentReader<BufReader<File>> {
    /// Opens a segment file.
    pub fn open(segment: &Segment) -> Result<Self, JournalError> {
        let path = &segment.path;
        let file = File::open(path).map_err(io_error(path))?;
        let size = file.metadata().map_err(io_error(path))?.len();
        Ok(SegmentReader::new(BufReader::with_capacity(256 * 1024, file), size, segment.seq))
    }
}

impl<R: Read> SegmentReader<R> {
    /// Reads the records of segment `seq` from `reader`, which holds `size` bytes.
    pub fn new(reader: R, size: u64, seq: u64) -> Self {
        SegmentReader { reader, seq, offset: 0, size, body: Vec::new(), ended: None }
    }

    /// The next record, or how the segment ends. Only I/O errors are errors: damage ends
    /// the segment and is reported in [`SegmentEnd`].
    pub fn next_record(&mut self) -> std::io::Result<Next<'_>> {
        if let Some(end) = &self.ended {
            return Ok(Next::End(end.clone()));
        }
        let offset = self.offset;
        let left = self.size - offset;
        if left == 0 {
            return Ok(self.end(SegmentEnd::Clean));
        }
        let torn = |reason: &str| SegmentEnd::Torn { offset, reason: reason.to_string() };
        if left < HEADER_BYTES as u64 {
            return Ok(self.end(torn("record header cut short")));
        }
        let mut header = [0u8; HEADER_BYTES];
        if let Err(e) = self.reader.read_exact(&mut header) {
            return if e.kind() == ErrorKind::UnexpectedEof { Ok(self.end(torn("record header cut short"))) } else { Err(e) };
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 {
            return Ok(self.end(if crc == 0 { SegmentEnd::Clean } else { torn("zero length with a checksum") }));
        }
        if u64::from(len) > left - HEADER_BYTES as u64 {
            return Ok(self.end(torn("record runs past the end of the segment")));
        }
        self.body.resize(len as usize, 0);
        if let Err(e) = self.reader.read_exact(&mut self.body) {
            return if e.kind() == ErrorKind::UnexpectedEof { Ok(self.end(torn("record cut short"))) } else { Err(e) };
        }
        if checksum(self.seq, &self.body) != crc {
            return Ok(self.end(torn("checksum mismatch")));
        }
        // Fields, not methods, from here: the record borrows `body` while `offset` or
        // `ended` change.
        match Record::decode(&self.body) {
            Ok(record) => {
                self.offset += HEADER_BYTES as u64 + u64::from(len);
                Ok(Next::Record(record))
            }
            Err(e) => {
                let end = SegmentEnd::Corrupt { offset, reason: e.to_string() };
                self.ended = Some(end.clone());
                Ok(Next::End(end))
            }
        }
    }

    fn end(&mut self, end: SegmentEnd) -> Next<'static> {
        self.ended = Some(end.clone());
        Next::End(end)
    }
}

/// A segment found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Sequence number: later segments have larger ones.
    pub seq: u64,
    /// The file.
    pub path: PathBuf,
}

/// The segments in `dir`, oldest first. Spares and other files are left out.
pub fn segments(dir: &Path) -> Result<Vec<Segment>, JournalError> {
    let mut found = files(dir, SUFFIX)?;
    found.sort_by_key(|s| s.seq);
    Ok(found)
}

fn files(dir: &Path, suffix: &str) -> Result<Vec<Segment>, JournalError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name();
        let Some(seq) = name.to_str().and_then(|n| n.strip_suffix(suffix)).and_then(|n| u64::from_str_radix(n, 16).ok()) else {
            continue;
        };
        found.push(Segment { seq, path: entry.path() });
    }
    Ok(found)
}

/// Makes a directory entry change (a segment created, renamed or removed) durable.
pub fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))
}

/// Marks the journal of a new queue as holding its whole history: every operation since the
/// queue began, so that its index can be rebuilt from the segments alone. The mark goes with
/// the first segment [`retire`] retires.
pub fn mark_whole_history(dir: &Path) -> Result<(), JournalError> {
    let path = dir.join(WHOLE_HISTORY);
    File::create(&path).map_err(io_error(&path))?;
    sync_dir(dir)
}

/// Whether the segments hold every operation since the queue began ([`mark_whole_history`]).
pub fn holds_whole_history(dir: &Path) -> bool {
    dir.join(WHOLE_HISTORY).exists()
}

/// Retires segments a checkpoint covers: up to two are kept as spares for recycling, the
/// rest are removed. The first retirement ends the journal's whole history, durably before
/// any segment goes.
pub fn retire(dir: &Path, covered: &[Segment]) -> Result<(), JournalError> {
    let whole = dir.join(WHOLE_HISTORY);
    if !covered.is_empty() && whole.exists() {
        std::fs::remove_file(&whole).map_err(io_error(&whole))?;
        sync_dir(dir)?;
    }
    let mut spares = files(dir, SPARE_SUFFIX)?.len();
    for segment in covered {
        if spares < SPARES_KEPT {
            let spare = segment.path.with_file_name(format!("{:016x}{SPARE_SUFFIX}", segment.seq));
            std::fs::rename(&segment.path, &spare).map_err(io_error(&segment.path))?;
            spares += 1;
        } else {
            std::fs::remove_file(&segment.path).map_err(io_error(&segment.path))?;
        }
    }
    Ok(())
}

/// Where a spare is made before it is renamed: a name `segments` and `Journal::start` ignore.
fn prepared_spare_path(dir: &Path) -> PathBuf {
    dir.join(format!("prepared{SPARE_SUFFIX}.tmp"))
}

/// Removes every spare segment (and one being made): they are only room set aside, which
/// a full disk may need more. Returns how many were removed.
pub fn release_spares(dir: &Path) -> Result<usize, JournalError> {
    let spares = files(dir, SPARE_SUFFIX)?;
    for spare in &spares {
        std::fs::remove_file(&spare.path).map_err(io_error(&spare.path))?;
    }
    let tmp = prepared_spare_path(dir);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(io_error(&tmp)(e)),
        Ok(()) | Err(_) => {}
    }
    Ok(spares.len())
}

/// Writes zeros from `from` up to `to`: not a sparse extension, so that later syncs only
/// overwrite allocated blocks.
fn fill_with_zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let n = zeros.len().min((to - at) as usize);
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Makes a spare segment ahead of time if there is none, so that starting the next segment
/// is a rename and not 16 MiB of zeros written while mail waits. Meant for a thread other
/// than the journal's writer. Returns whether it made one.
pub fn prepare_spare(dir: &Path) -> Result<bool, JournalError> {
    if !files(dir, SPARE_SUFFIX)?.is_empty() {
        return Ok(false);
    }
    // Written under a name `segments` and `Journal::start` ignore, then renamed: a spare is
    // never taken half made.
    let tmp = prepared_spare_path(dir);
    let file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(io_error(&tmp))?;
    // On a full disk the zeros written so far are given back.
    fill_with_zeros(&file, 0, SEGMENT_BYTES).and_then(|()| file.sync_all()).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error(&tmp)(e)
    })?;
    let spare = dir.join(format!("{:016x}{SPARE_SUFFIX}", u64::MAX));
    std::fs::rename(&tmp, &spare).map_err(io_error(&tmp))?;
    sync_dir(dir)?;
    Ok(true)
}

/// The segment being appended to.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    path: PathBuf,
    seq: u64,
    file: File,
    written: u64,
    capacity: u64,
}

impl Journal {
    /// Starts segment `seq` in `dir` with room for at least `min_capacity` bytes: a spare
    /// renamed, or a new file written with zeros. Its directory entry is durable on return.
    pub fn start(dir: &Path, seq: u64, min_capacity: u64) -> Result<Journal, JournalError> {
        let path = dir.join(format!("{seq:016x}{SUFFIX}"));
        if path.exists() {
            return Err(JournalError::Io { path, source: ErrorKind::AlreadyExists.into() });
        }
        let wanted = min_capacity.max(SEGMENT_BYTES);
        let spare = files(dir, SPARE_SUFFIX)?.into_iter().next();
        let file = match spare {
            Some(spare) => {
                std::fs::rename(&spare.path, &path).map_err(io_error(&spare.path))?;
                OpenOptions::new().read(true).write(true).open(&path).map_err(io_error(&path))?
            }
            None => OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(io_error(&path))?,
        };
        let made = (|| {
            let capacity = file.metadata().map_err(io_error(&path))?.len();
            // A spare's zeros are on disk already (synced when it was made or finished): only
            // a new or too small file is written here, while the writer waits.
            if capacity < wanted {
                fill_with_zeros(&file, capacity, wanted).map_err(io_error(&path))?;
                file.sync_all().map_err(io_error(&path))?;
            }
            sync_dir(dir)?;
            Ok(capacity.max(wanted))
        })();
        match made {
            Ok(capacity) => Ok(Journal { dir: dir.to_path_buf(), path, seq, file, written: 0, capacity }),
            Err(e) => {
                // Nothing was written to it: removed, so that the next start can make it
                // again once there is room, instead of finding it there for good.
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Writes a batch after the records before it. Not durable until [`Journal::sync`].
    /// After an error the segment must not be appended to again: part of the write may be
    /// on disk, and later records would follow a torn one.
    pub fn append(&mut self, batch: &mut Batch) -> Result<(), JournalError> {
        if batch.len() as u64 > self.remaining() {
            return Err(JournalError::SegmentFull { seq: self.seq, remaining: self.remaining(), needed: batch.len() });
        }
        batch.seal(self.seq);
        self.file.write_all_at(&batch.buf, self.written).map_err(io_error(&self.path))?;
        self.written += batch.len() as u64;
        Ok(())
    }

    /// Marks the end of the records (a recycled segment holds older ones after them) and
    /// makes everything durable: the last call before the next segment starts.
    pub fn finish(&self) -> Result<(), JournalError> {
        if self.remaining() >= HEADER_BYTES as u64 {
            self.file.write_all_at(&[0; HEADER_BYTES], self.written).map_err(io_error(&self.path))?;
        }
        self.sync()
    }

    /// Makes everything appended so far durable (`fdatasync`).
    pub fn sync(&self) -> Result<(), JournalError> {
        self.file.sync_data().map_err(io_error(&self.path))
    }

    /// Bytes left in the segment.
    pub fn remaining(&self) -> u64 {
        self.capacity - self.written
    }

    /// Whether nothing was appended yet.
    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// The segment's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The directory holding the segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const SEQ: u64 = 42;

    fn records() -> Vec<Record<'static>> {
        vec![
            Record::Insert { id: 7, envelope: b"{\"id\":7}", data: b"Subject: hi\r\n\r\nbody\r\n" },
            Record::Update { id: 7, envelope: b"{\"id\":7,\"attempts\":1}" },
            Record::Insert { id: 8, envelope: b"", data: b"" },
            Record::Remove { id: 7 },
        ]
    }

    fn batch(list: &[Record<'_>]) -> Batch {
        let mut batch = Batch::default();
        for r in list {
            batch.push(r).expect("encode");
        }
        batch
    }

    fn encoded(list: &[Record<'_>]) -> Vec<u8> {
        let mut batch = batch(list);
        batch.seal(SEQ);
        batch.buf
    }

    fn debug(list: &[Record<'_>]) -> Vec<String> {
        list.iter().map(|r| format!("{r:?}")).collect()
    }

    /// Every record a reader gives, and how the segment ends.
    fn collect<R: Read>(mut reader: SegmentReader<R>) -> (Vec<String>, SegmentEnd) {
        let mut seen = Vec::new();
        loop {
            match reader.next_record().expect("read") {
                Next::Record(r) => seen.push(format!("{r:?}")),
                Next::End(end) => return (seen, end),
            }
        }
    }

    fn read_all(bytes: &[u8], seq: u64) -> (Vec<String>, SegmentEnd) {
        collect(SegmentReader::new(Cursor::new(bytes), bytes.len() as u64, seq))
    }

    fn read_segment(segment: &Segment) -> (Vec<String>, SegmentEnd) {
        collect(SegmentReader::open(segment).expect("open"))
    }

    #[test]
    fn records_read_back_in_order_and_zeros_end_the_segment() {
        let mut bytes = encoded(&records());
        assert_eq!(read_all(&bytes, SEQ), (debug(&records()), SegmentEnd::Clean));
        bytes.extend_from_slice(&[0; 4096]);
        assert_eq!(read_all(&bytes, SEQ), (debug(&records()), SegmentEnd::Clean));
    }

    #[test]
    fn records_do_not_read_back_in_another_segment() {
        let bytes = encoded(&records());
        let (seen, end) = read_all(&bytes, SEQ + 1);
        assert!(seen.is_empty());
        assert_eq!(end, SegmentEnd::Torn { offset: 0, reason: "checksum mismatch".into() });
    }

    #[test]
    fn a_torn_last_record_ends_the_segment_and_keeps_the_ones_before() {
        let whole = encoded(&records());
        let last_start = encoded(&records()[..3]).len();
        let expected = debug(&records()[..3]);
        // Cut anywhere inside the last record, with or without zeros after it.
        for cut in last_start + 1..whole.len() {
            for zeros in [0, 64] {
                let mut bytes = whole[..cut].to_vec();
                bytes.extend(std::iter::repeat_n(0u8, zeros));
                let (seen, end) = read_all(&bytes, SEQ);
                // Zeros that happen to be exactly the missing bytes make the record whole.
                let missing = &whole[cut..];
                if missing.len() <= zeros && missing.iter().all(|&b| b == 0) {
                    assert_eq!((seen.len(), end), (records().len(), SegmentEnd::Clean));
                    continue;
                }
                assert_eq!(seen, expected, "cut at {cut}, {zeros} zeros");
                assert!(matches!(end, SegmentEnd::Torn { offset, .. } if offset == last_start as u64), "cut at {cut}: {end:?}");
            }
        }
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let mut bytes = encoded(&records()[..1]);
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let (seen, end) = read_all(&bytes, SEQ);
        assert!(seen.is_empty());
        assert_eq!(end, SegmentEnd::Torn { offset: 0, reason: "checksum mismatch".into() });
    }

    #[test]
    fn a_checksummed_body_that_is_no_record_is_reported_as_corrupt() {
        let body = [9u8, 1, 2, 3, 4, 5, 6, 7, 8];
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&checksum(SEQ, &body).to_le_bytes());
        bytes.extend_from_slice(&body);
        let (_, end) = read_all(&bytes, SEQ);
        assert_eq!(end, SegmentEnd::Corrupt { offset: 0, reason: "malformed record: unknown record kind 9".into() });
    }

    #[test]
    fn segments_are_listed_oldest_first_and_appends_are_bounded_by_the_capacity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::start(dir.path(), 0x11, 0).expect("start");
        Journal::start(dir.path(), 0x2, 0).expect("start");
        std::fs::write(dir.path().join("notes.txt"), "x").expect("write");
        let seqs: Vec<u64> = segments(dir.path()).expect("list").iter().map(|s| s.seq).collect();
        assert_eq!(seqs, vec![0x2, 0x11]);
        assert!(Journal::start(dir.path(), 0x2, 0).is_err(), "a live segment is never reused");

        let mut b = batch(&records());
        j.append(&mut b).expect("append");
        j.sync().expect("sync");
        assert_eq!(j.remaining(), SEGMENT_BYTES - b.len() as u64);
        let mut too_big = Batch { buf: vec![0u8; j.remaining() as usize + 1] };
        assert!(matches!(j.append(&mut too_big), Err(JournalError::SegmentFull { .. })));
        let segment = Segment { seq: 0x11, path: dir.path().join(format!("{:016x}.wal", 0x11)) };
        assert_eq!(read_segment(&segment), (debug(&records()), SegmentEnd::Clean));
    }

    #[test]
    fn a_recycled_segment_reads_back_only_its_new_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut old = Journal::start(dir.path(), 1, 0).expect("start");
        old.append(&mut batch(&records())).expect("append");
        old.finish().expect("finish");
        let covered = segments(dir.path()).expect("list");
        retire(dir.path(), &covered).expect("retire");
        assert!(segments(dir.path()).expect("list").is_empty(), "a spare is not a segment");

        let mut new = Journal::start(dir.path(), 2, 0).expect("start");
        assert!(!dir.path().join(format!("{:016x}.spare", 1)).exists(), "the spare was recycled");
        new.append(&mut batch(&records()[3..])).expect("append");
        new.sync().expect("sync");
        // Without finish (a crash): the old records after the new one fail their checksum.
        let segment = &segments(dir.path()).expect("list")[0];
        let (seen, end) = read_segment(segment);
        assert_eq!(seen, debug(&records()[3..]));
        assert!(matches!(end, SegmentEnd::Torn { .. }), "{end:?}");
        // With finish: a clean end.
        new.finish().expect("finish");
        assert_eq!(read_segment(segment), (debug(&records()[3..]), SegmentEnd::Clean));
    }

    #[test]
    fn retire_keeps_two_spares_and_removes_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        for seq in 1..=4 {
            Journal::start(dir.path(), seq, 0).expect("start");
        }
        retire(dir.path(), &segments(dir.path()).expect("list")).expect("retire");
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(left.len(), SPARES_KEPT, "{left:?}");
    }

    #[test]
    fn the_whole_history_ends_with_the_first_retired_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!holds_whole_history(dir.path()), "an old journal is not known whole");
        mark_whole_history(dir.path()).expect("mark");
        let mut j = Journal::start(dir.path(), 1, 0).expect("start");
        j.append(&mut batch(&records())).expect("append");
        j.finish().expect("finish");
        assert_eq!(segments(dir.path()).expect("list").len(), 1, "the mark is no segment");
        retire(dir.path(), &[]).expect("retire nothing");
        assert!(holds_whole_history(dir.path()));
        retire(dir.path(), &segments(dir.path()).expect("list")).expect("retire");
        assert!(!holds_whole_history(dir.path()));
    }

    #[test]
    fn released_spares_are_gone_and_segments_stay() {
        let dir = tempfile::tempdir().expect("dir");
        for seq in 1..=3 {
            Journal::start(dir.path(), seq, 0).expect("start");
        }
        retire(dir.path(), &segments(dir.path()).expect("list")[..2]).expect("retire");
        assert!(prepare_spare(dir.path()).is_ok());
        std::fs::write(dir.path().join("prepared.spare.tmp"), b"half made").expect("tmp");
        assert_eq!(release_spares(dir.path()).expect("release"), 2);
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from(format!("{:016x}.wal", 3))], "only the segment in use is left");
        assert_eq!(release_spares(dir.path()).expect("release"), 0);
    }

    #[test]
    fn a_prepared_spare_is_taken_by_the_next_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(prepare_spare(dir.path()).expect("prepare"));
        assert!(!prepare_spare(dir.path()).expect("prepare"), "one spare is enough");
        assert!(segments(dir.path()).expect("list").is_empty(), "a spare is not a segment");
        let j = Journal::start(dir.path(), 5, 0).expect("start");
        assert_eq!(j.remaining(), SEGMENT_BYTES);
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from(format!("{:016x}.wal", 5))], "the spare became segment 5");
    }
}
