//! SMTP command lines as the relay parses them: never a panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    let mut line = line.to_vec();
    line.extend_from_slice(b"\r\n");
    let _ = smtp_proto::Request::parse(&mut line.iter());
});
