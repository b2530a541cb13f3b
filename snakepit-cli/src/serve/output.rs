//! Reply lines and the one thread that writes them to stdout.
//!
//! Every line is one compact JSON object: the id as the request spelled it (compacted), and a
//! worker's result or chunk with its insignificant whitespace removed (a worker cannot split
//! its reply into several lines, nor forge a line for another request). The queue of lines
//! waiting for stdout is bounded: when nobody reads stdout, the tasks producing replies wait,
//! and through them stdin and the workers' streams.

use std::io::Write as _;

use snakepit::Payload;
use tokio::sync::mpsc;

use super::json::push_compact;

/// Reply lines waiting for stdout.
pub(super) const QUEUED_LINES: usize = 256;

/// Where tasks send their reply lines.
pub(super) type Out = mpsc::Sender<Vec<u8>>;

/// A request's id as it appears in its replies (`null` when it has none).
#[derive(Clone, Debug)]
pub(super) struct Id(Vec<u8>);

impl Id {
    pub(super) fn new(raw: Option<&serde_json::value::RawValue>) -> Self {
        match raw {
            Some(r) => {
                let mut id = Vec::with_capacity(r.get().len());
                push_compact(&mut id, r.get().as_bytes());
                Id(id)
            }
            None => Id::null(),
        }
    }

    pub(super) fn null() -> Self {
        Id(b"null".to_vec())
    }

    fn open(&self, capacity: usize) -> Vec<u8> {
        let mut line = Vec::with_capacity(self.0.len() + capacity + 16);
        line.extend_from_slice(b"{\"id\":");
        line.extend_from_slice(&self.0);
        line
    }
}

/// `{"id":..,"<key>":<value>}` for a result (`ok`) or a stream item (`chunk`), or the error
/// line to send instead when the value is not JSON.
pub(super) fn value_line(id: &Id, key: &str, p: &Payload) -> Result<Vec<u8>, Vec<u8>> {
    let bytes = p.bytes();
    // The stdio transport hands over only values it parsed; check anything else.
    if !p.is_trusted() && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_err() {
        let e = serde_json::json!({"kind": "protocol", "message": format!("the worker's {key} is not JSON")});
        return Err(error_line(id, &e));
    }
    let mut line = id.open(key.len() + bytes.len());
    line.extend_from_slice(b",\"");
    line.extend_from_slice(key.as_bytes());
    line.extend_from_slice(b"\":");
    push_compact(&mut line, bytes);
    line.push(b'}');
    Ok(line)
}

/// `{"id":..,"end":true}`: the end of a stream.
pub(super) fn end_line(id: &Id) -> Vec<u8> {
    let mut line = id.open(12);
    line.extend_from_slice(b",\"end\":true}");
    line
}

/// `{"id":..,"error":<e>}`.
pub(super) fn error_line(id: &Id, e: &serde_json::Value) -> Vec<u8> {
    let mut line = id.open(128);
    line.extend_from_slice(b",\"error\":");
    // Writing a `Value` to a `Vec` cannot fail; it is compact and escapes every line break.
    let _ = serde_json::to_writer(&mut line, e);
    line.push(b'}');
    line
}

/// A `bad_request` error line.
pub(super) fn bad_request(id: &Id, message: String) -> Vec<u8> {
    error_line(id, &serde_json::json!({"kind": "bad_request", "message": message}))
}

/// Starts the writer: lines are written as they come, several per write when they queue up,
/// until every sender is gone or stdout is closed.
pub(super) fn spawn_writer(mut rx: mpsc::Receiver<Vec<u8>>) -> std::thread::JoinHandle<()> {
    const BATCH: usize = 64 * 1024;
    std::thread::spawn(move || {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(line) = rx.blocking_recv() {
            batch.extend_from_slice(&line);
            batch.push(b'\n');
            drop(line);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(line) => {
                        batch.extend_from_slice(&line);
                        batch.push(b'\n');
                    }
                    Err(_) => break,
                }
            }
            if out.write_all(&batch).and_then(|()| out.flush()).is_err() {
                break;
            }
            batch.clear();
            if batch.capacity() > 4 * BATCH {
                batch = Vec::with_capacity(BATCH);
            }
        }
    })
}
