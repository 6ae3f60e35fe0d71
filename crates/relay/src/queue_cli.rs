//! `mxrelay queue list|show|retry|remove|hold|release`: queue control of a running relay, through its admin API
//! (`admin_listen` and `admin_token` from the same config file).

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;

use crate::config::Config;
use crate::data::address::smtp_path;

/// How long the relay may take to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the whole answer may take (a queued message of the largest size included).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

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
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The answer was cut off, late or not HTTP: nothing of it is printed, so a message is
    /// never shown in part as if it were whole.
    #[error("no complete answer from the relay's admin API at {addr}: {reason}")]
    Answer {
        /// The admin address.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
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
    call(addr, token, method, path, body)
}

/// One HTTP/1.1 exchange with the admin API at `addr`. hyper reads the answer, chunked or
/// not, and reports one that ends before its announced length.
fn call(addr: SocketAddr, token: &str, method: &str, path: &str, body: &str) -> Result<Vec<u8>, QueueCliError> {
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, addr.to_string())
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .map_err(|e| QueueCliError::Usage(format!("{method} {path:?} cannot be asked for: {e}")))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| QueueCliError::Connect { addr, source })?;
    let (status, body) = runtime.block_on(exchange(addr, request))?;
    if (200..300).contains(&status) {
        Ok(body)
    } else {
        Err(QueueCliError::Refused { status, body: String::from_utf8_lossy(&body).into_owned() })
    }
}

async fn exchange(addr: SocketAddr, request: hyper::Request<Full<Bytes>>) -> Result<(u16, Vec<u8>), QueueCliError> {
    let connect_err = |source| QueueCliError::Connect { addr, source };
    let answer_err = |e: hyper::Error| QueueCliError::Answer { addr, reason: e.to_string() };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| connect_err(std::io::ErrorKind::TimedOut.into()))?
        .map_err(connect_err)?;
    let answer = async {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(answer_err)?;
        // The connection is driven beside the request, and ends when the answer is read.
        tokio::spawn(connection);
        let response = sender.send_request(request).await.map_err(answer_err)?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(answer_err)?.to_bytes();
        Ok((status, body.to_vec()))
    };
    tokio::time::timeout(ANSWER_TIMEOUT, answer)
        .await
        .map_err(|_| QueueCliError::Answer { addr, reason: format!("none within {}s", ANSWER_TIMEOUT.as_secs()) })?
}

/// One queued message: its envelope, then its header section.
pub fn render_show(json: &str) -> String {
    let Ok(shown) = serde_json::from_str::<serde_json::Value>(json) else { return json.to_string() };
    let e = &shown["envelope"];
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let recipients: Vec<String> =
        e["recipients"].as_array().map(|r| r.iter().map(|r| smtp_path(&text(r)).into_owned()).collect()).unwrap_or_default();
    let next = if e["held"].as_bool() == Some(true) { "held".into() } else { format!("in {}s", e["next_attempt_in_seconds"]) };
    format!(
        "id: {}\ndomain: {}\nsender: <{}>\nrecipients: {}\nsize: {} bytes\nage: {}s\nattempts: {}\nnext attempt: {next}\nlast error: {}\n\n{}",
        text(&e["id"]),
        text(&e["domain"]),
        smtp_path(e["sender"].as_str().unwrap_or("")),
        recipients.join(", "),
        e["size"],
        e["age_seconds"],
        e["attempts"],
        text(&e["last_error"]),
        text(&shown["headers"]).replace("\r\n", "\n"),
    )
}

