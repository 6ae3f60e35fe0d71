//! Notifications built from what a customer's server replied: never a panic, whatever the
//! reply, and the reply cannot add a header field or break the report's structure (a reply
//! is untrusted text that ends up in the delivery-status part).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mxrelay_dsn::{Action, RecipientStatus, Report, build};

fuzz_target!(|input: &[u8]| {
    let Some((&action, rest)) = input.split_first() else { return };
    let action = match action % 3 {
        0 => Action::Failed,
        1 => Action::Delayed,
        _ => Action::Relayed,
    };
    // The first line is the diagnostic (the server's reply as logged), the rest the original.
    let split = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    let diagnostic = String::from_utf8_lossy(&rest[..split]).into_owned();
    let original = rest.get(split + 1..).unwrap_or_default();
    let recipients = [RecipientStatus { recipient: "user@customer.test".into(), diagnostic, status: None }];
    let report = Report {
        action,
        reporting_mta: "relay.test",
        queue_id: "0000000000000001",
        arrival_secs: 1_796_522_340,
        now_secs: 1_796_522_400,
        retry_until_secs: Some(1_796_954_340),
        sender: "sender@src.test",
        recipients: &recipients,
        request: None,
    };
    let message = build(&report, original);
    let text = String::from_utf8_lossy(&message);
    // Parts are found by their boundary, as a MIME reader finds them: the reply may itself
    // say "Content-Type: message/delivery-status" in the text part.
    let status_part = text
        .split("\r\n--0000000000000001/relay.test")
        .find_map(|part| part.strip_prefix("\r\nContent-Type: message/delivery-status\r\n\r\n"))
        .expect("a delivery-status part");
    for line in status_part.split("\r\n") {
        assert!(!line.contains(['\r', '\n']), "a bare CR or LF in {line:?}");
        assert!(line.is_empty() || line.contains(": "), "a line that is no field: {line:?}");
    }
    let status = status_part.lines().find_map(|l| l.strip_prefix("Status: ")).expect("a Status field");
    let parts: Vec<&str> = status.split('.').collect();
    assert!(
        parts.len() == 3 && ["2", "4", "5"].contains(&parts[0]) && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())),
        "not an RFC 3463 status: {status:?}"
    );
    assert_eq!(status_part.matches("\r\nDiagnostic-Code: ").count(), 1, "one Diagnostic-Code");
});
