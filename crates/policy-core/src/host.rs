//! Host syntax: RFC 1123 host names, IPv4 and IPv6 literals.

use core::net::{Ipv4Addr, Ipv6Addr};

/// What a valid host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostKind {
    /// A DNS host name, resolved to A/AAAA at delivery time.
    Name,
    /// An IPv4 literal, used as is.
    Ipv4,
    /// An IPv6 literal, used as is.
    Ipv6,
}

/// Why a host is not acceptable; each maps to one plain-words message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostError {
    Empty,
    NullMx,
    TooLong(usize),
    EmptyLabel,
    LabelTooLong(String),
    BadCharacter(char),
    HyphenEdge(String),
    NumericTld(String),
    BadIpv4,
    BadIpv6,
    /// `mail.example.com:2525` or `[2001:db8::1]:2525`: the port belongs in its own field.
    PortInHost {
        host: String,
        port: String,
    },
    /// `[mail.example.com]` (Postfix's way to skip the MX lookup, which servers here never
    /// have): brackets hold an IP address only.
    BracketedName(String),
}

impl HostError {
    pub(crate) fn message(&self, host: &str) -> String {
        match self {
            HostError::Empty => "the host is empty: enter a mail server name such as mail.example.com or an IP address".into(),
            HostError::NullMx => "\".\" is a null MX (RFC 7505: the domain accepts no mail); enter the name or IP address of a server that accepts your mail".into(),
            HostError::TooLong(n) => format!("the host name is {n} characters long; a host name has at most 253"),
            HostError::EmptyLabel => format!("\"{host}\" has an empty label (two dots in a row, or a leading dot); write it like mail.example.com"),
            HostError::LabelTooLong(l) => format!("the label \"{l}\" is {} characters long; each dot-separated part has at most 63", l.len()),
            HostError::BadCharacter(c) => format!("{c:?} is not allowed in a host name; use letters, digits, hyphens and dots"),
            HostError::HyphenEdge(l) => format!("the label \"{l}\" starts or ends with a hyphen, which host names do not allow"),
            HostError::NumericTld(l) => format!("\"{host}\" ends in the all-numeric label \"{l}\", so it is neither a host name nor an IP address"),
            HostError::BadIpv4 => format!("\"{host}\" looks like an IPv4 address but is not one: four numbers 0-255 separated by dots, like 192.0.2.10"),
            HostError::BadIpv6 => format!("\"{host}\" is not a valid IPv6 address; write it like 2001:db8::25"),
            HostError::PortInHost { host: h, port } => {
                format!("\"{host}\" has a port in it; give the host as \"{h}\" and the port ({port}) on its own")
            }
            HostError::BracketedName(name) => format!("brackets are for IP addresses; write the name without them: \"{name}\""),
        }
    }
}

/// Checks a host and returns its kind and normalised form (lower case, no trailing dot, no
/// IPv6 brackets). Surrounding white space is ignored, as a form field would.
pub fn parse_host(raw: &str) -> Result<(HostKind, String), String> {
    parse(raw).map_err(|e| e.message(raw.trim()))
}

