//! Hardening, against the real relay: SMTP smuggling, abuse limits, slow clients, stalled
//! servers, a full disk, and the admin API's limits. Each test fails if its protection is
//! removed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mxrelay_e2e::{PATIENCE, Relay, Sink, domain_block, domain_with, free_port, http_request};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// A raw SMTP client: writes exactly the bytes given, reads reply lines.
struct Raw {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Raw {
    async fn connect(addr: &str) -> Raw {
        Raw::connect_from(addr, "127.0.0.1").await
    }

    /// Connects from source address `from` (any 127.x on loopback).
    async fn connect_from(addr: &str, from: &str) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(format!("{from}:0").parse().expect("source")).expect("bind");
        let stream = socket.connect(addr.parse().expect("addr")).await.expect("connect");
        let (r, w) = stream.into_split();
        Raw { reader: BufReader::new(r), writer: w }
    }

    /// The next complete reply (multi-line replies joined), or "" when the server closed.
    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            match tokio::time::timeout(PATIENCE, self.reader.read_line(&mut line)).await {
                Ok(Ok(0)) | Err(_) => return all,
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return all,
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return all;
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write");
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// A new session after its greeting and EHLO.
    async fn greeted(addr: &str) -> Raw {
        let mut c = Raw::connect(addr).await;
        assert!(c.reply().await.starts_with("220"));
        assert!(c.cmd("EHLO sender.test").await.starts_with("250"));
        c
    }

    /// Greeting, EHLO, MAIL, RCPT: ready for DATA.
    async fn start(addr: &str, rcpt: &str) -> Raw {
        let mut c = Raw::greeted(addr).await;
        assert!(c.cmd("MAIL FROM:<a@src.test>").await.starts_with("250"));
        assert!(c.cmd(&format!("RCPT TO:<{rcpt}>")).await.starts_with("250"));
        c
    }

    /// DATA, then `text` (ending in CRLF) and the final dot; returns the reply to the dot.
    async fn data(&mut self, text: &str) -> String {
        assert!(self.cmd("DATA").await.starts_with("354"));
        self.send(text.as_bytes()).await;
        self.send(b".\r\n").await;
        self.reply().await
    }

    /// [`Raw::send_message`], except that a refusal of MAIL ends it: returns that refusal, or
    /// the reply to the final dot.
    async fn try_send_message(addr: &str, rcpt: &str, text: &str) -> String {
        let mut c = Raw::greeted(addr).await;
        let mail = c.cmd("MAIL FROM:<a@src.test>").await;
        if !mail.starts_with("250") {
            return mail;
        }
        assert!(c.cmd(&format!("RCPT TO:<{rcpt}>")).await.starts_with("250"));
        c.data(text).await
    }

    /// One whole transaction in a new session: `text` (ending in CRLF) as a message to
    /// `rcpt`. Returns the reply to its final dot.
    async fn send_message(addr: &str, rcpt: &str, text: &str) -> String {
        Raw::start(addr, rcpt).await.data(text).await
    }
}

/// Each known smuggling payload: the message carries a second, smuggled transaction after a
/// non-standard end of data. The sink must receive the one message, with the smuggled text
/// inside it, and never a second message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_payloads_never_become_a_second_message() {
    let sink = Sink::start("127.0.1.70", &[]);
    let relay = Relay::start(&domain_block("customer.test", &[(&sink, 10)]), "");
    let separators: [&[u8]; 8] =
        [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r\n.\n", b"\r.\r\n", b"\r\r\n.\r\r\n", b"\r\n\x00.\r\n"];
    for (seq, sep) in separators.iter().enumerate() {
        let mut c = Raw::start(&relay.addr, "user@customer.test").await;
        assert!(c.cmd("DATA").await.starts_with("354"));
        let mut payload = format!("X-Seq: {seq}\r\nSubject: innocent\r\n\r\nhello").into_bytes();
        payload.extend_from_slice(sep);
        payload.extend_from_slice(b"MAIL FROM:<admin@customer.test>\r\nRCPT TO:<user@customer.test>\r\nDATA\r\nX-Seq: 999\r\nSubject: smuggled\r\n\r\nsmuggled\r\n");
        payload.extend_from_slice(format!("END-OF-MESSAGE {seq}\r\n.\r\n").as_bytes());
        c.send(&payload).await;
        let answer = c.reply().await;
        assert!(answer.starts_with("250"), "separator {sep:?}: {answer}");
        assert!(c.cmd("QUIT").await.starts_with("221"));
    }
    relay.eventually("every payload delivered whole", || sink.count() == separators.len()).await;
    let received = sink.received();
    assert_eq!(received.keys().copied().collect::<Vec<_>>(), (0..separators.len() as u64).collect::<Vec<_>>());
    assert!(received.values().all(|n| *n == 1), "{received:?}");
    let dumps = sink.dumps();
    assert_eq!(dumps.len(), separators.len(), "a smuggled message was delivered");
    for d in &dumps {
        assert!(d.contains("Subject: innocent") && d.contains("Subject: smuggled"), "{d}");
    }
}

/// A client that talks before the greeting is refused and the session closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_before_the_greeting_is_refused() {
    let sink = Sink::start("127.0.1.78", &[]);
    let relay = Relay::start_with("greet_pause = \"300ms\"", &domain_block("customer.test", &[(&sink, 10)]), "");
    let mut early = Raw::connect(&relay.addr).await;
    early.send(b"EHLO early.example\r\nMAIL FROM:<a@src.test>\r\n").await;
    let answer = early.reply().await;
    assert!(answer.starts_with("554 5.5.0 protocol synchronization error"), "{answer}");
    assert_eq!(early.reply().await, "", "the session must be closed");
    // A client that waits for the greeting is served.
    let mut polite = Raw::connect(&relay.addr).await;
    assert!(polite.reply().await.starts_with("220"));
    assert!(polite.cmd("EHLO polite.example").await.starts_with("250"));
}

/// Content sent before the 354 (pipelined after DATA) is refused and the session closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_pipelined_before_354_is_refused() {
    let sink = Sink::start("127.0.1.71", &[]);
    let relay = Relay::start(&domain_block("customer.test", &[(&sink, 10)]), "");
    let mut c = Raw::start(&relay.addr, "user@customer.test").await;
    c.send(b"DATA\r\nSubject: early\r\n\r\nbody\r\n.\r\n").await;
    let answer = c.reply().await;
    assert!(answer.starts_with("554 5.5.0 improper command pipelining"), "{answer}");
    assert_eq!(c.reply().await, "", "the session must be closed");
}

