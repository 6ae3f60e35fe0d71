//! The message data path: reading DATA canonically, and writing it out dot-stuffed.
//!
//! Inbound, the only end of data is `<CR><LF>.<CR><LF>`. A bare LF ends a line as if it were
//! CRLF (Postfix 3.9's `smtpd_forbid_bare_newline = normalize`), and a stray CR is replaced
//! by a space (Postfix's `cleanup_replace_stray_cr_lf`). What is queued therefore holds only
//! CRLF line ends, so nothing a client sends can end the message early downstream: outbound
//! data is that canonical text, dot-stuffed, followed by `.<CR><LF>`.
//!
//! [`read_data`] grows its buffer only with the caller's leave, so the caller can bound the
//! memory that all messages arriving at once hold; [`dot_stuff_window`] writes a large
//! message a window at a time instead of copying it whole.
//!
//! [`header_summary`] reads what intake needs from the header section in one pass: the
//! `Received:` count that detects mail loops, and the `Message-ID` for the log.
//!
//! [`address`] reads envelope addresses the SMTP parser does not (address literals) and writes
//! them back in their wire form, quoting local parts that the parser unquoted.
#![forbid(unsafe_code)]

pub mod address;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// How reading DATA ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataEnd {
    /// `<CR><LF>.<CR><LF>` was read; the message is complete.
    Complete,
    /// Complete, but larger than the limit; the content was discarded.
    TooLarge,
    /// Complete, but memory to hold it was refused; the content was discarded.
    NoRoom,
    /// The connection closed before the end of data.
    Eof,
}

/// What was changed while canonicalising, for logging.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Normalised {
    /// Lines that ended in a bare LF.
    pub bare_lf: u32,
    /// Stray CR characters replaced by spaces.
    pub stray_cr: u32,
}

/// Reads DATA up to the end marker into `out` (canonical, unstuffed). Bytes after `max_size`
/// are discarded but still read, so the session stays in sync.
///
/// `out` grows only with leave from `room`, which is asked for each capacity before `out`
/// takes it, and told `0` once the content is discarded. So the caller can bound the memory
/// that all messages arriving at once hold ([`DataEnd::NoRoom`] when it does). Capacity
/// doubles, as a `Vec`'s would, up to `max_size`.
pub async fn read_data<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    out: &mut Vec<u8>,
    max_size: u64,
    mut room: impl FnMut(usize) -> bool,
) -> std::io::Result<(DataEnd, Normalised)> {
    let mut line = Vec::with_capacity(1024);
    let mut fixed = Normalised::default();
    let mut discarded: Option<DataEnd> = None;
    // The end marker counts only after a real CRLF: `<LF>.<CR><LF>` is not an end of data.
    let mut after_crlf = true;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).await?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Ok((DataEnd::Eof, fixed));
        }
        if after_crlf && line == b".\r\n" {
            return Ok((discarded.unwrap_or(DataEnd::Complete), fixed));
        }
        after_crlf = line.ends_with(b"\r\n");
        if discarded.is_some() {
            continue;
        }
        let content = match line.strip_suffix(b"\r\n") {
            Some(c) => c,
            None => {
                fixed.bare_lf += 1;
                &line[..line.len() - 1]
            }
        };
        // RFC 5321 §4.5.2: a leading period on a line with more on it was added by the sender.
        let content = match content {
            [b'.', rest @ ..] if !rest.is_empty() => rest,
            other => other,
        };
        let needed = out.len() + content.len() + 2;
        let end = if needed as u64 > max_size {
            Some(DataEnd::TooLarge)
        } else if needed > out.capacity() {
            let capacity = (out.capacity() * 2).max(needed).min(max_size as usize);
            if room(capacity) {
                out.reserve_exact(capacity - out.len());
                None
            } else {
                Some(DataEnd::NoRoom)
            }
        } else {
            None
        };
        if end.is_some() {
            discarded = end;
            *out = Vec::new();
            room(0);
            continue;
        }
        // Copied in runs between stray CRs (almost always one run): a byte-at-a-time copy
        // cost more than the rest of reading DATA.
        let mut from = 0;
        for at in memchr::memchr_iter(b'\r', content) {
            fixed.stray_cr += 1;
            out.extend_from_slice(&content[from..at]);
            out.push(b' ');
            from = at + 1;
        }
        out.extend_from_slice(&content[from..]);
        out.extend_from_slice(b"\r\n");
    }
}

/// Appends `data` (canonical CRLF text) to `wire`, dot-stuffed and terminated by `.<CR><LF>`.
pub fn dot_stuff(data: &[u8], wire: &mut Vec<u8>) {
    dot_stuff_window(data, 0..data.len(), wire);
}

