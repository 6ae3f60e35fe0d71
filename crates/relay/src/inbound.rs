//! Receiving mail from the filtering tier over ESMTP.
//!
//! Only clients in `accept_from` may connect, only recipients in configured domains (and the
//! relay's own postmaster, to `relay.postmaster`) are accepted (no relaying), and `250` after
//! DATA is sent only once the message is durable in the queue. While the queue's disk hangs
//! or is full, new transactions are refused at MAIL.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indexmap::IndexSet;
use smtp_proto::Request;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use crate::config::{Cidr, RelayConfig};
use crate::data::address::{address_literal, parse_command, smtp_path, unwritable};
use crate::data::{DataEnd, header_summary, read_data, rfc5322_date};
use crate::data_memory::DataMemory;
use crate::dsn::{DsnRequest, RcptDsn};
use crate::queue::{Envelope, Queue, format_id, now_ms};
use crate::scheduler::Event;

mod data_deadline;
use data_deadline::{Counted, MIN_DATA_RATE, in_time};

/// The queue's disk hangs ([`Queue::stalled_for`]): a new transaction is refused at MAIL, so
/// its sender takes the mail elsewhere or later instead of waiting on the disk too. Mail whose
/// data is in waits for its `250`: refusing it then could have it delivered twice.
fn queue_stalled(peer: SocketAddr, stalled: Duration) -> String {
    tracing::warn!(%peer, stalled_s = stalled.as_secs(), "the queue's disk is not answering; answered 451 to MAIL");
    metrics::counter!("mxrelay_inbound_refused_total", "reason" => "queue_stalled").increment(1);
    format!("451 4.3.0 the queue's disk has not answered for {} s, try again later", stalled.as_secs())
}

/// The queue refuses new mail (a full disk: [`Queue::refusing`]): refused at MAIL, as Postfix
/// does when its queue's disk is short of room, rather than after the client sent the data.
fn queue_full(peer: SocketAddr) -> &'static str {
    tracing::warn!(%peer, "the queue cannot store new mail now; answered 452 to MAIL");
    metrics::counter!("mxrelay_inbound_refused_total", "reason" => "queue_full").increment(1);
    "452 4.3.1 insufficient system storage: the queue cannot store new mail now, try again later"
}

/// A message there is no memory for now (`max_data_in_memory`), at MAIL by its SIZE or after
/// its data: logged, counted, and the reply, with which the client tries again later.
fn no_room(peer: SocketAddr, settings: &RelayConfig, memory: &DataMemory) -> &'static str {
    tracing::warn!(%peer, limit = settings.max_data_in_memory, held = memory.held(), "no room for a message arriving now (max_data_in_memory); answered 452");
    metrics::counter!("mxrelay_inbound_refused_total", "reason" => "max_data_in_memory").increment(1);
    "452 4.3.1 insufficient system storage: too much mail arriving at once, try again later"
}
/// Longest command line accepted (RFC 5321 §4.5.3.1.4 says 512; extensions make it longer).
const MAX_COMMAND_LINE: usize = 4096;
/// Bad commands tolerated before the session is closed.
const MAX_ERRORS: u32 = 20;
/// Per connection, in bytes. Tokio zero-fills a read buffer when it is made, and a client
/// such as `smtp-source` opens one connection per message: at 64 KiB that fill was about 1 %
/// of the relay's CPU. 16 KiB still reads a pipelined command group or DATA in large pieces.
const READ_BUFFER: usize = 16 * 1024;
/// Per connection, in bytes. Replies are short; a long pipelined group's go out in several
/// writes.
const WRITE_BUFFER: usize = 4 * 1024;

/// The domains mail is accepted for, each with whether its mail is held on arrival.
pub type IntakeDomains = HashMap<String, bool>;

/// The intake view of `domains`.
pub fn intake_domains(domains: &[crate::config::DomainConfig]) -> IntakeDomains {
    domains.iter().map(|d| (d.name.clone(), d.hold)).collect()
}

/// What every session needs.
pub struct Inbound {
    /// `[relay]` settings; a reload replaces them for new sessions.
    relay: std::sync::RwLock<Arc<RelayConfig>>,
    /// Domains we accept mail for (lower case), each with whether its mail is held on arrival.
    domains: std::sync::RwLock<Arc<IntakeDomains>>,
    /// The durable queue.
    pub queue: Queue,
    /// Where accepted envelopes are announced.
    pub events: mpsc::UnboundedSender<Event>,
    /// STARTTLS, when `tls_cert`/`tls_key` are set; a reload re-reads the files.
    tls: std::sync::RwLock<Option<TlsAcceptor>>,
    connections: Mutex<Connections>,
    /// Message data arriving now, bounded by `max_data_in_memory`.
    data_memory: DataMemory,
}