/// The messages arriving at once hold at most `max_data_in_memory`: past it, a sender gets
/// `452 4.3.1` (at MAIL when its SIZE says so, else after its data) and tries again later;
/// the message already arriving is taken, and so is the next once there is room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_arriving_at_once_hold_at_most_max_data_in_memory() {
    let sink = Sink::start("127.0.1.153", &[]);
    let relay = Relay::start_with(
        "max_data_in_memory = 1048576\nadmin_listen = \"127.0.0.1:0\"",
        &domain_block("customer.test", &[(&sink, 10)]),
        "",
    );
    let held = || mxrelay_e2e::metric(&relay.metrics(), "mxrelay_inbound_data_bytes");
    // The first message is alone, so it may take more than the limit: 900 KiB, still arriving.
    let mut first = Raw::start(&relay.addr, "user@customer.test").await;
    assert!(first.cmd("DATA").await.starts_with("354"));
    // Lines of 65 bytes: 920 KiB.
    first.send(format!("X-Seq: 1\r\n\r\n{}", &large_body(1)[..65 * 14_500]).as_bytes()).await;
    relay.eventually("the first message's data held", || held().is_some_and(|b| b >= f64::from(900 << 10))).await;

    let mut sized = Raw::greeted(&relay.addr).await;
    let answer = sized.cmd("MAIL FROM:<a@src.test> SIZE=200000").await;
    assert!(answer.starts_with("452 4.3.1"), "{answer}");
    let text = format!("X-Seq: 2\r\n\r\n{}END-OF-MESSAGE 2\r\n", &large_body(1)[..65 * 4_700]);
    let answer = Raw::send_message(&relay.addr, "user@customer.test", &text).await;
    assert!(answer.starts_with("452 4.3.1"), "{answer}");

    first.send(b"END-OF-MESSAGE 1\r\n.\r\n").await;
    let answer = first.reply().await;
    assert!(answer.starts_with("250"), "{answer}");
    relay.eventually("every share given back", || held() == Some(0.0)).await;
    let text = text.replace("X-Seq: 2", "X-Seq: 3").replace("END-OF-MESSAGE 2", "END-OF-MESSAGE 3");
    let answer = Raw::send_message(&relay.addr, "user@customer.test", &text).await;
    assert!(answer.starts_with("250"), "with room again: {answer}");
    relay.eventually("both taken delivered", || sink.count() == 2).await;
    assert_eq!(sink.received().keys().copied().collect::<Vec<_>>(), [1, 3]);
    let metrics = relay.metrics();
    let refused = mxrelay_e2e::metric(&metrics, "mxrelay_inbound_refused_total{reason=\"max_data_in_memory\"}");
    assert_eq!(refused, Some(2.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_on_connections_recipients_and_line_length() {
    let sink = Sink::start("127.0.1.72", &[]);
    let relay = Relay::start_with(
        "max_connections = 3\nmax_connections_per_client = 2\nmax_recipients = 3\nadmin_listen = \"127.0.0.1:0\"",
        &domain_block("customer.test", &[(&sink, 10)]),
        "",
    );
    let mut first = Raw::connect(&relay.addr).await;
    let mut second = Raw::connect(&relay.addr).await;
    assert!(first.reply().await.starts_with("220"));
    assert!(second.reply().await.starts_with("220"));
    let mut third = Raw::connect(&relay.addr).await;
    assert!(third.reply().await.starts_with("421 4.7.0"), "a third connection from one client is refused");
    let mut other = Raw::connect_from(&relay.addr, "127.0.0.2").await;
    assert!(other.reply().await.starts_with("220"), "another client still gets in");
    let mut fourth = Raw::connect_from(&relay.addr, "127.0.0.3").await;
    assert!(fourth.reply().await.starts_with("421 4.3.2"), "a fourth connection in all is refused");
    // Operators see both: how many are open, and what was refused by which limit.
    let metrics = relay.metrics();
    let value = |series: &str| mxrelay_e2e::metric(&metrics, series);
    assert_eq!(value("mxrelay_inbound_connections "), Some(3.0), "{metrics}");
    assert_eq!(value("mxrelay_inbound_refused_total{reason=\"max_connections\"}"), Some(1.0), "{metrics}");
    assert_eq!(value("mxrelay_inbound_refused_total{reason=\"max_connections_per_client\"}"), Some(1.0), "{metrics}");
    for mut c in [first, second, other] {
        assert!(c.cmd("QUIT").await.starts_with("221"));
    }
    drop((third, fourth));
    // The relay frees a slot when a session's task ends, a moment after its 221: wait for it.
    let started = std::time::Instant::now();
    loop {
        let mut probe = Raw::connect(&relay.addr).await;
        if probe.reply().await.starts_with("220") {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "connection slots were never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut c = Raw::start(&relay.addr, "u1@customer.test").await;
    assert!(c.cmd("RCPT TO:<u2@customer.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<u3@customer.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<u4@customer.test>").await.starts_with("452 4.5.3"));

    let mut c = Raw::connect(&relay.addr).await;
    assert!(c.reply().await.starts_with("220"));
    let long = format!("EHLO {}", "a".repeat(5000));
    assert!(c.cmd(&long).await.starts_with("500 5.5.6"));
    assert_eq!(c.reply().await, "", "closed after an overlong line");
}

/// A message that has made more hops than `max_hops` is going round a loop: refused with
/// `554 5.4.6`, so the client reports it, and never queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_too_many_received_fields_is_refused_as_a_loop() {
    let sink = Sink::start("127.0.1.127", &[]);
    let relay = Relay::start_with("max_hops = 3", &domain_block("customer.test", &[(&sink, 10)]), "");
    let hops = |n: usize| "Received: from mx.customer.test by filter.test; Sun, 29 Nov 2026 14:00:00 +0000\r\n".repeat(n);
    let mut c = Raw::start(&relay.addr, "user@customer.test").await;
    assert!(c.cmd("DATA").await.starts_with("354"));
    let answer = c.cmd(&format!("{}X-Seq: 1\r\n\r\nlooping\r\nEND-OF-MESSAGE 1\r\n.", hops(4))).await;
    assert!(answer.starts_with("554 5.4.6 too many hops: 4 Received: fields (limit 3)"), "{answer}");
    // The session goes on: the same client's next message, within the limit, is taken.
    assert!(c.cmd("MAIL FROM:<a@src.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<user@customer.test>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    let answer = c.cmd(&format!("{}X-Seq: 2\r\n\r\nfine\r\nEND-OF-MESSAGE 2\r\n.", hops(3))).await;
    assert!(answer.starts_with("250"), "{answer}");
    relay.eventually("the second message delivered", || sink.count() == 1).await;
    assert_eq!(sink.received().into_keys().collect::<Vec<_>>(), [2], "the looping message was queued");
    assert_eq!(relay.logged(&["a mail loop"]).await, 1);
}

/// A client that goes quiet, or drips a byte at a time, is cut off at the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slowloris_clients_are_cut_off() {
    let sink = Sink::start("127.0.1.73", &[]);
    let relay = Relay::start_with("idle_timeout = \"1s\"", &domain_block("customer.test", &[(&sink, 10)]), "");
    let mut quiet = Raw::connect(&relay.addr).await;
    assert!(quiet.reply().await.starts_with("220"));
    assert!(quiet.reply().await.starts_with("421 4.4.2"), "a silent client is told and closed");

    let mut drip = Raw::connect(&relay.addr).await;
    assert!(drip.reply().await.starts_with("220"));
    let started = std::time::Instant::now();
    let mut cut = false;
    for b in b"EHLO slowloris.example.com and more and more and more".iter() {
        if drip.writer.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        let mut buf = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), drip.reader.read(&mut buf)).await {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            assert!(n == 0 || text.starts_with("421 4.4.2"), "{text}");
            cut = true;
            break;
        }
    }
    assert!(cut, "a client dripping one byte per 300 ms kept the session for {:?}", started.elapsed());

    // In the data: quiet for the idle timeout, or slower than 500 bytes/s in all (a byte per
    // 100 ms is never quiet for 1 s), the client is told and closed, and nothing is queued.
    for gap in [None, Some(Duration::from_millis(100))] {
        let mut client = Raw::connect(&relay.addr).await;
        assert!(client.reply().await.starts_with("220"));
        for command in ["EHLO slow.example", "MAIL FROM:<a@src.test>", "RCPT TO:<user@customer.test>", "DATA"] {
            assert!(!client.cmd(command).await.is_empty(), "{command}");
        }
        let started = std::time::Instant::now();
        let late = async {
            loop {
                let mut buf = [0u8; 512];
                let read = match gap {
                    Some(gap) => {
                        if client.writer.write_all(b"x").await.is_err() {
                            return String::new();
                        }
                        tokio::time::timeout(gap, client.reader.read(&mut buf)).await
                    }
                    None => Ok(client.reader.read(&mut buf).await),
                };
                if let Ok(read) = read {
                    return String::from_utf8_lossy(&buf[..read.unwrap_or(0)]).to_string();
                }
            }
        };
        let text = tokio::time::timeout(Duration::from_secs(20), late).await.unwrap_or_default();
        assert!(
            text.starts_with("421 4.4.2 relay.test the message data was late"),
            "{gap:?}: {text:?} after {:?}",
            started.elapsed()
        );
    }
    assert_eq!(sink.count(), 0);
    assert!(relay.log_lines(&["accepted"]).is_empty(), "{}", relay.log_text());
}

/// A primary that accepts connections, writes `greeting` (if any) and then says nothing, with
/// a backup sink behind it; returns the relay (command timeout `timeout`), the backup and
/// how many connections the silent primary has taken.
async fn silent_primary_scene(
    ip: &str,
    backup_ip: &str,
    greeting: Option<&'static [u8]>,
    timeout: &str,
) -> (Relay, Sink, Arc<AtomicUsize>) {
    let silent = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = silent.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            if let Some(greeting) = greeting {
                let _ = s.write_all(greeting).await;
            }
            held.push(s); // then say nothing
        }
    });
    let backup = Sink::start(backup_ip, &[]);
    let (bh, bp) = backup.host_port();
    let domain = domain_with("customer.test", "", &[(ip, port, 10), (bh, bp, 20)]);
    let relay = Relay::start(&domain, &format!("command_timeout = \"{timeout}\""));
    (relay, backup, connections)
}

