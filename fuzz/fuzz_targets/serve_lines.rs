//! Bytes a client writes to `snakepit serve`'s stdin. See
//! `snakepit_cli::fuzzing::fuzz_serve_input`.
#![no_main]

#[path = "alloc.rs"]
mod alloc;

use snakepit_cli::fuzzing::{fuzz_serve_input, SERVE_C, SERVE_K};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (_, peak) = alloc::peak_during(|| fuzz_serve_input(data));
    let bound = SERVE_K * data.len() + SERVE_C;
    assert!(peak <= bound, "{} input bytes made the host allocate {peak} bytes (bound {bound})", data.len());
});
