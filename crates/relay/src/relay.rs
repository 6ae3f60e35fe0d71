//! `mxrelay run`: the listeners, the queue, the scheduler and the deliverer, wired together,
//! and the check that they are alive ([`check_alive`]).

use std::sync::{Arc, RwLock};

use crate::tls::TlsAcceptor;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::delivery::Deliverer;
use crate::health::Health;
use crate::inbound::{self, Inbound};
use crate::outbound::Transport;
use crate::policies::Policies;
use crate::queue::{Queue, QueueError};
use crate::scheduler::{Event, RetryPolicy, Scheduler};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The queue could not be opened.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The admin address could not be bound.
    #[error("cannot serve the admin API on {addr}: {source}{}", bind_hint(*addr, source))]
    Admin {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A configured source address for delivery is not one of this machine's.
    #[error("{key} = \"{ip}\" cannot be used as a source address: {source}")]
    SourceAddress {
        /// The setting.
        key: &'static str,
        /// The address.
        ip: std::net::IpAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}{}", bind_hint(*addr, source))]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What the operator can do about a listen address that could not be bound.
fn bind_hint(addr: std::net::SocketAddr, error: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    let kind = error.kind();
    if kind == ErrorKind::PermissionDenied && addr.port() < 1024 {
        " (ports below 1024 need root or CAP_NET_BIND_SERVICE, which contrib/systemd/mxrelay.service grants)"
    } else if kind == ErrorKind::AddrInUse {
        " (another process listens there: another mxrelay, or the system's MTA on port 25?)"
    } else if kind == ErrorKind::AddrNotAvailable {
        " (the address is not one of this machine's)"
    } else {
        ""
    }
}

/// Refuses to start with a source address this machine does not have: every connection
/// from it would fail, and each server would be marked down in turn.
fn check_source_addresses(delivery: &crate::config::DeliveryConfig) -> Result<(), StartError> {
    use std::net::IpAddr;
    let sources = [
        ("delivery.bind_address", delivery.bind_address.map(IpAddr::V4)),
        ("delivery.bind_address6", delivery.bind_address6.map(IpAddr::V6)),
    ];
    for (key, ip) in sources {
        if let Some(ip) = ip {
            let socket = if ip.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
            socket.and_then(|s| s.bind(std::net::SocketAddr::new(ip, 0))).map_err(|source| StartError::SourceAddress {
                key,
                ip,
                source,
            })?;
        }
    }
    Ok(())
}

/// A part of the relay that did not answer a liveness check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unresponsive {
    /// The queue's writer: intake's path to the disk.
    #[error("the queue's writer did not answer")]
    QueueWriter,
    /// The scheduler: delivery.
    #[error("the scheduler did not answer")]
    Scheduler,
}

/// Whether a relay whose parts all answer takes new mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// It takes new mail.
    Ready,
    /// New mail gets `452 4.3.1`: the queue cannot store it (a full disk), for this reason.
    /// It clears by itself once the queue's index can be written again.
    Refusing(String),
}

/// Whether the queue's writer and the scheduler each answer within `within` (more than a
/// running process or a listening socket shows), and whether new mail would be stored. The
/// service manager's watchdog takes any answer as alive; `GET /healthz` reports all three.
pub async fn check_alive(
    queue: &Queue,
    events: &mpsc::UnboundedSender<Event>,
    within: std::time::Duration,
) -> Result<Readiness, Unresponsive> {
    let readiness = match tokio::time::timeout(within, queue.ping()).await {
        Ok(Ok(None)) => Readiness::Ready,
        Ok(Ok(Some(why))) => Readiness::Refusing(why),
        Ok(Err(_)) | Err(_) => return Err(Unresponsive::QueueWriter),
    };
    let (answer, answered) = tokio::sync::oneshot::channel();
    events.send(Event::Ping(answer)).map_err(|_| Unresponsive::Scheduler)?;
    match tokio::time::timeout(within, answered).await {
        Ok(Ok(())) => Ok(readiness),
        Ok(Err(_)) | Err(_) => Err(Unresponsive::Scheduler),
    }
}

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    config: Arc<RwLock<Config>>,
    policies: Arc<RwLock<Arc<Policies>>>,
    inbound: Arc<Inbound>,
    transport: Arc<Transport>,
    listeners: Vec<tokio::task::JoinHandle<()>>,
    /// The admin listener's address, when `admin_listen` is set.
    pub admin: Option<std::net::SocketAddr>,
    /// Send events to the scheduler (retry now, snapshots).
    pub events: mpsc::UnboundedSender<Event>,
    /// The durable queue.
    pub queue: Queue,
    /// The addresses actually listened on (useful with port 0).
    pub listening: Vec<std::net::SocketAddr>,
    /// Set once shutdown starts (`/healthz` answers `503` from then on).
    stopping: Arc<std::sync::atomic::AtomicBool>,
    /// Held while the configuration's server lists change: by the admin API's `PUT` and by
    /// a reload, so that neither undoes the other's change half-way.
    server_lists: Arc<tokio::sync::Mutex<()>>,
}