/// A customer server that accepts the connection and never greets: the relay gives up after
/// the command timeout, delivers to the next server, and marks the silent one down, so the
/// next messages do not wait for it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_is_passed_over() {
    let (relay, backup, _) = silent_primary_scene("127.0.1.74", "127.0.1.75", None, "1s").await;
    assert!(mxrelay_e2e::send_one(&relay.addr, "user@customer.test", 1).await);
    relay.eventually("delivered by the backup", || backup.count() == 1).await;
    assert_eq!(relay.logged(&["server marked down", "127.0.1.74"]).await, 1, "{}", relay.log_text());
    for seq in 2..=4 {
        assert!(mxrelay_e2e::send_one(&relay.addr, "user@customer.test", seq).await);
    }
    relay.eventually("the next three delivered by the backup", || backup.count() == 4).await;
    // Only the probes connect to it now, in the background; no delivery waited for it again.
    assert_eq!(relay.logged(&["delivery attempt", "no greeting within"]).await, 1, "{}", relay.log_text());
}

/// A server that greets and then never answers EHLO is as silent as one that never greets:
/// marked down after the first message, and the probes, which ask for an answer to EHLO, keep
/// it down while it stays silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_silent_after_its_greeting_is_marked_down_and_stays_down() {
    let (relay, backup, connections) =
        silent_primary_scene("127.0.1.76", "127.0.1.77", Some(b"220 silent ESMTP\r\n"), "500ms").await;
    assert!(mxrelay_e2e::send_one(&relay.addr, "user@customer.test", 1).await);
    relay.eventually("delivered by the backup", || backup.count() == 1).await;
    assert_eq!(relay.logged(&["server marked down", "no reply to EHLO"]).await, 1, "{}", relay.log_text());
    // Two probes after the delivery's connection, both unanswered: still down.
    let seen = connections.load(Ordering::SeqCst);
    relay.eventually("two probes", || connections.load(Ordering::SeqCst) >= seen + 2).await;
    assert!(mxrelay_e2e::send_one(&relay.addr, "user@customer.test", 2).await);
    relay.eventually("the next one delivered by the backup", || backup.count() == 2).await;
    assert_eq!(relay.logged(&["delivery attempt", "no reply to EHLO"]).await, 1, "{}", relay.log_text());
    assert!(relay.log_lines(&["up again"]).is_empty(), "{}", relay.log_text());
}

