//! Entry point for the `serve_lines` fuzz target: the request path of `snakepit serve`, from
//! stdin's bytes to the lines it answers without a worker. The modules are `serve`'s own files,
//! compiled again here (the binary keeps its copy).

#![allow(dead_code)] // the parts of `serve` that need a pool or stdout are not driven here

#[path = "serve/input.rs"]
mod input;
#[path = "serve/json.rs"]
mod json;
#[path = "serve/output.rs"]
mod output;

use futures::FutureExt as _;

use self::input::{Line, LineReader};
use self::output::Id;

/// The line limit [`fuzz_serve_input`] reads with (`serve` uses `max_frame` + 64 KiB), small so
/// that short inputs reach the overlong-line path.
pub const MAX_LINE: usize = 512;

/// The allocation bound of [`fuzz_serve_input`] per input byte: peak live heap
/// `<= SERVE_K * N + SERVE_C` for `N` input bytes.
pub const SERVE_K: usize = 16;

/// The constant part of [`fuzz_serve_input`]'s allocation bound (the 64 KiB reader buffer and
/// the kept head of an overlong line, with room for their growth).
pub const SERVE_C: usize = 512 * 1024;

/// Reads `bytes` as `serve`'s stdin (lines of at most [`MAX_LINE`] bytes) and answers every line
/// as `serve` does before a worker is involved: a blank line is skipped, an overlong one gets a
/// `bad_request` with the `id` found in its head, a malformed one a `bad_request` with its
/// shallowly found `id`; a request's `args` are echoed as an `ok` line and an `end` line is
/// built for its `id`, as for a worker's reply.
///
/// Properties (a violation panics): every line produced is one line of valid JSON (a single
/// object, no line break); every rejection is a `bad_request` line. The host's allocations are
/// bounded by [`SERVE_K`]` * N + `[`SERVE_C`] (checked by the replay test).
///
/// Returns `(requests, rejections)`.
pub fn fuzz_serve_input(bytes: &[u8]) -> (usize, usize) {
    let mut reader = LineReader::new(tokio::io::BufReader::with_capacity(64 * 1024, bytes), MAX_LINE);
    let (mut requests, mut rejections) = (0, 0);
    // Reading a slice never waits: each `next` completes on its first poll.
    while let Some(Ok(Some(line))) = reader.next().now_or_never() {
        match line {
            Line::Whole(l) if l.iter().all(u8::is_ascii_whitespace) => {}
            Line::Whole(l) => match json::parse(l) {
                Ok(req) => {
                    requests += 1;
                    match output::value_line(&req.id, "ok", &req.args) {
                        Ok(line) => check(&line, None),
                        Err(line) => panic!("parsed args rejected: {}", String::from_utf8_lossy(&line)),
                    }
                    check(&output::end_line(&req.id), None);
                }
                Err(line) => {
                    rejections += 1;
                    check(&line, Some("bad_request"));
                }
            },
            Line::TooLong(head) => {
                rejections += 1;
                let id = json::shallow_id(&head).map_or_else(Id::null, |r| Id::new(Some(r)));
                check(&output::bad_request(&id, "request line too long".into()), Some("bad_request"));
            }
        }
    }
    (requests, rejections)
}

/// A reply line as a client reads it: the `id` and the values kept raw (echoed as the client or
/// the worker spelled them), the error decoded (written by `serve` itself).
#[derive(serde::Deserialize)]
struct ReplyLine<'a> {
    #[serde(borrow)]
    id: &'a serde_json::value::RawValue,
    #[serde(default)]
    error: Option<ReplyError>,
}

#[derive(serde::Deserialize)]
struct ReplyError {
    kind: String,
}

/// One line of valid JSON (an object with an `id`; the error `kind` given, if any).
///
/// Valid by the JSON grammar, which is what `serve` promises: an `id` or `args` is echoed as the
/// client spelled it, so a lone surrogate escape (`"\ud906"`) or a number past `f64` (`1e999`)
/// comes back as sent (serde_json's `Value` refuses both; its raw values, like the grammar, do
/// not). Only our own parts (the error) are decoded.
fn check(line: &[u8], kind: Option<&str>) {
    assert!(!line.contains(&b'\n'), "a reply line holds a line break: {}", String::from_utf8_lossy(line));
    let reply: ReplyLine<'_> = match serde_json::from_slice(line) {
        Ok(r) => r,
        // Nesting past serde_json's recursion limit (128), accepted by `serve` only as the raw
        // value it echoes, cannot be read back by serde_json; the grammar sets no limit.
        Err(e) if e.to_string().contains("recursion limit") => return,
        Err(e) => panic!("a reply line is not JSON ({e}): {}", String::from_utf8_lossy(line)),
    };
    assert!(!reply.id.get().is_empty(), "a reply line with an empty id");
    if let Some(kind) = kind {
        assert_eq!(reply.error.map(|e| e.kind).as_deref(), Some(kind), "unexpected rejection");
    }
}
