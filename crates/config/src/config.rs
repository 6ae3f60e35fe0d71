//! The relay's TOML configuration: parsing, defaults and validation.
//!
//! Every error names where it is: the domain, the server entry (number and host) and the
//! field, so `mxrelay check` can print one actionable line per problem.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mxrelay_policy_core::{Problem, RawNumber, RawServer, Server, Severity, parse_host, validate_servers};
use serde::Deserialize;

use crate::duration::parse_duration;

/// A problem in the configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Where: `relay.listen`, `domain example.com`, ...
    pub location: String,
    /// Error or warning.
    pub severity: Severity,
    /// What is wrong and what would be right.
    pub message: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has unknown keys or wrong types.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The file parses, but some values are unusable.
    #[error("{} error(s) in the configuration", problems.iter().filter(|p| p.severity == Severity::Error).count())]
    Invalid {
        /// Every problem found, errors and warnings.
        problems: Vec<ConfigProblem>,
    },
}

// ---- the file as written ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    relay: FileRelay,
    #[serde(default)]
    delivery: FileDelivery,
    #[serde(default)]
    domain: Vec<FileDomain>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRelay {
    hostname: String,
    listen: Vec<String>,
    queue: PathBuf,
    #[serde(default)]
    accept_from: Option<Vec<String>>,
    #[serde(default)]
    max_message_size: Option<u64>,
    #[serde(default)]
    max_recipients: Option<u32>,
    #[serde(default)]
    max_hops: Option<u32>,
    #[serde(default)]
    max_connections: Option<u32>,
    #[serde(default)]
    max_connections_per_client: Option<u32>,
    #[serde(default)]
    max_data_in_memory: Option<u64>,
    #[serde(default)]
    idle_timeout: Option<String>,
    #[serde(default)]
    shutdown_timeout: Option<String>,
    #[serde(default)]
    greet_pause: Option<String>,
    #[serde(default)]
    admin_listen: Option<String>,
    #[serde(default)]
    admin_token: Option<String>,
    #[serde(default)]
    web_root: Option<PathBuf>,
    #[serde(default)]
    tls_cert: Option<PathBuf>,
    #[serde(default)]
    tls_key: Option<PathBuf>,
    #[serde(default)]
    require_tls: Option<bool>,
    #[serde(default)]
    postmaster: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDelivery {
    resolver: Option<String>,
    retry: Option<Vec<String>>,
    max_queue_lifetime: Option<String>,
    connect_timeout: Option<String>,
    command_timeout: Option<String>,
    data_timeout: Option<String>,
    probe_interval: Option<String>,
    connection_cache_time: Option<String>,
    concurrency_per_server: Option<u32>,
    workers: Option<u32>,
    bounce_relay: Option<String>,
    delay_warning: Option<String>,
    bind_address: Option<String>,
    bind_address6: Option<String>,
    tls_client_cert: Option<PathBuf>,
    tls_client_key: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDomain {
    name: String,
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    policy_config: Option<toml::Table>,
    #[serde(default)]
    tls: Option<String>,
    #[serde(default)]
    tls_ca: Option<PathBuf>,
    #[serde(default)]
    hold: bool,
    #[serde(default)]
    max_queue_lifetime: Option<String>,
    #[serde(default)]
    server: Vec<FileServer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    host: String,
    #[serde(default)]
    port: Option<toml::Value>,
    #[serde(default)]
    preference: Option<toml::Value>,
    #[serde(default)]
    weight: Option<toml::Value>,
}

// ---- the validated configuration ----

/// Which policy plans a domain's deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// The built-in policy component.
    Builtin,
    /// A custom policy component at this path.
    Module(PathBuf),
}

impl PolicySource {
    /// `builtin` or the module's path, as written in the config.
    pub fn label(&self) -> String {
        match self {
            PolicySource::Builtin => "builtin".into(),
            PolicySource::Module(p) => p.display().to_string(),
        }
    }
}

/// One customer domain.
#[derive(Debug, Clone)]
pub struct DomainConfig {
    /// Lower-case domain name.
    pub name: String,
    /// Which policy plans its deliveries.
    pub policy: PolicySource,
    /// The policy's settings as a JSON object.
    pub policy_settings_json: String,
    /// Its inbound servers, validated.
    pub servers: Vec<Server>,
    /// Whether deliveries use STARTTLS.
    pub tls: TlsMode,
    /// CA certificates (PEM) the servers' certificates must chain to; unset: not verified.
    pub tls_ca: Option<PathBuf>,
    /// Mail that arrives for the domain is held, as `queue hold` holds it, until released
    /// (Postfix's `HOLD` access action): for a customer who asks the relay to keep their mail.
    pub hold: bool,
    /// How long its mail is retried before it is returned to the sender, when the customer's
    /// agreement says other than `delivery.max_queue_lifetime`.
    pub max_queue_lifetime: Option<Duration>,
}

/// Outbound TLS for a domain (`tls = ...`), after Postfix's `smtp_tls_security_level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// Never STARTTLS (Postfix `none`).
    None,
    /// STARTTLS when offered; in clear when not offered or the handshake fails (Postfix `may`).
    Opportunistic,
    /// STARTTLS or nothing: a server that does not offer it, or whose handshake fails, counts
    /// as a failed server and the next one is tried (Postfix `encrypt`, or `secure` with `tls_ca`).
    Required,
}

impl TlsMode {
    /// The value as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::None => "none",
            TlsMode::Opportunistic => "opportunistic",
            TlsMode::Required => "required",
        }
    }
}

