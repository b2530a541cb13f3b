//! A worker's stderr: pumped into `tracing` line by line, each line capped and escaped, the
//! last lines kept (bounded) for error reports.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader};

use crate::process::{LogTarget, Shared};

/// The most lines the stderr tail keeps.
pub(crate) const TAIL_LINES: usize = 40;
/// The most the stderr tail keeps (the end of its last lines).
pub(crate) const TAIL_BYTES: usize = 8 * 1024;
/// The longest stderr line kept (logged, and put in the tail); the rest of a longer line is
/// dropped as it is read, and [`TRUNCATED`] appended.
pub(crate) const MAX_LINE: usize = 16 * 1024;
/// Marks a stderr line cut at [`MAX_LINE`].
pub(crate) const TRUNCATED: &str = "…[truncated]";
/// The last lines a worker wrote to stderr.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Tail {
    /// Keeps the last [`TAIL_LINES`] lines, and of them the last [`TAIL_BYTES`] bytes of text
    /// (the oldest line kept may lose its beginning).
    pub(crate) fn push(&mut self, line: String) {
        // Each line counts with its newline.
        self.bytes += line.len() + 1;
        self.lines.push_back(line);
        while self.lines.len() > TAIL_LINES {
            if let Some(l) = self.lines.pop_front() {
                self.bytes -= l.len() + 1;
            }
        }
        while self.bytes > TAIL_BYTES {
            let Some(front) = self.lines.front_mut() else { break };
            let over = self.bytes - TAIL_BYTES;
            if over > front.len() {
                self.bytes -= front.len() + 1;
                self.lines.pop_front();
            } else {
                // Only its end fits: cut on a character boundary.
                let mut cut = over;
                while !front.is_char_boundary(cut) {
                    cut += 1;
                }
                front.drain(..cut);
                self.bytes -= cut;
            }
        }
    }

    pub(crate) fn text(&self) -> String {
        let mut s = String::with_capacity(self.bytes);
        for l in &self.lines {
            s.push_str(l);
            s.push('\n');
        }
        s
    }
}

/// Reads one stderr line into `buf` (without its `\n`), keeping at most [`MAX_LINE`] bytes: the
/// rest of a longer line is consumed and dropped as it arrives. Returns `None` at the end of
/// the stream (or on a read error) when nothing was read, else whether the line was cut.
pub(crate) async fn read_capped_line(
    reader: &mut (impl AsyncBufRead + Unpin),
    buf: &mut Vec<u8>,
) -> Option<bool> {
    let mut cut = false;
    let mut any = false;
    while let Ok(avail) = reader.fill_buf().await {
        if avail.is_empty() {
            break;
        }
        any = true;
        let (chunk, used, done) = match avail.iter().position(|b| *b == b'\n') {
            Some(i) => (&avail[..i], i + 1, true),
            None => (avail, avail.len(), false),
        };
        let room = MAX_LINE.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        cut |= chunk.len() > room;
        reader.consume(used);
        if done {
            return Some(cut);
        }
    }
    any.then_some(cut)
}

/// A stderr line as it is logged and kept: invalid UTF-8 replaced, control characters (but
/// tabs) escaped, so that a worker cannot forge log lines or drive the terminal.
pub(crate) fn clean_line(raw: &[u8], cut: bool) -> String {
    let text = String::from_utf8_lossy(raw);
    let text = text.strip_suffix('\r').unwrap_or(&text);
    let mut line = String::with_capacity(text.len() + if cut { TRUNCATED.len() } else { 0 });
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    if cut {
        line.push_str(TRUNCATED);
    }
    line
}

pub(crate) fn spawn_stderr_pump(stderr: impl AsyncRead + Send + Unpin + 'static, shared: Arc<Shared>) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr);
        let mut buf = Vec::with_capacity(256);
        loop {
            buf.clear();
            let Some(cut) = read_capped_line(&mut reader, &mut buf).await else { break };
            let line = clean_line(&buf, cut);
            match shared.log_target {
                LogTarget::Worker => {
                    tracing::info!(target: "snakepit::worker", worker = %shared.id, "{line}")
                }
                LogTarget::Zygote => tracing::info!(target: "snakepit::zygote", "{line}"),
            }
            shared.tail.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
        let _ = shared.stderr_done.send_replace(true);
    });
}
