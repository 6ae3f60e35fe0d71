//! Delivery status notifications (RFC 3464): what the sender gets back when mail fails
//! permanently, expires, or is delayed.
//!
//! A notification is itself queued and delivered like any message, with the null reverse
//! path, so a failed notification never causes another one.

use std::fmt::Write as _;

use crate::data::rfc5322_date;
use crate::queue::format_id;

/// Why the sender is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The recipients failed for good (`Action: failed`).
    Failed,
    /// The message is still queued after `delay_warning` (`Action: delayed`).
    Delayed,
}

/// One recipient's line in the report.
#[derive(Debug, Clone)]
pub struct RecipientStatus {
    /// The recipient address.
    pub recipient: String,
    /// The server's reply or the reason, as logged (`127.0.0.1:25: RCPT: 550 5.1.1 ...`).
    pub diagnostic: String,
    /// The RFC 3463 status when the relay decided it (e.g. `4.4.7` on expiry); otherwise it
    /// is read from the diagnostic.
    pub status: Option<&'static str>,
}

/// Everything a notification says.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    /// Failed or delayed.
    pub action: Action,
    /// The relay's host name.
    pub reporting_mta: &'a str,
    /// The original message's queue ID.
    pub queue_id: u64,
    /// When the original arrived, seconds since the epoch.
    pub arrival_secs: u64,
    /// Now, seconds since the epoch.
    pub now_secs: u64,
    /// For delays: when the relay gives up, seconds since the epoch.
    pub retry_until_secs: Option<u64>,
    /// The envelope sender the report goes to.
    pub sender: &'a str,
    /// Per recipient.
    pub recipients: &'a [RecipientStatus],
}

/// The RFC 3463 status code in a reply (`550 5.1.1 ...` → `5.1.1`), or one derived from the
/// reply code, or `fallback`.
pub fn status_of(diagnostic: &str, fallback: &str) -> String {
    let words: Vec<&str> = diagnostic.split_whitespace().collect();
    for pair in words.windows(2) {
        let (code, enhanced) = (pair[0], pair[1]);
        let parts: Vec<&str> = enhanced.split('.').collect();
        let is_code = code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit());
        if is_code && parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
            return enhanced.to_string();
        }
    }
    for w in &words {
        if w.len() == 3 && w.bytes().all(|b| b.is_ascii_digit()) && (w.starts_with('4') || w.starts_with('5')) {
            return format!("{}.0.0", &w[..1]);
        }
    }
    fallback.to_string()
}

/// The server part of a diagnostic (`127.0.0.1:25: RCPT: ...` → `127.0.0.1:25`).
fn remote_mta(diagnostic: &str) -> Option<&str> {
    let (first, _) = diagnostic.split_once(": ")?;
    (first.contains(':') || first.contains('.')).then_some(first)
}