pub(crate) fn parse(raw: &str) -> Result<(HostKind, String), HostError> {
    let host = raw.trim();
    if host.is_empty() {
        return Err(HostError::Empty);
    }
    if host == "." {
        return Err(HostError::NullMx);
    }
    // `name:port`, `v4:port` or `[v6]:port`: one colon after the host, and digits after it.
    if let Some(colon) = host.bytes().rposition(|b| b == b':')
        && let (before, port) = (&host[..colon], &host[colon + 1..])
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && (!before.contains(':') || (before.starts_with('[') && before.ends_with(']')))
        && matches!(parse(before), Ok(_) | Err(HostError::BracketedName(_)))
    {
        let bare = before.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(before);
        let bare = bare.strip_prefix("IPv6:").unwrap_or(bare);
        return Err(HostError::PortInHost { host: bare.to_string(), port: port.to_string() });
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        // One pair of brackets: the checks below look inside them once, never deeper.
        if inner.bytes().any(|b| b == b'[' || b == b']') {
            return Err(HostError::BadCharacter('['));
        }
        // RFC 5321 address literals: `[192.0.2.1]` and `[IPv6:2001:db8::1]` (or `[2001:db8::1]`).
        if let Ok(ip) = inner.parse::<Ipv4Addr>() {
            return Ok((HostKind::Ipv4, ip.to_string()));
        }
        let v6 = inner.strip_prefix("IPv6:").unwrap_or(inner);
        return match v6.parse::<Ipv6Addr>() {
            Ok(ip) => Ok((HostKind::Ipv6, ip.to_string())),
            Err(_) if !inner.contains(':') => match parse(inner) {
                Ok(_) => Err(HostError::BracketedName(inner.to_string())),
                Err(e) => Err(e),
            },
            Err(_) => Err(HostError::BadIpv6),
        };
    }
    if host.contains(':') {
        return host.parse::<Ipv6Addr>().map(|ip| (HostKind::Ipv6, ip.to_string())).map_err(|_| HostError::BadIpv6);
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.len() > 253 {
        return Err(HostError::TooLong(name.len()));
    }
    let labels: Vec<&str> = name.split('.').collect();
    let all_numeric = |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit());
    if labels.iter().all(|l| all_numeric(l)) {
        // Only digits and dots: this can only be meant as an IPv4 literal.
        return name.parse::<Ipv4Addr>().map(|ip| (HostKind::Ipv4, ip.to_string())).map_err(|_| HostError::BadIpv4);
    }
    for label in &labels {
        if label.is_empty() {
            return Err(HostError::EmptyLabel);
        }
        if let Some(c) = label.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-')) {
            return Err(HostError::BadCharacter(c));
        }
        if label.len() > 63 {
            return Err(HostError::LabelTooLong((*label).to_string()));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(HostError::HyphenEdge((*label).to_string()));
        }
    }
    if let Some(last) = labels.last().filter(|l| all_numeric(l)) {
        return Err(HostError::NumericTld((*last).to_string()));
    }
    Ok((HostKind::Name, name.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_and_literals() {
        let ok = [
            ("mail.mailroutedemo.com", HostKind::Name, "mail.mailroutedemo.com"),
            ("MAIL.Example.COM.", HostKind::Name, "mail.example.com"),
            ("  mx1.example.com ", HostKind::Name, "mx1.example.com"),
            ("localhost", HostKind::Name, "localhost"),
            ("3com.com", HostKind::Name, "3com.com"),
            ("xn--bcher-kva.example", HostKind::Name, "xn--bcher-kva.example"),
            ("192.0.2.20", HostKind::Ipv4, "192.0.2.20"),
            ("2001:DB8::1", HostKind::Ipv6, "2001:db8::1"),
            ("[2001:db8::1]", HostKind::Ipv6, "2001:db8::1"),
            ("[IPv6:2001:db8::1]", HostKind::Ipv6, "2001:db8::1"),
            ("[192.0.2.1]", HostKind::Ipv4, "192.0.2.1"),
        ];
        for (input, kind, norm) in ok {
            assert_eq!(parse(input), Ok((kind, norm.to_string())), "{input}");
        }
    }

    #[test]
    fn rejects_each_kind_of_bad_host() {
        let long_label = "a".repeat(64);
        let long_name = format!("{}.com", ["abcdefghij"; 25].join("."));
        let port = |host: &str, port: &str| HostError::PortInHost { host: host.into(), port: port.into() };
        let bad: [(&str, HostError); 21] = [
            ("", HostError::Empty),
            ("   ", HostError::Empty),
            (".", HostError::NullMx),
            ("999.1.1.1", HostError::BadIpv4),
            ("1.2.3", HostError::BadIpv4),
            ("mail..example.com", HostError::EmptyLabel),
            (".example.com", HostError::EmptyLabel),
            ("mail_1.example.com", HostError::BadCharacter('_')),
            ("mail example.com", HostError::BadCharacter(' ')),
            ("-mail.example.com", HostError::HyphenEdge("-mail".into())),
            ("mail-.example.com", HostError::HyphenEdge("mail-".into())),
            ("mail.123", HostError::NumericTld("123".into())),
            ("2001:db8::g", HostError::BadIpv6),
            ("[2001:db8::g]", HostError::BadIpv6),
            ("[192.0.2.300]", HostError::BadIpv4),
            ("mail.example.com:2525", port("mail.example.com", "2525")),
            ("192.0.2.1:25", port("192.0.2.1", "25")),
            ("[2001:db8::1]:25", port("2001:db8::1", "25")),
            ("[mail.example.com]", HostError::BracketedName("mail.example.com".into())),
            ("[mail.example.com]:25", port("mail.example.com", "25")),
            ("[[mail.example.com]]", HostError::BadCharacter('[')),
        ];
        for (input, err) in bad {
            assert_eq!(parse(input), Err(err), "{input:?}");
        }
        assert_eq!(parse(&format!("{long_label}.com")), Err(HostError::LabelTooLong(long_label.clone())));
        // Deeply nested brackets are refused at once, not looked into level by level.
        let nested = format!("{}x{}:25", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(parse(&nested), Err(HostError::BadIpv6));
        assert_eq!(parse(&nested[..nested.len() - 3]), Err(HostError::BadCharacter('[')));
        assert!(matches!(parse(&long_name), Err(HostError::TooLong(n)) if n > 253), "{}", long_name.len());
    }

    #[test]
    fn every_error_message_names_the_host_or_the_rule() {
        let e = parse_host("999.1.1.1").expect_err("invalid");
        assert!(e.contains("999.1.1.1") && e.contains("0-255"), "{e}");
    }
}