/// A customer server that greets and then stalls mid-transaction (smtp-sink waiting before
/// it answers MAIL) would make every message wait the command timeout. It is marked down
/// after the first; once it greets again, one delivery at a time is its trial while the
/// others go to the next tier, and a trial that gets an answer brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stalls_mid_transaction_comes_back_through_one_trial() {
    let primary_addr = format!("127.0.1.135:{}", free_port("127.0.1.135"));
    let mut stalling = Sink::start_at(&primary_addr, &["-W", "mail:120"]);
    let backup = Sink::start("127.0.1.136", &[]);
    let (bh, bp) = backup.host_port();
    let (ph, pp) = stalling.host_port();
    let domain = domain_with("customer.test", "", &[(ph, pp, 10), (bh, bp, 20)]);
    let relay = Relay::start_with(
        "admin_listen = \"127.0.0.1:0\"\nadmin_token = \"0123456789abcdef0123\"",
        &domain,
        "command_timeout = \"3s\"",
    );
    let stalls = || relay.log_lines(&["delivery attempt", "no reply to the pipelined MAIL, RCPT and DATA"]).len();

    assert!(mxrelay_e2e::send_one(&relay.addr, "user@customer.test", 1).await);
    relay.eventually("delivered by the backup after the stall", || backup.count() == 1).await;
    assert_eq!(relay.logged(&["server marked down", "127.0.1.135"]).await, 1, "{}", relay.log_text());
    relay.eventually("the probe finds it greeting", || !relay.log_lines(&["greets again"]).is_empty()).await;

    // Five at once: one is the trial and waits out the stall; the other four pass it over.
    let accepted = mxrelay_e2e::send(&relay.addr, "user@customer.test", 2..7, 5).await;
    assert_eq!(accepted, (2..7).collect::<Vec<u64>>());
    relay.eventually("all six delivered by the backup", || backup.count() == 6).await;
    relay.eventually("the trial's stall logged", || stalls() >= 2).await;
    assert_eq!(stalls(), 2, "only the first message and one trial waited: {}", relay.log_text());
    assert_eq!(relay.logged(&["trial delivery failed"]).await, 1, "{}", relay.log_text());
    let marked = format!("mxrelay_server_marked_down_total{{server=\"{primary_addr}\",fault=\"stalled\"}}");
    assert_eq!(mxrelay_e2e::metric(&relay.metrics(), &marked), Some(2.0));

    // It answers again: the next trial gets through and the server is back in its place.
    stalling.kill();
    let answering = Sink::start_at(&primary_addr, &[]);
    relay.eventually("a probe opens the next trial", || relay.log_lines(&["greets again"]).len() == 2).await;
    assert!(mxrelay_e2e::send_one(&relay.addr, "user@customer.test", 7).await);
    relay.eventually("the trial delivered by the primary", || answering.count() == 1).await;
    assert_eq!(relay.logged(&["server is up again", "127.0.1.135"]).await, 1, "{}", relay.log_text());
    assert!(mxrelay_e2e::send_one(&relay.addr, "user@customer.test", 8).await);
    relay.eventually("the next one too", || answering.count() == 2).await;
    assert_eq!(backup.count(), 6);
    assert_eq!(stalls(), 2, "{}", relay.log_text());
}

/// A server that takes the data and never answers the final dot may have the message, so
/// the message is deferred, never passed on at once; the server is marked down, so neither
/// its retry nor the next message waits for it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_silent_after_the_final_dot_is_marked_down() {
    let stalling = Sink::start("127.0.1.137", &["-W", ".:120"]);
    let backup = Sink::start("127.0.1.138", &[]);
    let (bh, bp) = backup.host_port();
    let (ph, pp) = stalling.host_port();
    let domain = domain_with("customer.test", "", &[(ph, pp, 10), (bh, bp, 20)]);
    // No probe in the test's time: the mark is what keeps deliveries away.
    let relay = Relay::start(&domain, "data_timeout = \"2s\"\nprobe_interval = \"1h\"\nretry = [\"100ms\"]");

    assert!(mxrelay_e2e::send_one(&relay.addr, "user@customer.test", 1).await);
    relay
        .eventually("marked down after the silent final dot", || {
            !relay.log_lines(&["server marked down", "no reply to the final dot"]).is_empty()
        })
        .await;
    // Logged after the mark: awaited, not assumed.
    let deferred = || relay.log_lines(&["deferred", "may be delivered twice"]).len();
    relay.eventually("deferred, not passed on at once", || deferred() > 0).await;
    assert!(mxrelay_e2e::send_one(&relay.addr, "user@customer.test", 2).await);
    relay
        .eventually("the retry and the next message delivered by the backup", || {
            let got = backup.received();
            got.contains_key(&1) && got.contains_key(&2)
        })
        .await;
    assert_eq!(relay.logged(&["no usable reply to the final dot", "127.0.1.137"]).await, 1, "{}", relay.log_text());
    assert_eq!(deferred(), 1, "{}", relay.log_text());
}