/// An address range from `accept_from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `192.0.2.0/24`, `::1/128` or a bare address.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr =
            addr.trim().parse().map_err(|_| format!("{text:?} is not an IP address or CIDR range like 192.0.2.0/24"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside the range (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            (IpAddr::V4(_), IpAddr::V6(_)) | (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }
}

/// `[relay]`: receiving.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Name used in the greeting, EHLO and Received headers.
    pub hostname: String,
    /// SMTP listen addresses.
    pub listen: Vec<SocketAddr>,
    /// Directory of the embedded queue.
    pub queue: PathBuf,
    /// Clients allowed to send; default loopback only.
    pub accept_from: Vec<Cidr>,
    /// Largest message accepted, bytes (default 25 MiB).
    pub max_message_size: u64,
    /// Most recipients per message (default 100).
    pub max_recipients: u32,
    /// Most `Received:` fields a message may arrive with; more means a mail loop (default 50,
    /// Postfix's `hopcount_limit`).
    pub max_hops: u32,
    /// Most simultaneous connections in all (default 1000).
    pub max_connections: u32,
    /// Most simultaneous connections from one client address (default 100).
    pub max_connections_per_client: u32,
    /// Most message data held in memory while it arrives, in bytes, across all sessions
    /// (default 512 MiB). A message that would take more gets `452 4.3.1`, unless it is the
    /// only one arriving.
    pub max_data_in_memory: u64,
    /// A client silent for this long is disconnected with 421 (default 5 min, RFC 5321 §4.5.3.2).
    pub idle_timeout: Duration,
    /// On SIGTERM, how long deliveries in flight may take to finish (default 30 s).
    pub shutdown_timeout: Duration,
    /// How long to wait before the greeting for input a client should not send yet
    /// (default 0: only input already there is caught).
    pub greet_pause: Duration,
    /// Admin HTTP listener (metrics, API, widget), off when unset.
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token for the domains API; the API is off without one.
    pub admin_token: Option<String>,
    /// Directory of the widget's files (`web/`), served by the admin listener.
    pub web_root: Option<PathBuf>,
    /// Certificate chain (PEM) offered with STARTTLS; STARTTLS is offered when it is set.
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Take mail only over TLS: MAIL before STARTTLS gets `530` (Postfix's
    /// `smtpd_tls_security_level = encrypt`). Default off.
    pub require_tls: bool,
    /// Where mail to the relay's own postmaster (the bare `<postmaster>` of RFC 5321 §4.5.1,
    /// and `postmaster@` [`RelayConfig::hostname`]) goes, as `local@domain` with
    /// the domain lower-cased: a mailbox in one of the configured domains. Unset, such mail is
    /// refused, since the relay has no mailbox of its own.
    pub postmaster: Option<String>,
}

/// `[delivery]`: sending.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// DNS server to use instead of the system resolver.
    pub resolver: Option<SocketAddr>,
    /// Delay before each retry of a deferred message; the last repeats.
    pub retry: Vec<Duration>,
    /// Give up (and bounce) after this long in the queue.
    pub max_queue_lifetime: Duration,
    /// TCP connect timeout per address.
    pub connect_timeout: Duration,
    /// Timeout for the greeting and each command reply.
    pub command_timeout: Duration,
    /// How long sending the data may stall (no byte taken), and the wait for the reply to the
    /// final `.` (default 10 min).
    pub data_timeout: Duration,
    /// How often a server marked down is probed.
    pub probe_interval: Duration,
    /// How long a connection is kept idle for the next message to the same server before it
    /// is closed with QUIT (Postfix's `smtp_connection_cache_time_limit`).
    pub connection_cache_time: Duration,
    /// Most simultaneous deliveries to one server.
    pub concurrency_per_server: u32,
    /// Delivery workers.
    pub workers: u32,
    /// Where delivery status notifications for senders outside the configured domains go
    /// (e.g. the filtering service's outbound relay). Without it they cannot be delivered.
    pub bounce_relay: Option<Server>,
    /// Tell the sender once when a message is still queued after this long (off when unset).
    pub delay_warning: Option<Duration>,
    /// Source address of connections to IPv4 servers (Postfix's `smtp_bind_address`), so
    /// that customers can let in only the relay's addresses. The system's choice when unset.
    pub bind_address: Option<std::net::Ipv4Addr>,
    /// Source address of connections to IPv6 servers (Postfix's `smtp_bind_address6`).
    pub bind_address6: Option<std::net::Ipv6Addr>,
    /// Certificate chain (PEM) the relay presents when a server asks for one in STARTTLS
    /// (Postfix's `smtp_tls_cert_file`), for customers that admit the relay by certificate.
    pub tls_client_cert: Option<PathBuf>,
    /// Private key (PEM) of `tls_client_cert`.
    pub tls_client_key: Option<PathBuf>,
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from; relative paths resolve against its directory.
    pub path: PathBuf,
    /// Receiving.
    pub relay: RelayConfig,
    /// Sending.
    pub delivery: DeliveryConfig,
    /// Customer domains, in file order.
    pub domains: Vec<DomainConfig>,
    /// Warnings found while validating.
    pub warnings: Vec<ConfigProblem>,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Config::parse(path, &text)
    }

    /// Validates configuration text read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let file: FileConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax { path: path.into(), message: syntax_message(text, &e) })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut problems = Vec::new();
        let relay = relay_config(file.relay, base, &mut problems);
        let delivery = delivery_config(file.delivery, base, &mut problems);
        let domains = domain_configs(file.domain, base, &mut problems);
        problems.extend(servers_that_are_this_relay(&relay, &domains));
        if let Some(address) = &relay.postmaster
            && let Err(e) = check_postmaster(address, &domains)
        {
            problems.push(error("relay.postmaster", e));
        }
        if problems.iter().any(|p| p.severity == Severity::Error) {
            return Err(ConfigError::Invalid { problems });
        }
        Ok(Config { path: path.into(), relay, delivery, domains, warnings: problems })
    }

    /// The domain named `name` (case-insensitive).
    pub fn domain(&self, name: &str) -> Option<&DomainConfig> {
        self.domain_index(name).and_then(|i| self.domains.get(i))
    }

    /// Where a domain is in [`Config::domains`], by name as [`Config::domain`] finds it.
    pub fn domain_index(&self, name: &str) -> Option<usize> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.domains.iter().position(|d| d.name == name)
    }
}

