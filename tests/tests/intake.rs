//! Receiving: no open relay, accept_from, size limits, ESMTP extensions, with swaks as the
//! sending client.

use mxrelay_e2e::{PATIENCE, Relay, Sink, domain_block, swaks, swaks_tagged, wait_until};

#[test]
fn refuses_foreign_domains_and_accepts_customer_domains() {
    let sink = Sink::start("127.0.1.30", &[]);
    let relay = Relay::start(&domain_block("customer.test", &[(&sink, 10)]), "");

    let (ok, out) = swaks(&["--server", &relay.addr, "--from", "a@src.test", "--to", "victim@elsewhere.test"]);
    assert!(!ok && out.contains("550 5.7.1 relaying denied"), "{out}");

    let (ok, out) = swaks_tagged(&relay.addr, "user@Customer.Test", 1, &[]);
    assert!(ok && out.contains("250 2.0.0 queued as"), "{out}");
    for ext in ["PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"] {
        assert!(out.contains(ext), "EHLO lacks {ext}: {out}");
    }
    assert!(wait_until(PATIENCE, || sink.count() == 1), "the accepted message was not delivered");
    // The log reaches the test through a pipe (see `Relay::logged`).
    let denied = || relay.log_lines(&["relaying denied", "victim@elsewhere.test"]).len();
    assert!(wait_until(PATIENCE, || denied() > 0), "the refusal was not logged");
    assert_eq!(denied(), 1);
}

