//! How long a client may take over a message's data.
//!
//! One fixed limit for the whole message would cut off a large message on a slow link, and a
//! limit per read alone lets a client that drips a byte a minute hold its connection for
//! ever. So, as Postfix's `smtpd_min_data_rate` does, the data may take the idle timeout
//! plus one second per [`MIN_DATA_RATE`] bytes received, and may not go quiet for about the
//! idle timeout (at most twice it: quiet is seen at the timer's next expiry).
//!
//! The reader only counts what it hands over ([`Counted`]); [`in_time`] looks at the count
//! when its timer expires and sets the timer again, so a message's lines cost no clock
//! reads or timer changes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};
use tokio::time::Instant;

/// Bytes per second a message's data must average (Postfix's `smtpd_min_data_rate`).
pub const MIN_DATA_RATE: u64 = 500;

/// `inner`, counting the bytes it hands over into `received`.
pub struct Counted<'a, R> {
    inner: &'a mut R,
    received: &'a AtomicU64,
}

impl<'a, R: AsyncBufRead + Unpin> Counted<'a, R> {
    pub fn new(inner: &'a mut R, received: &'a AtomicU64) -> Self {
        Counted { inner, received }
    }
}

impl<R: AsyncBufRead + Unpin> AsyncRead for Counted<'_, R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut *this.inner).poll_read(cx, buf);
        this.received.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        read
    }
}

impl<R: AsyncBufRead + Unpin> AsyncBufRead for Counted<'_, R> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        Pin::new(&mut *self.get_mut().inner).poll_fill_buf(cx)
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        Pin::new(&mut *this.inner).consume(amt);
        this.received.fetch_add(amt as u64, Ordering::Relaxed);
    }
}

/// `read`'s output, or `None` when the data it reads through a [`Counted`] counting into
/// `received` is late (see the module).
pub async fn in_time<F: Future>(read: F, received: &AtomicU64, idle: Duration) -> Option<F::Output> {
    let started = Instant::now();
    let (mut seen, mut seen_at) = (0, started);
    let mut read = std::pin::pin!(read);
    let mut deadline = started + idle;
    loop {
        match tokio::time::timeout_at(deadline, &mut read).await {
            Ok(output) => return Some(output),
            Err(_) => {
                let now = Instant::now();
                let count = received.load(Ordering::Relaxed);
                if count != seen {
                    (seen, seen_at) = (count, now);
                }
                let earned = Duration::from_secs_f64(count as f64 / MIN_DATA_RATE as f64);
                // Both only move on, so a timer set for one expires at or before the next.
                deadline = (seen_at + idle).min(started + idle + earned);
                if now >= deadline {
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{DataEnd, read_data};
    use tokio::io::{AsyncWriteExt, BufReader, DuplexStream};

    /// Reads a message's data through [`Counted`] and [`in_time`] with `idle` while `client` writes.
    async fn read_while<F>(idle: Duration, client: impl FnOnce(DuplexStream) -> F) -> (Option<io::Result<DataEnd>>, Duration)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (server, writer) = tokio::io::duplex(64 * 1024);
        let client = tokio::spawn(client(writer));
        let mut reader = BufReader::new(server);
        let started = std::time::Instant::now();
        let (mut out, received) = (Vec::new(), AtomicU64::new(0));
        let mut counted = Counted::new(&mut reader, &received);
        let read = in_time(read_data(&mut counted, &mut out, 1 << 20, |_| true), &received, idle).await;
        client.abort();
        (read.map(|r| r.map(|(end, _)| end)), started.elapsed())
    }

    fn timed_out(read: &Option<io::Result<DataEnd>>) -> bool {
        read.is_none()
    }

    #[tokio::test]
    async fn a_silent_client_is_late_after_the_idle_timeout() {
        let (read, took) = read_while(Duration::from_millis(300), |writer| async move {
            let _open = writer;
            std::future::pending().await
        })
        .await;
        assert!(timed_out(&read), "{read:?}");
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(5), "{took:?}");
    }

    /// Never quiet for long, but slower than the minimum rate: late all the same, where a
    /// limit per read would wait for ever.
    #[tokio::test]
    async fn a_client_that_drips_bytes_is_late() {
        let drip = |mut writer: DuplexStream| async move {
            loop {
                writer.write_all(b"x").await.expect("write");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let (read, took) = read_while(Duration::from_secs(1), drip).await;
        assert!(timed_out(&read), "{read:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    /// Data that came fast earns time, but not time to go quiet in.
    #[tokio::test]
    async fn a_client_that_goes_quiet_after_much_data_is_late_after_the_idle_timeout() {
        let burst = |mut writer: DuplexStream| async move {
            writer.write_all(&b"0123456789012345678901234567890123456789\r\n".repeat(500)).await.expect("write");
            std::future::pending().await
        };
        let (read, took) = read_while(Duration::from_millis(300), burst).await;
        assert!(timed_out(&read), "{read:?}");
        assert!(took < Duration::from_secs(5), "21 KB earned 42 s, but the client went quiet: {took:?}");
    }

    /// A message that takes longer than the idle timeout in all, at more than the minimum
    /// rate and never quiet for long, arrives whole.
    #[tokio::test]
    async fn a_slow_but_steady_client_is_not_late() {
        let steady = |mut writer: DuplexStream| async move {
            for _ in 0..20 {
                writer.write_all(&b"0123456789012345678901234567890123456789\r\n".repeat(3)).await.expect("write");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            writer.write_all(b".\r\n").await.expect("write");
            std::future::pending().await
        };
        let (read, took) = read_while(Duration::from_secs(1), steady).await;
        assert!(matches!(read, Some(Ok(DataEnd::Complete))), "{read:?} after {took:?}");
        assert!(took > Duration::from_secs(1), "longer than the idle timeout in all: {took:?}");
    }
}
