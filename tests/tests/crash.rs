//! kill -9 the relay while it is accepting and delivering, restart it, and check that every
//! message that got a `250` is delivered. Repeated at different moments.

use mxrelay_e2e::{Relay, Sink, domain_block, send};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_message_survives_kill_9() {
    let sink = Sink::start("127.0.1.40", &[]);
    let mut relay = Relay::start(&domain_block("customer.test", &[(&sink, 10)]), "retry = [\"1h\"]");
    // Kill points spread over the run, from a clock-derived seed (printed to replay a failure).
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.subsec_nanos() as u64);
    println!("kill-point seed {seed}");
    let mut acked = Vec::new();
    let mut next = 0u64;
    for round in 0..3u64 {
        let kill_after = 50 + (seed.wrapping_mul(round + 1).wrapping_mul(0x9E37_79B9) >> 7) % 400;
        let (addr, first) = (relay.addr.clone(), next);
        let sender = tokio::spawn(async move { send(&addr, "user@customer.test", first..first + 600, 20).await });
        let base = sink.count();
        relay.eventually("deliveries under way", || sink.count() >= base + kill_after as usize).await;
        relay.kill9();
        let got = sender.await.expect("sender");
        println!("round {round}: killed after {kill_after} deliveries; {} of 600 acknowledged", got.len());
        acked.extend(got);
        next += 600;
        relay.restart();
    }
    relay
        .eventually("every acknowledged message delivered after the restarts", || {
            let got = sink.received();
            acked.iter().all(|s| got.contains_key(s))
        })
        .await;
    // A crash between the server's 250 and the queue update may repeat a message (at least
    // once delivery); anything delivered must have been sent.
    let got = sink.received();
    assert!(got.keys().all(|s| *s < next), "unknown messages arrived");
}