/// The notification as a message (headers and MIME body, CRLF line ends), with the original
/// message's headers attached.
pub fn build(report: &Report<'_>, original: &[u8]) -> Vec<u8> {
    let boundary = format!("{}/{}", format_id(report.queue_id), report.reporting_mta);
    let (subject, intro, fallback) = match report.action {
        Action::Failed => (
            "Undelivered Mail Returned to Sender",
            "Your message could not be delivered to the recipients below. This is a permanent error; it will not be retried.",
            "5.0.0",
        ),
        Action::Delayed => (
            "Delayed Mail (still being retried)",
            "Your message has not been delivered yet to the recipients below. Delivery is still being retried; no action is needed.",
            "4.0.0",
        ),
    };
    let mut m = String::new();
    let _ = write!(m, "From: Mail Delivery System <MAILER-DAEMON@{}>\r\n", report.reporting_mta);
    let _ = write!(m, "To: <{}>\r\n", report.sender);
    let _ = write!(m, "Subject: {subject}\r\n");
    let _ = write!(m, "Date: {}\r\n", rfc5322_date(report.now_secs));
    let _ = write!(m, "Message-ID: <{}.{}.dsn@{}>\r\n", format_id(report.queue_id), report.now_secs, report.reporting_mta);
    m.push_str("Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n");
    let _ = write!(m, "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n");
    let _ = write!(m, "--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n");
    let _ = write!(m, "This is the mail system at {}.\r\n\r\n{intro}\r\n\r\n", report.reporting_mta);
    for r in report.recipients {
        let _ = write!(m, "<{}>: {}\r\n", r.recipient, r.diagnostic.replace(['\r', '\n'], " "));
    }
    let _ = write!(m, "\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n");
    let _ = write!(m, "Reporting-MTA: dns; {}\r\n", report.reporting_mta);
    let _ = write!(m, "X-Mxrelay-Queue-ID: {}\r\n", format_id(report.queue_id));
    let _ = write!(m, "Arrival-Date: {}\r\n", rfc5322_date(report.arrival_secs));
    for r in report.recipients {
        let _ = write!(m, "\r\nFinal-Recipient: rfc822; {}\r\n", r.recipient);
        let action = match report.action {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
        };
        let status = r.status.map_or_else(|| status_of(&r.diagnostic, fallback), str::to_string);
        let _ = write!(m, "Action: {action}\r\nStatus: {status}\r\n");
        if let Some(mta) = remote_mta(&r.diagnostic) {
            let _ = write!(m, "Remote-MTA: dns; {mta}\r\n");
        }
        let _ = write!(m, "Diagnostic-Code: smtp; {}\r\n", r.diagnostic.replace(['\r', '\n'], " "));
        let _ = write!(m, "Last-Attempt-Date: {}\r\n", rfc5322_date(report.now_secs));
        if let Some(until) = report.retry_until_secs {
            let _ = write!(m, "Will-Retry-Until: {}\r\n", rfc5322_date(until));
        }
    }
    let _ = write!(m, "\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n");
    let mut out = m.into_bytes();
    // The original's header section: everything up to the first empty line.
    let end = original.windows(4).position(|w| w == b"\r\n\r\n").map_or(original.len(), |i| i + 2);
    out.extend_from_slice(&original[..end]);
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_from_replies() {
        assert_eq!(status_of("127.0.0.1:25: RCPT: 550 5.1.1 no such user", "5.0.0"), "5.1.1");
        assert_eq!(status_of("127.0.0.1:25: MAIL: 554 rejected", "5.0.0"), "5.0.0");
        assert_eq!(status_of("127.0.0.1:25: 452 4.2.2 mailbox full", "4.0.0"), "4.2.2");
        assert_eq!(status_of("every server of the domain is down", "4.4.7"), "4.4.7");
    }

    #[test]
    fn a_report_has_the_three_parts() {
        let rcpts = [RecipientStatus {
            recipient: "user@customer.test".into(),
            diagnostic: "127.0.1.1:25: RCPT: 550 5.1.1 no such user".into(),
            status: None,
        }];
        let report = Report {
            action: Action::Failed,
            reporting_mta: "relay.test",
            queue_id: 0xABC,
            arrival_secs: 1_795_891_700,
            now_secs: 1_795_891_800,
            retry_until_secs: None,
            sender: "a@src.test",
            recipients: &rcpts,
        };
        let text = String::from_utf8(build(&report, b"Subject: hello\r\nFrom: a@src.test\r\n\r\nbody\r\n")).expect("utf8");
        for needle in [
            "Content-Type: multipart/report; report-type=delivery-status",
            "Reporting-MTA: dns; relay.test",
            "Final-Recipient: rfc822; user@customer.test",
            "Action: failed",
            "Status: 5.1.1",
            "Remote-MTA: dns; 127.0.1.1:25",
            "Diagnostic-Code: smtp; 127.0.1.1:25: RCPT: 550 5.1.1 no such user",
            "Content-Type: text/rfc822-headers\r\n\r\nSubject: hello\r\nFrom: a@src.test\r\n",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert!(!text.contains("body"), "only the headers of the original are returned");
        assert!(text.ends_with("--\r\n"));
    }
}
