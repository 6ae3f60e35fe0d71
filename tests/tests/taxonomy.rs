//! The delivery outcome taxonomy against a sink that answers chosen codes: which failures
//! move on to the next server, which fail the message, which defer it; and a server that is
//! the relay itself, passed over; and a server's limit on recipients per transaction.

use mxrelay_e2e::{PATIENCE, Relay, Sink, domain_block, domain_with, eventually, send_one, swaks_tagged, wait_until};

/// What must happen to a message whose primary server misbehaves in one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Delivered by the primary server itself.
    Primary,
    /// Delivered by the backup server (preference 20) in the same run.
    Backup,
    /// Fails permanently: never offered to the backup.
    Fails,
    /// Deferred without trying the backup: the primary may already have it.
    Deferred,
}

const CASES: [(&str, Expect); 16] = [
    ("-f connect", Expect::Backup),   // 5xx greeting
    ("-r connect", Expect::Backup),   // 4xx greeting
    ("-f ehlo", Expect::Primary),     // HELO after a refused EHLO, as Postfix and Exim do
    ("-f ehlo,helo", Expect::Backup), // refused both
    ("-r ehlo", Expect::Backup),      // 4xx: not now
    ("-r mail", Expect::Backup),
    ("-f mail", Expect::Fails),
    ("-r rcpt", Expect::Backup),
    ("-f rcpt", Expect::Fails),
    ("-r data", Expect::Backup),
    ("-f data", Expect::Fails),
    ("-r .", Expect::Backup),
    ("-f .", Expect::Fails),
    ("-q mail", Expect::Backup), // connection lost before the final dot
    ("-q data", Expect::Backup), // dropped right after DATA
    ("-q .", Expect::Deferred),  // no reply to the final dot
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_class_is_handled_as_exim_and_postfix_do() {
    let primaries: Vec<Sink> =
        CASES.iter().map(|(args, _)| Sink::start("127.0.1.20", &args.split(' ').collect::<Vec<_>>())).collect();
    let backup = Sink::start("127.0.1.21", &[]);
    let domains: String =
        primaries.iter().enumerate().map(|(i, p)| domain_block(&format!("case{i}.test"), &[(p, 10), (&backup, 20)])).collect();
    let relay = Relay::start(&domains, "retry = [\"1h\"]");
    for i in 0..CASES.len() {
        assert!(send_one(&relay.addr, &format!("u@case{i}.test"), i as u64).await, "relay refused case {i}");
    }
    for (i, (args, expect)) in CASES.iter().enumerate() {
        let rcpt = format!("u@case{i}.test");
        match expect {
            Expect::Primary => {
                eventually(&format!("case {args:?} delivered by the primary"), || {
                    primaries[i].received().contains_key(&(i as u64))
                })
                .await
            }
            Expect::Backup => {
                eventually(&format!("case {args:?} delivered by the backup"), || backup.received().contains_key(&(i as u64)))
                    .await
            }
            Expect::Fails => {
                eventually(&format!("case {args:?} failed permanently"), || {
                    !relay.log_lines(&["permanent failure", &rcpt]).is_empty()
                })
                .await
            }
            Expect::Deferred => {
                eventually(&format!("case {args:?} deferred"), || {
                    !relay.log_lines(&["deferred", "may be delivered twice"]).is_empty()
                })
                .await
            }
        }
    }
    // Only now is it safe to say what did not happen: every run has finished.
    for (i, (args, expect)) in CASES.iter().enumerate() {
        let at_backup = backup.received().contains_key(&(i as u64));
        assert_eq!(at_backup, *expect == Expect::Backup, "case {args:?}: at backup = {at_backup}\n{}", relay.log_text());
    }
}

/// A server that is the relay itself (a customer who listed the filtering service's own
/// address) is passed over: the relay finds its own host name in the greeting, leaves, and
/// delivers to the next server at once. Without this the message went round through the
/// relay, gaining a `Received:` field each time, until the hop limit bounced it, and it never
/// reached the backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_the_relay_itself_is_passed_over() {
    let backup = Sink::start("127.0.1.168", &[]);
    let relay = Relay::start(&domain_block("customer.test", &[(&backup, 20)]), "");
    // Its own address is known once it listens: added to the domain's servers by a reload.
    let path = relay.config_path();
    let text = std::fs::read_to_string(&path).expect("config");
    let head = text.split("[[domain]]").next().expect("head");
    let (own_host, own_port) = relay.addr.rsplit_once(':').expect("host:port");
    let (backup_host, backup_port) = backup.host_port();
    let servers = [(own_host, own_port.parse().expect("port"), 10), (backup_host, backup_port, 20)];
    std::fs::write(&path, format!("{head}{}", domain_with("customer.test", "", &servers))).expect("write");
    relay.signal("HUP");
    relay.eventually("reloaded", || !relay.log_lines(&["configuration reloaded"]).is_empty()).await;

    assert!(send_one(&relay.addr, "user@customer.test", 1).await);
    relay.eventually("delivered to the backup", || backup.count() == 1).await;
    let dump = backup.dumps().pop().expect("the message");
    assert_eq!(dump.matches("by relay.test (mxrelay)").count(), 1, "the message went through the relay more than once:\n{dump}");
    relay.logged(&["a server is this relay itself"]).await;
}

/// A server that takes only so many recipients per transaction answers the rest `452 4.5.3`
/// (RFC 5321 §4.5.3.1.10): they go to the same server in another transaction at once, not to
/// the backup and not after a retry interval. The server here is a second mxrelay with
/// `max_recipients = 2`, which delivers each transaction it takes to a sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_past_a_servers_limit_go_to_it_in_another_transaction_at_once() {
    let behind = Sink::start("127.0.1.172", &[]);
    let backup = Sink::start("127.0.1.173", &[]);
    let limited = Relay::start_with(
        "hostname = \"mx.customer.test\"\nmax_recipients = 2",
        &domain_block("customer.test", &[(&behind, 10)]),
        "",
    );
    let port: u16 = limited.addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("port");
    let (bh, bp) = backup.host_port();
    let relay = Relay::start(&domain_with("customer.test", "", &[("127.0.0.1", port, 10), (bh, bp, 20)]), "retry = [\"1h\"]");
    let to = "u1@customer.test,u2@customer.test,u3@customer.test,u4@customer.test,u5@customer.test";
    let (ok, out) = swaks_tagged(&relay.addr, to, 1, &[]);
    assert!(ok, "{out}");
    assert!(wait_until(PATIENCE, || behind.count() == 3), "three transactions of 2, 2 and 1: {}", relay.log_text());
    let rcpts: usize = behind.dumps().iter().map(|d| d.lines().filter(|l| l.starts_with("X-Rcpt-Args: ")).count()).sum();
    assert_eq!(rcpts, 5, "every recipient once");
    relay.eventually("five deliveries logged", || relay.log_lines(&["outcome=\"delivered\""]).len() == 5).await;
    assert_eq!(relay.log_lines(&["outcome=\"next-transaction\""]).len(), 4, "u3-u5, then u5: {}", relay.log_text());
    assert!(relay.log_lines(&["deferred"]).is_empty(), "{}", relay.log_text());
    assert_eq!(backup.count(), 0, "the backup got mail the primary would take");
}
