//! The worker's stdin: frames are written straight from the caller when nothing is queued (no
//! hand-off to another task, so no wake-up of another runtime thread per call), and otherwise
//! queued for the writer task, which owns the waiting on a full pipe. Either way a frame is
//! written whole and in order, under one lock: a caller that goes away can never leave half a
//! frame on the pipe.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::AsyncWrite;

/// The outbound half of a connection (see the [module docs](self)).
pub(crate) struct Outbox {
    state: Mutex<State>,
}

struct State {
    /// `None` once shut down.
    input: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    /// Frames not yet fully written; the first has `offset` bytes written.
    queue: VecDeque<Queued>,
    offset: usize,
    /// Written but not yet flushed.
    dirty: bool,
    /// No more frames: shut the input down once the queue is drained.
    closing: bool,
    /// The writer task, waiting for work.
    waker: Option<Waker>,
}

/// A frame waiting for the pipe, with what is released once it is written (or dropped).
struct Queued {
    frame: Vec<u8>,
    _until_written: Option<Box<dyn Send>>,
}

/// Why a frame was not taken.
#[derive(Debug)]
pub(crate) struct Closed;

impl Outbox {
    pub(crate) fn new(input: Box<dyn AsyncWrite + Send + Unpin>) -> Self {
        Outbox {
            state: Mutex::new(State {
                input: Some(input),
                queue: VecDeque::new(),
                offset: 0,
                dirty: false,
                closing: false,
                waker: None,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; recover the state rather than propagate.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one whole frame: written at once if the pipe has room and nothing is queued,
    /// otherwise queued for the writer task. Fails once the outbox is closing.
    pub(crate) fn push(&self, frame: Vec<u8>) -> Result<(), Closed> {
        self.push_held(frame, None)
    }

    /// Like [`push`](Self::push), and keeps `until_written` until the frame has been written
    /// whole (or dropped with the queue): a count of frames not yet on the pipe.
    pub(crate) fn push_held(
        &self,
        frame: Vec<u8>,
        until_written: Option<Box<dyn Send>>,
    ) -> Result<(), Closed> {
        let mut st = self.state();
        if st.closing {
            return Err(Closed);
        }
        let State { input, queue, offset, dirty, .. } = &mut *st;
        let Some(input) = input.as_mut() else { return Err(Closed) };
        if queue.is_empty() {
            // Write-through. Polling with a no-op waker is sound: when the pipe is full the
            // rest is queued and the writer task, woken below, polls again with its own waker.
            // An error is left to the writer task too, which meets it again and reports it.
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            let mut done = 0;
            while done < frame.len() {
                match Pin::new(&mut **input).poll_write(&mut cx, &frame[done..]) {
                    Poll::Ready(Ok(n)) if n > 0 => done += n,
                    _ => break,
                }
            }
            if done == frame.len() {
                match Pin::new(&mut **input).poll_flush(&mut cx) {
                    Poll::Ready(Ok(())) => return Ok(()),
                    _ => *dirty = true,
                }
            } else {
                queue.push_back(Queued { frame, _until_written: until_written });
                *offset = done;
            }
        } else {
            queue.push_back(Queued { frame, _until_written: until_written });
        }
        let waker = st.waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Takes no more frames; the writer task shuts the input down once the queue is drained.
    pub(crate) fn close(&self) {
        let mut st = self.state();
        st.closing = true;
        let waker = st.waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The writer task's work: writes what is queued, flushes, and once closing and drained
    /// shuts the input down. Resolves at that point, or with the first write error (the
    /// outbox then takes no more frames).
    pub(crate) fn poll_drive(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.state();
        let r = Self::drive(&mut st, cx);
        if let Poll::Ready(Err(_)) = &r {
            st.closing = true;
            st.queue.clear();
        }
        r
    }

    fn drive(st: &mut State, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let State { input, queue, offset, dirty, closing, waker } = st;
        let Some(out) = input.as_mut() else { return Poll::Ready(Ok(())) };
        while let Some(front) = queue.front() {
            match Pin::new(&mut **out).poll_write(cx, &front.frame[*offset..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    *offset += n;
                    if *offset == front.frame.len() {
                        queue.pop_front();
                        *offset = 0;
                        *dirty = true;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if *dirty {
            match Pin::new(&mut **out).poll_flush(cx) {
                Poll::Ready(Ok(())) => *dirty = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if *closing {
            let r = Pin::new(&mut **out).poll_shutdown(cx);
            if r.is_ready() {
                *input = None;
            }
            return r;
        }
        match waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => *waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;

    fn drive(ob: &Arc<Outbox>) -> tokio::task::JoinHandle<io::Result<()>> {
        let ob = ob.clone();
        tokio::spawn(async move { std::future::poll_fn(|cx| ob.poll_drive(cx)).await })
    }

    #[tokio::test]
    async fn frames_are_written_whole_and_in_order_through_a_full_pipe_then_closed() {
        let (w, mut r) = tokio::io::duplex(8);
        let ob = Arc::new(Outbox::new(Box::new(w)));
        let writer = drive(&ob);
        // The first frames go straight through; once the 8-byte pipe is full, the rest queue.
        for i in 0..50u8 {
            ob.push(vec![i; 5]).expect("open");
        }
        ob.close();
        assert!(ob.push(vec![1]).is_err(), "a closing outbox takes no more frames");
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.expect("read until the writer shuts the pipe down");
        let want: Vec<u8> = (0..50u8).flat_map(|i| vec![i; 5]).collect();
        assert_eq!(got, want);
        writer.await.expect("join").expect("drained and shut down");
    }

    #[tokio::test]
    async fn a_broken_pipe_ends_the_writer_with_the_error_and_refuses_more_frames() {
        let (w, r) = tokio::io::duplex(8);
        let ob = Arc::new(Outbox::new(Box::new(w)));
        let writer = drive(&ob);
        drop(r);
        let _ = ob.push(vec![0; 64]);
        assert!(writer.await.expect("join").is_err());
        assert!(ob.push(vec![0; 4]).is_err());
    }
}