/// Open connections: in all, and per client address.
#[derive(Debug, Default)]
struct Connections {
    total: u32,
    per_client: HashMap<IpAddr, u32>,
}

/// Why a connection was not taken.
enum ConnectionRefusal {
    /// `max_connections` are open.
    Total,
    /// `max_connections_per_client` are open from this client.
    Client,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound").field("relay", &self.relay).field("queue", &self.queue).finish_non_exhaustive()
    }
}

impl Inbound {
    /// Session settings over `queue`.
    pub fn new(
        relay: RelayConfig,
        tls: Option<TlsAcceptor>,
        domains: IntakeDomains,
        queue: Queue,
        events: mpsc::UnboundedSender<Event>,
    ) -> Inbound {
        Inbound {
            relay: std::sync::RwLock::new(Arc::new(relay)),
            domains: std::sync::RwLock::new(Arc::new(domains)),
            queue,
            events,
            tls: std::sync::RwLock::new(tls),
            connections: Mutex::default(),
            data_memory: DataMemory::default(),
        }
    }

    /// The `[relay]` settings in force.
    pub fn settings(&self) -> Arc<RelayConfig> {
        self.relay.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Applies reloaded settings and domains to new sessions and recipients.
    pub fn reconfigure(&self, relay: RelayConfig, tls: Option<TlsAcceptor>, domains: IntakeDomains) {
        *self.relay.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(relay);
        *self.tls.write().unwrap_or_else(std::sync::PoisonError::into_inner) = tls;
        *self.domains.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(domains);
    }

    fn tls_acceptor(&self) -> Option<TlsAcceptor> {
        self.tls.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn accepts_domain(&self, domain: &str) -> bool {
        self.domains.read().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(domain)
    }

    /// Whether mail for `domain` is held on arrival (`hold = true` in its config).
    fn holds_on_arrival(&self, domain: &str) -> bool {
        self.domains.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(domain).is_some_and(|hold| *hold)
    }

    /// Counts a connection from `ip`, unless `max_connections` are open, or
    /// `max_connections_per_client` from `ip`.
    fn open_connection(self: &Arc<Self>, ip: IpAddr, settings: &RelayConfig) -> Result<ConnectionSlot, ConnectionRefusal> {
        let mut open = self.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if open.total >= settings.max_connections {
            return Err(ConnectionRefusal::Total);
        }
        let count = open.per_client.entry(ip).or_insert(0);
        if *count >= settings.max_connections_per_client {
            return Err(ConnectionRefusal::Client);
        }
        *count += 1;
        open.total += 1;
        metrics::gauge!("mxrelay_inbound_connections").set(f64::from(open.total));
        Ok(ConnectionSlot { inbound: self.clone(), ip })
    }
}

struct ConnectionSlot {
    inbound: Arc<Inbound>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.inbound.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        open.total -= 1;
        metrics::gauge!("mxrelay_inbound_connections").set(f64::from(open.total));
        if let Some(c) = open.per_client.get_mut(&self.ip) {
            *c -= 1;
            if *c == 0 {
                open.per_client.remove(&self.ip);
            }
        }
    }
}

/// Accepts connections on `listener` forever.
pub async fn serve(listener: TcpListener, inbound: Arc<Inbound>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let inbound = inbound.clone();
        tokio::spawn(async move {
            if let Err(e) = session(stream, peer, inbound).await {
                tracing::debug!(%peer, error = %e, "session ended with an I/O error");
            }
        });
    }
}

/// RCPT parameters of the extensions offered: DSN's `NOTIFY` (`ORCPT` is a field of its own).
const RCPT_DSN_FLAGS: u64 = smtp_proto::RCPT_NOTIFY_SUCCESS
    | smtp_proto::RCPT_NOTIFY_FAILURE
    | smtp_proto::RCPT_NOTIFY_DELAY
    | smtp_proto::RCPT_NOTIFY_NEVER;

