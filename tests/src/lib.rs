//! Harness for end-to-end tests with real SMTP peers.
//!
//! * [`Sink`]: Postfix's `smtp-sink` as a customer server on `127.0.1.N` (or `::1`), dumping every
//!   message to a file so tests can check which messages arrived, and how often.
//! * [`Relay`]: the real `mxrelay` binary with a generated config, its log captured; optionally
//!   under a file-size limit, so that its disk fills ([`Relay::lift_file_size_limit`] makes
//!   room again).
//! * [`postfix::Postfix`]: a test-owned Postfix instance (interop, TLS peer).
//! * [`certs::TestCa`]: certificates made in the test.
//! * [`disk::FreezableDisk`]: a small filesystem a test freezes, so that the relay's disk
//!   hangs, or fills to the last block (`ENOSPC`); [`disk::ThinDisk`]: one whose storage
//!   runs out below it, so that writes fail with `EIO` and it turns read-only.
//! * [`strace::Strace`]: the relay's system calls, for what only a power cut would show.
//! * [`send`]: a sending tier that tags message `n` with `X-Seq: n` and a trailer, and
//!   returns the sequence numbers that got a `250`; [`transaction`] returns each reply of
//!   one session's commands.
//! * [`spawn_until_ready`] and [`on_a_free_port`]: every helper process (sinks, relays,
//!   dnsmasq) is started by one step that waits until it is ready or has exited, and is
//!   started again on another port when its port was taken. A sink is ready when it holds
//!   the listening socket itself ([`listens_on`]), not when something answers on its port.
//!
//! The relay binary is `target/<profile>/mxrelay`; build it first (`cargo build --release`,
//! as the README's test command does). A missing binary or a missing `smtp-sink` fails the
//! test with a message saying what to install; nothing is skipped silently.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mail_send::SmtpClient;
use tokio::sync::Semaphore;

pub mod certs;
pub mod disk;
pub mod postfix;
pub mod strace;

/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `cond` until it holds or `limit` passes; returns whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Awaits `cond` (polled every 20 ms) for at most [`PATIENCE`]; panics with `what` if it never holds.
pub async fn eventually(what: &str, cond: impl FnMut() -> bool) {
    eventually_else(what, cond, String::new).await;
}

/// [`eventually`], with `context()` (what went on meanwhile) in the panic.
async fn eventually_else(what: &str, mut cond: impl FnMut() -> bool, context: impl Fn() -> String) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for: {what}{}", context());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free TCP port on `ip`.
pub fn free_port(ip: &str) -> u16 {
    let l = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
    l.local_addr().expect("local addr").port()
}

/// Runs `start` with a port of `ip` that was free a moment ago. A port can be taken before
/// the process bound it (by any socket of that port on the wildcard address, a resolver's
/// UDP query socket for one); when `start` fails with "Address already in use", it runs
/// again with another port, at most five times. Any other failure panics with its text.
pub fn on_a_free_port<T>(ip: &str, mut start: impl FnMut(u16) -> Result<T, String>) -> T {
    while_address_in_use(&format!("on a free port of {ip}"), |_| start(free_port(ip)))
}

/// Runs `start` (given the attempt, from 1) again while it fails with "Address already in
/// use", at most five times in all; any other failure panics with its text and `what`.
pub fn while_address_in_use<T>(what: &str, mut start: impl FnMut(usize) -> Result<T, String>) -> T {
    const ATTEMPTS: usize = 5;
    for attempt in 1..=ATTEMPTS {
        match start(attempt) {
            Ok(started) => return started,
            Err(why) if why.contains("Address already in use") && attempt < ATTEMPTS => continue,
            Err(why) => panic!("no start {what} (attempt {attempt} of {ATTEMPTS}): {why}"),
        }
    }
    unreachable!("the last attempt returns or panics")
}

