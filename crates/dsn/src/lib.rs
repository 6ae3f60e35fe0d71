//! Delivery status notifications (RFC 3464): what the sender gets back when mail fails
//! permanently, expires, is delayed, or is relayed to a server that will not report on it.
//!
//! The sender's requests (RFC 3461: `NOTIFY` and `ORCPT` per recipient, `RET` and `ENVID`
//! per message) travel with the message ([`DsnRequest`]): they are passed on to a server
//! that offers DSN, and they decide which notifications the relay itself sends.
//!
//! A notification is itself queued and delivered like any message, with the null reverse
//! path, so a failed notification never causes another one.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use mxrelay_message_data::address::smtp_path;
use mxrelay_message_data::rfc5322_date;

/// Longest original returned whole with `RET=FULL` (Postfix's `bounce_size_limit`); a larger
/// one is returned as headers only.
pub const FULL_RETURN_LIMIT: usize = 50_000;
/// Longest `ENVID` (RFC 3461 §4.4).
const MAX_ENVID: usize = 100;

/// What the sender asked for with RFC 3461's parameters, kept with the queued message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DsnRequest {
    /// `RET`: what of the message a failure report returns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Ret>,
    /// `ENVID`, decoded from xtext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
    /// Per recipient (as queued), those that gave `NOTIFY` or `ORCPT`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub recipients: BTreeMap<String, RcptDsn>,
}

/// `RET=FULL` or `RET=HDRS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ret {
    /// The whole message.
    Full,
    /// Its header section only.
    Hdrs,
}

/// One recipient's `NOTIFY` and `ORCPT`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptDsn {
    /// `NOTIFY`; absent means the relay's default (failures and delays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
    /// `ORCPT=rfc822;…`, the address decoded from xtext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
}

/// The events a recipient's `NOTIFY` asks to hear of; none of them is `NOTIFY=NEVER`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    /// `SUCCESS`.
    pub success: bool,
    /// `FAILURE`.
    pub failure: bool,
    /// `DELAY`.
    pub delay: bool,
}

/// Why a DSN parameter is refused (the reply names the parameter).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// `RET=FULL` and `RET=HDRS` together.
    #[error("RET given twice")]
    TwoRets,
    /// `ENVID` that is empty, too long, or not printable ASCII once decoded.
    #[error("ENVID must decode to 1 to 100 printable ASCII characters")]
    BadEnvid,
    /// `NOTIFY=NEVER` with another keyword.
    #[error("NOTIFY=NEVER cannot be combined with SUCCESS, FAILURE or DELAY")]
    NeverWithOthers,
    /// `ORCPT` that is not printable ASCII once decoded.
    #[error("ORCPT must decode to printable ASCII")]
    BadOrcpt,
}