/// With the disk full, the relay answers 452 and acknowledges nothing it has not stored;
/// every message acknowledged before is delivered once the relay runs again. Once it knows
/// the disk is full, it refuses at MAIL, before the client sends the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gets_452_and_loses_nothing() {
    // The customer's server is down while the queue fills, so nothing leaves it.
    let sink_port = free_port("127.0.1.76");
    // 20 MiB per file: the journal segments (16 MiB) fit; the redb index does not, so
    // checkpoints start failing and, two full segments later, new mail is refused.
    let domain = domain_with("customer.test", "", &[("127.0.1.76", sink_port, 10)]);
    let admin = "admin_listen = \"127.0.0.1:0\"\nadmin_token = \"0123456789abcdef0123\"";
    let notify = mxrelay_e2e::NotifySocket::bind();
    let env = [("NOTIFY_SOCKET", notify.path.as_str()), ("WATCHDOG_USEC", "200000")];
    let mut relay = Relay::start_with_file_size_limit(20 * 1024, &env, admin, &domain, "retry = [\"1h\"]");
    let health = |relay: &Relay| http_request(&relay.admin_addr(), "GET", "/healthz", None, "");
    assert_eq!(health(&relay).0, 200);
    let mut acked = Vec::new();
    let mut refused = 0;
    for seq in 0..400u64 {
        let answer = send_quarter_mebibyte(&relay, seq).await;
        if answer.starts_with("250") {
            acked.push(seq);
        } else {
            assert!(answer.starts_with("452 4.3.1"), "message {seq}: {answer:?}; the relay's log:\n{}", relay.log_text());
            refused += 1;
        }
    }
    assert!(refused > 0, "the 20 MiB limit was never hit: acked {}", acked.len());
    assert!(!acked.is_empty(), "nothing was accepted before the disk filled");
    // The relay itself keeps SIGXFSZ from ending it (nothing here ignores it on its behalf).
    relay.logged(&["past the file-size limit"]).await;
    // A load balancer is told, with the reason.
    let (status, body) = health(&relay);
    assert!(status == 503 && body.contains("\"refusing\"") && body.contains("checkpoints fail"), "{status} {body}");
    // Then a new transaction is refused at MAIL: the client need not send the data.
    let mut late = Raw::greeted(&relay.addr).await;
    let mail = late.cmd("MAIL FROM:<a@src.test>").await;
    assert!(mail.starts_with("452 4.3.1 insufficient system storage: the queue cannot store new mail now"), "{mail}");
    // Refusing for a full disk is not a hang: the watchdog is still pinged (a restart by
    // systemd would not make room).
    notify.drain();
    for _ in 0..2 {
        assert_eq!(notify.receive(), "WATCHDOG=1");
    }
    // Room again, with no mail coming in or going out (the server is down, the retry an hour
    // away): the relay finds out by itself and takes mail again.
    relay.lift_file_size_limit();
    // Sessions see it too, with no `/healthz` request: a new MAIL is taken again. (Here the
    // watchdog's pings publish the writer's state too; the next test has none.)
    let mail = mail_until(&relay, "250").await;
    assert!(mail.starts_with("250"), "{mail}; the relay's log:\n{}", relay.log_text());
    let text = "X-Seq: 400\r\n\r\nafter the disk had room again\r\nEND-OF-MESSAGE 400\r\n";
    let answer = Raw::try_send_message(&relay.addr, "user@customer.test", text).await;
    assert!(answer.starts_with("250"), "{answer}; the relay's log:\n{}", relay.log_text());
    assert_eq!(health(&relay).0, 200);
    acked.push(400);
    relay.kill9();

    // Room again, and the server is up: everything acknowledged is delivered, nothing else.
    let sink = Sink::start_at(&format!("127.0.1.76:{sink_port}"), &[]);
    relay.file_size_limit_kib = None;
    relay.restart();
    relay
        .eventually("every acknowledged message delivered", || {
            let got = sink.received();
            acked.iter().all(|s| got.contains_key(s))
        })
        .await;
    let got = sink.received();
    assert!(got.keys().all(|s| acked.contains(s)), "a refused message was delivered");
    assert_eq!(health(&relay).0, 200, "with room again, the relay takes mail");
}

/// Sends message `seq` with 256 KiB of body; returns the refusal of MAIL or the reply to the
/// final dot.
async fn send_quarter_mebibyte(relay: &Relay, seq: u64) -> String {
    let text = format!("X-Seq: {seq}\r\n\r\n{}\r\nEND-OF-MESSAGE {seq}\r\n", "z".repeat(256 * 1024));
    Raw::try_send_message(&relay.addr, "user@customer.test", &text).await
}

/// Sends quarter-MiB messages numbered on from `acked`, each `250` added to it, until one is
/// not taken (within 400 messages); returns its number and reply, which must start with
/// `refusal`.
async fn send_until_refused(relay: &Relay, acked: &mut Vec<u64>, refusal: &str) -> (u64, String) {
    loop {
        let seq = acked.len() as u64;
        assert!(seq < 400, "400 messages taken, none refused; the relay's log:\n{}", relay.log_text());
        let answer = send_quarter_mebibyte(relay, seq).await;
        if !answer.starts_with("250") {
            assert!(answer.starts_with(refusal), "message {seq}: {answer:?}; the relay's log:\n{}", relay.log_text());
            return (seq, answer);
        }
        acked.push(seq);
    }
}

/// Polls a new session's `MAIL` until its reply starts with `wanted` or [`PATIENCE`] passes;
/// returns the last reply.
async fn mail_until(relay: &Relay, wanted: &str) -> String {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let reply = Raw::greeted(&relay.addr).await.cmd("MAIL FROM:<a@src.test>").await;
        if reply.starts_with(wanted) || std::time::Instant::now() >= deadline {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sessions learn that the disk is full, and that it has room again, from the queue writer's
/// own rounds. Here no watchdog and no health check asks the writer for its state (each such
/// question also publishes it), yet `MAIL` is refused once the disk is full and taken again
/// once it has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_health_checks_sessions_still_see_the_disk_fill_and_get_room_again() {
    let sink_port = free_port("127.0.1.163");
    let domain = domain_with("customer.test", "", &[("127.0.1.163", sink_port, 10)]);
    let relay = Relay::start_with_file_size_limit(20 * 1024, &[], "", &domain, "retry = [\"1h\"]");
    let mut seq = 0;
    let first_refusal = loop {
        let answer = send_quarter_mebibyte(&relay, seq).await;
        if !answer.starts_with("250") || seq == 400 {
            break answer;
        }
        seq += 1;
    };
    assert!(first_refusal.starts_with("452 4.3.1"), "after {seq} messages: {first_refusal:?}\n{}", relay.log_text());
    let mail = mail_until(&relay, "452").await;
    assert!(mail.starts_with("452 4.3.1 insufficient system storage"), "{mail}; the relay's log:\n{}", relay.log_text());

    relay.lift_file_size_limit();
    let mail = mail_until(&relay, "250").await;
    assert!(mail.starts_with("250"), "{mail}; the relay's log:\n{}", relay.log_text());
}

/// A queue disk out of room for real (ENOSPC, not a file-size limit). Once no new journal
/// segment can be made there, mail gets `452` and `/healthz` says `refusing`. Once there is
/// room again, the relay starts a segment by itself and takes mail again, and after a
/// crash, also on a disk full again, every acknowledged message is delivered. (A segment
/// whose zeros did not fit used to stay behind under its name, so every later start of it
/// failed and mail stayed refused with room to spare; and a queue that needed room to replay
/// its journal did not open.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_disk_out_of_room_refuses_mail_until_it_has_room_and_loses_nothing() {
    // Declared first, so dropped last: the relay goes before the filesystem is unmounted.
    let disk = mxrelay_e2e::disk::FreezableDisk::create(128);
    // The customer's server is down while the disk fills, so the mail stays queued.
    let sink_port = free_port("127.0.1.166");
    let domain = domain_with("customer.test", "", &[("127.0.1.166", sink_port, 10)]);
    let settings = format!("queue = \"{}\"\nadmin_listen = \"127.0.0.1:0\"", disk.path().join("queue").display());
    let mut relay = Relay::start_with(&settings, &domain, "retry = [\"1h\"]");
    let health = |relay: &Relay| http_request(&relay.admin_addr(), "GET", "/healthz", None, "");
    let ballast = disk.take_all_room();

    let mut acked = Vec::new();
    let (refused, _) = send_until_refused(&relay, &mut acked, "452 4.3.1").await;
    let (status, body) = health(&relay);
    assert!(status == 503 && body.contains("\"refusing\"") && body.contains("cannot start a new segment"), "{status} {body}");
    let mail = mail_until(&relay, "452").await;
    assert!(mail.starts_with("452 4.3.1 insufficient system storage"), "{mail}");

    // Room again: with no help, the relay starts a segment and takes mail as big as before.
    std::fs::remove_file(&ballast).expect("remove the ballast");
    let mail = mail_until(&relay, "250").await;
    assert!(mail.starts_with("250"), "{mail}; the relay's log:\n{}", relay.log_text());
    for seq in refused + 1..refused + 11 {
        let answer = send_quarter_mebibyte(&relay, seq).await;
        assert!(answer.starts_with("250"), "message {seq}: {answer:?}; the relay's log:\n{}", relay.log_text());
        acked.push(seq);
    }
    assert_eq!(health(&relay).0, 200);
    relay.kill9();

    // A crash, and the disk is full again before the restart: replay needs room, and the
    // journal's spare segments, only room held in reserve, give it. The server is up now:
    // everything acknowledged is delivered, and the refused message is not.
    disk.take_all_room();
    let sink = Sink::start_at(&format!("127.0.1.166:{sink_port}"), &[]);
    relay.restart();
    relay.logged(&["gave back the journal's spare segments"]).await;
    relay.eventually("every acknowledged message delivered", || acked.iter().all(|s| sink.received().contains_key(s))).await;
    assert!(!sink.received().contains_key(&refused), "the refused message was delivered");
}

