//! Delivery status notifications (RFC 3464) to the sender: on permanent failure, on expiry,
//! and once on delay; delivered like any message, with the null sender; never one for a
//! notification.

use mxrelay_e2e::{Relay, Sink, send_one};

fn relay_with(customer: &str, bounce: &Sink, delivery: &str) -> Relay {
    let (bh, bp) = bounce.host_port();
    Relay::start(
        &format!("[[domain]]\nname = \"customer.test\"\n{customer}"),
        &format!("bounce_relay = \"{bh}:{bp}\"\n{delivery}"),
    )
}

fn server(sink: &Sink) -> String {
    let (h, p) = sink.host_port();
    format!("[[domain.server]]\nhost = \"{h}\"\nport = {p}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_reported_to_the_sender_once() {
    let rejecting = Sink::start("127.0.1.100", &["-f", "rcpt"]);
    let bounces = Sink::start("127.0.1.101", &[]);
    let relay = relay_with(&server(&rejecting), &bounces, "retry = [\"1h\"]");
    assert!(send_one(&relay.addr, "user@customer.test", 7).await);
    // smtp-sink writes its dumps with LF line ends; a complete report ends with its closing boundary.
    let complete = |d: &String| d.trim_end().ends_with("--");
    relay.eventually("one notification", || bounces.dumps().iter().filter(|d| complete(d)).count() == 1).await;
    let dsn = &bounces.dumps()[0];
    mxrelay_e2e::assert_contains_all(
        dsn,
        &[
            "X-Mail-Args: <>",
            "X-Rcpt-Args: <sender@src.test>",
            "Content-Type: multipart/report; report-type=delivery-status",
            "Final-Recipient: rfc822; user@customer.test",
            "Action: failed",
            // smtp-sink's own words for `-f rcpt`: the server's status, not one made up.
            "Status: 5.3.0",
            "Diagnostic-Code: smtp; 500 5.3.0 Error: command failed",
            "Content-Type: text/rfc822-headers",
            "X-Seq: 7",
        ],
    );
    assert!(!dsn.contains("END-OF-MESSAGE"), "only headers of the original are returned");

    // A notification that fails is not reported: mail from <> to a rejecting server.
    let relay2 = relay_with(&server(&rejecting), &bounces, "retry = [\"1h\"]");
    let out = std::process::Command::new("swaks")
        .args(["--server", &relay2.addr, "--from", "<>", "--to", "user@customer.test", "--timeout", "10"])
        .output()
        .expect("swaks");
    assert!(String::from_utf8_lossy(&out.stdout).contains("MAIL FROM:<>"), "{}", String::from_utf8_lossy(&out.stdout));
    relay
        .eventually("null-sender failure logged", || {
            !relay2.log_lines(&["no notification for a message with the null sender"]).is_empty()
        })
        .await;
    assert_eq!(bounces.dumps().len(), 1, "a notification about a notification was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_and_delay_are_reported() {
    let bounces = Sink::start("127.0.1.102", &[]);
    let down = format!("[[domain.server]]\nhost = \"127.0.1.103\"\nport = {}\n", mxrelay_e2e::free_port("127.0.1.103"));
    // Still queued after 300 ms: one "delayed" notice; expired after 2 s: one "failed".
    let relay = relay_with(
        &down,
        &bounces,
        "retry = [\"200ms\"]\ndelay_warning = \"300ms\"\nmax_queue_lifetime = \"2s\"\nprobe_interval = \"1h\"",
    );
    assert!(send_one(&relay.addr, "user@customer.test", 9).await);
    relay.eventually("two notices", || bounces.dumps().iter().filter(|d| d.trim_end().ends_with("--")).count() == 2).await;
    let dumps = bounces.dumps();
    let delayed = dumps.iter().find(|d| d.contains("Action: delayed")).expect("a delayed notice");
    assert!(delayed.contains("Will-Retry-Until:") && delayed.contains("Status: 4."), "{delayed}");
    let failed = dumps.iter().find(|d| d.contains("Action: failed")).expect("a failed notice");
    assert!(failed.contains("Status: 4.4.7") && failed.contains("delivery time expired"), "{failed}");
    relay.logged(&["expired after max_queue_lifetime"]).await;
}

/// A customer whose agreement keeps mail for another time than the default has its own
/// `max_queue_lifetime`. It applies to that domain alone, and a reload applies a change to
/// mail already queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domains_own_queue_lifetime_applies_to_it_alone_and_a_reload_changes_it() {
    let bounces = Sink::start("127.0.1.104", &[]);
    let port = mxrelay_e2e::free_port("127.0.1.105");
    let down = |name: &str, extra: &str| {
        format!("[[domain]]\nname = \"{name}\"\n{extra}[[domain.server]]\nhost = \"127.0.1.105\"\nport = {port}\n")
    };
    let (bh, bp) = bounces.host_port();
    let relay = Relay::start(
        &(down("short.test", "max_queue_lifetime = \"1s\"\n") + &down("default.test", "")),
        &format!("bounce_relay = \"{bh}:{bp}\"\nretry = [\"200ms\"]\nprobe_interval = \"1h\""),
    );
    assert!(send_one(&relay.addr, "user@short.test", 1).await);
    assert!(send_one(&relay.addr, "user@default.test", 2).await);
    let expired = || relay.log_lines(&["expired after max_queue_lifetime"]);
    relay.eventually("short.test's mail expired", || expired().len() == 1).await;
    assert!(expired()[0].contains("user@short.test"), "{}", relay.log_text());
    // default.test's message, as old, is tried three more times and stays queued (5 days).
    let deferrals = relay.log_lines(&["deferred"]).len();
    relay.eventually("three more attempts", || relay.log_lines(&["deferred"]).len() >= deferrals + 3).await;
    assert_eq!(expired().len(), 1, "default.test's mail expired with short.test's lifetime: {}", relay.log_text());

    let path = relay.config_path();
    let text = std::fs::read_to_string(&path).expect("config");
    let next = text.replace("name = \"default.test\"\n", "name = \"default.test\"\nmax_queue_lifetime = \"1s\"\n");
    std::fs::write(&path, next).expect("write");
    relay.signal("HUP");
    relay.eventually("default.test's queued mail expired after the reload", || expired().len() == 2).await;
    assert!(expired()[1].contains("user@default.test"), "{}", relay.log_text());
    let notices = || bounces.dumps().into_iter().filter(|d| d.trim_end().ends_with("--")).collect::<Vec<_>>();
    relay.eventually("two expiry notices", || notices().len() == 2).await;
    for rcpt in ["user@short.test", "user@default.test"] {
        let notice = notices().into_iter().find(|d| d.contains(&format!("Final-Recipient: rfc822; {rcpt}"))).expect(rcpt);
        assert!(notice.contains("Status: 4.4.7"), "{notice}");
    }
}