/// The first MAIL parameter of an extension the relay does not offer (RFC 5321 §4.1.1.11:
/// `555`). Accepting one silently would promise what the relay does not do: `REQUIRETLS`,
/// for one, asks that the message never travel in clear.
fn unoffered_mail_parameter(from: &smtp_proto::MailFrom<std::borrow::Cow<'_, str>>) -> Option<&'static str> {
    use smtp_proto::*;
    let flags = [
        (MAIL_BODY_BINARYMIME, "BODY=BINARYMIME"),
        (MAIL_REQUIRETLS, "REQUIRETLS"),
        (MAIL_CONPERM, "CONPERM"),
        (MAIL_BY_NOTIFY | MAIL_BY_RETURN | MAIL_BY_TRACE, "BY"),
    ];
    let fields = [
        (from.trans_id.is_some(), "TRANSID"),
        (from.by != 0, "BY"),
        (from.solicit.is_some(), "SOLICIT"),
        (from.mtrk.is_some(), "MTRK"),
        (from.auth.is_some(), "AUTH"),
        (from.hold_for != 0 || from.hold_until != 0, "HOLDFOR/HOLDUNTIL"),
        (from.mt_priority != 0, "MT-PRIORITY"),
    ];
    flags
        .into_iter()
        .map(|(bits, name)| (from.flags & bits != 0, name))
        .chain(fields)
        .find_map(|(given, name)| given.then_some(name))
}

async fn reply<W: AsyncWrite + Unpin>(w: &mut W, text: &str) -> std::io::Result<()> {
    w.write_all(text.as_bytes()).await?;
    w.write_all(b"\r\n").await
}

#[derive(Default)]
struct Transaction {
    sender: Option<String>,
    /// In the order given, each mailbox once.
    recipients: IndexSet<String>,
    /// The first recipient as the client addressed it, for the `Received:` field's FOR
    /// clause: the relay's postmaster is named, not the mailbox that gets its mail.
    first_addressed: Option<String>,
    /// RFC 3461 parameters of MAIL and RCPT, when any were given.
    dsn: Option<DsnRequest>,
}

/// The local part as written when a `RCPT` line's path is `<postmaster>` in any case, after
/// any source route (`<@hop:postmaster>`, which RFC 5321 §4.1.2 says to ignore).
fn bare_postmaster(line: &[u8]) -> Option<&str> {
    let line = std::str::from_utf8(line).ok()?;
    let path = &line[line.find('<')? + 1..];
    let path = &path[..path.find('>')?];
    let local = path.rsplit_once(':').map_or(path, |(_, local)| local);
    local.eq_ignore_ascii_case("postmaster").then_some(local)
}

/// The reply to a RCPT for the relay's own postmaster (`given` as the client wrote it), who
/// gets the mail at the mailbox `relay.postmaster` names, if it names one.
fn rcpt_postmaster(txn: &mut Transaction, settings: &RelayConfig, given: &str, dsn: Option<RcptDsn>) -> &'static str {
    match &settings.postmaster {
        Some(mailbox) => {
            // Reports name the address the sender gave (RFC 3461 §4.2).
            let mut dsn = dsn.unwrap_or_default();
            dsn.orcpt.get_or_insert_with(|| given.to_string());
            // The bare form is the postmaster at the relay's own name.
            let local = given.rsplit_once('@').map_or(given, |(local, _)| local);
            txn.add_recipient(mailbox.clone(), format!("{local}@{}", settings.hostname), Some(dsn));
            "250 2.1.5 recipient ok"
        }
        None => "550 5.1.1 no postmaster mailbox is configured here (relay.postmaster)",
    }
}

impl Transaction {
    /// A mailbox named twice gets the message once (Postfix's cleanup and Exim drop duplicate
    /// recipients too), with its first parameters.
    fn add_recipient(&mut self, mailbox: String, addressed: String, dsn: Option<RcptDsn>) {
        self.first_addressed.get_or_insert(addressed);
        if let Some(dsn) = dsn
            && !self.recipients.contains(&mailbox)
        {
            self.dsn.get_or_insert_default().recipients.insert(mailbox.clone(), dsn);
        }
        self.recipients.insert(mailbox);
    }
}

/// One client connection, before and after STARTTLS.
struct Session<'a> {
    inbound: &'a Arc<Inbound>,
    settings: Arc<RelayConfig>,
    peer: SocketAddr,
    /// Protocol and cipher once TLS is active, for the Received header and logs.
    tls: Option<String>,
}

/// Why a conversation stopped.
enum SessionEnd {
    /// QUIT, an error that closes, or the client went away.
    Closed,
    /// `220` was sent to STARTTLS: the handshake comes next.
    StartTls,
}

