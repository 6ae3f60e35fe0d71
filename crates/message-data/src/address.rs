//! Envelope addresses in their RFC 5321 wire form.
//!
//! [`parse_command`] reads a command line with smtp-proto, and also takes the address
//! literals that smtp-proto refuses (`<user@[192.0.2.1]>`), as RFC 5321 §4.1.2 allows and
//! Postfix does, and refuses an address that is not UTF-8, which smtp-proto would read with
//! U+FFFD in it.
//!
//! The SMTP parser hands over a mailbox with its local part unquoted (`"john doe"@example.com`
//! arrives as `john doe@example.com`), and the queue keeps it that way, so equal mailboxes
//! compare equal. Whatever writes a mailbox back onto the wire, or into a report that a program
//! reads, quotes the local part again when it is not a Dot-string (RFC 5321 §4.1.2): written
//! bare, `RCPT TO:<john doe@example.com>` is a syntax error at the next server, or worse, a
//! different address.

use std::borrow::Cow;
use std::net::{Ipv4Addr, Ipv6Addr};

use smtp_proto::Request;

/// Stands in for an address literal while the parser reads the line: it takes only domain
/// names. `.invalid` (RFC 2606) is never a real domain.
const LITERAL_STAND_IN: &str = "address-literal.invalid";

/// RFC 5321 §4.1.3 `address-literal` as this relay takes it: `[192.0.2.1]` or
/// `[IPv6:2001:db8::1]` (the general form has no registered tags).
pub fn is_address_literal(domain: &str) -> bool {
    let Some(inner) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) else {
        return false;
    };
    match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => inner[5..].parse::<Ipv6Addr>().is_ok(),
        Some(_) | None => inner.parse::<Ipv4Addr>().is_ok(),
    }
}

/// Parses one command line as smtp-proto does, but refuses a `MAIL` or `RCPT` line that is
/// not UTF-8, and takes a path whose domain is an address literal (`<user@[192.0.2.1]>`),
/// which smtp-proto refuses as bad syntax. The literal is read with a stand-in domain in its
/// place (written to `scratch`) and put back in the address, so the rest of the line is
/// parsed as usual.
pub fn parse_command<'a>(line: &'a [u8], scratch: &'a mut Vec<u8>) -> Result<Request<Cow<'a, str>>, smtp_proto::Error> {
    // smtp-proto reads bytes that are not UTF-8 as U+FFFD: `j\xf6rg@` (Latin-1) would become
    // another mailbox. An address is ASCII, or UTF-8 with SMTPUTF8 (RFC 6531).
    let not_utf8 = match line.get(..4) {
        Some(verb) if verb.eq_ignore_ascii_case(b"MAIL") => Some(smtp_proto::Error::InvalidSenderAddress),
        Some(verb) if verb.eq_ignore_ascii_case(b"RCPT") => Some(smtp_proto::Error::InvalidRecipientAddress),
        Some(_) | None => None,
    };
    if let Some(error) = not_utf8
        && std::str::from_utf8(line).is_err()
    {
        return Err(error);
    }
    let Some((at, end)) = literal_span(line) else {
        return Request::parse(&mut line.iter());
    };
    let literal = String::from_utf8_lossy(&line[at + 1..end]).into_owned();
    scratch.clear();
    scratch.extend_from_slice(&line[..=at]);
    scratch.extend_from_slice(LITERAL_STAND_IN.as_bytes());
    scratch.extend_from_slice(&line[end..]);
    let restore = |address: &mut Cow<'a, str>| {
        if let Some(local) = address.strip_suffix(LITERAL_STAND_IN)
            && local.ends_with('@')
        {
            *address = Cow::Owned(format!("{local}{literal}"));
        }
    };
    let mut request = Request::parse(&mut scratch.iter())?;
    // Only MAIL and RCPT lines are rewritten (`literal_span`).
    if let Request::Mail { from } = &mut request {
        restore(&mut from.address);
    } else if let Request::Rcpt { to } = &mut request {
        restore(&mut to.address);
    }
    Ok(request)
}

/// Where a `MAIL`/`RCPT` line's path ends in `@[literal]>`: the index of the `@` and of the
/// `>`, when the literal is one [`is_address_literal`] takes. The path ends at its first `>`
/// outside a quoted string, and its domain starts after its last `@` outside one: a quoted
/// local part may hold `@[192.0.2.1]>` and stays as it is.
fn literal_span(line: &[u8]) -> Option<(usize, usize)> {
    // smtp-proto reads a command after leading blanks too.
    let start = line.iter().position(|b| !b.is_ascii_whitespace())?;
    let verb = line.get(start..start + 4)?;
    if !verb.eq_ignore_ascii_case(b"MAIL") && !verb.eq_ignore_ascii_case(b"RCPT") {
        return None;
    }
    let open = start + line[start..].iter().position(|&b| b == b'<')?;
    let (mut quoted, mut escaped, mut at, mut close) = (false, false, None, None);
    for (i, &b) in line.iter().enumerate().skip(open + 1) {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'@' if !quoted => at = Some(i),
            b'>' if !quoted => {
                close = Some(i);
                break;
            }
            _ => {}
        }
    }
    let (at, end) = (at?, close?);
    std::str::from_utf8(&line[at + 1..end]).ok().filter(|l| is_address_literal(l))?;
    Some((at, end))
}

