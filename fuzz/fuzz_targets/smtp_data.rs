//! DATA as a client sends it: whatever the bytes, what is queued has only CRLF line ends,
//! what is sent on holds exactly one end-of-data marker, at its end, and the header scan
//! (hop count, Message-ID for the log) never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxrelay_message_data::{DataEnd, MAX_LOGGED_MESSAGE_ID, dot_stuff, dot_stuff_window, header_summary, read_data};

fuzz_target!(|input: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let mut reader = tokio::io::BufReader::new(input);
    let mut out = Vec::new();
    // Memory granted up to a limit taken from the input, so that refusals are explored too:
    // `out` never holds more than was granted.
    let limit = usize::from(input.first().copied().unwrap_or(0)) << 8;
    let mut granted = 0;
    let room = |capacity| {
        granted = if capacity <= limit.max(1024) { capacity } else { granted };
        capacity <= limit.max(1024)
    };
    let (end, _) = runtime.block_on(read_data(&mut reader, &mut out, 1 << 20, room)).expect("in-memory read");
    assert!(out.capacity() <= granted || out.capacity() == 0, "{} > {granted}", out.capacity());
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
    // The header scan: at most one Received: per line, and a Message-ID that keeps a log
    // line one printable line, whatever the bytes.
    let headers = header_summary(&out);
    assert!(headers.received <= out.iter().filter(|&&b| b == b'\n').count());
    if let Some(id) = headers.message_id {
        assert!(id.len() <= MAX_LOGGED_MESSAGE_ID && id.bytes().all(|b| (0x20..0x7f).contains(&b)), "{id:?}");
    }
    let mut wire = Vec::new();
    dot_stuff(&out, &mut wire);
    let marker = b"\r\n.\r\n";
    let markers = wire.windows(marker.len()).filter(|w| *w == marker).count() + usize::from(wire.starts_with(b".\r\n"));
    assert_eq!(markers, 1, "smuggled end of data: {wire:?}");
    assert!(wire.ends_with(b".\r\n"));
    // Sent a window at a time (as to a server), the same bytes.
    let size = (out.len() / 3).max(1);
    let mut windowed = Vec::new();
    let mut at = 0;
    loop {
        let end = (at + size).min(out.len());
        dot_stuff_window(&out, at..end, &mut windowed);
        at = end;
        if at == out.len() {
            break;
        }
    }
    assert_eq!(windowed, wire, "windows of {size}");
});
