//! A test-owned Postfix instance: its own configuration, queue and data directories under a
//! temporary directory, started with `postfix -c`, listening only on loopback ports. It
//! relays every domain's mail to one next hop (usually an [`crate::Sink`]), so tests see
//! what Postfix received and how (its Received header says whether TLS was used).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::PATIENCE;

/// A running Postfix.
#[derive(Debug)]
pub struct Postfix {
    dir: tempfile::TempDir,
    /// The listeners, with the ports they were started on.
    listeners: Vec<Listener>,
}

/// One `smtpd` listener: its port and `-o name=value` overrides (TLS certificate, hostname).
#[derive(Debug, Clone, Default)]
pub struct Listener {
    /// Port on 127.0.0.1.
    pub port: u16,
    /// `smtpd` parameter overrides for this listener.
    pub options: Vec<(String, String)>,
}

const MASTER_CF: &str = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";

fn postfix_command() -> PathBuf {
    let path = ["/usr/sbin/postfix", "/sbin/postfix"].iter().map(PathBuf::from).find(|p| p.is_file());
    path.unwrap_or_else(|| panic!("postfix is not installed: run `scripts/setup.sh --test` (Debian package postfix)"))
}

impl Postfix {
    /// Starts Postfix with `smtpd` on each listener, relaying everything for `domains` to
    /// `next_hop` (`host:port`), with `main_cf` lines added to the generated main.cf.
    /// Postfix needs root to start (it drops to its `postfix` user). A listener's port can be
    /// taken between the test's choice and Postfix's bind (another test's outgoing
    /// connection, say): then every listener gets another free port, at most five times.
    /// [`Postfix::port`] says which ports were used.
    pub fn start(domains: &[&str], next_hop: &str, listeners: &[Listener], main_cf: &str) -> Postfix {
        let mut listeners = listeners.to_vec();
        crate::while_address_in_use("of postfix", |attempt| {
            if attempt > 1 {
                for l in &mut listeners {
                    l.port = crate::free_port("127.0.0.1");
                }
            }
            Postfix::try_start(domains, next_hop, &listeners, main_cf)
        })
    }

    /// The port listener `index` (in the order given to [`Postfix::start`]) listens on.
    pub fn port(&self, index: usize) -> u16 {
        self.listeners[index].port
    }

    fn try_start(domains: &[&str], next_hop: &str, listeners: &[Listener], main_cf: &str) -> Result<Postfix, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        // Postfix's daemons run as `postfix` and must reach the queue and data directories.
        std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        for d in ["conf", "queue", "data"] {
            std::fs::create_dir(root.join(d)).expect("mkdir");
        }
        let chown = Command::new("chown").args(["postfix:postfix"]).arg(root.join("data")).status();
        assert!(chown.is_ok_and(|s| s.success()), "chown postfix: the Postfix tests run as root with the postfix user present");
        let main = format!(
            "compatibility_level = 3.6\n\
             myhostname = mx.customer.test\n\
             mydestination =\n\
             queue_directory = {root}/queue\n\
             data_directory = {root}/data\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             mynetworks = 127.0.0.0/8\n\
             relay_domains = {domains}\n\
             relay_transport = relay:[{host}]:{port}\n\
             smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n\
             alias_maps =\n\
             alias_database =\n\
             local_recipient_maps =\n\
             smtpd_peername_lookup = no\n\
             notify_classes =\n\
             maillog_file_prefixes = {root}\n\
             maillog_file = {root}/maillog\n\
             smtp_tls_security_level = none\n\
             smtpd_tls_security_level = none\n\
             smtpd_tls_received_header = yes\n",
            root = root.display(),
            domains = domains.join(", "),
            host = next_hop.rsplit_once(':').map_or(next_hop, |(h, _)| h),
            port = next_hop.rsplit_once(':').map_or("25", |(_, p)| p),
        );
        std::fs::write(root.join("conf/main.cf"), with_overrides(&main, main_cf)).expect("main.cf");
        let mut master = String::new();
        for l in listeners {
            master.push_str(&format!("127.0.0.1:{} inet n - n - - smtpd\n", l.port));
            for (name, value) in &l.options {
                master.push_str(&format!("  -o {name}={value}\n"));
            }
        }
        master.push_str(MASTER_CF);
        std::fs::write(root.join("conf/master.cf"), master).expect("master.cf");
        let postfix = Postfix { dir, listeners: listeners.to_vec() };
        let out = Command::new(postfix_command()).arg("-c").arg(postfix.conf()).arg("start").output().expect("run postfix");
        if !out.status.success() {
            return Err(format!("{}\nlog:\n{}", String::from_utf8_lossy(&out.stderr), postfix.log()));
        }
        for l in listeners {
            let start = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", l.port)).is_err() {
                assert!(start.elapsed() < PATIENCE, "postfix is not listening on {}; log:\n{}", l.port, postfix.log());
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        Ok(postfix)
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("conf")
    }

    /// The instance's directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Postfix's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }
}

/// `base` with each `name = value` line of `overrides` in place of the base line of that name,
/// so every parameter appears once. A repeated parameter makes every Postfix process log a
/// warning at start, postlogd included, which sends its own warning to its own socket: when
/// the other daemons' warnings have filled that socket, postlogd blocks on itself and every
/// process that logs (smtpd first) hangs.
fn with_overrides(base: &str, overrides: &str) -> String {
    let name = |line: &str| line.split_once('=').map(|(n, _)| n.trim().to_string());
    let overridden: Vec<String> = overrides.lines().filter_map(name).collect();
    let kept = base.lines().filter(|line| name(line).is_none_or(|n| !overridden.contains(&n)));
    kept.chain(overrides.lines()).map(|line| format!("{line}\n")).collect()
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new(postfix_command()).arg("-c").arg(self.conf()).arg("stop").output();
    }
}

#[cfg(test)]
mod tests {
    use super::{Listener, Postfix};

    /// A port taken before Postfix binds it is replaced, and [`Postfix::port`] says by which.
    #[test]
    fn a_listener_port_taken_meanwhile_is_replaced() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = taken.local_addr().expect("addr").port();
        let postfix = Postfix::start(&["customer.test"], "127.0.0.1:25", &[Listener { port, options: vec![] }], "");
        assert_ne!(postfix.port(0), port);
        let mut greeting = String::new();
        let stream = std::net::TcpStream::connect(("127.0.0.1", postfix.port(0))).expect("connect");
        stream.set_read_timeout(Some(crate::PATIENCE)).expect("timeout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut greeting).expect("greeting");
        assert!(greeting.starts_with("220 "), "{greeting}");
    }

    #[test]
    fn overrides_replace_base_lines_and_every_parameter_appears_once() {
        let merged = super::with_overrides("a = 1\nb = 2\nc = 3\n", "b = two\nd = 4");
        assert_eq!(merged, "a = 1\nc = 3\nb = two\nd = 4\n");
    }
}
