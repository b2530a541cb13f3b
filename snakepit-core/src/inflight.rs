//! [`InFlight`]: the calls a connection has sent and not yet seen answered, for
//! [`Connection::idle`](crate::Connection::idle) and
//! [`Connection::answered`](crate::Connection::answered).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::RequestId;

/// The set of calls in flight on one connection, and waits on it.
///
/// A call [`enter`](InFlight::enter)s the set when it is sent and leaves it when its
/// [`InFlightGuard`] drops: keep the guard for as long as the worker may still be working on
/// the call (until its reply, or the end of its stream), including after the caller gave up.
/// [`answered`](InFlight::answered) and [`idle`](InFlight::idle) then give
/// [`Connection::answered`](crate::Connection::answered) and
/// [`Connection::idle`](crate::Connection::idle) directly.
///
/// A cheap handle: clones share one set. Only `tokio::sync` is used, so it works on any
/// runtime that runs tokio's sync primitives.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(async {
/// use snakepit_core::{InFlight, RequestId};
/// let calls = InFlight::new();
/// let guard = calls.enter(RequestId(7));
/// assert!(calls.contains(RequestId(7)));
/// let answered = calls.answered(RequestId(7));
/// drop(guard); // the reply came
/// answered.await;
/// calls.idle().await;
/// # });
/// ```
#[derive(Clone, Default)]
pub struct InFlight {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Request id → how many guards hold it (ids are unique per connection, so almost always 1).
    ids: Mutex<HashMap<u64, usize>>,
    /// Notified whenever an id leaves the set.
    left: Notify,
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight").field("len", &self.len()).finish()
    }
}

impl InFlight {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    fn ids(&self) -> MutexGuard<'_, HashMap<u64, usize>> {
        // Nothing panics while the lock is held; recover rather than propagate a poison.
        self.inner.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds call `id` to the set until the returned guard drops. Entering an id twice keeps it
    /// in the set until both guards are gone.
    pub fn enter(&self, id: RequestId) -> InFlightGuard {
        *self.ids().entry(id.0).or_insert(0) += 1;
        InFlightGuard { set: self.clone(), id }
    }

    /// How many calls are in flight.
    pub fn len(&self) -> usize {
        self.ids().len()
    }

    /// Whether no call is in flight.
    pub fn is_empty(&self) -> bool {
        self.ids().is_empty()
    }

    /// Whether call `id` is in flight.
    pub fn contains(&self, id: RequestId) -> bool {
        self.ids().contains_key(&id.0)
    }

    /// Resolves once call `id` is not in flight (at once if it is not now).
    pub fn answered(&self, id: RequestId) -> impl Future<Output = ()> + Send + 'static {
        self.wait_until(move |ids| !ids.contains_key(&id.0))
    }

    /// Resolves once no call is in flight (at once if none is now).
    pub fn idle(&self) -> impl Future<Output = ()> + Send + 'static {
        self.wait_until(HashMap::is_empty)
    }

    fn wait_until(
        &self,
        done: impl Fn(&HashMap<u64, usize>) -> bool + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let set = self.clone();
        async move {
            loop {
                // Registered before the check: a guard dropped in between still wakes us.
                let left = set.inner.left.notified();
                if done(&set.ids()) {
                    return;
                }
                left.await;
            }
        }
    }
}

/// Keeps one call in its [`InFlight`] set; dropping it takes the call out and wakes the
/// waiters.
#[must_use = "the call leaves the in-flight set when the guard drops"]
pub struct InFlightGuard {
    set: InFlight,
    id: RequestId,
}

impl InFlightGuard {
    /// The call this guard holds.
    pub fn id(&self) -> RequestId {
        self.id
    }
}

impl fmt::Debug for InFlightGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlightGuard").field("id", &self.id).finish()
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        {
            let mut ids = self.set.ids();
            if let Some(n) = ids.get_mut(&self.id.0) {
                *n -= 1;
                if *n == 0 {
                    ids.remove(&self.id.0);
                }
            }
        }
        self.set.inner.left.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::task::Context;

    use futures::task::noop_waker_ref;

    use super::*;

    fn pending(f: std::pin::Pin<&mut impl Future<Output = ()>>) -> bool {
        f.poll(&mut Context::from_waker(noop_waker_ref())).is_pending()
    }

    #[test]
    fn guard_drop_leaves_the_set() {
        let set = InFlight::new();
        assert!(set.is_empty());
        let a = set.enter(RequestId(1));
        let b = set.enter(RequestId(2));
        assert_eq!((set.len(), a.id()), (2, RequestId(1)));
        assert!(set.contains(RequestId(1)) && set.contains(RequestId(2)));
        drop(a);
        assert!(!set.contains(RequestId(1)) && set.contains(RequestId(2)));
        drop(b);
        assert!(set.is_empty());
        // The same id twice stays until both guards are gone.
        let a = set.enter(RequestId(3));
        let a2 = set.clone().enter(RequestId(3));
        drop(a);
        assert!(set.contains(RequestId(3)));
        drop(a2);
        assert!(set.is_empty());
    }

    #[test]
    fn answered_waits_for_its_id_only() {
        let set = InFlight::new();
        let a = set.enter(RequestId(1));
        let b = set.enter(RequestId(2));
        let mut wait_a = pin!(set.answered(RequestId(1)));
        assert!(pending(wait_a.as_mut()));
        drop(b);
        assert!(pending(wait_a.as_mut()), "another call's answer does not count");
        drop(a);
        assert!(!pending(wait_a.as_mut()));
        // Not in flight: at once.
        assert!(!pending(pin!(set.answered(RequestId(9))).as_mut()));
    }

    #[test]
    fn idle_waits_for_every_call() {
        let set = InFlight::new();
        assert!(!pending(pin!(set.idle()).as_mut()), "empty: at once");
        let a = set.enter(RequestId(1));
        let b = set.enter(RequestId(2));
        let mut idle = pin!(set.idle());
        assert!(pending(idle.as_mut()));
        drop(a);
        assert!(pending(idle.as_mut()));
        drop(b);
        assert!(!pending(idle.as_mut()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_are_woken_across_threads() {
        let set = InFlight::new();
        let guard = set.enter(RequestId(1));
        let waiter = tokio::spawn({
            let set = set.clone();
            async move {
                set.answered(RequestId(1)).await;
                set.idle().await;
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        std::thread::spawn(move || drop(guard)).join().expect("dropped");
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("waiter finished");
    }
}
