//! One SMTP transaction with one customer server, and what its outcome means.
//!
//! The taxonomy follows Exim's "Errors in outgoing SMTP" and Postfix's `smtp_trouble.c`:
//! * connection refused or timed out, no `220` greeting (a refusal, or silence until the
//!   command timeout), or no reply to EHLO → [`ServerVerdict::Unreachable`]: try the next
//!   server now, and mark this one down, so later messages do not wait for it again;
//! * EHLO failure (a `5xx` to EHLO gets HELO and no extensions), `421`, connection lost
//!   before the final `.`, a reply of the wrong kind to MAIL or DATA →
//!   [`ServerVerdict::SessionFailed`]: try the next server now;
//! * `4xx` to MAIL or DATA → [`ServerVerdict::TempFailed`]: next server, then defer;
//! * `5xx` to MAIL or DATA → [`ServerVerdict::PermFailed`]: the message fails;
//! * a `RCPT` reply decides for that recipient alone ([`RcptVerdict`] in [`ServerVerdict::Completed`]);
//! * no reply to the final `.`, or one neither `2xx`, `4xx` nor `5xx` → [`ServerVerdict::Unknown`]:
//!   defer, possibly delivered twice.
//!
//! Replies count by their first digit (`ReplyKind`), so an unexpected one never bounces mail.
//!
//! The sender's DSN requests go on to a server that offers DSN (`RET` and `ENVID` on MAIL,
//! `NOTIFY` and `ORCPT` on each RCPT); the verdict says whether it did, since a server without
//! DSN leaves the success reports to the relay.
//!
//! TLS follows the domain's `tls` mode: a server that does not offer STARTTLS, refuses it or
//! fails the handshake is a failed session when TLS is required, and is used in clear when it
//! is opportunistic. Nothing is sent in clear on a connection meant to be encrypted.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hickory_resolver::ResolveError;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use mail_send::SmtpClient;
use mxrelay_policy_core::{HostKind, Server};
use smtp_proto::{EXT_8BIT_MIME, EXT_DSN, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8, EXT_START_TLS, Response};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::config::{DeliveryConfig, TlsMode};
use crate::data::address::smtp_path;
use crate::data::dot_stuff_window;
use crate::dsn::DsnRequest;
use crate::tls::OutboundTls;

mod server_test;
pub use server_test::{
    AddressTest, ServerTest, TestEnvelope, TestResult, render as render_server_tests, report as server_tests_json, test_servers,
};

/// How long a server's reply to QUIT is awaited before the connection is closed anyway.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most messages sent over one connection before it is closed.
const MAX_REUSE: u32 = 500;
/// How long a connection is reused at most (Postfix `smtp_connection_reuse_time_limit`), so a
/// busy server's changed DNS records take effect: a reused connection skips the lookup.
const MAX_REUSE_AGE: Duration = Duration::from_secs(300);
/// Most addresses tried for one host name (Postfix `smtp_mx_address_limit` counts per MX).
const MAX_ADDRESSES: usize = 10;

/// The order in which a host name's addresses are tried, at most `limit` of them: IPv4 first,
/// then IPv6, each in the resolver's order (the two lookups answer in either order). Past the
/// limit both families keep a share, so a name with many A records still gets its IPv6
/// addresses tried (Postfix's `smtp_balance_inet_protocols`).
fn address_order(ips: impl Iterator<Item = IpAddr>, limit: usize) -> Vec<IpAddr> {
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = ips.partition(IpAddr::is_ipv4);
    let v6_kept = v6.len().min(limit.saturating_sub(v4.len()).max(limit / 2));
    let v4_kept = v4.len().min(limit - v6_kept);
    v4.into_iter().take(v4_kept).chain(v6.into_iter().take(v6_kept)).collect()
}

/// How many of `v4` IPv4 addresses lead [`address_order`] whatever the AAAA answer: IPv6 keeps
/// at most half the limit while IPv4 needs more, so the first half (rounded up) are IPv4's.
fn ipv4_lead(v4: usize, limit: usize) -> usize {
    v4.min(limit - limit / 2)
}

/// How many of `v6` IPv6 addresses [`address_order`] keeps whatever the A answer: at least
/// half the limit (rounded down) is IPv6's when it has that many.
fn ipv6_kept(v6: usize, limit: usize) -> usize {
    v6.min(limit / 2)
}

/// How long an AAAA answer that came first waits for the A answer before its addresses are
/// tried (RFC 8305 §3, "Resolution Delay").
const RESOLUTION_DELAY: Duration = Duration::from_millis(50);

/// One family's lookup, on a task of its own.
type Lookup = tokio::task::JoinHandle<Result<Vec<IpAddr>, ResolveError>>;

fn lookup(resolver: &TokioResolver, name: &str, v6: bool) -> Lookup {
    let (resolver, name) = (resolver.clone(), name.to_string());
    tokio::spawn(async move {
        Ok(if v6 {
            resolver.ipv6_lookup(name).await?.iter().map(|aaaa| IpAddr::V6(aaaa.0)).collect()
        } else {
            resolver.ipv4_lookup(name).await?.iter().map(|a| IpAddr::V4(a.0)).collect()
        })
    })
}

/// A lookup's answer; a task that failed is a failed lookup.
fn answer(joined: Result<Result<Vec<IpAddr>, ResolveError>, tokio::task::JoinError>) -> Result<Vec<IpAddr>, ResolveError> {
    joined.unwrap_or_else(|e| Err(ResolveError::from(format!("lookup task: {e}"))))
}

/// A server's addresses (IPv4 first, as `address_order` puts them), handed out as they
/// become known. Both lookups run at once, and neither family waits for the other's answer
/// longer than it must: when the A answer comes first, its IPv4 addresses that lead the
/// order whatever the AAAA answer holds are tried before that answer is awaited; when the
/// AAAA answer comes first, it waits [`RESOLUTION_DELAY`] for the A answer, then its IPv6
/// addresses that every order keeps are tried. So a resolver that drops one family's queries
/// (some middleboxes drop AAAA) holds up only that family's tries, not the resolver's
/// timeout per message.
#[derive(Debug)]
pub struct Addresses {
    port: u16,
    /// The order known so far: all of it, or while `pending` is set, the addresses tried
    /// whatever the late answer holds.
    order: Vec<IpAddr>,
    given: usize,
    pending: Option<Pending>,
}

/// The lookup not yet awaited, with the other family's answer the full order is made from.
#[derive(Debug)]
struct Pending {
    known: Vec<IpAddr>,
    lookup: Lookup,
    /// `A` or `AAAA`, for the log.
    kind: &'static str,
}

impl Addresses {
    fn literal(addr: SocketAddr) -> Addresses {
        Addresses { port: addr.port(), order: vec![addr.ip()], given: 0, pending: None }
    }

    fn known(port: u16, ips: impl Iterator<Item = IpAddr>) -> Addresses {
        Addresses { port, order: address_order(ips, MAX_ADDRESSES), given: 0, pending: None }
    }

    /// One family answered first with `first` (not empty); the other's answer is `late`. The
    /// addresses every full order tries, whatever `late` holds, are handed out meanwhile.
    fn first_answer(port: u16, first: Vec<IpAddr>, late: Lookup) -> Addresses {
        let v6_first = first.first().is_some_and(IpAddr::is_ipv6);
        let (lead, kind) =
            if v6_first { (ipv6_kept(first.len(), MAX_ADDRESSES), "A") } else { (ipv4_lead(first.len(), MAX_ADDRESSES), "AAAA") };
        let order = first[..lead].to_vec();
        Addresses { port, order, given: 0, pending: Some(Pending { known: first, lookup: late, kind }) }
    }

    /// Looks `host` up: returns once one family's answer has an address to try first (see
    /// [`Addresses`]), or once both answers are in.
    async fn resolve(resolver: &TokioResolver, host: &str, port: u16) -> Result<Addresses, String> {
        let name = format!("{host}.");
        let (mut a, mut aaaa) = (lookup(resolver, &name, false), lookup(resolver, &name, true));
        let (v4, v6) = tokio::select! {
            joined = &mut a => {
                let v4 = answer(joined);
                match v4 {
                    Ok(v4) if !v4.is_empty() => return Ok(Addresses::first_answer(port, v4, aaaa)),
                    v4 => (v4, answer(aaaa.await)),
                }
            }
            joined = &mut aaaa => {
                match answer(joined) {
                    Ok(v6) if !v6.is_empty() => match tokio::time::timeout(RESOLUTION_DELAY, &mut a).await {
                        Ok(joined) => (answer(joined), Ok(v6)),
                        Err(_) => return Ok(Addresses::first_answer(port, v6, a)),
                    },
                    v6 => (answer(a.await), v6),
                }
            }
        };
        match (v4, v6) {
            (Ok(v4), Ok(v6)) if !v4.is_empty() || !v6.is_empty() => Ok(Addresses::known(port, v4.into_iter().chain(v6))),
            // As hickory's own two-family lookup: one family's failure leaves the other's.
            (Ok(found), Err(_)) | (Err(_), Ok(found)) if !found.is_empty() => Ok(Addresses::known(port, found.into_iter())),
            (Err(e), _) | (_, Err(e)) if !e.is_no_records_found() => Err(format!("DNS lookup of {host} failed: {e}")),
            (Ok(_) | Err(_), Ok(_) | Err(_)) => Err(format!("{host} has no A or AAAA record")),
        }
    }

    /// The next address to try, if any is left.
    pub async fn next(&mut self) -> Option<SocketAddr> {
        if self.given == self.order.len()
            && let Some(Pending { known, lookup, kind }) = self.pending.take()
        {
            let found = match answer(lookup.await) {
                Ok(found) => found,
                Err(e) => {
                    tracing::debug!(error = %e, "{kind} lookup failed; the other family's addresses only");
                    Vec::new()
                }
            };
            // Those tried stay tried; the rest follow in the full order.
            let full = address_order(known.into_iter().chain(found), MAX_ADDRESSES);
            let rest: Vec<IpAddr> = full.into_iter().filter(|ip| !self.order.contains(ip)).collect();
            self.order.extend(rest);
        }
        let ip = *self.order.get(self.given)?;
        self.given += 1;
        Some(SocketAddr::new(ip, self.port))
    }
}