fn printable(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

impl DsnRequest {
    /// The message's part of a `MAIL` command: smtp-proto's `flags` and decoded `ENVID`.
    /// `None` when the sender asked for nothing.
    pub fn from_mail(flags: u64, envid: Option<&str>) -> Result<Option<DsnRequest>, ParamError> {
        let ret = match (flags & smtp_proto::MAIL_RET_FULL != 0, flags & smtp_proto::MAIL_RET_HDRS != 0) {
            (true, true) => return Err(ParamError::TwoRets),
            (true, false) => Some(Ret::Full),
            (false, true) => Some(Ret::Hdrs),
            (false, false) => None,
        };
        if let Some(id) = envid
            && (id.len() > MAX_ENVID || !printable(id))
        {
            return Err(ParamError::BadEnvid);
        }
        let request = DsnRequest { ret, envid: envid.map(str::to_string), recipients: BTreeMap::new() };
        Ok((request != DsnRequest::default()).then_some(request))
    }

    /// ` RET=… ENVID=…` for a `MAIL` command to a server that offers DSN.
    pub fn mail_params(&self) -> String {
        let mut p = String::new();
        match self.ret {
            Some(Ret::Full) => p.push_str(" RET=FULL"),
            Some(Ret::Hdrs) => p.push_str(" RET=HDRS"),
            None => {}
        }
        if let Some(id) = &self.envid {
            p.push_str(" ENVID=");
            xtext(id, &mut p);
        }
        p
    }

    /// ` NOTIFY=… ORCPT=…` for `recipient`'s `RCPT` command to a server that offers DSN.
    pub fn rcpt_params(&self, recipient: &str) -> String {
        let mut p = String::new();
        let Some(rcpt) = self.recipients.get(recipient) else {
            return p;
        };
        if let Some(n) = rcpt.notify {
            let words: Vec<&str> = [(n.success, "SUCCESS"), (n.failure, "FAILURE"), (n.delay, "DELAY")]
                .into_iter()
                .filter_map(|(on, word)| on.then_some(word))
                .collect();
            p.push_str(" NOTIFY=");
            p.push_str(&if words.is_empty() { "NEVER".to_string() } else { words.join(",") });
        }
        if let Some(o) = &rcpt.orcpt {
            p.push_str(" ORCPT=rfc822;");
            xtext(o, &mut p);
        }
        p
    }

    /// The part of this request about `recipients` (one recipient domain's share of a
    /// transaction); `None` when nothing of it is left.
    pub fn for_recipients<'a>(&self, recipients: impl IntoIterator<Item = &'a String>) -> Option<Box<DsnRequest>> {
        let mut part = DsnRequest { ret: self.ret, envid: self.envid.clone(), recipients: BTreeMap::new() };
        for r in recipients {
            if let Some(d) = self.recipients.get(r) {
                part.recipients.insert(r.clone(), d.clone());
            }
        }
        (part != DsnRequest::default()).then(|| Box::new(part))
    }
}

impl RcptDsn {
    /// The recipient's part of a `RCPT` command: smtp-proto's `flags` and decoded `ORCPT`.
    /// `None` when it asked for nothing.
    pub fn from_rcpt(flags: u64, orcpt: Option<&str>) -> Result<Option<RcptDsn>, ParamError> {
        use smtp_proto::{RCPT_NOTIFY_DELAY, RCPT_NOTIFY_FAILURE, RCPT_NOTIFY_NEVER, RCPT_NOTIFY_SUCCESS};
        let keywords = flags & (RCPT_NOTIFY_NEVER | RCPT_NOTIFY_SUCCESS | RCPT_NOTIFY_FAILURE | RCPT_NOTIFY_DELAY);
        if keywords & RCPT_NOTIFY_NEVER != 0 && keywords != RCPT_NOTIFY_NEVER {
            return Err(ParamError::NeverWithOthers);
        }
        let notify = (keywords != 0).then_some(Notify {
            success: keywords & RCPT_NOTIFY_SUCCESS != 0,
            failure: keywords & RCPT_NOTIFY_FAILURE != 0,
            delay: keywords & RCPT_NOTIFY_DELAY != 0,
        });
        if orcpt.is_some_and(|o| !printable(o)) {
            return Err(ParamError::BadOrcpt);
        }
        let rcpt = RcptDsn { notify, orcpt: orcpt.map(str::to_string) };
        Ok((rcpt != RcptDsn::default()).then_some(rcpt))
    }
}

/// Whether `recipient`'s sender wants to hear of `action`. Without `NOTIFY` the relay
/// reports failures and delays, as RFC 3461 §4.1 lets it; success only when asked.
pub fn wanted(request: Option<&DsnRequest>, recipient: &str, action: Action) -> bool {
    let notify = request.and_then(|r| r.recipients.get(recipient)).and_then(|r| r.notify);
    match (action, notify) {
        (Action::Failed | Action::Delayed, None) => true,
        (Action::Relayed, None) => false,
        (Action::Failed, Some(n)) => n.failure,
        (Action::Delayed, Some(n)) => n.delay,
        (Action::Relayed, Some(n)) => n.success,
    }
}

/// RFC 3461 §4 xtext: `+XX` for `+`, `=`, and bytes outside `!`..`~`.
fn xtext(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_graphic() && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
}

