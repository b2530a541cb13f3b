//! A call's reply on its way back: [`ReplyFuture`], what [`Connection::start`] returns.
//!
//! A transport that multiplexes calls by id can hand each caller a [`ReplySlot`] that its reader
//! fills, and reuse the slot for a later call once both sides are done with it: a call then
//! costs no allocation for its reply path (no oneshot, no boxed future). Transports that cannot
//! (or need not) return a boxed future instead; the caller sees one type either way.
//!
//! [`Connection::start`]: crate::Connection::start

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use futures::future::BoxFuture;

use crate::{Error, Payload, RequestId};

/// One call's outcome, filled by a transport's reader and taken by the waiting [`ReplyFuture`].
#[derive(Debug, Default)]
pub struct ReplySlot {
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    value: Option<Result<Payload, Error>>,
    waker: Option<Waker>,
}

impl ReplySlot {
    /// An empty slot.
    pub fn new() -> Arc<Self> {
        Arc::new(ReplySlot::default())
    }

    fn state(&self) -> MutexGuard<'_, SlotState> {
        // Nothing panics while the lock is held; recover rather than propagate a poison.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delivers the call's outcome and wakes its caller. Takes the filler's reference and drops
    /// it before the wake, so that the woken caller usually holds the last one besides the
    /// owner's and the slot can be reused. A second fill replaces the first (a transport fills a
    /// slot once per call).
    pub fn fill(self: Arc<Self>, outcome: Result<Payload, Error>) {
        let waker = {
            let mut s = self.state();
            s.value = Some(outcome);
            s.waker.take()
        };
        drop(self);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Empties the slot for its next call (the owner calls this before reusing it).
    pub fn reset(&self) {
        let mut s = self.state();
        s.value = None;
        s.waker = None;
    }
}

/// Whoever handed out a [`ReplySlot`]: told when the caller is done with it, so it can forget a
/// call whose caller went away, and take the slot back for reuse.
pub trait SlotOwner: Send + Sync + 'static {
    /// The future for call `id` is gone. `answered` says whether it took the outcome; if not,
    /// the call is still running in the worker (its caller gave up). `slot` may be reused once
    /// the owner holds the only reference to it.
    fn release(&self, id: RequestId, slot: Arc<ReplySlot>, answered: bool);
}

/// The future of one call's reply: a boxed future, a reused [`ReplySlot`] its transport fills,
/// or an outcome known at once. Dropping it before the reply abandons the call.
#[must_use = "the request may already be sent: dropping its reply abandons the call"]
pub struct ReplyFuture<'a>(Inner<'a>);

enum Inner<'a> {
    Boxed(BoxFuture<'a, Result<Payload, Error>>),
    Slot {
        slot: Arc<ReplySlot>,
        owner: Arc<dyn SlotOwner>,
        id: RequestId,
        /// Poll without sleeping until then (see [`ReplyFuture::slot`]).
        spin_until: Option<Instant>,
        answered: bool,
    },
    Ready(Option<Result<Payload, Error>>),
}

impl<'a> ReplyFuture<'a> {
    /// A reply computed by a boxed future (what [`Connection::start`](crate::Connection::start)
    /// does by default).
    pub fn boxed(f: BoxFuture<'a, Result<Payload, Error>>) -> Self {
        ReplyFuture(Inner::Boxed(f))
    }

    /// An outcome known at once (e.g. the request could not be sent).
    pub fn ready(outcome: Result<Payload, Error>) -> Self {
        ReplyFuture(Inner::Ready(Some(outcome)))
    }

    /// A reply that `owner`'s reader will [`fill`](ReplySlot::fill) into `slot` for call `id`.
    /// Until `spin_until` (if set) the future re-schedules itself instead of sleeping, so that
    /// on a current-thread runtime a reply that comes soon is seen without a wake-up.
    pub fn slot(
        slot: Arc<ReplySlot>,
        owner: Arc<dyn SlotOwner>,
        id: RequestId,
        spin_until: Option<Instant>,
    ) -> Self {
        ReplyFuture(Inner::Slot { slot, owner, id, spin_until, answered: false })
    }
}

impl std::fmt::Debug for ReplyFuture<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.0 {
            Inner::Boxed(_) => "boxed",
            Inner::Slot { .. } => "slot",
            Inner::Ready(_) => "ready",
        };
        f.debug_tuple("ReplyFuture").field(&kind).finish()
    }
}

impl Future for ReplyFuture<'_> {
    type Output = Result<Payload, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            Inner::Boxed(f) => f.as_mut().poll(cx),
            Inner::Ready(v) => match v.take() {
                Some(v) => Poll::Ready(v),
                None => Poll::Ready(Err(Error::Unavailable("reply polled after it completed".into()))),
            },
            Inner::Slot { slot, spin_until, answered, .. } => {
                if *answered {
                    return Poll::Ready(Err(Error::Unavailable("reply polled after it completed".into())));
                }
                let mut s = slot.state();
                if let Some(v) = s.value.take() {
                    *answered = true;
                    return Poll::Ready(v);
                }
                if spin_until.is_some_and(|t| Instant::now() < t) {
                    drop(s);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                *spin_until = None;
                match &s.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => s.waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for ReplyFuture<'_> {
    fn drop(&mut self) {
        if let Inner::Slot { slot, owner, id, answered, .. } =
            std::mem::replace(&mut self.0, Inner::Ready(None))
        {
            owner.release(id, slot, answered);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Owner {
        released: AtomicUsize,
        answered: AtomicUsize,
    }

    impl SlotOwner for Owner {
        fn release(&self, _id: RequestId, _slot: Arc<ReplySlot>, answered: bool) {
            self.released.fetch_add(1, Ordering::SeqCst);
            if answered {
                self.answered.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    struct Noop;

    impl std::task::Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }

    fn poll(f: &mut ReplyFuture<'_>) -> Poll<Result<Payload, Error>> {
        let waker = Waker::from(Arc::new(Noop));
        Pin::new(f).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn a_filled_slot_completes_and_is_released_as_answered() {
        let owner = Arc::new(Owner::default());
        let slot = ReplySlot::new();
        let mut f = ReplyFuture::slot(slot.clone(), owner.clone(), RequestId(1), None);
        assert!(poll(&mut f).is_pending());
        slot.clone().fill(Ok(Payload::null()));
        assert!(matches!(poll(&mut f), Poll::Ready(Ok(_))));
        drop(f);
        assert_eq!(owner.released.load(Ordering::SeqCst), 1);
        assert_eq!(owner.answered.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_dropped_waiting_future_is_released_unanswered() {
        let owner = Arc::new(Owner::default());
        let f = ReplyFuture::slot(ReplySlot::new(), owner.clone(), RequestId(2), None);
        drop(f);
        assert_eq!(owner.released.load(Ordering::SeqCst), 1);
        assert_eq!(owner.answered.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn ready_and_boxed_replies_complete() {
        let mut r = ReplyFuture::ready(Err(Error::ShuttingDown));
        assert!(matches!(poll(&mut r), Poll::Ready(Err(Error::ShuttingDown))));
        let mut b = ReplyFuture::boxed(Box::pin(async { Ok(Payload::null()) }));
        assert!(matches!(poll(&mut b), Poll::Ready(Ok(_))));
    }
}