/// One line for a TOML error: line and column, the domain and server entry it is in, the message.
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end().replace('\n', " ");
    let Some(span) = e.span() else { return message };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    // Name the [[domain]] (and its [[domain.server]]) the error sits in, when there is one.
    let mut context = String::new();
    let (mut domain, mut server) = (None::<String>, 0);
    for l in before.lines() {
        let l = l.trim();
        if l == "[[domain]]" {
            (domain, server) = (Some(String::new()), 0);
        } else if l == "[[domain.server]]" {
            server += 1;
        } else if l.starts_with('[') {
            (domain, server) = (None, 0);
        } else if server == 0
            && let (Some(d), Some(v)) =
                (domain.as_mut(), l.strip_prefix("name").map(str::trim_start).and_then(|r| r.strip_prefix('=')))
        {
            *d = v.trim().trim_matches('"').to_string();
        }
    }
    if let Some(d) = domain {
        context = if server > 0 { format!("domain {d}: server #{server}: ") } else { format!("domain {d}: ") };
    }
    format!("line {line}, column {column}: {context}{message}")
}

/// `relay.postmaster` must be a mailbox the relay can deliver to: one in a configured domain.
fn check_postmaster(address: &str, domains: &[DomainConfig]) -> Result<(), String> {
    let Some((local, domain)) = address.rsplit_once('@').filter(|(local, domain)| !local.is_empty() && !domain.is_empty()) else {
        return Err(format!("{address:?} is not an address like postmaster@customer.example"));
    };
    if let Some(c) = local.chars().find(|c| c.is_whitespace() || c.is_control() || "<>".contains(*c)) {
        return Err(format!("{address:?} has {c:?} in its local part"));
    }
    if !domains.iter().any(|d| d.name == domain) {
        return Err(format!("{domain} is not a configured domain: the relay delivers only to [[domain]] blocks"));
    }
    Ok(())
}

/// Servers that are this relay: its own host name, or an address it listens on. Mail sent
/// there would come back; delivery passes such a server over (as it does one that greets with
/// the relay's name, which this cannot see), but the list is surely a mistake.
fn servers_that_are_this_relay(relay: &RelayConfig, domains: &[DomainConfig]) -> Vec<ConfigProblem> {
    let listens_on = |ip: IpAddr, port: u16| {
        relay.listen.iter().any(|l| l.port() == port && (l.ip() == ip || (l.ip().is_unspecified() && ip.is_loopback())))
    };
    let mut found = Vec::new();
    for domain in domains {
        for (i, server) in domain.servers.iter().enumerate() {
            let listened = server.host.parse().is_ok_and(|ip| listens_on(ip, server.port));
            if listened || server.host == relay.hostname {
                found.push(ConfigProblem {
                    location: format!("domain {}: server #{} ({})", domain.name, i + 1, server.host),
                    severity: Severity::Warning,
                    message: format!(
                        "this is the relay itself ({}): mail sent there would loop back, so delivery passes it over; list the customer's own servers",
                        if listened { format!("it listens on port {}", server.port) } else { "its hostname".into() }
                    ),
                });
            }
        }
    }
    found
}

/// What would keep the widget in `relay.web_root` from working. Warnings: mail flows without it.
fn widget_problems(root: &Path, served: bool) -> Vec<ConfigProblem> {
    let warning = |message: String| ConfigProblem { location: "relay.web_root".into(), severity: Severity::Warning, message };
    if !served {
        return vec![warning("the widget is served on relay.admin_listen, which is not set".into())];
    }
    if !root.join("index.html").is_file() {
        return vec![warning(format!(
            "{} has no index.html: the widget is not served; name the repository's web/ directory",
            root.display()
        ))];
    }
    if !root.join("pkg/mxrelay_policy_web_bg.wasm").is_file() {
        return vec![warning(format!(
            "{} has no pkg/mxrelay_policy_web_bg.wasm: the widget cannot check or preview server lists until web/build.sh builds it",
            root.display()
        ))];
    }
    Vec::new()
}

fn error(location: impl Into<String>, message: impl Into<String>) -> ConfigProblem {
    ConfigProblem { location: location.into(), severity: Severity::Error, message: message.into() }
}

fn duration_field(location: &str, value: Option<String>, default: Duration, problems: &mut Vec<ConfigProblem>) -> Duration {
    match value.map(|v| parse_duration(&v)) {
        None => default,
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            problems.push(error(location, e));
            default
        }
    }
}

