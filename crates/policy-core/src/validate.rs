//! Validation of a server list: every problem at once, each naming its entry and field.

use core::fmt;
use std::collections::BTreeMap;

use crate::entry::{DEFAULT_PORT, DEFAULT_PREFERENCE, DEFAULT_WEIGHT, MAX_WEIGHT, RawNumber, RawServer, Server};
use crate::host;

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Severity {
    /// The list cannot be used until this is fixed.
    Error,
    /// The list works, but probably not as the user intends.
    Warning,
}

/// Which field of an entry a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Field {
    /// The list as a whole (e.g. it is empty).
    Servers,
    /// The host name or IP address.
    Host,
    /// The TCP port.
    Port,
    /// The preference.
    Preference,
    /// The weight inside the tier.
    Weight,
}

impl Field {
    /// The field's name as used in config files and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Field::Servers => "servers",
            Field::Host => "host",
            Field::Port => "port",
            Field::Preference => "preference",
            Field::Weight => "weight",
        }
    }
}

/// A stable, machine-readable name for each kind of problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum ProblemCode {
    /// No server listed.
    EmptyList,
    /// The host is not a valid host name.
    HostSyntax,
    /// The host is `.`, the RFC 7505 null MX.
    NullMx,
    /// The host looks like an IP literal but is malformed.
    IpLiteral,
    /// A number field holds something that is not a whole number.
    NotANumber,
    /// A number field is outside its range.
    OutOfRange,
    /// The same host and port appear twice.
    Duplicate,
    /// Warning: a single server, so nothing takes over when it is down.
    NoBackup,
    /// Warning: a weight on a server that is alone in its tier does nothing.
    WeightIgnored,
    /// A problem a policy module reported in its own terms (e.g. about its settings).
    Policy,
}

impl ProblemCode {
    /// The stable kebab-case name used in the WIT interface, the API and the widget.
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemCode::EmptyList => "empty-list",
            ProblemCode::HostSyntax => "host-syntax",
            ProblemCode::NullMx => "null-mx",
            ProblemCode::IpLiteral => "ip-literal",
            ProblemCode::NotANumber => "not-a-number",
            ProblemCode::OutOfRange => "out-of-range",
            ProblemCode::Duplicate => "duplicate",
            ProblemCode::NoBackup => "no-backup",
            ProblemCode::WeightIgnored => "weight-ignored",
            ProblemCode::Policy => "policy",
        }
    }

    /// The code for a stable name, the inverse of [`ProblemCode::as_str`].
    pub fn from_name(name: &str) -> Option<ProblemCode> {
        ALL_CODES.iter().copied().find(|c| c.as_str() == name)
    }
}

const ALL_CODES: [ProblemCode; 10] = [
    ProblemCode::EmptyList,
    ProblemCode::HostSyntax,
    ProblemCode::NullMx,
    ProblemCode::IpLiteral,
    ProblemCode::NotANumber,
    ProblemCode::OutOfRange,
    ProblemCode::Duplicate,
    ProblemCode::NoBackup,
    ProblemCode::WeightIgnored,
    ProblemCode::Policy,
];

/// One problem found in a server list.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Problem {
    /// Zero-based index of the entry, `None` for problems with the list as a whole.
    pub index: Option<u32>,
    /// The entry's host as typed (trimmed), for messages that must name the entry.
    pub host: String,
    /// The field at fault.
    pub field: Field,
    /// Error or warning.
    pub severity: Severity,
    /// Machine-readable kind.
    pub code: ProblemCode,
    /// What is wrong and what would be right, in plain words.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) if self.host.is_empty() => write!(f, "server #{} {}: {}", i + 1, self.field.as_str(), self.message),
            Some(i) => write!(f, "server #{} ({}) {}: {}", i + 1, self.host, self.field.as_str(), self.message),
            // Problems about a policy setting carry the setting's name in `host`.
            None if !self.host.is_empty() => write!(f, "{}: {}", self.host, self.message),
            None => write!(f, "{}: {}", self.field.as_str(), self.message),
        }
    }
}

/// Every problem in `raw`, errors first then warnings, each group in entry order.
pub fn validate(raw: &[RawServer]) -> Vec<Problem> {
    match validate_servers(raw) {
        Ok((_, warnings)) => warnings,
        Err(problems) => problems,
    }
}

