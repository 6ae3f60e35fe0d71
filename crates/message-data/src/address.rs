//! Envelope addresses in their RFC 5321 wire form.
//!
//! The SMTP parser hands over a mailbox with its local part unquoted (`"john doe"@example.com`
//! arrives as `john doe@example.com`), and the queue keeps it that way, so equal mailboxes
//! compare equal. Whatever writes a mailbox back onto the wire, or into a report that a program
//! reads, quotes the local part again when it is not a Dot-string (RFC 5321 §4.1.2): written
//! bare, `RCPT TO:<john doe@example.com>` is a syntax error at the next server, or worse, a
//! different address.

use std::borrow::Cow;

/// RFC 5322 `atext`, and with SMTPUTF8 any non-ASCII character (RFC 6531 §3.3).
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

/// RFC 5321 `Dot-string`: atoms of `atext` joined by single dots.
fn is_dot_string(local: &str) -> bool {
    local.split('.').all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// Whether `mailbox` can be written in an SMTP command at all: a quoted local part may hold
/// any printable character or space (`qtextSMTP`, `quoted-pairSMTP`), but no control character.
pub fn is_representable(mailbox: &str) -> bool {
    !mailbox.chars().any(char::is_control)
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
    fn control_characters_cannot_be_written() {
        assert!(is_representable("john doe@example.test"));
        assert!(!is_representable("a\tb@example.test"));
        assert!(!is_representable("a\u{0}b@example.test"));
        assert!(!is_representable("a\u{7f}b@example.test"));
    }
}