/// A certificate and its key (PEM files, relative to the config's directory) under the keys
/// `names`: both or neither, and each a file.
fn pem_pair(
    names: [&str; 2],
    paths: [Option<PathBuf>; 2],
    base: &Path,
    problems: &mut Vec<ConfigProblem>,
) -> (Option<PathBuf>, Option<PathBuf>) {
    let [cert, key] = paths.map(|p| p.map(|p| base.join(p)));
    let [cert_name, key_name] = names;
    let short = |name: &str| name.rsplit('.').next().unwrap_or(name).to_string();
    match (&cert, &key) {
        (Some(_), None) => {
            problems.push(error(key_name, format!("{cert_name} is set: set {} to its private key file", short(key_name))))
        }
        (None, Some(_)) => {
            problems.push(error(cert_name, format!("{key_name} is set: set {} to its certificate file", short(cert_name))))
        }
        (Some(_), Some(_)) | (None, None) => {}
    }
    for (name, path) in [(cert_name, &cert), (key_name, &key)] {
        if let Some(p) = path
            && !p.is_file()
        {
            problems.push(error(name, format!("{} is not a file", p.display())));
        }
    }
    (cert, key)
}

fn relay_config(file: FileRelay, base: &Path, problems: &mut Vec<ConfigProblem>) -> RelayConfig {
    if let Err(e) = parse_host(&file.hostname) {
        problems.push(error("relay.hostname", e));
    }
    let mut listen = Vec::new();
    for (i, text) in file.listen.iter().enumerate() {
        match text.parse::<SocketAddr>() {
            Ok(a) => listen.push(a),
            Err(_) => problems.push(error(
                format!("relay.listen[{i}]"),
                format!("{text:?} is not an address:port like 127.0.0.1:2525 or [::1]:2525"),
            )),
        }
    }
    if file.listen.is_empty() {
        problems.push(error("relay.listen", "no listen address: add one like \"127.0.0.1:2525\""));
    }
    let accept_from = match file.accept_from {
        None => vec![Cidr::parse("127.0.0.0/8").expect("literal"), Cidr::parse("::1/128").expect("literal")],
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, text)| {
                Cidr::parse(text).map_err(|e| problems.push(error(format!("relay.accept_from[{i}]"), e))).ok()
            })
            .collect(),
    };
    let admin_listen = file.admin_listen.and_then(|text| {
        text.parse::<SocketAddr>()
            .map_err(|_| {
                problems.push(error("relay.admin_listen", format!("{text:?} is not an address:port like 127.0.0.1:8025")))
            })
            .ok()
    });
    let admin_token = file.admin_token.filter(|t| {
        let weak = t.trim().len() < 16;
        if weak {
            problems.push(error("relay.admin_token", "use at least 16 characters (e.g. `openssl rand -hex 16`)"));
        }
        !weak
    });
    let (tls_cert, tls_key) = pem_pair(["relay.tls_cert", "relay.tls_key"], [file.tls_cert, file.tls_key], base, problems);
    let require_tls = file.require_tls.unwrap_or(false);
    if require_tls && tls_cert.is_none() {
        problems.push(error(
            "relay.require_tls",
            "mail would be refused from every client: set tls_cert and tls_key to offer STARTTLS",
        ));
    }
    let max_message_size = file.max_message_size.unwrap_or(25 << 20);
    if max_message_size < 1024 {
        problems.push(error(
            "relay.max_message_size",
            format!("{max_message_size} bytes is too small for any real message; use at least 1024"),
        ));
    }
    let max_recipients = file.max_recipients.unwrap_or(100);
    if max_recipients == 0 {
        problems.push(error("relay.max_recipients", "0 would refuse every message; RFC 5321 requires at least 100"));
    }
    let max_hops = file.max_hops.unwrap_or(50);
    if max_hops == 0 {
        problems.push(error(
            "relay.max_hops",
            "0 would refuse mail from every MTA, since each adds a Received: field; Postfix allows 50",
        ));
    }
    let max_connections = file.max_connections.unwrap_or(1000);
    if max_connections == 0 {
        problems.push(error("relay.max_connections", "0 would refuse every connection; use at least 1"));
    }
    let max_connections_per_client = file.max_connections_per_client.unwrap_or(100);
    if max_connections_per_client == 0 {
        problems.push(error("relay.max_connections_per_client", "0 would refuse every client; use at least 1"));
    }
    let max_data_in_memory = file.max_data_in_memory.unwrap_or(512 << 20);
    if max_data_in_memory < MIN_DATA_IN_MEMORY {
        problems.push(error(
            "relay.max_data_in_memory",
            format!(
                "{max_data_in_memory} bytes would have most mail arrive one message at a time; use at least {MIN_DATA_IN_MEMORY} (1 MiB)"
            ),
        ));
    }
    RelayConfig {
        hostname: file.hostname.trim_end_matches('.').to_ascii_lowercase(),
        listen,
        queue: base.join(file.queue),
        accept_from,
        max_message_size,
        max_recipients,
        max_hops,
        max_connections,
        max_connections_per_client,
        max_data_in_memory,
        idle_timeout: duration_field("relay.idle_timeout", file.idle_timeout, Duration::from_secs(300), problems),
        shutdown_timeout: duration_field("relay.shutdown_timeout", file.shutdown_timeout, Duration::from_secs(30), problems),
        greet_pause: duration_field("relay.greet_pause", file.greet_pause, Duration::ZERO, problems),
        admin_listen,
        admin_token,
        web_root: file.web_root.map(|root| {
            let root = base.join(root);
            problems.extend(widget_problems(&root, admin_listen.is_some()));
            root
        }),
        tls_cert,
        tls_key,
        require_tls,
        postmaster: file.postmaster.map(|a| match a.trim().rsplit_once('@') {
            Some((local, domain)) => format!("{local}@{}", domain.trim_end_matches('.').to_ascii_lowercase()),
            None => a.trim().to_string(),
        }),
    }
}