/// Spawns `cmd` with its stderr in `stderr_path` and waits (at most [`PATIENCE`]) until
/// `ready` holds for its process ID. If the process exits first, returns its exit status and
/// what it printed (for [`on_a_free_port`] to tell a taken port from other failures).
pub fn spawn_until_ready(cmd: &mut Command, stderr_path: &Path, mut ready: impl FnMut(u32) -> bool) -> Result<Child, String> {
    let stderr = std::fs::File::create(stderr_path).unwrap_or_else(|e| panic!("{}: {e}", stderr_path.display()));
    let mut child = cmd.stderr(stderr).spawn().unwrap_or_else(|e| {
        panic!(
            "cannot start {cmd:?} ({e}); `scripts/setup.sh --test` installs the test peers (the README's test command runs it)"
        )
    });
    let mut exited = None;
    let settled = wait_until(PATIENCE, || {
        exited = child.try_wait().expect("child status");
        exited.is_some() || ready(child.id())
    });
    if !settled {
        let _ = child.kill();
        panic!("{cmd:?} neither became ready nor exited within {PATIENCE:?}");
    }
    match exited {
        None => Ok(child),
        Some(status) => Err(format!("{status}: {}", std::fs::read_to_string(stderr_path).unwrap_or_default().trim())),
    }
}

/// Whether process `pid` has a TCP socket listening on `addr` (`IP:PORT` or `[IPv6]:PORT`).
/// Read from `/proc`, so, unlike a connect, another process's listener on that address does
/// not count.
pub fn listens_on(pid: u32, addr: &str) -> bool {
    let addr: SocketAddr = addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}"));
    // /proc/net/tcp{,6} show the address as in-memory u32s in hex; state 0A is LISTEN.
    let (octets, table) = match addr.ip() {
        IpAddr::V4(ip) => (ip.octets().to_vec(), "/proc/net/tcp"),
        IpAddr::V6(ip) => (ip.octets().to_vec(), "/proc/net/tcp6"),
    };
    let words: String = octets.chunks(4).map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))).collect();
    let local = format!("{words}:{:04X}", addr.port());
    let table = std::fs::read_to_string(table).unwrap_or_else(|e| panic!("{table}: {e}"));
    let sockets: Vec<String> = table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 9 && f[1] == local && f[3] == "0A")
        .map(|f| format!("socket:[{}]", f[9]))
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| sockets.iter().any(|s| target.as_os_str() == s.as_str())))
}

/// `smtp-sink` as one customer server.
#[derive(Debug)]
pub struct Sink {
    /// `IP:PORT` it listens on.
    pub addr: String,
    args: Vec<String>,
    /// What it received, one file per message.
    dir: tempfile::TempDir,
    /// Its stderr, apart from the messages.
    logs: tempfile::TempDir,
    child: Option<Child>,
}

impl Sink {
    /// Starts a sink on `ip` (a free port; IPv4, or `::1`) with extra smtp-sink options such
    /// as `-f mail`.
    pub fn start(ip: &str, args: &[&str]) -> Sink {
        let parsed: IpAddr = ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"));
        on_a_free_port(ip, |port| Sink::try_start_at(&SocketAddr::new(parsed, port).to_string(), args))
    }

    /// Starts a sink on `addr` (`IP:PORT` or `[IPv6]:PORT`).
    pub fn start_at(addr: &str, args: &[&str]) -> Sink {
        Sink::try_start_at(addr, args).unwrap_or_else(|why| panic!("smtp-sink on {addr} did not start: {why}"))
    }

    fn try_start_at(addr: &str, args: &[&str]) -> Result<Sink, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        // smtp-sink drops privileges to `nobody` when run as root; it must be able to write.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
        let logs = tempfile::tempdir().expect("tempdir");
        let args = args.iter().map(ToString::to_string).collect();
        let mut sink = Sink { addr: addr.to_string(), args, dir, logs, child: None };
        sink.child = Some(sink.spawn()?);
        Ok(sink)
    }

    /// Host and port for the relay config (an IPv6 address without its brackets).
    pub fn host_port(&self) -> (&str, u16) {
        let (h, p) = self.addr.rsplit_once(':').expect("ip:port");
        (h.trim_start_matches('[').trim_end_matches(']'), p.parse().expect("port"))
    }

    /// (Re)starts the sink on the same address, keeping what it received.
    pub fn restart(&mut self) {
        let child = self.spawn().unwrap_or_else(|why| panic!("smtp-sink on {} did not start again: {why}", self.addr));
        self.child = Some(child);
    }

    /// Runs smtp-sink and waits until it listens on its address itself.
    fn spawn(&self) -> Result<Child, String> {
        let template = format!("{}/%H%M%S.", self.dir.path().display());
        let mut cmd = Command::new("smtp-sink");
        cmd.args(["-u", "nobody", "-d", &template]).args(&self.args).args([&self.addr, "256"]).stdout(Stdio::null());
        spawn_until_ready(&mut cmd, &self.logs.path().join("stderr"), |pid| listens_on(pid, &self.addr))
    }

    /// Kills the sink at once (SIGKILL), mid-transaction if it is in one.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sequence numbers of the complete messages received, with how often each arrived.
    pub fn received(&self) -> BTreeMap<u64, u32> {
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(self.dir.path()).expect("read dump dir").flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            if let Some(seq) = complete_seq(&text) {
                *out.entry(seq).or_insert(0) += 1;
            }
        }
        out
    }

    /// How many complete messages it received.
    pub fn count(&self) -> usize {
        self.received().values().map(|&n| n as usize).sum()
    }

    /// The raw dumps (headers and body) of everything received.
    pub fn dumps(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path())
            .expect("dir")
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .collect()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `X-Seq` of a dumped message, if its trailer shows it arrived whole.
fn complete_seq(text: &str) -> Option<u64> {
    let seq: u64 = text.lines().find_map(|l| l.strip_prefix("X-Seq: "))?.trim().parse().ok()?;
    text.contains(&format!("END-OF-MESSAGE {seq}")).then_some(seq)
}