/// Storage that runs out under the queue's filesystem (thin provisioning): writes to new
/// blocks fail with `EIO`, and ext4 aborts its journal and turns read-only. What the relay
/// could not store gets a `4xx`, never a `250`, and `/healthz` says so at once; once the
/// filesystem is checked and mounted again, every acknowledged message is delivered, also
/// those that only the index held (a checkpoint retired their journal segment first).
/// (The index thread opened redb again after each failed write, and each opening repaired
/// and committed on the failing disk: at the next start both of redb's commit slots were
/// lost, and the relay did not start.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_disk_that_fails_under_it_loses_no_acknowledged_mail() {
    // Declared first, so dropped last: the relay goes before the filesystem is unmounted.
    let disk = mxrelay_e2e::disk::ThinDisk::create(512, 96);
    let sink_port = free_port("127.0.1.169");
    let domain = domain_with("customer.test", "", &[("127.0.1.169", sink_port, 10)]);
    let settings = format!("queue = \"{}\"\nadmin_listen = \"127.0.0.1:0\"", disk.path().join("queue").display());
    let mut relay = Relay::start_with(&settings, &domain, "retry = [\"1h\"]");
    let mut acked = Vec::new();
    for seq in 0..20 {
        let answer = send_quarter_mebibyte(&relay, seq).await;
        assert!(answer.starts_with("250"), "message {seq}: {answer:?}; the relay's log:\n{}", relay.log_text());
        acked.push(seq);
    }

    // A checkpoint has retired a segment: the index holds mail that the journal no longer does.
    let whole_history = disk.path().join("queue/journal/whole-history");
    relay.eventually("a segment retired", || !whole_history.exists()).await;

    // Mail is taken until the failure reaches the queue: at the latest, the next checkpoint
    // writes new blocks.
    disk.exhaust();
    let refused = send_until_refused(&relay, &mut acked, "4").await;
    let (status, body) = http_request(&relay.admin_addr(), "GET", "/healthz", None, "");
    assert_eq!(status, 503, "{body} after {refused:?}; the relay's log:\n{}", relay.log_text());
    relay.kill9();

    disk.repair();
    let sink = Sink::start_at(&format!("127.0.1.169:{sink_port}"), &[]);
    relay.restart();
    relay.eventually("every acknowledged message delivered", || acked.iter().all(|s| sink.received().contains_key(s))).await;
}

/// The journal alone on a disk out of room for real: a spare or a segment that does not fit
/// leaves nothing behind, neither a half-made spare nor a file under the segment's name, and
/// the same call succeeds once there is room. Here the segment starts from a spare that must
/// grow (a group commit larger than a segment), and the spare's room is given back too.
#[test]
fn a_journal_spare_or_segment_that_does_not_fit_leaves_nothing_behind() {
    let disk = mxrelay_e2e::disk::FreezableDisk::create(64);
    let dir = disk.path().join("journal");
    std::fs::create_dir(&dir).expect("journal directory");
    let names = || {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };

    let ballast = disk.take_all_room();
    let made = mxrelay_journal::prepare_spare(&dir);
    assert!(made.is_err(), "a spare made on a full disk: {made:?}");
    assert_eq!(names(), Vec::<String>::new(), "a failed spare left a file");
    std::fs::remove_file(&ballast).expect("remove the ballast");
    assert!(mxrelay_journal::prepare_spare(&dir).expect("a spare once there is room"));
    assert_eq!(names().len(), 1, "{:?}", names());

    let ballast = disk.take_all_room();
    let larger = 2 * mxrelay_journal::SEGMENT_BYTES;
    let started = mxrelay_journal::Journal::start(&dir, 1, larger);
    assert!(started.is_err(), "a segment started on a full disk: {started:?}");
    assert_eq!(names(), Vec::<String>::new(), "a failed start left a file");
    std::fs::remove_file(&ballast).expect("remove the ballast");
    let journal = mxrelay_journal::Journal::start(&dir, 1, larger).expect("the same start once there is room");
    assert_eq!(journal.remaining(), larger);
}

