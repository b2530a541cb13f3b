//! The worker's shared-memory arena, host side (docs/protocol.md, "Shared memory"): which
//! regions of the host's part hold each call's arguments, until the worker answers it.

use super::*;

/// A worker's arena, once its `ready` said it mapped it.
pub(crate) struct ShmState {
    pub(crate) arena: Arc<Arena>,
    /// The smallest segment that goes through the arena.
    pub(crate) threshold: usize,
    /// The argument regions of each call in flight. Freed when the worker answers the call
    /// (whether or not its caller still waits: the tool may read them until then), retired
    /// when the answer says `keep`, and gone with the arena when the worker dies.
    leases: Mutex<HashMap<u64, Vec<Region>>>,
}

impl ShmState {
    pub(crate) fn new(arena: Arc<Arena>, threshold: usize) -> Self {
        ShmState { arena, threshold, leases: Mutex::new(HashMap::new()) }
    }

    pub(crate) fn placement(&self) -> Placement<'_> {
        Placement { arena: &self.arena, threshold: self.threshold }
    }

    fn leases(&self) -> MutexGuard<'_, HashMap<u64, Vec<Region>>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Call `id` was sent with its arguments in `regions`.
    pub(crate) fn lease(&self, id: u64, regions: Vec<Region>) {
        if !regions.is_empty() {
            self.leases().insert(id, regions);
        }
    }

    /// The worker answered call `id`: its regions are free again, or retired when the worker
    /// could not let go of them (`keep`).
    pub(crate) fn settle(&self, id: u64, keep: bool) {
        let Some(regions) = self.leases().remove(&id) else { return };
        for r in regions {
            if keep {
                self.arena.retire(r);
            } else {
                self.arena.free(r);
            }
        }
    }

    /// Regions of a call that was never sent.
    pub(crate) fn unsent(&self, regions: Vec<Region>) {
        regions.into_iter().for_each(|r| self.arena.free(r));
    }
}