/// The least `relay.max_data_in_memory` allowed.
const MIN_DATA_IN_MEMORY: u64 = 1 << 20;

/// Default retry schedule: quick first retries for short outages, then backing off to RFC
/// 5321's "one every two or three hours". Recovery of a dead server retries at once anyway.
pub const DEFAULT_RETRY: [Duration; 7] = [
    Duration::from_secs(60),
    Duration::from_secs(5 * 60),
    Duration::from_secs(15 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(60 * 60),
    Duration::from_secs(2 * 60 * 60),
    Duration::from_secs(3 * 60 * 60),
];

/// `delivery.bind_address` (IPv4) or `delivery.bind_address6` (IPv6): a specific address of
/// the key's family; one of the other family is pointed to the other key.
fn source_address(key: &str, v6: bool, text: Option<String>, problems: &mut Vec<ConfigProblem>) -> Option<IpAddr> {
    let text = text?;
    let (family, example, other) =
        if v6 { ("IPv6", "2001:db8::25", "delivery.bind_address") } else { ("IPv4", "192.0.2.25", "delivery.bind_address6") };
    match text.parse::<IpAddr>() {
        Ok(ip) if ip.is_ipv6() == v6 && !ip.is_unspecified() => return Some(ip),
        Ok(ip) if ip.is_ipv6() != v6 => {
            problems.push(error(key, format!("{text:?} is not an {family} address like {example} (it goes in {other})")));
        }
        Ok(_) => problems.push(error(key, format!("{text:?} means any address: give one of this machine's, like {example}"))),
        Err(_) => problems.push(error(key, format!("{text:?} is not an {family} address like {example}"))),
    }
    None
}

fn delivery_config(file: FileDelivery, base: &Path, problems: &mut Vec<ConfigProblem>) -> DeliveryConfig {
    let resolver = file.resolver.and_then(|text| {
        text.parse::<SocketAddr>()
            .map_err(|_| problems.push(error("delivery.resolver", format!("{text:?} is not an IP:port like 127.0.53.53:53"))))
            .ok()
    });
    let retry = match file.retry {
        None => DEFAULT_RETRY.to_vec(),
        Some(list) if list.is_empty() => {
            problems.push(error("delivery.retry", "empty retry schedule: give at least one delay, like [\"1m\"]"));
            DEFAULT_RETRY.to_vec()
        }
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, text)| {
                parse_duration(text).map_err(|e| problems.push(error(format!("delivery.retry[{i}]"), e))).ok()
            })
            .collect(),
    };
    let concurrency_per_server = file.concurrency_per_server.unwrap_or(20);
    if concurrency_per_server == 0 {
        problems.push(error("delivery.concurrency_per_server", "0 would never deliver; use at least 1"));
    }
    let workers = file.workers.unwrap_or(64);
    if workers == 0 {
        problems.push(error("delivery.workers", "0 would never deliver; use at least 1"));
    }
    let bounce_relay = file.bounce_relay.and_then(|text| {
        let (host, port) = match text.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
                (h.trim_start_matches('[').trim_end_matches(']').to_string(), p.parse::<u16>().ok())
            }
            _ => (text.clone(), Some(25)),
        };
        match (parse_host(&host), port) {
            (Ok((_, host)), Some(port)) if port > 0 => Some(Server { port, ..Server::new(host, 0) }),
            (Err(e), _) => {
                problems.push(error("delivery.bounce_relay", e));
                None
            }
            (Ok(_), _) => {
                problems.push(error(
                    "delivery.bounce_relay",
                    format!("{text:?}: the port must be 1 to 65535, like mx.example.net:25"),
                ));
                None
            }
        }
    });
    let bind_address = source_address("delivery.bind_address", false, file.bind_address, problems).and_then(|ip| match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    });
    let bind_address6 = source_address("delivery.bind_address6", true, file.bind_address6, problems).and_then(|ip| match ip {
        IpAddr::V6(v6) => Some(v6),
        IpAddr::V4(_) => None,
    });
    let delay_warning = file
        .delay_warning
        .and_then(|text| parse_duration(&text).map_err(|e| problems.push(error("delivery.delay_warning", e))).ok());
    let (tls_client_cert, tls_client_key) = pem_pair(
        ["delivery.tls_client_cert", "delivery.tls_client_key"],
        [file.tls_client_cert, file.tls_client_key],
        base,
        problems,
    );
    DeliveryConfig {
        tls_client_cert,
        tls_client_key,
        bounce_relay,
        delay_warning,
        bind_address,
        bind_address6,
        resolver,
        retry,
        max_queue_lifetime: duration_field(
            "delivery.max_queue_lifetime",
            file.max_queue_lifetime,
            Duration::from_secs(5 * 86400),
            problems,
        ),
        connect_timeout: duration_field("delivery.connect_timeout", file.connect_timeout, Duration::from_secs(30), problems),
        command_timeout: duration_field("delivery.command_timeout", file.command_timeout, Duration::from_secs(300), problems),
        data_timeout: duration_field("delivery.data_timeout", file.data_timeout, Duration::from_secs(600), problems),
        probe_interval: duration_field("delivery.probe_interval", file.probe_interval, Duration::from_secs(5), problems),
        connection_cache_time: duration_field(
            "delivery.connection_cache_time",
            file.connection_cache_time,
            Duration::from_secs(5),
            problems,
        ),
        concurrency_per_server,
        workers,
    }
}

