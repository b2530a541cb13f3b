//! Frames: a length-delimited reader with a stall timer, and the in-place frame encoder.

use super::*;

/// Reads length-delimited frames, failing a frame whose body stalls past `frame_timeout`.
///
/// A frame's header stays at the front of the buffer until its whole body has arrived, so what
/// a stalled or oversized frame announced is always read from its own header.
pub(crate) struct FrameReader {
    output: Box<dyn AsyncRead + Send + Unpin>,
    buf: BytesMut,
    max_frame: usize,
    frame_timeout: Duration,
    /// Counts completed reads (see [`Credit`]).
    reads: Arc<AtomicU64>,
}

pub(crate) enum ReadOutcome {
    Frame(Bytes),
    Eof,
    Broken(String),
}

/// The length of a frame header.
pub(crate) const HEADER: usize = 4;

impl FrameReader {
    pub(crate) fn new(
        output: Box<dyn AsyncRead + Send + Unpin>,
        max_frame: usize,
        frame_timeout: Duration,
        reads: Arc<AtomicU64>,
    ) -> Self {
        FrameReader { output, buf: BytesMut::with_capacity(64 * 1024), max_frame, frame_timeout, reads }
    }

    /// A whole frame from the front of the buffer, if one is there; an error for a header
    /// announcing more than `max_frame`.
    pub(crate) fn decode(&mut self) -> Result<Option<Bytes>, String> {
        let Some(n) = self.announced() else { return Ok(None) };
        if n > self.max_frame {
            return Err(format!(
                "inbound frame announces {n} bytes, over max_frame ({} bytes)",
                self.max_frame
            ));
        }
        if self.buf.len() < HEADER + n {
            return Ok(None);
        }
        self.buf.advance(HEADER);
        Ok(Some(self.buf.split_to(n).freeze()))
    }

    pub(crate) async fn next(&mut self) -> ReadOutcome {
        loop {
            match self.decode() {
                Ok(Some(frame)) => return ReadOutcome::Frame(frame),
                Ok(None) => {}
                Err(detail) => return ReadOutcome::Broken(detail),
            }
            if self.buf.capacity() - self.buf.len() < 8 * 1024 {
                let want =
                    self.announced().map_or(64 * 1024, |n| n + HEADER).clamp(8 * 1024, 4 * 1024 * 1024);
                self.buf.reserve(want);
            }
            let read = if self.buf.is_empty() {
                self.output.read_buf(&mut self.buf).await
            } else {
                match tokio::time::timeout(self.frame_timeout, self.output.read_buf(&mut self.buf)).await {
                    Ok(r) => r,
                    Err(_) => {
                        return ReadOutcome::Broken(match self.announced() {
                            Some(n) => format!(
                            "frame stalled: header announced {n} bytes, {} arrived, then nothing for {:?}",
                            self.buf.len().saturating_sub(HEADER),
                            self.frame_timeout
                        ),
                            None => format!(
                                "{} stray bytes, then nothing for {:?}",
                                self.buf.len(),
                                self.frame_timeout
                            ),
                        })
                    }
                }
            };
            match read {
                Ok(0) => return ReadOutcome::Eof,
                Ok(_) => {
                    self.reads.fetch_add(1, Ordering::AcqRel);
                }
                Err(e) => return ReadOutcome::Broken(format!("read error: {e}")),
            }
        }
    }

    /// The length announced by the header at the front of the buffer, once all of it is there.
    pub(crate) fn announced(&self) -> Option<usize> {
        let h: [u8; HEADER] = self.buf.get(..HEADER)?.try_into().ok()?;
        Some(u32::from_be_bytes(h) as usize)
    }
}

/// Frames `body_fn`'s output: reserves 4 header bytes, appends the body, patches the length.
pub(crate) fn frame(
    capacity: usize,
    max_frame: usize,
    body_fn: impl FnOnce(&mut Vec<u8>),
) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(capacity + 4);
    out.extend_from_slice(&[0; 4]);
    body_fn(&mut out);
    let len = out.len() - 4;
    if len > max_frame {
        return Err(Error::FrameTooLarge { size: len, max: max_frame });
    }
    let len32 = u32::try_from(len).map_err(|_| Error::FrameTooLarge { size: len, max: max_frame })?;
    out[..4].copy_from_slice(&len32.to_be_bytes());
    Ok(out)
}