/// Validates and normalises `raw`. `Ok` holds the servers and any warnings; `Err` holds every
/// problem (errors and warnings) when at least one is an error.
pub fn validate_servers(raw: &[RawServer]) -> Result<(Vec<Server>, Vec<Problem>), Vec<Problem>> {
    let mut problems = Vec::new();
    if raw.is_empty() {
        problems.push(Problem {
            index: None,
            host: String::new(),
            field: Field::Servers,
            severity: Severity::Error,
            code: ProblemCode::EmptyList,
            message: "no servers listed: add at least one server that accepts mail for this domain".into(),
        });
        return Err(problems);
    }

    let mut servers = Vec::with_capacity(raw.len());
    let mut seen: BTreeMap<(String, u16), usize> = BTreeMap::new();
    for (i, entry) in raw.iter().enumerate() {
        let mut report = |field, code, message| {
            problems.push(Problem {
                index: Some(i as u32),
                host: entry.host.trim().to_string(),
                field,
                severity: Severity::Error,
                code,
                message,
            });
        };
        let host = match host::parse(&entry.host) {
            Ok((_, normalised)) => Some(normalised),
            Err(e) => {
                let code = match e {
                    host::HostError::NullMx => ProblemCode::NullMx,
                    host::HostError::BadIpv4 | host::HostError::BadIpv6 => ProblemCode::IpLiteral,
                    host::HostError::Empty
                    | host::HostError::TooLong(_)
                    | host::HostError::EmptyLabel
                    | host::HostError::LabelTooLong(_)
                    | host::HostError::BadCharacter(_)
                    | host::HostError::HyphenEdge(_)
                    | host::HostError::NumericTld(_)
                    | host::HostError::PortInHost { .. }
                    | host::HostError::BracketedName(_) => ProblemCode::HostSyntax,
                };
                report(Field::Host, code, e.message(entry.host.trim()));
                None
            }
        };
        let port = number(entry.port.as_ref(), DEFAULT_PORT.into(), 1, 65535, Field::Port, &mut report);
        let preference = number(entry.preference.as_ref(), DEFAULT_PREFERENCE.into(), 0, 65535, Field::Preference, &mut report);
        let weight = number(entry.weight.as_ref(), DEFAULT_WEIGHT.into(), 1, MAX_WEIGHT.into(), Field::Weight, &mut report);

        if let (Some(host), Some(port)) = (&host, port) {
            let port = port as u16;
            if let Some(first) = seen.insert((host.clone(), port), i) {
                let shown = Server::new(host.clone(), 0).with_port(port).address();
                report(
                    Field::Host,
                    ProblemCode::Duplicate,
                    format!(
                        "{shown} is listed twice (servers #{} and #{}); remove one, or give them different ports",
                        first + 1,
                        i + 1
                    ),
                );
            }
        }
        if let (Some(host), Some(port), Some(preference), Some(weight)) = (host, port, preference, weight) {
            servers.push(Server { host, port: port as u16, preference: preference as u16, weight: weight as u32 });
        }
    }

    let has_errors = !problems.is_empty();
    if !has_errors {
        problems.extend(warnings(raw, &servers));
        return Ok((servers, problems));
    }
    Err(problems)
}

impl Server {
    fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
}

/// Reads a number field, reporting a problem and returning `None` when it is unusable.
fn number(
    raw: Option<&RawNumber>,
    default: i64,
    min: i64,
    max: i64,
    field: Field,
    report: &mut impl FnMut(Field, ProblemCode, String),
) -> Option<i64> {
    let hint = match field {
        Field::Port => format!("use {min} to {max} (25 is the standard SMTP port)"),
        Field::Preference => format!("use {min} to {max}; lower numbers are tried first"),
        Field::Weight => format!("use {min} to {max}; a server with weight 2 gets twice the share of one with weight 1"),
        Field::Servers | Field::Host => format!("use {min} to {max}"),
    };
    let Some(raw) = raw.filter(|r| !r.is_blank()) else {
        return Some(default);
    };
    let name = field.as_str();
    match raw.as_integer() {
        None => {
            report(field, ProblemCode::NotANumber, format!("{name} {raw} is not a whole number; {hint}"));
            None
        }
        Some(n) if n < min || n > max => {
            let why = match (field, n) {
                (Field::Weight, 0) => "would never receive mail".to_string(),
                (Field::Port, 0) => "is not a usable TCP port".to_string(),
                _ => format!("is outside {min}..={max}"),
            };
            report(field, ProblemCode::OutOfRange, format!("{name} {n} {why}; {hint}"));
            None
        }
        Some(n) => Some(n),
    }
}

