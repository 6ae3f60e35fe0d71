//! Servers given by host name: resolved through the `[delivery] resolver` override (a
//! dnsmasq on loopback, as the Postfix reference setup uses), failover included, and a name
//! that does not resolve is passed over like an unreachable server. A reused connection
//! needs no lookup. A name's IPv6 addresses are tried after its IPv4 ones, and a resolver
//! that drops one family's queries holds up only that family's tries.

use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use mxrelay_e2e::{Relay, Sink, domain_with, on_a_free_port, send_one, spawn_until_ready};

struct Dnsmasq {
    child: Child,
    /// `IP:port` it answers on.
    addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// How many A queries for `name` it has answered.
    fn a_queries(&self, name: &str) -> usize {
        self.queries("A", name)
    }

    /// How many queries of `kind` (`A`, `AAAA`) for `name` it has answered.
    fn queries(&self, kind: &str, name: &str) -> usize {
        let needle = format!("query[{kind}] {name} ");
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().filter(|l| l.contains(&needle)).count()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// dnsmasq on a free port of `ip` (one per test, so tests that run at once cannot pick the
/// same port), once it answers.
fn dnsmasq(ip: &str, records: &[(&str, &str)]) -> Dnsmasq {
    on_a_free_port(ip, |port| {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("dnsmasq.log");
        let mut cmd = Command::new("dnsmasq");
        cmd.args(["--keep-in-foreground", "--conf-file=/dev/null", "--bind-interfaces"])
            .args(["--no-resolv", "--no-hosts", "--no-poll", "--local=/test/", "--user=root", "--log-queries"])
            .arg(format!("--log-facility={}", log.display()))
            // Not the shared /var/run/dnsmasq.pid: a second dnsmasq would refuse to start.
            .arg(format!("--pid-file={}", dir.path().join("dnsmasq.pid").display()))
            .arg(format!("--listen-address={ip}"))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null());
        for (name, ip) in records {
            cmd.arg(format!("--host-record={name},{ip}"));
        }
        let answers = || {
            Command::new("dig")
                .args(["+short", "+time=1", "+tries=1", "-p", &port.to_string(), &format!("@{ip}"), records[0].0])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == records[0].1)
        };
        let child = spawn_until_ready(&mut cmd, &dir.path().join("stderr"), |_| answers())?;
        Ok(Dnsmasq { child, addr: format!("{ip}:{port}"), log, _dir: dir })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_resolve_through_the_configured_resolver() {
    let mut mx1 = Sink::start("127.0.1.91", &[]);
    let mx2 = Sink::start("127.0.1.92", &[]);
    let dns = dnsmasq("127.0.53.91", &[("mx1.customer.test", "127.0.1.91"), ("mx2.customer.test", "127.0.1.92")]);
    let (_, p1) = mx1.host_port();
    let (_, p2) = mx2.host_port();
    let servers = [("nxdomain.customer.test", 25, 5), ("mx1.customer.test", p1, 10), ("mx2.customer.test", p2, 20)];
    let domain = domain_with("customer.test", "", &servers);
    let relay = Relay::start(&domain, &format!("resolver = \"{}\"", dns.addr));
    for seq in 0..3 {
        assert!(send_one(&relay.addr, "user@customer.test", seq).await);
    }
    relay.eventually("three at mx1", || mx1.count() == 3).await;
    relay.logged(&["nxdomain.customer.test", "unreachable"]).await;
    mx1.kill();
    assert!(send_one(&relay.addr, "user@customer.test", 3).await);
    relay.eventually("failover to mx2 by name", || mx2.count() == 1).await;
}

/// Like Postfix's connection cache by next hop: a message for a server that has an idle
/// connection goes over it without a DNS lookup (dnsmasq answers with TTL 0, so nothing is
/// cached by the resolver either), and a new connection looks the name up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_needs_no_dns_lookup() {
    let mut mx = Sink::start("127.0.1.93", &[]);
    let dns = dnsmasq("127.0.53.93", &[("ready.customer.test", "127.0.1.93"), ("mx.customer.test", "127.0.1.93")]);
    let (_, port) = mx.host_port();
    let domain = domain_with("customer.test", "", &[("mx.customer.test", port, 10)]);
    let relay = Relay::start(&domain, &format!("resolver = \"{}\"", dns.addr));
    for seq in 0..5 {
        assert!(send_one(&relay.addr, "user@customer.test", seq).await);
        // The delivery's log line comes after its connection went back to the pool.
        relay.eventually("delivered", || relay.log_lines(&["outcome=\"delivered\""]).len() == seq as usize + 1).await;
    }
    assert_eq!(mx.count(), 5);
    assert_eq!(dns.a_queries("mx.customer.test"), 1, "one lookup, then the connection is reused: {}", relay.log_text());

    // The server restarts: its idle connection is gone, and the new one starts with a lookup.
    mx.kill();
    mx.restart();
    assert!(send_one(&relay.addr, "user@customer.test", 5).await);
    relay.eventually("delivered after the restart", || relay.log_lines(&["outcome=\"delivered\""]).len() == 6).await;
    assert_eq!(dns.a_queries("mx.customer.test"), 2, "a new connection resolves the name: {}", relay.log_text());
}

/// A name with A and AAAA records is tried on both families, IPv4 first. Here nothing
/// listens on its IPv4 address and the server listens on IPv6 only, so the mail goes over
/// IPv6, and the server is not marked down. An IPv6 literal is reached too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_whose_ipv4_address_refuses_is_reached_over_ipv6() {
    let mx = Sink::start("::1", &[]);
    let (_, port) = mx.host_port();
    let dns = dnsmasq("127.0.53.95", &[("ready.customer.test", "127.0.1.165"), ("dual.customer.test", "127.0.1.165,::1")]);
    let domains = format!(
        "{}{}",
        domain_with("customer.test", "", &[("dual.customer.test", port, 10)]),
        domain_with("literal.test", "", &[("::1", port, 10)])
    );
    let relay = Relay::start(&domains, &format!("resolver = \"{}\"", dns.addr));
    assert!(send_one(&relay.addr, "user@customer.test", 0).await);
    relay.eventually("delivered over IPv6", || mx.count() == 1).await;
    assert!(dns.queries("AAAA", "dual.customer.test") >= 1, "no AAAA query");
    assert!(send_one(&relay.addr, "user@literal.test", 1).await);
    relay.eventually("delivered to the IPv6 literal", || mx.count() == 2).await;
    // A mark would be logged before the delivery it came with.
    relay.eventually("both deliveries logged", || relay.log_lines(&["outcome=\"delivered\""]).len() == 2).await;
    assert!(relay.log_lines(&["server marked down"]).is_empty(), "{}", relay.log_text());
}

/// A DNS server on loopback that answers one name's queries of one family and never answers
/// those of the other, as a middlebox that drops them would; it counts the queries it drops.
struct DropsOneFamily {
    /// `IP:port` it answers on.
    addr: String,
    dropped: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl DropsOneFamily {
    /// Answers `name`'s queries of `answer`'s type with it; drops those of the other family.
    fn start(ip: &str, name: &str, answer: RData) -> DropsOneFamily {
        let socket = UdpSocket::bind(format!("{ip}:0")).expect("bind the stub resolver");
        socket.set_read_timeout(Some(Duration::from_millis(50))).expect("read timeout");
        let addr = socket.local_addr().expect("local address").to_string();
        let (dropped, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let served = Name::from_ascii(format!("{name}.")).expect("name");
        let answered = answer.record_type();
        let (count, stopped) = (dropped.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((len, from)) = socket.recv_from(&mut buf) else { continue };
                let Ok(query) = Message::from_vec(&buf[..len]) else { continue };
                let Some(question) = query.queries().first().cloned() else { continue };
                let mut reply = Message::new();
                reply.set_id(query.id()).set_message_type(MessageType::Response).set_op_code(OpCode::Query);
                reply.set_recursion_desired(query.recursion_desired()).set_recursion_available(true).set_authoritative(true);
                let kind = question.query_type();
                if (kind == RecordType::A || kind == RecordType::AAAA) && kind != answered {
                    count.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                if kind == answered && question.name().eq_case(&served) {
                    reply.add_answer(Record::from_rdata(served.clone(), 0, answer.clone()));
                } else {
                    reply.set_response_code(ResponseCode::NXDomain);
                }
                reply.add_query(question);
                let _ = socket.send_to(&reply.to_vec().expect("encode the reply"), from);
            }
        });
        DropsOneFamily { addr, dropped, stop }
    }

    fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for DropsOneFamily {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Mail to `mx`, a server at `mx.customer.test` that `dns` answers for in one family only,
/// arrives before the query it drops of the other family was sent again, and the server is
/// not marked down.
async fn delivered_before_the_dropped_query_is_sent_again(mx: &Sink, dns: &DropsOneFamily) {
    let domain = domain_with("customer.test", "", &[("mx.customer.test", mx.host_port().1, 10)]);
    let relay = Relay::start(&domain, &format!("resolver = \"{}\"", dns.addr));
    assert!(send_one(&relay.addr, "user@customer.test", 0).await);
    relay.eventually("delivered", || mx.count() == 1).await;
    let asked = dns.dropped();
    assert!(asked <= 1, "the dropped query was sent {asked} times before the delivery: {}", relay.log_text());
    relay.eventually("the delivery logged", || relay.log_lines(&["outcome=\"delivered\""]).len() == 1).await;
    assert!(relay.log_lines(&["server marked down"]).is_empty(), "{}", relay.log_text());
}

/// A resolver that drops AAAA queries (some middleboxes do) does not hold up mail: the
/// server's IPv4 address is tried as soon as the A answer is in. A lookup that waited for
/// both answers would wait for the AAAA query to time out, and for the resolver's retries of
/// it (5 s each): the message would arrive only after the query had been sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_that_drops_aaaa_queries_does_not_hold_up_delivery_over_ipv4() {
    let mx = Sink::start("127.0.1.167", &[]);
    let dns = DropsOneFamily::start("127.0.53.96", "mx.customer.test", RData::A(A(Ipv4Addr::new(127, 0, 1, 167))));
    delivered_before_the_dropped_query_is_sent_again(&mx, &dns).await;
}

/// Nor does a resolver that drops A queries hold up mail to a server with IPv6 addresses:
/// the AAAA answer waits 50 ms for the A answer (RFC 8305's resolution delay), then its
/// addresses are tried. Before, the A answer was awaited first, so each message waited for
/// the resolver's timeout (5 s) and its retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_that_drops_a_queries_does_not_hold_up_delivery_over_ipv6() {
    let mx = Sink::start("::1", &[]);
    let dns = DropsOneFamily::start("127.0.53.97", "mx.customer.test", RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)));
    delivered_before_the_dropped_query_is_sent_again(&mx, &dns).await;
}