/// Merges the receipts of several sinks.
pub fn received_by_all(sinks: &[&Sink]) -> BTreeMap<u64, u32> {
    let mut all = BTreeMap::new();
    for s in sinks {
        for (seq, n) in s.received() {
            *all.entry(seq).or_insert(0) += n;
        }
    }
    all
}

/// The `mxrelay` binary built next to this test.
pub fn relay_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = profile_dir.join("mxrelay");
    assert!(bin.is_file(), "{} is missing: build it first with `cargo build --release -p mxrelay`", bin.display());
    bin
}

/// A socket standing in for systemd's `$NOTIFY_SOCKET`: what the relay tells its service
/// manager arrives here.
#[derive(Debug)]
pub struct NotifySocket {
    /// Its path, the value of `NOTIFY_SOCKET`.
    pub path: String,
    socket: std::os::unix::net::UnixDatagram,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    /// Binds a new one.
    pub fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        socket.set_read_timeout(Some(PATIENCE)).expect("timeout");
        NotifySocket { path: path.display().to_string(), socket, _dir: dir }
    }

    /// The next notification; panics if none comes within [`PATIENCE`].
    pub fn receive(&self) -> String {
        let mut buf = [0u8; 512];
        let n = self.socket.recv(&mut buf).expect("a notification within PATIENCE");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// The notifications that arrive within `period`, all of them.
    pub fn receive_for(&self, period: Duration) -> Vec<String> {
        let until = Instant::now() + period;
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
            self.socket.set_read_timeout(Some(left)).expect("timeout");
            if let Ok(n) = self.socket.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        self.socket.set_read_timeout(Some(PATIENCE)).expect("timeout");
        got
    }

    /// Drops the notifications that have arrived so far.
    pub fn drain(&self) {
        self.socket.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 512];
        while self.socket.recv(&mut buf).is_ok() {}
        self.socket.set_nonblocking(false).expect("blocking");
    }
}

/// A running `mxrelay run` process.
#[derive(Debug)]
pub struct Relay {
    /// `127.0.0.1:PORT` it accepts mail on.
    pub addr: String,
    /// Its working directory (config and queue).
    pub dir: tempfile::TempDir,
    /// Largest file the process may write, in KiB (`ulimit -f`), from its next (re)start on:
    /// past it a write fails as on a full disk. `None` (the default) for no limit.
    pub file_size_limit_kib: Option<u64>,
    /// Run with `--log-format json`, from its next (re)start on.
    pub json_logs: bool,
    /// More environment variables, from its next (re)start on.
    pub env: Vec<(String, String)>,
    log: Arc<Mutex<Vec<String>>>,
    /// While set, nothing reads the relay's stderr ([`Relay::pause_log_reader`]).
    log_paused: Arc<std::sync::atomic::AtomicBool>,
    child: Option<Child>,
}

impl Relay {
    /// Starts the relay with `[[domain]]` blocks and extra `[delivery]` lines.
    pub fn start(domains: &str, delivery: &str) -> Relay {
        Relay::start_with("", domains, delivery)
    }

    /// Starts the relay with extra `[relay]` lines too, listening on a free port
    /// ([`on_a_free_port`]).
    pub fn start_with(relay: &str, domains: &str, delivery: &str) -> Relay {
        Relay::start_limited(relay, domains, delivery, None, &[])
    }