impl Drop for Addresses {
    fn drop(&mut self) {
        // Delivered over the family that answered first: the other answer is not needed,
        // and a dropped query would keep its task (and its retries) alive until the
        // resolver's timeout.
        if let Some(pending) = &self.pending {
            pending.lookup.abort();
        }
    }
}

/// What a server said to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptVerdict {
    /// Accepted (and the data was accepted after it).
    Delivered,
    /// `4xx`: try again, elsewhere or later.
    TempRejected(String),
    /// `452`, or `552 5.5.3`, after another recipient was accepted: the server's limit on
    /// recipients per transaction (RFC 5321 §4.5.3.1.10, which also asks a client to take a
    /// `552` for it as temporary). The recipient goes to the same server in another
    /// transaction, at once.
    OverLimit(String),
    /// `5xx`: this recipient fails.
    PermRejected(String),
}

/// Whether a RCPT reply is the server's recipient limit (see [`RcptVerdict::OverLimit`]).
/// `552` alone is also "exceeded storage allocation", which fails for good; its enhanced
/// code tells them apart (RFC 3463: `5.5.3` too many recipients).
fn over_limit(r: &Response<String>) -> bool {
    r.code == 452 || (r.code == 552 && r.esc == [5, 5, 3])
}

/// What one server did with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerVerdict {
    /// The transaction ended with an answer per recipient (the data was accepted for those
    /// marked delivered; when none was accepted no data was sent).
    Completed {
        /// One verdict per recipient offered.
        rcpts: Vec<RcptVerdict>,
        /// The reply to the final `.`.
        reply: String,
        /// The server offered DSN, so the sender's requests went on with the message and
        /// reports of its further fate are the server's to send.
        dsn_offered: bool,
    },
    /// None of its addresses gave a session: the connection was refused or timed out, or the
    /// server did not greet with `220` (it refused, or said nothing until the command
    /// timeout), or did not answer EHLO. Next server; mark it down.
    Unreachable(String),
    /// A session was open but failed before the final `.`: next server.
    SessionFailed(String),
    /// A session was open, then the server went silent before the final `.`: no reply
    /// within the command timeout, or none of the data taken for the data timeout. It would
    /// stall the next message too: next server; mark it down.
    Stalled(String),
    /// No reply to the final `.` within the data timeout: defer as [`ServerVerdict::Unknown`]
    /// (the server may have the message), and mark the server down as one that stalled.
    StalledAfterDot(String),
    /// `4xx` to MAIL or DATA (or every RCPT `4xx`): next server, then defer.
    TempFailed(String),
    /// `5xx` to MAIL or DATA (or every RCPT `5xx`): the message fails.
    PermFailed(String),
    /// The connection was lost after the final `.`, or the reply to it is neither yes nor
    /// no: defer; the server may have the message.
    Unknown(String),
}

impl ServerVerdict {
    /// Whether the server answered: a trial delivery to a server that stalled brings it back.
    pub fn answered(&self) -> bool {
        match self {
            ServerVerdict::Completed { .. }
            | ServerVerdict::SessionFailed(_)
            | ServerVerdict::TempFailed(_)
            | ServerVerdict::PermFailed(_)
            | ServerVerdict::Unknown(_) => true,
            ServerVerdict::Unreachable(_) | ServerVerdict::Stalled(_) | ServerVerdict::StalledAfterDot(_) => false,
        }
    }
}

/// A message as handed to a server.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// Envelope sender (empty for `<>`).
    pub sender: &'a str,
    /// Recipients to offer.
    pub recipients: &'a [String],
    /// Canonical message data (CRLF line ends, not dot-stuffed).
    pub data: &'a [u8],
    /// The sender's DSN requests, passed on to a server that offers DSN.
    pub dsn: Option<&'a DsnRequest>,
}

/// The TLS a delivery asks for, and the name the server's certificate must carry.
#[derive(Debug, Clone, Copy)]
struct TlsTarget<'a> {
    /// The domain's TLS settings.
    settings: &'a OutboundTls,
    /// The server's host name or IP literal, as configured.
    host: &'a str,
}

/// A transaction's result, or a reused connection that turned out to be closed.
enum Attempt {
    Verdict(ServerVerdict),
    Stale(String),
}

/// The server replied to nothing in this transaction.
enum NoReply {
    /// The connection closed or failed: on a reused connection, most likely closed while idle.
    Lost(String),
    /// The connection stayed open, and the server silent until the command timeout.
    Silent(String),
}

impl NoReply {
    fn from_error(e: &mail_send::Error, waited_for: &str, timeout: Duration) -> NoReply {
        if matches!(e, mail_send::Error::Timeout) {
            NoReply::Silent(format!("no reply to {waited_for} within {timeout:?}"))
        } else {
            NoReply::Lost(error_text(e))
        }
    }
}

/// A connection to a server, in clear or after STARTTLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

struct Session {
    client: SmtpClient<Conn>,
    /// The address connected to.
    addr: SocketAddr,
    opened: Instant,
    capabilities: u32,
    sent: u32,
    /// Protocol and cipher when the session is encrypted.
    tls: Option<String>,
}

/// Why STARTTLS did not give an encrypted session.
enum StartTlsFailure {
    /// The server answered STARTTLS with an error; the session goes on in clear.
    Refused(SmtpClient<TcpStream>, String),
    /// The handshake (or the EHLO after it) failed; the connection is gone.
    Broken(String),
}

/// Idle connections are kept per server (`host:port`) and per TLS settings. Keyed by the
/// server rather than its address, a reused connection needs no DNS lookup (as Postfix's
/// connection cache by next hop), and a session verified against a host name serves only it.
type PoolKey = (String, Arc<str>);

fn pool_key(server: &Server, tls: &OutboundTls) -> PoolKey {
    (server.address(), tls.pool_key().clone())
}

/// Ends a session as RFC 5321 §4.1.1.10 asks: QUIT, then the server's reply, then the close
/// (for TLS with its close_notify), so that the server logs a clean end.
async fn quit(mut s: Session) {
    let _ = tokio::time::timeout(QUIT_TIMEOUT, async {
        if s.client.stream.write_all(b"QUIT\r\n").await.is_ok() && s.client.stream.flush().await.is_ok() {
            let _ = s.client.read().await;
            let _ = s.client.stream.shutdown().await;
        }
    })
    .await;
}

/// Whether a greeting or an EHLO or HELO reply starts with `hostname` (this relay's): the
/// server is this relay (or another of the same name, the filtering tier itself), and mail
/// sent there would come back, round after round until the hop limit bounced it.
fn names_host(reply: &str, hostname: &str) -> bool {
    let name = reply.split_whitespace().next().unwrap_or_default();
    name.trim_end_matches('.').eq_ignore_ascii_case(hostname)
}

/// Whether a connection may carry another message.
fn reusable(sent: u32, age: Duration) -> bool {
    sent < MAX_REUSE && age < MAX_REUSE_AGE
}

/// Resolves servers, keeps idle connections and runs transactions.
pub struct Transport {
    hostname: String,
    resolver: Option<TokioResolver>,
    connect_timeout: Duration,
    command_timeout: Duration,
    data_timeout: Duration,
    bind_address: Option<Ipv4Addr>,
    bind_address6: Option<Ipv6Addr>,
    /// How long an idle connection is kept for reuse.
    cache_time: Duration,
    idle: Arc<Idle>,
    /// Held (shared) by each RSET running in the background, so that tests can wait for them.
    resets: Arc<tokio::sync::RwLock<()>>,
}

/// Idle connections by server and TLS setting, each with when it became idle.
type Idle = Mutex<HashMap<PoolKey, Vec<(Session, Instant)>>>;

/// Keeps `session` in `idle` for the next message to its server, or ends it if it has
/// carried enough.
fn keep_idle(idle: &Idle, key: &PoolKey, session: Session) {
    if !reusable(session.sent, session.opened.elapsed()) {
        tokio::spawn(quit(session));
        return;
    }
    let mut idle = idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    idle.entry(key.clone()).or_default().push((session, Instant::now()));
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("hostname", &self.hostname).finish_non_exhaustive()
    }
}

/// What a reply code says, by its first digit (RFC 5321 4.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyKind {
    /// `2xx`: done.
    Positive,
    /// `3xx`: go on (DATA's `354`).
    Intermediate,
    /// `4xx`: not now.
    Transient,
    /// `5xx`: never.
    Permanent,
    /// Any other code. RFC 5321 4.2.1: a client should treat it as a fatal error and end the
    /// transaction, so it never counts as an answer either way.
    OutOfRange,
}

fn reply_kind(code: u16) -> ReplyKind {
    match code / 100 {
        2 => ReplyKind::Positive,
        3 => ReplyKind::Intermediate,
        4 => ReplyKind::Transient,
        5 => ReplyKind::Permanent,
        _ => ReplyKind::OutOfRange,
    }
}

/// A reply as the server sent it, on one line. The enhanced status code (RFC 3463), which
/// mail-send parses out of the text, is put back: logs show it, and a notification's
/// `Status` is the server's (`5.1.1`), not one guessed from the reply code (`5.0.0`).
fn reply_text(r: &Response<String>) -> String {
    let message = r.message.replace(['\r', '\n'], " ");
    match r.esc {
        [0, 0, 0] => format!("{} {message}", r.code),
        [class, subject, detail] => format!("{} {class}.{subject}.{detail} {message}", r.code),
    }
}

/// How much of a message is dot-stuffed and written at a time: a small message goes in one
/// write, a large one is never copied whole.
const DATA_WINDOW: usize = 64 * 1024;

