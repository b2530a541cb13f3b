//! Streamed calls: the credit a consumer has granted, and the consumer's side of the stream.

use super::*;

/// The chunks a stream's consumer has allowed so far: the initial window plus every `credit`
/// granted. The reader counts chunks against the credit granted *before the read that brought
/// them in* (a worker cannot have seen a later grant), so a worker that overruns its credit is
/// caught whatever the speed of the consumer.
#[derive(Debug)]
pub(crate) struct Credit(Mutex<CreditState>);

#[derive(Debug)]
pub(crate) struct CreditState {
    /// Granted before the reads numbered above `recent_read`.
    visible: u64,
    /// Granted while `recent_read` was the last completed read: visible to later reads only.
    recent: u64,
    recent_read: u64,
}

impl Credit {
    pub(crate) fn new(window: u32) -> Self {
        Credit(Mutex::new(CreditState { visible: u64::from(window), recent: 0, recent_read: 0 }))
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, CreditState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The consumer grants `n` more chunks; `reads` is the number of completed reads now.
    pub(crate) fn grant(&self, n: u32, reads: u64) {
        let mut st = self.state();
        st.settle(reads);
        st.recent += u64::from(n);
        st.recent_read = reads;
    }

    /// The credit a chunk brought in by read number `read` may use.
    pub(crate) fn allowed(&self, read: u64) -> u64 {
        let mut st = self.state();
        st.settle(read);
        st.visible
    }
}

impl CreditState {
    /// Credit granted before read `read` completed becomes visible to it.
    pub(crate) fn settle(&mut self, read: u64) {
        if self.recent_read < read {
            self.visible += std::mem::take(&mut self.recent);
        }
    }
}

/// What the reader hands a stream's consumer.
#[derive(Debug)]
pub(crate) enum StreamItem {
    Chunk(Payload),
    End,
    Err(WorkerError),
    /// The worker died while the stream waited in its pipeline.
    NotStarted,
    Closed(CloseReason),
}

/// The consumer side of a streamed call: yields chunks, grants credit as it goes, and leaves a
/// tombstone for the id when dropped early.
pub(crate) struct ReplyStream {
    rx: mpsc::Receiver<StreamItem>,
    shared: Arc<Shared>,
    /// What the reader checks the worker's chunks against.
    credit: Arc<Credit>,
    id: u64,
    command: String,
    refill: u32,
    taken: u32,
    done: bool,
}

impl ReplyStream {
    /// The consumer side of stream `id`, granting credit every half `window`.
    pub(crate) fn new(
        rx: mpsc::Receiver<StreamItem>,
        shared: Arc<Shared>,
        credit: Arc<Credit>,
        id: u64,
        command: String,
        window: u32,
    ) -> Self {
        ReplyStream { rx, shared, credit, id, command, refill: (window / 2).max(1), taken: 0, done: false }
    }
}

impl futures::Stream for ReplyStream {
    type Item = Result<Payload, Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        let item = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(i) => i,
        };
        let this = &mut *self;
        match item {
            Some(StreamItem::Chunk(p)) => {
                this.taken += 1;
                if this.taken >= this.refill {
                    let n = std::mem::take(&mut this.taken);
                    // Granted before it is sent: the worker may use it once it reads the frame.
                    this.credit.grant(n, this.shared.reads.load(Ordering::Acquire));
                    if let Ok(f) =
                        frame(48, this.shared.max_frame, |out| wire::encode_credit(out, this.id, n))
                    {
                        let _ = this.shared.outbox.push(f);
                    }
                }
                Poll::Ready(Some(Ok(p)))
            }
            Some(StreamItem::End) => {
                this.done = true;
                Poll::Ready(None)
            }
            Some(StreamItem::Err(error)) => {
                this.done = true;
                Poll::Ready(Some(Err(Error::Worker {
                    worker: this.shared.worker,
                    command: std::mem::take(&mut this.command),
                    error,
                })))
            }
            Some(StreamItem::NotStarted) => {
                this.done = true;
                Poll::Ready(Some(Err(Error::NotStarted {
                    worker: this.shared.worker,
                    command: std::mem::take(&mut this.command),
                })))
            }
            Some(StreamItem::Closed(reason)) => {
                this.done = true;
                Poll::Ready(Some(Err(this.shared.error_for(&reason))))
            }
            None => {
                this.done = true;
                let reason = this.shared.close_reason().unwrap_or(CloseReason::Closed);
                Poll::Ready(Some(Err(this.shared.error_for(&reason))))
            }
        }
    }
}

impl Drop for ReplyStream {
    fn drop(&mut self) {
        if !self.done {
            let mut pending = self.shared.pending();
            if let Some(w) = pending.get_mut(&self.id) {
                *w = None;
            }
        }
    }
}