    /// [`Relay::start_with`] with more environment variables ([`Relay::env`]).
    pub fn start_with_env(env: &[(&str, &str)], relay: &str, domains: &str, delivery: &str) -> Relay {
        Relay::start_limited(relay, domains, delivery, None, env)
    }

    /// [`Relay::start_with`] with no file larger than `kib` KiB ([`Relay::file_size_limit_kib`])
    /// and more environment variables.
    pub fn start_with_file_size_limit(kib: u64, env: &[(&str, &str)], relay: &str, domains: &str, delivery: &str) -> Relay {
        Relay::start_limited(relay, domains, delivery, Some(kib), env)
    }

    fn start_limited(
        relay: &str,
        domains: &str,
        delivery: &str,
        file_size_limit_kib: Option<u64>,
        env: &[(&str, &str)],
    ) -> Relay {
        // Short timeouts for tests, unless the test sets its own.
        let defaults: String =
            [("connect_timeout", "2s"), ("command_timeout", "5s"), ("data_timeout", "5s"), ("probe_interval", "100ms")]
                .iter()
                .filter(|(key, _)| !delivery.contains(key))
                .map(|(key, value)| format!("{key} = \"{value}\"\n"))
                .collect();
        // The queue in the relay's directory, and the name relay.test, unless the test sets
        // them (a second relay as a customer's server has a name of its own).
        let default = |key: &str, line: &'static str| {
            if relay.lines().any(|l| l.trim_start().starts_with(&format!("{key} "))) { "" } else { line }
        };
        let (queue, hostname) = (default("queue", "queue = \"queue\"\n"), default("hostname", "hostname = \"relay.test\"\n"));
        on_a_free_port("127.0.0.1", |port| {
            let dir = tempfile::tempdir().expect("tempdir");
            let addr = format!("127.0.0.1:{port}");
            let config = format!(
                "[relay]\n{hostname}listen = [\"{addr}\"]\n{queue}{relay}\n\n[delivery]\n{defaults}{delivery}\n\n{domains}\n"
            );
            std::fs::write(dir.path().join("relay.toml"), config).expect("write config");
            let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let mut relay = Relay {
                addr,
                dir,
                file_size_limit_kib,
                json_logs: false,
                env,
                log: Arc::default(),
                log_paused: Arc::default(),
                child: None,
            };
            relay.launch().map(|()| relay).map_err(|log| format!("mxrelay did not become ready; log:\n{log}"))
        })
    }

    /// (Re)starts the process on the same config and queue; returns once it is ready.
    pub fn restart(&mut self) {
        if let Err(log) = self.launch() {
            panic!("mxrelay did not become ready; log:\n{log}");
        }
    }

    /// Starts the process and waits for it to be ready; if it exits or takes longer than
    /// [`PATIENCE`], returns its log.
    fn launch(&mut self) -> Result<(), String> {
        let config = self.dir.path().join("relay.toml");
        let mut cmd = match self.file_size_limit_kib {
            None => Command::new(relay_binary()),
            // RLIMIT_FSIZE: a write past the limit in any one file fails with EFBIG, as on a
            // full disk. The relay handles SIGXFSZ itself, so the write fails instead of
            // killing the process. `ulimit -f` counts KiB in bash (512-byte blocks in dash):
            // bash by name.
            Some(kib) => {
                let mut bash = Command::new("bash");
                // The soft limit only, so that a test can lift it from outside (`prlimit`).
                bash.arg("-c").arg(format!("ulimit -S -f {kib}; exec \"$0\" \"$@\"")).arg(relay_binary());
                bash
            }
        };
        cmd.arg("run").arg(config);
        if self.json_logs {
            cmd.args(["--log-format", "json"]);
        }
        let mut child = cmd
            .env("MXRELAY_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mxrelay");
        let stderr = child.stderr.take().expect("stderr");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (log, paused) = (self.log.clone(), self.log_paused.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                while paused.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let ready = line.contains("mxrelay ready");
                // Into the log first: whoever is woken by `ready` may look for this line.
                log.lock().expect("log").push(line);
                if ready {
                    let _ = ready_tx.send(());
                }
            }
        });
        self.child = Some(child);
        // Err at once when the process exits (its stderr, and so the sender, is gone).
        ready_rx.recv_timeout(PATIENCE).map_err(|_| self.log_text())
    }

    /// Kills the relay with SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Lifts the file-size limit of the running relay (`prlimit`), as room coming back on a
    /// full disk would.
    pub fn lift_file_size_limit(&self) {
        let lifted = Command::new("prlimit").args(["--pid", &self.pid().to_string(), "--fsize=unlimited"]).status();
        assert!(lifted.as_ref().is_ok_and(|s| s.success()), "prlimit --fsize=unlimited failed: {lifted:?}");
    }

    /// The relay's process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal (`HUP`, `TERM`, ...) to the relay process.
    pub fn signal(&self, name: &str) {
        let pid = self.pid().to_string();
        let ok = Command::new("kill").args(["-s", name, &pid]).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "kill -s {name} {pid} failed");
    }

    /// Waits (at most [`PATIENCE`]) for the relay to exit; returns whether it exited with 0.
    pub fn wait_exit(&mut self) -> bool {
        let mut child = self.child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.success();
            }
            assert!(start.elapsed() < PATIENCE, "the relay did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Path of the relay's config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("relay.toml")
    }

    /// Stops reading the relay's stderr (after at most one more line), as a stalled journald
    /// would: the pipe fills and the relay's writes to it would block.
    pub fn pause_log_reader(&self) {
        self.log_paused.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Reads the relay's stderr again.
    pub fn resume_log_reader(&self) {
        self.log_paused.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Everything the relay logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// Log lines containing every one of `needles`.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        self.log.lock().expect("log").iter().filter(|l| needles.iter().all(|n| l.contains(n))).cloned().collect()
    }

    /// How many log lines contain every one of `needles`, once at least one does. The log
    /// reaches the test through a pipe that a thread reads, so a line written before an
    /// event the test awaited may not have been read yet: awaited here, not assumed. Panics
    /// with the log after [`PATIENCE`].
    pub async fn logged(&self, needles: &[&str]) -> usize {
        let mut n = 0;
        self.eventually(&format!("a log line with {needles:?}"), || {
            n = self.log_lines(needles).len();
            n > 0
        })
        .await;
        n
    }

    /// [`eventually`], with the relay's log in the panic: what it did instead.
    pub async fn eventually(&self, what: &str, cond: impl FnMut() -> bool) {
        eventually_else(what, cond, || format!("; the relay's log:\n{}", self.log_text())).await;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `GET path` from an HTTP server on `addr`; returns the body.
pub fn http_get(addr: &str, path: &str) -> String {
    http_request(addr, "GET", path, None, "").1
}

/// One HTTP/1.1 request, with a bearer `token` when given; returns the status and the body.
pub fn http_request(addr: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut response = String::new();
    // The server may close before reading an oversized body; what it answered is still there.
    let _ = stream.read_to_string(&mut response);
    let status = response.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default())
}

/// Asserts that `text` (a dump, a report) contains every one of `needles`, naming the first
/// missing one.
pub fn assert_contains_all(text: &str, needles: &[&str]) {
    for needle in needles {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

/// The value of a Prometheus sample whose line starts with `series` (name and labels).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(series)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

impl Relay {
    /// The admin API's `/metrics` (Prometheus text); `admin_listen` must be set.
    pub fn metrics(&self) -> String {
        http_get(&self.admin_addr(), "/metrics")
    }

    /// `IP:PORT` of the admin listener, from the ready line.
    pub fn admin_addr(&self) -> String {
        let line = self.log_lines(&["mxrelay ready"]).pop().expect("ready line");
        line.split("admin=").nth(1).and_then(|r| r.split_whitespace().next()).expect("admin address").to_string()
    }
}

/// Path of a policy component the tests crate's build script built (`CANARY`, `STICKY`, ...).
#[macro_export]
macro_rules! policy_module {
    (CANARY) => {
        env!("MXRELAY_TEST_POLICY_CANARY")
    };
    (STICKY) => {
        env!("MXRELAY_TEST_POLICY_STICKY")
    };
    (MAINTENANCE) => {
        env!("MXRELAY_TEST_POLICY_MAINTENANCE")
    };
    (HOSTILE) => {
        env!("MXRELAY_TEST_POLICY_HOSTILE")
    };
}

/// Writes `relay.toml` in `dir` for the commands that read a config without running the
/// relay (`check`, `plan`, `test-servers`): a `[relay]` section and `domain_blocks`.
/// Returns its path.
pub fn write_config(dir: &Path, domain_blocks: &str) -> String {
    let path = dir.join("relay.toml");
    let text = format!("[relay]\nhostname = \"relay.test\"\nlisten = [\"127.0.0.1:2525\"]\nqueue = \"queue\"\n\n{domain_blocks}");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

/// Runs `mxrelay` with `args`; returns (exit success, stdout, stderr).
pub fn mxrelay(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(relay_binary()).args(args).output().expect("run mxrelay");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs Debian's `swaks` (a real SMTP client) with `args`; returns success and its output.
pub fn swaks(args: &[&str]) -> (bool, String) {
    let out =
        Command::new("swaks").args(["--timeout", "10"]).args(args).output().unwrap_or_else(|e| {
            panic!("cannot run swaks ({e}); install Debian's swaks package (the README's test command does)")
        });
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// [`swaks`] sending message `seq` from `a@src.test` to `to` (comma-separated for several
/// recipients), tagged as [`send`] tags it, so a sink counts it once it has arrived whole.
/// `extra` options, such as `--tls`, come first.
pub fn swaks_tagged(server: &str, to: &str, seq: u64, extra: &[&str]) -> (bool, String) {
    let (header, body) = (format!("X-Seq: {seq}"), format!("END-OF-MESSAGE {seq}"));
    let mut args = vec!["--server", server];
    args.extend_from_slice(extra);
    args.extend(["--from", "a@src.test", "--to", to, "--header", &header, "--body", &body]);
    swaks(&args)
}

/// A `[[domain]]` block for `name` with `(sink, preference)` servers.
pub fn domain_block(name: &str, servers: &[(&Sink, u16)]) -> String {
    let servers: Vec<(&str, u16, u16)> = servers
        .iter()
        .map(|(sink, pref)| {
            let (host, port) = sink.host_port();
            (host, port, *pref)
        })
        .collect();
    domain_with(name, "", &servers)
}

/// A `[[domain]]` block for `name`: the `extra` lines (`tls`, `policy`, ...), then the
/// `(host, port, preference)` servers.
pub fn domain_with(name: &str, extra: &str, servers: &[(&str, u16, u16)]) -> String {
    let mut out = format!("[[domain]]\nname = \"{name}\"\n{extra}\n");
    for (host, port, pref) in servers {
        out.push_str(&format!("[[domain.server]]\nhost = \"{host}\"\nport = {port}\npreference = {pref}\n"));
    }
    out
}

/// The text of test message `seq`.
pub fn message(seq: u64, to: &str) -> String {
    format!(
        "From: sender@src.test\r\nTo: {to}\r\nSubject: test {seq}\r\nX-Seq: {seq}\r\n\r\nLine one of message {seq}.\r\n.A line that starts with a dot.\r\n{}\r\nEND-OF-MESSAGE {seq}\r\n",
        "x".repeat(1500)
    )
}

/// Runs EHLO, then `commands` (MAIL, RCPTs) as given, then test message `seq` if every one
/// was accepted; returns each command's reply (code, and text with its
/// enhanced status code in front, if it has one), and the final dot's last.
pub async fn transaction(addr: &str, commands: &[&str], seq: u64) -> Vec<(u16, String)> {
    transaction_with(addr, commands, &message(seq, "dsn")).await
}

/// [`transaction`] with the message text given.
pub async fn transaction_with(addr: &str, commands: &[&str], text: &str) -> Vec<(u16, String)> {
    let mut client = SmtpClient::connect(addr.parse().expect("addr"), Duration::from_secs(10)).await.expect("connect");
    assert_eq!(client.read().await.expect("greeting").code, 220);
    // The text keeps the enhanced status code, when there is one, in front.
    let reply = |code: u16, esc: [u8; 3], message: String| match esc {
        [0, ..] => (code, message),
        [class, subject, detail] => (code, format!("{class}.{subject}.{detail} {message}")),
    };
    let ehlo = client.cmd(b"EHLO sender.test\r\n").await.expect("EHLO");
    let mut replies = vec![reply(ehlo.code, ehlo.esc, ehlo.message)];
    for c in commands {
        let r = client.cmd(format!("{c}\r\n").as_bytes()).await.expect("reply");
        replies.push(reply(r.code, r.esc, r.message));
    }
    if replies[1..].iter().all(|(code, _)| *code == 250) {
        let accepted = client.data(text.trim_end_matches("\r\n")).await;
        replies.push(if accepted.is_ok() { (250, String::new()) } else { (0, format!("{accepted:?}")) });
    }
    let _ = client.quit().await;
    replies
}

/// Sends messages `seqs` to `rcpt` through the relay at `addr` over `sessions` parallel
/// connections (one message per connection, as smtp-source does); returns the sequence
/// numbers that got a `250`.
pub async fn send(addr: &str, rcpt: &str, seqs: std::ops::Range<u64>, sessions: usize) -> Vec<u64> {
    let gate = Arc::new(Semaphore::new(sessions));
    let mut tasks = Vec::new();
    for seq in seqs {
        let (gate, addr, rcpt) = (gate.clone(), addr.to_string(), rcpt.to_string());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore");
            send_one(&addr, &rcpt, seq).await.then_some(seq)
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        if let Ok(Some(seq)) = t.await {
            acked.push(seq);
        }
    }
    acked
}

/// Sends one message; true when the relay answered `250` to the final dot.
pub async fn send_one(addr: &str, rcpt: &str, seq: u64) -> bool {
    let addr: SocketAddr = addr.parse().expect("addr");
    let Ok(mut client) = SmtpClient::connect(addr, Duration::from_secs(10)).await else {
        return false;
    };
    if client.read().await.map(|r| r.code).ok() != Some(220) || client.ehlo("sender.test").await.is_err() {
        return false;
    }
    let params = mail_send::smtp::message::Parameters::default();
    if client.mail_from("sender@src.test", &params).await.is_err() || client.rcpt_to(rcpt, &params).await.is_err() {
        return false;
    }
    let ok = client.data(message(seq, rcpt).trim_end_matches("\r\n")).await.is_ok();
    let _ = client.quit().await;
    ok
}

/// Asserts every message in `expected` arrived exactly once across `sinks`, and nothing else.
pub fn assert_exactly_once(sinks: &[&Sink], expected: &[u64]) {
    assert_delivered(sinks, expected, 0);
}

/// How many deliveries the relay deferred because the server went away after the final dot
/// without a reply. Such a message may have been delivered; it is sent again once the server
/// is back, so it may arrive twice (Exim and Postfix do the same).
pub fn unanswered_final_dots(relay: &Relay) -> usize {
    relay.log_lines(&["outcome=\"unknown\""]).len()
}

/// Asserts every message in `expected` arrived across `sinks` and nothing else did, and
/// that at most `may_repeat` arrived twice (see [`unanswered_final_dots`]).
pub fn assert_delivered(sinks: &[&Sink], expected: &[u64], may_repeat: usize) {
    let got = received_by_all(sinks);
    let dup: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    let extra: usize = dup.iter().map(|(_, n)| **n as usize - 1).sum();
    assert!(extra <= may_repeat, "delivered more than once: {dup:?} ({may_repeat} unanswered final dots)");
    let missing: Vec<_> = expected.iter().filter(|s| !got.contains_key(s)).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    assert_eq!(got.len(), expected.len(), "unexpected messages arrived");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another process's listener on the sink's address is not taken for the sink: a
    /// connect would reach it, `listens_on` does not.
    #[test]
    fn a_sink_on_a_taken_address_fails_with_the_reason() {
        let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr").to_string();
        let why = Sink::try_start_at(&addr, &[]).expect_err("started on a taken address");
        assert!(why.contains("Address already in use"), "{why}");
    }

    #[test]
    fn a_taken_port_means_another_start_and_other_failures_fail_at_once() {
        let mut ports = Vec::new();
        let started = on_a_free_port("127.0.0.1", |port| {
            ports.push(port);
            if ports.len() == 1 { Err("bind: Address already in use".to_string()) } else { Ok(port) }
        });
        assert_eq!(ports.len(), 2, "one start again after the taken port");
        assert_eq!(started, ports[1]);
        let other = std::panic::catch_unwind(|| on_a_free_port("127.0.0.1", |_| Err::<(), _>("no such file".to_string())));
        let why = other.expect_err("a failure that is not a taken port panics");
        let text = why.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains("attempt 1 of 5") && text.contains("no such file"), "{text}");
    }

    #[test]
    fn a_started_sink_is_the_one_listening() {
        let sink = Sink::start("127.0.0.1", &[]);
        let pid = sink.child.as_ref().expect("running").id();
        assert!(listens_on(pid, &sink.addr), "smtp-sink {pid} does not listen on {}", sink.addr);
        assert!(!listens_on(std::process::id(), &sink.addr), "the test process counted as the listener");
    }
}
