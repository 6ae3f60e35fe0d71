//! TLS both ways and interop with Postfix: swaks with STARTTLS into the relay, Postfix as
//! the filtering tier relaying into mxrelay over TLS, and mxrelay delivering to Postfix with
//! each outbound TLS mode. Certificates are made in the test (rcgen).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

use mxrelay_e2e::certs::CertFiles;
use mxrelay_e2e::certs::TestCa;
use mxrelay_e2e::postfix::{Listener, Postfix};
use mxrelay_e2e::{
    Relay, Sink, assert_exactly_once, domain_block, domain_with, eventually, free_port, metric, mxrelay, send, swaks,
    swaks_tagged,
};

fn quoted(path: &std::path::Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// An `smtpd` listener with its own name and certificate.
fn tls_listener(name: &str, cert: &mxrelay_e2e::certs::CertFiles) -> Listener {
    Listener {
        port: free_port("127.0.0.1"),
        options: vec![
            ("myhostname".into(), name.into()),
            ("smtpd_tls_security_level".into(), "may".into()),
            ("smtpd_tls_cert_file".into(), cert.cert.display().to_string()),
            ("smtpd_tls_key_file".into(), cert.key.display().to_string()),
        ],
    }
}

/// Reads one (possibly multi-line) SMTP reply.
fn read_reply(reader: &mut BufReader<TcpStream>) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).expect("read") == 0 {
            return all;
        }
        all.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return all;
        }
    }
}

/// A relay offering STARTTLS with a certificate from a fresh test CA, delivering
/// customer.test to a sink on `sink_ip`.
struct TlsRelay {
    certs: tempfile::TempDir,
    ca: TestCa,
    server: CertFiles,
    sink: Sink,
    relay: Relay,
}

