//! Request lines from stdin, each at most a given length: a longer line is cut after its head
//! and the rest is discarded as it is read, never buffered.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// How much of an overlong line is kept (to find its `id`).
pub(super) const HEAD: usize = 64 * 1024;

/// One line of input, without its newline.
#[derive(Debug, PartialEq)]
pub(super) enum Line {
    /// A whole line.
    Whole(Vec<u8>),
    /// A line longer than the limit: its first [`HEAD`] bytes.
    TooLong(Vec<u8>),
}

/// Reads lines of at most `max` bytes. Cancel-safe: the partial line lives in the reader, so a
/// `next` dropped at its await loses nothing.
#[derive(Debug)]
pub(super) struct LineReader<R> {
    r: R,
    max: usize,
    buf: Vec<u8>,
    over: bool,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    pub(super) fn new(r: R, max: usize) -> Self {
        LineReader { r, max, buf: Vec::new(), over: false }
    }

    /// The next line, or `None` at the end of the input (a last line without a newline counts).
    pub(super) async fn next(&mut self) -> std::io::Result<Option<Line>> {
        loop {
            let chunk = self.r.fill_buf().await?;
            if chunk.is_empty() {
                return Ok((self.over || !self.buf.is_empty()).then(|| self.take()));
            }
            let newline = chunk.iter().position(|&b| b == b'\n');
            let part = &chunk[..newline.unwrap_or(chunk.len())];
            if !self.over && self.buf.len() + part.len() > self.max {
                // Over the limit: from here on, only the head is kept.
                self.over = true;
                self.buf.truncate(HEAD);
                self.buf.shrink_to_fit();
            }
            if self.over {
                let keep = HEAD.saturating_sub(self.buf.len()).min(part.len());
                self.buf.extend_from_slice(&part[..keep]);
            } else {
                self.buf.extend_from_slice(part);
            }
            let used = newline.map_or(chunk.len(), |i| i + 1);
            self.r.consume(used);
            if newline.is_some() {
                return Ok(Some(self.take()));
            }
        }
    }

    fn take(&mut self) -> Line {
        let buf = std::mem::take(&mut self.buf);
        if std::mem::take(&mut self.over) {
            Line::TooLong(buf)
        } else {
            Line::Whole(buf)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_over_the_limit_are_cut_and_the_next_line_is_read() {
        let long = "x".repeat(HEAD * 3);
        let input = format!("a\n{long}\nbb\n\n{}\nlast", "y".repeat(100));
        // A small buffer: lines span many reads.
        let mut r = LineReader::new(tokio::io::BufReader::with_capacity(7, input.as_bytes()), 100);
        let mut got = Vec::new();
        while let Some(l) = r.next().await.expect("read") {
            got.push(l);
        }
        let w = |s: &str| Line::Whole(s.as_bytes().to_vec());
        assert_eq!(
            got,
            [
                w("a"),
                Line::TooLong(long.as_bytes()[..HEAD].to_vec()),
                w("bb"),
                w(""),
                w(&"y".repeat(100)),
                w("last")
            ]
        );
    }
}