#[test]
fn a_mailbox_named_twice_gets_the_message_once() {
    let sink = Sink::start("127.0.1.33", &[]);
    let relay = Relay::start(&domain_block("customer.test", &[(&sink, 10)]), "");
    // The domain's case does not make another mailbox; the local part's may.
    let to = "user@customer.test,user@Customer.Test,USER@customer.test,other@customer.test,user@customer.test";
    let (ok, out) = swaks_tagged(&relay.addr, to, 1, &[]);
    assert!(ok, "{out}");
    assert_eq!(out.matches("250 2.1.5").count(), 5, "every RCPT is accepted: {out}");
    // Counted once its dump is complete: a dump file is there before all of it is written.
    assert!(wait_until(PATIENCE, || sink.count() == 1), "the message was not delivered");
    let dump = &sink.dumps()[0];
    let rcpts: Vec<&str> = dump.lines().filter_map(|l| l.strip_prefix("X-Rcpt-Args: ")).collect();
    assert_eq!(rcpts, ["<user@customer.test>", "<USER@customer.test>", "<other@customer.test>"], "{dump}");
    // Received names the recipient only when there is one (RFC 5321 4.4: a FOR clause names
    // one path; listing several would disclose Bcc recipients).
    assert!(!dump.contains("\tfor <"), "{dump}");
    let (ok, out) = swaks_tagged(&relay.addr, "user@customer.test,user@CUSTOMER.TEST", 2, &[]);
    assert!(ok, "{out}");
    assert!(wait_until(PATIENCE, || sink.count() == 2), "the second message was not delivered");
    let dump = sink.dumps().into_iter().find(|d| d.contains("X-Seq: 2")).expect("the second message's dump");
    assert_eq!(dump.lines().filter(|l| l.starts_with("X-Rcpt-Args: ")).count(), 1, "{dump}");
    assert!(dump.contains("\tfor <user@customer.test>;"), "{dump}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_go_on_as_they_came() {
    let sink = Sink::start("127.0.1.171", &[]);
    let relay = Relay::start(&domain_block("customer.test", &[(&sink, 10)]), "");
    // The parser unquotes local parts; written back bare, `<john doe@...>` would be a syntax
    // error at the server, or another mailbox.
    let to = r#""john doe"@customer.test,"a..b"@customer.test,"say \"hi\""@customer.test,plain@customer.test"#;
    let (ok, out) = swaks(&[
        "--server",
        &relay.addr,
        "--from",
        r#""jane roe"@src.test"#,
        "--to",
        to,
        "--header",
        "X-Seq: 1",
        "--body",
        "END-OF-MESSAGE 1",
    ]);
    assert!(ok && out.matches("250 2.1.5").count() == 4, "{out}");
    assert!(wait_until(PATIENCE, || sink.count() == 1), "the message was not delivered");
    let dump = &sink.dumps()[0];
    assert!(dump.contains("X-Mail-Args: <\"jane roe\"@src.test>\n"), "{dump}");
    let rcpts: Vec<&str> = dump.lines().filter_map(|l| l.strip_prefix("X-Rcpt-Args: ")).collect();
    let quoted = [
        r#"<"john doe"@customer.test>"#,
        r#"<"a..b"@customer.test>"#,
        r#"<"say \"hi\""@customer.test>"#,
        "<plain@customer.test>",
    ];
    assert_eq!(rcpts, quoted, "{dump}");
    let (ok, out) = swaks_tagged(&relay.addr, r#""john doe"@customer.test"#, 2, &[]);
    assert!(ok, "{out}");
    assert!(wait_until(PATIENCE, || sink.count() == 2), "the second message was not delivered");
    let dump = sink.dumps().into_iter().find(|d| d.contains("X-Seq: 2")).expect("the second message's dump");
    assert!(dump.contains("\tfor <\"john doe\"@customer.test>;"), "{dump}");
    // The client's address in the trace field is an address literal (RFC 5321 §4.4), where
    // trace parsers such as SpamAssassin's look for it.
    let lines: Vec<&str> = dump.lines().collect();
    let by_relay = lines.iter().position(|l| l.contains("(mxrelay) with ESMTP")).expect("the relay's Received field");
    assert!(lines[by_relay - 1].starts_with("Received: from ") && lines[by_relay - 1].ends_with(" ([127.0.0.1])"), "{dump}");
    // A control character cannot be written even quoted (RFC 5321 qtextSMTP), nor a quoted
    // domain: refused, not queued to fail later.
    let replies = mxrelay_e2e::transaction(&relay.addr, &["MAIL FROM:<\"a\tb\"@src.test>"], 3).await;
    assert!(replies[1].0 == 501 && replies[1].1.starts_with("5.1.7 sender address: a control character"), "{replies:?}");
    let replies = mxrelay_e2e::transaction(&relay.addr, &["MAIL FROM:<a@\"src test\">"], 4).await;
    assert!(replies[1].0 == 501 && replies[1].1.starts_with("5.1.7 sender address: the domain is not a domain"), "{replies:?}");
    let replies = mxrelay_e2e::transaction(&relay.addr, &["MAIL FROM:<a@src.test>", "RCPT TO:<\"a\tb\"@customer.test>"], 5).await;
    assert!(replies[2].0 == 501 && replies[2].1.starts_with("5.1.3 recipient address: a control character"), "{replies:?}");
    assert_eq!(sink.count(), 2);

    // Address literals (RFC 5321 4.1.3), which the parser refuses: a sender at one is taken
    // and goes on as it came; a recipient at one is in no customer domain.
    for (seq, sender) in [(6, "u@[192.0.2.1]"), (7, "u@[IPv6:2001:db8::1]")] {
        let mail = format!("MAIL FROM:<{sender}> SIZE=2000");
        let replies = mxrelay_e2e::transaction(&relay.addr, &[&mail, "RCPT TO:<plain@customer.test>"], seq).await;
        assert!(replies[1..].iter().all(|r| r.0 == 250), "{replies:?}");
        assert!(wait_until(PATIENCE, || sink.count() == seq as usize - 3), "the message from {sender} was not delivered");
        let dump = sink.dumps().into_iter().find(|d| d.contains(&format!("X-Seq: {seq}\n"))).expect("dump");
        assert!(dump.contains(&format!("X-Mail-Args: <{sender}>\n")), "{dump}");
    }
    let replies = mxrelay_e2e::transaction(&relay.addr, &["MAIL FROM:<a@src.test>", "RCPT TO:<postmaster@[127.0.0.1]>"], 8).await;
    assert!(replies[2].0 == 550 && replies[2].1.starts_with("5.7.1 relaying denied"), "{replies:?}");
    let replies = mxrelay_e2e::transaction(&relay.addr, &["MAIL FROM:<a@[300.0.0.1]>"], 9).await;
    assert!(replies[1].0 == 501 && replies[1].1.starts_with("5.1.7 bad sender address syntax"), "{replies:?}");
    assert_eq!(sink.count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_postmaster_goes_to_the_configured_mailbox() {
    let sink = Sink::start("127.0.1.159", &[]);
    let domains = domain_block("customer.test", &[(&sink, 10)]);
    // RFC 5321 4.5.1: <postmaster> without a domain, or at the relay's own name, is the
    // relay's. Unset, there is no mailbox to take it, and the refusal names the setting.
    let relay = Relay::start(&domains, "");
    for to in ["postmaster", "postmaster@relay.test"] {
        let (ok, out) = swaks(&["--server", &relay.addr, "--from", "a@src.test", "--to", to]);
        assert!(!ok && out.contains("550 5.1.1 no postmaster mailbox is configured here (relay.postmaster)"), "{out}");
    }
    drop(relay);

    let relay = Relay::start_with("postmaster = \"Ops@Customer.Test\"", &domains, "");
    for (seq, to) in [(1, "PostMaster"), (2, "postmaster@Relay.Test")] {
        let (ok, out) = swaks_tagged(&relay.addr, to, seq, &[]);
        assert!(ok && out.contains("250 2.1.5"), "{out}");
    }
    assert!(wait_until(PATIENCE, || sink.count() == 2), "mail to postmaster was not delivered");
    // Delivered to the configured mailbox, and the original recipient travels with it. The
    // Received field names the postmaster addressed, at the relay's name, not that mailbox.
    for (seq, orcpt, named) in [(1, "PostMaster", "PostMaster@relay.test"), (2, "postmaster@Relay.Test", "postmaster@relay.test")]
    {
        let dump = sink.dumps().into_iter().find(|d| d.contains(&format!("X-Seq: {seq}"))).expect("dump");
        assert!(dump.contains(&format!("X-Rcpt-Args: <Ops@customer.test> ORCPT=rfc822;{orcpt}\n")), "{dump}");
        assert!(dump.contains(&format!("\tfor <{named}>;")) && !dump.contains("for <Ops@"), "{dump}");
    }
    // Other mailboxes at the relay's name are not its to take; nor are those without a domain.
    let (ok, out) = swaks(&["--server", &relay.addr, "--from", "a@src.test", "--to", "root@relay.test"]);
    assert!(!ok && out.contains("550 5.7.1 relaying denied"), "{out}");
    let (ok, out) = swaks(&["--server", &relay.addr, "--from", "a@src.test", "--to", "root"]);
    assert!(!ok && out.contains("501 5.1.3 bad recipient address syntax"), "{out}");
    // The parser reads the null path as it reads <postmaster>; it is still no recipient.
    let replies = mxrelay_e2e::transaction(&relay.addr, &["MAIL FROM:<a@src.test>", "RCPT TO:<>"], 3).await;
    assert!(replies[2].0 == 501 && replies[2].1.starts_with("5.1.3 the null path <> is not a recipient"), "{replies:?}");
    assert_eq!(sink.count(), 2, "only the messages to postmaster were delivered");
}

#[test]
fn clients_outside_accept_from_are_refused() {
    let sink = Sink::start("127.0.1.31", &[]);
    let relay = Relay::start_with(
        "accept_from = [\"127.0.0.1/32\"]\nadmin_listen = \"127.0.0.1:0\"",
        &domain_block("customer.test", &[(&sink, 10)]),
        "",
    );
    let (ok, out) =
        swaks(&["--server", &relay.addr, "--local-interface", "127.0.0.2", "--from", "a@src.test", "--to", "user@customer.test"]);
    assert!(!ok && out.contains("554 5.7.1 127.0.0.2 is not allowed"), "{out}");
    let metrics = relay.metrics();
    let refused = mxrelay_e2e::metric(&metrics, "mxrelay_inbound_refused_total{reason=\"accept_from\"}");
    assert_eq!(refused, Some(1.0), "{metrics}");
    let (ok, out) =
        swaks(&["--server", &relay.addr, "--local-interface", "127.0.0.1", "--from", "a@src.test", "--to", "user@customer.test"]);
    assert!(ok, "{out}");
}

#[test]
fn oversize_messages_get_552_and_nothing_is_queued() {
    let sink = Sink::start("127.0.1.32", &[]);
    let relay = Relay::start_with("max_message_size = 4096", &domain_block("customer.test", &[(&sink, 10)]), "");
    let big = "y".repeat(8000);
    let (ok, out) = swaks(&["--server", &relay.addr, "--from", "a@src.test", "--to", "user@customer.test", "--body", &big]);
    assert!(!ok && out.contains("552 5.3.4"), "{out}");
    assert!(out.contains("SIZE 4096"), "{out}");
    // The session stays usable: a small message right after goes through.
    let (ok, out) = swaks(&["--server", &relay.addr, "--from", "a@src.test", "--to", "user@customer.test", "--body", "small"]);
    assert!(ok, "{out}");
    assert!(wait_until(PATIENCE, || sink.dumps().len() == 1), "only the small message arrives");
}