/// A queue disk that hangs (here a frozen filesystem: writes and syncs block, nothing fails)
/// is reported, and costs no mail: `/healthz` says the queue's writer does not answer, the
/// watchdog is no longer pinged, a message arriving meanwhile is not acknowledged, and new
/// transactions are refused at MAIL. Once the disk moves again, that message gets its `250`
/// and is delivered, and the relay is healthy and takes mail again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_queue_disk_is_reported_and_loses_nothing() {
    // Declared first, so dropped last: the relay goes before the filesystem is unmounted.
    let disk = mxrelay_e2e::disk::FreezableDisk::create(128);
    let sink = Sink::start("127.0.1.156", &[]);
    let notify = mxrelay_e2e::NotifySocket::bind();
    let env = [("NOTIFY_SOCKET", notify.path.as_str()), ("WATCHDOG_USEC", "200000")];
    let queue = disk.path().join("queue");
    let settings = format!("queue = \"{}\"\nadmin_listen = \"127.0.0.1:0\"", queue.display());
    let relay = Relay::start_with_env(&env, &settings, &domain_block("customer.test", &[(&sink, 10)]), "");
    let admin = relay.admin_addr();
    let health = move || {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || http_request(&admin, "GET", "/healthz", None, ""))
    };
    let message = |seq: u64| mxrelay_e2e::message(seq, "user@customer.test");
    let answer = Raw::send_message(&relay.addr, "user@customer.test", &message(0)).await;
    assert!(answer.starts_with("250"), "{answer}");
    relay.eventually("message 0 delivered", || sink.received().contains_key(&0)).await;
    assert_eq!(health().await.expect("healthz").0, 200);

    // Declared after the relay, so a failing test thaws the disk before it kills the relay.
    let frozen = disk.freeze();
    let addr = relay.addr.clone();
    let waiting = tokio::spawn(async move { Raw::send_message(&addr, "user@customer.test", &message(1)).await });
    relay.logged(&["not telling the watchdog the relay is alive", "the queue's writer did not answer"]).await;
    let (status, body) = health().await.expect("healthz");
    assert!(status == 503 && body.contains("\"unresponsive\"") && body.contains("queue's writer"), "{status} {body}");
    // With the writer stuck that long, a new transaction is refused at MAIL, so its sender
    // takes the mail elsewhere instead of waiting on the disk too.
    let mut late = Raw::greeted(&relay.addr).await;
    let refused = late.cmd("MAIL FROM:<a@src.test>").await;
    assert!(refused.starts_with("451 4.3.0 the queue's disk has not answered for "), "{refused}");
    // Ten ping intervals without a ping: a service manager would restart the relay.
    notify.drain();
    let pings = notify.receive_for(Duration::from_secs(1));
    assert!(pings.is_empty(), "pinged the watchdog with the disk hung: {pings:?}");
    assert!(!waiting.is_finished(), "answered while the message could not be stored: {:?}", waiting.await);
    assert!(!sink.received().contains_key(&1), "delivered before it was stored");

    drop(frozen);
    let answer = tokio::time::timeout(PATIENCE, waiting).await.expect("an answer once the disk moves").expect("task");
    assert!(answer.starts_with("250"), "{answer}; log:\n{}", relay.log_text());
    relay.eventually("message 1 delivered", || sink.received().contains_key(&1)).await;
    assert_eq!(sink.received().values().copied().collect::<Vec<_>>(), [1, 1], "each message once");
    assert_eq!(health().await.expect("healthz").0, 200);
    notify.drain();
    assert_eq!(notify.receive(), "WATCHDOG=1");
    // The writer has moved on (it answered the health check's ping): mail is taken again.
    let mail = late.cmd("MAIL FROM:<a@src.test>").await;
    assert!(mail.starts_with("250"), "{mail}");
}

/// The admin API refuses bodies over its limit.
#[test]
fn admin_requests_are_size_limited() {
    let sink = Sink::start("127.0.1.77", &[]);
    let relay = Relay::start_with(
        "admin_listen = \"127.0.0.1:0\"\nadmin_token = \"0123456789abcdef0123\"",
        &domain_block("customer.test", &[(&sink, 10)]),
        "",
    );
    let body = format!("[{}]", vec!["{\"host\":\"mx.example.com\"}"; 5000].join(","));
    let (status, _) =
        http_request(&relay.admin_addr(), "PUT", "/api/domains/customer.test/servers", Some("0123456789abcdef0123"), &body);
    assert_eq!(status, 413);
}

/// No API read or write without the token, on every route; none at all without a token set.
#[test]
fn every_api_route_needs_the_token() {
    const TOKEN: &str = "0123456789abcdef0123";
    let sink = Sink::start("127.0.1.78", &[]);
    let block = domain_block("customer.test", &[(&sink, 10)]);
    let relay = Relay::start_with(&format!("admin_listen = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\""), &block, "");
    let admin = relay.admin_addr();
    let servers = r#"[{"host":"mx.example.com"}]"#;
    let routes = [
        ("GET", "/api/domains", ""),
        ("GET", "/api/domains/customer.test/servers", ""),
        ("PUT", "/api/domains/customer.test/servers", servers),
        ("GET", "/api/queue", ""),
        ("POST", "/api/queue/retry", "{}"),
        ("DELETE", "/api/queue/0000000000000001", ""),
    ];
    for (method, path, body) in routes {
        assert_eq!(http_request(&admin, method, path, None, body).0, 401, "{method} {path} without a token");
        assert_eq!(http_request(&admin, method, path, Some("0123456789abcdef012X"), body).0, 401, "{method} {path}");
    }
    assert_eq!(http_request(&admin, "GET", "/api/domains/customer.test/servers", Some(TOKEN), "").0, 200);
    let config = std::fs::read_to_string(relay.config_path()).expect("config");
    assert!(!config.contains("mx.example.com"), "a refused PUT changed the server list: {config}");

    let open = Relay::start_with("admin_listen = \"127.0.0.1:0\"", &block, "");
    for (method, path, body) in routes {
        assert_eq!(http_request(&open.admin_addr(), method, path, Some(TOKEN), body).0, 403, "{method} {path}: the API is off");
    }
}

/// The relay's resident memory, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

/// A message body of about `mib` MiB, in numbered lines of 65 bytes.
fn large_body(mib: usize) -> String {
    (0..mib * 16_000).map(|i| format!("{i:08} {}\r\n", "m".repeat(54))).collect()
}

/// Sends `count` messages of about 1 MiB each to `rcpt`, four sessions at a time; asserts
/// each got `250`.
async fn send_large(addr: &str, rcpt: &str, count: usize) {
    let text = Arc::new(format!("Subject: large\r\n\r\n{}", large_body(1)));
    let gate = Arc::new(tokio::sync::Semaphore::new(4));
    let sends: Vec<_> = (0..count)
        .map(|_| {
            let (addr, rcpt, text, gate) = (addr.to_string(), rcpt.to_string(), text.clone(), gate.clone());
            tokio::spawn(async move {
                let _slot = gate.acquire_owned().await.expect("gate");
                Raw::send_message(&addr, &rcpt, &text).await
            })
        })
        .collect();
    for send in sends {
        let reply = send.await.expect("send");
        assert!(reply.starts_with("250"), "a large message was not accepted: {reply:?}");
    }
}

