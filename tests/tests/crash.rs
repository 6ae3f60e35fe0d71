//! kill -9 the relay while it is accepting and delivering, restart it, and check that every
//! message that got a `250` is delivered. Repeated at different moments.

use mxrelay_e2e::strace::Strace;
use mxrelay_e2e::{Relay, Sink, domain_block, send, send_one};

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

/// `250` to the final dot means the message is on disk: its journal record is written and
/// synced (`fdatasync`) before the reply goes out, so a power cut right after the reply
/// loses nothing. A `kill -9` cannot show this (the page cache survives it) and no test can
/// cut the power, so this one watches the relay's system calls with strace: for each
/// message, the write of its record to the journal, then a sync of the journal, then the
/// `250`. A reply sent before the sync, or a record never synced, fails it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_250_follows_the_sync_of_the_messages_journal_record() {
    let sink = Sink::start("127.0.1.161", &[]);
    let relay = Relay::start(&domain_block("customer.test", &[(&sink, 10)]), "");
    let calls = "write,writev,pwrite64,pwritev,pwritev2,sendto,sendmsg,fsync,fdatasync";
    let strace = Strace::attach(relay.pid(), calls, relay.dir.path(), || {
        let (ok, out) = mxrelay_e2e::swaks_tagged(&relay.addr, "user@customer.test", 0, &[]);
        assert!(ok, "the warm-up message was refused: {out}");
    });
    // One after another, so that the n-th `250` after the warm-up is message n's.
    let messages = 1..=5u64;
    for seq in messages.clone() {
        assert!(send_one(&relay.addr, "user@customer.test", seq).await, "message {seq} was refused");
    }
    let lines = strace.finish();
    let record = lines.join("\n");
    let to_journal = |l: &String| l.contains(".wal>");
    let replies: Vec<usize> = (0..lines.len()).filter(|i| lines[*i].contains("\"250 2.0.0 queued as ")).collect();
    assert!(replies.len() > messages.clone().count(), "not every 250 was recorded:\n{record}");
    let replies = &replies[replies.len() - messages.clone().count()..];
    for (seq, &reply) in messages.zip(replies) {
        // strace shows the record's bytes with escapes: the message's header line ends in \r\n.
        let marker = format!("X-Seq: {seq}\\r\\n");
        let written = (0..reply).find(|i| to_journal(&lines[*i]) && lines[*i].contains(&marker));
        let written = written.unwrap_or_else(|| panic!("message {seq}: no journal write before its 250:\n{record}"));
        let synced = (written + 1..reply).any(|i| to_journal(&lines[i]) && lines[i].contains("fdatasync("));
        assert!(
            synced,
            "message {seq}: its 250 (line {reply}) went out before its record (line {written}) was synced:\n{record}"
        );
    }
}

/// A journal segment is retired (renamed to a spare, or removed) only once redb, which takes
/// its operations over, has synced them: after the last write to `queue.redb` before the
/// retirement comes a sync of `queue.redb`. Otherwise a power cut right after a checkpoint
/// would lose queued mail that only the retired segment held. Mail for a server that is down
/// stays queued, so redb gets it to write; checkpoints come every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_segment_is_retired_only_after_redb_has_synced_its_mail() {
    let down = mxrelay_e2e::free_port("127.0.1.162");
    let block = mxrelay_e2e::domain_with("customer.test", "", &[("127.0.1.162", down, 10)]);
    let relay = Relay::start(&block, "retry = [\"1h\"]");
    let calls = "write,pwrite64,pwritev,pwritev2,fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat";
    let strace = Strace::attach(relay.pid(), calls, relay.dir.path(), || {
        let (ok, out) = mxrelay_e2e::swaks_tagged(&relay.addr, "user@customer.test", 0, &[]);
        assert!(ok, "a message was refused: {out}");
    });
    let retires = |l: &String| l.contains(".wal\"") && (l.contains(" rename") || l.contains(" unlink"));
    for seq in 1..=3 {
        assert!(send_one(&relay.addr, "user@customer.test", seq).await, "message {seq} was refused");
    }
    relay.eventually("a checkpoint retires a segment", || strace.record().iter().any(retires)).await;
    let lines = strace.finish();
    let record = lines.join("\n");
    let redb = |l: &String| l.contains("queue.redb>");
    let mut checked = 0;
    for retired in (0..lines.len()).filter(|i| retires(&lines[*i])) {
        let Some(written) = (0..retired).rev().find(|i| redb(&lines[*i]) && lines[*i].contains("write")) else { continue };
        let synced = (written + 1..retired).any(|i| redb(&lines[i]) && lines[i].contains("sync("));
        assert!(
            synced,
            "the segment retired on line {retired} held mail redb wrote on line {written} but never synced:\n{record}"
        );
        checked += 1;
    }
    assert!(checked > 0, "no segment was retired after redb wrote the queued mail:\n{record}");
}
