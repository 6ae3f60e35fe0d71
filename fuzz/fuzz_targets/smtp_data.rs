//! DATA as a client sends it: whatever the bytes, what is queued has only CRLF line ends,
//! what is sent on holds exactly one end-of-data marker, at its end, and the hop count never
//! panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxrelay_message_data::{DataEnd, dot_stuff, read_data, received_headers};

fuzz_target!(|input: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let mut reader = tokio::io::BufReader::new(input);
    let mut out = Vec::new();
    let (end, _) = runtime.block_on(read_data(&mut reader, &mut out, 1 << 20)).expect("in-memory read");
    if end != DataEnd::Complete {
        return;
    }
    for (i, &b) in out.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(out.get(i + 1), Some(&b'\n'), "stray CR queued"),
            b'\n' => assert!(i > 0 && out[i - 1] == b'\r', "bare LF queued"),
            _ => {}
        }
    }
    // The hop count scans header lines: at most one per line, whatever the bytes.
    assert!(received_headers(&out) <= out.iter().filter(|&&b| b == b'\n').count());
    let mut wire = Vec::new();
    dot_stuff(&out, &mut wire);
    let marker = b"\r\n.\r\n";
    let markers = wire.windows(marker.len()).filter(|w| *w == marker).count() + usize::from(wire.starts_with(b".\r\n"));
    assert_eq!(markers, 1, "smuggled end of data: {wire:?}");
    assert!(wire.ends_with(b".\r\n"));
});
