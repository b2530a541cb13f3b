//! Fault injection for your own tests (feature `chaos`): kill a worker at a chosen point of a
//! call's life, delay worker handshakes, drop heartbeats.
//!
//! ```no_run
//! # async fn t() -> Result<(), snakepit::Error> {
//! use snakepit::{chaos::Chaos, Pool, Python};
//! let chaos = Chaos::new().kill_before_call(3).drop_heartbeats(2);
//! let pool = Pool::builder().adapter(Python::script("w.py")).chaos(chaos.clone()).build().await?;
//! // call 3 fails with WorkerCrashed; the pool restarts the worker.
//! # Ok(()) }
//! ```

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Default)]
struct State {
    kill_before: Mutex<BTreeSet<u64>>,
    kill_after: Mutex<BTreeSet<u64>>,
    handshake_delay: Mutex<Option<Duration>>,
    drop_heartbeats: AtomicU32,
    calls: AtomicU64,
}

/// A shared fault plan; clone it to keep a handle after giving it to the builder.
#[derive(Debug, Clone, Default)]
pub struct Chaos {
    state: Arc<State>,
}

impl Chaos {
    /// An empty plan (no faults).
    pub fn new() -> Self {
        Self::default()
    }

    /// The worker chosen for the `nth` call (1-based, pool-wide) is killed just before the call
    /// is sent: the call fails with `WorkerCrashed`.
    pub fn kill_before_call(self, nth: u64) -> Self {
        self.state.kill_before.lock().unwrap_or_else(|p| p.into_inner()).insert(nth);
        self
    }

    /// The worker that answered the `nth` call is killed right after the answer arrived (the
    /// call itself succeeds).
    pub fn kill_after_reply(self, nth: u64) -> Self {
        self.state.kill_after.lock().unwrap_or_else(|p| p.into_inner()).insert(nth);
        self
    }

    /// Every worker start waits `d` before its handshake (counted against the handshake
    /// timeout).
    pub fn delay_handshake(self, d: Duration) -> Self {
        *self.state.handshake_delay.lock().unwrap_or_else(|p| p.into_inner()) = Some(d);
        self
    }

    /// The next `n` heartbeat pings are treated as lost.
    pub fn drop_heartbeats(self, n: u32) -> Self {
        self.state.drop_heartbeats.fetch_add(n, Ordering::Relaxed);
        self
    }

    /// How many calls the pool has numbered so far (the `nth` of the next call is this plus
    /// one), so a long-running driver can aim a fault at a call still to come.
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::Relaxed)
    }

    /// Numbers a new call; returns whether its worker must die before it is sent.
    pub(crate) fn before_call(&self) -> (u64, bool) {
        let n = self.state.calls.fetch_add(1, Ordering::Relaxed) + 1;
        (n, self.state.kill_before.lock().unwrap_or_else(|p| p.into_inner()).remove(&n))
    }

    pub(crate) fn after_reply(&self, n: u64) -> bool {
        self.state.kill_after.lock().unwrap_or_else(|p| p.into_inner()).remove(&n)
    }

    pub(crate) fn handshake_delay(&self) -> Option<Duration> {
        *self.state.handshake_delay.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn take_heartbeat_drop(&self) -> bool {
        self.state
            .drop_heartbeats
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}