/// RFC 5322 `atext`, and with SMTPUTF8 any non-ASCII character (RFC 6531 §3.3).
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

/// RFC 5321 `Dot-string`: atoms of `atext` joined by single dots.
fn is_dot_string(local: &str) -> bool {
    local.split('.').all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// Why `mailbox` cannot be written in an SMTP command as [`smtp_path`] writes it, if it
/// cannot: a quoted local part may hold any printable character or space (`qtextSMTP`,
/// `quoted-pairSMTP`) but no control character, and a domain is never quoted, so it must be
/// dot-atoms (one trailing dot allowed). The parser takes `a@"b c"` and gives `a@b c`, which
/// would go on as `<a@b c>`: a parameter `c` to the next server. The null path can be written.
pub fn unwritable(mailbox: &str) -> Option<&'static str> {
    let domain_ok = match mailbox.rsplit_once('@') {
        Some((_, domain)) => is_dot_string(domain.strip_suffix('.').unwrap_or(domain)) || is_address_literal(domain),
        None => mailbox.is_empty(),
    };
    if mailbox.chars().any(char::is_control) {
        Some("a control character, which no quoting can carry")
    } else if !domain_ok {
        Some("the domain is not a domain name")
    } else {
        None
    }
}

/// `ip` as an address literal (RFC 5321 §4.1.3): `[192.0.2.1]`, `[IPv6:2001:db8::1]`; an
/// IPv4 address seen through an IPv6 socket (`::ffff:192.0.2.1`) as the IPv4 one. This is
/// the TCP-info of a `Received:` field's `from` clause, where trace parsers look for it.
pub fn address_literal(ip: std::net::IpAddr) -> String {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => format!("[{v4}]"),
        std::net::IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    }
}

