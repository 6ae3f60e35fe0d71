//! SMTP extensions on the way through, against real smtp-sinks, which record the MAIL and
//! RCPT parameters they get:
//! * the sender's DSN requests (RFC 3461): offered at intake, passed on to a server that
//!   offers DSN, reported as `relayed` when the server does not, and obeyed in the relay's
//!   own notifications (NOTIFY, RET, ENVID, ORCPT);
//! * 8-bit data, labelled `BODY=8BITMIME` for a server that offers it;
//! * an address that needs SMTPUTF8, never sent to a server without it.

use mxrelay_e2e::postfix::{Listener, Postfix};
use mxrelay_e2e::{Relay, Sink, eventually, free_port, message, transaction, transaction_with};

fn server_of(domain: &str, sink: &Sink) -> String {
    let (h, p) = sink.host_port();
    format!("[[domain]]\nname = \"{domain}\"\n[[domain.server]]\nhost = \"{h}\"\nport = {p}\n")
}

/// A complete notification in the bounce sink's dumps.
fn notices(bounces: &Sink) -> Vec<String> {
    bounces.dumps().into_iter().filter(|d| d.trim_end().ends_with("--")).collect()
}

/// The one notification the bounce sink gets, once it has arrived whole.
async fn the_notice(bounces: &Sink, what: &str) -> String {
    eventually(what, || notices(bounces).len() == 1).await;
    notices(bounces).remove(0)
}