/// Starts the relay with `policies` and the STARTTLS acceptor `tls` loaded from `config`
/// ([`crate::tls::acceptor`]): opens the queue (resuming what it holds), binds the listeners
/// and starts delivering. Runs until the process ends.
pub async fn start(config: &Config, policies: Policies, tls: Option<TlsAcceptor>) -> Result<Relay, StartError> {
    static METRICS: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> = std::sync::OnceLock::new();
    let metrics = METRICS.get_or_init(crate::admin::install_metrics).clone();
    check_source_addresses(&config.delivery)?;
    let (queue, existing) = Queue::open(&config.relay.queue)?;
    if !existing.is_empty() {
        tracing::info!(queued = existing.len(), "resuming queued mail");
    }
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let health = Health::new(config.delivery.probe_interval, events_tx.clone());
    let transport = Arc::new(Transport::new(&config.relay.hostname, &config.delivery));
    transport.close_idle_in_time();
    let engine = policies.engine().clone();
    let policies = Arc::new(RwLock::new(Arc::new(policies)));
    let shared_config = Arc::new(RwLock::new(config.clone()));
    watch_modules(shared_config.clone(), policies.clone(), engine);
    let deliverer = Arc::new(Deliverer::new(policies.clone(), transport.clone(), health, config.delivery.concurrency_per_server));
    let retry = RetryPolicy {
        schedule: config.delivery.retry.clone(),
        max_lifetime: config.delivery.max_queue_lifetime,
        delay_warning: config.delivery.delay_warning,
        hostname: config.relay.hostname.clone(),
    };
    let scheduler = Scheduler::new(existing, config.delivery.workers, deliverer, queue.clone(), retry, events_tx.clone());
    tokio::spawn(scheduler.run(events_rx));

    let domains = crate::inbound::intake_domains(&config.domains);
    let inbound = Arc::new(Inbound::new(config.relay.clone(), tls, domains, queue.clone(), events_tx.clone()));
    let mut listening = Vec::new();
    let mut listeners = Vec::new();
    for &addr in &config.relay.listen {
        let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr, source })?;
        listening.push(listener.local_addr().unwrap_or(addr));
        listeners.push(tokio::spawn(inbound::serve(listener, inbound.clone())));
    }
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server_lists = Arc::new(tokio::sync::Mutex::new(()));
    let admin = match config.relay.admin_listen {
        Some(addr) => {
            let state = crate::admin::AdminState {
                metrics,
                config: shared_config.clone(),
                policies: policies.clone(),
                events: events_tx.clone(),
                gauged_domains: Arc::default(),
                server_lists: server_lists.clone(),
                queue: queue.clone(),
                transport: transport.clone(),
                stopping: stopping.clone(),
            };
            Some(crate::admin::serve(addr, state).await.map_err(|source| StartError::Admin { addr, source })?)
        }
        None => None,
    };
    Ok(Relay {
        config: shared_config,
        policies,
        inbound,
        transport,
        listeners,
        admin,
        events: events_tx,
        queue,
        listening,
        stopping,
        server_lists,
    })
}

impl Relay {
    /// Waits until no `PUT` of a server list is under way and keeps others out until the
    /// guard is dropped: taken around [`Relay::reload`].
    pub async fn hold_server_lists(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.server_lists.clone().lock_owned().await
    }

    /// Applies a changed configuration: domains (and their holds), server lists, policies and
    /// their settings, intake limits and `accept_from`, the admin token, the TLS certificates
    /// (the relay's, its client certificate) and each domain's TLS. Queued and in-flight mail
    /// is untouched. If any policy fails to load, nothing changes and the problems come back.
    /// Returns notes about settings that only a restart applies.
    pub fn reload(&self, next: Config) -> Result<Vec<String>, Vec<crate::config::ConfigProblem>> {
        let engine = self.policies.read().unwrap_or_else(std::sync::PoisonError::into_inner).engine().clone();
        let fresh = Policies::load_with(engine, &next)?;
        // Certificate files are read again, so a renewed certificate takes effect on SIGHUP.
        let tls = crate::tls::acceptor(&next.relay).map_err(|p| vec![p])?;
        let mut notes = Vec::new();
        {
            let current = self.config.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let restart = |key: &str, changed: bool| changed.then(|| format!("{key} changed: it takes effect after a restart"));
            notes.extend(restart("relay.listen", current.relay.listen != next.relay.listen));
            notes.extend(restart("relay.queue", current.relay.queue != next.relay.queue));
            notes.extend(restart("relay.admin_listen", current.relay.admin_listen != next.relay.admin_listen));
            notes.extend(restart("[delivery]", restart_only(&current.delivery) != restart_only(&next.delivery)));
        }
        let domains = crate::inbound::intake_domains(&next.domains);
        self.inbound.reconfigure(next.relay.clone(), tls, domains);
        *self.policies.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(fresh);
        *self.config.write().unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        Ok(notes)
    }

