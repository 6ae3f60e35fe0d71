//! systemd's notify protocol (`sd_notify`): the relay tells the service manager when it is
//! ready, reloading and stopping, and pings its watchdog. With `Type=notify` a unit that
//! depends on the relay starts only once mail is accepted, `systemctl status` shows what the
//! relay is doing, and a relay whose runtime hangs is restarted (`WatchdogSec=`).
//!
//! Nothing happens when `NOTIFY_SOCKET` is unset, as when the relay runs from a shell.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The service manager's notification socket, from the environment the relay started with.
#[derive(Debug)]
pub struct ServiceManager {
    socket: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl ServiceManager {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. An address that cannot be
    /// used is logged once and notifications are off.
    pub fn from_env() -> ServiceManager {
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        let socket = var("NOTIFY_SOCKET").and_then(|address| match socket_for(&address) {
            Ok(socket) => Some(socket),
            Err(e) => {
                tracing::warn!(address, error = %e, "NOTIFY_SOCKET cannot be used; the service manager is not told of readiness");
                None
            }
        });
        // The watchdog is this process's only if WATCHDOG_PID, when set, names it.
        let ours = var("WATCHDOG_PID").is_none_or(|pid| pid == std::process::id().to_string());
        let watchdog = var("WATCHDOG_USEC")
            .filter(|_| ours && socket.is_some())
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|usec| *usec > 0)
            .map(Duration::from_micros);
        ServiceManager { socket, watchdog }
    }

    /// The relay accepts mail; `status` says where.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// A reload starts (SIGHUP); [`ServiceManager::ready`] follows when it is done, applied
    /// or refused.
    pub fn reloading(&self) {
        // systemd matches a reload to its request by the monotonic clock (systemd 253 on).
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
        self.send(&format!("RELOADING=1\nSTATUS=reloading the configuration\nMONOTONIC_USEC={usec}"));
    }

    /// Shutdown starts: no new mail, deliveries in flight finishing.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping: letting deliveries in flight finish");
    }

    /// How often to ping the watchdog (half its timeout, as sd_watchdog_enabled advises), if
    /// the service manager keeps one.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    /// Tells the watchdog the relay is alive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    fn send(&self, state: &str) {
        if let Some((socket, address)) = &self.socket
            && let Err(e) = socket.send_to_addr(state.as_bytes(), address)
        {
            tracing::warn!(error = %e, "could not notify the service manager");
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

    #[test]
    fn notifications_reach_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let name = format!("mxrelay-test-{}", std::process::id());
        for (address, listener) in [
            (path.display().to_string(), UnixDatagram::bind(&path).expect("bind")),
            (format!("@{name}"), UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).expect("name")).expect("bind")),
        ] {
            listener.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            let (socket, target) = socket_for(&address).expect("usable");
            let manager = ServiceManager { socket: Some((socket, target)), watchdog: None };
            manager.ready("accepting mail on 127.0.0.1:25");
            assert_eq!(receive(&listener), "READY=1\nSTATUS=accepting mail on 127.0.0.1:25");
            manager.reloading();
            let reloading = receive(&listener);
            assert!(reloading.starts_with("RELOADING=1\n"), "{reloading}");
            let usec = reloading.lines().find_map(|l| l.strip_prefix("MONOTONIC_USEC=")).expect("MONOTONIC_USEC");
            assert!(usec.parse::<u64>().is_ok_and(|u| u > 0), "{reloading}");
            manager.stopping();
            assert!(receive(&listener).starts_with("STOPPING=1\n"));
        }
    }

    #[test]
    fn an_address_of_another_kind_is_refused() {
        assert!(socket_for("vsock:2:1234").is_err());
        assert!(socket_for("relative/path").is_err());
    }

    #[test]
    fn the_watchdog_is_pinged_at_half_its_timeout() {
        let manager = ServiceManager { socket: None, watchdog: Some(Duration::from_secs(30)) };
        assert_eq!(manager.watchdog_interval(), Some(Duration::from_secs(15)));
        assert_eq!(ServiceManager { socket: None, watchdog: None }.watchdog_interval(), None);
    }
}
