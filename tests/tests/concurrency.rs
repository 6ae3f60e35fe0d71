//! `delivery.concurrency_per_server`: never more simultaneous deliveries to one server.
//! A minimal SMTP server counts its open transactions and keeps each one open for a moment,
//! so that deliveries overlap whenever the relay lets them. Deliveries that wait for a
//! server's slot never try it once it has been found dead.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mxrelay_e2e::{Relay, Sink, domain_with, send};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Accepts mail; returns (messages received, peak simultaneous transactions).
async fn counting_server(listener: TcpListener) -> (Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let (received, active, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (r, a, p) = (received.clone(), active, peak.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (r, a, p) = (r.clone(), a.clone(), p.clone());
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 counting ESMTP\r\n").await;
                let mut in_data = false;
                while let Ok(Some(line)) = lines.next_line().await {
                    let upper = line.to_ascii_uppercase();
                    let answer: &[u8] = if in_data {
                        if line != "." {
                            continue;
                        }
                        in_data = false;
                        // Hold the transaction open so concurrent ones overlap here.
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        a.fetch_sub(1, Ordering::SeqCst);
                        r.fetch_add(1, Ordering::SeqCst);
                        b"250 2.0.0 ok\r\n"
                    } else if upper.starts_with("EHLO") {
                        b"250 counting\r\n"
                    } else if upper.starts_with("MAIL") {
                        let now = a.fetch_add(1, Ordering::SeqCst) + 1;
                        p.fetch_max(now, Ordering::SeqCst);
                        b"250 2.1.0 ok\r\n"
                    } else if upper.starts_with("DATA") {
                        in_data = true;
                        b"354 go ahead\r\n"
                    } else if upper.starts_with("QUIT") {
                        let _ = write.write_all(b"221 bye\r\n").await;
                        break;
                    } else {
                        b"250 ok\r\n"
                    };
                    if write.write_all(answer).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (received, peak)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_to_one_server_never_exceed_the_limit() {
    let listener = TcpListener::bind("127.0.1.110:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (received, peak) = counting_server(listener).await;
    let domain = format!("[[domain]]\nname = \"customer.test\"\n[[domain.server]]\nhost = \"127.0.1.110\"\nport = {port}\n");
    let relay = Relay::start(&domain, "concurrency_per_server = 2\nworkers = 16");
    let acked = send(&relay.addr, "user@customer.test", 0..12, 12).await;
    assert_eq!(acked.len(), 12);
    relay.eventually("all 12 delivered", || received.load(Ordering::SeqCst) == 12).await;
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak == 2, "peak of {peak} simultaneous deliveries to one server with concurrency_per_server = 2");
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a connection
/// attempt hangs until the relay's connect timeout. Returns the port and what keeps it full.
async fn black_hole(ip: &str) -> (u16, TcpListener, Vec<TcpStream>) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(format!("{ip}:0").parse().expect("addr")).expect("bind");
    let listener = socket.listen(0).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut fill = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => fill.push(stream),
            Ok(Err(e)) => panic!("connect to {addr}: {e}"),
            Err(_) => break,
        }
        assert!(fill.len() < 16, "the accept queue of {addr} never filled");
    }
    (addr.port(), listener, fill)
}

/// With one slot per server, messages queue behind the first delivery's connection attempt to
/// a dead primary. When that attempt fails, the server is marked down and the waiting
/// deliveries go straight to the backup: the dead primary costs one attempt, not one per
/// message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_waiting_for_a_slot_skip_a_server_found_dead() {
    let (dead_port, _listener, _fill) = black_hole("127.0.1.111").await;
    let backup = Sink::start("127.0.1.112", &[]);
    let (bh, bp) = backup.host_port();
    let domain = domain_with("customer.test", "", &[("127.0.1.111", dead_port, 10), (bh, bp, 20)]);
    let relay = Relay::start(&domain, "concurrency_per_server = 1\nworkers = 16\nconnect_timeout = \"1s\"");
    let acked = send(&relay.addr, "user@customer.test", 0..8, 8).await;
    assert_eq!(acked.len(), 8);
    relay.eventually("all 8 at the backup", || backup.count() == 8).await;
    let dead = format!("127.0.1.111:{dead_port}");
    // The log reaches the test through a pipe, a moment after the effect (`Relay::logged`).
    let attempts = relay.logged(&["outcome=\"unreachable\"", &dead]).await;
    assert_eq!(attempts, 1, "connection attempts to the dead primary: {}", relay.log_text());
}

/// A backlog for one domain's slow server does not hold up other domains' mail: ready mail is
/// taken in turn by domain. Ten messages for a server that takes one at a time, each for
/// 150 ms, then one for another domain: in arrival order it would wait for all ten, since the
/// backlog's deliveries also hold the workers while they wait for the server's slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_for_one_domain_does_not_hold_up_another() {
    let listener = TcpListener::bind("127.0.1.113:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (slow_received, _) = counting_server(listener).await;
    let other = Sink::start("127.0.1.114", &[]);
    let (oh, op) = other.host_port();
    let domains = format!(
        "{}{}",
        domain_with("slow.test", "", &[("127.0.1.113", port, 10)]),
        domain_with("other.test", "", &[(oh, op, 10)])
    );
    let relay = Relay::start(&domains, "concurrency_per_server = 1\nworkers = 2");
    assert_eq!(send(&relay.addr, "user@slow.test", 0..10, 1).await.len(), 10);
    assert_eq!(send(&relay.addr, "user@other.test", 100..101, 1).await.len(), 1);
    relay.eventually("the other domain's message delivered", || other.count() == 1).await;
    let ahead = slow_received.load(Ordering::SeqCst);
    assert!(ahead <= 4, "the other domain's message waited for {ahead} of the backlog's 10");
    relay.eventually("the backlog delivered too", || slow_received.load(Ordering::SeqCst) == 10).await;
}
