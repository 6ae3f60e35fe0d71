//! Server entries: as typed by a user ([`RawServer`]) and as validated ([`Server`]).

use core::fmt;

use crate::host::HostKind;

/// SMTP port used when an entry gives none.
pub const DEFAULT_PORT: u16 = 25;
/// Preference used when an entry gives none (the seed page's "leave it as the default").
pub const DEFAULT_PREFERENCE: u16 = 10;
/// Weight used when an entry gives none: every server of a tier gets an equal share.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Largest weight accepted; shares finer than 1 in 10 000 are not meaningful for mail.
pub const MAX_WEIGHT: u32 = 10_000;

/// A number as the user gave it: a whole number from a config file, or text from a form.
///
/// Kept raw so validation can say "`ten` is not a whole number" or "70000 is above 65535"
/// instead of failing earlier with a type error that names no entry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(untagged))]
pub enum RawNumber {
    /// A whole number (may be out of range).
    Int(i64),
    /// Text to be read as a whole number (form input, or a non-integer config value).
    Text(String),
}

impl RawNumber {
    /// The whole number this stands for, or `None` if it is not one.
    pub fn as_integer(&self) -> Option<i64> {
        match self {
            RawNumber::Int(n) => Some(*n),
            RawNumber::Text(t) => {
                let t = t.trim();
                let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                t.parse::<i64>().ok()
            }
        }
    }

    /// True when the field was left empty (form input): the default applies.
    pub fn is_blank(&self) -> bool {
        matches!(self, RawNumber::Text(t) if t.trim().is_empty())
    }
}

impl fmt::Display for RawNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawNumber::Int(n) => write!(f, "{n}"),
            RawNumber::Text(t) => write!(f, "{t:?}"),
        }
    }
}

/// One inbound server entry as the user typed it. A key it does not know is refused, so that
/// a misspelt `prefrence` is not read as the default preference.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize), serde(deny_unknown_fields))]
pub struct RawServer {
    /// Host name, IPv4 literal or IPv6 literal (brackets allowed).
    pub host: String,
    /// TCP port; `None` or blank means [`DEFAULT_PORT`].
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "Option::is_none"))]
    pub port: Option<RawNumber>,
    /// MX-style preference; `None` or blank means [`DEFAULT_PREFERENCE`].
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "Option::is_none"))]
    pub preference: Option<RawNumber>,
    /// Share inside its tier; `None` or blank means [`DEFAULT_WEIGHT`].
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "Option::is_none"))]
    pub weight: Option<RawNumber>,
}

impl RawServer {
    /// An entry with a host and a preference, port and weight left at their defaults.
    pub fn new(host: impl Into<String>, preference: i64) -> Self {
        RawServer { host: host.into(), preference: Some(RawNumber::Int(preference)), ..RawServer::default() }
    }
}

/// A validated server entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Server {
    /// Normalised host: lower-case name without trailing dot, or an IP literal without brackets.
    pub host: String,
    /// TCP port, 1..=65535.
    pub port: u16,
    /// MX-style preference; lower is tried first.
    pub preference: u16,
    /// Share inside its tier, 1..=[`MAX_WEIGHT`].
    pub weight: u32,
}

impl Server {
    /// A server with the default port and weight.
    pub fn new(host: impl Into<String>, preference: u16) -> Self {
        Server { host: host.into(), port: DEFAULT_PORT, preference, weight: DEFAULT_WEIGHT }
    }

    /// Whether the host is a DNS name or an IP literal. Cheap: a validated host is already
    /// normalised (IPv6 without brackets, IPv4 dotted quad), so nothing is parsed again.
    pub fn kind(&self) -> HostKind {
        if self.host.contains(':') {
            HostKind::Ipv6
        } else if self.host.parse::<core::net::Ipv4Addr>().is_ok() {
            HostKind::Ipv4
        } else {
            HostKind::Name
        }
    }

    /// `host:port`, with IPv6 literals in brackets: `[2001:db8::1]:25`.
    pub fn address(&self) -> String {
        match self.kind() {
            HostKind::Ipv6 => format!("[{}]:{}", self.host, self.port),
            HostKind::Name | HostKind::Ipv4 => format!("{}:{}", self.host, self.port),
        }
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.address())
    }
}

/// The seed page's largest example, as `(host, preference)`: three primary servers, two
/// backups and three last-resort servers. Tests, benchmarks and docs share it.
pub const SEED_PAGE_EXAMPLE: [(&str, u16); 8] = [
    ("mail.mailroutedemo.com", 10),
    ("mail2.mailroutedemo.com", 10),
    ("mail3.mailroutedemo.com", 10),
    ("backup1.mailroutedemo.com", 20),
    ("backup2.mailroutedemo.com", 20),
    ("lastresort1.mailroutedemo.com", 30),
    ("lastresort2.mailroutedemo.com", 30),
    ("lastresort3.mailroutedemo.com", 30),
];

/// [`SEED_PAGE_EXAMPLE`] as validated servers.
pub fn seed_page_example() -> Vec<Server> {
    SEED_PAGE_EXAMPLE.iter().map(|(host, preference)| Server::new(*host, *preference)).collect()
}