fn raw_number(value: Option<toml::Value>) -> Option<RawNumber> {
    value.map(|v| match v {
        toml::Value::Integer(i) => RawNumber::Int(i),
        toml::Value::String(s) => RawNumber::Text(s),
        other @ (toml::Value::Float(_)
        | toml::Value::Boolean(_)
        | toml::Value::Datetime(_)
        | toml::Value::Array(_)
        | toml::Value::Table(_)) => RawNumber::Text(other.to_string()),
    })
}

fn domain_configs(files: Vec<FileDomain>, base: &Path, problems: &mut Vec<ConfigProblem>) -> Vec<DomainConfig> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, d) in files.into_iter().enumerate() {
        let name = d.name.trim().trim_end_matches('.').to_ascii_lowercase();
        let location = if name.is_empty() { format!("domain #{}", i + 1) } else { format!("domain {name}") };
        if let Err(e) = parse_host(&name) {
            problems.push(error(format!("{location}: name"), e));
        }
        if !seen.insert(name.clone()) {
            problems.push(error(format!("{location}: name"), "this domain is configured twice; merge the two [[domain]] blocks"));
        }
        let policy = match d.policy.as_deref().map(str::trim) {
            None | Some("builtin") => PolicySource::Builtin,
            Some(p) => PolicySource::Module(base.join(p)),
        };
        if let PolicySource::Module(path) = &policy
            && !path.is_file()
        {
            problems.push(error(
                format!("{location}: policy"),
                format!("{} is not a file; use \"builtin\" or the path of a .wasm policy component", path.display()),
            ));
        }
        let tls = match d.tls.as_deref().map(str::trim) {
            None | Some("opportunistic") => TlsMode::Opportunistic,
            Some("none") => TlsMode::None,
            Some("required") => TlsMode::Required,
            Some(other) => {
                problems.push(error(
                    format!("{location}: tls"),
                    format!("{other:?} is not a TLS mode; use \"none\", \"opportunistic\" or \"required\""),
                ));
                TlsMode::Opportunistic
            }
        };
        let tls_ca = d.tls_ca.map(|p| base.join(p));
        if let Some(ca) = &tls_ca {
            if !ca.is_file() {
                problems.push(error(format!("{location}: tls_ca"), format!("{} is not a file", ca.display())));
            }
            if tls != TlsMode::Required {
                problems.push(error(
                    format!("{location}: tls_ca"),
                    format!(
                        "checks certificates only with tls = \"required\" (with \"{}\" a failed check would still deliver); set tls = \"required\" or remove tls_ca",
                        tls.as_str()
                    ),
                ));
            }
        }
        if d.hold {
            problems.push(ConfigProblem {
                location: format!("{location}: hold"),
                severity: Severity::Warning,
                message: "mail for this domain is held on arrival: nothing new is delivered until `mxrelay queue release`".into(),
            });
        }
        let max_queue_lifetime = d.max_queue_lifetime.and_then(|v| match parse_duration(&v) {
            Ok(lifetime) => Some(lifetime),
            Err(e) => {
                problems.push(error(format!("{location}: max_queue_lifetime"), e));
                None
            }
        });
        let policy_settings_json = serde_json::to_string(&d.policy_config.unwrap_or_default()).unwrap_or_else(|_| "{}".into());
        let raw: Vec<RawServer> = d
            .server
            .into_iter()
            .map(|s| RawServer {
                host: s.host,
                port: raw_number(s.port),
                preference: raw_number(s.preference),
                weight: raw_number(s.weight),
            })
            .collect();
        let as_config = |p: Problem| ConfigProblem { location: location.clone(), severity: p.severity, message: p.to_string() };
        match validate_servers(&raw) {
            Ok((servers, warnings)) => {
                problems.extend(warnings.into_iter().map(as_config));
                out.push(DomainConfig {
                    name,
                    policy,
                    policy_settings_json,
                    servers,
                    tls,
                    tls_ca,
                    hold: d.hold,
                    max_queue_lifetime,
                });
            }
            Err(found) => problems.extend(found.into_iter().map(as_config)),
        }
    }
    if out.is_empty() && !problems.iter().any(|p| p.severity == Severity::Error) {
        problems.push(error("domain", "no [[domain]] configured: the relay would refuse every recipient"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
[relay]
hostname = "relay.example.net"
listen = ["127.0.0.1:2525"]
queue = "var/queue"

[[domain]]
name = "mailroutedemo.com"
policy = "builtin"
[[domain.server]]
host = "mail.mailroutedemo.com"
preference = 10
[[domain.server]]
host = "192.0.2.20"
port = 2526
preference = 20
"#;

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(Path::new("/etc/mxrelay/test.toml"), text) {
            Ok(c) => c.warnings.iter().map(ToString::to_string).collect(),
            Err(ConfigError::Invalid { problems }) => problems.iter().map(ToString::to_string).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    /// The widget's directory is checked at load, so an operator learns why the page would
    /// be empty or inert from `mxrelay check`, not from a customer.
    #[test]
    fn a_widget_directory_that_cannot_serve_the_widget_is_a_warning() {
        let dir = tempfile::tempdir().expect("dir");
        let config = |admin: &str| {
            let text = SEED.replacen("[[domain]]", &format!("{admin}web_root = \"web\"\n\n[[domain]]"), 1);
            let path = dir.path().join("relay.toml");
            let c = Config::parse(&path, &text).expect("warnings only");
            c.warnings.iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        let admin = "admin_listen = \"127.0.0.1:8025\"\n";
        let web = dir.path().join("web");
        assert_eq!(config(""), ["relay.web_root: the widget is served on relay.admin_listen, which is not set"]);
        let only = config(admin);
        assert!(only.len() == 1 && only[0].contains("web has no index.html: the widget is not served"), "{only:?}");
        std::fs::create_dir_all(web.join("pkg")).expect("mkdir");
        std::fs::write(web.join("index.html"), "<!doctype html>").expect("write");
        let only = config(admin);
        assert!(
            only.len() == 1 && only[0].contains("has no pkg/mxrelay_policy_web_bg.wasm") && only[0].contains("web/build.sh"),
            "{only:?}"
        );
        std::fs::write(web.join("pkg/mxrelay_policy_web_bg.wasm"), b"\0asm").expect("write");
        assert!(config(admin).is_empty(), "{:?}", config(admin));
    }

    #[test]
    fn issue_example_parses_with_defaults() {
        let c = Config::parse(Path::new("/etc/mxrelay/test.toml"), SEED).expect("valid");
        assert_eq!(c.relay.queue, Path::new("/etc/mxrelay/var/queue"));
        assert_eq!(c.delivery.max_queue_lifetime, Duration::from_secs(5 * 86400));
        assert_eq!(c.domains[0].servers[1], Server { host: "192.0.2.20".into(), port: 2526, preference: 20, weight: 1 });
        assert!(c.relay.accept_from.iter().any(|r| r.contains("127.0.0.1".parse().expect("ip"))));
        assert_eq!(c.relay.max_hops, 50);
        assert_eq!((c.relay.max_connections, c.relay.max_connections_per_client), (1000, 100));
        assert_eq!(c.relay.max_data_in_memory, 512 << 20);
        assert_eq!(c.delivery.connection_cache_time, Duration::from_secs(5));
        assert!(!c.domains[0].hold);
    }

    #[test]
    fn a_domain_may_keep_its_mail_longer_or_shorter_than_the_default() {
        assert_eq!(Config::parse(Path::new("/etc/mxrelay/test.toml"), SEED).expect("valid").domains[0].max_queue_lifetime, None);
        let text = SEED.replace("name = \"mailroutedemo.com\"", "name = \"mailroutedemo.com\"\nmax_queue_lifetime = \"14d\"");
        let c = Config::parse(Path::new("/etc/mxrelay/test.toml"), &text).expect("valid");
        assert_eq!(c.domains[0].max_queue_lifetime, Some(Duration::from_secs(14 * 86400)));
        let text =
            SEED.replace("name = \"mailroutedemo.com\"", "name = \"mailroutedemo.com\"\nmax_queue_lifetime = \"two weeks\"");
        assert!(
            problems(&text)
                .iter()
                .any(|e| e.contains("domain mailroutedemo.com: max_queue_lifetime") && e.contains("\"two weeks\"")),
            "{:?}",
            problems(&text)
        );
    }

    #[test]
    fn a_server_that_is_the_relay_itself_is_a_warning() {
        let servers = "[[domain.server]]\nhost = \"127.0.0.1\"\nport = 2525\n[[domain.server]]\nhost = \"Relay.Example.Net.\"\n[[domain.server]]\nhost = \"127.0.0.1\"\nport = 2526\n";
        let text = SEED.replace("policy = \"builtin\"\n", &format!("policy = \"builtin\"\n{servers}"));
        let warned: Vec<String> = problems(&text).into_iter().filter(|w| w.contains("relay itself")).collect();
        assert_eq!(warned.len(), 2, "{warned:?}");
        assert!(
            warned[0].contains("domain mailroutedemo.com: server #1 (127.0.0.1)") && warned[0].contains("listens on port 2525"),
            "{warned:?}"
        );
        assert!(warned[1].contains("server #2 (relay.example.net)") && warned[1].contains("its hostname"), "{warned:?}");
        // Listening on every address takes in loopback.
        let text = text.replace("listen = [\"127.0.0.1:2525\"]", "listen = [\"0.0.0.0:2526\"]");
        let warned: Vec<String> = problems(&text).into_iter().filter(|w| w.contains("relay itself")).collect();
        assert!(warned.len() == 2 && warned[1].contains("server #3 (127.0.0.1)"), "{warned:?}");
    }

    #[test]
    fn a_domain_on_hold_is_a_warning() {
        let text = SEED.replace("name = \"mailroutedemo.com\"", "name = \"mailroutedemo.com\"\nhold = true");
        let c = Config::parse(Path::new("/etc/mxrelay/test.toml"), &text).expect("valid");
        assert!(c.domains[0].hold);
        assert!(problems(&text).iter().any(|w| w.contains("domain mailroutedemo.com: hold") && w.contains("held on arrival")));
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let p = problems(&SEED.replace("preference = 20", "prefrence = 20"));
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("line 16, column 1: domain mailroutedemo.com: server #2: unknown field `prefrence`"), "{p:?}");
        assert!(!p[0].contains('\n'), "one line per error: {p:?}");
        let p = problems(&SEED.replace("queue = \"var/queue\"", "queue = \"var/queue\"\nspeed = 3"));
        assert!(p[0].contains("unknown field `speed`"), "{p:?}");
    }

    #[test]
    fn server_errors_name_domain_entry_and_field() {
        let p = problems(&SEED.replace("\"192.0.2.20\"", "\"999.1.1.1\"").replace("preference = 10", "preference = 10.5"));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("domain mailroutedemo.com: server #1 (mail.mailroutedemo.com) preference: preference \"10.5\" is not a whole number"), "{p:?}");
        assert!(p[1].starts_with("domain mailroutedemo.com: server #2 (999.1.1.1) host:"), "{p:?}");
    }

    #[test]
    fn postmaster_must_be_a_mailbox_in_a_configured_domain() {
        let with =
            |address: &str| SEED.replace("queue = \"var/queue\"", &format!("queue = \"var/queue\"\npostmaster = {address:?}"));
        let c = Config::parse(Path::new("/etc/mxrelay/test.toml"), &with("Hostmaster@MailRouteDemo.com.")).expect("valid");
        assert_eq!(c.relay.postmaster.as_deref(), Some("Hostmaster@mailroutedemo.com"));
        let unset = Config::parse(Path::new("/etc/mxrelay/test.toml"), SEED).expect("valid");
        assert_eq!(unset.relay.postmaster, None);
        for (address, why) in [
            ("ops@elsewhere.example", "elsewhere.example is not a configured domain"),
            ("postmaster", "\"postmaster\" is not an address"),
            ("@mailroutedemo.com", "is not an address"),
            ("a b@mailroutedemo.com", "has ' ' in its local part"),
        ] {
            let p = problems(&with(address));
            assert!(p.iter().any(|l| l.starts_with("relay.postmaster: ") && l.contains(why)), "{address}: {p:?}");
        }
    }

    #[test]
    fn relay_errors_name_the_key() {
        let bad = SEED.replace("listen = [\"127.0.0.1:2525\"]", "listen = [\"localhost\"]\naccept_from = [\"10.0.0.0/33\"]");
        let p = problems(&bad);
        assert!(p.iter().any(|l| l.starts_with("relay.listen[0]:")), "{p:?}");
        assert!(p.iter().any(|l| l.starts_with("relay.accept_from[0]:")), "{p:?}");
        let p = problems(&SEED.replace("[[domain]]", "[delivery]\nretry = [\"5 parsecs\"]\n\n[[domain]]"));
        assert!(p.iter().any(|l| l.starts_with("delivery.retry[0]:")), "{p:?}");
        let p = problems(&SEED.replace("[[domain]]", "[delivery]\nconnection_cache_time = \"soon\"\n\n[[domain]]"));
        assert!(p.iter().any(|l| l.starts_with("delivery.connection_cache_time:")), "{p:?}");
        let p = problems(
            &SEED.replace("[[domain]]", "[delivery]\nbind_address = \"::1\"\nbind_address6 = \"0.0.0.0\"\n\n[[domain]]"),
        );
        assert!(
            p.iter()
                .any(|l| l.starts_with("delivery.bind_address: \"::1\" is not an IPv4 address") && l.contains("bind_address6")),
            "{p:?}"
        );
        assert!(p.iter().any(|l| l.starts_with("delivery.bind_address6: \"0.0.0.0\" is not an IPv6 address")), "{p:?}");
        let p = problems(&SEED.replace("[[domain]]", "[delivery]\nbind_address = \"0.0.0.0\"\n\n[[domain]]"));
        assert!(p.iter().any(|l| l.starts_with("delivery.bind_address: \"0.0.0.0\" means any address")), "{p:?}");
        let p = problems(&SEED.replace("queue = \"var/queue\"", "queue = \"var/queue\"\nmax_hops = 0"));
        assert!(p.iter().any(|l| l.starts_with("relay.max_hops: 0 would refuse")), "{p:?}");
        let p = problems(&SEED.replace("queue = \"var/queue\"", "queue = \"var/queue\"\nmax_connections = 0"));
        assert!(p.iter().any(|l| l.starts_with("relay.max_connections: 0 would refuse")), "{p:?}");
        let p = problems(&SEED.replace("queue = \"var/queue\"", "queue = \"var/queue\"\nmax_data_in_memory = 65536"));
        assert!(p.iter().any(|l| l.starts_with("relay.max_data_in_memory: 65536 bytes would have")), "{p:?}");
    }

    #[test]
    fn duplicate_domains_and_missing_policy_files() {
        let twice = format!(
            "{SEED}\n[[domain]]\nname = \"MailRouteDemo.com\"\npolicy = \"nope.wasm\"\n[[domain.server]]\nhost = \"mx.example.com\"\n"
        );
        let p = problems(&twice);
        assert!(p.iter().any(|l| l.contains("configured twice")), "{p:?}");
        assert!(p.iter().any(|l| l.contains("policy: /etc/mxrelay/nope.wasm is not a file")), "{p:?}");
    }

    #[test]
    fn cidr_ranges() {
        let net = Cidr::parse("192.0.2.0/24").expect("cidr");
        assert!(net.contains("192.0.2.200".parse().expect("ip")));
        assert!(!net.contains("192.0.3.1".parse().expect("ip")));
        assert!(net.contains("::ffff:192.0.2.1".parse().expect("ip")));
        assert!(Cidr::parse("::/0").expect("cidr").contains("2001:db8::1".parse().expect("ip")));
        assert!(Cidr::parse("300.0.0.0/8").is_err());
    }
}