/// Why the sender is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The recipients failed for good (`Action: failed`).
    Failed,
    /// The message is still queued after `delay_warning` (`Action: delayed`).
    Delayed,
    /// Delivered to a server that does not offer DSN, for a recipient that asked to hear of
    /// success (`Action: relayed`, RFC 3461 §4.1): no further report will come.
    Relayed,
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
    /// The original message's queue ID, as logged.
    pub queue_id: &'a str,
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
    /// What the sender asked for: `ENVID`, `ORCPT` and `RET` go into the report.
    pub request: Option<&'a DsnRequest>,
}

/// The RFC 3463 status code in a reply (`550 5.1.1 ...` → `5.1.1`), or one derived from the
/// reply code, or `fallback`.
pub fn status_of(diagnostic: &str, fallback: &str) -> String {
    let words: Vec<&str> = diagnostic.split_whitespace().collect();
    for pair in words.windows(2) {
        let (code, enhanced) = (pair[0], pair[1]);
        let parts: Vec<&str> = enhanced.split('.').collect();
        let is_code = code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit());
        // RFC 3463 §2: class 2, 4 or 5, then subject and detail of 1 to 3 digits.
        let number = |p: &&str| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
        if is_code && parts.len() == 3 && ["2", "4", "5"].contains(&parts[0]) && parts[1..].iter().all(number) {
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

/// The `Diagnostic-Code` of a diagnostic: `smtp; ` and the server's reply from its code on
/// (RFC 3464 §2.3.6: the reply itself; which server and command stay in the readable part and
/// `Remote-MTA`), or, when no server replied (a refused connection, a DNS failure),
/// `X-Mxrelay; ` and the relay's own words, as Postfix writes `X-Postfix; `.
fn diagnostic_code(diagnostic: &str) -> String {
    let one_line = diagnostic.replace(['\r', '\n'], " ");
    let mut offset = 0;
    for word in one_line.split(' ') {
        let is_reply_code =
            word.len() == 3 && word.bytes().all(|b| b.is_ascii_digit()) && (b'2'..=b'5').contains(&word.as_bytes()[0]);
        if is_reply_code {
            return format!("smtp; {}", &one_line[offset..]);
        }
        offset += word.len() + 1;
    }
    format!("X-Mxrelay; {one_line}")
}

/// The server part of a diagnostic (`127.0.0.1:25: RCPT: ...` → `127.0.0.1:25`).
fn remote_mta(diagnostic: &str) -> Option<&str> {
    let (first, _) = diagnostic.split_once(": ")?;
    // An address (`127.0.0.1:25`, `[::1]:25`), never words or a line break.
    let address = !first.is_empty() && !first.contains(|c: char| c.is_whitespace() || c.is_control());
    (address && (first.contains(':') || first.contains('.'))).then_some(first)
}

/// The notification as a message (headers and MIME body, CRLF line ends), with the original
/// message's headers attached, or all of it for a failure with `RET=FULL`.
pub fn build(report: &Report<'_>, original: &[u8]) -> Vec<u8> {
    // RET=FULL returns the whole of a failed message, within a limit (RFC 3461 §4.3).
    let asked_full = report.action == Action::Failed && report.request.and_then(|r| r.ret) == Some(Ret::Full);
    let full = asked_full && original.len() <= FULL_RETURN_LIMIT;
    let returned = if full {
        original
    } else {
        // The header section: everything up to the first empty line.
        memchr::memmem::find(original, b"\r\n\r\n").map_or(original, |i| &original[..i + 2])
    };
    let mut boundary = format!("{}/{}", report.queue_id, report.reporting_mta);
    // What is returned is quoted inside the report: its text must not end a part early.
    while memchr::memmem::find(returned, boundary.as_bytes()).is_some() {
        boundary.push_str("=_");
    }
    let (subject, intro, fallback, action) = match report.action {
        Action::Failed => (
            "Undelivered Mail Returned to Sender",
            "Your message could not be delivered to the recipients below. This is a permanent error; it will not be retried.",
            "5.0.0",
            "failed",
        ),
        Action::Delayed => (
            "Delayed Mail (still being retried)",
            "Your message has not been delivered yet to the recipients below. Delivery is still being retried; no action is needed.",
            "4.0.0",
            "delayed",
        ),
        Action::Relayed => (
            "Successful Mail Delivery Report",
            "Your message was handed to the server of the recipients below. That server does not report deliveries, so you will get no further notice of success.",
            "2.0.0",
            "relayed",
        ),
    };
    let mut m = String::new();
    let _ = write!(m, "From: Mail Delivery System <MAILER-DAEMON@{}>\r\n", report.reporting_mta);
    let _ = write!(m, "To: <{}>\r\n", smtp_path(report.sender));
    let _ = write!(m, "Subject: {subject}\r\n");
    let _ = write!(m, "Date: {}\r\n", rfc5322_date(report.now_secs));
    let _ = write!(m, "Message-ID: <{}.{}.dsn@{}>\r\n", report.queue_id, report.now_secs, report.reporting_mta);
    m.push_str("Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n");
    let _ = write!(m, "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n");
    let _ = write!(m, "--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n");
    let _ = write!(m, "This is the mail system at {}.\r\n\r\n{intro}\r\n\r\n", report.reporting_mta);
    for r in report.recipients {
        let _ = write!(m, "<{}>: {}\r\n", smtp_path(&r.recipient), r.diagnostic.replace(['\r', '\n'], " "));
    }
    if asked_full && !full {
        let _ = write!(m, "\r\nThe message is larger than {FULL_RETURN_LIMIT} bytes; only its headers are returned.\r\n");
    }
    let _ = write!(m, "\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n");
    if let Some(envid) = report.request.and_then(|r| r.envid.as_deref()) {
        let _ = write!(m, "Original-Envelope-Id: {envid}\r\n");
    }
    let _ = write!(m, "Reporting-MTA: dns; {}\r\n", report.reporting_mta);
    let _ = write!(m, "X-Mxrelay-Queue-ID: {}\r\n", report.queue_id);
    let _ = write!(m, "Arrival-Date: {}\r\n", rfc5322_date(report.arrival_secs));
    for r in report.recipients {
        m.push_str("\r\n");
        if let Some(orcpt) = report.request.and_then(|q| q.recipients.get(&r.recipient)).and_then(|d| d.orcpt.as_deref()) {
            let _ = write!(m, "Original-Recipient: rfc822; {orcpt}\r\n");
        }
        let _ = write!(m, "Final-Recipient: rfc822; {}\r\n", smtp_path(&r.recipient));
        let status = r.status.map_or_else(|| status_of(&r.diagnostic, fallback), str::to_string);
        let _ = write!(m, "Action: {action}\r\nStatus: {status}\r\n");
        if let Some(mta) = remote_mta(&r.diagnostic) {
            let _ = write!(m, "Remote-MTA: dns; {mta}\r\n");
        }
        let _ = write!(m, "Diagnostic-Code: {}\r\n", diagnostic_code(&r.diagnostic));
        let _ = write!(m, "Last-Attempt-Date: {}\r\n", rfc5322_date(report.now_secs));
        if let Some(until) = report.retry_until_secs {
            let _ = write!(m, "Will-Retry-Until: {}\r\n", rfc5322_date(until));
        }
    }
    let content_type = if full { "message/rfc822" } else { "text/rfc822-headers" };
    let _ = write!(m, "\r\n--{boundary}\r\nContent-Type: {content_type}\r\n\r\n");
    let mut out = m.into_bytes();
    out.extend_from_slice(returned);
    if full && !returned.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_contains_all(text: &str, needles: &[&str]) {
        for needle in needles {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn status_codes_from_replies() {
        assert_eq!(status_of("127.0.0.1:25: RCPT: 550 5.1.1 no such user", "5.0.0"), "5.1.1");
        assert_eq!(status_of("127.0.0.1:25: MAIL: 554 rejected", "5.0.0"), "5.0.0");
        assert_eq!(status_of("127.0.0.1:25: 452 4.2.2 mailbox full", "4.0.0"), "4.2.2");
        assert_eq!(status_of("every server of the domain is down", "4.4.7"), "4.4.7");
        assert_eq!(status_of("127.0.0.1:25: RCPT: 550 9.1.1 no such class", "5.0.0"), "5.0.0", "class 2, 4 or 5 only");
        assert_eq!(status_of("127.0.0.1:25: RCPT: 550 5.1234.1 too long", "5.0.0"), "5.0.0", "at most 3 digits");
    }

    #[test]
    fn the_remote_mta_is_an_address_and_never_text_with_a_line_break() {
        assert_eq!(remote_mta("127.0.0.1:25: RCPT: 550 5.1.1 no such user"), Some("127.0.0.1:25"));
        assert_eq!(remote_mta("[::1]:2525: MAIL: 451 later"), Some("[::1]:2525"));
        assert_eq!(remote_mta("[::1]\n-674: MAIL: 451 later"), None, "found by the dsn_report fuzz target");
        assert_eq!(remote_mta("delivery time expired: every server is down"), None);
    }

    #[test]
    fn the_diagnostic_code_is_the_servers_reply_or_the_relays_own_words() {
        assert_eq!(diagnostic_code("127.0.0.1:25: RCPT: 550 5.1.1 no such\r\n user"), "smtp; 550 5.1.1 no such   user");
        assert_eq!(
            diagnostic_code("delivery time expired: [::1]:2525: MAIL: 451 4.3.0 try later"),
            "smtp; 451 4.3.0 try later",
            "a port is no reply code"
        );
        assert_eq!(
            diagnostic_code("connect to 127.0.0.1:25: Connection refused (os error 111)"),
            "X-Mxrelay; connect to 127.0.0.1:25: Connection refused (os error 111)"
        );
    }

    #[test]
    fn a_report_has_the_three_parts() {
        let rcpts = [RecipientStatus {
            recipient: "user@customer.test".into(),
            diagnostic: "127.0.1.1:25: RCPT: 550 5.1.1 no such user".into(),
            status: None,
        }];
        let text = String::from_utf8(build(
            &Report { sender: "a@src.test", ..report_for(Action::Failed, &rcpts, None) },
            b"Subject: hello\r\nFrom: a@src.test\r\n\r\nbody\r\n",
        ))
        .expect("utf8");
        assert_contains_all(
            &text,
            &[
                "Content-Type: multipart/report; report-type=delivery-status",
                "Reporting-MTA: dns; relay.test",
                "Final-Recipient: rfc822; user@customer.test",
                "Action: failed",
                "Status: 5.1.1",
                "Remote-MTA: dns; 127.0.1.1:25",
                "Diagnostic-Code: smtp; 550 5.1.1 no such user",
                "Content-Type: text/rfc822-headers\r\n\r\nSubject: hello\r\nFrom: a@src.test\r\n",
            ],
        );
        assert!(!text.contains("body"), "only the headers of the original are returned");
        assert!(text.ends_with("--\r\n"));
    }

    #[test]
    fn quoted_local_parts_are_reported_quoted() {
        let rcpts = [RecipientStatus { recipient: "john doe@customer.test".into(), diagnostic: "550 no".into(), status: None }];
        let text = String::from_utf8(build(
            &Report { sender: "jane roe@src.test", ..report_for(Action::Failed, &rcpts, None) },
            b"Subject: hello\r\n\r\n",
        ))
        .expect("utf8");
        assert_contains_all(
            &text,
            &[
                "To: <\"jane roe\"@src.test>\r\n",
                "<\"john doe\"@customer.test>: 550 no",
                "Final-Recipient: rfc822; \"john doe\"@customer.test\r\n",
            ],
        );
    }

    fn request() -> DsnRequest {
        let mut r = DsnRequest::from_mail(smtp_proto::MAIL_RET_FULL, Some("id+1 = x")).expect("valid").expect("asked");
        let notify = smtp_proto::RCPT_NOTIFY_SUCCESS | smtp_proto::RCPT_NOTIFY_DELAY;
        r.recipients.insert(
            "a@customer.test".into(),
            RcptDsn::from_rcpt(notify, Some("Orig+A@old.test")).expect("valid").expect("asked"),
        );
        r.recipients.insert(
            "b@customer.test".into(),
            RcptDsn::from_rcpt(smtp_proto::RCPT_NOTIFY_NEVER, None).expect("valid").expect("asked"),
        );
        r
    }

    #[test]
    fn parameters_go_on_as_the_sender_gave_them() {
        let r = request();
        assert_eq!(r.mail_params(), " RET=FULL ENVID=id+2B1+20+3D+20x");
        assert_eq!(r.rcpt_params("a@customer.test"), " NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Orig+2BA@old.test");
        assert_eq!(r.rcpt_params("b@customer.test"), " NOTIFY=NEVER");
        assert_eq!(r.rcpt_params("c@customer.test"), "", "a recipient that asked nothing gets no parameters");
        // What goes out reads back as what came in, by the parser intake uses.
        let mail = format!("MAIL FROM:<s@src.test>{}\r\n", r.mail_params());
        let Ok(smtp_proto::Request::Mail { from }) = smtp_proto::Request::parse(&mut mail.as_bytes().iter()) else {
            panic!("{mail} does not parse");
        };
        assert_eq!(DsnRequest::from_mail(from.flags, from.env_id.as_deref()).expect("valid").expect("asked").envid, r.envid);
        let rcpt = format!("RCPT TO:<a@customer.test>{}\r\n", r.rcpt_params("a@customer.test"));
        let Ok(smtp_proto::Request::Rcpt { to }) = smtp_proto::Request::parse(&mut rcpt.as_bytes().iter()) else {
            panic!("{rcpt} does not parse");
        };
        assert_eq!(
            RcptDsn::from_rcpt(to.flags, to.orcpt.as_deref()).expect("valid").as_ref(),
            r.recipients.get("a@customer.test")
        );
    }

    #[test]
    fn bad_parameters_are_refused_by_name() {
        use smtp_proto::{MAIL_RET_FULL, MAIL_RET_HDRS, RCPT_NOTIFY_NEVER, RCPT_NOTIFY_SUCCESS};
        assert_eq!(DsnRequest::from_mail(MAIL_RET_FULL | MAIL_RET_HDRS, None), Err(ParamError::TwoRets));
        assert_eq!(DsnRequest::from_mail(0, Some(&"x".repeat(101))), Err(ParamError::BadEnvid));
        assert_eq!(DsnRequest::from_mail(0, Some("a\r\nb")), Err(ParamError::BadEnvid));
        assert_eq!(DsnRequest::from_mail(0, Some("")), Err(ParamError::BadEnvid));
        assert!(DsnRequest::from_mail(0, Some(&"x".repeat(100))).is_ok_and(|r| r.is_some()));
        assert_eq!(DsnRequest::from_mail(0, None), Ok(None), "nothing asked: nothing kept");
        assert_eq!(RcptDsn::from_rcpt(RCPT_NOTIFY_NEVER | RCPT_NOTIFY_SUCCESS, None), Err(ParamError::NeverWithOthers));
        assert_eq!(RcptDsn::from_rcpt(0, Some("a\u{7f}b")), Err(ParamError::BadOrcpt));
        assert_eq!(RcptDsn::from_rcpt(0, None), Ok(None));
        assert!(ParamError::NeverWithOthers.to_string().contains("NOTIFY"));
        assert!(ParamError::BadOrcpt.to_string().contains("ORCPT"));
    }

    #[test]
    fn notify_decides_who_hears_of_what() {
        let r = request();
        let asked = |rcpt: &str, action| wanted(Some(&r), rcpt, action);
        // a: SUCCESS,DELAY. b: NEVER. c: nothing given, so failures and delays.
        assert!(asked("a@customer.test", Action::Relayed) && asked("a@customer.test", Action::Delayed));
        assert!(!asked("a@customer.test", Action::Failed));
        for action in [Action::Failed, Action::Delayed, Action::Relayed] {
            assert!(!asked("b@customer.test", action), "NOTIFY=NEVER yet told of {action:?}");
        }
        assert!(asked("c@customer.test", Action::Failed) && asked("c@customer.test", Action::Delayed));
        assert!(!asked("c@customer.test", Action::Relayed));
        assert!(wanted(None, "c@customer.test", Action::Failed) && !wanted(None, "c@customer.test", Action::Relayed));
    }

    fn report_for<'a>(action: Action, rcpts: &'a [RecipientStatus], request: Option<&'a DsnRequest>) -> Report<'a> {
        Report {
            action,
            reporting_mta: "relay.test",
            queue_id: "0000000000000ABC",
            arrival_secs: 1_795_891_700,
            now_secs: 1_795_891_800,
            retry_until_secs: None,
            sender: "s@src.test",
            recipients: rcpts,
            request,
        }
    }

    #[test]
    fn a_report_carries_the_senders_envid_orcpt_and_ret() {
        let r = request();
        let rcpts = [RecipientStatus {
            recipient: "a@customer.test".into(),
            diagnostic: "127.0.1.1:25: RCPT: 550 5.1.1 no such user".into(),
            status: None,
        }];
        let original = b"Subject: hello\r\n\r\nthe body\r\n";
        let text = String::from_utf8(build(&report_for(Action::Failed, &rcpts, Some(&r)), original)).expect("utf8");
        assert_contains_all(
            &text,
            &[
                "Original-Envelope-Id: id+1 = x\r\nReporting-MTA:",
                "Original-Recipient: rfc822; Orig+A@old.test\r\nFinal-Recipient: rfc822; a@customer.test",
                "Content-Type: message/rfc822\r\n\r\nSubject: hello\r\n\r\nthe body\r\n",
            ],
        );
        // Over the limit, RET=FULL gets the headers, and the text says why.
        let big = [&b"Subject: big\r\n\r\n"[..], &vec![b'x'; FULL_RETURN_LIMIT]].concat();
        let text = String::from_utf8(build(&report_for(Action::Failed, &rcpts, Some(&r)), &big)).expect("utf8");
        assert!(text.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: big\r\n\r\n--"), "{text}");
        assert!(text.contains("only its headers are returned") && !text.contains("xxx"));
        // Only a failure returns the content.
        let text = String::from_utf8(build(&report_for(Action::Delayed, &rcpts, Some(&r)), original)).expect("utf8");
        assert!(text.contains("text/rfc822-headers") && !text.contains("the body"), "{text}");
    }

    #[test]
    fn a_relayed_report_says_so_and_the_quoted_original_cannot_end_it() {
        let rcpts = [RecipientStatus {
            recipient: "a@customer.test".into(),
            diagnostic: "127.0.1.1:25: 250 2.0.0 queued as 1".into(),
            status: None,
        }];
        let text = String::from_utf8(build(&report_for(Action::Relayed, &rcpts, None), b"Subject: x\r\n\r\n")).expect("utf8");
        assert!(text.contains("Action: relayed\r\nStatus: 2.0.0\r\nRemote-MTA: dns; 127.0.1.1:25\r\n"), "{text}");
        assert!(text.contains("Subject: Successful Mail Delivery Report"), "{text}");
        // An original that contains the report's boundary gets another boundary.
        let sneaky = b"Subject: x\r\n\r\n--0000000000000ABC/relay.test--\r\n";
        let mut r = request();
        r.ret = Some(Ret::Full);
        let text = String::from_utf8(build(&report_for(Action::Failed, &rcpts, Some(&r)), sneaky)).expect("utf8");
        assert!(text.contains("boundary=\"0000000000000ABC/relay.test=_\""), "{text}");
        assert!(text.ends_with("--0000000000000ABC/relay.test=_--\r\n"), "{text}");
    }
}
