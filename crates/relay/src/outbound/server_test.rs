//! Testing a domain's servers the way a delivery reaches them, without sending a message
//! (`mxrelay test-servers`, `POST /api/domains/{domain}/test`): the "test connection" of
//! commercial filtering services, and what an operator would otherwise do with swaks per
//! server. For each address of each server: connect, greeting, EHLO, STARTTLS as the
//! domain's `tls` asks, then `MAIL FROM` and `RCPT TO` (`postmaster@` the domain, which
//! RFC 5321 §4.5.1 says every server accepts, unless another recipient is given), then
//! `RSET` and `QUIT`. No data is sent, and nothing is counted as a delivery or marks a
//! server down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mxrelay_policy_core::Server;
use serde::Serialize;
use smtp_proto::{
    EXT_8BIT_MIME, EXT_CHUNKING, EXT_DSN, EXT_ENHANCED_STATUS_CODES, EXT_PIPELINING, EXT_REQUIRE_TLS, EXT_SIZE, EXT_SMTP_UTF8,
    EXT_START_TLS,
};

use super::{ReplyKind, ServerVerdict, Session, TlsTarget, Transport, error_text, quit, reply_kind, reply_text};
use crate::tls::OutboundTls;

/// The envelope a test offers.
#[derive(Debug, Clone, Serialize)]
pub struct TestEnvelope {
    /// `MAIL FROM` (empty for `<>`, what the relay's own notifications use).
    pub sender: String,
    /// `RCPT TO`.
    pub rcpt: String,
}

/// One server's result.
#[derive(Debug, Clone, Serialize)]
pub struct ServerTest {
    /// `host:port`, as configured.
    pub server: String,
    /// Its preference.
    pub preference: u16,
    /// Why none of its addresses could be tried (a failed DNS lookup).
    pub lookup_error: Option<String>,
    /// Each address the server's name gave, in the order a delivery tries them.
    pub addresses: Vec<AddressTest>,
}

impl ServerTest {
    /// Whether mail for the recipient would be taken at every address.
    pub fn passed(&self) -> bool {
        self.lookup_error.is_none() && self.addresses.iter().all(|a| matches!(a.result, TestResult::Accepts(_)))
    }
}

/// One address's result.
#[derive(Debug, Clone, Serialize)]
pub struct AddressTest {
    /// The address connected to.
    pub address: SocketAddr,
    /// What the server said.
    #[serde(flatten)]
    pub result: TestResult,
    /// From the connect to the reply to `RCPT` (or to the failure), in microseconds: a
    /// server on the same network answers in well under a millisecond.
    pub micros: u64,
    /// Protocol and cipher, when the session was encrypted.
    pub tls: Option<String>,
    /// The extensions the server offered that matter to delivery.
    pub extensions: Vec<&'static str>,
}

/// What one address did with the test envelope, with the reply or the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", content = "reply", rename_all = "kebab-case")]
pub enum TestResult {
    /// `2xx` to `RCPT`: mail for the recipient would be delivered here.
    Accepts(String),
    /// `4xx` to `MAIL` or `RCPT` (greylisting, a full disk): mail would wait and be retried.
    Defers(String),
    /// `5xx` to `MAIL` or `RCPT`: mail for the recipient would be returned to its sender.
    Refuses(String),
    /// No usable session (unreachable, no greeting, EHLO or the required TLS failed, no
    /// reply): deliveries would pass this address over.
    Failed(String),
}

/// Tests `servers` at once, each address of a server in turn; the results are in
/// preference order (the order given within a preference).
pub async fn test_servers(
    transport: &Arc<Transport>,
    servers: &[Server],
    tls: &OutboundTls,
    envelope: &TestEnvelope,
) -> Vec<ServerTest> {
    let mut ordered: Vec<Server> = servers.to_vec();
    ordered.sort_by_key(|s| s.preference);
    let tasks: Vec<_> = ordered
        .into_iter()
        .map(|server| {
            let (transport, tls, envelope) = (transport.clone(), tls.clone(), envelope.clone());
            tokio::spawn(async move { transport.test_server(&server, &tls, &envelope).await })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok(result) => results.push(result),
            // A test task does not panic; if one did, the others' results still count.
            Err(e) => tracing::error!(error = %e, "server test task failed"),
        }
    }
    results
}

