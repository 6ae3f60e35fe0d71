//! The seed page's five examples, end to end: smtp-sink instances as the customer's servers,
//! the real relay, mail sent over SMTP. Each checks where mail lands, that killing the
//! preferred tier mid-stream moves every message exactly once to the next tier, and that
//! traffic returns when the tier comes back.

use mxrelay_e2e::{
    Relay, Sink, assert_delivered, assert_exactly_once, domain_block, received_by_all, send, unanswered_final_dots,
};

/// Deferred mail would wait an hour: within the test only a recovery can deliver it.
const DELIVERY: &str = "retry = [\"1h\"]";
const RCPT: &str = "user@customer.test";

fn share(n: usize, total: usize) -> f64 {
    100.0 * n as f64 / total as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_one_server_queues_while_down_and_drains_when_it_returns() {
    let mut mx = Sink::start("127.0.1.1", &[]);
    let relay = Relay::start(&domain_block("customer.test", &[(&mx, 10)]), DELIVERY);
    let mut acked = send(&relay.addr, RCPT, 0..200, 10).await;
    assert_eq!(acked.len(), 200);
    relay.eventually("200 messages at the only server", || mx.count() == 200).await;

    let addr = relay.addr.clone();
    let sender = tokio::spawn(async move { send(&addr, RCPT, 200..600, 10).await });
    relay.eventually("mid-stream", || mx.count() >= 300).await;
    mx.kill();
    acked.extend(sender.await.expect("sender"));
    assert_eq!(acked.len(), 600, "the relay accepts while the server is down");
    mx.restart();
    relay.eventually("queued mail delivered once the server answers again", || mx.received().len() == 600).await;
    // A delivery cut off after its final dot may repeat: the server may have kept it.
    assert_delivered(&[&mx], &acked, unanswered_final_dots(&relay));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_primary_and_backup_fail_over_and_back() {
    let mut primary = Sink::start("127.0.1.1", &[]);
    let backup = Sink::start("127.0.1.2", &[]);
    let relay = Relay::start(&domain_block("customer.test", &[(&primary, 10), (&backup, 20)]), DELIVERY);
    let mut acked = send(&relay.addr, RCPT, 0..100, 10).await;
    relay.eventually("100 at the primary", || primary.count() == 100).await;
    assert_eq!(backup.count(), 0, "the backup gets nothing while the primary is up");

    let addr = relay.addr.clone();
    let sender = tokio::spawn(async move { send(&addr, RCPT, 100..500, 10).await });
    relay.eventually("mid-stream", || primary.count() >= 150).await;
    primary.kill();
    acked.extend(sender.await.expect("sender"));
    // A delivery whose final dot the primary never answered waits for it to come back (it
    // may have the message); everything else is at the backup, once.
    relay
        .eventually("all 500 delivered or waiting for the primary", || {
            received(&[&primary, &backup]) + unanswered_final_dots(&relay) >= 500
        })
        .await;
    assert!(received_by_all(&[&primary, &backup]).values().all(|n| *n == 1), "nothing arrived twice so far");
    assert!(backup.count() >= 250, "the backup took over: {}", backup.count());
    // Health memory: once marked down, the dead primary costs no connection per message
    // (Postfix probes it again for every new connection). Only deliveries already on their
    // way when it died may try it.
    let attempts_at_dead_primary = relay.log_lines(&["outcome=\"unreachable\"", &primary.addr]).len();
    assert!(
        (1..=20).contains(&attempts_at_dead_primary),
        "{attempts_at_dead_primary} connection attempts to the dead primary for 350 messages"
    );

    primary.restart();
    relay.eventually("primary marked up again", || !relay.log_lines(&["server is up again", &primary.addr]).is_empty()).await;
    let before = backup.count();
    let back = send(&relay.addr, RCPT, 500..600, 10).await;
    relay.eventually("new mail at the primary", || primary.received().keys().filter(|s| **s >= 500).count() == 100).await;
    assert_eq!(backup.count(), before, "traffic returned to the primary");
    acked.extend(back);
    relay.eventually("all 600 delivered", || received(&[&primary, &backup]) == 600).await;
    assert_delivered(&[&primary, &backup], &acked, unanswered_final_dots(&relay));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_two_balanced_share_equally_per_message() {
    let a = Sink::start("127.0.1.1", &[]);
    let b = Sink::start("127.0.1.2", &[]);
    let relay = Relay::start(&domain_block("customer.test", &[(&a, 10), (&b, 10)]), DELIVERY);
    let acked = send(&relay.addr, RCPT, 0..2000, 20).await;
    assert_eq!(acked.len(), 2000);
    relay.eventually("2000 delivered", || a.count() + b.count() == 2000).await;
    assert_exactly_once(&[&a, &b], &acked);
    let sa = share(a.count(), 2000);
    assert!((48.0..=52.0).contains(&sa), "split {sa:.1}% / {:.1}% (connections are reused, shares must stay equal)", 100.0 - sa);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_two_balanced_fail_over_to_the_third_and_back() {
    let mut a = Sink::start("127.0.1.1", &[]);
    let mut b = Sink::start("127.0.1.2", &[]);
    let c = Sink::start("127.0.1.3", &[]);
    let relay = Relay::start(&domain_block("customer.test", &[(&a, 10), (&b, 10), (&c, 20)]), DELIVERY);
    let mut acked = send(&relay.addr, RCPT, 0..400, 20).await;
    relay.eventually("400 delivered", || a.count() + b.count() == 400).await;
    assert_eq!(c.count(), 0);
    assert!((45.0..=55.0).contains(&share(a.count(), 400)), "{} / {}", a.count(), b.count());

    let addr = relay.addr.clone();
    let sender = tokio::spawn(async move { send(&addr, RCPT, 400..1000, 10).await });
    relay.eventually("mid-stream", || a.count() + b.count() >= 500).await;
    a.kill();
    b.kill();
    acked.extend(sender.await.expect("sender"));
    // Deliveries whose final dot a dying primary never answered wait for it (see s2).
    relay
        .eventually("all 1000 delivered or waiting for the primaries", || {
            received(&[&a, &b, &c]) + unanswered_final_dots(&relay) >= 1000
        })
        .await;
    assert!(received_by_all(&[&a, &b, &c]).values().all(|n| *n == 1), "nothing arrived twice so far");
    assert!(c.count() >= 300, "the third server took over: {}", c.count());

    a.restart();
    b.restart();
    relay
        .eventually("both primaries up again", || {
            !relay.log_lines(&["server is up again", &a.addr]).is_empty()
                && !relay.log_lines(&["server is up again", &b.addr]).is_empty()
        })
        .await;
    let before = c.count();
    acked.extend(send(&relay.addr, RCPT, 1000..1200, 10).await);
    relay.eventually("1200 delivered", || received(&[&a, &b, &c]) == 1200).await;
    assert_eq!(c.count(), before, "traffic returned to the primaries");
    assert_delivered(&[&a, &b, &c], &acked, unanswered_final_dots(&relay));
}

fn received(sinks: &[&Sink]) -> usize {
    sinks.iter().map(|s| s.received().len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_eight_servers_three_tiers() {
    let mut sinks: Vec<Sink> = (1..=8).map(|n| Sink::start(&format!("127.0.1.{n}"), &[])).collect();
    let prefs = [10, 10, 10, 20, 20, 30, 30, 30];
    let block = domain_block("customer.test", &sinks.iter().zip(prefs).collect::<Vec<_>>());
    let relay = Relay::start(&block, DELIVERY);
    let counts = |sinks: &[Sink]| sinks.iter().map(Sink::count).collect::<Vec<_>>();

    let mut acked = send(&relay.addr, RCPT, 0..900, 20).await;
    relay.eventually("900 delivered", || counts(&sinks).iter().sum::<usize>() == 900).await;
    let c = counts(&sinks);
    assert_eq!(&c[3..], &[0, 0, 0, 0, 0], "only the first tier is used: {c:?}");
    for n in &c[..3] {
        assert!((31.3..=35.3).contains(&share(*n, 900)), "first tier shares {c:?}");
    }

    // The first tier dies: the second takes everything, split evenly.
    for s in &mut sinks[..3] {
        s.kill();
    }
    acked.extend(send(&relay.addr, RCPT, 900..1300, 20).await);
    relay.eventually("1300 delivered", || received(&sinks.iter().collect::<Vec<_>>()) == 1300).await;
    let c = counts(&sinks);
    assert_eq!(&c[5..], &[0, 0, 0], "the third tier is not needed yet: {c:?}");
    assert!(c[3] + c[4] == 400 && (44.0..=56.0).contains(&share(c[3], 400)), "second tier {c:?}");

    // The second tier dies too: the third takes over.
    for s in &mut sinks[3..5] {
        s.kill();
    }
    acked.extend(send(&relay.addr, RCPT, 1300..1600, 20).await);
    relay.eventually("1600 delivered", || received(&sinks.iter().collect::<Vec<_>>()) == 1600).await;
    let c = counts(&sinks);
    for n in &c[5..] {
        assert!((26.0..=40.0).contains(&share(*n, 300)), "third tier {c:?}");
    }
    assert_exactly_once(&sinks.iter().collect::<Vec<_>>(), &acked);
}
