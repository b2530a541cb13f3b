//! The order of a pipelined connection's calls: which one the worker runs (the oldest not yet
//! answered) and each one's position, for the cancel ladder and for failing the queued calls
//! of a worker that died (docs/protocol.md, "Pipelining").

use std::collections::VecDeque;

/// Calls sent and not yet answered, in the order their frames went out, with their positions
/// (calls counted from 0 on the connection, as the worker counts the `call` frames it reads).
#[derive(Debug, Default)]
pub(crate) struct CallOrder {
    next: u64,
    calls: VecDeque<(u64, u64)>,
}

impl CallOrder {
    /// Call `id`'s frame went out (recorded under the same lock as the write, so positions
    /// follow the pipe's order).
    pub(crate) fn sent(&mut self, id: u64) {
        self.calls.push_back((id, self.next));
        self.next += 1;
    }

    /// Call `id` is answered: it no longer counts. Usually the oldest; a call cancelled while
    /// it waited is answered out of turn.
    pub(crate) fn answered(&mut self, id: u64) {
        match self.calls.front() {
            Some(&(first, _)) if first == id => {
                self.calls.pop_front();
            }
            _ => {
                if let Some(i) = self.calls.iter().position(|&(c, _)| c == id) {
                    self.calls.remove(i);
                }
            }
        }
    }

    /// Call `id`'s position if the worker runs it now (it is the oldest unanswered).
    pub(crate) fn running(&self, id: u64) -> Option<u64> {
        self.calls.front().filter(|&&(c, _)| c == id).map(|&(_, pos)| pos)
    }

    /// The call the worker runs now, if any.
    pub(crate) fn oldest(&self) -> Option<u64> {
        self.calls.front().map(|&(c, _)| c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_unanswered_call_is_the_running_one() {
        let mut o = CallOrder::default();
        for id in [10, 11, 12] {
            o.sent(id);
        }
        assert_eq!(o.running(10), Some(0));
        assert_eq!(o.running(11), None, "queued behind 10");
        // 11 is cancelled while queued: answered out of turn.
        o.answered(11);
        assert_eq!(o.oldest(), Some(10));
        o.answered(10);
        assert_eq!(o.running(12), Some(2), "positions count every call sent");
        o.answered(99); // not a call of ours (a ping): no effect
        assert_eq!(o.oldest(), Some(12));
        o.answered(12);
        assert_eq!(o.oldest(), None);
        o.sent(13);
        assert_eq!(o.running(13), Some(3));
    }
}
