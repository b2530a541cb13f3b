//! The worker's calls to the host: answered on their own tasks, at most `MAX_HOST_CALLS` at once.

use super::*;

/// The most `host_call`s a worker may have outstanding on one connection (received, and their
/// `host_result` not yet written to its stdin); one more is a protocol violation.
pub const MAX_HOST_CALLS: usize = 64;

/// One outstanding `host_call`: released once its `host_result` is written to the worker's
/// stdin (or dropped).
pub(crate) struct HostCallPermit(Arc<AtomicUsize>);

impl Drop for HostCallPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs a worker's call to the host on its own task (the worker waits for the answer while
/// its request is in flight, so the reader must not), then sends `host_result`.
pub(crate) fn host_call(
    shared: &Arc<Shared>,
    frame: &Bytes,
    segments: Vec<Bytes>,
    msg: Inbound<'_>,
) -> Result<(), String> {
    let Some(id) = msg.id else { return Err("`host_call` without an id".into()) };
    let permit = HostCallPermit(shared.host_calls.clone());
    if shared.host_calls.fetch_add(1, Ordering::AcqRel) >= MAX_HOST_CALLS {
        return Err(format!(
            "the worker has more than {MAX_HOST_CALLS} `host_call`s outstanding (sent, their `host_result` not \
             yet taken)"
        ));
    }
    let args = match msg.args {
        Some(raw) => {
            Payload::from_trusted(Codec::Json, frame.slice_ref(raw.get().as_bytes())).with_segments(segments)
        }
        None => Payload::null(),
    };
    let request = msg.call;
    let call = HostCall::new(shared.worker, request.map(RequestId), msg.name.unwrap_or_default(), args);
    let shared = shared.clone();
    tokio::spawn(async move {
        let answer = async {
            match &shared.host {
                Some(h) => h.host_call(call).await,
                None => Err(WorkerError {
                    kind: "UnknownHostTool".into(),
                    message: "this pool has no host tools".into(),
                    traceback: None,
                }),
            }
        };
        // A host call lives no longer than the request it serves: once the worker has answered
        // (or the host has forgotten) that request, nobody waits for this answer, so it is
        // dropped and its permit released (a cancelled request's slow host tool must not pin
        // one of the worker's `MAX_HOST_CALLS` for long).
        let result = match request {
            Some(rid) => tokio::select! {
                r = answer => r,
                () = request_over(&shared, rid) => return,
            },
            None => answer.await,
        };
        let segments_ok = shared.segments.load(Ordering::Acquire);
        let mut f = match &result {
            // Host results travel in the frame (the arena is for call arguments and replies).
            Ok(p) if p.has_segments() && segments_ok => {
                frame_segmented(p.len() + 48, shared.max_frame, p.segments(), None, |out| {
                    wire::encode_host_result(out, id, Ok(p.bytes().as_ref()))
                })
                .map(|(f, _)| f)
            }
            Ok(p) if p.has_segments() => {
                let e = WorkerError {
                    kind: "BadRequest".into(),
                    message: "the host tool returned bytes, and this worker does not accept binary segments"
                        .into(),
                    traceback: None,
                };
                frame_result(shared.max_frame, id, Err(&e))
            }
            _ => frame_result(shared.max_frame, id, result.as_ref().map(|p| p.bytes().as_ref())),
        };
        if let Err(Error::FrameTooLarge { size, max }) = &f {
            let e = WorkerError {
                kind: "FrameTooLarge".into(),
                message: format!("host result of {size} bytes exceeds max_frame {max}"),
                traceback: None,
            };
            f = frame_result(shared.max_frame, id, Err(&e));
        }
        if let Ok(f) = f {
            // Outstanding until written: a worker that does not read its stdin cannot make the
            // host queue answers without bound.
            let _ = shared.outbox.push_held(f, Some(Box::new(permit)));
        }
    });
    Ok(())
}

/// Resolves once request `id` is no longer pending (answered, forgotten) or the connection is
/// closed.
async fn request_over(shared: &Shared, id: u64) {
    loop {
        let changed = shared.idle.notified();
        if !shared.pending().contains_key(&id) || shared.close_reason().is_some() {
            return;
        }
        changed.await;
    }
}

pub(crate) fn frame_result(
    max_frame: usize,
    id: u64,
    r: Result<&[u8], &WorkerError>,
) -> Result<Vec<u8>, Error> {
    let len = r.as_ref().map_or(256, |b| b.len() + 48);
    frame(len, max_frame, |out| wire::encode_host_result(out, id, r))
}
