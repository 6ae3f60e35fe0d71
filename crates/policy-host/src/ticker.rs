//! The epoch ticker: the wall-clock tick that tells wasmtime when to check a policy call's
//! CPU budget. It ticks only while calls are being made, so an idle relay is not woken
//! 200 times a second.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::thread::{self, Thread};
use std::time::Duration;

use wasmtime::EngineWeak;

/// How long one epoch tick lasts; deadlines are whole ticks. Coarse on purpose: the ticker
/// thread wakes once per tick while it runs.
pub(crate) const TICK: Duration = Duration::from_millis(5);

/// Ticks with no call in progress and none started after which the ticker sleeps (1 s).
/// Under load calls come far more often, so it does not sleep and wake once per message.
const IDLE_TICKS: u32 = 200;

/// Shared by the engine, its instances and the ticker thread.
#[derive(Debug, Default)]
pub(crate) struct Ticker {
    /// Calls started and finished so far; equal when none is in progress.
    started: AtomicU64,
    finished: AtomicU64,
    asleep: AtomicBool,
    stop: AtomicBool,
    /// The ticker thread, to wake it.
    thread: OnceLock<Thread>,
}

/// A call in progress: keeps the ticker ticking until dropped.
pub(crate) struct Call<'a>(&'a Ticker);

impl Drop for Call<'_> {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, SeqCst);
    }
}

impl Ticker {
    /// Starts the ticker thread for `engine`; it ends with the engine or at [`Ticker::stop`].
    pub(crate) fn start(engine: EngineWeak) -> std::io::Result<Arc<Ticker>> {
        let ticker = Arc::new(Ticker::default());
        let running = ticker.clone();
        thread::Builder::new().name("policy-epoch".into()).spawn(move || running.run(&engine))?;
        Ok(ticker)
    }

    /// Marks a call as started, waking the ticker if it sleeps. The call's first deadline is
    /// the next tick, so a woken ticker interrupts an endless call as an awake one would.
    pub(crate) fn begin(&self) -> Call<'_> {
        self.started.fetch_add(1, SeqCst);
        if self.asleep.load(SeqCst) && self.asleep.swap(false, SeqCst) {
            self.wake();
        }
        Call(self)
    }

    /// Whether the ticker sleeps because no call has been made for a while.
    pub(crate) fn is_asleep(&self) -> bool {
        self.asleep.load(SeqCst)
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, SeqCst);
        self.wake();
    }

    fn wake(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    fn run(&self, engine: &EngineWeak) {
        // Set before the first sleep, so every wake finds the thread.
        let _ = self.thread.set(thread::current());
        let (mut seen, mut idle) = (self.started.load(SeqCst), 0);
        while !self.stop.load(SeqCst) {
            thread::sleep(TICK);
            match engine.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
            let started = self.started.load(SeqCst);
            let busy = started != seen || started != self.finished.load(SeqCst);
            seen = started;
            idle = if busy { 0 } else { idle + 1 };
            if idle >= IDLE_TICKS {
                idle = 0;
                self.sleep_until_a_call(seen);
            }
        }
    }

    /// Sleeps unless a call started after `seen` calls. A call that starts later either is
    /// counted before the check below, or finds `asleep` set and wakes the thread (both sides
    /// are sequentially consistent, so one of them sees the other).
    fn sleep_until_a_call(&self, seen: u64) {
        self.asleep.store(true, SeqCst);
        if self.started.load(SeqCst) != seen {
            self.asleep.store(false, SeqCst);
            return;
        }
        // `park` may return spuriously: only a cleared flag or a stop ends the sleep.
        while self.asleep.load(SeqCst) && !self.stop.load(SeqCst) {
            thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Waits for a state the ticker thread reaches on its own, failing after `within`.
    fn until(within: Duration, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + within;
        while !done() {
            assert!(Instant::now() < deadline, "{what} did not happen within {within:?}");
            thread::sleep(TICK);
        }
    }

    #[test]
    fn an_idle_ticker_sleeps_a_call_wakes_it_and_a_running_call_keeps_it_awake() {
        let engine = wasmtime::Engine::default();
        let ticker = Ticker::start(engine.weak()).expect("ticker");
        until(Duration::from_secs(10), "sleeping while idle", || ticker.is_asleep());

        let call = ticker.begin();
        assert!(!ticker.is_asleep(), "a call started and the ticker still sleeps");
        // Twice the idle time with the call in progress: the ticker must stay awake.
        let awake_until = Instant::now() + TICK * IDLE_TICKS * 2;
        while Instant::now() < awake_until {
            assert!(!ticker.is_asleep(), "the ticker slept during a call");
            thread::sleep(TICK);
        }
        drop(call);
        until(Duration::from_secs(10), "sleeping again after the call", || ticker.is_asleep());

        ticker.stop();
        drop(engine);
    }
}