async fn session(mut stream: TcpStream, peer: SocketAddr, inbound: Arc<Inbound>) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    // Borrowed halves: owned ones would `shutdown` the socket before it is closed anyway,
    // one more system call per connection.
    let (read, write) = stream.split();
    let mut reader = BufReader::with_capacity(READ_BUFFER, read);
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER, write);
    // One snapshot of the settings for the whole connection, even across a reload.
    let settings = inbound.settings();
    let hostname = settings.hostname.clone();
    let ip = peer.ip();
    if !settings.accept_from.iter().any(|c: &Cidr| c.contains(ip)) {
        tracing::warn!(%peer, "client not in accept_from; refused");
        metrics::counter!("mxrelay_inbound_refused_total", "reason" => "accept_from").increment(1);
        reply(&mut writer, &format!("554 5.7.1 {ip} is not allowed to send mail through {hostname}")).await?;
        return writer.flush().await;
    }
    let _slot = match inbound.open_connection(ip, &settings) {
        Ok(slot) => slot,
        Err(refusal) => {
            let (reason, text) = match refusal {
                ConnectionRefusal::Total => {
                    tracing::warn!(%peer, limit = settings.max_connections, "max_connections reached; connection refused");
                    ("max_connections", format!("421 4.3.2 {hostname} too many connections, try again later"))
                }
                ConnectionRefusal::Client => (
                    "max_connections_per_client",
                    format!("421 4.7.0 {hostname} too many connections from {ip}, try again later"),
                ),
            };
            metrics::counter!("mxrelay_inbound_refused_total", "reason" => reason).increment(1);
            reply(&mut writer, &text).await?;
            return writer.flush().await;
        }
    };
    // Early talkers: a client that sends before the greeting is not speaking SMTP in step
    // (Exim's "synchronization error", Postfix postscreen's pregreet test). With
    // `greet_pause` 0 this only catches input that is already there.
    if let Ok(Ok(early)) = tokio::time::timeout(settings.greet_pause, reader.fill_buf()).await
        && !early.is_empty()
    {
        tracing::warn!(%peer, "input before the greeting; closing");
        reply(&mut writer, "554 5.5.0 protocol synchronization error: input sent before the greeting").await?;
        return writer.flush().await;
    }
    reply(&mut writer, &format!("220 {hostname} ESMTP mxrelay")).await?;
    writer.flush().await?;

    let acceptor = inbound.tls_acceptor();
    let mut session = Session { inbound: &inbound, settings, peer, tls: None };
    match converse(&session, &mut reader, &mut writer, acceptor.is_some()).await? {
        SessionEnd::Closed => Ok(()),
        SessionEnd::StartTls => {
            let Some(acceptor) = acceptor else { return Ok(()) };
            // `converse` refused STARTTLS with input behind it, so no plaintext is carried
            // over into the encrypted session (RFC 3207 §6, CVE-2011-0411).
            drop((reader, writer));
            let handshake = tokio::time::timeout(session.settings.idle_timeout, acceptor.accept(stream)).await;
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "TLS handshake failed");
                    return Ok(());
                }
                Err(_) => {
                    tracing::info!(%peer, "TLS handshake timed out");
                    return Ok(());
                }
            };
            session.tls = Some(crate::tls::describe(tls.get_ref().1));
            tracing::debug!(%peer, tls = session.tls.as_deref().unwrap_or(""), "TLS established");
            metrics::counter!("mxrelay_inbound_tls_sessions_total").increment(1);
            let (read, write) = tokio::io::split(tls);
            let mut reader = BufReader::with_capacity(READ_BUFFER, read);
            let mut writer = BufWriter::with_capacity(WRITE_BUFFER, write);
            converse(&session, &mut reader, &mut writer, false).await.map(|_| ())
        }
    }
}