/// [`dot_stuff`] for the part `window` of `data`, so that a large message can be sent a
/// window at a time instead of copied whole: the windows of `data`, in order, append what
/// [`dot_stuff`] would. The terminator comes with the window that ends `data`.
pub fn dot_stuff_window(data: &[u8], window: std::ops::Range<usize>, wire: &mut Vec<u8>) {
    let part = &data[window.clone()];
    wire.reserve(part.len() + part.len() / 64 + 5);
    let at_line_start = window.start == 0 || data[window.start - 1] == b'\n';
    if at_line_start && part.first() == Some(&b'.') {
        wire.push(b'.');
    }
    // Copied in runs between the lines that start with a period. A line that starts in the
    // next window is that window's first byte, checked above.
    let mut from = 0;
    for at in memchr::memmem::find_iter(part, b"\n.") {
        wire.extend_from_slice(&part[from..=at]);
        wire.push(b'.');
        from = at + 1;
    }
    wire.extend_from_slice(&part[from..]);
    if window.end == data.len() {
        if !data.is_empty() && !data.ends_with(b"\n") {
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b".\r\n");
    }
}

/// What the relay reads from a message's header section, in one pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderSummary {
    /// How many `Received:` fields it holds: the hops the message has made, by which
    /// RFC 5321 §6.3 detects mail loops.
    pub received: usize,
    /// The first `Message-ID:` field's value, unfolded and trimmed, for logs that can be
    /// matched with the filtering service's. Bytes that are not printable ASCII are shown as
    /// `?`, so a log line stays one line, and it is cut at [`MAX_LOGGED_MESSAGE_ID`] bytes.
    pub message_id: Option<String>,
}

/// The most of a Message-ID that is logged.
pub const MAX_LOGGED_MESSAGE_ID: usize = 256;

/// Whether header line `line` is field `name` (without case; the obsolete `Name :` form too).
/// Returns the value after the colon.
fn field_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let head = line.get(..name.len())?;
    if !head.eq_ignore_ascii_case(name) {
        return None;
    }
    line[name.len()..].trim_ascii_start().strip_prefix(b":")
}

/// Reads the header section of `data` (canonical CRLF text; it ends at the first empty line).
pub fn header_summary(data: &[u8]) -> HeaderSummary {
    let mut summary = HeaderSummary::default();
    let mut message_id: Option<Vec<u8>> = None;
    let mut in_message_id = false;
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', data) {
        let line = &data[start..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        start = end + 1;
        if line.is_empty() {
            break; // the end of the header section
        }
        let folded = line[0] == b' ' || line[0] == b'\t';
        if folded {
            if in_message_id && let Some(id) = message_id.as_mut() {
                id.push(b' ');
                id.extend_from_slice(line.trim_ascii());
            }
            continue;
        }
        in_message_id = false;
        if field_value(line, b"received").is_some() {
            summary.received += 1;
        } else if message_id.is_none()
            && let Some(value) = field_value(line, b"message-id")
        {
            message_id = Some(value.trim_ascii().to_vec());
            in_message_id = true;
        }
    }
    summary.message_id = message_id.map(|id| {
        let id = id.trim_ascii();
        id[..id.len().min(MAX_LOGGED_MESSAGE_ID)]
            .iter()
            .map(|&b| if (0x20..0x7f).contains(&b) { char::from(b) } else { '?' })
            .collect()
    });
    summary
}