impl Transport {
    /// Tests one server: its name looked up as a delivery would, then each address.
    pub async fn test_server(&self, server: &Server, tls: &OutboundTls, envelope: &TestEnvelope) -> ServerTest {
        let mut test =
            ServerTest { server: server.address(), preference: server.preference, lookup_error: None, addresses: Vec::new() };
        match self.addresses(server).await {
            Ok(mut addrs) => {
                let target = TlsTarget { settings: tls, host: &server.host };
                while let Some(addr) = addrs.next().await {
                    test.addresses.push(self.test_address(addr, target, envelope).await);
                }
            }
            Err(why) => test.lookup_error = Some(why),
        }
        test
    }

    async fn test_address(&self, addr: SocketAddr, tls: TlsTarget<'_>, envelope: &TestEnvelope) -> AddressTest {
        let started = Instant::now();
        let finish = |result, session: Option<&Session>| AddressTest {
            address: addr,
            result,
            micros: started.elapsed().as_micros() as u64,
            tls: session.and_then(|s| s.tls.clone()),
            extensions: session.map(|s| extensions(s.capabilities)).unwrap_or_default(),
        };
        let mut session = match self.negotiate(addr, tls).await {
            Ok(session) => session,
            Err(verdict) => return finish(TestResult::Failed(failure_text(verdict)), None),
        };
        let result = self.offer(&mut session, envelope).await;
        let tested = finish(result, Some(&session));
        let _ = session.client.rset().await;
        quit(session).await;
        tested
    }

    /// `MAIL FROM`, then, if it is taken, `RCPT TO`. A UTF-8 address goes only with
    /// `SMTPUTF8`, as a delivery would send it.
    async fn offer(&self, s: &mut Session, envelope: &TestEnvelope) -> TestResult {
        let utf8 = if envelope.sender.is_ascii() && envelope.rcpt.is_ascii() {
            ""
        } else if s.capabilities & EXT_SMTP_UTF8 != 0 {
            " SMTPUTF8"
        } else {
            return TestResult::Refuses("the address needs SMTPUTF8, which the server does not offer".into());
        };
        let commands = [
            ("MAIL", format!("MAIL FROM:<{}>{utf8}\r\n", envelope.sender)),
            ("RCPT", format!("RCPT TO:<{}>\r\n", envelope.rcpt)),
        ];
        for (verb, command) in commands {
            let reply = match s.client.cmd(command.as_bytes()).await {
                Ok(reply) => reply,
                Err(e) => return TestResult::Failed(format!("{verb}: {}", error_text(&e))),
            };
            let text = format!("{verb}: {}", reply_text(&reply));
            match reply_kind(reply.code) {
                ReplyKind::Positive if verb == "RCPT" => return TestResult::Accepts(text),
                ReplyKind::Positive => {}
                ReplyKind::Transient => return TestResult::Defers(text),
                ReplyKind::Permanent => return TestResult::Refuses(text),
                ReplyKind::Intermediate | ReplyKind::OutOfRange => return TestResult::Failed(text),
            }
        }
        TestResult::Failed("no reply to RCPT".into())
    }
}

/// Why a session could not be opened (only the session-level verdicts occur here).
fn failure_text(verdict: ServerVerdict) -> String {
    match verdict {
        ServerVerdict::Unreachable(why)
        | ServerVerdict::SessionFailed(why)
        | ServerVerdict::Stalled(why)
        | ServerVerdict::StalledAfterDot(why)
        | ServerVerdict::TempFailed(why)
        | ServerVerdict::PermFailed(why)
        | ServerVerdict::Unknown(why) => why,
        ServerVerdict::Completed { reply, .. } => reply,
    }
}