fn tls_relay(sink_ip: &str) -> TlsRelay {
    let certs = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("mxrelay test CA");
    let server = ca.issue(certs.path(), "relay", &["relay.test", "127.0.0.1"]);
    let sink = Sink::start(sink_ip, &[]);
    let relay = Relay::start_with(
        &format!("tls_cert = {}\ntls_key = {}", quoted(&server.cert), quoted(&server.key)),
        &domain_block("customer.test", &[(&sink, 10)]),
        "",
    );
    TlsRelay { certs, ca, server, sink, relay }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_starttls_with_swaks_and_no_command_injection() {
    let TlsRelay { certs, server, sink, relay, .. } = tls_relay("127.0.1.110");

    let (ok, out) = swaks_tagged(&relay.addr, "user@customer.test", 1, &["--tls"]);
    assert!(ok, "{out}");
    assert!(out.contains("250-STARTTLS"), "STARTTLS is offered: {out}");
    assert!(out.contains("TLS started"), "{out}");
    // Without --tls the same relay still takes mail in clear (STARTTLS is offered, not forced).
    let (ok, out) = swaks_tagged(&relay.addr, "user@customer.test", 2, &[]);
    assert!(ok, "{out}");
    eventually("both delivered", || sink.count() == 2).await;
    let dumps = sink.dumps();
    let tls = dumps.iter().find(|d| d.contains("X-Seq: 1")).expect("message 1");
    assert!(tls.contains("with ESMTPS (using TLSv1.3"), "RFC 3848 ESMTPS in the Received header: {tls}");
    let clear = dumps.iter().find(|d| d.contains("X-Seq: 2")).expect("message 2");
    assert!(clear.contains("(mxrelay) with ESMTP id"), "{clear}");

    // Commands pipelined behind STARTTLS must never be taken as if they came encrypted.
    let stream = TcpStream::connect(&relay.addr).expect("connect");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    assert!(read_reply(&mut reader).starts_with("220"));
    writer.write_all(b"EHLO x\r\n").expect("write");
    assert!(read_reply(&mut reader).contains("STARTTLS"));
    writer.write_all(b"STARTTLS\r\nMAIL FROM:<a@src.test>\r\n").expect("write");
    let answer = read_reply(&mut reader);
    assert!(answer.starts_with("554 5.5.0 improper command pipelining after STARTTLS"), "{answer}");
    assert_eq!(read_reply(&mut reader), "", "the connection is closed");

    // A renewed certificate (here from another CA) is picked up on SIGHUP, without a restart.
    let renewed_ca = TestCa::new("renewal CA");
    let renewed_ca_file = renewed_ca.write(certs.path(), "renewed-ca.crt");
    let verify_with_renewed_ca = || {
        swaks(&[
            "--server",
            &relay.addr,
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            &renewed_ca_file.display().to_string(),
            "--from",
            "a@src.test",
            "--to",
            "user@customer.test",
            "--quit-after",
            "EHLO",
        ])
    };
    assert!(!verify_with_renewed_ca().0, "the old certificate does not verify against the new CA");
    let renewed = renewed_ca.issue(certs.path(), "renewed", &["relay.test", "127.0.0.1"]);
    // A key that does not fit the certificate is refused, and the old pair stays in service.
    std::fs::copy(&renewed.key, &server.key).expect("replace key");
    relay.signal("HUP");
    eventually("refused", || !relay.log_lines(&["reload refused", "relay.tls_key"]).is_empty()).await;
    assert!(
        swaks(&["--server", &relay.addr, "--tls", "--to", "user@customer.test", "--quit-after", "EHLO"]).0,
        "the old pair still serves"
    );
    std::fs::copy(&renewed.cert, &server.cert).expect("replace cert");
    relay.signal("HUP");
    eventually("reloaded", || !relay.log_lines(&["configuration reloaded"]).is_empty()).await;
    let (ok, out) = verify_with_renewed_ca();
    assert!(ok, "the renewed certificate is served after SIGHUP: {out}");
}

/// `require_tls`: mail is taken only after STARTTLS; a client in clear gets `530`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_require_tls_mail_in_clear_is_refused() {
    let certs = tempfile::tempdir().expect("tempdir");
    let server = TestCa::new("mxrelay test CA").issue(certs.path(), "relay", &["relay.test", "127.0.0.1"]);
    let sink = Sink::start("127.0.1.134", &[]);
    let relay = Relay::start_with(
        &format!("tls_cert = {}\ntls_key = {}\nrequire_tls = true", quoted(&server.cert), quoted(&server.key)),
        &domain_block("customer.test", &[(&sink, 10)]),
        "",
    );
    let (ok, out) = swaks_tagged(&relay.addr, "user@customer.test", 1, &[]);
    assert!(!ok && out.contains("530 5.7.0 must issue a STARTTLS command first"), "{out}");
    let (ok, out) = swaks_tagged(&relay.addr, "user@customer.test", 2, &["--tls"]);
    assert!(ok, "{out}");
    relay.eventually("the encrypted one delivered", || sink.count() == 1).await;
    assert_eq!(sink.received().into_keys().collect::<Vec<_>>(), [2]);
    // Turned off by a reload, without a restart: mail in clear is taken again.
    let path = relay.config_path();
    let text = std::fs::read_to_string(&path).expect("config");
    std::fs::write(&path, text.replace("require_tls = true", "require_tls = false")).expect("write");
    relay.signal("HUP");
    relay.eventually("reloaded", || !relay.log_lines(&["configuration reloaded"]).is_empty()).await;
    let (ok, out) = swaks_tagged(&relay.addr, "user@customer.test", 3, &[]);
    assert!(ok, "{out}");
    relay.eventually("the clear one delivered", || sink.count() == 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_upstream_relays_into_mxrelay_over_tls() {
    let TlsRelay { certs, ca, sink, relay, .. } = tls_relay("127.0.1.111");
    // The filtering tier: Postfix takes the mail and must hand it to mxrelay encrypted.
    let front = Listener { port: free_port("127.0.0.1"), options: vec![] };
    let postfix = Postfix::start(
        &["customer.test"],
        &relay.addr,
        std::slice::from_ref(&front),
        &format!(
            "smtp_tls_security_level = secure\nsmtp_tls_CAfile = {}\nsmtp_tls_secure_cert_match = relay.test\nsmtp_tls_verify_cert_match = relay.test\nsmtp_tls_loglevel = 1",
            ca.write(certs.path(), "ca.crt").display()
        ),
    );
    let acked = send(&format!("127.0.0.1:{}", postfix.port(0)), "user@customer.test", 0..20, 4).await;
    assert_eq!(acked.len(), 20, "Postfix accepted every message");
    eventually("all relayed through mxrelay", || sink.count() == 20).await;
    assert_exactly_once(&[&sink], &acked);
    for dump in sink.dumps() {
        assert!(dump.contains("by relay.test (mxrelay) with ESMTPS (using TLSv1."), "{dump}");
        assert!(dump.contains("by mx.customer.test (Postfix) with ESMTP"), "{dump}");
    }
    // postlogd writes the log a moment after the events.
    eventually("Postfix logs a verified TLS connection", || {
        postfix.log().contains("Verified TLS connection established to 127.0.0.1")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_tls_skips_servers_without_it_and_never_sends_in_clear() {
    let certs = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("customer CA");
    let rogue_ca = TestCa::new("someone else");
    let good = ca.issue(certs.path(), "good", &["127.0.0.1"]);
    let rogue = rogue_ca.issue(certs.path(), "rogue", &["127.0.0.1"]);
    let mailbox = Sink::start("127.0.1.112", &[]);
    // Tier 10 speaks no TLS at all (smtp-sink offers no STARTTLS).
    let clear = Sink::start("127.0.1.113", &[]);
    let (rogue_l, good_l) = (tls_listener("rogue.customer.test", &rogue), tls_listener("good.customer.test", &good));
    let postfix = Postfix::start(&["customer.test"], &mailbox.addr, &[rogue_l, good_l], "");
    let (clear_host, clear_port) = clear.host_port();
    let domain = domain_with(
        "customer.test",
        &format!("tls = \"required\"\ntls_ca = {}", quoted(&ca.write(certs.path(), "ca.crt"))),
        &[(clear_host, clear_port, 10), ("127.0.0.1", postfix.port(0), 20), ("127.0.0.1", postfix.port(1), 30)],
    );
    let relay = Relay::start_with("admin_listen = \"127.0.0.1:0\"", &domain, "");
    let acked = send(&relay.addr, "user@customer.test", 0..10, 2).await;
    assert_eq!(acked.len(), 10);
    relay.eventually("all delivered by the verified server", || mailbox.count() == 10).await;
    assert_exactly_once(&[&mailbox], &acked);
    assert_eq!(clear.count(), 0, "nothing went to the server without TLS");
    for dump in mailbox.dumps() {
        assert!(dump.contains("by good.customer.test (Postfix) with ESMTPS"), "{dump}");
        assert!(!dump.contains("rogue.customer.test"), "the server with the wrong certificate got it: {dump}");
    }
    relay.logged(&["does not offer STARTTLS, and the domain requires TLS"]).await;
    relay.logged(&["invalid peer certificate", "requires TLS"]).await;
    let metrics = relay.metrics();
    let series = |result: &str| metric(&metrics, &format!("mxrelay_outbound_connections_total{{result=\"{result}\"}}"));
    assert!(series("encrypted").is_some_and(|n| n >= 1.0), "{metrics}");
    assert!(series("failed").is_some_and(|n| n >= 2.0), "the sink without TLS and the rogue server: {metrics}");
    assert_eq!(series("clear"), None, "no connection went on in clear: {metrics}");

    // `test-servers` holds the servers to the same TLS rules and says why each one fails.
    let config = relay.config_path().display().to_string();
    let (ok, out, err) = mxrelay(&["test-servers", &config, "--domain", "customer.test", "--json"]);
    assert!(!ok, "two of three servers fail: {out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let address = |i: usize| &report["servers"][i]["addresses"][0];
    let said = |i: usize| (address(i)["result"].as_str().unwrap_or(""), address(i)["reply"].as_str().unwrap_or(""));
    assert!(matches!(said(0), ("failed", r) if r.contains("does not offer STARTTLS")), "{report}");
    assert!(matches!(said(1), ("failed", r) if r.contains("invalid peer certificate")), "{report}");
    assert!(matches!(said(2), ("accepts", r) if r.starts_with("RCPT: 250")), "{report}");
    assert!(address(2)["tls"].as_str().is_some_and(|t| t.starts_with("TLSv1.")), "{report}");
    drop(postfix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opportunistic_encrypts_when_offered_and_none_never_does() {
    let certs = tempfile::tempdir().expect("tempdir");
    // A self-signed-style certificate nobody vouches for: opportunistic TLS still uses it.
    let server = TestCa::new("private CA").issue(certs.path(), "mx", &["mx.customer.test"]);
    let mailbox = Sink::start("127.0.1.114", &[]);
    let plain = Sink::start("127.0.1.115", &[]);
    let l = tls_listener("mx.customer.test", &server);
    let postfix = Postfix::start(&["may.test", "never.test"], &mailbox.addr, std::slice::from_ref(&l), "");
    let (plain_host, plain_port) = plain.host_port();
    let domains = [
        domain_with("may.test", "", &[("127.0.0.1", postfix.port(0), 10)]),
        domain_with("never.test", "tls = \"none\"", &[("127.0.0.1", postfix.port(0), 10)]),
        domain_with("clear.test", "tls = \"opportunistic\"", &[(plain_host, plain_port, 10)]),
    ]
    .concat();
    let relay = Relay::start(&domains, "");
    assert_eq!(send(&relay.addr, "user@may.test", 0..3, 1).await.len(), 3);
    assert_eq!(send(&relay.addr, "user@never.test", 10..13, 1).await.len(), 3);
    assert_eq!(send(&relay.addr, "user@clear.test", 20..23, 1).await.len(), 3);
    relay.eventually("all delivered", || mailbox.count() == 6 && plain.count() == 3).await;
    for dump in mailbox.dumps() {
        let encrypted = dump.contains("by mx.customer.test (Postfix) with ESMTPS");
        if dump.contains("To: user@may.test") {
            assert!(encrypted, "opportunistic uses the offered STARTTLS: {dump}");
        } else {
            assert!(!encrypted && dump.contains("with ESMTP id"), "tls = none never starts TLS: {dump}");
        }
    }
}

/// A customer's server that admits the relay by its certificate (as Exchange Online's
/// connectors can) gets `delivery.tls_client_cert` when it asks for one in STARTTLS, and
/// verifies it against the CA it trusts; without the setting the relay presents none. The
/// setting takes effect on reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_asks_gets_the_relays_client_certificate() {
    let certs = tempfile::tempdir().expect("tempdir");
    let server = TestCa::new("customer CA").issue(certs.path(), "mx", &["mx.customer.test"]);
    let client_ca = TestCa::new("relay client CA");
    let client = client_ca.issue(certs.path(), "relay-client", &["relay.test"]);
    let mailbox = Sink::start("127.0.1.140", &[]);
    let mut l = tls_listener("mx.customer.test", &server);
    l.options.extend([
        ("smtpd_tls_ask_ccert".into(), "yes".into()),
        ("smtpd_tls_CAfile".into(), client_ca.write(certs.path(), "client-ca.crt").display().to_string()),
    ]);
    let postfix = Postfix::start(&["customer.test"], &mailbox.addr, std::slice::from_ref(&l), "");
    let domain = domain_with("customer.test", "", &[("127.0.0.1", postfix.port(0), 10)]);

    let relay = Relay::start(&domain, "");
    assert_eq!(send(&relay.addr, "user@customer.test", 10..11, 1).await.len(), 1);
    relay.eventually("delivered without a certificate", || mailbox.count() == 1).await;

    // Set on a running relay: a reload applies it, no restart.
    let path = relay.config_path();
    let text = std::fs::read_to_string(&path).expect("config");
    let identity = format!("[delivery]\ntls_client_cert = {}\ntls_client_key = {}\n", quoted(&client.cert), quoted(&client.key));
    std::fs::write(&path, text.replacen("[delivery]\n", &identity, 1)).expect("write config");
    relay.signal("HUP");
    relay.eventually("reloaded", || !relay.log_lines(&["configuration reloaded"]).is_empty()).await;
    assert!(relay.log_lines(&["after a restart"]).is_empty(), "{}", relay.log_text());
    assert_eq!(send(&relay.addr, "user@customer.test", 0..2, 1).await.len(), 2);
    relay.eventually("delivered with the certificate", || mailbox.count() == 3).await;

    for dump in mailbox.dumps() {
        let seq: u64 = dump.lines().find_map(|l| l.strip_prefix("X-Seq: ")?.trim().parse().ok()).expect("X-Seq");
        assert!(dump.contains("by mx.customer.test (Postfix) with ESMTPS"), "{dump}");
        let verified = dump.contains("Issuer \"relay client CA\" (verified OK)");
        if seq < 10 {
            assert!(verified, "Postfix verified the relay's certificate: {dump}");
        } else {
            assert!(!verified && dump.contains("(Client did not present a certificate)"), "{dump}");
        }
    }
}

/// A relay with two domains on the same server at 127.0.0.1:`port`: `may.test` uses TLS
/// when it can (the default), `must.test` requires it. Failed mail waits an hour.
fn may_and_must_relay(port: u16) -> Relay {
    let domains = [
        domain_with("may.test", "tls = \"opportunistic\"", &[("127.0.0.1", port, 10)]),
        domain_with("must.test", "tls = \"required\"", &[("127.0.0.1", port, 10)]),
    ]
    .concat();
    Relay::start(&domains, "retry = [\"1h\"]")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opportunistic_falls_back_to_clear_when_the_handshake_fails() {
    let certs = tempfile::tempdir().expect("tempdir");
    let server = TestCa::new("private CA").issue(certs.path(), "mx", &["127.0.0.1"]);
    let mailbox = Sink::start("127.0.1.116", &[]);
    // Offers STARTTLS but only with protocols rustls refuses: every handshake fails.
    let mut l = tls_listener("old.customer.test", &server);
    l.options.push(("smtpd_tls_protocols".into(), "<=TLSv1.1".into()));
    let postfix = Postfix::start(&["may.test", "must.test"], &mailbox.addr, std::slice::from_ref(&l), "");
    let relay = may_and_must_relay(postfix.port(0));
    assert_eq!(send(&relay.addr, "user@may.test", 0..2, 1).await.len(), 2);
    assert_eq!(send(&relay.addr, "user@must.test", 10..12, 1).await.len(), 2);
    relay.eventually("opportunistic mail delivered in clear", || mailbox.count() == 2).await;
    relay.eventually("required mail deferred", || relay.log_lines(&["deferred"]).len() >= 2).await;
    assert!(mailbox.dumps().iter().all(|d| d.contains("To: user@may.test")), "required mail must not go out in clear");
    relay.logged(&["TLS failed; delivering in clear"]).await;
    drop(postfix);
}

/// A scripted server that offers STARTTLS and answers it with `454` (RFC 3207 §4: "TLS not
/// available due to temporary reason"), then takes mail in clear on the same connection.
/// Each line of the transcript is `connection-number command`.
struct Refuses454 {
    port: u16,
    transcript: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Refuses454 {
    fn start() -> Refuses454 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let transcript = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = transcript.clone();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                let log = log.clone();
                std::thread::spawn(move || Refuses454::serve(n, stream, &log));
            }
        });
        Refuses454 { port, transcript }
    }

    fn serve(n: usize, stream: TcpStream, log: &std::sync::Mutex<Vec<String>>) -> Option<()> {
        let mut out = stream.try_clone().ok()?;
        let mut input = BufReader::new(stream);
        let note = |what: &str| log.lock().expect("transcript").push(format!("{n} {what}"));
        out.write_all(b"220 scripted ESMTP\r\n").ok()?;
        let mut line = String::new();
        loop {
            line.clear();
            if input.read_line(&mut line).ok()? == 0 {
                return Some(());
            }
            let verb = line.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
            note(&verb);
            let answer: &[u8] = match verb.as_str() {
                "EHLO" => b"250-scripted\r\n250-PIPELINING\r\n250 STARTTLS\r\n",
                "STARTTLS" => b"454 4.7.0 TLS not available due to temporary reason\r\n",
                "DATA" => {
                    out.write_all(b"354 go ahead\r\n").ok()?;
                    let mut body = String::new();
                    while line != ".\r\n" {
                        line.clear();
                        if input.read_line(&mut line).ok()? == 0 {
                            return Some(());
                        }
                        body.push_str(&line);
                    }
                    note(&format!("MESSAGE {}", body.lines().find(|l| l.starts_with("To: ")).unwrap_or("")));
                    b"250 2.0.0 queued\r\n"
                }
                "QUIT" => {
                    out.write_all(b"221 2.0.0 bye\r\n").ok()?;
                    return Some(());
                }
                _ => b"250 2.0.0 ok\r\n",
            };
            out.write_all(answer).ok()?;
        }
    }

    fn transcript(&self) -> Vec<String> {
        self.transcript.lock().expect("transcript").clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_454_to_starttls_means_clear_on_the_same_connection_only_when_opportunistic() {
    let server = Refuses454::start();
    let relay = may_and_must_relay(server.port);
    assert_eq!(send(&relay.addr, "user@must.test", 10..11, 1).await.len(), 1);
    assert_eq!(send(&relay.addr, "user@may.test", 0..1, 1).await.len(), 1);
    relay.eventually("opportunistic mail delivered", || server.transcript().iter().any(|l| l.contains("MESSAGE"))).await;
    relay.eventually("required mail deferred", || !relay.log_lines(&["deferred"]).is_empty()).await;
    let transcript = server.transcript();
    // The delivery went on in clear on the connection whose STARTTLS got the 454.
    let message = transcript.iter().find(|l| l.contains("MESSAGE")).expect("message");
    assert!(message.ends_with("To: user@may.test"), "{transcript:?}");
    let conn = message.split_whitespace().next().expect("connection");
    let on_conn: Vec<&str> = transcript
        .iter()
        .filter(|l| l.split_whitespace().next() == Some(conn))
        .map(|l| l.split_once(' ').expect("line").1)
        .collect();
    let starttls = on_conn.iter().position(|c| *c == "STARTTLS").expect("STARTTLS asked for");
    let mail = on_conn.iter().position(|c| *c == "MAIL").expect("MAIL");
    assert!(starttls < mail, "{on_conn:?}");
    // Required mail never reached the server in clear: one message in all, and no MAIL
    // command on any connection but the opportunistic one.
    assert_eq!(transcript.iter().filter(|l| l.contains("MESSAGE")).count(), 1, "{transcript:?}");
    assert_eq!(transcript.iter().filter(|l| l.ends_with(" MAIL")).count(), 1, "{transcript:?}");
    relay.logged(&["STARTTLS refused; delivering in clear"]).await;
}

#[test]
fn bad_tls_settings_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").expect("write");
    let write = |name: &str, relay: &str, domain: &str| {
        let path = dir.path().join(name);
        let text = format!(
            "[relay]\nhostname = \"relay.test\"\nlisten = [\"127.0.0.1:2525\"]\nqueue = \"q\"\n{relay}\n\n[[domain]]\nname = \"customer.test\"\n{domain}\n[[domain.server]]\nhost = \"192.0.2.1\"\n"
        );
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let junk = quoted(&junk);
    let cases = [
        (write("a.toml", &format!("tls_cert = {junk}"), ""), "relay.tls_key: relay.tls_cert is set"),
        (write("b.toml", &format!("tls_cert = {junk}\ntls_key = {junk}"), ""), "relay.tls_cert:"),
        (write("c.toml", "", "tls = \"always\""), "domain customer.test: tls: \"always\" is not a TLS mode"),
        (write("d.toml", "", &format!("tls = \"required\"\ntls_ca = {junk}")), "domain customer.test: tls_ca:"),
        (write("f.toml", "", &format!("tls_ca = {junk}")), "checks certificates only with tls = \"required\""),
        (write("e.toml", "", "tls = \"none\"\ntls_ca = \"missing.pem\""), "is not a file"),
        (write("g.toml", "require_tls = true", ""), "relay.require_tls: mail would be refused from every client"),
        (
            write("h.toml", &format!("\n[delivery]\ntls_client_cert = {junk}"), ""),
            "delivery.tls_client_key: delivery.tls_client_cert is set",
        ),
        (
            write("i.toml", &format!("\n[delivery]\ntls_client_cert = {junk}\ntls_client_key = {junk}"), ""),
            "delivery.tls_client_cert:",
        ),
    ];
    for (path, expected) in cases {
        let (ok, _, err) = mxrelay(&["check", &path]);
        assert!(!ok, "{path} must be refused");
        assert!(err.contains(expected), "{path}: expected {expected:?} in:\n{err}");
    }
}
