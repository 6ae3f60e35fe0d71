//! systemd's notify protocol (`sd_notify`): the relay tells the service manager when it is
//! ready, reloading and stopping, and pings its watchdog. With `Type=notify` a unit that
//! depends on the relay starts only once mail is accepted, `systemctl status` shows what the
//! relay is doing, and a relay whose runtime hangs is restarted (`WatchdogSec=`).
//!
//! Nothing happens when `NOTIFY_SOCKET` is unset, as when the relay runs from a shell.
//!
//! A send to the socket blocks while the service manager's queue is full (ten datagrams by
//! default). So sends happen on a thread of their own: a service manager that stops reading
//! never holds up the runtime, and so never holds up mail.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::time::Duration;

/// Notifications that may wait for the sending thread; past these, new ones are dropped.
const WAITING_NOTIFICATIONS: usize = 16;
/// How long shutdown waits for `STOPPING=1` to be sent.
const STOPPING_SEND_LIMIT: Duration = Duration::from_secs(1);

/// The service manager's notification socket, from the environment the relay started with.
#[derive(Debug)]
pub struct ServiceManager {
    notifier: Option<Notifier>,
    watchdog: Option<Duration>,
}

/// The sending thread's queue.
#[derive(Debug)]
struct Notifier {
    queue: SyncSender<Notification>,
    /// Notifications are being dropped (logged once per spell).
    backlogged: AtomicBool,
}