/// Queued mail waits on disk, not in memory: once the relay has taken a burst of large mail,
/// as much again waiting adds little to its memory, both for a domain on hold and for a
/// backlog behind a server that takes a connection and never answers (one delivery worker,
/// stuck on it). Before, each message's data stayed in memory until it was delivered. The
/// bursts also fill journal segments faster than redb takes them: their senders wait for
/// their `250` rather than get a `452`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_mail_waits_on_disk_not_in_memory() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let domains = [
        domain_with("held.test", "hold = true", &[("127.0.0.1", port, 10)]),
        domain_with("slow.test", "", &[("127.0.0.1", port, 10)]),
    ]
    .join("\n");
    let relay =
        Relay::start_with("max_message_size = 2000000", &domains, "workers = 1\ncommand_timeout = \"300s\"\nretry = [\"1h\"]");
    let mut rss = vec![rss_mib(relay.pid())];
    for rcpt in ["user@held.test", "user@held.test", "user@slow.test", "user@slow.test"] {
        send_large(&relay.addr, rcpt, 100).await;
        rss.push(rss_mib(relay.pid()));
    }
    eprintln!("RSS in MiB: idle, then after each 100 MiB (2 held, 2 for the silent server): {rss:.1?}");
    // Kept in memory, a burst's data would add its 100 MiB. What a burst leaves in memory for
    // a while adds up to some 32 MiB: the journal's operations waiting for redb (at most two
    // 16 MiB segments) are in one reading and already gone at the next, or the other way round.
    let (held, backlog) = (rss[2] - rss[1], rss[4] - rss[3]);
    assert!(held < 48.0, "100 MiB more of held mail took {held:.1} MiB more memory");
    assert!(backlog < 48.0, "100 MiB more of mail waiting for a server took {backlog:.1} MiB more memory");
    assert!(rss[4] - rss[0] < 128.0, "400 MiB of waiting mail took {:.1} MiB of memory", rss[4] - rss[0]);
}

/// A customer server that says `354` to DATA and then reads the data in 16 KiB pieces,
/// `pace` apart, or (`None`) never reads it. Its receive buffer is small (64 KiB), so what
/// it has not read waits mostly in the relay's send buffer (at most 4 MiB here, by
/// `net.ipv4.tcp_wmem`). Returns its port and the sizes of the messages it took whole.
async fn data_reader(ip: &str, pace: Option<Duration>) -> (u16, Arc<std::sync::Mutex<Vec<usize>>>) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
    socket.bind(format!("{ip}:0").parse().expect("addr")).expect("bind");
    let listener = socket.listen(16).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let taken = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = taken.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                w.write_all(b"220 reader ESMTP\r\n").await.ok()?;
                let mut line = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.ok()? == 0 {
                        return Some(());
                    }
                    let answer: &[u8] = match line.get(..4).unwrap_or("").to_ascii_uppercase().as_str() {
                        "DATA" => {
                            w.write_all(b"354 go ahead\r\n").await.ok()?;
                            let Some(pace) = pace else {
                                // Never read the data, and keep the connection.
                                return std::future::pending().await;
                            };
                            let mut data = Vec::new();
                            let mut piece = vec![0; 16 * 1024];
                            while !data.ends_with(b"\r\n.\r\n") {
                                tokio::time::sleep(pace).await;
                                let n = r.read(&mut piece).await.ok()?;
                                if n == 0 {
                                    return Some(());
                                }
                                data.extend_from_slice(&piece[..n]);
                            }
                            log.lock().expect("log").push(data.len());
                            b"250 2.0.0 taken\r\n"
                        }
                        "QUIT" => return w.write_all(b"221 2.0.0 bye\r\n").await.ok(),
                        _ => b"250 reader\r\n",
                    };
                    w.write_all(answer).await.ok()?;
                }
            });
        }
    });
    (port, taken)
}

/// Sends test message 1 with about `mib` MiB of text (a [`Sink`] counts it); asserts it got
/// `250`.
async fn send_one_large(addr: &str, rcpt: &str, mib: usize) {
    let text = format!("Subject: large\r\nX-Seq: 1\r\n\r\n{}END-OF-MESSAGE 1\r\n", large_body(mib));
    let reply = Raw::send_message(addr, rcpt, &text).await;
    assert!(reply.starts_with("250"), "{reply}");
}

/// `data_timeout` bounds a stall, not the whole transfer: a 24 MiB message to a server that
/// takes at most 4 MiB a second (some 6 s in all) is delivered with a `data_timeout` of 3 s.
/// The reply to the final dot comes once the server has read what the send buffer held,
/// within about a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_to_a_slow_server_takes_as_long_as_it_needs() {
    let (port, taken) = data_reader("127.0.1.149", Some(Duration::from_millis(4))).await;
    let domain = domain_with("customer.test", "", &[("127.0.1.149", port, 10)]);
    let relay = Relay::start_with("max_message_size = 30000000", &domain, "data_timeout = \"3s\"");
    send_one_large(&relay.addr, "user@customer.test", 24).await;
    relay.eventually("the slow server took the message whole", || !taken.lock().expect("log").is_empty()).await;
    assert!(taken.lock().expect("log")[0] > 24_000_000);
    assert!(relay.log_lines(&["deferred"]).is_empty(), "{}", relay.log_text());
}

/// A server that stops taking the data for `data_timeout` is passed over: the message goes
/// to the next server. 8 MiB is more than the sockets' buffers hold, so the relay's writes
/// stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_taking_the_data_is_passed_over() {
    let (port, taken) = data_reader("127.0.1.150", None).await;
    let backup = Sink::start("127.0.1.151", &[]);
    let (bh, bp) = backup.host_port();
    let domain = domain_with("customer.test", "", &[("127.0.1.150", port, 10), (bh, bp, 20)]);
    let relay = Relay::start(&domain, "data_timeout = \"1s\"");
    send_one_large(&relay.addr, "user@customer.test", 8).await;
    relay.eventually("delivered by the backup", || backup.count() == 1).await;
    assert!(taken.lock().expect("log").is_empty());
    relay.logged(&["the data stalled"]).await;
}