/// The names of the offered extensions that delivery uses or that an operator asks about.
fn extensions(capabilities: u32) -> Vec<&'static str> {
    [
        (EXT_START_TLS, "STARTTLS"),
        (EXT_PIPELINING, "PIPELINING"),
        (EXT_SIZE, "SIZE"),
        (EXT_8BIT_MIME, "8BITMIME"),
        (EXT_SMTP_UTF8, "SMTPUTF8"),
        (EXT_DSN, "DSN"),
        (EXT_ENHANCED_STATUS_CODES, "ENHANCEDSTATUSCODES"),
        (EXT_CHUNKING, "CHUNKING"),
        (EXT_REQUIRE_TLS, "REQUIRETLS"),
    ]
    .into_iter()
    .filter(|(bit, _)| capabilities & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

/// The results as one JSON object (`test-servers --json`, `POST /api/domains/{domain}/test`).
pub fn report(domain: &str, envelope: &TestEnvelope, results: &[ServerTest]) -> serde_json::Value {
    let passed = results.iter().all(ServerTest::passed);
    serde_json::json!({ "domain": domain, "sender": envelope.sender, "rcpt": envelope.rcpt, "passed": passed, "servers": results })
}

/// The results as text: one line per address under its preference, then a summary line.
pub fn render(domain: &str, envelope: &TestEnvelope, results: &[ServerTest]) -> String {
    let mut out = format!(
        "{domain}: MAIL FROM:<{}> RCPT TO:<{}> at each server, then RSET; no message is sent\n",
        envelope.sender, envelope.rcpt
    );
    let mut tier = None;
    for test in results {
        if tier != Some(test.preference) {
            tier = Some(test.preference);
            out.push_str(&format!("preference {}\n", test.preference));
        }
        if let Some(why) = &test.lookup_error {
            out.push_str(&format!("  {}  FAILED  {why}\n", test.server));
        }
        for a in &test.addresses {
            let (label, reply) = match &a.result {
                TestResult::Accepts(r) => ("accepts", r),
                TestResult::Defers(r) => ("DEFERS", r),
                TestResult::Refuses(r) => ("REFUSES", r),
                TestResult::Failed(r) => ("FAILED", r),
            };
            let tls = a.tls.as_deref().unwrap_or("no TLS");
            let at = if a.address.to_string() == test.server { String::new() } else { format!("  {}", a.address) };
            out.push_str(&format!("  {}{at}  {label}  {:.1} ms, {tls}", test.server, a.micros as f64 / 1000.0));
            if !a.extensions.is_empty() {
                out.push_str(&format!(", {}", a.extensions.join(" ")));
            }
            out.push_str(&format!("\n      {reply}\n"));
        }
    }
    let passed = results.iter().filter(|t| t.passed()).count();
    out.push_str(&format!("{passed} of {} servers accept mail for <{}> at every address\n", results.len(), envelope.rcpt));
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::{config, server};
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::sync::Barrier;

    /// A server on loopback that greets once `gate` lets it (if given), answers the test's
    /// commands with `mail` and `rcpt`, and records every command it gets.
    async fn fake(
        mail: &'static str,
        rcpt: &'static str,
        gate: Option<Arc<Barrier>>,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            if let Some(gate) = gate {
                gate.wait().await;
            }
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            write.write_all(b"220 test ESMTP\r\n").await.expect("greet");
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                let verb = line.split([' ', ':']).next().unwrap_or("").to_ascii_uppercase();
                seen.push(verb.clone());
                let reply = match verb.as_str() {
                    "EHLO" => "250-test\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
                    "MAIL" => mail,
                    "RCPT" => rcpt,
                    "QUIT" => "221 bye\r\n",
                    _ => "250 ok\r\n",
                };
                write.write_all(reply.as_bytes()).await.expect("reply");
                if verb == "QUIT" {
                    break;
                }
            }
            seen
        });
        (addr, task)
    }

    fn postmaster() -> TestEnvelope {
        TestEnvelope { sender: String::new(), rcpt: "postmaster@customer.test".into() }
    }

    fn opportunistic() -> OutboundTls {
        crate::tls::ClientTls::anonymous().opportunistic()
    }

    /// What one test of a fake server answering `mail` and `rcpt` gives, and the commands it saw.
    async fn test_against(mail: &'static str, rcpt: &'static str, envelope: &TestEnvelope) -> (ServerTest, Vec<String>) {
        let (addr, seen) = fake(mail, rcpt, None).await;
        let transport = Transport::new("relay.test", &config("").delivery);
        let test = transport.test_server(&server("127.0.0.1", addr.port()), &opportunistic(), envelope).await;
        (test, seen.await.expect("server"))
    }

    #[tokio::test]
    async fn each_reply_to_the_envelope_has_its_result_and_no_data_is_ever_sent() {
        let (accepted, seen) = test_against("250 ok\r\n", "250 2.1.5 ok\r\n", &postmaster()).await;
        assert!(matches!(&accepted.addresses[0].result, TestResult::Accepts(r) if r == "RCPT: 250 2.1.5 ok"), "{accepted:?}");
        assert!(accepted.passed());
        assert_eq!(accepted.addresses[0].extensions, vec!["PIPELINING", "8BITMIME"]);
        assert_eq!(seen, ["EHLO", "MAIL", "RCPT", "RSET", "QUIT"], "no DATA, and the session ends cleanly");

        let (greylisted, _) = test_against("250 ok\r\n", "450 4.2.0 greylisted\r\n", &postmaster()).await;
        assert!(matches!(&greylisted.addresses[0].result, TestResult::Defers(r) if r.contains("RCPT: 450")), "{greylisted:?}");
        assert!(!greylisted.passed());
        let (unknown, _) = test_against("250 ok\r\n", "550 5.1.1 no such user\r\n", &postmaster()).await;
        assert!(matches!(&unknown.addresses[0].result, TestResult::Refuses(r) if r.contains("RCPT: 550")), "{unknown:?}");
        let (null_sender_refused, seen) = test_against("553 5.1.8 sender refused\r\n", "250 ok\r\n", &postmaster()).await;
        assert!(
            matches!(&null_sender_refused.addresses[0].result, TestResult::Refuses(r) if r.contains("MAIL: 553")),
            "{null_sender_refused:?}"
        );
        assert!(!seen.contains(&"RCPT".to_string()), "no RCPT after a refused MAIL: {seen:?}");
    }

    #[tokio::test]
    async fn a_utf8_address_is_never_offered_to_a_server_without_smtputf8() {
        let envelope = TestEnvelope { sender: String::new(), rcpt: "j\u{f6}rg@customer.test".into() };
        let (test, seen) = test_against("250 ok\r\n", "250 ok\r\n", &envelope).await;
        assert!(matches!(&test.addresses[0].result, TestResult::Refuses(r) if r.contains("SMTPUTF8")), "{test:?}");
        assert_eq!(seen, ["EHLO", "RSET", "QUIT"], "no MAIL or RCPT was sent");
    }

    #[tokio::test]
    async fn a_server_that_cannot_be_reached_fails_with_the_reason() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let transport = Transport::new("relay.test", &config("").delivery);
        let test = transport.test_server(&server("127.0.0.1", port), &opportunistic(), &postmaster()).await;
        assert!(matches!(&test.addresses[0].result, TestResult::Failed(r) if r.contains("connect to")), "{test:?}");
        assert!(!test.passed());
    }

    /// Servers are tested at once: two that greet only once both have been connected to both
    /// accept. Tested one after the other, the first would wait for the second, which is not
    /// connected to until the first has failed for want of a greeting.
    #[tokio::test]
    async fn servers_are_tested_at_once() {
        let gate = Arc::new(Barrier::new(2));
        let (a, _) = fake("250 ok\r\n", "250 ok\r\n", Some(gate.clone())).await;
        let (b, _) = fake("250 ok\r\n", "250 ok\r\n", Some(gate)).await;
        let transport = Arc::new(Transport::new("relay.test", &config("\n[delivery]\ncommand_timeout = \"2s\"").delivery));
        let servers = [server("127.0.0.1", a.port()), server("127.0.0.1", b.port())];
        let results = test_servers(&transport, &servers, &opportunistic(), &postmaster()).await;
        assert!(results.len() == 2 && results.iter().all(ServerTest::passed), "{results:?}");
    }
}