/// What a retry did, from the API's `{"retrying": N, "held": M}`, for one message (`id`), a
/// domain's, or all. Held messages are named, since a retry leaves them be.
pub fn render_retried(json: &str, id: Option<&str>, domain: Option<&str>) -> String {
    let Ok(answer) = serde_json::from_str::<serde_json::Value>(json) else { return json.to_string() };
    let count = |key: &str| answer[key].as_u64().unwrap_or(0);
    let (retrying, held) = (count("retrying"), count("held"));
    // "3 messages for customer.test", or "3 queued messages".
    let messages = |n: u64| {
        let plural = if n == 1 { "" } else { "s" };
        domain.map_or_else(|| format!("{n} queued message{plural}"), |d| format!("{n} message{plural} for {d}"))
    };
    if let Some(id) = id {
        return if held > 0 {
            format!("{id} is held: a retry leaves it be; `queue release` delivers it now\n")
        } else {
            format!("retrying {id} now\n")
        };
    }
    let mut out = match (retrying, held) {
        (0, 0) => domain.map_or_else(|| "the queue is empty".to_string(), |d| format!("no message for {d} is queued")),
        (n, _) => format!("retrying {} now", messages(n)),
    };
    if held > 0 {
        let verb = if held == 1 { "stays" } else { "stay" };
        out.push_str(&format!("; {} {verb} held (`queue release` delivers them)", messages(held)));
    }
    out.push('\n');
    out
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
    // Numbers as text: a JSON value's `Display` ignores the column widths.
    let number = |v: &serde_json::Value| v.as_u64().map_or_else(|| v.to_string(), |n| n.to_string());
    for e in &items {
        out.push_str(&format!(
            "{:<16}  {:<24}  {:>5}  {:>8}  {:>8}  {:>9}  {}\n",
            e["id"].as_str().unwrap_or(""),
            e["domain"].as_str().unwrap_or(""),
            e["recipients"].as_array().map_or(0, Vec::len),
            number(&e["attempts"]),
            format!("{}s", number(&e["age_seconds"])),
            if e["held"].as_bool() == Some(true) {
                "held".to_string()
            } else {
                format!("{}s", number(&e["next_attempt_in_seconds"]))
            },
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
    use std::io::{Read, Write};

    /// Serves one connection at a loopback address: reads the request head, then writes
    /// `answer` and closes. Returns the address and what the client sent.
    fn answering(answer: Vec<u8>) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).expect("read") == 1 {
                head.push(byte[0]);
            }
            stream.write_all(&answer).expect("write");
            String::from_utf8_lossy(&head).into_owned()
        });
        (addr, server)
    }

    #[test]
    fn a_retry_says_how_many_it_retries_and_names_held_mail() {
        let said = |json: &str, id: Option<&str>, domain: Option<&str>| render_retried(json, id, domain);
        assert_eq!(said(r#"{"retrying":3,"held":0}"#, None, None), "retrying 3 queued messages now\n");
        assert_eq!(
            said(r#"{"retrying":2,"held":1}"#, None, None),
            "retrying 2 queued messages now; 1 queued message stays held (`queue release` delivers them)\n"
        );
        assert_eq!(said(r#"{"retrying":1,"held":0}"#, None, Some("c.test")), "retrying 1 message for c.test now\n");
        assert_eq!(
            said(r#"{"retrying":0,"held":2}"#, None, Some("c.test")),
            "retrying 0 messages for c.test now; 2 messages for c.test stay held (`queue release` delivers them)\n"
        );
        assert_eq!(said(r#"{"retrying":0,"held":0}"#, None, Some("c.test")), "no message for c.test is queued\n");
        assert_eq!(said(r#"{"retrying":0,"held":0}"#, None, None), "the queue is empty\n");
        assert_eq!(said(r#"{"retrying":1,"held":0}"#, Some("00000000000000FF"), None), "retrying 00000000000000FF now\n");
        assert!(said(r#"{"retrying":0,"held":1}"#, Some("00000000000000FF"), None).starts_with("00000000000000FF is held"));
    }

    #[test]
    fn the_list_is_a_table_whose_columns_line_up() {
        let json = r#"[{"id":"001A22E6934B3001","domain":"customer.test","recipients":["a@customer.test"],"attempts":1,
            "age_seconds":5,"next_attempt_in_seconds":55,"held":false,"last_error":"connect to 192.0.2.1:25: refused"},
            {"id":"001A22E6934B3002","domain":"customer.test","recipients":["a@customer.test","b@customer.test"],"attempts":12,
            "age_seconds":86400,"next_attempt_in_seconds":3600,"held":true,"last_error":null}]"#;
        let table = render_list(json);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        // Right-aligned columns end where their headings end; the last one starts with its heading.
        for heading in ["RCPTS", "ATTEMPTS", "AGE", "NEXT IN"] {
            let end = lines[0].find(heading).expect("heading") + heading.len();
            for row in &lines[1..3] {
                let cell = row[..end].rsplit(' ').next().unwrap_or_default();
                assert!(!cell.is_empty() && row[end..].starts_with("  "), "{heading} in {row:?}\n{table}");
            }
        }
        let last = lines[0].find("last error").expect("heading");
        assert_eq!(&lines[1][last..], "connect to 192.0.2.1:25: refused");
        assert_eq!(&lines[2][last..], "-");
        assert!(lines[2].contains("   12  ") && lines[2].contains("86400s") && lines[2].contains("held"), "{table}");
        assert_eq!(lines[3], "2 queued, 1 held");
    }

    #[test]
    fn a_message_is_shown_with_its_addresses_as_they_go_on_the_wire() {
        let json = r#"{"envelope": {"id": "1", "domain": "customer.test", "sender": "jane roe@src.test",
            "recipients": ["john doe@customer.test", "a@customer.test"], "held": false}, "headers": "Subject: x\r\n"}"#;
        let shown = render_show(json);
        assert!(shown.contains("sender: <\"jane roe\"@src.test>\n"), "{shown}");
        assert!(shown.contains("recipients: \"john doe\"@customer.test, a@customer.test\n"), "{shown}");
    }

    /// Latin-1 "é", then UTF-8 "ü".
    const MESSAGE: &[u8] = b"Subject: caf\xe9\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n";

    #[test]
    fn a_body_keeps_its_bytes_whether_it_comes_whole_or_in_chunks() {
        let whole = [format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", MESSAGE.len()).as_bytes(), MESSAGE].concat();
        let (addr, server) = answering(whole);
        assert_eq!(call(addr, "t0k3n", "GET", "/api/queue/1/message", "").expect("answer"), MESSAGE);
        let head = server.join().expect("server");
        assert!(head.starts_with("GET /api/queue/1/message HTTP/1.1\r\n"), "{head}");
        assert!(head.to_ascii_lowercase().contains("authorization: bearer t0k3n\r\n"), "{head}");

        let (first, second) = MESSAGE.split_at(20);
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
        let (addr, _) = answering(chunked);
        assert_eq!(call(addr, "t", "GET", "/api/queue/1/message", "").expect("answer"), MESSAGE);
    }

    #[test]
    fn an_answer_cut_off_is_an_error_never_a_shorter_message() {
        let short = [b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n".as_slice(), MESSAGE].concat();
        let (addr, _) = answering(short);
        let cut = call(addr, "t", "GET", "/api/queue/1/message", "");
        assert!(matches!(cut, Err(QueueCliError::Answer { .. })), "{cut:?}");
        let chunk = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n".as_slice(), &MESSAGE[..16], b"\r\n"].concat();
        let (addr, _) = answering(chunk);
        let cut = call(addr, "t", "GET", "/api/queue/1/message", "");
        assert!(matches!(cut, Err(QueueCliError::Answer { .. })), "{cut:?}");
    }

    #[test]
    fn a_refusal_keeps_its_status_and_a_garbled_answer_is_an_error() {
        let (addr, _) = answering(b"HTTP/1.1 404 Not Found\r\ncontent-length: 15\r\n\r\nno such message".to_vec());
        let refused = call(addr, "t", "GET", "/api/queue/9", "");
        assert!(
            matches!(&refused, Err(QueueCliError::Refused { status: 404, body }) if body == "no such message"),
            "{refused:?}"
        );
        let (addr, _) = answering(b"garbage\r\n\r\n".to_vec());
        let garbled = call(addr, "t", "GET", "/api/queue", "");
        assert!(matches!(garbled, Err(QueueCliError::Answer { .. })), "{garbled:?}");
    }

    #[test]
    fn a_path_that_is_not_one_is_refused_before_anything_is_sent() {
        // Nothing listens at this address: the request must fail before connecting.
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("address");
        let bad = call(addr, "t", "DELETE", "/api/queue/a b\r\nX-Injected: 1", "");
        assert!(matches!(&bad, Err(QueueCliError::Usage(m)) if m.contains("cannot be asked for")), "{bad:?}");
    }
}