    /// Stops accepting, lets deliveries in flight finish for at most `grace`, writes the
    /// queue out, and closes the idle connections to servers with QUIT. Whatever was not
    /// delivered stays queued for the next start. Returns whether the deliveries in flight
    /// finished in time.
    pub async fn shutdown(self, grace: std::time::Duration) -> bool {
        self.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
        for l in &self.listeners {
            l.abort();
        }
        let (done, finished) = tokio::sync::oneshot::channel();
        let _ = self.events.send(Event::Drain(done));
        let in_time = tokio::time::timeout(grace, finished).await.is_ok();
        let _ = self.queue.flush().await;
        self.transport.close_all_idle().await;
        in_time
    }
}

/// `[delivery]` as far as only a restart applies it: the client certificate is loaded with
/// the policies, so a reload applies it (and reads renewed files).
fn restart_only(delivery: &crate::config::DeliveryConfig) -> String {
    let mut delivery = delivery.clone();
    delivery.tls_client_cert = None;
    delivery.tls_client_key = None;
    format!("{delivery:?}")
}

/// How often policy module files are checked for replacement.
const MODULE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Modification time and size of every policy module the config uses.
fn module_stamps(config: &Config) -> Vec<(std::path::PathBuf, Option<(std::time::SystemTime, u64)>)> {
    let mut paths: Vec<_> = config
        .domains
        .iter()
        .filter_map(|d| match &d.policy {
            crate::config::PolicySource::Module(p) => Some(p.clone()),
            crate::config::PolicySource::Builtin => None,
        })
        .collect();
    paths.sort();
    paths.dedup();
    paths
        .into_iter()
        .map(|p| {
            let stamp = std::fs::metadata(&p).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
            (p, stamp)
        })
        .collect()
}

/// Reloads the policies when a module file is replaced. The new set replaces the old one
/// in one step; a module that fails to load or to accept its settings is refused and the
/// previous one stays in service.
fn watch_modules(config: Arc<RwLock<Config>>, policies: Arc<RwLock<Arc<Policies>>>, engine: mxrelay_policy_host::PolicyEngine) {
    let current = move || config.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let mut last = module_stamps(&current());
    if last.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(MODULE_CHECK);
        loop {
            tick.tick().await;
            let config = current();
            let now = module_stamps(&config);
            if now == last {
                continue;
            }
            last = now;
            let started = std::time::Instant::now();
            match Policies::load_with(engine.clone(), &config) {
                Ok(fresh) => {
                    *policies.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(fresh);
                    metrics::counter!("mxrelay_policy_reloads_total").increment(1);
                    tracing::info!(took = ?started.elapsed(), "policy modules reloaded");
                }
                Err(problems) => {
                    metrics::counter!("mxrelay_policy_reload_failures_total").increment(1);
                    for p in problems {
                        tracing::error!(problem = %p, "policy module refused; the previous one stays in service");
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn not_alive_when_the_scheduler_has_stopped_or_does_not_answer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (queue, _) = Queue::open(dir.path()).expect("open");
        let within = Duration::from_secs(5);
        // A scheduler that answers.
        let (events, mut inbox) = mpsc::unbounded_channel();
        let scheduler = tokio::spawn(async move {
            while let Some(event) = inbox.recv().await {
                if let Event::Ping(answer) = event {
                    let _ = answer.send(());
                }
            }
        });
        assert_eq!(check_alive(&queue, &events, within).await, Ok(Readiness::Ready));
        // One that has stopped.
        scheduler.abort();
        let _ = scheduler.await;
        assert_eq!(check_alive(&queue, &events, within).await, Err(Unresponsive::Scheduler));
        // One that takes the ping and never answers.
        let (events, _inbox) = mpsc::unbounded_channel();
        assert_eq!(check_alive(&queue, &events, Duration::from_millis(50)).await, Err(Unresponsive::Scheduler));
        queue.close();
    }

    #[test]
    fn a_listen_address_that_cannot_be_bound_says_what_to_do() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let listen = |addr: std::net::SocketAddr| match std::net::TcpListener::bind(addr) {
            Ok(_) => panic!("{addr} was bound"),
            Err(source) => StartError::Listen { addr, source }.to_string(),
        };
        let in_use = listen(addr);
        assert!(in_use.starts_with(&format!("cannot listen on {addr}: ")) && in_use.contains("another mxrelay"), "{in_use}");
        let foreign = listen("192.0.2.1:2525".parse().expect("addr"));
        assert!(foreign.ends_with("(the address is not one of this machine's)"), "{foreign}");
        // The tests may run as root, which may bind port 25: the OS's answer to anyone else.
        let low: std::net::SocketAddr = "0.0.0.0:25".parse().expect("addr");
        let denied = StartError::Admin { addr: low, source: std::io::ErrorKind::PermissionDenied.into() }.to_string();
        assert!(denied.contains("CAP_NET_BIND_SERVICE"), "{denied}");
        let high: std::net::SocketAddr = "0.0.0.0:2525".parse().expect("addr");
        let plain = StartError::Listen { addr: high, source: std::io::ErrorKind::PermissionDenied.into() }.to_string();
        assert!(!plain.contains('('), "no hint that does not apply: {plain}");
    }
}