const MAIL: &str = "MAIL FROM:<sender@src.test> RET=HDRS ENVID=env+2B1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_on_to_a_server_with_dsn_and_one_without_gets_a_relayed_report() {
    let with_dsn = Sink::start("127.0.1.120", &[]);
    let without_dsn = Sink::start("127.0.1.121", &["-N"]);
    let bounces = Sink::start("127.0.1.122", &[]);
    let (bh, bp) = bounces.host_port();
    let relay = Relay::start(
        &format!("{}{}", server_of("customer.test", &with_dsn), server_of("plain.test", &without_dsn)),
        &format!("bounce_relay = \"{bh}:{bp}\""),
    );

    let rcpt = "RCPT TO:<user@customer.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;first+2Blast@old.test";
    let replies = transaction(&relay.addr, &[MAIL, rcpt], 1).await;
    assert!(replies[0].1.lines().any(|l| l == "DSN"), "EHLO does not offer DSN: {:?}", replies[0]);
    assert_eq!(replies.last().map(|r| r.0), Some(250), "{replies:?}");
    relay.eventually("delivered to the server with DSN", || with_dsn.count() == 1).await;
    let dump = &with_dsn.dumps()[0];
    let mail_args = dump.lines().find_map(|l| l.strip_prefix("X-Mail-Args: ")).expect("MAIL args");
    assert!(mail_args.starts_with("<sender@src.test> ") && mail_args.ends_with(" RET=HDRS ENVID=env+2B1"), "{dump}");
    assert!(
        dump.contains("X-Rcpt-Args: <user@customer.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;first+2Blast@old.test\n"),
        "{dump}"
    );

    // The same request to a server without DSN: nothing of it goes there, and the sender
    // hears from the relay that the message was relayed.
    let rcpt = "RCPT TO:<user@plain.test> NOTIFY=SUCCESS ORCPT=rfc822;first+2Blast@old.test";
    let replies = transaction(&relay.addr, &[MAIL, rcpt], 2).await;
    assert_eq!(replies.last().map(|r| r.0), Some(250), "{replies:?}");
    relay.eventually("delivered to the server without DSN", || without_dsn.count() == 1).await;
    let dump = &without_dsn.dumps()[0];
    assert!(!dump.contains("RET=") && !dump.contains("ENVID=") && dump.contains("X-Rcpt-Args: <user@plain.test>\n"), "{dump}");
    let notice = &the_notice(&bounces, "one relayed report").await;
    mxrelay_e2e::assert_contains_all(
        notice,
        &[
            "X-Mail-Args: <>",
            "X-Rcpt-Args: <sender@src.test>",
            "Original-Envelope-Id: env+1\n",
            "Original-Recipient: rfc822; first+last@old.test\nFinal-Recipient: rfc822; user@plain.test\nAction: relayed\nStatus: 2.0.0\n",
            "Content-Type: text/rfc822-headers",
            "X-Seq: 2",
        ],
    );
    // The first message's report is the DSN server's to send. Its delivery ended before the
    // second message was sent, so a report of the relay's own would have been queued first.
    assert!(!notice.contains("user@customer.test"), "{notice}");
    assert_eq!(relay.logged(&["delivery status notification queued"]).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_own_failure_report_obeys_notify_and_ret() {
    let rejecting = Sink::start("127.0.1.123", &["-f", "rcpt"]);
    let bounces = Sink::start("127.0.1.124", &[]);
    let (bh, bp) = bounces.host_port();
    let relay = Relay::start(&server_of("customer.test", &rejecting), &format!("bounce_relay = \"{bh}:{bp}\"\nretry = [\"1h\"]"));
    let replies = transaction(
        &relay.addr,
        &[
            "MAIL FROM:<sender@src.test> RET=FULL ENVID=batch-7",
            "RCPT TO:<quiet@customer.test> NOTIFY=NEVER",
            "RCPT TO:<told@customer.test> ORCPT=rfc822;told@old.test",
            // Named again: the mailbox keeps its first parameters.
            "RCPT TO:<told@customer.test> NOTIFY=NEVER ORCPT=rfc822;second@old.test",
            "RCPT TO:<success-only@customer.test> NOTIFY=SUCCESS",
        ],
        3,
    )
    .await;
    assert_eq!(replies.last().map(|r| r.0), Some(250), "{replies:?}");
    let notice = &the_notice(&bounces, "one failure report").await;
    mxrelay_e2e::assert_contains_all(
        notice,
        &[
            "Original-Envelope-Id: batch-7\n",
            "Original-Recipient: rfc822; told@old.test\nFinal-Recipient: rfc822; told@customer.test\nAction: failed\n",
            "Content-Type: message/rfc822",
            "END-OF-MESSAGE 3",
        ],
    );
    assert!(!notice.contains("quiet@customer.test") && !notice.contains("success-only@"), "{notice}");
    assert!(!notice.contains("second@old.test"), "{notice}");
    // The log reaches the test through a pipe, a moment after the effect (`Relay::logged`).
    relay.logged(&["no notification: the sender's NOTIFY does not ask for it"]).await;
    let skipped = relay.log_lines(&["no notification: the sender's NOTIFY does not ask for it"]);
    assert!(
        skipped.len() == 1 && skipped[0].contains("quiet@customer.test") && skipped[0].contains("success-only@"),
        "{skipped:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_the_relay_does_not_offer_or_that_are_malformed_are_refused_by_name() {
    let sink = Sink::start("127.0.1.125", &[]);
    let relay = Relay::start(&server_of("customer.test", &sink), "");
    for (mail, code, name) in [
        ("MAIL FROM:<sender@src.test> REQUIRETLS", 555, "REQUIRETLS"),
        ("MAIL FROM:<sender@src.test> BODY=BINARYMIME", 555, "BINARYMIME"),
        ("MAIL FROM:<sender@src.test> ENVID=a+0D+0Ab", 501, "ENVID"),
    ] {
        let replies = transaction(&relay.addr, &[mail], 4).await;
        assert!(replies[1].0 == code && replies[1].1.contains(name), "{mail}: {replies:?}");
    }
    let replies =
        transaction(&relay.addr, &["MAIL FROM:<sender@src.test>", "RCPT TO:<u@customer.test> NOTIFY=NEVER,SUCCESS"], 5).await;
    assert!(replies[2].0 == 501 && replies[2].1.contains("NOTIFY"), "{replies:?}");
    let replies =
        transaction(&relay.addr, &["MAIL FROM:<sender@src.test>", "RCPT TO:<u@customer.test> RRVS=2030-01-01T00:00:00Z"], 6)
            .await;
    assert!(replies[2].0 == 555 && replies[2].1.contains("only the NOTIFY and ORCPT"), "{replies:?}");
    // Each refusal left the session usable; nothing was queued.
    assert!(relay.log_lines(&["accepted"]).is_empty());
}

/// Postfix as the filtering tier: it sees DSN offered and hands the sender's requests to
/// mxrelay, which hands them to the customer's server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_made_to_a_postfix_upstream_reach_the_customers_server() {
    let sink = Sink::start("127.0.1.126", &[]);
    let relay = Relay::start(&server_of("customer.test", &sink), "");
    let front = Listener { port: free_port("127.0.0.1"), options: vec![] };
    let postfix = Postfix::start(&["customer.test"], &relay.addr, std::slice::from_ref(&front), "");
    let replies = transaction(
        &format!("127.0.0.1:{}", postfix.port(0)),
        &[
            "MAIL FROM:<sender@src.test> RET=HDRS ENVID=pf+2B7",
            "RCPT TO:<user@customer.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;orig@old.test",
        ],
        6,
    )
    .await;
    assert_eq!(replies.last().map(|r| r.0), Some(250), "{replies:?}");
    relay.eventually("relayed through mxrelay", || sink.count() == 1).await;
    let dump = &sink.dumps()[0];
    assert!(dump.contains("by relay.test (mxrelay)") && dump.contains("(Postfix)"), "{dump}");
    let mail_args = dump.lines().find_map(|l| l.strip_prefix("X-Mail-Args: ")).expect("MAIL args");
    assert!(mail_args.contains(" RET=HDRS") && mail_args.contains(" ENVID=pf+2B7"), "{dump}");
    assert!(dump.contains("X-Rcpt-Args: <user@customer.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;orig@old.test\n"), "{dump}");
    // postlogd writes the log a moment after the events.
    relay.eventually("Postfix logs the hand-over", || postfix.log().contains("status=sent")).await;
    let log = postfix.log();
    assert!(!log.contains("dsn=5"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_bit_data_is_labelled_for_a_server_that_offers_8bitmime_and_sent_as_it_is_otherwise() {
    let with = Sink::start("127.0.1.129", &[]);
    let without = Sink::start("127.0.1.130", &["-8"]);
    let relay = Relay::start(&format!("{}{}", server_of("customer.test", &with), server_of("plain.test", &without)), "");
    let text = |seq: u64| message(seq, "x").replace("Line one", "Grüße, Zeile eins");
    for (seq, rcpt) in [(7, "RCPT TO:<user@customer.test>"), (8, "RCPT TO:<user@plain.test>")] {
        let replies = transaction_with(&relay.addr, &["MAIL FROM:<sender@src.test> BODY=8BITMIME", rcpt], &text(seq)).await;
        assert_eq!(replies.last().map(|r| r.0), Some(250), "{replies:?}");
    }
    relay.eventually("both delivered", || with.count() == 1 && without.count() == 1).await;
    let (labelled, plain) = (&with.dumps()[0], &without.dumps()[0]);
    assert!(labelled.contains(" BODY=8BITMIME") && labelled.contains("Grüße, Zeile eins"), "{labelled}");
    assert!(!plain.contains("BODY=") && plain.contains("Grüße, Zeile eins"), "{plain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_needs_smtputf8_never_goes_to_a_server_without_it() {
    // smtp-sink offers no SMTPUTF8.
    let sink = Sink::start("127.0.1.131", &[]);
    let bounces = Sink::start("127.0.1.132", &[]);
    let (bh, bp) = bounces.host_port();
    let relay = Relay::start(&server_of("customer.test", &sink), &format!("bounce_relay = \"{bh}:{bp}\""));
    let replies = transaction(&relay.addr, &["MAIL FROM:<sender@src.test> SMTPUTF8", "RCPT TO:<jörg@customer.test>"], 9).await;
    assert_eq!(replies.last().map(|r| r.0), Some(250), "the relay offers SMTPUTF8: {replies:?}");
    let notice = &the_notice(&bounces, "the sender told").await;
    assert!(notice.contains("Final-Recipient: rfc822; jörg@customer.test\nAction: failed\n"), "{notice}");
    assert!(notice.contains("needs SMTPUTF8, which the server does not offer"), "{notice}");
    // The failure was decided before any MAIL: the server never saw the transaction.
    assert!(sink.dumps().is_empty(), "{:?}", sink.dumps());
}
