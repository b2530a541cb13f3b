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
    /// A frame's body, and whether it is segmented.
    Frame(Bytes, bool),
    Eof,
    Broken(String),
}

/// The length of a frame header.
pub(crate) const HEADER: usize = 4;

/// The header bit that marks a segmented frame (docs/protocol.md, "Binary segments"): the body
/// is `u32 json_len`, the JSON message, then its segments. The other 31 bits are the length.
pub(crate) const SEGMENTED: u32 = 1 << 31;

impl FrameReader {
    pub(crate) fn new(
        output: Box<dyn AsyncRead + Send + Unpin>,
        max_frame: usize,
        frame_timeout: Duration,
        reads: Arc<AtomicU64>,
    ) -> Self {
        FrameReader { output, buf: BytesMut::with_capacity(64 * 1024), max_frame, frame_timeout, reads }
    }

    /// A whole frame from the front of the buffer (and whether it is segmented), if one is
    /// there; an error for a header announcing more than `max_frame`.
    pub(crate) fn decode(&mut self) -> Result<Option<(Bytes, bool)>, String> {
        let Some(n) = self.announced() else { return Ok(None) };
        let segmented = self.buf[0] & 0x80 != 0;
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
        Ok(Some((self.buf.split_to(n).freeze(), segmented)))
    }

    pub(crate) async fn next(&mut self) -> ReadOutcome {
        loop {
            match self.decode() {
                Ok(Some((frame, segmented))) => return ReadOutcome::Frame(frame, segmented),
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

    /// The length announced by the header at the front of the buffer (without the segmented
    /// bit), once all of it is there.
    pub(crate) fn announced(&self) -> Option<usize> {
        let h: [u8; HEADER] = self.buf.get(..HEADER)?.try_into().ok()?;
        Some((u32::from_be_bytes(h) & !SEGMENTED) as usize)
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

/// Where a segmented call's large segments go: the worker's shared-memory arena, for
/// segments of at least `threshold` bytes.
#[derive(Clone, Copy)]
pub(crate) struct Placement<'a> {
    pub(crate) arena: &'a Arena,
    pub(crate) threshold: usize,
}

/// A segmented frame: `body_fn`'s JSON message with the segment table appended, then the
/// segments themselves (copied in once). With a `placement`, each segment of at least its
/// threshold is copied into the arena instead (while there is room) and listed as
/// `[offset, length]`; the regions it took are returned with the frame, to be freed once the
/// worker has answered. `max_frame` bounds the frame's body, the segments in it included.
pub(crate) fn frame_segmented(
    capacity: usize,
    max_frame: usize,
    segments: &[Bytes],
    placement: Option<Placement<'_>>,
    body_fn: impl FnOnce(&mut Vec<u8>),
) -> Result<(Vec<u8>, Vec<Region>), Error> {
    // Regions in the arena, one per segment that went there (`None`: in the body).
    let mut regions: Vec<Option<Region>> = Vec::new();
    if let Some(p) = placement.filter(|p| segments.iter().any(|s| s.len() >= p.threshold)) {
        regions = segments
            .iter()
            .map(|s| (s.len() >= p.threshold).then(|| p.arena.alloc_copy(s)).flatten())
            .collect();
    }
    let in_arena = |i: usize| regions.get(i).is_some_and(Option::is_some);
    let seg_len: usize =
        segments.iter().enumerate().filter(|(i, _)| !in_arena(*i)).map(|(_, s)| s.len()).sum();
    let mut out = Vec::with_capacity(capacity + 8 + seg_len + 24 * segments.len());
    out.extend_from_slice(&[0; 8]);
    body_fn(&mut out);
    if regions.is_empty() {
        snakepit_core::wire::push_segment_table(&mut out, segments);
    } else {
        let entries = segments.iter().zip(&regions).map(|(s, r)| match r {
            Some(r) => SegEntry::Shm([r.offset(), s.len() as u64]),
            None => SegEntry::Inline(s.len() as u64),
        });
        snakepit_core::wire::push_segment_entries(&mut out, entries);
    }
    let json_len = out.len() - 8;
    let len = out.len() - 4 + seg_len;
    let too_large = || Error::FrameTooLarge { size: len, max: max_frame };
    let header = u32::try_from(len).ok().filter(|l| l & SEGMENTED == 0 && len <= max_frame);
    let (Some(len32), Ok(json32)) = (header, u32::try_from(json_len)) else {
        if let Some(p) = placement {
            regions.into_iter().flatten().for_each(|r| p.arena.free(r));
        }
        return Err(too_large());
    };
    out[..4].copy_from_slice(&(len32 | SEGMENTED).to_be_bytes());
    out[4..8].copy_from_slice(&json32.to_be_bytes());
    for (i, s) in segments.iter().enumerate() {
        if !in_arena(i) {
            out.extend_from_slice(s);
        }
    }
    Ok((out, regions.into_iter().flatten().collect()))
}

/// A segmented frame's JSON message (a zero-copy slice), checking its length against the body.
pub(crate) fn segmented_json(body: &Bytes) -> Result<Bytes, String> {
    let json_len = body
        .get(..4)
        .and_then(|h| <[u8; 4]>::try_from(h).ok())
        .map(|h| u32::from_be_bytes(h) as usize)
        .ok_or("segmented frame shorter than its JSON length")?;
    let rest = body.len() - 4;
    if json_len > rest {
        return Err(format!("segmented frame: JSON length {json_len} over the {rest} bytes that follow"));
    }
    Ok(body.slice(4..4 + json_len))
}

/// A segmented frame's segments, as its JSON's `seg` table lists them after the `json_len`
/// bytes of JSON: zero-copy slices of the body for the inline ones, whose lengths must fill
/// the body exactly, and copies out of the arena (bounds-checked against the worker's part)
/// for `[offset, length]` entries, whose offsets are pushed to `released`.
pub(crate) fn segments_of(
    body: &Bytes,
    json_len: usize,
    table: Option<&[SegEntry]>,
    arena: Option<&Arena>,
    released: &mut Vec<u64>,
) -> Result<Vec<Bytes>, String> {
    let mut at = 4 + json_len;
    let table = table.unwrap_or_default();
    let mut segments = Vec::with_capacity(table.len());
    // What the frame copies out of the arena, bounded by the worker's part: a small frame
    // naming one region many times must not make the host allocate without bound.
    let mut from_arena: u64 = 0;
    for entry in table {
        match *entry {
            SegEntry::Inline(n) => {
                let end =
                    usize::try_from(n).ok().and_then(|n| at.checked_add(n)).filter(|&e| e <= body.len());
                let Some(end) = end else {
                    return Err(format!(
                        "segmented frame: segment table {table:?} runs past the body ({} bytes)",
                        body.len()
                    ));
                };
                segments.push(body.slice(at..end));
                at = end;
            }
            SegEntry::Shm([offset, len]) => {
                let Some(arena) = arena else {
                    return Err(format!(
                        "segmented frame: a shared-memory segment [{offset}, {len}] without a shared-memory arena agreed"
                    ));
                };
                from_arena = from_arena.saturating_add(len);
                let part = (arena.size() - arena.split()) as u64;
                if from_arena > part {
                    return Err(format!(
                        "segmented frame: its shared-memory segments add up to more than the worker's part of the \
                         arena ({part} bytes)"
                    ));
                }
                segments.push(arena.read(offset, len).map_err(|e| format!("segmented frame: {e}"))?);
                released.push(offset);
            }
        }
    }
    if at != body.len() {
        return Err(format!(
            "segmented frame: {} bytes past the segments its table lists ({table:?})",
            body.len() - at
        ));
    }
    Ok(segments)
}
