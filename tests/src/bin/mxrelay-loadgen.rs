//! Load generator for the relay benchmarks: sends N messages over S parallel sessions (one
//! message per connection, as smtp-source does) and prints the acceptance latency of each
//! message's final dot (p50, p99, max) and the rate.
//!
//! usage: mxrelay-loadgen ADDR RCPT [MESSAGES=5000] [SESSIONS=20]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mail_send::SmtpClient;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(rcpt)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: mxrelay-loadgen ADDR RCPT [MESSAGES] [SESSIONS]");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().expect("ADDR is ip:port");
    let n: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(5000);
    let sessions: usize = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(20);
    let gate = Arc::new(Semaphore::new(sessions));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for seq in 0..n {
        let (gate, rcpt) = (gate.clone(), rcpt.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("gate");
            one(addr, &rcpt, seq).await
        }));
    }
    let mut latencies = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await {
            Ok(Some(d)) => latencies.push(d),
            _ => failed += 1,
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| {
        latencies.get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1))).copied().unwrap_or_default()
    };
    println!(
        "messages {} accepted {} failed {failed} rate {:.0} msg/s accept-latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
        n,
        latencies.len(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

/// Sends one 2 KB message; returns the time from the final dot to the 250.
async fn one(addr: SocketAddr, rcpt: &str, seq: u64) -> Option<Duration> {
    let mut client = SmtpClient::connect(addr, Duration::from_secs(30)).await.ok()?;
    client.read().await.ok()?;
    client.ehlo("loadgen.test").await.ok()?;
    let params = mail_send::smtp::message::Parameters::default();
    client.mail_from("loadgen@src.test", &params).await.ok()?;
    client.rcpt_to(rcpt, &params).await.ok()?;
    let reply = client.cmd(b"DATA\r\n").await.ok()?;
    if reply.code != 354 {
        return None;
    }
    let body = format!("Subject: load {seq}\r\nX-Seq: {seq}\r\n\r\n{}\r\n.\r\n", "z".repeat(2000));
    let t0 = Instant::now();
    client.stream.write_all(body.as_bytes()).await.ok()?;
    let reply = client.read().await.ok()?;
    let took = t0.elapsed();
    let _ = client.quit().await;
    (reply.code == 250).then_some(took)
}
