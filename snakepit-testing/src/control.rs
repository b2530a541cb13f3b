//! [`FakeControl`]: a handle on every worker a [`FakeWorker`](crate::FakeWorker) started.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use snakepit_core::ExitInfo;

use crate::connection::Link;

/// Shared state of a fake worker kind: knobs the tests turn and counters they read. Cloning it
/// gives another handle on the same state.
#[derive(Debug, Clone, Default)]
pub struct FakeControl {
    pub(crate) state: Arc<ControlState>,
}

#[derive(Debug, Default)]
pub(crate) struct ControlState {
    pub(crate) starts: AtomicU64,
    pub(crate) fail_starts: AtomicU32,
    pub(crate) hang_pings: AtomicBool,
    pub(crate) memory: Mutex<Option<u64>>,
    pub(crate) calls: Mutex<HashMap<String, u64>>,
    pub(crate) links: Mutex<Vec<Weak<Link>>>,
}

impl FakeControl {
    /// How many workers have been started (successfully) so far.
    pub fn starts(&self) -> u64 {
        self.state.starts.load(Ordering::SeqCst)
    }

    /// The next `n` starts fail with `StartupFailed` (as a worker whose import fails).
    pub fn fail_starts(&self, n: u32) {
        self.state.fail_starts.store(n, Ordering::SeqCst);
    }

    /// While on, workers never answer pings (heartbeats miss); calls still work.
    pub fn hang_pings(&self, on: bool) {
        self.state.hang_pings.store(on, Ordering::SeqCst);
    }

    /// The resident memory every worker reports (for recycling by memory); `None`: unknown.
    pub fn set_memory(&self, bytes: Option<u64>) {
        *self.state.memory.lock().unwrap_or_else(|p| p.into_inner()) = bytes;
    }

    /// How many times tool `name` has been called (crashes and failures included).
    pub fn calls(&self, name: &str) -> u64 {
        self.state.calls.lock().unwrap_or_else(|p| p.into_inner()).get(name).copied().unwrap_or(0)
    }

    /// How many workers are alive right now.
    pub fn live(&self) -> usize {
        self.links().iter().filter(|l| l.exit().is_none()).count()
    }

    /// Kills every live worker, as if its process had died of SIGKILL.
    pub fn crash_all(&self) {
        for l in self.links() {
            l.end(ExitInfo::Signal(9));
        }
    }

    fn links(&self) -> Vec<Arc<Link>> {
        let mut links = self.state.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|l| l.strong_count() > 0);
        links.iter().filter_map(Weak::upgrade).collect()
    }

    pub(crate) fn memory(&self) -> Option<u64> {
        *self.state.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn count_call(&self, name: &str) {
        *self.state.calls.lock().unwrap_or_else(|p| p.into_inner()).entry(name.to_owned()).or_default() += 1;
    }
}
