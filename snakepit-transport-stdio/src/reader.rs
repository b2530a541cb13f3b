//! The reader task: frames from the worker, dispatched to the calls, pings and streams waiting
//! for them.

use super::*;

/// At most one log line a second for a repeated event, with the number left out meanwhile.
#[derive(Debug, Default)]
pub(crate) struct LogLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    /// Whether to log now; if so, with how many were suppressed since the last line.
    pub(crate) fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < Duration::from_secs(1) => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

pub(crate) async fn read_loop(mut reader: FrameReader, shared: Arc<Shared>) {
    loop {
        match reader.next().await {
            ReadOutcome::Frame(f, segmented) => {
                if let Err(detail) = dispatch(&shared, f, segmented) {
                    shared.close(CloseReason::Protocol(detail));
                    return;
                }
            }
            ReadOutcome::Eof => {
                shared.close_at_eof();
                return;
            }
            ReadOutcome::Broken(detail) => {
                shared.close(CloseReason::Protocol(detail));
                return;
            }
        }
    }
}

pub(crate) fn dispatch(shared: &Arc<Shared>, body: Bytes, segmented: bool) -> Result<(), String> {
    if segmented && !shared.segments.load(Ordering::Acquire) {
        return Err("a segmented frame from a worker that did not announce binary segments".into());
    }
    // A segmented frame: `u32 json_len`, the JSON, the segments its `seg` table lists.
    let json = if segmented { segmented_json(&body)? } else { body.clone() };
    let msg: Inbound<'_> = serde_json::from_slice(&json).map_err(|e| format!("malformed message: {e}"))?;
    let shm = shared.shm.get();
    let segments = if segmented {
        let mut released = Vec::new();
        let segments =
            segments_of(&body, json.len(), msg.seg.as_deref(), shm.map(|s| &*s.arena), &mut released)?;
        if !released.is_empty() {
            // Copied out: the worker may reuse those regions (before any later call of ours).
            let f = frame(24 + 21 * released.len(), usize::MAX, |out| wire::encode_release(out, &released))
                .map_err(|e| e.to_string())?;
            let _ = shared.outbox.push(f);
        }
        segments
    } else {
        Vec::new()
    };
    // A message carries at most one payload: its segments move into it.
    let mut segments = Some(segments);
    let mut payload = |raw: Option<&serde_json::value::RawValue>| match raw {
        Some(raw) => Payload::from_trusted(Codec::Json, json.slice_ref(raw.get().as_bytes()))
            .with_segments(segments.take().unwrap_or_default()),
        None => Payload::null(),
    };
    let tag = &*msg.t;
    if tag == "host_call" {
        return host_call(shared, &json, segments.take().unwrap_or_default(), msg);
    }
    if !matches!(tag, "result" | "error" | "pong" | "chunk" | "end") {
        tracing::debug!(worker = %shared.worker, tag, "ignoring message of unknown type");
        return Ok(());
    }
    let Some(id) = msg.id else {
        return Err(format!("`{tag}` message without an id"));
    };
    if matches!(tag, "result" | "error" | "end") && shared.is_pipelined() {
        // Call `id` is over: the next one in line is the one the worker runs.
        shared.order().answered(id);
    }
    if let (Some(shm), "result" | "error" | "end") = (shm, tag) {
        // The call is answered: the tool is done with its arguments in the arena.
        shm.settle(id, msg.keep == Some(true));
    }
    let error = || {
        msg.error.clone().unwrap_or_else(|| WorkerError {
            kind: "UnknownError".into(),
            message: "the worker sent an error without details".into(),
            traceback: None,
        })
    };
    let mut pending = shared.pending();
    match pending.get_mut(&id) {
        Some(Some(Waiter::Stream { tx, credit, received })) => {
            if matches!(tag, "chunk" | "result") {
                // Granted credit is added before the `credit` frame is sent, so a worker that
                // keeps to its credit never gets here.
                *received += 1;
                let allowed = credit.allowed(shared.reads.load(Ordering::Acquire));
                if *received > allowed {
                    return Err(format!(
                        "stream {id}: the worker sent more chunks than its credit ({allowed} granted)"
                    ));
                }
            }
            let item = match tag {
                "chunk" => StreamItem::Chunk(payload(msg.data)),
                // A plain result for a stream: one chunk, then the end.
                "result" => StreamItem::Chunk(payload(msg.ok)),
                "end" => StreamItem::End,
                "error" => StreamItem::Err(error()),
                _ => return Err(format!("`{tag}` sent for stream {id}")),
            };
            let last = !matches!(item, StreamItem::Chunk(_)) || tag == "result";
            match tx.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return Err(format!("stream {id}: the worker sent more chunks than its credit"));
                }
                // The consumer is gone: keep a tombstone until the stream ends.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    pending.insert(id, None);
                }
            }
            if tag == "result" {
                let _ = match pending.get(&id) {
                    Some(Some(Waiter::Stream { tx, .. })) => tx.try_send(StreamItem::End),
                    _ => Ok(()),
                };
            }
            if last {
                pending.remove(&id);
            }
        }
        Some(Some(Waiter::Slot { .. })) => {
            if !matches!(tag, "result" | "error" | "pong") {
                return Err(format!("`{tag}` sent for call {id}"));
            }
            if let Some(Some(Waiter::Slot { slot, command })) = pending.remove(&id) {
                drop(pending);
                let worker = shared.worker;
                slot.fill(match tag {
                    "result" => Ok(payload(msg.ok)),
                    "error" => Err(Error::Worker { worker, command: command.to_string(), error: error() }),
                    _ => Err(Error::Protocol {
                        worker,
                        detail: format!("`pong` sent for call id {id}"),
                        source: None,
                    }),
                });
                shared.idle.notify_waiters();
                return Ok(());
            }
        }
        Some(Some(Waiter::Call(_))) => {
            let reply = match tag {
                "result" => Reply::NotPong("result"),
                "error" => Reply::NotPong("error"),
                "pong" => Reply::Pong,
                _ => return Err(format!("`{tag}` sent for call {id}")),
            };
            if let Some(Some(Waiter::Call(tx))) = pending.remove(&id) {
                if tx.send(reply).is_err() {
                    tracing::debug!(worker = %shared.worker, id, "caller went away; reply dropped");
                }
            }
        }
        Some(None) => {
            // An abandoned call or stream: drop what it sends; forget it at its last message.
            if tag != "chunk" {
                pending.remove(&id);
                tracing::debug!(worker = %shared.worker, id, "late reply for an abandoned call; dropped");
            }
        }
        None => {
            let admitted =
                shared.unknown_replies.lock().unwrap_or_else(|p| p.into_inner()).admit(Instant::now());
            if let Some(suppressed) = admitted {
                tracing::warn!(
                    worker = %shared.worker,
                    id,
                    tag,
                    suppressed,
                    "message for a request nobody waits for; dropped ({suppressed} more like it in the last second \
                     not logged)"
                )
            }
        }
    }
    drop(pending);
    // Wakes `idle()` and `answered()` waiters, who re-check the map.
    if tag != "chunk" {
        shared.idle.notify_waiters();
    }
    Ok(())
}