/// The command loop. After STARTTLS the client starts again from EHLO (RFC 3207 §4.2), so
/// the encrypted session is a fresh conversation.
async fn converse<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    session: &Session<'_>,
    reader: &mut BufReader<R>,
    writer: &mut BufWriter<W>,
    offer_tls: bool,
) -> std::io::Result<SessionEnd> {
    let Session { inbound, settings, peer, .. } = session;
    let peer = *peer;
    let hostname = &settings.hostname;
    let idle = settings.idle_timeout;
    let mut helo: Option<String> = None;
    let mut txn = Transaction::default();
    let mut errors = 0u32;
    let mut line = Vec::with_capacity(512);
    loop {
        line.clear();
        let read =
            tokio::time::timeout(idle, (&mut *reader).take(MAX_COMMAND_LINE as u64 + 1).read_until(b'\n', &mut line)).await;
        let n = match read {
            Err(_) => {
                reply(writer, &format!("421 4.4.2 {hostname} idle for {}s, closing", idle.as_secs())).await?;
                writer.flush().await?;
                return Ok(SessionEnd::Closed);
            }
            Ok(r) => r?,
        };
        if n == 0 {
            return Ok(SessionEnd::Closed);
        }
        if line.last() != Some(&b'\n') {
            reply(writer, "500 5.5.6 command line too long; closing").await?;
            writer.flush().await?;
            return Ok(SessionEnd::Closed);
        }
        let mut scratch = Vec::new();
        let parsed = parse_command(&line, &mut scratch);
        let mut quit = false;
        match parsed {
            Ok(Request::Ehlo { host }) => {
                helo = Some(host.to_string());
                txn = Transaction::default();
                let max = settings.max_message_size;
                let starttls = if offer_tls { "250-STARTTLS\r\n" } else { "" };
                reply(
                    writer,
                    &format!(
                        "250-{hostname}\r\n250-PIPELINING\r\n250-SIZE {max}\r\n250-8BITMIME\r\n{starttls}250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8"
                    ),
                )
                .await?;
            }
            Ok(Request::Helo { host }) => {
                helo = Some(host.to_string());
                txn = Transaction::default();
                reply(writer, &format!("250 {hostname}")).await?;
            }
            Ok(Request::Mail { from }) => {
                if helo.is_none() {
                    reply(writer, "503 5.5.1 say EHLO first").await?;
                } else if settings.require_tls && session.tls.is_none() {
                    reply(writer, "530 5.7.0 must issue a STARTTLS command first").await?;
                } else if txn.sender.is_some() {
                    reply(writer, "503 5.5.1 nested MAIL command").await?;
                } else if let Some(stalled) = inbound.queue.stalled_for() {
                    reply(writer, &queue_stalled(peer, stalled)).await?;
                } else if inbound.queue.refusing() {
                    reply(writer, queue_full(peer)).await?;
                } else if from.size as u64 > settings.max_message_size {
                    reply(
                        writer,
                        &format!("552 5.3.4 message size {} exceeds the limit of {} bytes", from.size, settings.max_message_size),
                    )
                    .await?;
                } else if inbound.data_memory.would_refuse(from.size as u64, settings.max_data_in_memory) {
                    // RFC 1870 §6.1: no room for a message of this size at the moment.
                    reply(writer, no_room(peer, settings, &inbound.data_memory)).await?;
                } else if let Some(param) = unoffered_mail_parameter(&from) {
                    reply(writer, &format!("555 5.5.4 {param} is not supported")).await?;
                } else if let Some(why) = unwritable(&from.address) {
                    // Taken, it could not be sent on as it came.
                    reply(writer, &format!("501 5.1.7 sender address: {why}")).await?;
                } else {
                    match DsnRequest::from_mail(from.flags, from.env_id.as_deref()) {
                        Ok(dsn) => {
                            txn.sender = Some(from.address.to_string());
                            txn.dsn = dsn;
                            reply(writer, "250 2.1.0 sender ok").await?;
                        }
                        Err(e) => reply(writer, &format!("501 5.5.4 {e}")).await?,
                    }
                }
            }
            Ok(Request::Rcpt { to }) => {
                let address = to.address.to_string();
                let mailbox = address.rsplit_once('@').map(|(local, d)| (local, d.trim_end_matches('.').to_ascii_lowercase()));
                if txn.sender.is_none() {
                    reply(writer, "503 5.5.1 need MAIL before RCPT").await?;
                } else if txn.recipients.len() >= settings.max_recipients as usize {
                    reply(writer, &format!("452 4.5.3 too many recipients (limit {})", settings.max_recipients)).await?;
                } else if to.flags & !RCPT_DSN_FLAGS != 0 || to.rrvs != 0 {
                    reply(writer, "555 5.5.4 only the NOTIFY and ORCPT parameters are supported").await?;
                } else if let Some(why) = unwritable(&address) {
                    reply(writer, &format!("501 5.1.3 recipient address: {why}")).await?;
                } else {
                    let dsn = RcptDsn::from_rcpt(to.flags, to.orcpt.as_deref());
                    match (mailbox, dsn) {
                        (_, Err(e)) => reply(writer, &format!("501 5.5.4 {e}")).await?,
                        (Some((local, d)), Ok(dsn)) if inbound.accepts_domain(&d) => {
                            // Local parts keep their case: they may be case-sensitive.
                            let mailbox = format!("{local}@{d}");
                            txn.add_recipient(mailbox.clone(), mailbox, dsn);
                            reply(writer, "250 2.1.5 recipient ok").await?;
                        }
                        // The relay's own postmaster: at the name it greets with, or bare
                        // (RFC 5321 §4.5.1), which the parser reads as the null path, so the
                        // line tells them apart.
                        (Some((local, d)), Ok(dsn)) if d == *hostname && local.eq_ignore_ascii_case("postmaster") => {
                            reply(writer, rcpt_postmaster(&mut txn, settings, &address, dsn)).await?;
                        }
                        (None, Ok(dsn)) if let Some(given) = bare_postmaster(&line) => {
                            reply(writer, rcpt_postmaster(&mut txn, settings, given, dsn)).await?;
                        }
                        (Some((_, d)), Ok(_)) => {
                            tracing::info!(%peer, rcpt = %address, "relaying denied");
                            reply(writer, &format!("550 5.7.1 relaying denied: {hostname} does not accept mail for {d}")).await?;
                        }
                        (None, Ok(_)) => reply(writer, "501 5.1.3 the null path <> is not a recipient").await?,
                    }
                }
            }
            Ok(Request::Data) => {
                if txn.sender.is_none() {
                    reply(writer, "503 5.5.1 need MAIL before DATA").await?;
                } else if txn.recipients.is_empty() {
                    reply(writer, "554 5.5.1 no valid recipients").await?;
                } else if !reader.buffer().is_empty() {
                    // RFC 2920: DATA ends a pipelined group; the client must wait for 354.
                    // Content sent before it is a desynchronised (or smuggling) client.
                    tracing::warn!(%peer, "data pipelined before the 354; closing");
                    reply(writer, "554 5.5.0 improper command pipelining after DATA; closing").await?;
                    writer.flush().await?;
                    return Ok(SessionEnd::Closed);
                } else {
                    reply(writer, "354 end data with <CR><LF>.<CR><LF>").await?;
                    writer.flush().await?;
                    let answer = receive_message(reader, session, helo.as_deref().unwrap_or(""), &txn).await?;
                    txn = Transaction::default();
                    match answer {
                        DataAnswer::Reply(text) => reply(writer, &text).await?,
                        DataAnswer::Gone => return Ok(SessionEnd::Closed),
                        DataAnswer::Late => {
                            let limit = format!("{}s quiet or {MIN_DATA_RATE} bytes/s", settings.idle_timeout.as_secs());
                            reply(writer, &format!("421 4.4.2 {hostname} the message data was late ({limit}), closing")).await?;
                            writer.flush().await?;
                            return Ok(SessionEnd::Closed);
                        }
                    }
                }
            }
            Ok(Request::Rset) => {
                txn = Transaction::default();
                reply(writer, "250 2.0.0 reset").await?;
            }
            Ok(Request::Noop { .. }) => reply(writer, "250 2.0.0 ok").await?,
            Ok(Request::Quit) => {
                reply(writer, &format!("221 2.0.0 {hostname} closing")).await?;
                quit = true;
            }
            Ok(Request::Vrfy { .. }) => reply(writer, "252 2.5.0 cannot verify, but will accept and attempt delivery").await?,
            Ok(Request::Bdat { .. }) => reply(writer, "502 5.5.1 CHUNKING is not offered; use DATA").await?,
            Ok(Request::StartTls) if session.tls.is_some() => reply(writer, "503 5.5.1 TLS is already active").await?,
            Ok(Request::StartTls) if !offer_tls => reply(writer, "502 5.5.1 STARTTLS is not configured").await?,
            Ok(Request::StartTls) => {
                if !reader.buffer().is_empty() {
                    // Commands pipelined behind STARTTLS would be read as if sent encrypted
                    // (the STARTTLS command injection of CVE-2011-0411): refuse them all.
                    tracing::warn!(%peer, "input pipelined after STARTTLS; closing");
                    reply(writer, "554 5.5.0 improper command pipelining after STARTTLS; closing").await?;
                    writer.flush().await?;
                    return Ok(SessionEnd::Closed);
                }
                reply(writer, "220 2.0.0 ready to start TLS").await?;
                writer.flush().await?;
                return Ok(SessionEnd::StartTls);
            }
            Ok(
                Request::Lhlo { .. }
                | Request::Auth { .. }
                | Request::Expn { .. }
                | Request::Help { .. }
                | Request::Etrn { .. }
                | Request::Atrn { .. }
                | Request::Burl { .. },
            ) => {
                errors += 1;
                reply(writer, "502 5.5.1 command not implemented").await?;
            }
            Err(e) => {
                errors += 1;
                let text = match e {
                    smtp_proto::Error::UnknownCommand => "500 5.5.2 unknown command".to_string(),
                    smtp_proto::Error::SyntaxError { syntax } => {
                        format!("501 5.5.4 syntax: {syntax}")
                    }
                    smtp_proto::Error::InvalidSenderAddress => "501 5.1.7 bad sender address syntax".to_string(),
                    smtp_proto::Error::InvalidRecipientAddress => "501 5.1.3 bad recipient address syntax".to_string(),
                    smtp_proto::Error::InvalidParameter { param } => {
                        format!("501 5.5.4 invalid parameter {param}")
                    }
                    smtp_proto::Error::UnsupportedParameter { param } => {
                        format!("555 5.5.4 unsupported parameter {param}")
                    }
                    smtp_proto::Error::NeedsMoreData { .. }
                    | smtp_proto::Error::ResponseTooLong
                    | smtp_proto::Error::InvalidResponse { .. } => "500 5.5.2 syntax error".to_string(),
                };
                reply(writer, &text).await?;
            }
        }
        if errors >= MAX_ERRORS {
            reply(writer, "421 4.7.0 too many errors, closing").await?;
            quit = true;
        }
        // PIPELINING: answer in one write once the client's pipelined commands are consumed.
        if quit || reader.buffer().is_empty() {
            writer.flush().await?;
        }
        if quit {
            return Ok(SessionEnd::Closed);
        }
    }
}