/// `mailbox` as it is written between `<` and `>`: the local part quoted, with `"` and `\`
/// escaped, unless it is a Dot-string. The null path stays empty.
pub fn smtp_path(mailbox: &str) -> Cow<'_, str> {
    let Some((local, domain)) = mailbox.rsplit_once('@') else {
        return Cow::Borrowed(mailbox);
    };
    if is_dot_string(local) {
        return Cow::Borrowed(mailbox);
    }
    let mut quoted = String::with_capacity(mailbox.len() + 4);
    quoted.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push_str("\"@");
    quoted.push_str(domain);
    Cow::Owned(quoted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ip_is_written_as_an_address_literal() {
        let literal = |text: &str| address_literal(text.parse().expect("ip"));
        assert_eq!(literal("192.0.2.1"), "[192.0.2.1]");
        assert_eq!(literal("2001:db8::1"), "[IPv6:2001:db8::1]");
        assert_eq!(literal("::ffff:127.0.0.1"), "[127.0.0.1]");
        for ip in ["192.0.2.1", "2001:db8::1"] {
            let written = literal(ip);
            assert!(is_address_literal(&written), "{written} reads back as an address literal");
        }
    }

    #[test]
    fn dot_strings_stay_bare() {
        for m in ["user@example.test", "first.last+tag@example.test", "o'neil@example.test", "用户@例子.test", ""] {
            assert_eq!(smtp_path(m), m);
            assert!(matches!(smtp_path(m), Cow::Borrowed(_)), "{m} was copied");
        }
    }

    #[test]
    fn other_local_parts_are_quoted_and_escaped() {
        let cases = [
            ("john doe@example.test", r#""john doe"@example.test"#),
            ("a..b@example.test", r#""a..b"@example.test"#),
            (".a@example.test", r#"".a"@example.test"#),
            ("a.@example.test", r#""a."@example.test"#),
            ("a@b@example.test", r#""a@b"@example.test"#),
            (r#"say "hi"@example.test"#, r#""say \"hi\""@example.test"#),
            (r"back\slash@example.test", r#""back\\slash"@example.test"#),
            ("(comment)@example.test", r#""(comment)"@example.test"#),
        ];
        for (stored, wire) in cases {
            assert_eq!(smtp_path(stored), wire);
        }
    }

    /// The wire form reads back as the mailbox it came from, through the parser the relay
    /// receives with.
    #[test]
    fn the_wire_form_parses_back_to_the_same_mailbox() {
        let mailboxes =
            ["john doe@example.test", "a..b@example.test", r#"say "hi"@example.test"#, r"x\y@example.test", "plain@example.test"];
        for m in mailboxes {
            let line = format!("RCPT TO:<{}>\r\n", smtp_path(m));
            let parsed = smtp_proto::Request::parse(&mut line.as_bytes().iter());
            match parsed {
                Ok(smtp_proto::Request::Rcpt { to }) => assert_eq!(to.address, m, "{line:?}"),
                other => panic!("{line:?} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn address_literals_are_read_and_written_back() {
        let mut scratch = Vec::new();
        for (line, address) in [
            ("MAIL FROM:<user@[192.0.2.1]> SIZE=10\r\n", "user@[192.0.2.1]"),
            ("mail from:<\"a b\"@[IPv6:2001:db8::1]>\r\n", "a b@[IPv6:2001:db8::1]"),
            ("RCPT TO:<user@[127.0.0.1]> NOTIFY=NEVER\r\n", "user@[127.0.0.1]"),
            ("MAIL FROM:<\"a@[b\"@[192.0.2.1]>\r\n", "a@[b@[192.0.2.1]"),
            // A quoted local part that holds a whole literal path is the local part.
            ("MAIL FROM:<\"a@[192.0.2.9]> x\"@[192.0.2.1]>\r\n", "a@[192.0.2.9]> x@[192.0.2.1]"),
            ("MAIL FROM:<\"a\\\"@[192.0.2.9]>\"@[192.0.2.1]>\r\n", "a\"@[192.0.2.9]>@[192.0.2.1]"),
            (" RCPT TO:<user@[192.0.2.1]>\r\n", "user@[192.0.2.1]"),
        ] {
            let (written, size) = match parse_command(line.as_bytes(), &mut scratch) {
                Ok(Request::Mail { from }) => (from.address.to_string(), from.size),
                Ok(Request::Rcpt { to }) => (to.address.to_string(), 0),
                other => panic!("{line:?} parsed as {other:?}"),
            };
            assert_eq!(written, address, "{line:?}");
            assert_eq!(size, if line.contains("SIZE") { 10 } else { 0 }, "the parameters are read as usual: {line:?}");
            assert_eq!(unwritable(&written), None);
            let again = format!("RCPT TO:<{}>\r\n", smtp_path(&written));
            assert!(matches!(parse_command(again.as_bytes(), &mut scratch), Ok(Request::Rcpt { to }) if to.address == address));
        }
        // Not literals this relay takes: refused as smtp-proto refuses them.
        for line in ["MAIL FROM:<user@[300.1.1.1]>\r\n", "MAIL FROM:<user@[IPv6:nope]>\r\n", "MAIL FROM:<user@[x]>\r\n"] {
            assert!(
                matches!(parse_command(line.as_bytes(), &mut scratch), Err(smtp_proto::Error::InvalidSenderAddress)),
                "{line}"
            );
        }
    }

    /// Bytes that are not UTF-8 are refused, not read as U+FFFD, a mailbox nobody named.
    #[test]
    fn an_address_that_is_not_utf8_is_refused() {
        let mut scratch = Vec::new();
        let mail = b"MAIL FROM:<j\xf6rg@src.test>\r\n";
        assert!(matches!(parse_command(mail, &mut scratch), Err(smtp_proto::Error::InvalidSenderAddress)));
        let rcpt = b"RCPT TO:<j\xf6rg@customer.test>\r\n";
        assert!(matches!(parse_command(rcpt, &mut scratch), Err(smtp_proto::Error::InvalidRecipientAddress)));
        let utf8 = "RCPT TO:<jörg@customer.test>\r\n";
        assert!(
            matches!(parse_command(utf8.as_bytes(), &mut scratch), Ok(Request::Rcpt { to }) if to.address == "jörg@customer.test")
        );
    }

    /// Found by the `smtp_command` fuzz target: a quoted local part holding `@[192.0.2.1]>`,
    /// at a domain name, was read with the stand-in in the local part, another mailbox.
    #[test]
    fn a_literal_inside_a_quoted_local_part_is_left_as_it_is() {
        let mut scratch = Vec::new();
        for address in ["a@[192.0.2.1]>@customer.test", "sMAIL FROM:<u@[192.0.2.1]> SIZE=10\"  @cugst"] {
            let line = format!("RCPT TO:<{}>\r\n", smtp_path(address));
            let read = parse_command(line.as_bytes(), &mut scratch);
            assert!(matches!(&read, Ok(Request::Rcpt { to }) if to.address == address), "{line:?}: {read:?}");
        }
    }

    #[test]
    fn the_stand_in_is_put_back_only_where_the_literal_was() {
        let mut scratch = Vec::new();
        let line = "MAIL FROM:<user@address-literal.invalid>\r\n";
        assert!(
            matches!(parse_command(line.as_bytes(), &mut scratch), Ok(Request::Mail { from }) if from.address == "user@address-literal.invalid")
        );
    }

    #[test]
    fn control_characters_and_odd_domains_cannot_be_written() {
        for ok in ["john doe@example.test", "user@example.test.", "用户@例子.test", "", "a@[192.0.2.1]", "a@[IPv6:::1]"] {
            assert_eq!(unwritable(ok), None, "{ok}");
        }
        for bad in ["a\tb@example.test", "a\u{0}b@example.test", "a\u{7f}b@example.test"] {
            assert_eq!(unwritable(bad), Some("a control character, which no quoting can carry"), "{bad:?}");
        }
        for bad in ["a@b c", "a@b..test", "a@", "a@.", "a@\"b\"", "nodomain", "a@[x]", "a@[1.2.3]"] {
            assert_eq!(unwritable(bad), Some("the domain is not a domain name"), "{bad}");
        }
    }
}