#[derive(Debug)]
struct Notification {
    state: String,
    /// Told once the datagram is sent (or failed).
    sent: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Notifier {
    /// Starts the sending thread.
    fn start(socket: UnixDatagram, address: SocketAddr) -> std::io::Result<Notifier> {
        let (queue, waiting) = mpsc::sync_channel::<Notification>(WAITING_NOTIFICATIONS);
        std::thread::Builder::new().name("service-notify".into()).spawn(move || {
            for Notification { state, sent } in waiting {
                if let Err(e) = socket.send_to_addr(state.as_bytes(), &address) {
                    tracing::warn!(error = %e, "could not notify the service manager");
                }
                if let Some(sent) = sent {
                    let _ = sent.send(());
                }
            }
        })?;
        Ok(Notifier { queue, backlogged: AtomicBool::new(false) })
    }

    /// Queues `state` for the thread; never blocks.
    fn send(&self, state: String, sent: Option<tokio::sync::oneshot::Sender<()>>) {
        match self.queue.try_send(Notification { state, sent }) {
            Ok(()) => {
                if self.backlogged.swap(false, Ordering::Relaxed) {
                    tracing::info!("notifications to the service manager are sent again");
                }
            }
            Err(TrySendError::Full(dropped)) => {
                if !self.backlogged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        dropped = dropped.state.lines().next().unwrap_or_default(),
                        "the service manager is not reading its notifications; dropping them until it does"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

impl ServiceManager {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. An address that cannot be
    /// used is logged once and notifications are off.
    pub fn from_env() -> ServiceManager {
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        let notifier = var("NOTIFY_SOCKET").and_then(|address| {
            match socket_for(&address).and_then(|(socket, target)| Notifier::start(socket, target)) {
                Ok(notifier) => Some(notifier),
                Err(e) => {
                    tracing::warn!(address, error = %e, "NOTIFY_SOCKET cannot be used; the service manager is not told of readiness");
                    None
                }
            }
        });
        // The watchdog is this process's only if WATCHDOG_PID, when set, names it.
        let ours = var("WATCHDOG_PID").is_none_or(|pid| pid == std::process::id().to_string());
        let watchdog = var("WATCHDOG_USEC")
            .filter(|_| ours && notifier.is_some())
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|usec| *usec > 0)
            .map(Duration::from_micros);
        ServiceManager { notifier, watchdog }
    }

    /// The relay accepts mail; `status` says where.
    pub fn ready(&self, status: &str) {
        self.send(format!("READY=1\nSTATUS={status}"));
    }

    /// A reload starts (SIGHUP); [`ServiceManager::ready`] follows when it is done, applied
    /// or refused.
    pub fn reloading(&self) {
        // systemd matches a reload to its request by the monotonic clock (systemd 253 on).
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
        self.send(format!("RELOADING=1\nSTATUS=reloading the configuration\nMONOTONIC_USEC={usec}"));
    }

    /// Shutdown starts: no new mail, deliveries in flight finishing. Returns once the
    /// service manager has it (for at most a second), as the process may exit soon after.
    pub async fn stopping(&self) {
        let Some(notifier) = &self.notifier else { return };
        let (sent, is_sent) = tokio::sync::oneshot::channel();
        notifier.send("STOPPING=1\nSTATUS=stopping: letting deliveries in flight finish".into(), Some(sent));
        let _ = tokio::time::timeout(STOPPING_SEND_LIMIT, is_sent).await;
    }

    /// How often to ping the watchdog (half its timeout, as sd_watchdog_enabled advises), if
    /// the service manager keeps one.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    /// Tells the watchdog the relay is alive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1".into());
    }

    fn send(&self, state: String) {
        if let Some(notifier) = &self.notifier {
            notifier.send(state, None);
        }
    }
}

/// An unbound datagram socket and the address to send to: a path, or `@name` for the
/// abstract namespace.
fn socket_for(address: &str) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    let target = match address.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None if address.starts_with('/') => SocketAddr::from_pathname(address)?,
        None => {
            return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "only a path or an @abstract name is supported"));
        }
    };
    Ok((UnixDatagram::unbound()?, target))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn notifications_reach_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let name = format!("mxrelay-test-{}", std::process::id());
        for (address, listener) in [
            (path.display().to_string(), UnixDatagram::bind(&path).expect("bind")),
            (format!("@{name}"), UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).expect("name")).expect("bind")),
        ] {
            listener.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            let manager = manager_for(&address);
            manager.ready("accepting mail on 127.0.0.1:25");
            assert_eq!(receive(&listener), "READY=1\nSTATUS=accepting mail on 127.0.0.1:25");
            manager.reloading();
            let reloading = receive(&listener);
            assert!(reloading.starts_with("RELOADING=1\n"), "{reloading}");
            let usec = reloading.lines().find_map(|l| l.strip_prefix("MONOTONIC_USEC=")).expect("MONOTONIC_USEC");
            assert!(usec.parse::<u64>().is_ok_and(|u| u > 0), "{reloading}");
            manager.stopping().await;
            assert!(receive(&listener).starts_with("STOPPING=1\n"));
        }
    }

    fn manager_for(address: &str) -> ServiceManager {
        let (socket, target) = socket_for(address).expect("usable");
        ServiceManager { notifier: Some(Notifier::start(socket, target).expect("thread")), watchdog: None }
    }

    /// The service manager's queue holds ten datagrams: a send past that blocks until it
    /// reads. A relay that sent on its runtime's threads stopped taking mail while it did.
    #[tokio::test]
    async fn a_service_manager_that_stops_reading_never_holds_up_the_caller() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        listener.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let manager = std::sync::Arc::new(manager_for(&path.display().to_string()));
        let (done, finished) = mpsc::channel();
        let pinging = manager.clone();
        std::thread::spawn(move || {
            for _ in 0..1000 {
                pinging.watchdog();
            }
            let _ = done.send(());
        });
        assert!(finished.recv_timeout(Duration::from_secs(30)).is_ok(), "a send blocked while nothing read the socket");
        // Shutdown is not held up either: `stopping` gives up after its limit.
        manager.stopping().await;
        // Reading again, the service manager hears from the relay again. Each read frees a
        // place, so a READY dropped while the queue is full is sent again after the next.
        manager.ready("accepting mail");
        while receive(&listener) != "READY=1\nSTATUS=accepting mail" {
            manager.ready("accepting mail");
        }
    }

    #[test]
    fn an_address_of_another_kind_is_refused() {
        assert!(socket_for("vsock:2:1234").is_err());
        assert!(socket_for("relative/path").is_err());
    }

    #[test]
    fn the_watchdog_is_pinged_at_half_its_timeout() {
        let manager = ServiceManager { notifier: None, watchdog: Some(Duration::from_secs(30)) };
        assert_eq!(manager.watchdog_interval(), Some(Duration::from_secs(15)));
        assert_eq!(ServiceManager { notifier: None, watchdog: None }.watchdog_interval(), None);
    }
}