/// How receiving a message's data ended.
enum DataAnswer {
    /// The reply to the final dot (or to data that could not be taken).
    Reply(String),
    /// The client went away mid-data.
    Gone,
    /// The data was late ([`in_time`]).
    Late,
}

/// Reads the data, queues one envelope per recipient domain, and returns the reply.
async fn receive_message<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    session: &Session<'_>,
    helo: &str,
    txn: &Transaction,
) -> std::io::Result<DataAnswer> {
    let Session { inbound, settings, peer, tls } = session;
    let peer = *peer;
    // RFC 3848: ESMTPS for mail received over TLS.
    let (with, tls_clause) = match tls {
        Some(t) => ("ESMTPS", format!(" (using {t})")),
        None => ("ESMTP", String::new()),
    };
    let received_ms = now_ms();
    let first_id = inbound.queue.next_id();
    let for_clause = match &txn.first_addressed {
        Some(one) if txn.recipients.len() == 1 => format!("\r\n\tfor <{}>", smtp_path(one)),
        _ => String::new(),
    };
    let header = format!(
        "Received: from {helo} ({ip})\r\n\tby {host} (mxrelay) with {with}{tls_clause} id {id}{for_clause};\r\n\t{date}\r\n",
        ip = address_literal(peer.ip()),
        host = settings.hostname,
        id = format_id(first_id),
        date = rfc5322_date(received_ms / 1000),
    );
    // The buffer's capacity is this message's share of `max_data_in_memory`, given back when
    // the message is queued or refused.
    let mut share = inbound.data_memory.share(settings.max_data_in_memory);
    // Room for most messages at once: one ask, not one per doubling from a few bytes.
    let first = header.len() + 8 * 1024;
    let admitted = share.resize(first);
    let mut data = Vec::with_capacity(if admitted { first } else { header.len() });
    data.extend_from_slice(header.as_bytes());
    let room = |capacity| (admitted || capacity == 0) && share.resize(capacity);
    let limit = settings.max_message_size + header.len() as u64;
    let received = std::sync::atomic::AtomicU64::new(0);
    let mut counted = Counted::new(reader, &received);
    let (end, fixed) = match in_time(read_data(&mut counted, &mut data, limit, room), &received, settings.idle_timeout).await {
        None => {
            tracing::info!(%peer, "the message data was late; closing");
            return Ok(DataAnswer::Late);
        }
        Some(r) => r?,
    };
    match end {
        DataEnd::Eof => return Ok(DataAnswer::Gone),
        DataEnd::TooLarge => {
            return Ok(DataAnswer::Reply(format!("552 5.3.4 message exceeds the limit of {} bytes", settings.max_message_size)));
        }
        DataEnd::NoRoom => return Ok(DataAnswer::Reply(no_room(peer, settings, &inbound.data_memory).into())),
        DataEnd::Complete => {}
    }
    // RFC 5321 §6.3: a message that has been through this many MTAs is going round in circles
    // (a customer server forwarding back to the filtering service, say). Refused, so the
    // client reports it, instead of being delivered round the loop again.
    let headers = header_summary(&data[header.len()..]);
    let hops = headers.received;
    if hops > settings.max_hops as usize {
        tracing::warn!(%peer, hops, limit = settings.max_hops, "refused: too many Received: fields, a mail loop");
        return Ok(DataAnswer::Reply(format!(
            "554 5.4.6 too many hops: {hops} Received: fields (limit {}); a mail loop?",
            settings.max_hops
        )));
    }
    if fixed.bare_lf > 0 || fixed.stray_cr > 0 {
        tracing::info!(%peer, bare_lf = fixed.bare_lf, stray_cr = fixed.stray_cr, "normalised non-CRLF line ends");
    }
    // The buffer grew by doubling: up to half of it is spare, and the data may stay in memory
    // until its first delivery.
    data.shrink_to_fit();
    share.resize(data.capacity());
    let data = Arc::new(data);
    let sender = txn.sender.clone().unwrap_or_default();
    let mut by_domain: Vec<(String, Vec<String>)> = Vec::new();
    for rcpt in &txn.recipients {
        let domain = rcpt.rsplit_once('@').map_or("", |(_, d)| d).to_string();
        match by_domain.iter_mut().find(|(d, _)| *d == domain) {
            Some((_, list)) => list.push(rcpt.clone()),
            None => by_domain.push((domain, vec![rcpt.clone()])),
        }
    }
    let envelopes: Vec<Envelope> = by_domain
        .into_iter()
        .enumerate()
        .map(|(i, (domain, recipients))| Envelope {
            id: if i == 0 { first_id } else { inbound.queue.next_id() },
            dsn: txn.dsn.as_ref().and_then(|d| d.for_recipients(&recipients)),
            sender: sender.clone(),
            recipients,
            received_ms,
            attempts: 0,
            next_attempt_ms: received_ms,
            last_error: None,
            size: data.len() as u64,
            warned: false,
            // Decided before `domain` moves into the envelope.
            held: inbound.holds_on_arrival(&domain),
            domain,
        })
        .collect();
    let items = envelopes.iter().map(|e| (e.clone(), data.clone())).collect();
    match inbound.queue.insert(items).await {
        Ok(()) => {
            metrics::counter!("mxrelay_accepted_total").increment(1);
            for env in envelopes.iter().filter(|e| e.held) {
                tracing::info!(queue_id = %env.queue_id(), domain = env.domain, "held on arrival (the domain's hold = true)");
            }
            let message_id = headers.message_id.as_deref().unwrap_or_default();
            tracing::info!(queue_id = %format_id(first_id), %peer, sender, message_id, rcpts = txn.recipients.len(), size = data.len(), "accepted");
            let _ = inbound.events.send(Event::Accepted(envelopes, data.clone()));
            Ok(DataAnswer::Reply(format!("250 2.0.0 queued as {}", format_id(first_id))))
        }
        Err(e) => {
            tracing::error!(%peer, error = %e, "could not queue message; answered 452");
            Ok(DataAnswer::Reply("452 4.3.1 insufficient system storage, try again later".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bare_postmaster;

    #[test]
    fn only_the_path_postmaster_is_the_bare_postmaster() {
        assert_eq!(bare_postmaster(b"RCPT TO:<PostMaster>\r\n"), Some("PostMaster"));
        assert_eq!(bare_postmaster(b"rcpt to: <@hop.example:postmaster> NOTIFY=NEVER\r\n"), Some("postmaster"));
        // The null path and other forms the parser also reads as empty are not postmaster.
        for line in
            [&b"RCPT TO:<>\r\n"[..], b"RCPT TO:<postmaster@>\r\n", b"RCPT TO:<postmasters>\r\n", b"RCPT TO:postmaster\r\n"]
        {
            assert_eq!(bare_postmaster(line), None, "{}", String::from_utf8_lossy(line));
        }
    }
}