/// Sends `data` dot-stuffed, with its terminator, a window at a time. Times out (`Err`) only
/// when the server takes none of a window for `stall`: a large message to a slow server
/// takes as long as it needs while it moves (Postfix's `smtp_data_xfer_timeout` works the
/// same way).
async fn send_data<W: AsyncWrite + Unpin>(
    stream: &mut W,
    data: &[u8],
    stall: Duration,
) -> Result<std::io::Result<()>, tokio::time::error::Elapsed> {
    let mut wire = Vec::with_capacity(data.len().min(DATA_WINDOW) + 1024);
    let mut at = 0;
    loop {
        let end = (at + DATA_WINDOW).min(data.len());
        wire.clear();
        dot_stuff_window(data, at..end, &mut wire);
        let mut written = 0;
        while written < wire.len() {
            match tokio::time::timeout(stall, stream.write(&wire[written..])).await? {
                Ok(0) => return Ok(Err(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => written += n,
                Err(e) => return Ok(Err(e)),
            }
        }
        at = end;
        if at == data.len() {
            return tokio::time::timeout(stall, stream.flush()).await;
        }
    }
}

fn error_text(e: &mail_send::Error) -> String {
    match e {
        mail_send::Error::Io(io) => io.to_string(),
        mail_send::Error::Timeout => "timed out".into(),
        mail_send::Error::UnparseableReply => "connection lost or unparseable reply".into(),
        mail_send::Error::UnexpectedReply(r) => reply_text(r),
        other @ (mail_send::Error::Tls(_)
        | mail_send::Error::Base64(_)
        | mail_send::Error::Auth(_)
        | mail_send::Error::AuthenticationFailed(_)
        | mail_send::Error::InvalidTLSName
        | mail_send::Error::MissingCredentials
        | mail_send::Error::MissingMailFrom
        | mail_send::Error::MissingRcptTo
        | mail_send::Error::UnsupportedAuthMechanism
        | mail_send::Error::MissingStartTls) => other.to_string(),
    }
}

impl Transport {
    /// A transport with the configured timeouts and resolver.
    pub fn new(hostname: &str, delivery: &DeliveryConfig) -> Transport {
        let builder = match delivery.resolver {
            Some(addr) => {
                let group = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
                let config = ResolverConfig::from_parts(None, vec![], group);
                Some(TokioResolver::builder_with_config(config, TokioConnectionProvider::default()))
            }
            None => match TokioResolver::builder_tokio() {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!(error = %e, "no system DNS resolver; only IP-literal servers can be reached");
                    None
                }
            },
        };
        // Both families are asked for by `Addresses`, each on its own: hickory's two-family
        // lookup answers only once both have answered.
        let resolver = builder.map(|b| b.build());
        Transport {
            hostname: hostname.to_string(),
            resolver,
            connect_timeout: delivery.connect_timeout,
            command_timeout: delivery.command_timeout,
            data_timeout: delivery.data_timeout,
            bind_address: delivery.bind_address,
            bind_address6: delivery.bind_address6,
            cache_time: delivery.connection_cache_time,
            idle: Arc::default(),
            resets: Arc::default(),
        }
    }

    /// Closes, with QUIT, each idle connection once it has been idle for the cache time,
    /// for as long as the transport exists. Without this, a connection left idle when the
    /// traffic stops stays open until the server times it out: it holds one of the server's
    /// processes, and the server logs a timeout instead of a clean end.
    pub fn close_idle_in_time(self: &Arc<Self>) {
        let transport = Arc::downgrade(self);
        let every = (self.cache_time / 4).max(Duration::from_millis(20));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(transport) = transport.upgrade() else { return };
                let cache_time = transport.cache_time;
                for session in transport.take_idle_where(|idle_for| idle_for >= cache_time) {
                    tokio::spawn(quit(session));
                }
            }
        });
    }

    /// Closes every idle connection with QUIT (the relay is stopping).
    pub async fn close_all_idle(&self) {
        let mut closing = tokio::task::JoinSet::new();
        for session in self.take_idle_where(|_| true) {
            closing.spawn(quit(session));
        }
        closing.join_all().await;
    }

    /// Takes the idle connections whose idle time passes `test` out of the pool.
    fn take_idle_where(&self, test: impl Fn(Duration) -> bool) -> Vec<Session> {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut taken = Vec::new();
        idle.retain(|_, list| {
            let (out, kept): (Vec<_>, Vec<_>) = std::mem::take(list).into_iter().partition(|(_, since)| test(since.elapsed()));
            taken.extend(out.into_iter().map(|(session, _)| session));
            *list = kept;
            !list.is_empty()
        });
        taken
    }

    /// A TCP connection to `addr`, from the configured source address of its family.
    async fn connect(&self, addr: SocketAddr) -> mail_send::Result<SmtpClient<TcpStream>> {
        let source = match addr {
            SocketAddr::V4(_) => self.bind_address.map(IpAddr::V4),
            SocketAddr::V6(_) => self.bind_address6.map(IpAddr::V6),
        };
        match source {
            Some(ip) => SmtpClient::connect_using(ip, addr, self.connect_timeout).await,
            None => SmtpClient::connect(addr, self.connect_timeout).await,
        }
    }

    /// The addresses to try for a server, IPv4 first (see [`Addresses`]).
    pub async fn addresses(&self, server: &Server) -> Result<Addresses, String> {
        match server.kind() {
            HostKind::Ipv4 | HostKind::Ipv6 => {
                let ip: IpAddr = server.host.parse().map_err(|_| format!("bad IP literal {}", server.host))?;
                Ok(Addresses::literal(SocketAddr::new(ip, server.port)))
            }
            HostKind::Name => {
                let resolver = self.resolver.as_ref().ok_or("no DNS resolver configured")?;
                Addresses::resolve(resolver, &server.host, server.port).await
            }
        }
    }

    fn take_idle(&self, key: &PoolKey) -> Option<Session> {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = idle.get_mut(key)?;
        while let Some((session, since)) = list.pop() {
            if since.elapsed() < self.cache_time {
                return Some(session);
            }
            tokio::spawn(quit(session));
        }
        None
    }

    fn put_idle(&self, key: &PoolKey, session: Session) {
        keep_idle(&self.idle, key, session);
    }

    /// Drops every idle connection to `server` (it is being marked down).
    pub fn forget(&self, server: &Server) {
        let address = server.address();
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        idle.retain(|(to, _), _| *to != address);
    }

    /// Connects, reads the greeting and says EHLO.
    async fn greet(&self, addr: SocketAddr) -> Result<(SmtpClient<TcpStream>, u32), ServerVerdict> {
        let mut client =
            self.connect(addr).await.map_err(|e| ServerVerdict::Unreachable(format!("connect to {addr}: {}", error_text(&e))))?;
        let _ = client.stream.set_nodelay(true);
        client.timeout = self.command_timeout;
        let greeting = tokio::time::timeout(self.command_timeout, client.read())
            .await
            .map_err(|_| ServerVerdict::Unreachable(format!("{addr}: no greeting within {:?}", self.command_timeout)))?
            .map_err(|e| ServerVerdict::Unreachable(format!("{addr}: greeting: {}", error_text(&e))))?;
        // Refused or silent, it would refuse or stall the next message too: marked down, and
        // the probe, which runs this same greeting, decides when it is back.
        if greeting.code != 220 {
            return Err(ServerVerdict::Unreachable(format!("{addr}: greeting {}", reply_text(&greeting))));
        }
        if self.names_this_relay(&greeting.message) {
            return Err(self.loops_back(addr, client, "greets").await);
        }
        match client.ehlo(&self.hostname).await {
            Ok(ehlo) if self.names_this_relay(&ehlo.hostname) => Err(self.loops_back(addr, client, "answers EHLO").await),
            Ok(ehlo) => Ok((client, ehlo.capabilities)),
            // A server that does not know EHLO gets HELO and no extensions (RFC 5321 3.2), as
            // Postfix and Exim do it.
            Err(mail_send::Error::UnexpectedReply(ehlo)) if reply_kind(ehlo.code) == ReplyKind::Permanent => {
                let helo = client.cmd(format!("HELO {}\r\n", self.hostname)).await.map_err(|e| {
                    ServerVerdict::SessionFailed(format!("{addr}: EHLO {}, then HELO: {}", reply_text(&ehlo), error_text(&e)))
                })?;
                if reply_kind(helo.code) != ReplyKind::Positive {
                    let why = format!("{addr}: EHLO {}, then HELO {}", reply_text(&ehlo), reply_text(&helo));
                    return Err(ServerVerdict::SessionFailed(why));
                }
                if self.names_this_relay(&helo.message) {
                    return Err(self.loops_back(addr, client, "answers HELO").await);
                }
                Ok((client, 0))
            }
            // Greeted, then silent: as silent as one that never greets.
            Err(mail_send::Error::Timeout) => {
                Err(ServerVerdict::Unreachable(format!("{addr}: no reply to EHLO within {:?}", self.command_timeout)))
            }
            Err(e) => Err(ServerVerdict::SessionFailed(format!("{addr}: EHLO: {}", error_text(&e)))),
        }
    }

    fn names_this_relay(&self, reply: &str) -> bool {
        names_host(reply, &self.hostname)
    }

    /// Leaves a server that is this relay, and passes it over (RFC 5321 §5.1: a relay never
    /// sends to itself; Postfix's "mail for ... loops back to myself"). Not marked down: it
    /// answers, and the next server is tried now. A domain whose servers all loop keeps its
    /// mail queued, and retried, until its configuration is mended or the lifetime ends.
    async fn loops_back(&self, addr: SocketAddr, mut client: SmtpClient<TcpStream>, how: &str) -> ServerVerdict {
        let _ = client.stream.write_all(b"QUIT\r\n").await;
        let why =
            format!("{addr}: {how} with this relay's own host name {}: mail sent there would loop back here", self.hostname);
        tracing::warn!(%addr, hostname = %self.hostname, "a server is this relay itself; passed over (check the domain's servers)");
        ServerVerdict::SessionFailed(why)
    }

    /// A new session with the TLS the domain asks for, counted by how it ended up.
    async fn open(&self, addr: SocketAddr, tls: TlsTarget<'_>) -> Result<Session, ServerVerdict> {
        let opened = self.negotiate(addr, tls).await;
        let result = match &opened {
            Ok(Session { tls: Some(_), .. }) => "encrypted",
            Ok(Session { tls: None, .. }) => "clear",
            Err(_) => "failed",
        };
        metrics::counter!("mxrelay_outbound_connections_total", "result" => result).increment(1);
        opened
    }

    async fn negotiate(&self, addr: SocketAddr, tls: TlsTarget<'_>) -> Result<Session, ServerVerdict> {
        let opened = Instant::now();
        let plain = |client: SmtpClient<TcpStream>, capabilities| Session {
            client: SmtpClient { stream: Conn::Plain(client.stream), timeout: client.timeout },
            addr,
            opened,
            capabilities,
            sent: 0,
            tls: None,
        };
        let (client, capabilities) = self.greet(addr).await?;
        let offered = capabilities & EXT_START_TLS != 0;
        let failure = match (tls.settings.mode, offered) {
            (TlsMode::None, _) | (TlsMode::Opportunistic, false) => return Ok(plain(client, capabilities)),
            (TlsMode::Required, false) => {
                let mut client = client;
                let _ = client.stream.write_all(b"QUIT\r\n").await;
                return Err(ServerVerdict::SessionFailed(format!(
                    "{addr}: does not offer STARTTLS, and the domain requires TLS"
                )));
            }
            (TlsMode::Opportunistic | TlsMode::Required, true) => match self.start_tls(addr, client, tls, opened).await {
                Ok(session) => return Ok(session),
                Err(failure) => failure,
            },
        };
        match (tls.settings.mode, failure) {
            (TlsMode::Required, StartTlsFailure::Refused(mut client, why)) => {
                let _ = client.stream.write_all(b"QUIT\r\n").await;
                Err(ServerVerdict::SessionFailed(format!("{addr}: {why}, and the domain requires TLS")))
            }
            (TlsMode::Required, StartTlsFailure::Broken(why)) => {
                Err(ServerVerdict::SessionFailed(format!("{addr}: {why}, and the domain requires TLS")))
            }
            (TlsMode::None | TlsMode::Opportunistic, StartTlsFailure::Refused(client, why)) => {
                tracing::info!(%addr, why, "STARTTLS refused; delivering in clear (tls = opportunistic)");
                Ok(plain(client, capabilities))
            }
            (TlsMode::None | TlsMode::Opportunistic, StartTlsFailure::Broken(why)) => {
                // The connection is gone: a new one, in clear this time.
                tracing::info!(%addr, why, "TLS failed; delivering in clear on a new connection (tls = opportunistic)");
                let (client, capabilities) = self.greet(addr).await?;
                Ok(plain(client, capabilities))
            }
        }
    }

    /// STARTTLS, the handshake, and EHLO again (RFC 3207 §4.2: forget what was said before),
    /// on a connection made at `opened`.
    async fn start_tls(
        &self,
        addr: SocketAddr,
        mut client: SmtpClient<TcpStream>,
        tls: TlsTarget<'_>,
        opened: Instant,
    ) -> Result<Session, StartTlsFailure> {
        match client.cmd(b"STARTTLS\r\n").await {
            Ok(r) if r.code == 220 => {}
            Ok(r) => return Err(StartTlsFailure::Refused(client, format!("STARTTLS refused: {}", reply_text(&r)))),
            Err(e) => return Err(StartTlsFailure::Broken(format!("STARTTLS: {}", error_text(&e)))),
        }
        let name = crate::tls::server_name(tls.host).map_err(StartTlsFailure::Broken)?;
        let stream = tokio::time::timeout(self.command_timeout, tls.settings.connector().connect(name, client.stream))
            .await
            .map_err(|_| StartTlsFailure::Broken(format!("TLS handshake: no answer within {:?}", self.command_timeout)))?
            .map_err(|e| StartTlsFailure::Broken(format!("TLS handshake: {e}")))?;
        let described = crate::tls::describe(stream.get_ref().1);
        let mut client = SmtpClient { stream: Conn::Tls(Box::new(stream)), timeout: client.timeout };
        let ehlo = client
            .ehlo(&self.hostname)
            .await
            .map_err(|e| StartTlsFailure::Broken(format!("EHLO after STARTTLS: {}", error_text(&e))))?;
        tracing::debug!(%addr, tls = described, "TLS established");
        Ok(Session { client, addr, opened, capabilities: ehlo.capabilities, sent: 0, tls: Some(described) })
    }

    /// Offers `msg` to a server: over an idle connection to it when there is one, else to
    /// each of its addresses in turn until one is reachable.
    pub async fn send(&self, server: &Server, msg: &Outgoing<'_>, settings: &OutboundTls) -> ServerVerdict {
        let key = pool_key(server, settings);
        if let Some(session) = self.take_idle(&key) {
            let addr = session.addr;
            match self.transaction(&key, session, msg).await {
                Attempt::Verdict(verdict) => return verdict,
                // A cached connection the server has since closed: not the server's fault.
                Attempt::Stale(why) => {
                    tracing::debug!(%addr, why, "cached connection went stale; reconnecting")
                }
            }
        }
        let mut addrs = match self.addresses(server).await {
            Ok(addrs) => addrs,
            Err(why) => return ServerVerdict::Unreachable(why),
        };
        let tls = TlsTarget { settings, host: &server.host };
        let mut verdict = ServerVerdict::Unreachable(format!("{}: no address", key.0));
        while let Some(addr) = addrs.next().await {
            verdict = match self.open(addr, tls).await {
                Ok(session) => match self.transaction(&key, session, msg).await {
                    Attempt::Verdict(verdict) => verdict,
                    Attempt::Stale(why) => ServerVerdict::SessionFailed(format!("{addr}: {why}")),
                },
                Err(verdict) => verdict,
            };
            match verdict {
                ServerVerdict::Unreachable(_) => continue,
                ServerVerdict::Completed { .. }
                | ServerVerdict::SessionFailed(_)
                | ServerVerdict::Stalled(_)
                | ServerVerdict::StalledAfterDot(_)
                | ServerVerdict::TempFailed(_)
                | ServerVerdict::PermFailed(_)
                | ServerVerdict::Unknown(_) => break,
            }
        }
        verdict
    }

    async fn transaction(&self, key: &PoolKey, s: Session, msg: &Outgoing<'_>) -> Attempt {
        let (reused, addr) = (s.sent > 0, s.addr);
        match self.transaction_inner(key, s, msg).await {
            Ok(verdict) => Attempt::Verdict(verdict),
            // Silence is the server's, on a reused connection too: a closed one fails at once.
            Err(NoReply::Silent(why)) => Attempt::Verdict(ServerVerdict::Stalled(format!("{addr}: {why}"))),
            Err(NoReply::Lost(why)) if reused => Attempt::Stale(why),
            Err(NoReply::Lost(why)) => Attempt::Verdict(ServerVerdict::SessionFailed(format!("{addr}: connection lost: {why}"))),
        }
    }

    async fn transaction_inner(&self, key: &PoolKey, mut s: Session, msg: &Outgoing<'_>) -> Result<ServerVerdict, NoReply> {
        let addr = s.addr;
        let mut mail = format!("MAIL FROM:<{}>", smtp_path(msg.sender));
        if s.capabilities & EXT_SIZE != 0 {
            mail.push_str(&format!(" SIZE={}", msg.data.len()));
        }
        let eight_bit = msg.data.iter().any(|b| *b >= 0x80);
        if eight_bit && s.capabilities & EXT_8BIT_MIME != 0 {
            mail.push_str(" BODY=8BITMIME");
        }
        let utf8_envelope = !msg.sender.is_ascii() || msg.recipients.iter().any(|r| !r.is_ascii());
        if utf8_envelope {
            if s.capabilities & EXT_SMTP_UTF8 == 0 {
                return Ok(ServerVerdict::PermFailed(format!(
                    "{addr}: the address needs SMTPUTF8, which the server does not offer"
                )));
            }
            mail.push_str(" SMTPUTF8");
        }
        // RFC 3461 §4: the sender's DSN requests go on to a server that offers DSN.
        let dsn_offered = s.capabilities & EXT_DSN != 0;
        let dsn = msg.dsn.filter(|_| dsn_offered);
        if let Some(d) = dsn {
            mail.push_str(&d.mail_params());
        }
        mail.push_str("\r\n");
        let mut commands = vec![mail];
        commands.extend(msg.recipients.iter().map(|r| match dsn {
            Some(d) => format!("RCPT TO:<{}>{}\r\n", smtp_path(r), d.rcpt_params(r)),
            None => format!("RCPT TO:<{}>\r\n", smtp_path(r)),
        }));
        commands.push("DATA\r\n".into());

        let replies = if s.capabilities & EXT_PIPELINING != 0 {
            // One write for the whole pipelined group (mail-send's `cmds` writes each separately).
            let batch = commands.concat();
            let sent = tokio::time::timeout(self.command_timeout, async {
                s.client.stream.write_all(batch.as_bytes()).await?;
                s.client.stream.flush().await?;
                s.client.read_many(commands.len()).await
            })
            .await
            .unwrap_or(Err(mail_send::Error::Timeout));
            match sent {
                Ok(r) => r,
                Err(e) => return Err(NoReply::from_error(&e, "the pipelined MAIL, RCPT and DATA", self.command_timeout)),
            }
        } else {
            let mut replies = Vec::with_capacity(commands.len());
            for (i, c) in commands.iter().enumerate() {
                match s.client.cmd(c).await {
                    Ok(r) => {
                        let stop = (i == 0 && reply_kind(r.code) != ReplyKind::Positive) || (i + 1 == commands.len());
                        replies.push(r);
                        if stop {
                            break;
                        }
                    }
                    Err(e) => {
                        let verb = c.get(..4).unwrap_or(c);
                        return match NoReply::from_error(&e, verb, self.command_timeout) {
                            no_reply if i == 0 => Err(no_reply),
                            NoReply::Silent(why) => Ok(ServerVerdict::Stalled(format!("{addr}: {why}"))),
                            NoReply::Lost(why) => Ok(ServerVerdict::SessionFailed(format!("{addr}: connection lost: {why}"))),
                        };
                    }
                }
            }
            replies
        };
        if let Some(r) = replies.iter().find(|r| r.code == 421) {
            return Ok(ServerVerdict::SessionFailed(format!("{addr}: {}", reply_text(r))));
        }
        // A server out of step can refuse MAIL and still answer the pipelined DATA with `354`.
        // It then reads whatever comes next as the message, an RSET too: such a connection is
        // closed, not reset and kept.
        let awaits_data = replies.get(msg.recipients.len() + 1).is_some_and(|r| reply_kind(r.code) == ReplyKind::Intermediate);
        let mut s = match self.go_on(key, s, "MAIL", &replies[0], ReplyKind::Positive, !awaits_data) {
            Ok(s) => s,
            Err(verdict) => return Ok(verdict),
        };
        let mut accepted = false;
        let rcpts: Vec<RcptVerdict> = msg
            .recipients
            .iter()
            .enumerate()
            .map(|(i, _)| match replies.get(i + 1) {
                // Only a limit once one is in: a first recipient refused so is a server short
                // of room, as the code says.
                Some(r) if accepted && over_limit(r) => RcptVerdict::OverLimit(format!("{addr}: RCPT: {}", reply_text(r))),
                Some(r) => match reply_kind(r.code) {
                    ReplyKind::Positive => {
                        accepted = true;
                        RcptVerdict::Delivered
                    }
                    ReplyKind::Permanent => RcptVerdict::PermRejected(format!("{addr}: RCPT: {}", reply_text(r))),
                    ReplyKind::Transient | ReplyKind::Intermediate | ReplyKind::OutOfRange => {
                        RcptVerdict::TempRejected(format!("{addr}: RCPT: {}", reply_text(r)))
                    }
                },
                None => RcptVerdict::TempRejected(format!("{addr}: no RCPT reply")),
            })
            .collect();
        let data_reply = replies.get(msg.recipients.len() + 1);
        if !rcpts.contains(&RcptVerdict::Delivered) {
            // Nobody accepted: the DATA command (if sent) was refused too. Report the recipients.
            if data_reply.is_some_and(|r| reply_kind(r.code) == ReplyKind::Intermediate) {
                // A server that says 354 with no recipients: end the empty transaction cleanly.
                let _ = s.client.stream.write_all(b".\r\n").await;
                let _ = s.client.stream.flush().await;
                let _ = s.client.read().await;
            }
            self.reset(key, s);
            return Ok(ServerVerdict::Completed { rcpts, reply: String::new(), dsn_offered });
        }
        let Some(data_reply) = data_reply else {
            return Ok(ServerVerdict::SessionFailed(format!("{addr}: no reply to DATA")));
        };
        // 354, or any 3xx as Postfix takes it: send the data.
        let mut s = match self.go_on(key, s, "DATA", data_reply, ReplyKind::Intermediate, true) {
            Ok(s) => s,
            Err(verdict) => return Ok(verdict),
        };
        match send_data(&mut s.client.stream, msg.data, self.data_timeout).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Ok(ServerVerdict::SessionFailed(format!("{addr}: connection lost while sending data: {e}"))),
            Err(_) => {
                let why = format!("{addr}: the data stalled: none taken for {:?}", self.data_timeout);
                return Ok(ServerVerdict::Stalled(why));
            }
        }
        let final_reply = match tokio::time::timeout(self.data_timeout, s.client.read()).await {
            Err(_) | Ok(Err(mail_send::Error::Timeout)) => {
                let why = format!("{addr}: no reply to the final dot within {:?}", self.data_timeout);
                return Ok(ServerVerdict::StalledAfterDot(why));
            }
            Ok(Err(e)) => {
                return Ok(ServerVerdict::Unknown(format!("{addr}: after the final dot: {}", error_text(&e))));
            }
            Ok(Ok(r)) => r,
        };
        let text = match &s.tls {
            Some(tls) => format!("{addr} ({tls}): {}", reply_text(&final_reply)),
            None => format!("{addr}: {}", reply_text(&final_reply)),
        };
        if final_reply.code == 421 {
            return Ok(ServerVerdict::SessionFailed(text));
        }
        Ok(match reply_kind(final_reply.code) {
            ReplyKind::Positive => {
                s.sent += 1;
                self.put_idle(key, s);
                ServerVerdict::Completed { rcpts, reply: text, dsn_offered }
            }
            ReplyKind::Transient => {
                self.put_idle(key, s);
                ServerVerdict::TempFailed(text)
            }
            ReplyKind::Permanent => {
                self.put_idle(key, s);
                ServerVerdict::PermFailed(text)
            }
            // Neither yes nor no after the whole message: the server may have it. Deferred as
            // when no reply comes, never bounced; the connection is not reused.
            ReplyKind::Intermediate | ReplyKind::OutOfRange => {
                ServerVerdict::Unknown(format!("{text} (not a reply to the final dot; the message may have been accepted)"))
            }
        })
    }

    /// Whether the transaction goes on after `reply` to `command` (MAIL or DATA): it does when
    /// the reply is of the kind `expected`. A `4xx` or `5xx` refuses the transaction as a
    /// whole, and the connection is reset and kept for the next one, when `resettable`. Any
    /// other kind is a server out of step: not an answer about the message, and the
    /// connection's state is unknown, so it is closed and the next server gets the message.
    fn go_on(
        &self,
        key: &PoolKey,
        s: Session,
        command: &str,
        reply: &Response<String>,
        expected: ReplyKind,
        resettable: bool,
    ) -> Result<Session, ServerVerdict> {
        let kind = reply_kind(reply.code);
        if kind == expected {
            return Ok(s);
        }
        let text = format!("{}: {command}: {}", s.addr, reply_text(reply));
        if resettable && matches!(kind, ReplyKind::Transient | ReplyKind::Permanent) {
            self.reset(key, s);
        }
        Err(match kind {
            ReplyKind::Transient => ServerVerdict::TempFailed(text),
            ReplyKind::Permanent => ServerVerdict::PermFailed(text),
            ReplyKind::Positive | ReplyKind::Intermediate | ReplyKind::OutOfRange => ServerVerdict::SessionFailed(text),
        })
    }

    /// Ends a failed transaction, in the background, and keeps the connection if the server
    /// agrees. The verdict does not wait for the RSET: a server that stalls on it would
    /// otherwise hold the message for the command timeout before the next server is tried.
    fn reset(&self, key: &PoolKey, mut s: Session) {
        let (idle, key, running) = (self.idle.clone(), key.clone(), self.resets.clone().try_read_owned().ok());
        tokio::spawn(async move {
            let _running = running;
            if s.client.rset().await.is_ok() {
                keep_idle(&idle, &key, s);
            }
        });
    }

    /// Waits for the RSETs running in the background to end.
    #[cfg(test)]
    async fn resets_done(&self) {
        drop(self.resets.write().await);
    }

    /// Whether `addr` is back (used to probe servers marked down): whether a new session gets
    /// past what marks a server down: the greeting and an answer to EHLO (`greet`).
    /// A server that then refuses EHLO and HELO is up: it fails sessions, not connections.
    pub async fn probe(&self, addr: SocketAddr) -> Result<(), String> {
        match self.greet(addr).await {
            Ok((mut client, _)) => {
                let _ = client.stream.write_all(b"QUIT\r\n").await;
                Ok(())
            }
            Err(ServerVerdict::Unreachable(why)) => Err(why),
            Err(
                ServerVerdict::SessionFailed(_)
                | ServerVerdict::Stalled(_)
                | ServerVerdict::StalledAfterDot(_)
                | ServerVerdict::TempFailed(_)
                | ServerVerdict::PermFailed(_)
                | ServerVerdict::Unknown(_)
                | ServerVerdict::Completed { .. },
            ) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DomainConfig, PolicySource};
    use crate::tls::ClientTls;

    fn domain(tls: TlsMode, tls_ca: Option<std::path::PathBuf>) -> DomainConfig {
        DomainConfig {
            name: "customer.test".into(),
            policy: PolicySource::Builtin,
            policy_settings_json: "{}".into(),
            servers: vec![],
            tls,
            tls_ca,
            hold: false,
            max_queue_lifetime: None,
        }
    }

    pub(super) fn server(host: &str, port: u16) -> Server {
        Server { port, ..Server::new(host, 10) }
    }

    #[test]
    fn addresses_are_tried_ipv4_first_and_both_families_within_the_limit() {
        let ips = |text: &str| text.split_whitespace().map(|ip| ip.parse::<IpAddr>().expect("ip")).collect::<Vec<_>>();
        let ordered = |given: &str, limit| address_order(ips(given).into_iter(), limit);
        // The AAAA answer may come first; IPv4 is tried first all the same, each family in
        // the order the resolver gave.
        assert_eq!(
            ordered("2001:db8::2 2001:db8::1 192.0.2.2 192.0.2.1", 10),
            ips("192.0.2.2 192.0.2.1 2001:db8::2 2001:db8::1")
        );
        assert_eq!(ordered("2001:db8::1", 10), ips("2001:db8::1"));
        // Many of one family leave room for the other.
        let v4: Vec<String> = (1..=12).map(|n| format!("192.0.2.{n}")).collect();
        let v6: Vec<String> = (1..=12).map(|n| format!("2001:db8::{n}")).collect();
        let both = |a: usize, b: usize| format!("{} {}", v4[..a].join(" "), v6[..b].join(" "));
        assert_eq!(ordered(&both(12, 3), 10), ips(&both(7, 3)));
        assert_eq!(ordered(&both(2, 12), 10), ips(&both(2, 8)));
        assert_eq!(ordered(&both(12, 12), 10), ips(&both(5, 5)));
        assert_eq!(ordered(&both(12, 0), 10), ips(&both(10, 0)));
        assert_eq!(ordered(&both(0, 12), 10), ips(&both(0, 10)));
    }

    #[test]
    fn a_reply_names_this_relay_by_its_first_word() {
        for reply in ["relay.test ESMTP mxrelay", "RELAY.test. Hello client.test", "relay.test"] {
            assert!(names_host(reply, "relay.test"), "{reply}");
        }
        for reply in ["", "mx.relay.test ESMTP", "relay.test.example ESMTP", "mx.customer.test relay.test", "2.0.0 relay.test"] {
            assert!(!names_host(reply, "relay.test"), "{reply}");
        }
    }

    /// The IPv4 addresses tried before the AAAA answer is in are the ones every order starts
    /// with, whatever that answer holds.
    #[test]
    fn the_ipv4_lead_starts_the_order_whatever_the_aaaa_answer() {
        for limit in 1..=12 {
            for v4_count in 0..=14u8 {
                let v4: Vec<IpAddr> = (0..v4_count).map(|n| IpAddr::V4(Ipv4Addr::new(192, 0, 2, n))).collect();
                let lead = ipv4_lead(v4.len(), limit);
                assert!(lead >= v4.len().min(limit.div_ceil(2)), "{v4_count} A records, limit {limit}: lead {lead}");
                for v6_count in 0..=14u16 {
                    let v6 = (0..v6_count).map(|n| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n)));
                    let order = address_order(v4.iter().copied().chain(v6), limit);
                    assert_eq!(order[..lead], v4[..lead], "{v4_count} A and {v6_count} AAAA records, limit {limit}");
                }
            }
        }
    }

    /// The IPv6 addresses tried before a late A answer is in are in every order, whatever
    /// that answer holds, so a late answer never takes the count past the limit.
    #[test]
    fn the_ipv6_addresses_tried_first_are_kept_whatever_the_a_answer() {
        for limit in 1..=12 {
            for v6_count in 0..=14u16 {
                let v6: Vec<IpAddr> = (0..v6_count).map(|n| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n))).collect();
                let kept = ipv6_kept(v6.len(), limit);
                assert!(kept >= v6.len().min(limit / 2), "{v6_count} AAAA records, limit {limit}: {kept}");
                for v4_count in 0..=14u8 {
                    let v4 = (0..v4_count).map(|n| IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)));
                    let order = address_order(v4.chain(v6.iter().copied()), limit);
                    assert!(v6[..kept].iter().all(|ip| order.contains(ip)), "{v4_count} A and {v6_count} AAAA, limit {limit}");
                }
            }
        }
    }

    /// What `Addresses` hands out when one family answered first and the other `late`.
    async fn handed_out(first: Vec<IpAddr>, late: Vec<IpAddr>) -> Vec<IpAddr> {
        let mut addresses = Addresses::first_answer(25, first, tokio::spawn(async move { Ok(late) }));
        let mut out = Vec::new();
        while let Some(addr) = addresses.next().await {
            out.push(addr.ip());
        }
        out
    }

    #[tokio::test]
    async fn a_late_answer_adds_its_addresses_after_those_tried() {
        let v4: Vec<IpAddr> = (1..=12).map(|n| IpAddr::V4(Ipv4Addr::new(192, 0, 2, n))).collect();
        let v6: Vec<IpAddr> = (1..=12).map(|n| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n))).collect();
        // A first: the order is the full one, as if both answers had come together.
        assert_eq!(
            handed_out(v4[..2].to_vec(), v6[..2].to_vec()).await,
            address_order(v4[..2].iter().chain(&v6[..2]).copied(), 10)
        );
        assert_eq!(handed_out(v4.clone(), v6.clone()).await, address_order(v4.iter().chain(&v6).copied(), 10));
        // AAAA first: its addresses, then the IPv4 ones; never more than the limit.
        assert_eq!(handed_out(v6[..2].to_vec(), v4[..2].to_vec()).await, [&v6[..2], &v4[..2]].concat());
        assert_eq!(handed_out(v6.clone(), v4.clone()).await, [&v6[..5], &v4[..5]].concat());
        assert_eq!(handed_out(v6.clone(), Vec::new()).await, v6[..10].to_vec());
        assert_eq!(handed_out(v6[..3].to_vec(), v4.clone()).await, [&v6[..3], &v4[..7]].concat());
    }

    /// A minimal config, with `relay_extra` lines under `[relay]`.
    pub(super) fn config(relay_extra: &str) -> crate::config::Config {
        let text = format!(
            "[relay]\nhostname = \"relay.test\"\nlisten = [\"127.0.0.1:2525\"]\nqueue = \"q\"\n{relay_extra}\n\n[[domain]]\nname = \"customer.test\"\n[[domain.server]]\nhost = \"192.0.2.1\"\n"
        );
        crate::config::Config::parse(std::path::Path::new("relay.toml"), &text).expect("config")
    }

    #[test]
    fn sessions_are_pooled_per_server_and_tls_setting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, params.self_signed(&key).expect("ca").pem()).expect("write");
        let verified = OutboundTls::for_domain(&domain(TlsMode::Required, Some(ca)), &ClientTls::anonymous()).expect("verified");
        let encrypted = OutboundTls::for_domain(&domain(TlsMode::Required, None), &ClientTls::anonymous()).expect("encrypt");
        let opportunistic = OutboundTls::for_domain(&domain(TlsMode::Opportunistic, None), &ClientTls::anonymous()).expect("may");
        let (mx1, mx2) = (server("mx1.customer.test", 25), server("mx2.customer.test", 25));

        assert_ne!(pool_key(&mx1, &verified), pool_key(&mx2, &verified), "checked against one name");
        assert_ne!(pool_key(&mx1, &encrypted), pool_key(&mx2, &encrypted), "one server's connections");
        assert_ne!(pool_key(&mx1, &encrypted), pool_key(&server("mx1.customer.test", 2525), &encrypted), "per port");
        assert_ne!(pool_key(&mx1, &encrypted), pool_key(&mx1, &opportunistic), "a clear session never serves required");
        assert_ne!(pool_key(&mx1, &verified), pool_key(&mx1, &encrypted));
        assert_eq!(pool_key(&mx1, &encrypted), pool_key(&server("mx1.customer.test", 25), &encrypted));
    }

    #[tokio::test]
    async fn marking_a_server_down_drops_and_closes_its_idle_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Greets, answers EHLO, then reports how the connection ended: 0 bytes is a close.
        let server_side = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            stream.write_all(b"220 fake ESMTP\r\n").await.expect("greeting");
            let mut buf = [0u8; 512];
            let _ = stream.read(&mut buf).await.expect("EHLO");
            stream.write_all(b"250 fake\r\n").await.expect("EHLO reply");
            stream.read(&mut buf).await.expect("read")
        });
        let config = config("");
        let transport = Arc::new(Transport::new("relay.test", &config.delivery));
        let settings = OutboundTls::for_domain(&domain(TlsMode::None, None), &ClientTls::anonymous()).expect("tls settings");
        let target = server("127.0.0.1", addr.port());
        let key = pool_key(&target, &settings);
        let Ok(session) = transport.open(addr, TlsTarget { settings: &settings, host: &target.host }).await else {
            panic!("no session with the fake server");
        };
        transport.put_idle(&key, session);
        let session = transport.take_idle(&key).expect("an idle session is kept for reuse");
        transport.put_idle(&key, session);

        let (events, _events_rx) = tokio::sync::mpsc::unbounded_channel();
        let health = crate::health::Health::new(Duration::from_secs(3600), events);
        health.mark_down(&target, crate::health::Fault::Unreachable, "test", &transport);
        assert!(transport.take_idle(&key).is_none(), "a server marked down keeps no idle connection");
        assert_eq!(server_side.await.expect("fake server"), 0, "and the connection is closed");
    }

    /// Sends one small message to the server on 127.0.0.1:`port`, without TLS.
    async fn send_one(transport: &Transport, port: u16) -> ServerVerdict {
        let settings = OutboundTls::for_domain(&domain(TlsMode::None, None), &ClientTls::anonymous()).expect("tls settings");
        let rcpts = ["user@customer.test".to_string()];
        let msg = Outgoing { sender: "a@src.test", recipients: &rcpts, data: b"Subject: x\r\n\r\nhi\r\n", dsn: None };
        transport.send(&server("127.0.0.1", port), &msg, &settings).await
    }

    /// A server that answers one transaction, then reports what the client says next, and
    /// whether the connection then closes.
    async fn one_transaction_then_quit() -> (SocketAddr, tokio::task::JoinHandle<(String, usize)>) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server_side = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut s = BufReader::new(stream);
            let mut line = String::new();
            s.get_mut().write_all(b"220 fake ESMTP\r\n").await.expect("greeting");
            for reply in ["250-fake\r\n250 PIPELINING\r\n", "250 ok\r\n", "250 ok\r\n", "354 go\r\n"] {
                line.clear();
                s.read_line(&mut line).await.expect("command");
                s.get_mut().write_all(reply.as_bytes()).await.expect("reply");
            }
            while line != ".\r\n" {
                line.clear();
                s.read_line(&mut line).await.expect("data");
            }
            s.get_mut().write_all(b"250 queued\r\n").await.expect("final reply");
            line.clear();
            s.read_line(&mut line).await.expect("after the transaction");
            let next = line.clone();
            s.get_mut().write_all(b"221 bye\r\n").await.expect("QUIT reply");
            line.clear();
            (next, s.read_line(&mut line).await.expect("close"))
        });
        (addr, server_side)
    }

    /// Whether the server saw QUIT, then the close, within 10 s.
    async fn ended_with_quit(server_side: tokio::task::JoinHandle<(String, usize)>) {
        let ended = tokio::time::timeout(Duration::from_secs(10), server_side).await;
        let (next, closed) = ended.expect("the connection was left open").expect("fake server");
        assert_eq!(next, "QUIT\r\n");
        assert_eq!(closed, 0, "and the connection is closed after the reply");
    }

    /// A connection that has carried its last message is ended with QUIT, not dropped.
    #[tokio::test]
    async fn a_retired_connection_is_ended_with_quit() {
        let (addr, server_side) = one_transaction_then_quit().await;
        let transport = Transport::new("relay.test", &config("").delivery);
        assert!(matches!(send_one(&transport, addr.port()).await, ServerVerdict::Completed { .. }));
        let settings = OutboundTls::for_domain(&domain(TlsMode::None, None), &ClientTls::anonymous()).expect("tls settings");
        let key = pool_key(&server("127.0.0.1", addr.port()), &settings);
        let mut session = transport.take_idle(&key).expect("kept for the next message");
        session.sent = MAX_REUSE;
        transport.put_idle(&key, session);
        assert!(transport.take_idle(&key).is_none(), "not kept past MAX_REUSE");
        ended_with_quit(server_side).await;
    }

    /// A connection left idle for the cache time is ended with QUIT, not left for the
    /// server to time out.
    #[tokio::test]
    async fn an_idle_connection_is_ended_with_quit_after_the_cache_time() {
        let (addr, server_side) = one_transaction_then_quit().await;
        let mut delivery = config("").delivery;
        delivery.connection_cache_time = Duration::from_millis(50);
        let transport = Arc::new(Transport::new("relay.test", &delivery));
        transport.close_idle_in_time();
        assert!(matches!(send_one(&transport, addr.port()).await, ServerVerdict::Completed { .. }));
        ended_with_quit(server_side).await;
    }

    /// A STARTTLS session's age, which bounds its reuse, counts from its connect as a clear
    /// session's does, not from after the handshake.
    #[tokio::test]
    async fn a_tls_sessions_age_counts_from_its_connect() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params").self_signed(&key).expect("cert");
        let (cert_path, key_path) = (dir.path().join("server.crt"), dir.path().join("server.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        let config = config(&format!("tls_cert = \"{}\"\ntls_key = \"{}\"", cert_path.display(), key_path.display()));
        let acceptor = crate::tls::acceptor(&config.relay).expect("acceptor").expect("TLS configured");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Offers STARTTLS and reports when the client asked for it.
        let server_side = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut clear = BufReader::new(stream);
            let mut line = String::new();
            clear.get_mut().write_all(b"220 fake ESMTP\r\n").await.expect("greeting");
            clear.read_line(&mut line).await.expect("EHLO");
            clear.get_mut().write_all(b"250-fake\r\n250 STARTTLS\r\n").await.expect("EHLO reply");
            line.clear();
            clear.read_line(&mut line).await.expect("STARTTLS");
            assert_eq!(line, "STARTTLS\r\n");
            let asked = Instant::now();
            clear.get_mut().write_all(b"220 go ahead\r\n").await.expect("STARTTLS reply");
            let mut tls = BufReader::new(acceptor.accept(clear.into_inner()).await.expect("handshake"));
            line.clear();
            tls.read_line(&mut line).await.expect("EHLO over TLS");
            tls.get_mut().write_all(b"250 fake\r\n").await.expect("EHLO reply over TLS");
            (asked, tls)
        });
        let transport = Transport::new("relay.test", &config.delivery);
        let settings =
            OutboundTls::for_domain(&domain(TlsMode::Opportunistic, None), &ClientTls::anonymous()).expect("tls settings");
        let before = Instant::now();
        let Ok(session) = transport.open(addr, TlsTarget { settings: &settings, host: "127.0.0.1" }).await else {
            panic!("no session with the fake server");
        };
        let (asked, _connection) = server_side.await.expect("fake server");
        assert!(session.tls.is_some(), "the session is encrypted");
        assert!(before <= session.opened && session.opened < asked, "the age starts at the connect, before STARTTLS");
    }

    /// EHLO replies for [`scripted_server`].
    const NO_EXTENSIONS: &str = "250 fake";
    const PIPELINING: &str = "250-fake\r\n250 PIPELINING";

    /// A [`scripted_server`] reply that is no reply: the server closes the connection.
    const HANG_UP: &str = "(hangs up)";

    /// A one-connection server that greets, answers EHLO with `ehlo`, then answers each
    /// command, and the data once its final dot arrives, with the next reply of `script`.
    /// After the script it answers `250` to anything.
    async fn scripted_server(ehlo: &'static str, script: &[&'static str]) -> SocketAddr {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let script = script.to_vec();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            // It answers pipelined commands one write each: without this, each reply after the
            // first waits for the client's delayed ACK.
            stream.set_nodelay(true).expect("nodelay");
            let mut stream = BufReader::new(stream);
            stream.get_mut().write_all(b"220 fake ESMTP\r\n").await.expect("greeting");
            let (mut line, mut replies, mut in_data) = (String::new(), script.iter(), false);
            loop {
                line.clear();
                if stream.read_line(&mut line).await.expect("read") == 0 {
                    return;
                }
                if in_data && line != ".\r\n" {
                    continue;
                }
                let reply = if line.starts_with("EHLO") {
                    ehlo.as_bytes()
                } else {
                    replies.next().map_or(b"250 ok".as_slice(), |r| r.as_bytes())
                };
                if reply == HANG_UP.as_bytes() {
                    return;
                }
                in_data = line.starts_with("DATA") && reply.starts_with(b"3");
                // One write: a second small one would wait for the client's delayed ACK.
                stream.get_mut().write_all(&[reply, b"\r\n"].concat()).await.expect("reply");
            }
        });
        addr
    }

    /// What a server answering with `script` makes of a message to two recipients, and
    /// whether its connection was kept for the next message.
    async fn verdict_for(ehlo: &'static str, script: &[&'static str]) -> (ServerVerdict, bool) {
        let addr = scripted_server(ehlo, script).await;
        let transport = Transport::new("relay.test", &config("").delivery);
        let settings = OutboundTls::for_domain(&domain(TlsMode::None, None), &ClientTls::anonymous()).expect("tls settings");
        let recipients = ["a@customer.test".to_string(), "b@customer.test".to_string()];
        let msg = Outgoing { sender: "s@src.test", recipients: &recipients, data: b"Subject: t\r\n\r\nbody\r\n", dsn: None };
        let target = server("127.0.0.1", addr.port());
        let verdict = transport.send(&target, &msg, &settings).await;
        transport.resets_done().await;
        (verdict, transport.take_idle(&pool_key(&target, &settings)).is_some())
    }

    /// A server that names this relay in its EHLO or HELO reply (the greeting is checked by
    /// the e2e test) is passed over: nothing is sent, and the next server is tried.
    #[tokio::test]
    async fn a_server_answering_ehlo_or_helo_with_this_relays_name_is_passed_over() {
        for (ehlo, script) in
            [("250-relay.test Hello\r\n250 PIPELINING", &[][..]), ("502 no EHLO here", &["250 RELAY.TEST."][..])]
        {
            let (verdict, kept) = verdict_for(ehlo, script).await;
            let ServerVerdict::SessionFailed(why) = &verdict else { panic!("{ehlo:?}: {verdict:?}") };
            assert!(why.contains("loop back"), "{ehlo:?}: {why}");
            assert!(!kept, "{ehlo:?}: the connection was kept");
        }
    }

    /// A server that refuses MAIL with `4xx` and then never answers the RSET does not hold
    /// the message: the verdict comes at once, and the next server can be tried.
    #[tokio::test]
    async fn a_refusal_does_not_wait_for_the_rset() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (rset_tx, rset_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut s = BufReader::new(stream);
            let mut line = String::new();
            s.get_mut().write_all(b"220 fake ESMTP\r\n").await.expect("greeting");
            for reply in ["250 fake\r\n", "451 4.3.0 try later\r\n"] {
                line.clear();
                s.read_line(&mut line).await.expect("command");
                s.get_mut().write_all(reply.as_bytes()).await.expect("reply");
            }
            line.clear();
            s.read_line(&mut line).await.expect("RSET");
            let _ = rset_tx.send(line);
            std::future::pending::<()>().await; // and never answers it
        });
        // The default command timeout (5 min): waiting for the RSET would exceed the test's.
        let transport = Transport::new("relay.test", &config("").delivery);
        let sent = send_one(&transport, addr.port());
        let verdict = tokio::time::timeout(Duration::from_secs(10), sent).await.expect("the verdict waited for the RSET");
        assert!(matches!(&verdict, ServerVerdict::TempFailed(t) if t.contains("MAIL: 451")), "{verdict:?}");
        assert_eq!(rset_rx.await.expect("RSET sent"), "RSET\r\n", "the transaction is still ended properly");
    }

    #[tokio::test]
    async fn replies_count_by_their_first_digit_and_a_reply_of_the_wrong_kind_never_bounces() {
        for ehlo in [NO_EXTENSIONS, PIPELINING] {
            let run = |script| verdict_for(ehlo, script);
            // The usual answers, including codes other than the common ones. A transaction the
            // server ended with an answer leaves the connection reusable.
            let (v, kept) = run(&["250 ok", "251 will forward", "252 ok", "354 go", "250 queued"]).await;
            assert!(
                matches!(&v, ServerVerdict::Completed { rcpts, .. } if rcpts == &[RcptVerdict::Delivered, RcptVerdict::Delivered]),
                "{v:?}"
            );
            assert!(kept, "{v:?}");
            let (v, kept) = run(&["250 ok", "250 ok", "250 ok", "354 go", "554 no"]).await;
            assert!(matches!(v, ServerVerdict::PermFailed(_)) && kept, "{v:?}");
            let (v, kept) = run(&["250 ok", "250 ok", "250 ok", "354 go", "451 later"]).await;
            assert!(matches!(v, ServerVerdict::TempFailed(_)) && kept, "{v:?}");
            let (v, kept) = run(&["451 later"]).await;
            assert!(matches!(&v, ServerVerdict::TempFailed(t) if t.contains("MAIL: 451")) && kept, "{v:?}");
            let (v, kept) = run(&["250 ok", "250 ok", "250 ok", "554 no"]).await;
            assert!(matches!(&v, ServerVerdict::PermFailed(t) if t.contains("DATA: 554")) && kept, "{v:?}");
            // Any 3xx to DATA starts the data, as Postfix has it.
            let (v, kept) = run(&["250 ok", "250 ok", "250 ok", "300 go on", "250 queued"]).await;
            assert!(matches!(v, ServerVerdict::Completed { .. }) && kept, "{v:?}");
            // Out-of-range and wrong-kind replies: never a permanent failure, and the
            // connection, in a state nobody knows, is not used again.
            let (v, kept) = run(&["250 ok", "250 ok", "250 ok", "354 go", "354 what"]).await;
            assert!(matches!(&v, ServerVerdict::Unknown(t) if t.contains("354 what")) && !kept, "after the dot: defer: {v:?}");
            let (v, kept) = run(&["250 ok", "250 ok", "250 ok", "354 go", "600 what"]).await;
            assert!(matches!(v, ServerVerdict::Unknown(_)) && !kept, "after the dot: defer: {v:?}");
            let (v, kept) = run(&["600 what"]).await;
            assert!(
                matches!(&v, ServerVerdict::SessionFailed(t) if t.contains("MAIL: 600 what")) && !kept,
                "MAIL: next server: {v:?}"
            );
            let (v, kept) = run(&["354 what"]).await;
            assert!(matches!(v, ServerVerdict::SessionFailed(_)) && !kept, "MAIL: next server: {v:?}");
            let (v, kept) = run(&["250 ok", "250 ok", "250 ok", "250 ok"]).await;
            assert!(
                matches!(&v, ServerVerdict::SessionFailed(t) if t.contains("DATA: 250 ok")) && !kept,
                "DATA: next server: {v:?}"
            );
            let (v, kept) = run(&["250 ok", "250 ok", "250 ok", "650 what"]).await;
            assert!(matches!(v, ServerVerdict::SessionFailed(_)) && !kept, "DATA: next server: {v:?}");
            // A recipient answered out of range is retried, not failed.
            let (v, kept) = run(&["250 ok", "650 what", "550 no such user", "354 go"]).await;
            assert!(
                matches!(&v, ServerVerdict::Completed { rcpts, .. }
                    if matches!(rcpts.as_slice(), [RcptVerdict::TempRejected(_), RcptVerdict::PermRejected(_)])),
                "{v:?}"
            );
            assert!(kept, "{v:?}");
        }
    }

    /// A server out of step that refuses MAIL yet answers the pipelined DATA with `354` would
    /// read an RSET as the message's first line and never answer it: the connection is
    /// closed instead of reset, so no RSET waits out the command timeout holding it.
    #[tokio::test]
    async fn a_server_that_refuses_mail_but_takes_the_pipelined_data_is_not_reset() {
        for (refusal, temporary) in [("550 5.7.1 no", false), ("451 4.3.0 later", true)] {
            let script = [refusal, "250 ok", "250 ok", "354 go"];
            let (verdict, kept) = tokio::time::timeout(Duration::from_secs(10), verdict_for(PIPELINING, &script))
                .await
                .unwrap_or_else(|_| panic!("{refusal}: an RSET waits on a server that reads it as data"));
            let refused = match &verdict {
                ServerVerdict::TempFailed(t) => temporary && t.contains(refusal),
                ServerVerdict::PermFailed(t) => !temporary && t.contains(refusal),
                ServerVerdict::Completed { .. }
                | ServerVerdict::Unreachable(_)
                | ServerVerdict::SessionFailed(_)
                | ServerVerdict::Stalled(_)
                | ServerVerdict::StalledAfterDot(_)
                | ServerVerdict::Unknown(_) => false,
            };
            assert!(refused, "{refusal}: {verdict:?}");
            assert!(!kept, "{refusal}: a connection that awaits data was kept");
        }
    }

    /// The taxonomy's promises for any sequence of replies, not only the ones listed above:
    /// mail fails for good only on a `5xx` the server gave it, a recipient counts as delivered
    /// only after a `2xx` to the final dot, and a server that answers everything gets a
    /// verdict at once, with no RSET left waiting.
    #[tokio::test]
    async fn any_sequence_of_replies_keeps_the_taxonomys_promises() {
        use mxrelay_policy_core::mix64;
        const REPLIES: &[&str] = &[
            "250 ok",
            "251 2.1.5 will forward",
            "252 ok",
            "354 go",
            "300 go on",
            "421 4.7.0 closing",
            "450 4.2.0 busy",
            "451 later",
            "452 4.5.3 too many",
            "500 what",
            "552 5.5.3 too many",
            "552 5.2.2 mailbox full",
            "503 5.5.1 bad sequence",
            "550 5.1.1 no such user",
            "554 5.7.1 no",
            "600 what",
            "199 odd",
            "250-first\r\n250 2.0.0 second",
            "550-first\r\n550 5.7.1 second",
            HANG_UP,
        ];
        /// The code of the reply a verdict quotes last (`...: 550 5.1.1 no such user`).
        fn quoted(text: &str) -> u16 {
            let reply = text.rsplit(": ").next().unwrap_or_default();
            reply.get(..3).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("no reply quoted in {text:?}"))
        }
        let mut draws = 0;
        let mut pick = |n: usize| {
            draws += 1;
            usize::try_from(mix64(draws) % n as u64).expect("small")
        };
        let mut seen = HashMap::new();
        for case in 0..400 {
            let ehlo = if case % 2 == 0 { NO_EXTENSIONS } else { PIPELINING };
            // Mostly the replies that move a transaction on (MAIL, two RCPTs, DATA and the data),
            // so that the later steps are reached too; sometimes a shorter script, which leaves
            // the rest to the server's `250`.
            let mut script: Vec<&'static str> = ["250 ok", "250 ok", "250 ok", "354 go", "250 ok"]
                .into_iter()
                .map(|usual| if pick(3) == 0 { REPLIES[pick(REPLIES.len())] } else { usual })
                .collect();
            if pick(4) == 0 {
                script.truncate(pick(5));
            }
            let (verdict, _) = tokio::time::timeout(Duration::from_secs(10), verdict_for(ehlo, &script))
                .await
                .unwrap_or_else(|_| panic!("{ehlo:?} {script:?}: no verdict, or an RSET left waiting"));
            let kind = match &verdict {
                ServerVerdict::Completed { rcpts, reply, .. } => {
                    for rcpt in rcpts {
                        match rcpt {
                            RcptVerdict::PermRejected(t) => assert!((500..600).contains(&quoted(t)), "{script:?}: {verdict:?}"),
                            // The delivery loop's next transaction ends because each one
                            // delivers something.
                            RcptVerdict::OverLimit(t) => {
                                assert!(matches!(quoted(t), 452 | 552), "{script:?}: {verdict:?}");
                                assert!(rcpts.contains(&RcptVerdict::Delivered), "{script:?}: {verdict:?}");
                                *seen.entry("a recipient over the limit").or_insert(0) += 1;
                            }
                            RcptVerdict::Delivered | RcptVerdict::TempRejected(_) => {}
                        }
                    }
                    if !rcpts.contains(&RcptVerdict::Delivered) {
                        "completed, none delivered"
                    } else {
                        assert!((200..300).contains(&quoted(reply)), "{script:?}: {verdict:?}");
                        "delivered"
                    }
                }
                ServerVerdict::PermFailed(t) => {
                    assert!((500..600).contains(&quoted(t)), "{script:?}: {verdict:?}");
                    "failed"
                }
                ServerVerdict::TempFailed(t) => {
                    assert!((400..500).contains(&quoted(t)), "{script:?}: {verdict:?}");
                    "deferred"
                }
                ServerVerdict::SessionFailed(_) => "next server",
                ServerVerdict::Unknown(_) => "unknown",
                ServerVerdict::Unreachable(_) | ServerVerdict::Stalled(_) | ServerVerdict::StalledAfterDot(_) => {
                    panic!("{script:?}: a server that greets and answers everything: {verdict:?}")
                }
            };
            *seen.entry(kind).or_insert(0) += 1;
        }
        // The scripts reach every verdict, or the promises above were not put to the test.
        assert_eq!(seen.len(), 7, "{seen:?}");
    }

    /// `452`, or `552 5.5.3`, after a recipient was taken is the server's recipient limit:
    /// another transaction, not another server. To the first recipient, it is what its code
    /// says: a server short of room, or a failure.
    #[tokio::test]
    async fn a_recipient_past_the_servers_limit_is_told_apart() {
        for limit in ["452 4.5.3 too many recipients", "552 5.5.3 too many"] {
            let (v, _) = verdict_for(PIPELINING, &["250 ok", "250 ok", limit, "354 go", "250 queued"]).await;
            let ServerVerdict::Completed { rcpts, .. } = &v else { panic!("{v:?}") };
            assert!(
                matches!(rcpts.as_slice(), [RcptVerdict::Delivered, RcptVerdict::OverLimit(t)] if t.ends_with(limit)),
                "{v:?}"
            );
        }
        let (v, _) = verdict_for(PIPELINING, &["250 ok", "452 4.3.1 no room", "250 ok", "354 go", "250 queued"]).await;
        assert!(
            matches!(&v, ServerVerdict::Completed { rcpts, .. } if matches!(rcpts.as_slice(), [RcptVerdict::TempRejected(_), RcptVerdict::Delivered])),
            "{v:?}"
        );
        let (v, _) = verdict_for(PIPELINING, &["250 ok", "250 ok", "552 5.2.2 mailbox full", "354 go", "250 queued"]).await;
        assert!(
            matches!(&v, ServerVerdict::Completed { rcpts, .. } if matches!(rcpts.as_slice(), [RcptVerdict::Delivered, RcptVerdict::PermRejected(_)])),
            "{v:?}"
        );
    }

    #[tokio::test]
    async fn replies_keep_their_enhanced_status_codes() {
        let (v, _) =
            verdict_for(PIPELINING, &["250 2.1.0 ok", "550 5.1.1 no such user", "250 ok", "354 go", "250 2.0.0 queued"]).await;
        let ServerVerdict::Completed { rcpts, reply, .. } = v else { panic!("{v:?}") };
        assert!(reply.ends_with(": 250 2.0.0 queued"), "{reply}");
        assert!(matches!(&rcpts[0], RcptVerdict::PermRejected(t) if t.ends_with("RCPT: 550 5.1.1 no such user")), "{rcpts:?}");
    }

    #[tokio::test]
    async fn a_server_that_refuses_ehlo_gets_helo() {
        let v =
            verdict_for("502 5.5.2 EHLO not implemented", &["250 hello", "250 ok", "250 ok", "250 ok", "354 go", "250 queued"])
                .await
                .0;
        assert!(matches!(&v, ServerVerdict::Completed { reply, .. } if reply.contains("250 queued")), "{v:?}");
        let v = verdict_for("500 what", &["502 no HELO either"]).await.0;
        assert!(matches!(&v, ServerVerdict::SessionFailed(t) if t.contains("EHLO 500 what, then HELO 502")), "{v:?}");
        // Not knowing EHLO is a 5xx; a 4xx is a server that cannot talk now: next server.
        let v = verdict_for("421 busy", &["250 hello"]).await.0;
        assert!(matches!(&v, ServerVerdict::SessionFailed(t) if t.contains("EHLO: 421 busy")), "{v:?}");
    }

    #[test]
    fn connections_are_reused_for_a_bounded_count_and_time() {
        assert!(reusable(0, Duration::ZERO));
        assert!(reusable(MAX_REUSE - 1, MAX_REUSE_AGE - Duration::from_millis(1)));
        assert!(!reusable(MAX_REUSE, Duration::ZERO), "count limit");
        assert!(!reusable(1, MAX_REUSE_AGE), "age limit: changed DNS records take effect");
    }
}
