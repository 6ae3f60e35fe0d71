//! `mxrelay queue list|show|retry|remove|hold|release`: queue control of a running relay, through its admin API
//! (`admin_listen` and `admin_token` from the same config file).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::config::Config;

/// Why a queue command failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueCliError {
    /// The config has no admin listener or token.
    #[error("{0}")]
    NotEnabled(&'static str),
    /// A command-line value that cannot be asked for.
    #[error("{0}")]
    Usage(String),
    /// The relay could not be reached.
    #[error("cannot reach the relay's admin API at {addr}: {source} (is `mxrelay run` running?)")]
    Connect {
        /// The admin address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The relay answered with an error.
    #[error("the relay answered {status}: {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Its message.
        body: String,
    },
}

/// Whether `name` can be a domain in a query string as it is (`?domain=NAME`): letters,
/// digits, `-`, `.` and `_`, so nothing needs escaping and nothing can add a parameter.
pub fn is_domain_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

/// Sends one request to the admin API; returns the response body as text (the API answers
/// in JSON, which is UTF-8).
pub fn request(config: &Config, method: &str, path: &str, body: &str) -> Result<String, QueueCliError> {
    request_bytes(config, method, path, body).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Sends one request to the admin API; returns the response body as it came, so a queued
/// message (`queue show --full`) keeps bytes that are not UTF-8.
pub fn request_bytes(config: &Config, method: &str, path: &str, body: &str) -> Result<Vec<u8>, QueueCliError> {
    let addr = config
        .relay
        .admin_listen
        .ok_or(QueueCliError::NotEnabled("relay.admin_listen is not set: queue commands talk to the admin API"))?;
    let token = config
        .relay
        .admin_token
        .as_deref()
        .ok_or(QueueCliError::NotEnabled("relay.admin_token is not set: the admin API is off"))?;
    let connect_err = |source| QueueCliError::Connect { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(connect_err)?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(connect_err)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(connect_err)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(connect_err)?;
    let (status, body) = parse_response(&raw);
    if (200..300).contains(&status) {
        Ok(body)
    } else {
        Err(QueueCliError::Refused { status, body: String::from_utf8_lossy(&body).into_owned() })
    }
}

/// The status and body of an HTTP/1.1 response read to its end (the request said
/// `Connection: close`); status 0 when there is no status line.
fn parse_response(raw: &[u8]) -> (u16, Vec<u8>) {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n");
    let (head, body) = match split {
        Some(at) => (&raw[..at], &raw[at + 4..]),
        None => (raw, &[][..]),
    };
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    // axum answers with Content-Length; a chunked body is joined here.
    let chunked = head.lines().any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    (status, if chunked { dechunk(body) } else { body.to_vec() })
}

/// Joins a chunked body. Chunk sizes count bytes, so this works on bytes: a chunk may end
/// inside a UTF-8 sequence, and a message need not be UTF-8 at all.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&body[..eol]).ok().map(|s| s.split(';').next().unwrap_or("").trim());
        let Some(n) = size.and_then(|s| usize::from_str_radix(s, 16).ok()) else { break };
        let rest = &body[eol + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        body = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// One queued message: its envelope, then its header section.
pub fn render_show(json: &str) -> String {
    let Ok(shown) = serde_json::from_str::<serde_json::Value>(json) else { return json.to_string() };
    let e = &shown["envelope"];
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let recipients: Vec<String> = e["recipients"].as_array().map(|r| r.iter().map(text).collect()).unwrap_or_default();
    let next = if e["held"].as_bool() == Some(true) { "held".into() } else { format!("in {}s", e["next_attempt_in_seconds"]) };
    format!(
        "id: {}\ndomain: {}\nsender: <{}>\nrecipients: {}\nsize: {} bytes\nage: {}s\nattempts: {}\nnext attempt: {next}\nlast error: {}\n\n{}",
        text(&e["id"]),
        text(&e["domain"]),
        e["sender"].as_str().unwrap_or(""),
        recipients.join(", "),
        e["size"],
        e["age_seconds"],
        e["attempts"],
        text(&e["last_error"]),
        text(&shown["headers"]).replace("\r\n", "\n"),
    )
}

/// The queue as a table.
pub fn render_list(json: &str) -> String {
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str::<serde_json::Value>(json) else { return json.to_string() };
    if items.is_empty() {
        return "the queue is empty\n".into();
    }
    let mut out = format!(
        "{:<16}  {:<24}  {:>5}  {:>8}  {:>8}  {:>9}  last error\n",
        "ID", "DOMAIN", "RCPTS", "ATTEMPTS", "AGE", "NEXT IN"
    );
    for e in &items {
        out.push_str(&format!(
            "{:<16}  {:<24}  {:>5}  {:>8}  {:>7}s  {:>9}  {}\n",
            e["id"].as_str().unwrap_or(""),
            e["domain"].as_str().unwrap_or(""),
            e["recipients"].as_array().map_or(0, Vec::len),
            e["attempts"],
            e["age_seconds"],
            if e["held"].as_bool() == Some(true) { "held".to_string() } else { format!("{}s", e["next_attempt_in_seconds"]) },
            e["last_error"].as_str().unwrap_or("-")
        ));
    }
    let held = items.iter().filter(|e| e["held"].as_bool() == Some(true)).count();
    match held {
        0 => out.push_str(&format!("{} queued\n", items.len())),
        held => out.push_str(&format!("{} queued, {held} held\n", items.len())),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_keeps_its_bytes_whether_it_came_whole_or_in_chunks() {
        // Latin-1 "é", then UTF-8 "ü" split across two chunks.
        let message: &[u8] = b"Subject: caf\xe9\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n";
        let whole = [b"HTTP/1.1 200 OK\r\ncontent-length: 26\r\n\r\n".as_slice(), message].concat();
        assert_eq!(parse_response(&whole), (200, message.to_vec()));
        let (first, second) = message.split_at(20);
        assert_eq!((first.last(), second.first()), (Some(&0xc3), Some(&0xbc)), "the chunks split the \"ü\"");
        let chunked = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".as_slice(),
            format!("{:x}\r\n", first.len()).as_bytes(),
            first,
            b"\r\n",
            format!("{:x};ext=1\r\n", second.len()).as_bytes(),
            second,
            b"\r\n0\r\n\r\n",
        ]
        .concat();
        assert_eq!(parse_response(&chunked), (200, message.to_vec()));
    }

    #[test]
    fn a_refusal_keeps_its_status_and_a_garbled_answer_has_none() {
        assert_eq!(parse_response(b"HTTP/1.1 404 Not Found\r\n\r\nno such message"), (404, b"no such message".to_vec()));
        assert_eq!(parse_response(b"garbage"), (0, vec![]));
    }
}
