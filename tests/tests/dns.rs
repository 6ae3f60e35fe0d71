//! Servers given by host name: resolved through the `[delivery] resolver` override (a
//! dnsmasq on loopback, as the Postfix reference setup uses), failover included, and a name
//! that does not resolve is passed over like an unreachable server.

use std::process::{Child, Command, Stdio};

use mxrelay_e2e::{PATIENCE, Relay, Sink, eventually, free_port, send_one, wait_until};

struct Dnsmasq(Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dnsmasq(port: u16, records: &[(&str, &str)]) -> Dnsmasq {
    let mut cmd = Command::new("dnsmasq");
    cmd.args(["--keep-in-foreground", "--conf-file=/dev/null", "--listen-address=127.0.0.1", "--bind-interfaces"])
        .args(["--no-resolv", "--no-hosts", "--no-poll", "--local=/test/", "--user=root"])
        .arg(format!("--port={port}"));
    for (name, ip) in records {
        cmd.arg(format!("--host-record={name},{ip}"));
    }
    let child =
        cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| {
            panic!("cannot start dnsmasq ({e}); install Debian's dnsmasq-base (the README's test command does)")
        });
    let server = Dnsmasq(child);
    let answers = || {
        Command::new("dig")
            .args(["+short", "+time=1", "+tries=1", "-p", &port.to_string(), "@127.0.0.1", records[0].0])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == records[0].1)
    };
    assert!(wait_until(PATIENCE, answers), "dnsmasq on port {port} does not answer");
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_resolve_through_the_configured_resolver() {
    let mut mx1 = Sink::start("127.0.1.91", &[]);
    let mx2 = Sink::start("127.0.1.92", &[]);
    let dns_port = free_port("127.0.0.1");
    let _dns = dnsmasq(dns_port, &[("mx1.customer.test", "127.0.1.91"), ("mx2.customer.test", "127.0.1.92")]);
    let (_, p1) = mx1.host_port();
    let (_, p2) = mx2.host_port();
    let domain = format!(
        "[[domain]]\nname = \"customer.test\"\n[[domain.server]]\nhost = \"nxdomain.customer.test\"\npreference = 5\n[[domain.server]]\nhost = \"mx1.customer.test\"\nport = {p1}\npreference = 10\n[[domain.server]]\nhost = \"mx2.customer.test\"\nport = {p2}\npreference = 20\n"
    );
    let relay = Relay::start(&domain, &format!("resolver = \"127.0.0.1:{dns_port}\""));
    for seq in 0..3 {
        assert!(send_one(&relay.addr, "user@customer.test", seq).await);
    }
    eventually("three at mx1", || mx1.count() == 3).await;
    assert!(!relay.log_lines(&["nxdomain.customer.test", "unreachable"]).is_empty(), "{}", relay.log_text());
    mx1.kill();
    assert!(send_one(&relay.addr, "user@customer.test", 3).await);
    eventually("failover to mx2 by name", || mx2.count() == 1).await;
}