/// RFC 5322 date-time in UTC, e.g. `Sat, 28 Nov 2026 18:48:20 +0000`.
pub fn rfc5322_date(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_fields_of_the_header_section_are_counted() {
        let message = b"Received: from a\r\n\tby b; date\r\nRECEIVED: x\r\nreceived : obsolete form\r\n\
            Received-SPF: pass\r\nX-Received: y\r\nSubject: Received: no\r\n\r\nReceived: in the body\r\n";
        assert_eq!(header_summary(message).received, 3);
        assert_eq!(header_summary(b"Subject: none\r\n\r\n").received, 0);
        assert_eq!(header_summary(b"").received, 0);
        assert_eq!(header_summary(b"Received: only line, no end").received, 0, "a line counts once it ends");
    }

    #[test]
    fn the_first_message_id_is_read_unfolded_and_safe_to_log() {
        let id = |data: &[u8]| header_summary(data).message_id;
        assert_eq!(id(b"Subject: x\r\nMessage-ID: <a@b.test>\r\n\r\nbody\r\n").as_deref(), Some("<a@b.test>"));
        assert_eq!(id(b"message-id :\r\n <folded@b.test>\r\nSubject: x\r\n\r\n").as_deref(), Some("<folded@b.test>"));
        assert_eq!(id(b"Message-ID: <first@b>\r\nMessage-ID: <second@b>\r\n\r\n").as_deref(), Some("<first@b>"));
        assert_eq!(id(b"Subject: x\r\n\r\nMessage-ID: <in-body@b>\r\n"), None, "the body is not the header");
        assert_eq!(id(b"Message-IDs: <a@b>\r\n\r\n"), None);
        assert_eq!(id(b"Message-ID: <\x1b[31m\xff@b>\r\n\r\n").as_deref(), Some("<?[31m?@b>"), "no terminal escapes in logs");
        let long = format!("Message-ID: <{}@b>\r\n\r\n", "x".repeat(1000));
        assert_eq!(id(long.as_bytes()).map(|m| m.len()), Some(MAX_LOGGED_MESSAGE_ID));
        // Folded continuation lines of other fields do not join the Message-ID.
        assert_eq!(id(b"Message-ID: <a@b>\r\nSubject: x\r\n y\r\n\r\n").as_deref(), Some("<a@b>"));
    }

    async fn read(input: &[u8], max: u64) -> (DataEnd, Normalised, Vec<u8>, Vec<u8>) {
        let mut reader = tokio::io::BufReader::new(input);
        let mut out = Vec::new();
        let (end, fixed) = read_data(&mut reader, &mut out, max, |_| true).await.expect("read");
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut rest).await.expect("rest");
        (end, fixed, out, rest)
    }

    #[tokio::test]
    async fn canonical_data_and_unstuffing() {
        let (end, fixed, out, rest) = read(b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n", 1 << 20).await;
        assert_eq!((end, fixed), (DataEnd::Complete, Normalised::default()));
        assert_eq!(out, b"Subject: x\r\n\r\n.dot\r\n");
        assert_eq!(rest, b"QUIT\r\n");
    }

    /// Every known SMTP smuggling end-of-data variant must stay inside the one message.
    #[tokio::test]
    async fn smuggling_variants_never_end_the_message() {
        for sep in [&b"\n.\n"[..], b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r\n.\n", b"\r.\r\n", b"\r\r\n.\r\r\n", b"\r\n.\r\r\n"] {
            let mut input = b"Subject: one\r\n\r\nbody".to_vec();
            input.extend_from_slice(sep);
            input.extend_from_slice(b"MAIL FROM:<evil@example.com>\r\n.\r\n");
            let (end, _, out, rest) = read(&input, 1 << 20).await;
            assert_eq!(end, DataEnd::Complete, "{sep:?}");
            assert!(rest.is_empty(), "{sep:?} ended the message early: rest {rest:?}");
            assert!(out.windows(20).any(|w| w == b"MAIL FROM:<evil@exam"), "{sep:?}");
            // Canonical: no CR or LF outside CRLF pairs.
            for (i, &b) in out.iter().enumerate() {
                match b {
                    b'\r' => {
                        assert_eq!(out.get(i + 1), Some(&b'\n'), "{sep:?}: stray CR in {out:?}")
                    }
                    b'\n' => assert_eq!(out.get(i.wrapping_sub(1)), Some(&b'\r'), "{sep:?}: bare LF in {out:?}"),
                    _ => {}
                }
            }
            // And written out again, it holds exactly one end-of-data marker, at the end.
            let mut wire = Vec::new();
            dot_stuff(&out, &mut wire);
            let marker = b"\r\n.\r\n";
            let count = wire.windows(marker.len()).filter(|w| *w == marker).count();
            assert_eq!(count, 1, "{sep:?}: {wire:?}");
            assert!(wire.ends_with(marker));
        }
    }

    #[tokio::test]
    async fn stray_crs_become_spaces_and_are_counted() {
        let (end, fixed, out, _) = read(b"a\rb\r\rc\r\n\rd\ne\r\n.\r\n", 1 << 20).await;
        assert_eq!(end, DataEnd::Complete);
        assert_eq!(fixed, Normalised { bare_lf: 1, stray_cr: 4 });
        assert_eq!(out, b"a b  c\r\n d\r\ne\r\n");
    }

    #[tokio::test]
    async fn oversize_is_read_to_the_end_and_discarded() {
        let mut input = Vec::new();
        for _ in 0..100 {
            input.extend_from_slice(b"0123456789012345678901234567890123456789\r\n");
        }
        input.extend_from_slice(b".\r\nQUIT\r\n");
        let (end, _, out, rest) = read(&input, 1000).await;
        assert_eq!(end, DataEnd::TooLarge);
        assert_eq!((out.len(), out.capacity()), (0, 0), "the memory is given back");
        assert_eq!(rest, b"QUIT\r\n");
    }

    /// `out` takes no capacity that `room` did not grant, capacities double up to the limit,
    /// and a refusal discards the content (reported with `0`) but reads to the end.
    #[tokio::test]
    async fn memory_is_taken_only_with_leave() {
        let line = b"0123456789012345678901234567890123456789\r\n";
        let mut input = line.repeat(1000);
        input.extend_from_slice(b".\r\nQUIT\r\n");
        let mut granted = Vec::new();
        let mut out = Vec::new();
        let mut reader = tokio::io::BufReader::new(&input[..]);
        let ask = |capacity| {
            granted.push(capacity);
            true
        };
        let (end, _) = read_data(&mut reader, &mut out, 1 << 20, ask).await.expect("read");
        assert_eq!(end, DataEnd::Complete);
        assert_eq!(out.len(), 42_000);
        assert!(out.capacity() <= *granted.last().expect("asked"), "{} > {granted:?}", out.capacity());
        assert!(granted.windows(2).all(|w| w[1] >= 2 * w[0]), "{granted:?}");
        assert!(granted.len() < 20, "asked once per doubling: {granted:?}");
        // Capped at the limit, not doubled past it.
        let mut granted = Vec::new();
        let ask = |capacity| {
            granted.push(capacity);
            true
        };
        let (end, _) = read_data(&mut tokio::io::BufReader::new(&input[..]), &mut Vec::new(), 42_000, ask).await.expect("read");
        assert_eq!(end, DataEnd::Complete);
        assert_eq!(granted.last(), Some(&42_000));

        // Refused past 4 KiB: the rest is read and discarded, and the grant given back.
        let mut asked = Vec::new();
        let ask = |capacity| {
            asked.push(capacity);
            capacity <= 4096
        };
        let mut out = Vec::new();
        let mut reader = tokio::io::BufReader::new(&input[..]);
        let (end, _) = read_data(&mut reader, &mut out, 1 << 20, ask).await.expect("read");
        assert_eq!(end, DataEnd::NoRoom);
        assert_eq!((out.len(), out.capacity()), (0, 0));
        assert_eq!(asked.last(), Some(&0), "{asked:?}");
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut rest).await.expect("rest");
        assert_eq!(rest, b"QUIT\r\n");
    }

    #[tokio::test]
    async fn eof_before_the_end_is_not_a_message() {
        assert_eq!(read(b"Subject: x\r\n\r\nbody\r\n", 1 << 20).await.0, DataEnd::Eof);
        assert_eq!(read(b"Subject: x\r\n.", 1 << 20).await.0, DataEnd::Eof);
    }

    #[test]
    fn dot_stuffing() {
        let mut wire = Vec::new();
        dot_stuff(b".a\r\nb\r\n.\r\n", &mut wire);
        assert_eq!(wire, b"..a\r\nb\r\n..\r\n.\r\n");
        wire.clear();
        dot_stuff(b"no final newline", &mut wire);
        assert_eq!(wire, b"no final newline\r\n.\r\n");
        wire.clear();
        dot_stuff(b"", &mut wire);
        assert_eq!(wire, b".\r\n");
    }

    /// The run-copying `dot_stuff` against the rule applied one byte at a time, on inputs
    /// dense in periods, CRs and LFs.
    #[test]
    fn dot_stuffing_matches_the_bytewise_rule() {
        let bytewise = |data: &[u8]| {
            let mut wire = Vec::new();
            let mut at_line_start = true;
            for &b in data {
                if at_line_start && b == b'.' {
                    wire.push(b'.');
                }
                wire.push(b);
                at_line_start = b == b'\n';
            }
            if !at_line_start {
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b".\r\n");
            wire
        };
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for len in 0..400 {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    [b'.', b'\r', b'\n', b'a'][(seed % 4) as usize]
                })
                .collect();
            let mut wire = Vec::new();
            dot_stuff(&data, &mut wire);
            let expected = bytewise(&data);
            assert_eq!(wire, expected, "{data:?}");
            // In windows of every size, the same bytes.
            for size in 1..=len.max(1) {
                let mut wire = Vec::new();
                let mut at = 0;
                loop {
                    let end = (at + size).min(len);
                    dot_stuff_window(&data, at..end, &mut wire);
                    at = end;
                    if at == len {
                        break;
                    }
                }
                assert_eq!(wire, expected, "windows of {size}: {data:?}");
            }
        }
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(1_795_891_700), "Sat, 28 Nov 2026 18:48:20 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
    }
}
