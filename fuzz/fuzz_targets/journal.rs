//! Journal segments as replay reads them after a crash: never a panic, whatever the bytes,
//! and every record read back encodes to exactly the bytes it was read from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxrelay_journal::{Batch, Next, SegmentReader};

const SEQ: u64 = 7;

fuzz_target!(|bytes: &[u8]| {
    let mut reader = SegmentReader::new(bytes, bytes.len() as u64, SEQ);
    let mut batch = Batch::default();
    while let Ok(Next::Record(record)) = reader.next_record() {
        batch.push(&record).expect("a record read back encodes again");
    }
    let again = batch.sealed_bytes(SEQ);
    assert_eq!(again, &bytes[..again.len()], "decode then encode is the identity");
});