fn warnings(raw: &[RawServer], servers: &[Server]) -> Vec<Problem> {
    let mut out = Vec::new();
    if servers.len() == 1 {
        out.push(Problem {
            index: Some(0),
            host: servers[0].host.clone(),
            field: Field::Preference,
            severity: Severity::Warning,
            code: ProblemCode::NoBackup,
            message: "this is the only server: while it is down mail waits in the queue; add a backup server with a higher preference for instant failover".into(),
        });
    }
    for (i, (entry, server)) in raw.iter().zip(servers).enumerate() {
        let explicit_weight = entry.weight.as_ref().is_some_and(|w| !w.is_blank());
        let alone = servers.iter().filter(|s| s.preference == server.preference).count() == 1;
        if explicit_weight && alone && servers.len() > 1 {
            out.push(Problem {
                index: Some(i as u32),
                host: server.host.clone(),
                field: Field::Weight,
                severity: Severity::Warning,
                code: ProblemCode::WeightIgnored,
                message: format!(
                    "weight has no effect: this is the only server with preference {}; weights share traffic between servers of equal preference",
                    server.preference
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(host: &str, pref: i64) -> RawServer {
        RawServer::new(host, pref)
    }

    fn errors(list: &[RawServer]) -> Vec<(Option<u32>, Field, ProblemCode)> {
        validate(list).into_iter().filter(|p| p.severity == Severity::Error).map(|p| (p.index, p.field, p.code)).collect()
    }

    #[test]
    fn seed_examples_are_valid() {
        let list: Vec<_> = crate::SEED_PAGE_EXAMPLE.iter().map(|(h, p)| raw(h, i64::from(*p))).collect();
        let (servers, warnings) = validate_servers(&list).expect("valid");
        assert_eq!(servers.len(), 8);
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn empty_list_is_an_error() {
        assert_eq!(errors(&[]), vec![(None, Field::Servers, ProblemCode::EmptyList)]);
    }

    #[test]
    fn reports_every_problem_at_once_naming_entry_and_field() {
        let list = vec![
            raw("mail.example.com", 10),
            raw("999.1.1.1", 10),
            RawServer { host: "mx.example.com".into(), preference: Some(RawNumber::Int(70000)), ..Default::default() },
            RawServer { host: "mx2.example.com".into(), preference: Some(RawNumber::Text("ten".into())), ..Default::default() },
            RawServer { host: "mx3.example.com".into(), port: Some(RawNumber::Int(0)), ..Default::default() },
            RawServer { host: "mx4.example.com".into(), port: Some(RawNumber::Int(65536)), ..Default::default() },
            raw(".", 0),
            raw("MAIL.example.com.", 20),
            RawServer { host: "mx5.example.com".into(), weight: Some(RawNumber::Int(0)), ..Default::default() },
            RawServer { host: "mx6.example.com".into(), weight: Some(RawNumber::Int(1_000_000)), ..Default::default() },
            RawServer { host: "mx7.example.com".into(), preference: Some(RawNumber::Int(-1)), ..Default::default() },
            raw("bad_host.example.com", 10),
        ];
        assert_eq!(
            errors(&list),
            vec![
                (Some(1), Field::Host, ProblemCode::IpLiteral),
                (Some(2), Field::Preference, ProblemCode::OutOfRange),
                (Some(3), Field::Preference, ProblemCode::NotANumber),
                (Some(4), Field::Port, ProblemCode::OutOfRange),
                (Some(5), Field::Port, ProblemCode::OutOfRange),
                (Some(6), Field::Host, ProblemCode::NullMx),
                (Some(7), Field::Host, ProblemCode::Duplicate),
                (Some(8), Field::Weight, ProblemCode::OutOfRange),
                (Some(9), Field::Weight, ProblemCode::OutOfRange),
                (Some(10), Field::Preference, ProblemCode::OutOfRange),
                (Some(11), Field::Host, ProblemCode::HostSyntax),
            ]
        );
        let text: Vec<String> = validate(&list).iter().map(ToString::to_string).collect();
        assert!(text[0].starts_with("server #2 (999.1.1.1) host:"), "{}", text[0]);
        assert!(text[2].contains("\"ten\" is not a whole number"), "{}", text[2]);
        assert!(text[6].contains("servers #1 and #8"), "{}", text[6]);
    }

    #[test]
    fn same_host_on_other_port_is_not_a_duplicate() {
        let list = vec![raw("mx.example.com", 10), RawServer { port: Some(RawNumber::Int(2525)), ..raw("mx.example.com", 10) }];
        assert!(errors(&list).is_empty());
    }

    #[test]
    fn blank_form_fields_take_defaults() {
        let entry = RawServer {
            host: "mx.example.com".into(),
            port: Some(RawNumber::Text(" ".into())),
            preference: Some(RawNumber::Text(String::new())),
            weight: None,
        };
        let (servers, _) = validate_servers(&[entry]).expect("valid");
        assert_eq!(servers[0], Server::new("mx.example.com", DEFAULT_PREFERENCE));
    }

    #[test]
    fn numbers_from_text_are_strict() {
        for (text, ok) in
            [("10", true), (" 20 ", true), ("+5", true), ("1e3", false), ("10.5", false), ("0x10", false), ("ten", false)]
        {
            let entry =
                RawServer { host: "mx.example.com".into(), preference: Some(RawNumber::Text(text.into())), ..Default::default() };
            assert_eq!(errors(&[entry]).is_empty(), ok, "{text:?}");
        }
    }

    #[test]
    fn warnings_do_not_block() {
        let (_, warnings) = validate_servers(&[raw("mx.example.com", 10)]).expect("valid");
        assert_eq!(warnings.iter().map(|w| w.code).collect::<Vec<_>>(), vec![ProblemCode::NoBackup]);
        let list = vec![RawServer { weight: Some(RawNumber::Int(3)), ..raw("a.example.com", 10) }, raw("b.example.com", 20)];
        let (_, warnings) = validate_servers(&list).expect("valid");
        assert_eq!(warnings.iter().map(|w| (w.index, w.code)).collect::<Vec<_>>(), vec![(Some(0), ProblemCode::WeightIgnored)]);
    }
}
