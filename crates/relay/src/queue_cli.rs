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

/// Sends one request to the admin API; returns the response body.
pub fn request(config: &Config, method: &str, path: &str, body: &str) -> Result<String, QueueCliError> {
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
    // Lossy: a queued message (`queue show --full`) may hold bytes that are not UTF-8.
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(connect_err)?;
    let response = String::from_utf8_lossy(&raw).into_owned();
    let status: u16 = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (headers, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    // axum answers small bodies with Content-Length; chunked ones are joined here.
    let body = if headers.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    if (200..300).contains(&status) { Ok(body) } else { Err(QueueCliError::Refused { status, body }) }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
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
