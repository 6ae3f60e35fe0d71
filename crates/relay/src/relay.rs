//! `mxrelay run`: the listeners, the queue, the scheduler and the deliverer, wired together.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

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
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    /// Send events to the scheduler (retry now, snapshots).
    pub events: mpsc::UnboundedSender<Event>,
    /// The durable queue.
    pub queue: Queue,
    /// The addresses actually listened on (useful with port 0).
    pub listening: Vec<std::net::SocketAddr>,
}

/// Starts the relay: opens the queue (resuming what it holds), binds the listeners and
/// starts delivering. Runs until the process ends.
pub async fn start(config: &Config, policies: Policies) -> Result<Relay, StartError> {
    let (queue, existing) = Queue::open(&config.relay.queue)?;
    if !existing.is_empty() {
        tracing::info!(queued = existing.len(), "resuming queued mail");
    }
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (recovered_tx, mut recovered_rx) = mpsc::unbounded_channel::<String>();
    let health = Health::new(config.delivery.probe_interval, recovered_tx);
    let transport = Arc::new(Transport::new(&config.relay.hostname, &config.delivery));
    let policies = Arc::new(RwLock::new(Arc::new(policies)));
    let deliverer = Arc::new(Deliverer::new(policies, transport, health, config.delivery.concurrency_per_server));
    let retry = RetryPolicy { schedule: config.delivery.retry.clone(), max_lifetime: config.delivery.max_queue_lifetime };
    let scheduler = Scheduler::new(existing, config.delivery.workers, deliverer, queue.clone(), retry, events_tx.clone());
    tokio::spawn(scheduler.run(events_rx));
    let forward = events_tx.clone();
    tokio::spawn(async move {
        while let Some(server) = recovered_rx.recv().await {
            let _ = forward.send(Event::Recovered(server));
        }
    });

    let domains: HashSet<String> = config.domains.iter().map(|d| d.name.clone()).collect();
    let inbound = Arc::new(Inbound::new(config.relay.clone(), domains, queue.clone(), events_tx.clone()));
    let mut listening = Vec::new();
    for &addr in &config.relay.listen {
        let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr, source })?;
        listening.push(listener.local_addr().unwrap_or(addr));
        tokio::spawn(inbound::serve(listener, inbound.clone()));
    }
    Ok(Relay { events: events_tx, queue, listening })
}
